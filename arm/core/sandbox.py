"""Run untrusted generated Python in an OS-isolated process; decide its verdict in the parent.

The boundary is the operating system, not the interpreter. Each program runs in its own process (started
ahead of need by ``_SandboxPool``, never shared) started by bubblewrap (``bwrap``, Debian package
``bubblewrap``) with:

- its own user, PID, network, IPC, UTS, cgroup and mount namespaces (``--unshare-all``), as uid and
  gid 65534 with no capabilities, in a new session, killed with the harness (``--die-with-parent``);
- a root that holds only read-only binds of what the interpreter needs (each shared library that the
  interpreter and its standard library's extension modules load — files, not the folders that hold
  them —, the interpreter and its standard library), four device nodes, no ``/proc``, and an empty
  private ``/tmp`` (a size-capped tmpfs) as its working folder; no network (only its own loopback), a clean
  environment (``LC_ALL`` and ``PATH`` only);
- resource limits set by the runner before any untrusted code runs: CPU seconds, address space,
  no new processes, file size, open files, no core files; and a wall-clock deadline (counted once the
  runner has set them, so a slow start-up is not the program's time) at which the parent kills the
  sandbox, whose PID namespace takes every process in it along. A sandbox that does not start raises
  ``SandboxStartError``: an infrastructure failure is never scored as a failed program.

The verdict is decided in the parent. The child only executes the program and then answers calls:
the parent runs the (trusted) test code, in a *judge* — a process that never runs program code, forked by
a small judge server (or, where that cannot run, by the harness itself), under its own address-space, CPU
and wall-clock limits, so that no value of the program can carry unbounded work or memory into the harness
(``_judge``, ``_JudgeServer``) — and every name the tests take from the program
(``f``, ``candidate``, a helper) is a proxy whose call sends plain arguments to the child and gets a
plain value back (JSON of None, bool, int, float, str, bytes, complex, range, list, tuple, set,
frozenset, dict; anything else arrives as an opaque value that cannot be compared). The expected
values stay in the parent, so no object, frame, monkeypatch or forged report in the child can make
a test pass: the child can only answer with values, as a correct function would. Test code never
takes the program's replacement of a builtin (``abs``, ``len``, ...): builtins win over program names.

Output of the program (stdout and stderr) is read by the parent with a hard cap while reading; its
first ``MAX_OUTPUT_CHARS`` characters are kept. Requests and replies are capped too.

Without bubblewrap (or where the kernel refuses user namespaces) nothing runs: ``SandboxUnavailable``
names the fix. ``allow_unsafe_execution(True)`` (``eval.unsafe_code_without_sandbox=true``) runs the
same runner as a plain child process with the same limits, deadline and parent-side verdict, but
without the OS isolation; it is logged as a warning and recorded in results.json.
"""

from __future__ import annotations

import atexit
import builtins
import functools
import json
import logging
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from arm.core.errors import ArmError

log = logging.getLogger(__name__)

STATUSES: tuple[str, ...] = ("passed", "failed", "timeout", "error", "syntax_error")

MAX_OUTPUT_CHARS = 4096
"""Program output (stdout and stderr together) kept per run."""
MAX_OUTPUT_BYTES = 1 << 20
"""Program output read per run; beyond it the parent closes the pipe (the program's writes fail)."""
MAX_MESSAGE_BYTES = 1 << 20
"""Largest request (program, arguments) or reply (a value) between parent and child."""
MAX_DETAIL_CHARS = 1000
TMPFS_BYTES = 16 << 20
"""Size of the sandbox's private /tmp."""
FILE_BYTES = 4 << 20
"""RLIMIT_FSIZE: largest file the program may write (in its /tmp)."""
OPEN_FILES = 32
SANDBOX_UID = 65534
UNSAFE_FLAG = "eval.unsafe_code_without_sandbox"

ISOLATED = "bwrap"
UNISOLATED = "none (eval.unsafe_code_without_sandbox=true)"


class SandboxUnavailable(ArmError):
    """No OS isolation for generated code on this machine (and no explicit opt-out)."""


class SandboxStartError(RuntimeError):
    """The sandbox itself did not start (not the program's fault): never scored as a failed program."""


STARTUP_S = 60.0
"""Time the sandbox and interpreter may take to start, before the program's own wall-clock limit
(like code_eval's, which times the program, not the process start): on a loaded machine start-up
alone can take seconds, and it must not turn a correct program into a timeout."""
JUDGE_MEMORY_MB = 1024
"""Address space the judge (the process that runs the trusted tests) may map beyond the harness's."""
JUDGE_CPU_S = 10
"""CPU seconds of the judge (tests and relaying the program's answers)."""
JUDGE_WALL_S = 20.0
"""Wall-clock time the judge may take beyond the program's own budget."""


# ---------------------------------------------------------------------------------------------
# the value codec, shared verbatim by the parent and the child runner

_CODEC = r'''
_SEQUENCES = {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}


def encode(value, depth=0):
    """Plain JSON of a value; types are matched exactly (a subclass is opaque)."""
    if depth > 100:
        raise ValueError("value nested too deeply")
    kind = type(value)
    if value is None or kind is bool or kind is int or kind is float or kind is str:
        return value
    if kind is list or kind is tuple or kind is set or kind is frozenset:
        return {kind.__name__: [encode(item, depth + 1) for item in value]}
    if kind is dict:
        return {"dict": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]}
    if kind is bytes:
        return {"bytes": value.hex()}
    if kind is complex:
        return {"complex": [value.real, value.imag]}
    if kind is range:
        return {"range": [value.start, value.stop, value.step]}
    return {"opaque": str(getattr(kind, "__name__", "object"))[:100]}


def decode(data, resolve, depth=0):
    """The value of plain JSON from ``encode``; ``resolve(tag, body)`` handles other tags."""
    if depth > 100:
        raise ValueError("value nested too deeply")
    kind = type(data)
    if data is None or kind is bool or kind is int or kind is float or kind is str:
        return data
    if kind is not dict or len(data) != 1:
        raise ValueError("malformed value")
    ((tag, body),) = data.items()
    if tag in _SEQUENCES:
        if type(body) is not list:
            raise ValueError("malformed " + tag)
        return _SEQUENCES[tag](decode(item, resolve, depth + 1) for item in body)
    if tag == "dict":
        if type(body) is not list or any(type(p) is not list or len(p) != 2 for p in body):
            raise ValueError("malformed dict")
        return {decode(k, resolve, depth + 1): decode(v, resolve, depth + 1) for k, v in body}
    if tag == "bytes" and type(body) is str:
        return bytes.fromhex(body)
    if tag == "complex" and type(body) is list and len(body) == 2:
        return complex(float(body[0]), float(body[1]))
    if tag == "range" and type(body) is list and len(body) == 3 and all(type(b) is int for b in body):
        return range(*body)
    return resolve(tag, body)
'''

