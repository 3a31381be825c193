"""ARM's formulations that follow the trajectory (``merge.formulation``, arm/method/formulations.py):
``trajectory_rotation`` and ``proximal`` beside ``iterate_rotation``.

- identities: with ``rotation: none`` (and ``prox_lambda: 0``) each is ExPO with α = Σ η_t bit for
  bit; ``proximal`` with ``prox_lambda: 0`` is ``iterate_rotation`` bit for bit; with no activation
  change between c_{m−1} and c_m the trajectory rotation is ExPO to float rounding;
- planted trajectories run through ``arm.method.iteration.iterate`` on a real two-layer linear network
  (the downstream layer's inputs come from the upstream weight): weights and inputs turning at a
  known constant rate inside a known subspace, where the trajectory rotation extrapolated j gaps
  lands on the true continuation and straight extrapolation does not; inputs confined to a subspace,
  where the proximal step keeps only the part of g the data excites;
- the rotations: log/exp, orthogonality, det +1, R(s)R(u) = R(s + u), (g R)(Rᵀ x) = g x;
- the rotation-effect diagnostic ‖θ_ARM − θ_ExPO‖ / ‖θ_ExPO − c_m‖ recomputed from written tensors;
- the formulations on real tiny Qwen3 folders, in memory and layer by layer, from the merge API,
  the composed Hydra config and ``python -m arm.merge.cli``.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from arm.merge.contract import MergeConfigError
from arm.merge.engine import ENGINE_KEYS, MergeContext, merge_from_config, validate_merge_config
from arm.method.activations import LinearGroup
from arm.method.formulations import (
    input_covariance,
    proximal_correction,
    proximal_factor,
    proximal_lambda,
    span_ratio,
    trajectory_offset,
)
from arm.method.iteration import ARMParams, Inputs, iterate
from arm.method.rotations import RotationFlow, procrustes, rotation_log, trajectory_flow
from arm.method.schedules import lr_schedule
from tests.helpers import load_tensors
from tests.merge_fixtures import make_trajectory

ROTATED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CALIB = {"n_sequences": 24, "max_length": 32, "holdout_fraction": 0.25, "seed": 0, "max_tokens": 256}


# ---------------------------------------------------------------------------------------------
# helpers


def _check_proper(R: torch.Tensor, atol: float = 1e-5) -> None:
    eye = torch.eye(R.shape[0], dtype=R.dtype)
    assert torch.allclose(R.T @ R, eye, atol=atol)
    assert torch.allclose(R @ R.T, eye, atol=atol)
    assert abs(float(torch.linalg.det(R.double())) - 1.0) < atol


def _skew_in(P: torch.Tensor, rates: list[float]) -> torch.Tensor:
    """A (d × d, skew) turning plane i = span(P[:, 2i], P[:, 2i+1]) at ``rates[i]`` radians per unit."""
    d = P.shape[0]
    a = torch.zeros(P.shape[1], P.shape[1], dtype=P.dtype)
    for i, w in enumerate(rates):
        a[2 * i + 1, 2 * i], a[2 * i, 2 * i + 1] = w, -w
    return P @ a @ P.T if d else a


def _activations(n: int = 400, d: int = 24, r: int = 4, seed: int = 0, rest: float = 0.3,
                 dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens × d inputs with a dominant r-dim subspace span(P) and weaker energy (``rest``) on its complement."""
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=dtype))
    scales = torch.cat([torch.linspace(10, 6, r, dtype=dtype), torch.full((d - r,), rest, dtype=dtype)])
    return (torch.randn(n, d, generator=gen, dtype=dtype) * scales) @ Q.T, Q[:, :r], Q[:, r:]


@dataclass
class _Calib:
    """What ``iterate`` reads of a calibration set when the statistics come from ``layerwise.run``."""

    n_tokens: int
    n_stats_sequences: int = 1
    n_loss_sequences: int = 0
    stats_batches: list = field(default_factory=lambda: [None])
    loss_batches: list = field(default_factory=list)


