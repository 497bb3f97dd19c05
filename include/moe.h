/* moe.h — public C API of moe.c, a Mixture-of-Experts library.
 *
 * Dimension letters: T tokens, d hidden, f expert hidden (ffn), E experts, k top-k.
 * Matrices are row-major. Every buffer comment gives its shape.
 *
 * Conventions: fallible calls return moe_status (MOE_OK = 0) and leave a message for
 * moe_last_error(). Backward calls ADD into gradient buffers; zeroing is explicit.
 * The exact semantics of every routing option are in docs/LAYER.md.
 */
#ifndef MOE_H
#define MOE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MOE_VERSION_MAJOR 0
#define MOE_VERSION_MINOR 1
#define MOE_VERSION_PATCH 0

/* ---------------------------------------------------------------- status */

typedef enum {
    MOE_OK = 0,
    MOE_ERR_INVALID = 1, /* invalid argument or option combination */
    MOE_ERR_NOMEM = 2,   /* allocation failed or size overflow */
    MOE_ERR_IO = 3,      /* file system error */
    MOE_ERR_FORMAT = 4,  /* malformed input file or text */
    MOE_ERR_STATE = 5,   /* call out of order (e.g. backward before forward) */
} moe_status;

/* Message of the last failed call on this thread ("" if none). */
const char *moe_last_error(void);
/* Name of a status code ("ok", "invalid argument", ...). */
const char *moe_status_name(moe_status s);
/* "MAJOR.MINOR.PATCH". */
const char *moe_version(void);

/* ------------------------------------------------------------------- rng */

/* Counter-based generator: the value depends only on (seed, stream, index), never on
 * thread schedule or rank layout. A stream is derived from a purpose and up to three
 * counters (layer, step, ...) with moe_rng_stream(). */
typedef enum {
    MOE_RNG_INIT = 1,     /* parameter initialisation: counters (tensor id, 0, 0) */
    MOE_RNG_JITTER = 2,   /* input jitter: (layer, step, 0), index t*d + i */
    MOE_RNG_FAKE = 3,     /* fake balanced gate: (layer, step, 0) */
    MOE_RNG_RANDOM2 = 4,  /* random routing of slots j >= 1: (layer, step, 0), index t*k + j */
    MOE_RNG_DATA = 5,     /* batch sampling */
    MOE_RNG_DROPOUT = 6,
    MOE_RNG_SAMPLE = 7,   /* generation */
    MOE_RNG_RTS = 8,      /* random token selection: (layer, step, 0), index t*k + j */
    MOE_RNG_GUMBEL = 9,   /* sampled choices: (layer, step, 0), index t*E + e */
    MOE_RNG_GATE_NOISE = 10, /* Tutel's gate noise: (layer, step, 0), index t*E + e */
} moe_rng_purpose;

uint64_t moe_rng_stream(moe_rng_purpose purpose, uint64_t a, uint64_t b, uint64_t c);
uint64_t moe_rng_u64(uint64_t seed, uint64_t stream, uint64_t index);
/* Uniform in [0, 1) with 24 random bits (float) or 53 random bits (double). */
float moe_rng_uniform(uint64_t seed, uint64_t stream, uint64_t index);
double moe_rng_uniform64(uint64_t seed, uint64_t stream, uint64_t index);
/* Standard normal (Box-Muller on the 53-bit uniforms at indices 2*index, 2*index+1). */
double moe_rng_normal(uint64_t seed, uint64_t stream, uint64_t index);
/* out[i] = scale * (float)moe_rng_normal(seed, stream, index + i) for i < n, on all threads. */
void moe_rng_normal_floats(uint64_t seed, uint64_t stream, uint64_t index, size_t n, float scale,
                           float *out);

/* ---------------------------------------------------------------- layer */

typedef enum {
    MOE_ROUTER_TOPK = 0,          /* token choice: each token picks k experts */
    MOE_ROUTER_SINKHORN = 1,      /* S-BASE: Sinkhorn-balanced selection in training */
    MOE_ROUTER_EXPERT_CHOICE = 2, /* each expert picks its top-C tokens (not causal!) */
    MOE_ROUTER_FAKE_BALANCED = 3, /* round-robin (+ noise) for benchmarks; no router grads */
} moe_router_type;

typedef enum {
    MOE_SCORE_SOFTMAX = 0,
    MOE_SCORE_SIGMOID = 1,
    MOE_SCORE_SQRTSOFTPLUS = 2,
} moe_score_fn;

