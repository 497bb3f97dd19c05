/* Float64 reference of docs/LAYER.md. Section numbers refer to that page. */
#include "ref_moe.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static int gated(moe_activation a) { return a == MOE_ACT_SWIGLU || a == MOE_ACT_GEGLU; }

static double act1(moe_activation a, double h) {
    switch (a) {
    case MOE_ACT_SWIGLU:
    case MOE_ACT_SILU: return h / (1 + exp(-h));
    case MOE_ACT_GEGLU:
    case MOE_ACT_GELU: return 0.5 * h * (1 + erf(h / sqrt(2.0)));
    case MOE_ACT_RELU2: return h > 0 ? h * h : 0;
    }
    return 0;
}

static double sigmoid(double v) { return 1 / (1 + exp(-v)); }

/* Two-layer MLP of one token: y [d] = W_out act(W_in x + b_in) + b_out. */
static void mlp(const moe_layer_config *c, int f, const double *w_in, const double *b_in,
                const double *w_out, const double *b_out, const double *x, double *y) {
    int d = c->d, gf = gated(c->act) ? 2 * f : f;
    double *h = malloc(sizeof(double) * (size_t)gf), *a = malloc(sizeof(double) * (size_t)f);
    for (int j = 0; j < gf; j++) {
        double s = b_in ? b_in[j] : 0;
        for (int i = 0; i < d; i++) s += w_in[(size_t)j * d + i] * x[i];
        h[j] = s;
    }
    for (int j = 0; j < f; j++) a[j] = gated(c->act) ? act1(c->act, h[j]) * h[f + j] : act1(c->act, h[j]);
    for (int i = 0; i < d; i++) {
        double s = b_out ? b_out[i] : 0;
        for (int j = 0; j < f; j++) s += w_out[(size_t)i * f + j] * a[j];
        y[i] = s;
    }
    free(h);
    free(a);
}

/* Index of the largest v[i] among i with !taken[i] (ties: lowest i); -1 if none. */
static int argmax_free(const double *v, const uint8_t *taken, int n) {
    int best = -1;
    for (int i = 0; i < n; i++)
        if (!taken[i] && v[i] != -INFINITY && (best < 0 || v[i] > v[best])) best = i;
    if (best < 0)
        for (int i = 0; i < n; i++)
            if (!taken[i]) return i;
    return best;
}

static double score(moe_score_fn fn, double z) {
    if (fn == MOE_SCORE_SIGMOID) return sigmoid(z);
    double sp = z > 30 ? z : log1p(exp(z));
    return sqrt(sp);
}

