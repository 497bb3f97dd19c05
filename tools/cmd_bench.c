/* moe bench layer: the MoE layer forward and backward, time per stage, achieved GFLOP/s, and
 * the large-SGEMM rate measured in the same run as the ceiling. */
#include "tools/cli.h"

#include "core/core.h"
#include "kernels/kernels.h"

#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* GEMM floating-point operations of one forward of the layer (router, experts, shared);
 * the backward GEMMs are twice these. */
static double layer_flops(const moe_layer_config *c, int T, const moe_layer_stats *st) {
    int gated = c->act == MOE_ACT_SWIGLU || c->act == MOE_ACT_GEGLU;
    double rows = 0;
    if (c->pad_to_capacity && st->capacity) rows = (double)st->capacity * c->n_experts;
    else
        for (int e = 0; e < c->n_experts; e++) rows += (double)st->kept[e];
    double per_row = 2.0 * c->d * (gated ? 3.0 : 2.0);
    return 2.0 * T * c->d * c->n_experts + rows * per_row * c->ffn +
           (double)T * per_row * c->shared_ffn;
}

static int bench_layer(moe_options *o, int json) {
    const moe_layer_config *c = &o->layer;
    int T = o->tokens;
    moe_layer *L = NULL;
    if (moe_layer_create(c, T, NULL, NULL, &L) != MOE_OK) {
        fprintf(stderr, "moe bench: %s\n", moe_last_error());
        return 1;
    }
    moe_layer_init_params(L, c->seed, 0.02f);
    size_t n = (size_t)T * c->d;
    float *x = moe_alloc(n, sizeof(float)), *out = moe_alloc(n, sizeof(float)),
          *dout = moe_alloc(n, sizeof(float)), *dx = moe_alloc(n, sizeof(float));
    if (!x || !out || !dout || !dx) {
        fprintf(stderr, "moe bench: out of memory\n");
        moe_layer_destroy(L);
        return 1;
    }
    uint64_t stream = moe_rng_stream(MOE_RNG_DATA, 9, 0, 0);
    for (size_t i = 0; i < n; i++) {
        x[i] = 2 * moe_rng_uniform(c->seed, stream, i) - 1;
        dout[i] = 2 * moe_rng_uniform(c->seed, stream, n + i) - 1;
    }
    double peak = moe_gemm_peak(2048, 5);
    moe_forward_args a = moe_forward_args_default();
    double t_fwd = 0, t_bwd = 0, flops = 0;
    for (int it = 0; it <= o->iters; it++) { /* iteration 0 warms up */
        if (it == 1) moe_layer_reset_stage_times(L);
        a.step = (uint64_t)it;
        double t0 = moe_time_now();
        moe_status s = moe_layer_forward(L, out, x, T, &a);
        double t1 = moe_time_now();
        if (s == MOE_OK) s = moe_layer_backward(L, dx, dout, x);
        double t2 = moe_time_now();
        if (s != MOE_OK) {
            fprintf(stderr, "moe bench: %s\n", moe_last_error());
            moe_layer_destroy(L);
            return 1;
        }
        moe_layer_step_end(L);
        if (it > 0) {
            t_fwd += t1 - t0;
            t_bwd += t2 - t1;
            flops += layer_flops(c, T, moe_layer_get_stats(L));
        }
    }
    int iters = o->iters;
    const double *st = moe_layer_stage_times(L);
    double fwd_rate = flops / t_fwd, all_rate = 3 * flops / (t_fwd + t_bwd);
    const moe_layer_stats *ls = moe_layer_get_stats(L);
    if (json) {
        printf("{\"bench\":\"layer\",\"T\":%d,\"d\":%d,\"ffn\":%d,\"E\":%d,\"k\":%d,\"threads\":%d,"
               "\"gemm\":\"%s\",\"sgemm_gflops\":%.2f,\"fwd_ms\":%.4f,\"bwd_ms\":%.4f,"
               "\"fwd_gflops\":%.2f,\"fwd_bwd_gflops\":%.2f,\"fraction_of_sgemm\":%.4f,"
               "\"dropped_fraction\":%.4f,\"stages_ms\":{",
               T, c->d, c->ffn, c->n_experts, c->topk, omp_get_max_threads(), moe_gemm_backend(),
               1e-9 * peak, 1e3 * t_fwd / iters, 1e3 * t_bwd / iters, 1e-9 * fwd_rate,
               1e-9 * all_rate, all_rate / peak, ls->dropped_fraction);
        for (int s = 0; s < MOE_STAGE_COUNT; s++)
            printf("%s\"%s\":%.4f", s ? "," : "", moe_stage_name((moe_stage)s), 1e3 * st[s] / iters);
        printf("}}\n");
    } else {
        printf("moe bench layer: T=%d d=%d f=%d E=%d k=%d shared=%d, fp32, %d threads\n", T, c->d,
               c->ffn, c->n_experts, c->topk, c->shared_ffn, omp_get_max_threads());
        printf("GEMM library: %s\n", moe_gemm_backend());
        printf("ceiling: SGEMM 2048^3 = %.1f GFLOP/s (best of 5, this run)\n", 1e-9 * peak);
        double total = t_fwd + t_bwd;
        printf("%-20s %10s %7s\n", "stage", "ms/call", "share");
        for (int s = 0; s < MOE_STAGE_COUNT; s++)
            printf("%-20s %10.3f %6.1f%%\n", moe_stage_name((moe_stage)s), 1e3 * st[s] / iters,
                   100 * st[s] / total);
        printf("forward  %9.3f ms  %7.1f GFLOP/s  %5.1f%% of SGEMM\n", 1e3 * t_fwd / iters,
               1e-9 * fwd_rate, 100 * fwd_rate / peak);
        printf("backward %9.3f ms  %7.1f GFLOP/s  %5.1f%% of SGEMM\n", 1e3 * t_bwd / iters,
               1e-9 * 2 * flops / t_bwd, 100 * 2 * flops / t_bwd / peak);
        printf("fwd+bwd  %9.3f ms  %7.1f GFLOP/s  %5.1f%% of SGEMM  (%.2f GFLOP per call, dropped "
               "%.1f%%)\n", 1e3 * total / iters, 1e-9 * all_rate, 100 * all_rate / peak,
               1e-9 * 3 * flops / iters, 100 * ls->dropped_fraction);
    }
    moe_free(x);
    moe_free(out);
    moe_free(dout);
    moe_free(dx);
    moe_layer_destroy(L);
    return 0;
}

int moe_cmd_bench(int argc, char **argv) {
    if (argc < 1 || strcmp(argv[0], "layer")) {
        fprintf(stderr, "moe bench: usage: moe bench layer [options] [--json]\n");
        return 2;
    }
    int json = 0, n = 0;
    char **rest = malloc(sizeof(char *) * (size_t)argc);
    for (int a = 1; a < argc; a++) {
        if (!strcmp(argv[a], "--json")) json = 1;
        else rest[n++] = argv[a];
    }
    moe_options o;
    moe_options_default(&o);
    int rc = 0;
    if (moe_options_parse_args(&o, n, rest) != MOE_OK || moe_options_finish(&o, 0) != MOE_OK) {
        fprintf(stderr, "moe bench: %s\n", moe_last_error());
        rc = 2;
    }
    free(rest);
    if (rc) return rc;
    if (o.threads > 0) omp_set_num_threads(o.threads);
    return bench_layer(&o, json);
}
