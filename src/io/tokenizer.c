/* Hugging Face tokenizer.json: added tokens, normalizer, pre-tokenizer, BPE model,
 * post-processor, decoder — the pipeline of the `tokenizers` library, for the components the
 * MoE families use. */
#define _POSIX_C_SOURCE 200809L
#include "io/tokenizer.h"

#include "core/core.h"
#include "io/data.h"

#include <cJSON.h>
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_ID (1 << 24)
#define MAX_STEPS 32

/* GPT-2's split of text before byte-level BPE (ByteLevel with use_regex). */
static const char GPT2_PATTERN[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

/* ---- growable byte strings and lists of them ---- */

typedef struct {
    char *p;
    size_t n, cap;
} buf;

static int buf_put(buf *b, const void *s, size_t n) {
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 64;
        while (cap < b->n + n + 1) cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) return -1;
        b->p = p, b->cap = cap;
    }
    if (n) memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
    return 0;
}

/* Pieces of text: piece i is text.p[off[i] .. off[i + 1]). */
typedef struct {
    buf text;
    size_t *off;
    int n, cap;
} pieces;

static int pieces_add(pieces *ps, const char *s, size_t n) {
    if (ps->n + 2 > ps->cap) {
        int cap = ps->cap ? 2 * ps->cap : 16;
        size_t *off = realloc(ps->off, sizeof(size_t) * (size_t)cap);
        if (!off) return -1;
        ps->off = off, ps->cap = cap;
    }
    if (ps->n == 0) ps->off[0] = ps->text.n;
    if (buf_put(&ps->text, s, n)) return -1;
    ps->off[++ps->n] = ps->text.n;
    return 0;
}

static void pieces_free(pieces *ps) {
    free(ps->text.p);
    free(ps->off);
    memset(ps, 0, sizeof *ps);
}

#define PIECE(ps, i) ((ps)->text.p + (ps)->off[i])
#define PIECE_LEN(ps, i) ((ps)->off[(i) + 1] - (ps)->off[i])

/* Bytes of the UTF-8 character starting with byte c (1 for a stray continuation byte). */
static int utf8_len(unsigned char c) {
    return c < 0xc0 ? 1 : c < 0xe0 ? 2 : c < 0xf0 ? 3 : 4;
}

size_t moe_tokenizer_utf8_bad(const char *s, size_t n) {
    utf8proc_int32_t cp;
    for (size_t i = 0; i < n;) {
        utf8proc_ssize_t k = utf8proc_iterate((const utf8proc_uint8_t *)s + i,
                                              (utf8proc_ssize_t)(n - i), &cp);
        if (k <= 0) return i;
        i += (size_t)k;
    }
    return n;
}

static int utf8_valid(const char *s, size_t n) { return moe_tokenizer_utf8_bad(s, n) == n; }


/* ---- the parts of the pipeline ---- */

enum {
    /* normalizers */
    N_NFC, N_NFD, N_NFKC, N_NFKD, N_LOWER, N_PREPEND, N_REPLACE,
    /* pre-tokenizers */
    P_SPLIT, P_BYTELEVEL, P_METASPACE, P_DIGITS,
    /* decoders */
    D_BYTELEVEL, D_BYTEFALLBACK, D_FUSE, D_REPLACE, D_STRIP, D_METASPACE,
};
enum { B_ISOLATED, B_REMOVED, B_PREVIOUS, B_NEXT, B_CONTIGUOUS };
enum { PREPEND_ALWAYS, PREPEND_FIRST, PREPEND_NEVER };

typedef struct {
    int kind;
    pcre2_code *re;   /* Split, Replace, ByteLevel with use_regex */
    char *s;          /* Prepend / Replace content; Metaspace replacement; Strip content */
    int flag, a, b;   /* Split: behaviour, invert; ByteLevel: add_prefix_space; Metaspace:
                         prepend scheme, split; Digits: individual; Strip: start, stop */
} step;

typedef struct {
    char *s;
    int len, id, special, lstrip, rstrip;
} added_token;

typedef struct {
    uint64_t key; /* left id << 32 | right id; UINT64_MAX: empty */
    int rank, id;
} merge;

struct moe_tokenizer {
    int size;             /* one more than the largest id */
    char **tok;           /* [size] each id's text (model vocabulary, added tokens override) */
    int *tok_len;
    unsigned char *special; /* [size] */
    int *vocab_slots;     /* open addressing over model vocabulary ids, -1 empty */
    char **vocab_tok;     /* [size] the model vocabulary's text of each id (NULL: none) */
    size_t *vocab_len;    /* [size] its length */
    size_t vocab_mask;
    merge *merges;
    size_t merge_mask;
    int unk, fuse_unk, byte_fallback, ignore_merges;
    int byte_id[256];     /* <0xXX> tokens, -1 when absent */
    added_token *added;
    int n_added;
    unsigned char starts_added[256]; /* bytes that begin an added token */
    step norm[MAX_STEPS], pre[MAX_STEPS], dec[MAX_STEPS];
    int n_norm, n_pre, n_dec, has_decoder;
    int32_t *prefix, *suffix; /* the post-processor's tokens around one sequence */
    int n_prefix, n_suffix;
    unsigned short byte_char[256]; /* GPT-2's byte -> printable code point */
    short char_byte[324];          /* and back (-1: not a byte's code point) */
    pcre2_match_data *md;
};

static uint64_t hash_bytes(const char *s, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)s[i]) * 1099511628211ull;
    return h;
}

static uint64_t hash_u64(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    return x ^ (x >> 33);
}

/* The model vocabulary's id of a token, -1 if none. */
static int vocab_find(const moe_tokenizer *t, const char *s, size_t n) {
    for (size_t i = hash_bytes(s, n) & t->vocab_mask;; i = (i + 1) & t->vocab_mask) {
        int id = t->vocab_slots[i];
        if (id < 0) return -1;
        if (t->vocab_len[id] == n && !memcmp(t->vocab_tok[id], s, n)) return id;
    }
}

static const merge *merge_find(const moe_tokenizer *t, int a, int b) {
    uint64_t key = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
    for (size_t i = hash_u64(key) & t->merge_mask;; i = (i + 1) & t->merge_mask) {
        if (t->merges[i].key == key) return &t->merges[i];
        if (t->merges[i].key == UINT64_MAX) return NULL;
    }
}

static size_t table_size(size_t n) {
    size_t s = 16;
    while (s < 2 * n) s *= 2;
    return s;
}

/* GPT-2's bytes_to_unicode: printable bytes stand for themselves, the others for 256 + n. */
static void byte_table(moe_tokenizer *t) {
    int extra = 0;
    for (int c = 0; c < 324; c++) t->char_byte[c] = -1;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174;
        t->byte_char[b] = (unsigned short)(printable ? b : 256 + extra++);
        t->char_byte[t->byte_char[b]] = (short)b;
    }
}

/* ---- loading ---- */

#define FAIL(...) MOE_FAIL_FORMAT(__VA_ARGS__)

static const char *str_item(const cJSON *j, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, key);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

static int bool_item(const cJSON *j, const char *key, int def) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, key);
    return cJSON_IsBool(v) ? cJSON_IsTrue(v) : def;
}

static int id_value(const cJSON *v) {
    return cJSON_IsNumber(v) && v->valuedouble >= 0 && v->valuedouble < MAX_ID &&
                   v->valuedouble == (int)v->valuedouble
               ? (int)v->valuedouble
               : -1;
}

