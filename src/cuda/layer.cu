/* The MoE layer on one NVIDIA GPU (include/moe_cuda.h): the same stages and semantics as the
 * CPU layer (moe/router.c, balance.c, dispatch.c, experts.c; docs/LAYER.md) for the
 * configurations moe_cuda_layer_create accepts.
 *
 * Forward: logits GEMM (cuBLAS) → one thread per token for scores, selection and weights →
 * aux and z-loss reductions → a stable radix sort of the slots by expert (CUB; the CPU's
 * counting sort order) → gather → per expert x W_inᵀ → activation with the routing weight
 * over all rows → per expert a W_outᵀ → combine in slot order. The per-expert row counts come
 * back to the host once per forward (the GEMM sizes). Backward in reverse. Every reduction runs
 * in a fixed order, so results are bitwise repeatable. */
#include <cub/device/device_radix_sort.cuh>

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/cuda_internal.h"

extern "C" {
#include "moe_cuda.h"
#include "moe/layer_internal.h"
}

#define MAX_E 256 /* experts per layer (one thread keeps a token's choices) */
#define BLOCK MOE_CUDA_BLOCK

/* ---- the layer ------------------------------------------------------------------------- */

enum { EV_F0, EV_F_ROUTER, EV_F_BALANCE, EV_F_PERMUTE, EV_F_GEMM1, EV_F_ACT, EV_F_GEMM2,
       EV_F_COMBINE, EV_F_SHARED, EV_B0, EV_B_SHARED, EV_B_GATHER, EV_B_GEMM1, EV_B_ACT,
       EV_B_GEMM2, EV_B_SCATTER, EV_B_ROUTER, EV_COUNT };

struct moe_cuda_layer {
    moe_layer_config cfg;
    int max_tokens, planned_k, gf, b16;
    size_t n_params;
    cublasHandle_t blas;
    float *params, *grads;       /* (device) [n_params] */
    int own_params, own_grads;
    moe_layer_params p, g;       /* (device) pointers into them */
    float *expert_bias;          /* (device) [E] */
    bf16 *w_in16, *w_out16;      /* (device) [E, gf, d], [E, d, f] bf16 copies (b16) */
    int w16_kept;                /* the bf16 copies (the shared expert's too) are the weights'
                                    (moe_forward_args.reuse_bf16 calls since they were made) */
    float *bias_host;            /* [E] the selection bias last copied in (bias_set: any) */
    int bias_set;

    /* the call */
    int T, k, Tv, n_seq, wmode, renorm, have_forward, aux_on, z_on;
    moe_score_fn wscore;
    float loss_scale;

    /* (device) workspace, for max_tokens and planned_k; S = T k slots, R = S rows */
    uint8_t *mask;               /* [T] 1 = token */
    float *logits;               /* [T, E] */
    double *p64;                 /* [T, E] full-E scores */
    double *key;                 /* [T, E] selection keys, then the aux-loss scores P */
    double *dz;                  /* [T, E] */
    double *dp;                  /* [T, E] */
    float *dz_f;                 /* [T, E] */
    double *lse;                 /* [T] */
    double *q;                   /* [S] weight before renormalisation and route_scale */
    double *qsum;                /* [T] */
    int32_t *slot_expert;        /* [S] -1 = none (masked token) */
    float *slot_w;               /* [S] */
    int32_t *slot_row;           /* [S] */
    int32_t *aux_top;            /* [S] top-k of the unbiased scores (aux-loss counts) */
    double *aux_pm;              /* [n_seq, E] sum of P */
    double *aux_cnt;             /* [n_seq, E] */
    double *aux_coef;            /* [n_seq, E] dL/dP */
    double *losses;              /* [2] aux, z (in expert_off's buffer) */
    int32_t *counts;             /* [E] */
    int32_t *expert_off;         /* [E+1], then (at off_bytes) the losses: one copy brings both */
    int32_t *sort_key, *sort_key2, *sort_val, *row_slot; /* [S] */
    void *sort_tmp;
    size_t sort_tmp_bytes;
    float *row_w;                /* [R] */
    float *xp;                   /* [R, d] gathered inputs (fp32 experts) */
    bf16 *x16;                   /* [R, d] (bf16 experts) */
    float *h;                    /* [R, gf] */
    float *a;                    /* [R, f] weighted activations (fp32 experts) */
    bf16 *a16;                   /* [R, f] (bf16 experts) */
    float *y;                    /* [R, d] outputs; dL/dy (fp32), then dL/dxp */
    bf16 *dy16;                  /* [R, d] (bf16 experts) */
    float *da;                   /* [R, f] */
    float *dh;                   /* [R, gf] (fp32 experts) */
    bf16 *dh16;                  /* [R, gf] (bf16 experts) */
    double *dw_row;              /* [R] */
    /* the shared expert (shared_ffn fs > 0; gs = 2 fs gated, else fs) */
    float *sh_h;                 /* [T, gs] */
    float *sh_a;                 /* [T, fs] */
    float *sh_y;                 /* [T, d] its output before the gate */
    float *sh_g;                 /* [T] sigmoid(x . g) (shared_gate) */
    float *sh_ds;                /* [T, d] dL/d sh_y */
    float *sh_da;                /* [T, fs] */
    float *sh_dh;                /* [T, gs] */
    double *sh_dlogit;           /* [T] dL/d (x . g) */
    bf16 *sh_x16, *sh_a16, *sh_ds16, *sh_dh16; /* [T, d], [T, fs], [T, d], [T, gs] (b16) */
    bf16 *sh_w_in16, *sh_w_out16;              /* [gs, d], [d, fs] (b16) */

    /* host copies */
    int32_t *h_off;              /* [E+1] */
    int64_t *counts64, *kept64;  /* [E] */
    moe_layer_stats stats;
    moe_routing routing;
    int32_t *r_token, *r_expert; /* [S] fetched routing */
    float *r_weight;
    uint8_t *r_kept;

    int timing;
    cudaEvent_t ev[EV_COUNT];
    double stage_s[MOE_STAGE_COUNT];
};

#define E_ (L->cfg.n_experts)

/* The workspace's device and host pointers (freed and cleared together). */
static void free_workspace(moe_cuda_layer *L) {
    void **dev[] = {(void **)&L->mask, (void **)&L->logits, (void **)&L->p64, (void **)&L->key,
                    (void **)&L->dz, (void **)&L->dp, (void **)&L->dz_f, (void **)&L->lse,
                    (void **)&L->q, (void **)&L->qsum, (void **)&L->slot_expert,
                    (void **)&L->slot_w, (void **)&L->slot_row, (void **)&L->aux_top,
                    (void **)&L->aux_pm, (void **)&L->aux_cnt, (void **)&L->aux_coef,
                    (void **)&L->counts, (void **)&L->expert_off,
                    (void **)&L->sort_key, (void **)&L->sort_key2, (void **)&L->sort_val,
                    (void **)&L->row_slot, (void **)&L->sort_tmp, (void **)&L->row_w,
                    (void **)&L->xp, (void **)&L->x16, (void **)&L->h, (void **)&L->a,
                    (void **)&L->a16, (void **)&L->y, (void **)&L->dy16, (void **)&L->da,
                    (void **)&L->dh, (void **)&L->dh16, (void **)&L->dw_row,
                    (void **)&L->sh_h, (void **)&L->sh_a, (void **)&L->sh_y, (void **)&L->sh_g,
                    (void **)&L->sh_ds, (void **)&L->sh_da, (void **)&L->sh_dh,
                    (void **)&L->sh_dlogit, (void **)&L->sh_x16, (void **)&L->sh_a16,
                    (void **)&L->sh_ds16, (void **)&L->sh_dh16, (void **)&L->sh_w_in16,
                    (void **)&L->sh_w_out16};
    for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++) {
        cudaFree(*dev[i]);
        *dev[i] = NULL;
    }
    void **host[] = {(void **)&L->h_off, (void **)&L->counts64, (void **)&L->kept64,
                     (void **)&L->r_token, (void **)&L->r_expert, (void **)&L->r_weight,
                     (void **)&L->r_kept};
    for (size_t i = 0; i < sizeof host / sizeof host[0]; i++) {
        free(*host[i]);
        *host[i] = NULL;
    }
    L->losses = NULL; /* (inside expert_off) */
    L->planned_k = 0; /* nothing planned: the next forward allocates again */
    L->w16_kept = 0;  /* the shared expert's copies were in the workspace */
    L->have_forward = 0;
    memset(&L->stats, 0, sizeof L->stats);
}

