"""DARE (drop and rescale, Yu et al. 2024), optionally with TIES' sign consensus.

For every tensor and checkpoint, d_i = c_i − θ0; each entry is dropped with probability
``drop_rate`` (a Bernoulli mask, drawn per block of 2^20 entries from a CPU generator seeded by
``seed``, the tensor name, the checkpoint index and the block — deterministic, independent of
device and chunking); the kept entries are rescaled:
- ``rescale: l1`` (mergekit's dare_linear/dare_ties): scale the masked delta so its L1 norm
  equals the unmasked one (unchanged when either norm is below 1e-7);
- ``rescale: inverse`` (the DARE paper): divide the kept entries by 1 − drop_rate;
- ``rescale: none``.
Then, as in mergekit: d_i ← w_i d_i; with ``consensus: sum`` TIES' sign election and disjoint
sum (see ties.py), else a plain sum; ``normalize`` divides by the summed (agreeing) weights;
θ = θ0 + λ · merged.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from arm.merge.contract import (
    MergeConfigError,
    TensorInputs,
    TensorRule,
    check_bool,
    check_fraction,
    check_number,
    check_weights,
)
from baselines.ties import DeltaCombiner

if TYPE_CHECKING:
    import torch

RESCALES = ("l1", "inverse", "none")
CONSENSUS = (None, "sum")


MASK_BLOCK = 1 << 20  # masks are drawn per block of entries, so chunking and device never change them


def mask_seed(seed: int, tensor_name: str, index: int, block: int = 0) -> int:
    """A 63-bit generator seed from the run seed, tensor name, checkpoint index and block."""
    digest = hashlib.sha256(f"{seed}\0{tensor_name}\0{index}\0{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def keep_mask(n: int, keep: float, seed: int) -> torch.Tensor:
    """A CPU bool mask of n entries, each True with probability ``keep``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=gen) < keep


class MaskStream:
    """The keep-mask of one tensor and checkpoint, block by block (block b is drawn from
    ``mask_seed(seed, name, index, b)``), served for any range of entries."""

    def __init__(self, seed: int, name: str, index: int, numel: int, keep: float):
        self.seed, self.name, self.index, self.numel, self.keep = seed, name, index, numel, keep
        self._block, self._mask = -1, None

    def _get_block(self, b: int) -> torch.Tensor:
        if b != self._block:
            length = min(MASK_BLOCK, self.numel - b * MASK_BLOCK)
            self._mask = keep_mask(length, self.keep, mask_seed(self.seed, self.name, self.index, b))
            self._block = b
        assert self._mask is not None
        return self._mask

    def range(self, start: int, end: int) -> torch.Tensor:
        import torch

        parts = []
        pos = start
        while pos < end:
            b = pos // MASK_BLOCK
            block = self._get_block(b)
            lo = pos - b * MASK_BLOCK
            hi = min(end, (b + 1) * MASK_BLOCK) - b * MASK_BLOCK
            parts.append(block[lo:hi])
            pos = b * MASK_BLOCK + hi
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class Dare(TensorRule):
    name = "dare"

    def __init__(
        self,
        n_checkpoints: int,
        drop_rate: float = 0.5,
        rescale: str = "l1",
        consensus: str | None = None,
        weights: Sequence[float] | None = None,
        normalize: bool = False,
        seed: int = 0,
        **kwargs: Any,
    ):
        super().__init__(n_checkpoints)
        self.drop_rate = check_fraction(drop_rate, "drop_rate", low_open=False, high_open=True)
        if rescale not in RESCALES:
            raise MergeConfigError(f"merge.rescale: must be one of {RESCALES}, got {rescale!r}")
        if consensus not in CONSENSUS:
            raise MergeConfigError(f"merge.consensus: must be null or 'sum', got {consensus!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise MergeConfigError(f"merge.seed: expected an integer, got {seed!r}")
        self.rescale, self.consensus, self.seed = rescale, consensus, seed
        self.weights = check_weights(weights, n_checkpoints)
        self.normalize = check_bool(normalize, "normalize")
        self.lam = check_number(kwargs.pop("lambda", 1.0), "lambda")
        if kwargs:
            raise TypeError(f"unexpected parameters {sorted(kwargs)}")

    @classmethod
    def accepted_params(cls) -> list[str]:
        return ["drop_rate", "rescale", "consensus", "weights", "normalize", "lambda", "seed"]

    def params(self) -> dict[str, Any]:
        return {
            "drop_rate": self.drop_rate,
            "rescale": self.rescale,
            "consensus": self.consensus,
            "weights": self.weights,
            "normalize": self.normalize,
            "lambda": self.lam,
            "seed": self.seed,
        }

    def merge(self, name: str, inputs: TensorInputs) -> Iterator[torch.Tensor]:
        import torch

        n, m = inputs.numel, len(self.weights)
        keep = 1.0 - self.drop_rate
        masks = [MaskStream(self.seed, name, i, n, keep) for i in range(m)] if self.drop_rate else []
        factors = [1.0] * m
        if masks and self.rescale == "inverse":
            factors = [1.0 / keep] * m
        elif masks and self.rescale == "l1":  # a first pass for the norms before and after dropping
            before, after = [0.0] * m, [0.0] * m
            pos = 0
            for base, cks in inputs.chunks():
                end = pos + cks[0].numel()
                for i, c in enumerate(cks):
                    d = c.sub_(base)
                    before[i] += float(d.abs().sum(dtype=torch.float64))
                    after[i] += float(
                        d.mul_(masks[i].range(pos, end).to(d.device)).abs().sum(dtype=torch.float64)
                    )
                pos = end
            factors = [b / a if b >= 1e-7 and a >= 1e-7 else 1.0 for b, a in zip(before, after, strict=True)]
        combine = DeltaCombiner(
            self.weights,
            consensus=self.consensus == "sum",
            normalize=self.normalize,
            lam=self.lam,
            scratch=inputs.scratch,
            size=min(inputs.chunk_elems, n),
        )
        pos = 0
        for base, cks in inputs.chunks():
            assert base is not None
            end = pos + cks[0].numel()
            deltas = []
            for i, c in enumerate(cks):
                d = c.sub_(base)
                if masks:
                    d.mul_(masks[i].range(pos, end).to(d.device))
                if factors[i] != 1.0:
                    d.mul_(factors[i])
                deltas.append(d)
            yield combine(base, deltas)
            pos = end
