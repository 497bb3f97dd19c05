/* Checkpoints: save (atomic files, then the "latest" pointer, then pruning) and load. */
#define _POSIX_C_SOURCE 200809L
#include "core/core.h"
#include "io/data.h"
#include "io/safetensors.h"
#include "moe/mlp.h"
#include "train/trainer.h"

#include <cJSON.h>

#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* Each MoE layer's selection bias in the trainer file. */
#define OUR_EXPERT_BIAS "model.layers.%d.mlp.gate.expert_bias"

#define CKPT_PREFIX "step-"

/* Shard i (0-based) of n of a checkpoint's files: KIND.safetensors when n = 1, else
 * KIND-0000i-of-0000n.safetensors (Hugging Face's naming). */
static void shard_name(char *buf, size_t cap, const char *kind, int i, int n) {
    if (n == 1) snprintf(buf, cap, "%s.safetensors", kind);
    else snprintf(buf, cap, "%s-%05d-of-%05d.safetensors", kind, i + 1, n);
}

/* The shard of a tensor: a routed expert's is that of the rank holding it (expert-parallel
 * rank expert_id / El), everything else is in the first. */
static int tensor_shard(const moe_model_config *c, const moe_tensor_info *t, int l_experts) {
    int n = c->moe.ep_size;
    return t->expert_id >= 0 && n > 1 ? t->expert_id / (l_experts / n) : 0;
}

static int layer_of(const char *name) {
    const char *p = strstr(name, "layers.");
    return p ? atoi(p + 7) : -1;
}

/* Writes this rank's shard of the model and of the trainer state: the first rank of each
 * expert-data-parallel group writes its experts, world rank 0 also everything dense. */
static moe_status save_shard(const char *dir, moe_model *m, moe_trainer *t, const char *config,
                             int step, int shard, int n_shards, int with_dense) {
    const moe_model_config *c = moe_model_get_config(m);
    int n = moe_model_n_tensors(m);
    moe_st_entry *e = calloc((size_t)n, sizeof *e), *o = calloc(2 * (size_t)n + MOE_MAX_LAYERS, sizeof *o);
    char (*names)[128] = calloc(2 * (size_t)n + MOE_MAX_LAYERS, sizeof *names);
    moe_status st = MOE_OK;
    if (!e || !o || !names) st = moe_set_error(MOE_ERR_NOMEM, "out of memory saving %s", dir);
    const float *p = moe_model_params(m), *am = t ? moe_trainer_adam_m(t) : NULL,
                *av = t ? moe_trainer_adam_v(t) : NULL;
    int ne = 0, no = 0;
    for (int i = 0; i < n && st == MOE_OK; i++) {
        const moe_tensor_info *ti = moe_model_tensor(m, i);
        if (ti->expert ? 0 : !with_dense) continue;
        e[ne] = (moe_st_entry){ti->name, MOE_DT_F32, ti->ndim, {0}, p + ti->offset};
        memcpy(e[ne++].shape, ti->shape, sizeof(int64_t) * (size_t)ti->ndim);
        if (!t) continue;
        for (int k = 0; k < 2; k++) { /* Adam's moments under the parameter's name */
            snprintf(names[no], sizeof names[no], "optimizer.adam_%c.%s", k ? 'v' : 'm', ti->name);
            o[no] = (moe_st_entry){names[no], MOE_DT_F32, ti->ndim, {0}, (k ? av : am) + ti->offset};
            memcpy(o[no].shape, ti->shape, sizeof(int64_t) * (size_t)ti->ndim);
            no++;
        }
    }
    for (int l = 0; st == MOE_OK && t && with_dense && l < c->n_layers; l++) {
        moe_layer *ml = moe_model_moe_layer(m, l);
        if (!ml) continue;
        snprintf(names[no], sizeof names[no], OUR_EXPERT_BIAS, l);
        o[no] = (moe_st_entry){names[no], MOE_DT_F32, 1, {moe_model_layer_experts(c, l)},
                               moe_layer_expert_bias(ml)};
        no++;
    }
    char stepbuf[32], seed[32], streak[32], updates[32], path[4400], file[64];
    snprintf(stepbuf, sizeof stepbuf, "%d", step);
    if (st == MOE_OK) {
        shard_name(file, sizeof file, "model", shard, n_shards);
        snprintf(path, sizeof path, "%s/%s", dir, file);
        const char *keys[] = {"format", "moe.config", "moe.step", "moe.version"};
        const char *vals[] = {"pt", config, stepbuf, moe_version()};
        st = moe_st_write(path, e, ne, keys, vals, 4);
    }
    if (st == MOE_OK && t) {
        snprintf(seed, sizeof seed, "%llu", (unsigned long long)moe_trainer_config(t)->seed);
        snprintf(streak, sizeof streak, "%d", moe_trainer_bad_streak(t));
        snprintf(updates, sizeof updates, "%d", moe_trainer_updates(t));
        shard_name(file, sizeof file, "trainer", shard, n_shards);
        snprintf(path, sizeof path, "%s/%s", dir, file);
        const char *keys[] = {"moe.step", "moe.seed", "moe.bad_streak", "moe.updates"};
        const char *vals[] = {stepbuf, seed, streak, updates};
        st = moe_st_write(path, o, no, keys, vals, 4);
    }
    free(e);
    free(o);
    free(names);
    return st;
}

