/* The training loop. Batches are a function of (seed, step, micro-batch), so a run is
 * reproducible bitwise at a fixed thread count and resumable from the step number alone. */
#include "train/trainer.h"

#include "model/model_gpu.h"

#include "dist/comm.h"

#include "core/core.h"
#include "kernels/kernels.h"

#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int kind;        /* FAULT_* */
    int first, last; /* steps (1-based) */
} moe_fault_t;

struct moe_trainer {
    moe_model *model;
    moe_train_config cfg;
    moe_blend train, val; /* val.n 0: none */
    int S;
    float *adam_m, *adam_v; /* [n_params] */
    int32_t *tok, *tgt;     /* [micro_batch * S] */
    int64_t *load;          /* expert counts of the last step, layer after layer */
    size_t *load_off;       /* [L] offset of layer l in load */
    int64_t *dropped, *routed; /* [L] slots dropped by capacity / routed in the last step */
    double *tensor_sumsq;      /* [tensors] the gradient norm's squares, tensor by tensor */
    int step;
    moe_dist *dist;  /* NULL: one process */
    struct grad_bucket { /* consecutive tensors reduced together */
        int expert;
        size_t offset, len;
        moe_comm_req *req;
    } *buckets;
    int n_buckets, launched; /* buckets start from the last, as backward completes them */
    moe_status reduce_st;
    int bad_streak; /* consecutive skipped steps */
    int updates;    /* optimizer updates applied: Adam's bias correction counts these, as
                     * torch's AdamW counts its step() calls (a skipped step makes none) */
    int grads_zero; /* the last step's update zeroed the gradients as it read them */
    moe_fault_t faults[16];
    int n_faults;
    int gpu;        /* the model trains on the GPU: parameters, gradients, AdamW there */
    int adam_where; /* gpu: 0 both copies of the moments equal, 1 the host's newer, 2 the GPU's */
};

enum { FAULT_NAN_LOSS, FAULT_INF_LOSS, FAULT_NAN_GRAD, FAULT_INF_GRAD };
static const char *const fault_names[] = {"nan-loss", "inf-loss", "nan-grad", "inf-grad"};

moe_status moe_trainer_set_faults(moe_trainer *t, const char *spec) {
    moe_fault_t faults[16];
    int n_faults = 0;
    const char *p = spec;
    while (*p) {
        MOE_CHECK(n_faults < 16, "inject-fault: at most 16 entries");
        int kind = -1;
        for (int k = 0; k < 4; k++) {
            size_t n = strlen(fault_names[k]);
            if (!strncmp(p, fault_names[k], n) && p[n] == '@') {
                kind = k;
                p += n + 1;
            }
        }
        char *end;
        long a = kind >= 0 ? strtol(p, &end, 10) : -1, b = a;
        if (kind >= 0 && end != p && *end == '-') {
            p = end + 1;
            b = strtol(p, &end, 10);
        }
        MOE_CHECK(kind >= 0 && end != p && a >= 1 && b >= a && b <= 1000000000 &&
                      (*end == ',' || !*end),
                  "inject-fault: '%s' is not a list of KIND@STEP or KIND@FIRST-LAST with KIND one "
                  "of nan-loss, inf-loss, nan-grad, inf-grad", spec);
        faults[n_faults++] = (moe_fault_t){kind, (int)a, (int)b};
        p = *end ? end + 1 : end;
    }
    if (t) memcpy(t->faults, faults, sizeof faults), t->n_faults = n_faults;
    return MOE_OK;
}

/* The injected faults of this step (1-based): into the loss, and the value for the first
 * gradient returned (0: none). */
static float inject_faults(const moe_trainer *t, int step, moe_step_metrics *s) {
    float g0 = 0;
    for (int i = 0; i < t->n_faults; i++) {
        if (step < t->faults[i].first || step > t->faults[i].last) continue;
        float v = t->faults[i].kind == FAULT_NAN_LOSS || t->faults[i].kind == FAULT_NAN_GRAD
                      ? NAN : INFINITY;
        if (t->faults[i].kind <= FAULT_INF_LOSS) s->loss = v;
        else g0 = v;
    }
    return g0;
}