/* §1-§3: token-choice selection (or the frozen one) and weights of token t. */
static void route_token(const moe_layer_config *c, const ref_args *a, const double *z,
                        const double *p, int t, ref_result *r) {
    int E = c->n_experts, k = a->k;
    int32_t *sel = r->sel + (size_t)t * k;
    if (!a->freeze && a->replay) { /* routing replay: the given choices */
        for (int j = 0; j < k; j++) sel[j] = a->replay[(size_t)t * k + j];
    } else if (!a->freeze) {
        double *key = malloc(sizeof(double) * (size_t)E);
        for (int e = 0; e < E; e++)
            key[e] = c->enable_expert_bias   ? p[e] + a->bias[e]
                     : c->quantile_balancing ? z[e] + a->bias[e]
                     : c->score == MOE_SCORE_SOFTMAX && !c->pre_softmax ? z[e] : p[e];
        if (c->n_groups > 1) {
            int G = c->n_groups, per = E / G, m = k / c->group_topk > 1 ? k / c->group_topk : 1;
            if (c->group_score_topk > 0) m = c->group_score_topk;
            double *gs = malloc(sizeof(double) * (size_t)G);
            uint8_t *tk = calloc((size_t)(per > G ? per : G), 1), *keep = calloc((size_t)G, 1);
            for (int g = 0; g < G; g++) {
                memset(tk, 0, (size_t)per);
                gs[g] = 0;
                for (int i = 0; i < m; i++) {
                    int b = argmax_free(key + g * per, tk, per);
                    tk[b] = 1;
                    gs[g] += key[g * per + b];
                }
            }
            memset(tk, 0, (size_t)G);
            for (int i = 0; i < c->group_topk; i++) {
                int b = argmax_free(gs, tk, G);
                keep[b] = tk[b] = 1;
            }
            for (int e = 0; e < E; e++)
                if (!keep[e / per]) key[e] = -INFINITY;
            free(gs);
            free(tk);
            free(keep);
        }
        uint8_t *taken = calloc((size_t)E, 1);
        for (int j = 0; j < k; j++) {
            sel[j] = argmax_free(key, taken, E);
            taken[sel[j]] = 1;
        }
        int s2 = c->sample_second && a->training && k == 2;
        if (s2 || (c->sample_first && a->training && k == 1)) {
            /* the last: the largest logit plus Gumbel noise -log(-log(u)) among the others */
            uint64_t gs = moe_rng_stream(MOE_RNG_GUMBEL, (uint64_t)c->layer_id, a->step, 0);
            double best = -INFINITY;
            for (int e = 0; e < E; e++) {
                double g = z[e] - log(-log(moe_rng_uniform64(c->seed, gs, (uint64_t)t * E + e)));
                if (!(s2 && e == sel[0]) && g > best) best = g, sel[k - 1] = e;
            }
        }
        free(taken);
        free(key);
    }
    double *w = r->weight + (size_t)t * k, sum = 0;
    if (c->score == MOE_SCORE_SOFTMAX && !c->pre_softmax) {
        double mx = -INFINITY;
        for (int j = 0; j < k; j++) mx = fmax(mx, z[sel[j]]);
        for (int j = 0; j < k; j++) sum += w[j] = exp(z[sel[j]] - mx);
        for (int j = 0; j < k; j++) w[j] /= sum;
    } else {
        for (int j = 0; j < k; j++) w[j] = p[sel[j]];
    }
    int renorm = c->norm_topk == MOE_NORM_ON ||
                 (c->norm_topk == MOE_NORM_AUTO && c->score != MOE_SCORE_SOFTMAX && k > 1);
    if (renorm) {
        sum = 0;
        for (int j = 0; j < k; j++) sum += w[j];
        for (int j = 0; j < k; j++) w[j] /= sum + 1e-20;
    }
    for (int j = 0; j < k; j++) {
        int32_t *ex = r->expert + (size_t)t * k + j;
        if (a->freeze) {
            *ex = a->freeze->expert[(size_t)t * k + j];
        } else {
            *ex = sel[j];
            if (c->random_routing && j >= 1) {
                double u = moe_rng_uniform(c->seed, moe_rng_stream(MOE_RNG_RANDOM2, (uint64_t)c->layer_id, a->step, 0),
                                           (uint64_t)t * k + j);
                if (!(u < w[j] / fmax(c->random_routing_threshold, 1e-9))) *ex = -1;
            }
        }
        w[j] = *ex < 0 ? 0 : w[j] * c->route_scale;
    }
}

