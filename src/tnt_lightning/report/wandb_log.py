"""Log a written report to W&B: each table as a ``wandb.Table``, each plot as a ``wandb.Image``.

The project is the run loggers' (``conf/logger/wandb.yaml``) so reports sit beside the runs; the
mode is ``WANDB_MODE`` (offline by default: no account or network needed, ``wandb sync`` later).
wandb is imported only here, only when asked for.
"""

from __future__ import annotations

import os

from omegaconf import OmegaConf

from .budget import CONF
from .build import Report
from .tables import CSV_COLUMNS, csv_rows, error_summary


def wandb_project() -> str:
    """The W&B project the run loggers use."""
    return OmegaConf.load(CONF / "logger" / "wandb.yaml").wandb.project


def log_report(report: Report, group: str | None = None) -> str:
    """Log ``report`` to a new W&B run (job type ``report``); returns where the run was written."""
    import wandb

    mode = os.environ.get("WANDB_MODE", "offline")
    run = wandb.init(
        project=wandb_project(),
        mode=mode,
        dir=os.environ.get("TNT_ROOT", os.getcwd()),
        job_type="report",
        group=group,
        config={"out_dir": str(report.out_dir)},
    )
    try:
        logged = {}
        for g in report.groups:
            rows = csv_rows(g)
            logged[f"{g.slug}/table"] = wandb.Table(
                columns=list(CSV_COLUMNS), data=[[r[c] for c in CSV_COLUMNS] for r in rows]
            )
            for kind, path in report.files[g.slug].items():
                if kind != "csv":
                    logged[f"{g.slug}/{kind}"] = wandb.Image(str(path), caption=f"{g.title}: {kind}")
        if report.failed:
            logged["failed_runs"] = wandb.Table(
                columns=["run_id", "created_at", "task", "model", "method", "data", "seed", "error"],
                data=[
                    [
                        str(r.get(k))
                        for k in ("run_id", "created_at", "task", "model", "method", "data", "seed")
                    ]
                    + [error_summary(r)]
                    for r in report.failed
                ],
            )
        run.log(logged)
        return run.url if mode == "online" else run.dir
    finally:
        run.finish()
