/* The causal attention's forward and backward (moe_attention_forward / _backward) at one shape,
 * ms of the best and the mean of `iters` calls each, with the transposed keys' scratch (as the
 * model runs it) or without it (each tile transposes its own). bench/RESULTS.md, session 26.
 * The build makes build/bench_attention (when oneDNN is found); by hand:
 *   cc -O2 -fopenmp -I src -I include bench/attention.c build/libmoe.a \
 *      $(pkg-config --libs libcjson libpcre2-8 libutf8proc) -ldnnl -lm -ldl -o /tmp/attention
 *   OMP_NUM_THREADS=2 /tmp/attention iters B S H KV dk [scratch 0|1]
 * The default model's attention: 300 16 128 4 2 32. To compare against another version of
 * nn.c in the same process (this machine's speed drifts more between runs than the changes
 * measured), that version's object file can be linked in with its symbols renamed:
 *   nm --defined-only -g nn.c.o | awk '{print $3, "old_"$3}' > redef.txt
 *   objcopy --redefine-syms=redef.txt nn.c.o old_nn.o
 * and its old_moe_attention_* called in turn with these. */
#include "core/core.h"
#include "kernels/kernels.h"

#include <omp.h>
#include <stdio.h>
#include <stdlib.h>

static float *filled(size_t n) {
    float *p = moe_alloc(n, sizeof(float));
    if (!p) exit(1);
    for (size_t i = 0; i < n; i++) p[i] = rand() / (float)RAND_MAX - 0.5f;
    return p;
}

int main(int argc, char **argv) {
    if (argc < 7) {
        fprintf(stderr, "usage: %s iters B S H KV dk [scratch 0|1]\n", argv[0]);
        return 2;
    }
    int it = atoi(argv[1]), B = atoi(argv[2]), S = atoi(argv[3]), H = atoi(argv[4]),
        KV = atoi(argv[5]), dk = atoi(argv[6]), use = argc > 7 ? atoi(argv[7]) : 1;
    if (it < 1 || B < 1 || S < 1 || KV < 1 || H % KV || dk < 1) {
        fprintf(stderr, "%s: iters, B, S, KV and dk must be positive, H a multiple of KV\n",
                argv[0]);
        return 2;
    }
    moe_attn_dims a = {B, S, H, KV, dk, dk, 1.0f / (float)dk};
    size_t T = (size_t)B * S, ns = use ? moe_attention_scratch_floats(&a) : 0;
    float *q = filled(T * H * dk), *k = filled(T * KV * dk), *v = filled(T * KV * dk),
          *o = filled(T * H * dk), *p = filled((size_t)B * H * S * S), *go = filled(T * H * dk),
          *dq = filled(T * H * dk), *dkk = filled(T * KV * dk), *dv = filled(T * KV * dk),
          *scratch = use ? filled(ns) : NULL;
    double best[2] = {1e30, 1e30}, sum[2] = {0, 0};
    for (int r = 0; r < it; r++) {
        double t0 = omp_get_wtime();
        moe_attention_forward(o, p, q, k, v, &a, scratch, ns);
        double t1 = omp_get_wtime();
        moe_attention_backward(dq, dkk, dv, go, p, q, k, v, &a, scratch, ns);
        double t[2] = {t1 - t0, omp_get_wtime() - t1};
        for (int w = 0; w < 2; w++) {
            best[w] = t[w] < best[w] ? t[w] : best[w];
            sum[w] += t[w];
        }
    }
    printf("attention B=%d S=%d H=%d KV=%d dk=%d, %s scratch, %d threads: forward best %.3f "
           "mean %.3f ms, backward best %.3f mean %.3f ms\n", B, S, H, KV, dk,
           use ? "with" : "without", omp_get_max_threads(), 1e3 * best[0], 1e3 * sum[0] / it,
           1e3 * best[1], 1e3 * sum[1] / it);
    return 0;
}