moe_status moe_trainer_check_data(const moe_model_config *mc, const moe_tokens *train,
                                  const moe_tokens *val) {
    int S = mc->seq_len;
    if (train->n_tokens <= S || (val && val->n_tokens <= S))
        return moe_set_error(MOE_ERR_INVALID, "seq-length %d is longer than the data (%lld "
                             "training and %lld validation tokens)", S, (long long)train->n_tokens,
                             (long long)(val ? val->n_tokens : 0));
    if (train->vocab > mc->vocab || (val && val->vocab > mc->vocab))
        return moe_set_error(MOE_ERR_INVALID, "the data's vocabulary (%d) is larger than the "
                             "model's (%d)", train->vocab, mc->vocab);
    return MOE_OK;
}

moe_status moe_trainer_create(moe_model *model, const moe_train_config *cfg,
                              const moe_tokens *train, const moe_tokens *val, moe_trainer **out) {
    moe_blend tb = {1, {train}, {1}}, vb = {val != NULL, {val}, {1}};
    return moe_trainer_create_blend(model, cfg, &tb, val ? &vb : NULL, out);
}

moe_status moe_trainer_create_blend(moe_model *model, const moe_train_config *cfg,
                                    const moe_blend *train, const moe_blend *val,
                                    moe_trainer **out) {
    *out = NULL;
    MOE_TRY(moe_train_config_validate(cfg));
    if (moe_model_is_inference(model))
        return moe_set_error(MOE_ERR_INVALID, "the model was created for inference (no "
                             "gradients): train one made by moe_model_create");
    const moe_model_config *mc = moe_model_get_config(model);
    MOE_TRY(moe_model_config_validate_training(mc));
    int S = mc->seq_len;
    for (int i = 0; i < train->n; i++) MOE_TRY(moe_trainer_check_data(mc, train->sets[i], NULL));
    for (int i = 0; val && i < val->n; i++) MOE_TRY(moe_trainer_check_data(mc, val->sets[i], NULL));
    {   /* the model is allocated: its bytes plus Adam's moments */
        size_t np = moe_model_param_count(model), act = moe_model_activation_bytes(model);
        char parts[160];
        snprintf(parts, sizeof parts, "%zu parameters, gradients, Adam state, activations", np);
        MOE_TRY(moe_check_memory("training", 16 * np + act, parts));
    }
    moe_trainer *t = calloc(1, sizeof *t);
    if (!t) return moe_set_error(MOE_ERR_NOMEM, "out of memory for the trainer");
    t->model = model;
    t->cfg = *cfg;
    t->train = *train;
    if (val) t->val = *val;
    t->S = S;
    size_t n = moe_model_param_count(model);
    t->adam_m = moe_alloc(n, sizeof(float));
    t->adam_v = moe_alloc(n, sizeof(float));
    t->tok = moe_alloc((size_t)cfg->micro_batch * S, sizeof(int32_t));
    t->tgt = moe_alloc((size_t)cfg->micro_batch * S, sizeof(int32_t));
    t->load_off = calloc((size_t)mc->n_layers, sizeof(size_t));
    size_t n_load = 0;
    for (int l = 0; l < mc->n_layers && t->load_off; l++) {
        t->load_off[l] = n_load;
        n_load += (size_t)moe_model_layer_experts(mc, l);
    }
    t->load = moe_alloc(n_load ? n_load : 1, sizeof(int64_t));
    t->dropped = moe_alloc((size_t)mc->n_layers, sizeof(int64_t));
    t->routed = moe_alloc((size_t)mc->n_layers, sizeof(int64_t));
    t->tensor_sumsq = moe_alloc((size_t)moe_model_n_tensors(model), sizeof(double));
    if (!t->adam_m || !t->adam_v || !t->tok || !t->tgt || !t->load_off || !t->load ||
        !t->dropped || !t->routed || !t->tensor_sumsq) {
        moe_trainer_destroy(t);
        return moe_set_error(MOE_ERR_NOMEM, "out of memory for the optimizer state");
    }
    if (moe_model_on_gpu(model)) { /* AdamW's moments (zero, as here) on the GPU too */
        moe_status st = moe_model_gpu_train_begin(model);
        if (st != MOE_OK) {
            moe_trainer_destroy(t);
            return st;
        }
        t->gpu = 1;
    }
    *out = t;
    return MOE_OK;
}

