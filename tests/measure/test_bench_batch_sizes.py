"""`make bench`'s batch-size sweep (measure/batch_sweep.py) on the tiny backbone: structure and
invariants only (which rows, which references, which token counts), never a timing comparison."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from tnt_lightning.engine import Location, Site
from tnt_lightning.measure import batch_sweep, bench
from tnt_lightning.measure.flops import token_trace


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    args = [
        "--quick",
        "--methods",
        "topk,tome,evit",
        "--rounds",
        "2",
        "--token-stride",
        "16",
        "--out",
        str(out),
    ]
    return bench.main(args), out


def test_every_batch_method_and_schedule_has_a_row_with_both_references(quick):
    rows, out = quick
    data = json.loads((out / "bench_batches.json").read_text())
    assert data["rows"] == json.loads(json.dumps(rows))
    # single-layer ToMe cannot merge half of 49 patches in one step, multi-layer EViT's DeiT blocks
    # are past vit_mnist's 6: both refused, the rest go on
    refused = [(r["method"], r["schedule"]) for r in data["refused"]]
    assert refused == [("tome", "single"), ("evit", "multi")]
    expected = [("topk", "single"), ("evit", "single"), ("topk", "multi"), ("tome", "multi")]
    assert [(r["batch_size"], r["method"], r["schedule"]) for r in rows] == [
        (b, m, s) for b in (1, 4) for m, s in expected
    ]
    assert data["protocol"]["batch_sizes"] == [1, 4] and data["protocol"]["rounds"] == 2
    for r in rows:
        assert set(r["latency_ms"]) == {"base", "method", "plain", "random"}
        assert set(r["speedup"]) == set(r["gflops_ratios"]) == {"method", "plain", "random"}
        for s in (*r["latency_ms"].values(), *r["speedup"].values()):
            assert s["min"] <= s["q1"] <= s["median"] <= s["q3"] <= s["max"]
        assert r["rounds"] == 2 and r["number"] >= 1
        assert r["gflops_ratio"] == pytest.approx(r["base_gflops"] / r["gflops"]) and r["gflops_ratio"] > 1.2
        assert r["speedup_over_flops_limit"]["method"] == pytest.approx(
            r["speedup"]["method"]["median"] / r["gflops_ratio"]
        )


def test_the_references_run_the_methods_token_counts_with_no_more_flops(quick):
    rows, _ = quick
    for r in rows:
        # the plain model and Random drop ran every block on exactly the method's counts
        assert r["reference_tokens"]["plain"] == r["tokens"] == r["reference_tokens"]["random"]
        assert any(attn < r["tokens"][0][0] or mlp < attn for attn, mlp in r["tokens"][1:])
        # same counts, no scoring: never more FLOPs than the method; a random draw costs no FLOPs
        assert r["gflops_ratios"]["plain"] >= r["gflops_ratio"] * (1 - 1e-9)
        assert r["gflops_ratios"]["random"] == pytest.approx(r["gflops_ratios"]["plain"])


def test_the_tables_and_plots_are_written(quick):
    rows, out = quick
    md = (out / "bench_batches.md").read_text()
    assert "| method | schedule | batch |" in md
    for r in rows:
        assert batch_sweep.sweep_line(r) in md
    for name in ("speedup_vs_batch_vit_mnist.png", "latency_vs_tokens_vit_mnist_cpu.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG"


def test_the_latency_table_covers_every_token_count_and_marks_the_methods(quick):
    rows, out = quick
    table = json.loads((out / "bench_batches.json").read_text())["token_latency"]
    # vit_mnist prunes in block 1 (single-layer): the table times blocks 2.. on 1..50 tokens
    assert table["start_block"] == 2
    counts = [r["tokens"] for r in table["rows"]]
    assert {1, 17, 33, 49, 50} <= set(counts) and counts == sorted(counts)
    marks = {int(n): names for n, names in table["marks"].items()}
    for r in rows:
        if r["batch_size"] == 1:
            assert f"{r['method']}/{r['schedule']}" in marks[r["tokens"][2][0]]
    assert set(marks) <= set(counts)
    for r in table["rows"]:
        assert set(r["latency_ms"]) == {"1"}
    assert table["rows"][-1]["latency_ms"]["1"]["of_full"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("method", "overrides"),
    [
        ("topk", []),
        ("tome", ["schedule=multi", "method.r=8"]),  # merging, a step after every block
        ("evit", []),  # inside a block: the MLP on fewer tokens than the attention
        ("ats", []),  # the count depends on the images
    ],
)
@pytest.mark.parametrize("random", [False, True])
def test_reference_runs_every_block_on_the_traced_counts(method, overrides, random):
    common = ["model=vit_mnist", "data=synthetic"]
    model = bench.build([*common, f"method={method}", *overrides])[0]
    x = torch.randn(3, 1, 28, 28)
    trace = token_trace(model, x)
    ref = batch_sweep.reference(bench.build(common)[0], model, trace, random)
    assert token_trace(ref, x) == trace
    assert isinstance(ref.reducer, batch_sweep.FixedCounts) and ref.reducer.random is random


def test_reference_drops_the_dist_token_where_the_method_does():
    common = ["model=deit_tiny_distilled", "data=synthetic"]
    model = bench.build([*common, "method=evit", "paper_flops_compat=true"])[0]
    assert model.num_prefix_tokens == 1
    x = torch.randn(1, 3, 224, 224)
    trace = token_trace(model, x)
    ref = batch_sweep.reference(bench.build(common)[0], model, trace, random=False)
    assert ref.num_prefix_tokens == 1 and token_trace(ref, x) == trace


def test_steps_of_reads_pre_inside_and_after_steps():
    trace = [(40, 40), (40, 30), (30, 30), (20, 20)]
    assert batch_sweep.steps_of(trace, start=50) == {
        Location(Site.PRE): 40,
        Location(Site.INSIDE, 1): 30,
        Location(Site.AFTER, 2): 20,
    }
    assert batch_sweep.steps_of([(50, 50), (50, 50)], start=50) == {}


def test_first_counts_keep_the_first_tokens_and_random_a_sorted_draw():
    from tnt_lightning.engine import Tokens

    x = torch.arange(2 * 10, dtype=torch.float).view(2, 10, 1)
    loc = Location(Site.AFTER, 0)
    first = batch_sweep.FixedCounts({loc: 4}).reduce(loc, Tokens.start(x, 1), None)
    assert torch.equal(first.x, x[:, :4])
    drawn = batch_sweep.FixedCounts({loc: 4}, random=True).reduce(loc, Tokens.start(x, 1), None)
    assert drawn.x.shape == (2, 4, 1) and torch.equal(drawn.x[:, 0], x[:, 0])  # the CLS token stays first
    assert (drawn.x[:, 1:].diff(dim=1) > 0).all()  # the kept patches in their order
    with pytest.raises(ValueError, match="cannot keep"):
        batch_sweep.FixedCounts({loc: 12}).reduce(loc, Tokens.start(x, 1), None)


def test_sweep_defaults_per_device_and_the_single_batch_bench_unchanged():
    cpu = bench.parse(["--sweep", "--device", "cpu"])
    assert (cpu.model, cpu.batch_sizes, cpu.rounds) == ("deit_tiny", [1, 8, 32, 128], 3)
    gpu = bench.parse(["--sweep", "--device", "cuda"])
    assert gpu.model == "deit_small_distilled" and gpu.batch_sizes[-1] == 256
    assert gpu.methods == ",".join(bench.METHODS) and gpu.token_stride == 1
    given = bench.parse(
        ["--batch-sizes", "2,3", "--model", "vit_mnist", "--methods", "topk", "--device", "cpu"]
    )
    assert given.sweep and (given.model, given.batch_sizes, given.methods) == ("vit_mnist", [2, 3], "topk")
    single = bench.parse([])
    assert not single.sweep and (single.model, single.batch_size, single.warmup) == (
        "deit_small_distilled",
        32,
        1,
    )
    assert single.methods == ",".join(bench.METHODS)


def test_token_grid_has_both_ends_the_stride_and_the_marks():
    assert batch_sweep.token_grid(20, 8, [5, 30]) == [1, 5, 9, 17, 20]
    assert batch_sweep.token_grid(4, 1) == [1, 2, 3, 4]
