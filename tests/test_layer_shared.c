/* Layers that share one call scratch (moe_layer_create_shared, as a model's MoE layers do):
 * all forwards, then all backwards in reverse order (a model's order), give bitwise the
 * outputs, input and weight gradients, losses and routing of each layer run alone with its
 * own scratch. Between calls the shared scratch is filled with NaN, as if other layers had
 * used it: a buffer that the backward reads from the forward, or that a call reads before
 * writing, shows here whichever configuration puts it in the scratch. */
#include "core/core.h"
#include "kernels/kernels.h"
#include "moe/layer_internal.h"
#include "test_util.h"

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#define N_CFG 7
#define T 24
#define SEQ 8

static moe_layer_config base(int id) {
    moe_layer_config c = moe_layer_config_default();
    c.d = 12;
    c.n_experts = 8;
    c.topk = 2;
    c.ffn = 10;
    c.lb_type = MOE_LB_AUX;
    c.aux_coeff = 0.1f;
    c.z_coeff = 0.01f;
    c.layer_id = id;
    return c;
}

/* One configuration per kind of state: jitter and a gated shared expert; Residual-MoE with
 * padded capacity and the float64 router; expert choice; Sinkhorn; DeepSeek's sigmoid
 * scores, selection bias and groups with a sequence aux loss; GShard's random routing with
 * dynamic capacity and expert biases; bf16 experts with a shared expert (where oneDNN is). */
static int configs(moe_layer_config *c) {
    int n = 0;
    c[n] = base(n);
    c[n].jitter_eps = 0.1f;
    c[n].shared_ffn = 6;
    c[n].shared_gate = 1;
    c[n].act = MOE_ACT_GEGLU;
    n++;
    c[n] = base(n);
    c[n].shared_ffn = 7;
    c[n].residual = 1;
    c[n].capacity_factor = 1.0f;
    c[n].pad_to_capacity = 1;
    c[n].router_fp64 = 1;
    n++;
    c[n] = base(n);
    c[n].router = MOE_ROUTER_EXPERT_CHOICE;
    c[n].lb_type = MOE_LB_NONE;
    c[n].aux_coeff = 0;
    c[n].capacity_factor = 1.5f;
    c[n].act = MOE_ACT_GELU;
    n++;
    c[n] = base(n);
    c[n].router = MOE_ROUTER_SINKHORN;
    c[n].topk = 1;
    c[n].lb_type = MOE_LB_NONE;
    c[n].aux_coeff = 0;
    c[n].shared_ffn = 5;
    n++;
    c[n] = base(n);
    c[n].score = MOE_SCORE_SIGMOID;
    c[n].enable_expert_bias = 1;
    c[n].n_groups = 4;
    c[n].group_topk = 2;
    c[n].topk = 3;
    c[n].route_scale = 2.5f;
    c[n].lb_type = MOE_LB_SEQ_AUX;
    n++;
    c[n] = base(n);
    c[n].random_routing = 1;
    c[n].capacity_factor = -1.0f;
    c[n].drop_policy = MOE_DROP_POSITION;
    c[n].expert_bias = 1;
    c[n].act = MOE_ACT_RELU2;
    n++;
    if (moe_gemm_bf16_available()) {
        c[n] = base(n);
        c[n].expert_bf16 = 1;
        c[n].shared_ffn = 6;
        n++;
    }
    return n;
}

typedef struct {
    float *x, *out, *dout, *dx; /* [T, d] */
    moe_layer_stats stats;
    int n_slots;
    int32_t *expert; /* [n_slots] */
    float *weight;   /* [n_slots] */
} run_io;

static void io_init(run_io *io, const moe_layer_config *c, uint64_t seed, int i) {
    size_t n = (size_t)T * c->d;
    io->x = malloc(sizeof(float) * n);
    io->out = malloc(sizeof(float) * n);
    io->dout = malloc(sizeof(float) * n);
    io->dx = calloc(n, sizeof(float));
    io->expert = NULL;
    io->weight = NULL;
    tu_fill(io->x, n, seed, 10 + (uint64_t)i, -1, 1);
    tu_fill(io->dout, n, seed, 20 + (uint64_t)i, -1, 1);
}

static void io_free(run_io *io) {
    free(io->x), free(io->out), free(io->dout), free(io->dx), free(io->expert), free(io->weight);
}

/* Parameters and selection bias from (seed, layer), the same for both copies of a layer. */
static void init_layer(moe_layer *L, uint64_t seed) {
    const moe_layer_config *c = moe_layer_get_config(L);
    moe_layer_init_params(L, seed, 0.4f);
    tu_fill(moe_layer_expert_bias(L), (size_t)c->n_experts, seed, 30 + (uint64_t)c->layer_id,
            -0.05f, 0.05f);
    moe_layer_zero_grads(L);
}

static const uint8_t *mask(void) {
    static uint8_t m[T];
    for (int t = 0; t < T; t++) m[t] = t % 7 != 3; /* a few padding tokens */
    return m;
}

