"""The streaming merge engine: validates the inputs, runs a per-tensor rule, writes a model folder.

``merge_from_config(cfg.merge, base, checkpoints, out_dir)`` is the entry the pipeline uses. One
merge, in order:
1. config: the method (``merge.name``, looked up in ``baselines.METHODS``) and its parameters are
   validated, then the engine settings (``device``, ``dtype``, ``overwrite``, ``shard_size``);
2. inputs: every model folder's safetensors headers are parsed (no tensor data): architectures,
   tensor names, shapes and dtype kinds must agree; a truncated or corrupt file, a missing or
   extra tensor is reported with the file and tensor it concerns — before anything is written;
3. merge: tensor by tensor, in the base's storage order, the rule gets float32 chunks (or whole
   tensors) on the merge device, read with positioned reads (one shard open per model), and yields
   float32 chunks that are checked for NaN/Inf, cast to the output dtype and streamed into
   pre-planned safetensors shards in a temporary sibling folder;
4. config, generation config and tokenizer files are copied from the base (tokenizer from the last
   checkpoint if the base has none) and the folder is renamed into place.

A merge that fails or is killed leaves nothing at ``out_dir``; leftovers of killed runs are
removed by the next run. Only torch is imported (lazily): no transformers, no Hydra — and a CPU
merge of linear or task arithmetic runs on numpy alone, bit-identically (``arm.merge.numpy_ops``).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from arm.merge.contract import MergeConfigError, TensorInputs, TensorRule, WholeModelMethod, Workspace
from arm.merge.registry import get_method
from arm.merge.tensor_io import (
    OUTPUT_DTYPES,
    ModelFolder,
    OutTensor,
    ShardedWriter,
    TensorInfo,
    TensorIOError,
    TensorReader,
    copy_model_files,
    dtype_name,
    itemsize,
    parse_size,
    publish,
    temp_sibling,
    torch_dtype,
)

log = logging.getLogger("arm.merge")

if TYPE_CHECKING:
    import torch

ENGINE_KEYS = ("name", "device", "dtype", "overwrite", "shard_size")
DEFAULT_SHARD_SIZE = "5GB"
TIED_PAIR = ("lm_head.weight", "model.embed_tokens.weight")  # (output, input) embedding names
# CPU chunks of 2^18 float32 entries (1 MiB per buffer) keep a rule's passes over a chunk in the
# cache: TIES on make bench's 0.5B models took 13 s with them, 17 s with 2^20 (2 threads).
CPU_CHUNK = 1 << 18
GPU_CHUNK = 1 << 24
NUMPY_CHUNK = 1 << 18  # the numpy path's chunk: the same reason
# ARM_MERGE_BACKEND=torch: CPU merges of element-wise rules through torch even where the
# torch-free numpy path applies (for comparisons; the outputs are bit-identical)
BACKEND_ENV = "ARM_MERGE_BACKEND"
# A CPU merge runs torch single-threaded (its per-chunk passes are short and memory-bound; on a
# busy machine OpenMP barriers made 2 intra-op threads ~50x slower than 1) and merges up to
# ARM_MERGE_THREADS tensors at once in Python threads (default: the CPU count, at most 4).
THREADS_ENV = "ARM_MERGE_THREADS"
# With several threads, tensors merged ahead of the one being written wait in memory, up to
# ARM_MERGE_HELD_MIB MiB of output (default 512; the one being written is not counted).
HELD_ENV = "ARM_MERGE_HELD_MIB"

__all__ = [
    "EngineSettings",
    "MergeConfigError",
    "MergeContext",
    "MergeInputError",
    "build_rule",
    "merge",
    "merge_from_config",
    "merge_identity",
    "split_config",
    "validate_merge_config",
    "write_state_dict",
]


class MergeInputError(ValueError):
    """Input models that cannot be merged (names the folder, file or tensor)."""


class MergeOutputError(ValueError):
    """The output folder cannot be written where asked (names the path; nothing is left behind)."""


def check_output_path(out_dir: Path, inputs: Sequence[Path], overwrite: bool) -> None:
    """Refuse an output folder that would destroy or mix with the inputs, or cannot be a folder:
    equal to, inside or containing an input (even with overwrite), '.', '/', a file, or a place
    where its temporary sibling cannot be created (e.g. /proc). Called before any work."""
    out = Path(out_dir)
    resolved = out.resolve()
    if out.name in ("", ".", "..") or resolved == Path(resolved.anchor) or resolved == Path.cwd().resolve():
        raise MergeOutputError(f"{out}: not an output folder of its own (give the path of a new folder)")
    for inp in inputs:
        other = Path(inp).resolve()
        if resolved == other or other in resolved.parents or resolved in other.parents:
            relation = "is" if resolved == other else "lies inside" if other in resolved.parents else "contains"
            raise MergeOutputError(f"{out}: the output folder {relation} the input {inp}; the merge would replace or mix "
                                   "with its inputs (refused even with overwrite): choose another folder")
    if out.exists() and not out.is_dir():
        raise MergeOutputError(f"{out}: exists and is not a folder")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: output folder exists (set merge.overwrite=true to replace it)")
    parent = resolved.parent
    if parent.exists() and (not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK)):
        raise MergeOutputError(f"{out}: cannot create a folder in {parent} (not a writable folder)")
    if str(resolved).startswith(("/proc/", "/sys/", "/dev/")):
        raise MergeOutputError(f"{out}: not a place for a model folder (a kernel file system)")


def _write_error(err: OSError, out_dir: Path, tmp: Path) -> MergeOutputError:
    """An OSError while writing (disk full, quota, I/O) as a clean error naming the output and the removed temp."""
    what = err.strerror or str(err)
    if err.errno == errno.ENOSPC:
        what = "no space left on the device"
    return MergeOutputError(f"{out_dir}: cannot write the merged model ({what}); its temporary folder {tmp} was removed")


@dataclass(frozen=True)
class EngineSettings:
    device: str = "auto"  # auto | cpu | cuda (or cuda:N)
    dtype: str | None = None  # None: each tensor keeps the base's dtype
    overwrite: bool = False
    shard_size: int = 5 * 10**9

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> EngineSettings:
        device = cfg.get("device", "auto") or "auto"
        if not isinstance(device, str) or not (
            device in ("auto", "cpu", "cuda") or device.startswith("cuda:")
        ):
            raise MergeConfigError(f"merge.device: must be auto, cpu or cuda, got {device!r}")
        dtype = cfg.get("dtype")
        if dtype is not None and dtype not in OUTPUT_DTYPES:
            raise MergeConfigError(
                f"merge.dtype: must be null or one of {sorted(OUTPUT_DTYPES)}, got {dtype!r}"
            )
        overwrite = cfg.get("overwrite", False)
        if not isinstance(overwrite, bool):
            raise MergeConfigError(f"merge.overwrite: expected true or false, got {overwrite!r}")
        try:
            size = cfg.get("shard_size")
            shard_size = parse_size(DEFAULT_SHARD_SIZE if size is None else size)  # 0 is an error, not the default
        except ValueError as err:
            raise MergeConfigError(f"merge.shard_size: {err}") from None
        return cls(device, dtype, overwrite, shard_size)

    def resolve_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise MergeConfigError(f"merge.device: {self.device} requested but no CUDA device is available")
        return torch.device(self.device)


@dataclass(frozen=True)
class MergeContext:
    """Data a whole-model method may use beyond the weights (per-tensor rules ignore it):
    ``calibration`` records (e.g. the domain's train split, {"prompt", "response"}), the converged
    checkpoint (diagnostics only, never an input of the update) and a per-iteration metrics sink."""

    calibration: list[dict] | None = None
    converged: Path | None = None
    log: Callable[[dict], None] | None = None


def _plain(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A plain dict from a dict or an OmegaConf DictConfig (without importing omegaconf otherwise)."""
    if type(cfg).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)


