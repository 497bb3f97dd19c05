/* Layer configuration: defaults, validation of every field and combination, and the
 * layout of the parameter vector. */
#include "core/core.h"
#include "kernels/kernels.h"
#include "moe/layer_internal.h"

#include <math.h>
#include <string.h>

moe_layer_config moe_layer_config_default(void) {
    moe_layer_config c;
    memset(&c, 0, sizeof c); /* padding too: configs are compared and hashed bytewise */
    c.d = 64;
    c.n_experts = 8;
    c.topk = 2;
    c.ffn = 128;
    c.act = MOE_ACT_SWIGLU;
    c.router = MOE_ROUTER_TOPK;
    c.score = MOE_SCORE_SOFTMAX;
    c.norm_topk = MOE_NORM_AUTO;
    c.route_scale = 1.0f;
    c.n_groups = 1;
    c.group_topk = 1;
    c.bias_update_rate = 1e-3f;
    c.cosine_init_t = 0.5f;
    c.lb_type = MOE_LB_AUX;
    c.min_capacity = 0;
    c.drop_policy = MOE_DROP_PROBS;
    c.random_routing_threshold = 0.2f;
    c.sinkhorn_tol = 1e-4f;
    c.sinkhorn_max_iter = 1000;
    c.seed = 1234;
    c.ep_size = 1;
    return c;
}

moe_forward_args moe_forward_args_default(void) {
    moe_forward_args a = {0};
    a.training = 1;
    a.loss_scale = 1.0f;
    return a;
}

static int bad_float(float v) { return !isfinite(v); }

