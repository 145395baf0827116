"""``python -m tnt_lightning.report``: tables and plots; ``... report budget``: rates matched to a budget.

python -m tnt_lightning.report [--results-dir DIR] [--out DIR] [--sweep NAME] [--model M]
    [--data D] [--paper-overlay | --no-paper-overlay] [--wandb]
python -m tnt_lightning.report budget --model deit_small_distilled --gflops 3.0
    [--methods topk evit ...] [--schedule single|multi] [--override [METHOD:]KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .tables import ReportError, describe_filters


def _root() -> Path:
    """Where run.py puts results by default (``paths.root_dir``: TNT_ROOT, else the current folder)."""
    return Path(os.environ.get("TNT_ROOT", os.getcwd()))


def report_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tnt_lightning.report",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Markdown/CSV tables and plots of results.jsonl, beside the paper's numbers. "
        "`python -m tnt_lightning.report budget --help`: keep rates matched to a GFLOPs budget.",
    )
    parser.add_argument("--results-dir", type=Path, default=_root() / "results", help="holds results.jsonl")
    parser.add_argument("--out", type=Path, default=_root() / "reports", help="output folder")
    parser.add_argument("--sweep", help="only runs of this sweep_name")
    parser.add_argument("--model", help="only runs of this model")
    parser.add_argument("--data", help="only runs on this data set")
    parser.add_argument(
        "--paper-overlay",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="draw the paper's points on the plots (ImageNet runs)",
    )
    parser.add_argument("--wandb", action="store_true", help="also log tables and plots to W&B (WANDB_MODE)")
    args = parser.parse_args(argv)

    from .build import build_report

    report = build_report(args.results_dir, args.out, args.sweep, args.model, args.data, args.paper_overlay)
    for group in report.groups:
        print(f"{group.title}: {len(group.rows)} row(s)")
        for path in report.files[group.slug].values():
            print(f"  {path}")
    if not report.groups:
        filters = describe_filters(args.sweep, args.model, args.data)
        print(f"no successful evaluation run passes the filters ({filters}); only failed runs are listed")
    if report.failed:
        print(f"{len(report.failed)} run(s) without a result (failed, interrupted, ...) listed in the report")
    print(f"report: {report.markdown}")
    if args.wandb:
        from .wandb_log import log_report

        print(f"W&B: {log_report(report, group=args.sweep)}")
    return 0


def _overrides(items: list[str], methods: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Split ``--override`` items into ones for every method and ``METHOD:KEY=VALUE`` ones."""
    common: list[str] = []
    per_method: dict[str, list[str]] = {m: [] for m in methods}
    for item in items:
        head, sep, rest = item.partition(":")
        if sep and "=" not in head:
            if head not in per_method:
                raise ValueError(f"--override {item}: method {head!r} is not among --methods {methods}")
            per_method[head].append(rest)
        else:
            common.append(item)
    return common, per_method


def budget_main(argv: list[str]) -> int:
    from .budget import available_methods, format_matches, match_budget

    parser = argparse.ArgumentParser(
        prog="python -m tnt_lightning.report budget",
        description="For each method, the largest keep rate (single-layer) or uniform rate (multi-layer; "
        "ToMe: the smallest r) whose GFLOPs fit a target, counted exactly with random weights.",
    )
    methods = available_methods()
    parser.add_argument("--model", default="deit_small_distilled", help="a conf/model option (%(default)s)")
    parser.add_argument("--gflops", type=float, required=True, help="the budget: GFLOPs at batch 1")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=methods,
        choices=methods,
        metavar="METHOD",
        help="of " + " ".join(methods) + " (default: all)",
    )
    parser.add_argument("--schedule", choices=("single", "multi"), default="single", help="(%(default)s)")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="[METHOD:]KEY=VALUE",
        help="a run.py override for every method, or for one (e.g. evit:method.paper_flops_compat=true)",
    )
    parser.add_argument(
        "--resolution", type=int, default=100, help="keep rates on a grid of 1/RESOLUTION (%(default)s)"
    )
    args = parser.parse_args(argv)
    try:
        common, per_method = _overrides(args.override, args.methods)
    except ValueError as e:
        parser.error(str(e))
    matches = match_budget(args.model, args.gflops, per_method, args.schedule, common, args.resolution)
    print(format_matches(matches, args.gflops))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["budget"]:
            return budget_main(argv[1:])
        return report_main(argv)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
