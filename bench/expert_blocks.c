/* Expert blocks, one single-threaded GEMM each, spread over the OpenMP threads as the layer
 * spreads its experts: OpenBLAS (moe_gemm_blas), oneDNN's fp32 matmul (moe_gemm_dnnl, m and k
 * given at run time), our AVX-512 tiles (moe_gemm_small), and a oneDNN matmul created for the
 * block's exact shape (every dimension fixed: oneDNN then picks its brgemm kernels, which the
 * run-time dimensions rule out), GFLOP/s of the best of 5 rounds, C += op(A) op(B). Built with
 * -DWITH_BLIS and -lblis (Debian's libblis-dev, not a dependency of moe.c), BLIS too.
 *
 * Without arguments: the six GEMMs of one expert at E = 256 of bench/scaling.sh (32 rows,
 * d = 512, f = 512, gf = 1024), 64 blocks per shape. With arguments, one shape:
 *   expert_blocks ta tb m n k [blocks [distinct]]
 * blocks GEMMs per round (default 64), each with its own A (the expert's rows), and B and C
 * taken from `distinct` copies (default: as many as blocks; 1 or 2 keep them in the caches, to
 * compare against the same blocks from memory). Allocated as the layer allocates (moe_alloc).
 * The build makes build/bench_expert_blocks (when oneDNN is found); by hand
 * (bench/RESULTS.md, Scaling):
 *   cc -O2 -fopenmp -I src -I include bench/expert_blocks.c build/libmoe.a \
 *      $(pkg-config --libs libcjson libpcre2-8 libutf8proc) -ldnnl -lm -ldl -o /tmp/expert_blocks
 *   OMP_NUM_THREADS=2 /tmp/expert_blocks
 *   OMP_NUM_THREADS=2 /tmp/expert_blocks 0 1 96 2048 512 16 8 */
#include "core/core.h"
#include "kernels/kernels.h"

#include <oneapi/dnnl/dnnl.h>
#ifdef WITH_BLIS
#include <blis.h>
#endif
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>

static dnnl_engine_t engine;
static dnnl_memory_desc_t md_a, md_b, md_c;

static void md(dnnl_memory_desc_t *d, int rows, int cols, int trans, int ld) {
    dnnl_dims_t dims = {rows, cols}, strides = {trans ? 1 : ld, trans ? ld : 1};
    dnnl_memory_desc_init_by_strides(d, 2, dims, dnnl_f32, strides);
}

/* C += op(A) op(B) for exactly this shape (NULL where oneDNN has no such primitive). */
static dnnl_primitive_t fixed_shape(int ta, int tb, int m, int n, int k, int lda, int ldb) {
    md(&md_a, m, k, ta, lda), md(&md_b, k, n, tb, ldb), md(&md_c, m, n, 0, n);
    dnnl_matmul_desc_t desc;
    dnnl_primitive_attr_t attr;
    dnnl_post_ops_t ops;
    dnnl_primitive_desc_t pd;
    dnnl_primitive_t p = NULL;
    const char *impl = "";
    dnnl_matmul_desc_init(&desc, &md_a, &md_b, NULL, &md_c);
    dnnl_primitive_attr_create(&attr), dnnl_post_ops_create(&ops);
    dnnl_post_ops_append_sum(ops, 1.0f), dnnl_primitive_attr_set_post_ops(attr, ops);
    if (dnnl_primitive_desc_create(&pd, &desc, attr, engine, NULL) == dnnl_success) {
        dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &impl);
        printf("  oneDNN for the fixed shape: %s\n", impl);
        if (dnnl_primitive_create(&p, pd) != dnnl_success) p = NULL;
        dnnl_primitive_desc_destroy(pd);
    }
    dnnl_post_ops_destroy(ops), dnnl_primitive_attr_destroy(attr);
    return p;
}

static moe_status run_fixed(dnnl_primitive_t p, dnnl_stream_t s, const float *a, const float *b,
                            float *c) {
    dnnl_memory_t m[3] = {NULL, NULL, NULL};
    int ok = p && s && dnnl_memory_create(&m[0], &md_a, engine, (void *)a) == dnnl_success &&
             dnnl_memory_create(&m[1], &md_b, engine, (void *)b) == dnnl_success &&
             dnnl_memory_create(&m[2], &md_c, engine, c) == dnnl_success;
    dnnl_exec_arg_t args[3] = {{DNNL_ARG_SRC, m[0]}, {DNNL_ARG_WEIGHTS, m[1]}, {DNNL_ARG_DST, m[2]}};
    ok = ok && dnnl_primitive_execute(p, s, 3, args) == dnnl_success &&
         dnnl_stream_wait(s) == dnnl_success;
    for (int i = 0; i < 3; i++)
        if (m[i]) dnnl_memory_destroy(m[i]);
    return ok ? MOE_OK : MOE_ERR_STATE;
}

/* As the layer allocates: from 4 MB in 2 MB pages (moe_alloc). */
static float *floats(size_t n) { return moe_alloc(n, sizeof(float)); }

