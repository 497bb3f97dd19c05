/* The counter-based generator: a pure function of (seed, stream, index) with the right
 * distributions. */
#include "test_util.h"

#include "core/core.h"
#include "moe.h"

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>

#include <cmocka.h>

static void test_pure_function(void **state) {
    (void)state;
    uint64_t seed = tu_seed();
    enum { N = 1000 };
    uint64_t fwd[N], s = moe_rng_stream(MOE_RNG_DATA, 3, 5, 7);
    for (int i = 0; i < N; i++) fwd[i] = moe_rng_u64(seed, s, (uint64_t)i);
    for (int i = N - 1; i >= 0; i--) assert_true(moe_rng_u64(seed, s, (uint64_t)i) == fwd[i]);
    int same_seed = 0, same_stream = 0, same_next = 0;
    for (int i = 0; i < N; i++) {
        same_seed += moe_rng_u64(seed + 1, s, (uint64_t)i) == fwd[i];
        same_stream += moe_rng_u64(seed, s + 1, (uint64_t)i) == fwd[i];
        same_next += i + 1 < N && fwd[i + 1] == fwd[i];
    }
    assert_int_equal(same_seed + same_stream + same_next, 0);
}

static void test_streams_distinct(void **state) {
    (void)state;
    uint64_t seen[7 * 4 * 4 * 2];
    int n = 0;
    for (int p = 1; p <= 7; p++)
        for (uint64_t a = 0; a < 4; a++)
            for (uint64_t b = 0; b < 4; b++)
                for (uint64_t c = 0; c < 2; c++) seen[n++] = moe_rng_stream((moe_rng_purpose)p, a, b, c);
    for (int i = 0; i < n; i++)
        for (int j = i + 1; j < n; j++)
            if (seen[i] == seen[j]) fail_msg("streams %d and %d collide", i, j);
}

/* Mean and variance within 5 standard errors: uniform 1/2, 1/12; normal 0, 1. */
static void test_distributions(void **state) {
    (void)state;
    uint64_t seed = tu_seed();
    enum { N = 200000 };
    double su = 0, su2 = 0, sf = 0, sn = 0, sn2 = 0, sn4 = 0;
    for (int i = 0; i < N; i++) {
        double u = moe_rng_uniform64(seed, 1, (uint64_t)i);
        float f = moe_rng_uniform(seed, 2, (uint64_t)i);
        assert_true(u >= 0 && u < 1 && f >= 0.0f && f < 1.0f);
        /* the top 53 bits, converted exactly (rng.c converts them in two halves) */
        if (u != (double)(moe_rng_u64(seed, 1, (uint64_t)i) >> 11) * 0x1p-53)
            fail_msg("uniform64 %d: %.17g is not the top 53 bits of its word", i, u);
        double z = moe_rng_normal(seed, 3, (uint64_t)i);
        su += u, su2 += u * u, sf += f, sn += z, sn2 += z * z, sn4 += z * z * z * z;
    }
    double mu = su / N, var = su2 / N - mu * mu;
    assert_true(fabs(mu - 0.5) < 5 * sqrt(1.0 / 12 / N));
    assert_true(fabs(var - 1.0 / 12) < 5 * sqrt(1.0 / 180 / N)); /* Var((u-1/2)^2) = 1/80 - 1/144 = 1/180 */
    assert_true(fabs(sf / N - 0.5) < 5 * sqrt(1.0 / 12 / N));
    double mn = sn / N, vn = sn2 / N - mn * mn;
    assert_true(fabs(mn) < 5 / sqrt((double)N));
    assert_true(fabs(vn - 1) < 5 * sqrt(2.0 / N));
    assert_true(fabs(sn4 / N - 3) < 5 * sqrt(96.0 / N)); /* fourth moment of N(0,1) is 3 */
}

/* The normal against Box-Muller in 80-bit long double on the same uniforms (its log and cos are
 * our own series): within 4e-15 absolute, |z| reaching 8.6 (1.2e-15 measured). Uniforms at the
 * ends and at the octant boundaries of the cosine included. The float fill equals the scalar
 * value times the scale, at any offset and length, on the threads. */
static void test_normal_values(void **state) {
    (void)state;
    uint64_t seed = tu_seed();
    enum { N = 300000 };
    const double ends[] = {0, 0x1p-53, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875,
                           1 - 0x1p-53, 0.5 - 0x1p-53};
    const int n_ends = (int)(sizeof ends / sizeof *ends);
    for (int i = 0; i < N; i++) {
        uint64_t s = (uint64_t)i % 7;
        double u1 = moe_rng_uniform64(seed, s, 2 * (uint64_t)i);
        double u2 = moe_rng_uniform64(seed, s, 2 * (uint64_t)i + 1);
        double z = moe_rng_normal(seed, s, (uint64_t)i);
        long double pi2 = 6.283185307179586476925286766559L;
        long double ref = sqrtl(-2.0L * logl(1.0L - u1)) * cosl(pi2 * u2);
        if (fabsl(z - ref) > 4e-15L) fail_msg("normal %d: %.17g, long double %.17Lg", i, z, ref);
    }
    for (int a = 0; a < n_ends; a++)
        for (int b = 0; b < n_ends; b++) {
            long double pi2 = 6.283185307179586476925286766559L;
            long double ref = sqrtl(-2.0L * logl(1.0L - ends[a])) * cosl(pi2 * ends[b]);
            double z = moe_box_muller(ends[a], ends[b]);
            if (fabsl(z - ref) > 4e-15L)
                fail_msg("u1 %.17g u2 %.17g: %.17g, long double %.17Lg", ends[a], ends[b], z, ref);
        }
    float *out = malloc(sizeof(float) * 50000);
    assert_non_null(out);
    const size_t starts[] = {0, 3, 4095, 123457}, lens[] = {1, 4097, 50000};
    for (int a = 0; a < 4; a++)
        for (int b = 0; b < 3; b++) {
            for (size_t i = 0; i < lens[b]; i++) out[i] = NAN;
            moe_rng_normal_floats(seed, 5, starts[a], lens[b], 0.02f, out);
            for (size_t i = 0; i < lens[b]; i++)
                if (out[i] != 0.02f * (float)moe_rng_normal(seed, 5, starts[a] + i))
                    fail_msg("fill from %zu: value %zu differs", starts[a], i);
        }
    free(out);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pure_function),
        cmocka_unit_test(test_streams_distinct),
        cmocka_unit_test(test_distributions),
        cmocka_unit_test(test_normal_values),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
