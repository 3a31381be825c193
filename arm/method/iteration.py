"""ARM — the streaming merge iteration, registered as merge method ``arm``.

What the paper (arXiv 2602.03237) states, from its abstract only: merging is an iterative
optimisation process that approximates gradient-descent dynamics; merging coefficients act as
learning rates; rotations derived from activation subspaces steer the updates; only early SFT
checkpoints are needed. Everything below is *our* formulation of that (``/work/shared/ARM.md``,
"Our formulation"; ``docs/method.md``), not the paper's algorithm:

    θ ← c_m;  A_ref ← input statistics of c_m on the calibration tokens
    for t = 1..T:
        A_cur ← input statistics of θ            (θ = c_m at t = 1, so A_cur = A_ref and R = I)
        linear weights of attention/MLP blocks:  W ← W + η_t · g_W · R_t   (one R per input group)
        every other parameter:                   p ← p + η_t · g_p
    return θ_T (select=last) or the θ_t with the lowest held-out calibration loss (select=best_loss)

The iterate is kept as θ_t = c_m + a_t·g + E_t, where a_t = fsum(η_1..η_t) (times the layer
scale) and E_t = Σ η_s·(g R_s − g) is the accumulated rotation correction of the rotated weights
(absent for ``rotation: none``). Materialising θ as ``g·a + c_m`` (+ E) uses the very operations
of the ``expo`` baseline, so ``rotation=none, direction=task_vector, schedule=constant`` gives
bit-for-bit the ExPO output with α = T·η, and parameters outside the rotated set are exactly
c_m + (Σ η_t)·g.

``merge.formulation`` (``arm.method.formulations``) says what one step does: ``iterate_rotation`` (above),
``trajectory_rotation`` (R_t = exp(s_t A), A = log of the rotation SFT applied to the inputs from c_{m−1}
to c_m; c_{m−1}'s inputs are measured once, the iterate's never) or ``proximal`` (the target step
d = g R_t kept as d C(C + λI)⁻¹, C from the current iterate's inputs). Every iteration logs the rotation
effect ‖θ − θ_ExPO‖ / ‖θ_ExPO − c_m‖ at the same Σ η_t, overall and per decoder layer.

Statistics and the held-out loss come from the whole model in memory (``merge.statistics: model``)
or, for models that do not fit, one decoder layer at a time (``layerwise``, ``arm.method.layerwise``; c_m and
g are then re-read from the files per tensor and the iterate is materialised per tensor); ``auto``
chooses (``statistics_mode``).

Bad input fails before anything is written: an empty checkpoint list, ``direction: delta`` with
one checkpoint, a rank larger than a layer's width or than the calibration tokens, an empty
calibration set, NaN/Inf in an input; a NaN/Inf appearing during the iteration stops it with an
error naming the iteration and the parameter (or the layer whose inputs diverged).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from arm.merge.contract import MergeConfigError, WholeModelMethod
from arm.merge.engine import MergeInputError, _alias_tied, open_folders, plan_merge, write_state_dict
from arm.merge.tensor_io import ModelFolder, TensorReader, torch_dtype
from arm.method.activations import calibration_loss, collect_inputs, find_linear_groups, prepare_calibration
from arm.method.formulations import (
    FORMULATIONS,
    TURNS,
    input_covariance,
    proximal_correction,
    proximal_factor,
    proximal_lambda,
    span_ratio,
    trajectory_turn,
)
from arm.method.layerwise import EMBED, HEAD, LayerwiseModel, unsupported_reason
from arm.method.memory import AUTO_DEVICE_SHARE, GB, Shapes, stage_memory
from arm.method.models import complete_state, load_model, shared_storages
from arm.method.rotations import ROTATIONS, principal_directions, rotation, trajectory_flow
from arm.method.schedules import DIRECTIONS, SCHEDULES, checkpoint_step, direction, lr_schedule
from arm.method.stream import RATES as STREAM_RATES
from arm.method.stream import stream_merge

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

SELECTS = ("last", "best_loss")
LAYER_SCALES = ("none", "alignment")
STATISTICS = ("auto", "model", "layerwise")
DIAGNOSTICS_JSON = "diagnostics.json"
DIAGNOSTICS_PNG = "diagnostics.png"


# ---------------------------------------------------------------------------------------------
# parameters (conf/merge/arm.yaml, one key per field)


@dataclass(frozen=True)
class CalibrationParams:
    n_sequences: int = 128  # records sampled (seeded) from the domain's train split
    max_length: int = 256  # tokens per sequence (prompt + response + EOS, truncated)
    holdout_fraction: float = 0.25  # share of the sequences held out for the calibration loss
    seed: int = 0
    max_tokens: int = 4096  # token positions recorded per input group for the statistics


@dataclass(frozen=True)
class ARMParams:
    lr: float = 0.1  # peak η (the merging coefficient of one iteration)
    iterations: int = 2  # T
    schedule: str = "constant"  # constant | linear | cosine
    warmup: int = 0  # warm-up iterations (0 ≤ warmup < iterations)
    direction: str = "task_vector"  # task_vector | delta | ema
    beta: float = 0.9  # EMA factor of direction=ema
    rotation: str = "procrustes"  # procrustes | geodesic | none
    rank: int = 8  # r: principal directions per input group
    select: str = "last"  # last | best_loss
    calibration: CalibrationParams = field(default_factory=CalibrationParams)
    layer_scale: str = "none"  # none | alignment
    statistics: str = "auto"  # auto | model | layerwise (how statistics and the loss are computed)
    formulation: str = "iterate_rotation"  # iterate_rotation | trajectory_rotation | proximal (arm.method.formulations)
    prox_lambda: float = 0.1  # proximal: λ relative to the mean eigenvalue of XᵀX/N (0: the target step itself)
    turn: str = "accumulated"  # trajectory_rotation: s_t = accumulated | chord (arm.method.formulations.trajectory_turn)
    stream_rate: str = "mean"  # stream: η_t = 1/t (mean) | lr (constant) (arm.method.stream)

    def needs_statistics(self) -> bool:
        if self.formulation == "proximal" and self.prox_lambda > 0:
            return True
        return self.rotation != "none" or self.layer_scale == "alignment"

    def needs_current_statistics(self) -> bool:
        """Whether every iterate's inputs are measured (not only the checkpoints')."""
        return self.needs_statistics() and self.formulation != "trajectory_rotation"

    def needs_previous(self) -> bool:
        """Whether the inputs of c_{m−1} (θ0 when m = 1) are measured (the trajectory rotation)."""
        return self.formulation == "trajectory_rotation" and self.rotation != "none"

    def uses_calibration(self) -> bool:
        """Whether calibration data changes the merged weights (statistics or selection)."""
        return self.needs_statistics() or self.select == "best_loss"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _int(value: Any, key: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise MergeConfigError(f"merge.{key}: expected an integer, got {value!r}")
    if value < low:
        raise MergeConfigError(f"merge.{key}: must be ≥ {low}, got {value}")
    return value


def _num(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MergeConfigError(f"merge.{key}: expected a finite number, got {value!r}")
    return float(value)


def _choice(value: Any, key: str, choices: Sequence[str]) -> str:
    if value is None and "none" in choices:
        return "none"
    if value not in choices:
        raise MergeConfigError(f"merge.{key}: must be one of {', '.join(choices)}, got {value!r}")
    return value


MAX_LR = 100.0  # per iteration: beyond it the merged weights leave any range a model was trained in


def parse_params(params: Mapping[str, Any]) -> ARMParams:
    """``merge.*`` (without the engine keys) -> ARMParams; errors name ``merge.<key>``."""
    known = [f for f in ARMParams.__dataclass_fields__]
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise MergeConfigError(f"merge.{unknown[0]}: not a parameter of method 'arm' (it takes: {', '.join(known)})")
    p = dict(params)
    cal_in = p.pop("calibration", None) or {}
    if not isinstance(cal_in, Mapping):
        raise MergeConfigError(f"merge.calibration: expected a mapping, got {cal_in!r}")
    cal_known = list(CalibrationParams.__dataclass_fields__)
    cal_unknown = sorted(set(cal_in) - set(cal_known))
    if cal_unknown:
        raise MergeConfigError(
            f"merge.calibration.{cal_unknown[0]}: not a calibration setting (known: {', '.join(cal_known)})"
        )
    cd = CalibrationParams()
    cal = CalibrationParams(
        n_sequences=_int(cal_in.get("n_sequences", cd.n_sequences), "calibration.n_sequences", 1),
        max_length=_int(cal_in.get("max_length", cd.max_length), "calibration.max_length", 2),
        holdout_fraction=_num(cal_in.get("holdout_fraction", cd.holdout_fraction), "calibration.holdout_fraction"),
        seed=_int(cal_in.get("seed", cd.seed), "calibration.seed", 0),
        max_tokens=_int(cal_in.get("max_tokens", cd.max_tokens), "calibration.max_tokens", 1),
    )
    if not 0 <= cal.holdout_fraction < 1:
        raise MergeConfigError(f"merge.calibration.holdout_fraction: must be in [0, 1), got {cal.holdout_fraction}")
    d = ARMParams()
    out = ARMParams(
        lr=_num(p.get("lr", d.lr), "lr"),
        iterations=_int(p.get("iterations", d.iterations), "iterations", 1),
        schedule=_choice(p.get("schedule", d.schedule), "schedule", SCHEDULES),
        warmup=_int(p.get("warmup", d.warmup), "warmup", 0),
        direction=_choice(p.get("direction", d.direction), "direction", DIRECTIONS),
        beta=_num(p.get("beta", d.beta), "beta"),
        rotation=_choice(p.get("rotation", d.rotation), "rotation", ROTATIONS),
        rank=_int(p.get("rank", d.rank), "rank", 1),
        select=_choice(p.get("select", d.select), "select", SELECTS),
        calibration=cal,
        layer_scale=_choice(p.get("layer_scale", d.layer_scale), "layer_scale", LAYER_SCALES),
        statistics=_choice(p.get("statistics", d.statistics), "statistics", STATISTICS),
        formulation=_choice(p.get("formulation", d.formulation), "formulation", FORMULATIONS),
        prox_lambda=_num(p.get("prox_lambda", d.prox_lambda), "prox_lambda"),
        turn=_choice(p.get("turn", d.turn), "turn", TURNS),
        stream_rate=_choice(p.get("stream_rate", d.stream_rate), "stream_rate", STREAM_RATES),
    )
    if out.prox_lambda < 0:
        raise MergeConfigError(f"merge.prox_lambda: must be ≥ 0, got {out.prox_lambda}")
    if out.layer_scale == "alignment" and out.formulation == "trajectory_rotation":
        raise MergeConfigError("merge.layer_scale: alignment scales by the alignment of c_m with the current iterate "
                               "(merge.formulation iterate_rotation or proximal), not with trajectory_rotation")
    if out.lr <= 0:
        raise MergeConfigError(f"merge.lr: must be > 0, got {out.lr}")
    if out.lr > MAX_LR:
        raise MergeConfigError(f"merge.lr: {out.lr:g} is not a merging coefficient: each iteration adds lr × the update "
                               f"(lr ≤ {MAX_LR:g}; the grids of conf/tuning/ stop at 0.5)")
    if out.warmup >= out.iterations:
        raise MergeConfigError(f"merge.warmup: must be smaller than merge.iterations ({out.iterations}), got {out.warmup}")
    if not 0 <= out.beta < 1:
        raise MergeConfigError(f"merge.beta: must be in [0, 1), got {out.beta}")
    if out.select == "best_loss" and cal.holdout_fraction <= 0:
        raise MergeConfigError("merge.select: best_loss needs held-out sequences (merge.calibration.holdout_fraction > 0)")
    if out.layer_scale == "alignment" and out.rotation == "none":
        raise MergeConfigError("merge.layer_scale: alignment needs a rotation (merge.rotation is none)")
    return out


# ---------------------------------------------------------------------------------------------
# the iteration (in memory)


@dataclass
class Inputs:
    """What the update needs, float32 on the merge device: c_m and g per parameter name."""

    names: list[str]  # float tensors of the base, in storage order, each storage once (tied)
    last: dict[str, torch.Tensor]
    g: dict[str, torch.Tensor]


@dataclass
class IterationResult:
    state: dict[str, torch.Tensor]
    diagnostics: dict[str, Any]
    selected: int


class _InputSource:
    """Reads θ0, c_1..c_m of one tensor (float32, on ``device``) and forms c_m and the direction g."""

    def __init__(self, plan: Any, params: ARMParams, steps: Sequence[int] | None, device: torch.device):
        self.plan, self.params, self.steps, self.device = plan, params, steps, device
        self.n_ck = len(next(iter(plan.inputs.values()))) - 1
        n_ck = self.n_ck
        self.need = {"task_vector": [0, n_ck], "delta": [n_ck - 1, n_ck], "ema": list(range(n_ck + 1))}[params.direction]
        self.readers = {j: TensorReader() for j in self.need}

    def read(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        import torch


        params, n_ck = self.params, self.n_ck
        infos = self.plan.inputs[name]
        loaded = {}
        for j in self.need:
            t = self.readers[j].read(infos[j]).to(device=self.device, dtype=torch.float32)
            if not bool(torch.isfinite(t).all()):
                raise MergeInputError(f"{infos[j].file}: tensor {name!r} contains NaN or Inf")
            loaded[j] = t
        ck = [loaded[j] for j in range(1, n_ck + 1) if j in loaded]
        base = loaded.get(0, ck[0])
        if params.direction == "task_vector":
            g = direction("task_vector", base, ck)
        elif params.direction == "delta":
            g = direction("delta", base, ck)
        else:
            g = direction("ema", base, ck, self.steps, params.beta)
        return loaded[n_ck], g

    def close(self) -> None:
        for r in self.readers.values():
            r.close()


class _ModelTensors:
    """One input model's float32 tensors on ``device`` (``index`` into [θ0, c_1..c_m] of the plan), read
    tensor by tensor when asked for; NaN/Inf is an error naming the file. Callable: name -> tensor."""

    def __init__(self, plan: Any, index: int, device: torch.device):
        self.plan, self.index, self.device = plan, index, device
        self.reader = TensorReader()

    def __call__(self, name: str) -> torch.Tensor:
        import torch


        info = self.plan.inputs[name][self.index]
        t = self.reader.read(info).to(device=self.device, dtype=torch.float32)
        if not bool(torch.isfinite(t).all()):
            raise MergeInputError(f"{info.file}: tensor {name!r} contains NaN or Inf")
        return t

    def close(self) -> None:
        self.reader.close()


def load_inputs(plan: Any, names: Sequence[str], params: ARMParams, steps: Sequence[int] | None, device: torch.device) -> Inputs:
    """Read θ0, c_1..c_m tensor by tensor (float32) and form c_m and the direction g."""
    source = _InputSource(plan, params, steps, device)
    last: dict[str, torch.Tensor] = {}
    g: dict[str, torch.Tensor] = {}
    try:
        for name in names:
            last[name], g[name] = source.read(name)
    finally:
        source.close()
    return Inputs(list(names), last, g)


class _LazyView(Mapping):
    """``c_m`` or ``g`` of a ``_DiskInputs``, formed from the files on each access."""

    def __init__(self, owner: _DiskInputs, which: int):
        self.owner, self.which = owner, which

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.owner.get(name)[self.which]

    def __contains__(self, name: object) -> bool:
        return name in self.owner.known

    def __iter__(self):
        return iter(self.owner.names)

    def __len__(self) -> int:
        return len(self.owner.names)


class _DiskInputs(Inputs):
    """Inputs for ``statistics: layerwise``: c_m and g are not held in memory but re-read from the
    safetensors files tensor by tensor when needed (the same float32 operations as ``load_inputs``,
    so the same values); the last tensor read is cached. Every input is read once up front to fail
    on NaN/Inf before any work."""

    def __init__(self, plan: Any, names: Sequence[str], params: ARMParams, steps: Sequence[int] | None,
                 device: torch.device):
        self.source = _InputSource(plan, params, steps, device)
        self.known = set(names)
        self._cache: tuple[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        super().__init__(list(names), _LazyView(self, 0), _LazyView(self, 1))  # type: ignore[arg-type]
        try:
            for name in self.names:
                self.source.read(name)
        except BaseException:
            self.source.close()
            raise

    def get(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cache is None or self._cache[0] != name:
            if name not in self.known:
                raise KeyError(name)
            self._cache = (name, self.source.read(name))
        return self._cache[1]

    def close(self) -> None:
        self._cache = None
        self.source.close()


class _Converged:
    """Streams the converged checkpoint c* to measure cos(θ − c_m, c* − c_m) and ‖θ − c*‖/‖c_m − c*‖."""

    def __init__(self, path: Path, names: Sequence[str], tied: bool):
        folder = ModelFolder(path)
        self.infos = _alias_tied([folder], tied)[0]
        missing = [n for n in names if n not in self.infos]
        if missing:
            raise ValueError(f"{path}: converged checkpoint lacks tensor {missing[0]!r}")
        self.path = path

    def measure(self, names: Sequence[str], theta: Callable[[str], torch.Tensor], last: Mapping[str, torch.Tensor],
                direction: Mapping[str, torch.Tensor] | None = None) -> dict[str, float]:
        import torch


        dot = nt = ns = nd = dg = ng = 0.0
        with TensorReader() as reader:
            for name in names:
                cs = reader.read(self.infos[name]).to(device=last[name].device, dtype=torch.float32)
                star = cs - last[name]
                step = theta(name) - last[name]
                dot += float((step * star).sum())
                nt += float((step * step).sum())
                ns += float((star * star).sum())
                nd += float(((theta(name) - cs) ** 2).sum())
                if direction is not None:
                    dg += float((direction[name] * star).sum())
                    ng += float((direction[name] ** 2).sum())
        out = {
            # undefined while θ = c_m (iteration 0, or a zero step): null, not 0
            "cos_to_converged": dot / math.sqrt(nt * ns) if nt > 0 and ns > 0 else None,
            "rel_dist_to_converged": math.sqrt(nd / ns) if ns > 0 else float("nan"),
        }
        if direction is not None:
            out["cos_direction_to_converged"] = dg / math.sqrt(ng * ns) if ng > 0 and ns > 0 else 0.0
        return out


def iterate(
    model: Any,
    inputs: Inputs,
    params: ARMParams,
    *,
    calib: Any = None,
    converged: _Converged | None = None,
    log_fn: Callable[[dict], None] | None = None,
    device: torch.device | None = None,
    layerwise: Any = None,
    previous: Callable[[str], torch.Tensor] | None = None,
    span: float = 1.0,
) -> IterationResult:
    """Run T iterations on ``model`` (loaded at c_m, float32); returns the selected iterate.

    ``previous`` gives c_{m−1}'s float32 tensors (θ0's when m = 1), needed by
    ``formulation: trajectory_rotation`` (with a rotation); ``span`` = ``arm.method.formulations.span_ratio``.

    With ``layerwise`` (an ``arm.method.layerwise.LayerwiseModel``; ``model`` is then None) no model is
    held: statistics and the held-out loss come from layer-by-layer passes over the materialised
    iterate, and the returned state is lazy (each tensor materialised when read). One pass over
    θ_t gives both the loss of iteration t and the statistics of iteration t + 1 (the same θ).
    """
    import torch


    etas = lr_schedule(params.lr, params.iterations, params.schedule, params.warmup)
    if layerwise is None:
        device = device or next(model.parameters()).device
        store = device
        targets = dict(model.state_dict(keep_vars=True))
        missing = [n for n in inputs.names if n not in targets]
        if missing:
            raise ValueError(f"model has no parameter {missing[0]!r} of the input files")
        groups = [g for g in find_linear_groups(model)]
    else:
        device, store = layerwise.device, layerwise.store
        groups = layerwise.groups()
    for grp in groups:
        grp.params = [p for p in grp.params if p in inputs.g]
    groups = [grp for grp in groups if grp.params]
    rotated = {p for grp in groups for p in grp.params}
    if params.needs_statistics():
        if calib is None or not calib.stats_batches:
            raise ValueError("the calibration set is empty: ARM's statistics need calibration sequences")
        narrow = min(groups, key=lambda grp: grp.in_features)
        if params.rotation != "none" and params.rank > narrow.in_features:
            raise ValueError(f"merge.rank: {params.rank} is larger than the input width {narrow.in_features} of {narrow.key}")
        if params.rotation != "none" and params.rank > calib.n_tokens:
            raise ValueError(f"merge.rank: {params.rank} is larger than the {calib.n_tokens} calibration tokens")
    if params.needs_previous() and previous is None:
        raise ValueError("merge.formulation: trajectory_rotation needs the previous checkpoint's tensors")
    if params.select == "best_loss" and (calib is None or not calib.loss_batches):
        raise ValueError("merge.select: best_loss needs held-out calibration sequences, none were given")

    coeffs: dict[str, list[float]] = {n: [] for n in inputs.names}
    corr: dict[str, torch.Tensor] = {}

    def theta(name: str) -> torch.Tensor:
        t = torch.mul(inputs.g[name], math.fsum(coeffs[name])).add_(inputs.last[name])
        if name in corr:
            t.add_(corr[name].to(t.device))
        return t

    def checked(t: int) -> Callable[[str], torch.Tensor]:
        """θ per tensor for a layer-by-layer pass, with the NaN/Inf check of ``materialise``."""

        def weights(name: str) -> torch.Tensor:
            value = theta(name)
            if not bool(torch.isfinite(value).all()):
                raise FloatingPointError(
                    f"ARM iteration {t}: parameter {name!r} became NaN/Inf (η_t = {etas[t - 1]:g}; lower merge.lr)"
                )
            return value

        return weights

    def materialise(t: int) -> None:
        if layerwise is not None:
            return  # checked by the layer-by-layer pass over θ_t (``checked``), which reads every weight
        with torch.no_grad():
            for name in inputs.names:
                value = theta(name)
                if not bool(torch.isfinite(value).all()):
                    raise FloatingPointError(
                        f"ARM iteration {t}: parameter {name!r} became NaN/Inf (η_t = {etas[t - 1]:g}; lower merge.lr)"
                    )
                targets[name].data.copy_(value)

    history: list[dict[str, Any]] = []
    X_ref = Q_ref = X_next = None
    if layerwise is None:
        loss0 = calibration_loss(model, calib, device) if calib is not None else None
    else:  # the reference c_m, read from the files tensor by tensor
        X_ref, loss0 = layerwise.run(lambda name: inputs.last[name], calib,
                                     groups if params.needs_statistics() else None, loss=calib is not None)
    record0: dict[str, Any] = {"iteration": 0, "eta": 0.0, "loss": loss0}
    if converged is not None:
        record0.update(converged.measure(inputs.names, theta, inputs.last, inputs.g))
    history.append(record0)
    if params.needs_statistics():
        if layerwise is None:
            X_ref = collect_inputs(model, groups, calib, device)
        if params.needs_current_statistics() and params.rotation != "none":
            Q_ref = {grp.key: principal_directions(X_ref[grp.key].to(device), params.rank, grp.key) for grp in groups}
        else:
            Q_ref = {grp.key: None for grp in groups}
    flows = None
    trajectory_diag: dict[str, dict[str, float]] = {}
    if params.needs_previous():
        assert previous is not None and X_ref is not None
        X_prev = _previous_inputs(model, targets if layerwise is None else None, inputs, previous, groups, calib,
                                  device, layerwise)
        flows = {grp.key: trajectory_flow(params.rotation, X_prev[grp.key].to(device), X_ref[grp.key].to(device),
                                          params.rank, grp.key) for grp in groups}
        for key, flow in flows.items():
            one = flow.at(1.0)
            trajectory_diag[key] = {"mean_angle_deg": one.mean_angle_deg(), "rot_dist": one.distance_from_identity(),
                                    "generator_norm": flow.generator_norm()}
        X_prev = X_ref = None  # the flows are all the iteration needs
    gsq = {name: float(inputs.g[name].square().sum()) for name in inputs.names}
    best: tuple[float, int, dict[str, list[float]], dict[str, torch.Tensor]] | None = None
    for t, eta in enumerate(etas, start=1):
        per_group: dict[str, dict[str, float]] = {}
        if flows is not None:
            s_t = trajectory_turn(math.fsum(etas[: t - 1]), math.fsum(etas[:t]), span, params.turn)
            for grp in groups:
                R = flows[grp.key].at(s_t)
                # the principal angle is that of the measured pair c_{m−1} → c_m (the same every iteration);
                # ‖R(s_t) − I‖_F grows with s_t: two different quantities, named apart
                per_group[grp.key] = {"measured_angle_deg": R.mean_angle_deg(), "rot_dist": R.distance_from_identity(),
                                      "scale": 1.0, "s": s_t}
                for name in grp.params:
                    coeffs[name].append(eta)
                    c = R.correction(inputs.g[name])
                    if c is not None:
                        c = c.mul_(eta).to(store)
                        corr[name] = corr[name].add_(c) if name in corr else c
            for name in inputs.names:
                if name not in rotated:
                    coeffs[name].append(eta)
        elif X_ref is not None:
            try:
                X_cur = X_ref if t == 1 else (X_next if layerwise is not None else collect_inputs(model, groups, calib, device))
            except FloatingPointError as err:
                raise FloatingPointError(f"ARM iteration {t}: {err} (the model diverged; lower merge.lr)") from None
            for grp in groups:
                R = rotation(params.rotation, X_ref[grp.key].to(device), X_cur[grp.key].to(device), params.rank, grp.key,
                             Q_ref[grp.key])
                scale = R.alignment() if params.layer_scale == "alignment" else 1.0
                per_group[grp.key] = {"mean_angle_deg": R.mean_angle_deg(), "rot_dist": R.distance_from_identity(),
                                      "scale": scale}
                L = lam = None
                if params.formulation == "proximal" and params.prox_lambda > 0:
                    C = input_covariance(X_cur[grp.key].to(device))
                    lam = proximal_lambda(C, params.prox_lambda)
                    L = proximal_factor(C, lam, grp.key)
                    per_group[grp.key]["prox_lambda_abs"] = lam
                    del C
                for name in grp.params:
                    coeffs[name].append(eta * scale)
                    c = R.correction(inputs.g[name])
                    if L is not None:  # the proximal step keeps d C(C + λI)⁻¹ of the target step d = g R
                        d = inputs.g[name] if c is None else inputs.g[name] + c
                        p = proximal_correction(d, L, lam)
                        c = p if c is None else c.add_(p)
                    if c is not None:
                        c = c.mul_(eta * scale).to(store)
                        corr[name] = corr[name].add_(c) if name in corr else c
            for name in inputs.names:
                if name not in rotated:
                    coeffs[name].append(eta)
        else:
            for name in inputs.names:
                coeffs[name].append(eta)
        materialise(t)
        record: dict[str, Any] = {"iteration": t, "eta": eta}
        if per_group:
            for key in ("mean_angle_deg", "measured_angle_deg"):  # iterate vs c_m; or c_{m−1} vs c_m (trajectory)
                if key in next(iter(per_group.values())):
                    record[key] = sum(v[key] for v in per_group.values()) / len(per_group)
            record["rot_dist"] = sum(v["rot_dist"] for v in per_group.values()) / len(per_group)
            record["groups"] = per_group
        if layerwise is None:
            record["loss"] = calibration_loss(model, calib, device) if calib is not None else None
        else:
            want_stats = params.needs_current_statistics() and t < params.iterations
            X_cur = X_next = None  # host memory: the reference and one current set of statistics at a time
            try:
                X_next, loss_t = layerwise.run(checked(t), calib, groups if want_stats else None, loss=calib is not None)
            except FloatingPointError as err:
                if str(err).startswith("ARM iteration"):
                    raise
                raise FloatingPointError(f"ARM iteration {t + 1}: {err} (the model diverged; lower merge.lr)") from None
            record["loss"] = loss_t if calib is not None else None
        record.update(_rotation_effect(inputs, coeffs, corr, gsq, math.fsum(etas[:t]), device))
        if converged is not None:
            record.update(converged.measure(inputs.names, theta, inputs.last))
        history.append(record)
        if log_fn is not None:
            entry = {f"arm/{k}": v for k, v in record.items() if not isinstance(v, dict) and v is not None}
            entry.update({f"arm/rotation_effect/layer_{i}": v for i, v in record["rotation_effect_layers"].items()
                          if v is not None})
            log_fn(entry)
        log.info("ARM iteration %d: η=%g loss=%s", t, eta, record["loss"])
        if params.select == "best_loss" and record["loss"] is not None and (best is None or record["loss"] < best[0]):
            best = (record["loss"], t, {n: list(v) for n, v in coeffs.items()}, {n: v.clone() for n, v in corr.items()})
    selected = params.iterations
    if params.select == "best_loss":
        assert best is not None
        _, selected, coeffs, corr = best
    if layerwise is None:
        state = {name: theta(name) for name in inputs.names}
    else:
        state = _LazyState(inputs.names, theta)
    diagnostics = {"params": params.to_dict(), "etas": etas, "selected_iteration": selected,
                   "rotated_groups": [grp.key for grp in groups], "formulation": params.formulation,
                   "history": history}
    if flows is not None:
        diagnostics["trajectory"] = {"span_ratio": span, "groups": trajectory_diag}
    if calib is not None:
        diagnostics["calibration"] = {"stats_sequences": calib.n_stats_sequences, "loss_sequences": calib.n_loss_sequences,
                                      "stats_tokens": calib.n_tokens}
    return IterationResult(state, diagnostics, selected)


def _previous_inputs(model: Any, targets: Mapping[str, Any] | None, inputs: Inputs,
                     previous: Callable[[str], torch.Tensor], groups: Sequence[Any], calib: Any,
                     device: torch.device, layerwise: Any) -> dict[str, torch.Tensor]:
    """The group inputs of c_{m−1} (θ0 when m = 1) on the calibration tokens: layer by layer from the
    files, or in memory by loading its tensors into the model at c_m and restoring c_m afterwards."""
    import torch


    if layerwise is not None:
        X, _ = layerwise.run(previous, calib, groups, loss=False)
        assert X is not None
        return X
    assert targets is not None
    with torch.no_grad():
        try:
            for name in inputs.names:
                targets[name].data.copy_(previous(name))
            return collect_inputs(model, groups, calib, device)
        finally:
            for name in inputs.names:
                targets[name].data.copy_(inputs.last[name])


_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _rotation_effect(inputs: Inputs, coeffs: Mapping[str, Sequence[float]], corr: Mapping[str, torch.Tensor],
                     gsq: Mapping[str, float], alpha: float, device: torch.device) -> dict[str, Any]:
    """‖θ_ARM − θ_ExPO‖ / ‖θ_ExPO − c_m‖ at the same total step α = Σ η_t (θ_ExPO = c_m + α g), over all
    parameters (``rotation_effect``) and per decoder layer (``rotation_effect_layers``, keyed by its index).
    θ_ARM − θ_ExPO = (a − α) g + E per tensor (a its own coefficient: α unless layer_scale scales it)."""
    num: dict[str, float] = {}
    den: dict[str, float] = {}
    total_num = total_den = 0.0
    for name in inputs.names:
        a = math.fsum(coeffs[name])
        d2 = 0.0
        if name in corr or a != alpha:  # on E's device (host memory in layer-by-layer mode on a GPU)
            diff = corr[name] if name in corr else None
            if a != alpha:
                scaled = inputs.g[name].to(diff.device if diff is not None else device) * (a - alpha)
                diff = scaled if diff is None else scaled.add_(diff)
            assert diff is not None
            d2 = float(diff.square().sum())
        total_num += d2
        total_den += gsq[name]
        match = _LAYER_RE.search(name)
        if match is not None:
            key = match.group(1)
            num[key] = num.get(key, 0.0) + d2
            den[key] = den.get(key, 0.0) + gsq[name]

    def ratio(n: float, d: float) -> float | None:
        return math.sqrt(n) / (alpha * math.sqrt(d)) if d > 0 and alpha > 0 else None

    layers = {k: ratio(num[k], den[k]) for k in sorted(num, key=int)}
    return {"rotation_effect": ratio(total_num, total_den), "rotation_effect_layers": layers}


class _LazyState(Mapping):
    """The selected iterate, each tensor materialised (θ = g·a + c_m + E) when it is read."""

    def __init__(self, names: Sequence[str], theta: Callable[[str], torch.Tensor],
                 extra: Mapping[str, Callable[[], torch.Tensor]] | None = None):
        self.names, self.theta = list(names), theta
        self.extra = dict(extra or {})
        self.known = set(self.names) | set(self.extra)

    def with_extra(self, extra: Mapping[str, Callable[[], torch.Tensor]]) -> _LazyState:
        return _LazyState(self.names, self.theta, {**self.extra, **extra})

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.extra:
            return self.extra[name]()
        if name not in self.known:
            raise KeyError(name)
        return self.theta(name)

    def __contains__(self, name: object) -> bool:
        return name in self.known

    def __iter__(self):
        return iter([*self.names, *(n for n in self.extra if n not in set(self.names))])

    def __len__(self) -> int:
        return len(self.known)


# ---------------------------------------------------------------------------------------------
# the registered method


class ARM(WholeModelMethod):
    """Merge method ``arm`` (a whole-model iterative method, not a per-tensor rule)."""

    name = "arm"

    @classmethod
    def accepted_params(cls) -> list[str]:
        return list(ARMParams.__dataclass_fields__)

    @classmethod
    def validate_params(cls, params: Mapping[str, Any]) -> ARMParams:
        return parse_params(params)

    @classmethod
    def write_report(cls, out_dir: Path) -> list[Path]:
        """diagnostics.png from the merge's diagnostics.json (written next to it, atomically; kept if present)."""
        out_dir = Path(out_dir)
        png, source = out_dir / DIAGNOSTICS_PNG, out_dir / DIAGNOSTICS_JSON
        if png.is_file() or not source.is_file():
            return []
        tmp = png.with_name(f".{png.stem}.{os.getpid()}.png")
        try:
            if plot_diagnostics(json.loads(source.read_text()), tmp) is None:
                return []
            os.replace(tmp, png)
        finally:
            tmp.unlink(missing_ok=True)
        return [png]

    @classmethod
    def report_pending(cls, out_dir: Path, params: Mapping[str, Any], base: Path, checkpoints: Sequence[Path]) -> bool:
        out_dir = Path(out_dir)
        source = out_dir / DIAGNOSTICS_JSON
        if (out_dir / DIAGNOSTICS_PNG).is_file() or not source.is_file() or not (out_dir / "config.json").is_file():
            return False
        try:
            diag = json.loads(source.read_text())
        except (OSError, json.JSONDecodeError):
            return False
        inputs = diag.get("inputs") or {}
        try:
            wanted = parse_params(params).to_dict()
        except MergeConfigError:
            return False
        return (diag.get("params") == wanted and inputs.get("base") == str(base)
                and inputs.get("checkpoints") == [str(c) for c in checkpoints])

    @classmethod
    def uses_calibration(cls, params: Mapping[str, Any]) -> bool:
        return parse_params(params).uses_calibration()

    @classmethod
    def merge_folder(
        cls,
        params: Mapping[str, Any],
        base: Path,
        checkpoints: Sequence[Path],
        out_dir: Path,
        settings: Any,
        *,
        progress: bool = True,
        context: Any = None,
    ) -> dict[str, Any]:
        """Run ARM on ``base`` and ``checkpoints`` (the last is c_m) and write ``out_dir``.

        On CPU torch runs single-threaded, as the engine does: on a machine shared with other
        jobs, intra-op threads made the tiny model's merge slower, not faster.
        """
        import torch

        threads = torch.get_num_threads()
        if settings.resolve_device().type == "cpu":
            torch.set_num_threads(1)
        try:
            return cls._merge_folder(params, base, checkpoints, out_dir, settings, progress=progress, context=context)
        finally:
            torch.set_num_threads(threads)

    @classmethod
    def _merge_folder(
        cls,
        params: Mapping[str, Any],
        base: Path,
        checkpoints: Sequence[Path],
        out_dir: Path,
        settings: Any,
        *,
        progress: bool,
        context: Any,
    ) -> dict[str, Any]:
        from transformers import AutoTokenizer


        t0 = time.perf_counter()
        p = parse_params(params)
        if not checkpoints:
            raise MergeInputError("no early checkpoints given: ARM needs at least one")
        base, out_dir = Path(base), Path(out_dir)
        checkpoints = [Path(c) for c in checkpoints]
        if p.formulation == "stream":  # an iterate over the stream of inputs, not an extrapolation of c_m
            return stream_merge(p, base, checkpoints, out_dir, settings, progress=progress, context=context)
        if p.direction == "delta" and len(checkpoints) < 2:
            raise MergeConfigError(f"merge.direction: delta needs at least 2 early checkpoints, got {len(checkpoints)}")
        steps = None
        if p.direction == "ema":
            try:
                steps = [checkpoint_step(c) for c in checkpoints]
            except ValueError as err:
                raise MergeInputError(str(err)) from None
        span = 1.0
        if p.needs_previous() and p.turn == "chord":  # only the chord rule uses the span of g in gaps
            if p.direction == "task_vector" and len(checkpoints) > 1:
                try:
                    steps = [checkpoint_step(c) for c in checkpoints]
                except ValueError as err:
                    raise MergeInputError(f"{err}; merge.formulation: trajectory_rotation with direction=task_vector "
                                          "needs them too (how many checkpoint gaps g spans)") from None
            try:
                span = span_ratio(p.direction, steps, len(checkpoints))
            except ValueError as err:
                raise MergeInputError(str(err)) from None
        base_f, ck_f = open_folders(base, checkpoints)
        plan = plan_merge(base_f, ck_f, settings.dtype)
        float_names = [n for n in plan.names if plan.inputs[n][0].is_float]
        records = list(getattr(context, "calibration", None) or [])
        if p.needs_statistics() or p.select == "best_loss":
            if not records:
                raise MergeInputError(
                    "ARM needs calibration data (the domain's train records) for "
                    + ("its statistics" if p.needs_statistics() else "select=best_loss")
                    + ", and none was given"
                )
        device = settings.resolve_device()
        mode = statistics_mode(p, device, ck_f[-1], float_names, plan)
        model = layerwise = None
        if mode == "layerwise":

            layerwise = LayerwiseModel(checkpoints[-1], float_names, device)  # unsupported: fails here
            # each storage once: a tied lm_head is the embedding
            names = [n for n in float_names if not (layerwise.tied and n == HEAD)]
            inputs = _DiskInputs(plan, names, p, steps, device)
        else:
            model = load_model(checkpoints[-1], device, progress)
            # each storage once: a tied lm_head is updated through the embedding, whichever name the files list
            # first (safetensors lists lm_head.weight before model.embed_tokens.weight), as layer by layer
            targets = model.state_dict(keep_vars=True)
            for n in float_names:
                if n not in targets:
                    raise MergeInputError(f"{checkpoints[-1]}: the loaded model has no parameter {n!r} of the files")
            names, aliases = shared_storages(float_names, lambda n: targets[n].data_ptr())
            inputs = load_inputs(plan, names, p, steps, device)
        calib = None
        if records:
            tok_dir = checkpoints[-1] if ModelFolder(checkpoints[-1]).has_tokenizer() else base
            tokenizer = AutoTokenizer.from_pretrained(tok_dir)
            c = p.calibration
            calib = prepare_calibration(records, tokenizer, n_sequences=c.n_sequences, max_length=c.max_length,
                                        holdout_fraction=c.holdout_fraction, seed=c.seed, max_tokens=c.max_tokens)
        conv_path = getattr(context, "converged", None)
        converged = _Converged(Path(conv_path), names, bool(base_f.config.get("tie_word_embeddings", False))) if conv_path else None
        log_fn = getattr(context, "log", None)
        # c_{m−1}, or θ0 when m = 1 (index into [θ0, c_1..c_m]): the start of the trajectory rotation
        previous = _ModelTensors(plan, len(checkpoints) - 1, device) if p.needs_previous() else None
        try:
            result = iterate(model, inputs, p, calib=calib, converged=converged, log_fn=log_fn, device=device,
                             layerwise=layerwise, previous=previous, span=span)
            if layerwise is None:
                # tied duplicates (the selected iterate of their storage) and non-float tensors
                state = complete_state(dict(result.state), plan, aliases)
            else:

                extra = {}
                for n in plan.names:  # the tied lm_head (the embedding's θ) and non-float tensors
                    if n in result.state:
                        continue
                    if plan.inputs[n][0].is_float:
                        extra[n] = (lambda: result.state[EMBED])
                    else:
                        extra[n] = (lambda info=plan.inputs[n][0]: _read_tensor(info))
                state = result.state.with_extra(extra)
            del model

            def diagnostics(folder: Path) -> None:  # into the temporary folder: out_dir appears only when complete
                result.diagnostics["statistics"] = mode
                result.diagnostics["inputs"] = {"base": str(base), "checkpoints": [str(c) for c in checkpoints],
                                                "steps": steps, "converged": str(conv_path) if conv_path else None}
                (folder / DIAGNOSTICS_JSON).write_text(json.dumps(result.diagnostics, indent=2, default=float) + "\n")

            written = write_state_dict(state, base, checkpoints, out_dir, settings, before_publish=diagnostics)
        finally:
            if isinstance(inputs, _DiskInputs):
                inputs.close()
            if previous is not None:
                previous.close()
        final = result.diagnostics["history"][result.selected]
        return {
            "method": cls.name,
            "params": p.to_dict(),
            "wall_s": round(time.perf_counter() - t0, 3),
            "n_tensors": written["n_tensors"],
            "device": str(device),
            "dtype": settings.dtype
            or ",".join(sorted({str(torch_dtype(t.dtype)).removeprefix("torch.") for t in plan.out})),
            "out_dir": str(out_dir),
            "shards": written["shards"],
            "selected_iteration": result.selected,
            "statistics": mode,
            "calibration_loss": final.get("loss"),
            **{k: final[k] for k in ("cos_to_converged", "rel_dist_to_converged") if k in final},
            "diagnostics": str(out_dir / DIAGNOSTICS_JSON),
        }


