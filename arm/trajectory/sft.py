"""Supervised fine-tuning of the tiny model: one trajectory from the base to convergence.

`train_trajectory` trains on a finite training split for several epochs (sequence = prompt +
response + EOS, no BOS; loss only on the response tokens and the EOS), measures the validation loss
at regular intervals, and writes the trajectory the rest of the harness reads:

    out_dir/base/                 the initial model (HF format: safetensors, tokenizer, generation_config)
    out_dir/checkpoint-<step>/    HF format + trainer_state.json, as transformers' Trainer names them
    out_dir/manifest.json         steps, losses, wall times, early (merge input) and converged steps

The loop is plain PyTorch (no Trainer): a fixed-length epoch schedule, AdamW, linear warm-up then
the `schedule` (cosine decay to `min_lr_ratio * lr` at the last step by default; constant; wsd:
arm/trajectory/schedules.py). Deterministic for a given seed on one machine.
The `sft:` keys are documented in conf/model/tiny.yaml (`DEFAULT_SFT` below holds their defaults).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from arm.trajectory.schedules import check_schedule, lr_at  # noqa: F401 - lr_at: the loop's schedule, used here
from arm.trajectory.tiny import build_model, build_tokenizer, greedy_generation_config

IGNORE_INDEX = -100
MANIFEST_NAME = "manifest.json"
TRAINER_STATE_NAME = "trainer_state.json"

DEFAULT_SFT: dict[str, Any] = {
    "lr": 3e-3,
    "min_lr_ratio": 0.0,  # the learning rate at the last step, as a fraction of lr
    "schedule": "cosine",  # cosine | linear | constant | wsd, after the warm-up (arm/trajectory/schedules.py)
    "decay_fraction": 0.2,  # wsd: the share of the steps in the decay phase (the last ones)
    "decay_shape": "linear",  # wsd: linear | cosine | 1-sqrt
    "warmup_steps": 50,
    "batch_size": 64,
    "epochs": 10,  # total steps = epochs * ceil(n_train / batch_size)
    "max_steps": None,  # if set, overrides epochs
    "weight_decay": 0.1,  # on matrices only (not norms)
    "adam_betas": [0.9, 0.98],
    "adam_eps": 1e-8,
    "max_grad_norm": 1.0,
    "save_steps": [],  # checkpoint-<step> folders; the final step is always saved
    "early_steps": [],  # the early checkpoints used as merge inputs (a subset of save_steps)
    "eval_every": 50,  # validation loss every N steps (and at every save step)
    "eval_batch_size": 128,
    "max_val_examples": None,  # cap on validation examples used for the loss (None: all)
    "max_train_examples": None,  # SFT on the first N records of the training split only (None: all)
    "group_by_length": True,  # batches of similar length (less padding), order still seeded
    "num_threads": None,  # torch.set_num_threads (None: leave torch's default)
}


# --------------------------------------------------------------------------- configuration


def resolve_sft_config(sft_cfg: Mapping[str, Any] | None, n_train: int) -> dict[str, Any]:
    """Defaults + `sft_cfg`, with the schedule resolved (`total_steps`, `steps_per_epoch`) and checked.

    Raises ValueError naming the offending key.
    """
    cfg = dict(DEFAULT_SFT)
    given = dict(sft_cfg or {})
    unknown = sorted(set(given) - set(DEFAULT_SFT))
    if unknown:
        raise ValueError(f"sft: unknown key(s) {unknown}; known: {sorted(DEFAULT_SFT)}")
    cfg.update(given)
    if n_train <= 0:
        raise ValueError("sft: the training split is empty")
    if cfg["max_train_examples"] is not None:
        cap = cfg["max_train_examples"]
        if isinstance(cap, bool) or not isinstance(cap, int) or cap <= 0:
            raise ValueError(f"sft.max_train_examples must be a positive integer or null, got {cap!r}")
        n_train = min(n_train, cap)
    for key in ("batch_size", "eval_every", "eval_batch_size"):
        if not isinstance(cfg[key], int) or cfg[key] <= 0:
            raise ValueError(f"sft.{key} must be a positive integer, got {cfg[key]!r}")
    check_schedule(cfg)
    if float(cfg["lr"]) <= 0:
        raise ValueError(f"sft.lr must be positive, got {cfg['lr']!r}")
    steps_per_epoch = math.ceil(n_train / cfg["batch_size"])
    if cfg["max_steps"] is not None:
        if not isinstance(cfg["max_steps"], int) or cfg["max_steps"] <= 0:
            raise ValueError(f"sft.max_steps must be a positive integer or null, got {cfg['max_steps']!r}")
        total = int(cfg["max_steps"])
    else:
        if not isinstance(cfg["epochs"], (int, float)) or cfg["epochs"] <= 0:
            raise ValueError(f"sft.epochs must be positive, got {cfg['epochs']!r}")
        total = max(1, round(float(cfg["epochs"]) * steps_per_epoch))
    if not isinstance(cfg["warmup_steps"], int) or not 0 <= cfg["warmup_steps"] < total:
        raise ValueError(f"sft.warmup_steps must be an integer in [0, {total}), got {cfg['warmup_steps']!r}")

    save_steps = _int_list(cfg["save_steps"], "save_steps")
    early_steps = _int_list(cfg["early_steps"], "early_steps")
    if save_steps != sorted(set(save_steps)):
        raise ValueError(f"sft.save_steps must be strictly increasing, got {save_steps}")
    bad = [s for s in save_steps if not 0 < s <= total]
    if bad:
        raise ValueError(f"sft.save_steps {bad} outside 1..{total} (total steps for n_train={n_train})")
    if early_steps != sorted(set(early_steps)):
        raise ValueError(f"sft.early_steps must be strictly increasing, got {early_steps}")
    missing = [s for s in early_steps if s not in save_steps]
    if missing:
        raise ValueError(f"sft.early_steps {missing} are not in sft.save_steps {save_steps}")
    if early_steps and early_steps[-1] >= total:
        raise ValueError(f"sft.early_steps must lie before the final step {total}, got {early_steps}")
    if total not in save_steps:
        save_steps.append(total)
    cfg.update(
        save_steps=save_steps,
        early_steps=early_steps,
        total_steps=total,
        steps_per_epoch=steps_per_epoch,
        lr=float(cfg["lr"]),
    )
    return cfg


def _int_list(value: Any, key: str) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence | list | tuple):
        try:
            value = list(value)
        except TypeError:
            raise ValueError(f"sft.{key} must be a list of integers, got {value!r}") from None
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"sft.{key} must be a list of integers, got {list(value)!r}")
        out.append(int(v))
    return out


# --------------------------------------------------------------------------- data


def encode_example(tokenizer, record: Mapping[str, Any]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for prompt + response + EOS; prompt positions are labelled -100."""
    prompt_ids = tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(record["response"], add_special_tokens=False)["input_ids"]
    input_ids = prompt_ids + response_ids + [tokenizer.eos_token_id]
    labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids + [tokenizer.eos_token_id]
    return input_ids, labels


