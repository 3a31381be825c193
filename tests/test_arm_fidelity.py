"""ARM's fidelity diagnostics recomputed from the tensors it wrote, compared with diagnostics.json.

docs/results.md draws its conclusions from cos(θ − c_m, c* − c_m), ‖θ − c*‖ / ‖c_m − c*‖ and the
rotation effect ‖θ_ARM − θ_ExPO‖ / ‖θ_ExPO − c_m‖ (θ_ExPO = c_m + α g at the same total step α = Σ η_t).
Here they are computed again in float64 from the written safetensors (θ), the last early checkpoint (c_m),
the converged checkpoint (c*) and an ExPO merge written by the engine (θ_ExPO), for the iterate ARM
selected and wrote, away from t = 0 where some of them hold by definition.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from arm.merge.engine import MergeContext, merge_from_config
from arm.method.schedules import lr_schedule
from tests.helpers import load_tensors
from tests.merge_fixtures import make_trajectory


@pytest.fixture(scope="module")
def traj(tmp_path_factory):
    t = make_trajectory(tmp_path_factory.mktemp("fid"), n_checkpoints=4, hidden=32, layers=2, seed=7)
    t.converged = t.checkpoints.pop()
    return t


def records(n: int = 24) -> list[dict]:
    return [{"prompt": f"Q{i}: {i} + {i + 3} = ", "response": f"{2 * i + 3}. done"} for i in range(n)]


def _dot(a: dict, b: dict) -> float:
    return math.fsum(float((a[n].double() * b[n].double()).sum()) for n in a)


@pytest.mark.parametrize("rotation", ["procrustes", "geodesic"])
def test_cosine_relative_distance_and_rotation_effect_from_the_written_tensors(traj, tmp_path, rotation):
    lr, iterations = 0.4, 3
    cfg = {"name": "arm", "device": "cpu", "rank": 4, "rotation": rotation, "schedule": "linear", "lr": lr,
           "iterations": iterations, "calibration": {"n_sequences": 24, "max_length": 32, "holdout_fraction": 0.25,
                                                     "seed": 0, "max_tokens": 256}}
    summary = merge_from_config(cfg, traj.base, traj.checkpoints, tmp_path / "arm", progress=False,
                                context=MergeContext(calibration=records(), converged=traj.converged))
    t = summary["selected_iteration"]
    assert t >= 1
    alpha = math.fsum(lr_schedule(lr, iterations, "linear")[:t])
    merge_from_config({"name": "expo", "alpha": alpha, "device": "cpu"}, traj.base, traj.checkpoints,
                      tmp_path / "expo", progress=False)

    theta = load_tensors(tmp_path / "arm", torch.float64)
    c_m = load_tensors(traj.checkpoints[-1], torch.float64)
    star = load_tensors(traj.converged, torch.float64)
    expo = load_tensors(tmp_path / "expo", torch.float64)
    names = [n for n, v in c_m.items() if v.is_floating_point()]
    assert sorted(theta) == sorted(c_m) and len(names) > 10

    step = {n: theta[n] - c_m[n] for n in names}
    to_star = {n: star[n] - c_m[n] for n in names}
    cos = _dot(step, to_star) / math.sqrt(_dot(step, step) * _dot(to_star, to_star))
    off = {n: theta[n] - star[n] for n in names}
    rel = math.sqrt(_dot(off, off) / _dot(to_star, to_star))
    rot = {n: theta[n] - expo[n] for n in names}
    expo_step = {n: expo[n] - c_m[n] for n in names}
    effect = math.sqrt(_dot(rot, rot) / _dot(expo_step, expo_step))

    diagnostics = json.loads((tmp_path / "arm" / "diagnostics.json").read_text())
    record = diagnostics["history"][t]
    assert record["iteration"] == t
    assert record["cos_to_converged"] == pytest.approx(cos, rel=1e-4, abs=1e-6)
    assert record["rel_dist_to_converged"] == pytest.approx(rel, rel=1e-4)
    assert record["rotation_effect"] == pytest.approx(effect, rel=1e-3)
    assert effect > 1e-3  # the rotations moved θ away from ExPO: the ratio is not 0 by construction
    assert (summary["cos_to_converged"], summary["rel_dist_to_converged"]) == (
        record["cos_to_converged"], record["rel_dist_to_converged"])
