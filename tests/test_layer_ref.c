/* The layer against the naive float64 reference (tests/support/ref_moe.c) over a grid of
 * option combinations, on fresh random inputs, with outputs poisoned before each call:
 * outputs and losses to fp32 tolerance, routing decisions, counts and capacity exactly. */
#include "layer_fixture.h"
#include "test_util.h"

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

typedef struct {
    const char *name;
    void (*set)(moe_layer_config *c, moe_forward_args *a);
} grid_case;

#define CASE(nm, body)                                                                        \
    static void set_##nm(moe_layer_config *c, moe_forward_args *a) {                          \
        (void)c;                                                                              \
        (void)a;                                                                              \
        body;                                                                                 \
    }
CASE(softmax_post, {})
CASE(softmax_pre, c->pre_softmax = 1)
CASE(sigmoid, c->score = MOE_SCORE_SIGMOID)
CASE(sqrtsoftplus_norm_on, { c->score = MOE_SCORE_SQRTSOFTPLUS; c->norm_topk = MOE_NORM_ON; })
CASE(sigmoid_norm_off_scaled, { c->score = MOE_SCORE_SIGMOID; c->norm_topk = MOE_NORM_OFF; c->route_scale = 2.5f; })
CASE(softmax_norm_on, { c->pre_softmax = 1; c->norm_topk = MOE_NORM_ON; c->topk = 3; })
CASE(groups_deepseek, { c->n_experts = 8; c->n_groups = 4; c->group_topk = 2; c->topk = 3;
      c->score = MOE_SCORE_SIGMOID; c->enable_expert_bias = 1; c->route_scale = 2.5f; })
CASE(groups_softmax, { c->n_experts = 8; c->n_groups = 2; c->group_topk = 1; c->topk = 2; })
CASE(groups_score_max, { c->n_experts = 8; c->n_groups = 4; c->group_topk = 2; c->topk = 4;
      c->pre_softmax = 1; c->group_score_topk = 1; c->route_scale = 16; })
CASE(expert_bias_softmax, { c->enable_expert_bias = 1; c->pre_softmax = 1; })
/* quantile balancing: the bias on the logits, beta_local of a training call */
CASE(qb_softmax_post, { c->quantile_balancing = 1; a->training = 1; })
CASE(qb_sigmoid_cap, { c->quantile_balancing = 1; c->score = MOE_SCORE_SIGMOID; c->topk = 3;
      c->capacity_factor = 1.0f; c->z_coeff = 0.05f; a->training = 1; })
CASE(qb_inference, { c->quantile_balancing = 1; c->pre_softmax = 1; a->training = 0; })
CASE(qb_per_call_k1, { c->quantile_balancing = 1; a->topk = 1; a->training = 1; })
CASE(top1, c->topk = 1)
CASE(top_all, c->topk = 6)
CASE(per_call_topk, a->topk = 4)
CASE(cap_probs, c->capacity_factor = 1.0f)
CASE(cap_position, { c->capacity_factor = 0.75f; c->drop_policy = MOE_DROP_POSITION; })
CASE(cap_random, { c->capacity_factor = 0.75f; c->drop_policy = MOE_DROP_RANDOM; })
CASE(cap_by_choice, { c->capacity_factor = 0.75f; c->drop_policy = MOE_DROP_CHOICE; })
CASE(cap_prioritized, { c->capacity_factor = 0.75f; c->drop_policy = MOE_DROP_PRIORITY; })
CASE(cap_prioritized_sigmoid_k3, { c->capacity_factor = 0.6f; c->drop_policy = MOE_DROP_PRIORITY;
      c->topk = 3; c->score = MOE_SCORE_SIGMOID; c->local_group_size = 7; })
