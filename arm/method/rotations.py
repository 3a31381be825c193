"""Rotations that align a layer's reference input subspace with its current one (ARM).

The paper (arXiv 2602.03237, abstract) states only that "rotation vectors are derived from
activation subspaces". The three modes below are this project's formulation
(``/work/shared/ARM.md``, "Rotation modes"), not the paper's.

Conventions: ``X_ref``, ``X_cur`` are (tokens × in) input activations of one linear layer (or of a
group of layers sharing one input) on the *same* calibration tokens, rows = tokens. A rotation
``R`` (in × in) is sought with ``X_cur ≈ X_ref R``, i.e. a current input (column) is
``x' ≈ Rᵀ x``; the pseudo-gradient ``g`` (out × in) is then applied as ``g R`` because
``(g R)(Rᵀ x) = g x``.

Every rotation here is the identity outside a small subspace: ``R = I + B (R_k − I) Bᵀ`` with
``B`` (in × k, orthonormal columns, k ≤ 2r) and ``R_k`` (k × k, orthogonal, det +1). It is stored
as (B, R_k) and applied as ``g R = g + (g B)(R_k − I) Bᵀ`` at cost O(out·in·k); the in × in matrix
is never formed (``Rotation.matrix`` exists for tests only).

- ``procrustes``: Q_ref, Q_cur = top-r right singular vectors of X_ref, X_cur (uncentred: a linear
  layer acts on raw inputs, so the subspace that matters is that of the second moment); B = an
  orthonormal basis of [Q_ref, Q_cur]; M = (X_ref B)ᵀ (X_cur B); U Σ Vᵀ = svd(M); R_k = U Vᵀ, with
  the last column of U negated when det(U Vᵀ) < 0 (Kabsch), so R is a proper rotation.
- ``geodesic``: no token correspondence needed. With U cos Θ Vᵀ = svd(Q_refᵀ Q_cur), the principal
  vectors a_i = Q_ref u_i are turned onto b_i = Q_cur v_i, each in its own plane span(a_i, b_i) by
  its principal angle θ_i; identity elsewhere. A rotation *within* an unchanged subspace is
  invisible to it (it aligns subspaces, not bases).
- ``none``: R = I.

The *trajectory rotation* (``merge.formulation: trajectory_rotation``, also our formulation) uses the
same estimators between the inputs of two checkpoints c_{m−1} → c_m and keeps turning along it:
``RotationFlow`` holds the generator A = log R_k (k × k, skew-symmetric; ``rotation_log``) and gives
the fractional rotation R(s) = I + B (exp(s A) − I) Bᵀ for any real s (R(1) = the estimated rotation,
R(s) R(u) = R(s + u)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ROTATIONS = ("procrustes", "geodesic", "none")
# singular values of [Q_ref, Q_cur] below this (of at most √2) add no direction to the basis B
_BASIS_TOL = 1e-5
# principal angles below this (radians) are treated as 0 by the geodesic rotation
_ANGLE_TOL = 1e-6


@dataclass
class Rotation:
    """``R = I + B (R_k − I) Bᵀ``; ``B`` is None for the identity."""

    in_features: int
    B: torch.Tensor | None = None  # in × k, orthonormal columns
    Rk: torch.Tensor | None = None  # k × k, orthogonal, det +1
    angles: torch.Tensor | None = None  # principal angles (radians) between the two r-subspaces

    @property
    def is_identity(self) -> bool:
        return self.B is None or self.B.shape[1] == 0

    def apply(self, g: torch.Tensor) -> torch.Tensor:
        """``g R`` for g (out × in): ``g + (g B)(R_k − I) Bᵀ``, O(out·in·k); a new tensor."""
        if self.is_identity:
            return g.clone()
        import torch

        assert self.B is not None and self.Rk is not None
        eye = torch.eye(self.Rk.shape[0], dtype=self.Rk.dtype, device=self.Rk.device)
        return torch.addmm(g, (g @ self.B) @ (self.Rk - eye), self.B.T)

    def correction(self, g: torch.Tensor) -> torch.Tensor | None:
        """``g R − g = (g B)(R_k − I) Bᵀ`` (None for the identity)."""
        if self.is_identity:
            return None
        import torch

        assert self.B is not None and self.Rk is not None
        eye = torch.eye(self.Rk.shape[0], dtype=self.Rk.dtype, device=self.Rk.device)
        return ((g @ self.B) @ (self.Rk - eye)) @ self.B.T

    def distance_from_identity(self) -> float:
        """``‖R − I‖_F`` (= ‖R_k − I‖_F, as B has orthonormal columns)."""
        if self.is_identity:
            return 0.0
        import torch

        assert self.Rk is not None
        eye = torch.eye(self.Rk.shape[0], dtype=self.Rk.dtype, device=self.Rk.device)
        return float(torch.linalg.matrix_norm(self.Rk - eye))

    def mean_angle_deg(self) -> float:
        """Mean principal angle between the reference and current r-subspaces, in degrees."""
        if self.angles is None or self.angles.numel() == 0:
            return 0.0
        return math.degrees(float(self.angles.mean()))

    def alignment(self) -> float:
        """Mean cosine of the principal angles (1 = the subspaces coincide)."""
        if self.angles is None or self.angles.numel() == 0:
            return 1.0
        return float(self.angles.cos().mean())

    def matrix(self) -> torch.Tensor:
        """The dense in × in matrix (tests only: O(in²) memory)."""
        import torch

        eye = torch.eye(self.in_features, dtype=torch.float32)
        if self.is_identity:
            return eye
        assert self.B is not None and self.Rk is not None
        B = self.B.to(torch.float32).cpu()
        k = B.shape[1]
        return eye + B @ (self.Rk.to(torch.float32).cpu() - torch.eye(k)) @ B.T


def principal_directions(X: torch.Tensor, rank: int, name: str = "layer") -> torch.Tensor:
    """Top-``rank`` right singular vectors of ``X`` (tokens × in), as in × rank orthonormal columns.

    Computed as the top eigenvectors of the Gram matrix XᵀX in float64 (in × in, in ≤ a few thousand):
    the same subspace as the SVD of X (squaring the condition number costs nothing at float64 for the
    top directions), at about half the cost of the SVD when tokens ≫ in (docs/results.md §5)."""
    import torch

    n, d = X.shape
    if rank > d:
        raise ValueError(f"merge.rank: {rank} is larger than the input width {d} of {name}")
    if rank > n:
        raise ValueError(f"merge.rank: {rank} is larger than the {n} calibration tokens collected for {name}")
    X64 = X.to(torch.float64)
    _, vecs = torch.linalg.eigh(X64.T @ X64)   # ascending eigenvalues
    return vecs[:, d - rank:].flip(1).to(X.dtype).contiguous()


def _principal_pairs(Q_ref: torch.Tensor, Q_cur: torch.Tensor):
    """Principal vectors a_i (of span Q_ref), b_i (of span Q_cur), cos θ_i, and the residuals
    b_i − cos θ_i a_i, whose norms are sin θ_i without the cancellation of arccos near 1."""
    import torch

    U, s, Vh = torch.linalg.svd(Q_ref.T @ Q_cur)
    cos = s.clamp(-1.0, 1.0)
    a = Q_ref @ U
    b = Q_cur @ Vh.T
    resid = b - a * cos
    return a, b, cos, resid


def principal_angles(Q_ref: torch.Tensor, Q_cur: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians) between span(Q_ref) and span(Q_cur), θ_i = atan2(sin θ_i, cos θ_i)."""
    import torch

    _, _, cos, resid = _principal_pairs(Q_ref, Q_cur)
    return torch.atan2(torch.linalg.vector_norm(resid, dim=0), cos)


