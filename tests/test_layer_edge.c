/* Edge cases, determinism, and a clear error for every invalid option or call. */
#include "layer_fixture.h"
#include "moe/layer_internal.h"
#include "test_util.h"

#include <math.h>
#include <omp.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

static moe_layer_config small(void) {
    moe_layer_config c = moe_layer_config_default();
    c.d = 8;
    c.n_experts = 4;
    c.topk = 2;
    c.ffn = 6;
    c.lb_type = MOE_LB_AUX;
    c.aux_coeff = 0.1f;
    c.z_coeff = 0.01f;
    return c;
}

/* Forward + backward on T tokens; compares with the float64 reference; returns via out. */
static void run_and_compare(const char *what, const moe_layer_config *c, int T, const uint8_t *mask,
                            uint64_t seed) {
    layer_fixture f;
    fixture_init(&f, c, T > 0 ? T : 1, seed, 0.5f);
    size_t n = (size_t)T * c->d;
    float *x = malloc(sizeof(float) * (n + 1)), *out = malloc(sizeof(float) * (n + 1)),
          *dx = calloc(n + 1, sizeof(float));
    double *x64 = malloc(sizeof(double) * (n + 1));
    tu_fill(x, n, seed, 1, -1, 1);
    for (size_t i = 0; i < n; i++) x64[i] = x[i];
    tu_poison(out, n);
    moe_forward_args a = moe_forward_args_default();
    a.mask = mask;
    if (moe_layer_forward(f.layer, out, x, T, &a) != MOE_OK) fail_msg("%s: %s", what, moe_last_error());
    ref_args ra = {T, c->topk, mask, 0, 1, 0, f.bias, NULL, 0, NULL, NULL};
    ref_result r;
    ref_moe_forward(c, &f.ref, x64, &ra, &r);
    double mx = 0;
    for (size_t i = 0; i < n; i++) mx = fmax(mx, fabs(r.out[i]));
    tu_check_close(what, out, r.out, n, 2e-5 * (mx + 1e-6), 0);
    const moe_layer_stats *st = moe_layer_get_stats(f.layer);
    for (int e = 0; e < c->n_experts; e++) assert_int_equal(st->counts[e], r.counts[e]);
    assert_int_equal(st->capacity, r.capacity);
    moe_layer_zero_grads(f.layer);
    if (moe_layer_backward(f.layer, dx, out, x) != MOE_OK) fail_msg("%s backward: %s", what, moe_last_error());
    for (size_t i = 0; i < n; i++) assert_true(isfinite(dx[i]));
    const float *g = moe_layer_grad_data(f.layer);
    for (size_t i = 0; i < f.n_params; i++) assert_true(isfinite(g[i]));
    ref_result_free(&r);
    free(x), free(out), free(dx), free(x64);
    fixture_free(&f);
}

static void test_edge_shapes(void **state) {
    (void)state;
    uint64_t seed = tu_seed();
    moe_layer_config c = small();
    run_and_compare("T = 1", &c, 1, NULL, seed);
    c.topk = 4;
    run_and_compare("k = E", &c, 9, NULL, seed);
    c = small();
    c.n_experts = 1;
    c.topk = 1;
    run_and_compare("E = 1", &c, 7, NULL, seed);
    c = small();
    c.capacity_factor = 50;
    run_and_compare("capacity larger than T", &c, 5, NULL, seed);
    c = small();
    c.n_experts = 16; /* 16 experts, 3 tokens: most experts get nothing */
    run_and_compare("experts without tokens", &c, 3, NULL, seed);
}

/* Top-1 with the softmax after the top-k weighs the chosen expert 1 whatever the logits: the
 * router's weights get no gradient from the output (why training refuses it,
 * moe_model_config_validate_training); with the softmax before the top-k they do. */
