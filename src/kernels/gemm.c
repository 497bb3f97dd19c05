/* GEMM through OpenBLAS's CBLAS, loaded at run time so that the kernels are chosen before the
 * library initialises. MOE_BLAS_CORETYPE decides: unset or "auto" selects OpenBLAS's AVX-512
 * (SkylakeX) kernels on CPUs with AVX-512 (Debian's OpenBLAS 0.3.21 otherwise runs its AVX2
 * kernels on AMD Zen 4/5, and environments often pin OPENBLAS_CORETYPE=Haswell: 210 against
 * 392 GFLOP/s for SGEMM 2048^3 on 2 Zen 5 cores, bench/RESULTS.md); "keep" leaves
 * OPENBLAS_CORETYPE as it is; any other value is passed on as OPENBLAS_CORETYPE. */
#define _POSIX_C_SOURCE 200809L
#include "kernels/kernels.h"

#include "core/core.h"

#include <dlfcn.h>
#include <omp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>

#ifndef MOE_OPENBLAS_LIB
#define MOE_OPENBLAS_LIB "libopenblas.so.0"
#endif

typedef void (*sgemm_fn)(enum CBLAS_ORDER, enum CBLAS_TRANSPOSE, enum CBLAS_TRANSPOSE, blasint,
                         blasint, blasint, float, const float *, blasint, const float *, blasint,
                         float, float *, blasint);
typedef void (*dgemm_fn)(enum CBLAS_ORDER, enum CBLAS_TRANSPOSE, enum CBLAS_TRANSPOSE, blasint,
                         blasint, blasint, double, const double *, blasint, const double *,
                         blasint, double, double *, blasint);
typedef char *(*name_fn)(void);

static struct {
    sgemm_fn sgemm;
    dgemm_fn dgemm;
    name_fn corename, config;
} blas;
static pthread_once_t blas_once = PTHREAD_ONCE_INIT;

static void blas_load(void) {
    const char *want = getenv("MOE_BLAS_CORETYPE");
    if (want && *want && strcmp(want, "auto") && strcmp(want, "keep")) {
        setenv("OPENBLAS_CORETYPE", want, 1);
    } else if (!want || !*want || !strcmp(want, "auto")) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
            __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
            setenv("OPENBLAS_CORETYPE", "SkylakeX", 1);
#endif
    }
    void *h = dlopen(MOE_OPENBLAS_LIB, RTLD_NOW | RTLD_GLOBAL);
    if (!h) h = dlopen("libopenblas.so.0", RTLD_NOW | RTLD_GLOBAL);
    if (h) {
        blas.sgemm = (sgemm_fn)(uintptr_t)dlsym(h, "cblas_sgemm");
        blas.dgemm = (dgemm_fn)(uintptr_t)dlsym(h, "cblas_dgemm");
        blas.corename = (name_fn)(uintptr_t)dlsym(h, "openblas_get_corename");
        blas.config = (name_fn)(uintptr_t)dlsym(h, "openblas_get_config");
    }
    if (!blas.sgemm || !blas.dgemm) {
        /* an installation error, not a user input: nothing can run without GEMM */
        fprintf(stderr, "moe: cannot load OpenBLAS (%s): %s\n", MOE_OPENBLAS_LIB,
                h ? "cblas_sgemm missing" : dlerror());
        abort();
    }
}

static void scale_rows(int m, int n, double beta, float *C, double *C64, int ldc) {
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) {
            size_t at = (size_t)i * ldc + j;
            if (C) C[at] = beta == 0 ? 0.0f : (float)(beta * C[at]);
            else C64[at] = beta == 0 ? 0.0 : beta * C64[at];
        }
}

/* One GEMM call, float or double (C = alpha op(A) op(B) + beta C, row-major). */
typedef struct {
    int ta, tb, m, n, k, lda, ldb, ldc;
    double alpha, beta;
    const void *A, *B;
    void *C;
    size_t elem; /* sizeof(float) or sizeof(double) */
} gemm_call;

