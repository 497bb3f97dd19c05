/* What the CUDA sources share (cuda_internal.h): errors, the device helpers of moe_cuda.h,
 * cuBLAS loaded at run time, the row-major GEMM, activations over rows, a normal fill, the
 * GEMM timing of the benchmarks. */
#include <dlfcn.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "cuda/cuda_internal.h"

extern "C" {
#include "moe_cuda.h"
#include "moe/mlp.h"
}

moe_status moe_cuda_error(cudaError_t e, const char *what) {
    return moe_set_error(MOE_ERR_INVALID, "CUDA: %s: %s", what, cudaGetErrorString(e));
}

/* cuBLAS is loaded when a GPU is first used, as OpenBLAS is (kernels/gemm.c): a binary built
 * with CUDA starts as fast as one without and runs where cuBLAS is not installed. */
static struct {
    cublasStatus_t (*create)(cublasHandle_t *);
    cublasStatus_t (*destroy)(cublasHandle_t);
    cublasStatus_t (*gemm_ex)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int,
                              const void *, const void *, cudaDataType, int, const void *,
                              cudaDataType, int, const void *, void *, cudaDataType, int,
                              cublasComputeType_t, cublasGemmAlgo_t);
    const char *(*status_string)(cublasStatus_t);
    char error[512];
} cb;
static pthread_once_t cb_once = PTHREAD_ONCE_INIT;

static void load_cublas(void) {
    char name[64];
    snprintf(name, sizeof name, "libcublas.so.%d", CUBLAS_VER_MAJOR);
    void *h = dlopen(name, RTLD_NOW | RTLD_GLOBAL);
    if (!h) h = dlopen("libcublas.so", RTLD_NOW | RTLD_GLOBAL);
    if (!h) {
        snprintf(cb.error, sizeof cb.error, "cuBLAS could not be loaded (%s): %s", name, dlerror());
        return;
    }
    *(void **)&cb.create = dlsym(h, "cublasCreate_v2");
    *(void **)&cb.destroy = dlsym(h, "cublasDestroy_v2");
    *(void **)&cb.gemm_ex = dlsym(h, "cublasGemmEx");
    *(void **)&cb.status_string = dlsym(h, "cublasGetStatusString");
    if (!cb.create || !cb.destroy || !cb.gemm_ex || !cb.status_string) {
        snprintf(cb.error, sizeof cb.error, "%s lacks cublasGemmEx or its peers", name);
        cb.create = NULL;
    }
}

/* A cuBLAS handle, or an error naming why there is none. */
moe_status moe_cuda_blas_create(cublasHandle_t *h) {
    pthread_once(&cb_once, load_cublas);
    if (!cb.create) return moe_set_error(MOE_ERR_INVALID, "CUDA: %s", cb.error);
    if (cb.create(h) != CUBLAS_STATUS_SUCCESS) {
        *h = NULL;
        return moe_set_error(MOE_ERR_INVALID, "cuBLAS: could not create a handle");
    }
    return MOE_OK;
}

void moe_cuda_blas_destroy(cublasHandle_t h) {
    if (h && cb.destroy) cb.destroy(h);
}

const char *moe_cuda_blas_status(cublasStatus_t s) {
    return cb.status_string ? cb.status_string(s) : "cuBLAS not loaded";
}

/* ---- device helpers ---------------------------------------------------------------------- */

extern "C" int moe_cuda_device_count(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError(); /* clear it: no driver or no device */
        return 0;
    }
    return n;
}

extern "C" const char *moe_cuda_device_name(void) {
    static char name[320];
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0) {
        snprintf(name, sizeof name, "no CUDA device (%s)",
                 e != cudaSuccess ? cudaGetErrorString(e) : "none found");
        cudaGetLastError();
        return name;
    }
    cudaDeviceProp p;
    if (cudaGetDeviceProperties(&p, 0) != cudaSuccess) return "CUDA device 0 (no properties)";
    snprintf(name, sizeof name, "%.200s (compute capability %d.%d, %d SMs, %.1f GiB)", p.name,
             p.major, p.minor, p.multiProcessorCount, p.totalGlobalMem / 1073741824.0);
    return name;
}

