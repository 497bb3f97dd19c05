/* Passes over whole buffers (the gradients and the optimizer state of a large model) on all
 * threads. */
#include "kernels/kernels.h"

#include <string.h>

#define VEC_BLOCK ((size_t)1 << 15) /* floats per block */

typedef struct {
    float *dst;
    const float *src;
    size_t n;
} set_args;

static void set_blocks(void *ctx, int b0, int b1) {
    const set_args *s = ctx;
    size_t lo = (size_t)b0 * VEC_BLOCK;
    size_t hi = (size_t)b1 * VEC_BLOCK < s->n ? (size_t)b1 * VEC_BLOCK : s->n;
    if (s->src) memcpy(s->dst + lo, s->src + lo, sizeof(float) * (hi - lo));
    else memset(s->dst + lo, 0, sizeof(float) * (hi - lo));
}

/* dst = src, or zeros where src is NULL, by blocks over the threads. */
static void set_floats(float *dst, const float *src, size_t n) {
    set_args s = {dst, src, n};
    moe_for_ranges((int)((n + VEC_BLOCK - 1) / VEC_BLOCK), n, set_blocks, &s);
}

void moe_zero_floats(float *x, size_t n) { set_floats(x, NULL, n); }
void moe_copy_floats(float *dst, const float *src, size_t n) { set_floats(dst, src, n); }

/* Blocks of VEC_BLOCK floats in groups of at least VEC_GROUP blocks, at most VEC_GROUPS groups;
 * a group's blocks are summed in order by one thread, each in 64 interleaved partial sums (lane l
 * takes elements l, l + 64, ...: eight vectors of adds in flight rather than one chain waiting
 * on the adder's latency), then the groups in order: the grouping depends on n only, so the
 * bits do not depend on the number of threads. */
#define VEC_GROUP 64
#define VEC_GROUPS 1024
static double block_sum_squares(const float *x, size_t n) {
    double lane[64] = {0}, s = 0;
    size_t i = 0;
    for (; i + 64 <= n; i += 64)
#pragma omp simd
        for (int l = 0; l < 64; l++) lane[l] += (double)x[i + l] * x[i + l];
    for (; i < n; i++) lane[i & 63] += (double)x[i] * x[i];
    for (int l = 0; l < 64; l++) s += lane[l];
    return s;
}

/* Blocks per group for n floats. */
static size_t group_blocks(size_t n) {
    size_t nb = (n + VEC_BLOCK - 1) / VEC_BLOCK, per = VEC_GROUP;
    if ((nb + per - 1) / per > VEC_GROUPS) per = (nb + VEC_GROUPS - 1) / VEC_GROUPS;
    return per;
}

int moe_sum_squares_split(size_t n) { return n > group_blocks(n) * VEC_BLOCK; }

/* The sum of group q (per blocks) of x[0, n). */
static double group_sum(const float *x, size_t n, size_t q, size_t per) {
    double s = 0;
    for (size_t lo = q * per * VEC_BLOCK; lo < (q + 1) * per * VEC_BLOCK && lo < n;
         lo += VEC_BLOCK)
        s += block_sum_squares(x + lo, n - lo < VEC_BLOCK ? n - lo : VEC_BLOCK);
    return s;
}

double moe_sum_squares(const float *x, size_t n) {
    size_t nb = (n + VEC_BLOCK - 1) / VEC_BLOCK, per = group_blocks(n);
    size_t ng = (nb + per - 1) / per;
    if (ng <= 1) return n ? group_sum(x, n, 0, per) : 0; /* no parallel region (0 + s is s) */
    double group[VEC_GROUPS], total = 0;
#pragma omp parallel for schedule(static)
    for (size_t q = 0; q < ng; q++) group[q] = group_sum(x, n, q, per);
    for (size_t q = 0; q < ng; q++) total += group[q];
    return total;
}
