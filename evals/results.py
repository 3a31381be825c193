"""The results.json written for every evaluated model, and its reader.

One file per (model folder, evaluation setting). Schema version 1:

    schema_version   1
    name             row label: "base", "sft@<step>", "sft_converged", or the merge method's name
    label            (optional, merges) the job's `label`: the table's row label for this merge
    role             "reference" or "merge"
    method, params   the merge method and its parameters (null for references)
    model, domain    config names (model=..., domain=...)
    step             trajectory step of a reference checkpoint (null for base and merges)
    model_path       the evaluated folder
    split            "test" or "validation"
    metrics          {task: {"<metric>,<filter>": value, ..., "n": documents}}
    primary          {task: {"metric": "<metric>,<filter>", "value": v, "n": n}} (the table's cells)
    eval             backend, device, model_args, gen_kwargs per task, limit, num_fewshot, n_shot per task,
                     gen_kwargs_override (applied to every generate task), apply_chat_template, engine
                     (vllm: version, the settings read back from the engine, every SamplingParams; hf: null)
                     code_execution: how generated programs ran ("bwrap"; "none (eval.unsafe_code_without_sandbox=true)"
                     when the user opted out of isolation; null for tasks that run no code); dataset_source:
                     {task: {source, file, sha256, hub_dataset}} for tasks whose problems were read from a package
                     because the hub was unreachable (evals/offline_data.py), null otherwise
    wall_s           {"eval": s, "merge": s or null}
    git, versions, created, cache_key, config (the resolved Hydra config that produced it)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from arm.core.cache import atomic_write_json, read_json
from arm.core.errors import InputError
from arm.core.provenance import git_revision, now_iso, versions

SCHEMA_VERSION = 1
RESULTS_NAME = "results.json"
OPTIONAL: dict[str, tuple[type, ...]] = {
    "label": (str,),
    "step": (int, type(None)),
    "method": (str, type(None)),
    "params": (dict, type(None)),
    "model_path": (str,),
    "cache_key": (str, type(None)),
}
REQUIRED = {
    "schema_version": int,
    "name": str,
    "role": str,
    "model": str,
    "domain": str,
    "split": str,
    "metrics": dict,
    "primary": dict,
    "eval": dict,
    "wall_s": dict,
    "git": dict,
    "created": str,
    "config": dict,
}
ROLES = ("reference", "merge")


def build_result(
    *,
    name: str,
    role: str,
    model: str,
    domain: str,
    split: str,
    model_path: Path,
    evaluation: Mapping[str, Any],
    config: Mapping[str, Any],
    cache_key: str,
    step: int | None = None,
    method: str | None = None,
    params: Mapping[str, Any] | None = None,
    merge_wall_s: float | None = None,
) -> dict[str, Any]:
    result = {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "role": role,
        "method": method,
        "params": dict(params) if params is not None else None,
        "model": model,
        "domain": domain,
        "step": step,
        "model_path": str(model_path),
        "split": split,
        "metrics": evaluation["metrics"],
        "primary": evaluation["primary"],
        "eval": {k: evaluation.get(k) for k in ("backend", "device", "model_args", "gen_kwargs", "limit", "num_fewshot",
                                                  "n_shot", "gen_kwargs_override", "apply_chat_template", "engine",
                                                  "code_execution", "dataset_source", "num_threads")},
        "wall_s": {"eval": evaluation.get("eval_wall_s"), "merge": merge_wall_s},
        "git": git_revision(),
        "versions": evaluation.get("versions") or versions(),  # of the process that ran lm-eval
        "created": now_iso(),
        "cache_key": cache_key,
        "config": dict(config),
    }
    validate_result(result, source="<new result>")
    return result


def validate_result(result: Any, source: str | Path) -> dict[str, Any]:
    """Check the schema; errors name the file and the key."""
    if not isinstance(result, dict):
        raise InputError(f"{source}: a results file holds a JSON object, not {type(result).__name__}")
    for key, kind in REQUIRED.items():
        if key not in result:
            raise InputError(f"{source}: missing key '{key}'")
        if not isinstance(result[key], kind):
            raise InputError(f"{source}: key '{key}' should be {kind.__name__}, not {type(result[key]).__name__}")
    if result["schema_version"] != SCHEMA_VERSION:
        raise InputError(f"{source}: schema_version {result['schema_version']} is not {SCHEMA_VERSION}")
    for key, kinds in OPTIONAL.items():  # present in every result this project writes; null where allowed
        if key in result and not (isinstance(result[key], kinds) and not isinstance(result[key], bool)):
            names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
            raise InputError(f"{source}: key '{key}' should be {names}, not {result[key]!r}")
    if isinstance(result.get("step"), int) and result["step"] < 0:
        raise InputError(f"{source}: key 'step' is {result['step']}, not a step number")
    if result["role"] not in ROLES:
        raise InputError(f"{source}: key 'role' is '{result['role']}', not one of {ROLES}")
    for task, cell in result["primary"].items():
        if not isinstance(cell, dict) or not {"metric", "value", "n"} <= set(cell):
            raise InputError(f"{source}: key 'primary.{task}' needs metric, value and n")
        if not isinstance(cell["metric"], str):
            raise InputError(f"{source}: key 'primary.{task}.metric' should be str, not {cell['metric']!r}")
        if not isinstance(cell["n"], int) or isinstance(cell["n"], bool) or cell["n"] < 0:
            raise InputError(f"{source}: key 'primary.{task}.n' should be a number of documents, not {cell['n']!r}")
        if not isinstance(cell["value"], int | float) or isinstance(cell["value"], bool):
            raise InputError(f"{source}: key 'primary.{task}.value' is not a number")
        if not math.isfinite(cell["value"]):
            raise InputError(f"{source}: key 'primary.{task}.value' is {cell['value']} (not a finite score)")
    return result


def write_result(path: Path, result: Mapping[str, Any]) -> None:
    atomic_write_json(Path(path), result)


def load_result(path: Path) -> dict[str, Any]:
    return validate_result(read_json(Path(path)), source=path)


def find_result_files(paths: Iterable[Path]) -> list[Path]:
    """results.json files given directly or anywhere below the given folders."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            for p in sorted(p for p in path.rglob(RESULTS_NAME) if ".tmp-" not in str(p)):
                if not p.is_file():
                    raise InputError(f"{p}: a folder named {RESULTS_NAME}, not a results file")
                found.append(p)
        else:
            raise InputError(f"{path}: no such file or folder")
    return found


def load_results(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Load and de-duplicate results (the same evaluation copied into several run folders)."""
    files = find_result_files(paths)
    seen: dict[tuple, dict[str, Any]] = {}
    ordered: list[dict[str, Any]] = []
    for file in files:
        result = load_result(file)
        key = (result.get("cache_key") or str(file), result.get("label"))
        if key in seen:
            if seen[key]["primary"] != result["primary"]:  # one evaluation, two different numbers: which is right?
                raise InputError(f"{seen[key]['_file']} and {file}: two copies of one evaluation (cache key "
                                 f"{key[0]}) with different scores; remove the stale one")
            continue
        seen[key] = result
        result["_file"] = str(file)
        ordered.append(result)
    return ordered
