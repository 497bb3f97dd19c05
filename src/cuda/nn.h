/* The transformer kernels on one NVIDIA GPU (private): the GPU versions of kernels/nn.c's
 * RMSNorm, RoPE, causal grouped-query attention and cross-entropy, and of the model's
 * embedding, with the same semantics (which outputs are overwritten and which are added into,
 * masked entries, ignored targets). Every pointer is device memory; everything runs on the
 * default stream; launch errors come back as MOE_ERR_INVALID with a message (moe_last_error).
 * Every reduction has a fixed order (no floating-point atomics): results are bitwise repeatable.
 * Results equal the CPU's within fp32 rounding (sums in another order, expf instead of
 * moe_exp_vec, attention's softmax taken online); RoPE, the embedding and moe_cuda_add do the
 * CPU's operations in its order. */
#ifndef MOE_CUDA_NN_H
#define MOE_CUDA_NN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#include "kernels/kernels.h" /* moe_attn_dims */
#include "moe.h"

/* y [T, d] = x * rstd * w and rstd [T] = 1 / sqrt(mean(x^2) + eps), both overwritten
 * (moe_rmsnorm_forward). */
moe_status moe_cuda_rmsnorm_forward(float *y, float *rstd, const float *x, const float *w, int T,
                                    int d, float eps);
/* dx [T, d] += dL/dx and dw [d] += dL/dw from dy [T, d], x [T, d], w [d], rstd [T]
 * (moe_rmsnorm_backward); dw's sum over the tokens in a fixed order. */
moe_status moe_cuda_rmsnorm_backward(float *dx, float *dw, const float *dy, const float *x,
                                     const float *w, const float *rstd, int T, int d);

/* moe_rope_rotate in place with the table cs [n_cs, rd] of moe_rope_table (made on the host,
 * copied to the GPU): the first rd values of each of the n_heads heads (head_stride apart; a
 * token's heads n_heads * head_stride apart) of the T tokens, at positions pos [T], rotate as
 * pairs (i, i + rd/2), or (2i, 2i + 1) with interleave; dir +1 forward, -1 backward (the
 * opposite angle). Every pos[t] must lie in [0, n_cs): the CPU computes the angles of other
 * positions, this needs them in the table, so the caller checks the positions (on the host)
 * and refuses the others with MOE_ERR_INVALID. A token with a position outside the table is
 * left unchanged. */
moe_status moe_cuda_rope_rotate(float *x, int T, int n_heads, int head_stride, int rd,
                                const int32_t *pos, int interleave, const float *cs, int n_cs,
                                int dir);

/* Causal attention (moe_attention_forward) by flash-style tiles, which never store the S x S
 * probabilities: q [B*S, H*dk], k [B*S, KV*dk], v [B*S, KV*dv] (query head h reads kv head
 * h / (H/KV)); scores q.k * scale, key j <= query i. Overwrites out [B*S, H*dv] and
 * lse [B, H, S] (the log of each query row's sum of exp(score), saved for backward in place
 * of the probabilities). dk and dv in 1 .. 256; B H S at most INT_MAX. */
moe_status moe_cuda_attention_forward(float *out, float *lse, const float *q, const float *k,
                                      const float *v, const moe_attn_dims *a);
/* Backward (moe_attention_backward): dq [B*S, H*dk] += dL/dq, dk [B*S, KV*dk] += dL/dk,
 * dv [B*S, KV*dv] += dL/dv from dout [B*S, H*dv] and the forward's out [B*S, H*dv] and
 * lse [B, H, S] (the probabilities are recomputed from q, k and lse). scratch [B*H*S] floats
 * receives D = dout . out of each (sequence, head, query) row. */
moe_status moe_cuda_attention_backward(float *dq, float *dk, float *dv, const float *dout,
                                       const float *out, const float *lse, const float *q,
                                       const float *k, const float *v, const moe_attn_dims *a,
                                       float *scratch);

/* Attention of n new queries over a key/value cache (moe_attention_cached): q [n, H*dk] at
 * positions P .. P + n - 1 of one sequence, k [P + n, KV*dk] and v [P + n, KV*dv] the keys and
 * values of positions 0 .. P + n - 1; query i attends to keys 0 .. P + i. Overwrites
 * out [n, H*dv] (a->B and a->S are not used). n at most 65535. scratch [scratch_floats]
 * (device; NULL, 0: none) lets the keys be split over more blocks, whose partial results it
 * holds: up to 256 blocks' worth of n * H * (2 + dv) floats is used. */
moe_status moe_cuda_attention_cached(float *out, const float *q, const float *k, const float *v,
                                     int n, int P, const moe_attn_dims *a, float *scratch,
                                     size_t scratch_floats);

/* Softmax cross-entropy (moe_xent_forward_backward) of logits [T, V] against targets y [T]
 * (y < 0: ignored; y must be < V, which the caller checks on the host): row_loss [T] =
 * logsumexp - logit of the target (0 for ignored rows); if dlogits [T, V] is not NULL, it is
 * overwritten with scale * (softmax - onehot) (0 for ignored rows). The sum of row_loss (in a
 * fixed order) goes to sum_out [1] and the number of counted rows to n_counted_dev [1], so
 * that one copy brings both back (sum_out and n_counted_dev are written even when T = 0). */
moe_status moe_cuda_xent(float *dlogits, double *row_loss, double *sum_out, int *n_counted_dev,
                         const float *logits, const int32_t *y, int T, int V, float scale);

/* x [T, d] = emb [V, d] rows tok [T] (every tok in [0, V): the caller checks; a negative token
 * gives a row of zeros). */
moe_status moe_cuda_embed_forward(float *x, const float *emb, const int32_t *tok, int T, int d);
/* g_emb [V, d] rows tok[t] += dx [T, d] rows t, each row's sum in token order (the CPU's order:
 * bitwise equal to it); negative tokens are skipped. */
moe_status moe_cuda_embed_backward(float *g_emb, const float *dx, const int32_t *tok, int T,
                                   int d);

/* y [n] = a [n] + b [n]; y may be a (or b). */
moe_status moe_cuda_add(float *y, const float *a, const float *b, size_t n);

#ifdef __cplusplus
}
#endif
#endif
