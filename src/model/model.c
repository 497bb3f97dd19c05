/* The MoE transformer: parameters as one named-tensor vector, forward and backward over a
 * batch of B sequences of S tokens. Activations live in one allocation planned at create. */
#include "core/core.h"
#include "cuda/model.h"
#include "kernels/kernels.h"
#include "model/model_gpu.h"
#include "model/model_internal.h"
#include "moe/layer_internal.h"
#include "moe_cuda.h"

#include <math.h>
#include <omp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Pointers of one block into the parameter (or gradient) vector. */
typedef struct {
    float *attn_norm; /* [d] */
    float *wq;        /* [H*hd, d] */
    float *wk;        /* [KV*hd, d] */
    float *wv;        /* [KV*hd, d] */
    float *wo;        /* [d, H*hd] */
    float *bq, *bk, *bv; /* [H*hd], [KV*hd], [KV*hd] with qkv_bias, else NULL */
    float *qn, *kn;   /* qk_norm weights: [hd] per head, [H*hd] / [KV*hd] whole; else NULL */
    /* multi-head latent attention (wq is q_proj without a query latent, wo [d, H*dv]) */
    float *wqa, *qan, *wqb; /* q_a_proj [qr, d], q_a_layernorm [qr], q_b_proj [H*dk, qr] */
    float *wkva, *kvan, *wkvb; /* kv_a_proj_with_mqa [kr+dr, d], kv_a_layernorm [kr],
                                  kv_b_proj [H*(dn+dv), kr] */
    float *ffn_norm;  /* [d] */
    float *w_in;      /* dense: [gf, d] */
    float *w_out;     /* dense: [d, ffn] */
    float *moe;       /* MoE: the layer's parameter vector */
} block_ptrs;

/* What forward saves of one block for backward. */
typedef struct {
    float *x;     /* [T, d] block input */
    float *n1;    /* [T, d] */
    float *rstd1; /* [T] */
    float *q;     /* [T, H*hd] after RoPE */
    float *k;     /* [T, KV*hd] after RoPE */
    float *v;     /* [T, KV*hd] */
    float *qp, *kp; /* qk_norm: q and k before their norms */
    float *rq, *rk; /* qk_norm: their reciprocal RMS, per row of the norm */
    float *qa, *rqa, *qan; /* MLA: query latent [T, qr], its reciprocal RMS [T], normed */
    float *c, *rc, *cn;    /* MLA: key/value latent [T, kr], reciprocal RMS [T], normed */
    float *probs; /* [B, H, S, S] */
    float *att;   /* [T, H*hd] */
    float *xm;    /* [T, d] after the attention residual */
    float *n2;    /* [T, d] */
    float *rstd2; /* [T] */
    float *h;     /* dense: [T, gf] */
    float *a;     /* dense: [T, ffn] */
} block_saved;

struct moe_model {
    moe_model_config cfg;
    int max_tokens, hd, gf;
    int head_qk, head_v, kvh; /* head widths of q/k and of v; key/value heads (MLA: H) */
    moe_rope rope;         /* RoPE of the rotated part (MLA: the last qk_rope_dim of a head) */
    int rope_dim;          /* its width */
    float *rope_cs;        /* its cos and sin at positions 0 .. seq_len-1 (moe_rope_table) */
    float att_scale;       /* attention scores q.k * this */
    size_t n_params;
    size_t act_bytes; /* the activation workspace */
    float *params, *grads; /* grads NULL: created for inference (no backward) */
    int inference;
    moe_tensor_info *tensors;
    int n_tensors, cap_tensors;
    size_t emb_off, final_norm_off, lm_off;
    size_t *block_off; /* [L][B_N] offsets of the block_ptrs fields (SIZE_MAX = absent) */
    moe_layer **moe;   /* [L] */
    block_saved *sv;   /* [L] */
    void *act_mem;
    float *xf, *nf, *rstdf, *logits; /* [T,d] [T,d] [T] [T,V] */
    float *dx, *dn; /* [T, d] the backward's: dL/d(residual stream), dL/d(a norm's output) */
    float *tmp;     /* [T, d] an FFN's output */
    double *row_loss; /* [T] */
    int32_t *tokens, *targets, *pos; /* [T] */
    /* One region for the scratch of one phase of a block at a time (plan_activations): the
     * FFN's call (a MoE layer's call scratch, or a dense FFN's dh and da), or the attention's
     * part of the forward, of decoding or of the backward (the buffers below); or the
     * backward's head before the blocks (dlogits). */
    void *scratch;
    size_t scratch_bytes;
    int poison_scratch; /* fill the region with NaN between phases (moe_model_poison_scratch) */
    double part_s[2][MOE_PART_COUNT]; /* moe_model_part_times */
    float *dlogits; /* [T, V] */
    float *dh, *da; /* [T, gf], [T, ffn] a dense FFN's */
    float *dxm, *dq, *dk, *dv, *datt; /* the attention's backward: [T, d], [T, H*dk],
                                         [T, kvh*dk], [T, kvh*dv], [T, H*max(dk, dv)] */
    float *mla_a, *mla_b, *mla_c, *mla_d; /* MLA scratch: [T, kr+dr], [T, H*(dn+dv)],
                                             2 x [T, max(kr, qr)] (backward) */
    float *att_scratch;     /* the attention's keys or values transposed */
    size_t att_scratch_n;   /* its floats */
    int B, S, have_forward, has_targets;
    float *kcache, *vcache; /* [L][seq_len, kvh*dk], [L][seq_len, kvh*dv], allocated by the
                               first decoding call on the CPU (kv_bytes) */
    size_t kv_bytes;
    int cache_len;
    moe_model_args args;
    int n_targets;
    /* the device "cuda" (moe_model_use_device): forward and backward on the GPU */
    moe_cuda_model *gpu;
    int gpu_train;                   /* parameters, gradients and AdamW live on the GPU */
    int host_stale, dev_stale;       /* gpu_train: which copy of the parameters is behind */
    float *gpu_grads;                /* [n_params] the backward's gradients (pinned) */
    int dev_kept;                    /* the GPU's parameters are the host's, copied by the last
                                        decoding call (moe_model_params drops this) */
    moe_cuda_block_plan *gpu_blocks; /* [L] */
    const float **gpu_bias;          /* [L] the MoE layers' selection biases (host) */
};

static void gpu_release(moe_model *m);

moe_model_config moe_model_config_default(void) {
    moe_model_config c;
    memset(&c, 0, sizeof c);
    c.vocab = 257;
    c.d = 128;
    c.n_layers = 4;
    c.n_heads = 4;
    c.n_kv_heads = 4;
    c.ffn = 256;
    c.seq_len = 256;
    c.rope_theta = 10000.0f;
    c.norm_eps = 1e-5f;
    c.init_std = 0.02f;
    c.tie_embeddings = 0;
    c.moe_layer_freq = 1;
    c.first_k_dense = 0;
    c.rope_factor = 1;
    c.rope_beta_fast = 32;
    c.rope_beta_slow = 1;
    c.moe = moe_layer_config_default();
    c.moe.ffn = 128;
    return c;
}

int moe_model_layer_experts(const moe_model_config *c, int l) {
    if (l < c->first_k_dense || c->moe_layer_freq < 1 || l % c->moe_layer_freq ||
        c->n_experts[l] == MOE_LAYER_DENSE)
        return 0;
    return c->n_experts[l] > 0 ? c->n_experts[l] : c->moe.n_experts;
}

static moe_layer_config layer_config(const moe_model_config *c, int l) {
    moe_layer_config lc = c->moe;
    lc.d = c->d;
    lc.n_experts = moe_model_layer_experts(c, l);
    lc.layer_id = l;
    lc.seed = c->moe.seed;
    return lc;
}

moe_status moe_model_config_validate_training(const moe_model_config *c) {
    const moe_layer_config *m = &c->moe;
    int moe_layers = 0;
    for (int l = 0; l < c->n_layers; l++) moe_layers += moe_model_layer_experts(c, l) > 0;
    if (!moe_layers || m->router != MOE_ROUTER_TOPK || m->topk != 1) return MOE_OK;
    MOE_CHECK(m->score != MOE_SCORE_SOFTMAX || m->pre_softmax,
          "moe-router-topk 1 with the softmax taken after the top-k (moe-router-pre-softmax "
          "false, the default) gives the chosen expert the weight 1 always, so the router learns "
          "nothing from the loss: set moe-router-pre-softmax (Switch's top-1)");
    MOE_CHECK(m->norm_topk != MOE_NORM_ON,
          "moe-router-topk 1 with moe-router-norm-topk-prob true gives the chosen expert the "
          "weight 1 always, so the router learns nothing from the loss: set "
          "moe-router-norm-topk-prob false or auto");
    return MOE_OK;
}

int moe_model_head_dim(const moe_model_config *c) {
    return c->head_dim > 0 ? c->head_dim : c->n_heads > 0 ? c->d / c->n_heads : 0;
}

void moe_model_head_dims(const moe_model_config *c, int *dk, int *dv) {
    *dk = c->kv_lora_rank ? c->qk_nope_dim + c->qk_rope_dim : moe_model_head_dim(c);
    *dv = c->kv_lora_rank ? c->v_head_dim : moe_model_head_dim(c);
}

