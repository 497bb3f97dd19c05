#include "core/core.h"

#include <stdint.h>
#include <string.h>

int moe_mul_size(size_t a, size_t b, size_t *out) {
    if (a != 0 && b > SIZE_MAX / a) return -1;
    *out = a * b;
    return 0;
}

void *moe_alloc(size_t n, size_t size) {
    size_t bytes;
    if (moe_mul_size(n, size, &bytes) != 0 || bytes > SIZE_MAX - 64) {
        moe_set_error(MOE_ERR_NOMEM, "allocation of %zu x %zu bytes overflows", n, size);
        return NULL;
    }
    bytes = (bytes + 63) & ~(size_t)63;
    if (bytes == 0) bytes = 64;
    void *p = aligned_alloc(64, bytes);
    if (!p) {
        moe_set_error(MOE_ERR_NOMEM, "out of memory allocating %zu bytes", bytes);
        return NULL;
    }
    memset(p, 0, bytes);
    return p;
}

void moe_free(void *p) { free(p); }

void *moe_arena_take(moe_arena *a, size_t n, size_t size) {
    size_t bytes;
    if (moe_mul_size(n, size, &bytes) != 0) MOE_ASSERT(!"arena size overflow");
    bytes = (bytes + 63) & ~(size_t)63;
    void *p = a->base ? a->base + a->used : NULL;
    a->used += bytes;
    if (a->base) MOE_ASSERT(a->used <= a->cap);
    return p;
}
