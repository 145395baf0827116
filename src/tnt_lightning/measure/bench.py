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
prints the machine, the protocol and the table. Both JSON files record the command, the commit
and the machine (``protocol``), which the docs' results pages show beside the numbers.

    python -m tnt_lightning.measure.bench --model deit_small_distilled --keep-rate 0.5

``--sweep`` (``make bench``; implied by ``--batch-sizes`` and ``--quick``) times every method at
several batch sizes beside its two references, the plain model on the same token counts and
Random drop to them (:mod:`.batch_sweep`), and the plain blocks after the pruning location at every
token count; it writes ``bench_batches.{md,json}``, ``speedup_vs_batch_<model>.png`` and
``latency_vs_tokens_<model>_<device>.png`` (docs/speed.md).

    python -m tnt_lightning.measure.bench --sweep --batch-sizes 1,8,32 --methods topk,tome
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
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
from . import TimedModel, base_key, batch_sweep, count_gflops, same_process_speedup, unpruned
from .flops import token_trace
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
# machine's kernels give for that many tokens with no selection work (docs/design-notes.md#ceiling).
CEILING_KEEP = (0.75, 0.5, 0.35)
# The batch-size sweep's defaults (``--sweep``) where an option is not given: on a CPU DeiT-T and
# five methods of different kinds (DeiT-S with every method and batch 128 takes hours on 2 cores);
# ``--quick``: the tiny backbone, for tests and a check that everything runs.
SWEEP_DEFAULTS = {
    "cpu": {
        "model": "deit_tiny",
        "methods": "topk,evit,tnt,tome,zerotp",
        "batch_sizes": "1,8,32,128",
        "rounds": 3,
        "warmup": 1,
        "min_time": 0.1,
        "token_stride": 8,
        "token_batch_sizes": "1,8",
    },
    "cuda": {
        "model": "deit_small_distilled",
        "methods": ",".join(METHODS),
        "batch_sizes": "1,8,32,128,256",
        "rounds": 10,
        "warmup": 10,
        "min_time": 0.05,
        "token_stride": 1,
        "token_batch_sizes": "1,32",
    },
    "quick": {
        "model": "vit_mnist",
        "methods": "topk,tome",
        "batch_sizes": "1,4",
        "rounds": 2,
        "warmup": 1,
        "min_time": 0.0,
        "token_stride": 8,
        "token_batch_sizes": "1",
    },
}
# Without --sweep: DeiT-S, every method, batch 32 (bench.md; docs/design-notes.md#ceiling).
SINGLE_DEFAULTS = {"model": "deit_small_distilled", "methods": ",".join(METHODS), "warmup": 1}
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


def command_line(argv: list[str] | None) -> str:
    """The command as typed, to be shown beside its numbers: ``OMP_NUM_THREADS`` (it sets the
    threads) and the arguments after the module."""
    args = sys.argv[1:] if argv is None else argv
    threads = os.environ.get("OMP_NUM_THREADS")
    prefix = f"OMP_NUM_THREADS={threads} " if threads else ""
    return prefix + shlex.join(["python", "-m", "tnt_lightning.measure.bench", *args])


