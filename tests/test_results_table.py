"""results.json schema and the comparison table built from result files."""

from __future__ import annotations

import json

import pytest

from arm.core.errors import InputError
from evals.report import main
from evals.results import build_result, load_result, load_results, write_result
from evals.table import CONVERGED, build_table, to_csv, to_markdown


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


def sized(result, model):
    """The same result for another model (a different model size)."""
    return {**result, "model": model, "cache_key": f"{model}-{result['cache_key']}"}


def test_columns_grouped_by_model_size_then_domain():
    results = []
    for model in ("qwen3-8b", "tiny", "qwen3-1.7b"):
        for domain in ("math_synth", "code_synth"):
            results += [sized(r, model) for r in reference_set(domain)]
    table = build_table(results)
    assert [(c.model, c.domain) for c in table.columns] == [
        ("tiny", "math_synth"), ("tiny", "code_synth"), ("qwen3-1.7b", "math_synth"), ("qwen3-1.7b", "code_synth"),
        ("qwen3-8b", "math_synth"), ("qwen3-8b", "code_synth"),
    ]


def test_latex_groups_header_marks_best_and_delta():
    from evals.table import to_latex

    results = reference_set() + reference_set("code_synth") + [make_result("ties", 0.75, role="merge", params={"density": 0.5})]
    text = to_latex(build_table(results))
    assert r"\begin{tabular}{lrr}" in text and r"\end{tabular}" in text
    assert r"\multicolumn{2}{c}{tiny}" in text  # model spans its domains
    assert r"\multicolumn{1}{c}{math\_synth}" in text and r"\multicolumn{1}{c}{code\_synth}" in text
    assert r"\textbf{75.0} {\scriptsize (+5.0)}" in text
    assert r"sft\_converged & 70.0 & \textbf{70.0} \\" in text  # no Δ on its own row; best of the code column
    assert "ties & " in text and text.count(r"\midrule") == 2  # methods set apart from references
    assert "--" in text.split("ties &")[1].splitlines()[0]  # no ties result for code: a dash


def test_method_variants_are_labelled_by_the_params_that_differ():
    common = {"lr": 0.25, "rotation": "procrustes", "calibration": {"n_sequences": 128}}
    results = reference_set() + [
        make_result("arm", 0.72, role="merge", params={**common, "iterations": 2}),
        make_result("arm", 0.78, role="merge", params={**common, "iterations": 4}),
    ]
    assert build_table(results).rows[-2:] == ["arm (iterations=2)", "arm (iterations=4)"]


def test_out_dir_writes_md_csv_latex_and_plots(tmp_path, capsys):
    results = reference_set() + reference_set("code_synth")
    for schedule in ("constant", "cosine"):
        for t, value in ((1, 0.6), (2, 0.7), (4, 0.74)):
            results.append(make_result("arm", value + (0.02 if schedule == "cosine" else 0), role="merge",
                                       params={"iterations": t, "schedule": schedule, "lr": 0.25}))
    for i, result in enumerate(results):
        write_result(tmp_path / "sweep" / str(i) / "results" / result["name"] / "results.json", result)
    out = tmp_path / "table"
    assert main([str(tmp_path / "sweep"), "--out-dir", str(out), "--plots", str(tmp_path / "plots")]) == 0
    assert (out / "table.md").read_text().count("| arm (iterations=") == 6
    assert (out / "table.tex").read_text().startswith("% arm-table")
    assert (out / "table.csv").read_text().splitlines()[0].startswith("row,model")
    for folder in (out, tmp_path / "plots"):
        for name in ("scores.png", "arm_iterations.png"):
            assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    from evals.plots import arm_iteration_series

    series = arm_iteration_series(results)
    assert series[("tiny", "math_synth", "test", "math_synth")]["schedule=cosine"] == [
        (1, pytest.approx(62.0)), (2, pytest.approx(72.0)), (4, pytest.approx(76.0))]
    assert main([str(tmp_path / "sweep"), "--format", "latex"]) == 0
    assert r"\toprule" in capsys.readouterr().out


def test_wandb_run_summary_rebuilds_the_table_and_the_table_is_logged(tmp_path):
    """A real (offline) W&B run: the results it reports rebuild the same table (what --from-wandb
    reads online), and the aggregated table is logged as a W&B Table."""
    from arm.run.tracking import WandbTracker
    from evals.table import results_from_summary
    from evals.wandb_table import log_sweep_table

    results = reference_set() + [make_result("ties", 0.75, role="merge", params={"density": 0.5})]
    cfg = {"logger": {"name": "wandb", "project": "arm-test", "mode": "offline", "tags": []},
           "model": {"name": "tiny"}, "domain": {"name": "math_synth"}, "merge": {"name": "ties"}}
    tracker = WandbTracker(cfg, tmp_path / "run", {"seed": 0})
    for result in results:
        tracker.log_result(result, [])
    tracker.log_table(build_table(results))
    summary = {key: tracker.run.summary[key] for key in tracker.run.summary.keys()}
    tracker.finish()
    rebuilt = build_table(results_from_summary(summary))
    assert to_csv(rebuilt) == to_csv(build_table(results))

    location = log_sweep_table(build_table(results), project="arm-test", group="smoke", run_dir=tmp_path / "table")
    assert location and list((tmp_path / "table" / "wandb").glob("offline-run-*/run-*.wandb"))


def test_wandb_group_is_the_sweep_folder_under_multirun(compose, tmp_path):
    from hydra.core.hydra_config import HydraConfig

    from arm.run.tracking import sweep_group

    for sweep_dir, group in ((tmp_path / "runs" / "sweeps" / "paper_table", "paper_table"),
                             (tmp_path / "runs" / "multirun" / "2026-11-22" / "12-00-00", "2026-11-22_12-00-00")):
        cfg = compose("experiment=smoke", f"hydra.sweep.dir={sweep_dir}", "hydra.mode=MULTIRUN", return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        try:
            assert sweep_group() == group
        finally:
            HydraConfig.instance().cfg = None
    cfg = compose(return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        assert sweep_group() is None  # a single run has no sweep group
    finally:
        HydraConfig.instance().cfg = None
