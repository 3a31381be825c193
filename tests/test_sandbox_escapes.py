"""The escape catalogue: hostile programs against the code sandbox (arm/core/sandbox.py, issue 14).

Each program attacks, and either scores 0 or is contained: the harness survives, nothing outside the
sandbox's own temp folder changes (canary files here, the project's files, the host's /tmp), no secret
of the parent's environment is readable, no connection reaches a listener on 127.0.0.1, no process
outlives the run. Containment checks run in the parent as test code against what the attack returns
(``loot``), so a check that passes is a statement about what the program could reach.
"""

from __future__ import annotations

import hashlib
import os
import resource
import secrets
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from arm.core import sandbox
from arm.core.sandbox import run_program
from tests.sandbox_setup import ensure_bwrap

ensure_bwrap()

ROOT = Path(__file__).resolve().parents[1]
SECRET = "arm-escape-secret-" + secrets.token_hex(8)
SOLUTION = "def f(x):\n    return x*3+2\n"
TESTS = ["assert f(3) == 11", "assert f(0) == 2"]


def _digest(paths: list[Path]) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else "missing" for p in paths}


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict]:
    """A secret in the parent's environment, canary files, a listener on 127.0.0.1; afterwards: all intact."""
    monkeypatch.setenv("ARM_TEST_TOKEN", SECRET)
    canary = tmp_path / "canary.txt"
    canary.write_text("canary")
    in_project = ROOT / "tests" / f".sandbox-canary-{secrets.token_hex(4)}"  # a file of the project's own folder
    in_project.write_text("project canary")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    before = _digest([in_project, canary])
    host_tmp = tmp_path / "host-tmp"  # the harness's temp folder: the sandbox needs none on the host
    host_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(host_tmp))
    yield {"canary": canary, "project": in_project, "port": listener.getsockname()[1], "pid": os.getpid(), "root": ROOT}
    with pytest.raises(TimeoutError):
        listener.accept()  # nothing connected
    listener.close()
    after = _digest([in_project, canary])
    in_project.unlink(missing_ok=True)
    assert after == before
    assert sorted(tmp_path.iterdir()) == [canary, host_tmp] and list(host_tmp.iterdir()) == []
    assert run_program(SOLUTION, TESTS).passed  # the harness still works


def _loot(attack: str, checks: list[str], timeout_s: float = 3.0) -> sandbox.SandboxResult:
    """Run ``attack`` (a program defining ``attack()``, returning what it got), then ``checks`` here."""
    return run_program(attack, ["loot = attack()", *checks], timeout_s=timeout_s, setup=f"SECRET = {SECRET!r}")


def _all_attempts(body: str) -> str:
    """A program whose ``attack()`` runs each line of ``body`` and collects results or error names."""
    lines = "\n".join(f"    try:\n        got.append(repr({line}))\n    except BaseException as e:\n"
                      f"        got.append(type(e).__name__)" for line in body.strip().splitlines())
    return f"import os, sys, socket, subprocess, signal, gc\ndef attack():\n    got = []\n{lines}\n    return got\n"


def test_reading_files_outside(world: dict) -> None:
    pid = world["pid"]
    program = _all_attempts(f"""
open({str(world['root'] / 'pyproject.toml')!r}).read()
open({str(world['project'])!r}).read()
open('/etc/passwd').read()
open('/etc/shadow').read()
open('/proc/{pid}/environ').read()
open('/proc/self/environ').read()
open('/proc/1/environ').read()
open({str(world['canary'])!r}).read()
open('/root/.bash_history').read()
os.listdir({str(world['root'])!r})
""")
    result = _loot(program, ["text = ' '.join(loot)", "assert SECRET not in text", "assert '[project]' not in text",
                             "assert 'root:' not in text and 'canary' not in text and 'Makefile' not in text",
                             "assert all(item.endswith('Error') for item in loot), loot"])
    assert result.passed, result


def test_parent_environment_is_not_inherited(world: dict) -> None:
    result = _loot("import os\ndef attack():\n    return dict(os.environ)\n",
                   ["assert SECRET not in str(loot) and set(loot) <= {'LC_ALL', 'PATH', 'PWD'}"])
    assert result.passed, result


def test_listing_root_shows_only_the_interpreter(world: dict) -> None:
    result = _loot("import os\ndef attack():\n    return sorted(os.listdir('/'))\n",
                   ["assert not {'etc', 'proc', 'sys', 'home', 'work', 'var', 'run', 'boot', 'mnt'} & set(loot), loot"])
    assert result.passed, result


