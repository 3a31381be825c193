/* Fused CPU kernels for TIES (baselines/ties.py) and the numpy path's bfloat16 conversions
 * (arm/merge/numpy_ops.py), built by setuptools as arm.merge._kernels.
 *
 * Each kernel does in one pass over a chunk what the torch path does in many (22 passes of the
 * combine for three checkpoints, five for the threshold count), with the same float32 operations
 * in the same order on every entry, so the results are the torch path's bit for bit
 * (tests/test_ties_kernels.py checks this on planted edge cases: ties at the threshold, signed
 * zeros, cancelling sums, negative weights, every option). Hence:
 *   - built with -ffp-contract=off (no fused multiply-adds: torch rounds each product) and
 *     without -ffast-math (signed zeros, NaN and comparisons keep IEEE semantics);
 *   - each helper below states the torch operation it reproduces, including its signed-zero
 *     and NaN behaviour (torch 2.13 on CPU, vectorised and scalar loops alike).
 * The GIL is released while a kernel runs, so the engine's merge threads run them in parallel.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 512 /* entries per block: a block's temporaries stay in L1 */
#define MAX_INPUTS 256

/* x86-64: each kernel is compiled for AVX-512, AVX2 and the baseline, chosen at load time by the
   CPU (the same operations on every path, so the same bits; only the vector width differs). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define HAVE_AVX512_COMPRESS 1
#include <immintrin.h>
#else
#define CLONES
#endif

/* torch.hardshrink(x, level): 0 where -level <= x <= level, else x (NaN kept). level < 0: no-op. */
static inline float hardshrink(float x, float level) { return (x >= -level && x <= level) ? 0.0f : x; }

/* torch.sign on float: +1, -1, or +0 (for ±0 and NaN). */
static inline float sign_of(float x) { return (float)((x > 0.0f) - (x < 0.0f)); }

/* Tensor.clamp_min_(m): m where x < m, else x (NaN and -0 kept, as _mm*_max_ps(m, x)). */
static inline float clamp_min(float x, float m) { return x < m ? m : x; }

typedef struct {
    int n_inputs;
    const float *levels;  /* hardshrink level per checkpoint; < 0: not trimmed */
    const float *weights; /* w_i as float32 (torch casts a Python scalar to the tensor's dtype) */
    int normalize;
    int all_positive;
    float wmin; /* min w_i (all_positive) */
    float lam;
    int lam_is_one;
    int w0_is_one;
} ties_params;

/* TIES on entries [0, m) of one block: base[i] <- θ0 + λ·merge, as baselines.ties.DeltaCombiner
 * (consensus) computes it from deltas d_j = c_j − θ0 (Tensor.sub_). */
