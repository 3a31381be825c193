"""Tests of the math and code scorers of the synthetic domains."""

from __future__ import annotations

import pytest

from arm.data.domains import generate_splits
from evals.scoring import extract_final_number, function_body, score_code, score_code_batch, score_math

DOC = {
    "code_prefix": "def f(x):\n",
    "entry_point": "f",
    "tests": ["assert f(0) == 2", "assert f(1) == 5", "assert f(3) == 11", "assert f(-4) == -10"],
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" 52", "52"),
        ("52.", "52"),
        ("52\n", "52"),
        ("= 52", "52"),
        ("the answer is 52.", "52"),
        ("52.0", "52"),
        ("1,234", "1234"),
        ("-3", "-3"),
        ("3 + 4 = 7", "7"),
        ("2.5", "2.5"),
        ("no number here", None),
        ("", None),
    ],
)
def test_extract_final_number(text: str, expected: str | None) -> None:
    assert extract_final_number(text) == expected


@pytest.mark.parametrize(
    ("prediction", "answer", "score"),
    [
        (" 52", "52", 1.0),
        ("52.", "52", 1.0),
        ("52\n", "52", 1.0),
        ("= 52", "52", 1.0),
        ("the answer is 52.", "52", 1.0),
        ("52.0", "52", 1.0),
        ("1,234", "1234", 1.0),
        ("-3", "-3", 1.0),
        (" 53", "52", 0.0),
        ("-52", "52", 0.0),
        ("none", "52", 0.0),
    ],
)
def test_score_math(prediction: str, answer: str, score: float) -> None:
    assert score_math(prediction, answer) == score


def test_function_body_stops_at_unindented_line() -> None:
    assert function_body("    return x*3+2\nx times 4\ndef f(x):\n") == "    return x*3+2"
    assert (
        function_body("    if x:\n        return 1\n\n    return 2\n")
        == "    if x:\n        return 1\n\n    return 2"
    )


def test_score_code_right_wrong_and_forbidden() -> None:
    assert score_code("    return x*3+2", DOC) == 1.0
    assert score_code("    return x*3+2\nx times 3 plus 2\ndef f(x):\n", DOC) == 1.0
    assert score_code("    return (x+2)*3", DOC) == 0.0
    assert score_code("    return x*3+", DOC) == 0.0
    assert score_code("    return len(open('/etc/passwd').read()) * 0 + x*3+2", DOC) == 0.0


def test_score_code_batch_is_ordered() -> None:
    records = generate_splits("code_synth", {"n_train": 0, "n_validation": 0, "n_test": 50}, seed=5)["test"]
    predictions = [r["response"] if i % 2 == 0 else "    return 12345" for i, r in enumerate(records)]
    scores = score_code_batch(predictions, records, max_workers=2)
    assert scores == [1.0 if i % 2 == 0 else 0.0 for i in range(50)]


def test_score_code_batch_checks_lengths() -> None:
    with pytest.raises(ValueError, match="2 predictions for 1 docs"):
        score_code_batch(["a", "b"], [DOC])
