/* Known answers, derived by hand in the comments. The router weights are the identity
 * (d = E), so each token's input row is its logit vector. */
#include "test_util.h"

#include "moe.h"
#include "moe/layer_internal.h"

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

static moe_layer_config identity_config(int E, int k) {
    moe_layer_config c = moe_layer_config_default();
    c.d = E;
    c.n_experts = E;
    c.topk = k;
    c.ffn = 4;
    c.lb_type = MOE_LB_NONE;
    return c;
}

/* A layer whose router weights are the identity; expert weights random. */
static moe_layer *make_layer(const moe_layer_config *c, int T) {
    moe_layer *L;
    if (moe_layer_create(c, T, NULL, NULL, &L) != MOE_OK) fail_msg("create: %s", moe_last_error());
    moe_layer_init_params(L, tu_seed(), 0.1f);
    float *w = moe_layer_get_params(L).router_w;
    for (int e = 0; e < c->n_experts; e++)
        for (int i = 0; i < c->d; i++) w[e * c->d + i] = e == i ? 1.0f : 0.0f;
    return L;
}

static const moe_routing *route(moe_layer *L, const float *z, int T, const moe_forward_args *a) {
    int d = moe_layer_get_config(L)->d;
    float *out = malloc(sizeof(float) * (size_t)T * d);
    if (moe_layer_forward(L, out, z, T, a) != MOE_OK) fail_msg("forward: %s", moe_last_error());
    free(out);
    return moe_layer_get_routing(L);
}

static float logit(double s) { return (float)log(s / (1 - s)); }

static void expect_slots(const moe_routing *r, const int *experts, const double *weights, int n) {
    for (int s = 0; s < n; s++) {
        if (r->expert[s] != experts[s]) fail_msg("slot %d: expert %d, expected %d", s, r->expert[s], experts[s]);
        if (weights && fabs(r->weight[s] - weights[s]) > 1e-5)
            fail_msg("slot %d: weight %.7f, expected %.7f", s, r->weight[s], weights[s]);
    }
}

/* 8 experts in 4 groups of 2, keep 2 groups, k = 4, sigmoid scores
 * (0.95 0.05 | 0.6 0.6 | 0.55 0.55 | 0.9 0.02), weights scaled by 2.5; groups scored by their
 * top score_topk keys (0: k / group_topk = 2). The layer and the scores' logits. */
static moe_layer *grouped_layer(int score_topk, int bias, float z[8]) {
    moe_layer_config c = identity_config(8, 4);
    c.score = MOE_SCORE_SIGMOID;
    c.n_groups = 4;
    c.group_topk = 2;
    c.group_score_topk = score_topk;
    c.enable_expert_bias = bias;
    c.route_scale = 2.5f;
    const double s[8] = {0.95, 0.05, 0.6, 0.6, 0.55, 0.55, 0.9, 0.02};
    for (int e = 0; e < 8; e++) z[e] = logit(s[e]);
    return make_layer(&c, 1);
}

/* DeepSeek-V3 group-limited routing: group score = sum of the top k/group_topk = 2 keys = 1.0,
 * 1.2, 1.1, 0.92. The best groups are 1 and 2 (by the maximum they would have been 0 and 3).
 * Selected: 2, 3 (0.6, tie -> lower first), 4, 5. Weights: renormalised over 2.3, times
 * route_scale 2.5. With bias b0 = +0.5 the keys of group 0 become 1.45 and 0.55 (sum 2.0):
 * groups 0 and 1 win, keys 1.45 (e0), 0.6 (e2), 0.6 (e3), 0.55 (e1); the weights use the
 * unbiased scores 0.95, 0.6, 0.6, 0.05 over 2.2. */
static void test_group_limited_deepseek(void **state) {
    (void)state;
    float z[8];
    moe_layer *L = grouped_layer(0, 1, z);
    moe_forward_args a = moe_forward_args_default();
    a.training = 0;
    const int e1[4] = {2, 3, 4, 5};
    const double w1[4] = {2.5 * 0.6 / 2.3, 2.5 * 0.6 / 2.3, 2.5 * 0.55 / 2.3, 2.5 * 0.55 / 2.3};
    expect_slots(route(L, z, 1, &a), e1, w1, 4);
    moe_layer_expert_bias(L)[0] = 0.5f;
    const int e2[4] = {0, 2, 3, 1};
    const double w2[4] = {2.5 * 0.95 / 2.2, 2.5 * 0.6 / 2.2, 2.5 * 0.6 / 2.2, 2.5 * 0.05 / 2.2};
    expect_slots(route(L, z, 1, &a), e2, w2, 4);
    moe_layer_destroy(L);
}

/* The same scores with a group's score its maximum (group_score_topk 1, DeepSeek-V2's
 * group_limited_greedy): group scores 0.95, 0.6, 0.55, 0.9, so groups 0 and 3 win; the four
 * keys 0.95 (e0), 0.9 (e6), 0.05 (e1), 0.02 (e7), renormalised over 1.92 and scaled by 2.5. */
static void test_group_score_max(void **state) {
    (void)state;
    float z[8];
    moe_layer *L = grouped_layer(1, 0, z);
    moe_forward_args a = moe_forward_args_default();
    a.training = 0;
    const int ex[4] = {0, 6, 1, 7};
    const double w[4] = {2.5 * 0.95 / 1.92, 2.5 * 0.9 / 1.92, 2.5 * 0.05 / 1.92, 2.5 * 0.02 / 1.92};
    expect_slots(route(L, z, 1, &a), ex, w, 4);
    moe_layer_destroy(L);
}

/* z = (2, 1, 0, -1), k = 2. After top-k: softmax(2, 1) = (e/(e+1), 1/(e+1)). Before top-k:
 * softmax over all four, weights e^2/S and e/S with S = e^2 + e + 1 + 1/e. */