static moe_status compile(const char *pattern, int literal, pcre2_code **out) {
    int err;
    PCRE2_SIZE at;
    *out = pcre2_compile((PCRE2_SPTR)pattern, PCRE2_ZERO_TERMINATED,
                         PCRE2_UTF | (literal ? PCRE2_LITERAL : PCRE2_UCP), &err, &at, NULL);
    if (!*out) {
        PCRE2_UCHAR msg[160];
        pcre2_get_error_message(err, msg, sizeof msg);
        return moe_set_error(MOE_ERR_FORMAT, "tokenizer.json: pattern \"%.60s\": %s at %zu",
                             pattern, (const char *)msg, (size_t)at);
    }
    pcre2_jit_compile(*out, PCRE2_JIT_COMPLETE); /* optional: the interpreter is the fallback */
    return MOE_OK;
}

/* A {"String": s} or {"Regex": r} pattern. */
static moe_status pattern_item(const cJSON *j, pcre2_code **out) {
    const cJSON *p = cJSON_GetObjectItemCaseSensitive(j, "pattern");
    const char *s = str_item(p, "String"), *r = str_item(p, "Regex");
    if (!s && !r)
        return moe_set_error(MOE_ERR_FORMAT, "tokenizer.json: a pattern needs \"String\" or "
                             "\"Regex\"");
    return compile(s ? s : r, s != NULL, out);
}

static moe_status string_dup(const char *s, const char *what, char **out) {
    if (!s) return moe_set_error(MOE_ERR_FORMAT, "tokenizer.json: %s needs a string", what);
    *out = strdup(s);
    return *out ? MOE_OK : moe_set_error(MOE_ERR_NOMEM, "out of memory");
}

static step *new_step(step *steps, int *n, int kind) {
    if (*n == MAX_STEPS) return NULL;
    memset(&steps[*n], 0, sizeof(step));
    steps[*n].kind = kind;
    return &steps[(*n)++];
}

/* Metaspace's replacement and prepend scheme (prepend_scheme, or the older add_prefix_space). */
static moe_status metaspace_item(const cJSON *j, step *s) {
    MOE_TRY(string_dup(str_item(j, "replacement"), "Metaspace", &s->s));
    if (!s->s[0] || utf8_len((unsigned char)s->s[0]) != (int)strlen(s->s))
        return moe_set_error(MOE_ERR_FORMAT, "tokenizer.json: Metaspace needs one replacement "
                             "character");
    const char *scheme = str_item(j, "prepend_scheme");
    s->flag = bool_item(j, "add_prefix_space", 1) ? PREPEND_ALWAYS : PREPEND_NEVER;
    if (scheme) {
        s->flag = !strcmp(scheme, "always") ? PREPEND_ALWAYS
                  : !strcmp(scheme, "first") ? PREPEND_FIRST
                  : !strcmp(scheme, "never") ? PREPEND_NEVER
                                             : -1;
        if (s->flag < 0)
            return moe_set_error(MOE_ERR_FORMAT, "tokenizer.json: Metaspace prepend_scheme "
                                 "\"%s\" unknown", scheme);
    }
    s->a = bool_item(j, "split", 1);
    return MOE_OK;
}

/* One normalizer, pre-tokenizer or decoder (which: 0, 1, 2), Sequences flattened. */
static moe_status parse_step(const cJSON *j, int which, step *steps, int *n) {
    static const char *const lists[] = {"normalizers", "pretokenizers", "decoders"};
    static const char *const what[] = {"normalizer", "pre_tokenizer", "decoder"};
    if (!j || cJSON_IsNull(j)) return MOE_OK;
    const char *type = str_item(j, "type");
    if (!type) return moe_set_error(MOE_ERR_FORMAT, "tokenizer.json: %s without a type",
                                    what[which]);
    if (!strcmp(type, "Sequence")) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(j, lists[which]), *e;
        if (!cJSON_IsArray(list))
            return moe_set_error(MOE_ERR_FORMAT, "tokenizer.json: Sequence without \"%s\"",
                                 lists[which]);
        cJSON_ArrayForEach(e, list) MOE_TRY(parse_step(e, which, steps, n));
        return MOE_OK;
    }
    static const struct {
        int which;
        const char *type;
        int kind;
    } kinds[] = {
        {0, "NFC", N_NFC},           {0, "NFD", N_NFD},
        {0, "NFKC", N_NFKC},         {0, "NFKD", N_NFKD},
        {0, "Lowercase", N_LOWER},   {0, "Prepend", N_PREPEND},
        {0, "Replace", N_REPLACE},   {1, "Split", P_SPLIT},
        {1, "ByteLevel", P_BYTELEVEL}, {1, "Metaspace", P_METASPACE},
        {1, "Digits", P_DIGITS},     {2, "ByteLevel", D_BYTELEVEL},
        {2, "ByteFallback", D_BYTEFALLBACK}, {2, "Fuse", D_FUSE},
        {2, "Replace", D_REPLACE},   {2, "Strip", D_STRIP},
        {2, "Metaspace", D_METASPACE},
    };
    int kind = -1;
    for (size_t k = 0; k < sizeof kinds / sizeof kinds[0]; k++)
        if (kinds[k].which == which && !strcmp(kinds[k].type, type)) kind = kinds[k].kind;
    if (kind < 0)
        return moe_set_error(MOE_ERR_FORMAT, "tokenizer.json: %s \"%s\" is not supported",
                             what[which], type);
    step *s = new_step(steps, n, kind);
    if (!s) return moe_set_error(MOE_ERR_FORMAT, "tokenizer.json: more than %d %ss",
                                 MAX_STEPS, what[which]);
    switch (kind) {
    case N_PREPEND:
        return string_dup(str_item(j, "prepend"), "Prepend", &s->s);
    case N_REPLACE:
    case D_REPLACE:
        MOE_TRY(pattern_item(j, &s->re));
        return string_dup(str_item(j, "content"), "Replace", &s->s);
    case P_SPLIT: {
        static const char *const names[] = {"Isolated", "Removed", "MergedWithPrevious",
                                            "MergedWithNext", "Contiguous"};
        const char *b = str_item(j, "behavior");
        s->flag = -1;
        for (int k = 0; b && k < 5; k++)
            if (!strcmp(b, names[k])) s->flag = k;
        if (s->flag < 0)
            return moe_set_error(MOE_ERR_FORMAT, "tokenizer.json: Split behavior \"%s\" unknown",
                                 b ? b : "(none)");
        s->a = bool_item(j, "invert", 0);
        return pattern_item(j, &s->re);
    }
    case P_BYTELEVEL:
        s->flag = bool_item(j, "add_prefix_space", 0);
        return bool_item(j, "use_regex", 1) ? compile(GPT2_PATTERN, 0, &s->re) : MOE_OK;
    case P_METASPACE:
    case D_METASPACE:
        return metaspace_item(j, s);
    case P_DIGITS:
        s->flag = bool_item(j, "individual_digits", 0);
        return MOE_OK;
    case D_STRIP: {
        const cJSON *a = cJSON_GetObjectItemCaseSensitive(j, "start"),
                    *b = cJSON_GetObjectItemCaseSensitive(j, "stop");
        s->a = id_value(a), s->b = id_value(b);
        MOE_TRY(string_dup(str_item(j, "content"), "Strip", &s->s));
        if (s->a < 0 || s->b < 0 || utf8_len((unsigned char)s->s[0]) != (int)strlen(s->s))
            return moe_set_error(MOE_ERR_FORMAT, "tokenizer.json: Strip needs one content "
                                 "character and counts start, stop");
        return MOE_OK;
    }
    default:
        return MOE_OK;
    }
}

