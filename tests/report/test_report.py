"""Reports: tables beside the paper's numbers, seed averages, Pareto fronts, plots, W&B, budget matching.

The records are written by hand into a results.jsonl (the shape RunRecorder.build gives), so every
expected number is known; the paper's numbers are read from the paper CSV, not copied here.
"""

from __future__ import annotations

import csv
import sys
import types
import uuid

import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from helpers import compose_config
from tnt_lightning.engine import apply_reducer, backbone_info, remove_reducer
from tnt_lightning.measure import count_macs
from tnt_lightning.methods import build_reducer
from tnt_lightning.models import create_model
from tnt_lightning.paper import load_results
from tnt_lightning.report import ReportError, build_report, match_budget, pareto_front
from tnt_lightning.report.__main__ import main
from tnt_lightning.report.plots import plot_lines
from tnt_lightning.report.tables import Setting, match_paper
from tnt_lightning.results import append_record

torch.set_num_threads(1)

DEIT_S = "deit_small_distilled"


def record(
    method: str,
    keep_rate: float,
    seed: int = 0,
    metrics: dict | None = None,
    model: str = DEIT_S,
    data: str = "imagenet",
    schedule: str = "single",
    rates: list[float] | None = None,
    r: int | None = None,
    status: str = "ok",
    task: str = "eval",
    sweep: str | None = None,
    error: dict | None = None,
    method_options: dict | None = None,
) -> dict:
    """A record as RunRecorder.build writes it (only the fields the report reads)."""
    if method == "none":
        resolved = {"name": "none"}
    elif schedule == "single":
        resolved = {"name": "single", "blocks": [2], "rates": [keep_rate]}
    else:
        resolved = {"name": "multi", "blocks": [2, 3, 4], "rates": rates or [keep_rate] * 3}
        if r is not None:
            resolved["r"] = r
    method_cfg = {"name": method, "seed": seed} | ({"r": r} if r is not None else {}) | (method_options or {})
    run_dir = f"/runs/{uuid.uuid4().hex}"  # differs per run, and so does what resolves inside it
    return {
        "run_id": uuid.uuid4().hex[:12],
        "created_at": "2026-01-01T00:00:00+00:00",
        "status": status,
        "error": error,
        "task": task,
        "model": model,
        "method": method,
        "keep_rate": keep_rate,
        "schedule": resolved,
        "data": data,
        "seed": seed,
        "sweep_name": sweep,
        "metrics": metrics or {},
        "details": {"weights": "hub:test"},
        "config": {
            "task": task,
            "keep_rate": keep_rate,
            "seed": seed,
            "sweep_name": sweep,
            "model": {"name": model},
            "method": method_cfg,
            "schedule": {"name": schedule, "blocks": None, "rates": rates},
            "data": {"name": data},
            "paths": {"output_dir": run_dir},
            "visualize": {"out_dir": f"{run_dir}/token_maps"},
        },
        "env": {"device": "cuda:test-gpu"},
    }


def m(acc1=None, gflops=None, tp=None, speedup=None) -> dict:
    out = {"gflops": gflops, "throughput_img_s": tp, "speedup": speedup}
    if speedup is not None:
        out["speedup_over_flops_limit"] = speedup / (4.6286 / gflops)
    if acc1 is not None:
        out |= {"acc1": acc1, "acc5": acc1 + 15}
    return {k: v for k, v in out.items() if v is not None}


