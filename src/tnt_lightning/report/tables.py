"""From ``results.jsonl`` records to the paper's table layout: settings x methods, ours beside the paper's.

A *group* is one table: a model, a data set and a schedule (single- or multi-layer), with the
unpruned baseline (``method=none``) at the top of every group of its model and data. A *row* is
one setting of one method, averaged over the runs that differ only in their seed. Rows are matched
to the paper's printed cells (:mod:`tnt_lightning.paper`) by model, method, schedule and keep rate:
single-layer by the patch count ``int(196 * K)`` the paper's code keeps, multi-layer by the rate
list (or ToMe's ``r``, or a uniform rate). GFLOPs do not depend on the data, so they are compared
on any data; accuracy only on ImageNet, the paper's.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import statistics
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..engine.registry import display_order
from ..paper import anchor_exception, load_results, overrides_for
from ..results import comparable_config, read_records, results_path

PAPER_PATCHES = 196  # the paper's backbones are 224/16: keep rates are fractions of 196 patches
PAPER_DATA = "imagenet"
# The paper prints 2 decimals; two printings of one cell within this are the same number.
PAPER_TOLERANCE = 0.015
EVAL_TASKS = ("eval", "train_eval")
METRICS = ("acc1", "acc5", "gflops", "throughput_img_s", "speedup", "speedup_over_flops_limit")


class ReportError(RuntimeError):
    """Nothing to report: a missing results file, or no record passing the filters."""


@dataclasses.dataclass(frozen=True)
class Setting:
    """What a run reduced: ``schedule`` is single, multi, or none (the unpruned baseline)."""

    schedule: str
    keep_rate: float | None = None  # single-layer K
    rates: tuple[float, ...] | None = None  # multi-layer: one rate per location
    r: int | tuple[int, ...] | None = None  # ToMe multi-layer: tokens merged per block

    @property
    def label(self) -> str:
        if self.schedule == "none":
            return "base"
        if self.r is not None:
            return f"r={self.r}" if isinstance(self.r, int) else "r=[" + ", ".join(map(str, self.r)) + "]"
        if self.rates and len(set(self.rates)) > 1:
            return "rates=[" + ", ".join(f"{x:g}" for x in self.rates) + "]"
        return f"K={self.rates[0] if self.rates else self.keep_rate:g}"

    def matches(self, paper: Setting) -> bool:
        """Same setting as a paper cell: same kept-patch count (single) or same rates / ``r`` (multi)."""
        if self.schedule != paper.schedule:
            return False
        if self.schedule == "single":
            return int(PAPER_PATCHES * self.keep_rate) == int(PAPER_PATCHES * paper.keep_rate)
        if self.schedule == "multi":
            if paper.r is not None:
                return self.r == paper.r
            ours = tuple(round(x, 4) for x in self.rates or (self.keep_rate,))
            if paper.rates is not None:
                return ours == tuple(round(x, 4) for x in paper.rates)
            return set(ours) == {round(paper.keep_rate, 4)}
        return True


def method_order(method: str) -> tuple[int, str]:
    """Sort key: the registry's display order (a variant such as ``tnt_mlp`` with its method),
    unknown methods after, by name."""
    return (display_order(method.removesuffix("_mlp")), method)


# ---------------------------------------------------------------- records


def load_records(results_dir: str | Path) -> list[dict[str, Any]]:
    """All records of ``<results_dir>/results.jsonl``; a missing file is an error naming the path."""
    path = results_path(results_dir)
    if not path.exists():
        raise ReportError(f"no results file at {path}: run `python run.py ...` first, or pass --results-dir")
    return read_records(results_dir)


def is_eval(record: dict[str, Any]) -> bool:
    """An evaluation record (``task=eval``, or the evaluation half of ``task=train_eval``)."""
    if record.get("task") not in EVAL_TASKS:
        return False
    return record["task"] == "eval" or "weights" in (record.get("details") or {})


def select(
    records: Iterable[dict[str, Any]],
    sweep: str | None = None,
    model: str | None = None,
    data: str | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(ok evaluation records with metrics, records of any task without a result: failed,
    interrupted, preempted, timed out) that pass the filters."""
    kept = [
        r
        for r in records
        if (sweep is None or r.get("sweep_name") == sweep)
        and (model is None or r.get("model") == model)
        and (data is None or r.get("data") == data)
    ]
    ok = [
        r
        for r in kept
        if r.get("status") == "ok" and is_eval(r) and any(k in (r.get("metrics") or {}) for k in METRICS)
    ]
    failed = [r for r in kept if r.get("status") != "ok"]
    return ok, failed


