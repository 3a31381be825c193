"""lm-eval's Hugging Face backend (CPU or one GPU): the default on CPU machines."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

LM_EVAL_MODEL = "hf"
NEUTRAL_SETTINGS = ("device",)  # cpu or cuda: the same greedy outputs within float tolerance (tests/test_vllm.py)


def model_args(model_path: Path, eval_cfg: Mapping[str, Any], model_cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    return {"pretrained": str(model_path), "dtype": eval_cfg.get("dtype", "auto")}
