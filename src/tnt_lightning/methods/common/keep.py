"""How many tokens survive, exactly as each official implementation computes it
(docs/methods/conventions.md#keep-count-rules).

These are deliberately not "fixed" with ``round`` or exact fractions: the official code truncates
Python floats, so ``int(90 * 0.7) == 62``, and reproducing a paper's token counts (and GFLOPs)
needs the same float expression.
"""

from __future__ import annotations

import math


def keep_floor(n: int, rate: float) -> int:
    """``int(n * rate)``: TNT, Top-K, Random drop, Zero-TP (relative to the current count ``n``)."""
    return int(n * rate)


def keep_ceil(n: int, rate: float) -> int:
    """``ceil(rate * n)``: EViT and eTPS (relative to the current count, fused token included)."""
    return math.ceil(rate * n)


def keep_cumulative(n0: int, rho: float, stage: int) -> int:
    """``int(n0 * rho ** stage)``: DynamicViT and dTPS, relative to the initial ``n0`` (stage 1, 2, 3)."""
    return int(n0 * rho**stage)


def tome_merge_count(r: int, n: int) -> int:
    """Tokens ToMe merges in a layer with ``n`` non-prefix tokens: at most half of them."""
    return min(r, n // 2)


def tome_single_layer_r(n: int, rate: float) -> int:
    """ToMe as a single-layer method at keep rate ``rate``: merge all but ``int(n * rate)`` tokens."""
    return n - keep_floor(n, rate)