def describe_filters(sweep: str | None, model: str | None, data: str | None) -> str:
    parts = [f"{k}={v}" for k, v in (("sweep", sweep), ("model", model), ("data", data)) if v is not None]
    return ", ".join(parts) or "none"


def record_setting(record: dict[str, Any]) -> Setting:
    """The setting a record ran, from its resolved schedule (older records: from its config)."""
    if record["method"] == "none":
        return Setting("none", keep_rate=1.0)
    schedule = record.get("schedule") or {}
    config_schedule = (record.get("config") or {}).get("schedule") or {}
    name = schedule.get("name") or config_schedule.get("name", "single")
    keep_rate = None if record["keep_rate"] is None else float(record["keep_rate"])
    if name == "single":
        return Setting("single", keep_rate=keep_rate)
    config_method = (record.get("config") or {}).get("method") or {}
    r = schedule.get("r", config_method.get("r")) if record["method"] == "tome" else None
    if isinstance(r, int | list):  # ToMe's multi-layer knob (per block, or one for all); rates unused
        return Setting("multi", r=r if isinstance(r, int) else tuple(r))
    rates = schedule.get("rates") or config_schedule.get("rates")
    if rates:
        return Setting("multi", rates=tuple(float(x) for x in rates))
    return Setting("multi", keep_rate=keep_rate)


def paper_method(record: dict[str, Any]) -> str:
    """The method's name in the paper's tables (TNT with the MLP allocator is its own row there)."""
    method = record["method"]
    allocator = (record.get("schedule") or {}).get("allocator") or (
        ((record.get("config") or {}).get("method") or {}).get("allocator")
    )
    return "tnt_mlp" if method == "tnt" and allocator == "mlp" else method


def _config_but_seed(record: dict[str, Any]) -> dict[str, Any]:
    """What determines the record's result (paths, loggers, run folders left out), minus the seeds:
    the run's, the method's and a framework-pretrained backbone's (``model.pretrain.seed``; the
    embedded study pretrains one backbone per seed, and its seeds are one setting)."""
    config = comparable_config(record.get("config") or {})
    config.pop("seed", None)
    if isinstance(config.get("method"), dict):
        config["method"] = {k: v for k, v in config["method"].items() if k != "seed"}
    model = config.get("model")
    if isinstance(model, dict) and isinstance(model.get("pretrain"), dict):
        config["model"] = {**model, "pretrain": {k: v for k, v in model["pretrain"].items() if k != "seed"}}
    return config


def _setting_key(record: dict[str, Any]) -> str:
    """Records with equal keys ran the same configuration except for the seed."""
    return json.dumps([record.get("task"), _config_but_seed(record)], sort_keys=True, default=str)


# ---------------------------------------------------------------- the paper


@dataclasses.dataclass(frozen=True)
class PaperCell:
    row: dict[str, str]
    model: str
    method: str
    setting: Setting
    note: str  # a known misprint or irreproducible value (paper/anchor_exceptions.csv), or ""
    options: tuple[tuple[str, str], ...]  # method options the paper's setting needs (overrides_for)


def _paper_setting(overrides: list[str], method: str) -> Setting:
    values = dict(o.split("=", 1) for o in overrides)
    if method == "none":
        return Setting("none", keep_rate=1.0)
    if values["schedule"] == "single":
        return Setting("single", keep_rate=float(values["keep_rate"]))
    if "schedule.rates" in values:
        return Setting(
            "multi", rates=tuple(float(x) for x in values["schedule.rates"].strip("[]").split(","))
        )
    if "method.r" in values:
        return Setting("multi", r=int(values["method.r"]))
    return Setting("multi", keep_rate=float(values["keep_rate"]))


@lru_cache(maxsize=1)
def paper_cells() -> tuple[PaperCell, ...]:
    """The paper's cells that name a runnable setting, with any known-misprint note."""
    cells = []
    for row in load_results():
        overrides = overrides_for(row)
        if overrides is None:
            continue
        method = "none" if row["method"] == "base" else row["method"]  # TNT+MLP stays its own method
        exception = anchor_exception(row)
        cells.append(
            PaperCell(
                row=row,
                model=row["base_model"],
                method=method,
                setting=_paper_setting(overrides, method),
                note=exception["reason"] if exception else "",
                options=tuple(
                    (k.removeprefix("method."), v)
                    for k, v in (o.split("=", 1) for o in overrides)
                    if k.startswith("method.") and k not in ("method.r", "method.allocator")
                ),
            )
        )
    return tuple(cells)


