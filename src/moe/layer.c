/* The MoE layer: creation (one planned workspace), forward (router → balance → dispatch →
 * experts → combine, shared expert, residual mix) and backward in reverse. */
#include "core/core.h"
#include "dist/comm.h"
#include "kernels/kernels.h"
#include "moe/layer_internal.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Slots and rows one call with T tokens and top-k needs at most, in training or not. */
static void call_sizes(const moe_layer_config *c, int T, int k, size_t *S, size_t *R) {
    size_t E = (size_t)c->n_experts;
    *S = *R = c->router == MOE_ROUTER_EXPERT_CHOICE ? 0 : (size_t)T * k;
    for (int training = 0; training < 2; training++) {
        /* the capacities of T tokens (a call's valid tokens are at most T), as dispatch
         * computes them */
        float cf = moe_capacity_factor(c, training);
        if (c->router == MOE_ROUTER_EXPERT_CHOICE) {
            size_t C = (size_t)moe_expert_choice_capacity(c, cf, T, k);
            if (E * C > *S) *S = *R = E * C;
        } else if (c->pad_to_capacity) {
            size_t C = (size_t)moe_group_capacity(c, cf, T, k);
            if (E * C > *R) *R = E * C;
        }
    }
}

/* Carves the workspace for up to Tm tokens and top-k: from *a what a forward leaves for its
 * backward (the layer's own), from *s the scratch of one call, live only inside one forward or
 * one backward, which layers that never run at the same time can share (arenas without a base
 * only measure). Every scratch buffer is written in a call before that call reads it. */
