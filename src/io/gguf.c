/* GGUF writer: llama.cpp's file layout (version 3, little-endian), its architectures' metadata
 * and tensor names, and a tokenizer.json turned into its vocabulary. docs/FORMATS.md §6. */
#define _POSIX_C_SOURCE 200809L
#include "io/gguf.h"

#include "core/core.h"
#include "io/data.h"
#include "io/hf.h"
#include "io/safetensors.h"
#include "io/tokenizer.h"
#include "kernels/kernels.h"

#include <cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define ALIGN 32 /* general.alignment, llama.cpp's default */

/* GGUF's value types */
enum { G_U8 = 0, G_U32 = 4, G_I32 = 5, G_F32 = 6, G_BOOL = 7, G_STRING = 8, G_ARRAY = 9 };
/* llama.cpp's token types */
enum { TOK_NORMAL = 1, TOK_UNKNOWN = 2, TOK_CONTROL = 3, TOK_USER = 4, TOK_UNUSED = 5,
       TOK_BYTE = 6 };

static const struct {
    moe_gguf_type type;
    const char *name;
    int file_type, block, bytes; /* general.file_type; values and bytes per block */
} out_types[] = {{MOE_GGUF_F32, "f32", 0, 1, 4},
                 {MOE_GGUF_F16, "f16", 1, 1, 2},
                 {MOE_GGUF_BF16, "bf16", 32, 1, 2},
                 {MOE_GGUF_Q8_0, "q8_0", 7, 32, 34}};
#define N_OUT_TYPES (sizeof out_types / sizeof *out_types)

static int out_type(int type) {
    for (size_t i = 0; i < N_OUT_TYPES; i++)
        if ((int)out_types[i].type == type) return (int)i;
    return 0;
}

int moe_gguf_type_of(const char *name) {
    for (size_t i = 0; i < N_OUT_TYPES; i++)
        if (!strcmp(name, out_types[i].name)) return out_types[i].type;
    return -1;
}

const char *moe_gguf_type_name(moe_gguf_type type) { return out_types[out_type(type)].name; }

/* Hugging Face's families and llama.cpp's architectures for them */
static const char *const arch_map[][2] = {
    {"mixtral", "llama"}, {"qwen2_moe", "qwen2moe"}, {"qwen3_moe", "qwen3moe"}, {"olmoe", "olmoe"}};
#define N_ARCHS (sizeof arch_map / sizeof *arch_map)

const char *moe_gguf_arch(const char *family) {
    for (size_t i = 0; i < N_ARCHS; i++)
        if (!strcmp(family, arch_map[i][0])) return arch_map[i][1];
    return NULL;
}

int moe_gguf_compatible(const moe_model_config *c, const char *family, char *why, size_t cap) {
    const char *arch = moe_gguf_arch(family);
    if (!arch) {
        snprintf(why, cap, "llama.cpp's architectures are written for mixtral, qwen2_moe, "
                 "qwen3_moe and olmoe models, not %s", family);
        return 0;
    }
    if (!moe_hf_compatible(c, family, why, cap)) return 0;
    /* llama.cpp's choice per architecture (its graph, not a key): Mixtral and Qwen3-MoE
     * renormalise the k weights, Qwen2-MoE and OLMoE do not */
    int renorm = !strcmp(arch, "llama") || !strcmp(arch, "qwen3moe");
    const char *bad = NULL;
    for (int l = 0; !bad && l < c->n_layers; l++)
        if (!moe_model_layer_experts(c, l)) bad = "llama.cpp's %s has no dense layers";
    if (!bad && moe_hf_renormalised(&c->moe) != renorm)
        bad = renorm ? "llama.cpp's %s renormalises the top-k weights"
                     : "llama.cpp's %s does not renormalise the top-k weights";
    if (!bad && !strcmp(arch, "qwen2moe") && !c->moe.shared_ffn)
        bad = "llama.cpp's %s needs a shared expert";
    if (!bad && !strcmp(arch, "olmoe") && c->n_kv_heads != c->n_heads)
        bad = "llama.cpp's %s needs as many key/value heads as heads";
    if (!bad && (c->moe.n_experts > 512 || c->n_layers > 512))
        bad = "llama.cpp's %s takes at most 512 experts and 512 layers";
    if (bad) snprintf(why, cap, bad, arch);
    return bad == NULL;
}

/* ---- a growing byte buffer */

typedef struct {
    unsigned char *p;
    size_t n, cap;
    int oom;
} gbuf;

static void put(gbuf *b, const void *d, size_t n) {
    if (b->oom || !n) return;
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->n + n) cap *= 2;
        unsigned char *p = realloc(b->p, cap);
        if (!p) {
            b->oom = 1;
            return;
        }
        b->p = p, b->cap = cap;
    }
    memcpy(b->p + b->n, d, n);
    b->n += n;
}
static void put_u32(gbuf *b, uint32_t v) { put(b, &v, 4); }
static void put_u64(gbuf *b, uint64_t v) { put(b, &v, 8); }
static void put_str(gbuf *b, const char *s) {
    put_u64(b, strlen(s));
    put(b, s, strlen(s));
}

/* ---- metadata: key, type, value; n counts the pairs */

typedef struct {
    gbuf b;
    uint64_t n;
} gkv;

static void key(gkv *k, const char *name, uint32_t type) {
    put_str(&k->b, name);
    put_u32(&k->b, type);
    k->n++;
}
static void kv_u32(gkv *k, const char *name, uint32_t v) {
    key(k, name, G_U32);
    put_u32(&k->b, v);
}
static void kv_f32(gkv *k, const char *name, float v) {
    key(k, name, G_F32);
    put(&k->b, &v, 4);
}
static void kv_bool(gkv *k, const char *name, int v) {
    unsigned char c = v != 0;
    key(k, name, G_BOOL);
    put(&k->b, &c, 1);
}
static void kv_str(gkv *k, const char *name, const char *v) {
    key(k, name, G_STRING);
    put_str(&k->b, v);
}
static void kv_array(gkv *k, const char *name, uint32_t type, uint64_t n) {
    key(k, name, G_ARRAY);
    put_u32(&k->b, type);
    put_u64(&k->b, n);
}
/* an architecture's key: "arch.suffix" */
static void kv_arch_u32(gkv *k, const char *arch, const char *suffix, uint32_t v) {
    char name[96];
    snprintf(name, sizeof name, "%s.%s", arch, suffix);
    kv_u32(k, name, v);
}

/* ---- the vocabulary */

/* Qwen2's pre-tokenizer: the regular expression of its tokenizer.json's Split */
#define QWEN2_PATTERN \
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}" \
    "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"

static int is_type(const cJSON *j, const char *type) {
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(j, "type");
    return cJSON_IsString(t) && !strcmp(t->valuestring, type);
}

static int byte_level(const cJSON *j, int use_regex) {
    const cJSON *r = cJSON_GetObjectItemCaseSensitive(j, "use_regex");
    return is_type(j, "ByteLevel") && (r ? cJSON_IsTrue(r) : 1) == use_regex;
}

/* llama.cpp's name of the pre-tokenizer (the split before BPE) of a byte-level vocabulary:
 * GPT-2's regular expression, Qwen2's, or none when there are no merges (any split then gives
 * the same bytes); NULL for another */
static const char *pre_name(const cJSON *tok, int n_merges, const char *arch) {
    const cJSON *pre = cJSON_GetObjectItemCaseSensitive(tok, "pre_tokenizer");
    if (!n_merges) return "default";
    if (byte_level(pre, 1)) return !strcmp(arch, "olmoe") ? "olmo" : "gpt-2";
    const cJSON *seq = cJSON_GetObjectItemCaseSensitive(pre, "pretokenizers");
    if (!is_type(pre, "Sequence") || cJSON_GetArraySize(seq) != 2 ||
        !byte_level(cJSON_GetArrayItem(seq, 1), 0))
        return NULL;
    const cJSON *split = cJSON_GetArrayItem(seq, 0);
    const cJSON *pat = cJSON_GetObjectItemCaseSensitive(split, "pattern");
    const cJSON *re = cJSON_GetObjectItemCaseSensitive(pat, "Regex");
    return is_type(split, "Split") && cJSON_IsString(re) && !strcmp(re->valuestring, QWEN2_PATTERN)
               ? "qwen2" : NULL;
}

/* A merge's two halves as one "a b" string (tokenizer.json has "a b" or ["a", "b"]). */
static char *merge_text(const cJSON *m) {
    if (cJSON_IsString(m)) return strdup(m->valuestring);
    const cJSON *a = cJSON_GetArrayItem(m, 0), *b = cJSON_GetArrayItem(m, 1);
    if (cJSON_GetArraySize(m) != 2 || !cJSON_IsString(a) || !cJSON_IsString(b)) return NULL;
    size_t n = strlen(a->valuestring) + strlen(b->valuestring) + 2;
    char *s = malloc(n);
    if (s) snprintf(s, n, "%s %s", a->valuestring, b->valuestring);
    return s;
}

/* The token ids a text gets with the tokenizer's special tokens: whether it adds one before
 * (*bos) and after (*eos) the text's own. */
static moe_status special_ends(const char *json, const char *name, int32_t *bos, int32_t *eos) {
    moe_tokenizer *t;
    int32_t *with = NULL, *without = NULL;
    int n_with = 0, n_without = 0;
    *bos = *eos = -1;
    MOE_TRY(moe_tokenizer_parse(json, strlen(json), name, &t));
    moe_status s = moe_tokenizer_encode(t, "a", 1, 1, &with, &n_with);
    if (s == MOE_OK) s = moe_tokenizer_encode(t, "a", 1, 0, &without, &n_without);
    if (s == MOE_OK && n_with > n_without) {
        if (with[0] != without[0]) *bos = with[0];
        if (with[n_with - 1] != without[n_without - 1]) *eos = with[n_with - 1];
    }
    free(with), free(without);
    moe_tokenizer_free(t);
    return s;
}

typedef struct {
    char **text;    /* [V] */
    int32_t *type;  /* [V] */
    float *score;   /* [V], SentencePiece's priorities */
    char **merges;
    int n_merges, V;
} vocab;

static void vocab_free(vocab *v) {
    for (int i = 0; v->text && i < v->V; i++) free(v->text[i]);
    for (int i = 0; v->merges && i < v->n_merges; i++) free(v->merges[i]);
    free(v->text), free(v->type), free(v->score), free(v->merges);
}

/* The vocabulary of tokenizer.json's text into v (V ids: the model's; ids without a token
 * become [PADi], unused), and the keys of the tokenizer llama.cpp has for it. */
