/* No allocation in a step: after a first call has set everything up, further training steps,
 * layer calls (several routing and expert options, a smaller batch than the first) and
 * decoding steps call no allocator of the C library. This program defines malloc, calloc,
 * realloc and the aligned allocators itself (forwarding to glibc's), so that every library in
 * the process — moe.c, the OpenMP runtime, OpenBLAS, oneDNN — allocates through them, and
 * counts the calls while a check runs.
 *
 * libgomp allocates a team for every parallel region that is nested in another, or that has
 * fewer threads than the last one (it keeps one team for the next region of the same size),
 * and for every region when there is one thread; moe.c's regions avoid the first two.
 * oneDNN's matmul allocates inside each call (its memory objects and execution context, about
 * 12 small blocks), and OpenBLAS's small-matrix kernels for AVX-512 a buffer: those are counted
 * apart, by a frame of either library on the allocation's stack, and reported, not failed.
 * LLVM's libomp as Debian 12 builds it (with its debug code, for the clang build) formats a
 * trace string at each worksharing loop's start and dispatch whether or not tracing is on (a
 * 512-byte buffer and vsnprintf's scratch); a frame in it counts apart too, so the check
 * against the OpenMP runtime's team allocations is made by the gcc builds, with libgomp.
 * oneDNN also picks fewer threads than the team for small products, after which libgomp
 * allocates a team for moe.c's next region: with more than two threads a check is skipped when
 * oneDNN ran during it (the suite runs it at three threads with OpenBLAS and our tiles).
 *
 * Usage: test_step_alloc [threads] (default 2; the environment's count is ignored). Skipped
 * under AddressSanitizer, whose allocator must see every block. */
#define _GNU_SOURCE
#include "test_util.h"

#include "moe.h"
#include "kernels/kernels.h"
#include "train/trainer.h"

#include <dlfcn.h>
#include <execinfo.h>
#include <omp.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define TEST_ASAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
#define TEST_ASAN 1
#endif

#ifndef TEST_ASAN
extern void *__libc_malloc(size_t n);
extern void *__libc_calloc(size_t n, size_t size);
extern void *__libc_realloc(void *p, size_t n);
extern void *__libc_memalign(size_t align, size_t n);

#define FRAMES 12
static int counting;                      /* set while a check runs */
static long n_own, n_dnnl, n_blas, n_omp; /* outside / inside oneDNN, OpenBLAS, libomp */
static void *first[FRAMES];               /* the stack of the first one outside them */
static int first_n, first_taken;
static __thread int inside;               /* this thread is in note() (backtrace allocates) */

/* 1 when a frame is in oneDNN, 2 in OpenBLAS, 3 in LLVM's OpenMP runtime, else 0 */
static int library_of(void *const *pc, int n) {
    for (int i = 0; i < n; i++) {
        Dl_info info;
        if (!dladdr(pc[i], &info) || !info.dli_fname) continue;
        if (strstr(info.dli_fname, "libdnnl")) return 1;
        if (strstr(info.dli_fname, "openblas")) return 2;
        if (strstr(info.dli_fname, "libomp.so")) return 3;
    }
    return 0;
}

static void note(void) {
    if (!__atomic_load_n(&counting, __ATOMIC_RELAXED) || inside) return;
    inside = 1;
    void *pc[FRAMES];
    int n = backtrace(pc, FRAMES);
    int lib = library_of(pc, n);
    if (lib) {
        __atomic_fetch_add(lib == 1 ? &n_dnnl : lib == 2 ? &n_blas : &n_omp, 1, __ATOMIC_RELAXED);
    } else {
        int none = 0;
        __atomic_fetch_add(&n_own, 1, __ATOMIC_RELAXED);
        if (__atomic_compare_exchange_n(&first_taken, &none, 1, 0, __ATOMIC_ACQ_REL,
                                        __ATOMIC_RELAXED)) {
            memcpy(first, pc, sizeof(void *) * (size_t)n);
            first_n = n;
        }
    }
    inside = 0;
}

void *malloc(size_t n) {
    note();
    return __libc_malloc(n);
}
void *calloc(size_t n, size_t size) {
    note();
    return __libc_calloc(n, size);
}
void *realloc(void *p, size_t n) {
    note();
    return __libc_realloc(p, n);
}
void *memalign(size_t align, size_t n) {
    note();
    return __libc_memalign(align, n);
}
void *aligned_alloc(size_t align, size_t n) {
    note();
    return __libc_memalign(align, n);
}
int posix_memalign(void **p, size_t align, size_t n) {
    note();
    *p = __libc_memalign(align, n);
    return *p ? 0 : 12; /* ENOMEM */
}