def _read_tensor(info: Any) -> torch.Tensor:
    with TensorReader() as reader:
        return reader.read(info)


def in_memory_gb(folder: Any, float_names: Sequence[str], plan: Any, params: ARMParams) -> float:
    """``python -m arm.method.memory``'s ``arm_in_memory`` estimate for this checkpoint (GB); 16 bytes per
    float parameter (θ, c_m, g, E) when its config.json lacks the shapes the estimate needs."""

    try:
        shapes = Shapes.from_hf_config(folder.config)
    except (KeyError, TypeError, ValueError):
        return 16 * sum(plan.inputs[n][-1].numel for n in float_names) / GB
    return stage_memory(shapes, {}, params.to_dict())["arm_in_memory"]["total"]


def statistics_mode(params: ARMParams, device: torch.device, folder: Any, float_names: Sequence[str], plan: Any) -> str:
    """``model`` or ``layerwise`` for ``merge.statistics``. ``auto``: ``model`` on CPU (host memory is
    not estimated; the default's CPU results stay those of the whole-model mode); on a GPU,
    ``layerwise`` when the in-memory estimate (``in_memory_gb``) exceeds ``AUTO_DEVICE_SHARE`` of the
    device's memory and the architecture can be built layer by layer (``arm.method.layerwise``), else ``model``."""
    if params.statistics != "auto":
        return params.statistics
    if device.type != "cuda":
        return "model"
    import torch


    total_gb = torch.cuda.get_device_properties(device).total_memory / 1e9
    need = in_memory_gb(folder, float_names, plan, params)
    if need > AUTO_DEVICE_SHARE * total_gb:
        reason = unsupported_reason(folder.config)
        if reason is None:
            log.info("ARM statistics layer by layer: in-memory estimate %.1f GB > %.0f%% of %.1f GB", need,
                     100 * AUTO_DEVICE_SHARE, total_gb)
            return "layerwise"
        log.warning("ARM: in-memory estimate %.1f GB exceeds the GPU (%.1f GB) but %s: %s; trying the whole model",
                    need, total_gb, folder.path, reason)
    return "model"


