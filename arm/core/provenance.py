"""Where a number came from: git revision, library versions, time."""

from __future__ import annotations

import datetime as dt
import functools
import importlib.metadata
import subprocess

from arm.core.paths import SOURCE_ROOT

REPO_ROOT = SOURCE_ROOT


@functools.cache
def git_revision() -> dict:
    """The repository's HEAD and whether the work tree had changes (None outside a checkout)."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    revision = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"revision": revision, "dirty": bool(status) if status is not None else None}


def versions() -> dict:
    names = ["arm-harness", "torch", "transformers", "lm_eval", "safetensors", "hydra-core", "vllm"]
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
