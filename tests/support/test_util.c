#define _POSIX_C_SOURCE 200809L
#include "test_util.h"

#include "moe.h"

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include <cmocka.h>

uint64_t tu_seed(void) {
    static uint64_t seed;
    static int done;
    if (!done) {
        const char *env = getenv("MOE_TEST_SEED");
        if (env && *env) {
            seed = strtoull(env, NULL, 10);
        } else {
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            seed = (uint64_t)ts.tv_sec * 1000003u + (uint64_t)ts.tv_nsec;
        }
        fprintf(stderr, "test seed: MOE_TEST_SEED=%llu\n", (unsigned long long)seed);
        done = 1;
    }
    return seed;
}

void tu_fill(float *x, size_t n, uint64_t seed, uint64_t stream, float lo, float hi) {
    for (size_t i = 0; i < n; i++) x[i] = lo + (hi - lo) * moe_rng_uniform(seed, stream, i);
}

void tu_fill64(double *x, size_t n, uint64_t seed, uint64_t stream, double lo, double hi) {
    for (size_t i = 0; i < n; i++) x[i] = lo + (hi - lo) * moe_rng_uniform64(seed, stream, i);
}

void tu_poison(float *x, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] = NAN;
}

double tu_err(const float *a, const double *b, size_t n, double atol, double rtol, size_t *worst) {
    double e = 0;
    size_t w = 0;
    for (size_t i = 0; i < n; i++) {
        double r = fabs((double)a[i] - b[i]) / (atol + rtol * fabs(b[i]));
        if (!(r <= e)) { /* catches NaN too */
            e = isnan(r) ? INFINITY : r;
            w = i;
        }
    }
    if (worst) *worst = w;
    return e;
}

void tu_check_close(const char *what, const float *a, const double *b, size_t n, double atol,
                    double rtol) {
    size_t w;
    double e = tu_err(a, b, n, atol, rtol, &w);
    if (e > 1.0) {
        print_error("%s: element %zu is %.9g, expected %.9g (|diff| %.3g, atol %.1g, rtol %.1g)\n",
                    what, w, (double)a[w], b[w], fabs((double)a[w] - b[w]), atol, rtol);
        fail();
    }
}

double tu_rel_err(const float *a, const float *b, size_t n, double *mean_abs) {
    double e = 0, s = 0, m = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(a[i])) {
            if (mean_abs) *mean_abs = INFINITY;
            return INFINITY;
        }
        e = fmax(e, fabs(a[i] - b[i]));
        s += fabs(a[i] - b[i]);
        m = fmax(m, fabs(b[i]));
    }
    if (mean_abs) *mean_abs = n ? s / (double)n : 0;
    return e / (m + 1e-30);
}