static void test_pre_post_softmax(void **state) {
    (void)state;
    moe_layer_config c = identity_config(4, 2);
    moe_layer *L = make_layer(&c, 1);
    const float z[4] = {2, 1, 0, -1};
    moe_forward_args a = moe_forward_args_default();
    const int ex[2] = {0, 1};
    double e = exp(1.0), S = e * e + e + 1 + 1 / e;
    const double post[2] = {e / (e + 1), 1 / (e + 1)}, pre[2] = {e * e / S, e / S};
    expect_slots(route(L, z, 1, &a), ex, post, 2);
    moe_layer_destroy(L);
    c.pre_softmax = 1;
    L = make_layer(&c, 1);
    expect_slots(route(L, z, 1, &a), ex, pre, 2);
    moe_layer_destroy(L);
}

/* Equal logits: the lower expert indices win, equal weights. */
static void test_ties_lower_index(void **state) {
    (void)state;
    moe_layer_config c = identity_config(5, 3);
    moe_layer *L = make_layer(&c, 2);
    const float z[10] = {0, 0, 0, 0, 0, 1, 3, 1, 3, 1};
    moe_forward_args a = moe_forward_args_default();
    /* token 1: keys 1 3 1 3 1 -> 1, 3 (tie: lower first), then 0 */
    const int ex[6] = {0, 1, 2, 1, 3, 0};
    double e2 = exp(2.0);
    const double w[6] = {1 / 3.0, 1 / 3.0, 1 / 3.0, e2 / (2 * e2 + 1), e2 / (2 * e2 + 1), 1 / (2 * e2 + 1)};
    expect_slots(route(L, z, 2, &a), ex, w, 6);
    moe_layer_destroy(L);
}

/* Sinkhorn: every token prefers expert 0 strongly. Plain top-1 (inference) sends all to 0;
 * in training the Sinkhorn-balanced scores spread them. The test computes the balancing
 * itself, checks its row sums (1/T) and column sums (1/E), and that the layer's choice is the
 * row maximum of the balanced matrix. */
static void test_sinkhorn(void **state) {
    (void)state;
    uint64_t seed = tu_seed();
    enum { E = 4, T = 16 };
    moe_layer_config c = identity_config(E, 1);
    c.router = MOE_ROUTER_SINKHORN;
    c.sinkhorn_tol = 1e-9f;
    c.sinkhorn_max_iter = 10000;
    moe_layer *L = make_layer(&c, T);
    float z[T * E];
    tu_fill(z, T * E, seed, 1, -0.5f, 0.5f);
    for (int t = 0; t < T; t++) z[t * E] += 3;
    moe_forward_args a = moe_forward_args_default();
    a.training = 0;
    const moe_routing *r = route(L, z, T, &a);
    for (int t = 0; t < T; t++) assert_int_equal(r->expert[t], 0);
    /* the balancing, by the textbook iteration */
    double C[T][E], d0[T], d1[E];
    for (int e = 0; e < E; e++) d1[e] = 1;
    for (int t = 0; t < T; t++)
        for (int e = 0; e < E; e++) C[t][e] = exp(z[t * E + e]);
    for (int it = 0; it < 5000; it++) {
        for (int t = 0; t < T; t++) {
            double s = 0;
            for (int e = 0; e < E; e++) s += C[t][e] * d1[e];
            d0[t] = 1.0 / T / s;
        }
        for (int e = 0; e < E; e++) {
            double s = 0;
            for (int t = 0; t < T; t++) s += C[t][e] * d0[t];
            d1[e] = 1.0 / E / s;
        }
    }
    for (int t = 0; t < T; t++) {
        double s = 0;
        for (int e = 0; e < E; e++) s += d0[t] * C[t][e] * d1[e];
        assert_true(fabs(s - 1.0 / T) < 1e-6);
    }
    for (int e = 0; e < E; e++) {
        double s = 0;
        for (int t = 0; t < T; t++) s += d0[t] * C[t][e] * d1[e];
        assert_true(fabs(s - 1.0 / E) < 1e-6);
    }
    a.training = 1;
    r = route(L, z, T, &a);
    int used[E] = {0};
    for (int t = 0; t < T; t++) {
        int best = 0;
        for (int e = 1; e < E; e++)
            if (d1[e] * C[t][e] > d1[best] * C[t][best]) best = e;
        assert_int_equal(r->expert[t], best);
        used[best]++;
        /* k = 1: weight = sigmoid(z) at the choice */
        assert_true(fabs(r->weight[t] - 1 / (1 + exp(-z[t * E + best]))) < 1e-6);
    }
    int n_used = 0;
    for (int e = 0; e < E; e++) n_used += used[e] > 0;
    assert_true(n_used > 1); /* spread, unlike plain top-1 */
    moe_layer_destroy(L);
}

/* Capacity with E = 2, k = 2 (each token picks both experts), T = 4, cf = 0.5:
 * C = ceil(0.5 * 4 * 2 / 2) = 2. Logits t0 (1,0), t1 (0,1), t2 (1,0), t3 (2,0).
 * Expert 0 gets first choices t0, t2, t3 and the second choice of t1; expert 1 the first
 * choice of t1 and second choices of t0, t2, t3.
 * position: each expert keeps its two earliest tokens, t0 and t1, whichever choice it is for
 *   them (Megatron, DeepSpeed): all four slots of t0 and t1; t2 and t3 lose both.
 * probs: weights w(1,0) = e/(e+1) = 0.731, w(2,0) = e^2/(e^2+1) = 0.881; expert 0 keeps t3
 *   (0.881) and t0 (0.731, ties with t2 -> earlier (j, t)); expert 1 keeps t1 (0.731) and
 *   then the largest second-choice weight 0.269 of t0 (tie with t2, earlier wins).
 * batch-prioritized: the tokens' top scores 0.731, 0.731, 0.731, 0.881; expert 0 keeps the
 *   first choices of t3 (the surest) and t0 (before t2); expert 1 its one first choice, t1's,
 *   then the second choice of t3, the surest token. */
