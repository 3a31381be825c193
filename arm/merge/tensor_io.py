"""Streaming safetensors I/O for Hugging Face model folders.

Reading: the headers of every ``*.safetensors`` file of a folder (single file, or sharded with
``model.safetensors.index.json``) are parsed up front, so names, shapes and dtypes can be checked
before any tensor data is touched. Tensor data is then read with plain positioned reads into
caller-owned buffers, one byte range at a time, with one shard file open per model. No memory
map is used, so pages of the input files never count towards the process' resident memory.

Writing: the output layout (which tensor goes to which shard, at which offset) is planned from
the tensor names, shapes and dtypes before the first byte is written. Each shard's header is
written first and the tensor bytes are then streamed in order, chunk by chunk: memory is bounded
by the chunk being written, not by the shard.

Only torch is imported here (lazily), so that command-line start-up stays light.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)
_MAX_HEADER_BYTES = 100 * 1024 * 1024

# safetensors dtype name -> (torch dtype attribute, bytes per element, is floating point)
_DTYPES: dict[str, tuple[str, int, bool]] = {
    "F64": ("float64", 8, True),
    "F32": ("float32", 4, True),
    "F16": ("float16", 2, True),
    "BF16": ("bfloat16", 2, True),
    "F8_E4M3": ("float8_e4m3fn", 1, True),
    "F8_E5M2": ("float8_e5m2", 1, True),
    "I64": ("int64", 8, False),
    "I32": ("int32", 4, False),
    "I16": ("int16", 2, False),
    "I8": ("int8", 1, False),
    "U64": ("uint64", 8, False),
    "U32": ("uint32", 4, False),
    "U16": ("uint16", 2, False),
    "U8": ("uint8", 1, False),
    "BOOL": ("bool", 1, False),
}
# the output dtypes a user may ask for (merge.dtype)
OUTPUT_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


class TensorIOError(ValueError):
    """A model folder or safetensors file that cannot be read as expected (names the file)."""


def itemsize(st_dtype: str) -> int:
    return _DTYPES[st_dtype][1]


def is_float(st_dtype: str) -> bool:
    return _DTYPES[st_dtype][2]


def torch_dtype(st_dtype: str) -> torch.dtype:
    import torch

    return getattr(torch, _DTYPES[st_dtype][0])


def dtype_name(st_dtype: str) -> str:
    """The torch dtype name of a safetensors dtype (``"BF16"`` -> ``"bfloat16"``), without torch."""
    return _DTYPES[st_dtype][0]


def st_dtype_of(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    for key, (attr, _, _) in _DTYPES.items():
        if attr == name:
            return key
    raise TensorIOError(f"dtype {dtype} cannot be written to safetensors")


_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string such as ``"5GB"``, ``"500MB"``, ``"2GiB"`` (transformers' units:
    GB = 10^9 bytes, GiB = 2^30 bytes)."""
    if isinstance(value, bool):
        raise ValueError(f"shard size must be bytes or a string like '5GB', got {value!r}")
    if isinstance(value, int):
        size = value
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _SIZE_UNITS:
            raise ValueError(f"shard size must be bytes or a string like '5GB', got {value!r}")
        size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size <= 0:
        raise ValueError(f"shard size must be positive, got {value!r}")
    return size