static void test_top1_router_gradient(void **state) {
    (void)state;
    uint64_t seed = tu_seed();
    for (int pre = 0; pre < 2; pre++) {
        moe_layer_config c = small();
        c.topk = 1, c.pre_softmax = pre, c.lb_type = MOE_LB_NONE, c.aux_coeff = 0, c.z_coeff = 0;
        enum { T = 16 };
        layer_fixture f;
        fixture_init(&f, &c, T, seed, 0.5f);
        float x[T * 8], out[T * 8], g[T * 8], dx[T * 8] = {0};
        tu_fill(x, T * 8, seed, 1, -1, 1);
        tu_fill(g, T * 8, seed, 2, -1, 1);
        moe_forward_args a = moe_forward_args_default();
        assert_int_equal(moe_layer_forward(f.layer, out, x, T, &a), MOE_OK);
        moe_layer_zero_grads(f.layer);
        assert_int_equal(moe_layer_backward(f.layer, dx, g, x), MOE_OK);
        const float *gw = moe_layer_get_grads(f.layer).router_w;
        double mx = 0;
        for (int i = 0; i < c.n_experts * c.d; i++) mx = fmax(mx, fabs(gw[i]));
        if (pre) assert_true(mx > 1e-4);
        else assert_true(mx == 0);
        fixture_free(&f);
    }
}

/* Sigmoid scores that all underflow to 0 (logits near -1000): the aux loss normalises them
 * over the experts with Megatron-Core's 1e-20, so the loss and the gradients stay finite. */
static void test_sigmoid_scores_underflow(void **state) {
    (void)state;
    moe_layer_config c = small();
    c.score = MOE_SCORE_SIGMOID;
    enum { T = 6 };
    layer_fixture f;
    fixture_init(&f, &c, T, tu_seed(), 0.5f);
    float *w = moe_layer_get_params(f.layer).router_w;
    for (int i = 0; i < c.n_experts * c.d; i++) w[i] = -200.0f;
    float x[T * 8], out[T * 8], dx[T * 8] = {0};
    tu_fill(x, T * 8, tu_seed(), 3, 0.5f, 1); /* positive: every logit about -200 d x */
    moe_forward_args a = moe_forward_args_default();
    a.training = 1;
    assert_int_equal(moe_layer_forward(f.layer, out, x, T, &a), MOE_OK);
    assert_true(isfinite(moe_layer_get_stats(f.layer)->aux_loss));
    moe_layer_zero_grads(f.layer);
    assert_int_equal(moe_layer_backward(f.layer, dx, out, x), MOE_OK);
    const float *g = moe_layer_grad_data(f.layer);
    for (size_t i = 0; i < f.n_params; i++) assert_true(isfinite(g[i]));
    for (int i = 0; i < T * 8; i++) assert_true(isfinite(dx[i]));
    fixture_free(&f);
}

/* Every token to one expert: a router that strongly prefers expert 2. */
static void test_all_to_one_expert(void **state) {
    (void)state;
    moe_layer_config c = small();
    c.topk = 1;
    c.capacity_factor = 1.0f;
    layer_fixture f;
    fixture_init(&f, &c, 12, tu_seed(), 0.5f);
    float *w = moe_layer_get_params(f.layer).router_w;
    for (int i = 0; i < c.d; i++) w[2 * c.d + i] = 0, w[0 * c.d + i] = 0, w[1 * c.d + i] = 0, w[3 * c.d + i] = 0;
    moe_layer_get_params(f.layer).router_w[2 * c.d] = 50; /* z_2 = 50 x_0 with x_0 > 0 */
    float x[96], out[96], dx[96] = {0};
    tu_fill(x, 96, tu_seed(), 3, 0.5f, 1);
    moe_forward_args a = moe_forward_args_default();
    assert_int_equal(moe_layer_forward(f.layer, out, x, 12, &a), MOE_OK);
    const moe_layer_stats *st = moe_layer_get_stats(f.layer);
    assert_int_equal(st->counts[2], 12);
    assert_int_equal(st->capacity, 3); /* ceil(12 / 4) */
    assert_int_equal(st->kept[2], 3);
    assert_int_equal(st->dropped, 9);
    assert_int_equal(moe_layer_backward(f.layer, dx, out, x), MOE_OK);
    fixture_free(&f);
}

/* The layer keeps the mask as its forward saw it: the caller's buffer changed (or freed)
 * between forward and backward changes nothing, bitwise. */
