"""Slurm launcher with per-model resources (hydra/launcher=slurm and slurm_local).

hydra-submitit-launcher submits a sweep as ONE job array with ONE resource spec, so a sweep over model
sizes would ask the 14B's resources for the 1.7B's jobs (or the reverse). This launcher is that
launcher with one change: each job's resources come from its own composed config, and the jobs are
submitted as one job array per distinct resource spec.

Resources of one job, later entries winning:
1. the launcher preset (conf/hydra/launcher/slurm.yaml: partition, cpus_per_task, mem_gb, ...);
2. the job's `model.slurm.job` block (conf/model/qwen3-*.yaml): any of RESOURCE_KEYS;
3. `hydra.launcher.<key>=...` given on the command line: the same value for every job of the sweep.

With `plan=true` nothing is submitted: the launcher prints every job's stages (arm/run/plan.py) and the
job arrays with the sbatch resources it would submit.

The launcher class itself is hydra_plugins/arm_launcher/launcher.py (Hydra accepts launchers only from
the `hydra_plugins` package); this module holds what it computes, importable without Hydra's plugins.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import OmegaConf

from arm.core.errors import ConfigError

# Launcher keys a model's `slurm.job` block may set (the sbatch resources of hydra-submitit-launcher).
RESOURCE_KEYS = ("partition", "qos", "account", "constraint", "gres", "nodes", "tasks_per_node", "gpus_per_node",
                 "gpus_per_task", "cpus_per_task", "cpus_per_gpu", "mem_gb", "mem_per_gpu", "mem_per_cpu", "timeout_min")
# How sbatch spells them (for the plan's listing; submitit writes the script itself).
SBATCH_FLAGS = {"partition": "--partition", "qos": "--qos", "account": "--account", "constraint": "--constraint",
                "gres": "--gres", "nodes": "--nodes", "tasks_per_node": "--ntasks-per-node",
                "gpus_per_node": "--gpus-per-node", "gpus_per_task": "--gpus-per-task", "cpus_per_task": "--cpus-per-task",
                "cpus_per_gpu": "--cpus-per-gpu", "mem_gb": "--mem", "mem_per_gpu": "--mem-per-gpu",
                "mem_per_cpu": "--mem-per-cpu", "timeout_min": "--time"}


def explicit_launcher_keys(hydra_overrides: Sequence[str]) -> set[str]:
    """Launcher keys set on the command line (`hydra.launcher.mem_gb=96` -> {"mem_gb"})."""
    keys = set()
    for override in hydra_overrides:
        key = str(override).split("=", 1)[0].lstrip("+~")
        if key.startswith("hydra.launcher."):
            keys.add(key[len("hydra.launcher."):].split(".")[0])
    return keys


def model_resources(job_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The job's `model.slurm.job` block, checked (unknown keys name the config key)."""
    model = job_cfg.get("model") or {}
    slurm = model.get("slurm") or {}
    block = slurm.get("job") or {}
    block = OmegaConf.to_container(block, resolve=True) if OmegaConf.is_config(block) else dict(block)
    unknown = sorted(set(block) - set(RESOURCE_KEYS))
    if unknown:
        raise ConfigError("model.slurm.job", f"unknown key(s) {unknown} in {model.get('name')}'s block; known: {list(RESOURCE_KEYS)}")
    return block


def job_resources(launcher_params: Mapping[str, Any], job_cfg: Mapping[str, Any], explicit: set[str]) -> dict[str, Any]:
    """The launcher's parameters for one job: the preset, then model.slurm.job, then the command line."""
    out = dict(launcher_params)
    for key, value in model_resources(job_cfg).items():
        if key not in explicit:
            out[key] = value
    return out


def group_by_resources(resources: Sequence[Mapping[str, Any]]) -> list[tuple[dict[str, Any], list[int]]]:
    """[(resources, [job positions])], one entry per distinct resource spec, in order of first appearance."""
    groups: dict[str, tuple[dict[str, Any], list[int]]] = {}
    for i, res in enumerate(resources):
        spec = {k: res.get(k) for k in RESOURCE_KEYS}
        groups.setdefault(repr(sorted(spec.items())), (dict(res), []))[1].append(i)
    return list(groups.values())


def sbatch_resources(res: Mapping[str, Any]) -> str:
    """`--gpus-per-node=1 --cpus-per-task=8 --mem=64GB --time=480` for the keys that are set."""
    parts = []
    for key in RESOURCE_KEYS:
        value = res.get(key)
        if value is None or (key in ("nodes", "tasks_per_node") and value == 1):
            continue
        parts.append(f"{SBATCH_FLAGS[key]}={value}{'GB' if key == 'mem_gb' else ''}")
    return " ".join(parts)