void moe_trainer_destroy(moe_trainer *t) {
    if (!t) return;
    if (t->gpu) moe_model_gpu_train_end(t->model);
    moe_free(t->adam_m);
    moe_free(t->adam_v);
    moe_free(t->tok);
    moe_free(t->tgt);
    moe_free(t->load);
    moe_free(t->dropped);
    moe_free(t->routed);
    moe_free(t->tensor_sumsq);
    free(t->buckets);
    free(t->load_off);
    free(t);
}

int moe_trainer_steps_done(const moe_trainer *t) { return t->step; }
moe_dist *moe_trainer_dist(const moe_trainer *t) { return t->dist; }

/* The data-parallel group: every rank, or with replicated tokens (the expert group shares one
 * batch) the expert-data-parallel group. */
static int replicated(const moe_trainer *t) {
    return moe_model_get_config(t->model)->moe.ep_replicated && t->dist->ep > 1;
}
static moe_comm *data_comm(const moe_trainer *t) {
    return replicated(t) ? t->dist->expert_data : t->dist->world;
}
/* The data-parallel processes of d (NULL or one rank: one), as data_comm's group. */
static int data_procs(const moe_dist *d, int ep_replicated) {
    return !d || d->world_size < 2 ? 1 : ep_replicated && d->ep > 1 ? d->edp : d->world_size;
}
static int data_size(const moe_trainer *t) {
    return data_procs(t->dist, moe_model_get_config(t->model)->moe.ep_replicated);
}
static int data_rank(const moe_trainer *t) {
    return !t->dist ? 0 : replicated(t) ? t->dist->edp_rank : t->dist->world_rank;
}

/* Sums the gradients over the ranks holding the same parameters: dense tensors over every
 * data-parallel rank, a routed expert's over its replicas (the expert-data-parallel group).
 * Consecutive tensors of one kind form buckets of up to 4 Mi floats. In the last micro-batch
 * the backward reports which gradients are final (moe_model_args.grads_ready); each bucket's
 * non-blocking all-reduce starts then and runs while the earlier layers' backward computes. */
static moe_status plan_buckets(moe_trainer *t) {
    moe_model *m = t->model;
    int n = moe_model_n_tensors(m);
    free(t->buckets);
    t->buckets = calloc((size_t)(n > 0 ? n : 1), sizeof *t->buckets);
    if (!t->buckets) return moe_set_error(MOE_ERR_NOMEM, "out of memory for gradient buckets");
    t->n_buckets = 0;
    for (int i = 0; i < n;) {
        const moe_tensor_info *a = moe_model_tensor(m, i);
        size_t len = a->numel;
        int j = i + 1;
        for (; j < n; j++) {
            const moe_tensor_info *b = moe_model_tensor(m, j);
            if (b->expert != a->expert || len + b->numel > ((size_t)4 << 20) ||
                b->offset != a->offset + len)
                break;
            len += b->numel;
        }
        t->buckets[t->n_buckets++] = (struct grad_bucket){a->expert, a->offset, len, NULL};
        i = j;
    }
    return MOE_OK;
}

/* Starts the reduction of every bucket whose gradients all lie at offsets >= from, and moves
 * the ones in flight along. */
static void grads_ready(void *ctx, size_t from) {
    moe_trainer *t = ctx;
    float *g = moe_model_grads(t->model);
    while (t->reduce_st == MOE_OK && t->launched < t->n_buckets) {
        struct grad_bucket *b = &t->buckets[t->n_buckets - 1 - t->launched];
        if (b->offset < from) break;
        t->reduce_st = moe_comm_isum_f32(b->expert ? t->dist->expert_data : data_comm(t),
                                         g + b->offset, b->len, &b->req);
        t->launched++;
    }
    for (int i = t->n_buckets - t->launched; i < t->n_buckets; i++)
        moe_comm_progress(t->buckets[i].req);
}

