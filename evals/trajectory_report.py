"""Score and loss along an SFT trajectory: a fast diagnostic of the tiny default.

    python -m evals.trajectory_report <trajectory_dir> --domain math_synth --split test \\
        --out docs/figures/trajectory_math_synth.png --json trajectory_math_synth.json

Greedy-decodes the base and every saved checkpoint on a split (batched, left padding, stop at EOS,
then cut at the task's `until` strings, with `max_gen_toks` from evals/tasks/<domain>.yaml, as the
lm-eval runner does), scores with evals.scoring, and plots the validation loss (manifest history)
and the score against the step, marking the early checkpoints (merge inputs) and the converged one.
The official numbers come from the lm-eval runner; this uses the same prompts, decoding and scorers.

The split comes from `--data-dir` (<split>.jsonl files) or, by default, is regenerated from the
domain's `data:` block in conf/domain/<domain>.yaml (its `seed` plus the generator knobs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from arm.core.paths import CONF_DIR, read_config
from arm.data.domains import generate_splits, read_split
from arm.data.domains.formats import apply_format
from arm.trajectory.sft import greedy_generate
from evals.scoring import score_records

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
DOMAIN_CONF_DIR = CONF_DIR / "domain"


# --------------------------------------------------------------------------- inputs


def _load_yaml(path: Path) -> dict:
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    # lm-eval's `!function module.name` tag: keep the name as a string.
    _Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    with open(path, encoding="utf-8") as handle:
        return yaml.load(handle, Loader=_Loader) or {}


def generation_settings(domain: str) -> dict[str, Any]:
    """`until` and `max_gen_toks` of the domain's lm-eval task (evals/tasks/<domain>.yaml)."""
    path = TASKS_DIR / f"{domain}.yaml"
    if not path.exists():
        raise ValueError(f"no lm-eval task file {path} for domain {domain!r}")
    kwargs = _load_yaml(path).get("generation_kwargs") or {}
    until = kwargs.get("until") or []
    if isinstance(until, str):
        until = [until]
    return {"until": list(until), "max_gen_toks": int(kwargs.get("max_gen_toks", 256))}


def domain_split(domain: str, split: str, data_dir: Path | None = None, prompt_format: str = "plain") -> list[dict]:
    """The records of one split: from `<data_dir>/<split>.jsonl`, or regenerated from the domain config
    in the given prompt format (the model config's `prompt_format`)."""

    if data_dir is not None:
        return read_split(Path(data_dir) / f"{split}.jsonl")
    conf = DOMAIN_CONF_DIR / f"{domain}.yaml"
    if not conf.exists():
        raise ValueError(f"no domain config {conf}; pass --data-dir")
    data = dict(read_config(conf).get("data") or {})
    seed = int(data.pop("seed", 0))
    return apply_format(domain, generate_splits(domain, data, seed)[split], prompt_format)


def trajectory_models(trajectory_dir: Path) -> tuple[dict, list[dict]]:
    """(manifest, [{"name", "step", "path", "val_loss"}]) for base + every saved checkpoint."""
    trajectory_dir = Path(trajectory_dir)
    manifest_path = trajectory_dir / "manifest.json"
    if not manifest_path.exists():
        raise ValueError(f"{trajectory_dir} has no manifest.json (not a trajectory written by arm.trajectory.sft)")
    manifest = json.loads(manifest_path.read_text())
    history = {h["step"]: h for h in manifest.get("history", [])}
    models = [
        {
            "name": "base",
            "step": 0,
            "path": str(trajectory_dir / manifest.get("base", "base")),
            "val_loss": history.get(0, {}).get("val_loss"),
        }
    ]
    for ckpt in manifest["checkpoints"]:
        models.append(
            {
                "name": ckpt["path"],
                "step": ckpt["step"],
                "path": str(trajectory_dir / ckpt["path"]),
                "val_loss": ckpt.get("val_loss"),
            }
        )
    return manifest, models


# --------------------------------------------------------------------------- decoding and scoring


def score_predictions(domain: str, predictions: Sequence[str], records: Sequence[Mapping]) -> list[float]:
    """Scores by the domain's registry entry (arm/data/domains/<domain>.py `score`)."""

    return score_records(domain, list(predictions), list(records))


