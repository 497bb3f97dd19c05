/* The GPU transformer kernels (src/cuda/nn.h) against the CPU's (kernels/nn.c, and the model's
 * embedding loops) on fresh random inputs: RMSNorm, RoPE (both pair layouts, both directions,
 * a partial rotation), causal grouped-query attention, cross-entropy with ignored targets, the
 * embedding and the addition; the outputs that are added into start from random values on
 * both sides; attention's lse and decoding's attention over a cache against float64 loops.
 * Attention's forward and backward, the cached attention and the embedding's backward are
 * bitwise repeatable. Without a GPU (or in a build without CUDA) it says so and exits 77,
 * which CTest counts as skipped. */
#include "test_util.h"

#include "cuda/nn.h"
#include "kernels/kernels.h"
#include "moe.h"
#include "moe_cuda.h"

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

/* GPU against CPU, both fp32, relative to the largest entry of the CPU's tensor (attention's
 * lse: of a float64 reference). The two sum in different orders (block trees, per-thread loops
 * and attention's tiles against BLAS blocks and sequential loops), contract into FMAs
 * differently and take expf instead of moe_exp_vec (a few ulp each). Attention adds its own
 * roundings: the online softmax rescales each row's running sums once per key tile (at most 5
 * here), the backward recomputes P = exp(s - lse) (lse's own rounding, about 5e-7 at
 * |lse| < 8, a relative error of a row's every P) and takes D = dout . out where the CPU sums
 * P dP (equal but for rounding, ~1e-7 of |dout| |v|). Each is a relative error of a few 1e-7
 * a term, over sums of up to 1200 terms (dk and dv: 4 heads x 300 queries) with random signs,
 * the error growing as the square root of the count as the entries do: ~1e-7 .. 1e-6 of the
 * scale (a simulation of the tiles' code on the CPU gave at most 1e-6, for dv at S = 300; the
 * added-into gradients start from values in [-1, 1]). 1e-5 leaves a margin above that; a wrong
 * index, a missed tile or term or a wrong mask is off by far more (1e-3 .. 1). */
#define TOL 1e-5

static void check(moe_status s) {
    if (s != MOE_OK) fail_msg("%s", moe_last_error());
}

/* Device copy of host [bytes] (NULL: uninitialised). */
static void *dev(const void *host, size_t bytes) {
    void *p = NULL;
    check(moe_cuda_alloc(&p, bytes));
    if (host) check(moe_cuda_to_device(p, host, bytes));
    return p;
}

static float *host_floats(size_t n) {
    float *x = malloc((n ? n : 1) * sizeof *x);
    assert_non_null(x);
    return x;
}

static float *fetch(const float *d, size_t n) {
    float *x = host_floats(n);
    check(moe_cuda_to_host(x, d, n * sizeof *x));
    return x;
}

/* Device floats [n] poisoned with NaN, so that entries left unwritten show. */
static float *dev_poisoned(size_t n) {
    float *h = host_floats(n);
    tu_poison(h, n);
    float *d = dev(h, n * sizeof *h);
    free(h);
    return d;
}

static float *random_floats(size_t n, uint64_t seed, uint64_t stream, float lo, float hi) {
    float *x = host_floats(n);
    tu_fill(x, n, seed, stream, lo, hi);
    return x;
}

static float *copy_floats(const float *x, size_t n) {
    float *y = host_floats(n);
    memcpy(y, x, n * sizeof *y);
    return y;
}

/* The GPU's gpu [n] against a float64 reference ref [n] within TOL of ref's largest magnitude;
 * returns the largest difference relative to it. */
static double close_to_ref(const char *what, const float *gpu, const double *ref, size_t n) {
    double m = 0, e = 0;
    for (size_t i = 0; i < n; i++) m = fmax(m, fabs(ref[i]));
    tu_check_close(what, gpu, ref, n, TOL * m + 1e-30, 0);
    for (size_t i = 0; i < n; i++) e = fmax(e, fabs(gpu[i] - ref[i]));
    return e / (m + 1e-30);
}

/* The GPU's gpu [n] against the CPU's cpu [n] (close_to_ref). */
static double close_to(const char *what, const float *gpu, const float *cpu, size_t n) {
    double *b = malloc((n ? n : 1) * sizeof *b);
    assert_non_null(b);
    for (size_t i = 0; i < n; i++) b[i] = cpu[i];
    double e = close_to_ref(what, gpu, b, n);
    free(b);
    return e;
}

