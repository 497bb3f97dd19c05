/* Transformer kernels: RMSNorm, rotary position embedding, causal grouped-query attention,
 * softmax cross-entropy. Forward and backward; backward adds into gradient buffers. */
#include "kernels/kernels.h"

#include "kernels/avx512.h"

#include <math.h>
#include <string.h>

/* ---------------------------------------------------------------- RMSNorm */

typedef struct {
    float *y, *rstd;
    const float *x, *w;
    int d;
    float eps;
} rms_fwd;

static void rms_fwd_rows(void *ctx, int t0, int t1) {
    const rms_fwd *a = ctx;
    int d = a->d;
    for (int t = t0; t < t1; t++) {
        const float *xt = a->x + (size_t)t * d, *w = a->w;
        double ss = 0; /* lane-wise partial sums: a fixed order for a given build (one chain
                          of dependent adds per row was most of the norm's time) */
#pragma omp simd reduction(+ : ss)
        for (int i = 0; i < d; i++) ss += (double)xt[i] * xt[i];
        float r = (float)(1.0 / sqrt(ss / d + a->eps));
        a->rstd[t] = r;
        float *yt = a->y + (size_t)t * d;
        for (int i = 0; i < d; i++) yt[i] = xt[i] * r * w[i];
    }
}

/* Rows over the threads (moe_for_ranges: a decoding step's single row without a parallel
 * region, whose start costs about a microsecond, more than the row) */
void moe_rmsnorm_forward(float *y, float *rstd, const float *x, const float *w, int T, int d,
                         float eps) {
    rms_fwd a = {y, rstd, x, w, d, eps};
    moe_for_ranges(T, 2 * (size_t)T * d, rms_fwd_rows, &a);
}

/* dx [T, d] = res + the gradient of the input x given dy, the output's (res: the residual
 * stream's gradient, or dx itself to add to it, or NULL); dw [d] += the weight's gradient. */
void moe_rmsnorm_backward(float *dx, const float *res, float *dw, const float *dy, const float *x,
                          const float *w, const float *rstd, int T, int d) {
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++) {
        const float *xt = x + (size_t)t * d, *gt = dy + (size_t)t * d;
        double dot = 0; /* sum_i dy_i w_i x_i, lane-wise as in the forward */
#pragma omp simd reduction(+ : dot)
        for (int i = 0; i < d; i++) dot += (double)gt[i] * w[i] * xt[i];
        float r = rstd[t];
        float c = (float)(dot * r * r * r / d);
        float *dxt = dx + (size_t)t * d;
        if (res) {
            const float *rt = res + (size_t)t * d;
            for (int i = 0; i < d; i++) dxt[i] = rt[i] + (gt[i] * w[i] * r - c * xt[i]);
        } else {
            for (int i = 0; i < d; i++) dxt[i] = gt[i] * w[i] * r - c * xt[i];
        }
    }
    /* dw in a fixed order over tokens: column sums, parallel over blocks of 16 columns (a cache
     * line of each row; column by column read each line 16 times) */
#pragma omp parallel for schedule(static)
    for (int i0 = 0; i0 < d; i0 += 16) {
        int w = d - i0 < 16 ? d - i0 : 16;
        double s[16] = {0};
        for (int t = 0; t < T; t++) {
            const float *gt = dy + (size_t)t * d + i0, *xt = x + (size_t)t * d + i0;
            double r = rstd[t];
            for (int i = 0; i < w; i++) s[i] += (double)gt[i] * xt[i] * r;
        }
        for (int i = 0; i < w; i++) dw[i0 + i] += (float)s[i];
    }
}

/* ------------------------------------------------------------------- RoPE */

/* The frequency of rotated pair i of rd: theta^(-2i/rd), with YaRN blended between that
 * (extrapolation, high frequencies) and it / factor (interpolation, low frequencies) by a
 * linear ramp over the pairs that turn beta_fast .. beta_slow times in orig_max_pos. */
