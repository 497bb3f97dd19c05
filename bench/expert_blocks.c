/* The six GEMMs of one expert at E = 256 of bench/scaling.sh (32 rows, d = 512, f = 512,
 * gf = 1024), 64 independent blocks per shape spread over the OpenMP threads as the layer
 * spreads its experts: OpenBLAS (moe_gemm), oneDNN's fp32 matmul (moe_gemm_dnnl) and our
 * AVX-512 tiles (moe_gemm_small), GFLOP/s of the best of 3 rounds. The blocks (64 x 2 MB of
 * weights) do not fit in the caches, as in the layer. Build and run (bench/RESULTS.md, Scaling):
 *   cc -O2 -fopenmp -I src -I include bench/expert_blocks.c build/libmoe.a \
 *      $(pkg-config --libs libcjson libpcre2-8 libutf8proc) -ldnnl -lm -ldl -o /tmp/expert_blocks
 *   OMP_NUM_THREADS=2 /tmp/expert_blocks */
#include "kernels/kernels.h"

#include <omp.h>
#include <stdio.h>
#include <stdlib.h>

int main(void) {
    enum { E = 64 };
    static const struct {
        int ta, tb, m, n, k;
        const char *name;
    } s[] = {{0, 1, 32, 1024, 512, "h = x W_in^T (NT)"},   {0, 1, 32, 512, 512, "y = a W_out^T (NT)"},
             {1, 0, 512, 512, 32, "dW_out += dy^T a (TN)"}, {0, 0, 32, 512, 512, "da = dy W_out (NN)"},
             {1, 0, 1024, 512, 32, "dW_in += dh^T x (TN)"}, {0, 0, 32, 512, 1024, "dx = dh W_in (NN)"}};
    for (size_t q = 0; q < sizeof s / sizeof *s; q++) {
        int m = s[q].m, n = s[q].n, k = s[q].k, ta = s[q].ta, tb = s[q].tb;
        int lda = ta ? m : k, ldb = tb ? k : n;
        size_t na = (size_t)m * k, nb = (size_t)k * n, nc = (size_t)m * n;
        float *A = malloc(na * E * 4), *B = malloc(nb * E * 4), *C = calloc(nc * E, 4);
        if (!A || !B || !C) return 1;
        for (size_t i = 0; i < na * E; i++) A[i] = (float)(i % 7) * 0.1f;
        for (size_t i = 0; i < nb * E; i++) B[i] = (float)(i % 5) * 0.1f;
        double rate[3] = {0, 0, 0};
        for (int lib = 0; lib < 3; lib++)
            for (int r = 0; r < 3; r++) {
                double t = omp_get_wtime();
#pragma omp parallel for schedule(dynamic, 1)
                for (int e = 0; e < E; e++) {
                    moe_status st = MOE_ERR_STATE;
                    if (lib == 1)
                        st = moe_gemm_dnnl(ta, tb, m, n, k, A + na * e, lda, B + nb * e, ldb, 1.0f,
                                           C + nc * e, n);
                    if (lib == 2)
                        st = moe_gemm_small(ta, tb, m, n, k, A + na * e, lda, B + nb * e, ldb,
                                            1.0f, C + nc * e, n);
                    if (st != MOE_OK)
                        moe_gemm(ta, tb, m, n, k, 1.0f, A + na * e, lda, B + nb * e, ldb, 1.0f,
                                 C + nc * e, n);
                }
                t = omp_get_wtime() - t;
                double g = 2.0 * m * n * k * E / t / 1e9;
                rate[lib] = g > rate[lib] ? g : rate[lib];
            }
        printf("%-24s OpenBLAS %6.1f   oneDNN %6.1f   small %6.1f GFLOP/s\n", s[q].name, rate[0],
               rate[1], rate[2]);
        free(A), free(B), free(C);
    }
    return 0;
}