CASE(cap_by_choice_k3, { c->capacity_factor = 0.6f; c->drop_policy = MOE_DROP_CHOICE; c->topk = 3; })
CASE(cap_min, { c->capacity_factor = 0.5f; c->min_capacity = 5; })
CASE(cap_dynamic, c->capacity_factor = -1.5f)
CASE(cap_pad, { c->capacity_factor = 1.25f; c->pad_to_capacity = 1; })
CASE(cap_large, c->capacity_factor = 9.0f)
/* DeepSpeed's eval_capacity_factor: outside training it replaces the capacity factor */
CASE(eval_cf, { c->eval_capacity_factor = 0.75f; a->training = 0; })
CASE(eval_cf_training, { c->eval_capacity_factor = 0.75f; a->training = 1; })
CASE(eval_cf_dynamic, { c->capacity_factor = 0.5f; c->eval_capacity_factor = -1.5f; a->training = 0; })
CASE(eval_cf_pad, { c->capacity_factor = 0.5f; c->eval_capacity_factor = 2.0f; c->pad_to_capacity = 1;
      a->training = 0; })
CASE(eval_cf_inherit, { c->capacity_factor = 0.75f; c->drop_policy = MOE_DROP_POSITION; a->training = 0; })
/* GShard's local groups: capacity and drop order per group of consecutive tokens (24 tokens:
 * groups of 7 leave a last group of 3) */
CASE(groups_probs, { c->capacity_factor = 0.75f; c->local_group_size = 7; })
CASE(groups_position, { c->capacity_factor = 1.0f; c->drop_policy = MOE_DROP_POSITION;
      c->local_group_size = 8; })
CASE(groups_by_choice, { c->capacity_factor = 0.6f; c->drop_policy = MOE_DROP_CHOICE; c->topk = 3;
      c->local_group_size = 5; })
CASE(groups_random_min, { c->capacity_factor = 0.5f; c->drop_policy = MOE_DROP_RANDOM;
      c->min_capacity = 2; c->local_group_size = 7; })
CASE(groups_dynamic, { c->capacity_factor = -4.0f; c->local_group_size = 6; })
CASE(groups_pad, { c->capacity_factor = 1.25f; c->pad_to_capacity = 1; c->local_group_size = 7; })
CASE(groups_eval, { c->eval_capacity_factor = 0.75f; c->local_group_size = 10; a->training = 0; })
CASE(groups_one, { c->capacity_factor = 0.75f; c->local_group_size = 100; })
CASE(aux, { c->lb_type = MOE_LB_AUX; c->aux_coeff = 0.3f; })
CASE(aux_sigmoid, { c->lb_type = MOE_LB_AUX; c->aux_coeff = 0.3f; c->score = MOE_SCORE_SIGMOID; })
CASE(seq_aux, { c->lb_type = MOE_LB_SEQ_AUX; c->aux_coeff = 0.3f; a->seq_len = 8; })
/* the weights on the experts' inputs: Llama 4's top-1 sigmoid, and top-2 */
CASE(probs_on_input_top1, { c->probs_on_input = 1; c->topk = 1; c->score = MOE_SCORE_SIGMOID; })
CASE(probs_on_input_top2_cap, { c->probs_on_input = 1; c->act = MOE_ACT_RELU2;
      c->capacity_factor = 1.0f; c->pad_to_capacity = 1; c->shared_ffn = 5; })
/* Megatron's list of types: the losses added, the global one over two calls */
CASE(aux_list_seq_global, { c->lb_type = MOE_LB_SEQ_AUX; c->aux_coeff = 0.3f;
      c->aux_coeff_also[MOE_LB_GLOBAL_AUX] = 0.2f; a->seq_len = 8; })
CASE(aux_list_all_sigmoid, { c->lb_type = MOE_LB_GLOBAL_AUX; c->aux_coeff = 0.1f;
      c->aux_coeff_also[MOE_LB_AUX] = 0.25f; c->aux_coeff_also[MOE_LB_SEQ_AUX] = 0.4f;
      c->score = MOE_SCORE_SIGMOID; a->seq_len = 6; })
