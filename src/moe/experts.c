/* Experts: MLP rows (shared by the routed experts and the shared expert) and the grouped
 * forward/backward over the permuted rows, one GEMM per expert block. docs/LAYER.md §7. */
#include "core/core.h"
#include "kernels/kernels.h"
#include "moe/layer_internal.h"

#include <omp.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Which library multiplies the fp32 expert blocks while the experts are spread over the
 * threads (one single-threaded GEMM per block), per layout (eg_layout).
 * MOE_EXPERT_GEMM: "auto" (default) takes the fastest measured (bench/RESULTS.md, Scaling):
 * - NN (dy W_out, dh W_in) and NT with many rows: oneDNN (NN: our tiles without oneDNN);
 * - NT with at most 192 rows (the forward's x W_in^T and a W_out^T of an expert with few rows):
 *   our AVX-512 tiles, which read each weight once per 64 rows and pack nothing (ahead of both
 *   libraries up to 192 rows, even at 256, behind from 512); oneDNN on CPUs without AVX-512;
 * - TN (the weight gradients) with at most 128 rows: our tiles (ahead of OpenBLAS from 16 to
 *   128 rows, behind from 256); OpenBLAS on CPUs without AVX-512;
 * - TN with more rows and a gradient of at most 256 K floats (a small model's experts): oneDNN,
 *   level with OpenBLAS to 40 % ahead at 128-512 x 128-512 over 256-4096 rows, and level or
 *   behind from 512 K floats (bench/RESULTS.md, session 42); OpenBLAS on CPUs without AVX-512;
 * - the other TN: OpenBLAS.
 * "blas", "dnnl" (NN and NT) and "small" (all) for comparisons. */
enum { EG_BLAS, EG_DNNL, EG_SMALL };
#define SMALL_NT_ROWS 192
#define SMALL_TN_ROWS 128
#define DNNL_TN_C (256 << 10)
typedef enum {
    EG_NN,
    EG_TN,          /* more than SMALL_TN_ROWS rows, a gradient of more than DNNL_TN_C */
    EG_NT_FEW,      /* at most SMALL_NT_ROWS rows */
    EG_NT,          /* more rows */
    EG_TN_FEW,      /* at most SMALL_TN_ROWS rows */
    EG_TN_SMALL_C,  /* more rows, a gradient of at most DNNL_TN_C */
    EG_LAYOUTS
} eg_layout;
static pthread_once_t eg_once = PTHREAD_ONCE_INIT;
static int eg_choice[EG_LAYOUTS];
static void read_expert_gemm(void) {
    const char *v = getenv("MOE_EXPERT_GEMM");
    int dnnl = moe_gemm_dnnl_available() ? EG_DNNL : EG_BLAS;
    int small = moe_gemm_small_available() ? EG_SMALL : EG_BLAS;
    /* without our tiles (no AVX-512) NT of few rows goes to oneDNN too: OpenBLAS packs the
     * weights at every call (the forward at 32 rows per expert 11-21 % less time, bench/RESULTS.md,
     * session 24); oneDNN for TN did not beat OpenBLAS there */
    int nt_few = small == EG_SMALL ? EG_SMALL : dnnl;
    /* TN of a small gradient was measured on AVX-512 CPUs only (Zen 4) */
    int tn_small_c = small == EG_SMALL ? dnnl : EG_BLAS;
    int auto_choice[EG_LAYOUTS] = {[EG_NN] = dnnl != EG_BLAS ? dnnl : small,
                                   [EG_TN] = EG_BLAS,
                                   [EG_NT_FEW] = nt_few,
                                   [EG_NT] = dnnl,
                                   [EG_TN_FEW] = small,
                                   [EG_TN_SMALL_C] = tn_small_c};
    if (v && *v && strcmp(v, "auto") && strcmp(v, "blas") && strcmp(v, "dnnl") &&
        strcmp(v, "small"))
        fprintf(stderr, "moe: MOE_EXPERT_GEMM=%s is not auto, blas, dnnl or small: using auto\n",
                v);
    for (int l = 0; l < EG_LAYOUTS; l++) {
        if (v && !strcmp(v, "blas")) eg_choice[l] = EG_BLAS;
        else if (v && !strcmp(v, "dnnl")) /* NN and NT */
            eg_choice[l] = l == EG_NN || l == EG_NT_FEW || l == EG_NT ? dnnl : EG_BLAS;
        else if (v && !strcmp(v, "small")) eg_choice[l] = small;
        else eg_choice[l] = auto_choice[l];
    }
}

static eg_layout layout_of(int ta, int tb, int m, int n, int k) {
    if (!ta) return !tb ? EG_NN : m <= SMALL_NT_ROWS ? EG_NT_FEW : EG_NT;
    if (k <= SMALL_TN_ROWS) return EG_TN_FEW;
    return (size_t)m * n <= DNNL_TN_C ? EG_TN_SMALL_C : EG_TN;
}

/* C = op(A) op(B) + beta C in fp32, or with the bf16 copies of A and B when b16 is set. */
static void gemm_any(const moe_mlp_bf16 *b16, int ta, int tb, int m, int n, int k, const float *A,
                     const uint16_t *A16, int lda, const float *B, const uint16_t *B16, int ldb,
                     float beta, float *C, int ldc) {
    if (!b16) {
        pthread_once(&eg_once, read_expert_gemm);
        /* single-threaded GEMMs (inside the experts' parallel loop, or one thread in all):
         * the measured choice, OpenBLAS meaning OpenBLAS itself (moe_gemm would take oneDNN
         * for NN and TN with one thread); over the threads, moe_gemm's choice */
        int single = omp_in_parallel() || omp_get_max_threads() == 1;
        if (!single) {
            moe_gemm(ta, tb, m, n, k, 1.0f, A, lda, B, ldb, beta, C, ldc);
            return;
        }
        /* a decoding step's few rows as dot products first, as moe_gemm does (our tiles take
         * them themselves; this is where CPUs without AVX-512 get them) */
        int lib = eg_choice[layout_of(ta, tb, m, n, k)];
        if (lib != EG_SMALL && !ta && tb && moe_gemm_dot(0, m, n, k, A, lda, B, ldb, beta, C, ldc))
            return;
        moe_status st = MOE_ERR_STATE;
        if (lib == EG_SMALL) st = moe_gemm_small(ta, tb, m, n, k, A, lda, B, ldb, beta, C, ldc);
        if (lib == EG_DNNL) st = moe_gemm_dnnl(ta, tb, m, n, k, A, lda, B, ldb, beta, C, ldc);
        if (st != MOE_OK) moe_gemm_blas(ta, tb, m, n, k, 1.0f, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    moe_status st = moe_gemm_bf16(ta, tb, m, n, k, A16, lda, B16, ldb, beta, C, ldc);
    MOE_ASSERT(st == MOE_OK); /* availability: checked as moe_layer_forward starts */
}

/* An MLP's element-wise work, by rows (the bias gradients: by columns) [lo, hi), through
 * moe_for_ranges: over the threads, or on the calling thread inside the experts' region. */
typedef struct {
    moe_activation act;
    int d, f, gf, n;
    int w_on_input; /* w scales h (x W_inᵀ, the input's image) instead of act(h) */
    const float *b_in, *b_out, *w, *dy, *h_bwd; /* h_bwd: h as the backward reads it */
    float *h, *a, *y, *dh, *da;
    double *dw;
    const moe_mlp_bf16 *b16;
    const float *src; /* bias_grad_cols: db[j] += sum_i (w_i) src[i ld + j] */
    int ld;
    float *db;
} mlp_ctx;

static void act_forward_rows(void *ctx, int lo, int hi) {
    const mlp_ctx *c = ctx;
    float scaled[c->w_on_input ? c->gf : 1]; /* w h: h stays as the backward's dL/dw needs it */
    for (int i = lo; i < hi; i++) {
        float *row = c->h + (size_t)i * c->gf, wi = c->w ? c->w[i] : 1.0f;
        if (c->b_in)
            for (int j = 0; j < c->gf; j++) row[j] += c->b_in[j];
        if (c->w_on_input) {
            for (int j = 0; j < c->gf; j++) scaled[j] = wi * row[j];
            row = scaled, wi = 1.0f;
        }
        moe_act_forward_row(c->act, c->f, row, wi, c->a + (size_t)i * c->f);
        if (c->b16)
            moe_f32_to_bf16_serial(c->a + (size_t)i * c->f, c->b16->a + (size_t)i * c->f,
                                   (size_t)c->f);
    }
}

static void bias_out_rows(void *ctx, int lo, int hi) {
    const mlp_ctx *c = ctx;
    for (int i = lo; i < hi; i++) {
        float wi = c->w ? c->w[i] : 1.0f;
        for (int j = 0; j < c->d; j++) c->y[(size_t)i * c->d + j] += wi * c->b_out[j];
    }
}

static void act_backward_rows(void *ctx, int lo, int hi) {
    const mlp_ctx *c = ctx;
    float scaled[c->w_on_input ? c->gf : 1];
    for (int i = lo; i < hi; i++) {
        const float *h = c->h_bwd + (size_t)i * c->gf;
        float *dh = c->dh + (size_t)i * c->gf, wi = c->w ? c->w[i] : 1.0f;
        double g;
        if (c->w_on_input) { /* dL/d(w h) from act's backward; dL/dw = its dot with h */
            for (int j = 0; j < c->gf; j++) scaled[j] = wi * h[j];
            moe_act_backward_row(c->act, c->f, scaled, 1.0f, c->da + (size_t)i * c->f, dh);
            g = 0; /* lane-wise partial sums, as the activations' own (kernels/act.c) */
#pragma omp simd reduction(+ : g)
            for (int j = 0; j < c->gf; j++) g += (double)dh[j] * h[j], dh[j] *= wi;
        } else {
            g = moe_act_backward_row(c->act, c->f, h, wi, c->da + (size_t)i * c->f, dh);
        }
        const float *dy = c->dy + (size_t)i * c->d;
        if (c->dw) {
            if (c->b_out)
                for (int j = 0; j < c->d; j++) g += (double)c->b_out[j] * dy[j];
            c->dw[i] = g;
        }
        if (c->b16)
            moe_f32_to_bf16_serial(c->dh + (size_t)i * c->gf, c->b16->dh + (size_t)i * c->gf,
                                   (size_t)c->gf);
    }
}

static void bias_grad_cols(void *ctx, int lo, int hi) {
    const mlp_ctx *c = ctx;
    for (int j = lo; j < hi; j++) {
        float s = 0;
        for (int i = 0; i < c->n; i++)
            s += (c->w ? c->w[i] : 1.0f) * c->src[(size_t)i * c->ld + j];
        c->db[j] += s;
    }
}

void moe_mlp_forward_in(moe_activation act, int n, int d, int f, const float *x,
                        const float *w_in, const float *b_in, const float *w, int w_on_input,
                        float *h, float *a, double *t_act, const moe_mlp_bf16 *b16) {
    if (n <= 0) return;
    int gf = moe_act_gated(act) ? 2 * f : f;
    if (b16) moe_f32_to_bf16(x, b16->x, (size_t)n * d);
    gemm_any(b16, 0, 1, n, gf, d, x, b16 ? b16->x : NULL, d, w_in, b16 ? b16->w_in : NULL, d, 0.0f,
             h, gf);
    double t0 = moe_time_now();
    mlp_ctx c = {.act = act, .f = f, .gf = gf, .w_on_input = w_on_input, .b_in = b_in, .w = w,
                 .h = h, .a = a, .b16 = b16};
    moe_for_ranges(n, 4 * (size_t)n * gf, act_forward_rows, &c);
    if (t_act) *t_act += moe_time_now() - t0;
}

void moe_mlp_forward_out(int n, int d, int f, const float *w_out, const float *b_out,
                         const float *w, const float *a, float *y, const moe_mlp_bf16 *b16) {
    if (n <= 0) return;
    gemm_any(b16, 0, 1, n, d, f, a, b16 ? b16->a : NULL, f, w_out, b16 ? b16->w_out : NULL, f, 0.0f,
             y, d);
    mlp_ctx c = {.d = d, .b_out = b_out, .w = w, .y = y};
    if (b_out) moe_for_ranges(n, 2 * (size_t)n * d, bias_out_rows, &c);
}

void moe_mlp_forward(moe_activation act, int n, int d, int f, const float *x, const float *w_in,
                     const float *b_in, const float *w_out, const float *b_out, const float *w,
                     float *h, float *a, float *y, double *t_act, const moe_mlp_bf16 *b16) {
    moe_mlp_forward_in(act, n, d, f, x, w_in, b_in, w, 0, h, a, t_act, b16);
    moe_mlp_forward_out(n, d, f, w_out, b_out, w, a, y, b16);
}

void moe_mlp_backward(moe_activation act, int n, int d, int f, const float *x, const float *w_in,
                      const float *w_out, const float *b_out, const float *w, int w_on_input,
                      const float *h, const float *a, const float *dy, float *dx, float *dw_in,
                      float *db_in, float *dw_out, float *db_out, double *dw, float *dh, float *da,
                      double *t_act, const moe_mlp_bf16 *b16, int part) {
    if (n <= 0) return;
    int gf = moe_act_gated(act) ? 2 * f : f;
    if (part & MOE_MLP_BWD_OUT) {
        if (b16) moe_f32_to_bf16(dy, b16->dy, (size_t)n * d);
        gemm_any(b16, 1, 0, d, f, n, dy, b16 ? b16->dy : NULL, d, a, b16 ? b16->a : NULL, f, 1.0f,
                 dw_out, f);
        mlp_ctx cb = {.n = n, .w = w, .src = dy, .ld = d, .db = db_out};
        if (db_out) moe_for_ranges(d, (size_t)n * d, bias_grad_cols, &cb);
        gemm_any(b16, 0, 0, n, f, d, dy, b16 ? b16->dy : NULL, d, w_out, b16 ? b16->w_out : NULL, f,
                 0.0f, da, f);
        double t0 = moe_time_now();
        mlp_ctx c = {.act = act, .d = d, .f = f, .gf = gf, .w_on_input = w_on_input,
                     .b_out = b_out, .w = w, .dy = dy, .h_bwd = h, .dh = dh, .da = da, .dw = dw,
                     .b16 = b16};
        moe_for_ranges(n, 6 * (size_t)n * gf, act_backward_rows, &c);
        if (t_act) *t_act += moe_time_now() - t0;
    }
    if (part & MOE_MLP_BWD_WIN) {
        gemm_any(b16, 1, 0, gf, d, n, dh, b16 ? b16->dh : NULL, gf, x, b16 ? b16->x : NULL, d, 1.0f,
                 dw_in, d);
        mlp_ctx cb = {.n = n, .src = dh, .ld = gf, .db = db_in};
        if (db_in) moe_for_ranges(gf, (size_t)n * gf, bias_grad_cols, &cb);
    }
    if (part & MOE_MLP_BWD_DX) {
        gemm_any(b16, 0, 0, n, d, gf, dh, b16 ? b16->dh : NULL, gf, w_in, b16 ? b16->w_in : NULL, d,
                 0.0f, dx, d);
    }
}

static size_t gf_of(const moe_layer_config *c) {
    return moe_act_gated(c->act) ? 2 * (size_t)c->ffn : (size_t)c->ffn;
}

/* Experts with rows in this call. */
static int busy_experts(const moe_layer *L) {
    int busy = 0;
    const int32_t *off = L->st.expert_off;
    for (int e = 0; e < L->cfg.n_experts; e++) busy += off[e + 1] > off[e];
    return busy;
}

/* With at least two experts per thread, the experts are spread over the threads and each
 * expert's GEMMs run single-threaded (OpenBLAS runs single-threaded inside an active OpenMP
 * region): measured faster than multi-threaded GEMMs one expert after another at every shape
 * tried on 2 cores, from E = 8 with 1024 rows each (1.3x) to E = 256 with 32 rows (2.1x);
 * bench/RESULTS.md. Still deterministic: each expert is computed whole by one thread, whichever
 * it is. Not when fewer experts than threads have rows (a decoding step with k = 1): each GEMM
 * is then split over the threads, so that none waits. Not for bf16 experts: oneDNN's
 * multi-threaded GEMMs measured faster there (585 against 535 GFLOP/s at T=4096 d=1024 f=2816
 * E=8 k=2). */
static int experts_across_threads(const moe_layer *L) {
    int threads = moe_num_threads();
    if (L->cfg.expert_bf16 || threads < 2 || L->cfg.n_experts < 2 * threads) return 0;
    return busy_experts(L) >= threads;
}

/* Whether each expert part gathers the rows it reads as it starts (the forward's inputs in the
 * first part, the backward's output gradients in its first and inputs in its second) instead of
 * one pass over all rows before the parts: with the experts spread over the threads and at
 * least GATHER_IN_PARTS rows an expert on average, the rows are then in the thread's cache when
 * its GEMM reads them. The fine-grained shape (384 rows an expert, d = 1024) took 3-9 % less
 * time a layer in eight of ten alternations; at 32 rows an expert (E = 256, d = 512) 7-10 %
 * more (bench/RESULTS.md, session 25). The same copies either way, so the same results. */
#define GATHER_IN_PARTS 256
static int gather_in_parts(const moe_layer *L) {
    return experts_across_threads(L) && L->st.n_rows >= GATHER_IN_PARTS * busy_experts(L);
}

/* Rows [r0, r1) of dst: the rows of src their slots' tokens take (zero for padding rows). */
static void gather_range(const moe_fwd_state *st, float *dst, const float *src, int r0, int r1,
                         int d) {
    for (int r = r0; r < r1; r++) {
        int s = st->row_slot[r];
        float *row = dst + (size_t)r * d;
        if (s < 0) memset(row, 0, sizeof(float) * (size_t)d);
        else memcpy(row, src + (size_t)st->slot_token[s] * d, sizeof(float) * (size_t)d);
    }
}

typedef struct {
    const moe_fwd_state *st;
    float *dst;
    const float *src;
    int d;
} rows_ctx;

static void gather_ranges(void *ctx, int r0, int r1) {
    const rows_ctx *a = ctx;
    gather_range(a->st, a->dst, a->src, r0, r1, a->d);
}

/* Rows over the threads (moe_for_ranges: a decoding step's few on the calling thread) */
void moe_gather_rows(const moe_fwd_state *st, float *dst, const float *src, int R, int d) {
    rows_ctx a = {st, dst, src, d};
    moe_for_ranges(R, 2 * (size_t)R * d, gather_ranges, &a);
}

/* bf16 operands of expert le over rows from o: this call's converted weights, row scratch. */
static const moe_mlp_bf16 *expert_bf16(const moe_layer *L, const moe_expert_rows *r, int le,
                                       int o, moe_mlp_bf16 *b) {
    const moe_layer_config *c = &L->cfg;
    if (!c->expert_bf16) return NULL;
    size_t d = (size_t)c->d, f = (size_t)c->ffn, gf = gf_of(c);
    *b = (moe_mlp_bf16){L->st.w_in16 + (size_t)le * gf * d, L->st.w_out16 + (size_t)le * d * f,
                        r->x16 + (size_t)o * d, r->a16 + (size_t)o * f, r->dy16 + (size_t)o * d,
                        r->dh16 + (size_t)o * gf};
    return b;
}

void moe_expert_rows_forward_part(moe_layer *L, const moe_expert_rows *r, int le, int o, int n,
                                  int part, double *t_act) {
    const moe_layer_config *c = &L->cfg;
    size_t d = (size_t)c->d, f = (size_t)c->ffn, gf = gf_of(c);
    moe_mlp_bf16 b16;
    const moe_mlp_bf16 *b = expert_bf16(L, r, le, o, &b16);
    if (part & MOE_MLP_IN)
        moe_mlp_forward_in(c->act, n, (int)d, (int)f, r->x + o * d, L->p.w_in + le * gf * d,
                           L->p.b_in ? L->p.b_in + le * gf : NULL, r->w + o, c->probs_on_input,
                           r->h + o * gf, r->a + o * f, t_act, b);
    if (part & MOE_MLP_OUT) /* (no b_out with the weights on the inputs) */
        moe_mlp_forward_out(n, (int)d, (int)f, L->p.w_out + le * d * f,
                            L->p.b_out ? L->p.b_out + le * d : NULL, r->w + o, r->a + o * f,
                            r->y + o * d, b);
}

void moe_expert_rows_forward(moe_layer *L, const moe_expert_rows *r, int le, int o, int n,
                             double *t_act) {
    moe_expert_rows_forward_part(L, r, le, o, n, MOE_MLP_IN | MOE_MLP_OUT, t_act);
}

void moe_expert_rows_backward(moe_layer *L, const moe_expert_rows *r, int le, int o, int n,
                              int part, double *t_act) {
    const moe_layer_config *c = &L->cfg;
    size_t d = (size_t)c->d, f = (size_t)c->ffn, gf = gf_of(c);
    moe_mlp_bf16 b16;
    moe_mlp_backward(c->act, n, (int)d, (int)f, r->x + o * d, L->p.w_in + le * gf * d,
                     L->p.w_out + le * d * f, L->p.b_out ? L->p.b_out + le * d : NULL, r->w + o,
                     c->probs_on_input, r->h + o * gf, r->a + o * f, r->y + o * d, r->x + o * d,
                     L->g.w_in + le * gf * d, L->g.b_in ? L->g.b_in + le * gf : NULL,
                     L->g.w_out + le * d * f, L->g.b_out ? L->g.b_out + le * d : NULL,
                     r->dw + o, r->dh + o * gf, r->da + o * f, t_act,
                     expert_bf16(L, r, le, o, &b16), part);
}

moe_expert_rows moe_own_rows(moe_fwd_state *st) {
    return (moe_expert_rows){st->xp, st->row_w, st->h, st->a, st->y, st->dh, st->da, st->dw_row,
                             st->x16, st->a16, st->dy16, st->dh16};
}

static void combine_tokens(void *ctx, int t0, int t1) {
    const rows_ctx *a = ctx;
    const moe_fwd_state *st = a->st;
    const float *y = a->src;
    int d = a->d;
    for (int t = t0; t < t1; t++) {
        float *rt = st->r + (size_t)t * d;
        memset(rt, 0, sizeof(float) * (size_t)d);
        for (int i = st->tok_off[t]; i < st->tok_off[t + 1]; i++) {
            int row = st->slot_row[st->tok_slot[i]];
            if (row < 0) continue;
            const float *yr = y + (size_t)row * d;
            for (int j = 0; j < d; j++) rt[j] += yr[j];
        }
    }
}

/* Combine in slot order: bitwise reproducible, no atomics. Tokens over the threads (a decoding
 * step's one token without a parallel region). */
void moe_combine_rows(moe_fwd_state *st, const float *y, int d) {
    rows_ctx a = {st, NULL, y, d};
    moe_for_ranges(st->T, (size_t)(st->T + st->n_slots) * d, combine_tokens, &a);
}

/* Also maps the row weight gradients dw_row to the slots (st->dw). */
void moe_scatter_rows(const moe_fwd_state *st, const float *g, float *dx, int d) {
    for (int s = 0; s < st->n_slots; s++)
        st->dw[s] = st->slot_row[s] >= 0 ? st->dw_row[st->slot_row[s]] : 0;
#pragma omp parallel for schedule(static)
    for (int t = 0; t < st->T; t++) {
        float *dt = dx + (size_t)t * d;
        for (int i = st->tok_off[t]; i < st->tok_off[t + 1]; i++) {
            int row = st->slot_row[st->tok_slot[i]];
            if (row < 0) continue;
            const float *gr = g + (size_t)row * d;
            for (int j = 0; j < d; j++) dt[j] += gr[j];
        }
    }
}

/* st->expert_order: the experts by rows, most first, ties by index. Taken in this order by
 * the threads (dynamic), the largest blocks start first and the small ones fill in at the end
 * (longest processing time first); which thread computes an expert does not change its
 * results. Insertion sort from index order (ties stay in it): E is at most a few hundred, a
 * few tens of thousands of comparisons against milliseconds of GEMMs. */
static void order_by_rows(moe_fwd_state *st, int E) {
    const int32_t *off = st->expert_off;
    int32_t *o = st->expert_order;
    for (int e = 0; e < E; e++) {
        int rows = off[e + 1] - off[e], i = e;
        for (; i > 0 && off[o[i - 1] + 1] - off[o[i - 1]] < rows; i--) o[i] = o[i - 1];
        o[i] = e;
    }
}

/* Waits until another thread has stored at least `value` in *flag (a release store); yields
 * the core now and then, in case that thread is waiting for it (more threads than cores). */
static void wait_for(const int32_t *flag, int32_t value) {
    for (unsigned spins = 1; __atomic_load_n(flag, __ATOMIC_ACQUIRE) < value; spins++) {
        if (spins % 256 == 0) sched_yield();
        else moe_spin_pause();
    }
}

/* Part p of expert e (rows [o, o + n)). */
typedef void (*expert_part_fn)(moe_layer *L, const moe_expert_rows *r, int e, int o, int n, int p,
                               double *t_act);

/* Each expert's parts 0 .. np - 1, in that order, the experts spread over the threads (when
 * experts_across_threads) as items: all experts' part 0 (st->expert_order, largest first), then
 * all part 1, and so on. The items are handed out in order by one counter, so a part waits only
 * for the expert's previous part while another thread computes it, and the threads' last items
 * are of the smallest experts: neither waits long at the end. Which thread computes a part does
 * not change its results. t_act: as in moe_mlp_forward, with the experts on one thread. */
static void expert_parts(moe_layer *L, const moe_expert_rows *rows, int np, expert_part_fn part,
                         int *next, double *t_act) {
    moe_fwd_state *st = &L->st;
    int E = L->cfg.n_experts;
    for (int i; (i = __atomic_fetch_add(next, 1, __ATOMIC_RELAXED)) < np * E;) {
        int p = i / E, e = st->expert_order[i % E], o = st->expert_off[e];
        wait_for(&st->expert_ready[e], p);
        part(L, rows, e, o, st->expert_off[e + 1] - o, p, t_act);
        __atomic_store_n(&st->expert_ready[e], p + 1, __ATOMIC_RELEASE);
    }
}

static void run_expert_parts(moe_layer *L, int np, expert_part_fn part, double *t_act) {
    moe_fwd_state *st = &L->st;
    int next = 0;
    moe_expert_rows rows = moe_own_rows(st);
    for (int e = 0; e < L->cfg.n_experts; e++) st->expert_ready[e] = 0;
    if (!experts_across_threads(L)) { /* outside any parallel region: the GEMMs' own regions
                                         then reuse the threads (nested in an inactive region
                                         they started new ones: 9 against 2 ms a decoding step
                                         of bf16 experts) */
        expert_parts(L, &rows, np, part, &next, t_act);
        return;
    }
#pragma omp parallel
    expert_parts(L, &rows, np, part, &next, NULL);
}

/* The forward in two parts: x W_in^T and the activation (the larger), then a W_out^T. */
static void forward_part(moe_layer *L, const moe_expert_rows *r, int e, int o, int n, int p,
                         double *t_act) {
    if (p == 0 && L->st.part_x) gather_range(&L->st, r->x, L->st.part_x, o, o + n, L->cfg.d);
    moe_expert_rows_forward_part(L, r, e, o, n, p ? MOE_MLP_OUT : MOE_MLP_IN, t_act);
}

/* The backward in its three parts (moe_mlp_backward), of about equal cost with a gated
 * activation. */
static void backward_part(moe_layer *L, const moe_expert_rows *r, int e, int o, int n, int p,
                          double *t_act) {
    const moe_fwd_state *st = &L->st;
    if (p == 0 && st->part_dy) gather_range(st, r->y, st->part_dy, o, o + n, L->cfg.d);
    if (p == 1 && st->part_x) gather_range(st, r->x, st->part_x, o, o + n, L->cfg.d);
    moe_expert_rows_backward(L, r, e, o, n, MOE_MLP_BWD_OUT << p, t_act);
}

/* bf16 copies of the weights of the experts that have rows in this call (fp32 master weights),
 * unless kept from an earlier call (reuse_bf16): chunks of each such expert's W_in and W_out
 * over the threads. A decoding step's token goes to k experts; converting all of them read and
 * wrote E / k times what it uses. */
#define BF16_CHUNK 16384
static void bf16_copies(moe_layer *L) {
    const moe_layer_config *c = &L->cfg;
    moe_fwd_state *st = &L->st;
    size_t n_in = gf_of(c) * (size_t)c->d, n_out = (size_t)c->d * c->ffn;
    long p_in = (long)((n_in + BF16_CHUNK - 1) / BF16_CHUNK);
    long per = p_in + (long)((n_out + BF16_CHUNK - 1) / BF16_CHUNK); /* chunks per expert */
    int n_todo = 0;
    for (int e = 0; e < c->n_experts; e++)
        if (st->expert_off[e + 1] > st->expert_off[e] && !L->bf16_kept[e])
            L->bf16_todo[n_todo++] = e;
    if (!n_todo) return; /* decoding: every copy kept (not even a parallel region) */
#pragma omp parallel for schedule(dynamic, 1)
    for (long i = 0; i < per * n_todo; i++) {
        int e = L->bf16_todo[i / per];
        long q = i % per; /* W_in's chunks, then W_out's */
        int out = q >= p_in;
        size_t n = out ? n_out : n_in, lo = (size_t)(out ? q - p_in : q) * BF16_CHUNK;
        const float *w = out ? L->p.w_out + e * n_out : L->p.w_in + e * n_in;
        uint16_t *w16 = out ? st->w_out16 + e * n_out : st->w_in16 + e * n_in;
        moe_f32_to_bf16_serial(w + lo, w16 + lo, n - lo < BF16_CHUNK ? n - lo : BF16_CHUNK);
    }
    for (int q = 0; q < n_todo; q++) L->bf16_kept[L->bf16_todo[q]] = (uint8_t)st->reuse_bf16;
}

void moe_experts_forward(moe_layer *L) {
    const moe_layer_config *c = &L->cfg;
    if (c->ep_size > 1) {
        moe_ep_forward(L);
        return;
    }
    moe_fwd_state *st = &L->st;
    int d = c->d, R = st->n_rows;
    const float *x = st->xin_orig;
    double t0 = moe_time_now(), t_act = 0;
    st->part_x = gather_in_parts(L) ? x : NULL; /* else all rows now */
    if (!st->part_x) moe_gather_rows(st, st->xp, x, R, d);
    if (c->expert_bf16) bf16_copies(L);
    double t1 = moe_time_now();
    order_by_rows(st, c->n_experts);
    run_expert_parts(L, 2, forward_part, &t_act);
    st->part_x = NULL;
    double t2 = moe_time_now();
    moe_combine_rows(st, st->y, d);
    L->stage_s[MOE_STAGE_PERMUTE] += t1 - t0;
    L->stage_s[MOE_STAGE_EXPERT_GEMM] += t2 - t1 - t_act;
    L->stage_s[MOE_STAGE_ACTIVATION] += t_act;
    L->stage_s[MOE_STAGE_COMBINE] += moe_time_now() - t2;
}

void moe_experts_backward(moe_layer *L, float *dx, const float *x) {
    const moe_layer_config *c = &L->cfg;
    if (c->ep_size > 1) {
        moe_ep_backward(L, dx, x);
        return;
    }
    moe_fwd_state *st = &L->st;
    int d = c->d, R = st->n_rows;
    double t0 = moe_time_now(), t_act = 0;
    /* the rows' inputs as the forward gathered them (xp is call scratch), and dL/dy of each
     * row: the routed-output gradient of its token; here or in the parts */
    int in_parts = gather_in_parts(L);
    st->part_x = in_parts ? x : NULL, st->part_dy = in_parts ? st->dgrad : NULL;
    if (!in_parts) {
        moe_gather_rows(st, st->xp, x, R, d);
        moe_gather_rows(st, st->y, st->dgrad, R, d);
    }
    double t1 = moe_time_now();
    run_expert_parts(L, 3, backward_part, &t_act); /* in the forward's expert order */
    st->part_x = st->part_dy = NULL;
    double t2 = moe_time_now();
    moe_scatter_rows(st, st->xp, dx, d); /* xp now holds dL/dxp */
    L->stage_s[MOE_STAGE_BWD_PERMUTE] += (t1 - t0) + (moe_time_now() - t2);
    L->stage_s[MOE_STAGE_BWD_EXPERT_GEMM] += t2 - t1 - t_act;
    L->stage_s[MOE_STAGE_BWD_ACTIVATION] += t_act;
}
