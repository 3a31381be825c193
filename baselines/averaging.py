"""The averaging family: checkpoint averages whose coefficients come from a rule, not a list.

Each method is a convex combination Σ_j a_j c_j of the last ``window`` merge inputs (all of them when
``window`` is null), with coefficients a_j ≥ 0 that sum to 1; the base θ0 is not an input, and the
checkpoints before the window are not read. The combination runs through :class:`~baselines.linear.Linear`
with ``weights = a`` and ``normalize = false``, op for op, so any two methods that produce the same
coefficients produce the same bits.

- ``lawa`` — LAWA (latest weight averaging, Kaddour 2022; Sanyal et al. 2023): a_j = 1/k.
- ``ema``  — an exponential moving average over the saved checkpoints in step order, started at the
  window's first: e ← c_1; e ← β e + (1 − β) c_j for j = 2..k. Unrolled, a_1 = β^(k−1) and
  a_j = (1 − β) β^(k−j) for j ≥ 2.
- ``wsm``  — WSM (Tian et al., arXiv 2507.17634): coefficients derived from a learning-rate decay
  shape f (arm/trajectory/schedules.py), a_j = f((j−1)/k) − f(j/k); docs/method.md §9 derives it.
  A linear shape gives LAWA's uniform weights.

The coefficients are those of the window's *index*, not of its steps: they assume evenly spaced
checkpoints, as the tiny trajectories' late windows are (conf/model/tiny.yaml).
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any, ClassVar

from arm.merge.contract import MergeConfigError, check_fraction
from arm.trajectory.schedules import DECAY_SHAPES, decay_factor
from baselines.linear import Linear


def check_window(window: Any, n_checkpoints: int) -> int:
    """The window length k: null = every input; otherwise an integer in 1..n_checkpoints."""
    if window is None:
        return n_checkpoints
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise MergeConfigError(f"merge.window: expected a positive integer or null, got {window!r}")
    if window > n_checkpoints:
        raise MergeConfigError(f"merge.window: {window} checkpoints asked for, but the merge has {n_checkpoints} inputs "
                               "(trajectory.early_steps)")
    return window


def lawa_coefficients(k: int) -> list[float]:
    return [float(Fraction(1, k))] * k


def ema_coefficients(k: int, beta: float) -> list[float]:
    return [beta ** (k - 1)] + [(1.0 - beta) * beta ** (k - j) for j in range(2, k + 1)]


def wsm_coefficients(k: int, shape: str) -> list[float]:
    f = [decay_factor(shape, j / k) for j in range(k + 1)]
    return [f[j - 1] - f[j] for j in range(1, k + 1)]


class WindowAverage(Linear):
    """A convex combination of the last ``window`` inputs; subclasses give the coefficients."""

    name: ClassVar[str]

    def __init__(self, n_checkpoints: int, window: int | None = None):
        k = check_window(window, n_checkpoints)
        coefficients = self.coefficients(k)
        super().__init__(k, weights=coefficients, normalize=False)
        self.n_checkpoints = n_checkpoints
        self.window = k

    @classmethod
    def validate_params(cls, params) -> None:
        """The parameters on their own (the number of inputs is checked when it is known: arm/run/stages.py)."""
        window = params.get("window")
        ok = isinstance(window, int) and not isinstance(window, bool) and window > 0
        cls.from_params(params, window if ok else 1)

    def coefficients(self, k: int) -> list[float]:
        raise NotImplementedError

    def checkpoint_mask(self, n: int) -> list[bool]:
        return [i >= n - self.window for i in range(n)]

    def params(self) -> dict[str, Any]:
        return {"window": self.window, "coefficients": self.weights}


class Lawa(WindowAverage):
    name = "lawa"

    def coefficients(self, k: int) -> list[float]:
        return lawa_coefficients(k)


class Ema(WindowAverage):
    name = "ema"

    def __init__(self, n_checkpoints: int, beta: float = 0.5, window: int | None = None):
        self.beta = check_fraction(beta, "beta", low_open=False, high_open=True)
        super().__init__(n_checkpoints, window)

    def coefficients(self, k: int) -> list[float]:
        return ema_coefficients(k, self.beta)

    def params(self) -> dict[str, Any]:
        return {"beta": self.beta, **super().params()}


class Wsm(WindowAverage):
    name = "wsm"

    def __init__(self, n_checkpoints: int, shape: str = "1-sqrt", window: int | None = None):
        if shape not in DECAY_SHAPES:
            raise MergeConfigError(f"merge.shape: expected one of {', '.join(DECAY_SHAPES)}, got {shape!r}")
        self.shape = shape
        super().__init__(n_checkpoints, window)

    def coefficients(self, k: int) -> list[float]:
        return wsm_coefficients(k, self.shape)

    def params(self) -> dict[str, Any]:
        return {"shape": self.shape, **super().params()}