static int run(int ta, int tb, int m, int n, int k, int blocks, int distinct, const char *name) {
    int lda = ta ? m : k, ldb = tb ? k : n;
    size_t na = (size_t)m * k, nb = (size_t)k * n, nc = (size_t)m * n;
    float *A = floats(na * blocks), *B = floats(nb * distinct), *C = floats(nc * distinct);
    if (!A || !B || !C) return 1;
    for (size_t i = 0; i < na * blocks; i++) A[i] = (float)(i % 7) * 0.1f;
    for (size_t i = 0; i < nb * distinct; i++) B[i] = (float)(i % 5) * 0.1f;
    for (size_t i = 0; i < nc * distinct; i++) C[i] = 0;
    dnnl_primitive_t fixed = fixed_shape(ta, tb, m, n, k, lda, ldb);
    double rate[5] = {0, 0, 0, 0, 0};
#ifdef WITH_BLIS
    const int libs = 5;
    bli_thread_set_num_threads(1); /* one block per call, as the others */
#else
    const int libs = 4;
#endif
    for (int lib = 0; lib < libs; lib++)
        for (int r = 0; r < 5; r++) {
            double t = omp_get_wtime();
#pragma omp parallel
            {
                dnnl_stream_t stream = NULL;
                if (lib == 3 && dnnl_stream_create(&stream, engine, dnnl_stream_default_flags) != dnnl_success)
                    stream = NULL;
#pragma omp for schedule(dynamic, 1)
                for (int e = 0; e < blocks; e++) {
                    const float *a = A + na * e, *b = B + nb * (e % distinct);
                    float *c = C + nc * (e % distinct);
                    moe_status st = MOE_ERR_STATE;
                    if (lib == 1) st = moe_gemm_dnnl(ta, tb, m, n, k, a, lda, b, ldb, 1.0f, c, n);
                    if (lib == 2) st = moe_gemm_small(ta, tb, m, n, k, a, lda, b, ldb, 1.0f, c, n);
                    if (lib == 3) st = run_fixed(fixed, stream, a, b, c);
#ifdef WITH_BLIS
                    float one = 1.0f;
                    if (lib == 4)
                        bli_sgemm(ta ? BLIS_TRANSPOSE : BLIS_NO_TRANSPOSE,
                                  tb ? BLIS_TRANSPOSE : BLIS_NO_TRANSPOSE, m, n, k, &one,
                                  (float *)a, lda, 1, (float *)b, ldb, 1, &one, c, n, 1),
                            st = MOE_OK;
#endif
                    if (st != MOE_OK) moe_gemm_blas(ta, tb, m, n, k, 1.0f, a, lda, b, ldb, 1.0f, c, n);
                }
                if (stream) dnnl_stream_destroy(stream);
            }
            t = omp_get_wtime() - t;
            double g = 2.0 * m * n * k * blocks / t / 1e9;
            rate[lib] = g > rate[lib] ? g : rate[lib];
        }
    printf("%-24s OpenBLAS %6.1f   oneDNN %6.1f   small %6.1f   oneDNN fixed %6.1f", name,
           rate[0], rate[1], rate[2], rate[3]);
    if (libs == 5) printf("   BLIS %6.1f", rate[4]);
    printf(" GFLOP/s\n");
    if (fixed) dnnl_primitive_destroy(fixed);
    moe_free(A), moe_free(B), moe_free(C);
    return 0;
}

int main(int argc, char **argv) {
    if (dnnl_engine_create(&engine, dnnl_cpu, 0) != dnnl_success) return 1;
    if (argc >= 6) {
        int v[7] = {0, 0, 0, 0, 0, 64, 0};
        for (int i = 1; i < argc && i <= 7; i++) v[i - 1] = atoi(argv[i]);
        if (v[2] < 1 || v[3] < 1 || v[4] < 1 || v[5] < 1 || (v[0] && v[1])) {
            fprintf(stderr, "usage: expert_blocks [ta tb m n k [blocks [distinct]]]\n");
            return 2;
        }
        int distinct = v[6] >= 1 && v[6] <= v[5] ? v[6] : v[5];
        char name[64];
        snprintf(name, sizeof name, "%s %dx%dx%d", v[0] ? "TN" : v[1] ? "NT" : "NN", v[2], v[3],
                 v[4]);
        return run(v[0], v[1], v[2], v[3], v[4], v[5], distinct, name);
    }
    static const struct {
        int ta, tb, m, n, k;
        const char *name;
    } s[] = {{0, 1, 32, 1024, 512, "h = x W_in^T (NT)"},   {0, 1, 32, 512, 512, "y = a W_out^T (NT)"},
             {1, 0, 512, 512, 32, "dW_out += dy^T a (TN)"}, {0, 0, 32, 512, 512, "da = dy W_out (NN)"},
             {1, 0, 1024, 512, 32, "dW_in += dh^T x (TN)"}, {0, 0, 32, 512, 1024, "dx = dh W_in (NN)"}};
    for (size_t q = 0; q < sizeof s / sizeof *s; q++)
        if (run(s[q].ta, s[q].tb, s[q].m, s[q].n, s[q].k, 64, 64, s[q].name)) return 1;
    return 0;
}