static double rope_freq(const moe_rope *r, int i, int rd) {
    double base = pow((double)r->theta, -2.0 * i / rd);
    if (!(r->factor > 1)) return base;
    double two_pi = 2 * 3.14159265358979323846, lt = 2 * log((double)r->theta);
    double low = floor(rd * log(r->orig_max_pos / (r->beta_fast * two_pi)) / lt);
    double high = ceil(rd * log(r->orig_max_pos / (r->beta_slow * two_pi)) / lt);
    low = low > 0 ? low : 0;
    high = high < rd - 1 ? high : rd - 1;
    if (high == low) high += 0.001;
    double ramp = (i - low) / (high - low);
    ramp = ramp < 0 ? 0 : ramp > 1 ? 1 : ramp;
    double keep = 1 - ramp; /* share of the original frequency */
    return base / r->factor * (1 - keep) + base * keep;
}

/* cos and sin (times the attention factor) of every pair's angle at position p: c[0..half),
 * s[0..half) from the pair frequencies freq. */
static void rope_angles(float *c, float *s, int p, int half, const double *freq, double scale) {
    for (int i = 0; i < half; i++) {
        double ang = p * freq[i];
        c[i] = (float)(scale * cos(ang));
        s[i] = (float)(scale * sin(ang));
    }
}

static double rope_scale(const moe_rope *r) { return r->attn_factor > 0 ? r->attn_factor : 1; }

void moe_rope_table(float *cs, int n_pos, int rd, const moe_rope *r) {
    int half = rd / 2;
    double freq[half > 0 ? half : 1];
    for (int i = 0; i < half; i++) freq[i] = rope_freq(r, i, rd);
#pragma omp parallel for schedule(static)
    for (int p = 0; p < n_pos; p++)
        rope_angles(cs + (size_t)p * rd, cs + (size_t)p * rd + half, p, half, freq, rope_scale(r));
}

/* Rotates pairs (i, i + rd/2), or (2i, 2i + 1) with interleave, of rd values of every head
 * by pos * freq(i) (rope_freq), the result scaled by attn_factor. x: the first rotated value
 * of token 0, head 0; heads head_stride apart, tokens n_heads * head_stride. Positions below
 * n_cs take their cos and sin from cs (moe_rope_table; a sine or cosine per pair and token was
 * 5 % of a small model's training step), the others compute them. dir = +1 forward, -1
 * backward (the transpose of a rotation is the rotation by the opposite angle). */
typedef struct {
    float *x;
    int n_heads, head_stride, rd, n_cs, dir;
    const int *pos;
    const moe_rope *r;
    const float *cs;
    const double *freq;
} rope_args;

static void rope_rows(void *ctx, int t0, int t1) {
    const rope_args *a = ctx;
    int half = a->rd / 2, hp = half > 0 ? half : 1;
    for (int t = t0; t < t1; t++) {
        float own[2 * hp];
        const float *c = own, *s = own + half;
        int p = a->pos[t];
        if (p >= 0 && p < a->n_cs) c = a->cs + (size_t)p * a->rd, s = c + half;
        else rope_angles(own, own + half, p, half, a->freq, rope_scale(a->r));
        for (int h = 0; h < a->n_heads; h++) {
            float *v = a->x + ((size_t)t * a->n_heads + h) * a->head_stride;
            if (a->r->interleave)
                for (int i = 0; i < half; i++) {
                    float x0 = v[2 * i], x1 = v[2 * i + 1], si = a->dir * s[i];
                    v[2 * i] = x0 * c[i] - x1 * si;
                    v[2 * i + 1] = x1 * c[i] + x0 * si;
                }
            else
                for (int i = 0; i < half; i++) {
                    float x0 = v[i], x1 = v[i + half], si = a->dir * s[i];
                    v[i] = x0 * c[i] - x1 * si;
                    v[i + half] = x1 * c[i] + x0 * si;
                }
        }
    }
}

void moe_rope_rotate(float *x, int T, int n_heads, int head_stride, int rd, const int *pos,
                     const moe_rope *r, const float *cs, int n_cs, int dir) {
    int half = rd / 2, hp = half > 0 ? half : 1;
    double freq[hp];
    for (int i = 0; i < half; i++) freq[i] = rope_freq(r, i, rd); /* once, not per token */
    rope_args a = {x, n_heads, head_stride, rd, n_cs, dir, pos, r, cs, freq};
    moe_for_ranges(T, 2 * (size_t)T * n_heads * rd, rope_rows, &a); /* as the norm's */
}