_RUNNER = r'''
import sys, os, json, resource


def _main():
    proto = os.dup(1)  # replies to the parent; the program's stdout joins its stderr
    os.dup2(2, 1)
    reader = sys.stdin.buffer
    streams = (sys.stdout, sys.stderr)

    def flush():  # the program's buffered output reaches the parent before the reply that may end the run
        for stream in streams:
            try:
                stream.flush()
            except BaseException:
                pass

    def send(message):
        flush()
        data = memoryview((json.dumps(message, ensure_ascii=True) + "\n").encode("ascii"))
        while data:
            data = data[os.write(proto, data):]

    def receive():
        line = reader.readline(MAX_MESSAGE + 1)
        if not line:
            os._exit(0)
        return json.loads(line)

    def failure(error):
        try:
            text = str(error)[:1000]
        except BaseException:
            text = "<unprintable>"
        try:
            name = str(type(error).__name__)[:100]
        except BaseException:
            name = "BaseException"
        return {"raised": name, "message": text}

    payload = receive()
    limits = payload["limits"]
    for name, value in limits.items():
        resource.setrlimit(getattr(resource, name), (value, value))
    send({"started": True})  # before any untrusted code: the program's time starts now

    namespace = {"__name__": "__main__", "__builtins__": __builtins__}

    def resolve(tag, body):
        if tag == "global" and type(body) is str:
            return namespace[body]
        raise ValueError("malformed value")

    try:
        code = compile(payload["program"], "<program>", "exec")
    except BaseException as error:
        send({"syntax_error": failure(error)})
        os._exit(0)
    try:
        exec(code, namespace)
    except BaseException as error:
        send(failure(error))
        os._exit(0)
    send({"ready": True})
    while True:
        request = receive()
        try:
            name = request["name"]
            if request["op"] == "lookup":
                if name not in namespace:
                    reply = {"missing": True}
                else:
                    value = namespace[name]
                    if type(value).__name__ == "module":
                        reply = {"module": str(value.__name__)}
                    elif callable(value):
                        reply = {"callable": True}
                    else:
                        reply = {"value": encode(value)}
            else:
                args = [decode(a, resolve) for a in request["args"]]
                kwargs = {str(k): decode(v, resolve) for k, v in request["kwargs"]}
                reply = {"value": encode(namespace[name](*args, **kwargs))}
        except BaseException as error:
            reply = failure(error)
        try:
            send(reply)
        except BaseException as error:
            send(failure(error))


_main()
'''

_codec: dict[str, Any] = {}
exec(compile(_CODEC, "<sandbox codec>", "exec"), _codec)  # noqa: S102 - the project's own code
_encode = _codec["encode"]
_decode = _codec["decode"]


# ---------------------------------------------------------------------------------------------
# values from the child, as the parent's test code sees them


class Opaque:
    """A value of a type the codec does not carry: it cannot be compared, hashed or tested for truth."""

    __slots__ = ("type_name",)

    def __init__(self, type_name: str):
        self.type_name = type_name

    def _refuse(self, *_: Any) -> Any:
        raise TypeError(f"a {self.type_name} object from the sandboxed program cannot be compared or used")

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __bool__ = __hash__ = __len__ = __iter__ = _refuse  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<{self.type_name} from the sandbox>"


class RemoteError(Exception):
    """An exception raised by the program in the sandbox, of a type the parent does not re-raise."""


