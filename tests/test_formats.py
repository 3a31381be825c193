"""The exact strings the real domains train on and are prompted with, per dataset and task.

SFT side: arm/data/sft_data.py on hand-written rows in the hub datasets' schemas (tests/fixtures/). Eval
side: the prompts lm-eval itself builds (ConfigurableTask.build_all_requests) from the task YAMLs the
domains run, on fixture rows in the benchmarks' schemas: lm-eval's installed gsm8k-cot-zeroshot.yaml,
and for HumanEval and MBPP the project's sandboxed copies of lm-eval's humaneval/mbpp tasks
(evals/tasks/code/, held equal to lm-eval's by tests/test_code_tasks.py). Scores go through the tasks'
own filters and metrics. Nothing is downloaded.

The formats (docs/reproduce.md "Formats"):
- code: completion-style SFT (a docstring stating the task, then the Python program; no markdown, no
  chat template), as HumanEval (function signature + docstring, completed with code) and MBPP
  (3-shot prose task + tests, "[BEGIN]", code) are prompted for base models;
- math: the SFT prompt is gsm8k_cot_zeroshot's prompt, and the headline metric is its
  `flexible-extract` filter, which reads MetaMathQA's "The answer is: X" (its `strict-match` reads
  only "The answer is X.").
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import REPO

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CODE_TASKS = REPO / "evals" / "tasks" / "code"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def lm_eval_task(tmp_path: Path, name: str, include: Path, rows: list[dict]):
    """lm-eval's task `include` (its prompt, filters and metric) over `rows` instead of the hub dataset."""
    from lm_eval.tasks import TaskManager, get_task_dict

    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / f"{name}.yaml").write_text(
        f"include: {include}\ntask: {name}\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n    train: {data}\n")  # train: gsm8k's (unused) few-shot split
    task = get_task_dict([name], TaskManager(include_path=str(tmp_path), include_defaults=False))[name]
    task.build_all_requests(rank=0, world_size=1)
    return task


def contexts(task) -> list[str]:
    """The exact strings the model is prompted with, one per document, in document order."""
    return [inst.args[0] for inst in sorted(task.instances, key=lambda i: i.doc_id)]


def sft_records(compose, domain: str, rows: list[dict], fmt: str | None = None) -> list[dict]:
    from arm.data.sft_data import format_rows

    overrides = [f"domain={domain}"] + ([f"domain.sft_data.format={fmt}"] if fmt else [])
    return format_rows(rows, OmegaConf.to_container(compose(*overrides).domain))


# --------------------------------------------------------------------------- code: completion-style SFT


@pytest.mark.parametrize("fmt, expected", [
    ("magicoder_evol", [
        {"prompt": '"""\nWrite a Python function `is_even(n)` that returns True when n is even.\n"""\n',
         "response": "def is_even(n):\n    return n % 2 == 0\n"},
        {"prompt": '"""\nReverse a string in Python.\n"""\n', "response": "def reverse(s):\n    return s[::-1]\n"}]),
    ("magicoder_oss", [
        {"prompt": '"""\nImplement `add(a, b)` that returns the sum of two integers.\n"""\n',
         "response": "def add(a, b):\n    return a + b\n"}]),
    ("evol_instruct_code", [
        {"prompt": '"""\nCreate a function that returns the square of a number.\n"""\n',
         "response": "def square(x):\n    return x * x\n"}]),
])
def test_code_sft_strings_per_dataset(compose, fmt, expected):
    records = sft_records(compose, "code", _rows(FIXTURES / f"{fmt}.jsonl"), fmt)
    assert records == expected
    for r in records:  # prompt + response is one Python program: the docstring, then the code
        ast.parse(r["prompt"] + r["response"])
        assert "```" not in r["response"]


def test_code_sft_keeps_the_python_program_and_skips_rows_without_one(compose):
    records = sft_records(compose, "code", _rows(FIXTURES / "formats" / "magicoder_evol_mixed.jsonl"))
    assert records == [  # the JavaScript and the prose-only rows are skipped
        {"prompt": '"""\nWrite `shout(s)` returning s upper-cased, with a docstring \\"\\"\\"like this\\"\\"\\".\n"""\n',
         "response": 'def shout(s):\n    """Upper-case s."""\n    return s.upper()\n'},
        {"prompt": '"""\nAdd two numbers in Python and show how to run it.\n"""\n',
         "response": "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n"},
    ]
    for r in records:
        ast.parse(r["prompt"] + r["response"])


def test_instruction_templates_still_format_each_code_schema(compose):
    from arm.data.sft_data import format_rows

    domain = OmegaConf.to_container(compose("domain=code").domain)
    instruct = {**domain, "prompt_template": "### Instruction:\n{question}\n\n### Response:\n", "response_template": "{solution}"}
    assert format_rows(_rows(FIXTURES / "magicoder_evol.jsonl"), instruct)[1] == {
        "prompt": "### Instruction:\nReverse a string in Python.\n\n### Response:\n",
        "response": "```python\ndef reverse(s):\n    return s[::-1]\n```"}


