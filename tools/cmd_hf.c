/* Models in the Hugging Face layout (io/hf): moe eval and generate --model, moe convert,
 * moe inspect DIR. */
#include "tools/cli.h"

#include "core/core.h"
#include "io/data.h"
#include "io/gguf.h"
#include "io/hf.h"
#include "io/tokenizer.h"
#include "train/trainer.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* Parses "5,17,42" into ids below vocab; returns the count (0 with an error set on failure). */
static int parse_ids(const char *text, int vocab, int32_t **out) {
    int cap = 1;
    for (const char *p = text; *p; p++) cap += *p == ',';
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)cap);
    int n = 0;
    const char *p = text;
    while (ids && *p) { /* digits, spaces around them, commas between: "1,2", "1, 2" */
        char *end;
        while (*p == ' ') p++;
        errno = 0;
        long v = isdigit((unsigned char)*p) ? strtol(p, &end, 10) : -1;
        while (v >= 0 && *end == ' ') end++;
        if (v < 0 || errno || v >= vocab || (*end && (*end != ',' || !end[1]))) {
            moe_set_error(MOE_ERR_INVALID, "--ids: \"%.20s\" is not a token id below the "
                          "vocabulary size %d", p, vocab);
            free(ids);
            return 0;
        }
        ids[n++] = (int32_t)v;
        p = *end ? end + 1 : end;
    }
    if (!n) moe_set_error(MOE_ERR_INVALID, "--ids: no token ids");
    if (!n) free(ids);
    *out = n ? ids : NULL;
    return n;
}

/* NumPy .npy, version 1.0: magic, header length, a Python dict padded to 64 bytes, data. */
static moe_status write_npy(const char *path, const float *x, int rows, int cols) {
    char header[128];
    int n = snprintf(header, sizeof header, "{'descr': '<f4', 'fortran_order': False, "
                     "'shape': (%d, %d), }", rows, cols);
    int total = 10 + n + 1, pad = (64 - total % 64) % 64;
    memset(header + n, ' ', (size_t)pad);
    header[n + pad] = '\n';
    unsigned short hlen = (unsigned short)(n + pad + 1);
    FILE *f = fopen(path, "wb");
    if (!f) return moe_set_error(MOE_ERR_IO, "%s: %s", path, strerror(errno));
    unsigned char pre[10] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, (unsigned char)(hlen & 0xff),
                             (unsigned char)(hlen >> 8)};
    int ok = fwrite(pre, 1, 10, f) == 10 && fwrite(header, 1, hlen, f) == hlen &&
             fwrite(x, sizeof(float), (size_t)rows * cols, f) == (size_t)rows * cols;
    ok = (fclose(f) == 0) && ok;
    return ok ? MOE_OK : moe_set_error(MOE_ERR_IO, "%s: write failed", path);
}

/* The tokenizer.json text of a model (*text NULL, MOE_OK, when it has none): the directory's
 * file, or a GGUF file's vocabulary. */
static moe_status tokenizer_text(const char *model, char **text, size_t *len) {
    *text = NULL;
    if (moe_gguf_is_file(model)) {
        moe_gguf *g;
        MOE_TRY(moe_gguf_open(model, &g));
        moe_status s = moe_gguf_tokenizer_json(g, text);
        moe_gguf_close(g);
        if (s == MOE_OK && *text) *len = strlen(*text);
        return s;
    }
    char path[MOE_PATH_MAX + 32];
    snprintf(path, sizeof path, "%s/tokenizer.json", model);
    return moe_file_exists(model, "tokenizer.json") ? moe_read_file(path, text, len) : MOE_OK;
}

