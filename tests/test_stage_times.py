"""The per-stage breakdown of a run (arm/core/timing.py writes it per job; evals/stage_times.py reads a run
folder), and the torch threads of an hf evaluation on the CPU (evals/runner.py cpu_threads)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from arm.core.errors import ConfigError
from arm.core.timing import StageClock, built_since
from evals.runner import SMALL_MODEL_PARAMS, cpu_threads
from evals.stage_times import breakdown, to_markdown
from tests.conftest import REPO


def job(run: Path, name: str, domain: str, merge: str, stages: list[tuple[str, str, float, float, bool]]) -> None:
    folder = run / name
    folder.mkdir(parents=True)
    records = [{"kind": k, "name": n, "start": s, "wall_s": w, "cached": c} for k, n, s, w, c in stages]
    (folder / "stages.json").write_text(json.dumps({"job": {"model": "tiny", "domain": domain, "merge": merge},
                                                    "stages": records}))


def planted_run(tmp_path: Path) -> Path:
    run = tmp_path / "make-run"
    job(run, "0-none", "math_synth", "none", [("data", "math_synth", 110.0, 1.0, False), ("sft", "math_synth", 111.0, 100.0, False),
                                              ("eval", "base", 211.0, 2.0, False), ("eval", "sft_converged", 213.0, 3.0, False)])
    job(run, "1-ties", "math_synth", "ties", [("data", "math_synth", 217.0, 0.5, True), ("sft", "math_synth", 217.5, 0.5, True),
                                              ("merge", "ties", 218.0, 4.0, False), ("eval", "base", 222.0, 0.0, True),
                                              ("eval", "sft_converged", 222.0, 0.0, True), ("eval", "ties", 222.0, 5.0, False)])
    job(run, "2-none", "code_synth", "none", [("data", "code_synth", 228.0, 1.0, False), ("sft", "code_synth", 229.0, 20.0, False),
                                              ("eval", "base", 249.0, 10.0, False)])
    (run / "clock.txt").write_text("start 40.0\narm 100.0\ntable 262.0\nend 264.0\n")
    return run


def test_the_breakdown_accounts_for_every_second_of_the_run(tmp_path: Path) -> None:
    report = breakdown(planted_run(tmp_path))
    rows = {r["stage"]: r for r in report["rows"]}
    assert rows["set-up (venv, install, sandbox check)"]["wall_s"] == 60.0
    assert rows["start-up (imports, config, until the first stage)"]["wall_s"] == 10.0
    assert rows["math_synth · SFT"] == {"stage": "math_synth · SFT", "wall_s": 100.5, "built": 1, "cached": 1}
    assert rows["math_synth · evaluation · base"] == {"stage": "math_synth · evaluation · base", "wall_s": 2.0, "built": 1, "cached": 1}
    assert rows["math_synth · merge · ties"]["built"] == 1 and rows["code_synth · evaluation · base"]["wall_s"] == 10.0
    assert rows["the table (arm-table)"]["wall_s"] == 2.0
    stages = 1 + 100 + 2 + 3 + 0.5 + 0.5 + 4 + 5 + 1 + 20 + 10
    assert rows["other (W&B, per-job tables and plots, job overhead)"]["wall_s"] == pytest.approx(262 - 110 - stages)
    assert report["total_s"] == 224.0
    assert sum(r["wall_s"] for r in report["rows"]) == pytest.approx(report["total_s"])  # nothing unaccounted
    assert report["by_kind_s"] == {"data": 2.5, "sft": 120.5, "eval": 20.0, "merge": 4.0}
    order = [r["stage"] for r in report["rows"]]
    assert order.index("math_synth · SFT") < order.index("math_synth · evaluation · base") < order.index("code_synth · data")
    text = to_markdown(report)
    assert "| **total** | **224.0** (3 min 44 s) | 100% | | |" in text and "| math_synth · SFT | 100.5 | 45% | 1 | 1 |" in text


def test_the_command_writes_timing_files_and_names_bad_input(tmp_path: Path) -> None:
    run = planted_run(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "evals.stage_times", str(run)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "| **total** |" in proc.stdout and (run / "timing.md").read_text() == proc.stdout
    assert json.loads((run / "timing.json").read_text())["total_s"] == 224.0
    (run / "clock.txt").write_text("start 40.0\narm\n")
    proc = subprocess.run([sys.executable, "-m", "evals.stage_times", str(run), "--no-write"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and f"{run / 'clock.txt'}:2" in proc.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([sys.executable, "-m", "evals.stage_times", str(empty)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "no stages.json" in proc.stderr


def test_a_stage_clock_records_built_and_cached_stages_even_when_one_fails(tmp_path: Path) -> None:
    clock = StageClock()
    with clock.stage("sft", "math_synth") as stage:
        (tmp_path / "manifest.json").write_text("{}")
        stage["cached"] = not built_since(tmp_path / "manifest.json", stage["start"])
    with pytest.raises(RuntimeError), clock.stage("eval", "base"):
        raise RuntimeError("lm-eval failed")
    with pytest.raises(ValueError, match="unknown stage kind"), clock.stage("train", "x"):
        pass
    assert [(r["kind"], r["name"], r["cached"]) for r in clock.records] == [("sft", "math_synth", False), ("eval", "base", False)]
    assert all(r["wall_s"] >= 0 for r in clock.records)
    assert not built_since(tmp_path / "missing", 0.0) and built_since(tmp_path / "manifest.json", 0.0)
    clock.write(tmp_path, domain="math_synth")
    assert json.loads((tmp_path / "stages.json").read_text())["job"] == {"domain": "math_synth"}


def safetensors_folder(folder: Path, params: int) -> Path:
    """A model folder whose one float32 tensor has ``params`` entries (a sparse file: no disk is used)."""
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    header = json.dumps({"w": {"dtype": "F32", "shape": [params], "data_offsets": [0, 4 * params]}}).encode()
    with open(folder / "model.safetensors", "wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header)
        fh.truncate(8 + len(header) + 4 * params)
    return folder


def test_evaluation_threads_one_for_a_small_model_torchs_default_for_a_larger_one(tmp_path: Path) -> None:
    small = safetensors_folder(tmp_path / "small", SMALL_MODEL_PARAMS - 1)
    large = safetensors_folder(tmp_path / "large", SMALL_MODEL_PARAMS)
    assert cpu_threads("auto", small) == 1 and cpu_threads(None, small) == 1
    assert cpu_threads("auto", large) is None
    assert cpu_threads(3, small) == 3
    for bad in (0, -1, "two", True, 1.5):
        with pytest.raises(ConfigError, match="eval.num_threads"):
            cpu_threads(bad, small)


@pytest.mark.parametrize("value", ["0", "two", "1.5"])
def test_a_bad_thread_count_is_refused_before_any_work(compose, value: str) -> None:
    from arm.run.checks import check_values

    with pytest.raises(ConfigError, match="eval.num_threads"):
        check_values(compose(f"eval.num_threads={value}"))
    check_values(compose("eval.num_threads=2"))