def test_writing_renaming_deleting_outside(world: dict) -> None:
    canary = str(world["canary"])
    program = _all_attempts(f"""
open({canary!r}, 'w').write('owned')
os.rename({canary!r}, {canary!r} + '.moved')
os.remove({canary!r})
os.truncate({str(world['project'])!r}, 0)
os.remove({str(world['project'])!r})
open('/usr/lib/owned', 'w').write('x')
open('/owned', 'w').write('x')
open('/dev/owned', 'w').write('x')
os.mkdir('/tmp/ok') or 'made'
open('/tmp/ok/inside', 'w').write('allowed inside its own /tmp')
""")
    result = _loot(program, ["assert all(item.endswith('Error') for item in loot[:8]), loot", "assert loot[8:] == [repr('made'), '27'], loot"])
    assert result.passed, result


def test_network_to_a_local_listener(world: dict) -> None:
    program = _all_attempts(f"""
socket.create_connection(('127.0.0.1', {world['port']}), timeout=0.5).sendall(b'owned')
socket.create_connection(('localhost', {world['port']}), timeout=0.5)
socket.getaddrinfo('example.com', 80)
""")
    result = _loot(program, ["assert all(item.endswith('Error') or item == 'gaierror' for item in loot), loot"])
    assert result.passed, result


def test_fork_loop_subprocess_and_setsid_children(world: dict) -> None:
    marker = secrets.randbelow(10**6)
    program = _all_attempts(f"""
[os.fork() for _ in range(10000)]
subprocess.run(['/bin/sh', '-c', 'sleep 60.{marker} &'])
os.system('sleep 60.{marker}')
os.posix_spawn('/usr/bin/sleep', ['sleep', '60.{marker}'], {{}})
os.setsid() or os.fork()
__import__('threading').Thread(target=lambda: None).start()
""")
    # threads of the program's own process are allowed (seccomp lets clone through with CLONE_THREAD only)
    result = _loot(program, ["assert [loot[0], loot[1], loot[3]] == ['PermissionError'] * 3 and loot[2] != '0', loot",
                             "assert loot[4] == 'PermissionError' and loot[5] == 'None', loot"])
    assert result.passed, result
    assert f"sleep 60.{marker}" not in os.popen("ps -eo args").read()  # nothing outlives the run


def test_a_thread_bomb_is_bounded_by_the_address_space(world: dict) -> None:
    """Threads may start (a correct program may use them), but each reserves stack in the capped address space:
    starting them without end fails inside the program, and the sandbox ends with the run."""
    program = ("import threading, time\ndef f(x):\n    n = 0\n    try:\n        while True:\n"
               "            threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n            n += 1\n"
               "    except RuntimeError:\n        return n\n")
    result = run_program(program, ["assert 0 < f(0) < 10000"], timeout_s=5.0)
    assert result.passed, result


def test_fork_bomb_at_import_is_contained(world: dict) -> None:
    result = run_program("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n", TESTS,
                         timeout_s=1.0)
    assert result.status == "timeout"


def test_killing_the_parent_and_everything_visible(world: dict) -> None:
    program = _all_attempts(f"""
os.kill({world['pid']}, signal.SIGKILL)
os.kill(os.getppid(), signal.SIGKILL)
os.killpg(0, signal.SIGKILL)
""")
    result = _loot(program, ["assert loot"])
    assert result.status in ("error", "passed", "failed", "timeout")  # it may kill its own sandbox; we live on
    assert run_program("import os, signal\nos.kill(-1, signal.SIGKILL)\n" + SOLUTION, TESTS).status in ("error", "passed")


@pytest.mark.parametrize("stream", ["os.write(1, chunk)", "os.write(2, chunk)", "sys.stdout.write(chunk.decode())"])
def test_huge_output_is_capped_while_reading(world: dict, stream: str) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    program = f"import os, sys\nchunk = b'x' * (1 << 20)\nfor _ in range(1024):\n    {stream}\n" + SOLUTION
    result = run_program(program, TESTS, timeout_s=10.0)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert not result.passed and len(result.output) <= sandbox.MAX_OUTPUT_CHARS and grown_mb < 64, (result, grown_mb)


@pytest.mark.parametrize("bomb", [
    "blob = bytearray(1 << 34)",
    "blob = []\nwhile True:\n    blob.append(bytearray(1 << 24))",
    "open('/tmp/fill', 'wb').write(b'x' * (1 << 28))",
    "n = 1\nfor _ in range(10 ** 9):\n    n *= 3",
    "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True:\n    pass",
    "import time\ntime.sleep(60)",
])
def test_memory_disk_and_time_bombs(world: dict, bomb: str) -> None:
    result = run_program(bomb + "\n" + SOLUTION, TESTS, timeout_s=1.5, memory_mb=256)
    assert not result.passed and result.status in ("error", "timeout"), result


