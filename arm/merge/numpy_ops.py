"""Torch-free twins of the float32 CPU ops that element-wise rules and the merge engine use.

A CPU merge of an element-wise rule that has a ``combine_numpy`` (linear, task arithmetic), or of
a rule with a ``merge_numpy`` (TIES, whose arithmetic is in arm/merge/_kernels.c), runs on numpy
alone, so the command never imports torch (about 2 s of start-up, more than the merge of
a 0.5B model). Every function here gives the same bits as the torch op it replaces, on the same
float32 inputs (``tests/test_merge_numpy.py`` compares both paths over bf16, fp16 and fp32 models):

* Python scalars are rounded to float32 first, as torch does for a float32 tensor;
* ``out.add_(x, alpha=w)`` is a fused multiply-add in torch's vectorised CPU kernels
  (``fmadd(x, alpha, out)``: one rounding), so for ``w`` other than ±1 it is computed exactly in
  float64 (``w·x`` of two float32 values is exact there), the sum rounded to odd and then to
  float32 — round-to-odd at 53 bits followed by round-to-nearest at 24 bits is the correctly
  rounded result, which plain float64 rounding twice is not always;
* bfloat16 is handled as uint16 bit patterns: widened with ``<< 16`` (exact) and narrowed with
  round-to-nearest-even as in ``c10::BFloat16`` (non-finite values never get there: the engine
  rejects them first) — each in one pass by arm/merge/_kernels.c where it is built, the same
  formulas; float16 conversions are IEEE round-to-nearest-even in both libraries.

The element-wise ops run with numpy's floating point warnings off (overflow is checked by the
engine, as in the torch path).
"""

from __future__ import annotations

from typing import Any

import numpy as np

try:  # arm/merge/_kernels.c (built by setup.py): bfloat16 conversions in one pass, the same bits
    from arm.merge import _kernels as _KERNELS
except ImportError:  # not built: the numpy formulas below
    _KERNELS = None

# safetensors dtypes the numpy path reads and writes as floats
FLOAT_DTYPES = ("F32", "F16", "BF16")
_F64 = np.float64


class NumpyWorkspace:
    """Reusable 1-D scratch arrays (fresh multi-MB arrays page-fault on first touch)."""

    def __init__(self) -> None:
        self._buffers: dict[str, np.ndarray] = {}

    def get(self, key: str, numel: int, dtype: Any = np.float32) -> np.ndarray:
        buf = self._buffers.get(key)
        if buf is None or buf.size < numel or buf.dtype != np.dtype(dtype):
            buf = np.empty(numel, dtype=dtype)
            self._buffers[key] = buf
        return buf[:numel]


def f32(value: float) -> np.float32:
    """A Python scalar as torch applies it to a float32 tensor (rounded to float32)."""
    return np.float32(value)


def mul(x: np.ndarray, w: float, out: np.ndarray) -> np.ndarray:
    """``torch.mul(x, w, out=out)``."""
    return np.multiply(x, f32(w), out=out)


def div_(out: np.ndarray, d: float) -> np.ndarray:
    """``out.div_(d)``."""
    return np.divide(out, f32(d), out=out)


def mul_(out: np.ndarray, w: float) -> np.ndarray:
    """``out.mul_(w)``."""
    return np.multiply(out, f32(w), out=out)


