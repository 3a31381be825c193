"""ARM's `formulation: stream` (arm/method/stream.py): an iterate that follows the stream of checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from arm.merge.contract import MergeConfigError
from arm.merge.engine import MergeContext, merge_from_config
from arm.method.stream import stream_coefficients
from baselines.averaging import ema_coefficients
from tests.helpers import load_tensors
from tests.merge_fixtures import make_trajectory

CALIB = {"n_sequences": 24, "max_length": 32, "holdout_fraction": 0.25, "seed": 0, "max_tokens": 256}


def records(n: int = 24) -> list[dict]:
    return [{"prompt": f"Q{i}: {i} + {i + 3} = ", "response": f"{2 * i + 3}." + " ok" * (i % 4)} for i in range(n)]


@pytest.fixture(scope="module")
def traj(tmp_path_factory):
    return make_trajectory(tmp_path_factory.mktemp("stream"), n_checkpoints=4, hidden=32, layers=2)


def stream(traj, out, checkpoints=None, **params):
    cfg = {"name": "arm", "device": "cpu", "rank": 4, "calibration": CALIB, "formulation": "stream", **params}
    return merge_from_config(cfg, traj.base, checkpoints or traj.checkpoints, out, progress=False,
                             context=MergeContext(calibration=records()))


def test_coefficients_unroll_the_recursion() -> None:
    assert stream_coefficients(4, "mean", 0.0) == [0.25] * 4
    assert stream_coefficients(3, "mean", 0.0) == [1 / 3] * 3
    assert stream_coefficients(4, "constant", 0.5) == pytest.approx(ema_coefficients(4, 0.5))
    assert stream_coefficients(1, "mean", 0.0) == [1.0]


def test_rotation_none_and_rate_mean_is_the_uniform_average_bit_for_bit(traj, tmp_path) -> None:
    stream(traj, tmp_path / "stream", rotation="none")
    merge_from_config({"name": "lawa", "device": "cpu"}, traj.base, traj.checkpoints, tmp_path / "lawa", progress=False)
    ours, lawa = load_tensors(tmp_path / "stream"), load_tensors(tmp_path / "lawa")
    assert sorted(ours) == sorted(lawa)
    for name in lawa:
        assert torch.equal(ours[name], lawa[name]), name


def test_rotation_none_and_a_constant_rate_is_an_ema(traj, tmp_path) -> None:
    stream(traj, tmp_path / "stream", rotation="none", stream_rate="constant", lr=0.3)
    merge_from_config({"name": "ema", "beta": 0.7, "device": "cpu"}, traj.base, traj.checkpoints, tmp_path / "ema",
                      progress=False)
    ours, ema = load_tensors(tmp_path / "stream"), load_tensors(tmp_path / "ema")
    for name in ema:
        torch.testing.assert_close(ours[name], ema[name], rtol=1e-6, atol=1e-7, msg=name)


def test_rotated_stream_reports_its_distance_from_the_average(traj, tmp_path) -> None:
    summary = stream(traj, tmp_path / "rot", rotation="procrustes")
    diag = json.loads((tmp_path / "rot" / "diagnostics.json").read_text())
    assert [h["iteration"] for h in diag["history"]] == [1, 2, 3, 4]
    assert diag["etas"] == [1.0, 1 / 2, 1 / 3, 1 / 4]
    assert all(h["rotation_effect"] > 0 for h in diag["history"][1:])
    assert summary["rotation_effect"] == diag["history"][-1]["rotation_effect"]
    # the rotation effect recomputed from the written folders: ‖θ − θ̄‖ / ‖θ̄ − c_m‖ with θ̄ the uniform average
    stream(traj, tmp_path / "avg", rotation="none")
    ours, avg, last = load_tensors(tmp_path / "rot"), load_tensors(tmp_path / "avg"), load_tensors(traj.checkpoints[-1])
    num = sum(float((ours[n] - avg[n]).double().square().sum()) for n in avg)
    den = sum(float((avg[n] - last[n]).double().square().sum()) for n in avg)
    assert (num / den) ** 0.5 == pytest.approx(summary["rotation_effect"], rel=1e-3)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "rot")  # a loadable HF folder


def test_equal_checkpoints_give_no_rotation(traj, tmp_path) -> None:
    """c_2 an exact copy of c_1: the iterate's inputs and c_2's agree, R = I (to rounding): the average."""
    copy = tmp_path / "checkpoint-15"
    shutil.copytree(traj.checkpoints[0], copy)
    stream(traj, tmp_path / "rot", checkpoints=[traj.checkpoints[0], copy], rotation="procrustes")
    ours, first = load_tensors(tmp_path / "rot"), load_tensors(traj.checkpoints[0])
    for name in first:
        torch.testing.assert_close(ours[name], first[name], rtol=0, atol=1e-5, msg=name)


def test_bad_stream_settings_name_the_key(traj, tmp_path) -> None:
    with pytest.raises(MergeConfigError, match="merge.stream_rate"):
        stream(traj, tmp_path / "a", stream_rate="sometimes")
    with pytest.raises(MergeConfigError, match="merge.lr"):
        stream(traj, tmp_path / "b", stream_rate="constant", lr=1.5, rotation="none")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
