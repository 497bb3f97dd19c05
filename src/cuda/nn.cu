/* The transformer kernels on one NVIDIA GPU (cuda/nn.h): kernels/nn.c's RMSNorm, RoPE, causal
 * grouped-query attention and cross-entropy, and the model's embedding, with the CPU's
 * semantics. Row kernels take one block per row and reduce over it with a fixed tree; column
 * sums (RMSNorm's dw, the embedding's gradient) loop over the rows in order in one thread per
 * column (or in fixed ranges of rows, added in range order); attention runs by flash-style
 * tiles, each output element owned by one thread (see there). No floating-point atomics:
 * results are bitwise repeatable. Where the CPU's operations can be done in its order they
 * are, without contraction into fused multiply-adds (__fmul_rn and its peers; the CPU is
 * compiled as ISO C, which does not contract). */
#include <cuda_runtime.h>

#include <limits.h>
#include <math.h>
#include <stdint.h>

#include "cuda/cuda_internal.h"
#include "cuda/nn.h"

#define NN_BLOCK 256   /* threads of a row kernel (a power of two) */
#define DW_COLS 32     /* RMSNorm dw: columns per block */
#define DW_PARTS 8     /* RMSNorm dw: the tokens in 8 fixed ranges, summed in range order */
#define EMB_COLS 128   /* embedding backward: columns per block */
#define EMB_GROUPS 32  /* embedding backward: a block takes the tokens with tok % 32 == its y */

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

/* Flash-style tiles; the S x S probabilities are never stored. A block of ATT_NT threads, a
 * 16 x 16 grid (tx = thread % 16, ty = thread / 16), takes R queries x R keys at a time (R = 64,
 * or 32 for heads wider than 128, for shared memory), staged in shared memory as rows of
 * ld = d | 1 floats: an odd stride, so that the 16 rows a half-warp reads at one column lie in
 * 16 different banks. A thread owns the entries (ty + 16 x, tx + 16 y) of every R x R tile
 * (scores, probabilities, their gradients) and the rows ty + 16 x, columns tx + 16 y of every
 * R x d accumulator (out, dq, dk, dv), kept in registers (D, a template bound of d: 64, 128 or
 * 256). Every sum has a fixed order: over the head dim or a tile's rows in one thread, the
 * tiles in order, or over a row's 16 lanes by a fixed butterfly; no atomics. */
#define ATT_NT 256       /* threads of an attention tile block */
#define ATT_MAX_HEAD 256 /* the widest head (dk, dv) */

/* The template bound D of the heads' width. */
static int att_width(const moe_attn_dims *a) {
    int w = a->dk > a->dv ? a->dk : a->dv;
    return w <= 64 ? 64 : w <= 128 ? 128 : 256;
}

/* Shared memory (bytes) of each kernel at tile R: forward Q, K [R, ldk], V [R, ldv],
 * P [R, R + 1]; dq: Q, K [R, ldk], dout, V [R, ldv], dS [R, R + 1], lse and D [R]; dk/dv: the
 * same and P [R, R + 1]. */
static size_t att_fwd_smem(int R, int dk, int dv) {
    return 4 * (size_t)R * (2 * (dk | 1) + (dv | 1) + R + 1);
}
static size_t att_dq_smem(int R, int dk, int dv) {
    return 4 * (size_t)R * (2 * (dk | 1) + 2 * (dv | 1) + R + 1 + 2);
}
static size_t att_dkv_smem(int R, int dk, int dv) {
    return 4 * (size_t)R * (2 * (dk | 1) + 2 * (dv | 1) + 2 * (R + 1) + 2);
}

/* dst [R, ld] (shared) = rows [r0, r0 + R) of the first d columns of src [n, stride]; rows
 * from n on are 0. */
template <int R>
__device__ static void att_load(float *dst, int ld, const float *src, size_t stride, int r0,
                                int n, int d) {
    for (int e = threadIdx.x; e < R * d; e += ATT_NT) {
        int r = e / d, c = e - r * d;
        dst[r * ld + c] = r0 + r < n ? src[(size_t)(r0 + r) * stride + c] : 0.0f;
    }
}

/* s[x][y] = the sum over c < d (in order) of A[ty + 16 x][c] B[tx + 16 y][c]; A, B [R, ld]
 * (shared). */