static void plan_workspace(moe_layer *L, moe_arena *a, moe_arena *s, int Tm, int k) {
    const moe_layer_config *c = &L->cfg;
    moe_fwd_state *st = &L->st;
    size_t T = (size_t)Tm, d = (size_t)c->d, E = (size_t)c->n_experts, f = (size_t)c->ffn;
    size_t gf = moe_act_gated(c->act) ? 2 * f : f;
    size_t fs = (size_t)c->shared_ffn, gs = moe_act_gated(c->act) ? 2 * fs : fs;
    size_t S, R;
    call_sizes(c, Tm, k, &S, &R);
    if (S < T) S = T; /* q doubles as Sinkhorn scratch of T entries */
    int jit = c->jitter_eps > 0;
    /* the backward reads the routed output with the residual mix, the shared expert's output
     * with the residual mix or its gate */
    moe_arena *r_in = c->residual ? a : s, *sh_y_in = c->residual || c->shared_gate ? a : s;
    st->noise = moe_arena_take(a, jit ? T * d : 0, sizeof(float));
    st->xr = moe_arena_take(a, jit ? T * d : 0, sizeof(float));
    st->logits_f = moe_arena_take(s, T * E, sizeof(float));
    st->z = moe_arena_take(a, T * E, sizeof(double));
    st->z0 = moe_arena_take(a, c->lb_type == MOE_LB_LOAD_IMPORTANCE ? T * E : 0, sizeof(double));
    st->p = moe_arena_take(a, T * E, sizeof(double));
    st->key = moe_arena_take(s, T * E, sizeof(double));
    st->q = moe_arena_take(a, S, sizeof(double));
    st->qsum = moe_arena_take(a, T, sizeof(double));
    st->slot_token = moe_arena_take(a, S, sizeof(int32_t));
    st->slot_expert = moe_arena_take(a, S, sizeof(int32_t));
    st->slot_sel = moe_arena_take(a, S, sizeof(int32_t));
    st->slot_w = moe_arena_take(a, S, sizeof(float));
    int keyed = c->drop_policy == MOE_DROP_RANDOM || c->drop_policy == MOE_DROP_PRIORITY;
    st->rts_key = moe_arena_take(a, keyed ? S : 0, sizeof(float));
    st->slot_kept = moe_arena_take(a, S, sizeof(uint8_t));
    st->slot_row = moe_arena_take(a, S, sizeof(int32_t));
    st->tok_off = moe_arena_take(a, T + 1, sizeof(int32_t));
    st->tok_slot = moe_arena_take(a, S, sizeof(int32_t));
    st->counts = moe_arena_take(a, E, sizeof(int64_t));
    st->kept = moe_arena_take(a, E, sizeof(int64_t));
    st->aux_coef = moe_arena_take(a, (T > 2 ? T : 2) * E, sizeof(double));
    st->lse = moe_arena_take(a, T, sizeof(double));
    st->qb_col = moe_arena_take(s, c->quantile_balancing ? T * E : 0, sizeof(double));
    st->expert_off = moe_arena_take(a, E + 1, sizeof(int32_t));
    st->expert_order = moe_arena_take(a, E, sizeof(int32_t));
    st->expert_ready = moe_arena_take(s, E, sizeof(int32_t));
    st->row_slot = moe_arena_take(a, R, sizeof(int32_t));
    st->row_w = moe_arena_take(a, R, sizeof(float));
    st->mask_own = moe_arena_take(a, T, sizeof(uint8_t));
    st->scratch = moe_arena_take(s, 2 * E + 2 + 2 * (S > T ? S : T), sizeof(int32_t));
    st->xp = moe_arena_take(s, R * d, sizeof(float)); /* the backward gathers it again from x */
    st->h = moe_arena_take(a, R * gf, sizeof(float));
    st->a = moe_arena_take(a, R * f, sizeof(float));
    st->y = moe_arena_take(s, R * d, sizeof(float));
    st->dh = moe_arena_take(s, R * gf, sizeof(float));
    st->da = moe_arena_take(s, R * f, sizeof(float));
    st->dw = moe_arena_take(s, S, sizeof(double));
    st->dw_row = moe_arena_take(s, R, sizeof(double));
    st->r = moe_arena_take(r_in, T * d, sizeof(float));
    st->sh_h = moe_arena_take(a, T * gs, sizeof(float));
    st->sh_a = moe_arena_take(a, T * fs, sizeof(float));
    st->sh_y = moe_arena_take(sh_y_in, fs ? T * d : 0, sizeof(float));
    st->sh_g = moe_arena_take(a, c->shared_gate ? T : 0, sizeof(float));
    st->mix_c = moe_arena_take(a, c->residual ? 2 * T : 0, sizeof(float));
    st->sh_dh = moe_arena_take(s, T * gs, sizeof(float));
    st->sh_da = moe_arena_take(s, T * fs, sizeof(float));
    st->dr = moe_arena_take(s, T * d, sizeof(float));
    st->ds = moe_arena_take(s, fs ? T * d : 0, sizeof(float));
    st->dz = moe_arena_take(s, T * E, sizeof(double));
    st->dz_f = moe_arena_take(s, T * E, sizeof(float));
    st->tmp_td = moe_arena_take(s, T * d, sizeof(float));
    st->x64 = moe_arena_take(s, c->router_fp64 ? T * d : 0, sizeof(double));
    size_t P = (size_t)c->cosine_dim;
    st->cos_h = moe_arena_take(a, T * P, sizeof(float));
    st->cos_hn = moe_arena_take(a, P ? T : 0, sizeof(double));
    st->cos_s = moe_arena_take(a, E * P, sizeof(float));
    st->cos_sn = moe_arena_take(a, P ? E : 0, sizeof(double));
    st->cos_dh = moe_arena_take(s, T * P, sizeof(float));
    st->cos_ds = moe_arena_take(s, E * P, sizeof(float));
    st->wg64 = moe_arena_take(a, c->router_fp64 ? E * d : 0, sizeof(double));
    st->dwg64 = moe_arena_take(s, c->router_fp64 ? E * d : 0, sizeof(double));
    size_t b16 = c->expert_bf16 != 0;
    size_t El = E / (size_t)c->ep_size; /* local experts */
    st->w_in16 = moe_arena_take(a, b16 * El * gf * d, sizeof(uint16_t));
    st->w_out16 = moe_arena_take(a, b16 * El * d * f, sizeof(uint16_t));
    st->x16 = moe_arena_take(a, b16 * R * d, sizeof(uint16_t));
    st->a16 = moe_arena_take(a, b16 * R * f, sizeof(uint16_t));
    st->dy16 = moe_arena_take(s, b16 * R * d, sizeof(uint16_t));
    st->dh16 = moe_arena_take(s, b16 * R * gf, sizeof(uint16_t));
    size_t sb = b16 && fs; /* the shared expert's, when it runs in bf16 too */
    st->sh_w_in16 = moe_arena_take(a, sb * gs * d, sizeof(uint16_t));
    st->sh_w_out16 = moe_arena_take(a, sb * d * fs, sizeof(uint16_t));
    st->sh_x16 = moe_arena_take(a, sb * T * d, sizeof(uint16_t));
    st->sh_a16 = moe_arena_take(a, sb * T * fs, sizeof(uint16_t));
    st->sh_dy16 = moe_arena_take(s, sb * T * d, sizeof(uint16_t));
    st->sh_dh16 = moe_arena_take(s, sb * T * gs, sizeof(uint16_t));
}