static moe_status tokenizer_keys(gkv *k, const char *json, const char *path, int V,
                                 const moe_gguf_meta *meta, const char *arch) {
    vocab v = {0};
    moe_status s = MOE_OK;
    cJSON *tok = cJSON_Parse(json);
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(tok, "model");
    const cJSON *words = cJSON_GetObjectItemCaseSensitive(model, "vocab");
    const cJSON *merges = cJSON_GetObjectItemCaseSensitive(model, "merges");
    const cJSON *added = cJSON_GetObjectItemCaseSensitive(tok, "added_tokens");
    const cJSON *fallback = cJSON_GetObjectItemCaseSensitive(model, "byte_fallback");
    /* SentencePiece's BPE: byte fallback, or words marked by ▁ (Metaspace, or a normaliser
     * that puts it for spaces) */
    char *norm = cJSON_PrintUnformatted(cJSON_GetObjectItemCaseSensitive(tok, "normalizer"));
    int spm = cJSON_IsTrue(fallback) || (norm && strstr(norm, "\u2581")) ||
              is_type(cJSON_GetObjectItemCaseSensitive(tok, "pre_tokenizer"), "Metaspace");
    free(norm);
    const char *where = path ? path : "moe prepare's byte vocabulary";
    if (!tok || !is_type(model, "BPE") || !cJSON_IsObject(words) || !cJSON_IsArray(merges)) {
        cJSON_Delete(tok);
        return moe_set_error(MOE_ERR_INVALID, "%s: llama.cpp's vocabularies are written from a "
                             "BPE tokenizer.json", where);
    }
    v.V = V;
    v.n_merges = cJSON_GetArraySize(merges);
    v.text = calloc((size_t)V, sizeof *v.text);
    v.type = calloc((size_t)V, sizeof *v.type);
    v.score = calloc((size_t)V, sizeof *v.score);
    v.merges = calloc((size_t)v.n_merges + 1, sizeof *v.merges);
    if (!v.text || !v.type || !v.score || !v.merges)
        s = moe_set_error(MOE_ERR_NOMEM, "out of memory");
    const cJSON *w;
    cJSON_ArrayForEach(w, words) {
        int id = cJSON_IsNumber(w) ? w->valueint : -1;
        if (s != MOE_OK) break;
        if (id < 0 || id >= V || v.text[id])
            s = moe_set_error(MOE_ERR_INVALID, "%s: token \"%s\" has id %d, %s", where, w->string,
                              id, id < 0 || id >= V ? "outside the model's vocabulary" : "twice");
        else if (!(v.text[id] = strdup(w->string)))
            s = moe_set_error(MOE_ERR_NOMEM, "out of memory");
        else {
            unsigned b;
            char end;
            int byte = spm && sscanf(w->string, "<0x%2X>%c", &b, &end) == 1;
            v.type[id] = byte ? TOK_BYTE : TOK_NORMAL;
        }
    }
    cJSON_ArrayForEach(w, added) {
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(w, "id"),
                    *text = cJSON_GetObjectItemCaseSensitive(w, "content");
        if (s != MOE_OK) break;
        if (!cJSON_IsNumber(id) || !cJSON_IsString(text) || id->valueint < 0 || id->valueint >= V) {
            s = moe_set_error(MOE_ERR_INVALID, "%s: an added token without an id of the model's "
                              "vocabulary (%d ids)", where, V);
            break;
        }
        int i = id->valueint;
        free(v.text[i]);
        if (!(v.text[i] = strdup(text->valuestring)))
            s = moe_set_error(MOE_ERR_NOMEM, "out of memory");
        int special = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(w, "special"));
        v.type[i] = special ? TOK_CONTROL : TOK_USER;
    }
    const cJSON *unk = cJSON_GetObjectItemCaseSensitive(model, "unk_token");
    const cJSON *unk_id =
        cJSON_IsString(unk) ? cJSON_GetObjectItemCaseSensitive(words, unk->valuestring) : NULL;
    int unknown = cJSON_IsNumber(unk_id) && unk_id->valueint >= 0 && unk_id->valueint < V
                      ? unk_id->valueint : -1;
    if (s == MOE_OK && unknown >= 0) v.type[unknown] = TOK_UNKNOWN;
    for (int i = 0; s == MOE_OK && i < V; i++)
        if (!v.text[i]) {
            char pad[32];
            snprintf(pad, sizeof pad, "[PAD%d]", i);
            if (!(v.text[i] = strdup(pad))) s = moe_set_error(MOE_ERR_NOMEM, "out of memory");
            v.type[i] = TOK_UNUSED;
        }
    int i = 0;
    const cJSON *m;
    cJSON_ArrayForEach(m, merges) {
        if (s != MOE_OK) break;
        if (!(v.merges[i] = merge_text(m)) || !strchr(v.merges[i] + 1, ' '))
            s = moe_set_error(MOE_ERR_INVALID, "%s: merge %d is not \"a b\" or [\"a\", \"b\"]",
                              where, i);
        i++;
    }
    /* SentencePiece's BPE merges the pair whose token scores highest: the merge's rank, first
     * highest; tokens no merge makes below every merge */
    for (int t = 0; s == MOE_OK && spm && t < V; t++) v.score[t] = -(float)(v.n_merges + t);
    for (i = 0; s == MOE_OK && spm && i < v.n_merges; i++) {
        char joined[1024];
        const char *sp = strchr(v.merges[i] + 1, ' ');
        snprintf(joined, sizeof joined, "%.*s%s", (int)(sp - v.merges[i]), v.merges[i], sp + 1);
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(words, joined);
        if (cJSON_IsNumber(id) && id->valueint >= 0 && id->valueint < V &&
            v.score[id->valueint] < -(float)i)
            v.score[id->valueint] = -(float)i;
    }
    /* llama.cpp's SentencePiece tokenizer spells a character it has no token for in byte tokens,
     * and stops when one is missing */
    int bytes = 0;
    for (int t = 0; spm && t < V; t++) bytes += v.type[t] == TOK_BYTE;
    if (s == MOE_OK && spm && bytes < 256)
        s = moe_set_error(MOE_ERR_INVALID, "%s: llama.cpp's SentencePiece vocabulary needs the 256 "
                          "byte tokens <0x00> ... <0xFF> (byte fallback); this one has %d", where,
                          bytes);
    const char *pre = spm ? NULL : pre_name(tok, v.n_merges, arch);
    if (s == MOE_OK && !spm && !pre)
        s = moe_set_error(MOE_ERR_INVALID, "%s: its pre-tokenizer is neither GPT-2's nor Qwen2's "
                          "split, the ones llama.cpp is told of here", where);
    int32_t bos = -1, eos = -1;
    if (s == MOE_OK) s = special_ends(json, where, &bos, &eos);
    if (s == MOE_OK) {
        kv_str(k, "tokenizer.ggml.model", spm ? "llama" : "gpt2");
        if (pre) kv_str(k, "tokenizer.ggml.pre", pre);
        kv_array(k, "tokenizer.ggml.tokens", G_STRING, (uint64_t)V);
        for (int t = 0; t < V; t++) put_str(&k->b, v.text[t]);
        kv_array(k, "tokenizer.ggml.token_type", G_I32, (uint64_t)V);
        put(&k->b, v.type, sizeof(int32_t) * (size_t)V);
        if (spm) {
            kv_array(k, "tokenizer.ggml.scores", G_F32, (uint64_t)V);
            put(&k->b, v.score, sizeof(float) * (size_t)V);
        } else {
            kv_array(k, "tokenizer.ggml.merges", G_STRING, (uint64_t)v.n_merges);
            for (i = 0; i < v.n_merges; i++) put_str(&k->b, v.merges[i]);
        }
        if (bos >= 0) kv_u32(k, "tokenizer.ggml.bos_token_id", (uint32_t)bos);
        if (unknown >= 0) kv_u32(k, "tokenizer.ggml.unknown_token_id", (uint32_t)unknown);
        int32_t end = meta->n_eos ? meta->eos[0] : eos;
        if (end >= 0) kv_u32(k, "tokenizer.ggml.eos_token_id", (uint32_t)end);
        kv_bool(k, "tokenizer.ggml.add_bos_token", bos >= 0);
        kv_bool(k, "tokenizer.ggml.add_eos_token", eos >= 0);
    }
    vocab_free(&v);
    cJSON_Delete(tok);
    return s;
}

/* ---- tensors */

typedef struct {
    char name[64];
    int ndim, type;
    uint64_t ne[4];
    size_t bytes;
    int first_part, n_parts; /* of the file's parts (its data, then padding) */
} gtensor;

typedef struct {
    const moe_model_config *c;
    const char *arch;
    moe_gguf_type type;
    gtensor *t;
    int n_t;
    const void **parts;
    size_t *sizes;
    int n_parts, cap_parts;
    void **owned; /* converted or permuted copies */
    int n_owned;
} gfile;

static moe_status add_part(gfile *g, const void *p, size_t n) {
    if (g->n_parts == g->cap_parts) {
        int cap = g->cap_parts ? 2 * g->cap_parts : 1024;
        const void **parts = realloc(g->parts, sizeof *parts * (size_t)cap);
        if (parts) g->parts = parts;
        size_t *sizes = parts ? realloc(g->sizes, sizeof *sizes * (size_t)cap) : NULL;
        if (!sizes) return moe_set_error(MOE_ERR_NOMEM, "out of memory");
        g->sizes = sizes, g->cap_parts = cap;
    }
    g->parts[g->n_parts] = p, g->sizes[g->n_parts++] = n;
    return MOE_OK;
}

static void *own(gfile *g, size_t n) {
    void *p = malloc(n ? n : 1);
    void **o = p ? realloc(g->owned, sizeof *o * (size_t)(g->n_owned + 1)) : NULL;
    if (!o) {
        free(p);
        return NULL;
    }
    g->owned = o;
    return o[g->n_owned++] = p;
}

/* IEEE half of f, rounded to nearest even; 0 when it does not fit (|f| rounds past 65504). */
static int f32_to_f16(float f, uint16_t *h) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000, ax = x & 0x7fffffffu;
    if (ax >= 0x477ff000u) return 0; /* 65520 and up (and inf, nan) */
    if (ax < 0x38800000u) { /* below 2^-14: a multiple of 2^-24 */
        *h = (uint16_t)(sign | (uint32_t)nearbyintf(fabsf(f) * 0x1p24f));
        return 1;
    }
    ax += 0xfffu + ((ax >> 13) & 1);
    *h = (uint16_t)(sign | ((ax - 0x38000000u) >> 13));
    return 1;
}

/* ggml's Q8_0 of n floats (rows of whole blocks of 32), as its quantize_row_q8_0_ref: d =
 * max |x| / 127 (stored in f16), q = x / d rounded half away from 0. */
static moe_status to_q8_0(const float *x, size_t n, unsigned char *out, const char *name) {
    for (size_t b = 0; b < n / 32; b++, x += 32, out += 34) {
        float amax = 0;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[j]));
        float d = amax / 127, id = d != 0 ? 1.0f / d : 0.0f;
        uint16_t h;
        if (!f32_to_f16(d, &h))
            return moe_set_error(MOE_ERR_INVALID, "%s holds %g, beyond what Q8_0's float16 "
                                 "scale reaches: write bf16 or f32", name, (double)amax);
        memcpy(out, &h, 2);
        for (int j = 0; j < 32; j++) out[2 + j] = (unsigned char)(int8_t)roundf(x[j] * id);
    }
    return MOE_OK;
}

/* n floats of src as type into the file (a copy unless F32). */
static moe_status add_data(gfile *g, const float *src, size_t n, int type, const char *name) {
    if (type == MOE_GGUF_F32) return add_part(g, src, sizeof(float) * n);
    if (type == MOE_GGUF_Q8_0) {
        unsigned char *q = own(g, n / 32 * 34);
        if (!q) return moe_set_error(MOE_ERR_NOMEM, "out of memory");
        MOE_TRY(to_q8_0(src, n, q, name));
        return add_part(g, q, n / 32 * 34);
    }
    uint16_t *h = own(g, 2 * n);
    if (!h) return moe_set_error(MOE_ERR_NOMEM, "out of memory");
    if (type == MOE_GGUF_BF16) moe_f32_to_bf16_serial(src, h, n);
    else
        for (size_t i = 0; i < n; i++)
            if (!f32_to_f16(src[i], h + i))
                return moe_set_error(MOE_ERR_INVALID, "%s holds %g, beyond float16's range: "
                                     "write bf16 or f32", name, (double)src[i]);
    return add_part(g, h, 2 * n);
}

