"""Same-process speedup, the timing precisions and the base-model cache (measure/speedup.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import run_py
from tnt_lightning.measure import TimedModel, measure_throughput, same_process_speedup, speedup, unpruned
from tnt_lightning.results import read_records
from tnt_lightning.results.keys import config_key


class ScriptedRates(TimedModel):
    """A model whose timed rates are given in advance; every timing is logged in ``order``."""

    def __init__(self, name: str, rates: list[float], order: list[str]):
        super().__init__(nn.Identity(), "cpu")
        self.name, self.rates, self.order = name, list(rates), order

    def rate(self, inputs: torch.Tensor, iters: int) -> float:
        self.order.append(self.name)
        return self.rates.pop(0)


def test_speedup_interleaves_base_and_method_and_takes_the_median_per_pair_ratio():
    order: list[str] = []
    base = ScriptedRates("base", [10, 10, 40], order)
    method = ScriptedRates("method", [30, 10, 80], order)
    sp = same_process_speedup(method, base, (1, 2), batch_size=2, iters=1, pairs=3, base_warmup=1)
    assert order == ["base", "method"] * 3
    # per-pair ratios 3, 1, 2: median 2 (the ratio of the medians would be 30 / 10 = 3)
    assert sp["speedup"] == 2.0
    assert sp["pairs"] == [[10, 30], [10, 10], [40, 80]]
    assert sp["base_reused"] is False
    base.rates, method.rates = [1.0], [1.0]
    assert same_process_speedup(method, base, (1, 2), 2, 1, 1, 1)["base_reused"] is True


def test_the_unpruned_model_is_built_once_per_key_in_a_process(monkeypatch):
    monkeypatch.setattr(speedup, "_BASES", {})
    built = []

    def build() -> nn.Module:
        built.append(1)
        return nn.Sequential(nn.Flatten(), nn.Linear(4, 3))

    first = unpruned("a", build, (1, 2, 2), torch.device("cpu"), "fp32", False)
    assert unpruned("a", build, (1, 2, 2), torch.device("cpu"), "fp32", False) is first
    unpruned("b", build, (1, 2, 2), torch.device("cpu"), "fp32", False)
    assert len(built) == 2
    assert first[1] == pytest.approx(12 / 1e9)  # GFLOPs of the 4x3 linear layer at batch 1


@pytest.mark.parametrize(("dtype", "expected"), [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_timed_passes_run_under_the_asked_autocast(dtype, expected):
    timed = TimedModel(nn.Linear(4, 4), "cpu", dtype)
    assert timed(torch.randn(2, 4)).dtype == expected
    tp = measure_throughput(timed, (4,), batch_size=2, warmup=1, iters=2, progress=False)
    assert tp["dtype"] == dtype and tp["compile"] is False and tp["compile_s"] is None


def test_an_unknown_dtype_is_refused_naming_the_allowed_ones():
    with pytest.raises(ValueError, match=r"measure.dtype='fp8' is not one of \['fp32', 'bf16', 'fp16'\]"):
        TimedModel(nn.Identity(), "cpu", "fp8")


def test_new_measure_keys_at_their_defaults_keep_old_records_keys(compose_cfg):
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(compose_cfg(), resolve=True, enum_to_str=True)
    old = {
        **config,
        "measure": {
            k: v for k, v in config["measure"].items() if k not in ("dtype", "compile", "speedup_pairs")
        },
    }
    assert config_key(config) == config_key(old)
    bf16 = {**config, "measure": {**config["measure"], "dtype": "bf16"}}
    assert config_key(bf16) != config_key(config)


@pytest.mark.slow
def test_compile_time_is_recorded_apart_from_the_timed_passes():
    timed = TimedModel(nn.Linear(4, 4), "cpu", compile=True)
    tp = measure_throughput(timed, (4,), batch_size=2, warmup=1, iters=2, progress=False)
    assert tp["compile"] is True and tp["compile_s"] > 0


def test_a_sweeps_records_carry_same_process_speedups_with_one_base_per_process(tmp_path):
    proc = run_py(
        [
            "-m",
            "model=vit_mnist",
            "data=synthetic",
            "method=topk,random",
            "keep_rate=0.5",
            "measure=quick",
            "measure.speedup_pairs=2",
        ],
        tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_records(tmp_path / "results")
    assert [r["method"] for r in records] == ["topk", "random"]
    for r in records:
        m, sp = r["metrics"], r["details"]["speedup"]
        assert len(sp["pairs"]) == 2 and m["speedup"] > 0
        assert m["gflops_ratio"] == pytest.approx(sp["base_gflops"] / m["gflops"])
        assert m["speedup_over_flops_limit"] == pytest.approx(m["speedup"] / m["gflops_ratio"])
        assert sp["base_gflops"] == pytest.approx(0.01201, abs=5e-5)
    assert [r["details"]["speedup"]["base_reused"] for r in records] == [False, True]


def test_no_throughput_means_no_speedup(tmp_path):
    proc = run_py(["model=vit_mnist", "data=synthetic", "method=topk", "measure.throughput=false"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = read_records(tmp_path / "results")
    assert not {"throughput_img_s", "speedup", "speedup_over_flops_limit"} & set(record["metrics"])
    assert "speedup" not in record["details"]
