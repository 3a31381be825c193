"""Each merge rule on hand-computed tensors, and its parameter validation."""

from __future__ import annotations

import pytest
import torch

import baselines.ties
from arm.merge.contract import MergeConfigError
from arm.merge.registry import get_method, method_names
from baselines.dare import keep_mask, mask_seed
from baselines.ties import trim_threshold


def rule(name: str, n: int = 2, **params):
    return get_method(name).from_params(params, n)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_registry_lists_every_method_once() -> None:
    assert method_names() == ["arm", "dare", "ema", "expo", "lawa", "linear", "task_arithmetic", "ties", "wsm"]
    for name in method_names():
        assert get_method(name).name == name
    with pytest.raises(MergeConfigError, match="unknown merge method 'slerp'"):
        get_method("slerp")


def test_linear_average_and_weights() -> None:
    c1, c2 = t(1, 2, 3), t(3, 6, -3)
    assert torch.equal(rule("linear").apply("w", None, [c1, c2]), t(2, 4, 0))
    assert torch.allclose(rule("linear", weights=[1, 3]).apply("w", None, [c1, c2]), t(2.5, 5, -1.5))
    assert torch.equal(
        rule("linear", weights=[1, 3], normalize=False).apply("w", None, [c1, c2]), t(10, 20, -6)
    )


def test_linear_base_weight_joins_the_average() -> None:
    base, c1, c2 = t(0, 0), t(3, 3), t(6, 0)
    assert torch.allclose(rule("linear", base_weight=1.0).apply("w", base, [c1, c2]), t(3, 1))


def test_linear_keeps_shape() -> None:
    a, b = torch.ones(2, 3), torch.zeros(2, 3)
    assert rule("linear").apply("w", None, [a, b]).shape == (2, 3)


def test_task_arithmetic() -> None:
    base, c1, c2 = t(1, 1), t(2, 0), t(4, 1)  # deltas (1,-1), (3,0)
    out = rule("task_arithmetic", weights=[1, 2], **{"lambda": 0.5}).apply("w", base, [c1, c2])
    assert torch.allclose(out, t(1 + 0.5 * 7, 1 + 0.5 * -1))
    out = rule("task_arithmetic", weights=[1, 2], normalize=True).apply("w", base, [c1, c2])
    assert torch.allclose(out, t(1 + 7 / 3, 1 - 1 / 3))


def test_expo_extrapolates_from_last_checkpoint() -> None:
    base, c1, c2 = t(1, 2), t(100, 100), t(2, 0)
    assert torch.allclose(rule("expo", alpha=0.5).apply("w", base, [c1, c2]), t(2.5, -1))


def test_ties_trim_elect_disjoint_mean() -> None:
    base = torch.zeros(4)
    c1 = t(4, -1, 2, -3)  # density 0.5 keeps 4, -3
    c2 = t(-2, 2, 1, -5)  # keeps -2, -5
    c3 = t(1, -6, -3, 0.5)  # keeps -6, -3
    out = rule("ties", 3, density=0.5).apply("w", base, [c1, c2, c3])
    # trimmed: (4,0,0,-3) (-2,0,0,-5) (0,-6,-3,0); sums (2,-6,-3,-8) -> signs (+,-,-,-)
    # agreeing: [4], [-6], [-3], [-3,-5] -> means 4, -6, -3, -4
    assert torch.equal(out, t(4, -6, -3, -4))


def test_ties_weights_lambda_and_unnormalized() -> None:
    base = t(1, 1)
    c1, c2 = t(2, 1), t(3, 0)  # deltas (1,0), (2,-1)
    out = rule("ties", density=1.0, weights=[1, 2], **{"lambda": 0.5}).apply("w", base, [c1, c2])
    # weighted (1,0), (4,-2): signs (+,-); agreeing sums (5, -2) / weights (3, 2) -> (5/3, -1)
    assert torch.allclose(out, t(1 + 0.5 * 5 / 3, 1 + 0.5 * -1))
    out = rule("ties", density=1.0, weights=[1, 2], normalize=False).apply("w", base, [c1, c2])
    assert torch.allclose(out, t(1 + 5, 1 - 2))


def test_ties_sign_tie_goes_to_plus() -> None:
    base = torch.zeros(2)
    c1, c2 = t(2, 0), t(-2, 0)  # sums are exactly 0: the elected sign is +
    out = rule("ties", density=1.0).apply("w", base, [c1, c2])
    assert torch.equal(out, t(2, 0))  # only c1 agrees at 0; nobody at 1 (divisor 1, sum 0)


def test_ties_keeps_entries_equal_to_the_threshold() -> None:
    base = torch.zeros(4)
    c1 = t(1, 2, 2, 3)  # k = 2: the 2nd largest |d| is 2, and both 2s are kept
    out = rule("ties", 1, density=0.5).apply("w", base, [c1])
    assert torch.equal(out, t(0, 2, 2, 3))


