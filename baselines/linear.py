"""Linear merge (model soup / checkpoint averaging): Σ w_i c_i, divided by Σ w_i when normalized.

mergekit 0.1.5 semantics (``merge_method: linear``). The base model θ0 is not an input unless
``base_weight`` is set: mergekit adds a configured ``base_model`` to the averaged models (and then
requires a weight for it), which ``base_weight`` reproduces. Weights default to 1 per checkpoint,
so the default is the plain average of the early checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from arm.merge import numpy_ops as nops
from arm.merge.contract import ElementwiseRule, MergeConfigError, check_bool, check_number, check_weights

if TYPE_CHECKING:
    import numpy as np
    import torch

    from arm.merge.numpy_ops import NumpyWorkspace


class Linear(ElementwiseRule):
    name = "linear"
    uses_base = False

    def __init__(
        self,
        n_checkpoints: int,
        weights: Sequence[float] | None = None,
        normalize: bool = True,
        base_weight: float | None = None,
    ):
        super().__init__(n_checkpoints)
        self.weights = check_weights(weights, n_checkpoints)
        self.normalize = check_bool(normalize, "normalize")
        self.base_weight = None if base_weight is None else check_number(base_weight, "base_weight")
        self.uses_base = self.base_weight is not None  # type: ignore[misc]
        total = sum(self.weights) + (self.base_weight or 0.0)
        if self.normalize and abs(total) < 1e-8:
            raise MergeConfigError(f"merge.weights: the weights sum to {total}, cannot normalize")
        self.total = total

    def params(self) -> dict[str, Any]:
        return {"weights": self.weights, "normalize": self.normalize, "base_weight": self.base_weight}

    def combine(
        self, base: torch.Tensor | None, checkpoints: list[torch.Tensor], out: torch.Tensor
    ) -> torch.Tensor:
        import torch

        torch.mul(checkpoints[0], self.weights[0], out=out)
        for c, w in zip(checkpoints[1:], self.weights[1:], strict=True):
            out.add_(c, alpha=w)
        if base is not None and self.base_weight is not None:
            out.add_(base, alpha=self.base_weight)
        if self.normalize:
            out.div_(self.total)
        return out

    def combine_numpy(
        self, base: np.ndarray | None, checkpoints: list[np.ndarray], out: np.ndarray, ws: NumpyWorkspace
    ) -> np.ndarray:
        """:meth:`combine` on numpy float32 arrays, op for op (bit-identical)."""

        if nops.f32(self.weights[0]) == 1:
            out = checkpoints[0]  # x·1 is x bit for bit: the first input's (scratch) buffer accumulates, one pass less
        else:
            nops.mul(checkpoints[0], self.weights[0], out)
        for c, w in zip(checkpoints[1:], self.weights[1:], strict=True):
            nops.add_scaled_(out, c, w, ws)
        if base is not None and self.base_weight is not None:
            nops.add_scaled_(out, base, self.base_weight, ws)
        if self.normalize:
            nops.div_(out, self.total)
        return out