CASE(zloss, c->z_coeff = 0.05f)
CASE(jitter, { c->jitter_eps = 0.1f; a->training = 1; })
CASE(jitter_inference, { c->jitter_eps = 0.1f; a->training = 0; })
CASE(gate_noise, { c->gate_noise = 1.5f; c->lb_type = MOE_LB_AUX; c->aux_coeff = 0.3f; c->z_coeff = 0.05f;
      a->training = 1; })
CASE(gate_noise_inference, { c->gate_noise = 1.5f; a->training = 0; })
CASE(load_importance, { c->gate_noise = 1.0f; c->lb_type = MOE_LB_LOAD_IMPORTANCE; c->aux_coeff = 0.3f;
      c->topk = 3; a->training = 1; })
CASE(load_importance_eval, { c->gate_noise = 1.0f; c->lb_type = MOE_LB_LOAD_IMPORTANCE;
      c->aux_coeff = 0.3f; c->pre_softmax = 1; a->training = 0; })
CASE(sample_second, { c->sample_second = 1; a->training = 1; })
CASE(sample_second_pre, { c->sample_second = 1; c->pre_softmax = 1; a->training = 1; })
CASE(sample_second_eval, { c->sample_second = 1; a->training = 0; })
CASE(sample_first, { c->sample_first = 1; c->topk = 1; c->pre_softmax = 1; a->training = 1; })
CASE(sample_first_eval, { c->sample_first = 1; c->topk = 1; c->pre_softmax = 1; a->training = 0; })
CASE(random_routing, { c->random_routing = 1; c->random_routing_threshold = 0.4f; c->topk = 3; })
CASE(sinkhorn_k1, { c->router = MOE_ROUTER_SINKHORN; c->lb_type = MOE_LB_NONE; c->topk = 1; })
CASE(sinkhorn_k2, { c->router = MOE_ROUTER_SINKHORN; c->lb_type = MOE_LB_NONE; c->z_coeff = 0.01f; })
CASE(sinkhorn_inference, { c->router = MOE_ROUTER_SINKHORN; c->lb_type = MOE_LB_NONE; a->training = 0; })
CASE(expert_choice, { c->router = MOE_ROUTER_EXPERT_CHOICE; c->lb_type = MOE_LB_NONE; })
CASE(expert_choice_eval_cf, { c->router = MOE_ROUTER_EXPERT_CHOICE; c->lb_type = MOE_LB_NONE;
      c->capacity_factor = 0.5f; c->eval_capacity_factor = 2.0f; a->training = 0; })
CASE(expert_choice_cf, { c->router = MOE_ROUTER_EXPERT_CHOICE; c->lb_type = MOE_LB_NONE; c->capacity_factor = 1.5f; c->z_coeff = 0.01f; })
CASE(fake_round_robin, { c->router = MOE_ROUTER_FAKE_BALANCED; c->lb_type = MOE_LB_NONE; c->fake_skip_first = 1; })
CASE(fake_noise, { c->router = MOE_ROUTER_FAKE_BALANCED; c->lb_type = MOE_LB_NONE; c->fake_noise = 0.5f; })
CASE(act_geglu, c->act = MOE_ACT_GEGLU)
CASE(act_relu2, c->act = MOE_ACT_RELU2)
CASE(act_gelu, c->act = MOE_ACT_GELU)
CASE(act_silu, c->act = MOE_ACT_SILU)
CASE(linear_bias, c->expert_bias = 1)
CASE(shared, c->shared_ffn = 7)
CASE(shared_gate_bias, { c->shared_ffn = 7; c->shared_gate = 1; c->expert_bias = 1; })
CASE(residual, { c->shared_ffn = 9; c->residual = 1; c->act = MOE_ACT_RELU2; })
CASE(router_fp64, { c->router_fp64 = 1; c->score = MOE_SCORE_SIGMOID; })
/* more experts than the router's blocks of 8, with a partial last block */
CASE(many_experts, { c->n_experts = 45; c->topk = 5; c->z_coeff = 0.05f; })
CASE(many_experts_pre_aux, { c->n_experts = 45; c->topk = 7; c->pre_softmax = 1;
      c->lb_type = MOE_LB_AUX; c->aux_coeff = 0.3f; })