moe_status moe_model_config_validate(const moe_model_config *c) {
    MOE_CHECK(c->vocab >= 2, "vocab size must be >= 2 (got %d)", c->vocab);
    MOE_CHECK(c->d >= 1, "hidden-size must be >= 1 (got %d)", c->d);
    MOE_CHECK(c->n_layers >= 1 && c->n_layers <= MOE_MAX_LAYERS,
          "num-layers must be between 1 and %d (got %d)", MOE_MAX_LAYERS, c->n_layers);
    MOE_CHECK(c->n_heads >= 1 && (c->head_dim > 0 || c->d % c->n_heads == 0),
          "num-attention-heads (%d) must divide hidden-size (%d), or give kv-channels",
          c->n_heads, c->d);
    MOE_CHECK(c->head_dim >= 0 && c->head_dim <= 1 << 16, "kv-channels must be in [0, 65536] "
              "(got %d)", c->head_dim);
    int mla = c->kv_lora_rank > 0;
    MOE_CHECK(mla || moe_model_head_dim(c) % 2 == 0, "the head size (%d) must be even for "
              "rotary embeddings", moe_model_head_dim(c));
    MOE_CHECK(c->kv_lora_rank >= 0 && c->q_lora_rank >= 0 && (mla || !c->q_lora_rank),
              "q-lora-rank needs kv-lora-rank (multi-head latent attention)");
    MOE_CHECK(!mla || (c->qk_rope_dim >= 2 && c->qk_rope_dim % 2 == 0 && c->qk_nope_dim >= 0 &&
                       c->v_head_dim >= 1),
              "multi-head latent attention needs an even qk-pos-emb-head-dim >= 2 (got %d), "
              "qk-head-dim >= 0 (%d) and v-head-dim >= 1 (%d)", c->qk_rope_dim, c->qk_nope_dim,
              c->v_head_dim);
    MOE_CHECK(!mla || (!c->qkv_bias && !c->qk_norm), "multi-head latent attention has no "
              "q/k/v biases or q/k norms");
    MOE_CHECK(isfinite(c->rope_factor) && c->rope_factor >= 1 &&
                  (c->rope_factor == 1 || c->rope_orig_max_pos >= 1),
              "rotary-scaling-factor must be >= 1, and > 1 needs "
              "original-max-position-embeddings (got %g, %d)", c->rope_factor,
              c->rope_orig_max_pos);
    MOE_CHECK(c->rope_beta_fast > 0 && c->rope_beta_slow > 0 && c->rope_mscale >= 0 &&
                  c->rope_mscale_all_dim >= 0,
              "beta-fast, beta-slow must be > 0 and mscale, mscale-all-dim >= 0");
    MOE_CHECK(c->n_kv_heads >= 1 && c->n_heads % c->n_kv_heads == 0,
          "num-query-groups (%d) must divide num-attention-heads (%d)", c->n_kv_heads, c->n_heads);
    MOE_CHECK(c->ffn >= 1, "ffn-hidden-size must be >= 1 (got %d)", c->ffn);
    MOE_CHECK(c->seq_len >= 1, "seq-length must be >= 1 (got %d)", c->seq_len);
    MOE_CHECK(isfinite(c->rope_theta) && c->rope_theta > 1, "rotary-base must be > 1 (got %g)",
          c->rope_theta);
    MOE_CHECK(isfinite(c->norm_eps) && c->norm_eps > 0, "norm-epsilon must be > 0 (got %g)",
          c->norm_eps);
    MOE_CHECK(isfinite(c->init_std) && c->init_std > 0, "init-method-std must be > 0 (got %g)",
          c->init_std);
    MOE_CHECK(c->moe_layer_freq >= 1, "moe-layer-freq must be >= 1 (got %d)", c->moe_layer_freq);
    MOE_CHECK(c->first_k_dense >= 0, "first-k-dense must be >= 0 (got %d)", c->first_k_dense);
    /* the layer options do not contradict each other: a count listed for a layer that
     * first-k-dense or moe-layer-freq makes dense, or no MoE layer left of an MoE model */
    int listed_moe = 0;
    for (int l = 0; l < c->n_layers; l++) listed_moe += c->n_experts[l] != MOE_LAYER_DENSE;
    MOE_CHECK(c->first_k_dense < c->n_layers || !listed_moe,
          "first-k-dense (%d) leaves no MoE layer of the %d (a dense model: num-experts 0 for "
          "each layer)", c->first_k_dense, c->n_layers);
    for (int l = 0; l < c->n_layers; l++) {
        MOE_CHECK(c->n_experts[l] >= MOE_LAYER_DENSE, "num-experts of layer %d must be >= 0 or "
                  "MOE_LAYER_DENSE (got %d)", l, c->n_experts[l]);
        MOE_CHECK(c->n_experts[l] <= 0 || moe_model_layer_experts(c, l),
              "num-experts lists %d experts for layer %d, which %s makes dense (list 0 there)",
              c->n_experts[l], l, l < c->first_k_dense ? "first-k-dense" : "moe-layer-freq");
        if (!moe_model_layer_experts(c, l)) continue;
        moe_layer_config lc = layer_config(c, l);
        if (moe_layer_config_validate(&lc) != MOE_OK) {
            char msg[512];
            snprintf(msg, sizeof msg, "%s", moe_last_error());
            return moe_set_error(MOE_ERR_INVALID, "layer %d: %s", l, msg);
        }
    }
    return MOE_OK;
}

moe_model_args moe_model_args_default(void) {
    moe_model_args a = {.training = 1, .step = 0, .loss_scale = 1.0f};
    return a;
}

/* ---------------------------------------------------------------- tensors */

static moe_status add_tensor(moe_model *m, int no_decay, size_t *off_out, int ndim,
                             const int64_t *shape, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));

static moe_status add_tensor(moe_model *m, int no_decay, size_t *off_out, int ndim,
                             const int64_t *shape, const char *fmt, ...) {
    if (m->n_tensors == m->cap_tensors) {
        int cap = m->cap_tensors ? 2 * m->cap_tensors : 64;
        moe_tensor_info *t = realloc(m->tensors, sizeof *t * (size_t)cap);
        if (!t) return moe_set_error(MOE_ERR_NOMEM, "out of memory for the tensor table");
        m->tensors = t;
        m->cap_tensors = cap;
    }
    moe_tensor_info *t = &m->tensors[m->n_tensors++];
    memset(t, 0, sizeof *t);
    t->expert_id = -1;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t->name, sizeof t->name, fmt, ap);
    va_end(ap);
    t->ndim = ndim;
    t->numel = 1;
    for (int i = 0; i < ndim; i++) {
        t->shape[i] = shape[i];
        t->numel *= (size_t)shape[i];
    }
    t->offset = m->n_params;
    t->no_decay = no_decay;
    if (off_out) *off_out = m->n_params;
    m->n_params += t->numel;
    return MOE_OK;
}

#define SHAPE(...) ((const int64_t[]){__VA_ARGS__})
#define ADD(nd, off, ndim, ...) MOE_TRY(add_tensor(m, nd, off, ndim, __VA_ARGS__))

/* The MLP of an expert (or the shared expert) as Hugging Face names it: gate_proj and up_proj
 * (gated activations) or up_proj, then down_proj; biases if present. The rows of W_in are
 * gate then up, so each named tensor is a contiguous range. */
static moe_status add_mlp(moe_model *m, const char *prefix, int gated, int64_t f, int64_t d,
                          int bias, size_t *w_in_off, size_t *w_out_off) {
    if (gated) ADD(0, w_in_off, 2, SHAPE(f, d), "%s.gate_proj.weight", prefix);
    ADD(0, gated ? NULL : w_in_off, 2, SHAPE(f, d), "%s.up_proj.weight", prefix);
    if (bias) {
        if (gated) ADD(1, NULL, 1, SHAPE(f), "%s.gate_proj.bias", prefix);
        ADD(1, NULL, 1, SHAPE(f), "%s.up_proj.bias", prefix);
    }
    ADD(0, w_out_off, 2, SHAPE(d, f), "%s.down_proj.weight", prefix);
    if (bias) ADD(1, NULL, 1, SHAPE(d), "%s.down_proj.bias", prefix);
    return MOE_OK;
}

/* The MoE layer's parameter vector (moe_layer_params order) as named tensors. Expert e's
 * gate/up/down blocks and biases are contiguous in the stacked [El, ...] tensors, so each is a
 * tensor of its own, named with its global index: a rank of an expert-parallel group lists
 * only its experts [ep_rank El, (ep_rank+1) El). */
static moe_status add_moe_tensors(moe_model *m, int l, const moe_layer_config *lc,
                                  size_t *start) {
    int64_t E = lc->n_experts, d = lc->d, f = lc->ffn, fs = lc->shared_ffn;
    int64_t El = E / lc->ep_size, e0 = (int64_t)lc->ep_rank * El;
    int gated = moe_act_gated(lc->act), b = lc->expert_bias;
    char prefix[96];
    int64_t P = lc->cosine_dim; /* the cosine router: its tensors last, no gate.weight */
    if (!P) ADD(0, start, 2, SHAPE(E, d), "model.layers.%d.mlp.gate.weight", l);
    int first = m->n_tensors;
    for (int64_t e = e0; e < e0 + El; e++) {
        size_t *at = P && e == e0 ? start : NULL;
        if (gated) ADD(0, at, 2, SHAPE(f, d), "model.layers.%d.mlp.experts.%lld.gate_proj.weight", l, (long long)e);
        ADD(0, gated ? NULL : at, 2, SHAPE(f, d), "model.layers.%d.mlp.experts.%lld.up_proj.weight", l, (long long)e);
    }
    for (int64_t e = e0; b && e < e0 + El; e++) {
        if (gated) ADD(1, NULL, 1, SHAPE(f), "model.layers.%d.mlp.experts.%lld.gate_proj.bias", l, (long long)e);
        ADD(1, NULL, 1, SHAPE(f), "model.layers.%d.mlp.experts.%lld.up_proj.bias", l, (long long)e);
    }
    for (int64_t e = e0; e < e0 + El; e++)
        ADD(0, NULL, 2, SHAPE(d, f), "model.layers.%d.mlp.experts.%lld.down_proj.weight", l, (long long)e);
    for (int64_t e = e0; b && e < e0 + El; e++)
        ADD(1, NULL, 1, SHAPE(d), "model.layers.%d.mlp.experts.%lld.down_proj.bias", l, (long long)e);
    for (int i = first; i < m->n_tensors; i++) { /* expert blocks: El per kind, in order */
        moe_tensor_info *t = &m->tensors[i];
        const char *p = strstr(t->name, ".experts.");
        t->expert = 1;
        t->expert_id = p ? atoi(p + 9) : -1;
    }
    if (fs > 0) {
        snprintf(prefix, sizeof prefix, "model.layers.%d.mlp.shared_expert", l);
        /* moe_layer_params order: shared_w_in, shared_b_in, shared_w_out, shared_b_out */
        if (gated) ADD(0, NULL, 2, SHAPE(fs, d), "%s.gate_proj.weight", prefix);
        ADD(0, NULL, 2, SHAPE(fs, d), "%s.up_proj.weight", prefix);
        if (b && gated) ADD(1, NULL, 1, SHAPE(fs), "%s.gate_proj.bias", prefix);
        if (b) ADD(1, NULL, 1, SHAPE(fs), "%s.up_proj.bias", prefix);
        ADD(0, NULL, 2, SHAPE(d, fs), "%s.down_proj.weight", prefix);
        if (b) ADD(1, NULL, 1, SHAPE(d), "%s.down_proj.bias", prefix);
    }
    if (lc->shared_gate) ADD(0, NULL, 2, SHAPE(1, d), "model.layers.%d.mlp.shared_expert_gate.weight", l);
    if (lc->residual) {
        ADD(0, NULL, 2, SHAPE(2, d), "model.layers.%d.mlp.coefficient.weight", l);
        ADD(1, NULL, 1, SHAPE(2), "model.layers.%d.mlp.coefficient.bias", l);
    }
    if (P) {
        ADD(0, NULL, 2, SHAPE(P, d), "model.layers.%d.mlp.gate.cosine_projector.weight", l);
        ADD(1, NULL, 1, SHAPE(P), "model.layers.%d.mlp.gate.cosine_projector.bias", l);
        ADD(0, NULL, 2, SHAPE(E, P), "model.layers.%d.mlp.gate.cosine_directions", l);
        ADD(1, NULL, 1, SHAPE(1), "model.layers.%d.mlp.gate.temperature", l);
    }
    MOE_ASSERT(m->n_params - *start == moe_layer_param_count(lc));
    return MOE_OK;
}

