"""ARM's learning-rate schedules (η_t, the merging coefficient of iteration t) and direction modes.

The paper (arXiv 2602.03237, abstract) states only that merging coefficients are treated as
learning rates. The schedules and the three direction modes below are this project's formulation
(``/work/shared/ARM.md``, "Our formulation"), not the paper's.

Schedules, for iterations t = 1..T with peak ``lr`` and ``warmup`` = W iterations (0 ≤ W < T):
- warm-up (t ≤ W): η_t = lr · t / (W + 1)  — a linear ramp that reaches ``lr`` at t = W + 1;
- after it, with u = (t − W − 1) / (T − W) ∈ [0, 1):
  ``constant``: η_t = lr;  ``linear``: η_t = lr · (1 − u);  ``cosine``: η_t = lr · ½(1 + cos πu).
  The first step after warm-up is ``lr`` and no step is 0 (the decays would reach 0 at t = T + 1).

Directions (per parameter, float32):
- ``task_vector``: g = c_m − θ0;
- ``delta``: g = c_m − c_{m−1} (m ≥ 2);
- ``ema``: d_i = (c_i − c_{i−1}) / (s_i − s_{i−1}) for i = 1..m with c_0 = θ0 at step s_0 = 0;
  e_1 = d_1, e_i = β e_{i−1} + (1 − β) d_i; g = e_m · (s_m − s_{m−1}) (rescaled to the last gap).
  With m = 1 this is the task vector; with β = 0 it is the last delta.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SCHEDULES = ("constant", "linear", "cosine")
DIRECTIONS = ("task_vector", "delta", "ema")
_STEP_RE = re.compile(r"^checkpoint-(\d+)$")


def lr_schedule(lr: float, iterations: int, schedule: str = "constant", warmup: int = 0) -> list[float]:
    """[η_1, …, η_T] (see the module docstring for the formulas)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if iterations < 1:
        raise ValueError(f"iterations must be ≥ 1, got {iterations}")
    if not 0 <= warmup < iterations:
        raise ValueError(f"warmup must be in [0, iterations) = [0, {iterations}), got {warmup}")
    etas = []
    span = iterations - warmup
    for t in range(1, iterations + 1):
        if t <= warmup:
            etas.append(lr * t / (warmup + 1))
            continue
        u = (t - warmup - 1) / span
        if schedule == "constant":
            etas.append(lr)
        elif schedule == "linear":
            etas.append(lr * (1.0 - u))
        else:
            etas.append(lr * 0.5 * (1.0 + math.cos(math.pi * u)))
    return etas


def checkpoint_step(path: Path | str) -> int:
    """The training step of a ``checkpoint-<step>`` folder (the base is step 0)."""
    match = _STEP_RE.match(Path(path).name)
    if match is None:
        raise ValueError(
            f"{path}: cannot read the training step from the folder name (expected checkpoint-<step>); "
            "direction=ema needs the steps of the early checkpoints"
        )
    return int(match.group(1))


def direction(
    mode: str,
    base: torch.Tensor,
    checkpoints: Sequence[torch.Tensor],
    steps: Sequence[int] | None = None,
    beta: float = 0.9,
) -> torch.Tensor:
    """The update direction g of one parameter (float32) from θ0 and c_1..c_m.

    ``steps`` are s_1 < … < s_m (needed by ``ema`` only; the base is step 0).
    """
    import torch

    m = len(checkpoints)
    if m == 0:
        raise ValueError("no early checkpoints: every direction needs at least one")
    f32 = [c.to(torch.float32) for c in checkpoints]
    b = base.to(torch.float32)
    if mode == "task_vector":
        return f32[-1] - b
    if mode == "delta":
        if m < 2:
            raise ValueError(f"direction=delta needs at least 2 early checkpoints (c_m − c_(m−1)), got {m}")
        return f32[-1] - f32[-2]
    if mode == "ema":
        if steps is None or len(steps) != m:
            raise ValueError(f"direction=ema needs one step per checkpoint, got {steps!r} for {m}")
        all_steps = [0, *[int(s) for s in steps]]
        if any(b2 <= a for a, b2 in zip(all_steps, all_steps[1:], strict=False)):
            raise ValueError(f"direction=ema needs increasing steps after the base (step 0), got {list(steps)}")
        prev = b
        ema: torch.Tensor | None = None
        for i, c in enumerate(f32):
            d = (c - prev) / float(all_steps[i + 1] - all_steps[i])
            ema = d if ema is None else ema.mul_(beta).add_(d, alpha=1.0 - beta)
            prev = c
        assert ema is not None
        return ema.mul_(float(all_steps[-1] - all_steps[-2]))
    raise ValueError(f"direction must be one of {DIRECTIONS}, got {mode!r}")