/* Sets id's text (the model vocabulary's when model, else an added token's). */
static moe_status set_token(moe_tokenizer *t, int id, const char *s, int model) {
    char **slot = model ? &t->vocab_tok[id] : &t->tok[id];
    if (*slot && model)
        return moe_set_error(MOE_ERR_FORMAT, "tokenizer.json: id %d given to \"%.40s\" and "
                             "\"%.40s\"", id, *slot, s);
    free(*slot);
    *slot = strdup(s);
    return *slot ? MOE_OK : moe_set_error(MOE_ERR_NOMEM, "out of memory");
}

/* The largest id in the model vocabulary and the added tokens. */
static moe_status id_range(const cJSON *vocab, const cJSON *added, int *size) {
    const cJSON *e;
    *size = 0;
    cJSON_ArrayForEach(e, vocab) {
        int id = id_value(e);
        if (id < 0)
            return moe_set_error(MOE_ERR_FORMAT, "tokenizer.json: vocabulary entry \"%.40s\" "
                                 "has no id in [0, %d)", e->string, MAX_ID);
        if (id >= *size) *size = id + 1;
    }
    cJSON_ArrayForEach(e, added) {
        int id = id_value(cJSON_GetObjectItemCaseSensitive(e, "id"));
        if (id < 0 || !str_item(e, "content") || !*str_item(e, "content"))
            return moe_set_error(MOE_ERR_FORMAT, "tokenizer.json: an added token needs an id in "
                                 "[0, %d) and a content", MAX_ID);
        if (id >= *size) *size = id + 1;
    }
    return MOE_OK;
}

static moe_status parse_vocab(moe_tokenizer *t, const cJSON *vocab) {
    const cJSON *e;
    cJSON_ArrayForEach(e, vocab) MOE_TRY(set_token(t, id_value(e), e->string, 1));
    int count = 0;
    t->vocab_len = calloc((size_t)t->size, sizeof(size_t));
    if (!t->vocab_len) return moe_set_error(MOE_ERR_NOMEM, "out of memory");
    for (int id = 0; id < t->size; id++) {
        count += t->vocab_tok[id] != NULL;
        t->vocab_len[id] = t->vocab_tok[id] ? strlen(t->vocab_tok[id]) : 0;
    }
    size_t cap = table_size((size_t)count);
    t->vocab_slots = malloc(sizeof(int) * cap);
    if (!t->vocab_slots) return moe_set_error(MOE_ERR_NOMEM, "out of memory");
    memset(t->vocab_slots, 0xff, sizeof(int) * cap);
    t->vocab_mask = cap - 1;
    for (int id = 0; id < t->size; id++) {
        const char *s = t->vocab_tok[id];
        if (!s) continue;
        if (vocab_find(t, s, t->vocab_len[id]) >= 0)
            return moe_set_error(MOE_ERR_FORMAT, "tokenizer.json: \"%.40s\" twice in the "
                                 "vocabulary", s);
        size_t i = hash_bytes(s, t->vocab_len[id]) & t->vocab_mask;
        while (t->vocab_slots[i] >= 0) i = (i + 1) & t->vocab_mask;
        t->vocab_slots[i] = id;
    }
    for (int b = 0; b < 256; b++) {
        char name[8];
        snprintf(name, sizeof name, "<0x%02X>", b);
        t->byte_id[b] = vocab_find(t, name, 6);
    }
    return MOE_OK;
}

/* Merges as "left right" strings or ["left", "right"] pairs; rank = position. */
static moe_status parse_merges(moe_tokenizer *t, const cJSON *list) {
    int n = cJSON_GetArraySize(list), rank = 0;
    t->merge_mask = table_size((size_t)n) - 1;
    t->merges = malloc(sizeof(merge) * (t->merge_mask + 1));
    if (!t->merges) return moe_set_error(MOE_ERR_NOMEM, "out of memory");
    for (size_t i = 0; i <= t->merge_mask; i++) t->merges[i].key = UINT64_MAX;
    const cJSON *e;
    buf joined = {0};
    moe_status status = MOE_OK;
    cJSON_ArrayForEach(e, list) {
        const char *l = NULL, *r = NULL;
        size_t ln = 0;
        if (cJSON_IsString(e) && (r = strchr(e->valuestring, ' ')) && !strchr(r + 1, ' '))
            l = e->valuestring, ln = (size_t)(r - l), r++;
        else if (cJSON_GetArraySize(e) == 2 && cJSON_IsString(cJSON_GetArrayItem(e, 0)) &&
                 cJSON_IsString(cJSON_GetArrayItem(e, 1)))
            l = cJSON_GetArrayItem(e, 0)->valuestring, ln = strlen(l),
            r = cJSON_GetArrayItem(e, 1)->valuestring;
        if (!l) FAIL("tokenizer.json: merge %d is neither \"left right\" nor a pair", rank);
        joined.n = 0;
        if (buf_put(&joined, l, ln) || buf_put(&joined, r, strlen(r))) {
            status = moe_set_error(MOE_ERR_NOMEM, "out of memory");
            goto done;
        }
        int a = vocab_find(t, l, ln), b = vocab_find(t, r, strlen(r)),
            c = vocab_find(t, joined.p, joined.n);
        if (a < 0 || b < 0 || c < 0)
            FAIL("tokenizer.json: merge %d (\"%.40s\") names a token not in the vocabulary",
                 rank, joined.p);
        if (!merge_find(t, a, b)) {
            uint64_t key = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
            size_t i = hash_u64(key) & t->merge_mask;
            while (t->merges[i].key != UINT64_MAX) i = (i + 1) & t->merge_mask;
            t->merges[i] = (merge){key, rank, c};
        }
        rank++;
    }
done:
    free(joined.p);
    return status;
}

static moe_status parse_model(moe_tokenizer *t, const cJSON *model) {
    const char *type = str_item(model, "type");
    if (!type || strcmp(type, "BPE"))
        return moe_set_error(MOE_ERR_FORMAT, "tokenizer.json: model \"%s\" is not supported "
                             "(BPE only)", type ? type : "(none)");
    const char *prefix = str_item(model, "continuing_subword_prefix"),
               *suffix = str_item(model, "end_of_word_suffix");
    if ((prefix && *prefix) || (suffix && *suffix))
        return moe_set_error(MOE_ERR_FORMAT, "tokenizer.json: continuing_subword_prefix and "
                             "end_of_word_suffix are not supported");
    const cJSON *dropout = cJSON_GetObjectItemCaseSensitive(model, "dropout");
    if (dropout && !cJSON_IsNull(dropout) && !(cJSON_IsNumber(dropout) && dropout->valuedouble == 0))
        return moe_set_error(MOE_ERR_FORMAT, "tokenizer.json: BPE dropout is not supported");
    t->fuse_unk = bool_item(model, "fuse_unk", 0);
    t->byte_fallback = bool_item(model, "byte_fallback", 0);
    t->ignore_merges = bool_item(model, "ignore_merges", 0);
    MOE_TRY(parse_vocab(t, cJSON_GetObjectItemCaseSensitive(model, "vocab")));
    const char *unk = str_item(model, "unk_token");
    t->unk = unk ? vocab_find(t, unk, strlen(unk)) : -1;
    if (unk && t->unk < 0)
        return moe_set_error(MOE_ERR_FORMAT, "tokenizer.json: unk_token \"%.40s\" is not in the "
                             "vocabulary", unk);
    const cJSON *merges = cJSON_GetObjectItemCaseSensitive(model, "merges");
    if (merges && !cJSON_IsArray(merges))
        return moe_set_error(MOE_ERR_FORMAT, "tokenizer.json: merges must be a list");
    return parse_merges(t, merges);
}

