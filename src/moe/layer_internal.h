/* Private declarations shared by the stages of the MoE layer (moe/):
 * router.c → balance.c → dispatch.c → experts.c, orchestrated by layer.c. */
#ifndef MOE_LAYER_INTERNAL_H
#define MOE_LAYER_INTERNAL_H

#include "moe.h"
#include "moe/mlp.h"

#include <stdint.h>

/* Sizes (floats) of the tensors of moe_layer_params in struct order; 0 = absent. */
#define MOE_N_PARAM_TENSORS 16
void moe_layer_param_sizes(const moe_layer_config *c, size_t s[MOE_N_PARAM_TENSORS]);

/* How the routing weights of the selected slots derive from the logits (router backward). */
typedef enum {
    MOE_WMODE_NONE = 0,      /* constant weights (fake balanced gate) */
    MOE_WMODE_SOFTMAX_K = 1, /* softmax over the k selected logits */
    MOE_WMODE_GATHER = 2,    /* the full-E score p (softmax/sigmoid/sqrt-softplus) at the slot */
} moe_wmode;

/* Everything one forward computes and backward reads, and the scratch of one call. Buffers
 * are carved from one allocation planned in moe_layer_create (sizes for max_tokens and the
 * planned rows); the call scratch (plan_workspace in layer.c says which buffers) may instead
 * lie in a region shared with other layers (moe_layer_create_shared). */