static void test_capacity_positions(void **state) {
    (void)state;
    moe_layer_config c = identity_config(2, 2);
    c.capacity_factor = 0.5f;
    const float z[8] = {1, 0, 0, 1, 1, 0, 2, 0};
    moe_forward_args a = moe_forward_args_default();
    /* slots t*2 + j; by choice, expert 0 takes the first choices of tokens 0, 2 (3 is late)
     * before token 1's second, expert 1 token 1's first before token 0's second */
    const struct {
        moe_drop_policy policy;
        const char *name;
        uint8_t want[8];
    } pols[] = {{MOE_DROP_POSITION, "position", {1, 1, 1, 1, 0, 0, 0, 0}},
                {MOE_DROP_PROBS, "probs", {1, 1, 1, 0, 0, 0, 1, 0}},
                {MOE_DROP_CHOICE, "position-by-choice", {1, 1, 1, 0, 1, 0, 0, 0}},
                {MOE_DROP_PRIORITY, "batch-prioritized", {1, 0, 1, 0, 0, 0, 1, 1}}};
    for (int pol = 0; pol < 4; pol++) {
        c.drop_policy = pols[pol].policy;
        moe_layer *L = make_layer(&c, 4);
        const moe_routing *r = route(L, z, 4, &a);
        for (int s = 0; s < 8; s++)
            if (r->kept[s] != pols[pol].want[s])
                fail_msg("%s: slot %d kept %d, expected %d", pols[pol].name, s, r->kept[s],
                         pols[pol].want[s]);
        const moe_layer_stats *st = moe_layer_get_stats(L);
        assert_int_equal(st->capacity, 2);
        assert_int_equal(st->dropped, 4);
        assert_true(fabs(st->dropped_fraction - 0.5) < 1e-12);
        moe_layer_destroy(L);
    }
}

/* position-by-choice against DeepSpeed's top2gating, written as it computes it: over the
 * batch, locations1 = cumsum(mask1) - 1 and locations2 = cumsum(mask2) - 1 + sum(mask1) per
 * expert (every first choice counted, kept or not), a slot kept when its location < C; random
 * logits, 96 tokens, 8 experts, capacity factor 0.75 (C = 18 of 24 per expert on average). */
static void test_capacity_deepspeed_top2(void **state) {
    (void)state;
    enum { T = 96, E = 8 };
    uint64_t seed = tu_seed();
    moe_layer_config c = identity_config(E, 2);
    c.capacity_factor = 0.75f;
    c.drop_policy = MOE_DROP_CHOICE;
    moe_layer *L = make_layer(&c, T);
    float z[T * E];
    tu_fill(z, T * E, seed, 41, -2, 2);
    moe_forward_args a = moe_forward_args_default();
    const moe_routing *r = route(L, z, T, &a);
    int C = moe_layer_get_stats(L)->capacity, first[E] = {0}, second[E] = {0}, dropped = 0;
    assert_int_equal(C, 18); /* ceil(0.75 * 96 * 2 / 8) */
    for (int t = 0; t < T; t++) first[r->expert[t * 2]]++;
    for (int t = 0; t < T; t++) {
        int e1 = r->expert[t * 2], e2 = r->expert[t * 2 + 1];
        int loc1 = 0, loc2 = first[e2] + second[e2]++; /* locations2 after every first choice */
        for (int u = 0; u < t; u++) loc1 += r->expert[u * 2] == e1;
        if (r->kept[t * 2] != (loc1 < C) || r->kept[t * 2 + 1] != (loc2 < C))
            fail_msg("token %d: kept (%d, %d), DeepSpeed's locations (%d, %d) of %d", t,
                     r->kept[t * 2], r->kept[t * 2 + 1], loc1, loc2, C);
        dropped += (loc1 >= C) + (loc2 >= C);
    }
    if (dropped == 0) fail_msg("nothing dropped: the case tests nothing");
    moe_layer_destroy(L);
}

/* Tutel's dynamic capacity: a call's own capacity factor routes, keeps and computes exactly as a
 * layer configured with it (fixed, dynamic, and dropless over a configured capacity), in
 * training and not; refused where the workspace is planned for the config's capacity. */
static void test_capacity_per_call(void **state) {
    (void)state;
    enum { T = 64, E = 8 };
    uint64_t seed = tu_seed();
    float z[T * E], out_a[T * E], out_b[T * E];
    tu_fill(z, T * E, seed, 43, -2, 2);
    const float cfs[] = {0.75f, -1.25f, 0};
    for (int i = 0; i < 3; i++)
        for (int training = 0; training < 2; training++) {
            moe_layer_config ca = identity_config(E, 2), cb = identity_config(E, 2);
            ca.capacity_factor = cfs[i];
            cb.capacity_factor = cfs[i] != 0 ? 0 : 1.0f; /* the call's factor must win */
            moe_layer *A = make_layer(&ca, T), *B = make_layer(&cb, T);
            moe_forward_args a = moe_forward_args_default(), b = a;
            a.training = b.training = training;
            b.capacity_set = 1, b.capacity_factor = cfs[i];
            assert_int_equal(moe_layer_forward(A, out_a, z, T, &a), MOE_OK);
            assert_int_equal(moe_layer_forward(B, out_b, z, T, &b), MOE_OK);
            const moe_routing *ra = moe_layer_get_routing(A), *rb = moe_layer_get_routing(B);
            assert_int_equal(moe_layer_get_stats(A)->capacity, moe_layer_get_stats(B)->capacity);
            assert_memory_equal(ra->kept, rb->kept, (size_t)T * 2);
            assert_memory_equal(out_a, out_b, sizeof out_a);
            if (cfs[i] > 0) assert_true(moe_layer_get_stats(B)->dropped > 0); /* it bites */
            moe_layer_destroy(A);
            moe_layer_destroy(B);
        }
    moe_layer_config c = identity_config(E, 2);
    c.capacity_factor = 1.0f, c.pad_to_capacity = 1;
    moe_layer *L = make_layer(&c, T);
    moe_forward_args a = moe_forward_args_default();
    a.capacity_set = 1, a.capacity_factor = 2.0f;
    assert_int_equal(moe_layer_forward(L, out_a, z, T, &a), MOE_ERR_INVALID);
    assert_non_null(strstr(moe_last_error(), "without padding to capacity"));
    moe_layer_destroy(L);
}

