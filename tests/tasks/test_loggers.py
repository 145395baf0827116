"""A logger that cannot start still leaves a failed record; one that fails to close fails no run."""

from __future__ import annotations

import logging

from helpers import COST_ONLY, run_py
from tnt_lightning.results import read_records
from tnt_lightning.tasks.common import close_logger


def test_a_logger_that_cannot_start_still_leaves_a_failed_record(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    proc = run_py(["logger=csv", f"logger.csv.save_dir={blocker}", *COST_ONLY[:2]], tmp_path, timeout=300)
    assert proc.returncode != 0
    (record,) = read_records(tmp_path / "results")
    assert record["status"] == "failed" and "not_a_folder" in record["error"]["message"]


def test_a_logger_that_fails_to_close_does_not_fail_the_run(caplog):
    class DeadService:
        save_dir = "/somewhere/wandb"

        def finalize(self, status):
            raise ConnectionResetError("wandb-core is gone")

    with caplog.at_level(logging.WARNING):
        close_logger(DeadService())
    assert "did not close cleanly" in caplog.text and "/somewhere/wandb" in caplog.text
