"""``formulation: stream`` — ARM as an iterate that follows the stream of checkpoints (docs/method.md §10).

Our reading of *streaming merging* (../shared/ARM.md, "What the measurements say so far"; not the paper's,
whose text we do not have): the merge keeps an iterate θ and folds in each new checkpoint with a learning
rate η_t, re-expressing each update in the iterate's activation subspace by a rotation:

    θ_1 = c_1;   θ_t = θ_{t−1} + η_t · (c_t − θ_{t−1}) · R_t        t = 2..m
    R_t: the rotation (merge.rotation, rank merge.rank) aligning c_t's input subspace with θ_{t−1}'s, per input group
         of the attention/MLP linear weights (as ARM's other formulations); other parameters: no rotation.
    η_t = 1/t (merge.stream_rate: mean — the running average) or merge.lr (constant — an EMA with β = 1 − lr).

With ``rotation: none`` the iterate is a fixed combination Σ a_i c_i; its coefficients are unrolled exactly
(fractions for η_t = 1/t) and the merge runs through the engine's linear rule with those weights, so
``rate: mean`` equals ``lawa`` over the same inputs bit for bit. With a rotation, the unrotated iterate is
carried beside it and ``rotation_effect`` = ‖θ_t − θ̄_t‖ / ‖θ̄_t − c_t‖ says how far the rotation moved it from
the average (as ARM's other formulations report it against ExPO). Whole model in memory (statistics: model).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

from arm.merge.contract import MergeConfigError
from arm.merge.engine import MergeInputError, merge, open_folders, plan_merge, write_state_dict
from arm.merge.registry import get_method
from arm.merge.tensor_io import ModelFolder, TensorReader
from arm.method.activations import collect_inputs, find_linear_groups, prepare_calibration
from arm.method.models import complete_state, load_model, shared_storages
from arm.method.rotations import rotation
from arm.method.schedules import checkpoint_step

RATES = ("mean", "constant")
DIAGNOSTICS_JSON = "diagnostics.json"


def stream_coefficients(n: int, rate: str, lr: float) -> list[float]:
    """a_i with θ_n = Σ a_i c_i for the unrotated stream: θ_1 = c_1, θ_t = (1 − η_t) θ_{t−1} + η_t c_t."""
    if rate not in RATES:
        raise MergeConfigError(f"merge.stream_rate: must be one of {', '.join(RATES)}, got {rate!r}")
    coeffs: list[Any] = [Fraction(1)]
    for t in range(2, n + 1):
        eta: Any = Fraction(1, t) if rate == "mean" else float(lr)
        coeffs = [a * (1 - eta) for a in coeffs] + [eta]
    return [float(a) for a in coeffs]


def etas(n: int, rate: str, lr: float) -> list[float]:
    return [1.0] + [1.0 / t if rate == "mean" else float(lr) for t in range(2, n + 1)]


def stream_merge(p: Any, base: Path, checkpoints: Sequence[Path], out_dir: Path, settings: Any, *,
                 progress: bool, context: Any) -> dict[str, Any]:
    """Write the streamed iterate θ_m of ``checkpoints`` (in step order) at ``out_dir``; return the summary."""
    checkpoints = [Path(c) for c in checkpoints]
    if p.stream_rate == "constant" and not 0 < p.lr <= 1:
        raise MergeConfigError(f"merge.lr: the stream's constant rate must be in (0, 1], got {p.lr}")
    coeffs = stream_coefficients(len(checkpoints), p.stream_rate, p.lr)
    if p.rotation == "none":
        rule = get_method("linear").from_params({"weights": coeffs, "normalize": False}, len(checkpoints))
        summary = merge(rule, base, checkpoints, out_dir, settings, progress=progress)
        return {**summary, "method": "arm", "params": p.to_dict(), "coefficients": coeffs}
    return _rotated(p, base, checkpoints, out_dir, settings, progress=progress, context=context)


def _rotated(p: Any, base: Path, checkpoints: list[Path], out_dir: Path, settings: Any, *, progress: bool,
             context: Any) -> dict[str, Any]:
    import time

    import torch
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    records = list(getattr(context, "calibration", None) or [])
    if not records:
        raise MergeInputError("ARM (formulation: stream) needs calibration data (the domain's train records) for its "
                              "rotations, and none was given")
    if p.statistics == "layerwise":
        raise MergeConfigError("merge.statistics: formulation stream holds the whole model in memory (statistics: model)")
    device = settings.resolve_device()
    base_f, ck_f = open_folders(base, checkpoints)
    plan = plan_merge(base_f, ck_f, settings.dtype)
    float_names = [n for n in plan.names if plan.inputs[n][0].is_float]
    model = load_model(checkpoints[0], device, progress)  # θ_1 = c_1
    probe = load_model(checkpoints[0], device, progress)  # loaded with each c_t in turn, for its inputs
    params = dict(model.state_dict(keep_vars=True))
    probe_params = dict(probe.state_dict(keep_vars=True))
    missing = [n for n in float_names if n not in params]
    if missing:
        raise MergeInputError(f"{checkpoints[0]}: the loaded model has no parameter {missing[0]!r} of the files")
    names, aliases = shared_storages(float_names, lambda n: params[n].data_ptr())
    groups = find_linear_groups(model)
    in_group = {n: grp.key for grp in groups for n in grp.params}
    tok_dir = checkpoints[-1] if ModelFolder(checkpoints[-1]).has_tokenizer() else base
    c = p.calibration
    calib = prepare_calibration(records, AutoTokenizer.from_pretrained(tok_dir), n_sequences=c.n_sequences,
                                max_length=c.max_length, holdout_fraction=c.holdout_fraction, seed=c.seed,
                                max_tokens=c.max_tokens)
    rates = etas(len(checkpoints), p.stream_rate, p.lr)
    average = {n: params[n].detach().clone() for n in names}  # θ̄_t, the unrotated stream
    history: list[dict[str, Any]] = [{"iteration": 1, "eta": 1.0, "step": _step(checkpoints[0]), "rotation_effect": 0.0}]
    with torch.no_grad():
        for t, (ckpt, eta) in enumerate(zip(checkpoints[1:], rates[1:], strict=True), start=2):
            c_t = _read(plan, ckpt_index=t, names=names, device=device, reader_cls=TensorReader)
            for n in names:
                probe_params[n].data.copy_(c_t[n])
            X_iter = collect_inputs(model, groups, calib, device)  # θ_{t−1}'s inputs
            X_new = collect_inputs(probe, groups, calib, device)  # c_t's inputs
            rots = {grp.key: rotation(p.rotation, X_new[grp.key], X_iter[grp.key], p.rank, grp.key) for grp in groups}
            del X_iter, X_new
            num = den = 0.0
            for n in names:
                theta = params[n].data
                delta = c_t[n] - theta
                corr = rots[in_group[n]].correction(delta) if n in in_group else None
                step = delta if corr is None else delta + corr
                theta.add_(step, alpha=eta)
                average[n].add_(c_t[n] - average[n], alpha=eta)
                num += float((theta - average[n]).double().square().sum())
                den += float((average[n] - c_t[n]).double().square().sum())
            history.append({"iteration": t, "eta": eta, "step": _step(ckpt),
                            "mean_angle_deg": sum(r.mean_angle_deg() for r in rots.values()) / max(len(rots), 1),
                            "rot_dist": sum(r.distance_from_identity() for r in rots.values()) / max(len(rots), 1),
                            "rotation_effect": math.sqrt(num / den) if den > 0 else 0.0})
    state = complete_state({n: params[n].detach() for n in names}, plan, aliases)
    diagnostics = {"formulation": "stream", "params": p.to_dict(), "coefficients_unrotated": stream_coefficients(
        len(checkpoints), p.stream_rate, p.lr), "etas": rates, "selected_iteration": len(checkpoints),
        "history": history, "statistics": "model",
        "inputs": {"base": str(base), "checkpoints": [str(c) for c in checkpoints]}}

    def write_diagnostics(folder: Path) -> None:
        (folder / DIAGNOSTICS_JSON).write_text(json.dumps(diagnostics, indent=2, default=float) + "\n")

    written = write_state_dict(state, base, checkpoints, out_dir, settings, before_publish=write_diagnostics)
    del model, probe
    return {**written, "method": "arm", "params": p.to_dict(), "rotation_effect": history[-1]["rotation_effect"],
            "merge_wall_s": time.perf_counter() - t0}


def _read(plan: Any, *, ckpt_index: int, names: Sequence[str], device: Any, reader_cls: Any) -> dict[str, Any]:
    """Checkpoint c_t's float tensors (plan.inputs[name] = [θ0, c_1, ..., c_m]) as float32 on ``device``."""
    import torch

    out = {}
    with reader_cls() as reader:
        for n in names:
            out[n] = reader.read(plan.inputs[n][ckpt_index]).to(device=device, dtype=torch.float32)
    return out


def _step(path: Path) -> int | None:
    try:
        return checkpoint_step(Path(path))
    except ValueError:
        return None
