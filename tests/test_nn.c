/* Transformer kernels (RMSNorm, RoPE, causal GQA attention, cross-entropy) against naive
 * float64 references written here; gradients against float64 central differences of those
 * references. */
#include "kernels/kernels.h"
#include "kernels/avx512.h"
#include "test_util.h"

#include <math.h>
#include <omp.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

/* fp32 kernels against float64 math: inputs O(1), outputs O(1); 2e-5 relative to the
 * largest magnitude covers fp32 rounding through a few hundred accumulations. */
#define TOL 2e-5

static double *to64(const float *x, size_t n) {
    double *y = malloc(n * sizeof *y);
    for (size_t i = 0; i < n; i++) y[i] = x[i];
    return y;
}

static double max_abs(const double *x, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; i++) m = fabs(x[i]) > m ? fabs(x[i]) : m;
    return m;
}

/* Compares float results with float64 ones relative to the largest reference magnitude. */
static void check(const char *what, const float *a, const double *b, size_t n) {
    tu_check_close(what, a, b, n, TOL * (max_abs(b, n) + 1e-30), 0);
}

/* ------------------------------------------------------------- references */

typedef struct {
    int T, d, H, KV, hd, B, S;
    double eps, theta;
    const int *pos;
    int dv;       /* attention: v head width (0: hd) */
    double scale; /* attention: score scale (0: 1/sqrt(hd)) */
} dims;

static void ref_rmsnorm(double *y, const double *x, const double *w, const dims *D) {
    for (int t = 0; t < D->T; t++) {
        double ss = 0;
        for (int i = 0; i < D->d; i++) ss += x[t * D->d + i] * x[t * D->d + i];
        double r = 1 / sqrt(ss / D->d + D->eps);
        for (int i = 0; i < D->d; i++) y[t * D->d + i] = x[t * D->d + i] * r * w[i];
    }
}

/* Rotation of pairs (i, i + hd/2) by pos * theta^(-2i/hd), written with complex numbers:
 * (a + ib) * e^{i ang}. */
static void ref_rope(double *x, int T, int nh, const dims *D) {
    int half = D->hd / 2;
    for (int t = 0; t < T; t++)
        for (int h = 0; h < nh; h++)
            for (int i = 0; i < half; i++) {
                double ang = D->pos[t] / pow(D->theta, 2.0 * i / D->hd);
                double *v = x + ((size_t)t * nh + h) * D->hd;
                double re = v[i], im = v[i + half];
                v[i] = re * cos(ang) - im * sin(ang);
                v[i + half] = re * sin(ang) + im * cos(ang);
            }
}

static void ref_attention(double *out, const double *q, const double *k, const double *v,
                          const dims *D) {
    int qs = D->H * D->hd, ks = D->KV * D->hd, dv = D->dv ? D->dv : D->hd;
    int vs = D->KV * dv, os = D->H * dv;
    double scale = D->scale ? D->scale : 1 / sqrt((double)D->hd);
    double *s = malloc(sizeof(double) * D->S);
    for (int b = 0; b < D->B; b++)
        for (int h = 0; h < D->H; h++) {
            int g = h / (D->H / D->KV);
            for (int i = 0; i < D->S; i++) {
                double mx = -INFINITY, sum = 0;
                for (int j = 0; j <= i; j++) {
                    double dot = 0;
                    for (int c = 0; c < D->hd; c++)
                        dot += q[(b * D->S + i) * qs + h * D->hd + c] * k[(b * D->S + j) * ks + g * D->hd + c];
                    s[j] = dot * scale;
                    mx = fmax(mx, s[j]);
                }
                for (int j = 0; j <= i; j++) sum += exp(s[j] - mx);
                for (int c = 0; c < dv; c++) {
                    double o = 0;
                    for (int j = 0; j <= i; j++)
                        o += exp(s[j] - mx) / sum * v[(b * D->S + j) * vs + g * dv + c];
                    out[(b * D->S + i) * os + h * dv + c] = o;
                }
            }
        }
    free(s);
}

/* The attention's gradients in float64, analytically (the finite differences below check a
 * sample; this checks every element): with P the probabilities, dP = dO V^T, D_i = sum_j P_ij
 * dP_ij and dS = P (dP - D) scale: dq += dS k, dk += dS^T q, dv += P^T dO. */