class _Abort(BaseException):
    """Ends a run early (deadline, child gone, protocol broken); never caught by test code."""

    def __init__(self, status: str, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


_RERAISED = {
    name: cls
    for name, cls in vars(builtins).items()
    if isinstance(cls, type) and issubclass(cls, Exception) and not issubclass(cls, StopIteration | StopAsyncIteration)
}


def _from_child(tag: str, body: Any) -> Any:
    if tag == "opaque" and isinstance(body, str):
        return Opaque(body[:100])
    raise ValueError("malformed value")


class _RemoteFunction:
    """A callable of the program: calling it runs it in the sandbox with plain arguments."""

    def __init__(self, child: _Child, name: str):
        self._child, self._name = child, name
        self.__name__ = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._child.call(self._name, args, kwargs)

    def __repr__(self) -> str:
        return f"<sandboxed {self._name}>"


def _to_child(value: Any) -> Any:
    if isinstance(value, _RemoteFunction):
        return {"global": value._name}
    if isinstance(value, list | tuple | set | frozenset) and type(value) in (list, tuple, set, frozenset):
        return {type(value).__name__: [_to_child(v) for v in value]}
    if type(value) is dict:
        return {"dict": [[_to_child(k), _to_child(v)] for k, v in value.items()]}
    encoded = _encode(value)
    if isinstance(encoded, dict) and "opaque" in encoded:
        raise TypeError(f"a {type(value).__name__} cannot be passed to the sandboxed program")
    return encoded


TEST_MODULES = frozenset({"math", "cmath", "re", "string", "collections", "itertools", "functools", "operator",
                          "heapq", "bisect", "statistics", "fractions", "decimal", "copy"})
"""Modules the trusted tests may take by name from a program that imported them (MBPP's tests call
``math.isclose`` after the program's ``import math``): the parent's own import of the module of that
*name*, chosen from this list; what the program's object says its name is never reaches an import."""


class _Namespace(dict):
    """Globals of the parent's test code: a name the tests do not define and that is no builtin is
    looked up in the program (a function becomes a proxy, a module bound to one of ``TEST_MODULES``'
    names the parent's own import of that module, a value its plain copy)."""

    def __init__(self, child: _Child):
        super().__init__(__name__="__main__", __builtins__=builtins)
        self._child = child

    def __missing__(self, name: str) -> Any:
        if name.startswith("__") or hasattr(builtins, name):
            raise KeyError(name)
        reply = self._child.request({"op": "lookup", "name": name})
        if reply.get("missing"):
            raise KeyError(name)
        if reply.get("callable"):
            value: Any = _RemoteFunction(self._child, name)
        elif isinstance(reply.get("module"), str):
            if name not in TEST_MODULES or reply["module"] != name:  # opaque: nothing is imported by its say-so
                raise KeyError(name)
            import importlib

            value = importlib.import_module(name)
        elif "value" in reply:
            value = self._child.value(reply)
        else:
            raise KeyError(name)
        self[name] = value
        return value


# ---------------------------------------------------------------------------------------------
# the child process


def _limits(timeout_s: float, memory_mb: int) -> dict[str, int]:
    return {
        "RLIMIT_CPU": max(1, math.ceil(timeout_s)),
        "RLIMIT_AS": int(memory_mb) << 20,
        "RLIMIT_NPROC": 0,
        "RLIMIT_FSIZE": FILE_BYTES,
        "RLIMIT_NOFILE": OPEN_FILES,
        "RLIMIT_CORE": 0,
    }


class _Pipes:
    """The runner's pipes as a judge started by the judge server holds them: the runner is not its child
    (the harness waits for it and kills it), so it only ever reads and writes them."""

    def __init__(self, fds: Sequence[int]):
        self.stdin = os.fdopen(fds[0], "wb", buffering=0)
        self.stdout = os.fdopen(fds[1], "rb", buffering=0)
        self.stderr = os.fdopen(fds[2], "rb", buffering=0)
        self.pid = -1

    def poll(self) -> int | None:
        return None

    def wait(self, timeout: float | None = None) -> int:
        time.sleep(min(timeout or 0.01, 0.01))
        raise subprocess.TimeoutExpired("sandbox", timeout or 0.0)


class _Child:
    """One sandboxed runner: JSON lines on its stdin (requests) and stdout (replies), the program's
    output on stderr; every read and write bounded by the run's deadline and the size caps."""

    def __init__(self, argv: list[str], cwd: str | None, deadline: float, pass_fds: tuple[int, ...] = ()):
        self.deadline = deadline
        self.budget = max(0.0, deadline - time.monotonic())  # seconds of waiting for the child left
        self.proc: Any = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd,
            env=dict(_ENV), start_new_session=True, close_fds=True, pass_fds=pass_fds,
        )
        self._watch()

    @classmethod
    def attached(cls, fds: Sequence[int], state: dict[str, Any]) -> _Child:
        """In a judge started by the judge server: the same runner, reached through its pipes (stdin, stdout,
        stderr), with the harness's deadline, budget and the output and replies it had read so far."""
        self = cls.__new__(cls)
        self.deadline = time.monotonic() + float(state["budget"])
        self.budget = float(state["budget"])
        self.proc = _Pipes(fds)
        self._watch()
        self.replies = bytearray(state["replies"].encode("latin-1"))
        self.output = bytearray(state["output"].encode("latin-1"))
        self.output_bytes = int(state["output_bytes"])
        return self

    def state(self) -> dict[str, Any]:
        """What a judge in another process needs to go on from here (``attached``)."""
        return {"budget": self.budget, "replies": bytes(self.replies).decode("latin-1"),
                "output": bytes(self.output).decode("latin-1"), "output_bytes": self.output_bytes}

    def _watch(self) -> None:
        self.selector = selectors.DefaultSelector()
        for stream in (self.proc.stdout, self.proc.stderr):
            os.set_blocking(stream.fileno(), False)  # type: ignore[union-attr]
            self.selector.register(stream, selectors.EVENT_READ)
        os.set_blocking(self.proc.stdin.fileno(), False)  # type: ignore[union-attr]
        self.replies = bytearray()
        self.output = bytearray()
        self.output_bytes = 0
        self.closed_reply = False

    # -- I/O -----------------------------------------------------------------------------------
    def _left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise _Abort("timeout", "killed at the wall-clock limit")
        return left

    def _waiting(self) -> Any:
        """Count the time spent waiting for the child against its budget; the parent's own work
        between calls (running the tests) is not the program's time."""
        parent = self

        class _Wait:
            def __enter__(self) -> None:
                self.start = time.monotonic()
                parent.deadline = self.start + parent.budget

            def __exit__(self, *exc: object) -> None:
                parent.budget = max(0.0, parent.budget - (time.monotonic() - self.start))

        return _Wait()

    def _pump(self, timeout: float) -> None:
        """Read whatever the child wrote (replies; output up to the caps) within ``timeout``."""
        for key, _ in self.selector.select(timeout):
            stream = key.fileobj
            try:
                data = os.read(stream.fileno(), 1 << 16)  # type: ignore[union-attr]
            except BlockingIOError:
                continue
            if stream is self.proc.stdout:
                if not data:
                    self.selector.unregister(stream)
                    self.closed_reply = True
                self.replies += data
                if len(self.replies) > MAX_MESSAGE_BYTES:
                    raise _Abort("error", f"the program's reply exceeds {MAX_MESSAGE_BYTES} bytes")
            else:
                if not data:
                    self.selector.unregister(stream)
                    continue
                self.output_bytes += len(data)
                if len(self.output) < MAX_OUTPUT_CHARS * 4:
                    self.output += data[: MAX_OUTPUT_CHARS * 4 - len(self.output)]
                if self.output_bytes > MAX_OUTPUT_BYTES:  # stop reading: its further writes fail
                    self.selector.unregister(stream)
                    stream.close()  # type: ignore[union-attr]

    def send(self, message: dict[str, Any]) -> None:
        data = memoryview((json.dumps(message, ensure_ascii=True) + "\n").encode("ascii"))
        if len(data) > MAX_MESSAGE_BYTES:
            raise _Abort("error", f"a request to the program exceeds {MAX_MESSAGE_BYTES} bytes")
        fd = self.proc.stdin.fileno()  # type: ignore[union-attr]
        with selectors.DefaultSelector() as writable:
            writable.register(fd, selectors.EVENT_WRITE)
            while data:
                if writable.select(min(self._left(), 0.05)):
                    try:
                        data = data[os.write(fd, data):]
                    except BlockingIOError:
                        pass
                    except BrokenPipeError:
                        raise _Abort("error", "the program exited" + self._exit_note()) from None
                self._pump(0)

    def receive(self) -> dict[str, Any]:
        while b"\n" not in self.replies:
            if self.closed_reply:
                try:
                    self.proc.wait(timeout=max(0.01, min(self._left(), 1.0)))
                except subprocess.TimeoutExpired:
                    pass
                raise _Abort("error", "the program exited" + self._exit_note())
            self._pump(self._left())
        line, _, rest = bytes(self.replies).partition(b"\n")
        self.replies = bytearray(rest)
        try:
            reply = json.loads(line.decode("ascii"))
        except (ValueError, RecursionError, MemoryError):
            raise _Abort("error", "malformed reply from the program") from None
        if not isinstance(reply, dict):
            raise _Abort("error", "malformed reply from the program")
        return reply

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        with self._waiting():
            self.send(message)
            return self.receive()

    # -- calls -----------------------------------------------------------------------------------
    def value(self, reply: dict[str, Any]) -> Any:
        if "value" in reply:
            try:
                return _decode(reply["value"], _from_child)
            except (ValueError, TypeError, RecursionError, MemoryError):
                raise _Abort("error", "malformed value from the program") from None
        name, message = str(reply.get("raised", "Exception"))[:100], str(reply.get("message", ""))[:MAX_DETAIL_CHARS]
        raise _RERAISED.get(name, RemoteError)(f"{name}: {message}" if name not in _RERAISED else message)

    def call(self, name: str, args: tuple, kwargs: dict[str, Any]) -> Any:
        request = {"op": "call", "name": name, "args": [_to_child(a) for a in args],
                   "kwargs": [[str(k), _to_child(v)] for k, v in kwargs.items()]}
        return self.value(self.request(request))

    def output_text(self) -> str:
        for _ in range(64):  # what the child wrote before its last reply, still in the pipe (bounded reads)
            before = self.output_bytes
            try:
                self._pump(0)
            except (_Abort, OSError, ValueError):
                break
            if self.output_bytes == before:
                break
        return bytes(self.output).decode("utf-8", "replace")[:MAX_OUTPUT_CHARS]

    def _exit_note(self) -> str:
        code = self.proc.poll()
        return "" if code is None else f" (status {code})"

    def kill(self) -> None:
        """SIGKILL the sandbox's process group; bwrap's PID namespace then ends every process in it."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL is not ignorable
            pass
        self.selector.close()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                stream.close()  # type: ignore[union-attr]
            except OSError:
                pass


# ---------------------------------------------------------------------------------------------
# isolation: bubblewrap, or nothing without the explicit opt-out

_ENV = {"LC_ALL": "C.UTF-8", "PATH": "/usr/bin:/bin"}
_unsafe_allowed = False
_warned = False


def allow_unsafe_execution(allowed: bool) -> None:
    """Process-wide opt-out of the OS isolation (``eval.unsafe_code_without_sandbox=true``)."""
    global _unsafe_allowed
    _unsafe_allowed = bool(allowed)


def _interpreter() -> str:
    return os.path.realpath(sys.executable)


def _interpreter_paths() -> list[str]:
    """What ``python -I -S`` needs beyond the shared-library folders: itself, its standard library
    and its shared libpython (when it is built with one)."""
    paths = {_interpreter()}
    base = {"base": sys.base_prefix, "platbase": sys.base_exec_prefix, "installed_base": sys.base_prefix,
            "installed_platbase": sys.base_exec_prefix}  # the interpreter's own, not a venv's
    for key in ("stdlib", "platstdlib"):
        path = sysconfig.get_paths(vars=base).get(key)
        if path and os.path.isdir(path):
            paths.add(os.path.realpath(path))
    dynload = sysconfig.get_config_var("DESTSHARED")
    if dynload and os.path.isdir(dynload):
        paths.add(os.path.realpath(dynload))
    libdir, library = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if libdir and library and os.path.exists(os.path.join(libdir, library)):
        paths.add(os.path.realpath(os.path.join(libdir, library)))
    return sorted(paths)


# seccomp (classic BPF): new processes (clone without CLONE_THREAD, clone3, fork, vfork), new namespaces and mounts
# (unshare, setns, mount, umount2, pivot_root), keyrings (add_key, request_key, keyctl), ptrace, bpf
# and perf_event_open fail with EPERM. bwrap maps the sandbox user to the caller's uid, and for a
# caller that is root RLIMIT_NPROC does not apply (the kernel exempts uid 0): the filter is what stops
# fork bombs and subprocesses there.
_SYSCALLS = {  # machine: (AUDIT_ARCH_*, the numbers above in that order)
    "x86_64": (0xC000003E, (56, 435, 57, 58, 272, 308, 165, 166, 155, 248, 249, 250, 101, 321, 298)),
    "aarch64": (0xC00000B7, (220, 435, 97, 268, 40, 39, 41, 217, 218, 219, 117, 280, 241)),
}


CLONE_THREAD = 0x00010000
ENOSYS = 38


def seccomp_filter(machine: str | None = None) -> bytes:
    """The BPF program bwrap loads (``--seccomp FD``): a ``struct sock_filter`` array.

    ``clone`` is allowed only with ``CLONE_THREAD`` in its flags (a thread of the program's own process,
    inside its PID namespace, address space and limits); every other ``clone`` (fork, posix_spawn, vfork-like)
    fails with EPERM. ``clone3`` passes its flags in memory the filter cannot read: it fails with ENOSYS, and
    the C library falls back to ``clone``. The other listed calls fail with EPERM."""
    import platform
    import struct

    machine = machine or platform.machine()
    if machine not in _SYSCALLS:
        raise SandboxUnavailable(f"the sandbox has no process-creation filter for the {machine} architecture "
                                 f"(known: {', '.join(_SYSCALLS)}); run code evaluation on one of those or set "
                                 f"{UNSAFE_FLAG}=true where unisolated execution is acceptable")
    arch, numbers = _SYSCALLS[machine]
    clone, clone3 = numbers[0], numbers[1]
    rest = [nr for nr in numbers[2:]]
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, deny, kill = 0x7FFF0000, 0x00050000 | 1, 0x80000000  # ALLOW, ERRNO(EPERM), KILL_PROCESS
    nosys = 0x00050000 | ENOSYS
    # indices: 0 ld arch, 1 jeq arch, 2 kill, 3 ld nr, 4 jge x32, 5 jeq clone3, 6 jeq clone, 7.. jeq rest,
    # then ALLOW, CHECK (ld args[0]), JSET, ALLOW, DENY, NOSYS
    first = 7
    i_allow = first + len(rest)
    i_check, i_jset, i_allow2 = i_allow + 1, i_allow + 2, i_allow + 3
    i_deny, i_nosys = i_allow + 4, i_allow + 5

    def rel(here: int, target: int) -> int:
        return target - here - 1

    prog = [(ld, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, kill), (ld, 0, 0, 0),
            (jge, rel(4, i_deny), 0, 0x40000000),
            (jeq, rel(5, i_nosys), 0, clone3),
            (jeq, rel(6, i_check), 0, clone)]
    prog += [(jeq, rel(first + i, i_deny), 0, nr) for i, nr in enumerate(rest)]
    prog += [(ret, 0, 0, allow),
             (ld, 0, 0, 16),  # the low 32 bits of args[0]: clone's flags
             (jset, rel(i_jset, i_allow2), rel(i_jset, i_deny), CLONE_THREAD),
             (ret, 0, 0, allow), (ret, 0, 0, deny), (ret, 0, 0, nosys)]
    return b"".join(struct.pack("<HBBI", *insn) for insn in prog)


def bwrap_argv(bwrap: str, seccomp_fd: int) -> list[str]:
    """The bubblewrap command line that runs the runner (``-c`` code appended by the caller).

    No /proc is mounted: the sandbox user maps to the caller's uid outside, and for a caller that
    is root a procfs would expose files (sysctls, sysrq-trigger) that only check the owner."""
    argv = [
        bwrap, "--unshare-all", "--die-with-parent", "--new-session",
        "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--hostname", "sandbox",
        "--clearenv", *[x for k, v in _ENV.items() for x in ("--setenv", k, v)],
    ]
    if os.geteuid() == 0:
        argv += ["--cap-drop", "ALL"]
    if _bwrap_supports(bwrap, "--disable-userns"):  # bubblewrap >= 0.8: no nested user namespaces either
        argv += ["--unshare-user", "--disable-userns"]
    for folder in ("/lib", "/lib64", "/lib32"):  # merged-/usr links, so that loader paths resolve
        if os.path.islink(folder):
            argv += ["--symlink", os.readlink(folder), folder]
    for source, target in shared_libraries():  # each library file, not the folders that hold them
        argv += ["--ro-bind", source, target]
    for path in _interpreter_paths():
        argv += ["--ro-bind", path, path]
        site = os.path.join(path, "site-packages")
        if os.path.isdir(site):  # no third-party packages (``-S`` skips them anyway)
            argv += ["--size", "4096", "--tmpfs", site, "--remount-ro", site]
    for device in ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"):
        argv += ["--dev-bind", device, device]
    argv += ["--size", str(TMPFS_BYTES), "--tmpfs", "/tmp", "--chdir", "/tmp", "--remount-ro", "/",
             "--seccomp", str(seccomp_fd)]
    return argv + [_interpreter(), "-I", "-S", "-B", "-c"]


@functools.cache
def shared_libraries() -> tuple[tuple[str, str], ...]:
    """(file, path in the sandbox) of every shared library that the interpreter, its libpython and its standard
    library's extension modules (lib-dynload) load, as the dynamic loader resolves them here (``ldd``; the loader
    itself included). Only these are bound into the sandbox: not the folders that hold them (on these machines
    /usr/lib also holds node modules, a cloud SDK, a JVM and PostgreSQL)."""
    import glob
    import re

    objects = [_interpreter()] + [p for p in _interpreter_paths() if os.path.isfile(p) and ".so" in os.path.basename(p)]
    dynload = sysconfig.get_config_var("DESTSHARED")
    if dynload and os.path.isdir(dynload):
        objects += sorted(p for p in glob.glob(os.path.join(dynload, "*.so"))
                          if not os.path.basename(p).startswith("_tkinter"))  # a GUI toolkit: X11, Tcl/Tk
    ldd = shutil.which("ldd")
    if ldd is None:
        raise SandboxUnavailable("ldd is missing (Debian package libc-bin): the sandbox cannot tell which shared "
                                 "libraries the interpreter needs")
    found: dict[str, str] = {}
    for obj in objects:
        try:
            text = subprocess.run([ldd, obj], capture_output=True, text=True, timeout=30, env={"LC_ALL": "C"}).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        for line in text.splitlines():
            match = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
            if match and os.path.exists(match.group(1)):
                path = match.group(1)
                target = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
                found[target] = os.path.realpath(path)
    return tuple((source, target) for target, source in sorted(found.items()))


@functools.cache
def _bwrap_supports(bwrap: str, option: str) -> bool:
    try:
        help_text = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return option in help_text


@functools.cache
def _probe(bwrap: str | None) -> str | None:
    """None when bubblewrap runs a program here as uid 65534 without network, else the reason."""
    if bwrap is None:
        return "bubblewrap (bwrap) is not installed"
    program = "import os, socket\ndef probe():\n    return [os.getuid(), len(socket.if_nameindex())]\n"
    try:
        result = _run(bwrap, program, [f"assert probe() == [{SANDBOX_UID}, 1]"], 10.0, 256)
    except SandboxStartError as err:
        return f"bubblewrap cannot start a sandbox here: {err}"
    if result.passed:
        return None
    return f"bubblewrap cannot start a sandbox here ({result.status}: {result.detail[:300]})"


def isolation() -> str:
    """``ISOLATED`` when programs run under bubblewrap; ``UNISOLATED`` when the user opted out;
    else ``SandboxUnavailable`` naming the fix. Checked once per process (a tiny probe run)."""
    reason = _probe(shutil.which("bwrap"))
    if reason is None:
        return ISOLATED
    if _unsafe_allowed:
        global _warned
        if not _warned:
            log.warning("generated code runs WITHOUT OS isolation (%s=true): %s", UNSAFE_FLAG, reason)
            _warned = True
        return UNISOLATED
    raise SandboxUnavailable(
        f"generated code runs only in an OS sandbox, and {reason}. Fix: install bubblewrap "
        "(`apt-get install bubblewrap`, or your distribution's package) on a kernel that allows user "
        "namespaces (sysctl user.max_user_namespaces > 0, kernel.unprivileged_userns_clone=1, and on "
        "Ubuntu 24.04+ kernel.apparmor_restrict_unprivileged_userns=0), or run the code evaluation on "
        f"a machine or container where it does (docs/security.md). Only if executing untrusted code "
        f"unisolated is acceptable there: {UNSAFE_FLAG}=true"
    )


# ---------------------------------------------------------------------------------------------
# entry point


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run: ``passed`` only when every test passed."""

    passed: bool
    status: str
    detail: str
    output: str = ""


