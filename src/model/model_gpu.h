/* Training on the GPU (model.c), for the trainer: with moe_model_gpu_train_begin the
 * parameters, gradients and AdamW's moments live on the GPU; moe_model_params and
 * moe_model_grads bring host copies up to date when asked for. Private. */
#ifndef MOE_MODEL_GPU_H
#define MOE_MODEL_GPU_H

#include "cuda/model.h"
#include "moe.h"

/* Whether the model runs on the GPU (moe_model_use_device). */
int moe_model_on_gpu(const moe_model *m);
/* For a model on the GPU (moe_model_use_device "cuda"): from now on the optimizer runs there,
 * from zero moments (one trainer at a time). */
moe_status moe_model_gpu_train_begin(moe_model *m);
int moe_model_gpu_training(const moe_model *m);
/* The trainer is done: the parameters come back to the host, which holds them from now on. */
void moe_model_gpu_train_end(moe_model *m);
/* The gradients' sum of squares (float64, a fixed order). */
moe_status moe_model_gpu_grad_sumsq(moe_model *m, double *ss);
/* Gradient element i = v (fault injection). */
moe_status moe_model_gpu_set_grad(moe_model *m, size_t i, float v);
/* One AdamW step on the GPU; state_in: copy the moments adam_m, adam_v [n_params] in first
 * (they were loaded or changed on the host). The gradients are zeroed. */
moe_status moe_model_gpu_adamw(moe_model *m, float *adam_m, float *adam_v, int state_in,
                               const moe_cuda_adamw *h);
/* The moments back into adam_m, adam_v [n_params]. */
moe_status moe_model_gpu_adam_out(moe_model *m, float *adam_m, float *adam_v);

#endif