static void ref_attention_backward(double *dq, double *dk, double *dvv, const double *G,
                                   const double *q, const double *k, const double *v,
                                   const dims *D) {
    int hd = D->hd, qs = D->H * hd, ks = D->KV * hd, dv = D->dv ? D->dv : hd;
    int vs = D->KV * dv, os = D->H * dv;
    double scale = D->scale ? D->scale : 1 / sqrt((double)hd);
    double *p = malloc(sizeof(double) * D->S), *dp = malloc(sizeof(double) * D->S);
    for (int b = 0; b < D->B; b++)
        for (int h = 0; h < D->H; h++) {
            int g = h / (D->H / D->KV);
            for (int i = 0; i < D->S; i++) {
                const double *qi = q + (size_t)(b * D->S + i) * qs + h * hd;
                const double *gi = G + (size_t)(b * D->S + i) * os + h * dv;
                double mx = -INFINITY, sum = 0, Dsum = 0;
                for (int j = 0; j <= i; j++) {
                    const double *kj = k + (size_t)(b * D->S + j) * ks + g * hd;
                    const double *vj = v + (size_t)(b * D->S + j) * vs + g * dv;
                    double dot = 0, dd = 0;
                    for (int c = 0; c < hd; c++) dot += qi[c] * kj[c];
                    for (int c = 0; c < dv; c++) dd += gi[c] * vj[c];
                    p[j] = dot * scale;
                    dp[j] = dd;
                    mx = fmax(mx, p[j]);
                }
                for (int j = 0; j <= i; j++) sum += p[j] = exp(p[j] - mx);
                for (int j = 0; j <= i; j++) Dsum += (p[j] /= sum) * dp[j];
                for (int j = 0; j <= i; j++) {
                    double ds = p[j] * (dp[j] - Dsum) * scale;
                    size_t jr = (size_t)(b * D->S + j);
                    for (int c = 0; c < hd; c++) {
                        dq[(size_t)(b * D->S + i) * qs + h * hd + c] += ds * k[jr * ks + g * hd + c];
                        dk[jr * ks + g * hd + c] += ds * qi[c];
                    }
                    for (int c = 0; c < dv; c++) dvv[jr * vs + g * dv + c] += p[j] * gi[c];
                }
            }
        }
    free(p), free(dp);
}

/* Central difference of f at x[i] (float64), h relative to 1. */
typedef double (*scalar_fn)(void *ctx);
static double central(double *xi, scalar_fn f, void *ctx) {
    const double h = 1e-6;
    double old = *xi;
    *xi = old + h;
    double fp = f(ctx);
    *xi = old - h;
    double fm = f(ctx);
    *xi = old;
    return (fp - fm) / (2 * h);
}

/* Checks n_check random entries of an fp32 gradient against central differences. */
static void check_grad(const char *what, const float *g, double *x, size_t n, scalar_fn f,
                       void *ctx, uint64_t seed) {
    double gmax = 0, *fd = malloc(sizeof(double) * n);
    size_t idx[24];
    int m = n < 24 ? (int)n : 24;
    for (int r = 0; r < m; r++) {
        idx[r] = n <= 24 ? (size_t)r : (size_t)(moe_rng_u64(seed, 77, (uint64_t)r) % n);
        fd[r] = central(&x[idx[r]], f, ctx);
        gmax = fmax(gmax, fabs(fd[r]));
    }
    for (int r = 0; r < m; r++) {
        double err = fabs(g[idx[r]] - fd[r]);
        /* fp32 backward: 1e-4 of the gradient scale (FD error at h=1e-6 is ~1e-9). */
        if (err > 1e-4 * (gmax + 1e-12))
            fail_msg("%s[%zu]: backward %.8g, float64 finite difference %.8g (scale %.3g)", what,
                     idx[r], g[idx[r]], fd[r], gmax);
    }
    free(fd);
}

/* ---------------------------------------------------------------- RMSNorm */

typedef struct {
    dims D;
    double *x, *w, *G, *y;
} norm_ctx;

static double norm_loss(void *p) {
    norm_ctx *c = p;
    ref_rmsnorm(c->y, c->x, c->w, &c->D);
    double L = 0;
    for (int i = 0; i < c->D.T * c->D.d; i++) L += c->y[i] * c->G[i];
    return L;
}

