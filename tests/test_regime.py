"""arm-regime's spec, cell grids and summary (arm/run/regime.py); the sweep itself is a command (make regime)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from arm.core.errors import InputError
from arm.run.regime import (
    DEFAULT_SPEC,
    cell_points,
    filter_spec,
    load_regime_spec,
    plot,
    summarize,
    to_markdown,
)


def test_the_shipped_spec_loads_and_its_positions_are_saved_checkpoints() -> None:
    from arm.core.paths import CONF_DIR, read_config

    spec = load_regime_spec(DEFAULT_SPEC)
    assert spec["schedules"] == ["constant", "cosine", "wsd"] and spec["seeds"] == [0, 1, 2]
    saved = {"code_synth": read_config(CONF_DIR / "model" / "tiny.yaml")["sft"]["save_steps"],
             "math_synth": read_config(CONF_DIR / "model_domain" / "tiny_math_synth.yaml")["model"]["sft"]["save_steps"]}
    for domain, positions in spec["positions"].items():
        for name, steps in positions.items():
            assert set(steps) <= set(saved[domain]), (domain, name)
        assert max(positions["early"]) <= 0.2 * {"code_synth": 375, "math_synth": 2656}[domain]
        late = positions["late"]
        assert len(late) == 10 and len({b - a for a, b in zip(late, late[1:], strict=False)}) == 1  # evenly spaced


def test_window_points_that_do_not_fit_a_position_are_skipped() -> None:
    row = {"merge": "lawa", "fixed": {}, "grid": {"window": [2, 5, None]}}
    assert cell_points(row, 4) == [{"window": 2}, {"window": None}]
    assert cell_points(row, 10) == [{"window": 2}, {"window": 5}, {"window": None}]


@pytest.mark.parametrize(("edit", "key"), [
    (lambda s: s.update(schedules=["cosine", "exp"]), "schedules"),
    (lambda s: s["positions"]["code_synth"].update(late=[300, 200]), "positions.code_synth.late"),
    (lambda s: s["positions"]["code_synth"].pop("middle"), "positions.code_synth"),
])
def test_bad_specs_name_the_key(tmp_path, edit, key) -> None:
    import yaml

    spec = yaml.safe_load(DEFAULT_SPEC.read_text())
    edit(spec)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(InputError, match=key):
        load_regime_spec(path)


def test_filters_name_what_the_spec_lacks() -> None:
    spec = load_regime_spec(DEFAULT_SPEC)
    small = filter_spec(spec, schedules="constant", positions="late", rows="lawa,ema", domains=None)
    assert small["schedules"] == ["constant"] and list(small["rows"]) == ["lawa", "ema"]
    assert list(small["positions"]["math_synth"]) == ["late"]
    with pytest.raises(InputError, match="--rows"):
        filter_spec(spec, schedules=None, positions=None, rows="slerp", domains=None)


def test_summary_is_paired_per_seed(tmp_path) -> None:
    def cell(seed, score, last, conv):
        return {"seed": seed, "domain": "code_synth", "schedule": "constant", "position": "late", "row": "lawa",
                "steps": json.dumps([1, 2]), "params": json.dumps({"window": 2}), "score": score, "last": last,
                "converged": conv, "delta_last": score - last, "delta_converged": score - conv}

    cells = [cell(0, 0.75, 0.65, 0.76), cell(1, 0.72, 0.64, 0.77), cell(2, 0.70, 0.71, 0.75)]
    (entry,) = summarize(cells)
    assert entry["delta_last"]["mean"] == pytest.approx(100 * (0.10 + 0.08 - 0.01) / 3)
    assert entry["delta_last"]["min"] == pytest.approx(-1.0) and entry["delta_last"]["max"] == pytest.approx(10.0)
    assert entry["above_last"] == 2 and entry["above_converged"] == 0
    spec = filter_spec(load_regime_spec(DEFAULT_SPEC), schedules=None, positions=None, rows=None, domains="code_synth")
    text = to_markdown([entry], spec)
    assert "| constant | late (1–2, 2) | lawa | window=2 |" in text and "+5.7 [-1.0, +10.0] | 2 |" in text
    assert plot([entry], spec, tmp_path / "map.png") == tmp_path / "map.png" and (tmp_path / "map.png").stat().st_size > 0


def test_cli_help_and_a_bad_filter(capsys) -> None:
    from arm.run.regime import main

    assert main(["--rows", "nope"]) == 2
    assert "--rows: unknown rows ['nope']" in capsys.readouterr().err
    assert Path(DEFAULT_SPEC).is_file()


def test_rotation_effect_is_read_at_the_selected_iterate(tmp_path) -> None:
    from arm.run.regime import rotation_effect

    assert rotation_effect(tmp_path) is None  # a baseline's folder: no diagnostics
    (tmp_path / "diagnostics.json").write_text(json.dumps({"selected_iteration": 2, "history": [
        {"iteration": 1, "rotation_effect": 0.5}, {"iteration": 2, "rotation_effect": 0.25},
        {"iteration": 3, "rotation_effect": 0.75}]}))
    assert rotation_effect(tmp_path) == 0.25
