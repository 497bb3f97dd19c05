#!/bin/sh
# The moe CLI: help, version, the demo, config files, and exit codes (0 ok, 2 usage error).
moe=$1; src=$2
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*"; exit 1; }
expect() { # expect CODE command...: runs it, checks the exit code, keeps stdout+stderr in $tmp/out
  code=$1; shift
  "$@" >"$tmp/out" 2>&1; rc=$?
  [ "$rc" = "$code" ] || { cat "$tmp/out"; fail "'$*' exited $rc, expected $code"; }
}
unused() { # unused 'LINE' COMMAND...: exit 2 with that one line
  line=$1; shift
  expect 2 "$@"
  [ "$(cat "$tmp/out")" = "$line" ] || fail "'$*': '$(cat "$tmp/out")', expected '$line'"
}
expect 0 "$moe" --version
grep -q "^moe [0-9]*\.[0-9]*\.[0-9]*$" "$tmp/out" || fail "--version output: $(cat "$tmp/out")"
expect 0 "$moe" --help
grep -q -- "--moe-router-load-balancing-type" "$tmp/out" || fail "--help lacks the options"
expect 2 "$moe"
expect 2 "$moe" frobnicate
grep -q "unknown command 'frobnicate'" "$tmp/out" || fail "unknown command message"
expect 2 "$moe" demo --num-expert 4
grep -q "did you mean --num-experts?" "$tmp/out" || fail "no suggestion: $(cat "$tmp/out")"
[ "$(wc -l <"$tmp/out")" = 1 ] || fail "a usage error should be one line: $(cat "$tmp/out")"
expect 2 "$moe" demo --num-experts 4 --moe-router-topk 5
grep -q "moe-router-topk (5) must be between 1 and num-experts (4)" "$tmp/out" || fail "k > E message"
printf 'num_experts = 6\nmoe_gate_k = 3\nmoe_loss_coeff = 0.01\n' >"$tmp/a.cfg"
expect 0 "$moe" demo --config "$tmp/a.cfg" --print-config
grep -q "^num-experts = 6$" "$tmp/out" && grep -q "^moe-router-topk = 3$" "$tmp/out" \
  && grep -q "^moe-aux-loss-coeff = 0.01$" "$tmp/out" || fail "config aliases: $(cat "$tmp/out")"
cp "$tmp/out" "$tmp/b.cfg"
expect 0 "$moe" demo --config "$tmp/b.cfg" --print-config
cmp -s "$tmp/out" "$tmp/b.cfg" || fail "--print-config does not round-trip"
expect 2 "$moe" demo --config "$tmp/missing.cfg"
expect 0 "$moe" demo --tokens 96 --iters 2 --num-experts 4 --moe-router-topk 2 \
  --moe-expert-capacity-factor 1.0 --moe-aux-loss-coeff 0.01 --moe-z-loss-coeff 0.001
grep -q "tokens per expert" "$tmp/out" && grep -q "GFLOP/s" "$tmp/out" || fail "demo output: $(cat "$tmp/out")"
# train's --print-config keeps what the run was given for itself (its processes, device,
# actions; not written into checkpoints), but itself, and reads back as the same file
expect 0 "$moe" train --exit-interval 5 --expert-model-parallel-size 2 \
  --moe-token-dispatcher-type allgather --max-position-embeddings 512 --print-config
cp "$tmp/out" "$tmp/run.cfg"
for k in "exit-interval = 5" "expert-model-parallel-size = 2" "moe-token-dispatcher-type = allgather" \
  "max-position-embeddings = 512"; do
  grep -q "^$k$" "$tmp/run.cfg" || fail "print-config without $k: $(cat "$tmp/run.cfg")"
