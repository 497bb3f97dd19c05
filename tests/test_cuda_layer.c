/* The CUDA layer (include/moe_cuda.h) against the CPU layer with the same parameters, inputs
 * and selection biases: the same routing, outputs, input gradients, parameter gradients and
 * balancing losses (fp32 experts within fp32 rounding; bf16 experts against the fp32 CPU layer
 * within bf16 tolerance and measurably not fp32), bitwise repeatable, per-call top-k, and unsupported options refused.
 * Without a GPU (or in a build without CUDA) it says so and exits 77, which CTest counts as
 * skipped. */
#include "test_util.h"

#include "moe.h"
#include "moe_cuda.h"

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

typedef struct {
    float *out, *dx, *grads; /* [T, d], [T, d], [param_count] */
    int32_t *experts;        /* [T k] */
    float *weights;          /* [T k] */
    double aux, z;
} run_out;

typedef struct {
    int T, topk, seq_len;
    const uint8_t *mask;
    const float *params, *bias, *x, *dout;
} run_in;

static moe_forward_args args_of(const run_in *in) {
    moe_forward_args a = moe_forward_args_default();
    a.training = 1;
    a.topk = in->topk;
    a.seq_len = in->seq_len;
    a.mask = in->mask;
    a.loss_scale = 1.0f;
    return a;
}

static void alloc_out(const moe_layer_config *c, const run_in *in, run_out *r) {
    size_t n = (size_t)in->T * c->d, np = moe_layer_param_count(c);
    size_t S = (size_t)in->T * (in->topk ? in->topk : c->topk);
    r->out = malloc(n * 4), r->dx = malloc(n * 4), r->grads = malloc(np * 4);
    r->experts = malloc(S * 4), r->weights = malloc(S * 4);
    assert_non_null(r->out), assert_non_null(r->dx), assert_non_null(r->grads);
    assert_non_null(r->experts), assert_non_null(r->weights);
}

static void free_out(run_out *r) {
    free(r->out), free(r->dx), free(r->grads), free(r->experts), free(r->weights);
}

static void keep_routing(const moe_routing *rt, run_out *r) {
    memcpy(r->experts, rt->expert, sizeof(int32_t) * (size_t)rt->n_slots);
    memcpy(r->weights, rt->weight, sizeof(float) * (size_t)rt->n_slots);
}

static void run_cpu(const moe_layer_config *c, const run_in *in, run_out *r) {
    moe_layer *L;
    if (moe_layer_create(c, in->T, NULL, NULL, &L) != MOE_OK) fail_msg("create: %s", moe_last_error());
    size_t np = moe_layer_param_count(c), n = (size_t)in->T * c->d;
    alloc_out(c, in, r);
    memcpy(moe_layer_param_data(L), in->params, np * 4);
    if (in->bias) memcpy(moe_layer_expert_bias(L), in->bias, sizeof(float) * (size_t)c->n_experts);
    moe_layer_zero_grads(L);
    memset(r->dx, 0, n * 4);
    moe_forward_args a = args_of(in);
    if (moe_layer_forward(L, r->out, in->x, in->T, &a) != MOE_OK) fail_msg("%s", moe_last_error());
    assert_int_equal(moe_layer_backward(L, r->dx, in->dout, in->x), MOE_OK);
    memcpy(r->grads, moe_layer_grad_data(L), np * 4);
    keep_routing(moe_layer_get_routing(L), r);
    r->aux = moe_layer_get_stats(L)->aux_loss;
    r->z = moe_layer_get_stats(L)->z_loss;
    moe_layer_destroy(L);
}

static void check(moe_status s) {
    if (s != MOE_OK) fail_msg("%s", moe_last_error());
}

