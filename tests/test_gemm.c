/* GEMM wrappers: fp32 and fp64 (OpenBLAS, C split over the threads by rows or by columns, or
 * one call; oneDNN's matmul and our AVX-512 tiles as the experts use them inside a parallel
 * region; our AVX2 dot products) and bf16 with fp32 accumulation (oneDNN) against float64
 * products, every transpose, beta 0 and 1, leading dimensions wider than the rows; bf16
 * rounding. */
#include "kernels/kernels.h"
#include "test_util.h"

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

/* C = alpha op(A) op(B) + beta C0 in float64; also sum |a||b| per entry for the tolerance. */
static void ref_gemm(int ta, int tb, int m, int n, int k, double alpha, const double *A, int lda,
                     const double *B, int ldb, double beta, const double *C0, double *C,
                     double *mag, int ldc) {
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) {
            double s = 0, g = 0;
            for (int p = 0; p < k; p++) {
                double a = ta ? A[(size_t)p * lda + i] : A[(size_t)i * lda + p];
                double b = tb ? B[(size_t)j * ldb + p] : B[(size_t)p * ldb + j];
                s += a * b;
                g += fabs(a * b);
            }
            C[(size_t)i * ldc + j] = alpha * s + beta * C0[(size_t)i * ldc + j];
            mag[(size_t)i * ldc + j] = fabs(alpha) * g + fabs(beta * C0[(size_t)i * ldc + j]);
        }
}

enum { FP32, FP64, BF16, DNNL_FP32, SMALL, BLAS_FP32, DOT_AVX2 };

/* alpha: moe_gemm, moe_gemm_blas and moe_gemm64 only (the others have none: 1). */
static void run_alpha(int kind, int ta, int tb, int beta, int m, int n, int k, double alpha,
                      uint64_t seed) {
    int bf16 = kind == BF16;
    int lda = (ta ? m : k) + 3, ldb = (tb ? k : n) + 5, ldc = n + 2;
    size_t na = (size_t)(ta ? k : m) * lda, nb = (size_t)(tb ? n : k) * ldb, nc = (size_t)m * ldc;
    float *A = malloc(na * 4), *B = malloc(nb * 4), *C = malloc(nc * 4);
    uint16_t *Ah = malloc(na * 2), *Bh = malloc(nb * 2);
    double *A64 = malloc(na * 8), *B64 = malloc(nb * 8), *C0 = calloc(nc, 8), *R = malloc(nc * 8),
           *G = malloc(nc * 8), *C64 = malloc(nc * 8);
    tu_fill(A, na, seed, 1, -1, 1);
    tu_fill(B, nb, seed, 2, -1, 1);
    tu_fill(C, nc, seed, 3, -1, 1);
    if (bf16) { /* the reference multiplies the rounded inputs */
        moe_f32_to_bf16(A, Ah, na);
        moe_f32_to_bf16(B, Bh, nb);
        moe_bf16_to_f32(Ah, A, na);
        moe_bf16_to_f32(Bh, B, nb);
    }
    for (size_t i = 0; i < na; i++) A64[i] = A[i];
    for (size_t i = 0; i < nb; i++) B64[i] = B[i];
    for (size_t i = 0; i < nc; i++) C0[i] = C[i];
    memcpy(C64, C0, nc * 8);
    ref_gemm(ta, tb, m, n, k, alpha, A64, lda, B64, ldb, beta, C0, R, G, ldc);
    if (bf16)
        assert_int_equal(moe_gemm_bf16(ta, tb, m, n, k, Ah, lda, Bh, ldb, (float)beta, C, ldc), MOE_OK);
    else if (kind == DNNL_FP32)
        assert_int_equal(moe_gemm_dnnl(ta, tb, m, n, k, A, lda, B, ldb, (float)beta, C, ldc), MOE_OK);
    else if (kind == SMALL)
        assert_int_equal(moe_gemm_small(ta, tb, m, n, k, A, lda, B, ldb, (float)beta, C, ldc),
                         MOE_OK);
    else if (kind == FP64)
        moe_gemm64(ta, tb, m, n, k, alpha, A64, lda, B64, ldb, beta, C64, ldc);
    else if (kind == BLAS_FP32)
        moe_gemm_blas(ta, tb, m, n, k, (float)alpha, A, lda, B, ldb, (float)beta, C, ldc);
    else if (kind == DOT_AVX2)
        assert_int_equal(moe_gemm_dot_avx2(m, n, k, A, lda, B, ldb, (float)beta, C, ldc), 1);
    else
        moe_gemm(ta, tb, m, n, k, (float)alpha, A, lda, B, ldb, (float)beta, C, ldc);
    if (kind != FP64)
        for (size_t i = 0; i < nc; i++) C64[i] = C[i];
    /* accumulation of k products: the bound k u sum|a b| (u = 2^-24 or 2^-53), doubled */
    double u = kind == FP64 ? 0x1p-53 : 0x1p-24;
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) {
            size_t at = (size_t)i * ldc + j;
            if (fabs(C64[at] - R[at]) > 2 * u * (k + 1) * G[at])
                fail_msg("%s ta=%d tb=%d beta=%d m=%d n=%d k=%d: C[%d,%d] = %.17g, expected %.17g",
                         bf16                ? "bf16"
                         : kind == DNNL_FP32 ? "oneDNN fp32"
                         : kind == SMALL     ? "small"
                         : kind == BLAS_FP32 ? "OpenBLAS fp32"
                         : kind == DOT_AVX2  ? "AVX2 dot products"
                         : kind == FP64      ? "fp64"
                                             : "fp32",
                         ta, tb, beta, m, n, k, i, j, C64[at], R[at]);
        }
    for (int i = 0; i < m; i++) /* the padding columns are not touched */
        for (int j = n; j < ldc; j++) assert_true(C64[(size_t)i * ldc + j] == C0[(size_t)i * ldc + j]);
    free(A), free(B), free(C), free(Ah), free(Bh), free(A64), free(B64), free(C0), free(R), free(G);
    free(C64);
}

