/* The small GEMMs of the default model (d = 128, 2048 tokens per step), GFLOP/s of the best of
 * 30 calls:
 *  1. whole products on all threads: moe_gemm (the threads split C's rows or columns, one
 *     single-threaded BLAS call each) against the BLAS's own threading (cblas_sgemm of the
 *     library moe_gemm loaded);
 *  2. the attention's tiles (64 queries x 64 keys, head width 32) on one thread inside a
 *     parallel region: the BLAS (moe_gemm) against our AVX-512 tiles (moe_gemm_small).
 * The build makes build/bench_small_gemms (when oneDNN is found); by hand
 * (bench/RESULTS.md, Training the default model):
 *   cc -O2 -fopenmp -I src -I include bench/small_gemms.c build/libmoe.a \
 *      $(pkg-config --libs libcjson libpcre2-8 libutf8proc) -ldnnl -lm -ldl -o /tmp/small_gemms
 *   OMP_NUM_THREADS=2 /tmp/small_gemms */
#define _GNU_SOURCE
#include "kernels/kernels.h"

#include <cblas.h>
#include <dlfcn.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>

typedef void (*sgemm_fn)(enum CBLAS_ORDER, enum CBLAS_TRANSPOSE, enum CBLAS_TRANSPOSE, blasint,
                         blasint, blasint, float, const float *, blasint, const float *, blasint,
                         float, float *, blasint);

typedef struct {
    int ta, tb, m, n, k, lda, ldb, ldc;
    const char *name;
} shape;

/* lib 0: moe_gemm; 1: the BLAS's own threading; 2: moe_gemm_small. */
static void call(int lib, sgemm_fn blas, const shape *s, const float *A, const float *B, float *C) {
    if (lib == 0)
        moe_gemm(s->ta, s->tb, s->m, s->n, s->k, 1.0f, A, s->lda, B, s->ldb, 0.0f, C, s->ldc);
    if (lib == 1)
        blas(CblasRowMajor, s->ta ? CblasTrans : CblasNoTrans, s->tb ? CblasTrans : CblasNoTrans,
             s->m, s->n, s->k, 1.0f, A, s->lda, B, s->ldb, 0.0f, C, s->ldc);
    if (lib == 2 && moe_gemm_small(s->ta, s->tb, s->m, s->n, s->k, A, s->lda, B, s->ldb, 0.0f, C,
                                   s->ldc) != MOE_OK)
        abort();
}

/* Best GFLOP/s over 30 calls; in_region: on one thread inside a parallel region of 2. */
static double rate(int lib, sgemm_fn blas, const shape *s, const float *A, const float *B, float *C,
                   int in_region) {
    double best = 1e30;
    for (int r = 0; r < 30; r++) {
        double t = omp_get_wtime();
        if (in_region) {
#pragma omp parallel num_threads(2)
            if (omp_get_thread_num() == 0)
                for (int i = 0; i < 100; i++) call(lib, blas, s, A, B, C);
        } else {
            call(lib, blas, s, A, B, C);
        }
        t = (omp_get_wtime() - t) / (in_region ? 100 : 1);
        best = t < best ? t : best;
    }
    return 2.0 * s->m * s->n * (double)s->k / best * 1e-9;
}

int main(void) {
    static const shape whole[] = {
        {0, 1, 2048, 256, 128, 128, 128, 256, "x W^T, 2048 x 256 x 128 (NT)"},
        {0, 0, 2048, 128, 256, 256, 128, 128, "dy W, 2048 x 128 x 256 (NN)"},
        {1, 0, 256, 128, 2048, 256, 128, 128, "dy^T x, 256 x 128 x 2048 (TN)"},
        {0, 1, 2048, 257, 128, 128, 128, 257, "logits, 2048 x 257 x 128 (NT)"},
        {0, 1, 2048, 128, 128, 128, 128, 128, "q, 2048 x 128 x 128 (NT)"},
        {0, 0, 2048, 2048, 2048, 2048, 2048, 2048, "2048^3 (NN)"},
    };
    static const shape tiles[] = {
        {0, 1, 64, 64, 32, 128, 64, 64, "dP = dO V^T, 64 x 64 x 32 (NT)"},
        {0, 1, 64, 128, 32, 128, 64, 128, "scores, 64 x 128 x 32 (NT)"},
        {1, 0, 64, 32, 64, 128, 128, 64, "dV = P^T dO, 64 x 32 x 64 (TN)"},
        {0, 0, 64, 32, 64, 64, 64, 128, "dQ = dS K, 64 x 32 x 64 (NN)"},
        {0, 0, 64, 32, 128, 128, 64, 128, "O = P V, 64 x 32 x 128 (NN)"},
    };
    size_t n = (size_t)2048 * 2048;
    float *A = malloc(n * 4), *B = malloc(n * 4), *C = malloc(n * 4);
    for (size_t i = 0; i < n; i++) A[i] = (float)(i % 13) * 0.01f, B[i] = (float)(i % 7) * 0.01f;
    moe_gemm_blas(0, 0, 16, 16, 16, 1.0f, A, 16, B, 16, 0.0f, C, 16); /* loads the BLAS (moe_gemm
                                                                     * may not call it) */
    sgemm_fn blas = (sgemm_fn)(uintptr_t)dlsym(RTLD_DEFAULT, "cblas_sgemm");
    if (!blas) return fprintf(stderr, "cblas_sgemm not found\n"), 1;
    printf("%s, %d threads\nwhole products on all threads, GFLOP/s: moe_gemm | BLAS threading\n",
           moe_gemm_backend(), omp_get_max_threads());
    for (size_t i = 0; i < sizeof whole / sizeof *whole; i++)
        printf("  %-36s %6.1f | %6.1f\n", whole[i].name, rate(0, blas, &whole[i], A, B, C, 0),
               rate(1, blas, &whole[i], A, B, C, 0));
    printf("attention tiles, one thread in a region, GFLOP/s: BLAS | our tiles\n");
    for (size_t i = 0; i < sizeof tiles / sizeof *tiles; i++)
        printf("  %-36s %6.1f | %6.1f\n", tiles[i].name, rate(0, blas, &tiles[i], A, B, C, 1),
               moe_gemm_small_available() ? rate(2, blas, &tiles[i], A, B, C, 1) : 0.0);
    free(A), free(B), free(C);
    return 0;
}
