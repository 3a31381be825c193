"""The merge engine end to end on small real Qwen3 folders: outputs, configs, bad input."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from arm.merge.engine import ENGINE_KEYS, MergeConfigError, MergeInputError, merge_from_config
from arm.merge.registry import get_method, method_names
from tests.helpers import load_tensors
from tests.merge_fixtures import Trajectory, make_trajectory

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


@pytest.fixture(scope="module")
def tiny_trajectory(tmp_path_factory: pytest.TempPathFactory) -> Trajectory:
    """float32, tied embeddings, 3 checkpoints; shared by the tests of this module: never modify it."""
    return make_trajectory(tmp_path_factory.mktemp("traj"))


def _copy(traj: Trajectory, root: Path) -> Trajectory:
    """A private copy of a trajectory, to damage."""
    base = Path(shutil.copytree(traj.base, root / "base"))
    cks = [Path(shutil.copytree(c, root / c.name)) for c in traj.checkpoints]
    return Trajectory(base, cks)


def _only_out(out: Path) -> list[str]:
    """Everything in out's parent that belongs to out (the folder, temp siblings)."""
    return sorted(p.name for p in out.parent.iterdir() if out.name in p.name)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "expo", "dare"])
def test_each_method_writes_a_loadable_model(
    method: str, tiny_trajectory: Trajectory, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    traj = tiny_trajectory
    out = tmp_path / method
    summary = merge_from_config({"name": method}, traj.base, traj.checkpoints, out, progress=False)
    assert summary["method"] == method and summary["n_tensors"] > 0 and summary["out_dir"] == str(out)
    assert set(summary) >= {"method", "params", "wall_s", "n_tensors", "device", "dtype", "out_dir"}
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.decode(tok("12 + 3")["input_ids"]) == "12 + 3"
    # the on-disk result equals the rule applied to the loaded tensors
    rule = get_method(method).from_params({}, len(traj.checkpoints))
    base, cks = load_tensors(traj.base), [load_tensors(c) for c in traj.checkpoints]
    merged = load_tensors(out)
    assert sorted(merged) == sorted(base)
    for name in merged:
        expected = rule.apply(name, base[name], [c[name] for c in cks])
        torch.testing.assert_close(merged[name], expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)  # tied, as the base


def test_sharded_bf16_output(tiny_trajectory: Trajectory, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "m"
    cfg = {"name": "linear", "dtype": "bfloat16", "shard_size": 20_000}
    merge_from_config(cfg, tiny_trajectory.base, tiny_trajectory.checkpoints, out, progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert all(t.dtype == torch.bfloat16 for t in load_tensors(out).values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert (out / "generation_config.json").is_file()
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


def test_bf16_inputs_keep_dtype_and_tokenizer_falls_back(tmp_path: Path) -> None:
    traj = make_trajectory(tmp_path / "in", n_checkpoints=2, dtype="bfloat16", tokenizer_in_base=False)
    out = tmp_path / "out"
    merge_from_config({"name": "ties", "density": 0.4}, traj.base, traj.checkpoints, out, progress=False)
    assert {t.dtype for t in load_tensors(out).values()} == {torch.bfloat16}
    assert (out / "tokenizer.json").read_bytes() == (traj.checkpoints[-1] / "tokenizer.json").read_bytes()


def test_existing_output_is_refused_unless_overwrite(tiny_trajectory: Trajectory, tmp_path: Path) -> None:
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="merge.overwrite"):
        merge_from_config(
            {"name": "expo"}, tiny_trajectory.base, tiny_trajectory.checkpoints, out, progress=False
        )
    assert (out / "keep.txt").exists()
    merge_from_config(
        {"name": "expo", "overwrite": True},
        tiny_trajectory.base,
        tiny_trajectory.checkpoints,
        out,
        progress=False,
    )
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert _only_out(out) == ["m"]


def test_leftovers_of_a_killed_run_are_redone(tiny_trajectory: Trajectory, tmp_path: Path) -> None:
    out = tmp_path / "m"
    stale = tmp_path / ".m.tmp-999999999-000000"  # what a killed merge leaves: never the final path
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"partial")
    merge_from_config(
        {"name": "linear"}, tiny_trajectory.base, tiny_trajectory.checkpoints, out, progress=False
    )
    assert _only_out(out) == ["m"]


def _rewrite(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("damage", "pattern"),
    [
        (
            "nan",
            r"checkpoint-20/model.safetensors: tensor 'model.layers.1.mlp.up_proj.weight' contains NaN or Inf",
        ),
        ("inf_base", r"base/model.safetensors: tensor 'model.norm.weight' contains NaN or Inf"),
        ("shape", r"checkpoint-20/model.safetensors: tensor 'model.norm.weight' has shape \[31\]"),
        ("missing", r"checkpoint-20: tensor 'model.norm.weight' of the base .* is missing"),
        ("extra", r"checkpoint-20/model.safetensors: tensor 'extra.weight' is not in the base"),
        ("truncated", r"checkpoint-20/model.safetensors: tensor .* truncated"),
        ("corrupt", r"checkpoint-20/model.safetensors: corrupt"),
        ("architecture", r"checkpoint-20/config.json: architectures"),
    ],
)
def test_bad_input_is_named_and_nothing_is_written(
    damage: str, pattern: str, tiny_trajectory: Trajectory, tmp_path: Path
) -> None:
    traj = _copy(tiny_trajectory, tmp_path / "in")
    ck = traj.checkpoints[1]
    if damage == "nan":
        _rewrite(ck, lambda t: t["model.layers.1.mlp.up_proj.weight"].view(-1).__setitem__(5, float("nan")))
    elif damage == "inf_base":
        _rewrite(traj.base, lambda t: t["model.norm.weight"].__setitem__(0, float("inf")))
    elif damage == "shape":
        _rewrite(ck, lambda t: t.__setitem__("model.norm.weight", t["model.norm.weight"][:31].clone()))
    elif damage == "missing":
        _rewrite(ck, lambda t: t.pop("model.norm.weight"))
    elif damage == "extra":
        _rewrite(ck, lambda t: t.__setitem__("extra.weight", torch.ones(2)))
    elif damage == "truncated":
        data = (ck / "model.safetensors").read_bytes()
        (ck / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "corrupt":
        (ck / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    elif damage == "architecture":
        cfg = json.loads((ck / "config.json").read_text())
        cfg["architectures"] = ["LlamaForCausalLM"]
        (ck / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    with pytest.raises(MergeInputError, match=pattern):
        merge_from_config({"name": "task_arithmetic"}, traj.base, traj.checkpoints, out, progress=False)
    assert _only_out(out) == []


@pytest.mark.parametrize(
    ("cfg", "pattern"),
    [
        ({"name": "ties", "density": 0.0}, r"merge\.density: must be in \(0, 1\]"),
        ({"name": "ties", "density": 1.01}, r"merge\.density"),
        ({"name": "nope"}, r"merge\.name: unknown merge method 'nope'"),
        ({"name": "none"}, r"merge\.name: 'none' means no merge"),
        ({"name": "linear", "dtype": "int8"}, r"merge\.dtype"),
        ({"name": "linear", "device": "tpu"}, r"merge\.device"),
        ({"name": "linear", "shard_size": "5 parsecs"}, r"merge\.shard_size"),
        ({"name": "linear", "overwrite": "yes"}, r"merge\.overwrite"),
        ({"name": "linear", "weights": [1, 2]}, r"merge\.weights: 2 weights given for 3 checkpoints"),
    ],
)
def test_bad_config_is_named_before_anything_is_written(
    cfg: dict, pattern: str, tiny_trajectory: Trajectory, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    with pytest.raises(MergeConfigError, match=pattern):
        merge_from_config(cfg, tiny_trajectory.base, tiny_trajectory.checkpoints, out, progress=False)
    assert _only_out(out) == []


def test_hydra_composes_every_method_one_to_one(tiny_trajectory: Trajectory, tmp_path: Path) -> None:
    """Each conf/merge/<name>.yaml is exactly its rule's parameters plus the engine settings."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    root = tmp_path / "conf"  # the real merge group under a minimal root config
    shutil.copytree(CONF / "merge", root / "merge")
    if not (root / "merge" / "none.yaml").exists():
        (root / "merge" / "none.yaml").write_text("name: none\n")
    (root / "config.yaml").write_text("defaults:\n  - merge: none\n  - _self_\n")
    with initialize_config_dir(config_dir=str(root), version_base="1.3"):
        assert compose("config").merge.name == "none"
        for method in method_names():
            merge = compose("config", overrides=[f"merge={method}"]).merge
            keys = set(OmegaConf.to_container(merge))
            assert keys == set(ENGINE_KEYS) | set(get_method(method).accepted_params()), method
            assert merge.shard_size == "5GB" and merge.dtype is None and merge.overwrite is False
        cfg = compose("config", overrides=["merge=ties", "merge.density=0.3", "merge.device=cpu"])
    assert cfg.merge.density == 0.3
    summary = merge_from_config(
        cfg.merge, tiny_trajectory.base, tiny_trajectory.checkpoints, tmp_path / "o", progress=False
    )
    assert summary["params"]["density"] == 0.3 and summary["device"] == "cpu"


def test_cli_is_light_and_works(tiny_trajectory: Trajectory, tmp_path: Path) -> None:
    code = (
        "import sys, arm.merge.cli, arm.merge.engine, baselines.ties, baselines.dare, baselines.linear;"
        "heavy = [m for m in ('transformers', 'hydra', 'omegaconf', 'numpy.distutils') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    out = tmp_path / "cli"
    cmd = [
        sys.executable, "-m", "arm.merge.cli", "--method", "ties", "--base", str(tiny_trajectory.base),
        "--checkpoints", *map(str, tiny_trajectory.checkpoints), "--out", str(out),
        "--set", "density=0.25", "--set", "weights=[1, 2, 3]", "--no-progress",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["params"]["weights"] == [1.0, 2.0, 3.0]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 1 and "merge.overwrite" in proc.stderr


def test_write_state_dict_round_trips(tiny_trajectory: Trajectory, tmp_path: Path) -> None:
    from arm.merge.engine import EngineSettings, write_state_dict

    state = {k: v * 2 for k, v in load_tensors(tiny_trajectory.checkpoints[-1]).items()}
    out = tmp_path / "w"
    settings = EngineSettings(dtype="bfloat16", shard_size=30_000)
    summary = write_state_dict(state, tiny_trajectory.base, tiny_trajectory.checkpoints, out, settings)
    assert summary["shards"] > 1
    written = load_tensors(out)
    assert sorted(written) == sorted(state)
    for k, v in state.items():
        assert torch.equal(written[k], v.to(torch.bfloat16))
    with pytest.raises(MergeInputError, match="missing"):
        write_state_dict({}, tiny_trajectory.base, tiny_trajectory.checkpoints, tmp_path / "x", settings)
    assert _only_out(tmp_path / "x") == []


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "expo", "dare"])
def test_chunking_and_threads_do_not_change_the_result(
    method: str, tiny_trajectory: Trajectory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import arm.merge.engine
    import baselines.ties

    traj = tiny_trajectory
    monkeypatch.setenv(arm.merge.engine.THREADS_ENV, "1")  # one tensor at a time, streamed to disk
    merge_from_config({"name": method}, traj.base, traj.checkpoints, tmp_path / "one", progress=False)
    monkeypatch.setenv(arm.merge.engine.THREADS_ENV, "3")  # three tensors at a time, in order on disk
    monkeypatch.setattr(arm.merge.engine, "CPU_CHUNK", 97)  # many chunks per tensor, a ragged last one (torch path)
    monkeypatch.setattr(arm.merge.engine, "NUMPY_CHUNK", 89)  # the same on the numpy path (linear, task arithmetic)
    monkeypatch.setattr(baselines.ties, "_EXACT_BELOW", 500)  # and the sampled threshold selection
    monkeypatch.setattr(baselines.ties, "_IN_MEMORY", 2000)  # and TIES' streaming path for big tensors
    merge_from_config({"name": method}, traj.base, traj.checkpoints, tmp_path / "many", progress=False)
    # the look-ahead budget: none (each finished tensor written before another starts) and ample
    monkeypatch.setenv(arm.merge.engine.HELD_ENV, "0")
    merge_from_config({"name": method}, traj.base, traj.checkpoints, tmp_path / "held0", progress=False)
    monkeypatch.setenv(arm.merge.engine.THREADS_ENV, "2")
    monkeypatch.setenv(arm.merge.engine.HELD_ENV, "4096")
    merge_from_config({"name": method}, traj.base, traj.checkpoints, tmp_path / "held", progress=False)
    one = load_tensors(tmp_path / "one")
    for other in ("many", "held0", "held"):
        merged = load_tensors(tmp_path / other)
        assert sorted(merged) == sorted(one), other
        for name, tensor in one.items():
            assert torch.equal(merged[name], tensor), (other, name)


@pytest.mark.parametrize("env, value", [("ARM_MERGE_HELD_MIB", "lots"), ("ARM_MERGE_HELD_MIB", "-1"),
                                        ("ARM_MERGE_THREADS", "two"), ("ARM_MERGE_THREADS", "1.5")])
def test_a_bad_engine_setting_in_the_environment_is_named_and_nothing_is_written(
    env: str, value: str, tiny_trajectory: Trajectory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(MergeConfigError, match=f"{env}='{re.escape(value)}'"):
        merge_from_config({"name": "ties"}, tiny_trajectory.base, tiny_trajectory.checkpoints, tmp_path / "out",
                          progress=False)
    assert _only_out(tmp_path / "out") == []


def test_validate_merge_config_and_identity() -> None:
    from arm.merge.engine import merge_identity, validate_merge_config

    validate_merge_config({"name": "ties", "density": 0.3, "weights": [1, 2]})
    for bad, key in [
        ({"name": "ties", "density": 0.0}, r"merge\.density"),
        ({"name": "ties", "density": [0.5, 0.5], "weights": [1, 2, 3]}, "different lengths"),
        ({"name": "linear", "shard_size": "big"}, r"merge\.shard_size"),
        ({"name": "nope"}, r"merge\.name"),
        ({"name": "linear", "wieghts": [1]}, r"merge\.wieghts"),
    ]:
        with pytest.raises(MergeConfigError, match=key):
            validate_merge_config(bad)
    a = merge_identity({"name": "ties", "density": 0.3, "device": "cpu", "shard_size": "5GB"})
    b = merge_identity(
        {"density": 0.3, "name": "ties", "device": "cuda", "shard_size": 10, "overwrite": True}
    )
    assert a == b and a["density"] == 0.3
    assert merge_identity({"name": "ties", "density": 0.4}) != a
    assert merge_identity({"name": "ties", "density": 0.3, "dtype": "bfloat16"}) != a


@pytest.mark.parametrize("how", ["hard link", "symlink", "copy"])
def test_a_checkpoint_with_the_base_weights_is_warned_about(tmp_path, caplog, how) -> None:
    """Its update is zero: the merge still runs, and a warning names both folders."""
    import logging
    import os

    traj = make_trajectory(tmp_path / "traj", n_checkpoints=2, hidden=16, layers=1)
    weights = traj.checkpoints[0] / "model.safetensors"
    weights.unlink()
    {"hard link": os.link, "symlink": os.symlink, "copy": shutil.copyfile}[how](traj.base / "model.safetensors", weights)
    with caplog.at_level(logging.WARNING, logger="arm.merge"):
        merge_from_config({"name": "linear"}, traj.base, traj.checkpoints, tmp_path / "out", progress=False)
    warned = [r.getMessage() for r in caplog.records if "holds the base's weights" in r.getMessage()]
    assert len(warned) == 1 and str(traj.checkpoints[0]) in warned[0] and str(traj.base) in warned[0]
    assert ("the same file" if how != "copy" else "the same bytes") in warned[0]


def test_ties_global_trim_is_the_papers_one_threshold_per_task_vector(tmp_path) -> None:
    """merge.trim=global: each task vector keeps its top `density` entries over ALL its parameters (the TIES
    paper's code), not per tensor (mergekit's); the result equals a hand computation over the whole model."""
    import numpy as np

    traj = make_trajectory(tmp_path / "traj", n_checkpoints=3, hidden=16, layers=2)
    summary = merge_from_config({"name": "ties", "density": 0.3, "trim": "global"}, traj.base, traj.checkpoints,
                                tmp_path / "global", progress=False)
    merge_from_config({"name": "ties", "density": 0.3}, traj.base, traj.checkpoints, tmp_path / "tensor", progress=False)
    base = load_tensors(traj.base)
    cks = [load_tensors(c) for c in traj.checkpoints]
    names = sorted(n for n in base if base[n].is_floating_point())
    deltas = [{n: (c[n].float() - base[n].float()) for n in names} for c in cks]
    thresholds = []
    for d in deltas:
        a = torch.cat([d[n].reshape(-1).abs() for n in names]).numpy()
        k = max(1, int(0.3 * a.size))
        thresholds.append(float(np.partition(a, a.size - k)[a.size - k]))
    assert summary["params"]["global_thresholds"] == pytest.approx(thresholds, rel=0, abs=0)
    merged = load_tensors(tmp_path / "global")
    per_tensor = load_tensors(tmp_path / "tensor")
    differs = False
    for n in names:
        trimmed = [torch.where(d[n].abs() >= t, d[n], torch.zeros_like(d[n])) for d, t in zip(deltas, thresholds, strict=True)]
        total = sum(trimmed)
        sign = torch.where(total >= 0, 1.0, -1.0)
        agree = [(x * sign > 0).float() for x in trimmed]
        num = sum(x * a for x, a in zip(trimmed, agree, strict=True))
        den = torch.clamp(sum(agree), min=1.0)
        want = base[n].float() + num / den
        torch.testing.assert_close(merged[n].float(), want, rtol=1e-6, atol=1e-6, msg=n)
        differs |= not torch.equal(merged[n], per_tensor[n])
    assert differs  # the two trims keep different entries


def test_ties_trim_must_be_tensor_or_global(tmp_path) -> None:
    with pytest.raises(MergeConfigError, match="merge.trim"):
        get_method("ties").from_params({"trim": "layer"}, 2)
