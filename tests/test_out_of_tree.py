"""A method from the user's own package (examples/my_method), declared once, runs through every command.

The environment-variable route runs end to end in subprocesses (eval, a two-job sweep, the report,
the bench, the budget tool), as a user's shell would: the example registers into those processes'
registries, never into this one's, where the built-in registry must stay what conf/method says.
The entry-point route is tested through a real ``entry_points.txt`` on ``PYTHONPATH`` rather than a
``pip install``: importlib.metadata reads it exactly as it reads an installed package's, without
changing the virtual environment that other tests (and other sessions) share.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT, run_py
from tnt_lightning.measure import bench
from tnt_lightning.plugins import ENTRY_POINT_GROUP, ENV_VAR, MethodPluginError, import_plugins
from tnt_lightning.results import read_records

EXAMPLE = ROOT / "examples" / "my_method"
PACKAGE = EXAMPLE / "my_method"
ENV = {ENV_VAR: str(PACKAGE), "OMP_NUM_THREADS": "1"}


def python_m(module: str, args: list[str], cwd, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``python -m module args`` rooted at ``cwd``, as :func:`helpers.run_py` runs run.py."""
    full_env = {**os.environ, "TNT_ROOT": str(cwd), "WANDB_MODE": "disabled", **env}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """One results store: the eval and the sweep write it, the report reads it."""
    return tmp_path_factory.mktemp("out_of_tree")


def test_eval_of_the_out_of_tree_method_on_the_default_setup(root):
    proc = run_py(["method=l2norm", "model.weights=random", "measure=quick", "logger=csv"], root, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = read_records(root / "results")
    assert record["status"] == "ok" and record["method"] == "l2norm" and record["data"] == "mnist"
    assert record["config"]["method"]["_target_"] == "my_method.L2Norm"
    assert record["metrics"]["gflops"] < 0.012  # vit_mnist unpruned: 0.01201


def test_a_two_job_sweep_and_the_report_list_it(root):
    sweep = ["-m", "method=l2norm", "keep_rate=0.3,0.7", "data=synthetic", "measure.throughput=false"]
    proc = run_py([*sweep, "model.weights=random", "logger=csv"], root, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    swept = [r for r in read_records(root / "results") if r["data"] == "synthetic"]
    assert sorted(r["keep_rate"] for r in swept) == [0.3, 0.7]
    assert all(r["status"] == "ok" and r["method"] == "l2norm" for r in swept)
    report = python_m("tnt_lightning.report", [], root, ENV)
    assert report.returncode == 0, report.stderr[-3000:]
    lines = (root / "reports" / "results.md").read_text().splitlines()
    assert any(line.startswith("| K=0.3 | l2norm |") for line in lines)
    assert any(line.startswith("| K=0.5 | l2norm (random weights) |") for line in lines)


def test_the_bench_times_it_under_its_own_label_and_the_budget_tool_accepts_it(tmp_path):
    cheap = ["--batch-size", "4", "--warmup", "0", "--iters", "1", "--pairs", "1", "--no-ceiling"]
    args = ["--model", "vit_mnist", "--methods", "l2norm,topk", "--schedules", "single", "--device", "cpu"]
    proc = python_m("tnt_lightning.measure.bench", [*args, *cheap, "--out", str(tmp_path)], tmp_path, ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["method"]: r for r in json.loads((tmp_path / "bench.json").read_text())["rows"]}
    assert set(rows) == {"l2norm", "topk"}
    # L2 norm drops after block 1 (the MLP of block 1 runs on all 49 patches), Top-K inside it
    assert rows["l2norm"]["gflops"] > rows["topk"]["gflops"]
    budget = ["budget", "--model", "vit_mnist", "--gflops", "0.008", "--methods", "l2norm"]
    proc = python_m("tnt_lightning.report", budget, tmp_path, ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "python run.py model=vit_mnist method=l2norm keep_rate=0.53" in proc.stdout


def test_the_entry_point_route_registers_it_and_composes_its_config(tmp_path):
    dist = tmp_path / "my_method-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-method\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nl2norm = my_method\n")
    check = (
        "from tnt_lightning.config import compose_config\n"
        "from tnt_lightning.engine.registry import get_method\n"
        "print(get_method('l2norm').target, compose_config(['method=l2norm']).method._target_)\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{EXAMPLE}"}
    env.pop(ENV_VAR, None)
    proc = subprocess.run(
        [sys.executable, "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["my_method.L2Norm", "my_method.L2Norm"]


def test_the_python_api_prunes_with_it(tmp_path):
    check = (
        "import timm, tnt_lightning as tl\n"
        "m = timm.create_model('deit_tiny_patch16_224', pretrained=False)\n"
        "print(type(tl.prune(m, 'l2norm', keep_rate=0.5).reducer).__name__, tl.token_trace(m)[2])\n"
    )
    env = {**os.environ, **ENV}
    proc = subprocess.run(
        [sys.executable, "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[0] == "L2Norm"


def test_bench_refuses_a_method_override_that_would_time_another_method_under_a_label():
    with pytest.raises(SystemExit):
        bench.parse(["--methods", "topk", "--set", "method=random"])
    assert bench.parse(["--methods", "topk", "--set", "method.seed=1"]).overrides == ["method.seed=1"]


def test_a_declared_module_that_fails_to_import_is_named(tmp_path, monkeypatch):
    (tmp_path / "broken_method.py").write_text("import a_dependency_not_installed\n")
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "broken_method.py"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(MethodPluginError, match=r"broken_method.*a_dependency_not_installed"):
        import_plugins()
    monkeypatch.setenv(ENV_VAR, str(tmp_path))  # a folder that is no package
    with pytest.raises(MethodPluginError, match="without __init__.py"):
        import_plugins()
