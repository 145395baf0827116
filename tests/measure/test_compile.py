"""torch.compile in timings: every model of a process compiled, graphs counted (measure/throughput.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tnt_lightning.config import validate
from tnt_lightning.errors import ConfigError
from tnt_lightning.measure import TimedModel, bench


class Scaled(nn.Module):
    """Instances share ``forward``'s code object, as every patched ViT of a process does."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


class Nonzero(nn.Module):
    """A data-dependent output shape: a graph break."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum() + (x > 0).nonzero().shape[0]


@torch._dynamo.config.patch(recompile_limit=1)
def test_models_past_torchs_recompile_limit_are_still_compiled():
    # Shared code objects share torch's recompile budget (8 by default; 1 here): without
    # isolation the second model would be run eager without a word.
    for factor in (2.0, 3.0):
        timed = TimedModel(Scaled(factor), "cpu", compile=True)
        timed.warm_up(torch.ones(2), 1)
        assert timed.graphs == 1 and timed.graph_breaks == []
        assert torch.equal(timed(torch.ones(2)), torch.full((2,), factor))


def test_compile_is_refused_before_any_work_on_a_torch_without_isolated_recompiles(monkeypatch, compose_cfg):
    def old_compile(model, fullgraph=False, dynamic=None, backend="inductor"):
        return model

    monkeypatch.setattr(torch, "compile", old_compile)
    with pytest.raises(ConfigError, match="measure.compile=true needs a torch whose torch.compile has"):
        validate(compose_cfg("measure.compile=true"))
    validate(compose_cfg())  # uncompiled runs do not need it


def test_a_graph_break_is_counted_with_its_reason():
    timed = TimedModel(Nonzero(), "cpu", compile=True)
    timed.warm_up(torch.randn(4), 1)
    assert timed.graphs == 2
    assert timed.graph_breaks == ["Dynamic shape operator"]
    assert timed.protocol()["graphs"] == 2


# Seeded draws (a torch.Generator is opaque to torch.compile) and ATS's per-image token counts
# break the graph; every other method's gathers have static shapes and trace whole.
BREAKS_GRAPH = {"random", "tnt", "dpcknn", "ats"}


# In the fast suite: the gathers that were once boolean indexing (EViT/eTPS's complement, Zero-TP's
# S-stage); the whole matrix (about 3 minutes) is marked slow.
FAST = {("evit", "single"), ("etps", "multi"), ("zerotp", "multi")}


@pytest.mark.parametrize(
    ("method", "schedule"),
    [
        pytest.param(m, s, marks=() if (m, s) in FAST else pytest.mark.slow)
        for m in bench.METHODS
        for s in ("single", "multi")
    ],
)
def test_which_methods_compile_to_one_graph(method, schedule):
    overrides = ["model=vit_cmnist", "keep_rate=0.5", "data=synthetic", f"method={method}"]
    if schedule == "multi":
        overrides += ["schedule=multi", *bench.MULTI_OVERRIDES.get(method, [])]
    model, spec = bench.build(overrides)
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(torch.randn(2, *spec.input_size))
    assert (explained.graph_count == 1) == (method not in BREAKS_GRAPH), explained.break_reasons[:1]