moe_status moe_cli_load_tokenizer(const char *dir, moe_tokenizer **t) {
    if (moe_gguf_is_file(dir)) {
        char *text;
        size_t len;
        MOE_TRY(tokenizer_text(dir, &text, &len));
        if (!text)
            return moe_set_error(MOE_ERR_INVALID, "%s has no vocabulary (tokenizer.ggml.model "
                                 "none): give token ids with --ids", dir);
        moe_status s = moe_tokenizer_parse(text, len, dir, t);
        free(text);
        return s;
    }
    char path[MOE_PATH_MAX + 32];
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    struct stat sb; /* a missing directory is not one without a tokenizer.json */
    if (stat(dir, &sb)) return moe_set_error(MOE_ERR_IO, "%s: %s", dir, strerror(errno));
    if (!S_ISDIR(sb.st_mode)) return moe_set_error(MOE_ERR_IO, "%s is not a directory", dir);
    if (access(path, R_OK))
        return moe_set_error(MOE_ERR_INVALID, "%s has no tokenizer.json: give token ids with "
                             "--ids", dir);
    return moe_tokenizer_load(path, t);
}

/* The ids of --prompt or --prompt-file (with the tokenizer's special tokens), each below the
 * model's vocabulary, *n of them. */
static moe_status encode_prompt(const moe_tokenizer *t, const moe_options *o, int vocab,
                                int32_t **ids, int *n) {
    char *text;
    size_t len;
    *n = 0, *ids = NULL;
    MOE_TRY(moe_cli_prompt(o, &text, &len));
    moe_status s = moe_tokenizer_encode(t, text ? text : "", len, 1, ids, n);
    free(text);
    for (int i = 0; s == MOE_OK && i < *n; i++)
        if ((*ids)[i] >= vocab)
            s = moe_set_error(MOE_ERR_INVALID, "the tokenizer gave id %d, beyond the model's "
                              "vocabulary of %d", (*ids)[i], vocab);
    if (s == MOE_OK && !*n)
        s = moe_set_error(MOE_ERR_INVALID, "%s: no tokens (the tokenizer adds none to an empty "
                          "text)", o->prompt_file[0] ? "--prompt-file" : "--prompt");
    if (s != MOE_OK) free(*ids), *ids = NULL, *n = 0;
    return s;
}

/* The options of `moe CMD --model DIR (--ids ... | --prompt TEXT)`, the model's configuration
 * and the ids (*n = 0 without either, where data may stand instead; *tok: the tokenizer with
 * --prompt, else NULL). Returns an exit code (0: go on; the caller frees *ids and *tok). */
static int hf_prepare(const char *cmd, int argc, char **argv, moe_options *o, moe_model_config *c,
                      char *family, size_t cap, int32_t **ids, int *n, moe_tokenizer **tok) {
    moe_options_default(o);
    *n = 0, *ids = NULL, *tok = NULL;
    if (moe_options_parse_args(o, argc, argv, moe_cli_use(cmd)) != MOE_OK) {
        fprintf(stderr, "moe %s: %s\n", cmd, moe_last_error());
        return 2;
    }
    if (moe_cli_cpu_only(o, strcmp(cmd, "eval") ? "generate --model" : "eval --model") ||
        moe_cli_hf_flags(o, cmd))
        return 2;
    int eval = !strcmp(cmd, "eval"), data = eval && o->data_path[0];
    int text = moe_options_given(o, "prompt") || o->prompt_file[0];
    char flag[140];
    const char *why = NULL;
    if (o->ids[0] && text) why = "give --ids or --prompt, not both";
    else if (!o->ids[0] && !text && !data)
        why = eval ? "--model needs one of --ids, --prompt (--prompt-file) or --data FILE"
                   : "--model needs one of --ids or --prompt (--prompt-file)";
    else if ((o->ids[0] || text) && eval && moe_options_flag(argc, argv, "data-path", flag,
                                                             sizeof flag))
        why = "give --data or --ids/--prompt, not both";
    else if (!o->ids[0] && !text && o->dump_logits[0])
        why = "--dump-logits writes the logits of --ids or --prompt, not of --data";
    else if (eval && moe_options_flag(argc, argv, "micro-batch-size", flag, sizeof flag))
        why = "--micro-batch-size is for eval --load: eval --model runs one sequence at a time";
    else if (eval && !data && moe_options_flag(argc, argv, "seq-length", flag, sizeof flag))
        why = "--seq-length is the window of eval --model --data (and of generate --model): "
              "eval's sequence of --ids or --prompt sets its own";
    if (why) {
        fprintf(stderr, "moe %s: %s\n", cmd, why);
        return 2;
    }
    moe_cli_threads(o);
    if (moe_hf_config(o->hf_model, c, family, cap) != MOE_OK ||
        (text && moe_cli_load_tokenizer(o->hf_model, tok) != MOE_OK)) {
        fprintf(stderr, "moe %s: %s\n", cmd, moe_last_error());
        return 1;
    }
    moe_clear_error();
    moe_status s = MOE_OK;
    if (o->ids[0] && !(*n = parse_ids(o->ids, c->vocab, ids))) s = MOE_ERR_INVALID;
    if (text) s = encode_prompt(*tok, o, c->vocab, ids, n);
    if (s != MOE_OK) {
        fprintf(stderr, "moe %s: %s\n", cmd, moe_last_error());
        moe_tokenizer_free(*tok);
        *tok = NULL;
        return s == MOE_ERR_IO || s == MOE_ERR_NOMEM ? 1 : 2; /* bad input: 2 */
    }
    return 0;
}

