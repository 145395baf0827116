"""Speedup across batch sizes, beside the two references that bound it (``make bench``).

For every method, schedule and batch size, four models are timed in one process, interleaved
(base, method, plain-same-tokens, random-same-tokens, base, method, ...; ``rounds`` rounds of
``number`` passes each, after warm-up, with :class:`torch.utils.benchmark.Timer`):

* ``base``: the unpruned backbone;
* ``method``: the backbone with the method plugged in;
* ``plain``: the plain backbone on the token counts the method leaves (the kernel ceiling): the
  method's per-block counts are read from one traced forward (:func:`~.flops.token_trace`) and a
  reducer that only truncates to them (:class:`FixedCounts`, a slice: no selection work) is
  plugged in at the same places;
* ``random``: Random drop to the same counts at the same places (the pruner ceiling: a random
  gather, as ``method=random`` draws, and no scoring).

The speedup of each over the base is the median of the per-round ratios (its spread: their min and
max); latencies are medians with the interquartile range over the rounds. The latency-vs-token
count table (:func:`token_latency`) times the plain backbone's blocks after the single-layer
pruning location on ``n`` tokens, so that the steps of the kernels show (HATP, arXiv 2407.05941).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn
from torch.utils.benchmark import Timer

from ..engine import AttentionNeeds, Location, Site, TokenReducer, Tokens, apply_reducer, backbone_info
from ..engine.registry import colour, method_names
from ..models.backbones import drop_distillation_token

REFERENCES = ("plain", "random")
MODELS = ("base", "method", *REFERENCES)
REFERENCE_LABELS = {
    "plain": "plain model, same token counts (kernel ceiling)",
    "random": "Random drop, same token counts (pruner ceiling)",
}


class FixedCounts(TokenReducer):
    """Cut the tokens to fixed counts at fixed places: the first ones (``random=False``, a slice)
    or a random draw of them kept in order (``random=True``, Random drop's gather). Not a method:
    the references the bench times a method against."""

    name = "fixed-counts"

    def __init__(self, counts: dict[Location, int], random: bool = False, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.counts = dict(counts)
        self.random = random

    def locations(self) -> list[Location]:
        return list(self.counts)

    def needs(self, block: int) -> AttentionNeeds:
        return AttentionNeeds()

    def reduce(self, loc: Location, tokens: Tokens, attn: Any) -> Tokens:
        keep = self.counts[loc] - tokens.num_prefix
        if not 0 <= keep <= tokens.n:
            raise ValueError(f"{loc}: cannot keep {keep} of {tokens.n} patches")
        if not self.random:
            return tokens.with_x(tokens.x[:, : tokens.num_prefix + keep])
        device = tokens.x.device
        draws = torch.rand(tokens.x.shape[0], tokens.n, device=device, generator=self.generator(device))
        return tokens.keep(draws.topk(keep, dim=1).indices.sort(dim=1).values)


def steps_of(trace: Sequence[tuple[int, int]], start: int) -> dict[Location, int]:
    """The reduction steps a per-block trace (``token_trace``: attention and MLP tokens per block)
    shows, as the token count after each: before block 0, inside a block (MLP on fewer tokens than
    the attention), after a block (the next block on fewer). ``start``: the tokens the first block
    would get unreduced."""
    steps: dict[Location, int] = {}
    if trace[0][0] != start:
        steps[Location(Site.PRE)] = trace[0][0]
    for i, (attn, mlp) in enumerate(trace):
        if mlp != attn:
            steps[Location(Site.INSIDE, i)] = mlp
        if i + 1 < len(trace) and trace[i + 1][0] != mlp:
            steps[Location(Site.AFTER, i)] = trace[i + 1][0]
    return steps


def reference(
    plain: nn.Module, method: nn.Module, trace: Sequence[tuple[int, int]], random: bool
) -> nn.Module:
    """``plain`` (a fresh unpruned backbone, changed in place) running on ``method``'s token counts
    (``trace``, from :func:`~.flops.token_trace`): on its CLS-only form if the method drops the DIST
    token, cut by :class:`FixedCounts` at the steps the trace shows."""
    if getattr(getattr(method, "reducer", None), "cls_only_backbone", False):
        drop_distillation_token(plain)
    info = backbone_info(plain)
    steps = steps_of(trace, info.num_prefix + info.num_patches)
    return apply_reducer(plain.eval(), FixedCounts(steps, random=random)) if steps else plain.eval()


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median, quartiles, min and max of ``values`` (the quartiles are the median for one value)."""
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {
        "median": statistics.median(values),
        "q1": q1,
        "q3": q3,
        "min": min(values),
        "max": max(values),
    }


def timer(fn: Callable[[torch.Tensor], Any], inputs: torch.Tensor) -> Timer:
    """A :class:`torch.utils.benchmark.Timer` of ``fn(inputs)`` on this process's threads (the
    Timer's default is one) that synchronises the accelerator around its passes."""
    return Timer(stmt="fn(x)", globals={"fn": fn, "x": inputs}, num_threads=torch.get_num_threads())


def passes_for(fn: Callable[[torch.Tensor], Any], inputs: torch.Tensor, min_time: float) -> int:
    """Passes per timing so that one timing lasts about ``min_time`` seconds (one pass at least)."""
    once = timer(fn, inputs).timeit(1).median
    return max(1, math.ceil(min_time / max(once, 1e-9)))


def interleaved(
    fns: dict[str, Callable[[torch.Tensor], Any]],
    inputs: torch.Tensor,
    rounds: int,
    number: int,
    warmup: int,
) -> dict[str, list[float]]:
    """Seconds per pass of every model in ``fns``, ``rounds`` times, the models in turn in every
    round (a drift of the machine then reaches all of them alike), after ``warmup`` passes each."""
    timers = {name: timer(fn, inputs) for name, fn in fns.items()}
    for t in timers.values():
        if warmup:
            t.timeit(warmup)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, t in timers.items():
            times[name].append(t.timeit(number).median)
    return times


def sweep_row(
    method: str,
    schedule: str,
    batch_size: int,
    times: dict[str, list[float]],
    gflops: dict[str, float],
    trace: dict[str, list[tuple[int, int]]],
    number: int,
) -> dict[str, Any]:
    """One row: latencies (ms per pass) and speedups over the base of the method and the references."""
    base = times["base"]
    row: dict[str, Any] = {
        "method": method,
        "schedule": schedule,
        "batch_size": batch_size,
        "number": number,
        "rounds": len(base),
        "gflops": gflops["method"],
        "base_gflops": gflops["base"],
        "gflops_ratio": gflops["base"] / gflops["method"],
        "tokens": trace["method"],
        "reference_tokens": {r: trace[r] for r in REFERENCES},
        "latency_ms": {m: summary([1e3 * t for t in times[m]]) for m in times},
        "speedup": {},
        "gflops_ratios": {m: gflops["base"] / gflops[m] for m in times if m != "base"},
        "speedup_over_flops_limit": {},
    }
    for m in times:
        if m == "base":
            continue
        row["speedup"][m] = summary([b / t for b, t in zip(base, times[m], strict=True)])
        row["speedup_over_flops_limit"][m] = row["speedup"][m]["median"] / row["gflops_ratios"][m]
    return row


SWEEP_COLUMNS = [
    "method",
    "schedule",
    "batch",
    "GFLOPs ratio",
    "base ms",
    "method ms",
    "speedup [min, max]",
    "speedup / ratio",
    "plain, same tokens",
    "Random, same tokens",
    "method / plain",
]


def _ms(s: dict[str, float]) -> str:
    return f"{s['median']:.3g} [{s['q1']:.3g}-{s['q3']:.3g}]"


def sweep_line(r: dict[str, Any]) -> str:
    """One row of the sweep table in markdown: latencies ms median [IQR]; speedups median [min, max]."""
    sp = r["speedup"]
    cells = [
        r["method"],
        r["schedule"],
        str(r["batch_size"]),
        f"{r['gflops_ratio']:.2f}",
        _ms(r["latency_ms"]["base"]),
        _ms(r["latency_ms"]["method"]),
        f"{sp['method']['median']:.2f} [{sp['method']['min']:.2f}, {sp['method']['max']:.2f}]",
        f"{r['speedup_over_flops_limit']['method']:.2f}",
        *(f"{sp[ref]['median']:.2f} [{sp[ref]['min']:.2f}, {sp[ref]['max']:.2f}]" for ref in REFERENCES),
        f"{sp['method']['median'] / sp['plain']['median']:.2f}",
    ]
    return "| " + " | ".join(cells) + " |"


def sweep_table(rows: list[dict[str, Any]]) -> str:
    header = ["| " + " | ".join(SWEEP_COLUMNS) + " |", "|" + "---|" * len(SWEEP_COLUMNS)]
    return "\n".join(header + [sweep_line(r) for r in rows])


def _colour(method: str) -> str:
    return colour(method) if method in method_names() else "#404040"


def plot_sweep(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Speedup / GFLOPs ratio against batch size, one line per method (solid) and its plain model on
    the same token counts (dashed), one panel per schedule."""
    schedules = list(dict.fromkeys(r["schedule"] for r in rows))
    fig = Figure(figsize=(6 * max(1, len(schedules)), 4.5), dpi=110)
    FigureCanvasAgg(fig)
    for k, schedule in enumerate(schedules):
        ax = fig.add_subplot(1, len(schedules), k + 1)
        ax.axhline(1.0, color="black", lw=1)
        for method in dict.fromkeys(r["method"] for r in rows if r["schedule"] == schedule):
            pts = sorted(
                (r for r in rows if r["schedule"] == schedule and r["method"] == method),
                key=lambda r: r["batch_size"],
            )
            batches = [r["batch_size"] for r in pts]
            c = _colour(method)
            ax.plot(
                batches, [r["speedup_over_flops_limit"]["method"] for r in pts], "o-", color=c, label=method
            )
            ax.plot(
                batches, [r["speedup_over_flops_limit"]["plain"] for r in pts], ":", color=c, lw=1, alpha=0.7
            )
        ax.plot([], [], ":", color="grey", label="dotted: plain model, same tokens")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("speedup / GFLOPs ratio (same process)")
        ax.set_title(f"{title}, {schedule}", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return path


def token_grid(total: int, stride: int, marks: Sequence[int] = ()) -> list[int]:
    """1, 1 + stride, ... up to ``total``, with ``total`` and every count in ``marks``."""
    return sorted({*range(1, total + 1, max(1, stride)), total, *(m for m in marks if 1 <= m <= total)})


def token_latency(
    model: nn.Module,
    start_block: int,
    counts: Sequence[int],
    batch_sizes: Sequence[int],
    rounds: int,
    warmup: int,
    min_time: float,
    device: torch.device,
) -> list[dict[str, Any]]:
    """ms per pass of ``model``'s blocks ``start_block``... (and the final norm) on ``n`` tokens for
    every ``n`` in ``counts`` and batch size: one row per ``n``; the counts interleaved in every
    round, the passes per timing fixed per batch size by the longest sequence."""
    blocks = nn.Sequential(*model.blocks[start_block:], model.norm).to(device).eval()
    dim = model.embed_dim

    @torch.no_grad()
    def run(x: torch.Tensor) -> torch.Tensor:
        return blocks(x)

    rows = [{"tokens": n, "latency_ms": {}} for n in counts]
    for batch in batch_sizes:
        inputs = {n: torch.randn(batch, n, dim, device=device) for n in counts}
        number = passes_for(run, inputs[max(counts)], min_time)
        times = {n: [] for n in counts}
        for t in (timer(run, x) for x in inputs.values()):
            if warmup:
                t.timeit(warmup)
        for _ in range(rounds):
            for n in counts:
                times[n].append(1e3 * timer(run, inputs[n]).timeit(number).median)
        full = statistics.median(times[max(counts)])
        for row in rows:
            s = summary(times[row["tokens"]])
            row["latency_ms"][str(batch)] = {**s, "of_full": s["median"] / full}
    return rows


def token_table(rows: list[dict[str, Any]], marks: dict[int, list[str]]) -> str:
    batches = list(rows[0]["latency_ms"])
    header = ["tokens", *(f"batch {b}: ms [IQR], of N" for b in batches), "methods here"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [str(r["tokens"])]
        for b in batches:
            s = r["latency_ms"][b]
            cells.append(f"{_ms(s)}, {s['of_full']:.2f}")
        cells.append(", ".join(marks.get(r["tokens"], [])))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_tokens(rows: list[dict[str, Any]], marks: dict[int, list[str]], path: Path, title: str) -> Path:
    """Latency of the blocks after the pruning location against tokens, relative to all tokens, one
    line per batch size; a tick where a method's count falls."""
    fig = Figure(figsize=(7, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    n = [r["tokens"] for r in rows]
    for b in rows[0]["latency_ms"]:
        ax.plot(n, [r["latency_ms"][b]["of_full"] for r in rows], ".-", label=f"batch {b}")
    ax.plot([0, max(n)], [0, 1], color="grey", lw=1, ls="--", label="proportional to tokens")
    for count, names in marks.items():
        ax.axvline(count, color="tab:red", lw=0.6, alpha=0.5)
        ax.annotate(", ".join(names), (count, 0.02), rotation=90, fontsize=6, color="tab:red")
    ax.set_xlabel("tokens (prefix included)")
    ax.set_ylabel("latency / latency at all tokens")
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(path)
    return path


def token_marks(rows: list[dict[str, Any]], start_block: int) -> dict[int, list[str]]:
    """``{tokens: ["method/schedule", ...]}``: what each method's row feeds block ``start_block``
    (the first block after the single-layer location), at the rows' smallest batch size."""
    marks: dict[int, list[str]] = {}
    smallest = min((r["batch_size"] for r in rows), default=None)
    for r in rows:
        if r["batch_size"] == smallest and start_block < len(r["tokens"]):
            marks.setdefault(r["tokens"][start_block][0], []).append(f"{r['method']}/{r['schedule']}")
    return marks
