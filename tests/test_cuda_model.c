/* The transformer on the GPU (moe_model_use_device "cuda") against the same model on the CPU:
 * losses, every parameter's gradient, the MoE layers' counts, bitwise repeatability, training
 * steps through the trainer, and the configurations it refuses. Without a GPU (or in a build
 * without CUDA) it says so and exits 77, which CTest counts as skipped. */
#define _POSIX_C_SOURCE 200809L
#include "test_util.h"
#include "train/trainer.h"

#include "moe.h"
#include "moe_cuda.h"

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

/* Three blocks (dense, then two MoE), grouped-query attention, aux and z losses, selection
 * biases. */
static moe_model_config small_config(void) {
    moe_model_config c = moe_model_config_default();
    c.vocab = 257;
    c.d = 64;
    c.n_layers = 3;
    c.n_heads = 4;
    c.n_kv_heads = 2;
    c.ffn = 96;
    c.seq_len = 48;
    c.first_k_dense = 1;
    c.init_std = 0.1f;
    c.moe.n_experts = 8;
    c.moe.topk = 2;
    c.moe.ffn = 48;
    c.moe.aux_coeff = 0.01f;
    c.moe.z_coeff = 0.001f;
    c.moe.enable_expert_bias = 1;
    return c;
}

typedef struct {
    moe_model_loss loss;
    float *grads;
    int64_t counts[3][8];
} run_out;

/* A model with the parameters and selection biases of seed, on the CPU or the GPU. */
static moe_model *make(const moe_model_config *c, int cuda, uint64_t seed, int max_tokens) {
    moe_model *m;
    assert_int_equal(moe_model_create(c, max_tokens, &m), MOE_OK);
    if (cuda && moe_model_use_device(m, "cuda") != MOE_OK) fail_msg("%s", moe_last_error());
    moe_model_init_params(m, seed);
    float *p = moe_model_params(m);
    for (int i = 0; i < moe_model_n_tensors(m); i++) { /* norm weights away from 1 */
        const moe_tensor_info *t = moe_model_tensor(m, i);
        if (strstr(t->name, "norm.weight"))
            tu_fill(p + t->offset, t->numel, seed, 100 + (uint64_t)i, 0.7f, 1.3f);
    }
    for (int l = 0; l < c->n_layers; l++) {
        moe_layer *ml = moe_model_moe_layer(m, l);
        if (ml) tu_fill(moe_layer_expert_bias(ml), 8, seed, 200 + (uint64_t)l, -0.02f, 0.02f);
    }
    return m;
}

/* One forward and backward of a batch with the parameters and biases of seed. */
static void run(const moe_model_config *c, int cuda, uint64_t seed, const int32_t *tok,
                const int32_t *tgt, int B, int S, run_out *r) {
    memset(r, 0, sizeof *r);
    moe_model *m = make(c, cuda, seed, B * S);
    moe_model_args args = moe_model_args_default();
    args.loss_scale = 0.5f;
    moe_model_zero_grads(m);
    if (moe_model_forward(m, tok, tgt, B, S, &args, &r->loss) != MOE_OK)
        fail_msg("forward: %s", moe_last_error());
    for (int l = 0; l < c->n_layers; l++) {
        moe_layer *ml = moe_model_moe_layer(m, l);
        for (int e = 0; e < 8 && ml; e++) r->counts[l][e] = moe_layer_get_stats(ml)->counts[e];
    }
    if (moe_model_backward(m) != MOE_OK) fail_msg("backward: %s", moe_last_error());
    size_t n = moe_model_param_count(m);
    r->grads = malloc(n * sizeof(float));
    memcpy(r->grads, moe_model_grads(m), n * sizeof(float));
    moe_model_destroy(m);
}

