"""Typed specs: the resolved config, parsed once at the top of a job (arm/run) into what each layer
below needs. Nothing below arm/run sees a Hydra `DictConfig`; method parameters, eval settings and the
model/domain blocks stay plain mappings that their own module validates (a merge method its parameters,
an eval backend its settings, the SFT loop its `sft:` keys).

Which fields of a spec enter which cache key is declared here, once (`TrajectorySpec.key_parts`); the
other stage keys are in arm/run/stages.py (merge, evaluation) and arm/data/splits.py (data).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from arm.core.cache import to_plain
from arm.core.errors import ConfigError

SERVING_KEYS = ("vllm", "slurm", "shapes")
"""Blocks of a model config that say how it is served, scheduled or sized for memory, not what SFT trains:
outside the trajectory key (a memory share or a Slurm time limit must not retrain anything)."""


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """`override` over `base`, mappings merged key by key, everything else replaced (OmegaConf.merge's rule)."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def plain_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The job's config as plain, resolved mappings, without Hydra's own `hydra:` node (which a launcher's
    config carries, with values such as hydra.job.num that exist only once a job runs)."""
    return {str(k): to_plain(cfg[k]) for k in cfg if k != "hydra"}


def _int_or_none(value: Any, key: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, f"expected an integer or null, got {value!r}")
    return value


@dataclass(frozen=True)
class TrajectorySpec:
    """What a trajectory is: the model and domain blocks, the seed, and where it comes from (trained here,
    or read from an SFT output folder: `trajectory.*`)."""

    model: dict[str, Any]
    domain: dict[str, Any]
    seed: int = 0
    path: str | None = None            # trajectory.path: an SFT output folder (Trainer layout)
    base: str | None = None            # trajectory.base
    early_steps: list[int] | None = None  # trajectory.early_steps (None: model.sft.early_steps)
    converged_step: int | None = None  # trajectory.converged_step (None: the last checkpoint)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> TrajectorySpec:
        plain = plain_config(cfg)
        seed = plain.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError("seed", f"expected an integer, got {seed!r}")
        traj = plain.get("trajectory") or {}
        early = traj.get("early_steps")
        return cls(model=dict(plain["model"]), domain=dict(plain["domain"]), seed=seed,
                   path=str(traj["path"]) if traj.get("path") else None,
                   base=str(traj["base"]) if traj.get("base") else None,
                   early_steps=[int(s) for s in early] if early is not None else None,
                   converged_step=_int_or_none(traj.get("converged_step"), "trajectory.converged_step"))

    @property
    def model_name(self) -> str:
        return str(self.model.get("name", "model"))

    @property
    def domain_name(self) -> str:
        return str(self.domain.get("name", "domain"))

    @property
    def sft(self) -> dict[str, Any]:
        """model.sft merged with domain.sft (the domain wins)."""
        return deep_merge(self.model.get("sft") or {}, self.domain.get("sft") or {})

    def key_parts(self) -> list[Any]:
        """The fields that decide what SFT trains (the trajectory's content key): the model without its
        `sft:` block and its serving/scheduling blocks (SERVING_KEYS), the merged SFT keys without `early_steps` (which checkpoints feed the merge does not
        change the run), and the seed. The data's key, the base's key and the code join them in
        arm/trajectory/build.py."""
        model = {k: v for k, v in self.model.items() if k not in ("sft", *SERVING_KEYS)}
        sft = {k: v for k, v in self.sft.items() if k != "early_steps"}
        return [model, sft]
