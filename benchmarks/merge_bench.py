"""``make bench``: our merge engine against mergekit 0.1.5 and a streaming I/O floor.

1. Builds once, cached in ``benchmarks/.cache/bench-models/`` (git-ignored), a random Qwen3 model
   of about 0.5B parameters (hidden 1024, intermediate 3072, 28 layers, 16/8 heads, head_dim 64,
   vocab 151936, tied embeddings, bf16, 3 shards) and three perturbed variants c1..c3.
2. Merges them (base θ0 + c1..c3) with linear, task_arithmetic and ties, each as a whole command
   — ours: ``python -m arm.merge.cli`` (imports included, like mergekit's), mergekit:
   ``mergekit-yaml config.yml out --no-copy-tokenizer`` from its own venv — interleaved
   (for each round: every method, ours then mergekit), ``--runs`` rounds (default 3); the reported
   wall time is the median per command.
3. Peak RSS of a command is ``ru_maxrss`` of its process, from ``os.wait4`` on that one child.
4. The I/O floor: read every input tensor once (all four models, in 64 MiB blocks) and write
   one output copy (the last model's bytes), streamed, in this process (no interpreter start-up).
   It runs once untimed first, so every round finds the inputs in the page cache, then once per
   round, interleaved with the merges: immediately before that round's ``ours`` linear command
   (at the start of the round when linear is not benchmarked), so the floor has as many samples
   as every command and each sample sees the load its neighbour sees. Reported: the median, and
   the median over rounds of the paired ratio ours-linear / floor of the same round.

Writes ``benchmarks/results/merge.json`` and prints a markdown table with the ratios. Inputs and
parameters are identical for both tools: mergekit's config dtype is bfloat16 (the models'),
ours computes in float32 and writes bfloat16.

    python -m benchmarks.merge_bench                    # the official size (what make bench runs)
    python -m benchmarks.merge_bench --layers 2 --vocab 8000 --runs 1 --results /tmp/dry.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "benchmarks" / ".cache"
RESULTS = REPO / "benchmarks" / "results" / "merge.json"
METHODS = ("linear", "task_arithmetic", "ties")
TARGETS = {"linear": 0.5, "task_arithmetic": 0.5, "ties": 0.1}  # ours / mergekit wall time
FLOOR_TARGET = 2.5  # linear / I/O floor
DENSITY = 0.5


# ---------------------------------------------------------------------------------------------
# models


def model_spec(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "vocab_size": args.vocab,
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_hidden_layers": args.layers,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "tie_word_embeddings": True,
        "max_position_embeddings": 4096,
        "shards": 3,
        "seed": 0,
        "architectures": ["Qwen3ForCausalLM"],
    }


def build_models(spec: dict[str, Any], root: Path) -> tuple[Path, list[Path]]:
    """Random bf16 Qwen3 folders (config + 3 safetensors shards), written tensor by tensor."""
    folders = [root / "base"] + [root / f"checkpoint-{i}" for i in (1, 2, 3)]
    stamp = root / "spec.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == spec:
        return folders[0], folders[1:]
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from arm.merge.tensor_io import OutTensor, ShardedWriter, plan_shards

    shutil.rmtree(root, ignore_errors=True)
    config = Qwen3Config(**{k: v for k, v in spec.items() if k not in ("shards", "seed")}, dtype="bfloat16")
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in Qwen3ForCausalLM(config).state_dict().items()}
    shapes.pop("lm_head.weight", None)  # tied: save_pretrained stores the embedding only
    plan = [OutTensor(n, "BF16", s) for n, s in shapes.items()]
    total = sum(t.nbytes for t in plan)
    shard_size = -(-total // spec["shards"])
    while len(plan_shards(plan, shard_size)) > spec["shards"]:  # greedy packing: grow until it fits
        shard_size = int(shard_size * 1.01) + 1
    print(f"building 4 random Qwen3 models of {total / 2 / 1e9:.2f}B parameters in {root} ...", flush=True)
    torch.set_num_threads(1)
    tmps = [folder.with_name(folder.name + ".tmp") for folder in folders]
    writers = []
    for tmp in tmps:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        writers.append(ShardedWriter(tmp, plan, shard_size))
    for n, shape in shapes.items():
        # the base, then a random walk: c_i = c_{i-1} + 0.002 · noise_i (all four written together)
        if n.endswith("norm.weight"):
            value = torch.ones(shape)
        else:
            value = torch.randn(
                shape, generator=torch.Generator().manual_seed(_seed(spec["seed"], n, 0))
            ).mul_(0.02)
        for step, writer in enumerate(writers):
            if step:
                noise = torch.randn(
                    shape, generator=torch.Generator().manual_seed(_seed(spec["seed"], n, step))
                )
                value.add_(noise, alpha=0.002)
                del noise
            writer.write_tensor(n, value.to(torch.bfloat16))
        del value
    for writer, tmp, folder in zip(writers, tmps, folders, strict=True):
        writer.close()
        config.save_pretrained(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    stamp.write_text(json.dumps(spec))
    return folders[0], folders[1:]


def models_folder(spec: dict[str, Any], official: bool) -> Path:
    """The cache folder of a size: ``bench-models`` for the official one, else named by its shape."""
    if official:
        return CACHE / "bench-models"
    shape = "x".join(str(spec[k]) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"))
    return CACHE / f"bench-models-{shape}"


def _seed(*parts: object) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


# ---------------------------------------------------------------------------------------------
# commands


def ours_cmd(method: str, base: Path, cks: list[Path], out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "arm.merge.cli", "--method", method, "--base", str(base), "--checkpoints"]
    cmd += [str(c) for c in cks] + ["--out", str(out), "--device", "cpu", "--no-progress"]
    cmd += ["--set", "weights=[1.0, 1.0, 1.0]"]
    if method == "ties":
        cmd += ["--set", f"density={DENSITY}"]
    return cmd


def mergekit_config(method: str, base: Path, cks: list[Path]) -> str:
    per_model = {"weight": 1.0} | ({"density": DENSITY} if method == "ties" else {})
    lines = [f"merge_method: {method}", "dtype: bfloat16"]
    if method != "linear":  # mergekit's linear would average the base model in as well
        lines.append(f"base_model: {base}")
    lines.append("models:")
    for c in cks:
        lines += [f"  - model: {c}", f"    parameters: {json.dumps(per_model)}"]
    return "\n".join(lines) + "\n"


def run_timed(cmd: list[str], cwd: Path, log: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one command, which must succeed; its output goes to ``log``."""
    with open(log, "wb") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
    return wall, usage.ru_maxrss / 1024.0  # ru_maxrss is in KiB on Linux