def _joint_basis(Q_ref: torch.Tensor, Q_cur: torch.Tensor) -> torch.Tensor:
    import torch

    U, S, _ = torch.linalg.svd(torch.cat([Q_ref, Q_cur], dim=1), full_matrices=False)
    return U[:, S > _BASIS_TOL].contiguous()


def procrustes(
    X_ref: torch.Tensor,
    X_cur: torch.Tensor,
    rank: int,
    name: str = "layer",
    Q_ref: torch.Tensor | None = None,
) -> Rotation:
    """The proper rotation R (restricted to span[Q_ref, Q_cur]) minimising ‖X_ref R − X_cur‖_F."""
    import torch

    if X_ref.shape != X_cur.shape:
        raise ValueError(
            f"{name}: reference and current activations have shapes {list(X_ref.shape)} and "
            f"{list(X_cur.shape)}; procrustes needs the same calibration tokens for both"
        )
    d = X_ref.shape[1]
    if Q_ref is None:
        Q_ref = principal_directions(X_ref, rank, name)
    Q_cur = principal_directions(X_cur, rank, name)
    angles = principal_angles(Q_ref, Q_cur)
    B = _joint_basis(Q_ref, Q_cur)
    M = (X_ref @ B).T @ (X_cur @ B)
    U, _, Vh = torch.linalg.svd(M)
    if torch.linalg.det(U @ Vh) < 0:  # Kabsch: flip the direction of the smallest singular value
        U = U.clone()
        U[:, -1] = -U[:, -1]
    return Rotation(d, B, U @ Vh, angles)