static void test_mask_kept(void **state) {
    (void)state;
    uint64_t seed = tu_seed();
    moe_layer_config c = small();
    enum { T = 9 };
    layer_fixture f;
    fixture_init(&f, &c, T, seed, 0.5f);
    size_t n = (size_t)T * c.d;
    float x[T * 16], out[T * 16], dx[2][T * 16], *g[2];
    assert_true(n <= sizeof x / sizeof *x);
    tu_fill(x, n, seed, 1, -1, 1);
    uint8_t mask[T];
    for (int t = 0; t < T; t++) mask[t] = t % 3 != 1;
    for (int r = 0; r < 2; r++) {
        moe_forward_args a = moe_forward_args_default();
        a.mask = mask;
        assert_int_equal(moe_layer_forward(f.layer, out, x, T, &a), MOE_OK);
        if (r) memset(mask, 1, sizeof mask); /* the caller reuses its buffer */
        moe_layer_zero_grads(f.layer);
        memset(dx[r], 0, sizeof dx[r]);
        assert_int_equal(moe_layer_backward(f.layer, dx[r], out, x), MOE_OK);
        g[r] = malloc(sizeof(float) * f.n_params);
        memcpy(g[r], moe_layer_grad_data(f.layer), sizeof(float) * f.n_params);
        for (int t = 0; t < T; t++) mask[t] = t % 3 != 1;
    }
    assert_memory_equal(dx[0], dx[1], sizeof(float) * n);
    assert_memory_equal(g[0], g[1], sizeof(float) * f.n_params);
    free(g[0]), free(g[1]);
    fixture_free(&f);
}

/* A fully masked batch: zero output, zero losses and counts, zero input gradient. */
static void test_fully_masked(void **state) {
    (void)state;
    moe_layer_config c = small();
    c.shared_ffn = 4;
    layer_fixture f;
    fixture_init(&f, &c, 5, tu_seed(), 0.5f);
    float x[40], out[40], dx[40] = {0};
    tu_fill(x, 40, tu_seed(), 4, -1, 1);
    uint8_t mask[5] = {0};
    moe_forward_args a = moe_forward_args_default();
    a.mask = mask;
    assert_int_equal(moe_layer_forward(f.layer, out, x, 5, &a), MOE_OK);
    for (int i = 0; i < 40; i++) assert_true(out[i] == 0.0f);
    const moe_layer_stats *st = moe_layer_get_stats(f.layer);
    assert_int_equal(st->routed, 0);
    assert_true(st->aux_loss == 0 && st->z_loss == 0 && st->dropped_fraction == 0);
    moe_layer_zero_grads(f.layer);
    assert_int_equal(moe_layer_backward(f.layer, dx, out, x), MOE_OK);
    for (int i = 0; i < 40; i++) assert_true(dx[i] == 0.0f);
    const float *g = moe_layer_grad_data(f.layer);
    for (size_t i = 0; i < f.n_params; i++) assert_true(g[i] == 0.0f);
    fixture_free(&f);
}

/* Outputs and gradients of one forward + backward with the given thread count. */
static void run_once(const moe_layer_config *c, int T, int threads, uint64_t seed, float *out,
                     float *dx, float *grads) {
    omp_set_num_threads(threads);
    /* the call scratch the caller's, NaN between the forward and the backward: the backward
     * takes nothing from it (what it gathers, it gathers again) */
    size_t own, call;
    moe_layer_workspace_sizes(c, T, &own, &call);
    call = (call + 63) & ~(size_t)63;
    float *scratch = aligned_alloc(64, call);
    moe_layer *L;
    assert_int_equal(moe_layer_create_shared(c, T, NULL, NULL, 0, scratch, call, &L), MOE_OK);
    size_t np = moe_layer_param_count(c);
    tu_fill(moe_layer_param_data(L), np, seed, 501, -0.5f, 0.5f);
    float *x = malloc(sizeof(float) * (size_t)T * c->d);
    tu_fill(x, (size_t)T * c->d, seed, 8, -1, 1);
    moe_forward_args a = moe_forward_args_default();
    a.seq_len = 16;
    memset(dx, 0, sizeof(float) * (size_t)T * c->d);
    moe_layer_zero_grads(L);
    assert_int_equal(moe_layer_forward(L, out, x, T, &a), MOE_OK);
    tu_poison(scratch, call / sizeof(float));
    assert_int_equal(moe_layer_backward(L, dx, out, x), MOE_OK);
    memcpy(grads, moe_layer_grad_data(L), sizeof(float) * np);
    free(x);
    moe_layer_destroy(L);
    free(scratch);
}

/* Two threads twice (bitwise) and one thread (within rounding). With T = 1536 (384 rows an
 * expert) the two threads' experts gather their own rows (gather_in_parts), one thread's all
 * rows before. */