typedef struct {
    int T, k, Tv, n_seq, seq_len;
    int training;
    float cf;              /* this call's capacity factor (moe_capacity_factor or the args') */
    int reuse_bf16;         /* moe_forward_args.reuse_bf16 of this call */
    float loss_scale;
    uint64_t step;
    const uint8_t *mask;   /* mask_own or NULL (no mask given) */
    const int32_t *replay; /* [T*k] routing replay's choices (the caller's, read by the
                            * selection), or NULL */
    uint8_t *mask_own;     /* [T] the caller's mask as the forward saw it, for its backward */

    /* router */
    float *noise;          /* [T, d] jitter factors (when jitter is on) */
    float *xr;             /* [T, d] jittered router input (when jitter is on) */
    const float *xin;      /* router input of this call: xr or the caller's x */
    const float *xin_orig; /* the caller's x (forward only) */
    float *logits_f;       /* [T, E] fp32 GEMM output */
    double *z;             /* [T, E] logits */
    double *p;             /* [T, E] full-E scores (softmax/sigmoid/sqrt-softplus) */
    double *key;           /* [T, E] selection keys (scratch) */
    moe_wmode wmode;
    moe_score_fn wscore;   /* score function of p for MOE_WMODE_GATHER */
    int renorm;            /* renormalised over the slots */
    double *q;             /* [S] weight before renormalisation and route_scale */
    double *qsum;          /* [T] sum of q over the token's slots (+1e-20) */
    int router_grad;       /* the router receives gradients */

    /* slots: token choice S = T*k (slot t*k+j); expert choice S = E*C */
    int n_slots;
    int32_t *slot_token;   /* [S] */
    int32_t *slot_expert;  /* [S] -1 = none */
    int32_t *slot_sel;     /* [S] expert the router selected (before random routing), -1 = none */
    float *slot_w;         /* [S] final weight */
    float *rts_key;        /* [S] the slots' priorities of drop policies random (random token
                            * selection's) and batch-prioritized (the token's largest score) */
    uint8_t *slot_kept;    /* [S] */
    int32_t *slot_row;     /* [S] row in the permuted buffers, -1 = not computed */
    int32_t *tok_off;      /* [T+1] slots of token t: tok_slot[tok_off[t] .. tok_off[t+1]) */
    int32_t *tok_slot;     /* [S] */

    /* balance */
    int64_t *counts;       /* [E] */
    int64_t *kept;         /* [E] */
    double *z0;            /* [T, E] load_importance: the logits without the gate noise */
    double *aux_coef;      /* [n_seq, E] dL/dP[t,e] for tokens of sequence s (aux losses);
                            * load_importance: dL/dImp [E], dL/dLoad [E] */
    double *lse;           /* [T] logsumexp of the logits */
    double *qb_col;        /* [E, T] quantile balancing: each expert's margins (scratch) */
    double aux_loss, z_loss;
    double aux_terms[MOE_LB_GLOBAL_AUX + 1]; /* aux_loss's Switch-style part by type */
    int sinkhorn_iters;

    /* dispatch */
    int capacity;
    int n_rows;
    int32_t *expert_off;   /* [E+1] */
    int32_t *expert_order; /* [E] experts by rows, most first (the threads' work order) */
    int32_t *expert_ready; /* [E] how many of the expert's parts are done (run_expert_parts) */
    const float *part_x, *part_dy; /* [T, d] what the expert parts gather their rows' inputs and
                                    * output gradients from themselves (else NULL) */
    int32_t *row_slot;     /* [R] -1 = padding */
    float *row_w;          /* [R] */
    int32_t *scratch;      /* [max(S, T, E)+1] */

    /* experts */
    float *xp;             /* [R, d] gathered inputs (dL/dxp after the experts' backward) */
    float *h;              /* [R, gf] pre-activations */
    float *a;              /* [R, f] weighted activations */
    float *y;              /* [R, d] outputs (then dL/dy in backward) */
    float *dh;             /* [R, gf] */
    float *da;             /* [R, f] */
    double *dw;            /* [S] dL/d(slot weight) */
    double *dw_row;        /* [R] dL/d(row weight) */

    /* combine, shared expert, residual mix */
    float *r;              /* [T, d] routed output */
    float *sh_h;           /* [T, gs] */
    float *sh_a;           /* [T, fs] */
    float *sh_y;           /* [T, d] shared output before the gate */
    float *sh_g;           /* [T] sigmoid gate */
    float *mix_c;          /* [T, 2] */
    float *sh_dh;          /* [T, gs] */
    float *sh_da;          /* [T, fs] */
    float *dr;             /* [T, d] */
    const float *dgrad;    /* [T, d] dL/d(routed output): dr, or the caller's dout as it is */
    float *ds;             /* [T, d] */
    double *dz;            /* [T, E] */
    float *dz_f;           /* [T, E] */
    float *tmp_td;         /* [T, d] */
    double *x64;           /* [T, d] router input in float64 (router_fp64) */
    float *cos_h;          /* [T, P] cosine router: the projected tokens, normalised */
    double *cos_hn;        /* [T] their norms before */
    float *cos_s;          /* [E, P] the experts' directions, normalised */
    double *cos_sn;        /* [E] their norms before */
    float *cos_dh;         /* [T, P] gradients (scratch) */
    float *cos_ds;         /* [E, P] */
    double *wg64;          /* [E, d] router weights in float64 (router_fp64) */
    double *dwg64;         /* [E, d] */
    /* bf16 experts (expert_bf16) */
    uint16_t *w_in16;      /* [E, gf, d] */
    uint16_t *w_out16;     /* [E, d, f] */
    uint16_t *x16;         /* [R, d] */
    uint16_t *a16;         /* [R, f] */
    uint16_t *dy16;        /* [R, d] */
    uint16_t *dh16;        /* [R, gf] */
    /* the shared expert's bf16 operands (expert_bf16) */
    uint16_t *sh_w_in16;   /* [gs, d] */
    uint16_t *sh_w_out16;  /* [d, fs] */
    uint16_t *sh_x16;      /* [T, d] */
    uint16_t *sh_a16;      /* [T, fs] */
    uint16_t *sh_dy16;     /* [T, d] */
    uint16_t *sh_dh16;     /* [T, gs] */
} moe_fwd_state;

