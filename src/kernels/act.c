#include "kernels/kernels.h"

#include <math.h>

static inline float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }

/* phi(h) and phi'(h) for the element-wise part of each activation. */
static inline float phi(moe_activation act, float h) {
    switch (act) {
    case MOE_ACT_SWIGLU:
    case MOE_ACT_SILU: return h * sigmoidf_(h);
    case MOE_ACT_GEGLU:
    case MOE_ACT_GELU: return 0.5f * h * (1.0f + erff(h * 0.70710678118654752f));
    case MOE_ACT_RELU2: return h > 0 ? h * h : 0.0f;
    }
    return 0;
}

static inline float dphi(moe_activation act, float h) {
    switch (act) {
    case MOE_ACT_SWIGLU:
    case MOE_ACT_SILU: {
        float s = sigmoidf_(h);
        return s * (1.0f + h * (1.0f - s));
    }
    case MOE_ACT_GEGLU:
    case MOE_ACT_GELU:
        return 0.5f * (1.0f + erff(h * 0.70710678118654752f)) +
               h * 0.39894228040143268f * expf(-0.5f * h * h);
    case MOE_ACT_RELU2: return h > 0 ? 2.0f * h : 0.0f;
    }
    return 0;
}

void moe_act_forward_row(moe_activation act, int f, const float *h, float w, float *a) {
    if (act == MOE_ACT_SWIGLU || act == MOE_ACT_GEGLU) {
        for (int i = 0; i < f; i++) a[i] = w * phi(act, h[i]) * h[f + i];
    } else {
        for (int i = 0; i < f; i++) a[i] = w * phi(act, h[i]);
    }
}

double moe_act_backward_row(moe_activation act, int f, const float *h, float w, const float *da,
                            float *dh) {
    double dw = 0;
    if (act == MOE_ACT_SWIGLU || act == MOE_ACT_GEGLU) {
        for (int i = 0; i < f; i++) {
            float g = h[i], u = h[f + i], p = phi(act, g);
            dw += (double)da[i] * p * u;
            dh[i] = w * da[i] * u * dphi(act, g);
            dh[f + i] = w * da[i] * p;
        }
    } else {
        for (int i = 0; i < f; i++) {
            dw += (double)da[i] * phi(act, h[i]);
            dh[i] = w * da[i] * dphi(act, h[i]);
        }
    }
    return dw;
}