static void determinism_case(int T) {
    uint64_t seed = tu_seed();
    moe_layer_config c = small();
    c.d = 32;
    c.ffn = 24;
    c.n_experts = 8;
    c.shared_ffn = 16;
    c.capacity_factor = 1.25f;
    c.jitter_eps = 0.05f;
    c.lb_type = MOE_LB_SEQ_AUX;
    size_t n = (size_t)T * 32, np = moe_layer_param_count(&c);
    float *o[3], *d[3], *g[3];
    for (int r = 0; r < 3; r++) {
        o[r] = malloc(n * 4), d[r] = malloc(n * 4), g[r] = malloc(np * 4);
        run_once(&c, T, r < 2 ? 2 : 1, seed, o[r], d[r], g[r]);
    }
    omp_set_num_threads(2);
    /* the same thread count: bitwise */
    assert_memory_equal(o[0], o[1], n * 4);
    assert_memory_equal(d[0], d[1], n * 4);
    assert_memory_equal(g[0], g[1], np * 4);
    /* 1 vs 2 threads (other GEMM libraries for the expert blocks, so other summation orders):
     * within 1e-6 relative to the magnitude at T = 64; the weight gradients sum over the
     * tokens, and the rounding of a sum of T terms grows as sqrt(T) (1.04e-6 seen at
     * T = 1536 over 25 seeds, against 4.9e-6 allowed) */
    double so = 0, sg = 0, tol = 1e-6 * sqrt(T / 64.0);
    for (size_t i = 0; i < n; i++) so = fmax(so, fabs(o[0][i]));
    for (size_t i = 0; i < np; i++) sg = fmax(sg, fabs(g[0][i]));
    for (size_t i = 0; i < n; i++) assert_true(fabs(o[0][i] - o[2][i]) <= tol * so);
    for (size_t i = 0; i < np; i++) assert_true(fabs(g[0][i] - g[2][i]) <= tol * sg);
    for (int r = 0; r < 3; r++) free(o[r]), free(d[r]), free(g[r]);
}

static void test_determinism(void **state) {
    (void)state;
    determinism_case(64);
    determinism_case(1536);
}