/* One shape: the forward against float64, and dx = res + dL/dx, dw += dL/dw against float64
 * finite differences, with res NULL (dx poisoned before), another buffer, or dx itself (its
 * values before the call), and dw's values before the call random. */
enum { RES_NONE, RES_OTHER, RES_DX };
static void rmsnorm_case(int T, int d, int res_mode, uint64_t seed) {
    dims D = {.T = T, .d = d, .eps = 1e-5};
    size_t n = (size_t)T * d;
    float *x = malloc(n * 4), *w = malloc(d * 4), *G = malloc(n * 4), *y = malloc(n * 4),
          *rstd = malloc(T * 4), *dx = malloc(n * 4), *res = malloc(n * 4), *dw = malloc(d * 4),
          *dw0 = malloc(d * 4);
    tu_fill(x, n, seed, 1, -2, 2);
    tu_fill(w, d, seed, 2, 0.5f, 1.5f);
    tu_fill(G, n, seed, 3, -1, 1);
    tu_fill(res, n, seed, 4, -1, 1);
    tu_fill(dw0, d, seed, 5, -1, 1);
    memcpy(dw, dw0, d * 4);
    if (res_mode == RES_DX) memcpy(dx, res, n * 4);
    else tu_poison(dx, n);
    tu_poison(y, n);
    moe_rmsnorm_forward(y, rstd, x, w, T, d, (float)D.eps);
    norm_ctx c = {D, to64(x, n), to64(w, d), to64(G, n), malloc(n * 8)};
    norm_loss(&c);
    check("rmsnorm forward", y, c.y, n);
    moe_rmsnorm_backward(dx, res_mode == RES_NONE ? NULL : res_mode == RES_DX ? dx : res, dw, G,
                         x, w, rstd, T, d);
    if (res_mode != RES_NONE) /* what the call added */
        for (size_t i = 0; i < n; i++) dx[i] -= res[i];
    for (int i = 0; i < d; i++) dw[i] -= dw0[i];
    check_grad("rmsnorm dx", dx, c.x, n, norm_loss, &c, seed);
    check_grad("rmsnorm dw", dw, c.w, d, norm_loss, &c, seed + 1);
    free(c.x), free(c.w), free(c.G), free(c.y);
    free(x), free(w), free(G), free(y), free(rstd), free(dx), free(res), free(dw), free(dw0);
}

/* The three kinds of res; one row (fewer rows than threads); rows wider than the columns'
 * blocks of 16 and not a multiple of them. */
static void test_rmsnorm(void **state) {
    (void)state;
    uint64_t seed = tu_seed();
    for (int mode = RES_NONE; mode <= RES_DX; mode++)
        rmsnorm_case(7, 24, mode, seed + (uint64_t)mode);
    rmsnorm_case(1, 40, RES_OTHER, seed + 3);
    rmsnorm_case(5, 203, RES_DX, seed + 4);
}

/* ------------------------------------------------------------------- RoPE */

static void test_rope(void **state) {
    (void)state;
    uint64_t seed = tu_seed();
    int pos[9];
    for (int t = 0; t < 9; t++) pos[t] = (int)(moe_rng_u64(seed, 5, (uint64_t)t) % 300);
    dims D = {.hd = 8, .theta = 10000, .pos = pos};
    int T = 9, nh = 3;
    size_t n = (size_t)T * nh * D.hd;
    float *x = malloc(n * 4), *x0 = malloc(n * 4);
    tu_fill(x, n, seed, 1, -1, 1);
    memcpy(x0, x, n * 4);
    double *r = to64(x, n);
    ref_rope(r, T, nh, &D);
    moe_rope_apply(x, T, nh, D.hd, pos, (float)D.theta, 1);
    check("rope forward", x, r, n);
    /* Backward is the transpose, i.e. the inverse rotation: applying it restores x0. */
    moe_rope_apply(x, T, nh, D.hd, pos, (float)D.theta, -1);
    double *r0 = to64(x0, n);
    check("rope inverse", x, r0, n);
    /* Position 0 leaves a vector unchanged (a rotation by angle 0). */
    int zero[9] = {0};
    memcpy(x, x0, n * 4);
    moe_rope_apply(x, T, nh, D.hd, zero, (float)D.theta, 1);
    assert_memory_equal(x, x0, n * 4);
    free(x), free(x0), free(r), free(r0);
}

