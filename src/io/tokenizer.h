/* io/tokenizer — the tokenizers of Hugging Face model directories (tokenizer.json): a BPE model
 * (byte-level as GPT-2, Qwen, OLMoE and DeepSeek use it; SentencePiece-style with byte fallback
 * as Mixtral uses it), added and special tokens, the normalizers, pre-tokenizers,
 * post-processors and decoders those files name. Regular expressions by PCRE2 (UTF, Unicode
 * properties), Unicode normalisation by utf8proc. README "Hugging Face models", docs/FORMATS.md
 * §4. */
#ifndef MOE_IO_TOKENIZER_H
#define MOE_IO_TOKENIZER_H

#include "moe.h"

#include <stddef.h>
#include <stdint.h>

typedef struct moe_tokenizer moe_tokenizer;

/* Reads a tokenizer.json; a component this reader does not implement is refused by name. */
moe_status moe_tokenizer_load(const char *path, moe_tokenizer **out);
/* The same from a tokenizer.json's text (path names it in messages). */
moe_status moe_tokenizer_parse(const char *text, size_t len, const char *path,
                               moe_tokenizer **out);
void moe_tokenizer_free(moe_tokenizer *t);
/* One more than the largest id (model vocabulary and added tokens). */
int moe_tokenizer_size(const moe_tokenizer *t);

/* Encodes len bytes of UTF-8 text (invalid UTF-8 is refused) into *ids (malloc'd, *n of them);
 * with add_special, the post-processor's tokens (a BOS, say) around them. */
moe_status moe_tokenizer_encode(const moe_tokenizer *t, const char *text, size_t len,
                                int add_special, int32_t **ids, int *n);
/* The offset of the first byte of s[0..n) that does not start valid UTF-8; n if all does. */
size_t moe_tokenizer_utf8_bad(const char *s, size_t n);
/* Decodes ids into *text (malloc'd bytes, NUL-terminated, *len without the NUL); special tokens
 * left out with skip_special, ids without a token (a model's padded vocabulary) dropped. */
moe_status moe_tokenizer_decode(const moe_tokenizer *t, const int32_t *ids, int n,
                                int skip_special, char **text, size_t *len);

/* Writes a tokenizer.json for moe prepare's vocabulary (byte b is id b, end-of-text 256, as
 * "<|endoftext|>"): byte-level BPE without merges. */
moe_status moe_tokenizer_write_bytes(const char *path);
/* That file's JSON text (malloc'd; NULL when out of memory). */
char *moe_tokenizer_bytes_json(void);

#endif
