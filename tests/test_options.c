/* The option registry: flags, config files, aliases, errors with suggestions, round trip. */
#define _POSIX_C_SOURCE 200809L
#include "io/options.h"
#include "test_util.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

/* Writes text to a fresh temporary file; returns its path (static buffer per slot: a test
 * holds at most TEMP_SLOTS paths at once, or a later file takes an earlier one's buffer and the
 * earlier file is never unlinked). */
enum { TEMP_SLOTS = 8 };
static const char *write_temp(const char *text) {
    static char path[TEMP_SLOTS][64];
    static int slot;
    char *p = path[slot++ % TEMP_SLOTS];
    snprintf(p, 64, "/tmp/moe_test_options_XXXXXX");
    int fd = mkstemp(p);
    assert_true(fd >= 0);
    FILE *f = fdopen(fd, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
    return p;
}

static moe_status parse(moe_options *o, const char *const *args, int n) {
    moe_options_default(o);
    return moe_options_parse_args(o, n, (char **)args, NULL);
}

static void expect_error(moe_status got, const char *needle) {
    assert_int_not_equal(got, MOE_OK);
    if (!strstr(moe_last_error(), needle))
        fail_msg("error message \"%s\" does not contain \"%s\"", moe_last_error(), needle);
}

static void test_defaults_match_layer(void **state) {
    (void)state;
    moe_options o;
    moe_options_default(&o);
    moe_layer_config c = moe_layer_config_default();
    assert_memory_equal(&o.layer, &c, sizeof c);
    assert_int_equal(moe_options_finish(&o, MOE_OPTIONS_MODEL | MOE_OPTIONS_TRAIN), MOE_OK);
    assert_int_equal(o.layer.lb_type, c.lb_type);
}

static void test_flag_forms(void **state) {
    (void)state;
    moe_options o;
    const char *args[] = {"--num-experts",  "16", "--moe-router-topk=4", "--moe_router_pre_softmax",
                          "--moe-router-score-function", "sigmoid", "--moe-z-loss-coeff=1e-3",
                          "--moe-shared-expert-gate=false", "--seed", "18446744073709551615",
                          "--moe-router-norm-topk-prob", "off", "--moe-router-dtype", "FP64"};
    assert_int_equal(parse(&o, args, 14), MOE_OK);
    assert_int_equal(o.layer.n_experts, 16);
    assert_int_equal(o.layer.topk, 4);
    assert_int_equal(o.layer.pre_softmax, 1);
    assert_int_equal(o.layer.score, MOE_SCORE_SIGMOID);
    assert_float_equal(o.layer.z_coeff, 1e-3f, 0);
    assert_int_equal(o.layer.shared_gate, 0);
    assert_true(o.layer.seed == UINT64_MAX);
    assert_int_equal(o.layer.norm_topk, MOE_NORM_OFF);
    assert_int_equal(o.layer.router_fp64, 1);
}

static void test_config_file_aliases_and_override(void **state) {
    (void)state;
    /* InternEvo's names (num_experts, moe_gate_k, moe_loss_coeff), comments, quotes. */
    const char *path = write_temp("# an InternEvo-style config\n"
                                  "num_experts = 16\n"
                                  "  moe_gate_k=4   # trailing comment\n"
                                  "moe_loss_coeff = 0.01\n"
                                  "\n"
                                  "moe_token_drop_policy = \"position\"\n"
                                  "moe_expert_capacity_factor = 1.25\n");
    moe_options o;
    /* The file is applied first wherever --config appears; flags override it. */
    const char *args[] = {"--moe-router-topk", "2", "--config", path};
    assert_int_equal(parse(&o, args, 4), MOE_OK);
    assert_int_equal(o.layer.n_experts, 16);
    assert_int_equal(o.layer.topk, 2);
    assert_int_equal(o.aux_list.n, 1);
    assert_float_equal(o.aux_list.v[0], 0.01f, 0);
    assert_int_equal(o.layer.drop_policy, MOE_DROP_POSITION);
    assert_float_equal(o.layer.capacity_factor, 1.25f, 0);
    unlink(path);
}

static void test_unknown_names_suggest(void **state) {
    (void)state;
    moe_options o;
    const char *a1[] = {"--num-expert", "4"};
    expect_error(parse(&o, a1, 2), "did you mean --num-experts?");
    const char *a2[] = {"--moe-aux-los-coeff", "0.1"};
    expect_error(parse(&o, a2, 2), "did you mean --moe-aux-loss-coeff?");
    const char *a3[] = {"--completely-unrelated-thing", "1"};
    expect_error(parse(&o, a3, 2), "unknown option --completely-unrelated-thing");
    const char *path = write_temp("num_experts = 8\nmoe_gate_kk = 2\n");
    moe_options_default(&o);
    moe_status st = moe_options_load_file(&o, path);
    expect_error(st, ":2: unknown option moe_gate_kk (did you mean moe-router-topk?)");
    unlink(path);
}

static void test_bad_values(void **state) {
    (void)state;
    moe_options o;
    const struct {
        const char *flag, *value, *needle;
    } cases[] = {
        {"--num-attention-heads", "abc", "expected an integer, got 'abc'"},
        {"--num-attention-heads", "8x", "expected an integer"},
        {"--num-attention-heads", "0", "out of range"},
        {"--num-attention-heads", "99999999999999999999", "expected an integer"},
        {"--num-experts", "4,x", "expected an integer or a list of them"},
        {"--num-experts", "4,,8", "expected an integer or a list of them"},
        {"--num-experts", "0", "must be >= 1"},
        {"--num-experts", "4,-1", "out of range"},
        {"--lr-decay-style", "exponential", "not one of cosine|linear|constant"},
        {"--moe-aux-loss-coeff", "nan", "expected a finite number"},
        {"--moe-aux-loss-coeff", "inf", "expected a finite number"},
        {"--moe-aux-loss-coeff", "1e60", "expected a finite number"},
        {"--moe-aux-loss-coeff", "-0.5", "out of range"},
        {"--moe-input-jitter-eps", "1", "out of range"},
        /* nonzero values that a float holds as 0, or without full precision */
        {"--lr", "1e-50", "1e-50 is too close to 0 for a float: give 0 or a value of magnitude "
                          "at least 1.17549e-38 (range [0, 1e+09])"},
        {"--lr", "1e-400", "too close to 0"},
        {"--moe-z-loss-coeff", "1e-39", "too close to 0"},
        {"--moe-router-score-function", "tanh", "not one of softmax|sigmoid|sqrtsoftplus"},
        {"--moe-router-pre-softmax", "maybe", "expected true or false"},
        {"--seed", "-3", "non-negative integer"},
        {"--seed", " -1", "non-negative integer"}, /* not 2^64 - 1 */
        {"--save", "/tmp/a'b\"#c", "both quote characters"},
        {"--data-path", "/tmp/a\nb", "a line break"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char arg[128];
        snprintf(arg, sizeof arg, "%s=%s", cases[i].flag, cases[i].value);
        const char *args[] = {arg};
        expect_error(parse(&o, args, 1), cases[i].needle);
        expect_error(parse(&o, args, 1), cases[i].flag); /* the message names the flag */
    }
    /* booleans in any case, as the enums; a prompt is not written back, so any text */
    const char *truthy[] = {"--moe-router-pre-softmax=True", "--prompt", "it's \"#1\"\n"};
    assert_int_equal(parse(&o, truthy, 3), MOE_OK);
    assert_int_equal(o.layer.pre_softmax, 1);
    /* a prompt longer than the option holds: the message points to --prompt-file */
    static char long_prompt[1100];
    memset(long_prompt, 'a', sizeof long_prompt - 1);
    const char *too_long[] = {"--prompt", long_prompt};
    expect_error(parse(&o, too_long, 2), "--prompt: longer than 1023 characters (a longer "
                                         "prompt goes in a file: --prompt-file FILE)");
    const char *missing[] = {"--num-experts"};
    expect_error(parse(&o, missing, 1), "--num-experts needs a value");
    const char *positional[] = {"stray"};
    expect_error(parse(&o, positional, 1), "unexpected argument 'stray'");
}

static void test_malformed_files(void **state) {
    (void)state;
    moe_options o;
    moe_options_default(&o);
    const char *p1 = write_temp("num_experts = 8\nthis line has no equals sign\n");
    expect_error(moe_options_load_file(&o, p1), ":2: expected 'key = value'");
    const char *p2 = write_temp("num_experts =\n");
    expect_error(moe_options_load_file(&o, p2), ":1: empty value");
    const char *p3 = write_temp("= 8\n");
    expect_error(moe_options_load_file(&o, p3), ":1: empty key");
    assert_int_equal(moe_options_load_file(&o, "/nonexistent/dir/moe.cfg"), MOE_ERR_IO);
    expect_error(MOE_ERR_IO, "/nonexistent/dir/moe.cfg");
    /* a key twice, by its name or an alias: which value was meant is unknown */
    const char *p4 = write_temp("num-layers = 2\nlr = 1e-3\n\nnum_layers = 3\n");
    expect_error(moe_options_load_file(&o, p4), ":4: num-layers is set again (first at line 1)");
    const char *p5 = write_temp("moe-router-topk = 2\nmoe_gate_k = 2\n");
    expect_error(moe_options_load_file(&o, p5), ":2: moe-router-topk is set again (first at line 1)");
    expect_error(moe_options_load_file(&o, "/tmp"), "error reading config file /tmp: Is a directory");
    unlink(p1);
    unlink(p2);
    unlink(p3);
    unlink(p4);
    unlink(p5);
}

/* NeMo Automodel's MoEConfig names (a config file as its fields), and its n_shared_experts:
 * the shared expert as wide as that many routed experts (a given width must agree). */
static void test_automodel_names(void **state) {
    (void)state;
    const char *path = write_temp("dim = 48\ninter_dim = 96\nmoe_inter_dim = 24\n"
                                  "n_activated_experts = 3\nscore_func = sigmoid\n"
                                  "softmax_before_topk = true\ngate_bias_update_factor = 0.002\n"
                                  "aux_loss_coeff = 0.03\nexpert_activation = relu2\n"
                                  "shared_expert_gate = true\nfake_gate_noise = 0.25\n"
                                  "init_std = 0.01\nn_shared_experts = 2\n");
    moe_options o;
    const char *args[] = {"--config", path};
    assert_int_equal(parse(&o, args, 2), MOE_OK);
    assert_int_equal(moe_options_finish(&o, MOE_OPTIONS_MODEL), MOE_OK);
    assert_int_equal(o.model.d, 48);
    assert_int_equal(o.model.ffn, 96);
    assert_int_equal(o.layer.ffn, 24);
    assert_int_equal(o.layer.topk, 3);
    assert_int_equal(o.layer.score, MOE_SCORE_SIGMOID);
    assert_true(o.layer.pre_softmax && o.layer.shared_gate);
    assert_float_equal(o.layer.bias_update_rate, 0.002f, 0);
    assert_float_equal(o.layer.aux_coeff, 0.03f, 0);
    assert_int_equal(o.layer.act, MOE_ACT_RELU2);
    assert_float_equal(o.layer.fake_noise, 0.25f, 0);
    assert_float_equal(o.model.init_std, 0.01f, 0);
    assert_int_equal(o.layer.shared_ffn, 48);
    const char *clash[] = {"--config", path, "--moe-shared-expert-intermediate-size", "40"};
    assert_int_equal(parse(&o, clash, 4), MOE_OK);
    expect_error(moe_options_finish(&o, MOE_OPTIONS_MODEL),
                 "n-shared-experts 2 (a shared expert of 48) conflicts with "
                 "moe-shared-expert-intermediate-size 40");
    unlink(path);
}

static void test_finish_combinations(void **state) {
    (void)state;
    moe_options o;
    const char *sink[] = {"--moe-router-load-balancing-type", "sinkhorn"};
    assert_int_equal(parse(&o, sink, 2), MOE_OK);
    assert_int_equal(moe_options_finish(&o, MOE_OPTIONS_MODEL | MOE_OPTIONS_TRAIN), MOE_OK);
    assert_int_equal(o.layer.router, MOE_ROUTER_SINKHORN);
    assert_int_equal(o.layer.lb_type, MOE_LB_NONE);

    const char *clash[] = {"--moe-router-load-balancing-type", "sinkhorn", "--moe-router-type",
                           "expert_choice"};
    assert_int_equal(parse(&o, clash, 4), MOE_OK);
    expect_error(moe_options_finish(&o, MOE_OPTIONS_MODEL | MOE_OPTIONS_TRAIN), "moe-router-type is expert_choice");

    /* DeepSpeed's noisy_gate_policy: Jitter is the jitter of 0.01, RSample the sampled top-1 */
    const char *jit[] = {"--noisy_gate_policy", "Jitter"};
    assert_int_equal(parse(&o, jit, 2), MOE_OK);
    assert_int_equal(moe_options_finish(&o, MOE_OPTIONS_MODEL | MOE_OPTIONS_TRAIN), MOE_OK);
    assert_true(o.layer.jitter_eps == 0.01f && !o.layer.sample_first);
    /* a run of that policy resumed with another: the jitter was the policy's, not its own */
    char *text = moe_options_to_text(&o);
    assert_non_null(text);
    moe_options o2;
    moe_options_default(&o2);
    assert_int_equal(moe_options_load_text(&o2, text, "ckpt"), MOE_OK);
    free(text);
    moe_options o3 = o2; /* the same policy kept: its jitter again */
    assert_int_equal(moe_options_finish(&o3, MOE_OPTIONS_MODEL | MOE_OPTIONS_TRAIN), MOE_OK);
    assert_true(o3.layer.jitter_eps == 0.01f);
    assert_int_equal(moe_options_set(&o2, "noisy-gate-policy", "none", "--noisy-gate-policy"), MOE_OK);
    assert_int_equal(moe_options_finish(&o2, MOE_OPTIONS_MODEL | MOE_OPTIONS_TRAIN), MOE_OK);
    assert_true(o2.layer.jitter_eps == 0);
    const char *jit0[] = {"--noisy-gate-policy", "Jitter", "--moe-input-jitter-eps", "0"};
    assert_int_equal(parse(&o, jit0, 4), MOE_OK); /* an explicit 0 against the policy */
    expect_error(moe_options_finish(&o, MOE_OPTIONS_MODEL | MOE_OPTIONS_TRAIN),
                 "Jitter is moe-input-jitter-eps 0.01, but it is 0");
    const char *li[] = {"--moe-router-load-balancing-type", "load_importance", "--moe-gate-noise",
                        "1", "--router-aux-loss-coef", "0.01"};
    assert_int_equal(parse(&o, li, 6), MOE_OK);
    expect_error(moe_options_finish(&o, MOE_OPTIONS_MODEL | MOE_OPTIONS_TRAIN),
                 "load_importance takes moe-aux-loss-coeff");
    const char *jit2[] = {"--noisy-gate-policy", "jitter", "--moe-input-jitter-eps", "0.2"};
    assert_int_equal(parse(&o, jit2, 4), MOE_OK);
    expect_error(moe_options_finish(&o, MOE_OPTIONS_MODEL | MOE_OPTIONS_TRAIN),
                 "Jitter is moe-input-jitter-eps 0.01, but it is 0.2");
    const char *rs[] = {"--noisy-gate-policy", "RSample", "--moe-router-topk", "1",
                        "--moe-router-pre-softmax"};
    assert_int_equal(parse(&o, rs, 5), MOE_OK);
    assert_int_equal(moe_options_finish(&o, MOE_OPTIONS_MODEL | MOE_OPTIONS_TRAIN), MOE_OK);
    assert_true(o.layer.sample_first && o.layer.jitter_eps == 0);
    assert_int_equal(parse(&o, rs, 2), MOE_OK); /* top-2 (the default): refused */
    expect_error(moe_options_finish(&o, MOE_OPTIONS_MODEL | MOE_OPTIONS_TRAIN),
                 "RSample is DeepSpeed's top-1 gate");

    const char *fake[] = {"--moe-router-force-load-balancing"};
    assert_int_equal(parse(&o, fake, 1), MOE_OK);
    assert_int_equal(moe_options_finish(&o, MOE_OPTIONS_MODEL | MOE_OPTIONS_TRAIN), MOE_OK);
    assert_int_equal(o.layer.router, MOE_ROUTER_FAKE_BALANCED);

    const char *seq[] = {"--moe-router-load-balancing-type", "seq_aux_loss"};
    assert_int_equal(parse(&o, seq, 2), MOE_OK);
    assert_int_equal(moe_options_finish(&o, MOE_OPTIONS_MODEL | MOE_OPTIONS_TRAIN), MOE_OK);
    assert_int_equal(o.layer.lb_type, MOE_LB_SEQ_AUX);

    /* DeepSpeed's --mlp-type residual: Residual-MoE with an expert-wide residual MLP */
    const char *mlp[] = {"--mlp-type", "residual", "--moe-ffn-hidden-size", "24",
                         "--moe-shared-expert-intermediate-size", "40"};
    assert_int_equal(parse(&o, mlp, 4), MOE_OK);
    assert_int_equal(moe_options_finish(&o, MOE_OPTIONS_MODEL | MOE_OPTIONS_TRAIN), MOE_OK);
    assert_true(o.layer.residual && o.layer.shared_ffn == 24);
    assert_int_equal(parse(&o, mlp, 6), MOE_OK); /* a width given stays */
    assert_int_equal(moe_options_finish(&o, MOE_OPTIONS_MODEL | MOE_OPTIONS_TRAIN), MOE_OK);
    assert_true(o.layer.residual && o.layer.shared_ffn == 40);
    const char *mlp_no[] = {"--mlp-type", "residual", "--moe-use-residual=false"};
    assert_int_equal(parse(&o, mlp_no, 3), MOE_OK);
    expect_error(moe_options_finish(&o, MOE_OPTIONS_MODEL),
                 "mlp-type residual conflicts with moe-use-residual false");

    const char *k_gt_e[] = {"--num-experts", "4", "--moe-router-topk", "6"};
    assert_int_equal(parse(&o, k_gt_e, 4), MOE_OK);
    moe_status st = moe_options_finish(&o, MOE_OPTIONS_MODEL | MOE_OPTIONS_TRAIN);
    expect_error(st, "moe-router-topk (6)");
    expect_error(st, "num-experts (4)");

    const char *groups[] = {"--num-experts", "8", "--moe-router-num-groups", "3"};
    assert_int_equal(parse(&o, groups, 4), MOE_OK);
    expect_error(moe_options_finish(&o, MOE_OPTIONS_MODEL | MOE_OPTIONS_TRAIN), "moe-router-num-groups (3) must divide num-experts (8)");

    const char *list_len[] = {"--num-layers", "3", "--num-experts", "4,8"};
    assert_int_equal(parse(&o, list_len, 4), MOE_OK);
    expect_error(moe_options_finish(&o, MOE_OPTIONS_MODEL), "num-experts lists 2 values: give one per layer (num-layers 3) or one per MoE layer (3)");

    const char *heads[] = {"--hidden-size", "96", "--num-attention-heads", "5"};
    assert_int_equal(parse(&o, heads, 4), MOE_OK);
    expect_error(moe_options_finish(&o, MOE_OPTIONS_MODEL), "num-attention-heads (5) must divide hidden-size (96)");
    assert_int_equal(moe_options_finish(&o, 0), MOE_OK); /* the layer alone does not care */

    const char *gqa[] = {"--num-attention-heads", "4", "--num-query-groups", "3"};
    assert_int_equal(parse(&o, gqa, 4), MOE_OK);
    expect_error(moe_options_finish(&o, MOE_OPTIONS_MODEL), "num-query-groups (3) must divide num-attention-heads (4)");
    /* not given: every head its own keys and values (Megatron without --group-query-attention) */
    const char *mha[] = {"--num-attention-heads", "6", "--hidden-size", "96"};
    assert_int_equal(parse(&o, mha, 4), MOE_OK);
    assert_int_equal(moe_options_finish(&o, MOE_OPTIONS_MODEL), MOE_OK);
    assert_int_equal(o.model.n_kv_heads, 6);
    const char *gqa1[] = {"--num-attention-heads", "6", "--hidden-size", "96",
                          "--group-query-attention"};
    assert_int_equal(parse(&o, gqa1, 5), MOE_OK);
    assert_int_equal(moe_options_finish(&o, MOE_OPTIONS_MODEL), MOE_OK);
    assert_int_equal(o.model.n_kv_heads, 1); /* Megatron's default of num-query-groups */
    gqa1[4] = "--num-query-groups=3";
    assert_int_equal(parse(&o, gqa1, 5), MOE_OK);
    assert_int_equal(moe_options_finish(&o, MOE_OPTIONS_MODEL), MOE_OK);
    assert_int_equal(o.model.n_kv_heads, 3);

    const char *gbs[] = {"--micro-batch-size", "4", "--global-batch-size", "10"};
    assert_int_equal(parse(&o, gbs, 4), MOE_OK);
    expect_error(moe_options_finish(&o, MOE_OPTIONS_TRAIN), "global-batch-size (10) must be a multiple of micro-batch-size (4)");

    /* warmup must end before the decay does (constant: no decay) */
    const char *warm[] = {"--lr-warmup-iters", "4", "--lr-decay-iters", "4", "--lr-decay-style",
                          "cosine"};
    assert_int_equal(parse(&o, warm, 6), MOE_OK);
    expect_error(moe_options_finish(&o, MOE_OPTIONS_TRAIN), "lr-warmup-iters (4) must be below lr-decay-iters (4)");
    warm[3] = "5";
    assert_int_equal(parse(&o, warm, 6), MOE_OK);
    assert_int_equal(moe_options_finish(&o, MOE_OPTIONS_TRAIN), MOE_OK);
    warm[3] = "3", warm[5] = "constant";
    assert_int_equal(parse(&o, warm, 6), MOE_OK);
    assert_int_equal(moe_options_finish(&o, MOE_OPTIONS_TRAIN), MOE_OK);

    /* Hugging Face's coefficient: its loss is k times Megatron's, and one loss over all MoE
     * layers where ours adds the layers' losses, so the coefficient is k / (MoE layers) times
     * ours for the same pull: 6 layers, the first dense, every second one MoE (2 and 4) */
    const char *hf_aux[] = {"--moe-router-topk", "3", "--router-aux-loss-coef", "0.01",
                            "--num-layers", "6", "--first-k-dense", "1", "--moe-layer-freq", "2"};
    assert_int_equal(parse(&o, hf_aux, 10), MOE_OK);
    assert_int_equal(moe_options_finish(&o, MOE_OPTIONS_MODEL | MOE_OPTIONS_TRAIN), MOE_OK);
    assert_float_equal(o.layer.aux_coeff, 0.015f, 1e-7);
    assert_float_equal(o.model.moe.aux_coeff, 0.015f, 1e-7);
    hf_aux[7] = "0", hf_aux[9] = "1"; /* all 6 */
    assert_int_equal(parse(&o, hf_aux, 10), MOE_OK);
    assert_int_equal(moe_options_finish(&o, MOE_OPTIONS_MODEL | MOE_OPTIONS_TRAIN), MOE_OK);
    assert_float_equal(o.layer.aux_coeff, 0.005f, 1e-7);
    /* a layer alone (moe bench layer): k times */
    assert_int_equal(parse(&o, hf_aux, 4), MOE_OK);
    assert_int_equal(moe_options_finish(&o, 0), MOE_OK);
    assert_float_equal(o.layer.aux_coeff, 0.03f, 1e-7);
    /* the two set one value: the later wins, on one command line or over a config file */
    const char *two_aux[] = {"--moe-router-topk", "3", "--router-aux-loss-coef", "0.01",
                             "--moe-aux-loss-coeff", "0.02"};
    assert_int_equal(parse(&o, two_aux, 6), MOE_OK);
    assert_int_equal(moe_options_finish(&o, MOE_OPTIONS_MODEL | MOE_OPTIONS_TRAIN), MOE_OK);
    assert_float_equal(o.layer.aux_coeff, 0.02f, 1e-7);
    const char *aux_file = write_temp("moe-aux-loss-coeff = 0.5\nmoe-router-topk = 3\n");
    const char *over_file[] = {"--config", aux_file, "--router-aux-loss-coef", "0.01"};
    assert_int_equal(parse(&o, over_file, 4), MOE_OK);
    assert_int_equal(moe_options_finish(&o, MOE_OPTIONS_MODEL | MOE_OPTIONS_TRAIN), MOE_OK);
    assert_float_equal(o.layer.aux_coeff, 0.0075f, 1e-7); /* k = 3 over the default 4 layers */
    unlink(aux_file);

    /* Megatron: moe-ffn-hidden-size not given is ffn-hidden-size */
    const char *ffn[] = {"--ffn-hidden-size", "224"};
    assert_int_equal(parse(&o, ffn, 2), MOE_OK);
    assert_int_equal(moe_options_finish(&o, MOE_OPTIONS_MODEL | MOE_OPTIONS_TRAIN), MOE_OK);
    assert_int_equal(o.model.moe.ffn, 224);
    const char *ffn2[] = {"--ffn-hidden-size", "224", "--moe-ffn-hidden-size", "96"};
    assert_int_equal(parse(&o, ffn2, 4), MOE_OK);
    assert_int_equal(moe_options_finish(&o, MOE_OPTIONS_MODEL | MOE_OPTIONS_TRAIN), MOE_OK);
    assert_int_equal(o.model.moe.ffn, 96);

    const char *aux_sink[] = {"--moe-router-type", "sinkhorn", "--moe-aux-loss-coeff", "0.01"};
    assert_int_equal(parse(&o, aux_sink, 4), MOE_OK);
    expect_error(moe_options_finish(&o, MOE_OPTIONS_MODEL | MOE_OPTIONS_TRAIN), "needs the topk router");

    /* Hugging Face's z-loss coefficient: one loss over all MoE layers' logits (4 by default) */
    const char *hf_z[] = {"--router-z-loss-coef", "0.01"};
    assert_int_equal(parse(&o, hf_z, 2), MOE_OK);
    assert_int_equal(moe_options_finish(&o, MOE_OPTIONS_MODEL | MOE_OPTIONS_TRAIN), MOE_OK);
    assert_float_equal(o.layer.z_coeff, 0.0025f, 1e-9);
    /* Megatron's max-position-embeddings beside seq-length (its Mixtral script gives both):
     * seq-length is the training length in either order; alone it is the sequence length */
    const char *pos[] = {"--max-position-embeddings", "32768", "--seq-length", "64"};
    assert_int_equal(parse(&o, pos, 4), MOE_OK);
    assert_int_equal(moe_options_finish(&o, MOE_OPTIONS_MODEL | MOE_OPTIONS_TRAIN), MOE_OK);
    assert_int_equal(o.model.seq_len, 64);
    const char *pos2[] = {"--seq-length", "64", "--max-position-embeddings", "32768"};
    assert_int_equal(parse(&o, pos2, 4), MOE_OK);
    assert_int_equal(moe_options_finish(&o, MOE_OPTIONS_MODEL | MOE_OPTIONS_TRAIN), MOE_OK);
    assert_int_equal(o.model.seq_len, 64);
    assert_int_equal(parse(&o, pos, 2), MOE_OK);
    assert_int_equal(moe_options_finish(&o, MOE_OPTIONS_MODEL | MOE_OPTIONS_TRAIN), MOE_OK);
    assert_int_equal(o.model.seq_len, 32768);
    pos2[3] = "32";
    assert_int_equal(parse(&o, pos2, 4), MOE_OK);
    expect_error(moe_options_finish(&o, MOE_OPTIONS_MODEL | MOE_OPTIONS_TRAIN), "max-position-embeddings (32) is below seq-length (64)");
    /* Hugging Face's norm_topk_prob false means a softmax over all experts: with the softmax
     * after the top-k it would change nothing, so it asks for pre-softmax */
    const char *nt[] = {"--norm-topk-prob", "false", "--moe-router-pre-softmax"};
    assert_int_equal(parse(&o, nt, 2), MOE_OK);
    expect_error(moe_options_finish(&o, MOE_OPTIONS_MODEL | MOE_OPTIONS_TRAIN), "set moe-router-pre-softmax too");
    assert_int_equal(parse(&o, nt, 3), MOE_OK);
    assert_int_equal(moe_options_finish(&o, MOE_OPTIONS_MODEL | MOE_OPTIONS_TRAIN), MOE_OK);

    /* the two-stage all-to-all's options where no all-to-all runs: refused, not ignored */
    const char *two_stage[] = {"--moe-token-dispatcher-type", "allgather", "--moe-hierarchical-alltoall"};
    assert_int_equal(parse(&o, two_stage, 3), MOE_OK);
    expect_error(moe_options_finish(&o, MOE_OPTIONS_MODEL | MOE_OPTIONS_TRAIN), "allgather sends no tokens");
    const char *per_node[] = {"--ranks-per-node", "2", "--moe-hierarchical-alltoall"};
    assert_int_equal(parse(&o, per_node, 3), MOE_OK);
    assert_int_equal(moe_options_finish(&o, MOE_OPTIONS_MODEL | MOE_OPTIONS_TRAIN), MOE_OK);
    assert_int_equal(parse(&o, per_node, 2), MOE_OK);
    expect_error(moe_options_finish(&o, MOE_OPTIONS_MODEL | MOE_OPTIONS_TRAIN), "which is off");

    /* top-1 whose weight is always 1: computed (generate, eval), not trained */
    const char *top1[] = {"--moe-router-topk", "1"};
    assert_int_equal(parse(&o, top1, 2), MOE_OK);
    expect_error(moe_options_finish(&o, MOE_OPTIONS_MODEL | MOE_OPTIONS_TRAIN), "set moe-router-pre-softmax");
    assert_int_equal(parse(&o, top1, 2), MOE_OK);
    assert_int_equal(moe_options_finish(&o, MOE_OPTIONS_MODEL), MOE_OK);
    const char *top1_norm[] = {"--moe-router-topk", "1", "--moe-router-pre-softmax",
                               "--moe-router-norm-topk-prob", "true"};
    assert_int_equal(parse(&o, top1_norm, 5), MOE_OK);
    expect_error(moe_options_finish(&o, MOE_OPTIONS_MODEL | MOE_OPTIONS_TRAIN), "set moe-router-norm-topk-prob false");
    const char *top1_pre[] = {"--moe-router-topk", "1", "--moe-router-pre-softmax"};
    assert_int_equal(parse(&o, top1_pre, 3), MOE_OK);
    assert_int_equal(moe_options_finish(&o, MOE_OPTIONS_MODEL | MOE_OPTIONS_TRAIN), MOE_OK);
    const char *top1_sigmoid[] = {"--moe-router-topk", "1", "--moe-router-score-function", "sigmoid"};
    assert_int_equal(parse(&o, top1_sigmoid, 4), MOE_OK);
    assert_int_equal(moe_options_finish(&o, MOE_OPTIONS_MODEL | MOE_OPTIONS_TRAIN), MOE_OK);
    const char *top1_dense[] = {"--moe-router-topk", "1", "--num-layers", "2", "--num-experts",
                                "0,0"}; /* no MoE layer */
    assert_int_equal(parse(&o, top1_dense, 6), MOE_OK);
    assert_int_equal(moe_options_finish(&o, MOE_OPTIONS_MODEL | MOE_OPTIONS_TRAIN), MOE_OK);
}

/* Every option written and read back gives the same values, for non-default settings. */
/* Megatron's list of load-balancing types, each with its coefficient: separate words on the
 * command line, commas in a file; the first type is lb_type, the others aux_coeff_also. */
static void test_balancing_lists(void **state) {
    (void)state;
    moe_options o;
    const char *words[] = {"--moe-router-load-balancing-type", "seq_aux_loss", "global_aux_loss",
                           "--moe-aux-loss-coeff", "1e-3", "1e-4", "--moe-router-topk", "3"};
    assert_int_equal(parse(&o, words, 8), MOE_OK);
    assert_int_equal(moe_options_finish(&o, MOE_OPTIONS_MODEL | MOE_OPTIONS_TRAIN), MOE_OK);
    assert_int_equal(o.layer.topk, 3);
    assert_int_equal(o.layer.lb_type, MOE_LB_SEQ_AUX);
    assert_float_equal(o.layer.aux_coeff, 1e-3f, 0);
    assert_float_equal(o.layer.aux_coeff_also[MOE_LB_GLOBAL_AUX], 1e-4f, 0);
    assert_float_equal(o.layer.aux_coeff_also[MOE_LB_AUX], 0, 0);
    assert_float_equal(o.model.moe.aux_coeff_also[MOE_LB_GLOBAL_AUX], 1e-4f, 0);

    const char *file = write_temp("moe_router_load_balancing_type = aux_loss, global_aux_loss,"
                                  "seq_aux_loss\nmoe_loss_coeff = 0.1,0 0.3\n");
    const char *cfg[] = {"--config", file};
    assert_int_equal(parse(&o, cfg, 2), MOE_OK);
    assert_int_equal(moe_options_finish(&o, MOE_OPTIONS_MODEL | MOE_OPTIONS_TRAIN), MOE_OK);
    assert_int_equal(o.layer.lb_type, MOE_LB_AUX);
    assert_float_equal(o.layer.aux_coeff, 0.1f, 0);
    assert_float_equal(o.layer.aux_coeff_also[MOE_LB_GLOBAL_AUX], 0, 0);
    assert_float_equal(o.layer.aux_coeff_also[MOE_LB_SEQ_AUX], 0.3f, 0);
    unlink(file);

    /* one coefficient per type; only the three aux losses, each once */
    const char *one[] = {"--moe-router-load-balancing-type", "aux_loss", "seq_aux_loss",
                         "--moe-aux-loss-coeff", "0.01"};
    assert_int_equal(parse(&o, one, 5), MOE_OK);
    expect_error(moe_options_finish(&o, MOE_OPTIONS_MODEL), "gives 2 types and moe-aux-loss-coeff 1 "
                 "coefficient: give one per type");
    const char *two[] = {"--moe-aux-loss-coeff", "0.01", "0.02"};
    assert_int_equal(parse(&o, two, 3), MOE_OK);
    expect_error(moe_options_finish(&o, MOE_OPTIONS_MODEL), "gives 1 type and moe-aux-loss-coeff 2");
    const char *qb[] = {"--moe-router-load-balancing-type", "seq_aux_loss", "quantile_balancing",
                        "--moe-aux-loss-coeff", "0.01", "0"};
    assert_int_equal(parse(&o, qb, 6), MOE_OK);
    expect_error(moe_options_finish(&o, MOE_OPTIONS_MODEL), "a list takes aux_loss, seq_aux_loss "
                 "and global_aux_loss, not quantile_balancing");
    const char *twice[] = {"--moe-router-load-balancing-type", "aux_loss,global_aux_loss,aux_loss",
                           "--moe-aux-loss-coeff", "0.01,0.01,0.01"};
    assert_int_equal(parse(&o, twice, 4), MOE_OK);
    expect_error(moe_options_finish(&o, MOE_OPTIONS_MODEL), "lists aux_loss twice");
    const char *hf[] = {"--moe-router-load-balancing-type", "aux_loss", "seq_aux_loss",
                        "--router-aux-loss-coef", "0.01"};
    assert_int_equal(parse(&o, hf, 5), MOE_OK);
    expect_error(moe_options_finish(&o, MOE_OPTIONS_MODEL), "router-aux-loss-coef is one "
                 "coefficient");
    /* the layer's validation: the losses are the topk router's */
    const char *fake[] = {"--moe-router-load-balancing-type", "aux_loss", "seq_aux_loss",
                          "--moe-aux-loss-coeff", "0.01", "0.01", "--moe-router-type",
                          "fake_balanced"};
    assert_int_equal(parse(&o, fake, 8), MOE_OK);
    expect_error(moe_options_finish(&o, MOE_OPTIONS_MODEL), "under the topk router");
    /* bad words and lengths, one message each */
    const char *typo[] = {"--moe-router-load-balancing-type", "aux_loss", "seq_aux"};
    expect_error(parse(&o, typo, 3), "'seq_aux' is not one of aux_loss|");
    const char *nan_word[] = {"--moe-aux-loss-coeff", "0.1", "x"};
    expect_error(parse(&o, nan_word, 3), "expected a finite number, got 'x'");
    const char *many[] = {"--moe-aux-loss-coeff", "1", "2", "3", "4", "5"};
    expect_error(parse(&o, many, 6), "at most 4 values");
    const char *empty[] = {"--moe-aux-loss-coeff= , "};
    expect_error(parse(&o, empty, 1), "expected a value");
}

/* b = the options o writes, read back. */
static void read_back(const moe_options *o, moe_options *b) {
    char *text = NULL;
    size_t len = 0;
    FILE *mem = open_memstream(&text, &len);
    moe_options_write(mem, o);
    fclose(mem);
    moe_options_default(b);
    assert_int_equal(moe_options_load_text(b, text, "written"), MOE_OK);
    free(text);
}

/* Resolves args (model options) and checks each layer's experts against want[] (0 = dense). */
static void expect_layers(const char *const *args, int n, const int *want, int layers) {
    moe_options o;
    assert_int_equal(parse(&o, args, n), MOE_OK);
    if (moe_options_finish(&o, MOE_OPTIONS_MODEL) != MOE_OK) fail_msg("%s", moe_last_error());
    assert_int_equal(o.model.n_layers, layers);
    for (int l = 0; l < layers; l++)
        if (moe_model_layer_experts(&o.model, l) != want[l])
            fail_msg("layer %d: %d experts, expected %d", l, moe_model_layer_experts(&o.model, l),
                     want[l]);
    /* the resolved options read back as the same model */
    moe_options b;
    read_back(&o, &b);
    assert_int_equal(moe_options_finish(&b, MOE_OPTIONS_MODEL), MOE_OK);
    assert_memory_equal(&o.model, &b.model, sizeof o.model);
}

/* Megatron's moe-layer-freq patterns, DeepSpeed's expert-interval and a num-experts list of
 * one count per MoE layer, against layer kinds drawn here and built without the parser. */
static void test_layer_patterns(void **state) {
    (void)state;
    uint64_t seed = tu_seed();
    char layers_txt[16], freq[1024], experts[16];
    int want[64];
    for (int trial = 0; trial < 20; trial++) {
        int layers = 2 + (int)(moe_rng_uniform(seed, 7, (uint64_t)trial) * 30);
        int e = 2 + (int)(moe_rng_uniform(seed, 8, (uint64_t)trial) * 14);
        snprintf(layers_txt, sizeof layers_txt, "%d", layers);
        snprintf(experts, sizeof experts, "%d", e);
        /* runs of MoE and dense layers, written as Megatron scripts do, with blanks and
         * parentheses here and there; the first run written as a list of its bits */
        int l = 0, pos = 0, moe_layers = 0;
        while (l < layers) {
            int bit = moe_rng_uniform(seed, 9, (uint64_t)(trial * 64 + l)) < 0.5f;
            int run = 1 + (int)(moe_rng_uniform(seed, 10, (uint64_t)(trial * 64 + l)) * 5);
            if (run > layers - l) run = layers - l;
            if (!l) {
                pos += snprintf(freq + pos, sizeof freq - (size_t)pos, "([%d", bit);
                for (int r = 1; r < run; r++)
                    pos += snprintf(freq + pos, sizeof freq - (size_t)pos, ", %d", bit);
                pos += snprintf(freq + pos, sizeof freq - (size_t)pos, "])");
            } else {
                pos += snprintf(freq + pos, sizeof freq - (size_t)pos,
                                trial % 2 ? " + [%d]*%d" : "+%d*[%d]", trial % 2 ? bit : run,
                                trial % 2 ? run : bit);
            }
            for (int r = 0; r < run; r++) want[l + r] = bit ? e : 0, moe_layers += bit;
            l += run;
        }
        if (!moe_layers) continue; /* all dense: a dense model, as below */
        const char *args[] = {"--num-layers", layers_txt, "--moe-layer-freq", freq,
                              "--num-experts", experts};
        expect_layers(args, 6, want, layers);
    }

    /* repetition of a group, and a count on either side */
    const int rep[] = {8, 8, 0, 8, 8, 0};
    const char *grouped[] = {"--num-layers", "6", "--moe-layer-freq", "([1]*2+[0]*1)*2"};
    expect_layers(grouped, 4, rep, 6);
    grouped[3] = "'2*(2*[1]+[0])'"; /* quoted, as a shell script may pass it */
    expect_layers(grouped, 4, rep, 6);
    /* DeepSpeed: (l + 1) % N == 0 (Megatron's number: l % N == 0), one count per MoE layer */
    const int ds[] = {0, 0, 4, 0, 0, 16};
    const char *interval[] = {"--num-layers", "6", "--expert-interval", "3", "--num-experts",
                              "4", "16"};
    expect_layers(interval, 7, ds, 6);
    const int mg[] = {4, 0, 0, 16, 0, 0};
    const char *number[] = {"--num-layers", "6", "--moe-layer-freq", "3", "--num-experts", "4,16"};
    expect_layers(number, 6, mg, 6);
    const int first[] = {0, 4, 4, 4, 16, 16};
    const char *dense1[] = {"--num-layers", "6", "--first-k-dense", "1", "--num-experts",
                            "4 4 4 16 16"};
    expect_layers(dense1, 6, first, 6);
    /* the later of two settings wins */
    const int all[] = {8, 8, 8, 8};
    const char *later[] = {"--moe-layer-freq", "[1,0,1,0]", "--moe-layer-freq", "1"};
    expect_layers(later, 4, all, 4);
    const int none[] = {0, 0};
    const char *dense[] = {"--num-layers", "2", "--moe-layer-freq", "[0]*2"};
    expect_layers(dense, 4, none, 2);

    moe_options o;
    const struct {
        const char *freq, *error;
    } bad[] = {
        {"[1,0,1]", "a pattern of 3 layers but num-layers is 4"},
        {"[1,2,1,0]", "a list holds 1 (an MoE layer) and 0 (a dense layer)"},
        {"[1]*[4]", "a list holds 1"},
        {"[1,0]*[1,0]", "a list times a list"},
        {"[1,0]+2", "a list plus a number"},
        {"[1]*4*", "expected '[', '(' or a number, at the end"},
        {"[1]*4)", "unexpected text at the end, before ')'"},
        {"[1]*300", "longer than 256 layers"},
        {"[1]*99999999999", "a number too large"},
        {"([1]*2", "expected ')'"},
        {"[1 0]", "expected ',' or ']'"},
        {"2*[]", "the pattern must be a list of layers"},
        {"[1]*2+[x]", "expected '[', '(' or a number, before 'x]'"},
        {"((((((((((((((((((((((((((((((((((([1]))))))))))))))))))))))))))))))))))*4",
         "nested too deeply"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        const char *args[] = {"--num-layers", "4", "--moe-layer-freq", bad[i].freq};
        moe_status st = parse(&o, args, 4);
        if (st == MOE_OK) st = moe_options_finish(&o, MOE_OPTIONS_MODEL);
        expect_error(st, bad[i].error);
    }
    const char *both[] = {"--num-layers", "4", "--moe-layer-freq", "2", "--expert-interval", "2"};
    assert_int_equal(parse(&o, both, 6), MOE_OK);
    expect_error(moe_options_finish(&o, MOE_OPTIONS_MODEL), "both choose the MoE layers");
    const char *count[] = {"--num-layers", "4", "--moe-layer-freq", "2", "--num-experts", "4,8,8"};
    assert_int_equal(parse(&o, count, 6), MOE_OK);
    expect_error(moe_options_finish(&o, MOE_OPTIONS_MODEL),
                 "num-experts lists 3 values: give one per layer (num-layers 4) or one per MoE "
                 "layer (2)");
    const char *listed[] = {"--num-layers", "4", "--moe-layer-freq", "[1,0,1,1]", "--num-experts",
                            "4,4,8,8"};
    assert_int_equal(parse(&o, listed, 6), MOE_OK);
    expect_error(moe_options_finish(&o, MOE_OPTIONS_MODEL),
                 "num-experts lists 4 experts for layer 1, which moe-layer-freq makes dense");
}

static void test_write_round_trip(void **state) {
    (void)state;
    uint64_t seed = tu_seed();
    moe_options a;
    char topk[16], cf[32], seedtxt[32];
    /* k >= 2: top-1 with moe-router-norm-topk-prob true is refused for training */
    snprintf(topk, sizeof topk, "%d", 2 + (int)(seed % 3));
    snprintf(cf, sizeof cf, "%.7g", 0.5 + moe_rng_uniform(seed, 1, 0));
    snprintf(seedtxt, sizeof seedtxt, "%llu", (unsigned long long)seed);
    const char *args[] = {"--num-experts", "12", "--moe-router-topk", topk,
                          "--moe-router-score-function", "sqrtsoftplus",
                          "--moe-router-num-groups", "4", "--moe-router-group-topk", "2",
                          "--moe-expert-capacity-factor", cf, "--moe-token-drop-policy", "position",
                          "--moe-activation", "relu2", "--moe-shared-expert-intermediate-size",
                          "32", "--moe-use-residual", "--moe-z-loss-coeff", "0.001",
                          "--moe-router-load-balancing-type", "global_aux_loss", "seq_aux_loss",
                          "--moe-aux-loss-coeff", "0.01", "2e-3", "--seed", seedtxt,
                          "--moe-router-norm-topk-prob", "true", "--tokens", "77",
                          "--num-layers", "4", "--num-experts", "12,0,8,12", "--save",
                          "/tmp/run #1", "--lr", "0.0007", "--global-batch-size", "16",
                          "--data-path", "/tmp/d\"#x"};
    assert_int_equal(parse(&a, args, (int)(sizeof args / sizeof args[0])), MOE_OK);
    assert_int_equal(moe_options_finish(&a, MOE_OPTIONS_MODEL | MOE_OPTIONS_TRAIN), MOE_OK);

    char *text = NULL;
    size_t len = 0;
    FILE *mem = open_memstream(&text, &len);
    moe_options_write(mem, &a);
    fclose(mem);
    const char *path = write_temp(text);
    moe_options b;
    moe_options_default(&b);
    assert_int_equal(moe_options_load_file(&b, path), MOE_OK);
    assert_int_equal(moe_options_finish(&b, MOE_OPTIONS_MODEL | MOE_OPTIONS_TRAIN), MOE_OK);
    assert_memory_equal(&a, &b, offsetof(moe_options, given));
    assert_non_null(strstr(text, "num-experts = 12,0,8,12\n"));
    assert_non_null(strstr(text, "save = \"/tmp/run #1\"\n"));
    assert_non_null(strstr(text, "data-path = '/tmp/d\"#x'\n")); /* the other quote */
    assert_int_equal(moe_model_layer_experts(&b.model, 0), 12);
    assert_int_equal(moe_model_layer_experts(&b.model, 1), 0); /* dense */
    assert_int_equal(moe_model_layer_experts(&b.model, 2), 8);
    assert_non_null(strstr(text, "moe-router-score-function = sqrtsoftplus\n"));
    assert_non_null(strstr(text, "moe-router-load-balancing-type = global_aux_loss seq_aux_loss\n"));
    assert_non_null(strstr(text, "moe-aux-loss-coeff = 0.01 0.002\n"));
    free(text);
    unlink(path);
}

/* A quote opens a quoted value only at the value's start: one inside an unquoted value is a
 * character of it and leaves a comment after it a comment; and moe_options_write's output
 * reads back to the same text for paths of quotes, '#', '=', tabs and leading spaces. */
static void test_quotes_inside_values(void **state) {
    (void)state;
    moe_options o;
    moe_options_default(&o);
    const char *path = write_temp("save = /tmp/bob's-run   # my run\n"
                                  "data-path = /tmp/say \"hi\"#there\n"
                                  "init-from = 'say \"#1\"' # a comment\n");
    assert_int_equal(moe_options_load_file(&o, path), MOE_OK);
    assert_string_equal(o.save, "/tmp/bob's-run");
    assert_string_equal(o.data_path, "/tmp/say \"hi\"");
    assert_string_equal(o.init_from, "say \"#1\"");
    unlink(path);
    const char *values[] = {"/tmp/bob's-run", "/tmp/a=b", "\t/tmp/tab", "  /tmp/lead",
                            "/tmp/x'#y", "/tmp/x\"y # z", "'start", "\"start", "end ",
                            "a\tb'c", "#hash", "= eq"};
    for (size_t i = 0; i < sizeof values / sizeof values[0]; i++) {
        char arg[128];
        snprintf(arg, sizeof arg, "--save=%s", values[i]);
        const char *args[] = {arg};
        assert_int_equal(parse(&o, args, 1), MOE_OK);
        moe_options b;
        read_back(&o, &b);
        if (strcmp(b.save, values[i]))
            fail_msg("'%s' read back as '%s'", values[i], b.save);
    }
}

/* A flag that the command does not read is an error naming it as given; the same key in a
 * config file is not (one file serves several commands). */
static void test_unused_flags(void **state) {
    (void)state;
    moe_options o;
    const moe_options_use use = {"cmd", MOE_SEC_LAYER | MOE_SEC_ROUTER,
                                 "data-path expert-model-parallel-size"};
    const char *ok[] = {"--num-experts=4", "--moe-router-type", "sinkhorn", "--data", "d",
                        "--ep_size", "2"}; /* sections; options alone, by their aliases too */
    moe_options_default(&o);
    assert_int_equal(moe_options_parse_args(&o, 7, (char **)ok, &use), MOE_OK);
    assert_int_equal(o.layer.n_experts, 4);
    assert_int_equal(o.ep, 2);
    const char *bad[] = {"--num-experts", "4", "--moe_z_loss_coeff=0.5", "--save", "s"};
    moe_options_default(&o);
    expect_error(moe_options_parse_args(&o, 5, (char **)bad, &use),
                 "--moe_z_loss_coeff is not used by this command");
    const char *cfg = write_temp("save = run\nmoe_z_loss_coeff = 0.5\n");
    const char *file[] = {"--config", cfg, "--seed", "7"};
    moe_options_default(&o);
    assert_int_equal(moe_options_parse_args(&o, 4, (char **)file, &use), MOE_OK);
    assert_string_equal(o.save, "run");
    assert_true(o.layer.z_coeff == 0.5f && o.layer.seed == 7);
    unlink(cfg);
}

static void test_help_lists_options(void **state) {
    (void)state;
    char *text = NULL;
    size_t len = 0;
    FILE *mem = open_memstream(&text, &len);
    const moe_options_use cmds[] = {{"one", MOE_SEC_MODEL, "save"},
                                    {"two", MOE_SEC_GEN, "hidden-size save"}};
    moe_options_help(mem, cmds, 2);
    fclose(mem);
    /* the readers: of a section after its name, of an option alone below it */
    assert_non_null(strstr(text, "\nModel (read by one):\n"));
    assert_non_null(strstr(text, "\nGeneration (read by two):\n"));
    assert_non_null(strstr(text, "\nTraining:\n"));
    assert_non_null(strstr(text, "hidden size d (default 128)\n      also: d-model dim\n"
                                 "      read by two too\n"));
    assert_non_null(strstr(text, "metrics (default \"\")\n      read by one, two\n"));
    const char *flags[] = {"--num-experts", "--moe-router-topk", "--moe-router-score-function",
                           "--moe-router-pre-softmax", "--moe-router-num-groups",
                           "--moe-router-group-topk", "--moe-router-topk-scaling-factor",
                           "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate",
                           "--moe-router-load-balancing-type", "--moe-aux-loss-coeff",
                           "--moe-z-loss-coeff", "--moe-input-jitter-eps",
                           "--moe-expert-capacity-factor", "--moe-token-drop-policy",
                           "--moe-pad-expert-input-to-capacity",
                           "--moe-shared-expert-intermediate-size", "--config", "moe-gate-k",
                           "moe-loss-coeff"};
    for (size_t i = 0; i < sizeof flags / sizeof flags[0]; i++)
        if (!strstr(text, flags[i])) fail_msg("help text lacks %s", flags[i]);
    free(text);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults_match_layer),
        cmocka_unit_test(test_flag_forms),
        cmocka_unit_test(test_config_file_aliases_and_override),
        cmocka_unit_test(test_unknown_names_suggest),
        cmocka_unit_test(test_bad_values),
        cmocka_unit_test(test_malformed_files),
        cmocka_unit_test(test_finish_combinations),
        cmocka_unit_test(test_balancing_lists),
        cmocka_unit_test(test_layer_patterns),
        cmocka_unit_test(test_write_round_trip),
        cmocka_unit_test(test_quotes_inside_values),
        cmocka_unit_test(test_unused_flags),
        cmocka_unit_test(test_help_lists_options),
        cmocka_unit_test(test_automodel_names),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
