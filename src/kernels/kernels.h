/* kernels/ — math on buffers: GEMM wrappers over CBLAS and element-wise activations. */
#ifndef MOE_KERNELS_H
#define MOE_KERNELS_H

#include "core/core.h"
#include "moe.h"

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* C[m,n] = alpha * op(A) op(B) + beta * C, row-major; ta/tb = 1 means transposed.
 * A is [m,k] (or [k,m] if ta), B is [k,n] (or [n,k] if tb). Empty sizes are no-ops
 * (beta still scales C when k == 0). Outside a parallel region the threads share C's rows (or
 * columns); inside one, the calling thread computes it alone. */
void moe_gemm(int ta, int tb, int m, int n, int k, float alpha, const float *A, int lda,
              const float *B, int ldb, float beta, float *C, int ldc);
/* moe_gemm through OpenBLAS alone, never oneDNN (moe_gemm takes oneDNN for NN and TN outside
 * a parallel region, which includes everything with one thread). */
void moe_gemm_blas(int ta, int tb, int m, int n, int k, float alpha, const float *A, int lda,
                   const float *B, int ldb, float beta, float *C, int ldc);
void moe_gemm64(int ta, int tb, int m, int n, int k, double alpha, const double *A, int lda,
                const double *B, int ldb, double beta, double *C, int ldc);

/* bf16 GEMM, fp32 accumulation and output: C [m,n] = op(A) op(B) + beta C with beta 0 or 1
 * (gemm_bf16.c, oneDNN). Available where oneDNN is built in and the CPU has AVX-512 (oneDNN
 * has no bf16 matmul below that); MOE_ERR_STATE elsewhere. */
int moe_gemm_dnnl_available(void); /* oneDNN built in (fp32 matmul on any x86-64) */
int moe_gemm_bf16_available(void);
moe_status moe_gemm_bf16(int ta, int tb, int m, int n, int k, const uint16_t *A, int lda,
                         const uint16_t *B, int ldb, float beta, float *C, int ldc);
double moe_gemm_bf16_peak(int n, int reps); /* like moe_gemm_peak; 0 without oneDNN */
/* fp32 C = op(A) op(B) + beta C (beta 0 or 1) through oneDNN's matmul: single-threaded inside
 * a parallel region, faster than OpenBLAS there for small-row NN and NT blocks (bench/RESULTS.md,
 * Scaling); MOE_ERR_STATE without oneDNN. */
moe_status moe_gemm_dnnl(int ta, int tb, int m, int n, int k, const float *A, int lda,
                         const float *B, int ldb, float beta, float *C, int ldc);
/* fp32 C = op(A) op(B) + beta C on one thread with AVX-512 register tiles that read the
 * operands in place (gemm_small.c): the expert blocks' GEMMs when the experts are spread over
 * the threads, and NT with at most MOE_GEMM_DOT_ROWS rows (decoding) as dot products along k.
 * MOE_ERR_INVALID for both transposed or beta other than 0 and 1, MOE_ERR_STATE where the CPU
 * lacks AVX-512. */
#define MOE_GEMM_DOT_ROWS 4
/* Part id of np of [0, n) in multiples of 16 (the last part takes the rest): [*lo, *hi). The
 * threads' shares of a GEMM's rows or columns; they depend on the thread count only. */
static inline void moe_part16(int n, int id, int np, int *lo, int *hi) {
    int blocks = n / 16;
    *lo = (int)((long)blocks * id / np) * 16;
    *hi = id == np - 1 ? n : (int)((long)blocks * (id + 1) / np) * 16;
}
/* C = A B^T + beta C (beta 0 or 1) for at most MOE_GEMM_DOT_ROWS rows of A as dot products along
 * k: fp32 operands (AVX-512, else AVX2), or bf16 (uint16_t) ones with fp32 accumulation
 * (AVX512-BF16); the rows of B split over the threads outside a parallel region (the results
 * do not depend on the split).
 * 1 when done, 0 where it does not apply (more rows, other beta, a CPU without the
 * instructions): then nothing is written. */
int moe_gemm_dot(int bf16, int m, int n, int k, const void *A, int lda, const void *B, int ldb,
                 float beta, float *C, int ldc);
/* The fp32 dot products moe_gemm_dot runs on a CPU with AVX2 and FMA but no AVX-512 (0 where it
 * has neither); its own entry so that the tests check it on any CPU that has them. */
int moe_gemm_dot_avx2(int m, int n, int k, const float *A, int lda, const float *B, int ldb,
                      float beta, float *C, int ldc);