class _TwoLayerLinear:
    """A real two-layer linear network x ↦ W (U z), run as ``arm.method.layerwise.LayerwiseModel`` is run:
    ``run(weights, calib, groups, loss)`` forwards the tokens Z (N × d) with the weights it is given
    and returns the recorded inputs of the downstream layer W, X = Z Uᵀ (no loss)."""

    UP, DOWN = "model.layers.0.mlp.up.weight", "model.layers.1.mlp.down_proj.weight"

    def __init__(self, Z: torch.Tensor):
        self.Z = Z
        self.device = self.store = torch.device("cpu")

    def groups(self) -> list[LinearGroup]:
        return [LinearGroup("model.layers.1.mlp.down_proj", ["model.layers.1.mlp.down_proj"], [self.DOWN],
                            self.Z.shape[1])]

    def run(self, weights, calib, groups, *, loss):
        U, W = weights(self.UP), weights(self.DOWN)  # every weight of the forward, as the real pass asks
        X = self.Z @ U.T
        assert torch.isfinite(X @ W.T).all()
        return ({groups[0].key: X} if groups is not None else None), None


def _run(net: _TwoLayerLinear, last: dict, g: dict, previous: dict | None, span: float = 1.0, **params):
    p = ARMParams(rank=4, **params)
    inputs = Inputs(list(last), {k: v.clone() for k, v in last.items()}, {k: v.clone() for k, v in g.items()})
    result = iterate(None, inputs, p, calib=_Calib(net.Z.shape[0]), layerwise=net,
                     previous=(previous.__getitem__ if previous is not None else None), span=span)
    return {n: result.state[n] for n in last}, result.diagnostics


def records(n: int = 24) -> list[dict]:
    return [{"prompt": f"Q{i}: {i} + {i + 3} = ", "response": f"{2 * i + 3}." + " ok" * (i % 3)} for i in range(n)]


# ---------------------------------------------------------------------------------------------
# the rotations of the trajectory


def test_rotation_log_inverts_the_matrix_exponential() -> None:
    gen = torch.Generator().manual_seed(0)
    for k, size in [(4, 0.05), (8, 1.0), (10, 2.8)]:  # up to angles near π
        S = torch.randn(k, k, generator=gen, dtype=torch.float64)
        S = (S - S.T) / 2
        S = S / torch.linalg.matrix_norm(S, 2) * size
        R = torch.linalg.matrix_exp(S).to(torch.float32)
        A = rotation_log(R)
        assert torch.equal(A, -A.T)  # exactly skew
        assert torch.allclose(torch.linalg.matrix_exp(A.double()).float(), R, atol=1e-6), (k, size)
        assert torch.allclose(A.double(), S, atol=1e-5), (k, size)  # the principal logarithm
    assert torch.equal(rotation_log(torch.eye(5)), torch.zeros(5, 5))


def test_trajectory_flow_is_a_one_parameter_group_of_proper_rotations() -> None:
    X_prev, P, _ = _activations(dtype=torch.float32)
    A_true = _skew_in(P.double(), [0.3, -0.2]).float()
    X_last = X_prev @ torch.linalg.matrix_exp(A_true)
    flow = trajectory_flow("procrustes", X_prev, X_last, 4, "layer")
    assert isinstance(flow, RotationFlow) and not flow.is_identity
    est = procrustes(X_prev, X_last, 4, "layer").matrix()
    assert torch.allclose(flow.at(1.0).matrix(), est, atol=1e-5)  # R(1) = the estimated rotation
    assert torch.allclose(flow.at(1.0).matrix(), torch.linalg.matrix_exp(A_true), atol=1e-4)  # = the planted one
    assert torch.allclose(flow.at(0.0).matrix(), torch.eye(24), atol=1e-6)
    layer = torch.nn.Linear(24, 7, bias=False)
    g = torch.randn(7, 24, generator=torch.Generator().manual_seed(3))
    for s in (0.3, 1.0, 2.5, -1.0):
        R = flow.at(s)
        M = R.matrix()
        _check_proper(M)
        assert torch.allclose(M, torch.linalg.matrix_exp(s * A_true), atol=1e-4), s
        with torch.no_grad():  # (g R)(Rᵀ x) = g x on a real linear layer, R applied without the dense matrix
            layer.weight.copy_(R.apply(g))
            assert torch.allclose(layer(X_prev @ M), X_prev @ g.T, atol=1e-3), s
        assert torch.allclose(g + R.correction(g), g @ M, atol=1e-5)
    assert torch.allclose(flow.at(0.7).matrix() @ flow.at(1.8).matrix(), flow.at(2.5).matrix(), atol=1e-5)
    # no activation change: the identity, and no flow at all for rotation=none
    assert trajectory_flow("procrustes", X_prev, X_prev.clone(), 4).generator_norm() < 1e-4
    assert trajectory_flow("geodesic", X_prev, X_prev.clone(), 4).is_identity
    assert trajectory_flow("none", X_prev, X_last, 4).at(3.0).correction(g) is None


