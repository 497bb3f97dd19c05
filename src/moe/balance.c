/* Balancing losses: aux loss (micro-batch, per sequence, global batch), z-loss, their
 * gradients w.r.t. the logits, and the aux-loss-free expert-bias update.
 * Semantics and conventions: docs/LAYER.md §5. */
#include "core/core.h"
#include "dist/comm.h"
#include "moe/layer_internal.h"

#include <math.h>
#include <string.h>

static int token_valid(const moe_fwd_state *st, int t) { return !st->mask || st->mask[t]; }

/* Aux-loss scores P[e] of one token from sigmoid-like scores p: normalised over E (+1e-20 as
 * Megatron-Core: scores that all underflow give 0, not NaN). Softmax scores are their own. */
static void aux_scores(int E, const double *p, double *P) {
    double s = 1e-20;
    for (int e = 0; e < E; e++) s += p[e];
    for (int e = 0; e < E; e++) P[e] = p[e] / s;
}

typedef struct {
    moe_fwd_state *st;
    int E, k, soft;
} aux_ctx;

/* Tokens [t0, t1): each valid token's aux-loss scores (softmax ones are st->p as they are,
 * others normalised into st->key) and the top k of them in st->scratch. */
static void aux_tokens(void *ctx, int t0, int t1) {
    const aux_ctx *a = ctx;
    moe_fwd_state *st = a->st;
    int E = a->E, k = a->k;
    const double *P = a->soft ? st->p : st->key;
    for (int t = t0; t < t1; t++) {
        if (!token_valid(st, t)) continue;
        if (!a->soft) aux_scores(E, st->p + (size_t)t * E, st->key + (size_t)t * E);
        /* the top k of the unbiased scores (Megatron's routing map for the aux loss): the
         * expert bias, group limits and random routing change the selection, not this */
        moe_topk_desc(E, P + (size_t)t * E, k, st->scratch + (size_t)t * k);
    }
}

/* ---- Tutel's load_importance_loss (docs/LAYER.md §5) ----
 * Over the call's valid tokens: p0 = the softmax of the logits without the gate noise,
 * Imp_e = sum_t p0[t,e], Load_e = sum_t Phi((p0[t,e] - theta_t) / sigma) with theta_t the k-th
 * chosen noisy logit and sigma = gate_noise / E (Tutel compares the probabilities with that
 * logit, as written), loss = coeff (cv2(Imp) + cv2(Load)) / 2, cv2(x) = var(x) / (mean(x)^2 +
 * 1e-10) with the unbiased variance. */

/* p0 of token t into p0[E]. */
static void clean_softmax(const moe_layer *L, int t, double *p0) {
    int E = L->cfg.n_experts;
    const double *z0 = L->st.z0 + (size_t)t * E;
    double m = -INFINITY, s = 0;
    for (int e = 0; e < E; e++) m = z0[e] > m ? z0[e] : m;
    for (int e = 0; e < E; e++) s += p0[e] = exp(z0[e] - m);
    for (int e = 0; e < E; e++) p0[e] /= s;
}

/* Token t's k-th choice (the selection is in descending order) and theta_t, its noisy logit. */
static int kth_choice(const moe_fwd_state *st, int t) {
    return st->slot_sel[(size_t)t * st->k + st->k - 1];
}
static double kth_logit(const moe_fwd_state *st, int E, int t) {
    return st->z[(size_t)t * E + kth_choice(st, t)];
}

/* cv2(x) and its gradient into g. */
static double cv2(int E, const double *x, double *g) {
    double m = 0, v = 0;
    for (int e = 0; e < E; e++) m += x[e] / E;
    for (int e = 0; e < E; e++) v += (x[e] - m) * (x[e] - m) / (E - 1);
    double den = m * m + 1e-10;
    for (int e = 0; e < E; e++) g[e] = 2 * (x[e] - m) / (E - 1) / den - v * 2 * m / E / (den * den);
    return v / den;
}

