"""Hydra launcher `PerModelSlurmLauncher` (hydra/launcher=slurm, slurm_local): hydra-submitit-launcher's
SlurmLauncher, submitting one job array per distinct `model.slurm.job` resource spec. What it computes
(per-job resources, grouping, the sbatch flags) is in arm/run/slurm_launcher.py; docs there."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import OmegaConf

from arm.core.errors import ArmError
from arm.run.plan import JobPlan, format_arrays, job_plan, print_plans
from arm.run.slurm_launcher import explicit_launcher_keys, group_by_resources, job_resources, sbatch_resources

log = logging.getLogger(__name__)


# Slurm states in which a job has ended for good without a result: a job that exits with an error code
# (our `arm: error: ...` exits 2) writes no result file, and submitit's `results()` would first wait 15 s
# for one (a slow shared file system's grace) before it reports the job.
ENDED_WITHOUT_RESULT = ("FAILED", "CANCELLED", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE")
RESULT_GRACE_S = 2.0


def job_result(job: Any) -> JobReturn:
    """The job's JobReturn once it has ended (submitit's `results()`), or, for a job Slurm reports ended
    without a result, submitit's UncompletedJobError with its state and error stream after a grace of
    RESULT_GRACE_S instead of 15 s."""
    import time

    from submitit.core.utils import UncompletedJobError

    job.wait()  # its result file, or Slurm's accounting saying it has ended
    deadline = time.monotonic() + RESULT_GRACE_S
    while not job.paths.result_pickle.exists():
        state = (str(job.state).upper().split() or ["UNKNOWN"])[0]  # e.g. "CANCELLED by 0" -> CANCELLED
        if state not in ENDED_WITHOUT_RESULT:
            break  # ended another way (e.g. COMPLETED): submitit's own wait and message
        if time.monotonic() > deadline:
            stderr = job.stderr() or f"(empty; see {job.paths.stdout})"
            raise UncompletedJobError(f"Job {job.job_id} (task: {job.task_id}) with path {job.paths.result_pickle}\n"
                                      f"has not produced any output (state: {state})\nError stream produced:\n"
                                      f"{'-' * 40}\n{stderr}")
        time.sleep(0.2)
    return job.results()[0]


class PerModelSlurmLauncher(SlurmLauncher):
    """hydra-submitit-launcher's SlurmLauncher, one job array per distinct `model.slurm.job` spec."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.hydra_context is not None
        configs = [self.hydra_context.config_loader.load_sweep_config(self.config, list(o)) for o in job_overrides]
        explicit = explicit_launcher_keys(list(self.config.hydra.overrides.hydra))
        base = {k: v for k, v in self.params.items() if k not in ("submitit_folder", "max_num_timeout")}
        resources = [job_resources(base, cfg, explicit) for cfg in configs]
        groups = group_by_resources(resources)
        if any(bool(cfg.get("plan")) for cfg in configs):
            return self._plan(job_overrides, initial_job_idx, configs, groups)
        import submitit
        from hydra.core.singleton import Singleton
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

        init = {"folder": self.params["submitit_folder"]}
        if "max_num_timeout" in self.params:
            init["slurm_max_num_timeout"] = self.params["max_num_timeout"]
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init)
        baseparams = set(OmegaConf.structured(BaseQueueConf).keys())
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {sweep_dir}")

        jobs: dict[int, Any] = {}
        for res, members in groups:
            models = sorted({str(configs[i].model.name) for i in members})
            params = {(k if k in baseparams else f"{self._EXECUTOR}_{k}"): v for k, v in res.items()}
            if len(models) == 1:
                params["name"] = f"{res.get('name') or 'arm'}-{models[0]}"
            executor.update_parameters(**params)
            log.info("job array for %s (%d job(s)): %s", ", ".join(models), len(members), sbatch_resources(res))
            job_params = []
            for i in members:
                idx = initial_job_idx + i
                log.info(f"\t#{idx} : {' '.join(filter_overrides(job_overrides[i]))}")
                job_params.append((list(job_overrides[i]), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
            for i, job in zip(members, executor.map_array(self, *zip(*job_params, strict=True)), strict=True):
                jobs[i] = job
        return [job_result(jobs[i]) for i in range(len(job_overrides))]

    def _plan(self, job_overrides, initial_job_idx, configs, groups) -> list[JobReturn]:
        plans = []
        for cfg in configs:
            try:
                plans.append(job_plan(cfg))
            except ArmError as exc:  # the job would stop with this error: say so, plan the others
                plans.append(JobPlan(str(cfg.model.name), str(cfg.domain.name), str(cfg.merge.name), "", error=str(exc)))
        print_plans(plans, [initial_job_idx + i for i in range(len(configs))])
        print(format_arrays(groups, configs, initial_job_idx))
        return [JobReturn(overrides=list(o), cfg=cfg, hydra_cfg=self.config, status=JobStatus.COMPLETED,
                          _return_value={"plan": plan.to_dict()}, task_name=str(self.config.hydra.job.name))
                for o, cfg, plan in zip(job_overrides, configs, plans, strict=True)]
