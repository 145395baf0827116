"""The report folder: ``results.md``, one CSV and two PNGs per table, from ``results.jsonl`` alone."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..results import results_path
from .plots import plot_group
from .tables import (
    PAPER_DATA,
    Group,
    ReportError,
    build_groups,
    describe_filters,
    failed_table,
    load_records,
    markdown_table,
    select,
    write_csv,
)


@dataclasses.dataclass
class Report:
    """What was written, for the command line to print and for W&B to log."""

    out_dir: Path
    markdown: Path
    groups: list[Group]
    failed: list[dict[str, Any]]
    files: dict[str, dict[str, Path]]  # group slug -> {"csv"|"acc_vs_gflops"|"acc_vs_speedup": path}


def build_report(
    results_dir: str | Path,
    out_dir: str | Path,
    sweep: str | None = None,
    model: str | None = None,
    data: str | None = None,
    paper_overlay: bool = True,
) -> Report:
    """Write the report of the records passing the filters; ReportError if there is nothing to report."""
    source = results_path(results_dir)
    records = load_records(results_dir)
    ok, failed = select(records, sweep, model, data)
    if not ok and not failed:
        raise ReportError(
            f"no evaluation records in {source} pass the filters ({describe_filters(sweep, model, data)}); "
            f"the file has {len(records)} record(s)"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = build_groups(ok)
    files: dict[str, dict[str, Path]] = {}
    for group in groups:
        written = {"csv": write_csv(group, out / f"{group.slug}.csv")}
        for name, metric in (("acc_vs_gflops", "gflops"), ("acc_vs_speedup", "speedup")):
            path = plot_group(group, metric, out / f"{group.slug}_{name}.png", paper_overlay)
            if path is not None:
                written[name] = path
        files[group.slug] = written
    markdown = out / "results.md"
    markdown.write_text(render_markdown(source, groups, failed, files, (sweep, model, data)))
    return Report(out, markdown, groups, failed, files)


def render_markdown(
    source: Path,
    groups: list[Group],
    failed: list[dict[str, Any]],
    files: dict[str, dict[str, Path]],
    filters: tuple[str | None, str | None, str | None],
) -> str:
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    runs = sum(row.n for group in groups for row in group.rows if row.setting.schedule != "none")
    lines = [
        "# Results",
        "",
        f"From `{source}` (filters: {describe_filters(*filters)}), {now}: {runs} pruned run(s) in "
        f"{len(groups)} table(s), {len(failed)} run(s) without a result.",
        "",
        "Mean ± sample std over the runs of a setting that differ only in their seeds (the run's, and a "
        "framework-pretrained backbone's; n runs). "
        "Paper: the paper's table (T9 = Table 9) printing the same setting; Δ = ours - paper. The "
        "paper's throughput is from its GPU, shown for reference only. Speedup: over the unpruned "
        "backbone timed in the same process, interleaved (docs/measuring.md#speedup), marked when "
        "unreliable; / GFLOPs ratio: that speedup over base GFLOPs / GFLOPs (1 = the whole FLOP saving "
        "is speed). Front: on the Pareto front of "
        "top-1 against GFLOPs (or throughput) across all methods of the table.",
    ]
    if not groups:
        lines += ["", "No successful evaluation run passes the filters."]
    for group in groups:
        lines += ["", f"## {group.title}", ""]
        if group.data != PAPER_DATA:
            lines += [
                f"data={group.data}: the paper's accuracies are on ImageNet and are not compared; GFLOPs "
                "do not depend on the data and are.",
                "",
            ]
        lines += [markdown_table(group), "", f"CSV: [{group.slug}.csv]({group.slug}.csv)"]
        plots = [p for name, p in files[group.slug].items() if name != "csv"]
        if plots:
            lines += [""] + [f"![{p.stem}]({p.name})" for p in plots]
        elif not group.has_accuracy:
            lines += ["", "No accuracy in these runs: no plots."]
    if failed:
        lines += ["", "## Runs without a result", "", failed_table(failed)]
    return "\n".join(lines) + "\n"
