"""SFT learning-rate schedules and the decay shapes they share with WSM's merge coefficients.

Three schedules after a linear warm-up (`model.sft.schedule`), on both SFT paths (the tiny loop in
arm/trajectory/sft.py and transformers' Trainer in arm/trajectory/trainer_sft.py):

- ``cosine``: cosine decay from the peak to ``min_lr_ratio * lr`` at the last step (the default);
- ``linear``: linear decay to the same floor;
- ``constant``: the peak until the end (no decay);
- ``wsd``: warmup-stable-decay: the peak until the last ``decay_fraction`` of the steps, then a decay of
  shape ``decay_shape`` (linear | cosine | 1-sqrt) to the floor at the last step.

A *decay shape* f maps progress p in [0, 1] through a decay phase to the multiplier of the peak learning
rate: f(0) = 1, f(1) = 0, non-increasing. WSM's merge coefficients (baselines/averaging.py) are derived
from the same shapes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

SCHEDULES = ("cosine", "linear", "constant", "wsd")
DECAY_SHAPES = ("linear", "cosine", "1-sqrt")


def decay_factor(shape: str, progress: float) -> float:
    """f(p) of a decay shape: 1 at p = 0, 0 at p = 1 (p is clipped to [0, 1])."""
    p = min(1.0, max(0.0, float(progress)))
    if shape == "linear":
        return 1.0 - p
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    if shape == "1-sqrt":
        return 1.0 - math.sqrt(p)
    raise ValueError(f"decay shape must be one of {', '.join(DECAY_SHAPES)}, got {shape!r}")


def decay_steps(total: int, fraction: float) -> int:
    """Steps in a WSD schedule's decay phase: round(fraction * total), at least 1."""
    return max(1, min(int(total), round(float(fraction) * total)))


def check_schedule(cfg: Mapping[str, Any], prefix: str = "sft") -> None:
    """Raise ValueError naming ``<prefix>.<key>`` for a bad schedule, shape or decay fraction."""
    if cfg.get("schedule") not in SCHEDULES:
        raise ValueError(f"{prefix}.schedule must be one of {', '.join(SCHEDULES)}, got {cfg.get('schedule')!r}")
    if cfg.get("decay_shape") not in DECAY_SHAPES:
        raise ValueError(f"{prefix}.decay_shape must be one of {', '.join(DECAY_SHAPES)}, got {cfg.get('decay_shape')!r}")
    frac = cfg.get("decay_fraction")
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac <= 1:
        raise ValueError(f"{prefix}.decay_fraction must be a number in (0, 1], got {frac!r}")
    ratio = cfg.get("min_lr_ratio", 0.0)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
        raise ValueError(f"{prefix}.min_lr_ratio must be a number in [0, 1], got {ratio!r}")


def lr_at(step: int, cfg: Mapping[str, Any]) -> float:
    """The tiny loop's learning rate for optimizer step ``step`` (1-based) of ``cfg`` (a resolved sft config:
    lr, warmup_steps, total_steps, schedule, min_lr_ratio, decay_fraction, decay_shape)."""
    lr, warm, total = float(cfg["lr"]), int(cfg["warmup_steps"]), int(cfg["total_steps"])
    floor = lr * float(cfg.get("min_lr_ratio", 0.0))
    schedule = cfg["schedule"]
    if warm and step <= warm:
        return lr * step / warm
    if schedule == "constant" or total <= warm:
        return lr
    if schedule == "wsd":
        n_decay = min(decay_steps(total, cfg["decay_fraction"]), total - warm)
        start = total - n_decay  # the last stable step
        if step <= start:
            return lr
        return floor + (lr - floor) * decay_factor(cfg["decay_shape"], (step - start) / n_decay)
    progress = (step - warm) / (total - warm)
    if schedule == "linear":
        return floor + (lr - floor) * (1.0 - progress)
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def trainer_scheduler(cfg: Mapping[str, Any], optimizer: Any, num_training_steps: int, num_warmup_steps: int) -> Any:
    """The Trainer path's scheduler (a torch LambdaLR from transformers' ``get_scheduler``; transformers
    indexes it from step 0): ``cosine`` and ``linear`` decay to ``min_lr_ratio`` of the peak, ``constant``
    keeps the warm-up (``constant_with_warmup``), ``wsd`` is transformers' ``warmup_stable_decay`` with the
    decay phase of :func:`decay_steps`. Any other name passes through as a transformers scheduler type."""
    from transformers import get_scheduler

    schedule = cfg["schedule"]
    ratio = float(cfg.get("min_lr_ratio", 0.0))
    kwargs: dict[str, Any] = {}
    if schedule == "constant":
        schedule = "constant_with_warmup"
    elif schedule == "wsd":
        n_decay = min(decay_steps(num_training_steps, cfg["decay_fraction"]), num_training_steps - num_warmup_steps)
        schedule = "warmup_stable_decay"
        kwargs = {"num_decay_steps": n_decay, "decay_type": cfg["decay_shape"], "min_lr_ratio": ratio}
    elif schedule == "cosine" and ratio > 0:
        schedule, kwargs = "cosine_with_min_lr", {"min_lr_rate": ratio}
    return get_scheduler(schedule, optimizer=optimizer, num_warmup_steps=num_warmup_steps,
                         num_training_steps=num_training_steps, scheduler_specific_kwargs=kwargs)
