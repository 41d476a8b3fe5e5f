/* bitnet_tt.backends.cpu._kernels: the CPU backend's compiled kernels, on raw buffers.
 *
 * Arguments are objects with the buffer protocol (numpy arrays); sizes are checked here against the
 * dimensions passed, dtypes by the Python wrapper (kernels.py). The GIL is released while kernels run.
 * `path` selects the instruction set: one of the names available_paths() returns.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#if defined(__aarch64__)
#include <asm/hwcap.h>
#include <sys/auxv.h>
#endif

#include "attention_prefill.h"
#include "float_ops.h"
#include "gemm.h"
#include "kernels.h"
#include "pack.h"
#include "pool.h"

enum path { PATH_SCALAR, PATH_AVX2, PATH_AVX512, PATH_NEON, PATH_NEONDOT, PATH_COUNT };
static const char *PATH_NAMES[PATH_COUNT] = {"scalar", "avx2", "avx512", "neon", "neondot"};

static int path_available(int path) {
    switch (path) {
    case PATH_SCALAR: return 1;
#if defined(__x86_64__)
    case PATH_AVX2: return __builtin_cpu_supports("avx2");
    case PATH_AVX512:
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
#endif
#if defined(__aarch64__)
    case PATH_NEON: return 1;
    case PATH_NEONDOT: return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#endif
    default: return 0;
    }
}

/* The copy of a function compiled once per instruction set (float_ops.c, attention_prefill.c: ISA_SUFFIX)
 * that a path runs. */
#if defined(__x86_64__)
#define ISA_COPY(path, name) ((path) == PATH_AVX512 ? name##_avx512 : (path) == PATH_AVX2 ? name##_avx2 : name##_generic)
#else
#define ISA_COPY(path, name) name##_generic
#endif

/* The many-token GEMM of a path for m tokens, or NULL where the tile kernel serves them. */
static gemm_part_fn gemm_for(int path, int m) {
#if defined(__x86_64__)
    if (path == PATH_AVX512 && m >= GEMM_MIN_TOKENS_AVX512) return gemm_avx512;
    if (path == PATH_AVX2 && m >= GEMM_MIN_TOKENS_AVX2) return gemm_avx2;
#endif
    (void)path, (void)m;
    return NULL;
}

static tile_kernel tile_for(int path) {
    switch (path) {
#if defined(__x86_64__)
    case PATH_AVX2: return tile_avx2;
    case PATH_AVX512: return tile_avx512;
#endif
#if defined(__aarch64__)
    case PATH_NEON: return tile_neon;
    case PATH_NEONDOT: return tile_neondot;
#endif
    default: return tile_scalar;
    }
}

typedef void (*head_fn)(const void *, int, const float *, int, const float *, int, int, int, int, float *);
typedef void (*attention_fn)(const struct attention_args *, int, int, float *);

/* ---------------------------------------------------------------------------------------------
 * Buffers */

#define MAX_BUFFERS 12

struct buffers {
    Py_buffer views[MAX_BUFFERS];
    int count;
};

static void release(struct buffers *held) {
    for (int i = 0; i < held->count; i++) PyBuffer_Release(&held->views[i]);
    held->count = 0;
}

/* The data of `obj` (None allowed when `optional`), at least `need` bytes; NULL with an exception set. */
static void *buffer(struct buffers *held, PyObject *obj, int writable, Py_ssize_t need, const char *name,
                    int optional, int *failed) {
    if (*failed) return NULL;
    if (obj == Py_None && optional) return NULL;
    Py_buffer *view = &held->views[held->count];
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) < 0) {
        *failed = 1;
        return NULL;
    }
    held->count++;
    if (view->len < need) {
        PyErr_Format(PyExc_ValueError, "%s holds %zd bytes, needs %zd", name, view->len, need);
        *failed = 1;
        return NULL;
    }
    return view->buf;
}

static int check_path(int path) {
    if (path < 0 || path >= PATH_COUNT || !path_available(path)) {
        PyErr_Format(PyExc_ValueError, "instruction-set path %d is not available on this CPU or build", path);
        return 0;
    }
    return 1;
}

static int padded_inputs(int k) { return (k + BLOCK_INPUTS - 1) / BLOCK_INPUTS * BLOCK_INPUTS; }
static int row_groups(int n) { return (n + ROWS_PER_GROUP - 1) / ROWS_PER_GROUP; }
static Py_ssize_t packed_bytes(int n, int k) { return (Py_ssize_t)row_groups(n) * padded_inputs(k) / 4 * ROWS_PER_GROUP; }