static moe_status parse_added(moe_tokenizer *t, const cJSON *list) {
    int n = cJSON_GetArraySize(list);
    t->added = calloc((size_t)(n ? n : 1), sizeof(added_token));
    if (!t->added) return moe_set_error(MOE_ERR_NOMEM, "out of memory");
    const cJSON *e;
    cJSON_ArrayForEach(e, list) {
        added_token *a = &t->added[t->n_added++];
        a->id = id_value(cJSON_GetObjectItemCaseSensitive(e, "id"));
        MOE_TRY(string_dup(str_item(e, "content"), "an added token", &a->s));
        a->len = (int)strlen(a->s);
        a->special = bool_item(e, "special", 0);
        a->lstrip = bool_item(e, "lstrip", 0);
        a->rstrip = bool_item(e, "rstrip", 0);
        if (!utf8_valid(a->s, (size_t)a->len))
            return moe_set_error(MOE_ERR_FORMAT, "tokenizer.json: added token %d is not UTF-8",
                                 a->id);
        MOE_TRY(set_token(t, a->id, a->s, 0));
        t->special[a->id] |= (unsigned char)a->special;
        t->starts_added[(unsigned char)a->s[0]] = 1;
    }
    return MOE_OK;
}

/* The ids of the special token named name in a TemplateProcessing's special_tokens. */
static moe_status template_ids(const cJSON *specials, const char *name, int32_t **ids, int *n) {
    const cJSON *list = cJSON_GetObjectItemCaseSensitive(
                    cJSON_GetObjectItemCaseSensitive(specials, name), "ids"), *e;
    if (!cJSON_IsArray(list))
        return moe_set_error(MOE_ERR_FORMAT, "tokenizer.json: special token \"%.40s\" of the "
                             "template has no ids", name);
    cJSON_ArrayForEach(e, list) {
        int32_t *grown = realloc(*ids, sizeof(int32_t) * (size_t)(*n + 1));
        if (!grown) return moe_set_error(MOE_ERR_NOMEM, "out of memory");
        *ids = grown;
        if (((*ids)[(*n)++] = id_value(e)) < 0)
            return moe_set_error(MOE_ERR_FORMAT, "tokenizer.json: bad id of \"%.40s\"", name);
    }
    return MOE_OK;
}

/* A [token, id] pair of RobertaProcessing / BertProcessing. */
static moe_status pair_id(const cJSON *j, const char *key, int32_t **ids, int *n) {
    const cJSON *p = cJSON_GetObjectItemCaseSensitive(j, key);
    int id = id_value(cJSON_GetArrayItem(p, 1));
    *ids = malloc(sizeof(int32_t));
    if (!*ids) return moe_set_error(MOE_ERR_NOMEM, "out of memory");
    if (id < 0) return moe_set_error(MOE_ERR_FORMAT, "tokenizer.json: \"%s\" needs [token, id]",
                                     key);
    (*ids)[0] = id, *n = 1;
    return MOE_OK;
}

/* The post-processor: tokens before and after one sequence. */
static moe_status parse_post(moe_tokenizer *t, const cJSON *j) {
    if (!j || cJSON_IsNull(j)) return MOE_OK;
    const char *type = str_item(j, "type");
    if (type && !strcmp(type, "Sequence")) {
        const cJSON *e;
        cJSON_ArrayForEach(e, cJSON_GetObjectItemCaseSensitive(j, "processors"))
            MOE_TRY(parse_post(t, e));
        return MOE_OK;
    }
    if (type && !strcmp(type, "ByteLevel")) return MOE_OK; /* offsets only */
    if (type && (!strcmp(type, "RobertaProcessing") || !strcmp(type, "BertProcessing"))) {
        if (t->n_prefix || t->n_suffix)
            return moe_set_error(MOE_ERR_FORMAT, "tokenizer.json: two post-processors add tokens");
        MOE_TRY(pair_id(j, "cls", &t->prefix, &t->n_prefix));
        return pair_id(j, "sep", &t->suffix, &t->n_suffix);
    }
    if (!type || strcmp(type, "TemplateProcessing"))
        return moe_set_error(MOE_ERR_FORMAT, "tokenizer.json: post_processor \"%s\" is not "
                             "supported", type ? type : "(none)");
    if (t->n_prefix || t->n_suffix)
        return moe_set_error(MOE_ERR_FORMAT, "tokenizer.json: two post-processors add tokens");
    const cJSON *single = cJSON_GetObjectItemCaseSensitive(j, "single"), *e;
    const cJSON *specials = cJSON_GetObjectItemCaseSensitive(j, "special_tokens");
    int seen = 0;
    cJSON_ArrayForEach(e, single) {
        const cJSON *sp = cJSON_GetObjectItemCaseSensitive(e, "SpecialToken");
        if (cJSON_GetObjectItemCaseSensitive(e, "Sequence")) {
            seen++;
            continue;
        }
        const char *name = str_item(sp, "id");
        if (!name) return moe_set_error(MOE_ERR_FORMAT, "tokenizer.json: a template item is "
                                        "neither Sequence nor SpecialToken");
        MOE_TRY(seen ? template_ids(specials, name, &t->suffix, &t->n_suffix)
                     : template_ids(specials, name, &t->prefix, &t->n_prefix));
    }
    if (seen != 1)
        return moe_set_error(MOE_ERR_FORMAT, "tokenizer.json: the single template needs one "
                             "Sequence");
    return MOE_OK;
}

static moe_status parse(moe_tokenizer *t, const cJSON *j) {
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(j, "model");
    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab");
    const cJSON *added = cJSON_GetObjectItemCaseSensitive(j, "added_tokens");
    if (!cJSON_IsObject(vocab))
        return moe_set_error(MOE_ERR_FORMAT, "tokenizer.json: no model vocabulary");
    if (added && !cJSON_IsArray(added))
        return moe_set_error(MOE_ERR_FORMAT, "tokenizer.json: added_tokens must be a list");
    MOE_TRY(id_range(vocab, added, &t->size));
    t->tok = calloc((size_t)t->size, sizeof(char *));
    t->vocab_tok = calloc((size_t)t->size, sizeof(char *));
    t->tok_len = calloc((size_t)t->size, sizeof(int));
    t->special = calloc((size_t)t->size, 1);
    if (!t->tok || !t->vocab_tok || !t->tok_len || !t->special)
        return moe_set_error(MOE_ERR_NOMEM, "out of memory");
    MOE_TRY(parse_model(t, model));
    MOE_TRY(parse_added(t, added));
    for (int id = 0; id < t->size; id++) {
        if (!t->tok[id] && t->vocab_tok[id]) MOE_TRY(set_token(t, id, t->vocab_tok[id], 0));
        t->tok_len[id] = t->tok[id] ? (int)strlen(t->tok[id]) : 0;
    }
    MOE_TRY(parse_step(cJSON_GetObjectItemCaseSensitive(j, "normalizer"), 0, t->norm, &t->n_norm));
    MOE_TRY(parse_step(cJSON_GetObjectItemCaseSensitive(j, "pre_tokenizer"), 1, t->pre, &t->n_pre));
    const cJSON *dec = cJSON_GetObjectItemCaseSensitive(j, "decoder");
    t->has_decoder = dec && !cJSON_IsNull(dec);
    MOE_TRY(parse_step(dec, 2, t->dec, &t->n_dec));
    MOE_TRY(parse_post(t, cJSON_GetObjectItemCaseSensitive(j, "post_processor")));
    for (int i = 0; i < t->n_prefix; i++)
        if (t->prefix[i] >= t->size || !t->tok[t->prefix[i]])
            return moe_set_error(MOE_ERR_FORMAT, "tokenizer.json: post-processor id %d unknown",
                                 t->prefix[i]);
    for (int i = 0; i < t->n_suffix; i++)
        if (t->suffix[i] >= t->size || !t->tok[t->suffix[i]])
            return moe_set_error(MOE_ERR_FORMAT, "tokenizer.json: post-processor id %d unknown",
                                 t->suffix[i]);
    byte_table(t);
    t->md = pcre2_match_data_create(8, NULL);
    return t->md ? MOE_OK : moe_set_error(MOE_ERR_NOMEM, "out of memory");
}