/* YaRN (as DeepSeek configures it) and interleaved pairs, on the rope part of wider heads:
 * against a float64 reference that builds the frequency table the way the YaRN paper states
 * it (a ramp r(i) over the pairs between the beta_fast and beta_slow rotation counts;
 * freq = (1 - r) * base + r * base / factor), and the ramp's ends checked directly. */
static void test_rope_yarn(void **state) {
    (void)state;
    uint64_t seed = tu_seed();
    int T = 6, nh = 2, stride = 11, off = 3, rd = 8, pos[6];
    for (int t = 0; t < T; t++) pos[t] = (int)(moe_rng_u64(seed, 6, (uint64_t)t) % 200);
    pos[0] = 7, pos[1] = 199; /* in and out of the forward's table of 100 positions */
    moe_rope r = {.theta = 10000, .interleave = 1, .factor = 8, .orig_max_pos = 64,
                  .beta_fast = 32, .beta_slow = 1, .attn_factor = 0.8f};
    double freq[4], pi2 = 2 * 3.14159265358979323846;
    /* the pair index at which a pair turns `rot` times over orig_max_pos positions */
    double lo = floor(rd * log(64 / (32 * pi2)) / (2 * log(10000.0)));
    double hi = ceil(rd * log(64 / (1 * pi2)) / (2 * log(10000.0)));
    lo = fmax(lo, 0), hi = fmin(hi, rd - 1);
    for (int i = 0; i < rd / 2; i++) {
        double base = 1 / pow(10000.0, 2.0 * i / rd), ramp = fmin(fmax((i - lo) / (hi - lo), 0), 1);
        freq[i] = (1 - ramp) * base + ramp * base / 8;
    }
    assert_true(freq[0] == 1.0);                          /* the fastest pair keeps its frequency */
    assert_true(fabs(freq[3] - 1 / pow(10000.0, 0.75) / 8) < 1e-15); /* the slowest: / factor */
    size_t n = (size_t)T * nh * stride;
    float *x = malloc(n * 4), *x0 = malloc(n * 4);
    tu_fill(x, n, seed, 7, -1, 1);
    memcpy(x0, x, n * 4);
    double *ref = to64(x, n);
    for (int t = 0; t < T; t++)
        for (int h = 0; h < nh; h++)
            for (int i = 0; i < rd / 2; i++) {
                double *v = ref + ((size_t)t * nh + h) * stride + off, ang = pos[t] * freq[i];
                double re = v[2 * i], im = v[2 * i + 1];
                v[2 * i] = 0.8 * (re * cos(ang) - im * sin(ang));
                v[2 * i + 1] = 0.8 * (re * sin(ang) + im * cos(ang));
            }
    float cs[100 * 8];
    moe_rope_table(cs, 100, rd, &r);
    moe_rope_rotate(x + off, T, nh, stride, rd, pos, &r, cs, 100, 1);
    check("yarn rope", x, ref, n); /* values outside the rotated part untouched */
    /* backward (without the table): the transpose; applied to the forward output it gives
     * 0.64 x0 */
    moe_rope_rotate(x + off, T, nh, stride, rd, pos, &r, NULL, 0, -1);
    for (size_t i = 0; i < n; i++) {
        size_t within = i % stride;
        double want = within >= (size_t)off && within < (size_t)(off + rd) ? 0.64 * x0[i] : x0[i];
        assert_true(fabs(x[i] - want) < 1e-5);
    }
    free(x), free(x0), free(ref);
}

/* -------------------------------------------------------------- attention */

typedef struct {
    dims D;
    double *q, *k, *v, *G, *out;
} att_ctx;

static double att_loss(void *p) {
    att_ctx *c = p;
    ref_attention(c->out, c->q, c->k, c->v, &c->D);
    double L = 0;
    int dv = c->D.dv ? c->D.dv : c->D.hd;
    for (int i = 0; i < c->D.B * c->D.S * c->D.H * dv; i++) L += c->out[i] * c->G[i];
    return L;
}

/* One forward and backward of the attention against the float64 references (out; the analytic
 * gradients rq, rk, rv), with scratch for the transposed keys and values or without (NULL): the
 * probabilities poisoned (every one is written), then causal and normalised; a first backward
 * from NaN output gradients leaves NaN in the threads' kept tiles (what the second does not
 * write of them it must not read). dq, dk, dv receive the gradients. */
