"""Entry point: ``python run.py [group=option ...] [key=value ...]`` (``-m`` for sweeps).

See README.md. ``python run.py --help`` lists the config groups; ``--cfg job`` prints the
composed config.
"""

import hydra
from omegaconf import DictConfig

from tnt_lightning.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from tnt_lightning.quiet import quiet
    from tnt_lightning.tasks import run_task

    quiet(cfg.get("verbose", False))

    run_task(cfg)


if __name__ == "__main__":
    main()