typedef enum {
    MOE_LB_NONE = 0,
    MOE_LB_AUX = 1,        /* micro-batch aux loss, Megatron's "aux_loss" (docs/LAYER.md §5: Switch
                            * and GShard normalise the counts differently) */
    MOE_LB_SEQ_AUX = 2,    /* per-sequence aux loss (DeepSeek-V2/V3 "seq_aux_loss") */
    MOE_LB_GLOBAL_AUX = 3, /* counts accumulated over micro-batches (and ranks) */
    MOE_LB_LOAD_IMPORTANCE = 4, /* Tutel's load_importance_loss (needs gate_noise) */
} moe_lb_type;

typedef enum {
    MOE_ACT_SWIGLU = 0, /* silu(gate) * up */
    MOE_ACT_GEGLU = 1,  /* gelu(gate) * up, exact erf gelu */
    MOE_ACT_RELU2 = 2,  /* relu(h)^2 */
    MOE_ACT_GELU = 3,   /* exact erf gelu */
    MOE_ACT_SILU = 4,
} moe_activation;

typedef enum {
    MOE_DROP_PROBS = 0,    /* per expert, keep the C slots with the largest routing weight */
    MOE_DROP_POSITION = 1, /* keep the C slots of the earliest tokens, whichever choice */
    MOE_DROP_RANDOM = 2,   /* keep C slots by a random priority (DeepSpeed's use_rts) */
    MOE_DROP_CHOICE = 3,   /* by position, every first choice before any second one (GShard's,
                            * DeepSpeed's top-2) */
    MOE_DROP_PRIORITY = 4, /* batch-prioritized routing (V-MoE; Switch's flaxformer, Tutel): by
                            * choice, then by the token's largest score */
} moe_drop_policy;

typedef enum {
    MOE_NORM_AUTO = -1, /* renormalise for sigmoid / sqrt-softplus when k > 1 (Megatron) */
    MOE_NORM_OFF = 0,
    MOE_NORM_ON = 1,
} moe_norm_topk;

/* Plain configuration of one MoE layer; start from moe_layer_config_default(). */
typedef struct {
    int d;                  /* hidden size */
    int n_experts;          /* E routed experts */
    int topk;               /* k, 1..E (default; may be changed per call) */
    int ffn;                /* f, hidden size of one routed expert */
    moe_activation act;
    int expert_bias;        /* bias in the expert (and shared expert) linear layers */
    int probs_on_input;     /* the routing weight scales the routed experts' input rows instead
                               of their outputs (Megatron's moe_apply_probs_on_input; Llama 4) */

    moe_router_type router;
    moe_score_fn score;
    int pre_softmax;        /* softmax over all E, then top-k (else top-k of logits, softmax over k) */
    moe_norm_topk norm_topk;
    float route_scale;      /* multiplies the routing weights (Megatron topk_scaling_factor) */
    int n_groups;           /* group-limited routing: number of expert groups (1 = off) */
    int group_topk;         /* groups kept per token */
    int group_score_topk;   /* a group's score: the sum of its best this many keys (0 =
                               topk / group_topk, Megatron; DeepSeek-V3 2, V2 1 = maximum) */
    int enable_expert_bias; /* selection-only bias, aux-loss-free balancing */
    float bias_update_rate; /* b_e += rate * sign(mean(c) - c_e) per optimizer step */
    int quantile_balancing; /* Megatron's quantile balancing: the top k of the logits plus the
                               selection bias, b = -beta set from each expert's quantile
                               (docs/LAYER.md §5) */
    float qb_ema;           /* beta <- ema beta + (1 - ema) beta_local per optimizer step */
    int router_fp64;        /* router logits GEMM in float64 */
    int cosine_dim;         /* Tutel's cosine router: logits = exp(min(tau, ln 100)) cos(W_p x + b,
                               s_e) in a space of this many dimensions (0 = the linear router) */
    float cosine_init_t;    /* its initial temperature: tau = ln(1 / init_t) */
    int expert_bf16;        /* expert GEMMs in bf16 (fp32 accumulation, fp32 master weights) */

    moe_lb_type lb_type;
    float aux_coeff;        /* aux loss coefficient */
    float aux_coeff_also[MOE_LB_GLOBAL_AUX + 1]; /* Megatron's list of load-balancing types: the
                               coefficients of more Switch-style losses, by type (aux_loss,
                               seq_aux_loss, global_aux_loss), added to lb_type's (0 = none) */
    float z_coeff;          /* z-loss coefficient */
    float jitter_eps;       /* x * U(1-eps, 1+eps) on the router input in training; 0 = off */
    float gate_noise;       /* logits + gate_noise * N(0, 1) / E in training (Tutel's); 0 = off */

    float capacity_factor;  /* 0 = dropless; > 0 fixed; < 0 dynamic, capped at |cf| */
    float eval_capacity_factor; /* outside training (DeepSpeed's); 0 = capacity_factor */
    int min_capacity;
    moe_drop_policy drop_policy;
    int pad_to_capacity;
    int local_group_size;   /* GShard's local group dispatching: capacity and drop order per
                               group of this many consecutive tokens (0 = the call as one) */

    int random_routing;     /* GShard: keep slot j >= 1 with probability w_j / threshold */
    float random_routing_threshold;
    int sample_second;      /* training, k = 2: the second choice sampled from the softmax
                             * without the first (DeepSpeed's top2_2nd_expert_sampling) */
    int sample_first;       /* training, k = 1: the choice sampled from the softmax (DeepSpeed's
                             * noisy_gate_policy 'RSample') */
    float fake_noise;       /* fake balanced gate */
    int fake_skip_first;    /* fake balanced gate: experts 0..n-1 get nothing */
    float sinkhorn_tol;
    int sinkhorn_max_iter;

    int shared_ffn;         /* hidden size of the shared expert MLP (0 = none) */
    int shared_gate;        /* multiply the shared output by sigmoid(x . g) */
    int residual;           /* Residual-MoE: out = routed*c0 + shared*c1, c = softmax(Wr x + br) */

    int layer_id;           /* RNG counter for this layer */
    uint64_t seed;

    /* Expert parallelism (set by the process grid, not an option of the layer): the layer
     * holds experts [ep_rank E/ep_size, (ep_rank+1) E/ep_size) and exchanges token rows with
     * the other ranks of its expert group (moe_layer_set_comms). */
    int ep_size, ep_rank;
    int ep_replicated;      /* every rank of the group holds the same tokens: each computes its
                               experts' rows and the outputs are summed (all-reduce) */
} moe_layer_config;