def _best(cells: Sequence[PaperCell]) -> PaperCell:
    """Among printings of one cell, prefer one with no known misprint, with a throughput, the latest table."""
    return max(cells, key=lambda c: (not c.note, bool(c.row["throughput_img_s"]), int(c.row["table"])))


def match_paper(
    model: str, method: str, setting: Setting, table_schedule: str | None = None
) -> tuple[PaperCell | None, str]:
    """The paper's cell for this setting, or None, with a note when it is ambiguous or a known misprint.

    A setting printed in several tables (Table 2 and 9, say) takes the best printing; if the
    printings without a known misprint disagree, the paper is ambiguous and nothing is matched.
    The baseline is printed in every table: ``table_schedule`` prefers a table of that schedule.
    """
    cells = [
        c for c in paper_cells() if c.model == model and c.method == method and setting.matches(c.setting)
    ]
    if not cells:
        return None, ""
    cells = [c for c in cells if c.row["schedule"] == table_schedule] or cells
    clean = [c for c in cells if not c.note] or cells
    for key in ("acc_top1", "gflops"):
        values = [float(c.row[key]) for c in clean if c.row[key]]
        if values and max(values) - min(values) > PAPER_TOLERANCE:
            tables = ", ".join(sorted({f"T{c.row['table']}" for c in clean}, key=lambda t: int(t[1:])))
            return None, f"not compared: the paper prints different values for this setting ({tables})"
    best = _best(clean)
    return best, best.note


def option_mismatch(cell: PaperCell, method_config: dict[str, Any]) -> str:
    """The method options the paper's cell was computed with that a run did not use, e.g. EViT's
    CLS-only ``paper_flops_compat``: they explain a GFLOPs difference without being a mismatch."""
    differ = []
    for key, wanted in cell.options:
        value = method_config.get(key)
        ours = "unset" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        if ours != wanted:
            differ.append(f"method.{key}={wanted} (this run: {ours})")
    return f"the paper's setting has {', '.join(differ)}" if differ else ""


def paper_points(model: str, schedule: str, methods: Iterable[str]) -> list[PaperCell]:
    """The paper's cells of ``model`` at ``schedule`` for ``methods``, one printing per setting (plots)."""
    wanted = set(methods)
    by_setting: dict[tuple[str, Setting], list[PaperCell]] = {}
    for c in paper_cells():
        if c.model == model and c.method in wanted and c.setting.schedule in (schedule, "none"):
            by_setting.setdefault((c.method, c.setting), []).append(c)
    return [_best(cells) for cells in by_setting.values()]


# ---------------------------------------------------------------- rows and groups


@dataclasses.dataclass
class Stat:
    mean: float
    std: float | None  # sample standard deviation; None for a single run
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat | None:
        if not values:
            return None
        return cls(
            statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values)
        )


@dataclasses.dataclass
class Row:
    """One setting of one method in one table: our runs averaged over seeds, and the paper's cell."""

    model: str
    data: str
    method: str
    setting: Setting
    records: list[dict[str, Any]]
    stats: dict[str, Stat | None] = dataclasses.field(default_factory=dict)
    paper: PaperCell | None = None
    paper_note: str = ""
    pareto_gflops: bool = False
    pareto_throughput: bool = False
    pareto_speedup: bool = False
    variant: str = ""  # config keys that tell apart rows with the same method and setting
    line: str = ""  # what tells apart a method's plot lines (its location, options), "" for one line
    weights: str = ""  # "random" or "local file ..." when the backbone was not the named model's

    @property
    def n(self) -> int:
        return len(self.records)

    def mean(self, metric: str) -> float | None:
        stat = self.stats.get(metric)
        return None if stat is None else stat.mean

    def paper_value(self, key: str) -> float | None:
        """The paper's printed ``acc_top1``/``gflops``/``throughput_img_s`` (accuracy on ImageNet only)."""
        if self.paper is None or not self.paper.row[key]:
            return None
        if key == "acc_top1" and (self.data != PAPER_DATA or self.weights == "random"):
            return None
        return float(self.paper.row[key])

    def diff(self, metric: str, key: str) -> float | None:
        ours, theirs = self.mean(metric), self.paper_value(key)
        return None if ours is None or theirs is None else ours - theirs