def test_trajectory_offset_and_span_ratio() -> None:
    etas = [1.0] * 4
    s = [trajectory_offset(math.fsum(etas[: t - 1]), math.fsum(etas[:t]), 1.0) for t in range(1, 5)]
    assert s == [1.0, 2.0, 3.0, 4.0]  # η = 1 on the last gap: step t is turned by R^t
    assert trajectory_offset(0.0, 0.5, 1.0) == 0.75
    assert span_ratio("task_vector", [20, 30], 2) == 3.0
    assert span_ratio("task_vector", [30], 1) == 1.0 and span_ratio("delta", None, 3) == 1.0
    with pytest.raises(ValueError, match="merge.formulation: trajectory_rotation"):
        span_ratio("task_vector", None, 2)


# ---------------------------------------------------------------------------------------------
# planted trajectories, through arm.method.iteration.iterate


def _planted_trajectory(gap: float = 10.0, rates: tuple[float, float] = (0.025, -0.015),
                        change: tuple[float, float] | None = None):
    """Turning inside span(P) (4-dim, two planes; ``rates`` radians per SFT step).

    Upstream U(τ) = exp(φ(τ)A)ᵀ U_0, so the downstream inputs are X(τ) = X_0 exp(φ(τ)A); the downstream
    weight follows W(τ) = W_c + ∫_0^τ D exp(φ(σ)A) dσ (its update turns with its inputs, as an SGD update
    in the span of turning inputs does). φ(τ) = τ: a constant turning rate. ``change = (τ1, c)``: the inputs
    turned at c times the rate before step τ1 and at the rate from τ1 on (φ(τ) = cτ, then cτ1 + (τ − τ1)):
    the rate changed, and only the last part is measured. Returns a function τ -> (U, W), the tokens Z and A."""
    d, out = 24, 7
    X0, P, _ = _activations(d=d)
    gen = torch.Generator().manual_seed(11)
    U0, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    Z = X0 @ U0  # Z U_0ᵀ = X_0
    A = _skew_in(P, list(rates))
    a = P.T @ A @ P  # 4 × 4, invertible
    Wc = 0.1 * torch.randn(out, d, generator=gen, dtype=torch.float64)
    D = 0.05 * torch.randn(out, d, generator=gen, dtype=torch.float64)
    eye_d, eye_4 = torch.eye(d, dtype=torch.float64), torch.eye(4, dtype=torch.float64)

    def integral(tau: float, c: float = 1.0) -> torch.Tensor:  # ∫_0^τ exp(cσA) dσ, exactly
        return tau * eye_d + P @ (torch.linalg.solve(c * a, torch.linalg.matrix_exp(c * tau * a) - eye_4)
                                  - tau * eye_4) @ P.T

    def at(tau: float) -> tuple[torch.Tensor, torch.Tensor]:
        if change is None or tau <= change[0]:
            c = 1.0 if change is None else change[1]
            return torch.linalg.matrix_exp(c * tau * A).T @ U0, Wc + D @ integral(tau, c)
        tau1, c = change
        E1 = torch.linalg.matrix_exp(c * tau1 * A)
        E = E1 @ torch.linalg.matrix_exp((tau - tau1) * A)
        return E.T @ U0, Wc + D @ (integral(tau1, c) + E1 @ integral(tau - tau1))

    return at, Z, A