RECORDS = [
    record("none", 1.0, metrics=m(80.0, 4.6286, 1200)),
    *(
        record("topk", 0.5, seed, m(acc, 2.7461, tp, sp))
        for seed, acc, tp, sp in [(0, 77.0, 1800, 1.5), (1, 77.5, 1900, 1.6), (2, 78.0, 2000, 1.7)]
    ),
    record("topk", 0.7, metrics=m(79.0, 3.4790, 1500)),
    record("evit", 0.5, metrics=m(76.0, 2.7461, 1850)),
    record("tome", 0.5, metrics=m(73.0, 2.7000, 1950)),
    record(
        "tnt",
        0.5,
        status="failed",
        error={"type": "RuntimeError", "message": "CUDA out of memory\nsecond line"},
    ),
    record("topk", 0.5, schedule="multi", rates=[0.7, 0.7, 0.65], metrics=m(75.0, 2.2930, 2100)),
    record("tome", 0.5, schedule="multi", r=20, metrics=m(74.0, 1.9012, 2200)),
    record("topk", 0.5, data="synthetic", metrics=m(gflops=2.7461, tp=1700)),
    record("topk", 0.5, task="train", metrics={"acc1": 12.3, "acc1_full": 45.6}),
    record("topk", 0.3, model="vit_mnist", data="mnist", sweep="s1", metrics=m(66.1, 0.00557, 8000)),
]


def paper(table: str, method: str, setting: str, params: str = "") -> dict[str, str]:
    (row,) = [
        r
        for r in load_results()
        if (r["table"], r["base_model"], r["method"], r["setting"], r["params"])
        == (table, DEIT_S, method, setting, params)
    ]
    return row


