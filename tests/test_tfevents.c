/* TensorBoard event records against the golden bytes of ecosystem-formats.md §5 (computed
 * there with an independent CRC-32C) and the CRC-32C test vector. */
#include "io/tfevents.h"
#include "test_util.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <string.h>

#include <cmocka.h>

static void test_crc32c(void **state) {
    (void)state;
    assert_true(moe_crc32c("123456789", 9) == 0xE3069283u);
}

static void expect_bytes(const unsigned char *got, size_t n, const unsigned char *want, size_t m) {
    assert_int_equal(n, m);
    for (size_t i = 0; i < n; i++)
        if (got[i] != want[i]) fail_msg("byte %zu: %02x, expected %02x", i, got[i], want[i]);
}

static void test_golden_records(void **state) {
    (void)state;
    unsigned char buf[256];
    const unsigned char version[] = {
        0x18, 0, 0, 0, 0, 0, 0, 0, 0xa3, 0x7f, 0x4b, 0x22, 0x09, 0x00, 0x00, 0x00, 0x40, 0xfc,
        0x54, 0xd9, 0x41, 0x1a, 0x0d, 0x62, 0x72, 0x61, 0x69, 0x6e, 0x2e, 0x45, 0x76, 0x65, 0x6e,
        0x74, 0x3a, 0x32, 0xec, 0xed, 0x8f, 0x9d};
    size_t n = moe_tfevents_record(buf, sizeof buf, NULL, 0, 0, 1700000000.0);
    expect_bytes(buf, n, version, sizeof version);
    const unsigned char scalar[] = {
        0x1a, 0, 0, 0, 0, 0, 0, 0, 0x12, 0x9b, 0xd8, 0x2d, 0x09, 0x00, 0x00, 0x40, 0x40, 0xfc,
        0x54, 0xd9, 0x41, 0x10, 0x0a, 0x2a, 0x0d, 0x0a, 0x0b, 0x0a, 0x04, 0x6c, 0x6f, 0x73, 0x73,
        0x15, 0x00, 0x00, 0x20, 0x40, 0x5c, 0x6a, 0x91, 0x8a};
    n = moe_tfevents_record(buf, sizeof buf, "loss", 10, 2.5f, 1700000001.0);
    expect_bytes(buf, n, scalar, sizeof scalar);
}

int main(void) {
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_crc32c), cmocka_unit_test(test_golden_records)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
