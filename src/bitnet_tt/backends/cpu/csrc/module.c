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
#include "layers.h"
#include "pack.h"
#include "paths.h"
#include "pool.h"
#include "scratch.h"

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

typedef void (*head_fn)(const void *, int, const float *, int, const void *, int, int, int, int, float *);

/* ---------------------------------------------------------------------------------------------
 * Buffers */

#define MAX_BUFFERS 16

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
    Py_BEGIN_ALLOW_THREADS
    ternary_matmul(&job, path, threads);
    Py_END_ALLOW_THREADS
    release(&held);
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------------------------------------
 * Norm and activation quantisation */

static int best_path(void) {
    int path = PATH_COUNT - 1;
    while (!path_available(path)) path--;
    return path;
}

/* quantize(x, ld, m, k, gated, norm_w, eps, q, scale, sum[, path, threads]) or normalise into out:
 * norm(x, ld, m, k, gated, norm_w, eps, out[, path, threads]). The row kernels are float_ops.c's. */
static PyObject *py_prepare_rows(PyObject *args, int quantized) {
    PyObject *x_obj, *w_obj, *q_obj = Py_None, *scale_obj = Py_None, *sum_obj = Py_None, *out_obj = Py_None;
    int ld, m, k, gated, path = best_path(), threads = 1;
    float eps;
    int ok = quantized ? PyArg_ParseTuple(args, "OiiipOfOOO|ii", &x_obj, &ld, &m, &k, &gated, &w_obj, &eps, &q_obj,
                                          &scale_obj, &sum_obj, &path, &threads)
                       : PyArg_ParseTuple(args, "OiiipOfO|ii", &x_obj, &ld, &m, &k, &gated, &w_obj, &eps, &out_obj, &path,
                                          &threads);
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
    if (failed) {
        release(&held);
        return NULL;
    }
    struct rows_job job = {.x = x, .norm_w = w, .ld = (size_t)ld, .m = m, .k = k, .gated = gated, .path = path,
                           .eps = eps, .q = q, .scale = scale, .sum = sum, .out = out};
    Py_BEGIN_ALLOW_THREADS
    prepare_rows(&job, threads);
    Py_END_ALLOW_THREADS
    release(&held);
    Py_RETURN_NONE;
}

static PyObject *py_quantize(PyObject *self, PyObject *args) { return py_prepare_rows(args, 1); }
static PyObject *py_norm(PyObject *self, PyObject *args) { return py_prepare_rows(args, 0); }

/* ---------------------------------------------------------------------------------------------
 * Embedding rows */

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

typedef void (*quantize_head_fn)(const void *, int, int, int, int, int8_t *, float *);

struct quantize_head_job {
    quantize_head_fn fn;
    const void *table;
    int8_t *q;
    float *scales;
    int dtype, k;
};

static void quantize_head_part(void *ctx, int begin, int end) {
    const struct quantize_head_job *job = ctx;
    job->fn(job->table, job->dtype, job->k, begin, end, job->q, job->scales);
}

/* quantize_head(table, dtype, vocab, k, q, scales, path, threads): per-row int8 (scale = absmax / 127) of the
 * LM head (float_ops.c). */
