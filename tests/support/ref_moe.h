/* A naive float64 reference of the MoE layer, written from docs/LAYER.md alone: per-token,
 * per-expert loops, no BLAS, no code shared with src/moe. */
#ifndef MOE_REF_MOE_H
#define MOE_REF_MOE_H

#include "moe.h"

#include <stdint.h>

/* Parameters in float64 with the layout of moe_layer_params (NULL = absent). */
typedef struct {
    double *router_w, *w_in, *b_in, *w_out, *b_out, *shared_w_in, *shared_b_in, *shared_w_out,
        *shared_b_out, *shared_gate_w, *mix_w, *mix_b, *cos_proj_w, *cos_proj_b, *cos_sim, *cos_temp;
} ref_params;

/* Decisions and outputs of one call. Slots as in moe_routing. */
typedef struct {
    int n_slots, k, capacity, Tv;
    int32_t *token;   /* [n_slots] */
    int32_t *sel;     /* [n_slots] expert the router selected (-1: masked token) */
    int32_t *expert;  /* [n_slots] after random routing (-1: none) */
    double *weight;   /* [n_slots] final weight, route_scale included (0 if none) */
    uint8_t *kept;    /* [n_slots] */
    int64_t *counts;  /* [E] */
    int64_t *kept_e;  /* [E] */
    int64_t *aux_counts; /* [E] the aux loss's counts (top k of the unbiased scores) */
    double aux, z;
    double *qb_beta;  /* [E] quantile balancing, a training call: beta_local */
    double *out;      /* [T, d] */
} ref_result;

typedef struct {
    int T, k; /* k: the per-call top-k (already resolved) */
    const uint8_t *mask;
    int seq_len;
    int training;
    uint64_t step;
    const double *bias;         /* [E] selection bias (expert bias, quantile balancing) */
    const int64_t *acc_counts;  /* [E] global aux: aux_counts of earlier forwards */
    int64_t acc_tokens;
    const ref_result *freeze;   /* use these decisions (selection, random drops, capacity) */
    const int32_t *replay;      /* [T*k] routing replay: these choices, or NULL */
} ref_args;

/* Allocates (ref_result_free releases) and computes everything for x [T, d]. */
void ref_moe_forward(const moe_layer_config *c, const ref_params *p, const double *x,
                     const ref_args *a, ref_result *r);
void ref_result_free(ref_result *r);

/* Loss used for gradient checks: sum(out * G) + aux + z. */
double ref_moe_loss(const moe_layer_config *c, const ref_params *p, const double *x,
                    const ref_args *a, const double *G);

#endif
