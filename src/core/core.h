/* core/ — status messages, allocation, assertions, timing, OpenMP helpers (private). */
#ifndef MOE_CORE_H
#define MOE_CORE_H

#include "moe.h"

#include <stdio.h>
#include <stdlib.h>

/* Sets the thread's last error message (printf format) and returns status. */
moe_status moe_set_error(moe_status status, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
void moe_clear_error(void);

/* Programmer errors inside the library (shape mismatches): print and abort. */
#define MOE_ASSERT(cond)                                                                      \
    do {                                                                                      \
        if (!(cond)) moe_assert_fail(#cond, __FILE__, __LINE__);                              \
    } while (0)
#ifdef __cplusplus /* the CUDA sources (src/cuda/) are C++ */
[[noreturn]] void moe_assert_fail(const char *expr, const char *file, int line);
#else
_Noreturn void moe_assert_fail(const char *expr, const char *file, int line);
#endif

/* Returns MOE_ERR_NOMEM (with a message) when a call fails. */
#define MOE_TRY(call)                                                                         \
    do {                                                                                      \
        moe_status moe_try_status_ = (call);                                                  \
        if (moe_try_status_ != MOE_OK) return moe_try_status_;                                \
    } while (0)

/* The normal of moe_rng_normal from its two uniforms (multiples of 2^-53 in [0, 1)). */
double moe_box_muller(double u1, double u2);

/* 64-byte aligned, zeroed allocation of n elements of size bytes; NULL (with the error set)
 * on failure or overflow. Free with moe_free. */
void *moe_alloc(size_t n, size_t size);
void moe_free(void *p);
/* Bytes this process may use: physical memory, lowered by a cgroup (v2) limit or RLIMIT_AS. */
size_t moe_memory_limit(void);
/* MOE_ERR_NOMEM with a message naming what, the estimate and its parts when bytes exceed
 * moe_memory_limit(); call before allocating. */
moe_status moe_check_memory(const char *what, size_t bytes, const char *parts);
/* a*b with overflow check: returns 0 and sets *out on success, -1 on overflow. */
int moe_mul_size(size_t a, size_t b, size_t *out);

/* Validation: returns MOE_ERR_INVALID with the message unless cond holds. */
#define MOE_CHECK(cond, ...)                                                                  \
    do {                                                                                      \
        if (!(cond)) return moe_set_error(MOE_ERR_INVALID, __VA_ARGS__);                      \
    } while (0)

/* Parsers: sets `status` to MOE_ERR_FORMAT with the message and jumps to `done`. */
#define MOE_FAIL_FORMAT(...)                                                                  \
    do {                                                                                      \
        status = moe_set_error(MOE_ERR_FORMAT, __VA_ARGS__);                                  \
        goto done;                                                                            \
    } while (0)

/* Bump allocator over one allocation: plan sizes first (base NULL), then carve. */
typedef struct {
    char *base;
    size_t used;
    size_t cap;
} moe_arena;
/* Returns a 64-byte aligned block of n*size bytes (NULL in planning mode). */
void *moe_arena_take(moe_arena *a, size_t n, size_t size);

double moe_time_now(void);  /* seconds, monotonic */
/* One step of a spin-wait loop (a few dozen cycles on x86, where it tells the core so). */
static inline void moe_spin_pause(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}
double moe_wall_time(void); /* seconds since the epoch */

/* Unrolls the loop that follows whole (at most n times for gcc) once inlining has made its
 * count a constant: the register tiles of an always_inline body instantiated per shape. clang
 * unrolls such a body's loops by n while their count is still a parameter, before inlining it,
 * and not again after: the tiles' accumulators then stay in memory (4-5 times slower,
 * bench/RESULTS.md, session 28); its "loop unroll(full)" waits for the constant. */
#define MOE_PRAGMA(x) _Pragma(#x)
#if defined(__CUDACC__)
#define MOE_UNROLL(n)
#elif defined(__clang__)
#define MOE_UNROLL(n) MOE_PRAGMA(clang loop unroll(full))
#else
#define MOE_UNROLL(n) MOE_PRAGMA(GCC unroll n)
#endif

/* c[0] x^(n-1) + c[1] x^(n-2) + ... + c[n-1] by Horner's rule; with c and n constant it unrolls
 * into the loop that calls it, which the compiler can then vectorise. */
static inline double moe_poly(const double *c, int n, double x) {
    double p = c[0];
    MOE_UNROLL(32)
    for (int i = 1; i < n; i++) p = p * x + c[i];
    return p;
}

int moe_num_threads(void); /* OpenMP threads a parallel region would use */
/* fn(ctx, lo, hi) over [0, n) in contiguous ranges, one per thread as schedule(static) splits
 * a loop; all of it on the calling thread when n < 2, when that thread already runs in a
 * parallel region (the experts' own), or when the loop's work is under MOE_RANGE_WORK: work is
 * about how many floats it reads, writes or computes in all (weighted by a few for the costlier
 * ones: an exponential, a normal deviate), and starting a region costs about what a thread does
 * with that many in its time (a microsecond on two cores, bench/RESULTS.md, session 29) — a
 * decoding step's rows, a short prompt's. libgomp allocates a team for every region that is
 * nested, or smaller than the last one (an `if` or `num_threads` clause), and DESIGN.md keeps
 * regions unnested: this starts none of those. For loops whose iterations are independent, so
 * that the split never changes a result. */
#define MOE_RANGE_WORK 32768
typedef void (*moe_range_fn)(void *ctx, int lo, int hi);
void moe_for_ranges(int n, size_t work, moe_range_fn fn, void *ctx);

#endif
