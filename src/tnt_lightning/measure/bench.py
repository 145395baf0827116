"""Speed of every method against the unpruned backbone, in one process (``make bench``).

For each method and schedule (single-layer at ``--keep-rate``, and the multi-layer defaults) it
measures GFLOPs, throughput and the speedup over the unpruned model timed in the same process,
interleaved (base, method, base, method, ...; the median of the per-pair ratios, as in every eval
record: ``measure/speedup.py``), and divides the speedup by the GFLOPs ratio (1.0: the whole FLOP
saving shows up as speed). Learned methods run with untrained parameters: their speed does not
depend on the values of their weights. The same protocol then times the plain model on its first
n patches in every block (``--no-ceiling`` skips it): what this machine's kernels give for that
many tokens with no selection work at all, against which a method's ratio is to be read.
``--set`` times a variant: Hydra overrides applied to every method's model, never to the base
(``--methods zerotp --set 'method.iterations_multi=[1,1,1,1,1]'``: Zero-TP without most of its
PageRank). Writes ``bench.md``, ``bench.json`` and ``speedup_vs_gflops.png`` to ``--out``, and
prints the machine, the protocol and the table.

    python -m tnt_lightning.measure.bench --model deit_small_distilled --keep-rate 0.5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch
from hydra.errors import HydraException
from hydra.utils import instantiate
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..config import MEASURE_DTYPES, compose_config, register_configs
from ..engine import ReductionError, backbone_info
from ..engine.registry import method_names
from ..methods.assembly import pruned_model
from . import TimedModel, base_key, count_gflops, same_process_speedup, unpruned
from .memory import keep_freed_memory
from .throughput import device_name

# Every registered method (the baseline `none` is the base every row is timed against), in display order.
METHODS = method_names()
# Multi-layer overrides a method needs (ToMe merges r tokens per block: the paper's lightest row).
MULTI_OVERRIDES = {"tome": ["method.r=8"]}
COLUMNS = [
    "method",
    "schedule",
    "GFLOPs",
    "GFLOPs ratio",
    "img/s",
    "base img/s",
    "speedup",
    "speedup / ratio",
]
# Fractions of the patches a plain model keeps in every block (the ceiling rows): the speed the
# machine's kernels give for that many tokens with no selection work (README, "Speed").
CEILING_KEEP = (0.75, 0.5, 0.35)
# One graph: the whole forward compiled; each graph break adds one (and runs eager between them).
COMPILE_COLUMNS = ["compile s", "graphs"]


def build(overrides: list[str]) -> tuple[torch.nn.Module, Any]:
    """The backbone (random weights) with the method of ``overrides`` applied, and its spec."""
    cfg = compose_config(overrides)
    model, _ = pruned_model(cfg)
    return model.eval(), instantiate(cfg.model)


def check_overrides(common: list[str], runs: list[tuple[str, str, list[str]]]) -> None:
    """Compose every run's config before anything is timed, so that a bad ``--set`` fails at once
    with Hydra's reason (the key or value it refuses)."""
    for name, schedule, overrides in runs:
        try:
            compose_config(common + overrides)
        except HydraException as e:
            raise SystemExit(f"bench: {name} {schedule} with {overrides}: {e}") from None


def first_tokens(model: torch.nn.Module, patches: int) -> torch.nn.Module:
    """``model`` running every block on its prefix tokens and first ``patches`` patches: a slice
    after the position embedding, with no selection work, so its speedup over the whole model is
    what running ``patches`` tokens alone gives on this machine."""
    keep = backbone_info(model).num_prefix + patches
    model.norm_pre.register_forward_hook(lambda _module, _inputs, x: x[:, :keep])
    return model


def _first_sentence(error: Exception) -> str:
    return str(error).split(": ", 1)[-1].split(". ")[0]