/* Bytes of the experts' row offsets [E+1] (int32) in their buffer, before the two losses. */
static size_t off_bytes(size_t E) { return ((E + 1) * 4 + 7) / 8 * 8; }

/* Workspace for max_tokens tokens and top-k. */
static moe_status alloc_workspace(moe_cuda_layer *L, int k) {
    free_workspace(L);
    size_t T = (size_t)L->max_tokens, E = (size_t)E_, d = (size_t)L->cfg.d;
    size_t f = (size_t)L->cfg.ffn, gf = (size_t)L->gf, S = T * (size_t)k, R = S;
    size_t fs = (size_t)L->cfg.shared_ffn, gs = moe_act_gated(L->cfg.act) ? 2 * fs : fs;
    int b16 = L->b16;
    struct {
        void **p;
        size_t bytes;
    } want[] = {
        {(void **)&L->mask, T},
        {(void **)&L->logits, T * E * 4},
        {(void **)&L->p64, T * E * 8},
        {(void **)&L->key, T * E * 8},
        {(void **)&L->dz, T * E * 8},
        {(void **)&L->dp, T * E * 8},
        {(void **)&L->dz_f, T * E * 4},
        {(void **)&L->lse, T * 8},
        {(void **)&L->q, S * 8},
        {(void **)&L->qsum, T * 8},
        {(void **)&L->slot_expert, S * 4},
        {(void **)&L->slot_w, S * 4},
        {(void **)&L->slot_row, S * 4},
        {(void **)&L->aux_top, S * 4},
        {(void **)&L->aux_pm, T * E * 8}, /* n_seq <= T */
        {(void **)&L->aux_cnt, T * E * 8},
        {(void **)&L->aux_coef, T * E * 8},
        {(void **)&L->counts, E * 4},
        {(void **)&L->expert_off, off_bytes(E) + 16},
        {(void **)&L->sort_key, S * 4},
        {(void **)&L->sort_key2, S * 4},
        {(void **)&L->sort_val, S * 4},
        {(void **)&L->row_slot, S * 4},
        {(void **)&L->row_w, R * 4},
        {(void **)&L->xp, b16 ? 0 : R * d * 4},
        {(void **)&L->x16, b16 ? R * d * 2 : 0},
        {(void **)&L->h, R * gf * 4},
        {(void **)&L->a, b16 ? 0 : R * f * 4},
        {(void **)&L->a16, b16 ? R * f * 2 : 0},
        {(void **)&L->y, R * d * 4},
        {(void **)&L->dy16, b16 ? R * d * 2 : 0},
        {(void **)&L->da, R * f * 4},
        {(void **)&L->dh, b16 ? 0 : R * gf * 4},
        {(void **)&L->dh16, b16 ? R * gf * 2 : 0},
        {(void **)&L->dw_row, R * 8},
        {(void **)&L->sh_h, T * gs * 4},
        {(void **)&L->sh_a, T * fs * 4},
        {(void **)&L->sh_y, fs ? T * d * 4 : 0},
        {(void **)&L->sh_g, L->cfg.shared_gate ? T * 4 : 0},
        {(void **)&L->sh_ds, fs ? T * d * 4 : 0},
        {(void **)&L->sh_da, T * fs * 4},
        {(void **)&L->sh_dh, T * gs * 4},
        {(void **)&L->sh_dlogit, L->cfg.shared_gate ? T * 8 : 0},
        {(void **)&L->sh_x16, b16 && fs ? T * d * 2 : 0},
        {(void **)&L->sh_a16, b16 ? T * fs * 2 : 0},
        {(void **)&L->sh_ds16, b16 && fs ? T * d * 2 : 0},
        {(void **)&L->sh_dh16, b16 ? T * gs * 2 : 0},
        {(void **)&L->sh_w_in16, b16 ? gs * d * 2 : 0},
        {(void **)&L->sh_w_out16, b16 ? d * fs * 2 : 0},
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        if (want[i].bytes == 0) continue;
        cudaError_t e = cudaMalloc(want[i].p, want[i].bytes);
        if (e != cudaSuccess) {
            free_workspace(L);
            cudaGetLastError();
            return moe_set_error(MOE_ERR_NOMEM, "CUDA: %zu bytes of GPU memory for the layer's "
                                 "workspace: %s", want[i].bytes, cudaGetErrorString(e));
        }
    }
    L->sort_tmp_bytes = 0;
    CU_TRY(cub::DeviceRadixSort::SortPairs(NULL, L->sort_tmp_bytes, L->sort_key, L->sort_key2,
                                           L->sort_val, L->row_slot, (int)S),
           "radix sort size");
    CU_TRY(cudaMalloc(&L->sort_tmp, L->sort_tmp_bytes ? L->sort_tmp_bytes : 1), "sort scratch");
    L->losses = (double *)((char *)L->expert_off + off_bytes(E));
    L->h_off = (int32_t *)calloc(off_bytes(E) + 16, 1);
    L->counts64 = (int64_t *)calloc(E, 8);
    L->kept64 = (int64_t *)calloc(E, 8);
    if (!L->h_off || !L->counts64 || !L->kept64) {
        free_workspace(L);
        return MOE_ERR_NOMEM;
    }
    L->planned_k = k;
    L->have_forward = 0;
    return MOE_OK;
}

/* The configurations this layer computes; the rest is named. */
static moe_status check_supported(const moe_layer_config *c) {
    const char *no = NULL;
    if (c->router != MOE_ROUTER_TOPK) no = "routers other than top-k (Sinkhorn, expert choice, fake balanced)";
    else if (c->capacity_factor != 0 || c->eval_capacity_factor != 0 || c->pad_to_capacity)
        no = "capacity factors (token dropping)";
    else if (c->random_routing) no = "random routing";
    else if (c->sample_second || c->sample_first) no = "sampled choices (Gumbel noise)";
    else if (c->jitter_eps > 0 || c->gate_noise > 0) no = "input jitter and gate noise";
    else if (c->residual) no = "Residual-MoE";
    else if (c->expert_bias) no = "biases in the expert layers";
    else if (c->ep_size > 1) no = "expert parallelism";
    else if (c->router_fp64) no = "the float64 router";
    else if (c->lb_type == MOE_LB_GLOBAL_AUX) no = "the global-batch aux loss";
    else if (c->aux_coeff_also[MOE_LB_AUX] > 0 || c->aux_coeff_also[MOE_LB_SEQ_AUX] > 0 ||
             c->aux_coeff_also[MOE_LB_GLOBAL_AUX] > 0)
        no = "a list of load-balancing types";
    else if (c->quantile_balancing) no = "quantile balancing";
    else if (c->cosine_dim) no = "the cosine router";
    else if (c->probs_on_input) no = "routing weights on the experts' inputs";
    else if (c->n_experts > MAX_E) no = "more than 256 experts";
    if (no) return moe_set_error(MOE_ERR_INVALID, "the CUDA layer does not support %s yet", no);
    return MOE_OK;
}

