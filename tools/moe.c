/* moe — the command-line tool. Exit codes: 0 ok, 1 runtime error, 2 usage error. */
#include "tools/cli.h"

#include "dist/comm.h"
#include "io/options.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The options each command reads (a flag it does not read is a usage error; --help lists the
 * readers of each option). One list covers every form of a command: what eval reads with
 * --model (--ids, --dump-logits) or with --load (--micro-batch-size) it takes in both, and the
 * form that does not read such a flag refuses it (cmd_generate.c load_model, cmd_hf.c
 * hf_prepare). The
 * model's and the layer's sections for generate, eval and convert: with --load they change the
 * checkpoint's options (the model is built from them), with --model moe_cli_hf_flags refuses
 * them. The layer alone (demo, bench layer|alltoall) takes its width from hidden-size and its
 * experts' hidden size from ffn-hidden-size when moe-ffn-hidden-size is not given
 * (moe_options_finish). --device: convert, demo and bench alltoall refuse cuda in words of
 * their own (moe_cli_cpu_only). */
#define LAYER_ALONE "hidden-size ffn-hidden-size tokens iters threads device"
/* the Training section but validation (bench train has no validation data) */
#define TRAIN_STEP                                                                             \
    "train-iters micro-batch-size global-batch-size lr min-lr lr-warmup-iters lr-decay-iters " \
    "lr-decay-style weight-decay adam-beta1 adam-beta2 adam-eps max-bad-steps clip-grad"
#define PROCESSES                                                                              \
    "expert-model-parallel-size moe-hierarchical-alltoall ranks-per-node moe-token-dispatcher-type"
static const moe_options_use uses[] = {
    {"train", MOE_SEC_MOE | MOE_SEC_MODEL | MOE_SEC_TRAIN,
     "data-path save load init-from finetune moe-use-upcycling no-load-optim no-load-rng "
     "save-interval keep-last "
     "exit-interval inject-fault "
     "tensorboard-dir tensor-model-parallel-size pipeline-model-parallel-size "
     "log-interval threads device print-config " PROCESSES},
    {"generate", MOE_SEC_MOE | MOE_SEC_MODEL | MOE_SEC_GEN, "load model ids threads device"},
    {"eval", MOE_SEC_MOE | MOE_SEC_MODEL,
     "load model ids prompt prompt-file dump-logits data-path micro-batch-size threads device"},
    {"convert", MOE_SEC_MOE | MOE_SEC_MODEL, "load model device"},
    {"tokenize", 0, "model prompt prompt-file ids"},
    {"demo", MOE_SEC_MOE, LAYER_ALONE " print-config"},
    {"bench layer", MOE_SEC_MOE, LAYER_ALONE " ceiling-size"},
    {"bench train", MOE_SEC_MOE | MOE_SEC_MODEL, "iters ceiling-size threads device " TRAIN_STEP},
    {"bench generate", MOE_SEC_MOE | MOE_SEC_MODEL, "tokens max-new-tokens iters ceiling-size threads device"},
    {"bench alltoall", MOE_SEC_MOE, LAYER_ALONE " " PROCESSES},
};
#define N_USES ((int)(sizeof uses / sizeof uses[0]))

const moe_options_use *moe_cli_use(const char *cmd) {
    for (int c = 0; c < N_USES; c++)
        if (!strcmp(uses[c].command, cmd)) return &uses[c];
    fprintf(stderr, "moe: no options table for command '%s'\n", cmd);
    abort();
}

