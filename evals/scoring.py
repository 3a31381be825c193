"""Scorers: exact final number (math) and sandboxed unit tests (code_synth, HumanEval, MBPP).

Shared by the lm-eval task hooks (``evals/tasks/utils.py``, ``evals/tasks/code/utils.py``) and the
project's own diagnostics so both score identically. Every program runs in the OS sandbox of
``evals.sandbox``; the tests run in this process against its answers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal, InvalidOperation
from typing import Any

from evals.sandbox import run_program

CODE_EVAL_TIMEOUT_S = 3.0
"""Wall-clock limit per HumanEval / MBPP program: lm-eval's code_eval default (``timeout=3.0``)."""

_NUMBER = re.compile(r"(?<![\d.])-?(?:\d{1,3}(?:,\d{3})+(?![\d,])|\d+)(?:\.\d+)?")
"""An integer or decimal, optionally negative, optionally with thousands separators ("1,234")."""


def extract_final_number(text: str) -> str | None:
    """Return the last number in ``text`` in canonical form, or None when there is none.

    Commas between digit groups are dropped ("1,234" -> "1234"), a trailing period is not a
    decimal point ("52." -> "52"), and a zero fraction is dropped ("52.0" -> "52"); other
    decimals are kept ("2.5"). A minus sign directly before the digits makes it negative.
    """
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    value = Decimal(matches[-1].replace(",", ""))
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def score_math(prediction: str, answer: str) -> float:
    """1.0 when the final number of ``prediction`` equals ``answer`` numerically, else 0.0."""
    predicted = extract_final_number(prediction)
    expected = extract_final_number(str(answer))
    if predicted is None or expected is None:
        return 0.0
    try:
        return 1.0 if Decimal(predicted) == Decimal(expected) else 0.0
    except InvalidOperation:
        return 0.0


def function_body(completion: str) -> str:
    """Cut a body completion at the first non-empty line that is not indented.

    The model completes the body of a function whose header ends the prompt; anything it writes
    after the body (a new spec, another ``def``) is not part of the answer, as with HumanEval's
    stop sequences.
    """
    lines = completion.split("\n")
    for index, line in enumerate(lines):
        if index > 0 and line.strip() and not line[0].isspace():
            return "\n".join(lines[:index]).rstrip()
    return completion.rstrip()


def code_program(prediction: str, doc: Mapping[str, Any]) -> str:
    """The program that is tested: the code part of the prompt followed by the completed body."""
    return str(doc["code_prefix"]) + function_body(prediction)


def score_code(prediction: str, doc: Mapping[str, Any]) -> float:
    """1.0 when ``doc["code_prefix"] + prediction`` passes every test in ``doc["tests"]``, else 0.0."""
    result = run_program(code_program(prediction, doc), [str(t) for t in doc["tests"]])
    return 1.0 if result.passed else 0.0


def score_humaneval(response: str, doc: Mapping[str, Any]) -> float:
    """pass@1 of one HumanEval completion: lm-eval's program (prompt + completion) in the sandbox, the
    test and ``check(<entry_point>)`` here. The prompt's own helpers (e.g. ``poly``) run here too, so
    a test never takes the program's replacement of them; the entry point is the program's."""
    program = str(doc["prompt"]) + str(response)
    tests = [str(doc["test"]), f"check({doc['entry_point']})"]
    result = run_program(program, tests, timeout_s=CODE_EVAL_TIMEOUT_S, setup=str(doc["prompt"]),
                         entry_point=str(doc["entry_point"]))
    return 1.0 if result.passed else 0.0


def score_mbpp(response: str, doc: Mapping[str, Any]) -> float:
    """pass_at_1 of one MBPP completion: the completion in the sandbox, lm-eval's target (the three
    ``assert`` lines of ``test_list``) here."""
    tests = [str(t) for t in list(doc["test_list"])[:3]]
    return 1.0 if run_program(str(response), tests, timeout_s=CODE_EVAL_TIMEOUT_S).passed else 0.0


def lm_eval_mbpp_fewshot() -> list[dict[str, Any]]:
    """lm-eval's MBPP few-shot examples (``lm_eval/tasks/mbpp/utils.py: list_fewshot_samples``), read
    from its source: importing that module loads ``code_eval`` from the hub."""
    import ast
    from pathlib import Path

    import lm_eval

    path = Path(lm_eval.__file__).parent / "tasks" / "mbpp" / "utils.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef) and node.name == "list_fewshot_samples":
            returns = [n for n in node.body if isinstance(n, ast.Return)]
            if returns:
                return ast.literal_eval(returns[0].value)
    raise RuntimeError(f"{path}: no list_fewshot_samples() returning a literal (lm-eval changed its MBPP task)")


def score_code_batch(
    predictions: Sequence[str], docs: Sequence[Mapping[str, Any]], max_workers: int = 2
) -> list[float]:
    """Score many code completions, ``max_workers`` sandbox processes at a time, in input order."""
    if len(predictions) != len(docs):
        raise ValueError(f"score_code_batch: {len(predictions)} predictions for {len(docs)} docs")
    if max_workers < 1:
        raise ValueError(f"score_code_batch: max_workers must be >= 1, got {max_workers}")
    # Threads only wait on the sandbox subprocesses, so the GIL is no bottleneck.
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        return list(pool.map(score_code, predictions, docs))
