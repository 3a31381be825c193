"""Tests of the sandbox that runs generated code: outcomes, limits, isolation, the parent-side verdict,
the refusal without isolation and the explicit opt-out (hostile programs: test_sandbox_escapes.py)."""

from __future__ import annotations

import logging
import os

import pytest

from arm.core import sandbox
from arm.core.sandbox import SandboxUnavailable, run_program
from evals.scoring import score_code
from tests.sandbox_setup import ensure_bwrap

ensure_bwrap()

PROGRAM = "def f(x):\n    return x*3+2\n"
TESTS = ["assert f(3) == 11", "assert f(0) == 2"]


def test_bubblewrap_isolation_is_available_here() -> None:
    """CI installs bubblewrap (Makefile `sandbox`, tests/sandbox_setup.py): the sandbox must work there."""
    assert sandbox.isolation() == sandbox.ISOLATED


def test_correct_code_passes() -> None:
    assert run_program(PROGRAM, TESTS) == sandbox.SandboxResult(True, "passed", "2 tests passed", "")


def test_wrong_code_fails_and_names_the_test() -> None:
    result = run_program("def f(x):\n    return x*3\n", TESTS)
    assert (result.passed, result.status) == (False, "failed")
    assert "f(3) == 11" in result.detail


def test_infinite_loop_times_out() -> None:
    result = run_program("while True:\n    pass\n", [], timeout_s=1.0)  # returns only because the limit fired
    assert result.status == "timeout" and not result.passed


def test_loop_inside_a_call_times_out() -> None:
    result = run_program("def f(x):\n    while True:\n        pass\n", TESTS, timeout_s=1.0)
    assert result.status == "timeout"


def test_exception_is_error() -> None:
    result = run_program("def f(x):\n    return 1 // 0\n", TESTS)
    assert result.status == "error" and "ZeroDivisionError" in result.detail


def test_syntax_error() -> None:
    assert run_program("def f(x):\nreturn x\n", TESTS).status == "syntax_error"


def test_program_output_is_kept_capped() -> None:
    result = run_program("print('hello')\nprint('x' * 100000)\n" + PROGRAM, TESTS)
    assert result.passed and result.output.startswith("hello\n") and len(result.output) == sandbox.MAX_OUTPUT_CHARS


@pytest.mark.parametrize(
    ("value", "expected"),
    [("3", "3"), ("3.0", "3"), ("True", "1"), ("(1, [2.5, 'a'], {3: None})", "(1, [2.5, 'a'], {3: None})"),
     ("{1, 2}", "{2, 1}"), ("b'ab'", "b'ab'"), ("1+2j", "complex(1, 2)"), ("range(3)", "range(0, 3)"),
     ("float('inf')", "float('inf')"), ("10**30", "10**30"), ("frozenset({1})", "frozenset([1])")],
)
def test_values_cross_with_python_equality(value: str, expected: str) -> None:
    """The parent compares plain copies of the returned values with Python's own ``==``."""
    assert run_program(f"def f():\n    return {value}\n", [f"assert f() == {expected}"]).passed


@pytest.mark.parametrize(("value", "expected"), [("[1, 2]", "(1, 2)"), ("'3'", "3"), ("float('nan')", "float('nan')")])
def test_values_that_differ_in_python_differ_here(value: str, expected: str) -> None:
    assert run_program(f"def f():\n    return {value}\n", [f"assert f() == {expected}"]).status == "failed"


def test_arguments_keywords_helpers_and_values_of_the_program() -> None:
    program = "import math\nSCALE = 2\ndef g(x):\n    return x + 1\ndef f(x, *, k=0, fn=None):\n    return fn(x) * SCALE + k\n"
    tests = ["assert f(1, k=3, fn=g) == 7", "assert SCALE == 2", "assert math.isclose(g(0.5), 1.5)"]
    assert run_program(program, tests).passed


def test_objects_of_other_types_cannot_be_compared() -> None:
    program = "class P:\n    pass\ndef f():\n    return P()\n"
    result = run_program(program, ["assert f() != 1"])
    assert result.status == "error" and "cannot be compared" in result.detail


