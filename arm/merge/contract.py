"""The contracts of a merge method: every method is a :class:`MergeMethod`; it is either a per-tensor
:class:`TensorRule` (the baselines: the engine streams tensors through it) or a
:class:`WholeModelMethod` (ARM: it reads and writes whole model folders itself). The registry
(arm/merge/registry.py) maps ``merge.name`` to the class; the recipe for a new method is in
docs/extending.md.


A rule sees one tensor at a time through a :class:`TensorInputs`: the base model's tensor θ0 and
the early checkpoints' tensors c1..cm, always as float32 on the merge device, flattened to 1-D.
It yields the merged float32 values as consecutive 1-D chunks; the engine casts them to the
output dtype and streams them to disk. Element-wise rules work chunk by chunk (memory bounded by a
few chunks); rules that need whole-tensor statistics (TIES thresholds, DARE norms) ask for the
full tensors.
"""

from __future__ import annotations

import inspect
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch


class MergeConfigError(ValueError):
    """A merge configuration that cannot run (names the offending ``merge.<key>``)."""


class Workspace:
    """Scratch buffers reused from tensor to tensor: fresh multi-MB allocations page-fault on
    first touch, which cost more than the merge arithmetic itself."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(
        self, key: str, numel: int, device: torch.device, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """A 1-D buffer of ``numel`` entries (contents undefined), valid until ``key`` is asked for again."""
        import torch

        dtype = dtype or torch.float32
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            self._buffers.pop(key, None)
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[key] = buf
        return buf[:numel]


class TensorInputs(ABC):
    """One tensor of every input model, as float32 1-D tensors on ``device``."""

    numel: int
    device: torch.device
    chunk_elems: int  # the chunk length rules should use when they loop over full tensors
    workspace: Workspace

    def scratch(self, key: str, numel: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A reusable scratch buffer on the merge device (see :class:`Workspace`)."""
        return self.workspace.get(key, numel, self.device, dtype)

    @abstractmethod
    def chunks(self) -> Iterator[tuple[torch.Tensor | None, list[torch.Tensor]]]:
        """Consecutive slices ``(base, checkpoints)`` covering the tensor; buffers are reused
        between iterations, so a rule must not keep references to them."""

    @abstractmethod
    def full(self) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Whole tensors, which the rule may modify in place; they may be reused buffers, valid
        until the next tensor's inputs are read."""

    @abstractmethod
    def window(self, start: int, length: int) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Entries [start, start + length) as fresh tensors (for samples)."""


class InMemoryInputs(TensorInputs):
    """TensorInputs over tensors already in memory (unit tests, ARM, small models)."""

    def __init__(
        self,
        base: torch.Tensor | None,
        checkpoints: Sequence[torch.Tensor],
        chunk_elems: int = 1 << 20,
    ):
        ref = base if base is not None else checkpoints[0]
        self.device = ref.device
        self.numel = ref.numel()
        self.chunk_elems = chunk_elems
        self.workspace = Workspace()
        self._base = base.detach().reshape(-1) if base is not None else None
        self._ckpts = [c.detach().reshape(-1) for c in checkpoints]

    def chunks(self) -> Iterator[tuple[torch.Tensor | None, list[torch.Tensor]]]:
        import torch

        # copies, as rules may overwrite the chunks they are given
        for s in range(0, self.numel, self.chunk_elems):
            e = min(s + self.chunk_elems, self.numel)
            base = self._base[s:e].to(torch.float32, copy=True) if self._base is not None else None
            yield base, [c[s:e].to(torch.float32, copy=True) for c in self._ckpts]

    def full(self) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        return self.window(0, self.numel)

    def window(self, start: int, length: int) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        import torch

        end = start + length
        base = self._base[start:end].to(torch.float32, copy=True) if self._base is not None else None
        return base, [c[start:end].to(torch.float32, copy=True) for c in self._ckpts]


PROJECT_PACKAGES = ("arm", "baselines")
ENGINE_MODULES = ("arm.merge.engine", "arm.merge.tensor_io", "arm.merge.numpy_ops", "arm.merge.contract")
"""The code every merge runs through: part of every method's merge key."""


