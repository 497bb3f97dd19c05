/* TensorBoard event files (docs/FORMATS.md §4). */
#define _POSIX_C_SOURCE 200809L
#include "io/tfevents.h"

#include "core/core.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

struct moe_tfevents {
    FILE *f;
};

uint32_t moe_crc32c(const void *data, size_t n) {
    const unsigned char *p = data;
    uint32_t c = 0xFFFFFFFFu;
    for (size_t i = 0; i < n; i++) {
        c ^= p[i];
        for (int b = 0; b < 8; b++) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
    }
    return c ^ 0xFFFFFFFFu;
}

static uint32_t masked(uint32_t c) { return ((c >> 15) | (c << 17)) + 0xA282EAD8u; }

static size_t put_varint(unsigned char *b, uint64_t v) {
    size_t n = 0;
    do {
        b[n++] = (unsigned char)((v & 0x7F) | (v > 0x7F ? 0x80 : 0));
        v >>= 7;
    } while (v);
    return n;
}

/* Event payload: wall_time (field 1, fixed64), step (2, varint), then file_version (3) or
 * summary (5) { value (1) { tag (1), simple_value (2, fixed32) } }. */
static size_t event_payload(unsigned char *b, const char *tag, int64_t step, float value,
                            double wall_time) {
    size_t n = 0;
    b[n++] = 0x09;
    memcpy(b + n, &wall_time, 8);
    n += 8;
    if (!tag) {
        static const char version[] = "brain.Event:2";
        b[n++] = 0x1A;
        n += put_varint(b + n, sizeof version - 1);
        memcpy(b + n, version, sizeof version - 1);
        return n + sizeof version - 1;
    }
    b[n++] = 0x10;
    n += put_varint(b + n, (uint64_t)step);
    size_t tl = strlen(tag);
    unsigned char val[300];
    size_t v = 0;
    val[v++] = 0x0A;
    v += put_varint(val + v, tl);
    memcpy(val + v, tag, tl);
    v += tl;
    val[v++] = 0x15;
    memcpy(val + v, &value, 4);
    v += 4;
    b[n++] = 0x2A; /* summary */
    n += put_varint(b + n, v + 1 + (v > 127 ? 2 : 1));
    b[n++] = 0x0A; /* value */
    n += put_varint(b + n, v);
    memcpy(b + n, val, v);
    return n + v;
}

/* TFRecord framing: length, its masked CRC, the payload, the payload's masked CRC. */
static size_t frame(unsigned char *buf, size_t cap, const unsigned char *payload, size_t n) {
    if (cap < n + 16) return 0;
    uint64_t len = n;
    memcpy(buf, &len, 8);
    uint32_t c1 = masked(moe_crc32c(buf, 8)), c2 = masked(moe_crc32c(payload, n));
    memcpy(buf + 8, &c1, 4);
    memcpy(buf + 12, payload, n);
    memcpy(buf + 12 + n, &c2, 4);
    return n + 16;
}

size_t moe_tfevents_record(unsigned char *buf, size_t cap, const char *tag, int64_t step,
                           float value, double wall_time) {
    if (tag && strlen(tag) > 256) return 0;
    unsigned char payload[400];
    return frame(buf, cap, payload, event_payload(payload, tag, step, value, wall_time));
}

/* Event { wall_time (1), step (2), session_log (6) { status (1, varint) = START (1) } }. */
size_t moe_tfevents_session_start_record(unsigned char *buf, size_t cap, int64_t step,
                                         double wall_time) {
    unsigned char payload[32];
    size_t n = 0;
    payload[n++] = 0x09;
    memcpy(payload + n, &wall_time, 8);
    n += 8;
    payload[n++] = 0x10;
    n += put_varint(payload + n, (uint64_t)step);
    static const unsigned char start[] = {0x32, 0x02, 0x08, 0x01};
    memcpy(payload + n, start, sizeof start);
    return frame(buf, cap, payload, n + sizeof start);
}

static moe_status write_bytes(moe_tfevents *w, const unsigned char *rec, size_t n) {
    if (fwrite(rec, 1, n, w->f) != n || fflush(w->f) != 0)
        return moe_set_error(MOE_ERR_IO, "cannot write the event file: %s", strerror(errno));
    return MOE_OK;
}

static moe_status write_record(moe_tfevents *w, const char *tag, int64_t step, float value,
                               double wall_time) {
    unsigned char rec[420];
    size_t n = moe_tfevents_record(rec, sizeof rec, tag, step, value, wall_time);
    if (!n) return moe_set_error(MOE_ERR_INVALID, "tensorboard tag too long");
    return write_bytes(w, rec, n);
}

moe_status moe_tfevents_open(const char *dir, double wall_time, moe_tfevents **out) {
    *out = NULL;
    char host[128] = "localhost", path[4300];
    gethostname(host, sizeof host - 1);
    snprintf(path, sizeof path, "%s/events.out.tfevents.%010lld.%s", dir, (long long)wall_time, host);
    moe_tfevents *w = calloc(1, sizeof *w);
    if (!w) return moe_set_error(MOE_ERR_NOMEM, "out of memory");
    if (!(w->f = fopen(path, "ab"))) {
        free(w);
        return moe_set_error(MOE_ERR_IO, "cannot create %s: %s", path, strerror(errno));
    }
    moe_status st = write_record(w, NULL, 0, 0, wall_time);
    if (st != MOE_OK) {
        moe_tfevents_close(w);
        return st;
    }
    *out = w;
    return MOE_OK;
}

moe_status moe_tfevents_scalar(moe_tfevents *w, const char *tag, int64_t step, float value,
                               double wall_time) {
    return write_record(w, tag, step, value, wall_time);
}

moe_status moe_tfevents_session_start(moe_tfevents *w, int64_t step, double wall_time) {
    unsigned char rec[48];
    return write_bytes(w, rec, moe_tfevents_session_start_record(rec, sizeof rec, step, wall_time));
}

void moe_tfevents_close(moe_tfevents *w) {
    if (!w) return;
    if (w->f) fclose(w->f);
    free(w);
}