moe_layer_config moe_layer_config_default(void);
/* The coefficient of the Switch-style aux loss of type t (MOE_LB_AUX, MOE_LB_SEQ_AUX,
 * MOE_LB_GLOBAL_AUX): lb_type's own plus aux_coeff_also's; 0 off the topk router. */
float moe_aux_coeff_of(const moe_layer_config *cfg, moe_lb_type t);
/* Checks every field and every combination; MOE_ERR_INVALID with a message naming the values. */
moe_status moe_layer_config_validate(const moe_layer_config *cfg);

/* A group of processes (dist/comm.h); NULL is a group of one. */
typedef struct moe_comm moe_comm;

/* Pointers into the layer's parameter (or gradient) storage. Absent parts are NULL.
 * gf = 2f for gated activations (swiglu, geglu: rows [0,f) gate, [f,2f) up), else f.
 * gs = 2*shared_ffn or shared_ffn likewise. */
typedef struct {
    float *router_w;      /* [E, d] */
    float *w_in;          /* [El, gf, d]: El = E / ep_size local experts */
    float *b_in;          /* [El, gf] */
    float *w_out;         /* [El, d, f] */
    float *b_out;         /* [El, d] */
    float *shared_w_in;   /* [gs, d] */
    float *shared_b_in;   /* [gs] */
    float *shared_w_out;  /* [d, shared_ffn] */
    float *shared_b_out;  /* [d] */
    float *shared_gate_w; /* [d] */
    float *mix_w;         /* [2, d] residual mix */
    float *mix_b;         /* [2] */
    float *cos_proj_w;    /* [P, d] cosine router (P = cosine_dim; router_w is then absent) */
    float *cos_proj_b;    /* [P] */
    float *cos_sim;       /* [E, P] the experts' directions (Tutel's sim_matrix transposed) */
    float *cos_temp;      /* [1] tau */
} moe_layer_params;

/* Number of floats of trainable parameters for this config. */
size_t moe_layer_param_count(const moe_layer_config *cfg);
/* Fills p with pointers into base (param_count floats), in the order of the struct. */
void moe_layer_params_map(const moe_layer_config *cfg, float *base, moe_layer_params *p);

typedef struct moe_layer moe_layer;

/* Creates a layer for up to max_tokens tokens per call. All memory is allocated here:
 * parameters and gradients (unless params/grads are given: param_count floats each, owned
 * by the caller) and the activation workspace. */
