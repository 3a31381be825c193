"""SFT learning-rate schedules (arm/trajectory/schedules.py) at known steps, on both SFT paths: the tiny
loop's `lr_at` (1-based steps) and the scheduler the Trainer path builds (transformers', 0-based)."""

from __future__ import annotations

import math

import pytest

from arm.core.errors import ConfigError
from arm.trajectory import trainer_sft
from arm.trajectory.schedules import decay_factor, trainer_scheduler
from arm.trajectory.sft import lr_at, resolve_sft_config


def tiny(**sft):
    return resolve_sft_config({"lr": 1.0, "warmup_steps": 10, "max_steps": 110, **sft}, 100)


def test_tiny_loop_constant_after_warmup() -> None:
    cfg = tiny(schedule="constant")
    assert [lr_at(s, cfg) for s in (1, 5, 10, 11, 60, 110)] == [0.1, 0.5, 1.0, 1.0, 1.0, 1.0]


def test_tiny_loop_wsd() -> None:
    # 110 steps, decay over the last 20% = 22 steps: stable up to step 88, then linear to 0 at 110
    cfg = tiny(schedule="wsd", decay_fraction=0.2)
    assert [lr_at(s, cfg) for s in (5, 10, 50, 88)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_at(99, cfg) == pytest.approx(0.5)
    assert lr_at(110, cfg) == pytest.approx(0.0)
    floor = tiny(schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.1, decay_shape="1-sqrt")
    assert lr_at(99, floor) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.5)))
    assert lr_at(110, floor) == pytest.approx(0.1)
    cosine = tiny(schedule="wsd", decay_fraction=0.2, decay_shape="cosine")
    assert lr_at(99, cosine) == pytest.approx(0.5) and lr_at(93.5, cosine) == pytest.approx(decay_factor("cosine", 0.25))


def test_tiny_loop_cosine_is_unchanged() -> None:
    cfg = tiny(schedule="cosine")
    assert lr_at(60, cfg) == pytest.approx(0.5) and lr_at(110, cfg) == pytest.approx(0.0)


@pytest.mark.parametrize(("override", "key"), [({"schedule": "step"}, "sft.schedule"),
                                               ({"schedule": "wsd", "decay_fraction": 0}, "sft.decay_fraction"),
                                               ({"schedule": "wsd", "decay_shape": "exp"}, "sft.decay_shape"),
                                               ({"min_lr_ratio": 2}, "sft.min_lr_ratio")])
def test_tiny_loop_bad_schedule_names_the_key(override, key) -> None:
    with pytest.raises(ValueError, match=key):
        tiny(**override)


def trainer_lrs(sft: dict, total: int, warmup: int) -> list[float]:
    """The learning rate of each of the Trainer's optimizer steps (0-based), from the scheduler it builds."""
    import torch

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = trainer_scheduler(trainer_sft.resolve_sft_config(sft), opt, total, warmup)
    lrs = []
    for _ in range(total):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return lrs


def test_trainer_path_constant_keeps_the_warmup() -> None:
    lrs = trainer_lrs({"lr": 1.0, "schedule": "constant"}, 100, 10)
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5) and lrs[10:] == [1.0] * 90


def test_trainer_path_wsd() -> None:
    lrs = trainer_lrs({"lr": 1.0, "schedule": "wsd", "decay_fraction": 0.2}, 100, 10)
    assert lrs[5] == pytest.approx(0.5) and lrs[10:80] == [1.0] * 70   # stable until the last 20 steps
    assert lrs[90] == pytest.approx(0.5) and lrs[99] == pytest.approx(0.05)
    lrs = trainer_lrs({"lr": 1.0, "schedule": "wsd", "decay_fraction": 0.2, "decay_shape": "1-sqrt",
                       "min_lr_ratio": 0.1}, 100, 10)
    assert lrs[90] == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.5)))


def test_trainer_path_cosine_with_a_floor_and_plain_names() -> None:
    lrs = trainer_lrs({"lr": 1.0, "schedule": "cosine", "min_lr_ratio": 0.2}, 100, 0)
    assert lrs[0] == pytest.approx(1.0) and lrs[50] == pytest.approx(0.6)
    assert trainer_lrs({"lr": 1.0, "schedule": "cosine"}, 100, 0)[50] == pytest.approx(0.5)
    assert trainer_lrs({"lr": 1.0, "schedule": "linear"}, 100, 0)[50] == pytest.approx(0.5)


def test_trainer_path_bad_schedule_names_the_key() -> None:
    with pytest.raises(ConfigError, match="model.sft.decay_fraction"):
        trainer_sft.resolve_sft_config({"schedule": "wsd", "decay_fraction": 1.5})
