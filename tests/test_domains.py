"""Tests of the synthetic domain generators and their JSONL split files."""

from __future__ import annotations

import json
import os
import string
import subprocess
import sys
from pathlib import Path

import pytest

from arm.data.domains import DOMAINS, generate_splits, get_generator, read_split, write_splits
from arm.data.domains.code_synth import reference_program
from arm.data.domains.common import SPLITS
from arm.data.domains.math_synth import evaluate

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"n_train": 300, "n_validation": 60, "n_test": 60}


@pytest.fixture(scope="module", params=sorted(DOMAINS))
def domain_splits(request: pytest.FixtureRequest) -> tuple[str, dict[str, list[dict]]]:
    return request.param, generate_splits(request.param, SMALL, seed=7)


def test_get_generator_unknown_name_lists_known() -> None:
    with pytest.raises(ValueError, match=r"'nope'.*math_synth.*code_synth"):
        get_generator("nope")
    assert get_generator("math_synth") is DOMAINS["math_synth"]


def test_requested_sizes_and_ids(domain_splits: tuple[str, dict]) -> None:
    name, splits = domain_splits
    assert list(splits) == list(SPLITS)
    for split in SPLITS:
        records = splits[split]
        assert len(records) == SMALL[f"n_{split}"]
        assert [r["id"] for r in records] == [f"{name}-{split}-{i}" for i in range(len(records))]


def test_deterministic_in_process(domain_splits: tuple[str, dict]) -> None:
    name, splits = domain_splits
    again = generate_splits(name, SMALL, seed=7)
    assert json.dumps(again) == json.dumps(splits)
    assert json.dumps(generate_splits(name, SMALL, seed=8)) != json.dumps(splits)