static void run_shape(int kind, int ta, int tb, int beta, int m, int n, int k, uint64_t seed) {
    run_alpha(kind, ta, tb, beta, m, n, k, 1.0, seed);
}

static void run(int kind, int ta, int tb, int beta, uint64_t seed) {
    run_shape(kind, ta, tb, beta, 37, 29, 53, seed);
}

/* moe_gemm, moe_gemm64 and moe_gemm_blas (OpenBLAS alone, also where moe_gemm takes oneDNN)
 * outside a parallel region: C split by rows (more rows than columns), by columns, or one call
 * (both below 32), with alpha 1 and not; NT with at most MOE_GEMM_DOT_ROWS rows (moe_gemm's
 * dot products, the weight rows split over the threads: n = 300, 203 with n k past two parts of
 * 64 K; one part: n = 50). */
static void test_fp32(void **state) {
    (void)state;
    static const int shapes[][3] = {{37, 29, 53}, {29, 70, 41}, {5, 7, 3},
                                    {1, 300, 520}, {3, 203, 1100}, {4, 50, 33}};
    static const double alphas[] = {1.0, -0.75, 1.0, 1.0, 1.0, 1.0};
    static const int kinds[] = {FP32, FP64, BLAS_FP32};
    uint64_t seed = tu_seed();
    for (int kind = 0; kind < 3; kind++)
        for (int q = 0; q < 6; q++)
            for (int c = 0; c < 8; c++)
                run_alpha(kinds[kind], c & 1, (c >> 1) & 1, c >> 2, shapes[q][0], shapes[q][1],
                          shapes[q][2], alphas[q], seed++);
}

/* oneDNN's fp32 matmul; then more shapes (n and the leading dimensions) than its cache of
 * primitives holds: those past it are made for their one call and destroyed after it. */