moe_status moe_layer_create(const moe_layer_config *cfg, int max_tokens, float *params,
                            float *grads, moe_layer **out);
/* For inference: no gradients (moe_layer_grad_data NULL, moe_layer_get_grads all NULL) and
 * moe_layer_backward refused; parameters as moe_layer_create. */
moe_status moe_layer_create_inference(const moe_layer_config *cfg, int max_tokens, float *params,
                                      moe_layer **out);
void moe_layer_destroy(moe_layer *layer);
const moe_layer_config *moe_layer_get_config(const moe_layer *layer);
moe_layer_params moe_layer_get_params(moe_layer *layer);
moe_layer_params moe_layer_get_grads(moe_layer *layer);
float *moe_layer_param_data(moe_layer *layer); /* [param_count] */
float *moe_layer_grad_data(moe_layer *layer);  /* [param_count] */
float *moe_layer_expert_bias(moe_layer *layer); /* [E] selection bias (fp32 buffer): added to
                                                   the scores (expert bias) or, with quantile
                                                   balancing, to the logits (b = -beta) */
void moe_layer_zero_grads(moe_layer *layer);
/* Bytes of the layer's activation workspace. */
size_t moe_layer_workspace_bytes(const moe_layer *layer);
/* Distributed runs: the expert group (ep_size ranks, this layer's rank at ep_rank) that token
 * rows are exchanged with, and the group of every rank over which capacity decisions and
 * global-batch balancing counts are made (NULL: this process alone). */
void moe_layer_set_comms(moe_layer *layer, moe_comm *expert, moe_comm *world);
/* Benchmarks: a barrier before each exchange, so that the exchange time splits into waiting
 * for the group's slowest rank (stats exchange_wait_s) and moving the bytes. */
moe_status moe_layer_time_exchange_waits(moe_layer *layer, int on);
/* The workspace bytes moe_layer_create would allocate (SIZE_MAX if that overflows). */
size_t moe_layer_workspace_estimate(const moe_layer_config *cfg, int max_tokens);
/* Normal(0, std) weights from (seed, tensor); biases 0; mix_w, shared_gate_w normal too. */
void moe_layer_init_params(moe_layer *layer, uint64_t seed, float std);

typedef struct {
    int training;        /* jitter, Sinkhorn selection, count accumulation */
    int topk;            /* 0 = config value, else 1..E for this call ("top-any") */
    int capacity_set;    /* 1: capacity_factor below for this call (Tutel's dynamic capacity),
                            else the config's (eval_capacity_factor outside training) */
    float capacity_factor; /* as moe_layer_config's: 0 dropless, > 0 fixed, < 0 dynamic */
    const uint8_t *mask; /* [T] 1 = token, 0 = padding (routes nowhere, output 0); NULL = all;
                            copied: the buffer may change once the forward returns */
    int seq_len;         /* tokens per sequence for seq_aux_loss (0 = T); T % seq_len == 0 */
    uint64_t step;       /* RNG counter (optimizer step) */
    float loss_scale;    /* factor on the aux and z-loss gradients in backward */
    int reuse_bf16;      /* bf16 experts: keep the weights' bf16 copies between calls that set
                            this (inference on weights that do not change; a call without it,
                            or moe_layer_weights_changed, drops them) */
    const int32_t *replay; /* [T*k] routing replay (Megatron-Core's RouterReplay; the topk
                            router): token t's j-th choice is expert replay[t*k + j] (k distinct
                            experts, as moe_routing.selected recorded them; a masked token's
                            are not read) instead of the router's; the weights come from this
                            call's scores at those experts; NULL = the router's */
} moe_forward_args;

moe_forward_args moe_forward_args_default(void);

/* out [T, d] = MoE(x [T, d]). Saves what backward needs inside the layer. */
moe_status moe_layer_forward(moe_layer *layer, float *out, const float *x, int T,
                             const moe_forward_args *args);
/* Backward of the last forward, once per forward (MOE_ERR_STATE otherwise): dx [T, d] +=
 * dL/dx, grads += dL/dθ, including the aux and z-loss terms (times loss_scale). x must be the
 * same input. */
moe_status moe_layer_backward(moe_layer *layer, float *dx, const float *dout, const float *x);