def test_builtins_win_over_the_programs_names() -> None:
    program = "def abs(x):\n    return 0\ndef f(x):\n    return x\n"
    assert run_program(program, ["assert abs(f(5) - 1) < 1e-6"]).status == "failed"


def test_setup_runs_here_and_the_entry_point_comes_from_the_program() -> None:
    setup = "def helper(x):\n    return x * 10\ndef f(x):\n    '''stub'''\n"
    program = setup + "    return x + 1\ndef helper(x):\n    return 0\n"
    assert run_program(program, ["assert helper(f(1)) == 20"], setup=setup, entry_point="f").passed


def test_memory_bomb_is_contained() -> None:
    result = run_program("blob = bytearray(8 * 1024 ** 3)\n", TESTS, memory_mb=256)
    assert result.status == "error" and "MemoryError" in result.detail


def test_printed_fake_result_does_not_confuse() -> None:
    program = PROGRAM + "print('{\"ready\": true}')\nraise ValueError('boom')\n"
    result = run_program(program, TESTS)
    assert result.status == "error" and "boom" in result.detail


def test_the_program_runs_as_nobody_without_network_processes_or_files() -> None:
    program = (
        "import os, socket\n"
        "def ids():\n    return [os.getuid(), os.getgid()]\n"
        "def net():\n    return [name for _, name in socket.if_nameindex()]\n"
        "def root():\n    return sorted(os.listdir('/'))\n"
        "def env():\n    return dict(os.environ)\n"
        "def fork():\n    try:\n        os.fork()\n    except OSError as e:\n        return e.errno\n"
    )
    tests = ["assert ids() == [65534, 65534]", "assert net() == ['lo']", "assert not {'etc', 'proc', 'sys', 'home', 'var', 'work', 'run'} & set(root())",
             "assert set(env()) <= {'LC_ALL', 'PATH', 'PWD'}", "import errno\nassert fork() == errno.EPERM"]
    result = run_program(program, tests)
    assert result.passed, result


def test_score_code_scores_through_the_sandbox() -> None:
    doc = {"code_prefix": "def f(x):\n", "tests": TESTS}
    assert score_code("    return x*3+2", doc) == 1.0
    assert score_code("    open('/etc/passwd').read()\n    return x*3+2", doc) == 0.0  # no /etc in the sandbox


def test_without_isolation_it_refuses_naming_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    sandbox.allow_unsafe_execution(False)
    with pytest.raises(SandboxUnavailable, match=r"apt-get install bubblewrap.*eval\.unsafe_code_without_sandbox=true"):
        run_program(PROGRAM, TESTS)


