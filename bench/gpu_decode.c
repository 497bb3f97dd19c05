/* moe_model_decode on the GPU timed from the host (bench/RESULTS.md, decoding on the H200): the
 * 607 M-parameter model of `moe bench generate` (8 layers, d = 1024, 16 heads / 4 KV groups,
 * E = 8, k = 2, f = 2816, vocabulary 32 000) with random weights, a prompt of P tokens in one
 * call, then N greedy tokens one call each (the host's argmax between them), twice. It uses
 * only the public API, so it also links against an older library: that is how decoding without
 * the key/value cache (b502286) was measured against the first cached version. Build (a build
 * with CUDA, here without MPI and oneDNN, as the device runs used) and run:
 *   cc -O2 -std=gnu11 -I include -c bench/gpu_decode.c -o /tmp/gpu_decode.o
 *   c++ /tmp/gpu_decode.o build-dev/libmoe.a -lcjson -lpcre2-8 -lutf8proc -fopenmp -lm \
 *      /usr/local/cuda/lib/libcudart_static.a -ldl -lrt -lpthread -o /tmp/gpu_decode
 *   /tmp/gpu_decode P N MAX_TOKENS        (the runs: 512 16 1024 before, 512 64 1024 after) */
#include "moe.h"

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static int fail(void) {
    fprintf(stderr, "gpu_decode: %s\n", moe_last_error());
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: gpu_decode PROMPT_TOKENS NEW_TOKENS MAX_TOKENS\n");
        return 2;
    }
    int P = atoi(argv[1]), N = atoi(argv[2]), max_tokens = atoi(argv[3]);
    moe_model_config c = moe_model_config_default();
    c.vocab = 32000, c.d = 1024, c.n_layers = 8, c.n_heads = 16, c.n_kv_heads = 4;
    c.ffn = 2816, c.seq_len = 1024, c.moe.n_experts = 8, c.moe.topk = 2, c.moe.ffn = 2816;
    moe_model *m;
    if (P < 1 || N < 1 || P + N > c.seq_len) return 2;
    if (moe_model_create(&c, max_tokens, &m) != MOE_OK) return fail();
    if (moe_model_use_device(m, "cuda") != MOE_OK) return fail();
    moe_model_init_params(m, 1);
    int32_t *tok = malloc(sizeof(int32_t) * (size_t)P);
    if (!tok) return 1;
    for (int i = 0; i < P; i++) tok[i] = (int32_t)((i * 7919) % c.vocab);
    for (int run = 0; run < 2; run++) {
        moe_model_reset_cache(m);
        double t0 = now();
        if (moe_model_decode(m, tok, P) != MOE_OK) return fail();
        double t1 = now();
        const float *lg = moe_model_logits(m) + (size_t)(P - 1) * c.vocab;
        for (int i = 0; i < N; i++) {
            int32_t best = 0;
            for (int v = 1; v < c.vocab; v++) best = lg[v] > lg[best] ? v : best;
            if (moe_model_decode(m, &best, 1) != MOE_OK) return fail();
            lg = moe_model_logits(m);
        }
        printf("run %d: %zu parameters, prefill %d tokens %.1f ms, decode %.3f ms per token over "
               "%d\n", run, moe_model_param_count(m), P, 1e3 * (t1 - t0), 1e3 * (now() - t1) / N,
               N);
    }
    free(tok);
    moe_model_destroy(m);
    return 0;
}