def load_average() -> str:
    """The 1-, 5- and 15-minute load averages."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def plot(rows: list[dict[str, Any]], path: Path, title: str, ceiling: list[dict[str, Any]] = ()) -> Path:
    """Speedup against the GFLOPs ratio, one marker per method and schedule, with y = x and the
    plain model on fewer tokens (``ceiling``) as a line."""
    fig = Figure(figsize=(7, 5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    points = [*rows, *ceiling]
    top = max([r["gflops_ratio"] for r in points] + [r["speedup"] for r in points]) * 1.05
    ax.plot([1, top], [1, top], color="black", lw=1, label="speedup = GFLOPs ratio")
    ax.plot([1, top], [1, 0.95 * top], color="grey", lw=1, ls="--", label="0.95 x GFLOPs ratio")
    if ceiling:
        ax.plot(
            [1] + [r["gflops_ratio"] for r in ceiling],
            [1] + [r["speedup"] for r in ceiling],
            color="tab:red", marker="x", lw=1, label="plain model, fewer tokens in every block",
        )  # fmt: skip
    for schedule, marker in (("single", "o"), ("multi", "s")):
        pts = [r for r in rows if r["schedule"] == schedule]
        ax.scatter(
            [r["gflops_ratio"] for r in pts], [r["speedup"] for r in pts], marker=marker, label=schedule
        )
        for r in pts:
            ax.annotate(
                r["method"],
                (r["gflops_ratio"], r["speedup"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.set_xlabel("GFLOPs ratio (base / method)")
    ax.set_ylabel("Speedup (same process, interleaved)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path)
    return path


def columns(compiled: bool) -> list[str]:
    """The table's columns; compiled runs add the compile time and the graphs compiled."""
    return COLUMNS + COMPILE_COLUMNS if compiled else COLUMNS


