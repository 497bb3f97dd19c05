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

static uint64_t varint(const unsigned char *b, size_t n, size_t *at) {
    uint64_t v = 0;
    for (int s = 0; *at < n && s < 64; s += 7) {
        unsigned char c = b[(*at)++];
        v |= (uint64_t)(c & 0x7F) << s;
        if (!(c & 0x80)) return v;
    }
    fail_msg("varint runs past byte %zu", *at);
    return 0;
}

static uint32_t masked_crc(const void *p, size_t n) {
    uint32_t c = moe_crc32c(p, n);
    return ((c >> 15) | (c << 17)) + 0xA282EAD8u;
}

/* The record a resumed run writes (TensorBoard drops the older events of step >= its step),
 * parsed field by field: framing and CRCs, then Event { wall_time (1, fixed64), step (2,
 * varint), session_log (6, bytes) { status (1, varint) = START (1) } } and nothing else; and
 * against golden bytes computed independently (Python, bit-by-bit CRC-32C). */
static void test_session_start(void **state) {
    (void)state;
    unsigned char b[64];
    size_t n = moe_tfevents_session_start_record(b, sizeof b, 137, 1700000002.0);
    assert_true(n > 16);
    uint64_t len;
    uint32_t c;
    memcpy(&len, b, 8);
    assert_int_equal(len, n - 16);
    memcpy(&c, b + 8, 4);
    assert_true(c == masked_crc(b, 8));
    memcpy(&c, b + 12 + len, 4);
    assert_true(c == masked_crc(b + 12, len));
    const unsigned char *p = b + 12;
    size_t at = 0;
    int seen = 0;
    while (at < len) {
        uint64_t key = varint(p, len, &at);
        int field = (int)(key >> 3), wire = (int)(key & 7);
        if (field == 1) {
            assert_int_equal(wire, 1);
            double wt;
            memcpy(&wt, p + at, 8);
            at += 8;
            assert_true(wt == 1700000002.0);
        } else if (field == 2) {
            assert_int_equal(wire, 0);
            assert_int_equal(varint(p, len, &at), 137);
        } else if (field == 6) {
            assert_int_equal(wire, 2);
            uint64_t m = varint(p, len, &at);
            assert_int_equal(m, 2);
            assert_int_equal(p[at], 0x08); /* status: field 1, varint */
            assert_int_equal(p[at + 1], 1); /* START */
            at += m;
        } else {
            fail_msg("unexpected field %d (wire type %d)", field, wire);
        }
        seen |= 1 << field;
    }
    assert_int_equal(at, len);
    assert_int_equal(seen, (1 << 1) | (1 << 2) | (1 << 6));
    const unsigned char golden[] = {
        0x10, 0, 0, 0, 0, 0, 0, 0, 0x95, 0xfb, 0xfe, 0x18, 0x09, 0x00, 0x00, 0x80, 0x40, 0xfc,
        0x54, 0xd9, 0x41, 0x10, 0x89, 0x01, 0x32, 0x02, 0x08, 0x01, 0x19, 0x96, 0xd4, 0x34};
    expect_bytes(b, n, golden, sizeof golden);
    assert_int_equal(moe_tfevents_session_start_record(b, n - 1, 137, 1700000002.0), 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_crc32c),
                                       cmocka_unit_test(test_golden_records),
                                       cmocka_unit_test(test_session_start)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
