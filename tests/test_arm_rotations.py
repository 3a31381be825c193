"""ARM's rotations and schedules on real tensors: the identities of ARM.md "Must-hold identities"
that do not need a model (R = I for equal activations, orthogonality and det +1, recovery of a
planted rotation, (g R)(Rᵀ x) = g x on a linear layer), plus each schedule and direction mode."""

from __future__ import annotations

import math

import pytest
import torch

from arm.method.rotations import Rotation, geodesic, principal_directions, procrustes, rotation
from arm.method.schedules import checkpoint_step, direction, lr_schedule


def _activations(n: int = 400, d: int = 24, r: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens × d inputs with a dominant r-dimensional subspace (basis P) plus weaker energy elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    P, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
    scales = torch.cat([torch.linspace(10, 6, r), torch.full((d - r,), 0.3)])
    X = (torch.randn(n, d, generator=gen) * scales) @ P.T
    return X, P[:, :r]


def _planted(P: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """A random proper rotation acting only in span(P) (identity on its complement)."""
    gen = torch.Generator().manual_seed(seed)
    r = P.shape[1]
    Qr, _ = torch.linalg.qr(torch.randn(r, r, generator=gen))
    if torch.linalg.det(Qr) < 0:
        Qr[:, 0] = -Qr[:, 0]
    return torch.eye(P.shape[0]) + P @ (Qr - torch.eye(r)) @ P.T


def _check_proper(R: torch.Tensor) -> None:
    eye = torch.eye(R.shape[0])
    assert torch.allclose(R.T @ R, eye, atol=1e-5)
    assert torch.allclose(R @ R.T, eye, atol=1e-5)
    assert abs(float(torch.linalg.det(R.double())) - 1.0) < 1e-5


@pytest.mark.parametrize("mode", ["procrustes", "geodesic", "none"])
def test_equal_activations_give_identity(mode: str) -> None:
    X, _ = _activations()
    R = rotation(mode, X, X.clone(), 4, "layer")
    assert torch.allclose(R.matrix(), torch.eye(24), atol=1e-5)
    assert R.distance_from_identity() < 1e-5


@pytest.mark.parametrize("mode", ["procrustes", "geodesic"])
def test_rotation_is_proper_on_unrelated_activations(mode: str) -> None:
    X, _ = _activations(seed=0)
    Y, _ = _activations(seed=5)
    R = rotation(mode, X, Y, 4, "layer")
    _check_proper(R.matrix())
    assert R.distance_from_identity() > 1e-2
    assert R.B is not None and R.B.shape[1] <= 8  # k ≤ 2r


def test_kabsch_fix_gives_det_plus_one_for_a_reflection() -> None:
    X, P = _activations()
    reflect = torch.eye(24) - 2 * torch.outer(P[:, 0], P[:, 0])  # det −1 inside span(P)
    R = procrustes(X, X @ reflect, 4, "layer")
    _check_proper(R.matrix())


def test_procrustes_recovers_a_planted_rotation() -> None:
    X_ref, P = _activations()
    R_true = _planted(P)
    X_cur = X_ref @ R_true
    R = procrustes(X_ref, X_cur, 4, "layer")
    M = R.matrix()
    _check_proper(M)
    assert torch.allclose(P.T @ M @ P, P.T @ R_true @ P, atol=1e-4)  # the rotation on the subspace
    assert torch.allclose(M, R_true, atol=1e-4)  # and identity elsewhere
    # (g R)(Rᵀ x) = g x on a real linear layer: current inputs are x' = Rᵀ x
    layer = torch.nn.Linear(24, 7, bias=False)
    g = torch.randn(7, 24, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        layer.weight.copy_(R.apply(g))
        assert torch.allclose(layer(X_cur), X_ref @ g.T, atol=1e-3)
    # applied without the dense matrix, as the update does
    assert torch.allclose(R.apply(g), g @ M, atol=1e-5)
    assert torch.allclose(g + R.correction(g), g @ M, atol=1e-5)


def test_geodesic_turns_the_reference_subspace_onto_the_current_one() -> None:
    X_ref, P = _activations()
    gen = torch.Generator().manual_seed(7)
    S, _ = torch.linalg.qr(torch.randn(24, 24, generator=gen))  # a rotation that moves span(P)
    S = S if torch.linalg.det(S) > 0 else S @ torch.diag(torch.tensor([-1.0] + [1.0] * 23))
    X_cur = X_ref @ S
    Q_ref, Q_cur = principal_directions(X_ref, 4), principal_directions(X_cur, 4)
    R = geodesic(Q_ref, Q_cur)
    M = R.matrix()
    _check_proper(M)
    moved = M.T @ Q_ref  # x' = Rᵀ x
    residual = moved - Q_cur @ (Q_cur.T @ moved)
    assert float(residual.norm()) < 1e-4
    assert R.mean_angle_deg() > 1.0
    # a rotation within an unchanged subspace is invisible to the geodesic (it aligns subspaces)
    X_low = X_ref @ P @ P.T  # inputs exactly in span(P), rotated within it
    Q_low = principal_directions(X_low, 4)
    assert geodesic(Q_low, principal_directions(X_low @ _planted(P), 4)).distance_from_identity() < 1e-3


def test_rank_larger_than_width_or_tokens_is_refused() -> None:
    X, _ = _activations(n=10, d=24)
    with pytest.raises(ValueError, match=r"merge.rank: 30 is larger than the input width 24 of q"):
        principal_directions(X, 30, "q")
    with pytest.raises(ValueError, match="12 is larger than the 10 calibration tokens"):
        principal_directions(X, 12, "q")


def test_identity_rotation_apply_is_a_copy() -> None:
    g = torch.randn(3, 5)
    R = Rotation(5)
    assert torch.equal(R.apply(g), g) and R.correction(g) is None and R.distance_from_identity() == 0.0


def test_schedules() -> None:
    assert lr_schedule(0.5, 3, "constant") == [0.5, 0.5, 0.5]
    assert lr_schedule(1.0, 4, "linear") == [1.0, 0.75, 0.5, 0.25]
    cos = lr_schedule(1.0, 4, "cosine")
    assert cos == pytest.approx([1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))])
    assert lr_schedule(1.0, 5, "linear", warmup=2) == pytest.approx([1 / 3, 2 / 3, 1.0, 2 / 3, 1 / 3])
    assert lr_schedule(0.2, 1, "cosine") == [0.2]
    with pytest.raises(ValueError, match="warmup"):
        lr_schedule(1.0, 2, "constant", warmup=2)
    with pytest.raises(ValueError, match="schedule"):
        lr_schedule(1.0, 2, "step")


def test_direction_modes_on_hand_made_checkpoints() -> None:
    base = torch.tensor([0.0, 0.0])
    c1, c2, c3 = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 2.0]), torch.tensor([4.0, 6.0])
    assert torch.equal(direction("task_vector", base, [c1, c2, c3]), torch.tensor([4.0, 6.0]))
    assert torch.equal(direction("delta", base, [c1, c2, c3]), torch.tensor([1.0, 4.0]))
    # steps 10, 20, 40: per-step deltas (0.1, 0.2), (0.2, 0), (0.05, 0.2); β = 0.5
    # e1 = (0.1, 0.2); e2 = (0.15, 0.1); e3 = (0.1, 0.15); × last gap 20 = (2, 3)
    ema = direction("ema", base, [c1, c2, c3], steps=[10, 20, 40], beta=0.5)
    assert torch.allclose(ema, torch.tensor([2.0, 3.0]))
    assert torch.allclose(direction("ema", base, [c1], steps=[10], beta=0.9), c1)  # m = 1: the task vector
    assert torch.allclose(direction("ema", base, [c1, c2, c3], steps=[10, 20, 40], beta=0.0), (c3 - c2))
    with pytest.raises(ValueError, match="delta needs at least 2"):
        direction("delta", base, [c1])
    with pytest.raises(ValueError, match="increasing steps"):
        direction("ema", base, [c1, c2], steps=[20, 20])
    assert checkpoint_step("/x/checkpoint-120") == 120
    with pytest.raises(ValueError, match="checkpoint-<step>"):
        checkpoint_step("/x/final")