def test_deterministic_across_processes(domain_splits: tuple[str, dict]) -> None:
    name, splits = domain_splits
    code = (
        "import json, sys; from arm.data.domains import generate_splits; "
        f"sys.stdout.write(json.dumps(generate_splits({name!r}, {SMALL!r}, seed=7)))"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout == json.dumps(splits)


def test_splits_are_disjoint(domain_splits: tuple[str, dict]) -> None:
    name, splits = domain_splits
    seen_prompts: dict[str, str] = {}
    seen_problems: dict[str, str] = {}
    for split in SPLITS:
        for record in splits[split]:
            if name == "math_synth":
                problem = json.dumps([record["ops"], record["operands"]])
            else:
                problem = record["response"]
            assert seen_prompts.setdefault(record["prompt"], split) == split, record
            assert seen_problems.setdefault(problem, split) == split, record
    assert len(seen_prompts) == sum(SMALL.values())
    assert len(seen_problems) == sum(SMALL.values())


def test_records_are_printable_and_short(domain_splits: tuple[str, dict]) -> None:
    _, splits = domain_splits
    allowed = set(string.printable)
    for split in SPLITS:
        for record in splits[split]:
            assert set(record["prompt"]) <= allowed and set(record["response"]) <= allowed
            assert len(record["prompt"]) <= 48 and len(record["response"]) <= 40


def test_math_answers_are_correct() -> None:
    splits = generate_splits("math_synth", {**SMALL, "two_step_share": 0.5}, seed=3)
    for split in SPLITS:
        for record in splits[split]:
            value = evaluate(record["ops"], record["operands"])
            assert value is not None and value >= 0
            assert record["answer"] == str(value) and record["response"] == f" {value}"
            assert record["prompt"].endswith("\nA:")
            # independent check: the numbers in the prompt are the operands, in order
            numbers = [int(t.strip(".,")) for t in record["prompt"].split() if t.strip(".,").isdigit()]
            assert numbers == record["operands"]
    two_step = sum(len(r["operands"]) == 3 for r in splits["train"])
    assert 100 <= two_step <= 200


def test_math_knobs_restrict_problems() -> None:
    params = {**SMALL, "operations": ["add"], "two_step_share": 0.0, "operand_min": 10, "operand_max": 40}
    for record in generate_splits("math_synth", params, seed=1)["train"]:
        assert record["ops"] == ["add"] and all(10 <= v <= 40 for v in record["operands"])


def test_code_references_pass_their_tests() -> None:
    splits = generate_splits("code_synth", SMALL, seed=7)
    for split in SPLITS:
        for record in splits[split]:
            assert record["prompt"].endswith(record["code_prefix"]) and record["entry_point"] == "f"
            assert 4 <= len(record["tests"]) <= 6
            namespace: dict = {}
            exec(reference_program(record), namespace)  # our own generated reference code
            for test in record["tests"]:
                exec(test, namespace)


def test_code_examples_pattern_states_a_linear_function_by_values() -> None:
    """The `examples` pattern: f(0), f(1), f(2) given; the slope and intercept must be inferred."""
    params = {**SMALL, "pattern_weights": {"examples": 1}}
    for record in generate_splits("code_synth", params, seed=3)["test"]:
        assert record["pattern"] == "examples"
        namespace: dict = {}
        exec(reference_program(record), namespace)  # our own generated reference code
        for test in record["tests"]:
            exec(test, namespace)
        stated = record["prompt"].split("\n")[0]
        for x in (0, 1, 2):
            assert f"f({x})={namespace['f'](x)}" in stated


def test_code_parity_tests_cover_even_and_odd() -> None:
    params = {**SMALL, "pattern_weights": {"parity": 1}}
    for record in generate_splits("code_synth", params, seed=2)["test"]:
        assert record["pattern"] == "parity"
        inputs = [int(t.split("f(")[1].split(")")[0]) for t in record["tests"]]
        assert {x % 2 for x in inputs} == {0, 1}


@pytest.mark.parametrize("name", sorted(DOMAINS))
def test_unknown_param_is_named(name: str) -> None:
    with pytest.raises(ValueError, match="'n_trian'"):
        generate_splits(name, {"n_trian": 10}, seed=0)


def test_too_small_problem_space_raises() -> None:
    math_params = {
        "n_train": 500,
        "n_validation": 10,
        "n_test": 10,
        "operations": ["add"],
        "two_step_share": 0.0,
    }
    with pytest.raises(ValueError, match="problem space"):
        generate_splits("math_synth", {**math_params, "operand_min": 1, "operand_max": 9}, seed=0)
    code_params = {"n_train": 100, "n_validation": 10, "n_test": 10, "pattern_weights": {"abs": 1}}
    with pytest.raises(ValueError, match="problem space"):
        generate_splits("code_synth", {**code_params, "const_min": 1, "const_max": 2}, seed=0)


def test_bad_param_values_raise() -> None:
    with pytest.raises(ValueError, match="'operations'"):
        generate_splits("math_synth", {"operations": ["div"]}, seed=0)
    with pytest.raises(ValueError, match="'operand_max'"):
        generate_splits("math_synth", {"operand_min": 50, "operand_max": 10}, seed=0)
    with pytest.raises(ValueError, match="'pattern_weights'"):
        generate_splits("code_synth", {"pattern_weights": {"loops": 1}}, seed=0)


def test_write_read_round_trip(tmp_path: Path, domain_splits: tuple[str, dict]) -> None:
    name, splits = domain_splits
    paths = write_splits(splits, tmp_path / name)
    assert {p.name for p in paths.values()} == {"train.jsonl", "validation.jsonl", "test.jsonl"}
    assert sorted(p.name for p in (tmp_path / name).iterdir()) == [
        "test.jsonl",
        "train.jsonl",
        "validation.jsonl",
    ]
    for split, path in paths.items():
        assert read_split(path) == splits[split]
    first = paths["train"].read_bytes()
    write_splits(splits, tmp_path / name)
    assert paths["train"].read_bytes() == first


def test_read_split_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(ValueError, match="missing.jsonl"):
        read_split(missing)
    corrupt = tmp_path / "train.jsonl"
    corrupt.write_text('{"id": "a", "prompt": "p", "response": "r"}\n{"id": oops\n')
    with pytest.raises(ValueError, match=r"train\.jsonl, line 2"):
        read_split(corrupt)