/* A new tensor named name, dims the reverse of shape[0..ndim) (ggml's fastest first). */
static gtensor *new_tensor(gfile *g, const char *name, int ndim, const int64_t *shape, int type) {
    gtensor *t = &g->t[g->n_t++];
    snprintf(t->name, sizeof t->name, "%s", name);
    t->ndim = ndim, t->type = type, t->first_part = g->n_parts, t->n_parts = 0, t->bytes = 0;
    for (int i = 0; i < ndim; i++) t->ne[i] = (uint64_t)shape[ndim - 1 - i];
    return t;
}

/* Appends rows [rows, cols] of src to t, q or k rows of llama reordered into llama.cpp's RoPE
 * pairs: row h hd + 2 i + j of head h is row h hd + j hd/2 + i (convert_hf_to_gguf's permute) */
static moe_status append(gfile *g, gtensor *t, const float *src, int64_t rows, int64_t cols,
                         int heads) {
    size_t n = (size_t)(rows * cols);
    if (heads) {
        float *p = own(g, sizeof(float) * n);
        if (!p) return moe_set_error(MOE_ERR_NOMEM, "out of memory");
        int64_t hd = rows / heads;
        for (int64_t r = 0; r < rows; r++) {
            int64_t h = r / hd, i = (r % hd) / 2, j = r % 2;
            memcpy(p + r * cols, src + (h * hd + j * (hd / 2) + i) * cols,
                   sizeof(float) * (size_t)cols);
        }
        src = p;
    }
    int before = g->n_parts;
    MOE_TRY(add_data(g, src, n, t->type, t->name));
    t->n_parts += g->n_parts - before;
    int ot = out_type(t->type);
    t->bytes += n / (size_t)out_types[ot].block * (size_t)out_types[ot].bytes;
    return MOE_OK;
}

/* Our name's llama.cpp name ("blk.%d." + suffix for a layer's), the expert index of a routed
 * expert's projection (else -1) and, for llama, the heads of q and k rows to reorder. */
typedef struct {
    const char *ours, *theirs;
} name_map;

static const name_map layer_names[] = {
    {"input_layernorm.weight", "attn_norm.weight"},
    {"post_attention_layernorm.weight", "ffn_norm.weight"},
    {"self_attn.q_proj.weight", "attn_q.weight"},
    {"self_attn.k_proj.weight", "attn_k.weight"},
    {"self_attn.v_proj.weight", "attn_v.weight"},
    {"self_attn.o_proj.weight", "attn_output.weight"},
    {"self_attn.q_proj.bias", "attn_q.bias"},
    {"self_attn.k_proj.bias", "attn_k.bias"},
    {"self_attn.v_proj.bias", "attn_v.bias"},
    {"self_attn.q_norm.weight", "attn_q_norm.weight"},
    {"self_attn.k_norm.weight", "attn_k_norm.weight"},
    {"mlp.gate.weight", "ffn_gate_inp.weight"},
    {"mlp.shared_expert.gate_proj.weight", "ffn_gate_shexp.weight"},
    {"mlp.shared_expert.up_proj.weight", "ffn_up_shexp.weight"},
    {"mlp.shared_expert.down_proj.weight", "ffn_down_shexp.weight"},
    {"mlp.shared_expert_gate.weight", "ffn_gate_inp_shexp.weight"},
    {"gate_proj.weight", "ffn_gate_exps.weight"},       {"up_proj.weight", "ffn_up_exps.weight"},
    {"down_proj.weight", "ffn_down_exps.weight"},
};

static int gguf_name(const char *arch, const moe_model_config *c, const char *ours, char *out,
                     size_t cap, int *expert, int *heads) {
    static const name_map global[] = {{"model.embed_tokens.weight", "token_embd.weight"},
                                      {"model.norm.weight", "output_norm.weight"},
                                      {"lm_head.weight", "output.weight"}};
    *expert = -1, *heads = 0;
    for (size_t i = 0; i < sizeof global / sizeof *global; i++)
        if (!strcmp(ours, global[i].ours)) return snprintf(out, cap, "%s", global[i].theirs), 1;
    int l, at = 0, e;
    if (sscanf(ours, "model.layers.%d.%n", &l, &at) != 1 || !at) return 0;
    const char *rest = ours + at;
    int eat = 0;
    if (sscanf(rest, "mlp.experts.%d.%n", &e, &eat) == 1 && eat) rest += eat, *expert = e;
    for (size_t i = 0; i < sizeof layer_names / sizeof *layer_names; i++) {
        int routed = i >= sizeof layer_names / sizeof *layer_names - 3;
        if (routed != (*expert >= 0) || strcmp(rest, layer_names[i].ours)) continue;
        if (!strcmp(arch, "llama") && !strncmp(rest, "self_attn.", 10) && rest[11] == '_')
            *heads = rest[10] == 'q' ? c->n_heads : rest[10] == 'k' ? c->n_kv_heads : 0;
        return snprintf(out, cap, "blk.%d.%s", l, layer_names[i].theirs), 1;
    }
    return 0;
}

/* Vectors, norms and the routers stay F32 (as llama.cpp's converter keeps them), and so do
 * matrices whose rows of cols values are not whole blocks of the type. */
static int tensor_type(const gfile *g, const char *name, int ndim, int64_t cols) {
    size_t n = strlen(name);
    if (ndim < 2 || strstr(name, "ffn_gate_inp") ||
        (n > 12 && !strcmp(name + n - 12, "_norm.weight")) ||
        cols % out_types[out_type(g->type)].block)
        return MOE_GGUF_F32;
    return g->type;
}

/* Every tensor of m: the routed experts' projections of a layer stacked, [E, rows, cols]
 * (each expert's at its index), after the layer's other tensors. */
static moe_status add_tensors(gfile *g, moe_model *m) {
    const moe_model_config *c = g->c;
    const float *p = moe_model_params(m);
    int n = moe_model_n_tensors(m), emb = -1, E = c->moe.n_experts, L = c->n_layers;
    int *stack = malloc(sizeof(int) * 3 * (size_t)(L * E)); /* [L, 3, E]: the tensors' indices */
    if (!stack) return moe_set_error(MOE_ERR_NOMEM, "out of memory");
    for (int i = 0; i < 3 * L * E; i++) stack[i] = -1;
    moe_status s = MOE_OK;
    for (int i = 0; s == MOE_OK && i < n; i++) {
        const moe_tensor_info *ti = moe_model_tensor(m, i);
        char name[64];
        int expert, heads, l;
        if (!gguf_name(g->arch, c, ti->name, name, sizeof name, &expert, &heads)) {
            s = moe_set_error(MOE_ERR_INVALID, "%s has no name in llama.cpp's %s", ti->name,
                              g->arch);
        } else if (expert >= 0 && sscanf(name, "blk.%d.", &l) == 1 && l < L && expert < E) {
            stack[(3 * l + (strstr(name, "gate_exps") ? 0 : strstr(name, "up_exps") ? 1 : 2)) * E +
                  expert] = i;
        } else {
            if (!strcmp(ti->name, "model.embed_tokens.weight")) emb = i;
            gtensor *t = new_tensor(g, name, ti->ndim, ti->shape,
                                    tensor_type(g, name, ti->ndim, ti->shape[ti->ndim - 1]));
            s = append(g, t, p + ti->offset, ti->shape[0], ti->ndim > 1 ? ti->shape[1] : 1, heads);
        }
    }
    for (int q = 0; s == MOE_OK && q < 3 * L; q++) {
        gtensor *t = NULL;
        for (int e = 0; s == MOE_OK && e < E; e++) {
            int at = stack[q * E + e];
            const moe_tensor_info *ti = at < 0 ? NULL : moe_model_tensor(m, at);
            if (!ti) {
                s = moe_set_error(MOE_ERR_INVALID, "layer %d has no expert %d", q / 3, e);
                break;
            }
            if (!t) {
                char name[64];
                int expert, heads;
                gguf_name(g->arch, c, ti->name, name, sizeof name, &expert, &heads);
                int64_t shape[3] = {E, ti->shape[0], ti->shape[1]};
                t = new_tensor(g, name, 3, shape, tensor_type(g, name, 3, ti->shape[1]));
            }
            s = append(g, t, p + ti->offset, ti->shape[0], ti->shape[1], 0);
        }
    }
    /* tied embeddings: qwen2moe and olmoe need output.weight (llama and qwen3moe reuse
     * token_embd) */
    int need_output = !strcmp(g->arch, "qwen2moe") || !strcmp(g->arch, "olmoe");
    if (s == MOE_OK && c->tie_embeddings && need_output && emb >= 0) {
        const moe_tensor_info *ti = moe_model_tensor(m, emb);
        gtensor *t = new_tensor(g, "output.weight", 2, ti->shape,
                                tensor_type(g, "output.weight", 2, ti->shape[1]));
        s = append(g, t, p + ti->offset, ti->shape[0], ti->shape[1], 0);
    }
    free(stack);
    return s;
}

/* ---- the file */

static void model_keys(gkv *k, const gfile *g, const moe_gguf_meta *meta) {
    const moe_model_config *c = g->c;
    const char *a = g->arch;
    int hd = moe_model_head_dim(c), qwen = !strncmp(a, "qwen", 4);
    kv_str(k, "general.architecture", a);
    kv_str(k, "general.name", meta->name);
    kv_u32(k, "general.file_type", (uint32_t)out_types[out_type(g->type)].file_type);
    kv_u32(k, "general.alignment", ALIGN);
    kv_arch_u32(k, a, "vocab_size", (uint32_t)c->vocab);
    kv_arch_u32(k, a, "context_length", (uint32_t)meta->context_length);
    kv_arch_u32(k, a, "embedding_length", (uint32_t)c->d);
    kv_arch_u32(k, a, "block_count", (uint32_t)c->n_layers);
    /* llama and olmoe: the experts' width; the Qwen families: the dense MLP's */
    kv_arch_u32(k, a, "feed_forward_length", (uint32_t)(qwen ? c->ffn : c->moe.ffn));
    kv_arch_u32(k, a, "expert_feed_forward_length", (uint32_t)c->moe.ffn);
    if (c->moe.shared_ffn)
        kv_arch_u32(k, a, "expert_shared_feed_forward_length", (uint32_t)c->moe.shared_ffn);
    kv_arch_u32(k, a, "expert_count", (uint32_t)c->moe.n_experts);
    kv_arch_u32(k, a, "expert_used_count", (uint32_t)c->moe.topk);
    kv_arch_u32(k, a, "attention.head_count", (uint32_t)c->n_heads);
    kv_arch_u32(k, a, "attention.head_count_kv", (uint32_t)c->n_kv_heads);
    kv_arch_u32(k, a, "attention.key_length", (uint32_t)hd);
    kv_arch_u32(k, a, "attention.value_length", (uint32_t)hd);
    kv_arch_u32(k, a, "rope.dimension_count", (uint32_t)hd);
    char name[96];
    snprintf(name, sizeof name, "%s.rope.freq_base", a);
    kv_f32(k, name, c->rope_theta);
    snprintf(name, sizeof name, "%s.attention.layer_norm_rms_epsilon", a);
    kv_f32(k, name, c->norm_eps);
}

static moe_status vocabulary_keys(gkv *k, const gfile *g, const moe_gguf_meta *meta) {
    int V = g->c->vocab;
    if (meta->tokenizer_json)
        return tokenizer_keys(k, meta->tokenizer_json, meta->tokenizer_name, V, meta, g->arch);
    if (meta->bytes) {
        char *json = moe_tokenizer_bytes_json();
        if (!json) return moe_set_error(MOE_ERR_NOMEM, "out of memory");
        moe_gguf_meta bytes = *meta;
        int32_t eot = MOE_BYTE_EOT;
        bytes.eos = &eot, bytes.n_eos = 1;
        moe_status s = tokenizer_keys(k, json, NULL, V, &bytes, g->arch);
        free(json);
        return s;
    }
    kv_str(k, "tokenizer.ggml.model", "none"); /* ids only */
    return MOE_OK;
}

