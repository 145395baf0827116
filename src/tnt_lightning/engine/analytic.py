"""Closed-form FLOPs of a plain ViT (docs/methods/flops.md): the counter's cross-check, and what a
method that plans by cost (DiffRate's keep-rate equivalents) reads. In the engine, below both.

Every formula counts multiply-adds the way fvcore does (see :mod:`tnt_lightning.measure.flops`).
"""

from __future__ import annotations

from collections.abc import Sequence


def attn_part(n: int, dim: int) -> int:
    """LN1 + qkv + Q.K^T + A.V + proj on ``n`` tokens."""
    return 5 * n * dim + 4 * n * dim * dim + 2 * n * n * dim


def mlp_part(n: int, dim: int, mlp_hidden: int) -> int:
    """LN2 + fc1 + fc2 on ``n`` tokens."""
    return 5 * n * dim + 2 * n * dim * mlp_hidden


def block(n: int, dim: int, mlp_hidden: int) -> int:
    return attn_part(n, dim) + mlp_part(n, dim, mlp_hidden)


def vit_macs(
    tokens_per_block: Sequence[int],
    dim: int,
    mlp_hidden: int,
    num_patches: int,
    patch_size: int,
    in_chans: int,
    num_classes: int,
    num_heads_out: int = 1,
    final_tokens: int | None = None,
) -> int:
    """Multiply-adds of a ViT whose block ``l`` runs on ``tokens_per_block[l]`` tokens.

    ``final_tokens`` is the number of tokens the final LayerNorm sees (default: the last block's).
    ``num_heads_out`` counts classifier heads (2 for DeiT-distilled).
    """
    patch_embed = num_patches * dim * in_chans * patch_size * patch_size
    blocks = sum(block(n, dim, mlp_hidden) for n in tokens_per_block)
    n_final = tokens_per_block[-1] if final_tokens is None else final_tokens
    return patch_embed + blocks + 5 * n_final * dim + num_heads_out * dim * num_classes