/* Bytes of the workspace a layer of configuration L->cfg owns and of its call scratch, for up
 * to Tm tokens and top-k (SIZE_MAX when they overflow); L's buffers stay as they were. */
static void workspace_sizes(moe_layer *L, int Tm, int k, size_t *own, size_t *scratch) {
    moe_fwd_state keep = L->st;
    moe_arena a = {NULL, 0, SIZE_MAX}, s = {NULL, 0, SIZE_MAX};
    plan_workspace(L, &a, &s, Tm, k);
    L->st = keep;
    *own = a.used;
    *scratch = s.used;
}

/* The call scratch lies in the shared region where that holds it (a larger per-call top-k may
 * outgrow it), else in the layer's own allocation after the rest of its workspace. */
static moe_status alloc_workspace(moe_layer *L, int k) {
    size_t own, need;
    workspace_sizes(L, L->max_tokens, k, &own, &need);
    int shared = L->shared_scratch && need <= L->shared_scratch_bytes;
    size_t bytes = shared ? own : need <= SIZE_MAX - own ? own + need : SIZE_MAX;
    void *ws = moe_alloc(bytes, 1);
    if (!ws) return MOE_ERR_NOMEM;
    moe_free(L->ws);
    L->ws = ws;
    L->ws_bytes = bytes;
    moe_arena a = {ws, 0, own};
    moe_arena s = {shared ? L->shared_scratch : (char *)ws + own, 0, need};
    plan_workspace(L, &a, &s, L->max_tokens, k);
    L->planned_k = k;
    L->have_forward = 0;
    moe_layer_weights_changed(L); /* the bf16 copies were in the old workspace */
    return MOE_OK;
}

void moe_layer_weights_changed(moe_layer *L) {
    if (L->bf16_kept) memset(L->bf16_kept, 0, (size_t)L->cfg.n_experts + 1);
}

moe_status moe_layer_create_shared(const moe_layer_config *cfg, int max_tokens, float *params,
                                   float *grads, int inference, void *scratch,
                                   size_t scratch_bytes, moe_layer **out) {
    if (!out || !cfg)
        return moe_set_error(MOE_ERR_INVALID, "moe_layer_create: NULL %s", out ? "cfg" : "out");
    *out = NULL;
    MOE_TRY(moe_layer_config_validate(cfg));
    if (max_tokens < 1)
        return moe_set_error(MOE_ERR_INVALID, "max_tokens must be >= 1 (got %d)", max_tokens);
    size_t need, call;
    moe_layer_workspace_sizes(cfg, max_tokens, &need, &call);
    if (!scratch || call > scratch_bytes) need = call <= SIZE_MAX - need ? need + call : SIZE_MAX;
    size_t np = moe_layer_param_count(cfg);
    size_t own = (params == NULL) + (grads == NULL && !inference);
    if (need != SIZE_MAX && np <= (SIZE_MAX - need) / 8) need += own * 4 * np;
    else need = SIZE_MAX;
    MOE_TRY(moe_check_memory("the MoE layer", need, "parameters, gradients, workspace"));
    moe_layer *L = moe_alloc(1, sizeof *L);
    if (!L) return MOE_ERR_NOMEM;
    L->cfg = *cfg;
    L->max_tokens = max_tokens;
    L->shared_scratch = scratch;
    L->shared_scratch_bytes = scratch ? scratch_bytes : 0;
    L->n_params = moe_layer_param_count(cfg);
    L->params = params ? params : moe_alloc(L->n_params, sizeof(float));
    L->own_params = params == NULL;
    L->grads = inference ? NULL : grads ? grads : moe_alloc(L->n_params, sizeof(float));
    L->own_grads = grads == NULL && !inference;
    L->expert_bias = moe_alloc((size_t)cfg->n_experts, sizeof(float));
    L->accum_counts = moe_alloc(2 * (size_t)cfg->n_experts, sizeof(int64_t));
    L->qb_accum = moe_alloc((size_t)cfg->n_experts + 1, sizeof(double));
    L->bf16_kept = moe_alloc((size_t)cfg->n_experts + 1, 1);
    L->bf16_todo = moe_alloc((size_t)cfg->n_experts, sizeof(int));
    if (!L->params || (!L->grads && !inference) || !L->expert_bias || !L->accum_counts ||
        !L->qb_accum ||
        !L->bf16_kept || !L->bf16_todo || alloc_workspace(L, cfg->topk) != MOE_OK) {
        moe_layer_destroy(L);
        return MOE_ERR_NOMEM;
    }
    L->accum_aux_counts = L->accum_counts + cfg->n_experts;
    moe_layer_params_map(cfg, L->params, &L->p);
    if (L->grads) moe_layer_params_map(cfg, L->grads, &L->g);
    *out = L;
    return MOE_OK;
}

