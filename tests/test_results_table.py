"""results.json schema and the comparison table built from result files."""

from __future__ import annotations

import json

import pytest

from arm.errors import InputError
from evals.results import build_result, load_result, load_results, write_result
from evals.table import CONVERGED, build_table, main, to_csv, to_markdown


def make_result(name, value, *, domain="math_synth", role="reference", step=None, params=None, key=None, n=300):
    task, metric = ("math_synth", "exact_match,none") if domain == "math_synth" else ("code_synth", "pass@1,none")
    evaluation = {
        "metrics": {task: {metric: value, "n": n}},
        "primary": {task: {"metric": metric, "value": value, "n": n}},
        "eval_wall_s": 1.5,
        "backend": "hf",
        "device": "cpu",
        "model_args": {"pretrained": "/x"},
        "gen_kwargs": {task: {"max_gen_toks": 8}},
    }
    return build_result(
        name=name, role=role, model="tiny", domain=domain, split="test", model_path="/x/" + name,
        evaluation=evaluation, config={"seed": 0}, cache_key=key or f"{domain}-{name}-{params}", step=step,
        method=name if role == "merge" else None, params=params,
    )


def reference_set(domain="math_synth", steps=(100, 200), values=(0.0, 0.2, 0.35, 0.7)):
    rows = [make_result("base", values[0], domain=domain)]
    rows += [make_result(f"sft@{s}", v, domain=domain, step=s) for s, v in zip(steps, values[1:3], strict=True)]
    rows.append(make_result(CONVERGED, values[3], domain=domain, step=1000))
    return rows


def test_schema_round_trip(tmp_path):
    result = make_result("sft@100", 0.25, step=100)
    path = tmp_path / "results.json"
    write_result(path, result)
    loaded = load_result(path)
    assert loaded["primary"]["math_synth"]["value"] == 0.25
    assert loaded["step"] == 100
    for key in ("git", "versions", "created", "config", "wall_s", "eval", "metrics"):
        assert key in loaded
    assert loaded["eval"]["gen_kwargs"]["math_synth"]["max_gen_toks"] == 8


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.pop("primary"), "missing key 'primary'"),
    (lambda r: r.update(role="other"), "key 'role'"),
    (lambda r: r["primary"]["math_synth"].update(value="high"), "primary.math_synth.value"),
    (lambda r: r.update(schema_version=99), "schema_version"),
])
def test_schema_errors_name_file_and_key(tmp_path, mutate, message):
    result = make_result("base", 0.0)
    mutate(result)
    path = tmp_path / "broken" / "results.json"
    path.parent.mkdir()
    path.write_text(json.dumps(result))
    with pytest.raises(InputError) as info:
        load_result(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_table_rows_order_deltas_and_best():
    results = reference_set() + [make_result("ties", 0.75, role="merge", params={"density": 0.5})]
    table = build_table(results)
    assert table.rows == ["base", "sft@100", "sft@200", CONVERGED, "ties"]
    column = table.columns[0]
    assert table.value("sft@100", column) == pytest.approx(20.0)
    assert table.delta("sft@100", column) == pytest.approx(-50.0)
    assert table.delta("ties", column) == pytest.approx(5.0)
    assert table.delta(CONVERGED, column) is None
    text = to_markdown(table)
    assert "**75.0**" in text and "+5.0" in text and "-50.0" in text


def test_table_two_domains_with_different_early_steps_uses_ranks():
    results = reference_set("math_synth", steps=(100, 200)) + reference_set("code_synth", steps=(150, 300))
    table = build_table(results)
    assert table.rows == ["base", "sft early 1", "sft early 2", CONVERGED]
    assert len(table.columns) == 2
    assert any("steps [150, 300]" in note for note in table.notes)


def test_table_labels_variants_of_one_method_by_params():
    results = reference_set() + [
        make_result("ties", 0.6, role="merge", params={"density": 0.3}),
        make_result("ties", 0.65, role="merge", params={"density": 0.5}),
    ]
    rows = build_table(results).rows
    assert "ties (density=0.3)" in rows and "ties (density=0.5)" in rows


def test_table_cli_dedups_copies_and_writes_csv(tmp_path, capsys):
    for i, result in enumerate(reference_set()):
        for run in ("run-a", "run-b"):  # the same evaluation copied into two job folders
            path = tmp_path / run / "results" / str(i) / "results.json"
            path.parent.mkdir(parents=True)
            write_result(path, result)
    assert len(load_results([tmp_path])) == 4
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("| sft@100 |") == 1
    csv_path = tmp_path / "table.csv"
    assert main([str(tmp_path), "--format", "csv", "--out", str(csv_path)]) == 0
    lines = csv_path.read_text().strip().splitlines()
    assert lines[0].startswith("row,model,domain") and len(lines) == 5
    assert to_csv(build_table(reference_set())).count("\n") == 5


def test_table_cli_errors(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