moe_status moe_gguf_save(const char *path, const char *family, moe_model *m,
                         const moe_gguf_meta *meta) {
    const moe_model_config *c = moe_model_get_config(m);
    char why[256];
    if (!moe_gguf_compatible(c, family, why, sizeof why))
        return moe_set_error(MOE_ERR_INVALID, "cannot write llama.cpp's GGUF of this %s model: %s",
                             family, why);
    struct stat sb;
    if (stat(path, &sb) == 0)
        return moe_set_error(MOE_ERR_INVALID, "%s already exists; choose a new file", path);
    gfile g = {c, moe_gguf_arch(family), meta->type, NULL, 0, NULL, NULL, 0, 0, NULL, 0};
    gkv k = {0};
    gbuf head = {0};
    static const unsigned char zeros[ALIGN];
    g.t = calloc((size_t)moe_model_n_tensors(m) + 1, sizeof *g.t);
    moe_status s = g.t ? add_tensors(&g, m) : moe_set_error(MOE_ERR_NOMEM, "out of memory");
    if (s == MOE_OK) {
        model_keys(&k, &g, meta);
        s = vocabulary_keys(&k, &g, meta);
    }
    /* header: magic, version, counts, the metadata, the tensors' infos; each tensor's data at
     * the running sum of the ones before, each padded to ALIGN */
    put(&head, "GGUF", 4);
    put_u32(&head, 3);
    put_u64(&head, (uint64_t)g.n_t);
    put_u64(&head, k.n);
    put(&head, k.b.p, k.b.n);
    uint64_t off = 0;
    for (int i = 0; i < g.n_t; i++) {
        const gtensor *t = &g.t[i];
        put_str(&head, t->name);
        put_u32(&head, (uint32_t)t->ndim);
        for (int d = 0; d < t->ndim; d++) put_u64(&head, t->ne[d]);
        put_u32(&head, (uint32_t)t->type);
        put_u64(&head, off);
        off += (t->bytes + ALIGN - 1) / ALIGN * ALIGN;
    }
    put(&head, zeros, (ALIGN - head.n % ALIGN) % ALIGN);
    if (s == MOE_OK && (head.oom || k.b.oom)) s = moe_set_error(MOE_ERR_NOMEM, "out of memory");
    /* the parts in file order: the header, then each tensor's data and padding */
    const void **parts = NULL;
    size_t *sizes = NULL;
    int n = 0;
    if (s == MOE_OK) {
        parts = malloc(sizeof *parts * (size_t)(g.n_parts + g.n_t + 1));
        sizes = malloc(sizeof *sizes * (size_t)(g.n_parts + g.n_t + 1));
        if (!parts || !sizes) s = moe_set_error(MOE_ERR_NOMEM, "out of memory");
    }
    if (s == MOE_OK) {
        parts[n] = head.p, sizes[n++] = head.n;
        for (int i = 0; i < g.n_t; i++) {
            const gtensor *t = &g.t[i];
            for (int q = t->first_part; q < t->first_part + t->n_parts; q++)
                parts[n] = g.parts[q], sizes[n++] = g.sizes[q];
            parts[n] = zeros, sizes[n++] = (ALIGN - t->bytes % ALIGN) % ALIGN;
        }
        s = moe_write_atomic(path, parts, sizes, n);
    }
    free(parts), free(sizes), free(head.p), free(k.b.p), free(g.t), free(g.parts), free(g.sizes);
    for (int i = 0; i < g.n_owned; i++) free(g.owned[i]);
    free(g.owned);
    return s;
}

/* ================================================================ reading */

/* ggml's types read here: elements and bytes per block, and the block's values. The block
 * layouts are ggml's (ggml-common.h), the arithmetic that of its dequantize_row_* in the same
 * order, so the values are the ones llama.cpp computes from the file. */
typedef void (*dequant_fn)(const unsigned char *p, float *out, size_t blocks);
typedef struct {
    int id, block, bytes;
    const char *name;
    dequant_fn dq;
} ggml_type;

static float half_at(const unsigned char *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return moe_f16_to_f32(h);
}

static void dq_f32(const unsigned char *p, float *out, size_t n) { memcpy(out, p, 4 * n); }

static void dq_f16(const unsigned char *p, float *out, size_t n) {
    for (size_t i = 0; i < n; i++) out[i] = half_at(p + 2 * i);
}

static void dq_bf16(const unsigned char *p, float *out, size_t n) {
    for (size_t i = 0; i < n; i++) {
        uint32_t u = (uint32_t)p[2 * i] << 16 | (uint32_t)p[2 * i + 1] << 24;
        memcpy(&out[i], &u, 4);
    }
}

/* Q8_0 (34 bytes): d, 32 signed bytes q; d q */
static void dq_q8_0(const unsigned char *p, float *out, size_t n) {
    for (size_t b = 0; b < n; b++, p += 34, out += 32) {
        float d = half_at(p);
        for (int i = 0; i < 32; i++) out[i] = d * (float)(int8_t)p[2 + i];
    }
}

/* Q4_0, Q4_1, Q5_0, Q5_1: d (and m for _1), for Q5 32 fifth bits (bit j of value j), then 16
 * bytes of low nibbles (value j) and high nibbles (value j + 16); values (q - 8) d for Q4_0,
 * (q - 16) d for Q5_0, q d + m for the _1 types */
static void dq_legacy(const unsigned char *p, float *out, size_t n, int bytes, int has_min,
                      int five) {
    for (size_t b = 0; b < n; b++, p += bytes, out += 32) {
        float d = half_at(p), m = has_min ? half_at(p + 2) : 0.0f;
        const unsigned char *q = p + 2 + 2 * has_min + 4 * five;
        uint32_t qh = 0;
        if (five) memcpy(&qh, p + 2 + 2 * has_min, 4);
        int off = has_min ? 0 : five ? 16 : 8;
        for (int j = 0; j < 16; j++) {
            int lo = (q[j] & 15) | (int)((qh >> j) << 4 & 16);
            int hi = (q[j] >> 4) | (int)((qh >> (j + 12)) & 16);
            out[j] = has_min ? (float)lo * d + m : (float)(lo - off) * d;
            out[j + 16] = has_min ? (float)hi * d + m : (float)(hi - off) * d;
        }
    }
}
static void dq_q4_0(const unsigned char *p, float *o, size_t n) { dq_legacy(p, o, n, 18, 0, 0); }
static void dq_q4_1(const unsigned char *p, float *o, size_t n) { dq_legacy(p, o, n, 20, 1, 0); }
static void dq_q5_0(const unsigned char *p, float *o, size_t n) { dq_legacy(p, o, n, 22, 0, 1); }
static void dq_q5_1(const unsigned char *p, float *o, size_t n) { dq_legacy(p, o, n, 24, 1, 1); }

/* The K-quants: super-blocks of 256 values in sub-blocks of 16 or 32, each with a scale (and a
 * minimum) that the super-block's d (and dmin) multiply. */

/* Q2_K (84 bytes): 16 bytes of 4-bit scale | 4-bit minimum, 64 bytes of 2-bit q, d, dmin.
 * Values in two halves of 128: the 4 shifts of bytes 0-31, 16 values a scale. */
static void dq_q2_k(const unsigned char *p, float *out, size_t n) {
    for (size_t b = 0; b < n; b++, p += 84) {
        float d = half_at(p + 80), min = half_at(p + 82);
        const unsigned char *q = p + 16;
        int is = 0;
        for (int h = 0; h < 2; h++, q += 32)
            for (int shift = 0; shift < 8; shift += 2)
                for (int part = 0; part < 2; part++) {
                    int sc = p[is++];
                    float dl = d * (float)(sc & 15), ml = min * (float)(sc >> 4);
                    for (int l = 0; l < 16; l++)
                        *out++ = dl * (float)(q[l + 16 * part] >> shift & 3) - ml;
                }
    }
}

/* Q3_K (110 bytes): 32 bytes of high bits (hmask), 64 bytes of 2-bit q, 12 bytes of 16 6-bit
 * scales (stored minus 32: low 4 bits of scale j in byte j % 8, nibble j / 8; high 2 bits in
 * byte 8 + j % 4, bits 2 (j / 4)), d. Value: d (scale - 32) (q - (hmask bit ? 0 : 4)). */
static void dq_q3_k(const unsigned char *p, float *out, size_t n) {
    for (size_t b = 0; b < n; b++, p += 110) {
        const unsigned char *hm = p, *q = p + 32, *s = p + 96;
        float d = half_at(p + 108);
        int8_t sc[16];
        for (int j = 0; j < 16; j++)
            sc[j] = (int8_t)(((s[j % 8] >> (4 * (j / 8)) & 15) | (s[8 + j % 4] >> (2 * (j / 4)) & 3)
                              << 4) - 32);
        int is = 0, m = 1;
        for (int h = 0; h < 2; h++, q += 32)
            for (int shift = 0; shift < 8; shift += 2, m <<= 1)
                for (int part = 0; part < 2; part++) {
                    float dl = d * (float)sc[is++];
                    for (int l = 16 * part; l < 16 * part + 16; l++)
                        *out++ = dl * (float)((q[l] >> shift & 3) - (hm[l] & m ? 0 : 4));
                }
    }
}

/* Q4_K's and Q5_K's 8 6-bit scales and minimums in 12 bytes: j < 4 in the low 6 bits of bytes
 * j and j + 4; j >= 4 in byte j + 4's nibbles and the top 2 bits of bytes j - 4 and j */
static void scale_min_k4(int j, const unsigned char *s, int *sc, int *m) {
    if (j < 4) {
        *sc = s[j] & 63, *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 15) | (s[j - 4] >> 6) << 4;
        *m = (s[j + 4] >> 4) | (s[j] >> 6) << 4;
    }
}

/* Q4_K (144 bytes): d, dmin, 12 bytes of scales, 128 bytes of nibbles; Q5_K (176 bytes): the
 * same with 32 bytes of fifth bits (qh) before the nibbles. Each 64 values: 32 bytes' low
 * nibbles (scale 2i), then their high ones (scale 2i + 1); value d sc q - dmin m. */
static void dq_k45(const unsigned char *p, float *out, size_t n, int five) {
    int bytes = five ? 176 : 144;
    for (size_t b = 0; b < n; b++, p += bytes) {
        float d = half_at(p), min = half_at(p + 2);
        const unsigned char *qh = p + 16, *q = p + 16 + 32 * five;
        for (int i = 0; i < 4; i++, q += 32)
            for (int half = 0; half < 2; half++) {
                int sc, m;
                scale_min_k4(2 * i + half, p + 4, &sc, &m);
                float d1 = d * (float)sc, m1 = min * (float)m;
                for (int l = 0; l < 32; l++) {
                    int v = (half ? q[l] >> 4 : q[l] & 15) |
                            (five && qh[l] >> (2 * i + half) & 1 ? 16 : 0);
                    *out++ = d1 * (float)v - m1;
                }
            }
    }
}
static void dq_q4_k(const unsigned char *p, float *o, size_t n) { dq_k45(p, o, n, 0); }
static void dq_q5_k(const unsigned char *p, float *o, size_t n) { dq_k45(p, o, n, 1); }

/* Q6_K (210 bytes): 128 bytes of low nibbles (ql), 64 bytes of 2-bit highs (qh), 16 signed
 * scales, d. Each 128 values: ql 0-31 low, 32-63 low, 0-31 high, 32-63 high nibbles with qh's
 * bits 0-1, 2-3, 4-5, 6-7; a scale per 16; value d sc (q - 32). */