CASE(many_experts_groups_bias, { c->n_experts = 45; c->n_groups = 5; c->group_topk = 3;
      c->topk = 4; c->score = MOE_SCORE_SIGMOID; c->enable_expert_bias = 1; })
/* Tutel's cosine router, with jitter, gate noise, an aux loss, sigmoid scores */
CASE(cosine, { c->cosine_dim = 5; })
CASE(cosine_noisy_aux, { c->cosine_dim = 16; c->jitter_eps = 0.1f; c->gate_noise = 1.0f;
      c->lb_type = MOE_LB_AUX; c->aux_coeff = 0.3f; c->z_coeff = 0.05f; a->training = 1; })
CASE(cosine_sigmoid_k3, { c->cosine_dim = 7; c->score = MOE_SCORE_SIGMOID; c->topk = 3; })
/* routing replay: given choices, this call's weights, with capacity, random routing, QB */
CASE(replay_softmax_post, { c->topk = 3; a->replay = fixture_replay(c->n_experts, 3); })
CASE(replay_sigmoid_cap_random, { c->score = MOE_SCORE_SIGMOID; c->capacity_factor = 0.7f;
      c->random_routing = 1; c->random_routing_threshold = 0.3f;
      a->replay = fixture_replay(c->n_experts, c->topk); })
CASE(replay_qb_pre, { c->quantile_balancing = 1; c->pre_softmax = 1; a->training = 1;
      a->replay = fixture_replay(c->n_experts, c->topk); })
CASE(many_experts_qb, { c->n_experts = 45; c->topk = 5; c->quantile_balancing = 1; })
CASE(everything, { c->n_experts = 8; c->n_groups = 2; c->group_topk = 2; c->topk = 3;
      c->score = MOE_SCORE_SIGMOID; c->enable_expert_bias = 1; c->capacity_factor = 1.1f;
      c->drop_policy = MOE_DROP_POSITION; c->lb_type = MOE_LB_SEQ_AUX; c->aux_coeff = 0.2f;
      c->z_coeff = 0.02f; c->jitter_eps = 0.05f; c->shared_ffn = 5; c->shared_gate = 1;
      c->expert_bias = 1; a->seq_len = 12; })

#define C(nm) {#nm, set_##nm}
static const grid_case cases[] = {
    C(softmax_post), C(softmax_pre), C(sigmoid), C(sqrtsoftplus_norm_on),
    C(sigmoid_norm_off_scaled), C(softmax_norm_on), C(groups_deepseek), C(groups_softmax),
    C(groups_score_max), C(expert_bias_softmax), C(top1), C(top_all), C(per_call_topk), C(cap_probs), C(cap_position),
    C(cap_random), C(cap_by_choice), C(cap_by_choice_k3), C(cap_min), C(cap_dynamic), C(cap_pad), C(cap_large), C(eval_cf), C(eval_cf_training), C(eval_cf_dynamic), C(eval_cf_pad),
    C(groups_probs), C(groups_position), C(groups_by_choice), C(groups_random_min), C(groups_dynamic), C(groups_pad), C(groups_eval), C(groups_one),
    C(eval_cf_inherit), C(expert_choice_eval_cf), C(aux), C(aux_sigmoid), C(seq_aux),
    C(aux_list_seq_global), C(aux_list_all_sigmoid), C(probs_on_input_top1),
    C(probs_on_input_top2_cap),
    C(zloss), C(jitter), C(jitter_inference), C(gate_noise), C(gate_noise_inference), C(load_importance), C(load_importance_eval), C(random_routing), C(sample_second),
    C(sample_second_pre), C(sample_second_eval), C(sample_first), C(sample_first_eval), C(sinkhorn_k1), C(sinkhorn_k2),
    C(sinkhorn_inference), C(expert_choice), C(expert_choice_cf), C(fake_round_robin),
    C(fake_noise), C(act_geglu), C(act_relu2), C(act_gelu), C(act_silu), C(linear_bias),
    C(shared), C(shared_gate_bias), C(residual), C(router_fp64), C(many_experts), C(many_experts_pre_aux),
    C(many_experts_groups_bias), C(everything), C(qb_softmax_post), C(qb_sigmoid_cap),
    C(qb_inference), C(qb_per_call_k1), C(many_experts_qb), C(cap_prioritized),
    C(cap_prioritized_sigmoid_k3), C(cosine), C(cosine_noisy_aux), C(cosine_sigmoid_k3),
    C(replay_softmax_post), C(replay_sigmoid_cap_random), C(replay_qb_pre),
};

