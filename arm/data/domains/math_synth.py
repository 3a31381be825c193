"""math_synth: short arithmetic word problems with an exact integer answer.

A problem is a left-to-right chain of operations on a starting amount::

    "Tom has 34 pens, gets 25, gives 7.\\nA:"      -> " 52"   ops ["add", "sub"], operands [34, 25, 7]
    "Ann has 3 bags of 12 figs.\\nA:"              -> " 36"   ops ["mul"],        operands [3, 12]
    "Bob has 4 bags of 15 cups, loses 9.\\nA:"     -> " 51"   ops ["mul", "sub"], operands [4, 15, 9]

``add`` and ``sub`` take an operand from ``[operand_min, operand_max]``; ``mul`` (always the first
step: "k bags of a") multiplies an operand by a factor from ``[factor_min, factor_max]``. Running
totals never go below zero. The underlying problem is ``(ops, operands)``: names, objects and verbs
are surface only, and no underlying problem appears in two splits.

Difficulty knobs: the operand and factor ranges, ``operations``, ``two_step_share`` (problems with
two operations instead of one), and ``n_names`` / ``n_objects`` / ``n_verbs`` (surface variety).
"""

from __future__ import annotations

import itertools
import random
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any

from arm.data.domains.common import (
    allocate,
    check_printable,
    merge_params,
    partition,
    require_choices,
    require_fraction,
    require_int,
    require_range,
    split_sizes,
)

NAME = "math_synth"

DEFAULT_PARAMS: dict[str, Any] = {
    "n_train": 3000,
    "n_validation": 200,
    "n_test": 200,
    "operand_min": 10,
    "operand_max": 99,
    "factor_min": 2,
    "factor_max": 9,
    "operations": ["add", "sub", "mul"],
    "two_step_share": 0.3,
    "n_names": 8,
    "n_objects": 8,
    "n_verbs": 2,
}

OPERATIONS: tuple[str, ...] = ("add", "sub", "mul")
NAMES: tuple[str, ...] = ("Tom", "Ann", "Bob", "Sam", "Eve", "Max", "Mia", "Leo", "Zoe", "Ben", "Kim", "Joe")
OBJECTS: tuple[str, ...] = (
    "pens", "cups", "eggs", "nuts", "figs", "toys", "cars", "hats", "keys", "pies", "buns", "gems",
)  # fmt: skip
VERBS: dict[str, tuple[str, ...]] = {"add": ("gets", "finds", "buys"), "sub": ("gives", "loses", "sells")}
CUE = "\nA:"

SINGLE_STEP_KINDS: tuple[tuple[str, ...], ...] = (("add",), ("sub",), ("mul",))
TWO_STEP_KINDS: tuple[tuple[str, ...], ...] = (
    ("add", "add"), ("add", "sub"), ("sub", "add"), ("sub", "sub"), ("mul", "add"), ("mul", "sub"),
)  # fmt: skip

ENUMERATE_LIMIT = 200_000
"""Kinds whose raw operand grid is at most this large are enumerated; larger ones are sampled."""

Problem = tuple[tuple[str, ...], tuple[int, ...]]
"""An underlying problem: (ops, operands)."""


def evaluate(ops: Sequence[str], operands: Sequence[int]) -> int | None:
    """Fold ``ops`` left to right over ``operands``; None when a running total would go negative."""
    value = operands[0]
    for op, operand in zip(ops, operands[1:], strict=True):
        if op == "add":
            value += operand
        elif op == "sub":
            value -= operand
        elif op == "mul":
            value *= operand
        else:
            raise ValueError(f"{NAME}: unknown operation {op!r}")
        if value < 0:
            return None
    return value


def _operand_ranges(kind: tuple[str, ...], operands: range, factors: range) -> list[range]:
    """The value range of each operand of a problem of this kind (``mul`` starts with the factor)."""
    if kind[0] == "mul":
        return [factors, operands] + [operands] * (len(kind) - 1)
    return [operands] * (len(kind) + 1)


def _count(kind: tuple[str, ...], operands: range, factors: range) -> int:
    """Exact number of valid (non-negative) problems of this kind, by dynamic programming."""
    if kind[0] == "mul":
        totals = Counter(k * a for k in factors for a in operands)
        rest = kind[1:]
    else:
        totals = Counter(operands)
        rest = kind
    for op in rest:
        step: Counter[int] = Counter()
        for value, count in totals.items():
            for operand in operands:
                if op == "add":
                    step[value + operand] += count
                elif value >= operand:
                    step[value - operand] += count
        totals = step
    return sum(totals.values())


