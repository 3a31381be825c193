"""The engine against values computed here by hand, not against itself.

The numpy and torch paths share ``plan_merge``, so comparing them cannot catch a fault in what the plan
decides: which tensors are copied from the base (integer and boolean buffers) and what a missing lm_head
reads (the embedding, with tied embeddings). These tests build folders with safetensors directly, merge
them through both paths, and compare every output tensor with a value computed in numpy from the inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import arm.merge.engine as engine
from arm.merge.engine import merge_from_config
from tests.helpers import load_tensors

BACKENDS = ["torch", "auto"]  # auto: the numpy path where it applies (linear, task arithmetic on CPU)
METHODS = ["linear", "task_arithmetic", "ties", "expo", "dare"]


def _folder(path: Path, tensors: dict[str, np.ndarray], tied: bool) -> Path:
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"))
    config = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "tie_word_embeddings": tied}
    (path / "config.json").write_text(json.dumps(config))
    return path


def _inputs(root: Path, *, lm_head_in: tuple[bool, bool, bool]) -> tuple[Path, list[Path], list[dict]]:
    """A base and two checkpoints, tied embeddings; an int64 and a bool buffer that differ between the
    folders; lm_head.weight present only where ``lm_head_in`` says (base, checkpoint 1, checkpoint 2)."""
    rng = np.random.default_rng(0)
    states = []
    for i in range(3):
        state = {
            "model.embed_tokens.weight": rng.standard_normal((12, 8)).astype(np.float32),
            "model.layers.0.mlp.up_proj.weight": rng.standard_normal((16, 8)).astype(np.float32),
            "model.norm.weight": (1 + 0.1 * rng.standard_normal(8)).astype(np.float32),
            "model.position_ids": np.arange(10, dtype=np.int64) * (i + 1),
            "model.attention_mask_buffer": (np.arange(6) % (i + 2) == 0),
        }
        if lm_head_in[i]:
            state["lm_head.weight"] = rng.standard_normal((12, 8)).astype(np.float32)
        states.append(state)
    base = _folder(root / "base", states[0], tied=True)
    cks = [_folder(root / f"checkpoint-{i}", s, tied=True) for i, s in enumerate(states[1:], start=1)]
    return base, cks, states


def _merge(monkeypatch, backend: str, method: str, base: Path, cks: list[Path], out: Path) -> dict:
    monkeypatch.setenv("ARM_MERGE_BACKEND", backend)
    merge_from_config({"name": method, "device": "cpu"}, base, cks, out, progress=False)
    return {k: v.numpy() for k, v in load_tensors(out).items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_integer_and_bool_buffers_are_the_bases(tmp_path, monkeypatch, backend, method):
    base, cks, states = _inputs(tmp_path / "in", lm_head_in=(False, False, False))
    merged = _merge(monkeypatch, backend, method, base, cks, tmp_path / "out")
    for name in ("model.position_ids", "model.attention_mask_buffer"):
        assert merged[name].dtype == states[0][name].dtype, name
        np.testing.assert_array_equal(merged[name], states[0][name], err_msg=name)
        assert not np.array_equal(merged[name], states[1][name])  # the checkpoints' differ: a real choice
    if method == "linear":  # and the float tensors are the plain average of the checkpoints
        for name, value in states[0].items():
            if value.dtype == np.float32:
                np.testing.assert_allclose(merged[name], (states[1][name] + states[2][name]) / 2, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_missing_lm_head_reads_the_embedding(tmp_path, monkeypatch, backend):
    """Tied embeddings, lm_head.weight written only by checkpoint 1: the base and checkpoint 2 contribute
    their embedding in its place."""
    base, cks, s = _inputs(tmp_path / "in", lm_head_in=(False, True, False))
    embed, head = "model.embed_tokens.weight", "lm_head.weight"
    linear = _merge(monkeypatch, backend, "linear", base, cks, tmp_path / "linear")
    np.testing.assert_allclose(linear[head], (s[1][head] + s[2][embed]) / 2, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(linear[embed], (s[1][embed] + s[2][embed]) / 2, rtol=1e-6, atol=1e-7)
    ta = _merge(monkeypatch, backend, "task_arithmetic", base, cks, tmp_path / "ta")  # θ0 + Σ (c_i - θ0)
    np.testing.assert_allclose(ta[head], s[0][embed] + (s[1][head] - s[0][embed]) + (s[2][embed] - s[0][embed]),
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(linear[head], linear[embed])  # the explicit head was not dropped


def test_numpy_chunking_reads_numpy_chunk(tmp_path, monkeypatch):
    """The numpy path cuts tensors by NUMPY_CHUNK (CPU_CHUNK is the torch path's): a tiny chunk, many
    chunks per tensor and a ragged last one, gives the same bytes, and the pool was built with it."""
    base, cks, _ = _inputs(tmp_path / "in", lm_head_in=(False, False, False))
    monkeypatch.setenv("ARM_MERGE_BACKEND", "auto")
    chunks = []
    real_pool = engine._NumpyPool

    def spy(rule, used, chunk, *args, **kwargs):
        chunks.append(chunk)
        return real_pool(rule, used, chunk, *args, **kwargs)

    monkeypatch.setattr(engine, "_NumpyPool", spy)
    default = engine.NUMPY_CHUNK
    assert default > 200  # every tensor here fits one default chunk
    for method in ("linear", "task_arithmetic"):
        merge_from_config({"name": method, "device": "cpu"}, base, cks, tmp_path / f"{method}-default", progress=False)
        monkeypatch.setattr(engine, "NUMPY_CHUNK", 7)
        merge_from_config({"name": method, "device": "cpu"}, base, cks, tmp_path / f"{method}-7", progress=False)
        monkeypatch.setattr(engine, "NUMPY_CHUNK", default)
        assert ((tmp_path / f"{method}-7" / "model.safetensors").read_bytes()
                == (tmp_path / f"{method}-default" / "model.safetensors").read_bytes())
    assert chunks == [default, 7, default, 7]
