/* The transformer kernels on one NVIDIA GPU (cuda/nn.h): kernels/nn.c's RMSNorm, RoPE, causal
 * grouped-query attention and cross-entropy, and the model's embedding, with the CPU's
 * semantics. Row kernels take one block per row and reduce over it with a fixed tree; column
 * sums (RMSNorm's dw, the embedding's gradient, attention's dk and dv) loop over the rows in
 * order in one thread per column (or in fixed ranges of rows, added in range order). No
 * floating-point atomics: results are bitwise repeatable. Where the CPU's operations can be
 * done in its order they are, without contraction into fused multiply-adds (__fmul_rn and its
 * peers; the CPU is compiled as ISO C, which does not contract). */
#include <cuda_runtime.h>

#include <limits.h>
#include <math.h>
#include <stdint.h>

#include "cuda/cuda_internal.h"
#include "cuda/nn.h"

#define NN_BLOCK 256   /* threads of a row kernel (a power of two) */
#define ATT_THREADS 128 /* threads of an attention row (a power of two) */
#define DW_COLS 32     /* RMSNorm dw: columns per block */
#define DW_PARTS 8     /* RMSNorm dw: the tokens in 8 fixed ranges, summed in range order */
#define EMB_COLS 128   /* embedding backward: columns per block */
#define EMB_GROUPS 32  /* embedding backward: a block takes the tokens with tok % 32 == its y */
#define MAX_HEAD 8192    /* attention head width: its q or dout row in shared memory (32 KB) */

/* Blocks of NN_BLOCK threads for n elements of a grid-stride loop (at least 1). */
static unsigned stride_blocks(size_t n) {
    size_t b = (n + NN_BLOCK - 1) / NN_BLOCK;
    return (unsigned)(b < 1 ? 1 : b > (1u << 20) ? (1u << 20) : b);
}

/* ---- block reductions ------------------------------------------------------------------- */


/* The largest of every thread's v, by the CPU's comparison (x > m ? x : m: NaNs passed over
 * when the threads' own maxima were taken that way). sh: shared [blockDim.x]. */
__device__ static float block_max(float v, float *sh) {
    int t = threadIdx.x;
    sh[t] = v;
    __syncthreads();
    for (int w = blockDim.x / 2; w > 0; w >>= 1) {
        if (t < w) sh[t] = sh[t + w] > sh[t] ? sh[t + w] : sh[t];
        __syncthreads();
    }
    float m = sh[0];
    __syncthreads();
    return m;
}

/* For each c < w: s_c = sum over the rows r < n of R.weight(r) * R.row(r)[c], handed to
 * R.done(c, s_c). With w below the block's threads, the threads form G = blockDim.x / w groups
 * of w, group q sums rows [n q / G, n (q+1) / G) in order and the groups' sums add up in group
 * order; else each thread sums whole columns, the rows in order. A fixed order either way.
 * red: shared [blockDim.x]. All threads of the block call it. */
template <class Rows> __device__ static void group_sums(int n, int w, const Rows &R, float *red) {
    int nt = blockDim.x, tid = threadIdx.x;
    if (w >= nt) {
        for (int c = tid; c < w; c += nt) {
            float acc = 0;
            for (int r = 0; r < n; r++) acc += R.weight(r) * R.row(r)[c];
            R.done(c, acc);
        }
        return;
    }
    int G = nt / w, q = tid / w, c = tid % w;
    if (q < G) {
        int r0 = (int)((long long)n * q / G), r1 = (int)((long long)n * (q + 1) / G);
        float acc = 0;
        for (int r = r0; r < r1; r++) acc += R.weight(r) * R.row(r)[c];
        red[tid] = acc; /* tid = q w + c */
    }
    __syncthreads();
    if (tid < w) {
        float s = red[c];
        for (int p = 1; p < G; p++) s += red[p * w + c];
        R.done(c, s);
    }
    __syncthreads();
}

