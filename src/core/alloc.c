#define _DEFAULT_SOURCE /* sysconf(_SC_PHYS_PAGES) */
#include "core/core.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#define HUGE_PAGE ((size_t)2 << 20)
#define HUGE_MIN ((size_t)4 << 20) /* from here on, allocations are in huge pages */

int moe_mul_size(size_t a, size_t b, size_t *out) {
    if (a != 0 && b > SIZE_MAX / a) return -1;
    *out = a * b;
    return 0;
}

void *moe_alloc(size_t n, size_t size) {
    size_t bytes;
    if (moe_mul_size(n, size, &bytes) != 0 || bytes > SIZE_MAX - HUGE_PAGE) {
        moe_set_error(MOE_ERR_NOMEM, "allocation of %zu x %zu bytes overflows", n, size);
        return NULL;
    }
    /* Large buffers (a big model's parameters, gradients and optimizer state) in 2 MB pages
     * where the kernel gives them on request (transparent huge pages in "madvise" mode, Debian's
     * default): zeroing 6.8 GB of 4 KB pages took 1.7 million page faults, 23 s of system time
     * at E = 256 (bench/RESULTS.md). */
    size_t align = bytes >= HUGE_MIN ? HUGE_PAGE : 64;
    bytes = (bytes + align - 1) & ~(align - 1);
    if (bytes == 0) bytes = 64;
    void *p = aligned_alloc(align, bytes);
    if (!p) {
        moe_set_error(MOE_ERR_NOMEM, "out of memory allocating %zu bytes", bytes);
        return NULL;
    }
#ifdef MADV_HUGEPAGE
    if (align == HUGE_PAGE) (void)madvise(p, bytes, MADV_HUGEPAGE); /* advice: may be refused */
#endif
    if (align == HUGE_PAGE) { /* by pages over the threads: the first touch of each page (the
                                * kernel zeroing it) is most of the time of zeroing new memory */
        size_t pages = bytes / HUGE_PAGE;
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < pages; i++) memset((char *)p + i * HUGE_PAGE, 0, HUGE_PAGE);
    } else {
        memset(p, 0, bytes);
    }
    return p;
}

void moe_free(void *p) { free(p); }

void *moe_arena_take(moe_arena *a, size_t n, size_t size) {
    size_t bytes;
    int overflow = moe_mul_size(n, size, &bytes) != 0 || bytes > SIZE_MAX - 64;
    bytes = overflow ? SIZE_MAX : (bytes + 63) & ~(size_t)63;
    overflow = overflow || a->used > SIZE_MAX - bytes;
    /* Planning (no base) saturates, so that an absurd size is refused by the memory check
     * rather than wrapping around; a real arena was planned with the same sizes. */
    MOE_ASSERT(!overflow || !a->base);
    void *p = a->base ? a->base + a->used : NULL;
    a->used = overflow ? SIZE_MAX : a->used + bytes;
    if (a->base) MOE_ASSERT(a->used <= a->cap);
    return p;
}

size_t moe_memory_limit(void) {
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    size_t limit = pages > 0 && page > 0 ? (size_t)pages * (size_t)page : SIZE_MAX;
    FILE *f = fopen("/sys/fs/cgroup/memory.max", "r"); /* cgroup v2: "max" or bytes */
    unsigned long long cg;
    if (f) {
        if (fscanf(f, "%llu", &cg) == 1 && cg < limit) limit = (size_t)cg;
        fclose(f);
    }
    struct rlimit rl;
    if (getrlimit(RLIMIT_AS, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < limit)
        limit = (size_t)rl.rlim_cur;
    return limit;
}

moe_status moe_check_memory(const char *what, size_t bytes, const char *parts) {
    size_t limit = moe_memory_limit();
    if (bytes <= limit) return MOE_OK;
    const double gib = 1024.0 * 1024 * 1024;
    char need[48];
    if (bytes == SIZE_MAX) snprintf(need, sizeof need, "more than 2^64 bytes");
    else snprintf(need, sizeof need, "about %.3g GiB", (double)bytes / gib);
    return moe_set_error(MOE_ERR_NOMEM, "%s needs %s (%s) but this machine allows %.3g GiB; "
                         "nothing was allocated. Choose smaller sizes", what, need, parts,
                         (double)limit / gib);
}
