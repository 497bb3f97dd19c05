/* Expert blocks, one single-threaded GEMM each, spread over the OpenMP threads as the layer
 * spreads its experts: OpenBLAS (moe_gemm_blas), oneDNN's fp32 matmul (moe_gemm_dnnl) and our
 * AVX-512 tiles (moe_gemm_small), GFLOP/s of the best of 5 rounds, C += op(A) op(B).
 *
 * Without arguments: the six GEMMs of one expert at E = 256 of bench/scaling.sh (32 rows,
 * d = 512, f = 512, gf = 1024), 64 blocks per shape. With arguments, one shape:
 *   expert_blocks ta tb m n k [blocks [distinct]]
 * blocks GEMMs per round (default 64), each with its own A (the expert's rows), and B and C
 * taken from `distinct` copies (default: as many as blocks; 1 or 2 keep them in the caches, to
 * compare against the same blocks from memory). Allocated as the layer allocates (moe_alloc).
 * Build and run (bench/RESULTS.md, Scaling):
 *   cc -O2 -fopenmp -I src -I include bench/expert_blocks.c build/libmoe.a \
 *      $(pkg-config --libs libcjson libpcre2-8 libutf8proc) -ldnnl -lm -ldl -o /tmp/expert_blocks
 *   OMP_NUM_THREADS=2 /tmp/expert_blocks
 *   OMP_NUM_THREADS=2 /tmp/expert_blocks 0 1 96 2048 512 16 8 */
#include "core/core.h"
#include "kernels/kernels.h"

#include <omp.h>
#include <stdio.h>
#include <stdlib.h>

/* As the layer allocates: from 4 MB in 2 MB pages (moe_alloc). */
static float *floats(size_t n) { return moe_alloc(n, sizeof(float)); }

static int run(int ta, int tb, int m, int n, int k, int blocks, int distinct, const char *name) {
    int lda = ta ? m : k, ldb = tb ? k : n;
    size_t na = (size_t)m * k, nb = (size_t)k * n, nc = (size_t)m * n;
    float *A = floats(na * blocks), *B = floats(nb * distinct), *C = floats(nc * distinct);
    if (!A || !B || !C) return 1;
    for (size_t i = 0; i < na * blocks; i++) A[i] = (float)(i % 7) * 0.1f;
    for (size_t i = 0; i < nb * distinct; i++) B[i] = (float)(i % 5) * 0.1f;
    for (size_t i = 0; i < nc * distinct; i++) C[i] = 0;
    double rate[3] = {0, 0, 0};
    for (int lib = 0; lib < 3; lib++)
        for (int r = 0; r < 5; r++) {
            double t = omp_get_wtime();
#pragma omp parallel for schedule(dynamic, 1)
            for (int e = 0; e < blocks; e++) {
                const float *a = A + na * e, *b = B + nb * (e % distinct);
                float *c = C + nc * (e % distinct);
                moe_status st = MOE_ERR_STATE;
                if (lib == 1) st = moe_gemm_dnnl(ta, tb, m, n, k, a, lda, b, ldb, 1.0f, c, n);
                if (lib == 2) st = moe_gemm_small(ta, tb, m, n, k, a, lda, b, ldb, 1.0f, c, n);
                if (st != MOE_OK) moe_gemm_blas(ta, tb, m, n, k, 1.0f, a, lda, b, ldb, 1.0f, c, n);
            }
            t = omp_get_wtime() - t;
            double g = 2.0 * m * n * k * blocks / t / 1e9;
            rate[lib] = g > rate[lib] ? g : rate[lib];
        }
    printf("%-24s OpenBLAS %6.1f   oneDNN %6.1f   small %6.1f GFLOP/s\n", name, rate[0], rate[1],
           rate[2]);
    moe_free(A), moe_free(B), moe_free(C);
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 6) {
        int v[7] = {0, 0, 0, 0, 0, 64, 0};
        for (int i = 1; i < argc && i <= 7; i++) v[i - 1] = atoi(argv[i]);
        if (v[2] < 1 || v[3] < 1 || v[4] < 1 || v[5] < 1 || (v[0] && v[1])) {
            fprintf(stderr, "usage: expert_blocks [ta tb m n k [blocks [distinct]]]\n");
            return 2;
        }
        int distinct = v[6] >= 1 && v[6] <= v[5] ? v[6] : v[5];
        char name[64];
        snprintf(name, sizeof name, "%s %dx%dx%d", v[0] ? "TN" : v[1] ? "NT" : "NN", v[2], v[3],
                 v[4]);
        return run(v[0], v[1], v[2], v[3], v[4], v[5], distinct, name);
    }
    static const struct {
        int ta, tb, m, n, k;
        const char *name;
    } s[] = {{0, 1, 32, 1024, 512, "h = x W_in^T (NT)"},   {0, 1, 32, 512, 512, "y = a W_out^T (NT)"},
             {1, 0, 512, 512, 32, "dW_out += dy^T a (TN)"}, {0, 0, 32, 512, 512, "da = dy W_out (NN)"},
             {1, 0, 1024, 512, 32, "dW_in += dh^T x (TN)"}, {0, 0, 32, 512, 1024, "dx = dh W_in (NN)"}};
    for (size_t q = 0; q < sizeof s / sizeof *s; q++)
        if (run(s[q].ta, s[q].tb, s[q].m, s[q].n, s[q].k, 64, 64, s[q].name)) return 1;
    return 0;
}