static moe_layer_config base_config(void) {
    moe_layer_config c = moe_layer_config_default();
    c.d = 12;
    c.n_experts = 6;
    c.topk = 2;
    c.ffn = 10;
    c.lb_type = MOE_LB_NONE;
    return c;
}

static double rel(double a, double b) { return fabs(a - b) / (fabs(b) + 1e-12); }

/* Runs one configuration on T tokens (with or without a mask) and compares everything. */
static void run_case(const grid_case *gc, int masked, uint64_t seed) {
    moe_layer_config c = base_config();
    moe_forward_args a = moe_forward_args_default();
    gc->set(&c, &a);
    c.seed = seed;
    int T = 24, d = c.d, E = c.n_experts;
    if (moe_layer_config_validate(&c) != MOE_OK)
        fail_msg("case %s: invalid config: %s", gc->name, moe_last_error());
    layer_fixture f;
    fixture_init(&f, &c, T, seed, 0.5f);
    float *x = malloc(sizeof(float) * (size_t)T * d), *out = malloc(sizeof(float) * (size_t)T * d);
    double *x64 = malloc(sizeof(double) * (size_t)T * d);
    uint8_t mask[24];
    for (int t = 0; t < T; t++) mask[t] = !masked || moe_rng_u64(seed, 9, (uint64_t)t) % 4 != 0;
    a.mask = masked ? mask : NULL;
    int calls = c.lb_type == MOE_LB_GLOBAL_AUX || c.aux_coeff_also[MOE_LB_GLOBAL_AUX] > 0 ? 2 : 1;
    int64_t acc[256] = {0}, acc_T = 0;
    for (int call = 0; call < calls; call++) {
        tu_fill(x, (size_t)T * d, seed, 10 + (uint64_t)call, -1, 1);
        for (size_t i = 0; i < (size_t)T * d; i++) x64[i] = x[i];
        tu_poison(out, (size_t)T * d);
        a.step = 3 + (uint64_t)call;
        if (moe_layer_forward(f.layer, out, x, T, &a) != MOE_OK)
            fail_msg("case %s: forward: %s", gc->name, moe_last_error());
        ref_args ra = {T, a.topk ? a.topk : c.topk, a.mask, a.seq_len, a.training, a.step,
                       f.bias, acc, acc_T, NULL, a.replay};
        ref_result r;
        ref_moe_forward(&c, &f.ref, x64, &ra, &r);
        const moe_layer_stats *st = moe_layer_get_stats(f.layer);
        const moe_routing *rt = moe_layer_get_routing(f.layer);
        char what[160];
        snprintf(what, sizeof what, "case %s%s: routing", gc->name, masked ? " (masked)" : "");
        if (rt->n_slots != r.n_slots) fail_msg("%s: %d slots, reference %d", what, rt->n_slots, r.n_slots);
        for (int s = 0; s < r.n_slots; s++) {
            if (rt->token[s] != r.token[s] || rt->expert[s] != r.expert[s] || rt->kept[s] != r.kept[s])
                fail_msg("%s: slot %d is (token %d, expert %d, kept %d), reference (%d, %d, %d)", what,
                         s, rt->token[s], rt->expert[s], rt->kept[s], r.token[s], r.expert[s], r.kept[s]);
            if (rel(rt->weight[s], r.weight[s]) > 1e-5 && fabs(rt->weight[s] - r.weight[s]) > 1e-7)
                fail_msg("%s: slot %d weight %.9g, reference %.9g", what, s, rt->weight[s], r.weight[s]);
        }
        if (st->capacity != r.capacity) fail_msg("%s: capacity %d, reference %d", what, st->capacity, r.capacity);
        for (int e = 0; e < E; e++)
            if (st->counts[e] != r.counts[e] || st->kept[e] != r.kept_e[e])
                fail_msg("%s: expert %d counts %lld kept %lld, reference %lld %lld", what, e,
                         (long long)st->counts[e], (long long)st->kept[e], (long long)r.counts[e],
                         (long long)r.kept_e[e]);
        /* fp32 against float64: 2e-5 of the largest output (sums of ~d*f products of O(1)). */
        double mx = 0;
        for (size_t i = 0; i < (size_t)T * d; i++) mx = fmax(mx, fabs(r.out[i]));
        snprintf(what, sizeof what, "case %s%s: output", gc->name, masked ? " (masked)" : "");
        tu_check_close(what, out, r.out, (size_t)T * d, 2e-5 * (mx + 1e-6), 0);
        if (fabs(st->aux_loss - r.aux) > 1e-5 * fabs(r.aux) + 1e-9 || fabs(st->z_loss - r.z) > 1e-5 * fabs(r.z) + 1e-9)
            fail_msg("case %s: aux %.9g z %.9g, reference %.9g %.9g", gc->name, st->aux_loss,
                     st->z_loss, r.aux, r.z);
        for (int e = 0; e < E; e++) acc[e] += r.aux_counts[e];
        acc_T += r.Tv;
        /* quantile balancing: a training call adds its beta_local (the reference's by sorting) */
        const double *qb = moe_layer_qb_accum(f.layer);
        int counted = c.quantile_balancing && a.training && r.Tv > 0;
        if (qb[E] != counted * (call + 1))
            fail_msg("case %s: %g beta_local counted, expected %d", gc->name, qb[E], counted);
        for (int e = 0; counted && e < E; e++)
            if (fabs(qb[e] - r.qb_beta[e]) > 1e-5 * (1 + fabs(r.qb_beta[e])))
                fail_msg("case %s: beta_local[%d] %.9g, reference %.9g", gc->name, e, qb[e],
                         r.qb_beta[e]);
        ref_result_free(&r);
    }
    free(x);
    free(out);
    free(x64);
    fixture_free(&f);
}

