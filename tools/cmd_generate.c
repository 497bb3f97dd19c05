/* moe generate, moe eval, moe inspect. */
#define _POSIX_C_SOURCE 200809L
#include "tools/cli.h"

#include "core/core.h"
#include "io/data.h"
#include "io/gguf.h"
#include "io/safetensors.h"
#include "train/trainer.h"

#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

moe_status moe_cli_logits_error(int token) {
    return moe_set_error(MOE_ERR_STATE, "the logits of new token %d are not finite (NaN, +inf "
                         "or all -inf): no token can be drawn (a corrupt checkpoint?)", token + 1);
}

moe_status moe_cli_prompt(const moe_options *o, char **text, size_t *len) {
    *text = NULL, *len = 0;
    int prompt = o->prompt[0] || moe_options_given(o, "prompt"); /* "" given is a prompt too */
    if (prompt && o->prompt_file[0])
        return moe_set_error(MOE_ERR_INVALID, "give --prompt or --prompt-file, not both");
    char *file = NULL;
    if (o->prompt_file[0]) MOE_TRY(moe_read_file(o->prompt_file, &file, len));
    else if (prompt) *len = strlen(o->prompt);
    else return MOE_OK;
    *text = malloc(*len + 1);
    if (*text) memcpy(*text, file ? file : o->prompt, *len), (*text)[*len] = '\0';
    free(file);
    return *text ? MOE_OK : moe_set_error(MOE_ERR_NOMEM, "out of memory");
}

moe_status moe_cli_continue(moe_model *m, int32_t *ids, int *n, int n_new, int max_chunk,
                            const moe_cli_sampling *sp, const int32_t *stop, int n_stop,
                            void (*emit)(void *ctx, int32_t token), void *ctx) {
    const moe_model_config *c = moe_model_get_config(m);
    int len = *n, fed = 0, start = 0; /* ids[start..fed) are in the cache */
    uint64_t stream = moe_rng_stream(MOE_RNG_SAMPLE, 0, 0, 0);
    moe_status st = MOE_OK;
    moe_model_reset_cache(m);
    for (int i = 0, done = 0; i < n_new && !done; i++) {
        if (len - start > c->seq_len) { /* slide: keep the last half window (one token at least) */
            start = len - (c->seq_len > 1 ? c->seq_len / 2 : 1);
            moe_model_reset_cache(m);
            fed = start;
        }
        int chunk = 0;
        while (fed < len && st == MOE_OK) {
            chunk = len - fed < max_chunk ? len - fed : max_chunk;
            st = moe_model_decode(m, ids + fed, chunk);
            fed += chunk;
        }
        if (st != MOE_OK) break;
        const float *lg = moe_model_logits(m) + (size_t)(chunk - 1) * c->vocab;
        int next = moe_sample(lg, c->vocab, sp->temperature, sp->top_k, sp->top_p,
                              moe_rng_uniform64(sp->seed, stream, (uint64_t)i));
        if (sp->agree && (st = moe_comm_bcast(sp->agree, &next, sizeof next, 0)) != MOE_OK) break;
        if (next < 0) {
            st = moe_cli_logits_error(i);
            break;
        }
        ids[len++] = next;
        if (emit) emit(ctx, next);
        for (int e = 0; e < n_stop; e++) done |= next == stop[e];
    }
    *n = len;
    return st;
}

/* A byte of the continuation to the stream ctx (the end-of-text byte is not text). */
static void emit_byte(void *ctx, int32_t token) {
    if (token == MOE_BYTE_EOT) return;
    fputc(token, (FILE *)ctx);
    fflush((FILE *)ctx);
}

moe_status moe_cli_generate(moe_model *m, const char *prompt, size_t len, int n_new,
                            const moe_cli_sampling *sp, FILE *f) {
    const moe_model_config *c = moe_model_get_config(m);
    if (c->vocab != MOE_BYTE_VOCAB)
        return moe_set_error(MOE_ERR_INVALID, "the model's vocabulary has %d tokens, not moe "
                             "prepare's %d bytes: convert it (moe convert --load RUN --to hf DIR), "
                             "put its tokenizer.json there and use moe generate --model DIR",
                             c->vocab, MOE_BYTE_VOCAB);
    if (len > (size_t)INT32_MAX - (size_t)n_new - 1)
        return moe_set_error(MOE_ERR_INVALID, "prompt of %zu bytes is too long", len);
    int n = 0, cap = (int)len + n_new + 1;
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)cap);
    if (!ids) return moe_set_error(MOE_ERR_NOMEM, "out of memory");
    for (size_t p = 0; p < len; p++) ids[n++] = (unsigned char)prompt[p]; /* NUL is a byte too */
    fwrite(prompt, 1, len, f);
    if (n == 0) ids[n++] = MOE_BYTE_EOT; /* an empty prompt starts a document */
    const int32_t eot = MOE_BYTE_EOT;
    moe_status st = moe_cli_continue(m, ids, &n, n_new, c->seq_len, sp, &eot, 1, emit_byte, f);
    fputc('\n', f);
    free(ids);
    return st;
}

