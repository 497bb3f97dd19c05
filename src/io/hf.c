/* Hugging Face model directories: config.json to a model configuration, tensor names. */
#include "io/hf.h"

#include "core/core.h"
#include "io/data.h"
#include "io/gguf.h"
#include "io/safetensors.h"
#include "train/trainer.h"

#include <cJSON.h>

#include <limits.h>
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

/* A boolean field; absent: def. */
static moe_status get_bool(const cJSON *j, const char *key, int def, int *out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, key);
    if (v && !cJSON_IsBool(v))
        return moe_set_error(MOE_ERR_FORMAT, "config.json: \"%s\" must be true or false", key);
    *out = v ? cJSON_IsTrue(v) : def;
    return MOE_OK;
}

/* A family of config.json (its model_type) and the defaults of its configuration class in
 * transformers (configuration_<family>.py) for keys a config.json may leave out: a directory
 * means what Hugging Face makes of it. kv_heads 0: num_attention_heads. */
typedef struct hf_family hf_family;
struct hf_family {
    const char *type;
    moe_status (*parse)(const cJSON *j, moe_model_config *c, const hf_family *f);
    double rope_theta, norm_eps;
    int max_pos, kv_heads;
};

/* The RoPE type of a rope_scaling or rope_parameters object: rope_type, else the older type,
 * else "default" (as transformers reads them); NULL when it is not a string. */
static const char *rope_type(const cJSON *r) {
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(r, "rope_type");
    if (!t) t = cJSON_GetObjectItemCaseSensitive(r, "type");
    if (!t) return "default";
    return cJSON_IsString(t) ? t->valuestring : NULL;
}

/* Whether key is in j and not null. */
static int present(const cJSON *j, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, key);
    return v && !cJSON_IsNull(v);
}

/* RoPE: rope_theta (absent: the family's), and its scaling from rope_scaling or from
 * transformers v5's rope_parameters (which also holds rope_theta then; both versions read
 * rope_scaling alone when it is set). Only DeepSeek's YaRN is modelled: any other scaling is
 * refused, as running without it would give other logits than Hugging Face. */
static moe_status get_rope(const cJSON *j, moe_model_config *c, const hf_family *f) {
    const cJSON *scaling = cJSON_GetObjectItemCaseSensitive(j, "rope_scaling");
    const cJSON *params = cJSON_GetObjectItemCaseSensitive(j, "rope_parameters");
    if (cJSON_IsNull(scaling)) scaling = NULL;
    if (cJSON_IsNull(params)) params = NULL;
    if ((scaling && !cJSON_IsObject(scaling)) || (params && !cJSON_IsObject(params)))
        return moe_set_error(MOE_ERR_FORMAT, "config.json: rope_scaling and rope_parameters "
                             "must be objects or null");
    if (scaling && scaling->child) params = NULL;
    MOE_TRY(get_float(j, "rope_theta", 1, 1e12, f->rope_theta, &c->rope_theta));
    if (params && present(params, "rope_theta")) {
        float inner = 0;
        MOE_TRY(get_float(params, "rope_theta", 1, 1e12, f->rope_theta, &inner));
        if (present(j, "rope_theta") && inner != c->rope_theta)
            return moe_set_error(MOE_ERR_FORMAT, "config.json: rope_theta %g and "
                                 "rope_parameters' rope_theta %g differ", c->rope_theta, inner);
        c->rope_theta = inner;
    }
    const cJSON *r = params ? params : scaling;
    const char *key = params ? "rope_parameters" : "rope_scaling";
    const char *type = r ? rope_type(r) : "default";
    if (!type)
        return moe_set_error(MOE_ERR_FORMAT, "config.json: %s's rope_type must be a string", key);
    if (!strcmp(type, "default")) return MOE_OK;
    int deepseek = !strncmp(f->type, "deepseek", 8);
    if (!deepseek || strcmp(type, "yarn"))
        return moe_set_error(MOE_ERR_FORMAT, "config.json: %s of type \"%.20s\" is not "
                             "supported for %s (%s)", key, type, f->type,
                             deepseek ? "only \"yarn\" is" : "only DeepSeek's yarn is modelled");
    MOE_TRY(get_float(r, "factor", 1, 1e6, 1, &c->rope_factor));
    MOE_TRY(get_int(r, "original_max_position_embeddings", 1, 1 << 24, -1, &c->rope_orig_max_pos));
    MOE_TRY(get_float(r, "beta_fast", 1e-6, 1e6, 32, &c->rope_beta_fast));
    MOE_TRY(get_float(r, "beta_slow", 1e-6, 1e6, 1, &c->rope_beta_slow));
    MOE_TRY(get_float(r, "mscale", 0, 1e6, 0, &c->rope_mscale));
    return get_float(r, "mscale_all_dim", 0, 1e6, 0, &c->rope_mscale_all_dim);
}

/* What the decoder families share: sizes, attention, norms, RoPE, SwiGLU experts behind a
 * softmax top-k router; expert_ffn and n_experts are the family's key names. */