/* Rows lo..hi-1 of C (cols 0) or its columns lo..hi-1 (cols 1) in one BLAS call. */
static void blas_part(const gemm_call *g, int cols, int lo, int hi) {
    const char *A = g->A, *B = g->B;
    char *C = g->C;
    size_t e = g->elem;
    if (cols) {
        B += e * (g->tb ? (size_t)lo * g->ldb : (size_t)lo);
        C += e * (size_t)lo;
    } else {
        A += e * (g->ta ? (size_t)lo : (size_t)lo * g->lda);
        C += e * (size_t)lo * g->ldc;
    }
    int m = cols ? g->m : hi - lo, n = cols ? hi - lo : g->n;
    enum CBLAS_TRANSPOSE ta = g->ta ? CblasTrans : CblasNoTrans;
    enum CBLAS_TRANSPOSE tb = g->tb ? CblasTrans : CblasNoTrans;
    if (e == sizeof(float))
        blas.sgemm(CblasRowMajor, ta, tb, m, n, g->k, (float)g->alpha, (const float *)A, g->lda,
                   (const float *)B, g->ldb, (float)g->beta, (float *)C, g->ldc);
    else
        blas.dgemm(CblasRowMajor, ta, tb, m, n, g->k, g->alpha, (const double *)A, g->lda,
                   (const double *)B, g->ldb, g->beta, (double *)C, g->ldc);
}

/* Outside a parallel region the threads split C themselves, by rows (by columns when C is wider
 * than tall) in multiples of 16, one single-threaded BLAS call each (OpenBLAS built with OpenMP
 * runs one thread inside a region). OpenBLAS's own threading synchronises its threads on every
 * panel: at a transformer layer's sizes that cost a third of the rate (2048 x 128 x 256 NN: 261
 * against 380 GFLOP/s on 2 cores, bench/RESULTS.md), at 2048^3 nothing. The split depends on the
 * thread count only, so results do too. */
static void gemm_run(const gemm_call *g) {
    if (g->m <= 0 || g->n <= 0) return;
    if (g->k <= 0) {
        if (g->beta != 1.0)
            scale_rows(g->m, g->n, g->beta, g->elem == sizeof(float) ? g->C : NULL,
                       g->elem == sizeof(float) ? NULL : g->C, g->ldc);
        return;
    }
    pthread_once(&blas_once, blas_load);
    int cols = g->n > g->m, blocks = (cols ? g->n : g->m) / 16;
    int parts = omp_in_parallel() ? 1 : moe_num_threads();
    parts = parts < blocks ? parts : blocks;
    if (parts <= 1) {
        blas_part(g, cols, 0, cols ? g->n : g->m);
        return;
    }
#pragma omp parallel /* the whole team, some idle: a smaller one would be allocated anew */
    if (omp_get_thread_num() < parts) {
        int lo, hi;
        moe_part16(cols ? g->n : g->m, omp_get_thread_num(), parts, &lo, &hi);
        blas_part(g, cols, lo, hi);
    }
}

/* Which library multiplies an fp32 GEMM outside a parallel region, per layout (NN, TN, NT; TT
 * goes to OpenBLAS). MOE_GEMM: "auto" (default) takes what measured faster on 2 Zen 5 cores
 * (bench/RESULTS.md, session 10): oneDNN's matmul for NN and TN — 1.02-1.25x OpenBLAS split
 * over the threads at a transformer's and the router's shapes, 3x for the router's backward at
 * E = 8 — and OpenBLAS for NT (0.84-1.17x, 0.84 at the router's logits with many experts);
 * "blas" or "dnnl" for all three, for comparisons. Without oneDNN: OpenBLAS. */
static pthread_once_t lib_once = PTHREAD_ONCE_INIT;
static int use_dnnl[3];
static void read_gemm_choice(void) {
    const char *v = getenv("MOE_GEMM");
    if (v && *v && strcmp(v, "auto") && strcmp(v, "blas") && strcmp(v, "dnnl"))
        fprintf(stderr, "moe: MOE_GEMM=%s is not auto, blas or dnnl: using auto\n", v);
    int dnnl = moe_gemm_dnnl_available(), all = v && !strcmp(v, "dnnl");
    int none = v && !strcmp(v, "blas");
    for (int l = 0; l < 3; l++) use_dnnl[l] = dnnl && !none && (all || l < 2);
}

