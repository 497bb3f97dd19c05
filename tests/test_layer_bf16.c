/* bf16 experts against the fp32 layer with the same parameters: the same routing, outputs and
 * gradients within bf16 tolerance, and measurably different from fp32 (the bf16 path ran);
 * refused with the reason where there is no bf16 GEMM. */
#include "kernels/kernels.h"
#include "test_util.h"

#include "moe.h"

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

typedef struct {
    float *out, *dx, *grads;
    int32_t *experts;
} run_out;

static void run(const moe_layer_config *c, int T, const float *params, const float *x,
                const float *dout, run_out *r) {
    moe_layer *L;
    if (moe_layer_create(c, T, NULL, NULL, &L) != MOE_OK) fail_msg("create: %s", moe_last_error());
    size_t np = moe_layer_param_count(c), n = (size_t)T * c->d;
    memcpy(moe_layer_param_data(L), params, np * sizeof(float));
    r->out = malloc(n * 4), r->dx = calloc(n, 4), r->grads = malloc(np * 4);
    moe_forward_args a = moe_forward_args_default();
    moe_layer_zero_grads(L);
    assert_int_equal(moe_layer_forward(L, r->out, x, T, &a), MOE_OK);
    assert_int_equal(moe_layer_backward(L, r->dx, dout, x), MOE_OK);
    memcpy(r->grads, moe_layer_grad_data(L), np * 4);
    const moe_routing *rt = moe_layer_get_routing(L);
    r->experts = malloc(sizeof(int32_t) * (size_t)rt->n_slots);
    memcpy(r->experts, rt->expert, sizeof(int32_t) * (size_t)rt->n_slots);
    moe_layer_destroy(L);
}

static void compare(moe_layer_config c, const char *name) {
    uint64_t seed = tu_seed();
    int T = 96;
    size_t np = moe_layer_param_count(&c), n = (size_t)T * c.d;
    float *p = malloc(np * 4), *x = malloc(n * 4), *g = malloc(n * 4);
    tu_fill(p, np, seed, 1, -0.2f, 0.2f);
    tu_fill(x, n, seed, 2, -1, 1);
    tu_fill(g, n, seed, 3, -1, 1);
    run_out f32, b16;
    c.expert_bf16 = 0;
    run(&c, T, p, x, g, &f32);
    c.expert_bf16 = 1;
    run(&c, T, p, x, g, &b16);
    assert_memory_equal(f32.experts, b16.experts, sizeof(int32_t) * (size_t)T * c.topk);
    /* bf16 keeps 8 significant bits: each product carries ~2 * 2^-9 relative error; sums
     * of d (or rows) such products stay within 1e-2 of the largest entry. */
    const struct { const char *what; float *a, *b; size_t n; } cmp[] = {
        {"output", b16.out, f32.out, n}, {"dx", b16.dx, f32.dx, n}, {"grads", b16.grads, f32.grads, np}};
    for (int i = 0; i < 3; i++) {
        double mean, e = tu_rel_err(cmp[i].a, cmp[i].b, cmp[i].n, &mean);
        if (!(e < 1e-2)) fail_msg("%s: bf16 %s differs from fp32 by %.3g of its scale", name, cmp[i].what, e);
        if (!(mean > 0)) fail_msg("%s: bf16 %s equals fp32 exactly: the bf16 path did not run", name, cmp[i].what);
    }
    free(p), free(x), free(g);
    run_out *rs[2] = {&f32, &b16};
    for (int i = 0; i < 2; i++) free(rs[i]->out), free(rs[i]->dx), free(rs[i]->grads), free(rs[i]->experts);
}

static void test_bf16_experts(void **state) {
    (void)state;
    if (!moe_gemm_bf16_available()) skip();
    moe_layer_config c = moe_layer_config_default();
    c.d = 64, c.n_experts = 4, c.topk = 2, c.ffn = 48;
    c.lb_type = MOE_LB_AUX, c.aux_coeff = 0.01f;
    compare(c, "swiglu");
    c.act = MOE_ACT_RELU2, c.expert_bias = 1, c.capacity_factor = 1.0f;
    compare(c, "relu2 + bias + capacity");
    c.act = MOE_ACT_GEGLU, c.shared_ffn = 32, c.capacity_factor = 0;
    compare(c, "geglu + shared expert");
    c = moe_layer_config_default(); /* each expert's bf16 copy made in several chunks (W_in 3 of
                                       16384 floats, W_out 2) */
    c.d = 128, c.n_experts = 4, c.topk = 2, c.ffn = 160;
    compare(c, "large experts");
}

/* Where there is no bf16 GEMM (built without oneDNN, or a CPU without AVX-512, where oneDNN
 * has no bf16 matmul), the forward refuses bf16 experts with the reason, before any work. */
static void test_bf16_refused(void **state) {
    (void)state;
    if (moe_gemm_bf16_available()) skip();
    moe_layer_config c = moe_layer_config_default();
    c.d = 32, c.n_experts = 4, c.topk = 2, c.ffn = 24, c.expert_bf16 = 1;
    int T = 8;
    moe_layer *L;
    assert_int_equal(moe_layer_create(&c, T, NULL, NULL, &L), MOE_OK);
    size_t n = (size_t)T * c.d;
    float *x = malloc(n * 4), *out = malloc(n * 4);
    tu_fill(x, n, tu_seed(), 1, -1, 1);
    tu_fill(moe_layer_param_data(L), moe_layer_param_count(&c), tu_seed(), 2, -0.2f, 0.2f);
    moe_forward_args a = moe_forward_args_default();
    assert_int_equal(moe_layer_forward(L, out, x, T, &a), MOE_ERR_INVALID);
    const char *why = moe_gemm_dnnl_available() ? "needs a CPU with AVX-512" : "needs oneDNN";
    if (!strstr(moe_last_error(), why)) fail_msg("refusal: %s", moe_last_error());
    moe_layer_destroy(L);
    free(x), free(out);
}

int main(void) {
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_bf16_experts),
                                       cmocka_unit_test(test_bf16_refused)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