/* T tokens with the logits (top, 1, 0, -1) each (malloc'ed) */
static float *same_logits(int T, float top) {
    float *z = malloc(sizeof(float) * (size_t)T * 4);
    for (int t = 0; t < T; t++) z[t * 4] = top, z[t * 4 + 1] = 1, z[t * 4 + 2] = 0, z[t * 4 + 3] = -1;
    return z;
}

/* DeepSpeed's sampled second choice: every token has logits (3, 1, 0, -1), so its first choice
 * is expert 0 and its second a draw from the softmax of the others, e^1 : e^0 : e^-1 = 0.665 :
 * 0.245 : 0.090 (each share within 4.5 standard deviations over 4000 tokens); the ordinary
 * top-2 outside training. */
static void test_sample_second(void **state) {
    (void)state;
    enum { T = 4000 };
    moe_layer_config c = identity_config(4, 2);
    c.sample_second = 1;
    moe_layer *L = make_layer(&c, T);
    float *z = same_logits(T, 3);
    moe_forward_args a = moe_forward_args_default();
    const moe_routing *r = route(L, z, T, &a);
    int n[4] = {0};
    for (int t = 0; t < T; t++) {
        assert_int_equal(r->expert[t * 2], 0);
        n[r->expert[t * 2 + 1]]++;
    }
    double s = exp(1) + exp(0) + exp(-1), want[4] = {0, exp(1) / s, exp(0) / s, exp(-1) / s};
    for (int e = 1; e < 4; e++) {
        double f = (double)n[e] / T, sd = sqrt(want[e] * (1 - want[e]) / T);
        if (!(fabs(f - want[e]) < 4.5 * sd))
            fail_msg("expert %d second %.4f of the time, expected %.4f", e, f, want[e]);
    }
    assert_int_equal(n[0], 0);
    a.training = 0;
    r = route(L, z, T, &a);
    for (int t = 0; t < T; t++) assert_int_equal(r->expert[t * 2 + 1], 1);
    free(z);
    moe_layer_destroy(L);
}

/* DeepSpeed's noisy_gate_policy 'RSample': with logits (2, 1, 0, -1) for every token the top-1
 * choice is a draw from the softmax over all experts, e^2 : e^1 : e^0 : e^-1 (each share within
 * 4.5 standard deviations over 4000 tokens); the argmax outside training. */
static void test_sample_first(void **state) {
    (void)state;
    enum { T = 4000 };
    moe_layer_config c = identity_config(4, 1);
    c.sample_first = 1;
    c.pre_softmax = 1;
    moe_layer *L = make_layer(&c, T);
    float *z = same_logits(T, 2);
    moe_forward_args a = moe_forward_args_default();
    const moe_routing *r = route(L, z, T, &a);
    int n[4] = {0};
    for (int t = 0; t < T; t++) n[r->expert[t]]++;
    double s = exp(2) + exp(1) + exp(0) + exp(-1);
    for (int e = 0; e < 4; e++) {
        double want = exp(2 - e) / s, f = (double)n[e] / T, sd = sqrt(want * (1 - want) / T);
        if (!(fabs(f - want) < 4.5 * sd))
            fail_msg("expert %d chosen %.4f of the time, expected %.4f", e, f, want);
    }
    a.training = 0;
    r = route(L, z, T, &a);
    for (int t = 0; t < T; t++) assert_int_equal(r->expert[t], 0);
    free(z);
    moe_layer_destroy(L);
}

/* Tutel's gate noise: with equal logits, E = 2 and the softmax's top-1 weight w, the logits'
 * noisy difference is ±log(w / (1 - w)) ~ N(0, 2 (g / E)^2); its mean square over 4000 tokens
 * within 4.5 standard deviations (sqrt(2 / T) relative) of that; none outside training. */
static void test_gate_noise(void **state) {
    (void)state;
    enum { T = 4000 };
    moe_layer_config c = identity_config(2, 1);
    c.gate_noise = 3.0f;
    c.pre_softmax = 1;
    moe_layer *L = make_layer(&c, T);
    float *z = malloc(sizeof(float) * T * 2);
    for (int i = 0; i < 2 * T; i++) z[i] = 0.25f;
    moe_forward_args a = moe_forward_args_default();
    const moe_routing *r = route(L, z, T, &a);
    double ms = 0, want = 2 * (3.0 / 2) * (3.0 / 2);
    for (int t = 0; t < T; t++) ms += pow(logit(r->weight[t]), 2) / T;
    if (!(fabs(ms / want - 1) < 4.5 * sqrt(2.0 / T)))
        fail_msg("noisy logit differences: mean square %.4f, expected %.4f", ms, want);
    a.training = 0;
    r = route(L, z, T, &a);
    for (int t = 0; t < T; t++) assert_true(r->weight[t] == 0.5f);
    free(z);
    moe_layer_destroy(L);
}

