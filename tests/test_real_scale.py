"""The real scale, checked without a GPU or a hub: Qwen3 configs, vLLM arguments, dataset formatting,
offline messages, and a small model in the real models' layout through Trainer SFT, a merge and an
hf evaluation.

The small model is a Qwen3 with the character tokenizer of arm/trajectory/tiny.py, saved like the hub's models
(bf16, sharded safetensors + index, tied or untied lm_head), and given to the real SFT stage as
`model.path`; its SFT data are the hand-written fixture rows in tests/fixtures/ (the hub datasets'
schema).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from arm.core.errors import ConfigError, InputError
from tests.conftest import REPO, group_options
from tests.helpers import check_evaluation_against_samples, load_tensors, read_jsonl

FIXTURES = Path(__file__).resolve().parent / "fixtures"
REAL_MODELS = ["qwen3-1.7b", "qwen3-4b", "qwen3-8b", "qwen3-14b"]
REAL_DOMAINS = ["math", "code"]

# The published config.json values of the Qwen3 base models (hidden, intermediate, layers, q/kv heads, tied).
PUBLISHED = {
    "qwen3-1.7b": ("Qwen/Qwen3-1.7B-Base", 2048, 6144, 28, 16, 8, True),
    "qwen3-4b": ("Qwen/Qwen3-4B-Base", 2560, 9728, 36, 32, 8, True),
    "qwen3-8b": ("Qwen/Qwen3-8B-Base", 4096, 12288, 36, 32, 8, False),
    "qwen3-14b": ("Qwen/Qwen3-14B-Base", 5120, 17408, 40, 40, 8, False),
}


# --------------------------------------------------------------------------- configs


def test_real_entries_exist():
    assert set(REAL_MODELS) <= set(group_options("model"))
    assert set(REAL_DOMAINS) <= set(group_options("domain"))
    assert "vllm" in group_options("eval")


@pytest.mark.parametrize("model", REAL_MODELS)
def test_model_configs_carry_the_published_shapes(compose, model):
    cfg = compose(f"model={model}").model
    hub, hidden, inter, layers, q, kv, tied = PUBLISHED[model]
    assert cfg.hub_id == hub and cfg.path is None and cfg.dtype == "bfloat16"
    assert "arch" not in cfg, "a real model is loaded, never built from an arch: block"
    s = cfg.shapes
    assert (s.hidden_size, s.intermediate_size, s.num_hidden_layers, s.num_attention_heads, s.num_key_value_heads,
            s.head_dim, s.vocab_size, s.tie_word_embeddings) == (hidden, inter, layers, q, kv, 128, 151936, tied)
    from arm.trajectory.trainer_sft import resolve_sft_config

    sft = resolve_sft_config(cfg.sft)  # every key known and valid
    assert sft["per_device_batch_size"] * sft["grad_accum"] * sft["num_gpus"] == 128
    assert set(cfg.vllm) >= {"tensor_parallel_size", "data_parallel_size", "max_model_len", "gpu_memory_utilization"}
    assert set(cfg.slurm.sft) >= {"gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min"}
    assert cfg.slurm.sft.gpus_per_node == cfg.sft.num_gpus


def test_every_real_model_and_domain_composes_and_validates(compose):
    """Every real model × domain (× merge none, arm, ties) passes the pipeline's checks (test_config.py composes
    every pair of options of all models, domains and merges)."""
    from arm.run.job import validate

    for model in REAL_MODELS:
        for domain in REAL_DOMAINS:
            for merge in ("none", "arm", "ties"):
                cfg = compose(f"model={model}", f"domain={domain}", f"merge={merge}", "eval=vllm", "logger=none")
                plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
                assert plain["model"]["name"] == model and plain["domain"]["name"] == domain
                validate(cfg)


def test_cfg_job_prints_a_complete_resolved_config():
    proc = subprocess.run([sys.executable, "-m", "arm", "model=qwen3-14b", "domain=code", "merge=arm", "--cfg", "job"],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "???" not in proc.stdout
    cfg = OmegaConf.create(proc.stdout)
    assert cfg.model.name == "qwen3-14b" and cfg.model.hub_id == "Qwen/Qwen3-14B-Base"
    assert cfg.domain.name == "code" and cfg.domain.unsafe_code is False  # scored in the project's sandbox
    assert [t.name for t in cfg.domain.tasks] == ["humaneval_sandboxed", "mbpp_sandboxed"]
    assert cfg.merge.name == "arm" and cfg.merge.rotation and cfg.merge.calibration.n_sequences
    assert cfg.eval.backend and cfg.logger.name and cfg.paths.cache and "trajectory" in cfg
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def test_real_domains_name_lm_eval_tasks_and_metrics(compose):
    from evals.runner import task_specs

    math = task_specs(compose("domain=math").domain)
    code_cfg = compose("domain=code").domain
    code = task_specs(code_cfg)
    assert [(s.name, s.key, s.num_fewshot) for s in math] == [
        ("gsm8k_cot_zeroshot", "exact_match,flexible-extract", 0), ("minerva_math500", "exact_match,none", 4)]
    assert [(s.name, s.key, s.num_fewshot) for s in code] == [("humaneval_sandboxed", "pass@1,none", 0),
                                                                ("mbpp_sandboxed", "pass_at_1,none", 3)]
    assert code_cfg.unsafe_code is False and not compose("domain=math").domain.get("unsafe_code", False)
    for domain in REAL_DOMAINS:
        gen = compose(f"domain={domain}").domain.generation
        assert gen.gen_kwargs.temperature == 0.0 and gen.gen_kwargs.max_gen_toks > 0 and gen.apply_chat_template is False


# --------------------------------------------------------------------------- vLLM arguments and generation settings


def test_vllm_model_args_from_config(compose):
    from evals.runner import effective_eval_cfg, model_args_for

    cfg = compose("model=qwen3-14b", "domain=math", "eval=vllm")
    args = model_args_for(cfg.eval.backend, Path("/m/merged"), effective_eval_cfg(cfg.eval, cfg.domain), cfg.model)
    assert args == {"pretrained": "/m/merged", "dtype": "auto", "tensor_parallel_size": 1, "data_parallel_size": 1,
                    "gpu_memory_utilization": 0.9, "max_model_len": 4096, "enforce_eager": False, "seed": 0}
    cfg = compose("model=qwen3-8b", "domain=code", "eval=vllm", "eval.vllm.gpu_memory_utilization=0.8",
                  "model.vllm.tensor_parallel_size=2", "model.vllm.data_parallel_size=4")
    args = model_args_for("vllm", Path("/m"), cfg.eval, cfg.model)
    assert (args["tensor_parallel_size"], args["data_parallel_size"], args["gpu_memory_utilization"]) == (2, 4, 0.8)
    # The CPU path stays the hf backend.
    cfg = compose("model=qwen3-1.7b", "domain=math", "eval=hf")
    assert model_args_for(cfg.eval.backend, Path("/m"), cfg.eval, cfg.model) == {"pretrained": "/m", "dtype": "auto"}
    assert "vllm" not in sys.modules, "building the arguments must not import vllm"


def test_generation_settings_are_explicit_and_per_task(compose):
    from evals.runner import effective_eval_cfg, task_requests, task_specs

    cfg = compose("model=qwen3-4b", "domain=math", "eval=vllm", "+eval.gen_kwargs.max_gen_toks=2048")
    eff = effective_eval_cfg(cfg.eval, cfg.domain)
    assert eff["gen_kwargs"] == {"do_sample": False, "temperature": 0.0, "max_gen_toks": 2048}  # eval.* wins
    assert eff["apply_chat_template"] is False
    requests, global_shots = task_requests(task_specs(cfg.domain), eff.get("num_fewshot"))
    assert requests == [{"task": "gsm8k_cot_zeroshot", "num_fewshot": 0}, {"task": "minerva_math500", "num_fewshot": 4}]
    assert global_shots is None  # lm-eval's global num_fewshot would override every task's
    # Synthetic domains: unchanged (no generation block, one global shot count).
    syn = compose("domain=math_synth")
    assert effective_eval_cfg(syn.eval, syn.domain) == OmegaConf.to_container(syn.eval)
    assert task_requests(task_specs(syn.domain), 0) == (["math_synth"], 0)


def test_results_record_generation_settings():
    from evals.results import build_result

    evaluation = {"metrics": {"t": {"exact_match,none": 0.5, "n": 2}}, "primary": {"t": {"metric": "exact_match,none", "value": 0.5, "n": 2}},
                  "backend": "vllm", "gen_kwargs": {"t": {"temperature": 0.0, "max_gen_toks": 1024}}, "num_fewshot": None,
                  "n_shot": {"t": 4}, "gen_kwargs_override": {"temperature": 0.0}, "apply_chat_template": False}
    result = build_result(name="base", role="reference", model="qwen3-1.7b", domain="math", split="test", model_path=Path("/m"),
                          evaluation=evaluation, config={}, cache_key="k")
    assert result["eval"]["n_shot"] == {"t": 4} and result["eval"]["apply_chat_template"] is False
    assert result["eval"]["gen_kwargs"]["t"]["max_gen_toks"] == 1024 and result["eval"]["gen_kwargs_override"] == {"temperature": 0.0}


# --------------------------------------------------------------------------- dataset formatting


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / f"{name}.jsonl").read_text().splitlines()]


def test_gsm8k_rows_format_exactly(compose):
    from arm.data.sft_data import format_rows

    domain = OmegaConf.to_container(compose("domain=math", "domain.sft_data.format=gsm8k").domain)
    records = format_rows(_rows("gsm8k"), domain)
    assert records[0] == {
        "prompt": "Q: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                  "How many clips did Natalia sell altogether in April and May?\nA: Let's think step by step.",
        "response": " Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May.\n"
                    "The answer is 72.",
    }
    assert records[1]["response"] == " Weng earns 12/60 = $0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $10.\nThe answer is 10."


def test_metamathqa_rows_format_exactly(compose):
    from arm.data.sft_data import format_rows

    records = format_rows(_rows("metamathqa"), OmegaConf.to_container(compose("domain=math").domain))
    assert records[1] == {
        "prompt": "Q: What is the value of $2^3 + 3^2$?\nA: Let's think step by step.",
        "response": " We have $2^3 = 8$ and $3^2 = 9$, so the sum is $8 + 9 = \\boxed{17}$.\nThe answer is: 17",
    }
    assert len(records) == 4


@pytest.mark.parametrize("fmt, question, solution", [
    ("magicoder_evol", "Reverse a string in Python.", "```python\ndef reverse(s):\n    return s[::-1]\n```"),
    ("magicoder_oss", "Implement `add(a, b)` that returns the sum of two integers.", "```python\ndef add(a, b):\n    return a + b\n```"),
    ("evol_instruct_code", "Create a function that returns the square of a number.", "def square(x):\n    return x * x"),
])
def test_code_rows_format_exactly(compose, fmt, question, solution):
    from arm.data.sft_data import format_rows

    domain = OmegaConf.to_container(compose("domain=code", f"domain.sft_data.format={fmt}").domain)
    # The instruction templates (the domain trains completion-style: tests/test_formats.py).
    domain = {**domain, "prompt_template": "### Instruction:\n{question}\n\n### Response:\n", "response_template": "{solution}"}
    records = format_rows(_rows(fmt), domain)
    assert records[-1] == {"prompt": f"### Instruction:\n{question}\n\n### Response:\n", "response": solution}


def test_local_copy_loads_through_datasets_and_a_wrong_schema_names_its_columns(compose):
    from arm.data.sft_data import format_rows, load_sft_records

    domain = OmegaConf.to_container(compose("domain=math", f"domain.sft_data.path={FIXTURES / 'metamathqa.jsonl'}").domain)
    records = load_sft_records(domain)
    assert records == format_rows(_rows("metamathqa"), domain)
    assert len(load_sft_records(domain, max_examples=2)) == 2
    with pytest.raises(InputError, match=r"'gsm8k' schema lacks column\(s\) \['question', 'answer'\]"):
        format_rows(_rows("metamathqa"), {**domain, "sft_data": {**domain["sft_data"], "format": "gsm8k"}})
    with pytest.raises(ConfigError, match="domain.sft_data.format"):
        format_rows(_rows("metamathqa"), {**domain, "sft_data": {**domain["sft_data"], "format": "nope"}})


def test_calibration_records_of_a_real_domain(compose, tmp_path):
    from arm.data.sft_data import ensure_calibration_data, format_rows

    domain = OmegaConf.to_container(compose("domain=math", f"domain.sft_data.path={FIXTURES / 'metamathqa.jsonl'}").domain)
    data = ensure_calibration_data(domain, tmp_path / "cache", 3, seed=0)
    records = data.split("train")  # what the merge stage hands to ARM
    assert len(records) == 3 and all(r["id"].startswith("math-calibration-") for r in records)
    formatted = format_rows(_rows("metamathqa"), domain)
    assert all({"prompt": r["prompt"], "response": r["response"]} in formatted for r in records)
    assert ensure_calibration_data(domain, tmp_path / "cache", 3, seed=0).key == data.key  # built once


# --------------------------------------------------------------------------- offline messages


def test_unreachable_model_says_how_to_point_at_a_local_copy(monkeypatch, tmp_path):
    from arm.trajectory.trainer_sft import resolve_model_source

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError) as err:
        resolve_model_source({"hub_id": "Qwen/Qwen3-14B-Base", "path": None})
    assert "cannot load Qwen/Qwen3-14B-Base offline: set model.path=/local/copy (or HF_HOME with the model cached)" in str(err.value)
    with pytest.raises(InputError, match="no config.json"):
        resolve_model_source({"hub_id": "Qwen/Qwen3-14B-Base", "path": str(tmp_path)})


def test_unreachable_dataset_says_how_to_point_at_a_local_copy(monkeypatch):
    from arm.data.sft_data import load_raw_rows

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match=r"cannot load dataset meta-math/MetaMathQA offline: set domain.sft_data.path=/local/copy"):
        load_raw_rows({"dataset": "meta-math/MetaMathQA", "split": "train"})


def test_pipeline_job_on_an_unreachable_model_fails_before_work(compose, tmp_path, monkeypatch):
    from arm.core.specs import TrajectorySpec
    from arm.trajectory.build import ensure_trajectory

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = compose("model=qwen3-14b", "domain=math", f"paths.root={tmp_path}", "model.sft.num_gpus=1")
    with pytest.raises(InputError, match="set model.path=/local/copy"):
        ensure_trajectory(TrajectorySpec.from_config(cfg), None, tmp_path / "cache")
    assert not (tmp_path / "cache" / "trajectories").exists() or not any((tmp_path / "cache" / "trajectories").iterdir())


@pytest.mark.parametrize("world", [None, "4"])
def test_sft_refuses_another_process_count_than_num_gpus(compose, tmp_path, monkeypatch, world):
    """An `arm` job (one process) must not start qwen3-14b's 8-GPU SFT; nor may a 4-process launch."""
    from arm.core.specs import TrajectorySpec
    from arm.trajectory.build import ensure_trajectory

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if world is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world)
    cfg = compose("model=qwen3-14b", "domain=math", f"paths.root={tmp_path}")
    with pytest.raises(ConfigError) as err:
        ensure_trajectory(TrajectorySpec.from_config(cfg), None, tmp_path / "cache")
    message = str(err.value)
    assert message.startswith("config key 'model.sft.num_gpus'")
    assert f"WORLD_SIZE={world or 1}" in message and "global batch 128" in message
    assert "sbatch slurm/sft.sbatch qwen3-14b math" in message and "--num_processes 8" in message
    assert not (tmp_path / "cache" / "trajectories").exists() or not any((tmp_path / "cache" / "trajectories").iterdir())