/* §4 Sinkhorn selection in training (top-k of z otherwise) and its weights. */
static void route_sinkhorn(const moe_layer_config *c, const ref_args *a, const double *z,
                           const uint8_t *valid, ref_result *r, int T) {
    int E = c->n_experts, k = a->k;
    double *key = malloc(sizeof(double) * (size_t)T * E);
    memcpy(key, z, sizeof(double) * (size_t)T * E);
    if (a->training && r->Tv > 0 && !a->freeze) {
        double *C = calloc((size_t)T * E, sizeof(double)), *d0 = malloc(sizeof(double) * (size_t)T),
               *d1 = malloc(sizeof(double) * (size_t)E), *old = malloc(sizeof(double) * (size_t)E);
        for (int t = 0; t < T; t++) {
            d0[t] = 1;
            if (!valid[t]) continue;
            double mx = -INFINITY;
            for (int e = 0; e < E; e++) mx = fmax(mx, z[(size_t)t * E + e]);
            for (int e = 0; e < E; e++) C[(size_t)t * E + e] = exp(z[(size_t)t * E + e] - mx);
        }
        for (int e = 0; e < E; e++) d1[e] = 1;
        for (int it = 0; it < c->sinkhorn_max_iter; it++) {
            memcpy(old, d1, sizeof(double) * (size_t)E);
            for (int t = 0; t < T; t++) {
                if (!valid[t]) continue;
                double s = 0;
                for (int e = 0; e < E; e++) s += C[(size_t)t * E + e] * d1[e];
                d0[t] = (1.0 / r->Tv) / (s + 1e-8);
            }
            double delta = 0;
            for (int e = 0; e < E; e++) {
                double s = 0;
                for (int t = 0; t < T; t++)
                    if (valid[t]) s += d0[t] * C[(size_t)t * E + e];
                d1[e] = (1.0 / E) / (s + 1e-8);
                delta += fabs(d1[e] - old[e]) / E;
            }
            if (delta <= c->sinkhorn_tol) break;
        }
        for (int t = 0; t < T; t++)
            for (int e = 0; e < E; e++) key[(size_t)t * E + e] = d1[e] * C[(size_t)t * E + e] * d0[t];
        free(C);
        free(d0);
        free(d1);
        free(old);
    }
    uint8_t *taken = malloc((size_t)E);
    for (int t = 0; t < T; t++) {
        if (!valid[t]) continue;
        const double *zt = z + (size_t)t * E;
        double mx = -INFINITY, sum = 0;
        for (int e = 0; e < E; e++) mx = fmax(mx, zt[e]);
        for (int e = 0; e < E; e++) sum += exp(zt[e] - mx);
        memset(taken, 0, (size_t)E);
        for (int j = 0; j < k; j++) {
            size_t s = (size_t)t * k + j;
            int e = a->freeze ? a->freeze->sel[s] : argmax_free(key + (size_t)t * E, taken, E);
            taken[e] = 1;
            r->sel[s] = r->expert[s] = e;
            double w = k == 1 ? sigmoid(zt[e]) : exp(zt[e] - mx) / sum;
            r->weight[s] = w * c->route_scale;
        }
    }
    free(taken);
    free(key);
}

/* §4 fake balanced gate. */
static void route_fake(const moe_layer_config *c, const ref_args *a, const uint8_t *valid,
                       ref_result *r, int T) {
    int E = c->n_experts, k = a->k, A = E - c->fake_skip_first;
    uint64_t S = moe_rng_stream(MOE_RNG_FAKE, (uint64_t)c->layer_id, a->step, 0);
    double *g = malloc(sizeof(double) * (size_t)A), *key = malloc(sizeof(double) * (size_t)A);
    uint8_t *taken = malloc((size_t)A);
    for (int i = 0; i < A; i++) g[i] = moe_rng_normal(c->seed, S, (uint64_t)i);
    int n = 0;
    for (int t = 0; t < T; t++) {
        if (!valid[t]) continue;
        double rs[64], rsum = 0;
        memset(taken, 0, (size_t)A);
        for (int i = 0; i < A; i++)
            key[i] = moe_rng_uniform64(c->seed, S, (uint64_t)(1 + n) * A + i) + 0.1 * c->fake_noise * g[i];
        for (int j = 0; j < k; j++) {
            rs[j] = moe_rng_uniform64(c->seed, S, (1ULL << 40) + (uint64_t)n * k + j);
            rsum += rs[j];
        }
        for (int j = 0; j < k; j++) {
            size_t s = (size_t)t * k + j;
            int e;
            double w;
            if (c->fake_noise == 0) {
                e = (n * k + j) % A + c->fake_skip_first;
                w = 1.0 / k;
            } else {
                int b = argmax_free(key, taken, A);
                taken[b] = 1;
                e = b + c->fake_skip_first;
                w = (1 - c->fake_noise) / k + c->fake_noise * rs[j] / rsum;
            }
            r->sel[s] = r->expert[s] = e;
            r->weight[s] = w * c->route_scale;
        }
        n++;
    }
    free(g);
    free(key);
    free(taken);
}

static int64_t capacity_of(double cf, int64_t Tv, int k, int E) {
    return (int64_t)ceil(fabs(cf) * (double)Tv * k / E * (1 - 1e-6));
}

/* The capacity factor of a call: outside training DeepSpeed's eval_capacity_factor, if set. */
static double capacity_factor(const moe_layer_config *c, int training) {
    return training || c->eval_capacity_factor == 0 ? c->capacity_factor : c->eval_capacity_factor;
}

/* §6 keeps at most C slots per expert of the tokens [t0, t1) (a local group), C from their
 * valid tokens and their slots' counts; returns C. */