typedef struct {
    int n_experts;
    int topk;                /* k used */
    int n_valid;             /* unmasked tokens */
    int capacity;            /* rows per expert (0 = dropless) */
    const int64_t *counts;   /* [E] slots the router assigned to each expert (before capacity) */
    const int64_t *kept;     /* [E] slots each expert computed (after capacity, no padding) */
    int64_t routed;          /* sum of counts */
    int64_t dropped;         /* routed - sum of kept */
    double dropped_fraction; /* dropped / routed (0 if nothing routed) */
    double aux_loss;         /* coefficient included */
    double aux_terms[MOE_LB_GLOBAL_AUX + 1]; /* the Switch-style part of aux_loss by type
                              * ([MOE_LB_AUX] .. [MOE_LB_GLOBAL_AUX]; CPU layer) */
    double z_loss;           /* coefficient included */
    int sinkhorn_iters;
    int64_t exchange_bytes;  /* expert parallelism: bytes this rank sent in the last forward's
                              * and backward's exchanges (to other ranks and itself) */
    double exchange_wait_s;  /* of their time, waiting for the group's slowest rank (measured
                              * with moe_layer_time_exchange_waits only) */
} moe_layer_stats;

/* Time spent in each stage of the layer, summed over calls since the last reset (seconds). */
typedef enum {
    MOE_STAGE_ROUTER = 0,      /* logits GEMM, scores, selection */
    MOE_STAGE_BALANCE,         /* counts, aux and z losses */
    MOE_STAGE_PERMUTE,         /* dispatch plan and the gather of expert inputs (with the
                                * experts spread over the threads, 256 rows or more each,
                                * every expert gathers its own rows: in EXPERT_GEMM then) */
    MOE_STAGE_EXPERT_GEMM,     /* the two expert GEMMs */
    MOE_STAGE_ACTIVATION,      /* activation with the routing weight (and biases) */
    MOE_STAGE_COMBINE,         /* weighted sum of expert outputs per token, output mix */
    MOE_STAGE_SHARED,          /* shared expert, its gate, the residual mix */
    MOE_STAGE_BWD_SHARED,
    MOE_STAGE_BWD_PERMUTE,     /* output-gradient and input gathers (or in BWD_EXPERT_GEMM,
                                * as the forward's), input-gradient scatter */
    MOE_STAGE_BWD_EXPERT_GEMM, /* the four weight and input gradient GEMMs */
    MOE_STAGE_BWD_ACTIVATION,
    MOE_STAGE_BWD_ROUTER,      /* routing-weight, aux and z gradients, router GEMMs */
    MOE_STAGE_EXCHANGE,        /* expert parallelism: token rows to and from other ranks */
    MOE_STAGE_BWD_EXCHANGE,
    MOE_STAGE_COUNT
} moe_stage;

const char *moe_stage_name(moe_stage s);
const double *moe_layer_stage_times(const moe_layer *layer); /* [MOE_STAGE_COUNT] */
void moe_layer_reset_stage_times(moe_layer *layer);

/* Routing decisions of the last forward. Token choice: slot t*k + j is token t's j-th choice
 * (expert -1 when the token is masked or the slot was dropped by random routing; kept = 0
 * when capacity dropped it). Expert choice: slot e*C + c is expert e's c-th token. */
typedef struct {
    int n_slots;
    const int32_t *token;  /* [n_slots] */
    const int32_t *expert; /* [n_slots] */
    const int32_t *selected; /* [n_slots] the router's choice before random routing (-1: a
                                masked token): what moe_forward_args.replay takes */
    const float *weight;   /* [n_slots] routing weight (route_scale included) */
    const uint8_t *kept;   /* [n_slots] 1 = computed by its expert */
} moe_routing;

const moe_routing *moe_layer_get_routing(const moe_layer *layer);

/* Statistics of the last forward (valid until the next forward). */
const moe_layer_stats *moe_layer_get_stats(const moe_layer *layer);

/* Once per optimizer step: if the expert bias is enabled, b_e += rate * sign(mean(c) - c_e)
 * with c the counts accumulated by training forwards since the last call (over micro-batches;
 * the MPI layer sums them over ranks first); with quantile balancing, beta = -b <- ema beta +
 * (1 - ema) mean(beta_local), then less its mean. Resets the accumulators in all cases. */
void moe_layer_step_end(moe_layer *layer);
/* The parameters were written: bf16 copies kept for moe_forward_args.reuse_bf16 are stale. */
void moe_layer_weights_changed(moe_layer *layer);
/* Accumulated counts since the last step_end: counts [E] and the number of valid tokens.
 * Writable so that a distributed run can replace them by their sum over ranks. */
