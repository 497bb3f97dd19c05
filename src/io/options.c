/* The option registry: one table for flags, config files, help, range checks and metadata. */
#define _POSIX_C_SOURCE 200809L
#include "io/options.h"

#include "core/core.h"

#include <ctype.h>
#include <errno.h>
#include <float.h>
#include <math.h>
#include <stddef.h>
#include <string.h>
#include <strings.h>

typedef enum {
    OPT_INT,
    OPT_U64,
    OPT_FLOAT,
    OPT_BOOL,
    OPT_ENUM,
    OPT_STRING,  /* char[MOE_PATH_MAX] */
    OPT_EXPERTS, /* an expert count, or one per layer ("4,4,8,8") into model.n_experts */
    OPT_ENUM_LIST,  /* Megatron's nargs='+': choices into a moe_opt_ints, words or commas */
    OPT_FLOAT_LIST, /* numbers into a moe_opt_floats, likewise */
    OPT_LAYER_FREQ, /* moe-layer-freq: a number, or Megatron's pattern into freq_pattern */
} opt_type;

typedef struct {
    const char *name;
    int value;
} opt_choice;

typedef struct {
    const char *name;    /* canonical flag name, without "--" */
    const char *aliases; /* space-separated other names, or NULL */
    opt_type type;
    size_t offset; /* into moe_options */
    double lo, hi; /* inclusive range of numbers */
    const opt_choice *choices; /* OPT_ENUM: terminated by a NULL name */
    unsigned section;          /* one MOE_SEC_* bit */
    const char *help;
    int transient; /* of this run alone (an action, its starting point, its processes): not
                    * written into checkpoints by moe_options_write; moe_options_print_config
                    * writes it when given */
} opt_def;

_Static_assert(sizeof(moe_activation) == sizeof(int) && sizeof(moe_router_type) == sizeof(int) &&
                   sizeof(moe_score_fn) == sizeof(int) && sizeof(moe_norm_topk) == sizeof(int) &&
                   sizeof(moe_drop_policy) == sizeof(int),
               "enum options are stored as int");

static const opt_choice act_choices[] = {{"swiglu", MOE_ACT_SWIGLU}, {"geglu", MOE_ACT_GEGLU},
                                         {"relu2", MOE_ACT_RELU2},   {"gelu", MOE_ACT_GELU},
                                         {"silu", MOE_ACT_SILU},     {NULL, 0}};
static const opt_choice device_choices[] = {{"cpu", 0}, {"cuda", 1}, {NULL, 0}};
static const opt_choice router_choices[] = {{"topk", MOE_ROUTER_TOPK},
                                            {"sinkhorn", MOE_ROUTER_SINKHORN},
                                            {"expert_choice", MOE_ROUTER_EXPERT_CHOICE},
                                            {"fake_balanced", MOE_ROUTER_FAKE_BALANCED},
                                            {NULL, 0}};
static const opt_choice score_choices[] = {{"softmax", MOE_SCORE_SOFTMAX},
                                           {"sigmoid", MOE_SCORE_SIGMOID},
                                           {"sqrtsoftplus", MOE_SCORE_SQRTSOFTPLUS},
                                           {NULL, 0}};
static const opt_choice dispatcher_choices[] = {
    {"alltoall", 0}, {"allgather", 1}, {NULL, 0}};
static const opt_choice qk_norm_choices[] = {
    {"none", MOE_QK_NORM_NONE}, {"head", MOE_QK_NORM_HEAD}, {"whole", MOE_QK_NORM_WHOLE}, {NULL, 0}};
static const opt_choice norm_choices[] = {
    {"auto", MOE_NORM_AUTO}, {"false", MOE_NORM_OFF}, {"true", MOE_NORM_ON}, {NULL, 0}};
static const opt_choice lb_choices[] = {{"aux_loss", MOE_LB_AUX},
                                        {"seq_aux_loss", MOE_LB_SEQ_AUX},
                                        {"global_aux_loss", MOE_LB_GLOBAL_AUX},
                                        {"load_importance", MOE_LB_LOAD_IMPORTANCE},
                                        {"sinkhorn", MOE_LB_CHOICE_SINKHORN},
                                        {"quantile_balancing", MOE_LB_CHOICE_QB},
                                        {"none", MOE_LB_NONE},
                                        {NULL, 0}};
static const opt_choice drop_choices[] = {
    {"probs", MOE_DROP_PROBS}, {"position", MOE_DROP_POSITION},
    {"position-by-choice", MOE_DROP_CHOICE}, {"random", MOE_DROP_RANDOM},
    {"batch-prioritized", MOE_DROP_PRIORITY},
    {NULL, 0}};
static const opt_choice mlp_type_choices[] = {{"standard", 0}, {"residual", 1}, {NULL, 0}};
static const opt_choice dtype_choices[] = {{"fp32", 0}, {"fp64", 1}, {NULL, 0}};
static const opt_choice rmsnorm_choices[] = {{"RMSNorm", 0}, {NULL, 0}};
static const opt_choice noisy_choices[] = {
    {"none", 0}, {"Jitter", 1}, {"RSample", 2}, {NULL, 0}};
static const opt_choice rope_choices[] = {{"rope", 0}, {NULL, 0}};
static const opt_choice lr_choices[] = {
    {"cosine", MOE_LR_COSINE}, {"linear", MOE_LR_LINEAR}, {"constant", MOE_LR_CONSTANT}, {NULL, 0}};

#define L(field) offsetof(moe_options, layer.field)
#define O(field) offsetof(moe_options, field)
#define M(field) offsetof(moe_options, model.field)
#define T(field) offsetof(moe_options, train.field)
#define BIG 1e9
#define LAYER MOE_SEC_LAYER
#define ROUTER MOE_SEC_ROUTER
#define BALANCE MOE_SEC_BALANCE
#define DISPATCH MOE_SEC_DISPATCH
#define EXPERTS MOE_SEC_EXPERTS
#define MODEL MOE_SEC_MODEL
#define TRAIN MOE_SEC_TRAIN
#define FILES MOE_SEC_FILES
#define GEN MOE_SEC_GEN
#define RUN MOE_SEC_RUN

/* The name of section bit `section` (help, config files). */
static const char *section_name(unsigned section) {
    static const char *const names[] = {"MoE layer", "Router", "Load balancing",
                                        "Dispatch and capacity", "Experts", "Model", "Training",
                                        "Data, checkpoints, logging", "Generation", "Run"};
    for (unsigned b = 0; b < sizeof names / sizeof names[0]; b++)
        if (section == 1u << b) return names[b];
    return "?";
}