static int64_t keep_group(const moe_layer_config *c, ref_result *r, double cf, const uint8_t *mask,
                          int T, int t0, int t1, uint64_t step, const double *top) {
    int E = c->n_experts, k = r->k;
    int64_t Tv = 0, mx = 0, *count = calloc((size_t)E, sizeof(int64_t));
    for (int t = t0; t < t1; t++) {
        Tv += !mask || mask[t];
        for (int j = 0; j < k; j++)
            if (r->expert[t * k + j] >= 0) count[r->expert[t * k + j]]++;
    }
    for (int e = 0; e < E; e++) mx = count[e] > mx ? count[e] : mx;
    free(count);
    if (Tv == 0) return 0;
    int64_t C = capacity_of(cf, Tv, k, E);
    if (C < c->min_capacity) C = c->min_capacity;
    if (C > (cf > 0 ? Tv : mx)) C = cf > 0 ? Tv : mx;
    for (int e = 0; e < E; e++) {
        /* repeatedly take the best remaining slot of expert e by the policy's priority */
        int64_t taken = 0;
        uint8_t *done = calloc((size_t)r->n_slots, 1);
        while (taken < C) {
            /* position: the first remaining by token; position by choice: by (j, t);
             * batch-prioritized: by j, then the token's top score (top[t], far below 1e6);
             * probs: the largest weight; random (DeepSpeed's use_rts): the largest priority
             * U(0, 1) of slot s in the layer's and step's stream; ties to the first in (j, t)
             * order */
            uint64_t rts = moe_rng_stream(MOE_RNG_RTS, (uint64_t)c->layer_id, step, 0);
            int best = -1;
            double bk = 0;
            for (int j = 0; j < k; j++)
                for (int t = t0; t < t1; t++) {
                    int s = t * k + j;
                    if (r->expert[s] != e || done[s]) continue;
                    double key = c->drop_policy == MOE_DROP_PROBS ? r->weight[s]
                                 : c->drop_policy == MOE_DROP_RANDOM
                                     ? moe_rng_uniform(c->seed, rts, (uint64_t)s)
                                 : c->drop_policy == MOE_DROP_CHOICE ? -(j * T + t)
                                 : c->drop_policy == MOE_DROP_PRIORITY ? top[t] - 1e6 * j
                                                                     : -s;
                    if (best < 0 || key > bk) best = s, bk = key;
                }
            if (best < 0) break;
            done[best] = 1;
            r->kept[best] = 1;
            taken++;
        }
        free(done);
    }
    return C;
}

/* §6: the capacity per group of local_group_size tokens (one group when 0), summed. */
static void apply_capacity(const moe_layer_config *c, ref_result *r, const uint8_t *mask, int T,
                           uint64_t step, int training, const double *top) {
    double cf = capacity_factor(c, training);
    r->capacity = 0;
    if (cf == 0 || r->Tv == 0) {
        for (int s = 0; s < r->n_slots; s++) r->kept[s] = r->expert[s] >= 0;
        return;
    }
    int G = c->local_group_size ? c->local_group_size : T;
    for (int t0 = 0; t0 < T; t0 += G)
        r->capacity += (int)keep_group(c, r, cf, mask, T, t0, t0 + G < T ? t0 + G : T, step, top);
}

static int desc(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x < y) - (x > y);
}

/* §5 quantile balancing: alpha_t the (k+1)-th largest of z[t] + bias, beta_local[e] the
 * (floor(Tv k / E) + 1)-th largest of z[t,e] - alpha_t over the valid tokens; by sorting. */
static void qb_beta(const moe_layer_config *c, const ref_args *a, const double *z,
                    const uint8_t *valid, ref_result *r) {
    int T = a->T, E = c->n_experts, k = a->k, n = 0;
    double *key = malloc(sizeof(double) * (size_t)E), *alpha = malloc(sizeof(double) * (size_t)T),
           *col = malloc(sizeof(double) * (size_t)T);
    for (int t = 0; t < T; t++) {
        for (int e = 0; e < E; e++) key[e] = z[(size_t)t * E + e] + a->bias[e];
        qsort(key, (size_t)E, sizeof(double), desc);
        alpha[t] = key[k];
    }
    r->qb_beta = malloc(sizeof(double) * (size_t)E);
    for (int e = 0; e < E; e++) {
        n = 0;
        for (int t = 0; t < T; t++)
            if (valid[t]) col[n++] = z[(size_t)t * E + e] - alpha[t];
        qsort(col, (size_t)n, sizeof(double), desc);
        r->qb_beta[e] = col[(int64_t)n * k / E];
    }
    free(key);
    free(alpha);
    free(col);
}

