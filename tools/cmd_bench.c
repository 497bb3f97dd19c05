/* moe bench layer: the MoE layer forward and backward, time per stage, achieved GFLOP/s, and
 * the large-SGEMM rate measured in the same run as the ceiling. */
#include "tools/cli.h"

#include "core/core.h"
#include "dist/comm.h"
#include "kernels/kernels.h"

#include "train/trainer.h"

#include "moe_cuda.h"

#include <omp.h>
#include <sys/resource.h>
#include <unistd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* On an Emerald Rapids without AMX (a virtual machine that hides it) oneDNN's AVX512-BF16
 * kernels ran at half its fp32 rate (bench/RESULTS.md, session 25). */
void moe_cli_bf16_note(double peak16, double peak, const char *how) {
    if (peak16 > 0 && peak16 < peak) /* 0: no bf16 GEMM (an error follows) */
        printf("note: this CPU multiplies bf16 at %.2fx its fp32 rate (%s): fp32 experts are "
               "faster here\n", peak16 / peak, how);
}

/* GEMM floating-point operations of one forward of the layer (router, experts, shared);
 * the backward GEMMs are twice these. The rows the experts keep: the zero rows that
 * moe-pad-expert-input-to-capacity adds are computed but are not work. The cosine router's
 * are its projection to P dimensions and the cosines over P. */
double moe_cli_layer_flops(const moe_layer_config *c, int T, const moe_layer_stats *st) {
    int gated = c->act == MOE_ACT_SWIGLU || c->act == MOE_ACT_GEGLU;
    double rows = 0;
    for (int e = 0; e < c->n_experts; e++) rows += (double)st->kept[e];
    double per_row = 2.0 * c->d * (gated ? 3.0 : 2.0);
    double router = c->cosine_dim ? 2.0 * T * c->cosine_dim * (c->d + c->n_experts)
                                  : 2.0 * T * c->d * c->n_experts;
    return router + rows * per_row * c->ffn + (double)T * per_row * c->shared_ffn;
}

/* The fp32 ceiling line of the benchmarks on the CPU (moe_gemm_peak of side n). */
static void print_ceiling(double peak, int n) {
    printf("ceiling: SGEMM %d^3 = %.1f GFLOP/s (best of 4 layouts x 5 calls through OpenBLAS "
           "split over the threads, OpenBLAS's threads%s; this run)\n",
           n, 1e-9 * peak, moe_gemm_dnnl_available() ? " and oneDNN" : "");
}

/* Memory bandwidth (bytes/s): best of 5 STREAM-style triads a = b + s c over 64 MiB arrays,
 * counted as two reads and one write per element. */
static double stream_bandwidth(void) {
    size_t n = (size_t)16 << 20;
    float *a = moe_alloc(n, sizeof(float)), *b = moe_alloc(n, sizeof(float)),
          *c = moe_alloc(n, sizeof(float));
    double best = 0;
    if (a && b && c) {
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < n; i++) a[i] = b[i] = c[i] = (float)(i & 255);
        for (int r = 0; r < 5; r++) {
            double t = moe_time_now();
#pragma omp parallel for schedule(static)
            for (size_t i = 0; i < n; i++) a[i] = b[i] + 0.5f * c[i];
            t = moe_time_now() - t;
            best = 12.0 * n / t > best ? 12.0 * n / t : best;
        }
    }
    moe_free(a);
    moe_free(b);
    moe_free(c);
    return best;
}

/* Bytes of weight traffic of one forward + backward: every weight is read by the forward and
 * by the backward, and its gradient read and written (accumulation); bf16 experts read their
 * bf16 copies and convert the fp32 weights once per forward. The floor below which no
 * implementation can go when the weights do not stay in cache. */
static double layer_weight_bytes(const moe_layer_config *c) {
    int gated = c->act == MOE_ACT_SWIGLU || c->act == MOE_ACT_GEGLU;
    double per = (gated ? 3.0 : 2.0) * c->d;
    double experts = per * c->ffn * c->n_experts, dense = per * c->shared_ffn + (double)c->d * c->n_experts;
    return experts * (c->expert_bf16 ? 2 + 2 + 6 + 8 : 16) + dense * 16;
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
    int cn = o->ceiling_n;
    double peak = moe_gemm_peak(cn, 5), peak16 = c->expert_bf16 ? moe_gemm_bf16_peak(cn, 5) : 0;
    double bw = stream_bandwidth();
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
            flops += moe_cli_layer_flops(c, T, moe_layer_get_stats(L));
        }
    }
    int iters = o->iters;
    const double *st = moe_layer_stage_times(L);
    double fwd_rate = flops / t_fwd, all_rate = 3 * flops / (t_fwd + t_bwd);
    const moe_layer_stats *ls = moe_layer_get_stats(L);
    /* Roofline: the compute time at the GEMM ceiling, or the weight traffic at the measured
     * bandwidth, whichever is longer. */
    double t_compute = 3 * flops / iters / (c->expert_bf16 ? peak16 : peak),
           t_memory = layer_weight_bytes(c) / bw,
           t_roof = t_compute > t_memory ? t_compute : t_memory,
           of_roof = t_roof / ((t_fwd + t_bwd) / iters);
    if (json) {
        printf("{\"bench\":\"layer\",\"T\":%d,\"d\":%d,\"ffn\":%d,\"E\":%d,\"k\":%d,\"threads\":%d,"
               "\"gemm\":\"%s\",\"sgemm_n\":%d,\"sgemm_gflops\":%.2f,\"fwd_ms\":%.4f,"
               "\"bwd_ms\":%.4f,"
               "\"fwd_gflops\":%.2f,\"fwd_bwd_gflops\":%.2f,\"fraction_of_sgemm\":%.4f,"
               "\"dropped_fraction\":%.4f,\"bf16\":%d,\"bf16_gemm_gflops\":%.2f,"
               "\"stream_gbs\":%.2f,\"roofline_ms\":%.4f,\"fraction_of_roofline\":%.4f,"
               "\"gflop_per_call\":%.9f,\"weight_traffic_mb\":%.3f,\"stages_ms\":{",
               T, c->d, c->ffn, c->n_experts, c->topk, omp_get_max_threads(), moe_gemm_backend(),
               cn, 1e-9 * peak, 1e3 * t_fwd / iters, 1e3 * t_bwd / iters, 1e-9 * fwd_rate,
               1e-9 * all_rate, all_rate / peak, ls->dropped_fraction, c->expert_bf16,
               1e-9 * peak16, 1e-9 * bw, 1e3 * t_roof, of_roof, 3e-9 * flops / iters,
               1e-6 * layer_weight_bytes(c));
        for (int s = 0; s < MOE_STAGE_COUNT; s++)
            printf("%s\"%s\":%.4f", s ? "," : "", moe_stage_name((moe_stage)s), 1e3 * st[s] / iters);
        printf("}}\n");
    } else {
        printf("moe bench layer: T=%d d=%d f=%d E=%d k=%d shared=%d, experts in %s, %d threads\n",
               T, c->d, c->ffn, c->n_experts, c->topk, c->shared_ffn,
               c->expert_bf16 ? "bf16" : "fp32", omp_get_max_threads());
        printf("GEMM library: %s\n", moe_gemm_backend());
        print_ceiling(peak, cn);
        if (c->expert_bf16)
            printf("ceiling: bf16 GEMM %d^3 (oneDNN) = %.1f GFLOP/s (best of 4 layouts x 5 "
                   "calls, this run); the layer reaches %.1f%% of it\n", cn, 1e-9 * peak16,
                   100 * 3 * flops / (t_fwd + t_bwd) / peak16);
        if (c->expert_bf16) moe_cli_bf16_note(peak16, peak, "the ceilings above");
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
        printf("roofline %9.3f ms  (compute at the GEMM ceiling %.3f ms; %.0f MB of weight "
               "traffic at %.1f GB/s STREAM triad, this run, %.3f ms): the layer takes %.2fx "
               "the roofline\n", 1e3 * t_roof, 1e3 * t_compute, 1e-6 * layer_weight_bytes(c),
               1e-9 * bw, 1e3 * t_memory, 1 / of_roof);
    }
    moe_free(x);
    moe_free(out);
    moe_free(dout);
    moe_free(dx);
    moe_layer_destroy(L);
    return 0;
}

