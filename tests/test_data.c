/* io/data's file helpers: an atomic write whose fsync fails closes its file, and an empty
 * directory path is refused without reading past it. */
#define _POSIX_C_SOURCE 200809L
#include "test_util.h"

#include "core/core.h"
#include "io/data.h"
#include "moe.h"

#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

/* The lowest free descriptor: a leaked one moves it up. */
static int next_fd(void) {
    int fd = open("/dev/null", O_RDONLY);
    assert_true(fd >= 0);
    close(fd);
    return fd;
}

/* PATH.tmp a link to /dev/null: the writes succeed and fsync fails (EINVAL), an error after
 * which the file must still be closed. */
static void test_write_atomic_fsync_fails(void **state) {
    (void)state;
    char dir[] = "/tmp/moe_test_data_XXXXXX", path[64], tmp[80];
    assert_non_null(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/f", dir);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    const char text[] = "abc";
    const void *parts[1] = {text};
    size_t sizes[1] = {3};
    int before = next_fd();
    for (int i = 0; i < 3; i++) {
        assert_int_equal(symlink("/dev/null", tmp), 0);
        assert_int_not_equal(moe_write_atomic(path, parts, sizes, 1), MOE_OK);
        assert_non_null(strstr(moe_last_error(), "cannot flush"));
    }
    assert_int_equal(next_fd(), before);
    unlink(tmp);
    rmdir(dir);
}

static void test_mkdirs_empty(void **state) {
    (void)state;
    assert_int_not_equal(moe_mkdirs(""), MOE_OK);
    assert_non_null(strstr(moe_last_error(), "empty"));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_write_atomic_fsync_fails),
        cmocka_unit_test(test_mkdirs_empty),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
