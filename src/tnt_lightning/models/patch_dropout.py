"""Patch dropout for pretraining a backbone that token reduction will later feed with fewer tokens.

timm's ``PatchDropout`` (FLIP) keeps a fixed share of the patches, chosen uniformly: the kept set
always holds the image's usual mix of object and background. A token-reduction method does the
opposite at low keep rates: it keeps the object and drops the background. On the embedded study's
canvases (three quarters of the patches blank) a backbone pretrained with uniform patch dropout
classifies a random 30 % of its tokens better than the digit's own patches (docs/design-notes.md#backbone): it
never saw a token set without its usual mass of blank tokens. An ImageNet backbone has seen such
sets, since RandomResizedCrop varies how much of each photo is background.

:class:`ContentPatchDropout` gives the pretraining that variety: every step keeps a random share of
the patches, and on a random part of the steps it keeps the patches with content (not flat) before
any flat one. It runs during pretraining only and is removed before the weights are cached.
"""

from __future__ import annotations

import torch
from torch import nn


class ContentPatchDropout(nn.Module):
    """Keeps ``round(u * N)`` of the ``N`` patch tokens, ``u`` uniform in ``keep`` (one draw per
    step); with probability ``content_first`` the patches with content come first, else the kept
    set is uniform. Prefix tokens are always kept. Call :meth:`observe` with the images first (a
    forward pre-hook on the model does)."""

    def __init__(
        self,
        patch_size: int,
        keep: tuple[float, float] = (0.15, 0.85),
        content_first: float = 0.5,
        num_prefix_tokens: int = 1,
    ) -> None:
        super().__init__()
        low, high = keep
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"patch dropout keep={list(keep)} must be two shares with 0 < low <= high <= 1")
        if not 0.0 <= content_first <= 1.0:
            raise ValueError(f"patch dropout content_first={content_first} must be in [0, 1]")
        self.patch_size, self.keep, self.content_first = patch_size, (low, high), content_first
        self.num_prefix_tokens = num_prefix_tokens
        self.content: torch.Tensor | None = None

    def observe(self, images: torch.Tensor) -> None:
        """Record which patches of ``images`` ``[B, C, H, W]`` have content (are not one flat colour)."""
        p = self.patch_size
        patches = images.unfold(2, p, p).unfold(3, p, p)  # B, C, H/p, W/p, p, p
        spread = patches.amax(dim=(-1, -2)) - patches.amin(dim=(-1, -2))
        self.content = (spread.amax(dim=1) > 1e-6).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        if self.content is None or self.content.shape[0] != x.shape[0]:
            raise RuntimeError("ContentPatchDropout.observe(images) must run before each forward")
        prefix, patches = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :]
        batch, count = patches.shape[:2]
        low, high = self.keep
        share = low + (high - low) * torch.rand(()).item()
        kept = max(1, round(share * count))
        score = torch.rand(batch, count, device=x.device)
        if torch.rand(()).item() < self.content_first:
            score = score + self.content.to(score)  # every patch with content ranks above every flat one
        index = score.topk(kept, dim=1).indices.sort(dim=1).values
        patches = patches.gather(1, index.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        return torch.cat([prefix, patches], dim=1)
