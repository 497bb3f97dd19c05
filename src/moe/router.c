/* Router: logits, scores, expert selection (top-k with groups and selection bias, Sinkhorn,
 * expert choice, fake balanced), routing weights, and the backward to the router weights and
 * input. Semantics: docs/LAYER.md §1-4. All arithmetic after the logits GEMM is float64. */
#include "core/core.h"
#include "kernels/kernels.h"
#include "moe/layer_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static double sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }
static double softplus(double x) { return x > 30 ? x : log1p(exp(x)); }

static int token_valid(const moe_fwd_state *st, int t) { return !st->mask || st->mask[t]; }

/* p[0..E) = score(z[0..E)); returns logsumexp(z). The maximum and the sum in 8 interleaved
 * lanes (a single chain waits on the latency of every step), added in a fixed order. */
static double score_row(moe_score_fn fn, int E, const double *z, double *p) {
    double lane[8], m = -INFINITY, s = 0;
    int e = 0;
    for (int l = 0; l < 8; l++) lane[l] = -INFINITY;
    for (; e + 8 <= E; e += 8)
#pragma omp simd
        for (int l = 0; l < 8; l++) lane[l] = z[e + l] > lane[l] ? z[e + l] : lane[l];
    for (; e < E; e++) lane[e & 7] = z[e] > lane[e & 7] ? z[e] : lane[e & 7];
    for (int l = 0; l < 8; l++) m = lane[l] > m ? lane[l] : m;
    for (int l = 0; l < 8; l++) lane[l] = 0;
    for (e = 0; e + 8 <= E; e += 8)
#pragma omp simd
        for (int l = 0; l < 8; l++) lane[l] += p[e + l] = moe_exp_vec64(z[e + l] - m);
    for (; e < E; e++) lane[e & 7] += p[e] = moe_exp_vec64(z[e] - m);
    for (int l = 0; l < 8; l++) s += lane[l];
    double lse = m + log(s), inv = 1.0 / s;
    if (fn == MOE_SCORE_SOFTMAX)
        for (e = 0; e < E; e++) p[e] *= inv;
    else if (fn == MOE_SCORE_SIGMOID)
        for (e = 0; e < E; e++) p[e] = sigmoid(z[e]);
    else
        for (e = 0; e < E; e++) p[e] = sqrt(softplus(z[e]));
    return lse;
}

void moe_topk_desc(int n, const double *key, int k, int *idx) {
    int m = 0;
    double kth = 0; /* the k-th largest so far once there are k */
    for (int e = 0; e < n; e++) {
        if (m == k && e % 8 == 0 && e + 8 <= n) { /* most blocks of 8: none above the k-th */
            int above = 0;
#pragma omp simd reduction(| : above)
            for (int l = 0; l < 8; l++) above |= key[e + l] > kth;
            if (!above) {
                e += 7;
                continue;
            }
        }
        if (m == k && !(key[e] > kth)) continue;
        int pos = m;
        while (pos > 0 && key[e] > key[idx[pos - 1]]) pos--;
        if (pos >= k) continue;
        int last = m < k ? m : k - 1;
        for (int i = last; i > pos; i--) idx[i] = idx[i - 1];
        idx[pos] = e;
        if (m < k) m++;
        kth = key[idx[m - 1]];
    }
}

/* Group-limited routing: keys of all but the group_topk best groups become -inf. */
static void limit_groups(const moe_layer_config *c, int k, double *key) {
    int G = c->n_groups, per = c->n_experts / G;
    int m = c->group_score_topk > 0 ? c->group_score_topk : k / c->group_topk;
    if (m < 1) m = 1;
    if (m > per) m = per;
    double gscore[G];
    int top[m > 0 ? m : 1], keep[G];
    for (int g = 0; g < G; g++) {
        moe_topk_desc(per, key + g * per, m, top);
        double s = 0;
        for (int i = 0; i < m; i++) s += key[g * per + top[i]];
        gscore[g] = s;
    }
    int sel[G];
    moe_topk_desc(G, gscore, c->group_topk, sel);
    memset(keep, 0, sizeof keep);
    for (int i = 0; i < c->group_topk; i++) keep[sel[i]] = 1;
    for (int g = 0; g < G; g++)
        if (!keep[g])
            for (int i = 0; i < per; i++) key[g * per + i] = -INFINITY;
}