/* moe eval --model DIR --data FILE: mean loss over the file's windows of --seq-length tokens
 * (at most the model's positions), one sequence per forward. */
static int eval_hf_data(const moe_options *o, moe_model_config *c, const char *family) {
    moe_tokens data = {0};
    moe_model *m = NULL;
    int32_t *tok = NULL, *tgt = NULL;
    int S = o->model.seq_len < c->seq_len ? o->model.seq_len : c->seq_len, rc = 1;
    moe_status s = moe_tokens_load(o->data_path, &data);
    if (s == MOE_OK && data.n_tokens < 2)
        s = moe_set_error(MOE_ERR_INVALID, "%s: fewer than 2 tokens", o->data_path);
    if (s == MOE_OK && data.n_tokens - 1 < S) S = (int)(data.n_tokens - 1);
    c->seq_len = S;
    if (s == MOE_OK) s = moe_trainer_check_data(c, &data, NULL);
    if (s == MOE_OK) s = moe_model_create_inference(c, S, &m);
    if (s == MOE_OK) s = moe_hf_load(o->hf_model, family, m);
    tok = malloc(sizeof(int32_t) * (size_t)S), tgt = malloc(sizeof(int32_t) * (size_t)S);
    if (s == MOE_OK && (!tok || !tgt)) s = moe_set_error(MOE_ERR_NOMEM, "out of memory");
    double sum = 0;
    int64_t count = 0, windows = s == MOE_OK ? (data.n_tokens - 1) / S : 0;
    moe_model_args args = moe_model_args_default();
    args.training = 0;
    for (int64_t w = 0; s == MOE_OK && w < windows; w++) {
        for (int i = 0; i < S; i++) {
            tok[i] = (int32_t)moe_tokens_at(&data, w * S + i);
            tgt[i] = (int32_t)moe_tokens_at(&data, w * S + i + 1);
        }
        moe_model_loss L;
        s = moe_model_forward(m, tok, tgt, 1, S, &args, &L);
        sum += L.nll * L.n_targets;
        count += L.n_targets;
    }
    if (s == MOE_OK) {
        double nll = count ? sum / (double)count : 0;
        printf("eval %s (%s) on %s: %lld tokens in windows of %d, loss %.4f nats/token, "
               "perplexity %.3f, %d threads\n", o->hf_model, family, o->data_path,
               (long long)count, S, nll, exp(nll), omp_get_max_threads());
        rc = 0;
    } else {
        fprintf(stderr, "moe eval: %s\n", moe_last_error());
    }
    free(tok), free(tgt);
    moe_model_destroy(m);
    moe_tokens_free(&data);
    return rc;
}