moe_status moe_layer_create(const moe_layer_config *cfg, int max_tokens, float *params,
                            float *grads, moe_layer **out) {
    return moe_layer_create_shared(cfg, max_tokens, params, grads, 0, NULL, 0, out);
}

moe_status moe_layer_create_inference(const moe_layer_config *cfg, int max_tokens, float *params,
                                      moe_layer **out) {
    return moe_layer_create_shared(cfg, max_tokens, params, NULL, 1, NULL, 0, out);
}

void moe_layer_destroy(moe_layer *L) {
    if (!L) return;
    if (L->own_params) moe_free(L->params);
    if (L->own_grads) moe_free(L->grads);
    moe_free(L->expert_bias);
    moe_free(L->accum_counts);
    moe_free(L->qb_accum);
    moe_free(L->bf16_kept);
    moe_free(L->bf16_todo);
    moe_ep_free(L);
    moe_free(L->ws);
    moe_free(L);
}

const moe_layer_config *moe_layer_get_config(const moe_layer *L) { return &L->cfg; }
moe_layer_params moe_layer_get_params(moe_layer *L) { return L->p; }
moe_layer_params moe_layer_get_grads(moe_layer *L) { return L->g; }
float *moe_layer_param_data(moe_layer *L) { return L->params; }
float *moe_layer_grad_data(moe_layer *L) { return L->grads; }
float *moe_layer_expert_bias(moe_layer *L) { return L->expert_bias; }
double *moe_layer_qb_accum(moe_layer *L) { return L->qb_accum; }
void moe_layer_zero_grads(moe_layer *L) {
    if (L->grads) moe_zero_floats(L->grads, L->n_params);
}
const moe_layer_stats *moe_layer_get_stats(const moe_layer *L) { return &L->stats; }
const moe_routing *moe_layer_get_routing(const moe_layer *L) { return &L->routing; }

void moe_layer_init_params(moe_layer *L, uint64_t seed, float std) {
    /* Tensors in struct order; biases (b_in, b_out, shared biases, mix_b, cos_proj_b) start
     * at zero, the cosine router's temperature (2) at ln(1 / init_t). */
    static const int is_bias[MOE_N_PARAM_TENSORS] = {0, 0, 1, 0, 1, 0, 1, 0, 1, 0, 0, 1,
                                                     0, 1, 0, 2};
    size_t sizes[MOE_N_PARAM_TENSORS];
    moe_layer_param_sizes(&L->cfg, sizes);
    float *t = L->params;
    for (int i = 0; i < MOE_N_PARAM_TENSORS; i++) {
        uint64_t stream = moe_rng_stream(MOE_RNG_INIT, (uint64_t)L->cfg.layer_id, (uint64_t)i, 0);
        if (is_bias[i] == 2 && sizes[i]) t[0] = logf(1.0f / L->cfg.cosine_init_t);
        else if (is_bias[i]) moe_zero_floats(t, sizes[i]);
        else moe_rng_normal_floats(seed, stream, 0, sizes[i], std, t);
        t += sizes[i];
    }
}

static int token_valid(const moe_fwd_state *st, int t) { return !st->mask || st->mask[t]; }

/* The shared expert's bf16 operands with bf16 experts (its weights converted by the forward),
 * else NULL. */
static const moe_mlp_bf16 *shared_bf16(const moe_layer *L, moe_mlp_bf16 *b) {
    const moe_fwd_state *st = &L->st;
    if (!L->cfg.expert_bf16) return NULL;
    *b = (moe_mlp_bf16){st->sh_w_in16, st->sh_w_out16, st->sh_x16, st->sh_a16, st->sh_dy16,
                        st->sh_dh16};
    return b;
}

