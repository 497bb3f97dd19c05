/* AVX-512 helpers shared by the kernels (nn.c, act.c, gemm_small.c). Code under MOE_X86 runs
 * only where moe_avx512() says the CPU has AVX-512F; elsewhere the plain C loops and the
 * libraries do. */
#ifndef MOE_KERNELS_AVX512_H
#define MOE_KERNELS_AVX512_H

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MOE_X86 1
#include <immintrin.h>
#define AVX512_TARGET __attribute__((target("avx512f")))

static inline int moe_avx512(void) { return __builtin_cpu_supports("avx512f"); }

/* moe_exp_vec on 16 lanes, its steps in fused multiply-adds (NaN stays NaN: max and min
 * return their second operand for it). */
static inline __attribute__((always_inline)) AVX512_TARGET __m512 moe_exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_set1_ps(88.0f), _mm512_max_ps(_mm512_set1_ps(-87.0f), x));
    const __m512 shifter = _mm512_set1_ps(12582912.0f);
    __m512 t = _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), shifter);
    __m512 n = _mm512_sub_ps(t, shifter);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723e-6f), r);
    static const float c[7] = {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    for (int i = 0; i < 7; i++) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c[i]));
    __m512i e = _mm512_add_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(127 - 0x4B400000));
    return _mm512_mul_ps(p, _mm512_castsi512_ps(_mm512_slli_epi32(e, 23)));
}

/* The lanes [0, n) of a vector, n < 16 (a row's tail); all 16 for n >= 16. */
static inline __mmask16 moe_lanes16(int n) {
    return (__mmask16)(n >= 16 ? 0xFFFFu : (1u << (n > 0 ? n : 0)) - 1u);
}
#else
static inline int moe_avx512(void) { return 0; }
#endif

#endif
