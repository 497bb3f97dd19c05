/* The last two parts of an expert's backward, dW_in += dh^T x (TN) and dx = dh W_in (NN), for
 * `experts` experts whose weights and gradients come from memory: one after the other (jb = 0),
 * or interleaved in blocks of jb rows of W_in (the TN of a block, then its share of the NN
 * accumulated into dx), so that the gradient-heavy TN and the compute-heavy NN alternate within
 * each weight block. GFLOP/s on one thread, best of 7 rounds; run two at once to share the
 * memory as the layer's two threads do. Libraries: TN then NN, each b (OpenBLAS), d (oneDNN) or
 * s (our tiles). bench/RESULTS.md, session 20. The build makes build/bench_interleave (when
 * oneDNN is found); by hand:
 *   cc -O2 -fopenmp -I src -I include bench/interleave.c build/libmoe.a \
 *      $(pkg-config --libs libcjson libpcre2-8 libutf8proc) -ldnnl -lm -ldl \
 *      -o /tmp/interleave
 *   OPENBLAS_CORETYPE=SkylakeX OMP_NUM_THREADS=1 /tmp/interleave rows gf d experts jb libs */
#include "core/core.h"
#include "kernels/kernels.h"

#include <stdio.h>
#include <stdlib.h>

static void gemm(char lib, int ta, int m, int n, int k, const float *A, int lda, const float *B,
                 int ldb, float beta, float *C, int ldc) {
    if (lib == 'b') moe_gemm_blas(ta, 0, m, n, k, 1.0f, A, lda, B, ldb, beta, C, ldc);
    else if (lib == 'd') moe_gemm_dnnl(ta, 0, m, n, k, A, lda, B, ldb, beta, C, ldc);
    else moe_gemm_small(ta, 0, m, n, k, A, lda, B, ldb, beta, C, ldc);
}

static float *filled(long n, int zero) {
    float *p = moe_alloc((size_t)n, sizeof(float));
    if (!p) exit(1);
    for (long i = 0; i < n; i++) p[i] = zero ? 0.0f : rand() / (float)RAND_MAX - 0.5f;
    return p;
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: interleave rows gf d experts jb libs (e.g. 32 1024 512 64 0 bd)\n");
        return 2;
    }
    int rows = atoi(argv[1]), gf = atoi(argv[2]), d = atoi(argv[3]), ne = atoi(argv[4]);
    int jb = atoi(argv[5]);
    char tl = argv[6][0], nl = argv[6][1];
    long sw = (long)gf * d, sh = (long)rows * gf, sx = (long)rows * d;
    float *w = filled(sw * ne, 0), *dw = filled(sw * ne, 1), *dh = filled(sh * ne, 0);
    float *x = filled(sx * ne, 0), *dx = filled(sx * ne, 1);
    double best = 0;
    for (int round = 0; round < 7; round++) {
        double t0 = moe_time_now();
        for (int e = 0; e < ne; e++) {
            const float *we = w + e * sw, *dhe = dh + e * sh, *xe = x + e * sx;
            float *dwe = dw + e * sw, *dxe = dx + e * sx;
            int step = jb > 0 ? jb : gf;
            for (int j0 = 0; j0 < gf; j0 += step) {
                int n = gf - j0 < step ? gf - j0 : step;
                gemm(tl, 1, n, d, rows, dhe + j0, gf, xe, d, 1.0f, dwe + (long)j0 * d, d);
                gemm(nl, 0, rows, d, n, dhe + j0, gf, we + (long)j0 * d, d, j0 ? 1.0f : 0.0f,
                     dxe, d);
            }
        }
        double rate = ne * 4.0 * rows * gf * d / (moe_time_now() - t0) / 1e9;
        best = rate > best ? rate : best;
    }
    printf("rows %d gf %d d %d, %d experts, blocks of %d, %s: %.1f GFLOP/s\n", rows, gf, d, ne, jb,
           argv[6], best);
    return 0;
}