static void test_against_cpu(void **state) {
    (void)state;
    uint64_t seed = tu_seed();
    moe_model_config c = small_config();
    int B = 3, S = 48, T = B * S;
    int32_t *tok = malloc(sizeof(int32_t) * (size_t)T), *tgt = malloc(sizeof(int32_t) * (size_t)T);
    for (int t = 0; t < T; t++) {
        tok[t] = (int32_t)(moe_rng_u64(seed, 11, (uint64_t)t) % 257);
        tgt[t] = t % 13 == 5 ? -1 : (int32_t)(moe_rng_u64(seed, 12, (uint64_t)t) % 257);
    }
    for (int tied = 0; tied < 2; tied++) {
        c.tie_embeddings = tied;
        c.moe.shared_ffn = tied ? 24 : 0; /* and a gated shared expert */
        c.moe.shared_gate = tied;
        run_out cpu, gpu, again;
        run(&c, 0, seed, tok, tgt, B, S, &cpu);
        run(&c, 1, seed, tok, tgt, B, S, &gpu);
        assert_int_equal(gpu.loss.n_targets, cpu.loss.n_targets);
        double en = fabs(gpu.loss.nll - cpu.loss.nll) / cpu.loss.nll;
        double ea = fabs(gpu.loss.aux - cpu.loss.aux) / cpu.loss.aux;
        double ez = fabs(gpu.loss.z - cpu.loss.z) / cpu.loss.z;
        if (!(en < 1e-5 && ea < 1e-5 && ez < 1e-5))
            fail_msg("losses nll %.9g aux %.9g z %.9g on the GPU, %.9g %.9g %.9g on the CPU",
                     gpu.loss.nll, gpu.loss.aux, gpu.loss.z, cpu.loss.nll, cpu.loss.aux,
                     cpu.loss.z);
        assert_memory_equal(gpu.counts, cpu.counts, sizeof cpu.counts);
        /* every tensor's gradient within 1e-4 of its largest entry: fp32 rounding through
         * three blocks (attention softmaxes, norms, routing weights) stays near 1e-6; a
         * wrong term is of the order of the entries themselves */
        moe_model *m;
        assert_int_equal(moe_model_create(&c, T, &m), MOE_OK);
        double worst = 0;
        const char *worst_name = "";
        for (int i = 0; i < moe_model_n_tensors(m); i++) {
            const moe_tensor_info *t = moe_model_tensor(m, i);
            /* (an expert no token chose has zero gradients on both: 0) */
            double r = tu_rel_err(gpu.grads + t->offset, cpu.grads + t->offset, t->numel, NULL);
            if (r > worst) worst = r, worst_name = t->name;
            if (!(r < 1e-4))
                fail_msg("%s: the GPU's gradient differs by %.3g of its largest entry", t->name, r);
        }
        printf("%s: nll %.3g aux %.3g z %.3g relative; gradients within %.3g (%s)\n",
               tied ? "tied embeddings, gated shared expert" : "separate embeddings", en, ea, ez,
               worst, worst_name);
        run(&c, 1, seed, tok, tgt, B, S, &again); /* bitwise repeatable */
        assert_memory_equal(again.grads, gpu.grads, moe_model_param_count(m) * sizeof(float));
        assert_true(again.loss.nll == gpu.loss.nll);
        moe_model_destroy(m);
        free(cpu.grads), free(gpu.grads), free(again.grads);
    }
    free(tok), free(tgt);
}

/* Five steps of a trainer from seed's parameters on the CPU or the GPU (AdamW there too); on
 * the GPU a checkpoint after step 3 (save_dir not NULL), or a start from it (ckpt). */
static void train_steps(const moe_model_config *c, const moe_train_config *tc,
                        const moe_tokens *toks, int cuda, uint64_t seed, const char *save_dir,
                        const char *ckpt, double loss[5]) {
    moe_model *m;
    moe_trainer *t;
    assert_int_equal(moe_model_create(c, tc->micro_batch * c->seq_len, &m), MOE_OK);
    if (cuda) assert_int_equal(moe_model_use_device(m, "cuda"), MOE_OK);
    moe_model_init_params(m, seed);
    assert_int_equal(moe_trainer_create(m, tc, toks, NULL, &t), MOE_OK);
    if (ckpt && moe_checkpoint_load(ckpt, m, t, 0) != MOE_OK) fail_msg("%s", moe_last_error());
    for (int s = moe_trainer_steps_done(t); s < 5; s++) {
        moe_step_metrics mt;
        if (moe_trainer_step(t, &mt) != MOE_OK) fail_msg("step: %s", moe_last_error());
        loss[s] = mt.loss;
        if (save_dir && s == 2 && moe_checkpoint_save(save_dir, 2, "", m, t) != MOE_OK)
            fail_msg("save: %s", moe_last_error());
    }
    moe_trainer_destroy(t);
    moe_model_destroy(m);
}

/* The trainer on the GPU model (AdamW on the GPU): the same losses step by step as on the
 * CPU within the rounding that grows over the steps; a checkpoint saved from the GPU and
 * resumed there continues with bitwise the same losses. */
