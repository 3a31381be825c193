"""Pretraining the tiny base: one recipe (corpus + architecture + schedule), one content key, one base.

The embedded default is a miniature of SFT on a pretrained model (docs/trajectory.md). Its base is
pretrained here, on CPU, from the recipe in the model config's `pretrain:` block
(conf/model/tiny.yaml), on the generated corpus of `arm.data.domains.corpus`, which holds the raw skills of
both synthetic domains in other surface forms and none of their validation or test problems. Both
domains fine-tune the same base, as one Qwen3 base serves math and code.

A researcher downloads a base rather than pretraining one, and so does the embedded default: the
result of `make pretrain` ships in the repository (`arm/assets/<model>-base/`, a few MB, with a
manifest: recipe key, corpus size, steps, wall time, skill scores, loss curve). `ensure_base` uses

  1. the shipped base, when its manifest's recipe key equals the config's;
  2. else a base pretrained earlier into the cache (`<cache>/bases/<model>-<key>/`);
  3. else it pretrains one now into the cache (`pretrain.build: auto`, minutes), or stops with a
     message naming `make pretrain` (`pretrain.build: never`).

The recipe key covers the architecture, tokenizer, corpus knobs, the held-out domains' data blocks,
the schedule, the seed and the source of the code that produces the base (the corpus generator, this
module, the tiny model, and the training functions of `arm.trajectory.sft` it calls); a merge method, an eval
setting or the SFT schedule do not enter it.

    python -m arm.run.pretrain --model tiny            # pretrain (or reuse) the base of conf/model/tiny.yaml
    python -m arm.run.pretrain --model tiny --ship     # ... and copy it to arm/assets/tiny-base/ (make pretrain)
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from arm.core.cache import atomic_write_json, build_once, content_key, source_digest, to_plain
from arm.core.errors import ConfigError
from arm.core.paths import ASSETS_DIR, CONF_DIR, read_config
from arm.data.domains import code_synth, common, corpus, generate_splits, math_synth
from arm.data.domains.code_synth import score_code
from arm.data.domains.formats import apply_format
from arm.data.domains.math_synth import score_math
from arm.trajectory import sft, tiny
from arm.trajectory.sft import greedy_generate, load_model, train_trajectory

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
BUILDS = ("auto", "never")

# The pretraining schedule's keys are arm.trajectory.sft's (same loop, loss on every token of a document).
DEFAULT_SCHEDULE: dict[str, Any] = {
    "lr": 3.0e-3,
    "schedule": "cosine",
    "min_lr_ratio": 0.05,
    "warmup_steps": 100,
    "batch_size": 32,
    "max_steps": 3000,
    "weight_decay": 0.1,
    "max_grad_norm": 1.0,
    "eval_every": 250,
    "eval_batch_size": 100,
    "group_by_length": True,
    "num_threads": 2,
}
RECIPE_KEYS = ("corpus", "schedule", "seed", "held_out", "build", "skill_eval_limit")


def recipe(model_cfg: Mapping[str, Any]) -> dict[str, Any] | None:
    """The model's pretraining recipe with defaults filled in, or None (a base trained from scratch by SFT)."""
    block = model_cfg.get("pretrain")
    if block is None:
        return None
    block = to_plain(block)
    unknown = sorted(set(block) - set(RECIPE_KEYS))
    if unknown:
        raise ConfigError("model.pretrain", f"unknown key(s) {unknown}; known: {list(RECIPE_KEYS)}")
    schedule = {**DEFAULT_SCHEDULE, **(block.get("schedule") or {})}
    build = block.get("build", "auto")
    if build not in BUILDS:
        raise ConfigError("model.pretrain.build", f"'{build}' is not one of: {', '.join(BUILDS)}")
    held_out = list(block.get("held_out") or [])
    if not held_out:
        raise ConfigError("model.pretrain.held_out", "name the synthetic domains whose validation/test problems the corpus excludes")
    return {
        "corpus": dict(block.get("corpus") or {}),
        "schedule": schedule,
        "seed": int(block.get("seed", 0)),
        "held_out": held_out,
        "build": build,
        "skill_eval_limit": block.get("skill_eval_limit"),
    }


def held_out_data(names: Sequence[str], conf_dir: Path = CONF_DIR) -> dict[str, dict[str, Any]]:
    """{generator: data block} of the held-out domains, read from conf/domain/<name>.yaml."""
    out = {}
    for name in names:
        path = Path(conf_dir) / "domain" / f"{name}.yaml"
        if not path.is_file():
            raise ConfigError("model.pretrain.held_out", f"no domain config {path}")
        conf = read_config(path)
        if not conf.get("synthetic"):
            raise ConfigError("model.pretrain.held_out", f"domain '{name}' is not synthetic (no generated splits to hold out)")
        out[str(conf.get("generator", name))] = dict(conf.get("data") or {})
    return out


