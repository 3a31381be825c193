"""Content-keyed outputs, built once and published atomically.

Every stage writes into a temporary sibling of its final folder and renames it into place when
complete, under a file lock so that concurrent jobs of a sweep (local or Slurm) build it once.
A folder at the final path is therefore always complete; a killed build leaves only a temporary
sibling, which the next build removes.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from arm.core.errors import InputError

TMP_MARK = ".tmp-"


def content_key(*parts: Any, length: int = 16) -> str:
    """A stable hex digest of JSON-serialisable parts (dict key order does not matter)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def normalized_source(text: str) -> str:
    """Python source as a cache key sees it: without comments, blank lines and import statements.

    So a move that only rewrites import paths, or an edited comment, keeps every key (and the
    shipped base); a change in what the code does changes it. The code that an import brings in is
    keyed on its own where it matters (each stage lists the modules its output depends on). Built on
    `tokenize`, whose comment, NEWLINE and NAME tokens are the same in every Python 3 release."""
    return _normalized(text)


@functools.lru_cache(maxsize=1024)  # a pure function of the text: every job of a sweep keys the same modules
def _normalized(text: str) -> str:
    import io
    import textwrap
    import tokenize

    text = textwrap.dedent(text)
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return text  # not Python: the bytes themselves
    comment_col: dict[int, int] = {}
    dropped: set[int] = set()
    first: tokenize.TokenInfo | None = None
    for tok in tokens:
        if tok.type == tokenize.COMMENT:
            comment_col[tok.start[0]] = tok.start[1]
        elif tok.type == tokenize.NEWLINE:
            if first is not None and first.type == tokenize.NAME and first.string in ("import", "from"):
                dropped.update(range(first.start[0], tok.end[0] + 1))
            first = None
        elif first is None and tok.type not in (tokenize.NL, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING):
            first = tok
    kept = []
    for row, line in enumerate(text.splitlines(), start=1):
        if row in dropped:
            continue
        line = line[: comment_col.get(row, len(line))].rstrip()
        if line.strip():
            kept.append(line)
    return "\n".join(kept)


def source_digest(*sources: Any) -> str:
    """Digest of the code a cached output depends on: files (paths), modules or functions, each
    normalised by `normalized_source`."""
    import inspect
    import types

    digest = hashlib.sha256()
    for source in sources:
        if isinstance(source, types.ModuleType) and not str(source.__file__).endswith(".py"):
            digest.update(_compiled_module_bytes(Path(source.__file__)))  # an extension: its C source, as is
            digest.update(b"\0")
            continue
        if isinstance(source, types.ModuleType):
            text = Path(source.__file__).read_text(encoding="utf-8")
        elif isinstance(source, types.FunctionType | type):
            text = inspect.getsource(source)
        else:
            text = Path(source).read_text(encoding="utf-8")
        digest.update(normalized_source(text).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:12]


def _compiled_module_bytes(path: Path) -> bytes:
    """What a compiled extension module's behaviour follows: its C source beside it (``_kernels.c`` for
    ``_kernels.cpython-311-x86_64-linux-gnu.so``; shipped in the wheel too), else the binary itself."""
    source = path.with_name(path.name.split(".")[0] + ".c")
    return source.read_bytes() if source.is_file() else path.read_bytes()


def to_plain(obj: Any) -> Any:
    """OmegaConf nodes and mappings to plain, JSON-friendly Python objects."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, DictConfig | ListConfig):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a core dependency
        pass
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_plain(v) for v in obj]
    return obj


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path` (created if missing), released on exit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def tmp_sibling(final: Path) -> Path:
    return final.with_name(f"{final.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def remove_stale_tmp(final: Path) -> None:
    """Remove temporary siblings left by killed builds (call while holding the lock)."""
    for stale in final.parent.glob(f"{final.name}{TMP_MARK}*"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def build_once(final: Path, build: Callable[[Path], None], *, is_complete: Callable[[Path], bool] | None = None) -> bool:
    """Build the folder `final` with `build(tmp_dir)` unless it already exists.

    Returns True when it was built now, False when an existing complete folder was reused.
    `build` writes into the temporary folder it is given; on any exception the temporary folder
    is removed and nothing appears at `final`.
    """
    complete = is_complete or (lambda p: p.is_dir())
    if complete(final):
        return False
    with file_lock(final.with_name(final.name + ".lock")):
        if complete(final):
            return False
        remove_stale_tmp(final)
        if final.exists():  # incomplete leftover (is_complete said no): redo it
            shutil.rmtree(final)
        tmp = tmp_sibling(final)
        tmp.mkdir(parents=True)
        try:
            build(tmp)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return True


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    """Read a JSON file, with an error naming the file when it is missing or malformed."""

    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise InputError(f"{path}: file not found") from exc
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except IsADirectoryError:
        raise InputError(f"{path}: a folder, not a JSON file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