/* Completes the reduction: starts what backward did not, waits for all. */
static moe_status reduce_grads(moe_trainer *t) {
    grads_ready(t, 0);
    moe_status st = t->reduce_st;
    for (int i = t->n_buckets - t->launched; i < t->n_buckets; i++) {
        moe_status w = moe_comm_wait(t->buckets[i].req);
        t->buckets[i].req = NULL;
        if (st == MOE_OK) st = w;
    }
    t->launched = 0;
    t->reduce_st = MOE_OK;
    return st;
}

moe_status moe_train_check_dp_batch(const moe_train_config *c, int ep_replicated,
                                    const moe_dist *d) {
    int dp = data_procs(d, ep_replicated);
    MOE_CHECK(c->global_batch % (c->micro_batch * dp) == 0,
              "global-batch-size (%d) must be a multiple of micro-batch-size (%d) times the %d "
              "data-parallel processes", c->global_batch, c->micro_batch, dp);
    return MOE_OK;
}

moe_status moe_trainer_set_dist(moe_trainer *t, moe_dist *d) {
    t->dist = NULL;
    MOE_TRY(moe_train_check_dp_batch(&t->cfg, moe_model_get_config(t->model)->moe.ep_replicated,
                                     d));
    t->dist = d && d->world_size > 1 ? d : NULL;
    if (t->dist && t->gpu)
        return moe_set_error(MOE_ERR_INVALID, "data and expert parallelism run on the CPU so far "
                             "(--device cpu)");
    return t->dist ? plan_buckets(t) : MOE_OK;
}

/* Squared gradient norm of the whole model: dense tensors are the same on every rank after the
 * reduction, each expert lives on one rank of every expert group. */
static moe_status grad_sumsq(moe_trainer *t, double *out) {
    moe_model *m = t->model;
    const float *g = moe_model_grads(m);
    int n = moe_model_n_tensors(m);
    double ss[2] = {0, 0}, *sum = t->tensor_sumsq; /* dense, expert */
    /* Each tensor's sum is moe_sum_squares' (the same bits on any thread count), added in
     * tensor order. A tensor short enough to be one group of it is summed by one thread, so
     * those go over the threads together; the long ones split themselves. */
#pragma omp parallel for schedule(dynamic, 1)
    for (int i = 0; i < n; i++) {
        const moe_tensor_info *ti = moe_model_tensor(m, i);
        if (!moe_sum_squares_split(ti->numel)) sum[i] = moe_sum_squares(g + ti->offset, ti->numel);
    }
    for (int i = 0; i < n; i++) {
        const moe_tensor_info *ti = moe_model_tensor(m, i);
        if (moe_sum_squares_split(ti->numel)) sum[i] = moe_sum_squares(g + ti->offset, ti->numel);
        ss[ti->expert] += sum[i];
    }
    if (t->dist) MOE_TRY(moe_comm_sum_f64(t->dist->expert, &ss[1], 1));
    *out = ss[0] + ss[1];
    return MOE_OK;
}

typedef struct {
    moe_model *m;
    float *p, *g, *am, *av;
    float clip, lr, b1, b2, wd, eps, bc1, bc2;
    size_t n_all;
    int parts;
} adamw_args;

/* AdamW over parts [q0, q1) of `parts` equal spans of the parameters. The update zeroes each
 * gradient once it has read it, which saves the next step a pass over all of them (at 407 M
 * parameters, bench/RESULTS.md session 10). */
