"""Per-document scorers of the synthetic tasks, as lm-eval's `process_results` hooks.

A synthetic task's template says `process_results: !function __HOOKS__.process_results`; the runner
writes `hooks_<task>.py` next to the instantiated YAML, which takes the hook of the domain's registry
entry from here (its module's `score` under its `METRIC`), so lm-eval and the project's own diagnostics
(evals.scoring.score_records) score identically and a new domain needs no edit here.
"""

from arm.data.domains import get_generator


def scorer_hook(domain):
    """lm-eval's `process_results` for a synthetic domain: its registry entry's scorer under its metric."""
    module = get_generator(domain)

    def process_results(doc, results):
        return {module.METRIC: module.score(results[0], doc)}

    return process_results