static void attention_run(const moe_attn_dims *A, const float *q, const float *k, const float *v,
                          const float *G, const double *out64, const double *rq,
                          const double *rk, const double *rv, float *scratch, size_t ns,
                          float *dq, float *dk, float *dv) {
    int B = A->B, S = A->S, H = A->H;
    size_t T = (size_t)B * S, nq = T * H * A->dk, nk = T * A->KV * A->dk,
           nv = T * A->KV * A->dv, no = T * H * A->dv, np = (size_t)B * H * S * S;
    float *out = malloc(no * 4), *probs = malloc(np * 4), *junk = malloc((nq + nk + nv) * 4),
          *Gnan = malloc(no * 4);
    tu_poison(out, no);
    tu_poison(probs, np);
    if (scratch) tu_poison(scratch, ns); /* what the transposition does not write is not read */
    moe_attention_forward(out, probs, q, k, v, A, scratch, ns);
    if (scratch && moe_gemm_small_available()) /* the keys went through it */
        assert_false(isnan(scratch[0]));
    check("attention forward", out, out64, no);
    for (size_t bh = 0; bh < (size_t)B * H; bh++)
        for (int i = 0; i < S; i++) {
            double s = 0;
            for (int j = 0; j < S; j++) {
                float p = probs[(bh * S + i) * S + j];
                if (j > i) assert_true(p == 0.0f);
                s += p;
            }
            assert_true(fabs(s - 1) < 1e-5);
        }
    tu_poison(Gnan, no);
    moe_attention_backward(junk, junk + nq, junk + nq + nk, Gnan, probs, q, k, v, A, scratch, ns);
    memset(dq, 0, nq * 4), memset(dk, 0, nk * 4), memset(dv, 0, nv * 4);
    moe_attention_backward(dq, dk, dv, G, probs, q, k, v, A, scratch, ns);
    check("attention dq (analytic)", dq, rq, nq);
    check("attention dk (analytic)", dk, rk, nk);
    check("attention dv (analytic)", dv, rv, nv);
    free(out), free(probs), free(junk), free(Gnan);
}

/* q, k heads hd wide, v heads dv wide (MLA: dv != hd), scores scaled by scale (0: 1/sqrt(hd)):
 * with the transposed keys' scratch and without; gradients also against float64 finite
 * differences. */
static void attention_case_dims(int B, int S, int H, int KV, int hd, int dvw, double scale) {
    uint64_t seed = tu_seed();
    dims D = {.B = B, .S = S, .H = H, .KV = KV, .hd = hd, .dv = dvw, .scale = scale};
    moe_attn_dims A = {B, S, H, KV, hd, dvw, scale ? (float)scale : 1.0f / sqrtf((float)hd)};
    size_t T = (size_t)B * S, nq = T * H * hd, nk = T * KV * hd, nv = T * KV * dvw,
           no = T * H * dvw, ns = moe_attention_scratch_floats(&A);
    float *q = malloc(nq * 4), *k = malloc(nk * 4), *v = malloc(nv * 4), *G = malloc(no * 4),
          *dq = malloc(nq * 4), *dk = malloc(nk * 4), *dv = malloc(nv * 4),
          *scratch = malloc(ns * 4);
    tu_fill(q, nq, seed, 1, -1.5f, 1.5f);
    tu_fill(k, nk, seed, 2, -1.5f, 1.5f);
    tu_fill(v, nv, seed, 3, -1, 1);
    tu_fill(G, no, seed, 4, -1, 1);
    att_ctx c = {D, to64(q, nq), to64(k, nk), to64(v, nv), to64(G, no), malloc(no * 8)};
    att_loss(&c);
    double *rq = calloc(nq, 8), *rk = calloc(nk, 8), *rv = calloc(nv, 8);
    ref_attention_backward(rq, rk, rv, c.G, c.q, c.k, c.v, &D);
    attention_run(&A, q, k, v, G, c.out, rq, rk, rv, NULL, 0, dq, dk, dv);
    attention_run(&A, q, k, v, G, c.out, rq, rk, rv, scratch, ns, dq, dk, dv);
    free(rq), free(rk), free(rv), free(scratch);
    check_grad("attention dq", dq, c.q, nq, att_loss, &c, seed);
    check_grad("attention dk", dk, c.k, nk, att_loss, &c, seed + 1);
    check_grad("attention dv", dv, c.v, nv, att_loss, &c, seed + 2);
    /* the cached kernel (one sequence, the last n tokens over all S) gives the same rows; over
     * more than 256 keys (S = 768) its softmax runs over blocks of them */
    int n = S > 2 ? 2 : S, P = S - n;
    float *oc = malloc((size_t)n * H * dvw * 4);
    moe_attention_cached(oc, q + (size_t)P * H * hd, k, v, n, P, &A);
    check("attention cached", oc, c.out + (size_t)P * H * dvw, (size_t)n * H * dvw);
    free(oc);
    free(c.q), free(c.k), free(c.v), free(c.G), free(c.out);
    free(q), free(k), free(v), free(G), free(dq), free(dk), free(dv);
}

