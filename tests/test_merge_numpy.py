"""The torch-free CPU path (numpy) of linear and task arithmetic gives the torch path's bits.

Kernels first (fused multiply-add, bfloat16 / float16 conversions, against torch on the values
where rounding is decided), then whole merges: bf16, fp16, fp32 and mixed-dtype models with tied
embeddings (and an explicit lm_head in one checkpoint), integer and bool buffers, special values,
tensors over several chunks, several parameter sets and output dtypes, one and two threads —
every output file byte for byte against ``ARM_MERGE_BACKEND=torch``.
"""

from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import arm.merge.engine as engine
from arm.merge import numpy_ops as nops
from arm.merge.engine import merge_from_config
from arm.merge.tensor_io import OutTensor, ShardedWriter

# ---------------------------------------------------------------------------------------------
# kernels


def _bits(x: torch.Tensor | np.ndarray) -> np.ndarray:
    a = x.numpy() if isinstance(x, torch.Tensor) else x
    return a.view(np.uint32 if a.dtype.itemsize == 4 else np.uint16)


def _rounding_patterns() -> np.ndarray:
    """Every finite float32 high half with the low halves that decide bf16 rounding."""
    hi = np.arange(1 << 16, dtype=np.uint32) << 16
    lows = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=np.uint32)
    u = (hi[:, None] | lows[None, :]).reshape(-1)
    f = u.view(np.float32)
    return f[np.isfinite(f)]


@pytest.fixture(params=["kernels", "numpy"])
def conversions(request, monkeypatch):
    """The bf16 conversions by arm/merge/_kernels.c (where built: always here) and by numpy's formulas."""
    if request.param == "numpy":
        monkeypatch.setattr(nops, "_KERNELS", None)
    else:
        assert nops._KERNELS is not None, "arm.merge._kernels is not built (setup.py)"
    return request.param


def test_bf16_narrowing_matches_torch(conversions):
    f = _rounding_patterns()
    stage = np.empty(f.size * 4, np.uint8)
    got = nops.store(f, "BF16", stage, np.empty(f.size, np.uint32))
    want = torch.from_numpy(f).to(torch.bfloat16).view(torch.uint16).numpy()
    assert np.array_equal(got, want)
    with np.errstate(all="ignore"):  # as the engine calls it (the finite check's sum may overflow)
        checked, finite = nops.store_checked(f, "BF16", np.empty(f.size * 4, np.uint8), np.empty(f.size, np.uint32))
    assert finite and np.array_equal(checked, want)
    for bad in (np.inf, -np.inf, np.nan):
        g = f[:1000].copy()
        g[517] = bad
        with np.errstate(all="ignore"):  # as the engine calls it
            assert nops.store_checked(g, "BF16", stage, np.empty(g.size, np.uint32))[1] is False


def test_f16_narrowing_matches_torch():
    f = _rounding_patterns()
    rng = np.random.default_rng(0)
    f = np.concatenate([f, (rng.standard_normal(1 << 16) * 1e-5).astype(np.float32)])  # subnormals
    with np.errstate(all="ignore"):
        got = nops.store(f, "F16", np.empty(f.size * 4, np.uint8), np.empty(f.size, np.uint32))
    want = torch.from_numpy(f).to(torch.float16).numpy()
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_widening_matches_torch(dtype, conversions):
    raw = np.arange(1 << 16, dtype=np.uint16)
    tdt = torch.bfloat16 if dtype == "BF16" else torch.float16
    want = torch.from_numpy(raw.view(np.int16).copy()).view(tdt).to(torch.float32).numpy()
    got = nops.load_float32(raw.view(np.uint8), dtype, np.empty(1 << 16, np.float32))
    finite = np.isfinite(want)
    assert np.array_equal(_bits(got)[finite], _bits(want)[finite])
    assert np.array_equal(np.isnan(got), np.isnan(want))


@pytest.mark.parametrize("alpha", [0.3, 0.7, -0.4, 1.0, -1.0, 0.0, 1.5, 3.0, 1e-30, 2.0**-23])
def test_add_scaled_is_torch_fma(alpha):
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    n = (1 << 16) + 13  # the vectorised kernel and its scalar tail
    a = torch.randn(n, generator=g)
    b = torch.randn(n, generator=g) * torch.logspace(-30, 30, n).to(torch.float32)
    a[:4] = torch.tensor([0.0, -0.0, 1e-45, -1e-40])
    b[:4] = torch.tensor([-0.0, 0.0, -1e-45, 1e-40])
    want = a.clone().add_(b, alpha=alpha)
    got = a.numpy().copy()
    with np.errstate(all="ignore"):
        nops.add_scaled_(got, b.numpy(), alpha, nops.NumpyWorkspace())
    assert np.array_equal(_bits(got), _bits(want))


