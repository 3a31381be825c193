"""The SFT loop of the tiny model (arm/trajectory/sft.py): trajectory layout, loss masking, checks, determinism."""

from __future__ import annotations

import json

import pytest

from arm.trajectory.sft import (
    IGNORE_INDEX,
    collate,
    encode_example,
    lr_at,
    resolve_sft_config,
    train_trajectory,
)
from arm.trajectory.tiny import build_char_tokenizer
from tests.helpers import TEST_ARCH

MODEL_CFG = {"name": "tiny-test", "arch": dict(TEST_ARCH)}
# The small override the harness tests use: ~20 steps on ~200 examples, a few seconds.
SFT_CFG = {
    "lr": 3e-3,
    "batch_size": 16,
    "max_steps": 12,
    "warmup_steps": 2,
    "save_steps": [4, 8],
    "early_steps": [4, 8],
    "eval_every": 4,
    "eval_batch_size": 64,
}


@pytest.fixture(scope="module")
def splits():
    from arm.data.domains import generate_splits

    return generate_splits("math_synth", {"n_train": 160, "n_validation": 32, "n_test": 32}, 7)


@pytest.fixture(scope="module")
def trajectory(splits, tmp_path_factory):
    out = tmp_path_factory.mktemp("traj") / "run"
    logs: list[dict] = []
    manifest = train_trajectory(MODEL_CFG, SFT_CFG, splits, out, seed=0, log_fn=logs.append)
    return out, manifest, logs


def test_loss_masking():
    tok = build_char_tokenizer()
    ids, labels = encode_example(tok, {"prompt": "Ann has 3.\nA:", "response": " 36"})
    n_prompt = len("Ann has 3.\nA:")
    assert ids == tok("Ann has 3.\nA: 36")["input_ids"] + [tok.eos_token_id]
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert labels[-1] == tok.eos_token_id
    batch_ids, batch_labels = collate([(ids, labels), ([5, 6], [IGNORE_INDEX, 6])], tok.pad_token_id)
    assert batch_ids.shape == batch_labels.shape == (2, len(ids))
    assert batch_ids[1, 2:].eq(tok.pad_token_id).all()  # right padding in training
    assert batch_labels[1, 2:].eq(IGNORE_INDEX).all()


def test_trajectory_layout(trajectory):
    out, manifest, logs = trajectory
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (out / "base" / "model.safetensors").exists()
    assert (out / "base" / "generation_config.json").exists()
    assert (out / "base" / "tokenizer.json").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-4", "checkpoint-8"]
    model = AutoModelForCausalLM.from_pretrained(out / "checkpoint-8")
    tok = AutoTokenizer.from_pretrained(out / "checkpoint-8")
    assert model.config.vocab_size == len(tok)
    state = json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["global_step"] == 8
    assert [e["step"] for e in state["log_history"]] == [4, 8]
    assert {"step", "loss", "eval_loss"} <= set(state["log_history"][-1])

    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    assert manifest["format"] == 1 and manifest["model"] == "tiny-test" and manifest["base"] == "base"
    assert [c["step"] for c in manifest["checkpoints"]] == [4, 8, 12]
    assert [c["path"] for c in manifest["checkpoints"]] == ["checkpoint-4", "checkpoint-8", "checkpoint-12"]
    for c in manifest["checkpoints"]:
        assert {"train_loss", "val_loss", "wall_s"} <= set(c)
    walls = [c["wall_s"] for c in manifest["checkpoints"]]
    assert walls == sorted(walls)
    assert manifest["converged_step"] == manifest["total_steps"] == 12
    assert manifest["early_steps"] == [4, 8]
    assert manifest["n_train"] == 160 and manifest["epochs"] == 1.2
    assert [h["step"] for h in manifest["history"]] == [0, 4, 8, 12]
    assert {"step", "train_loss", "val_loss", "lr"} <= set(manifest["history"][-1])
    assert manifest["history"][-1]["val_loss"] < manifest["history"][0]["val_loss"]
    for key in ("train_wall_s", "seed", "torch_version"):
        assert key in manifest
    assert [entry["step"] for entry in logs] == [0, 4, 8, 12]


