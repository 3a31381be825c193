"""arm-tune: validation-split selection, ablations and the test-split table on a small trajectory."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from arm.run import tune
from evals.results import load_results
from tests.helpers import SMALL, check_result_against_samples

SPEC = """
domains: [math_synth]
seeds: [0, 1]
overrides: []
rows:
  linear: {merge: linear, grid: {}}
  expo:
    merge: expo
    grid: {alpha: [0.5, 2.0]}
  arm (rotation=procrustes):
    merge: arm
    fixed: {rotation: procrustes, calibration.n_sequences: 16, calibration.max_tokens: 256}
    grid: {lr: [0.5], iterations: [2], rank: [4, 8]}
ablations:
  base: arm (rotation=procrustes)
  variations:
    - {rotation: none}
    - {rank: 4}
"""


def write_spec(tmp_path: Path, text: str = SPEC) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


@pytest.mark.slow
def test_select_ablate_and_test(tmp_path, capsys, shared_root, small_math_job):
    # On the shared cache (tests.helpers.SMALL on math_synth, as `small_math_job`): the data splits, the base
    # and seed 0's trajectory are reused (seed 1 trains its own).
    cache = shared_root / "cache"
    shared = Path(small_math_job["trajectory"])
    trained = (shared / "manifest.json").stat().st_mtime_ns
    common = [*SMALL, f"paths.root={tmp_path}", f"paths.cache={cache}", "logger=none"]
    out = tmp_path / "headline"
    rc = tune.main(["--spec", str(write_spec(tmp_path)), "--out", str(out), *common])
    assert rc == 0
    assert (shared / "manifest.json").stat().st_mtime_ns == trained  # the shared trajectory is left as it was
    seed0 = [r for r in load_results([out / "test" / "seed-0"]) if r["role"] == "reference" and r["name"] != "base"]
    assert seed0 and all(Path(r["model_path"]).parent == shared for r in seed0)  # seed 0 is the shared trajectory

    # The choice is the argmax of the validation grid, first point on ties.
    rows = list(csv.DictReader((out / "validation.csv").open()))
    assert len(rows) == 1 + 2 + 2
    selected = json.loads((out / "selected.json").read_text())["math_synth"]
    for label in ("linear", "expo", "arm (rotation=procrustes)"):
        scores = [float(r["validation"]) for r in rows if r["row"] == label]
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        assert selected[label]["point"] == best
        assert selected[label]["validation"] == pytest.approx(scores[best], abs=1e-6)
    assert selected["arm (rotation=procrustes)"]["params"]["calibration.n_sequences"] == 16

    # Grid and ablation jobs read the validation split only; the test stage only the test split.
    for result in load_results([out / "select", out / "ablations"]):
        assert result["split"] == "validation"
    test_results = load_results([out / "test"])
    assert {r["split"] for r in test_results} == {"test"}
    labels = {r.get("label") for r in test_results if r["role"] == "merge"}
    assert labels == {"linear", "expo", "arm (rotation=procrustes)"}
    expo = next(r for r in test_results if r.get("label") == "expo")
    assert expo["params"]["alpha"] == selected["expo"]["params"]["alpha"]

    # Ablations: the chosen point plus each variation that differs from it.
    ablations = list(csv.DictReader((out / "ablations.csv").open()))
    assert [a["variation"] for a in ablations][:2] == ["(chosen)", "rotation=none"]
    assert "rotation=none" in (out / "ablations.md").read_text()

    # The table has the reference rows and one row per spec row, labelled by the spec.
    table = (out / "table" / "table.md").read_text()
    for row in ("base", "sft@6", "sft@12", "sft_converged", "| linear", "| expo", "| arm (rotation=procrustes)"):
        assert row in table
    assert (out / "table" / "table.csv").is_file() and (out / "table" / "table.tex").is_file()
    fidelity = json.loads((out / "fidelity.json").read_text())["math_synth"]
    history = fidelity["arm (rotation=procrustes)"]["history"]
    assert [h["iteration"] for h in history] == [0, 1, 2]  # c_m, then each ARM iteration
    assert all(-1.0 <= h["cos_to_converged"] <= 1.0 for h in history[1:])
    assert (out / "fidelity.png").stat().st_size > 0
    assert "| math_synth | arm (rotation=procrustes) |" in (out / "fidelity.md").read_text()
    assert "| expo | alpha=" in (out / "selected.md").read_text()
    assert "sft_converged" in capsys.readouterr().out

    # Every score, on either split, recomputed from the written predictions with the scorer, as reported.
    result_dirs = sorted(p.parent for p in out.glob("**/results/*/results.json"))
    stages = [d.relative_to(out).parts[0] for d in result_dirs]
    assert set(stages) == {"select", "ablations", "test"}, stages  # each job's own copy of its references too
    for result_dir, stage in zip(result_dirs, stages, strict=True):
        check_result_against_samples(result_dir, expected_n=24 if stage == "test" else 32)  # n_test, n_validation

    # The test stage ran every row once per SFT seed; spread.md/json summarise the per-seed values.
    assert {r["config"]["seed"] for r in test_results} == {0, 1}
    assert len([r for r in test_results if r["role"] == "merge"]) == 2 * 3
    spread = json.loads((out / "spread.json").read_text())
    assert spread["seeds"] == [0, 1]
    for r in test_results:
        label = r.get("label") or r["name"]
        cell = next(c for c in spread["cells"] if c["row"] == label)
        value = 100 * next(iter(r["primary"].values()))["value"]
        assert cell["by_seed"][str(r["config"]["seed"])] == pytest.approx(value, abs=1e-4)
        assert cell["min"] - 1e-4 <= value <= cell["max"] + 1e-4
    assert "over 2 SFT seed(s) [0, 1]" in (out / "spread.md").read_text()

    # A second run reuses every merge and evaluation (nothing is rebuilt): each row is the cached evaluation,
    # of the same key and created at the same time. (The shared cache's listing is not compared: another
    # worker may be adding entries of its own to it meanwhile.)
    def evaluated() -> dict:
        return {(r["config"]["seed"], r.get("label") or r["name"]): (r["cache_key"], r["created"])
                for r in load_results([out / "test"])}

    before = evaluated()
    assert len(before) == 2 * (4 + 3)  # per seed: the 4 references and the 3 rows
    assert tune.main(["--spec", str(write_spec(tmp_path)), "--out", str(out), "--stages", "test", *common]) == 0
    assert evaluated() == before


def test_bad_spec_fails_before_any_job(tmp_path, capsys):
    bad = SPEC.replace("grid: {alpha: [0.5, 2.0]}", "grid: {alpha: [0.5], beta: [1]}")
    assert tune.main(["--spec", str(write_spec(tmp_path, bad)), "--out", str(tmp_path / "o"), f"paths.root={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "rows.expo" in err and "beta" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "cache").exists()

    missing = SPEC.replace("base: arm (rotation=procrustes)", "base: nope")
    assert tune.main(["--spec", str(write_spec(tmp_path, missing)), "--out", str(tmp_path / "o")]) == 2
    assert "ablations.base" in capsys.readouterr().err

    assert tune.main(["--spec", str(tmp_path / "absent.yaml")]) == 2
    assert "absent.yaml: tuning spec not found" in capsys.readouterr().err

    assert tune.main(["--spec", str(write_spec(tmp_path)), "--stages", "select,bogus"]) == 2
    assert "bogus" in capsys.readouterr().err


def test_test_stage_needs_a_selection(tmp_path, capsys):
    assert tune.main(["--spec", str(write_spec(tmp_path)), "--out", str(tmp_path / "o"), "--stages", "test",
                      f"paths.root={tmp_path}"]) == 2
    assert "selected.json: not found" in capsys.readouterr().err


def test_grid_points_and_overrides():
    row = {"merge": "ties", "fixed": {"normalize": True}, "grid": {"density": [0.8, 0.2], "lambda": [1.0, 2.0]}}
    points = tune.grid_points(row)
    assert points[0] == {"normalize": True, "density": 0.8, "lambda": 1.0}
    assert [p["density"] for p in points] == [0.8, 0.8, 0.2, 0.2]
    assert tune.merge_overrides("ties", points[1]) == ["merge=ties", "merge.normalize=true", "merge.density=0.8",
                                                        "merge.lambda=2.0"]