/* The same on the GPU; dx starts from a random gradient already there (backward adds). */
static void run_gpu(const moe_layer_config *c, const run_in *in, const float *dx0, run_out *r) {
    moe_cuda_layer *L;
    check(moe_cuda_layer_create(c, in->T, NULL, NULL, &L));
    size_t n = (size_t)in->T * c->d;
    alloc_out(c, in, r);
    float *x, *dout, *out, *dx;
    check(moe_cuda_alloc((void **)&x, n * 4));
    check(moe_cuda_alloc((void **)&dout, n * 4));
    check(moe_cuda_alloc((void **)&out, n * 4));
    check(moe_cuda_alloc((void **)&dx, n * 4));
    check(moe_cuda_to_device(x, in->x, n * 4));
    check(moe_cuda_to_device(dout, in->dout, n * 4));
    check(moe_cuda_to_device(dx, dx0, n * 4));
    check(moe_cuda_layer_set_params(L, in->params, in->bias));
    check(moe_cuda_layer_zero_grads(L));
    moe_forward_args a = args_of(in);
    check(moe_cuda_layer_forward(L, out, x, in->T, &a));
    check(moe_cuda_layer_backward(L, dx, dout, x));
    check(moe_cuda_to_host(r->out, out, n * 4));
    check(moe_cuda_to_host(r->dx, dx, n * 4));
    check(moe_cuda_layer_get_grads(L, r->grads));
    const moe_routing *rt;
    check(moe_cuda_layer_fetch_routing(L, &rt));
    keep_routing(rt, r);
    r->aux = moe_cuda_layer_get_stats(L)->aux_loss;
    r->z = moe_cuda_layer_get_stats(L)->z_loss;
    /* a second backward of one forward is refused, as on the CPU */
    assert_int_equal(moe_cuda_layer_backward(L, dx, dout, x), MOE_ERR_STATE);
    moe_cuda_free(x), moe_cuda_free(dout), moe_cuda_free(out), moe_cuda_free(dx);
    moe_cuda_layer_destroy(L);
}

/* Inference (training = 0) on the first T tokens of in: the output, the expert counts and the
 * losses on the GPU (cfg) against the CPU's (c32: fp32), within tol of the output's scale;
 * bitwise repeatable. */
static void compare_inference(const moe_layer_config *c, const moe_layer_config *c32,
                              const char *name, const run_in *in, int T, double tol) {
    int E = c->n_experts;
    size_t n = (size_t)T * c->d;
    moe_forward_args a = args_of(in);
    a.training = 0;
    a.seq_len = in->seq_len && T % in->seq_len == 0 ? in->seq_len : 0;
    moe_layer *cl;
    moe_cuda_layer *gl;
    check(moe_layer_create(c32, T, NULL, NULL, &cl));
    memcpy(moe_layer_param_data(cl), in->params, moe_layer_param_count(c32) * 4);
    if (in->bias) memcpy(moe_layer_expert_bias(cl), in->bias, sizeof(float) * (size_t)E);
    check(moe_cuda_layer_create(c, T, NULL, NULL, &gl));
    check(moe_cuda_layer_set_params(gl, in->params, in->bias));
    float *cpu = malloc(n * 4), *gpu = malloc(n * 4), *again = malloc(n * 4), *x, *out;
    assert_true(cpu && gpu && again);
    check(moe_layer_forward(cl, cpu, in->x, T, &a));
    check(moe_cuda_alloc((void **)&x, n * 4));
    check(moe_cuda_alloc((void **)&out, n * 4));
    check(moe_cuda_to_device(x, in->x, n * 4));
    check(moe_cuda_layer_forward(gl, out, x, T, &a));
    check(moe_cuda_to_host(gpu, out, n * 4));
    const moe_layer_stats *cs = moe_layer_get_stats(cl), *gs = moe_cuda_layer_get_stats(gl);
    for (int e = 0; e < E; e++)
        if (cs->counts[e] != gs->counts[e])
            fail_msg("%s, inference on %d tokens: expert %d has %lld rows on the GPU, %lld on the "
                     "CPU", name, T, e, (long long)gs->counts[e], (long long)cs->counts[e]);
    if (!(fabs(gs->aux_loss - cs->aux_loss) <= 1e-6 * fabs(cs->aux_loss)) ||
        !(fabs(gs->z_loss - cs->z_loss) <= 1e-6 * fabs(cs->z_loss)))
        fail_msg("%s, inference on %d tokens: losses aux %.9g z %.9g on the GPU, %.9g %.9g on "
                 "the CPU", name, T, gs->aux_loss, gs->z_loss, cs->aux_loss, cs->z_loss);
    double mean, e = tu_rel_err(gpu, cpu, n, &mean);
    if (!(e < tol))
        fail_msg("%s, inference on %d tokens: the output differs by %.3g of its scale", name, T,
                 e);
    if (c->expert_bf16 && !(e > 1e-4))
        fail_msg("%s, inference on %d tokens: bf16 within fp32 rounding (%.3g)", name, T, e);
    check(moe_cuda_layer_forward(gl, out, x, T, &a));
    check(moe_cuda_to_host(again, out, n * 4));
    assert_memory_equal(again, gpu, n * 4);
    printf("%-34s inference T %3d: output %.2g of scale\n", name, T, e);
    moe_cuda_free(x), moe_cuda_free(out);
    free(cpu), free(gpu), free(again);
    moe_layer_destroy(cl);
    moe_cuda_layer_destroy(gl);
}

