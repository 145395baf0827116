"""The operator profile of a method against the plain model on its token counts."""

from __future__ import annotations

import pytest

from tnt_lightning.measure import profile


def test_the_difference_is_per_operator_largest_first_and_says_what_the_gflops_count():
    method = {"aten::sort": 1.0, "aten::addmm": 2.0, "aten::gather": 0.1}
    plain = {"aten::addmm": 1.5, "aten::gelu": 0.3}
    rows = profile.difference_rows(method, plain, top=3)
    assert [(r["op"], r["extra_ms"], r["counted"]) for r in rows] == [
        ("aten::sort", 1.0, False),
        ("aten::addmm", 0.5, True),
        ("aten::gelu", -0.3, False),
    ]


def test_method_options_are_read_as_numbers_where_they_are_numbers():
    assert profile.parse_options(["r=8", "alpha=0.5", "mode=avg", "blocks=[3, 6, 9]"]) == {
        "r": 8,
        "alpha": 0.5,
        "mode": "avg",
        "blocks": [3, 6, 9],
    }
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        profile.parse_options(["r"])


def test_a_report_names_the_three_models_and_the_operators_only_the_method_runs():
    report = profile.profile_method(
        "deit_tiny_patch16_224", "topk", 0.5, "single", batch_size=1, passes=1, rounds=1, options={}, top=1000
    )
    for row in ("| base | 1.258 |", "| method | 0.737 |", "| plain, same tokens | 0.737 |"):
        assert row in report
    only_method = [
        line for line in report.splitlines() if line.startswith("| `aten::") and "| 0.00 | +" in line
    ]
    assert any("aten::topk" in line or "aten::sort" in line for line in only_method), report  # the selection