moe_status moe_tokenizer_load(const char *path, moe_tokenizer **out) {
    *out = NULL;
    char *text = NULL;
    size_t len = 0;
    MOE_TRY(moe_read_file(path, &text, &len));
    moe_status s = moe_tokenizer_parse(text, len, path, out);
    free(text);
    return s;
}

moe_status moe_tokenizer_parse(const char *text, size_t len, const char *path,
                               moe_tokenizer **out) {
    *out = NULL;
    cJSON *j = cJSON_ParseWithLength(text, len);
    if (!j) return moe_set_error(MOE_ERR_FORMAT, "%s: not valid JSON", path);
    moe_tokenizer *t = calloc(1, sizeof *t);
    moe_status s = t ? parse(t, j) : moe_set_error(MOE_ERR_NOMEM, "out of memory");
    cJSON_Delete(j);
    if (s != MOE_OK) {
        char msg[512];
        snprintf(msg, sizeof msg, "%s", moe_last_error());
        moe_tokenizer_free(t);
        return moe_set_error(s, "%s (%s)", msg, path);
    }
    *out = t;
    return MOE_OK;
}

static void free_steps(step *s, int n) {
    for (int i = 0; i < n; i++) {
        pcre2_code_free(s[i].re);
        free(s[i].s);
    }
}

void moe_tokenizer_free(moe_tokenizer *t) {
    if (!t) return;
    for (int id = 0; id < t->size; id++) {
        if (t->tok) free(t->tok[id]);
        if (t->vocab_tok) free(t->vocab_tok[id]);
    }
    free(t->tok), free(t->vocab_tok), free(t->vocab_len), free(t->tok_len), free(t->special);
    free(t->vocab_slots), free(t->merges);
    for (int i = 0; i < t->n_added; i++) free(t->added[i].s);
    free(t->added);
    free_steps(t->norm, t->n_norm), free_steps(t->pre, t->n_pre), free_steps(t->dec, t->n_dec);
    free(t->prefix), free(t->suffix);
    pcre2_match_data_free(t->md);
    free(t);
}

int moe_tokenizer_size(const moe_tokenizer *t) {
    return t->size;
}

/* ---- encoding ---- */

/* The next match of re in s[from, n): 1 with [*ms, *me), 0 when none. */
static int find(const moe_tokenizer *t, pcre2_code *re, const char *s, size_t n, size_t from,
                size_t *ms, size_t *me) {
    int rc = pcre2_match(re, (PCRE2_SPTR)s, n, from, PCRE2_NO_UTF_CHECK, t->md, NULL);
    if (rc < 0) return 0;
    PCRE2_SIZE *ov = pcre2_get_ovector_pointer(t->md);
    *ms = ov[0], *me = ov[1];
    return 1;
}

/* Calls fn for the spans of s: the matches of re (match = 1) and the gaps between them
 * (match = 0), in order, empty gaps left out. Empty matches are skipped. */
typedef int (*span_fn)(void *ctx, const char *s, size_t n, int match);
static int spans(const moe_tokenizer *t, pcre2_code *re, const char *s, size_t n, span_fn fn,
                 void *ctx) {
    size_t at = 0, from = 0, ms, me;
    while (from <= n && find(t, re, s, n, from, &ms, &me)) {
        if (me == ms) { /* step over one character */
            from = ms + (ms < n ? (size_t)utf8_len((unsigned char)s[ms]) : 1);
            continue;
        }
        if (ms > at && fn(ctx, s + at, ms - at, 0)) return -1;
        if (fn(ctx, s + ms, me - ms, 1)) return -1;
        at = from = me;
    }
    return at < n ? fn(ctx, s + at, n - at, 0) : 0;
}

/* Replace: the matches of re by content. */
typedef struct {
    buf *out;
    const char *content;
} replace_ctx;

static int replace_span(void *ctx, const char *s, size_t n, int match) {
    replace_ctx *r = ctx;
    return match ? buf_put(r->out, r->content, strlen(r->content)) : buf_put(r->out, s, n);
}

static int replace_all(const moe_tokenizer *t, const step *st, const char *s, size_t n, buf *out) {
    replace_ctx r = {out, st->s};
    out->n = 0;
    if (buf_put(out, "", 0)) return -1;
    return spans(t, st->re, s, n, replace_span, &r);
}

/* Unicode normalisation by utf8proc (NFC, NFD, NFKC, NFKD) and lowercase. */
static int unicode_map(int kind, const char *s, size_t n, buf *out) {
    out->n = 0;
    if (kind == N_LOWER) {
        utf8proc_int32_t cp;
        for (size_t i = 0; i < n;) {
            utf8proc_ssize_t k = utf8proc_iterate((const utf8proc_uint8_t *)s + i,
                                                  (utf8proc_ssize_t)(n - i), &cp);
            utf8proc_uint8_t enc[8];
            /* Rust's char::to_lowercase: U+0130 (İ) is the one letter whose lowercase is two
             * code points (i and a combining dot above); utf8proc gives only the first */
            utf8proc_ssize_t m = utf8proc_encode_char(cp == 0x130 ? 'i' : utf8proc_tolower(cp), enc);
            if (cp == 0x130) m += utf8proc_encode_char(0x307, enc + m);
            if (k <= 0 || buf_put(out, enc, (size_t)m)) return -1;
            i += (size_t)k;
        }
        return buf_put(out, "", 0);
    }
    int opt = UTF8PROC_STABLE | (kind == N_NFC || kind == N_NFKC ? UTF8PROC_COMPOSE
                                                                 : UTF8PROC_DECOMPOSE) |
              (kind == N_NFKC || kind == N_NFKD ? UTF8PROC_COMPAT : 0);
    utf8proc_uint8_t *mapped = NULL;
    utf8proc_ssize_t m = utf8proc_map((const utf8proc_uint8_t *)s, (utf8proc_ssize_t)n, &mapped,
                                      (utf8proc_option_t)opt);
    int rc = m < 0 ? -1 : buf_put(out, mapped, (size_t)m);
    free(mapped);
    return rc;
}

/* The normalizers over one segment of text, in place in *seg (a scratch buffer in tmp). */
static int normalize(const moe_tokenizer *t, buf *seg, buf *tmp) {
    for (int i = 0; i < t->n_norm; i++) {
        const step *st = &t->norm[i];
        int rc;
        if (st->kind == N_PREPEND) {
            tmp->n = 0;
            rc = seg->n ? buf_put(tmp, st->s, strlen(st->s)) || buf_put(tmp, seg->p, seg->n)
                        : buf_put(tmp, "", 0);
        } else if (st->kind == N_REPLACE) {
            rc = replace_all(t, st, seg->p, seg->n, tmp);
        } else {
            rc = unicode_map(st->kind, seg->p, seg->n, tmp);
        }
        if (rc) return -1;
        buf swap = *seg;
        *seg = *tmp, *tmp = swap;
    }
    return 0;
}

/* Split: the spans of one piece, joined or dropped by the behaviour (the tokenizers
 * library's SplitDelimiterBehavior). */
typedef struct {
    pieces *out;
    const step *st;
    int base;    /* out->n when this piece began */
    int prev;    /* the previous span: -1 none, 0 gap, 1 match */
    int pending; /* MergedWithNext: a match waits in carry for the span after it */
    buf carry;
} split_ctx;