/* ---------------------------------------------------------------- RMSNorm */

static void rmsnorm_case(int T, int d, uint64_t seed) {
    size_t n = (size_t)T * d;
    float eps = 1e-5f;
    float *x = random_floats(n, seed, 1, -2, 2), *w = random_floats((size_t)d, seed, 2, 0.5f, 1.5f);
    float *dy = random_floats(n, seed, 3, -1, 1), *dx0 = random_floats(n, seed, 4, -1, 1);
    float *dw0 = random_floats((size_t)d, seed, 5, -1, 1);
    float *y = host_floats(n), *rstd = host_floats((size_t)T);
    float *dx = copy_floats(dx0, n), *dw = copy_floats(dw0, (size_t)d);
    moe_rmsnorm_forward(y, rstd, x, w, T, d, eps);
    moe_rmsnorm_backward(dx, dx, dw, dy, x, w, rstd, T, d);

    float *gx = dev(x, n * 4), *gw = dev(w, (size_t)d * 4), *gdy = dev(dy, n * 4);
    float *gdx = dev(dx0, n * 4), *gdw = dev(dw0, (size_t)d * 4);
    float *gy = dev_poisoned(n), *grstd = dev_poisoned((size_t)T);
    check(moe_cuda_rmsnorm_forward(gy, grstd, gx, gw, T, d, eps));
    check(moe_cuda_rmsnorm_backward(gdx, gdw, gdy, gx, gw, grstd, T, d));
    float *hy = fetch(gy, n), *hr = fetch(grstd, (size_t)T), *hdx = fetch(gdx, n),
          *hdw = fetch(gdw, (size_t)d);
    double e1 = close_to("rmsnorm y", hy, y, n), e2 = close_to("rmsnorm rstd", hr, rstd, T);
    double e3 = close_to("rmsnorm dx", hdx, dx, n), e4 = close_to("rmsnorm dw", hdw, dw, d);
    printf("rmsnorm T %d d %d: y %.2g rstd %.2g dx %.2g dw %.2g of scale\n", T, d, e1, e2, e3,
           e4);
    moe_cuda_free(gx), moe_cuda_free(gw), moe_cuda_free(gdy), moe_cuda_free(gdx);
    moe_cuda_free(gdw), moe_cuda_free(gy), moe_cuda_free(grstd);
    free(x), free(w), free(dy), free(dx0), free(dw0), free(y), free(rstd), free(dx), free(dw);
    free(hy), free(hr), free(hdx), free(hdw);
}

static void test_rmsnorm(void **state) {
    (void)state;
    uint64_t seed = tu_seed();
    rmsnorm_case(37, 200, seed);
    rmsnorm_case(5, 1000, seed + 1); /* fewer tokens than dw's ranges; rows wider than a block */
}

/* ------------------------------------------------------------------- RoPE */

/* The last rd of head_stride values of each head rotate (as multi-head latent attention's
 * position part); the first off stay. */