moe_status moe_layer_config_validate(const moe_layer_config *c) {
    MOE_CHECK(c->d >= 1, "hidden size must be >= 1 (got %d)", c->d);
    MOE_CHECK(c->n_experts >= 1, "num-experts must be >= 1 (got %d)", c->n_experts);
    /* the router keeps per-token arrays of E on the stack (the selection runs per thread) */
    MOE_CHECK(c->n_experts <= MOE_MAX_EXPERTS, "num-experts (%d) must be at most %d",
              c->n_experts, MOE_MAX_EXPERTS);
    MOE_CHECK(c->ffn >= 1, "moe-ffn-hidden-size must be >= 1 (got %d)", c->ffn);
    MOE_CHECK(c->topk >= 1 && c->topk <= c->n_experts,
          "moe-router-topk (%d) must be between 1 and num-experts (%d)", c->topk, c->n_experts);
    MOE_CHECK(c->act >= MOE_ACT_SWIGLU && c->act <= MOE_ACT_SILU, "unknown activation %d", (int)c->act);
    MOE_CHECK(c->router >= MOE_ROUTER_TOPK && c->router <= MOE_ROUTER_FAKE_BALANCED,
          "unknown router type %d", (int)c->router);
    MOE_CHECK(c->score >= MOE_SCORE_SOFTMAX && c->score <= MOE_SCORE_SQRTSOFTPLUS,
          "unknown score function %d", (int)c->score);
    MOE_CHECK(c->norm_topk >= MOE_NORM_AUTO && c->norm_topk <= MOE_NORM_ON,
          "unknown norm-topk setting %d", (int)c->norm_topk);
    MOE_CHECK(c->lb_type >= MOE_LB_NONE && c->lb_type <= MOE_LB_LOAD_IMPORTANCE,
          "unknown load-balancing type %d", (int)c->lb_type);
    MOE_CHECK(c->drop_policy >= MOE_DROP_PROBS && c->drop_policy <= MOE_DROP_PRIORITY,
          "unknown token drop policy %d", (int)c->drop_policy);
    MOE_CHECK(!bad_float(c->route_scale) && c->route_scale > 0,
          "moe-router-topk-scaling-factor must be a positive number (got %g)", c->route_scale);
    MOE_CHECK(!bad_float(c->aux_coeff) && c->aux_coeff >= 0,
          "moe-aux-loss-coeff must be a non-negative number (got %g)", c->aux_coeff);
    int also = 0; /* more Switch-style losses besides lb_type's */
    for (int t = MOE_LB_NONE; t <= MOE_LB_GLOBAL_AUX; t++) {
        float v = c->aux_coeff_also[t];
        MOE_CHECK(!bad_float(v) && v >= 0,
              "the coefficient of load-balancing type %d must be a non-negative number (got %g)",
              t, v);
        MOE_CHECK(v == 0 || (t != MOE_LB_NONE && t != (int)c->lb_type),
              "aux_coeff_also[%d] must be 0: %s", t, t == MOE_LB_NONE ? "type none has no loss"
              : "the coefficient of lb_type's own loss is aux_coeff");
        also |= v > 0;
    }
    MOE_CHECK(!also || ((c->lb_type == MOE_LB_AUX || c->lb_type == MOE_LB_SEQ_AUX ||
                         c->lb_type == MOE_LB_GLOBAL_AUX) && c->router == MOE_ROUTER_TOPK &&
                        !c->quantile_balancing),
          "a list of load-balancing types combines aux_loss, seq_aux_loss and global_aux_loss "
          "under the topk router, without quantile balancing");
    MOE_CHECK(!bad_float(c->z_coeff) && c->z_coeff >= 0,
          "moe-z-loss-coeff must be a non-negative number (got %g)", c->z_coeff);
    MOE_CHECK(!bad_float(c->jitter_eps) && c->jitter_eps >= 0 && c->jitter_eps < 1,
          "moe-input-jitter-eps must be in [0, 1) (got %g)", c->jitter_eps);
    MOE_CHECK(!bad_float(c->gate_noise) && c->gate_noise >= 0,
          "moe-gate-noise must be a non-negative number (got %g)", c->gate_noise);
    MOE_CHECK(c->gate_noise == 0 || c->router == MOE_ROUTER_TOPK,
          "moe-gate-noise (Tutel's) is for the topk router");
    MOE_CHECK(c->lb_type != MOE_LB_LOAD_IMPORTANCE ||
              (c->gate_noise > 0 && c->n_experts >= 2 && c->score == MOE_SCORE_SOFTMAX &&
               !c->enable_expert_bias &&
               c->n_groups == 1 && !c->sample_first && !c->sample_second),
          "load_importance (Tutel's loss) needs moe-gate-noise > 0 (its normal's scale), two "
          "experts or more and softmax scores, without the expert bias, groups or sampled "
          "choices");
    MOE_CHECK(!bad_float(c->bias_update_rate) && c->bias_update_rate >= 0,
          "moe-router-bias-update-rate must be a non-negative number (got %g)", c->bias_update_rate);
    MOE_CHECK(!bad_float(c->capacity_factor), "moe-expert-capacity-factor must be a number (got %g)",
          c->capacity_factor);
    MOE_CHECK(!bad_float(c->eval_capacity_factor), "moe-eval-capacity-factor must be a number "
          "(got %g)", c->eval_capacity_factor);
    MOE_CHECK(c->min_capacity >= 0, "moe-min-capacity must be >= 0 (got %d)", c->min_capacity);
    MOE_CHECK(c->n_groups >= 1, "moe-router-num-groups must be >= 1 (got %d)", c->n_groups);
    MOE_CHECK(c->group_topk >= 1 && c->group_topk <= c->n_groups,
          "moe-router-group-topk (%d) must be between 1 and moe-router-num-groups (%d)",
          c->group_topk, c->n_groups);
    if (c->n_groups > 1) {
        MOE_CHECK(c->n_experts % c->n_groups == 0,
              "moe-router-num-groups (%d) must divide num-experts (%d)", c->n_groups, c->n_experts);
        MOE_CHECK(c->topk <= c->group_topk * (c->n_experts / c->n_groups),
              "moe-router-topk (%d) exceeds the experts in moe-router-group-topk (%d) groups of %d",
              c->topk, c->group_topk, c->n_experts / c->n_groups);
        MOE_CHECK(c->router == MOE_ROUTER_TOPK,
              "group-limited routing (moe-router-num-groups %d) needs the topk router", c->n_groups);
        MOE_CHECK(c->group_score_topk >= 0 && c->group_score_topk <= c->n_experts / c->n_groups,
              "moe-router-group-score-topk (%d) must be between 0 and the experts of a group (%d)",
              c->group_score_topk, c->n_experts / c->n_groups);
    }
    MOE_CHECK(!c->enable_expert_bias || c->router == MOE_ROUTER_TOPK,
          "moe-router-enable-expert-bias needs the topk router");
    MOE_CHECK(c->cosine_dim >= 0, "moe-router-cosine-dim must be >= 0 (got %d)", c->cosine_dim);
    MOE_CHECK(!c->cosine_dim || (c->router != MOE_ROUTER_FAKE_BALANCED && !c->router_fp64),
          "the cosine router (moe-router-cosine-dim) computes learned logits in fp32: not with "
          "the fake balanced gate or moe-router-dtype fp64");
    MOE_CHECK(!bad_float(c->cosine_init_t) && c->cosine_init_t > 0,
          "moe-router-cosine-init-temperature must be positive (got %g)", c->cosine_init_t);
    MOE_CHECK(!bad_float(c->qb_ema) && c->qb_ema >= 0 && c->qb_ema < 1,
          "moe-router-quantile-balancing-ema must be in [0, 1) (got %g)", c->qb_ema);
    MOE_CHECK(!c->quantile_balancing ||
                  (c->router == MOE_ROUTER_TOPK && !c->enable_expert_bias && c->n_groups == 1 &&
                   !c->sample_first && !c->sample_second && c->topk < c->n_experts),
          "quantile balancing needs the topk router and moe-router-topk below num-experts, "
          "without the expert bias, group-limited routing or sampled choices");
    MOE_CHECK(!c->quantile_balancing || c->lb_type == MOE_LB_NONE || c->aux_coeff == 0,
          "quantile balancing balances through its bias: aux losses must be off "
          "(moe-aux-loss-coeff 0)");
    MOE_CHECK(c->lb_type == MOE_LB_NONE || c->router == MOE_ROUTER_TOPK || c->aux_coeff == 0,
          "an aux loss (moe-aux-loss-coeff %g) needs the topk router: %s routing balances by itself",
          c->aux_coeff,
          c->router == MOE_ROUTER_SINKHORN ? "sinkhorn"
          : c->router == MOE_ROUTER_EXPERT_CHOICE ? "expert-choice" : "fake-balanced");
    MOE_CHECK((c->router != MOE_ROUTER_SINKHORN && c->router != MOE_ROUTER_EXPERT_CHOICE) ||
                  (c->score == MOE_SCORE_SOFTMAX && !c->pre_softmax && c->norm_topk != MOE_NORM_ON),
              "%s routing weighs its choices itself: moe-router-score-function (softmax), "
              "moe-router-pre-softmax and moe-router-norm-topk-prob do not apply",
              c->router == MOE_ROUTER_SINKHORN ? "sinkhorn" : "expert-choice");
    MOE_CHECK(c->router != MOE_ROUTER_TOPK || c->score != MOE_SCORE_SOFTMAX || c->pre_softmax ||
                  c->norm_topk != MOE_NORM_OFF,
              "moe-router-norm-topk-prob false with the softmax taken over the k chosen logits "
              "(moe-router-pre-softmax false, the default): those weights sum to 1 anyway; "
              "Hugging Face's norm_topk_prob false is a softmax over all experts, not "
              "renormalised: set moe-router-pre-softmax too");
    MOE_CHECK(!c->random_routing || c->router == MOE_ROUTER_TOPK,
          "moe-random-routing needs the topk router");
    MOE_CHECK(!c->random_routing || (!bad_float(c->random_routing_threshold) &&
                                 c->random_routing_threshold > 0),
          "moe-random-routing-threshold must be positive (got %g)", c->random_routing_threshold);
    MOE_CHECK(!c->sample_second || (c->router == MOE_ROUTER_TOPK && c->topk == 2 &&
                                     c->score == MOE_SCORE_SOFTMAX && !c->enable_expert_bias &&
                                     c->n_groups == 1),
          "moe-router-sample-second is DeepSpeed's top-2 gate: it needs the topk router, "
          "moe-router-topk 2 and softmax scores, without the expert bias or groups");
    MOE_CHECK(!c->sample_first || (c->router == MOE_ROUTER_TOPK && c->topk == 1 &&
                                    c->score == MOE_SCORE_SOFTMAX && !c->enable_expert_bias &&
                                    c->n_groups == 1),
          "moe-noisy-gate-policy RSample is DeepSpeed's top-1 gate: it needs the topk router, "
          "moe-router-topk 1 and softmax scores, without the expert bias or groups");
    MOE_CHECK(!bad_float(c->fake_noise) && c->fake_noise >= 0 && c->fake_noise <= 1,
          "moe-fake-gate-noise must be in [0, 1] (got %g)", c->fake_noise);
    MOE_CHECK(c->fake_skip_first >= 0 && c->fake_skip_first < c->n_experts,
          "moe-fake-gate-skip-first-n (%d) must be below num-experts (%d)", c->fake_skip_first,
          c->n_experts);
    MOE_CHECK(c->router != MOE_ROUTER_FAKE_BALANCED || c->topk <= c->n_experts - c->fake_skip_first,
          "moe-router-topk (%d) exceeds the %d experts left after moe-fake-gate-skip-first-n",
          c->topk, c->n_experts - c->fake_skip_first);
    MOE_CHECK(!bad_float(c->sinkhorn_tol) && c->sinkhorn_tol > 0,
          "moe-sinkhorn-tol must be positive (got %g)", c->sinkhorn_tol);
    MOE_CHECK(c->sinkhorn_max_iter >= 1, "moe-sinkhorn-max-iter must be >= 1 (got %d)",
          c->sinkhorn_max_iter);
    MOE_CHECK(c->router != MOE_ROUTER_EXPERT_CHOICE || c->capacity_factor >= 0,
          "expert-choice routing needs moe-expert-capacity-factor >= 0 (got %g)", c->capacity_factor);
    MOE_CHECK(c->router != MOE_ROUTER_EXPERT_CHOICE || c->eval_capacity_factor >= 0,
          "expert-choice routing needs moe-eval-capacity-factor >= 0 (got %g)",
          c->eval_capacity_factor);
    MOE_CHECK(c->router != MOE_ROUTER_EXPERT_CHOICE || !c->pad_to_capacity,
          "moe-pad-expert-input-to-capacity does not apply to expert-choice routing");
    MOE_CHECK(!c->pad_to_capacity || c->capacity_factor != 0,
          "moe-pad-expert-input-to-capacity needs moe-expert-capacity-factor != 0");
    MOE_CHECK(c->local_group_size >= 0, "moe-local-group-size must be >= 0 (got %d)",
          c->local_group_size);
    MOE_CHECK(c->local_group_size == 0 || c->router != MOE_ROUTER_EXPERT_CHOICE,
          "moe-local-group-size (GShard's local groups) is for token-choice routing: an expert "
          "choice router picks its tokens over the whole call");
    MOE_CHECK(c->local_group_size == 0 || c->capacity_factor != 0 ||
                  c->eval_capacity_factor != 0,
          "moe-local-group-size sets the groups a capacity applies to: it needs "
          "moe-expert-capacity-factor or moe-eval-capacity-factor != 0");
    MOE_CHECK(c->shared_ffn >= 0, "moe-shared-expert-intermediate-size must be >= 0 (got %d)",
          c->shared_ffn);
    MOE_CHECK(!c->probs_on_input || !c->expert_bias,
          "moe-apply-probs-on-input scales the experts' inputs: not with biases in the experts "
          "(moe-expert-linear-bias), whose output would not be weighted");
    MOE_CHECK(!c->shared_gate || c->shared_ffn > 0,
          "moe-shared-expert-gate needs moe-shared-expert-intermediate-size > 0");
    MOE_CHECK(!c->residual || c->shared_ffn > 0,
          "moe-use-residual needs a residual MLP: set moe-shared-expert-intermediate-size > 0");
    MOE_CHECK(!(c->residual && c->shared_gate),
          "moe-use-residual and moe-shared-expert-gate cannot be combined");
    MOE_CHECK(c->layer_id >= 0, "layer id must be >= 0 (got %d)", c->layer_id);
    MOE_CHECK(c->ep_size >= 1 && c->n_experts % c->ep_size == 0 && c->ep_rank >= 0 &&
                  c->ep_rank < c->ep_size,
              "expert-model-parallel-size (%d) must divide num-experts (%d)", c->ep_size,
              c->n_experts);
    MOE_CHECK(c->ep_size == 1 || c->router == MOE_ROUTER_TOPK ||
                  c->router == MOE_ROUTER_FAKE_BALANCED,
              "expert-model-parallel-size > 1 needs a token-choice router (topk or the fake "
              "balanced gate): Sinkhorn and expert choice balance over the whole batch");
    MOE_CHECK(c->ep_size == 1 || !c->pad_to_capacity,
              "moe-pad-expert-input-to-capacity is not supported with expert-model-parallel-size > 1");
    return MOE_OK;
}

