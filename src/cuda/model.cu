/* The MoE transformer on one GPU (model.h): model/model.c's forward and backward, step by step,
 * with the kernels of nn.cu, the MoE layers of layer.cu and cuBLAS. Supported: grouped-query
 * attention with RoPE over the whole head, RMSNorm, dense and MoE blocks, tied or separate
 * embeddings; the MoE layers as moe_cuda_layer_create accepts them. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/cuda_internal.h"

extern "C" {
#include "cuda/model.h"
#include "cuda/nn.h"
#include "moe/mlp.h"
#include "moe_cuda.h"
}

/* What the forward saves of one block (device). */
typedef struct {
    float *x, *n1, *rstd1, *q, *k, *v, *lse, *att, *xm, *n2, *rstd2, *h, *a;
} saved;

struct moe_cuda_model {
    moe_model_config cfg;
    moe_cuda_model_plan plan;
    moe_cuda_block_plan *blocks;
    int max_tokens, hq, hkv, gf;
    cublasHandle_t blas;
    float *params, *grads;      /* (device) [n_params] */
    moe_cuda_layer **moe;       /* [L] */
    saved *sv;                  /* [L] */
    float *rope_cs;             /* [seq_len, hd] */
    int32_t *tokens, *targets, *pos; /* [T] each, in one buffer: one copy brings them in */
    float *xf, *nf, *rstdf, *logits; /* [T, d], [T, d], [T], [T, V] */
    float *dx, *dxm, *dn, *dq, *dk, *dv, *datt, *dh, *da, *tmp; /* backward scratch */
    size_t n_tmp;               /* floats of tmp */
    float *scores;              /* [H T] the attention backward's scratch */
    float *kcache, *vcache;     /* [L][seq_len, hkv] decoding's keys and values (first use) */
    double *row_loss;           /* [T] */
    double *sum;                /* [1] */
    int *n_counted;             /* [1] */
    int B, S, n_targets, have_forward;
    moe_model_args args;
    /* training on the GPU (moe_cuda_model_optim_init) */
    float *adam_m, *adam_v;     /* [n_params] */
    uint8_t *decay;             /* [n_params] 1 = weight decay applies */
    double *partials;           /* [n_chunks] sums of squares */
    double *partials_host;      /* [n_chunks] */
    void **allocs;              /* every device buffer, for destroy */
    int n_allocs, cap_allocs;
};

static moe_status take(moe_cuda_model *g, void *pp, size_t n, size_t size) {
    void **p = (void **)pp;
    *p = NULL;
    if (g->n_allocs == g->cap_allocs) {
        int cap = g->cap_allocs ? 2 * g->cap_allocs : 64;
        void **a = (void **)realloc(g->allocs, sizeof(void *) * (size_t)cap);
        if (!a) return moe_set_error(MOE_ERR_NOMEM, "out of memory");
        g->allocs = a;
        g->cap_allocs = cap;
    }
    cudaError_t e = cudaMalloc(p, n * size > 0 ? n * size : 1);
    if (e != cudaSuccess) {
        cudaGetLastError();
        return moe_set_error(MOE_ERR_NOMEM, "CUDA: %zu bytes of GPU memory for the model: %s",
                             n * size, cudaGetErrorString(e));
    }
    g->allocs[g->n_allocs++] = *p;
    return MOE_OK;
}

static moe_status check_supported(const moe_cuda_model_plan *p) {
    const moe_model_config *c = p->cfg;
    const char *no = NULL;
    if (c->kv_lora_rank) no = "multi-head latent attention";
    else if (c->qk_norm) no = "q/k norms";
    else if (c->qkv_bias) no = "q/k/v biases";
    else if (c->rope_factor > 1) no = "YaRN (rotary-scaling-factor > 1)";
    else if (p->hd > 256) no = "heads wider than 256";
    if (no) return moe_set_error(MOE_ERR_INVALID, "the CUDA model does not support %s yet", no);
    return MOE_OK;
}

