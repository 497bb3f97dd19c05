/* moe prepare and moe train. */
#define _POSIX_C_SOURCE 200809L
#include "tools/cli.h"

#include "core/core.h"
#include "io/data.h"
#include "io/gguf.h"
#include "io/hf.h"
#include "io/tokenizer.h"
#include "io/options.h"
#include "io/tfevents.h"
#include "kernels/kernels.h"
#include "train/trainer.h"

#include <cJSON.h>
#include <dirent.h>
#include <signal.h>
#include <errno.h>
#include <math.h>
#include <omp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_CORPUS "/usr/share/games/fortunes"
#define DEFAULT_DATA "data/fortunes"

/* ---------------------------------------------------------------- prepare */

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && !strcmp(s + n - m, suffix);
}

/* Appends path, or the regular files of directory path in name order (fortune index files
 * *.dat and *.u8 skipped), to the list. */
static int add_input(const char *path, char ***list, int *n) {
    struct stat sb;
    if (stat(path, &sb) != 0) {
        fprintf(stderr, "moe prepare: cannot read %s: %s\n", path, strerror(errno));
        return -1;
    }
    char **names = NULL;
    int k = 0;
    if (S_ISDIR(sb.st_mode)) {
        DIR *d = opendir(path);
        if (!d) {
            fprintf(stderr, "moe prepare: cannot open %s: %s\n", path, strerror(errno));
            return -1;
        }
        struct dirent *e;
        while ((e = readdir(d))) {
            if (e->d_name[0] == '.' || ends_with(e->d_name, ".dat") || ends_with(e->d_name, ".u8"))
                continue;
            char full[4096];
            snprintf(full, sizeof full, "%s/%s", path, e->d_name);
            struct stat fs;
            if (stat(full, &fs) != 0 || !S_ISREG(fs.st_mode)) continue; /* links followed */
            names = realloc(names, sizeof *names * (size_t)(k + 1));
            names[k++] = strdup(full);
        }
        closedir(d);
        if (k > 1) qsort(names, (size_t)k, sizeof *names, cmp_str); /* none: names is NULL */
    } else {
        names = malloc(sizeof *names);
        names[k++] = strdup(path);
    }
    *list = realloc(*list, sizeof **list * (size_t)(*n + k));
    for (int i = 0; i < k; i++) (*list)[(*n)++] = names[i];
    free(names);
    return 0;
}

/* The tokenizer and vocabulary of --model DIR: its tokenizer.json, config.json's vocab_size and
 * first eos_token_id. */
static int prepare_vocab(const char *dir, moe_prepare_vocab *v, moe_tokenizer **t) {
    moe_model_config c;
    char family[32], path[MOE_PATH_MAX + 32];
    int32_t eos[64];
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    if (moe_hf_config(dir, &c, family, sizeof family) != MOE_OK ||
        (moe_gguf_is_file(dir) ? moe_cli_load_tokenizer(dir, t) : moe_tokenizer_load(path, t)) !=
            MOE_OK) {
        fprintf(stderr, "moe prepare: %s\n", moe_last_error());
        return 1;
    }
    int n_eos;
    if (moe_hf_eos(dir, 0, eos, 64, &n_eos) != MOE_OK) {
        fprintf(stderr, "moe prepare: %s\n", moe_last_error());
        return 1;
    }
    if (n_eos < 1 || eos[0] >= c.vocab) { /* the first: config.json's end of text */
        fprintf(stderr, "moe prepare: %s has no eos_token_id below its vocab_size (%d) to end "
                        "documents with (config.json, or generation_config.json)\n", dir, c.vocab);
        return 1;
    }
    *v = (moe_prepare_vocab){*t, c.vocab, eos[0]};
    return 0;
}

int moe_cmd_prepare(int argc, char **argv) {
    const char *out = DEFAULT_DATA, *model = NULL;
    double val_fraction = 0.05;
    char **files = NULL;
    int n = 0, rc = 0, inputs = 0;
    for (int a = 0; a < argc && !rc; a++) {
        if (strncmp(argv[a], "--", 2)) { /* an input */
            if (inputs++, add_input(argv[a], &files, &n)) rc = 1;
            continue;
        }
        /* --name value or --name=value, as the other commands take them */
        const char *eq = strchr(argv[a], '='), *v = eq ? eq + 1 : NULL;
        int kn = eq ? (int)(eq - argv[a]) : (int)strlen(argv[a]);
        const char *names[] = {"--out", "--val-fraction", "--model"};
        int k = 0;
        while (k < 3 && (strlen(names[k]) != (size_t)kn || strncmp(argv[a], names[k], (size_t)kn)))
            k++;
        if (k == 3) {
            fprintf(stderr, "moe prepare: unknown option %.*s (options: --out DIR, "
                            "--val-fraction F, --model DIR)\n", kn, argv[a]);
            rc = 2;
        } else if (!v && a + 1 >= argc) {
            fprintf(stderr, "moe prepare: %s needs a value\n", names[k]);
            rc = 2;
        } else if (!v) {
            v = argv[++a];
        }
        if (rc) break;
        if (k == 0) {
            out = v;
            if (!out[0]) {
                fprintf(stderr, "moe prepare: --out needs a directory name, got ''\n");
                rc = 2;
            }
        } else if (k == 1) {
            char *end;
            val_fraction = strtod(v, &end);
            if (end == v || *end || !(val_fraction >= 0 && val_fraction < 1)) {
                fprintf(stderr, "moe prepare: --val-fraction must be in [0, 1), got '%s'\n", v);
                rc = 2;
            }
        } else {
            model = v;
        }
    }
    if (!rc && inputs && n == 0) {
        fprintf(stderr, "moe prepare: the inputs hold no regular files\n");
        rc = 1;
    }
    if (!rc && !inputs && add_input(DEFAULT_CORPUS, &files, &n)) {
        fprintf(stderr, "moe prepare: no input files, and the default corpus is missing "
                        "(apt-get install fortunes)\n");
        rc = 1;
    }
    moe_prepare_stats st;
    moe_prepare_vocab vocab = {0};
    moe_tokenizer *tok = NULL;
    if (!rc && model) rc = prepare_vocab(model, &vocab, &tok);
    if (!rc && moe_prepare((const char *const *)files, n, out, val_fraction, 1234,
                           model ? &vocab : NULL, &st) != MOE_OK) {
        fprintf(stderr, "moe prepare: %s\n", moe_last_error());
        rc = 1;
    }
    moe_tokenizer_free(tok);
    if (!rc)
        printf("prepared %d files: %lld documents, %lld tokens for training; %lld documents, "
               "%lld tokens for validation; in %s/{train,val}.bin\n", st.n_files,
               (long long)st.train_docs, (long long)st.train_tokens, (long long)st.val_docs,
               (long long)st.val_tokens, out);
    for (int i = 0; i < n; i++) free(files[i]);
    free(files);
    return rc;
}