/* Rows r of x (x_stride apart) weighted by w[r]; done: out[c] = s, or out[c] += alpha s. */
struct strided_rows {
    const float *w;        /* [n] */
    const float *x;        /* [n, x_stride] */
    size_t x_stride;
    float *out;            /* [w] */
    float alpha;
    int add;
    __device__ float weight(int r) const { return w[r]; }
    __device__ const float *row(int r) const { return x + (size_t)r * x_stride; }
    __device__ void done(int c, float s) const { out[c] = add ? out[c] + alpha * s : s; }
};

/* Rows (head hh < rep, query i in [j, S)) in that order, r = hh (S - j) + (i - j): weights
 * w[hh w_head + i S] (a column of a head's [S, S] matrix), rows x + hh x_head + i x_i;
 * done: out[c] += alpha s. */
struct head_rows {
    const float *w;        /* column j of the group's first head's [S, S] */
    size_t w_head;         /* S * S */
    const float *x;        /* the group's first head's row 0 */
    size_t x_head, x_i;
    int j, m, S;           /* m = S - j rows per head */
    float *out;            /* [w] */
    float alpha;
    __device__ float weight(int r) const {
        int hh = r / m, i = j + r % m;
        return w[(size_t)hh * w_head + (size_t)i * S];
    }
    __device__ const float *row(int r) const {
        int hh = r / m, i = j + r % m;
        return x + (size_t)hh * x_head + (size_t)i * x_i;
    }
    __device__ void done(int c, float s) const { out[c] += alpha * s; }
};

/* ---- RMSNorm ------------------------------------------------------------------------------ */

/* One block per token t. */
__global__ static void k_rmsnorm_forward(float *y, float *rstd, const float *x, const float *w,
                                         int d, float eps) {
    __shared__ double sh[NN_BLOCK];
    size_t t = blockIdx.x;
    const float *xt = x + t * d; /* [d] */
    float *yt = y + t * d;       /* [d] */
    double ss = 0;
    for (int i = threadIdx.x; i < d; i += blockDim.x) ss += (double)xt[i] * xt[i];
    ss = moe_cuda_block_sum(ss, sh);
    float r = (float)(1.0 / sqrt(ss / d + eps));
    if (threadIdx.x == 0) rstd[t] = r;
    for (int i = threadIdx.x; i < d; i += blockDim.x) yt[i] = __fmul_rn(__fmul_rn(xt[i], r), w[i]);
}

/* dx: one block per token t. */
__global__ static void k_rmsnorm_dx(float *dx, const float *dy, const float *x, const float *w,
                                    const float *rstd, int d) {
    __shared__ double sh[NN_BLOCK];
    size_t t = blockIdx.x;
    const float *xt = x + t * d, *gt = dy + t * d; /* [d] */
    float *dxt = dx + t * d;                       /* [d] */
    double dot = 0; /* sum_i dy_i w_i x_i */
    for (int i = threadIdx.x; i < d; i += blockDim.x)
        dot = __dadd_rn(dot, __dmul_rn((double)gt[i] * w[i], (double)xt[i]));
    dot = moe_cuda_block_sum(dot, sh);
    float r = rstd[t];
    float c = (float)(dot * r * r * r / d);
    for (int i = threadIdx.x; i < d; i += blockDim.x)
        dxt[i] = __fadd_rn(dxt[i], __fsub_rn(__fmul_rn(__fmul_rn(gt[i], w[i]), r),
                                             __fmul_rn(c, xt[i])));
}

/* dw: blocks of DW_COLS columns x DW_PARTS token ranges; each thread sums its column over its
 * range in token order (in double, as the CPU), the ranges then in order. */
__global__ static void k_rmsnorm_dw(float *dw, const float *dy, const float *x, const float *rstd,
                                    int T, int d) {
    __shared__ double sh[DW_PARTS][DW_COLS];
    int i = blockIdx.x * DW_COLS + threadIdx.x, p = threadIdx.y;
    int t0 = (int)((long long)T * p / DW_PARTS), t1 = (int)((long long)T * (p + 1) / DW_PARTS);
    double s = 0;
    if (i < d)
        for (int t = t0; t < t1; t++) {
            size_t o = (size_t)t * d + i;
            s = __dadd_rn(s, __dmul_rn(__dmul_rn((double)dy[o], (double)x[o]), (double)rstd[t]));
        }
    sh[p][threadIdx.x] = s;
    __syncthreads();
    if (p == 0 && i < d) {
        double tot = sh[0][threadIdx.x];
        for (int q = 1; q < DW_PARTS; q++) tot += sh[q][threadIdx.x];
        dw[i] = __fadd_rn(dw[i], (float)tot);
    }
}

