"""Whole models in memory for ARM's formulations: loading a checkpoint, and one name per shared storage."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from arm.merge.tensor_io import TensorReader
from arm.method.layerwise import EMBED

if TYPE_CHECKING:
    import torch


def load_model(path: Path, device: torch.device, progress: bool) -> Any:
    """A checkpoint as a float32 causal LM on the merge device, in eval mode (ARM: θ ← c_m)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return model.to(device).eval()


def shared_storages(names: Sequence[str], storage: Callable[[str], int]) -> tuple[list[str], dict[str, str]]:
    """(one name per storage, {other name: its storage's name}) over ``names`` in order. Where a storage holds
    the embedding (a tied lm_head), the embedding's name stands for it, whatever the order of ``names``."""
    groups: dict[int, list[str]] = {}
    for n in names:
        groups.setdefault(storage(n), []).append(n)
    keep: dict[int, str] = {ptr: (EMBED if EMBED in group else group[0]) for ptr, group in groups.items()}
    kept = [n for n in names if keep[storage(n)] == n]
    aliases = {n: keep[storage(n)] for n in names if keep[storage(n)] != n}
    return kept, aliases


def complete_state(state: dict[str, Any], plan: Any, aliases: dict[str, str]) -> dict[str, Any]:
    """``state`` (one tensor per storage) with every other tensor of ``plan`` added: a tied alias as its storage's
    tensor (the same iterate), a non-float tensor as the base's."""
    for n in plan.names:
        if n in state:
            continue
        if n in aliases:
            state[n] = state[aliases[n]]
        else:
            with TensorReader() as reader:
                state[n] = reader.read(plan.inputs[n][0])
    return state