static void shared_forward(moe_layer *L, const float *x) {
    const moe_layer_config *c = &L->cfg;
    moe_fwd_state *st = &L->st;
    int T = st->T, d = c->d, fs = c->shared_ffn;
    size_t gs = (size_t)(moe_act_gated(c->act) ? 2 * fs : fs);
    moe_mlp_bf16 b16;
    const moe_mlp_bf16 *b = shared_bf16(L, &b16);
    if (b && !L->bf16_kept[c->n_experts]) {
        moe_f32_to_bf16(L->p.shared_w_in, st->sh_w_in16, gs * (size_t)d);
        moe_f32_to_bf16(L->p.shared_w_out, st->sh_w_out16, (size_t)d * fs);
        L->bf16_kept[c->n_experts] = (uint8_t)st->reuse_bf16;
    }
    moe_mlp_forward(c->act, T, d, fs, x, L->p.shared_w_in, L->p.shared_b_in, L->p.shared_w_out,
                    L->p.shared_b_out, NULL, st->sh_h, st->sh_a, st->sh_y, NULL, b);
    if (c->shared_gate) {
        for (int t = 0; t < T; t++) {
            double s = 0;
            for (int i = 0; i < d; i++) s += (double)x[(size_t)t * d + i] * L->p.shared_gate_w[i];
            st->sh_g[t] = (float)(1.0 / (1.0 + exp(-s)));
        }
    }
    if (c->residual) {
        for (int t = 0; t < T; t++) {
            double m0 = L->p.mix_b[0], m1 = L->p.mix_b[1];
            for (int i = 0; i < d; i++) {
                m0 += (double)x[(size_t)t * d + i] * L->p.mix_w[i];
                m1 += (double)x[(size_t)t * d + i] * L->p.mix_w[d + i];
            }
            double mx = m0 > m1 ? m0 : m1, e0 = exp(m0 - mx), e1 = exp(m1 - mx);
            st->mix_c[2 * t] = (float)(e0 / (e0 + e1));
            st->mix_c[2 * t + 1] = (float)(e1 / (e0 + e1));
        }
    }
}

static void fill_stats(moe_layer *L) {
    moe_fwd_state *st = &L->st;
    moe_layer_stats *s = &L->stats;
    int E = L->cfg.n_experts;
    s->n_experts = E;
    s->topk = st->k;
    s->n_valid = st->Tv;
    s->capacity = st->capacity;
    s->counts = st->counts;
    s->kept = st->kept;
    s->routed = s->dropped = 0;
    for (int e = 0; e < E; e++) {
        s->routed += st->counts[e];
        s->dropped += st->counts[e] - st->kept[e];
    }
    s->dropped_fraction = s->routed ? (double)s->dropped / (double)s->routed : 0;
    s->aux_loss = st->aux_loss;
    memcpy(s->aux_terms, st->aux_terms, sizeof s->aux_terms);
    s->z_loss = st->z_loss;
    s->sinkhorn_iters = st->sinkhorn_iters;
    moe_routing *r = &L->routing;
    r->n_slots = st->n_slots;
    r->token = st->slot_token;
    r->expert = st->slot_expert;
    r->selected = st->slot_sel;
    r->weight = st->slot_w;
    r->kept = st->slot_kept;
}

moe_status moe_layer_check_call(const moe_layer_config *c, int T, int max_tokens,
                                const moe_forward_args *args, int *k_out, int *seq_len_out) {
    if (T < 1 || T > max_tokens)
        return moe_set_error(MOE_ERR_INVALID, "token count %d outside 1..%d (the layer's max_tokens)",
                             T, max_tokens);
    int k = args->topk ? args->topk : c->topk;
    if (k < 1 || k > c->n_experts)
        return moe_set_error(MOE_ERR_INVALID, "per-call topk %d outside 1..num-experts (%d)", k,
                             c->n_experts);
    if (c->n_groups > 1 && k > c->group_topk * (c->n_experts / c->n_groups))
        return moe_set_error(MOE_ERR_INVALID,
                             "per-call topk %d exceeds the experts in %d groups of %d", k,
                             c->group_topk, c->n_experts / c->n_groups);
    if (args->replay && c->router != MOE_ROUTER_TOPK)
        return moe_set_error(MOE_ERR_INVALID, "routing replay is for the topk router");
    for (int t = 0; args->replay && t < T; t++) { /* a valid token's k distinct experts */
        const int32_t *r = args->replay + (size_t)t * k;
        for (int j = 0; (!args->mask || args->mask[t]) && j < k; j++) {
            int dup = 0;
            for (int i = 0; i < j; i++) dup |= r[i] == r[j];
            if (r[j] < 0 || r[j] >= c->n_experts || dup)
                return moe_set_error(MOE_ERR_INVALID, "routing replay: token %d's choice %d is "
                                     "expert %d, not one of %d other than its earlier ones", t,
                                     j, r[j], c->n_experts);
        }
    }
    if (c->quantile_balancing && args->training && k == c->n_experts)
        return moe_set_error(MOE_ERR_INVALID, "quantile balancing: a training call's topk must "
                             "be below num-experts (%d), its quantile needs a (k+1)-th choice",
                             c->n_experts);
    if (c->router == MOE_ROUTER_FAKE_BALANCED && k > c->n_experts - c->fake_skip_first)
        return moe_set_error(MOE_ERR_INVALID, "per-call topk %d exceeds the %d non-skipped experts",
                             k, c->n_experts - c->fake_skip_first);
    int seq_len = args->seq_len ? args->seq_len : T;
    if (seq_len < 1 || T % seq_len != 0)
        return moe_set_error(MOE_ERR_INVALID, "seq_len %d does not divide the token count %d",
                             args->seq_len, T);
    if (!isfinite(args->loss_scale))
        return moe_set_error(MOE_ERR_INVALID, "loss_scale must be finite (got %g)", args->loss_scale);
    /* a capacity of its own: the workspace holds padded rows and expert choice's slots for the
     * config's factors only */
    if (args->capacity_set && (!isfinite(args->capacity_factor) || c->pad_to_capacity ||
                               c->router == MOE_ROUTER_EXPERT_CHOICE))
        return moe_set_error(MOE_ERR_INVALID, "a per-call capacity factor (%g) must be a number, "
                             "and is for token-choice routing without padding to capacity",
                             args->capacity_factor);
    *k_out = k;
    *seq_len_out = seq_len;
    return MOE_OK;
}