@pytest.mark.parametrize("density", [0.01, 0.3, 0.5, 0.97])
def test_trim_threshold_matches_sort(density: float, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(baselines.ties, "_EXACT_BELOW", 100)
    gen = torch.Generator().manual_seed(1)
    d = torch.randn(50_000, generator=gen) * torch.linspace(0.1, 3, 50_000)  # structured magnitudes
    n = d.numel()
    k = max(1, int(density * n))
    expected = d.abs().sort(descending=True).values[k - 1]
    assert trim_threshold(d, k, chunk=4096) == float(expected)


def test_trim_threshold_when_the_sample_misses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(baselines.ties, "_EXACT_BELOW", 100)
    monkeypatch.setattr(baselines.ties, "_SAMPLE", 16)
    d = torch.cat([torch.zeros(9_000), torch.arange(1, 1001, dtype=torch.float32)])
    assert trim_threshold(d, 10, chunk=512) == 991.0


def test_dare_drop_zero_is_task_arithmetic() -> None:
    base, c1, c2 = t(1, 2, 3), t(2, 2, 0), t(0, 5, 3)
    dare = rule("dare", drop_rate=0.0).apply("w", base, [c1, c2])
    ta = rule("task_arithmetic").apply("w", base, [c1, c2])
    assert torch.equal(dare, ta)


def test_dare_inverse_rescale_by_hand() -> None:
    n = 1000
    base, c1 = torch.zeros(n), torch.full((n,), 2.0)
    out = rule("dare", 1, drop_rate=0.75, rescale="inverse", seed=7).apply("layer.w", base, [c1])
    keep = keep_mask(n, 0.25, mask_seed(7, "layer.w", 0))
    assert torch.equal(out, torch.where(keep, torch.tensor(8.0), torch.tensor(0.0)))
    assert 0.15 < keep.float().mean() < 0.35


def test_dare_l1_rescale_keeps_the_norm() -> None:
    gen = torch.Generator().manual_seed(0)
    base, c1 = torch.zeros(2000), torch.randn(2000, generator=gen)
    out = rule("dare", 1, drop_rate=0.6, rescale="l1").apply("w", base, [c1])
    assert (out == 0).float().mean() > 0.5
    assert torch.allclose(out.abs().sum(), c1.abs().sum(), rtol=1e-5)
    none = rule("dare", 1, drop_rate=0.6, rescale="none").apply("w", base, [c1])
    assert torch.equal(none != 0, out != 0)
    assert torch.equal(none[none != 0], c1[none != 0])


def test_dare_mask_is_seeded_by_seed_and_tensor_name() -> None:
    gen = torch.Generator().manual_seed(0)
    base, c1 = torch.zeros(500), torch.randn(500, generator=gen)
    r = rule("dare", 1, drop_rate=0.5, seed=3)
    a, b = r.apply("x", base, [c1]), r.apply("x", base, [c1])
    assert torch.equal(a, b)
    assert not torch.equal(a, r.apply("y", base, [c1]))
    assert not torch.equal(a, rule("dare", 1, drop_rate=0.5, seed=4).apply("x", base, [c1]))


def test_dare_consensus_uses_ties_sign_election() -> None:
    base = torch.zeros(2)
    c1, c2 = t(2, -1), t(-1, -1)
    out = rule("dare", drop_rate=0.0, consensus="sum", normalize=True).apply("w", base, [c1, c2])
    assert torch.equal(out, t(2, -1))


@pytest.mark.parametrize("name", ["linear", "task_arithmetic", "ties", "expo", "dare"])
def test_nan_input_gives_nonfinite_output(name: str) -> None:
    # the engine detects a bad input through the merged values: every rule must propagate it
    base, c1, c2 = t(1, 2, 3), t(2, 2, 0), t(0, float("nan"), 3)
    out = rule(name).apply("w", base, [c1, c2])
    assert not bool(torch.isfinite(out).all())
    c2 = t(0, float("inf"), 3)
    assert not bool(torch.isfinite(rule(name).apply("w", base, [c1, c2])).all())


@pytest.mark.parametrize(
    ("name", "params", "key"),
    [
        ("ties", {"density": 0.0}, "merge.density"),
        ("ties", {"density": 1.5}, "merge.density"),
        ("ties", {"density": [0.5]}, "merge.density"),
        ("ties", {"densty": 0.5}, "merge.densty"),
        ("dare", {"drop_rate": 1.0}, "merge.drop_rate"),
        ("dare", {"rescale": "l2"}, "merge.rescale"),
        ("dare", {"consensus": "count"}, "merge.consensus"),
        ("linear", {"weights": [1.0]}, "merge.weights"),
        ("linear", {"weights": [1.0, -1.0]}, "merge.weights"),
        ("task_arithmetic", {"lambda": "big"}, "merge.lambda"),
        ("expo", {"alpha": None}, "merge.alpha"),
    ],
)
def test_bad_parameters_name_the_key(name: str, params: dict, key: str) -> None:
    with pytest.raises(MergeConfigError, match=key.replace(".", r"\.")):
        rule(name, 2, **params)