def _extrapolation_errors(direction, steps, lr, iterations, turn, change=None):
    """(relative error of the trajectory rotation, of straight extrapolation, the runs, g, gap) against the true
    continuation of the planted trajectory at the turning rate measured over the last gap."""
    at, Z, _ = _planted_trajectory(change=change)
    f32 = torch.float32
    net = _TwoLayerLinear(Z.to(f32))
    up, down = _TwoLayerLinear.UP, _TwoLayerLinear.DOWN
    s_prev = steps[-2] if len(steps) > 1 else 0.0
    (U_prev, W_prev), (U_m, W_m) = at(s_prev), at(steps[-1])
    last = {up: U_m.to(f32), down: W_m.to(f32)}
    previous = {up: U_prev.to(f32), down: W_prev.to(f32)}
    base = {up: at(0.0)[0].to(f32), down: at(0.0)[1].to(f32)}
    g = {n: last[n] - (previous[n] if direction == "delta" else base[n]) for n in last}
    gap = steps[-1] - s_prev
    j = lr * iterations * (gap if direction == "delta" else steps[-1]) / gap  # gaps extrapolated
    truth = at(steps[-1] + j * gap)[1].to(f32)
    common = {"direction": direction, "lr": lr, "iterations": iterations}
    span = span_ratio(direction, list(steps), len(steps))
    ours, diag = _run(net, last, g, previous, span=span, formulation="trajectory_rotation", rotation="procrustes",
                      turn=turn, **common)
    straight, _ = _run(net, last, g, None, formulation="trajectory_rotation", rotation="none", **common)
    scale = float((truth - last[down]).norm())
    return (float((ours[down] - truth).norm()) / scale, float((straight[down] - truth).norm()) / scale,
            ours, straight, diag, g, last, gap, j)


@pytest.mark.parametrize(("direction", "steps", "lr", "iterations", "turn", "tol"), [
    ("delta", (20.0, 30.0), 1.0, 4, "accumulated", 1e-5),  # exact but for float32: step t turned by R^t
    ("delta", (20.0, 30.0), 1.0, 4, "chord", 1e-5),  # the same s_t when η = 1 on the last gap
    ("task_vector", (10.0,), 1.0, 4, "accumulated", 1e-5),  # m = 1: θ0 → c_1 is the gap
    ("delta", (20.0, 30.0), 0.5, 8, "chord", 2e-3),  # the midpoint rule: second order in η
])
def test_planted_trajectory_rotation_continues_the_curve_where_straight_extrapolation_leaves_it(
        direction, steps, lr, iterations, turn, tol) -> None:
    err_traj, err_straight, ours, straight, diag, g, last, gap, j = _extrapolation_errors(direction, steps, lr, iterations, turn)
    up, down = _TwoLayerLinear.UP, _TwoLayerLinear.DOWN
    msg = f"{j:g} gaps: trajectory rotation rel. error {err_traj:.2e}, straight extrapolation {err_straight:.2e}"
    assert err_traj < tol, msg
    assert err_straight > 0.1 and err_straight > 100 * err_traj, msg
    # straight extrapolation is ExPO: c_m + (Σ η) g, bit for bit; the upstream weight is not rotated
    assert torch.equal(straight[down], torch.mul(g[down], math.fsum([lr] * iterations)).add_(last[down]))
    assert torch.equal(ours[up], straight[up])
    # the diagnostics: the turn per gap that was recovered, and the rotation effect of the last iterate
    grp = diag["trajectory"]["groups"]["model.layers.1.mlp.down_proj"]
    assert grp["generator_norm"] == pytest.approx(math.sqrt(2) * gap * math.hypot(0.025, 0.015), rel=1e-3)
    effect = diag["history"][-1]["rotation_effect_layers"]["1"]
    expected = float((ours[down] - straight[down]).norm() / (straight[down] - last[down]).norm())
    assert effect == pytest.approx(expected, rel=1e-4) and effect > 0.1
    assert diag["history"][-1]["rotation_effect_layers"]["0"] == 0.0


# task_vector over checkpoints at steps 40 and 50 (g spans ρ = 5 gaps), a small coefficient (0.1 × 2 = 0.2 of g,
# one gap past c_m): the case of the review (docs/method.md §6). Relative errors to the true continuation.
TURN_CASES = {"constant rate": None, "turning 20x slower before step 30": (30.0, 0.05),
              "turning 20x slower before step 40": (40.0, 0.05), "turning 3x faster before step 30": (30.0, 3.0)}