def run_program(
    program: str,
    tests: Sequence[str],
    timeout_s: float = 3.0,
    memory_mb: int = 512,
    *,
    setup: str = "",
    entry_point: str | None = None,
) -> SandboxResult:
    """Run ``program`` in the sandbox, then each test (trusted code, run here) against it.

    ``tests`` are statements run in order in one namespace, e.g. ``assert f(3) == 11``; names they
    take from the program call into the sandbox. ``setup`` is trusted code run here first (e.g. a
    HumanEval prompt's helpers, so that the tests use the prompt's own ``poly``); ``entry_point``
    is then taken from the program, not from ``setup``. ``status`` is one of ``STATUSES``:
    ``timeout_s`` bounds the whole run (wall clock; also CPU seconds, rounded up), ``memory_mb``
    the child's address space.
    """
    if timeout_s <= 0 or memory_mb <= 0:
        raise ValueError(f"timeout_s and memory_mb must be positive, got {timeout_s}, {memory_mb}")
    bwrap = shutil.which("bwrap") if isolation() == ISOLATED else None
    start = time.perf_counter()
    try:
        return _run(bwrap, program, tests, timeout_s, memory_mb, setup, entry_point)
    finally:
        STATS["programs"] += 1
        STATS["wall_s"] += time.perf_counter() - start


