"""TIES's fused C kernels (arm/merge/_kernels.c) give the torch path's bits.

The combine against ``DeltaCombiner`` and the count against ``ThresholdCounter`` on planted edge
cases (deltas exactly at the trim level, zero deltas, signed zeros, sums that cancel to zero,
negative and zero weights, every option, lengths that leave vector tails); the bindings' errors;
that the extension is built here (an optional build that failed silently would leave TIES on its
slower torch path); an empty tensor on both paths. Whole merges against ``ARM_MERGE_BACKEND=torch``,
byte for byte, and that TIES on the numpy path never imports torch: tests/test_merge_numpy.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from baselines import ties
from baselines.ties import DeltaCombiner, ThresholdCounter, shrink_level


def _kernels():
    from arm.merge import _kernels

    return _kernels


def test_kernels_are_built(monkeypatch):
    """`make install` builds the extension (setup.py); the merge uses it unless told not to."""
    monkeypatch.delenv("ARM_MERGE_BACKEND", raising=False)
    assert ties.cpu_kernels() is _kernels()
    monkeypatch.setenv("ARM_MERGE_BACKEND", "torch")
    assert ties.cpu_kernels() is None


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint32)


def _planted(n: int, j: int, level: float | None, seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """A base and ``j`` checkpoints whose deltas hit every branch of the combine."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(n).astype(np.float32)
    base[::13] = -0.0
    base[5::17] = 0.0
    cks = []
    for i in range(j):
        d = (rng.standard_normal(n) * 0.01).astype(np.float32)
        d[i::7] = 0.0  # unchanged entries
        if level is not None:  # deltas exactly at the trim level and just past it, both signs
            d[3::19] = np.float32(level)
            d[4::23] = -np.float32(level)
            d[6::29] = np.nextafter(np.float32(level), np.float32(1))
        c = base + d
        if i == 1:  # cancels checkpoint 0 exactly where both move
            c[8::31] = base[8::31] - (cks[0][8::31] - base[8::31])
        c[9::37] = -0.0
        cks.append(c.astype(np.float32))
    return base, cks


COMBINE_CASES = [
    (1, [1.0], True, 1.0),
    (2, [1.0, 1.0], True, 1.0),
    (3, [1.0, 1.0, 1.0], True, 1.0),
    (3, [0.3, 0.5, 0.2], True, 1.0),
    (3, [0.3, 0.5, 0.2], True, 0.7),
    (3, [1.0, -0.5, 0.7], True, 1.0),  # a negative weight: the zero-divisor rule, not the clamp
    (3, [1.0, 0.0, 2.0], True, 1.3),  # a zero weight
    (3, [1.0, 2.0, 0.5], False, 1.0),
    (4, [0.7, 1.3, -0.4, 1.0], False, 0.8),
    (5, [1.0, 1.0, 1.0, 1.0, 1.0], True, 1.0),
]


@pytest.mark.parametrize("n", [1, 15, 517, 4099])
@pytest.mark.parametrize("case", range(len(COMBINE_CASES)))
def test_combine_matches_delta_combiner(n, case):
    torch.set_num_threads(1)
    j, weights, normalize, lam = COMBINE_CASES[case]
    thresholds = [0.004, 0.0, 0.012, 0.001, 0.02][:j]  # 0: that checkpoint is not trimmed
    levels = [shrink_level(t) for t in thresholds]
    base, cks = _planted(n, j, next(lv for lv in levels if lv is not None), seed=case * 100 + n)

    tb = torch.from_numpy(base.copy())
    deltas = [torch.from_numpy(c.copy()).sub_(tb) for c in cks]
    scratch = ties._fresh(torch.device("cpu"))
    want = DeltaCombiner(
        weights, consensus=True, normalize=normalize, lam=lam, scratch=scratch, size=n, levels=levels
    )(tb, deltas).numpy()

    got, before = base.copy(), [c.copy() for c in cks]
    _kernels().ties_combine(
        got, cks, [-1.0 if lv is None else lv for lv in levels], weights, normalize, lam,
        all(w > 0 for w in weights), min(weights),
    )
    assert np.array_equal(_bits(got), _bits(want)), (case, n)
    assert all(np.array_equal(_bits(c), _bits(b)) for c, b in zip(cks, before, strict=True))  # inputs untouched


