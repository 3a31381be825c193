"""``make bench`` (second part): ARM's cost on the embedded default against the SFT it replaces,
both timed in the same run on the same machine.

For each synthetic domain, on the tiny model's trajectory (trained once and cached by the pipeline,
like `make run`), and for each ARM formulation (conf/merge/arm.yaml with ``formulation`` set as the
headline rows of conf/tuning/embedded.yaml set it):

- ``arm_merge_s``: ARM's own work in a fresh process whose libraries (torch, transformers and the
  Qwen3 model class) are already imported: read the inputs and the calibration set, run ARM
  (statistics, rotations, every iteration, diagnostics.json) and write the merged folder; median of
  ``--runs`` runs. (diagnostics.png is drawn from the JSON after the merge, by the job or the merge
  CLI, as a report: not timed, as SFT's plots are not.) ``arm_wall_s``: the whole process, imports included;
  ``arm_peak_rss_mib``: ru_maxrss of that process (max over runs);
- ``sft_remaining_wall_s``: the SFT that ARM replaces — from the last early checkpoint c_m to the
  converged step — *re-timed in this run*: a fresh process loads c_m and trains a measured slice of
  the remaining steps (``--sft-slice`` steps after 2 untimed warm-up steps; the SFT's own batch
  size, records, learning rates, AdamW and thread count), times one validation-loss evaluation and
  one checkpoint save, and extrapolates: remaining steps × s/step + evaluations × s/eval + saves ×
  s/save (the evaluations and saves the SFT schedule does after c_m). Median of ``--runs`` slices,
  interleaved with the ARM runs (each round: the slice, then every formulation), so both see the
  same load. The clock the SFT run recorded in manifest.json is kept as ``sft_remaining_recorded_s``;
- ``ratio`` = arm_merge_s / sft_remaining_wall_s; target ≤ 0.05 for every formulation (moonshot 0.02).
  Both sides are timed the same way: the SFT estimate is steps × s/step (+ its evaluations and saves),
  without its process start, imports or model load; ARM's, without its process start and imports.
  ``ratio_process`` = arm_wall_s / sft_remaining_wall_s keeps ARM's imports in (a one-time cost per
  process, seconds here, negligible against the SFT of a real model).

The top-level keys repeat the (domain, formulation) with the largest ratio (the worst case). Writes
``benchmarks/results/arm.json`` and prints a markdown table; exits 1 when a target fails.

    python -m benchmarks.arm_bench [--runs 3] [--domains math_synth,code_synth] [--results PATH]
        [--formulations iterate_rotation,trajectory_rotation,proximal] [--sft-slice 40] [OVERRIDES...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "arm.json"
TARGET = 0.05
MOONSHOT = 0.02
# merge.* per formulation, as the headline rows of conf/tuning/embedded.yaml fix them
FORMULATIONS = {
    "iterate_rotation": {"formulation": "iterate_rotation"},
    "trajectory_rotation": {"formulation": "trajectory_rotation"},
    "proximal": {"formulation": "proximal", "rotation": "none"},
}
WARMUP_STEPS = 2

CHILD = """
import json, sys, time
start = time.perf_counter()
from pathlib import Path
import torch, transformers  # the libraries ARM imports lazily, timed apart from its own work (imports_s)
import transformers.models.qwen3.modeling_qwen3  # the model class from_pretrained imports on first use
from transformers import AutoModelForCausalLM, AutoTokenizer
from arm.merge.engine import MergeContext, merge_from_config
from arm.data.splits import DomainData
imported = time.perf_counter()
spec = json.loads(sys.argv[1])
data = DomainData(**{k: (Path(v) if k == "folder" else v) for k, v in spec["data"].items()})
context = MergeContext(calibration=data.split("train"), converged=Path(spec["converged"]), log=None)
summary = merge_from_config(spec["merge"], Path(spec["base"]), [Path(p) for p in spec["inputs"]], Path(spec["out"]),
                            progress=False, context=context)
end = time.perf_counter()
print(json.dumps({"process_s": end - start, "imports_s": imported - start, "merge_s": end - imported}))
"""


SFT_CHILD = """
import json, sys, tempfile, time
from pathlib import Path
spec = json.loads(sys.argv[1])
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from arm.trajectory.sft import _epoch_batches, _loss_sums, _save_model, collate, encode_example, evaluate_loss, lr_at
from arm.data.splits import DomainData
cfg = spec["sft"]
if cfg.get("num_threads"):
    torch.set_num_threads(int(cfg["num_threads"]))
