"""Offline synthetic SFT domains (``math_synth``, ``code_synth``) and their JSONL split files.

Each generator module exposes ``DEFAULT_PARAMS`` and ``generate_splits(params, seed)`` returning
``{"train": [...], "validation": [...], "test": [...]}``; every record has ``id``, ``prompt`` (what
the model sees) and ``response`` (the SFT target, without EOS) plus the fields its scorer needs.
"""

from __future__ import annotations

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


def get_generator(name: str) -> ModuleType:
    """Return the generator module of a synthetic domain; unknown names raise ``ValueError``."""
    try:
        return DOMAINS[name]
    except KeyError:
        raise ValueError(f"unknown synthetic domain {name!r}; known domains: {', '.join(DOMAINS)}") from None


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