# ---------------------------------------------------------------------------------------------
# reading


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live: file, absolute byte offset, dtype and shape."""

    name: str
    file: Path
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int  # absolute offset of the first byte in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_float(self) -> bool:
        return is_float(self.dtype)


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse one safetensors file's header and check it against the file size (truncation)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise TensorIOError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER_BYTES):
                raise TensorIOError(f"{path}: corrupt or truncated safetensors header (length {n})")
            raw = fh.read(n)
    except OSError as err:
        raise TensorIOError(f"{path}: cannot read ({err})") from err
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TensorIOError(f"{path}: corrupt safetensors header ({err})") from err
    if not isinstance(header, dict):
        raise TensorIOError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + n
    data_len = size - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise TensorIOError(f"{path}: corrupt header entry for tensor {name!r}") from err
        if dtype not in _DTYPES:
            raise TensorIOError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        expected = math.prod(shape) * itemsize(dtype)
        if end - begin != expected or begin < 0:
            raise TensorIOError(
                f"{path}: tensor {name!r} spans {end - begin} bytes, expected {expected} for "
                f"{dtype}{list(shape)}: corrupt file"
            )
        if end > data_len:
            raise TensorIOError(
                f"{path}: tensor {name!r} ends at byte {data_start + end} but the file has {size} "
                "bytes: truncated file"
            )
        tensors[name] = TensorInfo(name, path, dtype, shape, data_start + begin, end - begin)
    return tensors


class ModelFolder:
    """A Hugging Face model folder with safetensors weights; headers parsed, no data read."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        if not self.path.is_dir():
            raise TensorIOError(f"{self.path}: model folder does not exist")
        self.tensors: dict[str, TensorInfo] = {}
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, KeyError, TypeError, json.JSONDecodeError) as err:
                raise TensorIOError(f"{index}: corrupt index ({err})") from err
            files = sorted(set(weight_map.values()))
            for fname in files:
                shard = self.path / fname
                if not shard.is_file():
                    raise TensorIOError(f"{index}: lists shard {fname} which does not exist")
                found = read_safetensors_header(shard)
                for name, info in found.items():
                    if weight_map.get(name) == fname:
                        self.tensors[name] = info
            missing = sorted(set(weight_map) - set(self.tensors))
            if missing:
                raise TensorIOError(
                    f"{index}: tensor {missing[0]!r} is listed in {weight_map[missing[0]]} but not "
                    f"found there ({len(missing)} missing)"
                )
        elif (self.path / SINGLE_FILE).is_file():
            self.tensors = read_safetensors_header(self.path / SINGLE_FILE)
        else:
            raise TensorIOError(
                f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors weights are supported)"
            )
        if not self.tensors:
            raise TensorIOError(f"{self.path}: the safetensors files hold no tensors")

    @property
    def config(self) -> dict[str, Any]:
        cfg = self.path / "config.json"
        if not cfg.is_file():
            return {}
        try:
            return json.loads(cfg.read_text())
        except json.JSONDecodeError as err:
            raise TensorIOError(f"{cfg}: not valid JSON ({err})") from err

    def storage_order(self) -> list[str]:
        """Tensor names in the order their bytes lie on disk (file, then offset)."""
        return sorted(self.tensors, key=lambda n: (str(self.tensors[n].file), self.tensors[n].offset))

    def has_tokenizer(self) -> bool:
        return any((self.path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))


class TensorReader:
    """Positioned reads of tensor bytes, keeping one file open at a time (per reader)."""

    def __init__(self) -> None:
        self._path: Path | None = None
        self._fd: int | None = None

    def read_into(self, info: TensorInfo, start_elem: int, n_elem: int, out: torch.Tensor) -> None:
        """Read ``n_elem`` elements of ``info`` starting at ``start_elem`` into the first bytes of
        the contiguous CPU tensor ``out`` (any dtype; its bytes are overwritten)."""
        self.read_into_buffer(info, start_elem, n_elem, out.view(-1).view(_byte_dtype()).numpy())

    def read_into_buffer(self, info: TensorInfo, start_elem: int, n_elem: int, out: Any) -> None:
        """:meth:`read_into` for any writable contiguous buffer (e.g. a numpy array): no torch."""
        size = itemsize(info.dtype)
        nbytes = n_elem * size
        view = memoryview(out).cast("B")[:nbytes]
        if len(view) < nbytes:
            raise ValueError(f"buffer of {len(view)} bytes for {nbytes} bytes of {info.name!r}")
        if info.file != self._path:
            self.close()
            try:
                self._fd = os.open(info.file, os.O_RDONLY)
            except OSError as err:
                raise TensorIOError(f"{info.file}: cannot open ({err})") from err
            self._path = info.file
        assert self._fd is not None
        pos = info.offset + start_elem * size
        done = 0
        while done < nbytes:
            got = os.preadv(self._fd, [view[done:]], pos + done)
            if got <= 0:
                raise TensorIOError(f"{info.file}: tensor {info.name!r} is truncated (short read)")
            done += got

    def read(self, info: TensorInfo) -> torch.Tensor:
        """The whole tensor, in its stored dtype and shape (a fresh CPU tensor)."""
        import torch

        out = torch.empty(info.shape, dtype=torch_dtype(info.dtype))
        if info.numel:
            self.read_into(info, 0, info.numel, out)
        return out

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = None
        self._path = None

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _byte_dtype() -> torch.dtype:
    import torch

    return torch.uint8


# ---------------------------------------------------------------------------------------------
# writing


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