/* moe bench layer --device cuda: the layer on the GPU; the ceilings are cuBLAS, measured in the
 * same run: the same GEMMs as the layer's over all routed rows at once (one expert holding
 * every row: the same FLOPs, dense), and a large square GEMM. */
static int bench_layer_cuda(moe_options *o, int json) {
    const moe_layer_config *c = &o->layer;
    int T = o->tokens, b16 = c->expert_bf16 != 0;
    moe_cuda_layer *L = NULL;
    size_t n = (size_t)T * c->d;
    float *hx = moe_alloc(n, sizeof(float)), *hg = moe_alloc(n, sizeof(float));
    float *x = NULL, *out = NULL, *dout = NULL, *dx = NULL;
    moe_status s = hx && hg ? MOE_OK : MOE_ERR_NOMEM;
    if (s == MOE_OK) s = moe_cuda_layer_create(c, T, NULL, NULL, &L);
    if (s == MOE_OK) s = moe_cuda_layer_init_params(L, c->seed, 0.02f);
    uint64_t stream = moe_rng_stream(MOE_RNG_DATA, 9, 0, 0);
    if (s == MOE_OK) {
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < n; i++) {
            hx[i] = 2 * moe_rng_uniform(c->seed, stream, i) - 1;
            hg[i] = 2 * moe_rng_uniform(c->seed, stream, n + i) - 1;
        }
    }
    float **dev[] = {&x, &out, &dout, &dx};
    for (int i = 0; i < 4 && s == MOE_OK; i++) s = moe_cuda_alloc((void **)dev[i], n * 4);
    if (s == MOE_OK) s = moe_cuda_to_device(x, hx, n * 4);
    if (s == MOE_OK) s = moe_cuda_to_device(dout, hg, n * 4);
    moe_forward_args a = moe_forward_args_default();
    double t_fwd = 0, t_bwd = 0, flops = 0;
    for (int it = 0; it <= o->iters && s == MOE_OK; it++) { /* iteration 0 warms up */
        if (it == 1) moe_cuda_layer_time_stages(L, 1);
        a.step = (uint64_t)it;
        double t0 = moe_time_now();
        s = moe_cuda_layer_forward(L, out, x, T, &a);
        if (s == MOE_OK) s = moe_cuda_synchronize();
        double t1 = moe_time_now();
        if (s == MOE_OK) s = moe_cuda_layer_backward(L, dx, dout, x);
        if (s == MOE_OK) s = moe_cuda_synchronize();
        double t2 = moe_time_now();
        if (it > 0 && s == MOE_OK) {
            t_fwd += t1 - t0;
            t_bwd += t2 - t1;
            flops += moe_cli_layer_flops(c, T, moe_cuda_layer_get_stats(L));
        }
    }
    if (s != MOE_OK) {
        fprintf(stderr, "moe bench: %s\n", moe_last_error());
        for (int i = 0; i < 4; i++) moe_cuda_free(*dev[i]);
        moe_cuda_layer_destroy(L);
        moe_free(hx), moe_free(hg);
        return 1;
    }
    /* the dense ceiling: the layer's GEMMs with every routed row in one expert */
    const moe_layer_stats *ls = moe_cuda_layer_get_stats(L);
    int M = (int)ls->routed, d = c->d, f = c->ffn, E = c->n_experts;
    int gated = c->act == MOE_ACT_SWIGLU || c->act == MOE_ACT_GEGLU;
    int gf = gated ? 2 * f : f, fs = c->shared_ffn, gs = gated ? 2 * fs : fs;
    /* the experts' six, the router's three (fp32), the shared expert's six */
    const int shapes[15][6] = {{0, 1, M, gf, d, b16}, {0, 1, M, d, f, b16}, {1, 0, d, f, M, b16},
                               {0, 0, M, f, d, b16},  {1, 0, gf, d, M, b16}, {0, 0, M, d, gf, b16},
                               {0, 1, T, E, d, 0},    {1, 0, E, d, T, 0},    {0, 0, T, d, E, 0},
                               {0, 1, T, gs, d, b16}, {0, 1, T, d, fs, b16}, {1, 0, d, fs, T, b16},
                               {0, 0, T, fs, d, b16}, {1, 0, gs, d, T, b16}, {0, 0, T, d, gs, b16}};
    double t_dense = 0;
    for (int i = 0; i < (fs > 0 ? 15 : 9); i++) {
        const int *q = shapes[i];
        t_dense += moe_cuda_gemm_seconds(q[0], q[1], q[2], q[3], q[4], q[5], 5);
    }
    int sq = 8192;
    double t_sq = moe_cuda_gemm_seconds(0, 0, sq, sq, sq, b16, 5);
    double f_call = 3 * flops / o->iters, rate = f_call / ((t_fwd + t_bwd) / o->iters);
    double dense = f_call / t_dense, square = 2.0 * sq * sq * sq / t_sq;
    const double *st = moe_cuda_layer_stage_times(L);
    int iters = o->iters;
    if (json) {
        printf("{\"bench\":\"layer\",\"device\":\"cuda\",\"gpu\":\"%s\",\"T\":%d,\"d\":%d,"
               "\"ffn\":%d,\"E\":%d,\"k\":%d,\"bf16\":%d,\"fwd_ms\":%.4f,\"bwd_ms\":%.4f,"
               "\"fwd_bwd_tflops\":%.2f,\"dense_same_gemms_tflops\":%.2f,"
               "\"fraction_of_dense\":%.4f,\"gemm_%d_tflops\":%.2f,\"stages_ms\":{",
               moe_cuda_device_name(), T, d, f, E, c->topk, b16, 1e3 * t_fwd / iters,
               1e3 * t_bwd / iters, 1e-12 * rate, 1e-12 * dense, rate / dense, sq, 1e-12 * square);
        for (int i = 0; i < MOE_STAGE_COUNT; i++)
            printf("%s\"%s\":%.4f", i ? "," : "", moe_stage_name((moe_stage)i), 1e3 * st[i] / iters);
        printf("}}\n");
    } else {
        printf("moe bench layer --device cuda: T=%d d=%d f=%d E=%d k=%d shared=%d, experts in %s\n",
               T, d, f, E, c->topk, fs, b16 ? "bf16 (fp32 accumulation)" : "fp32");
        printf("GPU: %s\n", moe_cuda_device_name());
        printf("ceiling: cuBLAS, this run: the layer's GEMMs over all %d routed rows as one "
               "expert (%s; the router's in fp32) = %.1f TFLOP/s; %s %d^3 = %.1f TFLOP/s\n", M,
               b16 ? "bf16" : "fp32", 1e-12 * dense, b16 ? "bf16" : "fp32", sq, 1e-12 * square);
        double total = t_fwd + t_bwd;
        printf("%-20s %10s %7s\n", "stage", "ms/call", "share");
        for (int i = 0; i < MOE_STAGE_COUNT; i++)
            if (st[i] > 0)
                printf("%-20s %10.3f %6.1f%%\n", moe_stage_name((moe_stage)i), 1e3 * st[i] / iters,
                       100 * st[i] / total);
        printf("forward  %9.3f ms\nbackward %9.3f ms\n", 1e3 * t_fwd / iters, 1e3 * t_bwd / iters);
        printf("fwd+bwd  %9.3f ms  %7.1f TFLOP/s  %5.1f%% of the dense GEMMs  %5.1f%% of %d^3  "
               "(%.2f TFLOP per call)\n", 1e3 * total / iters, 1e-12 * rate, 100 * rate / dense,
               100 * rate / square, sq, 1e-12 * f_call);
    }
    for (int i = 0; i < 4; i++) moe_cuda_free(*dev[i]);
    moe_cuda_layer_destroy(L);
    moe_free(hx), moe_free(hg);
    return 0;
}