extern "C" moe_status moe_cuda_layer_create(const moe_layer_config *cfg, int max_tokens,
                                            float *params, float *grads, moe_cuda_layer **out) {
    *out = NULL;
    MOE_TRY(moe_layer_config_validate(cfg));
    MOE_TRY(check_supported(cfg));
    if (max_tokens < 1)
        return moe_set_error(MOE_ERR_INVALID, "max_tokens must be >= 1 (got %d)", max_tokens);
    if (moe_cuda_device_count() < 1)
        return moe_set_error(MOE_ERR_INVALID, "%s", moe_cuda_device_name());
    moe_cuda_layer *L = (moe_cuda_layer *)calloc(1, sizeof *L);
    if (!L) return MOE_ERR_NOMEM;
    L->cfg = *cfg;
    L->max_tokens = max_tokens;
    L->gf = moe_act_gated(cfg->act) ? 2 * cfg->ffn : cfg->ffn;
    L->b16 = cfg->expert_bf16 != 0;
    L->n_params = moe_layer_param_count(cfg);
    moe_status s = moe_cuda_blas_create(&L->blas);
    if (s != MOE_OK) {
        free(L);
        return s;
    }
    for (int i = 0; i < EV_COUNT && s == MOE_OK; i++)
        if (cudaEventCreate(&L->ev[i]) != cudaSuccess) s = moe_cuda_error(cudaGetLastError(), "event");
    size_t E = (size_t)cfg->n_experts, d = (size_t)cfg->d, f = (size_t)cfg->ffn;
    L->own_params = params == NULL;
    L->own_grads = grads == NULL;
    L->params = params;
    L->grads = grads;
    if (s == MOE_OK && !params) s = moe_cuda_alloc((void **)&L->params, L->n_params * 4);
    if (s == MOE_OK && !grads) s = moe_cuda_alloc((void **)&L->grads, L->n_params * 4);
    if (s == MOE_OK) s = moe_cuda_alloc((void **)&L->expert_bias, E * 4);
    if (s == MOE_OK && !(L->bias_host = (float *)malloc(E * 4)))
        s = moe_set_error(MOE_ERR_NOMEM, "out of memory");
    if (s == MOE_OK && L->b16) s = moe_cuda_alloc((void **)&L->w_in16, E * L->gf * d * 2);
    if (s == MOE_OK && L->b16) s = moe_cuda_alloc((void **)&L->w_out16, E * d * f * 2);
    if (s == MOE_OK) s = alloc_workspace(L, cfg->topk);
    if (s == MOE_OK && ((!params && cudaMemset(L->params, 0, L->n_params * 4) != cudaSuccess) ||
                        (!grads && cudaMemset(L->grads, 0, L->n_params * 4) != cudaSuccess) ||
                        cudaMemset(L->expert_bias, 0, E * 4) != cudaSuccess))
        s = moe_cuda_error(cudaGetLastError(), "clear the parameters");
    if (s != MOE_OK) {
        moe_cuda_layer_destroy(L);
        return s;
    }
    moe_layer_params_map(cfg, L->params, &L->p);
    moe_layer_params_map(cfg, L->grads, &L->g);
    *out = L;
    return MOE_OK;
}

extern "C" void moe_cuda_layer_destroy(moe_cuda_layer *L) {
    if (!L) return;
    free_workspace(L);
    if (L->own_params) cudaFree(L->params);
    if (L->own_grads) cudaFree(L->grads);
    cudaFree(L->expert_bias);
    cudaFree(L->w_in16);
    cudaFree(L->w_out16);
    free(L->bias_host);
    for (int i = 0; i < EV_COUNT; i++)
        if (L->ev[i]) cudaEventDestroy(L->ev[i]);
    moe_cuda_blas_destroy(L->blas);
    free(L);
}

extern "C" moe_status moe_cuda_layer_set_params(moe_cuda_layer *L, const float *params,
                                                const float *expert_bias) {
    L->w16_kept = 0;
    MOE_TRY(moe_cuda_to_device(L->params, params, L->n_params * 4));
    return expert_bias ? moe_cuda_layer_set_expert_bias(L, expert_bias) : MOE_OK;
}

/* (a bias equal to the last one copied is not copied again: decoding sets it every call) */
extern "C" moe_status moe_cuda_layer_set_expert_bias(moe_cuda_layer *L, const float *expert_bias) {
    size_t bytes = (size_t)E_ * 4;
    if (L->bias_set && !memcmp(L->bias_host, expert_bias, bytes)) return MOE_OK;
    L->bias_set = 0;
    MOE_TRY(moe_cuda_to_device(L->expert_bias, expert_bias, bytes));
    memcpy(L->bias_host, expert_bias, bytes);
    L->bias_set = 1;
    return MOE_OK;
}

extern "C" void moe_cuda_layer_weights_changed(moe_cuda_layer *L) { L->w16_kept = 0; }

extern "C" moe_status moe_cuda_layer_get_grads(moe_cuda_layer *L, float *grads) {
    return moe_cuda_to_host(grads, L->grads, L->n_params * 4);
}

extern "C" moe_status moe_cuda_layer_zero_grads(moe_cuda_layer *L) {
    CU_TRY(cudaMemset(L->grads, 0, L->n_params * 4), "clear the gradients");
    return MOE_OK;
}

extern "C" moe_status moe_cuda_layer_init_params(moe_cuda_layer *L, uint64_t seed, float std) {
    /* the supported layers have no biases: every parameter is a weight */
    L->w16_kept = 0;
    return moe_cuda_fill_normal(L->params, L->n_params, seed, std);
}

/* ---- router ------------------------------------------------------------------------------ */

struct router_args {
    int T, E, k, d;
    const float *logits;
    const uint8_t *mask;
    const float *bias;    /* selection bias or NULL */
    moe_score_fn score;   /* of p */
    int softmax_k;        /* weights: softmax over the k selected logits */
    int renorm;
    double route_scale;
    int n_groups, group_topk, group_m;
    moe_score_fn aux_score; /* aux-loss scores: P = p (softmax) or p / sum p */
    int aux;
    double *p, *key, *lse, *q, *qsum;
    int32_t *slot_expert, *aux_top;
    float *slot_w;
};

/* idx[0..k) = the k largest of key[0..n) in decreasing order, ties toward the lower index
 * (moe_topk_desc). taken: n flags of scratch. */
__device__ static void topk_desc(int n, const double *key, int k, int *idx, uint32_t *taken) {
    for (int w = 0; w < (n + 31) / 32; w++) taken[w] = 0;
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int e = 0; e < n; e++) {
            if (taken[e >> 5] >> (e & 31) & 1) continue;
            if (best < 0 || key[e] > key[best]) best = e;
        }
        idx[j] = best;
        taken[best >> 5] |= 1u << (best & 31);
    }
}