int moe_act_gated(moe_activation a) { return a == MOE_ACT_SWIGLU || a == MOE_ACT_GEGLU; }

/* The parameter vector, in struct order. Sizes in floats; 0 = absent. */
void moe_layer_param_sizes(const moe_layer_config *c, size_t s[MOE_N_PARAM_TENSORS]) {
    size_t E = (size_t)c->n_experts, d = (size_t)c->d, f = (size_t)c->ffn;
    size_t El = E / (size_t)(c->ep_size > 1 ? c->ep_size : 1); /* local experts */
    size_t gf = moe_act_gated(c->act) ? 2 * f : f;
    size_t fs = (size_t)c->shared_ffn, gs = moe_act_gated(c->act) ? 2 * fs : fs;
    int b = c->expert_bias != 0;
    size_t P = (size_t)c->cosine_dim;
    s[0] = P ? 0 : E * d;
    s[1] = El * gf * d;
    s[2] = b ? El * gf : 0;
    s[3] = El * d * f;
    s[4] = b ? El * d : 0;
    s[5] = gs * d;
    s[6] = b ? gs : 0;
    s[7] = d * fs;
    s[8] = b && fs ? d : 0;
    s[9] = c->shared_gate ? d : 0;
    s[10] = c->residual ? 2 * d : 0;
    s[11] = c->residual ? 2 : 0;
    s[12] = P * d;
    s[13] = P;
    s[14] = E * P;
    s[15] = P ? 1 : 0;
}

size_t moe_layer_param_count(const moe_layer_config *c) {
    size_t s[MOE_N_PARAM_TENSORS], n = 0;
    moe_layer_param_sizes(c, s);
    for (int i = 0; i < MOE_N_PARAM_TENSORS; i++) n += s[i];
    return n;
}

void moe_layer_params_map(const moe_layer_config *c, float *base, moe_layer_params *p) {
    size_t s[MOE_N_PARAM_TENSORS];
    moe_layer_param_sizes(c, s);
    float **slot[MOE_N_PARAM_TENSORS] = {
        &p->router_w,     &p->w_in,          &p->b_in,       &p->w_out,
        &p->b_out,        &p->shared_w_in,   &p->shared_b_in, &p->shared_w_out,
        &p->shared_b_out, &p->shared_gate_w, &p->mix_w,      &p->mix_b,
        &p->cos_proj_w,   &p->cos_proj_b,    &p->cos_sim,    &p->cos_temp};
    for (int i = 0; i < MOE_N_PARAM_TENSORS; i++) {
        *slot[i] = s[i] && base ? base : NULL;
        if (base) base += s[i];
    }
}
