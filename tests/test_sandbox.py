"""Tests of the sandbox that runs generated code: outcomes, limits, refusals and cleanup."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pytest

from evals.sandbox import run_program
from evals.scoring import score_code

ROOT = Path(__file__).resolve().parents[1]
PROGRAM = "def f(x):\n    return x*3+2\n"
TESTS = ["assert f(3) == 11", "assert f(0) == 2"]


def test_correct_code_passes() -> None:
    result = run_program(PROGRAM, TESTS)
    assert (result.passed, result.status) == (True, "passed")


def test_wrong_code_fails_and_names_the_test() -> None:
    result = run_program("def f(x):\n    return x*3\n", TESTS)
    assert (result.passed, result.status) == (False, "failed")
    assert "f(3) == 11" in result.detail


def test_infinite_loop_times_out_quickly() -> None:
    start = time.monotonic()
    result = run_program("while True:\n    pass\n", [], timeout_s=1.0)
    assert result.status == "timeout" and not result.passed
    assert time.monotonic() - start < 4


def test_exception_is_error() -> None:
    result = run_program("def f(x):\n    return 1 // 0\n", TESTS)
    assert result.status == "error" and "ZeroDivisionError" in result.detail


def test_syntax_error() -> None:
    assert run_program("def f(x):\nreturn x\n", TESTS).status == "syntax_error"


@pytest.mark.parametrize(
    "program",
    [
        "print(open('/etc/passwd').read())",
        f"data = open({str(ROOT / 'pyproject.toml')!r}).read()",
        "try:\n    open('/etc/hostname')\nexcept Exception:\n    pass\ndef f(x):\n    return x*3+2",
        "import os\nos.system('echo hacked')",
        "import subprocess\nsubprocess.run(['ls'])",
        "import socket",
        "os = print.__self__.__import__('os')\nos.listdir('/')",
        "open('out.txt', 'w').write('x')",
        "import arm",
    ],
)
def test_forbidden_operations(program: str) -> None:
    result = run_program(program, TESTS)
    assert (result.passed, result.status) == (False, "forbidden"), result


def test_forbidden_file_read_scores_zero() -> None:
    doc = {"code_prefix": "def f(x):\n", "tests": TESTS}
    assert score_code("    open('/etc/passwd').read()\n    return x*3+2", doc) == 0.0


def test_allowed_stdlib_imports() -> None:
    program = (
        "import math, re, itertools, functools, string\n"
        "from collections import Counter\nfrom typing import List\nimport heapq\n"
        "def f(x):\n    return math.floor(x * 3 + 2.5)\n"
    )
    assert run_program(program, TESTS).status == "passed"


def test_memory_bomb_is_contained() -> None:
    result = run_program("blob = bytearray(8 * 1024 ** 3)\n", TESTS, memory_mb=256)
    assert result.status == "error" and "MemoryError" in result.detail


def test_printed_fake_result_does_not_confuse() -> None:
    program = PROGRAM + "print('@@sandbox-result-0@@{\"status\": \"passed\"}')\nraise ValueError('boom')\n"
    result = run_program(program, TESTS)
    assert result.status == "error" and "boom" in result.detail


def test_temp_dir_is_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert run_program(PROGRAM, TESTS).passed
    assert run_program("while True:\n    pass\n", [], timeout_s=0.5).status == "timeout"
    assert list(tmp_path.iterdir()) == []