def geodesic(Q_ref: torch.Tensor, Q_cur: torch.Tensor) -> Rotation:
    """Turn span(Q_ref) onto span(Q_cur) along the principal-angle geodesic; identity elsewhere."""
    import torch

    d = Q_ref.shape[0]
    a, _, cos, resid = _principal_pairs(Q_ref, Q_cur)
    sin = torch.linalg.vector_norm(resid, dim=0)
    angles = torch.atan2(sin, cos)
    moving = angles > _ANGLE_TOL
    if not bool(moving.any()):
        return Rotation(d, None, None, angles)
    a, c, sn = a[:, moving], torch.cos(angles[moving]), torch.sin(angles[moving])
    u = resid[:, moving] / sin[moving]  # unit vectors completing each plane: b_i = cos θ_i a_i + sin θ_i u_i
    B = torch.cat([a, u], dim=1)
    k = a.shape[1]
    # G (column convention) maps a_i -> b_i and u_i -> -sin a_i + cos u_i; R = Gᵀ (x' = Rᵀ x = G x)
    G = torch.zeros(2 * k, 2 * k, dtype=Q_ref.dtype, device=Q_ref.device)
    idx = torch.arange(k, device=Q_ref.device)
    G[idx, idx] = c
    G[idx + k, idx] = sn
    G[idx, idx + k] = -sn
    G[idx + k, idx + k] = c
    return Rotation(d, B, G.T.contiguous(), angles)


def rotation(
    mode: str,
    X_ref: torch.Tensor,
    X_cur: torch.Tensor,
    rank: int,
    name: str = "layer",
    Q_ref: torch.Tensor | None = None,
) -> Rotation:
    """The rotation of ``mode`` for one input group (``Q_ref`` may be passed to reuse it)."""
    if mode == "none":
        return Rotation(X_ref.shape[1])
    if mode == "procrustes":
        return procrustes(X_ref, X_cur, rank, name, Q_ref)
    if mode == "geodesic":
        if Q_ref is None:
            Q_ref = principal_directions(X_ref, rank, name)
        return geodesic(Q_ref, principal_directions(X_cur, rank, name))
    raise ValueError(f"merge.rotation: must be one of {ROTATIONS}, got {mode!r}")


