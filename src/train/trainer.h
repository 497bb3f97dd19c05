/* train/ — the training loop: micro-batches, gradient accumulation, clipping, AdamW, the
 * learning-rate schedule, the expert-bias update, validation. */
#ifndef MOE_TRAIN_TRAINER_H
#define MOE_TRAIN_TRAINER_H

#include "io/data.h"
#include "moe.h"

typedef struct {
    double loss;      /* nll + aux + z, mean over the micro-batches */
    double nll, aux, z;
    double lr;
    double grad_norm; /* before clipping */
    int64_t tokens;   /* tokens processed in this step */
} moe_step_metrics;

typedef struct moe_trainer moe_trainer;

/* The trainer uses (does not own) the model and the data. */
moe_status moe_trainer_create(moe_model *model, const moe_train_config *cfg,
                              const moe_tokens *train, const moe_tokens *val, moe_trainer **out);
void moe_trainer_destroy(moe_trainer *t);
/* One optimizer step over global_batch / micro_batch micro-batches. */
moe_status moe_trainer_step(moe_trainer *t, moe_step_metrics *m);
/* Mean nll over eval_iters validation batches (the same batches every time). */
moe_status moe_trainer_eval(moe_trainer *t, double *val_nll);
int moe_trainer_steps_done(const moe_trainer *t);
/* Tokens each expert of layer l received in the last step (router choices before capacity,
 * summed over the micro-batches); NULL and 0 experts for a dense layer. */
const int64_t *moe_trainer_layer_load(const moe_trainer *t, int l, int *n_experts);

#endif
