/* Helpers shared by the tests: fresh random data and comparisons that say what differed. */
#ifndef MOE_TEST_UTIL_H
#define MOE_TEST_UTIL_H

#include <stddef.h>
#include <stdint.h>

/* A seed that differs from run to run unless MOE_TEST_SEED is set; printed once so a failing
 * run can be repeated. */
uint64_t tu_seed(void);
/* Fills x[n] with uniform values in [lo, hi) from (seed, stream). */
void tu_fill(float *x, size_t n, uint64_t seed, uint64_t stream, float lo, float hi);
void tu_fill64(double *x, size_t n, uint64_t seed, uint64_t stream, double lo, double hi);
/* Fills with NaN: outputs are poisoned before each call so that unwritten entries show. */
void tu_poison(float *x, size_t n);
/* Largest |a-b| / (atol + rtol*|b|) over the arrays; <= 1 means within tolerance.
 * *worst receives the index of the worst element. */
double tu_err(const float *a, const double *b, size_t n, double atol, double rtol, size_t *worst);
/* max |a - b| / max |b| over the arrays (INFINITY if a holds a non-finite value); *mean_abs
 * (may be NULL) = the mean |a - b|. */
double tu_rel_err(const float *a, const float *b, size_t n, double *mean_abs);
/* Asserts (cmocka) that a matches b within tolerance, printing what and where it differed. */
void tu_check_close(const char *what, const float *a, const double *b, size_t n, double atol,
                    double rtol);

#endif