CLONES static void ties_block(float *restrict base, const float *const *cks, Py_ssize_t m, const ties_params *p,
                       float *restrict tmp, float *restrict ss, float *restrict dv)
{
    const int J = p->n_inputs;
    /* trim (hardshrink), weight (mul_ unless w == 1), and the sign-election sum:
       ss = (x0 + x1) + x2 + ... in the torch path's order */
    for (int j = 0; j < J; j++) {
        const float *restrict c = cks[j];
        float *restrict x = tmp + (size_t)j * BLOCK;
        const float level = p->levels[j], w = p->weights[j];
        if (w == 1.0f) {
            for (Py_ssize_t i = 0; i < m; i++) x[i] = hardshrink(c[i] - base[i], level);
        } else {
            for (Py_ssize_t i = 0; i < m; i++) x[i] = hardshrink(c[i] - base[i], level) * w;
        }
        if (j == 0) {
            for (Py_ssize_t i = 0; i < m; i++) ss[i] = x[i];
        } else {
            for (Py_ssize_t i = 0; i < m; i++) ss[i] = ss[i] + x[i];
        }
    }
    /* elected sign sg = copysign(1, ss), kept in ss; agreeing magnitudes max(x·sg, 0) summed into
       x0 (mx); the divisor: Σ w_j · sign(agreeing magnitude) */
    for (Py_ssize_t i = 0; i < m; i++) ss[i] = copysignf(1.0f, ss[i]);
    float *restrict mx = tmp;
    for (int j = 0; j < J; j++) {
        float *restrict x = tmp + (size_t)j * BLOCK;
        const float w = p->weights[j];
        for (Py_ssize_t i = 0; i < m; i++) x[i] = clamp_min(x[i] * ss[i], 0.0f);
        if (p->normalize) {
            if (j == 0) {
                if (p->w0_is_one) {
                    for (Py_ssize_t i = 0; i < m; i++) dv[i] = sign_of(x[i]);
                } else {
                    for (Py_ssize_t i = 0; i < m; i++) dv[i] = sign_of(x[i]) * w;
                }
            } else {
                /* dv.add_(sign, alpha=w): torch fuses w·sign + dv, exact either way (sign is 0 or ±1) */
                for (Py_ssize_t i = 0; i < m; i++) dv[i] = dv[i] + w * sign_of(x[i]);
            }
        }
        if (j > 0) {
            for (Py_ssize_t i = 0; i < m; i++) mx[i] = mx[i] + x[i];
        }
    }
    if (!p->normalize) {
        if (p->lam_is_one) {
            for (Py_ssize_t i = 0; i < m; i++) base[i] = base[i] + mx[i] * ss[i];
        } else {
            for (Py_ssize_t i = 0; i < m; i++) base[i] = base[i] + (mx[i] * ss[i]) * p->lam;
        }
        return;
    }
    if (p->all_positive) {
        for (Py_ssize_t i = 0; i < m; i++) dv[i] = clamp_min(dv[i], p->wmin) * ss[i];
    } else {
        for (Py_ssize_t i = 0; i < m; i++) dv[i] = (dv[i] == 0.0f ? 1.0f : dv[i]) * ss[i];
    }
    if (p->lam_is_one) { /* base.addcdiv_(mx, dv) */
        for (Py_ssize_t i = 0; i < m; i++) base[i] = base[i] + mx[i] / dv[i];
    } else {
        for (Py_ssize_t i = 0; i < m; i++) base[i] = base[i] + (mx[i] / dv[i]) * p->lam;
    }
}

/* Count |c − b| > hi and copy the |c − b| with lo <= |c − b| <= hi into cand (NaN: neither). */
static Py_ssize_t count_scalar(const float *restrict c, const float *restrict b, Py_ssize_t n, float lo, float hi,
                              float *restrict cand, Py_ssize_t *above)
{
    Py_ssize_t k = 0, a = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        const float v = fabsf(c[i] - b[i]);
        a += v > hi;
        cand[k] = v;
        k += (v >= lo) & (v <= hi);
    }
    *above += a;
    return k;
}

#ifdef HAVE_AVX512_COMPRESS
/* count_scalar with AVX-512's compress-store: 16 entries a step (|x| clears the sign bit, as fabsf;
   ordered comparisons are false for NaN, as in C). */
__attribute__((target("avx512f"))) static Py_ssize_t count_avx512(const float *c, const float *b, Py_ssize_t n,
                                                                  float lo, float hi, float *cand, Py_ssize_t *above)
{
    const __m512 vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi);
    Py_ssize_t k = 0, a = 0, i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 v = _mm512_abs_ps(_mm512_sub_ps(_mm512_loadu_ps(c + i), _mm512_loadu_ps(b + i)));
        __mmask16 gt = _mm512_cmp_ps_mask(v, vhi, _CMP_GT_OQ);
        __mmask16 in = _mm512_cmp_ps_mask(v, vlo, _CMP_GE_OQ) & _mm512_cmp_ps_mask(v, vhi, _CMP_LE_OQ);
        a += __builtin_popcount((unsigned)gt);
        _mm512_mask_compressstoreu_ps(cand + k, in, v);
        k += __builtin_popcount((unsigned)in);
    }
    *above += a;
    return k + count_scalar(c + i, b + i, n - i, lo, hi, cand + k, above);
}
#endif