static void dq_q6_k(const unsigned char *p, float *out, size_t n) {
    for (size_t b = 0; b < n; b++, p += 210) {
        float d = half_at(p + 208);
        const unsigned char *ql = p, *qh = p + 128;
        const int8_t *sc = (const int8_t *)(p + 192);
        for (int h = 0; h < 2; h++, ql += 64, qh += 32, sc += 8, out += 128)
            for (int l = 0; l < 32; l++)
                for (int r = 0; r < 4; r++) {
                    int q = ((r & 1 ? ql[l + 32] : ql[l]) >> (4 * (r >> 1)) & 15) |
                            (qh[l] >> (2 * r) & 3) << 4;
                    out[32 * r + l] = d * (float)sc[l / 16 + 2 * r] * (float)(q - 32);
                }
    }
}

/* IQ4_NL and IQ4_XS: nibbles that index a fixed non-linear table (ggml's kvalues_iq4nl), 32
 * values a scale: the low nibbles of 16 bytes values 0-15, the high ones 16-31. */
static const int8_t iq4_values[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                      1,    13,   25,  38,  53,  69,  89,  113};
static void iq4_run(const unsigned char *q, float d, float *out) {
    for (int j = 0; j < 16; j++) {
        out[j] = d * (float)iq4_values[q[j] & 15];
        out[j + 16] = d * (float)iq4_values[q[j] >> 4];
    }
}

/* IQ4_NL (18 bytes): d, 16 bytes of nibbles; value d table[q] */
static void dq_iq4_nl(const unsigned char *p, float *out, size_t n) {
    for (size_t b = 0; b < n; b++, p += 18, out += 32) iq4_run(p + 2, half_at(p), out);
}

/* IQ4_XS (136 bytes): d, the 2 high bits of eight 6-bit scales (u16, scale j at bit 2 j), their
 * low 4 bits (4 bytes, scale j in nibble j % 2 of byte j / 2), 128 bytes of nibbles; 32 values a
 * scale, value d (sc - 32) table[q]. */
static void dq_iq4_xs(const unsigned char *p, float *out, size_t n) {
    for (size_t b = 0; b < n; b++, p += 136) {
        float d = half_at(p);
        unsigned high = p[2] | (unsigned)p[3] << 8;
        for (int j = 0; j < 8; j++, out += 32) {
            int sc = (p[4 + j / 2] >> (4 * (j % 2)) & 15) | (int)(high >> (2 * j) & 3) << 4;
            iq4_run(p + 8 + 16 * j, d * (float)(sc - 32), out);
        }
    }
}

static const ggml_type read_types[] = {
    {0, 1, 4, "F32", dq_f32},          {1, 1, 2, "F16", dq_f16},
    {30, 1, 2, "BF16", dq_bf16},       {8, 32, 34, "Q8_0", dq_q8_0},
    {2, 32, 18, "Q4_0", dq_q4_0},      {3, 32, 20, "Q4_1", dq_q4_1},
    {6, 32, 22, "Q5_0", dq_q5_0},      {7, 32, 24, "Q5_1", dq_q5_1},
    {10, 256, 84, "Q2_K", dq_q2_k},    {11, 256, 110, "Q3_K", dq_q3_k},
    {12, 256, 144, "Q4_K", dq_q4_k},   {13, 256, 176, "Q5_K", dq_q5_k},
    {14, 256, 210, "Q6_K", dq_q6_k},   {20, 32, 18, "IQ4_NL", dq_iq4_nl},
    {23, 256, 136, "IQ4_XS", dq_iq4_xs}};
/* names of others, for messages */
static const char *const type_names[] = {
    "F32", "F16", "Q4_0", "Q4_1", "type 4", "type 5", "Q5_0", "Q5_1", "Q8_0", "Q8_1",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S",
    "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M", "BF16"};

static const ggml_type *find_type(uint32_t id) {
    for (size_t i = 0; i < sizeof read_types / sizeof *read_types; i++)
        if ((uint32_t)read_types[i].id == id) return &read_types[i];
    return NULL;
}

typedef struct {
    char name[64];
    int ndim;
    uint32_t type;
    int64_t ne[4];
    uint64_t off;
    size_t bytes; /* 0 for a type not read here */
} gin_tensor;

typedef struct {
    char *key;
    uint32_t type, etype; /* etype, n: an array's */
    uint64_t n;
    const unsigned char *val;
} gin_kv;

struct moe_gguf {
    char path[4096];
    unsigned char *buf;
    size_t size, data;
    gin_kv *kv;
    int n_kv, n_t;
    gin_tensor *t;
};

/* a bounds-checked cursor over the file */
typedef struct {
    const unsigned char *p;
    size_t n, at;
    int bad;
} cur;

static int need(cur *c, uint64_t k) {
    if (c->bad || k > c->n - c->at) c->bad = 1;
    return !c->bad;
}
static uint64_t rd(cur *c, int bytes) {
    uint64_t v = 0;
    if (need(c, (uint64_t)bytes)) memcpy(&v, c->p + c->at, (size_t)bytes), c->at += (size_t)bytes;
    return v;
}
/* a string: its bytes in place, *len of them */
static const char *rd_str(cur *c, uint64_t *len) {
    *len = rd(c, 8);
    if (!need(c, *len)) return NULL;
    const char *s = (const char *)c->p + c->at;
    c->at += *len;
    return s;
}

static int value_size(uint32_t type) {
    static const int size[] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
    return type <= 12 ? size[type] : -1;
}

/* skips a value of type (arrays: of anything but arrays) */
static void skip_value(cur *c, uint32_t type, gin_kv *kv) {
    uint64_t len;
    if (type == G_STRING) {
        rd_str(c, &len);
    } else if (type == G_ARRAY) {
        uint32_t et = (uint32_t)rd(c, 4);
        uint64_t n = rd(c, 8);
        if (kv) kv->etype = et, kv->n = n;
        if (et == G_ARRAY || value_size(et) < 0) c->bad = 1;
        else if (et == G_STRING)
            for (uint64_t i = 0; i < n && !c->bad; i++) rd_str(c, &len);
        else if (n > (c->n - c->at) / (uint64_t)value_size(et)) c->bad = 1;
        else c->at += (size_t)n * (size_t)value_size(et);
    } else if (value_size(type) <= 0) {
        c->bad = 1;
    } else {
        need(c, (uint64_t)value_size(type));
        if (!c->bad) c->at += (size_t)value_size(type);
    }
}

/* The whole file, mapped read-only. */
static moe_status map_file(const char *path, unsigned char **buf, size_t *size) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return moe_set_error(MOE_ERR_IO, "cannot open %s: %s", path, strerror(errno));
    struct stat sb;
    moe_status s = MOE_OK;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode) || sb.st_size < 24)
        s = moe_set_error(MOE_ERR_FORMAT, "%s: not a GGUF file (a regular file of 24 bytes or "
                          "more)", path);
    void *p = s == MOE_OK ? mmap(NULL, (size_t)sb.st_size, PROT_READ, MAP_PRIVATE, fd, 0) : NULL;
    if (s == MOE_OK && p == MAP_FAILED)
        s = moe_set_error(MOE_ERR_IO, "cannot map %s: %s", path, strerror(errno));
    close(fd);
    if (s == MOE_OK) *buf = p, *size = (size_t)sb.st_size;
    return s;
}

void moe_gguf_close(moe_gguf *g) {
    if (!g) return;
    for (int i = 0; i < g->n_kv; i++) free(g->kv[i].key);
    free(g->kv), free(g->t);
    if (g->buf) munmap(g->buf, g->size);
    free(g);
}

int moe_gguf_is_file(const char *path) {
    struct stat sb;
    char magic[4];
    FILE *f = stat(path, &sb) == 0 && S_ISREG(sb.st_mode) ? fopen(path, "rb") : NULL;
    int yes = f && fread(magic, 1, 4, f) == 4 && !memcmp(magic, "GGUF", 4);
    if (f) fclose(f);
    return yes;
}

static const gin_kv *find_kv(const moe_gguf *g, const char *key) {
    for (int i = 0; i < g->n_kv; i++)
        if (!strcmp(g->kv[i].key, key)) return &g->kv[i];
    return NULL;
}

static int by_name(const void *a, const void *b) {
    return strcmp(((const gin_tensor *)a)->name, ((const gin_tensor *)b)->name);
}
static int by_offset(const void *a, const void *b) {
    const gin_tensor *x = *(const gin_tensor *const *)a, *y = *(const gin_tensor *const *)b;
    return x->off < y->off ? -1 : x->off > y->off;
}

/* Checks the tensors' infos: unique names, each one's data (of a type read here) inside the
 * file, aligned, apart from the others'. */
static moe_status check_tensors(moe_gguf *g, uint32_t align) {
    const char *p = g->path;
    gin_tensor *sorted = malloc(sizeof *sorted * (size_t)(g->n_t + 1));
    const gin_tensor **order = malloc(sizeof *order * (size_t)(g->n_t + 1));
    moe_status s = sorted && order ? MOE_OK : moe_set_error(MOE_ERR_NOMEM, "out of memory");
    for (int i = 0; s == MOE_OK && i < g->n_t; i++) {
        gin_tensor *t = &g->t[i];
        const ggml_type *ty = find_type(t->type);
        uint64_t n = 1;
        for (int d = 0; d < t->ndim; d++) {
            if (t->ne[d] <= 0 || (uint64_t)t->ne[d] > (UINT64_C(1) << 62) / n)
                s = moe_set_error(MOE_ERR_FORMAT, "%s: tensor %s has a dimension of %lld", p,
                                  t->name, (long long)t->ne[d]);
            else n *= (uint64_t)t->ne[d];
        }
        if (s == MOE_OK && t->off % align)
            s = moe_set_error(MOE_ERR_FORMAT, "%s: tensor %s at offset %llu, not a multiple of "
                              "the alignment %u", p, t->name, (unsigned long long)t->off, align);
        if (s == MOE_OK && ty && t->ne[0] % ty->block)
            s = moe_set_error(MOE_ERR_FORMAT, "%s: tensor %s has rows of %lld, not whole %s "
                              "blocks", p, t->name, (long long)t->ne[0], ty->name);
        if (s == MOE_OK && ty) t->bytes = (size_t)(n / (uint64_t)ty->block * (uint64_t)ty->bytes);
        if (s == MOE_OK && (t->off > g->size - g->data || t->bytes > g->size - g->data - t->off))
            s = moe_set_error(MOE_ERR_FORMAT, "%s: tensor %s (%zu bytes at %llu) is past the "
                              "end of the file", p, t->name, t->bytes, (unsigned long long)t->off);
        if (s == MOE_OK) sorted[i] = *t, order[i] = t;
    }
    if (s == MOE_OK) {
        qsort(sorted, (size_t)g->n_t, sizeof *sorted, by_name);
        qsort(order, (size_t)g->n_t, sizeof *order, by_offset);
    }
    for (int i = 1; s == MOE_OK && i < g->n_t; i++) {
        if (!strcmp(sorted[i].name, sorted[i - 1].name))
            s = moe_set_error(MOE_ERR_FORMAT, "%s: tensor %s appears twice", p, sorted[i].name);
        else if (order[i - 1]->off + order[i - 1]->bytes > order[i]->off)
            s = moe_set_error(MOE_ERR_FORMAT, "%s: tensors %s and %s overlap", p,
                              order[i - 1]->name, order[i]->name);
    }
    free(sorted), free(order);
    return s;
}

