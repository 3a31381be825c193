"""ExPO (model extrapolation, Zheng et al. 2024): θ = c_m + α (c_m − θ0).

Extrapolates from the last early checkpoint c_m along its update from the base θ0; it is also
ARM's ``rotation=none, direction=task_vector`` limit with α = T·η.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from arm.merge.contract import ElementwiseRule, check_number

if TYPE_CHECKING:
    import torch


class Expo(ElementwiseRule):
    name = "expo"
    uses_checkpoints = "last"

    def __init__(self, n_checkpoints: int, alpha: float = 0.5):
        super().__init__(n_checkpoints)
        self.alpha = check_number(alpha, "alpha")

    def params(self) -> dict[str, Any]:
        return {"alpha": self.alpha}

    def combine(
        self, base: torch.Tensor | None, checkpoints: list[torch.Tensor], out: torch.Tensor
    ) -> torch.Tensor:
        import torch

        assert base is not None
        last = checkpoints[-1]
        torch.sub(last, base, out=out)  # c_m − θ0
        return out.mul_(self.alpha).add_(last)