static void test_grid(void **state) {
    (void)state;
    uint64_t seed = tu_seed();
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        for (int masked = 0; masked < 2; masked++) run_case(&cases[i], masked, seed + i);
}

static void set_global_aux(moe_layer_config *c, moe_forward_args *a) {
    (void)a;
    c->lb_type = MOE_LB_GLOBAL_AUX;
    c->aux_coeff = 0.3f;
}

/* ... with the expert bias and group limits, which change the selection but not the counts */
static void set_global_aux_biased(moe_layer_config *c, moe_forward_args *a) {
    set_global_aux(c, a);
    c->n_experts = 8;
    c->n_groups = 4;
    c->group_topk = 2;
    c->score = MOE_SCORE_SIGMOID;
    c->enable_expert_bias = 1;
}

/* Global-batch aux loss: the second call's f_e includes the counts of the first. */
static void test_global_aux(void **state) {
    (void)state;
    grid_case g = {"global_aux", set_global_aux}, gb = {"global_aux_biased", set_global_aux_biased};
    run_case(&g, 0, tu_seed());
    run_case(&g, 1, tu_seed() + 1);
    run_case(&gb, 0, tu_seed() + 2);
}

/* The expert bias changes which experts are chosen but not the weights' formula. */
static void test_bias_selection_only(void **state) {
    (void)state;
    uint64_t seed = tu_seed();
    moe_layer_config c = base_config();
    c.score = MOE_SCORE_SIGMOID;
    c.enable_expert_bias = 1;
    c.norm_topk = MOE_NORM_OFF;
    int T = 16, d = c.d;
    layer_fixture f;
    fixture_init(&f, &c, T, seed, 0.5f);
    float *bias = moe_layer_expert_bias(f.layer);
    for (int e = 0; e < c.n_experts; e++) bias[e] = e == 5 ? 10.0f : 0.0f; /* expert 5 always */
    float *x = malloc(sizeof(float) * (size_t)T * d), *out = malloc(sizeof(float) * (size_t)T * d);
    tu_fill(x, (size_t)T * d, seed, 1, -1, 1);
    moe_forward_args a = moe_forward_args_default();
    assert_int_equal(moe_layer_forward(f.layer, out, x, T, &a), MOE_OK);
    const moe_routing *rt = moe_layer_get_routing(f.layer);
    const float *w = moe_layer_get_params(f.layer).router_w;
    for (int t = 0; t < T; t++) {
        assert_int_equal(rt->expert[t * 2], 5);
        double z = 0;
        for (int i = 0; i < d; i++) z += (double)x[t * d + i] * w[5 * d + i];
        /* weight = sigmoid(z), not sigmoid(z) + 10 */
        assert_true(fabs(rt->weight[t * 2] - 1 / (1 + exp(-z))) < 1e-6);
    }
    free(x);
    free(out);
    fixture_free(&f);
}