STATS: dict[str, float] = {"programs": 0, "wall_s": 0.0}
"""Programs run by ``run_program`` in this process and the wall time they took (benchmarks/eval_bench.py)."""


def _run(
    bwrap: str | None, program: str, tests: Sequence[str], timeout_s: float, memory_mb: int,
    setup: str = "", entry_point: str | None = None,
) -> SandboxResult:
    """One run: under ``bwrap``, or (``None``: the explicit opt-out) as a plain child in a temp folder."""
    runner = f"MAX_MESSAGE = {MAX_MESSAGE_BYTES}\n{_CODEC}\n{_RUNNER}"
    try:
        compiled = [(src, compile(src, "<test>", "exec")) for src in ([setup] if setup else []) + list(tests)]
    except (SyntaxError, ValueError) as error:
        return SandboxResult(False, "error", f"a test does not compile: {type(error).__name__}: {error}")
    if len(json.dumps(program)) > MAX_MESSAGE_BYTES - 4096:
        return SandboxResult(False, "error", f"the program exceeds {MAX_MESSAGE_BYTES} bytes")
    deadline = time.monotonic() + STARTUP_S  # until the runner reports "started"; then timeout_s (see _session)
    if bwrap is not None:
        child = _POOL.take(bwrap, runner)
        return _session(child, compiled, program, tests, timeout_s, memory_mb, setup, entry_point)
    workdir = tempfile.mkdtemp(prefix="arm-sandbox-")
    try:
        child = _Child([_interpreter(), "-I", "-S", "-B", "-c", runner], workdir, deadline)
        return _session(child, compiled, program, tests, timeout_s, memory_mb, setup, entry_point)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _start_sandbox(bwrap: str, runner: str) -> _Child:
    """A new bubblewrap sandbox running the runner, which waits for its one program (and its limits)."""
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, seccomp_filter())
    finally:
        os.close(write_end)
    try:
        return _Child(bwrap_argv(bwrap, read_end) + [runner], None, time.monotonic() + STARTUP_S, (read_end,))
    finally:
        os.close(read_end)