__global__ static void k_router(router_args r) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= r.T) return;
    int E = r.E, k = r.k;
    const float *z = r.logits + (size_t)t * E;
    double *p = r.p + (size_t)t * E, *key = r.key + (size_t)t * E;
    int idx[MAX_E];
    uint32_t taken[MAX_E / 32];
    double m = -INFINITY, s = 0;
    for (int e = 0; e < E; e++) m = z[e] > m ? z[e] : m;
    for (int e = 0; e < E; e++) s += exp((double)z[e] - m);
    r.lse[t] = m + log(s);
    for (int e = 0; e < E; e++) {
        double v = z[e];
        p[e] = r.score == MOE_SCORE_SOFTMAX ? exp(v - m) / s
               : r.score == MOE_SCORE_SIGMOID ? 1.0 / (1.0 + exp(-v))
                                              : sqrt(v > 30 ? v : log1p(exp(v)));
    }
    r.qsum[t] = 1;
    for (int j = 0; j < k; j++) {
        r.slot_expert[t * k + j] = -1;
        r.slot_w[t * k + j] = 0;
        r.q[t * k + j] = 0;
    }
    if (r.mask && !r.mask[t]) return;
    /* selection keys: the logits (softmax over the k) or the scores, biased, group-limited */
    for (int e = 0; e < E; e++)
        key[e] = r.bias ? p[e] + r.bias[e] : r.softmax_k ? (double)z[e] : p[e];
    if (r.n_groups > 1) {
        int G = r.n_groups, per = E / G;
        double gscore[MAX_E];
        for (int g = 0; g < G; g++) {
            topk_desc(per, key + g * per, r.group_m, idx, taken);
            double v = 0;
            for (int i = 0; i < r.group_m; i++) v += key[g * per + idx[i]];
            gscore[g] = v;
        }
        topk_desc(G, gscore, r.group_topk, idx, taken);
        for (int g = 0; g < G; g++) {
            int keep = 0;
            for (int i = 0; i < r.group_topk; i++) keep |= idx[i] == g;
            if (!keep)
                for (int i = 0; i < per; i++) key[g * per + i] = -INFINITY;
        }
    }
    topk_desc(E, key, k, idx, taken);
    double qs = 0;
    if (r.softmax_k) {
        double mk = z[idx[0]], se = 0;
        for (int j = 0; j < k; j++) mk = z[idx[j]] > mk ? z[idx[j]] : mk;
        for (int j = 0; j < k; j++) se += exp((double)z[idx[j]] - mk);
        for (int j = 0; j < k; j++) r.q[t * k + j] = exp((double)z[idx[j]] - mk) / se;
    } else {
        for (int j = 0; j < k; j++) r.q[t * k + j] = p[idx[j]];
    }
    for (int j = 0; j < k; j++) qs += r.q[t * k + j];
    double qsum = r.renorm ? qs + 1e-20 : 1.0;
    r.qsum[t] = qsum;
    for (int j = 0; j < k; j++) {
        r.slot_expert[t * k + j] = idx[j];
        r.slot_w[t * k + j] = (float)(r.q[t * k + j] / qsum * r.route_scale);
    }
    if (!r.aux) return;
    /* the aux loss's scores P and their top k (Megatron's unbiased routing map) */
    double sp = 0;
    for (int e = 0; e < E; e++) sp += p[e];
    for (int e = 0; e < E; e++) key[e] = r.aux_score == MOE_SCORE_SOFTMAX ? p[e] : p[e] / sp;
    topk_desc(E, key, k, idx, taken);
    for (int j = 0; j < k; j++) r.aux_top[t * k + j] = idx[j];
}

/* Block (b, e): Pm[b, e] = sum of P over the valid tokens of sequence b, cnt[b, e] = aux top-k
 * slots on e. Blocks with e == E count the valid tokens (into cnt[b, E-th slot of pm]). */
__global__ static void k_aux_sums(int S, int E, int k, const double *P, const int32_t *top,
                                  const uint8_t *mask, double *pm, double *cnt, double *tv) {
    __shared__ double sh[BLOCK];
    int b = blockIdx.x, e = blockIdx.y;
    double vp = 0, vc = 0;
    for (int t = b * S + threadIdx.x; t < (b + 1) * S; t += blockDim.x) {
        if (mask && !mask[t]) continue;
        if (e == E) {
            vc += 1;
            continue;
        }
        vp += P[(size_t)t * E + e];
        for (int j = 0; j < k; j++) vc += top[t * k + j] == e;
    }
    vp = moe_cuda_block_sum(vp, sh);
    vc = moe_cuda_block_sum(vc, sh);
    if (threadIdx.x == 0) {
        if (e == E) tv[b] = vc;
        else {
            pm[(size_t)b * E + e] = vp;
            cnt[(size_t)b * E + e] = vc;
        }
    }
}

/* L_b = coeff E sum_e f_e Pm_e / (tv B), f_e = cnt_e / (k tv); coef = dL/dP (balance.c). */
__global__ static void k_aux_loss(int B, int E, int k, double coeff, const double *pm,
                                  const double *cnt, const double *tv, double *coef,
                                  double *loss) {
    double total = 0;
    for (int b = 0; b < B; b++) {
        double l = 0;
        for (int e = 0; e < E; e++) {
            size_t i = (size_t)b * E + e;
            if (tv[b] == 0) {
                coef[i] = 0;
                continue;
            }
            double f = cnt[i] / ((double)k * tv[b]);
            l += f * pm[i] / tv[b];
            coef[i] = coeff * E * f / (tv[b] * B);
        }
        total += coeff * E * l / B;
    }
    loss[0] = total;
}

/* z-loss: coeff / Tv * sum of lse² over the valid tokens (one block). */
__global__ static void k_z_loss(int T, int Tv, double coeff, const double *lse,
                                const uint8_t *mask, double *loss) {
    __shared__ double sh[BLOCK];
    double v = 0;
    for (int t = threadIdx.x; t < T; t += blockDim.x)
        if (!mask || mask[t]) v += lse[t] * lse[t];
    v = moe_cuda_block_sum(v, sh);
    if (threadIdx.x == 0) loss[1] = coeff * v / Tv;
}

/* ---- dispatch ------------------------------------------------------------------------------ */

/* Sort keys: the slot's expert (E for none), values: the slot. Counts per expert. */
__global__ static void k_sort_keys(int S, int E, const int32_t *slot_expert, int32_t *key,
                                   int32_t *val, int32_t *counts) {
    int s = blockIdx.x * blockDim.x + threadIdx.x;
    if (s >= S) return;
    int e = slot_expert[s];
    key[s] = e >= 0 ? e : E;
    val[s] = s;
    if (e >= 0) atomicAdd(&counts[e], 1); /* integers: the same sums in any order */
}

__global__ static void k_offsets(int E, const int32_t *counts, int32_t *off) {
    off[0] = 0;
    for (int e = 0; e < E; e++) off[e + 1] = off[e] + counts[e];
}

/* Rows in expert order (the sort is stable: slot order within an expert, as the CPU's). */
__global__ static void k_rows(int R, const int32_t *row_slot, const float *slot_w,
                              int32_t *slot_row, float *row_w) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= R) return;
    int s = row_slot[r];
    slot_row[s] = r;
    row_w[r] = slot_w[s];
}

/* dst [R, d] row r = src row of its slot's token (fp32 or bf16). */
template <typename T>
__global__ static void k_gather(int R, int d, int k, const int32_t *row_slot, const float *src,
                                T *dst) {
    int r = blockIdx.x;
    const float *s = src + (size_t)(row_slot[r] / k) * d;
    T *o = dst + (size_t)r * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) o[i] = (T)s[i];
}

