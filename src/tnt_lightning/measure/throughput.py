"""Throughput in images/s, with the paper's protocol (docs/measuring.md#throughput-protocol).

``paper``: batch 32 of random inputs already on the device, eval mode, 50 warm-up passes, then
30 timed passes between device synchronisations (DynamicViT's/TNT's ``throughput()``).
``robust``: the same, repeated ``repeats`` times, reporting the median.

``dtype`` is the precision of the forward pass: ``fp32`` (the paper's), or ``bf16``/``fp16``
autocast on the model's device; ``compile`` wraps the model in ``torch.compile``, and the first
pass, which compiles, is timed apart (``compile_s``) and never counted as a timed pass.

Absolute numbers depend on the machine; compare methods by the ratio to the unpruned model
measured in the same process (:mod:`.speedup`).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import MEASURE_DTYPES

MODES = ("paper", "robust")
DTYPES = dict(zip(MEASURE_DTYPES, (None, torch.bfloat16, torch.float16), strict=True))
RECOMPILE_LIMIT = 64


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "cpu"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TimedModel:
    """A model in eval mode on ``device``, run under ``dtype`` autocast, compiled if asked.

    The first call of a compiled model compiles it; :meth:`warm_up` times that call apart and
    counts the graphs it compiled (one: the whole forward traced; more: graph breaks, each a
    return to eager, whose first lines of reason are kept in ``graph_breaks``).
    """

    def __init__(
        self, model: nn.Module, device: torch.device | str, dtype: str = "fp32", compile: bool = False
    ):
        if dtype not in DTYPES:
            raise ValueError(f"measure.dtype={dtype!r} is not one of {list(DTYPES)}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.dtype = dtype
        self.compile = compile
        self.compile_s: float | None = None
        self.graphs: int | None = None
        self.graph_breaks: list[str] = []
        self.warmed = False
        # Past torch's recompile limit (8 per function) torch.compile silently runs the rest eager.
        # isolate_recompiles: every model of a process shares the patched forward's code object,
        # so make bench's ninth model or a sweep's ninth job would be timed uncompiled. The limit:
        # after a graph break, the per-block function is compiled once per block index (12+).
        self._forward = (
            torch.compile(self.model, isolate_recompiles=True, recompile_limit=RECOMPILE_LIMIT)
            if compile
            else self.model
        )

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        autocast = DTYPES[self.dtype]
        if autocast is None:
            return self._forward(inputs)
        with torch.autocast(self.device.type, dtype=autocast):
            return self._forward(inputs)

    def warm_up(self, inputs: torch.Tensor, passes: int) -> None:
        """``passes`` untimed passes; a compiled model's first one (compilation) is timed alone."""
        if self.compile and self.compile_s is None:
            counters = torch._dynamo.utils.counters
            graphs, breaks = counters["stats"]["unique_graphs"], dict(counters["graph_break"])
            _sync(self.device)
            start = time.perf_counter()
            self(inputs)
            _sync(self.device)
            self.compile_s = time.perf_counter() - start
            self.graphs = counters["stats"]["unique_graphs"] - graphs
            new_breaks = (r for r, n in counters["graph_break"].items() if n > breaks.get(r, 0))
            self.graph_breaks = sorted({reason.split("\n")[0] for reason in new_breaks})
            passes -= 1
        for _ in range(passes):
            self(inputs)
        _sync(self.device)
        self.warmed = True

    def rate(self, inputs: torch.Tensor, iters: int) -> float:
        """Images/s over ``iters`` passes between device synchronisations."""
        _sync(self.device)
        start = time.perf_counter()
        for _ in range(iters):
            self(inputs)
        _sync(self.device)
        return iters * inputs.shape[0] / (time.perf_counter() - start)

    def protocol(self) -> dict[str, Any]:
        """What the timing depended on, for the record."""
        return {
            "dtype": self.dtype,
            "compile": self.compile,
            "compile_s": self.compile_s,
            "graphs": self.graphs,
            "graph_breaks": self.graph_breaks,
            "device": device_name(self.device),
            "threads": torch.get_num_threads(),
        }


def measure_throughput(
    model: nn.Module | TimedModel,
    input_shape: tuple[int, ...],
    device: torch.device | str = "cpu",
    batch_size: int = 32,
    warmup: int = 50,
    iters: int = 30,
    mode: str = "paper",
    repeats: int = 5,
    progress: bool = True,
    dtype: str = "fp32",
    compile: bool = False,
) -> dict[str, Any]:
    """Images per second of ``model`` in eval mode; the protocol is recorded with the result.

    A :class:`TimedModel` is used as it is (its device, dtype and compilation); a module is
    wrapped in one with ``device``, ``dtype`` and ``compile``.
    """
    if mode not in MODES:
        raise ValueError(f"measure.throughput_mode={mode!r} is not one of {list(MODES)}")
    if isinstance(model, TimedModel):
        timed = model
        was_training = False
    else:
        was_training = model.training
        timed = TimedModel(model, device, dtype, compile)
    inputs = torch.randn(batch_size, *input_shape, device=timed.device)
    runs = 1 if mode == "paper" else repeats
    rates = []
    bar = tqdm(total=runs, desc="throughput", disable=not progress, leave=False)
    try:
        for _ in range(runs):
            timed.warm_up(inputs, warmup)
            rates.append(timed.rate(inputs, iters))
            bar.update()
    finally:
        bar.close()
        timed.model.train(was_training)
    return {
        "throughput_img_s": statistics.median(rates),
        "throughput_runs": rates,
        "mode": mode,
        "batch_size": batch_size,
        "warmup": warmup,
        "iters": iters,
        **timed.protocol(),
    }