/* ------------------------------------------------------------------ train */

static void format_eta(char *buf, size_t cap, double s) {
    if (s < 60) snprintf(buf, cap, "%.0fs", s);
    else if (s < 3600) snprintf(buf, cap, "%dm%02ds", (int)(s / 60), (int)s % 60);
    else snprintf(buf, cap, "%dh%02dm", (int)(s / 3600), (int)(s / 60) % 60);
}

/* max / mean expert load over the MoE layers of the last step (1 = perfectly balanced). */
static double load_imbalance(const moe_trainer *t, int n_layers) {
    double worst = 0;
    for (int l = 0; l < n_layers; l++) {
        int E;
        const int64_t *c = moe_trainer_layer_load(t, l, &E);
        if (!c) continue;
        double sum = 0, mx = 0;
        for (int e = 0; e < E; e++) {
            sum += (double)c[e];
            mx = fmax(mx, (double)c[e]);
        }
        if (sum > 0) worst = fmax(worst, mx / (sum / E));
    }
    return worst;
}

/* Megatron's names of the Switch-style aux losses, by moe_lb_type; with a list of them (more
 * than lb_type's own) each is logged on its own too. */
static const char *const aux_names[] = {NULL, "aux_loss", "seq_aux_loss", "global_aux_loss"};
static int aux_listed(const moe_layer_config *c, int type) {
    int n = 0;
    for (int i = MOE_LB_AUX; i <= MOE_LB_GLOBAL_AUX; i++) n += c->aux_coeff_also[i] > 0;
    return n && moe_aux_coeff_of(c, (moe_lb_type)type) > 0;
}

/* One line of dir/metrics.jsonl; an error when it could not be written (a full disk). */
static moe_status write_metrics(FILE *f, const char *dir, int step, const moe_step_metrics *s,
                                double tok_s, const moe_trainer *t, const moe_model_config *mc,
                                double val) {
    int n_layers = mc->n_layers;
    if (s->skipped) /* no update, and a loss or gradient JSON cannot write: the step and its
                     * evaluation */
        fprintf(f, "{\"step\":%d,\"skipped\":true", step);
    else
        fprintf(f, "{\"step\":%d,\"loss\":%.17g,\"nll\":%.17g,\"aux\":%.17g,\"z\":%.17g,"
                   "\"lr\":%.9g,\"grad_norm\":%.17g,\"tokens_per_s\":%.1f",
                step, s->loss, s->nll, s->aux, s->z, s->lr, s->grad_norm, tok_s);
    int terms = 0;
    for (int i = MOE_LB_AUX; i <= MOE_LB_GLOBAL_AUX && !s->skipped; i++)
        if (aux_listed(&mc->moe, i))
            fprintf(f, "%s\"%s\":%.17g", terms++ ? "," : ",\"aux_terms\":{", aux_names[i],
                    s->aux_terms[i]);
    if (terms) fputc('}', f);
    if (val >= 0) fprintf(f, ",\"val_nll\":%.17g", val);
    if (!s->skipped) fprintf(f, ",\"expert_load\":[");
    for (int l = 0, first = 1; l < n_layers && !s->skipped; l++) {
        int E;
        const int64_t *c = moe_trainer_layer_load(t, l, &E);
        if (!c) continue;
        fprintf(f, "%s{\"layer\":%d,\"dropped\":%.6g,\"counts\":[", first ? "" : ",", l,
                moe_trainer_layer_dropped(t, l));
        for (int e = 0; e < E; e++) fprintf(f, "%s%lld", e ? "," : "", (long long)c[e]);
        fprintf(f, "]}");
        first = 0;
    }
    fprintf(f, "%s}\n", s->skipped ? "" : "]");
    if (fflush(f) || ferror(f))
        return moe_set_error(MOE_ERR_IO, "cannot write %s/metrics.jsonl: %s", dir,
                             strerror(errno));
    return MOE_OK;
}

/* TensorBoard scalars of one step (train/..., val/nll, moe/layerL/...; of a skipped step its
 * evaluation only). */