static void rope_case(int interleave, int dir, int yarn, uint64_t seed) {
    enum { T = 11, NH = 3, STRIDE = 24, RD = 16, OFF = 8, NCS = 64 };
    size_t n = (size_t)T * NH * STRIDE;
    moe_rope r = {.theta = 10000, .interleave = interleave, .attn_factor = 1};
    if (yarn) { /* the table carries YaRN's frequencies and scale */
        r.factor = 4, r.orig_max_pos = 16, r.beta_fast = 32, r.beta_slow = 1;
        r.attn_factor = 1.1f;
    }
    float *cs = host_floats((size_t)NCS * RD);
    moe_rope_table(cs, NCS, RD, &r);
    int pos[T];
    int32_t pos32[T];
    for (int t = 0; t < T; t++) pos32[t] = pos[t] = (int)(moe_rng_u64(seed, 9, (uint64_t)t) % NCS);
    pos32[3] = pos[3] = pos[4]; /* a repeated position */
    float *x0 = random_floats(n, seed, 10 + (uint64_t)(2 * interleave + (dir < 0)), -1, 1);
    float *x = copy_floats(x0, n);
    moe_rope_rotate(x + OFF, T, NH, STRIDE, RD, pos, &r, cs, NCS, dir);

    float *gx = dev(x0, n * 4), *gcs = dev(cs, (size_t)NCS * RD * 4);
    int32_t *gpos = dev(pos32, sizeof pos32);
    check(moe_cuda_rope_rotate(gx + OFF, T, NH, STRIDE, RD, gpos, interleave, gcs, NCS, dir));
    float *h = fetch(gx, n);
    char what[96];
    snprintf(what, sizeof what, "rope interleave %d dir %d yarn %d", interleave, dir, yarn);
    double e = close_to(what, h, x, n);
    for (int t = 0; t < T; t++) /* the first OFF values of every head unchanged */
        for (int hh = 0; hh < NH; hh++)
            assert_memory_equal(h + ((size_t)t * NH + hh) * STRIDE,
                                x0 + ((size_t)t * NH + hh) * STRIDE, OFF * 4);
    printf("%s: %.2g of scale\n", what, e);

    /* a position outside the table leaves its token unchanged (the caller refuses it) */
    pos32[0] = NCS;
    check(moe_cuda_to_device(gpos, pos32, sizeof pos32));
    check(moe_cuda_to_device(gx, x0, n * 4));
    check(moe_cuda_rope_rotate(gx + OFF, T, NH, STRIDE, RD, gpos, interleave, gcs, NCS, dir));
    float *h2 = fetch(gx, n);
    assert_memory_equal(h2, x0, (size_t)NH * STRIDE * 4);
    assert_memory_equal(h2 + NH * STRIDE, h + NH * STRIDE, (n - NH * STRIDE) * 4);
    moe_cuda_free(gx), moe_cuda_free(gcs), moe_cuda_free(gpos);
    free(cs), free(x0), free(x), free(h), free(h2);
}

static void test_rope(void **state) {
    (void)state;
    uint64_t seed = tu_seed();
    for (int il = 0; il < 2; il++)
        for (int dir = -1; dir <= 1; dir += 2)
            for (int yarn = 0; yarn < 2; yarn++) rope_case(il, dir, yarn, seed);
    float *gx = dev(NULL, 64);
    assert_int_equal(moe_cuda_rope_rotate(gx, 1, 1, 16, 16, NULL, 0, NULL, 1, 2), MOE_ERR_INVALID);
    moe_cuda_free(gx);
}

/* -------------------------------------------------------------- attention */

/* lse [B, H, S] of the attention a over q, k (float inputs), in float64: the log of the sum over
 * the keys j <= i of exp(scale q_i . k_j). */
static double *attention_lse(const float *q, const float *k, const moe_attn_dims *a) {
    int B = a->B, S = a->S, H = a->H, dk = a->dk, rep = a->H / a->KV;
    size_t qs = (size_t)H * dk, ks = (size_t)a->KV * dk;
    double *lse = malloc(((size_t)B * H * S + 1) * sizeof *lse), *s = malloc((S + 1) * sizeof *s);
    assert_non_null(lse);
    assert_non_null(s);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int i = 0; i < S; i++) {
                const float *qi = q + ((size_t)b * S + i) * qs + (size_t)h * dk;
                double m = -INFINITY, sum = 0;
                for (int j = 0; j <= i; j++) {
                    const float *kj = k + ((size_t)b * S + j) * ks + (size_t)(h / rep) * dk;
                    double dot = 0;
                    for (int c = 0; c < dk; c++) dot += (double)qi[c] * kj[c];
                    s[j] = (double)a->scale * dot;
                    m = fmax(m, s[j]);
                }
                for (int j = 0; j <= i; j++) sum += exp(s[j] - m);
                lse[((size_t)b * H + h) * S + i] = m + log(sum);
            }
    free(s);
    return lse;
}

