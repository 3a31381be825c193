"""ARM on tied models in both file layouts (review of 2026-12-06, issue 29 item 1): a tied Qwen3 whose files store
only `model.embed_tokens.weight` (save_pretrained's layout) and one whose files also store `lm_head.weight` (as some
hub checkpoints do; safetensors lists it first). Both statistics modes, both selections: the written embedding and
lm_head are the *selected* iterate, equal to each other, and the whole-model and layer-by-layer paths agree."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from arm.merge.engine import MergeContext, merge_from_config
from arm.method.layerwise import EMBED, HEAD
from tests.helpers import load_tensors
from tests.merge_fixtures import make_trajectory

CALIB = {"n_sequences": 24, "max_length": 32, "holdout_fraction": 0.25, "seed": 0, "max_tokens": 256}


def records(n: int = 24) -> list[dict]:
    return [{"prompt": f"Q{i}: {i} + {i + 3} = ", "response": f"{2 * i + 3}." + " ok" * (i % 4)} for i in range(n)]


def store_head_too(folder) -> None:
    """Add lm_head.weight (= the embedding) to the folder's single weight file, as tied hub checkpoints may."""
    path = folder / "model.safetensors"
    tensors = load_file(path)
    tensors[HEAD] = tensors[EMBED].clone()
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture(scope="module", params=["embedding only", "lm_head stored too"])
def traj(request, tmp_path_factory):
    t = make_trajectory(tmp_path_factory.mktemp("tied"), n_checkpoints=2, hidden=32, layers=2, tie=True)
    if request.param == "lm_head stored too":
        for folder in (t.base, *t.checkpoints):
            store_head_too(folder)
    return t


@pytest.mark.parametrize("select", ["best_loss", "last"])
def test_tied_embedding_is_the_selected_iterate_in_both_statistics_modes(traj, tmp_path, select) -> None:
    ctx = MergeContext(calibration=records(), converged=traj.checkpoints[-1])
    params = {"rotation": "none", "direction": "task_vector", "schedule": "constant", "lr": 4.0, "iterations": 3,
              "select": select}
    stored_head = HEAD in load_file(traj.checkpoints[-1] / "model.safetensors")
    c_m, base = load_tensors(traj.checkpoints[-1]), load_tensors(traj.base)
    out = {}
    for mode in ("model", "layerwise"):
        cfg = {"name": "arm", "device": "cpu", "rank": 4, "calibration": CALIB, "statistics": mode, **params}
        merge_from_config(cfg, traj.base, traj.checkpoints, tmp_path / mode, progress=False, context=ctx)
        merged = load_tensors(tmp_path / mode)
        selected = json.loads((tmp_path / mode / "diagnostics.json").read_text())["selected_iteration"]
        if select == "best_loss":
            assert selected < 3, "the planted overshoot (lr 4) must make an earlier iterate the best"
        alpha = math.fsum([4.0] * selected)  # rotation none: θ_t = c_m + (Σ η) (c_m − θ0)
        want = c_m[EMBED] + alpha * (c_m[EMBED] - base[EMBED])
        torch.testing.assert_close(merged[EMBED], want, rtol=1e-5, atol=1e-5, msg=f"{mode}: embedding")
        assert (HEAD in merged) is stored_head
        if stored_head:
            assert torch.equal(merged[HEAD], merged[EMBED]), f"{mode}: lm_head and the embedding differ"
        out[mode] = merged
    assert sorted(out["model"]) == sorted(out["layerwise"])
    for name, value in out["model"].items():
        torch.testing.assert_close(out["layerwise"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")  # loads, tied
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_converged_without_lm_head_against_inputs_with_it(tmp_path) -> None:
    """Inputs that store lm_head.weight, a converged checkpoint saved the usual way (embedding only)."""
    t = make_trajectory(tmp_path / "t", n_checkpoints=3, hidden=32, layers=2, tie=True)
    for folder in (t.base, *t.checkpoints[:2]):
        store_head_too(folder)
    ctx = MergeContext(calibration=records(), converged=t.checkpoints[2])
    cfg = {"name": "arm", "device": "cpu", "rank": 4, "calibration": CALIB, "statistics": "model", "iterations": 2}
    merge_from_config(cfg, t.base, t.checkpoints[:2], tmp_path / "arm", progress=False, context=ctx)
    hist = json.loads((tmp_path / "arm" / "diagnostics.json").read_text())["history"]
    assert all(h.get("rel_dist_to_converged") is not None for h in hist)
