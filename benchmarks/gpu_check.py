"""`make gpu-check`: the project's GPU paths, run once on a CUDA machine in at most ~8 minutes, one JSON.

    python -m benchmarks.gpu_check                       # writes benchmarks/results/gpu_check.json
    python -m benchmarks.gpu_check --budget-s 300 --out /tmp/gpu.json

On a small Qwen3-shaped model built here (hidden 256, 4 layers, 4/2 heads, the character tokenizer; a
bf16 base and two perturbed "early checkpoints" in the hub layout, sharded safetensors + index):

1. `merge_linear`, `merge_ties`, `merge_arm`: the merge engine on CUDA against the same merge on CPU.
   ARM (merge.statistics=model, i.e. in memory) with calibration records of math_synth.
2. `arm_layerwise`: ARM with merge.statistics=layerwise on CUDA against statistics=model on CPU.
   Each comparison: max |a − b| over all tensors and ‖a − b‖ / ‖a − base‖ (float32 outputs), passed when
   the relative difference is within TOLERANCE (set before any run; float-order differences only).
3. `vllm_vs_hf`: lm-eval on 24 math_synth documents of the base, vLLM (CUDA, float32) against hf (CUDA,
   float32): scores, and the share of identical greedy generations.
4. `sft_bf16_resume`: arm/trajectory/trainer_sft.py's Trainer SFT for 4 steps with bf16 autocast on the GPU, checkpoints
   at steps 2 and 4; then checkpoint-4 and the manifest removed and the run resumed from checkpoint-2.

Each check records its wall time; a check that would start after --budget-s is skipped. Without a CUDA
device it says so and exits 3 before building anything. Exit 0 when every check that ran passed, else 1.
`--devices cpu,cpu` runs the same code with CPU for both sides (how tests/test_gpu_check.py tests it).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "gpu_check.json"
CHECKS = ("merge_linear", "merge_ties", "merge_arm", "arm_layerwise", "vllm_vs_hf", "sft_bf16_resume")
# ‖cuda − cpu‖ / ‖merged − base‖ allowed per check (float32 math; reduction order differs by device).
# ARM goes through SVDs and rotations of activation statistics: looser.
TOLERANCE = {"merge_linear": 1e-5, "merge_ties": 1e-4, "merge_arm": 1e-2, "arm_layerwise": 1e-2}
ARCH = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 512, "tie_word_embeddings": False}
NO_CUDA_EXIT = 3


# --------------------------------------------------------------------------- the inputs


def build_inputs(work: Path, seed: int = 0, arch: dict[str, Any] | None = None) -> dict[str, Any]:
    """A bf16 base and two early checkpoints (the base + seeded noise of growing size), math_synth data."""
    import torch

    from arm.data.domains import generate_splits, write_splits
    from arm.trajectory.tiny import build_char_tokenizer, build_model

    tokenizer = build_char_tokenizer()
    model = build_model(arch or ARCH, tokenizer, seed)
    folders = {}
    for i, name in enumerate(["base", "checkpoint-1", "checkpoint-2"]):
        if i:
            gen = torch.Generator().manual_seed(seed + i)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.01 * torch.randn(p.shape, generator=gen))
        folder = work / "trajectory" / name
        model.to(torch.bfloat16).save_pretrained(folder, max_shard_size="2MB")
        tokenizer.save_pretrained(folder)
        model.to(torch.float32)
        folders[name] = folder
    data = work / "data"
    splits = generate_splits("math_synth", {"n_train": 64, "n_validation": 8, "n_test": 24}, seed)
    write_splits(splits, data)
    return {"base": folders["base"], "early": [folders["checkpoint-1"], folders["checkpoint-2"]], "data": data,
            "train": splits["train"]}


def merge_config(method: str, device: str, **extra: Any) -> dict[str, Any]:
    """conf/merge/<method>.yaml as the app composes it, on `device`, float32 output."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    overrides = [f"merge={method}", f"merge.device={device}", "merge.dtype=float32", "merge.shard_size=2MB"]
    overrides += [f"merge.{k}={v}" for k, v in extra.items()]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return OmegaConf.to_container(compose("config", overrides=overrides).merge, resolve=True)


