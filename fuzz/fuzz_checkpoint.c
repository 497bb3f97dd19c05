/* The checkpoint reader: a tiny model's checkpoint is saved once; each input then replaces
 * its trainer state (first byte even) or its model file (odd) and the checkpoint is loaded
 * into the model and trainer. */
#include "fuzz.h"

#include "train/trainer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static moe_model *model;
static moe_trainer *trainer;
static char ckpt[400];
static uint8_t *saved[2];
static size_t saved_size[2];
static const char *const files[2] = {"trainer.safetensors", "model.safetensors"};

static void read_all(const char *path, uint8_t **buf, size_t *size) {
    FILE *f = fopen(path, "rb");
    if (!f || fseek(f, 0, SEEK_END) != 0) abort();
    long n = ftell(f);
    rewind(f);
    *buf = malloc((size_t)n);
    if (!*buf || fread(*buf, 1, (size_t)n, f) != (size_t)n) abort();
    *size = (size_t)n;
    fclose(f);
}

static void setup(void) {
    static uint32_t tokens[64];
    static moe_tokens data = {.ids = tokens, .id_bytes = MOE_TOKENS_U32,
        .n_tokens = 64, .vocab = 16, .eot = 0};
    for (int i = 0; i < 64; i++) tokens[i] = (uint32_t)(i * 7 % 16);
    moe_model_config c = moe_model_config_default();
    c.vocab = 16;
    c.d = 8;
    c.n_layers = 2;
    c.n_heads = 2;
    c.n_kv_heads = 1;
    c.ffn = 8;
    c.seq_len = 8;
    c.first_k_dense = 1;
    c.moe.n_experts = 4;
    c.moe.topk = 2;
    c.moe.ffn = 4;
    c.moe.enable_expert_bias = 1;
    moe_train_config tc = moe_train_config_default();
    tc.micro_batch = tc.global_batch = 2;
    if (moe_model_create(&c, 16, &model) != MOE_OK ||
        moe_trainer_create(model, &tc, &data, NULL, &trainer) != MOE_OK ||
        moe_trainer_step(trainer, NULL) != MOE_OK ||
        moe_checkpoint_save(moe_fuzz_dir(), 1, "hidden-size = 8\n", model, trainer) != MOE_OK) {
        fprintf(stderr, "fuzz_checkpoint setup: %s\n", moe_last_error());
        abort();
    }
    snprintf(ckpt, sizeof ckpt, "%s/step-00000001", moe_fuzz_dir());
    for (int i = 0; i < 2; i++) {
        char path[500];
        snprintf(path, sizeof path, "%s/%s", ckpt, files[i]);
        read_all(path, &saved[i], &saved_size[i]);
    }
    const char *out = getenv("MOE_FUZZ_SEED_OUT"); /* writes the seed corpus: the valid files */
    for (int i = 0; out && i < 2; i++) {
        char path[500];
        snprintf(path, sizeof path, "%s/valid-%s", out, files[i]);
        uint8_t *b = malloc(saved_size[i] + 1);
        if (!b) abort();
        b[0] = (uint8_t)i;
        memcpy(b + 1, saved[i], saved_size[i]);
        moe_fuzz_write(path, b, saved_size[i] + 1);
        free(b);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!model) setup();
    if (size < 1) return 0;
    int which = data[0] & 1;
    for (int i = 0; i < 2; i++) {
        char path[500];
        snprintf(path, sizeof path, "%s/%s", ckpt, files[i]);
        if (i == which) moe_fuzz_write(path, data + 1, size - 1);
        else moe_fuzz_write(path, saved[i], saved_size[i]);
    }
    moe_checkpoint_load(ckpt, model, trainer, 0);
    return 0;
}
