/* safetensors reader (checked) and writer (atomic). */
#define _POSIX_C_SOURCE 200809L
#include "io/safetensors.h"

#include "core/core.h"
#include "io/data.h"

#include <cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* safetensors' dtypes, in moe_dtype's order */
static const char *const dtype_names[] = {"F32", "F16", "BF16", "F64",  "I64",     "I32",
                                          "I16", "I8",  "U64",  "U32",  "U16",     "U8",
                                          "BOOL", "F8_E4M3", "F8_E5M2"};
static const size_t dtype_sizes[] = {4, 2, 2, 8, 8, 4, 2, 1, 8, 4, 2, 1, 1, 1, 1};
#define N_DTYPES 15

const char *moe_st_dtype_name(moe_dtype d) {
    return (int)d >= 0 && (int)d < N_DTYPES ? dtype_names[d] : "?";
}

void moe_st_free(moe_safetensors *st) {
    for (int i = 0; i < st->n_meta; i++) {
        free(st->meta_keys[i]);
        free(st->meta_values[i]);
    }
    free(st->meta_keys);
    free(st->meta_values);
    free(st->tensors);
    if (st->buf) munmap(st->buf, st->size);
    memset(st, 0, sizeof *st);
}


/* By where the data begins, an empty tensor before a full one at the same offset (a file may
 * place an empty tensor where the next one begins). */
static int cmp_begin(const void *a, const void *b) {
    const moe_st_tensor *x = *(moe_st_tensor *const *)a, *y = *(moe_st_tensor *const *)b;
    if (x->data != y->data) return x->data < y->data ? -1 : 1;
    return x->nbytes < y->nbytes ? -1 : x->nbytes > y->nbytes;
}