def test_humaneval_prompt_is_code_the_sft_format_continues(compose, tmp_path):
    rows = _rows(FIXTURES / "code_tasks" / "humaneval.jsonl")[:2]
    task = lm_eval_task(tmp_path, "humaneval_fixture", CODE_TASKS / "humaneval_sandboxed.yaml", rows)
    prompts = contexts(task)
    assert prompts == [r["prompt"] for r in rows]  # the raw prompt, 0-shot, no chat template
    assert prompts[0] == (
        "from typing import List\n\n\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
        '    """ Check if in given list of numbers, are any two numbers closer to each other than\n'
        "    given threshold.\n    >>> has_close_elements([1.0, 2.0, 3.0], 0.5)\n    False\n"
        "    >>> has_close_elements([1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3)\n    True\n    \"\"\"\n")
    until = task.instances[0].args[1]["until"]
    assert until == ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
    # The SFT prompt ends the same way (a docstring, then a new line) and is answered with plain code,
    # as HumanEval's prompt is answered with the function body (its canonical solution).
    sft = sft_records(compose, "code", _rows(FIXTURES / "magicoder_evol.jsonl"))
    for prompt in prompts:
        assert prompt.endswith('"""\n')
    assert all(r["prompt"].endswith('"""\n') for r in sft)
    ast.parse(rows[0]["prompt"] + rows[0]["canonical_solution"])


def test_mbpp_prompt_is_lm_evals_three_shot_completion(tmp_path):
    from evals.scoring import lm_eval_mbpp_fewshot

    rows = _rows(FIXTURES / "code_tasks" / "mbpp.jsonl")[:1]
    task = lm_eval_task(tmp_path, "mbpp_fixture", CODE_TASKS / "mbpp_sandboxed.yaml", rows)
    prompt = contexts(task)[0]
    shots = lm_eval_mbpp_fewshot()[:3]

    def text(doc):
        tests = "\n".join(doc["test_list"][:3])
        return (f"You are an expert Python programmer, and here is your task: {doc['text']} "
                f"Your code should pass these tests:\n\n{tests}\n[BEGIN]\n")

    expected = "".join(text(s) + s["code"] + "\n[DONE]" + "\n\n" for s in shots) + text(rows[0])
    assert prompt == expected
    assert task.instances[0].args[1]["until"] == ["[DONE]"]


# --------------------------------------------------------------------------- math: gsm8k's prompt, flexible-extract


def gsm8k_task(tmp_path, rows):
    import lm_eval

    include = Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k-cot-zeroshot.yaml"
    return lm_eval_task(tmp_path, "gsm8k_cot_zeroshot_fixture", include, rows)


def score(task, responses: list[str]) -> dict[str, list[float]]:
    """Each filter's exact_match of `responses` (one per document), through the task's own filters and metric."""
    instances = sorted(task.instances, key=lambda i: i.doc_id)
    for inst, response in zip(instances, responses, strict=True):
        inst.resps = [response]
    task.apply_filters()
    docs = list(task.eval_docs)
    return {name: [task.process_results(docs[i.doc_id], [i.filtered_resps[name]])["exact_match"] for i in instances]
            for name in ("strict-match", "flexible-extract")}


def test_math_sft_prompt_is_the_gsm8k_prompt(compose, tmp_path):
    rows = _rows(FIXTURES / "gsm8k.jsonl")
    task = gsm8k_task(tmp_path, rows)
    prompts = contexts(task)
    assert prompts[0] == ("Q: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                          "How many clips did Natalia sell altogether in April and May?\nA: Let's think step by step.")
    for fmt in ("gsm8k", "metamathqa"):
        records = sft_records(compose, "math", _rows(FIXTURES / f"{fmt}.jsonl"), fmt)
        if fmt == "gsm8k":  # the same question: the same string in SFT and in evaluation
            assert [r["prompt"] for r in records] == prompts
        assert all(r["prompt"].startswith("Q: ") and r["prompt"].endswith("\nA: Let's think step by step.") for r in records)
        assert all(r["response"].startswith(" ") for r in records)  # the model's continuation after the prompt


def test_math_headline_filter_reads_the_metamathqa_answer(compose, tmp_path):
    """MetaMathQA answers end "The answer is: X": flexible-extract (the headline) scores them, strict-match cannot."""
    meta = _rows(FIXTURES / "metamathqa.jsonl")
    records = sft_records(compose, "math", meta, "metamathqa")
    gold = [r["response"].rsplit("The answer is: ", 1)[1] for r in meta]
    assert gold == ["10", "17", "15", "28"]
    docs = [{"question": m["query"], "answer": f"(worked solution)\n#### {g}"} for m, g in zip(meta, gold, strict=True)]
    task = gsm8k_task(tmp_path, docs)
    assert contexts(task) == [r["prompt"] for r in records]  # the same prompt as in SFT
    assert score(task, [r["response"] for r in records]) == {"strict-match": [0.0] * 4, "flexible-extract": [1.0] * 4}
    # A wrong final answer scores 0 under the headline filter too.
    wrong = [r["response"].rsplit("The answer is: ", 1)[0] + "The answer is: 99" for r in records]
    assert score(gsm8k_task(tmp_path / "w", docs), wrong)["flexible-extract"] == [0.0] * 4
    # gsm8k-format SFT ("The answer is 72.") is read by both filters.
    g_rows = _rows(FIXTURES / "gsm8k.jsonl")
    g_records = sft_records(compose, "math", g_rows, "gsm8k")
    assert score(gsm8k_task(tmp_path / "g", g_rows), [r["response"] for r in g_records]) == {
        "strict-match": [1.0, 1.0], "flexible-extract": [1.0, 1.0]}
    # The domain's headline (first task) is that filter.
    from evals.runner import task_specs

    assert task_specs(compose("domain=math").domain)[0].key == "exact_match,flexible-extract"
