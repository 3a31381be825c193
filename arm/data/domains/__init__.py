"""Offline synthetic SFT domains (``math_synth``, ``code_synth``) and their JSONL split files.

The registry of synthetic domains. A domain is one module ``arm/data/domains/<name>.py`` (found by
name, ``conf/domain/<name>.yaml``'s ``generator:``), which is its registry entry and holds:

- ``DEFAULT_PARAMS`` and ``generate_splits(params, seed)`` returning ``{"train": [...],
  "validation": [...], "test": [...]}``; every record has ``id``, ``prompt`` (what the model sees) and
  ``response`` (the SFT target, without EOS) plus the fields its scorer needs;
- ``METRIC`` and ``score(prediction, record) -> float``: the scorer, used by the lm-eval task's hook
  (evals/tasks/utils.py) and by the project's diagnostics alike;
- optionally ``chat_format(record) -> record`` for ``prompt_format: chat`` (formats.py).

Its lm-eval task template is ``evals/tasks/<name>.yaml``. The recipe: docs/extending.md.
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from arm.data.domains import code_synth, math_synth
from arm.data.domains.common import SPLITS

DOMAINS: dict[str, ModuleType] = {"math_synth": math_synth, "code_synth": code_synth}
ENTRY = ("DEFAULT_PARAMS", "generate_splits", "METRIC", "score")
"""What a domain module must define to be a registry entry."""


def get_generator(name: str) -> ModuleType:
    """The registry entry (module) of a synthetic domain, ``arm/data/domains/<name>.py``; an unknown
    name or an incomplete module raises ``ValueError`` naming what is missing."""
    module = DOMAINS.get(name) if isinstance(name, str) else None
    if module is None:
        if not isinstance(name, str) or not name.isidentifier() or name in ("common", "corpus", "formats"):
            raise ValueError(f"unknown synthetic domain {name!r}; known domains: {', '.join(DOMAINS)}")
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise ValueError(f"unknown synthetic domain {name!r}: no module arm/data/domains/{name}.py "
                             f"(known domains: {', '.join(DOMAINS)})") from None
        missing = [attr for attr in ENTRY if not hasattr(module, attr)]
        if missing:
            raise ValueError(f"synthetic domain module arm/data/domains/{name}.py lacks {', '.join(missing)} "
                             "(docs/extending.md, 'A synthetic domain')")
        DOMAINS[name] = module
    return module


def generate_splits(
    name: str, params: Mapping[str, Any] | None, seed: int
) -> dict[str, list[dict[str, Any]]]:
    """Generate the train/validation/test splits of domain ``name`` (deterministic in params and seed)."""
    return get_generator(name).generate_splits(params, seed)


def write_splits(splits: Mapping[str, list[dict[str, Any]]], out_dir: Path) -> dict[str, Path]:
    """Write ``<split>.jsonl`` for train, validation and test into ``out_dir``, each file atomically.

    Each file is written to a temporary file in ``out_dir`` and renamed into place, so a reader
    never sees a partial file. Returns the path of each split file.
    """
    if set(splits) != set(SPLITS):
        raise ValueError(f"write_splits needs exactly the splits {list(SPLITS)}, got {sorted(splits)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for split in SPLITS:
        path = out_dir / f"{split}.jsonl"
        fd, tmp_name = tempfile.mkstemp(prefix=f".{split}.", suffix=".jsonl.tmp", dir=out_dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
                for record in splits[split]:
                    handle.write(json.dumps(record, ensure_ascii=True) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        paths[split] = path
    return paths


def read_split(path: str | os.PathLike[str], fields: tuple[str, ...] = ("id", "prompt", "response")) -> list[dict[str, Any]]:
    """Read a JSONL split file (every record an object with ``fields``); a missing file or a bad line
    raises ``ValueError`` naming file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"split file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"split file {path} cannot be read: {error}") from error
    records: list[dict[str, Any]] = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"split file {path}, line {line_no}: invalid JSON ({error.msg})") from None
        if not isinstance(record, dict) or not set(fields) <= record.keys():
            raise ValueError(
                f"split file {path}, line {line_no}: expected an object with {', '.join(fields[:-1])} and {fields[-1]}"
            )
        records.append(record)
    return records


__all__ = ["DOMAINS", "generate_splits", "get_generator", "read_split", "write_splits"]
