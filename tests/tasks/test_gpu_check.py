"""`make gpu-check`'s script on the CPU (its smoke mode, as CI runs it): the sections it writes, and
one failing method becoming a failed row instead of a crash."""

from __future__ import annotations

import json

import pytest

from helpers import HAS_CUDA
from tnt_lightning.tasks import gpu_check

# The tiny backbone: the same code paths as DeiT-S, in seconds.
FAST = ["--device", "cpu", "--model", "vit_mnist", "--methods", "topk,tnt"]


def report(out) -> tuple[dict, str]:
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def test_smoke_run_writes_every_section_as_table_and_json(tmp_path, capsys):
    out = tmp_path / "gpu"
    sections = "methods,throughput,training,memory"
    assert gpu_check.main([*FAST, "--sections", sections, "--out", str(out)]) == 0
    data, md = report(out)
    assert data["failed"] == 0 and data["protocol"]["smoke"] is True
    assert data["protocol"]["device_type"] == "cpu" and data["tolerances"] == gpu_check.TOLERANCES
    assert list(data["sections"]) == sections.split(",")
    rows = {s: data["sections"][s]["rows"] for s in data["sections"]}
    assert all(r["status"] == "ok" for section in rows.values() for r in section)
    assert [r["name"] for r in rows["methods"]] == ["topk", "tnt"]
    for r in rows["methods"]:
        assert r["values"]["gflops_device"] == r["values"]["gflops_cpu"] > 0
        assert r["values"]["kept"] == "equal" and r["values"]["logits_rel_err"] == 0
    # both batches, both precisions, every method; the GFLOPs ratio beside the speedup
    assert [r["name"] for r in rows["throughput"]] == [
        f"{m} b{b} {d}" for b in (2, 4) for d in ("fp32", "bf16") for m in ("topk", "tnt")
    ]
    assert all(r["values"]["gflops_ratio"] > 1 and r["values"]["speedup"] > 0 for r in rows["throughput"])
    # TNT is the learned one: two AMP steps through Lightning, the loss finite and falling
    (train,) = rows["training"]
    assert train["name"] == "tnt" and train["values"]["steps"] == 2
    assert train["values"]["loss_last"] < train["values"]["loss_first"]
    assert train["values"]["precision"] == "bf16-mixed" and train["values"]["syncs"] is None
    assert [r["name"] for r in rows["memory"]] == ["none", "topk", "tnt"]
    for section in sections.split(","):
        assert f"## {section} (" in md
    assert "| topk b4 bf16 | ok |" in md and "Tolerances:" in md
    printed = capsys.readouterr().out
    assert "[gpu-check] methods tnt: ok" in printed and "[gpu-check] training tnt: ok" in printed


def test_a_failing_method_is_a_failed_row_and_the_exit_status_is_1(tmp_path, monkeypatch):
    real = gpu_check.check_method

    def broken(ctx, method):
        if method == "tnt":
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore lines")
        return real(ctx, method)

    monkeypatch.setattr(gpu_check, "check_method", broken)
    out = tmp_path / "gpu"
    assert gpu_check.main([*FAST, "--sections", "methods,memory", "--out", str(out)]) == 1
    data, md = report(out)
    rows = data["sections"]["methods"]["rows"]
    assert [(r["name"], r["status"]) for r in rows] == [("topk", "ok"), ("tnt", "failed")]
    assert rows[1]["error"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert "broken" in rows[1]["values"]["traceback"]
    # the sections after it still ran
    assert [r["status"] for r in data["sections"]["memory"]["rows"]] == ["ok"] * 3
    assert data["failed"] == 1 and "| tnt | failed |" in md


def test_a_check_out_of_bounds_keeps_its_values_in_the_failed_row(tmp_path, monkeypatch):
    monkeypatch.setitem(gpu_check.TOLERANCES, "gflops_rtol", -1.0)  # no count can pass
    out = tmp_path / "gpu"
    assert gpu_check.main([*FAST, "--methods", "topk", "--sections", "methods", "--out", str(out)]) == 1
    (row,) = report(out)[0]["sections"]["methods"]["rows"]
    assert row["status"] == "failed" and row["error"].startswith("GFLOPs ")
    assert row["values"]["gflops_cpu"] > 0


def test_rows_left_when_the_time_limit_runs_out_are_skipped_not_failed(tmp_path):
    out = tmp_path / "gpu"
    args = [*FAST, "--sections", "methods", "--time-limit-s", "0", "--out", str(out)]
    assert gpu_check.main(args) == 0
    rows = report(out)[0]["sections"]["methods"]["rows"]
    assert [r["status"] for r in rows] == ["skipped", "skipped"]


def test_the_tests_section_runs_the_gpu_tests_one_row_each(tmp_path):
    out = tmp_path / "gpu"
    assert gpu_check.main([*FAST, "--sections", "tests", "--out", str(out)]) == 0
    rows = report(out)[0]["sections"]["tests"]["rows"]
    names = [r["name"] for r in rows]
    assert "test_gpu::test_throughput_synchronises_the_device_around_the_timed_passes" in names
    assert any(n.startswith("test_methods_extra::test_tnt_multi_layer_importance") for n in names)
    assert any(n.startswith("test_cli_errors::test_gpu_settings_are_accepted") for n in names)
    expected = "ok" if HAS_CUDA else "skipped"
    assert {r["status"] for r in rows} == {expected}


@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_refused():
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main(["--device", "cuda"])
    assert exit_.value.code == 2


def test_unknown_method_or_section_is_refused():
    for args in (["--methods", "topk,fastest"], ["--sections", "methods,speed"]):
        with pytest.raises(SystemExit):
            gpu_check.main(["--device", "cpu", *args])