template <int R>
__device__ static void att_dots(float (&s)[R / 16][R / 16], const float *A, const float *B,
                                int ld, int d) {
    int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
    for (int x = 0; x < R / 16; x++)
#pragma unroll
        for (int y = 0; y < R / 16; y++) s[x][y] = 0;
    for (int c = 0; c < d; c++) {
        float av[R / 16], bv[R / 16];
#pragma unroll
        for (int x = 0; x < R / 16; x++) av[x] = A[(ty + 16 * x) * ld + c];
#pragma unroll
        for (int y = 0; y < R / 16; y++) bv[y] = B[(tx + 16 * y) * ld + c];
#pragma unroll
        for (int x = 0; x < R / 16; x++)
#pragma unroll
            for (int y = 0; y < R / 16; y++) s[x][y] = fmaf(av[x], bv[y], s[x][y]);
    }
}

/* acc[x][y] += the sum over j < R (in order) of W(ty + 16 x, j) X[j][tx + 16 y], for the
 * columns tx + 16 y < d (the others stay 0): W [R, ldw] (shared) read as W[r][j], or with TR
 * as its transpose W[j][r]; X [R, ldx] (shared). */
template <int R, int D, bool TR>
__device__ static void att_acc(float (&acc)[R / 16][D / 16], const float *W, int ldw,
                               const float *X, int ldx, int d) {
    int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    for (int j = 0; j < R; j++) {
        float w[R / 16];
#pragma unroll
        for (int x = 0; x < R / 16; x++)
            w[x] = TR ? W[j * ldw + ty + 16 * x] : W[(ty + 16 * x) * ldw + j];
        const float *xr = X + j * ldx; /* [d] */
#pragma unroll
        for (int y = 0; y < D / 16; y++) {
            int c = tx + 16 * y;
            float xv = c < d ? xr[c] : 0.0f;
#pragma unroll
            for (int x = 0; x < R / 16; x++) acc[x][y] = fmaf(w[x], xv, acc[x][y]);
        }
    }
}

/* The max and the sum over the 16 lanes of a tile row (one ty: a half-warp) by a fixed
 * butterfly; every lane gets the same value (a + b == b + a). All 32 lanes call them. */