/* Model from --load: the checkpoint's options, parameters only; room for one sequence, or
 * for a micro-batch of them. */
static int load_model(const char *cmd, int argc, char **argv, moe_options *o, int batch,
                      moe_model **m, char *ckpt, size_t cap) {
    /* the command's table takes these for its --model form */
    char flag[140];
    if (moe_options_flag(argc, argv, batch ? "ids prompt prompt-file dump-logits" : "ids", flag,
                         sizeof flag)) {
        fprintf(stderr, "moe %s: %s is for %s --model DIR; %s --load %s\n", cmd, flag, cmd, cmd,
                batch ? "evaluates a token file (--data-path)"
                      : "continues a text (--prompt or --prompt-file)");
        return 2;
    }
    int rc = moe_cli_options(o, cmd, argc, argv, ckpt, cap);
    if (rc) {
        fprintf(stderr, "moe %s: %s\n", cmd, moe_last_error());
        return rc;
    }
    if (!ckpt[0]) {
        fprintf(stderr, "moe %s: --load RUN is required (a run directory or a checkpoint)\n", cmd);
        return 2;
    }
    if (!batch && o->model.moe.router == MOE_ROUTER_EXPERT_CHOICE) {
        fprintf(stderr, "moe %s: the model routes by expert choice, which ranks a token against "
                        "the tokens after it: it cannot decode token by token\n", cmd);
        return 2;
    }
    moe_cli_threads(o);
    int max_tokens = (batch ? o->train.micro_batch : 1) * o->model.seq_len;
    if (moe_model_create_inference(&o->model, max_tokens, m) != MOE_OK ||
        (o->device && moe_model_use_device(*m, "cuda") != MOE_OK) ||
        moe_checkpoint_load(ckpt, *m, NULL, 0) != MOE_OK) {
        fprintf(stderr, "moe %s: %s\n", cmd, moe_last_error());
        moe_model_destroy(*m);
        *m = NULL;
        return 1;
    }
    return 0;
}

/* Whether the command names a Hugging Face model directory (--model): the other form of
 * generate and eval. */
static int model_dir_given(int argc, char **argv) {
    for (int i = 0; i < argc; i++)
        if (!strcmp(argv[i], "--model") || !strncmp(argv[i], "--model=", 8)) return 1;
    return 0;
}

int moe_cmd_generate(int argc, char **argv) {
    if (model_dir_given(argc, argv)) return moe_cmd_generate_hf(argc, argv);
    moe_options o;
    moe_model *m = NULL;
    char ckpt[MOE_PATH_MAX + 64];
    int rc = load_model("generate", argc, argv, &o, 0, &m, ckpt, sizeof ckpt);
    if (rc) return rc;
    /* stdout is the text alone: the thread count asked for goes to stderr */
    if (o.threads) fprintf(stderr, "moe generate: %d threads\n", omp_get_max_threads());
    char *prompt = NULL;
    size_t len;
    moe_status s = moe_cli_prompt(&o, &prompt, &len);
    moe_cli_sampling sp = {o.temperature, o.top_k, o.top_p, o.layer.seed, NULL};
    if (s == MOE_OK)
        s = moe_cli_generate(m, prompt ? prompt : "", prompt ? len : 0, o.max_new_tokens, &sp,
                             stdout);
    if (s != MOE_OK) {
        fprintf(stderr, "moe generate: %s\n", moe_last_error());
        rc = s == MOE_ERR_INVALID ? 2 : 1;
    }
    free(prompt);
    moe_model_destroy(m);
    return rc;
}

/* The mean loss over all non-overlapping windows of seq_len + 1 tokens of the token file path
 * (split: a prepared validation split, whose emptiness has its own reason, or with in_blend
 * none: *count 0); *count tokens. */