static void attention_case(int B, int S, int H, int KV, int dk, int dv, uint64_t seed) {
    moe_attn_dims a = {B, S, H, KV, dk, dv, (float)(1 / sqrt((double)dk))};
    size_t nq = (size_t)B * S * H * dk, nk = (size_t)B * S * KV * dk;
    size_t nv = (size_t)B * S * KV * dv, no = (size_t)B * S * H * dv;
    size_t np = (size_t)B * H * S * S, nl = (size_t)B * H * S;
    float *q = random_floats(nq, seed, 20, -1, 1), *k = random_floats(nk, seed, 21, -1, 1);
    float *v = random_floats(nv, seed, 22, -1, 1), *dout = random_floats(no, seed, 23, -1, 1);
    float *dq0 = random_floats(nq, seed, 24, -1, 1), *dk0 = random_floats(nk, seed, 25, -1, 1);
    float *dv0 = random_floats(nv, seed, 26, -1, 1);
    float *out = host_floats(no), *probs = host_floats(np);
    float *dq = copy_floats(dq0, nq), *dkk = copy_floats(dk0, nk), *dvv = copy_floats(dv0, nv);
    moe_attention_forward(out, probs, q, k, v, &a, NULL, 0);
    moe_attention_backward(dq, dkk, dvv, dout, probs, q, k, v, &a, NULL, 0);
    double *lse = attention_lse(q, k, &a);

    float *gq = dev(q, nq * 4), *gk = dev(k, nk * 4), *gv = dev(v, nv * 4);
    float *gdout = dev(dout, no * 4), *gout = dev_poisoned(no), *glse = dev_poisoned(nl);
    float *gdq = dev(dq0, nq * 4), *gdk = dev(dk0, nk * 4), *gdv = dev(dv0, nv * 4);
    float *scratch = dev_poisoned(nl);
    check(moe_cuda_attention_forward(gout, glse, gq, gk, gv, &a));
    check(moe_cuda_attention_backward(gdq, gdk, gdv, gdout, gout, glse, gq, gk, gv, &a, scratch));
    float *hout = fetch(gout, no), *hl = fetch(glse, nl);
    float *hdq = fetch(gdq, nq), *hdk = fetch(gdk, nk), *hdv = fetch(gdv, nv);
    char what[5][160];
    const char *names[5] = {"out", "lse", "dq", "dk", "dv"};
    for (int i = 0; i < 5; i++)
        snprintf(what[i], sizeof what[i], "attention B %d S %d H %d KV %d dk %d dv %d: %s", B,
                 S, H, KV, dk, dv, names[i]);
    double e[5] = {close_to(what[0], hout, out, no), close_to_ref(what[1], hl, lse, nl),
                   close_to(what[2], hdq, dq, nq), close_to(what[3], hdk, dkk, nk),
                   close_to(what[4], hdv, dvv, nv)};
    printf("attention B %d S %d H %d KV %d dk %d dv %d: out %.2g lse %.2g dq %.2g dk %.2g "
           "dv %.2g of scale\n", B, S, H, KV, dk, dv, e[0], e[1], e[2], e[3], e[4]);

    /* bitwise repeatable: forward again, backward again from the same starting gradients */
    check(moe_cuda_attention_forward(gout, glse, gq, gk, gv, &a));
    float *rout = fetch(gout, no), *rl = fetch(glse, nl);
    assert_memory_equal(rout, hout, no * 4);
    assert_memory_equal(rl, hl, nl * 4);
    check(moe_cuda_to_device(gdq, dq0, nq * 4));
    check(moe_cuda_to_device(gdk, dk0, nk * 4));
    check(moe_cuda_to_device(gdv, dv0, nv * 4));
    check(moe_cuda_attention_backward(gdq, gdk, gdv, gdout, gout, glse, gq, gk, gv, &a, scratch));
    float *rdq = fetch(gdq, nq), *rdk = fetch(gdk, nk), *rdv = fetch(gdv, nv);
    assert_memory_equal(rdq, hdq, nq * 4);
    assert_memory_equal(rdk, hdk, nk * 4);
    assert_memory_equal(rdv, hdv, nv * 4);

    moe_cuda_free(gq), moe_cuda_free(gk), moe_cuda_free(gv), moe_cuda_free(gdout);
    moe_cuda_free(gout), moe_cuda_free(glse), moe_cuda_free(gdq), moe_cuda_free(gdk);
    moe_cuda_free(gdv), moe_cuda_free(scratch);
    free(q), free(k), free(v), free(dout), free(dq0), free(dk0), free(dv0), free(out);
    free(probs), free(dq), free(dkk), free(dvv), free(lse), free(hout), free(hl), free(hdq);
    free(hdk), free(hdv), free(rout), free(rl), free(rdq), free(rdk), free(rdv);
}

