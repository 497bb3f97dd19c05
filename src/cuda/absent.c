/* A build without CUDA (nvcc not found, or MOE_CUDA=OFF): the functions of moe_cuda.h exist and
 * say so, so that the tool and the tests build the same everywhere. */
#ifndef MOE_HAVE_CUDA
#include "moe_cuda.h"

#include "core/core.h"
#include "cuda/model.h"
#include "cuda/nn.h"

#include <stddef.h>

static moe_status absent(void) {
    return moe_set_error(MOE_ERR_INVALID, "this build of moe.c has no CUDA backend (nvcc was "
                         "not found when it was configured, or MOE_CUDA was OFF)");
}

int moe_cuda_device_count(void) { return 0; }
const char *moe_cuda_device_name(void) { return "none: this build has no CUDA backend"; }
moe_status moe_cuda_alloc(void **p, size_t bytes) {
    (void)bytes;
    *p = NULL;
    return absent();
}
void moe_cuda_free(void *p) { (void)p; }
moe_status moe_cuda_to_device(void *dst, const void *src, size_t bytes) {
    (void)dst, (void)src, (void)bytes;
    return absent();
}
moe_status moe_cuda_to_host(void *dst, const void *src, size_t bytes) {
    (void)dst, (void)src, (void)bytes;
    return absent();
}
moe_status moe_cuda_synchronize(void) { return absent(); }
moe_status moe_cuda_host_register(void *p, size_t bytes) {
    (void)p, (void)bytes;
    return absent();
}
void moe_cuda_host_unregister(void *p) { (void)p; }
moe_status moe_cuda_layer_create(const moe_layer_config *cfg, int max_tokens, float *params,
                                 float *grads, moe_cuda_layer **out) {
    (void)cfg, (void)max_tokens, (void)params, (void)grads;
    *out = NULL;
    return absent();
}
void moe_cuda_layer_destroy(moe_cuda_layer *L) { (void)L; }
moe_status moe_cuda_layer_set_params(moe_cuda_layer *L, const float *params,
                                     const float *expert_bias) {
    (void)L, (void)params, (void)expert_bias;
    return absent();
}
moe_status moe_cuda_layer_set_expert_bias(moe_cuda_layer *L, const float *expert_bias) {
    (void)L, (void)expert_bias;
    return absent();
}
void moe_cuda_layer_weights_changed(moe_cuda_layer *L) { (void)L; }
moe_status moe_cuda_layer_init_params(moe_cuda_layer *L, uint64_t seed, float std) {
    (void)L, (void)seed, (void)std;
    return absent();
}
moe_status moe_cuda_layer_get_grads(moe_cuda_layer *L, float *grads) {
    (void)L, (void)grads;
    return absent();
}
moe_status moe_cuda_layer_zero_grads(moe_cuda_layer *L) {
    (void)L;
    return absent();
}
moe_status moe_cuda_layer_forward(moe_cuda_layer *L, float *out, const float *x, int T,
                                  const moe_forward_args *args) {
    (void)L, (void)out, (void)x, (void)T, (void)args;
    return absent();
}
moe_status moe_cuda_layer_backward(moe_cuda_layer *L, float *dx, const float *dout,
                                   const float *x) {
    (void)L, (void)dx, (void)dout, (void)x;
    return absent();
}
const moe_layer_stats *moe_cuda_layer_get_stats(const moe_cuda_layer *L) {
    (void)L;
    return NULL;
}
moe_status moe_cuda_layer_fetch_routing(moe_cuda_layer *L, const moe_routing **out) {
    (void)L;
    *out = NULL;
    return absent();
}
void moe_cuda_layer_time_stages(moe_cuda_layer *L, int on) { (void)L, (void)on; }
const double *moe_cuda_layer_stage_times(const moe_cuda_layer *L) {
    (void)L;
    return NULL;
}
double moe_cuda_copy_bandwidth(size_t bytes, int reps) {
    (void)bytes, (void)reps;
    return -1;
}
double moe_cuda_gemm_seconds(int ta, int tb, int m, int n, int k, int bf16, int reps) {
    (void)ta, (void)tb, (void)m, (void)n, (void)k, (void)bf16, (void)reps;
    return -1;
}
moe_status moe_cuda_model_create(const moe_cuda_model_plan *p, int max_tokens,
                                 moe_cuda_model **out) {
    (void)p, (void)max_tokens;
    *out = NULL;
    return absent();
}
void moe_cuda_model_destroy(moe_cuda_model *g) { (void)g; }
moe_status moe_cuda_model_forward(moe_cuda_model *g, const float *params,
                                  const float *const *expert_bias, const int32_t *tokens,
                                  const int32_t *targets, int B, int S,
                                  const moe_model_args *args, moe_model_loss *loss) {
    (void)g, (void)params, (void)expert_bias, (void)tokens, (void)targets, (void)B, (void)S;
    (void)args, (void)loss;
    return absent();
}
moe_status moe_cuda_model_decode(moe_cuda_model *g, const float *params,
                                 const float *const *expert_bias, const int32_t *tokens, int n,
                                 int past) {
    (void)g, (void)params, (void)expert_bias, (void)tokens, (void)n, (void)past;
    return absent();
}
const moe_layer_stats *moe_cuda_model_layer_stats(const moe_cuda_model *g, int l) {
    (void)g, (void)l;
    return NULL;
}
moe_status moe_cuda_model_logits(const moe_cuda_model *g, float *out, int row, int n) {
    (void)g, (void)out, (void)row, (void)n;
    return absent();
}
moe_status moe_cuda_model_backward(moe_cuda_model *g, float *grads) {
    (void)g, (void)grads;
    return absent();
}
moe_status moe_cuda_model_optim_init(moe_cuda_model *g, const uint8_t *decay) {
    (void)g, (void)decay;
    return absent();
}
moe_status moe_cuda_model_params_io(moe_cuda_model *g, float *host, int to_device) {
    (void)g, (void)host, (void)to_device;
    return absent();
}
moe_status moe_cuda_model_grads_io(moe_cuda_model *g, float *host, int to_device) {
    (void)g, (void)host, (void)to_device;
    return absent();
}
moe_status moe_cuda_model_zero_grads(moe_cuda_model *g) {
    (void)g;
    return absent();
}
moe_status moe_cuda_model_adam_io(moe_cuda_model *g, float *m, float *v, int to_device) {
    (void)g, (void)m, (void)v, (void)to_device;
    return absent();
}
moe_status moe_cuda_model_grad_sumsq(moe_cuda_model *g, double *out) {
    (void)g;
    *out = 0;
    return absent();
}
moe_status moe_cuda_model_adamw(moe_cuda_model *g, const moe_cuda_adamw *h) {
    (void)g, (void)h;
    return absent();
}
moe_status moe_cuda_model_set_grad(moe_cuda_model *g, size_t i, float v) {
    (void)g, (void)i, (void)v;
    return absent();
}
moe_status moe_cuda_rmsnorm_forward(float *y, float *rstd, const float *x, const float *w, int T,
                                    int d, float eps) {
    (void)y, (void)rstd, (void)x, (void)w, (void)T, (void)d, (void)eps;
    return absent();
}
moe_status moe_cuda_rmsnorm_backward(float *dx, float *dw, const float *dy, const float *x,
                                     const float *w, const float *rstd, int T, int d) {
    (void)dx, (void)dw, (void)dy, (void)x, (void)w, (void)rstd, (void)T, (void)d;
    return absent();
}
moe_status moe_cuda_rope_rotate(float *x, int T, int n_heads, int head_stride, int rd,
                                const int32_t *pos, int interleave, const float *cs, int n_cs,
                                int dir) {
    (void)x, (void)T, (void)n_heads, (void)head_stride, (void)rd, (void)pos, (void)interleave;
    (void)cs, (void)n_cs, (void)dir;
    return absent();
}
moe_status moe_cuda_attention_forward(float *out, float *lse, const float *q, const float *k,
                                      const float *v, const moe_attn_dims *a) {
    (void)out, (void)lse, (void)q, (void)k, (void)v, (void)a;
    return absent();
}
moe_status moe_cuda_attention_backward(float *dq, float *dk, float *dv, const float *dout,
                                       const float *out, const float *lse, const float *q,
                                       const float *k, const float *v, const moe_attn_dims *a,
                                       float *scratch) {
    (void)dq, (void)dk, (void)dv, (void)dout, (void)out, (void)lse, (void)q, (void)k, (void)v;
    (void)a, (void)scratch;
    return absent();
}
moe_status moe_cuda_attention_cached(float *out, const float *q, const float *k, const float *v,
                                     int n, int P, const moe_attn_dims *a, float *scratch,
                                     size_t scratch_floats) {
    (void)out, (void)q, (void)k, (void)v, (void)n, (void)P, (void)a, (void)scratch;
    (void)scratch_floats;
    return absent();
}
moe_status moe_cuda_xent(float *dlogits, double *row_loss, double *sum_out, int *n_counted_dev,
                         const float *logits, const int32_t *y, int T, int V, float scale) {
    (void)dlogits, (void)row_loss, (void)sum_out, (void)n_counted_dev, (void)logits, (void)y;
    (void)T, (void)V, (void)scale;
    return absent();
}
moe_status moe_cuda_embed_forward(float *x, const float *emb, const int32_t *tok, int T, int d) {
    (void)x, (void)emb, (void)tok, (void)T, (void)d;
    return absent();
}
moe_status moe_cuda_embed_backward(float *g_emb, const float *dx, const int32_t *tok, int T,
                                   int d) {
    (void)g_emb, (void)dx, (void)tok, (void)T, (void)d;
    return absent();
}
moe_status moe_cuda_add(float *y, const float *a, const float *b, size_t n) {
    (void)y, (void)a, (void)b, (void)n;
    return absent();
}
#else
typedef int moe_cuda_absent_unused; /* ISO C: a translation unit is not empty */
#endif
