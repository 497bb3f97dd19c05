/* io/hf — models in the Hugging Face layout: a directory with config.json and
 * model.safetensors (or shards named by model.safetensors.index.json). Families supported so
 * far: Mixtral. README "Hugging Face models", docs/FORMATS.md §4. */
#ifndef MOE_IO_HF_H
#define MOE_IO_HF_H

#include "moe.h"

#include <stddef.h>

/* Reads DIR/config.json into a model configuration (every field it needs checked; an unknown
 * model_type is refused) and names the family ("mixtral"). */
moe_status moe_hf_config(const char *dir, moe_model_config *cfg, char *family, size_t cap);
/* The family's name of one of our tensors (ours: moe_model_tensor names) into buf. */
void moe_hf_tensor_name(const char *family, const char *ours, char *buf, size_t cap);
/* Loads every parameter of m from the directory's safetensors files (F32, BF16 or F16),
 * shapes checked; nothing changes in m on failure. */
moe_status moe_hf_load(const char *dir, const char *family, moe_model *m);

#endif
