#include "kernels/kernels.h"

#include "core/core.h"

#include <stdio.h>

#include <cblas.h>

static void scale_rows(int m, int n, float beta, float *C, int ldc) {
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) C[(size_t)i * ldc + j] = beta == 0 ? 0 : beta * C[(size_t)i * ldc + j];
}

void moe_gemm(int ta, int tb, int m, int n, int k, float alpha, const float *A, int lda,
              const float *B, int ldb, float beta, float *C, int ldc) {
    if (m <= 0 || n <= 0) return;
    if (k <= 0) {
        if (beta != 1.0f) scale_rows(m, n, beta, C, ldc);
        return;
    }
    cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, m,
                n, k, alpha, A, lda, B, ldb, beta, C, ldc);
}

void moe_gemm64(int ta, int tb, int m, int n, int k, double alpha, const double *A, int lda,
                const double *B, int ldb, double beta, double *C, int ldc) {
    if (m <= 0 || n <= 0) return;
    if (k <= 0) {
        for (int i = 0; i < m; i++)
            for (int j = 0; j < n; j++) C[(size_t)i * ldc + j] = beta == 0 ? 0 : beta * C[(size_t)i * ldc + j];
        return;
    }
    cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, m,
                n, k, alpha, A, lda, B, ldb, beta, C, ldc);
}

const char *moe_gemm_backend(void) {
    static char name[128];
    snprintf(name, sizeof name, "OpenBLAS %s (%s)", openblas_get_corename(), openblas_get_config());
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
        for (int r = 0; r < reps; r++) {
            double t = moe_time_now();
            moe_gemm(0, 0, n, n, n, 1.0f, a, n, b, n, 0.0f, c, n);
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