POOL_SIZE = 2
"""Sandboxes started ahead of need (``_SandboxPool``)."""


class _SandboxPool:
    """Sandboxes started before their program arrives, so that a program does not wait for bubblewrap and the
    interpreter to start: while one program runs and is judged, the next sandboxes boot (on another core).

    Nothing is shared: each sandbox is a new process that runs exactly one program and is killed after its
    verdict, as without the pool. A waiting sandbox has run only the runner (no program code, no limits yet:
    the runner sets them on receiving its program, before running it). The pool belongs to the process that
    filled it: after a fork the child starts its own and leaves the parent's sandboxes alone. Waiting
    sandboxes are killed at exit (and die with the harness anyway: ``--die-with-parent``)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.owner: tuple[Any, ...] | None = None
        self.ready: deque[_Child] = deque()
        self.lock = threading.Lock()

    def take(self, bwrap: str, runner: str) -> _Child:
        with self.lock:
            owner = (os.getpid(), bwrap, runner, bwrap_argv)  # sandboxes started by this process, this way
            if self.owner != owner:
                if self.owner is not None and self.owner[0] == owner[0]:
                    self._close()  # another bwrap or runner in this process: its sandboxes are of no use
                self.ready = deque()  # a forked child's copy holds the parent's sandboxes: forget, never kill them
                self.owner = owner
            child = None
            while self.ready and child is None:
                waiting = self.ready.popleft()
                if waiting.proc.poll() is None:
                    child = waiting
                else:
                    waiting.kill()  # ended while waiting (killed from outside): never handed a program
            if child is None:
                child = _start_sandbox(bwrap, runner)
            child.deadline, child.budget = time.monotonic() + STARTUP_S, STARTUP_S
            while len(self.ready) < self.size:
                self.ready.append(_start_sandbox(bwrap, runner))
            return child

    def _close(self) -> None:
        while self.ready:
            self.ready.popleft().kill()

    def close(self) -> None:
        """Kill the waiting sandboxes (this process's own)."""
        with self.lock:
            if self.owner is not None and self.owner[0] == os.getpid():
                self._close()
            self.ready = deque()
            self.owner = None


_POOL = _SandboxPool(POOL_SIZE)
atexit.register(_POOL.close)


def _session(
    child: _Child, compiled: list[tuple[str, Any]], program: str, tests: Sequence[str], timeout_s: float,
    memory_mb: int, setup: str, entry_point: str | None,
) -> SandboxResult:
    """Hand the program to the child, then run the tests here against its answers."""
    try:
        try:
            child.send({"program": program, "limits": _limits(timeout_s, memory_mb)})
            started = child.receive()
        except _Abort as abort:
            raise SandboxStartError(f"the sandbox did not start ({abort.detail}){_stderr_note(child)}") from None
        if not started.get("started"):
            raise SandboxStartError(f"the sandbox did not start (got {str(started)[:200]})")
        child.deadline, child.budget = time.monotonic() + timeout_s, timeout_s
        with child._waiting():  # the program's top level: its time counts like its calls'
            first = child.receive()
        if "syntax_error" in first:
            error = first["syntax_error"] if isinstance(first["syntax_error"], dict) else {}
            return SandboxResult(False, "syntax_error", _cut(f"{error.get('raised')}: {error.get('message')}"),
                                 child.output_text())
        if not first.get("ready"):
            return SandboxResult(False, "error", _cut(f"program raised {first.get('raised')}: {first.get('message')}"),
                                 child.output_text())
        return _judge(child, compiled, tests, timeout_s, setup, entry_point)
    except _Abort as abort:
        if abort.status == "timeout" or _killed_by_limit(child):
            return SandboxResult(False, "timeout", f"{abort.detail} of {timeout_s:g} s", child.output_text())
        return SandboxResult(False, abort.status, _cut(abort.detail + _stderr_note(child)), child.output_text())
    finally:
        child.kill()


def _run_tests(child: _Child, compiled: list[tuple[str, Any]], tests: Sequence[str], setup: str,
               entry_point: str | None) -> tuple[bool, str, str]:
    """(passed, status, detail) of the trusted tests against the program's answers (raises _Abort)."""
    namespace = _Namespace(child)
    for index, (src, code) in enumerate(compiled):
        try:
            exec(code, namespace)  # noqa: S102 - trusted test code; the program's names are proxies
        except AssertionError as error:
            note = f" ({error})" if str(error) else ""
            return False, "failed", _cut(f"failed: {src}{note}")
        except Exception as error:  # the program's exceptions arrive as plain types or RemoteError
            return False, "error", _cut(f"{src}: {type(error).__name__}: {error}")
        if index == 0 and setup and entry_point:
            namespace.pop(entry_point, None)  # the prompt's stub: the program's definition is tested
    return True, "passed", f"{len(tests)} tests passed"


def _judge_limits() -> None:
    """In the judge: JUDGE_MEMORY_MB of address space beyond what the harness had mapped, JUDGE_CPU_S of CPU."""
    import resource

    mapped = 0
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmSize:"):
                    mapped = int(line.split()[1]) << 10
    except OSError:
        pass
    if mapped:
        limit = mapped + (JUDGE_MEMORY_MB << 20)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CPU, (JUDGE_CPU_S, JUDGE_CPU_S + 1))