void moe_rope_apply(float *x, int T, int n_heads, int hd, const int *pos, float theta, int dir) {
    moe_rope r = {.theta = theta, .attn_factor = 1};
    moe_rope_rotate(x, T, n_heads, hd, hd, pos, &r, NULL, 0, dir);
}

/* ------------------------------------------------------------- attention */

#define ATT_BLOCK 64
#define ATT_TILE (ATT_BLOCK * ATT_BLOCK)
/* The backward's dP tiles of a row block that its second pass takes from the first instead of
 * computing them again (the first 8: keys up to 512 in all; one GEMM in five of a tile) */
#define ATT_KEEP 8
static _Thread_local float dp_keep[ATT_KEEP * ATT_TILE] __attribute__((aligned(64)));

/* The largest of x[0..n) (-inf for n = 0; NaNs are passed over), in 16 lanes so that both gcc
 * and clang vectorise it (a max reduction under `omp simd` stays scalar with clang). */
static float max_floats(const float *x, int n) {
    float m[16];
    for (int l = 0; l < 16; l++) m[l] = -INFINITY;
    int j = 0;
    for (; j + 16 <= n; j += 16)
#pragma omp simd
        for (int l = 0; l < 16; l++) m[l] = x[j + l] > m[l] ? x[j + l] : m[l];
    for (int l = 0; j + l < n; l++) m[l] = x[j + l] > m[l] ? x[j + l] : m[l]; /* in parallel */
    float r = m[0];
    for (int l = 1; l < 16; l++) r = m[l] > r ? m[l] : r;
    return r;
}

/* sum_j a[j] b[j], in 16 lanes added at the end (a fixed order, vectorised by both compilers;
 * one chain of dependent adds per row was most of the attention backward's own time). */
static float dot_floats(const float *a, const float *b, int n) {
    float s[16] = {0};
    int j = 0;
    for (; j + 16 <= n; j += 16)
#pragma omp simd
        for (int l = 0; l < 16; l++) s[l] += a[j + l] * b[j + l];
    for (; j < n; j++) s[0] += a[j] * b[j];
    float r = 0;
    for (int l = 0; l < 16; l++) r += s[l];
    return r;
}

#ifdef MOE_X86
/* softmax_rows on 16 lanes. The rows are short (16-128 keys at sequence length 128), so a
 * row's own steps (its maximum, its sum, the lanes past the diagonal) cost as much as its e^x:
 * here each is a few vector operations, the keys past the diagonal masked off (never read:
 * the scores' tiles leave them out). */
static AVX512_TARGET void softmax_rows16(float *P, int S, int m, int i0, float sc) {
    const __m512 vsc = _mm512_set1_ps(sc), zero = _mm512_setzero_ps(),
                 low = _mm512_set1_ps(-INFINITY);
    for (int r = 0; r < m; r++) {
        float *x = P + (size_t)r * S;
        int cnt = i0 + r + 1, nv = (cnt + 15) / 16, rest = S - 16 * (nv - 1);
        /* the last vector's lanes up to the diagonal, and those in the row */
        __mmask16 last = (__mmask16)(0xFFFFu >> (16 * nv - cnt));
        __mmask16 in_row = moe_lanes16(rest);
        __m512 mx = low, sum = zero;
        for (int v = 0; v < nv; v++)
            mx = _mm512_max_ps(_mm512_mask_loadu_ps(low, v < nv - 1 ? 0xFFFF : last, x + 16 * v),
                               mx);
        __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        for (int v = 0; v < nv; v++) {
            __mmask16 k = v < nv - 1 ? 0xFFFF : last;
            __m512 s = _mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + 16 * v), m);
            __m512 e = _mm512_maskz_mov_ps(k, moe_exp16(_mm512_mul_ps(s, vsc)));
            sum = _mm512_add_ps(sum, e);
            _mm512_mask_storeu_ps(x + 16 * v, v < nv - 1 ? 0xFFFF : in_row, e);
        }
        __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
        for (int v = 0; v < nv; v++) {
            __mmask16 k = v < nv - 1 ? 0xFFFF : in_row;
            __m512 e = _mm512_maskz_loadu_ps(k, x + 16 * v);
            _mm512_mask_storeu_ps(x + 16 * v, k, _mm512_mul_ps(e, inv));
        }
        for (int j = 16 * nv; j < S; j += 16)
            _mm512_mask_storeu_ps(x + j, moe_lanes16(S - j), zero);
    }
}
#endif