def collate(examples: Sequence[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded (input_ids, labels) tensors; pads are labelled -100.

    Right padding needs no attention mask in training: with causal attention the pads at the end
    never influence the real tokens before them.
    """
    import torch

    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[row, : len(labs)] = torch.tensor(labs, dtype=torch.long)
    return input_ids, labels


def _epoch_batches(lengths: Sequence[int], batch_size: int, group_by_length: bool, generator) -> list[list[int]]:
    """One epoch of index batches: a seeded shuffle; with group_by_length, batches are cut from
    length-sorted chunks of 32 batches (as Trainer's group_by_length) and the batch order is shuffled."""
    import torch

    n = len(lengths)
    order = torch.randperm(n, generator=generator).tolist()
    if group_by_length:
        chunk = batch_size * 32
        grouped = []
        for start in range(0, n, chunk):
            part = order[start : start + chunk]
            grouped.extend(sorted(part, key=lambda i: -lengths[i]))
        order = grouped
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if group_by_length:
        perm = torch.randperm(len(batches), generator=generator).tolist()
        batches = [batches[i] for i in perm]
    return batches


def _loss_sums(model, input_ids, labels):
    """(sum of token losses, number of labelled tokens) for one batch."""
    import torch.nn.functional as F

    logits = model(input_ids=input_ids).logits[:, :-1, :]
    targets = labels[:, 1:]
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss_sum, int((targets != IGNORE_INDEX).sum())


def evaluate_loss(model, encoded: Sequence[tuple[list[int], list[int]]], pad_id: int, batch_size: int) -> float:
    """Mean per-token loss (response + EOS tokens) over `encoded`."""
    import torch

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            ids, labs = collate([encoded[i] for i in order[start : start + batch_size]], pad_id)
            loss_sum, n = _loss_sums(model, ids, labs)
            total += float(loss_sum)
            count += n
    model.train(was_training)
    return total / max(count, 1)


# --------------------------------------------------------------------------- saving


def _save_model(model, tokenizer, path: Path) -> None:
    """HF folder: config, generation_config, model.safetensors, tokenizer (no progress bar)."""
    from transformers.utils import logging as hf_logging

    path.mkdir(parents=True, exist_ok=True)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(path, safe_serialization=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(path)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


# --------------------------------------------------------------------------- training


def train_trajectory(
    model_cfg: Mapping[str, Any],
    sft_cfg: Mapping[str, Any],
    splits: Mapping[str, list[dict]],
    out_dir: Path,
    seed: int,
    log_fn: Callable[[dict], None] | None = None,
    init_from: Path | None = None,
) -> dict:
    """Train the tiny model from its base to the end of the SFT schedule; write the trajectory.

    model_cfg: the model config (`name`, `arch`, `tokenizer`). sft_cfg: the `sft:` keys (see DEFAULT_SFT).
    splits: {"train", "validation"} lists of records with "prompt" and "response".
    init_from: a model folder (the pretrained base) to start from, with its tokenizer; None: a freshly
    initialised model (seeded by `seed`) with the tokenizer named by `model_cfg["tokenizer"]`.
    Returns the manifest (also written to out_dir/manifest.json).
    """
    for split in ("train", "validation"):
        if split not in splits or not splits[split]:
            raise ValueError(f"splits[{split!r}] is missing or empty")
    for split in ("train", "validation"):
        for i, rec in enumerate(splits[split]):
            if "prompt" not in rec or "response" not in rec:
                raise ValueError(f"splits[{split!r}][{i}] lacks 'prompt' or 'response'")
    if "arch" not in model_cfg and init_from is None:
        raise ValueError("model config has no `arch:` block")
    cfg = resolve_sft_config(sft_cfg, len(splits["train"]))

    import torch

    threads_before = torch.get_num_threads()
    if cfg["num_threads"]:
        torch.set_num_threads(int(cfg["num_threads"]))
    try:
        return _train(model_cfg, cfg, splits, Path(out_dir), int(seed), log_fn, init_from)
    finally:
        torch.set_num_threads(threads_before)


def load_model(path: Path):
    """(model, tokenizer) of a saved tiny model folder, float32, greedy generation defaults, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer


    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.generation_config = greedy_generation_config(tokenizer)
    model.eval()
    return model, tokenizer


def _train(model_cfg, cfg, splits, out_dir: Path, seed: int, log_fn, init_from: Path | None = None) -> dict:
    import torch


    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    if init_from is not None:
        model, tokenizer = load_model(Path(init_from))
        torch.manual_seed(int(seed))
    else:
        tokenizer = build_tokenizer(model_cfg.get("tokenizer") or "char")
        model = build_model(model_cfg["arch"], tokenizer, seed)
    max_len = int(model.config.max_position_embeddings)
    train_records = list(splits["train"])[: cfg["max_train_examples"] or None]
    train_enc = [encode_example(tokenizer, r) for r in train_records]
    val_enc = [encode_example(tokenizer, r) for r in splits["validation"]]
    if cfg["max_val_examples"]:
        val_enc = val_enc[: int(cfg["max_val_examples"])]
    longest = max(len(ids) for ids, _ in train_enc + val_enc)
    if longest > max_len:
        raise ValueError(
            f"model arch.max_position_embeddings={max_len} is shorter than the longest example ({longest} tokens)"
        )
    pad_id = tokenizer.pad_token_id
    _save_model(model, tokenizer, out_dir / "base")

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": float(cfg["weight_decay"])},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg["lr"],
        betas=tuple(float(b) for b in cfg["adam_betas"]),
        eps=float(cfg["adam_eps"]),
    )
    generator = torch.Generator().manual_seed(int(seed))
    lengths = [len(ids) for ids, _ in train_enc]
    total, spe = cfg["total_steps"], cfg["steps_per_epoch"]
    save_steps = set(cfg["save_steps"])

    history: list[dict] = []
    log_history: list[dict] = []
    checkpoints: list[dict] = []
    start = time.perf_counter()

    base_val = evaluate_loss(model, val_enc, pad_id, cfg["eval_batch_size"])
    history.append({"step": 0, "train_loss": None, "val_loss": base_val, "lr": 0.0})
    if log_fn:
        log_fn({"step": 0, "val_loss": base_val, "wall_s": time.perf_counter() - start})

    window_loss, window_tokens = 0.0, 0
    last_train_loss: float | None = None
    step = 0
    model.train()
    epoch_index = 0
    while step < total:
        for batch in _epoch_batches(lengths, cfg["batch_size"], cfg["group_by_length"], generator):
            if step >= total:
                break
            step += 1
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            ids, labs = collate([train_enc[i] for i in batch], pad_id)
            loss_sum, n_tok = _loss_sums(model, ids, labs)
            loss = loss_sum / max(n_tok, 1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg["max_grad_norm"]:
                torch.nn.utils.clip_grad_norm_(model.parameters(), float(cfg["max_grad_norm"]))
            optimizer.step()
            window_loss += float(loss_sum.detach())
            window_tokens += n_tok

            if step % cfg["eval_every"] == 0 or step in save_steps or step == total:
                train_loss = window_loss / max(window_tokens, 1)
                last_train_loss = train_loss
                window_loss, window_tokens = 0.0, 0
                val_loss = evaluate_loss(model, val_enc, pad_id, cfg["eval_batch_size"])
                epoch = round(step / spe, 4)
                history.append({"step": step, "train_loss": train_loss, "val_loss": val_loss, "lr": lr})
                log_history.append(
                    {"epoch": epoch, "step": step, "loss": train_loss, "learning_rate": lr, "eval_loss": val_loss}
                )
                if log_fn:
                    log_fn(
                        {
                            "step": step,
                            "epoch": epoch,
                            "train_loss": train_loss,
                            "val_loss": val_loss,
                            "lr": lr,
                            "wall_s": time.perf_counter() - start,
                        }
                    )
            if step in save_steps:
                path = out_dir / f"checkpoint-{step}"
                model.eval()
                _save_model(model, tokenizer, path)
                model.train()
                _write_json(
                    path / TRAINER_STATE_NAME,
                    {
                        "global_step": step,
                        "epoch": round(step / spe, 4),
                        "max_steps": total,
                        "num_train_epochs": math.ceil(total / spe),
                        "train_batch_size": cfg["batch_size"],
                        "eval_steps": cfg["eval_every"],
                        "save_steps": cfg["save_steps"],
                        "log_history": list(log_history),
                    },
                )
                checkpoints.append(
                    {
                        "step": step,
                        "path": path.name,
                        "train_loss": last_train_loss,
                        "val_loss": history[-1]["val_loss"],
                        "wall_s": round(time.perf_counter() - start, 3),
                    }
                )
        epoch_index += 1
    model.eval()
    train_wall = time.perf_counter() - start

    manifest = {
        "format": 1,
        "model": model_cfg.get("name", "tiny"),
        "base": "base",
        "init_from": str(init_from) if init_from is not None else None,
        "checkpoints": checkpoints,
        "converged_step": total,
        "early_steps": list(cfg["early_steps"]),
        "total_steps": total,
        "epochs": round(total / spe, 4),
        "n_train": len(train_enc),
        "n_validation": len(val_enc),
        "train_wall_s": round(train_wall, 3),
        "history": history,
        "seed": int(seed),
        "torch_version": torch.__version__,
        "sft": {k: v for k, v in cfg.items()},
    }
    _write_json(out_dir / MANIFEST_NAME, manifest)
    return manifest


# --------------------------------------------------------------------------- command line




def greedy_generate(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int, until: Sequence[str] = (), batch_size: int = 128
) -> list[str]:
    """Greedy completions of `prompts`: batched with left padding, cut at the first EOS, then at the
    first occurrence of any `until` string (as lm-eval's generate_until does)."""
    import torch

    tokenizer.padding_side = "left"
    eos = tokenizer.eos_token_id
    outputs: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    model.eval()
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
            )
            new = gen[:, enc["input_ids"].shape[1] :].tolist()
            for row, i in enumerate(idx):
                tokens = new[row]
                if eos in tokens:
                    tokens = tokens[: tokens.index(eos)]
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                for term in until:
                    if term:
                        text = text.split(term)[0]
                outputs[i] = text
    return outputs