# --------------------------------------------------------------------------- memory estimate


def test_memory_estimate_arm_on_qwen3_14b_fits_80gb():
    from arm.method.memory import Shapes, load_models, table

    rows = {r["model"]: r for r in table(80.0)}
    assert list(rows) == ["smollm2-135m", *REAL_MODELS]  # every config with shapes, by size
    published = {"smollm2-135m": 0.1345, "qwen3-1.7b": 1.72, "qwen3-4b": 4.02, "qwen3-8b": 8.19, "qwen3-14b": 14.77}
    for name, cfg in load_models().items():
        assert Shapes.from_cfg(cfg["shapes"]).params / 1e9 == pytest.approx(published[name], abs=0.01)
    r14 = rows["qwen3-14b"]
    assert r14["arm_mode"] == "layerwise" and r14["arm_fits"] and r14["arm_gb"] < 80
    assert r14["stages"]["arm_in_memory"]["total"] > 80  # why the layer-by-layer mode is needed
    assert all(r["stages"]["sft"]["total"] < 80 and r["stages"]["eval_vllm"]["total"] < 80 for r in rows.values())
    proc = subprocess.run([sys.executable, "-m", "arm.method.memory"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0 and "| qwen3-14b |" in proc.stdout and "layerwise" in proc.stdout


# --------------------------------------------------------------------------- a small model in the real layout


def save_real_layout(folder: Path, *, tied: bool, seed: int = 0) -> Path:
    """A small Qwen3 saved as the hub's models are: bf16, sharded safetensors + index, tokenizer."""
    import torch

    from arm.trajectory.tiny import build_char_tokenizer, build_model

    tokenizer = build_char_tokenizer()
    arch = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 512, "tie_word_embeddings": tied}
    model = build_model(arch, tokenizer, seed).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="40KB")
    tokenizer.save_pretrained(folder)
    return folder