static PyObject *py_quantize_head(PyObject *self, PyObject *args) {
    PyObject *table_obj, *q_obj, *scales_obj;
    int dtype, vocab, k, path, threads;
    if (!PyArg_ParseTuple(args, "OiiiOOii", &table_obj, &dtype, &vocab, &k, &q_obj, &scales_obj, &path, &threads))
        return NULL;
    if (!check_path(path)) return NULL;
    if (dtype == WEIGHT_INT8) return PyErr_Format(PyExc_ValueError, "the LM head to quantise is bf16 or fp32");
    struct buffers held = {.count = 0};
    int failed = 0;
    struct quantize_head_job job = {
        .fn = ISA_COPY(path, quantize_head_rows), .dtype = dtype, .k = k,
        .table = buffer(&held, table_obj, 0, (Py_ssize_t)vocab * k * dtype_size(dtype), "table", 0, &failed),
        .q = buffer(&held, q_obj, 1, (Py_ssize_t)vocab * k, "q", 0, &failed),
        .scales = buffer(&held, scales_obj, 1, (Py_ssize_t)vocab * 4, "scales", 0, &failed),
    };
    if (failed) {
        release(&held);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    parallel_for(quantize_head_part, &job, vocab, threads);
    Py_END_ALLOW_THREADS
    release(&held);
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------------------------------------
 * LM head, attention */

struct head_job {
    head_fn fn;
    const void *w;
    const float *scales;
    const void *prepared;  /* head_prepare's layout of the tokens */
    float *out;
    int dtype, k, m, vocab;
};

static void head_part(void *ctx, int begin, int end) {
    const struct head_job *job = ctx;
    job->fn(job->w, job->dtype, job->scales, job->k, job->prepared, job->m, job->vocab, begin, end, job->out);
}

/* head(w, dtype, scales, vocab, k, x, m, out, path, threads): out fp32 [m, vocab] = x [m, k] @ w^T (* scales);
 * an int8 head quantises x per token first (float_ops.c). */
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
        .out = buffer(&held, out_obj, 1, (Py_ssize_t)m * vocab * 4, "out", 0, &failed),
    };
    const float *x = buffer(&held, x_obj, 0, (Py_ssize_t)m * k * 4, "x", 0, &failed);
    if (failed) {
        release(&held);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    void *prepared = thread_scratch(SCRATCH_HEAD_INPUTS, head_prepared_bytes(dtype, k, m));
    ISA_COPY(path, head_prepare)(dtype, x, k, m, prepared);
    job.prepared = prepared;
    parallel_for(head_part, &job, vocab, threads);
    Py_END_ALLOW_THREADS
    release(&held);
    Py_RETURN_NONE;
}

/* Whether a step's segments (slot, start, rows) lie in the cache and hold its rows; else a ValueError. */
static int check_segments(const int64_t *seg, int count, int slots, int positions, int rows) {
    int64_t total = 0;
    for (int s = 0; s < count; s++) {
        int64_t slot = seg[3 * s], start = seg[3 * s + 1], n = seg[3 * s + 2];
        if (slot < 0 || slot >= slots || start < 0 || n <= 0 || start + n > positions) {
            PyErr_Format(PyExc_ValueError, "segment %d (slot %lld, positions %lld..%lld) outside the cache", s,
                         (long long)slot, (long long)start, (long long)(start + n - 1));
            return 0;
        }
        total += n;
    }
    if (total != rows) {
        PyErr_Format(PyExc_ValueError, "segments hold %lld rows, the step has %d", (long long)total, rows);
        return 0;
    }
    return 1;
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
    size_t kv_floats = (size_t)kv_heads * positions * dim;
    float *qkv = buffer(&held, qkv_obj, 1, (Py_ssize_t)rows * width * 4, "qkv", 0, &failed);
    const float *cos_t = buffer(&held, cos_obj, 0, (Py_ssize_t)positions * dim * 4, "cos", 0, &failed);
    const float *sin_t = buffer(&held, sin_obj, 0, (Py_ssize_t)positions * dim * 4, "sin", 0, &failed);
    const int64_t *seg = buffer(&held, seg_obj, 0, (Py_ssize_t)count * 3 * 8, "segments", 0, &failed);
    float *cache = buffer(&held, cache_obj, 1, (Py_ssize_t)slots * 2 * kv_floats * 4, "cache", 0, &failed);
    float *out = buffer(&held, out_obj, 1, (Py_ssize_t)rows * heads * dim * 4, "out", 0, &failed);
    if (failed || !check_segments(seg, count, slots, positions, rows)) {
        release(&held);
        return NULL;
    }
    struct attention_step_job job = {.qkv = qkv, .cache = cache, .out = out, .cos = cos_t, .sin = sin_t, .segments = seg,
                                     .count = count, .rows = rows, .heads = heads, .kv_heads = kv_heads, .head_dim = dim,
                                     .positions = positions, .scale = scale};
    int result;
    Py_BEGIN_ALLOW_THREADS
    result = attention_step(&job, path, threads);
    Py_END_ALLOW_THREADS
    release(&held);
    if (result) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------------------------------------
 * The layer stack */

#define STACK_CAPSULE "bitnet_tt.layer_stack"
#define WORKSPACE_ARRAYS 13
#define LAYER_ARRAYS 12

/* A layer stack and the views of every array it points into (held until the capsule is freed). */
struct held_stack {
    struct layer_stack stack;
    struct layer_weights *weights;
    struct buffers *held;  /* [layers + 1]: the workspace and tables, then each layer's weights */
    int layers_held;
};

static void free_stack(PyObject *capsule) {
    struct held_stack *h = PyCapsule_GetPointer(capsule, STACK_CAPSULE);
    for (int i = 0; i < h->layers_held; i++) release(&h->held[i]);
    free(h->weights), free(h->held), free(h);
}

/* The i-th item of a sequence as a buffer of at least `bytes` bytes. */
static void *item(struct buffers *held, PyObject *seq, int i, int writable, Py_ssize_t bytes, const char *name,
                  int *failed) {
    if (*failed) return NULL;
    PyObject *obj = PySequence_GetItem(seq, i);
    if (!obj) {
        *failed = 1;
        return NULL;
    }
    void *data = buffer(held, obj, writable, bytes, name, 0, failed);
    Py_DECREF(obj);
    return data;
}

static void activations_of(struct buffers *held, PyObject *work, int first, int rows, int k, struct activations *acts,
                           int *failed) {
    acts->q = item(held, work, first, 1, (Py_ssize_t)rows * padded_inputs(k), "activation codes", failed);
    acts->scale = item(held, work, first + 1, 1, (Py_ssize_t)rows * 4, "activation scales", failed);
    acts->sum = item(held, work, first + 2, 1, (Py_ssize_t)rows * 4, "activation sums", failed);
}

static struct projection projection_of(struct buffers *held, PyObject *arrays, int first, int n, int k, int *failed) {
    return (struct projection){.packed = item(held, arrays, first, 0, (Py_ssize_t)packed_bytes(n, k), "packed weights", failed),
                               .scale = item(held, arrays, first + 1, 0, (Py_ssize_t)n * 4, "weight scales", failed)};
}

/* layer_stack((layers, hidden, heads, kv_heads, head_dim, intermediate, slots, positions, max_rows), eps,
 * attention_scale, workspace, cos, sin, cache, weights) -> a capsule for layers().
 * workspace: fp32 x [rows, hidden], qkv, attention, gate_up, then codes, scales and sums of the hidden,
 * attention and MLP activations; cos/sin fp32 [positions, head_dim]; cache fp32 [layers, slots, 2, kv_heads,
 * positions, head_dim]; weights: per layer (input, attention sub-, post-attention, MLP sub-norm weights, then
 * packed weights and scales of qkv, o_proj, gate_up, down). */
static PyObject *py_layer_stack(PyObject *self, PyObject *args) {
    PyObject *work, *cos_obj, *sin_obj, *cache_obj, *weights;
    struct layer_stack st = {0};
    if (!PyArg_ParseTuple(args, "(iiiiiiiii)ffOOOOO", &st.layers, &st.hidden, &st.heads, &st.kv_heads, &st.head_dim,
                          &st.intermediate, &st.slots, &st.positions, &st.max_rows, &st.eps, &st.attention_scale, &work,
                          &cos_obj, &sin_obj, &cache_obj, &weights))
        return NULL;
    if (st.layers <= 0 || st.hidden <= 0 || st.heads <= 0 || st.kv_heads <= 0 || st.heads % st.kv_heads ||
        st.head_dim <= 0 || st.head_dim % 2 || st.intermediate <= 0 || st.slots <= 0 || st.positions <= 0 ||
        st.max_rows <= 0)
        return PyErr_Format(PyExc_ValueError, "bad layer stack dimensions");
    if (PySequence_Size(work) != WORKSPACE_ARRAYS || PySequence_Size(weights) != st.layers)
        return PyErr_Format(PyExc_ValueError, "a layer stack needs %d workspace arrays and one weight tuple per layer",
                            WORKSPACE_ARRAYS);
    struct held_stack *h = calloc(1, sizeof *h);
    if (h) h->held = calloc((size_t)st.layers + 1, sizeof *h->held), h->weights = calloc((size_t)st.layers, sizeof *h->weights);
    if (!h || !h->held || !h->weights) {
        if (h) free(h->held), free(h->weights), free(h);
        return PyErr_NoMemory();
    }
    int failed = 0, rows = st.max_rows, q_size = st.heads * st.head_dim, kv_size = st.kv_heads * st.head_dim;
    struct buffers *held = &h->held[0];
    h->layers_held = 1;
    st.x = item(held, work, 0, 1, (Py_ssize_t)rows * st.hidden * 4, "x", &failed);
    st.qkv = item(held, work, 1, 1, (Py_ssize_t)rows * (q_size + 2 * kv_size) * 4, "qkv", &failed);
    st.attention = item(held, work, 2, 1, (Py_ssize_t)rows * q_size * 4, "attention", &failed);
    st.gate_up = item(held, work, 3, 1, (Py_ssize_t)rows * 2 * st.intermediate * 4, "gate_up", &failed);
    activations_of(held, work, 4, rows, st.hidden, &st.hidden_acts, &failed);
    activations_of(held, work, 7, rows, q_size, &st.attention_acts, &failed);
    activations_of(held, work, 10, rows, st.intermediate, &st.mlp_acts, &failed);
    Py_ssize_t table = (Py_ssize_t)st.positions * st.head_dim * 4;
    st.cos = buffer(held, cos_obj, 0, table, "cos", 0, &failed);
    st.sin = buffer(held, sin_obj, 0, table, "sin", 0, &failed);
    st.cache = buffer(held, cache_obj, 1, (Py_ssize_t)st.layers * st.slots * 2 * kv_size * st.positions * 4, "cache", 0, &failed);
    for (int i = 0; i < st.layers && !failed; i++) {
        PyObject *arrays = PySequence_GetItem(weights, i);
        if (!arrays || PySequence_Size(arrays) != LAYER_ARRAYS) {
            if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "layer %d needs %d weight arrays", i, LAYER_ARRAYS);
            Py_XDECREF(arrays);
            failed = 1;
            break;
        }
        held = &h->held[h->layers_held++];
        struct layer_weights *w = &h->weights[i];
        w->input_norm = item(held, arrays, 0, 0, (Py_ssize_t)st.hidden * 4, "input norm", &failed);
        w->attention_norm = item(held, arrays, 1, 0, (Py_ssize_t)q_size * 4, "attention sub-norm", &failed);
        w->post_attention_norm = item(held, arrays, 2, 0, (Py_ssize_t)st.hidden * 4, "post-attention norm", &failed);
        w->mlp_norm = item(held, arrays, 3, 0, (Py_ssize_t)st.intermediate * 4, "MLP sub-norm", &failed);
        w->qkv = projection_of(held, arrays, 4, q_size + 2 * kv_size, st.hidden, &failed);
        w->o_proj = projection_of(held, arrays, 6, st.hidden, q_size, &failed);
        w->gate_up = projection_of(held, arrays, 8, 2 * st.intermediate, st.hidden, &failed);
        w->down = projection_of(held, arrays, 10, st.hidden, st.intermediate, &failed);
        Py_DECREF(arrays);
    }
    st.weights = h->weights;
    h->stack = st;
    PyObject *capsule = failed ? NULL : PyCapsule_New(h, STACK_CAPSULE, free_stack);
    if (!capsule) {
        for (int i = 0; i < h->layers_held; i++) release(&h->held[i]);
        free(h->weights), free(h->held), free(h);
    }
    return capsule;
}

/* layers(stack, rows, segments, count, path, threads, timings): every decoder layer of a step over rows 0 .. rows - 1
 * of the stack's x (in place); segments int64 [count, 3] as attention_step's; timings None or fp64
 * [len(LAYER_COMPONENTS), 3] that each component's seconds, calls and bytes read are added to. */
static PyObject *py_layers(PyObject *self, PyObject *args) {
    PyObject *capsule, *seg_obj, *timings_obj;
    int rows, count, path, threads;
    if (!PyArg_ParseTuple(args, "OiOiiiO", &capsule, &rows, &seg_obj, &count, &path, &threads, &timings_obj)) return NULL;
    const struct held_stack *h = PyCapsule_GetPointer(capsule, STACK_CAPSULE);
    if (!h || !check_path(path)) return NULL;
    if (rows <= 0 || rows > h->stack.max_rows || count <= 0)
        return PyErr_Format(PyExc_ValueError, "a step of %d rows in %d segments (the stack holds up to %d rows)", rows,
                            count, h->stack.max_rows);
    struct buffers held = {.count = 0};
    int failed = 0;
    const int64_t *seg = buffer(&held, seg_obj, 0, (Py_ssize_t)count * 3 * 8, "segments", 0, &failed);
    double *timings = buffer(&held, timings_obj, 1, LAYER_COMPONENTS * 3 * 8, "timings", 1, &failed);
    if (failed || !check_segments(seg, count, h->stack.slots, h->stack.positions, rows)) {
        release(&held);
        return NULL;
    }
    int result;
    Py_BEGIN_ALLOW_THREADS
    result = run_layers(&h->stack, rows, seg, count, path, threads, timings);
    Py_END_ALLOW_THREADS
    release(&held);
    if (result) return PyErr_NoMemory();
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
    {"layer_stack", py_layer_stack, METH_VARARGS, "a model's decoder layers and step buffers, for layers()"},
    {"layers", py_layers, METH_VARARGS, "every decoder layer of a step in one call"},
    {"read_sum", py_read_sum, METH_VARARGS, "sum of 64-bit words: a read-bandwidth probe"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef MODULE = {PyModuleDef_HEAD_INIT, "_kernels", "BitNet CPU kernels on raw buffers", -1, METHODS};

PyMODINIT_FUNC PyInit__kernels(void) {
    init_spread();
    PyObject *module = PyModule_Create(&MODULE), *names = PyTuple_New(LAYER_COMPONENTS);
    for (int i = 0; names && i < LAYER_COMPONENTS; i++) PyTuple_SET_ITEM(names, i, PyUnicode_FromString(LAYER_COMPONENT_NAMES[i]));
    if (!module || !names || PyModule_AddObject(module, "LAYER_COMPONENTS", names) < 0) {
        Py_XDECREF(names);
        Py_XDECREF(module);
        return NULL;
    }
    return module;
}
