"""`make gpu-check` (benchmarks/gpu_check.py) without a GPU: the no-CUDA exit, and every check's code
run with CPU on both sides (`--devices cpu,cpu`) on a smaller model. The CUDA side runs only on a GPU
machine; its output is recorded in docs/reproduce.md when one is lent."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

ALL_BUT_VLLM = "merge_linear,merge_ties,merge_arm,arm_layerwise,sft_bf16_resume"


def _cuda() -> bool:
    from benchmarks.gpu_check import cuda_available

    return cuda_available()


@pytest.mark.skipif("_cuda()")
def test_without_cuda_it_says_so_and_exits_nonzero(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert "no CUDA device visible" in proc.stderr and "nothing was run" in proc.stderr
    assert not out.exists()


@pytest.mark.slow
def test_every_check_runs_with_cpu_on_both_sides(tmp_path):
    from benchmarks.gpu_check import TOLERANCE, main

    out = tmp_path / "gpu.json"
    assert main(["--devices", "cpu,cpu", "--only", ALL_BUT_VLLM, "--hidden", "64", "--layers", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["devices"] == {"reference": "cpu", "test": "cpu"} and report["model"]["hidden_size"] == 64
    checks = report["checks"]
    assert list(checks) == ALL_BUT_VLLM.split(",")
    for name, check in checks.items():
        assert check["status"] == "passed" and check["wall_s"] > 0, (name, check)
    for name in TOLERANCE:  # the same device on both sides: the same numbers
        assert checks[name]["rel"] == 0.0 and checks[name]["max_abs"] == 0.0, name
    assert checks["arm_layerwise"]["test"].endswith("'statistics': 'layerwise'}")
    sft = checks["sft_bf16_resume"]
    assert sft["resumed_from"] == "checkpoint-2" and sft["steps"] == [2, 4] and len(sft["losses"]) == 4
    assert sft["bf16"] is False  # bf16 autocast is a GPU path; on CPU the Trainer computes in float32


def test_a_difference_fails_the_comparison_and_vllm_is_required(tmp_path):
    from benchmarks.gpu_check import TOLERANCE, build_inputs, check_vllm, compare, run_checks

    arch = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 128, "tie_word_embeddings": False}
    inputs = build_inputs(tmp_path / "w", arch=arch)
    diff = compare(inputs["early"][1], inputs["early"][0], inputs["base"])
    assert diff["rel"] > max(TOLERANCE.values()) and diff["max_abs"] > 0
    from evals.runner import vllm_importable

    if not vllm_importable():
        result = check_vllm(inputs, tmp_path / "v", "cpu")
        assert result["ok"] is False and "vllm is not installed" in result["error"]
    report = run_checks(tmp_path / "b", "cpu", "cpu", budget_s=0.0, only=["merge_linear", "vllm_vs_hf"], arch=arch,
                        log=lambda _: None)
    assert {n: c["status"] for n, c in report["checks"].items()} == {"merge_linear": "skipped", "vllm_vs_hf": "skipped"}