int moe_gemm_small_available(void);
moe_status moe_gemm_small(int ta, int tb, int m, int n, int k, const float *A, int lda,
                          const float *B, int ldb, float beta, float *C, int ldc);
/* The part of a triangular (causal) product that moe_gemm_cached may skip, by row i of C:
 * MOE_TRI_COLS: only its columns below i + off are needed (the others may be left as they are
 * or written); MOE_TRI_K_BELOW: A's row i is zero from k = i + off on;
 * MOE_TRI_K_FROM: A's row i is zero below k = i + off. */
typedef enum { MOE_TRI_NONE, MOE_TRI_COLS, MOE_TRI_K_BELOW, MOE_TRI_K_FROM } moe_tri;
/* C = A B + beta1 C on the calling thread for small operands already in cache (the
 * attention's tiles): A's element (i, k) at A[i * sai + k * sak] (A: sai = lda, sak = 1; A^T:
 * sai = 1, sak = lda); B's row k at B + k * ldb, or with bt set B given transposed (element
 * (k, j) at B[j * ldb + k], k <= 1024), first transposed into the thread's scratch. AVX-512
 * register tiles of up to 64 columns, each summing over its k in order; tri and off as above.
 * 1 when done, 0 where the CPU lacks AVX-512 or k is too long (nothing written). */
int moe_gemm_cached(int m, int n, int k, const float *A, long sai, long sak, const float *B,
                    long ldb, int bt, int beta1, float *C, long ldc, moe_tri tri, int off);
/* T[c * ldt + r] = A[r * lda + c] for r < rows, c < cols, and 0 for rows <= r < ldt (ldt a
 * multiple of 8), on the calling thread with AVX-512: 1 when done, 0 where the CPU lacks it. */
int moe_transpose_floats(const float *A, int lda, int rows, int cols, float *T, int ldt);
void moe_f32_to_bf16(const float *x, uint16_t *y, size_t n); /* round to nearest even */
void moe_f32_to_bf16_serial(const float *x, uint16_t *y, size_t n); /* the same, one thread */
void moe_bf16_to_f32(const uint16_t *x, float *y, size_t n);

/* e^x written so that the compiler vectorises the loops that call it (libm's expf is a scalar
 * call), for the activations and the softmaxes: x = n ln2 + r with |r| <= ln2/2, e^r by its
 * Taylor series to r^7 (truncation below 6e-9 relative), 2^n put into the exponent bits.
 * Relative error a few ulp; NaN stays NaN; x below -87 gives e^-87, above 88 gives e^88 (the
 * activations only need e^x within [0, +inf) to saturate there; a softmax's terms below e^-87
 * of its largest are below the rounding of its sum). */
static inline float moe_exp_vec(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    const float shifter = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    float t = x * 1.44269504088896341f + shifter, n = t - shifter;
    float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;
    float p = 1.0f / 5040;
    p = p * r + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    uint32_t bits; /* 2^n: n + 127 into the exponent, n read from t's low bits (unsigned: any
                    * x, NaN included, without a float-to-int conversion) */
    memcpy(&bits, &t, sizeof bits);
    bits = (bits - 0x4B400000u + 127u) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* The same in float64, for the router's softmax over the experts (libm's exp is a scalar call:
 * at E = 256 it was a third of the router's selection): x = n ln2 + r, ln2 in two parts (n ln2's
 * high part exact), e^r by its Taylor series to r^13 (truncation below 5e-18 relative). A few
 * ulp; NaN stays NaN; x below -708 gives 0 (e^x is subnormal there), above 709 gives +inf. */
