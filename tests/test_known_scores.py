"""Known scores of known models through the real lm-eval and the real task YAML (no trained model).

The fixture models are built so that their greedy answer is known (tests/helpers.py
``write_answering_model``): one answers " 52" to every question, one answers nothing. On five questions
of which three have the answer 52 their exact match must be exactly 0.6 and 0.0, the per-sample scores
in samples.jsonl must be what the scorer gives, and results.json must carry them under the configured key.
The same fixture checks the ``unsafe_code`` wiring both ways with a task lm-eval marks unsafe.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.helpers import read_jsonl, recomputed_scores, write_answering_model

QUESTIONS = [  # (prompt, answer): three of five are 52
    ("Tom has 40 pens, gets 12.\nA:", "52"),
    ("Ann has 4 bags of 13 figs.\nA:", "52"),
    ("Bob has 60 cups, loses 8.\nA:", "52"),
    ("Sam has 20 pens, gets 15.\nA:", "35"),
    ("Eve has 3 bags of 11 figs.\nA:", "33"),
]
EVAL_CFG = {"backend": "hf", "device": "cpu", "dtype": "float32", "batch_size": 8}


@pytest.fixture(scope="module")
def known(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("known")
    data = root / "data"
    data.mkdir()
    records = [{"id": f"known-{i}", "prompt": p, "response": f" {a}", "answer": a} for i, (p, a) in enumerate(QUESTIONS)]
    for split in ("validation", "test"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"data": data, "right": write_answering_model(root / "answers-52", " 52"),
            "silent": write_answering_model(root / "answers-nothing", "")}


def math_specs(name: str = "math_synth"):
    from evals.runner import task_specs

    return task_specs({"name": "known", "tasks": [{"name": name, "metric": "exact_match"}]})


def evaluate_known(model: Path, data: Path, out: Path, specs=None, include: Path | None = None, **kwargs) -> dict:
    from evals.runner import evaluate, write_synthetic_tasks

    specs = specs or math_specs()
    include = include or write_synthetic_tasks(math_specs(), data, "test", out / "tasks")
    return evaluate(model, specs, EVAL_CFG, out, include_path=include, **kwargs)


def records_by_id(data: Path) -> dict:
    return {r["id"]: r for r in read_jsonl(data / "test.jsonl")}


@pytest.mark.parametrize("model, prediction, expected", [("right", " 52", 0.6), ("silent", "", 0.0)])
def test_known_model_gets_its_known_score(known, tmp_path, model, prediction, expected):
    from evals.results import build_result, load_result, write_result

    evaluation = evaluate_known(known[model], known["data"], tmp_path)
    samples = read_jsonl(tmp_path / "samples.jsonl")
    assert [s["prediction"] for s in samples] == [prediction] * len(QUESTIONS)  # the model answers as built
    assert [s["target"] for s in samples] == [a for _, a in QUESTIONS]
    recomputed = recomputed_scores(samples, records_by_id(known["data"]), "math_synth")
    assert recomputed == [float(s["score"]) for s in samples]
    assert sum(recomputed) / len(recomputed) == expected
    assert evaluation["primary"]["math_synth"] == {"metric": "exact_match,none", "value": expected, "n": len(QUESTIONS)}
    assert evaluation["metrics"]["math_synth"]["exact_match,none"] == expected

    # Through the result file as the job writes it.
    result = build_result(name=model, role="reference", model="tiny", domain="math_synth", split="test",
                          model_path=known[model], evaluation=evaluation, config={}, cache_key="k")
    write_result(tmp_path / "results.json", result)
    assert load_result(tmp_path / "results.json")["primary"]["math_synth"]["value"] == expected


def _unsafe_task(known: dict, out: Path) -> Path:
    """math_synth's instantiated YAML under another name, marked `unsafe_code: true` as lm-eval's
    humaneval and mbpp are."""
    from evals.runner import write_synthetic_tasks

    folder = write_synthetic_tasks(math_specs(), known["data"], "test", out / "tasks")
    text = (folder / "math_synth.yaml").read_text().replace("task: math_synth", "task: unsafe_probe")
    assert "task: unsafe_probe" in text
    (folder / "math_synth.yaml").unlink()
    (folder / "unsafe_probe.yaml").write_text(text + "unsafe_code: true\n")
    return folder


def test_unsafe_code_off_refuses_a_task_marked_unsafe_and_leaves_code_eval_off(known, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    include = _unsafe_task(known, tmp_path)
    with pytest.raises(ValueError, match="marked as unsafe"):
        evaluate_known(known["right"], known["data"], tmp_path, specs=math_specs("unsafe_probe"), include=include,
                       unsafe_code=False)
    assert "HF_ALLOW_CODE_EVAL" not in os.environ


def test_unsafe_code_on_confirms_to_lm_eval_and_allows_code_eval(known, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    include = _unsafe_task(known, tmp_path)
    evaluation = evaluate_known(known["right"], known["data"], tmp_path, specs=math_specs("unsafe_probe"),
                                include=include, unsafe_code=True)
    assert os.environ.get("HF_ALLOW_CODE_EVAL") == "1"
    assert evaluation["primary"]["unsafe_probe"]["value"] == 0.6
