"""Checks of config values that would otherwise fail only after minutes of work (issue 14).

``check_values(cfg)`` runs from ``arm.run.job.validate`` before any stage: each error names the
config key and the bad value. It also asks the code sandbox whether generated programs can run
isolated here (``evals.runner.code_isolation``): without bubblewrap a code domain stops now, naming
the fix, instead of after training a trajectory.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from arm.core.cache import to_plain
from arm.core.errors import ConfigError
from arm.trajectory.sft import resolve_sft_config
from evals.runner import code_isolation, task_specs

DEVICES = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
BATCH = re.compile(r"auto(:\d+)?")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Integer keys and their ranges, checked before any work: past them a library fails late (numpy seeds are
# 32-bit, lm-eval's limit and Python's slicing take what a C index holds). One row a key; each is tested.
RANGES: dict[str, tuple[int, int]] = {
    "seed": (0, 2**32 - 1),  # torch, numpy and lm-eval's seeds
    "eval.limit": (1, 10**9),  # documents (a fraction in (0, 1) is also accepted)
    "eval.batch_size": (1, 2**16),
    "eval.num_fewshot": (0, 10**4),
    "trajectory.early_steps": (0, 2**31 - 1),  # each step
    "trajectory.converged_step": (0, 2**31 - 1),
}


def _in_range(key: str, value: int) -> None:
    low, high = RANGES[key]
    if not low <= value <= high:
        raise ConfigError(key, f"{value} is out of range [{low}, {high}]")


def check_values(cfg: Mapping[str, Any]) -> None:
    seed = cfg.get("seed", 0)
    if not _is_int(seed):
        raise ConfigError("seed", f"expected an integer, got {seed!r}")
    _in_range("seed", seed)
    eval_cfg = cfg["eval"]
    limit = eval_cfg.get("limit")
    if limit is not None and not ((_is_int(limit) and limit >= 1) or (isinstance(limit, float) and 0 < limit < 1)):
        raise ConfigError("eval.limit", f"expected null, a number of documents >= 1 or a fraction in (0, 1), got {limit!r}")
    if _is_int(limit):
        _in_range("eval.limit", limit)
    batch = eval_cfg.get("batch_size", 16)
    if not ((_is_int(batch) and batch >= 1) or (isinstance(batch, str) and BATCH.fullmatch(batch))):
        raise ConfigError("eval.batch_size", f"expected an integer >= 1 or 'auto', got {batch!r}")
    if _is_int(batch):
        _in_range("eval.batch_size", batch)
    device = eval_cfg.get("device", "auto")
    if not (isinstance(device, str) and DEVICES.fullmatch(device)):
        raise ConfigError("eval.device", f"expected auto, cpu, cuda, cuda:<n> or mps, got {device!r}")
    threads = eval_cfg.get("num_threads", "auto")
    if not (threads in (None, "auto") or (_is_int(threads) and 1 <= threads <= 1024)):
        raise ConfigError("eval.num_threads", f"expected auto or an integer in [1, 1024], got {threads!r}")
    shots = eval_cfg.get("num_fewshot")
    if shots is not None and not (_is_int(shots) and shots >= 0):
        raise ConfigError("eval.num_fewshot", f"expected null or an integer >= 0, got {shots!r}")
    if shots is not None:
        _in_range("eval.num_fewshot", shots)
    early = to_plain((cfg.get("trajectory") or {}).get("early_steps"))
    if early is not None and not (isinstance(early, list) and early and all(_is_int(s) and s >= 0 for s in early)):
        raise ConfigError("trajectory.early_steps", f"expected null or a list of step numbers, e.g. [100,200], got {early!r}")
    for step in early or []:
        _in_range("trajectory.early_steps", step)
    converged = (cfg.get("trajectory") or {}).get("converged_step")
    if converged is not None and not (_is_int(converged) and converged >= 0):
        raise ConfigError("trajectory.converged_step", f"expected null or a step number, got {converged!r}")
    if converged is not None:
        _in_range("trajectory.converged_step", converged)
    check_tiny_schedule(cfg, early)


    code_isolation(task_specs(cfg["domain"]), eval_cfg)


def check_tiny_schedule(cfg: Mapping[str, Any], early: list[int] | None) -> None:
    """Where the tiny SFT loop will train the trajectory, its schedule is known now: merge inputs must be saved
    checkpoints before its last step (the last step is the converged SFT row, never a merge input)."""
    traj, model, domain = cfg.get("trajectory") or {}, cfg["model"], cfg["domain"]
    if traj.get("path") or model.get("arch") is None or not domain.get("synthetic"):
        return  # a Trainer folder or a real model: its steps are read from the folder
    sft = dict(to_plain(model.get("sft") or {}))
    steps = early if early is not None else sft.get("early_steps") or []
    sft["early_steps"] = []
    n_train = int(((domain.get("data") or {}).get("n_train")) or 0)
    try:
        resolved = resolve_sft_config(sft, n_train)
    except ValueError as err:  # names the model.sft key
        raise ConfigError("model.sft", str(err)) from None
    total, saved = resolved["total_steps"], resolved["save_steps"]
    key = "trajectory.early_steps" if early is not None else "model.sft.early_steps"
    late = [s for s in steps if s >= total]
    if late:
        raise ConfigError(key, f"step(s) {late} at or after the run's last step {total} (the converged SFT row; merge "
                               "inputs come before it)")
    unsaved = [s for s in steps if s not in saved]
    if unsaved:
        raise ConfigError(key, f"step(s) {unsaved} are not saved by the SFT run (model.sft.save_steps: {saved})")