/* Rows i0..i0 + m - 1 of a sequence's scores P [S, S] (row r at P + r S, its keys 0..i0 + r
 * filled in) become the softmax over those keys of the scores times sc, then zeros to S. */
static void softmax_rows(float *P, int S, int m, int i0, float sc) {
#ifdef MOE_X86
    if (moe_avx512()) {
        softmax_rows16(P, S, m, i0, sc);
        return;
    }
#endif
    for (int r = 0; r < m; r++) {
        float *x = P + (size_t)r * S;
        int i = i0 + r;
        /* keys up to i, in whole vectors where the row has them (a loop to i + 1 left its
         * last 1-15 columns to scalar e^x, a chain of dependent operations each, and gcc
         * splits a loop on j <= i into two): the later keys' scores in them -inf, e^x's
         * clamp gives 1.6e-38 there, which the sum (at least 1, from the maximum) does not
         * notice, then 0 */
        int len = (i + 16) / 16 * 16 < S ? (i + 16) / 16 * 16 : S;
        for (int j = i + 1; j < len; j++) x[j] = -INFINITY;
        float mx = max_floats(x, i + 1), sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int j = 0; j < len; j++) {
            x[j] = moe_exp_vec((x[j] - mx) * sc);
            sum += x[j];
        }
        for (int j = i + 1; j < len; j++) x[j] = 0;
        float inv = 1.0f / sum;
        for (int j = 0; j < len; j++) x[j] *= inv;
        for (int j = len; j < S; j++) x[j] = 0;
    }
}

/* C = op(A) op(B) (+ C when beta1) for one attention tile on the calling thread: our in-cache
 * AVX-512 tiles where the CPU has them, skipping what tri leaves out, else the BLAS. */
static void tile_gemm(int ta, int tb, int m, int n, int k, const float *A, int lda,
                      const float *B, int ldb, int beta1, float *C, int ldc, moe_tri tri,
                      int off) {
    if (!moe_gemm_cached(m, n, k, A, ta ? 1 : lda, ta ? lda : 1, B, ldb, tb, beta1, C, ldc, tri,
                         off))
        moe_gemm(ta, tb, m, n, k, 1.0f, A, lda, B, ldb, beta1 ? 1.0f : 0.0f, C, ldc);
}

/* The row stride of a sequence's transposed keys or values: S rounded up to 16, plus 16
 * (rows a multiple of 4 KB apart fall into a few L1 sets). */
static int kt_ld(int S) { return (S + 15) / 16 * 16 + 16; }

size_t moe_attention_scratch_floats(const moe_attn_dims *a) {
    int w = a->dk > a->dv ? a->dk : a->dv;
    return (size_t)a->B * a->KV * w * kt_ld(a->S);
}

/* x's heads (w wide, rows xs apart) of every sequence and kv head transposed into t: item
 * (b, g) at t + (b KV + g) w ld, its row c the S positions of dimension c. 0 (nothing done)
 * without AVX-512 or room. */
static int transpose_heads(float *t, size_t cap, const float *x, int xs, int w,
                           const moe_attn_dims *a) {
    int B = a->B, S = a->S, KV = a->KV, ld = kt_ld(S);
    if (!t || cap < (size_t)B * KV * w * ld || !moe_avx512()) return 0;
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++)
        for (int g = 0; g < KV; g++)
            moe_transpose_floats(x + (size_t)b * S * xs + g * w, xs, S, w,
                                 t + ((size_t)b * KV + g) * w * ld, ld);
    return 1;
}