/* Capacity arithmetic: E = 4, k = 1, T = 40, so T*k/E = 10. */
static void test_capacity_arithmetic(void **state) {
    (void)state;
    uint64_t seed = tu_seed();
    const struct {
        float cf;
        int min_cap, masked, expect; /* expect -1: dynamic, min(max count, 20) */
    } cases[] = {
        {1.0f, 0, 0, 10},  /* exact multiple */
        {1.1f, 0, 0, 11},  /* 1.1 * 10 = 11.000000x in floating point: still 11 */
        {1.25f, 0, 0, 13}, /* ceil(12.5) */
        {0.5f, 15, 0, 15}, /* min_capacity dominates */
        {9.0f, 0, 0, 40},  /* never more than the tokens */
        {1.0f, 0, 10, 8},  /* 30 valid tokens: ceil(7.5) */
        {-2.0f, 0, 0, -1}, /* dynamic: min(max count, ceil(2 * 10)) */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        moe_layer_config c = identity_config(4, 1);
        c.capacity_factor = cases[i].cf;
        c.min_capacity = cases[i].min_cap;
        moe_layer *L = make_layer(&c, 40);
        float z[160];
        tu_fill(z, 160, seed, 2 + i, -1, 1);
        for (int t = 0; t < 40; t++) z[t * 4] += t < 30 ? 1.0f : 0.0f; /* load expert 0 */
        uint8_t mask[40];
        for (int t = 0; t < 40; t++) mask[t] = t >= cases[i].masked;
        moe_forward_args a = moe_forward_args_default();
        a.mask = mask;
        route(L, z, 40, &a);
        const moe_layer_stats *st = moe_layer_get_stats(L);
        int expect = cases[i].expect;
        if (expect < 0) {
            int64_t mx = 0;
            for (int e = 0; e < 4; e++) mx = st->counts[e] > mx ? st->counts[e] : mx;
            expect = (int)(mx < 20 ? mx : 20);
        }
        if (st->capacity != expect) fail_msg("case %zu: capacity %d, expected %d", i, st->capacity, expect);
        int64_t kept = 0;
        for (int e = 0; e < 4; e++) {
            int64_t want = st->counts[e] < expect ? st->counts[e] : expect;
            assert_int_equal(st->kept[e], want);
            kept += st->kept[e];
        }
        assert_int_equal(st->routed, 40 - cases[i].masked);
        assert_int_equal(st->dropped, st->routed - kept);
        moe_layer_destroy(L);
    }
}

/* The capacity ceiling is exact for decimal factors, against integer arithmetic on the
 * factor's digits: ceil(num * Tv * k / (den * E)), on fresh random sizes (Tv up to 2^24, where
 * a relative tolerance of 1e-6 would swallow up to 500 slots) and on sizes a relative
 * tolerance rounded down. */
static void test_capacity_ceil(void **state) {
    (void)state;
    uint64_t seed = tu_seed();
    const struct {
        const char *text;
        int64_t num, den;
    } cf[] = {{"0.5", 1, 2},    {"1", 1, 1},     {"1.1", 11, 10},   {"1.25", 5, 4},
              {"1.37", 137, 100}, {"2.05", 41, 20}, {"0.3", 3, 10}, {"3.999", 3999, 1000}};
    float u[4 * 400];
    tu_fill(u, 4 * 400, seed, 99, 0, 1);
    for (int i = 0; i < 400; i++) {
        int c = i % 8, k = 1 + (int)(u[4 * i + 1] * 8), E = 1 + (int)(u[4 * i + 2] * 512);
        int64_t Tv = 1 + (int64_t)(u[4 * i] * (1 << 24));
        if (i % 3 == 0) Tv = Tv / (cf[c].den * E) * (cf[c].den * E); /* whole numbers too */
        if (Tv < 1) Tv = 1;
        int64_t want = (cf[c].num * Tv * k + cf[c].den * E - 1) / (cf[c].den * E);
        int64_t got = moe_capacity_ceil(strtof(cf[c].text, NULL), Tv, k, E);
        if (got != want)
            fail_msg("cf %s, Tv %lld, k %d, E %d: %lld, expected %lld", cf[c].text, (long long)Tv,
                     k, E, (long long)got, (long long)want);
    }
    assert_int_equal(moe_capacity_ceil(1.0f, 1048577, 1, 64), 16385);
    assert_int_equal(moe_capacity_ceil(1.0f, 1048833, 1, 256), 4098);
    assert_int_equal(moe_capacity_ceil(1.0f, 20000001, 6, 160), 750001);
    assert_int_equal(moe_capacity_ceil(1.1f, 2500, 1, 10), 275); /* 275.00000000000006 in double */
    assert_int_equal(moe_capacity_ceil(1e-30f, 1000, 2, 8), 1);
    assert_int_equal(moe_capacity_ceil(1e30f, 1000, 2, 8), INT64_MAX);
}

/* Fake balanced gate, noise 0: slot j of the n-th valid token goes to ((n*k + j) mod A) +
 * skip with A = E - skip, weight route_scale / k. E = 5, skip 1, k = 2, token 1 masked. */
static void test_fake_round_robin(void **state) {
    (void)state;
    moe_layer_config c = identity_config(5, 2);
    c.router = MOE_ROUTER_FAKE_BALANCED;
    c.fake_skip_first = 1;
    c.route_scale = 3.0f;
    moe_layer *L = make_layer(&c, 5);
    float z[25];
    tu_fill(z, 25, tu_seed(), 4, -1, 1);
    const uint8_t mask[5] = {1, 0, 1, 1, 1};
    moe_forward_args a = moe_forward_args_default();
    a.mask = mask;
    /* valid tokens 0, 2, 3, 4 are n = 0..3: (1,2) (3,4) (1,2) (3,4); masked: -1 */
    const int ex[10] = {1, 2, -1, -1, 3, 4, 1, 2, 3, 4};
    const double w[10] = {1.5, 1.5, 0, 0, 1.5, 1.5, 1.5, 1.5, 1.5, 1.5};
    expect_slots(route(L, z, 5, &a), ex, w, 10);
    assert_int_equal(moe_layer_get_stats(L)->counts[0], 0);
    moe_layer_destroy(L);
}

/* Expert-bias update: k = 1, counts (5, 2, 1, 0), mean 2: b0 -= rate, b1 unchanged,
 * b2 and b3 += rate. Inference forwards do not count; the accumulators reset. */