/* GEMM FLOPs per token of one forward over S positions, attention scores over the causal
 * half of the sequence included (q k^T over hq, the weighted sum of v over ho). */
static double model_forward_flops(const moe_model_config *c, int S) {
    double d = c->d, H = c->n_heads, hd = moe_model_head_dim(c), proj, hq, ho;
    if (c->kv_lora_rank) { /* MLA: q (through its latent), the kv latent and rotary key, o */
        double nope = c->qk_nope_dim, rope = c->qk_rope_dim, qr = c->q_lora_rank,
               kr = c->kv_lora_rank;
        hq = H * (nope + rope), ho = H * c->v_head_dim;
        proj = (qr ? d * qr + qr * hq : d * hq) + d * (kr + rope) +
               kr * H * (nope + c->v_head_dim) + ho * d;
    } else {
        hq = ho = H * hd;
        proj = d * hq + 2 * d * c->n_kv_heads * hd + ho * d;
    }
    int gated = c->moe.act == MOE_ACT_SWIGLU || c->moe.act == MOE_ACT_GEGLU;
    double per_mlp = 2.0 * c->d * (gated ? 3.0 : 2.0), f = 0;
    for (int l = 0; l < c->n_layers; l++) {
        f += 2.0 * proj + S * (hq + ho); /* projections, attention */
        int E = moe_model_layer_experts(c, l);
        f += E ? 2.0 * c->d * E + c->moe.topk * per_mlp * c->moe.ffn + per_mlp * c->moe.shared_ffn
               : per_mlp * c->ffn;
    }
    f += 2.0 * c->d * c->vocab;
    return f;
}

/* Analytical minimum of the activations a training step keeps, per token in bytes: each float32
 * tensor the backward reads, stored once and not recomputed, with attention that keeps its
 * probabilities (a row of S per head). Per block: the block's input and its norm (and rstd),
 * q, k, v (MLA: the q and kv latents too), the probabilities, the attention's output; the
 * FFN's input and its norm (and rstd); a MoE layer's router scores (E) and, for each of its k
 * choices, the routing weight, the expert's hidden h (gated: 2f) and activation (f), the
 * shared expert's h and activation; a dense FFN's h and activation. Then the final norm's
 * input, output and rstd, and the logits. The expert's input rows are gathered from the FFN's
 * norm again, not kept. */
static double model_activation_bytes_per_token(const moe_model_config *c, int S) {
    double d = c->d, H = c->n_heads, hd = moe_model_head_dim(c), qkv;
    if (c->kv_lora_rank)
        qkv = H * (c->qk_nope_dim + c->qk_rope_dim) * 2 + H * c->v_head_dim + c->q_lora_rank +
              c->kv_lora_rank;
    else
        qkv = H * hd + 2.0 * c->n_kv_heads * hd;
    double ho = c->kv_lora_rank ? H * c->v_head_dim : H * hd;
    int gated = c->moe.act == MOE_ACT_SWIGLU || c->moe.act == MOE_ACT_GEGLU;
    double hidden = gated ? 3.0 : 2.0, f = 0; /* h and the activation, per unit of width */
    for (int l = 0; l < c->n_layers; l++) {
        f += 2 * d + 1 + qkv + H * S + ho + 2 * d + 1;
        int E = moe_model_layer_experts(c, l);
        /* not the expert's output: the routing weight's gradient is dy W_out . a, and the
         * backward computes dy W_out anyway */
        f += E ? E + c->moe.topk * (1 + hidden * c->moe.ffn) + hidden * c->moe.shared_ffn
               : hidden * c->ffn;
    }
    return 4 * (f + 2 * d + 1 + c->vocab);
}