def _sample_kind(kind: tuple[str, ...], quota: int, ranges: list[range], rng: random.Random) -> list[Problem]:
    """Draw ``quota`` distinct valid problems of one kind, uniformly."""
    grid = 1
    for r in ranges:
        grid *= len(r)
    if grid <= ENUMERATE_LIMIT:
        valid = [(kind, ops) for ops in itertools.product(*ranges) if evaluate(kind, ops) is not None]
        return rng.sample(valid, quota)
    chosen: list[Problem] = []
    seen: set[tuple[int, ...]] = set()
    attempts = 0
    while len(chosen) < quota:
        attempts += 1
        if attempts > 1000 + 200 * quota:
            raise ValueError(
                f"{NAME}: could not draw {quota} distinct {'+'.join(kind)} problems; widen the ranges"
            )
        values = tuple(rng.choice(r) for r in ranges)
        if values not in seen and evaluate(kind, values) is not None:
            seen.add(values)
            chosen.append((kind, values))
    return chosen


def _render(problem: Problem, rng: random.Random, n_names: int, n_objects: int, n_verbs: int) -> str:
    """Write a problem as a one-line word problem ending in the answer cue."""
    ops, values = problem
    name = NAMES[rng.randrange(n_names)]
    obj = OBJECTS[rng.randrange(n_objects)]
    if ops[0] == "mul":
        text = f"{name} has {values[0]} bags of {values[1]} {obj}"
        clauses = zip(ops[1:], values[2:], strict=True)
    else:
        text = f"{name} has {values[0]} {obj}"
        clauses = zip(ops, values[1:], strict=True)
    for op, value in clauses:
        text += f", {VERBS[op][rng.randrange(n_verbs)]} {value}"
    return text + "." + CUE


def generate_splits(params: Mapping[str, Any] | None, seed: int) -> dict[str, list[dict[str, Any]]]:
    """Generate disjoint train/validation/test splits of word problems, deterministically from ``seed``."""
    p = merge_params(NAME, DEFAULT_PARAMS, params)
    sizes = split_sizes(NAME, p)
    operands = require_range(NAME, p, "operand_min", "operand_max", 0)
    factors = require_range(NAME, p, "factor_min", "factor_max", 0)
    enabled = require_choices(NAME, p, "operations", OPERATIONS)
    two_step_share = require_fraction(NAME, p, "two_step_share")
    n_names = require_int(NAME, p, "n_names", 1)
    n_objects = require_int(NAME, p, "n_objects", 1)
    n_verbs = require_int(NAME, p, "n_verbs", 1)
    for key, limit in (("n_names", len(NAMES)), ("n_objects", len(OBJECTS)), ("n_verbs", 3)):
        if p[key] > limit:
            raise ValueError(f"{NAME}: parameter {key!r} must be <= {limit}, got {p[key]}")

    total = sum(sizes.values())
    n_two = round(total * two_step_share)
    rng = random.Random(seed)
    pool: list[Problem] = []
    classes = (("single-step", SINGLE_STEP_KINDS, total - n_two), ("two-step", TWO_STEP_KINDS, n_two))
    for label, all_kinds, class_total in classes:
        kinds = tuple(k for k in all_kinds if all(op in enabled for op in k))
        capacities = [_count(k, operands, factors) for k in kinds]
        quotas = allocate(class_total, [Fraction(1)] * len(kinds), capacities, f"{NAME} ({label} problems)")
        for kind, quota in zip(kinds, quotas, strict=True):
            if quota:
                pool.extend(_sample_kind(kind, quota, _operand_ranges(kind, operands, factors), rng))
    rng.shuffle(pool)

    splits: dict[str, list[dict[str, Any]]] = {}
    for split, problems in partition(NAME, pool, sizes).items():
        records = []
        for index, problem in enumerate(problems):
            ops, values = problem
            answer = str(evaluate(ops, values))
            record = {
                "id": f"{NAME}-{split}-{index}",
                "prompt": _render(problem, rng, n_names, n_objects, n_verbs),
                "response": f" {answer}",
                "answer": answer,
                "ops": list(ops),
                "operands": list(values),
            }
            check_printable(NAME, record["id"], record["prompt"], record["response"])
            records.append(record)
        splits[split] = records
    return splits


# --------------------------------------------------------------------------- scoring (the registry entry's scorer)

METRIC = "exact_match"
"""The metric of this domain's lm-eval task (evals/tasks/math_synth.yaml) and of `score`."""

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


def score(prediction: str, record: Mapping[str, Any]) -> float:
    """The domain's scorer: exact final number against ``record["answer"]``."""
    return score_math(prediction, record["answer"])
