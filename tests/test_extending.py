"""The recipes of docs/extending.md, each done once: a per-tensor merge rule, a whole-model method, a
synthetic domain and an eval backend, written as a new user would (the files the recipe names, in a
temporary place) and run through the real registry, engine, job and lm-eval."""

from __future__ import annotations

import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import arm.data.domains
import evals.backends
import evals.runner
from arm.merge import registry
from arm.merge.engine import merge_from_config
from tests.conftest import REPO
from tests.helpers import SMALL, check_result_against_samples, load_tensors
from tests.merge_fixtures import make_trajectory

RULE = '''
"""Midpoint: theta = (theta0 + c_m) / 2, elementwise (docs/extending.md, recipe 1)."""
from arm.merge.contract import ElementwiseRule, MergeConfigError, check_number


class Midpoint(ElementwiseRule):
    name = "midpoint"
    uses_checkpoints = "last"

    def __init__(self, n_checkpoints, share=0.5):
        super().__init__(n_checkpoints)
        self.share = check_number(share, "share")
        if not 0.0 <= self.share <= 1.0:
            raise MergeConfigError(f"merge.share: must be in [0, 1], got {share}")

    def params(self):
        return {"share": self.share}

    def combine(self, base, checkpoints, out):
        out.copy_(base).mul_(1 - self.share).add_(checkpoints[-1], alpha=self.share)
        return out
'''

WHOLE = '''
"""Copy-last: the last checkpoint, written by the method itself (docs/extending.md, recipe 2)."""
from safetensors.torch import load_file

from arm.merge.contract import MergeConfigError, WholeModelMethod
from arm.merge.engine import write_state_dict


class CopyLast(WholeModelMethod):
    name = "copy_last"

    @classmethod
    def accepted_params(cls):
        return ["scale"]

    @classmethod
    def validate_params(cls, params):
        unknown = sorted(set(params) - {"scale"})
        if unknown:
            raise MergeConfigError(f"merge.{unknown[0]}: not a parameter of copy_last")
        return dict(params)

    @classmethod
    def merge_folder(cls, params, base, checkpoints, out_dir, settings, *, progress=True, context=None):
        scale = float(cls.validate_params(params).get("scale", 1.0))
        state = {}
        for file in sorted(checkpoints[-1].glob("*.safetensors")):
            state.update({name: t.float() * scale for name, t in load_file(file).items()})
        write_state_dict(state, base, checkpoints, out_dir, settings)
        return {"method": cls.name, "params": {"scale": scale}}
'''


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    folder = tmp_path / "plugins"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    for name in [m for m in sys.modules if m.startswith("toy_")]:
        del sys.modules[name]


def test_recipe_a_per_tensor_rule(plugin_dir, tmp_path, monkeypatch, compose):
    (plugin_dir / "toy_midpoint.py").write_text(textwrap.dedent(RULE))  # baselines/midpoint.py
    monkeypatch.setitem(registry.METHODS, "midpoint", "toy_midpoint:Midpoint")  # its registry line
    traj = make_trajectory(tmp_path / "traj", n_checkpoints=2)
    out = tmp_path / "merged"
    summary = merge_from_config({"name": "midpoint", "share": 0.25, "dtype": "float32"}, traj.base, traj.checkpoints, out,
                                progress=False)
    assert summary["params"] == {"share": 0.25}
    merged, base, last = load_tensors(out), load_tensors(traj.base), load_tensors(traj.checkpoints[-1])
    assert set(merged) == set(base)
    for name, value in merged.items():
        expected = 0.75 * base[name].float() + 0.25 * last[name].float()
        assert torch.allclose(value.float(), expected, atol=1e-6), name
    with pytest.raises(ValueError, match="merge.share"):
        merge_from_config({"name": "midpoint", "share": 2.0}, traj.base, traj.checkpoints, tmp_path / "bad", progress=False)
    assert {"toy_midpoint", "arm.merge.engine"} <= {m.__name__ for m in registry.get_method("midpoint").code_modules()}


def test_recipe_a_whole_model_method(plugin_dir, tmp_path, monkeypatch):
    (plugin_dir / "toy_copy_last.py").write_text(textwrap.dedent(WHOLE))
    monkeypatch.setitem(registry.METHODS, "copy_last", "toy_copy_last:CopyLast")
    traj = make_trajectory(tmp_path / "traj", n_checkpoints=2)
    out = tmp_path / "merged"
    summary = merge_from_config({"name": "copy_last", "scale": 2.0}, traj.base, traj.checkpoints, out, progress=False)
    assert summary["params"] == {"scale": 2.0}
    merged, last = load_tensors(out), load_tensors(traj.checkpoints[-1])
    assert set(merged) == set(last)
    for name, value in merged.items():
        assert torch.equal(value, last[name] * 2.0), name
    assert not registry.get_method("copy_last").uses_calibration({})


