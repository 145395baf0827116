"""Results pages of the docs site, generated from committed result data (never copied by hand).

A page under ``docs/`` holds prose and generated sections. A generated section starts with a
marker naming what it shows and the data file it comes from (relative to ``docs/``) and ends
with ``<!-- /results -->``::

    <!-- results: sweep-table results/data/speed_deit_tiny_cpu.json -->
    ...generated...
    <!-- /results -->

``python -m tnt_lightning.report.pages`` rewrites every section from its data (and redraws the
data's figures); ``--check`` only compares, and fails naming the sections a hand edit changed
(``tests/report/test_pages.py`` runs it on the committed pages). The data files are what the
commands write, copied under ``docs/results/data/``:

* ``make bench``'s ``reports/bench/bench_batches.json`` (the batch-size sweep; it records the
  command, the commit and the machine), for the kinds ``bench-provenance``, ``sweep-table``,
  ``sweep-summary``, ``token-table`` and ``sweep-figures``;
* ``python -m tnt_lightning.report.pages study-data`` (the study's report tables and the
  provenance of its records, from ``results.jsonl``), for the kind ``study``; a data file that
  does not exist yet gives a section that names the commands which make it.

    python -m tnt_lightning.report.pages                  # refresh every generated section
    python -m tnt_lightning.report.pages --check          # fail if a section differs from its data
    python -m tnt_lightning.report.pages study-data --results-dir results --data cluttered_mnist \\
        --model vit_cmnist --command "make study" --out docs/results/data/cmnist_study.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

SECTION = re.compile(
    r"(?P<open><!-- results: (?P<kind>[\w-]+) (?P<data>[\w./-]+) -->\n)"
    r"(?P<body>.*?)(?P<close><!-- /results -->)",
    re.S,
)
FIGURES = "results/figures"


class PageError(RuntimeError):
    """A page names a kind of section or a data file the generator cannot use."""


# ------------------------------------------------------------------------------------------ bench
def _load_average(text: str) -> float:
    return float(text.split()[0]) if text else 0.0


def bench_provenance(data: dict[str, Any], path: str) -> str:
    """Where the numbers come from: the command, the commit, the machine and how busy it was.

    Args:
        data: a bench report (``bench_batches.json`` or ``bench.json``).
        path: the data file, relative to ``docs/`` (the page links to it).

    Returns:
        Markdown: one paragraph, and the data's own note on its provenance if it has one.
    """
    p = data["protocol"]
    missing = [k for k in ("command", "commit") if not p.get(k)]
    if missing:
        raise PageError(
            f"{path}: the bench data does not record {missing} (a bench of this project writes them)"
        )
    threads = int(p.get("threads", 1))
    before, after = p.get("load_average_before", ""), p.get("load_average_after", "")
    busy = max(_load_average(before), _load_average(after)) > threads + 0.5
    compiled = ", compiled" if p.get("compile") else ""
    lines = [
        f"Measured with `{p['command']}` at commit `{p['commit']}`"
        + (f" on {p['date']}" if p.get("date") else "")
        + f": {p.get('device', '?')}, {threads} thread(s) of {p.get('cpus', '?')} CPUs, "
        f"{p.get('dtype', 'fp32')}{compiled}, torch {p.get('torch', '?')}, "
        f"Python {p.get('python', '?')}; load average {before} before, {after} after"
        + (
            f" (above the {threads} thread(s) used: other jobs shared the machine, so compare ratios "
            "within this run only, and read single ratios with their [min, max])."
            if busy
            else "."
        ),
        "",
        f"Data: [`{path}`]({path}) (`protocol` holds the settings, `rows` every timing).",
    ]
    if p.get("provenance_note"):
        lines += ["", f"*{p['provenance_note']}*"]
    return "\n".join(lines)


def sweep_table(data: dict[str, Any], path: str) -> str:
    """Every row of the batch-size sweep, as ``make bench`` prints it (:mod:`..measure.batch_sweep`).

    Args:
        data: ``bench_batches.json``.
        path: the data file (unused: the provenance section links to it).

    Returns:
        The Markdown table, then the methods the bench refused and why.
    """
    from ..measure.batch_sweep import sweep_table as table

    refused = [f"- refused: {r['method']} {r['schedule']}: {r['error']}" for r in data.get("refused", [])]
    return "\n".join([table(data["rows"]), *([""] + refused if refused else [])])


def _span(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f} (median {statistics.median(values):.2f})"


def sweep_summary(data: dict[str, Any], path: str) -> str:
    """Per schedule and batch size, the spread over methods of speedup / GFLOPs ratio and of
    method / plain model on the same tokens: where the FLOP saving stops showing as speed.

    Args:
        data: ``bench_batches.json``.
        path: the data file (unused).

    Returns:
        A Markdown table, one row per schedule and batch size.
    """
    lines = [
        "| schedule | batch | methods | speedup / GFLOPs ratio | method / plain, same tokens |",
        "|---|---|---|---|---|",
    ]
    rows = data["rows"]
    for schedule in dict.fromkeys(r["schedule"] for r in rows):
        for batch in sorted({r["batch_size"] for r in rows if r["schedule"] == schedule}):
            here = [r for r in rows if r["schedule"] == schedule and r["batch_size"] == batch]
            ratio = [r["speedup_over_flops_limit"]["method"] for r in here]
            share = [r["speedup"]["method"]["median"] / r["speedup"]["plain"]["median"] for r in here]
            lines.append(f"| {schedule} | {batch} | {len(here)} | {_span(ratio)} | {_span(share)} |")
    return "\n".join(lines)


def token_table(data: dict[str, Any], path: str) -> str:
    """Latency of the plain blocks after the single-layer location against their token count.

    Args:
        data: ``bench_batches.json``.
        path: the data file (unused).

    Returns:
        A sentence naming the blocks, then the table as ``make bench`` prints it; or why there is
        none (``--no-token-table``).
    """
    from ..measure.batch_sweep import token_table as table

    latency = data.get("token_latency")
    if not latency:
        return "This run has no latency-vs-tokens table (it ran with `--no-token-table`)."
    marks = {int(k): v for k, v in latency["marks"].items()}
    return (
        f"Plain blocks {latency['start_block']}.. and the final norm on n tokens (prefix included): "
        "ms per pass, median [interquartile range], and the fraction of the time on all tokens; "
        "`methods here`: what each row of the sweep feeds the first of these blocks (at the smallest "
        "batch size).\n\n" + table(latency["rows"], marks)
    )


def _figure_names(path: str) -> dict[str, str]:
    stem = Path(path).stem
    return {
        "sweep": f"{FIGURES}/{stem}_speedup_vs_batch.png",
        "tokens": f"{FIGURES}/{stem}_latency_vs_tokens.png",
    }


def sweep_figures(data: dict[str, Any], path: str) -> str:
    """The sweep's two plots (drawn from the data by :func:`draw_figures`).

    Args:
        data: ``bench_batches.json``.
        path: the data file; the figures are named after it.

    Returns:
        Markdown image links.
    """
    names = _figure_names(path)
    lines = [f"![speedup / GFLOPs ratio against batch size]({names['sweep']})"]
    if data.get("token_latency"):
        lines += ["", f"![latency against tokens]({names['tokens']})"]
    return "\n".join(lines)


def draw_figures(data: dict[str, Any], path: str, docs: Path) -> list[Path]:
    """Draw the sweep's plots from ``data`` into ``docs/results/figures`` (as ``make bench`` does).

    Args:
        data: ``bench_batches.json``.
        path: the data file, relative to ``docs``.
        docs: the docs folder.

    Returns:
        The files written.
    """
    from ..measure import batch_sweep

    p = data["protocol"]
    title = f"{p['model']}, K={p['keep_rate']}, {p['dtype']}, {p['device']}, {p['threads']} threads"
    names = _figure_names(path)
    (docs / FIGURES).mkdir(parents=True, exist_ok=True)
    written = [batch_sweep.plot_sweep(data["rows"], docs / names["sweep"], title)]
    latency = data.get("token_latency")
    if latency:
        marks = {int(k): v for k, v in latency["marks"].items()}
        written.append(
            batch_sweep.plot_tokens(
                latency["rows"], marks, docs / names["tokens"], f"{title}, blocks {latency['start_block']}.."
            )
        )
    return written


# ------------------------------------------------------------------------------------------ study
# The studies a page can show, by data file name: the make target that runs one, and its backbone.
STUDIES = {
    "cmnist_study": ("study", "vit_cmnist"),
    "cmnist_study_meanpool": ("study-meanpool", "vit_cmnist_meanpool"),
}


def study_commands(path: str) -> list[str]:
    """The commands that run a study and write its data file ``path`` (relative to ``docs/``)."""
    target, model = STUDIES.get(Path(path).stem, ("study", "vit_cmnist"))
    return [
        f"make {target}",
        f"python -m tnt_lightning.report.pages study-data --results-dir ${{TNT_ROOT:-.}}/results "
        f'--data cluttered_mnist --model {model} --command "make {target}" --out docs/{path}',
        "python -m tnt_lightning.report.pages",
    ]


def _device(record: dict[str, Any]) -> str:
    timed = ((record.get("details") or {}).get("throughput") or {}).get("device")
    return str(timed or (record.get("env") or {}).get("device"))


def study_data(
    results_dir: str | Path,
    command: str,
    sweep: str | None = None,
    model: str | None = None,
    data: str | None = None,
) -> dict[str, Any]:
    """The study's report tables and where its runs came from, for a results page.

    Args:
        results_dir: the folder holding ``results.jsonl``.
        command: the command that produced the runs (``make study``), shown on the page.
        sweep: only runs of this ``sweep_name``.
        model: only runs of this model.
        data: only runs on this data set.

    Returns:
        ``{"command", "filters", "provenance", "tables"}``: each table as the report renders it
        (``python -m tnt_lightning.report``'s ``results.md``), the provenance from the records.

    Raises:
        ReportError: no record passes the filters.
    """
    from .tables import ReportError, build_groups, describe_filters, load_records, markdown_table, select

    ok, failed = select(load_records(results_dir), sweep, model, data)
    if not ok:
        raise ReportError(
            f"no successful evaluation run passes the filters ({describe_filters(sweep, model, data)})"
        )
    env = [r.get("env") or {} for r in ok]
    stamps = sorted(str(r.get("created_at")) for r in ok if r.get("created_at"))
    provenance = {
        "runs": len(ok),
        "failed": len(failed),
        "commits": sorted({str(e.get("git_commit")) for e in env}),
        # the CPU's model or the GPU's name where the run timed its throughput, else the device
        "devices": sorted({_device(r) for r in ok}),
        "threads": sorted({int(e.get("threads") or 0) for e in env}),
        "torch": sorted({str(e.get("torch")) for e in env}),
        "first": stamps[0] if stamps else None,
        "last": stamps[-1] if stamps else None,
        "duration_s": round(sum(float(r.get("duration_s") or 0) for r in ok), 1),
    }
    tables = [{"title": g.title, "table": markdown_table(g)} for g in build_groups(ok)]
    return {
        "command": command,
        "filters": describe_filters(sweep, model, data),
        "provenance": provenance,
        "tables": tables,
    }


def study(data: dict[str, Any] | None, path: str) -> str:
    """The study's tables with their provenance, or, without data, the commands that make them.

    Args:
        data: from :func:`study_data`, or None when ``path`` does not exist yet.
        path: the data file, relative to ``docs/``.

    Returns:
        Markdown.
    """
    if data is None:
        steps = "\n".join(f"    {c}" for c in study_commands(path))
        return (
            f"No data of this study is committed yet (`docs/{path}`). These commands run the study, "
            "extract its report's tables with the commit and the machine of its runs, and write this "
            f"section from them:\n\n{steps}"
        )
    p = data["provenance"]
    minutes = p["duration_s"] / 60
    lines = [
        f"Produced by `{data['command']}` ({data['filters']}): {p['runs']} runs"
        + (f" and {p['failed']} without a result" if p["failed"] else "")
        + f", {minutes:.1f} min of job time, {p['first']} to {p['last']}; commit(s) "
        + ", ".join(f"`{c}`" for c in p["commits"])
        + f"; device(s) {', '.join(p['devices'])}, {'/'.join(map(str, p['threads']))} thread(s), torch "
        + ", ".join(p["torch"])
        + f". Data: [`{path}`]({path}).",
    ]
    for table in data["tables"]:
        lines += ["", f"#### {table['title']}", "", table["table"]]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ pages
KINDS: dict[str, Callable[[Any, str], str]] = {
    "bench-provenance": bench_provenance,
    "sweep-table": sweep_table,
    "sweep-summary": sweep_summary,
    "token-table": token_table,
    "sweep-figures": sweep_figures,
    "study": study,
}
# Kinds whose section is written without data (the data file may not exist yet).
OPTIONAL_DATA = {"study"}


def render(kind: str, data_path: str, docs: Path) -> str:
    """One generated section's text, from its data file.

    Args:
        kind: a key of :data:`KINDS`.
        data_path: the data file, relative to ``docs``.
        docs: the docs folder.

    Returns:
        The section's body (between its markers).

    Raises:
        PageError: an unknown kind, or a data file that is missing where the kind needs one.
    """
    if kind not in KINDS:
        raise PageError(f"unknown kind of results section {kind!r}; kinds: {', '.join(KINDS)}")
    file = docs / data_path
    if not file.is_file() and kind not in OPTIONAL_DATA:
        raise PageError(f"{kind}: no data file docs/{data_path}")
    data = json.loads(file.read_text()) if file.is_file() else None
    return KINDS[kind](data, data_path).rstrip("\n") + "\n"


def refresh(text: str, docs: Path) -> str:
    """``text`` (a page) with every generated section rewritten from its data.

    Args:
        text: the page's Markdown.
        docs: the docs folder the data paths are relative to.

    Returns:
        The page as the generator writes it.
    """
    return SECTION.sub(lambda m: m["open"] + render(m["kind"], m["data"], docs) + m["close"], text)


def pages(docs: Path) -> list[Path]:
    """The pages under ``docs`` with at least one generated section."""
    return [p for p in sorted(docs.rglob("*.md")) if SECTION.search(p.read_text())]


def data_files(page: Path) -> list[str]:
    """The data files a page's sections come from (relative to ``docs/``), in page order."""
    return list(dict.fromkeys(m["data"] for m in SECTION.finditer(page.read_text())))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["study-data"]:
        parser = argparse.ArgumentParser(
            prog="python -m tnt_lightning.report.pages study-data",
            description="The study's report tables and its runs' provenance, as a results page's data.",
        )
        parser.add_argument("--results-dir", type=Path, required=True, help="holds results.jsonl")
        parser.add_argument("--out", type=Path, required=True, help="the data file (docs/results/data/...)")
        parser.add_argument("--command", default="make study", help="what produced the runs (%(default)s)")
        parser.add_argument("--sweep")
        parser.add_argument("--model")
        parser.add_argument("--data")
        args = parser.parse_args(argv[1:])
        result = study_data(args.results_dir, args.command, args.sweep, args.model, args.data)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"study data: {args.out} ({result['provenance']['runs']} runs, {len(result['tables'])} tables)")
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m tnt_lightning.report.pages",
        description="Rewrite (or --check) the generated sections of the docs' results pages from their data.",
        epilog="`python -m tnt_lightning.report.pages study-data --help`: a study's data file.",
    )
    parser.add_argument("pages", nargs="*", type=Path, help="default: every page under --docs with a section")
    parser.add_argument("--docs", type=Path, default=Path("docs"), help="the docs folder (%(default)s)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a section differs")
    args = parser.parse_args(argv)
    stale = []
    for page in args.pages or pages(args.docs):
        text = page.read_text()
        fresh = refresh(text, args.docs)
        if fresh == text:
            continue
        if args.check:
            stale.append(str(page))
            continue
        page.write_text(fresh)
        print(f"rewrote {page}")
    if not args.check:
        for page in args.pages or pages(args.docs):
            for match in SECTION.finditer(page.read_text()):
                file = args.docs / match["data"]
                if match["kind"] == "sweep-figures" and file.is_file():
                    for written in draw_figures(json.loads(file.read_text()), match["data"], args.docs):
                        print(f"drew {written}")
    if stale:
        print(
            "generated sections differ from their data (a hand edit, or data changed without a refresh): "
            + ", ".join(stale)
            + "; `python -m tnt_lightning.report.pages` rewrites them",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