extern "C" void moe_cuda_model_destroy(moe_cuda_model *g) {
    if (!g) return;
    for (int l = 0; g->moe && l < g->cfg.n_layers; l++) moe_cuda_layer_destroy(g->moe[l]);
    for (int i = 0; i < g->n_allocs; i++) cudaFree(g->allocs[i]);
    moe_cuda_blas_destroy(g->blas);
    free(g->allocs);
    free(g->moe);
    free(g->sv);
    free(g->blocks);
    free(g->partials_host);
    free(g);
}

extern "C" moe_status moe_cuda_model_create(const moe_cuda_model_plan *p, int max_tokens,
                                            moe_cuda_model **out) {
    *out = NULL;
    MOE_TRY(check_supported(p));
    if (moe_cuda_device_count() < 1)
        return moe_set_error(MOE_ERR_INVALID, "%s", moe_cuda_device_name());
    moe_cuda_model *g = (moe_cuda_model *)calloc(1, sizeof *g);
    if (!g) return moe_set_error(MOE_ERR_NOMEM, "out of memory for the GPU model");
    const moe_model_config *c = p->cfg;
    int L = c->n_layers;
    g->cfg = *c;
    g->plan = *p;
    g->plan.cfg = &g->cfg;
    g->max_tokens = max_tokens;
    g->hq = c->n_heads * p->hd;
    g->hkv = p->kvh * p->hd;
    g->gf = moe_act_gated(c->moe.act) ? 2 * c->ffn : c->ffn;
    g->blocks = (moe_cuda_block_plan *)calloc((size_t)L, sizeof *g->blocks);
    g->moe = (moe_cuda_layer **)calloc((size_t)L, sizeof *g->moe);
    g->sv = (saved *)calloc((size_t)L, sizeof *g->sv);
    moe_status s = g->blocks && g->moe && g->sv ? MOE_OK : MOE_ERR_NOMEM;
    if (s != MOE_OK) moe_set_error(s, "out of memory for the GPU model");
    if (s == MOE_OK) memcpy(g->blocks, p->blocks, sizeof *g->blocks * (size_t)L);
    g->plan.blocks = g->blocks;
    if (s == MOE_OK) s = moe_cuda_blas_create(&g->blas);
    size_t T = (size_t)max_tokens, d = (size_t)c->d, V = (size_t)c->vocab, S = (size_t)c->seq_len;
    size_t H = (size_t)c->n_heads, hq = (size_t)g->hq, hkv = (size_t)g->hkv;
    size_t rows = H * T, wide = V > d ? V : d; /* attention rows: lse, the backward's D */
    g->n_tmp = T * wide;
    if (s == MOE_OK) s = take(g, &g->params, p->n_params, 4);
    if (s == MOE_OK) s = take(g, &g->grads, p->n_params, 4);
    if (s == MOE_OK) s = take(g, &g->rope_cs, S * (size_t)p->hd, 4);
    if (s == MOE_OK) s = moe_cuda_to_device(g->rope_cs, p->rope_cs, S * (size_t)p->hd * 4);
    for (int l = 0; l < L && s == MOE_OK; l++) {
        saved *v = &g->sv[l];
        int dense = !g->blocks[l].moe_cfg;
        struct {
            void *p;
            size_t n;
        } want[] = {{&v->x, T * d},     {&v->n1, T * d},    {&v->rstd1, T},  {&v->q, T * hq},
                    {&v->k, T * hkv},   {&v->v, T * hkv},   {&v->lse, rows},
                    {&v->att, T * hq},  {&v->xm, T * d},    {&v->n2, T * d}, {&v->rstd2, T},
                    {&v->h, dense ? T * (size_t)g->gf : 0}, {&v->a, dense ? T * (size_t)c->ffn : 0}};
        for (size_t i = 0; i < sizeof want / sizeof want[0] && s == MOE_OK; i++)
            s = take(g, want[i].p, want[i].n, 4);
        if (s == MOE_OK && !dense)
            s = moe_cuda_layer_create(g->blocks[l].moe_cfg, max_tokens, g->params + g->blocks[l].moe,
                                      g->grads + g->blocks[l].moe, &g->moe[l]);
    }
    struct {
        void *p;
        size_t n, size;
    } rest[] = {{&g->tokens, 3 * T, 4}, {&g->xf, T * d, 4},
                {&g->nf, T * d, 4},  {&g->rstdf, T, 4},   {&g->logits, T * V, 4},
                {&g->dx, T * d, 4},  {&g->dxm, T * d, 4}, {&g->dn, T * d, 4}, {&g->dq, T * hq, 4},
                {&g->dk, T * hkv, 4}, {&g->dv, T * hkv, 4}, {&g->datt, T * hq, 4},
                {&g->dh, T * (size_t)g->gf, 4}, {&g->da, T * (size_t)c->ffn, 4},
                {&g->tmp, g->n_tmp, 4}, {&g->scores, rows, 4}, {&g->row_loss, T, 8},
                {&g->sum, 1, 8},     {&g->n_counted, 1, 4}};
    for (size_t i = 0; i < sizeof rest / sizeof rest[0] && s == MOE_OK; i++)
        s = take(g, rest[i].p, rest[i].n, rest[i].size);
    if (s != MOE_OK) {
        moe_cuda_model_destroy(g);
        return s;
    }
    *out = g;
    return MOE_OK;
}