typedef struct {
    const moe_layer *L;
    float *out;
} out_ctx;

/* The layer's output of tokens [t0, t1): the routed experts' sum, mixed with the shared
 * expert's when there is one; zero for masked tokens. */
static void output_tokens(void *ctx, int t0, int t1) {
    const out_ctx *a = ctx;
    const moe_layer_config *c = &a->L->cfg;
    const moe_fwd_state *st = &a->L->st;
    int d = c->d;
    for (int t = t0; t < t1; t++) {
        float *o = a->out + (size_t)t * d;
        const float *r = st->r + (size_t)t * d;
        if (!token_valid(st, t)) {
            memset(o, 0, sizeof(float) * (size_t)d);
            continue;
        }
        if (c->shared_ffn == 0) {
            memcpy(o, r, sizeof(float) * (size_t)d);
            continue;
        }
        const float *s = st->sh_y + (size_t)t * d;
        float cr = c->residual ? st->mix_c[2 * t] : 1.0f;
        float cs = c->residual ? st->mix_c[2 * t + 1] : c->shared_gate ? st->sh_g[t] : 1.0f;
        for (int i = 0; i < d; i++) o[i] = cr * r[i] + cs * s[i];
    }
}

moe_status moe_layer_forward(moe_layer *L, float *out, const float *x, int T,
                             const moe_forward_args *args) {
    const moe_layer_config *c = &L->cfg;
    moe_fwd_state *st = &L->st;
    moe_forward_args def = moe_forward_args_default();
    if (!args) args = &def;
    L->have_forward = 0;
    if (!x || !out) return moe_set_error(MOE_ERR_INVALID, "moe_layer_forward: x and out must not be NULL");
    int k, seq_len;
    MOE_TRY(moe_layer_check_call(c, T, L->max_tokens, args, &k, &seq_len));
    /* the CPU's bf16 GEMMs (a model on the GPU never runs this: its layers have their own) */
    if (c->expert_bf16 && !moe_gemm_bf16_available())
        return moe_set_error(MOE_ERR_INVALID, "moe-expert-bf16 needs %s",
                             moe_gemm_dnnl_available()
                                 ? "a CPU with AVX-512 (oneDNN has no bf16 matmul on this one)"
                                 : "oneDNN (libdnnl-dev), which this build lacks");
    if (k > L->planned_k) MOE_TRY(alloc_workspace(L, k));
    if (c->ep_size > 1 && moe_comm_size(L->ep_comm) != c->ep_size)
        return moe_set_error(MOE_ERR_INVALID, "the layer is expert-parallel over %d ranks but its "
                             "expert group has %d (moe_layer_set_comms)", c->ep_size,
                             moe_comm_size(L->ep_comm));
    L->ep_status = MOE_OK;

    st->T = T;
    st->k = k;
    st->seq_len = seq_len;
    st->training = args->training;
    st->cf = args->capacity_set ? args->capacity_factor : moe_capacity_factor(c, args->training);
    st->reuse_bf16 = args->reuse_bf16;
    if (!args->reuse_bf16) moe_layer_weights_changed(L);
    st->loss_scale = args->loss_scale;
    st->step = args->step;
    st->mask = args->mask ? memcpy(st->mask_own, args->mask, (size_t)T) : NULL;
    st->replay = args->replay;
    st->capacity = 0;
    st->xin_orig = x;
    st->Tv = 0;
    for (int t = 0; t < T; t++) st->Tv += token_valid(st, t);

    double t0 = moe_time_now();
    moe_router_logits(L, x);
    MOE_TRY(moe_router_select(L));
    double t1 = moe_time_now();
    moe_balance_forward(L);
    if (st->training) {
        for (int e = 0; e < c->n_experts; e++) L->accum_counts[e] += st->counts[e];
        L->accum_tokens += st->Tv;
        if (c->quantile_balancing && st->Tv > 0) moe_qb_forward(L);
    }
    double t2 = moe_time_now();
    moe_dispatch_plan(L);
    L->stage_s[MOE_STAGE_ROUTER] += t1 - t0;
    L->stage_s[MOE_STAGE_BALANCE] += t2 - t1;
    L->stage_s[MOE_STAGE_PERMUTE] += moe_time_now() - t2;
    MOE_TRY(L->ep_status);
    moe_experts_forward(L);
    MOE_TRY(L->ep_status);
    double t3 = moe_time_now();
    if (c->shared_ffn > 0) shared_forward(L, x);
    double t4 = moe_time_now();
    L->stage_s[MOE_STAGE_SHARED] += t4 - t3;

    out_ctx oc = {L, out};
    moe_for_ranges(T, 2 * (size_t)T * c->d, output_tokens, &oc);
    L->stage_s[MOE_STAGE_COMBINE] += moe_time_now() - t4;
    fill_stats(L);
    L->have_forward = 1;
    return MOE_OK;
}