def project_imports(module: ModuleType) -> set[str]:
    """The project modules `module` uses at its top level (modules, classes and functions it imported),
    outside arm.core (errors, caching: they do not change merged values)."""
    found = set()
    for value in vars(module).values():
        name = value.__name__ if isinstance(value, ModuleType) else getattr(value, "__module__", None)
        if (isinstance(name, str) and name.split(".")[0] in PROJECT_PACKAGES and not name.startswith("arm.core")
                and name in sys.modules):
            found.add(name)
    return found


class MergeMethod(ABC):
    """What the registry, the engine and the job ask of every merge method.

    - ``name``: the key of ``conf/merge/<name>.yaml`` and of the registry;
    - ``accepted_params()`` / ``validate_params(params)``: its config keys, checked before any work
      (raise :class:`MergeConfigError` naming ``merge.<key>``);
    - ``uses_calibration(params)``: whether its weights depend on calibration data (the job then passes
      the domain's train split and puts the data's key into the merge key);
    - ``write_report(out_dir)``: figures drawn from the written merge (optional; not part of the merge).
    - ``code_modules()``: the code that defines its merged weights, part of the merge key: by default
      the module defining the class (wherever it lives), every project module it uses (outside
      arm.core), and the engine.
    """

    name: ClassVar[str]

    @classmethod
    @abstractmethod
    def accepted_params(cls) -> list[str]:
        """The config keys this method takes."""

    @classmethod
    @abstractmethod
    def validate_params(cls, params: Mapping[str, Any]) -> Any:
        """Check the parameters (the number of checkpoints is not known yet)."""

    @classmethod
    def uses_calibration(cls, params: Mapping[str, Any]) -> bool:
        return False

    @classmethod
    def write_report(cls, out_dir: Path) -> list[Path]:
        """Figures drawn from a finished merge's files (ARM: diagnostics.png from diagnostics.json), by the
        job and the merge CLI after the merge. Not part of the merge (nor of its cost, as SFT's curves are
        not part of SFT's): the merged weights do not depend on it. Returns the files it wrote."""
        return []

    @classmethod
    def report_pending(cls, out_dir: Path, params: Mapping[str, Any], base: Path, checkpoints: Sequence[Path]) -> bool:
        """Whether ``out_dir`` is this very merge (same parameters and inputs), complete but for its report (a run
        stopped between publishing the model and drawing its figures): the merge CLI then finishes the report
        instead of refusing the existing folder. Methods without a report: never."""
        return False

    @classmethod
    def code_modules(cls) -> list[ModuleType]:
        names = set(ENGINE_MODULES)
        for klass in cls.__mro__:
            module = sys.modules.get(klass.__module__)
            # the class's own module always (a method may live outside the project), its bases' within it
            if module is not None and (klass is cls or klass.__module__.split(".")[0] in PROJECT_PACKAGES):
                names.add(klass.__module__)
                names |= project_imports(module)
        for name in ENGINE_MODULES:
            __import__(name)
        return [sys.modules[n] for n in sorted(names)]


class WholeModelMethod(MergeMethod):
    """A method that merges whole model folders itself (ARM: an iteration over the whole model)."""

    @classmethod
    @abstractmethod
    def merge_folder(cls, params: Mapping[str, Any], base: Path, checkpoints: Sequence[Path], out_dir: Path,
                     settings: Any, *, progress: bool = True, context: Any = None) -> dict[str, Any]:
        """Merge ``checkpoints`` (ordered by step) from ``base`` and write a complete HF folder at ``out_dir``;
        return the summary (``params`` at least). ``context`` is the engine's MergeContext (calibration records,
        the converged checkpoint for diagnostics only, a metrics logger)."""


