"""Run untrusted generated Python against unit tests in a separate, restricted process.

``run_program`` starts ``python -I -S`` (isolated mode: no site-packages, no project packages, no
``PYTHON*`` variables, no script directory on ``sys.path``) in a fresh empty temporary directory
with an almost empty environment, and feeds it the program and tests on stdin. The child runner:

1. pre-imports a few harmless stdlib modules and sets resource limits (address space, CPU seconds,
   file size 0, few file descriptors, no new processes);
2. compiles the program (``syntax_error`` if that fails) and the tests;
3. sends ``print`` output to a capped buffer and moves fd 1 to ``/dev/null``, keeping a private
   duplicate for the result;
4. installs an audit hook that refuses file opens, ``os.*`` calls (system, exec, spawn, fork,
   remove, rename, chdir, listdir ...), subprocesses, sockets, ctypes and imports outside an
   allowlist; any refused event makes the result ``forbidden`` even if the program caught the error;
5. runs the program, then each test; prints one result line ``<nonce><json>`` and exits.

The parent kills the whole process group at the wall-clock limit (``timeout``) and removes the
temporary directory. Limits are set by the runner before any untrusted code runs rather than in a
``preexec_fn``: ``preexec_fn`` is unsafe when the caller has threads (``score_code_batch`` and the
lm-eval process do), and without it ``subprocess`` can use its faster ``vfork`` path.

This is a guard against accidents of model-written code (loops, memory blow-ups, stray file or
process access), not a security boundary against a determined adversary.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

STATUSES: tuple[str, ...] = ("passed", "failed", "timeout", "error", "syntax_error", "forbidden")

PRELOADED_MODULES: tuple[str, ...] = ("math", "itertools", "functools", "collections", "string", "re")
"""Imported by the runner before the audit hook; the program may import them."""

LAZY_MODULES: tuple[str, ...] = (
    "cmath", "operator", "heapq", "bisect", "typing", "fractions", "decimal", "statistics", "random",
    "copy", "dataclasses", "enum", "numbers", "array", "abc",
)  # fmt: skip
"""Also allowed: imported on first use, with the audit hook trusting the import machinery meanwhile."""

MAX_OUTPUT_CHARS = 4096
"""Captured ``print`` output kept per run (the rest is dropped)."""

MAX_DETAIL_CHARS = 1000

_RUNNER = r"""
import sys, os, json, resource, builtins
import math, itertools, functools, collections, collections.abc, string, re

def _main():
    payload = json.loads(sys.stdin.buffer.read().decode("ascii"))
    token = payload["token"]
    allowed = frozenset(payload["preloaded"]) | frozenset(payload["lazy"])
    result_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)

    def report(status, detail, output=""):
        line = token + json.dumps({"status": status, "detail": detail[:1000], "output": output})
        os.write(result_fd, ("\n" + line + "\n").encode("ascii", "backslashreplace"))
        os._exit(0)

    memory = payload["memory_bytes"]
    cpu = payload["cpu_s"]
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (16, 16))
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    try:
        program = compile(payload["program"], "<program>", "exec")
    except (SyntaxError, ValueError) as error:
        report("syntax_error", f"{type(error).__name__}: {error}")
    try:
        tests = [(src, compile(src, "<test>", "exec")) for src in payload["tests"]]
    except (SyntaxError, ValueError) as error:
        report("error", f"a test does not compile: {type(error).__name__}: {error}")

    class Sink:
        def __init__(self, limit):
            self.parts, self.size, self.limit = [], 0, limit
        def write(self, text):
            text = str(text)
            if self.size < self.limit:
                self.parts.append(text[: self.limit - self.size])
                self.size += len(self.parts[-1])
            return len(text)
        def flush(self):
            pass
        def text(self):
            return "".join(self.parts)

    sink = Sink(payload["max_output"])
    sys.stdout = sys.stderr = sink
    refused = []
    trusted = [False]
    real_import = builtins.__import__
    blocked_prefixes = (
        "os.", "subprocess.", "socket.", "shutil.", "ctypes.", "pty.", "fcntl.", "mmap.", "resource.",
        "signal.", "gc.", "glob.", "tempfile.", "urllib.", "http.", "ftplib.", "smtplib.", "webbrowser.",
        "sqlite3.", "syslog.", "winreg.", "msvcrt.", "_winapi.", "cpython.", "sys.addaudithook",
        "sys.settrace", "sys.setprofile", "sys._current_frames", "sys.remote_exec",
    )

    def refuse(what):
        if not refused:
            refused.append(what)
        raise PermissionError(f"sandbox: {what} is not allowed")

    def hook(event, args):
        if trusted[0]:
            return
        if event == "open":
            refuse(f"open({args[0]!r})")
        if event == "import":
            if str(args[0]).partition(".")[0] not in allowed:
                refuse(f"import {args[0]}")
            return
        if event.startswith(blocked_prefixes):
            refuse(event)

    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level != 0 or name.partition(".")[0] not in allowed:
            refuse(f"import {name}")
        if name in sys.modules:
            return real_import(name, globals, locals, fromlist, level)
        trusted[0] = True
        try:
            return real_import(name, globals, locals, fromlist, level)
        finally:
            trusted[0] = False

    safe_builtins = dict(builtins.__dict__)
    safe_builtins["__import__"] = guarded_import
    namespace = {"__name__": "__main__", "__builtins__": safe_builtins}
    sys.addaudithook(hook)

    status, detail = "passed", f"{len(tests)} tests passed"
    try:
        exec(program, namespace)
    except BaseException as error:
        status, detail = "error", f"program raised {type(error).__name__}: {error}"
    if status == "passed":
        for src, code in tests:
            try:
                exec(code, namespace)
            except AssertionError:
                status, detail = "failed", f"failed: {src}"
                break
            except BaseException as error:
                status, detail = "error", f"{src}: {type(error).__name__}: {error}"
                break
    if refused:
        status, detail = "forbidden", f"refused {refused[0]}"
    report(status, detail, sink.text())