static const opt_def opts[] = {
    {"num-experts", "moe-num-experts n-routed-experts", OPT_EXPERTS, L(n_experts), 0, BIG, NULL,
     LAYER, "routed experts E; a list (4,4,8,8 or words) gives each layer its own, or each MoE "
     "layer in order (pyramid PR-MoE; 0 = dense)", 0},
    {"moe-router-topk", "moe-gate-k num-experts-per-tok topk n-activated-experts", OPT_INT,
     L(topk), 1, BIG, NULL, LAYER, "experts per token k (1..E)", 0},
    {"moe-ffn-hidden-size", "moe-intermediate-size moe-inter-dim", OPT_INT, L(ffn), 1, BIG,
     NULL, LAYER, "hidden size f of one routed expert", 0},
    {"seed", NULL, OPT_U64, L(seed), 0, 0, NULL, LAYER,
     "random seed (parameters, jitter, random routing, fake gate)", 0},

    {"moe-router-type", NULL, OPT_ENUM, L(router), 0, 0, router_choices, ROUTER,
     "token choice top-k, Sinkhorn (S-BASE), expert choice, or the fake balanced gate", 0},
    {"moe-router-score-function", "scoring-func score-func", OPT_ENUM, L(score), 0, 0,
     score_choices, ROUTER, "score of an expert", 0},
    {"moe-router-pre-softmax", "softmax-before-topk", OPT_BOOL, L(pre_softmax), 0, 1, NULL, ROUTER,
     "softmax over all experts before top-k (else softmax over the k selected logits, which at "
     "top-1 is always 1: training refuses that)", 0},
    {"moe-router-norm-topk-prob", "norm-topk-prob", OPT_ENUM, L(norm_topk), 0, 0, norm_choices,
     ROUTER, "renormalise the selected weights (auto: for sigmoid/sqrtsoftplus with k > 1)", 0},
    {"moe-router-topk-scaling-factor", "route-scale routed-scaling-factor", OPT_FLOAT,
     L(route_scale), 1e-30, BIG, NULL, ROUTER, "factor on the routing weights", 0},
    {"moe-router-num-groups", "n-group n-expert-groups", OPT_INT, L(n_groups), 1, BIG, NULL,
     ROUTER, "expert groups for group-limited routing (1 = off)", 0},
    {"moe-router-group-topk", "topk-group n-limited-groups", OPT_INT, L(group_topk), 1, BIG, NULL,
     ROUTER, "groups kept per token", 0},
    {"moe-router-group-score-topk", NULL, OPT_INT, L(group_score_topk), 0, BIG, NULL, ROUTER,
     "a group's score is the sum of its best N keys (0 = topk / group-topk as Megatron; "
     "DeepSeek-V3 2, DeepSeek-V2 1)", 0},
    {"moe-router-enable-expert-bias", NULL, OPT_BOOL, L(enable_expert_bias), 0, 1, NULL, ROUTER,
     "selection-only expert bias (aux-loss-free balancing, DeepSeek-V3)", 0},
    {"moe-router-bias-update-rate", "gate-bias-update-factor", OPT_FLOAT, L(bias_update_rate),
     0, BIG, NULL, ROUTER, "b_e += rate * sign(mean(c) - c_e) once per optimizer step", 0},
    {"moe-router-cosine-dim", NULL, OPT_INT, L(cosine_dim), 0, BIG, NULL, ROUTER,
     "Tutel's cosine router: the logits are the cosines between the tokens projected to this "
     "many dimensions and a learned direction per expert, times a learned temperature's gain "
     "(Tutel's proj_dim, 256 there; 0 = the linear router)", 0},
    {"moe-router-cosine-init-temperature", NULL, OPT_FLOAT, L(cosine_init_t), 0, BIG, NULL,
     ROUTER, "the cosine router's initial temperature t: gain 1 / t, at most 100 (Tutel's "
     "init_t)", 0},
    {"moe-router-dtype", NULL, OPT_ENUM, L(router_fp64), 0, 0, dtype_choices, ROUTER,
     "precision of the router GEMM (the rest of the router is float64)", 0},
    {"moe-router-force-load-balancing", NULL, OPT_BOOL, O(force_lb), 0, 1, NULL, ROUTER,
     "use the fake balanced gate (round robin) instead of the learned router, for benchmarks", 0},
    {"moe-fake-gate-noise", "fake-gate-noise", OPT_FLOAT, L(fake_noise), 0, 1, NULL, ROUTER,
     "fake gate: randomness of the expert choice and weights (0 = exact round robin)", 0},
    {"moe-fake-gate-skip-first-n", "skip-first-n-experts", OPT_INT, L(fake_skip_first), 0, BIG,
     NULL, ROUTER, "fake gate: experts 0..n-1 receive no tokens", 0},
    {"moe-random-routing", NULL, OPT_BOOL, L(random_routing), 0, 1, NULL, ROUTER,
     "GShard random routing: keep the 2nd..k-th choices with probability weight / threshold", 0},
    {"moe-router-sample-second", "top2-2nd-expert-sampling", OPT_BOOL, L(sample_second), 0, 1,
     NULL, ROUTER, "training with k = 2: the second choice drawn from the softmax of the other "
     "experts (Gumbel noise on the logits; DeepSpeed's top-2 default, GShard's second_expert_"
     "policy sampling; softmax scores, no expert bias or groups)", 0},
    {"moe-random-routing-threshold", NULL, OPT_FLOAT, L(random_routing_threshold), 1e-30, BIG,
     NULL, ROUTER, "threshold of random routing", 0},
    {"moe-sinkhorn-tol", NULL, OPT_FLOAT, L(sinkhorn_tol), 1e-30, BIG, NULL, ROUTER,
     "Sinkhorn stops when the mean change of the expert scaling is below this", 0},
    {"moe-sinkhorn-max-iter", NULL, OPT_INT, L(sinkhorn_max_iter), 1, BIG, NULL, ROUTER,
     "Sinkhorn iteration limit", 0},
    {"moe-input-jitter-eps", NULL, OPT_FLOAT, L(jitter_eps), 0, 0.999999, NULL, ROUTER,
     "multiply the router input by U(1-eps, 1+eps) in training (0 = off)", 0},
    {"moe-gate-noise", "gate-noise", OPT_FLOAT, L(gate_noise), 0, BIG, NULL, ROUTER,
     "add gate_noise * N(0, 1) / E to the router logits in training (Tutel's; 0 = off)", 0},
    {"moe-noisy-gate-policy", "noisy-gate-policy", OPT_ENUM, O(noisy_gate), 0, 0, noisy_choices,
     ROUTER, "DeepSpeed's: Jitter is moe-input-jitter-eps 0.01; RSample (top-1, softmax, "
     "training) takes the argmax of the logits plus Gumbel noise, a draw from the softmax", 0},

    {"moe-router-load-balancing-type", NULL, OPT_ENUM_LIST, O(lb_list), 0, 0, lb_choices,
     BALANCE, "balancing loss (sinkhorn selects the Sinkhorn router instead; quantile_balancing "
     "is Megatron's bias on the logits from each expert's quantile, without a loss); as in "
     "Megatron, a list of aux_loss, seq_aux_loss and global_aux_loss adds those losses, each "
     "with its coefficient", 0},
    {"moe-router-quantile-balancing-ema", NULL, OPT_FLOAT, L(qb_ema), 0, 1, NULL, BALANCE,
     "quantile balancing: beta <- ema * beta + (1 - ema) * the step's mean quantile, then "
     "centred", 0},
    {"moe-aux-loss-coeff", "moe-loss-coeff aux-loss-alpha aux-loss-coeff", OPT_FLOAT_LIST,
     O(aux_list), 0, BIG, NULL, BALANCE, "aux loss coefficient: loss = nll + coeff * aux, per "
     "MoE layer, in Megatron's normalisation (InternEvo's GShard loss counts first choices "
     "only: docs/LAYER.md); one per type when moe-router-load-balancing-type is a list", 0},
    {"router-aux-loss-coef", NULL, OPT_FLOAT, O(aux_coeff_hf), 0, BIG, NULL, BALANCE,
     "Hugging Face's aux loss coefficient: its one loss over all MoE layers sums the k choices' "
     "counts without the 1/k, so this sets moe-aux-loss-coeff (per layer) to k / (MoE layers) "
     "times the value", 1},
    {"moe-z-loss-coeff", NULL, OPT_FLOAT, L(z_coeff), 0, BIG, NULL, BALANCE,
     "router z-loss coefficient, per MoE layer", 0},
    {"router-z-loss-coef", NULL, OPT_FLOAT, O(z_coeff_hf), 0, BIG, NULL, BALANCE,
     "Hugging Face's (Switch) router z-loss coefficient: its one loss over all MoE layers' "
     "logits, so this sets moe-z-loss-coeff (per layer) to 1 / (MoE layers) times the value", 1},

    {"moe-expert-capacity-factor", "capacity-factor", OPT_FLOAT, L(capacity_factor), -BIG, BIG,
     NULL, DISPATCH, "0 = dropless; > 0 fixed capacity ceil(cf*T*k/E); < 0 dynamic, capped at |cf|", 0},
    {"moe-eval-capacity-factor", "eval-capacity-factor", OPT_FLOAT, L(eval_capacity_factor),
     -BIG, BIG, NULL, DISPATCH, "the capacity factor outside training (validation, eval, "
     "generate; DeepSpeed's): 0 = moe-expert-capacity-factor's, else as that (E/k or more drops "
     "nothing)", 0},
    {"moe-min-capacity", "min-capacity", OPT_INT, L(min_capacity), 0, BIG, NULL, DISPATCH,
     "lower bound of the capacity", 0},
    {"moe-token-drop-policy", "drop-policy", OPT_ENUM, L(drop_policy), 0, 0, drop_choices,
     DISPATCH, "which slots an over-full expert drops: lowest weight, latest token, latest token "
     "of the latest choice (every first choice kept before any second: GShard's, DeepSpeed's "
     "top-2), at random (DeepSpeed's random token selection, use_rts), or the latest choice of "
     "the token with the lowest top score (batch-prioritized routing: V-MoE, Switch, Tutel)", 0},
    {"moe-pad-expert-input-to-capacity", NULL, OPT_BOOL, L(pad_to_capacity), 0, 1, NULL,
     DISPATCH, "every expert computes exactly capacity rows", 0},
    {"moe-local-group-size", NULL, OPT_INT, L(local_group_size), 0, BIG, NULL, DISPATCH,
     "GShard's local group dispatching: the capacity and the drop order hold per group of this "
     "many consecutive tokens (seq-length: per sequence; 0 = a rank's micro-batch as one group)",
     0},

    {"moe-activation", "expert-activation", OPT_ENUM, L(act), 0, 0, act_choices, EXPERTS,
     "expert activation (swiglu and geglu are gated: W_in has 2f rows)", 0},
    {"moe-expert-linear-bias", "add-bias-linear", OPT_BOOL, L(expert_bias), 0, 1, NULL, EXPERTS,
     "bias vectors in the expert and shared-expert linear layers", 0},
    {"moe-apply-probs-on-input", NULL, OPT_BOOL, L(probs_on_input), 0, 1, NULL, EXPERTS,
     "the routing weight scales each routed expert's input instead of its output (Megatron's; "
     "Llama 4's top-1 experts)", 0},
    {"moe-expert-bf16", NULL, OPT_BOOL, L(expert_bf16), 0, 1, NULL, EXPERTS,
     "expert GEMMs in bf16 with fp32 accumulation (oneDNN on a CPU with AVX-512, fastest with "
     "AVX512-BF16; fp32 master weights)", 0},
    {"moe-shared-expert-intermediate-size", "shared-expert-intermediate-size", OPT_INT,
     L(shared_ffn), 0, BIG, NULL, EXPERTS, "hidden size of the shared expert (0 = none)", 0},
    {"n-shared-experts", NULL, OPT_INT, O(n_shared), 0, 4096, NULL, EXPERTS,
     "shared experts as NeMo Automodel and DeepSeek count them: sets "
     "moe-shared-expert-intermediate-size to this times moe-ffn-hidden-size", 1},
    {"moe-shared-expert-gate", "shared-expert-gate", OPT_BOOL, L(shared_gate), 0, 1, NULL, EXPERTS,
     "multiply the shared expert's output by sigmoid(x . g)", 0},
    {"mlp-type", NULL, OPT_ENUM, O(mlp_type), 0, 0, mlp_type_choices, EXPERTS,
     "Megatron-DeepSpeed's: residual is moe-use-residual with a residual MLP as wide as an "
     "expert (moe-shared-expert-intermediate-size = moe-ffn-hidden-size unless given)", 1},
    {"moe-use-residual", "use-residual", OPT_BOOL, L(residual), 0, 1, NULL, EXPERTS,
     "Residual-MoE: out = moe*c0 + mlp*c1 with c = softmax(Linear(d->2)(x)); the MLP is the "
     "shared expert", 0},

    {"hidden-size", "d-model dim", OPT_INT, M(d), 1, BIG, NULL, MODEL, "hidden size d", 0},
    {"vocab-size", NULL, OPT_INT, M(vocab), 2, 1 << 24, NULL, MODEL,
     "vocabulary size V (257 for the byte tokenizer)", 0},
    {"num-layers", "num-hidden-layers", OPT_INT, M(n_layers), 1, MOE_MAX_LAYERS, NULL, MODEL,
     "transformer blocks L", 0},
    {"num-attention-heads", NULL, OPT_INT, M(n_heads), 1, BIG, NULL, MODEL, "attention heads H", 0},
    {"num-query-groups", "num-key-value-heads", OPT_INT, M(n_kv_heads), 0, BIG, NULL, MODEL,
     "key/value heads (grouped-query attention; 0 = num-attention-heads, or 1 with "
     "group-query-attention, as Megatron)", 0},
    {"ffn-hidden-size", "intermediate-size inter-dim", OPT_INT, M(ffn), 1, BIG, NULL, MODEL,
     "hidden size of the dense FFN layers", 0},
    {"seq-length", NULL, OPT_INT, M(seq_len), 1, BIG, NULL, MODEL, "sequence length S", 0},
    {"max-position-embeddings", NULL, OPT_INT, O(max_pos), 1, BIG, NULL, MODEL,
     "Megatron's position-table size: with RoPE a bound, at least seq-length; given alone it "
     "sets seq-length (a Hugging Face config's max_position_embeddings)", 1},
    {"rotary-base", "rope-theta", OPT_FLOAT, M(rope_theta), 1.000001, BIG, NULL, MODEL,
     "RoPE base theta", 0},
    {"norm-epsilon", "rms-norm-eps", OPT_FLOAT, M(norm_eps), 1e-30, 1, NULL, MODEL,
     "RMSNorm epsilon", 0},
    {"init-method-std", "initializer-range init-std", OPT_FLOAT, M(init_std), 1e-30, BIG, NULL,
     MODEL, "std of the normal initialisation (output projections: std / sqrt(2 L))", 0},
    {"kv-channels", "head-dim", OPT_INT, M(head_dim), 0, 65536, NULL, MODEL,
     "size of one attention head (0 = hidden-size / num-attention-heads)", 0},
    {"add-qkv-bias", "qkv-bias", OPT_BOOL, M(qkv_bias), 0, 1, NULL, MODEL,
     "biases in the query, key and value projections (Qwen2-MoE)", 0},
    {"qk-norm", NULL, OPT_ENUM, M(qk_norm), 0, 0, qk_norm_choices, MODEL,
     "RMSNorm of queries and keys before RoPE: per head (Qwen3-MoE) or over the whole "
     "projection (OLMoE)", 0},
    {"kv-lora-rank", NULL, OPT_INT, M(kv_lora_rank), 0, BIG, NULL, MODEL,
     "multi-head latent attention (DeepSeek-V2/V3) with this key/value latent width (0 = "
     "ordinary attention)", 0},
    {"q-lora-rank", NULL, OPT_INT, M(q_lora_rank), 0, BIG, NULL, MODEL,
     "MLA: query latent width (0 = a full query projection)", 0},
    {"qk-head-dim", "qk-nope-head-dim", OPT_INT, M(qk_nope_dim), 0, 65536, NULL, MODEL,
     "MLA: query/key head part without rotary embedding", 0},
    {"qk-pos-emb-head-dim", "qk-rope-head-dim", OPT_INT, M(qk_rope_dim), 0, 65536, NULL, MODEL,
     "MLA: query/key head part with rotary embedding (the key part shared by the heads)", 0},
    {"v-head-dim", NULL, OPT_INT, M(v_head_dim), 0, 65536, NULL, MODEL,
     "MLA: value head size", 0},
    {"rotary-interleaved", "rope-interleave", OPT_BOOL, M(rope_interleave), 0, 1, NULL, MODEL,
     "RoPE rotates pairs (2i, 2i+1) instead of (i, i + hd/2)", 0},
    {"rotary-scaling-factor", "rope-factor", OPT_FLOAT, M(rope_factor), 1, BIG, NULL, MODEL,
     "YaRN context extension factor (1 = none)", 0},
    {"original-max-position-embeddings", NULL, OPT_INT, M(rope_orig_max_pos), 0, BIG, NULL,
     MODEL, "YaRN: the positions the model was trained for", 0},
    {"beta-fast", NULL, OPT_FLOAT, M(rope_beta_fast), 1e-30, BIG, NULL, MODEL,
     "YaRN: rotations where frequencies stay as they are", 0},
    {"beta-slow", NULL, OPT_FLOAT, M(rope_beta_slow), 1e-30, BIG, NULL, MODEL,
     "YaRN: rotations below which frequencies are divided by the factor", 0},
    {"mscale", NULL, OPT_FLOAT, M(rope_mscale), 0, BIG, NULL, MODEL,
     "YaRN: cos/sin scale mscale(factor, this) / mscale(factor, mscale-all-dim) (0 = absent)", 0},
    {"mscale-all-dim", NULL, OPT_FLOAT, M(rope_mscale_all_dim), 0, BIG, NULL, MODEL,
     "YaRN: attention scores times mscale(factor, this)^2 (0 = absent)", 0},
    {"untie-embeddings-and-output-weights", NULL, OPT_BOOL, O(untie), 0, 1, NULL, MODEL,
     "separate LM head instead of the embedding matrix", 0},
    {"moe-layer-freq", NULL, OPT_LAYER_FREQ, M(moe_layer_freq), 1, BIG, NULL, MODEL,
     "layer l is MoE if l % freq == 0 (2 = every other layer, GShard), or Megatron's pattern of "
     "1 (MoE) and 0 (dense), one per layer: [1,1,0,1], ([0]+[1]*3), ([1]*3+[0])*2", 0},
    {"expert-interval", NULL, OPT_INT, O(expert_interval), 0, BIG, NULL, MODEL,
     "DeepSpeed's: layer l is MoE if (l + 1) % N == 0 (0 = not given: moe-layer-freq)", 0},
    {"first-k-dense", "first-k-dense-replace moe-first-k-dense", OPT_INT, M(first_k_dense), 0,
     BIG, NULL, MODEL, "the first k layers are dense (DeepSeek)", 0},

    {"train-iters", NULL, OPT_INT, T(train_iters), 1, BIG, NULL, TRAIN, "optimizer steps", 0},
    {"micro-batch-size", NULL, OPT_INT, T(micro_batch), 1, BIG, NULL, TRAIN,
     "sequences per forward/backward", 0},
    {"global-batch-size", NULL, OPT_INT, T(global_batch), 1, BIG, NULL, TRAIN,
     "sequences per optimizer step (gradient accumulation over micro-batches)", 0},
    {"lr", "learning-rate", OPT_FLOAT, T(lr), 0, BIG, NULL, TRAIN, "peak learning rate", 0},
    {"min-lr", NULL, OPT_FLOAT, T(min_lr), 0, BIG, NULL, TRAIN, "final learning rate", 0},
    {"lr-warmup-iters", NULL, OPT_INT, T(warmup_iters), 0, BIG, NULL, TRAIN,
     "linear warmup steps", 0},
    {"lr-decay-iters", NULL, OPT_INT, T(decay_iters), 0, BIG, NULL, TRAIN,
     "steps until min-lr (0 = train-iters)", 0},
    {"lr-decay-style", NULL, OPT_ENUM, T(decay_style), 0, 0, lr_choices, TRAIN,
     "learning-rate decay after warmup", 0},
    {"weight-decay", NULL, OPT_FLOAT, T(weight_decay), 0, BIG, NULL, TRAIN,
     "AdamW weight decay (not on norms and biases)", 0},
    {"adam-beta1", NULL, OPT_FLOAT, T(beta1), 0, 0.999999, NULL, TRAIN, "AdamW beta1", 0},
    {"adam-beta2", NULL, OPT_FLOAT, T(beta2), 0, 0.999999, NULL, TRAIN, "AdamW beta2", 0},
    {"adam-eps", NULL, OPT_FLOAT, T(adam_eps), 1e-30, 1, NULL, TRAIN, "AdamW epsilon", 0},
    {"max-bad-steps", NULL, OPT_INT, T(max_bad_steps), 1, BIG, NULL, TRAIN,
     "a step whose loss or gradient is not finite is skipped; after this many in a row the run "
     "stops with a checkpoint of the last good state", 0},
    {"clip-grad", NULL, OPT_FLOAT, T(clip_grad), 0, BIG, NULL, TRAIN,
     "clip the global gradient norm to this (0 = off)", 0},
    {"eval-interval", NULL, OPT_INT, T(eval_interval), 0, BIG, NULL, TRAIN,
     "steps between validation runs (0 = only at the end)", 0},
    {"eval-iters", NULL, OPT_INT, T(eval_iters), 1, BIG, NULL, TRAIN,
     "validation micro-batches per evaluation (Megatron counts global batches)", 0},

    {"data-path", "data", OPT_STRING, O(data_path), 0, 0, NULL, FILES,
     "directory written by moe prepare (train.bin, val.bin), or a blend of them as Megatron's "
     "'W1 DIR1 W2 DIR2 ...' (each row from a dataset with probability its weight over the sum); "
     "moe eval also takes a token file", 0},
    {"save", NULL, OPT_STRING, O(save), 0, 0, NULL, FILES, "run directory for checkpoints and "
     "metrics", 0},
    {"tensorboard-dir", NULL, OPT_STRING, O(tb_dir), 0, 0, NULL, FILES,
     "directory of the TensorBoard event files (\"\" = the save directory)", 0},
    {"load", NULL, OPT_STRING, O(load), 0, 0, NULL, FILES, "resume from this run directory (its "
     "latest checkpoint) or checkpoint directory; saves go on in the run directory", 0},
    {"model", NULL, OPT_STRING, O(hf_model), 0, 0, NULL, FILES,
     "moe eval, generate, convert, tokenize: a model directory in the Hugging Face layout "
     "(config.json, safetensors; mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, "
     "deepseek_v3)", 1},
    {"init-from", NULL, OPT_STRING, O(init_from), 0, 0, NULL, FILES,
     "moe train: start from a Hugging Face model directory (its config.json, then these flags; "
     "its weights)", 1},
    {"finetune", NULL, OPT_BOOL, O(finetune), 0, 1, NULL, FILES,
     "with --load: start a new run from the checkpoint's weights (step 0, new Adam moments; its "
     "options, then these flags; saves need another --save)", 1},
    {"moe-use-upcycling", NULL, OPT_BOOL, O(upcycle), 0, 1, NULL, FILES,
     "with --load of a dense checkpoint: go on from its step as an MoE run in a new --save "
     "(new Adam moments; with --finetune from step 0), Megatron's upcycling: each expert a "
     "scaled slice of its layer's dense MLP, the router rows repeated per group of slices "
     "(docs/FORMATS.md)", 1},
    {"no-load-optim", NULL, OPT_BOOL, O(no_load_optim), 0, 1, NULL, FILES,
     "with --load: go on from the checkpoint's step with new Adam moments", 1},
    {"no-load-rng", NULL, OPT_BOOL, O(mg_noop), 0, 1, NULL, FILES, "Megatron's, accepted with "
     "no effect: the random streams derive from the seed and the step, not from saved state", 1},
    {"ids", NULL, OPT_STRING, O(ids), 0, 0, NULL, FILES,
     "moe eval --model, generate --model, tokenize: a token id sequence, comma-separated", 1},
    {"dump-logits", NULL, OPT_STRING, O(dump_logits), 0, 0, NULL, FILES,
     "moe eval --ids: write the float32 logits [n, V] of the sequence to this .npy file", 1},
    {"save-interval", NULL, OPT_INT, O(save_interval), 0, BIG, NULL, FILES,
     "steps between checkpoints (0 = only at the end)", 0},
    {"keep-last", NULL, OPT_INT, O(keep_last), 1, BIG, NULL, FILES, "checkpoints kept", 0},
    {"exit-interval", NULL, OPT_INT, O(exit_interval), 0, BIG, NULL, FILES,
     "stop (with a checkpoint: needs --save or --load) when the step is a multiple of this "
     "(0 = never)", 1},
    {"inject-fault", NULL, OPT_STRING, O(inject_fault), 0, 0, NULL, FILES,
     "for tests: KIND@STEP[-LAST],... writes a NaN/Inf into the loss or the gradient (KIND: "
     "nan-loss, inf-loss, nan-grad, inf-grad)", 1},
    {"log-interval", NULL, OPT_INT, O(log_interval), 1, BIG, NULL, FILES,
     "steps between progress lines", 0},

    {"prompt", NULL, OPT_STRING, O(prompt), 0, 0, NULL, GEN,
     "text to continue (up to 1023 characters; a longer one: --prompt-file)", 1},
    {"prompt-file", NULL, OPT_STRING, O(prompt_file), 0, 0, NULL, GEN,
     "a file whose text is the prompt (any length; instead of --prompt)", 1},
    {"max-new-tokens", NULL, OPT_INT, O(max_new_tokens), 1, BIG, NULL, GEN,
     "tokens to generate (stops early at end-of-text)", 1},
    {"temperature", NULL, OPT_FLOAT, O(temperature), 0, BIG, NULL, GEN,
     "sampling temperature (0 = greedy)", 1},
    {"top-k", NULL, OPT_INT, O(top_k), 0, BIG, NULL, GEN, "sample among the k most likely (0 = all)", 1},
    {"top-p", NULL, OPT_FLOAT, O(top_p), 1e-6, 1, NULL, GEN,
     "sample from the smallest set with this probability of what top-k leaves (1 = all)", 1},

    /* Megatron's flags for what moe.c always does, so that its scripts run as written */
    {"swiglu", NULL, OPT_BOOL, O(mg_swiglu), 0, 1, NULL, MODEL,
     "Megatron's: SwiGLU MLPs (moe-activation swiglu, the default)", 1},
    {"disable-bias-linear", NULL, OPT_BOOL, O(mg_no_bias), 0, 1, NULL, MODEL,
     "Megatron's: no linear-layer biases (moe-expert-linear-bias false, the default)", 1},
    {"normalization", NULL, OPT_ENUM, O(mg_norm), 0, 0, rmsnorm_choices, MODEL,
     "Megatron's: the norm layers (RMSNorm only)", 1},
    {"position-embedding-type", NULL, OPT_ENUM, O(mg_pos), 0, 0, rope_choices, MODEL,
     "Megatron's: positions by rotary embeddings (rope only)", 1},
    {"attention-dropout", NULL, OPT_FLOAT, O(mg_attn_dropout), 0, 0, NULL, MODEL,
     "Megatron's: dropout of the attention probabilities (0 only: no dropout)", 1},
    {"hidden-dropout", NULL, OPT_FLOAT, O(mg_hidden_dropout), 0, 0, NULL, MODEL,
     "Megatron's: dropout of the hidden states (0 only: no dropout)", 1},
    {"no-position-embedding", "use-mcore-models no-masked-softmax-fusion",
     OPT_BOOL, O(mg_noop), 0, 1, NULL, MODEL, "Megatron's, accepted with no effect: no learned "
     "position table (rotary embeddings), the model classes, the fused softmax", 1},
    {"group-query-attention", NULL, OPT_BOOL, O(mg_gqa), 0, 1, NULL, MODEL, "Megatron's: "
     "num-query-groups not given is 1 (its default), not num-attention-heads", 1},
    {"moe-grouped-gemm", "use-distributed-optimizer sequence-parallel moe-per-layer-logging",
     OPT_BOOL, O(mg_noop), 0, 1, NULL, TRAIN, "Megatron's, accepted with no effect on the "
     "results: the expert GEMMs are always grouped; the Adam state is not sharded over the "
     "data-parallel ranks; sequence parallelism needs tensor parallelism (size 1 here); every "
     "MoE layer's load is in the metrics", 1},
    {"tensor-model-parallel-size", NULL, OPT_INT, O(mg_tp), 1, 1, NULL, RUN,
     "Megatron's: tensor parallelism (1 only: the experts split over processes with "
     "expert-model-parallel-size)", 1},
    {"pipeline-model-parallel-size", NULL, OPT_INT, O(mg_pp), 1, 1, NULL, RUN,
     "Megatron's: pipeline parallelism (1 only)", 1},

    {"tokens", NULL, OPT_INT, O(tokens), 1, BIG, NULL, RUN, "tokens per layer call", 0},
    {"iters", NULL, OPT_INT, O(iters), 1, BIG, NULL, RUN, "timed forward+backward iterations", 0},
    {"ceiling-size", NULL, OPT_INT, O(ceiling_n), 64, 16384, NULL, RUN,
     "moe bench on the CPU: the side N of the square GEMMs (N^3) whose best rate is the "
     "ceiling (a smaller N: a quicker run and a lower ceiling)", 1},
    {"expert-model-parallel-size", "expert_parallel_size ep_size ep", OPT_INT, O(ep), 1, 65536,
     NULL, RUN, "processes that share the experts of each MoE layer (under mpirun; divides the "
     "process count and every layer's num-experts)", 1},
    {"moe-token-dispatcher-type", NULL, OPT_ENUM, L(ep_replicated), 0, 0, dispatcher_choices,
     RUN, "with expert-model-parallel-size > 1: alltoall (each rank its own tokens, rows sent to "
     "the experts' ranks) or allgather (the ranks of an expert group share one batch, each "
     "computes its experts, outputs summed)", 1},
    {"moe-hierarchical-alltoall", "use-2dh hierarchical-alltoall", OPT_BOOL, O(two_stage), 0, 1,
     NULL, RUN, "two-stage token all-to-all: inside each machine, then between machines (fewer, "
     "larger messages on the network)", 1},
    {"ranks-per-node", NULL, OPT_INT, O(node_ranks), 0, 65536, NULL, RUN,
     "machines of the hierarchical all-to-all: this many consecutive ranks each (0 = the "
     "machines MPI reports)", 1},
    {"threads", NULL, OPT_INT, O(threads), 0, 4096, NULL, RUN,
     "OpenMP threads (0 = OMP_NUM_THREADS or all cores)", 0},
    {"device", NULL, OPT_ENUM, O(device), 0, 0, device_choices, RUN,
     "moe train, generate, eval, bench: where the model (or the layer) runs: cpu, or cuda (one "
     "NVIDIA GPU, in a build with CUDA)", 1},
    {"print-config", NULL, OPT_BOOL, O(print_config), 0, 1, NULL, RUN,
     "print the resolved options as a config file and exit", 1},
};
#define N_OPTS ((int)(sizeof opts / sizeof opts[0]))
_Static_assert(sizeof opts / sizeof opts[0] <= MOE_OPTIONS_MAX, "raise MOE_OPTIONS_MAX");