static void test_dnnl_fp32(void **state) {
    (void)state;
    if (!moe_gemm_dnnl_available()) skip(); /* built without oneDNN */
    for (int c = 0; c < 8; c++)
        run(DNNL_FP32, c & 1, (c >> 1) & 1, c >> 2, tu_seed() + 100 + (uint64_t)c);
    for (int n = 1; n <= 72; n++)
        run_shape(DNNL_FP32, n % 3 == 1, 0, n & 1, 3, n, 5, tu_seed() + 200 + (uint64_t)n);
}

/* Shapes that reach every tile of gemm_small.c: rows beyond one 64-row block (NT; beyond three
 * of them) and one 12-row tile, 1 to 4 vectors and partial vectors, k beyond one block (64 for
 * NN, 1024 for NT) and shorter than the prefetch distance; NT's blocks of 8 rows by pairs of k
 * (k even, blocks of at most 56 rows) with 1 to 7 such vectors (m = 8, 16, 21, 30, 40, 44, 49),
 * partial (150 = 64 + 64 + 22, the last two blocks together panel by panel) and whole (56),
 * a last block of 1-4 rows as dot products beside the block before it (66, 68 with k past
 * 1024),
 * and NT in whole vectors with k odd (203 = 3 x 64 + 11) or 57-64 rows (60, and the 64-row
 * blocks of 150); NT's
 * columns in several panels of 48, the last one partial (n = 77, 97, 130, 200); NT with 1-4
 * rows (dot products: 8 or 4 weight rows at a time and the rest one by one, k past the
 * prefetch distance and not a multiple of 16); TN (copied operands) with k past one block of
 * 128 and past two, columns past one block of 1024 and a last row tile of 5; then random
 * shapes. */
static void test_small(void **state) {
    (void)state;
    if (!moe_gemm_small_available()) skip(); /* no AVX-512 */
    static const int shapes[][3] = {{37, 29, 53}, {150, 77, 600}, {5, 200, 3}, {64, 33, 129},
                                    {16, 1, 700}, {1, 16, 1}, {49, 64, 1100}, {13, 130, 65},
                                    {203, 97, 515}, {40, 29, 96}, {8, 37, 64}, {7, 130, 2},
                                    {1, 29, 300}, {2, 19, 17}, {3, 11, 5}, {4, 70, 129},
                                    {21, 1100, 260}, {16, 50, 40},  {30, 45, 130}, {44, 100, 34},
                                    {56, 20, 8},     {60, 30, 20},  {66, 50, 130}, {68, 40, 1100}};
    uint64_t seed = tu_seed() + 200;
    for (size_t q = 0; q < sizeof shapes / sizeof *shapes; q++)
        for (int c = 0; c < 6; c++)
            run_shape(SMALL, c % 3 == 1, c % 3 == 2, c >= 3, shapes[q][0], shapes[q][1],
                      shapes[q][2], seed++);
    for (int t = 0; t < 12; t++) {
        int m = 1 + (int)(moe_rng_u64(seed, 9, 3 * t) % 140);
        int n = 1 + (int)(moe_rng_u64(seed, 9, 3 * t + 1) % 140);
        int k = 1 + (int)(moe_rng_u64(seed, 9, 3 * t + 2) % 700);
        run_shape(SMALL, t % 3 == 1, t % 3 == 2, t & 1, m, n, k, seed + 1 + (uint64_t)t);
    }
    float a = 1, b = 1, c = 0; /* both transposed: refused */
    assert_int_equal(moe_gemm_small(1, 1, 1, 1, 1, &a, 1, &b, 1, 0.0f, &c, 1), MOE_ERR_INVALID);
}