static float *P(moe_cuda_model *g, size_t off) { return off == SIZE_MAX ? NULL : g->params + off; }
static float *G(moe_cuda_model *g, size_t off) { return off == SIZE_MAX ? NULL : g->grads + off; }

/* q, k, v of one block from n1, RoPE applied (dir -1: the backward's rotation of dq, dk). */
static moe_status rope_qk(moe_cuda_model *g, float *q, float *k, int T, int dir) {
    const moe_model_config *c = &g->cfg;
    int hd = g->plan.hd, il = c->rope_interleave;
    MOE_TRY(moe_cuda_rope_rotate(q, T, c->n_heads, hd, hd, g->pos, il, g->rope_cs, c->seq_len, dir));
    return moe_cuda_rope_rotate(k, T, g->plan.kvh, hd, hd, g->pos, il, g->rope_cs, c->seq_len, dir);
}

/* The parameters change (copied in, an optimizer step): the layers' bf16 copies are stale. */
static void weights_changed(moe_cuda_model *g) {
    for (int l = 0; l < g->cfg.n_layers; l++)
        if (g->moe[l]) moe_cuda_layer_weights_changed(g->moe[l]);
}

static moe_status params_in(moe_cuda_model *g, const float *host) {
    weights_changed(g);
    return moe_cuda_to_device(g->params, host, g->plan.n_params * 4);
}

/* Decoding: block l's new keys and values (rows past ..) into its cache, then attention over
 * it: a prompt on an empty cache by the tiles of the forward, else query by query (tmp, not
 * yet in use, holding the partial results of the keys' shares). */
static moe_status attend_cached(moe_cuda_model *g, int l, const saved *v, int n, int past,
                                const moe_attn_dims *ad) {
    size_t w = (size_t)g->hkv, at = (size_t)l * g->cfg.seq_len * w;
    float *kc = g->kcache + at, *vc = g->vcache + at;
    CU_TRY(cudaMemcpyAsync(kc + past * w, v->k, 4 * n * w, cudaMemcpyDeviceToDevice), "cache");
    CU_TRY(cudaMemcpyAsync(vc + past * w, v->v, 4 * n * w, cudaMemcpyDeviceToDevice), "cache");
    if (past == 0 && n > 1) return moe_cuda_attention_forward(v->att, v->lse, v->q, kc, vc, ad);
    return moe_cuda_attention_cached(v->att, v->q, kc, vc, n, past, ad, g->tmp, g->n_tmp);
}