/* Causal attention over B sequences of S tokens. q [B*S, H*dk], k [B*S, KV*dk],
 * v [B*S, KV*dv] (query head h reads kv head h / (H/KV)); scores q.k * scale; probs
 * [B, H, S, S] saved for backward (zero above the diagonal); out [B*S, H*dv]. By blocks of
 * ATT_BLOCK queries, each block's scores and outputs as one GEMM over the keys it sees (one
 * dot product per pair was most of the attention's time at head width 32), in tile_gemm's
 * AVX-512 tiles where they run: those skip the scores past the diagonal and the zero
 * probabilities there (a quarter of the work at sequence length 128), and the softmax is
 * scaled there too (the GEMMs have no alpha). */
void moe_attention_forward(float *out, float *probs, const float *q, const float *k,
                           const float *v, const moe_attn_dims *a, float *scratch,
                           size_t scratch_floats) {
    int B = a->B, S = a->S, H = a->H, dk = a->dk, dv = a->dv, rep = H / a->KV;
    int qs = H * dk, ks = a->KV * dk, vs = a->KV * dv, os = H * dv, ld = kt_ld(S);
    int kt = transpose_heads(scratch, scratch_floats, k, ks, dk, a);
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            int g = h / rep;
            float *P = probs + ((size_t)b * H + h) * S * S;
            const float *qb = q + (size_t)b * S * qs + h * dk;
            const float *kb = k + (size_t)b * S * ks + g * dk;
            const float *vb = v + (size_t)b * S * vs + g * dv;
            const float *ktb = kt ? scratch + ((size_t)b * a->KV + g) * dk * ld : NULL; /* K^T */
            float *ob = out + (size_t)b * S * os + h * dv;
            for (int i0 = 0; i0 < S; i0 += ATT_BLOCK) {
                int m = S - i0 < ATT_BLOCK ? S - i0 : ATT_BLOCK, n = i0 + m; /* keys < n */
                float *Pb = P + (size_t)i0 * S;
                tile_gemm(0, !kt, m, n, dk, qb + (size_t)i0 * qs, qs, kt ? ktb : kb, kt ? ld : ks,
                          0, Pb, S, MOE_TRI_COLS, i0 + 1);
                softmax_rows(Pb, S, m, i0, a->scale);
                tile_gemm(0, 0, m, dv, n, Pb, S, vb, vs, 0, ob + (size_t)i0 * os, os,
                          MOE_TRI_K_BELOW, i0 + 1);
            }
        }
}

/* Backward: dq += ..., dk += ..., dv += ... (dk, dv accumulate over the query heads of a
 * group). With dP = dO V^T and D_i = sum_j P_ij dP_ij, the scores' gradient is
 * dS = P * (dP - D) * scale, and dV += P^T dO, dQ += dS K, dK += dS^T Q, all by tiles of
 * ATT_BLOCK queries x ATT_BLOCK keys on or below the diagonal (P is zero above it, so dS is
 * too). D takes a first pass over a row of tiles, so that it sums the very dP the second pass
 * subtracts it from (D = do . o would save that GEMM but leaves rounding where the gradient is
 * exactly zero, as for a sequence's first query); the second pass reuses the first ATT_KEEP
 * tiles' dP. A diagonal tile's products skip what lies past the diagonal (tile_gemm); its dP
 * there is not computed and its dS is set to 0. Parallel over (sequence, kv head) so that no
 * two threads write the same rows. */
