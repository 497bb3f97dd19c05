#define _POSIX_C_SOURCE 200809L
#include "core/core.h"

#include <omp.h>
#include <time.h>

double moe_time_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int moe_num_threads(void) { return omp_get_max_threads(); }

void moe_for_ranges(int n, size_t work, moe_range_fn fn, void *ctx) {
    if (n <= 0) return;
    if (n < 2 || work < MOE_RANGE_WORK || omp_in_parallel() || omp_get_max_threads() == 1) {
        fn(ctx, 0, n);
        return;
    }
#pragma omp parallel
    {
        int p = omp_get_num_threads(), id = omp_get_thread_num(), q = n / p, r = n % p;
        int lo = id * q + (id < r ? id : r);
        int hi = lo + q + (id < r);
        if (lo < hi) fn(ctx, lo, hi);
    }
}

double moe_wall_time(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
