"""Task arithmetic: θ0 + λ Σ w_i (c_i − θ0).

mergekit 0.1.5 semantics (``merge_method: task_arithmetic``): ``normalize`` (default false)
divides the weighted sum of task vectors by Σ w_i (by 1 when |Σ w_i| < 1e-8) before λ is applied.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from arm.merge import numpy_ops as nops
from arm.merge.contract import ElementwiseRule, check_bool, check_number, check_weights

if TYPE_CHECKING:
    import numpy as np
    import torch

    from arm.merge.numpy_ops import NumpyWorkspace


class TaskArithmetic(ElementwiseRule):
    name = "task_arithmetic"

    def __init__(
        self,
        n_checkpoints: int,
        weights: Sequence[float] | None = None,
        normalize: bool = False,
        **kwargs: Any,
    ):
        super().__init__(n_checkpoints)
        self.weights = check_weights(weights, n_checkpoints)
        self.normalize = check_bool(normalize, "normalize")
        self.lam = check_number(kwargs.pop("lambda", 1.0), "lambda")
        if kwargs:
            raise TypeError(f"unexpected parameters {sorted(kwargs)}")
        total = sum(self.weights)
        self.divisor = total if self.normalize and abs(total) >= 1e-8 else 1.0

    @classmethod
    def accepted_params(cls) -> list[str]:
        return ["weights", "normalize", "lambda"]

    def params(self) -> dict[str, Any]:
        return {"weights": self.weights, "normalize": self.normalize, "lambda": self.lam}

    def combine(
        self, base: torch.Tensor | None, checkpoints: list[torch.Tensor], out: torch.Tensor
    ) -> torch.Tensor:
        import torch

        assert base is not None
        out.zero_()
        for c, w in zip(checkpoints, self.weights, strict=True):
            c.sub_(base)
            out.add_(c, alpha=w)
        if self.divisor != 1.0:
            out.div_(self.divisor)
        if self.lam != 1.0:
            out.mul_(self.lam)
        return torch.add(out, base, out=out)

    def combine_numpy(
        self, base: np.ndarray | None, checkpoints: list[np.ndarray], out: np.ndarray, ws: NumpyWorkspace
    ) -> np.ndarray:
        """:meth:`combine` on numpy float32 arrays, op for op (bit-identical)."""
        import numpy as np


        assert base is not None
        out.fill(0)
        for c, w in zip(checkpoints, self.weights, strict=True):
            np.subtract(c, base, out=c)
            nops.add_scaled_(out, c, w, ws)
        if self.divisor != 1.0:
            nops.div_(out, self.divisor)
        if self.lam != 1.0:
            nops.mul_(out, self.lam)
        return np.add(out, base, out=out)
