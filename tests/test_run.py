"""End to end through run.py: the embedded default, multiruns, the results store."""

from __future__ import annotations

import json

import pytest

from helpers import run_py
from tnt_lightning.results import read_records

RECORD_FIELDS = {
    "run_id",
    "created_at",
    "status",
    "task",
    "model",
    "method",
    "keep_rate",
    "schedule",
    "data",
    "metrics",
    "config",
    "env",
    "config_key",
}


def check_default_run(root, proc) -> dict:
    """What `python run.py` must leave: one ok eval record of the unpruned vit_mnist, evaluated on
    the 1000 test digits, its counts and preprocessing recorded, the backbone trained once."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training backbone vit_mnist once" in proc.stdout + proc.stderr
    (record,) = read_records(root / "results")
    assert set(record) >= RECORD_FIELDS
    assert record["status"] == "ok" and record["task"] == "eval" and record["method"] == "none"
    m = record["metrics"]
    assert set(m) >= {"acc1", "acc5", "gflops", "throughput_img_s", "params_m"}
    assert m["gflops"] == pytest.approx(0.01201, abs=5e-5)
    assert set(record["env"]) >= {"torch", "timm", "lightning", "device", "git_commit"}
    # what the accuracy is: correct / total of the images evaluated, not a float32 mean
    details = record["details"]
    assert details["images_evaluated"] == 1000
    assert m["acc1"] == 100.0 * details["correct"]["top1"] / 1000
    assert m["acc5"] == 100.0 * details["correct"]["top5"] / 1000
    assert details["preprocessing"]["mean"] == [0.1307] and "MNIST" in details["preprocessing"]["origin"]
    assert record["config"]["model"]["name"] == "vit_mnist"
    assert f"top-1 {m['acc1']:.2f}%" in proc.stdout and "results:" in proc.stdout
    assert len(list((root / "cache" / "backbones").glob("vit_mnist-*.pth"))) == 1
    return m


def test_default_run_trains_vit_mnist_once_and_reports_what_it_measured(default_run):
    """The session's default run, whose pretraining is 3 epochs: trained (above chance), not yet good."""
    m = check_default_run(*default_run)
    assert m["acc1"] > 15.0, m


@pytest.mark.slow
def test_the_readmes_python_run_py_trains_vit_mnist_to_real_accuracy(tmp_path):
    """`python run.py` exactly as the README says (20 epochs of pretraining; make test-default-run)."""
    proc = run_py([], tmp_path, timeout=900)
    m = check_default_run(tmp_path, proc)
    assert m["acc1"] >= 80.0, m


def test_two_job_multirun_records_both(tmp_path):
    proc = run_py(
        ["-m", "model=vit_mnist,vit_mnist_meanpool", "data=synthetic", "measure.throughput=false"],
        tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_records(tmp_path / "results")
    assert [r["model"] for r in records] == ["vit_mnist", "vit_mnist_meanpool"]
    assert all(
        r["status"] == "ok" and r["metrics"]["gflops"] > 0 and "acc1" not in r["metrics"] for r in records
    )
    assert records[0]["config_key"] != records[1]["config_key"]
    assert not (tmp_path / "cache").exists(), "a cost-only run must not train a backbone"


def test_failed_run_is_recorded_with_its_error_and_what_it_measured(tmp_path):
    proc = run_py(
        ["data=imagefolder", f"data.root={tmp_path / 'missing'}", "model=vit_mnist"], tmp_path, timeout=300
    )
    assert proc.returncode != 0
    (record,) = read_records(tmp_path / "results")
    assert record["status"] == "failed"
    assert record["error"]["type"] == "DataLayoutError" and "missing" in record["error"]["message"]


def test_a_config_the_method_refuses_fails_before_the_run_starts(tmp_path):
    """Multi-layer ToMe without method.r fails before the run's record and W&B run start: no
    `failed` record, no W&B folder (a failure once the run has started is recorded, above)."""
    proc = run_py(
        ["-m", "method=tome", "schedule=multi", "data=synthetic", "measure.throughput=false"],
        tmp_path,
        timeout=300,
        env={"WANDB_MODE": "offline"},
    )
    assert proc.returncode != 0
    assert "method.r" in proc.stderr
    assert read_records(tmp_path / "results", history=True) == []
    assert not (tmp_path / "wandb").exists()
    assert not list(tmp_path.rglob("hparams.yaml"))  # nor the CSV logger's


def test_results_lines_are_whole_json(tmp_path):
    from tnt_lightning.results import append_record

    for i in range(3):
        append_record(tmp_path, {"run_id": str(i), "payload": "x" * 10_000})
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert [json.loads(line)["run_id"] for line in lines] == ["0", "1", "2"]
    assert not list(tmp_path.glob(".results-*"))


def test_multi_layer_tome_records_the_r_that_ran_not_a_keep_rate(tmp_path):
    from helpers import compose_config
    from tnt_lightning.tasks import run_task

    overrides = [
        "model=timm",
        "model.timm_name=vit_tiny_patch16_224",
        "model.weights=random",
        "data=synthetic",
    ]
    cfg = compose_config(
        [
            *overrides,
            "data=synthetic",
            "method=tome",
            "schedule=multi",
            "method.r=8",
            "measure.throughput=false",
        ],
        tmp_path,
    )
    record = run_task(cfg)
    assert record["status"] == "ok"
    assert record["keep_rate"] is None
    assert record["schedule"]["rates"] is None and record["schedule"]["r"] == [8] * 12
