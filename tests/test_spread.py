"""evals.spread: cells over SFT seeds (mean, min, max), with Δ SFT paired within each seed."""

from __future__ import annotations

import json

import pytest

from evals import spread


def result(name, role, seed, value, step=None, method=None):
    from evals.results import SCHEMA_VERSION

    return {"schema_version": SCHEMA_VERSION, "name": name, "role": role, "model": "tiny", "domain": "math_synth",
            "split": "test", "step": step, "params": {"alpha": 0.5} if role == "merge" else None, "method": method,
            "metrics": {"math_synth": {"exact_match,none": value}}, "eval": {}, "wall_s": {}, "git": {"commit": "x"},
            "created": "2026-12-01T00:00:00Z",
            "primary": {"math_synth": {"metric": "exact_match,none", "value": value, "n": 400}},
            "config": {"seed": seed}}


RESULTS = [
    result("base", "reference", 0, 0.02), result("base", "reference", 1, 0.02), result("base", "reference", 2, 0.02),
    result("sft_converged", "reference", 0, 0.80, step=100), result("sft_converged", "reference", 1, 0.70, step=100),
    result("sft_converged", "reference", 2, 0.75, step=100),
    result("expo", "merge", 0, 0.82, method="expo"), result("expo", "merge", 1, 0.66, method="expo"),
    result("expo", "merge", 2, 0.78, method="expo"),
]


def test_cells_and_paired_deltas():
    s = spread.build_spread(RESULTS)
    assert s.seeds == [0, 1, 2] and s.rows == ["base", "sft_converged", "expo"]
    column = s.columns[0]
    cell = s.summary("expo", column)
    assert cell["mean"] == pytest.approx(75.3333, abs=1e-3) and cell["min"] == pytest.approx(66.0)
    assert cell["max"] == pytest.approx(82.0) and cell["n_seeds"] == 3
    delta = s.summary("expo", column, "deltas")  # +2, -4, +3 percentage points, seed by seed
    assert delta["mean"] == pytest.approx(1 / 3, abs=1e-6) and delta["min"] == pytest.approx(-4.0)
    assert delta["max"] == pytest.approx(3.0)
    text = spread.to_markdown(s)
    assert "| expo | **75.3 [66.0, 82.0]** | +0.3 [-4.0, +3.0] |" in text
    assert "over 3 SFT seed(s) [0, 1, 2]" in text


def test_missing_seed_is_shown_and_json_round_trips(tmp_path):
    s = spread.build_spread(RESULTS[:-1])
    assert "(2 seeds)" in spread.to_markdown(s)
    out = spread.to_json(s)
    expo = next(c for c in out["cells"] if c["row"] == "expo")
    assert expo["by_seed"] == {"0": 82.0, "1": 66.0} and expo["n_seeds"] == 2
    json.dumps(out)


def test_cli_reads_results_files(tmp_path, capsys):
    from evals.results import RESULTS_NAME

    for i, r in enumerate(RESULTS):
        folder = tmp_path / f"r{i}"
        folder.mkdir()
        (folder / RESULTS_NAME).write_text(json.dumps(r))
    rc = spread.main([str(tmp_path), "--out", str(tmp_path / "t.md"), "--json", str(tmp_path / "t.json")])
    assert rc == 0, capsys.readouterr().err
    assert "75.3 [66.0, 82.0]" in (tmp_path / "t.md").read_text()
