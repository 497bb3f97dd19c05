/* train/ — the training loop: micro-batches, gradient accumulation, clipping, AdamW, the
 * learning-rate schedule, the expert-bias update, validation. */
#ifndef MOE_TRAIN_TRAINER_H
#define MOE_TRAIN_TRAINER_H

#include "dist/comm.h"
#include "io/data.h"
#include "moe.h"

typedef struct {
    double loss;      /* nll + aux + z, mean over the micro-batches */
    double nll, aux, z;
    double aux_terms[MOE_LB_GLOBAL_AUX + 1]; /* aux's Switch-style part by type (CPU) */
    double lr;
    double grad_norm; /* before clipping */
    int64_t tokens;   /* tokens processed in this step */
    int skipped;      /* the loss or the gradient was not finite: nothing was updated */
    int bad_streak;   /* consecutive skipped steps up to this one */
} moe_step_metrics;

typedef struct moe_trainer moe_trainer;

/* Checks that the data fits the model: sequences shorter than the data, same vocabulary. */
moe_status moe_trainer_check_data(const moe_model_config *mc, const moe_tokens *train,
                                  const moe_tokens *val);
/* The trainer uses (does not own) the model and the data. */
moe_status moe_trainer_create(moe_model *model, const moe_train_config *cfg,
                              const moe_tokens *train, const moe_tokens *val, moe_trainer **out);
/* The same over blends of datasets (val NULL: no validation); the blends are copied, their
 * token sets used. */
moe_status moe_trainer_create_blend(moe_model *model, const moe_train_config *cfg,
                                    const moe_blend *train, const moe_blend *val,
                                    moe_trainer **out);
void moe_trainer_destroy(moe_trainer *t);
/* One optimizer step over global_batch / micro_batch micro-batches. A step whose loss or
 * gradient is not finite is skipped (m->skipped; nothing is updated, the step counter moves
 * on); the max_bad_steps-th skipped step in a row returns MOE_ERR_STATE, with m filled and the
 * model and optimizer state still those of the last good step. The model's gradients belong
 * to the trainer between steps: an update leaves them zero and the next step relies on it. */
moe_status moe_trainer_step(moe_trainer *t, moe_step_metrics *m);
/* Data and expert parallelism over the ranks of d (NULL or one rank: none): rank r runs its
 * share of the global batch's micro-batches; gradients are summed over the ranks holding the
 * same parameters; losses, counts and the gradient norm are those of the global batch. */
moe_status moe_trainer_set_dist(moe_trainer *t, moe_dist *d);
/* The global batch splits into micro-batches over d's data-parallel processes (every rank,
 * or with ep_replicated the expert-data-parallel group): set_dist checks it, and a distributed
 * run's set-up before anything is loaded. */
moe_status moe_train_check_dp_batch(const moe_train_config *c, int ep_replicated,
                                    const moe_dist *d);
/* Fault injection for tests: "KIND@STEP" or "KIND@FIRST-LAST", comma-separated, KIND one of
 * nan-loss, inf-loss, nan-grad, inf-grad (a NaN/Inf written into the loss or into one
 * gradient element of those steps, 1-based). "" clears; t NULL: only checks spec. */
moe_status moe_trainer_set_faults(moe_trainer *t, const char *spec);
/* Mean nll over eval_iters validation batches (the same batches every time). */
moe_status moe_trainer_eval(moe_trainer *t, double *val_nll);
int moe_trainer_steps_done(const moe_trainer *t);
/* Tokens each expert of layer l received in the last step (router choices before capacity,
 * summed over the micro-batches); NULL and 0 experts for a dense layer. */
const int64_t *moe_trainer_layer_load(const moe_trainer *t, int l, int *n_experts);

/* Fraction of layer l's routed slots that capacity dropped in the last step. */
double moe_trainer_layer_dropped(const moe_trainer *t, int l);

/* ---- checkpoints (checkpoint.c) ----
 * A checkpoint is a directory SAVE/step-NNNNNNNN holding model.safetensors (the parameters
 * under their Hugging Face-style names; the options as text in __metadata__ "moe.config")
 * and trainer.safetensors (Adam moments, expert biases; step and seed in the metadata).
 * SAVE/latest names the newest one. */