static moe_status write_scalars(moe_tfevents *tb, int step, const moe_step_metrics *s,
                                double tok_s, const moe_trainer *t, const moe_model_config *mc,
                                double val) {
    int n_layers = mc->n_layers;
    double now = moe_wall_time();
    const char *tags[] = {"train/loss", "train/nll", "train/aux", "train/z", "train/lr",
                          "train/grad_norm", "train/tokens_per_s"};
    const double vals[] = {s->loss, s->nll, s->aux, s->z, s->lr, s->grad_norm, tok_s};
    for (int i = 0; i < 7 && !s->skipped; i++)
        MOE_TRY(moe_tfevents_scalar(tb, tags[i], step, (float)vals[i], now));
    for (int i = MOE_LB_AUX; i <= MOE_LB_GLOBAL_AUX && !s->skipped; i++) {
        char tag[64];
        snprintf(tag, sizeof tag, "train/aux/%s", aux_names[i]);
        if (aux_listed(&mc->moe, i))
            MOE_TRY(moe_tfevents_scalar(tb, tag, step, (float)s->aux_terms[i], now));
    }
    if (val >= 0) MOE_TRY(moe_tfevents_scalar(tb, "val/nll", step, (float)val, now));
    for (int l = 0; l < n_layers && !s->skipped; l++) {
        int E;
        const int64_t *c = moe_trainer_layer_load(t, l, &E);
        if (!c) continue;
        double sum = 0, mx = 0;
        for (int e = 0; e < E; e++) sum += (double)c[e], mx = fmax(mx, (double)c[e]);
        char tag[64];
        snprintf(tag, sizeof tag, "moe/layer%d/load_max_over_mean", l);
        MOE_TRY(moe_tfevents_scalar(tb, tag, step, sum > 0 ? (float)(mx * E / sum) : 0.0f, now));
        snprintf(tag, sizeof tag, "moe/layer%d/dropped_fraction", l);
        MOE_TRY(moe_tfevents_scalar(tb, tag, step, (float)moe_trainer_layer_dropped(t, l), now));
    }
    return MOE_OK;
}

/* SIGINT and SIGTERM stop training after the step that runs (with a checkpoint), however many
 * arrive. They are blocked in the threads that compute (this one and OpenMP's) and taken from
 * the pending set between steps; the handler only runs on threads that leave them unblocked
 * (MPI's). A handler must not run on a computing thread: oneDNN 2.6's JIT GEMM kernels point
 * rsp into the heap while they run (oneDNN issue #4845, fixed in 3.11), and the kernel pushes
 * the signal frame there, over malloc's chunks (a crash "corrupted size vs. prev_size" some
 * steps later, or silently changed data). */
static volatile sig_atomic_t stop_requested;
static void on_signal(int sig) { stop_requested = sig; }

static void stop_signal_set(sigset_t *set) {
    sigemptyset(set);
    sigaddset(set, SIGINT);
    sigaddset(set, SIGTERM);
}

/* how = SIG_BLOCK or SIG_UNBLOCK, in this thread and in each of OpenMP's */
static void mask_stop_signals(int how) {
    sigset_t set;
    stop_signal_set(&set);
    pthread_sigmask(how, &set, NULL);
#pragma omp parallel
    pthread_sigmask(how, &set, NULL);
}

static void catch_stop_signals(void) {
    stop_requested = 0;
    mask_stop_signals(SIG_BLOCK);
    struct sigaction sa = {.sa_handler = on_signal, .sa_flags = SA_RESTART};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
}

/* The stop signal that arrived since the last call (consumed), or 0. */
static int take_stop_signal(void) {
    sigset_t set;
    stop_signal_set(&set);
    struct timespec now = {0, 0};
    int sig;
    while ((sig = sigtimedwait(&set, NULL, &now)) > 0) stop_requested = sig;
    return stop_requested;
}

/* Back to the default action; a signal that arrived since the last step is dropped. */
static void release_stop_signals(void) {
    take_stop_signal();
    signal(SIGINT, SIG_DFL);
    signal(SIGTERM, SIG_DFL);
    mask_stop_signals(SIG_UNBLOCK);
}

void moe_cli_threads(const moe_options *o) {
    if (o->threads > 0) omp_set_num_threads(o->threads);
}

/* Options: with --load, the checkpoint's options first, then the command line's flags. */
int moe_cli_cpu_only(const moe_options *o, const char *cmd) {
    if (!o->device) return 0;
    fprintf(stderr, "moe %s: runs on the CPU (--device cuda is for train, generate --load, "
                    "eval --load and bench layer|train|generate)\n", cmd);
    return 2;
}

int moe_cli_hf_flags(const moe_options *o, const char *cmd) {
    if (o->load[0] && o->hf_model[0]) {
        fprintf(stderr, "moe %s: give --load or --model, not both\n", cmd);
        return 2;
    }
    const char *name = o->hf_model[0] ? moe_options_model_given(o) : NULL;
    if (!name) return 0;
    fprintf(stderr, "moe %s: --%s does not apply with --model: %s/config.json describes the "
                    "model\n", cmd, name, o->hf_model);
    return 2;
}