static void test_training(void **state) {
    (void)state;
    moe_model_config c = small_config();
    c.n_layers = 2;
    moe_train_config tc = moe_train_config_default();
    tc.micro_batch = 2;
    tc.global_batch = 4;
    tc.lr = 3e-3f;
    tc.warmup_iters = 0;
    tc.train_iters = 5;
    int n_tok = 20000;
    uint32_t *data = malloc(sizeof(uint32_t) * (size_t)n_tok);
    uint64_t seed = tu_seed();
    /* a text with structure to learn: a random walk over 40 symbols with steps of 1 to 3 */
    for (int i = 0, v = 0; i < n_tok; i++) {
        v = (v + 1 + (int)(moe_rng_u64(seed, 3, (uint64_t)i) % 3)) % 40;
        data[i] = (uint32_t)v;
    }
    moe_tokens toks = {.ids = data, .id_bytes = MOE_TOKENS_U32,
        .n_tokens = n_tok, .vocab = 257, .eot = 0};
    char dir[] = "/tmp/moe_test_cuda_XXXXXX", ckpt[4400];
    assert_non_null(mkdtemp(dir));
    double loss[3][5];
    train_steps(&c, &tc, &toks, 0, seed, NULL, NULL, loss[0]);
    train_steps(&c, &tc, &toks, 1, seed, dir, NULL, loss[1]);
    assert_int_equal(moe_checkpoint_resolve(dir, ckpt, sizeof ckpt), MOE_OK);
    train_steps(&c, &tc, &toks, 1, seed, NULL, ckpt, loss[2]);
    for (int s = 0; s < 5; s++) {
        printf("step %d: loss %.7f (CPU) %.7f (GPU)%s\n", s + 1, loss[0][s], loss[1][s],
               s >= 3 ? " and resumed" : "");
        if (!(fabs(loss[1][s] - loss[0][s]) < 1e-4 * loss[0][s]))
            fail_msg("step %d: loss %.9g on the GPU, %.9g on the CPU", s + 1, loss[1][s],
                     loss[0][s]);
        if (s >= 3 && loss[2][s] != loss[1][s])
            fail_msg("step %d after resuming: loss %.9g, %.9g without the checkpoint", s + 1,
                     loss[2][s], loss[1][s]);
    }
    assert_true(loss[1][4] < loss[1][0]); /* it learns */
    char cmd[200];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    assert_int_equal(system(cmd), 0);
    free(data);
}

/* A second trainer on the same GPU model starts from zero moments, as a fresh model with the
 * same parameters does; the model stays on the GPU while a trainer holds it, and comes back
 * to the CPU with the trained parameters after. */
