"""code_synth: one-line function specs in words; the model writes the body of ``f(x)``.

Each record's prompt is the spec, a newline and the function header; the response is the body::

    "x times 3 plus 2\\ndef f(x):\\n"                     -> "    return x*3+2"
    "x plus 4 if even else x times 3\\ndef f(x):\\n"      -> "    return x+4 if x%2==0 else x*3"
    "sum of 2 to x times 3\\ndef f(x):\\n"                -> "    return sum(range(2,x+1))*3"

Patterns (weights in ``pattern_weights``; weight 0 disables one):

- ``arith``: one or two steps applied left to right: "x plus 4 times 2" -> ``(x+4)*2``.
- ``parity``: a different step on even and odd x.
- ``range_sum``: sum of an inclusive range "s to x" or "s to x-1", optionally times a factor.
- ``mod``: "x mod d", optionally followed by ", <step>".
- ``minmax``: "max of x and c" / "min of x and c", optionally followed by ", <step>".
- ``abs``: "abs of x minus c", optionally followed by ", <step>".
- ``examples`` (weight 0 by default): a linear function stated by examples instead of words,
  "f(0)=8, f(1)=11, f(2)=14" -> ``x*3+8``; the slope (1 to ``factor_max``) must be inferred, the
  intercept lies in ``[-const_max*factor_max, const_max*factor_max]``. The one pattern that needs
  computation rather than transliteration: it sets the difficulty of the domain for a tiny model.

A step is "plus c" / "minus c" with c in ``[const_min, const_max]`` or "times k" with k in
``[factor_min, factor_max]``; ``mod`` divisors also come from the factor range. A comma applies the
following step to the whole result so far. The underlying problem is the pattern and its constants;
the prompt text is a one-to-one rendering of it, so no problem appears in two splits. Hidden tests
(4-6 ``assert`` lines) use inputs around the constants, with even and odd values.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from arm.core.sandbox import run_program
from arm.data.domains.common import (
    allocate,
    check_printable,
    merge_params,
    partition,
    require_range,
    split_sizes,
)

NAME = "code_synth"
ENTRY_POINT = "f"
CODE_PREFIX = f"def {ENTRY_POINT}(x):\n"
INDENT = "    "

PATTERNS: tuple[str, ...] = ("arith", "parity", "range_sum", "mod", "minmax", "abs", "examples")

DEFAULT_PARAMS: dict[str, Any] = {
    "n_train": 3000,
    "n_validation": 200,
    "n_test": 200,
    "const_min": 1,
    "const_max": 19,
    "factor_min": 2,
    "factor_max": 9,
    "pattern_weights": {"arith": 3, "parity": 2, "range_sum": 1, "mod": 1, "minmax": 1, "abs": 1},
}

Step = tuple[str, int]
"""An operation applied to a value: ("plus" | "minus" | "times", constant)."""

SYMBOLS = {"plus": "+", "minus": "-", "times": "*"}


@dataclass(frozen=True)
class Spec:
    """One underlying problem: its key, its words, its reference expression, an evaluator and test inputs."""

    key: tuple[Any, ...]
    words: str
    expr: str
    func: Callable[[int], int]
    inputs: list[int]


def _apply(step: Step, value: int) -> int:
    op, c = step
    return value + c if op == "plus" else value - c if op == "minus" else value * c


def _step_code(expr: str, step: Step, compound: bool) -> str:
    """Apply a step to an expression; ``compound`` marks an expression that binds looser than ``*``."""
    op, c = step
    if op == "times" and compound:
        return f"({expr})*{c}"
    return f"{expr}{SYMBOLS[op]}{c}"


def _steps(consts: range, factors: range) -> list[Step]:
    return [("plus", c) for c in consts] + [("minus", c) for c in consts] + [("times", k) for k in factors]


def _inputs(candidates: list[int]) -> list[int]:
    """Distinct inputs in order, 4 to 6 of them (padding with larger values when needed)."""
    out: list[int] = []
    for x in candidates + [x + 11 for x in candidates]:
        if x not in out:
            out.append(x)
    return out[:6]


def _arith(consts: range, factors: range) -> list[Spec]:
    specs = []
    steps = _steps(consts, factors)
    for first in steps:
        chains: list[tuple[Step, ...]] = [(first,)] + [(first, second) for second in steps]
        for chain in chains:
            expr, words, compound = "x", "x", False
            for step in chain:
                expr = _step_code(expr, step, compound)
                words += f" {step[0]} {step[1]}"
                compound = step[0] != "times"

            def func(x: int, chain: tuple[Step, ...] = chain) -> int:
                for step in chain:
                    x = _apply(step, x)
                return x

            specs.append(Spec(("arith", chain), words, expr, func, _inputs([0, 1, 3, 8, -4])))
    return specs


def _parity(consts: range, factors: range) -> list[Spec]:
    specs = []
    steps = _steps(consts, factors)
    for even in steps:
        for odd in steps:
            if even == odd:
                continue
            words = f"x {even[0]} {even[1]} if even else x {odd[0]} {odd[1]}"
            expr = f"{_step_code('x', even, False)} if x%2==0 else {_step_code('x', odd, False)}"

            def func(x: int, even: Step = even, odd: Step = odd) -> int:
                return _apply(even if x % 2 == 0 else odd, x)

            specs.append(Spec(("parity", even, odd), words, expr, func, [0, 1, 2, 3, 6, 9]))
    return specs


def _range_sum(consts: range, factors: range) -> list[Spec]:
    specs = []
    for start in [0, *(c for c in consts if c != 0)]:
        for inclusive in (False, True):
            for factor in [None, *factors]:
                words = f"sum of {start} to x{'' if inclusive else '-1'}"
                stop = "x+1" if inclusive else "x"
                expr = f"sum(range({stop}))" if start == 0 else f"sum(range({start},{stop}))"
                if factor is not None:
                    words += f" times {factor}"
                    expr += f"*{factor}"

                def func(
                    x: int, start: int = start, inclusive: bool = inclusive, factor: int | None = factor
                ) -> int:
                    total = sum(range(start, x + 1 if inclusive else x))
                    return total * factor if factor is not None else total

                inputs = _inputs([start, start + 1, start + 3, start + 6, start + 10])
                specs.append(Spec(("range_sum", start, inclusive, factor), words, expr, func, inputs))
    return specs


def _tails(consts: range, factors: range) -> list[Step | None]:
    return [None, *_steps(consts, factors)]


def _with_tail(words: str, expr: str, tail: Step | None) -> tuple[str, str]:
    if tail is None:
        return words, expr
    return f"{words}, {tail[0]} {tail[1]}", _step_code(expr, tail, False)


def _mod(consts: range, factors: range) -> list[Spec]:
    specs = []
    for d in factors:
        for tail in _tails(consts, factors):
            words, expr = _with_tail(f"x mod {d}", f"x%{d}", tail)

            def func(x: int, d: int = d, tail: Step | None = tail) -> int:
                return x % d if tail is None else _apply(tail, x % d)

            inputs = _inputs([0, d - 1, d, d + 1, 2 * d + 3, 17])
            specs.append(Spec(("mod", d, tail), words, expr, func, inputs))
    return specs


def _minmax(consts: range, factors: range) -> list[Spec]:
    specs = []
    for which in ("max", "min"):
        for c in consts:
            for tail in _tails(consts, factors):
                words, expr = _with_tail(f"{which} of x and {c}", f"{which}(x,{c})", tail)

                def func(x: int, which: str = which, c: int = c, tail: Step | None = tail) -> int:
                    value = max(x, c) if which == "max" else min(x, c)
                    return value if tail is None else _apply(tail, value)

                inputs = _inputs([0, c - 1, c, c + 1, c + 5, 2 * c + 3])
                specs.append(Spec(("minmax", which, c, tail), words, expr, func, inputs))
    return specs


def _abs(consts: range, factors: range) -> list[Spec]:
    specs = []
    for c in consts:
        for tail in _tails(consts, factors):
            words, expr = _with_tail(f"abs of x minus {c}", f"abs(x-{c})", tail)

            def func(x: int, c: int = c, tail: Step | None = tail) -> int:
                return abs(x - c) if tail is None else _apply(tail, abs(x - c))

            inputs = _inputs([0, c - 1, c, c + 1, c + 4, 2 * c + 3])
            specs.append(Spec(("abs", c, tail), words, expr, func, inputs))
    return specs


def _examples(consts: range, factors: range) -> list[Spec]:
    specs = []
    bound = consts[-1] * factors[-1]
    for slope in range(1, factors[-1] + 1):
        for intercept in range(-bound, bound + 1):
            if slope == 1 and intercept == 0:
                continue
            expr = "x" if slope == 1 else f"x*{slope}"
            if intercept:
                expr += f"{'+' if intercept > 0 else '-'}{abs(intercept)}"

            def func(x: int, slope: int = slope, intercept: int = intercept) -> int:
                return slope * x + intercept

            words = ", ".join(f"f({x})={func(x)}" for x in (0, 1, 2))
            specs.append(Spec(("examples", slope, intercept), words, expr, func, _inputs([0, 1, 3, 8, -4])))
    return specs


BUILDERS: dict[str, Callable[[range, range], list[Spec]]] = {
    "arith": _arith,
    "parity": _parity,
    "range_sum": _range_sum,
    "mod": _mod,
    "minmax": _minmax,
    "abs": _abs,
    "examples": _examples,
}


def _pattern_weights(p: Mapping[str, Any]) -> list[Fraction]:
    """Read ``pattern_weights``: a mapping pattern -> weight >= 0; patterns left out get weight 0."""
    given = p["pattern_weights"]
    if not isinstance(given, Mapping):
        raise ValueError(
            f"{NAME}: parameter 'pattern_weights' must be a mapping pattern -> weight, got {given!r}"
        )
    for name, weight in given.items():
        if name not in PATTERNS:
            raise ValueError(
                f"{NAME}: 'pattern_weights' has unknown pattern {name!r}; known: {', '.join(PATTERNS)}"
            )
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise ValueError(f"{NAME}: 'pattern_weights.{name}' must be a number >= 0, got {weight!r}")
    weights = [Fraction(given.get(name, 0)) for name in PATTERNS]
    if not any(weights):
        raise ValueError(f"{NAME}: 'pattern_weights' enables no pattern (all weights are 0)")
    return weights


def _record(spec: Spec, split: str, index: int) -> dict[str, Any]:
    record = {
        "id": f"{NAME}-{split}-{index}",
        "prompt": f"{spec.words}\n{CODE_PREFIX}",
        "response": f"{INDENT}return {spec.expr}",
        "code_prefix": CODE_PREFIX,
        "entry_point": ENTRY_POINT,
        "tests": [f"assert {ENTRY_POINT}({x}) == {spec.func(x)}" for x in spec.inputs],
        "pattern": spec.key[0],
    }
    check_printable(NAME, record["id"], record["prompt"], record["response"], *record["tests"])
    return record


def generate_splits(params: Mapping[str, Any] | None, seed: int) -> dict[str, list[dict[str, Any]]]:
    """Generate disjoint train/validation/test splits of function specs, deterministically from ``seed``."""
    p = merge_params(NAME, DEFAULT_PARAMS, params)
    sizes = split_sizes(NAME, p)
    consts = require_range(NAME, p, "const_min", "const_max", 1)
    factors = require_range(NAME, p, "factor_min", "factor_max", 2)
    weights = _pattern_weights(p)

    rng = random.Random(seed)
    spaces = [
        BUILDERS[name](consts, factors) if weight else []
        for name, weight in zip(PATTERNS, weights, strict=True)
    ]
    quotas = allocate(sum(sizes.values()), weights, [len(s) for s in spaces], NAME)
    pool: list[Spec] = []
    for space, quota in zip(spaces, quotas, strict=True):
        pool.extend(rng.sample(space, quota))
    rng.shuffle(pool)
    return {
        split: [_record(spec, split, i) for i, spec in enumerate(specs)]
        for split, specs in partition(NAME, pool, sizes).items()
    }


def reference_program(record: Mapping[str, Any]) -> str:
    """The runnable reference solution of a record: ``code_prefix + response``."""
    return str(record["code_prefix"]) + str(record["response"])


# --------------------------------------------------------------------------- scoring (the registry entry's scorer)

METRIC = "pass@1"
"""The metric of this domain's lm-eval task (evals/tasks/code_synth.yaml) and of `score`."""

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


def score(prediction: str, record: Mapping[str, Any]) -> float:
    """The domain's scorer: the program passes every hidden test (run in arm.core.sandbox)."""
    return score_code(prediction, record)