def _judge_work(child: _Child, compiled: list[tuple[str, Any]], tests: Sequence[str], setup: str,
                entry_point: str | None, write_end: int) -> None:
    """In a judge (a process that never runs program code): its limits, the tests, the verdict written to
    ``write_end`` as JSON; then exits, never returning into its caller."""
    code = 0
    try:
        _judge_limits()
        try:
            passed, status, detail = _run_tests(child, compiled, tests, setup, entry_point)
            message: dict[str, Any] = {"passed": passed, "status": status, "detail": detail}
        except _Abort as abort:
            message = {"abort": [abort.status, abort.detail]}
        except MemoryError:
            message = {"passed": False, "status": "error",
                       "detail": f"the tests' work on the program's values exceeded {JUDGE_MEMORY_MB} MiB"}
        message["output"] = child.output_text()
        data = json.dumps(message).encode()
        while data:
            data = data[os.write(write_end, data):]
    except BaseException:  # noqa: BLE001 - a judge that cannot report is read as a failed judge
        code = 1
    finally:
        os._exit(code)


def _read_until(read_end: int, deadline: float | None) -> tuple[bytes, bool]:
    """(what was written to ``read_end`` until EOF, True) or (what came before ``deadline``, False; None: no deadline)."""
    chunks: list[bytes] = []
    with selectors.DefaultSelector() as sel:
        sel.register(read_end, selectors.EVENT_READ)
        while deadline is None or time.monotonic() < deadline:
            if sel.select(None if deadline is None else max(0.0, deadline - time.monotonic())):
                data = os.read(read_end, 1 << 16)
                if not data:
                    return b"".join(chunks), True
                chunks.append(data)
                if sum(map(len, chunks)) > 4 * MAX_MESSAGE_BYTES:
                    return b"".join(chunks), True
    return b"".join(chunks), False


def _judge(child: _Child, compiled: list[tuple[str, Any]], tests: Sequence[str], timeout_s: float, setup: str,
           entry_point: str | None) -> SandboxResult:
    """Run the trusted tests in a *judge*: a process that never runs program code, under limits of its own
    (address space, CPU seconds, a wall-clock deadline), which reports the verdict over a pipe. Whatever work or
    memory the tests spend on the program's values (``set(range(10**12))``, ``max(range(10**15))``,
    ``2 ** f(x)``) is the judge's: past its limits the judge dies and the program scores an error; the harness's
    own memory and time are untouched. The judge is forked by the judge server (``_JudgeServer``: a small
    process started once, so a judge does not copy a harness that holds lm-eval and a model); where that
    server cannot run, by the harness itself."""
    read_end, write_end = os.pipe()
    try:
        pid = _JUDGES.submit(child, tests, setup, entry_point, write_end)
        served = pid is not None
        if pid is None:
            pid = os.fork()
            if pid == 0:  # the judge: never returns into the harness
                os.close(read_end)
                _judge_work(child, compiled, tests, setup, entry_point, write_end)
    finally:
        os.close(write_end)
    data, ended = _read_until(read_end, time.monotonic() + timeout_s + JUDGE_WALL_S)
    os.close(read_end)
    status_code: int | None = None
    if served:
        if not ended:
            try:
                os.killpg(pid, signal.SIGKILL)  # the judge and the process that watches it
            except (ProcessLookupError, PermissionError):
                pass
            status_code = signal.SIGKILL  # a raw wait status: killed by SIGKILL
            data = b""
        else:
            try:
                served_reply = json.loads(data.decode())
                data, status_code = str(served_reply["message"]).encode(), int(served_reply["status"])
            except (ValueError, UnicodeDecodeError, KeyError, TypeError):
                data = b""
    else:
        if not ended:
            os.kill(pid, signal.SIGKILL)
        _, status_code = os.waitpid(pid, 0)
    try:
        message = json.loads(data.decode())
    except (ValueError, UnicodeDecodeError):
        signal_number = -os.waitstatus_to_exitcode(status_code) if status_code is not None and os.WIFSIGNALED(status_code) else None
        why = {signal.SIGXCPU: f"{JUDGE_CPU_S} s of CPU", signal.SIGKILL: "its wall-clock limit"}.get(signal_number,
                                                                                                   "its limits")
        return SandboxResult(False, "error", f"the tests' work on the program's values exceeded {why} (judge process)")
    output = str(message.get("output", ""))[:MAX_OUTPUT_CHARS]
    if "abort" in message:
        status, detail = (list(message["abort"]) + ["error", ""])[:2]
        if status == "timeout" or _killed_by_limit(child):
            return SandboxResult(False, "timeout", f"{detail} of {timeout_s:g} s", output)
        return SandboxResult(False, str(status), _cut(str(detail) + _stderr_note(child)), output)
    return SandboxResult(bool(message.get("passed")), str(message.get("status", "error")),
                         _cut(str(message.get("detail", ""))), output)