static void attention_case(int B, int S, int H, int KV, int hd) {
    attention_case_dims(B, S, H, KV, hd, hd, 0);
}

static void test_attention_mha(void **state) {
    (void)state;
    attention_case(2, 7, 2, 2, 4);
}

static void test_attention_gqa(void **state) {
    (void)state;
    attention_case(2, 6, 6, 2, 4); /* 3 query heads per kv head */
    attention_case(1, 5, 4, 1, 6); /* multi-query */
    attention_case(3, 1, 2, 1, 2); /* one token per sequence */
    attention_case(1, 137, 4, 2, 8); /* query and key blocks of 64 (and 9) below the diagonal */
    /* rows of up to 12 key blocks: the backward keeps the first 8 blocks' dP from its first
     * pass and computes the others again */
    attention_case(1, 768, 2, 1, 4);
    /* head widths of whole vectors: 32 (the default model's), and 80 over 40 (products over
     * more than 64 columns, partial vectors) */
    attention_case(2, 130, 2, 1, 32);
    attention_case_dims(1, 70, 2, 2, 80, 40, 0);
    /* a last block of 17 rows: its last tile's diagonal column starts a vector */
    attention_case(1, 81, 2, 1, 16);
}

/* Multi-head latent attention's shapes: q/k heads wider than v heads (and narrower), a scale
 * that is not 1/sqrt(dk) (YaRN's mscale^2). */
static void test_attention_mla(void **state) {
    (void)state;
    attention_case_dims(2, 6, 3, 3, 10, 6, 0.2371);
    attention_case_dims(1, 5, 2, 2, 3, 5, 0.9);
}

/* ---------------------------------------------------------- cross-entropy */

static void test_xent(void **state) {
    (void)state;
    uint64_t seed = tu_seed();
    int T = 9, V = 13;
    float *logits = malloc(sizeof(float) * T * V), *g = malloc(sizeof(float) * T * V);
    double *rows = malloc(sizeof(double) * T);
    int32_t y[9];
    tu_fill(logits, (size_t)T * V, seed, 1, -4, 4);
    for (int t = 0; t < T; t++) y[t] = (int32_t)(moe_rng_u64(seed, 2, (uint64_t)t) % V);
    y[2] = -1; /* ignored */
    y[7] = -100;
    int n = 0;
    tu_poison(g, (size_t)T * V);
    double sum = moe_xent_forward_backward(g, rows, logits, y, T, V, 0.25f, &n);
    assert_int_equal(n, 7);
    double ref = 0, bound = 0;
    double *dref = calloc((size_t)T * V, sizeof(double));
    for (int t = 0; t < T; t++) {
        if (y[t] < 0) continue;
        double s = 0, lo = INFINITY, hi = -INFINITY;
        for (int j = 0; j < V; j++) {
            s += exp((double)logits[t * V + j]);
            lo = fmin(lo, logits[t * V + j]), hi = fmax(hi, logits[t * V + j]);
        }
        ref += log(s) - logits[t * V + y[t]];
        for (int j = 0; j < V; j++) dref[t * V + j] = 0.25 * (exp((double)logits[t * V + j]) / s - (j == y[t]));
        /* the exponentials are float: each term within 2^-22 (moe_exp_vec) after rounding its
         * argument l - max to float (2^-24 |l - max|), so log-sum-exp within the sum of both */
        bound += 0x1p-22 + 0x1p-24 * (hi - lo);
    }
    assert_true(fabs(sum - ref) <= bound);
    check("xent gradient", g, dref, (size_t)T * V);
    free(logits), free(g), free(rows), free(dref);
}