typedef struct {
    moe_fwd_state *st;
    size_t E;
} logits_ctx;

/* z = the fp32 logits in float64, tokens [t0, t1) (over the threads; a decoding step's token
 * without a parallel region) */
static void logits_to_z(void *ctx, int t0, int t1) {
    const logits_ctx *a = ctx;
    const float *l = a->st->logits_f;
    for (size_t i = (size_t)t0 * a->E; i < (size_t)t1 * a->E; i++) a->st->z[i] = l[i];
}

/* ---- Tutel's cosine router: z[t,e] = g cos(h_t, s_e), h_t = W_p x_t + b_p, g = exp(min(tau,
 * ln 100)); F.normalize's v / max(|v|, 1e-12) makes the unit vectors. */

#define COS_EPS 1e-12
#define COS_TAU_MAX 4.605170185988091 /* ln 100 */

static double cos_gain(const moe_layer *L) {
    double tau = L->p.cos_temp[0];
    return exp(tau < COS_TAU_MAX ? tau : COS_TAU_MAX);
}

/* rows [r0, r1) of v [., P] to unit length, their norms into n */
static void unit_rows(float *v, double *n, int r0, int r1, int P) {
    for (int r = r0; r < r1; r++) {
        float *x = v + (size_t)r * P;
        double s = 0;
        for (int i = 0; i < P; i++) s += (double)x[i] * x[i];
        n[r] = sqrt(s);
        float inv = (float)(1.0 / (n[r] > COS_EPS ? n[r] : COS_EPS));
        for (int i = 0; i < P; i++) x[i] *= inv;
    }
}

/* the logits of the cosine router into st->logits_f */
static void cosine_logits(moe_layer *L) {
    const moe_layer_config *c = &L->cfg;
    moe_fwd_state *st = &L->st;
    int T = st->T, d = c->d, E = c->n_experts, P = c->cosine_dim;
    moe_gemm(0, 1, T, P, d, 1.0f, st->xin, d, L->p.cos_proj_w, d, 0.0f, st->cos_h, P);
    for (int t = 0; t < T; t++)
        for (int i = 0; i < P; i++) st->cos_h[(size_t)t * P + i] += L->p.cos_proj_b[i];
    unit_rows(st->cos_h, st->cos_hn, 0, T, P);
    memcpy(st->cos_s, L->p.cos_sim, sizeof(float) * (size_t)E * P);
    unit_rows(st->cos_s, st->cos_sn, 0, E, P);
    moe_gemm(0, 1, T, E, P, (float)cos_gain(L), st->cos_h, P, st->cos_s, P, 0.0f, st->logits_f, E);
}

/* rows [0, n) of the gradient dv [n, P] w.r.t. unit vectors u back to the vectors before,
 * norms nv, into dv: (du - u (u . du)) / |v|, or du / eps below eps */
static void unit_rows_backward(float *dv, const float *u, const double *nv, int n, int P) {
    for (int r = 0; r < n; r++) {
        float *g = dv + (size_t)r * P;
        const float *x = u + (size_t)r * P;
        double dot = 0;
        if (nv[r] > COS_EPS)
            for (int i = 0; i < P; i++) dot += (double)x[i] * g[i];
        double inv = 1.0 / (nv[r] > COS_EPS ? nv[r] : COS_EPS);
        for (int i = 0; i < P; i++) g[i] = (float)((g[i] - x[i] * dot) * inv);
    }
}

/* dz_f [T, E] back through the cosine router: the gradients of its four tensors, and dxin
 * into st->tmp_td */
