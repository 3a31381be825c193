"""mergekit in its own virtual environment (it is never a dependency of this project).

``ensure_mergekit()`` creates ``benchmarks/.cache/mergekit-venv`` once (idempotent; the folder is
git-ignored): ``python -m venv``, then ``pip install torch==2.13.0`` first (the CPU build; an
unpinned torch would pull a multi-GB CUDA build), then ``pip install mergekit==0.1.5``. It returns
the path of the venv's ``mergekit-yaml``. Override the location with ``ARM_MERGEKIT_VENV``.

    python -m benchmarks.mergekit_env      # create it and print the mergekit-yaml path
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MERGEKIT_SPEC = "mergekit==0.1.5"
TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0")


def venv_dir() -> Path:
    return Path(os.environ.get("ARM_MERGEKIT_VENV", REPO / "benchmarks" / ".cache" / "mergekit-venv"))


def mergekit_yaml() -> Path:
    return venv_dir() / "bin" / "mergekit-yaml"


def _stamp() -> Path:
    return venv_dir() / ".arm-installed"


def ensure_mergekit(quiet: bool = True) -> Path:
    """Create the mergekit venv when missing; return its mergekit-yaml executable."""
    venv = venv_dir()
    stamp = _stamp()
    want = f"{TORCH_SPEC} {MERGEKIT_SPEC}\n"
    if stamp.is_file() and stamp.read_text() == want and mergekit_yaml().is_file():
        return mergekit_yaml()
    venv.parent.mkdir(parents=True, exist_ok=True)
    python = venv / "bin" / "python"
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    q = ["-q"] if quiet else []
    subprocess.run([str(python), "-m", "pip", "install", *q, TORCH_SPEC], check=True)
    subprocess.run([str(python), "-m", "pip", "install", *q, MERGEKIT_SPEC], check=True)
    if not mergekit_yaml().is_file():
        raise RuntimeError(f"{mergekit_yaml()} missing after installing {MERGEKIT_SPEC}")
    stamp.write_text(want)
    return mergekit_yaml()


if __name__ == "__main__":
    print(ensure_mergekit(quiet=False))
