/* GGUF writer: llama.cpp's file layout (version 3, little-endian), its architectures' metadata
 * and tensor names, and a tokenizer.json turned into its vocabulary. docs/FORMATS.md §6. */
#define _POSIX_C_SOURCE 200809L
#include "io/gguf.h"

#include "core/core.h"
#include "io/data.h"
#include "io/hf.h"
#include "io/tokenizer.h"
#include "kernels/kernels.h"

#include <cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define ALIGN 32 /* general.alignment, llama.cpp's default */

/* GGUF's value types */
enum { G_U8 = 0, G_U32 = 4, G_I32 = 5, G_F32 = 6, G_BOOL = 7, G_STRING = 8, G_ARRAY = 9 };
/* llama.cpp's token types */
enum { TOK_NORMAL = 1, TOK_UNKNOWN = 2, TOK_CONTROL = 3, TOK_USER = 4, TOK_UNUSED = 5,
       TOK_BYTE = 6 };

int moe_gguf_type_of(const char *name) {
    return !strcmp(name, "f32") ? MOE_GGUF_F32 : !strcmp(name, "f16") ? MOE_GGUF_F16
           : !strcmp(name, "bf16") ? MOE_GGUF_BF16 : -1;
}

const char *moe_gguf_arch(const char *family) {
    static const char *const map[][2] = {
        {"mixtral", "llama"}, {"qwen2_moe", "qwen2moe"}, {"qwen3_moe", "qwen3moe"},
        {"olmoe", "olmoe"}};
    for (size_t i = 0; i < sizeof map / sizeof *map; i++)
        if (!strcmp(family, map[i][0])) return map[i][1];
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
static moe_status special_ends(const char *path, int32_t *bos, int32_t *eos) {
    moe_tokenizer *t;
    int32_t *with = NULL, *without = NULL;
    int n_with = 0, n_without = 0;
    *bos = *eos = -1;
    MOE_TRY(moe_tokenizer_load(path, &t));
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
    /* SentencePiece's BPE: byte fallback, or words marked by ▁ (Metaspace) */
    int spm = cJSON_IsTrue(fallback) ||
              is_type(cJSON_GetObjectItemCaseSensitive(tok, "pre_tokenizer"), "Metaspace");
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
    const char *pre = spm ? NULL : pre_name(tok, v.n_merges, arch);
    if (s == MOE_OK && !spm && !pre)
        s = moe_set_error(MOE_ERR_INVALID, "%s: its pre-tokenizer is neither GPT-2's nor Qwen2's "
                          "split, the ones llama.cpp is told of here", where);
    int32_t bos = -1, eos = -1;
    if (s == MOE_OK && path) s = special_ends(path, &bos, &eos);
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

/* n floats of src as type into the file (a copy unless F32). */
static moe_status add_data(gfile *g, const float *src, size_t n, int type, const char *name) {
    if (type == MOE_GGUF_F32) return add_part(g, src, sizeof(float) * n);
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
    t->bytes += n * (t->type == MOE_GGUF_F32 ? 4 : 2);
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

static int gguf_name(const gfile *g, const char *ours, char *out, size_t cap, int *expert,
                     int *heads) {
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
        if (!strcmp(g->arch, "llama") && !strncmp(rest, "self_attn.", 10) && rest[11] == '_')
            *heads = rest[10] == 'q' ? g->c->n_heads : rest[10] == 'k' ? g->c->n_kv_heads : 0;
        return snprintf(out, cap, "blk.%d.%s", l, layer_names[i].theirs), 1;
    }
    return 0;
}

/* Vectors, norms and the routers stay F32 (as llama.cpp's converter keeps them). */
static int tensor_type(const gfile *g, const char *name, int ndim) {
    size_t n = strlen(name);
    if (ndim < 2 || strstr(name, "ffn_gate_inp") ||
        (n > 12 && !strcmp(name + n - 12, "_norm.weight")))
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
        if (!gguf_name(g, ti->name, name, sizeof name, &expert, &heads)) {
            s = moe_set_error(MOE_ERR_INVALID, "%s has no name in llama.cpp's %s", ti->name,
                              g->arch);
        } else if (expert >= 0 && sscanf(name, "blk.%d.", &l) == 1 && l < L && expert < E) {
            stack[(3 * l + (strstr(name, "gate_exps") ? 0 : strstr(name, "up_exps") ? 1 : 2)) * E +
                  expert] = i;
        } else {
            if (!strcmp(ti->name, "model.embed_tokens.weight")) emb = i;
            gtensor *t = new_tensor(g, name, ti->ndim, ti->shape, tensor_type(g, name, ti->ndim));
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
                gguf_name(g, ti->name, name, sizeof name, &expert, &heads);
                int64_t shape[3] = {E, ti->shape[0], ti->shape[1]};
                t = new_tensor(g, name, 3, shape, tensor_type(g, name, 3));
            }
            s = append(g, t, p + ti->offset, ti->shape[0], ti->shape[1], 0);
        }
    }
    /* tied embeddings: qwen2moe and olmoe need output.weight (llama and qwen3moe reuse
     * token_embd) */
    int need_output = !strcmp(g->arch, "qwen2moe") || !strcmp(g->arch, "olmoe");
    if (s == MOE_OK && c->tie_embeddings && need_output && emb >= 0) {
        const moe_tensor_info *ti = moe_model_tensor(m, emb);
        gtensor *t = new_tensor(g, "output.weight", 2, ti->shape, g->type);
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
    kv_u32(k, "general.file_type", g->type == MOE_GGUF_F32 ? 0 : g->type == MOE_GGUF_F16 ? 1 : 32);
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
    if (meta->tokenizer_path) {
        char *json;
        size_t len;
        MOE_TRY(moe_read_file(meta->tokenizer_path, &json, &len));
        moe_status s = tokenizer_keys(k, json, meta->tokenizer_path, V, meta, g->arch);
        free(json);
        return s;
    }
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