static moe_status eval_file(moe_model *m, const moe_options *o, const char *path, int split,
                            int in_blend, double *nll, int64_t *count) {
    int S = o->model.seq_len, B = o->train.micro_batch;
    moe_tokens data = {0};
    *nll = 0, *count = 0;
    moe_status s = moe_tokens_load(path, &data);
    if (s == MOE_OK && in_blend && data.n_tokens == 0) {
        moe_tokens_free(&data);
        return MOE_OK;
    }
    if (s == MOE_OK && split && data.n_tokens == 0)
        s = moe_set_error(MOE_ERR_INVALID, "the validation split %s is empty (the data was "
                          "prepared with --val-fraction 0): give a token file to evaluate with "
                          "--data-path FILE", path);
    else if (s == MOE_OK && data.n_tokens <= S)
        s = moe_set_error(MOE_ERR_INVALID, "%s holds %lld tokens: seq-length %d needs at least "
                          "%d", path, (long long)data.n_tokens, S, S + 1);
    if (s == MOE_OK && moe_trainer_check_data(&o->model, &data, NULL) != MOE_OK) {
        char why[512]; /* which file of a blend */
        snprintf(why, sizeof why, "%s", moe_last_error());
        s = moe_set_error(MOE_ERR_INVALID, "%s: %s", path, why);
    }
    int32_t *tok = malloc(sizeof(int32_t) * (size_t)B * S), *tgt = malloc(sizeof(int32_t) * (size_t)B * S);
    if (s == MOE_OK && (!tok || !tgt)) s = moe_set_error(MOE_ERR_NOMEM, "out of memory");
    int64_t windows = s == MOE_OK ? (data.n_tokens - 1) / S : 0;
    double sum = 0;
    moe_model_args args = moe_model_args_default();
    args.training = 0;
    for (int64_t w0 = 0; w0 < windows && s == MOE_OK; w0 += B) {
        int b = (int)(windows - w0 < B ? windows - w0 : B);
        for (int r = 0; r < b; r++)
            for (int t = 0; t < S; t++) {
                int64_t at = (w0 + r) * S + t;
                tok[r * S + t] = (int32_t)moe_tokens_at(&data, at);
                tgt[r * S + t] = (int32_t)moe_tokens_at(&data, at + 1);
            }
        moe_model_loss L;
        if ((s = moe_model_forward(m, tok, tgt, b, S, &args, &L)) != MOE_OK) break;
        sum += L.nll * L.n_targets;
        *count += L.n_targets;
    }
    free(tok);
    free(tgt);
    moe_tokens_free(&data);
    *nll = *count ? sum / (double)*count : 0;
    return s;
}

/* The loss of a token file, or of the validation split of each dataset of --data-path (a blend's
 * also weighted as it trained). */
int moe_cmd_eval(int argc, char **argv) {
    if (model_dir_given(argc, argv)) return moe_cmd_eval_hf(argc, argv);
    moe_options o;
    moe_model *m = NULL;
    char ckpt[MOE_PATH_MAX + 64], path[MOE_PATH_MAX + 16], spec[MOE_PATH_MAX];
    int rc = load_model("eval", argc, argv, &o, 1, &m, ckpt, sizeof ckpt);
    if (rc) return rc;
    char *dirs[MOE_BLEND_MAX];
    double weight[MOE_BLEND_MAX], blend = 0, wsum = 0;
    int n = 1, pairs = 0;
    struct stat sb; /* --data FILE, or the validation split of --data-path DIR (or a blend's) */
    const char *data = o.data_path[0] ? o.data_path : "data/fortunes";
    int dir = !o.data_path[0] || (stat(data, &sb) == 0 && S_ISDIR(sb.st_mode));
    moe_status s = MOE_OK; /* a file, else (a missing one: the error names it) */
    if (dir) dirs[0] = (char *)data, weight[0] = 1;
    else s = moe_data_spec(data, spec, sizeof spec, dirs, weight, &n, &pairs);
    int split = dir || pairs;
    for (int i = 0; i < n && s == MOE_OK; i++) {
        snprintf(path, sizeof path, split ? "%s/val.bin" : "%s", dirs[i]);
        double nll;
        int64_t count;
        if ((s = eval_file(m, &o, path, split, n > 1, &nll, &count)) != MOE_OK) break;
        if (!count) { /* a blend's dataset without validation tokens, as training leaves it */
            printf("eval %s: %s holds no validation tokens: left out\n", ckpt, path);
            continue;
        }
        blend += weight[i] * nll, wsum += weight[i];
        printf("eval %s on %s: %lld tokens, loss %.4f nats/token (%.3f bits), perplexity %.3f, "
               "%d threads\n", ckpt, path, (long long)count, nll, nll / log(2.0), exp(nll),
               omp_get_max_threads());
    }
    if (s == MOE_OK && n > 1 && !wsum)
        s = moe_set_error(MOE_ERR_INVALID, "none of the datasets of %s holds validation tokens: "
                          "give a token file to evaluate with --data-path FILE", data);
    if (s == MOE_OK && n > 1)
        printf("eval %s on the blend (its weights): loss %.4f nats/token (%.3f bits), perplexity "
               "%.3f\n", ckpt, blend / wsum, blend / wsum / log(2.0), exp(blend / wsum));
    if (s != MOE_OK) fprintf(stderr, "moe eval: %s\n", moe_last_error());
    moe_model_destroy(m);
    return s == MOE_OK ? 0 : 1;
}

