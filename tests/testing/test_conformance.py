"""The conformance kit (tnt_lightning.testing) over every registered method, and proof that its checks
can fail: deliberately broken toy methods, defined here and never registered, fail the check aimed at
them."""

from __future__ import annotations

import pytest
import torch

from tnt_lightning.engine import Tokens
from tnt_lightning.methods import RandomDrop, TopK
from tnt_lightning.methods.common.keep import keep_floor
from tnt_lightning.testing import CHECKS, assert_conforms, check_method, conformance_cases, run_check

# torch.compile traces each method for ~5 s on 2 cores: that column runs in `make test-full` and in
# `make conformance` (CI), which prints the whole table.
SLOW_CHECK = "compile-bf16"
CASES = [
    pytest.param(*case.values, id=case.id, marks=pytest.mark.slow) if case.values[1] == SLOW_CHECK else case
    for case in conformance_cases()
]


@pytest.mark.parametrize("method,check", CASES)
def test_every_method_conforms(method, check):
    assert_conforms(method, check)


class DropsCLS(TopK):
    """Top-K that loses the CLS token (the DIST token becomes the first prefix)."""

    def prune(self, tokens, rate, attn):
        kept = super().prune(tokens, rate, attn)
        return Tokens(kept.x[:, 1:], kept.num_prefix - 1)


class RanksByBatch(TopK):
    """Top-K on the batch's mean CLS attention: every image keeps the batch's favourite patches."""

    def prune(self, tokens, rate, attn):
        score = attn.cls_probs.mean(dim=(0, 1), keepdim=True).expand_as(attn.cls_probs)
        return super().prune(tokens, rate, type(attn)(cls_probs=score.contiguous()))


class KeepsOneMore(TopK):
    """Top-K whose step keeps one patch more than its rule (``count_after``) says."""

    def prune(self, tokens, rate, attn):
        idx = (
            attn.cls_probs.mean(dim=1)[:, 0, tokens.num_prefix :].topk(keep_floor(tokens.n, rate) + 1).indices
        )
        return tokens.keep(idx)


class GlobalRandom(RandomDrop):
    """Random drop drawing from torch's global generator rather than its own seeded one."""

    conformance_exceptions = {}

    def prune(self, tokens, rate, attn):
        draws = torch.rand(tokens.x.shape[0], tokens.n)
        return tokens.keep(draws.topk(keep_floor(tokens.n, rate), dim=1).indices)


@pytest.mark.parametrize(
    "toy,check",
    [
        (DropsCLS, "prefix-kept"),
        (RanksByBatch, "batch-independent"),
        (KeepsOneMore, "keep-counts"),
        (GlobalRandom, "seeded"),
    ],
    ids=lambda v: v if isinstance(v, str) else v.__name__,
)
def test_a_broken_method_fails_the_check_aimed_at_it(toy, check):
    result = run_check(toy, check)
    assert result.status == "fail", result
    assert result.message.startswith(("single-layer", "multi-layer"))


def test_a_counter_that_misses_fused_attention_fails_the_gflops_check(monkeypatch):
    """Without the project's extra formulas torch's counter does not see CPU fused attention."""
    from tnt_lightning.testing import conformance

    monkeypatch.setattr(conformance, "_EXTRA_FORMULAS", {})
    result = run_check("topk", "gflops")
    assert result.status == "fail" and "closed form" in result.message


def test_the_unbroken_toy_base_passes_as_a_class():
    """The broken toys differ from Top-K only in the step: Top-K given as a class passes the same checks."""
    assert {c: r.status for c, r in check_method(TopK, ["prefix-kept", "keep-counts", "seeded"]).items()} == {
        "prefix-kept": "pass",
        "keep-counts": "pass",
        "seeded": "pass",
    }


def test_a_declared_exception_is_reported_with_its_reason_not_run():
    result = check_method("random", ["batch-independent"])["batch-independent"]
    assert result.status == "exempt" and "place in the batch" in result.message
    assert set(RandomDrop.conformance_exceptions) <= set(CHECKS)