/* The vectorised e^x of the softmaxes and activations: within 2 ulp of e^x over its range
 * (1.3 half-ulp measured), exact at 0, clamped to e^-87 and e^88 outside, NaN kept. */
static void test_exp_vec(void **state) {
    (void)state;
    uint64_t seed = tu_seed();
    enum { N = 100000 };
    float *x = malloc(N * sizeof(float)), *y = malloc(N * sizeof(float));
    tu_fill(x, N, seed, 1, -87, 88);
    for (int i = 0; i < N; i++) y[i] = moe_exp_vec(x[i]);
    for (int i = 0; i < N; i++) {
        double want = exp((double)x[i]);
        if (fabs(y[i] - want) > ldexp(want, -22))
            fail_msg("exp(%.9g): %.9g, float64 %.9g", x[i], y[i], want);
    }
    assert_true(moe_exp_vec(0) == 1.0f);
    assert_true(fabs(moe_exp_vec(-1000) - exp(-87.0)) <= ldexp(exp(-87.0), -22));
    assert_true(fabs(moe_exp_vec(1000) - exp(88.0)) <= ldexp(exp(88.0), -22));
    assert_true(isnan(moe_exp_vec(NAN)));
    free(x), free(y);
}

#ifdef MOE_X86
/* The AVX-512 e^x (the attention's softmax, SiLU): the same bounds as moe_exp_vec. */
static AVX512_TARGET void exp16_all(const float *x, float *y, int n) {
    for (int i = 0; i < n; i += 16)
        _mm512_mask_storeu_ps(y + i, moe_lanes16(n - i),
                              moe_exp16(_mm512_maskz_loadu_ps(moe_lanes16(n - i), x + i)));
}
#endif

static void test_exp16(void **state) {
    (void)state;
#ifdef MOE_X86
    if (!moe_avx512()) skip();
    uint64_t seed = tu_seed();
    enum { N = 100003 };
    float *x = malloc(N * sizeof(float)), *y = malloc(N * sizeof(float));
    tu_fill(x, N, seed, 1, -87, 88);
    x[0] = 0, x[1] = -1000, x[2] = 1000, x[3] = NAN;
    exp16_all(x, y, N);
    assert_true(y[0] == 1.0f && isnan(y[3]));
    for (int i = 1; i < N; i++) {
        double want = exp(fmin(fmax((double)x[i], -87), 88));
        if (i != 3 && fabs(y[i] - want) > ldexp(want, -22))
            fail_msg("exp16(%.9g): %.9g, float64 %.9g", x[i], y[i], want);
    }
    free(x), free(y);
#else
    skip();
#endif
}

/* SiLU and SwiGLU rows, forward and backward (the AVX-512 path where the CPU has it), against
 * float64: a = w g sigmoid(g) (u), dL/dg, dL/du and dL/dw = sum da g sigmoid(g) (u), rows of
 * 1 to 130 floats (masked tails), pre-activations up to +-30. */
static void test_act_rows(void **state) {
    (void)state;
    uint64_t seed = tu_seed();
    static const int widths[] = {1, 5, 16, 33, 128, 130};
    for (int q = 0; q < 6; q++)
        for (int gatedq = 0; gatedq < 2; gatedq++) {
            int f = widths[q], gf = gatedq ? 2 * f : f;
            moe_activation act = gatedq ? MOE_ACT_SWIGLU : MOE_ACT_SILU;
            float *h = malloc(sizeof(float) * gf), *a = malloc(sizeof(float) * f),
                  *da = malloc(sizeof(float) * f), *dh = malloc(sizeof(float) * gf);
            tu_fill(h, gf, seed, 10 * q + gatedq, -30, 30);
            tu_fill(da, f, seed, 10 * q + gatedq + 5, -1, 1);
            float w = 0.25f + (float)q / 7;
            moe_act_forward_row(act, f, h, w, a);
            double dw = moe_act_backward_row(act, f, h, w, da, dh), want_dw = 0, mag = 0;
            for (int i = 0; i < f; i++) {
                double g = h[i], u = gatedq ? h[f + i] : 1, sg = 1 / (1 + exp(-g));
                double y = w * g * sg * u, dg = w * da[i] * u * sg * (1 + g * (1 - sg));
                double tol = 4e-7 * (fabs(w * g * u) + 1e-30);
                if (fabs(a[i] - y) > tol)
                    fail_msg("act %d f=%d a[%d] = %.9g, float64 %.9g", act, f, i, a[i], y);
                if (fabs(dh[i] - dg) > 4e-7 * (fabs(w * da[i] * u) * (1 + fabs(g)) + 1e-30))
                    fail_msg("act %d f=%d dg[%d] = %.9g, float64 %.9g", act, f, i, dh[i], dg);
                if (gatedq && fabs(dh[f + i] - w * da[i] * g * sg) > 4e-7 * fabs(w * da[i] * g))
                    fail_msg("act %d f=%d du[%d] = %.9g, float64 %.9g", act, f, i, dh[f + i],
                             w * da[i] * g * sg);
                want_dw += da[i] * g * sg * u;
                mag += fabs(da[i] * g * u);
            }
            if (fabs(dw - want_dw) > 4e-7 * mag)
                fail_msg("act %d f=%d dw = %.9g, float64 %.9g", act, f, dw, want_dw);
            free(h), free(a), free(da), free(dh);
        }
}