/* Its tensors and metadata; -1 (said on stderr) when it cannot be read. */
static int print_file(const char *path) {
    moe_safetensors st;
    if (moe_st_read(path, &st) != MOE_OK) {
        fprintf(stderr, "moe inspect: %s\n", moe_last_error());
        return -1;
    }
    printf("%s: %d tensors\n", path, st.n_tensors);
    for (int i = 0; i < st.n_meta; i++) {
        const char *v = st.meta_values[i];
        if (strchr(v, '\n')) {
            int lines = v[strlen(v) - 1] != '\n'; /* the last one without its newline too */
            for (const char *c = v; *c; c++) lines += *c == '\n';
            printf("  metadata %s: %d lines of text\n", st.meta_keys[i], lines);
        } else
            printf("  metadata %s = %s\n", st.meta_keys[i], v);
    }
    size_t total = 0;
    for (int i = 0; i < st.n_tensors; i++) {
        const moe_st_tensor *t = &st.tensors[i];
        printf("  %-60s %-4s [", t->name, moe_st_dtype_name(t->dtype));
        for (int d = 0; d < t->ndim; d++) printf("%s%lld", d ? ", " : "", (long long)t->shape[d]);
        printf("]\n");
        total += t->numel;
    }
    printf("  %zu values\n", total);
    moe_st_free(&st);
    return 0;
}

int moe_cmd_inspect(int argc, char **argv) {
    if (argc != 1) {
        fprintf(stderr, "moe inspect: usage: moe inspect FILE.safetensors | RUN | CHECKPOINT | "
                        "DIR | FILE.gguf\n");
        return 2;
    }
    struct stat sb;
    if (stat(argv[0], &sb) != 0) {
        fprintf(stderr, "moe inspect: cannot read %s: %s\n", argv[0], strerror(errno));
        return 1;
    }
    if (moe_gguf_is_file(argv[0])) return moe_cli_inspect_hf(argv[0]) ? 1 : 0;
    if (!S_ISDIR(sb.st_mode)) return print_file(argv[0]) ? 1 : 0;
    char ckpt[4200], path[4200 + 258]; /* room for "/" and a d_name */
    snprintf(path, sizeof path, "%s/config.json", argv[0]);
    if (stat(path, &sb) == 0) { /* a Hugging Face model directory */
        if (moe_cli_inspect_hf(argv[0])) return 1;
        snprintf(ckpt, sizeof ckpt, "%s", argv[0]);
    } else if (moe_checkpoint_resolve(argv[0], ckpt, sizeof ckpt) != MOE_OK) {
        fprintf(stderr, "moe inspect: %s\n", moe_last_error());
        return 1;
    }
    /* model.safetensors and trainer.safetensors, or their shards, in name order */
    struct dirent **names;
    int n = scandir(ckpt, &names, NULL, alphasort), files = 0, bad = 0;
    if (n < 0) {
        fprintf(stderr, "moe inspect: cannot read %s: %s\n", ckpt, strerror(errno));
        return 1;
    }
    for (int i = 0; i < n; i++) {
        size_t len = strlen(names[i]->d_name);
        if (len > 12 && !strcmp(names[i]->d_name + len - 12, ".safetensors")) {
            snprintf(path, sizeof path, "%s/%s", ckpt, names[i]->d_name);
            files++;
            bad |= print_file(path) != 0;
        }
        free(names[i]);
    }
    free(names);
    if (!files) fprintf(stderr, "moe inspect: %s holds no .safetensors files\n", ckpt);
    return bad || !files ? 1 : 0;
}
