/* io/hf — models in the Hugging Face layout: a directory with config.json and
 * model.safetensors (or shards named by model.safetensors.index.json). Families so far:
 * Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2 and -V3 (run, fine-tune, write). README
 * "Hugging Face models", docs/FORMATS.md §4. */
#ifndef MOE_IO_HF_H
#define MOE_IO_HF_H

#include "moe.h"

#include <stddef.h>
#include <stdint.h>

/* Reads DIR/config.json into a model configuration (every field it needs checked; an unknown
 * model_type is refused) and names the family (its model_type). Its seq_len is the model's
 * max_position_embeddings, which can be far more than a command plans memory for. */
moe_status moe_hf_config(const char *dir, moe_model_config *cfg, char *family, size_t cap);
/* The positions a command plans for when not told (--seq-length): at most this many. */
#define MOE_HF_WINDOW 4096
/* End-of-text ids from eos_token_id (a token id, a list of them or null; whole numbers in
 * [0, 2^31)), their count in *n (0 when none): with generation, those Hugging Face's generate
 * stops on (generation_config.json's when the file is there, else config.json's); else
 * config.json's, then generation_config.json's. Another value, more than cap ids, or a file
 * that does not parse: an error. */
moe_status moe_hf_eos(const char *dir, int generation, int32_t *ids, int cap, int *n);
/* The family's name of one of our tensors (ours: moe_model_tensor names) into buf. */
void moe_hf_tensor_name(const char *family, const char *ours, char *buf, size_t cap);
/* Loads every parameter of m from the directory's safetensors files (F32, BF16 or F16),
 * shapes checked; nothing changes in m on failure. */
moe_status moe_hf_load(const char *dir, const char *family, moe_model *m);

/* The double of the shortest decimal that reads back as f, for JSON: 1e-5f goes out as 1e-05,
 * not as the widened float 9.99999974737875e-06. */
double moe_hf_float_json(float f);
/* Whether the layer's top-k weights are renormalised (the softmax over the k logits is the
 * same). */
int moe_hf_renormalised(const moe_layer_config *m);
/* Whether the model can be written as the family; else a reason in why. */
int moe_hf_compatible(const moe_model_config *c, const char *family, char *why, size_t cap);
/* The first family the model can be written as (mixtral, qwen2_moe, qwen3_moe, olmoe,
 * deepseek_v3, deepseek_v2), or NULL with each family's reason in why, families with the same
 * reason together ("mixtral, olmoe: reason; deepseek_v3: reason"). */
const char *moe_hf_family_for(const moe_model_config *c, char *why, size_t cap);
/* Writes DIR/config.json and DIR/model.safetensors (F32, "format": "pt") in the family's
 * layout; refuses a directory that already holds either file. With base (a model directory
 * of that family), its config.json's other keys (token ids, rope scaling, positions...) are
 * kept. */
moe_status moe_hf_save(const char *dir, const char *family, moe_model *m, const char *base);

#endif
