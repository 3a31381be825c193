"""Test set-up of the code sandbox: bubblewrap installed where it is missing and we may (root with
apt-get, as on a fresh CI machine; `make test` does the same), so the sandbox tests never skip there."""

from __future__ import annotations

import os
import shutil
import subprocess


def ensure_bwrap() -> str | None:
    """The bwrap path, installing Debian's `bubblewrap` first when missing and possible."""
    if shutil.which("bwrap") is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=False, capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "bubblewrap"], env=env, check=False, capture_output=True,
                       timeout=600)
    return shutil.which("bwrap")