/* Backward of the shared expert, its gate and the residual mix; fills st->dr. */
static void shared_backward(moe_layer *L, float *dx, const float *dout, const float *x) {
    const moe_layer_config *c = &L->cfg;
    moe_fwd_state *st = &L->st;
    int T = st->T, d = c->d;
    for (int t = 0; t < T; t++) {
        const float *g = dout + (size_t)t * d, *r = st->r + (size_t)t * d, *s = st->sh_y + (size_t)t * d;
        float *dr = st->dr + (size_t)t * d, *ds = st->ds + (size_t)t * d;
        if (!token_valid(st, t)) {
            memset(dr, 0, sizeof(float) * (size_t)d);
            memset(ds, 0, sizeof(float) * (size_t)d);
            continue;
        }
        if (c->residual) {
            float c0 = st->mix_c[2 * t], c1 = st->mix_c[2 * t + 1];
            double dc0 = 0, dc1 = 0;
            for (int i = 0; i < d; i++) {
                dr[i] = c0 * g[i];
                ds[i] = c1 * g[i];
                dc0 += (double)g[i] * r[i];
                dc1 += (double)g[i] * s[i];
            }
            /* c = softmax(m): dm_j = c_j (dc_j - sum_i c_i dc_i). */
            double avg = c0 * dc0 + c1 * dc1, dm0 = c0 * (dc0 - avg), dm1 = c1 * (dc1 - avg);
            for (int i = 0; i < d; i++) {
                L->g.mix_w[i] += (float)(dm0 * x[(size_t)t * d + i]);
                L->g.mix_w[d + i] += (float)(dm1 * x[(size_t)t * d + i]);
                dx[(size_t)t * d + i] += (float)(dm0 * L->p.mix_w[i] + dm1 * L->p.mix_w[d + i]);
            }
            L->g.mix_b[0] += (float)dm0;
            L->g.mix_b[1] += (float)dm1;
        } else if (c->shared_gate) {
            float gt = st->sh_g[t];
            double dgate = 0;
            for (int i = 0; i < d; i++) {
                dr[i] = g[i];
                ds[i] = gt * g[i];
                dgate += (double)g[i] * s[i];
            }
            double dlogit = dgate * gt * (1.0 - gt);
            for (int i = 0; i < d; i++) {
                L->g.shared_gate_w[i] += (float)(dlogit * x[(size_t)t * d + i]);
                dx[(size_t)t * d + i] += (float)(dlogit * L->p.shared_gate_w[i]);
            }
        } else {
            memcpy(dr, g, sizeof(float) * (size_t)d);
            memcpy(ds, g, sizeof(float) * (size_t)d);
        }
    }
    moe_mlp_bf16 b16;
    moe_mlp_backward(c->act, T, d, c->shared_ffn, x, L->p.shared_w_in, L->p.shared_w_out,
                     L->p.shared_b_out, NULL, 0, st->sh_h, st->sh_a, st->ds, st->tmp_td,
                     L->g.shared_w_in, L->g.shared_b_in, L->g.shared_w_out, L->g.shared_b_out,
                     NULL, st->sh_dh, st->sh_da, NULL, shared_bf16(L, &b16), MOE_MLP_BWD_ALL);
    for (size_t i = 0; i < (size_t)T * d; i++) dx[i] += st->tmp_td[i];
}