int moe_cmd_eval_hf(int argc, char **argv) {
    moe_options o;
    moe_model_config c;
    char family[32];
    int32_t *ids = NULL, *tgt = NULL;
    moe_tokenizer *tok = NULL;
    int n = 0, rc = hf_prepare("eval", argc, argv, &o, &c, family, sizeof family, &ids, &n, &tok);
    if (rc) return rc;
    moe_tokenizer_free(tok);
    if (!n) return eval_hf_data(&o, &c, family);
    if (n < 2) { /* a loss needs a target */
        fprintf(stderr, "moe eval: --model needs a sequence of at least two tokens, got one\n");
        free(ids);
        return 2;
    }
    rc = 1;
    moe_model *m = NULL;
    c.seq_len = n; /* the positions of this sequence (config.json's may be far more) */
    tgt = malloc(sizeof(int32_t) * (size_t)n);
    for (int i = 0; tgt && i < n; i++) tgt[i] = i + 1 < n ? ids[i + 1] : -1;
    moe_model_args args = moe_model_args_default();
    args.training = 0;
    moe_model_loss L;
    if (!tgt || moe_model_create_inference(&c, n, &m) != MOE_OK ||
        moe_hf_load(o.hf_model, family, m) != MOE_OK ||
        moe_model_forward(m, ids, tgt, 1, n, &args, &L) != MOE_OK) {
        fprintf(stderr, "moe eval: %s\n", moe_last_error());
        goto done;
    }
    if (o.dump_logits[0] && write_npy(o.dump_logits, moe_model_logits(m), n, c.vocab) != MOE_OK) {
        fprintf(stderr, "moe eval: %s\n", moe_last_error());
        goto done;
    }
    printf("eval %s (%s, %zu parameters) on %d tokens: loss %.4f nats/token over %d targets, %d "
           "threads%s%s\n", o.hf_model, family, moe_model_param_count(m), n, L.nll, L.n_targets,
           omp_get_max_threads(), o.dump_logits[0] ? ", logits in " : "", o.dump_logits);
    rc = 0;
done:
    moe_model_destroy(m);
    free(ids);
    free(tgt);
    return rc;
}

/* The tokenizer of the converted model into out: from a model directory its tokenizer files
 * (*copied of them); for our checkpoints a tokenizer.json of the byte vocabulary when the
 * model's vocabulary is moe prepare's bytes (*copied 1), else none: a run of another
 * vocabulary started from a model or trained on its tokens, whose tokenizer we do not have. */
static const char *const tokenizer_files[] = {"tokenizer.json", "tokenizer_config.json",
                                              "special_tokens_map.json", "generation_config.json"};
static moe_status copy_tokenizer(const char *model_dir, int vocab, const char *out,
                                 int *copied) {
    char from[MOE_PATH_MAX + 32], to[MOE_PATH_MAX + 32];
    *copied = 0;
    if (!model_dir[0]) {
        if (vocab != MOE_BYTE_VOCAB) return MOE_OK;
        snprintf(to, sizeof to, "%s/tokenizer.json", out);
        *copied = 1;
        return moe_tokenizer_write_bytes(to);
    }
    if (moe_gguf_is_file(model_dir)) { /* its vocabulary, when it has one */
        char *text;
        size_t len;
        MOE_TRY(tokenizer_text(model_dir, &text, &len));
        snprintf(to, sizeof to, "%s/tokenizer.json", out);
        const void *parts[] = {text};
        moe_status s = text ? moe_write_atomic(to, parts, &len, 1) : MOE_OK;
        *copied = text != NULL;
        free(text);
        return s;
    }
    for (size_t i = 0; i < sizeof tokenizer_files / sizeof *tokenizer_files; i++) {
        const char *name = tokenizer_files[i];
        snprintf(from, sizeof from, "%s/%s", model_dir, name);
        snprintf(to, sizeof to, "%s/%s", out, name);
        if (!moe_file_exists(model_dir, name)) continue;
        char *data;
        size_t len;
        MOE_TRY(moe_read_file(from, &data, &len));
        const void *parts[] = {data};
        moe_status s = moe_write_atomic(to, parts, &len, 1);
        free(data);
        MOE_TRY(s);
        (*copied)++;
    }
    return MOE_OK;
}