/* var(x) / (mean(x)^2 + 1e-10), the variance unbiased (torch's var) */
static double cv2(int E, const double *x) {
    double m = 0, v = 0;
    for (int e = 0; e < E; e++) m += x[e];
    m /= E;
    for (int e = 0; e < E; e++) v += (x[e] - m) * (x[e] - m);
    return v / (E - 1) / (m * m + 1e-10);
}

/* §5 Tutel's load_importance_loss: Imp over the softmax of the logits without the noise, Load
 * over Phi((that softmax - the k-th chosen noisy logit) / (gate_noise / E)). */
static double load_importance(const moe_layer_config *c, const ref_args *a, const ref_result *r,
                              const double *z, const uint8_t *valid, int T) {
    int E = c->n_experts, k = r->k;
    double *imp = calloc((size_t)E, sizeof(double)), *load = calloc((size_t)E, sizeof(double));
    double *p0 = malloc(sizeof(double) * (size_t)E), sigma = (double)c->gate_noise / E;
    uint64_t gs = moe_rng_stream(MOE_RNG_GATE_NOISE, (uint64_t)c->layer_id, a->step, 0);
    for (int t = 0; t < T; t++) {
        if (!valid[t]) continue;
        double sum = 0;
        for (int e = 0; e < E; e++) {
            double noise = a->training ? moe_rng_normal(c->seed, gs, (uint64_t)t * E + e) * sigma : 0;
            sum += p0[e] = exp(z[(size_t)t * E + e] - noise);
        }
        double theta = z[(size_t)t * E + r->sel[(size_t)t * k + k - 1]];
        for (int e = 0; e < E; e++) {
            imp[e] += p0[e] / sum;
            load[e] += 0.5 * (1 + erf((p0[e] / sum - theta) / sigma / sqrt(2.0)));
        }
    }
    double loss = c->aux_coeff * (cv2(E, imp) + cv2(E, load)) / 2;
    free(imp);
    free(load);
    free(p0);
    return loss;
}

/* §5 Switch-style balancing loss with coefficient coeff over the tokens [t0, t1); with acc (the
 * global batch's) its counts are added to r->aux_counts. */
static double aux_over(const moe_layer_config *c, double coeff, ref_result *r, const double *P,
                       const uint8_t *valid, int t0, int t1, const int64_t *acc, int64_t acc_T) {
    int E = c->n_experts, k = r->k;
    double Tv = 0, *cnt = calloc((size_t)E, sizeof(double)), *pm = calloc((size_t)E, sizeof(double));
    uint8_t *taken = malloc((size_t)E);
    for (int t = t0; t < t1; t++) {
        if (!valid[t]) continue;
        Tv++;
        const double *Pt = P + (size_t)t * E;
        for (int e = 0; e < E; e++) pm[e] += Pt[e];
        /* c_e: the tokens whose k largest P (ties: the lower index) hold e */
        memset(taken, 0, (size_t)E);
        for (int j = 0; j < k; j++) {
            int best = -1;
            for (int e = 0; e < E; e++)
                if (!taken[e] && (best < 0 || Pt[e] > Pt[best])) best = e;
            taken[best] = 1;
            cnt[best]++;
            if (acc) r->aux_counts[best]++;
        }
    }
    free(taken);
    double loss = 0;
    if (Tv > 0)
        for (int e = 0; e < E; e++) {
            double f = acc ? (acc[e] + cnt[e]) / (k * (acc_T + Tv)) : cnt[e] / (k * Tv);
            loss += f * pm[e] / Tv;
        }
    free(cnt);
    free(pm);
    return coeff * E * loss;
}