/* out [T, d] row t = sum of its slots' rows in slot order (0 for masked tokens); add = 1 adds
 * into out instead (the backward's scatter into dx). */
__global__ static void k_combine(int d, int k, const int32_t *slot_row, const float *y,
                                 float *out, int add) {
    int t = blockIdx.x;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float v = add ? out[(size_t)t * d + i] : 0.0f;
        for (int j = 0; j < k; j++) {
            int row = slot_row[t * k + j];
            if (row >= 0) v += y[(size_t)row * d + i];
        }
        out[(size_t)t * d + i] = v;
    }
}

/* ---- the shared expert ------------------------------------------------------------------ */

/* g[t] = sigmoid(x_t . w) (the dot product in float64, a fixed order). */
__global__ static void k_gate(int d, const float *x, const float *w, float *g) {
    __shared__ double sh[BLOCK];
    int t = blockIdx.x;
    double s = 0;
    for (int i = threadIdx.x; i < d; i += blockDim.x) s += (double)x[(size_t)t * d + i] * w[i];
    s = moe_cuda_block_sum(s, sh);
    if (threadIdx.x == 0) g[t] = (float)(1.0 / (1.0 + exp(-s)));
}

/* out[t] += g_t y[t] (g NULL: 1), or 0 for a masked token. */
__global__ static void k_add_shared(int d, const float *y, const float *g, const uint8_t *mask,
                                    float *out) {
    int t = blockIdx.x;
    float gt = g ? g[t] : 1.0f;
    int valid = !mask || mask[t];
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        size_t j = (size_t)t * d + i;
        out[j] = valid ? out[j] + gt * y[j] : 0.0f;
    }
}

/* ds[t] = g_t dout[t] (0 for masked tokens); with a gate, dlogit[t] = (dout_t . y_t) g (1-g). */
__global__ static void k_shared_ds(int d, const float *dout, const float *y, const float *g,
                                   const uint8_t *mask, float *ds, double *dlogit) {
    __shared__ double sh[BLOCK];
    int t = blockIdx.x;
    int valid = !mask || mask[t];
    float gt = g ? g[t] : 1.0f;
    double dg = 0;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        size_t j = (size_t)t * d + i;
        ds[j] = valid ? gt * dout[j] : 0.0f;
        if (valid) dg += (double)dout[j] * y[j];
    }
    if (!g) return;
    dg = moe_cuda_block_sum(dg, sh);
    if (threadIdx.x == 0) dlogit[t] = valid ? dg * gt * (1.0 - gt) : 0.0;
}

/* The gate's weight gradient gw[i] += sum_t dlogit_t x[t, i] (tokens in order) and
 * dx[t, i] += dlogit_t w[i]. */
__global__ static void k_gate_backward(int T, int d, const double *dlogit, const float *x,
                                       const float *w, float *gw, float *dx) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= d) return;
    double s = 0;
    for (int t = 0; t < T; t++) {
        s += dlogit[t] * x[(size_t)t * d + i];
        dx[(size_t)t * d + i] += (float)(dlogit[t] * w[i]);
    }
    gw[i] += (float)s;
}

/* The shared expert's MLP (every token, weight 1) and its gate, added into out; with bf16
 * experts its GEMMs take bf16 operands too. */
static moe_status shared_forward(moe_cuda_layer *L, float *out, const float *x, int T,
                                 const uint8_t *mask, int convert) {
    const moe_layer_config *c = &L->cfg;
    int d = c->d, fs = c->shared_ffn, gs = moe_act_gated(c->act) ? 2 * fs : fs, b = L->b16;
    const void *xin = x, *w_in = L->p.shared_w_in, *w_out = L->p.shared_w_out, *a = L->sh_a;
    if (b) {
        MOE_TRY(moe_cuda_to_bf16((size_t)T * d, x, L->sh_x16));
        if (convert) {
            MOE_TRY(moe_cuda_to_bf16((size_t)gs * d, L->p.shared_w_in, L->sh_w_in16));
            MOE_TRY(moe_cuda_to_bf16((size_t)d * fs, L->p.shared_w_out, L->sh_w_out16));
        }
        xin = L->sh_x16, w_in = L->sh_w_in16, w_out = L->sh_w_out16, a = L->sh_a16;
    }
    BLAS_TRY(moe_cuda_gemm(L->blas, 0, 1, T, gs, d, xin, d, w_in, d, 0, L->sh_h, gs, b),
             "shared x W_in");
    MOE_TRY(moe_cuda_act_forward(c->act, T, fs, L->sh_h, NULL, L->sh_a, b ? L->sh_a16 : NULL));
    BLAS_TRY(moe_cuda_gemm(L->blas, 0, 1, T, d, fs, a, fs, w_out, fs, 0, L->sh_y, d, b),
             "shared a W_out");
    if (c->shared_gate) k_gate<<<T, BLOCK>>>(d, x, L->p.shared_gate_w, L->sh_g);
    k_add_shared<<<T, BLOCK>>>(d, L->sh_y, c->shared_gate ? L->sh_g : NULL, mask, out);
    CU_TRY(cudaGetLastError(), "the shared expert");
    return MOE_OK;
}

/* Its backward: weight gradients, and dx += its input gradient. */
static moe_status shared_backward(moe_cuda_layer *L, float *dx, const float *dout,
                                  const float *x) {
    const moe_layer_config *c = &L->cfg;
    int T = L->T, d = c->d, fs = c->shared_ffn, gs = moe_act_gated(c->act) ? 2 * fs : fs;
    int b = L->b16;
    const uint8_t *mask = L->Tv < T ? L->mask : NULL;
    cublasHandle_t h = L->blas;
    k_shared_ds<<<T, BLOCK>>>(d, dout, L->sh_y, c->shared_gate ? L->sh_g : NULL, mask, L->sh_ds,
                              L->sh_dlogit);
    if (c->shared_gate)
        k_gate_backward<<<moe_cuda_blocks(d, BLOCK), BLOCK>>>(T, d, L->sh_dlogit, x,
                                                             L->p.shared_gate_w,
                                                             L->g.shared_gate_w, dx);
    CU_TRY(cudaGetLastError(), "the shared expert's backward");
    const void *xin = x, *w_in = L->p.shared_w_in, *w_out = L->p.shared_w_out, *a = L->sh_a;
    const void *ds = L->sh_ds, *dh = L->sh_dh;
    if (b) {
        MOE_TRY(moe_cuda_to_bf16((size_t)T * d, L->sh_ds, L->sh_ds16));
        xin = L->sh_x16, w_in = L->sh_w_in16, w_out = L->sh_w_out16, a = L->sh_a16;
        ds = L->sh_ds16, dh = L->sh_dh16;
    }
    BLAS_TRY(moe_cuda_gemm(h, 1, 0, d, fs, T, ds, d, a, fs, 1, L->g.shared_w_out, fs, b),
             "shared dW_out");
    BLAS_TRY(moe_cuda_gemm(h, 0, 0, T, fs, d, ds, d, w_out, fs, 0, L->sh_da, fs, b), "shared da");
    MOE_TRY(moe_cuda_act_backward(c->act, T, fs, L->sh_h, NULL, L->sh_da, L->sh_dh,
                                  b ? L->sh_dh16 : NULL, NULL));
    BLAS_TRY(moe_cuda_gemm(h, 1, 0, gs, d, T, dh, gs, xin, d, 1, L->g.shared_w_in, d, b),
             "shared dW_in");
    BLAS_TRY(moe_cuda_gemm(h, 0, 0, T, d, gs, dh, gs, w_in, d, 1, dx, d, b), "shared dx");
    return MOE_OK;
}