void moe_options_default(moe_options *o) {
    memset(o, 0, sizeof *o);
    o->layer = moe_layer_config_default();
    o->model = moe_model_config_default();
    o->train = moe_train_config_default();
    o->lb_list = (moe_opt_ints){1, {o->layer.lb_type}};
    o->aux_list = (moe_opt_floats){1, {o->layer.aux_coeff}};
    o->n_experts_list = 1;
    o->model.n_kv_heads = 0; /* num-attention-heads */
    o->keep_last = 3;
    o->mg_tp = o->mg_pp = 1;
    o->max_new_tokens = 200;
    o->temperature = 0.8f;
    o->top_p = 1.0f;
    o->log_interval = 1;
    o->tokens = 1024;
    o->iters = 10;
    o->ceiling_n = 2048;
    o->ep = 1;
}

/* ------------------------------------------------------------------ names */

/* Canonical spelling of a name: lower case, '_' -> '-'. */
static void canon(char *dst, size_t cap, const char *src, size_t n) {
    size_t i = 0;
    for (; i < n && i + 1 < cap && src[i]; i++)
        dst[i] = src[i] == '_' ? '-' : (char)tolower((unsigned char)src[i]);
    dst[i] = '\0';
}

/* The next word of a space-separated list *list (NULL: none), its length in *n; NULL at the
 * end. */
