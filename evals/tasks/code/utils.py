"""lm-eval hooks of the sandboxed HumanEval and MBPP tasks: scoring by evals.scoring (the project's
sandboxed executor), few-shot examples read from lm-eval's own MBPP task without importing it (its
module loads `code_eval` from the hub at import)."""

from evals.scoring import lm_eval_mbpp_fewshot, score_humaneval, score_mbpp


def process_humaneval(doc, results):
    return {"pass@1": score_humaneval(results[0], doc)}


def process_mbpp(doc, results):
    return {"pass_at_1": score_mbpp(results[0], doc)}


def list_fewshot_samples():
    return lm_eval_mbpp_fewshot()