def quick_scores(
    trajectory_dir: Path,
    domain: str,
    split: str = "validation",
    records: Sequence[Mapping] | None = None,
    data_dir: Path | None = None,
    limit: int | None = None,
    batch_size: int = 128,
    num_threads: int | None = None,
    prompt_format: str = "plain",
) -> dict[str, Any]:
    """Score base + every checkpoint of a trajectory on a split. Returns
    {"domain", "split", "n", "early_steps", "converged_step", "train_wall_s",
     "models": [{"name", "step", "path", "val_loss", "score", "eval_s"}], "samples": {name: [first 5]}}."""
    import torch
    from transformers.utils import logging as hf_logging

    bars, threads = hf_logging.is_progress_bar_enabled(), torch.get_num_threads()
    hf_logging.disable_progress_bar()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        return _quick_scores(trajectory_dir, domain, split, records, data_dir, limit, batch_size, prompt_format)
    finally:
        torch.set_num_threads(threads)
        if bars:
            hf_logging.enable_progress_bar()


def _quick_scores(trajectory_dir, domain, split, records, data_dir, limit, batch_size, prompt_format="plain") -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest, models = trajectory_models(Path(trajectory_dir))
    if records is None:
        records = domain_split(domain, split, data_dir, prompt_format)
    records = list(records)[: limit or None]
    settings = generation_settings(domain)
    prompts = [r["prompt"] for r in records]
    samples = {}
    for entry in models:
        t0 = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(entry["path"])
        model = AutoModelForCausalLM.from_pretrained(entry["path"], dtype=torch.float32)
        preds = greedy_generate(model, tokenizer, prompts, settings["max_gen_toks"], settings["until"], batch_size)
        scores = score_predictions(domain, preds, records)
        entry["score"] = sum(scores) / max(len(scores), 1)
        entry["eval_s"] = round(time.perf_counter() - t0, 2)
        samples[entry["name"]] = [
            {"prompt": r["prompt"], "prediction": p, "target": r["response"]} for r, p in zip(records[:5], preds, strict=False)
        ]
    return {
        "domain": domain,
        "split": split,
        "n": len(records),
        "early_steps": manifest.get("early_steps", []),
        "converged_step": manifest.get("converged_step"),
        "train_wall_s": manifest.get("train_wall_s"),
        "models": models,
        "samples": samples,
    }


# --------------------------------------------------------------------------- geometry


def trajectory_geometry(trajectory_dir: Path) -> dict[str, Any]:
    """Where SFT went, in weight space: ‖c* − θ0‖ / ‖θ0‖ (how far SFT moves the base) and, for each early
    checkpoint c_m, ‖c_m − θ0‖ / ‖c* − θ0‖ and cos(c_m − θ0, c* − θ0) (does the early update point where
    SFT ends up?). Over every floating-point tensor of the model (tied weights once)."""
    import math

    from safetensors.numpy import load_file

    manifest, models = trajectory_models(Path(trajectory_dir))

    def weights(path: str) -> dict:
        return {k: v.astype("float64") for k, v in load_file(str(Path(path) / "model.safetensors")).items()
                if v.dtype.kind == "f"}

    by_step = {m["step"]: m for m in models}
    base = weights(by_step[0]["path"])
    converged = weights(by_step[manifest["converged_step"]]["path"])
    names = sorted(set(base) & set(converged))

    def dot(a: dict, b: dict) -> float:
        return math.fsum(float((a[k] * b[k]).sum()) for k in names)

    d_conv = {k: converged[k] - base[k] for k in names}
    norm_base, norm_conv = math.sqrt(dot(base, base)), math.sqrt(dot(d_conv, d_conv))
    out: dict[str, Any] = {"rel_update": norm_conv / norm_base, "update_norm": norm_conv, "base_norm": norm_base, "early": []}
    for step in manifest.get("early_steps", []):
        early = weights(by_step[step]["path"])
        d_early = {k: early[k] - base[k] for k in names}
        norm_early = math.sqrt(dot(d_early, d_early))
        out["early"].append({"step": step, "rel_to_converged_update": norm_early / norm_conv,
                             "cos_to_converged_update": dot(d_early, d_conv) / (norm_early * norm_conv)})
    return out


# --------------------------------------------------------------------------- plot


_PLOTS: dict[str, bytes] = {}  # this process's rendered plots by their inputs (a sweep's jobs plot the same ones)


