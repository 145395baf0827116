"""Speedup over the unpruned backbone, timed in the same process (``metrics.speedup``).

Base and method are timed in turn, base, method, base, method, ... (``pairs`` pairs of ``iters``
passes each); the speedup is the median of the per-pair ratios, so a drift of the machine
(another job starting, the clock changing) cancels instead of landing in one of the two numbers.
``speedup_over_flops_limit`` is that speedup over the GFLOPs ratio base / method: 1.0 means the
whole FLOP saving shows up as speed.

The unpruned model is built, moved, compiled and warmed up once per (backbone config, device,
batch, dtype, compile) per process (:data:`_BASES`), so the jobs of a multirun with Hydra's basic
launcher share it; its timed passes are taken again in every job, interleaved with the method's,
because a base number from minutes earlier is exactly the drift the pairing removes.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .flops import count_gflops, input_shape
from .throughput import TimedModel

_BASES: dict[str, tuple[TimedModel, float]] = {}


def base_key(model_config: Any, device: torch.device, batch_size: int, dtype: str, compile: bool) -> str:
    """The cache key of an unpruned model: what its speed depends on."""
    return json.dumps([model_config, str(device), batch_size, dtype, compile], sort_keys=True, default=str)


def unpruned(
    key: str,
    build: Callable[[], nn.Module],
    input_shape: tuple[int, ...],
    device: torch.device,
    dtype: str,
    compile: bool,
) -> tuple[TimedModel, float]:
    """The cached unpruned model for ``key`` (built by ``build`` the first time) and its GFLOPs."""
    if key not in _BASES:
        model = build().eval()
        gflops = count_gflops(model, input_shape)
        _BASES[key] = (TimedModel(model, device, dtype, compile), gflops)
    return _BASES[key]


def same_process_speedup(
    method: TimedModel,
    base: TimedModel,
    input_shape: tuple[int, ...],
    batch_size: int,
    iters: int,
    pairs: int,
    base_warmup: int,
) -> dict[str, Any]:
    """Interleaved timings of ``base`` and ``method`` (already warm); the median per-pair ratio.

    ``base`` gets ``base_warmup`` passes the first time it is timed in this process and one pass
    later (its caches, not its compilation, went cold while other models ran).
    """
    inputs = torch.randn(batch_size, *input_shape, device=method.device)
    reused = base.warmed
    base.warm_up(inputs, 1 if base.warmed else base_warmup)
    rates = []
    for _ in range(pairs):
        rates.append((base.rate(inputs, iters), method.rate(inputs, iters)))
    return {
        "speedup": statistics.median(m / b for b, m in rates),
        "base_img_s": statistics.median(b for b, _ in rates),
        "method_img_s": statistics.median(m for _, m in rates),
        "pairs": [[round(b, 3), round(m, 3)] for b, m in rates],
        "iters": iters,
        "base_compile_s": base.compile_s,
        "base_reused": reused,
    }


def speedup(
    model: nn.Module,
    base: nn.Module,
    batch_size: int = 32,
    iters: int = 3,
    pairs: int = 3,
    warmup: int = 1,
    device: torch.device | str = "cpu",
    dtype: str = "fp32",
) -> float:
    """How many times faster ``model`` runs than ``base``, timed in this process, interleaved
    (base, model, base, model, ...; the median of the per-pair ratios, as every run and the bench
    measure it): a ratio from one process is free of the machine's drift between two runs.

    Args:
        model: the pruned model.
        base: the model to compare with (the unpruned backbone), of the same input size.
        batch_size: images per pass.
        iters: timed passes per model per pair.
        pairs: base/model pairs (the paper's protocol: 5 pairs of 30 passes after 50 warm-up).
        warmup: untimed passes per model first.
        device: where both run (moved there; both are put in eval mode).
        dtype: ``fp32``, ``fp16`` or ``bf16`` autocast.

    Returns:
        The speedup (above 1: ``model`` is faster).
    """
    shape = input_shape(model)
    timed = TimedModel(model, device, dtype)
    timed.warm_up(torch.randn(batch_size, *shape, device=timed.device), warmup)
    return same_process_speedup(
        timed, TimedModel(base, device, dtype), shape, batch_size, iters, pairs, warmup
    )["speedup"]