def plot_diagnostics(diagnostics: Mapping[str, Any], out: Path) -> Path | None:
    """η_t, calibration loss, mean principal angle / ‖R − I‖_F, the distances to c* and the rotation
    effect ‖θ − θ_ExPO‖ / ‖θ_ExPO − c_m‖ (all parameters and per layer) vs iteration."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        return None
    hist = diagnostics["history"]
    its = [h["iteration"] for h in hist]

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(h["iteration"], h[key]) for h in hist if h.get(key) is not None]
        return [a for a, _ in pts], [b for _, b in pts]

    fig, axes = plt.subplots(1, 5, figsize=(20, 3.4))
    axes[0].plot(its[1:], [h["eta"] for h in hist[1:]], "o-")
    axes[0].set_title("η_t")
    x, y = series("loss")
    axes[1].plot(x, y, "o-")
    axes[1].axvline(diagnostics["selected_iteration"], color="grey", ls=":")
    axes[1].set_title("held-out calibration loss")
    x, y = series("mean_angle_deg")
    if x:
        axes[2].plot(x, y, "o-", label="mean principal angle c_m vs θ_t (deg)")
    x, y = series("measured_angle_deg")
    if x:
        axes[2].plot(x, y, "o-", label="mean principal angle c_{m−1} vs c_m (deg; measured once)")
    x, y = series("rot_dist")
    axes[2].plot(x, y, "s--", label="mean ‖R(s_t) − I‖_F" if "measured_angle_deg" in hist[-1] else "mean ‖R_t − I‖_F")
    axes[2].legend(fontsize=7)
    axes[2].set_title("rotations")
    x, y = series("cos_to_converged")
    axes[3].plot(x, y, "o-", label="cos(θ − c_m, c* − c_m)")
    x, y = series("rel_dist_to_converged")
    axes[3].plot(x, y, "s--", label="‖θ − c*‖ / ‖c_m − c*‖")
    axes[3].legend(fontsize=7)
    axes[3].set_title("vs converged SFT (diagnostic)")
    layer_keys = sorted({k for h in hist for k in (h.get("rotation_effect_layers") or {})}, key=int)
    for key in layer_keys:
        pts = [(h["iteration"], h["rotation_effect_layers"][key]) for h in hist
               if (h.get("rotation_effect_layers") or {}).get(key) is not None]
        axes[4].plot([a for a, _ in pts], [b for _, b in pts], "-", lw=0.8, alpha=0.5)
    x, y = series("rotation_effect")
    axes[4].plot(x, y, "ko-", label="all parameters (thin: per layer)")
    axes[4].legend(fontsize=7)
    axes[4].set_title("‖θ − θ_ExPO‖ / ‖θ_ExPO − c_m‖")
    for ax in axes:
        ax.set_xlabel("iteration")
    fig.subplots_adjust(left=0.04, right=0.995, bottom=0.16, top=0.88, wspace=0.28)  # tight_layout: 0.5 s more
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
