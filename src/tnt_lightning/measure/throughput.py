"""Throughput in images/s, with the paper's protocol (METHODS.md section 10).

``paper``: batch 32 of random inputs already on the device, eval mode, fp32, 50 warm-up passes,
then 30 timed passes between device synchronisations (DynamicViT's/TNT's ``throughput()``).
``robust``: the same, repeated ``repeats`` times, reporting the median.

Absolute numbers depend on the machine; compare methods by the ratio to the unpruned model
measured in the same process.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

MODES = ("paper", "robust")


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


@torch.no_grad()
def measure_throughput(
    model: nn.Module,
    input_shape: tuple[int, ...],
    device: torch.device | str = "cpu",
    batch_size: int = 32,
    warmup: int = 50,
    iters: int = 30,
    mode: str = "paper",
    repeats: int = 5,
    progress: bool = True,
) -> dict[str, Any]:
    """Images per second of ``model`` in eval mode; the protocol is recorded with the result."""
    if mode not in MODES:
        raise ValueError(f"measure.throughput_mode={mode!r} is not one of {list(MODES)}")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    inputs = torch.randn(batch_size, *input_shape, device=device)
    runs = 1 if mode == "paper" else repeats
    rates = []
    bar = tqdm(total=runs * (warmup + iters), desc="throughput", disable=not progress, leave=False)
    try:
        for _ in range(runs):
            for _ in range(warmup):
                model(inputs)
                bar.update()
            _sync(device)
            start = time.perf_counter()
            for _ in range(iters):
                model(inputs)
                bar.update()
            _sync(device)
            rates.append(iters * batch_size / (time.perf_counter() - start))
    finally:
        bar.close()
        model.train(was_training)
    return {
        "throughput_img_s": statistics.median(rates),
        "throughput_runs": rates,
        "mode": mode,
        "batch_size": batch_size,
        "warmup": warmup,
        "iters": iters,
        "dtype": str(inputs.dtype).removeprefix("torch."),
        "device": device_name(device),
        "threads": torch.get_num_threads(),
    }
