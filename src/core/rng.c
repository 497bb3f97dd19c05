/* Counter-based RNG: a keyed hash of (seed, stream, index), built from the SplitMix64
 * finaliser applied over a Weyl-sequence mix of the words. No state: a value never depends
 * on call order, threads or ranks. tests/test_rng.c checks its moments and independence. */
#include "moe.h"

#include <math.h>

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

double moe_rng_uniform64(uint64_t seed, uint64_t stream, uint64_t index) {
    return (double)(moe_rng_u64(seed, stream, index) >> 11) * (1.0 / 9007199254740992.0);
}

double moe_rng_normal(uint64_t seed, uint64_t stream, uint64_t index) {
    double u1 = moe_rng_uniform64(seed, stream, 2 * index);
    double u2 = moe_rng_uniform64(seed, stream, 2 * index + 1);
    /* 1 - u1 lies in (0, 1]: the logarithm is finite. */
    return sqrt(-2.0 * log(1.0 - u1)) * cos(6.283185307179586 * u2);
}