def code_revision() -> str | None:
    """The clone's commit, ``-dirty`` with uncommitted changes to tracked files; None outside a
    clone (an installed wheel) or without git."""
    from ..config import source_root

    root = source_root()
    if root is None:
        return None
    try:
        git = ["git", "-C", str(root)]
        commit = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


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
    parser.add_argument(
        "--model",
        default=None,
        help="backbone (default deit_small_distilled; with --sweep on a CPU deit_tiny, on a GPU "
        "deit_small_distilled; --quick: vit_mnist)",
    )
    parser.add_argument("--keep-rate", type=float, default=0.5)
    parser.add_argument(
        "--methods",
        default=None,
        help="comma-separated (default every method; with --sweep on a CPU: topk,evit,tnt,tome,zerotp)",
    )
    parser.add_argument("--schedules", default="single,multi")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed passes per model (default 1; GPU sweep 10; the paper: 50)",
    )
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
    sweep = parser.add_argument_group(
        "batch-size sweep (make bench)",
        "every method at several batch sizes beside the plain model and Random drop on its token "
        "counts, and the plain blocks after the pruning location at every token count. On a CPU "
        "the default is DeiT-T (not DeiT-S) and five methods: about 20 minutes on 2 shared cores "
        "with OMP_NUM_THREADS=1, most of it batch 128; --batch-sizes 1,8,32 takes about a third.",
    )
    sweep.add_argument("--sweep", action="store_true", help="run the sweep (make bench does)")
    sweep.add_argument(
        "--batch-sizes",
        default=None,
        help="comma-separated; implies --sweep (default 1,8,32,128 on a CPU, 1,8,32,128,256 on a GPU)",
    )
    sweep.add_argument(
        "--quick",
        action="store_true",
        help="implies --sweep: vit_mnist, topk and tome, batch 1 and 4, 2 rounds",
    )
    sweep.add_argument("--rounds", type=int, default=None, help="timings per model (default 3 CPU, 10 GPU)")
    sweep.add_argument(
        "--min-time",
        type=float,
        default=None,
        help="seconds one timing lasts at least (sets the passes per timing)",
    )
    sweep.add_argument(
        "--token-stride",
        type=int,
        default=None,
        help="token counts of the latency table: 1, 1+s, ... (CPU 8, GPU 1)",
    )
    sweep.add_argument(
        "--token-batch-sizes",
        default=None,
        help="batch sizes of the latency-vs-tokens table (CPU 1,8; GPU 1,32)",
    )
    sweep.add_argument(
        "--no-token-table", dest="token_table", action="store_false", help="skip the latency-vs-tokens table"
    )
    args = parser.parse_args(argv)
    args.command = command_line(argv)
    args.sweep = args.sweep or args.quick or args.batch_sizes is not None
    if args.sweep:
        defaults = SWEEP_DEFAULTS[
            "quick" if args.quick else "cuda" if args.device.startswith("cuda") else "cpu"
        ]
        if args.full:
            defaults = {**defaults, "rounds": 10, "warmup": 50}
    else:
        defaults = SINGLE_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.full and not args.sweep:
        args.warmup, args.iters, args.pairs = 50, 30, 5
    if args.sweep:
        args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",")]
        args.token_batch_sizes = [int(b) for b in str(args.token_batch_sizes).split(",")]
    groups = {o.lstrip("+~").split("=", 1)[0]: o for o in args.overrides}
    if "model" in groups:
        parser.error(f"--set {groups['model']}: the base and every method share one backbone; use --model")
    if "method" in groups:  # it would time that method under each --methods name
        parser.error(f"--set {groups['method']}: a row is labelled by its method; name it in --methods")
    unknown = sorted(set(args.methods.split(",")) - set(METHODS))
    if unknown:
        parser.error(f"--methods: {unknown} not among {METHODS}")
    return args