static void adamw_parts(void *ctx, int q0, int q1) {
    const adamw_args *w = ctx;
    size_t a = w->n_all / (size_t)w->parts * (size_t)q0;
    size_t b = q1 == w->parts ? w->n_all : w->n_all / (size_t)w->parts * (size_t)q1;
    float *p = w->p, *g = w->g, *am = w->am, *av = w->av; /* locals: no reloads in the loop */
    float clip = w->clip, lr = w->lr, b1 = w->b1, b2 = w->b2, wd = w->wd, eps = w->eps;
    float bc1 = w->bc1, bc2 = w->bc2;
    for (int ti = 0; ti < moe_model_n_tensors(w->m); ti++) {
        const moe_tensor_info *info = moe_model_tensor(w->m, ti);
        float decay = info->no_decay ? 0.0f : 1.0f;
        size_t lo = info->offset > a ? info->offset : a;
        size_t hi = info->offset + info->numel < b ? info->offset + info->numel : b;
        for (size_t i = lo; i < hi; i++) {
            float gi = g[i] * clip;
            g[i] = 0;
            am[i] = b1 * am[i] + (1 - b1) * gi;
            av[i] = b2 * av[i] + (1 - b2) * gi * gi;
            float upd = (am[i] / bc1) / (sqrtf(av[i] / bc2) + eps);
            p[i] -= lr * (upd + wd * decay * p[i]);
        }
    }
}