static void count_start(void) {
    n_own = n_dnnl = n_blas = n_omp = 0;
    first_n = first_taken = 0;
    __atomic_store_n(&counting, 1, __ATOMIC_SEQ_CST);
}

/* Stops counting; fails naming the first allocation's stack if there was one outside the
 * libraries counted apart (see the top). */
static void count_check(const char *what) {
    __atomic_store_n(&counting, 0, __ATOMIC_SEQ_CST);
    if (n_dnnl || n_blas)
        printf("%s: %ld allocations inside oneDNN's calls, %ld inside OpenBLAS's\n", what, n_dnnl,
               n_blas);
    if (n_omp)
        printf("%s: %ld allocations inside LLVM's libomp (its trace strings)\n", what, n_omp);
    if (!n_own) return;
    if (n_dnnl && omp_get_max_threads() > 2) {
        printf("%s: %ld more (not checked: oneDNN ran in teams of its own size)\n", what, n_own);
        return;
    }
    fprintf(stderr, "%s: %ld allocations; the first from:\n", what, n_own);
    backtrace_symbols_fd(first, first_n, 2);
    fail_msg("%s allocated memory %ld times", what, n_own);
}

static void fill_tokens(int32_t *tok, int n, int V, uint64_t seed, uint64_t stream) {
    for (int i = 0; i < n; i++)
        tok[i] = (int32_t)(moe_rng_u64(seed, stream, (uint64_t)i) % (uint64_t)V);
}

/* A model whose MoE layers spread their experts over the threads (8 experts, 2 threads) with
 * 256 rows an expert on average (each expert then gathers its own rows), a dense first layer,
 * a shared expert, the aux and z losses. */
static moe_model_config model_config(void) {
    moe_model_config c = moe_model_config_default();
    c.vocab = 97;
    c.d = 32;
    c.n_layers = 3;
    c.n_heads = 4;
    c.n_kv_heads = 2;
    c.ffn = 48;
    c.seq_len = 128;
    c.first_k_dense = 1;
    c.moe.n_experts = 8;
    c.moe.topk = 2;
    c.moe.ffn = 24;
    c.moe.shared_ffn = 16;
    c.moe.aux_coeff = 0.01f;
    c.moe.z_coeff = 0.001f;
    return c;
}

static void test_training_steps(void **state) {
    (void)state;
    moe_model_config c = model_config();
    moe_train_config tc = moe_train_config_default();
    tc.micro_batch = 8, tc.global_batch = 16; /* two micro-batches a step */
    tc.train_iters = 8, tc.warmup_iters = 2, tc.lr = 1e-3f, tc.eval_iters = 2;
    uint64_t seed = tu_seed();
    int n_tok = 20000;
    uint32_t *ids = malloc(sizeof(uint32_t) * (size_t)n_tok);
    for (int i = 0; i < n_tok; i++) ids[i] = (uint32_t)(moe_rng_u64(seed, 1, (uint64_t)i) % 97);
    moe_tokens toks = {.ids = ids, .id_bytes = MOE_TOKENS_U32, .n_tokens = n_tok, .vocab = 97};
    moe_model *m;
    moe_trainer *t;
    moe_step_metrics mt;
    assert_int_equal(moe_model_create(&c, tc.micro_batch * c.seq_len, &m), MOE_OK);
    moe_model_init_params(m, seed);
    assert_int_equal(moe_trainer_create(m, &tc, &toks, &toks, &t), MOE_OK);
    assert_int_equal(moe_trainer_step(t, &mt), MOE_OK);
    double val;
    assert_int_equal(moe_trainer_eval(t, &val), MOE_OK);
    count_start();
    for (int s = 0; s < 3; s++) assert_int_equal(moe_trainer_step(t, &mt), MOE_OK);
    count_check("three training steps");
    count_start();
    assert_int_equal(moe_trainer_eval(t, &val), MOE_OK);
    count_check("an evaluation");
    assert_true(mt.loss > 0 && val > 0);
    moe_trainer_destroy(t);
    moe_model_destroy(m);
    free(ids);
}