static void cosine_backward(moe_layer *L, const float *xin) {
    const moe_layer_config *c = &L->cfg;
    moe_fwd_state *st = &L->st;
    int T = st->T, d = c->d, E = c->n_experts, P = c->cosine_dim;
    float g = (float)cos_gain(L);
    moe_gemm(0, 0, T, P, E, g, st->dz_f, E, st->cos_s, P, 0.0f, st->cos_dh, P);
    if (L->p.cos_temp[0] < COS_TAU_MAX) {
        /* dz/dtau = g cos (the clamp not holding): sum dz g cos = sum_t h_t . dh_t (unit h_t,
         * dh = g dz s the gradient w.r.t. it) */
        double s = 0;
        for (size_t i = 0; i < (size_t)T * P; i++) s += (double)st->cos_h[i] * st->cos_dh[i];
        L->g.cos_temp[0] += (float)s;
    }
    moe_gemm(1, 0, E, P, T, g, st->dz_f, E, st->cos_h, P, 0.0f, st->cos_ds, P);
    unit_rows_backward(st->cos_dh, st->cos_h, st->cos_hn, T, P);
    unit_rows_backward(st->cos_ds, st->cos_s, st->cos_sn, E, P);
    for (size_t i = 0; i < (size_t)E * P; i++) L->g.cos_sim[i] += st->cos_ds[i];
    for (int t = 0; t < T; t++)
        for (int i = 0; i < P; i++) L->g.cos_proj_b[i] += st->cos_dh[(size_t)t * P + i];
    moe_gemm(1, 0, P, d, T, 1.0f, st->cos_dh, P, xin, d, 1.0f, L->g.cos_proj_w, d);
    moe_gemm(0, 0, T, d, P, 1.0f, st->cos_dh, P, L->p.cos_proj_w, d, 0.0f, st->tmp_td, d);
}

void moe_router_logits(moe_layer *L, const float *x) {
    const moe_layer_config *c = &L->cfg;
    moe_fwd_state *st = &L->st;
    int T = st->T, d = c->d, E = c->n_experts;
    st->xin = x;
    if (st->training && c->jitter_eps > 0) {
        uint64_t stream = moe_rng_stream(MOE_RNG_JITTER, (uint64_t)c->layer_id, st->step, 0);
        float eps = c->jitter_eps;
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < (size_t)T * d; i++) {
            st->noise[i] = 1.0f - eps + 2.0f * eps * moe_rng_uniform(c->seed, stream, i);
            st->xr[i] = x[i] * st->noise[i];
        }
        st->xin = st->xr;
    }
    if (c->router_fp64) {
        for (size_t i = 0; i < (size_t)T * d; i++) st->x64[i] = st->xin[i];
        for (size_t i = 0; i < (size_t)E * d; i++) st->wg64[i] = L->p.router_w[i];
        moe_gemm64(0, 1, T, E, d, 1.0, st->x64, d, st->wg64, d, 0.0, st->z, E);
    } else {
        if (c->cosine_dim) cosine_logits(L);
        else moe_gemm(0, 1, T, E, d, 1.0f, st->xin, d, L->p.router_w, d, 0.0f, st->logits_f, E);
        logits_ctx a = {st, (size_t)E};
        moe_for_ranges(T, 2 * (size_t)T * E, logits_to_z, &a);
    }
    if (c->lb_type == MOE_LB_LOAD_IMPORTANCE) /* its loss reads the logits without the noise */
        memcpy(st->z0, st->z, sizeof(double) * (size_t)T * E);
    if (st->training && c->gate_noise > 0) { /* Tutel's: the logits everywhere are noisy ones */
        uint64_t stream = moe_rng_stream(MOE_RNG_GATE_NOISE, (uint64_t)c->layer_id, st->step, 0);
        double s = (double)c->gate_noise / E; /* noise of logit t E + e: index t E + e */
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < (size_t)T * E; i++)
            st->z[i] += s * moe_rng_normal(c->seed, stream, i);
    }
}