extern "C" moe_status moe_cuda_rmsnorm_forward(float *y, float *rstd, const float *x,
                                               const float *w, int T, int d, float eps) {
    MOE_CHECK(T >= 0 && d >= 1, "moe_cuda_rmsnorm_forward: T %d, d %d", T, d);
    if (T == 0) return MOE_OK;
    k_rmsnorm_forward<<<T, NN_BLOCK>>>(y, rstd, x, w, d, eps);
    CU_TRY(cudaGetLastError(), "RMSNorm forward");
    return MOE_OK;
}

extern "C" moe_status moe_cuda_rmsnorm_backward(float *dx, float *dw, const float *dy,
                                                const float *x, const float *w,
                                                const float *rstd, int T, int d) {
    MOE_CHECK(T >= 0 && d >= 1, "moe_cuda_rmsnorm_backward: T %d, d %d", T, d);
    if (T == 0) return MOE_OK;
    k_rmsnorm_dx<<<T, NN_BLOCK>>>(dx, dy, x, w, rstd, d);
    k_rmsnorm_dw<<<(d + DW_COLS - 1) / DW_COLS, dim3(DW_COLS, DW_PARTS)>>>(dw, dy, x, rstd, T, d);
    CU_TRY(cudaGetLastError(), "RMSNorm backward");
    return MOE_OK;
}

/* ---- RoPE --------------------------------------------------------------------------------- */

/* One thread per (token, head, pair): n = T n_heads (rd / 2). */
__global__ static void k_rope(float *x, size_t n, int n_heads, int head_stride, int rd,
                              const int32_t *pos, int interleave, const float *cs, int n_cs,
                              int dir) {
    int half = rd / 2;
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < n;
         e += (size_t)gridDim.x * blockDim.x) {
        int i = (int)(e % half);
        size_t th = e / half; /* t n_heads + h */
        int p = pos[th / n_heads];
        if (p < 0 || p >= n_cs) continue;
        const float *c = cs + (size_t)p * rd, *s = c + half; /* [half], [half] */
        float *v = x + th * head_stride;
        float ci = c[i], si = dir < 0 ? -s[i] : s[i];
        int ia = interleave ? 2 * i : i, ib = interleave ? 2 * i + 1 : i + half;
        float a = v[ia], b = v[ib];
        v[ia] = __fsub_rn(__fmul_rn(a, ci), __fmul_rn(b, si));
        v[ib] = __fadd_rn(__fmul_rn(b, ci), __fmul_rn(a, si));
    }
}

extern "C" moe_status moe_cuda_rope_rotate(float *x, int T, int n_heads, int head_stride, int rd,
                                           const int32_t *pos, int interleave, const float *cs,
                                           int n_cs, int dir) {
    MOE_CHECK(T >= 0 && n_heads >= 0 && rd >= 0 && head_stride >= rd,
              "moe_cuda_rope_rotate: T %d, %d heads %d apart, %d rotated values", T, n_heads,
              head_stride, rd);
    MOE_CHECK(dir == 1 || dir == -1, "moe_cuda_rope_rotate: dir %d (+1 or -1)", dir);
    size_t n = (size_t)T * n_heads * (rd / 2);
    if (n == 0) return MOE_OK;
    MOE_CHECK(cs && n_cs >= 1, "moe_cuda_rope_rotate: no cos/sin table (n_cs %d)", n_cs);
    k_rope<<<stride_blocks(n), NN_BLOCK>>>(x, n, n_heads, head_stride, rd, pos, interleave, cs,
                                           n_cs, dir);
    CU_TRY(cudaGetLastError(), "RoPE");
    return MOE_OK;
}

