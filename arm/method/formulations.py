"""ARM's formulations of one streaming step (``merge.formulation``), beside the direction and schedule.

The paper (arXiv 2602.03237, abstract only) says that rotations derived from activation subspaces
steer updates along data-driven trajectories and that merging coefficients act as learning rates.
The three readings below are this project's (``/work/shared/ARM.md``, "Our formulation" and
"Formulations that follow the trajectory"; ``docs/method.md`` §2 and §6–7), not the paper's:

- ``iterate_rotation`` (the first formulation, the default): W ← W + η_t · g_W · R_t with R_t the
  rotation aligning c_m's input subspace with the current iterate's (``arm.method.rotations.rotation``);
- ``trajectory_rotation``: R = the rotation SFT applied between the input subspaces of c_{m−1} and
  c_m (θ0 → c_1 when m = 1), A = log R; step t turns g by the fraction R(s_t) = exp(s_t A) of it,
  s_t = ``trajectory_offset`` (how far past c_m the step lies, in units of that checkpoint gap);
- ``proximal``: W_{t+1} = argmin_W ‖X_t Wᵀ − X_t W̃ᵀ‖² + λ N ‖W − W_t‖² with W̃ = W_t + η_t d_t the
  extrapolated target (d_t = g R_t as in ``iterate_rotation``; g itself with ``rotation: none``) and
  X_t the current iterate's inputs: W_{t+1} = W_t + η_t d_t C(C + λI)⁻¹, C = X_tᵀX_t / N, which is
  the target step plus the correction ``proximal_correction`` = −η_t λ d_t (C + λI)⁻¹.

Helpers here are pure tensor functions, used by ``arm.method.iteration.iterate`` and by the planted tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

FORMULATIONS = ("iterate_rotation", "trajectory_rotation", "proximal", "stream")  # stream: arm/method/stream.py


def span_ratio(direction: str, steps: Sequence[int] | None, n_checkpoints: int) -> float:
    """How many checkpoint gaps (c_{m−1} → c_m, or θ0 → c_1 when m = 1) one unit of g spans.

    ``task_vector`` g = c_m − θ0 spans s_m steps, the gap s_m − s_{m−1}: the ratio s_m / (s_m − s_{m−1})
    (1 when m = 1). ``delta`` is the gap itself and ``ema`` is rescaled to it: 1.
    ``steps`` = s_1..s_m (needed for task_vector with m ≥ 2 only)."""
    if direction != "task_vector" or n_checkpoints == 1:
        return 1.0
    if steps is None or len(steps) != n_checkpoints:
        raise ValueError("merge.formulation: trajectory_rotation with direction=task_vector and several checkpoints "
                         "needs their steps (checkpoint-<step> folder names)")
    gap = steps[-1] - steps[-2]
    if gap <= 0:
        raise ValueError(f"merge.formulation: trajectory_rotation needs increasing checkpoint steps, got {list(steps)}")
    return steps[-1] / gap


TURNS = ("accumulated", "chord")


def trajectory_turn(a_before: float, a_after: float, ratio: float, turn: str = "accumulated") -> float:
    """s_t of ``merge.turn``: how many times the measured c_{m−1} → c_m rotation turns step t (docs/method.md §6).

    ``accumulated`` (the default; ../shared/ARM.md): s_t = a_t = Σ_{u≤t} η_u, the learning rate accumulated
    through step t, in units of the measured rotation. It assumes nothing about how fast the inputs turned
    before c_{m−1}, and a coefficient → 0 turns nothing. ``chord``: :func:`trajectory_offset`, exact when the
    inputs turned at the measured rate over the whole span of g, and an amplification of it otherwise."""
    if turn == "accumulated":
        return a_after
    if turn == "chord":
        return trajectory_offset(a_before, a_after, ratio)
    raise ValueError(f"merge.turn: must be one of {', '.join(TURNS)}, got {turn!r}")


def trajectory_offset(a_before: float, a_after: float, ratio: float) -> float:
    """s_t, the fraction of the c_{m−1} → c_m rotation that turns step t (a_{t−1} → a_t of g).

    g is a chord of the trajectory (a finite difference over ``ratio`` gaps ending at c_m), so its
    direction is that of the middle of its span, ``ratio``/2 gaps before c_m; step t covers
    a_{t−1}·ratio … a_t·ratio gaps past c_m, whose middle is (a_{t−1} + a_t)/2 · ratio. The step is
    therefore turned by s_t = ratio · (½ + (a_{t−1} + a_t)/2) gaps. With η = 1 and ``delta``,
    s_t = t: on weights and inputs that turn at a constant rate the continuation is then exact
    (``tests/test_arm_trajectory.py``); for other η it is the midpoint rule (second order)."""
    return ratio * (0.5 + 0.5 * (a_before + a_after))


def input_covariance(X: torch.Tensor) -> torch.Tensor:
    """C = XᵀX / N (in × in, float32) of a group's inputs (N tokens × in)."""
    import torch

    X = X.to(torch.float32)
    return (X.T @ X) / max(X.shape[0], 1)


def proximal_lambda(C: torch.Tensor, relative: float) -> float:
    """The absolute damping λ = ``relative`` · tr(C)/in (relative to the mean eigenvalue of C);
    ``relative`` itself when the inputs carry no energy at all."""
    mean_eig = float(C.diagonal().sum()) / C.shape[0]
    return relative * (mean_eig if mean_eig > 0 else 1.0)


def proximal_factor(C: torch.Tensor, lam: float, name: str = "layer") -> torch.Tensor:
    """The Cholesky factor L of C + λI (λ > 0), shared by every weight of one input group."""
    import torch

    eye = torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    L, info = torch.linalg.cholesky_ex(C + lam * eye)
    if int(info) != 0:
        raise FloatingPointError(f"{name}: C + λI is not positive definite (λ = {lam:g}); raise merge.prox_lambda")
    return L


def proximal_correction(d: torch.Tensor, L: torch.Tensor, lam: float) -> torch.Tensor:
    """−λ d (C + λI)⁻¹ for d (out × in), L = ``proximal_factor(C, λ)``: d + this = d C (C + λI)⁻¹,
    the step the proximal problem keeps of a target step d (exact: C(C + λI)⁻¹ = I − λ(C + λI)⁻¹)."""
    import torch

    return torch.cholesky_solve(d.T.contiguous(), L).T.mul_(-lam)