def read_csv(path) -> dict[tuple[str, str], dict[str, str]]:
    with open(path) as f:
        return {(row["setting"], row["method"]): row for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    for rec in RECORDS:
        append_record(root / "results", rec)
    return build_report(root / "results", root / "reports")


def test_single_layer_table_averages_seeds_and_matches_the_paper(report):
    rows = read_csv(report.out_dir / f"{DEIT_S}_imagenet_single.csv")
    assert set(rows) == {
        ("base", "none"),
        ("K=0.5", "topk"),
        ("K=0.7", "topk"),
        ("K=0.5", "evit"),
        ("K=0.5", "tome"),
    }
    topk = rows[("K=0.5", "topk")]
    assert topk["n"] == "3" and topk["seeds"] == "0 1 2"
    assert float(topk["acc1"]) == pytest.approx(77.5) and float(topk["acc1_std"]) == pytest.approx(0.5)
    assert (
        float(topk["throughput_img_s"]) == pytest.approx(1900) and float(topk["throughput_img_s_std"]) == 100
    )
    assert float(topk["speedup"]) == pytest.approx(1.6) and float(topk["speedup_std"]) == pytest.approx(0.1)
    assert float(topk["speedup_over_flops_limit"]) == pytest.approx(1.6 * 2.7461 / 4.6286)
    printed = paper("9", "topk", "K=0.5")  # Table 2 prints it too, without a throughput
    assert topk["paper_table"] == "9"
    assert float(topk["paper_acc1"]) == float(printed["acc_top1"])
    assert float(topk["paper_gflops"]) == float(printed["gflops"])
    assert float(topk["paper_throughput_img_s"]) == float(printed["throughput_img_s"])
    assert float(topk["diff_acc1"]) == pytest.approx(77.5 - float(printed["acc_top1"]))
    assert float(topk["diff_gflops"]) == pytest.approx(2.7461 - float(printed["gflops"]))
    assert "diff_throughput_img_s" not in topk  # the paper's throughput is its GPU's
    # EViT K=0.5: Table 2's 2.74 is a known misprint; Table 9's printing is the one compared
    evit = rows[("K=0.5", "evit")]
    assert float(evit["paper_gflops"]) == float(paper("9", "evit", "K=0.5")["gflops"])
    # ... whose GFLOPs count needs EViT's CLS-only compat mode, which the note says this run lacks
    assert "method.paper_flops_compat=true (this run: unset)" in evit["paper_note"]
    assert topk["paper_note"] == ""
    base = rows[("base", "none")]
    assert float(base["paper_acc1"]) == float(paper("9", "base", "")["acc_top1"])
    assert float(base["diff_acc1"]) == pytest.approx(80.0 - float(paper("9", "base", "")["acc_top1"]))


def test_multi_layer_table_matches_rate_lists_and_tome_r(report):
    rows = read_csv(report.out_dir / f"{DEIT_S}_imagenet_multi.csv")
    assert set(rows) == {("base", "none"), ("rates=[0.7, 0.7, 0.65]", "topk"), ("r=20", "tome")}
    topk, tome = rows[("rates=[0.7, 0.7, 0.65]", "topk")], rows[("r=20", "tome")]
    printed = paper("11", "topk", "GFLOPs~2.25", "Rate=[.7, .7, .65]")
    assert (topk["paper_table"], float(topk["paper_acc1"])) == ("11", float(printed["acc_top1"]))
    assert float(topk["diff_acc1"]) == pytest.approx(75.0 - float(printed["acc_top1"]))
    assert float(tome["paper_gflops"]) == float(paper("12", "tome", "GFLOPs~1.95", "r=20")["gflops"])


def test_matching_needs_the_same_kept_patch_count_and_an_unambiguous_paper():
    cell, _ = match_paper(DEIT_S, "topk", Setting("single", keep_rate=0.501))  # int(196 * K) = 98 too
    assert cell is not None and cell.row["setting"] == "K=0.5"
    assert match_paper(DEIT_S, "topk", Setting("single", keep_rate=0.51))[0] is None  # 99 patches
    assert match_paper(DEIT_S, "topk", Setting("single", keep_rate=0.4999))[0] is None  # 97 patches
    cell, _ = match_paper("vit_b16_meanpool", "tnt", Setting("single", keep_rate=0.82))  # 160 patches
    assert cell is not None and cell.row["setting"] == "#tokens=160"
    assert match_paper(DEIT_S, "topk", Setting("multi", rates=(0.7, 0.7, 0.6)))[0] is None
    # Tables 11/12 print rho=.2 on every EViT row (a copy error): several values, nothing matched
    cell, note = match_paper(DEIT_S, "evit", Setting("multi", rates=(0.2, 0.2, 0.2)))
    assert cell is None and "different values" in note


def test_runs_differing_in_more_than_the_seed_are_kept_apart_and_told_apart(tmp_path):
    for fuse, acc in ((True, 76.0), (True, 77.0), (False, 70.0)):
        rec = record("evit", 0.5, seed=int(acc), metrics=m(acc, 2.7461), method_options={"fuse_token": fuse})
        append_record(tmp_path / "results", rec)
    (group,) = build_report(tmp_path / "results", tmp_path / "out").groups
    by_variant = {row.variant: (row.n, row.mean("acc1")) for row in group.rows}
    assert by_variant == {"method.fuse_token=true": (2, 76.5), "method.fuse_token=false": (1, 70.0)}
    assert "| method.fuse_token=false |" in (tmp_path / "out" / "results.md").read_text()


def test_each_pruning_location_is_its_own_plot_line(tmp_path):
    """Runs at block 2 and at block 6 are two curves with their own legend labels, never one."""
    for block, keep, acc, gflops in (
        (2, 0.5, 70.0, 2.7),
        (2, 0.7, 75.0, 3.4),
        (6, 0.5, 74.0, 3.1),
        (6, 0.7, 77.0, 3.8),
    ):
        rec = record("topk", keep, metrics=m(acc, gflops), method_options={"single_block": block})
        rec["schedule"]["blocks"] = [block]
        append_record(tmp_path / "results", rec)
    append_record(tmp_path / "results", record("evit", 0.5, metrics=m(72.0, 2.8)))
    (group,) = build_report(tmp_path / "results", tmp_path / "out").groups
    lines = [
        (label, [(r.setting.keep_rate, r.mean("acc1")) for r in rows])
        for _, label, rows in plot_lines(group, "gflops")
    ]
    assert lines == [
        ("topk (blocks=[2])", [(0.5, 70.0), (0.7, 75.0)]),
        ("topk (blocks=[6])", [(0.5, 74.0), (0.7, 77.0)]),
        ("evit", [(0.5, 72.0)]),
    ]
    with Image.open(tmp_path / "out" / f"{DEIT_S}_imagenet_single_acc_vs_gflops.png") as image:
        image.verify()


def test_runs_on_backbones_pretrained_from_their_own_seed_average_as_seeds(tmp_path):
    """The embedded study's seed s runs on the backbone pretrained from seed s: one setting."""
    for seed, acc in ((0, 80.0), (1, 90.0)):
        rec = record("topk", 0.3, seed=seed, metrics=m(acc, 2.7461))
        rec["config"]["model"].update(weights="pretrain", pretrain={"seed": seed, "epochs": 2})
        append_record(tmp_path / "results", rec)
    other = record("topk", 0.3, seed=2, metrics=m(50.0, 2.7461))
    other["config"]["model"].update(weights="pretrain", pretrain={"seed": 2, "epochs": 1})  # another setting
    append_record(tmp_path / "results", other)
    (group,) = build_report(tmp_path / "results", tmp_path / "out").groups
    assert sorted((row.n, row.mean("acc1")) for row in group.rows) == [(1, 50.0), (2, 85.0)]


def test_gflops_compare_on_any_data_accuracy_only_on_imagenet(report):
    (row,) = read_csv(report.out_dir / f"{DEIT_S}_synthetic_single.csv").values()
    assert row["paper_acc1"] == "" and row["diff_acc1"] == "" and row["acc1"] == ""
    assert float(row["paper_gflops"]) == float(paper("9", "topk", "K=0.5")["gflops"])
    assert float(row["diff_gflops"]) == pytest.approx(2.7461 - float(row["paper_gflops"]))
    assert "synthetic_single_acc_vs_gflops" not in str(list(report.files[f"{DEIT_S}_synthetic_single"]))


def test_pareto_front_on_a_hand_made_example():
    points = [(1.0, 50.0), (2.0, 60.0), (2.0, 55.0), (3.0, 60.0), (0.5, 40.0), (1.0, 50.0), (1.5, 49.0)]
    assert pareto_front(points) == [True, True, False, False, True, True, False]


def test_pareto_flags_in_the_table(report):
    rows = read_csv(report.out_dir / f"{DEIT_S}_imagenet_single.csv")
    front = {key for key, row in rows.items() if row["pareto_gflops"] == "True"}
    # EViT K=0.5 has Top-K K=0.5's cost and a lower accuracy
    assert front == {("base", "none"), ("K=0.7", "topk"), ("K=0.5", "topk"), ("K=0.5", "tome")}
    front_tp = {key for key, row in rows.items() if row["pareto_throughput"] == "True"}
    assert front_tp == {("base", "none"), ("K=0.7", "topk"), ("K=0.5", "topk"), ("K=0.5", "tome")}


def test_markdown_lists_tables_plots_and_failed_runs(report):
    text = report.markdown.read_text()
    assert (
        f"## {DEIT_S} on imagenet, single-layer" in text and f"## {DEIT_S} on imagenet, multi-layer" in text
    )
    topk = next(line for line in text.splitlines() if line.startswith("| K=0.5 | topk |"))
    printed = paper("9", "topk", "K=0.5")
    assert f"| 1.60 ± 0.10 | {1.6 * 2.7461 / 4.6286:.2f} ± " in topk  # speedup, speedup / GFLOPs ratio
    assert "77.50 ± 0.50" in topk and "| 3 | T9 |" in topk
    assert f"| {float(printed['acc_top1']):.2f} | {77.5 - float(printed['acc_top1']):+.2f} |" in topk
    failed = text.split("## Runs without a result")[1]
    assert "RuntimeError: CUDA out of memory" in failed and "second line" not in failed
    assert "12.3" not in text  # the train record is not an evaluation
    assert f"![{DEIT_S}_imagenet_single_acc_vs_gflops]({DEIT_S}_imagenet_single_acc_vs_gflops.png)" in text


def test_plots_are_valid_pngs(report):
    pngs = [p for files in report.files.values() for k, p in files.items() if k != "csv"]
    names = sorted(p.name.split("_acc_vs_")[1] for p in pngs)
    # against GFLOPs: DeiT-S ImageNet single and multi, vit_mnist (synthetic has no accuracy); against
    # the speedup: the groups whose records measured one
    assert names.count("gflops.png") == 3 and names.count("speedup.png") == 1, names
    for path in pngs:
        with Image.open(path) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 300


def test_paper_overlay_changes_the_plot(report, tmp_path):
    plain = build_report(report.out_dir.parent / "results", tmp_path, model=DEIT_S, paper_overlay=False)
    name = f"{DEIT_S}_imagenet_single_acc_vs_gflops.png"
    assert (tmp_path / name).read_bytes() != (report.out_dir / name).read_bytes()
    assert not plain.failed or plain.failed[0]["model"] == DEIT_S


def test_filters_and_clear_errors(report, tmp_path, capsys):
    results = report.out_dir.parent / "results"
    only = build_report(results, tmp_path / "s1", sweep="s1")
    assert [g.slug for g in only.groups] == ["vit_mnist_mnist_single"] and not only.failed
    with pytest.raises(
        ReportError, match=r"model=deit_tiny_distilled.*results\.jsonl|results\.jsonl.*deit_tiny"
    ):
        build_report(results, tmp_path / "none", model="deit_tiny_distilled")
    assert main(["--results-dir", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "missing" / "results.jsonl") in err


def test_cli_writes_the_report(report, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["--results-dir", str(report.out_dir.parent / "results"), "--out", str(out), "--data", "imagenet"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'results.md'}" in printed and "1 run(s) without a result" in printed
    assert sorted(p.name for p in out.glob("*.csv")) == [
        f"{DEIT_S}_imagenet_multi.csv",
        f"{DEIT_S}_imagenet_single.csv",
    ]


def test_wandb_logs_tables_and_images(report, monkeypatch):
    logged, inits = {}, {}

    class Run:
        dir = "/tmp/fake-wandb-run"

        def log(self, data):
            logged.update(data)

        def finish(self):
            logged["finished"] = True

    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: inits.update(kwargs) or Run()
    fake.Table = lambda columns, data: ("table", columns, data)
    fake.Image = lambda path, caption=None: ("image", path)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    from tnt_lightning.report.wandb_log import log_report

    assert log_report(report) == Run.dir
    assert (
        inits["project"] == "tnt-lightning" and inits["mode"] == "offline" and inits["job_type"] == "report"
    )
    kind, columns, data = logged[f"{DEIT_S}_imagenet_single/table"]
    assert kind == "table" and len(data) == 5 and "paper_acc1" in columns
    assert logged[f"{DEIT_S}_imagenet_single/acc_vs_gflops"] == (
        "image",
        str(report.out_dir / f"{DEIT_S}_imagenet_single_acc_vs_gflops.png"),
    )
    assert logged["failed_runs"][2][0][-1].startswith("RuntimeError") and logged["finished"]


# ---------------------------------------------------------------- budget matching


def gflops_of(overrides: list[str], tmp_path) -> float:
    """Independent of the report code: the GFLOPs anchors test's recipe."""
    cfg = compose_config(overrides, tmp_path)
    spec = instantiate(cfg.model)
    model = create_model(spec).eval()
    reducer, _ = build_reducer(cfg.method, cfg.schedule, cfg.keep_rate, spec.pruning, backbone_info(model))
    apply_reducer(model, reducer)
    try:
        return count_macs(model, torch.randn(1, *spec.input_size)) / 1e9
    finally:
        remove_reducer(model)


TARGET = 0.008  # vit_mnist: 0.0120 unpruned


def test_budget_matching_finds_the_largest_keep_rate_that_fits(tmp_path):
    matches = match_budget("vit_mnist", TARGET, ["topk", "tome"], progress=False)
    assert [x.method for x in matches] == ["topk", "tome"]
    for match in matches:
        assert match.knob == "keep_rate" and 0 < match.value < 1
        base = ["model=vit_mnist", f"method={match.method}"]
        at = gflops_of([*base, f"keep_rate={match.value}"], tmp_path)
        above = gflops_of([*base, f"keep_rate={round(match.value + 0.01, 2)}"], tmp_path)
        assert at <= TARGET < above
        assert match.gflops == pytest.approx(at) and match.next_gflops == pytest.approx(above)
        assert (
            match.command() == f"python run.py model=vit_mnist method={match.method} keep_rate={match.value}"
        )


def test_budget_matching_multi_layer_and_out_of_reach(tmp_path):
    topk, tome = match_budget("vit_mnist", TARGET, ["topk", "tome"], schedule="multi", progress=False)
    base = ["model=vit_mnist", "method=topk", "schedule=multi"]
    assert gflops_of([*base, f"keep_rate={topk.value}"], tmp_path) <= TARGET
    assert gflops_of([*base, f"keep_rate={round(topk.value + 0.01, 2)}"], tmp_path) > TARGET
    assert (
        tome.knob == "method.r"
        and tome.gflops <= TARGET < tome.next_gflops
        and tome.next_value == tome.value - 1
    )
    # ToMe single-layer merges at most half of the tokens: 0.001 GFLOPs is out of its reach
    (tome_single,) = match_budget("vit_mnist", 0.001, ["tome"], progress=False)
    assert tome_single.value is None and tome_single.gflops > 0.001 and tome_single.note


def test_budget_cli(capsys):
    assert main(["budget", "--model", "vit_mnist", "--gflops", str(TARGET), "--methods", "random"]) == 0
    out = capsys.readouterr().out
    assert "| random | single | keep_rate |" in out
    assert "python run.py model=vit_mnist method=random keep_rate=0." in out


def test_budget_cli_overrides_for_all_or_one_method():
    from tnt_lightning.report.__main__ import _overrides

    common, per_method = _overrides(
        ["measure=quick", "evit:method.paper_flops_compat=true"], ["evit", "topk"]
    )
    assert common == ["measure=quick"] and per_method == {
        "evit": ["method.paper_flops_compat=true"],
        "topk": [],
    }
    with pytest.raises(ValueError, match="tome"):
        _overrides(["tome:method.r=8"], ["evit"])


def test_rows_with_random_or_local_weights_are_marked_and_not_compared(tmp_path):
    from tnt_lightning.report.tables import build_groups, markdown_table

    random_run = record("topk", 0.7, metrics={"acc1": 0.1, "gflops": 3.4})
    random_run["details"]["weights"] = "random"
    local_run = record("evit", 0.7, metrics={"acc1": 79.0, "gflops": 3.4})
    local_run["details"]["weights"] = "checkpoint:/me/deit_s.pth"
    hub_run = record("random", 0.7, metrics={"acc1": 70.0, "gflops": 3.4})
    (group,) = build_groups([random_run, local_run, hub_run])
    rows = {r.method: r for r in group.rows}
    assert rows["topk"].weights == "random" and rows["topk"].diff("acc1", "acc_top1") is None
    assert "random weights" in rows["topk"].paper_note
    assert rows["evit"].weights == "local file /me/deit_s.pth" and "local file" in rows["evit"].paper_note
    assert rows["random"].weights == "" and "weights" not in rows["random"].paper_note
    table = markdown_table(group)
    assert "topk (random weights)" in table and "evit (local file /me/deit_s.pth)" in table