void moe_gemm(int ta, int tb, int m, int n, int k, float alpha, const float *A, int lda,
              const float *B, int ldb, float beta, float *C, int ldc) {
    /* a decoding step's products: a library packs B before multiplying, which at one row of A
     * reads the weights twice and writes them once (bench/RESULTS.md, decoding) */
    if (!ta && tb && alpha == 1.0f && moe_gemm_dot(0, m, n, k, A, lda, B, ldb, beta, C, ldc))
        return;
    pthread_once(&lib_once, read_gemm_choice);
    int layout = ta && tb ? -1 : ta ? 1 : tb ? 2 : 0;
    if (layout >= 0 && use_dnnl[layout] && alpha == 1.0f && (beta == 0.0f || beta == 1.0f) &&
        !omp_in_parallel() &&
        moe_gemm_dnnl(ta, tb, m, n, k, A, lda, B, ldb, beta, C, ldc) == MOE_OK)
        return;
    moe_gemm_blas(ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
}

void moe_gemm_blas(int ta, int tb, int m, int n, int k, float alpha, const float *A, int lda,
                   const float *B, int ldb, float beta, float *C, int ldc) {
    gemm_call g = {ta, tb, m, n, k, lda, ldb, ldc, alpha, beta, A, B, C, sizeof(float)};
    gemm_run(&g);
}

void moe_gemm64(int ta, int tb, int m, int n, int k, double alpha, const double *A, int lda,
                const double *B, int ldb, double beta, double *C, int ldc) {
    gemm_call g = {ta, tb, m, n, k, lda, ldb, ldc, alpha, beta, A, B, C, sizeof(double)};
    gemm_run(&g);
}

const char *moe_gemm_backend(void) {
    static char name[192];
    pthread_once(&blas_once, blas_load);
    pthread_once(&lib_once, read_gemm_choice);
    const char *dn = use_dnnl[2] ? "; oneDNN for NN, TN and NT"
                     : use_dnnl[0] ? "; oneDNN for NN and TN" : "";
    snprintf(name, sizeof name, "OpenBLAS %s (%s)%s", blas.corename ? blas.corename() : "?",
             blas.config ? blas.config() : "?", dn);
    return name;
}

double moe_gemm_peak(int n, int reps) {
    float *a = moe_alloc((size_t)n * n, sizeof(float)), *b = moe_alloc((size_t)n * n, sizeof(float)),
          *c = moe_alloc((size_t)n * n, sizeof(float));
    double best = 0;
    if (a && b && c) {
        for (size_t i = 0; i < (size_t)n * n; i++) {
            a[i] = (float)(i % 13) * 0.01f;
            b[i] = (float)(i % 7) * 0.01f;
        }
        /* reps per transpose layout, each through gemm_run (the threads split C), as one
         * BLAS call (its own threading) and through oneDNN's matmul where it is built in: the
         * ceiling is the best of the three */
        pthread_once(&blas_once, blas_load);
        int ways = moe_gemm_dnnl_available() ? 3 : 2;
        for (int r = 0; r < 4 * ways * reps; r++) {
            int ta = r & 1, tb = (r >> 1) & 1, way = (r >> 2) % ways;
            gemm_call g = {ta, tb, n, n, n, n, n, n, 1.0, 0.0, a, b, c, sizeof(float)};
            double t = moe_time_now();
            if (way == 2) {
                if (moe_gemm_dnnl(ta, tb, n, n, n, a, n, b, n, 0.0f, c, n) != MOE_OK) continue;
            } else if (way == 1) {
                blas_part(&g, 0, 0, n);
            } else {
                gemm_run(&g);
            }
            t = moe_time_now() - t;
            double rate = 2.0 * n * n * (double)n / t;
            best = rate > best ? rate : best;
        }
    }
    moe_free(a);
    moe_free(b);
    moe_free(c);
    return best;
}