moe_status moe_gguf_open(const char *path, moe_gguf **out) {
    *out = NULL;
    moe_gguf *g = calloc(1, sizeof *g);
    if (!g) return moe_set_error(MOE_ERR_NOMEM, "out of memory");
    snprintf(g->path, sizeof g->path, "%s", path);
    moe_status s = map_file(path, &g->buf, &g->size);
    cur c = {g->buf, g->size, 0, 0};
    uint32_t version = 0;
    uint64_t n_t = 0, n_kv = 0;
    if (s == MOE_OK) {
        int magic = need(&c, 4) && !memcmp(g->buf, "GGUF", 4);
        c.at = 4;
        version = (uint32_t)rd(&c, 4), n_t = rd(&c, 8), n_kv = rd(&c, 8);
        if (!magic || c.bad)
            s = moe_set_error(MOE_ERR_FORMAT, "%s: not a GGUF file (no GGUF header)", path);
        else if (version != 2 && version != 3)
            s = moe_set_error(MOE_ERR_FORMAT, "%s: GGUF version %u (versions 2 and 3 are read)",
                              path, version);
        else if (n_kv > g->size / 13 || n_t > g->size / 32) /* each takes that much at least */
            s = moe_set_error(MOE_ERR_FORMAT, "%s: %llu keys and %llu tensors do not fit in "
                              "%zu bytes", path, (unsigned long long)n_kv, (unsigned long long)n_t,
                              g->size);
    }
    if (s == MOE_OK) {
        g->kv = calloc((size_t)n_kv + 1, sizeof *g->kv);
        g->t = calloc((size_t)n_t + 1, sizeof *g->t);
        if (!g->kv || !g->t) s = moe_set_error(MOE_ERR_NOMEM, "out of memory");
    }
    for (uint64_t i = 0; s == MOE_OK && i < n_kv; i++) {
        uint64_t len;
        const char *k = rd_str(&c, &len);
        gin_kv *kv = &g->kv[g->n_kv];
        kv->type = (uint32_t)rd(&c, 4);
        kv->val = c.p + c.at;
        skip_value(&c, kv->type, kv);
        if (c.bad || !len || len > 65535 || memchr(k, 0, (size_t)len)) {
            s = moe_set_error(MOE_ERR_FORMAT, "%s: key %llu is malformed or past the end", path,
                              (unsigned long long)i);
        } else if (!(kv->key = strndup(k, (size_t)len))) {
            s = moe_set_error(MOE_ERR_NOMEM, "out of memory");
        } else {
            g->n_kv++;
            if (find_kv(g, kv->key) != kv)
                s = moe_set_error(MOE_ERR_FORMAT, "%s: key %s appears twice", path, kv->key);
        }
    }
    uint32_t align = ALIGN;
    const gin_kv *a = s == MOE_OK ? find_kv(g, "general.alignment") : NULL;
    if (a && a->type == G_U32) memcpy(&align, a->val, 4);
    if (a && (a->type != G_U32 || !align || (align & (align - 1))))
        s = moe_set_error(MOE_ERR_FORMAT, "%s: general.alignment is not a power of 2 (u32)", path);
    for (uint64_t i = 0; s == MOE_OK && i < n_t; i++) {
        uint64_t len;
        gin_tensor *t = &g->t[g->n_t];
        const char *name = rd_str(&c, &len);
        t->ndim = (int)rd(&c, 4);
        for (int d = 0; d < t->ndim && d < 4; d++) t->ne[d] = (int64_t)rd(&c, 8);
        t->type = (uint32_t)rd(&c, 4);
        t->off = rd(&c, 8);
        if (c.bad || !len || len >= sizeof t->name || memchr(name, 0, (size_t)len) ||
            t->ndim < 1 || t->ndim > 4)
            s = moe_set_error(MOE_ERR_FORMAT, "%s: tensor %llu's info is malformed (a name of 1 "
                              "to 63 bytes, 1 to 4 dimensions) or past the end", path,
                              (unsigned long long)i);
        else memcpy(t->name, name, (size_t)len), g->n_t++;
    }
    if (s == MOE_OK) g->data = (c.at + align - 1) / align * align; /* align: a power of 2 */
    if (s == MOE_OK && g->data > g->size && g->n_t)
        s = moe_set_error(MOE_ERR_FORMAT, "%s: the tensors' data begins past the end", path);
    if (s == MOE_OK) s = check_tensors(g, align);
    if (s != MOE_OK) {
        moe_gguf_close(g);
        return s;
    }
    *out = g;
    return MOE_OK;
}

/* ---- metadata */

/* A whole number key (u8 to u64, i8 to i64, non-negative) into *v; 0 when absent or another
 * type. */
static int get_uint(const moe_gguf *g, const char *key, uint64_t *v) {
    const gin_kv *kv = find_kv(g, key);
    if (!kv || kv->type > 11 || kv->type == G_F32 || kv->type == G_BOOL || kv->type == G_STRING ||
        kv->type == G_ARRAY)
        return 0;
    int size = value_size(kv->type), sign = kv->type % 2 && kv->type != 11 ? 1 : kv->type == 11;
    uint64_t u = 0;
    memcpy(&u, kv->val, (size_t)size);
    if (sign && size < 8 && (u >> (8 * size - 1) & 1)) return 0; /* negative */
    if (sign && size == 8 && (int64_t)u < 0) return 0;
    *v = u;
    return 1;
}
static int get_float(const moe_gguf *g, const char *key, double *v) {
    const gin_kv *kv = find_kv(g, key);
    float f;
    if (kv && kv->type == G_F32) memcpy(&f, kv->val, 4), *v = f;
    else if (kv && kv->type == 12) memcpy(v, kv->val, 8);
    return kv && (kv->type == G_F32 || kv->type == 12);
}
/* a string key, NUL-terminated into buf; 0 when absent or not a string */
static int get_string(const moe_gguf *g, const char *key, char *buf, size_t cap) {
    const gin_kv *kv = find_kv(g, key);
    uint64_t len;
    if (!kv || kv->type != G_STRING) return 0;
    memcpy(&len, kv->val, 8);
    snprintf(buf, cap, "%.*s", (int)(len < cap ? len : cap - 1), (const char *)kv->val + 8);
    return 1;
}
static int get_bool(const moe_gguf *g, const char *key, int def) {
    const gin_kv *kv = find_kv(g, key);
    return kv && kv->type == G_BOOL ? kv->val[0] != 0 : def;
}

static const gin_tensor *find_tensor(const moe_gguf *g, const char *name) {
    for (int i = 0; i < g->n_t; i++)
        if (!strcmp(g->t[i].name, name)) return &g->t[i];
    return NULL;
}

/* The arch-prefixed whole number key into cfg's JSON key (absent: def, or an error when def < 0) */
static moe_status arch_uint(const moe_gguf *g, const char *arch, const char *key, long long def,
                            cJSON *j, const char *json_key, uint64_t *got) {
    char name[128];
    uint64_t v;
    snprintf(name, sizeof name, "%s.%s", arch, key);
    if (!get_uint(g, name, &v)) {
        if (find_kv(g, name) || def < 0)
            return moe_set_error(MOE_ERR_FORMAT, "%s: %s is %s", g->path, name,
                                 find_kv(g, name) ? "not a whole number" : "missing");
        v = (uint64_t)def;
    }
    if (v > INT32_MAX) return moe_set_error(MOE_ERR_FORMAT, "%s: %s is too large", g->path, name);
    if (json_key) cJSON_AddNumberToObject(j, json_key, (double)v);
    if (got) *got = v;
    return MOE_OK;
}

moe_status moe_gguf_config_json(const moe_gguf *g, char **out) {
    char arch[64] = "", buf[128];
    const char *family = NULL;
    *out = NULL;
    get_string(g, "general.architecture", arch, sizeof arch);
    for (size_t i = 0; i < N_ARCHS; i++)
        if (!strcmp(arch, arch_map[i][1])) family = arch_map[i][0];
    if (!family)
        return moe_set_error(MOE_ERR_INVALID, "%s: general.architecture \"%s\" is not read here "
                             "(llama with experts, qwen2moe, qwen3moe, olmoe)", g->path, arch);
    snprintf(buf, sizeof buf, "%s.rope.scaling.type", arch);
    char scaling[32] = "none";
    get_string(g, buf, scaling, sizeof scaling);
    if (strcmp(scaling, "none") || find_tensor(g, "rope_freqs.weight"))
        return moe_set_error(MOE_ERR_INVALID, "%s: RoPE scaling (%s) is not read here", g->path,
                             strcmp(scaling, "none") ? scaling : "rope_freqs.weight");
    const gin_tensor *emb = find_tensor(g, "token_embd.weight");
    if (!emb || emb->ndim != 2)
        return moe_set_error(MOE_ERR_FORMAT, "%s: no two-dimensional token_embd.weight", g->path);
    cJSON *j = cJSON_CreateObject();
    if (!j) return moe_set_error(MOE_ERR_NOMEM, "out of memory");
    int qwen = !strncmp(arch, "qwen", 4);
    uint64_t d, heads, experts;
    cJSON_AddStringToObject(j, "model_type", family);
    cJSON_AddNumberToObject(j, "vocab_size", (double)emb->ne[1]);
    moe_status s = arch_uint(g, arch, "embedding_length", -1, j, "hidden_size", &d);
    if (s == MOE_OK) s = arch_uint(g, arch, "block_count", -1, j, "num_hidden_layers", NULL);
    if (s == MOE_OK)
        s = arch_uint(g, arch, "attention.head_count", -1, j, "num_attention_heads", &heads);
    if (s == MOE_OK)
        s = arch_uint(g, arch, "attention.head_count_kv", (long long)heads, j,
                      "num_key_value_heads", NULL);
    if (s == MOE_OK)
        s = arch_uint(g, arch, "expert_count", 0, j,
                      strcmp(arch, "llama") ? "num_experts" : "num_local_experts", &experts);
    if (s == MOE_OK && !experts)
        s = moe_set_error(MOE_ERR_INVALID, "%s: a model without experts (%s.expert_count) is not "
                          "read here", g->path, arch);
    if (s == MOE_OK)
        s = arch_uint(g, arch, "expert_used_count", -1, j, "num_experts_per_tok", NULL);
    if (s == MOE_OK)
        s = arch_uint(g, arch, "context_length", -1, j, "max_position_embeddings", NULL);
    if (s == MOE_OK)
        s = arch_uint(g, arch, "feed_forward_length", -1, j, "intermediate_size", NULL);
    if (s == MOE_OK && qwen)
        s = arch_uint(g, arch, "expert_feed_forward_length", -1, j, "moe_intermediate_size", NULL);
    if (s == MOE_OK && !strcmp(arch, "qwen2moe"))
        s = arch_uint(g, arch, "expert_shared_feed_forward_length", 0, j,
                      "shared_expert_intermediate_size", NULL);
    if (s == MOE_OK && (!strcmp(arch, "llama") || !strcmp(arch, "qwen3moe")))
        s = arch_uint(g, arch, "attention.key_length", (long long)(d / (heads ? heads : 1)), j,
                      "head_dim", NULL);
    double eps, theta = 10000;
    snprintf(buf, sizeof buf, "%s.attention.layer_norm_rms_epsilon", arch);
    if (s == MOE_OK && !get_float(g, buf, &eps))
        s = moe_set_error(MOE_ERR_FORMAT, "%s: %s is missing or not a float", g->path, buf);
    snprintf(buf, sizeof buf, "%s.rope.freq_base", arch);
    if (s == MOE_OK && find_kv(g, buf) && !get_float(g, buf, &theta))
        s = moe_set_error(MOE_ERR_FORMAT, "%s: %s is not a float", g->path, buf);
    if (s == MOE_OK) {
        cJSON_AddNumberToObject(j, "rms_norm_eps", moe_hf_float_json((float)eps));
        cJSON_AddNumberToObject(j, "rope_theta", moe_hf_float_json((float)theta));
        cJSON_AddStringToObject(j, "hidden_act", "silu");
        /* llama.cpp's graphs: Mixtral and Qwen3-MoE renormalise, Qwen2-MoE and OLMoE not */
        if (strcmp(arch, "llama"))
            cJSON_AddBoolToObject(j, "norm_topk_prob", !strcmp(arch, "qwen3moe"));
        cJSON_AddBoolToObject(j, "tie_word_embeddings", !find_tensor(g, "output.weight"));
        if (qwen) {
            cJSON_AddNumberToObject(j, "decoder_sparse_step", 1);
            cJSON_AddItemToObject(j, "mlp_only_layers", cJSON_CreateArray());
        }
        uint64_t id;
        if (get_uint(g, "tokenizer.ggml.eos_token_id", &id) && id <= INT32_MAX)
            cJSON_AddNumberToObject(j, "eos_token_id", (double)id);
        if (get_uint(g, "tokenizer.ggml.bos_token_id", &id) && id <= INT32_MAX)
            cJSON_AddNumberToObject(j, "bos_token_id", (double)id);
        if (!(*out = cJSON_PrintUnformatted(j))) s = moe_set_error(MOE_ERR_NOMEM, "out of memory");
    }
    cJSON_Delete(j);
    return s;
}