int64_t *moe_layer_accum_counts(moe_layer *layer);
int64_t *moe_layer_accum_tokens(moe_layer *layer);
/* Quantile balancing: the sum of beta_local [E] over this step's training forwards, then
 * their number, [E + 1] (writable too: a distributed run sums them over ranks). */
double *moe_layer_qb_accum(moe_layer *layer);

/* ---------------------------------------------------------------- model */

/* A decoder-only MoE transformer (Mixtral / DeepSeek layout): token embedding; L blocks of
 * [RMSNorm -> causal attention (RoPE, grouped-query) -> residual -> RMSNorm -> FFN ->
 * residual]; final RMSNorm; LM head (tied or not). Each FFN is an MoE layer or a dense MLP. */
#define MOE_MAX_LAYERS 256
#define MOE_LAYER_DENSE (-1) /* n_experts[l] of a dense layer among MoE layers */
#define MOE_MAX_EXPERTS 65536 /* routed experts of a layer */
enum { MOE_QK_NORM_NONE = 0, MOE_QK_NORM_HEAD = 1, MOE_QK_NORM_WHOLE = 2 }; /* Qwen3, OLMoE */

typedef struct {
    int vocab;            /* V */
    int d;                /* hidden size */
    int n_layers;         /* L */
    int n_heads;          /* H, head size d / H */
    int n_kv_heads;       /* key/value heads (grouped-query attention); divides H */
    int head_dim;         /* per head; 0 = d / H (Qwen3 uses other sizes) */
    int ffn;              /* hidden size of the dense FFN layers */
    int seq_len;          /* maximum sequence length S */
    float rope_theta;
    float norm_eps;
    float init_std;       /* normal(0, std) initialisation of the weights */
    int tie_embeddings;   /* LM head = embedding matrix */
    int qkv_bias;         /* biases in the query, key and value projections (Qwen2) */
    int qk_norm;          /* RMSNorm of q and k before RoPE: MOE_QK_NORM_* */
    /* Multi-head latent attention (DeepSeek-V2/V3) when kv_lora_rank > 0: queries from x (or
     * through a q_lora_rank bottleneck with an RMSNorm), keys and values of every head from
     * one kv_lora_rank latent (RMSNorm) plus a rotary part shared by the heads. Heads are then
     * qk_nope_dim + qk_rope_dim wide for q and k, v_head_dim for v; n_kv_heads is ignored. */
    int q_lora_rank, kv_lora_rank, qk_nope_dim, qk_rope_dim, v_head_dim;
    int rope_interleave;  /* rotate pairs (2i, 2i+1) (DeepSeek) instead of (i, i + hd/2) */
    float rope_factor;    /* YaRN context extension factor (1 = none) */
    int rope_orig_max_pos; /* YaRN: the positions the model was trained for */
    float rope_beta_fast, rope_beta_slow; /* YaRN's ramp (32, 1) */
    float rope_mscale, rope_mscale_all_dim; /* YaRN's attention scaling (0 = absent) */
    int moe_layer_freq;   /* layer l is MoE if l % freq == 0 (and l >= first_k_dense) */
    int first_k_dense;    /* the first k layers are dense (DeepSeek) */
    int n_experts[MOE_MAX_LAYERS]; /* experts of each layer (pyramid PR-MoE): 0 = moe.n_experts,
                                    * MOE_LAYER_DENSE = a dense layer */
    moe_layer_config moe; /* template of every MoE layer (d and layer_id are set per layer) */
} moe_model_config;

moe_model_config moe_model_config_default(void);
moe_status moe_model_config_validate(const moe_model_config *cfg);
/* What a model can compute but not learn, refused for training (moe train, moe_trainer_create):
 * top-1 routing where the chosen expert's weight is always 1 — the softmax taken over the one
 * chosen logit (post-softmax, the default) or the top-k renormalised — so that the router gets
 * no gradient from the loss. Megatron-Core refuses the first too. */
moe_status moe_model_config_validate_training(const moe_model_config *cfg);
/* The size of one attention head: head_dim, or d / H when it is 0. */
int moe_model_head_dim(const moe_model_config *cfg);
/* Experts of layer l (0 = dense). */
int moe_model_layer_experts(const moe_model_config *cfg, int l);

/* One named tensor of the parameter vector (names follow Hugging Face's Mixtral layout
 * where one exists). */
typedef struct {
    char name[96];
    int ndim;
    int64_t shape[4];
    size_t offset;        /* in floats, into moe_model_params() */
    size_t numel;
    int no_decay;         /* norms and biases: no weight decay */
    int expert;           /* a routed expert's: held by one rank of each expert-parallel group */
    int expert_id;        /* that expert's global index (-1 for other tensors) */
} moe_tensor_info;