static moe_status parse_common(const cJSON *j, moe_model_config *c, const hf_family *f,
                               const char *expert_ffn, const char *n_experts) {
    int hd = 0, tie = 0, max_pos = 0;
    MOE_TRY(get_bool(j, "tie_word_embeddings", 0, &tie));
    MOE_TRY(get_int(j, "vocab_size", 2, 1 << 24, -1, &c->vocab));
    MOE_TRY(get_int(j, "hidden_size", 1, 1 << 20, -1, &c->d));
    MOE_TRY(get_int(j, "num_hidden_layers", 1, MOE_MAX_LAYERS, -1, &c->n_layers));
    MOE_TRY(get_int(j, "num_attention_heads", 1, 1 << 16, -1, &c->n_heads));
    /* absent: the family's default; null: num_attention_heads (transformers' fallback) */
    int kv = f->kv_heads && !cJSON_GetObjectItemCaseSensitive(j, "num_key_value_heads")
                 ? f->kv_heads : c->n_heads;
    MOE_TRY(get_int(j, "num_key_value_heads", 1, 1 << 16, kv, &c->n_kv_heads));
    MOE_TRY(get_int(j, expert_ffn, 1, 1 << 24, -1, &c->moe.ffn));
    MOE_TRY(get_int(j, n_experts, 1, 1 << 16, -1, &c->moe.n_experts));
    MOE_TRY(get_int(j, "num_experts_per_tok", 1, 1 << 16, -1, &c->moe.topk));
    MOE_TRY(get_int(j, "max_position_embeddings", 1, 1 << 24, f->max_pos, &max_pos));
    MOE_TRY(get_int(j, "head_dim", 1, 1 << 16, c->d / c->n_heads, &hd));
    MOE_TRY(get_float(j, "rms_norm_eps", 0, 1, f->norm_eps, &c->norm_eps));
    MOE_TRY(get_rope(j, c, f));
    const cJSON *act = cJSON_GetObjectItemCaseSensitive(j, "hidden_act");
    if (act && (!cJSON_IsString(act) || strcmp(act->valuestring, "silu")))
        return moe_set_error(MOE_ERR_FORMAT, "config.json: hidden_act must be \"silu\"");
    c->head_dim = hd * c->n_heads == c->d ? 0 : hd;
    c->tie_embeddings = tie;
    c->seq_len = max_pos;
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

/* Mixtral: sliding_window null, or at least max_position_embeddings long (then it never
 * applies); a shorter window is not modelled. */
static moe_status parse_mixtral(const cJSON *j, moe_model_config *c, const hf_family *f) {
    int max_pos = 0, window = 0;
    MOE_TRY(parse_common(j, c, f, "intermediate_size", "num_local_experts"));
    MOE_TRY(get_int(j, "max_position_embeddings", 1, 1 << 24, f->max_pos, &max_pos));
    MOE_TRY(get_int(j, "sliding_window", 1, INT_MAX, max_pos, &window));
    if (window < max_pos)
        return moe_set_error(MOE_ERR_FORMAT, "config.json: sliding_window %d (below "
                             "max_position_embeddings %d) is not supported", window, max_pos);
    return MOE_OK;
}

/* norm_topk_prob (renormalise the k weights of the softmax), absent: def. */
static moe_status get_norm_topk(const cJSON *j, int def, moe_model_config *c) {
    int norm = def;
    MOE_TRY(get_bool(j, "norm_topk_prob", def, &norm));
    c->moe.norm_topk = norm ? MOE_NORM_ON : MOE_NORM_OFF;
    return MOE_OK;
}

/* The Qwen families' layers: layer l is an MoE layer unless mlp_only_layers holds l or
 * (l + 1) % decoder_sparse_step != 0 (transformers' Qwen2Moe/Qwen3MoeDecoderLayer), else a
 * dense MLP intermediate_size wide. Sliding-window attention is refused. */
static moe_status qwen_layout(const cJSON *j, moe_model_config *c) {
    int step, window = 0;
    MOE_TRY(get_bool(j, "use_sliding_window", 0, &window));
    if (window)
        return moe_set_error(MOE_ERR_FORMAT, "config.json: sliding-window attention "
                             "(use_sliding_window) is not supported");
    MOE_TRY(get_int(j, "decoder_sparse_step", 1, 1 << 16, 1, &step));
    for (int l = 0; l < c->n_layers; l++)
        c->n_experts[l] = (l + 1) % step ? MOE_LAYER_DENSE : 0;
    const cJSON *dense = cJSON_GetObjectItemCaseSensitive(j, "mlp_only_layers"), *x;
    if (cJSON_IsNull(dense)) return MOE_OK; /* transformers: None is [] */
    if (dense && !cJSON_IsArray(dense))
        return moe_set_error(MOE_ERR_FORMAT, "config.json: mlp_only_layers must be a list of "
                             "layer numbers");
    cJSON_ArrayForEach(x, dense) { /* numbers of no layer match none, as in transformers */
        if (!cJSON_IsNumber(x) || x->valuedouble != floor(x->valuedouble))
            return moe_set_error(MOE_ERR_FORMAT, "config.json: mlp_only_layers must be a list "
                                 "of layer numbers");
        if (x->valuedouble >= 0 && x->valuedouble < c->n_layers)
            c->n_experts[(int)x->valuedouble] = MOE_LAYER_DENSE;
    }
    return MOE_OK;
}

/* Attention without biases (attention_bias false or absent). */
static moe_status no_attention_bias(const cJSON *j) {
    int bias = 0;
    MOE_TRY(get_bool(j, "attention_bias", 0, &bias));
    if (bias)
        return moe_set_error(MOE_ERR_FORMAT, "config.json: attention_bias is not supported");
    return MOE_OK;
}

/* Qwen3-MoE: q and k RMSNorm per head, top-k renormalised with norm_topk_prob (absent:
 * false, as Qwen3MoeConfig has it; the published models set it true). */
static moe_status parse_qwen3_moe(const cJSON *j, moe_model_config *c, const hf_family *f) {
    MOE_TRY(parse_common(j, c, f, "moe_intermediate_size", "num_experts"));
    MOE_TRY(qwen_layout(j, c));
    MOE_TRY(no_attention_bias(j));
    MOE_TRY(get_norm_topk(j, 0, c));
    MOE_TRY(get_int(j, "intermediate_size", 1, 1 << 24, c->moe.ffn, &c->ffn));
    c->qk_norm = MOE_QK_NORM_HEAD;
    return MOE_OK;
}

/* OLMoE: q and k RMSNorm over the whole projection; top-k not renormalised by default. */
static moe_status parse_olmoe(const cJSON *j, moe_model_config *c, const hf_family *f) {
    MOE_TRY(parse_common(j, c, f, "intermediate_size", "num_experts"));
    MOE_TRY(no_attention_bias(j));
    const cJSON *clip = cJSON_GetObjectItemCaseSensitive(j, "clip_qkv");
    if (clip && !cJSON_IsNull(clip))
        return moe_set_error(MOE_ERR_FORMAT, "config.json: clip_qkv is not supported");
    MOE_TRY(get_norm_topk(j, 0, c));
    c->qk_norm = MOE_QK_NORM_WHOLE;
    return MOE_OK;
}

/* Qwen2-MoE (Qwen1.5-MoE): q/k/v biases (qkv_bias, true unless set false), a shared expert
 * gated by sigmoid(g . x) (shared_expert_intermediate_size, absent: Hugging Face's 5632; 0:
 * none), top-k of the softmax renormalised only with norm_topk_prob. */
static moe_status parse_qwen2_moe(const cJSON *j, moe_model_config *c, const hf_family *f) {
    int bias = 1;
    MOE_TRY(parse_common(j, c, f, "moe_intermediate_size", "num_experts"));
    MOE_TRY(qwen_layout(j, c));
    MOE_TRY(get_bool(j, "qkv_bias", 1, &bias));
    if (!bias)
        return moe_set_error(MOE_ERR_FORMAT, "config.json: qkv_bias false is not supported "
                             "for qwen2_moe");
    MOE_TRY(get_norm_topk(j, 0, c));
    MOE_TRY(get_int(j, "shared_expert_intermediate_size", 0, 1 << 24, 5632, &c->moe.shared_ffn));
    MOE_TRY(get_int(j, "intermediate_size", 1, 1 << 24, c->moe.ffn, &c->ffn));
    c->qkv_bias = 1;
    c->moe.shared_gate = c->moe.shared_ffn > 0;
    return MOE_OK;
}

/* DeepSeek-V2 / V3: multi-head latent attention, dense first layers, shared experts, routed
 * weights scaled. V2: softmax, top-k greedy or group-limited (a group's maximum); V3: sigmoid,
 * selection with e_score_correction_bias among the groups of the best top-2 sums, weights
 * renormalised (norm_topk_prob). q_lora_rank null: a full query projection. */
static moe_status parse_deepseek(const cJSON *j, moe_model_config *c, const hf_family *f) {
    int v3 = !strcmp(f->type, "deepseek_v3");
    MOE_TRY(parse_common(j, c, f, "moe_intermediate_size", "n_routed_experts"));
    MOE_TRY(no_attention_bias(j));
    int shared, freq;
    /* keys left out take transformers' defaults (configuration_deepseek_v2/v3.py); a null
     * q_lora_rank or n_shared_experts means none */
    int absent_q = !cJSON_GetObjectItemCaseSensitive(j, "q_lora_rank"),
        absent_shared = !cJSON_GetObjectItemCaseSensitive(j, "n_shared_experts");
    MOE_TRY(get_int(j, "intermediate_size", 1, 1 << 24, -1, &c->ffn));
    MOE_TRY(get_int(j, "q_lora_rank", 0, 1 << 20, absent_q ? 1536 : 0, &c->q_lora_rank));
    MOE_TRY(get_int(j, "kv_lora_rank", 1, 1 << 20, -1, &c->kv_lora_rank));
    MOE_TRY(get_int(j, "qk_nope_head_dim", 0, 1 << 16, -1, &c->qk_nope_dim));
    MOE_TRY(get_int(j, "qk_rope_head_dim", 2, 1 << 16, -1, &c->qk_rope_dim));
    MOE_TRY(get_int(j, "v_head_dim", 1, 1 << 16, -1, &c->v_head_dim));
    MOE_TRY(get_int(j, "first_k_dense_replace", 0, MOE_MAX_LAYERS, v3 ? 3 : 0, &c->first_k_dense));
    MOE_TRY(get_int(j, "moe_layer_freq", 1, 1, 1, &freq));
    MOE_TRY(get_int(j, "n_shared_experts", 0, 1 << 10, absent_shared ? (v3 ? 1 : 2) : 0, &shared));
    MOE_TRY(get_float(j, "routed_scaling_factor", 1e-6, 1e6, v3 ? 2.5 : 1, &c->moe.route_scale));
    MOE_TRY(get_bool(j, "rope_interleave", 1, &c->rope_interleave));
    if (cJSON_GetObjectItemCaseSensitive(j, "quantization_config"))
        return moe_set_error(MOE_ERR_FORMAT, "config.json: quantized (FP8) weights are not "
                             "supported; convert the checkpoint to BF16 first");
    c->head_dim = 0;
    c->n_kv_heads = c->n_heads;
    c->moe.shared_ffn = shared * c->moe.ffn;
    /* Hugging Face's deepseek_v3 reads neither scoring_func nor topk_method: its router always
     * takes sigmoid scores and selects with the correction bias among groups (noaux_tc) */
    const cJSON *scoring = cJSON_GetObjectItemCaseSensitive(j, "scoring_func");
    const cJSON *method = cJSON_GetObjectItemCaseSensitive(j, "topk_method");
    const char *score = cJSON_IsString(scoring) ? scoring->valuestring : v3 ? "sigmoid" : "softmax";
    const char *how = cJSON_IsString(method) ? method->valuestring : v3 ? "noaux_tc" : "greedy";
    int sigmoid = !strcmp(score, "sigmoid"), grouped = strcmp(how, "greedy") != 0;
    if (v3 && (!sigmoid || strcmp(how, "noaux_tc")))
        return moe_set_error(MOE_ERR_FORMAT, "config.json: deepseek_v3 routes with sigmoid "
                             "scores and noaux_tc in Hugging Face, not scoring_func \"%.20s\" / "
                             "topk_method \"%.30s\"", score, how);
    /* and its deepseek_v2 with softmax scores, greedy or group-limited, and rotates
     * interleaved pairs, whatever scoring_func and rope_interleave say */
    if (!v3 && (sigmoid || !strcmp(how, "noaux_tc") || !c->rope_interleave))
        return moe_set_error(MOE_ERR_FORMAT, "config.json: deepseek_v2 routes with softmax "
                             "scores (greedy or group_limited_greedy) and interleaved RoPE in "
                             "Hugging Face, not scoring_func \"%.20s\" / topk_method \"%.30s\" / "
                             "rope_interleave %s", score, how,
                             c->rope_interleave ? "true" : "false");
    if ((!sigmoid && strcmp(score, "softmax")) ||
        (strcmp(how, "greedy") && strcmp(how, "group_limited_greedy") && strcmp(how, "noaux_tc")))
        return moe_set_error(MOE_ERR_FORMAT, "config.json: scoring_func \"%.20s\" / topk_method "
                             "\"%.30s\" are not supported", score, how);
    c->moe.score = sigmoid ? MOE_SCORE_SIGMOID : MOE_SCORE_SOFTMAX;
    c->moe.enable_expert_bias = !strcmp(how, "noaux_tc");
    MOE_TRY(get_norm_topk(j, v3, c));
    if (!v3) c->moe.norm_topk = MOE_NORM_OFF; /* V2 does not renormalise (Hugging Face) */
    if (grouped) { /* absent: DeepseekV3Config's 8 and 4; V2 has no defaults */
        MOE_TRY(get_int(j, "n_group", 1, 1 << 16, v3 ? 8 : -1, &c->moe.n_groups));
        MOE_TRY(get_int(j, "topk_group", 1, 1 << 16, v3 ? 4 : -1, &c->moe.group_topk));
        c->moe.group_score_topk = v3 ? 2 : 1;
        if (c->moe.n_groups == 1) c->moe.group_topk = 1; /* one group: topk_group unused */
    }
    return MOE_OK;
}

/* The families, with their configuration classes' defaults: rope_theta, rms_norm_eps,
 * max_position_embeddings, num_key_value_heads. */
static const hf_family families[] = {
    {"mixtral", parse_mixtral, 1e6, 1e-5, 4096 * 32, 8},
    {"qwen2_moe", parse_qwen2_moe, 1e4, 1e-6, 32768, 16},
    {"qwen3_moe", parse_qwen3_moe, 1e4, 1e-6, 32768, 4},
    {"olmoe", parse_olmoe, 1e4, 1e-5, 4096, 0},
    {"deepseek_v2", parse_deepseek, 1e4, 1e-6, 2048, 0},
    {"deepseek_v3", parse_deepseek, 1e4, 1e-6, 4096, 0},
};
enum { N_FAMILIES = sizeof families / sizeof *families };

static const hf_family *find_family(const char *type) {
    for (int i = 0; i < N_FAMILIES; i++)
        if (!strcmp(families[i].type, type)) return &families[i];
    return NULL;
}

/* A key that some object in j holds twice, or NULL. */
static const char *duplicate_key(const cJSON *j) {
    for (const cJSON *a = j ? j->child : NULL; a; a = a->next) {
        for (const cJSON *b = a->next; cJSON_IsObject(j) && b; b = b->next)
            if (!strcmp(a->string, b->string)) return a->string;
        const char *inner = duplicate_key(a);
        if (inner) return inner;
    }
    return NULL;
}

/* DIR/name as a JSON object (path receives the file's path, for messages); an object with a
 * key twice is refused, as readers disagree on which value counts (Python's json, and so
 * transformers, takes the last; cJSON the first). */
static moe_status read_json(const char *dir, const char *name, char *path, size_t cap,
                            cJSON **out) {
    char *text;
    size_t size;
    snprintf(path, cap, "%s/%s", dir, name);
    *out = NULL;
    MOE_TRY(moe_read_file(path, &text, &size));
    cJSON *j = cJSON_ParseWithLength(text, size);
    free(text);
    if (!cJSON_IsObject(j)) {
        cJSON_Delete(j);
        return moe_set_error(MOE_ERR_FORMAT, "%s: not a JSON object", path);
    }
    const char *twice = duplicate_key(j);
    if (twice) {
        moe_status st = moe_set_error(MOE_ERR_FORMAT, "%s: key \"%s\" appears twice in one "
                                      "object", path, twice);
        cJSON_Delete(j);
        return st;
    }
    *out = j;
    return MOE_OK;
}

/* DIR/config.json; a GGUF file's as moe_gguf_config_json makes it. */
static moe_status read_config(const char *dir, char *path, size_t cap, cJSON **out) {
    if (moe_gguf_is_file(dir)) {
        moe_gguf *g;
        char *text = NULL;
        snprintf(path, cap, "%s", dir);
        MOE_TRY(moe_gguf_open(dir, &g));
        moe_status s = moe_gguf_config_json(g, &text);
        moe_gguf_close(g);
        *out = s == MOE_OK ? cJSON_Parse(text) : NULL;
        free(text);
        return s != MOE_OK ? s : *out ? MOE_OK : moe_set_error(MOE_ERR_NOMEM, "out of memory");
    }
    const char *run = moe_file_exists(dir, "config.json") ? NULL : moe_checkpoint_run_marker(dir);
    if (run) /* the other way round from --load of a model directory */
        return moe_set_error(MOE_ERR_INVALID, "%s is a moe run or checkpoint (%s), not a Hugging "
                             "Face model directory: give it with --load (moe train: --load RUN "
                             "--finetune)", dir, run);
    return read_json(dir, "config.json", path, cap, out);
}

moe_status moe_hf_config(const char *dir, moe_model_config *cfg, char *family, size_t cap) {
    char path[4400];
    cJSON *j;
    MOE_TRY(read_config(dir, path, sizeof path, &j));
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(j, "model_type");
    const hf_family *f = cJSON_IsString(type) ? find_family(type->valuestring) : NULL;
    moe_model_config c = moe_model_config_default();
    moe_status s = MOE_ERR_FORMAT;
    if (!cJSON_IsString(type)) {
        moe_set_error(s, "%s: no \"model_type\"", path);
    } else if (!f) {
        char known[128] = "";
        for (int k = 0; k < N_FAMILIES; k++)
            snprintf(known + strlen(known), sizeof known - strlen(known), "%s%s", k ? ", " : "",
                     families[k].type);
        moe_set_error(s, "%s: model_type \"%.40s\" is not supported (supported: %s)", path,
                      type->valuestring, known);
    } else {
        s = f->parse(j, &c, f);
    }
    if (s == MOE_OK) {
        snprintf(family, cap, "%s", type->valuestring);
        s = moe_model_config_validate(&c);
    }
    cJSON_Delete(j);
    if (s == MOE_OK) *cfg = c;
    return s;
}

/* A JSON value that can be a token id: a whole number in [0, 2^31). Others are ignored. */
static int token_id(const cJSON *v) {
    return cJSON_IsNumber(v) && v->valuedouble >= 0 && v->valuedouble <= INT32_MAX &&
           v->valuedouble == floor(v->valuedouble);
}

/* ids[0..*n) and v when it is a token id not among them; 0 when that would pass cap. */
static int add_id(const cJSON *v, int32_t *ids, int *n, int cap) {
    for (int i = 0; i < *n; i++)
        if (ids[i] == (int32_t)v->valuedouble) return 1;
    if (*n >= cap) return 0;
    ids[(*n)++] = (int32_t)v->valuedouble;
    return 1;
}

/* eos_token_id of DIR/name (a token id, a list of them, null or absent) added to ids[0..*n);
 * a file that is not there adds none, one that does not parse or another value is an error. */
static moe_status add_eos(const char *dir, const char *name, int32_t *ids, int *n, int cap) {
    char path[4400];
    cJSON *j, *e;
    int gguf = moe_gguf_is_file(dir); /* config.json's keys alone */
    if (gguf ? strcmp(name, "config.json") : !moe_file_exists(dir, name)) return MOE_OK;
    MOE_TRY(gguf ? read_config(dir, path, sizeof path, &j)
                 : read_json(dir, name, path, sizeof path, &j));
    cJSON *eos = cJSON_GetObjectItemCaseSensitive(j, "eos_token_id");
    cJSON *list = cJSON_IsArray(eos) ? eos : NULL;
    int ok = !eos || cJSON_IsNull(eos) || token_id(eos) || list;
    cJSON_ArrayForEach(e, list) ok &= token_id(e);
    int fit = 1;
    if (ok && token_id(eos)) fit = add_id(eos, ids, n, cap);
    if (ok) cJSON_ArrayForEach(e, list) fit &= add_id(e, ids, n, cap);
    cJSON_Delete(j);
    if (!ok)
        return moe_set_error(MOE_ERR_FORMAT, "%s: eos_token_id is not a token id (a whole number "
                             "in [0, 2^31)), a list of them or null", path);
    return fit ? MOE_OK
               : moe_set_error(MOE_ERR_FORMAT, "%s: more than %d end-of-sequence ids", path, cap);
}

moe_status moe_hf_eos(const char *dir, int generation, int32_t *ids, int cap, int *n) {
    *n = 0;
    /* Hugging Face's generate: generation_config.json when there is one (a chat model's end of
     * turn is often there alone), else the one transformers derives from config.json */
    if (generation && moe_file_exists(dir, "generation_config.json"))
        return add_eos(dir, "generation_config.json", ids, n, cap);
    MOE_TRY(add_eos(dir, "config.json", ids, n, cap));
    return generation ? MOE_OK : add_eos(dir, "generation_config.json", ids, n, cap);
}

void moe_hf_tensor_name(const char *family, const char *ours, char *buf, size_t cap) {
    /* DeepSeek: mlp.shared_experts */
    const char *shared = strstr(ours, ".mlp.shared_expert.");
    if (!strncmp(family, "deepseek", 8) && shared) {
        snprintf(buf, cap, "%.*s.mlp.shared_experts.%s", (int)(shared - ours), ours,
                 shared + strlen(".mlp.shared_expert."));
        return;
    }
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

/* Tensors of a Hugging Face model that its class leaves unused, or that contribute nothing:
 * derived RoPE buffers, layers past num_hidden_layers (DeepSeek-V3's multi-token prediction
 * module), the selection biases (loaded by moe_hf_load first), a tied model's lm_head, and
 * Qwen2-MoE's zero-width shared expert and its gate. Any other tensor the model lacks is an
 * error: loading without it would compute another model than the file's. */
typedef struct {
    const char *family;
    const moe_model_config *c;
} hf_load_ctx;

static void rename_hf_load(const char *ours, char *buf, size_t cap, const void *ctx) {
    moe_hf_tensor_name(((const hf_load_ctx *)ctx)->family, ours, buf, cap);
}

static int unused_hf(const char *name, const void *ctx) {
    const hf_load_ctx *a = ctx;
    int layer, at = 0;
    size_t n = strlen(name), inv = strlen(".rotary_emb.inv_freq");
    if (n > inv && !strcmp(name + n - inv, ".rotary_emb.inv_freq")) return 1;
    if (sscanf(name, "model.layers.%d.%n", &layer, &at) == 1 && at > 0 && layer >= a->c->n_layers)
        return 1;
    if (a->c->moe.enable_expert_bias && strstr(name, ".mlp.gate.e_score_correction_bias")) return 1;
    if (a->c->tie_embeddings && !strcmp(name, "lm_head.weight")) return 1;
    return !strcmp(a->family, "qwen2_moe") && a->c->moe.shared_ffn == 0 &&
           (strstr(name, ".mlp.shared_expert.") || strstr(name, ".mlp.shared_expert_gate."));
}

/* Each MoE layer's selection bias copied to (to_model 0) or from (1) buf, layer after layer. */
static void copy_biases(moe_model *m, float *buf, int to_model) {
    const moe_model_config *c = moe_model_get_config(m);
    for (int l = 0; l < c->n_layers; l++) {
        moe_layer *L = moe_model_moe_layer(m, l);
        if (!L) continue;
        size_t E = (size_t)moe_model_layer_experts(c, l);
        float *b = moe_layer_expert_bias(L);
        memcpy(to_model ? b : buf, to_model ? buf : b, sizeof(float) * E);
        buf += E;
    }
}

moe_status moe_hf_load(const char *dir, const char *family, moe_model *m) {
    const moe_model_config *c = moe_model_get_config(m);
    if (moe_gguf_is_file(dir)) {
        moe_gguf *g;
        MOE_TRY(moe_gguf_open(dir, &g));
        moe_status s = moe_gguf_load(g, family, m);
        moe_gguf_close(g);
        return s;
    }
    hf_load_ctx a = {family, c};
    if (!c->moe.enable_expert_bias)
        return moe_checkpoint_load_params(dir, m, rename_hf_load, unused_hf, &a);
    /* DeepSeek-V3's selection bias (e_score_correction_bias of each MoE layer) first, the old
     * one kept: each load reads everything before it sets anything, so a failure of the
     * parameters' puts the bias back and nothing has changed */
    size_t n = 1;
    for (int l = 0; l < c->n_layers; l++) n += (size_t)moe_model_layer_experts(c, l);
    float *old = malloc(sizeof(float) * n);
    if (!old) return moe_set_error(MOE_ERR_NOMEM, "out of memory");
    copy_biases(m, old, 0);
    moe_status st = moe_checkpoint_load_expert_bias(
        dir, m, "model.layers.%d.mlp.gate.e_score_correction_bias");
    if (st == MOE_OK) st = moe_checkpoint_load_params(dir, m, rename_hf_load, unused_hf, &a);
    if (st != MOE_OK) copy_biases(m, old, 1);
    free(old);
    return st;
}

int moe_hf_renormalised(const moe_layer_config *m) {
    return !m->pre_softmax || m->norm_topk == MOE_NORM_ON;
}

/* Whether the top-k weights of sigmoid scores are renormalised (AUTO: when k > 1). */
static int sigmoid_renormalised(const moe_layer_config *m) {
    return m->norm_topk == MOE_NORM_ON || (m->norm_topk == MOE_NORM_AUTO && m->topk > 1);
}

/* Whether the layer may drop tokens outside training, where a Hugging Face model never does:
 * a capacity factor (the evaluation's, else training's) below E/k (C = ceil(cf T k / E) < T). */
static int drops_in_inference(const moe_layer_config *m) {
    float cf = m->eval_capacity_factor != 0 ? m->eval_capacity_factor : m->capacity_factor;
    return cf != 0 && fabsf(cf) * (float)m->topk < (float)m->n_experts;
}

#define DROPS_WHY                                                                              \
    "the layer must be dropless outside training (moe-eval-capacity-factor E/k or more)"

/* DeepSeek-V2 / V3: MLA, MoE layers after the dense ones, ungated shared experts of whole
 * expert widths; V3: sigmoid with the selection bias, groups scored by their top two; V2:
 * softmax over all experts, not renormalised, groups scored by their maximum. */
static const char *deepseek_incompatible(const moe_model_config *c, int v3) {
    const moe_layer_config *m = &c->moe;
    if (!c->kv_lora_rank) return "multi-head latent attention is needed";
    if (c->moe_layer_freq != 1) return "every layer after the dense ones must be an MoE layer";
    if (m->act != MOE_ACT_SWIGLU || m->router != MOE_ROUTER_TOPK)
        return "swiglu experts and the top-k router are needed";
    if (m->residual || m->expert_bias || m->shared_gate || m->shared_ffn % m->ffn)
        return "no Residual-MoE, expert biases or shared-expert gate; shared experts as wide "
               "as routed ones";
    if (drops_in_inference(m)) return DROPS_WHY;
    if (!c->rope_interleave) return "RoPE with interleaved pairs is needed";
    if (v3 && !(m->score == MOE_SCORE_SIGMOID && m->enable_expert_bias &&
                (m->n_groups == 1 || m->group_score_topk == 2)))
        return "sigmoid scores with the expert bias and groups scored by their top two are "
               "needed";
    if (!v3 && !(m->score == MOE_SCORE_SOFTMAX && m->pre_softmax &&
                 m->norm_topk != MOE_NORM_ON && !m->enable_expert_bias &&
                 (m->n_groups == 1 || m->group_score_topk == 1)))
        return "softmax over all experts without renormalisation or expert bias, groups scored "
               "by their maximum are needed";
    return NULL;
}

int moe_hf_compatible(const moe_model_config *c, const char *family, char *why, size_t cap) {
    const moe_layer_config *m = &c->moe;
    int mixtral = !strcmp(family, "mixtral"), qwen2 = !strcmp(family, "qwen2_moe"),
        qwen3 = !strcmp(family, "qwen3_moe"), olmoe = !strcmp(family, "olmoe");
    int plain_heads = moe_model_head_dim(c) * c->n_heads == c->d;
    int deepseek = !strncmp(family, "deepseek_v", 10);
    const char *bad = NULL;
    if (m->random_routing || m->quantile_balancing || m->cosine_dim || m->probs_on_input) {
        snprintf(why, cap, "%s, which no Hugging Face family has", m->random_routing
                 ? "no random routing (GShard's second expert)"
                 : m->quantile_balancing ? "no quantile balancing (a bias on the router's logits)"
                 : m->cosine_dim ? "no cosine router (Tutel's)"
                 : "no routing weights on the experts' inputs (moe-apply-probs-on-input)");
        return 0;
    }
    if (deepseek) {
        bad = strcmp(family, "deepseek_v2") && strcmp(family, "deepseek_v3")
                  ? "unknown family"
                  : deepseek_incompatible(c, family[10] == '3');
        for (int l = c->first_k_dense; !bad && l < c->n_layers; l++)
            if (moe_model_layer_experts(c, l) != m->n_experts) bad = "every MoE layer needs num-experts";
        if (bad) snprintf(why, cap, "%s", bad);
        return bad == NULL;
    }
    if (!mixtral && !qwen2 && !qwen3 && !olmoe) bad = "unknown family";
    else if (c->kv_lora_rank) bad = "multi-head latent attention is DeepSeek's";
    /* Hugging Face's RoPE of these families is rotate-half without scaling */
    else if (c->rope_interleave)
        bad = "RoPE with interleaved pairs (--rotary-interleaved) is only written as "
              "deepseek_v2 or deepseek_v3";
    else if (c->rope_factor != 1)
        bad = "YaRN (--rotary-scaling-factor, --original-max-position-embeddings) is only "
              "written as deepseek_v2 or deepseek_v3";
    else if (!(qwen2 || qwen3) && (c->first_k_dense || c->moe_layer_freq != 1))
        bad = "every layer must be an MoE layer (dense layers are written as qwen2_moe and "
              "qwen3_moe)";
    else if (m->act != MOE_ACT_SWIGLU) bad = "the experts must use swiglu";
    else if (m->router != MOE_ROUTER_TOPK || m->score != MOE_SCORE_SOFTMAX)
        bad = "the router must be top-k over softmax scores";
    else if (mixtral && !moe_hf_renormalised(m)) bad = "the top-k weights must be renormalised";
    else if (m->route_scale != 1.0f || m->n_groups > 1 || m->enable_expert_bias)
        bad = "no scaling factor, expert groups or expert bias";
    else if (m->residual || m->expert_bias) bad = "no Residual-MoE or expert biases";
    else if (qwen2 ? m->shared_ffn && !m->shared_gate : m->shared_ffn != 0)
        bad = qwen2 ? "a shared expert needs a sigmoid gate" : "no shared expert";
    else if (qwen2 != (c->qkv_bias != 0))
        bad = qwen2 ? "q/k/v biases are needed" : "no q/k/v biases";
    else if (c->qk_norm != (qwen3 ? MOE_QK_NORM_HEAD : olmoe ? MOE_QK_NORM_WHOLE : MOE_QK_NORM_NONE))
        bad = qwen3 ? "q/k norms per head are needed" : olmoe ? "q/k norms over the projection "
              "are needed" : "no q/k norms";
    else if ((qwen2 || olmoe) && !plain_heads) bad = "heads must be hidden size / heads wide";
    else if (drops_in_inference(m)) bad = DROPS_WHY;
    for (int l = 0; !bad && l < c->n_layers; l++) { /* Qwen's mlp_only_layers: dense ones */
        int e = moe_model_layer_experts(c, l);
        if (e ? e != m->n_experts : !(qwen2 || qwen3))
            bad = e ? "every MoE layer needs num-experts" : "every layer must be an MoE layer "
                  "(dense layers are written as qwen2_moe and qwen3_moe)";
    }
    if (bad) snprintf(why, cap, "%s", bad);
    return bad == NULL;
}

const char *moe_hf_family_for(const moe_model_config *c, char *why, size_t cap) {
    static const char *const order[] = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe",
                                        "deepseek_v3", "deepseek_v2"};
    enum { N = sizeof order / sizeof *order };
    char each[N][256];
    for (size_t i = 0; i < N; i++)
        if (moe_hf_compatible(c, order[i], each[i], sizeof each[i])) return order[i];
    size_t at = 0; /* families in order, those with the same reason as the next together */
    why[0] = '\0';
    for (size_t i = 0; i < N && at < cap; i++) {
        int last = i + 1 == N || strcmp(each[i], each[i + 1]);
        int n = snprintf(why + at, cap - at, "%s%s", order[i], last ? ": " : ", ");
        at += n > 0 ? (size_t)n : 0;
        if (last && at < cap) {
            n = snprintf(why + at, cap - at, "%s%s", each[i], i + 1 < N ? "; " : "");
            at += n > 0 ? (size_t)n : 0;
        }
    }
    return NULL;
}

/* Sets key to a number unless j holds that number already (a source's value stays as it
 * was written). */
static void set_number(cJSON *j, const char *key, double v) {
    const cJSON *old = cJSON_GetObjectItemCaseSensitive(j, key);
    if (cJSON_IsNumber(old) && old->valuedouble == v) return;
    cJSON_DeleteItemFromObjectCaseSensitive(j, key);
    cJSON_AddNumberToObject(j, key, v);
}

double moe_hf_float_json(float f) {
    char buf[32];
    for (int digits = 1; digits < 9; digits++) {
        snprintf(buf, sizeof buf, "%.*g", digits, (double)f);
        if ((float)strtod(buf, NULL) == f) return strtod(buf, NULL);
    }
    return (double)f;
}

/* set_number for a value we hold as a float: a number of j that reads as v stays as written
 * (a source's 1e-6 would otherwise come back as 9.99999997e-07). */
static void set_float(cJSON *j, const char *key, float v) {
    const cJSON *old = cJSON_GetObjectItemCaseSensitive(j, key);
    if (cJSON_IsNumber(old) && (float)old->valuedouble == v) return;
    set_number(j, key, moe_hf_float_json(v));
}

static void set_bool(cJSON *j, const char *key, int v) {
    cJSON_DeleteItemFromObjectCaseSensitive(j, key);
    cJSON_AddBoolToObject(j, key, v);
}

static void set_string(cJSON *j, const char *key, const char *v) {
    cJSON_DeleteItemFromObjectCaseSensitive(j, key);
    cJSON_AddStringToObject(j, key, v);
}

/* Whether a and b rotate alike. */
static int same_rope(const moe_model_config *a, const moe_model_config *b) {
    if (a->rope_theta != b->rope_theta || a->rope_factor != b->rope_factor) return 0;
    return !(a->rope_factor > 1) ||
           (a->rope_orig_max_pos == b->rope_orig_max_pos &&
            a->rope_beta_fast == b->rope_beta_fast && a->rope_beta_slow == b->rope_beta_slow &&
            a->rope_mscale == b->rope_mscale && a->rope_mscale_all_dim == b->rope_mscale_all_dim);
}

/* RoPE: the source's keys as they are when they say what c holds (rope_theta, rope_scaling
 * or transformers v5's rope_parameters), else rope_theta and rope_scaling (null, or
 * DeepSeek's yarn) written anew. */
static void rope_config(const moe_model_config *c, const char *family, cJSON *j) {
    moe_model_config read = *c;
    if ((present(j, "rope_theta") || present(j, "rope_parameters")) &&
        get_rope(j, &read, find_family(family)) == MOE_OK && same_rope(&read, c))
        return;
    moe_clear_error();
    cJSON_DeleteItemFromObjectCaseSensitive(j, "rope_parameters");
    cJSON_DeleteItemFromObjectCaseSensitive(j, "rope_scaling");
    set_float(j, "rope_theta", c->rope_theta);
    if (!(c->rope_factor > 1)) {
        cJSON_AddNullToObject(j, "rope_scaling");
        return;
    }
    cJSON *r = cJSON_AddObjectToObject(j, "rope_scaling");
    cJSON_AddStringToObject(r, "type", "yarn");
    set_float(r, "factor", c->rope_factor);
    set_number(r, "original_max_position_embeddings", c->rope_orig_max_pos);
    set_float(r, "beta_fast", c->rope_beta_fast);
    set_float(r, "beta_slow", c->rope_beta_slow);
    set_float(r, "mscale", c->rope_mscale);
    set_float(r, "mscale_all_dim", c->rope_mscale_all_dim);
}

/* DeepSeek's keys (family_config has set the common ones). */
static void deepseek_config(const moe_model_config *c, int v3, cJSON *j) {
    const moe_layer_config *m = &c->moe;
    const char *drop[] = {"num_local_experts", "num_experts", "head_dim", "q_lora_rank"};
    for (size_t i = 0; i < sizeof drop / sizeof *drop; i++)
        cJSON_DeleteItemFromObjectCaseSensitive(j, drop[i]);
    const struct { const char *key; double v; } nums[] = {
        {"n_routed_experts", m->n_experts}, {"n_shared_experts", m->shared_ffn / m->ffn},
        {"moe_intermediate_size", m->ffn}, {"intermediate_size", c->ffn},
        {"first_k_dense_replace", c->first_k_dense}, {"moe_layer_freq", 1},
        {"n_group", m->n_groups}, {"topk_group", m->n_groups > 1 ? m->group_topk : 1},
        {"kv_lora_rank", c->kv_lora_rank}, {"qk_nope_head_dim", c->qk_nope_dim},
        {"qk_rope_head_dim", c->qk_rope_dim}, {"v_head_dim", c->v_head_dim},
        {"num_key_value_heads", c->n_heads}};
    for (size_t i = 0; i < sizeof nums / sizeof *nums; i++) set_number(j, nums[i].key, nums[i].v);
    set_float(j, "routed_scaling_factor", m->route_scale);
    if (c->q_lora_rank) cJSON_AddNumberToObject(j, "q_lora_rank", c->q_lora_rank);
    else cJSON_AddNullToObject(j, "q_lora_rank");
    set_string(j, "topk_method", v3 ? "noaux_tc" : m->n_groups > 1 ? "group_limited_greedy" : "greedy");
    set_string(j, "scoring_func", v3 ? "sigmoid" : "softmax");
    set_bool(j, "norm_topk_prob", v3 && sigmoid_renormalised(m));
    set_bool(j, "attention_bias", 0);
    if (v3) set_bool(j, "rope_interleave", 1);
}

/* config.json of the family: base (the source's config.json, or an empty object) with the
 * keys its loader reads set from c; the source's values stay as written where they say the
 * same, and so do keys we do not read (initializer_range, token ids...). A source without
 * max_position_embeddings keeps the family's default. */
static cJSON *family_config(const moe_model_config *c, const char *family, int source,
                            cJSON *j) {
    const moe_layer_config *m = &c->moe;
    int mixtral = !strcmp(family, "mixtral"), qwen2 = !strcmp(family, "qwen2_moe"),
        qwen3 = !strcmp(family, "qwen3_moe");
    static const char *const arch[][2] = {{"mixtral", "MixtralForCausalLM"},
                                          {"qwen2_moe", "Qwen2MoeForCausalLM"},
                                          {"qwen3_moe", "Qwen3MoeForCausalLM"},
                                          {"olmoe", "OlmoeForCausalLM"},
                                          {"deepseek_v2", "DeepseekV2ForCausalLM"},
                                          {"deepseek_v3", "DeepseekV3ForCausalLM"}};
    cJSON_DeleteItemFromObjectCaseSensitive(j, "architectures");
    cJSON *a = cJSON_AddArrayToObject(j, "architectures");
    for (int i = 0; i < 6; i++)
        if (!strcmp(arch[i][0], family)) cJSON_AddItemToArray(a, cJSON_CreateString(arch[i][1]));
    set_string(j, "model_type", family);
    /* without a source: the trained length, or with YaRN the length it extends the original to
     * (DeepSeek-V3: 4096 x 40 = 163840), which transformers divides by the original again */
    double yarn = c->rope_factor != 1 ? (double)c->rope_factor * c->rope_orig_max_pos : 0;
    if (!source && !cJSON_GetObjectItemCaseSensitive(j, "max_position_embeddings"))
        cJSON_AddNumberToObject(j, "max_position_embeddings", yarn > c->seq_len ? yarn : c->seq_len);
    if (!cJSON_GetObjectItemCaseSensitive(j, "initializer_range"))
        set_float(j, "initializer_range", c->init_std);
    const struct { const char *key; double v; } nums[] = {
        {"vocab_size", c->vocab}, {"hidden_size", c->d}, {"num_hidden_layers", c->n_layers},
        {"num_attention_heads", c->n_heads}, {"num_key_value_heads", c->n_kv_heads},
        {"num_experts_per_tok", m->topk}, {"head_dim", moe_model_head_dim(c)}};
    for (size_t i = 0; i < sizeof nums / sizeof *nums; i++) set_number(j, nums[i].key, nums[i].v);
    set_float(j, "rms_norm_eps", c->norm_eps);
    rope_config(c, family, j);
    set_number(j, mixtral ? "num_local_experts" : "num_experts", m->n_experts);
    /* an expert's width: intermediate_size for Mixtral and OLMoE, else moe_intermediate_size
     * (intermediate_size then being the unused dense width) */
    if (mixtral || !(qwen2 || qwen3)) {
        set_number(j, "intermediate_size", m->ffn);
    } else {
        set_number(j, "moe_intermediate_size", m->ffn);
        set_number(j, "intermediate_size", c->ffn);
        set_number(j, "decoder_sparse_step", 1);
        cJSON_DeleteItemFromObjectCaseSensitive(j, "mlp_only_layers");
        cJSON *dense = cJSON_AddArrayToObject(j, "mlp_only_layers");
        for (int l = 0; dense && l < c->n_layers; l++)
            if (!moe_model_layer_experts(c, l))
                cJSON_AddItemToArray(dense, cJSON_CreateNumber(l));
        set_bool(j, "use_sliding_window", 0);
    }
    if (qwen2) set_number(j, "shared_expert_intermediate_size", m->shared_ffn);
    if (!mixtral) {
        set_bool(j, "norm_topk_prob", moe_hf_renormalised(m));
        if (!qwen2) set_bool(j, "attention_bias", 0);
    }
    set_string(j, "hidden_act", "silu");
    set_bool(j, "tie_word_embeddings", c->tie_embeddings != 0);
    set_string(j, "torch_dtype", "float32");
    if (!strncmp(family, "deepseek_v", 10)) deepseek_config(c, family[10] == '3', j);
    return j;
}

moe_status moe_hf_save(const char *dir, const char *family, moe_model *m, const char *base) {
    const moe_model_config *c = moe_model_get_config(m);
    int qwen2 = !strcmp(family, "qwen2_moe");
    char why[256];
    if (!moe_hf_compatible(c, family, why, sizeof why))
        return moe_set_error(MOE_ERR_INVALID, "cannot write a %s model: %s", family, why);
    if (moe_file_exists(dir, "config.json") || moe_file_exists(dir, "model.safetensors"))
        return moe_set_error(MOE_ERR_INVALID, "%s already holds a model; choose an empty "
                             "directory", dir);
    cJSON *j = NULL;
    char path[4400];
    if (base) {
        MOE_TRY(read_config(base, path, sizeof path, &j));
    } else {
        j = cJSON_CreateObject();
        if (!j) return moe_set_error(MOE_ERR_NOMEM, "out of memory for config.json");
        /* our byte vocabulary: end-of-text 256 ends generation */
        if (c->vocab == MOE_BYTE_VOCAB) cJSON_AddNumberToObject(j, "eos_token_id", MOE_BYTE_EOT);
    }
    moe_status made = moe_mkdirs(dir);
    if (made != MOE_OK) {
        cJSON_Delete(j);
        return made;
    }
    j = family_config(c, family, base != NULL, j);
    char *text = cJSON_Print(j);
    cJSON_Delete(j);
    if (!text) return moe_set_error(MOE_ERR_NOMEM, "out of memory for config.json");
    int n = moe_model_n_tensors(m), total = n + 4 * c->n_layers;
    moe_st_entry *e = calloc((size_t)total, sizeof *e);
    char (*names)[160] = calloc((size_t)total, sizeof *names);
    float *zeros = calloc((size_t)c->d, sizeof *zeros);
    moe_status s = e && names && zeros ? MOE_OK : moe_set_error(MOE_ERR_NOMEM, "out of memory");
    const float *p = moe_model_params(m);
    for (int i = 0; s == MOE_OK && i < n; i++) {
        const moe_tensor_info *t = moe_model_tensor(m, i);
        moe_hf_tensor_name(family, t->name, names[i], sizeof names[i]);
        e[i] = (moe_st_entry){names[i], MOE_DT_F32, t->ndim, {0}, p + t->offset};
        memcpy(e[i].shape, t->shape, sizeof(int64_t) * (size_t)t->ndim);
    }
    /* DeepSeek-V3: each MoE layer's selection bias as e_score_correction_bias */
    for (int l = 0; s == MOE_OK && !strcmp(family, "deepseek_v3") && l < c->n_layers; l++) {
        moe_layer *ml = moe_model_moe_layer(m, l);
        if (!ml) continue;
        snprintf(names[n], sizeof names[n], "model.layers.%d.mlp.gate.e_score_correction_bias", l);
        e[n] = (moe_st_entry){names[n], MOE_DT_F32, 1, {moe_model_layer_experts(c, l)},
                              moe_layer_expert_bias(ml)};
        n++;
    }
    /* Qwen2-MoE without a shared expert: Hugging Face's class has one of width 0 (config 0)
     * and its gate; their tensors, empty and zero, make the checkpoint complete */
    static const char *const empty[] = {"shared_expert.gate_proj", "shared_expert.up_proj",
                                        "shared_expert.down_proj", "shared_expert_gate"};
    const int64_t rows[] = {0, 0, c->d, 1}, cols[] = {c->d, c->d, 0, c->d};
    for (int l = 0; s == MOE_OK && qwen2 && !c->moe.shared_ffn && l < c->n_layers; l++)
        for (int i = 0; i < 4 && moe_model_layer_experts(c, l); i++, n++) {
            snprintf(names[n], sizeof names[n], "model.layers.%d.mlp.%s.weight", l, empty[i]);
            e[n] = (moe_st_entry){names[n], MOE_DT_F32, 2, {rows[i], cols[i]}, zeros};
        }
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    const char *keys[] = {"format"}, *vals[] = {"pt"};
    if (s == MOE_OK) s = moe_st_write(path, e, n, keys, vals, 1);
    snprintf(path, sizeof path, "%s/config.json", dir);
    const void *parts[] = {text, "\n"};
    size_t sizes[] = {strlen(text), 1};
    if (s == MOE_OK) s = moe_write_atomic(path, parts, sizes, 2);
    free(text), free(e), free(names), free(zeros);
    return s;
}