def io_floor(folders: list[Path], out_dir: Path, block: int = 64 << 20) -> float:
    """Seconds to read every input safetensors file once and write one output copy, streamed."""
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    buf = bytearray(block)
    view = memoryview(buf)
    t0 = time.perf_counter()
    last = folders[-1]
    for folder in folders:
        for f in sorted(folder.glob("*.safetensors")):
            dst = open(out_dir / f.name, "wb") if folder == last else None  # noqa: SIM115
            with open(f, "rb", buffering=0) as src:
                while n := src.readinto(view):
                    if dst is not None:
                        dst.write(view[:n])
            if dst is not None:
                dst.close()
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# the benchmark


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=3072)
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument(
        "--runs", type=int, default=3, help="rounds; the median is reported (>= 3 for official numbers)"
    )
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--work", type=Path, default=CACHE / "bench-work", help="scratch folder for outputs")
    p.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    spec = model_spec(args)
    official = spec == model_spec(p.parse_args([]))
    models_dir = models_folder(spec, official)
    if args.build_only:
        build_models(spec, models_dir)
        return 0
    # This process stays light (no torch): a child's ru_maxrss includes the parent memory it was
    # forked from, so the models are built in a child process of their own.
    size_args = ["--hidden", str(args.hidden), "--intermediate", str(args.intermediate)]
    size_args += ["--layers", str(args.layers), "--vocab", str(args.vocab)]
    subprocess.run(
        [sys.executable, "-m", "benchmarks.merge_bench", "--build-only", *size_args], check=True, cwd=REPO
    )
    base, cks = build_models(spec, models_dir)  # cached now: returns the paths

    from benchmarks.mergekit_env import ensure_mergekit

    mergekit = ensure_mergekit()
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for method in methods:
        (work / f"{method}.yml").write_text(mergekit_config(method, base, cks))

    io_floor([base, *cks], work / "floor")  # untimed warm-up: inputs in the page cache for every round
    raw: dict[str, Any] = {m: {"ours": [], "mergekit": []} for m in methods}
    raw["io_floor_s"] = []
    raw["linear_over_floor"] = []
    floor_before = "linear" if "linear" in methods else methods[0]
    for r in range(args.runs):
        for method in methods:
            if method == floor_before:  # interleaved: right before this round's ours-linear command
                floor = io_floor([base, *cks], work / "floor")
                raw["io_floor_s"].append(round(floor, 3))
                print(f"round {r + 1}/{args.runs} {'I/O floor':16s} {'':8s} {floor:7.2f} s", flush=True)
            commands = {
                "ours": ours_cmd(method, base, cks, work / "out-ours"),
                "mergekit": [str(mergekit), str(work / f"{method}.yml"), str(work / "out-mergekit")]
                + ["--no-copy-tokenizer", "--quiet", "--device", "cpu"],
            }
            for tool, cmd in commands.items():
                shutil.rmtree(work / f"out-{tool}", ignore_errors=True)
                wall, rss = run_timed(cmd, REPO, work / f"{tool}.log")
                raw[method][tool].append({"wall_s": round(wall, 3), "peak_rss_mib": round(rss, 1)})
                if method == "linear" and tool == "ours":
                    raw["linear_over_floor"].append(round(wall / raw["io_floor_s"][-1], 4))
                print(
                    f"round {r + 1}/{args.runs} {method:16s} {tool:8s} {wall:7.2f} s {rss:8.0f} MiB",
                    flush=True,
                )
    shutil.rmtree(work, ignore_errors=True)

    results: dict[str, Any] = {}
    for method in methods:
        results[method] = {
            tool: {
                "wall_s": round(statistics.median(x["wall_s"] for x in runs), 3),
                "peak_rss_mib": round(max(x["peak_rss_mib"] for x in runs), 1),
            }
            for tool, runs in raw[method].items()
        }
    results["io_floor_s"] = round(statistics.median(raw["io_floor_s"]), 3)
    if raw["linear_over_floor"]:
        results["linear_over_floor_paired"] = round(statistics.median(raw["linear_over_floor"]), 4)
    params = sum(_param_counts(spec).values())
    results["meta"] = {
        "model": spec,
        "parameters": params,
        "runs": args.runs,
        "cpus": os.cpu_count(),
        "wall": "median over runs of the whole command (interleaved)",
        "peak_rss": "max over runs of ru_maxrss of the command's process (os.wait4)",
        "io_floor": "read all 4 input models once + write one output copy, streamed, in-process; once per round, "
        "right before that round's ours-linear command; median over rounds",
        "linear_over_floor_paired": "median over rounds of ours-linear wall / the I/O floor of the same round "
        "(what the ≤ 2.5x target is checked on)",
        "mergekit": "mergekit 0.1.5, dtype bfloat16, --no-copy-tokenizer --device cpu",
        "ours": "python -m arm.merge.cli --device cpu (float32 math, bfloat16 output)",
        "raw": raw,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(render_table(results))
    print(f"\nwritten {args.results}")
    return 0


def _param_counts(spec: dict[str, Any]) -> dict[str, int]:
    h, i, layers, v = (
        spec["hidden_size"],
        spec["intermediate_size"],
        spec["num_hidden_layers"],
        spec["vocab_size"],
    )
    q = spec["num_attention_heads"] * spec["head_dim"]
    kv = spec["num_key_value_heads"] * spec["head_dim"]
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h + 2 * spec["head_dim"]
    return {"embed": v * h, "layers": layers * per_layer, "norm": h}


def render_table(results: dict[str, Any]) -> str:
    floor = results["io_floor_s"]
    rows = [
        "| method | ours s | mergekit s | wall ratio (target) | ours RSS MiB | mergekit RSS MiB | RSS ratio (≤ 1) | ours / I/O floor |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method, target in TARGETS.items():
        if method not in results:
            continue
        o, m = results[method]["ours"], results[method]["mergekit"]
        wall_ratio = o["wall_s"] / m["wall_s"]
        rss_ratio = o["peak_rss_mib"] / m["peak_rss_mib"]
        floor_ratio = o["wall_s"] / floor
        ok = "✓" if wall_ratio <= target else "✗"
        ok_rss = "✓" if rss_ratio <= 1 else "✗"
        floor_cell = f"{floor_ratio:.2f}×"
        if method == "linear":
            paired = results.get("linear_over_floor_paired", floor_ratio)
            floor_cell = (f"{floor_ratio:.2f}×; paired {paired:.2f}× "
                          f"({'✓' if paired <= FLOOR_TARGET else '✗'} ≤ {FLOOR_TARGET}×)")
        rows.append(
            f"| {method} | {o['wall_s']:.2f} | {m['wall_s']:.2f} | {wall_ratio:.3f}× {ok} (≤ {target}×) | "
            f"{o['peak_rss_mib']:.0f} | {m['peak_rss_mib']:.0f} | {rss_ratio:.2f}× {ok_rss} | {floor_cell} |"
        )
    rows.append(f"\nI/O floor (read every input tensor once, write one output copy; median of one per round, "
                f"interleaved): {floor:.2f} s")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