/* Sinkhorn scaling of exp(z) over the valid tokens; writes the balanced keys. */
static int sinkhorn_keys(moe_layer *L, double *key) {
    const moe_layer_config *c = &L->cfg;
    moe_fwd_state *st = &L->st;
    int T = st->T, E = c->n_experts;
    double *d0 = st->q; /* scratch: q has T*k >= T entries and is written after this */
    double d1[E], old[E], colsum[E];
    for (int t = 0; t < T; t++) {
        double m = -INFINITY;
        for (int e = 0; e < E; e++) m = st->z[t * E + e] > m ? st->z[t * E + e] : m;
        for (int e = 0; e < E; e++) key[t * E + e] = token_valid(st, t) ? exp(st->z[t * E + e] - m) : 0;
        d0[t] = 1;
    }
    for (int e = 0; e < E; e++) d1[e] = 1;
    int it = 0;
    double invT = 1.0 / st->Tv, invE = 1.0 / E;
    while (it < c->sinkhorn_max_iter) {
        it++;
        for (int t = 0; t < T; t++) {
            if (!token_valid(st, t)) continue;
            double s = 0;
            for (int e = 0; e < E; e++) s += key[t * E + e] * d1[e];
            d0[t] = invT / (s + 1e-8);
        }
        for (int e = 0; e < E; e++) colsum[e] = 0;
        for (int t = 0; t < T; t++)
            if (token_valid(st, t))
                for (int e = 0; e < E; e++) colsum[e] += d0[t] * key[t * E + e];
        double diff = 0;
        for (int e = 0; e < E; e++) {
            old[e] = d1[e];
            d1[e] = invE / (colsum[e] + 1e-8);
            diff += fabs(d1[e] - old[e]);
        }
        if (diff / E <= c->sinkhorn_tol) break;
    }
    for (int t = 0; t < T; t++)
        for (int e = 0; e < E; e++) key[t * E + e] *= d1[e] * d0[t];
    return it;
}

static void count_slot(moe_fwd_state *st, int s) {
    if (st->slot_expert[s] >= 0) st->counts[st->slot_expert[s]]++;
}

/* What select_token_choice's tokens share. */
typedef struct {
    moe_layer *L;
    int sinkhorn, fake, A;
    uint64_t fstream, rstream, gstream;
    const double *gnoise;
    double rthr;
    const int32_t *vpos;
} select_ctx;