@dataclasses.dataclass
class Group:
    """One table: a model on a data set at one schedule, the baseline first."""

    model: str
    data: str
    schedule: str
    rows: list[Row]

    @property
    def slug(self) -> str:
        return f"{self.model}_{self.data}_{self.schedule}".replace("/", "-")

    @property
    def title(self) -> str:
        return f"{self.model} on {self.data}, {self.schedule}-layer"

    @property
    def has_accuracy(self) -> bool:
        return any(row.mean("acc1") is not None for row in self.rows)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """Which (cost, accuracy) points no other point beats: lower-or-equal cost and higher-or-equal
    accuracy, strictly better in one. Equal points are all on the front."""
    return [
        not any(c <= cost and a >= acc and (c < cost or a > acc) for j, (c, a) in enumerate(points) if j != i)
        for i, (cost, acc) in enumerate(points)
    ]


def _mark_pareto(rows: Sequence[Row]) -> None:
    for metric, attr, sign in (
        ("gflops", "pareto_gflops", 1.0),
        ("throughput_img_s", "pareto_throughput", -1.0),
        ("speedup", "pareto_speedup", -1.0),
    ):
        ranked = [r for r in rows if r.mean(metric) is not None and r.mean("acc1") is not None]
        flags = pareto_front([(sign * r.mean(metric), r.mean("acc1")) for r in ranked])
        for row, flag in zip(ranked, flags, strict=True):
            setattr(row, attr, flag)


def _flatten(value: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): json.dumps(value, default=str)}


def weights_mark(records: Sequence[dict[str, Any]]) -> str:
    """ "random" when any run of a row had random weights, "local file PATH" for a user checkpoint."""
    sources = [str((r.get("details") or {}).get("weights", "")) for r in records]
    if any(s.startswith("random") for s in sources):
        return "random"
    files = sorted({s.split(":", 1)[1] for s in sources if s.startswith("checkpoint:")})
    return f"local file {', '.join(files)}" if files else ""


def _weights_note(row: Row) -> str:
    if row.weights == "random" and row.mean("acc1") is None:
        return ""  # a cost-only run: GFLOPs and speed do not depend on the weights
    if row.weights == "random":
        return "random weights (model.weights=random or cost-only): accuracy is not compared to the paper"
    return f"weights from a {row.weights} (model.checkpoint), not the named release" if row.weights else ""


def _mark_variants(rows: Sequence[Row]) -> None:
    """Name the config keys that differ between rows of the same method and setting."""
    by_label: dict[tuple[str, Setting], list[Row]] = {}
    for row in rows:
        by_label.setdefault((row.method, row.setting), []).append(row)
    for same in by_label.values():
        if len(same) < 2:
            continue
        flat = [_flatten(_config_but_seed(r.records[0])) for r in same]
        keys = sorted({k for c in flat for k in c if len({f.get(k) for f in flat}) > 1})
        for row, config in zip(same, flat, strict=True):
            row.variant = ", ".join(f"{k}={config.get(k, 'unset')}" for k in keys)


# What a plot's line runs along (its points' x): a run's every other setting picks its line.
LINE_KNOBS = ("keep_rate", "schedule.rates", "method.r")
# Where a method prunes, as configured: told by the resolved blocks when those differ.
LOCATION_KEYS = ("method.single_block", "method.multi_blocks", "schedule.blocks")


def _line_config(row: Row) -> dict[str, str]:
    """A row's config but its seeds and line knobs, with the blocks it pruned at (resolved)."""
    flat = {k: v for k, v in _flatten(_config_but_seed(row.records[0])).items() if k not in LINE_KNOBS}
    flat["blocks"] = json.dumps((row.records[0].get("schedule") or {}).get("blocks"))
    return flat


def _mark_lines(rows: Sequence[Row]) -> None:
    """Give each pruning location or other setting of a method its own plot line, named by what
    differs: runs at block 2 and at block 6 are two curves, never one."""
    by_method: dict[str, list[tuple[Row, dict[str, str]]]] = {}
    for row in rows:
        by_method.setdefault(row.method, []).append((row, _line_config(row)))
    for same in by_method.values():
        keys = sorted({k for _, c in same for k in c if len({f.get(k) for _, f in same}) > 1})
        if "blocks" in keys:
            keys = ["blocks", *(k for k in keys if k != "blocks" and k not in LOCATION_KEYS)]
        for row, config in same:
            row.line = ", ".join(f"{k}={config.get(k, 'unset')}" for k in keys)