extern "C" moe_status moe_cuda_alloc(void **p, size_t bytes) {
    *p = NULL;
    CU_TRY(cudaMalloc(p, bytes ? bytes : 1), "cudaMalloc");
    return MOE_OK;
}
extern "C" void moe_cuda_free(void *p) {
    if (p) cudaFree(p);
}
extern "C" moe_status moe_cuda_to_device(void *dst, const void *src, size_t bytes) {
    CU_TRY(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice), "copy to the GPU");
    return MOE_OK;
}
extern "C" moe_status moe_cuda_to_host(void *dst, const void *src, size_t bytes) {
    CU_TRY(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost), "copy from the GPU");
    return MOE_OK;
}
extern "C" moe_status moe_cuda_host_register(void *p, size_t bytes) {
    CU_TRY(cudaHostRegister(p, bytes, cudaHostRegisterDefault), "pin host memory");
    return MOE_OK;
}
extern "C" void moe_cuda_host_unregister(void *p) {
    if (p && cudaHostUnregister(p) != cudaSuccess) cudaGetLastError();
}
extern "C" moe_status moe_cuda_synchronize(void) {
    CU_TRY(cudaDeviceSynchronize(), "synchronize");
    return MOE_OK;
}

unsigned moe_cuda_blocks(size_t n, int per) { return (unsigned)((n + per - 1) / per); }

/* cuBLAS is column-major: it computes Cᵀ = op(B)ᵀ op(A)ᵀ with the operands swapped. */
cublasStatus_t moe_cuda_gemm(cublasHandle_t h, int ta, int tb, int m, int n, int k, const void *A,
                             int lda, const void *B, int ldb, float beta, float *C, int ldc,
                             int b16) {
    const float one = 1.0f;
    cudaDataType_t t = b16 ? CUDA_R_16BF : CUDA_R_32F;
    return cb.gemm_ex(h, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, n, m,
                      k, &one, B, t, ldb, A, t, lda, &beta, C, CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F,
                      CUBLAS_GEMM_DEFAULT);
}

/* splitmix64: a counter-based generator for the GPU's own initialisation. */
__device__ static uint64_t mix64(uint64_t z) {
    z += 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

__global__ static void k_normal(float *w, size_t n, uint64_t seed, float std) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        uint64_t r = mix64(seed ^ mix64(i));
        double u1 = ((r >> 11) + 1.0) / 9007199254740993.0, u2 = (mix64(r) >> 11) / 9007199254740992.0;
        w[i] = (float)(std * sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
    }
}

moe_status moe_cuda_fill_normal(float *w, size_t n, uint64_t seed, float std) {
    k_normal<<<4096, MOE_CUDA_BLOCK>>>(w, n, seed, std);
    CU_TRY(cudaGetLastError(), "fill with normal values");
    return MOE_OK;
}

__global__ static void k_to_bf16(size_t n, const float *x, bf16 *y) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        y[i] = __float2bfloat16(x[i]);
}

moe_status moe_cuda_to_bf16(size_t n, const float *x, bf16 *y) {
    k_to_bf16<<<4096, MOE_CUDA_BLOCK>>>(n, x, y);
    CU_TRY(cudaGetLastError(), "convert to bf16");
    return MOE_OK;
}

/* ---- activations ------------------------------------------------------------------------- */

