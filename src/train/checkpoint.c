/* Checkpoints: save (atomic files, then the "latest" pointer, then pruning) and load. */
#define _POSIX_C_SOURCE 200809L
#include "core/core.h"
#include "io/data.h"
#include "io/safetensors.h"
#include "train/trainer.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define CKPT_PREFIX "step-"

static moe_status save_model(const char *path, moe_model *m, const char *config, int step) {
    int n = moe_model_n_tensors(m);
    moe_st_entry *e = calloc((size_t)n, sizeof *e);
    if (!e) return moe_set_error(MOE_ERR_NOMEM, "out of memory saving %s", path);
    const float *p = moe_model_params(m);
    for (int i = 0; i < n; i++) {
        const moe_tensor_info *t = moe_model_tensor(m, i);
        e[i].name = t->name;
        e[i].dtype = MOE_DT_F32;
        e[i].ndim = t->ndim;
        memcpy(e[i].shape, t->shape, sizeof(int64_t) * (size_t)t->ndim);
        e[i].data = p + t->offset;
    }
    char stepbuf[32];
    snprintf(stepbuf, sizeof stepbuf, "%d", step);
    const char *keys[] = {"format", "moe.config", "moe.step", "moe.version"};
    const char *vals[] = {"pt", config, stepbuf, moe_version()};
    moe_status st = moe_st_write(path, e, n, keys, vals, 4);
    free(e);
    return st;
}

static moe_status save_trainer(const char *path, moe_model *m, moe_trainer *t) {
    const moe_model_config *c = moe_model_get_config(m);
    moe_st_entry e[2 + MOE_MAX_LAYERS];
    char names[MOE_MAX_LAYERS][48];
    int n = 0;
    int64_t np = (int64_t)moe_model_param_count(m);
    e[n++] = (moe_st_entry){"optimizer.adam_m", MOE_DT_F32, 1, {np}, moe_trainer_adam_m(t)};
    e[n++] = (moe_st_entry){"optimizer.adam_v", MOE_DT_F32, 1, {np}, moe_trainer_adam_v(t)};
    for (int l = 0; l < c->n_layers; l++) {
        moe_layer *ml = moe_model_moe_layer(m, l);
        if (!ml) continue;
        snprintf(names[l], sizeof names[l], "model.layers.%d.mlp.gate.expert_bias", l);
        e[n++] = (moe_st_entry){names[l], MOE_DT_F32, 1, {moe_model_layer_experts(c, l)},
                                moe_layer_expert_bias(ml)};
    }
    char step[32], seed[32];
    snprintf(step, sizeof step, "%d", moe_trainer_steps_done(t));
    snprintf(seed, sizeof seed, "%llu", (unsigned long long)moe_trainer_config(t)->seed);
    const char *keys[] = {"moe.step", "moe.seed"};
    const char *vals[] = {step, seed};
    return moe_st_write(path, e, n, keys, vals, 2);
}

static int ckpt_step(const char *name) {
    if (strncmp(name, CKPT_PREFIX, strlen(CKPT_PREFIX))) return -1;
    char *end;
    long v = strtol(name + strlen(CKPT_PREFIX), &end, 10);
    return *end || v < 0 ? -1 : (int)v;
}

static void remove_ckpt(const char *dir) { /* dir: at most 4100 bytes */
    const char *files[] = {"model.safetensors", "trainer.safetensors"};
    char path[4300];
    for (int i = 0; i < 2; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, files[i]);
        unlink(path);
    }
    rmdir(dir);
}