def add_scaled_(out: np.ndarray, x: np.ndarray, alpha: float, ws: NumpyWorkspace) -> np.ndarray:
    """``out.add_(x, alpha=alpha)`` for float32 arrays: ``out + alpha·x`` rounded once (fma)."""
    a32 = f32(alpha)
    if a32 == 1:
        return np.add(out, x, out=out)
    if a32 == -1:
        return np.subtract(out, x, out=out)
    n = out.size
    a = ws.get("fma.a", n, _F64)
    p = ws.get("fma.p", n, _F64)
    s = ws.get("fma.s", n, _F64)
    t = ws.get("fma.t", n, _F64)
    np.copyto(a, out)  # exact
    np.multiply(x, _F64(a32), out=p, dtype=_F64)  # exact: 24 x 24 significant bits
    np.add(a, p, out=s)  # s = RN53(a + p)
    # TwoSum: e = (a + p) - s exactly, into t
    np.subtract(s, a, out=t)  # bb
    np.subtract(p, t, out=p)  # p - bb
    np.subtract(s, t, out=t)  # s - bb
    np.subtract(a, t, out=t)  # a - (s - bb)
    np.add(t, p, out=t)  # e
    # round to odd: truncate s towards zero (one step down in magnitude where it was rounded
    # away from zero, i.e. where e and s have opposite signs), then set the last bit if inexact
    inexact = ws.get("fma.inexact", n, np.bool_)
    away = ws.get("fma.away", n, np.bool_)
    pos = ws.get("fma.pos", n, np.bool_)
    np.not_equal(t, 0, out=inexact)
    np.greater(t, 0, out=away)
    np.greater(s, 0, out=pos)
    np.not_equal(away, pos, out=away)
    np.logical_and(away, inexact, out=away)
    bits = s.view(np.int64)
    np.subtract(bits, away, out=bits, casting="unsafe")
    np.bitwise_or(bits, inexact, out=bits, casting="unsafe")
    np.copyto(out, s, casting="same_kind")  # round to nearest even float32
    return out


# ---------------------------------------------------------------------------------------------
# dtype conversions (raw safetensors bytes <-> float32)


def load_float32(raw: np.ndarray, st_dtype: str, out: np.ndarray) -> np.ndarray:
    """Widen the bytes ``raw`` (uint8) of ``out.size`` elements of ``st_dtype`` into ``out``."""
    if st_dtype == "BF16":
        if _KERNELS is not None:
            _KERNELS.bf16_widen(raw, out)
        else:
            np.left_shift(raw.view(np.uint16), 16, out=out.view(np.uint32), dtype=np.uint32)
    elif st_dtype == "F16":
        np.copyto(out, raw.view(np.float16))
    elif st_dtype == "F32":
        np.copyto(out, raw.view(np.float32))
    else:  # pragma: no cover - the engine only routes these dtypes here
        raise ValueError(f"numpy path: unsupported input dtype {st_dtype}")
    return out


def store(part: np.ndarray, st_dtype: str, stage: np.ndarray, tmp: np.ndarray) -> np.ndarray:
    """``part`` (float32) in ``st_dtype``, in the uint8 buffer ``stage`` (``tmp``: uint32 scratch of
    ``part.size``); float32 output is ``part`` itself."""
    n = part.size
    if st_dtype == "F32":
        return part
    if st_dtype == "F16":
        out16 = stage[: 2 * n].view(np.float16)
        np.copyto(out16, part, casting="same_kind")
        return out16
    if st_dtype == "BF16":
        u = part.view(np.uint32)
        np.right_shift(u, 16, out=tmp)
        np.bitwise_and(tmp, 1, out=tmp)
        np.add(tmp, 0x7FFF, out=tmp)
        np.add(tmp, u, out=tmp)  # (u + 0x7FFF + lsb) mod 2^32, as c10::BFloat16
        out16 = stage[: 2 * n].view(np.uint16)
        np.right_shift(tmp, 16, out=tmp)  # the high halves, then a contiguous narrowing copy: faster than
        np.copyto(out16, tmp, casting="unsafe")  # a strided copy of the uint16 halves (199 vs 239 us per 2^18)
        return out16
    raise ValueError(f"numpy path: unsupported output dtype {st_dtype}")  # pragma: no cover


def store_checked(part: np.ndarray, st_dtype: str, stage: np.ndarray, tmp: np.ndarray) -> tuple[np.ndarray | None, bool]:
    """(:func:`store`, whether every value of ``part`` is finite); the engine refuses a tensor with a
    non-finite value (then nothing of the output is meaningful). bfloat16 output with the C kernels:
    one pass for both."""
    if st_dtype == "BF16" and _KERNELS is not None:
        out16 = stage[: 2 * part.size].view(np.uint16)
        return out16, _KERNELS.bf16_narrow(part, out16)
    if not all_finite(part):
        return None, False
    return store(part, st_dtype, stage, tmp), True


def all_finite(part: np.ndarray) -> bool:
    """The engine's check of a merged chunk (a finite sum, else every entry)."""
    return bool(np.isfinite(np.add.reduce(part))) or bool(np.isfinite(part).all())