typedef struct {
    moe_layer *L;
    int phi; /* 0: p0 into st->key; 1: st->key's p0 to Phi((p0 - theta) / sigma) */
} li_ctx;

static void li_tokens(void *ctx, int t0, int t1) {
    const li_ctx *a = ctx;
    moe_fwd_state *st = &a->L->st;
    int E = a->L->cfg.n_experts;
    double sigma = (double)a->L->cfg.gate_noise / E;
    for (int t = t0; t < t1; t++) {
        if (!token_valid(st, t)) continue; /* (a masked token has no choices) */
        double *v = st->key + (size_t)t * E, theta = kth_logit(st, E, t);
        if (!a->phi) clean_softmax(a->L, t, v);
        for (int e = 0; a->phi && e < E; e++)
            v[e] = 0.5 * erfc(-(v[e] - theta) / sigma / sqrt(2.0));
    }
}

static void load_importance_forward(moe_layer *L) {
    const moe_layer_config *c = &L->cfg;
    moe_fwd_state *st = &L->st;
    int E = c->n_experts;
    double imp[E], load[E];
    for (int e = 0; e < E; e++) imp[e] = load[e] = 0;
    /* the values over the threads, the sums on one in token order: bitwise alike */
    for (int phi = 0; phi < 2; phi++) {
        li_ctx a = {L, phi};
        moe_for_ranges(st->T, 8 * (size_t)st->T * E, li_tokens, &a);
        for (int t = 0; t < st->T; t++)
            for (int e = 0; e < E && token_valid(st, t); e++)
                (phi ? load : imp)[e] += st->key[(size_t)t * E + e];
    }
    double *gi = st->aux_coef, *gl = st->aux_coef + E;
    double loss = cv2(E, imp, gi) + cv2(E, load, gl);
    for (int e = 0; e < E; e++) gi[e] *= c->aux_coeff / 2, gl[e] *= c->aux_coeff / 2;
    st->aux_loss = c->aux_coeff * loss / 2;
}

/* Token t's gradient of the loss into dz (the noise is additive: d/dz of the noisy logits). */
static void load_importance_backward(const moe_layer *L, int t, double ls, double *dz) {
    const moe_layer_config *c = &L->cfg;
    const moe_fwd_state *st = &L->st;
    int E = c->n_experts;
    const double *gi = st->aux_coef, *gl = st->aux_coef + E;
    double p0[E], dp[E], sigma = (double)c->gate_noise / E, dtheta = 0, cross = 0;
    clean_softmax(L, t, p0);
    double theta = kth_logit(st, E, t);
    for (int e = 0; e < E; e++) {
        double u = (p0[e] - theta) / sigma;
        double phi = exp(-0.5 * u * u) / sqrt(2 * 3.14159265358979323846) / sigma; /* Phi' */
        dp[e] = ls * (gi[e] + gl[e] * phi);
        dtheta -= ls * gl[e] * phi;
        cross += p0[e] * dp[e];
    }
    for (int e = 0; e < E; e++) dz[e] += p0[e] * (dp[e] - cross);
    dz[kth_choice(st, t)] += dtheta;
}

float moe_aux_coeff_of(const moe_layer_config *c, moe_lb_type t) {
    if (c->router != MOE_ROUTER_TOPK) return 0;
    return (c->lb_type == t ? c->aux_coeff : 0.0f) + c->aux_coeff_also[t];
}

int moe_aux_on(const moe_layer_config *c) {
    if (c->lb_type == MOE_LB_LOAD_IMPORTANCE)
        return c->router == MOE_ROUTER_TOPK && c->aux_coeff > 0;
    for (int t = MOE_LB_AUX; t <= MOE_LB_GLOBAL_AUX; t++)
        if (moe_aux_coeff_of(c, (moe_lb_type)t) > 0) return 1;
    return 0;
}

/* One Switch-style loss over the tokens [t0, t1) (their scores P and top k choices top), with
 * coefficient coeff, divided by B (the sequences of a per-sequence loss): returns the loss and
 * adds dL/dP[t,e] = coeff * E * f_e / (tv * B) to coef[e]. global: f_e also counts the earlier
 * micro-batches of the step and every rank (a sum over the world, called even without tokens). */
