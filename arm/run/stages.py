"""The identity of each stage of a job: where its output is cached and under which content key
(evaluations, merges), the run's paths, and the checks of a config before any stage runs. Shared by
the job (arm/run/job.py) and its plan (arm/run/plan.py), which must agree on every key."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import evals
from arm.core import sandbox
from arm.core.cache import content_key, source_digest, to_plain
from arm.core.errors import ConfigError
from arm.core.refs import ModelRef, Trajectory
from arm.data.splits import DomainData
from arm.merge.engine import merge_identity, split_config, validate_merge_config
from arm.merge.registry import get_method
from arm.run.checks import check_values
from evals.backends import cache_settings, get_backend
from evals.runner import effective_eval_cfg, synthetic_templates, task_specs

EVALS_DIR = Path(evals.__file__).resolve().parent
EVAL_CODE = [EVALS_DIR / f for f in ("runner.py", "scoring.py", "tasks/utils.py", "tasks/code/utils.py")]


@dataclass(frozen=True)
class Paths:
    root: Path
    cache: Path
    run_dir: Path

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any], run_dir: Path | None = None) -> Paths:
        base = Path.cwd()
        try:
            from hydra.core.hydra_config import HydraConfig

            hydra_cfg = HydraConfig.get()
            base = Path(hydra_cfg.runtime.cwd)
            run_dir = run_dir or Path(hydra_cfg.runtime.output_dir)
        except (ImportError, ValueError):
            pass

        def absolute(p: str | Path) -> Path:
            p = Path(p).expanduser()
            return p if p.is_absolute() else base / p

        root = absolute(cfg["paths"]["root"])
        run_dir = absolute(run_dir) if run_dir else root / "runs" / "adhoc"
        return cls(root=root, cache=absolute(cfg["paths"]["cache"]), run_dir=run_dir)


def validate(cfg: Mapping[str, Any]) -> None:
    """Cheap checks of the composed config, before any work."""

    check_values(cfg)  # value types and ranges (eval.limit, seed, ...), and the code sandbox where tasks run code

    domain = cfg["domain"]
    specs = task_specs(domain)
    if domain.get("synthetic"):
        known = synthetic_templates()
        for spec in specs:
            if spec.name not in known:
                raise ConfigError("domain.tasks", f"unknown synthetic task '{spec.name}' (known: {', '.join(known)})")
    elif not (cfg.get("trajectory") or {}).get("path") and cfg["model"].get("arch") is not None:
        raise ConfigError("trajectory.path", f"the tiny model trains only on synthetic domains; '{domain['name']}' needs trajectory.path")
    split = cfg["eval"].get("split", "test")
    if split not in ("test", "validation"):
        raise ConfigError("eval.split", f"'{split}' is not one of: test, validation")
    if split == "validation" and not domain.get("synthetic"):
        # lm-eval's benchmark tasks (gsm8k, MATH-500, HumanEval, MBPP) are the test sets: selecting
        # hyperparameters on them would be tuning on test.
        raise ConfigError("eval.split", f"domain '{domain['name']}' has no validation split (its lm-eval tasks are the "
                                        "benchmarks' test sets); select hyperparameters on a synthetic domain or on a "
                                        "held-out task of your own")
    if cfg["logger"]["name"] not in ("wandb", "none"):
        raise ConfigError("logger.name", f"unknown logger '{cfg['logger']['name']}'")
    if cfg["merge"]["name"] != "none":

        try:
            validate_merge_config(cfg["merge"])
        except ValueError as exc:  # the engine's errors name the merge.* key
            raise ConfigError("merge", str(exc)) from exc
        window = cfg["merge"].get("window")
        inputs = (cfg.get("trajectory") or {}).get("early_steps") or (cfg["model"].get("sft") or {}).get("early_steps")
        if isinstance(window, int) and inputs and window > len(inputs):
            raise ConfigError("merge.window", f"{window} checkpoints asked for, but the merge has {len(inputs)} inputs "
                                              f"(trajectory.early_steps: {list(inputs)})")


def eval_key(model: ModelRef, cfg: Mapping[str, Any], data: DomainData | None) -> str:
    """The evaluation's content key: the model's key, every result-changing eval setting, the split, the
    tasks, the synthetic data's key (which covers the domain module and so its scorer), and the code of the
    runner, the scorers, the sandbox, the backend's entry and the task templates."""

    eval_cfg = effective_eval_cfg(cfg["eval"], cfg["domain"])  # = eval.* for domains without `generation:`
    settings = cache_settings(eval_cfg)  # every eval.* key but those the backend declares neutral (evals/backends)
    return content_key(
        "eval", model.key, settings, eval_cfg.get("split", "test"), to_plain(cfg["domain"].get("tasks")),
        data.key if data else None,
        source_digest(*EVAL_CODE, sandbox, get_backend(eval_cfg.get("backend", "hf"))),
        *[source_digest(f) for f in sorted((EVALS_DIR / "tasks").rglob("*.yaml"))],
    )


def eval_folder(model: ModelRef, cfg: Mapping[str, Any], data: DomainData | None, paths: Paths) -> Path:
    """Where the evaluation of `model` under this job's settings is cached (complete: results.json)."""
    key = eval_key(model, cfg, data)
    return paths.cache / "evals" / f"{cfg['model']['name']}-{cfg['domain']['name']}-{model.name}-{key}"


def merge_folder(trajectory: Trajectory, cfg: Mapping[str, Any], paths: Paths,
                 data: DomainData | None = None) -> tuple[str, Path]:
    """The merge's content key and cache folder (complete: merge_summary.json): the method's identity,
    the inputs' keys, the calibration data's key when the method's weights depend on it, and the code
    of whole-model methods."""

    merge_cfg = to_plain(cfg["merge"])
    name, params, _ = split_config(merge_cfg)
    method = get_method(name)
    key_parts: list[Any] = [merge_identity(merge_cfg), trajectory.base.key, [r.key for r in trajectory.early]]
    if data is not None and method.uses_calibration(params):
        key_parts.append({"calibration": data.key})
    key_parts.append({"code": source_digest(*method.code_modules())})  # the rule's (or ARM's) code and the engine's
    key = content_key("merge", *key_parts)
    return key, paths.cache / "merged" / f"{cfg['model']['name']}-{cfg['domain']['name']}-{merge_cfg['name']}-{key}"


def calibration_size(cfg: Mapping[str, Any]) -> int:
    """Records of a real domain's calibration set: 4 × merge.calibration.n_sequences (ARM samples from them)."""
    return int((cfg["merge"].get("calibration") or {}).get("n_sequences") or 128) * 4


def takes_calibration(merge_cfg: Mapping[str, Any]) -> bool:
    """Whether the configured merge's weights depend on calibration data (MergeMethod.uses_calibration)."""
    name, params, _ = split_config(to_plain(merge_cfg))
    return get_method(name).uses_calibration(params)