int moe_cli_options(moe_options *o, const char *cmd, int argc, char **argv, char *ckpt,
                    size_t cap) {
    const moe_options_use *use = moe_cli_use(cmd);
    moe_options_default(o);
    ckpt[0] = '\0';
    if (moe_options_parse_args(o, argc, argv, use) != MOE_OK) return 2;
    if (o->load[0] && o->hf_model[0]) { /* before the checkpoint's options mark theirs given */
        moe_set_error(MOE_ERR_INVALID, "give --load or --model, not both");
        return 2;
    }
    const char *how = o->finetune ? "--finetune"
                      : o->upcycle ? "--moe-use-upcycling"
                      : o->no_load_optim ? "--no-load-optim" : NULL;
    if (how && !o->load[0]) {
        moe_set_error(MOE_ERR_INVALID, "%s is about the checkpoint given with --load RUN", how);
        return 2;
    }
    if (o->data_path[0]) { /* the form of a blend given here, before any file is read (not a
                            * checkpoint's: its directories may be gone, its form was checked) */
        char buf[MOE_PATH_MAX], *dirs[MOE_BLEND_MAX];
        double weight[MOE_BLEND_MAX];
        int n;
        if (moe_data_spec(o->data_path, buf, sizeof buf, dirs, weight, &n, NULL) != MOE_OK)
            return 2;
    }
    if (o->finetune && o->init_from[0]) {
        moe_set_error(MOE_ERR_INVALID, "a run starts from a checkpoint (--load RUN --finetune) or "
                      "from a Hugging Face model (--init-from DIR), not both");
        return 2;
    }
    if (o->load[0]) {
        char *text = NULL;
        if (moe_checkpoint_resolve(o->load, ckpt, cap) != MOE_OK ||
            moe_checkpoint_config(ckpt, &text) != MOE_OK)
            return 1;
        moe_options_default(o);
        moe_status st = moe_options_load_text(o, text, ckpt);
        free(text);
        if (st != MOE_OK) return 1;
        o->save[0] = '\0'; /* the loaded run's directory says where it saved, not this run */
        /* the thread count it trained with was that machine's: eval and generate take their own
         * (--threads, else OpenMP's default); a resumed run keeps it (bitwise continuation) */
        if (strcmp(cmd, "train")) o->threads = 0;
        if (moe_options_parse_args(o, argc, argv, use) != MOE_OK) return 2;
    }
    if (o->init_from[0]) { /* the model's config.json, then the command line on top */
        if (ckpt[0]) {
            moe_set_error(MOE_ERR_INVALID, "--init-from starts a run; resume it with --load alone");
            return 2;
        }
        moe_model_config c;
        char family[32];
        if (moe_hf_config(o->init_from, &c, family, sizeof family) != MOE_OK) return 1;
        moe_options_default(o);
        o->model = c;
        /* dense layers between MoE ones (Qwen's mlp_only_layers) as moe-layer-freq's pattern,
         * which the run's checkpoints keep */
        for (int l = 0; l < c.n_layers; l++)
            if (c.n_experts[l] == MOE_LAYER_DENSE) o->freq_pattern_n = c.n_layers;
        for (int l = 0; l < o->freq_pattern_n; l++)
            o->freq_pattern[l] = c.n_experts[l] != MOE_LAYER_DENSE;
        if (o->model.seq_len > MOE_HF_WINDOW) o->model.seq_len = MOE_HF_WINDOW;
        o->layer = c.moe;
        o->untie = !c.tie_embeddings;
        if (moe_options_parse_args(o, argc, argv, use) != MOE_OK) return 2;
        if (!moe_options_given(o, "moe-layer-freq") && o->freq_pattern_n > o->model.n_layers)
            o->freq_pattern_n = o->model.n_layers; /* --num-layers: the first ones */
    }
    /* the schedule's and the router's training checks are for training: eval, generate and
     * convert take a checkpoint's global batch, or its router at another top-k, as they are */
    int parts = MOE_OPTIONS_MODEL | (strcmp(cmd, "train") ? 0 : MOE_OPTIONS_TRAIN);
    return moe_options_finish(o, parts) != MOE_OK ? 2 : 0;
}

