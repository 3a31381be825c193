"""Helpers shared by the tests: a folder's tensors, scores recomputed from samples.jsonl, a model whose
answers are known, the git revision a result must carry.

Everything here drives the real components (safetensors files, the domains' scorers, transformers'
``save_pretrained``); nothing is mocked.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TINY_BASE = REPO / "arm" / "assets" / "tiny-base"


# A trajectory that trains in seconds: the tiny architecture, a few hundred examples, 24 steps.
SMALL = [
    "model.sft.epochs=2",  # 192 examples / batch 16 = 12 steps per epoch: 24 steps
    "model.sft.warmup_steps=2",
    "model.sft.eval_every=6",
    "model.sft.save_steps=[6,12,18]",
    "model.sft.early_steps=[6,12]",
    "model.sft.batch_size=16",
    "domain.data.n_train=192",
    "domain.data.n_validation=32",
    "domain.data.n_test=24",
    "eval.batch_size=24",
]
REFERENCES = ["base", "sft@6", "sft@12", "sft_converged"]

# The architecture of the unit tests' tiny model (a few thousand parameters; builds and trains in
# milliseconds): tests/test_tiny.py and tests/test_sft.py.
TEST_ARCH = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 128,
    "tie_word_embeddings": True,
}


# --------------------------------------------------------------------------- tensors of a folder
def load_tensors(folder: Path, dtype: Any = None) -> dict[str, Any]:
    """Every tensor of a model folder's ``*.safetensors`` files (all shards), by name; cast to ``dtype``
    when given."""
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    if not out:
        raise AssertionError(f"{folder}: no *.safetensors")
    return {k: v.to(dtype) for k, v in out.items()} if dtype is not None else out


# --------------------------------------------------------------------------- scores from samples.jsonl
def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def domain_records(result: Mapping[str, Any]) -> dict[Any, dict[str, Any]]:
    """The records a synthetic domain's result was scored on (its split in the data cache), by id."""
    from arm.core.specs import TrajectorySpec
    from arm.data.splits import data_ref
    from arm.trajectory.build import tokenizer_folder

    config = result["config"]
    cache = Path(config["paths"]["cache"])
    tokenizer_dir = tokenizer_folder(TrajectorySpec.from_config(config), cache)  # its chat template, where it has one
    data = data_ref(config["domain"], cache, config["model"].get("prompt_format") or "plain", tokenizer_dir)
    return {r["id"]: r for r in read_jsonl(data.folder / f"{result['split']}.jsonl")}


def recomputed_scores(samples: Iterable[Mapping[str, Any]], records: Mapping[Any, Mapping[str, Any]],
                      task: str) -> list[float]:
    """Each sample of ``task`` scored again from its written prediction with the domain's own scorer
    (arm.data.domains.<task>.score) against the record of the same id."""
    from arm.data.domains import get_generator

    scorer = get_generator(task).score
    return [float(scorer(s["prediction"], records[s["id"]])) for s in samples if s["task"] == task]


def check_result_against_samples(result_dir: Path, records: Mapping[Any, Mapping[str, Any]] | None = None,
                                 expected_n: int | None = None) -> dict[str, float]:
    """Recompute every task's headline metric of ``result_dir`` (results.json + samples.jsonl) from the
    written predictions with the scorer, and assert it equals what results.json reports: the mean, the
    number of documents, each sample's own score, and the metric under its key in ``metrics``. Returns
    {task: recomputed value}."""
    result = json.loads((Path(result_dir) / "results.json").read_text())
    records = records if records is not None else domain_records(result)
    return check_evaluation_against_samples(result, Path(result_dir) / "samples.jsonl", records, expected_n)


def check_evaluation_against_samples(evaluation: Mapping[str, Any], samples_path: Path,
                                     records: Mapping[Any, Mapping[str, Any]],
                                     expected_n: int | None = None) -> dict[str, float]:
    """The check of `check_result_against_samples` on what evals.runner.evaluate returned (its
    ``primary`` and ``metrics``) and the samples.jsonl it wrote; ``records`` by id."""
    samples = read_jsonl(samples_path)
    values = {}
    for task, primary in evaluation["primary"].items():
        scores = recomputed_scores(samples, records, task)
        written = [float(s["score"]) for s in samples if s["task"] == task]
        assert scores == written, f"{samples_path}: {task}: the per-sample scores differ from the scorer's"
        assert len(scores) == primary["n"] > 0, (samples_path, task, len(scores), primary["n"])
        if expected_n is not None:
            assert primary["n"] == expected_n, (samples_path, task, primary["n"])
        value = sum(scores) / len(scores)
        assert math.isclose(primary["value"], value, abs_tol=1e-9), (samples_path, task, primary["value"], value)
        assert math.isclose(evaluation["metrics"][task][primary["metric"]], value, abs_tol=1e-9), (samples_path, task)
        metric = get_metric_name(task)
        assert primary["metric"] == f"{metric},none", (task, primary["metric"])
        values[task] = value
    return values