/* model.safetensors.index.json: every tensor of the whole model and its shard. */
static moe_status write_index(const char *dir, const moe_model_config *c, int n_shards) {
    moe_tensor_info *all;
    int n;
    MOE_TRY(moe_model_full_tensors(c, &all, &n));
    size_t cap = 256 + (size_t)n * 200, len = 0, total = 0;
    char *buf = malloc(cap), file[64];
    if (!buf) {
        free(all);
        return moe_set_error(MOE_ERR_NOMEM, "out of memory for the checkpoint index");
    }
    for (int i = 0; i < n; i++) total += all[i].numel * sizeof(float);
    len += (size_t)snprintf(buf + len, cap - len, "{\n  \"metadata\": {\"total_size\": %zu},\n  "
                            "\"weight_map\": {\n", total);
    for (int i = 0; i < n; i++) {
        int l = layer_of(all[i].name);
        shard_name(file, sizeof file, "model",
                   tensor_shard(c, &all[i], l >= 0 ? moe_model_layer_experts(c, l) : 1), n_shards);
        len += (size_t)snprintf(buf + len, cap - len, "    \"%s\": \"%s\"%s\n", all[i].name, file,
                                i + 1 < n ? "," : "");
    }
    len += (size_t)snprintf(buf + len, cap - len, "  }\n}\n");
    char path[4400];
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    const void *parts[] = {buf};
    moe_status st = moe_write_atomic(path, parts, &len, 1);
    free(buf);
    free(all);
    return st;
}

/* The step of a checkpoint directory's name, -1 unless it is exactly the name a save gives
 * (CKPT_PREFIX and the step in at least 8 digits, no sign, no spaces). */
static int ckpt_step(const char *name) {
    if (strncmp(name, CKPT_PREFIX, strlen(CKPT_PREFIX))) return -1;
    const char *digits = name + strlen(CKPT_PREFIX);
    char *end, canon[64];
    if (*digits < '0' || *digits > '9') return -1;
    long v = strtol(digits, &end, 10);
    if (*end || v > INT_MAX) return -1;
    snprintf(canon, sizeof canon, CKPT_PREFIX "%08ld", v);
    return strcmp(canon, name) ? -1 : (int)v;
}

