/* moe_for_ranges: every index of [0, n) in exactly one call, in contiguous ranges; a loop
 * whose work is under MOE_RANGE_WORK (or of one item, or inside a parallel region) runs whole
 * on the calling thread without a region; above it, one range per thread of a region, as
 * schedule(static) splits a loop. */
#include "test_util.h"

#include "core/core.h"

#include <omp.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#define MAX_N 1000
#define MAX_CALLS 64

typedef struct {
    int seen[MAX_N];                          /* calls that covered each index */
    int lo[MAX_CALLS], hi[MAX_CALLS], thread[MAX_CALLS], in_region[MAX_CALLS];
    int calls;
} record;

static void note_range(void *ctx, int lo, int hi) {
    record *r = ctx;
    int c;
#pragma omp atomic capture
    c = r->calls++;
    if (c >= MAX_CALLS) return;
    r->lo[c] = lo, r->hi[c] = hi;
    r->thread[c] = omp_get_thread_num(), r->in_region[c] = omp_in_parallel();
    for (int i = lo; i < hi; i++) {
#pragma omp atomic
        r->seen[i]++;
    }
}

static void run(record *r, int n, size_t work) {
    memset(r, 0, sizeof *r);
    moe_for_ranges(n, work, note_range, r);
    assert_true(r->calls <= MAX_CALLS);
    for (int i = 0; i < n; i++)
        if (r->seen[i] != 1) fail_msg("n %d, work %zu: index %d covered %d times", n, work, i,
                                      r->seen[i]);
    for (int c = 0; c < r->calls; c++) assert_true(r->lo[c] < r->hi[c]);
}

static void test_small_work_on_caller(void **state) {
    (void)state;
    record r;
    const int ns[] = {1, 2, 3, 17, MAX_N};
    for (size_t i = 0; i < sizeof ns / sizeof *ns; i++) {
        run(&r, ns[i], MOE_RANGE_WORK - 1);
        assert_int_equal(r.calls, 1);
        assert_int_equal(r.lo[0], 0);
        assert_int_equal(r.hi[0], ns[i]);
        assert_int_equal(r.in_region[0], 0);
    }
    run(&r, 1, (size_t)1 << 40); /* one item: nothing to split */
    assert_int_equal(r.calls, 1);
    assert_int_equal(r.in_region[0], 0);
    run(&r, 0, (size_t)1 << 40); /* no items: no call */
    assert_int_equal(r.calls, 0);
}

static void test_large_work_split(void **state) {
    (void)state;
    int p = omp_get_max_threads();
    if (p < 2) skip(); /* the suite runs with OMP_NUM_THREADS=2 */
    record r;
    const int ns[] = {2, 3, 17, MAX_N};
    for (size_t i = 0; i < sizeof ns / sizeof *ns; i++) {
        int n = ns[i], parts = n < p ? n : p;
        run(&r, n, MOE_RANGE_WORK);
        assert_int_equal(r.calls, parts);
        for (int c = 0; c < r.calls; c++) {
            assert_int_equal(r.in_region[c], 1);
            /* thread t's range is the t-th of schedule(static)'s: sizes n / p or one more,
             * the larger first */
            int t = r.thread[c], q = n / p, rem = n % p;
            assert_int_equal(r.lo[c], t * q + (t < rem ? t : rem));
            assert_int_equal(r.hi[c] - r.lo[c], q + (t < rem));
        }
    }
}

static void test_inside_region_on_caller(void **state) {
    (void)state;
    int p = omp_get_max_threads();
    if (p < 2) skip();
    record *r = test_calloc((size_t)p, sizeof *r);
    /* each thread of an active region (the experts') runs its own loop: no nested region */
#pragma omp parallel
    {
        record *mine = &r[omp_get_thread_num()];
        moe_for_ranges(50, (size_t)1 << 40, note_range, mine);
    }
    for (int t = 0; t < p; t++) {
        assert_int_equal(r[t].calls, 1);
        assert_int_equal(r[t].lo[0], 0);
        assert_int_equal(r[t].hi[0], 50);
        assert_int_equal(r[t].thread[0], t);
    }
    test_free(r);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_small_work_on_caller),
        cmocka_unit_test(test_large_work_split),
        cmocka_unit_test(test_inside_region_on_caller),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
