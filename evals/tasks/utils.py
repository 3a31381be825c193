"""Per-document scorers of the synthetic tasks, as lm-eval's `process_results` hooks.

The runner copies this file next to the instantiated task YAMLs; the scoring itself lives in
evals.scoring so that lm-eval and the project's quick diagnostics score identically.
"""

from evals.scoring import score_code, score_math


def process_math(doc, results):
    return {"exact_match": score_math(results[0], doc["answer"])}


def process_code(doc, results):
    return {"pass@1": score_code(results[0], doc)}