/* ---- forward ----------------------------------------------------------------------------- */

static void mark(moe_cuda_layer *L, int ev) {
    if (L->timing) cudaEventRecord(L->ev[ev], 0);
}

/* Per expert: C rows [o, o+n) of op(A_e) op(B_e): the expert loop of the grouped GEMMs. */
static moe_status experts_gemm(moe_cuda_layer *L, int which) {
    const moe_layer_config *c = &L->cfg;
    int d = c->d, f = c->ffn, gf = L->gf, b16 = L->b16;
    size_t es = b16 ? 2 : 4; /* operand element size */
    for (int e = 0; e < E_; e++) {
        int o = L->h_off[e], n = L->h_off[e + 1] - o;
        if (n == 0) continue;
        const char *w_in = b16 ? (const char *)L->w_in16 : (const char *)L->p.w_in;
        const char *w_out = b16 ? (const char *)L->w_out16 : (const char *)L->p.w_out;
        w_in += (size_t)e * gf * d * es;
        w_out += (size_t)e * d * f * es;
        const char *x = b16 ? (const char *)L->x16 : (const char *)L->xp;
        const char *a = b16 ? (const char *)L->a16 : (const char *)L->a;
        const char *dy = b16 ? (const char *)L->dy16 : (const char *)L->y;
        const char *dh = b16 ? (const char *)L->dh16 : (const char *)L->dh;
        x += (size_t)o * d * es;
        a += (size_t)o * f * es;
        dy += (size_t)o * d * es;
        dh += (size_t)o * gf * es;
        cublasHandle_t h = L->blas;
        float *dw_in = L->g.w_in + (size_t)e * gf * d, *dw_out = L->g.w_out + (size_t)e * d * f;
        switch (which) {
        case 0: /* h = x W_inᵀ */
            BLAS_TRY(moe_cuda_gemm(h, 0, 1, n, gf, d, x, d, w_in, d, 0, L->h + (size_t)o * gf, gf, b16), "x W_in");
            break;
        case 1: /* y = a W_outᵀ */
            BLAS_TRY(moe_cuda_gemm(h, 0, 1, n, d, f, a, f, w_out, f, 0, L->y + (size_t)o * d, d, b16), "a W_out");
            break;
        case 2: /* dW_out += dyᵀ a; da = dy W_out */
            BLAS_TRY(moe_cuda_gemm(h, 1, 0, d, f, n, dy, d, a, f, 1, dw_out, f, b16), "dW_out");
            BLAS_TRY(moe_cuda_gemm(h, 0, 0, n, f, d, dy, d, w_out, f, 0, L->da + (size_t)o * f, f, b16), "da");
            break;
        case 3: /* dW_in += dhᵀ x; dx = dh W_in (into y) */
            BLAS_TRY(moe_cuda_gemm(h, 1, 0, gf, d, n, dh, gf, x, d, 1, dw_in, d, b16), "dW_in");
            BLAS_TRY(moe_cuda_gemm(h, 0, 0, n, d, gf, dh, gf, w_in, d, 0, L->y + (size_t)o * d, d, b16), "dx");
            break;
        }
    }
    return MOE_OK;
}

static void fill_stats(moe_cuda_layer *L, const double *losses) {
    moe_layer_stats *s = &L->stats;
    s->n_experts = E_;
    s->topk = L->k;
    s->n_valid = L->Tv;
    s->capacity = 0;
    s->routed = 0;
    for (int e = 0; e < E_; e++) {
        L->counts64[e] = L->kept64[e] = L->h_off[e + 1] - L->h_off[e];
        s->routed += L->counts64[e];
    }
    s->counts = L->counts64;
    s->kept = L->kept64;
    s->dropped = 0;
    s->dropped_fraction = 0;
    s->aux_loss = losses[0];
    s->z_loss = losses[1];
    s->sinkhorn_iters = 0;
    s->exchange_bytes = 0;
    s->exchange_wait_s = 0;
}