/* The forward of B sequences of S tokens (moe_cuda_model_forward); with past >= 0 (B = 1) the
 * tokens sit at positions past .. past + S - 1 of a sequence whose keys and values are kept in
 * the cache (moe_cuda_model_decode): theirs are added to it and attention reads it. */
static moe_status forward(moe_cuda_model *g, const float *params, const float *const *expert_bias,
                          const int32_t *tokens, const int32_t *targets, int B, int S, int past,
                          const moe_model_args *args, moe_model_loss *loss) {
    const moe_model_config *c = &g->cfg;
    const moe_cuda_model_plan *p = &g->plan;
    g->have_forward = 0;
    int T = B * S, d = c->d, V = c->vocab, hq = g->hq, hkv = g->hkv, P0 = past > 0 ? past : 0;
    if (T > g->max_tokens || P0 + S > c->seq_len)
        return moe_set_error(MOE_ERR_INVALID, "GPU model: batch %d x %d does not fit", B, S);
    int32_t *host = (int32_t *)malloc(sizeof(int32_t) * 3 * (size_t)T);
    if (!host) return moe_set_error(MOE_ERR_NOMEM, "out of memory");
    for (int t = 0; t < T; t++) {
        host[t] = tokens[t];
        host[T + t] = targets && targets[t] >= 0 ? targets[t] : -1;
        host[2 * T + t] = P0 + t % S;
    }
    g->targets = g->tokens + T;
    g->pos = g->tokens + 2 * T;
    moe_status s = moe_cuda_to_device(g->tokens, host, 12 * (size_t)T);
    free(host);
    MOE_TRY(s);
    if (params) MOE_TRY(params_in(g, params));
    g->B = B;
    g->S = S;
    g->args = *args;
    moe_attn_dims ad = {B, S, c->n_heads, p->kvh, p->hd, p->hd, p->att_scale};
    cublasHandle_t h = g->blas;
    MOE_TRY(moe_cuda_embed_forward(g->sv[0].x, P(g, p->emb_off), g->tokens, T, d));
    double aux = 0, z = 0;
    for (int l = 0; l < c->n_layers; l++) {
        saved *v = &g->sv[l];
        const moe_cuda_block_plan *b = &g->blocks[l];
        float *xnext = l + 1 < c->n_layers ? g->sv[l + 1].x : g->xf;
        MOE_TRY(moe_cuda_rmsnorm_forward(v->n1, v->rstd1, v->x, P(g, b->attn_norm), T, d, c->norm_eps));
        BLAS_TRY(moe_cuda_gemm(h, 0, 1, T, hq, d, v->n1, d, P(g, b->wq), d, 0, v->q, hq, 0), "q");
        BLAS_TRY(moe_cuda_gemm(h, 0, 1, T, hkv, d, v->n1, d, P(g, b->wk), d, 0, v->k, hkv, 0), "k");
        BLAS_TRY(moe_cuda_gemm(h, 0, 1, T, hkv, d, v->n1, d, P(g, b->wv), d, 0, v->v, hkv, 0), "v");
        MOE_TRY(rope_qk(g, v->q, v->k, T, 1));
        if (past < 0) MOE_TRY(moe_cuda_attention_forward(v->att, v->lse, v->q, v->k, v->v, &ad));
        else MOE_TRY(attend_cached(g, l, v, T, past, &ad));
        CU_TRY(cudaMemcpyAsync(v->xm, v->x, sizeof(float) * (size_t)T * d, cudaMemcpyDeviceToDevice),
               "copy");
        BLAS_TRY(moe_cuda_gemm(h, 0, 1, T, d, hq, v->att, hq, P(g, b->wo), hq, 1, v->xm, d, 0), "o");
        MOE_TRY(moe_cuda_rmsnorm_forward(v->n2, v->rstd2, v->xm, P(g, b->ffn_norm), T, d, c->norm_eps));
        if (g->moe[l]) {
            moe_forward_args fa = moe_forward_args_default();
            fa.training = args->training;
            fa.step = args->step;
            fa.loss_scale = args->loss_scale;
            fa.seq_len = S;
            fa.reuse_bf16 = past >= 0; /* decoding: the weights change only by params_in */
            if (expert_bias && expert_bias[l])
                MOE_TRY(moe_cuda_layer_set_expert_bias(g->moe[l], expert_bias[l]));
            MOE_TRY(moe_cuda_layer_forward(g->moe[l], g->tmp, v->n2, T, &fa));
            aux += moe_cuda_layer_get_stats(g->moe[l])->aux_loss;
            z += moe_cuda_layer_get_stats(g->moe[l])->z_loss;
        } else {
            int f = c->ffn, gf = g->gf;
            BLAS_TRY(moe_cuda_gemm(h, 0, 1, T, gf, d, v->n2, d, P(g, b->w_in), d, 0, v->h, gf, 0),
                     "ffn in");
            MOE_TRY(moe_cuda_act_forward(c->moe.act, T, f, v->h, NULL, v->a, NULL));
            BLAS_TRY(moe_cuda_gemm(h, 0, 1, T, d, f, v->a, f, P(g, b->w_out), f, 0, g->tmp, d, 0),
                     "ffn out");
        }
        MOE_TRY(moe_cuda_add(xnext, v->xm, g->tmp, (size_t)T * d));
    }
    MOE_TRY(moe_cuda_rmsnorm_forward(g->nf, g->rstdf, g->xf, P(g, p->final_norm_off), T, d,
                                     c->norm_eps));
    BLAS_TRY(moe_cuda_gemm(h, 0, 1, T, V, d, g->nf, d, P(g, p->lm_off), d, 0, g->logits, V, 0),
             "logits");
    double sum = 0;
    int n = 0;
    if (targets) { /* (without: no loss, and no waiting for the GPU here) */
        MOE_TRY(moe_cuda_xent(NULL, g->row_loss, g->sum, g->n_counted, g->logits, g->targets, T,
                              V, 0));
        MOE_TRY(moe_cuda_to_host(&sum, g->sum, sizeof sum));
        MOE_TRY(moe_cuda_to_host(&n, g->n_counted, sizeof n));
    }
    g->n_targets = n;
    if (loss) {
        loss->nll = n ? sum / n : 0;
        loss->aux = aux;
        memset(loss->aux_terms, 0, sizeof loss->aux_terms);
        loss->z = z;
        loss->n_targets = n;
    }
    g->have_forward = 1;
    return MOE_OK;
}

