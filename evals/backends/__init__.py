"""The registry of evaluation backends: ``conf/eval/<name>.yaml``'s ``backend:`` names a module
``evals/backends/<backend>.py``, which is its entry and defines:

- ``LM_EVAL_MODEL``: the model type lm-eval's ``simple_evaluate`` is given (``"hf"``, ``"vllm"``, ...);
- ``model_args(model_path, eval_cfg, model_cfg) -> dict``: lm-eval's ``model_args``;
- ``NEUTRAL_SETTINGS``: the ``eval.*`` keys that do not change a result (where it runs, what is logged).
  Every other key of the eval config enters the evaluation's cache key (``cache_settings``), so a new
  backend's settings can never be forgotten there.

The recipe for a new backend is in docs/extending.md.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from arm.core.cache import to_plain
from arm.core.errors import ConfigError

ENTRY = ("LM_EVAL_MODEL", "model_args", "NEUTRAL_SETTINGS")
COMMON_NEUTRAL = ("name", "log_samples", "unsafe_code_without_sandbox")
"""Keys of every eval config that do not change a result: the entry's label, whether per-document
samples are kept (both are kept by the project's evaluations), and the sandbox fallback (refused unless
set, recorded in results.json)."""


def get_backend(name: Any) -> ModuleType:
    """The registry entry of backend ``name``; an unknown name or an incomplete module is a ConfigError."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError("eval.backend", f"'{name}' is not a backend name")
    try:
        module = importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
        raise ConfigError("eval.backend", f"unknown backend '{name}' (no module evals/backends/{name}.py; "
                                          f"known: {', '.join(known_backends())})") from None
    missing = [attr for attr in ENTRY if not hasattr(module, attr)]
    if missing:
        raise ConfigError("eval.backend", f"evals/backends/{name}.py lacks {', '.join(missing)} (docs/extending.md)")
    return module


def known_backends() -> list[str]:
    from pathlib import Path

    return sorted(p.stem for p in Path(__file__).parent.glob("*.py") if p.stem != "__init__")


def cache_settings(eval_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The eval settings that enter an evaluation's cache key: every key but the backend's neutral ones."""
    cfg = dict(to_plain(eval_cfg))
    backend = get_backend(cfg.get("backend", "hf"))
    neutral = set(COMMON_NEUTRAL) | set(backend.NEUTRAL_SETTINGS)
    return {k: v for k, v in sorted(cfg.items()) if k not in neutral}
