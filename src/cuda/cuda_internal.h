/* Private pieces shared by the CUDA sources (C++ only): error reporting, cuBLAS loaded at run
 * time, the row-major GEMM, the activations over rows. Everything runs on the default stream. */
#ifndef MOE_CUDA_INTERNAL_H
#define MOE_CUDA_INTERNAL_H

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

extern "C" {
#include "core/core.h"
#include "moe.h"
}

typedef __nv_bfloat16 bf16;

#define MOE_CUDA_BLOCK 256

moe_status moe_cuda_error(cudaError_t e, const char *what);

#define CU_TRY(call, what)                                                                     \
    do {                                                                                       \
        cudaError_t e_ = (call);                                                               \
        if (e_ != cudaSuccess) return moe_cuda_error(e_, what);                                \
    } while (0)

/* A cuBLAS handle (cuBLAS is loaded on first use), or an error naming why there is none. */
moe_status moe_cuda_blas_create(cublasHandle_t *h);
void moe_cuda_blas_destroy(cublasHandle_t h);
const char *moe_cuda_blas_status(cublasStatus_t s);

#define BLAS_TRY(call, what)                                                                   \
    do {                                                                                       \
        cublasStatus_t b_ = (call);                                                            \
        if (b_ != CUBLAS_STATUS_SUCCESS)                                                       \
            return moe_set_error(MOE_ERR_INVALID, "cuBLAS: %s: %s", what,                      \
                                 moe_cuda_blas_status(b_));                                    \
    } while (0)

/* Row-major C [m, n] = op(A) op(B) + beta C, fp32 C and accumulation; A and B fp32, or bf16
 * when b16 (ta, tb: transposed; A is [m, k] or [k, m], B [k, n] or [n, k]). */
cublasStatus_t moe_cuda_gemm(cublasHandle_t h, int ta, int tb, int m, int n, int k,
                             const void *A, int lda, const void *B, int ldb, float beta,
                             float *C, int ldc, int b16);

unsigned moe_cuda_blocks(size_t n, int per);
/* w [n] = normal(0, std) from (seed, index) on the GPU; y [n] = bf16(x) (round to nearest). */
moe_status moe_cuda_fill_normal(float *w, size_t n, uint64_t seed, float std);
moe_status moe_cuda_to_bf16(size_t n, const float *x, bf16 *y);

/* Rows of an MLP: a [n, f] = w_r * act(h [n, gf]) (w NULL: 1), as fp32 or bf16; and its
 * backward: dh [n, gf] from da [n, f], dw_row [n] = sum da * act(h) (NULL: not wanted). */
moe_status moe_cuda_act_forward(moe_activation act, int n, int f, const float *h,
                                const float *w, float *a, bf16 *a16);
moe_status moe_cuda_act_backward(moe_activation act, int n, int f, const float *h,
                                 const float *w, const float *da, float *dh, bf16 *dh16,
                                 double *dw_row);

/* Sums over a block (blockDim.x a power of two) in a fixed order: a tree over the threads'
 * partial sums. sh: shared [blockDim.x]. Every thread gets the sum. */
template <class F> __device__ inline F moe_cuda_block_sum(F v, F *sh) {
    sh[threadIdx.x] = v;
    __syncthreads();
    for (int w = blockDim.x / 2; w > 0; w >>= 1) {
        if ((int)threadIdx.x < w) sh[threadIdx.x] += sh[threadIdx.x + w];
        __syncthreads();
    }
    F s = sh[0];
    __syncthreads();
    return s;
}

#endif