static void test_bias_update_sign(void **state) {
    (void)state;
    moe_layer_config c = identity_config(4, 1);
    c.score = MOE_SCORE_SIGMOID;
    c.enable_expert_bias = 1;
    c.bias_update_rate = 0.01f;
    moe_layer *L = make_layer(&c, 8);
    float z[32] = {0};
    const int pick[8] = {0, 0, 0, 0, 0, 1, 1, 2};
    for (int t = 0; t < 8; t++) z[t * 4 + pick[t]] = 2;
    moe_forward_args a = moe_forward_args_default();
    route(L, z, 8, &a);
    a.training = 0;
    route(L, z, 8, &a); /* not counted */
    const int64_t *acc = moe_layer_accum_counts(L);
    assert_int_equal(acc[0], 5);
    assert_int_equal(acc[3], 0);
    assert_int_equal(*moe_layer_accum_tokens(L), 8);
    moe_layer_step_end(L);
    const float *b = moe_layer_expert_bias(L);
    assert_float_equal(b[0], -0.01f, 1e-9);
    assert_float_equal(b[1], 0.0f, 0);
    assert_float_equal(b[2], 0.01f, 1e-9);
    assert_float_equal(b[3], 0.01f, 1e-9);
    for (int e = 0; e < 4; e++) assert_int_equal(moe_layer_accum_counts(L)[e], 0);
    assert_int_equal(*moe_layer_accum_tokens(L), 0);
    moe_layer_destroy(L);
}

/* Quantile balancing by hand: E = 3, k = 1, the logits below; alpha_t is each row's second
 * largest, the margins z - alpha per column, and beta_local the (floor(Tv / 3) + 1)-th largest
 * margin of each column. All six tokens: columns (2 1 2 -1 0 1), (0 -1 0 2 0 0), (-1 0 -1 0 4
 * -1), the third largest 1, 0, 0. Without the last token: the second largest 2, 0, 0. An
 * inference call adds nothing. step_end with ema 0.5 and a prior b = (0.3, 0, -0.3), beta = -b:
 * 0.5 (-0.3, 0, 0.3) + 0.5 (3, 0, 0) / 2 = (0.6, 0, 0.15), less its mean 0.25: b = (-0.35,
 * 0.25, 0.1). */
static void test_qb_by_hand(void **state) {
    (void)state;
    moe_layer_config c = identity_config(3, 1);
    c.quantile_balancing = 1;
    c.qb_ema = 0.5f;
    moe_layer *L = make_layer(&c, 6);
    const float z[18] = {3, 1, 0, 2, 0, 1, 4, 2, 1, 0, 3, 1, 1, 1, 5, 2, 1, 0};
    const uint8_t mask[6] = {1, 1, 1, 1, 1, 0};
    moe_forward_args a = moe_forward_args_default();
    const double *qb = moe_layer_qb_accum(L);
    route(L, z, 6, &a);
    assert_true(qb[0] == 1 && qb[1] == 0 && qb[2] == 0 && qb[3] == 1);
    a.mask = mask;
    route(L, z, 6, &a);
    assert_true(qb[0] == 3 && qb[1] == 0 && qb[2] == 0 && qb[3] == 2);
    a.training = 0;
    route(L, z, 6, &a);
    assert_true(qb[0] == 3 && qb[3] == 2);
    float *b = moe_layer_expert_bias(L);
    b[0] = 0.3f, b[1] = 0, b[2] = -0.3f;
    moe_layer_step_end(L);
    assert_float_equal(b[0], -0.35f, 1e-6);
    assert_float_equal(b[1], 0.25f, 1e-6);
    assert_float_equal(b[2], 0.10f, 1e-6);
    for (int e = 0; e <= 3; e++) assert_true(qb[e] == 0);
    /* the bias now routes: expert 1's logit 1 + 0.25 beats expert 0's 1.2 - 0.35 */
    const float z2[3] = {1.2f, 1.0f, 0.5f};
    assert_int_equal(route(L, z2, 1, &a)->expert[0], 1);
    moe_layer_destroy(L);
}

/* Quantile balancing steers the choices: logits N(0, 1) plus 2 for expert 0 and 1 for expert 1
 * (Megatron's test of one update, here over steps with fresh tokens). The largest load over
 * the mean falls from 3.4 to 1.13-1.28 from the third step on (ema 0: each step's bias is one
 * call's estimate from 512 tokens), and the biases undo the preference: b0 and b1 lie 2 and 1
 * below the others' mean (-1.96 to -2.08 and -0.9 to -1.07 seen). */
static void test_qb_balances(void **state) {
    (void)state;
    int E = 8, k = 2, T = 512;
    moe_layer_config c = identity_config(E, k);
    c.quantile_balancing = 1;
    moe_layer *L = make_layer(&c, T);
    float *z = malloc(sizeof(float) * (size_t)T * E);
    double first = 0, later = 0;
    for (int step = 0; step < 6; step++) {
        for (int i = 0; i < T * E; i++)
            z[i] = (float)moe_rng_normal(tu_seed(), 40 + (uint64_t)step, (uint64_t)i);
        for (int t = 0; t < T; t++) z[t * E] += 2.0f, z[t * E + 1] += 1.0f;
        moe_forward_args a = moe_forward_args_default();
        route(L, z, T, &a);
        const int64_t *n = moe_layer_get_stats(L)->counts;
        double mx = 0;
        for (int e = 0; e < E; e++) mx = n[e] > mx ? (double)n[e] : mx;
        mx /= (double)T * k / E;
        if (step == 0) first = mx;
        if (step >= 2) later = mx > later ? mx : later;
        moe_layer_step_end(L);
    }
    const float *b = moe_layer_expert_bias(L);
    double rest = 0;
    for (int e = 2; e < E; e++) rest += b[e] / (E - 2);
    assert_true(first > 2.5); /* expert 0 in most tokens' top two */
    assert_true(later < 1.4);
    assert_true(fabs(b[0] - rest + 2) < 0.25 && fabs(b[1] - rest + 1) < 0.25);
    free(z);
    moe_layer_destroy(L);
}

/* Tutel's cosine router by hand: P = d = 2, W_p = I, b_p = 0, the experts' directions (1, 0),
 * (0, 1), (-1, 0) and (3, 3) (their lengths do not count): token (5, 0) has the cosines 1, 0,
 * -1, 0.7071, times the gain 1 / t = 2 (tau = ln 2): logits 2, 0, -2, 1.4142, experts 0 and 3,
 * the first weight 1 / (1 + e^(1.4142 - 2)). With tau = 6 the gain is clamped at 100: the
 * first weight 1 / (1 + e^-29.29), and tau's gradient 0 (non-zero below the clamp). */