static Py_ssize_t count_block(const float *c, const float *b, Py_ssize_t n, float lo, float hi, float *cand,
                              Py_ssize_t *above)
{
#ifdef HAVE_AVX512_COMPRESS
    if (__builtin_cpu_supports("avx512f")) return count_avx512(c, b, n, lo, hi, cand, above);
#endif
    return count_scalar(c, b, n, lo, hi, cand, above);
}

/* bfloat16 <-> float32 for the engine's numpy path (arm/merge/numpy_ops.py): widening is exact (the
   bf16 bits are the float32's high half); narrowing rounds to nearest even as c10::BFloat16 does,
   (u + 0x7FFF + lsb) >> 16, and reports whether every value was finite (the engine refuses the
   tensor otherwise, so a non-finite value's bits are never written). */
CLONES static void widen_bf16(const uint16_t *restrict src, float *restrict dst, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t u = (uint32_t)src[i] << 16;
        memcpy(dst + i, &u, 4);
    }
}

CLONES static int narrow_bf16(const float *restrict src, uint16_t *restrict dst, Py_ssize_t n)
{
    uint32_t bad = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, src + i, 4);
        bad |= (u & 0x7F800000u) == 0x7F800000u;
        dst[i] = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    }
    return bad == 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Python bindings: float32 C-contiguous buffers (numpy arrays, or torch tensors via .numpy()) */

static int get_f32(PyObject *obj, Py_buffer *view, int writable, const char *what)
{
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) != 0) return -1;
    const char *fmt = view->format ? view->format : "B";
    size_t len = strlen(fmt);
    if (view->itemsize != 4 || len == 0 || fmt[len - 1] != 'f' || (len == 2 && fmt[0] != '<' && fmt[0] != '=' && fmt[0] != '@')) {
        PyErr_Format(PyExc_TypeError, "%s: expected a float32 buffer, got format %s", what, fmt);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static int get_floats(PyObject *seq, float *out, Py_ssize_t n, const char *what)
{
    PyObject *fast = PySequence_Fast(seq, what);
    if (!fast) return -1;
    if (PySequence_Fast_GET_SIZE(fast) != n) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zd values, got %zd", what, n, PySequence_Fast_GET_SIZE(fast));
        Py_DECREF(fast);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        double v = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(fast, i));
        if (v == -1.0 && PyErr_Occurred()) {
            Py_DECREF(fast);
            return -1;
        }
        out[i] = (float)v;
    }
    Py_DECREF(fast);
    return 0;
}

PyDoc_STRVAR(ties_combine_doc,
"ties_combine(base, checkpoints, levels, weights, normalize, lam, all_positive, wmin)\n\n"
"In place: base <- base + lam * TIES(checkpoints - base), float32, element by element as\n"
"baselines.ties.DeltaCombiner(consensus=True). levels: hardshrink level per checkpoint\n"
"(negative: no trim); weights: w_i; all_positive: every w_i > 0 (then the divisor is clamped\n"
"to wmin = min w_i, else a zero divisor becomes 1). Buffers float32, C-contiguous, one length.");