/* ---- attention ---------------------------------------------------------------------------- */

/* Checks the shapes; *blocks = B H S (the row kernels' grid), 0 when there is nothing to do. */
static moe_status attn_check(const moe_attn_dims *a, const char *fn, unsigned *blocks) {
    MOE_CHECK(a && a->B >= 0 && a->S >= 0 && a->H >= 1 && a->KV >= 1 && a->H % a->KV == 0,
              "%s: B %d, S %d, H %d, KV %d (H a multiple of KV)", fn, a ? a->B : 0,
              a ? a->S : 0, a ? a->H : 0, a ? a->KV : 0);
    MOE_CHECK(a->dk >= 1 && a->dv >= 1 && a->dk <= MAX_HEAD && a->dv <= MAX_HEAD,
              "%s: head widths dk %d, dv %d (1 .. %d)", fn, a->dk, a->dv, MAX_HEAD);
    size_t n = (size_t)a->B * a->H * a->S;
    MOE_CHECK(n <= INT_MAX, "%s: B %d x H %d x S %d rows exceed the grid", fn, a->B, a->H, a->S);
    *blocks = (unsigned)n;
    return MOE_OK;
}

/* One block per (sequence b, head h, query i), bid = (b H + h) S + i: the scores of the keys
 * j <= i (a thread per key, a dot product over dk), their max and sum (fixed trees), probs
 * (the scores' buffer: its own row of probs), then out (a thread per output column and group
 * of keys, group_sums). */
__global__ static void __launch_bounds__(ATT_THREADS)
    k_attn_forward(float *out, float *probs, const float *q, const float *k, const float *v,
                   moe_attn_dims a) {
    extern __shared__ float qsh[]; /* [dk] q_i */
    __shared__ float red[ATT_THREADS];
    int S = a.S, H = a.H, dk = a.dk, dv = a.dv, rep = H / a.KV;
    size_t qs = (size_t)H * dk, ks = (size_t)a.KV * dk, vs = (size_t)a.KV * dv, os = (size_t)H * dv;
    size_t bid = blockIdx.x;
    int i = (int)(bid % S), h = (int)(bid / S % H), b = (int)(bid / S / H), g = h / rep;
    const float *qi = q + ((size_t)b * S + i) * qs + (size_t)h * dk; /* [dk] */
    const float *kb = k + (size_t)b * S * ks + (size_t)g * dk;       /* [S, ks] */
    const float *vb = v + (size_t)b * S * vs + (size_t)g * dv;       /* [S, vs] */
    float *P = probs + (((size_t)b * H + h) * S + i) * S;            /* [S] */
    float *oi = out + ((size_t)b * S + i) * os + (size_t)h * dv;     /* [dv] */
    int tid = threadIdx.x, nt = blockDim.x;
    for (int c = tid; c < dk; c += nt) qsh[c] = qi[c];
    __syncthreads();
    float mx = -INFINITY;
    for (int j = tid; j <= i; j += nt) {
        const float *kj = kb + (size_t)j * ks;
        float dot = 0;
        for (int c = 0; c < dk; c++) dot += qsh[c] * kj[c];
        float s = dot * a.scale;
        P[j] = s;
        mx = s > mx ? s : mx;
    }
    for (int j = i + 1 + tid; j < S; j += nt) P[j] = 0;
    mx = block_max(mx, red);
    float sum = 0;
    for (int j = tid; j <= i; j += nt) {
        float e = expf(P[j] - mx);
        P[j] = e;
        sum += e;
    }
    sum = moe_cuda_block_sum(sum, red);
    float inv = 1.0f / sum;
    for (int j = tid; j <= i; j += nt) P[j] *= inv;
    __syncthreads(); /* every P[j] (global memory) visible to the block */
    strided_rows R = {P, vb, vs, oi, 1.0f, 0};
    group_sums(i + 1, dv, R, red);
}

/* Backward, 1: one block per (b, h, i) as forward: dP_ij = dout_i . v_j, D = sum_j P_ij dP_ij
 * (fixed order), dS_ij = P_ij (dP_ij - D) into dS [B, H, S, S] (j <= i), dq_i += scale
 * sum_j dS_ij k_j. */
