"""``make bench`` (second part): ARM's cost on the embedded default against the SFT it replaces.

For each synthetic domain, with the default ARM config (conf/merge/arm.yaml) on the tiny model's
trajectory (trained once and cached by the pipeline, like `make run`):

- ``arm_wall_s``: wall time of a fresh process that imports what it needs, reads the calibration
  set, runs ARM (statistics, rotations, every iteration, diagnostics) and writes the merged folder,
  median of ``--runs`` runs; ``arm_peak_rss_mib``: ru_maxrss of that process (max over runs);
- ``sft_remaining_wall_s``: the training wall time from the last early checkpoint to the converged
  checkpoint, as recorded by the SFT run itself in the trajectory's manifest.json (checkpoint wall_s);
- ``ratio`` = arm_wall_s / sft_remaining_wall_s (target < 0.1).

The top-level keys repeat the domain with the largest ratio (the worst case). Writes
``benchmarks/results/arm.json`` and prints a markdown table.

    python -m benchmarks.arm_bench [--runs 3] [--domains math_synth,code_synth] [--results PATH]
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
TARGET = 0.1

CHILD = """
import json, sys, time
start = time.perf_counter()
from pathlib import Path
from arm.merge_engine import MergeContext, merge_from_config
from arm.trajectory import DomainData
spec = json.loads(sys.argv[1])
data = DomainData(**{k: (Path(v) if k == "folder" else v) for k, v in spec["data"].items()})
context = MergeContext(calibration=data.split("train"), converged=Path(spec["converged"]), log=None)
summary = merge_from_config(spec["merge"], Path(spec["base"]), [Path(p) for p in spec["inputs"]], Path(spec["out"]),
                            progress=False, context=context)
print(json.dumps({"process_s": time.perf_counter() - start}))
"""


def _compose(domain: str, overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=[f"domain={domain}", "merge=arm", "logger=none", *overrides])


def run_child(spec: dict[str, Any]) -> tuple[float, float]:
    """(wall s, peak RSS MiB) of one ARM merge in a fresh process."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(spec)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"ARM merge failed:\n{stdout}\n{stderr}")
    return wall, usage.ru_maxrss / 1024.0


def bench_domain(domain: str, runs: int, overrides: list[str]) -> dict[str, Any]:
    from arm.cache import to_plain
    from arm.pipeline import Paths
    from arm.trajectory import ensure_data, ensure_trajectory

    cfg = _compose(domain, overrides)
    paths = Paths.from_cfg(cfg, REPO / "outputs" / "runs" / "bench-arm")
    data = ensure_data(cfg["domain"], paths.cache)
    trajectory = ensure_trajectory(cfg, data, paths.cache)
    manifest = trajectory.manifest
    walls = {c["step"]: c["wall_s"] for c in manifest["checkpoints"]}
    last_early, converged = trajectory.early[-1].step, trajectory.converged.step
    sft_remaining = walls[converged] - walls[last_early]

    merge_cfg = {**to_plain(cfg["merge"]), "overwrite": True, "device": "cpu"}
    samples = []
    with tempfile.TemporaryDirectory(prefix="arm-bench-") as tmp:
        spec = {
            "merge": merge_cfg,
            "base": str(trajectory.base.path),
            "inputs": [str(p) for p in trajectory.inputs],
            "converged": str(trajectory.converged.path),
            "out": str(Path(tmp) / "merged"),
            "data": {"name": data.name, "folder": str(data.folder), "key": data.key},
        }
        for r in range(runs):
            shutil.rmtree(spec["out"], ignore_errors=True)
            wall, rss = run_child(spec)
            samples.append({"wall_s": round(wall, 3), "peak_rss_mib": round(rss, 1)})
            print(f"{domain}: round {r + 1}/{runs} ARM {wall:.2f} s {rss:.0f} MiB", flush=True)
    arm_wall = statistics.median(s["wall_s"] for s in samples)
    return {
        "arm_wall_s": round(arm_wall, 3),
        "arm_peak_rss_mib": round(max(s["peak_rss_mib"] for s in samples), 1),
        "sft_remaining_wall_s": round(sft_remaining, 3),
        "ratio": round(arm_wall / sft_remaining, 4),
        "sft_steps": [last_early, converged],
        "trajectory": str(trajectory.folder),
        "arm_params": {k: v for k, v in merge_cfg.items() if k not in ("device", "dtype", "overwrite", "shard_size")},
        "raw": samples,
    }


def render(results: dict[str, Any]) -> str:
    lines = ["| domain | ARM wall s | ARM peak RSS MiB | SFT last early → converged s (steps) | ratio (target < 0.1) |",
             "|---|---:|---:|---:|---:|"]
    for domain, r in results["domains"].items():
        ok = "✓" if r["ratio"] < TARGET else "✗"
        lines.append(f"| {domain} | {r['arm_wall_s']:.2f} | {r['arm_peak_rss_mib']:.0f} | {r['sft_remaining_wall_s']:.1f} "
                     f"({r['sft_steps'][0]} → {r['sft_steps'][1]}) | {r['ratio']:.3f} {ok} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--domains", default="math_synth,code_synth")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (e.g. merge.iterations=8)")
    args = parser.parse_args(argv)
    domains = [d for d in args.domains.split(",") if d]
    per_domain = {d: bench_domain(d, args.runs, args.overrides) for d in domains}
    worst = max(per_domain, key=lambda d: per_domain[d]["ratio"])
    results = {
        **{k: per_domain[worst][k] for k in ("arm_wall_s", "arm_peak_rss_mib", "sft_remaining_wall_s", "ratio")},
        "worst_domain": worst,
        "domains": per_domain,
        "meta": {
            "runs": args.runs,
            "cpus": os.cpu_count(),
            "arm_wall": "median over runs of a fresh process: imports, calibration set, ARM, writing the folder",
            "arm_peak_rss": "max over runs of ru_maxrss of that process (os.wait4)",
            "sft_remaining": "manifest.json checkpoint wall_s: converged minus last early (the SFT run's own clock)",
            "top_level": "the domain with the largest ratio",
        },
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(render(results))
    print(f"\nwritten {args.results}")
    return 0 if results["ratio"] < TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
