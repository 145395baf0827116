"""Reports from ``results.jsonl`` alone (no W&B account needed): the paper's tables and figures.

* :func:`build_report` writes ``results.md``, one CSV per table (model x data x schedule: settings x
  methods with top-1, GFLOPs, throughput, the paper's printed cell and the difference) and the
  top-1 vs GFLOPs / throughput plots with the Pareto front (:func:`pareto_front`).
* :func:`match_budget` finds, per method, the keep rate whose exact GFLOPs just fit a target, so
  methods can be compared at equal cost instead of at hand-tuned rates.

* :mod:`.pages` writes the docs site's results pages from committed result data (the bench's JSON,
  the study's report tables), with the command, commit and machine that produced it.

Command line: ``python -m tnt_lightning.report --help`` (and ``... report budget --help``,
``python -m tnt_lightning.report.pages --help``).
"""

from .budget import BudgetMatch, format_matches, match_budget
from .build import Report, build_report
from .tables import ReportError, pareto_front

__all__ = [
    "BudgetMatch",
    "Report",
    "ReportError",
    "build_report",
    "format_matches",
    "match_budget",
    "pareto_front",
]