void moe_attention_backward(float *dq, float *dk, float *dv, const float *dout,
                            const float *probs, const float *q, const float *k, const float *v,
                            const moe_attn_dims *a, float *scratch, size_t scratch_floats) {
    int B = a->B, S = a->S, H = a->H, KV = a->KV, Dk = a->dk, Dv = a->dv, rep = H / KV;
    int qs = H * Dk, ks = KV * Dk, vs = KV * Dv, os = H * Dv, ld = kt_ld(S);
    int vt = transpose_heads(scratch, scratch_floats, v, vs, Dv, a);
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++)
        for (int g = 0; g < KV; g++) {
            float ds[ATT_TILE], D[ATT_BLOCK];
            const float *kb = k + (size_t)b * S * ks + g * Dk;
            const float *vb = v + (size_t)b * S * vs + g * Dv;
            const float *vtb = vt ? scratch + ((size_t)b * KV + g) * Dv * ld : NULL; /* V^T */
            float *dkb = dk + (size_t)b * S * ks + g * Dk, *dvb = dv + (size_t)b * S * vs + g * Dv;
            for (int h = g * rep; h < (g + 1) * rep; h++) {
                const float *P = probs + ((size_t)b * H + h) * S * S;
                const float *qb = q + (size_t)b * S * qs + h * Dk;
                const float *dob = dout + (size_t)b * S * os + h * Dv;
                float *dqb = dq + (size_t)b * S * qs + h * Dk;
                for (int i0 = 0; i0 < S; i0 += ATT_BLOCK) {
                    int m = S - i0 < ATT_BLOCK ? S - i0 : ATT_BLOCK;
                    const float *doi = dob + (size_t)i0 * os, *qi = qb + (size_t)i0 * qs;
                    for (int r = 0; r < m; r++) D[r] = 0;
                    for (int pass = 0; pass < 2; pass++)
                        for (int j0 = 0, t = 0; j0 <= i0; j0 += ATT_BLOCK, t++) {
                            int n = j0 < i0 ? ATT_BLOCK : m, diag = i0 - j0;
                            const float *Pt = P + (size_t)i0 * S + j0;
                            /* the first ATT_KEEP tiles' dP from the first pass, the same bits
                             * as computing them again */
                            float *tile = t < ATT_KEEP ? dp_keep + (size_t)t * ATT_TILE : ds;
                            if (pass == 0 || t >= ATT_KEEP) /* from V^T's rows with vt */
                                tile_gemm(0, !vt, m, n, Dv, doi, os,
                                          vt ? vtb + j0 : vb + (size_t)j0 * vs, vt ? ld : vs, 0,
                                          tile, ATT_BLOCK, MOE_TRI_COLS, diag + 1);
                            for (int r = 0; r < m; r++) {
                                const float *pr = Pt + (size_t)r * S;
                                float *x = tile + r * ATT_BLOCK;
                                /* the columns dP has: through the diagonal, whole vectors */
                                int len = (r + diag + 16) / 16 * 16;
                                len = len < n ? len : n;
                                if (pass == 0) {
                                    D[r] += dot_floats(pr, x, len);
                                    continue;
                                }
                                for (int c = 0; c < len; c++)
                                    x[c] = pr[c] * (x[c] - D[r]) * a->scale;
                                for (int c = len; c < n; c++) x[c] = 0;
                            }
                            if (pass == 0) continue;
                            tile_gemm(1, 0, n, Dv, m, Pt, S, doi, os, 1, dvb + (size_t)j0 * vs,
                                      vs, MOE_TRI_K_FROM, -diag);
                            tile_gemm(0, 0, m, Dk, n, tile, ATT_BLOCK, kb + (size_t)j0 * ks, ks,
                                      1, dqb + (size_t)i0 * qs, qs, MOE_TRI_K_BELOW, diag + 1);
                            tile_gemm(1, 0, n, Dk, m, tile, ATT_BLOCK, qi, qs, 1,
                                      dkb + (size_t)j0 * ks, ks, MOE_TRI_K_FROM, -diag);
                        }
                }
            }
        }
}

typedef struct {
    float *out;
    const float *q, *k, *v;
    int n, P;
    const moe_attn_dims *a;
} cached_args;

/* Keys a cached query scores at a time: the softmax runs over the blocks as they come (the
 * running maximum and sum, the output rescaled when the maximum grows), so a query needs no
 * scratch over its whole cache. */
#define CACHED_KEYS 256