__global__ static void __launch_bounds__(ATT_THREADS)
    k_attn_dq(float *dq, float *dS, const float *dout, const float *probs, const float *k,
              const float *v, moe_attn_dims a) {
    extern __shared__ float dsh[]; /* [dv] dout_i */
    __shared__ float red[ATT_THREADS];
    int S = a.S, H = a.H, dk = a.dk, dv = a.dv, rep = H / a.KV;
    size_t qs = (size_t)H * dk, ks = (size_t)a.KV * dk, vs = (size_t)a.KV * dv, os = (size_t)H * dv;
    size_t bid = blockIdx.x;
    int i = (int)(bid % S), h = (int)(bid / S % H), b = (int)(bid / S / H), g = h / rep;
    const float *doi = dout + ((size_t)b * S + i) * os + (size_t)h * dv; /* [dv] */
    const float *kb = k + (size_t)b * S * ks + (size_t)g * dk;           /* [S, ks] */
    const float *vb = v + (size_t)b * S * vs + (size_t)g * dv;           /* [S, vs] */
    size_t row = (((size_t)b * H + h) * S + i) * S;
    const float *P = probs + row;                                        /* [S] */
    float *G = dS + row;                                                 /* [S] */
    float *dqi = dq + ((size_t)b * S + i) * qs + (size_t)h * dk;         /* [dk] */
    int tid = threadIdx.x, nt = blockDim.x;
    for (int c = tid; c < dv; c += nt) dsh[c] = doi[c];
    __syncthreads();
    float D = 0;
    for (int j = tid; j <= i; j += nt) {
        const float *vj = vb + (size_t)j * vs;
        float dp = 0;
        for (int c = 0; c < dv; c++) dp += dsh[c] * vj[c];
        G[j] = dp;
        D += P[j] * dp;
    }
    D = moe_cuda_block_sum(D, red);
    for (int j = tid; j <= i; j += nt) G[j] = __fmul_rn(P[j], __fsub_rn(G[j], D));
    __syncthreads(); /* every G[j] visible to the block */
    strided_rows R = {G, kb, ks, dqi, a.scale, 1};
    group_sums(i + 1, dk, R, red);
}

/* Backward, 2: one block per (b, kv head g, key j), bid = (b KV + g) S + j: dk_j += scale
 * sum over the group's heads (in order) and queries i >= j (in order) of dS_hij q_hi, and
 * dv_j += the same of P_hij dout_hi. */
__global__ static void __launch_bounds__(ATT_THREADS)
    k_attn_dkv(float *dk, float *dv, const float *dS, const float *probs, const float *q,
               const float *dout, moe_attn_dims a) {
    __shared__ float red[ATT_THREADS];
    int S = a.S, H = a.H, KV = a.KV, Dk = a.dk, Dv = a.dv, rep = H / KV;
    size_t qs = (size_t)H * Dk, ks = (size_t)KV * Dk, vs = (size_t)KV * Dv, os = (size_t)H * Dv;
    size_t bid = blockIdx.x;
    int j = (int)(bid % S), g = (int)(bid / S % KV), b = (int)(bid / S / KV), m = S - j;
    size_t first = (((size_t)b * H + (size_t)g * rep) * S) * S + j; /* (b, g rep, 0, j) */
    head_rows R;
    R.w_head = (size_t)S * S, R.j = j, R.m = m, R.S = S;
    R.w = dS + first;
    R.x = q + (size_t)b * S * qs + (size_t)g * rep * Dk, R.x_head = Dk, R.x_i = qs;
    R.out = dk + ((size_t)b * S + j) * ks + (size_t)g * Dk, R.alpha = a.scale;
    group_sums(rep * m, Dk, R, red);
    R.w = probs + first;
    R.x = dout + (size_t)b * S * os + (size_t)g * rep * Dv, R.x_head = Dv, R.x_i = os;
    R.out = dv + ((size_t)b * S + j) * vs + (size_t)g * Dv, R.alpha = 1.0f;
    group_sums(rep * m, Dv, R, red);
}

