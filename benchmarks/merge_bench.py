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
4. The I/O floor, like for like (benchmarks/io_floor.py): read every byte of the files our linear merge
   reads (the three checkpoints; linear does not read the base) and write one output of the same size,
   streamed. Timed two ways, each paired with ours in every round: as a whole process that starts the same
   interpreter and imports the libraries our command has loaded by its end (found by running it once), and
   in one process beside our engine called in that process (arm.merge.cli.main; one untimed warm-up of
   each). On two model sizes (the official ~0.5B and a ~1.5B one, ``--large-*``), so that the marginal
   cost per byte, (t_large − t_small) / (bytes_large − bytes_small), cancels fixed start-up costs: ours /
   floor per byte is the target (≤ 1.2×), the whole-process ratio is reported next to it.

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
TARGETS = {"linear": 0.5, "task_arithmetic": 0.5, "ties": 0.05}  # ours / mergekit wall time
BACKEND_ENV = "ARM_MERGE_BACKEND"  # =torch: our merge without its numpy path and C kernels (arm.merge.engine)
FLOOR_TARGET = 1.2  # ours-linear / I/O floor, marginal time per byte (in process)
LARGE = {"hidden": 1536, "intermediate": 8960}  # ~1.5B parameters with the official layers and vocabulary: ~3x
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


