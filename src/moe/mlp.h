/* The two-layer MLP of an expert, a shared expert or a dense FFN (experts.c). */
#ifndef MOE_MLP_H
#define MOE_MLP_H

#include "moe.h"

#include <stdint.h>

/* Gated activations (swiglu, geglu) have an input projection of 2f rows: [0,f) gate, [f,2f) up. */
int moe_act_gated(moe_activation a);

/* bf16 operands of an MLP's GEMMs (fp32 accumulation): weights converted once per forward,
 * and scratch for the converted activations. x and a are written by the forward and read by
 * the backward. */
typedef struct {
    const uint16_t *w_in, *w_out; /* [gf, d], [d, f] */
    uint16_t *x, *a, *dy, *dh;    /* [n, d], [n, f], [n, d], [n, gf] */
} moe_mlp_bf16;

/* MLP rows. x [n, d] -> h [n, gf], a [n, f] (= w * act(h)), y [n, d]
 * (= a W_outᵀ + w b_out). w may be NULL (weight 1). t_act (may be NULL) accumulates the
 * seconds spent outside the GEMMs (bias, activation). b16 (may be NULL): run the GEMMs in
 * bf16. */
void moe_mlp_forward(moe_activation act, int n, int d, int f, const float *x, const float *w_in,
                     const float *b_in, const float *w_out, const float *b_out, const float *w,
                     float *h, float *a, float *y, double *t_act,
                     const moe_mlp_bf16 *b16);
/* Its two halves: x -> h, a (moe_mlp_forward_in), and a -> y (moe_mlp_forward_out).
 * w_on_input: a = act(w h) instead (the routed experts' moe_apply_probs_on_input: the input
 * row scaled by its weight, h kept unscaled; without biases, and y then takes w NULL). */
void moe_mlp_forward_in(moe_activation act, int n, int d, int f, const float *x,
                        const float *w_in, const float *b_in, const float *w, int w_on_input,
                        float *h, float *a, double *t_act, const moe_mlp_bf16 *b16);
void moe_mlp_forward_out(int n, int d, int f, const float *w_out, const float *b_out,
                         const float *w, const float *a, float *y, const moe_mlp_bf16 *b16);
/* The backward's parts, which run in this order (the second reads x, which the third
 * overwrites when dx is x): MOE_MLP_BWD_OUT the output side (W_out's and b_out's gradients,
 * da) and the activation's backward (dh, dw); MOE_MLP_BWD_WIN W_in's and b_in's gradients;
 * MOE_MLP_BWD_DX dx. */
enum { MOE_MLP_BWD_OUT = 1, MOE_MLP_BWD_WIN = 2, MOE_MLP_BWD_DX = 4, MOE_MLP_BWD_ALL = 7 };
/* dy [n, d] given; writes dx [n, d] (overwritten), adds weight grads, writes dw [n] (if not
 * NULL). Uses dh [n, gf] and da [n, f] as scratch. part: which parts (MOE_MLP_BWD_ALL: all).
 * w_on_input as in moe_mlp_forward_in. */
void moe_mlp_backward(moe_activation act, int n, int d, int f, const float *x, const float *w_in,
                      const float *w_out, const float *b_out, const float *w, int w_on_input,
                      const float *h,
                      const float *a, const float *dy, float *dx, float *dw_in, float *db_in,
                      float *dw_out, float *db_out, double *dw, float *dh, float *da,
                      double *t_act, const moe_mlp_bf16 *b16, int part);
#endif