/* The last part of a path without a trailing slash (a model's or run's name). */
static void base_name(const char *path, char *out, size_t cap) {
    size_t n = strlen(path);
    while (n > 1 && path[n - 1] == '/') n--;
    size_t b = n;
    while (b > 0 && path[b - 1] != '/') b--;
    snprintf(out, cap, "%.*s", (int)(n - b), path + b);
}

/* moe convert ... --to gguf OUT.gguf: the model m of family (from o's --model or a run) as
 * llama.cpp's file; positions: the model's. */
static int convert_gguf(const moe_options *o, moe_model *m, const char *family, int positions,
                        const char *out, int type) {
    const moe_model_config *c = moe_model_get_config(m);
    char tok[MOE_PATH_MAX + 32], name[256];
    int32_t eos[64];
    moe_gguf_meta meta = {name, positions, NULL, 0, tok, eos, 0, (moe_gguf_type)type};
    base_name(o->hf_model[0] ? o->hf_model : o->load, name, sizeof name);
    moe_status s = MOE_OK;
    char *json = NULL;
    size_t len;
    if (o->hf_model[0]) {
        snprintf(tok, sizeof tok, "%s%s", o->hf_model,
                 moe_gguf_is_file(o->hf_model) ? "" : "/tokenizer.json");
        s = tokenizer_text(o->hf_model, &json, &len);
        meta.tokenizer_json = json;
        if (s == MOE_OK) s = moe_hf_eos(o->hf_model, 1, eos, 64, &meta.n_eos);
    } else {
        meta.bytes = c->vocab == MOE_BYTE_VOCAB;
    }
    if (s == MOE_OK) s = moe_gguf_save(out, family, m, &meta);
    free(json);
    if (s != MOE_OK) {
        fprintf(stderr, "moe convert: %s\n", moe_last_error());
        return 1;
    }
    printf("wrote %s (llama.cpp's %s, %s, %zu parameters)", out, moe_gguf_arch(family),
           moe_gguf_type_name((moe_gguf_type)type), moe_model_param_count(m));
    if (meta.tokenizer_json || meta.bytes)
        printf(", the vocabulary of %s\n", meta.bytes ? "bytes" : tok);
    else
        printf("; no tokenizer.json, so no vocabulary: llama.cpp runs it on token ids\n");
    return 0;
}

/* moe convert (--load RUN | --model DIR) (--to hf OUT_DIR | --to gguf OUT.gguf [--outtype
 * f32|f16|bf16|q8_0]) */