def setup(
    args: argparse.Namespace,
) -> tuple[list[str], list[tuple[str, str, list[str]]], Any, torch.device, dict]:
    """The configs to time (every one composed once, so a bad ``--set`` fails first), the
    backbone's spec, the device, and what the timings depend on (the machine, its load)."""
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
    machine = {
        # what produced the numbers, for the results pages (python -m tnt_lightning.report.pages)
        "command": getattr(args, "command", None),
        "commit": code_revision(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
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
    return common, runs, spec, device, machine


def sweep(args: argparse.Namespace) -> dict[str, Any]:
    """The batch-size sweep (:mod:`.batch_sweep`) and the latency-vs-tokens table; returns the
    report also written to ``--out``."""
    common, runs, spec, device, machine = setup(args)
    protocol = {
        "model": args.model,
        "keep_rate": args.keep_rate,
        "batch_sizes": args.batch_sizes,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "min_time_s": args.min_time,
        "timer": "torch.utils.benchmark.Timer, models interleaved in every round",
        **machine,
    }
    print(
        f"{args.model}, keep_rate={args.keep_rate}, batches {args.batch_sizes}, {args.dtype}"
        f"{', compiled' if args.compile else ''}, {protocol['device']} ({device.type}), "
        f"{protocol['threads']} threads of {protocol['cpus']} CPUs, torch {torch.__version__}; per row "
        f"{args.warmup} warm-up passes per model, then {args.rounds} rounds of base, method, plain model "
        f"and Random drop on the method's token counts; latency ms median [IQR], speedup median [min, max]; "
        f"load average {protocol['load_average_before']}",
        flush=True,
    )
    plain = build(common)[0]
    base_gflops = count_gflops(plain, spec.input_size)
    base = TimedModel(copy.deepcopy(plain), device, args.dtype, args.compile)
    built, refused = [], []
    for name, schedule, overrides in runs:
        try:
            model = build(common + overrides)[0]
        except ReductionError as e:
            refused.append({"method": name, "schedule": schedule, "error": str(e)})
            print(f"refused: {name} {schedule}: {_first_sentence(e)}", flush=True)
            continue
        gflops = count_gflops(model, spec.input_size)
        built.append((name, schedule, TimedModel(model, device, args.dtype, args.compile), gflops))
    print(batch_sweep.sweep_table([]), flush=True)
    rows = []
    for batch in args.batch_sizes:
        inputs = torch.randn(batch, *spec.input_size, device=device)
        base.warm_up(inputs, args.warmup)
        number = batch_sweep.passes_for(base, inputs, args.min_time)
        for name, schedule, method, gflops in built:
            trace = {"method": token_trace(method.model, inputs)}
            timed = {"base": base, "method": method}
            costs = {"base": base_gflops, "method": gflops}
            for ref in batch_sweep.REFERENCES:
                model = batch_sweep.reference(
                    copy.deepcopy(plain), method.model, trace["method"], ref == "random"
                )
                costs[ref] = count_gflops(model, spec.input_size)
                timed[ref] = TimedModel(model, device, args.dtype, args.compile)
                trace[ref] = token_trace(timed[ref].model, inputs)
            for t in timed.values():
                t.warm_up(inputs, args.warmup)
            times = batch_sweep.interleaved(timed, inputs, args.rounds, number, 0)
            row = batch_sweep.sweep_row(name, schedule, batch, times, costs, trace, number)
            rows.append(row)
            print(batch_sweep.sweep_line(row), flush=True)
            del timed["plain"], timed["random"]
    report: dict[str, Any] = {"protocol": protocol, "rows": rows, "refused": refused, "token_latency": None}
    args.out.mkdir(parents=True, exist_ok=True)
    title = (
        f"{args.model}, K={args.keep_rate}, {args.dtype}, {protocol['device']}, {protocol['threads']} threads"
    )
    tag = f"{args.model}_{device.type}"
    md = [
        f"{title}; load average {protocol['load_average_before']} before",
        "",
        batch_sweep.sweep_table(rows),
    ]
    if args.token_table:
        start = int(spec.pruning.single_block) + 1
        marks = batch_sweep.token_marks(rows, start)
        info = backbone_info(plain)
        counts = batch_sweep.token_grid(info.num_prefix + info.num_patches, args.token_stride, list(marks))
        print(
            f"plain blocks {start}.. at n tokens (latency ms median [IQR], fraction of all tokens'):",
            flush=True,
        )
        latency = batch_sweep.token_latency(
            plain, start, counts, args.token_batch_sizes, args.rounds, args.warmup, args.min_time, device
        )
        table = batch_sweep.token_table(latency, marks)
        print(table, flush=True)
        report["token_latency"] = {"start_block": start, "rows": latency, "marks": marks}
        md += ["", f"plain model, blocks {start}.. (after the single-layer location) on n tokens:", "", table]
        batch_sweep.plot_tokens(
            latency, marks, args.out / f"latency_vs_tokens_{tag}.png", f"{title}, blocks {start}.."
        )
    protocol["load_average_after"] = load_average()
    print(f"load average after: {protocol['load_average_after']}")
    md += [f"\nload average after: {protocol['load_average_after']}"]
    md += [f"\nrefused: {r['method']} {r['schedule']}: {r['error']}" for r in refused]
    (args.out / "bench_batches.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "bench_batches.md").write_text("\n".join(md) + "\n")
    if rows:
        batch_sweep.plot_sweep(rows, args.out / f"speedup_vs_batch_{args.model}.png", title)
    print(f"bench: {args.out / 'bench_batches.md'}, {args.out / 'bench_batches.json'}, plots in {args.out}")
    return report


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark; returns its rows (also written to ``--out``)."""
    args = parse(argv)
    if args.sweep:
        return sweep(args)["rows"]
    common, runs, spec, device, machine = setup(args)
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
        **machine,
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