moe_status moe_trainer_step(moe_trainer *t, moe_step_metrics *out) {
    const moe_train_config *c = &t->cfg;
    moe_model *m = t->model;
    int B = c->micro_batch, S = t->S, n_micro = c->global_batch / c->micro_batch;
    int W = data_size(t), rank = data_rank(t);
    if (!t->grads_zero) moe_model_zero_grads(m);
    t->grads_zero = 0;
    moe_model_args args = moe_model_args_default();
    args.training = 1;
    args.step = (uint64_t)t->step;
    args.loss_scale = 1.0f / (float)n_micro; /* the aux and z losses are scaled alike */
    moe_step_metrics s = {0};
    const moe_model_config *mc = moe_model_get_config(m);
    memset(t->dropped, 0, sizeof(int64_t) * (size_t)mc->n_layers);
    memset(t->routed, 0, sizeof(int64_t) * (size_t)mc->n_layers);
    /* rank r runs micro-batches [r n/W, (r+1) n/W) of the global batch */
    int mb_end = (rank + 1) * (n_micro / W);
    for (int mb = rank * (n_micro / W); mb < mb_end; mb++) {
        if (t->dist && mb == mb_end - 1) { /* reduce while the last backward runs */
            args.grads_ready = grads_ready;
            args.grads_ctx = t;
        }
        /* the step's rows by their place in the global batch, as Megatron's: the micro-batch
         * size and the ranks only say who computes which */
        uint64_t stream = moe_rng_stream(MOE_RNG_DATA, 4, (uint64_t)t->step, 0);
        moe_blend_batch(&t->train, (int64_t)mb * B, B, S, c->seed, stream, t->tok, t->tgt);
        moe_model_loss L;
        MOE_TRY(moe_model_forward(m, t->tok, t->tgt, B, S, &args, &L));
        MOE_TRY(moe_model_backward(m));
        for (int l = 0; l < mc->n_layers; l++) {
            moe_layer *ml = moe_model_moe_layer(m, l);
            if (!ml) continue;
            t->dropped[l] += moe_layer_get_stats(ml)->dropped;
            t->routed[l] += moe_layer_get_stats(ml)->routed;
        }
        s.nll += L.nll / n_micro;
        s.aux += L.aux / n_micro;
        for (int i = 0; i <= MOE_LB_GLOBAL_AUX; i++) s.aux_terms[i] += L.aux_terms[i] / n_micro;
        s.z += L.z / n_micro;
        s.tokens += (int64_t)B * S;
    }
    if (t->dist) {
        enum { N = MOE_LB_GLOBAL_AUX + 1 };
        double v[4 + N] = {s.nll, s.aux, s.z, (double)s.tokens};
        memcpy(v + 4, s.aux_terms, sizeof s.aux_terms);
        MOE_TRY(moe_comm_sum_f64(data_comm(t), v, 4 + N));
        s.nll = v[0], s.aux = v[1], s.z = v[2], s.tokens = (int64_t)v[3];
        memcpy(s.aux_terms, v + 4, sizeof s.aux_terms);
        MOE_TRY(moe_comm_sum_i64(data_comm(t), t->dropped, (size_t)mc->n_layers));
        MOE_TRY(moe_comm_sum_i64(data_comm(t), t->routed, (size_t)mc->n_layers));
        for (int l = 0; l < mc->n_layers; l++) { /* balancing counts of the global batch */
            moe_layer *ml = moe_model_moe_layer(m, l);
            if (!ml) continue;
            MOE_TRY(moe_comm_sum_i64(data_comm(t), moe_layer_accum_counts(ml),
                                     (size_t)moe_model_layer_experts(mc, l)));
            MOE_TRY(moe_comm_sum_i64(data_comm(t), moe_layer_accum_tokens(ml), 1));
            if (moe_layer_get_config(ml)->quantile_balancing) /* beta_local: their mean */
                MOE_TRY(moe_comm_sum_f64(data_comm(t), moe_layer_qb_accum(ml),
                                         (size_t)moe_model_layer_experts(mc, l) + 1));
        }
        MOE_TRY(reduce_grads(t));
    }
    s.loss = s.nll + s.aux + s.z;
    float g0 = inject_faults(t, t->step + 1, &s);
    double ss;
    if (t->gpu) {
        if (g0 != 0) MOE_TRY(moe_model_gpu_set_grad(m, 0, g0));
        MOE_TRY(moe_model_gpu_grad_sumsq(m, &ss));
    } else {
        if (g0 != 0) moe_model_grads(m)[0] = g0;
        MOE_TRY(grad_sumsq(t, &ss));
    }
    s.grad_norm = sqrt(ss);
    s.lr = moe_train_lr(c, t->step);
    if (!isfinite(s.grad_norm) || !isfinite(s.loss)) {
        /* Skip: parameters, optimizer state and expert biases stay as they were; the step
         * counter (and with it the data and the schedule) moves on. */
        for (int l = 0; l < mc->n_layers; l++) {
            moe_layer *ml = moe_model_moe_layer(m, l);
            if (!ml) continue;
            *moe_layer_accum_tokens(ml) = 0; /* no bias update from this step's counts */
            moe_layer_qb_accum(ml)[moe_model_layer_experts(mc, l)] = 0;
            moe_layer_step_end(ml);
        }
        t->step++;
        s.skipped = 1;
        s.bad_streak = ++t->bad_streak;
        if (out) *out = s;
        if (t->bad_streak >= c->max_bad_steps)
            return moe_set_error(MOE_ERR_STATE, "%d consecutive steps (the last: step %d) had a "
                                 "loss or gradient that is not finite (loss %g, gradient norm %g); "
                                 "lower lr or check the data", t->bad_streak, t->step, s.loss,
                                 s.grad_norm);
        return MOE_OK;
    }
    t->bad_streak = 0;
    float clip = c->clip_grad > 0 && s.grad_norm > c->clip_grad ? (float)(c->clip_grad / s.grad_norm)
                                                                : 1.0f;
    float lr = (float)s.lr, b1 = c->beta1, b2 = c->beta2, wd = c->weight_decay, eps = c->adam_eps;
    float bc1 = (float)(1.0 - pow(c->beta1, t->updates + 1));
    float bc2 = (float)(1.0 - pow(c->beta2, t->updates + 1));
    float *am = t->adam_m, *av = t->adam_v;
    if (t->gpu) { /* the same update on the GPU */
        moe_cuda_adamw h = {clip, lr, b1, b2, wd, eps, bc1, bc2};
        MOE_TRY(moe_model_gpu_adamw(m, am, av, t->adam_where == 1, &h));
        t->adam_where = 2;
        goto updated;
    }
    /* The tensors tile [0, n): one parallel region over all of it, each thread its share of
     * every tensor it meets (most tensors of a small model are too short to split alone). */
    size_t n_all = moe_model_param_count(m);
    adamw_args w = {m,    moe_model_params(m), moe_model_grads(m), am,  av,  clip, lr, b1,
                    b2,   wd,                  eps,                bc1, bc2, n_all,
                    n_all > 65536 ? moe_num_threads() : 1};
    moe_for_ranges(w.parts, 7 * n_all, adamw_parts, &w);
updated:
    t->updates++;
    t->grads_zero = 1;
    for (int l = 0; l < mc->n_layers; l++) {
        moe_layer *ml = moe_model_moe_layer(m, l);
        if (!ml) continue;
        memcpy(t->load + t->load_off[l], moe_layer_accum_counts(ml),
               sizeof(int64_t) * (size_t)moe_model_layer_experts(mc, l));
        moe_layer_step_end(ml); /* expert-bias update, once per optimizer step */
    }
    t->step++;
    if (out) *out = s;
    return MOE_OK;
}