/* Local groups of a sequence each: a sequence's routing decisions and output do not depend on
 * the other sequences of the call (without groups the capacity is shared by all of them). */
static void test_local_groups_per_sequence(void **state) {
    (void)state;
    uint64_t seed = tu_seed();
    moe_layer_config c = base_config();
    c.capacity_factor = 0.5f;
    c.local_group_size = 8;
    int T = 24, d = c.d, k = c.topk;
    layer_fixture f;
    fixture_init(&f, &c, T, seed, 0.5f);
    float *x = malloc(sizeof(float) * (size_t)T * d), *out[2];
    uint8_t kept[2][24 * 2];
    tu_fill(x, (size_t)T * d, seed, 1, -1, 1);
    moe_forward_args a = moe_forward_args_default();
    for (int run = 0; run < 2; run++) {
        out[run] = malloc(sizeof(float) * (size_t)T * d);
        if (run) tu_fill(x + 8 * d, (size_t)16 * d, seed, 2, -3, 3); /* other sequences 2, 3 */
        assert_int_equal(moe_layer_forward(f.layer, out[run], x, T, &a), MOE_OK);
        const moe_routing *rt = moe_layer_get_routing(f.layer);
        memcpy(kept[run], rt->kept, (size_t)T * k);
    }
    int dropped = 0;
    for (int s = 0; s < 8 * k; s++) {
        assert_int_equal(kept[0][s], kept[1][s]);
        dropped += !kept[0][s];
    }
    assert_true(dropped >= 4); /* capacity ceil(0.5 * 8 * 2 / 6) = 2: 12 of the 16 slots */
    /* the same rows through the experts' GEMMs, in other blocks */
    for (int i = 0; i < 8 * d; i++)
        if (fabsf(out[1][i] - out[0][i]) > 1e-6f + 1e-5f * fabsf(out[0][i]))
            fail_msg("the first sequence's output %d: %.9g, alone %.9g", i, out[1][i], out[0][i]);
    free(x), free(out[0]), free(out[1]);
    fixture_free(&f);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_grid),
        cmocka_unit_test(test_global_aux),
        cmocka_unit_test(test_bias_selection_only),
        cmocka_unit_test(test_local_groups_per_sequence),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