void ref_moe_forward(const moe_layer_config *c, const ref_params *p, const double *x,
                     const ref_args *a, ref_result *r) {
    int T = a->T, d = c->d, E = c->n_experts, k = a->k;
    memset(r, 0, sizeof *r);
    uint8_t *valid = malloc((size_t)T + 1);
    r->k = k;
    for (int t = 0; t < T; t++) {
        valid[t] = !a->mask || a->mask[t];
        r->Tv += valid[t];
    }
    /* §1 jitter and logits */
    double *xr = malloc(sizeof(double) * (size_t)T * d), *z = malloc(sizeof(double) * (size_t)T * E),
           *pr = malloc(sizeof(double) * (size_t)T * E);
    uint64_t js = moe_rng_stream(MOE_RNG_JITTER, (uint64_t)c->layer_id, a->step, 0);
    for (int t = 0; t < T; t++)
        for (int i = 0; i < d; i++) {
            double u = moe_rng_uniform(c->seed, js, (uint64_t)t * d + i);
            int jit = a->training && c->jitter_eps > 0;
            xr[(size_t)t * d + i] = x[(size_t)t * d + i] * (jit ? 1 - (double)c->jitter_eps + 2 * (double)c->jitter_eps * u : 1);
        }
    for (int t = 0; t < T; t++)
        for (int e = 0; e < E; e++) {
            double s = 0;
            if (c->cosine_dim) { /* §1: exp(min(tau, ln 100)) cos(W_p x + b_p, s_e) */
                int P = c->cosine_dim;
                double hh = 0, ss = 0, hs = 0;
                for (int i = 0; i < P; i++) {
                    double h = p->cos_proj_b[i], v = p->cos_sim[(size_t)e * P + i];
                    for (int j = 0; j < d; j++)
                        h += p->cos_proj_w[(size_t)i * d + j] * xr[(size_t)t * d + j];
                    hh += h * h, ss += v * v, hs += h * v;
                }
                s = hs / fmax(sqrt(hh), 1e-12) / fmax(sqrt(ss), 1e-12) *
                    exp(fmin(p->cos_temp[0], log(100.0)));
            }
            for (int i = 0; i < d && !c->cosine_dim; i++) s += xr[(size_t)t * d + i] * p->router_w[(size_t)e * d + i];
            /* Tutel's gate noise: N(0, 1) gate_noise / E */
            uint64_t gs = moe_rng_stream(MOE_RNG_GATE_NOISE, (uint64_t)c->layer_id, a->step, 0);
            if (a->training && c->gate_noise > 0)
                s += moe_rng_normal(c->seed, gs, (uint64_t)t * E + e) * c->gate_noise / E;
            z[(size_t)t * E + e] = s;
        }
    /* §2 scores */
    for (int t = 0; t < T; t++) {
        double *zt = z + (size_t)t * E, *pt = pr + (size_t)t * E, mx = -INFINITY, sum = 0;
        if (c->score == MOE_SCORE_SOFTMAX || c->router == MOE_ROUTER_EXPERT_CHOICE) {
            for (int e = 0; e < E; e++) mx = fmax(mx, zt[e]);
            for (int e = 0; e < E; e++) sum += pt[e] = exp(zt[e] - mx);
            for (int e = 0; e < E; e++) pt[e] /= sum;
        } else {
            for (int e = 0; e < E; e++) pt[e] = score(c->score, zt[e]);
        }
    }
    r->counts = calloc((size_t)E, sizeof(int64_t));
    r->kept_e = calloc((size_t)E, sizeof(int64_t));
    r->aux_counts = calloc((size_t)E, sizeof(int64_t));
    r->out = calloc((size_t)T * d, sizeof(double));
    if (c->router == MOE_ROUTER_EXPERT_CHOICE) {
        double cf = capacity_factor(c, a->training) > 0 ? capacity_factor(c, a->training) : 1;
        int64_t C = r->Tv ? capacity_of(cf, r->Tv, k, E) : 0;
        if (C > r->Tv) C = r->Tv;
        r->capacity = (int)C;
        r->n_slots = (int)(E * C);
    } else {
        r->n_slots = T * k;
    }
    size_t S = (size_t)r->n_slots + 1;
    r->token = calloc(S, sizeof(int32_t));
    r->sel = malloc(S * sizeof(int32_t));
    r->expert = malloc(S * sizeof(int32_t));
    r->weight = calloc(S, sizeof(double));
    r->kept = calloc(S, 1);
    for (size_t s = 0; s < S; s++) r->sel[s] = r->expert[s] = -1;
    if (c->router == MOE_ROUTER_EXPERT_CHOICE) {
        uint8_t *taken = calloc((size_t)T, 1);
        double *col = malloc(sizeof(double) * (size_t)T);
        for (int e = 0; e < E; e++) {
            for (int t = 0; t < T; t++) {
                col[t] = valid[t] ? pr[(size_t)t * E + e] : -INFINITY;
                taken[t] = !valid[t];
            }
            for (int i = 0; i < r->capacity; i++) {
                size_t s = (size_t)e * r->capacity + i;
                int t = a->freeze ? a->freeze->token[s] : argmax_free(col, taken, T);
                taken[t] = 1;
                r->token[s] = t;
                r->sel[s] = r->expert[s] = e;
                r->weight[s] = pr[(size_t)t * E + e] * c->route_scale;
                r->kept[s] = 1;
                r->counts[e]++;
            }
        }
        free(taken);
        free(col);
    } else {
        for (int t = 0; t < T; t++)
            for (int j = 0; j < k; j++) r->token[(size_t)t * k + j] = t;
        if (a->freeze) memcpy(r->sel, a->freeze->sel, sizeof(int32_t) * (size_t)T * k);
        if (c->router == MOE_ROUTER_TOPK) {
            for (int t = 0; t < T; t++)
                if (valid[t]) route_token(c, a, z + (size_t)t * E, pr + (size_t)t * E, t, r);
        } else if (c->router == MOE_ROUTER_SINKHORN) {
            route_sinkhorn(c, a, z, valid, r, T);
        } else {
            route_fake(c, a, valid, r, T);
        }
        for (int s = 0; s < r->n_slots; s++)
            if (r->expert[s] >= 0) r->counts[r->expert[s]]++;
        if (a->freeze) {
            r->capacity = a->freeze->capacity;
            memcpy(r->kept, a->freeze->kept, (size_t)r->n_slots);
        } else {
            double *top = malloc(sizeof(double) * (size_t)T); /* each token's largest score */
            for (int t = 0; t < T; t++) {
                top[t] = -INFINITY;
                for (int e = 0; e < E; e++) top[t] = fmax(top[t], pr[(size_t)t * E + e]);
            }
            apply_capacity(c, r, a->mask, T, a->step, a->training, top);
            free(top);
        }
    }
    for (int s = 0; s < r->n_slots; s++)
        if (r->kept[s]) r->kept_e[r->expert[s]]++;
    /* §5 losses, quantile balancing */
    if (c->quantile_balancing && a->training && r->Tv > 0) qb_beta(c, a, z, valid, r);
    /* each Switch-style type's coefficient: lb_type's, plus the others of Megatron's list */
    double coeff[MOE_LB_GLOBAL_AUX + 1] = {0}, any = 0;
    for (int t = MOE_LB_AUX; t <= MOE_LB_GLOBAL_AUX; t++)
        any += coeff[t] = (t == (int)c->lb_type ? c->aux_coeff : 0) + c->aux_coeff_also[t];
    if (c->lb_type == MOE_LB_LOAD_IMPORTANCE) any = c->aux_coeff;
    if (c->router == MOE_ROUTER_TOPK && any > 0) {
        double *P = malloc(sizeof(double) * (size_t)T * E);
        for (int t = 0; t < T; t++) {
            double sum = 0;
            for (int e = 0; e < E; e++) sum += pr[(size_t)t * E + e];
            for (int e = 0; e < E; e++)
                P[(size_t)t * E + e] = c->score == MOE_SCORE_SOFTMAX ? pr[(size_t)t * E + e] : pr[(size_t)t * E + e] / sum;
        }
        if (c->lb_type == MOE_LB_LOAD_IMPORTANCE) {
            r->aux = load_importance(c, a, r, z, valid, T);
        } else {
            int L = a->seq_len ? a->seq_len : T, B = T / L;
            for (int b = 0; coeff[MOE_LB_SEQ_AUX] > 0 && b < B; b++)
                r->aux += aux_over(c, coeff[MOE_LB_SEQ_AUX], r, P, valid, b * L, (b + 1) * L, NULL, 0) / B;
            if (coeff[MOE_LB_AUX] > 0) r->aux += aux_over(c, coeff[MOE_LB_AUX], r, P, valid, 0, T, NULL, 0);
            if (coeff[MOE_LB_GLOBAL_AUX] > 0)
                r->aux += aux_over(c, coeff[MOE_LB_GLOBAL_AUX], r, P, valid, 0, T, a->acc_counts, a->acc_tokens);
        }
        free(P);
    }
    if (c->router != MOE_ROUTER_FAKE_BALANCED && c->z_coeff > 0 && r->Tv > 0) {
        for (int t = 0; t < T; t++) {
            if (!valid[t]) continue;
            double mx = -INFINITY, sum = 0;
            for (int e = 0; e < E; e++) mx = fmax(mx, z[(size_t)t * E + e]);
            for (int e = 0; e < E; e++) sum += exp(z[(size_t)t * E + e] - mx);
            double lse = mx + log(sum);
            r->z += lse * lse;
        }
        r->z *= c->z_coeff / r->Tv;
    }
    /* §7 experts and combine */
    int gf = gated(c->act) ? 2 * c->ffn : c->ffn;
    double *y = malloc(sizeof(double) * (size_t)d), *routed = calloc((size_t)T * d, sizeof(double));
    double *xs = malloc(sizeof(double) * (size_t)d);
    for (int s = 0; s < r->n_slots; s++) {
        if (!r->kept[s]) continue;
        int t = r->token[s], e = r->expert[s];
        /* the weight on the expert's output, or (probs on input) on its input row */
        double w_in = c->probs_on_input ? r->weight[s] : 1, w_out = c->probs_on_input ? 1 : r->weight[s];
        for (int i = 0; i < d; i++) xs[i] = w_in * x[(size_t)t * d + i];
        mlp(c, c->ffn, p->w_in + (size_t)e * gf * d, p->b_in ? p->b_in + (size_t)e * gf : NULL,
            p->w_out + (size_t)e * d * c->ffn, p->b_out ? p->b_out + (size_t)e * d : NULL, xs, y);
        for (int i = 0; i < d; i++) routed[(size_t)t * d + i] += w_out * y[i];
    }
    free(xs);
    for (int t = 0; t < T; t++) {
        if (!valid[t]) continue;
        double *o = r->out + (size_t)t * d, *rt = routed + (size_t)t * d;
        const double *xt = x + (size_t)t * d;
        if (c->shared_ffn <= 0) {
            memcpy(o, rt, sizeof(double) * (size_t)d);
            continue;
        }
        mlp(c, c->shared_ffn, p->shared_w_in, p->shared_b_in, p->shared_w_out, p->shared_b_out, xt, y);
        if (c->shared_gate) {
            double g = 0;
            for (int i = 0; i < d; i++) g += xt[i] * p->shared_gate_w[i];
            for (int i = 0; i < d; i++) y[i] *= sigmoid(g);
        }
        double c0 = 1, c1 = 1;
        if (c->residual) {
            double l0 = p->mix_b[0], l1 = p->mix_b[1];
            for (int i = 0; i < d; i++) {
                l0 += p->mix_w[i] * xt[i];
                l1 += p->mix_w[d + i] * xt[i];
            }
            c0 = 1 / (1 + exp(l1 - l0));
            c1 = 1 - c0;
        }
        for (int i = 0; i < d; i++) o[i] = c0 * rt[i] + c1 * y[i];
    }
    free(y);
    free(routed);
    free(xr);
    free(z);
    free(pr);
    free(valid);
}

void ref_result_free(ref_result *r) {
    free(r->token);
    free(r->sel);
    free(r->expert);
    free(r->weight);
    free(r->kept);
    free(r->counts);
    free(r->kept_e);
    free(r->aux_counts);
    free(r->qb_beta);
    free(r->out);
    memset(r, 0, sizeof *r);
}

double ref_moe_loss(const moe_layer_config *c, const ref_params *p, const double *x,
                    const ref_args *a, const double *G) {
    ref_result r;
    ref_moe_forward(c, p, x, a, &r);
    double L = r.aux + r.z;
    for (size_t i = 0; i < (size_t)a->T * c->d; i++) L += r.out[i] * G[i];
    ref_result_free(&r);
    return L;
}
