"""`arm ... plan=true` (arm/run/plan.py) and the out-of-memory guard, without a GPU.

The plan's cache status is checked against a real job: before it every stage is to run, after it every
stage is cached and every folder the plan names is one the job wrote. The GPU figures are the ones of
arm/method/memory.py for the same config. The guard is driven with faked visible devices
(memory_guard.device_gb), and must stop a job before it loads anything.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from arm.core.errors import ArmError
from tests.conftest import REPO

# The tiny model trained from scratch (`tiny_scratch` once the pretrained tiny base is the default `tiny`):
# the smoke sweep's own data sizes are then allowed.
SCRATCH = "tiny_scratch" if (REPO / "conf" / "model" / "tiny_scratch.yaml").is_file() else "tiny"
SMOKE = ["experiment=smoke", f"model={SCRATCH}", "logger=none", "merge=ties"]


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`arm <args>` in a fresh interpreter that reports afterwards whether torch was imported."""
    code = ("import sys\nsys.argv = ['arm', *sys.argv[1:]]\nfrom arm.run.cli import main\ntry:\n    main()\nfinally:\n"
            "    print('TORCH_IMPORTED=' + str('torch' in sys.modules))\n")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def fake_trajectory(folder: Path, steps=(200, 400, 600)) -> Path:
    """An SFT output folder in the Trainer layout (checkpoint-<step>/ and base/), without weights."""
    for step in steps:
        (folder / f"checkpoint-{step}").mkdir(parents=True)
    (folder / "base").mkdir()
    return folder


# --------------------------------------------------------------------------- the plan of one job


@pytest.mark.slow
def test_plan_of_the_tiny_job_before_and_after_running_it(compose, tmp_path):
    from arm.run.job import run_job
    from arm.run.plan import job_plan

    cfg = compose(*SMOKE, f"paths.root={tmp_path}")
    before = job_plan(cfg)
    names = [s.name for s in before.stages]
    assert names == ["data math_synth", "sft (tiny, arm/trajectory/sft.py)", "eval base", "eval sft@6", "eval sft@12",
                     "eval sft_converged", "merge ties", "eval ties"]
    assert not any(s.cached for s in before.stages)
    assert all(s.device in ("cpu", "auto") and s.gpu_gb is None for s in before.stages)  # no shapes: not estimated
    assert not (tmp_path / "cache").exists(), "planning must not write the cache"

    run_job(cfg, run_dir=tmp_path / "run")
    after = job_plan(cfg)
    assert [s.name for s in after.stages] == names
    assert all(s.cached for s in after.stages), [(s.name, s.folder) for s in after.stages if not s.cached]
    written = {p for sub in ("data", "trajectories", "evals", "merged") for p in (tmp_path / "cache" / sub).iterdir() if p.is_dir()}
    named = {Path(s.folder) for s in after.stages}
    assert named == written, (named ^ written)
    # Another merge parameter: the trajectory and the references stay cached, the merge and its evaluation do not.
    other = job_plan(compose(*SMOKE, f"paths.root={tmp_path}", "merge.density=0.3"))
    assert [s.cached for s in other.stages] == [True] * 6 + [False, False]


def test_plan_prints_every_stage_without_importing_torch(tmp_path):
    proc = run_cli("model=qwen3-14b", "domain=math", "merge=arm", "eval=vllm", "plan=true", f"paths.root={tmp_path}",
                   "memory_guard.device_gb=[80]")
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TORCH_IMPORTED=False" in out
    lines = out.splitlines()
    assert "qwen3-14b / math / merge=arm" in lines
    for stage in ("sft (Trainer, arm/trajectory/trainer_sft.py)", "eval base", "eval sft@200", "eval sft@400", "eval sft_converged",
                  "calibration records", "merge arm (layerwise)", "eval arm"):
        assert any(line.strip().startswith(stage + " ") for line in lines), stage
    sft = next(line for line in lines if line.strip().startswith("sft (Trainer"))
    assert " no " in sft and " 8 " in sft and "39.9 GB" in sft
    assert "sbatch --gpus-per-node=8 --cpus-per-task=64 --mem=384GB --time=900 slurm/sft.sbatch qwen3-14b math" in sft
    merge = next(line for line in lines if line.strip().startswith("merge arm"))
    assert "34.0 GB (+95.8 GB host)" in merge
    assert "8 of 8 stages to run" in out and "visible devices: 80.0 GB (memory_guard.device_gb)" in out
    assert "DOES NOT FIT" not in out
    assert not (tmp_path / "cache").exists()