extern "C" moe_status moe_cuda_attention_forward(float *out, float *probs, const float *q,
                                                 const float *k, const float *v,
                                                 const moe_attn_dims *a) {
    unsigned blocks = 0;
    MOE_TRY(attn_check(a, "moe_cuda_attention_forward", &blocks));
    if (blocks == 0) return MOE_OK;
    k_attn_forward<<<blocks, ATT_THREADS, (size_t)a->dk * 4>>>(out, probs, q, k, v, *a);
    CU_TRY(cudaGetLastError(), "attention forward");
    return MOE_OK;
}

extern "C" moe_status moe_cuda_attention_backward(float *dq, float *dk, float *dv,
                                                  const float *dout, const float *probs,
                                                  const float *q, const float *k,
                                                  const float *v, const moe_attn_dims *a,
                                                  float *scratch) {
    unsigned blocks = 0;
    MOE_TRY(attn_check(a, "moe_cuda_attention_backward", &blocks));
    if (blocks == 0) return MOE_OK;
    unsigned kv_blocks = (unsigned)((size_t)a->B * a->KV * a->S);
    k_attn_dq<<<blocks, ATT_THREADS, (size_t)a->dv * 4>>>(dq, scratch, dout, probs, k, v, *a);
    k_attn_dkv<<<kv_blocks, ATT_THREADS>>>(dk, dv, scratch, probs, q, dout, *a);
    CU_TRY(cudaGetLastError(), "attention backward");
    return MOE_OK;
}

/* ---- cross-entropy ------------------------------------------------------------------------ */

/* One block per row t. */
__global__ static void k_xent(float *dlogits, double *row_loss, const float *logits,
                              const int32_t *y, int V, float scale) {
    __shared__ double shd[NN_BLOCK];
    __shared__ float shf[NN_BLOCK];
    size_t t = blockIdx.x;
    const float *lt = logits + t * V;                       /* [V] */
    float *gt = dlogits ? dlogits + t * V : NULL;           /* [V] */
    int yt = y[t], tid = threadIdx.x, nt = blockDim.x;
    if (yt < 0) { /* ignored: the whole block leaves here */
        if (tid == 0) row_loss[t] = 0;
        if (gt)
            for (int j = tid; j < V; j += nt) gt[j] = 0;
        return;
    }
    float mx = -INFINITY;
    for (int j = tid; j < V; j += nt) mx = lt[j] > mx ? lt[j] : mx;
    mx = block_max(mx, shf);
    double s = 0;
    for (int j = tid; j < V; j += nt) {
        float e = expf(lt[j] - mx);
        if (gt) gt[j] = e;
        s += e;
    }
    s = moe_cuda_block_sum(s, shd);
    if (tid == 0) row_loss[t] = mx + log(s) - (yt < V ? lt[yt] : NAN);
    if (gt) {
        double f = scale / s;
        for (int j = tid; j < V; j += nt) {
            float val = (float)(f * gt[j]);
            gt[j] = j == yt ? __fsub_rn(val, scale) : val;
        }
    }
}

/* One block: the sum of row_loss [T] (each thread a fixed range in order, then a tree) and
 * the count of rows with a target. */
__global__ static void k_xent_sum(double *sum_out, int *n_out, const double *row_loss,
                                  const int32_t *y, int T) {
    __shared__ double shd[NN_BLOCK];
    __shared__ int shi[NN_BLOCK];
    int p = threadIdx.x, np = blockDim.x;
    int t0 = (int)((long long)T * p / np), t1 = (int)((long long)T * (p + 1) / np);
    double s = 0;
    int n = 0;
    for (int t = t0; t < t1; t++) {
        s += row_loss[t];
        n += y[t] >= 0;
    }
    s = moe_cuda_block_sum(s, shd);
    n = moe_cuda_block_sum(n, shi);
    if (p == 0) {
        *sum_out = s;
        *n_out = n;
    }
}

