"""Scorers: exact final number (math) and sandboxed unit tests (code_synth, HumanEval, MBPP).

Shared by the lm-eval task hooks (``evals/tasks/utils.py``, ``evals/tasks/code/utils.py``) and the
project's own diagnostics so both score identically. Every program runs in the OS sandbox of
``arm.core.sandbox``; the tests run in this process against its answers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from arm.core.sandbox import run_program
from arm.data.domains import get_generator
from arm.data.domains.code_synth import code_program, function_body, score_code
from arm.data.domains.math_synth import extract_final_number, score_math

__all__ = ["CODE_EVAL_TIMEOUT_S", "code_program", "extract_final_number", "function_body", "lm_eval_mbpp_fewshot",
           "score_code", "score_code_batch", "score_humaneval", "score_math", "score_mbpp", "score_records"]

CODE_EVAL_TIMEOUT_S = 3.0
"""Wall-clock limit per HumanEval / MBPP program: lm-eval's code_eval default (``timeout=3.0``)."""

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


def score_records(domain: str, predictions: Sequence[str], records: Sequence[Mapping[str, Any]],
                  max_workers: int = 2) -> list[float]:
    """Scores of a synthetic domain's predictions by the domain's own scorer (its registry entry),
    ``max_workers`` at a time (code runs in sandbox processes; threads only wait on them)."""

    if len(predictions) != len(records):
        raise ValueError(f"score_records: {len(predictions)} predictions for {len(records)} records")
    scorer = get_generator(domain).score
    with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        return [float(s) for s in pool.map(scorer, predictions, records)]


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
