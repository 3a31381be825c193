"""Our engine agrees with mergekit 0.1.5 (run from its own venv) on every tensor, in float32.

The venv is created when missing (benchmarks/.cache/mergekit-venv, a few minutes once), so this
test runs wherever ``make test`` does; it is never skipped.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from arm.merge.engine import merge_from_config
from benchmarks.mergekit_env import ensure_mergekit
from tests.helpers import load_tensors
from tests.merge_fixtures import Trajectory, make_trajectory

pytestmark = pytest.mark.slow  # mergekit runs in its own venv (built once, minutes): not part of `make test-fast`

WEIGHTS = [1.0, 0.5, 2.0]

CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # name: (our merge config, mergekit config: method, shared params, per-model params, base weight)
    "linear": (
        {"name": "linear", "weights": WEIGHTS},
        {"merge_method": "linear", "base": False, "per_model": {}},
    ),
    "linear_with_base": (
        {"name": "linear", "weights": WEIGHTS, "base_weight": 0.7},
        {"merge_method": "linear", "base": True, "base_weight": 0.7, "per_model": {}},
    ),
    "task_arithmetic": (
        {"name": "task_arithmetic", "weights": WEIGHTS, "lambda": 0.8, "normalize": True},
        {
            "merge_method": "task_arithmetic",
            "base": True,
            "per_model": {},
            "parameters": {"lambda": 0.8, "normalize": True},
        },
    ),
    "ties": (
        {"name": "ties", "weights": WEIGHTS, "density": 0.3, "lambda": 0.8},
        {"merge_method": "ties", "base": True, "per_model": {"density": 0.3}, "parameters": {"lambda": 0.8}},
    ),
    "ties_unnormalized": (
        {"name": "ties", "weights": [1.0, -0.5, 2.0], "density": 0.7, "normalize": False},
        {
            "merge_method": "ties",
            "base": True,
            "weights": [1.0, -0.5, 2.0],
            "per_model": {"density": 0.7},
            "parameters": {"normalize": False},
        },
    ),
}


def _mergekit_yaml(traj: Trajectory, spec: dict[str, Any]) -> str:
    import json

    weights = spec.get("weights", WEIGHTS)
    lines = [f"merge_method: {spec['merge_method']}", "dtype: float32", "out_dtype: float32"]
    if spec["base"]:
        lines.append(f"base_model: {traj.base}")
    lines.append("models:")
    for path, w in zip(traj.checkpoints, weights, strict=True):
        params = {"weight": w, **spec["per_model"]}
        lines += [f"  - model: {path}", f"    parameters: {json.dumps(params)}"]
    if "base_weight" in spec:
        lines += [f"  - model: {traj.base}", f"    parameters: {json.dumps({'weight': spec['base_weight']})}"]
    if spec.get("parameters"):
        lines.append(f"parameters: {json.dumps(spec['parameters'])}")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def mergekit_bin() -> Path:
    return ensure_mergekit()


@pytest.fixture(scope="module")
def untied_trajectory(tmp_path_factory: pytest.TempPathFactory) -> Trajectory:
    # untied, so lm_head is merged as a tensor of its own; 64-wide so the MLP weights have 12k entries
    return make_trajectory(tmp_path_factory.mktemp("mk"), hidden=64, tie=False, seed=3)


# mergekit-yaml's main (mergekit/scripts/run_yaml.py), once per config, in one interpreter of mergekit's
# venv: its import (torch, transformers) is paid once for every case, not once per case.
_RUN_YAML = """
import sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions

options = MergeOptions(copy_tokenizer=False, quiet=True, device="cpu")  # --no-copy-tokenizer --quiet --device cpu
options.apply_global_options()
for config_file, out_path in zip(sys.argv[1::2], sys.argv[2::2]):
    with open(config_file, encoding="utf-8") as file:
        source = file.read()
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(source)), out_path, options=options,
              config_source=source)
"""


@pytest.fixture(scope="module")
def mergekit_outputs(mergekit_bin: Path, untied_trajectory: Trajectory, tmp_path_factory) -> dict[str, Path]:
    """Every case merged by mergekit (one process of its venv), by case name."""
    root = tmp_path_factory.mktemp("mergekit")
    args, outs = [], {}
    for case in sorted(CASES):
        config = root / f"{case}.yml"
        config.write_text(_mergekit_yaml(untied_trajectory, CASES[case][1]))
        outs[case] = root / case
        args += [str(config), str(outs[case])]
    proc = subprocess.run([str(mergekit_bin.parent / "python"), "-c", _RUN_YAML, *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for case, out in outs.items():
        assert sorted(out.glob("*.safetensors")), f"mergekit wrote no tensors for {case}"
    return outs


@pytest.mark.parametrize("case", sorted(CASES))
def test_agrees_with_mergekit(
    case: str,
    mergekit_outputs: dict[str, Path],
    untied_trajectory: Trajectory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import baselines.ties

    # exercise the sampled-bracket threshold selection (used for big tensors) on these small ones
    monkeypatch.setattr(baselines.ties, "_EXACT_BELOW", 1000)
    monkeypatch.setattr(baselines.ties, "_SAMPLE", 512)
    if case == "ties":  # TIES' streaming path (used for tensors above _IN_MEMORY entries)
        monkeypatch.setattr(baselines.ties, "_IN_MEMORY", 1000)
    _compare(case, mergekit_outputs[case], untied_trajectory, tmp_path)


@pytest.mark.parametrize("case", ["ties", "ties_unnormalized"])
def test_agrees_with_mergekit_with_the_production_thresholds(
    case: str, mergekit_outputs: dict[str, Path], untied_trajectory: Trajectory, tmp_path: Path
) -> None:
    """TIES as shipped (_EXACT_BELOW, _SAMPLE, _IN_MEMORY untouched: exact selection, in memory here)."""
    import baselines.ties

    small = max(t.numel() for t in load_tensors(untied_trajectory.base).values())
    assert small < baselines.ties._EXACT_BELOW and small < baselines.ties._IN_MEMORY
    _compare(case, mergekit_outputs[case], untied_trajectory, tmp_path)


def _compare(case: str, mk_out: Path, traj: Trajectory, tmp_path: Path) -> None:
    import torch

    ours_cfg, _ = CASES[case]
    ours = tmp_path / "ours"
    merge_from_config(
        {**ours_cfg, "device": "cpu", "dtype": "float32"}, traj.base, traj.checkpoints, ours, progress=False
    )

    theirs, mine = load_tensors(mk_out), load_tensors(ours)
    assert sorted(mine) == sorted(theirs)
    for name, t in theirs.items():
        assert mine[name].dtype == torch.float32
        torch.testing.assert_close(mine[name], t, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