enum { B_ATTN_NORM, B_WQ, B_WK, B_WV, B_BQ, B_BK, B_BV, B_QN, B_KN, B_WO, B_FFN_NORM, B_W_IN,
       B_W_OUT, B_MOE, B_WQA, B_QAN, B_WQB, B_WKVA, B_KVAN, B_WKVB, B_N };

static moe_status build_tensors(moe_model *m) {
    const moe_model_config *c = &m->cfg;
    int dk, dv;
    moe_model_head_dims(c, &dk, &dv);
    int64_t d = c->d, V = c->vocab, hq = (int64_t)c->n_heads * m->hd,
            hkv = (int64_t)c->n_kv_heads * m->hd, H = c->n_heads, qr = c->q_lora_rank,
            kr = c->kv_lora_rank;
    ADD(0, &m->emb_off, 2, SHAPE(V, d), "model.embed_tokens.weight");
    for (int l = 0; l < c->n_layers; l++) {
        size_t *o = m->block_off + (size_t)l * B_N;
        for (int i = 0; i < B_N; i++) o[i] = SIZE_MAX;
        ADD(1, &o[B_ATTN_NORM], 1, SHAPE(d), "model.layers.%d.input_layernorm.weight", l);
        if (kr) { /* multi-head latent attention, DeepSeek's names */
            if (qr) {
                ADD(0, &o[B_WQA], 2, SHAPE(qr, d), "model.layers.%d.self_attn.q_a_proj.weight", l);
                ADD(1, &o[B_QAN], 1, SHAPE(qr), "model.layers.%d.self_attn.q_a_layernorm.weight", l);
                ADD(0, &o[B_WQB], 2, SHAPE(H * dk, qr), "model.layers.%d.self_attn.q_b_proj.weight", l);
            } else {
                ADD(0, &o[B_WQ], 2, SHAPE(H * dk, d), "model.layers.%d.self_attn.q_proj.weight", l);
            }
            ADD(0, &o[B_WKVA], 2, SHAPE(kr + c->qk_rope_dim, d),
                "model.layers.%d.self_attn.kv_a_proj_with_mqa.weight", l);
            ADD(1, &o[B_KVAN], 1, SHAPE(kr), "model.layers.%d.self_attn.kv_a_layernorm.weight", l);
            ADD(0, &o[B_WKVB], 2, SHAPE(H * (c->qk_nope_dim + dv), kr),
                "model.layers.%d.self_attn.kv_b_proj.weight", l);
            ADD(0, &o[B_WO], 2, SHAPE(d, H * dv), "model.layers.%d.self_attn.o_proj.weight", l);
            goto ffn;
        }
        ADD(0, &o[B_WQ], 2, SHAPE(hq, d), "model.layers.%d.self_attn.q_proj.weight", l);
        ADD(0, &o[B_WK], 2, SHAPE(hkv, d), "model.layers.%d.self_attn.k_proj.weight", l);
        ADD(0, &o[B_WV], 2, SHAPE(hkv, d), "model.layers.%d.self_attn.v_proj.weight", l);
        if (c->qkv_bias) {
            ADD(1, &o[B_BQ], 1, SHAPE(hq), "model.layers.%d.self_attn.q_proj.bias", l);
            ADD(1, &o[B_BK], 1, SHAPE(hkv), "model.layers.%d.self_attn.k_proj.bias", l);
            ADD(1, &o[B_BV], 1, SHAPE(hkv), "model.layers.%d.self_attn.v_proj.bias", l);
        }
        if (c->qk_norm) { /* per head (Qwen3) or over the whole projection (OLMoE) */
            int whole = c->qk_norm == MOE_QK_NORM_WHOLE;
            ADD(1, &o[B_QN], 1, SHAPE(whole ? hq : m->hd), "model.layers.%d.self_attn.q_norm.weight", l);
            ADD(1, &o[B_KN], 1, SHAPE(whole ? hkv : m->hd), "model.layers.%d.self_attn.k_norm.weight", l);
        }
        ADD(0, &o[B_WO], 2, SHAPE(d, hq), "model.layers.%d.self_attn.o_proj.weight", l);
    ffn:
        ADD(1, &o[B_FFN_NORM], 1, SHAPE(d), "model.layers.%d.post_attention_layernorm.weight", l);
        if (moe_model_layer_experts(c, l)) {
            moe_layer_config lc = layer_config(c, l);
            MOE_TRY(add_moe_tensors(m, l, &lc, &o[B_MOE]));
        } else {
            char prefix[64];
            snprintf(prefix, sizeof prefix, "model.layers.%d.mlp", l);
            MOE_TRY(add_mlp(m, prefix, moe_act_gated(c->moe.act), c->ffn, d, 0, &o[B_W_IN],
                            &o[B_W_OUT]));
        }
    }
    ADD(1, &m->final_norm_off, 1, SHAPE(d), "model.norm.weight");
    if (c->tie_embeddings)
        m->lm_off = m->emb_off;
    else
        ADD(0, &m->lm_off, 2, SHAPE(V, d), "lm_head.weight");
    return MOE_OK;
}

static block_ptrs block(const moe_model *m, float *base, int l) {
    const size_t *o = m->block_off + (size_t)l * B_N;
    float *p[B_N];
    for (int i = 0; i < B_N; i++) p[i] = o[i] == SIZE_MAX ? NULL : base + o[i];
    block_ptrs b = {p[B_ATTN_NORM], p[B_WQ],     p[B_WK],    p[B_WV],
                    p[B_WO],        p[B_BQ],     p[B_BK],    p[B_BV],
                    p[B_QN],        p[B_KN],     p[B_WQA],   p[B_QAN],
                    p[B_WQB],       p[B_WKVA],   p[B_KVAN],  p[B_WKVB],
                    p[B_FFN_NORM],  p[B_W_IN],   p[B_W_OUT], p[B_MOE]};
    return b;
}

/* ----------------------------------------------------------------- create */

/* The attention's scratch, from the scratch region (plan_activations): MLA's projections
 * (forward, decoding and backward), the keys or values transposed, the backward's gradients
 * (none in a model for inference). Disjoint from each other; each is written in a block's
 * attention before that attention reads it, and read nowhere else. */
static void plan_attention(moe_model *m, moe_arena *a) {
    const moe_model_config *c = &m->cfg;
    size_t T = (size_t)m->max_tokens, d = (size_t)c->d, H = (size_t)c->n_heads,
           hq = H * (size_t)m->head_qk, hkv = (size_t)m->kvh * m->head_qk,
           hv = (size_t)m->kvh * m->head_v, ho = H * (size_t)m->head_v;
    size_t mla = c->kv_lora_rank > 0, qr = (size_t)c->q_lora_rank, kr = (size_t)c->kv_lora_rank,
           lat = kr > qr ? kr : qr, Tb = m->inference ? 0 : T;
    m->mla_a = moe_arena_take(a, mla * T * (kr + (size_t)c->qk_rope_dim), sizeof(float));
    m->mla_b = moe_arena_take(a, mla * T * H * (size_t)(c->qk_nope_dim + c->v_head_dim),
                              sizeof(float));
    /* the attention's keys (values) transposed, B * KV * w * (S + at most 31) <= KV * w *
     * (2 T + 32) floats for sequences of 31 or more (shorter ones transpose tile by tile) */
    size_t w = (size_t)(m->head_qk > m->head_v ? m->head_qk : m->head_v);
    m->att_scratch_n = (size_t)m->kvh * w * (2 * T + 32);
    m->att_scratch = moe_arena_take(a, m->att_scratch_n, sizeof(float));
    m->dxm = moe_arena_take(a, Tb * d, sizeof(float));
    m->dq = moe_arena_take(a, Tb * hq, sizeof(float));
    m->dk = moe_arena_take(a, Tb * hkv, sizeof(float));
    m->dv = moe_arena_take(a, Tb * hv, sizeof(float));
    m->datt = moe_arena_take(a, Tb * (ho > hq ? ho : hq), sizeof(float)); /* also norm scratch */
    m->mla_c = moe_arena_take(a, Tb * lat, sizeof(float));
    m->mla_d = moe_arena_take(a, Tb * lat, sizeof(float));
}