/* The same for one training step (forward + backward = 3 x forward). */
static double model_flops_per_token(const moe_model_config *c) {
    return 3 * model_forward_flops(c, c->seq_len);
}

/* The GEMM rate (FLOP/s) a model's figures are set against: the large SGEMM of the CPU, or on
 * the GPU cuBLAS's fp32 rate (the model computes in fp32). */
static int model_ceiling_side(const moe_options *o) { return o->device ? 8192 : o->ceiling_n; }
static double model_gemm_ceiling(const moe_options *o) {
    int n = model_ceiling_side(o);
    if (!o->device) return moe_gemm_peak(n, 5);
    return 2.0 * n * n * n / moe_cuda_gemm_seconds(0, 0, n, n, n, 0, 3);
}

static void reset_train_times(moe_model *m) {
    moe_model_reset_part_times(m);
    for (int l = 0; l < moe_model_get_config(m)->n_layers; l++)
        if (moe_model_moe_layer(m, l)) moe_layer_reset_stage_times(moe_model_moe_layer(m, l));
}

/* Milliseconds per step: the model's parts (forward, then backward; on the CPU), the rest of the
 * step (the optimizer, the gradient norm, the batch), and the MoE layers' stages summed over
 * layers. */
typedef struct {
    double part[2][MOE_PART_COUNT], rest, stage[MOE_STAGE_COUNT];
} train_times;

static train_times train_times_of(moe_model *m, double t_steps, int iters) {
    train_times r = {0};
    const double *p = moe_model_part_times(m);
    double sum = 0;
    for (int i = 0; i < 2 * MOE_PART_COUNT; i++) {
        r.part[i / MOE_PART_COUNT][i % MOE_PART_COUNT] = 1e3 * p[i] / iters;
        sum += p[i];
    }
    r.rest = 1e3 * (t_steps - sum) / iters;
    for (int l = 0; l < moe_model_get_config(m)->n_layers; l++) {
        moe_layer *L = moe_model_moe_layer(m, l);
        for (int s = 0; L && s < MOE_STAGE_COUNT; s++)
            r.stage[s] += 1e3 * moe_layer_stage_times(L)[s] / iters;
    }
    return r;
}

static int bench_train(moe_options *o, int json) {
    const moe_model_config *c = &o->model;
    const moe_train_config *tc = &o->train;
    int S = c->seq_len, n_tok = 1 << 20;
    uint32_t *data = malloc(sizeof(uint32_t) * (size_t)n_tok);
    for (int i = 0; i < n_tok; i++) data[i] = (uint32_t)(moe_rng_u64(c->moe.seed, 77, (uint64_t)i) % (uint64_t)c->vocab);
    moe_tokens toks = {.ids = data, .id_bytes = MOE_TOKENS_U32,
        .n_tokens = n_tok, .vocab = c->vocab, .eot = 0};
    moe_model *m = NULL;
    moe_trainer *t = NULL;
    int rc = 1;
    if (moe_model_create(c, tc->micro_batch * S, &m) != MOE_OK ||
        (o->device && moe_model_use_device(m, "cuda") != MOE_OK) ||
        moe_trainer_create(m, tc, &toks, NULL, &t) != MOE_OK) {
        fprintf(stderr, "moe bench: %s\n", moe_last_error());
        goto done;
    }
    moe_model_init_params(m, c->moe.seed);
    double peak = model_gemm_ceiling(o);
    double t_steps = 0, tokens = 0;
    /* iteration 0 warms up; a failed or skipped step ends the bench without figures (a skipped
     * step leaves out the optimizer's update, so its time would flatter the rate) */
    for (int it = 0; it <= o->iters; it++) {
        moe_step_metrics s;
        double t0 = moe_time_now();
        moe_status st = moe_trainer_step(t, &s);
        if (st == MOE_OK && s.skipped)
            st = moe_set_error(MOE_ERR_STATE, "step %d had a loss or gradient that is not finite "
                               "(loss %g, gradient norm %g) and was skipped; lower --lr", it + 1,
                               s.loss, s.grad_norm);
        if (st != MOE_OK) {
            fprintf(stderr, "moe bench: %s\n", moe_last_error());
            goto done;
        }
        if (it) t_steps += moe_time_now() - t0, tokens += (double)s.tokens;
        if (!it) reset_train_times(m);
    }
    double tok_s = tokens / t_steps, fpt = model_flops_per_token(c);
    size_t np = moe_model_param_count(m), act = moe_model_activation_bytes(m);
    /* what the program allocates: parameters, gradients, Adam's m and v, and its activation
     * workspace as planned (which holds more than a strict minimum: one scratch region that
     * the FFNs' calls and the attention's scratch share, the backward's dx and dn, the
     * router's float64 arrays) */
    double alloc_bytes = 4.0 * 4 * np + act;
    double min_act = model_activation_bytes_per_token(c, S) * tc->micro_batch * S,
           min_bytes = 4.0 * 4 * np + min_act;
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double rss = 1024.0 * ru.ru_maxrss;
    train_times tt = train_times_of(m, t_steps, o->iters);
    if (json) {
        printf("{\"bench\":\"train\",\"params\":%zu,\"tokens_per_s\":%.1f,\"gflops\":%.2f,"
               "\"sgemm_n\":%d,\"sgemm_gflops\":%.2f,\"mfu\":%.4f,\"peak_rss_mb\":%.1f,"
               "\"minimum_mb\":%.3f,\"allocated_mb\":%.1f,"
               "\"threads\":%d,\"mflop_per_token\":%.6f,\"step_ms\":%.4f", np, tok_s,
               1e-9 * tok_s * fpt, model_ceiling_side(o), 1e-9 * peak, tok_s * fpt / peak,
               rss / 1048576, min_bytes / 1048576, alloc_bytes / 1048576,
               omp_get_max_threads(), 1e-6 * fpt, 1e3 * t_steps / o->iters);
        if (!o->device) {
            for (int b = 0; b < 2; b++) {
                printf(",\"%s_ms\":{", b ? "backward" : "forward");
                for (int p = 0; p < MOE_PART_COUNT; p++)
                    printf("%s\"%s\":%.4f", p ? "," : "",
                           moe_model_part_name((moe_model_part)p), tt.part[b][p]);
                printf("}");
            }
            printf(",\"rest_ms\":%.4f,\"moe_stages_ms\":{", tt.rest);
            for (int s = 0; s < MOE_STAGE_COUNT; s++)
                printf("%s\"%s\":%.4f", s ? "," : "", moe_stage_name((moe_stage)s), tt.stage[s]);
            printf("}");
        }
        printf("}\n");
    } else {
        printf("moe bench train: %d layers, d=%d, %zu parameters, micro-batch %d x %d tokens, %d "
               "threads\n", c->n_layers, c->d, np, tc->micro_batch, S, omp_get_max_threads());
        if (o->device) {
            printf("GPU: %s (forward, backward and AdamW)\n", moe_cuda_device_name());
            printf("ceiling: cuBLAS fp32 %d^3 = %.1f GFLOP/s (best of 3, this run)\n",
                   model_ceiling_side(o), 1e-9 * peak);
        } else {
            printf("GEMM library: %s\n", moe_gemm_backend());
            print_ceiling(peak, o->ceiling_n);
        }
        printf("training: %.0f tokens/s, %.1f ms per step; %.2f MFLOP per token; %.1f GFLOP/s = "
               "%.1f%% model FLOP utilisation against the GEMM ceiling\n", tok_s,
               1e3 * t_steps / o->iters, 1e-6 * fpt, 1e-9 * tok_s * fpt, 100 * tok_s * fpt / peak);
        if (!o->device) {
            printf("%-20s %10s %10s  (ms per step)\n", "part", "forward", "backward");
            for (int p = 0; p < MOE_PART_COUNT; p++)
                printf("%-20s %10.3f %10.3f\n", moe_model_part_name((moe_model_part)p),
                       tt.part[0][p], tt.part[1][p]);
            printf("%-20s %10.3f  (the optimizer, the gradient norm, the batch)\n", "rest",
                   tt.rest);
            int shown = 0; /* what rounds to 0.000 did not run (none in a dense model) */
            for (int s = 0; s < MOE_STAGE_COUNT; s++)
                if (tt.stage[s] >= 0.0005)
                    printf("%s %s %.3f;", shown++ ? "" : "the MoE layers' stages, summed over "
                           "layers (ms per step):", moe_stage_name((moe_stage)s), tt.stage[s]);
            if (shown) printf("\n");
        }
        printf("memory: peak RSS %.1f MB; analytical minimum %.1f MB (parameters, gradients and "
               "Adam state %.1f MB, the activations the backward reads %.1f MB); allocated "
               "%.1f MB (activation workspace %.1f MB)\n", rss / 1048576, min_bytes / 1048576,
               16.0 * np / 1048576, min_act / 1048576, alloc_bytes / 1048576, act / 1048576.0);
    }
    rc = 0;
done:
    moe_trainer_destroy(t);
    moe_model_destroy(m);
    free(data);
    return rc;
}

