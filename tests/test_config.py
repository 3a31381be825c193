"""The Hydra app: every combination of config groups composes, the CLI answers fast and typos fail fast."""

from __future__ import annotations

import itertools
import subprocess
import sys
import time

import pytest
from omegaconf import OmegaConf

from tests.conftest import REPO, group_options

GROUPS = ["model", "domain", "merge", "eval", "logger"]


def test_every_group_has_options():
    for group in GROUPS:
        assert group_options(group), f"conf/{group}/ has no entries"


def test_every_combination_composes():
    """Every model x domain x merge combination composes and resolves; eval and logger options cycle
    through that product so that each of them is composed with many others too."""
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF_DIR

    core = list(itertools.product(*(group_options(g) for g in GROUPS[:3])))
    cycles = [itertools.cycle(group_options(g)) for g in GROUPS[3:]]
    assert core
    seen: dict[str, set] = {g: set() for g in GROUPS}
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for combo in core:
            combo = (*combo, *(next(c) for c in cycles))
            overrides = [f"{g}={o}" for g, o in zip(GROUPS, combo, strict=True)]
            cfg = compose("config", overrides=overrides)
            # Every value resolves (no missing interpolation) and each group names itself.
            OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
            for group, option in zip(GROUPS, combo, strict=True):
                assert cfg[group]["name"] == option, (group, option)
                seen[group].add(option)
            assert cfg.domain.tasks, overrides
    for group in GROUPS:
        assert seen[group] == set(group_options(group)), group


def test_domain_tasks_have_metric_and_template(compose):
    from evals.runner import synthetic_templates, task_specs

    for domain in group_options("domain"):
        cfg = compose(f"domain={domain}")
        specs = task_specs(cfg.domain)
        if cfg.domain.get("synthetic"):
            assert all(s.name in synthetic_templates() for s in specs)


def _arm(*args: str, timeout: float = 30) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "arm", *args], capture_output=True, text=True, cwd=REPO, timeout=timeout)
    return proc, time.perf_counter() - start


def test_help_is_fast_and_lists_groups():
    proc, wall = _arm("--help")
    assert proc.returncode == 0, proc.stderr
    for group in GROUPS:
        assert f"{group}:" in proc.stdout
    assert wall < 2.0, f"arm --help took {wall:.2f} s"


@pytest.mark.parametrize(
    "override, expected",
    [("model=nonexistent", "model/nonexistent"), ("merge=nosuchmethod", "merge/nosuchmethod"), ("nosuchkey=1", "nosuchkey")],
)
def test_typos_fail_fast_naming_the_key(override, expected, tmp_path):
    proc, wall = _arm(override, f"paths.root={tmp_path}")
    assert proc.returncode != 0
    assert expected in proc.stderr + proc.stdout
    assert wall < 2.0, f"'arm {override}' took {wall:.2f} s to fail"
    assert not (tmp_path / "cache").exists(), "nothing may be written for a config typo"