static void remove_ckpt(const char *dir) { /* dir: at most 4200 bytes */
    DIR *d = opendir(dir);
    struct dirent *e;
    char path[4600];
    while (d && (e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        unlink(path);
    }
    if (d) closedir(d);
    rmdir(dir);
}

/* Removes all but the newest keep checkpoints up to step newest, the one "latest" names. Those
 * of later steps are left alone: another line of the run (resumed from an earlier checkpoint)
 * or a save that stopped before it was named latest. */
static void prune(const char *save_dir, int keep, int newest) {
    if (strlen(save_dir) > 4000) return;
    DIR *d = opendir(save_dir);
    if (!d) return;
    int steps[4096], n = 0;
    struct dirent *e;
    while ((e = readdir(d)) && n < 4096) {
        int s = ckpt_step(e->d_name);
        if (s >= 0 && s < newest) steps[n++] = s;
    }
    closedir(d);
    /* keep-1 others besides the newest: drop the smallest steps */
    for (int kept = 0; n > 0;) {
        int hi = 0;
        for (int i = 1; i < n; i++) hi = steps[i] > steps[hi] ? i : hi;
        int s = steps[hi];
        steps[hi] = steps[--n];
        if (++kept < keep) continue;
        char path[4100];
        snprintf(path, sizeof path, "%s/" CKPT_PREFIX "%08d", save_dir, s);
        remove_ckpt(path);
    }
}

/* Checkpoint files in dir that a save of n_shards did not write (a save into this directory by
 * another expert-parallel layout): removed once the new ones are complete and named latest,
 * so that a loader never takes an old index or shard for the new checkpoint. */
static void remove_stale(const char *dir, int n_shards) {
    DIR *d = opendir(dir);
    struct dirent *e;
    char path[4600], file[64];
    while (d && (e = readdir(d))) {
        const char *f = e->d_name;
        if (strncmp(f, "model", 5) && strncmp(f, "trainer", 7)) continue;
        if (!strstr(f, ".safetensors")) continue;
        int ours = n_shards > 1 && !strcmp(f, "model.safetensors.index.json");
        for (int i = 0; i < n_shards && !ours; i++)
            for (int k = 0; k < 2 && !ours; k++) {
                shard_name(file, sizeof file, k ? "trainer" : "model", i, n_shards);
                ours = !strcmp(f, file);
            }
        if (ours) continue;
        snprintf(path, sizeof path, "%s/%s", dir, f);
        unlink(path);
    }
    if (d) closedir(d);
}

moe_status moe_checkpoint_save(const char *save_dir, int keep_last, const char *config,
                               moe_model *m, moe_trainer *t) {
    int step = moe_trainer_steps_done(t);
    moe_dist *d = moe_trainer_dist(t);
    int n_shards = moe_model_get_config(m)->moe.ep_size, rank = d ? d->world_rank : 0;
    int writer = !d || d->edp_rank == 0; /* one replica of each expert writes it */
    char dir[4200], path[4300];
    snprintf(dir, sizeof dir, "%s/" CKPT_PREFIX "%08d", save_dir, step);
    struct stat sb;
    int fresh = stat(dir, &sb) != 0; /* a failed save removes the directory it made */
    moe_status st = moe_mkdirs(dir);
    if (st == MOE_OK && writer)
        st = save_shard(dir, m, t, config, step, d ? d->ep_rank : 0, n_shards, rank == 0);
    if (d && moe_dist_any(d, st != MOE_OK) && st == MOE_OK) /* every rank fails together */
        st = moe_set_error(MOE_ERR_IO, "another rank failed to save %s", dir);
    if (st != MOE_OK && fresh) remove_ckpt(dir);
    MOE_TRY(st);
    if (rank == 0) {
        if (n_shards > 1) st = write_index(dir, moe_model_get_config(m), n_shards);
        char latest[64];
        int len = snprintf(latest, sizeof latest, CKPT_PREFIX "%08d\n", step);
        snprintf(path, sizeof path, "%s/latest", save_dir);
        const void *parts[] = {latest};
        size_t sizes[] = {(size_t)len};
        if (st == MOE_OK) st = moe_write_atomic(path, parts, sizes, 1);
        if (st == MOE_OK && !fresh) remove_stale(dir, n_shards);
        if (st == MOE_OK) prune(save_dir, keep_last, step);
    }
    if (d && moe_dist_any(d, st != MOE_OK))
        return st != MOE_OK ? st : moe_set_error(MOE_ERR_IO, "rank 0 failed to save %s", dir);
    return st;
}

int moe_checkpoint_run_dir(const char *ckpt, char *out, size_t cap) {
    char path[4200];
    snprintf(path, sizeof path, "%s", ckpt);
    for (size_t n = strlen(path); n > 1 && path[n - 1] == '/';) path[--n] = '\0'; /* "step-N/" */
    const char *slash = strrchr(path, '/'), *base = slash ? slash + 1 : path;
    if (ckpt_step(base) < 0) return -1;
    if (!slash) snprintf(out, cap, ".");
    else snprintf(out, cap, "%.*s", slash == path ? 1 : (int)(slash - path), path);
    return 0;
}

int moe_checkpoint_newest_step(const char *dir) {
    DIR *d = opendir(dir);
    struct dirent *e;
    int newest = -1;
    char path[4400];
    while (d && (e = readdir(d))) {
        int step = ckpt_step(e->d_name);
        /* whole: the index of shards (written after them), or both files (the model's first) */
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        int whole = step >= 0 && (moe_file_exists(path, "model.safetensors.index.json") ||
                                  (moe_file_exists(path, "model.safetensors") &&
                                   moe_file_exists(path, "trainer.safetensors")));
        newest = whole && step > newest ? step : newest;
    }
    if (d) closedir(d);
    return newest;
}

const char *moe_checkpoint_run_marker(const char *dir) {
    if (moe_file_exists(dir, "latest")) return "a 'latest' file";
    if (moe_file_exists(dir, "metrics.jsonl")) return "metrics.jsonl";
    DIR *d = opendir(dir);
    struct dirent *e;
    const char *found = NULL;
    while (d && !found && (e = readdir(d))) {
        size_t n = strlen(e->d_name);
        if (ckpt_step(e->d_name) >= 0) found = "step-N checkpoint directories";
        else if (!strncmp(e->d_name, "trainer", 7) && n >= 19 &&
                 !strcmp(e->d_name + n - 12, ".safetensors"))
            found = "a checkpoint's trainer state";
    }
    if (d) closedir(d);
    return found;
}

moe_status moe_checkpoint_resolve(const char *dir, char *ckpt, size_t cap) {
    char path[4200], name[128] = "";
    int model = moe_file_exists(dir, "model.safetensors") ||
                moe_file_exists(dir, "model.safetensors.index.json");
    int hf = moe_file_exists(dir, "config.json");
    snprintf(path, sizeof path, "%s/latest", dir);
    FILE *f = fopen(path, "r");
    int run = f != NULL, ok = f && fgets(name, sizeof name, f) != NULL;
    if (f) fclose(f);
    name[strcspn(name, "\r\n")] = '\0';
    ok = ok && ckpt_step(name) >= 0;
    /* a checkpoint has no config.json, a run directory no model of its own: with both, which
     * one --load means is not ours to guess */
    if (model && run)
        return moe_set_error(MOE_ERR_INVALID, "%s holds both a moe run ('latest') and a model "
                             "(%s, as moe convert --to hf writes it): give the run's checkpoint "
                             "as --load %s/%s, the model as --model %s, or move the model into "
                             "a directory of its own", dir, hf ? "config.json" :
                             "model.safetensors", dir, ok ? name : "step-N", dir);
    if (model && hf)
        return moe_set_error(MOE_ERR_INVALID, "%s is a Hugging Face model directory "
                             "(config.json), not a moe checkpoint: give it with --model (moe "
                             "train: --init-from)", dir);
    if (model) {
        snprintf(ckpt, cap, "%s", dir);
        return MOE_OK;
    }
    if (!run)
        return moe_set_error(MOE_ERR_IO, "%s is not a checkpoint: it has neither model.safetensors "
                             "(or its index) nor a 'latest' file", dir);
    if (!ok) return moe_set_error(MOE_ERR_FORMAT, "%s: 'latest' does not name a checkpoint", dir);
    snprintf(ckpt, cap, "%s/%s", dir, name);
    return MOE_OK;
}

/* The files of a checkpoint, read as their tensors are asked for: one model.safetensors and
 * one trainer.safetensors, or shards named by model.safetensors.index.json (trainer shards
 * mirror the model shards). Tensors are found by name, so any expert-parallel layout loads
 * any other's checkpoint. */
typedef struct {
    char file[80];
    moe_safetensors st;
} ckpt_shard;

typedef struct {
    const char *dir;
    cJSON *index, *map;
    int n, cap;
    ckpt_shard **shards; /* the files opened so far (one per expert-parallel rank at most) */
} ckpt_reader;

static void reader_close(ckpt_reader *r) {
    for (int i = 0; i < r->n; i++) moe_st_free(&r->shards[i]->st), free(r->shards[i]);
    free(r->shards);
    cJSON_Delete(r->index);
    memset(r, 0, sizeof *r);
}

static moe_status reader_open(ckpt_reader *r, const char *dir) {
    memset(r, 0, sizeof *r);
    r->dir = dir;
    if (!moe_file_exists(dir, "model.safetensors.index.json")) return MOE_OK;
    char path[4400];
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    char *text;
    size_t size;
    MOE_TRY(moe_read_file(path, &text, &size));
    r->index = cJSON_ParseWithLength(text, size);
    free(text);
    r->map = cJSON_GetObjectItemCaseSensitive(r->index, "weight_map");
    if (!cJSON_IsObject(r->map)) {
        reader_close(r);
        return moe_set_error(MOE_ERR_FORMAT, "%s: no weight_map object", path);
    }
    return MOE_OK;
}

/* The file (kind "model" or "trainer") holding parameter `param`. */
static moe_status reader_file(ckpt_reader *r, const char *kind, const char *param,
                              moe_safetensors **out) {
    char file[80];
    if (r->map) {
        cJSON *v = cJSON_GetObjectItemCaseSensitive(r->map, param);
        if (!cJSON_IsString(v) || strncmp(v->valuestring, "model", 5) ||
            strlen(v->valuestring) >= 64 || strchr(v->valuestring, '/'))
            return moe_set_error(MOE_ERR_FORMAT, "%s: the index names no valid file for '%s'",
                                 r->dir, param);
        snprintf(file, sizeof file, "%s%s", kind, v->valuestring + 5);
    } else {
        snprintf(file, sizeof file, "%s.safetensors", kind);
    }
    for (int i = 0; i < r->n; i++)
        if (!strcmp(r->shards[i]->file, file)) {
            *out = &r->shards[i]->st;
            return MOE_OK;
        }
    if (r->n == r->cap) {
        int cap = r->cap ? 2 * r->cap : 8;
        ckpt_shard **p = realloc(r->shards, sizeof *p * (size_t)cap);
        if (!p) return moe_set_error(MOE_ERR_NOMEM, "out of memory for %d shards", cap);
        r->shards = p, r->cap = cap;
    }
    ckpt_shard *sh = calloc(1, sizeof *sh);
    if (!sh) return moe_set_error(MOE_ERR_NOMEM, "out of memory for a shard");
    char path[4400];
    snprintf(path, sizeof path, "%s/%s", r->dir, file);
    moe_status st = moe_st_read(path, &sh->st);
    if (st != MOE_OK) {
        free(sh);
        return st;
    }
    snprintf(sh->file, sizeof sh->file, "%s", file);
    r->shards[r->n++] = sh;
    *out = &sh->st;
    return MOE_OK;
}

/* Tensor `name` (stored with parameter `param`) into out, its shape checked. */
static moe_status reader_get(ckpt_reader *r, const char *kind, const char *param, const char *name,
                             int ndim, const int64_t *shape, float *out) {
    moe_safetensors *st;
    MOE_TRY(reader_file(r, kind, param, &st));
    moe_status s = moe_st_get_f32(st, name, ndim, shape, out);
    if (s != MOE_OK && s != MOE_ERR_NOMEM) {
        char msg[600];
        snprintf(msg, sizeof msg, "%s", moe_last_error());
        s = moe_set_error(s, "%s: %s", r->dir, msg);
    }
    return s;
}

/* Every checkpoint has the token embedding: its file carries the metadata. */
#define FIRST_TENSOR "model.embed_tokens.weight"

moe_status moe_checkpoint_config(const char *ckpt, char **config) {
    ckpt_reader r;
    moe_safetensors *st;
    moe_status s = reader_open(&r, ckpt);
    if (s == MOE_OK) s = reader_file(&r, "model", FIRST_TENSOR, &st);
    const char *c = s == MOE_OK ? moe_st_meta(st, "moe.config") : NULL;
    *config = c ? strdup(c) : NULL;
    reader_close(&r);
    MOE_TRY(s);
    if (!*config) return moe_set_error(MOE_ERR_FORMAT, "%s has no moe.config metadata", ckpt);
    return MOE_OK;
}

/* Every MoE layer's selection bias from the tensors named fmt % layer in the kind ("model" or
 * "trainer") files: all read before any is set. Ours are trainer state, DeepSeek-V3's
 * (e_score_correction_bias) model tensors; either way part of the routing. */
static moe_status load_expert_bias(ckpt_reader *r, const char *kind, const char *fmt,
                                   moe_model *m) {
    const moe_model_config *c = moe_model_get_config(m);
    moe_status s = MOE_OK;
    size_t total = 1, at = 0;
    for (int l = 0; l < c->n_layers; l++)
        if (moe_model_moe_layer(m, l)) total += (size_t)moe_model_layer_experts(c, l);
    float *tmp = moe_alloc(total, sizeof(float));
    if (!tmp) s = moe_set_error(MOE_ERR_NOMEM, "out of memory");
    char name[160];
    for (int l = 0; l < c->n_layers && s == MOE_OK; l++) {
        if (!moe_model_moe_layer(m, l)) continue;
        int64_t E = moe_model_layer_experts(c, l);
        snprintf(name, sizeof name, fmt, l);
        /* a trainer file is found by the first tensor's, a model tensor by its own name; the
         * check pass first (finite values) */
        const char *param = strcmp(kind, "trainer") ? name : FIRST_TENSOR;
        s = reader_get(r, kind, param, name, 1, &E, NULL);
        if (s == MOE_OK) s = reader_get(r, kind, param, name, 1, &E, tmp + at);
        at += (size_t)E;
    }
    at = 0;
    for (int l = 0; l < c->n_layers && s == MOE_OK; l++) {
        moe_layer *ml = moe_model_moe_layer(m, l);
        if (!ml) continue;
        size_t E = (size_t)moe_model_layer_experts(c, l);
        memcpy(moe_layer_expert_bias(ml), tmp + at, sizeof(float) * E);
        at += E;
    }
    moe_free(tmp);
    return s;
}

/* A count in a metadata value, -1 when absent or not one. */
static int meta_count(const char *value) {
    char *end = NULL;
    long v = value ? strtol(value, &end, 10) : -1;
    return !value || !*value || *end || v < 0 || v > 1000000000 ? -1 : (int)v;
}

static moe_status load_progress(ckpt_reader *r, moe_trainer *t, int adam);

static moe_status load_trainer(ckpt_reader *r, moe_model *m, moe_trainer *t, unsigned flags) {
    float *am = moe_trainer_adam_m(t), *av = moe_trainer_adam_v(t);
    moe_status s = MOE_OK;
    char name[160];
    int adam = !(flags & MOE_CKPT_NEW_ADAM);
    for (int i = 0; adam && i < moe_model_n_tensors(m) && s == MOE_OK; i++) {
        const moe_tensor_info *ti = moe_model_tensor(m, i);
        snprintf(name, sizeof name, "optimizer.adam_m.%s", ti->name);
        s = reader_get(r, "trainer", ti->name, name, ti->ndim, ti->shape, am + ti->offset);
        snprintf(name, sizeof name, "optimizer.adam_v.%s", ti->name);
        if (s == MOE_OK) s = reader_get(r, "trainer", ti->name, name, ti->ndim, ti->shape, av + ti->offset);
        /* finite moments, the second not negative: else the first update spreads NaN */
        for (size_t j = 0; s == MOE_OK && j < ti->numel; j++) {
            float m = am[ti->offset + j], v = av[ti->offset + j];
            if (!isfinite(m) || !isfinite(v) || v < 0)
                s = moe_set_error(MOE_ERR_FORMAT, "%s: optimizer.adam_%c.%s holds a value no "
                                  "Adam moment has (element %zu: %g; --no-load-optim starts "
                                  "Adam over)", r->dir, isfinite(m) ? 'v' : 'm', ti->name, j,
                                  isfinite(m) ? v : m);
        }
    }
    if (s == MOE_OK) s = load_expert_bias(r, "trainer", OUR_EXPERT_BIAS, m);
    return s == MOE_OK ? load_progress(r, t, adam) : s;
}

/* The trainer's step, bad streak and count of updates; Adam over unless adam (its moments
 * read). */
static moe_status load_progress(ckpt_reader *r, moe_trainer *t, int adam) {
    moe_safetensors *st, *model;
    MOE_TRY(reader_file(r, "trainer", FIRST_TENSOR, &st));
    MOE_TRY(reader_file(r, "model", FIRST_TENSOR, &model));
    const char *step = moe_st_meta(st, "moe.step"), *mstep = moe_st_meta(model, "moe.step");
    const char *bad = moe_st_meta(st, "moe.bad_streak"); /* absent before 2026-11-30 */
    const char *upd = moe_st_meta(st, "moe.updates");    /* absent before 2026-12-01: = step */
    int v = meta_count(step), streak = bad ? meta_count(bad) : 0;
    int updates = upd ? meta_count(upd) : v;
    if (v < 0) return moe_set_error(MOE_ERR_FORMAT, "%s: missing or bad moe.step", r->dir);
    if (streak < 0) return moe_set_error(MOE_ERR_FORMAT, "%s: bad moe.bad_streak", r->dir);
    /* the files are replaced one after the other: a save into this directory that stopped
     * between them leaves a model and a trainer state of different steps */
    if (!mstep || strcmp(mstep, step))
        return moe_set_error(MOE_ERR_FORMAT, "%s: the model file is of step %s and the trainer "
                             "file of step %s (a save interrupted?)", r->dir,
                             mstep ? mstep : "(none)", step);
    if (updates < 0 || updates > v)
        return moe_set_error(MOE_ERR_FORMAT, "%s: bad moe.updates", r->dir);
    moe_trainer_set_step(t, v);
    moe_trainer_set_bad_streak(t, streak);
    moe_trainer_set_updates(t, updates);
    if (!adam) moe_trainer_reset_optimizer(t);
    return MOE_OK;
}

/* Parameters go to a copy first so that a failure leaves the model unchanged. */
/* Every tensor is found and checked (files, names, shapes, types) before any is read, so that
 * a failure leaves the model unchanged without a second copy of the parameters. */
static moe_status load_params(ckpt_reader *r, moe_model *m, rename_fn rename, const void *ctx) {
    moe_status s = MOE_OK;
    float *p = NULL;
    for (int pass = 0; pass < 2 && s == MOE_OK; pass++) {
        if (pass) p = moe_model_params(m);
        for (int i = 0; i < moe_model_n_tensors(m) && s == MOE_OK; i++) {
            const moe_tensor_info *ti = moe_model_tensor(m, i);
            char name[160];
            if (rename) rename(ti->name, name, sizeof name, ctx);
            else snprintf(name, sizeof name, "%s", ti->name);
            s = reader_get(r, "model", name, name, ti->ndim, ti->shape, p ? p + ti->offset : NULL);
        }
    }
    return s;
}

moe_status moe_checkpoint_load_expert_bias(const char *dir, moe_model *m, const char *fmt) {
    ckpt_reader r;
    MOE_TRY(reader_open(&r, dir));
    moe_status s = load_expert_bias(&r, "model", fmt, m);
    reader_close(&r);
    return s;
}

static int cmp_name(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Every tensor of the checkpoint's model files is one of the model's (the whole model's, every
 * expert; names through rename, unless skip says the tensor is not one to load): flags given on
 * top of --load that shrink the model (fewer layers, tied embeddings) would otherwise leave
 * some of the checkpoint unread without a word, and a Hugging Face model a tensor that our
 * model of its family does not have. *extra: the first other tensor's name (in r), or NULL. */
static moe_status find_unused(ckpt_reader *r, const moe_model *m, rename_fn rename,
                              int (*skip)(const char *name, const void *ctx), const void *ctx,
                              const char **extra) {
    enum { CAP = 160 };
    moe_tensor_info *all;
    int n;
    *extra = NULL;
    MOE_TRY(moe_model_full_tensors(moe_model_get_config(m), &all, &n));
    const char **names = malloc(sizeof *names * (size_t)(n > 0 ? n : 1));
    char *renamed = rename ? malloc((size_t)CAP * (size_t)(n > 0 ? n : 1)) : NULL;
    moe_safetensors *st = NULL;
    moe_status s = names && (renamed || !rename) ? MOE_OK
                                                 : moe_set_error(MOE_ERR_NOMEM, "out of memory");
    if (s == MOE_OK && !r->map) s = reader_file(r, "model", FIRST_TENSOR, &st);
    if (s == MOE_OK) {
        for (int i = 0; i < n; i++) {
            names[i] = rename ? renamed + (size_t)i * CAP : all[i].name;
            if (rename) rename(all[i].name, renamed + (size_t)i * CAP, CAP, ctx);
        }
        qsort(names, (size_t)n, sizeof *names, cmp_name);
        const cJSON *e = r->map ? r->map->child : NULL;
        for (int i = 0; !*extra && (r->map ? e != NULL : i < st->n_tensors); i++) {
            const char *name = r->map ? e->string : st->tensors[i].name;
            if (!bsearch(&name, names, (size_t)n, sizeof *names, cmp_name) &&
                !(skip && skip(name, ctx)))
                *extra = name;
            if (e) e = e->next;
        }
    }
    free(names);
    free(renamed);
    free(all);
    return s;
}

/* Opens dir's reader (r->dir: dir) and refuses it, closed, when its model files hold a tensor
 * that m does not read (find_unused): "DIR holds NAME, which " then why. */
static moe_status open_all_read(ckpt_reader *r, const char *dir, const moe_model *m,
                                rename_fn rename, int (*skip)(const char *name, const void *ctx),
                                const void *ctx, const char *why) {
    const char *extra;
    MOE_TRY(reader_open(r, dir));
    moe_status s = find_unused(r, m, rename, skip, ctx, &extra);
    if (s == MOE_OK && extra)
        s = moe_set_error(MOE_ERR_FORMAT, "%s holds %s, which %s", dir, extra, why);
    if (s != MOE_OK) reader_close(r);
    return s;
}

moe_status moe_checkpoint_load_params(const char *dir, moe_model *m, rename_fn rename,
                                      int (*skip)(const char *name, const void *ctx),
                                      const void *ctx) {
    ckpt_reader r;
    MOE_TRY(open_all_read(&r, dir, m, rename, skip, ctx, "the model (its config.json, with the "
                          "options given) does not have: without it, another model would be "
                          "computed"));
    moe_status s = load_params(&r, m, rename, ctx);
    reader_close(&r);
    return s;
}

moe_status moe_checkpoint_load(const char *ckpt, moe_model *m, moe_trainer *t, unsigned flags) {
    ckpt_reader r;
    MOE_TRY(open_all_read(&r, ckpt, m, NULL, NULL, NULL, "this model does not have: the flags "
                          "given with --load change the model's shape"));
    moe_status s = load_params(&r, m, NULL, NULL);
    /* without the trainer, the selection biases still route (inference, conversion) */
    const moe_layer_config *lc = &moe_model_get_config(m)->moe;
    if (s == MOE_OK && !t && (lc->enable_expert_bias || lc->quantile_balancing)) {
        s = load_expert_bias(&r, "trainer", OUR_EXPERT_BIAS, m);
        if (s != MOE_OK) {
            char why[512];
            snprintf(why, sizeof why, "%s", moe_last_error());
            s = moe_set_error(s, "%s (this model routes with selection biases, which a checkpoint "
                              "keeps in trainer.safetensors)", why);
        }
    }
    if (s == MOE_OK && t) s = load_trainer(&r, m, t, flags);
    reader_close(&r);
    return s;
}

/* ---- Upcycling (Megatron's --moe-use-upcycling, arXiv 2410.07524) ----
 * A dense MLP of width F becomes E experts of width f: G = F / f slices (gate_proj and up_proj
 * rows, down_proj columns), expert e taking slice e % G, each scaled by s^(1/3) (gated
 * activations, relu2) or s^(1/2), s = E G / k with the softmax before the top k, else G. The
 * router keeps its initial rows r < E / G, row r for the G experts rG .. rG + G - 1, which then
 * score alike and together hold the whole MLP: with k a multiple of G and the softmax after the
 * top k, the layer starts as the dense MLP (exactly for G = 1, or with relu2). */

/* A dense MLP tensor of a layer that m has as an MoE layer: the experts are made of it. */
static int dense_mlp_of_moe(const char *name, const void *ctx) {
    const moe_model_config *c = moe_model_get_config(ctx);
    int l, n = 0;
    char proj[8];
    if (sscanf(name, "model.layers.%d.mlp.%7[a-z]_proj.weight%n", &l, proj, &n) != 2 || name[n])
        return 0;
    if (!strcmp(proj, "gate") && !moe_act_gated(c->moe.act)) return 0; /* the experts have none */
    return l >= 0 && l < c->n_layers && moe_model_layer_experts(c, l) > 0;
}

/* The dense MLP tensor `proj` of layer l: its file, its entry and G; checked against the
 * expert tensor ti (gate and up [f, d], down [d, f]). */
static moe_status dense_slices(ckpt_reader *r, const moe_model_config *c, int l, const char *proj,
                               const moe_tensor_info *ti, moe_safetensors **st,
                               const moe_st_tensor **t, int64_t *G) {
    char name[96];
    snprintf(name, sizeof name, "model.layers.%d.mlp.%s_proj.weight", l, proj);
    int down = !strcmp(proj, "down");
    *t = NULL;
    if (!r->map || cJSON_GetObjectItemCaseSensitive(r->map, name)) {
        MOE_TRY(reader_file(r, "model", name, st));
        *t = moe_st_find(*st, name);
    }
    if (!*t)
        return moe_set_error(MOE_ERR_FORMAT, "%s has no %s: upcycling makes the experts of layer "
                             "%d from that layer's dense MLP", r->dir, name, l);
    int64_t f = ti->shape[down], d = ti->shape[!down];
    int64_t F = (*t)->ndim == 2 && (*t)->shape[!down] == d ? (*t)->shape[down] : 0;
    if (F < f || F % f)
        return moe_set_error(MOE_ERR_FORMAT, "%s: %s is not a dense MLP of hidden size %lld and a "
                             "width that moe-ffn-hidden-size (%lld) divides", r->dir, name,
                             (long long)d, (long long)f);
    *G = F / f;
    if (moe_model_layer_experts(c, l) % *G)
        return moe_set_error(MOE_ERR_INVALID, "upcycling layer %d: num-experts (%d) must be a "
                             "multiple of its dense width over moe-ffn-hidden-size (%lld / %lld)",
                             l, moe_model_layer_experts(c, l), (long long)F, (long long)f);
    return MOE_OK;
}

/* The dense gate, up and down tensors last read: a layer's experts all slice the same ones. */
typedef struct {
    const moe_st_tensor *t[3]; /* the tensor each buf holds */
    float *buf[3];
    size_t cap[3];
} dense_cache;

/* Expert e's tensor ti (projection proj of MoE layer l) into dst: its slice of the dense one,
 * read whole into the cache once. */
static moe_status upcycle_expert(ckpt_reader *r, const moe_model_config *c, int l, int e,
                                 const char *proj, const moe_tensor_info *ti, float *dst,
                                 dense_cache *cache) {
    moe_safetensors *st = NULL;
    const moe_st_tensor *t;
    int64_t G;
    MOE_TRY(dense_slices(r, c, l, proj, ti, &st, &t, &G));
    int down = !strcmp(proj, "down"), k = down ? 2 : !strcmp(proj, "up");
    if (cache->t[k] != t) {
        if (t->numel > cache->cap[k]) {
            float *p = realloc(cache->buf[k], sizeof(float) * t->numel);
            if (!p) return moe_set_error(MOE_ERR_NOMEM, "out of memory for %s", t->name);
            cache->buf[k] = p, cache->cap[k] = t->numel;
        }
        cache->t[k] = NULL;
        MOE_TRY(moe_st_get_f32(st, t->name, 2, t->shape, cache->buf[k]));
        cache->t[k] = t;
    }
    const float *buf = cache->buf[k];
    const moe_layer_config *lc = &c->moe;
    int cube = moe_act_gated(lc->act) || lc->act == MOE_ACT_RELU2; /* degree 3 in the weights */
    double grow = lc->pre_softmax ? (double)moe_model_layer_experts(c, l) * (double)G / lc->topk
                               : (double)G;
    float scale = (float)pow(grow, cube ? 1.0 / 3 : 0.5);
    /* gate, up: rows [at, at + f) of [F, d]; down: columns [at, at + f) of [d, F] */
    int64_t rows = ti->shape[0], cols = ti->shape[1], at = (e % G) * ti->shape[down];
    for (int64_t i = 0; i < rows; i++)
        for (int64_t j = 0; j < cols; j++)
            dst[i * cols + j] = scale * (down ? buf[i * t->shape[1] + at + j]
                                              : buf[(at + i) * cols + j]);
    return MOE_OK;
}

moe_status moe_checkpoint_upcycle(const char *ckpt, moe_model *m, moe_trainer *t) {
    const moe_model_config *c = moe_model_get_config(m);
    const moe_layer_config *lc = &c->moe;
    if (lc->shared_ffn || lc->residual || lc->cosine_dim || lc->expert_bias)
        return moe_set_error(MOE_ERR_INVALID, "upcycling makes experts and routers alone: not %s",
                             lc->shared_ffn ? "a shared expert" : lc->residual ? "Residual-MoE"
                             : lc->cosine_dim ? "the cosine router" : "biases in the experts");
    ckpt_reader r;
    MOE_TRY(open_all_read(&r, ckpt, m, NULL, dense_mlp_of_moe, m, "the upcycled model does not "
                          "have (upcycling reads a dense checkpoint's tensors of the same names, "
                          "and the dense MLPs of the layers that become MoE layers)"));
    moe_status s = MOE_OK;
    float *p = moe_model_params(m);
    dense_cache cache = {{NULL}, {NULL}, {0}};
    for (int i = 0; s == MOE_OK && i < moe_model_n_tensors(m); i++) {
        const moe_tensor_info *ti = moe_model_tensor(m, i);
        float *dst = p + ti->offset;
        int l, n = 0;
        long long e;
        char proj[8];
        if (sscanf(ti->name, "model.layers.%d.mlp.experts.%lld.%7[a-z]_proj.weight%n", &l, &e,
                   proj, &n) == 3 && !ti->name[n]) {
            s = upcycle_expert(&r, c, l, (int)e, proj, ti, dst, &cache);
        } else if (sscanf(ti->name, "model.layers.%d.mlp.gate.weight%n", &l, &n) == 1 &&
                   !ti->name[n]) { /* row r of the initial ones for experts rG .. rG + G - 1 */
            moe_safetensors *st = NULL;
            const moe_st_tensor *t;
            int64_t G, D = ti->shape[1];
            moe_tensor_info down = {.ndim = 2, .shape = {D, lc->ffn}};
            s = dense_slices(&r, c, l, "down", &down, &st, &t, &G);
            for (int64_t row = ti->shape[0] - 1; s == MOE_OK && row >= 0; row--)
                memmove(dst + row * D, dst + row / G * D, sizeof(float) * (size_t)D);
        } else {
            s = reader_get(&r, "model", ti->name, ti->name, ti->ndim, ti->shape, dst);
        }
    }
    if (s == MOE_OK && t) s = load_progress(&r, t, 0);
    for (int k = 0; k < 3; k++) free(cache.buf[k]);
    reader_close(&r);
    return s;
}
