"""The real domains' lm-eval tasks against the installed lm-eval, offline (only its task YAMLs are read).

Every task of every real domain (conf/domain/*.yaml with `synthetic: false`) must exist, generate text
and report the configured "<metric>,<filter>" key; the job checks the same before SFT or any model
loading. lm-eval's own HumanEval and MBPP (the `unsafe_code: true` alternative of conf/domain/code.yaml)
are marked unsafe, so the wiring matters: refused without the opt-in, accepted with it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from arm.core.errors import ConfigError
from tests.conftest import CONF_DIR

REAL_DOMAINS = sorted(p.stem for p in (CONF_DIR / "domain").glob("*.yaml")
                      if not p.stem.startswith("_") and yaml.safe_load(p.read_text()).get("synthetic") is False)
NAMED_IN_DOCS = {"gsm8k_cot_zeroshot", "minerva_math500", "humaneval_sandboxed", "mbpp_sandboxed"}


def task_config(index, name: str) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = index.task_index[name]
    return load_yaml(entry.yaml_path, resolve_func=False)


def test_real_domains_are_found() -> None:
    assert REAL_DOMAINS == ["code", "math"]


@pytest.mark.parametrize("domain", REAL_DOMAINS)
def test_every_task_of_a_real_domain_exists_generates_and_reports_its_metric(compose, lm_eval_index, domain) -> None:
    from evals.runner import task_specs
    from evals.task_index import check_real_tasks, task_metric_keys

    cfg = compose("model=qwen3-1.7b", f"domain={domain}")
    specs = task_specs(cfg.domain)
    assert specs
    for spec in specs:
        assert spec.name in lm_eval_index.task_index, f"lm-eval knows no task '{spec.name}'"
        config = task_config(lm_eval_index, spec.name)
        assert config["output_type"] == "generate_until", (spec.name, config["output_type"])
        assert spec.key in task_metric_keys(config), (spec.name, spec.key, task_metric_keys(config))
        assert not config.get("unsafe_code"), f"{spec.name}: the shipped domains score code in the sandbox"
    check_real_tasks(specs, unsafe_code=bool(cfg.domain.get("unsafe_code", False)), manager=lm_eval_index)


def test_the_benchmarks_named_in_the_docs_are_the_ones_configured(compose) -> None:
    from evals.runner import task_specs

    names = {s.name for d in REAL_DOMAINS for s in task_specs(compose("model=qwen3-1.7b", f"domain={d}").domain)}
    assert names == NAMED_IN_DOCS


def test_metric_keys_read_from_the_yaml_are_lm_evals(lm_eval_index) -> None:
    from evals.task_index import task_metric_keys

    assert task_metric_keys(task_config(lm_eval_index, "gsm8k_cot_zeroshot")) == [
        "exact_match,strict-match", "exact_match,flexible-extract"]
    assert task_metric_keys(task_config(lm_eval_index, "humaneval")) == ["pass_at_k,create_test"]  # !function: its name
    assert task_metric_keys(task_config(lm_eval_index, "mbpp")) == ["pass_at_1,none"]


@pytest.mark.parametrize("tasks, message", [
    ([{"name": "gsm8k_cot_zeroshott", "metric": "exact_match", "filter": "flexible-extract"}], "no task 'gsm8k_cot_zeroshott'"),
    ([{"name": "gsm8k_cot_zeroshot", "metric": "exact_match", "filter": "flexible_extract"}], "no metric 'exact_match,flexible_extract'"),
    ([{"name": "minerva_math500", "metric": "acc"}], "no metric 'acc,none'"),
    ([{"name": "hellaswag", "metric": "acc"}], "not a generation task"),
    ([{"name": "humaneval", "metric": "pass_at_k", "filter": "create_test"}], "domain.unsafe_code=true"),
])
def test_a_wrong_real_task_fails_the_job_before_any_work(compose, tmp_path, lm_eval_index, tasks, message) -> None:
    """Checked in run_job before SFT, trajectory or model loading: nothing is written to the cache."""
    from arm.run.job import run_job

    cfg = compose("model=qwen3-1.7b", "domain=math", "trajectory.path=/nonexistent/sft-run", f"paths.root={tmp_path}",
                  "logger=none")
    cfg.domain.tasks = tasks
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        run_job(cfg, run_dir=tmp_path / "runs" / "bad")
    assert not (tmp_path / "cache").exists()


def test_unsafe_code_opt_in_accepts_lm_evals_own_code_tasks(compose, lm_eval_index) -> None:
    from evals.runner import task_specs
    from evals.task_index import check_real_tasks

    lm_eval_own = [{"name": "humaneval", "metric": "pass_at_k", "filter": "create_test"},
                   {"name": "mbpp", "metric": "pass_at_1"}]
    for name in ("humaneval", "mbpp"):
        assert task_config(lm_eval_index, name)["unsafe_code"] is True
    specs = task_specs({"name": "code", "tasks": lm_eval_own})
    with pytest.raises(ConfigError, match="humaneval.*unisolated.*mbpp.*unisolated"):
        check_real_tasks(specs, unsafe_code=False, manager=lm_eval_index)
    check_real_tasks(specs, unsafe_code=True, manager=lm_eval_index)


def test_the_index_is_kept_on_disk_and_read_back_by_another_process(lm_eval_index, tmp_path, monkeypatch) -> None:
    """What the job's check reads in a fresh process (an `arm` run, a Slurm job) is the index lm-eval built,
    read from its file; and the file is named after evals/tasks/code/'s contents, so a changed task
    there builds a new index instead of reading a stale one."""
    import json
    import os
    import subprocess
    import sys

    from evals import task_index
    from tests.conftest import REPO

    path = task_index._index_file()
    assert path.parent == Path(os.environ[task_index.INDEX_ENV]) and path.is_file()
    saved = json.loads(path.read_text())["tasks"]
    assert saved == {name: entry.yaml_path for name, entry in lm_eval_index.task_index.items()}
    assert len(saved) > 1000 and {"gsm8k_cot_zeroshot", "humaneval_sandboxed"} <= set(saved)
    probe = ("from evals.task_index import lm_eval_task_index as f; i = f(); "
             "print(i.source, len(i.task_index), i.task_index['minerva_math500'].yaml_path)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out.split() == [str(path), str(len(saved)), saved["minerva_math500"]]

    copy = tmp_path / "code"
    shutil.copytree(task_index.CODE_TASK_DIR, copy)
    monkeypatch.setattr(task_index, "CODE_TASK_DIR", copy)
    assert task_index._index_file() == path  # the same files: the same index
    (copy / "__pycache__").mkdir(exist_ok=True)
    (copy / "__pycache__" / "utils.cpython-311.pyc").write_bytes(b"bytecode")
    assert task_index._index_file() == path  # and Python's bytecode beside them is not one of them
    victim = next(p for p in sorted(copy.rglob("*.yaml")))
    victim.write_text(victim.read_text() + "\n")
    assert task_index._index_file() != path


def test_concurrent_first_reads_build_the_index_once(tmp_path, monkeypatch) -> None:
    """Processes of one run (pytest-xdist workers, the suite's background build, a sweep's jobs) that find
    no index file at once: one builds it under the file lock, the others wait for the lock and read the
    file it wrote. Threads stand in for the processes (flock locks each open file, so they exclude one
    another the same way), and a slow stand-in for lm-eval's TaskManager keeps the first builder inside
    the lock while the others arrive."""
    import json
    import threading
    import time

    from evals import task_index

    class PerThread:  # the in-memory copy of each "process": one per thread, empty at first
        def __init__(self):
            self.local = threading.local()

        def _kept(self) -> dict:
            self.local.__dict__.setdefault("kept", {})
            return self.local.kept

        def __contains__(self, key):
            return key in self._kept()

        def __getitem__(self, key):
            return self._kept()[key]

        def __setitem__(self, key, value):
            self._kept()[key] = value

    monkeypatch.setenv(task_index.INDEX_ENV, str(tmp_path / "index"))
    monkeypatch.setattr(task_index, "_LM_EVAL_INDEX", PerThread())
    builds = []

    def slow_build(path):
        builds.append(path)
        time.sleep(0.5)
        path.write_text(json.dumps({"tasks": {"gsm8k_cot_zeroshot": "/lm_eval/tasks/gsm8k.yaml"}}))
        return task_index.TaskIndex({"gsm8k_cot_zeroshot": task_index.IndexedTask("/lm_eval/tasks/gsm8k.yaml")}, "built")

    monkeypatch.setattr(task_index, "_build_index", slow_build)
    got = []

    threads = [threading.Thread(target=lambda: got.append(task_index.lm_eval_task_index())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert builds == [task_index._index_file()]  # built once
    assert sorted(i.source for i in got) == sorted(["built", str(builds[0]), str(builds[0])])  # the others read its file
    assert all(i.task_index == got[0].task_index for i in got)