# ---------------------------------------------------------------------------------------------
# the judge server

_SERVER = """
import sys
sys.path.insert(0, {root!r})
from arm.core.sandbox import _serve_judges
_serve_judges({fd})
"""


def _send_frame(sock: Any, obj: dict[str, Any], fds: Sequence[int] = ()) -> None:
    import socket

    data = json.dumps(obj).encode()
    header = len(data).to_bytes(8, "little")
    if fds:
        socket.send_fds(sock, [header], list(fds))
    else:
        sock.sendall(header)
    sock.sendall(data)


def _recv_exact(sock: Any, n: int) -> bytes:
    parts, left = [], n
    while left:
        part = sock.recv(left)
        if not part:
            raise EOFError("the other end closed")
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def _recv_frame(sock: Any, maxfds: int = 0) -> tuple[dict[str, Any], list[int]]:
    import socket

    fds: list[int] = []
    if maxfds:
        header, fds, _, _ = socket.recv_fds(sock, 8, maxfds)
        if not header:
            raise EOFError("the other end closed")
        header += _recv_exact(sock, 8 - len(header)) if len(header) < 8 else b""
    else:
        header = _recv_exact(sock, 8)
    return json.loads(_recv_exact(sock, int.from_bytes(header, "little"))), list(fds)


def _serve_judges(fd: int) -> None:
    """The judge server's loop (its own small process): per request, the runner's pipes and a verdict pipe
    arrive with the tests; it forks a watcher (a process group of its own, which the harness kills at the
    deadline), answers with the watcher's pid, and goes on. The watcher forks the judge, waits for it and
    writes ``{"message": the judge's verdict, "status": its wait status}`` to the verdict pipe."""
    import socket

    sock = socket.socket(fileno=fd)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # watchers are reaped by the kernel
    while True:
        try:
            request, fds = _recv_frame(sock, 4)
        except (OSError, EOFError, ValueError):
            os._exit(0)  # the harness is gone
        pid = os.fork()
        if pid == 0:
            sock.close()
            _watch_judge(request, fds)
        try:
            os.setpgid(pid, pid)
        except OSError:
            pass
        for f in fds:
            os.close(f)
        try:
            _send_frame(sock, {"pid": pid})
        except OSError:
            os._exit(0)


def _watch_judge(request: dict[str, Any], fds: list[int]) -> None:
    """The watcher: fork the judge (limits, tests, verdict), relay its verdict and wait status; never returns."""
    code = 0
    try:
        os.setpgid(0, 0)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # it waits for its judge
        stdin, stdout, stderr, verdict = fds
        read_end, write_end = os.pipe()
        judge = os.fork()
        if judge == 0:
            os.close(read_end)
            os.close(verdict)
            tests = [str(t) for t in request["tests"]]
            setup = str(request["setup"])
            compiled = [(src, compile(src, "<test>", "exec")) for src in ([setup] if setup else []) + tests]
            child = _Child.attached((stdin, stdout, stderr), request["state"])
            _judge_work(child, compiled, tests, setup, request["entry_point"], write_end)
        for f in (write_end, stdin, stdout, stderr):
            os.close(f)
        data, _ = _read_until(read_end, None)
        _, status = os.waitpid(judge, 0)
        reply = json.dumps({"message": data.decode("utf-8", "replace"), "status": status}).encode()
        while reply:
            reply = reply[os.write(verdict, reply):]
    except BaseException:  # noqa: BLE001 - the harness reads a watcher that cannot report as a failed judge
        code = 1
    finally:
        os._exit(code)


class _JudgeServer:
    """The process that forks judges: started once per harness process (``python -I``, importing only this
    module), so that a judge is a fork of a small process (16 MB resident here), not of a harness that holds lm-eval, a model or a
    vLLM engine. It gets each runner's pipes over a Unix socket (SCM_RIGHTS). Where it cannot start or dies,
    ``submit`` returns None and the harness forks the judge itself, as before."""

    def __init__(self) -> None:
        self.owner: int | None = None
        self.proc: subprocess.Popen | None = None
        self.sock: Any = None
        self.lock = threading.Lock()
        self.disabled = False

    def _start(self) -> None:
        import socket

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        try:
            self.proc = subprocess.Popen([sys.executable, "-I", "-c", _SERVER.format(root=root, fd=theirs.fileno())],
                                         pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, close_fds=True)
        finally:
            theirs.close()
        self.sock, self.owner = ours, os.getpid()

    def submit(self, child: _Child, tests: Sequence[str], setup: str, entry_point: str | None,
               verdict: int) -> int | None:
        """Start a judge of ``child`` in the server; the pid of its watcher (kill its group at the deadline)."""
        if self.disabled:
            return None
        with self.lock:
            try:
                if self.owner != os.getpid() or self.proc is None or self.proc.poll() is not None:
                    if self.owner == os.getpid():
                        self._close()
                    self.proc = self.sock = None  # a forked child's copy: the parent's server is not ours
                    self._start()
                fds = [child.proc.stdin.fileno(), child.proc.stdout.fileno(), child.proc.stderr.fileno(), verdict]
                _send_frame(self.sock, {"tests": list(tests), "setup": setup, "entry_point": entry_point,
                                        "state": child.state()}, fds)
                reply, _ = _recv_frame(self.sock)
                return int(reply["pid"])
            except (OSError, EOFError, ValueError, KeyError) as error:
                log.warning("the judge server failed (%s): judges are forked by the harness from now on", error)
                self._close()
                self.disabled = True
                return None

    def _close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        self.sock = self.proc = None

    def close(self) -> None:
        with self.lock:
            if self.owner == os.getpid():
                self._close()


_JUDGES = _JudgeServer()
atexit.register(_JUDGES.close)


def _killed_by_limit(child: _Child) -> bool:
    return child.proc.poll() in (-signal.SIGXCPU, -signal.SIGKILL, 128 + signal.SIGXCPU, 128 + signal.SIGKILL)


def _stderr_note(child: _Child) -> str:
    text = child.output_text().strip()
    return f"; output: {text[-300:]}" if text else ""


def _cut(text: str) -> str:
    return text[:MAX_DETAIL_CHARS]

