"""Test set-up shared by the suite: offline everything, outputs under a temporary folder."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"

# Nothing may reach a hub or W&B's servers from the tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One id per test run, set by the first process (pytest, or pytest-xdist's controller) and inherited by
# the run's other processes (the xdist workers, the CLI subprocesses).
RUN_ID = os.environ.setdefault("ARM_TESTS_RUN_ID", f"{os.getpid()}-{os.urandom(3).hex()}")
# lm-eval's task index (evals.task_index.lm_eval_task_index) is built once per test run, shared by the
# run's processes through a folder of the run's own.
os.environ["ARM_LM_EVAL_INDEX"] = str(Path(tempfile.gettempdir()) / f"arm-tests-lm-eval-index-{RUN_ID}")

_INDEX_BUILD: list[subprocess.Popen] = []


def pytest_sessionstart(session):
    """The first process of the run starts building lm-eval's task index in the background (~17 s of one
    core): the tests that read it (the real-task checks, plans of real domains) then find it built, or
    wait on its file lock, instead of one worker building it while the other waits for it. Only for a run
    of the whole suite (`make test`, `make test-fast`): a run of a few files builds it when it needs it."""
    config = session.config
    whole = not config.args or any(Path(a).resolve() == REPO / "tests" for a in config.args)
    if hasattr(config, "workerinput") or config.option.collectonly or not whole:
        return
    code = "from evals.task_index import lm_eval_task_index; lm_eval_task_index()"
    _INDEX_BUILD.append(subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.DEVNULL))


def pytest_sessionfinish(session):
    for proc in _INDEX_BUILD:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def group_options(group: str) -> list[str]:
    """The selectable entries of a config group (files starting with '_' are shared fragments)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


@pytest.fixture
def compose():
    """Compose the app's config as `arm` would, with overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    def _compose(*overrides: str, return_hydra_config: bool = False):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)

    return _compose


@pytest.fixture(scope="session")
def lm_eval_index():
    """lm-eval's task index (its built-in tasks and evals/tasks/code/), built once per test run: the same
    object the job's real-task check uses (evals.task_index.lm_eval_task_index: kept per process and in
    $ARM_LM_EVAL_INDEX, set above)."""
    from evals.task_index import lm_eval_task_index

    return lm_eval_task_index()


@pytest.fixture(scope="session")
def shared_root(tmp_path_factory) -> Path:
    """One outputs root for the whole test run, shared by its pytest-xdist workers (the folder above each
    worker's own temporary root): its cache holds the small math_synth and code_synth trajectories, each
    trained once, and their reference evaluations, reused by every test that only needs *a* trajectory
    (their jobs pass paths.cache=<shared_root>/cache; the content keys make them hits; the cache's file
    locks make a concurrent second build wait and read). The tests on it check their own entries (keys,
    `created` times, modification times), never the folder's listing, which another worker may be adding
    to. Never modify what it holds."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"
    root.mkdir(exist_ok=True)
    return root


@pytest.fixture(scope="session")
def small_math_job(shared_root):
    """The small math_synth job (tests.helpers.SMALL: 24 SFT steps, 4 references evaluated with lm-eval,
    W&B offline), run once per test run in `shared_root` by the first worker that asks for it; the others
    read what it returned (runs/math.json). Never modify its outputs."""
    import json

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from arm.core.cache import atomic_write_json, file_lock
    from arm.run.job import run_job
    from tests.helpers import SMALL

    returned = shared_root / "runs" / "math.json"
    with file_lock(shared_root / "small_math_job.lock"):
        if not returned.is_file():
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                cfg = hydra_compose("config", overrides=[*SMALL, f"paths.root={shared_root}", "domain=math_synth",
                                                         "logger=wandb"])
            out = run_job(cfg, run_dir=shared_root / "runs" / "math")
            atomic_write_json(returned, json.loads(json.dumps(out, default=str)))
    return json.loads(returned.read_text())