static const char *next_word(const char **list, size_t *n) {
    const char *a = *list;
    while (a && *a == ' ') a++;
    if (!a || !*a) return NULL;
    *n = strcspn(a, " ");
    *list = a + *n;
    return a;
}

/* Whether word (n characters) is option i's own name. */
static int is_name(int i, const char *word, size_t n) {
    return strlen(opts[i].name) == n && !strncmp(word, opts[i].name, n);
}

/* Calls fn(option index, name) for the name and each alias of every option until it
 * returns non-zero. */
static int each_name(int (*fn)(int, const char *, void *), void *ctx) {
    char name[128];
    for (int i = 0; i < N_OPTS; i++) {
        if (fn(i, opts[i].name, ctx)) return 1;
        const char *list = opts[i].aliases, *a;
        size_t n;
        while ((a = next_word(&list, &n))) {
            canon(name, sizeof name, a, n);
            if (fn(i, name, ctx)) return 1;
        }
    }
    return 0;
}

typedef struct {
    const char *key;
    int found;
} find_ctx;

static int match_name(int i, const char *name, void *p) {
    find_ctx *c = p;
    if (strcmp(name, c->key)) return 0;
    c->found = i;
    return 1;
}

static int find_option(const char *key) {
    char k[128];
    canon(k, sizeof k, key, strlen(key));
    find_ctx c = {k, -1};
    each_name(match_name, &c);
    return c.found;
}

static int edit_distance(const char *a, const char *b) {
    int la = (int)strlen(a), lb = (int)strlen(b);
    if (la > 127 || lb > 127) return 1000;
    int row[128];
    for (int j = 0; j <= lb; j++) row[j] = j;
    for (int i = 1; i <= la; i++) {
        int diag = row[0];
        row[0] = i;
        for (int j = 1; j <= lb; j++) {
            int up = row[j];
            int sub = diag + (a[i - 1] != b[j - 1]);
            int best = up + 1 < row[j - 1] + 1 ? up + 1 : row[j - 1] + 1;
            row[j] = sub < best ? sub : best;
            diag = up;
        }
    }
    return row[lb];
}

typedef struct {
    const char *key;
    int best, best_dist;
} near_ctx;

static int nearest_name(int i, const char *name, void *p) {
    near_ctx *c = p;
    int dist = edit_distance(c->key, name);
    if (dist < c->best_dist) {
        c->best_dist = dist;
        c->best = i;
    }
    return 0;
}

/* The option whose name or alias is closest to key, if close enough to be a typo; else -1. */
static int suggest_option(const char *key) {
    char k[128];
    canon(k, sizeof k, key, strlen(key));
    near_ctx c = {k, -1, 1000};
    each_name(nearest_name, &c);
    int limit = (int)strlen(k) / 3 > 2 ? (int)strlen(k) / 3 : 2;
    return c.best_dist <= limit ? c.best : -1;
}

/* ----------------------------------------------------------------- values */

static int parse_bool(const char *v, int *out) {
    static const char *const yes[] = {"1", "true", "yes", "on"}, *const no[] = {"0", "false", "no",
                                                                             "off"};
    for (int i = 0; i < 4; i++) {
        if (!strcasecmp(v, yes[i])) return *out = 1, 1; /* True, YES: as the enums */
        if (!strcasecmp(v, no[i])) return *out = 0, 1;
    }
    return 0;
}

static void choice_list(char *buf, size_t cap, const opt_choice *c) {
    buf[0] = '\0';
    for (; c->name; c++) {
        size_t n = strlen(buf);
        snprintf(buf + n, cap - n, "%s%s", n ? "|" : "", c->name);
    }
}

/* A float as the shortest text that reads back as the same float; a choice by its name. */
static void format_float(char *buf, size_t cap, float v) {
    for (int digits = 6; digits <= 9; digits++) {
        snprintf(buf, cap, "%.*g", digits, v);
        if (strtof(buf, NULL) == v) break;
    }
}

static void format_choice(char *buf, size_t cap, const opt_choice *choices, int v) {
    for (const opt_choice *c = choices; c->name; c++)
        if (c->value == v) {
            snprintf(buf, cap, "%s", c->name);
            return;
        }
    snprintf(buf, cap, "%d", v);
}

/* "8" sets the experts of every MoE layer; "4,4,8,8" (or "4 4 8 8", DeepSpeed's words) one
 * count per layer or per MoE layer (0 = dense): finish tells which by the count. */
static moe_status set_experts(moe_options *o, const opt_def *d, const char *v, const char *where) {
    int vals[MOE_MAX_LAYERS], n = 0;
    const char *s = v + strspn(v, " \t");
    for (;;) {
        char *end;
        errno = 0;
        long x = strtol(s, &end, 10);
        size_t gap = strspn(end, " \t");
        if (end == s || errno || (end[gap] && end[gap] != ',' && !gap))
            return moe_set_error(MOE_ERR_INVALID, "%s: expected an integer or a list of them "
                                 "(commas or blanks), got '%s'", where, v);
        if (x < d->lo || x > d->hi)
            return moe_set_error(MOE_ERR_INVALID, "%s: %ld is out of range [%.0f, %.0f]", where,
                                 x, d->lo, d->hi);
        if (n == MOE_MAX_LAYERS)
            return moe_set_error(MOE_ERR_INVALID, "%s: more than %d values", where, MOE_MAX_LAYERS);
        vals[n++] = (int)x;
        end += gap;
        if (!*end) break;
        s = end + (*end == ',');
        s += strspn(s, " \t");
    }
    if (n == 1 && vals[0] == 0)
        return moe_set_error(MOE_ERR_INVALID, "%s: must be >= 1 (a list may hold 0 for a dense "
                             "layer)", where);
    memset(o->model.n_experts, 0, sizeof o->model.n_experts);
    int first = 0;
    for (int i = 0; i < n; i++) {
        if (n > 1) o->model.n_experts[i] = vals[i] ? vals[i] : MOE_LAYER_DENSE;
        if (!first) first = vals[i];
    }
    o->layer.n_experts = first ? first : 1;
    o->n_experts_list = n;
    return MOE_OK;
}

static moe_status set_value(moe_options *o, const opt_def *d, const char *v, const char *where);

/* Megatron's layer pattern, a Python expression of lists and counts: "[1,1,0,1]",
 * "([0]+[1]*23)", "([1]*3+[0]*1)*3". A value is a list or a count: + joins two lists or adds
 * two counts, * repeats a list by a count (either side) or multiplies counts, and a list's
 * elements are counts. Blanks are skipped; nesting is bounded (fuzzed input). */
typedef struct {
    int is_list;
    int n;                          /* the list's length */
    long count;                     /* a count's value */
    unsigned char v[MOE_MAX_LAYERS]; /* the list, each element 0 or 1 */
} pattern_value;