@pytest.mark.parametrize("case", list(TURN_CASES))
def test_turn_rules_on_a_constant_and_a_changed_turning_rate(case) -> None:
    """`chord` assumes the inputs turned at the measured rate over all of g's span; `accumulated` (the default)
    assumes nothing before c_{m−1}. Measured (docs/method.md §6): chord wins where the inputs turned at least that
    fast over most of the span, and loses even to ExPO where they turned over the measured gap only; accumulated
    lies between ExPO and the truth in every case."""
    errs = {turn: _extrapolation_errors("task_vector", (40.0, 50.0), 0.1, 2, turn, TURN_CASES[case])[:2]
            for turn in ("accumulated", "chord")}
    straight = errs["chord"][1]
    chord, accumulated = errs["chord"][0], errs["accumulated"][0]
    msg = f"{case}: accumulated {accumulated:.3g}, chord {chord:.3g}, straight {straight:.3g}"
    print(msg)
    assert accumulated < straight, msg
    if case == "turning 20x slower before step 40":
        assert straight < chord, msg  # chord turns g by 2.5 gaps of a rotation that happened over one
    else:
        assert chord < accumulated, msg
    if case == "constant rate":
        assert chord < 0.05, msg  # the midpoint rule over steps of half a gap


def test_planted_proximal_step_keeps_the_part_of_g_the_data_excites() -> None:
    """Inputs in span(P) only; the true continuation moves W along g_data (an SGD update lies in the
    span of its inputs), the observed g also carries g_off ⟂ span(P) (e.g. decay or noise). The
    proximal step lands on c_m + α g_data; ExPO adds α g_off."""
    f32 = torch.float32
    X0, P, Pc = _activations(d=24, rest=0.0, dtype=f32)  # no energy outside span(P)
    net = _TwoLayerLinear(X0)  # U = I: the layer's inputs are X0 at every iterate
    up, down = _TwoLayerLinear.UP, _TwoLayerLinear.DOWN
    gen = torch.Generator().manual_seed(5)
    W_m = torch.randn(7, 24, generator=gen)
    g_data = torch.randn(7, 4, generator=gen) @ P.T
    g_off = torch.randn(7, 20, generator=gen) @ Pc.T
    last = {up: torch.eye(24), down: W_m}
    g = {up: torch.zeros(24, 24), down: g_data + g_off}
    common = {"lr": 0.5, "iterations": 4, "direction": "task_vector", "rotation": "none"}
    alpha = 0.5 * 4
    truth = W_m + alpha * g_data
    ours, diag = _run(net, last, g, None, formulation="proximal", prox_lambda=1e-3, **common)
    expo, _ = _run(net, last, g, None, formulation="proximal", prox_lambda=0.0, **common)
    scale = float((truth - W_m).norm())
    err_prox = float((ours[down] - truth).norm()) / scale
    err_expo = float((expo[down] - truth).norm()) / scale
    msg = f"proximal rel. error {err_prox:.2e}, straight extrapolation (ExPO) {err_expo:.2e}"
    assert err_prox < 5e-3, msg
    assert err_expo > 0.5, msg
    assert torch.equal(expo[down], torch.mul(g[down], alpha).add_(W_m))  # λ = 0: ExPO bit for bit
    # the data sees the same change under both: X (W − W_m)ᵀ agree (to the damping)
    assert torch.allclose(X0 @ (ours[down] - W_m).T, X0 @ (expo[down] - W_m).T, rtol=1e-2, atol=1e-2)
    assert diag["history"][1]["groups"]["model.layers.1.mlp.down_proj"]["prox_lambda_abs"] > 0


def test_proximal_step_solves_its_argmin() -> None:
    """W_{t+1} = W_t + η (d + proximal_correction) satisfies (W − W̃) C + λ (W − W_t) = 0, the stationarity
    of ‖X Wᵀ − X W̃ᵀ‖² / N + λ ‖W − W_t‖² (W̃ = W_t + η d), for inputs with a spread of energies."""
    X, _, _ = _activations(rest=0.05, dtype=torch.float32)
    gen = torch.Generator().manual_seed(2)
    W_t, d, eta = torch.randn(7, 24, generator=gen), torch.randn(7, 24, generator=gen), 0.7
    C = input_covariance(X)
    for rel in (1e-3, 0.1, 10.0):
        lam = proximal_lambda(C, rel)
        assert lam == pytest.approx(rel * float(C.trace()) / 24)
        W = W_t + eta * (d + proximal_correction(d, proximal_factor(C, lam), lam))
        residual = (W - (W_t + eta * d)) @ C + lam * (W - W_t)
        assert float(residual.norm()) < 1e-4 * float((eta * d @ C).norm()), rel