extern "C" moe_status moe_cuda_model_forward(moe_cuda_model *g, const float *params,
                                             const float *const *expert_bias,
                                             const int32_t *tokens, const int32_t *targets,
                                             int B, int S, const moe_model_args *args,
                                             moe_model_loss *loss) {
    return forward(g, params, expert_bias, tokens, targets, B, S, -1, args, loss);
}

extern "C" moe_status moe_cuda_model_decode(moe_cuda_model *g, const float *params,
                                            const float *const *expert_bias,
                                            const int32_t *tokens, int n, int past) {
    const moe_model_config *c = &g->cfg;
    if (n < 1 || past < 0 || n > g->max_tokens || past + n > c->seq_len)
        return moe_set_error(MOE_ERR_INVALID, "GPU decode: %d tokens after %d do not fit", n,
                             past);
    if (!g->kcache) {
        size_t each = (size_t)c->n_layers * c->seq_len * g->hkv;
        MOE_TRY(take(g, &g->kcache, each, 4));
        MOE_TRY(take(g, &g->vcache, each, 4));
    }
    moe_model_args args = moe_model_args_default();
    args.training = 0;
    return forward(g, params, expert_bias, tokens, NULL, 1, n, past, &args, NULL);
}

extern "C" const moe_layer_stats *moe_cuda_model_layer_stats(const moe_cuda_model *g, int l) {
    return g->moe[l] ? moe_cuda_layer_get_stats(g->moe[l]) : NULL;
}