typedef struct {
    const char *s;
    const char *err;
} pattern_reader;

#define PATTERN_COUNT_MAX 1000000L
#define PATTERN_DEPTH_MAX 32
#define PATTERN_STR(x) #x
#define PATTERN_LIMIT(x) "longer than " PATTERN_STR(x) " layers"
#define PATTERN_TOO_LONG PATTERN_LIMIT(MOE_MAX_LAYERS)

static int pattern_sum(pattern_reader *r, pattern_value *out, int depth);

static int pattern_fail(pattern_reader *r, const char *why) {
    if (!r->err) r->err = why;
    return 0;
}

static char pattern_peek(pattern_reader *r) {
    r->s += strspn(r->s, " \t");
    return *r->s;
}

/* [sum, sum, ...], (sum) or a count */
static int pattern_atom(pattern_reader *r, pattern_value *out, int depth) {
    char c = pattern_peek(r);
    if (depth > PATTERN_DEPTH_MAX) return pattern_fail(r, "nested too deeply");
    if (c == '(') {
        r->s++;
        if (!pattern_sum(r, out, depth + 1)) return 0;
        if (pattern_peek(r) != ')') return pattern_fail(r, "expected ')'");
        r->s++;
        return 1;
    }
    if (c == '[') {
        r->s++;
        *out = (pattern_value){.is_list = 1};
        while (pattern_peek(r) != ']') {
            pattern_value e;
            if (!pattern_sum(r, &e, depth + 1)) return 0;
            if (e.is_list || (e.count != 0 && e.count != 1))
                return pattern_fail(r, "a list holds 1 (an MoE layer) and 0 (a dense layer)");
            if (out->n == MOE_MAX_LAYERS) return pattern_fail(r, PATTERN_TOO_LONG);
            out->v[out->n++] = (unsigned char)e.count;
            if (pattern_peek(r) == ',') r->s++;
            else if (pattern_peek(r) != ']') return pattern_fail(r, "expected ',' or ']'");
        }
        r->s++;
        return 1;
    }
    if (!isdigit((unsigned char)c)) return pattern_fail(r, "expected '[', '(' or a number");
    char *end;
    errno = 0;
    long x = strtol(r->s, &end, 10);
    if (errno || x > PATTERN_COUNT_MAX) return pattern_fail(r, "a number too large");
    r->s = end;
    *out = (pattern_value){.count = x};
    return 1;
}

/* out = out * b: a list repeated, or counts multiplied */
static int pattern_times(pattern_reader *r, pattern_value *out, pattern_value *b) {
    if (out->is_list && b->is_list) return pattern_fail(r, "a list times a list");
    if (!out->is_list && !b->is_list) {
        if (out->count && b->count > PATTERN_COUNT_MAX / out->count)
            return pattern_fail(r, "a number too large");
        out->count *= b->count;
        return 1;
    }
    pattern_value *list = out->is_list ? out : b;
    long times = out->is_list ? b->count : out->count;
    if (list->n && times > MOE_MAX_LAYERS / list->n) return pattern_fail(r, PATTERN_TOO_LONG);
    for (long t = 1; t < times; t++) memcpy(list->v + t * list->n, list->v, (size_t)list->n);
    list->n = (int)(list->n * times);
    if (list != out) *out = *list;
    return 1;
}

/* out = out + b: lists joined, or counts added */
static int pattern_plus(pattern_reader *r, pattern_value *out, const pattern_value *b) {
    if (out->is_list != b->is_list) return pattern_fail(r, "a list plus a number");
    if (!out->is_list) {
        if (out->count + b->count > PATTERN_COUNT_MAX) return pattern_fail(r, "a number too large");
        out->count += b->count;
        return 1;
    }
    if (out->n + b->n > MOE_MAX_LAYERS) return pattern_fail(r, PATTERN_TOO_LONG);
    memcpy(out->v + out->n, b->v, (size_t)b->n);
    out->n += b->n;
    return 1;
}

/* operand op operand op ...: sums of products ('+'), products of atoms ('*') */
static int pattern_chain(pattern_reader *r, pattern_value *out, int depth, char op) {
    pattern_value b;
    if (!(op == '+' ? pattern_chain(r, out, depth, '*') : pattern_atom(r, out, depth))) return 0;
    while (pattern_peek(r) == op) {
        r->s++;
        if (!(op == '+' ? pattern_chain(r, &b, depth, '*') : pattern_atom(r, &b, depth)))
            return 0;
        if (!(op == '+' ? pattern_plus(r, out, &b) : pattern_times(r, out, &b))) return 0;
    }
    return 1;
}

static int pattern_sum(pattern_reader *r, pattern_value *out, int depth) {
    return pattern_chain(r, out, depth, '+');
}

/* moe-layer-freq: a number N (layer l is MoE if l % N == 0), or a pattern (it holds a '[', as
 * Megatron's moe_freq_type tells them apart), quoted or not, one value per layer. */
static moe_status set_layer_freq(moe_options *o, const opt_def *d, const char *v,
                                 const char *where) {
    if (!strchr(v, '[')) {
        opt_def number = *d;
        number.type = OPT_INT;
        MOE_TRY(set_value(o, &number, v, where));
        o->freq_pattern_n = 0;
        return MOE_OK;
    }
    char text[2048];
    size_t n = strlen(v);
    if (n >= sizeof text)
        return moe_set_error(MOE_ERR_INVALID, "%s: a pattern of at most %d characters", where,
                             (int)sizeof text - 1);
    memcpy(text, v, n + 1);
    if (n >= 2 && (text[0] == '\'' || text[0] == '"') && text[n - 1] == text[0])
        text[n - 1] = '\0', memmove(text, text + 1, n - 1); /* '([1]*48)', as shells pass it */
    pattern_value pv;
    pattern_reader r = {text, NULL};
    if (pattern_sum(&r, &pv, 0) && pattern_peek(&r) && !r.err) r.err = "unexpected text at the end";
    if (!r.err && (!pv.is_list || !pv.n)) r.err = "the pattern must be a list of layers";
    if (r.err)
        return moe_set_error(MOE_ERR_INVALID, "%s: '%s' is not a layer pattern (%s, %s%.20s%s): "
                             "give a number, or 1 (MoE) and 0 (dense) per layer, as [1,0,1,0] or "
                             "([1]*3+[0])*2", where, v, r.err, *r.s ? "before '" : "at the end",
                             r.s, *r.s ? "'" : "");
    memcpy(o->freq_pattern, pv.v, (size_t)pv.n);
    o->freq_pattern_n = pv.n;
    o->model.moe_layer_freq = 1;
    return MOE_OK;
}

static moe_status parse_float(const opt_def *d, const char *v, const char *where, float *out) {
    char *end;
    errno = 0;
    double x = strtod(v, &end);
    int under = errno == ERANGE && fabs(x) <= DBL_MIN; /* 1e-400: 0 or a subnormal double */
    if (!*v || *end || (errno == ERANGE && !under) || !isfinite(x) || fabs(x) > FLT_MAX)
        return moe_set_error(MOE_ERR_INVALID, "%s: expected a finite number, got '%s'", where, v);
    if (x != d->lo && d->lo == d->hi)
        return moe_set_error(MOE_ERR_INVALID, "%s: only %g is supported (%s)", where, d->lo,
                             d->help);
    if (x < d->lo || x > d->hi)
        return moe_set_error(MOE_ERR_INVALID, "%s: %g is out of range [%g, %g]", where, x, d->lo,
                             d->hi);
    /* a nonzero value that would become 0, or a float without full precision (subnormal) */
    if (under || (x != 0 && fabs(x) < FLT_MIN))
        return moe_set_error(MOE_ERR_INVALID, "%s: %s is too close to 0 for a float: give 0 or a "
                             "value of magnitude at least %g (range [%g, %g])", where, v, FLT_MIN,
                             d->lo, d->hi);
    *out = (float)x;
    return MOE_OK;
}

static moe_status parse_enum(const opt_def *d, const char *v, const char *where, int *out) {
    char cv[64];
    canon(cv, sizeof cv, v, strlen(v));
    for (const opt_choice *c = d->choices; c->name; c++) {
        char cn[64];
        canon(cn, sizeof cn, c->name, strlen(c->name));
        if (!strcmp(cv, cn)) return *out = c->value, MOE_OK;
    }
    int b;
    if (d->choices == norm_choices && parse_bool(v, &b)) /* on/off, 1/0 */
        return *out = b ? MOE_NORM_ON : MOE_NORM_OFF, MOE_OK;
    char list[256];
    choice_list(list, sizeof list, d->choices);
    return moe_set_error(MOE_ERR_INVALID, "%s: '%s' is not one of %s", where, v, list);
}

/* A list option's words (separated by blanks or commas) into the list at p: ints or floats. */
static moe_status set_list(const opt_def *d, const char *v, const char *where, char *p) {
    moe_opt_ints *ints = (moe_opt_ints *)(void *)p;
    moe_opt_floats *floats = (moe_opt_floats *)(void *)p;
    int n = 0;
    if (d->type == OPT_ENUM_LIST) *ints = (moe_opt_ints){0};
    else *floats = (moe_opt_floats){0};
    for (const char *s = v;;) {
        s += strspn(s, " \t,");
        if (!*s) break;
        size_t len = strcspn(s, " \t,");
        char word[64];
        if (len >= sizeof word || n == MOE_OPT_LIST_MAX)
            return moe_set_error(MOE_ERR_INVALID, "%s: at most %d values of at most %d "
                                 "characters, got '%s'", where, MOE_OPT_LIST_MAX,
                                 (int)sizeof word - 1, v);
        memcpy(word, s, len);
        word[len] = '\0';
        if (d->type == OPT_ENUM_LIST) MOE_TRY(parse_enum(d, word, where, &ints->v[n]));
        else MOE_TRY(parse_float(d, word, where, &floats->v[n]));
        n++, s += len;
    }
    if (!n) return moe_set_error(MOE_ERR_INVALID, "%s: expected a value, got '%s'", where, v);
    if (d->type == OPT_ENUM_LIST) ints->n = n;
    else floats->n = n;
    return MOE_OK;
}

static moe_status set_value(moe_options *o, const opt_def *d, const char *v, const char *where) {
    char *p = (char *)o + d->offset;
    char *end;
    errno = 0;
    switch (d->type) {
    case OPT_INT: {
        long x = strtol(v, &end, 10);
        if (!*v || *end || errno)
            return moe_set_error(MOE_ERR_INVALID, "%s: expected an integer, got '%s'", where, v);
        if (x != d->lo && d->lo == d->hi) /* a flag of Megatron's for what moe.c always does */
            return moe_set_error(MOE_ERR_INVALID, "%s: only %.0f is supported (%s)", where,
                                 d->lo, d->help);
        if (x < d->lo || x > d->hi)
            return moe_set_error(MOE_ERR_INVALID, "%s: %ld is out of range [%.0f, %.0f]", where, x,
                                 d->lo, d->hi);
        *(int *)p = (int)x;
        return MOE_OK;
    }
    case OPT_U64: {
        unsigned long long x = strtoull(v, &end, 10);
        if (!isdigit((unsigned char)*v) || *end || errno) /* strtoull takes " -1" as 2^64 - 1 */
            return moe_set_error(MOE_ERR_INVALID, "%s: expected a non-negative integer, got '%s'",
                                 where, v);
        *(uint64_t *)p = (uint64_t)x;
        return MOE_OK;
    }
    case OPT_FLOAT: return parse_float(d, v, where, (float *)(void *)p);
    case OPT_BOOL:
        if (!parse_bool(v, (int *)p))
            return moe_set_error(MOE_ERR_INVALID, "%s: expected true or false, got '%s'", where, v);
        return MOE_OK;
    case OPT_ENUM: return parse_enum(d, v, where, (int *)(void *)p);
    case OPT_STRING:
        if (strlen(v) >= MOE_PATH_MAX)
            return moe_set_error(MOE_ERR_INVALID, "%s: longer than %d characters%s", where,
                                 MOE_PATH_MAX - 1, d->offset == O(prompt) ? " (a longer prompt "
                                 "goes in a file: --prompt-file FILE)" : "");
        /* a setting is written back as one 'key = value' line (checkpoints keep them), quoted
         * in the quote character it does not hold */
        if (d->transient != 1 && (strpbrk(v, "\r\n") || (strchr(v, '"') && strchr(v, '\''))))
            return moe_set_error(MOE_ERR_INVALID, "%s: a line break, or both quote characters, "
                                 "cannot be written to a config file", where);
        memcpy(p, v, strlen(v) + 1);
        return MOE_OK;
    case OPT_EXPERTS: return set_experts(o, d, v, where);
    case OPT_LAYER_FREQ: return set_layer_freq(o, d, v, where);
    case OPT_ENUM_LIST:
    case OPT_FLOAT_LIST: return set_list(d, v, where, p);
    }
    return MOE_ERR_INVALID;
}