static void test_trainer_lifecycle(void **state) {
    (void)state;
    moe_model_config c = small_config();
    c.n_layers = 2;
    moe_train_config tc = moe_train_config_default();
    tc.micro_batch = 2, tc.global_batch = 2, tc.lr = 3e-3f, tc.warmup_iters = 0;
    tc.train_iters = 4;
    uint64_t seed = tu_seed();
    int n_tok = 8000;
    uint32_t *data = malloc(sizeof(uint32_t) * (size_t)n_tok);
    for (int i = 0; i < n_tok; i++) data[i] = (uint32_t)(moe_rng_u64(seed, 4, (uint64_t)i) % 97);
    moe_tokens toks = {.ids = data, .id_bytes = MOE_TOKENS_U32,
        .n_tokens = n_tok, .vocab = 257, .eot = 0};
    moe_model *m, *fresh;
    moe_trainer *t;
    moe_step_metrics mt;
    size_t np;
    assert_int_equal(moe_model_create(&c, tc.micro_batch * c.seq_len, &m), MOE_OK);
    assert_int_equal(moe_model_use_device(m, "cuda"), MOE_OK);
    moe_model_init_params(m, seed);
    np = moe_model_param_count(m);
    assert_int_equal(moe_trainer_create(m, &tc, &toks, NULL, &t), MOE_OK);
    for (int s = 0; s < 2; s++) assert_int_equal(moe_trainer_step(t, &mt), MOE_OK);
    assert_int_equal(moe_model_use_device(m, "cpu"), MOE_ERR_STATE); /* a trainer holds it */
    moe_trainer_destroy(t);
    float *trained = malloc(np * sizeof(float)), bias[2][8];
    memcpy(trained, moe_model_params(m), np * sizeof(float));
    for (int l = 0; l < c.n_layers; l++) /* and the selection biases A's steps moved */
        if (moe_model_moe_layer(m, l))
            memcpy(bias[l], moe_layer_expert_bias(moe_model_moe_layer(m, l)), sizeof bias[l]);
    double loss[2][2];
    assert_int_equal(moe_trainer_create(m, &tc, &toks, NULL, &t), MOE_OK);
    for (int s = 0; s < 2; s++) {
        assert_int_equal(moe_trainer_step(t, &mt), MOE_OK);
        loss[0][s] = mt.loss;
    }
    moe_trainer_destroy(t);
    assert_int_equal(moe_model_create(&c, tc.micro_batch * c.seq_len, &fresh), MOE_OK);
    assert_int_equal(moe_model_use_device(fresh, "cuda"), MOE_OK);
    memcpy(moe_model_params(fresh), trained, np * sizeof(float));
    for (int l = 0; l < c.n_layers; l++)
        if (moe_model_moe_layer(fresh, l))
            memcpy(moe_layer_expert_bias(moe_model_moe_layer(fresh, l)), bias[l], sizeof bias[l]);
    assert_int_equal(moe_trainer_create(fresh, &tc, &toks, NULL, &t), MOE_OK);
    for (int s = 0; s < 2; s++) {
        assert_int_equal(moe_trainer_step(t, &mt), MOE_OK);
        loss[1][s] = mt.loss;
    }
    moe_trainer_destroy(t);
    for (int s = 0; s < 2; s++)
        if (loss[0][s] != loss[1][s])
            fail_msg("second trainer, step %d: loss %.9g, a fresh model's %.9g", s + 1, loss[0][s],
                     loss[1][s]);
    /* back on the CPU with what the GPU trained */
    memcpy(trained, moe_model_params(fresh), np * sizeof(float));
    assert_int_equal(moe_model_use_device(fresh, "cpu"), MOE_OK);
    assert_memory_equal(moe_model_params(fresh), trained, np * sizeof(float));
    moe_model_destroy(m);
    moe_model_destroy(fresh);
    free(trained), free(data);
}

/* The logits [S, V] of tok [0, S) decoded in calls of 10, 3, then 1 token (out). */
static void decode_all(moe_model *m, const int32_t *tok, int S, int V, float *out) {
    moe_model_reset_cache(m);
    for (int fed = 0, n = 10; fed < S; fed += n, n = fed == 10 ? 3 : 1) {
        if (moe_model_decode(m, tok + fed, n) != MOE_OK) fail_msg("%s", moe_last_error());
        memcpy(out + (size_t)fed * V, moe_model_logits(m), sizeof(float) * (size_t)n * V);
    }
}

/* Decodes tok [0, S) on both models (decode_all) and compares the logits. */
static void decode_both(moe_model *cpu, moe_model *gpu, const int32_t *tok, int S, int V,
                        const char *what) {
    size_t n = (size_t)S * V;
    float *lc = malloc(n * 4), *lg = malloc(n * 4);
    assert_true(lc && lg);
    decode_all(cpu, tok, S, V, lc);
    decode_all(gpu, tok, S, V, lg);
    double e = tu_rel_err(lg, lc, n, NULL);
    if (!(e < 1e-5)) fail_msg("%s: decoded logits differ by %.3g of their scale", what, e);
    assert_int_equal(moe_model_cache_len(gpu), S);
    assert_int_equal(moe_model_decode(gpu, tok, 1), MOE_ERR_INVALID); /* the cache is full */
    free(lc), free(lg);
}

/* Evaluation logits, and generation with the key/value cache on the GPU (a model of fewer
 * tokens a call than the sequence), against the CPU's; parameters written between decoding
 * runs reach the GPU. */