typedef struct moe_model moe_model;

/* All memory (parameters, gradients, activations for max_tokens = B*S tokens) is
 * allocated here. */
moe_status moe_model_create(const moe_model_config *cfg, int max_tokens, moe_model **out);
/* For inference (evaluation, generation, conversion): parameters and the forward's activations
 * only, about half the memory of moe_model_create; moe_model_grads is NULL, and
 * moe_model_backward and moe_trainer_create refuse the model. */
moe_status moe_model_create_inference(const moe_model_config *cfg, int max_tokens,
                                      moe_model **out);
int moe_model_is_inference(const moe_model *m); /* made by moe_model_create_inference */
void moe_model_destroy(moe_model *m);
const moe_model_config *moe_model_get_config(const moe_model *m);
void moe_model_init_params(moe_model *m, uint64_t seed);
size_t moe_model_param_count(const moe_model *m);
float *moe_model_params(moe_model *m);
float *moe_model_grads(moe_model *m);
void moe_model_zero_grads(moe_model *m);
int moe_model_n_tensors(const moe_model *m);
const moe_tensor_info *moe_model_tensor(const moe_model *m, int i);
/* Bytes of the activation workspaces (the model's and its MoE layers'), planned at create,
 * and of the key/value cache once a decoding call on the CPU has allocated it. */
size_t moe_model_activation_bytes(const moe_model *m);
/* The MoE layer of block l, or NULL for a dense block. */
moe_layer *moe_model_moe_layer(moe_model *m, int l);

/* Time the model's forward and backward calls on the CPU spent in each part of the network,
 * summed over calls since the last reset (seconds; the GPU's are not timed). */
typedef enum {
    MOE_PART_ATTENTION = 0, /* the blocks' attention norm, projections, rotary embedding
                             * and output projection (MLA's latents, q/k norms) */
    MOE_PART_ATTENTION_CORE, /* the attention itself: softmax(q k^T) v and its gradients */
    MOE_PART_FFN,           /* the blocks' FFN norm and FFN: the MoE layer or the dense MLP */
    MOE_PART_HEAD,          /* final norm, output layer and cross-entropy */
    MOE_PART_OTHER,         /* embedding, residual sums, starting the gradients' reduction
                             * (data parallelism) */
    MOE_PART_COUNT
} moe_model_part;
const char *moe_model_part_name(moe_model_part p);
/* [2][MOE_PART_COUNT]: the forward's parts, then the backward's */
const double *moe_model_part_times(const moe_model *m);
void moe_model_reset_part_times(moe_model *m);

typedef struct {
    double nll;       /* mean cross-entropy over the counted targets */
    double aux;       /* sum over MoE layers of the aux losses (coefficients included) */
    double aux_terms[MOE_LB_GLOBAL_AUX + 1]; /* its Switch-style part by type, as the layers'
                                              * stats (0 on the GPU) */
    double z;         /* sum over MoE layers of the z-losses (coefficients included) */
    int n_targets;    /* targets counted (target >= 0) */
} moe_model_loss;

typedef struct {
    int training;
    uint64_t step;
    float loss_scale; /* factor on every gradient of backward (1 / micro-batches) */
    /* Called by moe_model_backward as the gradients become final, from the output end: every
     * gradient float at offset >= from (into moe_model_grads) is complete for this backward.
     * Lets a caller start reducing them while the rest of the backward runs. NULL: none. */
    void (*grads_ready)(void *ctx, size_t from);
    void *grads_ctx;
    /* Routing replay: replay[l] the choices of MoE layer l, [B*S*k] as moe_routing.selected
     * of its moe_model_moe_layer recorded them (moe_forward_args.replay; the CPU only); NULL,
     * or a NULL entry: the router's. */
    const int32_t *const *replay;
} moe_model_args;

moe_model_args moe_model_args_default(void);

/* tokens, targets [B*S] (row b is one sequence; targets < 0 are ignored; targets may be
 * NULL for inference; args NULL: moe_model_args_default()). Loss = nll + aux + z. */
moe_status moe_model_forward(moe_model *m, const int32_t *tokens, const int32_t *targets, int B,
                             int S, const moe_model_args *args, moe_model_loss *loss);