class TensorRule(MergeMethod):
    """A merge method that computes each output tensor from the same tensor of its inputs.

    Subclasses declare ``name``, which inputs they read (``uses_base``; ``uses_checkpoints`` =
    ``"all"`` or ``"last"``) and take their parameters as keyword arguments of ``__init__`` after
    ``n_checkpoints`` — exactly the keys of their ``conf/merge/<name>.yaml``.
    """

    name: ClassVar[str]
    uses_base: ClassVar[bool] = True
    uses_checkpoints: ClassVar[str] = "all"
    elementwise: ClassVar[bool] = False

    def __init__(self, n_checkpoints: int):
        if n_checkpoints < 1:
            raise MergeConfigError(f"{self.name} needs at least one checkpoint, got {n_checkpoints}")
        self.n_checkpoints = n_checkpoints

    @classmethod
    def accepted_params(cls) -> list[str]:
        """The config keys this rule takes (its keyword parameters)."""
        sig = inspect.signature(cls.__init__).parameters.values()
        return [
            p.name
            for p in sig
            if p.name not in ("self", "n_checkpoints") and p.kind is not inspect.Parameter.VAR_KEYWORD
        ]

    @classmethod
    def from_params(cls, params: Mapping[str, Any], n_checkpoints: int) -> TensorRule:
        """Build the rule from config keys, naming any key it does not take."""
        accepted = cls.accepted_params()
        unknown = sorted(set(params) - set(accepted))
        if unknown:
            raise MergeConfigError(
                f"merge.{unknown[0]}: not a parameter of method {cls.name!r} (it takes: {', '.join(accepted)})"
            )
        return cls(n_checkpoints, **dict(params))

    @classmethod
    def validate_params(cls, params: Mapping[str, Any]) -> None:
        """Build the rule once: per-checkpoint lists are checked against each other (their number of
        checkpoints is not known yet), every key and value against the rule's own checks."""
        lengths = {len(v) for v in params.values() if isinstance(v, list | tuple)}
        if len(lengths) > 1:
            raise MergeConfigError(f"merge: per-checkpoint lists of different lengths {sorted(lengths)}")
        cls.from_params(params, lengths.pop() if lengths else 1)

    def needs_prepare(self) -> bool:
        """Whether :meth:`prepare` must see every tensor before the first is merged (TIES's global trim)."""
        return False

    def prepare(self, tensors: Iterator[tuple[str, TensorInputs]]) -> None:
        """A pass over every floating-point tensor, ``(name, inputs)`` one at a time (the same inputs the merge
        gets, memory bounded per tensor), before any is merged; only called when :meth:`needs_prepare`."""

    def checkpoint_mask(self, n: int) -> list[bool]:
        """Which of the ``n`` checkpoints the rule reads (``uses_checkpoints``; a window rule overrides it).
        The engine reads only these and passes them to the rule in step order."""
        return [self.uses_checkpoints != "last" or i == n - 1 for i in range(n)]

    @abstractmethod
    def params(self) -> dict[str, Any]:
        """The resolved parameters (for the run summary)."""

    @abstractmethod
    def merge(self, name: str, inputs: TensorInputs) -> Iterator[torch.Tensor]:
        """Yield the merged tensor as consecutive float32 1-D chunks."""

    def merges_numpy(self) -> bool:
        """Whether :meth:`merge_numpy` can run this configuration (a CPU merge then never imports torch)."""
        return False

    def merge_numpy(self, name: str, inputs: Any) -> Iterator[Any]:
        """:meth:`merge` on float32 numpy arrays, bit-identical to it on CPU: ``inputs`` has ``numel``,
        ``chunk_elems``, ``full()``, ``chunks()``, ``window(start, length)`` and ``scratch(key, numel)``
        as :class:`TensorInputs`, with numpy arrays for tensors (``arm.merge.engine.NumpyDiskInputs``).
        Only called where :meth:`merges_numpy` says so."""
        raise NotImplementedError(f"method {self.name!r} has no numpy merge")

    def apply(
        self, name: str, base: torch.Tensor | None, checkpoints: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """Merge in-memory tensors (float32 result with the input's shape)."""
        import torch

        ref = base if base is not None else checkpoints[-1]
        if not self.uses_base:
            base = None
        mask = self.checkpoint_mask(len(checkpoints))
        checkpoints = [c for c, used in zip(checkpoints, mask, strict=True) if used]
        parts = [c.clone() for c in self.merge(name, InMemoryInputs(base, checkpoints))]
        return torch.cat(parts).reshape(ref.shape) if parts else torch.empty(ref.shape)


class ElementwiseRule(TensorRule):
    """A rule whose output element i depends only on the input elements i."""

    elementwise = True

    @abstractmethod
    def combine(
        self, base: torch.Tensor | None, checkpoints: list[torch.Tensor], out: torch.Tensor
    ) -> torch.Tensor:
        """Compute one chunk into ``out`` (same length) and return it; inputs may be overwritten."""

    # Optional: ``combine_numpy(base, checkpoints, out, ws)``, the same computation on float32
    # numpy arrays (``ws``: a ``arm.merge.numpy_ops.NumpyWorkspace``), bit-identical to
    # ``combine`` on CPU. A CPU merge of a rule that has one runs without torch (see
    # ``arm.merge.engine``); a subclass that overrides ``combine`` only does not inherit it.
    combine_numpy: ClassVar[Any] = None

    def merge(self, name: str, inputs: TensorInputs) -> Iterator[torch.Tensor]:
        out = inputs.scratch("rule.out", min(inputs.chunk_elems, inputs.numel))
        for base, ckpts in inputs.chunks():
            yield self.combine(base, ckpts, out[: ckpts[0].numel()])


# ---------------------------------------------------------------------------------------------
# parameter validation helpers


def check_weights(weights: Sequence[float] | None, n: int, key: str = "weights") -> list[float]:
    """Per-checkpoint weights; ``None`` means 1.0 each."""
    if weights is None:
        return [1.0] * n
    if isinstance(weights, (int, float)) or isinstance(weights, str):
        raise MergeConfigError(
            f"merge.{key}: expected a list of {n} numbers (one per checkpoint), got {weights!r}"
        )
    out = [check_number(w, f"{key}[{i}]") for i, w in enumerate(weights)]
    if len(out) != n:
        raise MergeConfigError(f"merge.{key}: {len(out)} weights given for {n} checkpoints")
    return out


def check_number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MergeConfigError(f"merge.{key}: expected a number, got {value!r}")
    if value != value or value in (float("inf"), float("-inf")):
        raise MergeConfigError(f"merge.{key}: must be finite, got {value!r}")
    return float(value)


def check_bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise MergeConfigError(f"merge.{key}: expected true or false, got {value!r}")
    return value


def check_fraction(value: Any, key: str, *, low_open: bool = True, high_open: bool = False) -> float:
    """A number in (0, 1] by default."""
    x = check_number(value, key)
    lo_ok = x > 0 if low_open else x >= 0
    hi_ok = x < 1 if high_open else x <= 1
    if not (lo_ok and hi_ok):
        interval = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
        raise MergeConfigError(f"merge.{key}: must be in {interval}, got {value!r}")
    return x


def per_checkpoint(value: Any, n: int, key: str, check: Any) -> list[float]:
    """A scalar applied to every checkpoint, or a list with one value per checkpoint."""
    if isinstance(value, (list, tuple)) or (hasattr(value, "__len__") and not isinstance(value, str)):
        values = list(value)
        if len(values) != n:
            raise MergeConfigError(f"merge.{key}: {len(values)} values given for {n} checkpoints")
        return [check(v, f"{key}[{i}]") for i, v in enumerate(values)]
    return [check(value, key)] * n