/* GPU against CPU for one configuration. tol: relative to each tensor's largest entry. */
static void compare(moe_layer_config c, const char *name, int topk, int seq_len, int masked,
                    double tol) {
    uint64_t seed = tu_seed();
    int T = 128, k = topk ? topk : c.topk, E = c.n_experts;
    size_t np = moe_layer_param_count(&c), n = (size_t)T * c.d;
    float *p = malloc(np * 4), *x = malloc(n * 4), *g = malloc(n * 4), *dx0 = malloc(n * 4);
    float *bias = malloc(sizeof(float) * (size_t)E);
    uint8_t *mask = malloc((size_t)T);
    tu_fill(p, np, seed, 1, -0.2f, 0.2f);
    tu_fill(x, n, seed, 2, -1, 1);
    tu_fill(g, n, seed, 3, -1, 1);
    tu_fill(dx0, n, seed, 4, -1, 1);
    tu_fill(bias, (size_t)E, seed, 5, -0.05f, 0.05f);
    for (int t = 0; t < T; t++) mask[t] = !masked || (t % 7 != 3 && t % 11 != 5);
    run_in in = {T, topk, seq_len, masked ? mask : NULL, p, c.enable_expert_bias ? bias : NULL, x, g};
    run_out cpu, gpu, again;
    moe_layer_config c32 = c; /* bf16 experts against the fp32 CPU layer */
    c32.expert_bf16 = 0;
    run_cpu(&c32, &in, &cpu);
    for (size_t i = 0; i < n; i++) cpu.dx[i] += dx0[i];
    run_gpu(&c, &in, dx0, &gpu);
    for (int s = 0; s < T * k; s++)
        if (cpu.experts[s] != gpu.experts[s])
            fail_msg("%s: slot %d (token %d) routed to expert %d on the GPU, %d on the CPU", name,
                     s, s / k, gpu.experts[s], cpu.experts[s]);
    double mean;
    double ew = tu_rel_err(gpu.weights, cpu.weights, (size_t)T * k, &mean);
    if (!(ew < 1e-6)) fail_msg("%s: routing weights differ by %.3g", name, ew);
    const struct {
        const char *what;
        float *a, *b;
        size_t n;
    } cmp[] = {{"output", gpu.out, cpu.out, n}, {"dx", gpu.dx, cpu.dx, n},
               {"gradients", gpu.grads, cpu.grads, np}};
    for (int i = 0; i < 3; i++) {
        double e = tu_rel_err(cmp[i].a, cmp[i].b, cmp[i].n, &mean);
        if (!(e < tol))
            fail_msg("%s: GPU %s differs from the CPU's by %.3g of its scale (tolerance %.1g)",
                     name, cmp[i].what, e, tol);
        /* bf16 experts must not have computed in fp32 (fp32 differs by ~1e-6 of the scale) */
        if (c.expert_bf16 && !(e > 1e-4))
            fail_msg("%s: bf16 %s within fp32 rounding of the fp32 layer (%.3g): the bf16 path "
                     "did not run", name, cmp[i].what, e);
    }
    if (!(fabs(gpu.aux - cpu.aux) <= 1e-6 * fabs(cpu.aux)) ||
        !(fabs(gpu.z - cpu.z) <= 1e-6 * fabs(cpu.z)))
        fail_msg("%s: losses aux %.9g z %.9g on the GPU, %.9g %.9g on the CPU", name, gpu.aux,
                 gpu.z, cpu.aux, cpu.z);
    if ((c.aux_coeff > 0 && !(cpu.aux > 0)) || (c.z_coeff > 0 && !(cpu.z > 0)))
        fail_msg("%s: a balancing loss is zero: nothing was compared", name);
    /* bitwise repeatable */
    run_gpu(&c, &in, dx0, &again);
    assert_memory_equal(again.out, gpu.out, n * 4);
    assert_memory_equal(again.dx, gpu.dx, n * 4);
    assert_memory_equal(again.grads, gpu.grads, np * 4);
    printf("%-34s output %.2g  dx %.2g  grads %.2g of scale\n", name,
           tu_rel_err(gpu.out, cpu.out, n, &mean), tu_rel_err(gpu.dx, cpu.dx, n, &mean),
           tu_rel_err(gpu.grads, cpu.grads, np, &mean));
    /* inference: one token (decoding), a few, and as many as above */
    int Ts[4] = {1, 3, 32 / k, T};
    for (int i = 0; i < 4; i++) compare_inference(&c, &c32, name, &in, Ts[i], tol);
    free_out(&cpu), free_out(&gpu), free_out(&again);
    free(p), free(x), free(g), free(dx0), free(bias), free(mask);
}