extern "C" moe_status moe_cuda_model_logits(const moe_cuda_model *g, float *out, int row, int n) {
    size_t V = (size_t)g->cfg.vocab;
    return moe_cuda_to_host(out, g->logits + (size_t)row * V, (size_t)n * V * sizeof(float));
}

extern "C" moe_status moe_cuda_model_backward(moe_cuda_model *g, float *grads) {
    if (!g->have_forward)
        return moe_set_error(MOE_ERR_STATE, "moe_model_backward called without a forward");
    g->have_forward = 0;
    const moe_model_config *c = &g->cfg;
    const moe_cuda_model_plan *p = &g->plan;
    int T = g->B * g->S, d = c->d, V = c->vocab, hq = g->hq, hkv = g->hkv;
    size_t Td = (size_t)T * d;
    moe_attn_dims ad = {g->B, g->S, c->n_heads, p->kvh, p->hd, p->hd, p->att_scale};
    cublasHandle_t h = g->blas;
    if (grads) CU_TRY(cudaMemset(g->grads, 0, p->n_params * 4), "clear the gradients");
    float scale = g->n_targets ? g->args.loss_scale / (float)g->n_targets : 0.0f;
    float *dlogits = g->tmp;
    MOE_TRY(moe_cuda_xent(dlogits, g->row_loss, g->sum, g->n_counted, g->logits, g->targets, T,
                          V, scale));
    BLAS_TRY(moe_cuda_gemm(h, 1, 0, V, d, T, dlogits, V, g->nf, d, 1, G(g, p->lm_off), d, 0),
             "dW_lm");
    BLAS_TRY(moe_cuda_gemm(h, 0, 0, T, d, V, dlogits, V, P(g, p->lm_off), d, 0, g->dn, d, 0),
             "dx_lm");
    CU_TRY(cudaMemset(g->dx, 0, Td * 4), "clear");
    MOE_TRY(moe_cuda_rmsnorm_backward(g->dx, G(g, p->final_norm_off), g->dn, g->xf,
                                      P(g, p->final_norm_off), g->rstdf, T, d));
    for (int l = c->n_layers - 1; l >= 0; l--) {
        saved *v = &g->sv[l];
        const moe_cuda_block_plan *b = &g->blocks[l];
        if (g->moe[l]) {
            CU_TRY(cudaMemset(g->dn, 0, Td * 4), "clear");
            MOE_TRY(moe_cuda_layer_backward(g->moe[l], g->dn, g->dx, v->n2));
        } else {
            int f = c->ffn, gf = g->gf;
            BLAS_TRY(moe_cuda_gemm(h, 1, 0, d, f, T, g->dx, d, v->a, f, 1, G(g, b->w_out), f, 0),
                     "dW_out");
            BLAS_TRY(moe_cuda_gemm(h, 0, 0, T, f, d, g->dx, d, P(g, b->w_out), f, 0, g->da, f, 0),
                     "da");
            MOE_TRY(moe_cuda_act_backward(c->moe.act, T, f, v->h, NULL, g->da, g->dh, NULL, NULL));
            BLAS_TRY(moe_cuda_gemm(h, 1, 0, gf, d, T, g->dh, gf, v->n2, d, 1, G(g, b->w_in), d, 0),
                     "dW_in");
            BLAS_TRY(moe_cuda_gemm(h, 0, 0, T, d, gf, g->dh, gf, P(g, b->w_in), d, 0, g->dn, d, 0),
                     "dx ffn");
        }
        CU_TRY(cudaMemcpyAsync(g->dxm, g->dx, Td * 4, cudaMemcpyDeviceToDevice), "copy");
        MOE_TRY(moe_cuda_rmsnorm_backward(g->dxm, G(g, b->ffn_norm), g->dn, v->xm,
                                          P(g, b->ffn_norm), v->rstd2, T, d));
        BLAS_TRY(moe_cuda_gemm(h, 1, 0, d, hq, T, g->dxm, d, v->att, hq, 1, G(g, b->wo), hq, 0),
                 "dW_o");
        BLAS_TRY(moe_cuda_gemm(h, 0, 0, T, hq, d, g->dxm, d, P(g, b->wo), hq, 0, g->datt, hq, 0),
                 "datt");
        CU_TRY(cudaMemset(g->dq, 0, (size_t)T * hq * 4), "clear");
        CU_TRY(cudaMemset(g->dk, 0, (size_t)T * hkv * 4), "clear");
        CU_TRY(cudaMemset(g->dv, 0, (size_t)T * hkv * 4), "clear");
        MOE_TRY(moe_cuda_attention_backward(g->dq, g->dk, g->dv, g->datt, v->att, v->lse, v->q,
                                            v->k, v->v, &ad, g->scores));
        MOE_TRY(rope_qk(g, g->dq, g->dk, T, -1));
        BLAS_TRY(moe_cuda_gemm(h, 1, 0, hq, d, T, g->dq, hq, v->n1, d, 1, G(g, b->wq), d, 0), "dW_q");
        BLAS_TRY(moe_cuda_gemm(h, 1, 0, hkv, d, T, g->dk, hkv, v->n1, d, 1, G(g, b->wk), d, 0), "dW_k");
        BLAS_TRY(moe_cuda_gemm(h, 1, 0, hkv, d, T, g->dv, hkv, v->n1, d, 1, G(g, b->wv), d, 0), "dW_v");
        BLAS_TRY(moe_cuda_gemm(h, 0, 0, T, d, hq, g->dq, hq, P(g, b->wq), d, 0, g->dn, d, 0), "dn q");
        BLAS_TRY(moe_cuda_gemm(h, 0, 0, T, d, hkv, g->dk, hkv, P(g, b->wk), d, 1, g->dn, d, 0), "dn k");
        BLAS_TRY(moe_cuda_gemm(h, 0, 0, T, d, hkv, g->dv, hkv, P(g, b->wv), d, 1, g->dn, d, 0), "dn v");
        CU_TRY(cudaMemcpyAsync(g->dx, g->dxm, Td * 4, cudaMemcpyDeviceToDevice), "copy");
        MOE_TRY(moe_cuda_rmsnorm_backward(g->dx, G(g, b->attn_norm), g->dn, v->x,
                                          P(g, b->attn_norm), v->rstd1, T, d));
    }
    MOE_TRY(moe_cuda_embed_backward(G(g, p->emb_off), g->dx, g->tokens, T, d));
    return grads ? moe_cuda_to_host(grads, g->grads, p->n_params * 4) : MOE_OK;
}

