"""lm-eval's task index, and the check of a real domain's tasks against it (before any SFT or model loading).

The index maps each task name to its YAML file, for lm-eval's built-in tasks and evals/tasks/code/; it is
built once per installed lm-eval and kept on disk. Its own module, not evals/runner.py: the evaluation's
cache key digests the runner's code (arm/run/stages.py EVAL_CODE), and neither the index nor the check
changes what an evaluation scores, so editing them must not re-key every cached evaluation.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arm.core.cache import file_lock
from arm.core.errors import ConfigError
from arm.core.provenance import versions

log = logging.getLogger(__name__)

CODE_TASK_DIR = Path(__file__).resolve().parent / "tasks" / "code"
"""lm-eval tasks of the real code domain scored by the project's sandbox (humaneval_sandboxed, mbpp_sandboxed)."""

_LM_EVAL_INDEX: dict[str, Any] = {}
INDEX_ENV = "ARM_LM_EVAL_INDEX"
"""The folder of the on-disk copy of lm-eval's task index (default: $XDG_CACHE_HOME/arm, else ~/.cache/arm)."""


@dataclass(frozen=True)
class IndexedTask:
    yaml_path: str


@dataclass(frozen=True)
class TaskIndex:
    """Task name -> its YAML file, for lm-eval's built-in tasks and evals/tasks/code/ (what the real-task
    check reads of lm-eval's TaskManager; only tasks defined by a YAML file are kept)."""

    task_index: dict[str, IndexedTask]
    source: str  # "built" (by lm-eval's TaskManager in this process) or the file it was read from


def _index_file() -> Path:
    """Where this lm-eval's index is kept: its name carries lm-eval's version and install folder and the
    names, sizes and modification times of evals/tasks/code/'s files (not the bytecode Python writes
    there), so any change builds a new one."""
    import hashlib
    import importlib.metadata

    import lm_eval

    parts = [importlib.metadata.version("lm_eval"), str(Path(lm_eval.__file__).resolve().parent)]
    for f in sorted(CODE_TASK_DIR.rglob("*")):
        if f.is_file() and "__pycache__" not in f.relative_to(CODE_TASK_DIR).parts:  # not Python's bytecode
            st = f.stat()
            parts.append(f"{f.relative_to(CODE_TASK_DIR)}:{st.st_size}:{st.st_mtime_ns}")
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    folder = os.environ.get(INDEX_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "arm"
    return Path(folder) / f"lm_eval-task-index-{digest}.json"


def lm_eval_task_index() -> TaskIndex:
    """lm-eval's task index over its built-in tasks and evals/tasks/code/, built once per installed
    lm-eval (and evals/tasks/code/): lm-eval's TaskManager reads ~14k task YAMLs (10-20 s on a small
    machine), so the result is kept in a JSON file (:func:`_index_file`) and read back in ~0.04 s.
    Offline either way. A file that cannot be read or written is rebuilt or skipped, never an error."""
    if "index" in _LM_EVAL_INDEX:
        return _LM_EVAL_INDEX["index"]
    path = _index_file()
    index = _read_index(path)
    if index is None:
        lock_path = path.with_name(path.name + ".lock")  # concurrent jobs: one builds, the others wait and read
        try:
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            lock_path.touch()
            lock: Any = file_lock(lock_path)
        except OSError:  # a read-only cache folder: build in this process, without the file
            lock = contextlib.nullcontext()
        with lock:
            index = _read_index(path) or _build_index(path)
    _LM_EVAL_INDEX["index"] = index
    return index


def _read_index(path: Path) -> TaskIndex | None:
    try:
        tasks = json.loads(path.read_text())["tasks"]
        return TaskIndex({name: IndexedTask(str(p)) for name, p in tasks.items()}, str(path))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _build_index(path: Path) -> TaskIndex:
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(CODE_TASK_DIR))
    tasks = {name: str(entry.yaml_path) for name, entry in manager.task_index.items()
             if getattr(entry, "yaml_path", None) is not None}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"lm_eval": versions().get("lm_eval"), "tasks": tasks}))
        os.replace(tmp, path)  # atomic: a concurrent reader sees no file or the whole file
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        log.warning("lm-eval's task index not saved to %s (%s): it is built again next time", path, err)
    return TaskIndex({name: IndexedTask(p) for name, p in tasks.items()}, "built")


def task_metric_keys(task_config: Mapping[str, Any]) -> list[str]:
    """The "<metric>,<filter>" keys lm-eval reports for a task, from its YAML config (includes resolved):
    every metric of `metric_list` under every filter of `filter_list` ("none" without one). A metric
    given as `!function module.fn` is named `fn`, as lm-eval names it."""
    metrics = [str(m["metric"]).rsplit(".", 1)[-1] if "/" in str(m["metric"]) else str(m["metric"])
               for m in task_config.get("metric_list") or []]
    filters = [f["name"] for f in task_config.get("filter_list") or []] or ["none"]
    return [f"{m},{f}" for m in metrics for f in filters]


def check_real_tasks(specs: Sequence[Any], *, unsafe_code: bool, manager: Any = None) -> None:
    """A real domain's tasks against the installed lm-eval, before any SFT or model loading: each exists
    (lm-eval's built-in tasks or evals/tasks/code/), generates text, reports the configured metric key,
    and runs unisolated code only with domain.unsafe_code=true. Raises ConfigError naming every problem.
    `specs`: evals.runner.TaskSpec's (a name and a metric key each; not imported: the runner imports this)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    manager = manager if manager is not None else lm_eval_task_index()
    problems = []
    for spec in specs:
        entry = manager.task_index.get(spec.name)  # a TaskIndex or lm-eval's TaskManager
        if entry is None or entry.yaml_path is None:
            problems.append(f"the installed lm-eval ({versions().get('lm_eval', '?')}) has no task '{spec.name}'")
            continue
        config = load_yaml(entry.yaml_path, resolve_func=False)
        if config.get("output_type") != "generate_until":
            problems.append(f"task '{spec.name}' is not a generation task (output_type {config.get('output_type')!r})")
        keys = task_metric_keys(config)
        if spec.key not in keys:
            problems.append(f"task '{spec.name}' reports no metric '{spec.key}' (it reports {keys})")
        if config.get("unsafe_code") and not unsafe_code:
            problems.append(f"task '{spec.name}' runs generated code unisolated: set domain.unsafe_code=true to allow "
                            "it, or use its sandboxed variant (evals/tasks/code/)")
    if problems:
        raise ConfigError("domain.tasks", "; ".join(problems))