static void test_attention(void **state) {
    (void)state;
    uint64_t seed = tu_seed();
    /* heads up to 64 wide: tiles of 64 queries x 64 keys; 37 and 130 end in a partial tile */
    attention_case(2, 37, 4, 2, 16, 16, seed);
    attention_case(2, 130, 4, 2, 16, 16, seed + 1);
    attention_case(2, 37, 4, 2, 24, 40, seed + 2);
    attention_case(2, 130, 4, 2, 24, 40, seed + 3);
    attention_case(2, 65, 3, 3, 7, 9, seed + 4); /* one query head a kv head; odd widths */
    attention_case(3, 300, 8, 2, 64, 64, seed + 5); /* five tiles, four query heads a group */
    /* up to 128 wide */
    attention_case(3, 300, 8, 2, 128, 96, seed + 6);
    /* up to 256 wide: tiles of 32 */
    attention_case(1, 37, 2, 1, 192, 144, seed + 7);
    attention_case(2, 100, 4, 2, 256, 256, seed + 8);
    attention_case(1, 1, 2, 1, 16, 16, seed + 9); /* one token */
    moe_attn_dims bad = {1, 8, 3, 2, 16, 16, 0.25f}; /* H not a multiple of KV */
    assert_int_equal(moe_cuda_attention_forward(NULL, NULL, NULL, NULL, NULL, &bad),
                     MOE_ERR_INVALID);
    moe_attn_dims wide = {1, 8, 2, 2, 257, 16, 0.25f}; /* a head wider than 256 */
    assert_int_equal(moe_cuda_attention_forward(NULL, NULL, NULL, NULL, NULL, &wide),
                     MOE_ERR_INVALID);
}

/* Decoding's attention over a cache: n queries at positions P .. P + n - 1 over the keys and
 * values of positions 0 .. P + n - 1, against a float64 loop. */
static void cached_case(int n, int P, int H, int KV, int dk, int dv, uint64_t seed) {
    moe_attn_dims a = {1, n, H, KV, dk, dv, (float)(1 / sqrt((double)dk))};
    int rows = P + n, rep = H / KV;
    size_t nq = (size_t)n * H * dk, nk = (size_t)rows * KV * dk, nv = (size_t)rows * KV * dv,
           no = (size_t)n * H * dv;
    float *q = random_floats(nq, seed, 30, -1, 1), *k = random_floats(nk, seed, 31, -1, 1);
    float *v = random_floats(nv, seed, 32, -1, 1);
    double *ref = malloc(no * sizeof *ref), *s = malloc((size_t)rows * sizeof *s);
    assert_non_null(ref);
    assert_non_null(s);
    for (int i = 0; i < n; i++)
        for (int h = 0; h < H; h++) {
            const float *qi = q + ((size_t)i * H + h) * dk;
            double m = -INFINITY, sum = 0;
            for (int j = 0; j <= P + i; j++) {
                const float *kj = k + ((size_t)j * KV + h / rep) * dk;
                double dot = 0;
                for (int c = 0; c < dk; c++) dot += (double)qi[c] * kj[c];
                s[j] = (double)a.scale * dot;
                m = fmax(m, s[j]);
            }
            for (int j = 0; j <= P + i; j++) sum += s[j] = exp(s[j] - m);
            for (int c = 0; c < dv; c++) {
                double o = 0;
                for (int j = 0; j <= P + i; j++) o += s[j] * v[((size_t)j * KV + h / rep) * dv + c];
                ref[((size_t)i * H + h) * dv + c] = o / sum;
            }
        }
    float *gq = dev(q, nq * 4), *gk = dev(k, nk * 4), *gv = dev(v, nv * 4);
    size_t n_scratch = 300 * (size_t)n * H * (2 + dv); /* room for every split */
    float *gout = dev_poisoned(no), *scratch = dev_poisoned(n_scratch);
    /* one block per head and query; the keys split in up to 3 shares (the scratch's room); as
     * many shares as the keys and the GPU call for */
    for (int split = 0; split < 3; split++) {
        float *sc = split ? scratch : NULL;
        size_t ns = split == 0 ? 0 : split == 1 ? 3 * (size_t)n * H * (2 + dv) : n_scratch;
        check(moe_cuda_attention_cached(gout, gq, gk, gv, n, P, &a, sc, ns));
        float *hout = fetch(gout, no);
        char what[160];
        snprintf(what, sizeof what, "cached attention n %d P %d H %d KV %d dk %d dv %d%s", n, P,
                 H, KV, dk, dv, split == 1 ? ", keys in <= 3 shares" : split ? ", keys split" : "");
        printf("%s: %.2g of scale\n", what, close_to_ref(what, hout, ref, no));
        check(moe_cuda_attention_cached(gout, gq, gk, gv, n, P, &a, sc, ns)); /* repeatable */
        float *rout = fetch(gout, no);
        assert_memory_equal(rout, hout, no * 4);
        free(hout), free(rout);
    }
    moe_cuda_free(gq), moe_cuda_free(gk), moe_cuda_free(gv), moe_cuda_free(gout);
    moe_cuda_free(scratch);
    free(q), free(k), free(v), free(ref), free(s);
}