static PyObject *ties_combine(PyObject *self, PyObject *args)
{
    PyObject *base_obj, *cks_obj, *levels_obj, *weights_obj;
    int normalize, all_positive;
    double lam, wmin;
    if (!PyArg_ParseTuple(args, "OOOOpdpd", &base_obj, &cks_obj, &levels_obj, &weights_obj, &normalize, &lam,
                          &all_positive, &wmin))
        return NULL;
    PyObject *cks = PySequence_Fast(cks_obj, "checkpoints: expected a sequence of buffers");
    if (!cks) return NULL;
    Py_ssize_t J = PySequence_Fast_GET_SIZE(cks);
    if (J < 1 || J > MAX_INPUTS) {
        Py_DECREF(cks);
        return PyErr_Format(PyExc_ValueError, "checkpoints: expected 1 to %d buffers, got %zd", MAX_INPUTS, J);
    }
    Py_buffer bview, views[MAX_INPUTS];
    float levels[MAX_INPUTS], weights[MAX_INPUTS];
    Py_ssize_t got = 0;
    PyObject *result = NULL;
    float *scratch = NULL;
    if (get_f32(base_obj, &bview, 1, "base") != 0) {
        Py_DECREF(cks);
        return NULL;
    }
    Py_ssize_t n = bview.len / 4;
    for (; got < J; got++) {
        if (get_f32(PySequence_Fast_GET_ITEM(cks, got), &views[got], 0, "checkpoints") != 0) goto done;
        if (views[got].len != bview.len) {
            PyErr_Format(PyExc_ValueError, "checkpoints[%zd]: %zd entries, base has %zd", got, views[got].len / 4, n);
            got++;
            goto done;
        }
    }
    if (get_floats(levels_obj, levels, J, "levels") != 0 || get_floats(weights_obj, weights, J, "weights") != 0)
        goto done;
    ties_params p = {(int)J, levels, weights, normalize, all_positive, (float)wmin, (float)lam, (float)lam == 1.0f,
                     weights[0] == 1.0f};
    scratch = (float *)malloc(sizeof(float) * (size_t)BLOCK * (size_t)(J + 2));
    if (!scratch) {
        PyErr_NoMemory();
        goto done;
    }
    {
        float *out = (float *)bview.buf;
        const float *src[MAX_INPUTS];
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t s = 0; s < n; s += BLOCK) {
            Py_ssize_t m = n - s < BLOCK ? n - s : BLOCK;
            for (Py_ssize_t j = 0; j < J; j++) src[j] = (const float *)views[j].buf + s;
            ties_block(out + s, src, m, &p, scratch + 2 * BLOCK, scratch, scratch + BLOCK);
        }
        Py_END_ALLOW_THREADS
    }
    Py_INCREF(Py_None);
    result = Py_None;
done:
    free(scratch);
    for (Py_ssize_t j = 0; j < got; j++) PyBuffer_Release(&views[j]);
    PyBuffer_Release(&bview);
    Py_DECREF(cks);
    return result;
}

PyDoc_STRVAR(ties_count_doc,
"ties_count(checkpoint, base, lo, hi, candidates) -> (above, kept)\n\n"
"Over |checkpoint - base| (float32): how many exceed hi, and the kept values with\n"
"lo <= |d| <= hi copied to the front of candidates (a float32 buffer of at least len + 1 entries).");

static PyObject *ties_count(PyObject *self, PyObject *args)
{
    PyObject *c_obj, *b_obj, *cand_obj;
    double lo, hi;
    if (!PyArg_ParseTuple(args, "OOddO", &c_obj, &b_obj, &lo, &hi, &cand_obj)) return NULL;
    Py_buffer cv, bv, kv;
    if (get_f32(c_obj, &cv, 0, "checkpoint") != 0) return NULL;
    if (get_f32(b_obj, &bv, 0, "base") != 0) {
        PyBuffer_Release(&cv);
        return NULL;
    }
    if (get_f32(cand_obj, &kv, 1, "candidates") != 0) {
        PyBuffer_Release(&cv);
        PyBuffer_Release(&bv);
        return NULL;
    }
    PyObject *result = NULL;
    Py_ssize_t n = cv.len / 4;
    if (bv.len != cv.len) {
        PyErr_Format(PyExc_ValueError, "base: %zd entries, checkpoint has %zd", bv.len / 4, n);
    } else if (kv.len / 4 < n + 1) {
        PyErr_Format(PyExc_ValueError, "candidates: %zd entries, need %zd", kv.len / 4, n + 1);
    } else {
        Py_ssize_t above = 0, kept;
        float flo = (float)lo, fhi = isinf(hi) ? INFINITY : (float)hi;
        Py_BEGIN_ALLOW_THREADS
        kept = count_block((const float *)cv.buf, (const float *)bv.buf, n, flo, fhi, (float *)kv.buf, &above);
        Py_END_ALLOW_THREADS
        result = Py_BuildValue("(nn)", above, kept);
    }
    PyBuffer_Release(&cv);
    PyBuffer_Release(&bv);
    PyBuffer_Release(&kv);
    return result;
}

