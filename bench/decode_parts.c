/* The parts of a decoding step, measured alone (bench/RESULTS.md, Inference): a plain read of
 * 1 GB (AVX-512 adds over the threads), moe_gemm_dot's one-row products over 8 experts' W_in
 * (5632 x 1024, fp32 and bf16), and moe_layer_forward of one token (d = 1024, f = 2816, E = 8,
 * k = 2, fp32 and bf16 experts, reuse_bf16 as moe_model_decode sets it). Build and run:
 *   cc -O2 -fopenmp -mavx512f -I src -I include bench/decode_parts.c build/libmoe.a \
 *      $(pkg-config --libs libcjson libpcre2-8 libutf8proc ompi-c) -ldnnl -lm -ldl \
 *      -o /tmp/decode_parts
 *   OMP_NUM_THREADS=2 /tmp/decode_parts */
#include "core/core.h"
#include "kernels/kernels.h"

#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>

static void read_rate(void) {
    size_t n = (size_t)256 << 20;
    float *a = moe_alloc(n, sizeof(float));
#pragma omp parallel for
    for (size_t i = 0; i < n; i++) a[i] = (float)(i & 7);
    for (int r = 0; r < 3; r++) {
        double t = omp_get_wtime();
        float tot = 0;
#pragma omp parallel reduction(+ : tot)
        {
            __m512 s = _mm512_setzero_ps();
#pragma omp for
            for (size_t i = 0; i < n; i += 16) s = _mm512_add_ps(s, _mm512_load_ps(a + i));
            tot += _mm512_reduce_add_ps(s);
        }
        t = omp_get_wtime() - t;
        printf("read: %.1f GB/s (%g)\n", 4e-9 * (double)n / t, tot);
    }
    moe_free(a);
}

static void dot_rate(void) {
    int n = 5632, k = 1024, E = 8;
    size_t nw = (size_t)E * n * k;
    float *B = moe_alloc(nw, 4), *A = moe_alloc((size_t)k, 4), *C = moe_alloc((size_t)n, 4);
    uint16_t *Bh = moe_alloc(nw, 2), *Ah = moe_alloc((size_t)k, 2);
    for (size_t i = 0; i < nw; i++) B[i] = (float)(i % 7) * 0.1f;
    for (int i = 0; i < k; i++) A[i] = 0.01f * (float)i;
    moe_f32_to_bf16(B, Bh, nw);
    moe_f32_to_bf16(A, Ah, (size_t)k);
    for (int bf = 0; bf < 2; bf++)
        for (int r = 0; r < 3; r++) {
            double t = omp_get_wtime();
            for (int e = 0; e < E; e++)
                moe_gemm_dot(bf, 1, n, k, bf ? (const void *)Ah : (const void *)A, k,
                             bf ? (const void *)(Bh + (size_t)e * n * k)
                                : (const void *)(B + (size_t)e * n * k), k, 0.0f, C, n);
            t = omp_get_wtime() - t;
            printf("moe_gemm_dot %s: %.2f ms, %.1f GB/s\n", bf ? "bf16" : "fp32", 1e3 * t,
                   1e-9 * (double)nw * (bf ? 2 : 4) / t);
        }
    moe_free(B), moe_free(A), moe_free(C), moe_free(Bh), moe_free(Ah);
}

static void layer_call(int bf16) {
    moe_layer_config c = moe_layer_config_default();
    c.d = 1024, c.ffn = 2816, c.n_experts = 8, c.topk = 2, c.expert_bf16 = bf16;
    moe_layer *L;
    if (moe_layer_create(&c, 1, NULL, NULL, &L) != MOE_OK) {
        printf("%s\n", moe_last_error());
        return;
    }
    moe_layer_init_params(L, 1, 0.02f);
    float *x = moe_alloc(1024, 4), *y = moe_alloc(1024, 4);
    for (int i = 0; i < 1024; i++) x[i] = 0.01f * (float)(i % 17);
    moe_forward_args a = moe_forward_args_default();
    a.training = 0, a.reuse_bf16 = 1;
    for (int r = 0; r < 3; r++) {
        double t = omp_get_wtime();
        for (int i = 0; i < 50; i++) moe_layer_forward(L, y, x, 1, &a);
        printf("layer, one token, %s experts: %.3f ms per call\n", bf16 ? "bf16" : "fp32",
               1e3 * (omp_get_wtime() - t) / 50);
    }
    moe_free(x), moe_free(y);
    moe_layer_destroy(L);
}

int main(void) {
    read_rate();
    dot_rate();
    layer_call(0);
    if (moe_gemm_bf16_available()) layer_call(1);
    return 0;
}
