"""Masked training's step time with each implementation of DynamicViT's masked attention, timed in
one process (docs/training.md).

A DynamicViT / dTPS training step (loss, backward, AdamW; the backbone fine-tuned at the recipe's
0.01x, so the distillation teacher is a separate copy) on a random-weight backbone, run in turn
with the three ways ``engine/attention.py`` can compute the masked attention:

* ``chunked``: :class:`MaskedAttention`, what masked training uses;
* ``hand-written``: the unfused path with :class:`PolicySoftmax`'s backward (mixed precision,
  attention dropout, or a method that reads the probabilities);
* ``autograd``: the unfused path with autograd through the official formula.

Each round times every variant for ``--steps`` steps; the ratios are medians over the rounds.

    python scripts/time_masked_training.py --model vit_cmnist --method dynamicvit --batch-size 64
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from unittest import mock

import torch
from torch import Tensor

from tnt_lightning.config import register_configs
from tnt_lightning.engine import attention
from tnt_lightning.lit import OptimConfig, TokenReductionModule
from tnt_lightning.measure.bench import build
from tnt_lightning.measure.throughput import device_name


def autograd_masked_softmax(scores: Tensor, policy: Tensor, eps: float = 1e-6) -> Tensor:
    """The official formula, differentiated by autograd."""
    n = scores.shape[-1]
    allowed = policy.reshape(policy.shape[0], 1, 1, n)
    allowed = allowed + (1.0 - allowed) * torch.eye(n, dtype=allowed.dtype).view(1, 1, n, n)
    weights = (scores - scores.amax(dim=-1, keepdim=True)).float().exp() * allowed.float()
    return ((weights + eps / n) / (weights.sum(dim=-1, keepdim=True) + eps)).type_as(scores)


def unfused() -> mock._patch:
    return mock.patch.object(attention, "chunked_masked_attention", return_value=False)


# Each variant: the patches that select it, made afresh for every use.
VARIANTS: dict[str, Callable[[], list[mock._patch]]] = {
    "chunked": lambda: [],
    "hand-written": lambda: [unfused()],
    "autograd": lambda: [
        unfused(),
        mock.patch.object(attention, "softmax_with_policy", autograd_masked_softmax),
    ],
}


def training_step(model_name: str, method: str, batch_size: int) -> tuple[Callable[[], None], tuple]:
    """One training step of ``method`` on ``model_name`` (random weights), and the input shape."""
    model, spec = build([f"model={model_name}", f"method={method}", "keep_rate=0.7"])
    module = TokenReductionModule(model, spec.num_classes, OptimConfig(lr=1e-3), backbone_lr_scale=0.01)
    module._set_modes()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randn(batch_size, *spec.input_size)
    y = torch.randint(0, spec.num_classes, (batch_size,))

    def step() -> None:
        out = model.reducer.training_loss(model, x, y, 0.1, module.teacher)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()

    return step, tuple(spec.input_size)


def seconds_per_step(step: Callable[[], None], variant: str, steps: int) -> float:
    patches = VARIANTS[variant]()
    for patch in patches:
        patch.start()
    try:
        step()  # warm-up
        start = time.perf_counter()
        for _ in range(steps):
            step()
        return (time.perf_counter() - start) / steps
    finally:
        for patch in patches:
            patch.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_cmnist")
    parser.add_argument("--method", default="dynamicvit", choices=("dynamicvit", "dtps"))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    register_configs()
    torch.manual_seed(0)
    step, shape = training_step(args.model, args.method, args.batch_size)
    cpu = device_name(torch.device("cpu"))
    machine = f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(
        f"{args.method} on {args.model} {list(shape)}, batch {args.batch_size}, {machine}; "
        f"{args.rounds} rounds of {args.steps} steps"
    )
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name in VARIANTS:
            times[name].append(seconds_per_step(step, name, args.steps))
    print("| masked attention | s per step (median) | autograd / this (median of rounds) |")
    print("|---|---|---|")
    for name, values in times.items():
        ratio = statistics.median(a / b for a, b in zip(times["autograd"], values, strict=True))
        print(f"| {name} | {statistics.median(values):.3f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
