/* Training configuration: defaults, validation, learning-rate schedule. */
#include "core/core.h"

#include <math.h>
#include <string.h>

moe_train_config moe_train_config_default(void) {
    moe_train_config c;
    memset(&c, 0, sizeof c);
    c.train_iters = 1000;
    c.micro_batch = 8;
    c.global_batch = 8;
    c.lr = 3e-3f;
    c.min_lr = 3e-4f;
    c.warmup_iters = 50;
    c.decay_style = MOE_LR_COSINE;
    c.weight_decay = 0.1f;
    c.beta1 = 0.9f;
    c.beta2 = 0.95f;
    c.adam_eps = 1e-8f;
    c.clip_grad = 1.0f;
    c.eval_interval = 100;
    c.eval_iters = 8;
    c.seed = 1234;
    c.max_bad_steps = 5;
    return c;
}

moe_status moe_train_config_validate(const moe_train_config *c) {
    MOE_CHECK(c->train_iters >= 1, "train-iters must be >= 1 (got %d)", c->train_iters);
    MOE_CHECK(c->max_bad_steps >= 1, "max-bad-steps must be >= 1 (got %d)", c->max_bad_steps);
    MOE_CHECK(c->micro_batch >= 1, "micro-batch-size must be >= 1 (got %d)", c->micro_batch);
    MOE_CHECK(c->global_batch >= c->micro_batch && c->global_batch % c->micro_batch == 0,
          "global-batch-size (%d) must be a multiple of micro-batch-size (%d)", c->global_batch,
          c->micro_batch);
    MOE_CHECK(isfinite(c->lr) && c->lr >= 0, "lr must be >= 0 (got %g)", c->lr);
    /* (the constant style never reaches min-lr: a smaller lr needs no --min-lr with it) */
    MOE_CHECK(isfinite(c->min_lr) && c->min_lr >= 0 &&
                  (c->min_lr <= c->lr || c->decay_style == MOE_LR_CONSTANT),
              "min-lr (%g) must be between 0 and lr (%g): --min-lr sets it (default 3e-4)",
              c->min_lr, c->lr);
    MOE_CHECK(c->warmup_iters >= 0 && c->decay_iters >= 0, "lr-warmup-iters and lr-decay-iters "
          "must be >= 0 (got %d, %d)", c->warmup_iters, c->decay_iters);
    /* Megatron asserts this too: else the lr falls from its peak to min-lr in one step */
    MOE_CHECK(c->decay_style == MOE_LR_CONSTANT || c->decay_iters == 0 ||
                  c->warmup_iters < c->decay_iters,
              "lr-warmup-iters (%d) must be below lr-decay-iters (%d)", c->warmup_iters,
              c->decay_iters);
    MOE_CHECK(c->decay_style >= MOE_LR_COSINE && c->decay_style <= MOE_LR_CONSTANT,
          "unknown lr-decay-style %d", (int)c->decay_style);
    MOE_CHECK(isfinite(c->weight_decay) && c->weight_decay >= 0, "weight-decay must be >= 0 (got %g)",
          c->weight_decay);
    MOE_CHECK(c->beta1 >= 0 && c->beta1 < 1 && c->beta2 >= 0 && c->beta2 < 1,
          "adam-beta1 and adam-beta2 must be in [0, 1) (got %g, %g)", c->beta1, c->beta2);
    MOE_CHECK(isfinite(c->adam_eps) && c->adam_eps > 0, "adam-eps must be > 0 (got %g)", c->adam_eps);
    MOE_CHECK(isfinite(c->clip_grad) && c->clip_grad >= 0, "clip-grad must be >= 0 (got %g)",
          c->clip_grad);
    MOE_CHECK(c->eval_interval >= 0 && c->eval_iters >= 1,
          "eval-interval must be >= 0 and eval-iters >= 1 (got %d, %d)", c->eval_interval,
          c->eval_iters);
    return MOE_OK;
}

double moe_train_lr(const moe_train_config *c, int step) {
    if (c->warmup_iters > 0 && step < c->warmup_iters)
        return c->lr * (double)(step + 1) / c->warmup_iters;
    if (c->decay_style == MOE_LR_CONSTANT) return c->lr;
    int decay = c->decay_iters > 0 ? c->decay_iters : c->train_iters;
    if (step >= decay) return c->min_lr;
    double span = decay - c->warmup_iters;
    double frac = span > 0 ? (step - c->warmup_iters) / span : 1.0;
    double coeff = c->decay_style == MOE_LR_COSINE ? 0.5 * (1.0 + cos(3.14159265358979323846 * frac)) : 1.0 - frac;
    return c->min_lr + coeff * (c->lr - c->min_lr);
}