static void usage(FILE *f) {
    fprintf(f, "moe %s — Mixture-of-Experts training and inference in C\n\n"
               "usage: moe COMMAND [options]\n\n"
               "commands:\n"
               "  prepare [--out DIR] [--val-fraction F] [--model DIR] [FILE|DIR...]\n"
               "              turn text files into token files DIR/train.bin and DIR/val.bin\n"
               "              (default: Debian's fortunes into data/fortunes)\n"
               "  train       train an MoE language model (options below)\n"
               "  generate --load RUN [--prompt TEXT | --prompt-file F] [--max-new-tokens N\n"
               "            --temperature T --top-k K --top-p P --seed S]   continue a text\n"
               "  eval --load RUN [--data FILE|DIR]   loss and perplexity on a token file\n"
               "            (default: the validation split data/fortunes/val.bin)\n"
               "  eval --model DIR (--ids 5,17,42 | --prompt TEXT) [--dump-logits OUT.npy]\n"
               "            a Hugging Face model directory: loss and logits of a sequence\n"
               "  generate --model DIR (--prompt TEXT | --ids 5,17,42) [...]   continue a text\n"
               "            (its tokenizer.json) or an id sequence with a Hugging Face model\n"
               "  tokenize --model DIR (--prompt TEXT | --ids 5,17,42)   a text's token ids, or\n"
               "            the text of token ids, by the directory's tokenizer.json\n"
               "  convert (--load RUN | --model DIR) --to hf OUT_DIR   write a model in the\n"
               "            Hugging Face layout of its family (config.json, model.safetensors)\n"
               "  convert (--load RUN | --model DIR) --to gguf OUT.gguf\n"
               "            [--outtype f32|f16|bf16|q8_0]\n"
               "            write a model as llama.cpp's GGUF file of its family's architecture\n"
               "  inspect FILE|RUN|DIR   tensors and metadata of a safetensors file, checkpoint,\n"
               "              model directory or GGUF file (its tensors by type)\n"
               "  report RUN  write RUN/report.html: losses, expert load, topics x experts\n"
               "  bench layer|train [options] [--json]   the layer's speed per stage, or\n"
               "              training tokens/s, FLOP utilisation and memory, against the SGEMM\n"
               "              rate measured in the same run\n"
               "  bench generate [options] [--tokens P] [--max-new-tokens N] [--device cuda]\n"
               "              [--json]\n"
               "              prefill of P tokens against the SGEMM rate, then N tokens decoded\n"
               "              one at a time against the memory bandwidth (bytes each step reads)\n"
               "  bench layer --device cuda [options] [--json]   the layer on an NVIDIA GPU\n"
               "              against cuBLAS's rate for the same GEMMs, measured in the same run\n"
               "  bench alltoall [options] [--json]   under mpirun: the expert-parallel layer's\n"
               "              token exchanges against plain MPI_Alltoallv, tokens/s of all ranks\n"
               "  demo        run the MoE layer forward and backward on random data and report\n"
               "              routing, losses and speed\n"
               "  help        this text with every option\n\n"
               "  moe --version     print the version\n"
               "  moe --help        this text with every option\n\n"
               "options (flags or 'key = value' lines in --config files; '_' and '-' are the "
               "same;\n"
               "a flag that the command does not read is an error, a key in a config file is "
               "not):\n",
            moe_version());
    moe_options_help(f, uses, N_USES);
}

static int run(int argc, char **argv, moe_dist *d);

int main(int argc, char **argv) {
    /* A file-size limit (ulimit -f) makes write() fail with EFBIG, reported like a full disk,
     * instead of killing the process. */
    signal(SIGXFSZ, SIG_IGN);
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    /* Under mpirun every rank runs this; only train and bench take part in a distributed run. */
    moe_dist d;
    if (moe_dist_init(&argc, &argv, &d) != MOE_OK) {
        fprintf(stderr, "moe: %s\n", moe_last_error());
        return 1;
    }
    int rc = run(argc, argv, &d);
    moe_dist_finalize(&d);
    return rc;
}

static int run(int argc, char **argv, moe_dist *d) {
    const char *cmd = argv[1];
    if (d->world_size > 1 && strcmp(cmd, "train") && strcmp(cmd, "bench")) {
        if (d->world_rank == 0)
            fprintf(stderr, "moe %s runs in one process; of the commands only train and bench "
                            "alltoall run under mpirun\n", cmd);
        return 2;
    }
    if (!strcmp(cmd, "--version") || !strcmp(cmd, "version")) {
        printf("moe %s\n", moe_version());
        return 0;
    }
    if (!strcmp(cmd, "--help") || !strcmp(cmd, "-h") || !strcmp(cmd, "help")) {
        usage(stdout);
        return 0;
    }
    for (int a = 2; a < argc; a++)
        if (!strcmp(argv[a], "--help") || !strcmp(argv[a], "-h")) {
            usage(stdout);
            return 0;
        }
    if (!strcmp(cmd, "demo")) return moe_cmd_demo(argc - 2, argv + 2);
    if (!strcmp(cmd, "prepare")) return moe_cmd_prepare(argc - 2, argv + 2);
    if (!strcmp(cmd, "train")) return moe_cmd_train(argc - 2, argv + 2);
    if (!strcmp(cmd, "generate")) return moe_cmd_generate(argc - 2, argv + 2);
    if (!strcmp(cmd, "eval")) return moe_cmd_eval(argc - 2, argv + 2);
    if (!strcmp(cmd, "inspect")) return moe_cmd_inspect(argc - 2, argv + 2);
    if (!strcmp(cmd, "report")) return moe_cmd_report(argc - 2, argv + 2);
    if (!strcmp(cmd, "bench")) return moe_cmd_bench(argc - 2, argv + 2);
    if (!strcmp(cmd, "convert")) return moe_cmd_convert(argc - 2, argv + 2);
    if (!strcmp(cmd, "tokenize")) return moe_cmd_tokenize(argc - 2, argv + 2);
    fprintf(stderr, "moe: unknown command '%s' (commands: prepare, train, generate, eval, inspect, "
                    "convert, tokenize, report, bench, "
                    "demo, help; see moe "
                    "--help)\n", cmd);
    return 2;
}