static void forward(moe_layer *L, run_io *io, int topk) {
    moe_forward_args a = moe_forward_args_default();
    a.training = 1;
    a.step = 3;
    a.loss_scale = 0.75f;
    a.mask = mask();
    a.seq_len = SEQ;
    a.topk = topk;
    if (moe_layer_forward(L, io->out, io->x, T, &a) != MOE_OK)
        fail_msg("layer %d forward: %s", moe_layer_get_config(L)->layer_id, moe_last_error());
    io->stats = *moe_layer_get_stats(L);
    const moe_routing *r = moe_layer_get_routing(L);
    io->n_slots = r->n_slots;
    io->expert = malloc(sizeof(int32_t) * (size_t)r->n_slots + 1);
    io->weight = malloc(sizeof(float) * (size_t)r->n_slots + 1);
    memcpy(io->expert, r->expert, sizeof(int32_t) * (size_t)r->n_slots);
    memcpy(io->weight, r->weight, sizeof(float) * (size_t)r->n_slots);
}

static void backward(moe_layer *L, run_io *io) {
    if (moe_layer_backward(L, io->dx, io->dout, io->x) != MOE_OK)
        fail_msg("layer %d backward: %s", moe_layer_get_config(L)->layer_id, moe_last_error());
}

static void same(const char *what, int id, const void *a, const void *b, size_t bytes) {
    if (memcmp(a, b, bytes) == 0) return;
    const unsigned char *p = a, *q = b;
    size_t i = 0;
    while (p[i] == q[i]) i++;
    fail_msg("layer %d: %s differ with the shared scratch (first at byte %zu of %zu)", id, what,
             i, bytes);
}

static void compare(moe_layer *shared, moe_layer *alone, const run_io *s, const run_io *a) {
    const moe_layer_config *c = moe_layer_get_config(alone);
    int id = c->layer_id;
    size_t n = sizeof(float) * (size_t)T * c->d;
    same("outputs", id, s->out, a->out, n);
    same("input gradients", id, s->dx, a->dx, n);
    same("weight gradients", id, moe_layer_grad_data(shared), moe_layer_grad_data(alone),
         sizeof(float) * moe_layer_param_count(c));
    assert_int_equal(s->n_slots, a->n_slots);
    same("routed experts", id, s->expert, a->expert, sizeof(int32_t) * (size_t)s->n_slots);
    same("routing weights", id, s->weight, a->weight, sizeof(float) * (size_t)s->n_slots);
    same("aux loss", id, &s->stats.aux_loss, &a->stats.aux_loss, sizeof(double));
    same("z loss", id, &s->stats.z_loss, &a->stats.z_loss, sizeof(double));
    same("counts", id, s->stats.counts, a->stats.counts, sizeof(int64_t) * (size_t)c->n_experts);
}

static void poison(float *scratch, size_t bytes) { tu_poison(scratch, bytes / sizeof(float)); }

/* topk: 0 (each layer's own k), or a larger per-call k for the layers that then outgrow the
 * shared scratch and plan their own. */
static void run(int topk) {
    uint64_t seed = tu_seed();
    moe_layer_config c[N_CFG];
    int n = configs(c);
    size_t bytes = 0;
    for (int i = 0; i < n; i++) {
        size_t own, call;
        moe_layer_workspace_sizes(&c[i], T, &own, &call);
        if (call > bytes) bytes = call;
    }
    bytes = (bytes + 63) & ~(size_t)63;
    float *scratch = aligned_alloc(64, bytes); /* 64-aligned as the layers' own */
    assert_non_null(scratch);
    moe_layer *sh[N_CFG], *al[N_CFG];
    run_io ios[N_CFG], ioa[N_CFG];
    for (int i = 0; i < n; i++) {
        assert_int_equal(moe_layer_create_shared(&c[i], T, NULL, NULL, 0, scratch, bytes, &sh[i]),
                         MOE_OK);
        assert_int_equal(moe_layer_create(&c[i], T, NULL, NULL, &al[i]), MOE_OK);
        init_layer(sh[i], seed);
        init_layer(al[i], seed);
        io_init(&ios[i], &c[i], seed, i);
        io_init(&ioa[i], &c[i], seed, i);
    }
    int k[N_CFG], outgrown = 0;
    for (int i = 0; i < n; i++)
        k[i] = topk && c[i].router == MOE_ROUTER_TOPK && c[i].n_groups == 1 ? topk : 0;
    for (int i = 0; i < n; i++) { /* alone: forward, backward */
        forward(al[i], &ioa[i], k[i]);
        backward(al[i], &ioa[i]);
    }
    for (int i = 0; i < n; i++) { /* shared: the forwards in order, the backwards in reverse */
        poison(scratch, bytes);
        forward(sh[i], &ios[i], k[i]);
    }
    for (int i = n - 1; i >= 0; i--) {
        poison(scratch, bytes);
        backward(sh[i], &ios[i]);
    }
    for (int i = 0; i < n; i++) {
        compare(sh[i], al[i], &ios[i], &ioa[i]);
        moe_layer_config ck = c[i];
        size_t own, call;
        ck.topk = k[i] ? k[i] : c[i].topk;
        moe_layer_workspace_sizes(&ck, T, &own, &call);
        outgrown += call > bytes;
        /* an outgrown layer plans its own scratch, as one alone */
        assert_true(moe_layer_workspace_bytes(al[i]) == own + call);
        assert_true(moe_layer_workspace_bytes(sh[i]) == own + (call > bytes ? call : 0));
        io_free(&ios[i]), io_free(&ioa[i]);
        moe_layer_destroy(sh[i]), moe_layer_destroy(al[i]);
    }
    free(scratch);
    if (topk) assert_true(outgrown > 0);
}

static void test_shared_scratch(void **state) {
    (void)state;
    run(0);
}

static void test_shared_scratch_outgrown(void **state) {
    (void)state;
    run(5);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_shared_scratch),
        cmocka_unit_test(test_shared_scratch_outgrown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