/* ---- the vocabulary */

/* an array key's n items of etype (NULL when absent or another type) */
static const unsigned char *array_of(const moe_gguf *g, const char *key, uint32_t etype,
                                     uint64_t n) {
    const gin_kv *kv = find_kv(g, key);
    return kv && kv->type == G_ARRAY && kv->etype == etype && kv->n == n ? kv->val + 12 : NULL;
}

typedef struct {
    const char *s;
    int id;
} tok_entry;

static int by_text(const void *a, const void *b) {
    return strcmp(((const tok_entry *)a)->s, ((const tok_entry *)b)->s);
}

/* id of text among the sorted entries, -1 when none */
static int token_of(const tok_entry *e, int n, const char *text) {
    tok_entry key = {text, 0};
    const tok_entry *f = bsearch(&key, e, (size_t)n, sizeof *e, by_text);
    return f ? f->id : -1;
}

typedef struct {
    float score;
    int token, a, b;
} spm_merge;

static int by_score(const void *x, const void *y) {
    const spm_merge *p = x, *q = y;
    if (p->score != q->score) return p->score > q->score ? -1 : 1;
    if (p->token != q->token) return p->token < q->token ? -1 : 1;
    return p->a != q->a ? (p->a < q->a ? -1 : 1) : (p->b > q->b) - (p->b < q->b);
}

/* SentencePiece's merges from its scores (Hugging Face's converter's rule): every split of a
 * token into two tokens, by the token's score, highest first (then by token, then by the
 * halves' ids). */
static moe_status spm_merges(char **text, const float *score, const int32_t *type, int n,
                             cJSON *merges) {
    tok_entry *e = malloc(sizeof *e * (size_t)(n + 1));
    int ne = 0, nm = 0, cap = 1024;
    spm_merge *m = malloc(sizeof *m * (size_t)cap);
    moe_status s = e && m ? MOE_OK : moe_set_error(MOE_ERR_NOMEM, "out of memory");
    for (int i = 0; s == MOE_OK && i < n; i++)
        if (type[i] == TOK_NORMAL) e[ne++] = (tok_entry){text[i], i};
    if (s == MOE_OK) qsort(e, (size_t)ne, sizeof *e, by_text);
    char half[1024];
    for (int i = 0; s == MOE_OK && i < n; i++) {
        size_t len = strlen(text[i]);
        if (type[i] != TOK_NORMAL || len >= sizeof half) continue;
        for (size_t cut = 1; s == MOE_OK && cut < len; cut++) {
            if ((text[i][cut] & 0xC0) == 0x80) continue; /* inside a character */
            memcpy(half, text[i], cut);
            half[cut] = '\0';
            int a = token_of(e, ne, half), b = token_of(e, ne, text[i] + cut);
            if (a < 0 || b < 0) continue;
            if (nm == cap) {
                spm_merge *more = realloc(m, sizeof *m * (size_t)(cap *= 2));
                if (!more) s = moe_set_error(MOE_ERR_NOMEM, "out of memory");
                else m = more;
            }
            if (s == MOE_OK) m[nm++] = (spm_merge){score[i], i, a, b};
        }
    }
    if (s == MOE_OK) qsort(m, (size_t)nm, sizeof *m, by_score);
    for (int i = 0; s == MOE_OK && i < nm; i++) {
        cJSON *pair = cJSON_CreateArray();
        cJSON_AddItemToArray(pair, cJSON_CreateString(text[m[i].a]));
        cJSON_AddItemToArray(pair, cJSON_CreateString(text[m[i].b]));
        cJSON_AddItemToArray(merges, pair);
    }
    free(e), free(m);
    return s;
}

/* the JSON of a ByteLevel pre-tokenizer or decoder */
static cJSON *byte_level_json(int use_regex) {
    cJSON *b = cJSON_CreateObject();
    cJSON_AddStringToObject(b, "type", "ByteLevel");
    cJSON_AddBoolToObject(b, "add_prefix_space", 0);
    cJSON_AddBoolToObject(b, "trim_offsets", 0);
    cJSON_AddBoolToObject(b, "use_regex", use_regex);
    return b;
}

/* The pre-tokenizer of llama.cpp's split name (NULL: one not read here) */
static cJSON *pre_json(const char *pre, int n_merges) {
    if (!strcmp(pre, "gpt-2") || !strcmp(pre, "olmo")) return byte_level_json(1);
    if (!strcmp(pre, "default") && !n_merges) return byte_level_json(0);
    if (strcmp(pre, "qwen2")) return NULL;
    cJSON *seq = cJSON_CreateObject(), *list = cJSON_AddArrayToObject(seq, "pretokenizers");
    cJSON *split = cJSON_CreateObject(), *pat = cJSON_AddObjectToObject(split, "pattern");
    cJSON_AddStringToObject(seq, "type", "Sequence");
    cJSON_AddStringToObject(split, "type", "Split");
    cJSON_AddStringToObject(pat, "Regex", QWEN2_PATTERN);
    cJSON_AddStringToObject(split, "behavior", "Isolated");
    cJSON_AddBoolToObject(split, "invert", 0);
    cJSON_AddItemToArray(list, split);
    cJSON_AddItemToArray(list, byte_level_json(0));
    return seq;
}

/* SentencePiece's normaliser and decoder: ▁ for spaces (and before the text) */
static void spm_json(cJSON *j, int space_prefix) {
    cJSON *norm = cJSON_AddObjectToObject(j, "normalizer"), *list;
    cJSON_AddStringToObject(norm, "type", "Sequence");
    list = cJSON_AddArrayToObject(norm, "normalizers");
    if (space_prefix) {
        cJSON *p = cJSON_CreateObject();
        cJSON_AddStringToObject(p, "type", "Prepend");
        cJSON_AddStringToObject(p, "prepend", "\u2581");
        cJSON_AddItemToArray(list, p);
    }
    cJSON *r = cJSON_CreateObject(), *pat = cJSON_AddObjectToObject(r, "pattern");
    cJSON_AddStringToObject(r, "type", "Replace");
    cJSON_AddStringToObject(pat, "String", " ");
    cJSON_AddStringToObject(r, "content", "\u2581");
    cJSON_AddItemToArray(list, r);
    cJSON *dec = cJSON_AddObjectToObject(j, "decoder"), *steps;
    cJSON_AddStringToObject(dec, "type", "Sequence");
    steps = cJSON_AddArrayToObject(dec, "decoders");
    cJSON *back = cJSON_Duplicate(r, 1), *bf = cJSON_CreateObject(), *fuse = cJSON_CreateObject();
    cJSON_ReplaceItemInObject(back, "content", cJSON_CreateString(" "));
    cJSON_ReplaceItemInObject(cJSON_GetObjectItem(back, "pattern"), "String",
                              cJSON_CreateString("\u2581"));
    cJSON_AddStringToObject(bf, "type", "ByteFallback");
    cJSON_AddStringToObject(fuse, "type", "Fuse");
    cJSON_AddItemToArray(steps, back);
    cJSON_AddItemToArray(steps, bf);
    cJSON_AddItemToArray(steps, fuse);
    if (space_prefix) {
        cJSON *strip = cJSON_CreateObject();
        cJSON_AddStringToObject(strip, "type", "Strip");
        cJSON_AddStringToObject(strip, "content", " ");
        cJSON_AddNumberToObject(strip, "start", 1);
        cJSON_AddNumberToObject(strip, "stop", 0);
        cJSON_AddItemToArray(steps, strip);
    }
}

/* Hugging Face's TemplateProcessing of a start and an end token (ids, -1: none) */
static void template_json(cJSON *j, char **text, int bos, int eos) {
    cJSON *post = cJSON_AddObjectToObject(j, "post_processor");
    cJSON_AddStringToObject(post, "type", "TemplateProcessing");
    cJSON *single = cJSON_AddArrayToObject(post, "single");
    cJSON *special = cJSON_AddObjectToObject(post, "special_tokens");
    for (int part = 0; part < 3; part++) {
        int id = part == 0 ? bos : part == 2 ? eos : -1;
        cJSON *item = cJSON_CreateObject(), *inner;
        if (part == 1) {
            inner = cJSON_AddObjectToObject(item, "Sequence");
            cJSON_AddStringToObject(inner, "id", "A");
        } else if (id >= 0) {
            inner = cJSON_AddObjectToObject(item, "SpecialToken");
            cJSON_AddStringToObject(inner, "id", text[id]);
            cJSON *st = cJSON_AddObjectToObject(special, text[id]), *ids, *toks;
            cJSON_AddStringToObject(st, "id", text[id]);
            ids = cJSON_AddArrayToObject(st, "ids");
            cJSON_AddItemToArray(ids, cJSON_CreateNumber(id));
            toks = cJSON_AddArrayToObject(st, "tokens");
            cJSON_AddItemToArray(toks, cJSON_CreateString(text[id]));
        } else {
            cJSON_Delete(item);
            continue;
        }
        cJSON_AddNumberToObject(inner, "type_id", 0);
        cJSON_AddItemToArray(single, item);
    }
}