/* Tokens [t0, t1) of select_token_choice: scores, selection, routing weights. */
static void select_tokens(void *ctx, int t0, int t1) {
    const select_ctx *a = ctx;
    moe_layer *L = a->L;
    const moe_layer_config *c = &L->cfg;
    moe_fwd_state *st = &L->st;
    int E = c->n_experts, k = st->k, sinkhorn = a->sinkhorn, fake = a->fake, A = a->A;
    uint64_t fstream = a->fstream, rstream = a->rstream;
    int sample2 = c->sample_second && st->training && k == 2;
    int sample1 = c->sample_first && st->training && k == 1;
    const double *gnoise = a->gnoise;
    double rthr = a->rthr;
    const int32_t *vpos = a->vpos;
    for (int t = t0; t < t1; t++) {
        const double *z = st->z + (size_t)t * E;
        double *p = st->p + (size_t)t * E;
        double *key = st->key + (size_t)t * E;
        int idx[k];
        for (int j = 0; j < k; j++) {
            int s = t * k + j;
            st->slot_token[s] = t;
            st->slot_expert[s] = st->slot_sel[s] = -1;
            st->slot_w[s] = 0;
            st->q[s] = 0;
        }
        st->lse[t] = score_row(st->wscore, E, z, p);
        st->qsum[t] = 1;
        if (!token_valid(st, t)) continue;
        if (fake) {
            int64_t n = vpos[t];
            double r[k], rs = 0;
            if (c->fake_noise > 0) {
                for (int a = 0; a < A; a++)
                    key[a] = moe_rng_uniform64(c->seed, fstream, (uint64_t)(1 + n) * A + a) +
                             0.1 * c->fake_noise * gnoise[a];
                moe_topk_desc(A, key, k, idx);
                for (int j = 0; j < k; j++) {
                    r[j] = moe_rng_uniform64(c->seed, fstream, (1ULL << 40) + (uint64_t)n * k + j);
                    rs += r[j];
                }
            }
            for (int j = 0; j < k; j++) {
                int s = t * k + j;
                int e = c->fake_noise > 0 ? idx[j] : (int)((n * k + j) % A);
                double w = c->fake_noise > 0
                               ? (1.0 - c->fake_noise) / k + c->fake_noise * r[j] / rs
                               : 1.0 / k;
                st->slot_expert[s] = st->slot_sel[s] = e + c->fake_skip_first;
                st->q[s] = w;
                st->slot_w[s] = (float)(w * c->route_scale);
            }
            continue;
        }
        /* the selection keys: the logits or the scores as they are, copied only to be changed */
        const double *keys = key;
        if (!sinkhorn) {
            keys = st->wmode == MOE_WMODE_SOFTMAX_K || c->router == MOE_ROUTER_SINKHORN ? z : p;
            if (c->enable_expert_bias || c->quantile_balancing || c->n_groups > 1) {
                for (int e = 0; e < E; e++)
                    key[e] = c->enable_expert_bias   ? p[e] + L->expert_bias[e]
                             : c->quantile_balancing ? z[e] + L->expert_bias[e]
                                                     : keys[e];
                if (c->n_groups > 1) limit_groups(c, k, key);
                keys = key;
            }
        }
        if (st->replay)
            for (int j = 0; j < k; j++) idx[j] = st->replay[(size_t)t * k + j];
        else
            moe_topk_desc(E, keys, k, idx);
        /* DeepSpeed's noisy_gate_policy 'RSample' (k = 1) and top2_2nd_expert_sampling: the
         * last choice the argmax of z + Gumbel noise over the other experts, a draw from their
         * softmax (not in a replay) */
        if ((sample1 || sample2) && !st->replay) {
            double best = -INFINITY;
            for (int e = 0; e < E; e++) {
                if (sample2 && e == idx[0]) continue;
                double u = moe_rng_uniform64(c->seed, a->gstream, (uint64_t)t * E + e),
                       g = z[e] - log(-log(u));
                if (g > best) best = g, idx[k - 1] = e;
            }
        }
        double qs = 0;
        if (st->wmode == MOE_WMODE_SOFTMAX_K) {
            double m = z[idx[0]], se = 0;
            for (int j = 0; j < k; j++) m = z[idx[j]] > m ? z[idx[j]] : m;
            for (int j = 0; j < k; j++) se += exp(z[idx[j]] - m);
            for (int j = 0; j < k; j++) st->q[t * k + j] = exp(z[idx[j]] - m) / se;
        } else {
            for (int j = 0; j < k; j++) st->q[t * k + j] = p[idx[j]];
        }
        for (int j = 0; j < k; j++) qs += st->q[t * k + j];
        st->qsum[t] = st->renorm ? qs + 1e-20 : 1.0;
        for (int j = 0; j < k; j++) {
            int s = t * k + j;
            double w = st->q[s] / st->qsum[t];
            st->slot_sel[s] = idx[j];
            if (c->random_routing && j >= 1 &&
                !(moe_rng_uniform(c->seed, rstream, (uint64_t)s) < w / rthr)) {
                continue; /* GShard: the slot goes nowhere */
            }
            st->slot_expert[s] = idx[j];
            st->slot_w[s] = (float)(w * c->route_scale);
        }
    }
}

/* Token choice: top-k, Sinkhorn, fake balanced; the tokens over the threads (a decoding
 * step's one token without a parallel region). */