def run_timed(cmd: list[str], cwd: Path, log: Path, env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one command, which must succeed; its output goes to ``log``."""
    with open(log, "wb") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT,
                                env=None if env is None else {**os.environ, **env})
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
    return wall, usage.ru_maxrss / 1024.0  # ru_maxrss is in KiB on Linux


def digest_folder(folder: Path) -> str:
    """sha256 over the folder's safetensors files (names and bytes, in name order)."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            while block := fh.read(1 << 24):
                h.update(block)
    return h.hexdigest()


PROBE = """
import atexit, runpy, sys
atexit.register(lambda: print("@@imports@@" + ",".join(m for m in ("numpy", "torch", "safetensors", "transformers")
                                                        if m in sys.modules)))
sys.argv = ["arm.merge.cli", *sys.argv[1:]]
runpy.run_module("arm.merge.cli", run_name="__main__", alter_sys=True)
"""


def probe_imports(cmd: list[str], work: Path) -> str:
    """The heavy libraries our merge command has loaded when it ends (what the whole-process floor imports)."""
    proc = subprocess.run([sys.executable, "-c", PROBE, *cmd[3:]], cwd=REPO, capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("@@imports@@")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"probing our merge's imports failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return line[len("@@imports@@"):]


def _floor_json(text: str) -> dict[str, Any]:
    from benchmarks.io_floor import MARK

    line = next((ln for ln in text.splitlines() if ln.startswith(MARK)), None)
    if line is None:
        raise RuntimeError(f"benchmarks.io_floor printed no result:\n{text[-3000:]}")
    return json.loads(line[len(MARK):])


def floor_section(sizes: dict[str, tuple[dict[str, Any], Path, list[Path]]], runs: int, work: Path) -> dict[str, Any]:
    """ours-linear against the I/O floor on each size: whole processes paired round by round, then the
    same in one process; medians, plain ratios and the marginal per-byte ratio between the sizes."""
    from benchmarks.io_floor import input_files

    out: dict[str, Any] = {"sizes": {}}
    work.mkdir(parents=True, exist_ok=True)
    for label, (spec, base, cks) in sizes.items():
        ours = ours_cmd("linear", base, cks, work / "out-ours")
        imports = probe_imports(ours, work)
        shutil.rmtree(work / "out-ours", ignore_errors=True)
        inputs = list(cks)  # linear reads the checkpoints, not the base (arm.merge.engine._used_slots)
        read = sum(f.stat().st_size for f in input_files(inputs))
        written = sum(f.stat().st_size for f in input_files(inputs[-1:]))
        floor_cmd = [sys.executable, "-m", "benchmarks.io_floor", "--process", "--imports", imports,
                     "--inputs", *map(str, inputs), "--out", str(work / "floor")]
        whole: dict[str, list[float]] = {"floor_s": [], "ours_s": []}
        for r in range(runs):
            for key, cmd, target in (("floor_s", floor_cmd, work / "floor"), ("ours_s", ours, work / "out-ours")):
                shutil.rmtree(target, ignore_errors=True)
                wall, _ = run_timed(cmd, REPO, work / "floor.log")
                shutil.rmtree(target, ignore_errors=True)
                whole[key].append(round(wall, 3))
            print(f"floor {label} round {r + 1}/{runs}: whole process floor {whole['floor_s'][-1]:.2f} s, "
                  f"ours-linear {whole['ours_s'][-1]:.2f} s", flush=True)
        argv = json.dumps(ours[3:ours.index("--out")] + ours[ours.index("--out") + 2:])
        proc = subprocess.run([sys.executable, "-m", "benchmarks.io_floor", "--inprocess", "--rounds", str(runs),
                               "--inputs", *map(str, inputs), "--out", str(work / "floor"), "--ours-out",
                               str(work / "out-ours"), "--merge-argv", argv], cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"the in-process floor failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        rounds = _floor_json(proc.stdout)["rounds"]
        inproc = {k: [round(x[k], 3) for x in rounds] for k in ("floor_s", "ours_s")}
        print(f"floor {label} in process: floor {inproc['floor_s']} s, ours-linear {inproc['ours_s']} s", flush=True)
        med = {f"{form}_{k}": round(statistics.median(v[k]), 3) for form, v in (("whole", whole), ("inproc", inproc))
               for k in ("floor_s", "ours_s")}
        out["sizes"][label] = {"parameters": sum(_param_counts(spec).values()), "read_bytes": read,
                               "written_bytes": written, "imports": imports, **med,
                               "whole_ratio": round(med["whole_ours_s"] / med["whole_floor_s"], 3),
                               "inproc_ratio": round(med["inproc_ours_s"] / med["inproc_floor_s"], 3),
                               "raw": {"whole": whole, "inproc": inproc}}
    if {"small", "large"} <= set(out["sizes"]):
        s, l_ = out["sizes"]["small"], out["sizes"]["large"]
        moved = (l_["read_bytes"] + l_["written_bytes"]) - (s["read_bytes"] + s["written_bytes"])
        for form in ("whole", "inproc"):
            d_ours = l_[f"{form}_ours_s"] - s[f"{form}_ours_s"]
            d_floor = l_[f"{form}_floor_s"] - s[f"{form}_floor_s"]
            out[f"{form}_marginal"] = {
                "bytes": moved,
                "ours_bytes_per_s": round(moved / d_ours) if d_ours > 0 else None,
                "floor_bytes_per_s": round(moved / d_floor) if d_floor > 0 else None,
                "ours_over_floor_per_byte": round(d_ours / d_floor, 3) if d_floor > 0 and d_ours > 0 else None,
            }
    return out


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
    p.add_argument("--large-hidden", type=int, default=LARGE["hidden"], help="the I/O floor's second size")
    p.add_argument("--large-intermediate", type=int, default=LARGE["intermediate"])
    p.add_argument("--no-floor", action="store_true", help="skip the I/O floor section (two sizes)")
    p.add_argument("--floor-runs", type=int, default=5,
                   help="rounds of the I/O floor section (its marginal ratio is a difference of noisy times)")
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

    raw: dict[str, Any] = {m: {"ours": [], "mergekit": []} for m in methods}
    for r in range(args.runs):
        for method in methods:
            commands = {
                "ours": ours_cmd(method, base, cks, work / "out-ours"),
                "mergekit": [str(mergekit), str(work / f"{method}.yml"), str(work / "out-mergekit")]
                + ["--no-copy-tokenizer", "--quiet", "--device", "cpu"],
            }
            for tool, cmd in commands.items():
                shutil.rmtree(work / f"out-{tool}", ignore_errors=True)
                wall, rss = run_timed(cmd, REPO, work / f"{tool}.log")
                raw[method][tool].append({"wall_s": round(wall, 3), "peak_rss_mib": round(rss, 1)})
                print(
                    f"round {r + 1}/{args.runs} {method:16s} {tool:8s} {wall:7.2f} s {rss:8.0f} MiB",
                    flush=True,
                )
            if method == "ties" and r == 0:  # the output bytes, to check a faster TIES against (docs/merging.md)
                raw["ties_output_sha256"] = digest_folder(work / "out-ours")
    if "ties" in methods:  # the same bytes as TIES's torch path (no C kernels), timed once beside
        out = work / "out-ours"
        shutil.rmtree(out, ignore_errors=True)
        wall, rss = run_timed(ours_cmd("ties", base, cks, out), REPO, work / "ours-torch.log", {BACKEND_ENV: "torch"})
        sha = digest_folder(out)
        raw["ties_torch_path"] = {"wall_s": round(wall, 3), "peak_rss_mib": round(rss, 1), "sha256": sha,
                                  "same_bytes": sha == raw["ties_output_sha256"]}
        print(f"ties torch path ({BACKEND_ENV}=torch) {wall:7.2f} s {rss:8.0f} MiB, same bytes: "
              f"{raw['ties_torch_path']['same_bytes']}", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    floor = None
    if not args.no_floor:
        large_args = ["--hidden", str(args.large_hidden), "--intermediate", str(args.large_intermediate)]
        large_args += ["--layers", str(args.layers), "--vocab", str(args.vocab)]
        subprocess.run([sys.executable, "-m", "benchmarks.merge_bench", "--build-only", *large_args], check=True, cwd=REPO)
        large_spec = model_spec(p.parse_args(large_args))
        large_base, large_cks = build_models(large_spec, models_folder(large_spec, False))
        sizes = {"small": (spec, base, cks), "large": (large_spec, large_base, large_cks)}
        floor = floor_section(sizes, args.floor_runs, work)
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
    if floor is not None:
        results["io_floor"] = floor
    params = sum(_param_counts(spec).values())
    results["meta"] = {
        "model": spec,
        "parameters": params,
        "runs": args.runs,
        "floor_runs": None if args.no_floor else args.floor_runs,
        "cpus": os.cpu_count(),
        "wall": "median over runs of the whole command (interleaved)",
        "peak_rss": "max over runs of ru_maxrss of the command's process (os.wait4)",
        "io_floor": "benchmarks/io_floor.py: read every byte of the files ours-linear reads (the checkpoints) + write "
        "one output of the same size, in 1 MiB blocks, in as many threads as our merge's workers; whole process (same interpreter and imports) and in process "
        "(beside arm.merge.cli.main), paired with ours each round; two sizes; per byte = marginal time ratio",
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
    rows = [
        "| method | ours s | mergekit s | wall ratio (target) | ours RSS MiB | mergekit RSS MiB | RSS ratio (≤ 1) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for method, target in TARGETS.items():
        if method not in results:
            continue
        o, m = results[method]["ours"], results[method]["mergekit"]
        wall_ratio = o["wall_s"] / m["wall_s"]
        rss_ratio = o["peak_rss_mib"] / m["peak_rss_mib"]
        ok = "✓" if wall_ratio <= target else "✗"
        ok_rss = "✓" if rss_ratio <= 1 else "✗"
        rows.append(
            f"| {method} | {o['wall_s']:.2f} | {m['wall_s']:.2f} | {wall_ratio:.3f}× {ok} (≤ {target}×) | "
            f"{o['peak_rss_mib']:.0f} | {m['peak_rss_mib']:.0f} | {rss_ratio:.2f}× {ok_rss} |"
        )
    raw = results.get("meta", {}).get("raw", {})
    torch_path = raw.get("ties_torch_path")
    if torch_path:
        mark = "✓ the same bytes" if torch_path["same_bytes"] else "✗ DIFFERENT BYTES"
        rows += ["", f"TIES output sha256 {raw['ties_output_sha256'][:16]}…: {mark} as its torch path "
                     f"({BACKEND_ENV}=torch, no C kernels: {torch_path['wall_s']:.2f} s, one run)"]
    floor = results.get("io_floor")
    if floor:
        rows += ["", "I/O floor (benchmarks/io_floor.py: read every byte ours-linear reads, write one output, 1 MiB "
                     "blocks, our merge's thread count; medians, paired round by round):", "",
                 "| size | GB read + written | whole process: floor s | ours s | ratio | in process: floor s | ours s | ratio |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for label, x in floor["sizes"].items():
            moved = (x["read_bytes"] + x["written_bytes"]) / 1e9
            rows.append(f"| {label} ({x['parameters'] / 1e9:.2f}B) | {moved:.2f} | {x['whole_floor_s']:.2f} | "
                        f"{x['whole_ours_s']:.2f} | {x['whole_ratio']:.2f}× | {x['inproc_floor_s']:.2f} | "
                        f"{x['inproc_ours_s']:.2f} | {x['inproc_ratio']:.2f}× |")
        for form, name in (("inproc", "in process"), ("whole", "whole process")):
            mg = floor.get(f"{form}_marginal")
            if not mg:
                continue
            if mg["ours_over_floor_per_byte"] is None:  # the larger size was not slower: noise above the difference
                rows.append(f"\nMarginal, {name}: not measurable (a time difference between the sizes ≤ 0)")
                continue
            ratio = mg["ours_over_floor_per_byte"]
            mark = f" ({'✓' if ratio <= FLOOR_TARGET else '✗'} ≤ {FLOOR_TARGET}×)" if form == "inproc" else ""
            rows.append(f"\nMarginal, {name}: ours {mg['ours_bytes_per_s'] / 1e9:.2f} GB/s, floor "
                        f"{mg['floor_bytes_per_s'] / 1e9:.2f} GB/s: ours / floor per byte **{ratio:.2f}×**{mark}")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