moe_status moe_trainer_eval(moe_trainer *t, double *val_nll) {
    /* never the training data under the name of validation */
    if (!t->val.n) return moe_set_error(MOE_ERR_INVALID, "no validation data to evaluate on");
    moe_model_args args = moe_model_args_default();
    args.training = 0;
    double sum = 0;
    int W = data_size(t), rank = data_rank(t);
    /* rank r evaluates batches r, r + W, ...; every rank runs as many forwards (expert
     * parallelism exchanges rows in each), the surplus ones uncounted */
    for (int i = rank; i < t->cfg.eval_iters + W - 1 - (t->cfg.eval_iters - 1) % W; i += W) {
        uint64_t stream = moe_rng_stream(MOE_RNG_DATA, 3, (uint64_t)i, 0);
        moe_blend_batch(&t->val, 0, t->cfg.micro_batch, t->S, t->cfg.seed, stream, t->tok,
                        t->tgt);
        moe_model_loss L;
        MOE_TRY(moe_model_forward(t->model, t->tok, t->tgt, t->cfg.micro_batch, t->S, &args, &L));
        if (i < t->cfg.eval_iters) sum += L.nll;
    }
    if (t->dist) MOE_TRY(moe_comm_sum_f64(data_comm(t), &sum, 1));
    *val_nll = sum / t->cfg.eval_iters;
    return MOE_OK;
}

const int64_t *moe_trainer_layer_load(const moe_trainer *t, int l, int *n_experts) {
    const moe_model_config *mc = moe_model_get_config(t->model);
    *n_experts = l >= 0 && l < mc->n_layers ? moe_model_layer_experts(mc, l) : 0;
    return *n_experts ? t->load + t->load_off[l] : NULL;
}

/* On the GPU the moments come back when asked for; the host's copy is then the newer one (the
 * caller may write it: a checkpoint load). */
static void adam_to_host(moe_trainer *t) {
    if (t->gpu && t->adam_where == 2 &&
        moe_model_gpu_adam_out(t->model, t->adam_m, t->adam_v) == MOE_OK)
        t->adam_where = 0;
    if (t->gpu && t->adam_where == 0) t->adam_where = 1; /* (a failed copy keeps the GPU's) */
}
float *moe_trainer_adam_m(moe_trainer *t) {
    adam_to_host(t);
    return t->adam_m;
}
float *moe_trainer_adam_v(moe_trainer *t) {
    adam_to_host(t);
    return t->adam_v;
}
void moe_trainer_set_step(moe_trainer *t, int step) { t->step = step; }
int moe_trainer_bad_streak(const moe_trainer *t) { return t->bad_streak; }
void moe_trainer_set_bad_streak(moe_trainer *t, int n) { t->bad_streak = n; }
int moe_trainer_updates(const moe_trainer *t) { return t->updates; }
void moe_trainer_set_updates(moe_trainer *t, int n) { t->updates = n; }
void moe_trainer_reset_optimizer(moe_trainer *t) {
    size_t n = moe_model_param_count(t->model) * sizeof(float);
    memset(moe_trainer_adam_m(t), 0, n); /* on the host, which is then the newer copy */
    memset(moe_trainer_adam_v(t), 0, n);
    t->updates = 0;
}
const moe_train_config *moe_trainer_config(const moe_trainer *t) { return &t->cfg; }

double moe_trainer_layer_dropped(const moe_trainer *t, int l) {
    return t->routed[l] ? (double)t->dropped[l] / (double)t->routed[l] : 0.0;
}