int moe_cmd_convert(int argc, char **argv) {
    const char *to = NULL, *out = NULL, *outtype = "f32";
    char **rest = malloc(sizeof(char *) * (size_t)(argc + 1));
    int n = 0;
    for (int a = 0; rest && a < argc; a++) {
        if (!strcmp(argv[a], "--outtype")) {
            outtype = a + 1 < argc ? argv[++a] : "";
        } else if (!strcmp(argv[a], "--to")) {
            to = a + 1 < argc ? argv[++a] : NULL;
            out = a + 1 < argc && strncmp(argv[a + 1], "--", 2) ? argv[++a] : NULL;
        } else {
            rest[n++] = argv[a];
        }
    }
    int gguf = to && !strcmp(to, "gguf"), type = moe_gguf_type_of(outtype);
    if (!rest || !to || (!gguf && strcmp(to, "hf")) || !out || type < 0 ||
        (!gguf && type != MOE_GGUF_F32)) {
        fprintf(stderr, "moe convert: usage: moe convert (--load RUN | --model DIR) (--to hf "
                        "OUT_DIR | --to gguf OUT.gguf [--outtype f32|f16|bf16|q8_0])\n");
        free(rest);
        return 2;
    }
    moe_options o;
    char ckpt[MOE_PATH_MAX + 64], family[32] = "";
    moe_model *m = NULL;
    int rc = moe_cli_options(&o, "convert", n, rest, ckpt, sizeof ckpt);
    free(rest);
    if (rc) {
        fprintf(stderr, "moe convert: %s\n", moe_last_error());
        return rc;
    }
    if (moe_cli_cpu_only(&o, "convert") || moe_cli_hf_flags(&o, "convert")) return 2;
    moe_model_config c = o.model;
    moe_status s = MOE_OK;
    struct stat sb;
    if (gguf && stat(out, &sb) == 0) {
        fprintf(stderr, "moe convert: %s already exists: write the GGUF file to a new path\n", out);
        return 2;
    }
    const char *run = gguf ? NULL : moe_checkpoint_run_marker(out);
    if (run) { /* a model there would hide the run's checkpoints from --load */
        fprintf(stderr, "moe convert: %s holds a moe run or checkpoint (%s): write the Hugging "
                        "Face model to a directory of its own\n", out, run);
        return 2;
    }
    /* the files a conversion writes: none may be there already (a model's, or tokenizer files
     * that would be overwritten or left beside a model they do not belong to) */
    const char *model_files[] = {"config.json", "model.safetensors",
                                 "model.safetensors.index.json"};
    for (size_t i = 0; !gguf && i < 3 + sizeof tokenizer_files / sizeof *tokenizer_files; i++) {
        const char *f = i < 3 ? model_files[i] : tokenizer_files[i - 3];
        if (moe_file_exists(out, f)) {
            fprintf(stderr, "moe convert: %s already holds %s%s: write the Hugging Face model to "
                    "an empty directory\n", out, i < 3 ? "a model, " : "", f);
            return 2;
        }
    }
    if (o.hf_model[0]) s = moe_hf_config(o.hf_model, &c, family, sizeof family);
    else if (!ckpt[0]) {
        fprintf(stderr, "moe convert: --load RUN or --model DIR is required\n");
        return 2;
    }
    if (s == MOE_OK && !family[0]) { /* ours: the first family that fits */
        char why[2048];
        const char *f = moe_hf_family_for(&c, why, sizeof why);
        if (!f) {
            fprintf(stderr, "moe convert: no Hugging Face family takes this model: %s\n", why);
            return 2;
        }
        snprintf(family, sizeof family, "%s", f);
    }
    char why[256];
    if (s == MOE_OK && gguf && !moe_gguf_compatible(&c, family, why, sizeof why)) {
        fprintf(stderr, "moe convert: cannot write llama.cpp's GGUF of this %s model: %s\n",
                family, why);
        return 2;
    }
    /* a model directory's positions plan no memory here (its config.json keeps them) */
    int positions = c.seq_len;
    if (o.hf_model[0] && c.seq_len > MOE_HF_WINDOW) c.seq_len = MOE_HF_WINDOW;
    if (s == MOE_OK) s = moe_model_create_inference(&c, 1, &m);
    if (s == MOE_OK)
        s = o.hf_model[0] ? moe_hf_load(o.hf_model, family, m)
                          : moe_checkpoint_load(ckpt, m, NULL, 0);
    if (s == MOE_OK && gguf) {
        rc = convert_gguf(&o, m, family, positions, out, type);
        moe_model_destroy(m);
        return rc;
    }
    if (s == MOE_OK) s = moe_hf_save(out, family, m, o.hf_model[0] ? o.hf_model : NULL);
    int copied = 0;
    if (s == MOE_OK) s = copy_tokenizer(o.hf_model, c.vocab, out, &copied);
    if (s == MOE_OK) {
        printf("wrote %s/config.json and %s/model.safetensors (%s, %zu parameters)", out, out,
               family, moe_model_param_count(m));
        if (o.hf_model[0])
            fputs(copied ? ", the tokenizer files\n" : "; no tokenizer.json to copy\n", stdout);
        else if (copied) fputs(", tokenizer.json (bytes)\n", stdout);
        else printf("; the run's vocabulary of %d tokens is not moe prepare's bytes, so no "
                    "tokenizer.json: copy the tokenizer files of the model it started from into "
                    "%s\n", c.vocab, out);
    } else {
        fprintf(stderr, "moe convert: %s\n", moe_last_error());
    }
    moe_model_destroy(m);
    return s == MOE_OK ? 0 : 1;
}