static void select_token_choice(moe_layer *L) {
    const moe_layer_config *c = &L->cfg;
    moe_fwd_state *st = &L->st;
    int T = st->T, E = c->n_experts, k = st->k;
    int sinkhorn = c->router == MOE_ROUTER_SINKHORN && st->training && st->Tv > 0;
    if (sinkhorn) st->sinkhorn_iters = sinkhorn_keys(L, st->key);
    int fake = c->router == MOE_ROUTER_FAKE_BALANCED;
    uint64_t fstream = moe_rng_stream(MOE_RNG_FAKE, (uint64_t)c->layer_id, st->step, 0);
    uint64_t rstream = moe_rng_stream(MOE_RNG_RANDOM2, (uint64_t)c->layer_id, st->step, 0);
    uint64_t gstream = moe_rng_stream(MOE_RNG_GUMBEL, (uint64_t)c->layer_id, st->step, 0);
    int A = E - c->fake_skip_first;
    double gnoise[A > 0 ? A : 1];
    if (fake && c->fake_noise > 0)
        for (int a = 0; a < A; a++) gnoise[a] = moe_rng_normal(c->seed, fstream, (uint64_t)a);
    double rthr = c->random_routing_threshold > 1e-9 ? c->random_routing_threshold : 1e-9;

    /* Position of each valid token among the valid ones (the fake gate's counter). */
    int32_t *vpos = st->scratch;
    for (int t = 0, n = 0; t < T; t++) vpos[t] = token_valid(st, t) ? n++ : -1;

    select_ctx sc = {L, sinkhorn, fake, A, fstream, rstream, gstream, gnoise, rthr, vpos};
    moe_for_ranges(T, 4 * (size_t)T * E, select_tokens, &sc); /* exponentials */
    st->n_slots = T * k;
    for (int t = 0; t <= T; t++) st->tok_off[t] = t * k;
    for (int s = 0; s < T * k; s++) {
        st->tok_slot[s] = s;
        count_slot(st, s);
    }
}

/* Expert choice: each expert takes the C valid tokens with the largest softmax score. */

/* Merge sort of token ids by col[t * stride] descending, ties by lower token (re-entrant,
 * no global state; tmp holds n entries). */
static void sort_tokens_by_score(int32_t *a, int n, const double *col, int stride, int32_t *tmp) {
    if (n < 2) return;
    int h = n / 2;
    sort_tokens_by_score(a, h, col, stride, tmp);
    sort_tokens_by_score(a + h, n - h, col, stride, tmp);
    int i = 0, j = h, o = 0;
    while (i < h && j < n) {
        double vi = col[(size_t)a[i] * stride], vj = col[(size_t)a[j] * stride];
        int take_j = vj > vi || (vj == vi && a[j] < a[i]);
        tmp[o++] = take_j ? a[j++] : a[i++];
    }
    while (i < h) tmp[o++] = a[i++];
    while (j < n) tmp[o++] = a[j++];
    memcpy(a, tmp, sizeof(int32_t) * (size_t)n);
}