def test_plan_figures_are_those_of_arm_memory(compose, tmp_path):
    from arm.method.memory import table
    from arm.run.plan import job_plan

    rows = {r["model"]: r for r in table(80.0)}
    for model in ("qwen3-1.7b", "qwen3-4b", "qwen3-8b", "qwen3-14b"):
        plan = job_plan(compose(f"model={model}", "domain=code", "merge=arm", "eval=vllm", f"paths.root={tmp_path}",
                                "memory_guard.device_gb=[80]"))
        stages = {s.name.split(" (")[0]: s for s in plan.stages}
        st = rows[model]["stages"]
        assert stages["sft"].gpus == rows[model]["sft_gpus"] and stages["sft"].gpu_gb == pytest.approx(st["sft"]["total"])
        assert stages["eval base"].gpu_gb == pytest.approx(st["eval_vllm"]["total"]) and stages["eval base"].gpus == 1
        merge = next(s for s in plan.stages if s.name.startswith("merge arm"))
        mode = rows[model]["arm_mode"]
        assert merge.name == f"merge arm ({'model' if mode == 'in_memory' else 'layerwise'})"
        assert merge.gpu_gb == pytest.approx(rows[model]["arm_gb"])
        assert plan.problems == []


def test_plan_of_a_given_trajectory_names_its_folder(compose, tmp_path):
    from arm.run.plan import job_plan

    traj = fake_trajectory(tmp_path / "sft-run")
    plan = job_plan(compose("model=qwen3-8b", "domain=math", "merge=ties", f"trajectory.path={traj}", f"paths.root={tmp_path}"))
    assert plan.stages[0].name == "trajectory" and plan.stages[0].cached and plan.stages[0].folder == str(traj)
    assert [s.name for s in plan.stages[1:]] == ["eval base", "eval sft@200", "eval sft@400", "eval sft_converged",
                                                "merge ties", "eval ties"]
    merge = plan.stages[-2]
    assert not merge.cached and Path(merge.folder).parent == tmp_path / "cache" / "merged"


# --------------------------------------------------------------------------- the plan of a Slurm sweep