static void test_attention_cached(void **state) {
    (void)state;
    uint64_t seed = tu_seed();
    cached_case(1, 0, 4, 2, 16, 16, seed);       /* the first token: one key */
    cached_case(1, 5, 4, 2, 16, 16, seed + 1);   /* fewer keys than warps */
    cached_case(3, 37, 4, 2, 24, 40, seed + 2);  /* several queries after a prefix */
    cached_case(4, 300, 3, 3, 7, 9, seed + 3);   /* odd widths, one query head a kv head */
    cached_case(2, 130, 8, 2, 128, 96, seed + 4);
    cached_case(2, 61, 2, 1, 192, 144, seed + 5);
    cached_case(1, 1000, 4, 2, 256, 256, seed + 6);
    cached_case(1, 2000, 16, 4, 64, 64, seed + 7); /* decoding's shape: 16 shares of 126 keys */
    moe_attn_dims a = {1, 1, 4, 2, 16, 16, 0.25f};
    assert_int_equal(moe_cuda_attention_cached(NULL, NULL, NULL, NULL, 70000, 0, &a, NULL, 0),
                     MOE_ERR_INVALID);
}

/* ---------------------------------------------------------- cross-entropy */

static void test_xent(void **state) {
    (void)state;
    uint64_t seed = tu_seed();
    enum { T = 64, V = 300 };
    float *logits = random_floats((size_t)T * V, seed, 30, -4, 4);
    int32_t y[T];
    for (int t = 0; t < T; t++)
        y[t] = t % 5 == 2 ? -1 : (int32_t)(moe_rng_u64(seed, 31, (uint64_t)t) % V);
    y[7] = -7, y[T - 1] = V - 1, y[0] = 0;
    int n_cpu = 0;
    for (int t = 0; t < T; t++) n_cpu += y[t] >= 0;
    float scale = 1.0f / (float)n_cpu;
    float *dl = host_floats((size_t)T * V);
    double row[T];
    int n_ret = -1;
    double sum = moe_xent_forward_backward(dl, row, logits, y, T, V, scale, &n_ret);
    assert_int_equal(n_ret, n_cpu);

    float *glog = dev(logits, (size_t)T * V * 4), *gdl = dev_poisoned((size_t)T * V);
    int32_t *gy = dev(y, sizeof y);
    double *grow = dev(NULL, sizeof row), *gsum = dev(NULL, 8);
    int *gn = dev(NULL, sizeof(int));
    check(moe_cuda_xent(gdl, grow, gsum, gn, glog, gy, T, V, scale));
    float *hdl = fetch(gdl, (size_t)T * V);
    double hrow[T], hsum;
    int hn;
    check(moe_cuda_to_host(hrow, grow, sizeof hrow));
    check(moe_cuda_to_host(&hsum, gsum, 8));
    check(moe_cuda_to_host(&hn, gn, sizeof hn));
    double e = close_to("xent dlogits", hdl, dl, (size_t)T * V);
    assert_int_equal(hn, n_cpu);
    double rmax = 0, rerr = 0;
    for (int t = 0; t < T; t++) rmax = fmax(rmax, fabs(row[t]));
    for (int t = 0; t < T; t++) {
        if (!(fabs(hrow[t] - row[t]) <= TOL * rmax))
            fail_msg("xent row_loss[%d] %.9g on the GPU, %.9g on the CPU", t, hrow[t], row[t]);
        rerr = fmax(rerr, fabs(hrow[t] - row[t]) / rmax);
        if (y[t] < 0) { /* ignored rows: exactly 0 */
            assert_true(hrow[t] == 0);
            for (int j = 0; j < V; j++) assert_true(hdl[(size_t)t * V + j] == 0);
        }
    }
    if (!(fabs(hsum - sum) <= TOL * fabs(sum)))
        fail_msg("xent sum %.12g on the GPU, %.12g on the CPU", hsum, sum);
    printf("xent T %d V %d: dlogits %.2g row_loss %.2g sum %.2g of scale\n", T, V, e, rerr,
           fabs(hsum - sum) / fabs(sum));

    /* without dlogits: the same row losses and sum, bit for bit */
    double hrow2[T], hsum2;
    check(moe_cuda_xent(NULL, grow, gsum, gn, glog, gy, T, V, scale));
    check(moe_cuda_to_host(hrow2, grow, sizeof hrow2));
    check(moe_cuda_to_host(&hsum2, gsum, 8));
    assert_memory_equal(hrow2, hrow, sizeof hrow);
    assert_memory_equal(&hsum2, &hsum, 8);

    /* no rows: sum and count still written */
    check(moe_cuda_xent(NULL, grow, gsum, gn, glog, gy, 0, V, scale));
    check(moe_cuda_to_host(&hsum2, gsum, 8));
    check(moe_cuda_to_host(&hn, gn, sizeof hn));
    assert_true(hsum2 == 0);
    assert_int_equal(hn, 0);

    moe_cuda_free(glog), moe_cuda_free(gdl), moe_cuda_free(gy), moe_cuda_free(grow);
    moe_cuda_free(gsum), moe_cuda_free(gn);
    free(logits), free(dl), free(hdl);
}