static void select_expert_choice(moe_layer *L) {
    const moe_layer_config *c = &L->cfg;
    moe_fwd_state *st = &L->st;
    int T = st->T, E = c->n_experts, k = st->k;
    for (int t = 0; t < T; t++) st->lse[t] = score_row(MOE_SCORE_SOFTMAX, E, st->z + (size_t)t * E, st->p + (size_t)t * E);
    int C = moe_expert_choice_capacity(c, st->cf, st->Tv, k);
    st->capacity = C;
    int32_t *tok = st->scratch, *tmp = st->scratch + T; /* scratch holds >= 2T entries */
    int nv = 0;
    for (int t = 0; t < T; t++)
        if (token_valid(st, t)) tok[nv++] = t;
    for (int e = 0; e < E; e++) {
        sort_tokens_by_score(tok, nv, st->p + e, E, tmp);
        for (int i = 0; i < C; i++) {
            int s = e * C + i;
            st->slot_token[s] = tok[i];
            st->slot_expert[s] = st->slot_sel[s] = e;
            st->q[s] = st->p[(size_t)tok[i] * E + e];
            st->slot_w[s] = (float)(st->q[s] * c->route_scale);
            st->counts[e]++;
        }
    }
    st->n_slots = E * C;
    /* Slots of each token, in slot (expert) order: a stable counting sort by token. */
    memset(st->tok_off, 0, sizeof(int32_t) * (size_t)(T + 1));
    for (int s = 0; s < st->n_slots; s++) st->tok_off[st->slot_token[s] + 1]++;
    for (int t = 0; t < T; t++) st->tok_off[t + 1] += st->tok_off[t];
    for (int t = 0; t < T; t++) tok[t] = st->tok_off[t];
    for (int s = 0; s < st->n_slots; s++) st->tok_slot[tok[st->slot_token[s]]++] = s;
    for (int t = 0; t < T; t++) st->qsum[t] = 1;
}

moe_status moe_router_select(moe_layer *L) {
    const moe_layer_config *c = &L->cfg;
    moe_fwd_state *st = &L->st;
    memset(st->counts, 0, sizeof(int64_t) * (size_t)c->n_experts);
    st->sinkhorn_iters = 0;
    st->renorm = 0;
    st->wscore = c->score;
    st->router_grad = 1;
    switch (c->router) {
    case MOE_ROUTER_TOPK:
        st->wmode = c->score == MOE_SCORE_SOFTMAX && !c->pre_softmax ? MOE_WMODE_SOFTMAX_K
                                                                     : MOE_WMODE_GATHER;
        st->renorm = c->norm_topk == MOE_NORM_ON ||
                     (c->norm_topk == MOE_NORM_AUTO && c->score != MOE_SCORE_SOFTMAX && st->k > 1);
        break;
    case MOE_ROUTER_SINKHORN:
        st->wmode = MOE_WMODE_GATHER;
        st->wscore = st->k == 1 ? MOE_SCORE_SIGMOID : MOE_SCORE_SOFTMAX;
        break;
    case MOE_ROUTER_EXPERT_CHOICE:
        st->wmode = MOE_WMODE_GATHER;
        st->wscore = MOE_SCORE_SOFTMAX;
        break;
    case MOE_ROUTER_FAKE_BALANCED:
        st->wmode = MOE_WMODE_NONE;
        st->router_grad = 0;
        break;
    }
    if (c->router == MOE_ROUTER_EXPERT_CHOICE) select_expert_choice(L);
    else select_token_choice(L);
    return MOE_OK;
}

/* dz[t,:] += d(score)/dz applied to dp (the gradient w.r.t. the full-E scores p). */
static void score_backward_row(moe_score_fn fn, int E, const double *z, const double *p,
                               const double *dp, double *dz) {
    if (fn == MOE_SCORE_SOFTMAX) {
        double s = 0;
        for (int e = 0; e < E; e++) s += p[e] * dp[e];
        for (int e = 0; e < E; e++) dz[e] += p[e] * (dp[e] - s);
    } else if (fn == MOE_SCORE_SIGMOID) {
        for (int e = 0; e < E; e++) dz[e] += dp[e] * p[e] * (1 - p[e]);
    } else {
        for (int e = 0; e < E; e++) dz[e] += p[e] > 0 ? dp[e] * sigmoid(z[e]) / (2 * p[e]) : 0;
    }
}

void moe_router_score_backward(moe_score_fn fn, int E, const double *z, const double *p,
                               const double *dp, double *dz) {
    score_backward_row(fn, E, z, p, dp, dz);
}

