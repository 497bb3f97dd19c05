/* The token-file reader (moe prepare's format), then a batch drawn from what it accepted. */
#include "fuzz.h"

#include "io/data.h"

#include <stdio.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char path[300];
    snprintf(path, sizeof path, "%s/in.bin", moe_fuzz_dir());
    moe_fuzz_write(path, data, size);
    moe_tokens t;
    if (moe_tokens_load(path, &t) != MOE_OK) return 0;
    if (t.n_tokens > 1) {
        int S = t.n_tokens > 9 ? 8 : (int)t.n_tokens - 1;
        int32_t tok[16], tgt[16];
        moe_tokens_batch(&t, 2, S, 1, 2, tok, tgt);
        for (int i = 0; i < 2 * S; i++)
            if (tok[i] < 0 || tok[i] >= t.vocab) __builtin_trap();
    }
    moe_tokens_free(&t);
    return 0;
}