def rotation_log(Rk: torch.Tensor) -> torch.Tensor:
    """The principal logarithm A (skew-symmetric, k × k) of a proper rotation ``Rk``: exp(A) = Rk.

    Computed in float64 without an eigendecomposition (robust to the repeated eigenvalue 1 of a
    rotation that acts in a few planes): square roots by the polar factor of I + R (for a rotation
    with every angle below π, I + R = R^½ · 2cos(A/2) with 2cos(A/2) symmetric positive definite),
    repeated until ‖R − I‖_F ≤ 0.25, then the Cayley transform K = (R − I)(R + I)⁻¹ = tanh(A'/2)
    and A' = 2 artanh(K) by its odd power series; A = 2^j A'. Angles of exactly π have no unique
    logarithm (the result is then one of them)."""
    import torch

    R = Rk.to(torch.float64)
    k = R.shape[0]
    if k == 0:
        return Rk.clone()
    eye = torch.eye(k, dtype=torch.float64, device=R.device)
    halvings = 0
    while float(torch.linalg.matrix_norm(R - eye)) > 0.25 and halvings < 60:
        U, _, Vh = torch.linalg.svd(eye + R)
        R = U @ Vh
        halvings += 1
    K = torch.linalg.solve((R + eye).T, (R - eye).T).T  # (R − I)(R + I)⁻¹
    K = 0.5 * (K - K.T)
    K2 = K @ K
    term, A = K, K.clone()
    for n in range(3, 200, 2):
        term = term @ K2
        A = A + term / n
        if float(torch.linalg.matrix_norm(term)) < 1e-18:
            break
    A = 2.0 * A * (2.0**halvings)
    return (0.5 * (A - A.T)).to(Rk.dtype)


@dataclass
class RotationFlow:
    """A one-parameter group of rotations R(s) = I + B (exp(s A) − I) Bᵀ (A skew, k × k).

    Built from an estimated rotation (``from_rotation``): R(1) is that rotation, R(0) = I, and
    R(s) is the rotation turned a fraction s of the way (s may exceed 1: the turn continued)."""

    in_features: int
    B: torch.Tensor | None = None  # in × k, orthonormal columns
    A: torch.Tensor | None = None  # k × k, skew-symmetric generator
    angles: torch.Tensor | None = None  # principal angles of the two subspaces it was estimated from

    @classmethod
    def from_rotation(cls, R: Rotation) -> RotationFlow:
        if R.is_identity:
            return cls(R.in_features, None, None, R.angles)
        assert R.Rk is not None
        return cls(R.in_features, R.B, rotation_log(R.Rk), R.angles)

    @property
    def is_identity(self) -> bool:
        return self.B is None or self.B.shape[1] == 0

    def at(self, s: float) -> Rotation:
        """R(s), as a ``Rotation`` (applied as g R(s) = g + (g B)(exp(s A) − I) Bᵀ)."""
        if self.is_identity:
            return Rotation(self.in_features, None, None, self.angles)
        import torch

        assert self.A is not None
        Rk = torch.linalg.matrix_exp(float(s) * self.A.to(torch.float64)).to(self.A.dtype)
        return Rotation(self.in_features, self.B, Rk, self.angles)

    def generator_norm(self) -> float:
        """‖A‖_F = √2 · (root of the summed squared angles turned per unit of s)."""
        if self.is_identity:
            return 0.0
        import torch

        assert self.A is not None
        return float(torch.linalg.matrix_norm(self.A))


def trajectory_flow(
    mode: str,
    X_prev: torch.Tensor,
    X_last: torch.Tensor,
    rank: int,
    name: str = "layer",
) -> RotationFlow:
    """The flow of the rotation of ``mode`` (procrustes | geodesic | none) that took the inputs of
    one group from an earlier checkpoint (``X_prev``) to the last one (``X_last``, same tokens):
    X_last ≈ X_prev R(1)."""
    return RotationFlow.from_rotation(rotation(mode, X_prev, X_last, rank, name))
