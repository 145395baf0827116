"""The command line: ``tnt-lightning [group=option ...] [key=value ...]`` (``-m`` for sweeps).

The same command as ``python run.py`` in the clone (a shim calling :func:`cli`), so an installed
wheel runs everything the clone does. The module is named ``run`` because Hydra names the job
after it: run folders (``<log_dir>/runs/<time>_run``) and SLURM job names stay as they were.
``--help`` lists the config groups; ``--cfg job`` prints the composed config.
"""

import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from .config import CONFIG_PACKAGE, check_added_keys, config_dir, register_configs
from .errors import UserError

register_configs()


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_PACKAGE}", config_name="config")
def main(cfg: DictConfig) -> dict | None:
    hydra_cfg = HydraConfig.get()
    try:
        check_added_keys(list(hydra_cfg.overrides.task), cfg, str(config_dir()))
        from .tasks import run_task

        return run_task(cfg)  # a sweep's table says what each job did (sweep_report.py)
    except UserError as e:
        # One clear line for what the user can fix; a sweep's other jobs still run (its table lists
        # the failed ones at the end), and HYDRA_FULL_ERROR=1 shows the traceback.
        if hydra_cfg.mode == RunMode.MULTIRUN or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def cli() -> None:
    """The console entry point: the sweep-key check, then Hydra."""
    from .tasks.sweep_keys import check_sweep_overrides

    try:  # a key override on a swept group, before Hydra composes the sweep (sweep_keys.py)
        sys.argv[1:] = check_sweep_overrides(sys.argv[1:], config_dir())
    except UserError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    main()


if __name__ == "__main__":
    cli()