/* What one decoding step reads: every parameter but the embedding table's other rows (all of
 * it when the output layer is the embedding), and of each MoE layer only the experts its
 * tokens went to; expert_bytes[l * stride + e] is expert e of block l, fixed is the rest.
 * bf16 experts (and shared expert) count 2 bytes a weight: decoding keeps the bf16 copies the
 * prompt's call made (moe_forward_args.reuse_bf16). */
typedef struct {
    double fixed, *expert_bytes;
    int stride;
} decode_bytes;

static moe_status decode_bytes_plan(moe_model *m, decode_bytes *b) {
    const moe_model_config *c = moe_model_get_config(m);
    int n = moe_model_n_tensors(m), tied = 1;
    b->stride = 0;
    for (int l = 0; l < c->n_layers; l++)
        if (moe_model_layer_experts(c, l) > b->stride) b->stride = moe_model_layer_experts(c, l);
    b->fixed = 0;
    b->expert_bytes = calloc((size_t)c->n_layers * (size_t)(b->stride ? b->stride : 1),
                             sizeof(double));
    if (!b->expert_bytes) return moe_set_error(MOE_ERR_NOMEM, "out of memory");
    for (int i = 0; i < n; i++)
        if (!strcmp(moe_model_tensor(m, i)->name, "lm_head.weight")) tied = 0;
    for (int i = 0; i < n; i++) {
        const moe_tensor_info *t = moe_model_tensor(m, i);
        int l, bf16 = c->moe.expert_bf16 && (t->expert || strstr(t->name, ".shared_expert."));
        double bytes = (bf16 ? 2.0 : 4.0) * (double)t->numel;
        if (t->expert && sscanf(t->name, "model.layers.%d.", &l) == 1)
            b->expert_bytes[(size_t)l * b->stride + t->expert_id] += bytes;
        else if (!strcmp(t->name, "model.embed_tokens.weight") && !tied)
            b->fixed += 4.0 * c->d;
        else b->fixed += bytes;
    }
    return MOE_OK;
}

/* Parameter bytes the last decoding step read (the experts its tokens went to). */
static double decode_bytes_last(moe_model *m, const decode_bytes *b) {
    const moe_model_config *c = moe_model_get_config(m);
    double sum = b->fixed;
    for (int l = 0; l < c->n_layers; l++) {
        moe_layer *L = moe_model_moe_layer(m, l);
        if (!L) continue;
        const moe_layer_stats *st = moe_layer_get_stats(L);
        for (int e = 0; e < st->n_experts; e++)
            if (st->kept[e]) sum += b->expert_bytes[(size_t)l * b->stride + e];
    }
    return sum;
}

/* Bytes of the first CPU's L3 as Linux reports it (sysconf's figure can be a whole socket's);
 * 0 when unknown. */
static double last_level_cache(void) {
    FILE *f = fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r");
    double kb = 0;
    if (f && fscanf(f, "%lfK", &kb) != 1) kb = 0;
    if (f) fclose(f);
    return 1024 * kb;
}

static int argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

