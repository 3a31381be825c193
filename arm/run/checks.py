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
from evals.runner import code_isolation, task_specs

DEVICES = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
BATCH = re.compile(r"auto(:\d+)?")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_values(cfg: Mapping[str, Any]) -> None:
    seed = cfg.get("seed", 0)
    if not _is_int(seed):
        raise ConfigError("seed", f"expected an integer, got {seed!r}")
    eval_cfg = cfg["eval"]
    limit = eval_cfg.get("limit")
    if limit is not None and not ((_is_int(limit) and limit >= 1) or (isinstance(limit, float) and 0 < limit < 1)):
        raise ConfigError("eval.limit", f"expected null, a number of documents >= 1 or a fraction in (0, 1), got {limit!r}")
    batch = eval_cfg.get("batch_size", 16)
    if not ((_is_int(batch) and batch >= 1) or (isinstance(batch, str) and BATCH.fullmatch(batch))):
        raise ConfigError("eval.batch_size", f"expected an integer >= 1 or 'auto', got {batch!r}")
    device = eval_cfg.get("device", "auto")
    if not (isinstance(device, str) and DEVICES.fullmatch(device)):
        raise ConfigError("eval.device", f"expected auto, cpu, cuda, cuda:<n> or mps, got {device!r}")
    shots = eval_cfg.get("num_fewshot")
    if shots is not None and not (_is_int(shots) and shots >= 0):
        raise ConfigError("eval.num_fewshot", f"expected null or an integer >= 0, got {shots!r}")
    early = to_plain((cfg.get("trajectory") or {}).get("early_steps"))
    if early is not None and not (isinstance(early, list) and early and all(_is_int(s) and s >= 0 for s in early)):
        raise ConfigError("trajectory.early_steps", f"expected null or a list of step numbers, e.g. [100,200], got {early!r}")
    converged = (cfg.get("trajectory") or {}).get("converged_step")
    if converged is not None and not (_is_int(converged) and converged >= 0):
        raise ConfigError("trajectory.converged_step", f"expected null or a step number, got {converged!r}")


    code_isolation(task_specs(cfg["domain"]), eval_cfg)
