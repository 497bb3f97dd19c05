/* The GGUF reader: header, keys and values, tensor infos; then the configuration and the
 * vocabulary it makes, and, for a model of a few million parameters at most, its tensors
 * loaded (dequantised). */
#include "fuzz.h"

#include "io/gguf.h"
#include "io/hf.h"

#include <stdio.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char path[300], *text = NULL, family[32];
    snprintf(path, sizeof path, "%s/in.gguf", moe_fuzz_dir());
    moe_fuzz_write(path, data, size);
    moe_gguf *g;
    if (moe_gguf_open(path, &g) != MOE_OK) return 0;
    if (moe_gguf_config_json(g, &text) == MOE_OK) free(text);
    text = NULL;
    if (moe_gguf_tokenizer_json(g, &text) == MOE_OK) free(text);
    moe_gguf_close(g);
    moe_model_config c;
    moe_model *m = NULL;
    if (moe_hf_config(path, &c, family, sizeof family) != MOE_OK) return 0;
    c.seq_len = c.seq_len < 64 ? c.seq_len : 64;
    moe_tensor_info *t = NULL;
    int n = 0;
    double params = 0;
    if (moe_model_full_tensors(&c, &t, &n) != MOE_OK) return 0;
    for (int i = 0; i < n; i++) params += (double)t[i].numel;
    free(t);
    if (params < (double)(4u << 20) && moe_model_create_inference(&c, 1, &m) == MOE_OK)
        moe_hf_load(path, family, m);
    moe_model_destroy(m);
    return 0;
}