__device__ static float sigm(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ static float gelu(float h) { return 0.5f * h * (1.0f + erff(h * 0.70710678118654752f)); }
__device__ static float dgelu(float h) {
    return 0.5f * (1.0f + erff(h * 0.70710678118654752f)) +
           h * 0.39894228040143268f * expf(-0.5f * h * h);
}

/* phi(g) of the activation (the gate's value; times the partner u for gated ones). */
__device__ static float act_phi(moe_activation act, float g) {
    switch (act) {
    case MOE_ACT_SWIGLU:
    case MOE_ACT_SILU: return g * sigm(g);
    case MOE_ACT_GEGLU:
    case MOE_ACT_GELU: return gelu(g);
    case MOE_ACT_RELU2: return g > 0 ? g * g : 0.0f;
    }
    return 0;
}
__device__ static float act_dphi(moe_activation act, float g) {
    switch (act) {
    case MOE_ACT_SWIGLU:
    case MOE_ACT_SILU: {
        float s = sigm(g);
        return s * (1.0f + g * (1.0f - s));
    }
    case MOE_ACT_GEGLU:
    case MOE_ACT_GELU: return dgelu(g);
    case MOE_ACT_RELU2: return g > 0 ? 2.0f * g : 0.0f;
    }
    return 0;
}

/* a [R, f] = w_r * phi(h_gate) (* h_up for gated ones). */
template <typename T>
__global__ static void k_act(moe_activation act, int gated, int f, int gf, const float *h,
                             const float *row_w, T *a) {
    int r = blockIdx.x;
    const float *hr = h + (size_t)r * gf;
    float w = row_w ? row_w[r] : 1.0f;
    for (int i = threadIdx.x; i < f; i += blockDim.x) {
        float v = w * act_phi(act, hr[i]) * (gated ? hr[f + i] : 1.0f);
        a[(size_t)r * f + i] = (T)v;
    }
}

/* dh [R, gf] from da [R, f]; dw_row[r] = sum_i da * phi * u (block sum, fixed order). */
template <typename T>
__global__ static void k_act_backward(moe_activation act, int gated, int f, int gf,
                                      const float *h, const float *row_w, const float *da, T *dh,
                                      double *dw_row) {
    __shared__ double sh[MOE_CUDA_BLOCK];
    int r = blockIdx.x;
    const float *hr = h + (size_t)r * gf, *dar = da + (size_t)r * f;
    T *dhr = dh + (size_t)r * gf;
    float w = row_w ? row_w[r] : 1.0f;
    double dw = 0;
    for (int i = threadIdx.x; i < f; i += blockDim.x) {
        float g = hr[i], u = gated ? hr[f + i] : 1.0f, phi = act_phi(act, g);
        dw += (double)(dar[i] * phi * u);
        dhr[i] = (T)(w * dar[i] * u * act_dphi(act, g));
        if (gated) dhr[f + i] = (T)(w * dar[i] * phi);
    }
    dw = moe_cuda_block_sum(dw, sh);
    if (threadIdx.x == 0 && dw_row) dw_row[r] = dw;
}

moe_status moe_cuda_act_forward(moe_activation act, int n, int f, const float *h,
                                const float *w, float *a, bf16 *a16) {
    if (n <= 0) return MOE_OK;
    int gated = moe_act_gated(act), gf = gated ? 2 * f : f;
    if (a16) k_act<<<n, MOE_CUDA_BLOCK>>>(act, gated, f, gf, h, w, a16);
    else k_act<<<n, MOE_CUDA_BLOCK>>>(act, gated, f, gf, h, w, a);
    CU_TRY(cudaGetLastError(), "activation");
    return MOE_OK;
}

moe_status moe_cuda_act_backward(moe_activation act, int n, int f, const float *h,
                                 const float *w, const float *da, float *dh, bf16 *dh16,
                                 double *dw_row) {
    if (n <= 0) return MOE_OK;
    int gated = moe_act_gated(act), gf = gated ? 2 * f : f;
    if (dh16) k_act_backward<<<n, MOE_CUDA_BLOCK>>>(act, gated, f, gf, h, w, da, dh16, dw_row);
    else k_act_backward<<<n, MOE_CUDA_BLOCK>>>(act, gated, f, gf, h, w, da, dh, dw_row);
    CU_TRY(cudaGetLastError(), "activation backward");
    return MOE_OK;
}

/* ---- benchmarks -------------------------------------------------------------------------- */

extern "C" double moe_cuda_gemm_seconds(int ta, int tb, int m, int n, int k, int b16, int reps) {
    if (moe_cuda_device_count() < 1) return -1;
    size_t es = b16 ? 2 : 4, na = (size_t)m * k, nb = (size_t)k * n, nc = (size_t)m * n;
    void *A = NULL, *B = NULL;
    float *C = NULL, *tmp = NULL;
    cublasHandle_t h = NULL;
    cudaEvent_t e0 = NULL, e1 = NULL;
    double best = -1;
    size_t big = na > nb ? na : nb;
    if (cudaMalloc(&A, na * es) == cudaSuccess && cudaMalloc(&B, nb * es) == cudaSuccess &&
        cudaMalloc((void **)&C, nc * 4) == cudaSuccess &&
        cudaMalloc((void **)&tmp, big * 4) == cudaSuccess &&
        moe_cuda_blas_create(&h) == MOE_OK && cudaEventCreate(&e0) == cudaSuccess &&
        cudaEventCreate(&e1) == cudaSuccess) {
        /* random operands (zeros run faster on these chips) */
        moe_cuda_fill_normal(tmp, na, 1, 1.0f);
        if (b16) moe_cuda_to_bf16(na, tmp, (bf16 *)A);
        else cudaMemcpy(A, tmp, na * 4, cudaMemcpyDeviceToDevice);
        moe_cuda_fill_normal(tmp, nb, 2, 1.0f);
        if (b16) moe_cuda_to_bf16(nb, tmp, (bf16 *)B);
        else cudaMemcpy(B, tmp, nb * 4, cudaMemcpyDeviceToDevice);
        int lda = ta ? m : k, ldb = tb ? k : n;
        int ok = moe_cuda_gemm(h, ta, tb, m, n, k, A, lda, B, ldb, 0, C, n, b16) == CUBLAS_STATUS_SUCCESS;
        for (int r = 0; r < reps && ok; r++) {
            cudaEventRecord(e0, 0);
            ok = moe_cuda_gemm(h, ta, tb, m, n, k, A, lda, B, ldb, 0, C, n, b16) == CUBLAS_STATUS_SUCCESS;
            cudaEventRecord(e1, 0);
            float ms = 0;
            if (ok && cudaEventSynchronize(e1) == cudaSuccess &&
                cudaEventElapsedTime(&ms, e0, e1) == cudaSuccess)
                best = best < 0 || 1e-3 * ms < best ? 1e-3 * ms : best;
        }
    }
    cudaGetLastError();
    if (e0) cudaEventDestroy(e0);
    if (e1) cudaEventDestroy(e1);
    moe_cuda_blas_destroy(h);
    cudaFree(A), cudaFree(B), cudaFree(C), cudaFree(tmp);
    return best;
}

extern "C" double moe_cuda_copy_bandwidth(size_t bytes, int reps) {
    if (moe_cuda_device_count() < 1) return -1;
    void *a = NULL, *b = NULL;
    cudaEvent_t e0 = NULL, e1 = NULL;
    double best = -1;
    if (cudaMalloc(&a, bytes) == cudaSuccess && cudaMalloc(&b, bytes) == cudaSuccess &&
        cudaEventCreate(&e0) == cudaSuccess && cudaEventCreate(&e1) == cudaSuccess &&
        cudaMemset(a, 1, bytes) == cudaSuccess &&
        cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice) == cudaSuccess) {
        for (int r = 0; r < reps; r++) {
            float ms = 0;
            cudaEventRecord(e0, 0);
            cudaError_t e = cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice);
            cudaEventRecord(e1, 0);
            if (e == cudaSuccess && cudaEventSynchronize(e1) == cudaSuccess &&
                cudaEventElapsedTime(&ms, e0, e1) == cudaSuccess && ms > 0) {
                double bw = 2.0 * (double)bytes / (1e-3 * ms);
                best = bw > best ? bw : best;
            }
        }
    }
    cudaGetLastError();
    if (e0) cudaEventDestroy(e0);
    if (e1) cudaEventDestroy(e1);
    cudaFree(a), cudaFree(b);
    return best;
}
