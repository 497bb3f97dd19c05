/* The MoE transformer's forward and backward on one GPU (model.cu), driven by model/model.c
 * when a model runs with the device "cuda" (moe_model_use_device). The parameters stay in the
 * host's vector: each forward copies them in, each backward adds the gradients back, so the
 * trainer, the optimizer and the checkpoints work as on the CPU. Private. */
#ifndef MOE_CUDA_MODEL_H
#define MOE_CUDA_MODEL_H

#include "moe.h"

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* One block's tensors: offsets into the parameter vector (SIZE_MAX: absent). */
typedef struct {
    size_t attn_norm, wq, wk, wv, wo, ffn_norm;
    size_t w_in, w_out;               /* dense FFN */
    size_t moe;                       /* the MoE layer's parameter vector */
    const moe_layer_config *moe_cfg;  /* NULL: a dense block */
} moe_cuda_block_plan;

/* What model.c knows of the model (it keeps the plan's pointers alive). */
typedef struct {
    const moe_model_config *cfg;
    int hd, kvh;              /* head width, key/value heads */
    float att_scale;          /* scores q.k * this */
    const float *rope_cs;     /* host [seq_len, hd]: moe_rope_table */
    size_t n_params, emb_off, final_norm_off, lm_off;
    const moe_cuda_block_plan *blocks; /* [n_layers] */
} moe_cuda_model_plan;

typedef struct moe_cuda_model moe_cuda_model;

/* MOE_ERR_INVALID (naming it) for what the GPU model does not compute. */
moe_status moe_cuda_model_create(const moe_cuda_model_plan *p, int max_tokens,
                                 moe_cuda_model **out);
void moe_cuda_model_destroy(moe_cuda_model *g);
/* params [n_params] (NULL: the GPU's as they are) and expert_bias[l] ([E] of MoE block l, NULL for dense blocks) are host
 * memory, copied in; tokens and targets [B*S] as for moe_model_forward (checked by the
 * caller; targets NULL or < 0: none). */
moe_status moe_cuda_model_forward(moe_cuda_model *g, const float *params,
                                  const float *const *expert_bias, const int32_t *tokens,
                                  const int32_t *targets, int B, int S,
                                  const moe_model_args *args, moe_model_loss *loss);
/* Incremental decoding (moe_model_decode) of one sequence: n tokens at positions past ..
 * past + n - 1 (n <= max_tokens, past + n <= seq_len) attend to the keys and values of the
 * positions before, kept on the GPU from the earlier calls (allocated at the first), and add
 * theirs; logits as after a forward (rows 0 .. n - 1). params as for the forward. */
moe_status moe_cuda_model_decode(moe_cuda_model *g, const float *params,
                                 const float *const *expert_bias, const int32_t *tokens, int n,
                                 int past);
/* Counts and losses of MoE block l in the last forward. */
const moe_layer_stats *moe_cuda_model_layer_stats(const moe_cuda_model *g, int l);
/* out [n, V] (host) = the logits of rows [row, row + n) of the last forward. */
moe_status moe_cuda_model_logits(const moe_cuda_model *g, float *out, int row, int n);
/* grads [n_params] (host) = the gradients of the last forward (overwritten); grads NULL: they
 * are added into the GPU's gradients instead (training on the GPU). */
moe_status moe_cuda_model_backward(moe_cuda_model *g, float *grads);

/* Training on the GPU: AdamW's moments (zeroed at each init) and the weight-decay mask decay [n_params]
 * (1: decayed) on the GPU; copies of the parameters, gradients and moments either way; the
 * gradients' sum of squares (float64, a fixed order); one AdamW step (the trainer's formula,
 * gradients zeroed as read); one gradient value set (fault injection). */
typedef struct {
    float clip, lr, b1, b2, wd, eps, bc1, bc2;
} moe_cuda_adamw;
moe_status moe_cuda_model_optim_init(moe_cuda_model *g, const uint8_t *decay);
moe_status moe_cuda_model_params_io(moe_cuda_model *g, float *host, int to_device);
moe_status moe_cuda_model_grads_io(moe_cuda_model *g, float *host, int to_device);
moe_status moe_cuda_model_zero_grads(moe_cuda_model *g);
moe_status moe_cuda_model_adam_io(moe_cuda_model *g, float *m, float *v, int to_device);
moe_status moe_cuda_model_grad_sumsq(moe_cuda_model *g, double *out);
moe_status moe_cuda_model_adamw(moe_cuda_model *g, const moe_cuda_adamw *h);
moe_status moe_cuda_model_set_grad(moe_cuda_model *g, size_t i, float v);

#ifdef __cplusplus
}
#endif
#endif