/* Its float64 twin of the router's softmax: within 2^-51 relative of the 80-bit expl over its
 * range (1.6 half-ulp measured), exact at 0, 0 below -708 and +inf above 709, NaN kept. */
static void test_exp_vec64(void **state) {
    (void)state;
    uint64_t seed = tu_seed();
    for (int i = 0; i < 200000; i++) {
        double lo = i % 2 ? -708 : -40, hi = i % 2 ? 709 : 1;
        double x = lo + (hi - lo) * moe_rng_uniform64(seed, 5, (uint64_t)i);
        long double want = expl((long double)x);
        if (fabsl((long double)moe_exp_vec64(x) - want) > ldexpl(want, -51))
            fail_msg("exp(%.17g): %.17g, expl %.17Lg", x, moe_exp_vec64(x), want);
    }
    assert_true(moe_exp_vec64(0) == 1.0);
    assert_true(moe_exp_vec64(-708.5) == 0 && moe_exp_vec64(-INFINITY) == 0);
    assert_true(isinf(moe_exp_vec64(709.5)) && isinf(moe_exp_vec64(INFINITY)));
    assert_true(isnan(moe_exp_vec64(NAN)));
}

static void buffer_passes(size_t n) {
    float *x = malloc((n + 16) * sizeof(float));
    tu_fill(x, n + 16, tu_seed(), 1, -2, 2);
    long double want = 0; /* a float64 running sum is itself off by 2e-12 at 4 M terms */
    for (size_t i = 0; i < n; i++) want += (long double)x[i] * x[i];
    double mag = (double)want;
    int threads = omp_get_max_threads();
    omp_set_num_threads(1);
    double one = moe_sum_squares(x, n);
    omp_set_num_threads(2);
    double two = moe_sum_squares(x, n);
    omp_set_num_threads(threads);
    assert_true(one == two);
    assert_true(fabsl(one - want) <= 1e-13L * mag);
    float guard = x[n];
    moe_zero_floats(x, n);
    for (size_t i = 0; i < n; i++)
        if (x[i] != 0.0f) fail_msg("x[%zu] = %g after zeroing", i, x[i]);
    assert_true(x[n] == guard);
    free(x);
}

/* Whole-buffer passes: the sum of squares against a long double sum (a group of blocks and a
 * partial last block; three groups, the last partial; fewer elements than one vector of lanes),
 * the same bits on 1 and 2 threads; zeroing reaches every element and nothing beyond. */
static void test_buffer_passes(void **state) {
    (void)state;
    static const size_t sizes[] = {(3u << 15) + 1234, (130u << 15) + 77, 37};
    for (size_t q = 0; q < sizeof sizes / sizeof *sizes; q++) buffer_passes(sizes[q]);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rmsnorm),      cmocka_unit_test(test_rope),
        cmocka_unit_test(test_attention_mha), cmocka_unit_test(test_attention_gqa),
        cmocka_unit_test(test_attention_mla), cmocka_unit_test(test_rope_yarn),
        cmocka_unit_test(test_xent),         cmocka_unit_test(test_buffer_passes),
        cmocka_unit_test(test_exp_vec),
        cmocka_unit_test(test_exp16),
        cmocka_unit_test(test_act_rows),
        cmocka_unit_test(test_exp_vec64),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