@dataclass
class Shard:
    filename: str
    tensors: list[OutTensor] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def plan_shards(tensors: Sequence[OutTensor], shard_size: int) -> list[Shard]:
    """Greedy shards in the given order: a new shard starts when the next tensor would push the
    current one past ``shard_size`` (a tensor larger than the limit gets a shard of its own), as
    transformers' ``save_pretrained`` does. One shard is named ``model.safetensors``."""
    groups: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > shard_size:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    if len(groups) == 1:
        return [Shard(SINGLE_FILE, groups[0])]
    n = len(groups)
    return [Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


def _header_bytes(tensors: Iterable[OutTensor]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class ShardedWriter:
    """Streams tensors into pre-planned safetensors shards, in plan order, chunk by chunk."""

    def __init__(self, folder: Path, tensors: Sequence[OutTensor], shard_size: int):
        self.folder = Path(folder)
        self.shards = plan_shards(tensors, shard_size)
        self._queue: list[tuple[Shard, OutTensor]] = [
            (shard, t) for shard in self.shards for t in shard.tensors
        ]
        self._next = 0
        self._fh: Any = None
        self._shard: Shard | None = None
        self._current: OutTensor | None = None
        self._remaining = 0

    def begin(self, name: str) -> OutTensor:
        if self._remaining:
            raise RuntimeError(f"tensor {self._current.name!r} is incomplete")  # type: ignore[union-attr]
        if self._next >= len(self._queue):
            raise RuntimeError(f"tensor {name!r} is not in the output plan")
        shard, t = self._queue[self._next]
        if t.name != name:
            raise RuntimeError(f"expected tensor {t.name!r} next in the output plan, got {name!r}")
        self._next += 1
        if shard is not self._shard:
            self._close_file()
            self._fh = open(self.folder / shard.filename, "wb")  # noqa: SIM115
            self._fh.write(_header_bytes(shard.tensors))
            self._shard = shard
        self._current, self._remaining = t, t.nbytes
        return t

    def write(self, chunk: Any) -> None:
        """Append the next elements of the current tensor (already in the output dtype): a torch
        tensor, or a contiguous CPU buffer such as a numpy array (written as its raw bytes)."""
        if hasattr(chunk, "detach"):  # a torch tensor
            data = chunk.detach().contiguous().view(-1).view(_byte_dtype())
            if data.device.type != "cpu":
                data = data.cpu()
            view = memoryview(data.numpy())
        else:
            view = memoryview(chunk).cast("B")
        n = len(view)
        if n > self._remaining:
            raise RuntimeError(f"too many bytes written for tensor {self._current.name!r}")  # type: ignore[union-attr]
        if n:
            self._fh.write(view)
        self._remaining -= n

    def write_tensor(self, name: str, tensor: torch.Tensor) -> None:
        self.begin(name)
        self.write(tensor)

    def close(self) -> None:
        """Finish the last shard and write the index (for more than one shard)."""
        if self._remaining:
            raise RuntimeError(f"tensor {self._current.name!r} is incomplete")  # type: ignore[union-attr]
        if self._next != len(self._queue):
            raise RuntimeError("not every planned tensor was written")
        self._close_file()
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in self.shards)},
                "weight_map": {t.name: s.filename for s in self.shards for t in s.tensors},
            }
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    def _close_file(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def abort(self) -> None:
        """Close without raising (after a failure: a full disk fails the final flush too)."""
        try:
            self._close_file()
        except OSError:
            self._fh = None


# ---------------------------------------------------------------------------------------------
# model folder files and atomic output


def copy_model_files(
    base: ModelFolder, checkpoints: Sequence[ModelFolder], out: Path, dtype: str | None = None
) -> list[str]:
    """Copy config, generation config and tokenizer files (tokenizer from the base, or from the
    last checkpoint when the base has none). ``dtype`` (a torch dtype name) updates the config."""
    copied: list[str] = []
    config_src = base if (base.path / "config.json").is_file() else checkpoints[-1]
    for name in CONFIG_FILES:
        src = config_src.path / name
        if not src.is_file():
            continue
        if name == "config.json" and dtype is not None:
            cfg = json.loads(src.read_text())
            for key in ("torch_dtype", "dtype"):
                if key in cfg:
                    cfg[key] = dtype
            if "torch_dtype" not in cfg and "dtype" not in cfg:
                cfg["dtype"] = dtype
            (out / name).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        else:
            shutil.copy2(src, out / name)
        copied.append(name)
    tok_src = base if base.has_tokenizer() else checkpoints[-1]
    for name in TOKENIZER_FILES:
        if (tok_src.path / name).is_file():
            shutil.copy2(tok_src.path / name, out / name)
            copied.append(name)
    return copied


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_sibling(out_dir: Path) -> Path:
    """A fresh temporary sibling of ``out_dir``; leftovers of dead processes are removed."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{out_dir.name}.tmp-"
    for stale in out_dir.parent.glob(prefix + "*"):
        pid = stale.name[len(prefix) :].split("-")[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out_dir.parent / f"{prefix}{os.getpid()}-{os.urandom(3).hex()}"
    tmp.mkdir()
    return tmp


def publish(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished temporary folder into place (replacing ``out_dir`` if allowed)."""
    if out_dir.exists():
        if not overwrite:
            raise FileExistsError(f"{out_dir}: output folder exists (set merge.overwrite=true to replace it)")
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{os.urandom(3).hex()}"
        os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out_dir)
