/* moe demo: the MoE layer forward and backward on random data. */
#include "tools/cli.h"

#include "core/core.h"
#include "io/options.h"

#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int moe_cmd_demo(int argc, char **argv) {
    moe_options o;
    moe_options_default(&o);
    if (moe_options_parse_args(&o, argc, argv, moe_cli_use("demo")) != MOE_OK ||
        moe_options_finish(&o, 0) != MOE_OK) {
        fprintf(stderr, "moe demo: %s\n", moe_last_error());
        return 2;
    }
    if (moe_cli_cpu_only(&o, "demo")) return 2;
    if (o.print_config) {
        moe_options_write(stdout, &o);
        return 0;
    }
    moe_cli_threads(&o);
    const moe_layer_config *c = &o.layer;
    int T = o.tokens;
    moe_layer *layer = NULL;
    if (moe_layer_create(c, T, NULL, NULL, &layer) != MOE_OK) {
        fprintf(stderr, "moe demo: %s\n", moe_last_error());
        return 1;
    }
    moe_layer_init_params(layer, c->seed, 0.02f);
    size_t n = (size_t)T * (size_t)c->d;
    float *x = malloc(n * sizeof *x), *out = malloc(n * sizeof *out), *dout = malloc(n * sizeof *dout),
          *dx = malloc(n * sizeof *dx);
    if (!x || !out || !dout || !dx) {
        fprintf(stderr, "moe demo: out of memory for %d tokens of width %d\n", T, c->d);
        moe_layer_destroy(layer);
        return 1;
    }
    uint64_t stream = moe_rng_stream(MOE_RNG_DATA, 0, 0, 0);
    for (size_t i = 0; i < n; i++) {
        x[i] = 2 * moe_rng_uniform(c->seed, stream, i) - 1;
        dout[i] = 2 * moe_rng_uniform(c->seed, stream, n + i) - 1;
    }
    printf("moe demo: T=%d d=%d E=%d k=%d f=%d shared=%d threads=%d\n", T, c->d, c->n_experts,
           c->topk, c->ffn, c->shared_ffn, omp_get_max_threads());
    moe_forward_args args = moe_forward_args_default();
    double t_fwd = 0, t_bwd = 0, flops = 0;
    int rc = 0;
    for (int it = 0; it <= o.iters && !rc; it++) { /* iteration 0 warms up, untimed */
        args.step = (uint64_t)it;
        memset(dx, 0, n * sizeof *dx);
        moe_layer_zero_grads(layer);
        double t0 = moe_time_now();
        rc = moe_layer_forward(layer, out, x, T, &args) != MOE_OK;
        double t1 = moe_time_now();
        rc = rc || moe_layer_backward(layer, dx, dout, x) != MOE_OK;
        double t2 = moe_time_now();
        moe_layer_step_end(layer);
        if (it > 0) {
            t_fwd += t1 - t0;
            t_bwd += t2 - t1;
            flops += moe_cli_layer_flops(c, T, moe_layer_get_stats(layer));
        }
    }
    if (rc) {
        fprintf(stderr, "moe demo: %s\n", moe_last_error());
    } else {
        const moe_layer_stats *st = moe_layer_get_stats(layer);
        printf("tokens per expert (last call):");
        for (int e = 0; e < c->n_experts; e++) printf(" %lld", (long long)st->counts[e]);
        printf("\ncapacity %d, dropped %lld of %lld slots (%.2f%%), aux loss %.6g, z loss %.6g\n",
               st->capacity, (long long)st->dropped, (long long)st->routed,
               100 * st->dropped_fraction, st->aux_loss, st->z_loss);
        printf("forward %.3f ms, backward %.3f ms per call; %.1f GFLOP/s forward, %.1f GFLOP/s "
               "forward+backward (backward counted as 2x forward)\n",
               1e3 * t_fwd / o.iters, 1e3 * t_bwd / o.iters, 1e-9 * flops / t_fwd,
               1e-9 * 3 * flops / (t_fwd + t_bwd));
    }
    free(x);
    free(out);
    free(dout);
    free(dx);
    moe_layer_destroy(layer);
    return rc;
}