done
grep -q "^print-config" "$tmp/run.cfg" && fail "print-config writes itself"
expect 0 "$moe" train --config "$tmp/run.cfg" --print-config
cmp -s "$tmp/out" "$tmp/run.cfg" || fail "train --print-config does not round-trip"
for cfg in "$src"/configs/*.cfg; do # every example config is valid
  expect 0 "$moe" train --config "$cfg" --print-config
done
# top-1 whose weight is always 1 (the softmax after the top-k) teaches the router nothing:
# training refuses it in one line
expect 2 "$moe" train --moe-router-topk 1 --train-iters 1
[ "$(wc -l <"$tmp/out")" = 1 ] && grep -q "set moe-router-pre-softmax" "$tmp/out" ||
  fail "train --moe-router-topk 1: $(cat "$tmp/out")"
# Sinkhorn balances by itself: an aux-loss coefficient with it is refused, whichever option
# chose Sinkhorn (the balancing type too), not dropped without a word
for sink in "--moe-router-type sinkhorn" "--moe-router-load-balancing-type sinkhorn"; do
  # shellcheck disable=SC2086
  expect 2 "$moe" train $sink --moe-aux-loss-coeff 0.01 --print-config
  [ "$(wc -l <"$tmp/out")" = 1 ] && grep -q "sinkhorn routing balances by itself" "$tmp/out" ||
    fail "$sink with an aux loss: $(cat "$tmp/out")"
done
# Hugging Face's hidden_act silu means SwiGLU, our moe-activation silu a plain SiLU MLP: the
# name is not an alias, so a copied key is refused rather than silently change the experts
expect 2 "$moe" train --hidden-act silu --print-config
grep -q "unknown option --hidden-act" "$tmp/out" || fail "hidden-act: $(cat "$tmp/out")"
# a blend's form is a usage error, said before any file is read
expect 2 "$moe" train --data-path "0.3 $tmp/x $tmp/y" --train-iters 1
grep -q "'$tmp/y' is not a positive weight" "$tmp/out" || fail "blend form: $(cat "$tmp/out")"
expect 2 "$moe" train --data-path "1 $tmp/x 2" --train-iters 1
grep -q "the weight 2 has no directory after it" "$tmp/out" || fail "blend form: $(cat "$tmp/out")"
# an lr below the default min-lr: refused with the flag named where the lr decays to min-lr,
# taken with the constant style, which never reaches it
unused "moe train: min-lr (0.0003) must be between 0 and lr (0.0001): --min-lr sets it (default 3e-4)" \
  "$moe" train --lr 1e-4 --print-config
# Megatron's --swiglu and --disable-bias-linear against options that say otherwise: refused
unused "moe train: swiglu conflicts with moe-activation relu2" \
  "$moe" train --moe-activation relu2 --swiglu --print-config
unused "moe train: disable-bias-linear conflicts with moe-expert-linear-bias true" \
  "$moe" train --add-bias-linear --disable-bias-linear --print-config
# a blend's words after --data-path= (the words are separate arguments): the form is named
unused "moe train: unexpected argument 'x' (a blend after --data-path= is one quoted value, or its words follow --data-path)" \
  "$moe" train --data-path=1 x 2 y --print-config
expect 0 "$moe" train --lr 1e-4 --lr-decay-style constant --print-config
grep -q "^lr = 0.0001$" "$tmp/out" || fail "constant lr below min-lr: $(cat "$tmp/out")"
# the benchmarks' FLOP counts against the shapes, worked out here: the layer's useful rows (not
# the zero rows of pad-to-capacity; no token dropped at capacity factor 4), and the model's
# multi-head latent attention (q through its latent, the kv latent and rotary key, o)
expect 0 "$moe" bench layer --tokens 256 --hidden-size 64 --moe-ffn-hidden-size 32 --num-experts 8 \
  --moe-router-topk 2 --iters 1 --moe-expert-capacity-factor 4 --moe-pad-expert-input-to-capacity \
  --ceiling-size 256 --json
/usr/bin/python3 -c "
import json, sys
r = json.loads(open(sys.argv[1]).read().splitlines()[-1])
T, d, f, E, k = 256, 64, 32, 8, 2
want = 3 * (2 * T * d * E + T * k * 2 * d * 3 * f) / 1e9  # forward + backward, SwiGLU
sys.exit(0 if r['dropped_fraction'] == 0 and abs(r['gflop_per_call'] - want) < 1e-9
         and r['sgemm_n'] == 256 and r['sgemm_gflops'] > 0 else 1)
" "$tmp/out" || fail "bench layer FLOPs with padding: $(cat "$tmp/out")"
expect 0 "$moe" bench train --num-layers 2 --hidden-size 32 --num-attention-heads 4 --num-experts 4 \
  --moe-router-topk 2 --moe-ffn-hidden-size 16 --seq-length 16 --micro-batch-size 1 \
  --global-batch-size 1 --kv-lora-rank 8 --q-lora-rank 12 --qk-head-dim 6 \
  --qk-pos-emb-head-dim 4 --v-head-dim 5 --moe-router-pre-softmax --iters 1 --ceiling-size 256 \
  --json
/usr/bin/python3 -c "
import json, sys
r = json.loads(open(sys.argv[1]).read().splitlines()[-1])
d, H, nope, rope, v, qr, kr, S, V, E, k, f = 32, 4, 6, 4, 5, 12, 8, 16, 257, 4, 2, 16
proj = d * qr + qr * H * (nope + rope) + d * (kr + rope) + kr * H * (nope + v) + H * v * d
layer = 2 * proj + S * (H * (nope + rope) + H * v) + 2 * d * E + k * 2 * d * 3 * f
want = 3 * (2 * layer + 2 * d * V) / 1e6  # forward + backward, per token
sys.exit(0 if abs(r['mflop_per_token'] - want) < 1e-6 else 1)
" "$tmp/out" || fail "bench train FLOPs with MLA: $(cat "$tmp/out")"
# and the analytical minimum of memory: parameters, gradients and Adam's moments (16 bytes
# each) and the float32 activations the backward reads (see model_activation_bytes_per_token)
expect 0 "$moe" bench train --num-layers 2 --hidden-size 32 --num-attention-heads 4 \
  --num-query-groups 2 --num-experts 4 --moe-router-topk 2 --moe-ffn-hidden-size 16 \
  --ffn-hidden-size 24 --first-k-dense 1 --moe-shared-expert-intermediate-size 8 --seq-length 16 \
  --micro-batch-size 3 --global-batch-size 3 --moe-router-pre-softmax --iters 1 --ceiling-size 256 \
  --json
/usr/bin/python3 -c "
import json, sys
r = json.loads(open(sys.argv[1]).read().splitlines()[-1])
d, H, hd, kvh, S, T, V, E, k, f, fs, ffn = 32, 4, 8, 2, 16, 48, 257, 4, 2, 16, 8, 24
block = (2 * d + 1) + (H * hd + 2 * kvh * hd) + H * S + H * hd + (2 * d + 1)
dense = block + 3 * ffn                                   # SwiGLU: h (2 ffn) and activation
moe = block + E + k * (1 + 3 * f) + 3 * fs                # weight, h, act; shared
act = 4 * T * (dense + moe + 2 * d + 1 + V)               # final norm, logits
want = (16 * r['params'] + act) / 1048576
sys.exit(0 if abs(r['minimum_mb'] - want) < 1e-3 and r['minimum_mb'] < r['allocated_mb'] else 1)
" "$tmp/out" || fail "bench train's analytical minimum: $(cat "$tmp/out")"
# the same run's time per part: the parts and the rest make up the step, each attention
# (projections and core) and FFN part took time, and the MoE layer's stages (its shared expert's too) lie within the FFN's
/usr/bin/python3 -c "
import json, sys
r = json.loads(open(sys.argv[1]).read().splitlines()[-1])
f, b, st = r['forward_ms'], r['backward_ms'], r['moe_stages_ms']
parts = sum(f.values()) + sum(b.values())
ok = (min(list(f.values()) + list(b.values())) >= 0 and r['rest_ms'] >= 0
      and abs(parts + r['rest_ms'] - r['step_ms']) < 1e-3 * r['step_ms']
      and min(f['attention'], f['ffn'], b['attention'], b['ffn'], f['head'], b['head'],
              f['attention core'], b['attention core']) > 0
      and min(st['expert GEMM'], st['bwd expert GEMM'], st['shared expert'], st['router']) > 0
      and sum(st.values()) <= f['ffn'] + b['ffn'])
sys.exit(0 if ok else 1)
" "$tmp/out" || fail "bench train's parts: $(cat "$tmp/out")"
# a step skipped for a loss that is not finite (an absurd lr): exit 1 and no figures, which
# would time steps without their update
expect 1 "$moe" bench train --num-layers 1 --hidden-size 32 --num-attention-heads 4 \
  --num-experts 4 --seq-length 16 --micro-batch-size 2 --global-batch-size 2 --iters 8 \
  --lr 1e9 --clip-grad 0 --lr-warmup-iters 0 --ceiling-size 256
grep -q "not finite" "$tmp/out" && ! grep -q "tokens/s" "$tmp/out" \
  || fail "bench train with a skipped step: $(cat "$tmp/out")"
# --device cuda where there is no GPU (CI) or no CUDA in the build: one clear line, exit 1;
# with a GPU the layer and generation benches run (test_cuda_* check the numbers)
if "$moe" bench layer --device cuda --tokens 64 --iters 1 >"$tmp/out" 2>&1; then
  grep -q "TFLOP/s" "$tmp/out" || fail "bench layer --device cuda: $(cat "$tmp/out")"
  expect 0 "$moe" bench generate --device cuda --num-layers 2 --hidden-size 64 --seq-length 32 \
    --json
  grep -q '"device":"cuda"' "$tmp/out" || fail "bench generate --device cuda: $(cat "$tmp/out")"
else
  [ "$(wc -l <"$tmp/out")" = 1 ] && grep -q "CUDA" "$tmp/out" || fail "--device cuda: $(cat "$tmp/out")"
  expect 1 "$moe" bench train --device cuda --num-layers 1 --hidden-size 32 --iters 1
  grep -q "CUDA" "$tmp/out" || fail "bench train --device cuda: $(cat "$tmp/out")"
  expect 1 "$moe" bench generate --device cuda --num-layers 1 --hidden-size 32 --iters 1
  grep -q "CUDA" "$tmp/out" || fail "bench generate --device cuda: $(cat "$tmp/out")"
fi
expect 2 "$moe" bench train --device tpu
# the CPU's ceiling sized on the GPU: refused before any device is looked for
expect 2 "$moe" bench layer --device cuda --ceiling-size 256
grep -q "ceiling-size sizes the CPU's ceiling" "$tmp/out" ||
  fail "--ceiling-size on cuda: $(cat "$tmp/out")"
# bench generate: the parameter bytes a decoding step reads, against the tensor shapes: every
# parameter when each token goes to every expert (tied embeddings: the output layer reads the
# whole table); with one expert per token and untied embeddings, one embedding row and one
# expert (of d x 3f floats, SwiGLU) per layer
small="--num-layers 2 --hidden-size 64 --seq-length 32 --num-experts 4 --moe-ffn-hidden-size 96
  --ceiling-size 256"
expect 0 "$moe" bench generate $small --moe-router-topk 4 --json
/usr/bin/python3 -c 'import json,sys; r=json.load(open(sys.argv[1]))
assert r["decode_param_mb"] == round(4 * r["params"] / 2**20, 3), r
assert r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0, r' "$tmp/out" \
  || fail "bench generate, all experts: $(cat "$tmp/out")"
expect 0 "$moe" bench generate $small --moe-router-topk 1 --untie-embeddings-and-output-weights \
  --tokens 10 --max-new-tokens 3 --json
/usr/bin/python3 -c 'import json,sys; r=json.load(open(sys.argv[1]))
want = 4 * (r["params"] - 256 * 64 - 2 * 3 * 64 * 96 * 3) / 2**20
assert abs(r["decode_param_mb"] - want) < 1e-3 and r["new_tokens"] == 3, (r, want)' "$tmp/out" \
  || fail "bench generate, one expert: $(cat "$tmp/out")"
expect 2 "$moe" bench generate --seq-length 32 --tokens 30 --max-new-tokens 5
grep -q "must fit --seq-length (32)" "$tmp/out" || fail "bench generate: $(cat "$tmp/out")"
unused "moe bench generate: --tokens (40, the prompt) must be between 1 and --seq-length - 1 (31), leaving the rest to --max-new-tokens" \
  "$moe" bench generate --seq-length 32 --tokens 40
expect 2 "$moe" bench generate --seq-length 1
expect 2 "$moe" demo --device cuda
grep -q "runs on the CPU" "$tmp/out" || fail "demo --device cuda: $(cat "$tmp/out")"
# A flag that the command does not read is a usage error, one line naming it as given (exit 2),
# not silently ignored. Each command below would fail fast if it took the flag (no checkpoint,
# no model directory, k > E, --print-config).
bad_k="--num-experts 4 --moe-router-topk 5"
unused "moe train: --prompt is not used by this command" "$moe" train --prompt hi --print-config
unused "moe generate: --train-iters is not used by this command" \
  "$moe" generate --load "$tmp/none" --train-iters 5
unused "moe eval: --save is not used by this command" "$moe" eval --load "$tmp/none" --save "$tmp/x"
unused "moe convert: --threads is not used by this command" \
  "$moe" convert --load "$tmp/none" --threads 2 --to hf "$tmp/hf"
unused "moe tokenize: --seed is not used by this command" \
  "$moe" tokenize --model "$tmp/none" --ids 1 --seed 3
# shellcheck disable=SC2086
{
unused "moe demo: --num-layers is not used by this command" "$moe" demo --num-layers 2 $bad_k
unused "moe bench layer: --ep is not used by this command" "$moe" bench layer $bad_k --ep 2
unused "moe bench train: --save is not used by this command" \
  "$moe" bench train --config "$src/configs/default.cfg" --save "$tmp/x" $bad_k
unused "moe bench train: --eval-interval is not used by this command" \
  "$moe" bench train --config "$src/configs/default.cfg" --eval-interval 5 $bad_k
unused "moe bench generate: --temperature is not used by this command" \
  "$moe" bench generate --temperature=0 --json $bad_k
unused "moe bench alltoall: --micro-batch-size is not used by this command" \
  "$moe" bench alltoall --micro-batch-size 2 $bad_k
}
# layer options that contradict each other (checked before any data is read)
unused "moe train: num-experts lists 4 experts for layer 0, which first-k-dense makes dense (list 0 there)" \
  "$moe" train --num-layers 2 --num-experts 4,8 --first-k-dense 1 --print-config
unused "moe train: num-experts lists 8 experts for layer 1, which moe-layer-freq makes dense (list 0 there)" \
  "$moe" train --num-layers 2 --num-experts 4,8 --moe-layer-freq 2 --print-config
unused "moe train: moe-layer-freq gives a pattern of 3 layers but num-layers is 2" \
  "$moe" train --num-layers 2 --moe-layer-freq "[1]*3" --print-config
unused "moe train: --moe-layer-freq: '[1]+2' is not a layer pattern (a list plus a number, at the end): give a number, or 1 (MoE) and 0 (dense) per layer, as [1,0,1,0] or ([1]*3+[0])*2" \
  "$moe" train --num-layers 2 --moe-layer-freq "[1]+2" --print-config
unused "moe train: first-k-dense (2) leaves no MoE layer of the 2 (a dense model: num-experts 0 for each layer)" \
  "$moe" train --num-layers 2 --first-k-dense 2 --print-config
unused "moe train: moe-router-group-topk (3) must be between 1 and moe-router-num-groups (1)" \
  "$moe" train --moe-router-group-topk 3 --print-config
expect 0 "$moe" train --num-layers 2 --num-experts 0,8 --first-k-dense 1 --print-config
# the same keys in a config file are not checked: one file serves several commands
# (configs/default.cfg holds train's keys and those of its run directory)
printf 'save = %s/run\ntrain-iters = 5\nprompt = hi\ntemperature = 0\nthreads = 1\n' "$tmp" \
  >"$tmp/keys.cfg"
expect 0 "$moe" demo --config "$src/configs/default.cfg" --config "$tmp/keys.cfg" --print-config
grep -q "^save = $tmp/run$" "$tmp/out" && grep -q "^train-iters = 5$" "$tmp/out" &&
  grep -q "^save-interval = 500$" "$tmp/out" || fail "demo --config: $(cat "$tmp/out")"
expect 0 "$moe" train --config "$tmp/keys.cfg" --print-config
expect 2 "$moe" bench train --config "$src/configs/default.cfg" --config "$tmp/keys.cfg" \
  --moe-router-topk 9
grep -q "moe-router-topk (9) must be between 1 and num-experts (8)" "$tmp/out" ||
  fail "bench train --config: $(cat "$tmp/out")"
expect 2 "$moe" bench generate --config "$tmp/keys.cfg" --seq-length 32 --tokens 30 \
  --max-new-tokens 5
grep -q "must fit --seq-length (32)" "$tmp/out" || fail "bench generate --config: $(cat "$tmp/out")"
for cmd in generate eval "convert --to hf $tmp/hf"; do # past the options, to the checkpoint
  # shellcheck disable=SC2086
  expect 1 "$moe" $cmd --config "$tmp/keys.cfg" --load "$tmp/none"
  grep -q "$tmp/none" "$tmp/out" || fail "$cmd --config: $(cat "$tmp/out")"
done
expect 2 "$moe" tokenize --config "$tmp/keys.cfg" --model "$tmp" # its prompt
grep -q "has no tokenizer.json" "$tmp/out" || fail "tokenize --config: $(cat "$tmp/out")"
# a model directory that is not there is not one without a tokenizer
expect 1 "$moe" tokenize --model "$tmp/none" --prompt hi
[ "$(cat "$tmp/out")" = "moe tokenize: $tmp/none: No such file or directory" ] ||
  fail "tokenize, no directory: $(cat "$tmp/out")"
# --help names the commands that read each section and option
expect 0 "$moe" --help
grep -q "^Training (read by train):$" "$tmp/out" &&
  grep -A4 -- "^  --lr X" "$tmp/out" | grep -q "^      read by bench train too$" &&
  grep -q "^      read by train, bench alltoall$" "$tmp/out" || fail "--help readers"
# README's option tables give every option of --help (and no other) with the same value syntax
# and default: the documentation cannot drift from the registry
/usr/bin/python3 - "$src/README.md" "$tmp/out" <<'EOF' || fail "README's option tables and --help differ"
import re, sys
readme, help = open(sys.argv[1]).read(), open(sys.argv[2]).read()
opts = {}
for m in re.finditer(r'^  --([a-z0-9-]+) ?(.*)\n((?:      .*\n)*)', help, re.M):
    body = ' '.join(l.strip() for l in m.group(3).splitlines())
    d = re.search(r'\(default (.*?)\)(?: |$)', body)
    opts[m.group(1)] = (m.group(2).strip(), d.group(1) if d else None)
rows = {}
for line in readme.splitlines():
    m = re.match(r'^\| `--([a-z0-9-]+)` \|(.*)', line)
    if not m: continue
    cells = [c.strip().replace('\\|', '|') for c in re.split(r'(?<!\\)\|', m.group(2))]
    rows[m.group(1)] = (cells[0].replace(' ', ''), cells[1])
bad = [n for n in opts if n != 'config' and n not in rows] + [n for n in rows if n not in opts]
bad += ['%s: %s / %s' % (n, rows[n], opts[n]) for n in rows if n in opts and
        (rows[n][0] != opts[n][0].replace(' ', '') or rows[n][1] != opts[n][1])]
print('\n'.join(bad))
sys.exit(1 if bad or len(rows) < 100 else 0)
EOF
# --load and --model name two models: one usage error in every command that takes both, before
# either is read
for cmd in "generate --ids 1" "eval --ids 1" "convert --to hf $tmp/hf"; do
  # shellcheck disable=SC2086
  {
  unused "moe ${cmd%% *}: give --load or --model, not both" \
    "$moe" $cmd --load "$tmp/none" --model "$tmp/none"
  unused "moe ${cmd%% *}: give --load or --model, not both" \
    "$moe" $cmd --model "$tmp/none" --load "$tmp/none"
  }
done
# a flag that one form of a command reads and the other would ignore is refused in that form
# (one line, exit 2, before any file is read)
unused "moe eval: --dump-logits is for eval --model DIR; eval --load evaluates a token file (--data-path)" \
  "$moe" eval --load "$tmp/none" --dump-logits "$tmp/x.npy"
for f in "--ids 1,2" "--prompt hi" "--prompt-file $tmp/p.txt"; do
  # shellcheck disable=SC2086
  unused "moe eval: ${f%% *} is for eval --model DIR; eval --load evaluates a token file (--data-path)" \
    "$moe" eval --load "$tmp/none" $f
done
unused "moe generate: --ids is for generate --model DIR; generate --load continues a text (--prompt or --prompt-file)" \
  "$moe" generate --load "$tmp/none" --ids=1
for cmd in eval generate; do
  unused "moe $cmd: give --ids or --prompt, not both" "$moe" $cmd --model "$tmp/none" --ids 1 --prompt x
done
unused "moe eval: give --data or --ids/--prompt, not both" \
  "$moe" eval --model "$tmp/none" --data "$tmp/x.bin" --ids 1,2
unused "moe eval: --dump-logits writes the logits of --ids or --prompt, not of --data" \
  "$moe" eval --model "$tmp/none" --data "$tmp/x.bin" --dump-logits "$tmp/x.npy"
unused "moe eval: --micro-batch-size is for eval --load: eval --model runs one sequence at a time" \
  "$moe" eval --model "$tmp/none" --ids 1,2 --micro-batch-size 2
unused "moe eval: --seq-length is the window of eval --model --data (and of generate --model): eval's sequence of --ids or --prompt sets its own" \
  "$moe" eval --prompt x --model "$tmp/none" --seq-length 8
# checkpoint flags without --save write nothing: refused as --exit-interval is (not so the key
# in a config file: configs/default.cfg has save-interval)
for f in --save-interval --keep-last; do
  unused "moe train: $f is about checkpoints, which a run without --save does not write: it needs --save" \
    "$moe" train $f 1 --train-iters 1 --data-path "$tmp/none"
done
# usage errors exit 2: a malformed --inject-fault (before the data is read), convert without
# a model to convert
unused "moe train: inject-fault: 'nan@x' is not a list of KIND@STEP or KIND@FIRST-LAST with KIND one of nan-loss, inf-loss, nan-grad, inf-grad" \
  "$moe" train --inject-fault nan@x --data-path "$tmp/none"
unused "moe convert: --load RUN or --model DIR is required" "$moe" convert --to hf "$tmp/hf"
# --threads: eval and generate, both forms, run on the count asked for and say it (eval at the
# end of its line; generate on stderr, whose stdout is the text, and only when asked); a run's
# checkpoint keeps its own count for resuming, not for eval or generate (0: OMP_NUM_THREADS).
# Bitwise results are promised at one thread count (README, Determinism): 1 against 2 threads
# only has to run; one count twice gives the same text.
printf 'Mixture of experts.\n\nA small file of two documents.\n' >"$tmp/small.txt"
expect 0 "$moe" prepare --out "$tmp/data" --val-fraction 0 "$tmp/small.txt"
expect 0 "$moe" train --num-layers 1 --hidden-size 16 --num-attention-heads 4 --num-experts 4 \
  --moe-router-topk 2 --moe-ffn-hidden-size 16 --seq-length 16 --micro-batch-size 2 \
  --global-batch-size 2 --train-iters 1 --threads 1 --data-path "$tmp/data" --save "$tmp/run"
grep -q ", 1 threads" "$tmp/out" || fail "train --threads 1: $(cat "$tmp/out")"
expect 0 "$moe" convert --load "$tmp/run" --to hf "$tmp/xrun"
for n in 1 2; do
  expect 0 "$moe" eval --load "$tmp/run" --data "$tmp/data/train.bin" --threads $n
  grep -q "^eval .* loss [0-9.]* nats/token .*, $n threads$" "$tmp/out" ||
    fail "eval --load --threads $n: $(cat "$tmp/out")"
  expect 0 "$moe" eval --model "$tmp/xrun" --ids 77,105,120,116 --threads $n
  grep -q "^eval .* loss [0-9.]* nats/token over 3 targets, $n threads$" "$tmp/out" ||
    fail "eval --model --ids --threads $n: $(cat "$tmp/out")"
  expect 0 "$moe" eval --model "$tmp/xrun" --data "$tmp/data/train.bin" --threads $n
  grep -q "^eval .* perplexity [0-9.]*, $n threads$" "$tmp/out" ||
    fail "eval --model --data --threads $n: $(cat "$tmp/out")"
  for form in "--load $tmp/run --prompt Mix" "--model $tmp/xrun --ids 77,105,120"; do
    for run in a b; do
      # shellcheck disable=SC2086
      "$moe" generate $form --max-new-tokens 6 --seed 7 --threads $n >"$tmp/gen$run" 2>"$tmp/err" ||
        fail "generate $form --threads $n: $(cat "$tmp/gen$run" "$tmp/err")"
      [ "$(cat "$tmp/err")" = "moe generate: $n threads" ] && [ -s "$tmp/gen$run" ] ||
        fail "generate $form --threads $n: stderr '$(cat "$tmp/err")', stdout '$(cat "$tmp/gen$run")'"
    done
    cmp -s "$tmp/gena" "$tmp/genb" ||
      fail "generate $form --threads $n twice: $(cat "$tmp/gena" "$tmp/genb")"
  done
done
# a model without MoE layers has no expert load in its progress line
expect 0 "$moe" train --num-layers 2 --num-experts 0,0 --hidden-size 16 --num-attention-heads 4 \
  --ffn-hidden-size 16 --seq-length 16 --micro-batch-size 1 --global-batch-size 1 --train-iters 1 \
  --data-path "$tmp/data"
grep -q "^step 1/1 | .* | gnorm [0-9.]* | [0-9]* tok/s" "$tmp/out" || fail "dense progress: $(cat "$tmp/out")"
# training's checks are for training: eval takes any micro-batch (the run's global batch is
# 2), generate the run's top-2 router at top-1 (softmax after the top-k: a router that would
# learn nothing, which only training refuses); the same loss at every batch size
for b in 1 3; do
  expect 0 "$moe" eval --load "$tmp/run" --data "$tmp/data/train.bin" --micro-batch-size $b
  sed 's/.*: \([0-9]* tokens, loss [0-9.]*\) .*/\1/' "$tmp/out" >"$tmp/loss$b"
