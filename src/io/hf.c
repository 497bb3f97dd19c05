/* Hugging Face model directories: config.json to a model configuration, tensor names. */
#include "io/hf.h"

#include "core/core.h"
#include "train/trainer.h"

#include <cJSON.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* An integer field in [lo, hi]; absent: def (or an error when def < lo). */
static moe_status get_int(const cJSON *j, const char *key, int lo, int hi, int def, int *out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, key);
    if (!v || cJSON_IsNull(v)) {
        if (def < lo) return moe_set_error(MOE_ERR_FORMAT, "config.json: no \"%s\"", key);
        *out = def;
        return MOE_OK;
    }
    if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) || v->valuedouble < lo ||
        v->valuedouble > hi)
        return moe_set_error(MOE_ERR_FORMAT, "config.json: \"%s\" must be an integer in "
                             "[%d, %d]", key, lo, hi);
    *out = (int)v->valuedouble;
    return MOE_OK;
}

static moe_status get_float(const cJSON *j, const char *key, double lo, double hi, double def,
                            float *out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, key);
    if (!v || cJSON_IsNull(v)) {
        *out = (float)def;
        return MOE_OK;
    }
    if (!cJSON_IsNumber(v) || !(v->valuedouble >= lo && v->valuedouble <= hi))
        return moe_set_error(MOE_ERR_FORMAT, "config.json: \"%s\" must be a number in [%g, %g]",
                             key, lo, hi);
    *out = (float)v->valuedouble;
    return MOE_OK;
}

static moe_status parse_mixtral(const cJSON *j, moe_model_config *c) {
    int hd, tie = 0, max_pos;
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(j, "tie_word_embeddings");
    if (t && !cJSON_IsBool(t))
        return moe_set_error(MOE_ERR_FORMAT, "config.json: \"tie_word_embeddings\" must be true "
                             "or false");
    tie = cJSON_IsTrue(t);
    MOE_TRY(get_int(j, "vocab_size", 2, 1 << 24, -1, &c->vocab));
    MOE_TRY(get_int(j, "hidden_size", 1, 1 << 20, -1, &c->d));
    MOE_TRY(get_int(j, "num_hidden_layers", 1, MOE_MAX_LAYERS, -1, &c->n_layers));
    MOE_TRY(get_int(j, "num_attention_heads", 1, 1 << 16, -1, &c->n_heads));
    MOE_TRY(get_int(j, "num_key_value_heads", 1, 1 << 16, c->n_heads, &c->n_kv_heads));
    MOE_TRY(get_int(j, "intermediate_size", 1, 1 << 24, -1, &c->moe.ffn));
    MOE_TRY(get_int(j, "num_local_experts", 1, 1 << 16, -1, &c->moe.n_experts));
    MOE_TRY(get_int(j, "num_experts_per_tok", 1, 1 << 16, -1, &c->moe.topk));
    MOE_TRY(get_int(j, "max_position_embeddings", 1, 1 << 24, 4096, &max_pos));
    MOE_TRY(get_int(j, "head_dim", 1, 1 << 16, c->d / c->n_heads, &hd));
    MOE_TRY(get_float(j, "rms_norm_eps", 0, 1, 1e-5, &c->norm_eps));
    MOE_TRY(get_float(j, "rope_theta", 1, 1e12, 1e6, &c->rope_theta));
    const cJSON *act = cJSON_GetObjectItemCaseSensitive(j, "hidden_act");
    if (act && (!cJSON_IsString(act) || strcmp(act->valuestring, "silu")))
        return moe_set_error(MOE_ERR_FORMAT, "config.json: hidden_act must be \"silu\" for "
                             "Mixtral");
    if (hd * c->n_heads != c->d)
        return moe_set_error(MOE_ERR_FORMAT, "config.json: head_dim %d x %d heads is not the "
                             "hidden size %d (not supported)", hd, c->n_heads, c->d);
    c->tie_embeddings = tie;
    c->seq_len = max_pos < 4096 ? max_pos : 4096; /* the longest sequence we plan memory for */
    c->ffn = c->moe.ffn;
    c->moe_layer_freq = 1;
    c->first_k_dense = 0;
    c->moe.act = MOE_ACT_SWIGLU;
    c->moe.router = MOE_ROUTER_TOPK;
    c->moe.score = MOE_SCORE_SOFTMAX;
    c->moe.pre_softmax = 1; /* softmax over all experts, top-k, renormalised */
    c->moe.norm_topk = MOE_NORM_ON;
    c->moe.capacity_factor = 0;
    c->moe.aux_coeff = 0;
    return MOE_OK;
}

moe_status moe_hf_config(const char *dir, moe_model_config *cfg, char *family, size_t cap) {
    char path[4400];
    snprintf(path, sizeof path, "%s/config.json", dir);
    char *text;
    size_t size;
    MOE_TRY(moe_read_file(path, &text, &size));
    cJSON *j = cJSON_ParseWithLength(text, size);
    free(text);
    if (!cJSON_IsObject(j)) {
        cJSON_Delete(j);
        return moe_set_error(MOE_ERR_FORMAT, "%s: not a JSON object", path);
    }
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(j, "model_type");
    moe_model_config c = moe_model_config_default();
    moe_status s;
    if (!cJSON_IsString(type))
        s = moe_set_error(MOE_ERR_FORMAT, "%s: no \"model_type\"", path);
    else if (!strcmp(type->valuestring, "mixtral"))
        s = parse_mixtral(j, &c);
    else
        s = moe_set_error(MOE_ERR_FORMAT, "%s: model_type \"%.40s\" is not supported (supported: "
                          "mixtral)", path, type->valuestring);
    if (s == MOE_OK) {
        snprintf(family, cap, "%s", type->valuestring);
        s = moe_model_config_validate(&c);
    }
    cJSON_Delete(j);
    if (s == MOE_OK) *cfg = c;
    return s;
}

void moe_hf_tensor_name(const char *family, const char *ours, char *buf, size_t cap) {
    /* Mixtral: block_sparse_moe.gate, experts.E.w1 (gate), w3 (up), w2 (down) */
    const char *mlp = strstr(ours, ".mlp.");
    if (strcmp(family, "mixtral") || !mlp) {
        snprintf(buf, cap, "%s", ours);
        return;
    }
    const char *rest = mlp + 5;
    static const char *const from[] = {"gate_proj.weight", "up_proj.weight", "down_proj.weight"};
    static const char *const to[] = {"w1.weight", "w3.weight", "w2.weight"};
    for (int i = 0; i < 3; i++) {
        size_t n = strlen(from[i]), m = strlen(rest);
        if (m >= n && !strcmp(rest + m - n, from[i])) {
            snprintf(buf, cap, "%.*sblock_sparse_moe.%.*s%s", (int)(mlp - ours) + 1, ours,
                     (int)(m - n), rest, to[i]);
            return;
        }
    }
    snprintf(buf, cap, "%.*sblock_sparse_moe.%s", (int)(mlp - ours) + 1, ours, rest);
}

static void rename_hf(const char *ours, char *buf, size_t cap, const void *family) {
    moe_hf_tensor_name(family, ours, buf, cap);
}

moe_status moe_hf_load(const char *dir, const char *family, moe_model *m) {
    return moe_checkpoint_load_params(dir, m, rename_hf, family);
}
