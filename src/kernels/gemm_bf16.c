/* bf16 GEMM with fp32 accumulation through oneDNN's matmul (AVX512-BF16 kernels where the CPU
 * has them), the same for fp32 operands, and fp32 <-> bf16 conversion. One primitive per
 * (type, transposes, beta, n, leading dimensions), created on first use and kept. */
#include "kernels/kernels.h"

#include "core/core.h"

#include <pthread.h>
#include <string.h>

#ifdef MOE_HAVE_DNNL
#include <oneapi/dnnl/dnnl.h>

/* One primitive per (transposes, beta, n, leading dimensions): m and k are given at run time,
 * which keeps oneDNN on its JIT kernels (every dimension at run time falls back to its slow
 * reference code). The layer uses a handful of such shapes. */
#define MOE_DNNL_CACHE 64
typedef struct {
    int f32, ta, tb, acc, n, lda, ldb, ldc;
    dnnl_primitive_t prim;
} dn_entry;

static struct {
    dnnl_engine_t engine;
    dn_entry cache[MOE_DNNL_CACHE];
    int n_cached, failed;
} dn;
static pthread_mutex_t dn_lock = PTHREAD_MUTEX_INITIALIZER;

/* rows x cols, stored transposed or not with leading dimension ld; rows or cols may be
 * DNNL_RUNTIME_DIM_VAL. */
static int make_md(dnnl_memory_desc_t *md, dnnl_data_type_t dt, int64_t rows, int64_t cols,
                   int trans, int ld) {
    dnnl_dims_t dims = {rows, cols};
    dnnl_dims_t strides = {trans ? 1 : ld, trans ? ld : 1};
    return dnnl_memory_desc_init_by_strides(md, 2, dims, dt, strides) == dnnl_success;
}

/* The primitive for the key: cached, or (*owned set) the caller's to destroy after its one use
 * when the cache is full (a cached one may be executing on another thread at any time, so none
 * is ever destroyed while the process runs). */
static dnnl_primitive_t primitive(int f32, int ta, int tb, int acc, int n, int lda, int ldb,
                                   int ldc, int *owned) {
    *owned = 0;
    for (int i = 0; i < dn.n_cached; i++) {
        const dn_entry *e = &dn.cache[i];
        if (e->f32 == f32 && e->ta == ta && e->tb == tb && e->acc == acc && e->n == n &&
            e->lda == lda && e->ldb == ldb && e->ldc == ldc)
            return e->prim;
    }
    if (dn.failed) return NULL;
    if (!dn.engine && dnnl_engine_create(&dn.engine, dnnl_cpu, 0) != dnnl_success) {
        dn.failed = 1;
        return NULL;
    }
    const int64_t R = DNNL_RUNTIME_DIM_VAL;
    dnnl_memory_desc_t a, b, c;
    dnnl_matmul_desc_t desc;
    dnnl_primitive_attr_t attr = NULL;
    dnnl_post_ops_t ops = NULL;
    dnnl_primitive_desc_t pd = NULL;
    dnnl_primitive_t prim = NULL;
    dnnl_data_type_t in = f32 ? dnnl_f32 : dnnl_bf16;
    int ok = make_md(&a, in, R, R, ta, lda) && make_md(&b, in, R, n, tb, ldb) &&
             make_md(&c, dnnl_f32, R, n, 0, ldc) &&
             dnnl_matmul_desc_init(&desc, &a, &b, NULL, &c) == dnnl_success &&
             dnnl_primitive_attr_create(&attr) == dnnl_success;
    if (ok && acc)
        ok = dnnl_post_ops_create(&ops) == dnnl_success &&
             dnnl_post_ops_append_sum(ops, 1.0f) == dnnl_success &&
             dnnl_primitive_attr_set_post_ops(attr, ops) == dnnl_success;
    ok = ok && dnnl_primitive_desc_create(&pd, &desc, attr, dn.engine, NULL) == dnnl_success &&
         dnnl_primitive_create(&prim, pd) == dnnl_success;
    if (pd) dnnl_primitive_desc_destroy(pd);
    if (ops) dnnl_post_ops_destroy(ops);
    if (attr) dnnl_primitive_attr_destroy(attr);
    if (!ok) return NULL;
    if (dn.n_cached == MOE_DNNL_CACHE) *owned = 1; /* full (a run's shapes are few) */
    else dn.cache[dn.n_cached++] = (dn_entry){f32, ta, tb, acc, n, lda, ldb, ldc, prim};
    return prim;
}