static void plan_activations(moe_model *m, moe_arena *a) {
    const moe_model_config *c = &m->cfg;
    size_t T = (size_t)m->max_tokens, d = (size_t)c->d, H = (size_t)c->n_heads,
           hq = H * (size_t)m->head_qk, hkv = (size_t)m->kvh * m->head_qk,
           hv = (size_t)m->kvh * m->head_v, ho = H * (size_t)m->head_v, S = (size_t)c->seq_len, V = (size_t)c->vocab;
    size_t qr = (size_t)c->q_lora_rank, kr = (size_t)c->kv_lora_rank;
    /* probs hold B*S'*S' per head for any (B, S') with B*S' <= T and S' <= seq_len: at most
     * T*min(T, seq_len) floats per head (a model for inference planned for chunks of T tokens
     * shorter than its positions: T*T). */
    size_t probs = (size_t)c->n_heads * T * (T < S ? T : S);
    /* A model for inference keeps nothing of a layer for a backward: every layer computes in
     * one set (a layer reads its input x only before it writes the next layer's). */
    int any_dense = 0;
    for (int l = 0; l < c->n_layers; l++) any_dense |= !moe_model_layer_experts(c, l);
    for (int l = 0; l < (m->inference ? 1 : c->n_layers); l++) {
        block_saved *s = &m->sv[l];
        s->x = moe_arena_take(a, T * d, sizeof(float));
        s->n1 = moe_arena_take(a, T * d, sizeof(float));
        s->rstd1 = moe_arena_take(a, T, sizeof(float));
        s->q = moe_arena_take(a, T * hq, sizeof(float));
        s->k = moe_arena_take(a, T * hkv, sizeof(float));
        s->v = moe_arena_take(a, T * hv, sizeof(float));
        s->qa = moe_arena_take(a, T * qr, sizeof(float));
        s->rqa = moe_arena_take(a, qr ? T : 0, sizeof(float));
        s->qan = moe_arena_take(a, T * qr, sizeof(float));
        s->c = moe_arena_take(a, T * kr, sizeof(float));
        s->rc = moe_arena_take(a, kr ? T : 0, sizeof(float));
        s->cn = moe_arena_take(a, T * kr, sizeof(float));
        size_t qkn = c->qk_norm != 0, hrows = c->qk_norm == MOE_QK_NORM_WHOLE ? 1 : (size_t)c->n_heads;
        s->qp = moe_arena_take(a, qkn * T * hq, sizeof(float));
        s->kp = moe_arena_take(a, qkn * T * hkv, sizeof(float));
        s->rq = moe_arena_take(a, qkn * T * hrows, sizeof(float));
        s->rk = moe_arena_take(a, qkn * T * hrows, sizeof(float));
        s->probs = moe_arena_take(a, probs, sizeof(float));
        s->att = moe_arena_take(a, T * ho, sizeof(float));
        s->xm = moe_arena_take(a, T * d, sizeof(float));
        s->n2 = moe_arena_take(a, T * d, sizeof(float));
        s->rstd2 = moe_arena_take(a, T, sizeof(float));
        if (m->inference ? any_dense : !moe_model_layer_experts(c, l)) {
            s->h = moe_arena_take(a, T * (size_t)m->gf, sizeof(float));
            s->a = moe_arena_take(a, T * (size_t)c->ffn, sizeof(float));
        }
    }
    for (int l = 1; m->inference && l < c->n_layers; l++) m->sv[l] = m->sv[0];
    m->xf = moe_arena_take(a, T * d, sizeof(float));
    m->nf = moe_arena_take(a, T * d, sizeof(float));
    m->rstdf = moe_arena_take(a, T, sizeof(float));
    m->logits = moe_arena_take(a, T * V, sizeof(float));
    size_t Tb = m->inference ? 0 : T; /* the backward's own buffers */
    m->dx = moe_arena_take(a, Tb * d, sizeof(float));
    m->dn = moe_arena_take(a, Tb * d, sizeof(float));
    m->tmp = moe_arena_take(a, T * d, sizeof(float));
    m->row_loss = moe_arena_take(a, T, sizeof(double));
    m->tokens = moe_arena_take(a, T, sizeof(int32_t));
    m->targets = moe_arena_take(a, T, sizeof(int32_t));
    m->pos = moe_arena_take(a, T, sizeof(int32_t));
    m->rope_cs = moe_arena_take(a, S * (size_t)m->rope_dim, sizeof(float));
    /* The scratch region: the FFN's call scratch for all blocks (they run one after another),
     * a MoE layer's (moe_layer_create_shared) or a dense FFN's dh and da (the backward's, also
     * decoding's h and a), and in the same bytes the attention's scratch (plan_attention).
     * A block's attention and its FFN run one after the other, in the forward, decoding and
     * the backward, and each reads only what it wrote itself in the region: the phases hand
     * on their results in buffers outside it (the saved tensors, tmp, dx, dn). So does the
     * backward's head, before the blocks: dlogits. */
    size_t own, call, dense = 0, moe = 0; /* bytes: a dense FFN's dh and da, the largest MoE
                                             layer's call scratch */
    for (int l = 0; l < c->n_layers; l++) {
        if (!moe_model_layer_experts(c, l)) {
            moe_arena h = {NULL, 0, SIZE_MAX};
            moe_arena_take(&h, T * (size_t)m->gf, sizeof(float));
            moe_arena_take(&h, T * (size_t)c->ffn, sizeof(float));
            dense = h.used;
            continue;
        }
        moe_layer_config lc = layer_config(c, l);
        moe_layer_workspace_sizes(&lc, m->max_tokens, &own, &call);
        if (call > moe) moe = call;
    }
    moe_arena att = {NULL, 0, SIZE_MAX}, head = {NULL, 0, SIZE_MAX};
    plan_attention(m, &att);
    moe_arena_take(&head, Tb * V, sizeof(float));
    size_t bytes = dense > moe ? dense : moe;
    bytes = att.used > bytes ? att.used : bytes;
    m->scratch_bytes = head.used > bytes ? head.used : bytes;
    m->scratch = moe_arena_take(a, m->scratch_bytes, 1);
    moe_arena ffn = {m->scratch, 0, m->scratch_bytes};
    m->dh = moe_arena_take(&ffn, dense ? T * (size_t)m->gf : 0, sizeof(float));
    m->da = moe_arena_take(&ffn, dense ? T * (size_t)c->ffn : 0, sizeof(float));
    att = (moe_arena){m->scratch, 0, m->scratch_bytes};
    plan_attention(m, &att);
    head = (moe_arena){m->scratch, 0, m->scratch_bytes};
    m->dlogits = moe_arena_take(&head, Tb * V, sizeof(float));
}

/* Refuses, before anything large is allocated, a model whose parameters, gradients and
 * activations (training needs Adam's two moments on top: moe_trainer_create checks those)
 * do not fit the machine. */
static moe_status check_memory(const moe_model *m, const moe_model_config *cfg, size_t act,
                               int max_tokens) {
    size_t need = act, ws, call; /* act holds the layers' shared call scratch */
    for (int l = 0; l < cfg->n_layers; l++) {
        if (!moe_model_layer_experts(cfg, l)) continue;
        moe_layer_config lc = layer_config(cfg, l);
        moe_layer_workspace_sizes(&lc, max_tokens, &ws, &call);
        need = ws <= SIZE_MAX - need ? need + ws : SIZE_MAX;
    }
    size_t per = m->inference ? 4 : 8; /* bytes per parameter: with its gradient or not */
    need = m->n_params <= (SIZE_MAX - need) / per ? need + per * m->n_params : SIZE_MAX;
    char parts[160];
    snprintf(parts, sizeof parts, "%zu parameters%s, activations for %d tokens", m->n_params,
             m->inference ? "" : " and their gradients", max_tokens);
    return moe_check_memory("the model", need, parts);
}

/* YaRN's magnitude correction 0.1 m ln(factor) + 1 (1 without extension). */
static double yarn_mscale(double factor, double mscale) {
    return factor <= 1 ? 1 : 0.1 * mscale * log(factor) + 1;
}

/* Head widths, RoPE and the score scale from the configuration: rotary over the whole head,
 * or MLA's rotary part; YaRN scales cos and sin by mscale(f, mscale) / mscale(f,
 * mscale_all_dim) (or mscale(f, 1) without both) and, with mscale_all_dim, the scores by
 * mscale(f, mscale_all_dim)^2 (DeepSeek's attention). */
static void attention_setup(moe_model *m) {
    const moe_model_config *c = &m->cfg;
    m->hd = moe_model_head_dim(c);
    moe_model_head_dims(c, &m->head_qk, &m->head_v);
    m->kvh = c->kv_lora_rank ? c->n_heads : c->n_kv_heads;
    m->rope_dim = c->kv_lora_rank ? c->qk_rope_dim : m->head_qk;
    double f = c->rope_factor, ms = c->rope_mscale, all = c->rope_mscale_all_dim;
    m->rope = (moe_rope){.theta = c->rope_theta, .interleave = c->rope_interleave,
                         .factor = c->rope_factor, .orig_max_pos = c->rope_orig_max_pos,
                         .beta_fast = c->rope_beta_fast, .beta_slow = c->rope_beta_slow};
    m->rope.attn_factor = (float)(ms > 0 && all > 0 ? yarn_mscale(f, ms) / yarn_mscale(f, all)
                                                    : yarn_mscale(f, 1));
    double mscale = all > 0 ? yarn_mscale(f, all) : 1;
    m->att_scale = (float)(mscale * mscale / sqrt((double)m->head_qk));
}

static moe_status create(const moe_model_config *cfg, int max_tokens, int inference,
                         moe_model **out) {
    *out = NULL;
    MOE_TRY(moe_model_config_validate(cfg));
    if (max_tokens < 1)
        return moe_set_error(MOE_ERR_INVALID, "max_tokens must be >= 1 (got %d)", max_tokens);
    moe_model *m = calloc(1, sizeof *m);
    if (!m) return moe_set_error(MOE_ERR_NOMEM, "out of memory for the model");
    m->cfg = *cfg;
    m->max_tokens = max_tokens;
    m->inference = inference;
    attention_setup(m);
    m->gf = moe_act_gated(cfg->moe.act) ? 2 * cfg->ffn : cfg->ffn;
    int L = cfg->n_layers;
    moe_status st = MOE_ERR_NOMEM;
    m->block_off = calloc((size_t)L * B_N, sizeof *m->block_off);
    m->moe = calloc((size_t)L, sizeof *m->moe);
    m->sv = calloc((size_t)L, sizeof *m->sv);
    if (!m->block_off || !m->moe || !m->sv) goto fail;
    if ((st = build_tensors(m)) != MOE_OK) goto fail;
    moe_arena plan = {0};
    plan_activations(m, &plan);
    if ((st = check_memory(m, cfg, plan.used, max_tokens)) != MOE_OK) goto fail;
    st = MOE_ERR_NOMEM;
    m->params = moe_alloc(m->n_params, sizeof(float));
    m->grads = inference ? NULL : moe_alloc(m->n_params, sizeof(float));
    if (!m->params || (!m->grads && !inference)) goto fail;
    m->act_mem = moe_alloc(plan.used, 1);
    m->act_bytes = plan.used;
    if (!m->act_mem) goto fail;
    moe_arena a = {m->act_mem, 0, plan.used};
    plan_activations(m, &a);
    moe_rope_table(m->rope_cs, cfg->seq_len, m->rope_dim, &m->rope);
    for (int l = 0; l < L; l++) {
        if (!moe_model_layer_experts(cfg, l)) continue;
        moe_layer_config lc = layer_config(cfg, l);
        size_t off = m->block_off[(size_t)l * B_N + B_MOE];
        st = moe_layer_create_shared(&lc, max_tokens, m->params + off,
                                     inference ? NULL : m->grads + off, inference,
                                     m->scratch, m->scratch_bytes, &m->moe[l]);
        if (st != MOE_OK) goto fail;
    }
    *out = m;
    return MOE_OK;
fail:
    if (st == MOE_ERR_NOMEM && !moe_last_error()[0])
        moe_set_error(MOE_ERR_NOMEM, "out of memory for the model");
    moe_model_destroy(m);
    return st;
}

moe_status moe_model_create(const moe_model_config *cfg, int max_tokens, moe_model **out) {
    return create(cfg, max_tokens, 0, out);
}

moe_status moe_model_create_inference(const moe_model_config *cfg, int max_tokens,
                                      moe_model **out) {
    return create(cfg, max_tokens, 1, out);
}

int moe_model_is_inference(const moe_model *m) { return m->inference; }

void moe_model_destroy(moe_model *m) {
    if (!m) return;
    gpu_release(m);
    free(m->gpu_blocks);
    free(m->gpu_bias);
    for (int l = 0; m->moe && l < m->cfg.n_layers; l++) moe_layer_destroy(m->moe[l]);
    free(m->moe);
    free(m->sv);
    free(m->block_off);
    free(m->tensors);
    moe_free(m->params);
    moe_free(m->grads);
    moe_free(m->act_mem);
    moe_free(m->kcache);
    free(m);
}