/* Routing weights → logits: adds into st->dz from st->dw (dL/d slot weight). */
static void weights_backward(moe_layer *L) {
    const moe_layer_config *c = &L->cfg;
    moe_fwd_state *st = &L->st;
    int T = st->T, E = c->n_experts;
    double scale = c->route_scale;
    if (c->router == MOE_ROUTER_EXPERT_CHOICE) {
        for (int t = 0; t < T; t++) {
            double dp[E];
            int any = 0;
            for (int e = 0; e < E; e++) dp[e] = 0;
            for (int i = st->tok_off[t]; i < st->tok_off[t + 1]; i++) {
                int s = st->tok_slot[i];
                dp[st->slot_expert[s]] += scale * st->dw[s];
                any = 1;
            }
            if (any) score_backward_row(MOE_SCORE_SOFTMAX, E, st->z + (size_t)t * E, st->p + (size_t)t * E, dp, st->dz + (size_t)t * E);
        }
        return;
    }
    int k = st->k;
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++) {
        if (!token_valid(st, t)) continue;
        double dq[k], S = st->qsum[t], cross = 0;
        /* n_j = q_j / S (S = sum q + 1e-20 when renormalising, else 1); w_j = scale * n_j. */
        for (int j = 0; j < k; j++) {
            int s = t * k + j;
            dq[j] = st->slot_expert[s] >= 0 ? scale * st->dw[s] : 0; /* dn_j */
            cross += dq[j] * st->q[s];
        }
        for (int j = 0; j < k; j++) dq[j] = st->renorm ? dq[j] / S - cross / (S * S) : dq[j];
        double *dz = st->dz + (size_t)t * E;
        if (st->wmode == MOE_WMODE_SOFTMAX_K) {
            double sq = 0;
            for (int j = 0; j < k; j++) sq += st->q[t * k + j] * dq[j];
            for (int j = 0; j < k; j++) dz[st->slot_sel[t * k + j]] += st->q[t * k + j] * (dq[j] - sq);
        } else {
            double dp[E];
            for (int e = 0; e < E; e++) dp[e] = 0;
            for (int j = 0; j < k; j++) dp[st->slot_sel[t * k + j]] += dq[j];
            score_backward_row(st->wscore, E, st->z + (size_t)t * E, st->p + (size_t)t * E, dp, dz);
        }
    }
}

void moe_router_backward(moe_layer *L, float *dx, const float *x) {
    const moe_layer_config *c = &L->cfg;
    moe_fwd_state *st = &L->st;
    int T = st->T, E = c->n_experts, d = c->d;
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++) memset(st->dz + (size_t)t * E, 0, sizeof(double) * (size_t)E);
    if (!st->router_grad) return;
    weights_backward(L);
    moe_balance_backward(L);
    const float *xin = st->training && c->jitter_eps > 0 ? st->xr : x;
    if (c->router_fp64) {
        /* dWg = dzᵀ xin and dxr = dz Wg in float64. */
        for (size_t i = 0; i < (size_t)T * d; i++) st->x64[i] = xin[i];
        moe_gemm64(1, 0, E, d, T, 1.0, st->dz, E, st->x64, d, 0.0, st->dwg64, d);
        for (size_t i = 0; i < (size_t)E * d; i++) L->g.router_w[i] += (float)st->dwg64[i];
        moe_gemm64(0, 0, T, d, E, 1.0, st->dz, E, st->wg64, d, 0.0, st->x64, d);
        for (size_t i = 0; i < (size_t)T * d; i++) st->tmp_td[i] = (float)st->x64[i];
    } else {
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < (size_t)T * E; i++) st->dz_f[i] = (float)st->dz[i];
        if (c->cosine_dim) {
            cosine_backward(L, xin);
        } else {
            moe_gemm(1, 0, E, d, T, 1.0f, st->dz_f, E, xin, d, 1.0f, L->g.router_w, d);
            moe_gemm(0, 0, T, d, E, 1.0f, st->dz_f, E, L->p.router_w, d, 0.0f, st->tmp_td, d);
        }
    }
    int jit = st->training && c->jitter_eps > 0;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < (size_t)T * d; i++) dx[i] += jit ? st->tmp_td[i] * st->noise[i] : st->tmp_td[i];
}
