"""The Hydra app: every combination of config groups composes, the CLI answers and typos fail before any work.

How fast they answer (the < 2 s goal) is measured by `make bench` (benchmarks/cli_bench.py), not here:
a wall-clock assert fails on a loaded machine whatever the code does."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from tests.conftest import REPO, group_options

GROUPS = ["model", "domain", "merge", "eval", "logger"]


def test_every_group_has_options():
    for group in GROUPS:
        assert group_options(group), f"conf/{group}/ has no entries"


def test_every_pair_of_options_composes():
    """Every model x merge pair composes and resolves, each with a domain chosen so that every model x
    domain and every domain x merge pair occurs too (42 compositions cover every pair of the three
    groups; the full product, 168 at 0.2 s each, adds only triples, and no config file reads all three
    groups). eval and logger options cycle through the list, so each is composed with many others."""
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF_DIR

    models, domains, merges = (group_options(g) for g in GROUPS[:3])
    rows = [
        (model, domains[(i + j) % len(domains)], merge)
        for i, model in enumerate(models)
        for j, merge in enumerate(merges)
    ]
    for a, b in itertools.combinations(range(3), 2):  # a covering array of strength 2: every pair occurs
        expected = set(itertools.product(*(group_options(GROUPS[g]) for g in (a, b))))
        assert {(row[a], row[b]) for row in rows} == expected, (GROUPS[a], GROUPS[b])
    cycles = [itertools.cycle(group_options(g)) for g in GROUPS[3:]]
    seen: dict[str, set] = {g: set() for g in GROUPS}
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for row in rows:
            combo = (*row, *(next(c) for c in cycles))
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


def _arm(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "arm", *args], capture_output=True, text=True, cwd=REPO, timeout=timeout)


def test_help_lists_groups_without_heavy_imports():
    proc = _arm("--help")
    assert proc.returncode == 0, proc.stderr
    for group in GROUPS:
        assert f"{group}:" in proc.stdout
    # what keeps it fast: --help imports none of the heavy libraries
    probe = subprocess.run([sys.executable, "-c", "import sys; sys.argv = ['arm', '--help']\n"
                            "import arm.run.cli\ntry:\n    arm.run.cli.main()\nexcept SystemExit:\n    pass\n"
                            "heavy = [m for m in ('torch', 'transformers', 'lm_eval', 'vllm', 'wandb', 'matplotlib') if m in sys.modules]\n"
                            "print('HEAVY', heavy)"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert "HEAVY []" in probe.stdout, probe.stdout[-500:] + probe.stderr[-2000:]


@pytest.mark.parametrize(
    "override, expected",
    [("model=nonexistent", "model/nonexistent"), ("merge=nosuchmethod", "merge/nosuchmethod"), ("nosuchkey=1", "nosuchkey")],
)
def test_typos_fail_fast_naming_the_key(override, expected, tmp_path):
    proc = _arm(override, f"paths.root={tmp_path}")
    assert proc.returncode != 0
    assert expected in proc.stderr + proc.stdout
    assert not (tmp_path / "cache").exists(), "nothing may be written for a config typo"


def test_model_domain_settings_apply_to_their_pair_only_and_yield_to_the_command_line(compose, tmp_path):
    """conf/model_domain/<model>_<domain>.yaml (tiny_math_synth: math_synth's longer SFT on the tiny model) is
    composed for that pair only, command-line overrides win over it, and `python -m arm.run.sft` reads the
    same file (same SFT keys as the composed job)."""
    import yaml

    from arm.core.specs import TrajectorySpec

    special = yaml.safe_load((REPO / "conf" / "model_domain" / "tiny_math_synth.yaml").read_text())["model"]["sft"]
    tiny = yaml.safe_load((REPO / "conf" / "model" / "tiny.yaml").read_text())["sft"]
    math = TrajectorySpec.from_config(compose("model=tiny", "domain=math_synth")).sft
    assert {k: math[k] for k in special} == special and math["lr"] == tiny["lr"]
    for overrides in (["model=tiny", "domain=code_synth"], ["model=tiny_scratch", "domain=math_synth"]):
        sft = TrajectorySpec.from_config(compose(*overrides)).sft
        assert sft["save_steps"] != special["save_steps"] and sft["epochs"] != special["epochs"], overrides
    ours = TrajectorySpec.from_config(compose("domain=math_synth", "model.sft.epochs=2", "model.sft.early_steps=[6,12]")).sft
    assert ours["epochs"] == 2 and ours["early_steps"] == [6, 12] and ours["max_train_examples"] == special["max_train_examples"]
    # the SFT CLI: a bad --set value is refused only after the same merged keys were read
    proc = subprocess.run([sys.executable, "-m", "arm.run.sft", "--domain", "math_synth", "--out", str(tmp_path / "t"),
                           "--set", "save_steps=[99999]"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2 and "2656" in proc.stderr, proc.stderr
