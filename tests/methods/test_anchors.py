"""The paper's GFLOPs, reproduced from its own tables (docs/methods/flops.md#anchors).

Every row of the paper's result tables that names a runnable setting of an implemented method is
run (random weights, batch 1) and its GFLOPs must round to the printed value: |ours - printed| <=
0.005. Known misprints (``paper/anchor_exceptions.csv``) must *not* match, so the list stays
honest; groups that are not anchors at all (Zero-TP multi-layer, DynamicViT on ViT/16) are skipped.

`make test` runs the first row of every table, method and backbone (and every misprint); the other
rows carry the ``every_anchor`` marker and run in `make test-anchors` (CI) and `make test-full`.
"""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from helpers import CONF, compose_config
from tnt_lightning.engine import remove_reducer
from tnt_lightning.measure import count_macs
from tnt_lightning.methods.assembly import attach, reducer_for
from tnt_lightning.models import create_model
from tnt_lightning.paper import anchor_exception, describe_row, load_results, overrides_for

IMPLEMENTED = {p.stem for p in (CONF / "method").glob("*.yaml")}
ROWS = [
    r
    for r in load_results()
    if (o := overrides_for(r)) is not None and o[1].removeprefix("method=") in IMPLEMENTED
]


def fast_rows(rows: list[dict]) -> set[int]:
    """Indices of the rows `make test` checks: the first of each (table, method, backbone), and every
    listed misprint."""
    first: dict[tuple[str, ...], int] = {}
    for i, row in enumerate(rows):
        overrides = overrides_for(row)
        first.setdefault((row["table"], overrides[0], overrides[1]), i)
    return set(first.values()) | {i for i, row in enumerate(rows) if anchor_exception(row) is not None}


FAST = fast_rows(ROWS)
_MODELS: dict[tuple[str, bool], torch.nn.Module] = {}


def backbone(spec, cls_only: bool) -> torch.nn.Module:
    """One backbone per model, built once; a second for the methods whose DIST token ``attach``
    drops in place."""
    if (spec.name, cls_only) not in _MODELS:
        _MODELS[(spec.name, cls_only)] = create_model(spec)
    return _MODELS[(spec.name, cls_only)]


def measured_gflops(overrides: list[str], tmp_path) -> float:
    cfg = compose_config(overrides, tmp_path)
    spec = instantiate(cfg.model)
    reducer, _ = reducer_for(backbone(spec, False), cfg.method, cfg.schedule, cfg.keep_rate, spec.pruning)
    if reducer is None:
        return count_macs(backbone(spec, False), torch.randn(1, *spec.input_size)) / 1e9
    model = attach(backbone(spec, reducer.cls_only_backbone), reducer)
    try:
        return count_macs(model, torch.randn(1, *spec.input_size)) / 1e9
    finally:
        remove_reducer(model)


def test_every_table_contributes_anchors():
    tables = {r["table"] for r in ROWS if anchor_exception(r) is None}
    assert {
        "2",
        "5",
        "6",
        "7",
        "8",
        "9",
        "10",
        "11",
        "12",
        "13",
        "14",
        "15",
        "16",
        "17",
        "18",
        "19",
        "20",
    } <= tables


@pytest.mark.parametrize(
    "row",
    [
        pytest.param(row, id=describe_row(row), marks=() if i in FAST else pytest.mark.every_anchor)
        for i, row in enumerate(ROWS)
    ],
)
def test_paper_gflops(row, tmp_path):
    exception = anchor_exception(row)
    if exception is not None and exception["exact"] == "no":
        pytest.skip(exception["reason"])
    gflops = measured_gflops(overrides_for(row), tmp_path)
    printed = float(row["gflops"])
    if exception is not None:
        assert abs(gflops - printed) > 0.005, f"listed as a misprint but reproduced: {exception['reason']}"
    else:
        assert abs(gflops - printed) <= 0.005 + 1e-9, f"computed {gflops:.4f}, printed {printed}"
