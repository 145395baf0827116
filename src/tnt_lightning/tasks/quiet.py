"""One place that silences library banners and known-harmless warnings (``verbose=true`` keeps them).

What a run prints by default: Hydra's line per job, the framework's own log lines (warnings such
as "training backbone ... once" included), progress bars and the summary. Left out:

* Lightning's INFO lines ("GPU available", "LOCAL_RANK", the litlogger/litmodels tips), which
  also came twice: once through Lightning's own handler, once through Hydra's root handler;
* Lightning's "does not have many workers" hint (the embedded data are in memory, workers would
  only add start-up time), its "`srun` is available but not used" hint (a local run on a SLURM
  login node) and torch's LeafSpec FutureWarning raised inside Lightning;
* W&B's console output (the "anonymous setting" warning, the banner and the 25-line summary):
  the framework logs where each W&B run folder is instead (tasks/common.py).
"""

from __future__ import annotations

import logging
import os
import warnings

LIBRARY_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning")
HARMLESS_WARNINGS = (
    r".*does not have many workers.*",
    r".*isinstance\(treespec, LeafSpec\).*",
    r".*The `srun` command is available on your system but is not used.*",
)


def quiet(verbose: bool = False) -> None:
    """Silence what the module docstring lists, unless ``verbose``."""
    if verbose:
        return
    import lightning.pytorch  # noqa: F401  (its import sets its loggers' level: set ours after it)

    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.WARNING)
        if logger.handlers:
            logger.propagate = False  # its own handler prints what is left, once
    for message in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    # Lightning's WandbLogger always passes `anonymous`, which W&B warns about while it reads its
    # settings, before WANDB_SILENT applies: make its console silent from the start.
    wandb.termsetup(wandb.Settings(silent=True), None)


def epoch_of_total_bar():
    """Lightning's progress bar, with the epoch out of the total ("Epoch 3/10", counted from 1)."""
    from lightning.pytorch.callbacks import TQDMProgressBar

    class EpochOfTotalBar(TQDMProgressBar):
        def on_train_epoch_start(self, trainer, *args) -> None:
            super().on_train_epoch_start(trainer, *args)
            self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch + 1}/{trainer.max_epochs}")

    return EpochOfTotalBar()
