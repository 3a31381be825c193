"""The averaging family (baselines/averaging.py): LAWA, EMA and WSM's decay-shaped coefficients, by hand."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from arm.merge.contract import MergeConfigError
from arm.merge.engine import merge_from_config
from arm.merge.registry import get_method
from baselines.averaging import ema_coefficients, lawa_coefficients, wsm_coefficients
from tests.helpers import load_tensors
from tests.merge_fixtures import make_trajectory


def rule(name: str, n: int, **params):
    return get_method(name).from_params(params, n)


@pytest.mark.parametrize("k", [1, 2, 4, 7, 10])
def test_wsm_coefficients_equal_the_closed_form(k: int) -> None:
    # linear decay <-> the uniform average
    assert wsm_coefficients(k, "linear") == pytest.approx([1 / k] * k, abs=1e-15)
    # cosine: a_j = (cos(pi (j-1)/k) - cos(pi j/k)) / 2
    cos = [(math.cos(math.pi * (j - 1) / k) - math.cos(math.pi * j / k)) / 2 for j in range(1, k + 1)]
    assert wsm_coefficients(k, "cosine") == pytest.approx(cos, abs=1e-15)
    # 1-sqrt: a_j = sqrt(j/k) - sqrt((j-1)/k): the oldest checkpoint weighs most
    sqrt = [math.sqrt(j / k) - math.sqrt((j - 1) / k) for j in range(1, k + 1)]
    assert wsm_coefficients(k, "1-sqrt") == pytest.approx(sqrt, abs=1e-15)
    for shape in ("linear", "cosine", "1-sqrt"):
        a = wsm_coefficients(k, shape)
        assert math.fsum(a) == pytest.approx(1.0, abs=1e-12) and min(a) >= 0


def test_wsm_known_values() -> None:
    assert wsm_coefficients(2, "cosine") == pytest.approx([0.5, 0.5])
    assert wsm_coefficients(3, "cosine") == pytest.approx([0.25, 0.5, 0.25])
    assert wsm_coefficients(4, "1-sqrt") == pytest.approx([0.5, math.sqrt(0.5) - 0.5, math.sqrt(0.75) - math.sqrt(0.5),
                                                           1 - math.sqrt(0.75)])


def test_ema_coefficients_unroll_the_recursion() -> None:
    assert ema_coefficients(4, 0.5) == [0.125, 0.125, 0.25, 0.5]
    assert ema_coefficients(1, 0.9) == [1.0]
    assert ema_coefficients(3, 0.0) == [0.0, 0.0, 1.0]   # beta 0: the latest checkpoint alone
    assert lawa_coefficients(3) == [1 / 3] * 3


def planted(*values: float) -> list[torch.Tensor]:
    return [torch.full((5,), v, dtype=torch.float32) for v in values]


def test_lawa_and_ema_over_planted_checkpoints_by_hand() -> None:
    c = planted(1.0, 2.0, 4.0, 8.0)
    assert torch.equal(rule("lawa", 4).apply("w", None, c), torch.full((5,), 3.75))
    assert torch.equal(rule("lawa", 4, window=2).apply("w", None, c), torch.full((5,), 6.0))
    # e <- 1; e <- (e + 2)/2 = 1.5; (1.5 + 4)/2 = 2.75; (2.75 + 8)/2 = 5.375
    assert torch.equal(rule("ema", 4, beta=0.5).apply("w", None, c), torch.full((5,), 5.375))
    # window 3 starts the EMA at the second checkpoint: 2 -> 3 -> 5.5
    assert torch.equal(rule("ema", 4, beta=0.5, window=3).apply("w", None, c), torch.full((5,), 5.5))
    # WSM with a linear shape is LAWA, bit for bit
    assert torch.equal(rule("wsm", 4, shape="linear", window=3).apply("w", None, c),
                       rule("lawa", 4, window=3).apply("w", None, c))
    # cosine over 3: 0.25*2 + 0.5*4 + 0.25*8 = 4.5
    assert torch.equal(rule("wsm", 4, shape="cosine", window=3).apply("w", None, c), torch.full((5,), 4.5))


def test_random_checkpoints_against_float64_by_hand() -> None:
    g = torch.Generator().manual_seed(0)
    c = [torch.randn(1000, generator=g) for _ in range(5)]
    d = [x.double() for x in c]
    beta = 0.7
    e = d[1]
    for x in d[2:]:
        e = beta * e + (1 - beta) * x
    assert torch.allclose(rule("ema", 5, beta=beta, window=4).apply("w", None, c).double(), e, atol=1e-6)
    a = wsm_coefficients(5, "1-sqrt")
    want = sum(w * x for w, x in zip(a, d, strict=True))
    assert torch.allclose(rule("wsm", 5, shape="1-sqrt").apply("w", None, c).double(), want, atol=1e-6)


def test_the_engine_reads_only_the_window(tmp_path) -> None:
    """A window merge never opens the checkpoints before its window: a NaN there does not reach it."""
    traj = make_trajectory(tmp_path / "traj", n_checkpoints=4)
    first = traj.checkpoints[0] / "model.safetensors"
    tensors = load_file(first)
    name = sorted(tensors)[0]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, first, metadata={"format": "pt"})
    out = tmp_path / "lawa"
    summary = merge_from_config({"name": "lawa", "window": 3}, traj.base, traj.checkpoints, out, progress=False)
    assert summary["params"]["window"] == 3
    merged = load_tensors(out)
    inputs = [load_tensors(p) for p in traj.checkpoints[1:]]
    for key, value in merged.items():
        want = inputs[0][key] * (1 / 3)
        for x in inputs[1:]:
            want = want + x[key] * (1 / 3)
        assert torch.allclose(value, want, rtol=1e-6, atol=1e-7), key
    with pytest.raises(Exception, match="NaN"):
        merge_from_config({"name": "lawa", "window": 4}, traj.base, traj.checkpoints, tmp_path / "all", progress=False)
    assert not (tmp_path / "all").exists()


@pytest.mark.parametrize(
    ("name", "params", "key"),
    [("lawa", {"window": 5}, "merge.window"), ("lawa", {"window": 0}, "merge.window"),
     ("ema", {"beta": 1.0}, "merge.beta"), ("ema", {"beta": -0.1}, "merge.beta"),
     ("wsm", {"shape": "exp"}, "merge.shape"), ("wsm", {"windo": 2}, "merge.windo")],
)
def test_bad_parameters_name_the_key(name: str, params: dict, key: str) -> None:
    with pytest.raises(MergeConfigError, match=key.replace(".", r"\.")):
        rule(name, 4, **params)