/* moe inspect DIR (with config.json): the family, shape, expert layout and parameter counts. */
int moe_cli_inspect_hf(const char *dir) {
    moe_model_config c;
    char family[32];
    moe_tensor_info *t = NULL;
    int n = 0;
    if (moe_hf_config(dir, &c, family, sizeof family) != MOE_OK ||
        moe_model_full_tensors(&c, &t, &n) != MOE_OK) {
        fprintf(stderr, "moe inspect: %s\n", moe_last_error());
        return 1;
    }
    double total = 0, experts = 0;
    for (int i = 0; i < n; i++) {
        total += (double)t[i].numel;
        if (t[i].expert) experts += (double)t[i].numel;
    }
    free(t);
    int moe_layers = 0;
    for (int l = 0; l < c.n_layers; l++) moe_layers += moe_model_layer_experts(&c, l) > 0;
    double active = total - experts + experts * c.moe.topk / c.moe.n_experts;
    printf("%s: %s %s model, %d layers (%d MoE), d=%d, %d heads (%d key/value), "
           "vocab %d, %s embeddings\n", dir, moe_gguf_is_file(dir) ? "GGUF (llama.cpp)"
           : "Hugging Face", family, c.n_layers, moe_layers, c.d, c.n_heads,
           c.n_kv_heads, c.vocab, c.tie_embeddings ? "tied" : "untied");
    printf("experts: %d per MoE layer, top-%d, hidden size %d; parameters %.0f (%.2f M), in "
           "routed experts %.0f, active per token %.0f (%.2f M)\n", c.moe.n_experts, c.moe.topk,
           c.moe.ffn, total, 1e-6 * total, experts, active, 1e-6 * active);
    moe_gguf *g;
    if (moe_gguf_is_file(dir) && moe_gguf_open(dir, &g) == MOE_OK) {
        char types[512];
        moe_gguf_describe(g, types, sizeof types);
        printf("%s\n", types);
        moe_gguf_close(g);
    }
    return 0;
}

/* Prints a new token's id, after a comma but for the first (ctx: the ids printed so far). */
static void emit_id(void *ctx, int32_t token) {
    int *printed = ctx;
    printf("%s%d", *printed ? "," : "", token);
    (*printed)++;
}

/* Tokens per forward of moe generate --model at least (a prompt's, or a slid window's) */
#define MIN_CHUNK 1024

/* moe generate --model DIR (--ids 5,17,42 | --prompt TEXT) [--max-new-tokens N ...]: the
 * continuation's ids, or with --prompt the text of prompt and continuation (KV cache;
 * --temperature 0 is greedy; stops after config.json's eos_token_id). */
