"""The real code domain through the project's sandbox: HumanEval and MBPP as lm-eval defines them,
scored by arm.core.sandbox with pass@1 equal to lm-eval's code_eval on reference and wrong solutions.

No hub download is possible in the tests: tests/fixtures/code_tasks/ holds rows in the hub datasets'
schemas (openai/openai_humaneval; google-research-datasets/mbpp, config `full`) and completions for
them (the references and wrong ones). lm-eval's verdict is rebuilt from its own task YAMLs: the
prediction and the target it hands to `code_eval`, which executes `prediction + "\\n" + target` and
passes it when that raises nothing within 3 s (run here unisolated: these are the fixture's own
trusted programs, never a model's).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.sandbox_setup import ensure_bwrap

ensure_bwrap()

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "code_tasks"
CODE_TASKS = ROOT / "evals" / "tasks" / "code"


def _rows(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (FIXTURES / name).read_text().splitlines()]


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")


def _yaml(path: Path) -> dict[str, Any]:
    return yaml.load(path.read_text(), Loader=_Loader)


def _lm_eval_yaml(task: str) -> dict[str, Any]:
    import lm_eval

    return _yaml(Path(lm_eval.__file__).parent / "tasks" / task / f"{task}.yaml")


def _render(template: str, doc: dict[str, Any]) -> str:
    import jinja2

    return jinja2.Template(template, keep_trailing_newline=True).render(**doc)


_EXEC_WITH_TIMER = "import signal, sys\nsignal.setitimer(signal.ITIMER_REAL, 3.0)\nexec(sys.stdin.read(), {'__name__': '__main__'})"


def _code_eval_passes(program: str) -> bool:
    """code_eval's verdict: the check program raises nothing within its timeout (3.0 s, timed around
    the exec as code_eval's time_limit does, not the process start)."""
    try:
        proc = subprocess.run([sys.executable, "-c", _EXEC_WITH_TIMER], input=program, text=True, capture_output=True,
                              timeout=60, cwd=FIXTURES)
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0


def _project_hooks() -> Any:
    spec = importlib.util.spec_from_file_location("sandboxed_code_utils", CODE_TASKS / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _cases(task: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    rows = {r["task_id"]: r for r in _rows(f"{task}.jsonl")}
    return [(rows[s["task_id"]], s) for s in _rows("solutions.jsonl") if s["task_id"] in rows]


@pytest.mark.parametrize("task", ["humaneval", "mbpp"])
def test_task_yaml_is_lm_evals_with_the_projects_scorer(task: str) -> None:
    ours, theirs = _yaml(CODE_TASKS / f"{task}_sandboxed.yaml"), _lm_eval_yaml(task)
    shared = ("dataset_path", "dataset_name", "output_type", "test_split", "doc_to_text", "doc_to_target",
              "target_delimiter", "generation_kwargs", "num_fewshot", "repeats")
    assert {k: ours.get(k) for k in shared} == {k: theirs.get(k) for k in shared}
    assert ours["task"] == f"{task}_sandboxed" and "unsafe_code" not in ours
    assert ours["process_results"].startswith("!function utils.process_")
    assert [m["metric"] for m in ours["metric_list"]] == [{"humaneval": "pass@1", "mbpp": "pass_at_1"}[task]]


def test_mbpp_fewshot_examples_are_lm_evals() -> None:
    samples = _project_hooks().list_fewshot_samples()
    assert [s["task_id"] for s in samples] == [2, 3, 4] and all(s["is_fewshot"] for s in samples)
    assert _lm_eval_yaml("mbpp")["fewshot_config"]["samples"] == "!function utils.list_fewshot_samples"


def test_lm_eval_knows_the_sandboxed_tasks() -> None:
    from lm_eval.tasks import TaskManager

    from evals.task_index import CODE_TASK_DIR

    # (the runner also includes lm-eval's own tasks; indexing all of them takes ~20-40 s here)
    manager = TaskManager(include_path=str(CODE_TASK_DIR), include_defaults=False)
    assert {"humaneval_sandboxed", "mbpp_sandboxed"} <= set(manager.all_tasks)
    from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval's own reader, with `!function` resolved

    config = load_yaml(CODE_TASK_DIR / "mbpp_sandboxed.yaml")
    assert config["process_results"].__name__ == "process_mbpp" and len(config["fewshot_config"]["samples"]()) == 3


def test_humaneval_pass_at_1_equals_lm_evals() -> None:
    template = _lm_eval_yaml("humaneval")["doc_to_target"]
    hooks = _project_hooks()
    cases = _cases("humaneval")
    ours, theirs = [], []
    for doc, solution in cases:
        prediction = doc["prompt"] + solution["response"]  # lm-eval's create_test filter (build_predictions)
        theirs.append(_code_eval_passes(prediction + "\n" + _render(template, doc)))
        ours.append(hooks.process_humaneval(doc, [solution["response"]])["pass@1"] == 1.0)
    assert ours == theirs, [(s["task_id"], s["kind"], o, t) for (_, s), o, t in zip(cases, ours, theirs, strict=False) if o != t]
    kinds = [s["kind"] for _, s in cases]
    assert all(p for p, k in zip(theirs, kinds, strict=False) if k.startswith(("reference", "right")))
    assert not any(p for p, k in zip(theirs, kinds, strict=False) if k.startswith("wrong"))


def test_mbpp_pass_at_1_equals_lm_evals() -> None:
    template = _lm_eval_yaml("mbpp")["doc_to_target"]
    hooks = _project_hooks()
    cases = _cases("mbpp")
    ours, theirs = [], []
    for doc, solution in cases:
        theirs.append(_code_eval_passes(solution["response"] + "\n" + _render(template, doc)))
        ours.append(hooks.process_mbpp(doc, [solution["response"]])["pass_at_1"] == 1.0)
    assert ours == theirs, [(s["task_id"], s["kind"], o, t) for (_, s), o, t in zip(cases, ours, theirs, strict=False) if o != t]
    assert sum(theirs) == sum(1 for _, s in cases if s["kind"].startswith(("reference", "right")))


def test_a_forged_pass_that_fools_code_eval_scores_zero_here() -> None:
    """An always-equal object passes lm-eval's code_eval (it runs the asserts in the program's own
    process); here the value never reaches the comparison."""
    doc = next(r for r in _rows("mbpp.jsonl") if r["task_id"] == 17)
    forged = "class Yes:\n    def __eq__(self, other):\n        return True\ndef square_perimeter(a):\n    return Yes()\n"
    assert _code_eval_passes(forged + "\n" + _render(_lm_eval_yaml("mbpp")["doc_to_target"], doc))
    assert _project_hooks().process_mbpp(doc, [forged]) == {"pass_at_1": 0.0}