# ---------------------------------------------------------------------------------------------
# real tiny Qwen3 folders


@pytest.fixture(scope="module")
def traj(tmp_path_factory):
    """Base and early checkpoints at steps 10, 20, 30; a 'converged' one at 40 (diagnostics only)."""
    t = make_trajectory(tmp_path_factory.mktemp("arm-traj"), n_checkpoints=4, hidden=32, layers=2)
    t.converged = t.checkpoints.pop()
    return t


def arm(traj, out: Path, context: MergeContext | None = None, checkpoints=None, **params) -> dict:
    cfg = {"name": "arm", "device": "cpu", "rank": 4, "calibration": CALIB, **params}
    return merge_from_config(cfg, traj.base, checkpoints or traj.checkpoints, out, progress=False, context=context)


def expo(traj, out: Path, alpha: float, checkpoints=None) -> dict[str, torch.Tensor]:
    merge_from_config({"name": "expo", "alpha": alpha, "device": "cpu"}, traj.base, checkpoints or traj.checkpoints,
                      out, progress=False)
    return load_tensors(out, torch.float32)


@pytest.mark.parametrize("params", [
    {"formulation": "trajectory_rotation", "rotation": "none"},
    {"formulation": "proximal", "rotation": "none", "prox_lambda": 0.0},
], ids=["trajectory-none", "proximal-none-lambda0"])
def test_without_rotation_each_formulation_is_exactly_expo(traj, tmp_path, params) -> None:
    etas = lr_schedule(0.4, 3, "linear")
    arm(traj, tmp_path / "arm", MergeContext(calibration=records()), schedule="linear", lr=0.4, iterations=3, **params)
    ours, ref = load_tensors(tmp_path / "arm", torch.float32), expo(traj, tmp_path / "expo", math.fsum(etas))
    assert sorted(ours) == sorted(ref)
    for name in ref:
        assert torch.equal(ours[name], ref[name]), name
    hist = json.loads((tmp_path / "arm" / "diagnostics.json").read_text())["history"]
    assert all(h["rotation_effect"] == 0.0 for h in hist[1:])


def test_proximal_with_lambda_zero_is_exactly_the_iterate_rotation(traj, tmp_path) -> None:
    ctx = MergeContext(calibration=records())
    arm(traj, tmp_path / "prox", ctx, formulation="proximal", prox_lambda=0.0, lr=0.5, iterations=3)
    arm(traj, tmp_path / "iter", ctx, formulation="iterate_rotation", lr=0.5, iterations=3)
    a, b = load_tensors(tmp_path / "prox", torch.float32), load_tensors(tmp_path / "iter", torch.float32)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_no_activation_change_gives_expo_to_float_rounding(traj, tmp_path) -> None:
    """c_{m−1} an exact copy of c_m (checkpoint-25 = checkpoint-30's weights): the trajectory rotation is I."""
    copy = tmp_path / "traj" / "checkpoint-25"
    shutil.copytree(traj.checkpoints[-1], copy)
    cks = [traj.checkpoints[0], copy, traj.checkpoints[-1]]
    arm(traj, tmp_path / "arm", MergeContext(calibration=records()), checkpoints=cks,
        formulation="trajectory_rotation", turn="chord", lr=0.5, iterations=2)
    ours, ref = load_tensors(tmp_path / "arm", torch.float32), expo(traj, tmp_path / "expo", 1.0, checkpoints=cks)
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=0, atol=1e-5, msg=name)
    diag = json.loads((tmp_path / "arm" / "diagnostics.json").read_text())
    assert diag["trajectory"]["span_ratio"] == 30 / 5
    assert all(v["generator_norm"] < 1e-4 for v in diag["trajectory"]["groups"].values())
    assert diag["history"][-1]["rotation_effect"] < 1e-4