/* moe bench generate: a prompt of --tokens P random tokens decoded in one call (prefill),
 * then --max-new-tokens N greedy tokens one call each with the key/value cache; best of
 * --iters runs. Prefill against the SGEMM rate, decoding against the memory bandwidth: the
 * parameters each step reads (the experts its token went to) and the cache it attends over,
 * at the STREAM triad rate of the same run (--device cuda: cuBLAS's fp32 rate and a copy in
 * the GPU's memory). */
static int bench_generate(moe_options *o, int json) {
    const moe_model_config *c = &o->model;
    int S = c->seq_len;
    int P = moe_options_given(o, "tokens") ? o->tokens : S / 2;
    int N = moe_options_given(o, "max-new-tokens") ? o->max_new_tokens : S - P;
    int iters = moe_options_given(o, "iters") ? o->iters : 3;
    if (P + (long)N > S || N < 1 || P < 1) {
        if (moe_options_given(o, "max-new-tokens"))
            fprintf(stderr, "moe bench generate: --tokens (%d, the prompt) + --max-new-tokens (%d) "
                    "must fit --seq-length (%d), with at least one token each\n", P, N, S);
        else /* the new tokens default to the rest of the sequence: none is left */
            fprintf(stderr, "moe bench generate: --tokens (%d, the prompt) must be between 1 and "
                    "--seq-length - 1 (%d), leaving the rest to --max-new-tokens\n", P, S - 1);
        return 2;
    }
    moe_model *m = NULL;
    decode_bytes db = {0};
    int32_t *prompt = malloc(sizeof(int32_t) * (size_t)P);
    int rc = 1;
    if (!prompt) moe_set_error(MOE_ERR_NOMEM, "out of memory");
    if (!prompt || moe_model_create_inference(c, P, &m) != MOE_OK ||
        decode_bytes_plan(m, &db) != MOE_OK ||
        (o->device && moe_model_use_device(m, "cuda") != MOE_OK))
        goto done;
    moe_model_init_params(m, c->moe.seed);
    for (int i = 0; i < P; i++)
        prompt[i] = (int32_t)(moe_rng_u64(c->moe.seed, 78, (uint64_t)i) % (uint64_t)c->vocab);
    double peak = model_gemm_ceiling(o);
    /* the memory's ceiling on the GPU: a copy of 1 GiB there */
    double bw = o->device ? moe_cuda_copy_bandwidth((size_t)1 << 30, 5) : stream_bandwidth();
    const char *gemm = o->device ? "cuBLAS SGEMM 8192^3" : "SGEMM",
               *mem = o->device ? "a device copy" : "the STREAM triad";
    double t_pre = 1e30, t_dec = 1e30, bytes = 0, cache_bytes = 0;
    double kv = 4.0 * (double)moe_model_cache_width(m);
    for (int it = 0; it < iters; it++) {
        moe_model_reset_cache(m);
        double start = moe_time_now(), t = 0, by = 0, cb = 0;
        if (moe_model_decode(m, prompt, P) != MOE_OK) goto done;
        double t_p = moe_time_now() - start;
        t_pre = t_p < t_pre ? t_p : t_pre;
        int32_t next = argmax(moe_model_logits(m) + (size_t)(P - 1) * c->vocab, c->vocab);
        for (int i = 0; i < N; i++) {
            double t1 = moe_time_now();
            if (moe_model_decode(m, &next, 1) != MOE_OK) goto done;
            t += moe_time_now() - t1;
            by += decode_bytes_last(m, &db);
            cb += kv * (P + i + 1);
            next = argmax(moe_model_logits(m), c->vocab);
        }
        if (t < t_dec) t_dec = t, bytes = by / N, cache_bytes = cb / N;
    }
    double pre_flops = model_forward_flops(c, P) * P, step_s = t_dec / N;
    double roof_s = (bytes + cache_bytes) / bw;
    if (json)
        printf("{\"bench\":\"generate\",\"device\":\"%s\",\"params\":%zu,"
               "\"prompt_tokens\":%d,\"new_tokens\":%d,"
               "\"prefill_tokens_per_s\":%.1f,\"prefill_gflops\":%.2f,\"sgemm_n\":%d,"
               "\"sgemm_gflops\":%.2f,"
               "\"prefill_fraction_of_sgemm\":%.4f,\"decode_tokens_per_s\":%.2f,"
               "\"decode_ms_per_token\":%.4f,\"decode_param_mb\":%.3f,\"decode_cache_mb\":%.3f,"
               "\"stream_gb_s\":%.2f,\"decode_fraction_of_bandwidth\":%.4f,\"threads\":%d}\n",
               o->device ? "cuda" : "cpu", moe_model_param_count(m), P, N, P / t_pre,
               1e-9 * pre_flops / t_pre, model_ceiling_side(o), 1e-9 * peak,
               pre_flops / t_pre / peak, 1 / step_s, 1e3 * step_s, bytes / 1048576,
               cache_bytes / 1048576, 1e-9 * bw, roof_s / step_s, omp_get_max_threads());
    else {
        printf("moe bench generate: %d layers, d=%d, %zu parameters, prompt %d tokens, %d new "
               "tokens, best of %d, %d threads\n", c->n_layers, c->d, moe_model_param_count(m), P,
               N, iters, omp_get_max_threads());
        if (o->device)
            printf("GPU: %s; ceiling: %s = %.1f GFLOP/s, %s %.1f GB/s (this run)\n",
                   moe_cuda_device_name(), gemm, 1e-9 * peak, mem, 1e-9 * bw);
        else {
            printf("GEMM library: %s\n", moe_gemm_backend());
            print_ceiling(peak, o->ceiling_n);
        }
        printf("prefill: %.1f ms, %.0f tokens/s, %.1f GFLOP/s = %.1f%% of %s%s\n", 1e3 * t_pre,
               P / t_pre, 1e-9 * pre_flops / t_pre, 100 * pre_flops / t_pre / peak, gemm,
               c->moe.expert_bf16 ? " (fp32; the bf16 experts' GEMMs have their own rate, "
                                    "above it on most CPUs with AVX512-BF16, below it on some)" : "");
        printf("decode: %.3f ms per token, %.1f tokens/s; each step reads %.1f MB of parameters "
               "(its tokens' experts only) and %.1f MB of cache on average: %.1f GB/s = %.1f%% "
               "of %s (%.1f GB/s, this run)\n", 1e3 * step_s, 1 / step_s, bytes / 1048576,
               cache_bytes / 1048576, 1e-9 * (bytes + cache_bytes) / step_s,
               100 * roof_s / step_s, mem, 1e-9 * bw);
        double l3 = o->device ? 0 : last_level_cache();
        if (l3 > 0 && 4.0 * (double)moe_model_param_count(m) < l3)
            printf("(the parameters, %.1f MB, fit in the last-level cache, %.1f MB: decoding can "
                   "read them faster than memory)\n", 4.0 * (double)moe_model_param_count(m) /
                   1048576, l3 / 1048576);
    }
    rc = 0;
done:
    if (rc) fprintf(stderr, "moe bench generate: %s\n", moe_last_error());
    free(db.expert_bytes);
    free(prompt);
    moe_model_destroy(m);
    return rc;
}

