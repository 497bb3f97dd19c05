/* Passes over whole buffers (the gradients and the optimizer state of a large model) on all
 * threads. */
#include "kernels/kernels.h"

#include <string.h>

#define VEC_BLOCK ((size_t)1 << 15) /* floats per block */

/* dst = src, or zeros where src is NULL, by blocks over the threads. */
static void set_floats(float *dst, const float *src, size_t n) {
    size_t nb = (n + VEC_BLOCK - 1) / VEC_BLOCK;
#pragma omp parallel for schedule(static) if (nb > 1)
    for (size_t b = 0; b < nb; b++) {
        size_t lo = b * VEC_BLOCK, len = n - lo < VEC_BLOCK ? n - lo : VEC_BLOCK;
        if (src) memcpy(dst + lo, src + lo, sizeof(float) * len);
        else memset(dst + lo, 0, sizeof(float) * len);
    }
}

void moe_zero_floats(float *x, size_t n) { set_floats(x, NULL, n); }
void moe_copy_floats(float *dst, const float *src, size_t n) { set_floats(dst, src, n); }

/* Each block is summed in 16 interleaved partial sums (lane l takes elements l, l + 16, ...: a
 * single chain would wait on the adder's latency for every element), the lanes and then the
 * blocks added in order: the same bits whatever the number of threads. */
double moe_sum_squares(const float *x, size_t n) {
    size_t nb = (n + VEC_BLOCK - 1) / VEC_BLOCK;
    double total = 0;
#pragma omp parallel for ordered schedule(static, 1) if (nb > 1)
    for (size_t b = 0; b < nb; b++) {
        size_t lo = b * VEC_BLOCK, hi = n - lo < VEC_BLOCK ? n : lo + VEC_BLOCK;
        double lane[16] = {0}, s = 0;
        size_t i = lo;
        for (; i + 16 <= hi; i += 16)
#pragma omp simd
            for (int l = 0; l < 16; l++) lane[l] += (double)x[i + l] * x[i + l];
        for (; i < hi; i++) lane[(i - lo) & 15] += (double)x[i] * x[i];
        for (int l = 0; l < 16; l++) s += lane[l];
#pragma omp ordered
        total += s;
    }
    return total;
}
