/* The safetensors reader: header length, JSON header, dtypes, shapes, offsets, metadata;
 * then every tensor converted to float32 and every metadata value looked up. */
#include "fuzz.h"

#include "io/safetensors.h"

#include <stdio.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char path[300];
    snprintf(path, sizeof path, "%s/in.safetensors", moe_fuzz_dir());
    moe_fuzz_write(path, data, size);
    moe_safetensors st;
    if (moe_st_read(path, &st) != MOE_OK) return 0;
    for (int i = 0; i < st.n_tensors; i++) {
        const moe_st_tensor *t = &st.tensors[i];
        if (t->numel > (1u << 20)) continue;
        float *buf = malloc((t->numel ? t->numel : 1) * sizeof(float));
        if (!buf) continue;
        moe_st_get_f32(&st, t->name, t->ndim, t->shape, buf);
        free(buf);
        if (moe_st_find(&st, t->name) != t) abort(); /* names are unique */
    }
    for (int i = 0; i < st.n_meta; i++)
        if (!moe_st_meta(&st, st.meta_keys[i])) abort();
    moe_st_free(&st);
    return 0;
}