/* Megatron's flags for what moe.c does elsewhere or not at all: the unknown option's message
 * says which. */
static const char *const foreign[][2] = {
    {"bf16", "the whole model in bf16 is not implemented; moe-expert-bf16 runs the expert GEMMs "
             "in bf16 (fp32 master weights)"},
    {"fp16", "fp16 training is not implemented; moe-expert-bf16 runs the expert GEMMs in bf16"},
    {"tokenizer-type", "the data is tokenized by moe prepare: moe prepare --model DIR uses that "
                       "model's tokenizer.json"},
    {"tokenizer-model", "the data is tokenized by moe prepare: moe prepare --model DIR uses that "
                        "model's tokenizer.json"},
    {"split", "moe prepare splits the data: --val-fraction"},
    {"wandb-project", "metrics go to RUN/metrics.jsonl and TensorBoard event files"},
    {"wandb-exp-name", "metrics go to RUN/metrics.jsonl and TensorBoard event files"},
};

static moe_status unknown_key(const char *where, const char *key, const char *dashes) {
    char ck[128], cf[128];
    canon(ck, sizeof ck, key, strlen(key));
    for (size_t f = 0; f < sizeof foreign / sizeof foreign[0]; f++) {
        canon(cf, sizeof cf, foreign[f][0], strlen(foreign[f][0]));
        if (!strcmp(ck, cf))
            return moe_set_error(MOE_ERR_INVALID, "%s: unknown option %s%s (Megatron's: %s)",
                                 where, dashes, key, foreign[f][1]);
    }
    int s = suggest_option(key);
    if (s >= 0)
        return moe_set_error(MOE_ERR_INVALID, "%s: unknown option %s%s (did you mean %s%s?)",
                             where, dashes, key, dashes, opts[s].name);
    return moe_set_error(MOE_ERR_INVALID, "%s: unknown option %s%s (see moe --help)", where,
                         dashes, key);
}

/* Option i was set: the later of two options that set the same value wins (a command line
 * over a config file or a checkpoint, or the later of two flags), as a repeated option does. */
static void mark_given(moe_options *o, int i) {
    const size_t same[][2] = {{O(aux_list), O(aux_coeff_hf)}, {L(z_coeff), O(z_coeff_hf)}};
    o->given[i] = 1;
    for (size_t p = 0; p < sizeof same / sizeof same[0]; p++)
        for (int s = 0; s < 2; s++)
            if (opts[i].offset == same[p][s])
                for (int j = 0; j < N_OPTS; j++)
                    if (opts[j].offset == same[p][!s]) o->given[j] = 0;
}

const char *moe_options_model_given(const moe_options *o) {
    for (int i = 0; i < N_OPTS; i++) {
        if (!o->given[i] || !strcmp(opts[i].name, "seq-length") || !strcmp(opts[i].name, "seed"))
            continue;
        if (opts[i].section & (MOE_SEC_MODEL | MOE_SEC_MOE)) return opts[i].name;
    }
    return NULL;
}

int moe_options_given(const moe_options *o, const char *key) {
    int i = find_option(key);
    return i >= 0 && o->given[i];
}

moe_status moe_options_set(moe_options *o, const char *key, const char *value, const char *where) {
    int i = find_option(key);
    if (i < 0) return unknown_key(where, key, "");
    MOE_TRY(set_value(o, &opts[i], value, where));
    mark_given(o, i);
    return MOE_OK;
}

/* ------------------------------------------------------------------ files */

static char *trim(char *s) {
    while (isspace((unsigned char)*s)) s++;
    size_t n = strlen(s);
    while (n && isspace((unsigned char)s[n - 1])) s[--n] = '\0';
    return s;
}

/* Ends the line at the first '#' that is not inside a quoted value. A value is quoted when it
 * starts with ' or " (moe_options_write quotes so), up to the next such character; a quote
 * later in a value is an ordinary character ("bob's-run # a comment"). */
static void cut_comment(char *line) {
    char *c = line + strcspn(line, "=#");
    if (*c == '=') {
        c++;
        while (isspace((unsigned char)*c)) c++;
        if (*c == '"' || *c == '\'') {
            char *close = strchr(c + 1, *c);
            if (!close) return; /* unclosed: the rest of the line is the value */
            c = close + 1;
        }
    }
    char *hash = strchr(c, '#');
    if (hash) *hash = '\0';
}

/* Reads 'key = value' lines from f; `path` names the source in messages. */
static moe_status load_stream(moe_options *o, FILE *f, const char *path) {
    char *line = NULL, where[600];
    size_t cap = 0;
    moe_status st = MOE_OK;
    int lineno = 0, line_of[N_OPTS]; /* where each option was set (0: not in this file) */
    memset(line_of, 0, sizeof line_of);
    ssize_t n;
    while (st == MOE_OK && (n = getline(&line, &cap, f)) >= 0) {
        lineno++;
        snprintf(where, sizeof where, "%.500s:%d", path, lineno);
        if ((size_t)n != strlen(line)) {
            st = moe_set_error(MOE_ERR_FORMAT, "%s: NUL byte in a config file line", where);
            break;
        }
        cut_comment(line);
        char *s = trim(line);
        if (!*s) continue;
        char *eq = strchr(s, '=');
        if (!eq) {
            st = moe_set_error(MOE_ERR_FORMAT, "%s: expected 'key = value', got '%.80s'", where, s);
            break;
        }
        *eq = '\0';
        char *key = trim(s), *val = trim(eq + 1);
        if (!*key || !*val) {
            st = moe_set_error(MOE_ERR_FORMAT, "%s: empty %s", where, *key ? "value" : "key");
            break;
        }
        size_t vn = strlen(val);
        if (vn >= 2 && (val[0] == '"' || val[0] == '\'') && val[vn - 1] == val[0]) {
            val[vn - 1] = '\0'; /* "" is an empty string */
            val++;
        }
        int i = find_option(key); /* twice (or by an alias too): which one was meant? */
        if (i >= 0 && line_of[i])
            st = moe_set_error(MOE_ERR_INVALID, "%s: %s is set again (first at line %d)", where,
                               opts[i].name, line_of[i]);
        else if (i >= 0)
            line_of[i] = lineno;
        if (st == MOE_OK) st = moe_options_set(o, key, val, where);
    }
    if (st == MOE_OK && ferror(f))
        st = moe_set_error(MOE_ERR_IO, "error reading config file %s: %s", path, strerror(errno));
    free(line);
    return st;
}

moe_status moe_options_load_file(moe_options *o, const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) return moe_set_error(MOE_ERR_IO, "cannot open config file %s: %s", path, strerror(errno));
    moe_status st = load_stream(o, f, path);
    fclose(f);
    return st;
}

moe_status moe_options_load_text(moe_options *o, const char *text, const char *where) {
    FILE *f = fmemopen((void *)text, strlen(text), "r");
    if (!f) return moe_set_error(MOE_ERR_NOMEM, "cannot read the options of %s", where);
    moe_status st = load_stream(o, f, where);
    fclose(f);
    return st;
}

char *moe_options_to_text(const moe_options *o) {
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    if (!f) return NULL;
    moe_options_write(f, o);
    fclose(f);
    return text;
}

/* ------------------------------------------------------------------- argv */

/* Option i is one that `use` names on its own (not through its section). */
static int uses_alone(const moe_options_use *use, int i) {
    const char *list = use->options, *a;
    size_t n;
    while ((a = next_word(&list, &n)))
        if (is_name(i, a, n)) return 1;
    return 0;
}

static int uses(const moe_options_use *use, int i) {
    return !use || (use->sections & opts[i].section) || uses_alone(use, i);
}

/* The flag at argv[*a]: its name as given into key (cap bytes), its value into *val (NULL: a
 * boolean alone), *a moved onto its last word. Returns the option's index, -1 for --config, or
 * -2 with the error set. */
/* The flag at argv[*a] (moved past its value): the option's index, -1 for --config, -2 for an
 * error; *val its value (NULL for a bare boolean). Megatron's --data-path takes a blend as
 * separate words ("--data-path 0.3 A 0.7 B"): its words up to the next flag, *words past the
 * first; so does a list option (Megatron's nargs='+'). */
static int next_flag(int argc, char **argv, int *a, char *key, size_t cap, const char **val,
                     int *words) {
    const char *arg = argv[*a];
    if (strncmp(arg, "--", 2) || !arg[2])
        return moe_set_error(MOE_ERR_INVALID, "unexpected argument '%s'", arg), -2;
    const char *eq = strchr(arg + 2, '=');
    size_t kn = eq ? (size_t)(eq - arg - 2) : strlen(arg + 2);
    if (kn >= cap) return moe_set_error(MOE_ERR_INVALID, "unknown option %.60s...", arg), -2;
    memcpy(key, arg + 2, kn);
    key[kn] = '\0';
    char ck[128];
    canon(ck, sizeof ck, key, kn);
    int is_config = !strcmp(ck, "config");
    int i = is_config ? -1 : find_option(key);
    if (!is_config && i < 0) return unknown_key("command line", key, "--"), -2;
    *val = eq ? eq + 1 : NULL;
    *words = 0;
    if (!*val && (is_config || opts[i].type != OPT_BOOL)) {
        if (*a + 1 >= argc) return moe_set_error(MOE_ERR_INVALID, "--%s needs a value", key), -2;
        *val = argv[++*a];
        while (!is_config && *a + 1 < argc && strncmp(argv[*a + 1], "--", 2) &&
               (opts[i].offset == O(data_path) || opts[i].type == OPT_ENUM_LIST ||
                opts[i].type == OPT_FLOAT_LIST || opts[i].type == OPT_EXPERTS))
            ++*a, ++*words;
    }
    return i;
}