data = DomainData(**{k: (Path(v) if k == "folder" else v) for k, v in spec["data"].items()})
train = data.split("train")[: cfg.get("max_train_examples") or None]
val = data.split("validation")[: cfg.get("max_val_examples") or None]
tok = AutoTokenizer.from_pretrained(spec["start"])
model = AutoModelForCausalLM.from_pretrained(spec["start"], dtype=torch.float32)
train_enc = [encode_example(tok, r) for r in train]
val_enc = [encode_example(tok, r) for r in val]
pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
decay = [p for p in model.parameters() if p.ndim >= 2]
no_decay = [p for p in model.parameters() if p.ndim < 2]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": float(cfg["weight_decay"])},
                         {"params": no_decay, "weight_decay": 0.0}], lr=cfg["lr"],
                        betas=tuple(float(b) for b in cfg["adam_betas"]), eps=float(cfg["adam_eps"]))
gen = torch.Generator().manual_seed(int(spec["seed"]))
lengths = [len(ids) for ids, _ in train_enc]
model.train()
step, timed, t0, c0 = spec["from_step"], 0, None, None
while timed < spec["steps"]:
    for batch in _epoch_batches(lengths, cfg["batch_size"], cfg["group_by_length"], gen):
        if step - spec["from_step"] == spec["warmup"]:
            t0, c0 = time.perf_counter(), time.process_time()
        step += 1
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        ids, labs = collate([train_enc[i] for i in batch], pad)
        loss_sum, n_tok = _loss_sums(model, ids, labs)
        opt.zero_grad(set_to_none=True)
        (loss_sum / max(n_tok, 1)).backward()
        if cfg["max_grad_norm"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(cfg["max_grad_norm"]))
        opt.step()
        float(loss_sum.detach())
        if t0 is not None:
            timed += 1
            if timed == spec["steps"]:
                break
train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0
t1, c1 = time.perf_counter(), time.process_time()
evaluate_loss(model, val_enc, pad, cfg["eval_batch_size"])
eval_s, eval_cpu_s = time.perf_counter() - t1, time.process_time() - c1
with tempfile.TemporaryDirectory() as tmp:
    model.eval()
    t2, c2 = time.perf_counter(), time.process_time()
    _save_model(model, tok, Path(tmp) / "checkpoint")
    save_s, save_cpu_s = time.perf_counter() - t2, time.process_time() - c2
print(json.dumps({"steps": timed, "train_s": train_s, "eval_s": eval_s, "save_s": save_s,
                  "train_cpu_s": train_cpu_s, "eval_cpu_s": eval_cpu_s, "save_cpu_s": save_cpu_s}))
