/* io/data — token files and the byte-level tokenizer (docs/FORMATS.md §1).
 *
 * A token file holds one split (train or val) of a prepared corpus: a 64-byte header, the
 * tokens (uint16, or uint32 for vocabularies over 65536; little endian), a document table (where each document starts and which
 * source file it came from) and the source file names. */
#ifndef MOE_IO_DATA_H
#define MOE_IO_DATA_H

#include "moe.h"

#include <stdint.h>

#define MOE_TOKENS_MAGIC "MOETOKNS"
#define MOE_TOKENS_VERSION 1
#define MOE_TOKENS_U16 2 /* dtype code: bytes per token */
#define MOE_TOKENS_U32 4
#define MOE_BYTE_VOCAB 257 /* 256 bytes + end-of-text */
#define MOE_BYTE_EOT 256

typedef struct {
    const void *ids;     /* [n_tokens] uint16 or uint32 (id_bytes), as in the file; read them
                          * with moe_tokens_at */
    int id_bytes;        /* MOE_TOKENS_U16 or MOE_TOKENS_U32 */
    int64_t n_tokens;
    int vocab, eot;
    int64_t n_docs;
    uint64_t *doc_start; /* [n_docs] token index */
    uint32_t *doc_source;/* [n_docs] index into sources */
    int n_sources;
    char **sources;      /* [n_sources] file names */
    void *map;           /* moe_tokens_load: the file, mapped read-only (ids point into it) */
    size_t map_len;
} moe_tokens;

/* Token i (0 <= i < n_tokens). */
static inline uint32_t moe_tokens_at(const moe_tokens *t, int64_t i) {
    return t->id_bytes == MOE_TOKENS_U16 ? ((const uint16_t *)t->ids)[i]
                                         : ((const uint32_t *)t->ids)[i];
}

/* Maps and checks a token file: every length, offset and token id, reserved bytes zero, and
 * every document ending with the end-of-text id. The tokens stay in the mapping, in the file's
 * width (memory: the page cache, shared, not a copy), until moe_tokens_free; only the document
 * table and source names are copied. The file must not be truncated while it is loaded (moe
 * prepare replaces token files by rename, which leaves a loaded one intact). */
moe_status moe_tokens_load(const char *path, moe_tokens *out);
void moe_tokens_free(moe_tokens *t);
/* train.bin and val.bin of one prepare: the same vocabulary and end-of-text id. */
moe_status moe_tokens_check_pair(const char *train_path, const moe_tokens *train,
                                 const char *val_path, const moe_tokens *val);

typedef struct {
    int64_t train_tokens, val_tokens, train_docs, val_docs;
    int n_files;
} moe_prepare_stats;

/* How documents become tokens: NULL: bytes + end-of-text 256 (vocabulary 257); else the ids of
 * a tokenizer (io/tokenizer.h; no special tokens added) + eot, each below vocab. */
struct moe_tokenizer;
typedef struct {
    const struct moe_tokenizer *tokenizer;
    int vocab, eot;
} moe_prepare_vocab;

/* Splits each file into documents (fortune files: lines holding only "%"; other text:
 * paragraphs separated by blank lines), encodes them (bytes + end-of-text, or v's tokenizer),
 * and writes out_dir/train.bin and out_dir/val.bin (a document goes to val when a hash of
 * (seed, its bytes) falls below val_fraction: copies of a document all go to the same side).
 * The splits are streamed to out_dir/{train,val}.bin.next as the files are read, one at a
 * time (memory: one input file, one document's ids, 1 MB a split and 16 bytes a document),
 * then renamed over the old pair together; a failure leaves the old pair and no .next file. */
moe_status moe_prepare(const char *const *files, int n_files, const char *out_dir,
                       double val_fraction, uint64_t seed, const moe_prepare_vocab *v,
                       moe_prepare_stats *stats);

/* Batch b of B windows of S+1 tokens at offsets drawn from (seed, stream): tokens [B*S] and
 * targets [B*S] (the next token). Needs n_tokens > S. */
void moe_tokens_batch(const moe_tokens *t, int B, int S, uint64_t seed, uint64_t stream,
                      int32_t *tokens, int32_t *targets);

/* Several prepared datasets sampled together (Megatron's --data-path W1 DIR1 W2 DIR2 ...): each
 * row is a window of set i with probability weight[i] (the weights sum to 1), set and window
 * drawn from (seed, stream, the row's index). moe_blend_batch: rows [row0, row0 + B); of one set
 * from row 0, moe_tokens_batch's rows. */
#define MOE_BLEND_MAX 64
typedef struct {
    int n;
    const moe_tokens *sets[MOE_BLEND_MAX];
    double weight[MOE_BLEND_MAX];
} moe_blend;
void moe_blend_batch(const moe_blend *b, int64_t row0, int B, int S, uint64_t seed,
                     uint64_t stream, int32_t *tokens, int32_t *targets);

/* The datasets of a --data-path value: a path (also one whose name has spaces), or pairs
 * "W1 DIR1 W2 DIR2 ..." of positive weights and directories (*pairs set, unless NULL). *n
 * paths: pointers into buf (a copy of spec, cap bytes), and their weights scaled to sum to 1. */
moe_status moe_data_spec(const char *spec, char *buf, size_t cap, char **dirs, double *weight,
                         int *n, int *pairs);

/* Writes a file atomically: to path.tmp, fsync, rename over path, fsync of its directory
 * (nothing existing is lost if any step before the rename fails; if the directory's fsync
 * fails, the new file is in place and the error says it may not be durable). */
moe_status moe_write_atomic(const char *path, const void *const *parts, const size_t *sizes,
                            int n_parts);

/* Whether dir/name exists. */
int moe_file_exists(const char *dir, const char *name);
/* mkdir -p */
moe_status moe_mkdirs(const char *path);
/* The whole file, malloc'ed. */
moe_status moe_read_file(const char *path, char **out, size_t *len);

#endif
