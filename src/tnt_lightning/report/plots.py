"""Top-1 accuracy against GFLOPs and against the same-process speedup over the unpruned model, one
line per method and pruning location (the paper's Figures 4, 5, with speed as a ratio measured in
one process rather than img/s, which mixes the machine's load into the comparison): a method's runs
at two locations or other settings are two lines.

Matplotlib's object API with the Agg canvas: no pyplot state, no display needed. The Pareto front
(no point more accurate at lower or equal cost) is ringed and joined by a dashed line; the paper's
points for the same model and schedule can be overlaid as hollow markers on dotted lines.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..engine.registry import BASELINE, colour, method_names
from .tables import PAPER_DATA, Group, Row, method_order, paper_points

AXES = {
    "gflops": ("GFLOPs", "gflops", "pareto_gflops"),
    "speedup": ("Speedup over the unpruned model, same process (x)", "speedup", "pareto_speedup"),
}


# The colour of a method the registry does not know (an old record's, another package's).
UNREGISTERED_COLOUR = "#404040"


def _color(method: str) -> str:
    """The method's registered colour (a variant such as ``tnt_mlp`` shares its method's); a
    method the registry does not know is drawn in a dark grey no registered method uses."""
    base = method.removesuffix("_mlp")
    return colour(base) if base in {BASELINE, *method_names()} else UNREGISTERED_COLOUR


def plot_lines(group: Group, metric: str) -> list[tuple[str, str, list[Row]]]:
    """``(method, legend label, rows by cost)`` for each line of the plot against ``metric``: one per
    method and location (or other setting, :attr:`Row.line`), the rows with top-1 and ``metric``."""
    rows = [r for r in group.rows if r.mean("acc1") is not None and r.mean(metric) is not None]
    lines: dict[tuple[str, str], list[Row]] = {}
    for row in sorted(rows, key=lambda r: (method_order(r.method), r.line)):
        lines.setdefault((row.method, row.line), []).append(row)
    return [
        (method, "none (base)" if method == "none" else f"{method} ({line})" if line else method, points)
        for (method, line), points in ((k, sorted(v, key=lambda r: r.mean(metric))) for k, v in lines.items())
    ]


def plot_group(group: Group, metric: str, path: Path, paper_overlay: bool = True) -> Path | None:
    """Write the plot of ``group``'s top-1 against ``metric`` to ``path``; None if nothing to plot."""
    label, paper_key, front_attr = AXES[metric]
    lines = plot_lines(group, metric)
    if not lines:
        return None
    rows = [r for _, _, points in lines for r in points]
    fig = Figure(figsize=(7, 5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    methods = sorted({r.method for r in rows}, key=method_order)
    markers = "osD^vP"
    for n, (method, legend, points) in enumerate(lines):
        xs = [r.mean(metric) for r in points]
        ys = [r.mean("acc1") for r in points]
        errs = [r.stats["acc1"].std or 0.0 for r in points]
        xerrs = [r.stats[metric].std or 0.0 for r in points]  # a speedup's spread over seeds
        if method == "none":
            ax.errorbar(xs, ys, yerr=errs, color="black", marker="*", markersize=12, ls="", label=legend)
        else:
            # a method's lines share its colour; its locations differ by marker and dash
            nth = sum(1 for m, _, _ in lines[:n] if m == method)
            style = dict(marker=markers[nth % len(markers)], ls=("-", "--", "-.", ":")[nth % 4])
            ax.errorbar(xs, ys, yerr=errs, xerr=xerrs, color=_color(method), capsize=3, label=legend, **style)
    front = sorted((r for r in rows if getattr(r, front_attr)), key=lambda r: r.mean(metric))
    if front:
        fx, fy = [r.mean(metric) for r in front], [r.mean("acc1") for r in front]
        ax.plot(fx, fy, color="grey", ls="--", lw=1, zorder=0)
        ax.scatter(fx, fy, s=180, facecolors="none", edgecolors="black", lw=1.2, label="Pareto front")
    if paper_overlay and group.data == PAPER_DATA:
        _overlay_paper(ax, group, methods, paper_key)
    ax.set_xlabel(label)
    ax.set_ylabel("Top-1 accuracy (%)")
    ax.set_title(group.title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _overlay_paper(ax, group: Group, methods: list[str], key: str) -> None:
    """The paper's points; its speedups are its throughputs over its unpruned model's (its GPU)."""
    cells = paper_points(group.model, group.schedule, methods)
    if key == "speedup":
        base = [
            float(c.row["throughput_img_s"])
            for c in cells
            if c.method == "none" and c.row["throughput_img_s"]
        ]
        if not base:
            return
        value = {
            id(c): float(c.row["throughput_img_s"]) / base[0] for c in cells if c.row["throughput_img_s"]
        }
    else:
        value = {id(c): float(c.row[key]) for c in cells if c.row[key]}
    cells = [c for c in cells if id(c) in value and c.row["acc_top1"]]
    suffix = " (paper, its GPU)" if key == "speedup" else " (paper)"
    for method in sorted({c.method for c in cells}, key=method_order):
        points = sorted((value[id(c)], float(c.row["acc_top1"])) for c in cells if c.method == method)
        xs, ys = zip(*points, strict=True)
        if method == "none":
            ax.plot(
                xs, ys, ls="", marker="*", markersize=12, mfc="none", color="black", label="none" + suffix
            )
        else:
            ax.plot(xs, ys, ls=":", marker="s", mfc="none", color=_color(method), label=method + suffix)
