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

double moe_wall_time(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