int moe_gemm_dnnl_available(void) { return 1; }

/* oneDNN 2.6 has bf16 matmul only on CPUs with AVX-512 (avx512_core and up; AVX512-BF16 for its
 * fast kernels): elsewhere the primitive cannot be created, so availability is that creation,
 * tried once for one shape. */
static int bf16_ok;
static void probe_bf16(void) {
    int owned;
    pthread_mutex_lock(&dn_lock);
    dnnl_primitive_t p = primitive(0, 0, 1, 0, 64, 64, 64, 64, &owned);
    pthread_mutex_unlock(&dn_lock);
    bf16_ok = p != NULL;
    if (p && owned) dnnl_primitive_destroy(p);
}

int moe_gemm_bf16_available(void) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, probe_bf16);
    return bf16_ok;
}

/* C = op(A) op(B) (+ C) with A, B bf16 or (f32) fp32, through the cached primitive. */
static moe_status matmul(int f32, int ta, int tb, int m, int n, int k, const void *A, int lda,
                            const void *B, int ldb, float beta, float *C, int ldc) {
    if (m <= 0 || n <= 0) return MOE_OK;
    if (beta != 0.0f && beta != 1.0f)
        return moe_set_error(MOE_ERR_INVALID, "oneDNN GEMM: beta must be 0 or 1 (got %g)", beta);
    if (k <= 0) {
        if (beta == 0.0f)
            for (int i = 0; i < m; i++) memset(C + (size_t)i * ldc, 0, sizeof(float) * (size_t)n);
        return MOE_OK;
    }
    /* The cache is shared (locked); execution runs concurrently on a stream per thread. */
    static _Thread_local dnnl_stream_t stream;
    int owned;
    pthread_mutex_lock(&dn_lock);
    dnnl_primitive_t p = primitive(f32, ta != 0, tb != 0, beta != 0.0f, n, lda, ldb, ldc, &owned);
    int no_stream = p && !stream &&
                    dnnl_stream_create(&stream, dn.engine, dnnl_stream_default_flags) != dnnl_success;
    pthread_mutex_unlock(&dn_lock);
    moe_status st = MOE_OK;
    dnnl_memory_desc_t a, b, c;
    dnnl_memory_t am = NULL, bm = NULL, cm = NULL;
    dnnl_data_type_t in = f32 ? dnnl_f32 : dnnl_bf16;
    if (!p || no_stream || !make_md(&a, in, m, k, ta, lda) || !make_md(&b, in, k, n, tb, ldb) ||
        !make_md(&c, dnnl_f32, m, n, 0, ldc) ||
        dnnl_memory_create(&am, &a, dn.engine, (void *)A) != dnnl_success ||
        dnnl_memory_create(&bm, &b, dn.engine, (void *)B) != dnnl_success ||
        dnnl_memory_create(&cm, &c, dn.engine, C) != dnnl_success) {
        st = moe_set_error(MOE_ERR_STATE, "oneDNN matmul unavailable on this machine");
    } else {
        dnnl_exec_arg_t args[3] = {{DNNL_ARG_SRC, am}, {DNNL_ARG_WEIGHTS, bm}, {DNNL_ARG_DST, cm}};
        if (dnnl_primitive_execute(p, stream, 3, args) != dnnl_success ||
            dnnl_stream_wait(stream) != dnnl_success)
            st = moe_set_error(MOE_ERR_STATE, "oneDNN matmul failed");
    }
    if (am) dnnl_memory_destroy(am);
    if (bm) dnnl_memory_destroy(bm);
    if (cm) dnnl_memory_destroy(cm);
    if (p && owned) dnnl_primitive_destroy(p);
    return st;
}

moe_status moe_gemm_bf16(int ta, int tb, int m, int n, int k, const uint16_t *A, int lda,
                         const uint16_t *B, int ldb, float beta, float *C, int ldc) {
    /* a decoding step's products: oneDNN reads the weights at 8 GB/s with one row of A */
    if (!ta && tb && moe_gemm_dot(1, m, n, k, A, lda, B, ldb, beta, C, ldc)) return MOE_OK;
    return matmul(0, ta, tb, m, n, k, A, lda, B, ldb, beta, C, ldc);
}