static void test_decode(void **state) {
    (void)state;
    uint64_t seed = tu_seed();
    moe_model_config c = small_config();
    int S = c.seq_len, V = c.vocab;
    moe_model *cpu = make(&c, 0, seed, S), *gpu = make(&c, 1, seed, 12);
    int32_t tok[48];
    for (int t = 0; t < S; t++) tok[t] = (int32_t)(moe_rng_u64(seed, 21, (uint64_t)t) % 257);
    moe_model_args args = moe_model_args_default();
    args.training = 0;
    moe_model_loss lc, lg;
    assert_int_equal(moe_model_forward(cpu, tok, tok, 1, 12, &args, &lc), MOE_OK);
    assert_int_equal(moe_model_forward(gpu, tok, tok, 1, 12, &args, &lg), MOE_OK);
    double e = tu_rel_err(moe_model_logits(gpu), moe_model_logits(cpu), (size_t)12 * V, NULL);
    if (!(e < 1e-5)) fail_msg("evaluation logits differ by %.3g of their scale", e);
    decode_both(cpu, gpu, tok, S, V, "first run");
    /* new parameters on both (the GPU keeps its copy between decoding calls until this) */
    size_t np = moe_model_param_count(cpu);
    float *pc = moe_model_params(cpu), *pg = moe_model_params(gpu), *dp = malloc(np * 4);
    assert_non_null(dp);
    tu_fill(dp, np, seed, 22, -0.05f, 0.05f);
    for (size_t i = 0; i < np; i++) pc[i] += dp[i];
    memcpy(pg, pc, np * sizeof(float));
    free(dp);
    decode_both(cpu, gpu, tok, S, V, "new parameters");
    moe_model_destroy(cpu);
    moe_model_destroy(gpu);
}

/* bf16 experts (and a bf16 shared expert) keep their bf16 copies on the GPU from one decoding
 * call to the next: decoding again gives bitwise the same logits; after the parameters are
 * written, bitwise those of a fresh model given the new parameters (stale copies would not). */
static void test_decode_bf16(void **state) {
    (void)state;
    uint64_t seed = tu_seed();
    moe_model_config c = small_config();
    c.moe.expert_bf16 = 1;
    c.moe.shared_ffn = 32;
    int S = c.seq_len, V = c.vocab;
    size_t n = (size_t)S * V;
    moe_model *a = make(&c, 1, seed, 12), *b = make(&c, 1, seed, 12);
    int32_t tok[48];
    for (int t = 0; t < S; t++) tok[t] = (int32_t)(moe_rng_u64(seed, 23, (uint64_t)t) % 257);
    float *first = malloc(n * 4), *again = malloc(n * 4), *fresh = malloc(n * 4);
    assert_true(first && again && fresh);
    decode_all(a, tok, S, V, first);
    decode_all(a, tok, S, V, again);
    assert_memory_equal(again, first, n * 4);
    size_t np = moe_model_param_count(a);
    float *pa = moe_model_params(a);
    for (size_t i = 0; i < np; i++) pa[i] *= 1.5f;
    decode_all(a, tok, S, V, again);
    memcpy(moe_model_params(b), pa, np * 4);
    decode_all(b, tok, S, V, fresh);
    assert_memory_equal(again, fresh, n * 4);
    double e = tu_rel_err(again, first, n, NULL);
    if (!(e > 1e-2)) fail_msg("new parameters changed the logits by only %.3g", e);
    free(first), free(again), free(fresh);
    moe_model_destroy(a);
    moe_model_destroy(b);
}

static void test_refused(void **state) {
    (void)state;
    moe_model_config c = small_config();
    c.kv_lora_rank = 8, c.qk_rope_dim = 4, c.qk_nope_dim = 8, c.v_head_dim = 8;
    moe_model *m;
    assert_int_equal(moe_model_create(&c, 48, &m), MOE_OK);
    assert_int_equal(moe_model_use_device(m, "cuda"), MOE_ERR_INVALID);
    assert_non_null(strstr(moe_last_error(), "latent"));
    assert_int_equal(moe_model_use_device(m, "tpu"), MOE_ERR_INVALID);
    moe_model_destroy(m);
    c = small_config();
    c.moe.capacity_factor = 1.0f;
    assert_int_equal(moe_model_create(&c, 48, &m), MOE_OK);
    assert_int_equal(moe_model_use_device(m, "cuda"), MOE_ERR_INVALID);
    assert_non_null(strstr(moe_last_error(), "capacity"));
    moe_model_destroy(m);
}

int main(void) {
    if (moe_cuda_device_count() < 1) {
        printf("test_cuda_model: skipped: %s\n", moe_cuda_device_name());
        return 77;
    }
    printf("GPU: %s\n", moe_cuda_device_name());
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_against_cpu),
                                       cmocka_unit_test(test_training),
                                       cmocka_unit_test(test_trainer_lifecycle),
                                       cmocka_unit_test(test_decode),
                                       cmocka_unit_test(test_decode_bf16),
                                       cmocka_unit_test(test_refused)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