def test_add_scaled_avoids_double_rounding():
    # a + w·b lies just below a float32 midpoint: rounded to float64 first it lands on the
    # midpoint and ties to even (one float32 ulp too far); fma rounds once
    one_ulp = np.float32(2.0**-23)
    a = np.array([1 + one_ulp], np.float32)
    b = np.array([2.0**-24 * (1 - 2.0**-23)], np.float32)
    w = float(1 + one_ulp)
    naive = (a.astype(np.float64) + np.float64(np.float32(w)) * b.astype(np.float64)).astype(np.float32)
    want = torch.from_numpy(a.copy()).add_(torch.from_numpy(b), alpha=w).numpy()
    got = a.copy()
    nops.add_scaled_(got, b, w, nops.NumpyWorkspace())
    assert _bits(naive) != _bits(want)  # the case is real
    assert np.array_equal(_bits(got), _bits(want))


# ---------------------------------------------------------------------------------------------
# whole merges

SHAPES = {
    "model.embed_tokens.weight": (301, 117),  # several chunks of the patched chunk size
    "model.layers.0.mlp.up_proj.weight": (67, 33),
    "model.layers.0.input_layernorm.weight": (33,),
    "model.norm.weight": (11,),
    "model.rotary.inv_freq_int": (9,),
    "model.mask_bool": (5,),
}
TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def _build(root: Path, dtypes: dict[str, str], lm_head_in_last: bool = False) -> list[Path]:
    folders = []
    for k in range(4):
        tensors: dict[str, torch.Tensor] = {}
        for name, shape in SHAPES.items():
            if name.endswith("_int"):
                tensors[name] = torch.arange(shape[0], dtype=torch.int64) * (k + 1)
            elif name.endswith("_bool"):
                tensors[name] = torch.arange(shape[0]) % (k + 2) == 0
            else:
                g = torch.Generator().manual_seed(zlib.crc32(f"{name}/{k}".encode()))
                shared = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                v = torch.randn(shape, generator=shared) * 0.02 + torch.randn(shape, generator=g) * 0.002 * k
                st = dtypes.get(name, dtypes["*"])
                big = 6e4 if st == "F16" else 1e30
                v.view(-1)[:7] = torch.tensor([0.0, -0.0, 1e-40, -1e-41, big, -1e-8, 1.0])
                tensors[name] = v.to(TORCH_DTYPES[st])
        if lm_head_in_last and k == 3:
            tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] * 1.5
        folder = root / ("base" if k == 0 else f"checkpoint-{k}")
        folder.mkdir(parents=True)
        plan = [
            OutTensor(
                n,
                {v: s for s, v in TORCH_DTYPES.items()}.get(t.dtype)
                or {torch.int64: "I64"}.get(t.dtype, "BOOL"),
                tuple(t.shape),
            )
            for n, t in tensors.items()
        ]
        writer = ShardedWriter(folder, plan, 60_000)  # several shards
        for n, t in tensors.items():
            writer.write_tensor(n, t)
        writer.close()
        config = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "tie_word_embeddings": True}
        (folder / "config.json").write_text(json.dumps(config))
        folders.append(folder)
    return folders


PARAMS = [
    ("linear", {}),
    ("linear", {"weights": [0.3, 0.5, 0.2]}),
    ("linear", {"weights": [1.0, 2.0, 0.5], "normalize": False}),
    ("linear", {"weights": [0.7, 1.3, -0.4], "base_weight": 0.25}),
    ("task_arithmetic", {}),
    ("task_arithmetic", {"weights": [0.3, 0.7, 1.1], "lambda": 0.8, "normalize": True}),
    ("task_arithmetic", {"weights": [1.0, -1.0, 0.5], "lambda": 1.5}),
]
MODELS = {
    "bf16": ({"*": "BF16"}, False),
    "bf16-no-kernels": ({"*": "BF16"}, False),  # the numpy path's own bf16 conversions (nops._KERNELS off)
    "f16": ({"*": "F16"}, False),
    "f32": ({"*": "F32"}, False),
    "mixed": ({"*": "BF16", "model.norm.weight": "F32", "model.layers.0.mlp.up_proj.weight": "F16"}, True),
}


MIN_COMPARED = {"bf16": 56, "bf16-no-kernels": 56, "f16": 56, "f32": 56, "mixed": 56}
"""Byte-compared (parameters, output dtype, threads) cells per model, out of 7 x 4 x 2 = 56: today every
cell. A cell where both paths refuse (the non-finite check) compares no bytes; lowering a number here
needs a reason."""


