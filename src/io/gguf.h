/* io/gguf — llama.cpp's GGUF files (version 3): a model written as one of the architectures
 * llama.cpp runs — llama (Mixtral's layout, q and k rows in llama.cpp's RoPE pair order),
 * qwen2moe, qwen3moe, olmoe — with its vocabulary. README "Hugging Face models" (llama.cpp),
 * docs/FORMATS.md §6. */
#ifndef MOE_IO_GGUF_H
#define MOE_IO_GGUF_H

#include "moe.h"

/* ggml's tensor types written here */
typedef enum {
    MOE_GGUF_F32 = 0,
    MOE_GGUF_F16 = 1,
    MOE_GGUF_Q8_0 = 8,
    MOE_GGUF_BF16 = 30
} moe_gguf_type;

/* The type named f32, f16, bf16 or q8_0 (llama.cpp's --outtype names); -1 for another name. */
int moe_gguf_type_of(const char *name);

/* The name of a type moe_gguf_type_of takes. */
const char *moe_gguf_type_name(moe_gguf_type type);

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
    const char *tokenizer_json; /* a tokenizer.json's text (byte-level BPE, or SentencePiece's
                                   BPE: byte fallback or Metaspace), or NULL: */
    int bytes;                  /* moe prepare's bytes then, else no vocabulary (ids only) */
    const char *tokenizer_name; /* the tokenizer's file, for messages */
    const int32_t *eos;         /* end-of-text ids (the first is written), n_eos of them */
    int n_eos;
    moe_gguf_type type;         /* of the matrices; vectors, norms and routers stay F32, and
                                   so do matrices of rows not whole Q8_0 blocks */
} moe_gguf_meta;

/* Writes path (atomically; an existing file is refused) as the family's llama.cpp
 * architecture: the metadata llama.cpp reads, the tokenizer, every tensor under llama.cpp's
 * name (experts stacked into one tensor per projection, dimensions fastest first). */
moe_status moe_gguf_save(const char *path, const char *family, moe_model *m,
                         const moe_gguf_meta *meta);

/* ---- reading: a GGUF file of those architectures stands where a Hugging Face directory does
 * (moe eval / generate / convert / tokenize --model FILE.gguf, moe train --init-from) */

/* Whether path is a regular file that begins with GGUF's magic. */
int moe_gguf_is_file(const char *path);

typedef struct moe_gguf moe_gguf;
/* Maps and checks a file (versions 2 and 3): the header, every key and value inside the file,
 * no key twice, the alignment, every tensor's info (a name of 1 to 63 bytes, 1 to 4 positive
 * dimensions, offsets aligned; data of the types read here inside the file and apart from the
 * others'; no name twice). */
moe_status moe_gguf_open(const char *path, moe_gguf **out);
void moe_gguf_close(moe_gguf *g);
/* The config.json text (malloc'd) of the file's model for its Hugging Face family's parser:
 * model_type, sizes, heads, experts, RoPE base, eps, positions, tied embeddings, special ids;
 * an architecture other than those written here (or a dense llama), RoPE scaling or a
 * RoPE frequency tensor: an error. */
moe_status moe_gguf_config_json(const moe_gguf *g, char **out);
/* A tokenizer.json text (malloc'd) for the file's vocabulary: gpt2 (byte-level BPE with its
 * merges and split), llama (SentencePiece's: merges from the scores, as Hugging Face's
 * converter makes them); NULL for none (tokenizer.ggml.model none or absent); another: an
 * error. */
moe_status moe_gguf_tokenizer_json(const moe_gguf *g, char **out);
/* The file's tensors by type, in order of first use: "13 tensors: 5 F32, 4 IQ4_XS, 4 IQ4_NL;
 * 0.15 MB of data" (cut at cap). */
void moe_gguf_describe(const moe_gguf *g, char *out, size_t cap);
/* Every parameter of m (created from moe_gguf_config_json's configuration) from the file's
 * tensors (F32, F16, BF16 and the quantised types of docs/FORMATS.md §6), dequantised; shapes
 * checked, values finite, no tensor of the file left unused; nothing changes in m on
 * failure. */
moe_status moe_gguf_load(const moe_gguf *g, const char *family, moe_model *m);

#endif