const moe_model_config *moe_model_get_config(const moe_model *m) { return &m->cfg; }
size_t moe_model_param_count(const moe_model *m) { return m->n_params; }
/* The parameters may have been written: the layers' kept bf16 copies and the GPU's copy kept
 * for decoding are stale. */
static void params_written(moe_model *m) {
    m->dev_kept = 0;
    for (int l = 0; l < m->cfg.n_layers; l++)
        if (m->moe[l]) moe_layer_weights_changed(m->moe[l]);
}

/* Training on the GPU keeps the newest parameters there: the host's copy is brought up to date
 * when asked for, and then counts as the newer one (the caller may write it). */
float *moe_model_params(moe_model *m) {
    params_written(m); /* the caller may write through the pointer */
    if (m->gpu_train && m->host_stale &&
        moe_cuda_model_params_io(m->gpu, m->params, 0) == MOE_OK)
        m->host_stale = 0;
    if (m->gpu_train && !m->host_stale) m->dev_stale = 1; /* (a failed copy keeps the GPU's) */
    return m->params;
}
float *moe_model_grads(moe_model *m) {
    if (m->gpu_train) moe_cuda_model_grads_io(m->gpu, m->grads, 0); /* a copy, to read */
    return m->grads;
}
void moe_model_zero_grads(moe_model *m) {
    if (m->gpu_train) moe_cuda_model_zero_grads(m->gpu); /* the host's copy is not used */
    else if (m->grads) moe_zero_floats(m->grads, m->n_params);
}
int moe_model_n_tensors(const moe_model *m) { return m->n_tensors; }
const moe_tensor_info *moe_model_tensor(const moe_model *m, int i) {
    return i >= 0 && i < m->n_tensors ? &m->tensors[i] : NULL;
}
moe_layer *moe_model_moe_layer(moe_model *m, int l) {
    return l >= 0 && l < m->cfg.n_layers ? m->moe[l] : NULL;
}
const float *moe_model_logits(const moe_model *m) { return m->logits; }

moe_status moe_model_full_tensors(const moe_model_config *cfg, moe_tensor_info **out, int *n) {
    *out = NULL;
    *n = 0;
    moe_model m;
    memset(&m, 0, sizeof m);
    m.cfg = *cfg;
    m.cfg.moe.ep_size = 1;
    m.cfg.moe.ep_rank = 0;
    attention_setup(&m);
    m.block_off = calloc((size_t)cfg->n_layers * B_N, sizeof *m.block_off);
    if (!m.block_off) return moe_set_error(MOE_ERR_NOMEM, "out of memory for the tensor table");
    moe_status st = build_tensors(&m);
    free(m.block_off);
    if (st != MOE_OK) {
        free(m.tensors);
        return st;
    }
    *out = m.tensors;
    *n = m.n_tensors;
    return MOE_OK;
}

void moe_model_set_comms(moe_model *m, moe_comm *expert, moe_comm *world) {
    for (int l = 0; l < m->cfg.n_layers; l++)
        if (m->moe[l]) moe_layer_set_comms(m->moe[l], expert, world);
}

size_t moe_model_activation_bytes(const moe_model *m) {
    size_t b = m->act_bytes + m->kv_bytes;
    for (int l = 0; l < m->cfg.n_layers; l++)
        if (m->moe[l]) b += moe_layer_workspace_bytes(m->moe[l]);
    return b;
}

/* Norm weights 1, biases 0, other weights normal(0, init_std); the output projections of
 * each block (o_proj, down_proj) use init_std / sqrt(2 L) (Megatron's scaled init). */