/* The slowest rank's value of a duration (seconds). */
static double slowest(moe_dist *d, double s) {
    int64_t ns = (int64_t)(s * 1e9);
    moe_comm_max_i64(d->world, &ns, 1);
    return 1e-9 * (double)ns;
}

/* iters timed forward+backward calls after one warm-up, each started together: seconds per
 * call (t), of which waiting at the exchanges (wait, when timed), bytes exchanged and expert
 * rows per call. */
static moe_status layer_iters(moe_dist *d, moe_layer *L, const float *x, float *out,
                              const float *dout, float *dx, int T, int iters, double *t,
                              double *wait, int64_t *bytes, int64_t *rows) {
    moe_forward_args a = moe_forward_args_default();
    a.training = 1;
    *t = *wait = 0, *bytes = *rows = 0;
    for (int it = 0; it <= iters; it++) {
        if (it == 1) moe_layer_reset_stage_times(L);
        a.step = (uint64_t)it;
        moe_comm_barrier(d->world);
        double t0 = moe_time_now();
        moe_status s = moe_layer_forward(L, out, x, T, &a);
        if (s == MOE_OK) s = moe_layer_backward(L, dx, dout, x);
        if (moe_dist_any(d, s != MOE_OK)) return s != MOE_OK ? s : MOE_ERR_IO;
        moe_layer_step_end(L);
        if (it == 0) continue;
        const moe_layer_stats *ls = moe_layer_get_stats(L);
        *t += (moe_time_now() - t0) / iters;
        *wait += ls->exchange_wait_s / iters;
        *bytes += ls->exchange_bytes;
        for (int e = 0; e < ls->n_experts; e++) *rows += ls->kept[e];
    }
    *bytes /= iters, *rows /= iters;
    return MOE_OK;
}

/* moe bench alltoall (under mpirun): the expert-parallel layer over all ranks (or
 * --expert-model-parallel-size), forward and backward; the time and bytes of its token
 * exchanges against plain MPI_Alltoallv calls moving the same row bytes evenly (four per
 * iteration: dispatch, combine, and their gradients), and tokens per second of all ranks.
 * Times are the slowest rank's. */