static PyObject *py_available_paths(PyObject *self, PyObject *args) {
    (void)self, (void)args;
    PyObject *names = PyList_New(0);
    for (int path = PATH_COUNT - 1; path >= 0 && names; path--)
        if (path_available(path) && PyList_Append(names, PyUnicode_FromString(PATH_NAMES[path])) < 0) Py_CLEAR(names);
    return names;
}

/* ---------------------------------------------------------------------------------------------
 * Packing into the row-group layout */

struct pack_job {
    const uint8_t *src;  /* int8 codes [n, k], or the converted checkpoint's uint8 [n, k/4] */
    uint8_t *out;
    int n, k, blocks, from_2bit;
    spread_rows_fn spread;  /* the full blocks of a 2-bit row */
    atomic_int bad;
};

static spread_rows_fn spread_for(int path) {
#if defined(__x86_64__)
    if (path == PATH_AVX512 && __builtin_cpu_supports("avx512vbmi")) return spread_rows_avx512vbmi;
#endif
    (void)path;
    return spread_rows_generic;
}

static unsigned stored_code(const struct pack_job *job, int row, int col) {
    if (job->from_2bit) return (job->src[(size_t)row * (job->k / 4) + col / 4] >> (2 * (col % 4))) & 3;
    return (unsigned)((int8_t)job->src[(size_t)row * job->k + col] + 1);
}

/* One 32-byte chunk of int8 codes, or a padding chunk: byte j holds inputs 128b + 32f + j in bits 2f..2f+1;
 * inputs past k are zero weights. */
static int pack_chunk(const struct pack_job *job, int row, int b, uint8_t *chunk) {
    int first = b * BLOCK_INPUTS, bad = 0;
    if (row >= job->n || first + BLOCK_INPUTS > job->k) {  /* padding: field by field */
        memset(chunk, 0x55, CHUNK_BYTES);
        for (int i = 0; row < job->n && first + i < job->k; i++) {
            unsigned stored = stored_code(job, row, first + i);
            bad |= stored > 2;
            chunk[i % 32] = (uint8_t)((chunk[i % 32] & ~(3u << (2 * (i / 32)))) | ((stored & 3) << (2 * (i / 32))));
        }
        return bad;
    }
    const int8_t *src = (const int8_t *)job->src + (size_t)row * job->k + first;
    for (int j = 0; j < CHUNK_BYTES; j++) {
        unsigned byte = 0;
        for (int f = 0; f < 4; f++) {
            unsigned stored = (unsigned)(src[32 * f + j] + 1);
            bad |= stored > 2;
            byte |= (stored & 3) << (2 * f);
        }
        chunk[j] = (uint8_t)byte;
    }
    return bad;
}

static void pack_part(void *ctx, int group_begin, int group_end) {
    struct pack_job *job = ctx;
    int bad = 0;
    for (int g = group_begin; g < group_end; g++)
        for (int r = 0; r < ROWS_PER_GROUP; r++) {
            int row = g * ROWS_PER_GROUP + r, spread = 0;
            uint8_t *chunks = job->out + ((size_t)g * job->blocks * ROWS_PER_GROUP + r) * CHUNK_BYTES;
            if (job->from_2bit && row < job->n) {
                spread = job->k / BLOCK_INPUTS;
                bad |= job->spread(job->src + (size_t)row * (job->k / 4), spread, chunks);
            }
            for (int b = spread; b < job->blocks; b++) bad |= pack_chunk(job, row, b, chunks + (size_t)b * GROUP_BLOCK_BYTES);
        }
    if (bad) atomic_store(&job->bad, 1);
}

/* pack(source, n, k, out, from_2bit, path, threads): source is int8 codes [n, k] (from_2bit = 0) or the converted
 * checkpoint's uint8 [n, k/4] with code + 1 in bits 2i..2i+1 of byte j for input 4j + i (from_2bit = 1). */
