"""Bad inputs of issue 14 item 4: each is a clear error naming the thing, a non-zero exit, and
nothing written (no output, no temporary folder, inputs unchanged)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from arm.merge import cli as merge_cli
from tests.helpers import diverging_checkpoints
from tests.merge_fixtures import make_trajectory

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def traj(tmp_path_factory):
    return make_trajectory(tmp_path_factory.mktemp("bad"), n_checkpoints=2, hidden=16, layers=1)


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _merge(traj, out: Path | str, *extra: str) -> int:
    args = ["--method", "linear", "--base", str(traj.base), "--checkpoints", *map(str, traj.checkpoints),
            "--out", str(out), "--device", "cpu", "--no-progress", *extra]
    return merge_cli.main(args)


def _debris(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


@pytest.mark.parametrize("where", ["base", "checkpoint", "inside", "containing"])
def test_merge_out_overlapping_an_input_is_refused_even_with_overwrite(traj, where, capsys) -> None:
    out = {"base": traj.base, "checkpoint": traj.checkpoints[0], "inside": traj.checkpoints[1] / "merged",
           "containing": traj.base.parent}[where]
    before = {str(p): _digest(p) for p in [traj.base, *traj.checkpoints]}
    assert _merge(traj, out, "--overwrite") == 1
    err = capsys.readouterr().err
    assert f"error: {out}: the output folder" in err and "refused even with overwrite" in err
    assert {str(p): _digest(p) for p in [traj.base, *traj.checkpoints]} == before
    assert not (traj.checkpoints[1] / "merged").exists() and _debris(traj.base.parent) == []


def test_disk_full_while_writing_is_a_clean_error_and_removes_the_temp(traj, tmp_path, monkeypatch, capsys) -> None:
    from arm.merge import tensor_io

    def full(self, chunk):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tensor_io.ShardedWriter, "write", full)
    out = tmp_path / "merged"
    assert _merge(traj, out) == 1
    err = capsys.readouterr().err
    assert f"error: {out}: cannot write the merged model (no space left on the device)" in err
    assert "temporary folder" in err and not out.exists() and _debris(tmp_path) == []


def test_disk_full_on_a_real_small_file_system(traj, tmp_path, capsys) -> None:
    """The same on an 8 KiB tmpfs (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        assert _merge(traj, mount / "merged") == 1
        assert "no space left on the device" in capsys.readouterr().err
        assert list(mount.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.parametrize("kind", ["file", "proc", "dot", "root"])
def test_output_paths_that_cannot_be_a_model_folder(traj, tmp_path, kind, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("keep me")
    out = {"file": "a_file", "proc": "/proc/self/merged", "dot": ".", "root": "/"}[kind]
    assert _merge(traj, out, "--overwrite") == 1
    err = capsys.readouterr().err
    assert f"error: {out}:" in err
    assert (tmp_path / "a_file").read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_shard_size_zero_is_refused_before_any_work(traj, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _merge(traj, tmp_path / "m", "--shard-size", "0")
    assert exit_info.value.code == 2 and "shard size must be positive" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_arm_diverging_is_a_clean_error(traj, tmp_path, capsys) -> None:
    out = tmp_path / "arm"
    checkpoints = diverging_checkpoints(traj.checkpoints, tmp_path / "inputs")
    args = ["--method", "arm", "--base", str(traj.base), "--checkpoints", *map(str, checkpoints), "--out", str(out),
            "--device", "cpu", "--no-progress", "--set", "rotation=none", "--set", "lr=100", "--set", "iterations=2"]
    assert merge_cli.main(args) == 1
    err = capsys.readouterr().err
    assert "error: merge 'arm' diverged: ARM iteration 1" in err and "lower merge.lr" in err
    assert [p.name for p in tmp_path.iterdir()] == ["inputs"]


def test_arm_folder_is_published_only_with_its_diagnostics(traj, tmp_path, monkeypatch) -> None:
    import arm.method.iteration
    from arm.merge.engine import merge_from_config
    from arm.method.iteration import ARM

    out = tmp_path / "arm"
    cfg = {"name": "arm", "device": "cpu", "rotation": "none", "lr": 0.5, "iterations": 1}
    merge_from_config(cfg, traj.base, traj.checkpoints, out, progress=False)
    assert (out / "diagnostics.json").is_file() and not (out / "diagnostics.png").exists()  # the plot is a report
    assert ARM.write_report(out) == [out / "diagnostics.png"] and (out / "diagnostics.png").stat().st_size > 0
    assert ARM.write_report(out) == []  # kept, not redrawn
    assert _debris(tmp_path) == []

    real = arm.method.iteration.write_state_dict

    def killed_in_publish(*args, before_publish, **kwargs):
        def hook(folder):
            before_publish(folder)
            assert (folder / "diagnostics.json").is_file() and folder.name != "arm2"  # in the temporary folder
            raise KeyboardInterrupt  # killed after the weights and the diagnostics, before the rename

        return real(*args, before_publish=hook, **kwargs)

    monkeypatch.setattr(arm.method.iteration, "write_state_dict", killed_in_publish)
    with pytest.raises(KeyboardInterrupt):
        merge_from_config(cfg, traj.base, traj.checkpoints, tmp_path / "arm2", progress=False)
    assert not (tmp_path / "arm2").exists() and _debris(tmp_path) == []


def test_corrupt_reference_checkpoint_is_named_before_evaluation(traj, tmp_path) -> None:
    import shutil

    from arm.core.errors import InputError
    from evals.runner import check_model_folder

    bad = tmp_path / "checkpoint-20"
    shutil.copytree(traj.checkpoints[0], bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(InputError, match=rf"{weights}: tensor .* truncated file"):
        check_model_folder(bad)
    check_model_folder(traj.checkpoints[0])


@pytest.mark.parametrize(("override", "key"), [
    ("eval.limit=abc", "eval.limit"), ("eval.limit=-3", "eval.limit"), ("eval.batch_size=0", "eval.batch_size"),
    ("eval.device=tpu", "eval.device"), ("seed=abc", "seed"), ("trajectory.early_steps=abc", "trajectory.early_steps"),
    ("eval.unsafe_code_without_sandbox=maybe", "eval.unsafe_code_without_sandbox"),
    # every row of arm/run/checks.py RANGES, past its bound (issue 27, item 7)
    ("seed=100000000000000000000", "seed"), ("seed=-1", "seed"),
    ("eval.limit=100000000000000000000", "eval.limit"), ("eval.batch_size=100000000", "eval.batch_size"),
    ("eval.num_fewshot=100000000000", "eval.num_fewshot"), ("trajectory.early_steps=[4000000000]", "trajectory.early_steps"),
    ("trajectory.converged_step=4000000000", "trajectory.converged_step"),
    # the tiny SFT's schedule is known before training: its last step (2656 on math_synth) and its saved steps
    ("trajectory.early_steps=[2000,2656]", "trajectory.early_steps"), ("trajectory.early_steps=[401]", "trajectory.early_steps"),
    ("model.sft.early_steps=[401]", "model.sft.early_steps"),
])
def test_config_values_are_checked_before_any_work(compose, override, key) -> None:
    from arm.core.errors import ConfigError
    from arm.run.job import validate

    extra = ["domain=code_synth"] if "sandbox" in override else []
    with pytest.raises(ConfigError, match=rf"config key '{key}'"):
        validate(compose(override, *extra))


def test_good_config_values_pass(compose) -> None:
    from arm.run.job import validate

    validate(compose("eval.limit=5", "eval.batch_size=auto", "eval.device=cuda:1", "seed=3", "trajectory.early_steps=[400,500]"))
    validate(compose("seed=4294967295", "eval.limit=1000000000", "trajectory.early_steps=[2576]"))


def test_a_bad_config_value_exits_non_zero_writing_no_cache(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "arm", "eval.limit=abc", "logger=none", f"paths.root={tmp_path}"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "config key 'eval.limit'" in proc.stderr
    assert not (tmp_path / "cache").exists()


def test_code_domain_without_a_sandbox_is_refused_before_any_work(compose, monkeypatch) -> None:
    from arm.core import sandbox
    from arm.run.job import validate

    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    with pytest.raises(sandbox.SandboxUnavailable, match="apt-get install bubblewrap"):
        validate(compose("domain=code_synth"))
    validate(compose("domain=math_synth"))  # no code runs there


# ---------------------------------------------------------------------------------------------
# arm-table


def _result(name: str, value: float, cache_key: str, role: str = "reference") -> dict:
    from evals.results import SCHEMA_VERSION

    return {"schema_version": SCHEMA_VERSION, "name": name, "role": role, "model": "tiny", "domain": "code_synth",
            "split": "test", "step": None, "metrics": {}, "eval": {}, "wall_s": {}, "git": {}, "created": "now",
            "config": {}, "cache_key": cache_key,
            "primary": {"code_synth": {"metric": "pass@1,none", "value": value, "n": 10}}}


def _table(*args: str) -> tuple[int, str]:
    from evals.report import main

    proc_err = []
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stderr(buffer):
        code = main(list(args))
    proc_err.append(buffer.getvalue())
    return code, proc_err[0]


def test_table_two_different_results_for_one_cell_name_both_files(tmp_path) -> None:
    one, two = tmp_path / "a" / "results.json", tmp_path / "b" / "results.json"
    for path, value, key in ((one, 0.665, "k1"), (two, 0.01, "k2")):
        path.parent.mkdir()
        path.write_text(json.dumps(_result("sft_converged", value, key)))
    code, err = _table(str(tmp_path), "--out", str(tmp_path / "table.md"))
    assert code == 2 and str(one) in err and str(two) in err and "two different results for the same cell" in err
    assert not (tmp_path / "table.md").exists()


def test_table_same_value_twice_is_fine(tmp_path) -> None:
    for sub, key in (("a", "k1"), ("b", "k2")):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "results.json").write_text(json.dumps(_result("sft_converged", 0.5, key)))
    assert _table(str(tmp_path), "--out", str(tmp_path / "t.md"))[0] == 0


def test_table_one_evaluation_copied_with_different_numbers_names_both(tmp_path) -> None:
    """The same cache key in two places (a run folder and its copy) but different scores: an error, not a pick."""
    one, two = tmp_path / "a" / "results.json", tmp_path / "b" / "results.json"
    for path, value in ((one, 0.5), (two, 0.6)):
        path.parent.mkdir()
        path.write_text(json.dumps(_result("sft_converged", value, "same-key")))
    code, err = _table(str(tmp_path), "--out", str(tmp_path / "t.md"))
    assert code == 2 and str(one) in err and str(two) in err and "two copies of one evaluation" in err, err
    assert not (tmp_path / "t.md").exists()


@pytest.mark.parametrize(("field", "value", "message"), [
    ("step", "four hundred", "key 'step' should be int or null"), ("step", -3, "key 'step' is -3"),
    ("label", 3, "key 'label' should be str"), ("params", [1], "key 'params' should be dict or null"),
    ("primary", {"code_synth": {"metric": "pass@1,none", "value": 0.5, "n": "ten"}}, "primary.code_synth.n"),
    ("step", True, "key 'step' should be int or null"),
])
def test_table_wrong_field_types_are_named(tmp_path, field, value, message) -> None:
    path = tmp_path / "run" / "results.json"
    path.parent.mkdir()
    path.write_text(json.dumps({**_result("sft_converged", 0.5, "k"), field: value}))
    code, err = _table(str(tmp_path), "--out", str(tmp_path / "t.md"))
    assert code == 2 and str(path) in err and message in err, err


@pytest.mark.parametrize("kind", ["nan", "utf8", "folder"])
def test_table_bad_files_are_named(tmp_path, kind) -> None:
    path = tmp_path / "run" / "results.json"
    path.parent.mkdir()
    if kind == "nan":
        path.write_text(json.dumps(_result("base", float("nan"), "k")))
    elif kind == "utf8":
        path.write_bytes(b'{"name": "\xff\xfe"}')
    else:
        path.mkdir()
    code, err = _table(str(tmp_path), "--out", str(tmp_path / "t.md"))
    expected = {"nan": "primary.code_synth.value' is nan", "utf8": "not UTF-8", "folder": "a folder named results.json"}
    assert code == 2 and str(path) in err and expected[kind] in err, err
    assert not (tmp_path / "t.md").exists()


def test_table_unwritable_out_is_named(tmp_path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text(json.dumps(_result("base", 0.5, "k")))
    out = tmp_path / "no" / "such" / "folder"
    out.parent.parent.write_text("a file where a folder should be")
    code, err = _table(str(tmp_path / "run"), "--out", str(out / "t.md"))
    assert code == 2 and f"{out / 't.md'}: cannot write" in err


def test_a_job_names_a_corrupt_reference_checkpoint_before_any_evaluation(compose, tmp_path) -> None:
    """A trajectory folder whose converged checkpoint is truncated: the job stops naming that file, with
    no merge and no evaluation started (no cache/evals, no cache/merged)."""
    import shutil

    from arm.core.errors import InputError
    from arm.run.job import run_job

    folder = tmp_path / "sft-run"
    made = make_trajectory(folder, n_checkpoints=3, hidden=16, layers=1)
    last = made.checkpoints[-1]
    weights = last / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    steps = sorted(int(p.name.split("-")[1]) for p in made.checkpoints)
    # its tokenizer has no chat template: the domain's plain prompts (else the job stops on that first, as it should)
    cfg = compose("domain=math_synth", "logger=none", "merge=linear", f"paths.root={tmp_path / 'out'}",
                  f"trajectory.path={folder}", f"trajectory.early_steps={steps[:2]}".replace(" ", ""),
                  "model.prompt_format=plain")
    with pytest.raises(InputError, match=rf"{weights}"):
        run_job(cfg, run_dir=tmp_path / "run")
    cache = tmp_path / "out" / "cache"
    assert not (cache / "evals").exists() and not (cache / "merged").exists()
    shutil.rmtree(folder)
