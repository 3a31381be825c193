"""End to end on a small trajectory: SFT -> lm-eval (hf backend) -> results.json -> table -> W&B offline.

Real components throughout: the tiny Qwen3 is trained here for a few steps, lm-eval evaluates every
reference model, W&B writes its offline run into the run folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from arm.core.errors import ArmError, ConfigError, InputError
from evals.results import load_result
from tests.conftest import REPO
from tests.helpers import REFERENCES, SMALL, assert_git_revision, check_result_against_samples, evaluations


def run(compose, tmp_path: Path, *overrides: str, run_name: str = "run") -> dict:
    from arm.run.job import run_job

    cfg = compose(*SMALL, f"paths.root={tmp_path}", *overrides)
    return run_job(cfg, run_dir=tmp_path / "runs" / run_name)


def eval_folders(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "cache" / "evals").iterdir() if p.is_dir())


@pytest.mark.slow
def test_math_job_end_to_end_and_cache_reuse(compose, shared_root, small_math_job):
    out = small_math_job  # SMALL on math_synth with logger=wandb, run once per test run in shared_root
    run_dir = Path(out["run_dir"])
    tmp_path = shared_root

    # One results.json per reference model, schema-checked, with provenance.
    names = sorted(p.parent.name for p in (run_dir / "results").glob("*/results.json"))
    assert names == sorted(REFERENCES)
    for name in REFERENCES:
        result = load_result(run_dir / "results" / name / "results.json")
        assert result["domain"] == "math_synth" and result["model"] == "tiny" and result["split"] == "test"
        assert result["primary"]["math_synth"]["n"] == 24
        # The score recomputed from the written predictions with the scorer is the one reported.
        check_result_against_samples(run_dir / "results" / name, expected_n=24)
        assert result["config"]["domain"]["name"] == "math_synth"
        assert result["eval"]["gen_kwargs"]["math_synth"]["max_gen_toks"] == 40  # evals/tasks/math_synth.yaml
        assert result["wall_s"]["eval"] > 0
        assert result["eval"]["num_threads"] == 1  # eval.num_threads=auto: one torch thread for a tiny model on the CPU
        assert_git_revision(result)
        assert (run_dir / "results" / name / "samples.jsonl").is_file()
    assert load_result(run_dir / "results" / "sft@12" / "results.json")["step"] == 12
    assert load_result(run_dir / "results" / "sft_converged" / "results.json")["step"] == 24

    # The table of the job.
    table = (run_dir / "table.md").read_text()
    for row in REFERENCES:
        assert f"| {row} |" in table

    # The trajectory manifest.
    manifest = json.loads((Path(out["trajectory"]) / "manifest.json").read_text())
    assert manifest["early_steps"] == [6, 12] and manifest["converged_step"] == 24
    assert [c["step"] for c in manifest["checkpoints"]] == [6, 12, 18, 24]
    for checkpoint in manifest["checkpoints"]:
        assert (Path(out["trajectory"]) / checkpoint["path"] / "model.safetensors").is_file()
        assert checkpoint["val_loss"] > 0

    # W&B wrote an offline run inside the run folder, nowhere else.
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert (run_dir / "trajectory.png").stat().st_size > 1000

    # Second job, same config: nothing is trained or evaluated again (each reference is the cached
    # evaluation: the same key, created at the same time, the same scores). The shared cache's listing is
    # not compared: another worker may be adding entries of its own to it meanwhile.
    trajectory_mtime = (Path(out["trajectory"]) / "manifest.json").stat().st_mtime_ns
    first = evaluations(run_dir)
    assert sorted(first) == sorted(REFERENCES) and all(folder in eval_folders(tmp_path) for folder, _, _ in first.values())
    again = run(compose, tmp_path, "domain=math_synth", "logger=none", run_name="again")
    assert again["trajectory"] == out["trajectory"]
    assert (Path(again["trajectory"]) / "manifest.json").stat().st_mtime_ns == trajectory_mtime
    assert evaluations(Path(again["run_dir"])) == first

    # A different evaluation setting is a different key: evaluated anew, trajectory reused.
    limited = run(compose, tmp_path, "domain=math_synth", "logger=none", "eval.limit=8", run_name="limited")
    anew = evaluations(Path(limited["run_dir"]))
    assert sorted(anew) == sorted(REFERENCES) and {f for f, _, _ in anew.values()}.isdisjoint(f for f, _, _ in first.values())
    assert all(folder in eval_folders(tmp_path) for folder, _, _ in anew.values())
    for name in REFERENCES:
        check_result_against_samples(Path(limited["run_dir"]) / "results" / name, expected_n=8)
    assert (Path(out["trajectory"]) / "manifest.json").stat().st_mtime_ns == trajectory_mtime


@pytest.mark.slow
def test_code_job_end_to_end(compose, tmp_path, shared_root):
    # On the shared cache: the small code_synth trajectory and its references are also those of
    # tests/test_vllm.py's code_synth comparison (whichever runs first trains and evaluates).
    out = run(compose, tmp_path, "domain=code_synth", "logger=none", f"paths.cache={shared_root / 'cache'}")
    for name in REFERENCES:  # pass@1 recomputed from the written completions in the sandbox, as reported
        result = load_result(Path(out["run_dir"]) / "results" / name / "results.json")
        assert result["primary"]["code_synth"]["metric"] == "pass@1,none"
        assert result["eval"]["code_execution"] == "bwrap"
        assert_git_revision(result)
        check_result_against_samples(Path(out["run_dir"]) / "results" / name, expected_n=24)


def test_existing_trajectory_folder_is_read_as_is(compose, tmp_path):
    """A Trainer-style SFT output folder is used without training; bad ones fail naming the folder."""
    from arm.core.specs import TrajectorySpec
    from arm.trajectory.build import ensure_trajectory

    folder = tmp_path / "sft-run"
    for step in (10, 20, 30):
        (folder / f"checkpoint-{step}").mkdir(parents=True)
    (folder / "base").mkdir()
    cfg = compose(f"trajectory.path={folder}", "trajectory.early_steps=[10,20]")
    traj = ensure_trajectory(TrajectorySpec.from_config(cfg), None, tmp_path / "cache")
    assert [r.step for r in traj.early] == [10, 20] and traj.converged.step == 30
    assert traj.inputs == [folder / "checkpoint-10", folder / "checkpoint-20"]

    with pytest.raises(ConfigError, match="ordered by step"):
        ensure_trajectory(TrajectorySpec.from_config(compose(f"trajectory.path={folder}", "trajectory.early_steps=[20,10]")), None, tmp_path)
    with pytest.raises(ConfigError, match="empty"):
        ensure_trajectory(TrajectorySpec.from_config(compose(f"trajectory.path={folder}", "trajectory.early_steps=[]")), None, tmp_path)
    with pytest.raises(ConfigError, match="no checkpoint for step"):
        ensure_trajectory(TrajectorySpec.from_config(compose(f"trajectory.path={folder}", "trajectory.early_steps=[10,15]")), None, tmp_path)
    empty = tmp_path / "empty-run"
    empty.mkdir()
    with pytest.raises(InputError, match="no checkpoint-<step>/ folders"):
        ensure_trajectory(TrajectorySpec.from_config(compose(f"trajectory.path={empty}", "trajectory.early_steps=[1]")), None, tmp_path)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trajectory.path=/nonexistent/sft-run"], "/nonexistent/sft-run"),
        (["domain.tasks=[{name: no_such_task, metric: exact_match}]"], "no_such_task"),
        (["eval.split=train"], "eval.split"),
        (["model.sft.early_steps=[7]"], "early_steps"),
        (["merge=ties", "merge.density=1.5"], "density"),
    ],
)
def test_bad_input_fails_cleanly_before_work(compose, tmp_path, overrides, message):
    from arm.run.job import run_job

    cfg = compose(*SMALL, f"paths.root={tmp_path}", "logger=none", *overrides)
    with pytest.raises(ArmError, match=message.replace("[", r"\[")):
        run_job(cfg, run_dir=tmp_path / "runs" / "bad")
    for stage in ("trajectories", "evals"):
        assert not (tmp_path / "cache" / stage).exists() or not any((tmp_path / "cache" / stage).iterdir())


def test_real_domains_refuse_the_validation_split(compose, tmp_path):
    """Real domains' lm-eval tasks are the benchmarks' test sets: selecting on them is tuning on test."""
    from arm.run.job import run_job

    for domain in ("math", "code"):
        cfg = compose("model=qwen3-1.7b", f"domain={domain}", "trajectory.path=/nonexistent", "eval.split=validation",
                      f"paths.root={tmp_path}", "logger=none")
        with pytest.raises(ConfigError, match=f"domain '{domain}' has no validation split"):
            run_job(cfg, run_dir=tmp_path / "runs" / domain)
    assert not (tmp_path / "cache").exists()


def test_cli_reports_bad_path_with_exit_code(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "arm", f"paths.root={tmp_path}", "logger=none", "trajectory.path=/nonexistent/run",
         "trajectory.early_steps=[1]"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert proc.returncode == 2
    assert "/nonexistent/run" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_multirun_over_merge_methods_adds_their_rows(tmp_path, shared_root, small_math_job):
    """`arm -m merge=...` through the real CLI on the shared cache: the shared trajectory and its references
    are reused (nothing trained or evaluated again), one merge and one evaluation per method."""
    methods = ["linear", "task_arithmetic", "ties", "expo", "dare"]
    sweep = tmp_path / "sweep"
    cache = shared_root / "cache"
    shared = Path(small_math_job["trajectory"])
    trained = (shared / "manifest.json").stat().st_mtime_ns
    references = evaluations(Path(small_math_job["run_dir"]))
    proc = subprocess.run(
        [sys.executable, "-m", "arm", "-m", f"merge={','.join(methods)}", *SMALL, f"paths.root={tmp_path}",
         f"paths.cache={cache}", "logger=none", f"hydra.sweep.dir={sweep}"],
        capture_output=True, text=True, cwd=REPO, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (shared / "manifest.json").stat().st_mtime_ns == trained  # not trained again
    jobs = sorted(p for p in sweep.iterdir() if (p / "results").is_dir())
    assert len(jobs) == len(methods), jobs
    for job in jobs:  # each job: the shared trajectory's references, the cached evaluations, and its merge
        evaluated = evaluations(job)
        merged = [name for name in evaluated if name not in references]
        assert {name: evaluated[name] for name in references} == references, job  # not evaluated again
        assert len(merged) == 1 and merged[0] in methods, (job, merged)
        assert evaluated[merged[0]][0] in eval_folders(shared_root)  # its evaluation is kept in the shared cache
        for name in references:
            assert str(load_result(job / "results" / name / "results.json")["model_path"]).startswith(str(shared))

    from evals.results import load_results
    from evals.table import build_table

    results = load_results([sweep])
    merges = {r["name"]: r for r in results if r["role"] == "merge"}
    assert sorted(merges) == sorted(methods)
    assert all(r["wall_s"]["merge"] > 0 and r["params"] is not None for r in merges.values())
    for method in methods:
        job = next(p.parent.parent.parent for p in sweep.glob(f"*/results/{method}/results.json"))
        check_result_against_samples(job / "results" / method, expected_n=24)
        assert_git_revision(merges[method])
    table = build_table(results)
    assert table.rows == ["base", "sft@6", "sft@12", "sft_converged", *methods]

    # Each job timed its stages (stages.json): the shared data, trajectory and references found in the cache,
    # then its own merge and that merge's evaluation (built now, or by another test on the shared cache);
    # the sweep's breakdown sums them by row.
    from evals.stage_times import breakdown

    for job in jobs:
        stages = json.loads((job / "stages.json").read_text())
        assert stages["job"]["domain"] == "math_synth" and stages["job"]["merge"] in methods
        kinds = {(s["kind"], s["name"]): s for s in stages["stages"]}
        assert all(kinds[("eval", name)]["cached"] for name in references)
        assert ("merge", stages["job"]["merge"]) in kinds and ("eval", stages["job"]["merge"]) in kinds
        assert kinds[("sft", "math_synth")]["cached"] and kinds[("data", "math_synth")]["cached"]
        assert all(s["wall_s"] >= 0 for s in stages["stages"])
    report = breakdown(sweep)
    rows = {r["stage"]: r for r in report["rows"]}
    for method in methods:
        for kind in ("merge", "evaluation"):
            row = rows[f"math_synth · {kind} · {method}"]
            assert row["built"] + row["cached"] == 1 and row["wall_s"] >= 0
    assert rows["math_synth · evaluation · base"] == {**rows["math_synth · evaluation · base"], "built": 0, "cached": 5}
    assert report["jobs"] == len(methods) and report["total_s"] is None  # no make clock: stages only

    # The merged folders are plain Hugging Face model folders.
    from transformers import AutoModelForCausalLM

    merged = Path(merges["ties"]["model_path"])
    assert AutoModelForCausalLM.from_pretrained(merged).num_parameters() > 0