__device__ static float att_row_max(float v) {
    for (int o = 8; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ static float att_row_sum(float v) {
    for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* Forward: one block per (b, h, query tile it), bid = (b H + h) nt + nt - 1 - it (the longest
 * tiles start first). Over the key tiles 0 .. it in order: scores (-inf above the diagonal),
 * then the online softmax: each row's running max m and sum l of exp(s - m); the output
 * accumulator o is scaled by exp(m_old - m_new) and gains P V. Then out = o / l and
 * lse = m + log l. Rows from S on (a partial last tile) compute on zeros and are not written. */
template <int R, int D>
__global__ static void __launch_bounds__(ATT_NT, 1)
    k_attn_fwd(float *out, float *lse, const float *q, const float *k, const float *v,
               moe_attn_dims a) {
    constexpr int RA = R / 16, DB = D / 16;
    extern __shared__ float sm[];
    int S = a.S, H = a.H, dk = a.dk, dv = a.dv, rep = H / a.KV, nt = (S + R - 1) / R;
    int ldk = dk | 1, ldv = dv | 1, ldp = R + 1;
    float *Qs = sm;           /* [R, ldk] */
    float *Ks = Qs + R * ldk; /* [R, ldk] */
    float *Vs = Ks + R * ldk; /* [R, ldv] */
    float *Ps = Vs + R * ldv; /* [R, ldp] */
    size_t qs = (size_t)H * dk, ks = (size_t)a.KV * dk, vs = (size_t)a.KV * dv;
    size_t os = (size_t)H * dv, bid = blockIdx.x;
    int it = nt - 1 - (int)(bid % nt), h = (int)(bid / nt % H), b = (int)(bid / nt / H);
    int g = h / rep, i0 = it * R, tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    const float *qb = q + (size_t)b * S * qs + (size_t)h * dk; /* [S, qs] */
    const float *kb = k + (size_t)b * S * ks + (size_t)g * dk; /* [S, ks] */
    const float *vb = v + (size_t)b * S * vs + (size_t)g * dv; /* [S, vs] */
    float o[RA][DB], m[RA], l[RA];
#pragma unroll
    for (int x = 0; x < RA; x++) {
        m[x] = -INFINITY, l[x] = 0;
#pragma unroll
        for (int y = 0; y < DB; y++) o[x][y] = 0;
    }
    att_load<R>(Qs, ldk, qb, qs, i0, S, dk);
    for (int jt = 0; jt <= it; jt++) {
        int j0 = jt * R;
        __syncthreads(); /* the previous tile's K, V and P read */
        att_load<R>(Ks, ldk, kb, ks, j0, S, dk);
        att_load<R>(Vs, ldv, vb, vs, j0, S, dv);
        __syncthreads();
        float s[RA][RA];
        att_dots<R>(s, Qs, Ks, ldk, dk);
#pragma unroll
        for (int x = 0; x < RA; x++) {
            int r = ty + 16 * x;
            float mt = -INFINITY;
#pragma unroll
            for (int y = 0; y < RA; y++) {
                s[x][y] = j0 + tx + 16 * y <= i0 + r ? s[x][y] * a.scale : -INFINITY;
                mt = fmaxf(mt, s[x][y]);
            }
            /* finite: key 0 is in every row's first tile */
            float mn = fmaxf(m[x], att_row_max(mt));
            float alpha = expf(m[x] - mn), rs = 0; /* 0 at the first tile (m = -inf) */
#pragma unroll
            for (int y = 0; y < RA; y++) {
                float p = expf(s[x][y] - mn);
                Ps[r * ldp + tx + 16 * y] = p;
                rs += p;
            }
            l[x] = l[x] * alpha + att_row_sum(rs);
            m[x] = mn;
#pragma unroll
            for (int y = 0; y < DB; y++) o[x][y] *= alpha;
        }
        __syncthreads(); /* P written */
        att_acc<R, D, false>(o, Ps, ldp, Vs, ldv, dv);
    }
    float *lr = lse + ((size_t)b * H + h) * S; /* [S] */
#pragma unroll
    for (int x = 0; x < RA; x++) {
        int i = i0 + ty + 16 * x;
        if (i >= S) continue;
        float *oi = out + ((size_t)b * S + i) * os + (size_t)h * dv; /* [dv] */
#pragma unroll
        for (int y = 0; y < DB; y++)
            if (tx + 16 * y < dv) oi[tx + 16 * y] = o[x][y] / l[x];
        if (tx == 0) lr[i] = m[x] + logf(l[x]);
    }
}

/* Backward, 1: Dr [B, H, S] = dout_i . out_i over the head's dv columns: a warp per row
 * (b, h, i), lanes over columns 32 apart, then a fixed butterfly. */
__global__ static void k_attn_delta(float *Dr, const float *dout, const float *out,
                                    moe_attn_dims a, size_t rows) {
    size_t w = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    if (w >= rows) return; /* whole warps */
    int lane = threadIdx.x % 32, S = a.S, H = a.H, dv = a.dv;
    size_t i = w % S, h = w / S % H, b = w / S / H;
    size_t off = ((b * S + i) * H + h) * dv;
    float s = 0;
    for (int c = lane; c < dv; c += 32) s = fmaf(dout[off + c], out[off + c], s);
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) Dr[w] = s;
}

/* The thread's entries (query i0 + ty + 16 x, key j0 + tx + 16 y) of a tile from the scores
 * s and dp = dout_i . v_j: P = exp(scale s - lse_i) on and below the diagonal for queries
 * < S, else 0, into Ps [R, R + 1] (unless NULL); scale dS = scale P (dp - D_i) into
 * Gs [R, R + 1]. Ls, Ds [R]: the tile's lse and D. */
template <int R>
__device__ static void att_grads(float *Ps, float *Gs, const float (&s)[R / 16][R / 16],
                                 const float (&dp)[R / 16][R / 16], const float *Ls,
                                 const float *Ds, int i0, int j0, int S, float scale) {
    int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
    for (int x = 0; x < R / 16; x++) {
        int r = ty + 16 * x, i = i0 + r;
        float L = Ls[r], Dd = Ds[r];
#pragma unroll
        for (int y = 0; y < R / 16; y++) {
            int c = tx + 16 * y;
            float p = j0 + c <= i && i < S ? expf(s[x][y] * scale - L) : 0.0f;
            if (Ps) Ps[r * (R + 1) + c] = p;
            Gs[r * (R + 1) + c] = scale * (p * (dp[x][y] - Dd));
        }
    }
}

/* Rows [i0, i0 + R) of lse and D (row0: the head's row 0 of [B, H, S]) into Ls, Ds [R]
 * (shared; 0 from S on). */
template <int R>
__device__ static void att_load_rows(float *Ls, float *Ds, const float *lse, const float *Dr,
                                     size_t row0, int i0, int S) {
    int r = threadIdx.x;
    if (r < R) {
        Ls[r] = i0 + r < S ? lse[row0 + i0 + r] : 0.0f;
        Ds[r] = i0 + r < S ? Dr[row0 + i0 + r] : 0.0f;
    }
}

/* Backward, 2: one block per (b, h, query tile it), as forward; owns dq of its queries: over
 * the key tiles 0 .. it in order, P and dS recomputed, dq_i += scale sum_j dS_ij k_j. */
template <int R, int D>
__global__ static void __launch_bounds__(ATT_NT, 1)
    k_attn_dq(float *dq, const float *dout, const float *lse, const float *Dr, const float *q,
              const float *k, const float *v, moe_attn_dims a) {
    constexpr int RA = R / 16, DB = D / 16;
    extern __shared__ float sm[];
    int S = a.S, H = a.H, dk = a.dk, dv = a.dv, rep = H / a.KV, nt = (S + R - 1) / R;
    int ldk = dk | 1, ldv = dv | 1, ldp = R + 1;
    float *Qs = sm;           /* [R, ldk] q_i */
    float *Os = Qs + R * ldk; /* [R, ldv] dout_i */
    float *Ks = Os + R * ldv; /* [R, ldk] */
    float *Vs = Ks + R * ldk; /* [R, ldv] */
    float *Gs = Vs + R * ldv; /* [R, ldp] scale dS */
    float *Ls = Gs + R * ldp; /* [R] lse_i */
    float *Ds = Ls + R;       /* [R] D_i */
    size_t qs = (size_t)H * dk, ks = (size_t)a.KV * dk, vs = (size_t)a.KV * dv;
    size_t os = (size_t)H * dv, bid = blockIdx.x;
    int it = nt - 1 - (int)(bid % nt), h = (int)(bid / nt % H), b = (int)(bid / nt / H);
    int g = h / rep, i0 = it * R, tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    const float *qb = q + (size_t)b * S * qs + (size_t)h * dk;     /* [S, qs] */
    const float *ob = dout + (size_t)b * S * os + (size_t)h * dv;  /* [S, os] */
    const float *kb = k + (size_t)b * S * ks + (size_t)g * dk;     /* [S, ks] */
    const float *vb = v + (size_t)b * S * vs + (size_t)g * dv;     /* [S, vs] */
    float acc[RA][DB];
#pragma unroll
    for (int x = 0; x < RA; x++)
#pragma unroll
        for (int y = 0; y < DB; y++) acc[x][y] = 0;
    att_load<R>(Qs, ldk, qb, qs, i0, S, dk);
    att_load<R>(Os, ldv, ob, os, i0, S, dv);
    att_load_rows<R>(Ls, Ds, lse, Dr, ((size_t)b * H + h) * S, i0, S);
    for (int jt = 0; jt <= it; jt++) {
        int j0 = jt * R;
        __syncthreads(); /* the previous tile's K and dS read */
        att_load<R>(Ks, ldk, kb, ks, j0, S, dk);
        att_load<R>(Vs, ldv, vb, vs, j0, S, dv);
        __syncthreads();
        float s[RA][RA], dp[RA][RA];
        att_dots<R>(s, Qs, Ks, ldk, dk);
        att_dots<R>(dp, Os, Vs, ldv, dv);
        att_grads<R>(NULL, Gs, s, dp, Ls, Ds, i0, j0, S, a.scale);
        __syncthreads(); /* dS written */
        att_acc<R, D, false>(acc, Gs, ldp, Ks, ldk, dk);
    }
#pragma unroll
    for (int x = 0; x < RA; x++) {
        int i = i0 + ty + 16 * x;
        if (i >= S) continue;
        float *gi = dq + ((size_t)b * S + i) * qs + (size_t)h * dk; /* [dk] */
#pragma unroll
        for (int y = 0; y < DB; y++)
            if (tx + 16 * y < dk) gi[tx + 16 * y] += acc[x][y];
    }
}

/* Backward, 3: one block per (b, kv head g, key tile jt), bid = (b KV + g) nt + jt (the
 * longest first); owns dk and dv of its keys: over the group's query heads in order and, for
 * each, the query tiles jt .. nt - 1 in order, P and dS recomputed, dv_j += P_ij dout_i and
 * dk_j += scale dS_ij q_i. */
template <int R, int D>
__global__ static void __launch_bounds__(ATT_NT, 1)
    k_attn_dkv(float *dk, float *dv, const float *dout, const float *lse, const float *Dr,
               const float *q, const float *k, const float *v, moe_attn_dims a) {
    constexpr int RA = R / 16, DB = D / 16;
    extern __shared__ float sm[];
    int S = a.S, H = a.H, KV = a.KV, Dk = a.dk, Dv = a.dv, rep = H / KV, nt = (S + R - 1) / R;
    int ldk = Dk | 1, ldv = Dv | 1, ldp = R + 1;
    float *Ks = sm;           /* [R, ldk] k_j */
    float *Vs = Ks + R * ldk; /* [R, ldv] v_j */
    float *Qs = Vs + R * ldv; /* [R, ldk] q_i */
    float *Os = Qs + R * ldk; /* [R, ldv] dout_i */
    float *Ps = Os + R * ldv; /* [R, ldp] P */
    float *Gs = Ps + R * ldp; /* [R, ldp] scale dS */
    float *Ls = Gs + R * ldp; /* [R] lse_i */
    float *Ds = Ls + R;       /* [R] D_i */
    size_t qs = (size_t)H * Dk, ks = (size_t)KV * Dk, vs = (size_t)KV * Dv;
    size_t os = (size_t)H * Dv, bid = blockIdx.x;
    int jt = (int)(bid % nt), g = (int)(bid / nt % KV), b = (int)(bid / nt / KV);
    int j0 = jt * R, tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    float gk[RA][DB], gv[RA][DB];
#pragma unroll
    for (int x = 0; x < RA; x++)
#pragma unroll
        for (int y = 0; y < DB; y++) gk[x][y] = 0, gv[x][y] = 0;
    att_load<R>(Ks, ldk, k + (size_t)b * S * ks + (size_t)g * Dk, ks, j0, S, Dk);
    att_load<R>(Vs, ldv, v + (size_t)b * S * vs + (size_t)g * Dv, vs, j0, S, Dv);
    for (int h = g * rep; h < (g + 1) * rep; h++) {
        const float *qb = q + (size_t)b * S * qs + (size_t)h * Dk;    /* [S, qs] */
        const float *ob = dout + (size_t)b * S * os + (size_t)h * Dv; /* [S, os] */
        for (int it = jt; it < nt; it++) {
            int i0 = it * R;
            __syncthreads(); /* the previous tile's q, dout, P and dS read */
            att_load<R>(Qs, ldk, qb, qs, i0, S, Dk);
            att_load<R>(Os, ldv, ob, os, i0, S, Dv);
            att_load_rows<R>(Ls, Ds, lse, Dr, ((size_t)b * H + h) * S, i0, S);
            __syncthreads();
            float s[RA][RA], dp[RA][RA];
            att_dots<R>(s, Qs, Ks, ldk, Dk);
            att_dots<R>(dp, Os, Vs, ldv, Dv);
            att_grads<R>(Ps, Gs, s, dp, Ls, Ds, i0, j0, S, a.scale);
            __syncthreads(); /* P and dS written */
            att_acc<R, D, true>(gv, Ps, ldp, Os, ldv, Dv);
            att_acc<R, D, true>(gk, Gs, ldp, Qs, ldk, Dk);
        }
    }
#pragma unroll
    for (int x = 0; x < RA; x++) {
        int j = j0 + ty + 16 * x;
        if (j >= S) continue;
        float *gkj = dk + ((size_t)b * S + j) * ks + (size_t)g * Dk; /* [Dk] */
        float *gvj = dv + ((size_t)b * S + j) * vs + (size_t)g * Dv; /* [Dv] */
#pragma unroll
        for (int y = 0; y < DB; y++) {
            int c = tx + 16 * y;
            if (c < Dk) gkj[c] += gk[x][y];
            if (c < Dv) gvj[c] += gv[x][y];
        }
    }
}

/* Launches kern on blocks x ATT_NT threads with smem bytes of dynamic shared memory (allowed
 * past 48 KB first). */
template <class... P, class... A>
static moe_status att_launch(void (*kern)(P...), unsigned blocks, size_t smem, const char *what,
                             A... args) {
    if (smem > 48 * 1024) {
        cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             (int)smem);
        if (e != cudaSuccess) {
            cudaGetLastError(); /* not sticky: clear it */
            return moe_set_error(MOE_ERR_INVALID, "CUDA: %s: %zu bytes of shared memory a block: "
                                 "%s", what, smem, cudaGetErrorString(e));
        }
    }
    kern<<<blocks, ATT_NT, smem>>>(args...);
    CU_TRY(cudaGetLastError(), what);
    return MOE_OK;
}

/* Checks the shapes. */
static moe_status attn_check(const moe_attn_dims *a, const char *fn) {
    MOE_CHECK(a && a->B >= 0 && a->S >= 0 && a->H >= 1 && a->KV >= 1 && a->H % a->KV == 0,
              "%s: B %d, S %d, H %d, KV %d (H a multiple of KV)", fn, a ? a->B : 0,
              a ? a->S : 0, a ? a->H : 0, a ? a->KV : 0);
    MOE_CHECK(a->dk >= 1 && a->dv >= 1 && a->dk <= ATT_MAX_HEAD && a->dv <= ATT_MAX_HEAD,
              "%s: head widths dk %d, dv %d (1 .. %d)", fn, a->dk, a->dv, ATT_MAX_HEAD);
    size_t n = (size_t)a->B * a->H * a->S;
    MOE_CHECK(n <= INT_MAX, "%s: B %d x H %d x S %d rows exceed the grid", fn, a->B, a->H, a->S);
    return MOE_OK;
}

template <int R, int D>
static moe_status attn_forward_tiles(float *out, float *lse, const float *q, const float *k,
                                     const float *v, const moe_attn_dims *a) {
    unsigned nt = (unsigned)((a->S + R - 1) / R), blocks = nt * (unsigned)(a->H * a->B);
    return att_launch(k_attn_fwd<R, D>, blocks, att_fwd_smem(R, a->dk, a->dv),
                      "attention forward", out, lse, q, k, v, *a);
}

template <int R, int D>
static moe_status attn_backward_tiles(float *dq, float *dk, float *dv, const float *dout,
                                      const float *lse, const float *Dr, const float *q,
                                      const float *k, const float *v, const moe_attn_dims *a) {
    unsigned nt = (unsigned)((a->S + R - 1) / R);
    MOE_TRY(att_launch(k_attn_dkv<R, D>, nt * (unsigned)(a->KV * a->B),
                       att_dkv_smem(R, a->dk, a->dv), "attention backward (dk, dv)", dk, dv,
                       dout, lse, Dr, q, k, v, *a));
    return att_launch(k_attn_dq<R, D>, nt * (unsigned)(a->H * a->B), att_dq_smem(R, a->dk, a->dv),
                      "attention backward (dq)", dq, dout, lse, Dr, q, k, v, *a);
}

extern "C" moe_status moe_cuda_attention_forward(float *out, float *lse, const float *q,
                                                 const float *k, const float *v,
                                                 const moe_attn_dims *a) {
    MOE_TRY(attn_check(a, "moe_cuda_attention_forward"));
    if ((size_t)a->B * a->S == 0) return MOE_OK;
    switch (att_width(a)) {
    case 64: return attn_forward_tiles<64, 64>(out, lse, q, k, v, a);
    case 128: return attn_forward_tiles<64, 128>(out, lse, q, k, v, a);
    default: return attn_forward_tiles<32, 256>(out, lse, q, k, v, a);
    }
}

extern "C" moe_status moe_cuda_attention_backward(float *dq, float *dk, float *dv,
                                                  const float *dout, const float *out,
                                                  const float *lse, const float *q,
                                                  const float *k, const float *v,
                                                  const moe_attn_dims *a, float *scratch) {
    MOE_TRY(attn_check(a, "moe_cuda_attention_backward"));
    size_t rows = (size_t)a->B * a->H * a->S;
    if (rows == 0) return MOE_OK;
    k_attn_delta<<<(unsigned)((rows + 7) / 8), ATT_NT>>>(scratch, dout, out, *a, rows);
    CU_TRY(cudaGetLastError(), "attention backward (D)");
    switch (att_width(a)) {
    case 64: return attn_backward_tiles<64, 64>(dq, dk, dv, dout, lse, scratch, q, k, v, a);
    case 128: return attn_backward_tiles<64, 128>(dq, dk, dv, dout, lse, scratch, q, k, v, a);
    default: return attn_backward_tiles<32, 256>(dq, dk, dv, dout, lse, scratch, q, k, v, a);
    }
}

/* Attention of n new queries over a key/value cache (decoding): a block of DEC_WARPS warps
 * per (head, query, share of the keys). Warp w takes its share's keys in groups of DEC_KEYS,
 * the groups w, w + DEC_WARPS, ... in order: the group's scores (sums over the head's width in
 * lanes and a fixed shuffle tree) and value rows are loaded together, so that a warp waits on
 * memory once per group rather than once per key, and fold into the warp's running maximum,
 * sum and output row (lane e holds dims e, e + 32, ...) key by key. The warps' partial results
 * are merged in warp order; with one share that is the output, else the share's maximum, sum
 * and unnormalised row go to part [n, H, shares, 2 + dv] and k_attn_merge merges the shares in
 * order. Fixed orders throughout: bitwise repeatable. */
#define DEC_WARPS 16
#define DEC_KEYS 4
#define DEC_BLOCKS 256      /* the blocks the shares aim for (a few per multiprocessor) */
#define DEC_MIN_KEYS 64     /* the fewest keys a share is given */

template <int D>
__global__ static void __launch_bounds__(DEC_WARPS * 32)
    k_attn_cached(float *out, float *part, const float *q, const float *k, const float *v,
                  int P, int share, moe_attn_dims a) {
    constexpr int PER = D / 32;
    __shared__ float sq[D], sm[DEC_WARPS], sl[DEC_WARPS], sacc[DEC_WARPS][D];
    int h = blockIdx.x, i = blockIdx.y, lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    int dk = a.dk, dv = a.dv, kvh = h / (a.H / a.KV), nk = P + i + 1;
    int j_end = min(nk, (int)(blockIdx.z + 1) * share);
    const float *qi = q + ((size_t)i * a.H + h) * dk;
    for (int e = threadIdx.x; e < dk; e += blockDim.x) sq[e] = qi[e];
    __syncthreads();
    size_t ks = (size_t)a.KV * dk, vs = (size_t)a.KV * dv;
    const float *kb = k + (size_t)kvh * dk, *vb = v + (size_t)kvh * dv;
    float m = -INFINITY, l = 0, acc[PER];
    for (int r = 0; r < PER; r++) acc[r] = 0;
    for (int j0 = blockIdx.z * share + w * DEC_KEYS; j0 < j_end; j0 += DEC_WARPS * DEC_KEYS) {
        int nj = j_end - j0 < DEC_KEYS ? j_end - j0 : DEC_KEYS;
        float s[DEC_KEYS], vr[DEC_KEYS][PER];
#pragma unroll
        for (int u = 0; u < DEC_KEYS; u++) {
            s[u] = 0;
            const float *kj = kb + (size_t)(j0 + u) * ks, *vj = vb + (size_t)(j0 + u) * vs;
            for (int e = lane; e < dk && u < nj; e += 32) s[u] += sq[e] * kj[e];
#pragma unroll
            for (int r = 0; r < PER; r++)
                vr[u][r] = u < nj && lane + 32 * r < dv ? vj[lane + 32 * r] : 0;
        }
        float mn = m;
#pragma unroll
        for (int u = 0; u < DEC_KEYS; u++) {
            for (int o = 16; o > 0; o >>= 1) s[u] += __shfl_down_sync(0xffffffffu, s[u], o);
            s[u] = __shfl_sync(0xffffffffu, s[u], 0) * a.scale;
            if (u < nj) mn = fmaxf(mn, s[u]);
        }
        float c = expf(m - mn);
        l *= c;
#pragma unroll
        for (int r = 0; r < PER; r++) acc[r] *= c;
#pragma unroll
        for (int u = 0; u < DEC_KEYS; u++) {
            if (u >= nj) break;
            float p = expf(s[u] - mn);
            l += p;
#pragma unroll
            for (int r = 0; r < PER; r++) acc[r] += p * vr[u][r];
        }
        m = mn;
    }
    if (lane == 0) sm[w] = m, sl[w] = l;
    for (int r = 0; r < PER; r++)
        if (lane + 32 * r < dv) sacc[w][lane + 32 * r] = acc[r];
    __syncthreads();
    float M = -INFINITY, L = 0;
    for (int x = 0; x < DEC_WARPS; x++) M = fmaxf(M, sm[x]);
    for (int x = 0; x < DEC_WARPS; x++)
        if (sl[x] > 0) L += sl[x] * expf(sm[x] - M);
    size_t row = (size_t)i * a.H + h;
    float *pz = part ? part + (row * gridDim.z + blockIdx.z) * (2 + dv) : NULL;
    if (pz && threadIdx.x == 0) pz[0] = M, pz[1] = L;
    for (int e = threadIdx.x; e < dv; e += blockDim.x) {
        float o = 0;
        for (int x = 0; x < DEC_WARPS; x++)
            if (sl[x] > 0) o += sacc[x][e] * expf(sm[x] - M);
        if (pz) pz[2 + e] = o;
        else out[row * dv + e] = o / L;
    }
}

/* One block per (head, query): the shares of k_attn_cached (at most DEC_BLOCKS) merged in
 * order; their maxima and sums are read once, into shared memory, by as many threads. */
__global__ static void k_attn_merge(float *out, const float *part, int shares, int dv) {
    __shared__ float wz[DEC_BLOCKS], lz[DEC_BLOCKS];
    size_t row = (size_t)blockIdx.y * gridDim.x + blockIdx.x, stride = 2 + (size_t)dv;
    const float *pr = part + row * shares * stride;
    for (int z = threadIdx.x; z < shares; z += blockDim.x)
        wz[z] = pr[z * stride], lz[z] = pr[z * stride + 1];
    __syncthreads();
    float M = -INFINITY, L = 0;
    for (int z = 0; z < shares; z++) M = fmaxf(M, wz[z]);
    __syncthreads();
    for (int z = threadIdx.x; z < shares; z += blockDim.x)
        wz[z] = lz[z] > 0 ? expf(wz[z] - M) : 0; /* (a share without keys: weight 0) */
    __syncthreads();
    for (int z = 0; z < shares; z++) L += lz[z] * wz[z];
    for (int e = threadIdx.x; e < dv; e += blockDim.x) {
        float o = 0;
#pragma unroll 8
        for (int z = 0; z < shares; z++) o += wz[z] * pr[z * stride + 2 + e];
        out[row * dv + e] = o / L;
    }
}

extern "C" moe_status moe_cuda_attention_cached(float *out, const float *q, const float *k,
                                                const float *v, int n, int P,
                                                const moe_attn_dims *a, float *scratch,
                                                size_t scratch_floats) {
    MOE_TRY(attn_check(a, "moe_cuda_attention_cached"));
    MOE_CHECK(n >= 0 && P >= 0 && n <= 65535, "moe_cuda_attention_cached: %d queries after %d "
              "keys (at most 65535 queries a call)", n, P);
    if (n == 0) return MOE_OK;
    /* shares: enough blocks to fill the GPU, at least DEC_MIN_KEYS keys each, within scratch */
    size_t rows = (size_t)n * a->H, keys = (size_t)P + n;
    size_t shares = (DEC_BLOCKS + rows - 1) / rows;
    size_t most = (keys + DEC_MIN_KEYS - 1) / DEC_MIN_KEYS;
    shares = shares < most ? shares : most;
    size_t fit = scratch ? scratch_floats / (rows * (2 + (size_t)a->dv)) : 0;
    shares = shares < fit ? shares : fit;
    if (shares > DEC_BLOCKS) shares = DEC_BLOCKS; /* (k_attn_merge's bound; already so) */
    if (shares < 2) shares = 1;
    int share = (int)((keys + shares - 1) / shares);
    float *part = shares > 1 ? scratch : NULL;
    dim3 grid((unsigned)a->H, (unsigned)n, (unsigned)shares);
    switch (att_width(a)) {
    case 64: k_attn_cached<64><<<grid, DEC_WARPS * 32>>>(out, part, q, k, v, P, share, *a); break;
    case 128: k_attn_cached<128><<<grid, DEC_WARPS * 32>>>(out, part, q, k, v, P, share, *a); break;
    default: k_attn_cached<256><<<grid, DEC_WARPS * 32>>>(out, part, q, k, v, P, share, *a); break;
    }
    if (part)
        k_attn_merge<<<dim3((unsigned)a->H, (unsigned)n), 128>>>(out, part, (int)shares, a->dv);
    CU_TRY(cudaGetLastError(), "cached attention");
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