static int get_bytes(PyObject *obj, Py_buffer *view, int writable, const char *what)
{
    int flags = PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0);
    return PyObject_GetBuffer(obj, view, flags);
}

PyDoc_STRVAR(bf16_widen_doc,
"bf16_widen(raw, out)\n\n"
"The bfloat16 values in the bytes of raw (2 per value) widened into the float32 buffer out (exact).");

static PyObject *bf16_widen(PyObject *self, PyObject *args)
{
    PyObject *raw_obj, *out_obj;
    if (!PyArg_ParseTuple(args, "OO", &raw_obj, &out_obj)) return NULL;
    Py_buffer rv, ov;
    if (get_bytes(raw_obj, &rv, 0, "raw") != 0) return NULL;
    if (get_f32(out_obj, &ov, 1, "out") != 0) {
        PyBuffer_Release(&rv);
        return NULL;
    }
    PyObject *result = NULL;
    Py_ssize_t n = ov.len / 4;
    if (rv.len != 2 * n) {
        PyErr_Format(PyExc_ValueError, "raw: %zd bytes for %zd bfloat16 values", rv.len, n);
    } else {
        Py_BEGIN_ALLOW_THREADS
        widen_bf16((const uint16_t *)rv.buf, (float *)ov.buf, n);
        Py_END_ALLOW_THREADS
        Py_INCREF(Py_None);
        result = Py_None;
    }
    PyBuffer_Release(&rv);
    PyBuffer_Release(&ov);
    return result;
}

PyDoc_STRVAR(bf16_narrow_doc,
"bf16_narrow(src, out) -> bool\n\n"
"The float32 buffer src rounded to bfloat16 (nearest even, as c10::BFloat16) into the bytes of out\n"
"(2 per value); True when every value of src is finite.");

static PyObject *bf16_narrow(PyObject *self, PyObject *args)
{
    PyObject *src_obj, *out_obj;
    if (!PyArg_ParseTuple(args, "OO", &src_obj, &out_obj)) return NULL;
    Py_buffer sv, ov;
    if (get_f32(src_obj, &sv, 0, "src") != 0) return NULL;
    if (get_bytes(out_obj, &ov, 1, "out") != 0) {
        PyBuffer_Release(&sv);
        return NULL;
    }
    PyObject *result = NULL;
    Py_ssize_t n = sv.len / 4;
    if (ov.len != 2 * n) {
        PyErr_Format(PyExc_ValueError, "out: %zd bytes for %zd bfloat16 values", ov.len, n);
    } else {
        int finite;
        Py_BEGIN_ALLOW_THREADS
        finite = narrow_bf16((const float *)sv.buf, (uint16_t *)ov.buf, n);
        Py_END_ALLOW_THREADS
        result = PyBool_FromLong(finite);
    }
    PyBuffer_Release(&sv);
    PyBuffer_Release(&ov);
    return result;
}

static PyMethodDef methods[] = {
    {"bf16_widen", bf16_widen, METH_VARARGS, bf16_widen_doc},
    {"bf16_narrow", bf16_narrow, METH_VARARGS, bf16_narrow_doc},
    {"ties_combine", ties_combine, METH_VARARGS, ties_combine_doc},
    {"ties_count", ties_count, METH_VARARGS, ties_count_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "arm.merge._kernels",
                                    "Fused CPU kernels: TIES, bfloat16 conversions (see _kernels.c).", -1,
                                    methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
