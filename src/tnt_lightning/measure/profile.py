"""Where a pruned model spends the time its GFLOPs do not count.

A method's speedup falls short of its GFLOPs ratio by the work the FLOP count leaves out (sorts,
gathers, scatters, unfused attention maps). This profiles the method and the plain model on the
same token counts (the bench's kernel ceiling) operator by operator, so that the difference
between the two is that work, named (``docs/speed.md#profile``)::

    python -m tnt_lightning.measure.profile --method tome --schedule multi
"""

from __future__ import annotations

import argparse
import ast
import statistics
from collections import defaultdict
from collections.abc import Sequence

import timm
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from ..methods.assembly import prune
from .batch_sweep import interleaved, reference
from .flops import gflops, token_trace

# Operators whose multiply-adds the GFLOPs count (measure/flops.py): the matmuls of the linear
# layers and of attention, fused or not, and the patch embedding's convolution.
COUNTED_OPS = frozenset(
    {
        "aten::addmm",
        "aten::mm",
        "aten::bmm",
        "aten::baddbmm",
        "aten::matmul",
        "aten::linear",
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_attention_math",
        "aten::convolution",
        "aten::mkldnn_convolution",
    }
)


def op_times(model: nn.Module, inputs: torch.Tensor, passes: int) -> dict[str, float]:
    """Self CPU time of every aten operator, in ms per pass, over ``passes`` passes.

    Args:
        model: the model, in eval mode (warmed up by the caller).
        inputs: one batch.
        passes: profiled passes.

    Returns:
        Operator name -> ms per pass.
    """
    times: dict[str, float] = defaultdict(float)
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(passes):
            model(inputs)
    for event in prof.key_averages():
        if event.key.startswith("aten::"):
            times[event.key] += event.self_cpu_time_total / 1e3 / passes
    return dict(times)


def profiled(models: dict[str, nn.Module], inputs: torch.Tensor, passes: int, rounds: int) -> dict:
    """Operator times of ``models``, profiled in turn in each of ``rounds`` rounds (so that a change
    of the machine's load falls on all of them), as medians over the rounds.

    Returns:
        Model name -> {operator -> ms per pass}.
    """
    per_round: dict[str, list[dict[str, float]]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            per_round[name].append(op_times(model, inputs, passes))
    return {
        name: {op: statistics.median(r.get(op, 0.0) for r in runs) for op in set().union(*runs)}
        for name, runs in per_round.items()
    }


def difference_rows(method: dict[str, float], plain: dict[str, float], top: int | None = None) -> list[dict]:
    """The operators whose time differs most between the method and the plain model on its token
    counts, largest first (the ``top`` of them, or all), with whether the GFLOPs count them."""
    rows = [
        {
            "op": op,
            "method_ms": method.get(op, 0.0),
            "plain_ms": plain.get(op, 0.0),
            "extra_ms": method.get(op, 0.0) - plain.get(op, 0.0),
            "counted": op in COUNTED_OPS,
        }
        for op in set(method) | set(plain)
    ]
    rows.sort(key=lambda r: -abs(r["extra_ms"]))
    return rows[:top]


def profile_method(
    model_name: str,
    method: str,
    keep_rate: float,
    schedule: str,
    batch_size: int,
    passes: int,
    rounds: int,
    options: dict[str, object],
    top: int = 12,
) -> str:
    """Profile ``method`` on ``model_name`` (seeded random weights) against the plain model on its
    token counts.

    Returns:
        A Markdown report: GFLOPs and wall time of the base, the method and the plain model on its
        token counts, then the operators that make the difference.
    """
    torch.manual_seed(0)
    base = timm.create_model(model_name, pretrained=False).eval()
    pruned = timm.create_model(model_name, pretrained=False)
    pruned.load_state_dict(base.state_dict())
    pruned = prune(pruned, method, keep_rate=keep_rate, schedule=schedule, **options).eval()
    trace = token_trace(pruned)
    plain = reference(timm.create_model(model_name, pretrained=False), pruned, trace, random=False)
    inputs = torch.randn(batch_size, *base.pretrained_cfg["input_size"])
    models = {"base": base, "method": pruned, "plain, same tokens": plain}
    flops = {name: gflops(m) for name, m in models.items()}
    with torch.inference_mode():
        seconds = interleaved(models, inputs, rounds, number=passes, warmup=1)
    ops = profiled({name: models[name] for name in ("method", "plain, same tokens")}, inputs, passes, rounds)
    walls = {name: 1e3 * statistics.median(times) for name, times in seconds.items()}
    every = difference_rows(ops["method"], ops["plain, same tokens"])
    rows = every[:top]
    extra = walls["method"] - walls["plain, same tokens"]
    uncounted = sum(r["extra_ms"] for r in every if not r["counted"])
    opts = " ".join(f"{k}={v}" for k, v in options.items())
    lines = [
        f"{method} ({schedule}, K={keep_rate}{', ' + opts if opts else ''}) on {model_name}, batch "
        f"{batch_size}, {torch.get_num_threads()} threads, medians of {rounds} rounds of {passes} passes",
        "",
        "| model | GFLOPs | ms per pass | speedup / GFLOPs ratio |",
        "|---|---|---|---|",
    ]
    for name in models:
        ratio = (walls["base"] / walls[name]) / (flops["base"] / flops[name])
        lines.append(f"| {name} | {flops[name]:.3f} | {walls[name]:.1f} | {ratio:.2f} |")
    lines += [
        "",
        f"The method takes {extra:+.1f} ms per pass over the plain model on its tokens; operators "
        f"the GFLOPs do not count account for {uncounted:+.1f} ms of the profiled difference.",
        "",
        "| operator | method ms | plain ms | extra ms | in GFLOPs |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['op']}` | {r['method_ms']:.2f} | {r['plain_ms']:.2f} | {r['extra_ms']:+.2f} | "
            f"{'yes' if r['counted'] else 'no'} |"
        )
    return "\n".join(lines)


def parse_options(pairs: Sequence[str]) -> dict[str, object]:
    """``KEY=VALUE`` method options, each value a Python literal where it reads as one (``8``,
    ``0.5``, ``[3, 6, 9]``), else text (``avg``)."""
    options: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set {pair!r}: expected KEY=VALUE")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    return options


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="deit_small_patch16_224", help="a timm ViT name")
    parser.add_argument("--method", required=True)
    parser.add_argument("--keep-rate", type=float, default=0.5)
    parser.add_argument("--schedule", default="multi", choices=["single", "multi"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--passes", type=int, default=3, help="passes per model and round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, the models in turn")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a method option")
    args = parser.parse_args(argv)
    print(
        profile_method(
            args.model,
            args.method,
            args.keep_rate,
            args.schedule,
            args.batch_size,
            args.passes,
            args.rounds,
            parse_options(args.set),
        )
    )


if __name__ == "__main__":
    main()