def code_digest() -> str:
    """Digest of the code that produces a base's weights: the corpus generator and the domain generators
    it draws from and holds out (whole modules, with their shared helpers), the tiny model's builders,
    `pretrain` itself, and the arm.trajectory.sft functions the training loop is made of. Not the rest of
    these modules (the skill scores, the command line, SFT's saving and manifest), so fixing those does not
    orphan the shipped base; nor comments or import paths (`arm.core.cache.normalized_source`)."""

    return source_digest(corpus, math_synth, code_synth, common,
                         tiny.build_tokenizer, tiny.build_char_tokenizer, tiny.qwen3_config, tiny.build_model, pretrain,
                         sft.resolve_sft_config, sft.lr_at, sft.encode_example, sft.collate, sft._epoch_batches,
                         sft._loss_sums, sft.evaluate_loss, sft.train_trajectory, sft._train, sft.load_model)


def recipe_key(model_cfg: Mapping[str, Any], rec: Mapping[str, Any] | None = None, conf_dir: Path = CONF_DIR) -> str:
    rec = rec if rec is not None else recipe(model_cfg)
    if rec is None:
        raise ConfigError("model.pretrain", "the model has no pretraining recipe")
    identity = {
        "arch": to_plain(model_cfg.get("arch")),
        "tokenizer": model_cfg.get("tokenizer", "char"),
        "corpus": rec["corpus"],
        "schedule": rec["schedule"],
        "seed": rec["seed"],
        "held_out": held_out_data(rec["held_out"], conf_dir),
        "skill_eval_limit": rec["skill_eval_limit"],
    }
    return content_key("pretrain", identity, code_digest())


def shipped_base(model_name: str) -> Path:
    return ASSETS_DIR / f"{model_name}-base"


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def ensure_base(model_cfg: Mapping[str, Any], cache_dir: Path, conf_dir: Path = CONF_DIR) -> tuple[Path, str]:
    """(folder, recipe key) of the model's pretrained base: shipped, cached, or pretrained now."""
    rec = recipe(model_cfg)
    if rec is None:
        raise ConfigError("model.pretrain", "the model has no pretraining recipe")
    key = recipe_key(model_cfg, rec, conf_dir)
    name = str(model_cfg.get("name", "tiny"))
    shipped = shipped_base(name)
    manifest = read_manifest(shipped)
    if manifest is not None and manifest.get("recipe_key") == key:
        return shipped, key
    folder = Path(cache_dir) / "bases" / f"{name}-{key}"
    if (folder / MANIFEST_NAME).is_file():
        return folder, key
    why = (f"the shipped base {shipped} was pretrained from another recipe (key {manifest.get('recipe_key')})"
           if manifest is not None else f"no base ships at {shipped}")
    if rec["build"] == "never":
        raise ConfigError("model.pretrain", f"{why}, and model.pretrain.build=never; run `make pretrain` "
                                            f"(python -m arm.run.pretrain --model {name} --ship) for recipe key {key}")
    log.warning("%s: pretraining the %s base (recipe key %s) into %s; this takes minutes on a CPU", why, name, key, folder)
    build_once(folder, lambda tmp: pretrain(model_cfg, rec, key, tmp, conf_dir), is_complete=lambda p: (p / MANIFEST_NAME).is_file())
    return folder, key