static int bench_alltoall(moe_options *o, int json) {
    moe_dist *d = moe_dist_get();
    int P = d->world_size, ep = o->ep > 1 ? o->ep : P, T = o->tokens;
    if (moe_dist_grid(d, ep) != MOE_OK ||
        moe_comm_set_two_stage(d->expert, o->two_stage ? o->node_ranks : 1) != MOE_OK) {
        fprintf(stderr, "moe bench: %s\n", moe_last_error());
        return 2;
    }
    moe_layer_config c = o->layer;
    c.ep_size = ep;
    c.ep_rank = d->ep_rank;
    moe_layer *L = NULL;
    size_t n = (size_t)T * c.d;
    float *x = moe_alloc(n, sizeof(float)), *out = moe_alloc(n, sizeof(float)),
          *dout = moe_alloc(n, sizeof(float)), *dx = moe_alloc(n, sizeof(float));
    int bad = !x || !out || !dout || !dx || moe_layer_create(&c, T, NULL, NULL, &L) != MOE_OK;
    if (moe_dist_any(d, bad)) {
        fprintf(stderr, "moe bench (rank %d): %s\n", d->world_rank,
                bad ? moe_last_error() : "another rank failed");
        moe_dist_abort(d, 1);
    }
    moe_layer_init_params(L, c.seed, 0.02f);
    moe_layer_set_comms(L, d->expert, d->world);
    uint64_t stream = moe_rng_stream(MOE_RNG_DATA, 10, (uint64_t)d->world_rank, 0);
    for (size_t i = 0; i < n; i++) {
        x[i] = 2 * moe_rng_uniform(c.seed, stream, i) - 1;
        dout[i] = 2 * moe_rng_uniform(c.seed, stream, n + i) - 1;
    }
    /* first as training runs it; then with a barrier before each exchange, which splits
     * the exchange time into waiting for the slowest rank and moving the bytes */
    double t_layer = 0, t_ex = 0, t_wait = 0, t_move = 0;
    int64_t bytes = 0, rows = 0;
    for (int pass = 0; pass < 2; pass++) {
        if (moe_layer_time_exchange_waits(L, pass) != MOE_OK) moe_dist_abort(d, 1);
        double t = 0, w = 0;
        if (layer_iters(d, L, x, out, dout, dx, T, o->iters, &t, &w, &bytes, &rows) != MOE_OK) {
            fprintf(stderr, "moe bench (rank %d): %s\n", d->world_rank, moe_last_error());
            moe_dist_abort(d, 1);
        }
        const double *st = moe_layer_stage_times(L);
        double ex = (st[MOE_STAGE_EXCHANGE] + st[MOE_STAGE_BWD_EXCHANGE]) / o->iters;
        if (pass == 0) t_layer = t, t_ex = ex;
        else t_wait = w, t_move = ex - w;
    }
    /* the baseline: the same row bytes per iteration, evenly over the expert group */
    int64_t row_bytes = rows * c.d * (int64_t)sizeof(float);
    int64_t per = ep > 1 ? row_bytes / ep : 0, cnt[ep], dsp[ep];
    for (int q = 0; q < ep; q++) cnt[q] = per, dsp[q] = q * per;
    /* four buffer pairs, as the layer's four row exchanges use different memory */
    size_t nb = (size_t)(per * ep) + 1;
    char *buf = malloc(8 * nb);
    if (!buf) moe_dist_abort(d, 1);
    memset(buf, 1, 8 * nb);
    double t_plain = 0;
    for (int it = 0; it <= o->iters; it++) {
        moe_comm_barrier(d->world);
        double t0 = moe_time_now();
        for (int k = 0; k < 4 && ep > 1; k++)
            if (moe_comm_alltoallv(d->expert, buf + 2 * k * nb, cnt, dsp, buf + (2 * k + 1) * nb,
                                   cnt, dsp) != MOE_OK)
                moe_dist_abort(d, 1);
        if (it > 0) t_plain += moe_time_now() - t0;
    }
    free(buf);
    int iters = o->iters;
    t_layer = slowest(d, t_layer);
    t_ex = slowest(d, t_ex);
    t_wait = slowest(d, t_wait);
    t_move = slowest(d, t_move);
    t_plain = slowest(d, t_plain) / iters;
    double ex_bytes = (double)bytes, plain_bytes = 4.0 * (double)(per * ep);
    moe_comm_sum_f64(d->world, &ex_bytes, 1);
    moe_comm_sum_f64(d->world, &plain_bytes, 1);
    ex_bytes /= P, plain_bytes /= P; /* per rank */
    double tok_s = (double)T * P / t_layer;
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    int over = (long)d->node_size * omp_get_max_threads() > cores;
    if (d->world_rank == 0 && json)
        printf("{\"bench\":\"alltoall\",\"ranks\":%d,\"ep\":%d,\"two_stage\":%d,\"T\":%d,\"d\":%d,"
               "\"E\":%d,\"k\":%d,\"threads\":%d,\"oversubscribed\":%d,\"layer_ms\":%.4f,"
               "\"exchange_ms\":%.4f,\"wait_ms\":%.4f,\"move_ms\":%.4f,\"exchange_mb\":%.4f,"
               "\"exchange_gbs\":%.4f,\"plain_ms\":%.4f,\"plain_mb\":%.4f,\"plain_gbs\":%.4f,"
               "\"tokens_per_s\":%.1f}\n",
               P, ep, moe_comm_two_stage(d->expert), T, c.d, c.n_experts, c.topk,
               omp_get_max_threads(), over, 1e3 * t_layer, 1e3 * t_ex, 1e3 * t_wait,
               1e3 * t_move, 1e-6 * ex_bytes, t_move > 0 ? 1e-9 * ex_bytes / t_move : 0,
               1e3 * t_plain, 1e-6 * plain_bytes, t_plain > 0 ? 1e-9 * plain_bytes / t_plain : 0,
               tok_s);
    else if (d->world_rank == 0) {
        printf("moe bench alltoall: %d ranks, expert-parallel %d%s, T=%d per rank, d=%d f=%d E=%d "
               "k=%d, %d threads per rank\n", P, ep,
               moe_comm_two_stage(d->expert) ? " (two-stage all-to-all)" : "", T, c.d, c.ffn,
               c.n_experts, c.topk, omp_get_max_threads());
        if (over)
            printf("note: %d ranks x %d threads on %ld cores share them: the figures only "
                   "indicate\n", d->node_size, omp_get_max_threads(), cores);
        printf("layer fwd+bwd     %9.3f ms  %10.0f tokens/s (all ranks)\n", 1e3 * t_layer, tok_s);
        printf("token exchanges   %9.3f ms  (%.1f%% of the layer, waits for other ranks "
               "included)\n", 1e3 * t_ex, 100 * t_ex / t_layer);
        printf("  with a barrier before each: waiting %.3f ms, moving the bytes %.3f ms\n",
               1e3 * t_wait, 1e3 * t_move);
        printf("moving            %9.3f ms  %8.2f MB per rank  %7.2f GB/s  (rows, weights, "
               "counts)\n", 1e3 * t_move, 1e-6 * ex_bytes,
               t_move > 0 ? 1e-9 * ex_bytes / t_move : 0);
        printf("plain Alltoallv   %9.3f ms  %8.2f MB per rank  %7.2f GB/s  (the same row bytes, "
               "even, 4 calls)\n", 1e3 * t_plain, 1e-6 * plain_bytes,
               t_plain > 0 ? 1e-9 * plain_bytes / t_plain : 0);
    }
    moe_free(x), moe_free(out), moe_free(dout), moe_free(dx);
    moe_layer_destroy(L);
    return 0;
}

int moe_cmd_bench(int argc, char **argv) {
    if (argc < 1 || (strcmp(argv[0], "layer") && strcmp(argv[0], "train") &&
                     strcmp(argv[0], "generate") && strcmp(argv[0], "alltoall"))) {
        fprintf(stderr, "moe bench: usage: moe bench layer|train|generate|alltoall [options] "
                "[--json]\n");
        return 2;
    }
    int train = !strcmp(argv[0], "train"), generate = !strcmp(argv[0], "generate");
    moe_dist *d = moe_dist_get();
    if (d->world_size > 1 && strcmp(argv[0], "alltoall")) { /* W copies would share the cores */
        if (d->world_rank == 0)
            fprintf(stderr, "moe bench %s runs in one process; under mpirun, moe bench alltoall "
                    "measures the expert-parallel layer\n", argv[0]);
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
    int parts = train ? MOE_OPTIONS_MODEL | MOE_OPTIONS_TRAIN : generate ? MOE_OPTIONS_MODEL : 0;
    char cmd[32];
    snprintf(cmd, sizeof cmd, "bench %s", argv[0]);
    if (moe_options_parse_args(&o, n, rest, moe_cli_use(cmd)) != MOE_OK ||
        moe_options_finish(&o, parts) != MOE_OK) {
        fprintf(stderr, "moe %s: %s\n", cmd, moe_last_error());
        rc = 2;
    }
    free(rest);
    if (rc) return rc;
    moe_cli_threads(&o);
    if (!strcmp(argv[0], "alltoall") && o.device) {
        fprintf(stderr, "moe bench: alltoall runs on the CPU (--device cpu)\n");
        return 2;
    }
    if (o.device && moe_options_given(&o, "ceiling-size")) {
        fprintf(stderr, "moe bench: --ceiling-size sizes the CPU's ceiling; with --device cuda "
                "the ceilings are cuBLAS's own\n");
        return 2;
    }
    if (!strcmp(argv[0], "alltoall")) return bench_alltoall(&o, json);
    if (generate) return bench_generate(&o, json);
    if (!train && o.device) return bench_layer_cuda(&o, json);
    return train ? bench_train(&o, json) : bench_layer(&o, json);
}
