/* A Mixture-of-Experts layer, forward and backward, through the public C API. */
#include <moe.h>
#include <stdio.h>
#include <stdlib.h>

int main(void) {
    moe_layer_config cfg = moe_layer_config_default();
    cfg.d = 64;                       /* hidden size */
    cfg.n_experts = 16;               /* E */
    cfg.topk = 4;                     /* k */
    cfg.ffn = 96;                     /* expert hidden size */
    cfg.score = MOE_SCORE_SIGMOID;    /* DeepSeek-V3 style: sigmoid + bias + groups */
    cfg.enable_expert_bias = 1;
    cfg.n_groups = 4;
    cfg.group_topk = 2;
    cfg.route_scale = 2.5f;
    cfg.shared_ffn = 96;              /* one shared expert */
    cfg.aux_coeff = 1e-3f;            /* sequence-level aux loss */
    cfg.lb_type = MOE_LB_SEQ_AUX;

    int T = 256;
    moe_layer *layer;
    if (moe_layer_create(&cfg, T, NULL, NULL, &layer) != MOE_OK) {
        fprintf(stderr, "error: %s\n", moe_last_error());
        return 1;
    }
    moe_layer_init_params(layer, 42, 0.05f);

    float *x = malloc(sizeof(float) * T * cfg.d);    /* [T, d] */
    float *out = malloc(sizeof(float) * T * cfg.d);  /* [T, d] */
    float *dx = calloc((size_t)T * cfg.d, sizeof(float));
    for (int i = 0; i < T * cfg.d; i++) x[i] = 2 * moe_rng_uniform(7, 0, i) - 1;

    moe_forward_args args = moe_forward_args_default();
    args.seq_len = 64;                /* 4 sequences of 64 tokens */
    moe_layer_forward(layer, out, x, T, &args);
    moe_layer_zero_grads(layer);
    moe_layer_backward(layer, dx, out, x); /* dL/dout = out, i.e. L = |out|^2 / 2 */
    moe_layer_step_end(layer);        /* once per optimizer step: expert-bias update */

    const moe_layer_stats *st = moe_layer_get_stats(layer);
    printf("aux loss %.6f, dropped %.1f%%, tokens per expert:", st->aux_loss,
           100 * st->dropped_fraction);
    for (int e = 0; e < cfg.n_experts; e++) printf(" %lld", (long long)st->counts[e]);
    printf("\n");

    free(x);
    free(out);
    free(dx);
    moe_layer_destroy(layer);
    return 0;
}