DOMAIN = '''
"""toy_parity: is a number even or odd? (docs/extending.md, recipe 3)."""
import random

DEFAULT_PARAMS = {"n_train": 192, "n_validation": 32, "n_test": 24}
METRIC = "exact_match"


def generate_splits(params, seed):
    p = {**DEFAULT_PARAMS, **(params or {})}
    rng = random.Random(seed)
    sizes = [("train", p["n_train"]), ("validation", p["n_validation"]), ("test", p["n_test"])]
    numbers = rng.sample(range(100, 1000), sum(n for _, n in sizes))
    out, start = {}, 0
    for split, n in sizes:
        out[split] = [{"id": f"toy_parity-{split}-{i}", "prompt": f"{x} is",
                       "response": " even" if x % 2 == 0 else " odd", "answer": "even" if x % 2 == 0 else "odd"}
                      for i, x in enumerate(numbers[start:start + n])]
        start += n
    return out


def score(prediction, record):
    return 1.0 if prediction.strip().startswith(record["answer"]) else 0.0
'''

TASK = """
task: toy_parity
dataset_path: json
dataset_kwargs:
  data_files:
    validation: __DATA_DIR__/validation.jsonl
    test: __DATA_DIR__/test.jsonl
test_split: __SPLIT__
output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
process_results: !function __HOOKS__.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

DOMAIN_YAML = """
name: toy_parity
synthetic: true
generator: toy_parity
tasks:
  - name: toy_parity
    metric: exact_match
data:
  seed: 7
  n_train: 192
  n_validation: 32
  n_test: 24
"""


@pytest.mark.slow
def test_recipe_a_synthetic_domain_end_to_end(tmp_path, monkeypatch, compose):
    """Its module (arm/data/domains/toy_parity.py), its YAML (conf/domain/), its task (evals/tasks/): then a job
    trains the tiny model on it, evaluates every reference and a merge with lm-eval, scored by its scorer."""
    from arm.run.job import run_job

    domains = tmp_path / "domains"
    domains.mkdir()
    (domains / "toy_parity.py").write_text(textwrap.dedent(DOMAIN))
    monkeypatch.setattr(arm.data.domains, "__path__", [*arm.data.domains.__path__, str(domains)])
    tasks = tmp_path / "tasks"
    shutil.copytree(REPO / "evals" / "tasks", tasks)
    (tasks / "toy_parity.yaml").write_text(TASK)
    monkeypatch.setattr(evals.runner, "TEMPLATE_DIR", tasks)

    cfg = compose("model=tiny_scratch", *SMALL, "merge=linear", "logger=none", f"paths.root={tmp_path}")
    cfg.domain = OmegaConf.create(DOMAIN_YAML)
    out = run_job(cfg, run_dir=tmp_path / "run")
    try:
        roles = {r["name"]: r for r in out["results"]}
        assert set(roles) == {"base", "sft@6", "sft@12", "sft_converged", "linear"}
        for name, result in roles.items():
            assert result["primary"]["toy_parity"]["n"] == 24
            # the score lm-eval reports is the domain scorer's, recomputed from the written predictions
            check_result_against_samples(Path(out["run_dir"]) / "results" / name, expected_n=24)
    finally:
        sys.modules.pop("arm.data.domains.toy_parity", None)
        arm.data.domains.DOMAINS.pop("toy_parity", None)


BACKEND = '''
"""hf_float32: the HF backend, always in float32 (docs/extending.md, recipe 4)."""
LM_EVAL_MODEL = "hf"
NEUTRAL_SETTINGS = ("device",)


def model_args(model_path, eval_cfg, model_cfg):
    return {"pretrained": str(model_path), "dtype": "float32"}
'''


def test_recipe_an_eval_backend(tmp_path, monkeypatch, compose):
    from arm.core.refs import ModelRef
    from arm.run.stages import eval_key
    from evals.runner import model_args_for

    backends = tmp_path / "backends"
    backends.mkdir()
    (backends / "hf_float32.py").write_text(textwrap.dedent(BACKEND))
    monkeypatch.setattr(evals.backends, "__path__", [*evals.backends.__path__, str(backends)])
    try:
        assert model_args_for("hf_float32", Path("/m"), {"dtype": "auto"}, None) == {"pretrained": "/m", "dtype": "float32"}
        cfg = compose("eval.backend=hf_float32")
        ref = ModelRef("base", Path("/m"), "k")
        assert eval_key(ref, cfg, None) != eval_key(ref, compose(), None)
        cfg.eval.device = "cpu"  # declared neutral by the backend
        assert eval_key(ref, cfg, None) == eval_key(ref, compose("eval.backend=hf_float32"), None)
    finally:
        sys.modules.pop("evals.backends.hf_float32", None)
    with pytest.raises(Exception, match="unknown backend 'nope'"):
        model_args_for("nope", Path("/m"), {}, None)