extern "C" moe_status moe_cuda_xent(float *dlogits, double *row_loss, double *sum_out,
                                    int *n_counted_dev, const float *logits, const int32_t *y,
                                    int T, int V, float scale) {
    MOE_CHECK(T >= 0 && V >= 1, "moe_cuda_xent: T %d, V %d", T, V);
    if (T > 0) k_xent<<<T, NN_BLOCK>>>(dlogits, row_loss, logits, y, V, scale);
    k_xent_sum<<<1, NN_BLOCK>>>(sum_out, n_counted_dev, row_loss, y, T);
    CU_TRY(cudaGetLastError(), "cross-entropy");
    return MOE_OK;
}

/* ---- embedding, addition ------------------------------------------------------------------ */

__global__ static void k_embed_forward(float *x, const float *emb, const int32_t *tok, size_t n,
                                       int d) {
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < n;
         e += (size_t)gridDim.x * blockDim.x) {
        int tk = tok[e / d];
        x[e] = tk >= 0 ? emb[(size_t)tk * d + e % d] : 0.0f;
    }
}

/* Blocks of EMB_COLS columns x EMB_GROUPS token groups: a thread takes its column of the rows
 * of the tokens tk with tk % EMB_GROUPS == blockIdx.y, the tokens in order; every (row, column)
 * belongs to one thread, so each sum runs in token order as on the CPU. The tokens pass through
 * shared memory EMB_COLS at a time. */
__global__ static void __launch_bounds__(EMB_COLS)
    k_embed_backward(float *g_emb, const float *dx, const int32_t *tok, int T, int d) {
    __shared__ int32_t st[EMB_COLS];
    int i = blockIdx.x * EMB_COLS + threadIdx.x, grp = blockIdx.y;
    for (int t0 = 0; t0 < T; t0 += EMB_COLS) {
        int n = T - t0 < EMB_COLS ? T - t0 : EMB_COLS;
        __syncthreads();
        if ((int)threadIdx.x < n) st[threadIdx.x] = tok[t0 + threadIdx.x];
        __syncthreads();
        if (i >= d) continue;
        for (int u = 0; u < n; u++) {
            int tk = st[u];
            if (tk < 0 || tk % EMB_GROUPS != grp) continue;
            float *gr = g_emb + (size_t)tk * d + i;
            *gr = __fadd_rn(*gr, dx[(size_t)(t0 + u) * d + i]);
        }
    }
}

__global__ static void k_add(float *y, const float *a, const float *b, size_t n) {
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < n;
         e += (size_t)gridDim.x * blockDim.x)
        y[e] = __fadd_rn(a[e], b[e]);
}

extern "C" moe_status moe_cuda_embed_forward(float *x, const float *emb, const int32_t *tok,
                                             int T, int d) {
    MOE_CHECK(T >= 0 && d >= 1, "moe_cuda_embed_forward: T %d, d %d", T, d);
    size_t n = (size_t)T * d;
    if (n == 0) return MOE_OK;
    k_embed_forward<<<stride_blocks(n), NN_BLOCK>>>(x, emb, tok, n, d);
    CU_TRY(cudaGetLastError(), "embedding forward");
    return MOE_OK;
}

extern "C" moe_status moe_cuda_embed_backward(float *g_emb, const float *dx, const int32_t *tok,
                                              int T, int d) {
    MOE_CHECK(T >= 0 && d >= 1, "moe_cuda_embed_backward: T %d, d %d", T, d);
    if (T == 0) return MOE_OK;
    dim3 grid((unsigned)((d + EMB_COLS - 1) / EMB_COLS), EMB_GROUPS);
    k_embed_backward<<<grid, EMB_COLS>>>(g_emb, dx, tok, T, d);
    CU_TRY(cudaGetLastError(), "embedding backward");
    return MOE_OK;
}

extern "C" moe_status moe_cuda_add(float *y, const float *a, const float *b, size_t n) {
    if (n == 0) return MOE_OK;
    k_add<<<stride_blocks(n), NN_BLOCK>>>(y, a, b, n);
    CU_TRY(cudaGetLastError(), "add");
    return MOE_OK;
}
