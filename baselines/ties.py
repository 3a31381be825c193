"""TIES merging (Yadav et al. 2023) with mergekit 0.1.5 semantics (``merge_method: ties``).

For every tensor, with task vectors d_i = c_i − θ0:
1. trim: keep the ``density`` fraction of d_i's entries with the largest magnitude
   (k = max(1, int(density · n)) per tensor and checkpoint; the rest become 0);
2. weight: d_i ← w_i · d_i;
3. elect signs by sum: the majority sign is + where Σ_i d_i ≥ 0 and − elsewhere (an exact tie
   goes to +);
4. disjoint merge: sum the d_i whose sign equals the majority sign (zeros never agree);
5. normalize (default true): divide by the summed weights of the agreeing checkpoints (by 1 where
   none agrees);
6. θ = θ0 + λ · merged.

The trim threshold is the k-th largest |d_i|, found by selection in O(n), never by sorting the
tensor: a sample (windows spread over the tensor) brackets it, one counting pass keeps the few
candidates inside the bracket, and an exact k-th value of those gives the threshold (if the
bracket missed, it is widened and counted again). The whole merge streams the tensor in chunks:
one counting pass, one merging pass, memory bounded by a few chunks. Entries equal to the
threshold are all kept, so an exact tie at the threshold keeps more than k entries; mergekit's
argsort keeps an arbitrary k of them. With distinct magnitudes both keep the same set.

On CPU the counting pass and the whole combine (steps 1-6) run as two fused C kernels
(arm/merge/_kernels.c): one pass over the inputs each, the same float32 operations in the same
order as the torch path below, so the same output bytes (tests/test_ties_kernels.py). The torch
path runs on GPUs, where the extension was not built, and with ``ARM_MERGE_BACKEND=torch``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

from arm.merge.contract import (
    MergeConfigError,
    TensorInputs,
    TensorRule,
    check_bool,
    check_fraction,
    check_number,
    check_weights,
    per_checkpoint,
)

try:  # compiled by setup.py; a small module with no imports of its own
    from arm.merge import _kernels as _KERNELS
except ImportError:  # not built (no C compiler at install): the torch path
    _KERNELS = None

if TYPE_CHECKING:
    import numpy as np
    import torch

    Scratch = Callable[..., torch.Tensor]  # (key, numel, dtype=None) -> a reusable 1-D buffer

_EXACT_BELOW = 1 << 16  # tensors up to this size use torch.kthvalue on the whole |d|
_SAMPLE = None  # sample size; None: adaptive (sample_size)
_IN_MEMORY = 1 << 24  # tensors up to this size keep their deltas in memory (one read of the inputs)
_WINDOWS = 16  # the sample is read as this many windows at random offsets over the tensor
TRIMS = ("tensor", "global")  # trim each tensor (mergekit) | each task vector over all its entries (the TIES paper)
BACKEND_ENV = "ARM_MERGE_BACKEND"  # "torch": no C kernels (the same as arm.merge.engine.BACKEND_ENV)


def cpu_kernels() -> ModuleType | None:
    """The fused C kernels (arm.merge._kernels), or None where the extension was not built or
    ``ARM_MERGE_BACKEND=torch`` asks for the torch path."""
    if os.environ.get(BACKEND_ENV, "auto") == "torch":
        return None
    return _KERNELS


def kth_largest(values: torch.Tensor, k: int) -> float:
    """The k-th largest of a 1-D tensor (numpy's introselect: ~10x faster than torch.kthvalue on CPU)."""
    return kth_largest_np(values.detach().cpu().numpy(), k)


def kth_largest_np(arr: np.ndarray, k: int) -> float:
    """The k-th largest of a 1-D numpy array (introselect, in a copy)."""
    import numpy as np

    idx = arr.size - k
    return float(np.partition(arr, idx)[idx])


def sample_size(n: int) -> int:
    """About (2.5 n)^(2/3): balances selecting in the sample against selecting among the
    candidates in the bracket, whose share shrinks as 1/sqrt(sample size)."""
    return min(n, _SAMPLE or min(1 << 20, max(1 << 12, int((2.5 * n) ** (2 / 3)))))


def bracket(sample: torch.Tensor | np.ndarray, n: int, k: int) -> tuple[float, float]:
    """An interval [lo, hi] that holds the k-th largest of n values with high probability, from a
    sample of their magnitudes (5 standard deviations of the sample rank on either side)."""
    import numpy as np

    arr = sample if isinstance(sample, np.ndarray) else sample.detach().cpu().numpy()
    size = arr.size
    q = (n - k) / n  # fraction of entries below the threshold
    sd = math.sqrt(size * q * (1 - q))
    lo_rank = math.floor(q * size - 5 * sd - 8)
    hi_rank = math.ceil(q * size + 5 * sd + 8)
    ranks = [r for r in (lo_rank, hi_rank) if 0 <= r < size]
    part = np.partition(arr, ranks) if ranks else arr
    lo = float(part[lo_rank]) if lo_rank >= 0 else 0.0
    hi = float(part[hi_rank]) if hi_rank < size else math.inf
    return lo, hi


class ThresholdCounter:
    """Counts |d| > hi and keeps the |d| in [lo, hi], chunk by chunk (numpy on CPU: its
    comparisons and compress are 5-10x faster than torch's bool-output kernels in torch 2.13)."""

    def __init__(self, lo: float, hi: float, scratch: Scratch, size: int):
        self.lo, self.hi = lo, hi
        self.above = 0
        self.candidates: list[torch.Tensor] = []
        self._scratch, self._size = scratch, size

    def add(self, d: torch.Tensor) -> None:
        import torch

        m = d.numel()
        if d.device.type == "cpu":
            import numpy as np

            a = self._scratch("ties.abs", self._size).numpy()[:m]
            gt = self._scratch("ties.above", self._size, torch.bool).numpy()[:m]
            ins = self._scratch("ties.inside", self._size, torch.bool).numpy()[:m]
            np.abs(d.numpy(), out=a)
            np.greater(a, np.float32(self.hi), out=gt)
            self.above += int(np.count_nonzero(gt))
            np.greater_equal(a, np.float32(self.lo), out=ins)
            np.logical_xor(ins, gt, out=ins)  # lo <= |d| <= hi
            self.candidates.append(torch.from_numpy(np.compress(ins, a)))
            return
        a = torch.abs(d, out=self._scratch("ties.abs", self._size)[:m])
        gt = torch.gt(a, self.hi, out=self._scratch("ties.above", self._size, torch.bool)[:m])
        self.above += int(torch.count_nonzero(gt))
        ins = torch.ge(a, self.lo, out=self._scratch("ties.inside", self._size, torch.bool)[:m])
        ins.logical_xor_(gt)
        self.candidates.append(torch.masked_select(a, ins))

    def resolve(self, k: int) -> float | None:
        """The k-th largest |d|, or None when it lies outside the bracket (then widen it)."""
        import torch

        rank = k - self.above  # the threshold's rank (from the top) among the candidates
        cand = torch.cat(self.candidates).cpu() if self.candidates else torch.empty(0)
        if 1 <= rank <= cand.numel():
            return kth_largest(cand, rank)
        self.widen(rank)
        return None

    def widen(self, rank: int) -> None:
        """Move the bracket past where the threshold was missed and start counting anew."""
        if rank < 1:  # more than k entries above hi: the threshold is above the bracket
            self.lo, self.hi = self.hi, math.inf
        else:  # the threshold is below the bracket
            self.lo, self.hi = 0.0, self.lo
        self.above, self.candidates = 0, []


class KernelCounter(ThresholdCounter):
    """:class:`ThresholdCounter` of ``c − base`` by the C kernel, on float32 numpy arrays: one
    pass, the deltas never written."""

    def __init__(self, lo: float, hi: float, kernels: ModuleType, candidates: np.ndarray):
        self.lo, self.hi = lo, hi
        self.above = 0
        self.candidates: list[Any] = []
        self._kernels, self._cand = kernels, candidates  # a buffer of at least chunk + 1 entries

    def add_pair(self, c: np.ndarray, base: np.ndarray) -> None:
        above, kept = self._kernels.ties_count(c, base, self.lo, self.hi, self._cand[: c.size + 1])
        self.above += above
        if kept:
            self.candidates.append(self._cand[:kept].copy())

    def resolve(self, k: int) -> float | None:
        import numpy as np

        rank = k - self.above
        n_cand = sum(c.size for c in self.candidates)
        if 1 <= rank <= n_cand:
            return kth_largest_np(np.concatenate(self.candidates), rank)
        self.widen(rank)
        return None


def trim_threshold(delta: torch.Tensor, k: int, chunk: int, scratch: Scratch | None = None) -> float:
    """The k-th largest |delta| of an in-memory flat float32 tensor, without sorting it."""
    import torch

    n = delta.numel()
    if n <= _EXACT_BELOW:
        return kth_largest(delta.abs(), k)
    gen = torch.Generator().manual_seed(n)
    idx = torch.randint(0, n, (sample_size(n),), generator=gen).to(delta.device)
    counter = ThresholdCounter(
        *bracket(delta[idx].abs(), n, k), scratch or _fresh(delta.device), min(chunk, n)
    )
    while True:
        for s in range(0, n, chunk):
            counter.add(delta[s : s + chunk])
        t = counter.resolve(k)
        if t is not None:
            return t


def _fresh(device: torch.device) -> Scratch:
    import torch

    def scratch(key: str, numel: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.empty(numel, dtype=dtype or torch.float32, device=device)

    return scratch


def shrink_level(threshold: float) -> float | None:
    """The hardshrink level that zeroes exactly |x| < threshold (float32), None for no trimming."""
    import numpy as np

    if threshold <= 0:
        return None
    t = np.float32(threshold)
    return float(np.nextafter(t, np.float32(-math.inf)))  # hardshrink zeroes |x| <= level


def trim_(delta: torch.Tensor, threshold: float) -> torch.Tensor:
    """Zero the entries with |delta| < threshold, in place."""
    import torch

    level = shrink_level(threshold)
    if level is not None:
        torch.hardshrink(delta, level, out=delta)
    return delta


class DeltaCombiner:
    """θ0 + λ · merge(w_i d_i) for one chunk (deltas modified in place, result written into base).

    With ``consensus`` the merge is TIES' sign election and disjoint (weighted) sum, else a plain
    weighted sum; ``normalize`` divides by the summed weights (of the agreeing inputs with
    consensus, by 1 where none agrees; without consensus by Σ w_i unless |Σ w_i| < 1e-8).
    ``levels`` trims each delta first (hardshrink levels from :func:`shrink_level`).
    Float-only ops throughout: torch's bool-output comparisons are slow on CPU.
    """

    def __init__(
        self,
        weights: Sequence[float],
        *,
        consensus: bool,
        normalize: bool,
        lam: float,
        scratch: Scratch,
        size: int,
        levels: Sequence[float | None] | None = None,
    ):
        self.weights, self.consensus, self.normalize, self.lam = list(weights), consensus, normalize, lam
        self.levels = list(levels) if levels is not None else [None] * len(self.weights)
        self.all_positive = all(w > 0 for w in self.weights)
        self.total = sum(self.weights)
        self._scratch, self._size = scratch, size

    def __call__(self, base: torch.Tensor, deltas: list[torch.Tensor]) -> torch.Tensor:
        import torch

        m = base.numel()
        buf = self._scratch
        for x, level, w in zip(deltas, self.levels, self.weights, strict=True):
            if level is not None:
                torch.hardshrink(x, level, out=x)
            if w != 1.0:
                x.mul_(w)
        if self.consensus:
            return self._consensus(base, deltas, m)
        mx = buf("ties.mixed", self._size)[:m]
        mx.copy_(deltas[0])
        for x in deltas[1:]:
            mx.add_(x)
        if self.normalize and abs(self.total) >= 1e-8:
            mx.div_(self.total)
        if self.lam != 1.0:
            mx.mul_(self.lam)
        return base.add_(mx)

    def _consensus(self, base: torch.Tensor, deltas: list[torch.Tensor], m: int) -> torch.Tensor:
        """Sign election and disjoint sum; the first delta's storage accumulates the sum, and the
        elected sign is folded into the divisor (22 passes for three inputs, not 28)."""
        import torch

        buf = self._scratch
        ss, sg, dv, ind = (buf(f"ties.{k}", self._size)[:m] for k in ("sum", "sign", "div", "agree"))
        if len(deltas) > 1:
            torch.add(deltas[0], deltas[1], out=ss)
            for x in deltas[2:]:
                ss.add_(x)
        else:
            ss.copy_(deltas[0])
        torch.copysign(torch.ones((), dtype=ss.dtype), ss, out=sg)  # +1 where the sum is >= 0, -1 elsewhere
        mx = deltas[0]
        for i, (x, w) in enumerate(zip(deltas, self.weights, strict=True)):
            x.mul_(sg).clamp_min_(0)  # |x| where x agrees with the elected sign, else 0
            if self.normalize:  # + w_i where it agrees
                if i == 0:
                    torch.sign(x, out=dv)
                    if w != 1.0:
                        dv.mul_(w)
                else:
                    dv.add_(torch.sign(x, out=ind), alpha=w)
            if i:
                mx.add_(x)
        if not self.normalize:
            mx.mul_(sg)
            if self.lam != 1.0:
                mx.mul_(self.lam)
            return base.add_(mx)
        if self.all_positive:
            dv.clamp_min_(min(self.weights))  # exact: a non-zero divisor is >= min(w)
        else:
            dv.masked_fill_(dv == 0, 1.0)
        dv.mul_(sg)  # mx / (dv·sg) == (mx·sg) / dv, bit for bit
        if self.lam == 1.0:
            return base.addcdiv_(mx, dv)
        return base.add_(mx.div_(dv).mul_(self.lam))


def sample_deltas(inputs: TensorInputs, size: int, seed: int) -> list[torch.Tensor]:
    """|c_i − θ0| at ``size`` positions: ``_WINDOWS`` windows at seeded random offsets."""
    import torch

    n = inputs.numel
    length = max(1, -(-size // _WINDOWS))
    gen = torch.Generator().manual_seed(seed)
    starts = sorted(torch.randint(0, max(1, n - length + 1), (min(_WINDOWS, n),), generator=gen).tolist())
    parts: list[list[torch.Tensor]] = []
    for s in starts:
        base, cks = inputs.window(s, min(length, n - s))
        assert base is not None
        parts.append([c.sub_(base).abs_() for c in cks])
    return [torch.cat([p[i] for p in parts]) for i in range(len(parts[0]))]


class Ties(TensorRule):
    name = "ties"

    def __init__(
        self,
        n_checkpoints: int,
        density: float | Sequence[float] = 0.5,
        weights: Sequence[float] | None = None,
        normalize: bool = True,
        trim: str = "tensor",
        **kwargs: Any,
    ):
        super().__init__(n_checkpoints)
        self.density = per_checkpoint(density, n_checkpoints, "density", check_fraction)
        self.weights = check_weights(weights, n_checkpoints)
        self.normalize = check_bool(normalize, "normalize")
        self.lam = check_number(kwargs.pop("lambda", 1.0), "lambda")
        if trim not in TRIMS:
            raise MergeConfigError(f"merge.trim: expected one of {', '.join(TRIMS)}, got {trim!r}")
        self.trim = trim
        self.global_thresholds: list[float] | None = None
        if kwargs:
            raise TypeError(f"unexpected parameters {sorted(kwargs)}")

    @classmethod
    def accepted_params(cls) -> list[str]:
        return ["density", "weights", "normalize", "lambda", "trim"]

    def params(self) -> dict[str, Any]:
        density = self.density[0] if len(set(self.density)) == 1 else self.density
        out = {"density": density, "weights": self.weights, "normalize": self.normalize, "lambda": self.lam,
               "trim": self.trim}
        if self.global_thresholds is not None:
            out["global_thresholds"] = self.global_thresholds
        return out

    def needs_prepare(self) -> bool:
        return self.trim == "global" and any(d < 1 for d in self.density)

    def prepare(self, tensors: Iterator[tuple[str, TensorInputs]]) -> None:
        """The paper's trim: one threshold per task vector over all of its entries — the k-th largest |d_i|
        over every float tensor, k = max(1, int(density · N)). Exact, in two passes over the inputs with
        65,536-bin histograms of the float32 bit patterns of |d_i| (monotonic for non-negative floats):
        the high 16 bits find the bin holding the k-th largest, the low 16 bits of that bin's entries its value."""
        items = list(tensors)  # (name, inputs): lazy readers, no tensor data yet
        self.global_thresholds = global_thresholds(items, self.density)

    def merge(self, name: str, inputs: TensorInputs) -> Iterator[torch.Tensor]:
        n, chunk = inputs.numel, inputs.chunk_elems
        size = min(chunk, n)
        ks, todo, thresholds = self._plan(n)
        if inputs.device.type == "cpu" and cpu_kernels() is not None:  # the C kernels, on numpy views
            import torch

            for part in self._merge_kernels(inputs.numel, thresholds, todo, ks, _NumpyView(inputs)):
                yield torch.from_numpy(part)
            return
        if n <= _IN_MEMORY:
            # moderate tensors: deltas held in (reused) memory, one read of the inputs
            base, cks = inputs.full()
            assert base is not None
            for s in range(0, n, chunk):
                for c in cks:
                    c[s : s + chunk].sub_(base[s : s + chunk])
            for i in todo:
                thresholds[i] = trim_threshold(cks[i], ks[i], chunk, inputs.scratch)
            pairs: Iterator[tuple[torch.Tensor, list[torch.Tensor]]] = (
                (base[s : s + chunk], [c[s : s + chunk] for c in cks]) for s in range(0, n, chunk)
            )
        else:
            # large tensors (embeddings): two streaming passes, memory bounded by a few chunks
            samples = sample_deltas(inputs, sample_size(n), seed=n)
            counters = {
                i: ThresholdCounter(*bracket(samples[i], n, ks[i]), inputs.scratch, size) for i in todo
            }
            while todo:
                for base, cks in inputs.chunks():
                    assert base is not None
                    for i in todo:
                        counters[i].add(cks[i].sub_(base))
                for i in list(todo):
                    t = counters[i].resolve(ks[i])
                    if t is not None:
                        thresholds[i] = t
                        todo.remove(i)
            pairs = ((b, [c.sub_(b) for c in cks]) for b, cks in inputs.chunks())  # type: ignore[arg-type]
        combine = DeltaCombiner(
            self.weights,
            consensus=True,
            normalize=self.normalize,
            lam=self.lam,
            scratch=inputs.scratch,
            size=size,
            levels=[shrink_level(t) for t in thresholds],
        )
        for base_chunk, deltas in pairs:
            yield combine(base_chunk, deltas)

    def _plan(self, n: int) -> tuple[list[int], list[int], list[float]]:
        """(k per checkpoint, the checkpoints whose threshold is still to find, thresholds so far)."""
        ks = [max(1, int(d * n)) if d < 1 else 0 for d in self.density]
        todo = [i for i, k in enumerate(ks) if k and n]
        thresholds = [0.0] * len(ks)
        if self.trim == "global":
            if self.global_thresholds is None and todo:
                raise RuntimeError("merge.trim: global needs the engine's prepare pass (arm.merge.engine.merge)")
            thresholds = list(self.global_thresholds or thresholds)
            todo = []
        return ks, todo, thresholds

    def merges_numpy(self) -> bool:
        """On the numpy path with the C kernels built (the global trim's prepare pass runs on torch)."""
        return not self.needs_prepare() and cpu_kernels() is not None

    def merge_numpy(self, name: str, inputs: Any) -> Iterator[np.ndarray]:
        ks, todo, thresholds = self._plan(inputs.numel)
        return self._merge_kernels(inputs.numel, thresholds, todo, ks, inputs)

    def _merge_kernels(
        self, n: int, thresholds: list[float], todo: list[int], ks: list[int], inputs: Any
    ) -> Iterator[np.ndarray]:
        """TIES by the C kernels on float32 numpy arrays (``inputs`` as for :meth:`merge_numpy`):
        the thresholds exact as on the torch path (the sample that brackets them is numpy's, the
        k-th largest the same), the combine the same float32 operations: the same output bytes."""
        import numpy as np

        kernels = cpu_kernels()
        assert kernels is not None
        chunk = inputs.chunk_elems
        cand = inputs.scratch("ties.cand", min(chunk, n) + 1)
        rng = np.random.default_rng(n)
        if n <= _IN_MEMORY:
            base, cks = inputs.full()
            for i in todo:
                if n <= _EXACT_BELOW:
                    thresholds[i] = kth_largest_np(np.abs(cks[i] - base), ks[i])
                    continue
                idx = rng.integers(0, n, sample_size(n))
                counter = KernelCounter(*bracket(np.abs(cks[i][idx] - base[idx]), n, ks[i]), kernels, cand)
                t = None
                while t is None:
                    for s in range(0, n, chunk):
                        counter.add_pair(cks[i][s : s + chunk], base[s : s + chunk])
                    t = counter.resolve(ks[i])
                thresholds[i] = t
            pairs: Iterator[tuple[np.ndarray, list[np.ndarray]]] = iter([(base, cks)])  # one call, in blocks
        else:  # too large to hold: a sample, counting passes over the streamed chunks, a merging pass
            samples = _sample_numpy(inputs, sample_size(n), rng)
            counters = {i: KernelCounter(*bracket(samples[i], n, ks[i]), kernels, cand) for i in todo}
            while todo:
                for base, cks in inputs.chunks():
                    for i in todo:
                        counters[i].add_pair(cks[i], base)
                for i in list(todo):
                    t = counters[i].resolve(ks[i])
                    if t is not None:
                        thresholds[i] = t
                        todo.remove(i)
            pairs = inputs.chunks()
        levels = [-1.0 if lv is None else lv for lv in (shrink_level(t) for t in thresholds)]
        positive = all(w > 0 for w in self.weights)
        for base, cks in pairs:
            kernels.ties_combine(base, cks, levels, self.weights, self.normalize, self.lam, positive, min(self.weights))
            yield base


def _sample_numpy(inputs: Any, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """:func:`sample_deltas` on numpy inputs: |c_i − θ0| in ``_WINDOWS`` windows at random offsets."""
    import numpy as np

    n = inputs.numel
    length = max(1, -(-size // _WINDOWS))
    starts = sorted(rng.integers(0, max(1, n - length + 1), min(_WINDOWS, n)).tolist())
    parts = []
    for s in starts:
        base, cks = inputs.window(s, min(length, n - s))
        parts.append([np.abs(c - base) for c in cks])
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]


class _NumpyView:
    """A CPU :class:`TensorInputs` seen as numpy arrays (views of its float32 tensors)."""

    def __init__(self, inputs: TensorInputs):
        self._in, self.numel, self.chunk_elems = inputs, inputs.numel, inputs.chunk_elems

    def scratch(self, key: str, numel: int) -> np.ndarray:
        return self._in.scratch(key, numel).numpy()

    def full(self) -> tuple[np.ndarray, list[np.ndarray]]:
        base, cks = self._in.full()
        assert base is not None
        return base.numpy(), [c.numpy() for c in cks]

    def chunks(self) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
        for base, cks in self._in.chunks():
            assert base is not None
            yield base.numpy(), [c.numpy() for c in cks]

    def window(self, start: int, length: int) -> tuple[np.ndarray, list[np.ndarray]]:
        base, cks = self._in.window(start, length)
        assert base is not None
        return base.numpy(), [c.numpy() for c in cks]


def global_thresholds(items: Sequence[tuple[str, TensorInputs]], density: Sequence[float]) -> list[float]:
    """Per checkpoint i, the k_i-th largest |c_i − θ0| over every entry of every tensor in ``items``
    (k_i = max(1, int(density_i · N))), exactly, by two histogram passes over float32 bit patterns."""
    import numpy as np

    total = sum(inputs.numel for _, inputs in items)
    ks = [max(1, int(d * total)) if d < 1 else 0 for d in density]
    m = len(density)
    hi = [np.zeros(1 << 16, dtype=np.int64) for _ in range(m)]

    def bits_of(inputs: TensorInputs) -> Iterator[list[np.ndarray]]:
        for base, cks in inputs.chunks():
            assert base is not None
            yield [np.abs(c.sub_(base).cpu().numpy()).view(np.uint32) for c in cks]

    for _, inputs in items:
        for parts in bits_of(inputs):
            for i in range(m):
                if ks[i]:
                    hi[i] += np.bincount(parts[i] >> 16, minlength=1 << 16)[: 1 << 16]
    bins, rank = [0] * m, [0] * m
    for i in range(m):
        if not ks[i]:
            continue
        above = np.cumsum(hi[i][::-1])  # entries in bins >= b, from the top
        b = (1 << 16) - 1 - int(np.searchsorted(above, ks[i]))  # the bin holding the k-th largest
        bins[i] = b
        rank[i] = ks[i] - (int(above[(1 << 16) - 2 - b]) if b < (1 << 16) - 1 else 0)  # its rank inside the bin
    lo = [np.zeros(1 << 16, dtype=np.int64) for _ in range(m)]
    for _, inputs in items:
        for parts in bits_of(inputs):
            for i in range(m):
                if ks[i]:
                    sel = parts[i][(parts[i] >> 16) == bins[i]]
                    lo[i] += np.bincount(sel & 0xFFFF, minlength=1 << 16)[: 1 << 16]
    out = []
    for i in range(m):
        if not ks[i]:
            out.append(0.0)
            continue
        above = np.cumsum(lo[i][::-1])
        low = (1 << 16) - 1 - int(np.searchsorted(above, rank[i]))
        out.append(float(np.array([(bins[i] << 16) | low], dtype=np.uint32).view(np.float32)[0]))
    return out