/* Each invalid configuration: MOE_ERR_INVALID from validate and create, naming the option. */
static void test_invalid_configs(void **state) {
    (void)state;
    typedef struct {
        const char *needle;
        int field;
        double value;
    } bad;
    enum { TOPK, NEXP, GROUPS, GTOPK, AUX, Z, JIT, D, FFN, RES, ACT, ROUTER, SCORE, CF_EC, EVAL_EC, EVAL_NAN, LG_NEG, LG_EC, LG_DROPLESS, NOISE, NOISE_EC, LI_NOISE, LI_SIGMOID, PAD, GATE,
           RATE, SKIP, SINK, SCALE, RRT, MINCAP, SHARED, SINK_SCORE, EC_PRE, SINK_NORM };
    const bad list[] = {
        {"moe-router-topk (5) must be between 1 and num-experts (4)", TOPK, 5},
        {"moe-router-topk (0)", TOPK, 0},
        {"num-experts must be >= 1", NEXP, 0},
        {"num-experts (65537) must be at most 65536", NEXP, MOE_MAX_EXPERTS + 1},
        {"moe-router-num-groups (3) must divide num-experts (4)", GROUPS, 3},
        {"moe-router-group-topk (3) must be between 1 and moe-router-num-groups (2)", GTOPK, 3},
        {"moe-aux-loss-coeff must be a non-negative number", AUX, -0.5},
        {"moe-aux-loss-coeff must be a non-negative number (got nan)", AUX, NAN},
        {"moe-z-loss-coeff must be a non-negative number", Z, INFINITY},
        {"moe-input-jitter-eps must be in [0, 1)", JIT, 1.5},
        {"hidden size must be >= 1", D, 0},
        {"moe-ffn-hidden-size must be >= 1", FFN, -3},
        {"moe-use-residual needs a residual MLP", RES, 1},
        {"unknown activation 9", ACT, 9},
        {"unknown router type 7", ROUTER, 7},
        {"unknown score function -1", SCORE, -1},
        {"expert-choice routing needs moe-expert-capacity-factor >= 0", CF_EC, -1},
        {"expert-choice routing needs moe-eval-capacity-factor >= 0 (got -2)", EVAL_EC, -2},
        {"moe-eval-capacity-factor must be a number (got nan)", EVAL_NAN, NAN},
        {"moe-local-group-size must be >= 0 (got -4)", LG_NEG, -4},
        {"moe-local-group-size (GShard's local groups) is for token-choice routing", LG_EC, 8},
        {"moe-local-group-size sets the groups a capacity applies to", LG_DROPLESS, 8},
        {"moe-gate-noise must be a non-negative number (got -1)", NOISE, -1},
        {"moe-gate-noise (Tutel's) is for the topk router", NOISE_EC, 1},
        {"load_importance (Tutel's loss) needs moe-gate-noise > 0", LI_NOISE, 0},
        {"load_importance (Tutel's loss) needs moe-gate-noise > 0", LI_SIGMOID, 1},
        {"moe-pad-expert-input-to-capacity needs moe-expert-capacity-factor != 0", PAD, 1},
        {"moe-shared-expert-gate needs moe-shared-expert-intermediate-size > 0", GATE, 1},
        {"moe-router-bias-update-rate must be a non-negative number", RATE, -1},
        {"moe-fake-gate-skip-first-n (4) must be below num-experts (4)", SKIP, 4},
        {"moe-sinkhorn-tol must be positive", SINK, 0},
        {"moe-router-topk-scaling-factor must be a positive number", SCALE, 0},
        {"moe-random-routing-threshold must be positive", RRT, -1},
        {"moe-min-capacity must be >= 0", MINCAP, -1},
        {"moe-shared-expert-intermediate-size must be >= 0", SHARED, -2},
        {"sinkhorn routing weighs its choices itself", SINK_SCORE, MOE_SCORE_SIGMOID},
        {"expert-choice routing weighs its choices itself", EC_PRE, 1},
        {"sinkhorn routing weighs its choices itself", SINK_NORM, MOE_NORM_ON},
    };
    for (size_t i = 0; i < sizeof list / sizeof list[0]; i++) {
        moe_layer_config c = small();
        double v = list[i].value;
        switch (list[i].field) {
        case TOPK: c.topk = (int)v; break;
        case NEXP: c.n_experts = (int)v; break;
        case GROUPS: c.n_groups = (int)v; break;
        case GTOPK: c.n_groups = 2, c.group_topk = (int)v; break;
        case AUX: c.aux_coeff = (float)v; break;
        case Z: c.z_coeff = (float)v; break;
        case JIT: c.jitter_eps = (float)v; break;
        case D: c.d = (int)v; break;
        case FFN: c.ffn = (int)v; break;
        case RES: c.residual = 1; break;
        case ACT: c.act = (moe_activation)v; break;
        case ROUTER: c.router = (moe_router_type)v; break;
        case SCORE: c.score = (moe_score_fn)v; break;
        case CF_EC: c.router = MOE_ROUTER_EXPERT_CHOICE, c.lb_type = MOE_LB_NONE, c.capacity_factor = (float)v; break;
        case EVAL_EC: c.router = MOE_ROUTER_EXPERT_CHOICE, c.lb_type = MOE_LB_NONE, c.eval_capacity_factor = (float)v; break;
        case EVAL_NAN: c.eval_capacity_factor = (float)v; break;
        case LG_NEG: c.capacity_factor = 1, c.local_group_size = (int)v; break;
        case LG_EC:
            c.router = MOE_ROUTER_EXPERT_CHOICE, c.lb_type = MOE_LB_NONE;
            c.local_group_size = (int)v;
            break;
        case LG_DROPLESS: c.local_group_size = (int)v; break;
        case NOISE: c.gate_noise = (float)v; break;
        case LI_NOISE: c.lb_type = MOE_LB_LOAD_IMPORTANCE, c.gate_noise = (float)v; break;
        case LI_SIGMOID:
            c.lb_type = MOE_LB_LOAD_IMPORTANCE, c.gate_noise = (float)v;
            c.score = MOE_SCORE_SIGMOID;
            break;
        case NOISE_EC: c.router = MOE_ROUTER_EXPERT_CHOICE, c.lb_type = MOE_LB_NONE, c.gate_noise = (float)v; break;
        case PAD: c.pad_to_capacity = 1; break;
        case GATE: c.shared_gate = 1; break;
        case RATE: c.bias_update_rate = (float)v; break;
        case SKIP: c.router = MOE_ROUTER_FAKE_BALANCED, c.lb_type = MOE_LB_NONE, c.fake_skip_first = (int)v; break;
        case SINK: c.sinkhorn_tol = (float)v; break;
        case SCALE: c.route_scale = (float)v; break;
        case RRT: c.random_routing = 1, c.random_routing_threshold = (float)v; break;
        case MINCAP: c.min_capacity = (int)v; break;
        case SHARED: c.shared_ffn = (int)v; break;
        case SINK_SCORE: c.router = MOE_ROUTER_SINKHORN, c.lb_type = MOE_LB_NONE, c.score = (moe_score_fn)v; break;
        case EC_PRE: c.router = MOE_ROUTER_EXPERT_CHOICE, c.lb_type = MOE_LB_NONE, c.pre_softmax = (int)v; break;
        case SINK_NORM: c.router = MOE_ROUTER_SINKHORN, c.lb_type = MOE_LB_NONE, c.norm_topk = (moe_norm_topk)v; break;
        }
        moe_layer *L = NULL;
        assert_int_equal(moe_layer_config_validate(&c), MOE_ERR_INVALID);
        if (!strstr(moe_last_error(), list[i].needle))
            fail_msg("case %zu: message \"%s\" lacks \"%s\"", i, moe_last_error(), list[i].needle);
        assert_int_equal(moe_layer_create(&c, 4, NULL, NULL, &L), MOE_ERR_INVALID);
        assert_null(L);
        assert_non_null(strstr(moe_last_error(), list[i].needle));
    }
    /* an aux loss with a router that balances by itself */
    moe_layer_config c = small();
    c.router = MOE_ROUTER_SINKHORN;
    assert_int_equal(moe_layer_config_validate(&c), MOE_ERR_INVALID);
    assert_non_null(strstr(moe_last_error(), "needs the topk router"));
}

