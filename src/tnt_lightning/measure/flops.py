"""GFLOPs of the forward pass actually run, in the paper's convention.

The TNT paper (and the DynamicViT/TNT `calc_flops.py` it uses) reports fvcore numbers: one
multiply-add counts as one FLOP, matmuls/convolutions count the product of their dimensions
(bias ignored), LayerNorm counts 5 per element and everything element-wise is free.

We count with :class:`torch.utils.flop_counter.FlopCounterMode`, which sees every aten op that
really runs, so token counts that change mid-forward are followed, and nothing is saved for
tokens that are only masked. Three gaps are filled here:

* LayerNorm is not counted by torch; fvcore counts it as 5 x numel.
* CPU fused attention (``_scaled_dot_product_flash_attention_for_cpu``) is not in torch's
  registry, so a timm ViT with fused attention would lose its 2*N^2*D attention matmuls.
* ``torch.cdist`` (the clustering methods' distance matrices) is not counted by torch: N*M*C
  multiply-adds for N x M distances in C dimensions.

ptflops and fvcore miss attention on timm ViTs (docs/methods/flops.md); they are not used.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _layer_norm_flops(input_shape, *args, **kwargs) -> int:
    # FlopCounterMode counts 2 per multiply-add; fvcore's LayerNorm is 5 per element.
    return 2 * 5 * _numel(input_shape)


def _sdpa_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    *batch, n_q, d = query_shape
    n_k = key_shape[-2]
    d_v = value_shape[-1]
    b = _numel(batch)
    return 2 * b * n_q * n_k * (d + d_v)


def _mv_flops(mat_shape, vec_shape, *args, **kwargs) -> int:
    return 2 * _numel(mat_shape)


def _cdist_flops(x1_shape, x2_shape, *args, **kwargs) -> int:
    # Pairwise distances of [.., N, C] and [.., M, C]: one multiply-add per coordinate pair (the
    # clustering methods' distance matrices; torch's counter does not see cdist).
    *batch, n, c = x1_shape
    return 2 * _numel(batch) * n * x2_shape[-2] * c


_EXTRA_FORMULAS = {
    aten._cdist_forward: _cdist_flops,
    aten._euclidean_dist: _cdist_flops,
    aten.native_layer_norm: _layer_norm_flops,
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops,
    aten.mv: _mv_flops,
}


@torch.no_grad()
def count_macs(model: nn.Module, inputs: torch.Tensor) -> int:
    """Multiply-adds of one forward of ``model`` on ``inputs`` (fvcore's "FLOPs")."""
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
            model(inputs)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def count_gflops(model: nn.Module, input_shape: Sequence[int], device: torch.device | str = "cpu") -> float:
    """GFLOPs of ``model`` at batch 1 in eval mode, as the paper reports them."""
    inputs = torch.randn(1, *input_shape, device=device)
    return count_macs(model, inputs) / 1e9


def mean_gflops(model: nn.Module, images: Iterable[torch.Tensor]) -> dict[str, float | int]:
    """GFLOPs at batch 1 of each image (``[C, H, W]``), averaged: for a method whose kept count
    depends on the image (ATS), as the paper averages over the validation set."""
    counts = [count_macs(model, image.unsqueeze(0)) / 1e9 for image in images]
    if not counts:
        raise ValueError("mean_gflops needs at least one image")
    return {"mean": sum(counts) / len(counts), "min": min(counts), "max": max(counts), "images": len(counts)}


def input_shape(model: nn.Module) -> tuple[int, int, int]:
    """``(C, H, W)`` of the images a timm ViT was built for (its patch embedding's)."""
    embed = model.patch_embed
    return (embed.proj.in_channels, *embed.img_size)


def gflops(model: nn.Module) -> float:
    """GFLOPs of a timm ViT (pruned or not) as the project counts them: batch 1, eval mode, one
    multiply-add one FLOP (the paper's fvcore convention), on a random image of its input size.

    Args:
        model: a timm ``VisionTransformer``, with or without a method plugged in.

    Returns:
        GFLOPs (for a method whose kept count depends on the image, ATS, of that one image).
    """
    return count_gflops(model, input_shape(model), next(model.parameters()).device)


def token_trace(model: nn.Module, inputs: torch.Tensor | None = None) -> list[tuple[int, int]]:
    """How many tokens (prefix tokens included) each block's attention and MLP ran on, in one
    forward: what a method really left, and what the GFLOPs were counted for.

    Args:
        model: a timm ``VisionTransformer``, with or without a method plugged in.
        inputs: a batch of images; None: one random image of the model's input size.

    Returns:
        One ``(attention tokens, MLP tokens)`` pair per block (they differ in a block a method
        acts inside). A padded batch (ATS) counts its padding.
    """
    if inputs is None:
        inputs = torch.randn(1, *input_shape(model), device=next(model.parameters()).device)
    seen: dict[tuple[int, str], int] = {}

    def hook(block: int, part: str):
        return lambda _module, args: seen.__setitem__((block, part), args[0].shape[1])

    handles = [
        norm.register_forward_pre_hook(hook(i, part))
        for i, block in enumerate(model.blocks)
        for part, norm in (("attn", block.norm1), ("mlp", block.norm2))
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return [(seen[(i, "attn")], seen[(i, "mlp")]) for i in range(len(model.blocks))]