moe_status moe_layer_backward(moe_layer *L, float *dx, const float *dout, const float *x) {
    const moe_layer_config *c = &L->cfg;
    moe_fwd_state *st = &L->st;
    if (!L->have_forward)
        return moe_set_error(MOE_ERR_STATE, "moe_layer_backward called without a forward "
                             "(or twice for one forward)");
    if (!dx || !dout || !x)
        return moe_set_error(MOE_ERR_INVALID, "moe_layer_backward: dx, dout and x must not be NULL");
    if (!L->grads)
        return moe_set_error(MOE_ERR_STATE, "moe_layer_backward: the layer was created for "
                             "inference (no gradients)");
    double t0 = moe_time_now();
    /* without a shared expert the rows are gathered from dout as it is: a masked token has no
     * rows, so its gradient is never read */
    st->dgrad = dout;
    if (c->shared_ffn > 0) {
        shared_backward(L, dx, dout, x);
        st->dgrad = st->dr;
    }
    L->stage_s[MOE_STAGE_BWD_SHARED] += moe_time_now() - t0;
    moe_experts_backward(L, dx, x);
    MOE_TRY(L->ep_status);
    double t1 = moe_time_now();
    moe_router_backward(L, dx, x);
    L->stage_s[MOE_STAGE_BWD_ROUTER] += moe_time_now() - t1;
    L->have_forward = 0;
    return MOE_OK;
}

void moe_layer_record_stats(moe_layer *L, const moe_layer_stats *s, int training) {
    moe_fwd_state *st = &L->st;
    int E = L->cfg.n_experts;
    memcpy(st->counts, s->counts, sizeof(int64_t) * (size_t)E);
    memcpy(st->kept, s->kept, sizeof(int64_t) * (size_t)E);
    L->stats = *s;
    L->stats.counts = st->counts;
    L->stats.kept = st->kept;
    memset(&L->routing, 0, sizeof L->routing); /* the routing stayed on the GPU */
    L->have_forward = 0;
    if (training) {
        for (int e = 0; e < E; e++) L->accum_counts[e] += s->counts[e];
        L->accum_tokens += s->n_valid;
    }
}

const char *moe_stage_name(moe_stage s) {
    static const char *const names[MOE_STAGE_COUNT] = {
        "router", "balance", "permute", "expert GEMM", "activation", "combine", "shared expert",
        "bwd shared expert", "bwd permute", "bwd expert GEMM", "bwd activation", "bwd router",
        "exchange", "bwd exchange"};
    return s >= 0 && s < MOE_STAGE_COUNT ? names[s] : "?";
}

const double *moe_layer_stage_times(const moe_layer *L) { return L->stage_s; }
void moe_layer_reset_stage_times(moe_layer *L) { memset(L->stage_s, 0, sizeof L->stage_s); }

size_t moe_layer_workspace_bytes(const moe_layer *L) { return L->ws_bytes; }

void moe_layer_set_comms(moe_layer *L, moe_comm *expert, moe_comm *world) {
    L->ep_comm = expert;
    L->world_comm = world;
}

void moe_layer_workspace_sizes(const moe_layer_config *cfg, int max_tokens, size_t *own,
                               size_t *scratch) {
    moe_layer *L = calloc(1, sizeof *L);
    if (!L) {
        *own = *scratch = SIZE_MAX;
        return;
    }
    L->cfg = *cfg;
    workspace_sizes(L, max_tokens, cfg->topk, own, scratch);
    free(L);
}

size_t moe_layer_workspace_estimate(const moe_layer_config *cfg, int max_tokens) {
    size_t own, scratch;
    moe_layer_workspace_sizes(cfg, max_tokens, &own, &scratch);
    return scratch <= SIZE_MAX - own ? own + scratch : SIZE_MAX;
}
