"""Speed of every method against the unpruned backbone, measured in one process (``make bench``).

For each method (single-layer at ``--keep-rate``, and the multi-layer defaults) it prints GFLOPs,
throughput, the speedup over the unpruned model and that speedup divided by the GFLOPs ratio
(1.0 = the whole saving in FLOPs shows up as speed; below, the method's own overhead or the
hardware eats part of it). The base model is timed between every method's repeats and the
speedup is the median of the per-repeat ratios, so slow drifts of the machine cancel.

    python -m tnt_lightning.bench --model deit_small_distilled --keep-rate 0.5
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from .config import register_configs
from .engine import apply_reducer, backbone_info
from .measure import count_macs, measure_throughput
from .methods import build_reducer
from .models import create_model, drop_distillation_token

CONF = Path(__file__).resolve().parents[2] / "conf"
SINGLE = ["random", "topk", "evit", "tome", "zerotp", "etps"]
MULTI = {"topk": [], "evit": [], "tome": ["method.r=8"], "zerotp": [], "etps": [], "random": []}


def build(overrides: list[str]) -> tuple[torch.nn.Module, tuple[int, ...]]:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    spec = instantiate(cfg.model)
    model = create_model(spec)
    reducer, _ = build_reducer(cfg.method, cfg.schedule, cfg.keep_rate, spec.pruning, backbone_info(model))
    if reducer is not None:
        if reducer.cls_only_backbone:
            drop_distillation_token(model)
        apply_reducer(model, reducer)
    return model.eval(), spec.input_size


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="deit_small_distilled")
    parser.add_argument("--keep-rate", type=float, default=0.5)
    parser.add_argument("--methods", default=",".join(SINGLE))
    parser.add_argument("--schedules", default="single,multi")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    register_configs()
    device = torch.device(args.device)
    common = [f"model={args.model}", f"keep_rate={args.keep_rate}"]
    base, input_size = build(common)
    base.to(device)
    base_gflops = count_macs(base.cpu(), torch.randn(1, *input_size)) / 1e9
    base.to(device)

    def speed(model: torch.nn.Module) -> float:
        return measure_throughput(
            model, input_size, device, args.batch_size, args.warmup, args.iters, progress=False
        )["throughput_img_s"]

    runs = [(m, "single", [f"method={m}"]) for m in args.methods.split(",") if "single" in args.schedules]
    runs += [
        (m, "multi", [f"method={m}", "schedule=multi", *MULTI[m]])
        for m in args.methods.split(",")
        if "multi" in args.schedules and m in MULTI
    ]
    print(
        f"{args.model}, keep_rate={args.keep_rate}, batch {args.batch_size}, {device}, "
        f"{torch.get_num_threads()} threads, {args.repeats} repeats of {args.warmup}+{args.iters} passes"
    )
    columns = [
        "method",
        "schedule",
        "GFLOPs",
        "img/s",
        "base img/s",
        "speedup",
        "GFLOPs ratio",
        "speedup / ratio",
    ]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for name, schedule, overrides in runs:
        model, _ = build(common + overrides)
        gflops = count_macs(model, torch.randn(1, *input_size)) / 1e9
        model.to(device)
        pairs = [(speed(base), speed(model)) for _ in range(args.repeats)]
        speedup = statistics.median(m / b for b, m in pairs)
        base_tp = statistics.median(b for b, _ in pairs)
        method_tp = statistics.median(m for _, m in pairs)
        ratio = base_gflops / gflops
        print(
            f"| {name} | {schedule} | {gflops:.3f} | {method_tp:.1f} | {base_tp:.1f} | {speedup:.3f} | "
            f"{ratio:.3f} | {speedup / ratio:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