/* One moe_gemm_cached call against float64: A (or A^T) read by strides, B by rows or given
 * transposed (bt), beta 0 or 1, leading dimensions wider than the rows. With tri, A's part
 * that the mode declares zero is zero, and where no tile (at most 16 rows, 64 columns) may
 * reach it, NaN; with MOE_TRI_COLS C's columns past any tile's reach keep their values and the
 * others past row i + off are not compared. */
static void cached_case(int ta, int bt, int beta1, int m, int n, int k, moe_tri tri, int off,
                        uint64_t seed) {
    int lda = (ta ? m : k) + 3, ldb = (bt ? k : n) + 5, ldc = n + 2;
    size_t na = (size_t)(ta ? k : m) * lda, nb = (size_t)(bt ? n : k) * ldb, nc = (size_t)m * ldc;
    float *A = malloc(na * 4), *B = malloc(nb * 4), *C = malloc(nc * 4), *C0 = malloc(nc * 4);
    tu_fill(A, na, seed, 1, -1, 1);
    tu_fill(B, nb, seed, 2, -1, 1);
    tu_fill(C, nc, seed, 3, -1, 1);
    memcpy(C0, C, nc * 4);
    for (int i = 0; i < m; i++)
        for (int p = 0; p < k; p++) {
            float *a = &A[ta ? (size_t)p * lda + i : (size_t)i * lda + p];
            int zero = (tri == MOE_TRI_K_BELOW && p >= i + off) ||
                       (tri == MOE_TRI_K_FROM && p < i + off);
            int unread = (tri == MOE_TRI_K_BELOW && p >= i + off + 15) ||
                         (tri == MOE_TRI_K_FROM && p < i + off - 15);
            if (zero) *a = unread ? NAN : 0.0f;
        }
    assert_int_equal(moe_gemm_cached(m, n, k, A, ta ? 1 : lda, ta ? lda : 1, B, ldb, bt, beta1, C,
                                     ldc, tri, off), 1);
    for (int i = 0; i < m; i++)
        for (int j = 0; j < ldc; j++) {
            size_t at = (size_t)i * ldc + j;
            if (j >= n || (tri == MOE_TRI_COLS && j >= i + off + 32)) { /* untouched */
                assert_true(C[at] == C0[at]);
                continue;
            }
            if (tri == MOE_TRI_COLS && j >= i + off) continue;
            double s = beta1 ? C0[at] : 0, g = fabs(s);
            for (int p = 0; p < k; p++) {
                double a = ta ? A[(size_t)p * lda + i] : A[(size_t)i * lda + p];
                double b = bt ? B[(size_t)j * ldb + p] : B[(size_t)p * ldb + j];
                if (a == 0 || a != a) continue; /* the zero part */
                s += a * b;
                g += fabs(a * b);
            }
            if (!(fabs(C[at] - s) <= 2 * 0x1p-24 * (k + 1) * g))
                fail_msg("cached ta=%d bt=%d beta=%d m=%d n=%d k=%d tri=%d off=%d: C[%d,%d] = "
                         "%.9g, expected %.9g", ta, bt, beta1, m, n, k, (int)tri, off, i, j,
                         C[at], s);
        }
    free(A), free(B), free(C), free(C0);
}

/* moe_gemm_cached: 1-4 vectors of columns and partial ones, past one chunk of 64 (n = 80,
 * 130), rows past one tile of every height (6, 8, 12, 16 by width), k past 64 and past one
 * block of 256 (two, three blocks); each tri mode
 * with offsets that skip nothing, part of every row, whole tiles (negative, past k) and
 * everything. B given transposed with k past its scratch (1024): not done, nothing written. */