/* Appends s to the last piece of out. */
static int extend_last(pieces *out, const char *s, size_t n) {
    if (buf_put(&out->text, s, n)) return -1;
    out->off[out->n] = out->text.n;
    return 0;
}

static int split_span(void *ctx, const char *s, size_t n, int match) {
    split_ctx *c = ctx;
    pieces *out = c->out;
    int prev = c->prev, rc;
    match ^= c->st->a; /* invert */
    c->prev = match;
    switch (c->st->flag) {
    case B_REMOVED:
        return match ? 0 : pieces_add(out, s, n);
    case B_PREVIOUS: /* a match joins the gap before it */
        return match && prev == 0 && out->n > c->base ? extend_last(out, s, n)
                                                       : pieces_add(out, s, n);
    case B_CONTIGUOUS: /* runs of the same kind form one piece */
        return match == prev && out->n > c->base ? extend_last(out, s, n)
                                                  : pieces_add(out, s, n);
    case B_NEXT: /* a match starts the gap after it */
        if (c->pending && (rc = pieces_add(out, c->carry.p, c->carry.n))) return rc;
        if (c->pending && !match) {
            c->pending = 0;
            return extend_last(out, s, n);
        }
        c->pending = match;
        c->carry.n = 0;
        return match ? buf_put(&c->carry, s, n) : pieces_add(out, s, n);
    default:
        return pieces_add(out, s, n);
    }
}

static int split_piece(const moe_tokenizer *t, const step *st, const char *s, size_t n,
                       pieces *out) {
    split_ctx c = {out, st, out->n, -1, 0, {0}};
    int rc = spans(t, st->re, s, n, split_span, &c);
    if (!rc && c.pending) rc = pieces_add(out, c.carry.p, c.carry.n);
    free(c.carry.p);
    return rc;
}

/* ByteLevel: each byte as its GPT-2 printable character. */
static int byte_level(const moe_tokenizer *t, const char *s, size_t n, pieces *out) {
    buf b = {0};
    int rc = 0;
    for (size_t i = 0; i < n && !rc; i++) {
        utf8proc_uint8_t enc[4];
        rc = buf_put(&b, enc, (size_t)utf8proc_encode_char(t->byte_char[(unsigned char)s[i]], enc));
    }
    if (!rc) rc = pieces_add(out, b.p ? b.p : "", b.n);
    free(b.p);
    return rc;
}

/* The ByteLevel pre-tokenizer: a space in front (add_prefix_space), GPT-2's split (use_regex),
 * the bytes mapped. */
static int byte_level_piece(const moe_tokenizer *t, const step *st, const char *s, size_t n,
                            pieces *out) {
    buf spaced = {0};
    pieces parts = {0};
    int rc = 0;
    if (st->flag && n && s[0] != ' ') {
        rc = buf_put(&spaced, " ", 1) || buf_put(&spaced, s, n);
        s = spaced.p, n = spaced.n;
    }
    if (!rc && st->re) {
        step iso = {P_SPLIT, st->re, NULL, B_ISOLATED, 0, 0};
        rc = split_piece(t, &iso, s, n, &parts);
    } else if (!rc) {
        rc = pieces_add(&parts, s, n);
    }
    for (int q = 0; !rc && q < parts.n; q++)
        rc = byte_level(t, PIECE(&parts, q), PIECE_LEN(&parts, q), out);
    pieces_free(&parts);
    free(spaced.p);
    return rc;
}

/* Metaspace: spaces become the replacement, one prepended unless there; split before each
 * replacement (MergedWithNext). */
static int metaspace(const step *st, const char *s, size_t n, int first, pieces *out) {
    buf b = {0};
    size_t rl = strlen(st->s);
    int rc = 0, prepend = st->flag == PREPEND_ALWAYS || (st->flag == PREPEND_FIRST && first);
    if (prepend && n && s[0] != ' ' && !(n >= rl && !memcmp(s, st->s, rl)))
        rc = buf_put(&b, st->s, rl);
    for (size_t i = 0; i < n && !rc; i++)
        rc = s[i] == ' ' ? buf_put(&b, st->s, rl) : buf_put(&b, s + i, 1);
    if (!rc && !st->a) rc = pieces_add(out, b.p ? b.p : "", b.n);
    for (size_t i = 0, at = 0; !rc && st->a && i <= b.n; i++) {
        int cut = i == b.n || (i > at && b.n - i >= rl && !memcmp(b.p + i, st->s, rl));
        if (!cut) continue;
        if (i > at) rc = pieces_add(out, b.p + at, i - at);
        at = i;
    }
    free(b.p);
    return rc;
}

/* The code point at s[i] (n bytes in all): whether it is a number as Rust's char::is_numeric
 * says (general category Nd, Nl or No); its length in *len (1 for a byte that is not UTF-8). */
static int numeric_at(const char *s, size_t n, size_t i, size_t *len) {
    utf8proc_int32_t cp;
    utf8proc_ssize_t k = utf8proc_iterate((const utf8proc_uint8_t *)s + i, (utf8proc_ssize_t)(n - i),
                                          &cp);
    *len = k > 0 ? (size_t)k : 1;
    if (k <= 0) return 0;
    utf8proc_category_t c = utf8proc_category(cp);
    return c == UTF8PROC_CATEGORY_ND || c == UTF8PROC_CATEGORY_NL || c == UTF8PROC_CATEGORY_NO;
}

/* Digits: runs of numbers (or each number) apart from the rest, as the tokenizers library
 * splits with char::is_numeric: other scripts' digits, superscripts, fractions too. */
static int digits(const step *st, const char *s, size_t n, pieces *out) {
    size_t at = 0, len = 0; /* the code point before i: a number or not (d0), its length */
    int d0 = n > 0 && numeric_at(s, n, 0, &len);
    for (size_t i = 0; i < n;) {
        size_t next_len = 0;
        i += len;
        int d1 = i < n && numeric_at(s, n, i, &next_len);
        if (!(i < n && d0 == d1 && !(d0 && st->flag))) {
            if (pieces_add(out, s + at, i - at)) return -1;
            at = i;
        }
        d0 = d1, len = next_len;
    }
    return 0;
}

/* The pre-tokenizers over one normalised segment (first: the text's start). */
static int pre_tokenize(const moe_tokenizer *t, const char *s, size_t n, int first, pieces *out) {
    pieces cur = {0}, next = {0};
    if (pieces_add(&cur, s, n)) return -1;
    for (int i = 0; i < t->n_pre; i++) {
        const step *st = &t->pre[i];
        for (int p = 0; p < cur.n; p++) {
            const char *ps = PIECE(&cur, p);
            size_t pn = PIECE_LEN(&cur, p);
            int rc = 0;
            if (st->kind == P_SPLIT) {
                rc = split_piece(t, st, ps, pn, &next);
            } else if (st->kind == P_BYTELEVEL) {
                rc = byte_level_piece(t, st, ps, pn, &next);
            } else if (st->kind == P_METASPACE) {
                rc = metaspace(st, ps, pn, first && p == 0, &next);
            } else {
                rc = digits(st, ps, pn, &next);
            }
            if (rc) {
                pieces_free(&cur), pieces_free(&next);
                return -1;
            }
        }
        pieces_free(&cur);
        cur = next;
        memset(&next, 0, sizeof next);
    }
    for (int p = 0; p < cur.n; p++)
        if (PIECE_LEN(&cur, p) && pieces_add(out, PIECE(&cur, p), PIECE_LEN(&cur, p))) {
            pieces_free(&cur);
            return -1;
        }
    pieces_free(&cur);
    return 0;
}

