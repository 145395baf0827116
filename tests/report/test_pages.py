"""The docs' results pages are the generator's output on the committed data (a hand edit fails),
and the data records what produced it."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from helpers import ROOT
from tnt_lightning.measure import bench
from tnt_lightning.report import pages
from tnt_lightning.results import append_record

DOCS = ROOT / "docs"


def test_every_committed_results_page_equals_the_generators_output_on_its_data():
    found = pages.pages(DOCS)
    assert DOCS / "speed.md" in found and DOCS / "study.md" in found
    for page in found:
        text = page.read_text()
        fix = "`python -m tnt_lightning.report.pages` rewrites it"
        assert pages.refresh(text, DOCS) == text, f"{page.relative_to(ROOT)} differs from its data: {fix}"
    assert pages.main(["--check", "--docs", str(DOCS)]) == 0


def test_the_speed_page_names_the_command_the_commit_and_the_machine():
    text = (DOCS / "speed.md").read_text()
    data = json.loads((DOCS / "results/data/speed_deit_tiny_cpu.json").read_text())
    p = data["protocol"]
    assert f"`{p['command']}`" in text and f"`{p['commit']}`" in text and p["device"] in text
    assert p["command"].startswith("OMP_NUM_THREADS=1 python -m tnt_lightning.measure.bench --sweep")
    # the machine was shared: the page says so because the load average says so
    assert "other jobs shared the machine" in text
    for figure in pages._figure_names("results/data/speed_deit_tiny_cpu.json").values():
        assert (DOCS / figure).is_file()


def test_a_hand_edit_of_a_generated_number_fails_the_check(tmp_path):
    docs = tmp_path / "docs"
    (docs / "results").mkdir(parents=True)
    shutil.copytree(DOCS / "results/data", docs / "results/data")
    page = docs / "speed.md"
    text = (DOCS / "speed.md").read_text()
    edited = re.sub(r"(\| topk \| single \| 1 \| )[\d.]+", r"\g<1>9.99", text, count=1)
    assert edited != text
    page.write_text(edited)
    assert pages.main(["--check", "--docs", str(docs)]) == 1
    assert page.read_text() == edited  # --check writes nothing
    assert pages.main(["--docs", str(docs)]) == 0  # a refresh puts the data's number back
    assert page.read_text() == text
    assert (docs / "results/figures/speed_deit_tiny_cpu_speedup_vs_batch.png").is_file()


def test_prose_outside_the_sections_is_kept_and_a_bad_section_is_refused(tmp_path):
    docs = tmp_path
    page = docs / "p.md"
    page.write_text("# Title\n\nprose\n\n<!-- results: nonsense x.json -->\n<!-- /results -->\n")
    with pytest.raises(pages.PageError, match="unknown kind"):
        pages.refresh(page.read_text(), docs)
    with pytest.raises(pages.PageError, match="no data file"):
        pages.render("sweep-table", "missing.json", docs)


def test_bench_data_without_command_or_commit_is_refused():
    data = {"protocol": {"device": "cpu"}, "rows": []}
    with pytest.raises(pages.PageError, match="command"):
        pages.bench_provenance(data, "x.json")


def test_the_bench_records_its_command_and_commit(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = bench.parse(["--quick", "--methods", "topk"])
    assert args.command == "OMP_NUM_THREADS=1 python -m tnt_lightning.measure.bench --quick --methods topk"
    _, _, _, _, machine = bench.setup(args)
    assert machine["command"] == args.command
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", machine["commit"])
    assert machine["date"] and machine["device"] and machine["cpus"]


def test_the_study_section_without_data_names_the_commands_that_make_it(tmp_path):
    text = pages.render("study", "results/data/cmnist_study_meanpool.json", tmp_path)
    assert "No data of this study is committed yet" in text
    assert "make study-meanpool" in text and "--model vit_cmnist_meanpool" in text
    assert "--out docs/results/data/cmnist_study_meanpool.json" in text


def _record(method: str, keep_rate: float, seed: int, acc1: float, gflops: float) -> dict:
    """A record as the report reads it (the fields it needs)."""
    single = {"name": "single", "blocks": [2], "rates": [keep_rate]}
    resolved = {"name": "none"} if method == "none" else single
    run_dir = f"runs/{method}-{keep_rate}-{seed}"
    return {
        "run_id": f"{method}{keep_rate}{seed}",
        "created_at": f"2026-12-0{seed + 1}T00:00:00+00:00",
        "status": "ok",
        "error": None,
        "task": "eval",
        "model": "vit_cmnist",
        "method": method,
        "keep_rate": keep_rate,
        "schedule": resolved,
        "data": "cluttered_mnist",
        "seed": seed,
        "sweep_name": "cmnist_study",
        "metrics": {"acc1": acc1, "acc5": 99.0, "gflops": gflops},
        "details": {"weights": "pretrain", "throughput": {"device": "AMD EPYC", "threads": 2}},
        "duration_s": 30.0,
        "config": {
            "task": "eval",
            "keep_rate": keep_rate,
            "seed": seed,
            "sweep_name": "cmnist_study",
            "model": {"name": "vit_cmnist"},
            "method": {"name": method, "seed": seed},
            "schedule": {"name": "single", "blocks": None, "rates": None},
            "data": {"name": "cluttered_mnist"},
            "paths": {"output_dir": run_dir},
            "visualize": {"out_dir": f"{run_dir}/token_maps"},
        },
        "env": {"device": "cpu", "threads": 2, "torch": "2.x", "git_commit": "abc123"},
    }


def test_study_data_carries_the_reports_tables_and_the_runs_provenance(tmp_path):
    results = tmp_path / "results"
    for seed, (base, rand, tnt) in enumerate([(93.0, 79.0, 90.9), (91.4, 78.1, 91.0)]):
        append_record(results, _record("none", 1.0, seed, base, 0.0653))
        append_record(results, _record("random", 0.3, seed, rand, 0.0343))
        append_record(results, _record("tnt", 0.3, seed, tnt, 0.0350))
    data = pages.study_data(results, "make study", data="cluttered_mnist", model="vit_cmnist")
    assert data["provenance"]["runs"] == 6 and data["provenance"]["commits"] == ["abc123"]
    assert data["tables"] and "random" in data["tables"][0]["table"]
    out = tmp_path / "docs/results/data/cmnist_study.json"
    assert (
        pages.main(
            ["study-data", "--results-dir", str(results), "--data", "cluttered_mnist", "--out", str(out)]
        )
        == 0
    )
    text = pages.render("study", "results/data/cmnist_study.json", tmp_path / "docs")
    assert "Produced by `make study`" in text and "`abc123`" in text and "AMD EPYC" in text
    assert data["tables"][0]["table"] in text
