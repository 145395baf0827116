"""A same-process speedup says how much to trust it: the spread of its pairs and the FLOP limit."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tnt_lightning.measure.reliability import judge_speedup
from tnt_lightning.report.tables import _unreliable
from tnt_lightning.tasks.common import format_summary


def test_agreeing_pairs_within_the_flop_limit_are_reliable():
    trust = judge_speedup([[100.0, 150.0], [102.0, 151.0], [98.0, 148.0]], flops_ratio=1.6, bound=0.1)
    assert trust["reliable"] and "why" not in trust
    assert trust["spread"] == pytest.approx((1.5102 - 1.4804) / 1.5, abs=1e-3)


def test_pairs_that_disagree_or_beat_the_flop_limit_are_unreliable():
    spread = judge_speedup([[100.0, 150.0], [100.0, 190.0], [100.0, 160.0]], flops_ratio=2.0, bound=0.1)
    assert not spread["reliable"] and "disagree by 25%" in spread["why"]
    too_fast = judge_speedup([[100.0, 150.0], [100.0, 151.0]], flops_ratio=1.2, bound=0.1)
    assert not too_fast["reliable"] and "exceeds the FLOP limit 1.20x" in too_fast["why"]
    assert judge_speedup([[100.0, 150.0]], flops_ratio=None, bound=0.1)["reliable"]


def test_the_summary_and_the_report_say_so():
    sp = {"spread": 0.25, "reliable": False, "why": "its 3 timed pairs disagree by 25% (> 10%)"}
    record = dict(
        task="eval", model="vit_mnist", method="topk", keep_rate=0.5, data="mnist", status="ok",
        run_id="r", metrics={"speedup": 1.6}, details={"speedup": sp},
    )  # fmt: skip
    assert "speedup 1.60x (pairs spread 25%, unreliable: its 3 timed pairs disagree" in format_summary(record)
    records = [{"metrics": {"speedup_reliable": False}}, {"metrics": {"speedup_reliable": True}}]
    assert _unreliable(SimpleNamespace(records=records, n=2)) == " (unreliable in 1 of 2)"
    assert _unreliable(SimpleNamespace(records=records[1:], n=1)) == ""