/* Layer calls: the first at T tokens sets up, then forward and backward at T and at T / 3. */
static void test_layer_calls(void **state) {
    (void)state;
    enum { T = 1536, D = 32 };
    uint64_t seed = tu_seed();
    for (int v = 0; v < 9; v++) {
        moe_layer_config c = moe_layer_config_default();
        c.d = D, c.n_experts = 8, c.topk = 2, c.ffn = 24, c.aux_coeff = 0.01f, c.z_coeff = 1e-3f;
        const char *what[9] = {"top-k with expert biases and a gated shared expert",
                               "sigmoid scores, groups, selection bias",
                               "expert choice",
                               "capacity factor 1, padded",
                               "Sinkhorn",
                               "ReLU² with input jitter",
                               "float64 router",
                               "Residual-MoE",
                               "bf16 experts"};
        switch (v) {
        case 0: c.expert_bias = 1, c.shared_ffn = 16, c.shared_gate = 1; break;
        case 1:
            c.score = MOE_SCORE_SIGMOID, c.n_groups = 4, c.group_topk = 2;
            c.enable_expert_bias = 1;
            break;
        case 2: c.router = MOE_ROUTER_EXPERT_CHOICE, c.aux_coeff = 0; break;
        case 3: c.capacity_factor = 1.0f, c.pad_to_capacity = 1; break;
        case 4: c.router = MOE_ROUTER_SINKHORN, c.aux_coeff = 0; break;
        case 5: c.act = MOE_ACT_RELU2, c.jitter_eps = 0.01f; break;
        case 6: c.router_fp64 = 1; break;
        case 7: c.shared_ffn = 16, c.residual = 1; break;
        case 8: c.expert_bf16 = 1; break;
        }
        if (c.expert_bf16 && !moe_gemm_bf16_available()) continue; /* test_layer_bf16 says why */
        moe_layer *L;
        if (moe_layer_create(&c, T, NULL, NULL, &L) != MOE_OK)
            fail_msg("%s: %s", what[v], moe_last_error());
        moe_layer_init_params(L, seed + (uint64_t)v, 0.2f);
        float *x = malloc(sizeof(float) * T * D), *out = malloc(sizeof(float) * T * D);
        float *dout = malloc(sizeof(float) * T * D), *dx = malloc(sizeof(float) * T * D);
        tu_fill(x, (size_t)T * D, seed, 10 + (uint64_t)v, -1, 1);
        tu_fill(dout, (size_t)T * D, seed, 20 + (uint64_t)v, -1, 1);
        moe_forward_args a = moe_forward_args_default();
        a.training = 1;
        for (int call = 0; call < 3; call++) {
            int n = call == 2 ? T / 3 : T;
            if (call) count_start();
            a.step = (uint64_t)call;
            memset(dx, 0, sizeof(float) * T * D);
            if (moe_layer_forward(L, out, x, n, &a) != MOE_OK ||
                moe_layer_backward(L, dx, dout, x) != MOE_OK)
                fail_msg("%s: %s", what[v], moe_last_error());
            if (call) count_check(what[v]);
        }
        free(x), free(out), free(dout), free(dx);
        moe_layer_destroy(L);
    }
}

/* Decoding: after the first call (which allocates the key/value cache), prompts and single
 * tokens allocate nothing; nor does a forward without targets. */
static void test_decoding(void **state) {
    (void)state;
    moe_model_config c = model_config();
    uint64_t seed = tu_seed();
    moe_model *m;
    assert_int_equal(moe_model_create_inference(&c, c.seq_len, &m), MOE_OK);
    moe_model_init_params(m, seed);
    int32_t tok[128];
    fill_tokens(tok, 128, c.vocab, seed, 2);
    assert_int_equal(moe_model_decode(m, tok, 16), MOE_OK);
    count_start();
    for (int i = 16; i < 40; i++) assert_int_equal(moe_model_decode(m, tok + i, 1), MOE_OK);
    moe_model_reset_cache(m);
    assert_int_equal(moe_model_decode(m, tok, 24), MOE_OK);
    count_check("decoding 24 tokens one at a time and a prompt");
    moe_model_args args = moe_model_args_default();
    moe_model_loss loss;
    assert_int_equal(moe_model_forward(m, tok, NULL, 1, 128, &args, &loss), MOE_OK);
    count_start();
    assert_int_equal(moe_model_forward(m, tok, NULL, 1, 100, &args, &loss), MOE_OK);
    count_check("a forward without targets");
    moe_model_destroy(m);
}

#else
static void test_skipped(void **state) {
    (void)state;
    skip(); /* AddressSanitizer's allocator must see every block */
}
#endif

int main(int argc, char **argv) {
#ifndef TEST_ASAN
    void *pc[4];
    backtrace(pc, 4); /* the unwinder loads its library now, not while counting */
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_training_steps),
        cmocka_unit_test(test_layer_calls),
        cmocka_unit_test(test_decoding),
    };
#else
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_skipped)};
#endif
    int threads = argc > 1 ? atoi(argv[1]) : 2;
    if (threads < 2) {
        fprintf(stderr, "test_step_alloc: at least 2 threads (with one, libgomp allocates a team "
                        "for every parallel region)\n");
        return 2;
    }
    omp_set_num_threads(threads);
    printf("%d threads\n", threads);
    return cmocka_run_group_tests(tests, NULL, NULL);
}
