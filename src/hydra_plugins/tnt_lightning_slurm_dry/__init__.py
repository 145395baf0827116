"""``hydra/launcher=slurm_dry``: print the exact SLURM submission of a sweep instead of submitting it.

It takes the same settings as ``hydra/launcher=slurm`` (src/hydra_plugins/tnt_lightning_slurm),
makes the same checks (what sbatch would refuse fails here with the reason), and renders the
sbatch file that submitit would submit for the sweep's job array, with each job's overrides.
Nothing is pickled or submitted, and no SLURM installation is needed (``make slurm-dry``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, filter_overrides

from hydra_plugins.tnt_lightning_slurm import TntSlurmLauncher

# hydra-submitit's generic names -> sbatch's (as submitit's SlurmExecutor translates them).
GENERIC_TO_SBATCH = {
    "name": "job_name",
    "timeout_min": "time",
    "mem_gb": "mem",
    "gpus_per_node": "gpus_per_node",
    "tasks_per_node": "ntasks_per_node",
    "cpus_per_task": "cpus_per_task",
    "nodes": "nodes",
}
NOT_SBATCH = ("submitit_folder", "max_num_timeout")


class SlurmDryLauncher(TntSlurmLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from submitit.slurm.slurm import _convert_mem, _make_sbatch_string

        self.check()
        params: dict[str, Any] = {
            GENERIC_TO_SBATCH.get(k, k): v for k, v in self.params.items() if k not in NOT_SBATCH
        }
        params["mem"] = _convert_mem(params["mem"]) if params.get("mem") is not None else None
        folder = Path(str(self.params["submitit_folder"]))
        if len(job_overrides) > 1:
            params["map_count"] = len(job_overrides)
        command = f"{sys.executable} -u -m submitit.core._submit {folder}"
        script = _make_sbatch_string(command=command, folder=folder, **params)
        lines = [
            f"# slurm dry run: {len(job_overrides)} job(s) of sweep dir {self.config.hydra.sweep.dir}",
            f"# (an array of {len(job_overrides)}, at most {params.get('array_parallelism')} at a time);"
            " nothing was submitted",
            f"# requeued up to {self.params['max_num_timeout']} time(s) after a time-out and"
            f" {self.tnt_params['max_num_preempt']} after a preemption; USR2 {params['signal_delay_s']} s"
            f" before the limit (asked: {self.requested_signal_delay_s} s)",
        ]
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            lines.append(f"#   job {idx}: python run.py {' '.join(filter_overrides(overrides))}")
        print("\n".join([*lines, script]))
        return []
