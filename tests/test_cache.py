"""Content keys and atomic, build-once folders."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest

from arm.core.cache import build_once, content_key, read_json
from arm.core.errors import InputError


def test_content_key_is_order_independent_and_sensitive():
    assert content_key({"a": 1, "b": [1, 2]}) == content_key({"b": [1, 2], "a": 1})
    assert content_key({"a": 1}) != content_key({"a": 2})
    assert len(content_key("x")) == 16


def test_build_once_builds_then_reuses(tmp_path):
    calls = []

    def build(tmp: Path) -> None:
        calls.append(tmp)
        (tmp / "out.txt").write_text("done")

    final = tmp_path / "stage"
    assert build_once(final, build) is True
    assert build_once(final, build) is False
    assert len(calls) == 1
    assert (final / "out.txt").read_text() == "done"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_failed_build_leaves_nothing(tmp_path):
    def build(tmp: Path) -> None:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("boom")

    final = tmp_path / "stage"
    with pytest.raises(RuntimeError):
        build_once(final, build)
    assert not final.exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def _slow_build(final: str) -> None:
    def build(tmp: Path) -> None:
        (tmp / "half.txt").write_text("half")
        time.sleep(60)

    build_once(Path(final), build)


def test_killed_build_leaves_nothing_at_final_path_and_is_redone(tmp_path):
    final = tmp_path / "stage"
    proc = mp.get_context("fork").Process(target=_slow_build, args=(str(final),))
    proc.start()
    deadline = time.time() + 20
    while not [p for p in tmp_path.iterdir() if ".tmp-" in p.name] and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert not final.exists()
    assert build_once(final, lambda tmp: (tmp / "ok").write_text("1")) is True
    assert (final / "ok").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name], "stale temporary folder not cleaned"


def _racer(final: str, log: str) -> None:
    def build(tmp: Path) -> None:
        with open(log, "a") as fh:
            fh.write("built\n")
        time.sleep(0.5)
        (tmp / "x").write_text("1")

    build_once(Path(final), build)


def test_concurrent_builders_build_once(tmp_path):
    final, log = tmp_path / "stage", tmp_path / "log.txt"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_racer, args=(str(final), str(log))) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert log.read_text().count("built") == 1
    assert (final / "x").exists()


def test_read_json_names_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="bad.json"):
        read_json(bad)
    with pytest.raises(InputError, match="missing.json"):
        read_json(tmp_path / "missing.json")