def split_config(merge_cfg: Mapping[str, Any]) -> tuple[str, dict[str, Any], EngineSettings]:
    """``merge.*`` -> (method name, method parameters, engine settings)."""
    cfg = _plain(merge_cfg)
    name = cfg.get("name")
    if not isinstance(name, str) or not name:
        raise MergeConfigError("merge.name: missing (the merge method, e.g. merge=ties)")
    if name == "none":
        raise MergeConfigError("merge.name: 'none' means no merge; pick a method, e.g. merge=ties")
    params = {k: v for k, v in cfg.items() if k not in ENGINE_KEYS}
    return name, params, EngineSettings.from_mapping(cfg)


# Bump when a change to the engine or a rule changes merged values: it is part of merge_identity.
MERGE_FORMAT = 1
# Keys that do not change the merged values (left out of merge_identity): engine layout, and ARM's
# `statistics` (whole model or layer by layer: the same statistics within float tolerance, like the
# device; tests/test_arm_layerwise.py).
_LAYOUT_KEYS = ("device", "overwrite", "shard_size", "statistics")


def validate_merge_config(merge_cfg: Mapping[str, Any]) -> None:
    """Cheap checks of ``merge.*`` before any work (the number of checkpoints is not known yet:
    per-checkpoint lists are checked against each other here, against the checkpoints later)."""

    name, params, _ = split_config(merge_cfg)
    get_method(name).validate_params(params)