def pretrain(model_cfg: Mapping[str, Any], rec: Mapping[str, Any], key: str, out: Path, conf_dir: Path = CONF_DIR,
             log_fn=None) -> dict[str, Any]:
    """Generate the corpus, pretrain, write the base (HF folder) and its manifest into `out`."""

    held = held_out_data(rec["held_out"], conf_dir)
    start = time.perf_counter()
    keys = corpus.held_out_keys(held)
    try:
        docs = corpus.generate(rec["corpus"], rec["seed"], keys)
    except ValueError as exc:
        raise ConfigError("model.pretrain.corpus", str(exc)) from exc
    corpus_s = time.perf_counter() - start
    splits = {split: [{"prompt": "", "response": d} for d in docs[split]] for split in ("train", "validation")}
    work = Path(out) / "_run"

    def echo(entry: dict) -> None:
        if log_fn:
            log_fn(entry)
        elif entry.get("step", 0) % 500 == 0 or "val_loss" in entry:
            log.info("pretrain %s", {k: round(v, 4) if isinstance(v, float) else v for k, v in entry.items()})

    model_cfg = {**to_plain(model_cfg), "tokenizer": model_cfg.get("tokenizer", "char")}
    try:
        run = train_trajectory(model_cfg, rec["schedule"], splits, work, seed=rec["seed"], log_fn=echo)
    except ValueError as exc:
        raise ConfigError("model.pretrain.schedule", str(exc)) from exc
    final = work / f"checkpoint-{run['total_steps']}"
    for item in final.iterdir():
        if item.name != "trainer_state.json":
            shutil.move(str(item), Path(out) / item.name)
    shutil.rmtree(work)
    n_chars = sum(len(d) for d in docs["train"])
    manifest = {
        "format": 1,
        "model": model_cfg.get("name"),
        "recipe_key": key,
        "recipe": to_plain(rec),
        "held_out_data": held,
        "corpus": {"documents": len(docs["train"]), "validation_documents": len(docs["validation"]),
                   "characters": n_chars, "generate_s": round(corpus_s, 2)},
        "steps": run["total_steps"],
        # documents are drawn in full epochs; tokens = characters + one EOS per document
        "tokens_seen": round((n_chars + len(docs["train"])) * run["epochs"]),
        "train_wall_s": run["train_wall_s"],
        "history": run["history"],
        "torch_version": run["torch_version"],
    }
    manifest["skill"] = skill_scores(Path(out), held, limit=rec["skill_eval_limit"])
    atomic_write_json(Path(out) / MANIFEST_NAME, manifest)
    return manifest


def skill_scores(folder: Path, held: Mapping[str, Mapping[str, Any]], split: str = "test", limit: int | None = None,
                 batch_size: int = 100) -> dict[str, Any]:
    """Greedy scores of a model on the held-out domains' split in two surface forms:
    `corpus_form` (the pretraining's notation: "3*7+5=", "# words\\ndef f(x):\\n") and `sft_format`
    (the chat template SFT teaches). The base should hold the skill (high corpus_form) and not the
    format (low sft_format)."""
    from concurrent.futures import ThreadPoolExecutor


    def score_code_batch(predictions, docs):  # programs run in sandbox processes: threads only wait on them
        with ThreadPoolExecutor(max_workers=2) as pool:
            return list(pool.map(score_code, predictions, docs))

    model, tokenizer = load_model(folder)
    out: dict[str, Any] = {"split": split}
    for generator, data in held.items():
        params = dict(data)
        seed = int(params.pop("seed", 0))
        records = generate_splits(generator, params, seed)[split][: limit or None]
        chat = apply_format(generator, records, "chat")
        t0 = time.perf_counter()
        if generator == "math_synth":
            forms = [corpus.equation_form(r) for r in records]
            preds = greedy_generate(model, tokenizer, [f[0] for f in forms], 6, ["\n", ","], batch_size)
            corpus_score = sum(score_math(p, f[1]) for p, f in zip(preds, forms, strict=True)) / len(records)
            preds = greedy_generate(model, tokenizer, [r["prompt"] for r in chat], 40, ["\n"], batch_size)
            sft_score = sum(score_math(p, r["answer"]) for p, r in zip(preds, chat, strict=True)) / len(records)
        else:
            preds = greedy_generate(model, tokenizer, [corpus.comment_form(r) for r in records], 48, ["\n\n"], batch_size)
            corpus_score = sum(score_code_batch(preds, records)) / len(records)
            preds = greedy_generate(model, tokenizer, [r["prompt"] for r in chat], 48, ["\n\n"], batch_size)
            sft_score = sum(score_code_batch(preds, chat)) / len(records)
        out[generator] = {"n": len(records), "corpus_form": round(corpus_score, 4), "sft_format": round(sft_score, 4),
                          "eval_s": round(time.perf_counter() - t0, 2)}
    return out


def plot_curve(manifest: Mapping[str, Any], out: Path) -> None:
    """Training and validation loss (per token, every token of a document) against the pretraining step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = manifest["history"]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    ax.plot([h["step"] for h in hist], [h["val_loss"] for h in hist], "o-", label="validation loss")
    tr = [h for h in hist if h.get("train_loss") is not None]
    ax.plot([h["step"] for h in tr], [h["train_loss"] for h in tr], alpha=0.7, label="train loss (window)")
    ax.set_yscale("log")
    ax.set_xlabel("pretraining step")
    ax.set_ylabel("loss per token")
    skill = manifest.get("skill", {})
    text = "; ".join(f"{d}: {100 * v['corpus_form']:.1f}% corpus form, {100 * v['sft_format']:.1f}% chat format"
                     for d, v in skill.items() if isinstance(v, dict))
    ax.set_title(f"tiny base: {manifest['steps']} steps, {manifest['train_wall_s']:.0f} s\n{text}", fontsize=8)
    ax.legend()
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
