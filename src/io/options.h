/* io/options — the option registry (DESIGN.md §4).
 *
 * One table (options.c) drives the CLI flags (`--num-experts 8`, `--num-experts=8`), config
 * files (`key = value` lines with the same names), the `--help` text, range checks, and the
 * text written into checkpoints (moe_options_write). Names are Megatron-Core's flag names
 * where one exists; '_' and '-' are interchangeable, and other systems' names (InternEvo's
 * `num_experts`, `moe_gate_k`, `moe_loss_coeff`, HF's `norm_topk_prob`, ...) are aliases. */
#ifndef MOE_IO_OPTIONS_H
#define MOE_IO_OPTIONS_H

#include "moe.h"

#include <stdio.h>

#define MOE_OPTIONS_MAX 160

/* "sinkhorn" as a load-balancing type selects the Sinkhorn router (Megatron's spelling). */
#define MOE_LB_CHOICE_SINKHORN 100
/* "quantile_balancing": Megatron's bias from each expert's quantile, no loss. */
#define MOE_LB_CHOICE_QB 101

#define MOE_PATH_MAX 1024

/* The values of an option that takes a list (Megatron's nargs='+'). */
#define MOE_OPT_LIST_MAX 4
typedef struct {
    int n;
    int v[MOE_OPT_LIST_MAX];
} moe_opt_ints;
typedef struct {
    int n;
    float v[MOE_OPT_LIST_MAX];
} moe_opt_floats;

typedef struct {
    moe_layer_config layer; /* the MoE layer, and the template of the model's MoE layers */
    moe_model_config model; /* .d is hidden-size; .moe is set from layer by finish */
    moe_train_config train;
    int n_experts_list;     /* values given to num-experts (> 1: per layer, in model.n_experts;
                             * finish spreads a list of one per MoE layer over the layers) */
    unsigned char freq_pattern[MOE_MAX_LAYERS]; /* moe-layer-freq as Megatron's pattern: 1 an
                                                 * MoE layer, 0 a dense one ("([1]*3+[0])*2") */
    int freq_pattern_n;     /* its length (0: moe-layer-freq is the number model.moe_layer_freq) */
    int expert_interval;    /* DeepSpeed's expert-interval N: layers l with (l + 1) % N == 0 are
                             * MoE (0: not given); finish turns it into freq_pattern */
    int untie;              /* untie-embeddings-and-output-weights */
    char data_path[MOE_PATH_MAX];
    char save[MOE_PATH_MAX];
    char load[MOE_PATH_MAX];
    char hf_model[MOE_PATH_MAX];     /* --model: a Hugging Face model directory */
    char init_from[MOE_PATH_MAX];    /* train --init-from: start from a Hugging Face model */
    int finetune;                    /* train --load --finetune: the weights alone, step 0 */
    int no_load_optim;               /* train --load --no-load-optim: new Adam moments */
    int upcycle;                     /* train --load --moe-use-upcycling: an MoE run from a dense
                                        checkpoint's weights (as --finetune) */
    char ids[MOE_PATH_MAX];          /* --ids: token ids "5,17,42" */
    char dump_logits[MOE_PATH_MAX];  /* --dump-logits: .npy of the logits of --ids */
    int save_interval, keep_last, log_interval, exit_interval;
    char inject_fault[MOE_PATH_MAX]; /* tests: moe_trainer_set_faults */
    int ep;                          /* expert-model-parallel-size (processes, not the model) */
    int two_stage, node_ranks;       /* hierarchical all-to-all; ranks per machine (0: MPI's) */

    moe_opt_ints lb_list;    /* moe-router-load-balancing-type: moe_lb_type or MOE_LB_CHOICE_*
                                values; several: Megatron's list of aux losses */
    moe_opt_floats aux_list; /* moe-aux-loss-coeff: one, or one per type of lb_list */
    int force_lb;  /* moe-router-force-load-balancing: the fake balanced gate */
    float aux_coeff_hf; /* router-aux-loss-coef: Hugging Face's normalisation (k times ours) */
    float z_coeff_hf;   /* router-z-loss-coef: Hugging Face's, one loss over all MoE layers */
    int max_pos;        /* max-position-embeddings: Megatron's position table; alone, seq-length */
    char tb_dir[MOE_PATH_MAX]; /* tensorboard-dir: the event files' directory ("": --save's) */
    int n_shared;       /* n-shared-experts: the shared expert's width in routed experts' */
    int mlp_type;       /* mlp-type: DeepSpeed's; 1 = residual (Residual-MoE, expert-wide) */
    int noisy_gate;     /* moe-noisy-gate-policy: 0 none, 1 Jitter (eps 0.01), 2 RSample */
    int jitter_implied; /* finish set the jitter for Jitter: not written (the policy is) */
    /* Megatron's flags for what moe.c always does: accepted as a script gives them, checked
     * (mg_swiglu, mg_no_bias: moe-activation and moe-expert-linear-bias by finish) */
    int mg_swiglu, mg_no_bias, mg_norm, mg_pos, mg_tp, mg_pp, mg_noop;
    int mg_gqa; /* group-query-attention: num-query-groups not given is 1, Megatron's default */
    float mg_attn_dropout, mg_hidden_dropout;

    /* moe generate */
    char prompt[MOE_PATH_MAX];
    char prompt_file[MOE_PATH_MAX]; /* --prompt-file: the prompt is this file's text */
    int max_new_tokens, top_k;
    float temperature, top_p;

    /* moe demo */
    int tokens;
    int iters;
    int ceiling_n;    /* moe bench on the CPU: the side of the square SGEMM ceiling */
    int threads;      /* 0 = OpenMP's default */
    int device;       /* 0 cpu, 1 cuda (moe_model_use_device) */
    int print_config; /* print the resolved options as a config file and exit */

    unsigned char given[MOE_OPTIONS_MAX]; /* option i was set explicitly */
} moe_options;