def markdown(rows: list[dict[str, Any]], compiled: bool = False) -> str:
    """The table of ``rows`` in markdown."""
    header = columns(compiled)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [
            r["method"],
            r["schedule"],
            f"{r['gflops']:.3f}",
            f"{r['gflops_ratio']:.3f}",
            f"{r['method_img_s']:.1f}",
            f"{r['base_img_s']:.1f}",
            f"{r['speedup']:.3f}",
            f"{r['speedup_over_flops_limit']:.3f}",
        ]
        if compiled:
            cells += [f"{r['compile_s']:.0f}", str(r["graphs"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="deit_small_distilled")
    parser.add_argument("--keep-rate", type=float, default=0.5)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--schedules", default="single,multi")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes per model (the paper: 50)")
    parser.add_argument(
        "--iters", type=int, default=1, help="timed passes per model per pair (the paper: 30)"
    )
    parser.add_argument("--pairs", type=int, default=3, help="base/method pairs per method")
    parser.add_argument(
        "--full", action="store_true", help="the paper's protocol: 50 warm-up, 30 timed, 5 pairs"
    )
    parser.add_argument("--dtype", default="fp32", choices=MEASURE_DTYPES)
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile every model (compile time apart)"
    )
    parser.add_argument(
        "--no-ceiling",
        dest="ceiling",
        action="store_false",
        help="skip the plain model on fewer tokens (the speed the kernels allow at those token counts)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a Hydra override for every method's model, not the base (repeatable)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("reports/bench"))
    args = parser.parse_args(argv)
    if args.full:
        args.warmup, args.iters, args.pairs = 50, 30, 5
    groups = {o.lstrip("+~").split("=", 1)[0]: o for o in args.overrides}
    if "model" in groups:
        parser.error(f"--set {groups['model']}: the base and every method share one backbone; use --model")
    if "method" in groups:  # it would time that method under each --methods name
        parser.error(f"--set {groups['method']}: a row is labelled by its method; name it in --methods")
    unknown = sorted(set(args.methods.split(",")) - set(METHODS))
    if unknown:
        parser.error(f"--methods: {unknown} not among {METHODS}")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark; returns its rows (also written to ``--out``)."""
    args = parse(argv)
    register_configs()
    # As in every job (run_task): without it the base model's larger activations are faulted in
    # again on every pass, and a bf16 run timed the unpruned model at half its speed (memory.py)
    malloc_kept = keep_freed_memory()
    device = torch.device(args.device)
    common = [f"model={args.model}", f"keep_rate={args.keep_rate}", "data=synthetic"]
    runs = [
        (
            m,
            s,
            [f"method={m}", *(["schedule=multi", *MULTI_OVERRIDES.get(m, [])] if s == "multi" else [])]
            + args.overrides,
        )
        for s in args.schedules.split(",")
        for m in args.methods.split(",")
    ]
    check_overrides(common, runs)
    spec = instantiate(compose_config(common).model)
    key = base_key(args.model, device, args.batch_size, args.dtype, args.compile)
    base, base_gflops = unpruned(
        key, lambda: build(common)[0], spec.input_size, device, args.dtype, args.compile
    )
    protocol = {
        "model": args.model,
        "keep_rate": args.keep_rate,
        "batch_size": args.batch_size,
        "warmup": args.warmup,
        "iters": args.iters,
        "pairs": args.pairs,
        "dtype": args.dtype,
        "compile": args.compile,
        "device": device_name(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average_before": load_average(),
        "malloc_kept": malloc_kept,
        "overrides": args.overrides,
    }
    print(
        f"{args.model}, keep_rate={args.keep_rate}, batch {args.batch_size}, {args.dtype}"
        f"{', compiled' if args.compile else ''}, {protocol['device']} ({device.type}), "
        f"{protocol['threads']} threads of {protocol['cpus']} CPUs, torch {torch.__version__}; per method "
        f"{args.warmup} warm-up passes, then {args.pairs} pairs of {args.iters} timed passes (base, method); "
        f"load average {protocol['load_average_before']}"
        + (f"; every method with {' '.join(args.overrides)}" if args.overrides else ""),
        flush=True,
    )
    header = columns(args.compile)
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header), flush=True)
    inputs = torch.randn(args.batch_size, *spec.input_size, device=device)

    def timed_row(name: str, schedule: str, model: torch.nn.Module) -> dict[str, Any]:
        gflops = count_gflops(model, spec.input_size)
        timed = TimedModel(model, device, args.dtype, args.compile)
        timed.warm_up(inputs, args.warmup)
        sp = same_process_speedup(
            timed, base, spec.input_size, args.batch_size, args.iters, args.pairs, args.warmup
        )
        ratio = base_gflops / gflops
        row = {
            "method": name,
            "schedule": schedule,
            "gflops": gflops,
            "base_gflops": base_gflops,
            "gflops_ratio": ratio,
            **{k: sp[k] for k in ("speedup", "method_img_s", "base_img_s", "pairs")},
            "speedup_over_flops_limit": sp["speedup"] / ratio,
            "compile_s": timed.compile_s,
            "graphs": timed.graphs,
            "graph_breaks": timed.graph_breaks,
        }
        print(markdown([row], args.compile).splitlines()[-1], flush=True)
        return row

    rows: list[dict[str, Any]] = []
    refused: list[dict[str, Any]] = []
    for name, schedule, overrides in runs:
        try:
            model, _ = build(common + overrides)
        except ReductionError as e:  # e.g. single-layer ToMe merging more than half of few patches
            refused.append({"method": name, "schedule": schedule, "error": str(e)})
            print(f"| {name} | {schedule} | refused: {_first_sentence(e)} |", flush=True)
            continue
        rows.append(timed_row(name, schedule, model))
    ceiling: list[dict[str, Any]] = []
    if args.ceiling:
        patches = backbone_info(base.model).num_patches
        print("plain model on its first n patches in every block (no selection work):", flush=True)
        for keep in CEILING_KEEP:
            n = int(patches * keep)
            ceiling.append(timed_row(f"first {n} patches", "every block", first_tokens(build(common)[0], n)))
    protocol["load_average_after"] = load_average()
    print(f"load average after: {protocol['load_average_after']}")
    args.out.mkdir(parents=True, exist_ok=True)
    title = (
        f"{args.model}, K={args.keep_rate}, batch {args.batch_size}, {args.dtype}, {protocol['device']}, "
        f"{protocol['threads']} threads"
    )
    report = {"protocol": protocol, "rows": rows, "ceiling": ceiling, "refused": refused}
    (args.out / "bench.json").write_text(json.dumps(report, indent=1) + "\n")
    ceiling_table = f"\nplain model, first n patches in every block:\n\n{markdown(ceiling, args.compile)}\n"
    (args.out / "bench.md").write_text(
        f"{title}; load average {protocol['load_average_before']} before, "
        f"{protocol['load_average_after']} after\n\n{markdown(rows, args.compile)}\n"
        + (ceiling_table if ceiling else "")
        + "".join(f"\nrefused: {r['method']} {r['schedule']}: {r['error']}\n" for r in refused)
        + "".join(
            f"\ngraph breaks: {r['method']} {r['schedule']}: {'; '.join(r['graph_breaks'])}\n"
            for r in rows
            if r["graph_breaks"]
        )
    )
    plot(rows, args.out / "speedup_vs_gflops.png", title, ceiling)
    print(f"bench: {args.out / 'bench.md'}, {args.out / 'bench.json'}, {args.out / 'speedup_vs_gflops.png'}")
    return rows


if __name__ == "__main__":
    main()
