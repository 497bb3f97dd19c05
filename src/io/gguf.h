/* io/gguf — llama.cpp's GGUF files (version 3): a model written as one of the architectures
 * llama.cpp runs — llama (Mixtral's layout, q and k rows in llama.cpp's RoPE pair order),
 * qwen2moe, qwen3moe, olmoe — with its vocabulary. README "Hugging Face models" (llama.cpp),
 * docs/FORMATS.md §6. */
#ifndef MOE_IO_GGUF_H
#define MOE_IO_GGUF_H

#include "moe.h"

/* ggml's tensor types written here */
typedef enum { MOE_GGUF_F32 = 0, MOE_GGUF_F16 = 1, MOE_GGUF_BF16 = 30 } moe_gguf_type;

/* The type named f32, f16 or bf16 (llama.cpp's --outtype names); -1 for another name. */
int moe_gguf_type_of(const char *name);

/* llama.cpp's architecture for a Hugging Face family (mixtral: llama), NULL for one it has
 * none of here (DeepSeek's). */
const char *moe_gguf_arch(const char *family);

/* Whether llama.cpp's architecture for the family computes this model (the family's own
 * conditions, moe_hf_compatible, and llama.cpp's: every layer an MoE layer, its fixed choice
 * of renormalising the top-k weights, qwen2moe's shared expert, olmoe's key/value heads);
 * else a reason in why. */
int moe_gguf_compatible(const moe_model_config *c, const char *family, char *why, size_t cap);

/* What moe_gguf_save writes besides the tensors. */
typedef struct {
    const char *name;           /* general.name */
    int context_length;         /* the model's positions (max_position_embeddings) */
    const char *tokenizer_path; /* a tokenizer.json (byte-level BPE, or SentencePiece's BPE:
                                   byte fallback or Metaspace), or NULL: */
    int bytes;                  /* moe prepare's bytes then, else no vocabulary (ids only) */
    const int32_t *eos;         /* end-of-text ids (the first is written), n_eos of them */
    int n_eos;
    moe_gguf_type type;         /* of the matrices; vectors, norms and routers stay F32 */
} moe_gguf_meta;

/* Writes path (atomically; an existing file is refused) as the family's llama.cpp
 * architecture: the metadata llama.cpp reads, the tokenizer, every tensor under llama.cpp's
 * name (experts stacked into one tensor per projection, dimensions fastest first). */
moe_status moe_gguf_save(const char *path, const char *family, moe_model *m,
                         const moe_gguf_meta *meta);

#endif
