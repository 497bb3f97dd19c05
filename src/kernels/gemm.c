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

void moe_gemm(int ta, int tb, int m, int n, int k, float alpha, const float *A, int lda,
              const float *B, int ldb, float beta, float *C, int ldc) {
    if (m <= 0 || n <= 0) return;
    if (k <= 0) {
        if (beta != 1.0f) scale_rows(m, n, beta, C, NULL, ldc);
        return;
    }
    pthread_once(&blas_once, blas_load);
    blas.sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, m, n,
               k, alpha, A, lda, B, ldb, beta, C, ldc);
}

void moe_gemm64(int ta, int tb, int m, int n, int k, double alpha, const double *A, int lda,
                const double *B, int ldb, double beta, double *C, int ldc) {
    if (m <= 0 || n <= 0) return;
    if (k <= 0) {
        if (beta != 1.0) scale_rows(m, n, beta, NULL, C, ldc);
        return;
    }
    pthread_once(&blas_once, blas_load);
    blas.dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, m, n,
               k, alpha, A, lda, B, ldb, beta, C, ldc);
}

const char *moe_gemm_backend(void) {
    static char name[128];
    pthread_once(&blas_once, blas_load);
    snprintf(name, sizeof name, "OpenBLAS %s (%s)", blas.corename ? blas.corename() : "?",
             blas.config ? blas.config() : "?");
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
        for (int r = 0; r < 4 * reps; r++) { /* reps per transpose layout */
            double t = moe_time_now();
            moe_gemm(r & 1, (r >> 1) & 1, n, n, n, 1.0f, a, n, b, n, 0.0f, c, n);
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