def plot_trajectory(manifest: Mapping, result: Mapping, out: Path, title: str | None = None) -> None:
    """Loss along the trajectory over the references' scores (PNG at `out`). The same inputs in one process
    (every job of a sweep on one trajectory) write the bytes rendered the first time."""
    import hashlib

    shown = {k: manifest.get(k) for k in ("history", "early_steps", "converged_step", "train_wall_s")}
    key = hashlib.sha256(json.dumps([shown, result, title], sort_keys=True, default=str).encode()).hexdigest()
    if key not in _PLOTS:
        if len(_PLOTS) >= 16:
            _PLOTS.pop(next(iter(_PLOTS)))
        _PLOTS[key] = _render_trajectory(manifest, result, title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(_PLOTS[key])


def _render_trajectory(manifest: Mapping, result: Mapping, title: str | None) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = manifest.get("history", [])
    fig, (ax_loss, ax_score) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    steps = [h["step"] for h in history if h.get("val_loss") is not None]
    ax_loss.plot(steps, [h["val_loss"] for h in history if h.get("val_loss") is not None], label="validation loss")
    tr = [h for h in history if h.get("train_loss") is not None]
    ax_loss.plot([h["step"] for h in tr], [h["train_loss"] for h in tr], alpha=0.6, label="train loss")
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel("loss (response tokens)")
    ax_loss.legend(loc="upper right")
    models = result["models"]
    ax_score.plot([m["step"] for m in models], [100 * m["score"] for m in models], "o-", label=f"{result['split']} score")
    ax_score.set_ylabel(f"{result['domain']} {result['split']} score (%)")
    ax_score.set_xlabel("SFT step")
    for ax in (ax_loss, ax_score):
        for i, step in enumerate(manifest.get("early_steps", [])):
            ax.axvline(step, color="tab:orange", ls="--", lw=1, label="early (merge input)" if i == 0 else None)
        ax.axvline(manifest["converged_step"], color="tab:green", ls="-", lw=1, label="converged")
    ax_score.legend(loc="lower right")
    ax_score.set_ylim(0, 100)
    fig.suptitle(title or f"{result['domain']}: tiny SFT trajectory ({manifest.get('train_wall_s', 0):.0f} s train)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def format_table(result: Mapping) -> str:
    early = set(result.get("early_steps", []))
    lines = ["| checkpoint | step | val loss | score | role |", "|---|---:|---:|---:|---|"]
    for m in result["models"]:
        role = "base" if m["name"] == "base" else "early" if m["step"] in early else ""
        if m["step"] == result.get("converged_step"):
            role = "converged"
        loss = f"{m['val_loss']:.4f}" if m.get("val_loss") is not None else "-"
        lines.append(f"| {m['name']} | {m['step']} | {loss} | {100 * m['score']:.1f}% | {role} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evals.trajectory_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("trajectory_dir", type=Path)
    parser.add_argument("--domain", required=True)
    parser.add_argument("--split", default="validation", choices=["validation", "test"])
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers as JSON")
    parser.add_argument("--data-dir", type=Path, default=None, help="folder with <split>.jsonl (default: regenerate)")
    parser.add_argument("--format", default="plain", choices=["plain", "chat"],
                        help="prompt format of the trajectory's model (model.prompt_format; tiny: chat, tiny_scratch: plain)")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--scores", type=Path, default=None, help="re-plot the scores of an earlier --json file")
    parser.add_argument("--title", default=None, help="plot title")
    args = parser.parse_args(argv)
    try:
        if args.scores:
            manifest = json.loads((args.trajectory_dir / "manifest.json").read_text())
            result = json.loads(args.scores.read_text())
            result.update(early_steps=manifest.get("early_steps", []), converged_step=manifest.get("converged_step"))
        else:
            result = quick_scores(
                args.trajectory_dir,
                args.domain,
                args.split,
                data_dir=args.data_dir,
                limit=args.limit,
                batch_size=args.batch_size,
                num_threads=args.threads,
                prompt_format=args.format,
            )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    manifest = json.loads((args.trajectory_dir / "manifest.json").read_text())
    result["geometry"] = trajectory_geometry(args.trajectory_dir)
    plot_trajectory(manifest, result, args.out, title=args.title)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))
    conv = next((m for m in result["models"] if m["step"] == result["converged_step"]), None)
    if conv and conv["score"] > 0:
        ratios = [m["score"] / conv["score"] for m in result["models"] if m["step"] in set(result["early_steps"])]
        print("early/converged score ratio: " + ", ".join(f"{r:.2f}" for r in ratios))
    geo = result["geometry"]
    print(f"geometry: ||c* - theta0|| / ||theta0|| = {geo['rel_update']:.4f}; "
          + "; ".join(f"step {e['step']}: cos(c_m - theta0, c* - theta0) = {e['cos_to_converged_update']:.3f}, "
                      f"||c_m - theta0|| / ||c* - theta0|| = {e['rel_to_converged_update']:.3f}" for e in geo["early"]))
    print(f"n={result['n']} split={result['split']} train_wall_s={result['train_wall_s']} plot={args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
