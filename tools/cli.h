/* The commands of the moe tool: each takes the arguments after its name and returns the
 * exit code (0 ok, 1 runtime error, 2 usage error). */
#ifndef MOE_TOOLS_CLI_H
#define MOE_TOOLS_CLI_H

int moe_cmd_demo(int argc, char **argv);
int moe_cmd_prepare(int argc, char **argv);
int moe_cmd_train(int argc, char **argv);
int moe_cmd_generate(int argc, char **argv);
int moe_cmd_eval(int argc, char **argv);
int moe_cmd_eval_hf(int argc, char **argv); /* moe eval --model DIR */
int moe_cmd_convert(int argc, char **argv);
int moe_cmd_generate_hf(int argc, char **argv); /* moe generate --model DIR */
int moe_cli_inspect_hf(const char *dir); /* moe inspect DIR with config.json */
int moe_cmd_tokenize(int argc, char **argv); /* moe tokenize --model DIR */
int moe_cmd_inspect(int argc, char **argv);
int moe_cmd_report(int argc, char **argv);
int moe_cmd_bench(int argc, char **argv);

#include "dist/comm.h"
#include "io/data.h"
#include "io/options.h"

#include <stdint.h>
#include <stdio.h>

/* A line of metrics.jsonl (n bytes, without its newline) as the JSON object it holds, or NULL
 * when it is not exactly one (a NUL, a crash's tail, never is); the caller deletes it. */
struct cJSON *moe_cli_metrics_record(const char *line, size_t n);

/* The options command cmd ("train", "bench layer") reads (moe.c's table). */
const moe_options_use *moe_cli_use(const char *cmd);
/* Options of a command: with --load, the checkpoint's options first (ckpt receives the
 * checkpoint directory), then the command line's flags, each one that cmd reads
 * (moe_cli_use); validated for a model and training. Returns an exit code (0 ok). */
int moe_cli_options(moe_options *o, const char *cmd, int argc, char **argv, char *ckpt,
                    size_t cap);
/* Applies --threads (0: OpenMP's default, OMP_NUM_THREADS or all cores). */
void moe_cli_threads(const moe_options *o);
/* 2 (with one line on stderr) when --device cuda was given to a command that runs on the CPU. */
int moe_cli_cpu_only(const moe_options *o, const char *cmd);
/* With --model DIR, --load too or an option that describes the model (DIR's config.json
 * does): a usage error (printed; returns 2), else 0. */
int moe_cli_hf_flags(const moe_options *o, const char *cmd);
/* The text of --prompt or --prompt-file (malloc'd, NUL-terminated, *len bytes; *text NULL
 * with neither; both: an error). */
moe_status moe_cli_prompt(const moe_options *o, char **text, size_t *len);
/* The tokenizer of --model: DIR/tokenizer.json, or a GGUF file's vocabulary (an error names
 * what is missing). */
typedef struct moe_tokenizer moe_tokenizer;
moe_status moe_cli_load_tokenizer(const char *model, moe_tokenizer **t);
/* Appends up to n_new tokens sampled from m to ids[0..*n) (room for *n + n_new), through the
 * KV cache in calls of at most max_chunk tokens (at most the model's max_tokens); when the
 * sequence outgrows the model's seq_len, the window slides: the cache starts again from the
 * last half window. emit (may be NULL) sees each new token; a token of stop[0..n_stop) ends
 * the continuation after it. Token i is drawn with moe_rng_uniform64(seed, MOE_RNG_SAMPLE, i):
 * a run and its Hugging Face conversion continue a sequence alike. With agree, every rank of
 * that group takes rank 0's token: the ranks of a distributed run decode in lockstep, and
 * logits that differ in a last bit between them must not part their ways. */
typedef struct {
    float temperature;
    int top_k;
    float top_p;
    uint64_t seed;
    moe_comm *agree; /* NULL: one process */
} moe_cli_sampling;
moe_status moe_cli_continue(moe_model *m, int32_t *ids, int *n, int n_new, int max_chunk,
                            const moe_cli_sampling *sp, const int32_t *stop, int n_stop,
                            void (*emit)(void *ctx, int32_t token), void *ctx);
/* Writes the prompt (len bytes) and up to n_new sampled bytes (moe_cli_continue, stopping at
 * the end-of-text byte). A model of moe prepare's byte tokens only: another vocabulary is an
 * error. */
moe_status moe_cli_generate(moe_model *m, const char *prompt, size_t len, int n_new,
                            const moe_cli_sampling *sp, FILE *f);
/* The error of a generated token whose logits are not finite (moe_sample returned -1). */
moe_status moe_cli_logits_error(int token);

/* With bf16 experts, a note when this CPU's bf16 GEMM rate peak16 is below its fp32 rate peak
 * (measured by the caller, `how`): fp32 experts would be faster. */
void moe_cli_bf16_note(double peak16, double peak, const char *how);

/* Routes each source file's text of `data` through the model (inference) and writes the
 * expert counts per topic and MoE layer to path (JSON). */
/* GEMM floating-point operations of one forward of a layer call (router, the expert rows that
 * ran, shared expert); a backward is twice these. */
double moe_cli_layer_flops(const moe_layer_config *c, int T, const moe_layer_stats *st);

/* path (topics.json): the experts each source file's text routes to, the sources of data's sets
 * one after another, in batches of batch sequences. */
moe_status moe_cli_topics(moe_model *m, const moe_blend *data, int batch, const char *path);

#endif