"""


def sft_remaining_events(sft: dict[str, Any], last_early: int, converged: int) -> dict[str, int]:
    """The SFT work after c_m: optimizer steps, validation evaluations and checkpoint saves (arm.trajectory.sft's schedule)."""
    total = int(sft.get("total_steps") or converged)
    save = set(int(s) for s in sft.get("save_steps") or []) | {total}
    every = int(sft["eval_every"])
    after = range(last_early + 1, converged + 1)
    return {"steps": converged - last_early,
            "evals": sum(1 for s in after if s % every == 0 or s in save or s == total),
            "saves": sum(1 for s in after if s in save)}


def run_sft_slice(spec: dict[str, Any]) -> dict[str, float]:
    """One re-timed slice of the remaining SFT in a fresh process (see the module docstring)."""
    proc = subprocess.run([sys.executable, "-c", SFT_CHILD, json.dumps(spec)], cwd=REPO, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"SFT slice failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _compose(domain: str, overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=[f"domain={domain}", "merge=arm", "logger=none", *overrides])


def run_child(spec: dict[str, Any]) -> tuple[float, float, float, dict[str, float]]:
    """(wall s, peak RSS MiB, CPU s = user + system, the child's own clocks) of one ARM merge in a fresh process."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(spec)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"ARM merge failed:\n{stdout}\n{stderr}")
    return wall, usage.ru_maxrss / 1024.0, usage.ru_utime + usage.ru_stime, json.loads(stdout.strip().splitlines()[-1])


def bench_domain(domain: str, runs: int, overrides: list[str], formulations: list[str], slice_steps: int) -> dict[str, Any]:
    from arm.core.cache import to_plain
    from arm.core.specs import TrajectorySpec
    from arm.data.splits import ensure_data
    from arm.run.job import Paths
    from arm.trajectory.build import ensure_trajectory
    from arm.trajectory.sft import resolve_sft_config

    cfg = _compose(domain, overrides)
    paths = Paths.from_cfg(cfg, REPO / "outputs" / "runs" / "bench-arm")
    data = ensure_data(cfg["domain"], paths.cache, cfg["model"].get("prompt_format") or "plain")
    trajectory = ensure_trajectory(TrajectorySpec.from_config(cfg), data, paths.cache)
    manifest = trajectory.manifest or {}
    last_early, converged = trajectory.early[-1].step, trajectory.converged.step
    sft = manifest.get("sft") or resolve_sft_config(TrajectorySpec.from_config(cfg).sft, len(data.split("train")))
    events = sft_remaining_events(sft, last_early, converged)
    walls = {c["step"]: c.get("wall_s") for c in manifest.get("checkpoints", [])}
    recorded = (walls[converged] - walls[last_early]) if walls.get(converged) and walls.get(last_early) else None
    data_spec = {"name": data.name, "folder": str(data.folder), "key": data.key}
    sft_spec = {"sft": sft, "data": data_spec, "start": str(trajectory.early[-1].path), "from_step": last_early,
                "steps": max(1, min(slice_steps, events["steps"])), "warmup": WARMUP_STEPS,
                "seed": int(manifest.get("seed", cfg.get("seed", 0)))}

    merge_base = {**to_plain(cfg["merge"]), "overwrite": True, "device": "cpu"}
    arm_samples: dict[str, list[dict[str, float]]] = {f: [] for f in formulations}
    slices: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="arm-bench-") as tmp:
        for r in range(runs):
            sl = run_sft_slice(sft_spec)
            est, est_cpu = (events["steps"] * sl[f"train{c}_s"] / sl["steps"] + events["evals"] * sl[f"eval{c}_s"]
                            + events["saves"] * sl[f"save{c}_s"] for c in ("", "_cpu"))
            slices.append({**{k: round(v, 4) for k, v in sl.items()}, "remaining_est_s": round(est, 3),
                           "remaining_est_cpu_s": round(est_cpu, 3)})
            print(f"{domain}: round {r + 1}/{runs} SFT slice {sl['steps']} steps {sl['train_s']:.2f} s "
                  f"(eval {sl['eval_s']:.2f} s, save {sl['save_s']:.2f} s) -> remaining {est:.1f} s", flush=True)
            for form in formulations:
                spec = {
                    "merge": {**merge_base, **FORMULATIONS[form]},
                    "base": str(trajectory.base.path),
                    "inputs": [str(p) for p in trajectory.inputs],
                    "converged": str(trajectory.converged.path),
                    "out": str(Path(tmp) / f"merged-{form}"),
                    "data": data_spec,
                }
                shutil.rmtree(spec["out"], ignore_errors=True)
                wall, rss, cpu, clocks = run_child(spec)
                arm_samples[form].append({"wall_s": round(wall, 3), "peak_rss_mib": round(rss, 1),
                                          "cpu_s": round(cpu, 3), "imports_s": round(clocks["imports_s"], 3),
                                          "merge_s": round(clocks["merge_s"], 3)})
                print(f"{domain}: round {r + 1}/{runs} ARM {form} {wall:.2f} s (CPU {cpu:.2f} s) {rss:.0f} MiB",
                      flush=True)
    sft_remaining = statistics.median(x["remaining_est_s"] for x in slices)
    sft_remaining_cpu = statistics.median(x["remaining_est_cpu_s"] for x in slices)
    per_form = {}
    for form, samples in arm_samples.items():
        arm_wall = statistics.median(x["wall_s"] for x in samples)
        arm_cpu = statistics.median(x["cpu_s"] for x in samples)
        arm_merge = statistics.median(x["merge_s"] for x in samples)
        per_form[form] = {
            "arm_wall_s": round(arm_wall, 3),
            "arm_cpu_s": round(arm_cpu, 3),
            "arm_merge_s": round(arm_merge, 3),
            "ratio_process": round(arm_wall / sft_remaining, 4),
            "arm_peak_rss_mib": round(max(x["peak_rss_mib"] for x in samples), 1),
            "ratio": round(arm_merge / sft_remaining, 4),
            "ratio_cpu": round(arm_cpu / sft_remaining_cpu, 4),
            "arm_params": {k: v for k, v in {**merge_base, **FORMULATIONS[form]}.items()
                           if k not in ("device", "dtype", "overwrite", "shard_size")},
            "raw": samples,
        }
    return {
        "sft_remaining_wall_s": round(sft_remaining, 3),
        "sft_remaining_cpu_s": round(sft_remaining_cpu, 3),
        "sft_remaining_recorded_s": round(recorded, 3) if recorded is not None else None,
        "sft_steps": [last_early, converged],
        "sft_events_after_c_m": events,
        "sft_slice": {"steps": sft_spec["steps"], "warmup_steps": WARMUP_STEPS, "raw": slices},
        "trajectory": str(trajectory.folder),
        "formulations": per_form,
    }


def render(results: dict[str, Any]) -> str:
    lines = ["| domain | formulation | ARM s (process s, CPU s) | ARM peak RSS MiB | remaining SFT s, re-timed (CPU s; recorded) "
             f"| steps | ratio (target ≤ {TARGET}) | process ratio | CPU ratio |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for domain, d in results["domains"].items():
        rec = d["sft_remaining_recorded_s"]
        sft_cell = f"{d['sft_remaining_wall_s']:.1f} ({d['sft_remaining_cpu_s']:.1f}" + (
            f"; {rec:.1f})" if rec is not None else ")")
        for form, r in d["formulations"].items():
            ok = "✓" if r["ratio"] <= TARGET else "✗"
            lines.append(f"| {domain} | {form} | {r['arm_merge_s']:.2f} ({r['arm_wall_s']:.2f}, {r['arm_cpu_s']:.2f}) | "
                         f"{r['arm_peak_rss_mib']:.0f} | {sft_cell} | {d['sft_steps'][0]} → {d['sft_steps'][1]} | "
                         f"{r['ratio']:.3f} {ok} | {r['ratio_process']:.3f} | {r['ratio_cpu']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--domains", default="math_synth,code_synth")
    parser.add_argument("--formulations", default=",".join(FORMULATIONS))
    parser.add_argument("--sft-slice", type=int, default=40, help="timed SFT steps per round (after 2 warm-up steps)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (e.g. merge.iterations=8)")
    args = parser.parse_args(argv)
    domains = [d for d in args.domains.split(",") if d]
    formulations = [f for f in args.formulations.split(",") if f]
    unknown = [f for f in formulations if f not in FORMULATIONS]
    if unknown:
        parser.error(f"--formulations: {unknown[0]!r} is not one of {', '.join(FORMULATIONS)}")
    per_domain = {d: bench_domain(d, args.runs, args.overrides, formulations, args.sft_slice) for d in domains}
    cells = [(d, f) for d in per_domain for f in per_domain[d]["formulations"]]
    worst_d, worst_f = max(cells, key=lambda c: per_domain[c[0]]["formulations"][c[1]]["ratio"])
    worst = per_domain[worst_d]["formulations"][worst_f]
    results = {
        "arm_merge_s": worst["arm_merge_s"],
        "arm_wall_s": worst["arm_wall_s"],
        "arm_peak_rss_mib": worst["arm_peak_rss_mib"],
        "sft_remaining_wall_s": per_domain[worst_d]["sft_remaining_wall_s"],
        "ratio": worst["ratio"],
        "worst_domain": worst_d,
        "worst_formulation": worst_f,
        "target": TARGET,
        "moonshot": MOONSHOT,
        "all_within_target": all(per_domain[d]["formulations"][f]["ratio"] <= TARGET for d, f in cells),
        "domains": per_domain,
        "meta": {
            "runs": args.runs,
            "cpus": os.cpu_count(),
            "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
            "arm_wall": "median over runs of a fresh process: imports, calibration set, ARM, writing the folder",
            "arm_peak_rss": "max over runs of ru_maxrss of that process (os.wait4)",
            "arm_cpu": "median over runs of that process's user + system CPU seconds (os.wait4)",
            "arm_merge": "median over runs of the merge_from_config call alone (after importing torch, transformers, "
                         "the Qwen3 model class and matplotlib): ARM without interpreter start-up and imports, as the "
                         "SFT slice is timed; the target ratio",
            "process_ratio": "arm_wall (the whole process, imports included) / sft_remaining",
            "cpu_ratio": "the process ratio in CPU seconds (time.process_time in the SFT slice): less sensitive to a "
                         "busy machine than wall time; the target is stated on wall time",
            "sft_remaining": "re-timed in this run: median over runs of (remaining steps x s/step of a timed slice "
                             "from c_m + evaluations x s/eval + saves x s/save), each slice a fresh process "
                             "interleaved with the ARM runs of its round",
            "sft_remaining_recorded": "manifest.json checkpoint wall_s: converged minus last early (the SFT run's own clock)",
            "top_level": "the (domain, formulation) with the largest ratio",
        },
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(render(results))
    print(f"\nwritten {args.results}")
    return 0 if results["all_within_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
