"""Keep counts exactly as the official code computes them (docs/methods/conventions.md#keep-count-rules,
docs/methods/flops.md#anchors-reproduced)."""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_vit
from tnt_lightning.engine import apply_reducer
from tnt_lightning.methods import EViT, ToMe, TopK
from tnt_lightning.methods.common.keep import (
    keep_ceil,
    keep_cumulative,
    keep_floor,
    tome_merge_count,
    tome_single_layer_r,
)


@pytest.mark.parametrize(
    "rate,count",
    [
        (0.8, 156),
        (0.7, 137),
        (0.6, 117),
        (0.5, 98),
        (0.45, 88),
        (0.4, 78),
        (0.35, 68),
        (0.3, 58),
        (0.25, 49),
        (0.2, 39),
    ],
)
def test_int_196_k_worked_values(rate, count):
    assert keep_floor(196, rate) == count


@pytest.mark.parametrize("n,rate,count", [(90, 0.7, 62), (180, 0.35, 62), (170, 0.7, 118)])
def test_python_float_truncation_is_reproduced_not_fixed(n, rate, count):
    assert keep_floor(n, rate) == count
    assert round(n * rate) != count


def test_evit_ceil_counts_with_the_fused_token():
    # rho = .7 on a CLS-only model: 196 -> 138 (+1 fused) -> 98 (+1) -> 70 (+1)
    # (docs/methods/flops.md#anchors-reproduced)
    n, kept = 196, []
    for _ in range(3):
        k = keep_ceil(n, 0.7)
        kept.append(k)
        n = k + 1
    assert kept == [138, 98, 70]


@pytest.mark.parametrize("rho,counts", [(0.8, [156, 125, 100]), (0.7, [137, 96, 67]), (0.5, [98, 49, 24])])
def test_dynamicvit_cumulative_counts(rho, counts):
    assert [keep_cumulative(196, rho, j) for j in (1, 2, 3)] == counts


@pytest.mark.parametrize(
    "rates,counts",
    [
        ([1, 0.95, 0.95], [156, 148, 140]),
        ([0.9, 0.9, 0.9], [140, 126, 113]),
        ([0.85, 0.85, 0.8], [132, 112, 89]),
        ([0.75, 0.85, 0.7], [117, 99, 69]),
        ([0.5, 0.6, 0.55], [78, 46, 25]),
    ],
)
def test_tnt_multi_layer_counts_from_156(rates, counts):
    n, out = 156, []
    for rate in rates:
        n = n if rate == 1 else keep_floor(n, rate)
        out.append(n)
    assert out == counts


def test_tome_merges_at_most_half():
    assert tome_merge_count(8, 196) == 8 and tome_merge_count(30, 40) == 20
    assert tome_single_layer_r(196, 0.5) == 98 and tome_single_layer_r(196, 0.8) == 40


def _token_counts(model, x) -> list[int]:
    """Tokens entering each block's MLP (prefix included)."""
    counts = []
    hooks = [
        b.norm2.register_forward_pre_hook(lambda m, a: counts.append(a[0].shape[1])) for b in model.blocks
    ]
    model(x)
    for h in hooks:
        h.remove()
    return counts


def test_topk_multi_layer_counts_through_a_real_forward():
    model = tiny_vit(prefix=2, depth=6, img=224, patch=16, dim=24, heads=2)
    apply_reducer(model, TopK([2, 3, 4], [0.9, 0.9, 0.8]))
    # 196 -> 176 -> 158 -> 126 patches, +2 prefix, inside blocks 2, 3, 4
    # (docs/methods/flops.md#anchors-reproduced)
    assert _token_counts(model, torch.randn(1, 3, 224, 224)) == [198, 198, 178, 160, 128, 128]


def test_tome_r8_counts_through_a_real_forward():
    model = tiny_vit(prefix=2, depth=12, img=224, patch=16, dim=24, heads=2)
    apply_reducer(model, ToMe(list(range(12)), [8] * 12))
    assert _token_counts(model, torch.randn(1, 3, 224, 224)) == list(range(190, 101, -8))


def test_evit_counts_through_a_real_forward():
    model = tiny_vit(prefix=1, depth=10, img=224, patch=16, dim=24, heads=2)
    apply_reducer(model, EViT([3, 6, 9], [0.7, 0.7, 0.7]))
    counts = _token_counts(model, torch.randn(1, 3, 224, 224))
    assert counts[3] == 1 + 138 + 1 and counts[6] == 1 + 98 + 1 and counts[9] == 1 + 70 + 1
