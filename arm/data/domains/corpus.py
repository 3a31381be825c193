"""The pretraining corpus of the tiny base: the raw skills of both synthetic domains in other surface forms.

The embedded default is a miniature of SFT on a *pretrained* model: the base already holds the skill
(arithmetic, writing a small Python expression from words) and SFT teaches a format it has not seen
(`<|user|> ... <|assistant|>`, a fixed answer phrase). This corpus is what the base learns the skills
from. Every document is a few lines of generic text, mixing:

    equation    3*7+5=26            7*3+5=26            5+3*7=26          (several notations and orders)
    steps       3*7=21, 21+5=26
    verbal      3 times 7 plus 5 is 26.
    narrative   Ann had 3 boxes with 7 cups in each. She got 5 more. Now Ann has 26 cups.
                Tom has 3 bags of 7 pens. Tom gets 5. Now Tom has 26 pens.
    code        # x times 3 plus 2            (a function described by a comment, as in source files)
                def f(x):
                    return x*3+2
                assert f(4) == 14             (sometimes: the function's outputs)

Arithmetic uses the operand ranges of math_synth (chains of 1-3 steps, a multiplication only first,
running totals never negative, evaluated left to right); code uses code_synth's problem space (its
builders, so every pattern and constant range). **No problem of a validation or test split of the
held-out domains appears in the corpus in any form**: math problems are excluded by their
underlying (ops, operands) in every notation (also as a step, or as the start of a longer chain, of the
step-by-step notation, which shows those results; `shows_held_out`), code problems by their spec (the
words that render it one-to-one).
`held_out_keys` computes those sets; `tests/test_pretrain.py` checks the overlap is empty.

Deterministic for (params, seed, held-out keys): only `random.Random` instances, no set iteration.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from arm.data.domains import code_synth, generate_splits, math_synth
from arm.data.domains.common import check_printable, merge_params, require_int, require_range

NAME = "corpus"

DEFAULT_PARAMS: dict[str, Any] = {
    "n_documents": 60000,
    "n_validation": 600,
    "lines_min": 3,
    "lines_max": 7,
    "max_chars": 320,  # a document stops taking lines once this long (keeps sequences short)
    # share of lines of each kind
    "mix": {"equation": 30, "steps": 10, "verbal": 12, "narrative": 12, "code": 36},
    # share of arithmetic chains with 1, 2 and 3 operations
    "chain_weights": [25, 70, 5],
    "operand_min": 0,
    "operand_max": 9,
    "factor_min": 2,
    "factor_max": 9,
    # code_synth's problem space
    "code_const_min": 1,
    "code_const_max": 19,
    "code_factor_min": 2,
    "code_factor_max": 9,
    "code_pattern_weights": {"arith": 3, "parity": 2, "range_sum": 1, "mod": 1, "minmax": 1, "abs": 1, "examples": 4},
    "assert_share": 0.5,
}

KINDS = ("equation", "steps", "verbal", "narrative", "code")
WORDS = {"add": "plus", "sub": "minus", "mul": "times"}
SYMBOL = {"add": "+", "sub": "-", "mul": "*"}
# Verbs of the other half of the narratives (the first half uses math_synth's own verbs).
NARRATIVE = {"add": ("got {} more", "was given {} more", "picked up {} more"),
             "sub": ("used {}", "gave away {}", "ate {}")}
CONTAINERS = ("boxes", "jars", "bags", "rows", "packs")
PRONOUNS = ("He", "She", "They")

MathProblem = tuple[tuple[str, ...], tuple[int, ...]]


# --------------------------------------------------------------------------- held-out problems


def math_key(record: Mapping[str, Any]) -> MathProblem:
    """The underlying problem of a math_synth record: (ops, operands)."""
    return tuple(record["ops"]), tuple(int(v) for v in record["operands"])


def code_key(record: Mapping[str, Any]) -> str:
    """The underlying problem of a code_synth record: its spec words (the first prompt line, without any template)."""
    words = record.get("words")
    if words is None:
        words = str(record["prompt"]).split("\n", 1)[0]
    return str(words)


def held_out_keys(held_out: Mapping[str, Mapping[str, Any]], splits: Sequence[str] = ("validation", "test")) -> dict[str, set]:
    """{"math": {(ops, operands)}, "code": {words}} of the validation and test splits of the held-out domains.

    `held_out` maps a domain generator name (math_synth, code_synth) to its `data:` block (with `seed`).
    """

    keys: dict[str, set] = {"math": set(), "code": set()}
    for generator, data in held_out.items():
        params = dict(data)
        seed = int(params.pop("seed", 0))
        params.pop("format", None)
        generated = generate_splits(generator, params, seed)
        for split in splits:
            for record in generated[split]:
                if generator == "math_synth":
                    keys["math"].add(math_key(record))
                elif generator == "code_synth":
                    keys["code"].add(code_key(record))
                else:
                    raise ValueError(f"{NAME}: held_out has unknown domain {generator!r} (math_synth, code_synth)")
    return keys


# --------------------------------------------------------------------------- arithmetic lines


def _weights(mapping: Mapping[str, Any], names: Sequence[str], key: str) -> list[float]:
    if not isinstance(mapping, Mapping):
        raise ValueError(f"{NAME}: parameter {key!r} must be a mapping name -> weight, got {mapping!r}")
    unknown = sorted(set(mapping) - set(names))
    if unknown:
        raise ValueError(f"{NAME}: parameter {key!r} has unknown entries {unknown}; known: {', '.join(names)}")
    weights = []
    for name in names:
        w = mapping.get(name, 0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
            raise ValueError(f"{NAME}: {key}.{name} must be a number >= 0, got {w!r}")
        weights.append(float(w))
    if not any(weights):
        raise ValueError(f"{NAME}: parameter {key!r} enables nothing (all weights 0)")
    return weights


def _prefixes(problem: MathProblem) -> list[MathProblem]:
    """The shorter chains a chain starts with: (ops[:k], values[:k+1]) for k < len(ops)."""
    ops, values = problem
    return [(ops[:k], values[: k + 1]) for k in range(1, len(ops))]


def _single_steps(problem: MathProblem) -> list[MathProblem]:
    """Every step of the step-by-step rendering as a one-operation problem: (op, (running total, operand))."""
    ops, v = problem
    if ops[0] == "mul":
        value, steps, rest = v[0] * v[1], [(("mul",), (v[0], v[1]))], zip(ops[1:], v[2:], strict=True)
    else:
        value, steps, rest = v[0], [], zip(ops, v[1:], strict=True)
    for op, x in rest:
        steps.append(((op,), (value, x)))
        value = value + x if op == "add" else value - x
    return steps


def shows_held_out(problem: MathProblem, kind: str, excluded: set) -> bool:
    """Whether a line of this kind rendering `problem` would show a held-out problem with its answer.

    Every notation shows the whole chain (so the chain itself must not be held out). The step-by-step
    notation also shows each step with its result and the result of every prefix of the chain: none of
    those may be a held-out problem either ("3*7=21, 21+5=26" shows the one-step problem 3*7 and the
    two-step problem 3*7+5). Equation, verbal and narrative lines show only the final result.
    """
    if problem in excluded:
        return True
    if kind == "steps":
        return any(p in excluded for p in _prefixes(problem)) or any(s in excluded for s in _single_steps(problem))
    return False


def _draw_chain(rng: random.Random, n_ops: int, operands: range, factors: range, excluded: set, kind: str) -> MathProblem:
    """A valid chain of `n_ops` operations (mul only first) whose `kind` line shows no held-out problem."""
    for _ in range(1000):
        ops = []
        for i in range(n_ops):
            choices = ("add", "sub", "mul") if i == 0 else ("add", "sub")
            ops.append(rng.choice(choices))
        if ops[0] == "mul":
            values = [rng.choice(factors), rng.choice(operands)] + [rng.choice(operands) for _ in ops[1:]]
        else:
            values = [rng.choice(operands)] + [rng.choice(operands) for _ in ops]
        problem = (tuple(ops), tuple(values))
        if math_synth.evaluate(problem[0], problem[1]) is not None and not shows_held_out(problem, kind, excluded):
            return problem
    raise ValueError(f"{NAME}: could not draw an arithmetic chain outside the held-out problems")


def _equation(problem: MathProblem, rng: random.Random, excluded: set) -> str:
    ops, v = problem
    answer = math_synth.evaluate(ops, v)
    if ops[0] == "mul":
        swapped = (ops, (v[1], v[0], *v[2:]))  # "7*3+5" reads as the problem 7 bags of 3: it must not be held out
        head = f"{v[0]}*{v[1]}" if rng.random() < 0.6 or swapped in excluded else f"{v[1]}*{v[0]}"
        rest = "".join(f"{SYMBOL[op]}{x}" for op, x in zip(ops[1:], v[2:], strict=True))
        if len(ops) == 2 and ops[1] == "add" and rng.random() < 0.3:
            return f"{v[2]}+{head}={answer}"  # another order, same value (precedence)
        return f"{head}{rest}={answer}"
    return f"{v[0]}" + "".join(f"{SYMBOL[op]}{x}" for op, x in zip(ops, v[1:], strict=True)) + f"={answer}"


def _steps(problem: MathProblem) -> str:
    ops, v = problem
    if ops[0] == "mul":
        value = v[0] * v[1]
        parts = [f"{v[0]}*{v[1]}={value}"]
        rest = zip(ops[1:], v[2:], strict=True)
    else:
        value = v[0]
        parts = []
        rest = zip(ops, v[1:], strict=True)
    for op, x in rest:
        new = value + x if op == "add" else value - x
        parts.append(f"{value}{SYMBOL[op]}{x}={new}")
        value = new
    return ", ".join(parts)


def _verbal(problem: MathProblem) -> str:
    ops, v = problem
    answer = math_synth.evaluate(ops, v)
    if ops[0] == "mul":
        text = f"{v[0]} times {v[1]}"
        rest = zip(ops[1:], v[2:], strict=True)
    else:
        text = f"{v[0]}"
        rest = zip(ops, v[1:], strict=True)
    for op, x in rest:
        text += f" {WORDS[op]} {x}"
    return f"{text} is {answer}."


def _narrative(problem: MathProblem, rng: random.Random) -> str:
    """Short sentences with quantities. Half of them use math_synth's verbs (gets, gives, ...) in sentences
    of their own ("Tom has 3 pens. Tom gets 5. Now Tom has 8 pens."), half other verbs ("She got 5 more."):
    the base meets the words; the one-line problem, the template and the answer phrase are SFT's."""
    ops, v = problem
    answer = math_synth.evaluate(ops, v)
    name = rng.choice(math_synth.NAMES)
    obj = rng.choice(math_synth.OBJECTS)
    if rng.random() < 0.5:
        if ops[0] == "mul":
            text = f"{name} has {v[0]} bags of {v[1]} {obj}."
            rest = zip(ops[1:], v[2:], strict=True)
        else:
            text = f"{name} has {v[0]} {obj}."
            rest = zip(ops, v[1:], strict=True)
        for op, x in rest:
            text += f" {name} {rng.choice(math_synth.VERBS[op])} {x}."
        return f"{text} Now {name} has {answer} {obj}."
    pron = rng.choice(PRONOUNS)
    if ops[0] == "mul":
        text = f"{name} had {v[0]} {rng.choice(CONTAINERS)} with {v[1]} {obj} in each."
        rest = zip(ops[1:], v[2:], strict=True)
    else:
        text = f"{name} had {v[0]} {obj}."
        rest = zip(ops, v[1:], strict=True)
    for op, x in rest:
        text += f" {pron} {rng.choice(NARRATIVE[op]).format(x)}."
    return f"{text} Now {name} has {answer} {obj}."


