#include "kernels/kernels.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float sigmoid_vec(float x) { return 1.0f / (1.0f + moe_exp_vec(-x)); }

static inline float gelu(float h) { return 0.5f * h * (1.0f + erff(h * 0.70710678118654752f)); }
static inline float dgelu(float h) {
    return 0.5f * (1.0f + erff(h * 0.70710678118654752f)) +
           h * 0.39894228040143268f * expf(-0.5f * h * h);
}

/* Each activation has its own loop without branches on the activation inside, so that the
 * compiler vectorises it. u is the gate's partner (the up projection) or NULL. */
static void fwd_silu(int f, const float *h, const float *u, float w, float *a) {
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