static void test_cached(void **state) {
    (void)state;
    float a = 1, b = 1, c = 5;
    if (!moe_gemm_small_available()) { /* no AVX-512: nothing done */
        assert_int_equal(moe_gemm_cached(1, 1, 1, &a, 1, 1, &b, 1, 0, 0, &c, 1, MOE_TRI_NONE, 0), 0);
        assert_true(c == 5);
        skip();
    }
    static const int shapes[][3] = {{64, 64, 32}, {37, 29, 53}, {50, 130, 70}, {13, 80, 129},
                                    {29, 16, 3}, {1, 47, 64}, {70, 32, 64}, {17, 7, 1},
                                    {20, 40, 600}, {9, 64, 300}};
    static const int offs[4][4] = {{0, 0, 0, 0}, {1, 17, -3, 200}, {1, -5, 270, 700},
                                   {0, -20, 260, 700}};
    uint64_t seed = tu_seed() + 500;
    for (size_t q = 0; q < sizeof shapes / sizeof *shapes; q++)
        for (int tri = 0; tri < 4; tri++)
            for (int o = 0; o < (tri ? 4 : 1); o++)
                for (int c8 = 0; c8 < 8; c8++)
                    cached_case(c8 & 1, (c8 >> 1) & 1, c8 >> 2, shapes[q][0], shapes[q][1],
                                shapes[q][2], (moe_tri)tri, offs[tri][o], seed++);
    float big[1100] = {0};
    assert_int_equal(moe_gemm_cached(1, 1, 1100, big, 1, 1, big, 1100, 1, 0, &c, 1,
                                     MOE_TRI_NONE, 0), 0);
    assert_true(c == 5);
}

/* The AVX2 dot products (NT with 1-4 rows, CPUs without AVX-512) on any CPU that has AVX2:
 * k below, at and past one step of 16 and one vector of 8 (masked ends), 8, 4 or 2 weight rows at
 * a time and the rest one by one, the weight rows split over the threads (n = 300, 203); more
 * than MOE_GEMM_DOT_ROWS rows or another beta: not done, nothing written. */
static void test_dot_avx2(void **state) {
    (void)state;
    float a = 1, b = 2, c = 3;
    if (!moe_gemm_dot_avx2(1, 1, 1, &a, 1, &b, 1, 0.0f, &c, 1)) skip(); /* no AVX2 */
    assert_true(c == 2);
    static const int shapes[][3] = {{1, 300, 520}, {2, 37, 129}, {3, 11, 5},  {4, 70, 33},
                                    {1, 9, 16},    {2, 203, 700}, {3, 29, 8}, {4, 7, 1100},
                                    {1, 3, 1},    {2, 1, 15},   {3, 64, 31}, {4, 130, 48}};
    uint64_t seed = tu_seed() + 300;
    for (size_t q = 0; q < sizeof shapes / sizeof *shapes; q++)
        for (int beta = 0; beta < 2; beta++)
            run_shape(DOT_AVX2, 0, 1, beta, shapes[q][0], shapes[q][1], shapes[q][2], seed++);
    float big[5 * 4] = {0}, out[5 * 4];
    memcpy(out, big, sizeof out);
    assert_int_equal(moe_gemm_dot_avx2(5, 4, 4, big, 4, big, 4, 0.0f, out, 4), 0);
    assert_int_equal(moe_gemm_dot_avx2(1, 4, 4, big, 4, big, 4, 0.5f, out, 4), 0);
}

/* oneDNN, and NT with 1-4 rows as our dot products (vdpbf16ps where the CPU has it): 8 or 4
 * weight rows at a time and the rest one by one, k odd and past one vector, the weight rows
 * split over the threads (n = 300). */
static void test_bf16(void **state) {
    (void)state;
    if (!moe_gemm_bf16_available()) skip();
    for (int c = 0; c < 8; c++) run(BF16, c & 1, (c >> 1) & 1, c >> 2, tu_seed() + (uint64_t)c);
    static const int shapes[][3] = {{1, 300, 520}, {2, 37, 129}, {3, 11, 5}, {4, 70, 33}};
    for (int q = 0; q < 4; q++)
        for (int beta = 0; beta < 2; beta++)
            run_shape(BF16, 0, 1, beta, shapes[q][0], shapes[q][1], shapes[q][2],
                      tu_seed() + 20 + (uint64_t)(2 * q + beta));
}

