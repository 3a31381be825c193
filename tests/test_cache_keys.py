"""Cache keys cover the code and the settings (docs/extending.md, "Cache keys"):

- every merge method's source is part of its merge key, baselines included: editing a rule's code (in a
  temporary copy of its module) changes its key, editing its comments or another rule's code does not;
- every eval setting is part of the eval key except those the backend declares neutral: a new backend
  setting cannot be forgotten;
- a digest ignores comments, blank lines and import statements (a move of a module keeps every key).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from arm.core.cache import normalized_source, source_digest
from arm.core.refs import ModelRef, Trajectory
from arm.merge.registry import get_method, method_names
from arm.run.stages import Paths, eval_key, merge_folder


def _trajectory() -> Trajectory:
    base = ModelRef("base", Path("/nonexistent/base"), "base-key")
    early = [ModelRef(f"sft@{s}", Path(f"/nonexistent/c{s}"), f"c{s}-key", s) for s in (1, 2)]
    return Trajectory(base=base, early=early, converged=None, folder=Path("/nonexistent"))


_COMPOSED: dict[tuple[str, ...], object] = {}


def _composed(compose, *overrides: str):
    """A Hydra composition per set of overrides, once per test run (keys are recomputed every time)."""
    if overrides not in _COMPOSED:
        _COMPOSED[overrides] = compose(*overrides)
    return _COMPOSED[overrides]


def _merge_key(compose, method: str, *overrides: str) -> str:
    cfg = _composed(compose, f"merge={method}", *overrides)
    key, _ = merge_folder(_trajectory(), cfg, Paths(Path("/tmp/r"), Path("/tmp/c"), Path("/tmp/r/run")))
    return key


def _edited_copy(monkeypatch, tmp_path: Path, module_name: str, edit) -> None:
    module = sys.modules[module_name]
    copy = tmp_path / Path(module.__file__).name
    copy.write_text(edit(Path(module.__file__).read_text()))
    monkeypatch.setattr(module, "__file__", str(copy))


@pytest.mark.parametrize("method", ["ties", "linear", "dare", "expo", "task_arithmetic", "arm"])
def test_editing_a_methods_code_changes_its_merge_key_and_only_its(compose, monkeypatch, tmp_path, method):
    cls = get_method(method)
    module_name = cls.__module__
    before = {m: _merge_key(compose, m) for m in method_names()}

    _edited_copy(monkeypatch, tmp_path, module_name, lambda s: s + "\n\n# a comment\n")
    assert _merge_key(compose, method) == before[method], "a comment changed the key"

    _edited_copy(monkeypatch, tmp_path, module_name, lambda s: s + "\nEDITED = 1\n")
    after = {m: _merge_key(compose, m) for m in method_names()}
    assert after[method] != before[method]
    # the other methods whose code does not include this module keep their keys
    for other in method_names():
        if other != method and module_name not in {m.__name__ for m in get_method(other).code_modules()}:
            assert after[other] == before[other], f"editing {module_name} changed the key of {other}"


def test_a_rule_the_method_builds_on_is_part_of_its_key():
    dare = {m.__name__ for m in get_method("dare").code_modules()}
    assert {"baselines.dare", "baselines.ties", "arm.merge.engine", "arm.merge.tensor_io"} <= dare  # DARE uses TIES' combiner
    arm = {m.__name__ for m in get_method("arm").code_modules()}
    assert {"arm.method.iteration", "arm.method.rotations", "arm.method.formulations", "arm.method.schedules",
            "arm.method.activations", "arm.method.layerwise"} <= arm
    assert not any(name.startswith("baselines") for name in arm)
    assert not {"baselines.linear", "baselines.expo"} & {m.__name__ for m in get_method("ties").code_modules()}


def test_merge_key_follows_the_parameters_not_the_layout(compose):
    base = _merge_key(compose, "ties")
    assert _merge_key(compose, "ties", "merge.density=0.3") != base
    assert _merge_key(compose, "ties", "merge.device=cpu", "merge.overwrite=true") == base


def _eval_key(compose, *overrides: str) -> str:
    cfg = compose(*overrides)
    return eval_key(ModelRef("base", Path("/nonexistent"), "model-key"), cfg, None)


def test_every_eval_setting_but_the_neutral_ones_enters_the_eval_key(compose):
    base = _eval_key(compose)
    # declared settings, and a setting nobody listed anywhere (a new backend's knob)
    for override in ("eval.batch_size=7", "eval.num_fewshot=3", "eval.limit=5", "+eval.new_backend_knob=1"):
        assert _eval_key(compose, override) != base, override
    for override in ("eval.device=cpu", "eval.log_samples=false", "eval.unsafe_code_without_sandbox=true"):
        assert _eval_key(compose, override) == base, override
    vllm = _eval_key(compose, "eval=vllm")
    assert vllm != base
    assert _eval_key(compose, "eval=vllm", "eval.vllm.enforce_eager=true") != vllm
    assert _eval_key(compose, "eval=vllm", "eval.vllm.seed=1") != vllm


def test_editing_a_backends_code_changes_the_eval_key(compose, monkeypatch, tmp_path):
    import evals.backends.hf  # noqa: F401

    base = _eval_key(compose)
    _edited_copy(monkeypatch, tmp_path, "evals.backends.hf", lambda s: s + "\nEDITED = 1\n")
    assert _eval_key(compose) != base


def test_normalized_source_ignores_comments_blank_lines_and_imports_only():
    a = "import os\nfrom arm.data import x  # where it lives\n\ndef f(y):\n    # why\n    return y + 1\n"
    moved = "import os\nfrom arm.other.place import x\n\n\ndef f(y):\n    return y + 1  # same\n"
    changed = "import os\nfrom arm.data import x\n\ndef f(y):\n    return y + 2\n"
    assert normalized_source(a) == normalized_source(moved) != normalized_source(changed)
    assert normalized_source('s = "# not a comment"\n') == 's = "# not a comment"'
    assert normalized_source("from a import (\n    b,\n    c,\n)\nX = 1\n") == "X = 1"


def test_source_digest_of_modules_functions_and_files(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("X = 1\n")
    assert source_digest(path) == source_digest(str(path))
    assert source_digest(source_digest) != source_digest(normalized_source)
    assert source_digest(sys.modules[__name__]) == source_digest(Path(__file__))


def test_an_extension_module_is_keyed_by_its_c_source(tmp_path):
    """TIES's and the numpy path's C kernels are part of their merges' code: keyed by _kernels.c (the
    compiled binary where no source sits beside it), never read as Python text."""
    import types

    from arm.merge import _kernels

    assert "arm.merge._kernels" in {m.__name__ for m in get_method("ties").code_modules()}
    assert source_digest(_kernels) == source_digest(_kernels)  # reads (a .so is not UTF-8)
    binary = tmp_path / "mod.cpython-311-x86_64-linux-gnu.so"
    binary.write_bytes(b"\x7fELF\x88 not text")
    fake = types.ModuleType("mod")
    fake.__file__ = str(binary)
    without_source = source_digest(fake)
    (tmp_path / "mod.c").write_text("int x;\n")
    with_source = source_digest(fake)
    (tmp_path / "mod.c").write_text("int y;\n")
    assert len({without_source, with_source, source_digest(fake)}) == 3


def test_trajectory_key_follows_training_not_serving(compose):
    """What SFT trains is in the trajectory key (TrajectorySpec.key_parts); how the model is served or scheduled
    (model.vllm, model.slurm) and which checkpoints feed the merge are not."""
    from arm.core.specs import TrajectorySpec
    from arm.data.splits import data_ref
    from arm.trajectory.build import trajectory_key

    def key(*overrides: str) -> str:
        spec = TrajectorySpec.from_config(compose("domain=math_synth", *overrides))
        return trajectory_key(spec, data_ref(spec.domain, Path("/nonexistent"), spec.model["prompt_format"]))

    base = key()
    for neutral in ("++model.vllm.enforce_eager=true", "++model.slurm.time=60", "model.sft.early_steps=[15,30]",
                    "merge=ties", "eval.batch_size=3"):
        assert key(neutral) == base, neutral
    for changed in ("model.sft.lr=1e-4", "seed=1", "model.arch.hidden_size=64", "domain.data.n_train=100"):
        assert key(changed) != base, changed