/* Items [i0, i1) of moe_attention_cached: item i H + h is head h of new token i. */
static void cached_items(void *ctx, int i0, int i1) {
    const cached_args *c = ctx;
    const moe_attn_dims *a = c->a;
    int H = a->H, dk = a->dk, dv = a->dv, rep = H / a->KV;
    size_t qs = (size_t)H * dk, ks = (size_t)a->KV * dk, vs = (size_t)a->KV * dv,
           os = (size_t)H * dv;
    float s[CACHED_KEYS];
    for (int it = i0; it < i1; it++) {
        int i = it / H, h = it % H, g = h / rep, len = c->P + i + 1;
        const float *qi = c->q + (size_t)i * qs + h * dk;
        float *oi = c->out + (size_t)i * os + h * dv, mx = -INFINITY, sum = 0;
        for (int e = 0; e < dv; e++) oi[e] = 0;
        for (int j0 = 0; j0 < len; j0 += CACHED_KEYS) {
            int nb = len - j0 < CACHED_KEYS ? len - j0 : CACHED_KEYS;
            float bm = -INFINITY;
            for (int j = 0; j < nb; j++) {
                const float *kj = c->k + (size_t)(j0 + j) * ks + g * dk;
                float dot = 0;
#pragma omp simd reduction(+ : dot)
                for (int e = 0; e < dk; e++) dot += qi[e] * kj[e];
                s[j] = dot * a->scale;
                bm = s[j] > bm ? s[j] : bm;
            }
            if (bm > mx) { /* the blocks so far, scaled to the new maximum */
                float r = moe_exp_vec(mx - bm);
                sum *= r;
                for (int e = 0; e < dv; e++) oi[e] *= r;
                mx = bm;
            }
            for (int j = 0; j < nb; j++) s[j] = moe_exp_vec(s[j] - mx);
            for (int j = 0; j < nb; j++) sum += s[j];
            for (int j = 0; j < nb; j++) {
                const float *vj = c->v + (size_t)(j0 + j) * vs + g * dv;
                for (int e = 0; e < dv; e++) oi[e] += s[j] * vj[e];
            }
        }
        float inv = 1.0f / sum;
        for (int e = 0; e < dv; e++) oi[e] *= inv;
    }
}

/* Attention of n new tokens at positions P..P+n-1 of one sequence over a key/value cache
 * k [P+n, KV*dk], v [P+n, KV*dv] that already holds them: q [n, H*dk] -> out [n, H*dv]. a->B,
 * a->S unused. The (token, head) items over the threads, once the keys and values they read
 * are worth a parallel region: a decoding step over a short cache runs on the calling thread. */
void moe_attention_cached(float *out, const float *q, const float *k, const float *v, int n,
                          int P, const moe_attn_dims *a) {
    cached_args c = {out, q, k, v, n, P, a};
    size_t work = (size_t)n * a->H * (size_t)(P + n) * (size_t)(a->dk + a->dv);
    moe_for_ranges(n * a->H, work, cached_items, &c);
}

/* ---------------------------------------------------------- cross-entropy */

/* For each row t with target y[t] >= 0: row_loss[t] = logsumexp(logits_t) - logits_t[y_t]
 * (0 for rows with y < 0, which are ignored). Returns the sum over the rows, added in row
 * order so that it does not depend on the thread count, and sets *n_counted.
 * If dlogits is not NULL, writes dlogits = scale * (softmax - onehot) (0 for ignored rows). */
double moe_xent_forward_backward(float *dlogits, double *row_loss, const float *logits,
                                 const int32_t *y, int T, int V, float scale, int *n_counted) {
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++) {
        const float *lt = logits + (size_t)t * V;
        float *gt = dlogits ? dlogits + (size_t)t * V : NULL;
        row_loss[t] = 0;
        if (y[t] < 0) {
            if (gt) memset(gt, 0, sizeof(float) * (size_t)V);
            continue;
        }
        float mx = max_floats(lt, V);
        /* each exponential once, kept in gt for the softmax; in float, then summed in double
         * (one loop that did both stayed scalar) */
        double s = 0;
        for (int j0 = 0; j0 < V; j0 += 256) {
            int n = V - j0 < 256 ? V - j0 : 256;
            float buf[256], *e = gt ? gt + j0 : buf;
            for (int j = 0; j < n; j++) e[j] = moe_exp_vec(lt[j0 + j] - mx);
#pragma omp simd reduction(+ : s)
            for (int j = 0; j < n; j++) s += e[j];
        }
        row_loss[t] = mx + log(s) - lt[y[t]];
        if (gt) {
            double f = scale / s;
            for (int j = 0; j < V; j++) gt[j] = (float)(f * gt[j]);
            gt[y[t]] -= scale;
        }
    }
    double total = 0;
    int n = 0;
    for (int t = 0; t < T; t++) {
        total += row_loss[t];
        n += y[t] >= 0;
    }
    *n_counted = n;
    return total;
}