def test_deterministic(trajectory, splits, tmp_path):
    from safetensors.torch import load_file

    out, _, _ = trajectory
    train_trajectory(MODEL_CFG, SFT_CFG, splits, tmp_path, seed=0)
    a = load_file(out / "checkpoint-12" / "model.safetensors")
    b = load_file(tmp_path / "checkpoint-12" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"early_steps": [4, 6]}, "early_steps"),  # 6 is not a save step
        ({"early_steps": [8, 4]}, "early_steps"),  # not ordered
        ({"save_steps": [8, 4], "early_steps": []}, "save_steps"),
        ({"save_steps": [4, 99]}, "save_steps"),  # beyond the last step
        ({"early_steps": [4, 12], "save_steps": [4, 12]}, "early_steps"),  # the final step is not early
        ({"lr": 0}, "lr"),
        ({"batch_sise": 3}, "batch_sise"),
    ],
)
def test_bad_config(override, key, splits, tmp_path):
    with pytest.raises(ValueError, match=key):
        train_trajectory(MODEL_CFG, {**SFT_CFG, **override}, splits, tmp_path / "x", seed=0)
    assert not (tmp_path / "x").exists()  # rejected before any work


def test_schedule():
    cfg = resolve_sft_config({"lr": 1.0, "warmup_steps": 10, "max_steps": 110, "schedule": "cosine"}, 100)
    assert lr_at(5, cfg) == pytest.approx(0.5)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.5)
    assert lr_at(110, cfg) == pytest.approx(0.0)
    cfg = resolve_sft_config({"batch_size": 32, "epochs": 3, "warmup_steps": 0}, 100)
    assert cfg["steps_per_epoch"] == 4 and cfg["total_steps"] == 12 and cfg["save_steps"] == [12]


def test_quick_scores_and_plot(trajectory, splits, tmp_path, monkeypatch):
    from evals.trajectory_report import format_table, plot_trajectory, quick_scores

    out, manifest, _ = trajectory
    from arm.data.domains import get_generator

    records = splits["test"][:5]  # quick_scores keeps the first 5 predictions: here every one
    result = quick_scores(out, "math_synth", "test", records=records, batch_size=4)
    assert [m["step"] for m in result["models"]] == [0, 4, 8, 12]
    assert result["n"] == 5 and result["early_steps"] == [4, 8] and result["converged_step"] == 12
    score = get_generator("math_synth").score
    for m in result["models"]:  # each model's score recomputed from its predictions with the domain's scorer
        samples = result["samples"][m["name"]]
        assert [s["prompt"] for s in samples] == [r["prompt"] for r in records]
        assert m["score"] == pytest.approx(sum(float(score(s["prediction"], r)) for s, r in zip(samples, records, strict=True)) / 5)
    plot_trajectory(manifest, result, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes().startswith(b"\x89PNG")
    assert "| checkpoint-12 | 12 |" in format_table(result)

    # The same inputs again (another job of a sweep) write the same bytes without rendering; other ones render.
    from evals import trajectory_report

    rendered = []
    real = trajectory_report._render_trajectory
    monkeypatch.setattr(trajectory_report, "_render_trajectory", lambda *a: rendered.append(a) or real(*a))
    plot_trajectory(manifest, result, tmp_path / "again" / "plot.png")
    assert not rendered and (tmp_path / "again" / "plot.png").read_bytes() == (tmp_path / "plot.png").read_bytes()
    plot_trajectory(manifest, {**result, "split": "validation"}, tmp_path / "validation.png")
    plot_trajectory(manifest, result, tmp_path / "titled.png", title="another title")
    assert len(rendered) == 2 and (tmp_path / "validation.png").read_bytes() != (tmp_path / "plot.png").read_bytes()


def test_greedy_generate_stops_at_eos():
    from arm.trajectory.sft import greedy_generate
    from arm.trajectory.tiny import build_char_tokenizer, build_model

    tok = build_char_tokenizer()
    model = build_model(MODEL_CFG["arch"], tok, seed=0)
    model.generation_config.eos_token_id = tok.eos_token_id
    outs = greedy_generate(model, tok, ["ab", "abcdef"], max_new_tokens=5, until=["\n"], batch_size=2)
    assert len(outs) == 2
    assert all(len(o) <= 5 and "\n" not in o and "<|endoftext|>" not in o and "<pad>" not in o for o in outs)