moe_status moe_st_read(const char *path, moe_safetensors *out) {
    memset(out, 0, sizeof *out);
    int fd = open(path, O_RDONLY);
    if (fd < 0) return moe_set_error(MOE_ERR_IO, "cannot open %s: %s", path, strerror(errno));
    moe_status status = MOE_OK;
    cJSON *root = NULL;
    moe_st_tensor **order = NULL;
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) MOE_FAIL_FORMAT("%s: not a regular file", path);
    if (sb.st_size < 8)
        MOE_FAIL_FORMAT("%s: too short for a safetensors file (%lld bytes)", path,
                        (long long)sb.st_size);
    /* memory-mapped: tensors are read (converted to float32) straight from the page cache */
    void *map = mmap(NULL, (size_t)sb.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (map == MAP_FAILED) {
        status = moe_set_error(MOE_ERR_IO, "cannot map %s: %s", path, strerror(errno));
        goto done;
    }
    out->buf = map;
    out->size = (size_t)sb.st_size;
    uint64_t hlen;
    memcpy(&hlen, out->buf, 8);
    if (hlen > out->size - 8)
        MOE_FAIL_FORMAT("%s: not a safetensors file, or one cut short: header length %llu exceeds "
                        "the file (%zu bytes)", path, (unsigned long long)hlen, out->size);
    const unsigned char *data = out->buf + 8 + hlen;
    size_t data_len = out->size - 8 - (size_t)hlen;
    root = cJSON_ParseWithLength((const char *)out->buf + 8, (size_t)hlen);
    if (!cJSON_IsObject(root)) MOE_FAIL_FORMAT("%s: the header is not a JSON object", path);
    int n = cJSON_GetArraySize(root), seen_meta = 0;
    out->tensors = calloc((size_t)n + 1, sizeof *out->tensors);
    out->meta_keys = calloc((size_t)n + 1, sizeof(char *));
    out->meta_values = calloc((size_t)n + 1, sizeof(char *));
    if (!out->tensors || !out->meta_keys || !out->meta_values) {
        status = moe_set_error(MOE_ERR_NOMEM, "out of memory reading %s", path);
        goto done;
    }
    for (cJSON *it = root->child; it; it = it->next) {
        if (!strcmp(it->string, "__metadata__")) {
            if (!cJSON_IsObject(it)) MOE_FAIL_FORMAT("%s: __metadata__ is not an object", path);
            /* a second one would overrun the arrays sized for the first (found while
             * writing fuzz/fuzz_safetensors.c; fuzz/regressions/safetensors/) */
            if (seen_meta) MOE_FAIL_FORMAT("%s: __metadata__ appears twice", path);
            seen_meta = 1;
            int nm = cJSON_GetArraySize(it);
            char **k = realloc(out->meta_keys, sizeof(char *) * (size_t)(nm + 1));
            if (k) out->meta_keys = k;
            char **v = realloc(out->meta_values, sizeof(char *) * (size_t)(nm + 1));
            if (v) out->meta_values = v;
            if (!k || !v) MOE_FAIL_FORMAT("%s: out of memory", path);
            for (cJSON *m = it->child; m; m = m->next) {
                if (!cJSON_IsString(m)) MOE_FAIL_FORMAT("%s: metadata value of '%s' is not a string", path, m->string);
                out->meta_keys[out->n_meta] = strdup(m->string);
                out->meta_values[out->n_meta] = strdup(m->valuestring);
                out->n_meta++;
            }
            continue;
        }
        moe_st_tensor *t = &out->tensors[out->n_tensors];
        if (strlen(it->string) >= sizeof t->name) MOE_FAIL_FORMAT("%s: tensor name too long: %.60s...", path, it->string);
        snprintf(t->name, sizeof t->name, "%s", it->string);
        cJSON *dt = cJSON_GetObjectItemCaseSensitive(it, "dtype");
        cJSON *sh = cJSON_GetObjectItemCaseSensitive(it, "shape");
        cJSON *off = cJSON_GetObjectItemCaseSensitive(it, "data_offsets");
        if (!cJSON_IsString(dt) || !cJSON_IsArray(sh) || !cJSON_IsArray(off) ||
            cJSON_GetArraySize(off) != 2)
            MOE_FAIL_FORMAT("%s: tensor '%s' lacks dtype, shape or data_offsets", path, t->name);
        int d;
        for (d = 0; d < N_DTYPES && strcmp(dt->valuestring, dtype_names[d]); d++) {}
        if (d == N_DTYPES) MOE_FAIL_FORMAT("%s: tensor '%s' has unsupported dtype %s", path, t->name, dt->valuestring);
        t->dtype = (moe_dtype)d;
        t->ndim = cJSON_GetArraySize(sh);
        if (t->ndim > 8) MOE_FAIL_FORMAT("%s: tensor '%s' has %d dimensions", path, t->name, t->ndim);
        size_t numel = 1;
        int i = 0;
        for (cJSON *s = sh->child; s; s = s->next, i++) {
            double v = cJSON_IsNumber(s) ? s->valuedouble : -1;
            if (v < 0 || v != floor(v) || v > 9e15) MOE_FAIL_FORMAT("%s: tensor '%s' has a bad shape", path, t->name);
            t->shape[i] = (int64_t)v;
            if (moe_mul_size(numel, (size_t)v, &numel)) MOE_FAIL_FORMAT("%s: tensor '%s' is too large", path, t->name);
        }
        t->numel = numel;
        double a = cJSON_IsNumber(off->child) ? off->child->valuedouble : -1;
        double b = cJSON_IsNumber(off->child->next) ? off->child->next->valuedouble : -1;
        size_t bytes;
        if (moe_mul_size(numel, dtype_sizes[d], &bytes) || a < 0 || b < a || a != floor(a) ||
            b != floor(b) || b > (double)data_len || (size_t)(b - a) != bytes)
            MOE_FAIL_FORMAT("%s: tensor '%s' has data_offsets [%.0f, %.0f] that do not fit its shape or the "
                "file (%zu data bytes)", path, t->name, a, b, data_len);
        t->data = data + (size_t)a;
        t->nbytes = bytes;
        for (int j = 0; j < out->n_tensors; j++)
            if (!strcmp(out->tensors[j].name, t->name)) MOE_FAIL_FORMAT("%s: tensor '%s' appears twice", path, t->name);
        out->n_tensors++;
    }
    /* tensors must not overlap */
    order = malloc(sizeof *order * (size_t)(out->n_tensors + 1));
    if (!order) MOE_FAIL_FORMAT("%s: out of memory", path);
    for (int i = 0; i < out->n_tensors; i++) order[i] = &out->tensors[i];
    qsort(order, (size_t)out->n_tensors, sizeof *order, cmp_begin);
    for (int i = 1; i < out->n_tensors; i++)
        if (order[i - 1]->data + order[i - 1]->nbytes > order[i]->data)
            MOE_FAIL_FORMAT("%s: tensors '%s' and '%s' overlap", path, order[i - 1]->name, order[i]->name);
done:
    free(order);
    cJSON_Delete(root);
    close(fd);
    if (status != MOE_OK) moe_st_free(out);
    return status;
}

const moe_st_tensor *moe_st_find(const moe_safetensors *st, const char *name) {
    for (int i = 0; i < st->n_tensors; i++)
        if (!strcmp(st->tensors[i].name, name)) return &st->tensors[i];
    return NULL;
}

const char *moe_st_meta(const moe_safetensors *st, const char *key) {
    for (int i = 0; i < st->n_meta; i++)
        if (!strcmp(st->meta_keys[i], key)) return st->meta_values[i];
    return NULL;
}

float moe_f16_to_f32(uint16_t h) {
    int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
    float v = e == 0 ? ldexpf((float)m, -24) : e == 31 ? (m ? NAN : INFINITY)
                                                       : ldexpf((float)(m + 1024), e - 25);
    return s ? -v : v;
}

/* Element i of a float tensor as float32. */
static float element(const moe_st_tensor *t, size_t i) {
    uint16_t h;
    switch (t->dtype) {
    case MOE_DT_F64: {
        double v;
        memcpy(&v, t->data + 8 * i, 8);
        return (float)v;
    }
    case MOE_DT_F16: memcpy(&h, t->data + 2 * i, 2); return moe_f16_to_f32(h);
    case MOE_DT_BF16: {
        memcpy(&h, t->data + 2 * i, 2);
        uint32_t u = (uint32_t)h << 16;
        float v;
        memcpy(&v, &u, 4);
        return v;
    }
    default: { /* F32 (the callers refuse other types) */
        float v;
        memcpy(&v, t->data + 4 * i, 4);
        return v;
    }
    }
}