def _recomputed_effect(ours, ref, last) -> tuple[float, dict[str, float]]:
    num: dict[str, float] = {}
    den: dict[str, float] = {}
    for name in ref:
        if name == "lm_head.weight" and name not in last:
            continue
        n2 = float((ours[name] - ref[name]).double().square().sum())
        d2 = float((ref[name] - last[name]).double().square().sum())
        key = (re.search(r"\.layers\.(\d+)\.", name) or [None, "all-other"])[1]
        num[key], den[key] = num.get(key, 0.0) + n2, den.get(key, 0.0) + d2
    overall = math.sqrt(sum(num.values()) / sum(den.values()))
    return overall, {k: math.sqrt(num[k] / den[k]) for k in num if k != "all-other"}


@pytest.mark.parametrize("params", [
    {"formulation": "trajectory_rotation", "rotation": "procrustes", "turn": "chord"},
    {"formulation": "trajectory_rotation", "rotation": "geodesic", "direction": "delta", "select": "best_loss"},
    {"formulation": "proximal", "rotation": "none", "prox_lambda": 0.1},
    {"formulation": "proximal", "rotation": "procrustes", "prox_lambda": 0.3},
    {"formulation": "iterate_rotation", "rotation": "procrustes"},
    {"formulation": "iterate_rotation", "rotation": "geodesic", "layer_scale": "alignment"},
], ids=["trajectory-procrustes", "trajectory-geodesic-delta-best", "proximal-none", "proximal-procrustes", "iterate",
        "iterate-alignment"])
