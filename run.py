"""Entry point: ``python run.py [group=option ...] [key=value ...]`` (``-m`` for sweeps).

See README.md. ``python run.py --help`` lists the config groups; ``--cfg job`` prints the
composed config.
"""

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from tnt_lightning.config import UserError, check_added_keys, register_configs

CONF_DIR = Path(__file__).resolve().parent / "conf"

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict | None:
    from tnt_lightning.quiet import quiet

    quiet(cfg.get("verbose", False))
    hydra_cfg = HydraConfig.get()
    try:
        check_added_keys(list(hydra_cfg.overrides.task), cfg, str(CONF_DIR))
        from tnt_lightning.tasks import run_task

        return run_task(cfg)  # a sweep's table says what each job did (sweep_report.py)
    except UserError as e:
        # One clear line for what the user can fix; a sweep's other jobs still run (its table lists
        # the failed ones at the end), and HYDRA_FULL_ERROR=1 shows the traceback.
        if hydra_cfg.mode == RunMode.MULTIRUN or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    from tnt_lightning.sweep_keys import check_sweep_overrides

    try:  # a key override on a swept group, before Hydra composes the sweep (sweep_keys.py)
        sys.argv[1:] = check_sweep_overrides(sys.argv[1:], CONF_DIR)
    except UserError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    main()