def equation_form(record: Mapping[str, Any]) -> tuple[str, str]:
    """(prompt, answer) of a math_synth record in the corpus's equation notation: "3*7+5=" -> "26".

    The base model's skill is measured with these prompts (the pretraining's own surface form).
    """
    ops, v = math_key(record)
    if ops[0] == "mul":
        text = f"{v[0]}*{v[1]}" + "".join(f"{SYMBOL[op]}{x}" for op, x in zip(ops[1:], v[2:], strict=True))
    else:
        text = f"{v[0]}" + "".join(f"{SYMBOL[op]}{x}" for op, x in zip(ops, v[1:], strict=True))
    return text + "=", str(math_synth.evaluate(ops, v))


# --------------------------------------------------------------------------- code lines


def comment_form(record: Mapping[str, Any]) -> str:
    """The prompt of a code_synth record in the corpus's notation: a comment line, then the header."""
    return f"# {code_key(record)}\n{code_synth.CODE_PREFIX}"


def _code(spec: code_synth.Spec, rng: random.Random, assert_share: float) -> str:
    text = f"# {spec.words}\n{code_synth.CODE_PREFIX}{code_synth.INDENT}return {spec.expr}\n"
    if rng.random() < assert_share:
        for x in rng.sample(spec.inputs, min(2, len(spec.inputs))):
            text += f"assert {code_synth.ENTRY_POINT}({x}) == {spec.func(x)}\n"
    return text.rstrip("\n")