static moe_layer_config small(void) {
    moe_layer_config c = moe_layer_config_default();
    c.d = 64, c.ffn = 96, c.n_experts = 8, c.topk = 2;
    return c;
}

/* Mixtral: softmax over the top-k logits, SwiGLU, aux and z losses. */
static void test_mixtral(void **state) {
    (void)state;
    moe_layer_config c = small();
    c.lb_type = MOE_LB_AUX, c.aux_coeff = 0.01f, c.z_coeff = 0.001f;
    compare(c, "softmax top-2, swiglu", 0, 0, 0, 1e-5);
    compare(c, "per-call top-4 (workspace regrown)", 4, 0, 0, 1e-5);
    c.expert_bf16 = 1;
    compare(c, "bf16 experts", 0, 0, 0, 1e-2);
}

/* DeepSeek-V3: sigmoid scores, groups, selection bias, renormalised and scaled weights,
 * sequence aux loss. */
static void test_deepseek(void **state) {
    (void)state;
    moe_layer_config c = small();
    c.n_experts = 16, c.topk = 4, c.score = MOE_SCORE_SIGMOID;
    c.n_groups = 4, c.group_topk = 2, c.group_score_topk = 2;
    c.enable_expert_bias = 1, c.route_scale = 2.5f;
    c.lb_type = MOE_LB_SEQ_AUX, c.aux_coeff = 0.001f;
    compare(c, "sigmoid, groups, bias, seq aux", 0, 32, 0, 1e-5);
    c.act = MOE_ACT_RELU2;
    compare(c, "the same with relu2 and a mask", 0, 32, 1, 1e-5);
    c.d = 62, c.ffn = 90; /* widths that are not multiples of 4 */
    compare(c, "the same, odd widths", 0, 32, 1, 1e-5);
}

/* Softmax before top-k, sqrt-softplus scores, GeGLU and GELU, masked tokens. */
static void test_scores(void **state) {
    (void)state;
    moe_layer_config c = small();
    c.pre_softmax = 1, c.topk = 3, c.act = MOE_ACT_GEGLU, c.z_coeff = 0.001f;
    compare(c, "pre-softmax top-3, geglu, mask", 0, 0, 1, 1e-5);
    c.score = MOE_SCORE_SQRTSOFTPLUS, c.norm_topk = MOE_NORM_ON, c.act = MOE_ACT_GELU;
    c.lb_type = MOE_LB_AUX, c.aux_coeff = 0.01f;
    compare(c, "sqrt-softplus, renormalised, gelu", 0, 0, 0, 1e-5);
    c.act = MOE_ACT_SILU, c.score = MOE_SCORE_SOFTMAX, c.pre_softmax = 0, c.topk = 1;
    compare(c, "switch top-1, silu", 0, 0, 0, 1e-5);
}

/* A shared expert beside the routed ones (DeepSeek, Qwen2-MoE), with and without its sigmoid
 * gate, masked tokens. */
static void test_shared(void **state) {
    (void)state;
    moe_layer_config c = small();
    c.shared_ffn = 40, c.aux_coeff = 0.01f, c.lb_type = MOE_LB_AUX;
    compare(c, "shared expert", 0, 0, 0, 1e-5);
    c.shared_gate = 1, c.act = MOE_ACT_GEGLU;
    compare(c, "gated shared expert, geglu, mask", 0, 0, 1, 1e-5);
    c.expert_bf16 = 1;
    compare(c, "the same, bf16 experts", 0, 0, 1, 1e-2);
}

static void test_refused(void **state) {
    (void)state;
    moe_layer_config c = small();
    c.capacity_factor = 1.25f;
    moe_cuda_layer *L = NULL;
    assert_int_equal(moe_cuda_layer_create(&c, 64, NULL, NULL, &L), MOE_ERR_INVALID);
    assert_null(L);
    assert_non_null(strstr(moe_last_error(), "capacity"));
    c = small();
    c.shared_ffn = 32, c.residual = 1;
    assert_int_equal(moe_cuda_layer_create(&c, 64, NULL, NULL, &L), MOE_ERR_INVALID);
    assert_non_null(strstr(moe_last_error(), "Residual"));
}

int main(void) {
    if (moe_cuda_device_count() < 1) {
        printf("test_cuda_layer: skipped: %s\n", moe_cuda_device_name());
        return 77;
    }
    printf("GPU: %s\n", moe_cuda_device_name());
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_mixtral),
                                       cmocka_unit_test(test_deepseek),
                                       cmocka_unit_test(test_scores),
                                       cmocka_unit_test(test_shared),
                                       cmocka_unit_test(test_refused)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
