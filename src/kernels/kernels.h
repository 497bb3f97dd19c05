/* kernels/ — math on buffers: GEMM wrappers over CBLAS and element-wise activations. */
#ifndef MOE_KERNELS_H
#define MOE_KERNELS_H

#include "moe.h"

#include <stddef.h>

/* C[m,n] = alpha * op(A) op(B) + beta * C, row-major; ta/tb = 1 means transposed.
 * A is [m,k] (or [k,m] if ta), B is [k,n] (or [n,k] if tb). Empty sizes are no-ops
 * (beta still scales C when k == 0). */
void moe_gemm(int ta, int tb, int m, int n, int k, float alpha, const float *A, int lda,
              const float *B, int ldb, float beta, float *C, int ldc);
void moe_gemm64(int ta, int tb, int m, int n, int k, double alpha, const double *A, int lda,
                const double *B, int ldb, double beta, double *C, int ldc);

/* Activation of one row: h [gf] -> a [f] = w * act(h) (gated: act(h[:f]) * h[f:]). */
void moe_act_forward_row(moe_activation act, int f, const float *h, float w, float *a);
/* Backward of one row: da [f] is dL/da (a = w * act(h)); writes dh [gf] = dL/dh and returns
 * dL/dw = sum(da * act(h)). */
double moe_act_backward_row(moe_activation act, int f, const float *h, float w, const float *da,
                            float *dh);

#endif
