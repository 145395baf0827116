"""Token maps (the paper's Figure 3): which input patches each surviving token stands for.

A reduction step's source matrix ([B, P + n, N0], :class:`~.engine.tokens.Tokens`) says which of
the N0 input tokens every surviving token covers. A patch no surviving token covers was dropped
and is greyed out; a surviving token that covers several patches (a ToMe merge, an eTPS host, EViT's
fused token) tints its patches with one colour per merged group, so groups can be told apart.
Patches kept on their own are left as they are.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

GREY = 0.5
GREY_ALPHA = 0.75  # dropped patches: mostly grey, the content still faintly visible
MERGE_ALPHA = 0.5  # merged patches: half colour, half content
# 60 distinct colours: a ToMe step on 196 patches can leave dozens of merged groups.
PALETTE = np.concatenate([matplotlib.colormaps[name].colors for name in ("tab20", "tab20b", "tab20c")])[:, :3]
# Fixed panel and header sizes, so a figure's pixel size follows from its grid alone.
PANEL_INCHES = 1.6
HEADER_INCHES = 0.9
TITLE_CHARS_PER_INCH = 14  # wrap the title to the figure width (8 pt text)
DPI = 150


def to_rgb(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Undo the data module's normalisation: [B, C, H, W] (C = 1 or 3) to [B, H, W, 3] in [0, 1]."""
    mean_t = torch.as_tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    rgb = (images.detach().cpu() * std_t + mean_t).clamp(0.0, 1.0)
    if rgb.shape[1] == 1:
        rgb = rgb.expand(-1, 3, -1, -1)
    return rgb.permute(0, 2, 3, 1).numpy()


def patch_owners(source: Tensor, num_prefix: int) -> np.ndarray:
    """[B, n0] index of the surviving non-prefix token each input patch belongs to; -1 if dropped.

    A 0/1 source gives each covered patch its one token; a weighted one (a patch shared by
    several tokens) gives it the token with the largest weight.
    """
    weights = source[:, num_prefix:, num_prefix:].detach().float().cpu()
    best, owner = weights.max(dim=1)
    owner[best <= 0] = -1
    return owner.numpy()


def render_token_map(image: np.ndarray, owners: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """One image ([H, W, 3] in [0, 1]) with dropped patches greyed and merged groups tinted.

    ``owners``: [gh * gw] from :func:`patch_owners`, patches in row-major order. Colours go to merged
    groups in the order of their first patch, so the same grouping always gets the same colours.
    """
    gh, gw = grid
    height, width = image.shape[:2]
    if height % gh or width % gw or owners.shape != (gh * gw,):
        raise ValueError(
            f"a {gh}x{gw} patch grid does not fit a {height}x{width} image / {owners.shape} owners"
        )
    tokens, first_patch, counts = np.unique(owners, return_index=True, return_counts=True)
    merged = [(f, t) for t, f, c in zip(tokens, first_patch, counts, strict=True) if t >= 0 and c > 1]
    colour = np.zeros((gh * gw, 3))
    alpha = np.zeros(gh * gw)
    alpha[owners < 0] = GREY_ALPHA
    colour[owners < 0] = GREY
    for rank, (_, token) in enumerate(sorted(merged)):
        colour[owners == token] = PALETTE[rank % len(PALETTE)]
        alpha[owners == token] = MERGE_ALPHA
    scale = (height // gh, width // gw)
    colour_px = np.kron(colour.reshape(gh, gw, 3), np.ones((*scale, 1)))
    alpha_px = np.kron(alpha.reshape(gh, gw), np.ones(scale))[..., None]
    return (1.0 - alpha_px) * image + alpha_px * colour_px


def draw_token_maps(
    images: np.ndarray,
    steps: Sequence[tuple[str, Tensor]],
    num_prefix: int,
    grid: tuple[int, int],
    title: str,
    path: str | Path,
) -> Path:
    """Save a PNG grid: one row per image; the original, then the token map after each step.

    ``images``: [B, H, W, 3] from :func:`to_rgb`; ``steps``: (column label, source matrix) pairs.
    The figure is ``(1 + len(steps)) * PANEL_INCHES`` wide and ``B * PANEL_INCHES + HEADER_INCHES``
    high at ``DPI``, so its size tells its grid.
    """
    rows, cols = len(images), 1 + len(steps)
    height = rows * PANEL_INCHES + HEADER_INCHES
    # A bare Figure renders with Agg and leaves pyplot's global state (and backend) alone.
    fig = Figure(figsize=(cols * PANEL_INCHES, height), dpi=DPI)
    axes = fig.subplots(rows, cols, squeeze=False)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=rows * PANEL_INCHES / height, wspace=0.04)
    fig.suptitle(textwrap.fill(title, int(cols * PANEL_INCHES * TITLE_CHARS_PER_INCH)), fontsize=8)
    columns = [images] + [
        [
            render_token_map(img, own, grid)
            for img, own in zip(images, patch_owners(src, num_prefix), strict=True)
        ]
        for _, src in steps
    ]
    labels = ["input"] + [label for label, _ in steps]
    for c, (label, panels) in enumerate(zip(labels, columns, strict=True)):
        axes[0, c].set_title(label, fontsize=8)
        for r, panel in enumerate(panels):
            axes[r, c].imshow(panel, interpolation="nearest")
            axes[r, c].set_axis_off()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path