def test_slurm_plan_lists_one_job_array_per_size_and_submits_nothing(tmp_path):
    args = ["-m", "model=qwen3-1.7b,qwen3-14b", "domain=math", "merge=ties,arm", "eval=vllm", "hydra/launcher=slurm",
            "plan=true", f"paths.root={tmp_path}"]
    proc = run_cli(*args)
    out = proc.stdout
    assert proc.returncode == 0, (out + proc.stderr)[-3000:]
    assert "TORCH_IMPORTED=False" in out and "plan: 4 job(s)" in out
    assert [line for line in out.splitlines() if line.startswith("#")] == [
        "#0 qwen3-1.7b / math / merge=ties", "#1 qwen3-1.7b / math / merge=arm",
        "#2 qwen3-14b / math / merge=ties", "#3 qwen3-14b / math / merge=arm"]
    arrays = [line.strip() for line in out.splitlines() if line.strip().startswith("array ")]
    assert "slurm: 2 job array(s)" in out
    assert arrays == [
        "array 1: 2 job(s) [#0, #1] model qwen3-1.7b: sbatch --partition=gpu --gpus-per-node=1 --cpus-per-task=8 --mem=64GB --time=480 --array=0-1%16",
        "array 2: 2 job(s) [#2, #3] model qwen3-14b: sbatch --partition=gpu --gpus-per-node=1 --cpus-per-task=8 --mem=160GB --time=480 --array=0-1%16",
    ]
    # Stages shared by the jobs of one size (the trajectory, the references) are listed once with their jobs.
    assert "stages shared by several jobs" in out
    written = [p.name for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    assert written == ["multirun.yaml"], written  # Hydra's record of the sweep; no job folder, no .submitit
    assert not (tmp_path / "cache").exists()

    # A launcher key on the command line applies to every job, over the models' own values.
    proc = run_cli(*args, "hydra.launcher.mem_gb=96", "hydra.launcher.timeout_min=30")
    arrays = [line.strip() for line in proc.stdout.splitlines() if line.strip().startswith("array ")]
    assert len(arrays) == 1 and "--mem=96GB --time=30" in arrays[0] and "[#0, #1, #2, #3]" in arrays[0], proc.stdout[-2000:]


def test_job_resources_precedence(compose):
    from arm.core.errors import ConfigError
    from arm.run.slurm_launcher import explicit_launcher_keys, group_by_resources, job_resources

    preset = {"partition": "gpu", "gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 64, "timeout_min": 240, "nodes": 1}
    small, big = compose("model=qwen3-1.7b").model, compose("model=qwen3-14b").model
    res = [job_resources(preset, {"model": m}, set()) for m in (small, big, small)]
    assert [(r["mem_gb"], r["timeout_min"]) for r in res] == [(64, 480), (160, 480), (64, 480)]
    assert [members for _, members in group_by_resources(res)] == [[0, 2], [1]]
    explicit = explicit_launcher_keys(["hydra/launcher=slurm", "hydra.launcher.mem_gb=200", "+hydra.launcher.qos=high"])
    assert explicit == {"mem_gb", "qos"}
    assert job_resources(preset, {"model": big}, explicit)["mem_gb"] == 64  # the preset's (command-line) value wins
    assert job_resources(preset, {"model": compose("model=tiny").model}, set()) == preset  # no slurm block: the preset
    with pytest.raises(ConfigError, match=r"model.slurm.job.*\['mem'\]"):
        job_resources(preset, {"model": {"name": "x", "slurm": {"job": {"mem": 3}}}}, set())


# --------------------------------------------------------------------------- the guard


def test_guard_stops_an_sft_that_cannot_fit_before_loading(compose, tmp_path, monkeypatch):
    from arm.run.job import run_job

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # One process, one 24 GB GPU: qwen3-1.7b's SFT in this job (num_gpus=1) needs ~16 B/param on it.
    cfg = compose("model=qwen3-1.7b", "domain=math", "model.sft.num_gpus=1", "model.sft.grad_accum=16", "logger=none",
                  f"paths.root={tmp_path}", "memory_guard.device_gb=[24]", "model.path=/nonexistent/Qwen3-1.7B-Base")
    with pytest.raises(ArmError) as err:
        run_job(cfg, run_dir=tmp_path / "run")
    message = str(err.value)
    assert "does not fit the visible devices ([24.0] GB, from memory_guard.device_gb); stopped before loading" in message
    assert "sft (Trainer, arm/trajectory/trainer_sft.py) needs ~" in message and "ESTIMATE" in message
    assert "model.sft.per_device_batch_size=4 model.sft.grad_accum=32" in message and "sbatch slurm/sft.sbatch qwen3-1.7b math" in message
    assert "/nonexistent" not in message  # stopped before resolving (let alone loading) the model
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()
    # On an 80 GB device it fits: the job goes on, and stops where it first needs the (absent) model.
    with pytest.raises(ArmError, match="/nonexistent"):
        run_job(compose("model=qwen3-1.7b", "domain=math", "model.sft.num_gpus=1", "model.sft.grad_accum=16", "logger=none",
                        f"paths.root={tmp_path}", "memory_guard.device_gb=[80]", "model.path=/nonexistent/Qwen3-1.7B-Base"),
                run_dir=tmp_path / "run")


@pytest.mark.parametrize("overrides, expect", [
    (["model=qwen3-14b", "merge=arm"], ["merge arm (layerwise) needs ~34.0 GB", "merge.device=cpu", "'merge.statistics'"]),
    (["model=qwen3-1.7b", "merge=arm", "merge.statistics=model"], ["merge arm (model) needs ~40.2 GB", "merge.statistics=layerwise"]),
    (["model=qwen3-14b", "merge=none", "eval=vllm"], ["eval base needs ~30.2 GB", "gpu_memory_utilization 0.9",
                                                      "model.vllm.tensor_parallel_size=2"]),
    (["model=qwen3-8b", "merge=none", "eval=vllm", "model.vllm.tensor_parallel_size=2"], ["eval base needs 2 GPUs, 1 visible: give the job 2 GPUs (hydra.launcher.gpus_per_node=2)",
                                                                                 "or lower model.vllm.tensor_parallel_size"]),
])
def test_guard_names_the_estimate_and_the_fix(compose, tmp_path, overrides, expect):
    from arm.run.plan import check_devices

    traj = fake_trajectory(tmp_path / "sft-run")
    cfg = compose(*overrides, "domain=math", f"trajectory.path={traj}", f"paths.root={tmp_path}", "memory_guard.device_gb=[24]")
    with pytest.raises(ArmError) as err:
        check_devices(cfg)
    for text in expect:
        assert text in str(err.value), (text, str(err.value))
    check_devices(compose(*overrides, "domain=math", f"trajectory.path={traj}", f"paths.root={tmp_path}",
                          "memory_guard.device_gb=[80,80]"))  # fits two 80 GB GPUs
    check_devices(compose(*overrides, "domain=math", f"trajectory.path={traj}", f"paths.root={tmp_path}",
                          "memory_guard.device_gb=[24]", "memory_guard.enabled=false"))


def test_guard_leaves_cpu_stages_and_the_tiny_model_alone(compose, tmp_path):
    from arm.run.plan import check_devices, job_plan

    traj = fake_trajectory(tmp_path / "sft-run")
    check_devices(compose("model=qwen3-14b", "domain=math", "merge=ties", "merge.device=cpu", "eval.device=cpu",
                          f"trajectory.path={traj}", f"paths.root={tmp_path}", "memory_guard.device_gb=[8]"))
    check_devices(compose("model=tiny", f"paths.root={tmp_path}", "memory_guard.device_gb=[0.001]"))
    # No GPU visible: the auto stages run on CPU; nothing to check.
    plan = job_plan(compose("model=qwen3-14b", "domain=math", "merge=arm", f"trajectory.path={traj}", f"paths.root={tmp_path}",
                            "memory_guard.device_gb=[]"))
    assert plan.devices == [] and plan.problems == []
    json.dumps(plan.to_dict())  # the plan is plain data (the launcher returns it as the job's value)
    assert OmegaConf.create(plan.to_dict()).model == "qwen3-14b"