def test_formulations_on_real_folders_in_memory_and_layer_by_layer(traj, tmp_path, params) -> None:
    """The same tensors and diagnostics in both statistics modes; unrotated tensors exactly ExPO's; the
    rotation effect in diagnostics.json equals the one recomputed from the written folders."""
    logged: list[dict] = []
    ctx = MergeContext(calibration=records(), converged=traj.converged, log=logged.append)
    out = {}
    for mode in ("model", "layerwise"):
        summary = arm(traj, tmp_path / mode, ctx, lr=0.5, iterations=3, statistics=mode, **params)
        assert summary["statistics"] == mode
        out[mode] = load_tensors(tmp_path / mode, torch.float32)
    for name, value in out["model"].items():
        torch.testing.assert_close(out["layerwise"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    diag = json.loads((tmp_path / "model" / "diagnostics.json").read_text())
    diag_lw = json.loads((tmp_path / "layerwise" / "diagnostics.json").read_text())
    assert diag["formulation"] == params["formulation"] and diag["selected_iteration"] == diag_lw["selected_iteration"]
    sel = diag["selected_iteration"]
    alpha = math.fsum(diag["etas"][:sel])
    last = load_tensors(traj.checkpoints[-1], torch.float32)
    if params.get("direction") == "delta":  # straight extrapolation along the same g = c_m − c_{m−1}
        prev = load_tensors(traj.checkpoints[-2], torch.float32)
        ref = {n: torch.mul(last[n] - prev[n], alpha).add_(last[n]) for n in last}
    else:  # the expo baseline
        ref = expo(traj, tmp_path / "expo", alpha)
    ours = out["model"]
    rotated = [n for n in ref if any(f"{k}.weight" in n for k in ROTATED)]
    for name in ref:
        if name not in rotated:
            assert torch.equal(ours[name], ref[name]), name
    assert any(not torch.allclose(ours[n], ref[n]) for n in rotated)
    overall, layers = _recomputed_effect(ours, ref, last)
    record = diag["history"][sel]
    assert record["rotation_effect"] == pytest.approx(overall, rel=2e-3)
    assert sorted(record["rotation_effect_layers"]) == sorted(layers) == ["0", "1"]
    for key, value in layers.items():
        assert record["rotation_effect_layers"][key] == pytest.approx(value, rel=2e-3), key
    for a, b in zip(diag["history"], diag_lw["history"], strict=True):
        if "rotation_effect" in a:
            assert b["rotation_effect"] == pytest.approx(a["rotation_effect"], rel=1e-3, abs=1e-7)
    # logged per iteration (W&B through context.log), per layer as arm/rotation_effect/layer_<i>
    assert [e["arm/iteration"] for e in logged[:3]] == [1, 2, 3]
    assert {"arm/rotation_effect", "arm/rotation_effect/layer_0", "arm/rotation_effect/layer_1"} <= set(logged[0])
    if params["formulation"] == "trajectory_rotation":
        assert len(diag["trajectory"]["groups"]) == 2 * 4
        assert diag["trajectory"]["span_ratio"] == (3.0 if params.get("direction", "task_vector") == "task_vector" else 1)
        assert record["rotation_effect"] > 0.01  # the trajectory rotation acts from the first step on
        assert diag["history"][1]["rotation_effect"] > 0.01


def test_diagnostics_plot_has_the_rotation_effect(traj, tmp_path) -> None:
    arm(traj, tmp_path / "arm", MergeContext(calibration=records()), formulation="trajectory_rotation", iterations=2)
    from arm.method.iteration import ARM

    png = tmp_path / "arm" / "diagnostics.png"
    assert not png.exists() and ARM.write_report(tmp_path / "arm") == [png]  # drawn from the JSON, after the merge
    assert png.stat().st_size > 10_000


def test_formulations_from_the_hydra_config_and_the_merge_cli(compose, traj, tmp_path) -> None:
    """``arm merge=arm merge.formulation=...``: the composed merge config validates and merges; the
    light CLI takes the same keys."""
    from omegaconf import OmegaConf

    from arm.merge import cli as merge_cli

    for overrides in (["merge.formulation=trajectory_rotation", "merge.rotation=geodesic"],
                      ["merge.formulation=proximal", "merge.rotation=none", "merge.prox_lambda=0.05"]):
        merge = compose("merge=arm", *overrides, "merge.rank=4", "merge.device=cpu").merge
        validate_merge_config(merge)
        cfg = OmegaConf.to_container(merge)
        assert set(cfg) == set(ENGINE_KEYS) | set(ARMParams.__dataclass_fields__)
        cfg["calibration"] = CALIB
        merge_from_config(cfg, traj.base, traj.checkpoints, tmp_path / overrides[0][-8:], progress=False,
                          context=MergeContext(calibration=records()))
    calib = tmp_path / "train.jsonl"
    calib.write_text("\n".join(json.dumps(r) for r in records()) + "\n")
    common = ["--method", "arm", "--base", str(traj.base), "--checkpoints", *map(str, traj.checkpoints),
              "--device", "cpu", "--no-progress", "--calibration", str(calib), "--set", "rank=4",
              "--set", f"calibration={json.dumps(CALIB)}"]
    for form in ("trajectory_rotation", "proximal"):
        assert merge_cli.main([*common, "--set", f"formulation={form}", "--out", str(tmp_path / f"cli-{form}")]) == 0
        arm(traj, tmp_path / f"api-{form}", MergeContext(calibration=records()), formulation=form)
        a, b = load_tensors(tmp_path / f"cli-{form}", torch.float32), load_tensors(tmp_path / f"api-{form}", torch.float32)
        assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"formulation": "trajectory"}, "merge.formulation: must be one of iterate_rotation, trajectory_rotation, proximal"),
        ({"prox_lambda": -0.1}, "merge.prox_lambda: must be ≥ 0"),
        ({"prox_lambda": "big"}, "merge.prox_lambda: expected a finite number"),
        ({"formulation": "trajectory_rotation", "layer_scale": "alignment"}, "merge.layer_scale: alignment scales by"),
    ],
)
def test_bad_formulation_parameters_name_the_key(params, message) -> None:
    with pytest.raises(MergeConfigError, match=message):
        validate_merge_config({"name": "arm", **params})


def test_trajectory_rotation_with_task_vector_needs_checkpoint_steps(traj, tmp_path) -> None:
    odd = tmp_path / "final"
    shutil.copytree(traj.checkpoints[-1], odd)
    with pytest.raises(ValueError, match="trajectory_rotation with direction=task_vector needs them too"):
        arm(traj, tmp_path / "out", MergeContext(calibration=records()), checkpoints=[traj.checkpoints[0], odd],
            formulation="trajectory_rotation", turn="chord")
    assert not (tmp_path / "out").exists()
