#include "core/core.h"

#include <stdarg.h>
#include <string.h>

static _Thread_local char moe_error_buf[1024];

moe_status moe_set_error(moe_status status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(moe_error_buf, sizeof moe_error_buf, fmt, ap);
    va_end(ap);
    return status;
}

void moe_clear_error(void) { moe_error_buf[0] = '\0'; }

const char *moe_last_error(void) { return moe_error_buf; }

const char *moe_status_name(moe_status s) {
    switch (s) {
    case MOE_OK: return "ok";
    case MOE_ERR_INVALID: return "invalid argument";
    case MOE_ERR_NOMEM: return "out of memory";
    case MOE_ERR_IO: return "i/o error";
    case MOE_ERR_FORMAT: return "malformed input";
    case MOE_ERR_STATE: return "invalid state";
    }
    return "unknown status";
}

#ifndef MOE_VERSION_STRING
#define MOE_VERSION_STRING "0.1.0"
#endif
const char *moe_version(void) { return MOE_VERSION_STRING; }

_Noreturn void moe_assert_fail(const char *expr, const char *file, int line) {
    fprintf(stderr, "moe: internal error: assertion `%s` failed at %s:%d\n", expr, file, line);
    abort();
}
