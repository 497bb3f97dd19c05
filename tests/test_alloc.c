/* moe_alloc: zeroed and 64-byte aligned at every size, large buffers on 2 MB boundaries (huge
 * pages where the kernel gives them), overflowing sizes refused with a message. */
#include "test_util.h"

#include "core/core.h"
#include "moe.h"

#include <malloc.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

static void check_zeroed(const unsigned char *p, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (p[i]) fail_msg("byte %zu of %zu is %d, not 0", i, n, p[i]);
}

/* Each size three times, each buffer dirtied and freed, so that the next, which the C library
 * hands out from the same memory (main keeps large blocks on the heap), shows that moe_alloc
 * zeroes what it returns. */
static void test_sizes(void **state) {
    (void)state;
    const size_t sizes[] = {1, 63, 64, 1000, 65536 + 5, ((size_t)4 << 20) - 4, (size_t)4 << 20,
                            ((size_t)9 << 20) + 12};
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) {
        size_t n = sizes[i];
        for (int round = 0; round < 3; round++) {
            unsigned char *p = moe_alloc(n, 1);
            assert_non_null(p);
            assert_int_equal((uintptr_t)p % 64, 0);
            if (n >= ((size_t)4 << 20)) assert_int_equal((uintptr_t)p % ((size_t)2 << 20), 0);
            check_zeroed(p, n);
            memset(p, 0xA5, n);
            moe_free(p);
        }
    }
    moe_free(NULL);
}

static void test_overflow(void **state) {
    (void)state;
    assert_null(moe_alloc(SIZE_MAX / 2, 4));
    assert_non_null(strstr(moe_last_error(), "overflows"));
    assert_null(moe_alloc(1, SIZE_MAX - 100));
    assert_non_null(strstr(moe_last_error(), "overflows"));
}

int main(void) {
#ifdef __GLIBC__
    /* large blocks from the heap, kept there when freed: the next block of a size reuses the
     * dirtied memory (mmap would hand out fresh zero pages and hide a missing memset) */
    mallopt(M_MMAP_THRESHOLD, 32 << 20);
    mallopt(M_TRIM_THRESHOLD, 1 << 30);
#endif
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sizes),
        cmocka_unit_test(test_overflow),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