void moe_model_init_params(moe_model *m, uint64_t seed) {
    const moe_model_config *c = &m->cfg;
    params_written(m);
    float std_out = c->init_std / sqrtf(2.0f * (float)c->n_layers);
    for (int i = 0; i < m->n_tensors; i++) {
        const moe_tensor_info *t = &m->tensors[i];
        float *p = m->params + t->offset;
        int is_norm = strstr(t->name, "norm.weight") != NULL;
        int is_out = strstr(t->name, "o_proj.weight") || strstr(t->name, "down_proj.weight");
        float std = is_out ? std_out : c->init_std;
        uint64_t h = 1469598103934665603ull; /* by name: the same values in any layout */
        for (const char *s = t->name; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ull;
        uint64_t stream = moe_rng_stream(MOE_RNG_INIT, h, 0, 1);
        if (is_norm)
            for (size_t n = 0; n < t->numel; n++) p[n] = 1.0f;
        else if (strstr(t->name, "mlp.gate.temperature")) /* Tutel's: ln(1 / init_t) */
            p[0] = logf(1.0f / c->moe.cosine_init_t);
        else if (t->no_decay) moe_zero_floats(p, t->numel);
        else moe_rng_normal_floats(seed, stream, 0, t->numel, std, p);
    }
    m->host_stale = 0;
    m->dev_stale = 1;
}

/* ---------------------------------------------------------------- the GPU */

/* Back to the CPU: the GPU model, its pinned buffers. */
static void gpu_release(moe_model *m) {
    if (!m->gpu) return;
    moe_model_gpu_train_end(m);
    m->have_forward = 0;
    moe_cuda_model_destroy(m->gpu);
    moe_cuda_host_unregister(m->params);
    moe_cuda_host_unregister(m->gpu_grads);
    moe_free(m->gpu_grads);
    m->gpu = NULL;
    m->gpu_grads = NULL;
    m->dev_kept = 0;
}

moe_status moe_model_use_device(moe_model *m, const char *device) {
    if (!device) return moe_set_error(MOE_ERR_INVALID, "moe_model_use_device: NULL device");
    if (!strcmp(device, "cpu")) {
        if (m->gpu_train)
            return moe_set_error(MOE_ERR_STATE, "a trainer keeps this model's state on the GPU: "
                                 "destroy it before moving the model to the CPU");
        gpu_release(m);
        return MOE_OK;
    }
    if (strcmp(device, "cuda"))
        return moe_set_error(MOE_ERR_INVALID, "device \"%s\" is not cpu or cuda", device);
    if (m->gpu) return MOE_OK;
    const moe_model_config *c = &m->cfg;
    if (c->moe.ep_size > 1)
        return moe_set_error(MOE_ERR_INVALID, "the CUDA model does not support expert "
                             "parallelism yet");
    int L = c->n_layers;
    if (!m->gpu_blocks) m->gpu_blocks = calloc((size_t)L, sizeof *m->gpu_blocks);
    if (!m->gpu_bias) m->gpu_bias = calloc((size_t)L, sizeof *m->gpu_bias);
    if (!m->gpu_blocks || !m->gpu_bias)
        return moe_set_error(MOE_ERR_NOMEM, "out of memory");
    for (int l = 0; l < L; l++) {
        const size_t *o = m->block_off + (size_t)l * B_N;
        m->gpu_blocks[l] = (moe_cuda_block_plan){o[B_ATTN_NORM], o[B_WQ], o[B_WK], o[B_WV],
                                                 o[B_WO], o[B_FFN_NORM], o[B_W_IN], o[B_W_OUT],
                                                 o[B_MOE],
                                                 m->moe[l] ? moe_layer_get_config(m->moe[l])
                                                           : NULL};
        m->gpu_bias[l] = m->moe[l] ? moe_layer_expert_bias(m->moe[l]) : NULL;
    }
    moe_cuda_model_plan p = {c, m->hd, m->kvh, m->att_scale, m->rope_cs, m->n_params,
                             m->emb_off, m->final_norm_off, m->lm_off, m->gpu_blocks};
    MOE_TRY(moe_cuda_model_create(&p, m->max_tokens, &m->gpu));
    /* the copies of each step through pinned memory (gradients: a model that trains) */
    moe_status s = MOE_OK;
    if (!m->inference) {
        m->gpu_grads = moe_alloc(m->n_params, sizeof(float));
        s = m->gpu_grads ? MOE_OK : moe_set_error(MOE_ERR_NOMEM, "out of memory");
        if (s == MOE_OK) s = moe_cuda_host_register(m->gpu_grads, m->n_params * sizeof(float));
    }
    if (s == MOE_OK) s = moe_cuda_host_register(m->params, m->n_params * sizeof(float));
    if (s != MOE_OK) gpu_release(m); /* (unregistering what was not registered is harmless) */
    return s;
}

/* The parameters a GPU forward copies in: the host's, unless the GPU's are as new. */
static const float *gpu_params_in(moe_model *m) {
    if (m->gpu_train && !m->dev_stale) return NULL;
    m->dev_stale = 0;
    return m->params;
}

moe_status moe_model_gpu_train_begin(moe_model *m) {
    if (!m->gpu) return moe_set_error(MOE_ERR_STATE, "the model is not on a GPU");
    if (m->gpu_train)
        return moe_set_error(MOE_ERR_STATE, "another trainer already trains this model");
    uint8_t *decay = malloc(m->n_params ? m->n_params : 1);
    if (!decay) return moe_set_error(MOE_ERR_NOMEM, "out of memory");
    for (int i = 0; i < m->n_tensors; i++)
        memset(decay + m->tensors[i].offset, !m->tensors[i].no_decay, m->tensors[i].numel);
    moe_status s = moe_cuda_model_optim_init(m->gpu, decay);
    free(decay);
    MOE_TRY(s);
    MOE_TRY(moe_cuda_model_zero_grads(m->gpu));
    m->gpu_train = 1;
    m->dev_stale = 1; /* the host's parameters are the truth until the first forward */
    m->host_stale = 0;
    return MOE_OK;
}

void moe_model_gpu_train_end(moe_model *m) {
    if (!m->gpu_train) return;
    if (m->host_stale && moe_cuda_model_params_io(m->gpu, m->params, 0) == MOE_OK)
        m->host_stale = 0;
    m->gpu_train = 0; /* from here each forward copies the host's parameters in */
}

int moe_model_gpu_training(const moe_model *m) { return m->gpu_train; }
int moe_model_on_gpu(const moe_model *m) { return m->gpu != NULL; }

moe_status moe_model_gpu_grad_sumsq(moe_model *m, double *ss) {
    return moe_cuda_model_grad_sumsq(m->gpu, ss);
}

moe_status moe_model_gpu_set_grad(moe_model *m, size_t i, float v) {
    return moe_cuda_model_set_grad(m->gpu, i, v);
}

moe_status moe_model_gpu_adamw(moe_model *m, float *adam_m, float *adam_v, int state_in,
                               const moe_cuda_adamw *h) {
    if (m->dev_stale) MOE_TRY(moe_cuda_model_params_io(m->gpu, m->params, 1));
    m->dev_stale = 0;
    if (state_in) MOE_TRY(moe_cuda_model_adam_io(m->gpu, adam_m, adam_v, 1));
    MOE_TRY(moe_cuda_model_adamw(m->gpu, h));
    m->host_stale = 1;
    return MOE_OK;
}

moe_status moe_model_gpu_adam_out(moe_model *m, float *adam_m, float *adam_v) {
    return moe_cuda_model_adam_io(m->gpu, adam_m, adam_v, 0);
}

/* Each MoE layer's counts of the last GPU forward, recorded in its CPU layer (the trainer's
 * statistics, the bias update). */
static void gpu_record_stats(moe_model *m, int training) {
    for (int l = 0; l < m->cfg.n_layers; l++)
        if (m->moe[l])
            moe_layer_record_stats(m->moe[l], moe_cuda_model_layer_stats(m->gpu, l), training);
}

/* The forward on the GPU (the tokens are checked and kept in m): the loss and the layers'
 * counts. */
static moe_status gpu_forward(moe_model *m, moe_model_loss *loss) {
    m->dev_kept = 0; /* copied in anew; the caller may write them after */
    MOE_TRY(moe_cuda_model_forward(m->gpu, gpu_params_in(m), m->gpu_bias, m->tokens,
                                   m->has_targets ? m->targets : NULL, m->B, m->S, &m->args,
                                   loss));
    gpu_record_stats(m, m->args.training);
    if (!m->args.training) /* evaluation, generation: moe_model_logits */
        MOE_TRY(moe_cuda_model_logits(m->gpu, m->logits, 0, m->B * m->S));
    m->have_forward = 1;
    return MOE_OK;
}

/* moe_model_decode on the GPU, with the key/value cache there. The parameters are copied in
 * once for a run of decoding calls (until moe_model_params, or a forward, which copies them
 * anew and after which the caller may write them). */
static moe_status gpu_decode(moe_model *m, const int32_t *tokens, int n) {
    const float *params = m->gpu_train ? gpu_params_in(m) : m->dev_kept ? NULL : m->params;
    m->dev_kept = 0;
    MOE_TRY(moe_cuda_model_decode(m->gpu, params, m->gpu_bias, tokens, n, m->cache_len));
    gpu_record_stats(m, 0);
    MOE_TRY(moe_cuda_model_logits(m->gpu, m->logits, 0, n));
    m->dev_kept = !m->gpu_train;
    m->cache_len += n;
    return MOE_OK;
}

/* ---------------------------------------------------------------- forward */

/* qk_norm: q = RMSNorm(qp) * w per head (rows of hd) or over the whole projection; k alike. */
static void qk_norm_rows(const moe_model *m, int T, int *rows_q, int *rows_k, int *width_q,
                         int *width_k) {
    const moe_model_config *c = &m->cfg;
    int whole = c->qk_norm == MOE_QK_NORM_WHOLE;
    *rows_q = whole ? T : T * c->n_heads;
    *rows_k = whole ? T : T * c->n_kv_heads;
    *width_q = whole ? c->n_heads * m->hd : m->hd;
    *width_k = whole ? c->n_kv_heads * m->hd : m->hd;
}

static void qk_norm_forward(const moe_model *m, const block_ptrs *p, int T, float *q,
                            const float *qp, float *rq, float *k, const float *kp, float *rk) {
    int rq_n, rk_n, wq, wk;
    qk_norm_rows(m, T, &rq_n, &rk_n, &wq, &wk);
    moe_rmsnorm_forward(q, rq, qp, p->qn, rq_n, wq, m->cfg.norm_eps);
    moe_rmsnorm_forward(k, rk, kp, p->kn, rk_n, wk, m->cfg.norm_eps);
}

/* dy [rows, width] := the gradient of an RMSNorm's input given its output's (scratch: as
 * large as dy); dw += its weight gradient. */
static void norm_backward_in_place(float *dy, float *scratch, float *dw, const float *x,
                                   const float *w, const float *rstd, int rows, int width) {
    moe_rmsnorm_backward(scratch, NULL, dw, dy, x, w, rstd, rows, width);
    memcpy(dy, scratch, sizeof(float) * (size_t)rows * width);
}

/* q, k, v [T, *] = n1 Wᵀ (+ bias): the attention projections of one block. */
static void project_qkv(const moe_model *m, const block_ptrs *p, const float *n1, int T,
                        float *q, float *k, float *v) {
    const moe_model_config *c = &m->cfg;
    int d = c->d, hq = c->n_heads * m->hd, hkv = c->n_kv_heads * m->hd;
    moe_gemm(0, 1, T, hq, d, 1, n1, d, p->wq, d, 0, q, hq);
    moe_gemm(0, 1, T, hkv, d, 1, n1, d, p->wk, d, 0, k, hkv);
    moe_gemm(0, 1, T, hkv, d, 1, n1, d, p->wv, d, 0, v, hkv);
    if (!p->bq) return;
    float *out[3] = {q, k, v};
    const float *b[3] = {p->bq, p->bk, p->bv};
    int n[3] = {hq, hkv, hkv};
    for (int j = 0; j < 3; j++)
#pragma omp parallel for schedule(static)
        for (int t = 0; t < T; t++)
            for (int i = 0; i < n[j]; i++) out[j][(size_t)t * n[j] + i] += b[j][i];
}

/* The epsilon of MLA's latent RMSNorms (q_a_layernorm, kv_a_layernorm): Hugging Face builds
 * them with RMSNorm's default 1e-6 whatever rms_norm_eps says, and so must we to give its
 * logits (and for our own runs to keep theirs once converted). */
#define MLA_NORM_EPS 1e-6f

/* MLA: q [T, H*dk], k [T, H*dk] and v [T, H*dv] (before RoPE) from s->n1; what backward
 * needs saved in s. Keys: per head [k_nope of the kv_b projection, the rope part shared by
 * the heads]; values: the rest of kv_b. */
static void mla_project(moe_model *m, const block_ptrs *p, block_saved *s, int T, float *q,
                        float *k, float *v) {
    const moe_model_config *c = &m->cfg;
    int d = c->d, H = c->n_heads, qr = c->q_lora_rank, kr = c->kv_lora_rank,
        dn = c->qk_nope_dim, dr = c->qk_rope_dim, dv = c->v_head_dim, dk = dn + dr,
        ka = kr + dr, kb = dn + dv;
    if (qr) {
        moe_gemm(0, 1, T, qr, d, 1, s->n1, d, p->wqa, d, 0, s->qa, qr);
        moe_rmsnorm_forward(s->qan, s->rqa, s->qa, p->qan, T, qr, MLA_NORM_EPS);
        moe_gemm(0, 1, T, H * dk, qr, 1, s->qan, qr, p->wqb, qr, 0, q, H * dk);
    } else {
        moe_gemm(0, 1, T, H * dk, d, 1, s->n1, d, p->wq, d, 0, q, H * dk);
    }
    float *kva = m->mla_a, *kvb = m->mla_b;
    moe_gemm(0, 1, T, ka, d, 1, s->n1, d, p->wkva, d, 0, kva, ka);
    for (int t = 0; t < T; t++)
        memcpy(s->c + (size_t)t * kr, kva + (size_t)t * ka, sizeof(float) * (size_t)kr);
    moe_rmsnorm_forward(s->cn, s->rc, s->c, p->kvan, T, kr, MLA_NORM_EPS);
    moe_gemm(0, 1, T, H * kb, kr, 1, s->cn, kr, p->wkvb, kr, 0, kvb, H * kb);
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++)
        for (int h = 0; h < H; h++) {
            const float *b = kvb + ((size_t)t * H + h) * kb;
            float *kt = k + ((size_t)t * H + h) * dk;
            memcpy(kt, b, sizeof(float) * (size_t)dn);
            memcpy(kt + dn, kva + (size_t)t * ka + kr, sizeof(float) * (size_t)dr);
            memcpy(v + ((size_t)t * H + h) * dv, b + dn, sizeof(float) * (size_t)dv);
        }
}

/* RoPE of q [T, H*dk] and k [T, kvh*dk] at m->pos: the whole head, or MLA's last
 * qk_rope_dim values of each head; dir -1: backward. */
static void rope_qk(const moe_model *m, float *q, float *k, int T, int dir) {
    const moe_model_config *c = &m->cfg;
    int dk = m->head_qk, rd = m->rope_dim;
    moe_rope_rotate(q + dk - rd, T, c->n_heads, dk, rd, m->pos, &m->rope, m->rope_cs, c->seq_len,
                    dir);
    moe_rope_rotate(k + dk - rd, T, m->kvh, dk, rd, m->pos, &m->rope, m->rope_cs, c->seq_len, dir);
}

/* The attention inputs of one block from s->n1: q, k, v after RoPE (saving in s what
 * backward needs). */
static void attn_inputs(moe_model *m, const block_ptrs *p, block_saved *s, int T, float *q,
                        float *k, float *v) {
    if (m->cfg.kv_lora_rank) {
        mla_project(m, p, s, T, q, k, v);
    } else if (p->qn) {
        project_qkv(m, p, s->n1, T, s->qp, s->kp, v);
        qk_norm_forward(m, p, T, q, s->qp, s->rq, k, s->kp, s->rk);
    } else {
        project_qkv(m, p, s->n1, T, q, k, v);
    }
    rope_qk(m, q, k, T, 1);
}

static moe_attn_dims attn_dims(const moe_model *m, int B, int S) {
    moe_attn_dims a = {B, S, m->cfg.n_heads, m->kvh, m->head_qk, m->head_v, m->att_scale};
    return a;
}

/* MLA backward from m->dq, m->dk, m->dv (the gradients of q, k before RoPE, and of v): the
 * weight gradients into g, m->dn = the gradient of s->n1. */
