"""`make bench`'s plumbing on the tiny backbone, one timed pass per model."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from tnt_lightning.measure import bench


def test_bench_writes_the_table_json_and_plot_for_every_method_and_schedule(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["--model", "vit_mnist", "--methods", "topk,tnt,tome", "--warmup", "1", "--iters", "1"]
    rows = bench.main([*args, "--pairs", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "vit_mnist, keep_rate=0.5, batch 32, fp32" in printed and "load average after:" in printed
    data = json.loads((out / "bench.json").read_text())
    assert data["rows"] == json.loads(json.dumps(rows))
    # single-layer ToMe cannot keep half of 49 patches in one layer: refused, the others go on
    assert [(r["method"], r["schedule"]) for r in data["refused"]] == [("tome", "single")]
    assert [(r["method"], r["schedule"]) for r in rows] == [
        ("topk", "single"), ("tnt", "single"), ("topk", "multi"), ("tnt", "multi"), ("tome", "multi")
    ]  # fmt: skip
    for r in rows:
        assert len(r["pairs"]) == 2
        assert r["gflops_ratio"] == pytest.approx(r["base_gflops"] / r["gflops"]) and r["gflops_ratio"] > 1.2
        assert r["speedup_over_flops_limit"] == pytest.approx(r["speedup"] / r["gflops_ratio"])
    # the plain model on its first 36, 24, 17 of 49 patches: fewer tokens, a higher GFLOPs ratio
    assert [r["method"] for r in data["ceiling"]] == [f"first {n} patches" for n in (36, 24, 17)]
    ratios = [r["gflops_ratio"] for r in data["ceiling"]]
    assert 1.2 < ratios[0] < ratios[1] < ratios[2] and all(len(r["pairs"]) == 2 for r in data["ceiling"])
    assert data["protocol"]["threads"] >= 1 and data["protocol"]["load_average_before"]
    assert data["protocol"]["malloc_kept"] is True
    assert "| topk | single |" in (out / "bench.md").read_text()
    assert "| first 24 patches | every block |" in (out / "bench.md").read_text()
    with Image.open(out / "speedup_vs_gflops.png") as image:
        assert image.format == "PNG"


def test_first_tokens_runs_every_block_on_the_prefix_and_first_patches():
    model = bench.first_tokens(bench.build(["model=vit_mnist", "data=synthetic"])[0], 10)
    seen = []
    model.blocks[-1].register_forward_hook(lambda _m, _i, x: seen.append(x.shape[1]))
    model(torch.randn(2, 1, 28, 28))
    assert seen == [11]  # CLS and 10 of the 49 patches


def test_bench_refuses_an_unknown_method():
    with pytest.raises(SystemExit):
        bench.main(["--methods", "topk,fastest"])


def test_bench_set_changes_every_method_but_not_the_base(tmp_path):
    args = ["--model", "vit_mnist", "--methods", "topk", "--schedules", "single", "--no-ceiling"]
    args += ["--pairs", "1", "--out", str(tmp_path)]
    default, lower = bench.main(args)[0], bench.main([*args, "--set", "keep_rate=0.3"])[0]
    assert lower["base_gflops"] == default["base_gflops"]
    assert lower["gflops"] < default["gflops"]
    assert json.loads((tmp_path / "bench.json").read_text())["protocol"]["overrides"] == ["keep_rate=0.3"]


def test_bench_refuses_a_bad_override_before_timing_anything(capsys):
    with pytest.raises(SystemExit, match="method.no_such_key"):
        bench.main(["--model", "vit_mnist", "--methods", "topk", "--set", "method.no_such_key=1"])
    assert "| method |" not in capsys.readouterr().out


def test_bench_refuses_a_backbone_swap_in_set():
    with pytest.raises(SystemExit):
        bench.parse(["--set", "model=deit_tiny"])
    assert bench.parse(["--set", "model.pruning.multi.blocks=[3]"]).overrides == [
        "model.pruning.multi.blocks=[3]"
    ]