moe_status moe_gguf_tokenizer_json(const moe_gguf *g, char **out) {
    char model[32] = "", pre[64] = "default";
    *out = NULL;
    get_string(g, "tokenizer.ggml.model", model, sizeof model);
    get_string(g, "tokenizer.ggml.pre", pre, sizeof pre);
    int spm = !strcmp(model, "llama");
    const gin_kv *tk = find_kv(g, "tokenizer.ggml.tokens");
    if (!model[0] || !strcmp(model, "none") || !strcmp(model, "no_vocab")) return MOE_OK;
    if (!spm && strcmp(model, "gpt2"))
        return moe_set_error(MOE_ERR_INVALID, "%s has no vocabulary read here (tokenizer.ggml."
                             "model \"%s\"; gpt2 and llama are): give token ids with --ids",
                             g->path, model);
    if (!tk || tk->type != G_ARRAY || tk->etype != G_STRING || !tk->n || tk->n > INT32_MAX)
        return moe_set_error(MOE_ERR_FORMAT, "%s: tokenizer.ggml.tokens is not a list of "
                             "strings", g->path);
    int n = (int)tk->n;
    const gin_kv *mk = find_kv(g, "tokenizer.ggml.merges");
    int n_merges = mk && mk->type == G_ARRAY && mk->etype == G_STRING ? (int)mk->n : -1;
    if (!spm && n_merges < 0)
        return moe_set_error(MOE_ERR_FORMAT, "%s: tokenizer.ggml.merges is not a list of "
                             "strings", g->path);
    const unsigned char *types = array_of(g, "tokenizer.ggml.token_type", G_I32, tk->n);
    const unsigned char *scores = array_of(g, "tokenizer.ggml.scores", G_F32, tk->n);
    char **text = calloc((size_t)n, sizeof *text);
    int32_t *type = calloc((size_t)n, sizeof *type);
    float *score = calloc((size_t)n, sizeof *score);
    moe_status s = text && type && score ? MOE_OK : moe_set_error(MOE_ERR_NOMEM, "out of memory");
    const unsigned char *p = tk->val + 12;
    for (int i = 0; s == MOE_OK && i < n; i++) {
        uint64_t len;
        memcpy(&len, p, 8);
        if (!(text[i] = strndup((const char *)p + 8, (size_t)len)))
            s = moe_set_error(MOE_ERR_NOMEM, "out of memory");
        else if (strlen(text[i]) != len)
            s = moe_set_error(MOE_ERR_FORMAT, "%s: token %d holds a NUL byte", g->path, i);
        p += 8 + len;
        type[i] = TOK_NORMAL;
        if (types) memcpy(&type[i], types + 4 * (size_t)i, 4);
        if (scores) memcpy(&score[i], scores + 4 * (size_t)i, 4);
    }
    uint64_t bos = UINT64_MAX, eos = UINT64_MAX, unk = UINT64_MAX;
    get_uint(g, "tokenizer.ggml.bos_token_id", &bos);
    get_uint(g, "tokenizer.ggml.eos_token_id", &eos);
    get_uint(g, "tokenizer.ggml.unknown_token_id", &unk);
    int add_bos = get_bool(g, "tokenizer.ggml.add_bos_token", spm) && bos < (uint64_t)n;
    int add_eos = get_bool(g, "tokenizer.ggml.add_eos_token", 0) && eos < (uint64_t)n;
    cJSON *j = cJSON_CreateObject(), *added = cJSON_AddArrayToObject(j, "added_tokens");
    cJSON *bpe = cJSON_AddObjectToObject(j, "model");
    cJSON *vocab = cJSON_AddObjectToObject(bpe, "vocab");
    cJSON *merges = cJSON_AddArrayToObject(bpe, "merges");
    int byte_fallback = 0;
    for (int i = 0; s == MOE_OK && i < n; i++) {
        int t = type[i];
        byte_fallback |= t == TOK_BYTE;
        if (t == TOK_CONTROL || t == TOK_USER) {
            cJSON *a = cJSON_CreateObject();
            cJSON_AddNumberToObject(a, "id", i);
            cJSON_AddStringToObject(a, "content", text[i]);
            cJSON_AddBoolToObject(a, "single_word", 0);
            cJSON_AddBoolToObject(a, "lstrip", 0);
            cJSON_AddBoolToObject(a, "rstrip", 0);
            cJSON_AddBoolToObject(a, "normalized", 0);
            cJSON_AddBoolToObject(a, "special", t == TOK_CONTROL);
            cJSON_AddItemToArray(added, a);
        }
        if (t != TOK_UNUSED && (spm || (t != TOK_CONTROL && t != TOK_USER)) &&
            !cJSON_GetObjectItemCaseSensitive(vocab, text[i]))
            cJSON_AddNumberToObject(vocab, text[i], i);
    }
    cJSON_AddStringToObject(bpe, "type", "BPE");
    cJSON_AddBoolToObject(bpe, "byte_fallback", byte_fallback);
    cJSON_AddBoolToObject(bpe, "fuse_unk", spm);
    if (unk < (uint64_t)n) cJSON_AddStringToObject(bpe, "unk_token", text[unk]);
    else cJSON_AddNullToObject(bpe, "unk_token");
    if (s == MOE_OK && spm) {
        s = spm_merges(text, score, type, n, merges);
        cJSON_AddNullToObject(j, "pre_tokenizer");
        spm_json(j, get_bool(g, "tokenizer.ggml.add_space_prefix", 1));
    } else if (s == MOE_OK) {
        p = mk->val + 12;
        for (int i = 0; i < n_merges; i++) {
            uint64_t len;
            memcpy(&len, p, 8);
            char *m = strndup((const char *)p + 8, (size_t)len);
            if (m) cJSON_AddItemToArray(merges, cJSON_CreateString(m));
            free(m);
            p += 8 + len;
        }
        cJSON *pj = pre_json(pre, n_merges);
        if (!pj)
            s = moe_set_error(MOE_ERR_INVALID, "%s: pre-tokenizer \"%s\" is not read here (qwen2, "
                              "gpt-2, olmo; default without merges): give token ids with --ids",
                              g->path, pre);
        cJSON_AddItemToObject(j, "pre_tokenizer", pj ? pj : cJSON_CreateNull());
        cJSON_AddNullToObject(j, "normalizer");
        cJSON_AddItemToObject(j, "decoder", byte_level_json(0));
    }
    if (s == MOE_OK && (add_bos || add_eos))
        template_json(j, text, add_bos ? (int)bos : -1, add_eos ? (int)eos : -1);
    if (s == MOE_OK && !(*out = cJSON_PrintUnformatted(j)))
        s = moe_set_error(MOE_ERR_NOMEM, "out of memory");
    cJSON_Delete(j);
    for (int i = 0; text && i < n; i++) free(text[i]);
    free(text), free(type), free(score);
    return s;
}

/* ---- the tensors */

static const char *type_name(uint32_t type) {
    return type < sizeof type_names / sizeof *type_names ? type_names[type] : "an unknown type";
}

void moe_gguf_describe(const moe_gguf *g, char *out, size_t cap) {
    size_t at = (size_t)snprintf(out, cap, "%d tensors", g->n_t);
    for (int i = 0; i < g->n_t && at < cap; i++) {
        uint32_t type = g->t[i].type;
        int count = 0, seen = 0;
        for (int j = 0; j < g->n_t; j++) {
            seen |= j < i && g->t[j].type == type;
            count += g->t[j].type == type;
        }
        if (seen) continue;
        if (type < sizeof type_names / sizeof *type_names)
            at += (size_t)snprintf(out + at, cap - at, "%s %d %s", i ? "," : ":", count,
                                   type_names[type]);
        else
            at += (size_t)snprintf(out + at, cap - at, "%s %d of type %u", i ? "," : ":", count,
                                   type);
    }
    if (at < cap)
        snprintf(out + at, cap - at, "; %.2f MB of data", 1e-6 * (double)(g->size - g->data));
}

/* Rows [r0, r0 + nr) of t (rows of ne[0] values, the dimensions above flattened) as floats. */
static void dequant_rows(const moe_gguf *g, const gin_tensor *t, int64_t r0, int64_t nr,
                         float *out) {
    const ggml_type *ty = find_type(t->type);
    size_t row_bytes = (size_t)(t->ne[0] / ty->block * ty->bytes);
    ty->dq(g->buf + g->data + t->off + (size_t)r0 * row_bytes, out,
           (size_t)(nr * t->ne[0] / ty->block));
}

/* The file's tensor for our tensor ti into dst (expert e's slice of a stacked one; llama's q
 * and k rows back from llama.cpp's RoPE pair order); *used marks it. */
static moe_status load_tensor(const moe_gguf *g, const char *arch, const moe_model_config *c,
                              const moe_tensor_info *ti, float *dst, float *tmp, uint8_t *used) {
    char name[64];
    int e, heads;
    if (!gguf_name(arch, c, ti->name, name, sizeof name, &e, &heads))
        return moe_set_error(MOE_ERR_INVALID, "%s has no name in llama.cpp's %s", ti->name, arch);
    const gin_tensor *t = find_tensor(g, name);
    if (!t) return moe_set_error(MOE_ERR_FORMAT, "%s: tensor %s is missing", g->path, name);
    int64_t rows = ti->ndim > 1 ? ti->shape[0] : 1, cols = ti->shape[ti->ndim - 1];
    int64_t want[4] = {cols, rows, e >= 0 ? c->moe.n_experts : 1, 1};
    for (int d = 0; d < 4; d++)
        if ((d < t->ndim ? t->ne[d] : 1) != want[d] || (d == 1 && ti->ndim == 1 && t->ndim > 1 &&
                                                        t->ne[1] != 1))
            return moe_set_error(MOE_ERR_FORMAT, "%s: tensor %s has dimensions %lld x %lld x "
                                 "%lld, %s needs %lld x %lld x %lld", g->path, name,
                                 (long long)t->ne[0], (long long)(t->ndim > 1 ? t->ne[1] : 1),
                                 (long long)(t->ndim > 2 ? t->ne[2] : 1), ti->name,
                                 (long long)want[0], (long long)want[1], (long long)want[2]);
    if (!find_type(t->type))
        return moe_set_error(MOE_ERR_INVALID, "%s: tensor %s is %s (ggml type %u); F32, F16, "
                             "BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K to Q6_K, IQ4_NL and "
                             "IQ4_XS are read here",
                             g->path, name, type_name(t->type), t->type);
    dequant_rows(g, t, e >= 0 ? e * rows : 0, rows, tmp);
    int64_t hd = heads ? rows / heads : 0;
    for (int64_t r = 0; r < rows; r++) {
        int64_t from = heads ? r / hd * hd + (r % hd) % (hd / 2) * 2 + (r % hd) / (hd / 2) : r;
        memcpy(dst + r * cols, tmp + from * cols, sizeof(float) * (size_t)cols);
    }
    for (int64_t i = 0; i < rows * cols; i++)
        if (!isfinite(dst[i]))
            return moe_set_error(MOE_ERR_FORMAT, "%s: tensor %s holds %g", g->path, name,
                                 (double)dst[i]);
    used[t - g->t] = 1;
    return MOE_OK;
}

moe_status moe_gguf_load(const moe_gguf *g, const char *family, moe_model *m) {
    const moe_model_config *c = moe_model_get_config(m);
    const char *arch = moe_gguf_arch(family);
    size_t total = moe_model_param_count(m), largest = 1;
    int n = moe_model_n_tensors(m);
    for (int i = 0; i < n; i++) largest = moe_model_tensor(m, i)->numel > largest
                                              ? moe_model_tensor(m, i)->numel : largest;
    float *stage = malloc(sizeof(float) * total), *tmp = malloc(sizeof(float) * largest);
    uint8_t *used = calloc((size_t)g->n_t + 1, 1);
    moe_status s = stage && tmp && used && arch ? MOE_OK
                   : arch ? moe_set_error(MOE_ERR_NOMEM, "out of memory")
                          : moe_set_error(MOE_ERR_INVALID, "no llama.cpp architecture for %s",
                                          family);
    for (int i = 0; s == MOE_OK && i < n; i++) {
        const moe_tensor_info *ti = moe_model_tensor(m, i);
        s = load_tensor(g, arch, c, ti, stage + ti->offset, tmp, used);
    }
    for (int i = 0; s == MOE_OK && i < g->n_t; i++)
        if (!used[i])
            s = moe_set_error(MOE_ERR_FORMAT, "%s: tensor %s is not part of the model its keys "
                              "describe", g->path, g->t[i].name);
    if (s == MOE_OK) memcpy(moe_model_params(m), stage, sizeof(float) * total);
    free(stage), free(tmp), free(used);
    return s;
}
