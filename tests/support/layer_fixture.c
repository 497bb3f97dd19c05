#include "layer_fixture.h"

#include "test_util.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

const int32_t *fixture_replay(int E, int k) {
    static int32_t r[64 * 16];
    assert_true(k <= 16 && k <= E);
    for (int t = 0; t < 64; t++)
        for (int j = 0; j < k; j++) r[t * k + j] = (7 * t + (t % 2 ? k - 1 - j : j)) % E;
    return r;
}

void fixture_sync(layer_fixture *f) {
    const float *p = moe_layer_param_data(f->layer);
    for (size_t i = 0; i < f->n_params; i++) f->p64[i] = p[i];
    /* the same offsets as the float layout */
    moe_layer_params fp = moe_layer_get_params(f->layer);
    const float *base = moe_layer_param_data(f->layer);
#define MAP(field) f->ref.field = fp.field ? f->p64 + (fp.field - base) : NULL
    MAP(router_w);
    MAP(cos_proj_w);
    MAP(cos_proj_b);
    MAP(cos_sim);
    MAP(cos_temp);
    MAP(w_in);
    MAP(b_in);
    MAP(w_out);
    MAP(b_out);
    MAP(shared_w_in);
    MAP(shared_b_in);
    MAP(shared_w_out);
    MAP(shared_b_out);
    MAP(shared_gate_w);
    MAP(mix_w);
    MAP(mix_b);
#undef MAP
    const float *b = moe_layer_expert_bias(f->layer);
    for (int e = 0; e < f->cfg.n_experts; e++) f->bias[e] = b[e];
}

void fixture_init(layer_fixture *f, const moe_layer_config *cfg, int max_tokens, uint64_t seed,
                  float scale) {
    memset(f, 0, sizeof *f);
    f->cfg = *cfg;
    f->max_tokens = max_tokens;
    assert_true(cfg->n_experts <= 256);
    if (moe_layer_create(cfg, max_tokens, NULL, NULL, &f->layer) != MOE_OK)
        fail_msg("moe_layer_create: %s", moe_last_error());
    f->n_params = moe_layer_param_count(cfg);
    tu_fill(moe_layer_param_data(f->layer), f->n_params, seed, 501, -scale, scale);
    if (cfg->enable_expert_bias || cfg->quantile_balancing)
        tu_fill(moe_layer_expert_bias(f->layer), (size_t)cfg->n_experts, seed, 502, -0.3f, 0.3f);
    f->p64 = malloc(sizeof(double) * (f->n_params + 1));
    fixture_sync(f);
}

void fixture_free(layer_fixture *f) {
    moe_layer_destroy(f->layer);
    free(f->p64);
    memset(f, 0, sizeof *f);
}
