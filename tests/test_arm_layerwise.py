"""ARM's statistics layer by layer (``merge.statistics: layerwise``, arm/method/layerwise.py) against the
whole-model mode on real tiny Qwen3 folders: the same group inputs on the same token positions
(right-padded batches of unequal sequences), the same held-out loss, the same merged tensors, and a
clear error, before anything is written, for a folder that cannot be built layer by layer."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from arm.merge.contract import MergeConfigError
from arm.merge.engine import (
    MergeContext,
    MergeInputError,
    merge_from_config,
    open_folders,
    plan_merge,
    validate_merge_config,
)
from arm.method.activations import collect_inputs, find_linear_groups, prepare_calibration
from arm.method.iteration import ARMParams, _DiskInputs
from arm.method.layerwise import LayerwiseModel
from arm.trajectory.sft import _loss_sums
from tests.helpers import diverging_checkpoints, load_tensors
from tests.merge_fixtures import make_tokenizer, make_trajectory

CALIB = {"n_sequences": 24, "max_length": 32, "holdout_fraction": 0.25, "seed": 0, "max_tokens": 256}


def records(n: int = 24) -> list[dict]:
    """Unequal lengths, so the right-padded statistics batches hold padding."""
    return [{"prompt": f"Q{i}: {i} + {i + 3} = ", "response": f"{2 * i + 3}." + " ok" * (i % 4)} for i in range(n)]


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def traj(request, tmp_path_factory):
    return make_trajectory(tmp_path_factory.mktemp("lw"), n_checkpoints=2, hidden=32, layers=3, tie=request.param)


def test_layerwise_statistics_and_loss_equal_the_whole_model(traj) -> None:
    from transformers import AutoModelForCausalLM

    device = torch.device("cpu")
    ck = traj.checkpoints[-1]
    calib = prepare_calibration(records(), make_tokenizer(), **CALIB, batch_size=8)
    pad = make_tokenizer().pad_token_id
    assert len(calib.stats_batches) >= 2 and calib.loss_batches
    assert any(bool((ids == pad).any()) for ids in calib.stats_batches)  # padded batches
    assert calib.n_tokens == 256 < sum(int((ids != pad).sum()) for ids in calib.stats_batches)  # sampled positions

    model = AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32).eval()
    groups = find_linear_groups(model)
    X_model = collect_inputs(model, groups, calib, device)
    with torch.no_grad():
        sums = [_loss_sums(model, ids, labels) for ids, labels in calib.loss_batches]
    loss_model = sum(float(s) for s, _ in sums) / sum(n for _, n in sums)

    base_f, ck_f = open_folders(traj.base, traj.checkpoints)
    plan = plan_merge(base_f, ck_f, None)
    names = [n for n in plan.names if plan.inputs[n][0].is_float]
    lw = LayerwiseModel(ck, names, device)
    lw_groups = lw.groups()
    assert [(g.key, g.modules, g.params, g.in_features) for g in lw_groups] == [
        (g.key, g.modules, g.params, g.in_features) for g in groups]
    inputs = _DiskInputs(plan, [n for n in names if not (lw.tied and n == "lm_head.weight")], ARMParams(), None, device)
    read: list[str] = []

    def weights(name: str) -> torch.Tensor:  # c_m, read from the safetensors files tensor by tensor
        read.append(name)
        return inputs.last[name]

    try:
        X_lw, loss_lw = lw.run(weights, calib, lw_groups, loss=True)
    finally:
        inputs.close()
    # every weight of the forward once per pass (a tied embedding twice: lookup and output head)
    assert sorted(set(read)) == sorted(inputs.names) and len(read) == len(inputs.names) + lw.tied
    assert sorted(X_lw) == sorted(X_model) and len(X_model) == 3 * 4
    for key, X in X_model.items():
        assert X.shape == (256, X.shape[1]) and X_lw[key].shape == X.shape, key
        torch.testing.assert_close(X_lw[key], X, rtol=1e-4, atol=1e-5, msg=key)
    assert loss_lw == pytest.approx(loss_model, rel=1e-5)


@pytest.mark.parametrize(
    "params",
    [
        {},  # the defaults: procrustes, task_vector, constant, select=last
        {"rotation": "geodesic", "lr": 2.0, "iterations": 3, "select": "best_loss", "layer_scale": "alignment"},
    ],
    ids=["procrustes", "geodesic-best_loss-alignment"],
)
def test_layerwise_merge_equals_the_whole_model_merge(traj, tmp_path, params, monkeypatch) -> None:
    ctx = MergeContext(calibration=records(), converged=traj.base)
    out = {}
    for mode in ("model", "layerwise"):
        cfg = {"name": "arm", "device": "cpu", "rank": 4, "calibration": CALIB, "statistics": mode, **params}
        summary = merge_from_config(cfg, traj.base, traj.checkpoints, tmp_path / mode, progress=False, context=ctx)
        assert summary["statistics"] == mode
        out[mode] = load_tensors(tmp_path / mode)
    assert sorted(out["model"]) == sorted(out["layerwise"])
    for name, value in out["model"].items():
        torch.testing.assert_close(out["layerwise"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    hist = {m: json.loads((tmp_path / m / "diagnostics.json").read_text()) for m in out}
    assert hist["model"]["selected_iteration"] == hist["layerwise"]["selected_iteration"]
    for a, b in zip(hist["model"]["history"], hist["layerwise"]["history"], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert (a["cos_to_converged"] is None) is (b["cos_to_converged"] is None)
        if a["cos_to_converged"] is not None:
            assert b["cos_to_converged"] == pytest.approx(a["cos_to_converged"], rel=1e-4, abs=1e-6)
        if "rot_dist" in a:
            assert b["rot_dist"] == pytest.approx(a["rot_dist"], rel=1e-3, abs=1e-5)
    assert hist["layerwise"]["statistics"] == "layerwise"
    AutoModel = __import__("transformers").AutoModelForCausalLM
    AutoModel.from_pretrained(tmp_path / "layerwise")  # a loadable HF folder


def test_auto_is_the_whole_model_on_cpu_and_bad_values_name_the_key(traj, tmp_path) -> None:
    cfg = {"name": "arm", "device": "cpu", "rank": 4, "calibration": CALIB, "iterations": 1}
    summary = merge_from_config(cfg, traj.base, traj.checkpoints, tmp_path / "auto", progress=False,
                                context=MergeContext(calibration=records()))
    assert summary["statistics"] == "model"
    with pytest.raises(MergeConfigError, match="merge.statistics: must be one of auto, model, layerwise"):
        validate_merge_config({"name": "arm", "statistics": "layers"})


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        ({"use_sliding_window": True}, "sliding-window attention"),
        ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "model_type 'llama' is not supported layer by layer"),
    ],
)
def test_layerwise_on_an_unsupported_model_fails_before_writing(traj, tmp_path, edit, reason) -> None:
    folders = []
    for src in (traj.base, *traj.checkpoints):
        dst = tmp_path / src.name
        shutil.copytree(src, dst)
        cfg = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**cfg, **edit}))
        folders.append(dst)
    out = tmp_path / "out"
    cfg = {"name": "arm", "device": "cpu", "rank": 4, "calibration": CALIB, "statistics": "layerwise"}
    with pytest.raises(MergeInputError, match=rf"{folders[-1]}: cannot collect ARM's statistics layer by layer .*{reason}"):
        merge_from_config(cfg, folders[0], folders[1:], out, progress=False, context=MergeContext(calibration=records()))
    assert not out.exists() and not any(p.name.startswith(".out.tmp") for p in tmp_path.iterdir())


def test_layerwise_divergence_names_the_iteration_and_parameter(traj, tmp_path) -> None:
    out = tmp_path / "out"
    cfg = {"name": "arm", "device": "cpu", "rotation": "none", "lr": 100.0, "iterations": 2, "statistics": "layerwise"}
    checkpoints = diverging_checkpoints(traj.checkpoints, tmp_path)
    with pytest.raises(MergeInputError, match=r"merge 'arm' diverged: ARM iteration 1: parameter '.+' became NaN/Inf"):
        merge_from_config(cfg, traj.base, checkpoints, out, progress=False)
    assert not out.exists()