def test_disabling_guards_through_closures_frames_gc_and_sys_modules(world: dict) -> None:
    """Everything in the child is reachable (frames, the runner's closures, gc, sys.modules) and none of
    it holds an expected value or decides a verdict: the best a program can do is return values."""
    program = (
        "import gc, sys, json\n"
        "frame = sys._getframe()\n"
        "while frame.f_back is not None:\n    frame = frame.f_back\n"
        "runner = frame.f_locals\n"
        "found = [o for o in gc.get_objects() if isinstance(o, str) and ('==' in o or 'assert' in o)]\n"
        "for o in gc.get_objects():\n"
        "    if callable(o) and getattr(o, '__name__', '') in ('send', 'encode', 'failure'):\n"
        "        try:\n            o.__code__ = (lambda *a, **k: None).__code__\n        except Exception:\n            pass\n"
        "sys.modules['json'].dumps = lambda *a, **k: '{\"value\": 11}'\n"
        "def f(x):\n    return found[0] if found else None\n"
    )
    result = run_program(program, TESTS)
    assert not result.passed and result.status in ("failed", "error", "timeout"), result


def test_forged_reports_and_always_equal_objects(world: dict) -> None:
    forged = (
        "import os\n"
        "for fd in range(3, 12):\n"
        "    try:\n        os.write(fd, b'{\"ready\": true}\\n{\"value\": 11}\\n{\"value\": 2}\\n{\"passed\": true}\\n')\n"
        "    except OSError:\n        pass\n"
        "def f(x):\n    return -1\n"
    )
    assert not run_program(forged, TESTS).passed
    always = "class Yes(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\ndef f(x):\n    return Yes(0)\n"
    assert run_program(always, TESTS).status == "error"
    str_sub = "class S(str):\n    def __eq__(self, other):\n        return True\ndef f(x):\n    return S('')\n"
    assert run_program(str_sub, TESTS).status == "error"
    exits = "import sys\ndef f(x):\n    sys.exit(0)\n"
    assert run_program(exits, TESTS).status == "error"
    raises_assertion_ok = "def f(x):\n    raise AssertionError('fine')\n"
    assert not run_program(raises_assertion_ok, TESTS).passed


def test_new_namespaces_mounts_and_tracing_are_refused(world: dict) -> None:
    program = _all_attempts("""
__import__('ctypes').CDLL(None, use_errno=True).unshare(0x10000000) or __import__('ctypes').get_errno()
__import__('ctypes').CDLL(None, use_errno=True).unshare(0x00020000) or __import__('ctypes').get_errno()
__import__('ctypes').CDLL(None, use_errno=True).mount(b'proc', b'/tmp', b'proc', 0, None) or __import__('ctypes').get_errno()
__import__('ctypes').CDLL(None, use_errno=True).ptrace(16, 1, 0, 0) or __import__('ctypes').get_errno()
""")
    result = _loot(program, ["assert loot == ['-1'] * 4, loot"])
    assert result.passed, result


@pytest.mark.parametrize(("program", "test", "why"), [
    ("def f(x):\n    return range(10**12)\n", "assert set(f(0)) == {1, 2}", "MemoryError"),  # memory in the tests
    ("def f(x):\n    return range(10**15)\n", "assert max(f(0)) == 3", "(judge process)"),  # work
    ("def f(x):\n    return 10**18\n", "assert 2 ** f(0) > 0", "(judge process)"),  # a small value, huge work
])
def test_the_programs_values_cannot_carry_unbounded_work_into_the_harness(world: dict, program: str, test: str,
                                                                          why: str) -> None:
    """The trusted tests run in a judge process with limits of its own: whatever they compute from the program's
    values, the harness's memory does not grow and the verdict comes in bounded time, as the program's error."""
    import time

    def rss_mib() -> float:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024

    before, start = rss_mib(), time.monotonic()
    result = run_program(program, [test], timeout_s=3.0)
    elapsed = time.monotonic() - start
    # a work bomb may also end as a MemoryError: Python sizes 2 ** 10**18 before computing it
    assert not result.passed and result.status == "error" and (why in result.detail or "MemoryError" in result.detail), result
    assert rss_mib() - before < 100 and elapsed < 3.0 + sandbox.JUDGE_WALL_S + 15, (rss_mib() - before, elapsed)
