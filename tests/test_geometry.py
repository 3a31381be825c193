"""evals.geometry on planted trajectories whose answers are known by construction."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from evals.geometry import geometry, lr_spent


def _write(folder: Path, tensors: dict) -> None:
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))


def _trainer_folder(tmp_path: Path, points: dict[int, dict], lr: float) -> Path:
    run = tmp_path / "run"
    _write(tmp_path / "base", points.pop(0))
    for step, tensors in points.items():
        _write(run / f"checkpoint-{step}", tensors)
    last = max(points)
    state = {"log_history": [{"step": s, "learning_rate": lr, "loss": 1.0} for s in range(1, last + 1)]}
    (run / f"checkpoint-{last}" / "trainer_state.json").write_text(json.dumps(state))
    return run


def test_a_straight_line_at_constant_rate(tmp_path):
    g = torch.Generator().manual_seed(0)
    theta0 = {"a.weight": torch.randn(8, 4, generator=g), "b.bias": torch.randn(5, generator=g),
              "steps": torch.arange(3)}  # integer tensors are not weights
    v = {k: torch.randn(t.shape, generator=g) for k, t in theta0.items() if t.is_floating_point()}
    points = {s: {**{k: theta0[k] + s * v[k] for k in v}, "steps": theta0["steps"]} for s in (10, 20, 40)}
    run = _trainer_folder(tmp_path, {0: dict(theta0), **points}, lr=0.5)
    out = geometry(run, base=tmp_path / "base")
    assert out["converged_step"] == 40 and out["n_tensors"] == 2 and [r["step"] for r in out["rows"]] == [10, 20]
    norm_v = math.sqrt(sum(float((t * t).sum()) for t in v.values()))
    for row, (start, m) in zip(out["rows"], [(0, 10), (10, 20)], strict=True):
        assert row["cos_update_converged"] == pytest.approx(1.0, abs=1e-6)
        assert row["cos_rest_update"] == pytest.approx(1.0, abs=1e-6)
        assert row["cos_rest_last_step"] == pytest.approx(1.0, abs=1e-6)
        assert row["rel_update"] == pytest.approx(m / 40, rel=1e-6)  # float32 weights
        assert row["lr_spent"] == pytest.approx(0.5 * (m - start), rel=1e-9)  # logged at every step
        assert row["displacement_per_lr"] == pytest.approx((m - start) * norm_v / row["lr_spent"], rel=1e-6)


def test_orthogonal_remainder(tmp_path):
    """SFT goes along e1 until step 10, then along e2: the rest is orthogonal to the update so far."""
    e1, e2 = torch.zeros(6), torch.zeros(6)
    e1[0], e2[1] = 1.0, 1.0
    run = _trainer_folder(tmp_path, {0: {"w": torch.zeros(6)}, 10: {"w": 3 * e1}, 20: {"w": 3 * e1 + 4 * e2}}, lr=1.0)
    row = geometry(run, base=tmp_path / "base")["rows"][0]
    assert row["cos_rest_update"] == pytest.approx(0.0, abs=1e-12)
    assert row["cos_update_converged"] == pytest.approx(3 / 5, abs=1e-12)
    assert row["rel_update"] == pytest.approx(3 / 5, abs=1e-12)


def test_lr_spent_trapezoid_between_logged_steps():
    points = [(0, 0.0), (10, 1.0), (20, 1.0)]  # warm-up logged at 10, then constant
    assert lr_spent(points, 0, 10) == pytest.approx(sum(s / 10 for s in range(1, 11)))
    assert lr_spent(points, 10, 20) == pytest.approx(10.0)