/* a and b name the same existing file or directory */
static int same_file(const char *a, const char *b) {
    struct stat sa, sb;
    return !stat(a, &sa) && !stat(b, &sb) && sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

/* Where this run saves: --save, or when resuming without it, the run directory of the loaded
 * checkpoint. A directory that already holds checkpoints takes only the continuation of its
 * latest one: a fresh run, a run resumed from another run's checkpoint or from an older one of
 * the same run would overwrite or prune checkpoints that are not its own. */
static moe_status choose_save_dir(moe_options *o, const char *ckpt, const char *save_flag) {
    char run[MOE_PATH_MAX], latest[MOE_PATH_MAX + 64];
    int in_run = ckpt[0] && moe_checkpoint_run_dir(ckpt, run, sizeof run) == 0;
    if (!o->save[0] && in_run) snprintf(o->save, sizeof o->save, "%s", run);
    if (!o->save[0] && ckpt[0])
        return moe_set_error(MOE_ERR_INVALID, "%s is not in a run directory: name one for the "
                             "resumed run's checkpoints with --save", ckpt);
    if (!o->save[0] && o->exit_interval)
        return moe_set_error(MOE_ERR_INVALID, "--exit-interval stops with a checkpoint: it needs "
                             "--save");
    if (!o->save[0] && save_flag) /* a flag, not a config file's key (default.cfg has one) */
        return moe_set_error(MOE_ERR_INVALID, "%s is about checkpoints, which a run without "
                             "--save does not write: it needs --save", save_flag);
    const char *model = !o->save[0]                                   ? NULL
                        : moe_file_exists(o->save, "config.json")       ? "config.json"
                        : moe_file_exists(o->save, "model.safetensors") ? "model.safetensors"
                                                                        : NULL;
    if (model) /* its loading would take the model for the run's checkpoint */
        return moe_set_error(MOE_ERR_INVALID, "%s holds a model (%s), as moe convert --to hf "
                             "writes it: a run directory keeps its checkpoints in step-N "
                             "directories; choose another --save", o->save, model);
    snprintf(latest, sizeof latest, "%s/latest", o->save);
    struct stat sb;
    if (!o->save[0]) return MOE_OK;
    if (stat(latest, &sb) != 0) { /* no 'latest' (lost, or never written): the newest step-N */
        const char *run = moe_checkpoint_run_marker(o->save);
        int newest = moe_checkpoint_newest_step(o->save);
        snprintf(latest, sizeof latest, "%s/step-%08d", o->save, newest);
        if (!run || (ckpt[0] && newest >= 0 && same_file(latest, ckpt))) return MOE_OK;
        if (newest < 0) { /* what would be lost: a run's log (not an empty file or a device) */
            snprintf(latest, sizeof latest, "%s/metrics.jsonl", o->save);
            if (!strcmp(run, "metrics.jsonl") &&
                (stat(latest, &sb) != 0 || !S_ISREG(sb.st_mode) || sb.st_size == 0))
                return MOE_OK;
            return moe_set_error(MOE_ERR_INVALID, "%s already holds a run's files (%s) but no "
                                 "checkpoint: choose another --save", o->save, run);
        }
        if (!ckpt[0])
            return moe_set_error(MOE_ERR_INVALID, "%s already holds checkpoints (no 'latest' "
                                 "file); resume with --load %s, or choose another --save",
                                 o->save, latest);
        return moe_set_error(MOE_ERR_INVALID, "%s has no 'latest' file and %s is not its newest "
                             "checkpoint (%s): resume it into another run directory with --save",
                             o->save, ckpt, latest);
    }
    if (!ckpt[0] && o->finetune)
        return moe_set_error(MOE_ERR_INVALID, "%s already holds a checkpoint: --finetune starts "
                             "a new run; choose another --save", o->save);
    if (!ckpt[0])
        return moe_set_error(MOE_ERR_INVALID, "%s already holds a checkpoint; resume with --load "
                             "%s, or choose another --save", o->save, o->save);
    if (moe_checkpoint_resolve(o->save, latest, sizeof latest) != MOE_OK || !same_file(latest, ckpt))
        return moe_set_error(MOE_ERR_INVALID, "%s already holds checkpoints and %s is not its "
                             "latest: resume it into another run directory with --save", o->save,
                             ckpt);
    return MOE_OK;
}

/* Cuts RUN/metrics.jsonl back to the steps up to `step` (those of the checkpoint resumed from:
 * a run stopped without saving logged steps that the resumed run computes again). A crash can
 * leave a partial last line or a tail of NUL bytes: only whole lines (ending in a newline) that
 * are JSON objects of a step up to `step` stay, up to the first other one, so that the resumed
 * run appends after a complete line. */
static moe_status trim_metrics(const char *path, int step) {
    char *text;
    size_t len, keep = 0;
    struct stat sb;
    if (stat(path, &sb) != 0) return MOE_OK;
    MOE_TRY(moe_read_file(path, &text, &len));
    for (const char *line = text; line < text + len;) {
        const char *end = memchr(line, '\n', (size_t)(text + len - line));
        if (!end) break; /* a crash's partial last line */
        cJSON *rec = moe_cli_metrics_record(line, (size_t)(end - line));
        const cJSON *s = cJSON_GetObjectItemCaseSensitive(rec, "step");
        int ok = rec && cJSON_IsNumber(s) && s->valuedouble <= step;
        cJSON_Delete(rec);
        if (!ok) break;
        line = end + 1;
        keep = (size_t)(line - text);
    }
    moe_status st = MOE_OK;
    if (keep < len) {
        const void *parts[] = {text};
        st = moe_write_atomic(path, parts, &keep, 1);
    }
    free(text);
    return st;
}

static int save_checkpoint(const moe_options *o, moe_model *m, moe_trainer *t) {
    char *text = moe_options_to_text(o);
    moe_status st = text ? moe_checkpoint_save(o->save, o->keep_last, text, m, t) : MOE_ERR_NOMEM;
    free(text);
    if (st == MOE_OK)
        printf("saved checkpoint %s/step-%08d\n", o->save, moe_trainer_steps_done(t));
    return st == MOE_OK ? 0 : -1;
}

/* The outcome of the set-up every rank goes through (the options, their agreement, the rank
 * grid, the save directory, the options checked against the grid): code 0 or the exit code of
 * this rank's failure (its message in moe_last_error). Each rank learns the highest code of
 * any rank, the lowest rank that failed with it says why in one line, and all return that
 * code — no MPI_Abort, since none is left waiting for another (MPI_Finalize follows in main). */
static int setup_outcome(moe_dist *d, int code) {
    int64_t v = code ? ((int64_t)code << 32) + d->world_size - d->world_rank : 0;
    int64_t mine = v;
    if (d->world_size > 1 && moe_comm_max_i64(d->world, &v, 1) != MOE_OK) {
        fprintf(stderr, "moe train (rank %d): %s\n", d->world_rank, moe_last_error());
        moe_dist_abort(d, 1);
    }
    if (v && v == mine) {
        if (d->world_rank) fprintf(stderr, "moe train (rank %d): %s\n", d->world_rank, moe_last_error());
        else fprintf(stderr, "moe train: %s\n", moe_last_error());
    }
    return (int)(v >> 32);
}

int moe_cmd_train(int argc, char **argv) {
    moe_options o;
    char ckpt[MOE_PATH_MAX + 64];
    int orc = moe_cli_options(&o, "train", argc, argv, ckpt, sizeof ckpt);
    if (!orc && o.inject_fault[0] && moe_trainer_set_faults(NULL, o.inject_fault) != MOE_OK)
        orc = 2; /* a bad value: said before the data is read */
    /* processes: the options read everywhere, the same options and build everywhere (checked
     * first: the grid's collectives depend on the options), the rank grid, rank 0 prints. A
     * failure past the set-up on some ranks only aborts them all (MPI_Abort), so that none
     * waits for the others. */
    moe_dist *d = moe_dist_get();
    int src = setup_outcome(d, orc);
    if (src) return src;
    if (o.print_config) {
        moe_options_print_config(stdout, &o);
        return 0;
    }
    /* --finetune: the checkpoint's weights start a new run; nothing else of it is resumed */
    char weights[MOE_PATH_MAX + 64] = "";
    if (o.finetune) {
        snprintf(weights, sizeof weights, "%s", ckpt);
        ckpt[0] = '\0';
    }
    moe_cli_threads(&o);
    if (d->world_size > 1) {
        char *text = moe_options_to_text(&o);
        size_t n = text ? strlen(text) : 0;
        char *id = text ? realloc(text, n + 128) : NULL;
        if (!id) moe_dist_abort(d, 1);
        /* the process options are not in the text (a checkpoint does not keep them) */
        snprintf(id + n, 128, "\nbuild %s %s %s ep %d two-stage %d ranks-per-node %d\n",
                 moe_version(), __DATE__, __TIME__, o.ep, o.two_stage, o.node_ranks);
        moe_status same = moe_dist_check_same(d, id, strlen(id), "configuration or build");
        free(id);
        if ((src = setup_outcome(d, same != MOE_OK ? 2 : 0))) return src;
        if (d->world_rank != 0 && !freopen("/dev/null", "w", stdout)) moe_dist_abort(d, 1);
    }
    moe_status ready = moe_dist_grid(d, o.ep);
    if (ready == MOE_OK)
        ready = moe_comm_set_two_stage(d->expert, o.two_stage ? o.node_ranks : 1);
    o.model.moe.ep_size = d->ep;
    o.model.moe.ep_rank = d->ep_rank;
    char flag[140];
    if (ready == MOE_OK)
        ready = choose_save_dir(&o, o.upcycle ? "" : ckpt, /* upcycling: a new run directory */
                                moe_options_flag(argc, argv, "save-interval keep-last", flag,
                                                 sizeof flag));
    /* the options against the grid: every MoE layer's experts split over the expert group,
     * the global batch over the data-parallel processes (the trainer checks it again) */
    if (ready == MOE_OK) ready = moe_model_config_validate(&o.model);
    if (ready == MOE_OK) ready = moe_train_check_dp_batch(&o.train, o.model.moe.ep_replicated, d);
    if (ready == MOE_OK && o.device && d->world_size > 1) /* the trainer checks it again */
        ready = moe_set_error(MOE_ERR_INVALID, "data and expert parallelism run on the CPU so "
                              "far (--device cpu)");
    if ((src = setup_outcome(d, ready != MOE_OK ? 2 : 0))) return src;
    const char *data = o.data_path[0] ? o.data_path : DEFAULT_DATA;
    char path[MOE_PATH_MAX + 16], spec[MOE_PATH_MAX], *dirs[MOE_BLEND_MAX];
    moe_tokens train[MOE_BLEND_MAX] = {0}, val[MOE_BLEND_MAX] = {0};
    moe_blend train_b = {0}, val_b = {0};
    double weight[MOE_BLEND_MAX];
    int n_sets = 0;
    int64_t train_tokens = 0;
    moe_model *m = NULL;
    moe_trainer *t = NULL;
    FILE *metrics = NULL;
    moe_tfevents *tb = NULL;
    int rc = 1, stopped_by = 0; /* the signal that stopped the run */
    int agreed = 0; /* an error every rank met at the same point (told once, no abort) */
    int told = 0;   /* its message printed already (by the rank that met it) */
    char val_path[MOE_PATH_MAX + 16];
    if (moe_data_spec(data, spec, sizeof spec, dirs, weight, &n_sets, NULL) != MOE_OK) goto fail;
    for (int i = 0; i < n_sets; i++) { /* each set's pair, the vocabulary of the first */
        snprintf(path, sizeof path, "%s/train.bin", dirs[i]);
        if (moe_tokens_load(path, &train[i]) != MOE_OK) goto fail;
        snprintf(val_path, sizeof val_path, "%s/val.bin", dirs[i]);
        if (moe_tokens_load(val_path, &val[i]) != MOE_OK ||
            moe_tokens_check_pair(path, &train[i], val_path, &val[i]) != MOE_OK)
            goto fail;
        if (i && (train[i].vocab != train[0].vocab || train[i].eot != train[0].eot)) {
            moe_set_error(MOE_ERR_FORMAT, "%s has vocabulary %d and end-of-text id %d, %s %d and "
                          "%d: the datasets of a blend need one tokenizer", dirs[i],
                          train[i].vocab, train[i].eot, dirs[0], train[0].vocab, train[0].eot);
            goto fail;
        }
        if (moe_trainer_check_data(&o.model, &train[i], val[i].n_tokens ? &val[i] : NULL))
            goto fail;
        train_b.sets[i] = &train[i], train_b.weight[i] = weight[i], train_b.n++;
        train_tokens += train[i].n_tokens;
        if (val[i].n_tokens) val_b.sets[val_b.n] = &val[i], val_b.weight[val_b.n++] = weight[i];
    }
    double vsum = 0; /* the sets with validation tokens, in their proportions */
    for (int i = 0; i < val_b.n; i++) vsum += val_b.weight[i];
    for (int i = 0; i < val_b.n; i++) val_b.weight[i] /= vsum;
    if (moe_model_create(&o.model, o.train.micro_batch * o.model.seq_len, &m) != MOE_OK) goto fail;
    if (o.device && moe_model_use_device(m, "cuda") != MOE_OK) goto fail;
    moe_model_init_params(m, o.layer.seed);
    moe_model_set_comms(m, d->expert, o.model.moe.ep_replicated ? d->expert_data : d->world);
    if (moe_trainer_create_blend(m, &o.train, &train_b, val_b.n ? &val_b : NULL, &t) != MOE_OK ||
        moe_trainer_set_dist(t, d) != MOE_OK)
        goto fail;
    if (o.inject_fault[0] && moe_trainer_set_faults(t, o.inject_fault) != MOE_OK) goto fail;
    int start = 0; /* the starting point's outcome: 0, else this rank's exit code */
    char said[3 * MOE_PATH_MAX] = ""; /* what it was, told once every rank has its part */
    if (o.upcycle) { /* at the dense run's step, or at 0 with --finetune */
        if (moe_checkpoint_upcycle(ckpt[0] ? ckpt : weights, m, ckpt[0] ? t : NULL) != MOE_OK)
            start = 1;
        else if (moe_trainer_steps_done(t) >= o.train.train_iters)
            start = 2, moe_set_error(MOE_ERR_INVALID, "%s is at step %d: the upcycled run needs "
                                     "train-iters above it (%d)", ckpt, moe_trainer_steps_done(t),
                                     o.train.train_iters);
        else
            snprintf(said, sizeof said, "upcycled the dense weights of %s into experts, at step "
                     "%d with new Adam moments (--moe-use-upcycling)\n", ckpt[0] ? ckpt : weights,
                     moe_trainer_steps_done(t));
    } else if (ckpt[0]) {
        if (moe_checkpoint_load(ckpt, m, t, o.no_load_optim ? MOE_CKPT_NEW_ADAM : 0) != MOE_OK)
            start = 1;
        else if (moe_trainer_steps_done(t) > o.train.train_iters) /* before anything is written */
            start = 2, moe_set_error(MOE_ERR_INVALID, "%s is at step %d, beyond train-iters %d",
                                     ckpt, moe_trainer_steps_done(t), o.train.train_iters);
        else
            snprintf(said, sizeof said, "resumed from %s at step %d%s\n", ckpt,
                     moe_trainer_steps_done(t),
                     o.no_load_optim ? " with new Adam moments (--no-load-optim)" : "");
    } else if (weights[0]) { /* the expert biases too: they route as the weights were trained */
        if (moe_checkpoint_load(weights, m, NULL, 0) != MOE_OK) start = 1;
        else snprintf(said, sizeof said, "initialised from the weights of %s (--finetune)\n",
                      weights);
    } else if (o.init_from[0]) {
        char family[32];
        moe_model_config hc;
        if (moe_hf_config(o.init_from, &hc, family, sizeof family) != MOE_OK ||
            moe_hf_load(o.init_from, family, m) != MOE_OK) {
            start = 1;
        } else {
            int n = snprintf(said, sizeof said, "initialised from %s (%s)\n", o.init_from, family);
            if (o.model.n_layers < hc.n_layers && n > 0 && (size_t)n < sizeof said)
                snprintf(said + n, sizeof said - (size_t)n, "note: the model takes the first %d "
                         "of the %d layers of %s (--num-layers)\n", o.model.n_layers,
                         hc.n_layers, o.init_from); /* as transformers warns: weights unused */
        }
    }
    /* every rank holds its part of the starting point (an expert shard of a checkpoint may
     * fail on one rank only) before rank 0 writes into the run directory: one message, no
     * file touched */
    if (d->world_size > 1) start = setup_outcome(d, start), agreed = told = start != 0;
    if (start) {
        rc = start;
        goto fail;
    }
    fputs(said, stdout);
    int resumed = ckpt[0] && !o.upcycle; /* this run directory's run goes on */
    if (o.save[0] && d->world_rank == 0) { /* metrics and events: rank 0 */
        if (moe_mkdirs(o.save) != MOE_OK) goto fail;
        snprintf(path, sizeof path, "%s/metrics.jsonl", o.save);
        if (resumed && trim_metrics(path, moe_trainer_steps_done(t)) != MOE_OK) goto fail;
        if (!(metrics = fopen(path, resumed ? "a" : "w"))) {
            moe_set_error(MOE_ERR_IO, "cannot write %s: %s", path, strerror(errno));
            goto fail;
        }
    }
    /* events in --tensorboard-dir, else the run directory; none for a run with nothing left to
     * do (an empty file each time) */
    const char *tb_dir = o.tb_dir[0] ? o.tb_dir : o.save;
    if (tb_dir[0] && d->world_rank == 0 && moe_trainer_steps_done(t) < o.train.train_iters) {
        if (moe_mkdirs(tb_dir) != MOE_OK || moe_tfevents_open(tb_dir, moe_wall_time(), &tb))
            goto fail;
        /* TensorBoard drops the events of the steps this run logs again (a stopped run went
         * on past its checkpoint), so that each step shows once */
        int64_t next = moe_trainer_steps_done(t) + 1;
        if (resumed && moe_tfevents_session_start(tb, next, moe_wall_time()) != MOE_OK) goto fail;
    }
    const moe_model_config *mc = &o.model;
    int n_moe = 0;
    for (int l = 0; l < mc->n_layers; l++) n_moe += moe_model_layer_experts(mc, l) > 0;
    printf("moe train: %d layers (%d MoE), d=%d, %zu parameters%s, %lld training tokens, "
           "%d threads", mc->n_layers, n_moe, mc->d, moe_model_param_count(m),
           d->ep > 1 ? " on this rank" : "", (long long)train_tokens, omp_get_max_threads());
    if (d->world_size > 1)
        printf(", %d processes: expert parallel %d x expert-data parallel %d", d->world_size,
               d->ep, d->edp);
    printf("\n");
    int has_val = val_b.n > 0, bytes = train[0].vocab == MOE_BYTE_VOCAB; /* prepare's bytes */
    const char *unit = bytes ? "byte" : "token";
    if (n_sets > 1) {
        printf("data: a blend of %d datasets:", n_sets);
        for (int i = 0; i < n_sets; i++)
            printf(" %s %.4g%s", dirs[i], weight[i], val[i].n_tokens ? "" : " (no validation)");
        printf("\n");
    }
    if (!has_val)
        printf("note: %s%s validation tokens (prepared with --val-fraction 0): no "
               "evaluation\n", n_sets > 1 ? "none of the datasets holds" : val_path,
               n_sets > 1 ? "" : " holds no");
    if (mc->moe.expert_bf16 && !o.device && d->world_rank == 0) /* a few ms */
        moe_cli_bf16_note(moe_gemm_bf16_peak(512, 2), moe_gemm_peak(512, 2),
                          "512^3 GEMMs, measured now");
    double t_start = moe_time_now(), tokens_done = 0, val_nll = -1;
    int total = o.train.train_iters, first = moe_trainer_steps_done(t) + 1;
    int tty = isatty(STDOUT_FILENO) && d->world_size == 1; /* mpirun's output is a pseudo-tty */
    catch_stop_signals();
    for (int step = first; step <= total; step++) {
        moe_step_metrics s = {0};
        double t0 = moe_time_now();
        moe_status ts = moe_trainer_step(t, &s);
        if (s.skipped) {
            printf("%sstep %d skipped: loss %g, gradient norm %g not finite (%d in a row, the run "
                   "stops at %d)\n", tty ? "\r\033[K" : "", step, s.loss, s.grad_norm,
                   s.bad_streak, o.train.max_bad_steps);
            if (ts != MOE_OK && o.save[0]) { /* parameters and optimizer: the last good step */
                printf("saving the last good state\n");
                char why[600] = "";
                if (save_checkpoint(&o, m, t))
                    snprintf(why, sizeof why, " Saving the last good state failed: %s",
                             moe_last_error());
                moe_set_error(ts, "%d consecutive steps had a loss or gradient that is not finite "
                              "(the last: step %d); stopped. Lower lr or check the data.%s",
                              s.bad_streak, step, why);
            }
            agreed = ts != MOE_OK; /* the stop is the ranks' common decision */
        }
        if (ts != MOE_OK) goto fail;
        double dt = moe_time_now() - t0;
        tokens_done += (double)s.tokens;
        double elapsed = moe_time_now() - t_start, tok_s = (double)s.tokens / dt;
        double val = -1;
        if (has_val && ((o.train.eval_interval && step % o.train.eval_interval == 0) ||
                        step == total)) {
            if (moe_trainer_eval(t, &val) != MOE_OK) goto fail;
            val_nll = val;
        }
        int log_now = step % o.log_interval == 0 || step == total || step == first;
        if ((log_now || tty) && !s.skipped) { /* on a terminal the line is redrawn every step */
            char eta[32];
            format_eta(eta, sizeof eta, elapsed / (step - first + 1) * (total - step));
            char load[48] = ""; /* a model without MoE layers has no load */
            if (n_moe)
                snprintf(load, sizeof load, "load max/mean %.2f | ", load_imbalance(t, mc->n_layers));
            printf("%sstep %d/%d | loss %.4f | nll %.4f aux %.4g z %.4g | lr %.2e | gnorm %.3f | "
                   "%s%.0f tok/s | eta %s%s", tty ? "\r\033[K" : "", step, total, s.loss, s.nll,
                   s.aux, s.z, s.lr, s.grad_norm, load, tok_s, eta, log_now ? "\n" : "");
            fflush(stdout);
        }
        if (tty && !log_now && (val >= 0 || (o.save_interval && step % o.save_interval == 0)))
            putchar('\n');
        if (val >= 0)
            printf("eval step %d | val nll %.4f nats/%s (%.3f bits/%s)\n", step, val, unit,
                   val / log(2.0), unit);
        if (metrics &&
            write_metrics(metrics, o.save, step, &s, tok_s, t, mc, val) != MOE_OK)
            goto fail;
        if (tb && write_scalars(tb, step, &s, tok_s, t, mc, val) != MOE_OK) goto fail;
        /* every rank stops at the same step: the decision is read once, after the ranks agreed
         * on it (a signal arriving later on one rank only is taken at the next step) */
        int stop = take_stop_signal();
        if (d->world_size > 1) { /* the signal's number (the highest, if ranks got two) */
            int64_t v = stop;
            stop = moe_comm_max_i64(d->world, &v, 1) != MOE_OK ? SIGTERM : (int)v;
        }
        int exit_now = o.exit_interval && step % o.exit_interval == 0 && step < total;
        int save_now = (o.save_interval && step % o.save_interval == 0) || exit_now;
        if (o.save[0] && (save_now || step == total || stop) && save_checkpoint(&o, m, t))
            goto fail;
        fflush(stdout);
        if (exit_now) {
            printf("exit-interval: stopping after step %d\n", step);
            rc = 0;
            goto fail;
        }
        if (stop) {
            printf("stopped by signal %d after step %d%s\n", stop, step,
                   o.save[0] ? "" : " (no --save: nothing saved)");
            rc = 0, stopped_by = stop; /* exits 128 + the signal's number, as a shell says */
            goto fail;
        }
    }
    if (first > total) {
        printf("nothing to do: the checkpoint is at step %d of %d\n", first - 1, total);
        /* --save to another run directory re-saves it in this run's layout (resharding) */
        char run[MOE_PATH_MAX];
        int elsewhere = moe_checkpoint_run_dir(ckpt, run, sizeof run) || !same_file(run, o.save);
        if (o.save[0] && elsewhere && save_checkpoint(&o, m, t)) goto fail;
    }
    /* a text sample needs a byte model, decoded token by token (not by expert choice) */
    int sample = bytes && mc->vocab == MOE_BYTE_VOCAB && mc->moe.router != MOE_ROUTER_EXPERT_CHOICE;
    printf("done: %d steps in %.1f s (%.0f tokens/s)", total - first + 1, moe_time_now() - t_start,
           tokens_done / (moe_time_now() - t_start));
    if (val_nll >= 0) printf(", final val nll %.4f nats/%s", val_nll, unit); /* none: no eval */
    printf("\n");
    if (o.save[0] && has_val && d->world_size == 1) { /* which experts each topic uses */
        snprintf(path, sizeof path, "%s/topics.json", o.save);
        if (moe_cli_topics(m, &val_b, o.train.micro_batch, path) != MOE_OK) goto fail;
        printf("wrote %s (validation text of each source file routed through the model)\n", path);
    }
    if (sample) { /* other vocabularies: moe convert, then generate --model with a tokenizer */
        printf("sample:\n");
        moe_cli_sampling sp = {0.8f, 0, 1.0f, o.layer.seed, d->world_size > 1 ? d->world : NULL};
        if (moe_cli_generate(m, "The ", 4, 200, &sp, stdout) != MOE_OK) goto fail;
    }
    rc = 0;
fail:
    release_stop_signals();
    if (rc && d->world_size > 1 && !agreed)
        fprintf(stderr, "moe train (rank %d): %s\n", d->world_rank, moe_last_error());
    else if (rc && d->world_rank == 0 && !told)
        fprintf(stderr, "moe train: %s\n", moe_last_error());
    if (rc && d->world_size > 1 && !agreed) moe_dist_abort(d, rc); /* never leave others waiting */
    if (metrics) fclose(metrics);
    moe_tfevents_close(tb);
    moe_trainer_destroy(t);
    moe_model_destroy(m);
    for (int i = 0; i < n_sets; i++) moe_tokens_free(&train[i]), moe_tokens_free(&val[i]);
    return rc ? rc : stopped_by ? 128 + stopped_by : 0;
}