def _run(monkeypatch, backend: str, threads: str, cfg: dict, folders: list[Path], out: Path) -> dict | str:
    monkeypatch.setenv("ARM_MERGE_BACKEND", backend)
    monkeypatch.setenv("ARM_MERGE_THREADS", threads)
    try:
        summary = merge_from_config(cfg, folders[0], folders[1:], out, progress=False)
    except ValueError as err:  # the non-finite check
        return f"{type(err).__name__}: {err}"
    summary.pop("wall_s")
    summary.pop("out_dir")
    return summary


def _assert_same_files(got: Path, want: Path, case: tuple) -> None:
    """The same file names in both output folders, and every file the same bytes."""
    names = sorted(p.name for p in want.iterdir())
    assert names == sorted(p.name for p in got.iterdir()), case
    for name in names:
        assert (got / name).read_bytes() == (want / name).read_bytes(), (*case, name)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_numpy_path_is_bit_identical_to_torch(tmp_path, monkeypatch, model):
    dtypes, lm_head = MODELS[model]
    if model.endswith("no-kernels"):
        monkeypatch.setattr(nops, "_KERNELS", None)
    folders = _build(tmp_path / "in", dtypes, lm_head)
    monkeypatch.setattr(engine, "NUMPY_CHUNK", 5000)
    monkeypatch.setattr(engine, "CPU_CHUNK", 7000)
    used_numpy = []
    real_pool = engine._NumpyPool

    def spy(*args, **kwargs):
        used_numpy.append(True)
        return real_pool(*args, **kwargs)

    monkeypatch.setattr(engine, "_NumpyPool", spy)
    compared = errors = 0
    for i, (method, params) in enumerate(PARAMS):
        for dtype in (None, "float32", "bfloat16", "float16"):
            cfg = {"name": method, "device": "cpu", "dtype": dtype, "shard_size": 50_000, **params}
            ref = _run(monkeypatch, "torch", "1", cfg, folders, tmp_path / f"torch-{i}-{dtype}")
            for threads in ("1", "2"):
                used_numpy.clear()
                out = tmp_path / f"numpy-{i}-{dtype}-{threads}"
                got = _run(monkeypatch, "auto", threads, cfg, folders, out)
                assert used_numpy, "the numpy path was not taken"
                assert got == ref, (method, params, dtype)
                if isinstance(ref, str):  # both paths refused (the non-finite check): the same error, no files
                    errors += 1
                    continue
                compared += 1
                _assert_same_files(out, tmp_path / f"torch-{i}-{dtype}", (method, params, dtype))
    # A refusal on both sides compares no bytes: the grid must still compare files in most of its cells.
    assert compared >= MIN_COMPARED[model] and compared + errors == len(PARAMS) * 4 * 2, (model, compared, errors)


def test_numpy_path_overflow_error_is_the_torch_one(tmp_path, monkeypatch):
    folders = _build(tmp_path / "in", {"*": "F32"})
    cfg = {"name": "linear", "device": "cpu", "weights": [1e10, 1e10, 1e10], "normalize": False}
    ref = _run(monkeypatch, "torch", "1", cfg, folders, tmp_path / "a")
    got = _run(monkeypatch, "auto", "2", cfg, folders, tmp_path / "b")
    assert isinstance(ref, str) and "not finite" in ref
    assert got == ref
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("cfg", [{"name": "linear"}, {"name": "ties", "density": 0.5}])  # TIES: by its C kernels
def test_numpy_path_does_not_import_torch(tmp_path, cfg):
    import subprocess

    folders = _build(tmp_path / "in", {"*": "BF16"})
    code = (
        "import sys; from pathlib import Path; from arm.merge.engine import merge_from_config; "
        f"merge_from_config({{**{cfg!r}, 'device': 'cpu'}}, Path({str(folders[0])!r}), "
        f"[Path(p) for p in {[str(f) for f in folders[1:]]!r}], Path({str(tmp_path / 'out')!r}), progress=False); "
        "print('torch' in sys.modules)"
    )
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"


def test_numpy_path_only_where_it_applies(tmp_path, monkeypatch):
    from baselines.linear import Linear

    folders = _build(tmp_path / "in", {"*": "BF16"})
    base_f, ck_f = engine.open_folders(folders[0], folders[1:])
    plan = engine.plan_merge(base_f, ck_f, None)
    used = [False, True, True, True]
    assert engine._numpy_path(Linear(3), plan, used)

    class Scaled(Linear):  # overrides combine only: must not inherit the numpy twin
        def combine(self, base, checkpoints, out):
            return super().combine(base, checkpoints, out).mul_(2)

    assert not engine._numpy_path(Scaled(3), plan, used)
    monkeypatch.setenv("ARM_MERGE_BACKEND", "torch")
    assert not engine._numpy_path(Linear(3), plan, used)
    monkeypatch.delenv("ARM_MERGE_BACKEND")
    plan64 = engine.plan_merge(base_f, ck_f, None)
    name = plan64.names[0]
    info = plan64.inputs[name][1]
    plan64.inputs[name][1] = type(info)(info.name, info.file, "F64", info.shape, info.offset, info.nbytes * 4)
    assert not engine._numpy_path(Linear(3), plan64, used)


