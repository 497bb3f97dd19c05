/* moe.c on NVIDIA GPUs: the MoE layer's forward and backward on one GPU (src/cuda/).
 *
 * Built when CMake finds nvcc (and MOE_CUDA is ON); without it every function below exists and
 * fails with MOE_ERR_INVALID ("built without CUDA"), and moe_cuda_device_count() is 0. Pointers
 * marked (device) are GPU memory (moe_cuda_alloc); everything else is host memory.
 *
 * The layer follows the CPU layer (moe_layer_*, docs/LAYER.md) for the configurations it
 * supports: token-choice top-k routing with softmax, sigmoid or sqrt-softplus scores, top-k
 * before or after the softmax, renormalisation, route_scale, group-limited routing, the
 * selection bias, the aux loss (micro-batch and per sequence) and the z-loss, dropless dispatch,
 * every activation, fp32 or bf16 experts (expert_bf16: bf16 operands, fp32 accumulation, fp32
 * master weights), a shared expert with or without its gate, a token mask. moe_cuda_layer_create refuses the rest by name. Results are
 * deterministic: every reduction has a fixed order (no floating-point atomics). */
#ifndef MOE_CUDA_H
#define MOE_CUDA_H

#include "moe.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Number of usable GPUs (0 without a GPU, without a driver, or in a build without CUDA). */
int moe_cuda_device_count(void);
/* The first GPU's name, or a reason there is none. */
const char *moe_cuda_device_name(void);

moe_status moe_cuda_alloc(void **p, size_t bytes); /* (device) */
void moe_cuda_free(void *p);
moe_status moe_cuda_to_device(void *dst, const void *src, size_t bytes);
moe_status moe_cuda_to_host(void *dst, const void *src, size_t bytes);
moe_status moe_cuda_synchronize(void);
/* Pins host memory for faster copies (page-locked); unregister before freeing it. */
moe_status moe_cuda_host_register(void *p, size_t bytes);
void moe_cuda_host_unregister(void *p);

typedef struct moe_cuda_layer moe_cuda_layer;

/* A layer for up to max_tokens tokens per call: parameters, gradients and the workspace on the
 * GPU (parameters and gradients in the order and layout of moe_layer_params). params and grads
 * (device, moe_layer_param_count floats each) are the caller's, or NULL: the layer's own. */
moe_status moe_cuda_layer_create(const moe_layer_config *cfg, int max_tokens, float *params,
                                 float *grads, moe_cuda_layer **out);
void moe_cuda_layer_destroy(moe_cuda_layer *L);
/* Copies in params [moe_layer_param_count] and, if not NULL, the selection bias [E]. */
moe_status moe_cuda_layer_set_params(moe_cuda_layer *L, const float *params,
                                     const float *expert_bias);
/* Copies in the selection bias [E] (host). */
moe_status moe_cuda_layer_set_expert_bias(moe_cuda_layer *L, const float *expert_bias);
/* The parameters were written on the GPU: the bf16 copies kept for moe_forward_args.reuse_bf16
 * are stale (moe_layer_weights_changed; moe_cuda_layer_set_params and _init_params say so
 * themselves). */
void moe_cuda_layer_weights_changed(moe_cuda_layer *L);
/* Normal(0, std) parameters drawn on the GPU from seed (not the CPU layer's values). */
moe_status moe_cuda_layer_init_params(moe_cuda_layer *L, uint64_t seed, float std);
moe_status moe_cuda_layer_get_grads(moe_cuda_layer *L, float *grads);
moe_status moe_cuda_layer_zero_grads(moe_cuda_layer *L);

/* out [T, d] (device) = MoE(x [T, d] (device)); args->mask is host memory. */
moe_status moe_cuda_layer_forward(moe_cuda_layer *L, float *out, const float *x, int T,
                                  const moe_forward_args *args);
/* dx [T, d] (device) += dL/dx, gradients += dL/dθ (aux and z-loss included), as
 * moe_layer_backward; once per forward. */
moe_status moe_cuda_layer_backward(moe_cuda_layer *L, float *dx, const float *dout,
                                   const float *x);
/* Counts, losses and routing of the last forward (host copies; routing after
 * moe_cuda_layer_fetch_routing). */
const moe_layer_stats *moe_cuda_layer_get_stats(const moe_cuda_layer *L);
moe_status moe_cuda_layer_fetch_routing(moe_cuda_layer *L, const moe_routing **out);
/* Seconds per stage (moe_stage), summed over calls while timing is on; timing waits for the
 * GPU at the end of each backward. */
void moe_cuda_layer_time_stages(moe_cuda_layer *L, int on);
const double *moe_cuda_layer_stage_times(const moe_cuda_layer *L);

/* Benchmarks: seconds of one row-major GEMM C [m, n] = op(A) op(B) (ta, tb: transposed) on the
 * GPU, the best of reps after a warm-up, with bf16 operands and fp32 accumulation (bf16 = 1)
 * or in fp32, on random operands; a negative value if it could not run. */
double moe_cuda_gemm_seconds(int ta, int tb, int m, int n, int k, int bf16, int reps);
/* The GPU memory's bandwidth (bytes/s, read and written counted): the best of reps device-to-
 * device copies of bytes; a negative value if it could not run. */
double moe_cuda_copy_bandwidth(size_t bytes, int reps);

#ifdef __cplusplus
}
#endif
#endif
