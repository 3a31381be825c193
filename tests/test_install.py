"""The package installs as a package: a non-editable `pip install .` (the wheel pip builds) carries its
configs (conf/ as arm/conf), task templates, the shipped base and TIES's compiled kernels, and `arm --help`, `arm --cfg job` and a
plan work from another directory, importing only the installed copy."""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    # --no-deps: the dependencies are this venv's; --no-build-isolation: setuptools from this venv (offline)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(target), str(REPO)], check=True, capture_output=True, text=True, timeout=600)
    return target


def _run(installed: Path, cwd: Path, *code_or_args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(installed), "ARM_OUTPUTS": str(cwd / "outputs")}
    return subprocess.run([sys.executable, *code_or_args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_wheel_carries_configs_tasks_and_the_base(installed):
    conf = installed / "arm" / "conf"
    assert (conf / "config.yaml").is_file() and not conf.is_symlink()
    for sub in ("model/tiny.yaml", "domain/math_synth.yaml", "merge/arm.yaml", "eval/vllm.yaml", "tuning/embedded.yaml",
                "hydra/launcher/slurm.yaml", "experiment/paper_table.yaml"):
        assert (conf / sub).is_file(), sub
    assert sorted(p.name for p in (installed / "evals" / "tasks").glob("*.yaml")) == ["code_synth.yaml", "math_synth.yaml"]
    assert (installed / "evals" / "tasks" / "code" / "humaneval_sandboxed.yaml").is_file()
    assert (installed / "arm" / "assets" / "tiny-base" / "manifest.json").is_file()
    assert list((installed / "arm" / "merge").glob("_kernels*.so")), "TIES's C kernels were not built (setup.py)"
    (dist,) = installed.glob("arm_harness*.dist-info") or installed.glob("*.dist-info")
    scripts = configparser.ConfigParser()
    scripts.read(dist / "entry_points.txt")
    assert dict(scripts["console_scripts"]) == {"arm": "arm.run.cli:main", "arm-table": "evals.report:main",
                                                "arm-tune": "arm.run.tune:main", "arm-regime": "arm.run.regime:main",
                                                "arm-watch": "arm.run.watch:main"}


def test_arm_runs_from_another_directory(installed, tmp_path):
    where = _run(installed, tmp_path, "-c", "import arm, arm.core.paths as p, evals, arm.merge._kernels as k; "
                                            "print(arm.__file__); print(p.CONF_DIR); print(evals.__file__); print(k.__file__)")
    assert where.returncode == 0, where.stderr
    assert all(line.startswith(str(installed)) for line in where.stdout.split()), where.stdout

    helped = _run(installed, tmp_path, "-m", "arm", "--help")
    assert helped.returncode == 0, helped.stderr
    assert "arm: reproduction harness for ARM" in helped.stdout and "model: qwen3-1.7b, qwen3-14b" in helped.stdout

    job = _run(installed, tmp_path, "-m", "arm", "--cfg", "job", "model=qwen3-8b", "domain=code", "merge=ties")
    assert job.returncode == 0, job.stderr
    assert "name: qwen3-8b" in job.stdout and "name: ties" in job.stdout

    plan = _run(installed, tmp_path, "-m", "arm", "domain=code_synth", "merge=arm", "plan=true", "logger=none")
    assert plan.returncode == 0, plan.stderr
    assert "sft" in plan.stdout and "merge" in plan.stdout
    assert not (tmp_path / "outputs" / "cache").exists() or not any((tmp_path / "outputs" / "cache").rglob("*.safetensors"))
