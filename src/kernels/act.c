#include "kernels/kernels.h"

#include "kernels/avx512.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float sigmoid_vec(float x) { return 1.0f / (1.0f + moe_exp_vec(-x)); }

static inline float gelu(float h) { return 0.5f * h * (1.0f + erff(h * 0.70710678118654752f)); }
static inline float dgelu(float h) {
    return 0.5f * (1.0f + erff(h * 0.70710678118654752f)) +
           h * 0.39894228040143268f * expf(-0.5f * h * h);
}

#ifdef MOE_X86
/* SiLU and SwiGLU on 16 lanes: e^x in fused multiply-adds and 1 / (1 + e^-x) as a 14-bit
 * reciprocal and one Newton step (within an ulp or two; a division is one vector per 16
 * cycles on Intel cores, more than the rest of the element's work). The row's tail is masked
 * and its sum for dL/dw reduced in registers: an expert's rows are 128-2816 floats, and the
 * scalar loops' per-row steps cost as much as a short row's arithmetic. */
static inline __attribute__((always_inline)) AVX512_TARGET __m512 sigmoid16(__m512 x) {
    __m512 e = moe_exp16(_mm512_sub_ps(_mm512_setzero_ps(), x));
    __m512 d = _mm512_add_ps(_mm512_set1_ps(1.0f), e);
    __m512 r = _mm512_rcp14_ps(d);
    return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
}

static AVX512_TARGET void fwd_silu16(int f, const float *h, const float *u, float w, float *a) {
    const __m512 vw = _mm512_set1_ps(w);
    for (int i = 0; i < f; i += 16) {
        __mmask16 k = moe_lanes16(f - i);
        __m512 g = _mm512_maskz_loadu_ps(k, h + i);
        __m512 y = _mm512_mul_ps(_mm512_mul_ps(vw, g), sigmoid16(g));
        if (u) y = _mm512_mul_ps(y, _mm512_maskz_loadu_ps(k, u + i));
        _mm512_mask_storeu_ps(a + i, k, y);
    }
}

static AVX512_TARGET double bwd_silu16(int f, const float *h, const float *u, float w,
                                       const float *da, float *dh) {
    const __m512 vw = _mm512_set1_ps(w), one = _mm512_set1_ps(1.0f);
    __m512d lo = _mm512_setzero_pd(), hi = _mm512_setzero_pd();
    for (int i = 0; i < f; i += 16) {
        __mmask16 k = moe_lanes16(f - i);
        __m512 g = _mm512_maskz_loadu_ps(k, h + i), d = _mm512_maskz_loadu_ps(k, da + i);
        __m512 s = sigmoid16(g), p = _mm512_mul_ps(g, s);
        __m512 ds = _mm512_mul_ps(s, _mm512_add_ps(one, _mm512_mul_ps(g, _mm512_sub_ps(one, s))));
        __m512 wd = _mm512_mul_ps(vw, d), t = _mm512_mul_ps(d, p);
        if (u) {
            __m512 ui = _mm512_maskz_loadu_ps(k, u + i);
            t = _mm512_mul_ps(t, ui);
            _mm512_mask_storeu_ps(dh + i, k, _mm512_mul_ps(_mm512_mul_ps(wd, ui), ds));
            _mm512_mask_storeu_ps(dh + f + i, k, _mm512_mul_ps(wd, p));
        } else {
            _mm512_mask_storeu_ps(dh + i, k, _mm512_mul_ps(wd, ds));
        }
        __m256 upper = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(t), 1));
        lo = _mm512_add_pd(lo, _mm512_cvtps_pd(_mm512_castps512_ps256(t)));
        hi = _mm512_add_pd(hi, _mm512_cvtps_pd(upper));
    }
    return _mm512_reduce_add_pd(_mm512_add_pd(lo, hi));
}
#endif

/* Each activation has its own loop without branches on the activation inside, so that the
 * compiler vectorises it. u is the gate's partner (the up projection) or NULL. */