static void test_cosine_router(void **state) {
    (void)state;
    moe_layer_config c = identity_config(4, 2);
    c.d = 2;
    c.cosine_dim = 2;
    c.cosine_init_t = 0.5f;
    moe_layer *L;
    assert_int_equal(moe_layer_create(&c, 1, NULL, NULL, &L), MOE_OK);
    moe_layer_init_params(L, tu_seed(), 0.1f);
    moe_layer_params p = moe_layer_get_params(L), g = moe_layer_get_grads(L);
    assert_null(p.router_w);
    assert_true(fabsf(p.cos_temp[0] - logf(2.0f)) < 1e-7f); /* ln(1 / init_t) */
    const float w[4] = {1, 0, 0, 1}, s[8] = {1, 0, 0, 1, -1, 0, 3, 3}, x[2] = {5, 0}, dy[2] = {1, -1};
    memcpy(p.cos_proj_w, w, sizeof w);
    memcpy(p.cos_sim, s, sizeof s);
    p.cos_proj_b[0] = p.cos_proj_b[1] = 0;
    float out[2], dx[2];
    for (int clamp = 0; clamp < 2; clamp++) {
        p.cos_temp[0] = clamp ? 6.0f : logf(2.0f);
        moe_forward_args a = moe_forward_args_default();
        const int ex[2] = {0, 3};
        double z3 = (clamp ? 100 : 2) * sqrt(0.5), z0 = clamp ? 100 : 2;
        const double wt[2] = {1 / (1 + exp(z3 - z0)), 1 / (1 + exp(z0 - z3))};
        expect_slots(route(L, x, 1, &a), ex, wt, 2);
        moe_layer_zero_grads(L);
        assert_int_equal(moe_layer_forward(L, out, x, 1, &a), MOE_OK);
        assert_int_equal(moe_layer_backward(L, dx, dy, x), MOE_OK);
        if (clamp) assert_true(g.cos_temp[0] == 0);
        else assert_true(g.cos_temp[0] != 0);
    }
    moe_layer_destroy(L);
}

/* Routing replay's input: a masked token's entries are not read; an expert out of range, or a
 * router other than top-k, is refused. */
static void test_replay_checks(void **state) {
    (void)state;
    moe_layer_config c = identity_config(4, 2);
    moe_layer *L = make_layer(&c, 3);
    float z[12], out[12];
    tu_fill(z, 12, tu_seed(), 8, -1, 1);
    int32_t rp[6] = {3, 0, -7, 99, 1, 2};
    const uint8_t mask[3] = {1, 0, 1};
    moe_forward_args a = moe_forward_args_default();
    a.replay = rp;
    a.mask = mask;
    const int ex[6] = {3, 0, -1, -1, 1, 2};
    expect_slots(route(L, z, 3, &a), ex, NULL, 6);
    a.mask = NULL;
    assert_int_equal(moe_layer_forward(L, out, z, 3, &a), MOE_ERR_INVALID);
    assert_non_null(strstr(moe_last_error(), "token 1's choice 0 is expert -7"));
    moe_layer_destroy(L);
    c.router = MOE_ROUTER_SINKHORN;
    L = make_layer(&c, 3);
    a.mask = mask;
    assert_int_equal(moe_layer_forward(L, out, z, 3, &a), MOE_ERR_INVALID);
    moe_layer_destroy(L);
}

/* Quantile balancing's conflicts: named at validation, and a training call's k = E. */
static void test_qb_refused(void **state) {
    (void)state;
    moe_layer_config c = identity_config(4, 2);
    c.quantile_balancing = 1;
    assert_int_equal(moe_layer_config_validate(&c), MOE_OK);
    moe_layer_config bad = c;
    bad.enable_expert_bias = 1;
    assert_int_equal(moe_layer_config_validate(&bad), MOE_ERR_INVALID);
    bad = c, bad.lb_type = MOE_LB_AUX, bad.aux_coeff = 0.01f;
    assert_int_equal(moe_layer_config_validate(&bad), MOE_ERR_INVALID);
    assert_non_null(strstr(moe_last_error(), "aux losses must be off"));
    bad = c, bad.topk = 4;
    assert_int_equal(moe_layer_config_validate(&bad), MOE_ERR_INVALID);
    bad = c, bad.qb_ema = 1;
    assert_int_equal(moe_layer_config_validate(&bad), MOE_ERR_INVALID);
    moe_layer *L = make_layer(&c, 4);
    float z[16], out[16];
    tu_fill(z, 16, tu_seed(), 7, -1, 1);
    moe_forward_args a = moe_forward_args_default();
    a.topk = 4;
    assert_int_equal(moe_layer_forward(L, out, z, 4, &a), MOE_ERR_INVALID);
    assert_non_null(strstr(moe_last_error(), "(k+1)-th choice"));
    a.training = 0; /* inference takes every expert */
    assert_int_equal(moe_layer_forward(L, out, z, 4, &a), MOE_OK);
    moe_layer_destroy(L);
}

/* GShard random routing of the second choice: threshold 1e-6 keeps every second slot
 * (u < w / 1e-6), threshold 1e6 drops them; first choices always stay. */
static void test_random_routing(void **state) {
    (void)state;
    for (int keep = 0; keep < 2; keep++) {
        moe_layer_config c = identity_config(4, 2);
        c.random_routing = 1;
        c.random_routing_threshold = keep ? 1e-6f : 1e6f;
        moe_layer *L = make_layer(&c, 10);
        float z[40];
        tu_fill(z, 40, tu_seed(), 5, -1, 1);
        moe_forward_args a = moe_forward_args_default();
        const moe_routing *r = route(L, z, 10, &a);
        for (int t = 0; t < 10; t++) {
            assert_true(r->expert[2 * t] >= 0);
            assert_true(keep ? r->expert[2 * t + 1] >= 0 : r->expert[2 * t + 1] == -1);
        }
        assert_int_equal(moe_layer_get_stats(L)->routed, keep ? 20 : 10);
        moe_layer_destroy(L);
    }
}