struct moe_layer {
    moe_layer_config cfg;
    int max_tokens;
    int planned_rows;       /* rows the workspace holds; grows for larger per-call shapes */
    int planned_k;
    size_t n_params;
    float *params, *grads;
    int own_params, own_grads;
    moe_layer_params p, g;
    float *expert_bias;     /* [E] */
    int64_t *accum_counts;  /* [E] the router's selection counts of this step's training forwards */
    int64_t *accum_aux_counts; /* [E] their aux-loss counts (global_aux_loss, docs/LAYER.md §5) */
    int64_t accum_tokens;
    double *qb_accum;       /* [E + 1] quantile balancing: sum of beta_local, forwards counted */
    uint8_t *bf16_kept;     /* [E + 1] expert e's (e = E: the shared expert's) bf16 weights in the
                               workspace are current (reuse_bf16 calls since the last change) */
    int *bf16_todo;         /* [E] the experts whose copies a forward makes */
    void *ws;               /* the workspace allocation */
    size_t ws_bytes;
    void *shared_scratch;   /* the call scratch shared with other layers, or NULL */
    size_t shared_scratch_bytes;
    moe_fwd_state st;
    int have_forward;
    moe_layer_stats stats;
    moe_routing routing;
    double stage_s[MOE_STAGE_COUNT];
    /* distributed runs (moe_layer_set_comms) */
    moe_comm *ep_comm;      /* the expert group: ep_size ranks */
    moe_comm *world_comm;   /* every data-parallel rank: global balancing counts */
    struct moe_ep_buffers *ep; /* grown on demand (ep.c) */
    moe_status ep_status;   /* the first communication error of this forward/backward */
};

/* layer.c: moe_layer_create (moe_layer_create_inference with inference set) with the layer's
 * call scratch, the buffers live only inside one forward or one backward call, in scratch of
 * scratch_bytes, which other layers may share: the caller keeps it while the layer lives and
 * never has two of its layers in a call at once (a model runs its layers one after another).
 * Without scratch, or with too few bytes for it, the layer allocates its own. */
moe_status moe_layer_create_shared(const moe_layer_config *cfg, int max_tokens, float *params,
                                   float *grads, int inference, void *scratch,
                                   size_t scratch_bytes, moe_layer **out);
/* layer.c: the bytes of the workspace such a layer owns and of its call scratch (SIZE_MAX when
 * they overflow); moe_layer_workspace_estimate is their sum. */
void moe_layer_workspace_sizes(const moe_layer_config *cfg, int max_tokens, size_t *own,
                               size_t *scratch);

/* layer.c: the checks of one call's token count and arguments (CPU and CUDA layers); the
 * call's k and sequence length. */
moe_status moe_layer_check_call(const moe_layer_config *c, int T, int max_tokens,
                                const moe_forward_args *args, int *k, int *seq_len);

/* layer.c: the statistics of a forward computed elsewhere (the GPU model's layer) as this
 * layer's own: counts, losses, and the step's counts for the expert-bias update when
 * training. The layer then has no forward to run backward on. */
void moe_layer_record_stats(moe_layer *L, const moe_layer_stats *s, int training);

/* router.c */
void moe_router_logits(moe_layer *L, const float *x);
moe_status moe_router_select(moe_layer *L);
/* idx[0..k) = indices of the k largest keys in decreasing order, ties toward lower index. */
void moe_topk_desc(int n, const double *key, int k, int *idx);
void moe_router_backward(moe_layer *L, float *dx, const float *x);
/* dz [E] += (d score / dz)ᵀ dp for one token. */
void moe_router_score_backward(moe_score_fn fn, int E, const double *z, const double *p,
                               const double *dp, double *dz);

/* balance.c */
/* Whether a balancing loss is computed (the topk router and a coefficient above 0). */
int moe_aux_on(const moe_layer_config *c);
void moe_balance_forward(moe_layer *L);
/* Quantile balancing, a training call with valid tokens: its beta_local into L->qb_accum. */
void moe_qb_forward(moe_layer *L);
void moe_balance_backward(moe_layer *L);

/* dispatch.c */
void moe_dispatch_plan(moe_layer *L);
/* ceil(cf * Tv * k / E) exactly, cf (> 0) taken as the shortest decimal that reads back as it
 * (1.1f is 1.1, so 1.1 * 10 slots is 11); INT64_MAX from 2^62. */