static void fwd_silu(int f, const float *h, const float *u, float w, float *a) {
#ifdef MOE_X86
    if (moe_avx512()) {
        fwd_silu16(f, h, u, w, a);
        return;
    }
#endif
    if (u)
        for (int i = 0; i < f; i++) a[i] = w * h[i] * sigmoid_vec(h[i]) * u[i];
    else
        for (int i = 0; i < f; i++) a[i] = w * h[i] * sigmoid_vec(h[i]);
}

static void fwd_relu2(int f, const float *h, float w, float *a) {
    for (int i = 0; i < f; i++) a[i] = h[i] > 0 ? w * h[i] * h[i] : 0.0f;
}

static void fwd_gelu(int f, const float *h, const float *u, float w, float *a) {
    for (int i = 0; i < f; i++) a[i] = w * gelu(h[i]) * (u ? u[i] : 1.0f);
}

void moe_act_forward_row(moe_activation act, int f, const float *h, float w, float *a) {
    switch (act) {
    case MOE_ACT_SWIGLU: fwd_silu(f, h, h + f, w, a); return;
    case MOE_ACT_SILU: fwd_silu(f, h, NULL, w, a); return;
    case MOE_ACT_GEGLU: fwd_gelu(f, h, h + f, w, a); return;
    case MOE_ACT_GELU: fwd_gelu(f, h, NULL, w, a); return;
    case MOE_ACT_RELU2: fwd_relu2(f, h, w, a); return;
    }
}

/* dL/dh of a = w * phi(g) * u, and sum(da * phi(g) * u) for dL/dw. */
static double bwd_silu(int f, const float *h, const float *u, float w, const float *da,
                       float *dh) {
#ifdef MOE_X86
    if (moe_avx512()) return bwd_silu16(f, h, u, w, da, dh);
#endif
    double dw = 0; /* lane-wise partial sums: a fixed order for a given build */
    if (u) {
#pragma omp simd reduction(+ : dw)
        for (int i = 0; i < f; i++) {
            float g = h[i], s = sigmoid_vec(g), p = g * s;
            dw += (double)(da[i] * p * u[i]);
            dh[i] = w * da[i] * u[i] * (s * (1.0f + g * (1.0f - s)));
            dh[f + i] = w * da[i] * p;
        }
    } else {
#pragma omp simd reduction(+ : dw)
        for (int i = 0; i < f; i++) {
            float g = h[i], s = sigmoid_vec(g);
            dw += (double)(da[i] * g * s);
            dh[i] = w * da[i] * (s * (1.0f + g * (1.0f - s)));
        }
    }
    return dw;
}

static double bwd_relu2(int f, const float *h, float w, const float *da, float *dh) {
    double dw = 0;
#pragma omp simd reduction(+ : dw)
    for (int i = 0; i < f; i++) {
        float g = h[i] > 0 ? h[i] : 0.0f;
        dw += (double)(da[i] * g * g);
        dh[i] = w * da[i] * 2.0f * g;
    }
    return dw;
}

static double bwd_gelu(int f, const float *h, const float *u, float w, const float *da,
                       float *dh) {
    double dw = 0;
    for (int i = 0; i < f; i++) {
        float g = h[i], p = gelu(g), ui = u ? u[i] : 1.0f;
        dw += (double)da[i] * p * ui;
        dh[i] = w * da[i] * ui * dgelu(g);
        if (u) dh[f + i] = w * da[i] * p;
    }
    return dw;
}

double moe_act_backward_row(moe_activation act, int f, const float *h, float w, const float *da,
                            float *dh) {
    switch (act) {
    case MOE_ACT_SWIGLU: return bwd_silu(f, h, h + f, w, da, dh);
    case MOE_ACT_SILU: return bwd_silu(f, h, NULL, w, da, dh);
    case MOE_ACT_GEGLU: return bwd_gelu(f, h, h + f, w, da, dh);
    case MOE_ACT_GELU: return bwd_gelu(f, h, NULL, w, da, dh);
    case MOE_ACT_RELU2: return bwd_relu2(f, h, w, da, dh);
    }
    return 0;
}