/* ---- training on the GPU ----------------------------------------------------------------- */

#define SUMSQ_CHUNK 65536 /* elements per partial sum of squares */

static size_t n_chunks(const moe_cuda_model *g) {
    return (g->plan.n_params + SUMSQ_CHUNK - 1) / SUMSQ_CHUNK;
}

extern "C" moe_status moe_cuda_model_optim_init(moe_cuda_model *g, const uint8_t *decay) {
    size_t n = g->plan.n_params, c = n_chunks(g);
    if (!g->adam_m) MOE_TRY(take(g, &g->adam_m, n, 4));
    if (!g->adam_v) MOE_TRY(take(g, &g->adam_v, n, 4));
    if (!g->decay) MOE_TRY(take(g, &g->decay, n, 1));
    if (!g->partials) MOE_TRY(take(g, &g->partials, c, 8));
    if (!g->partials_host) g->partials_host = (double *)malloc(sizeof(double) * (c ? c : 1));
    if (!g->partials_host) return moe_set_error(MOE_ERR_NOMEM, "out of memory");
    CU_TRY(cudaMemset(g->adam_m, 0, n * 4), "clear");
    CU_TRY(cudaMemset(g->adam_v, 0, n * 4), "clear");
    return moe_cuda_to_device(g->decay, decay, n);
}

