"""The wheel block of a model config (conf/model/smollm2-135m.yaml) without fetching anything: its checks,
its key, `model.path` winning over it, and the plan's conversion stage. Fetch and conversion for real:
tests/test_smollm2.py."""

from __future__ import annotations

import json

import pytest

from arm.core.errors import ConfigError
from arm.trajectory import wheel_model
from arm.trajectory.trainer_sft import resolve_model_source


@pytest.fixture
def cfg(compose):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(compose("model=smollm2-135m").model)


def test_checks_name_the_key(cfg):
    for key, value, match in [("sha256", "abc", "64 hex digits"), ("dtype", "float16", "expected one of"),
                              ("member", None, "missing")]:
        bad = {**cfg, "wheel": {**cfg["wheel"], key: value}}
        with pytest.raises(ConfigError, match=f"model.wheel.{key}.*{match}"):
            wheel_model.wheel_spec(bad)
    with pytest.raises(ConfigError, match="unknown key"):
        wheel_model.wheel_spec({**cfg, "wheel": {**cfg["wheel"], "url": "x"}})


def test_key_follows_the_wheel_and_dtype(cfg):
    key = wheel_model.model_key(cfg)
    assert wheel_model.model_key({**cfg, "wheel": {**cfg["wheel"], "dtype": "bfloat16"}}) != key
    assert wheel_model.model_key({**cfg, "wheel": {**cfg["wheel"], "version": "0.1.1"}}) != key
    assert wheel_model.model_key({**cfg, "vllm": {"max_model_len": 1}}) == key  # serving settings are not the model


def test_key_follows_the_converting_packages(cfg, monkeypatch):
    """Another transformers (the vLLM extra pins 5.19) or gguf may dequantize differently: its own folder."""
    key = wheel_model.model_key(cfg)
    versions = wheel_model.converter_versions()
    assert set(versions) == {"transformers", "gguf"} and "absent" not in versions.values()
    monkeypatch.setattr(wheel_model, "converter_versions", lambda: {**versions, "transformers": "5.19.0-other"})
    assert wheel_model.model_key(cfg) != key


def test_model_path_wins_over_the_wheel(cfg, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert resolve_model_source({**cfg, "path": str(tmp_path)}, tmp_path / "cache") == tmp_path.resolve()
    assert not (tmp_path / "cache").exists()  # nothing fetched or converted
    with pytest.raises(ConfigError, match="model.wheel"):
        resolve_model_source(cfg, None)


def test_plan_shows_the_conversion(compose, tmp_path):
    from arm.core.specs import plain_config
    from arm.run.plan import job_plan

    plan = job_plan(plain_config(compose("model=smollm2-135m", "domain=code_synth", "merge=arm", f"paths.root={tmp_path}")))
    names = [s.name for s in plan.stages]
    assert names[:2] == ["model from its wheel", "data code_synth"]
    assert not plan.stages[0].cached and plan.stages[0].folder.endswith(wheel_model.model_key(
        plain_config(compose("model=smollm2-135m")).get("model")))
    assert "after the model's conversion" in plan.stages[1].where
    assert not (tmp_path / "cache").exists()  # a plan converts nothing