moe_status moe_gemm_dnnl(int ta, int tb, int m, int n, int k, const float *A, int lda,
                         const float *B, int ldb, float beta, float *C, int ldc) {
    return matmul(1, ta, tb, m, n, k, A, lda, B, ldb, beta, C, ldc);
}
#else
int moe_gemm_dnnl_available(void) { return 0; }
int moe_gemm_bf16_available(void) { return 0; }

moe_status moe_gemm_bf16(int ta, int tb, int m, int n, int k, const uint16_t *A, int lda,
                         const uint16_t *B, int ldb, float beta, float *C, int ldc) {
    (void)ta, (void)tb, (void)m, (void)n, (void)k, (void)A, (void)lda, (void)B, (void)ldb;
    (void)beta, (void)C, (void)ldc;
    return moe_set_error(MOE_ERR_STATE, "built without oneDNN: no bf16 GEMM");
}

moe_status moe_gemm_dnnl(int ta, int tb, int m, int n, int k, const float *A, int lda,
                         const float *B, int ldb, float beta, float *C, int ldc) {
    (void)ta, (void)tb, (void)m, (void)n, (void)k, (void)A, (void)lda, (void)B, (void)ldb;
    (void)beta, (void)C, (void)ldc;
    return moe_set_error(MOE_ERR_STATE, "built without oneDNN");
}
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

/* The rounding below, 16 floats at a time (the scalar loop is not vectorised at -O2): a
 * decoding step converts the weights of the experts it uses. */
__attribute__((target("avx512f,avx512bw"))) static size_t to_bf16_avx512(const float *x,
                                                                          uint16_t *y, size_t n) {
    const __m512i abs = _mm512_set1_epi32(0x7FFFFFFF), inf = _mm512_set1_epi32(0x7F800000);
    const __m512i half = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1);
    const __m512i quiet = _mm512_set1_epi32(0x40);
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512i u = _mm512_loadu_si512(x + i);
        __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, abs), inf);
        __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
        __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(half, odd)), 16);
        r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), quiet);
        _mm256_storeu_si256((__m256i *)(y + i), _mm512_cvtepi32_epi16(r));
    }
    return i;
}
#endif

/* Round to nearest even; NaN stays NaN. */
void moe_f32_to_bf16_serial(const float *x, uint16_t *y, size_t n) {
    size_t i = 0;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    if (__builtin_cpu_supports("avx512bw")) i = to_bf16_avx512(x, y, n);
#endif
    for (; i < n; i++) {
        uint32_t u;
        memcpy(&u, &x[i], 4);
        if ((u & 0x7FFFFFFFu) > 0x7F800000u) y[i] = (uint16_t)((u >> 16) | 0x40);
        else y[i] = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    }
}

void moe_f32_to_bf16(const float *x, uint16_t *y, size_t n) {
    const size_t chunk = 4096;
#pragma omp parallel for schedule(static)
    for (size_t c = 0; c < n; c += chunk) moe_f32_to_bf16_serial(x + c, y + c, n - c < chunk ? n - c : chunk);
}

void moe_bf16_to_f32(const uint16_t *x, float *y, size_t n) {
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) {
        uint32_t u = (uint32_t)x[i] << 16;
        memcpy(&y[i], &u, 4);
    }
}

double moe_gemm_bf16_peak(int n, int reps) {
    if (!moe_gemm_bf16_available()) return 0;
    uint16_t *a = moe_alloc((size_t)n * n, 2), *b = moe_alloc((size_t)n * n, 2);
    float *c = moe_alloc((size_t)n * n, sizeof(float));
    double best = 0;
    if (a && b && c) {
        for (size_t i = 0; i < (size_t)n * n; i++) a[i] = b[i] = 0x3C00 + (uint16_t)(i % 64);
        for (int r = 0; r < 4 * reps; r++) { /* reps per transpose layout */
            double t = moe_time_now();
            if (moe_gemm_bf16(r & 1, (r >> 1) & 1, n, n, n, a, n, b, n, 0.0f, c, n) != MOE_OK) break;
            t = moe_time_now() - t;
            best = 2.0 * n * n * (double)n / t > best ? 2.0 * n * n * (double)n / t : best;
        }
    }
    moe_free(a);
    moe_free(b);
    moe_free(c);
    return best;
}