/* bf16 keeps the top 16 bits, rounding to nearest, ties to even. */
static void test_bf16_rounding(void **state) {
    (void)state;
    const float x[6] = {1.0f, 1.0f + 0x1p-8f, 1.0f + 0x3p-8f, 1.0f + 0x1p-9f + 0x1p-20f, -2.5f, INFINITY};
    const uint16_t want[6] = {0x3F80, 0x3F80 /* tie: even */, 0x3F82 /* tie: up to even */,
                              0x3F80 /* below half: down */, 0xC020, 0x7F80};
    uint16_t y[6];
    moe_f32_to_bf16(x, y, 6);
    for (int i = 0; i < 6; i++)
        if (y[i] != want[i]) fail_msg("%g -> 0x%04x, expected 0x%04x", x[i], y[i], want[i]);
    float nan = NAN, back;
    uint16_t h;
    moe_f32_to_bf16(&nan, &h, 1);
    moe_bf16_to_f32(&h, &back, 1);
    assert_true(isnan(back));
    /* random bit patterns (NaNs, infinities, subnormals, every exponent) and ties, 16 at a
     * time and the tail, against the nearest of the two bf16 neighbours by their distance in
     * double (ties to the even one; past the largest finite value the upper neighbour is
     * 2^128, i.e. infinity) */
    enum { N = 1031 };
    uint32_t u[N];
    float xs[N];
    uint16_t ys[N];
    uint64_t seed = tu_seed() + 300;
    for (int i = 0; i < N; i++) {
        u[i] = (uint32_t)moe_rng_u64(seed, 1, (uint64_t)i);
        if (i % 5 == 0) u[i] = (u[i] & 0xFFFF0000u) | 0x8000u; /* exactly halfway */
        memcpy(&xs[i], &u[i], 4);
    }
    static const uint32_t special[] = {0x7F800001u, 0xFF800100u, 0x7F7FFFFFu, 0x7F7F8000u,
                                       0x00018000u, 0x80008000u, 0x7F800000u, 0u};
    for (int i = 0; i < 8; i++) u[3 * i + 1] = special[i], memcpy(&xs[3 * i + 1], &u[3 * i + 1], 4);
    moe_f32_to_bf16_serial(xs, ys, N);
    for (int i = 0; i < N; i++) {
        uint32_t mag = u[i] & 0x7FFFFFFFu, sign = u[i] >> 31;
        if (mag > 0x7F800000u) { /* NaN: a NaN of the same sign */
            if ((ys[i] & 0x7F80) != 0x7F80 || !(ys[i] & 0x7F) || (uint32_t)(ys[i] >> 15) != sign)
                fail_msg("NaN 0x%08x -> 0x%04x", u[i], ys[i]);
            continue;
        }
        uint32_t lo = mag >> 16, hi = lo + 1, b;
        float flo, fhi;
        uint32_t blo = lo << 16, bhi = hi << 16;
        memcpy(&flo, &blo, 4), memcpy(&fhi, &bhi, 4);
        double x = fabs((double)xs[i]), dlo = x - flo;
        double dhi = (hi == 0x7F80 ? ldexp(1.0, 128) : (double)fhi) - x;
        if (mag == 0x7F800000u) b = lo; /* infinity */
        else b = dlo < dhi ? lo : dhi < dlo ? hi : (lo & 1) ? hi : lo;
        b |= sign << 15;
        if (ys[i] != b) fail_msg("0x%08x (%g) -> 0x%04x, expected 0x%04x", u[i], xs[i], ys[i], b);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_fp32), cmocka_unit_test(test_dnnl_fp32),
                                       cmocka_unit_test(test_small),
                                       cmocka_unit_test(test_cached),
                                       cmocka_unit_test(test_dot_avx2),
                                       cmocka_unit_test(test_bf16),
                                       cmocka_unit_test(test_bf16_rounding)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