/* Saves the state after moe_trainer_steps_done() steps; keeps the newest keep_last. */
moe_status moe_checkpoint_save(const char *save_dir, int keep_last, const char *config_text,
                               moe_model *m, moe_trainer *t);
/* Resolves DIR (a run directory with "latest", or a checkpoint directory) to a checkpoint
 * directory. */
moe_status moe_checkpoint_resolve(const char *dir, char *ckpt, size_t cap);
/* What shows that directory dir holds a moe run or checkpoint (a 'latest' file, metrics.jsonl,
 * trainer state, step-N directories), in words, or NULL when nothing does. */
const char *moe_checkpoint_run_marker(const char *dir);
/* The run directory holding checkpoint directory ckpt (its parent, when ckpt is a step-N
 * directory) into out; -1 when ckpt is not in one. */
int moe_checkpoint_run_dir(const char *ckpt, char *out, size_t cap);
/* The step of the newest step-N directory in dir that holds a whole checkpoint (not a save that
 * stopped before its last file), or -1 when there is none. */
int moe_checkpoint_newest_step(const char *dir);
/* The options text stored in a checkpoint (malloc'ed). */
moe_status moe_checkpoint_config(const char *ckpt, char **config_text);
/* moe_checkpoint_load flags: Adam starts over (its moments are not read: zero, no updates
 * counted), as Megatron's --no-load-optim; the step, the schedule and the expert biases go on */
#define MOE_CKPT_NEW_ADAM 1u
/* Loads parameters (by name, shapes checked; every value finite) and, if t is not NULL, the
 * trainer state. */
moe_status moe_checkpoint_load(const char *ckpt, moe_model *m, moe_trainer *t, unsigned flags);
/* Every MoE layer's selection bias (moe_layer_expert_bias) from the tensors named fmt % layer
 * (e.g. DeepSeek-V3's e_score_correction_bias); none changes on failure. */
moe_status moe_checkpoint_load_expert_bias(const char *dir, moe_model *m, const char *fmt);
/* Megatron's upcycling (--moe-use-upcycling): m's parameters from a dense checkpoint's, the
 * tensors they share by name copied, each MoE layer's experts made from that layer's dense MLP
 * and its router's initial rows repeated per group (docs/FORMATS.md, "Upcycling"); with t, the
 * dense run's step too (Adam starts over). An expert-parallel rank makes its own experts.
 * Refused when the checkpoint holds a tensor that is none of these, or m has parts a dense
 * model lacks (shared experts, the residual mix, the cosine router, expert biases). */
moe_status moe_checkpoint_upcycle(const char *ckpt, moe_model *m, moe_trainer *t);
typedef void (*rename_fn)(const char *ours, char *buf, size_t cap, const void *ctx);
/* Loads every parameter of m from a directory's safetensors (one model.safetensors, or shards
 * named by model.safetensors.index.json), each stored under the name rename gives (NULL: our
 * own name); F32, BF16, F16 or F64; shapes checked; nothing changes in m on failure. Refused
 * when the files hold a tensor that is none of the model's and not skip(name, ctx). */
moe_status moe_checkpoint_load_params(const char *dir, moe_model *m, rename_fn rename,
                                      int (*skip)(const char *name, const void *ctx),
                                      const void *ctx);

/* The process grid the trainer runs on (NULL: one process). */
moe_dist *moe_trainer_dist(const moe_trainer *t);

/* Trainer state for checkpoints. */
float *moe_trainer_adam_m(moe_trainer *t); /* [n_params] */
float *moe_trainer_adam_v(moe_trainer *t); /* [n_params] */
void moe_trainer_set_step(moe_trainer *t, int step);
/* Consecutive skipped steps up to the last one (--max-bad-steps counts on across a resume). */
int moe_trainer_bad_streak(const moe_trainer *t);
void moe_trainer_set_bad_streak(moe_trainer *t, int n);
/* Optimizer updates applied (the steps done less the skipped ones): Adam's bias correction. */
int moe_trainer_updates(const moe_trainer *t);
void moe_trainer_set_updates(moe_trainer *t, int n);
/* Adam starts over: zero moments, no updates counted (the step and the schedule go on). */
void moe_trainer_reset_optimizer(moe_trainer *t);
const moe_train_config *moe_trainer_config(const moe_trainer *t);

#endif