static void mla_backward(moe_model *m, const block_ptrs *p, const block_ptrs *g,
                         const block_saved *s, int T) {
    const moe_model_config *c = &m->cfg;
    int d = c->d, H = c->n_heads, qr = c->q_lora_rank, kr = c->kv_lora_rank,
        dn = c->qk_nope_dim, dr = c->qk_rope_dim, dv = c->v_head_dim, dk = dn + dr,
        ka = kr + dr, kb = dn + dv;
    float *dkva = m->mla_a, *dkvb = m->mla_b;
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++) {
        for (int h = 0; h < H; h++) {
            float *b = dkvb + ((size_t)t * H + h) * kb;
            memcpy(b, m->dk + ((size_t)t * H + h) * dk, sizeof(float) * (size_t)dn);
            memcpy(b + dn, m->dv + ((size_t)t * H + h) * dv, sizeof(float) * (size_t)dv);
        }
        for (int r = 0; r < dr; r++) { /* the shared rope part: summed over the heads */
            float acc = 0;
            for (int h = 0; h < H; h++) acc += m->dk[((size_t)t * H + h) * dk + dn + r];
            dkva[(size_t)t * ka + kr + r] = acc;
        }
    }
    moe_gemm(1, 0, H * kb, kr, T, 1, dkvb, H * kb, s->cn, kr, 1, g->wkvb, kr);
    moe_gemm(0, 0, T, kr, H * kb, 1, dkvb, H * kb, p->wkvb, kr, 0, m->mla_c, kr);
    moe_rmsnorm_backward(m->mla_d, NULL, g->kvan, m->mla_c, s->c, p->kvan, s->rc, T, kr);
    for (int t = 0; t < T; t++)
        memcpy(dkva + (size_t)t * ka, m->mla_d + (size_t)t * kr, sizeof(float) * (size_t)kr);
    moe_gemm(1, 0, ka, d, T, 1, dkva, ka, s->n1, d, 1, g->wkva, d);
    moe_gemm(0, 0, T, d, ka, 1, dkva, ka, p->wkva, d, 0, m->dn, d);
    if (qr) {
        moe_gemm(1, 0, H * dk, qr, T, 1, m->dq, H * dk, s->qan, qr, 1, g->wqb, qr);
        moe_gemm(0, 0, T, qr, H * dk, 1, m->dq, H * dk, p->wqb, qr, 0, m->mla_c, qr);
        moe_rmsnorm_backward(m->mla_d, NULL, g->qan, m->mla_c, s->qa, p->qan, s->rqa, T, qr);
        moe_gemm(1, 0, qr, d, T, 1, m->mla_d, qr, s->n1, d, 1, g->wqa, d);
        moe_gemm(0, 0, T, d, qr, 1, m->mla_d, qr, p->wqa, d, 1, m->dn, d);
    } else {
        moe_gemm(1, 0, H * dk, d, T, 1, m->dq, H * dk, s->n1, d, 1, g->wq, d);
        moe_gemm(0, 0, T, d, H * dk, 1, m->dq, H * dk, p->wq, d, 1, m->dn, d);
    }
}

/* g [n] += the column sums of dy [T, n] (a bias gradient), summed in double. */
static void add_col_sums(float *g, const float *dy, int T, int n) {
#pragma omp parallel for schedule(static)
    for (int i = 0; i < n; i++) {
        double acc = 0;
        for (int t = 0; t < T; t++) acc += dy[(size_t)t * n + i];
        g[i] += (float)acc;
    }
}

/* A phase begins (a block's attention or its FFN, the backward's head: plan_activations):
 * what the scratch region holds is dead. With poison_scratch it becomes NaN, so that a read across phases shows
 * (tests). */
static void scratch_phase(moe_model *m) {
    if (!m->poison_scratch) return;
    float *p = m->scratch;
    for (size_t i = 0; i < m->scratch_bytes / sizeof(float); i++) p[i] = NAN;
}

void moe_model_poison_scratch(moe_model *m, int on) { m->poison_scratch = on; }

const char *moe_model_part_name(moe_model_part p) {
    static const char *names[MOE_PART_COUNT] = {"attention", "attention core", "ffn", "head",
                                                "other"};
    return p >= 0 && p < MOE_PART_COUNT ? names[p] : "?";
}
const double *moe_model_part_times(const moe_model *m) { return &m->part_s[0][0]; }
void moe_model_reset_part_times(moe_model *m) { memset(m->part_s, 0, sizeof m->part_s); }

/* The time since *t to part p of the forward (bwd 0) or backward; *t becomes now. */
static void part_done(moe_model *m, int bwd, moe_model_part p, double *t) {
    double now = moe_time_now();
    m->part_s[bwd][p] += now - *t;
    *t = now;
}

moe_status moe_model_forward(moe_model *m, const int32_t *tokens, const int32_t *targets, int B,
                             int S, const moe_model_args *args, moe_model_loss *loss) {
    const moe_model_config *c = &m->cfg;
    m->have_forward = 0;
    if (!tokens) return moe_set_error(MOE_ERR_INVALID, "model forward: tokens is NULL");
    if (B < 1 || S < 1 || S > c->seq_len || (long long)B * S > m->max_tokens)
        return moe_set_error(MOE_ERR_INVALID,
                             "model forward: batch %d x %d tokens does not fit (sequence length "
                             "<= %d, tokens <= %d)", B, S, c->seq_len, m->max_tokens);
    int T = B * S, d = c->d, V = c->vocab, ho = c->n_heads * m->head_v;
    moe_attn_dims ad = attn_dims(m, B, S);
    for (int t = 0; t < T; t++) {
        if (tokens[t] < 0 || tokens[t] >= V)
            return moe_set_error(MOE_ERR_INVALID, "token %d at position %d is outside the "
                                 "vocabulary [0, %d)", tokens[t], t, V);
        if (targets && targets[t] >= V)
            return moe_set_error(MOE_ERR_INVALID, "target %d at position %d is outside the "
                                 "vocabulary [0, %d)", targets[t], t, V);
        m->tokens[t] = tokens[t];
        m->targets[t] = targets ? (targets[t] < 0 ? -1 : targets[t]) : -1;
        m->pos[t] = t % S;
    }
    m->B = B;
    m->S = S;
    moe_model_args defaults = moe_model_args_default();
    if (!args) args = &defaults;
    m->args = *args;
    m->has_targets = targets != NULL;
    if (m->gpu && args->replay)
        return moe_set_error(MOE_ERR_INVALID, "routing replay runs on the CPU only");
    if (m->gpu) return gpu_forward(m, loss);
    double tp = moe_time_now();
    const float *emb = m->params + m->emb_off;
    float *x = m->sv[0].x;
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++) memcpy(x + (size_t)t * d, emb + (size_t)tokens[t] * d, sizeof(float) * d);
    part_done(m, 0, MOE_PART_OTHER, &tp);
    double aux = 0, z = 0, terms[MOE_LB_GLOBAL_AUX + 1] = {0};
    for (int l = 0; l < c->n_layers; l++) {
        block_saved *s = &m->sv[l];
        block_ptrs p = block(m, m->params, l);
        float *xnext = l + 1 < c->n_layers ? m->sv[l + 1].x : m->xf;
        scratch_phase(m);
        moe_rmsnorm_forward(s->n1, s->rstd1, s->x, p.attn_norm, T, d, c->norm_eps);
        attn_inputs(m, &p, s, T, s->q, s->k, s->v);
        part_done(m, 0, MOE_PART_ATTENTION, &tp);
        moe_attention_forward(s->att, s->probs, s->q, s->k, s->v, &ad, m->att_scratch,
                              m->att_scratch_n);
        part_done(m, 0, MOE_PART_ATTENTION_CORE, &tp);
        moe_copy_floats(s->xm, s->x, (size_t)T * d);
        moe_gemm(0, 1, T, d, ho, 1, s->att, ho, p.wo, ho, 1, s->xm, d);
        part_done(m, 0, MOE_PART_ATTENTION, &tp);
        moe_rmsnorm_forward(s->n2, s->rstd2, s->xm, p.ffn_norm, T, d, c->norm_eps);
        scratch_phase(m);
        if (m->moe[l]) {
            moe_forward_args fa = moe_forward_args_default();
            fa.training = args->training;
            fa.step = args->step;
            fa.loss_scale = args->loss_scale;
            fa.seq_len = S;
            fa.replay = args->replay ? args->replay[l] : NULL;
            MOE_TRY(moe_layer_forward(m->moe[l], m->tmp, s->n2, T, &fa));
            const moe_layer_stats *st = moe_layer_get_stats(m->moe[l]);
            aux += st->aux_loss;
            z += st->z_loss;
            for (int i = 0; i <= MOE_LB_GLOBAL_AUX; i++) terms[i] += st->aux_terms[i];
        } else {
            moe_mlp_forward(c->moe.act, T, d, c->ffn, s->n2, p.w_in, NULL, p.w_out, NULL, NULL,
                            s->h, s->a, m->tmp, NULL, NULL);
        }
        part_done(m, 0, MOE_PART_FFN, &tp);
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < (size_t)T * d; i++) xnext[i] = s->xm[i] + m->tmp[i];
        part_done(m, 0, MOE_PART_OTHER, &tp);
    }
    moe_rmsnorm_forward(m->nf, m->rstdf, m->xf, m->params + m->final_norm_off, T, d,
                        c->norm_eps);
    moe_gemm(0, 1, T, V, d, 1, m->nf, d, m->params + m->lm_off, d, 0, m->logits, V);
    int n = 0;
    double sum = moe_xent_forward_backward(NULL, m->row_loss, m->logits, m->targets, T, V, 0, &n);
    part_done(m, 0, MOE_PART_HEAD, &tp);
    m->n_targets = n;
    if (loss) {
        loss->nll = n ? sum / n : 0;
        loss->aux = aux;
        memcpy(loss->aux_terms, terms, sizeof terms);
        loss->z = z;
        loss->n_targets = n;
    }
    m->have_forward = 1;
    return MOE_OK;
}

/* --------------------------------------------------------------- backward */