done
cmp -s "$tmp/loss1" "$tmp/loss3" || fail "eval at micro-batch 1 and 3: $(cat "$tmp/loss1" "$tmp/loss3")"
expect 0 "$moe" generate --load "$tmp/run" --prompt Mix --max-new-tokens 4 --moe-router-topk 1
# the report of a run without validation or balancing losses (all zero: nothing on the log
# axis) says so, with no NaN anywhere but in the run's path (mktemp's random letters can hold
# "nan" there: the likely cause of a CI run's failure on a correct report)
expect 0 "$moe" report "$tmp/run"
sed "s|$tmp/run||g" "$tmp/run/report.html" >"$tmp/report.text"
grep -q "final training loss [0-9.]*, no validation loss\.<" "$tmp/report.text" &&
  ! grep -qi "nan" "$tmp/report.text" ||
  fail "report: $(grep -o "steps, last[^<]*" "$tmp/report.text"); $(grep -oi ".\{0,20\}nan.\{0,20\}" "$tmp/report.text")"
# a report that cannot be written says why, and leaves what was there (written whole or not)
cp "$tmp/run/report.html" "$tmp/report.keep"; mv "$tmp/run/report.html" "$tmp/run/r.html"
mkdir "$tmp/run/report.html"
expect 1 "$moe" report "$tmp/run"
grep -q "cannot rename .*report.html.tmp to .*report.html: Is a directory" "$tmp/out" &&
  [ ! -e "$tmp/run/report.html.tmp" ] || fail "report not written: $(cat "$tmp/out")"