moe_status moe_st_get_f32(const moe_safetensors *st, const char *name, int ndim,
                          const int64_t *shape, float *out) {
    const moe_st_tensor *t = moe_st_find(st, name);
    if (!t) return moe_set_error(MOE_ERR_FORMAT, "tensor '%s' is missing", name);
    int same = t->ndim == ndim;
    for (int i = 0; same && i < ndim; i++) same = t->shape[i] == shape[i];
    if (!same) {
        char want[128] = "", got[128] = "";
        for (int i = 0; i < ndim; i++)
            snprintf(want + strlen(want), sizeof want - strlen(want), "%s%lld", i ? "," : "", (long long)shape[i]);
        for (int i = 0; i < t->ndim; i++)
            snprintf(got + strlen(got), sizeof got - strlen(got), "%s%lld", i ? "," : "", (long long)t->shape[i]);
        return moe_set_error(MOE_ERR_FORMAT, "tensor '%s' has shape [%s], expected [%s]", name, got, want);
    }
    if (t->dtype != MOE_DT_F32 && t->dtype != MOE_DT_F64 && t->dtype != MOE_DT_F16 &&
        t->dtype != MOE_DT_BF16)
        return moe_set_error(MOE_ERR_FORMAT, "tensor '%s' is not a float tensor", name);
    if (out) {
        for (size_t i = 0; i < t->numel; i++) out[i] = element(t, i);
        return MOE_OK;
    }
    /* checked only: every value a finite float too (a NaN in a checkpoint would spread) */
    for (size_t i = 0; i < t->numel; i++)
        if (!isfinite(element(t, i)))
            return moe_set_error(MOE_ERR_FORMAT, "tensor '%s' holds a non-finite value (%g at "
                                 "element %zu)", name, (double)element(t, i), i);
    return MOE_OK;
}

moe_status moe_st_write(const char *path, const moe_st_entry *e, int n,
                        const char *const *meta_keys, const char *const *meta_values, int n_meta) {
    cJSON *root = cJSON_CreateObject(), *meta = cJSON_CreateObject();
    moe_status status = MOE_OK;
    const void **parts = malloc(sizeof *parts * (size_t)(n + 2));
    size_t *sizes = malloc(sizeof *sizes * (size_t)(n + 2));
    char *json = NULL, *header = NULL;
    if (!root || !meta || !parts || !sizes) {
        status = moe_set_error(MOE_ERR_NOMEM, "out of memory writing %s", path);
        goto done;
    }
    for (int i = 0; i < n_meta; i++) cJSON_AddStringToObject(meta, meta_keys[i], meta_values[i]);
    cJSON_AddItemToObject(root, "__metadata__", meta);
    meta = NULL;
    size_t off = 0;
    for (int i = 0; i < n; i++) {
        size_t numel = 1;
        for (int d = 0; d < e[i].ndim; d++) numel *= (size_t)e[i].shape[d];
        size_t bytes = numel * dtype_sizes[e[i].dtype];
        cJSON *t = cJSON_CreateObject();
        cJSON_AddStringToObject(t, "dtype", dtype_names[e[i].dtype]);
        cJSON *sh = cJSON_AddArrayToObject(t, "shape");
        for (int d = 0; d < e[i].ndim; d++) cJSON_AddItemToArray(sh, cJSON_CreateNumber((double)e[i].shape[d]));
        cJSON *o = cJSON_AddArrayToObject(t, "data_offsets");
        cJSON_AddItemToArray(o, cJSON_CreateNumber((double)off));
        cJSON_AddItemToArray(o, cJSON_CreateNumber((double)(off + bytes)));
        cJSON_AddItemToObject(root, e[i].name, t);
        parts[i + 2] = e[i].data;
        sizes[i + 2] = bytes;
        off += bytes;
    }
    json = cJSON_PrintUnformatted(root);
    if (!json) {
        status = moe_set_error(MOE_ERR_NOMEM, "out of memory writing %s", path);
        goto done;
    }
    size_t jl = strlen(json), hl = (jl + 7) & ~(size_t)7; /* pad with spaces to 8 bytes */
    header = malloc(hl);
    if (!header) {
        status = moe_set_error(MOE_ERR_NOMEM, "out of memory writing %s", path);
        goto done;
    }
    memcpy(header, json, jl);
    memset(header + jl, ' ', hl - jl);
    uint64_t hl64 = hl;
    parts[0] = &hl64;
    sizes[0] = 8;
    parts[1] = header;
    sizes[1] = hl;
    status = moe_write_atomic(path, parts, sizes, n + 2);
done:
    cJSON_Delete(meta);
    cJSON_Delete(root);
    free(json);
    free(header);
    free(parts);
    free(sizes);
    return status;
}