def test_explicit_opt_out_runs_unisolated_with_a_warning(monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    monkeypatch.setattr(sandbox, "_warned", False)
    sandbox.allow_unsafe_execution(True)
    try:
        with caplog.at_level(logging.WARNING, logger="arm.core.sandbox"):
            assert sandbox.isolation() == sandbox.UNISOLATED
            assert run_program(PROGRAM, TESTS).passed
            assert run_program("def f(x):\n    return 0\n", TESTS).status == "failed"
        assert "WITHOUT OS isolation" in caplog.text
    finally:
        sandbox.allow_unsafe_execution(False)


def test_a_huge_program_is_an_error() -> None:
    assert run_program("x = 1\n" * 300000 + PROGRAM, TESTS).status == "error"


def test_start_up_time_does_not_count_against_the_program(monkeypatch: pytest.MonkeyPatch) -> None:
    """A loaded machine can take seconds to start the sandbox: the limit times the program (as code_eval's)."""
    real = sandbox.bwrap_argv
    monkeypatch.setattr(sandbox, "bwrap_argv", lambda *a: ["/bin/sh", "-c", 'sleep 1; exec "$@"', "sh", *real(*a)])
    assert run_program(PROGRAM, TESTS, timeout_s=0.5).passed


def test_a_sandbox_that_cannot_start_is_an_error_not_a_failed_program(monkeypatch: pytest.MonkeyPatch) -> None:
    assert sandbox.isolation() == sandbox.ISOLATED
    monkeypatch.setattr(sandbox, "bwrap_argv", lambda bwrap, fd: [bwrap, "--no-such-option"])
    with pytest.raises(sandbox.SandboxStartError, match="the sandbox did not start"):
        run_program(PROGRAM, TESTS)


def test_a_passing_programs_short_output_is_kept() -> None:
    """Buffered output of a program that passes reaches the result (flushed before each reply)."""
    result = run_program("print('hello from the program')\n" + PROGRAM, TESTS)
    assert result.passed and "hello from the program" in result.output, result


def test_module_objects_of_the_program_are_never_imported_by_their_name(capsys: pytest.CaptureFixture) -> None:
    """A program binding names to module objects named after modules with side effects ('this' prints the Zen,
    'unittest.__main__' runs test discovery and exits): the harness imports nothing by their say-so."""
    import sys

    program = ("import types\nf = types.ModuleType('this')\nmath = types.ModuleType('unittest.__main__')\n"
               "string = types.ModuleType('antigravity')\n")
    before = {"this", "unittest.__main__", "antigravity"} & set(sys.modules)
    result = run_program(program, ["assert f is not None", "assert math.pi > 3"])
    assert not result.passed and result.status == "error" and "NameError" in result.detail, result
    assert "Beautiful is better than ugly" not in capsys.readouterr().out
    assert {"this", "unittest.__main__", "antigravity"} & set(sys.modules) == before
    # a module the tests may use, imported by the program under its own name, is the parent's own import
    ok = run_program("import math\ndef f(x):\n    return math.sqrt(x)\n", ["assert math.isclose(f(16.0), 4.0)"])
    assert ok.passed, ok


def test_the_sandbox_sees_shared_libraries_not_the_folders_that_hold_them() -> None:
    """Outside the interpreter's own tree, every file a program can find is a shared library it may load
    (docs/security.md): /usr/lib's node modules, JVM or SDKs are not there; no /proc; the stdlib's C extensions work."""
    program = ("import os, sqlite3, ssl, ctypes, lzma, bz2, zlib, decimal\n"
               "def files(top):\n    out = []\n    for root, _, names in os.walk(top):\n"
               "        out += [os.path.join(root, n) for n in names]\n    return out\n"
               "def exists(path):\n    return os.path.exists(path)\n")
    tests = ["import re", "found = files('/usr') + files('/lib') + files('/etc') + files('/opt') + files('/home')",
             "assert found and all(re.search(r'(\\.so(\\.[0-9]+)*|ld-linux-x86-64\\.so\\.2|ld-linux-aarch64\\.so\\.1)$', p) "
             "for p in found), [p for p in found if not p.endswith('.so') and '.so.' not in p][:5]",
             "assert not exists('/proc/self') and not exists('/usr/lib/node_modules') and not exists('/usr/lib/jvm')"]
    result = run_program(program, tests)
    assert result.passed, result
    assert all(os.path.isfile(source) for source, _ in sandbox.shared_libraries())


def test_threads_of_the_program_run_and_processes_still_do_not() -> None:
    program = ("import threading, os\ndef f(x):\n    out = []\n"
               "    ts = [threading.Thread(target=lambda i=i: out.append(i * x)) for i in range(4)]\n"
               "    [t.start() for t in ts]\n    [t.join() for t in ts]\n    return sorted(out)\n"
               "def spawn():\n    try:\n        os.posix_spawn('/usr/bin/true', ['true'], {})\n"
               "    except OSError as e:\n        return e.errno\n")
    result = run_program(program, ["assert f(2) == [0, 2, 4, 6]", "import errno\nassert spawn() == errno.EPERM"])
    assert result.passed, result


def test_each_program_gets_a_sandbox_of_its_own_through_the_warm_pool() -> None:
    """The pool starts sandboxes ahead of need; each still runs one program and is killed after its verdict:
    a file, a global or a module attribute left by one program is not there for the next."""
    leave = ("import sys\nopen('/tmp/left', 'w').write('x')\nsys.left = 1\nLEFT = 1\n"
             "def f(x):\n    return x*3+2\n")
    look = ("import os, sys\ndef seen():\n    return [os.path.exists('/tmp/left'), hasattr(sys, 'left'), 'LEFT' in globals()]\n"
            + PROGRAM)
    for _ in range(3):  # the second and later programs come from the pool
        assert run_program(leave, TESTS).passed
        result = run_program(look, ["assert seen() == [False, False, False]", *TESTS])
        assert result.passed, result
    assert len(sandbox._POOL.ready) == sandbox.POOL_SIZE
    assert all(child.proc.poll() is None for child in sandbox._POOL.ready)


def test_a_waiting_sandbox_that_died_is_replaced_not_scored() -> None:
    assert run_program(PROGRAM, TESTS).passed
    for child in list(sandbox._POOL.ready):
        child.kill()  # ended from outside while waiting for a program
    assert run_program(PROGRAM, TESTS).passed
    assert all(child.proc.poll() is None for child in sandbox._POOL.ready)


def test_a_forked_process_starts_its_own_pool_and_leaves_the_parents_alone() -> None:
    assert run_program(PROGRAM, TESTS).passed
    parents = list(sandbox._POOL.ready)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its verdicts come from sandboxes of its own
        code = 1
        try:
            ok = run_program(PROGRAM, TESTS).passed and all(c not in sandbox._POOL.ready for c in parents)
            os.write(write_end, b"ok" if ok else b"no")
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    assert os.read(read_end, 16) == b"ok" and status == 0
    os.close(read_end)
    assert all(child.proc.poll() is None for child in parents)  # the child neither used nor killed them
    assert run_program(PROGRAM, TESTS).passed


def test_judges_are_forked_by_the_judge_server_not_by_the_harness() -> None:
    """A judge is a fork of the small judge server (via its watcher), not of the harness, which may hold lm-eval
    and a model: the trusted tests see a parent process other than the harness."""
    result = run_program(PROGRAM, ["import os", f"assert os.getppid() != {os.getpid()}", *TESTS])
    assert result.passed, result
    assert sandbox._JUDGES.proc is not None and sandbox._JUDGES.proc.poll() is None and not sandbox._JUDGES.disabled


def test_a_judge_server_that_died_is_started_again() -> None:
    assert run_program(PROGRAM, TESTS).passed
    old = sandbox._JUDGES.proc
    old.kill()
    old.wait()
    assert run_program(PROGRAM, TESTS).passed and not run_program("def f(x):\n    return x\n", TESTS).passed
    assert sandbox._JUDGES.proc is not old and sandbox._JUDGES.proc.poll() is None


def test_without_a_judge_server_the_harness_forks_its_judges(monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    broken = sandbox._JudgeServer()
    monkeypatch.setattr(sandbox, "_JUDGES", broken)
    monkeypatch.setattr(sandbox, "_SERVER", "import sys\nsys.exit(3)\n{root}{fd}")
    with caplog.at_level(logging.WARNING, logger="arm.core.sandbox"):
        results = [run_program(PROGRAM, ["import os", f"assert os.getppid() == {os.getpid()}", *TESTS]) for _ in range(2)]
    assert all(r.passed for r in results), results  # judged by forks of this process
    assert broken.disabled and "judge server failed" in caplog.text
    assert run_program("def f(x):\n    return range(10**15)\n", ["assert max(f(0)) == 3"]).detail.endswith("(judge process)")


def test_a_judge_past_its_wall_clock_limit_is_killed_with_its_watcher(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "JUDGE_WALL_S", 1.0)
    result = run_program(PROGRAM, ["import time", "time.sleep(30)"], timeout_s=0.5)
    assert (result.passed, result.status) == (False, "error")
    assert result.detail == "the tests' work on the program's values exceeded its wall-clock limit (judge process)"
    assert run_program(PROGRAM, TESTS).passed  # the server goes on