/* ids: a growable list of token ids. */
typedef struct {
    int32_t *p;
    int n, cap;
} idlist;

static int ids_put(idlist *l, int32_t id) {
    if (l->n == l->cap) {
        int cap = l->cap ? 2 * l->cap : 64;
        int32_t *p = realloc(l->p, sizeof(int32_t) * (size_t)cap);
        if (!p) return -1;
        l->p = p, l->cap = cap;
    }
    l->p[l->n++] = id;
    return 0;
}

typedef struct {
    int id, prev, next, len; /* len 0: merged into its left neighbour */
} symbol;

typedef struct {
    int rank, pos, id;
} candidate;

static int cand_less(const candidate *a, const candidate *b) {
    return a->rank != b->rank ? a->rank < b->rank : a->pos < b->pos;
}

static void heap_push(candidate *h, int *n, candidate c) {
    int i = (*n)++;
    while (i > 0 && cand_less(&c, &h[(i - 1) / 2])) {
        h[i] = h[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    h[i] = c;
}

static candidate heap_pop(candidate *h, int *n) {
    candidate top = h[0], last = h[--(*n)];
    int i = 0;
    for (;;) {
        int c = 2 * i + 1;
        if (c >= *n) break;
        if (c + 1 < *n && cand_less(&h[c + 1], &h[c])) c++;
        if (!cand_less(&h[c], &last)) break;
        h[i] = h[c];
        i = c;
    }
    if (*n) h[i] = last;
    return top;
}

static void push_pair(const moe_tokenizer *t, const symbol *sy, int pos, candidate *h, int *nh) {
    if (pos < 0 || sy[pos].next < 0) return;
    const merge *m = merge_find(t, sy[pos].id, sy[sy[pos].next].id);
    if (m) heap_push(h, nh, (candidate){m->rank, pos, m->id});
}

/* BPE of one pre-token: its characters (or their <0xXX> bytes, or unk), then the merges of
 * lowest rank first (leftmost on ties), as the tokenizers library does. */
static int bpe(const moe_tokenizer *t, const char *s, size_t n, idlist *out) {
    if (t->ignore_merges) {
        int id = vocab_find(t, s, n);
        if (id >= 0) return ids_put(out, id);
    }
    symbol *sy = malloc(sizeof(symbol) * (n + 1));
    candidate *h = malloc(sizeof(candidate) * (3 * n + 1));
    int ns = 0, nh = 0, rc = 0, last_unk = 0;
    if (!sy || !h) rc = -1;
    for (size_t i = 0; !rc && i < n;) {
        int cl = utf8_len((unsigned char)s[i]);
        if ((size_t)cl > n - i) cl = (int)(n - i);
        int id = vocab_find(t, s + i, (size_t)cl), ok = id < 0 && t->byte_fallback;
        for (int b = 0; ok && b < cl; b++) ok = t->byte_id[(unsigned char)s[i + b]] >= 0;
        if (id >= 0 || ok) {
            for (int b = 0; b < (id >= 0 ? 1 : cl); b++, ns++)
                sy[ns] = (symbol){id >= 0 ? id : t->byte_id[(unsigned char)s[i + b]], ns - 1,
                                  ns + 1, id >= 0 ? cl : 1};
            last_unk = 0;
        } else if (t->unk >= 0) { /* no unk token: the character is dropped, as upstream */
            if (t->fuse_unk && last_unk) {
                sy[ns - 1].len += cl;
            } else {
                sy[ns] = (symbol){t->unk, ns - 1, ns + 1, cl};
                ns++;
            }
            last_unk = 1;
        }
        i += (size_t)cl;
    }
    if (ns) sy[ns - 1].next = -1;
    for (int i = 0; !rc && i < ns; i++) push_pair(t, sy, i, h, &nh);
    while (!rc && nh) {
        candidate c = heap_pop(h, &nh);
        int r = sy[c.pos].next;
        if (!sy[c.pos].len || r < 0) continue;
        const merge *m = merge_find(t, sy[c.pos].id, sy[r].id);
        if (!m || m->id != c.id) continue; /* stale: a neighbour changed */
        sy[c.pos].id = c.id;
        sy[c.pos].len += sy[r].len;
        sy[r].len = 0;
        sy[c.pos].next = sy[r].next;
        if (sy[r].next >= 0) sy[sy[r].next].prev = c.pos;
        push_pair(t, sy, sy[c.pos].prev, h, &nh);
        push_pair(t, sy, c.pos, h, &nh);
    }
    for (int i = 0; !rc && i < ns; i++)
        if (sy[i].len) rc = ids_put(out, sy[i].id);
    free(sy), free(h);
    return rc;
}

/* The added token that starts earliest at or after from (longest on ties): index, or -1;
 * [*ms, *me) its span with lstrip / rstrip whitespace. */
static int is_space(char c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

static int next_added(const moe_tokenizer *t, const char *s, size_t n, size_t from, size_t *ms,
                      size_t *me) {
    for (size_t i = from; i < n; i++) {
        if (!t->starts_added[(unsigned char)s[i]]) continue;
        int best = -1;
        for (int a = 0; a < t->n_added; a++) {
            const added_token *at = &t->added[a];
            if ((size_t)at->len <= n - i && !memcmp(s + i, at->s, (size_t)at->len) &&
                (best < 0 || at->len > t->added[best].len))
                best = a;
        }
        if (best < 0) continue;
        *ms = i, *me = i + (size_t)t->added[best].len;
        while (t->added[best].lstrip && *ms > from && is_space(s[*ms - 1])) (*ms)--;
        while (t->added[best].rstrip && *me < n && is_space(s[*me])) (*me)++;
        return best;
    }
    return -1;
}

/* One segment between added tokens: normalise, pre-tokenise, BPE. */
static int encode_segment(const moe_tokenizer *t, const char *s, size_t n, int first,
                          idlist *out) {
    buf seg = {0}, tmp = {0};
    pieces words = {0};
    int rc = buf_put(&seg, s, n) || normalize(t, &seg, &tmp) ||
             pre_tokenize(t, seg.p, seg.n, first, &words);
    for (int w = 0; !rc && w < words.n; w++) rc = bpe(t, PIECE(&words, w), PIECE_LEN(&words, w), out);
    free(seg.p), free(tmp.p);
    pieces_free(&words);
    return rc;
}

moe_status moe_tokenizer_encode(const moe_tokenizer *t, const char *text, size_t len,
                                int add_special, int32_t **ids, int *n) {
    *ids = NULL, *n = 0;
    if (!utf8_valid(text, len)) return moe_set_error(MOE_ERR_FORMAT, "the text is not UTF-8");
    if (len > (size_t)1 << 30) return moe_set_error(MOE_ERR_INVALID, "the text is over 1 GiB");
    idlist out = {0};
    int rc = 0;
    for (int i = 0; add_special && !rc && i < t->n_prefix; i++) rc = ids_put(&out, t->prefix[i]);
    size_t at = 0, ms, me;
    while (!rc && at < len) {
        int a = next_added(t, text, len, at, &ms, &me);
        if (a < 0) ms = me = len;
        if (ms > at) rc = encode_segment(t, text + at, ms - at, at == 0, &out);
        if (!rc && a >= 0) rc = ids_put(&out, t->added[a].id);
        at = me;
    }
    for (int i = 0; add_special && !rc && i < t->n_suffix; i++) rc = ids_put(&out, t->suffix[i]);
    if (rc) {
        free(out.p);
        return moe_set_error(MOE_ERR_NOMEM, "out of memory while encoding");
    }
    *ids = out.p, *n = out.n;
    return MOE_OK;
}

/* ---- decoding: the decoders turn a list of token texts into another ---- */

static int byte_token(const char *s, size_t n) {
    unsigned v;
    char tail;
    if (n != 6 || strncmp(s, "<0x", 3) || s[5] != '>') return -1;
    return sscanf(s + 3, "%2X%c", &v, &tail) == 2 && tail == '>' ? (int)v : -1;
}

static int decode_step(const moe_tokenizer *t, const step *st, pieces *in, pieces *out) {
    buf b = {0};
    int rc = 0;
    if (st->kind == D_FUSE) {
        rc = pieces_add(out, in->text.p ? in->text.p : "", in->text.n);
    } else if (st->kind == D_BYTELEVEL) { /* per token: all characters mapped, or as is */
        for (int p = 0; !rc && p < in->n; p++) {
            const char *s = PIECE(in, p);
            size_t n = PIECE_LEN(in, p), start = b.n;
            int all = 1;
            for (size_t i = 0; all && !rc && i < n;) {
                utf8proc_int32_t cp;
                utf8proc_ssize_t k = utf8proc_iterate((const utf8proc_uint8_t *)s + i,
                                                      (utf8proc_ssize_t)(n - i), &cp);
                all = k > 0 && cp < 324 && t->char_byte[cp] >= 0;
                if (all) {
                    char c = (char)t->char_byte[cp];
                    rc = buf_put(&b, &c, 1);
                    i += (size_t)k;
                }
            }
            if (!all) b.n = start, rc = rc || buf_put(&b, s, n);
        }
        if (!rc) rc = pieces_add(out, b.p ? b.p : "", b.n);
    } else if (st->kind == D_BYTEFALLBACK) { /* <0xXX> runs to text, U+FFFD per byte if invalid */
        for (int p = 0; !rc && p <= in->n; p++) {
            int v = p < in->n ? byte_token(PIECE(in, p), PIECE_LEN(in, p)) : -1;
            if (v >= 0) {
                char c = (char)v;
                rc = buf_put(&b, &c, 1);
                continue;
            }
            if (b.n && utf8_valid(b.p, b.n)) rc = pieces_add(out, b.p, b.n);
            for (size_t k = 0; !rc && b.n && !utf8_valid(b.p, b.n) && k < b.n; k++)
                rc = pieces_add(out, "\xef\xbf\xbd", 3);
            b.n = 0;
            if (!rc && p < in->n) rc = pieces_add(out, PIECE(in, p), PIECE_LEN(in, p));
        }
    } else {
        for (int p = 0; !rc && p < in->n; p++) {
            const char *s = PIECE(in, p);
            size_t n = PIECE_LEN(in, p), cl = st->s ? strlen(st->s) : 0;
            if (st->kind == D_REPLACE) {
                rc = replace_all(t, st, s, n, &b);
                s = b.p, n = b.n;
            } else if (st->kind == D_STRIP) {
                for (int k = 0; k < st->a && n >= cl && !memcmp(s, st->s, cl); k++) s += cl, n -= cl;
                for (int k = 0; k < st->b && n >= cl && !memcmp(s + n - cl, st->s, cl); k++) n -= cl;
            } else { /* Metaspace: replacements to spaces; in the first token, dropped */
                int drop = p == 0 && st->flag != PREPEND_NEVER;
                b.n = 0;
                for (size_t i = 0; !rc && i < n;) {
                    int hit = n - i >= cl && !memcmp(s + i, st->s, cl);
                    rc = hit ? (drop ? 0 : buf_put(&b, " ", 1)) : buf_put(&b, s + i, 1);
                    i += hit ? cl : 1;
                }
                s = b.p ? b.p : "", n = b.n;
            }
            if (!rc) rc = pieces_add(out, s, n);
        }
    }
    free(b.p);
    return rc;
}

moe_status moe_tokenizer_decode(const moe_tokenizer *t, const int32_t *ids, int n,
                                int skip_special, char **text, size_t *len) {
    *text = NULL, *len = 0;
    pieces cur = {0}, next = {0};
    int rc = 0;
    for (int i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= t->size || !t->tok[ids[i]])
            continue; /* no text (a model's padded vocabulary), as the library drops them */
        if (!(skip_special && t->special[ids[i]]) &&
            pieces_add(&cur, t->tok[ids[i]], (size_t)t->tok_len[ids[i]]))
            rc = -1;
    }
    for (int i = 0; !rc && i < t->n_dec; i++) {
        rc = decode_step(t, &t->dec[i], &cur, &next);
        pieces_free(&cur);
        cur = next;
        memset(&next, 0, sizeof next);
    }
    buf out = {0};
    for (int p = 0; !rc && p < cur.n; p++)
        rc = (p && !t->has_decoder && buf_put(&out, " ", 1)) ||
             buf_put(&out, PIECE(&cur, p), PIECE_LEN(&cur, p));
    if (!rc) rc = buf_put(&out, "", 0);
    pieces_free(&cur), pieces_free(&next);
    if (rc) {
        free(out.p);
        return moe_set_error(MOE_ERR_NOMEM, "out of memory while decoding");
    }
    *text = out.p, *len = out.n;
    return MOE_OK;
}

/* ---- our byte-level vocabulary as a tokenizer.json ---- */

char *moe_tokenizer_bytes_json(void) {
    moe_tokenizer t;
    byte_table(&t);
    cJSON *j = cJSON_CreateObject(), *added = cJSON_AddArrayToObject(j, "added_tokens");
    cJSON *eot = cJSON_CreateObject();
    cJSON_AddNumberToObject(eot, "id", MOE_BYTE_EOT);
    cJSON_AddStringToObject(eot, "content", "<|endoftext|>");
    cJSON_AddBoolToObject(eot, "single_word", 0);
    cJSON_AddBoolToObject(eot, "lstrip", 0);
    cJSON_AddBoolToObject(eot, "rstrip", 0);
    cJSON_AddBoolToObject(eot, "normalized", 0);
    cJSON_AddBoolToObject(eot, "special", 1);
    cJSON_AddItemToArray(added, eot);
    cJSON_AddNullToObject(j, "normalizer");
    const char *const parts[] = {"pre_tokenizer", "decoder"};
    for (int i = 0; i < 2; i++) { /* bytes as GPT-2's characters, no split */
        cJSON *bl = cJSON_AddObjectToObject(j, parts[i]);
        cJSON_AddStringToObject(bl, "type", "ByteLevel");
        cJSON_AddBoolToObject(bl, "add_prefix_space", 0);
        cJSON_AddBoolToObject(bl, "trim_offsets", 0);
        cJSON_AddBoolToObject(bl, "use_regex", 0);
    }
    cJSON_AddNullToObject(j, "post_processor");
    cJSON *model = cJSON_AddObjectToObject(j, "model");
    cJSON_AddStringToObject(model, "type", "BPE");
    cJSON *vocab = cJSON_AddObjectToObject(model, "vocab");
    for (int b = 0; b < 256; b++) {
        utf8proc_uint8_t enc[5] = {0};
        utf8proc_encode_char(t.byte_char[b], enc);
        cJSON_AddNumberToObject(vocab, (const char *)enc, b);
    }
    cJSON_AddArrayToObject(model, "merges");
    char *text = cJSON_Print(j);
    cJSON_Delete(j);
    return text;
}

moe_status moe_tokenizer_write_bytes(const char *path) {
    char *text = moe_tokenizer_bytes_json();
    if (!text) return moe_set_error(MOE_ERR_NOMEM, "out of memory for tokenizer.json");
    const void *data[] = {text, "\n"};
    size_t sizes[] = {strlen(text), 1};
    moe_status s = moe_write_atomic(path, data, sizes, 2);
    free(text);
    return s;
}
