"""ARM end to end on real tiny Qwen3 folders (transformers ``save_pretrained``) through the merge
engine: the ExPO identity, exact plain updates outside the rotated set, R = I on the first
iteration, select=best_loss, diagnostics, the config file and bad inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from arm.merge.contract import MergeConfigError
from arm.merge.engine import (
    ENGINE_KEYS,
    MergeContext,
    MergeInputError,
    merge_from_config,
    validate_merge_config,
)
from arm.method.iteration import ARM, parse_params
from arm.method.schedules import lr_schedule
from tests.helpers import diverging_checkpoints, load_tensors
from tests.merge_fixtures import make_trajectory

ROTATED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def traj(tmp_path_factory):
    """Base, early checkpoints at steps 10, 20, 30 and a 'converged' one at step 40 (diagnostics only)."""
    t = make_trajectory(tmp_path_factory.mktemp("arm"), n_checkpoints=4, hidden=32, layers=2)
    t.converged = t.checkpoints.pop()
    return t


def records(n: int = 24) -> list[dict]:
    return [{"prompt": f"Q{i}: {i} + {i + 3} = ", "response": f"{2 * i + 3}. done"} for i in range(n)]


def arm(traj, out: Path, context: MergeContext | None = None, **params) -> dict:
    cfg = {"name": "arm", "device": "cpu", "rank": 4, "calibration": {"n_sequences": 24, "max_length": 32,
           "holdout_fraction": 0.25, "seed": 0, "max_tokens": 256}, **params}
    return merge_from_config(cfg, traj.base, traj.checkpoints, out, progress=False, context=context)


def expo(traj, out: Path, alpha: float) -> dict[str, torch.Tensor]:
    merge_from_config({"name": "expo", "alpha": alpha, "device": "cpu"}, traj.base, traj.checkpoints, out, progress=False)
    return load_tensors(out)


def test_rotation_none_is_exactly_expo(traj, tmp_path) -> None:
    arm(traj, tmp_path / "arm", rotation="none", direction="task_vector", schedule="constant", lr=0.3, iterations=3)
    ours, ref = load_tensors(tmp_path / "arm"), expo(traj, tmp_path / "expo", 3 * 0.3)
    assert sorted(ours) == sorted(ref)
    for name in ref:
        assert torch.equal(ours[name], ref[name]), name
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "arm")  # a loadable HF folder (+ diagnostics)
    assert model.config.tie_word_embeddings
    assert (tmp_path / "arm" / "diagnostics.json").is_file()


def test_unrotated_parameters_move_by_exactly_eta_g_and_rotations_start_at_identity(traj, tmp_path) -> None:
    logged: list[dict] = []
    ctx = MergeContext(calibration=records(), converged=traj.converged, log=logged.append)
    arm(traj, tmp_path / "arm", ctx, rotation="procrustes", schedule="linear", lr=0.4, iterations=3)
    alpha = math.fsum(lr_schedule(0.4, 3, "linear"))  # c_m + Σ_t η_t g
    ours, ref = load_tensors(tmp_path / "arm"), expo(traj, tmp_path / "expo", alpha)
    rotated = [n for n in ref if any(f"{k}.weight" in n for k in ROTATED)]
    assert len(rotated) == 2 * 7
    for name in ref:
        if name not in rotated:  # norms, embeddings (tied lm_head): exactly c_m + (Σ η_t) g
            assert torch.equal(ours[name], ref[name]), name
    assert any(not torch.allclose(ours[n], ref[n]) for n in rotated)  # the rotations did act
    diag = json.loads((tmp_path / "arm" / "diagnostics.json").read_text())
    hist = diag["history"]
    assert [h["iteration"] for h in hist] == [0, 1, 2, 3]
    assert [h["eta"] for h in hist[1:]] == lr_schedule(0.4, 3, "linear")
    assert hist[1]["rot_dist"] < 1e-4  # θ = reference on iteration 1: R = I
    assert all(g["rot_dist"] < 1e-4 for g in hist[1]["groups"].values())
    assert hist[3]["rot_dist"] > hist[1]["rot_dist"]
    assert len(hist[1]["groups"]) == 2 * 4  # qkv, o, gate_up, down per layer
    assert hist[0]["rel_dist_to_converged"] == pytest.approx(1.0)
    assert hist[0]["cos_to_converged"] is None  # θ = c_m: no step, no angle (not 0)
    assert all(-1 <= h["cos_to_converged"] <= 1 for h in hist[1:]) and all(h["loss"] > 0 for h in hist)
    assert [e["arm/iteration"] for e in logged] == [1, 2, 3]
    assert {"arm/eta", "arm/loss", "arm/mean_angle_deg", "arm/rot_dist", "arm/cos_to_converged"} <= set(logged[0])


def test_expo_identity_and_the_float_of_alpha(traj, tmp_path) -> None:
    """rotation=none with 3 × η = 0.1 is ExPO bit for bit with α = fsum(η) = 0.30000000000000004 and equally with
    α = 0.3: the merge multiplies float32 tensors, and both round to the same float32 (0.30000001192…). An α one
    float32 step away is not the same merge: the identity is exact, not approximate."""
    import numpy as np

    arm(traj, tmp_path / "arm", rotation="none", direction="task_vector", schedule="constant", lr=0.1, iterations=3)
    alpha = math.fsum([0.1] * 3)
    assert alpha == 0.30000000000000004 != 0.3 and np.float32(alpha) == np.float32(0.3)
    ours = load_tensors(tmp_path / "arm")
    for i, a in enumerate((alpha, 0.3)):
        ref = expo(traj, tmp_path / f"e{i}", a)
        assert all(torch.equal(ours[n], ref[n]) for n in ref), a
    next_up = float(np.nextafter(np.float32(0.3), np.float32(1.0)))
    ref = expo(traj, tmp_path / "next", next_up)
    assert not all(torch.equal(ours[n], ref[n]) for n in ref)


def test_select_best_loss_returns_the_lowest_loss_iterate(traj, tmp_path) -> None:
    ctx = MergeContext(calibration=records())
    summary = arm(traj, tmp_path / "best", ctx, rotation="geodesic", lr=3.0, iterations=3, select="best_loss")
    hist = json.loads((tmp_path / "best" / "diagnostics.json").read_text())["history"]
    losses = {h["iteration"]: h["loss"] for h in hist[1:]}
    best = min(losses, key=losses.get)
    assert summary["selected_iteration"] == best
    assert summary["calibration_loss"] == losses[best]
    # the written weights are that iterate: the same run stopped there gives the same tensors
    arm(traj, tmp_path / "stop", ctx, rotation="geodesic", lr=3.0, iterations=best, select="last")
    a, b = load_tensors(tmp_path / "best"), load_tensors(tmp_path / "stop")
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_ema_direction_on_checkpoint_steps(traj, tmp_path) -> None:
    arm(traj, tmp_path / "ema", rotation="none", direction="ema", beta=0.5, lr=1.0, iterations=1)
    out = load_tensors(tmp_path / "ema")
    name = "model.norm.weight"
    base, *cks = [load_tensors(p)[name] for p in (traj.base, *traj.checkpoints)]  # steps 10, 20, 30
    d = [(cks[0] - base) / 10, (cks[1] - cks[0]) / 10, (cks[2] - cks[1]) / 10]
    e = 0.25 * d[0] + 0.25 * d[1] + 0.5 * d[2]
    assert torch.allclose(out[name], cks[2] + 10 * e, atol=1e-6)


def test_config_file_maps_onto_the_parameters(compose) -> None:
    from omegaconf import OmegaConf

    merge = compose("merge=arm").merge
    keys = set(OmegaConf.to_container(merge))
    assert keys == set(ENGINE_KEYS) | set(ARM.accepted_params())
    validate_merge_config(merge)
    p = parse_params({k: v for k, v in OmegaConf.to_container(merge).items() if k not in ENGINE_KEYS})
    assert set(OmegaConf.to_container(merge.calibration)) == set(p.to_dict()["calibration"])


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"lrr": 1}, "merge.lrr: not a parameter of method 'arm'"),
        ({"schedule": "step"}, "merge.schedule: must be one of constant, linear, cosine"),
        ({"iterations": 2, "warmup": 2}, "merge.warmup: must be smaller than merge.iterations"),
        ({"rank": 0}, "merge.rank: must be ≥ 1"),
        ({"lr": -1.0}, "merge.lr: must be > 0"),
        ({"lr": 1e38}, "merge.lr: 1e\\+38 is not a merging coefficient"),
        ({"calibration": {"n_seq": 3}}, "merge.calibration.n_seq: not a calibration setting"),
        ({"select": "best_loss", "calibration": {"holdout_fraction": 0.0}}, "merge.select: best_loss needs held-out"),
        ({"rotation": "none", "layer_scale": "alignment"}, "merge.layer_scale: alignment needs a rotation"),
    ],
)
def test_bad_parameters_name_the_key(params, message) -> None:
    with pytest.raises(MergeConfigError, match=message):
        validate_merge_config({"name": "arm", **params})


def test_a_merge_that_overflows_the_output_dtype_names_the_tensor(traj, tmp_path) -> None:
    """Finite in float32, infinite once cast to float16 (what a whole-model method writes through
    write_state_dict): an error naming the tensor, and nothing written."""
    from arm.merge.engine import EngineSettings, write_state_dict

    state = load_tensors(traj.checkpoints[-1])
    name = sorted(state)[0]
    state[name] = state[name] * 1e6
    with pytest.raises(MergeInputError, match=f"tensor '{name}' overflows F16 \\(largest magnitude"):
        write_state_dict(state, traj.base, traj.checkpoints, tmp_path / "out", EngineSettings(dtype="float16"))
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_bad_inputs_fail_before_writing(traj, tmp_path) -> None:
    out = tmp_path / "out"
    with pytest.raises(MergeInputError, match="no early checkpoints"):
        merge_from_config({"name": "arm", "device": "cpu"}, traj.base, [], out, progress=False)
    with pytest.raises(MergeConfigError, match="merge.direction: delta needs at least 2"):
        merge_from_config({"name": "arm", "device": "cpu", "direction": "delta", "rotation": "none"}, traj.base,
                          traj.checkpoints[:1], out, progress=False)
    with pytest.raises(MergeInputError, match="ARM needs calibration data"):
        arm(traj, out, MergeContext(calibration=[]))
    with pytest.raises(ValueError, match="merge.rank: 1000 is larger than the input width 32"):
        arm(traj, out, MergeContext(calibration=records()), rank=1000)
    with pytest.raises(MergeInputError, match=r"merge 'arm' diverged: ARM iteration 1: parameter '.+' became NaN/Inf"):
        merge_from_config({"name": "arm", "device": "cpu", "rotation": "none", "lr": 100.0, "iterations": 2}, traj.base,
                          diverging_checkpoints(traj.checkpoints, tmp_path), out, progress=False)
    assert not out.exists()
    assert not any(p.name.startswith(".out.tmp") for p in tmp_path.iterdir())


def test_layer_scale_alignment_scales_each_group_by_its_subspace_alignment(traj, tmp_path) -> None:
    arm(traj, tmp_path / "ls", MergeContext(calibration=records()), layer_scale="alignment", lr=1.0, iterations=2)
    hist = json.loads((tmp_path / "ls" / "diagnostics.json").read_text())["history"]
    assert all(g["scale"] == pytest.approx(1.0, abs=1e-5) for g in hist[1]["groups"].values())  # R = I at t = 1
    assert all(0 < g["scale"] <= 1 + 1e-6 for g in hist[2]["groups"].values())
    assert min(g["scale"] for g in hist[2]["groups"].values()) < 1 - 1e-6


def test_merge_cli_takes_calibration_and_converged(traj, tmp_path) -> None:
    """The light CLI runs ARM with rotations from a JSONL calibration file, as the pipeline does."""
    from arm.merge import cli as merge_cli

    calib = tmp_path / "train.jsonl"
    calib.write_text("\n".join(json.dumps(r) for r in records()) + "\n")
    sets = ["--set", "rank=4", "--set", 'calibration={"n_sequences": 24, "max_length": 32, "holdout_fraction": 0.25, '
            '"seed": 0, "max_tokens": 256}']
    common = ["--method", "arm", "--base", str(traj.base), "--checkpoints", *map(str, traj.checkpoints), "--device", "cpu",
              "--no-progress", *sets]
    assert merge_cli.main([*common, "--calibration", str(calib), "--converged", str(traj.converged),
                           "--out", str(tmp_path / "cli")]) == 0
    arm(traj, tmp_path / "api", MergeContext(calibration=records(), converged=traj.converged))
    cli, api = load_tensors(tmp_path / "cli"), load_tensors(tmp_path / "api")
    assert cli.keys() == api.keys() and all(torch.equal(cli[k], api[k]) for k in cli)
    history = json.loads((tmp_path / "cli" / "diagnostics.json").read_text())["history"]
    assert "cos_to_converged" in history[-1]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n')
    assert merge_cli.main([*common, "--calibration", str(bad), "--out", str(tmp_path / "x")]) == 1
    assert not (tmp_path / "x").exists()

    # Stopped between publishing the model and drawing its report: the same merge again finishes the report
    # (the weights untouched); another merge into that folder is still refused.
    png = tmp_path / "cli" / "diagnostics.png"
    assert png.is_file()
    png.unlink()
    weights = sorted((tmp_path / "cli").glob("*.safetensors"))
    mtimes = [p.stat().st_mtime_ns for p in weights]
    run = [*common, "--calibration", str(calib), "--converged", str(traj.converged), "--out", str(tmp_path / "cli")]
    assert merge_cli.main(run) == 0 and png.is_file()
    assert [p.stat().st_mtime_ns for p in weights] == mtimes
    assert merge_cli.main([*run, "--set", "lr=0.2"]) == 1  # not this merge: "output folder exists"