/* Removes all but the newest keep checkpoints (never the one "latest" names). */
static void prune(const char *save_dir, int keep, int newest) {
    if (strlen(save_dir) > 4000) return;
    DIR *d = opendir(save_dir);
    if (!d) return;
    int steps[4096], n = 0;
    struct dirent *e;
    while ((e = readdir(d)) && n < 4096) {
        int s = ckpt_step(e->d_name);
        if (s >= 0 && s != newest) steps[n++] = s;
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

moe_status moe_checkpoint_save(const char *save_dir, int keep_last, const char *config,
                               moe_model *m, moe_trainer *t) {
    int step = moe_trainer_steps_done(t);
    char dir[4200], path[4300];
    snprintf(dir, sizeof dir, "%s/" CKPT_PREFIX "%08d", save_dir, step);
    MOE_TRY(moe_mkdirs(dir));
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    MOE_TRY(save_model(path, m, config, step));
    snprintf(path, sizeof path, "%s/trainer.safetensors", dir);
    MOE_TRY(save_trainer(path, m, t));
    char latest[64];
    int len = snprintf(latest, sizeof latest, CKPT_PREFIX "%08d\n", step);
    snprintf(path, sizeof path, "%s/latest", save_dir);
    const void *parts[] = {latest};
    size_t sizes[] = {(size_t)len};
    MOE_TRY(moe_write_atomic(path, parts, sizes, 1));
    prune(save_dir, keep_last, step);
    return MOE_OK;
}

moe_status moe_checkpoint_resolve(const char *dir, char *ckpt, size_t cap) {
    char path[4200];
    struct stat sb;
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    if (stat(path, &sb) == 0) {
        snprintf(ckpt, cap, "%s", dir);
        return MOE_OK;
    }
    snprintf(path, sizeof path, "%s/latest", dir);
    FILE *f = fopen(path, "r");
    if (!f)
        return moe_set_error(MOE_ERR_IO, "%s is not a checkpoint: it has neither model.safetensors "
                             "nor a 'latest' file", dir);
    char name[128] = "";
    int ok = fgets(name, sizeof name, f) != NULL;
    fclose(f);
    name[strcspn(name, "\r\n")] = '\0';
    if (!ok || ckpt_step(name) < 0)
        return moe_set_error(MOE_ERR_FORMAT, "%s: 'latest' does not name a checkpoint", dir);
    snprintf(ckpt, cap, "%s/%s", dir, name);
    return MOE_OK;
}

moe_status moe_checkpoint_config(const char *ckpt, char **config) {
    char path[4200];
    snprintf(path, sizeof path, "%s/model.safetensors", ckpt);
    moe_safetensors st;
    MOE_TRY(moe_st_read(path, &st));
    const char *c = moe_st_meta(&st, "moe.config");
    *config = c ? strdup(c) : NULL;
    moe_st_free(&st);
    if (!*config) return moe_set_error(MOE_ERR_FORMAT, "%s has no moe.config metadata", path);
    return MOE_OK;
}

static moe_status load_trainer(const char *path, moe_model *m, moe_trainer *t) {
    moe_safetensors st;
    MOE_TRY(moe_st_read(path, &st));
    const moe_model_config *c = moe_model_get_config(m);
    int64_t np = (int64_t)moe_model_param_count(m);
    moe_status s = moe_st_get_f32(&st, "optimizer.adam_m", 1, &np, moe_trainer_adam_m(t));
    if (s == MOE_OK) s = moe_st_get_f32(&st, "optimizer.adam_v", 1, &np, moe_trainer_adam_v(t));
    for (int l = 0; l < c->n_layers && s == MOE_OK; l++) {
        moe_layer *ml = moe_model_moe_layer(m, l);
        if (!ml) continue;
        char name[64];
        snprintf(name, sizeof name, "model.layers.%d.mlp.gate.expert_bias", l);
        int64_t E = moe_model_layer_experts(c, l);
        s = moe_st_get_f32(&st, name, 1, &E, moe_layer_expert_bias(ml));
    }
    const char *step = moe_st_meta(&st, "moe.step");
    char *end = NULL;
    long v = step ? strtol(step, &end, 10) : -1;
    if (s == MOE_OK && (!step || *end || v < 0 || v > 1000000000))
        s = moe_set_error(MOE_ERR_FORMAT, "%s: missing or bad moe.step", path);
    if (s == MOE_OK) moe_trainer_set_step(t, (int)v);
    if (s != MOE_OK && s != MOE_ERR_NOMEM) {
        char msg[600];
        snprintf(msg, sizeof msg, "%s", moe_last_error());
        s = moe_set_error(s, "%s: %s", path, msg);
    }
    moe_st_free(&st);
    return s;
}

moe_status moe_checkpoint_load(const char *ckpt, moe_model *m, moe_trainer *t) {
    char path[4200];
    snprintf(path, sizeof path, "%s/model.safetensors", ckpt);
    moe_safetensors st;
    MOE_TRY(moe_st_read(path, &st));
    /* Parameters go to a copy first so that a failure leaves the model unchanged. */
    size_t np = moe_model_param_count(m);
    float *tmp = moe_alloc(np, sizeof(float));
    moe_status s = tmp ? MOE_OK : MOE_ERR_NOMEM;
    for (int i = 0; i < moe_model_n_tensors(m) && s == MOE_OK; i++) {
        const moe_tensor_info *ti = moe_model_tensor(m, i);
        s = moe_st_get_f32(&st, ti->name, ti->ndim, ti->shape, tmp + ti->offset);
    }
    if (s == MOE_OK) memcpy(moe_model_params(m), tmp, np * sizeof(float));
    else if (s != MOE_ERR_NOMEM) {
        char msg[600];
        snprintf(msg, sizeof msg, "%s", moe_last_error());
        s = moe_set_error(s, "%s: %s", path, msg);
    }
    moe_free(tmp);
    moe_st_free(&st);
    MOE_TRY(s);
    if (!t) return MOE_OK;
    snprintf(path, sizeof path, "%s/trainer.safetensors", ckpt);
    return load_trainer(path, m, t);
}