static double switch_loss(moe_layer *L, const double *P, const int32_t *top, int t0, int t1,
                          float coeff, int B, int global, double *coef) {
    const moe_fwd_state *st = &L->st;
    int E = L->cfg.n_experts, k = st->k;
    double Pm[E], cnt[E];
    int64_t tv = 0;
    for (int e = 0; e < E; e++) Pm[e] = cnt[e] = 0;
    for (int t = t0; t < t1; t++) {
        if (!token_valid(st, t)) continue;
        tv++;
        for (int e = 0; e < E; e++) Pm[e] += P[(size_t)t * E + e];
        for (int j = 0; j < k; j++) cnt[top[(size_t)t * k + j]] += 1;
    }
    double denom = (double)k * (double)tv;
    if (global) {
        double g[E + 1];
        for (int e = 0; e < E; e++) g[e] = cnt[e] + (double)L->accum_aux_counts[e];
        g[E] = (double)(L->accum_tokens + tv);
        for (int e = 0; e < E && st->training; e++) L->accum_aux_counts[e] += (int64_t)cnt[e];
        moe_status s = moe_comm_sum_f64(L->world_comm, g, (size_t)E + 1);
        if (s != MOE_OK && L->ep_status == MOE_OK) L->ep_status = s;
        for (int e = 0; e < E; e++) cnt[e] = g[e];
        denom = (double)k * g[E];
    }
    if (tv == 0) return 0;
    /* L_b = coeff * E * sum_e f_e * Pm_e / B; dL/dP[t,e] = coeff * E * f_e / (tv * B). */
    double loss = 0;
    for (int e = 0; e < E; e++) {
        double f = cnt[e] / denom;
        loss += f * Pm[e] / (double)tv;
        coef[e] += coeff * E * f / ((double)tv * B);
    }
    return coeff * E * loss / B;
}

void moe_balance_forward(moe_layer *L) {
    const moe_layer_config *c = &L->cfg;
    moe_fwd_state *st = &L->st;
    int T = st->T, E = c->n_experts, k = st->k;
    st->aux_loss = st->z_loss = 0;
    memset(st->aux_terms, 0, sizeof st->aux_terms);
    int learned = c->router != MOE_ROUTER_FAKE_BALANCED;
    if (c->z_coeff > 0 && learned && st->Tv > 0) {
        double s = 0;
        for (int t = 0; t < T; t++)
            if (token_valid(st, t)) s += st->lse[t] * st->lse[t];
        st->z_loss = c->z_coeff * s / st->Tv;
    }
    st->n_seq = 1;
    if (!moe_aux_on(c)) return;
    if (c->lb_type == MOE_LB_LOAD_IMPORTANCE) {
        if (st->Tv > 0) load_importance_forward(L);
        return;
    }
    float c_mb = moe_aux_coeff_of(c, MOE_LB_AUX), c_seq = moe_aux_coeff_of(c, MOE_LB_SEQ_AUX);
    float c_gl = moe_aux_coeff_of(c, MOE_LB_GLOBAL_AUX);
    /* a global-batch loss sums its counts over the ranks even when this one has no tokens */
    if (st->Tv == 0 && c_gl == 0) return;
    int S = c_seq > 0 ? st->seq_len : T;
    int B = T / S;
    st->n_seq = B;
    /* each valid token's scores P (softmax ones as they are, others normalised into the call
     * scratch st->key) and the top k of them (st->scratch, k per token: the selection is done,
     * the dispatch not begun) over the threads; the sums stay on one thread in token order, so
     * the losses are bitwise those of one thread (bench/RESULTS.md, session 23) */
    int soft = c->score == MOE_SCORE_SOFTMAX;
    const double *P = soft ? st->p : st->key;
    int32_t *top = st->scratch;
    aux_ctx a = {st, E, k, soft};
    moe_for_ranges(T, 2 * (size_t)T * E, aux_tokens, &a);
    /* dL/dP of sequence b's tokens in row b of aux_coef: the per-sequence loss's own, plus the
     * micro-batch's and the global batch's, which are the same for every token */
    memset(st->aux_coef, 0, sizeof(double) * (size_t)B * E);
    for (int b = 0; c_seq > 0 && b < B; b++) {
        double term =
            switch_loss(L, P, top, b * S, (b + 1) * S, c_seq, B, 0, st->aux_coef + (size_t)b * E);
        st->aux_loss += term, st->aux_terms[MOE_LB_SEQ_AUX] += term;
    }
    for (int global = 0; global < 2; global++) {
        float coeff = global ? c_gl : c_mb;
        if (coeff == 0) continue;
        double coef[E];
        for (int e = 0; e < E; e++) coef[e] = 0;
        double term = switch_loss(L, P, top, 0, T, coeff, 1, global, coef);
        st->aux_loss += term, st->aux_terms[global ? MOE_LB_GLOBAL_AUX : MOE_LB_AUX] += term;
        for (int b = 0; b < B; b++)
            for (int e = 0; e < E; e++) st->aux_coef[(size_t)b * E + e] += coef[e];
    }
}