def _row_order(row: Row) -> tuple:
    s = row.setting
    if s.schedule == "none":
        return (0,)
    if s.schedule == "single":
        return (1, -s.keep_rate, method_order(row.method), row.variant)
    return (1, -(row.mean("gflops") or 0.0), method_order(row.method), s.label, row.variant)


def build_groups(records: Sequence[dict[str, Any]]) -> list[Group]:
    """Group ok evaluation records into tables, average over seeds, match the paper, mark the fronts."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        runs.setdefault(_setting_key(record), []).append(record)
    rows = []
    for same in runs.values():
        first = same[0]
        row = Row(first["model"], first["data"], paper_method(first), record_setting(first), same)
        row.stats = {
            m: Stat.of([r["metrics"][m] for r in same if r["metrics"].get(m) is not None]) for m in METRICS
        }
        rows.append(row)

    order = {"single": 0, "multi": 1}
    keys = sorted(
        {(r.model, r.data, r.setting.schedule) for r in rows if r.setting.schedule != "none"},
        key=lambda k: (k[0], k[1], order.get(k[2], 2), k[2]),
    )
    groups = []
    for model, data in sorted({(r.model, r.data) for r in rows}):
        baseline = [r for r in rows if (r.model, r.data, r.setting.schedule) == (model, data, "none")]
        schedules = [s for m, d, s in keys if (m, d) == (model, data)] or ["single"]
        for schedule in schedules:
            members = baseline + [
                r for r in rows if (r.model, r.data, r.setting.schedule) == (model, data, schedule)
            ]
            groups.append(Group(model, data, schedule, members))
    for group in groups:
        # the baseline is shared between its model's tables: flags and variants are per table
        group.rows = [dataclasses.replace(r) for r in group.rows]
        for row in group.rows:
            row.paper, row.paper_note = match_paper(row.model, row.method, row.setting, group.schedule)
            if row.paper is not None:
                method_config = (row.records[0].get("config") or {}).get("method") or {}
                notes = [row.paper_note, option_mismatch(row.paper, method_config)]
                row.paper_note = "; ".join(n for n in notes if n)
            row.weights = weights_mark(row.records)
            row.paper_note = "; ".join(n for n in (row.paper_note, _weights_note(row)) if n)
        _mark_variants(group.rows)
        _mark_lines(group.rows)
        _mark_pareto(group.rows)
        group.rows.sort(key=_row_order)
    return groups


# ---------------------------------------------------------------- CSV and markdown

CSV_COLUMNS = (
    "model",
    "data",
    "schedule",
    "setting",
    "method",
    "keep_rate",
    "rates",
    "r",
    "n",
    "seeds",
    "acc1",
    "acc1_std",
    "acc5",
    "acc5_std",
    "gflops",
    "gflops_std",
    "throughput_img_s",
    "throughput_img_s_std",
    "speedup",
    "speedup_std",
    "speedup_over_flops_limit",
    "speedup_over_flops_limit_std",
    "devices",
    "paper_table",
    "paper_acc1",
    "diff_acc1",
    "paper_gflops",
    "diff_gflops",
    "paper_throughput_img_s",
    "paper_note",
    "pareto_gflops",
    "pareto_throughput",
    "pareto_speedup",
    "variant",
    "run_ids",
)


def csv_rows(group: Group) -> list[dict[str, Any]]:
    """The group's table as dicts keyed by :data:`CSV_COLUMNS` (None for an empty cell)."""
    out = []
    for row in group.rows:
        s = row.setting
        values: dict[str, Any] = {
            "model": row.model,
            "data": row.data,
            "schedule": s.schedule,
            "setting": s.label,
            "method": row.method,
            "keep_rate": s.keep_rate,
            "rates": json.dumps(list(s.rates)) if s.rates else None,
            "r": json.dumps(list(s.r)) if isinstance(s.r, tuple) else s.r,
            "n": row.n,
            "seeds": " ".join(str(r.get("seed")) for r in row.records),
            "devices": " ".join(sorted({str((r.get("env") or {}).get("device")) for r in row.records})),
            "paper_table": row.paper.row["table"] if row.paper else None,
            "paper_acc1": row.paper_value("acc_top1"),
            "diff_acc1": row.diff("acc1", "acc_top1"),
            "paper_gflops": row.paper_value("gflops"),
            "diff_gflops": row.diff("gflops", "gflops"),
            "paper_throughput_img_s": row.paper_value("throughput_img_s"),
            "paper_note": row.paper_note or None,
            "pareto_gflops": row.pareto_gflops,
            "pareto_throughput": row.pareto_throughput,
            "pareto_speedup": row.pareto_speedup,
            "variant": row.variant or None,
            "run_ids": " ".join(str(r.get("run_id")) for r in row.records),
        }
        for metric in METRICS:
            stat = row.stats.get(metric)
            values[metric] = None if stat is None else stat.mean
            values[f"{metric}_std"] = None if stat is None else stat.std
        out.append(values)
    return out


