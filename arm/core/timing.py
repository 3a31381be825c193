"""Wall-clock time of a job's stages (data, SFT, merge, each evaluation), written beside its results.

A job keeps one ``StageClock``; each stage runs inside ``clock.stage(kind, name)`` and says whether it
built its output now or found it in the cache. ``write`` puts the records in ``<run dir>/stages.json``,
which ``python -m evals.stage_times`` (and ``make run``'s closing breakdown) reads back.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from arm.core.cache import atomic_write_json

STAGES_NAME = "stages.json"
KINDS = ("data", "sft", "merge", "eval")


def built_since(path: Path, start: float) -> bool:
    """True when ``path`` was written at or after ``start`` (epoch seconds): the stage built it now."""
    try:
        return os.stat(path).st_mtime >= start - 1.0  # mtime granularity on some filesystems
    except OSError:
        return False


class StageClock:
    """The stages of one job, in the order they ran: ``{"kind", "name", "start", "wall_s", "cached"}``."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    @contextmanager
    def stage(self, kind: str, name: str) -> Iterator[dict[str, Any]]:
        """Time the body; the body may set ``record["cached"]`` (default False: built now)."""
        if kind not in KINDS:
            raise ValueError(f"unknown stage kind {kind!r} (known: {', '.join(KINDS)})")
        record: dict[str, Any] = {"kind": kind, "name": str(name), "start": time.time(), "cached": False}
        began = time.perf_counter()
        try:
            yield record
        finally:
            record["wall_s"] = round(time.perf_counter() - began, 3)
            self.records.append(record)

    def write(self, run_dir: Path, **job: Any) -> Path:
        """``<run_dir>/stages.json``: ``{"job": {...labels, e.g. model, domain, merge}, "stages": [...]}``."""
        path = Path(run_dir) / STAGES_NAME
        atomic_write_json(path, {"job": job, "stages": self.records})
        return path
