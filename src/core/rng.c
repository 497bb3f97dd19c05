/* Counter-based RNG: a keyed hash of (seed, stream, index), built from the SplitMix64
 * finaliser applied over a Weyl-sequence mix of the words. No state: a value never depends
 * on call order, threads or ranks. tests/test_rng.c checks its moments and independence. */
#include "core/core.h"
#include "moe.h"

#include <math.h>
#include <string.h>

static uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

uint64_t moe_rng_stream(moe_rng_purpose purpose, uint64_t a, uint64_t b, uint64_t c) {
    uint64_t h = mix64((uint64_t)purpose * 0x9e3779b97f4a7c15ULL + 0x632be59bd9b4e019ULL);
    h = mix64(h ^ (a + 0x9e3779b97f4a7c15ULL));
    h = mix64(h ^ (b + 0xd1b54a32d192ed03ULL));
    h = mix64(h ^ (c + 0x8cb92ba72f3d8dd7ULL));
    return h;
}

uint64_t moe_rng_u64(uint64_t seed, uint64_t stream, uint64_t index) {
    uint64_t h = mix64(seed * 0x9e3779b97f4a7c15ULL ^ stream);
    return mix64(h + (index + 1) * 0x9e3779b97f4a7c15ULL);
}

float moe_rng_uniform(uint64_t seed, uint64_t stream, uint64_t index) {
    return (float)(moe_rng_u64(seed, stream, index) >> 40) * (1.0f / 16777216.0f);
}

/* (double)v for v < 2^52, exactly, from the bits (2^52 + v, less 2^52): int64-to-double
 * conversions have no vector instruction below AVX-512, so loops that use this vectorise where
 * (double)v would not. */
static inline double small_to_double(uint64_t v) {
    uint64_t b = v | 0x4330000000000000ull;
    double d;
    memcpy(&d, &b, sizeof d);
    return d - 4503599627370496.0;
}

/* The top 53 bits of x as a uniform multiple of 2^-53 in [0, 1): (x >> 11) 2^-53, converted in
 * two exact halves. */
static inline double unit53(uint64_t x) {
    uint64_t v = x >> 11;
    return (small_to_double(v >> 32) * 4294967296.0 + small_to_double(v & 0xffffffffu)) *
           (1.0 / 9007199254740992.0);
}

double moe_rng_uniform64(uint64_t seed, uint64_t stream, uint64_t index) {
    return unit53(moe_rng_u64(seed, stream, index));
}

/* log y for y in [2^-53, 1] (1 - a 53-bit uniform), written so that loops over it vectorise
 * (libm's log is a scalar call): y = 2^e m with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh s
 * with s = (m - 1) / (m + 1), |s| < 0.172, by its series to s^21 (truncation below 3e-17). */
static inline double log_unit(double y) {
    uint64_t b;
    memcpy(&b, &y, sizeof b);
    double e = small_to_double(b >> 52) - 1023;
    b = (b & 0x000FFFFFFFFFFFFFull) | 0x3FF0000000000000ull;
    double m;
    memcpy(&m, &b, sizeof m);
    int up = m > 1.4142135623730951;
    m = up ? 0.5 * m : m;
    e = up ? e + 1 : e;
    static const double atanh_series[11] = {1.0 / 21, 1.0 / 19, 1.0 / 17, 1.0 / 15,
                                            1.0 / 13, 1.0 / 11, 1.0 / 9,  1.0 / 7,
                                            1.0 / 5,  1.0 / 3,  1.0};
    double s = (m - 1) / (m + 1), p = moe_poly(atanh_series, 11, s * s);
    /* e ln2 in two parts, the first exact for |e| < 2^11 */
    return e * 6.93147180369123816490e-01 + (e * 1.90821492927058770002e-10 + 2 * s * p);
}

/* cos 2 pi u for u in [0, 1), vectorisable: u = q / 4 + r with q the nearest integer to 4u and
 * r in [-1/8, 1/8] (exact: u is a multiple of 2^-53), then cos or sin of 2 pi r by their series
 * to the 16th and 17th power (truncation below 1e-17), sign and function by q mod 4. */
static inline double cos_2pi(double u) {
    const double shifter = 6755399441055744.0; /* 1.5 * 2^52: adding it rounds to an integer */
    double t = 4 * u + shifter, q = t - shifter, x = (u - 0.25 * q) * 6.283185307179586477;
    uint64_t qb;
    memcpy(&qb, &t, sizeof qb);
    static const double cos_series[9] = {1.0 / 20922789888000, -1.0 / 87178291200,
                                         1.0 / 479001600,      -1.0 / 3628800,
                                         1.0 / 40320,          -1.0 / 720,
                                         1.0 / 24,             -0.5,
                                         1.0}; /* 1/16! ... 1/0!, alternating */
    static const double sin_series[9] = {1.0 / 355687428096000, -1.0 / 1307674368000,
                                         1.0 / 6227020800,      -1.0 / 39916800,
                                         1.0 / 362880,          -1.0 / 5040,
                                         1.0 / 120,             -1.0 / 6,
                                         1.0}; /* 1/17! ... 1/1!, alternating */
    double x2 = x * x, c = moe_poly(cos_series, 9, x2), sn = x * moe_poly(sin_series, 9, x2);
    int k = (int)(qb & 3); /* cos(x + k pi/2) */
    return k == 0 ? c : k == 1 ? -sn : k == 2 ? -c : sn;
}

/* u1, u2 multiples of 2^-53 in [0, 1): 1 - u1 lies in (0, 1], the logarithm is finite. */
static inline double box_muller(double u1, double u2) {
    return sqrt(-2.0 * log_unit(1.0 - u1)) * cos_2pi(u2);
}

double moe_box_muller(double u1, double u2) { return box_muller(u1, u2); }

/* Box-Muller on the 53-bit uniforms at 2 index and 2 index + 1; h is the (seed, stream) mix. */
static inline double normal_at(uint64_t h, uint64_t index) {
    return box_muller(unit53(mix64(h + (2 * index + 1) * 0x9e3779b97f4a7c15ULL)),
                      unit53(mix64(h + (2 * index + 2) * 0x9e3779b97f4a7c15ULL)));
}

double moe_rng_normal(uint64_t seed, uint64_t stream, uint64_t index) {
    return normal_at(mix64(seed * 0x9e3779b97f4a7c15ULL ^ stream), index);
}

#define NORMAL_BLOCK 4096 /* values per block over the threads */

typedef struct {
    uint64_t h, index;
    size_t n;
    float scale, *out;
} normal_args;

static void normal_blocks(void *ctx, int b0, int b1) {
    const normal_args *a = ctx;
    size_t lo = (size_t)b0 * NORMAL_BLOCK;
    size_t hi = (size_t)b1 * NORMAL_BLOCK < a->n ? (size_t)b1 * NORMAL_BLOCK : a->n;
    for (size_t i = lo; i < hi; i++) a->out[i] = a->scale * (float)normal_at(a->h, a->index + i);
}

void moe_rng_normal_floats(uint64_t seed, uint64_t stream, uint64_t index, size_t n, float scale,
                           float *out) {
    normal_args a = {mix64(seed * 0x9e3779b97f4a7c15ULL ^ stream), index, n, scale, out};
    moe_for_ranges((int)((n + NORMAL_BLOCK - 1) / NORMAL_BLOCK), 16 * n, normal_blocks, &a);
}