/* Call-time errors: too many tokens, per-call k > E, bad seq_len, NULL input, backward
 * without forward, backward twice. */
static void test_call_errors(void **state) {
    (void)state;
    moe_layer_config c = small();
    layer_fixture f;
    fixture_init(&f, &c, 8, tu_seed(), 0.5f);
    float x[80], out[80], dx[80] = {0};
    tu_fill(x, 80, tu_seed(), 9, -1, 1);
    moe_forward_args a = moe_forward_args_default();
    assert_int_equal(moe_layer_backward(f.layer, dx, x, x), MOE_ERR_STATE);
    assert_non_null(strstr(moe_last_error(), "without a forward"));
    assert_int_equal(moe_layer_forward(f.layer, out, x, 9, &a), MOE_ERR_INVALID);
    assert_int_equal(moe_layer_forward(f.layer, out, x, -1, &a), MOE_ERR_INVALID);
    assert_int_equal(moe_layer_forward(f.layer, out, NULL, 4, &a), MOE_ERR_INVALID);
    a.topk = 5;
    assert_int_equal(moe_layer_forward(f.layer, out, x, 8, &a), MOE_ERR_INVALID);
    a.topk = 0;
    a.seq_len = 3;
    assert_int_equal(moe_layer_forward(f.layer, out, x, 8, &a), MOE_ERR_INVALID);
    a.seq_len = 4;
    assert_int_equal(moe_layer_forward(f.layer, out, x, 8, &a), MOE_OK);
    assert_int_equal(moe_layer_backward(f.layer, dx, out, x), MOE_OK);
    assert_int_equal(moe_layer_backward(f.layer, dx, out, x), MOE_ERR_STATE);
    /* T = 0 is refused like any count outside 1..max_tokens */
    assert_int_equal(moe_layer_forward(f.layer, out, x, 0, &a), MOE_ERR_INVALID);
    assert_non_null(strstr(moe_last_error(), "token count 0 outside 1..8"));
    /* a per-call k larger than planned grows the workspace */
    a.topk = 4;
    a.seq_len = 0;
    assert_int_equal(moe_layer_forward(f.layer, out, x, 8, &a), MOE_OK);
    assert_int_equal(moe_layer_get_stats(f.layer)->topk, 4);
    assert_int_equal(moe_layer_get_stats(f.layer)->routed, 32);
    fixture_free(&f);
    assert_string_equal(moe_status_name(MOE_OK), "ok");
    assert_string_equal(moe_status_name(MOE_ERR_STATE), "invalid state");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_edge_shapes),    cmocka_unit_test(test_all_to_one_expert),
        cmocka_unit_test(test_top1_router_gradient), cmocka_unit_test(test_sigmoid_scores_underflow),
        cmocka_unit_test(test_fully_masked),   cmocka_unit_test(test_mask_kept),   cmocka_unit_test(test_determinism),
        cmocka_unit_test(test_invalid_configs), cmocka_unit_test(test_call_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
