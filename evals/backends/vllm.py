"""vLLM through lm-eval (GPUs; on CPU in the `.venv-vllm` of `make vllm-cpu`, evals/vllm_worker.py).

The model config's `vllm:` block (tensor/data parallel sizes, memory share, context length per model
size) is the default; the eval config's `vllm:` block overrides it key by key."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

LM_EVAL_MODEL = "vllm"
NEUTRAL_SETTINGS = ("device",)
ENGINE_KEYS = ("tensor_parallel_size", "data_parallel_size", "gpu_memory_utilization", "max_model_len",
               "enforce_eager", "seed")


def model_args(model_path: Path, eval_cfg: Mapping[str, Any], model_cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    vllm_cfg = dict((model_cfg or {}).get("vllm") or {})
    vllm_cfg.update({k: v for k, v in (eval_cfg.get("vllm") or {}).items() if v is not None})
    args: dict[str, Any] = {"pretrained": str(model_path), "dtype": eval_cfg.get("dtype", "auto")}
    for key in ENGINE_KEYS:
        if vllm_cfg.get(key) is not None:
            args[key] = vllm_cfg[key]
    return args