static inline double moe_exp_vec64(double x) {
    double xc = x < -708.0 ? -708.0 : x > 709.0 ? 709.0 : x;
    const double shifter = 6755399441055744.0; /* 1.5 * 2^52: adding it rounds to an integer */
    double t = xc * 1.4426950408889634074 + shifter, n = t - shifter;
    double r = (xc - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10;
    static const double taylor[14] = {1.0 / 6227020800, 1.0 / 479001600, 1.0 / 39916800,
                                      1.0 / 3628800,    1.0 / 362880,    1.0 / 40320,
                                      1.0 / 5040,       1.0 / 720,       1.0 / 120,
                                      1.0 / 24,         1.0 / 6,         0.5,
                                      1.0,              1.0}; /* 1/13! ... 1/0! */
    double p = moe_poly(taylor, 14, r);
    uint64_t bits; /* 2^n: n + 1023 into the exponent, n from t's low bits */
    memcpy(&bits, &t, sizeof bits);
    bits = (bits - 0x4338000000000000ull + 1023u) << 52;
    double scale;
    memcpy(&scale, &bits, sizeof scale);
    double y = p * scale;
    return x < -708.0 ? 0.0 : x > 709.0 ? (double)INFINITY : y;
}

/* Whole-buffer passes on all threads (vec.c): zeroing, copying, and the sum of squares in
 * float64 summed in fixed blocks, in order (the same bits for any thread count). */
void moe_zero_floats(float *x, size_t n);
void moe_copy_floats(float *dst, const float *src, size_t n);
double moe_sum_squares(const float *x, size_t n);
/* Whether moe_sum_squares(x, n) splits over the threads (else one thread sums it all). */
int moe_sum_squares_split(size_t n);

/* Name and configuration of the GEMM library in use. */
const char *moe_gemm_backend(void);
/* Best rate (FLOP/s) of an n x n x n SGEMM over reps calls for each of the four transpose
 * layouts, through OpenBLAS split over the threads, OpenBLAS's own threading and oneDNN's
 * matmul (where built in): the machine's fp32 ceiling. */
double moe_gemm_peak(int n, int reps);

/* Activation of one row: h [gf] -> a [f] = w * act(h) (gated: act(h[:f]) * h[f:]). */
void moe_act_forward_row(moe_activation act, int f, const float *h, float w, float *a);
/* Backward of one row: da [f] is dL/da (a = w * act(h)); writes dh [gf] = dL/dh and returns
 * dL/dw = sum(da * act(h)). */
double moe_act_backward_row(moe_activation act, int f, const float *h, float w, const float *da,
                            float *dh);

/* ---- transformer kernels (nn.c); shapes in the comments there */
void moe_rmsnorm_forward(float *y, float *rstd, const float *x, const float *w, int T, int d,
                         float eps);
/* dx = res (NULL: 0; may be dx) + dL/dx given dy = dL/dy; dw += dL/dw */
void moe_rmsnorm_backward(float *dx, const float *res, float *dw, const float *dy, const float *x,
                          const float *w, const float *rstd, int T, int d);
/* Rotary position embedding: the frequencies and which values rotate together. */
typedef struct {
    float theta;
    int interleave;      /* rotate pairs (2i, 2i+1) (DeepSeek) instead of (i, i + rd/2) */
    float factor;        /* YaRN context extension (> 1; else off) */
    int orig_max_pos;    /* YaRN: the positions the model was trained for */
    float beta_fast, beta_slow; /* YaRN: the ramp between extrapolated and interpolated pairs */
    float attn_factor;   /* cos and sin scaled by this (YaRN's mscale ratio); 0 or 1: off */
} moe_rope;
/* cos and sin of the rd/2 pairs at positions 0 .. n_pos-1 for moe_rope_rotate:
 * cs [n_pos, rd] (each row rd/2 cosines, then rd/2 sines). */
void moe_rope_table(float *cs, int n_pos, int rd, const moe_rope *r);
void moe_rope_rotate(float *x, int T, int n_heads, int head_stride, int rd, const int *pos,
                     const moe_rope *r, const float *cs, int n_cs, int dir);
/* Rotate-half RoPE of whole heads without scaling. */
void moe_rope_apply(float *x, int T, int n_heads, int hd, const int *pos, float theta, int dir);
/* Attention shapes: B sequences of S tokens, H query heads over KV key/value heads, q and k
 * heads dk wide, v (and the output) heads dv wide, scores q.k * scale. */
typedef struct {
    int B, S, H, KV, dk, dv;
    float scale;
} moe_attn_dims;
/* Scratch (floats) with which moe_attention_forward and _backward take each sequence's keys
 * (values) transposed once per call instead of once per tile: B * KV * max(dk, dv) * (S rounded
 * up to 16, plus 16). Less (NULL) is allowed: the tiles then transpose their own. */
size_t moe_attention_scratch_floats(const moe_attn_dims *a);
void moe_attention_forward(float *out, float *probs, const float *q, const float *k,
                           const float *v, const moe_attn_dims *a, float *scratch,
                           size_t scratch_floats);
void moe_attention_backward(float *dq, float *dk, float *dv, const float *dout,
                            const float *probs, const float *q, const float *k, const float *v,
                            const moe_attn_dims *a, float *scratch, size_t scratch_floats);
void moe_attention_cached(float *out, const float *q, const float *k, const float *v, int n,
                          int P, const moe_attn_dims *a);
double moe_xent_forward_backward(float *dlogits, double *row_loss, const float *logits,
                                 const int32_t *y, int T, int V, float scale, int *n_counted);

#endif