def merge_identity(merge_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """What determines a merge's values (method, parameters, output dtype, engine format), for
    content keys: device, shard size and overwrite are left out."""
    cfg = _plain(merge_cfg)
    return {
        "format": MERGE_FORMAT,
        **{k: v for k, v in sorted(cfg.items()) if k not in _LAYOUT_KEYS},
    }


def build_rule(name: str, params: Mapping[str, Any], n_checkpoints: int) -> TensorRule:
    cls = get_method(name)
    if not issubclass(cls, TensorRule):
        raise MergeConfigError(f"merge.name: {name!r} is not a per-tensor rule")
    return cls.from_params(params, n_checkpoints)


def merge_from_config(
    merge_cfg: Mapping[str, Any],
    base: Path,
    checkpoints: list[Path],
    out_dir: Path,
    *,
    progress: bool = True,
    context: MergeContext | None = None,
) -> dict[str, Any]:
    """Validate, merge and write a complete HF model folder at ``out_dir``; return a summary.

    ``context`` is handed to whole-model methods (ARM); per-tensor rules ignore it."""
    name, params, settings = split_config(merge_cfg)
    if not checkpoints:
        raise MergeInputError("no early checkpoints given: every method needs at least one")
    base, checkpoints, out_dir = Path(base), [Path(c) for c in checkpoints], Path(out_dir)
    converged = getattr(context, "converged", None)
    check_output_path(out_dir, [base, *checkpoints, *([Path(converged)] if converged else [])], settings.overwrite)

    warn_same_weights_as_base(base, checkpoints)
    cls = get_method(name)
    if issubclass(cls, WholeModelMethod):
        # a whole-model (iterative) method, e.g. ARM: it validates its own parameters and writes
        # out_dir, typically through write_state_dict below
        if out_dir.exists() and not settings.overwrite:
            raise FileExistsError(f"{out_dir}: output folder exists (set merge.overwrite=true to replace it)")
        try:
            return cls.merge_folder(params, base, checkpoints, out_dir, settings, progress=progress, context=context)
        except FloatingPointError as err:  # a diverging iteration (overflow to Inf/NaN): a clean error, not a traceback
            raise MergeInputError(f"merge '{name}' diverged: {err}") from None
    rule = cls.from_params(params, len(checkpoints))
    return merge(rule, base, checkpoints, out_dir, settings, progress=progress)


def same_weights_as_base(base: Path, checkpoint: Path, window: int = 4096) -> str | None:
    """How ``checkpoint`` is known to hold the base's weights ("the same file" when every weight file is a link
    to the base's, "the same bytes" when the first ``window`` bytes of every tensor agree), or None. Reads at most
    ``window`` bytes per tensor and file: a warning's evidence, not a proof (a checkpoint that differs only past
    those bytes is not caught)."""
    try:
        b, c = ModelFolder(base), ModelFolder(checkpoint)
        bt, ct = dict(b.tensors), dict(c.tensors)
    except (MergeInputError, OSError, ValueError):
        return None  # the merge itself reports unreadable inputs
    if set(bt) != set(ct):
        return None
    files = {(bt[n].file, ct[n].file) for n in bt}
    if all(os.path.samefile(x, y) for x, y in files):
        return "the same file"
    for n in bt:
        x, y = bt[n], ct[n]
        if (x.dtype, x.shape, x.nbytes) != (y.dtype, y.shape, y.nbytes):
            return None
        k = min(window, x.nbytes)
        with open(x.file, "rb") as fx, open(y.file, "rb") as fy:
            fx.seek(x.offset)
            fy.seek(y.offset)
            if fx.read(k) != fy.read(k):
                return None
    return "the same bytes"


def warn_same_weights_as_base(base: Path, checkpoints: Sequence[Path]) -> None:
    """A checkpoint that holds the base's weights merges as a zero update: say so, naming both."""
    for ck in checkpoints:
        how = same_weights_as_base(base, ck)
        if how is not None:
            log.warning("%s holds the base's weights (%s as %s): it enters the merge as a zero update", ck, how, base)


# ---------------------------------------------------------------------------------------------
# validation


@dataclass
class _Plan:
    names: list[str]  # output tensors, in write order
    inputs: dict[str, list[TensorInfo]]  # name -> [base, c1..cm]
    out: list[OutTensor]


def _check_configs(base: ModelFolder, checkpoints: Sequence[ModelFolder]) -> None:
    ref = base.config
    for ck in checkpoints:
        cfg = ck.config
        for key in ("model_type", "architectures"):
            if key in ref and key in cfg and ref[key] != cfg[key]:
                raise MergeInputError(
                    f"{ck.path / 'config.json'}: {key} {cfg[key]!r} differs from the base's {ref[key]!r} "
                    f"({base.path}): models of different architectures cannot be merged"
                )


def _alias_tied(folders: Sequence[ModelFolder], tied: bool) -> list[dict[str, TensorInfo]]:
    """Per-folder tensor maps; with tied embeddings a missing lm_head reads the embedding."""
    maps = [dict(f.tensors) for f in folders]
    out_name, in_name = TIED_PAIR
    if tied and any(out_name in m for m in maps):
        for m in maps:
            if out_name not in m and in_name in m:
                src = m[in_name]
                m[out_name] = TensorInfo(out_name, src.file, src.dtype, src.shape, src.offset, src.nbytes)
    return maps


def open_folders(base: Path, checkpoints: Sequence[Path]) -> tuple[ModelFolder, list[ModelFolder]]:
    """The base and checkpoint folders, headers read; a bad folder or file is a MergeInputError."""
    try:
        return ModelFolder(base), [ModelFolder(c) for c in checkpoints]
    except TensorIOError as err:
        raise MergeInputError(str(err)) from None


def plan_merge(base: ModelFolder, checkpoints: Sequence[ModelFolder], dtype: str | None) -> _Plan:
    """Check that all inputs hold the same tensors (names, shapes, dtype kinds); plan the output."""
    _check_configs(base, checkpoints)
    tied = bool(base.config.get("tie_word_embeddings", False))
    maps = _alias_tied([base, *checkpoints], tied)
    ref = maps[0]
    for folder, m in zip(checkpoints, maps[1:], strict=True):
        missing = [n for n in ref if n not in m]
        if missing:
            raise MergeInputError(
                f"{folder.path}: tensor {missing[0]!r} of the base ({base.path}) is missing "
                f"({len(missing)} missing)"
            )
        extra = [n for n in m if n not in ref]
        if extra:
            raise MergeInputError(
                f"{m[extra[0]].file}: tensor {extra[0]!r} is not in the base ({base.path}) ({len(extra)} extra)"
            )
        for name, info in m.items():
            r = ref[name]
            if info.shape != r.shape:
                raise MergeInputError(
                    f"{info.file}: tensor {name!r} has shape {list(info.shape)}, the base's "
                    f"({r.file}) is {list(r.shape)}"
                )
            if info.is_float != r.is_float:
                raise MergeInputError(
                    f"{info.file}: tensor {name!r} is {info.dtype}, the base's ({r.file}) is {r.dtype}"
                )
    order = [n for n in base.storage_order() if n in ref]
    order += [n for n in ref if n not in base.tensors]  # an aliased lm_head
    out_dtype = OUTPUT_DTYPES[dtype] if dtype else None
    out = [
        OutTensor(n, out_dtype if (out_dtype and ref[n].is_float) else ref[n].dtype, ref[n].shape)
        for n in order
    ]
    return _Plan(order, {n: [m[n] for m in maps] for n in order}, out)


# ---------------------------------------------------------------------------------------------
# reading inputs for a rule


class _Buffers:
    """Reusable staging (raw bytes, CPU) and float32 (device) buffers, and the rules' workspace."""

    def __init__(self, n_inputs: int, chunk: int, device: torch.device):
        import torch

        pin = device.type == "cuda"
        self.raw = torch.empty(chunk * 8, dtype=torch.uint8, pin_memory=pin)
        self.f32 = [torch.empty(chunk, dtype=torch.float32, device=device) for _ in range(n_inputs)]
        self.out = torch.empty(chunk * 8, dtype=torch.uint8)
        self.workspace = Workspace()


class DiskInputs(TensorInputs):
    """One tensor of each input model, read from safetensors files chunk by chunk."""

    def __init__(
        self,
        infos: Sequence[TensorInfo | None],
        readers: Sequence[TensorReader],
        buffers: _Buffers,
        device: torch.device,
        chunk: int,
    ):
        present = [i for i in infos if i is not None]
        self.numel = present[0].numel
        self.device = device
        self.chunk_elems = chunk
        self.workspace = buffers.workspace
        self._infos = infos
        self._readers = readers
        self._buf = buffers

    def _load(self, slot: int, start: int, n: int, out: torch.Tensor) -> torch.Tensor:
        import torch

        info = self._infos[slot]
        assert info is not None
        if info.dtype == "F32" and out.device.type == "cpu":
            self._readers[slot].read_into(info, start, n, out)
            return out
        raw = self._buf.raw[: n * itemsize(info.dtype)]
        self._readers[slot].read_into(info, start, n, raw)
        src = raw.view(torch_dtype(info.dtype))
        out.copy_(src, non_blocking=True)
        if out.device.type == "cuda":
            torch.cuda.current_stream(out.device).synchronize()  # the staging buffer is reused next
        return out

    def chunks(self) -> Iterator[tuple[torch.Tensor | None, list[torch.Tensor]]]:
        for s in range(0, self.numel, self.chunk_elems):
            n = min(self.chunk_elems, self.numel - s)
            loaded = [
                self._load(j, s, n, self._buf.f32[j][:n]) if info is not None else None
                for j, info in enumerate(self._infos)
            ]
            yield loaded[0], [t for t in loaded[1:] if t is not None]

    def window(self, start: int, length: int) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        import torch

        loaded = [
            self._load(j, start, length, torch.empty(length, dtype=torch.float32, device=self.device))
            if info is not None
            else None
            for j, info in enumerate(self._infos)
        ]
        return loaded[0], [t for t in loaded[1:] if t is not None]

    def full(self) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        loaded: list[torch.Tensor | None] = []
        for j, info in enumerate(self._infos):
            if info is None:
                loaded.append(None)
                continue
            t = self.scratch(f"inputs.full.{j}", self.numel)
            for s in range(0, self.numel, self.chunk_elems):
                n = min(self.chunk_elems, self.numel - s)
                self._load(j, s, n, t[s : s + n])
            loaded.append(t)
        return loaded[0], [t for t in loaded[1:] if t is not None]


# ---------------------------------------------------------------------------------------------
# the merge


def _used_slots(rule: TensorRule, n_checkpoints: int) -> list[bool]:
    """Which of [base, c1..cm] the rule reads."""
    return [rule.uses_base] + rule.checkpoint_mask(n_checkpoints)


def _find_nonfinite(name: str, infos: Sequence[TensorInfo | None]) -> str:
    import torch

    for info in infos:
        if info is None:
            continue
        with TensorReader() as reader:
            t = reader.read(info)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return f"{info.file}: tensor {name!r} contains NaN or Inf"
    return f"merged tensor {name!r} is not finite although its inputs are (check the method's parameters)"


def merge(
    rule: TensorRule,
    base: Path,
    checkpoints: list[Path],
    out_dir: Path,
    settings: EngineSettings,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Run ``rule`` over every tensor of ``base`` and ``checkpoints``; write ``out_dir``.

    A CPU merge of an element-wise rule with a numpy twin (``combine_numpy``), or of a rule with a
    ``merge_numpy`` (TIES with its C kernels), runs on numpy alone and never imports torch (see
    :func:`_numpy_path`); its output is bit-identical."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists() and not settings.overwrite:
        raise FileExistsError(f"{out_dir}: output folder exists (set merge.overwrite=true to replace it)")
    device = "cpu" if settings.device == "cpu" else settings.resolve_device()
    base_f, ck_f = open_folders(base, checkpoints)
    plan = plan_merge(base_f, ck_f, settings.dtype)
    used = _used_slots(rule, len(ck_f))

    budget = _held_budget()  # read (and checked) before anything is written or set
    pool: _WorkerPool | _NumpyPool
    threads = None
    workers = 1
    if device == "cpu" and _numpy_path(rule, plan, used):
        pool = _NumpyPool(rule, used, NUMPY_CHUNK)
        workers = _cpu_workers()
    else:
        import torch

        device = torch.device(device) if isinstance(device, str) else device
        chunk = GPU_CHUNK if device.type == "cuda" else CPU_CHUNK
        threads = torch.get_num_threads()
        if device.type == "cpu":
            workers = _cpu_workers()
            torch.set_num_threads(1)
        pool = _WorkerPool(rule, used, device, chunk)
    try:
        tmp = temp_sibling(out_dir)
    except OSError as err:
        raise MergeOutputError(f"{out_dir}: cannot create its temporary sibling folder ({err.strerror or err})") from None
    writer = ShardedWriter(tmp, plan.out, settings.shard_size)
    published = False
    try:
        if rule.needs_prepare() and isinstance(pool, _WorkerPool):  # e.g. TIES's global trim: every float tensor first
            rule.prepare((name, pool.inputs(plan.inputs[name])) for name in plan.names if plan.inputs[name][0].is_float)
        bar = _progress(len(plan.names), progress, rule.name)
        jobs = [(name, target, plan.inputs[name]) for name, target in zip(plan.names, plan.out, strict=True)]
        if workers == 1:  # stream each chunk to disk as it is produced
            for name, target, infos in jobs:
                writer.begin(name)
                for piece in pool.merge_tensor(name, target, infos):
                    writer.write(piece)
                bar.update()
        else:  # tensors merged in parallel threads (torch releases the GIL), written in order
            from collections import deque
            from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

            # A tensor merged ahead of the one being written waits in memory (its output bytes):
            # up to `workers` run at once, and finished ones are held while they fit in the
            # budget, so one long tensor (an embedding) does not idle the other threads.
            with ThreadPoolExecutor(workers, thread_name_prefix="merge") as executor:
                pending: deque = deque()  # (name, future, output bytes), in output order
                todo = deque(jobs)
                while todo or pending:
                    running = sum(not f.done() for _, f, _ in pending)
                    held = sum(b for _, _, b in pending)
                    if todo and running < workers and (not pending or held + todo[0][1].nbytes <= budget):
                        job = todo.popleft()
                        future = executor.submit(lambda j: list(pool.merge_tensor(*j, copy=True)), job)
                        pending.append((job[0], future, job[1].nbytes))
                    elif pending[0][1].done() or running == 0 or not todo:
                        name, future, _ = pending.popleft()
                        _write_done(writer, bar, name, future, getattr(pool, "release", None))
                    else:  # every thread busy, or the budget full: wait for any tensor to finish
                        wait([f for _, f, _ in pending if not f.done()], return_when=FIRST_COMPLETED)
        bar.close()
        writer.close()
        copy_model_files(base_f, ck_f, tmp, settings.dtype)
        publish(tmp, out_dir, settings.overwrite)
        published = True
    except OSError as err:  # disk full, quota, I/O error: nothing at out_dir, the temporary folder removed below
        raise _write_error(err, out_dir, tmp) from None
    finally:
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        writer.abort()
        pool.close()
        if not published:
            shutil.rmtree(tmp, ignore_errors=True)
    return {
        "method": rule.name,
        "params": rule.params(),
        "wall_s": round(time.perf_counter() - t0, 3),
        "n_tensors": len(plan.names),
        "device": str(device),
        "dtype": settings.dtype or ",".join(sorted({dtype_name(t.dtype) for t in plan.out})),
        "out_dir": str(out_dir),
        "shards": len(writer.shards),
        "bytes": sum(t.nbytes for t in plan.out),
    }


def _env_number(name: str, default: str, kind: type) -> Any:
    raw = os.environ.get(name, default)
    try:
        value = kind(raw)
    except ValueError:
        raise MergeConfigError(f"{name}={raw!r}: expected a {'whole ' if kind is int else ''}number") from None
    if value < 0:
        raise MergeConfigError(f"{name}={raw!r}: expected a number >= 0")
    return value


def _held_budget() -> int:
    """Bytes of merged tensors that may wait in memory for their turn to be written."""
    return int(_env_number(HELD_ENV, "512", float) * 2**20)


def _cpu_workers() -> int:
    return max(1, _env_number(THREADS_ENV, "0", int) or min(4, os.cpu_count() or 1))


def _write_done(writer: ShardedWriter, bar: Any, name: str, future: Any, release: Any = None) -> None:
    pieces = future.result()  # re-raises a worker's error
    writer.begin(name)
    for piece in pieces:
        writer.write(piece)
        if release is not None:
            release(piece)
    bar.update()


class _WorkerPool:
    """Per-thread readers (one open shard per model) and buffers, and the per-tensor merge."""

    def __init__(self, rule: TensorRule, used: list[bool], device: torch.device, chunk: int):
        import threading

        self.rule, self.used, self.device, self.chunk = rule, used, device, chunk
        self._local = threading.local()
        self._all: list[tuple[list[TensorReader], _Buffers]] = []
        self._lock = threading.Lock()

    def _resources(self) -> tuple[list[TensorReader], _Buffers]:
        res = getattr(self._local, "res", None)
        if res is None:
            res = ([TensorReader() for _ in self.used], _Buffers(len(self.used), self.chunk, self.device))
            self._local.res = res
            with self._lock:
                self._all.append(res)
        return res

    def inputs(self, infos: list[TensorInfo]) -> DiskInputs:
        """One tensor's inputs (the slots the rule reads), on this thread's readers and buffers."""
        readers, buffers = self._resources()
        used_infos = [info if u else None for info, u in zip(infos, self.used, strict=True)]
        return DiskInputs(used_infos, readers, buffers, self.device, self.chunk)

    def merge_tensor(
        self, name: str, target: OutTensor, infos: list[TensorInfo], copy: bool = False
    ) -> Iterator[torch.Tensor]:
        """The merged tensor as consecutive CPU chunks in the output dtype (reused buffers unless
        ``copy``)."""
        import torch

        readers, buffers = self._resources()
        if not infos[0].is_float:  # integer/bool buffers: the base's values
            yield readers[0].read(infos[0]).reshape(-1)
            return
        used_infos = [info if u else None for info, u in zip(infos, self.used, strict=True)]
        inputs = DiskInputs(used_infos, readers, buffers, self.device, self.chunk)
        out_dtype = torch_dtype(target.dtype)
        written = 0
        for part in self.rule.merge(name, inputs):
            if not bool(torch.isfinite(part.sum())) and not bool(torch.isfinite(part).all()):
                raise MergeInputError(_find_nonfinite(name, used_infos))
            for s in range(0, part.numel(), self.chunk):
                piece = part[s : s + self.chunk]
                n = piece.numel()
                if copy:
                    staged = piece.to(device="cpu", dtype=out_dtype, copy=True)
                else:
                    staged = buffers.out[: n * itemsize(target.dtype)].view(out_dtype)
                    staged.copy_(piece if piece.device.type == "cpu" else piece.to(out_dtype))
                yield staged
                written += n
        if written != inputs.numel:
            raise RuntimeError(
                f"method {self.rule.name} produced {written} of {inputs.numel} values for {name!r}"
            )

    def close(self) -> None:
        for readers, _ in self._all:
            for r in readers:
                r.close()


def _numpy_path(rule: TensorRule, plan: _Plan, used: list[bool]) -> bool:
    """Whether a CPU merge can run on numpy alone (no torch import): an element-wise rule whose
    ``combine`` comes with a ``combine_numpy`` from the same class, or a rule whose
    ``merges_numpy()`` says it can (TIES with its C kernels); float tensors read and written as
    float32, float16 or bfloat16. ``ARM_MERGE_BACKEND=torch`` turns it off."""
    if os.environ.get(BACKEND_ENV, "auto") == "torch":
        return False
    if rule.elementwise:
        mro = type(rule).__mro__
        owner = {key: next((c for c in mro if key in vars(c)), None) for key in ("combine", "combine_numpy")}
        if owner["combine_numpy"] is None or owner["combine_numpy"] is not owner["combine"]:
            return False
        if getattr(rule, "combine_numpy", None) is None:
            return False
    elif not rule.merges_numpy():
        return False
    from arm.merge import numpy_ops as nops  # numpy: off the start-up path

    for name, target in zip(plan.names, plan.out, strict=True):
        infos = plan.inputs[name]
        if not infos[0].is_float:
            continue
        if target.dtype not in nops.FLOAT_DTYPES:
            return False
        if any(u and info.dtype not in nops.FLOAT_DTYPES for info, u in zip(infos, used, strict=True)):
            return False
    return True


class _NumpyPool:
    """:class:`_WorkerPool` for the torch-free CPU path: per-thread readers, numpy buffers and
    workspace; the rule's ``combine_numpy`` chunk by chunk (see ``arm.merge.numpy_ops``)."""

    def __init__(self, rule: TensorRule, used: list[bool], chunk: int):
        import threading

        self.rule, self.used, self.chunk = rule, used, chunk
        self._local = threading.local()
        self._all: list[list[TensorReader]] = []
        self._lock = threading.Lock()
        # Copies of merged chunks waiting to be written (several threads) live in recycled buffers: a fresh
        # array per chunk page-faults its memory in (on the 1.5B bench model 364k faults, ~2 s of system time).
        self._spare: list[Any] = []
        self._pooled: dict[int, Any] = {}  # id -> buffer: held, so an id is never reused by another array

    def _copy(self, staged: Any) -> Any:
        """``staged`` copied into a recycled buffer (given back by :meth:`release` once written)."""
        import numpy as np

        flat = staged.reshape(-1).view(np.uint8)
        with self._lock:
            fits = next((i for i, b in enumerate(self._spare) if b.size >= flat.size), None)
            buf = self._spare.pop(fits) if fits is not None else None
        if buf is None:  # a chunk of this output dtype (a bf16 chunk needs half an f32 one's bytes)
            buf = np.empty(max(flat.size, self.chunk * staged.dtype.itemsize), dtype=np.uint8)
            with self._lock:
                self._pooled[id(buf)] = buf
        out = buf[: flat.size]
        np.copyto(out, flat)
        return out.view(staged.dtype)

    def release(self, piece: Any) -> None:
        """Give a written piece's buffer back (pieces that are not pooled copies are ignored)."""
        root = piece
        while getattr(root, "base", None) is not None:
            root = root.base
        with self._lock:
            if self._pooled.get(id(root)) is root:
                self._spare.append(root)

    def _resources(self) -> tuple[list[TensorReader], Any]:
        from arm.merge import numpy_ops as nops  # numpy: off the start-up path

        res = getattr(self._local, "res", None)
        if res is None:

            res = ([TensorReader() for _ in self.used], nops.NumpyWorkspace())
            self._local.res = res
            with self._lock:
                self._all.append(res[0])
        return res

    def merge_tensor(
        self, name: str, target: OutTensor, infos: list[TensorInfo], copy: bool = False
    ) -> Iterator[Any]:
        """The merged tensor as consecutive numpy chunks in the output dtype (reused buffers
        unless ``copy``)."""
        import numpy as np

        from arm.merge import numpy_ops as nops

        readers, ws = self._resources()
        if not infos[0].is_float:  # integer/bool buffers: the base's values
            raw = np.empty(infos[0].nbytes, dtype=np.uint8)
            readers[0].read_into_buffer(infos[0], 0, infos[0].numel, raw)
            yield raw
            return
        used_infos = [info if u else None for info, u in zip(infos, self.used, strict=True)]
        numel = infos[0].numel
        chunk = min(self.chunk, numel)
        if not self.rule.elementwise:
            yield from self._merge_whole(name, target, used_infos, readers, ws, copy)
            return
        inputs = NumpyDiskInputs(used_infos, readers, ws, self.chunk)
        for s in range(0, numel, self.chunk):
            n = min(self.chunk, numel - s)
            loaded = [inputs.load(j, s, n, ws.get(f"in.{j}", chunk)[:n]) if info is not None else None
                      for j, info in enumerate(used_infos)]
            with np.errstate(all="ignore"):
                part = self.rule.combine_numpy(
                    loaded[0], [t for t in loaded[1:] if t is not None], ws.get("rule.out", chunk)[:n], ws
                )
                if part.size != n:
                    raise RuntimeError(
                        f"method {self.rule.name} produced {part.size} of {n} values for {name!r}"
                    )
                stage = ws.get("out.stage", chunk * 4, np.uint8)
                staged, finite = nops.store_checked(part, target.dtype, stage, ws.get("out.tmp", chunk, np.uint32)[:n])
                if not finite:
                    raise MergeInputError(_find_nonfinite(name, used_infos))
            yield self._copy(staged) if copy else staged

    def _merge_whole(
        self, name: str, target: OutTensor, infos: list[TensorInfo | None], readers: list[TensorReader],
        ws: Any, copy: bool,
    ) -> Iterator[Any]:
        """A rule's ``merge_numpy`` (not element-wise: it may read the whole tensor first); its float32
        parts checked and narrowed to the output dtype chunk by chunk."""
        import numpy as np

        from arm.merge import numpy_ops as nops

        inputs = NumpyDiskInputs(infos, readers, ws, self.chunk)
        chunk = max(1, min(self.chunk, inputs.numel))  # an empty tensor yields one empty part
        written = 0
        for part in self.rule.merge_numpy(name, inputs):
            with np.errstate(all="ignore"):
                for s in range(0, part.size, chunk):  # a refused tensor's pieces never reach the output folder
                    piece = part[s : s + chunk]
                    stage = ws.get("out.stage", chunk * 4, np.uint8)
                    staged, finite = nops.store_checked(piece, target.dtype, stage,
                                                        ws.get("out.tmp", chunk, np.uint32)[: piece.size])
                    if not finite:
                        raise MergeInputError(_find_nonfinite(name, infos))
                    yield self._copy(staged) if copy else staged
            written += part.size
        if written != inputs.numel:
            raise RuntimeError(f"method {self.rule.name} produced {written} of {inputs.numel} values for {name!r}")

    def close(self) -> None:
        for readers in self._all:
            for r in readers:
                r.close()


class NumpyDiskInputs:
    """:class:`DiskInputs` for the numpy path: one tensor of each input model as float32 numpy
    arrays, read chunk by chunk (``None`` for a slot the rule does not read)."""

    device_type = "cpu"

    def __init__(self, infos: Sequence[TensorInfo | None], readers: Sequence[TensorReader], ws: Any, chunk: int):
        present = [i for i in infos if i is not None]
        self.numel = present[0].numel
        self.chunk_elems = chunk
        self._infos, self._readers, self._ws = infos, readers, ws

    def scratch(self, key: str, numel: int, dtype: Any = None) -> Any:
        import numpy as np

        return self._ws.get(key, numel, dtype or np.float32)

    def load(self, slot: int, start: int, n: int, out: Any) -> Any:
        """Entries [start, start + n) of input ``slot`` into the float32 array ``out``."""
        import numpy as np

        from arm.merge import numpy_ops as nops

        info = self._infos[slot]
        assert info is not None
        if info.dtype == "F32":
            self._readers[slot].read_into_buffer(info, start, n, out)
            return out
        raw = self._ws.get("in.raw", self.chunk_elems * 4, np.uint8)
        for s in range(0, n, self.chunk_elems):  # the raw bytes a chunk at a time (bounded staging)
            m = min(self.chunk_elems, n - s)
            self._readers[slot].read_into_buffer(info, start + s, m, raw)
            nops.load_float32(raw[: m * itemsize(info.dtype)], info.dtype, out[s : s + m])
        return out

    def _split(self, loaded: list[Any]) -> tuple[Any, list[Any]]:
        return loaded[0], [t for t in loaded[1:] if t is not None]

    def chunks(self) -> Iterator[tuple[Any, list[Any]]]:
        chunk = min(self.chunk_elems, self.numel)
        for s in range(0, self.numel, self.chunk_elems):
            n = min(self.chunk_elems, self.numel - s)
            yield self._split([self.load(j, s, n, self.scratch(f"in.{j}", chunk)[:n]) if info is not None else None
                               for j, info in enumerate(self._infos)])

    def window(self, start: int, length: int) -> tuple[Any, list[Any]]:
        import numpy as np

        return self._split([self.load(j, start, length, np.empty(length, dtype=np.float32)) if info is not None
                            else None for j, info in enumerate(self._infos)])

    def full(self) -> tuple[Any, list[Any]]:
        return self._split([self.load(j, 0, self.numel, self.scratch(f"inputs.full.{j}", self.numel))
                            if info is not None else None for j, info in enumerate(self._infos)])


def write_state_dict(
    state: Mapping[str, torch.Tensor],
    base: Path,
    checkpoints: Sequence[Path],
    out_dir: Path,
    settings: EngineSettings,
    before_publish: Callable[[Path], None] | None = None,
) -> dict[str, Any]:
    """Write in-memory tensors as a model folder like a merge does (for whole-model methods).

    ``before_publish(tmp)`` writes the method's own files (e.g. ARM's diagnostics) into the temporary
    folder, so the folder appears at ``out_dir`` only when complete.

    Tensors must be exactly the base's (names and shapes, as ``plan_merge`` checks); they are
    written in the base's storage order, cast to ``settings.dtype`` (floats; default the base's
    dtype per tensor), sharded, with config and tokenizer files, atomically at ``out_dir``.
    """
    import torch

    out_dir = Path(out_dir)
    if out_dir.exists() and not settings.overwrite:
        raise FileExistsError(f"{out_dir}: output folder exists (set merge.overwrite=true to replace it)")
    base_f = ModelFolder(base)
    ck_f = [ModelFolder(c) for c in checkpoints]
    plan = plan_merge(base_f, ck_f, settings.dtype)
    missing = [n for n in plan.names if n not in state]
    extra = [n for n in state if n not in plan.inputs]
    if missing or extra:
        raise MergeInputError(f"state dict vs base {base}: missing {missing[:3]}, extra {extra[:3]}")
    try:
        tmp = temp_sibling(out_dir)
    except OSError as err:
        raise MergeOutputError(f"{out_dir}: cannot create its temporary sibling folder ({err.strerror or err})") from None
    writer = ShardedWriter(tmp, plan.out, settings.shard_size)
    published = False
    try:
        for name, target in zip(plan.names, plan.out, strict=True):
            t = state[name].detach()
            if tuple(t.shape) != target.shape:
                raise MergeInputError(
                    f"tensor {name!r} has shape {list(t.shape)}, the base's is {list(target.shape)}"
                )
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise MergeInputError(f"tensor {name!r} to write contains NaN or Inf")
            out = t.to(device="cpu", dtype=torch_dtype(target.dtype))
            if out.is_floating_point() and not bool(torch.isfinite(out).all()):  # finite in float32, not in the output dtype
                raise MergeInputError(f"tensor {name!r} overflows {target.dtype} (largest magnitude "
                                      f"{float(t.abs().max()):.3g}): check the method's parameters")
            writer.write_tensor(name, out)
        writer.close()
        copy_model_files(base_f, ck_f, tmp, settings.dtype)
        if before_publish is not None:
            before_publish(tmp)
        publish(tmp, out_dir, settings.overwrite)
        published = True
    except OSError as err:  # disk full, quota, I/O error: nothing at out_dir, the temporary folder removed below
        raise _write_error(err, out_dir, tmp) from None
    finally:
        writer.abort()
        if not published:
            shutil.rmtree(tmp, ignore_errors=True)
    return {"out_dir": str(out_dir), "n_tensors": len(plan.names), "shards": len(writer.shards)}


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool, method: str) -> Any:
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return _NoBar()
    return tqdm(total=total, unit="tensor", desc=f"merge {method}", leave=False)