extern "C" moe_status moe_cuda_model_params_io(moe_cuda_model *g, float *host, int to_device) {
    return to_device ? params_in(g, host)
                     : moe_cuda_to_host(host, g->params, g->plan.n_params * 4);
}

extern "C" moe_status moe_cuda_model_grads_io(moe_cuda_model *g, float *host, int to_device) {
    size_t bytes = g->plan.n_params * 4;
    return to_device ? moe_cuda_to_device(g->grads, host, bytes)
                     : moe_cuda_to_host(host, g->grads, bytes);
}

extern "C" moe_status moe_cuda_model_zero_grads(moe_cuda_model *g) {
    CU_TRY(cudaMemset(g->grads, 0, g->plan.n_params * 4), "clear the gradients");
    return MOE_OK;
}

extern "C" moe_status moe_cuda_model_adam_io(moe_cuda_model *g, float *m, float *v,
                                             int to_device) {
    size_t bytes = g->plan.n_params * 4;
    if (to_device) {
        MOE_TRY(moe_cuda_to_device(g->adam_m, m, bytes));
        return moe_cuda_to_device(g->adam_v, v, bytes);
    }
    MOE_TRY(moe_cuda_to_host(m, g->adam_m, bytes));
    return moe_cuda_to_host(v, g->adam_v, bytes);
}

extern "C" moe_status moe_cuda_model_set_grad(moe_cuda_model *g, size_t i, float v) {
    return moe_cuda_to_device(g->grads + i, &v, sizeof v);
}

/* partials[b] = the sum of squares of x [b CHUNK, (b+1) CHUNK) in float64, a fixed order. */
__global__ static void k_sumsq(const float *x, size_t n, double *partials) {
    __shared__ double sh[MOE_CUDA_BLOCK];
    size_t lo = (size_t)blockIdx.x * SUMSQ_CHUNK, hi = lo + SUMSQ_CHUNK < n ? lo + SUMSQ_CHUNK : n;
    double s = 0;
    for (size_t i = lo + threadIdx.x; i < hi; i += blockDim.x) s += (double)x[i] * x[i];
    s = moe_cuda_block_sum(s, sh);
    if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

extern "C" moe_status moe_cuda_model_grad_sumsq(moe_cuda_model *g, double *out) {
    size_t c = n_chunks(g);
    *out = 0;
    if (c == 0) return MOE_OK;
    k_sumsq<<<(unsigned)c, MOE_CUDA_BLOCK>>>(g->grads, g->plan.n_params, g->partials);
    CU_TRY(cudaGetLastError(), "gradient norm");
    MOE_TRY(moe_cuda_to_host(g->partials_host, g->partials, c * sizeof(double)));
    double s = 0;
    for (size_t i = 0; i < c; i++) s += g->partials_host[i];
    *out = s;
    return MOE_OK;
}

/* AdamW with the gradient scaled by clip, read and then zeroed (the trainer's update). */
__global__ static void k_adamw(float *p, float *gr, float *m, float *v, const uint8_t *decay,
                               size_t n, moe_cuda_adamw h) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float gi = gr[i] * h.clip;
        gr[i] = 0;
        m[i] = h.b1 * m[i] + (1 - h.b1) * gi;
        v[i] = h.b2 * v[i] + (1 - h.b2) * gi * gi;
        float upd = (m[i] / h.bc1) / (sqrtf(v[i] / h.bc2) + h.eps);
        p[i] -= h.lr * (upd + h.wd * (float)decay[i] * p[i]);
    }
}

extern "C" moe_status moe_cuda_model_adamw(moe_cuda_model *g, const moe_cuda_adamw *h) {
    weights_changed(g);
    k_adamw<<<4096, MOE_CUDA_BLOCK>>>(g->params, g->grads, g->adam_m, g->adam_v, g->decay,
                                      g->plan.n_params, *h);
    CU_TRY(cudaGetLastError(), "AdamW");
    return MOE_OK;
}