/* Gradients of loss_scale * (nll + aux + z) of the last forward, added into the gradients. */
moe_status moe_model_backward(moe_model *m);
/* Where forward and backward run: "cpu" (the default) or "cuda" (one NVIDIA GPU, in a build
 * with CUDA: include/moe_cuda.h). With "cuda" each forward copies the parameters of
 * moe_model_params to the GPU and each backward adds the gradients into moe_model_grads; a
 * trainer created for such a model (moe_trainer_create; one at a time) keeps the parameters,
 * gradients and AdamW's moments on the GPU instead until it is destroyed, and moe_model_params
 * / moe_model_grads then bring host copies up to date when called (the parameters may be
 * written; the gradients are a copy to read); moving the model to "cpu" meanwhile is refused.
 * moe_model_logits is filled by forwards with training = 0; moe_model_decode keeps its
 * key/value cache on the GPU. MOE_ERR_INVALID (naming it) for what the GPU does not
 * compute: multi-head latent attention, q/k norms and biases, YaRN, expert parallelism, and
 * the MoE options the CUDA layer refuses. */
moe_status moe_model_use_device(moe_model *m, const char *device);
/* The tensor table of the whole model (every expert, as one process holds it), whatever this
 * process's share: names, shapes, offsets; free() the table. */
moe_status moe_model_full_tensors(const moe_model_config *cfg, moe_tensor_info **out, int *n);
/* Expert and data parallelism: the groups every MoE layer exchanges rows and counts with
 * (moe_layer_set_comms). */
void moe_model_set_comms(moe_model *m, moe_comm *expert, moe_comm *world);
/* Logits [B*S, V] of the last forward (or [n, V] of the last moe_model_decode). */
const float *moe_model_logits(const moe_model *m);

/* Incremental decoding of one sequence with a key/value cache: feeds n tokens at the
 * positions after those already cached, and computes their logits (moe_model_logits).
 * The cache holds up to seq_len positions; MOE_ERR_INVALID beyond. Inference only. The first
 * call on the CPU allocates the cache (MOE_ERR_NOMEM if it does not fit): a model that never
 * decodes has none. With bf16 experts the layers keep their weights' bf16 copies from one call to the next, and on the GPU
 * the parameters copied in by one call serve the next, until moe_model_params or
 * moe_model_init_params is called (or a forward): write the parameters through a pointer
 * obtained after the last decoding call. */
moe_status moe_model_decode(moe_model *m, const int32_t *tokens, int n);
/* Empties the cache (a new sequence). */
void moe_model_reset_cache(moe_model *m);
/* Positions in the cache. */
int moe_model_cache_len(const moe_model *m);
/* Floats the cache holds per position, all layers (keys and values). */
size_t moe_model_cache_width(const moe_model *m);

/* Samples a token from logits [V]: temperature (0 = greedy), then the top_k most likely
 * (0 = all; those tied with the k-th too, as Hugging Face), then the smallest set with
 * probability >= top_p (1 = all); u uniform in [0,1). -1 when V < 1, a logit is NaN, the
 * largest is +inf or all are -inf (there is no distribution to draw from). */
int moe_sample(const float *logits, int V, float temperature, int top_k, float top_p, double u);

/* -------------------------------------------------------------- training */

typedef enum {
    MOE_LR_COSINE = 0,   /* linear warmup, then cosine decay to min_lr */
    MOE_LR_LINEAR = 1,   /* linear warmup, then linear decay to min_lr */
    MOE_LR_CONSTANT = 2, /* linear warmup, then lr */
} moe_lr_style;

typedef struct {
    int train_iters;     /* optimizer steps */
    int micro_batch;     /* sequences per forward/backward */
    int global_batch;    /* sequences per optimizer step (a multiple of micro_batch) */
    float lr, min_lr;
    int warmup_iters;
    int decay_iters;     /* 0 = train_iters */
    moe_lr_style decay_style;
    float weight_decay;  /* AdamW, not applied to norms and biases */
    float beta1, beta2, adam_eps;
    float clip_grad;     /* global gradient-norm clipping (0 = off) */
    int eval_interval;   /* steps between validation runs (0 = never) */
    int eval_iters;      /* validation batches per run */
    uint64_t seed;       /* batch sampling */
    int max_bad_steps;   /* consecutive skipped steps (non-finite loss or gradient) before the
                            trainer reports the run as failed */
} moe_train_config;

moe_train_config moe_train_config_default(void);
moe_status moe_train_config_validate(const moe_train_config *cfg);
/* Learning rate of optimizer step `step` (0-based). */
double moe_train_lr(const moe_train_config *cfg, int step);

#ifdef __cplusplus
}
#endif
#endif