/* Expert choice: E = 3, k = 1, T = 12 -> C = 4; each expert takes the 4 tokens with the
 * largest softmax score (computed here). */
static void test_expert_choice(void **state) {
    (void)state;
    moe_layer_config c = identity_config(3, 1);
    c.router = MOE_ROUTER_EXPERT_CHOICE;
    moe_layer *L = make_layer(&c, 12);
    float z[36];
    tu_fill(z, 36, tu_seed(), 6, -2, 2);
    moe_forward_args a = moe_forward_args_default();
    const moe_routing *r = route(L, z, 12, &a);
    assert_int_equal(r->n_slots, 12);
    assert_int_equal(moe_layer_get_stats(L)->capacity, 4);
    double p[12][3];
    for (int t = 0; t < 12; t++) {
        double s = 0;
        for (int e = 0; e < 3; e++) s += exp(z[t * 3 + e]);
        for (int e = 0; e < 3; e++) p[t][e] = exp(z[t * 3 + e]) / s;
    }
    for (int e = 0; e < 3; e++) {
        uint8_t taken[12] = {0};
        for (int i = 0; i < 4; i++) {
            int best = -1;
            for (int t = 0; t < 12; t++)
                if (!taken[t] && (best < 0 || p[t][e] > p[best][e])) best = t;
            taken[best] = 1;
            assert_int_equal(r->token[e * 4 + i], best);
            assert_int_equal(r->expert[e * 4 + i], e);
            assert_true(fabs(r->weight[e * 4 + i] - p[best][e]) < 1e-6);
        }
    }
    moe_layer_destroy(L);
}

/* Aux loss: uniform scores give exactly coeff (sum_e f_e = 1, P_e = 1/E). Two tokens with
 * logits (ln 3, 0): P = (0.75, 0.25), both pick expert 0, f = (1, 0):
 * aux = coeff * 2 * 0.75. z-loss: lse = ln 4 for each token: z_coeff * (ln 4)^2. */
static void test_aux_and_z_values(void **state) {
    (void)state;
    moe_layer_config c = identity_config(2, 1);
    c.lb_type = MOE_LB_AUX;
    c.aux_coeff = 0.01f;
    c.z_coeff = 0.001f;
    moe_layer *L = make_layer(&c, 4);
    moe_forward_args a = moe_forward_args_default();
    const float uni[8] = {0};
    route(L, uni, 4, &a);
    assert_true(fabs(moe_layer_get_stats(L)->aux_loss - 0.01) < 1e-9);
    assert_true(fabs(moe_layer_get_stats(L)->z_loss - 0.001 * log(2.0) * log(2.0)) < 1e-9);
    float z[4] = {(float)log(3.0), 0, (float)log(3.0), 0};
    route(L, z, 2, &a);
    assert_true(fabs(moe_layer_get_stats(L)->aux_loss - 0.01 * 2 * 0.75) < 1e-7);
    assert_true(fabs(moe_layer_get_stats(L)->z_loss - 0.001 * log(4.0) * log(4.0)) < 1e-7);
    moe_layer_destroy(L);
}

/* Masked tokens: output exactly 0 (shared expert included), counted nowhere. */
static void test_mask(void **state) {
    (void)state;
    moe_layer_config c = identity_config(4, 2);
    c.shared_ffn = 5;
    c.lb_type = MOE_LB_AUX;
    c.aux_coeff = 0.1f;
    moe_layer *L = make_layer(&c, 6);
    float z[24], out[24];
    tu_fill(z, 24, tu_seed(), 7, -1, 1);
    const uint8_t mask[6] = {1, 0, 1, 1, 0, 1};
    moe_forward_args a = moe_forward_args_default();
    a.mask = mask;
    tu_poison(out, 24);
    assert_int_equal(moe_layer_forward(L, out, z, 6, &a), MOE_OK);
    for (int t = 0; t < 6; t++)
        for (int i = 0; i < 4; i++) {
            if (!mask[t]) assert_true(out[t * 4 + i] == 0.0f);
            else assert_true(isfinite(out[t * 4 + i]) && out[t * 4 + i] != 0.0f);
        }
    const moe_layer_stats *st = moe_layer_get_stats(L);
    assert_int_equal(st->n_valid, 4);
    assert_int_equal(st->routed, 8);
    const moe_routing *r = moe_layer_get_routing(L);
    assert_int_equal(r->expert[2], -1);
    assert_int_equal(r->expert[9], -1);
    moe_layer_destroy(L);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_group_limited_deepseek),
        cmocka_unit_test(test_group_score_max), cmocka_unit_test(test_pre_post_softmax),
        cmocka_unit_test(test_ties_lower_index),       cmocka_unit_test(test_sinkhorn),
        cmocka_unit_test(test_sample_second),
        cmocka_unit_test(test_sample_first),
        cmocka_unit_test(test_capacity_deepspeed_top2),
        cmocka_unit_test(test_capacity_per_call),
        cmocka_unit_test(test_gate_noise),
        cmocka_unit_test(test_capacity_positions),     cmocka_unit_test(test_capacity_arithmetic),
        cmocka_unit_test(test_capacity_ceil),
        cmocka_unit_test(test_fake_round_robin),       cmocka_unit_test(test_bias_update_sign),
        cmocka_unit_test(test_qb_by_hand), cmocka_unit_test(test_qb_balances),
        cmocka_unit_test(test_qb_refused), cmocka_unit_test(test_cosine_router),
        cmocka_unit_test(test_replay_checks),
        cmocka_unit_test(test_random_routing),         cmocka_unit_test(test_expert_choice),
        cmocka_unit_test(test_aux_and_z_values),       cmocka_unit_test(test_mask),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