SFT_SMALL = ["model.sft.max_steps=4", "model.sft.per_device_batch_size=2", "model.sft.grad_accum=1", "model.sft.num_gpus=1",
             "model.sft.save_steps=[1,2,3]", "model.sft.early_steps=[1,2]", "model.sft.max_length=256", "model.sft.lr=1e-3",
             "model.sft.logging_steps=1", "model.sft.num_threads=1", "model.sft.warmup_ratio=0.0",
             "model.sft.shard_size=40KB"]


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_real_layout_model_through_trainer_sft_merge_and_hf_eval(compose, tmp_path, tied):
    import torch

    from arm.core.specs import TrajectorySpec
    from arm.merge.engine import merge_from_config
    from arm.trajectory.build import ensure_trajectory

    base = save_real_layout(tmp_path / "base", tied=tied)
    assert (base / "model.safetensors.index.json").is_file() and len(list(base.glob("*.safetensors"))) > 1
    assert ("lm_head.weight" in load_tensors(base)) is (not tied)

    cfg = compose("model=qwen3-1.7b", "domain=math", f"model.path={base}", f"domain.sft_data.path={FIXTURES / 'metamathqa.jsonl'}",
                  f"paths.root={tmp_path / 'out'}", *SFT_SMALL,
                  *([] if tied else ["model.sft.schedule=wsd", "model.sft.decay_fraction=0.5"]))
    cache = tmp_path / "out" / "cache"
    traj = ensure_trajectory(TrajectorySpec.from_config(cfg), None, cache)
    folder = traj.folder
    assert sorted(p.name for p in folder.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-4"]
    assert [r.step for r in traj.early] == [1, 2] and traj.converged.step == 4 and traj.base.path == base.resolve()
    for ckpt in folder.glob("checkpoint-*"):
        assert (ckpt / "trainer_state.json").is_file() and (ckpt / "optimizer.pt").is_file()
        assert (ckpt / "model.safetensors.index.json").is_file() and (ckpt / "tokenizer.json").is_file()
        weights = load_tensors(ckpt)
        assert all(t.dtype == torch.bfloat16 for t in weights.values())
        assert ("lm_head.weight" in weights) is (not tied)
        assert json.loads((ckpt / "config.json").read_text())["dtype"] == "bfloat16"
    assert not torch.equal(load_tensors(folder / "checkpoint-4")["model.norm.weight"], load_tensors(base)["model.norm.weight"]) or \
        not torch.equal(load_tensors(folder / "checkpoint-4")["model.layers.0.mlp.up_proj.weight"], load_tensors(base)["model.layers.0.mlp.up_proj.weight"])

    if not tied:  # warmup-stable-decay through Trainer, the rate each step used: 2 stable steps, then a linear decay
        # over 2 steps (transformers counts from 0: the decay's first step is at its start, 1e-3, the next at half)
        history = json.loads((folder / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
        assert [h["learning_rate"] for h in history if "learning_rate" in h] == pytest.approx([1e-3, 1e-3, 1e-3, 5e-4])

    # Resume: a run stopped after checkpoint-3 continues from it and ends at the same step.
    import shutil

    shutil.rmtree(folder / "checkpoint-4")
    (folder / "manifest.json").unlink()
    traj = ensure_trajectory(TrajectorySpec.from_config(cfg), None, cache)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["resumed_from"].endswith("checkpoint-3") and manifest["converged_step"] == 4
    assert (folder / "checkpoint-4").is_dir()

    # Merge the early checkpoints (the merge stage's engine), keeping the layout.
    merged = tmp_path / "merged"
    merge_from_config({"name": "ties", "density": 0.5, "lambda": 1.0, "weights": None, "normalize": True,
                       "device": "cpu", "dtype": None, "overwrite": False, "shard_size": "40KB"},
                      traj.base.path, traj.inputs, merged, progress=False)
    weights = load_tensors(merged)
    assert (merged / "model.safetensors.index.json").is_file() and all(t.dtype == torch.bfloat16 for t in weights.values())
    assert ("lm_head.weight" in weights) is (not tied)

    # ARM on the same layout, with calibration records of the real domain (the SFT data's format).
    from arm.data.sft_data import ensure_calibration_data
    from arm.merge.engine import MergeContext

    calib = ensure_calibration_data(OmegaConf.to_container(cfg.domain), cache, 4, seed=0).split("train")
    arm_cfg = OmegaConf.to_container(compose("merge=arm", "merge.iterations=2", "merge.rank=4", "merge.calibration.n_sequences=4",
                                             "merge.calibration.max_length=64", "merge.calibration.max_tokens=64",
                                             "merge.device=cpu", "merge.shard_size=40KB").merge)
    merge_from_config(arm_cfg, traj.base.path, traj.inputs, tmp_path / "arm", progress=False,
                      context=MergeContext(calibration=calib, converged=traj.converged.path))
    weights = load_tensors(tmp_path / "arm")
    assert (tmp_path / "arm" / "model.safetensors.index.json").is_file() and all(t.dtype == torch.bfloat16 for t in weights.values())
    assert ("lm_head.weight" in weights) is (not tied)

    if tied:
        return  # one hf evaluation is enough: the untied case runs it
    from arm.data.domains import generate_splits, write_splits
    from evals.runner import TaskSpec, evaluate, write_synthetic_tasks

    data = tmp_path / "data"
    write_splits(generate_splits("math_synth", {"n_train": 4, "n_validation": 4, "n_test": 4}, 0), data)
    specs = [TaskSpec("math_synth", "exact_match", "none")]
    include = write_synthetic_tasks(specs, data, "test", tmp_path / "tasks")
    out = tmp_path / "eval"
    out.mkdir()
    result = evaluate(merged, specs, {"backend": "hf", "device": "cpu", "batch_size": 4, "limit": 4, "num_fewshot": 0,
                                      "gen_kwargs": {"max_gen_toks": 8}},
                      out, include_path=include, model_cfg=cfg.model)
    # exact_match recomputed from the written predictions with math_synth's scorer, as reported.
    records = {r["id"]: r for r in read_jsonl(data / "test.jsonl")}
    check_evaluation_against_samples(result, out / "samples.jsonl", records, expected_n=4)
    assert result["model_args"] == {"pretrained": str(merged), "dtype": "auto"} and result["n_shot"] == {"math_synth": 0}
