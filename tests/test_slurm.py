"""The smoke sweep on a real Slurm cluster with accounting, through hydra-submitit-launcher.

The session fixture installs slurm-wlm, munge, slurmdbd and MariaDB when missing, starts a
single-node cluster (slurm/local_cluster.sh) and stops its daemons by their PIDs afterwards. The
sweep has four jobs: references and TIES on a 24-step trajectory, each once with the session's shared
small trajectory (tests/conftest.py `small_math_job`: experiment=smoke is the same job, and the Slurm jobs
read and fill the shared cache folder from their own processes) and once with a planted bad checkpoint path. The bad jobs must surface as FAILED with
their error message, the launch must return (not hang), the good jobs' results.json and the sweep's
table must agree, and launching the same sweep again must reuse every finished stage and rerun (and
again report) the failed jobs.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evals.results import load_result
from tests import slurm_cluster
from tests.conftest import REPO, group_options
from tests.helpers import REFERENCES, check_result_against_samples, evaluations

BAD_PATH = "/nonexistent/sft-run"
LAUNCH_TIMEOUT = 420  # seconds for one launch of the sweep (it takes well under two minutes in CI)


@pytest.fixture(scope="session")
def cluster():
    reason = slurm_cluster.cannot_run_reason()
    if reason:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI must run the Slurm test: {reason}")
        pytest.skip(reason)
    slurm_cluster.install_if_missing()
    started = slurm_cluster.start()
    try:
        yield started
    finally:
        started.stop()
        shutil.rmtree(started.state, ignore_errors=True)


def launch(cluster, root: Path, cache: Path) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [sys.executable, "-m", "arm", "-m", "experiment=smoke", "hydra/launcher=slurm_local", f"paths.root={root}",
           f"paths.cache={cache}", "logger=wandb", f"trajectory.path=null,{BAD_PATH}"]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    return proc, time.monotonic() - start


def job_dirs(sweep: Path) -> dict[int, Path]:
    return {int(p.name.split("-")[0]): p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit()}


def overrides(job_dir: Path) -> list[str]:
    import yaml

    return yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text())


def array_tasks(cluster, sweep: Path) -> dict[int, tuple[str, str, str]]:
    """{job number: (slurm job id, state, exit code)} of the newest submission of the sweep."""
    submitted = sorted((p.name for p in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name)),
                       key=lambda n: int(n.split("_")[0]))
    newest = submitted[-1].split("_")[0]
    wanted = [n for n in submitted if n.split("_")[0] == newest]
    deadline = time.monotonic() + 60
    jobs = cluster.jobs()
    while any(n not in jobs for n in wanted) and time.monotonic() < deadline:  # slurmdbd records tasks late
        time.sleep(0.5)
        jobs = cluster.jobs()
    missing = [n for n in wanted if n not in jobs]
    assert not missing, f"accounting has no record of {missing} after 60 s: {sorted(jobs)}"
    return {int(n.split("_")[1]): (n, *jobs[n]) for n in wanted}


@pytest.mark.slow
def test_smoke_sweep_on_slurm_reports_failures_and_resumes(cluster, tmp_path, shared_root, small_math_job):
    root = tmp_path / "outputs"
    sweep = root / "runs" / "sweeps" / "smoke"
    cache = shared_root / "cache"  # experiment=smoke is tests.helpers.SMALL on math_synth: the shared trajectory
    shared = Path(small_math_job["trajectory"])
    trained = (shared / "manifest.json").stat().st_mtime_ns

    # 1. Launch: the launcher returns with an error naming the failed job and its message.
    proc, wall = launch(cluster, root, cache)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert BAD_PATH in output and "FAILED" in output, output[-3000:]
    print(f"\n--- the launch's report of the failed job (last lines) ---\n{output[-1500:]}")
    cluster.wait_until_drained(timeout=300)  # jobs after the failed one finish on their own

    dirs = job_dirs(sweep)
    assert len(dirs) == 4, sorted(dirs)
    tasks = array_tasks(cluster, sweep)
    assert sorted(tasks) == [0, 1, 2, 3]
    good = {n for n, d in dirs.items() if f"trajectory.path={BAD_PATH}" not in overrides(d)}
    assert len(good) == 2
    for n, (job_id, state, exit_code) in tasks.items():
        if n in good:
            assert state == "COMPLETED", (job_id, state)
        else:
            assert (state, exit_code) == ("FAILED", "2:0"), (job_id, state, exit_code)
            err = (sweep / ".submitit" / job_id / f"{job_id}_0_log.err").read_text()
            assert "arm: error: " in err and BAD_PATH in err and "Traceback" not in err, err[-2000:]
            assert not (dirs[n] / "results").exists()

    # 2. Every good job wrote a results.json per model it evaluated.
    methods = {}
    for n in good:
        method = "ties" if "merge=ties" in overrides(dirs[n]) else None
        names = sorted(p.parent.name for p in (dirs[n] / "results").glob("*/results.json"))
        assert names == sorted(REFERENCES + ([method] if method else [])), (dirs[n], names)
        for name in names:
            result = load_result(dirs[n] / "results" / name / "results.json")
            assert result["model"] == "tiny" and result["domain"] == "math_synth"
            check_result_against_samples(dirs[n] / "results" / name, expected_n=24)  # recomputed from samples.jsonl
            if result["role"] == "reference" and name != "base":
                assert str(result["model_path"]).startswith(str(shared)), result["model_path"]  # the shared trajectory
        methods[n] = method
        assert list((dirs[n] / "wandb").glob("offline-run-*"))  # the job's W&B run, offline
    assert sorted(methods.values(), key=str) == [None, "ties"]

    # 3. The table of the sweep folder matches the per-run results.
    from evals.report import main as table_main

    out_dir = tmp_path / "table"
    assert table_main([str(sweep), "--out-dir", str(out_dir)]) == 0
    for name in ("table.md", "table.csv", "table.tex", "scores.png"):
        assert (out_dir / name).stat().st_size > 0, name
    rows = {row["row"]: row for row in csv.DictReader((out_dir / "table.csv").open())}
    assert list(rows) == [*REFERENCES, "ties"]
    for n in good:
        for file in (dirs[n] / "results").glob("*/results.json"):
            result = load_result(file)
            assert float(rows[result["name"]]["value"]) == pytest.approx(100 * result["primary"]["math_synth"]["value"], abs=1e-3)
    converged = float(rows["sft_converged"]["value"])
    assert float(rows["ties"]["delta_vs_sft"]) == pytest.approx(float(rows["ties"]["value"]) - converged, abs=1e-3)

    # 4. Launch the same sweep again: finished stages come from the cache, failed jobs run again. What is
    # compared is the sweep's own entries of the shared cache (its listing may grow meanwhile: another
    # pytest-xdist worker's tests add theirs): the trajectory, the merge, and each evaluation's key and time.
    assert (shared / "manifest.json").stat().st_mtime_ns == trained  # nothing trained by the sweep
    evaluated = {n: evaluations(dirs[n]) for n in good}
    (ties,) = {Path(load_result(f)["model_path"]) for n in good for f in dirs[n].glob("results/ties/results.json")}
    merged = (ties / "merge_summary.json").stat().st_mtime_ns
    assert ties.parent == cache / "merged"

    proc2, wall2 = launch(cluster, root, cache)
    output2 = proc2.stdout + proc2.stderr
    assert proc2.returncode != 0 and BAD_PATH in output2 and "FAILED" in output2, output2[-3000:]
    cluster.wait_until_drained(timeout=300)
    tasks2 = array_tasks(cluster, sweep)
    assert {n: t[1] for n, t in tasks2.items()} == {n: "COMPLETED" if n in good else "FAILED" for n in range(4)}
    assert {t[0] for t in tasks2.values()}.isdisjoint(t[0] for t in tasks.values())  # new submissions
    assert (shared / "manifest.json").stat().st_mtime_ns == trained  # not trained again
    assert (ties / "merge_summary.json").stat().st_mtime_ns == merged  # not merged again
    assert {n: evaluations(dirs[n]) for n in good} == evaluated  # nor evaluated
    print(f"\nslurm smoke sweep: first launch {wall:.0f}s, relaunch {wall2:.0f}s")


# --- the presets compose (fast, no cluster) ---

@pytest.mark.parametrize("preset", ["slurm", "slurm_local", "local"])
def test_launcher_presets_compose(compose, preset):
    cfg = compose(f"hydra/launcher={preset}", return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher.submitit_folder.endswith("/.submitit/%j")
    if preset == "local":
        assert launcher._target_.endswith("LocalLauncher")
        return
    assert launcher._target_.endswith("SlurmLauncher")
    for key in ("partition", "gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min", "array_parallelism"):
        assert key in launcher, key
    assert launcher.additional_parameters.requeue is True
    if preset == "slurm":
        assert launcher.gpus_per_node == 1 and launcher.max_num_timeout > 0
    else:
        assert launcher.partition == "debug" and launcher.gpus_per_node is None


def test_slurm_preset_makes_an_sbatch_script(compose, tmp_path):
    """The keys reach sbatch as submitit writes it (no cluster needed to render the script)."""
    from omegaconf import OmegaConf
    from submitit.slurm.slurm import _make_sbatch_string

    launcher = OmegaConf.to_container(compose("hydra/launcher=slurm", return_hydra_config=True).hydra.launcher)
    params = {k: v for k, v in launcher.items()
              if k in ("partition", "gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min", "nodes", "tasks_per_node",
                       "signal_delay_s", "additional_parameters", "setup", "array_parallelism")}
    params["mem"] = f"{params.pop('mem_gb')}GB"
    params["time"] = params.pop("timeout_min")
    params["ntasks_per_node"] = params.pop("tasks_per_node")
    params["array_parallelism"] = params.pop("array_parallelism")
    script = _make_sbatch_string(command="python -u -m submitit.core._submit x", folder=tmp_path, map_count=40, **params)
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=64GB",
                 "#SBATCH --time=240", "#SBATCH --requeue", "#SBATCH --array=0-39%16", "#SBATCH --signal=USR2@120",
                 "export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK"):
        assert line in script, line


def sweep_params(compose, experiment: str) -> dict[str, str]:
    cfg = compose(f"experiment={experiment}", return_hydra_config=True)
    return dict(cfg.hydra.sweeper.params), cfg


def test_experiment_presets_compose(compose):
    presets = group_options("experiment")
    assert {"smoke", "paper_table", "ablation_rotation", "ablation_rank", "ablation_schedule"} <= set(presets)
    params, cfg = sweep_params(compose, "smoke")
    assert params == {"merge": "none,ties"}
    assert cfg.model.sft.save_steps == [6, 12, 18] and cfg.domain.data.n_train == 192
    assert cfg.hydra.sweep.dir.endswith("/runs/sweeps/smoke")
    params, cfg = sweep_params(compose, "paper_table")
    assert params["model"] == "tiny" and params["domain"] == "math_synth,code_synth"
    assert set(params["merge"].split(",")) - {"arm"} <= set(group_options("merge"))
    # Every swept entry of a config group exists (ARM's entry aside, until it lands).
    for group in ("model", "domain"):
        assert set(params[group].split(",")) <= set(group_options(group)), group


@pytest.mark.parametrize("experiment, key", [("ablation_rotation", "rotation"), ("ablation_rank", "rank"),
                                             ("ablation_schedule", "schedule")])
def test_arm_ablation_presets_compose(compose, experiment, key):
    params, cfg = sweep_params(compose, experiment)
    assert cfg.merge.name == "arm" and cfg.eval.split == "validation"
    assert f"merge.{key}" in params
    for key_path, values in params.items():
        if key_path.startswith("merge."):
            assert key_path.split(".", 1)[1] in cfg.merge, key_path
            for value in values.split(","):  # each point composes and passes the method's own checks
                point = compose(f"experiment={experiment}", f"{key_path}={value}")
                from arm.merge.engine import validate_merge_config

                validate_merge_config(point.merge)


def test_paper_table_composes_every_point(compose):
    params, _ = sweep_params(compose, "paper_table")
    assert "arm" in params["merge"].split(","), "the paper table compares ARM with the baselines"
    import itertools

    axes = [[f"{k}={v}" for v in vals.split(",")] for k, vals in params.items()]
    for point in itertools.product(*axes):
        cfg = compose("experiment=paper_table", *point)
        assert cfg.eval.split == "test" and cfg.logger.name == "wandb"


# --- per-size resources: one job array per model size, each with that size's model.slurm.job ---

# Two "sizes" of the tiny model with their own (small) resources: what conf/model/qwen3-*.yaml's
# slurm.job blocks are for the real sizes, scaled to this machine (2 CPUs).
# Time limits with a wide margin: on a loaded 2-core machine one 24-step job has taken 5.5 minutes.
SIZES = {"tiny_res_a": {"cpus_per_task": 1, "mem_gb": 1, "timeout_min": 25},
         "tiny_res_b": {"cpus_per_task": 2, "mem_gb": 2, "timeout_min": 30}}
SIZES_TIMEOUT = 1200  # seconds for the launch: the two arrays run one after the other (b needs both CPUs)


def write_size_configs(conf: Path) -> Path:
    """A config search path holding model/tiny_res_{a,b}.yaml: the tiny model plus a name and a slurm.job block."""
    import yaml

    (conf / "model").mkdir(parents=True)
    scratch = REPO / "conf" / "model" / "tiny_scratch.yaml"  # the from-scratch tiny model, where `tiny` is pretrained
    tiny = yaml.safe_load((scratch if scratch.is_file() else REPO / "conf" / "model" / "tiny.yaml").read_text())
    for name, job in SIZES.items():
        (conf / "model" / f"{name}.yaml").write_text(yaml.safe_dump({**tiny, "name": name.replace("_", "-"), "slurm": {"job": job}}))
    return conf


def sacct_rows(cluster, job_ids: list[str]) -> dict[str, dict[str, str]]:
    fields = ["JobID", "JobName", "AllocCPUS", "ReqMem", "Timelimit", "State", "ExitCode"]
    out = cluster.run("sacct", "-X", "-n", "-P", "-S", "2000-01-01", "-j", ",".join(job_ids), "-o", ",".join(fields))
    rows = {}
    for line in out.splitlines():
        row = dict(zip(fields, line.split("|"), strict=True))
        rows[row["JobID"]] = row
    return rows


@pytest.mark.slow
def test_a_sweep_over_sizes_submits_each_size_with_its_own_resources(cluster, tmp_path):
    # Its own cache, not the shared one: the two sizes are other models (their own names and slurm.job
    # blocks enter the trajectory key, from the from-scratch tiny base), so nothing of the shared
    # trajectory would be reused, and its cache would only grow by two trajectories no other test reads.
    conf = write_size_configs(tmp_path / "conf")
    root = tmp_path / "outputs"
    cmd = [sys.executable, "-m", "arm", "-m", "experiment=smoke", "hydra/launcher=slurm_local", "model=tiny_res_a,tiny_res_b",
           "merge=linear", "references.early=false", "references.converged=false", "eval.limit=8", "logger=none",
           f"paths.root={root}", f"hydra.searchpath=[file://{conf}]"]
    proc = subprocess.run(cmd, cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=SIZES_TIMEOUT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    cluster.wait_until_drained(timeout=120)

    sweep = root / "runs" / "sweeps" / "smoke"
    # one submission per size, one job each (an array of several tasks: the smoke sweep above); a
    # one-job submission's folder is named <id>, an array task's <id>_<task>
    submitted = sorted(p.name for p in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+(_\d+)?", p.name))
    arrays = sorted({n.split("_")[0] for n in submitted}, key=int)
    assert len(submitted) == 2 and len(arrays) == 2, submitted
    rows = sacct_rows(cluster, submitted)
    print("\nsacct -X -o JobID,JobName,AllocCPUS,ReqMem,Timelimit,State,ExitCode:")
    for row in rows.values():
        print("  " + "|".join(row.values()))
    assert sorted(rows) == submitted
    for name, job in SIZES.items():
        tasks = [row for row in rows.values() if row["JobName"] == f"arm-{name.replace('_', '-')}"]
        assert len(tasks) == 1, tasks
        for row in tasks:
            assert row["State"] == "COMPLETED" and row["ExitCode"] == "0:0", row
            assert int(row["AllocCPUS"]) == job["cpus_per_task"], row
            assert row["ReqMem"] in (f"{job['mem_gb']}G", f"{job['mem_gb'] * 1024}M"), row
            assert row["Timelimit"] == f"00:{job['timeout_min']:02d}:00", row
    # Each job ran its own size and wrote its results.
    for job_dir in (p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit()):
        result = load_result(job_dir / "results" / "base" / "results.json")
        assert (job_dir / "results" / "linear" / "results.json").is_file()
        for results in (job_dir / "results").glob("*/results.json"):
            check_result_against_samples(results.parent, expected_n=8)  # eval.limit=8, recomputed from samples
        assert result["model"] in {n.replace("_", "-") for n in SIZES} and job_dir.name.split("-", 1)[1].startswith(result["model"])


@pytest.mark.slow
def test_watch_sbatch_beside_an_sft_job(cluster, tmp_path):
    """slurm/watch.sbatch as a job beside an SFT job (the tiny loop, `python -m arm.run.sft`) on the same file system:
    the watcher follows the folder the other job writes, ends by itself when the run has finished, and its summary
    holds every checkpoint. (35 s here, with the cluster's start.)"""
    from tests.test_watch import SFT_SETS, STEPS

    outputs, sft_dir = tmp_path / "outputs", tmp_path / "sft"
    env = {**cluster.env, "ARM_OUTPUTS": str(outputs), "ARM_BIN": str(Path(sys.executable).parent),
           "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    sft_cmd = " ".join([sys.executable, "-m", "arm.run.sft", "--domain", "math_synth", "--out", str(sft_dir), "--threads",
                        "1", "--cache", str(tmp_path / "cache"), *[f"--set '{s}'" for s in SFT_SETS]])
    watch_dir = outputs / "runs" / "watch" / "test"
    watch = subprocess.run(["sbatch", "--parsable", f"--output={tmp_path}/watch-%j.out", "slurm/watch.sbatch", "tiny",
                            "math_synth", "merge=ema", f"trajectory.path={sft_dir}", f"watch.dir={watch_dir}", "watch.limit=20",
                            "watch.poll_s=0.5", "watch.settle_s=1", "watch.idle_timeout_s=600", "logger=none"],
                           cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout.strip()
    sft = subprocess.run(["sbatch", "--parsable", f"--output={tmp_path}/sft-%j.out", f"--chdir={tmp_path}",
                          f"--wrap={sft_cmd}"], cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout.strip()
    cluster.wait_until_drained(timeout=900)
    jobs = cluster.jobs()
    logs = "\n".join(p.read_text()[-2000:] for p in tmp_path.glob("*.out"))
    assert jobs[sft] == ("COMPLETED", "0:0") and jobs[watch] == ("COMPLETED", "0:0"), logs
    summary = json.loads((watch_dir / "summary.json").read_text())
    assert summary["finished"] and [r["step"] for r in summary["rows"]] == STEPS, logs
    assert (watch_dir / "results" / "sft_converged" / "results.json").is_file()