void moe_balance_backward(moe_layer *L) {
    const moe_layer_config *c = &L->cfg;
    moe_fwd_state *st = &L->st;
    int T = st->T, E = c->n_experts;
    int aux = moe_aux_on(c);
    int zl = c->z_coeff > 0 && c->router != MOE_ROUTER_FAKE_BALANCED;
    if (st->Tv == 0 || (!aux && !zl)) return;
    double ls = st->loss_scale;
    int S = T / st->n_seq;
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++) {
        if (!token_valid(st, t)) continue;
        const double *z = st->z + (size_t)t * E, *p = st->p + (size_t)t * E;
        double *dz = st->dz + (size_t)t * E;
        if (aux && c->lb_type == MOE_LB_LOAD_IMPORTANCE) {
            load_importance_backward(L, t, ls, dz);
        } else if (aux) {
            const double *coef = st->aux_coef + (size_t)(t / S) * E;
            double dP[E], dp[E];
            if (c->score == MOE_SCORE_SOFTMAX) {
                for (int e = 0; e < E; e++) dp[e] = ls * coef[e];
            } else {
                /* P_e = p_e / sum(p): dp_e = (dP_e - sum_i dP_i P_i) / sum(p). */
                double sp = 1e-20, cross = 0;
                for (int e = 0; e < E; e++) sp += p[e];
                for (int e = 0; e < E; e++) {
                    dP[e] = ls * coef[e];
                    cross += dP[e] * p[e] / sp;
                }
                for (int e = 0; e < E; e++) dp[e] = (dP[e] - cross) / sp;
            }
            moe_router_score_backward(c->score, E, z, p, dp, dz);
        }
        if (zl) {
            /* d/dz of coeff/Tv * lse^2 = coeff/Tv * 2 lse * softmax(z). */
            double g = ls * c->z_coeff * 2.0 * st->lse[t] / st->Tv;
            for (int e = 0; e < E; e++) dz[e] += g * exp(z[e] - st->lse[t]);
        }
    }
}

/* ---- Megatron's quantile balancing (docs/LAYER.md §5) ----
 * A training call's beta_local: with alpha_t the (k+1)-th largest selection key z[t] + b of
 * token t, expert e's is the (floor(Tv k / E) + 1)-th largest of z[t,e] - alpha_t over the
 * valid tokens, the margin that would give it its share Tv k / E of the choices. */

typedef struct {
    moe_layer *L;
    int rank;      /* 0-based, descending */
    double *beta;  /* [E] */
} qb_ctx;