int64_t moe_capacity_ceil(float cf, int64_t Tv, int k, int E);
/* The capacity of Tv valid tokens (0: dropless); dynamic capacity (cf < 0) is capped by the
 * largest of counts[E], or with counts NULL not (the bound a workspace plans for). */
int moe_dispatch_capacity(const moe_layer_config *c, float cf, int64_t Tv, int k,
                          const int64_t *counts);
/* The capacity of T valid tokens summed over their local groups (c->local_group_size; the
 * bound a workspace plans for, as counts NULL above). */
int moe_group_capacity(const moe_layer_config *c, float cf, int T, int k);
/* Expert choice: the tokens each expert takes, min(Tv, ceil(cf' Tv k / E)), cf' = cf or 1. */
int moe_expert_choice_capacity(const moe_layer_config *c, float cf, int64_t Tv, int k);
/* The capacity factor of a call: outside training eval_capacity_factor where it is set. */
float moe_capacity_factor(const moe_layer_config *c, int training);
/* Clears kept[s] of the slots (s = t k + j) each expert drops under capacity C: candidates in
 * priority order by token (position policy), or by slot_key descending, stable over (j, t)
 * (probs: the weights; random: random priorities). scratch: E + 1 + 2 T k. */
void moe_capacity_keep(int T, int k, int E, int C, moe_drop_policy policy,
                       const int32_t *slot_expert, const float *slot_key, uint8_t *kept,
                       int32_t *scratch);

/* experts.c: the experts over the permuted rows (moe_ep_* when ep_size > 1) */
void moe_experts_forward(moe_layer *L);
/* x: the forward's input, whose rows the backward gathers again */
void moe_experts_backward(moe_layer *L, float *dx, const float *x);
/* dst [R, d]: row r is the token row of its slot in src [T, d] (zeros for padding rows). */
void moe_gather_rows(const moe_fwd_state *st, float *dst, const float *src, int R, int d);
/* Combine: r[t] = sum of the rows of t's kept slots (slot order). */
void moe_combine_rows(moe_fwd_state *st, const float *y, int d);
/* Scatter-add of row gradients g [R, d] into dx [T, d] (slot order); st->dw from dw_row. */
void moe_scatter_rows(const moe_fwd_state *st, const float *g, float *dx, int d);
/* Rows of the experts, expert-major: inputs x [R, d] (dL/dx after the backward), routing
 * weights w [R], h [R, gf], a [R, f], outputs y [R, d] (dL/dy for the backward), scratch dh,
 * da, weight gradients dw [R], bf16 scratch (used with expert_bf16). */
typedef struct {
    float *x, *w, *h, *a, *y, *dh, *da;
    double *dw;
    uint16_t *x16, *a16, *dy16, *dh16;
} moe_expert_rows;
/* Expert le of this rank (its weights and gradients) over rows [o, o + n); t_act as in
 * moe_mlp_forward. */
void moe_expert_rows_forward(moe_layer *L, const moe_expert_rows *r, int le, int o, int n,
                             double *t_act);
/* One part of it: MOE_MLP_IN (x W_in^T and the activation), MOE_MLP_OUT (a W_out^T), or
 * both. */
enum { MOE_MLP_IN = 1, MOE_MLP_OUT = 2 };
void moe_expert_rows_forward_part(moe_layer *L, const moe_expert_rows *r, int le, int o, int n,
                                  int part, double *t_act);
/* Its backward: part as in moe_mlp_backward. */
void moe_expert_rows_backward(moe_layer *L, const moe_expert_rows *r, int le, int o, int n,
                              int part, double *t_act);
/* The layer's own row buffers (one process, or replicated tokens). */
moe_expert_rows moe_own_rows(moe_fwd_state *st);

/* ep.c: expert parallelism — rows sent to the ranks owning their experts (all-to-all),
 * computed there, sent back. */
void moe_ep_forward(moe_layer *L);
void moe_ep_backward(moe_layer *L, float *dx, const float *x);
void moe_ep_free(moe_layer *L);

#endif