extern "C" moe_status moe_cuda_layer_forward(moe_cuda_layer *L, float *out, const float *x,
                                             int T, const moe_forward_args *args) {
    const moe_layer_config *c = &L->cfg;
    moe_forward_args def = moe_forward_args_default();
    if (!args) args = &def;
    L->have_forward = 0;
    if (!x || !out) return moe_set_error(MOE_ERR_INVALID, "moe_cuda_layer_forward: x and out must not be NULL");
    int k, seq_len;
    MOE_TRY(moe_layer_check_call(c, T, L->max_tokens, args, &k, &seq_len));
    if (args->capacity_set && args->capacity_factor != 0)
        return moe_set_error(MOE_ERR_INVALID, "the CUDA layer is dropless: no per-call capacity "
                             "factor (%g)", args->capacity_factor);
    if (k > L->planned_k) MOE_TRY(alloc_workspace(L, k));
    int E = c->n_experts, d = c->d, f = c->ffn, gf = L->gf, S = T * k;
    L->T = T;
    L->k = k;
    L->loss_scale = args->loss_scale;
    L->Tv = T;
    if (args->mask) {
        L->Tv = 0;
        for (int t = 0; t < T; t++) L->Tv += args->mask[t] != 0;
        MOE_TRY(moe_cuda_to_device(L->mask, args->mask, (size_t)T));
    }
    const uint8_t *mask = args->mask ? L->mask : NULL;
    L->wmode = c->score == MOE_SCORE_SOFTMAX && !c->pre_softmax ? MOE_WMODE_SOFTMAX_K
                                                                  : MOE_WMODE_GATHER;
    L->wscore = c->score;
    L->renorm = c->norm_topk == MOE_NORM_ON ||
                (c->norm_topk == MOE_NORM_AUTO && c->score != MOE_SCORE_SOFTMAX && k > 1);
    L->aux_on = c->lb_type != MOE_LB_NONE && c->aux_coeff > 0 && L->Tv > 0;
    L->z_on = c->z_coeff > 0 && L->Tv > 0;
    L->n_seq = L->aux_on && c->lb_type == MOE_LB_SEQ_AUX ? T / seq_len : 1;

    mark(L, EV_F0);
    BLAS_TRY(moe_cuda_gemm(L->blas, 0, 1, T, E, d, x, d, L->p.router_w, d, 0, L->logits, E, 0),
             "router logits");
    router_args r;
    r.T = T, r.E = E, r.k = k, r.d = d;
    r.logits = L->logits, r.mask = mask;
    r.bias = c->enable_expert_bias ? L->expert_bias : NULL;
    r.score = c->score;
    r.softmax_k = L->wmode == MOE_WMODE_SOFTMAX_K;
    r.renorm = L->renorm;
    r.route_scale = c->route_scale;
    r.n_groups = c->n_groups, r.group_topk = c->group_topk;
    int per = c->n_groups > 1 ? E / c->n_groups : E;
    int m = c->group_score_topk > 0 ? c->group_score_topk : k / (c->group_topk > 0 ? c->group_topk : 1);
    r.group_m = m < 1 ? 1 : m > per ? per : m;
    r.aux_score = c->score;
    r.aux = L->aux_on;
    r.p = L->p64, r.key = L->key, r.lse = L->lse, r.q = L->q, r.qsum = L->qsum;
    r.slot_expert = L->slot_expert, r.aux_top = L->aux_top, r.slot_w = L->slot_w;
    k_router<<<moe_cuda_blocks(T, 64), 64>>>(r);
    mark(L, EV_F_ROUTER);
    double losses[2] = {0, 0};
    CU_TRY(cudaMemset(L->losses, 0, 16), "clear the losses");
    if (L->aux_on) {
        int B = L->n_seq; /* dp: [B] valid tokens per sequence (scratch until the backward) */
        k_aux_sums<<<dim3(B, E + 1), BLOCK>>>(T / B, E, k, L->key, L->aux_top, mask, L->aux_pm,
                                              L->aux_cnt, L->dp);
        k_aux_loss<<<1, 1>>>(B, E, k, c->aux_coeff, L->aux_pm, L->aux_cnt, L->dp, L->aux_coef,
                             L->losses);
    }
    if (L->z_on) k_z_loss<<<1, BLOCK>>>(T, L->Tv, c->z_coeff, L->lse, mask, L->losses);
    mark(L, EV_F_BALANCE);

    CU_TRY(cudaMemset(L->counts, 0, (size_t)E * 4), "clear the counts");
    k_sort_keys<<<moe_cuda_blocks(S, BLOCK), BLOCK>>>(S, E, L->slot_expert, L->sort_key, L->sort_val,
                                                 L->counts);
    k_offsets<<<1, 1>>>(E, L->counts, L->expert_off);
    int end_bit = 1;
    while ((1 << end_bit) <= E) end_bit++;
    CU_TRY(cub::DeviceRadixSort::SortPairs(L->sort_tmp, L->sort_tmp_bytes, L->sort_key,
                                           L->sort_key2, L->sort_val, L->row_slot, S, 0, end_bit),
           "sort the slots by expert");
    MOE_TRY(moe_cuda_to_host(L->h_off, L->expert_off, off_bytes(E) + 16));
    memcpy(losses, (char *)L->h_off + off_bytes(E), 16);
    int R = L->h_off[E];
    CU_TRY(cudaMemset(L->slot_row, 0xff, (size_t)S * 4), "clear the slot rows");
    if (R > 0) {
        k_rows<<<moe_cuda_blocks(R, BLOCK), BLOCK>>>(R, L->row_slot, L->slot_w, L->slot_row, L->row_w);
        if (L->b16) k_gather<<<R, BLOCK>>>(R, d, k, L->row_slot, x, L->x16);
        else k_gather<<<R, BLOCK>>>(R, d, k, L->row_slot, x, L->xp);
    }
    int convert = L->b16 && !(args->reuse_bf16 && L->w16_kept);
    if (convert) {
        MOE_TRY(moe_cuda_to_bf16((size_t)E * gf * d, L->p.w_in, L->w_in16));
        MOE_TRY(moe_cuda_to_bf16((size_t)E * d * f, L->p.w_out, L->w_out16));
    }
    L->w16_kept = L->b16 && args->reuse_bf16; /* (shared_forward converts alike) */
    mark(L, EV_F_PERMUTE);
    MOE_TRY(experts_gemm(L, 0));
    mark(L, EV_F_GEMM1);
    MOE_TRY(moe_cuda_act_forward(c->act, R, f, L->h, L->row_w, L->a, L->a16));
    mark(L, EV_F_ACT);
    MOE_TRY(experts_gemm(L, 1));
    mark(L, EV_F_GEMM2);
    k_combine<<<T, BLOCK>>>(d, k, L->slot_row, L->y, out, 0);
    mark(L, EV_F_COMBINE);
    if (c->shared_ffn > 0) MOE_TRY(shared_forward(L, out, x, T, mask, convert));
    mark(L, EV_F_SHARED);
    CU_TRY(cudaGetLastError(), "the layer's forward");
    fill_stats(L, losses);
    L->have_forward = 1;
    return MOE_OK;
}

/* ---- backward ---------------------------------------------------------------------------- */

struct router_bwd_args {
    int T, E, k, n_seq, Tv;
    const uint8_t *mask;
    const float *logits;
    const double *p, *q, *qsum, *lse, *dw_row, *aux_coef;
    const int32_t *slot_expert, *slot_row;
    int softmax_k, renorm, aux, z;
    moe_score_fn score, aux_score;
    double route_scale, loss_scale, z_coeff;
    double *dz, *dp;
    float *dz_f;
};

/* dz [E] += (d score / dz)ᵀ dp for one token (moe_router_score_backward). */
__device__ static void score_backward(moe_score_fn fn, int E, const float *z, const double *p,
                                      const double *dp, double *dz) {
    if (fn == MOE_SCORE_SOFTMAX) {
        double s = 0;
        for (int e = 0; e < E; e++) s += p[e] * dp[e];
        for (int e = 0; e < E; e++) dz[e] += p[e] * (dp[e] - s);
    } else if (fn == MOE_SCORE_SIGMOID) {
        for (int e = 0; e < E; e++) dz[e] += dp[e] * p[e] * (1 - p[e]);
    } else {
        for (int e = 0; e < E; e++)
            dz[e] += p[e] > 0 ? dp[e] * (1.0 / (1.0 + exp(-(double)z[e]))) / (2 * p[e]) : 0;
    }
}

/* One thread per token: routing-weight, aux and z-loss gradients → dz_f [T, E]. */
__global__ static void k_router_backward(router_bwd_args r) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= r.T) return;
    int E = r.E, k = r.k;
    const float *z = r.logits + (size_t)t * E;
    const double *p = r.p + (size_t)t * E;
    double *dz = r.dz + (size_t)t * E, *dp = r.dp + (size_t)t * E;
    float *out = r.dz_f + (size_t)t * E;
    for (int e = 0; e < E; e++) dz[e] = 0;
    if (r.mask && !r.mask[t]) {
        for (int e = 0; e < E; e++) out[e] = 0;
        return;
    }
    double dq[MAX_E], S = r.qsum[t], cross = 0;
    for (int j = 0; j < k; j++) {
        int s = t * k + j, row = r.slot_row[s];
        dq[j] = row >= 0 ? r.route_scale * r.dw_row[row] : 0;
        cross += dq[j] * r.q[s];
    }
    for (int j = 0; j < k; j++) dq[j] = r.renorm ? dq[j] / S - cross / (S * S) : dq[j];
    if (r.softmax_k) {
        double sq = 0;
        for (int j = 0; j < k; j++) sq += r.q[t * k + j] * dq[j];
        for (int j = 0; j < k; j++) dz[r.slot_expert[t * k + j]] += r.q[t * k + j] * (dq[j] - sq);
    } else {
        for (int e = 0; e < E; e++) dp[e] = 0;
        for (int j = 0; j < k; j++) dp[r.slot_expert[t * k + j]] += dq[j];
        score_backward(r.score, E, z, p, dp, dz);
    }
    if (r.aux) {
        const double *coef = r.aux_coef + (size_t)(t / (r.T / r.n_seq)) * E;
        if (r.aux_score == MOE_SCORE_SOFTMAX) {
            for (int e = 0; e < E; e++) dp[e] = r.loss_scale * coef[e];
        } else {
            double sp = 0, c = 0;
            for (int e = 0; e < E; e++) sp += p[e];
            for (int e = 0; e < E; e++) c += r.loss_scale * coef[e] * p[e] / sp;
            for (int e = 0; e < E; e++) dp[e] = (r.loss_scale * coef[e] - c) / sp;
        }
        score_backward(r.aux_score, E, z, p, dp, dz);
    }
    if (r.z) {
        double g = r.loss_scale * r.z_coeff * 2.0 * r.lse[t] / r.Tv;
        for (int e = 0; e < E; e++) dz[e] += g * exp((double)z[e] - r.lse[t]);
    }
    for (int e = 0; e < E; e++) out[e] = (float)dz[e];
}