/* Tokens [t0, t1): their margins into the columns of st->qb_col, -inf for a masked token. */
static void qb_margins(void *ctx, int t0, int t1) {
    const qb_ctx *a = ctx;
    moe_fwd_state *st = &a->L->st;
    int E = a->L->cfg.n_experts, k = st->k, T = st->T;
    const float *b = a->L->expert_bias;
    double key[E];
    int idx[k + 1];
    for (int t = t0; t < t1; t++) {
        const double *z = st->z + (size_t)t * E;
        double alpha = INFINITY; /* a masked token's margins: -inf */
        if (token_valid(st, t)) {
            for (int e = 0; e < E; e++) key[e] = z[e] + b[e];
            moe_topk_desc(E, key, k + 1, idx);
            alpha = key[idx[k]];
        }
        for (int e = 0; e < E; e++) st->qb_col[(size_t)e * T + t] = z[e] - alpha;
    }
}

/* The value at 0-based position r of v[0..n) sorted in descending order (v is reordered). */
static double nth_largest(double *v, int n, int r) {
    int lo = 0, hi = n - 1;
    while (lo < hi) {
        double x = v[lo], y = v[lo + (hi - lo) / 2], w = v[hi]; /* the median of three */
        double pivot = x > y ? (y > w ? y : x > w ? w : x) : (x > w ? x : y > w ? w : y);
        int i = lo, j = hi;
        while (i <= j) {
            while (v[i] > pivot) i++;
            while (v[j] < pivot) j--;
            if (i <= j) {
                double s = v[i];
                v[i++] = v[j];
                v[j--] = s;
            }
        }
        if (r <= j) hi = j;
        else if (r >= i) lo = i;
        else break; /* v[j + 1 .. i) all equal the pivot */
    }
    return v[r];
}

static void qb_columns(void *ctx, int e0, int e1) {
    const qb_ctx *a = ctx;
    int T = a->L->st.T;
    for (int e = e0; e < e1; e++)
        a->beta[e] = nth_largest(a->L->st.qb_col + (size_t)e * T, T, a->rank);
}

void moe_qb_forward(moe_layer *L) {
    moe_fwd_state *st = &L->st;
    int T = st->T, E = L->cfg.n_experts;
    double beta[E];
    /* the rank is below Tv (k < E): never a masked token's -inf */
    qb_ctx a = {L, (int)(st->Tv * st->k / E), beta};
    moe_for_ranges(T, 2 * (size_t)T * E, qb_margins, &a);
    moe_for_ranges(E, 4 * (size_t)T * E, qb_columns, &a);
    for (int e = 0; e < E; e++) L->qb_accum[e] += beta[e];
    L->qb_accum[E] += 1;
}

void moe_layer_step_end(moe_layer *L) {
    const moe_layer_config *c = &L->cfg;
    int E = c->n_experts;
    if (c->quantile_balancing && L->qb_accum[E] > 0) {
        /* beta = -b: the mean of the step's beta_local blended in, then centred */
        double beta[E], mean = 0;
        for (int e = 0; e < E; e++) {
            double local = L->qb_accum[e] / L->qb_accum[E];
            beta[e] = c->qb_ema * -(double)L->expert_bias[e] + (1.0 - c->qb_ema) * local;
            mean += beta[e] / E;
        }
        for (int e = 0; e < E; e++) L->expert_bias[e] = (float)-(beta[e] - mean);
    }
    memset(L->qb_accum, 0, sizeof(double) * ((size_t)E + 1));
    if (c->enable_expert_bias && L->accum_tokens > 0) {
        double mean = 0;
        for (int e = 0; e < E; e++) mean += (double)L->accum_counts[e];
        mean /= E;
        for (int e = 0; e < E; e++) {
            double diff = mean - (double)L->accum_counts[e];
            float sgn = diff > 0 ? 1.0f : diff < 0 ? -1.0f : 0.0f;
            L->expert_bias[e] += c->bias_update_rate * sgn;
        }
    }
    memset(L->accum_counts, 0, sizeof(int64_t) * 2 * (size_t)E); /* and accum_aux_counts */
    L->accum_tokens = 0;
}

int64_t *moe_layer_accum_counts(moe_layer *L) { return L->accum_counts; }
int64_t *moe_layer_accum_tokens(moe_layer *L) { return &L->accum_tokens; }