int moe_cmd_generate_hf(int argc, char **argv) {
    moe_options o;
    moe_model_config c;
    char family[32];
    int32_t *ids = NULL, eos[64];
    moe_tokenizer *tok = NULL;
    int n = 0, rc = hf_prepare("generate", argc, argv, &o, &c, family, sizeof family, &ids, &n,
                               &tok);
    if (rc) return rc;
    /* stdout is the text or the ids alone: the thread count asked for goes to stderr */
    if (o.threads) fprintf(stderr, "moe generate: %d threads\n", omp_get_max_threads());
    rc = 1;
    int n_eos = 0, total = n + o.max_new_tokens, positions = c.seq_len;
    /* the window: config.json's positions, at most MOE_HF_WINDOW unless --seq-length asks (the
     * memory of the cache and the attention grows with it); past it, the window slides as
     * moe generate --load's past its sequence length; the prompt's forward in one call (up to
     * the window), a slid window's again in calls of at most that many tokens */
    char flag[140];
    int asked = moe_options_flag(argc, argv, "seq-length", flag, sizeof flag) != NULL;
    int window = asked ? o.model.seq_len : MOE_HF_WINDOW;
    c.seq_len = window < positions ? window : positions;
    if (total > c.seq_len && c.seq_len < positions)
        fprintf(stderr, "moe generate: the window of %d positions slides past them, before "
                "max_position_embeddings (%d): --seq-length sets it\n", c.seq_len, positions);
    int max_chunk = n < MIN_CHUNK ? MIN_CHUNK : n;
    max_chunk = max_chunk < c.seq_len ? max_chunk : c.seq_len;
    moe_model *m = NULL;
    int32_t *seq = realloc(ids, sizeof(int32_t) * (size_t)total);
    moe_status s = seq ? moe_hf_eos(o.hf_model, 1, eos, 64, &n_eos)
                       : moe_set_error(MOE_ERR_NOMEM, "out of memory");
    if (s == MOE_OK) s = moe_model_create_inference(&c, max_chunk, &m);
    if (seq) ids = seq;
    if (s == MOE_OK) s = moe_hf_load(o.hf_model, family, m);
    int len = n, printed = 0;
    moe_cli_sampling sp = {o.temperature, o.top_k, o.top_p, o.layer.seed, NULL};
    if (s == MOE_OK)
        s = moe_cli_continue(m, ids, &len, o.max_new_tokens, max_chunk, &sp, eos, n_eos,
                             tok ? NULL : emit_id, &printed);
    char *text = NULL;
    size_t text_len = 0;
    if (s == MOE_OK && tok) s = moe_tokenizer_decode(tok, ids, len, 1, &text, &text_len);
    if (s == MOE_OK && tok) fwrite(text, 1, text_len, stdout);
    if (s == MOE_OK && (tok || len > n)) printf("\n");
    if (s == MOE_OK) rc = 0;
    else fprintf(stderr, "moe generate: %s\n", moe_last_error());
    free(text);
    moe_model_destroy(m);
    moe_tokenizer_free(tok);
    free(ids);
    return rc;
}

/* moe tokenize --model DIR (--prompt TEXT | --ids 5,17,42): the ids of a text (with the
 * tokenizer's special tokens), or the text of ids (exact bytes, then a newline). */
int moe_cmd_tokenize(int argc, char **argv) {
    moe_options o;
    moe_options_default(&o);
    if (moe_options_parse_args(&o, argc, argv, moe_cli_use("tokenize")) != MOE_OK) {
        fprintf(stderr, "moe tokenize: %s\n", moe_last_error());
        return 2;
    }
    int encode = moe_options_given(&o, "prompt") || o.prompt_file[0];
    if (!o.hf_model[0] || !o.ids[0] == !encode) {
        fprintf(stderr, "moe tokenize: usage: moe tokenize --model DIR (--prompt TEXT | "
                        "--prompt-file FILE | --ids 5,17,42)\n");
        return 2;
    }
    moe_tokenizer *t = NULL;
    int32_t *ids = NULL;
    int n = 0;
    char *text = NULL; /* the prompt, or the decoded ids */
    size_t len = 0;
    moe_status s = moe_cli_load_tokenizer(o.hf_model, &t);
    if (s == MOE_OK && encode) s = moe_cli_prompt(&o, &text, &len);
    /* text that does not encode (not UTF-8) is bad input, as in generate and eval --model */
    int bad_text = s == MOE_OK && encode &&
                   moe_tokenizer_encode(t, text ? text : "", len, 1, &ids, &n) != MOE_OK;
    if (bad_text) s = MOE_ERR_INVALID;
    for (int i = 0; s == MOE_OK && encode && i < n; i++) printf("%s%d", i ? "," : "", ids[i]);
    if (s == MOE_OK && o.ids[0] && !(n = parse_ids(o.ids, moe_tokenizer_size(t), &ids)))
        s = MOE_ERR_INVALID;
    if (s == MOE_OK && o.ids[0]) s = moe_tokenizer_decode(t, ids, n, 0, &text, &len);
    if (s == MOE_OK && o.ids[0]) fwrite(text, 1, len, stdout);
    if (s == MOE_OK) printf("\n");
    else fprintf(stderr, "moe tokenize: %s\n", moe_last_error());
    free(text);
    free(ids);
    moe_tokenizer_free(t);
    return s == MOE_OK ? 0 : s == MOE_ERR_INVALID ? 2 : 1;
}