static double elapsed(const moe_cuda_layer *L, int a, int b) {
    float ms = 0;
    cudaEventElapsedTime(&ms, L->ev[a], L->ev[b]);
    return 1e-3 * ms;
}

extern "C" moe_status moe_cuda_layer_backward(moe_cuda_layer *L, float *dx, const float *dout,
                                              const float *x) {
    const moe_layer_config *c = &L->cfg;
    if (!L->have_forward)
        return moe_set_error(MOE_ERR_STATE, "moe_cuda_layer_backward called without a forward "
                             "(or twice for one forward)");
    if (!dx || !dout || !x)
        return moe_set_error(MOE_ERR_INVALID, "moe_cuda_layer_backward: dx, dout and x must not be NULL");
    int T = L->T, k = L->k, E = c->n_experts, d = c->d, f = c->ffn, R = L->h_off[E];
    mark(L, EV_B0);
    if (c->shared_ffn > 0) MOE_TRY(shared_backward(L, dx, dout, x));
    mark(L, EV_B_SHARED);
    if (R > 0) {
        if (L->b16) k_gather<<<R, BLOCK>>>(R, d, k, L->row_slot, dout, L->dy16);
        else k_gather<<<R, BLOCK>>>(R, d, k, L->row_slot, dout, L->y);
    }
    mark(L, EV_B_GATHER);
    MOE_TRY(experts_gemm(L, 2));
    mark(L, EV_B_GEMM1);
    MOE_TRY(moe_cuda_act_backward(c->act, R, f, L->h, L->row_w, L->da, L->dh, L->dh16,
                                  L->dw_row));
    mark(L, EV_B_ACT);
    MOE_TRY(experts_gemm(L, 3));
    mark(L, EV_B_GEMM2);
    k_combine<<<T, BLOCK>>>(d, k, L->slot_row, L->y, dx, 1); /* y holds dL/dxp */
    mark(L, EV_B_SCATTER);
    router_bwd_args r;
    r.T = T, r.E = E, r.k = k, r.n_seq = L->n_seq, r.Tv = L->Tv;
    r.mask = L->Tv < T ? L->mask : NULL;
    r.logits = L->logits;
    r.p = L->p64, r.q = L->q, r.qsum = L->qsum, r.lse = L->lse, r.dw_row = L->dw_row;
    r.aux_coef = L->aux_coef;
    r.slot_expert = L->slot_expert, r.slot_row = L->slot_row;
    r.softmax_k = L->wmode == MOE_WMODE_SOFTMAX_K;
    r.renorm = L->renorm;
    r.aux = L->aux_on, r.z = L->z_on;
    r.score = L->wscore, r.aux_score = c->score;
    r.route_scale = c->route_scale, r.loss_scale = L->loss_scale, r.z_coeff = c->z_coeff;
    r.dz = L->dz, r.dp = L->dp, r.dz_f = L->dz_f;
    k_router_backward<<<moe_cuda_blocks(T, 64), 64>>>(r);
    BLAS_TRY(moe_cuda_gemm(L->blas, 1, 0, E, d, T, L->dz_f, E, x, d, 1, L->g.router_w, d, 0), "dW_router");
    BLAS_TRY(moe_cuda_gemm(L->blas, 0, 0, T, d, E, L->dz_f, E, L->p.router_w, d, 1, dx, d, 0), "router dx");
    mark(L, EV_B_ROUTER);
    CU_TRY(cudaGetLastError(), "the layer's backward");
    L->have_forward = 0;
    if (L->timing) {
        CU_TRY(cudaEventSynchronize(L->ev[EV_B_ROUTER]), "stage timing");
        double *s = L->stage_s;
        s[MOE_STAGE_ROUTER] += elapsed(L, EV_F0, EV_F_ROUTER);
        s[MOE_STAGE_BALANCE] += elapsed(L, EV_F_ROUTER, EV_F_BALANCE);
        s[MOE_STAGE_PERMUTE] += elapsed(L, EV_F_BALANCE, EV_F_PERMUTE);
        s[MOE_STAGE_EXPERT_GEMM] += elapsed(L, EV_F_PERMUTE, EV_F_GEMM1) + elapsed(L, EV_F_ACT, EV_F_GEMM2);
        s[MOE_STAGE_ACTIVATION] += elapsed(L, EV_F_GEMM1, EV_F_ACT);
        s[MOE_STAGE_COMBINE] += elapsed(L, EV_F_GEMM2, EV_F_COMBINE);
        s[MOE_STAGE_SHARED] += elapsed(L, EV_F_COMBINE, EV_F_SHARED);
        s[MOE_STAGE_BWD_SHARED] += elapsed(L, EV_B0, EV_B_SHARED);
        s[MOE_STAGE_BWD_PERMUTE] += elapsed(L, EV_B_SHARED, EV_B_GATHER) +
                                    elapsed(L, EV_B_GEMM2, EV_B_SCATTER);
        s[MOE_STAGE_BWD_EXPERT_GEMM] += elapsed(L, EV_B_GATHER, EV_B_GEMM1) + elapsed(L, EV_B_ACT, EV_B_GEMM2);
        s[MOE_STAGE_BWD_ACTIVATION] += elapsed(L, EV_B_GEMM1, EV_B_ACT);
        s[MOE_STAGE_BWD_ROUTER] += elapsed(L, EV_B_SCATTER, EV_B_ROUTER);
    }
    return MOE_OK;
}

extern "C" const moe_layer_stats *moe_cuda_layer_get_stats(const moe_cuda_layer *L) {
    return &L->stats;
}

extern "C" moe_status moe_cuda_layer_fetch_routing(moe_cuda_layer *L, const moe_routing **out) {
    size_t S = (size_t)L->T * L->k;
    free(L->r_token), free(L->r_expert), free(L->r_weight), free(L->r_kept);
    L->r_token = (int32_t *)malloc(S * 4);
    L->r_expert = (int32_t *)malloc(S * 4);
    L->r_weight = (float *)malloc(S * 4);
    L->r_kept = (uint8_t *)malloc(S);
    if (!L->r_token || !L->r_expert || !L->r_weight || !L->r_kept) return MOE_ERR_NOMEM;
    MOE_TRY(moe_cuda_to_host(L->r_expert, L->slot_expert, S * 4));
    MOE_TRY(moe_cuda_to_host(L->r_weight, L->slot_w, S * 4));
    for (size_t s = 0; s < S; s++) {
        L->r_token[s] = (int32_t)(s / (size_t)L->k);
        L->r_kept[s] = L->r_expert[s] >= 0;
    }
    L->routing.n_slots = (int)S;
    L->routing.token = L->r_token;
    L->routing.expert = L->r_expert;
    L->routing.weight = L->r_weight;
    L->routing.kept = L->r_kept;
    *out = &L->routing;
    return MOE_OK;
}

extern "C" void moe_cuda_layer_time_stages(moe_cuda_layer *L, int on) {
    L->timing = on;
    memset(L->stage_s, 0, sizeof L->stage_s);
}

extern "C" const double *moe_cuda_layer_stage_times(const moe_cuda_layer *L) { return L->stage_s; }