moe_status moe_options_parse_args(moe_options *o, int argc, char **argv,
                                  const moe_options_use *use) {
    for (int pass = 0; pass < 2; pass++) { /* pass 0: --config files; pass 1: the flags */
        for (int a = 0; a < argc; a++) {
            char key[128], joined[MOE_PATH_MAX];
            const char *val;
            if (a && strncmp(argv[a], "--", 2) &&
                (!strncmp(argv[a - 1], "--data-path=", 12) || !strncmp(argv[a - 1], "--data=", 7)))
                return moe_set_error(MOE_ERR_INVALID, "unexpected argument '%s' (a blend after "
                                     "%.*s= is one quoted value, or its words follow --data-path)",
                                     argv[a], (int)(strchr(argv[a - 1], '=') - argv[a - 1]),
                                     argv[a - 1]);
            int words, i = next_flag(argc, argv, &a, key, sizeof key, &val, &words);
            if (i == -2) return MOE_ERR_INVALID;
            if (words) { /* the value's words (val is the first), one string */
                int n = 0;
                for (int w = a - words; w <= a && n < MOE_PATH_MAX; w++)
                    n += snprintf(joined + n, MOE_PATH_MAX - (size_t)n, "%s%s",
                                  w > a - words ? " " : "", argv[w]);
                if (n >= MOE_PATH_MAX)
                    return moe_set_error(MOE_ERR_INVALID, "--%s: longer than %d characters",
                                         key, MOE_PATH_MAX - 1);
                val = joined;
            }
            if (pass == 0 && i < 0) MOE_TRY(moe_options_load_file(o, val));
            if (pass == 1 && i >= 0 && !uses(use, i))
                return moe_set_error(MOE_ERR_INVALID, "--%s is not used by this command", key);
            if (pass == 1 && i >= 0) {
                char where[160];
                snprintf(where, sizeof where, "--%s", key);
                MOE_TRY(set_value(o, &opts[i], val ? val : "true", where));
                mark_given(o, i);
            }
        }
    }
    return MOE_OK;
}

const char *moe_options_flag(int argc, char **argv, const char *names, char *buf, size_t cap) {
    for (int a = 0; a < argc && cap > 3; a++) {
        const char *val, *list = names, *w;
        size_t n;
        int words, i = next_flag(argc, argv, &a, buf + 2, cap - 2, &val, &words);
        if (i == -2) return NULL; /* moe_options_parse_args says what is wrong */
        while (i >= 0 && (w = next_word(&list, &n)))
            if (is_name(i, w, n)) return memcpy(buf, "--", 2);
    }
    return NULL;
}

/* ---------------------------------------------------------------- resolve */

static int given(const moe_options *o, size_t offset) {
    for (int i = 0; i < N_OPTS; i++)
        if (opts[i].offset == offset) return o->given[i];
    return 0;
}

/* moe-router-load-balancing-type and moe-aux-loss-coeff into the layer: one type and its
 * coefficient, or Megatron's list of aux losses (aux_loss, seq_aux_loss, global_aux_loss, each
 * once) and one coefficient per type, the first as lb_type and the others in aux_coeff_also. */
static moe_status set_balancing(moe_options *o) {
    moe_layer_config *c = &o->layer;
    const moe_opt_ints *t = &o->lb_list;
    const moe_opt_floats *k = &o->aux_list;
    char name[64];
    memset(c->aux_coeff_also, 0, sizeof c->aux_coeff_also);
    c->aux_coeff = k->v[0];
    int first = t->v[0];
    if (given(o, O(aux_coeff_hf)) && t->n > 1)
        return moe_set_error(MOE_ERR_INVALID, "router-aux-loss-coef is one coefficient: a list "
                             "of load-balancing types takes moe-aux-loss-coeff, one per type");
    if (t->n > 1 || k->n > 1) {
        if (k->n != t->n)
            return moe_set_error(MOE_ERR_INVALID, "moe-router-load-balancing-type gives %d "
                                 "type%s and moe-aux-loss-coeff %d coefficient%s: give one per "
                                 "type", t->n, t->n > 1 ? "s" : "", k->n, k->n > 1 ? "s" : "");
        for (int i = 0; i < t->n; i++) {
            format_choice(name, sizeof name, lb_choices, t->v[i]);
            if (t->v[i] != MOE_LB_AUX && t->v[i] != MOE_LB_SEQ_AUX && t->v[i] != MOE_LB_GLOBAL_AUX)
                return moe_set_error(MOE_ERR_INVALID, "moe-router-load-balancing-type: a list "
                                     "takes aux_loss, seq_aux_loss and global_aux_loss, not %s",
                                     name);
            for (int j = 0; j < i; j++)
                if (t->v[j] == t->v[i])
                    return moe_set_error(MOE_ERR_INVALID, "moe-router-load-balancing-type lists "
                                         "%s twice", name);
            if (i) c->aux_coeff_also[t->v[i]] = k->v[i];
        }
    }
    if (first == MOE_LB_CHOICE_SINKHORN) {
        if (given(o, L(router)) && c->router != MOE_ROUTER_SINKHORN)
            return moe_set_error(MOE_ERR_INVALID,
                                 "moe-router-load-balancing-type sinkhorn selects the Sinkhorn "
                                 "router, but moe-router-type is %s",
                                 router_choices[c->router].name);
        c->router = MOE_ROUTER_SINKHORN;
        c->lb_type = MOE_LB_AUX; /* dropped below, or named by validation with a coefficient */
    } else if (first == MOE_LB_CHOICE_QB) {
        /* no loss; a coefficient given is named by validation */
        c->lb_type = c->aux_coeff == 0 ? MOE_LB_NONE : MOE_LB_AUX;
    } else {
        c->lb_type = (moe_lb_type)first;
    }
    c->quantile_balancing = first == MOE_LB_CHOICE_QB;
    return MOE_OK;
}

/* Which layers are MoE layers: moe-layer-freq's pattern (or DeepSpeed's expert-interval, made
 * one) as dense layers in model.n_experts, and a num-experts list of one count per MoE layer
 * (DeepSpeed's "--num-experts 4 8 --expert-interval 2") spread over the layers. */
static moe_status set_layer_kinds(moe_options *o) {
    moe_model_config *m = &o->model;
    int layers = m->n_layers;
    if (layers < 1 || layers > MOE_MAX_LAYERS) return MOE_OK; /* the model's validation says */
    if (o->expert_interval) {
        if (o->freq_pattern_n || m->moe_layer_freq != 1)
            return moe_set_error(MOE_ERR_INVALID, "expert-interval (DeepSpeed's) and "
                                 "moe-layer-freq (Megatron's) both choose the MoE layers: give "
                                 "one");
        for (int l = 0; l < layers; l++)
            o->freq_pattern[l] = (l + 1) % o->expert_interval == 0;
        o->freq_pattern_n = layers;
        o->expert_interval = 0; /* written as the pattern */
    }
    if (o->freq_pattern_n && o->freq_pattern_n != layers)
        return moe_set_error(MOE_ERR_INVALID, "moe-layer-freq gives a pattern of %d layers but "
                             "num-layers is %d", o->freq_pattern_n, layers);
    /* the MoE layers by the layer options alone, whatever num-experts lists */
    unsigned char is_moe[MOE_MAX_LAYERS];
    int moe_layers = 0;
    moe_model_config plain = *m;
    memset(plain.n_experts, 0, sizeof plain.n_experts);
    for (int l = 0; l < layers; l++) {
        is_moe[l] = moe_model_layer_experts(&plain, l) > 0 &&
                    (!o->freq_pattern_n || o->freq_pattern[l]);
        moe_layers += is_moe[l];
    }
    int n = o->n_experts_list;
    if (n > 1 && n != layers) {
        if (n != moe_layers)
            return moe_set_error(MOE_ERR_INVALID, "num-experts lists %d values: give one per "
                                 "layer (num-layers %d) or one per MoE layer (%d)", n, layers,
                                 moe_layers);
        int vals[MOE_MAX_LAYERS];
        memcpy(vals, m->n_experts, (size_t)n * sizeof *vals);
        for (int l = 0, j = 0; l < layers; l++)
            m->n_experts[l] = is_moe[l] ? vals[j++] : MOE_LAYER_DENSE;
        o->n_experts_list = layers;
    }
    for (int l = 0; l < o->freq_pattern_n; l++) {
        if (o->freq_pattern[l]) continue;
        if (m->n_experts[l] > 0)
            return moe_set_error(MOE_ERR_INVALID, "num-experts lists %d experts for layer %d, "
                                 "which moe-layer-freq makes dense (list 0 there)",
                                 m->n_experts[l], l);
        m->n_experts[l] = MOE_LAYER_DENSE;
    }
    return MOE_OK;
}