# ---------------------------------------------------------------------------------------------
# TIES: the numpy path with the C kernels (arm/merge/_kernels.c) against the torch path

TIES_PARAMS = [
    {"density": 0.5},
    {"density": 0.2, "weights": [0.3, 0.5, 0.2]},
    {"density": [0.3, 0.6, 0.9], "weights": [1.0, -0.5, 0.7], "normalize": False, "lambda": 0.8},
    {"density": 0.7, "weights": [2.0, 0.0, 0.5], "lambda": 1.3},
    {"density": 1.0},
    {"density": 0.4, "trim": "global"},  # the torch pool (its prepare pass) with the kernels' combine
]


@pytest.mark.parametrize("model", sorted(MODELS))
def test_ties_kernels_are_bit_identical_to_torch(tmp_path, monkeypatch, model):
    """Every TIES option, each output dtype, one and two threads; sizes patched so that every tensor
    takes another of TIES's three ways to its thresholds: exact selection (norms), bracket and count
    in memory (up_proj), and the streamed passes (the embedding, over several chunks)."""
    from baselines import ties

    dtypes, lm_head = MODELS[model]
    if model.endswith("no-kernels"):  # numpy's bf16 conversions around TIES's kernels
        monkeypatch.setattr(nops, "_KERNELS", None)
    folders = _build(tmp_path / "in", dtypes, lm_head)
    monkeypatch.setattr(engine, "NUMPY_CHUNK", 5000)
    monkeypatch.setattr(engine, "CPU_CHUNK", 7000)
    monkeypatch.setattr(ties, "_EXACT_BELOW", 1000)  # up_proj (2,211 entries) and the embedding count
    monkeypatch.setattr(ties, "_IN_MEMORY", 20_000)  # the embedding (35,217 entries) streams
    numpy_pool = []
    real_pool = engine._NumpyPool
    monkeypatch.setattr(engine, "_NumpyPool", lambda *a, **k: numpy_pool.append(1) or real_pool(*a, **k))
    compared = 0
    for i, params in enumerate(TIES_PARAMS):
        for dtype in (None, "bfloat16", "float32"):
            cfg = {"name": "ties", "device": "cpu", "dtype": dtype, "shard_size": 50_000, **params}
            ref = _run(monkeypatch, "torch", "1", cfg, folders, tmp_path / f"torch-{i}-{dtype}")
            for threads in ("1", "2"):
                numpy_pool.clear()
                out = tmp_path / f"kernels-{i}-{dtype}-{threads}"
                got = _run(monkeypatch, "auto", threads, cfg, folders, out)
                assert bool(numpy_pool) == (params.get("trim") != "global"), params
                assert got == ref, (params, dtype)
                if isinstance(ref, str):
                    continue
                compared += 1
                _assert_same_files(out, tmp_path / f"torch-{i}-{dtype}", (params, dtype))
    assert compared == len(TIES_PARAMS) * 3 * 2, compared


def test_threaded_copies_reuse_their_buffers(tmp_path):
    """With several threads, merged chunks wait for their turn in recycled buffers: a written piece's buffer
    serves the next tensor (fresh arrays per chunk page-faulted ~2 s of system time on the 1.5B bench model)."""
    from baselines.linear import Linear

    folders = _build(tmp_path / "in", {"*": "BF16"})
    base_f, ck_f = engine.open_folders(folders[0], folders[1:])
    plan = engine.plan_merge(base_f, ck_f, None)
    pool = engine._NumpyPool(Linear(3), [False, True, True, True], 5000)
    name = "model.embed_tokens.weight"
    target = plan.out[plan.names.index(name)]
    first = list(pool.merge_tensor(name, target, plan.inputs[name], copy=True))
    assert len(first) == 8 and len(pool._pooled) == 8 and not pool._spare  # 35,217 entries in chunks of 5,000
    want = [p.copy() for p in first]
    for p in first:
        pool.release(p)
    pool.release(np.zeros(3, np.uint16))  # not a pooled copy: ignored
    again = list(pool.merge_tensor(name, target, plan.inputs[name], copy=True))
    assert len(pool._pooled) == 8  # no new buffers
    assert all(np.array_equal(a, b) for a, b in zip(again, want, strict=True))
    pool.close()