rmdir "$tmp/run/report.html"; mv "$tmp/run/r.html" "$tmp/run/report.html"
# past the sequence length (16) the window slides alike for the run and its conversion: the
# same text (the byte vocabulary: the converted model's tokenizer.json decodes it alike)
for form in "--load $tmp/run" "--model $tmp/xrun"; do
  # shellcheck disable=SC2086
  "$moe" generate $form --prompt Mix --max-new-tokens 45 --seed 3 --threads 1 >"$tmp/long${form%% *}" 2>&1 ||
    fail "generate $form past the sequence length: $(cat "$tmp/long${form%% *}")"
done
cmp -s "$tmp/long--load" "$tmp/long--model" ||
  fail "past the sequence length, the run and its conversion differ: $(cat "$tmp/long--load" "$tmp/long--model")"
expect 0 env OMP_NUM_THREADS=2 "$moe" eval --load "$tmp/run" --data "$tmp/data/train.bin"
grep -q ", 2 threads$" "$tmp/out" || fail "eval --load took the run's thread count: $(cat "$tmp/out")"
"$moe" generate --load "$tmp/run" --prompt Mix --max-new-tokens 2 >"$tmp/gen" 2>"$tmp/err" &&
  [ ! -s "$tmp/err" ] || fail "generate without --threads: stderr '$(cat "$tmp/err")'"
for cmd in "eval --load $tmp/run" "generate --model $tmp/xrun --ids 1"; do
  # shellcheck disable=SC2086
  {
  unused "moe ${cmd%% *}: --threads: -1 is out of range [0, 4096]" "$moe" $cmd --threads -1
  unused "moe ${cmd%% *}: --threads: expected an integer, got 'two'" "$moe" $cmd --threads two
  }
done
echo "cli ok"