/* ------------------------------------------------------ embedding, addition */

static void test_embed(void **state) {
    (void)state;
    uint64_t seed = tu_seed();
    enum { V = 50, D = 200, T = 300 }; /* tokens repeat; more than one block of tokens */
    size_t ne = (size_t)V * D, nx = (size_t)T * D;
    float *emb = random_floats(ne, seed, 40, -1, 1), *dx = random_floats(nx, seed, 41, -1, 1);
    float *g0 = random_floats(ne, seed, 42, -1, 1);
    int32_t tok[T];
    for (int t = 0; t < T; t++) tok[t] = (int32_t)(moe_rng_u64(seed, 43, (uint64_t)t) % V);
    tok[1] = tok[0], tok[T - 1] = tok[0];
    /* the CPU model's loops: rows copied; gradients added in token order */
    float *x = host_floats(nx), *g = copy_floats(g0, ne);
    for (int t = 0; t < T; t++) memcpy(x + (size_t)t * D, emb + (size_t)tok[t] * D, D * 4);
    for (int t = 0; t < T; t++)
        for (int i = 0; i < D; i++) g[(size_t)tok[t] * D + i] += dx[(size_t)t * D + i];

    float *gemb = dev(emb, ne * 4), *gdx = dev(dx, nx * 4), *gg = dev(g0, ne * 4);
    float *gx = dev_poisoned(nx);
    int32_t *gtok = dev(tok, sizeof tok);
    check(moe_cuda_embed_forward(gx, gemb, gtok, T, D));
    check(moe_cuda_embed_backward(gg, gdx, gtok, T, D));
    float *hx = fetch(gx, nx), *hg = fetch(gg, ne);
    assert_memory_equal(hx, x, nx * 4);
    assert_memory_equal(hg, g, ne * 4); /* the CPU's additions in the CPU's order */
    check(moe_cuda_to_device(gg, g0, ne * 4));
    check(moe_cuda_embed_backward(gg, gdx, gtok, T, D));
    float *hg2 = fetch(gg, ne);
    assert_memory_equal(hg2, hg, ne * 4);

    /* y = a + b, y aliasing a */
    float *sum = host_floats(nx);
    for (size_t i = 0; i < nx; i++) sum[i] = x[i] + dx[i];
    check(moe_cuda_add(gx, gx, gdx, nx));
    float *hs = fetch(gx, nx);
    assert_memory_equal(hs, sum, nx * 4);

    moe_cuda_free(gemb), moe_cuda_free(gdx), moe_cuda_free(gg), moe_cuda_free(gx);
    moe_cuda_free(gtok);
    free(emb), free(dx), free(g0), free(x), free(g), free(hx), free(hg), free(hg2), free(sum);
    free(hs);
}

int main(void) {
    if (moe_cuda_device_count() < 1) {
        printf("test_cuda_nn: skipped: %s\n", moe_cuda_device_name());
        return 77;
    }
    printf("GPU: %s\n", moe_cuda_device_name());
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_rmsnorm), cmocka_unit_test(test_rope),
                                       cmocka_unit_test(test_attention),
                                       cmocka_unit_test(test_attention_cached),
                                       cmocka_unit_test(test_xent), cmocka_unit_test(test_embed)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