moe_status moe_options_finish(moe_options *o, int parts) {
    moe_layer_config *c = &o->layer;
    c->d = o->model.d;
    int router_given = given(o, L(router));
    MOE_TRY(set_balancing(o));
    if (parts & MOE_OPTIONS_MODEL) MOE_TRY(set_layer_kinds(o));
    if (!o->model.n_kv_heads) o->model.n_kv_heads = o->mg_gqa ? 1 : o->model.n_heads;
    /* Megatron's --swiglu and --disable-bias-linear: what moe.c does unless told otherwise */
    if (given(o, O(mg_swiglu)) && o->mg_swiglu && c->act != MOE_ACT_SWIGLU) {
        if (given(o, L(act)))
            return moe_set_error(MOE_ERR_INVALID, "swiglu conflicts with moe-activation %s",
                                 act_choices[c->act].name);
        c->act = MOE_ACT_SWIGLU; /* over a checkpoint's or config.json's */
    }
    if (given(o, O(mg_no_bias)) && o->mg_no_bias && c->expert_bias) {
        if (given(o, L(expert_bias)))
            return moe_set_error(MOE_ERR_INVALID, "disable-bias-linear conflicts with "
                                 "moe-expert-linear-bias true");
        c->expert_bias = 0;
    }
    /* DeepSpeed's noisy_gate_policy: its jitter, or the sampled first choice */
    if (o->noisy_gate == 1 && c->jitter_eps != 0.01f) {
        if (given(o, L(jitter_eps)))
            return moe_set_error(MOE_ERR_INVALID, "moe-noisy-gate-policy Jitter is "
                                 "moe-input-jitter-eps 0.01, but it is %g", c->jitter_eps);
        c->jitter_eps = 0.01f;
        o->jitter_implied = 1; /* the policy's, not written: another policy later drops it */
    }
    c->sample_first = o->noisy_gate == 2;
    if (o->force_lb) {
        if ((router_given && c->router != MOE_ROUTER_FAKE_BALANCED) ||
            o->lb_list.v[0] == MOE_LB_CHOICE_SINKHORN)
            return moe_set_error(MOE_ERR_INVALID,
                                 "moe-router-force-load-balancing conflicts with the %s router",
                                 router_choices[c->router].name);
        c->router = MOE_ROUTER_FAKE_BALANCED;
    }
    if (given(o, O(aux_coeff_hf)) && o->lb_list.v[0] == MOE_LB_LOAD_IMPORTANCE)
        return moe_set_error(MOE_ERR_INVALID, "router-aux-loss-coef is Hugging Face's coefficient "
                             "of its aux loss; load_importance takes moe-aux-loss-coeff");

    if (given(o, O(aux_coeff_hf)) || given(o, O(z_coeff_hf))) {
        int n_moe = 0; /* Hugging Face: one loss over every MoE layer's tokens, ours adds them */
        moe_model_config m = o->model;
        m.moe = *c;
        for (int l = 0; (parts & MOE_OPTIONS_MODEL) && l < m.n_layers; l++)
            n_moe += moe_model_layer_experts(&m, l) > 0;
        float per = 1.0f / (float)(n_moe > 0 ? n_moe : 1);
        if (given(o, O(aux_coeff_hf))) { /* written as moe-aux-loss-coeff */
            c->aux_coeff = o->aux_coeff_hf * (float)c->topk * per;
            o->aux_list = (moe_opt_floats){1, {c->aux_coeff}};
        }
        if (given(o, O(z_coeff_hf))) c->z_coeff = o->z_coeff_hf * per;
    }
    /* Megatron's position table: with RoPE only a bound (a script gives both, the training
     * length in seq-length); alone, a Hugging Face config's context as the sequence length */
    if (given(o, O(max_pos)) && !given(o, M(seq_len))) o->model.seq_len = o->max_pos;
    else if (given(o, O(max_pos)) && o->max_pos < o->model.seq_len)
        return moe_set_error(MOE_ERR_INVALID, "max-position-embeddings (%d) is below seq-length "
                             "(%d)", o->max_pos, o->model.seq_len);
    /* Balancing losses apply to the learned top-k router only; the others balance by
     * construction, so the default loss type is dropped silently unless a coefficient asks
     * for it (validation then names the conflict). */
    if (c->router != MOE_ROUTER_TOPK && c->aux_coeff == 0) c->lb_type = MOE_LB_NONE;
    /* Megatron: the experts' hidden size, not given, is the dense FFN's (a Mixtral script
     * gives --ffn-hidden-size alone); a Hugging Face config.json sets both itself */
    if (!given(o, L(ffn)) && given(o, M(ffn)) && !o->init_from[0]) c->ffn = o->model.ffn;
    /* DeepSpeed's --mlp-type: its residual MLP is a copy of the expert module */
    if (given(o, O(mlp_type))) {
        if (given(o, L(residual)) && c->residual != o->mlp_type)
            return moe_set_error(MOE_ERR_INVALID, "mlp-type %s conflicts with moe-use-residual %s",
                                 mlp_type_choices[o->mlp_type].name,
                                 c->residual ? "true" : "false");
        c->residual = o->mlp_type;
        if (o->mlp_type && !given(o, L(shared_ffn)) && !given(o, O(n_shared)))
            c->shared_ffn = c->ffn;
    }
    /* NeMo Automodel's and DeepSeek's n_shared_experts: a shared expert that many experts wide */
    if (given(o, O(n_shared))) {
        long w = (long)o->n_shared * c->ffn;
        if (given(o, L(shared_ffn)) && c->shared_ffn != w)
            return moe_set_error(MOE_ERR_INVALID, "n-shared-experts %d (a shared expert of %ld) "
                                 "conflicts with moe-shared-expert-intermediate-size %d",
                                 o->n_shared, w, c->shared_ffn);
        if (w > 1000000000)
            return moe_set_error(MOE_ERR_INVALID, "n-shared-experts %d times moe-ffn-hidden-size "
                                 "%d is too large", o->n_shared, c->ffn);
        c->shared_ffn = (int)w;
    }
    /* a list of expert counts: the model's validation checks each MoE layer with its own E
     * (here c->n_experts is only the first count, 1 when every layer is dense) */
    if (!(parts & MOE_OPTIONS_MODEL) || o->n_experts_list <= 1)
        MOE_TRY(moe_layer_config_validate(c));
    o->model.moe = *c;
    o->model.tie_embeddings = !o->untie;
    o->train.seed = c->seed;
    if (parts & MOE_OPTIONS_MODEL) MOE_TRY(moe_model_config_validate(&o->model));
    if (o->two_stage && o->layer.ep_replicated)
        return moe_set_error(MOE_ERR_INVALID, "moe-hierarchical-alltoall is a form of the "
                             "alltoall token dispatcher: moe-token-dispatcher-type allgather "
                             "sends no tokens");
    if (given(o, O(node_ranks)) && !o->two_stage)
        return moe_set_error(MOE_ERR_INVALID, "ranks-per-node sets the machines of "
                             "moe-hierarchical-alltoall, which is off");
    if (parts & MOE_OPTIONS_TRAIN) MOE_TRY(moe_train_config_validate(&o->train));
    if ((parts & MOE_OPTIONS_MODEL) && (parts & MOE_OPTIONS_TRAIN))
        MOE_TRY(moe_model_config_validate_training(&o->model));
    if ((parts & MOE_OPTIONS_MODEL) && (long long)o->train.micro_batch * o->model.seq_len > 1 << 30)
        return moe_set_error(MOE_ERR_INVALID, "micro-batch-size (%d) x seq-length (%d) exceeds "
                             "2^30 tokens per micro-batch", o->train.micro_batch, o->model.seq_len);
    return MOE_OK;
}

/* ------------------------------------------------------------ write, help */

static void format_value(char *buf, size_t cap, const moe_options *o, const opt_def *d) {
    const char *p = (const char *)o + d->offset;
    switch (d->type) {
    case OPT_INT: snprintf(buf, cap, "%d", *(const int *)p); return;
    case OPT_U64: snprintf(buf, cap, "%llu", (unsigned long long)*(const uint64_t *)p); return;
    case OPT_FLOAT: format_float(buf, cap, *(const float *)p); return;
    case OPT_BOOL: snprintf(buf, cap, "%s", *(const int *)p ? "true" : "false"); return;
    case OPT_ENUM: format_choice(buf, cap, d->choices, *(const int *)p); return;
    case OPT_STRING: snprintf(buf, cap, "%s", p); return;
    case OPT_ENUM_LIST:
    case OPT_FLOAT_LIST: { /* the values separated by blanks, as Megatron's flags take them */
        const moe_opt_ints *ints = (const moe_opt_ints *)(const void *)p;
        const moe_opt_floats *floats = (const moe_opt_floats *)(const void *)p;
        int n = d->type == OPT_ENUM_LIST ? ints->n : floats->n;
        buf[0] = '\0';
        for (int i = 0; i < n; i++) {
            size_t len = strlen(buf);
            if (i && len + 1 < cap) buf[len++] = ' ', buf[len] = '\0';
            if (d->type == OPT_ENUM_LIST)
                format_choice(buf + len, cap - len, d->choices, ints->v[i]);
            else format_float(buf + len, cap - len, floats->v[i]);
        }
        return;
    }
    case OPT_LAYER_FREQ:
        if (!o->freq_pattern_n) {
            snprintf(buf, cap, "%d", *(const int *)p);
            return;
        }
        buf[0] = '\0';
        for (int i = 0; i <= o->freq_pattern_n; i++) { /* [1,0,1,0] */
            size_t n = strlen(buf);
            if (i < o->freq_pattern_n)
                snprintf(buf + n, cap - n, "%c%d", i ? ',' : '[', o->freq_pattern[i]);
            else snprintf(buf + n, cap - n, "]");
        }
        return;
    case OPT_EXPERTS:
        if (o->n_experts_list <= 1) {
            snprintf(buf, cap, "%d", *(const int *)p);
            return;
        }
        buf[0] = '\0';
        for (int i = 0; i < o->n_experts_list; i++) {
            size_t n = strlen(buf);
            int e = o->model.n_experts[i];
            snprintf(buf + n, cap - n, "%s%d", i ? "," : "", e == MOE_LAYER_DENSE ? 0 : e);
        }
        return;
    }
}

/* The settings, and with start the options of this run alone that were given. */
static void write_options(FILE *f, const moe_options *o, int start) {
    unsigned section = 0;
    for (int i = 0; i < N_OPTS; i++) {
        /* print-config: what this run was given besides, but itself (a file that reads back) */
        if (opts[i].transient && !(start && o->given[i] &&
                                   opts[i].offset != offsetof(moe_options, print_config)))
            continue;
        if (section != opts[i].section) {
            section = opts[i].section;
            fprintf(f, "%s# %s\n", i ? "\n" : "", section_name(section));
        }
        char v[2048];
        if (o->jitter_implied && opts[i].offset == L(jitter_eps)) continue; /* the policy's */
        format_value(v, sizeof v, o, &opts[i]);
        /* quoted where the reader would otherwise cut or trim it, in the quote it does not hold
         * (the reader ends a quoted value at its quote character) */
        size_t n = strlen(v);
        int quote = opts[i].type == OPT_STRING &&
                    (!n || strchr(v, '#') || isspace((unsigned char)v[0]) ||
                     isspace((unsigned char)v[n - 1]) || v[0] == '"' || v[0] == '\'');
        char q = strchr(v, '"') ? '\'' : '"';
        if (quote) fprintf(f, "%s = %c%s%c\n", opts[i].name, q, v, q);
        else fprintf(f, "%s = %s\n", opts[i].name, v);
    }
}

void moe_options_write(FILE *f, const moe_options *o) { write_options(f, o, 0); }

void moe_options_print_config(FILE *f, const moe_options *o) { write_options(f, o, 1); }

/* ", cmd" for each of the n commands that read section `section` whole (option < 0) or name
 * option `option` alone (the others in its section read it too: "too"). */
static void print_readers(FILE *f, const moe_options_use *cmds, int n, unsigned section,
                          int option) {
    int count = 0, last = 0, section_read = 0;
    for (int c = 0; c < n; c++) {
        section_read |= (cmds[c].sections & section) != 0;
        if (option < 0 ? !(cmds[c].sections & section) : !uses_alone(&cmds[c], option))
            continue;
        /* "bench layer, bench train" as "bench layer|train" */
        const char *cmd = cmds[c].command, *prev = count ? cmds[last].command : "";
        size_t word = strcspn(cmd, " ");
        if (cmd[word] && !strncmp(cmd, prev, word + 1))
            fprintf(f, "|%s", cmd + word + 1);
        else
            fprintf(f, "%s%s", count ? ", " : option < 0 ? " (read by " : "      read by ", cmd);
        count++, last = c;
    }
    if (count) fputs(option < 0 ? ")" : section_read ? " too\n" : "\n", f);
}

/* What the help calls the value of a string option that is not a path, or NULL. */
static const char *string_arg(const char *name) {
    static const char *const args[][2] = {{"ids", "LIST"}, {"inject-fault", "SPEC"},
                                          {"prompt", "TEXT"}};
    for (size_t i = 0; i < sizeof args / sizeof args[0]; i++)
        if (!strcmp(name, args[i][0])) return args[i][1];
    return NULL;
}

void moe_options_help(FILE *f, const moe_options_use *cmds, int n) {
    for (int c = 0; c < n; c++) { /* each name a command reads alone is an option's own */
        const char *list = cmds[c].options, *a;
        size_t k;
        while ((a = next_word(&list, &k))) {
            int found = 0;
            for (int i = 0; i < N_OPTS && !found; i++) found = is_name(i, a, k);
            MOE_ASSERT(found);
        }
    }
    moe_options def;
    moe_options_default(&def);
    unsigned section = 0;
    fprintf(f, "  --config FILE   read 'key = value' lines first; flags given on the command line "
               "override them\n");
    for (int i = 0; i < N_OPTS; i++) {
        const opt_def *d = &opts[i];
        if (section != d->section) {
            section = d->section;
            fprintf(f, "\n%s", section_name(section));
            print_readers(f, cmds, n, section, -1);
            fputs(":\n", f);
        }
        char arg[256], v[2048];
        static const char *const arg_names[] = {"N", "N", "X", "[BOOL]", "", "PATH", "N[,N...]",
                                                "", "X [X ...]", "N|PATTERN"};
        if (d->type == OPT_ENUM || d->type == OPT_ENUM_LIST)
            choice_list(arg, sizeof arg, d->choices);
        else
            snprintf(arg, sizeof arg, "%s", string_arg(d->name) ? string_arg(d->name)
                                                                 : arg_names[d->type]);
        if (d->type == OPT_ENUM_LIST) strcat(arg, " [...]");
        format_value(v, sizeof v, &def, d);
        if (!v[0]) snprintf(v, sizeof v, "\"\""); /* an empty string, as a config file writes it */
        fprintf(f, "  --%s %s\n      %s (default %s)\n", d->name, arg, d->help, v);
        if (d->aliases) fprintf(f, "      also: %s\n", d->aliases);
        print_readers(f, cmds, n, section, i);
    }
}