moe_status moe_model_backward(moe_model *m) {
    if (!m->have_forward)
        return moe_set_error(MOE_ERR_STATE, "moe_model_backward called without a forward");
    if (m->inference)
        return moe_set_error(MOE_ERR_STATE, "moe_model_backward: the model was created for "
                             "inference (no gradients)");
    const moe_model_config *c = &m->cfg;
    int B = m->B, S = m->S, T = B * S, d = c->d, V = c->vocab, H = c->n_heads,
        hq = H * m->head_qk, hkv = m->kvh * m->head_qk, hv = m->kvh * m->head_v,
        ho = H * m->head_v;
    moe_attn_dims ad = attn_dims(m, B, S);
    m->have_forward = 0;
    if (m->gpu) {
        if (m->gpu_train) { /* the gradients add up on the GPU */
            MOE_TRY(moe_cuda_model_backward(m->gpu, NULL));
        } else {
            MOE_TRY(moe_cuda_model_backward(m->gpu, m->gpu_grads));
            const float *gg = m->gpu_grads;
            float *g = m->grads;
#pragma omp parallel for schedule(static)
            for (size_t i = 0; i < m->n_params; i++) g[i] += gg[i];
        }
        if (m->args.grads_ready) m->args.grads_ready(m->args.grads_ctx, 0);
        return MOE_OK;
    }
    double tp = moe_time_now();
    float *dlogits = m->dlogits;
    int n = 0;
    scratch_phase(m); /* the head's: dlogits */
    float scale = m->n_targets ? m->args.loss_scale / (float)m->n_targets : 0.0f;
    moe_xent_forward_backward(dlogits, m->row_loss, m->logits, m->targets, T, V, scale, &n);
    float *g_lm = m->grads + m->lm_off, *lm = m->params + m->lm_off;
    moe_gemm(1, 0, V, d, T, 1, dlogits, V, m->nf, d, 1, g_lm, d);
    moe_gemm(0, 0, T, d, V, 1, dlogits, V, lm, d, 0, m->dn, d);
    float *dx = m->dx;
    moe_rmsnorm_backward(dx, NULL, m->grads + m->final_norm_off, m->dn, m->xf,
                         m->params + m->final_norm_off, m->rstdf, T, d);
    part_done(m, 1, MOE_PART_HEAD, &tp);
    /* the tensors lie embedding, layers 0..L-1, final norm, head: final from the end on */
    void (*ready)(void *, size_t) = m->args.grads_ready;
    if (ready) ready(m->args.grads_ctx, m->final_norm_off);
    part_done(m, 1, MOE_PART_OTHER, &tp);
    for (int l = c->n_layers - 1; l >= 0; l--) {
        block_saved *s = &m->sv[l];
        block_ptrs p = block(m, m->params, l), g = block(m, m->grads, l);
        /* FFN: x_next = xm + ffn(n2) */
        scratch_phase(m);
        if (m->moe[l]) {
            moe_zero_floats(m->dn, (size_t)T * d);
            MOE_TRY(moe_layer_backward(m->moe[l], m->dn, dx, s->n2));
        } else {
            moe_mlp_backward(c->moe.act, T, d, c->ffn, s->n2, p.w_in, p.w_out, NULL, NULL, 0, s->h,
                             s->a, dx, m->dn, g.w_in, NULL, g.w_out, NULL, NULL, m->dh, m->da,
                             NULL, NULL, MOE_MLP_BWD_ALL);
        }
        scratch_phase(m); /* the attention's backward: its scratch shares the FFN's bytes */
        moe_rmsnorm_backward(m->dxm, dx, g.ffn_norm, m->dn, s->xm, p.ffn_norm, s->rstd2, T, d);
        part_done(m, 1, MOE_PART_FFN, &tp);
        /* attention: xm = x + att Woᵀ */
        moe_gemm(1, 0, d, ho, T, 1, m->dxm, d, s->att, ho, 1, g.wo, ho);
        moe_gemm(0, 0, T, ho, d, 1, m->dxm, d, p.wo, ho, 0, m->datt, ho);
        moe_zero_floats(m->dq, (size_t)T * hq);
        moe_zero_floats(m->dk, (size_t)T * hkv);
        moe_zero_floats(m->dv, (size_t)T * hv);
        part_done(m, 1, MOE_PART_ATTENTION, &tp);
        moe_attention_backward(m->dq, m->dk, m->dv, m->datt, s->probs, s->q, s->k, s->v, &ad,
                               m->att_scratch, m->att_scratch_n);
        part_done(m, 1, MOE_PART_ATTENTION_CORE, &tp);
        rope_qk(m, m->dq, m->dk, T, -1);
        if (c->kv_lora_rank) {
            mla_backward(m, &p, &g, s, T);
            goto attn_norm;
        }
        if (p.qn) { /* through the q and k norms: dq, dk become gradients of qp, kp */
            int rq_n, rk_n, wq, wk;
            qk_norm_rows(m, T, &rq_n, &rk_n, &wq, &wk);
            norm_backward_in_place(m->dq, m->datt, g.qn, s->qp, p.qn, s->rq, rq_n, wq);
            norm_backward_in_place(m->dk, m->datt, g.kn, s->kp, p.kn, s->rk, rk_n, wk);
        }
        if (g.bq) {
            add_col_sums(g.bq, m->dq, T, hq);
            add_col_sums(g.bk, m->dk, T, hkv);
            add_col_sums(g.bv, m->dv, T, hkv);
        }
        moe_gemm(1, 0, hq, d, T, 1, m->dq, hq, s->n1, d, 1, g.wq, d);
        moe_gemm(1, 0, hkv, d, T, 1, m->dk, hkv, s->n1, d, 1, g.wk, d);
        moe_gemm(1, 0, hkv, d, T, 1, m->dv, hkv, s->n1, d, 1, g.wv, d);
        moe_gemm(0, 0, T, d, hq, 1, m->dq, hq, p.wq, d, 0, m->dn, d);
        moe_gemm(0, 0, T, d, hkv, 1, m->dk, hkv, p.wk, d, 1, m->dn, d);
        moe_gemm(0, 0, T, d, hkv, 1, m->dv, hkv, p.wv, d, 1, m->dn, d);
    attn_norm:
        moe_rmsnorm_backward(dx, m->dxm, g.attn_norm, m->dn, s->x, p.attn_norm, s->rstd1, T, d);
        part_done(m, 1, MOE_PART_ATTENTION, &tp);
        if (ready) ready(m->args.grads_ctx, m->block_off[(size_t)l * B_N + B_ATTN_NORM]);
        part_done(m, 1, MOE_PART_OTHER, &tp); /* ready: a data-parallel reduction's start */
    }
    /* embedding rows by token order, the threads on separate column ranges (a token's row
     * takes several tokens' gradients) */
    float *g_emb = m->grads + m->emb_off;
#pragma omp parallel
    {
        int id = omp_get_thread_num(), np = omp_get_num_threads();
        int i0 = (int)((long)d * id / np), i1 = (int)((long)d * (id + 1) / np);
        for (int t = 0; t < T; t++) {
            float *gr = g_emb + (size_t)m->tokens[t] * d;
            const float *dxt = dx + (size_t)t * d;
            for (int i = i0; i < i1; i++) gr[i] += dxt[i];
        }
    }
    if (ready) ready(m->args.grads_ctx, 0);
    part_done(m, 1, MOE_PART_OTHER, &tp);
    return MOE_OK;
}

/* ---------------------------------------------------------------- decoding */

void moe_model_reset_cache(moe_model *m) { m->cache_len = 0; }
int moe_model_cache_len(const moe_model *m) { return m->cache_len; }

size_t moe_model_cache_width(const moe_model *m) {
    return (size_t)m->cfg.n_layers * m->kvh * (size_t)(m->head_qk + m->head_v);
}

/* The key/value cache, by the first decoding call on the CPU: a model that only trains or
 * evaluates never needs it (nor one on the GPU, which keeps its own). */
static moe_status alloc_kv_cache(moe_model *m) {
    if (m->kcache) return MOE_OK;
    const moe_model_config *c = &m->cfg;
    size_t rows = (size_t)c->n_layers * (size_t)c->seq_len, kn = 0, vn = 0, bytes = SIZE_MAX;
    if (!moe_mul_size(rows, (size_t)m->kvh * m->head_qk, &kn) &&
        !moe_mul_size(rows, (size_t)m->kvh * m->head_v, &vn) && kn <= SIZE_MAX - vn)
        moe_mul_size(kn + vn, sizeof(float), &bytes);
    char parts[96];
    snprintf(parts, sizeof parts, "keys and values of %d layers at %d positions", c->n_layers,
             c->seq_len);
    MOE_TRY(moe_check_memory("the key/value cache", bytes, parts));
    m->kcache = moe_alloc(kn + vn, sizeof(float));
    if (!m->kcache) return moe_set_error(MOE_ERR_NOMEM, "out of memory for the key/value cache");
    m->vcache = m->kcache + kn;
    m->kv_bytes = bytes;
    return MOE_OK;
}

moe_status moe_model_decode(moe_model *m, const int32_t *tokens, int n) {
    const moe_model_config *c = &m->cfg;
    int d = c->d, V = c->vocab, ho = c->n_heads * m->head_v, kw = m->kvh * m->head_qk,
        vw = m->kvh * m->head_v, P = m->cache_len;
    m->have_forward = 0;
    if (!tokens) return moe_set_error(MOE_ERR_INVALID, "decode: tokens is NULL");
    if (n < 1 || n > m->max_tokens || P + n > c->seq_len)
        return moe_set_error(MOE_ERR_INVALID, "decode: %d new tokens after %d cached do not fit "
                             "(sequence length %d, tokens per call <= %d)", n, P, c->seq_len,
                             m->max_tokens);
    for (int t = 0; t < n; t++) {
        if (tokens[t] < 0 || tokens[t] >= V)
            return moe_set_error(MOE_ERR_INVALID, "token %d is outside the vocabulary [0, %d)",
                                 tokens[t], V);
        m->pos[t] = P + t;
    }
    if (m->gpu) return gpu_decode(m, tokens, n);
    MOE_TRY(alloc_kv_cache(m));
    const float *emb = m->params + m->emb_off;
    block_saved *s = &m->sv[0]; /* forward buffers reused as scratch */
    float *x = m->xf;
    for (int t = 0; t < n; t++) memcpy(x + (size_t)t * d, emb + (size_t)tokens[t] * d, sizeof(float) * d);
    for (int l = 0; l < c->n_layers; l++) {
        block_ptrs p = block(m, m->params, l);
        float *kc = m->kcache + (size_t)l * c->seq_len * kw, *vc = m->vcache + (size_t)l * c->seq_len * vw;
        scratch_phase(m);
        moe_rmsnorm_forward(s->n1, s->rstd1, x, p.attn_norm, n, d, c->norm_eps);
        attn_inputs(m, &p, s, n, s->q, kc + (size_t)P * kw, vc + (size_t)P * vw);
        moe_attn_dims ad = attn_dims(m, 1, n);
        if (P == 0 && n > 1) /* a prompt: the forward's tiled attention over the new rows */
            moe_attention_forward(s->att, s->probs, s->q, kc, vc, &ad, m->att_scratch,
                                  m->att_scratch_n);
        else moe_attention_cached(s->att, s->q, kc, vc, n, P, &ad);
        moe_gemm(0, 1, n, d, ho, 1, s->att, ho, p.wo, ho, 1, x, d);
        moe_rmsnorm_forward(s->n2, s->rstd2, x, p.ffn_norm, n, d, c->norm_eps);
        scratch_phase(m);
        if (m->moe[l]) {
            moe_forward_args fa = moe_forward_args_default();
            fa.training = 0;
            fa.reuse_bf16 = 1; /* moe_model_params drops the copies */
            MOE_TRY(moe_layer_forward(m->moe[l], m->tmp, s->n2, n, &fa));
        } else {
            moe_mlp_forward(c->moe.act, n, d, c->ffn, s->n2, p.w_in, NULL, p.w_out, NULL, NULL,
                            m->dh, m->da, m->tmp, NULL, NULL);
        }
        for (size_t i = 0; i < (size_t)n * d; i++) x[i] += m->tmp[i];
    }
    moe_rmsnorm_forward(m->nf, m->rstdf, x, m->params + m->final_norm_off, n, d, c->norm_eps);
    moe_gemm(0, 1, n, V, d, 1, m->nf, d, m->params + m->lm_off, d, 0, m->logits, V);
    m->cache_len = P + n;
    return MOE_OK;
}