_main()
"""

_ENV = {"LC_ALL": "C.UTF-8", "PATH": "/usr/bin:/bin"}


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run: ``passed`` only when every test passed."""

    passed: bool
    status: str
    detail: str
    output: str = ""


def run_program(
    program: str, tests: list[str], timeout_s: float = 3.0, memory_mb: int = 512
) -> SandboxResult:
    """Run ``program`` then each ``assert`` line of ``tests`` in a restricted child process.

    ``status`` is one of ``STATUSES``. ``timeout_s`` bounds wall-clock time (the process group is
    killed) and, rounded up, CPU time; ``memory_mb`` bounds the child's address space.
    """
    if timeout_s <= 0 or memory_mb <= 0:
        raise ValueError(f"timeout_s and memory_mb must be positive, got {timeout_s}, {memory_mb}")
    token = f"@@sandbox-result-{secrets.token_hex(12)}@@"
    payload = json.dumps(
        {
            "program": program,
            "tests": list(tests),
            "token": token,
            "preloaded": PRELOADED_MODULES,
            "lazy": LAZY_MODULES,
            "memory_bytes": int(memory_mb) * 1024 * 1024,
            "cpu_s": max(1, math.ceil(timeout_s)),
            "max_output": MAX_OUTPUT_CHARS,
        },
        ensure_ascii=True,
    ).encode("ascii")
    workdir = tempfile.mkdtemp(prefix="arm-sandbox-")
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _RUNNER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=workdir,
            env=_ENV,
            start_new_session=True,
            close_fds=True,
        )
        try:
            out, err = proc.communicate(payload, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.communicate()
            return SandboxResult(False, "timeout", f"killed after the wall-clock limit of {timeout_s:g} s")
        finally:
            _kill_group(proc.pid)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return _parse(out, err, proc.returncode, token)


def _kill_group(pid: int) -> None:
    """Kill the child's whole process group (it leads its own session); gone already is fine."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _parse(out: bytes, err: bytes, returncode: int, token: str) -> SandboxResult:
    """Read the runner's result line; without one, explain from the exit status."""
    marker = token.encode("ascii")
    for line in reversed(out.splitlines()):
        if line.startswith(marker):
            try:
                data = json.loads(line[len(marker) :].decode("ascii"))
                status, detail, output = str(data["status"]), str(data["detail"]), str(data["output"])
            except (ValueError, KeyError, TypeError):
                break
            if status not in STATUSES:
                break
            return SandboxResult(status == "passed", status, detail, output)
    if returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return SandboxResult(False, "timeout", f"killed by signal {-returncode} (CPU limit)")
    tail = err.decode("utf-8", "replace")[-MAX_DETAIL_CHARS:]
    return SandboxResult(
        False, "error", f"runner exited with status {returncode} and no result; stderr: {tail}"
    )