ARM_SMALL = {"iterations": 2, "rank": 4, "calibration.n_sequences": 16, "calibration.max_length": 64,
             "calibration.max_tokens": 256}


def weights(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    out = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def compare(a: Path, b: Path, base: Path) -> dict[str, float]:
    """max |a − b|, ‖a − b‖ and ‖a − b‖ / ‖a − base‖ over every tensor (float32)."""
    wa, wb, w0 = weights(a), weights(b), weights(base)
    if sorted(wa) != sorted(wb):
        raise AssertionError(f"different tensors: {sorted(set(wa) ^ set(wb))[:5]}")
    diff2 = delta2 = 0.0
    max_abs = 0.0
    for name, ta in wa.items():
        ta, tb, t0 = ta.float(), wb[name].float(), w0[name].float()
        d = ta - tb
        diff2 += float((d * d).sum())
        delta2 += float(((ta - t0) ** 2).sum())
        max_abs = max(max_abs, float(d.abs().max()) if d.numel() else 0.0)
    return {"max_abs": max_abs, "diff_norm": math.sqrt(diff2), "rel": math.sqrt(diff2) / max(math.sqrt(delta2), 1e-30)}


# --------------------------------------------------------------------------- the checks


def check_merge(inputs: dict[str, Any], work: Path, name: str, method: str, ref_device: str, test_device: str,
                ref_extra: dict[str, Any] | None = None, test_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    from arm.merge.engine import MergeContext, merge_from_config

    context = MergeContext(calibration=inputs["train"]) if method == "arm" else None
    times = {}
    folders = {}
    for side, device, extra in (("ref", ref_device, ref_extra), ("test", test_device, test_extra)):
        out = work / name / side
        start = time.perf_counter()
        merge_from_config(merge_config(method, device, **(extra or {})), inputs["base"], inputs["early"], out,
                          progress=False, context=context)
        times[f"{side}_{device}_s"] = round(time.perf_counter() - start, 3)
        folders[side] = out
    diff = compare(folders["test"], folders["ref"], inputs["base"])
    return {"ok": diff["rel"] <= TOLERANCE[name], "tolerance": TOLERANCE[name], **diff, **times,
            "ref": f"{method} on {ref_device} {ref_extra or ''}".strip(), "test": f"{method} on {test_device} {test_extra or ''}".strip()}


def check_vllm(inputs: dict[str, Any], work: Path, device: str) -> dict[str, Any]:
    from evals.runner import TaskSpec, evaluate, read_samples, vllm_importable, write_synthetic_tasks

    if not vllm_importable():
        return {"ok": False, "error": "vllm is not installed in this venv (make install EXTRAS=dev,slurm,vllm)"}
    specs = [TaskSpec("math_synth", "exact_match", "none")]
    include = write_synthetic_tasks(specs, inputs["data"], "test", work / "tasks")
    common = {"dtype": "float32", "limit": 24, "num_fewshot": 0, "gen_kwargs": {"max_gen_toks": 16}}
    runs = {}
    for backend, cfg in (("hf", {"backend": "hf", "device": device, "batch_size": 8}),
                         ("vllm", {"backend": "vllm", "batch_size": "auto"})):
        out = work / f"eval_{backend}"
        out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        result = evaluate(inputs["base"], specs, {**common, **cfg}, out, include_path=include,
                          model_cfg={"vllm": {"tensor_parallel_size": 1, "data_parallel_size": 1, "max_model_len": 512,
                                              "gpu_memory_utilization": 0.3, "enforce_eager": True}})
        runs[backend] = {"score": result["primary"]["math_synth"]["value"], "n": result["primary"]["math_synth"]["n"],
                         "wall_s": round(time.perf_counter() - start, 3),
                         "predictions": [s["prediction"] for s in read_samples(out / "samples.jsonl")]}
    same = sum(a == b for a, b in zip(runs["hf"]["predictions"], runs["vllm"]["predictions"], strict=True))
    n = len(runs["hf"]["predictions"])
    return {"ok": runs["hf"]["score"] == runs["vllm"]["score"] and same >= 0.9 * n, "identical_generations": f"{same}/{n}",
            **{f"{b}_{k}": v for b, r in runs.items() for k, v in r.items() if k != "predictions"}}


def check_sft(inputs: dict[str, Any], work: Path, device: str) -> dict[str, Any]:
    import shutil

    from arm.trajectory.trainer_sft import train

    records = [{"prompt": r["prompt"], "response": r["response"]} for r in inputs["train"]]
    sft = {"max_steps": 4, "per_device_batch_size": 4, "grad_accum": 1, "save_steps": [2], "early_steps": [2],
           "max_length": 128, "lr": 1e-4, "logging_steps": 1, "warmup_ratio": 0.0, "bf16": True,
           "gradient_checkpointing": True, "shard_size": "2MB"}
    out = work / "sft"
    model_cfg = {"name": "gpu-check", "path": str(inputs["base"])}
    start = time.perf_counter()
    first = train(model_cfg, sft, records, out)
    first_s = time.perf_counter() - start
    shutil.rmtree(out / "checkpoint-4")
    (out / "manifest.json").unlink()
    start = time.perf_counter()
    second = train(model_cfg, sft, records, out)
    resume_s = time.perf_counter() - start
    losses = [h["loss"] for h in first["history"]]
    resumed_losses = [h["loss"] for h in second["history"]]
    resumed = str(second.get("resumed_from") or "").endswith("checkpoint-2") and second["converged_step"] == 4
    ok = resumed and all(math.isfinite(x) for x in losses) and (first["bf16"] or device != "cuda")
    return {"ok": ok, "bf16": first["bf16"], "losses": losses, "losses_after_resume": resumed_losses, "resumed_from": Path(str(second.get("resumed_from"))).name,
            "steps": second["steps"], "train_s": round(first_s, 3), "resume_s": round(resume_s, 3)}


# --------------------------------------------------------------------------- driver


def machine(test_device: str) -> dict[str, Any]:
    import torch
    import transformers

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "transformers": transformers.__version__, "cuda": torch.version.cuda}
    if test_device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update({"gpu": props.name, "gpu_gb": round(props.total_memory / 1e9, 1), "gpus": torch.cuda.device_count()})
    try:
        from importlib.metadata import version

        info["vllm"] = version("vllm")
    except Exception:
        info["vllm"] = None
    return info


def cuda_available() -> bool:
    """torch.cuda.is_available(); False at once (without importing torch) on a machine with no NVIDIA driver."""
    import shutil

    if shutil.which("nvidia-smi") is None and not Path("/dev/nvidiactl").exists():
        return False
    import torch

    return bool(torch.cuda.is_available())


def run_checks(work: Path, ref_device: str, test_device: str, budget_s: float, only: Sequence[str],
               log: Callable[[str], None] = print, arch: dict[str, Any] | None = None) -> dict[str, Any]:
    start = time.perf_counter()
    report: dict[str, Any] = {"devices": {"reference": ref_device, "test": test_device}, "budget_s": budget_s,
                              "machine": machine(test_device), "model": arch or ARCH, "checks": {}}
    t = time.perf_counter()
    inputs = build_inputs(work, arch=arch)
    report["build_inputs_s"] = round(time.perf_counter() - t, 3)
    plan: dict[str, Callable[[], dict[str, Any]]] = {
        "merge_linear": lambda: check_merge(inputs, work, "merge_linear", "linear", ref_device, test_device),
        "merge_ties": lambda: check_merge(inputs, work, "merge_ties", "ties", ref_device, test_device),
        "merge_arm": lambda: check_merge(inputs, work, "merge_arm", "arm", ref_device, test_device,
                                         {**ARM_SMALL, "statistics": "model"}, {**ARM_SMALL, "statistics": "model"}),
        "arm_layerwise": lambda: check_merge(inputs, work, "arm_layerwise", "arm", ref_device, test_device,
                                             {**ARM_SMALL, "statistics": "model"}, {**ARM_SMALL, "statistics": "layerwise"}),
        "vllm_vs_hf": lambda: check_vllm(inputs, work, test_device),
        "sft_bf16_resume": lambda: check_sft(inputs, work, test_device),
    }
    for name in CHECKS:
        if name not in only:
            continue
        elapsed = time.perf_counter() - start
        if elapsed > budget_s:
            report["checks"][name] = {"status": "skipped", "ok": None, "reason": f"budget of {budget_s:g} s spent ({elapsed:.0f} s)"}
            continue
        t = time.perf_counter()
        try:
            result = plan[name]()
            status = "passed" if result["ok"] else "failed"
        except Exception as exc:  # one failing path must not hide the others
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
            status = "failed"
        result = {"status": status, **result, "wall_s": round(time.perf_counter() - t, 3)}
        report["checks"][name] = result
        log(f"gpu-check: {name}: {status} ({result['wall_s']:.1f} s)"
            + (f" rel {result['rel']:.2e} (tolerance {result['tolerance']:g})" if "rel" in result else "")
            + (f": {result['error']}" if "error" in result else ""))
    report["total_s"] = round(time.perf_counter() - start, 3)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the JSON report (default {DEFAULT_OUT.relative_to(REPO)})")
    parser.add_argument("--budget-s", type=float, default=300.0,
                        help="no check starts after this many seconds (default 300: the last one then has ~3 of the 8 minutes)")
    parser.add_argument("--devices", default="cpu,cuda", help="reference,test devices (default cpu,cuda; tests: cpu,cpu)")
    parser.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated subset of {','.join(CHECKS)}")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    parser.add_argument("--hidden", type=int, default=ARCH["hidden_size"], help="hidden size of the model (tests: 64)")
    parser.add_argument("--layers", type=int, default=ARCH["num_hidden_layers"], help="decoder layers (tests: 2)")
    args = parser.parse_args(argv)
    ref_device, _, test_device = args.devices.partition(",")
    only = [c for c in args.only.split(",") if c]
    unknown = sorted(set(only) - set(CHECKS))
    if unknown or {ref_device, test_device} - {"cpu", "cuda"}:
        parser.error(f"unknown check(s) {unknown} or device(s) {args.devices!r} (devices: cpu, cuda)")
    if "cuda" in (ref_device, test_device) and not cuda_available():
        print("gpu-check: no CUDA device visible (torch.cuda.is_available() is False): run it on a GPU machine "
              "(`make gpu-check` there); nothing was run.", file=sys.stderr)
        return NO_CUDA_EXIT
    import tempfile

    with tempfile.TemporaryDirectory(prefix="arm-gpu-check-") as tmp:
        work = args.work or Path(tmp)
        arch = {**ARCH, "hidden_size": args.hidden, "intermediate_size": 2 * args.hidden, "num_hidden_layers": args.layers,
                "head_dim": args.hidden // ARCH["num_attention_heads"]}
        report = run_checks(work, ref_device, test_device, args.budget_s, only, arch=arch)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    ran = [c for c in report["checks"].values() if c["status"] != "skipped"]
    failed = [n for n, c in report["checks"].items() if c["status"] == "failed"]
    print(f"gpu-check: {len(ran) - len(failed)}/{len(report['checks'])} passed in {report['total_s']:.0f} s; "
          f"failed: {', '.join(failed) or 'none'}; report: {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