def evaluations(run_dir: Path) -> dict[str, tuple[str, str, str]]:
    """{row: (its cached evaluation's folder name, created, primary scores as JSON)} of a job's results:
    which cached evaluation each row is. Two jobs with equal values reused the same evaluations."""
    out = {}
    for path in sorted((Path(run_dir) / "results").glob("*/results.json")):
        r = json.loads(path.read_text())
        out[r["name"]] = (f"{r['model']}-{r['domain']}-{r['name']}-{r['cache_key']}", r["created"],
                          json.dumps(r["primary"], sort_keys=True))
    return out


def get_metric_name(task: str) -> str:
    from arm.data.domains import get_generator

    return get_generator(task).METRIC


def assert_git_revision(result: Mapping[str, Any]) -> None:
    """In a git checkout a result must name the commit it ran from (40 hex digits), never None."""
    revision = (result.get("git") or {}).get("revision")
    if (REPO / ".git").exists():
        assert isinstance(revision, str) and re.fullmatch(r"[0-9a-f]{40}", revision), result.get("git")


# --------------------------------------------------------------------------- a model with known answers
def write_answering_model(folder: Path, answer: str, after: str = ":", stop: str = "\n") -> Path:
    """A Qwen3 model folder (the tiny base's tokenizer and shape) whose greedy continuation of any prompt
    ending in ``after`` is exactly ``answer`` followed by ``stop``.

    Built, not trained: the transformer blocks add nothing (zero output projections), so the hidden state
    at a position is the embedding of its token; the embedding puts each token of the chain in its own
    direction and the (untied) lm_head maps that direction to the next token of the chain. Tokens off the
    chain continue with ``stop``. ``answer=""`` gives a model that answers nothing. The characters of
    ``after + answer`` must be distinct (the next token is a function of the current one).
    """
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    chain = after + answer
    if len(set(chain)) != len(chain):
        raise ValueError(f"write_answering_model: repeated character in {chain!r}")
    tokenizer = AutoTokenizer.from_pretrained(TINY_BASE)
    ids = [tokenizer.convert_tokens_to_ids(c) for c in chain] + [tokenizer.convert_tokens_to_ids(stop)]
    if tokenizer.unk_token_id in ids:
        raise ValueError(f"write_answering_model: a character of {chain + stop!r} is not in the tokenizer")
    config = Qwen3Config.from_pretrained(TINY_BASE)
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).eval()
    hidden = config.hidden_size
    other = len(chain)  # the direction of every token off the chain
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed = torch.zeros(config.vocab_size, hidden)
        embed[:, other] = 1.0
        head = torch.zeros(config.vocab_size, hidden)
        for position, token in enumerate(ids[:-1]):
            embed[token] = 0.0
            embed[token, position] = 1.0
            head[ids[position + 1], position] = 10.0
        head[ids[-1], other] = 10.0
        model.model.embed_tokens.weight.copy_(embed)
        model.lm_head.weight.copy_(head)
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_BASE / name, folder / name)
    return folder


def diverging_checkpoints(checkpoints: list[Path], out: Path) -> list[Path]:
    """The same checkpoints with a copy of the last one whose first MLP weight holds 1e37 (finite in float32): an
    ARM step with lr 100 from it overflows to Inf on iteration 1 (merge.lr is bounded at 100)."""
    from safetensors.torch import load_file, save_file

    last = out / checkpoints[-1].name
    shutil.copytree(checkpoints[-1], last)
    weights = last / "model.safetensors"
    tensors = load_file(weights)
    name = sorted(n for n in tensors if "mlp" in n and n.endswith("weight"))[0]
    tensors[name] = tensors[name].clone().fill_(1e37)
    save_file(tensors, weights, metadata={"format": "pt"})
    return [*checkpoints[:-1], last]