void moe_options_default(moe_options *o);

/* Sets one option from text; `key` is a flag name without the dashes, any alias, '_' or '-'.
 * `where` prefixes the error message ("--flag", "file.cfg:12"). */
moe_status moe_options_set(moe_options *o, const char *key, const char *value, const char *where);

/* Whether the option `key` (any of its names) was set by a flag, a config file or a text. */
int moe_options_given(const moe_options *o, const char *key);

/* The first option given that describes the model or its MoE layers (the sections Model, MoE
 * layer, Router, Load balancing, Dispatch and capacity, Experts; seq-length and seed, which
 * inference uses too, aside), or NULL: what a Hugging Face directory's config.json sets. */
const char *moe_options_model_given(const moe_options *o);

/* Reads `key = value` lines ('#' starts a comment). */
moe_status moe_options_load_file(moe_options *o, const char *path);

/* The same from text (checkpoint metadata); `where` names it in messages. */
moe_status moe_options_load_text(moe_options *o, const char *text, const char *where);

/* The sections of the registry, as bits: what --help groups, and what a command reads. */
#define MOE_SEC_LAYER (1u << 0) /* num-experts, moe-router-topk, moe-ffn-hidden-size, seed */
#define MOE_SEC_ROUTER (1u << 1)
#define MOE_SEC_BALANCE (1u << 2)
#define MOE_SEC_DISPATCH (1u << 3)
#define MOE_SEC_EXPERTS (1u << 4)
#define MOE_SEC_MODEL (1u << 5)
#define MOE_SEC_TRAIN (1u << 6)
#define MOE_SEC_FILES (1u << 7)
#define MOE_SEC_GEN (1u << 8)
#define MOE_SEC_RUN (1u << 9)
/* the MoE layer's sections: what moe_options_finish(o, 0) resolves */
#define MOE_SEC_MOE (MOE_SEC_LAYER | MOE_SEC_ROUTER | MOE_SEC_BALANCE | MOE_SEC_DISPATCH | \
                     MOE_SEC_EXPERTS)

/* The options a command reads: whole sections and single options. */
typedef struct {
    const char *command; /* "train", "bench layer": named in --help */
    unsigned sections;   /* MOE_SEC_* bits */
    const char *options; /* canonical names, space-separated */
} moe_options_use;

/* Parses argv[0..argc): `--config FILE` is applied first wherever it appears, then every
 * other `--name value` / `--name=value` / boolean `--name` in order. Positional arguments
 * are errors, and so is a flag that `use` does not include ("--name is not used by this
 * command"; NULL: every option is): keys in config files are not checked, as one file serves
 * several commands. */
moe_status moe_options_parse_args(moe_options *o, int argc, char **argv,
                                  const moe_options_use *use);
/* The first flag of argv (config files aside) that sets one of the options `names` (their
 * canonical names, space-separated), as written ("--ids", "--prompt_file") in buf, or NULL. */
const char *moe_options_flag(int argc, char **argv, const char *names, char *buf, size_t cap);

/* Resolves the combined options (load-balancing type "sinkhorn", forced balancing, hidden
 * size, tied embeddings) into o->layer, o->model and o->train and validates the parts a
 * command uses (the layer always); errors name the flags involved. */
#define MOE_OPTIONS_MODEL 1
#define MOE_OPTIONS_TRAIN 2
moe_status moe_options_finish(moe_options *o, int parts);

/* Writes every option as `name = value`, in a form moe_options_load_file reads back exactly
 * (the text checkpoints keep). */
void moe_options_write(FILE *f, const moe_options *o);
/* --print-config: moe_options_write and, where set, what the run starts from (init-from), so
 * that the file reproduces the run; never in checkpoints, where --load would read it as a new
 * start (moe_cli_options refuses init-from with --load). */
void moe_options_print_config(FILE *f, const moe_options *o);

/* moe_options_write into a malloc'ed string (NULL if out of memory). */
char *moe_options_to_text(const moe_options *o);

/* Help text: every option with its argument, aliases, choices, default and description, and
 * which of the n commands `cmds` read it (by section, or the option alone). */
void moe_options_help(FILE *f, const moe_options_use *cmds, int n);

#endif