static PyObject *py_pack(PyObject *self, PyObject *args) {
    PyObject *src_obj, *out_obj;
    int n, k, from_2bit, path, threads;
    if (!PyArg_ParseTuple(args, "OiiOpii", &src_obj, &n, &k, &out_obj, &from_2bit, &path, &threads)) return NULL;
    if (!check_path(path)) return NULL;
    if (n <= 0 || k <= 0 || (from_2bit && k % 4)) return PyErr_Format(PyExc_ValueError, "bad shape [%d, %d]", n, k);
    struct buffers held = {.count = 0};
    int failed = 0;
    Py_ssize_t src_bytes = from_2bit ? (Py_ssize_t)n * k / 4 : (Py_ssize_t)n * k;
    struct pack_job job = {
        .src = buffer(&held, src_obj, 0, src_bytes, "source", 0, &failed),
        .out = buffer(&held, out_obj, 1, packed_bytes(n, k), "out", 0, &failed),
        .n = n, .k = k, .blocks = padded_inputs(k) / BLOCK_INPUTS, .from_2bit = from_2bit,
        .spread = spread_for(path),
    };
    if (failed) {
        release(&held);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    parallel_for(pack_part, &job, row_groups(n), threads);
    Py_END_ALLOW_THREADS
    release(&held);
    if (atomic_load(&job.bad)) return PyErr_Format(PyExc_ValueError, "codes must be -1, 0 or +1 (2-bit field 3 is unused)");
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------------------------------------
 * Ternary matmul */

struct matmul_job {
    struct gemm_job args;
    tile_kernel tile;
};

static void matmul_part(void *ctx, int group_begin, int group_end) {
    const struct gemm_job *job = &((const struct matmul_job *)ctx)->args;
    tile_kernel tile = ((const struct matmul_job *)ctx)->tile;
    size_t group_bytes = (size_t)job->blocks * GROUP_BLOCK_BYTES;
    int32_t raw[MAX_TILE_TOKENS * ROWS_PER_GROUP];
    for (int g = group_begin; g < group_end; g++) {
        for (int m0 = 0; m0 < job->m; m0 += MAX_TILE_TOKENS) {
            int tokens = job->m - m0 < MAX_TILE_TOKENS ? job->m - m0 : MAX_TILE_TOKENS;
            tile(job->packed + g * group_bytes, job->blocks, job->x + m0 * job->x_stride, job->x_stride, tokens, raw);
            for (int t = 0; t < tokens; t++)
                for (int r = 0; r < ROWS_PER_GROUP; r++) {
                    int row = g * ROWS_PER_GROUP + r, token = m0 + t;
                    if (row >= job->n) break;
                    int32_t exact = raw[t * ROWS_PER_GROUP + r] - job->x_sum[token];
                    size_t at = (size_t)token * job->n + row;
                    if (job->mode == MATMUL_INT32) {
                        ((int32_t *)job->out)[at] = exact;
                    } else {
                        /* The golden model's order: int32 -> fp32, / activation scale, * weight scale. */
                        float y = (float)exact / job->x_scale[token] * job->w_scale[row];
                        float *out = (float *)job->out + at;
                        *out = job->mode == MATMUL_ADD ? *out + y : y;
                    }
                }
        }
    }
}

/* matmul(packed, n, k, x, x_sum, m, out, mode, x_scale, w_scale, path, threads):
 * x int8 [m, padded k], x_sum int32 [m]; out int32 [m, n] (mode 0) or fp32 [m, n] set (1) or added to (2)
 * with x_scale fp32 [m] and w_scale fp32 [n]. */
static PyObject *py_matmul(PyObject *self, PyObject *args) {
    PyObject *packed_obj, *x_obj, *sum_obj, *out_obj, *xs_obj, *ws_obj;
    int n, k, m, mode, path, threads;
    if (!PyArg_ParseTuple(args, "OiiOOiOiOOii", &packed_obj, &n, &k, &x_obj, &sum_obj, &m, &out_obj, &mode, &xs_obj,
                          &ws_obj, &path, &threads))
        return NULL;
    if (n <= 0 || k <= 0 || m <= 0 || mode < MATMUL_INT32 || mode > MATMUL_ADD || !check_path(path)) {
        if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "bad matmul arguments n=%d k=%d m=%d mode=%d", n, k, m, mode);
        return NULL;
    }
    struct buffers held = {.count = 0};
    int failed = 0, kp = padded_inputs(k), floats = mode != MATMUL_INT32;
    struct gemm_job job = {
        .packed = buffer(&held, packed_obj, 0, packed_bytes(n, k), "packed", 0, &failed),
        .x = buffer(&held, x_obj, 0, (Py_ssize_t)m * kp, "x", 0, &failed),
        .x_sum = buffer(&held, sum_obj, 0, (Py_ssize_t)m * 4, "x_sum", 0, &failed),
        .out = buffer(&held, out_obj, 1, (Py_ssize_t)m * n * 4, "out", 0, &failed),
        .x_scale = buffer(&held, xs_obj, 0, floats ? (Py_ssize_t)m * 4 : 0, "x_scale", !floats, &failed),
        .w_scale = buffer(&held, ws_obj, 0, floats ? (Py_ssize_t)n * 4 : 0, "w_scale", !floats, &failed),
        .x_stride = (size_t)kp, .n = n, .m = m, .blocks = kp / BLOCK_INPUTS, .mode = mode,
    };
    if (!failed && floats && (!job.x_scale || !job.w_scale)) {
        PyErr_SetString(PyExc_ValueError, "float outputs need x_scale and w_scale");
        failed = 1;
    }
    if (failed) {
        release(&held);
        return NULL;
    }
    gemm_part_fn gemm = gemm_for(path, m);
    struct matmul_job tiles = {.args = job, .tile = tile_for(path)};
    Py_BEGIN_ALLOW_THREADS
    if (gemm)
        parallel_for(gemm, &job, (n + GEMM_ROWS - 1) / GEMM_ROWS, threads);
    else
        parallel_for(matmul_part, &tiles, row_groups(n), threads);
    Py_END_ALLOW_THREADS
    release(&held);
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------------------------------------
 * Norm and activation quantisation */

typedef void (*prepare_fn)(const float *, int, int, const float *, float, float *);
typedef void (*quantize_row_fn)(const float *, int, int, int8_t *, float *, int32_t *);

static int best_path(void) {
    int path = PATH_COUNT - 1;
    while (!path_available(path)) path--;
    return path;
}

/* quantize(x, ld, m, k, gated, norm_w, eps, q, scale, sum[, path]) or normalise into out:
 * norm(x, ld, m, k, gated, norm_w, eps, out[, path]). The row kernels are float_ops.c's. */
static PyObject *prepare_rows(PyObject *args, int quantized) {
    PyObject *x_obj, *w_obj, *q_obj = Py_None, *scale_obj = Py_None, *sum_obj = Py_None, *out_obj = Py_None;
    int ld, m, k, gated, path = best_path();
    float eps;
    int ok = quantized ? PyArg_ParseTuple(args, "OiiipOfOOO|i", &x_obj, &ld, &m, &k, &gated, &w_obj, &eps, &q_obj,
                                          &scale_obj, &sum_obj, &path)
                       : PyArg_ParseTuple(args, "OiiipOfO|i", &x_obj, &ld, &m, &k, &gated, &w_obj, &eps, &out_obj, &path);
    if (!ok || !check_path(path)) return NULL;
    if (m <= 0 || k <= 0 || ld < (gated ? 2 * k : k))
        return PyErr_Format(PyExc_ValueError, "bad shape m=%d k=%d ld=%d", m, k, ld);
    struct buffers held = {.count = 0};
    int failed = 0, kp = padded_inputs(k);
    const float *x = buffer(&held, x_obj, 0, ((Py_ssize_t)(m - 1) * ld + (gated ? 2 * k : k)) * 4, "x", 0, &failed);
    const float *w = buffer(&held, w_obj, 0, (Py_ssize_t)k * 4, "norm weight", 1, &failed);
    int8_t *q = buffer(&held, q_obj, 1, (Py_ssize_t)m * kp, "q", !quantized, &failed);
    float *scale = buffer(&held, scale_obj, 1, (Py_ssize_t)m * 4, "scale", !quantized, &failed);
    int32_t *sum = buffer(&held, sum_obj, 1, (Py_ssize_t)m * 4, "sum", !quantized, &failed);
    float *out = buffer(&held, out_obj, 1, (Py_ssize_t)m * k * 4, "out", quantized, &failed);
    float *row = failed ? NULL : malloc((size_t)k * sizeof *row);
    if (failed || !row) {
        release(&held);
        return failed ? NULL : PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    prepare_fn prepare_row = ISA_COPY(path, prepare_row);
    quantize_row_fn quantize_row = ISA_COPY(path, quantize_row);
    for (int i = 0; i < m; i++) {
        prepare_row(x + (size_t)i * ld, k, gated, w, eps, quantized ? row : out + (size_t)i * k);
        if (quantized) quantize_row(row, k, kp, q + (size_t)i * kp, scale + i, sum + i);
    }
    Py_END_ALLOW_THREADS
    free(row);
    release(&held);
    Py_RETURN_NONE;
}

static PyObject *py_quantize(PyObject *self, PyObject *args) { return prepare_rows(args, 1); }
static PyObject *py_norm(PyObject *self, PyObject *args) { return prepare_rows(args, 0); }

/* ---------------------------------------------------------------------------------------------
 * Embedding rows */

static float table_value(const void *table, int dtype, size_t i) {
    if (dtype == WEIGHT_F32) return ((const float *)table)[i];
    uint32_t bits = (uint32_t)((const uint16_t *)table)[i] << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static int dtype_size(int dtype) { return dtype == WEIGHT_F32 ? 4 : dtype == WEIGHT_BF16 ? 2 : 1; }

/* embed(table, dtype, vocab, k, ids, m, out): rows of a bf16 or fp32 table as fp32; ids int64 [m]. */
static PyObject *py_embed(PyObject *self, PyObject *args) {
    PyObject *table_obj, *ids_obj, *out_obj;
    int dtype, vocab, k, m;
    if (!PyArg_ParseTuple(args, "OiiiOiO", &table_obj, &dtype, &vocab, &k, &ids_obj, &m, &out_obj)) return NULL;
    if (dtype == WEIGHT_INT8) return PyErr_Format(PyExc_ValueError, "an embedding table is bf16 or fp32");
    struct buffers held = {.count = 0};
    int failed = 0;
    const void *table = buffer(&held, table_obj, 0, (Py_ssize_t)vocab * k * dtype_size(dtype), "table", 0, &failed);
    const int64_t *ids = buffer(&held, ids_obj, 0, (Py_ssize_t)m * 8, "ids", 0, &failed);
    float *out = buffer(&held, out_obj, 1, (Py_ssize_t)m * k * 4, "out", 0, &failed);
    for (int i = 0; !failed && i < m; i++)
        if (ids[i] < 0 || ids[i] >= vocab) {
            PyErr_Format(PyExc_ValueError, "token id %lld outside the vocabulary of %d", (long long)ids[i], vocab);
            failed = 1;
        }
    if (failed) {
        release(&held);
        return NULL;
    }
    for (int i = 0; i < m; i++)
        for (int j = 0; j < k; j++) out[(size_t)i * k + j] = table_value(table, dtype, (size_t)ids[i] * k + j);
    release(&held);
    Py_RETURN_NONE;
}

/* quantize_head(table, dtype, vocab, k, q, scales): per-row int8 (scale = absmax / 127) of the LM head. */
static PyObject *py_quantize_head(PyObject *self, PyObject *args) {
    PyObject *table_obj, *q_obj, *scales_obj;
    int dtype, vocab, k;
    if (!PyArg_ParseTuple(args, "OiiiOO", &table_obj, &dtype, &vocab, &k, &q_obj, &scales_obj)) return NULL;
    if (dtype == WEIGHT_INT8) return PyErr_Format(PyExc_ValueError, "the LM head to quantise is bf16 or fp32");
    struct buffers held = {.count = 0};
    int failed = 0;
    const void *table = buffer(&held, table_obj, 0, (Py_ssize_t)vocab * k * dtype_size(dtype), "table", 0, &failed);
    int8_t *q = buffer(&held, q_obj, 1, (Py_ssize_t)vocab * k, "q", 0, &failed);
    float *scales = buffer(&held, scales_obj, 1, (Py_ssize_t)vocab * 4, "scales", 0, &failed);
    if (failed) {
        release(&held);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    for (int v = 0; v < vocab; v++) {
        float top = 0.0f;
        for (int j = 0; j < k; j++) top = fmaxf(top, fabsf(table_value(table, dtype, (size_t)v * k + j)));
        float scale = top > 0.0f ? top / 127.0f : 1.0f;
        for (int j = 0; j < k; j++) q[(size_t)v * k + j] = (int8_t)nearbyintf(table_value(table, dtype, (size_t)v * k + j) / scale);
        scales[v] = scale;
    }
    Py_END_ALLOW_THREADS
    release(&held);
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------------------------------------
 * LM head, attention */

struct head_job {
    head_fn fn;
    const void *w;
    const float *scales, *x;
    float *out;
    int dtype, k, m, vocab;
};

static void head_part(void *ctx, int begin, int end) {
    const struct head_job *job = ctx;
    job->fn(job->w, job->dtype, job->scales, job->k, job->x, job->m, job->vocab, begin, end, job->out);
}

/* head(w, dtype, scales, vocab, k, x, m, out, path, threads): out fp32 [m, vocab] = x [m, k] @ w^T (* scales). */
static PyObject *py_head(PyObject *self, PyObject *args) {
    PyObject *w_obj, *scales_obj, *x_obj, *out_obj;
    int dtype, vocab, k, m, path, threads;
    if (!PyArg_ParseTuple(args, "OiOiiOiOii", &w_obj, &dtype, &scales_obj, &vocab, &k, &x_obj, &m, &out_obj, &path,
                          &threads))
        return NULL;
    if (vocab <= 0 || k <= 0 || m <= 0 || dtype < WEIGHT_BF16 || dtype > WEIGHT_INT8 || !check_path(path)) {
        if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "bad head arguments");
        return NULL;
    }
    struct buffers held = {.count = 0};
    int failed = 0;
    struct head_job job = {
        .fn = ISA_COPY(path, head_rows), .dtype = dtype, .k = k, .m = m, .vocab = vocab,
        .w = buffer(&held, w_obj, 0, (Py_ssize_t)vocab * k * dtype_size(dtype), "w", 0, &failed),
        .scales = buffer(&held, scales_obj, 0, (Py_ssize_t)vocab * 4, "scales", dtype != WEIGHT_INT8, &failed),
        .x = buffer(&held, x_obj, 0, (Py_ssize_t)m * k * 4, "x", 0, &failed),
        .out = buffer(&held, out_obj, 1, (Py_ssize_t)m * vocab * 4, "out", 0, &failed),
    };
    if (failed) {
        release(&held);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    parallel_for(head_part, &job, vocab, threads);
    Py_END_ALLOW_THREADS
    release(&held);
    Py_RETURN_NONE;
}

/* HF's half-split rotation of `heads` vectors of `dim` floats in place, with one position's cos/sin rows. */
static void rotate(float *x, int heads, int dim, const float *c, const float *s) {
    int half = dim / 2;
    for (int h = 0; h < heads; h++, x += dim)
        for (int d = 0; d < half; d++) {
            float lo = x[d], hi = x[d + half];
            x[d] = lo * c[d] + (-hi) * s[d];
            x[d + half] = hi * c[d + half] + lo * s[d + half];
        }
}

/* One step's attention over its short segments (one slot's consecutive rows each, fewer than
 * PREFILL_ATTENTION_MIN_TOKENS): a segment's tasks (token, head) come after the previous segments' in task
 * numbering; a long segment has none (the prefill kernel serves it). */
struct attention_job {
    attention_fn fn;
    struct attention_args *segments;
    int *first_task;  /* [segments + 1] */
    int count, positions;
};

/* Each thread keeps its scores row between calls: no allocation per step once it is large enough. */
static _Thread_local float *thread_scores;
static _Thread_local int thread_scores_size;

static void attention_part(void *ctx, int begin, int end) {
    const struct attention_job *job = ctx;
    if (thread_scores_size < job->positions) {
        float *grown = realloc(thread_scores, (size_t)job->positions * sizeof *grown);
        if (!grown) abort();  /* a few KB per thread; nothing sensible is left to do without them */
        thread_scores = grown;
        thread_scores_size = job->positions;
    }
    for (int s = 0; s < job->count && begin < end; s++) {
        int lo = job->first_task[s], hi = job->first_task[s + 1];
        if (lo == hi || end <= lo || begin >= hi) continue;
        int from = begin > lo ? begin : lo, to = end < hi ? end : hi;
        job->fn(&job->segments[s], from - lo, to - lo, thread_scores);
    }
}

/* attention_step(qkv, rows, heads, kv_heads, dim, cos, sin, segments, count, cache, slots, positions, scale, out,
 * path, threads): one layer's attention for a step. qkv fp32 [rows, (heads + 2 kv_heads) * dim] (q, k, v);
 * segments int64 [count, 3] = (slot, start, rows) in row order, row i of a segment at position start + i;
 * cache fp32 [slots, 2 (keys, values), kv_heads, positions, dim]; cos/sin fp32 [positions, dim].
 * RoPE rotates q and k in place, k and v are written into the cache, then each token attends to positions
 * 0 .. its own; out fp32 [rows, heads * dim]. */
static PyObject *py_attention_step(PyObject *self, PyObject *args) {
    PyObject *qkv_obj, *cos_obj, *sin_obj, *seg_obj, *cache_obj, *out_obj;
    int rows, heads, kv_heads, dim, count, slots, positions, path, threads;
    float scale;
    if (!PyArg_ParseTuple(args, "OiiiiOOOiOiifOii", &qkv_obj, &rows, &heads, &kv_heads, &dim, &cos_obj, &sin_obj,
                          &seg_obj, &count, &cache_obj, &slots, &positions, &scale, &out_obj, &path, &threads))
        return NULL;
    if (rows <= 0 || heads <= 0 || kv_heads <= 0 || heads % kv_heads || dim <= 0 || dim % 2 || count <= 0 ||
        slots <= 0 || positions <= 0 || !check_path(path)) {
        if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "bad attention arguments");
        return NULL;
    }
    struct buffers held = {.count = 0};
    int failed = 0, width = (heads + 2 * kv_heads) * dim;
    size_t head_stride = (size_t)positions * dim, kv_bytes = (size_t)kv_heads * head_stride;
    float *qkv = buffer(&held, qkv_obj, 1, (Py_ssize_t)rows * width * 4, "qkv", 0, &failed);
    const float *cos_t = buffer(&held, cos_obj, 0, (Py_ssize_t)positions * dim * 4, "cos", 0, &failed);
    const float *sin_t = buffer(&held, sin_obj, 0, (Py_ssize_t)positions * dim * 4, "sin", 0, &failed);
    const int64_t *seg = buffer(&held, seg_obj, 0, (Py_ssize_t)count * 3 * 8, "segments", 0, &failed);
    float *cache = buffer(&held, cache_obj, 1, (Py_ssize_t)slots * 2 * kv_bytes * 4, "cache", 0, &failed);
    float *out = buffer(&held, out_obj, 1, (Py_ssize_t)rows * heads * dim * 4, "out", 0, &failed);
    int64_t total = 0;
    for (int s = 0; !failed && s < count; s++) {
        int64_t slot = seg[3 * s], start = seg[3 * s + 1], n = seg[3 * s + 2];
        if (slot < 0 || slot >= slots || start < 0 || n <= 0 || start + n > positions) {
            PyErr_Format(PyExc_ValueError, "segment %d (slot %lld, positions %lld..%lld) outside the cache", s,
                         (long long)slot, (long long)start, (long long)(start + n - 1));
            failed = 1;
        }
        total += n;
    }
    if (!failed && total != rows) {
        PyErr_Format(PyExc_ValueError, "segments hold %lld rows, the step has %d", (long long)total, rows);
        failed = 1;
    }
    struct attention_args *segments = failed ? NULL : malloc((size_t)count * sizeof *segments);
    int *first_task = failed ? NULL : malloc((size_t)(count + 1) * sizeof *first_task);
    if (failed || !segments || !first_task) {
        free(segments), free(first_task);
        release(&held);
        return failed ? NULL : PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    first_task[0] = 0;
    for (int s = 0, row = 0; s < count; s++) {
        int slot = (int)seg[3 * s], start = (int)seg[3 * s + 1], n = (int)seg[3 * s + 2];
        float *keys = cache + (size_t)slot * 2 * kv_bytes, *values = keys + kv_bytes;
        for (int i = 0; i < n; i++) {
            float *q = qkv + (size_t)(row + i) * width, *k = q + heads * dim, *v = k + kv_heads * dim;
            const float *c = cos_t + (size_t)(start + i) * dim, *sn = sin_t + (size_t)(start + i) * dim;
            rotate(q, heads, dim, c, sn);
            rotate(k, kv_heads, dim, c, sn);
            for (int h = 0; h < kv_heads; h++) {
                size_t at = h * head_stride + (size_t)(start + i) * dim;
                memcpy(keys + at, k + h * dim, (size_t)dim * sizeof *k);
                memcpy(values + at, v + h * dim, (size_t)dim * sizeof *v);
            }
        }
        segments[s] = (struct attention_args){
            .q = qkv + (size_t)row * width, .keys = keys, .values = values, .out = out + (size_t)row * heads * dim,
            .q_stride = (size_t)width, .head_stride = head_stride, .heads = heads, .group = heads / kv_heads,
            .head_dim = dim, .start = start, .scale = scale,
        };
        first_task[s + 1] = first_task[s] + (n < PREFILL_ATTENTION_MIN_TOKENS ? n * heads : 0);
        row += n;
    }
    /* Decode rows and short chunks share the per-token kernel; each prefill chunk of many tokens takes the
     * prefill kernel, whatever else the step holds (the same arithmetic as a step of that chunk alone). */
    struct attention_job job = {.fn = ISA_COPY(path, attention_tasks), .segments = segments, .first_task = first_task,
                                .count = count, .positions = positions};
    if (first_task[count]) parallel_for(attention_part, &job, first_task[count], threads);
    for (int s = 0; s < count; s++) {
        int n = (int)seg[3 * s + 2];
        struct prefill_attention_job prefill = {.args = segments[s], .tokens = n, .positions = positions};
        if (n >= PREFILL_ATTENTION_MIN_TOKENS)
            parallel_for(ISA_COPY(path, attention_prefill), &prefill, prefill_attention_tasks(&prefill), threads);
    }
    Py_END_ALLOW_THREADS
    free(segments), free(first_task);
    release(&held);
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------------------------------------
 * Read bandwidth (for the benchmark's ceiling) */

#define BANDWIDTH_CHUNK (1 << 16)

struct sum_job {
    const uint64_t *words;
    size_t count;
    uint64_t partial[256];
};

static void sum_part(void *ctx, int begin, int end) {
    struct sum_job *job = ctx;
    size_t per_chunk = BANDWIDTH_CHUNK / 8, first = (size_t)begin * per_chunk, last = (size_t)end * per_chunk;
    if (last > job->count) last = job->count;
    uint64_t lanes[8] = {0};
    for (size_t i = first; i + 8 <= last; i += 8)
        for (int l = 0; l < 8; l++) lanes[l] += job->words[i + l];
    uint64_t total = 0;
    for (int l = 0; l < 8; l++) total += lanes[l];
    __atomic_fetch_add(&job->partial[begin % 256], total, __ATOMIC_RELAXED);
}

/* read_sum(buffer, threads): the sum of the buffer's 64-bit words, read once by `threads` threads. */
static PyObject *py_read_sum(PyObject *self, PyObject *args) {
    PyObject *obj;
    int threads;
    if (!PyArg_ParseTuple(args, "Oi", &obj, &threads)) return NULL;
    struct buffers held = {.count = 0};
    int failed = 0;
    const uint64_t *words = buffer(&held, obj, 0, 0, "buffer", 0, &failed);
    if (failed) {
        release(&held);
        return NULL;
    }
    struct sum_job job = {.words = words, .count = (size_t)held.views[0].len / 8};
    int chunks = (int)((job.count * 8 + BANDWIDTH_CHUNK - 1) / BANDWIDTH_CHUNK);
    Py_BEGIN_ALLOW_THREADS
    parallel_for(sum_part, &job, chunks, threads);
    Py_END_ALLOW_THREADS
    release(&held);
    uint64_t total = 0;
    for (int i = 0; i < 256; i++) total += job.partial[i];
    return PyLong_FromUnsignedLongLong(total);
}

static PyMethodDef METHODS[] = {
    {"available_paths", py_available_paths, METH_NOARGS, "instruction-set paths usable here, best first"},
    {"pack", py_pack, METH_VARARGS, "pack ternary codes into the row-group layout"},
    {"matmul", py_matmul, METH_VARARGS, "exact int8 x ternary product, int32 or scaled fp32 output"},
    {"quantize", py_quantize, METH_VARARGS, "(gated) (RMS-normed) rows quantised to int8 per token"},
    {"norm", py_norm, METH_VARARGS, "(gated) RMS-normed rows in fp32"},
    {"embed", py_embed, METH_VARARGS, "embedding rows as fp32"},
    {"quantize_head", py_quantize_head, METH_VARARGS, "per-row int8 LM head"},
    {"head", py_head, METH_VARARGS, "LM head GEMV/GEMM in fp32 arithmetic"},
    {"attention_step", py_attention_step, METH_VARARGS, "RoPE, cache write and causal attention of a step's segments"},
    {"read_sum", py_read_sum, METH_VARARGS, "sum of 64-bit words: a read-bandwidth probe"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef MODULE = {PyModuleDef_HEAD_INIT, "_kernels", "BitNet CPU kernels on raw buffers", -1, METHODS};

PyMODINIT_FUNC PyInit__kernels(void) {
    init_spread();
    return PyModule_Create(&MODULE);
}