@pytest.mark.parametrize("n", [1, 16, 1000, (1 << 15) + 7])
def test_count_matches_threshold_counter(n):
    rng = np.random.default_rng(n)
    base = rng.standard_normal(n).astype(np.float32)
    c = base + (rng.standard_normal(n) * 0.01).astype(np.float32)
    c[::11] = base[::11]  # |d| = 0
    d = np.abs(c - base)
    lo, hi = float(np.quantile(d, 0.4)), float(np.quantile(d, 0.6))
    if n > 2:  # values exactly at both ends of the bracket
        c[1] = base[1] + np.float32(lo)
        c[2] = base[2] - np.float32(hi)
    for bounds in ((lo, hi), (hi, float("inf")), (0.0, lo), (0.0, 0.0)):
        ref = ThresholdCounter(*bounds, ties._fresh(torch.device("cpu")), n)
        ref.add(torch.from_numpy(c.copy()).sub_(torch.from_numpy(base)))
        cand = np.full(n + 1, np.nan, np.float32)
        above, kept = _kernels().ties_count(c, base, *bounds, cand)
        assert above == ref.above
        want = ref.candidates[0].numpy()
        assert kept == want.size and np.array_equal(_bits(cand[:kept]), _bits(want))  # the same values, in order


def test_kernel_counter_finds_the_kth_largest_when_the_bracket_misses():
    """KernelCounter widens a bracket that missed, as ThresholdCounter does, and lands on the exact value."""
    rng = np.random.default_rng(3)
    base = np.zeros(10_000, np.float32)
    c = rng.permutation(np.arange(1, 10_001, dtype=np.float32))
    cand = np.empty(10_001, np.float32)
    for bounds, k in (((100.0, 200.0), 10), ((9000.0, 9500.0), 9_990)):  # the threshold above / below
        counter = ties.KernelCounter(*bounds, _kernels(), cand)
        t, rounds = None, 0
        while t is None:
            counter.add_pair(c, base)
            t = counter.resolve(k)
            rounds += 1
        assert t == float(10_001 - k) and rounds == 2


def test_binding_errors_name_the_argument():
    k = _kernels()
    a = np.zeros(8, np.float32)
    with pytest.raises(TypeError, match="base: expected a float32 buffer"):
        k.ties_combine(np.zeros(8), [a], [-1.0], [1.0], True, 1.0, True, 1.0)
    with pytest.raises(ValueError, match=r"checkpoints\[1\]: 4 entries, base has 8"):
        k.ties_combine(a.copy(), [a, a[:4]], [-1.0, -1.0], [1.0, 1.0], True, 1.0, True, 1.0)
    with pytest.raises(ValueError, match="levels: expected 2 values, got 1"):
        k.ties_combine(a.copy(), [a, a], [-1.0], [1.0, 1.0], True, 1.0, True, 1.0)
    with pytest.raises(ValueError, match="checkpoints: expected 1 to"):
        k.ties_combine(a.copy(), [], [], [], True, 1.0, True, 1.0)
    with pytest.raises(TypeError, match="candidates: expected a float32 buffer"):
        k.ties_count(a, a, 0.0, 1.0, np.zeros(9, np.int32))
    with pytest.raises(ValueError, match="candidates: 8 entries, need 9"):
        k.ties_count(a, a, 0.0, 1.0, np.zeros(8, np.float32))
    with pytest.raises(ValueError, match="not writable|read-only"):
        ro = a.copy()
        ro.flags.writeable = False
        k.ties_combine(ro, [a], [-1.0], [1.0], True, 1.0, True, 1.0)


def test_bf16_binding_errors():
    k = _kernels()
    with pytest.raises(ValueError, match="raw: 6 bytes for 4 bfloat16 values"):
        k.bf16_widen(np.zeros(6, np.uint8), np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="out: 6 bytes for 4 bfloat16 values"):
        k.bf16_narrow(np.zeros(4, np.float32), np.zeros(3, np.uint16))
    with pytest.raises(TypeError, match="src: expected a float32 buffer"):
        k.bf16_narrow(np.zeros(4, np.float64), np.zeros(4, np.uint16))


def test_an_empty_tensor_merges_on_both_paths(tmp_path, monkeypatch):
    """A zero-size float tensor beside a real one: the numpy path yields one empty part (no zero-step range)."""
    import json

    from arm.merge.engine import merge_from_config
    from arm.merge.tensor_io import OutTensor, ShardedWriter

    folders = []
    for k in range(3):
        folder = tmp_path / f"m{k}"
        folder.mkdir()
        g = torch.Generator().manual_seed(k)
        tensors = {"a.weight": torch.randn(300, 70, generator=g), "empty.weight": torch.zeros(0, 5)}
        writer = ShardedWriter(folder, [OutTensor(n, "F32", tuple(t.shape)) for n, t in tensors.items()], 10**9)
        for n, t in tensors.items():
            writer.write_tensor(n, t)
        writer.close()
        (folder / "config.json").write_text(json.dumps({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}))
        folders.append(folder)
    written = []
    for backend in ("torch", "auto"):
        monkeypatch.setenv("ARM_MERGE_BACKEND", backend)
        out = tmp_path / f"out-{backend}"
        merge_from_config({"name": "ties", "device": "cpu", "density": 0.5}, folders[0], folders[1:], out, progress=False)
        written.append((out / "model.safetensors").read_bytes())
    assert written[0] == written[1]