def write_csv(group: Group, path: Path) -> Path:
    """The group's table as CSV (empty cells for missing values), for spreadsheets and pandas."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for values in csv_rows(group):
            writer.writerow({k: "" if v is None else v for k, v in values.items()})
    return path


def _num(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _gflops(value: float | None) -> str:
    """Three decimals (the paper prints two), three significant digits for tiny models."""
    if value is None:
        return ""
    return format(value, ".3f" if value >= 0.1 else ".3g")


def _unreliable(row: Row) -> str:
    """A mark after a speedup of which some record's timed pairs disagreed or beat the FLOP limit
    (``measure/reliability.py``)."""
    bad = sum(r.get("metrics", {}).get("speedup_reliable") is False for r in row.records)
    return f" (unreliable in {bad} of {row.n})" if bad else ""


def _mean_std(stat: Stat | None, spec: str) -> str:
    if stat is None:
        return ""
    return format(stat.mean, spec) + ("" if stat.std is None else f" ± {format(stat.std, spec)}")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(group: Group) -> str:
    """The group's table in the paper's layout, ours beside the paper's, differences ours - paper."""
    header = [
        "Setting",
        "Method",
        "Top-1 (%)",
        "Top-5 (%)",
        "GFLOPs",
        "img/s",
        "Speedup",
        "Speedup / GFLOPs ratio",
        "n",
        "Paper",
        "Paper top-1",
        "Δ top-1",
        "Paper GFLOPs",
        "Δ GFLOPs",
        "Paper img/s",
        "Front (GFLOPs)",
        "Front (img/s)",
    ]
    show_variant = any(r.variant for r in group.rows)
    if show_variant:
        header.append("Variant")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes = []
    for row in group.rows:
        paper = ""
        if row.paper is not None:
            paper = f"T{row.paper.row['table']}"
        if row.paper_note:
            notes.append(row.paper_note)
            paper += f" [{len(notes)}]"
        method = row.method
        if row.weights and row.mean("acc1") is not None:
            method += " (random weights)" if row.weights == "random" else f" ({row.weights})"
        cells = [
            row.setting.label,
            method,
            _mean_std(row.stats.get("acc1"), ".2f"),
            _mean_std(row.stats.get("acc5"), ".2f"),
            _gflops(row.mean("gflops")),
            _mean_std(row.stats.get("throughput_img_s"), ".0f"),
            _mean_std(row.stats.get("speedup"), ".2f") + _unreliable(row),
            _mean_std(row.stats.get("speedup_over_flops_limit"), ".2f"),
            str(row.n),
            paper,
            _num(row.paper_value("acc_top1"), ".2f"),
            _num(row.diff("acc1", "acc_top1"), "+.2f"),
            _num(row.paper_value("gflops"), ".2f"),
            _num(row.diff("gflops", "gflops"), "+.3f"),
            _num(row.paper_value("throughput_img_s"), ".0f"),
            "★" if row.pareto_gflops else "",
            "★" if row.pareto_throughput else "",
        ]
        if show_variant:
            cells.append(row.variant)
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    lines += [f"\n[{i}] {_cell(note)}" for i, note in enumerate(notes, start=1)]
    return "\n".join(lines)


def error_summary(record: dict[str, Any], limit: int = 200) -> str:
    error = record.get("error") or {}
    message = str(error.get("message", "")).strip().splitlines()
    text = f"{error.get('type', 'error')}: {message[0] if message else ''}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def failed_table(records: Sequence[dict[str, Any]]) -> str:
    """The runs without a result, one line each with its status and error message."""
    header = ["Run", "When", "Status", "Task", "Model", "Method", "Setting", "Data", "Seed", "Error"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in records:
        try:
            label = record_setting(r).label
        except (KeyError, TypeError, ValueError):
            label = ""
        keys = ("run_id", "created_at", "status", "task", "model", "method")
        cells = [str(r.get(k, "")) for k in keys] + [
            label,
            str(r.get("data", "")),
            str(r.get("seed", "")),
            error_summary(r),
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)