# --------------------------------------------------------------------------- the corpus


def generate(params: Mapping[str, Any] | None, seed: int, held_out: Mapping[str, set] | None = None) -> dict[str, list[str]]:
    """{"train": [document, ...], "validation": [...]}: documents of a few lines each.

    `held_out`: {"math": {(ops, operands)}, "code": {words}} (from `held_out_keys`); none of them appears.
    """
    p = merge_params(NAME, DEFAULT_PARAMS, params)
    n_docs = require_int(NAME, p, "n_documents", 1)
    n_val = require_int(NAME, p, "n_validation", 1)
    lines = require_range(NAME, p, "lines_min", "lines_max", 1)
    max_chars = require_int(NAME, p, "max_chars", 16)
    operands = require_range(NAME, p, "operand_min", "operand_max", 0)
    factors = require_range(NAME, p, "factor_min", "factor_max", 2)
    consts = require_range(NAME, p, "code_const_min", "code_const_max", 1)
    code_factors = require_range(NAME, p, "code_factor_min", "code_factor_max", 2)
    mix = _weights(p["mix"], KINDS, "mix")
    chain_weights = [float(w) for w in p["chain_weights"]]
    if len(chain_weights) != 3 or any(w < 0 for w in chain_weights) or not any(chain_weights):
        raise ValueError(f"{NAME}: chain_weights must be three weights >= 0 (1, 2, 3 operations), got {p['chain_weights']!r}")
    assert_share = float(p["assert_share"])
    held_out = held_out or {}
    excluded_math = set(held_out.get("math", set()))
    excluded_code = set(held_out.get("code", set()))

    pattern_weights = _weights(p["code_pattern_weights"], code_synth.PATTERNS, "code_pattern_weights")
    spaces = []
    for name, weight in zip(code_synth.PATTERNS, pattern_weights, strict=True):
        specs = [s for s in code_synth.BUILDERS[name](consts, code_factors) if s.words not in excluded_code] if weight else []
        spaces.append(specs)
    pattern_weights = [w if space else 0.0 for w, space in zip(pattern_weights, spaces, strict=True)]

    rng = random.Random(seed)

    def line() -> str:
        kind = rng.choices(KINDS, weights=mix)[0]
        if kind == "code":
            space = rng.choices(spaces, weights=pattern_weights)[0]
            return _code(rng.choice(space), rng, assert_share)
        n_ops = rng.choices((1, 2, 3), weights=chain_weights)[0]
        problem = _draw_chain(rng, n_ops, operands, factors, excluded_math, kind)
        if kind == "equation":
            return _equation(problem, rng, excluded_math)
        if kind == "steps":
            return _steps(problem)
        if kind == "verbal":
            return _verbal(problem)
        return _narrative(problem, rng)

    out: dict[str, list[str]] = {}
    for split, count in (("train", n_docs), ("validation", n_val)):
        docs = []
        for index in range(count):
            parts: list[str] = []
            size = -1
            for _ in range(rng.choice(lines)):
                text = line()
                if parts and size + 1 + len(text) > max_chars:
                    break
                parts.append(text)
                size += 1 + len(text)
            doc = "\n".join(parts)
            check_printable(NAME, f"{split}-{index}", doc)
            docs.append(doc)
        out[split] = docs
    return out


__all__ = ["DEFAULT_PARAMS", "code_key", "comment_form", "equation_form", "generate", "held_out_keys", "math_key",
           "shows_held_out"]
