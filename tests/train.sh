#!/bin/sh
# End to end: prepare a small corpus, train a tiny MoE model, resume bitwise, and bad input
# (corrupt checkpoint, truncated token file, too long sequences, unwritable directory).
moe=$1; src=$2
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*"; exit 1; }
expect() { # expect CODE command...: runs it, checks the exit code; output in $tmp/out
  code=$1; shift
  "$@" >"$tmp/out" 2>&1; rc=$?
  [ "$rc" = "$code" ] || { tail -20 "$tmp/out"; fail "'$*' exited $rc, expected $code"; }
}
expect 0 "$moe" prepare --out "$tmp/data" --val-fraction 0.2 "$src/README.md" "$src/docs" "$src/include"
grep -q "prepared" "$tmp/out" || fail "prepare output"
# a file's last document counts without a final newline; links are followed; inputs without
# files are an error (not the default corpus)
mkdir "$tmp/p" "$tmp/p/empty"; printf 'first doc\n\nsecond doc' >"$tmp/p/two.txt"
ln -s "$tmp/p/two.txt" "$tmp/p/empty/link.txt"
expect 0 "$moe" prepare --out "$tmp/p/d" --val-fraction 0 "$tmp/p/empty"
grep -q "prepared 1 files: 2 documents, 22 tokens" "$tmp/out" || fail "last document: $(cat "$tmp/out")"
rm "$tmp/p/empty/link.txt"
expect 1 "$moe" prepare --out "$tmp/p/d" "$tmp/p/empty"
grep -q "the inputs hold no regular files" "$tmp/out" || fail "no input files: $(cat "$tmp/out")"
# an empty --out names no directory: a usage error, before anything is read or written
expect 2 "$moe" prepare --out "" "$tmp/p/two.txt"
grep -q "out needs a directory name" "$tmp/out" || fail "--out '': $(cat "$tmp/out")"
# an empty --val-fraction is no number; a library error is prefixed once
expect 2 "$moe" prepare --out "$tmp/p/d" --val-fraction "" "$tmp/p/two.txt"
grep -q "val-fraction must be in \[0, 1), got ''" "$tmp/out" ||
  fail "--val-fraction '': $(cat "$tmp/out")"
# --name=value, as the other commands take it; a flag without its value says so
expect 0 "$moe" prepare --out="$tmp/p/eq" --val-fraction=0 "$tmp/p/two.txt"
grep -q "2 documents, 22 tokens for training; 0 documents.* in $tmp/p/eq/{train,val}.bin" \
  "$tmp/out" || fail "prepare --out=DIR: $(cat "$tmp/out")"
expect 2 "$moe" prepare --out
[ "$(cat "$tmp/out")" = "moe prepare: --out needs a value" ] || fail "--out alone: $(cat "$tmp/out")"
printf ' \n\n' >"$tmp/p/blank.txt"
expect 1 "$moe" prepare --out "$tmp/p/d" "$tmp/p/blank.txt"
grep -q "^moe prepare: the input holds too little text for a train and a validation split" "$tmp/out" ||
  fail "blank input: $(cat "$tmp/out")"
expect 1 "$moe" prepare --val-fraction 0 --out "$tmp/p/d" "$tmp/p/blank.txt"
grep -q "^moe prepare: the input holds too little text for a train split (0 documents)$" "$tmp/out" ||
  fail "blank input without validation: $(cat "$tmp/out")"
# an input that prepare writes is refused: a stale .next of an interrupted run would be
# truncated before it is read, the train.bin and val.bin of an earlier run (here through a
# directory) read as text; the files stay as they were
cp "$tmp/p/two.txt" "$tmp/p/d/train.bin.next"; cp "$tmp/p/d/train.bin" "$tmp/p/before.bin"
expect 1 "$moe" prepare --out "$tmp/p/d" "$tmp/p/d/train.bin.next"
grep -q "input .*train.bin.next is .*train.bin.next, which this prepare writes: leave it out (an interrupted run left it" "$tmp/out" ||
  fail "stale .next as input: $(cat "$tmp/out")"
cmp -s "$tmp/p/two.txt" "$tmp/p/d/train.bin.next" || fail "the stale .next input was written"
cmp -s "$tmp/p/before.bin" "$tmp/p/d/train.bin" || fail "a refused prepare changed train.bin"
rm "$tmp/p/d/train.bin.next"
expect 1 "$moe" prepare --out "$tmp/p/d" "$tmp/p/two.txt" "$tmp/p/d"
grep -q "input .*d/train.bin is .*d/train.bin, which this prepare writes: leave it out$" "$tmp/out" ||
  fail "an earlier train.bin as input: $(cat "$tmp/out")"
cmp -s "$tmp/p/before.bin" "$tmp/p/d/train.bin" || fail "a refused prepare changed train.bin"
rm "$tmp/p/before.bin"
# the train/validation split is docs/FORMATS.md §1's hash of each document's bytes, computed
# here independently; every copy of a document falls on the same side (the third copies come
# from a second file); and each file is, byte for byte, the header, tokens, document table and
# source names that docs/FORMATS.md §1 gives for these documents, written here from the text
/usr/bin/python3 - "$tmp/p/dups.txt" "$tmp/p/dups2.txt" <<'EOF' || fail "writing the duplicates corpus"
import sys
for r in range(3):
    with open(sys.argv[1 + r // 2], "a") as f:
        for i in range(300):
            if i % 3 >= r: f.write(f"saying {i}{' and more' * (i % 5)}\n%\n")
EOF
expect 0 "$moe" prepare --out "$tmp/p/dups" --val-fraction 0.3 "$tmp/p/dups.txt" "$tmp/p/dups2.txt"
/usr/bin/python3 - "$tmp/p/dups.txt" "$tmp/p/dups2.txt" "$tmp/p/dups" <<'EOF' || fail "split by content"
import struct, sys
M, PHI = (1 << 64) - 1, 0x9E3779B97F4A7C15
def mix(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
    return z ^ (z >> 31)
def u64(seed, stream, i): return mix((mix(((seed * PHI) & M) ^ stream) + (i + 1) * PHI) & M)
stream = mix((5 * PHI + 0x632BE59BD9B4E019) & M)  # moe_rng_stream(MOE_RNG_DATA = 5, 1, 0, 0)
for c in ((1 + PHI) & M, 0xD1B54A32D192ED03, 0x8CB92BA72F3D8DD7):
    stream = mix(stream ^ c)
def to_val(doc, seed=1234, fraction=0.3):
    h = u64(seed, stream, len(doc))
    for k in range(0, len(doc), 8):
        h = u64(h, int.from_bytes(doc[k:k + 8], "little"), k // 8)
    return (h >> 11) / 2.0**53 < fraction
sources = sys.argv[1:3]
located = [(d + b"\n", s) for s in range(2) for d in open(sources[s], "rb").read().split(b"\n%\n")
           if d]  # (document, source index)
docs = [d for d, _ in located]
want = [[d for d in docs if not to_val(d)], [d for d in docs if to_val(d)]]
got = []
for side, name in enumerate(("train", "val")):
    b = open(f"{sys.argv[3]}/{name}.bin", "rb").read()
    tokens, table = [], b""
    for d, s in located:
        if to_val(d) == side:
            table += struct.pack("<QQ", len(tokens), s)
            tokens += list(d) + [256]
    expected = (b"MOETOKNS" + struct.pack("<IIQIIQ", 1, 2, len(tokens), 257, 256, len(table) // 16)
                + bytes(24) + struct.pack(f"<{len(tokens)}H", *tokens) + table
                + struct.pack("<I", len(sources))
                + b"".join(struct.pack("<I", len(s)) + s.encode() for s in sources))
    if b != expected:
        at = next((i for i, (x, y) in enumerate(zip(b, expected)) if x != y),
                  min(len(b), len(expected)))
        sys.exit(f"{name}.bin: {len(b)} bytes, expected {len(expected)}, first difference at {at}")
    n, nd = struct.unpack_from("<Q", b, 16)[0], struct.unpack_from("<Q", b, 32)[0]
    start = [struct.unpack_from("<Q", b, 64 + 2 * n + 16 * i)[0] for i in range(nd)] + [n]
    got.append([b[64 + 2 * start[i]:62 + 2 * start[i + 1]:2] for i in range(nd)])  # no eot
both, distinct, val = set(got[0]) & set(got[1]), len(set(docs)), len(set(got[1]))
print(f"{len(docs)} documents, {distinct} distinct, {val} of them in validation, {len(both)} "
      f"on both sides; the rule puts {len(want[1])} documents in validation")
if both or got != want or not 0.2 * distinct < val < 0.4 * distinct:
    sys.exit("copies on both sides, or not the documented rule's split, or not about 30 %")
EOF
tiny="--num-layers 2 --hidden-size 32 --num-attention-heads 4 --num-query-groups 2 --num-experts 4
  --moe-router-topk 2 --moe-ffn-hidden-size 24 --ffn-hidden-size 32 --first-k-dense 1
  --seq-length 32 --micro-batch-size 4 --global-batch-size 8 --eval-interval 5 --eval-iters 2
  --moe-aux-loss-coeff 0.01 --moe-z-loss-coeff 0.001 --moe-router-score-function sigmoid
  --moe-router-enable-expert-bias --moe-shared-expert-intermediate-size 16
  --lr-warmup-iters 3 --train-iters 12 --data-path $tmp/data"
# shellcheck disable=SC2086
expect 0 "$moe" train $tiny --save "$tmp/a" --save-interval 4 --keep-last 2
grep -q "step 12/12" "$tmp/out" && grep -q "sample:" "$tmp/out" || fail "train output"
[ "$(ls -d "$tmp"/a/step-* | wc -l)" = 2 ] || fail "keep-last 2: $(ls "$tmp/a")"
[ "$(cat "$tmp/a/latest")" = "step-00000012" ] || fail "latest: $(cat "$tmp/a/latest")"
[ "$(wc -l <"$tmp/a/metrics.jsonl")" = 12 ] || fail "metrics.jsonl lines"
grep -q '"expert_load":\[{"layer":1,"dropped":0,"counts":\[' "$tmp/a/metrics.jsonl" || fail "metrics.jsonl expert load"
ls "$tmp"/a/events.out.tfevents.* >/dev/null 2>&1 || fail "no TensorBoard event file"
# a finished run resumed has nothing to do and writes no event file (an empty one each time)
ls "$tmp"/a/events.out.tfevents.* >"$tmp/ev.before"; sleep 1
expect 0 "$moe" train --load "$tmp/a" --save "$tmp/a"
grep -q "nothing to do: the checkpoint is at step 12 of 12" "$tmp/out" || fail "nothing to do: $(cat "$tmp/out")"
ls "$tmp"/a/events.out.tfevents.* | cmp -s - "$tmp/ev.before" || fail "an event file for nothing: $(ls "$tmp/a")"
# stop at step 6, resume to 12: the same losses, bitwise, and the same optimizer state
# shellcheck disable=SC2086
expect 0 "$moe" train $tiny --save "$tmp/b" --exit-interval 6
grep -q "stopping after step 6" "$tmp/out" || fail "exit-interval"
expect 0 "$moe" train --load "$tmp/b" --save "$tmp/b"
grep -q "resumed from .*step-00000006 at step 6" "$tmp/out" || fail "resume message: $(head -3 "$tmp/out")"
strip() { sed 's/,"tokens_per_s":[0-9.]*//' "$1"; }
# resumes_alike NAME STOP FLAGS...: the run of FLAGS stopped after step STOP (into $tmp/NAME2)
# and resumed has the metrics of the run straight through, already in $tmp/NAME
resumes_alike() {
  name=$1 stop=$2
  shift 2
  expect 0 "$moe" train "$@" --save "$tmp/${name}2" --exit-interval "$stop"
  expect 0 "$moe" train --load "$tmp/${name}2" --save "$tmp/${name}2"
  strip "$tmp/$name/metrics.jsonl" >"$tmp/$name.m"
  strip "$tmp/${name}2/metrics.jsonl" >"$tmp/${name}2.m"
  cmp -s "$tmp/$name.m" "$tmp/${name}2.m" ||
    { diff "$tmp/$name.m" "$tmp/${name}2.m" | head -5; fail "$name resumed"; }
}
strip "$tmp/a/metrics.jsonl" >"$tmp/a.m"; strip "$tmp/b/metrics.jsonl" >"$tmp/b.m"
cmp -s "$tmp/a.m" "$tmp/b.m" || { diff "$tmp/a.m" "$tmp/b.m" | head -5; fail "resumed losses differ"; }
cmp -s "$tmp/a/step-00000012/trainer.safetensors" "$tmp/b/step-00000012/trainer.safetensors" \
  || fail "resumed optimizer state differs"
# the MoE layers as Megatron's pattern with counts per MoE layer, and as DeepSpeed's interval:
# metric for metric the runs of the same layers listed one count per layer (0 = dense)
same_layers() { # same_layers LIST FLAGS...
  list=$1
  shift
  # shellcheck disable=SC2086
  expect 0 "$moe" train $tiny --num-layers 3 --first-k-dense 0 --train-iters 3 \
    --num-experts "$list" --save "$tmp/kinds_list"
  # shellcheck disable=SC2086
  expect 0 "$moe" train $tiny --num-layers 3 --first-k-dense 0 --train-iters 3 "$@" \
    --save "$tmp/kinds"
  strip "$tmp/kinds_list/metrics.jsonl" >"$tmp/kinds_list.m"
  strip "$tmp/kinds/metrics.jsonl" >"$tmp/kinds.m"
  cmp -s "$tmp/kinds_list.m" "$tmp/kinds.m" ||
    { diff "$tmp/kinds_list.m" "$tmp/kinds.m" | head -5; fail "layers $*"; }
  rm -rf "$tmp/kinds_list" "$tmp/kinds"
}
same_layers 4,0,6 --moe-layer-freq "([1]+[0])+1*[1]" --num-experts 4 6
same_layers 0,6,0 --expert-interval 2 --num-experts 6
# --finetune (Megatron's): a new run from a checkpoint's weights and expert biases, at step 0
# with new Adam moments, the checkpoint's options under the flags: metric for metric the run
# from the same weights written as a Hugging Face directory (--init-from, another reader; a
# Mixtral-shaped model, which moe convert writes). That run routes as Mixtral does (a softmax over
# all experts, the top k renormalised), so the first one does too: Megatron's default (a softmax
# over the k selected logits) is the same function but rounds otherwise, and with some data a
# routing weight then differs in its last bit (the test's data is this repository's text)
mix="--num-layers 2 --hidden-size 32 --num-attention-heads 4 --num-query-groups 2 --num-experts 4
  --moe-router-topk 2 --moe-ffn-hidden-size 24 --seq-length 32 --micro-batch-size 4
  --global-batch-size 8 --eval-interval 2 --eval-iters 2 --moe-aux-loss-coeff 0.01
  --lr-warmup-iters 3 --data-path $tmp/data"
# shellcheck disable=SC2086
expect 0 "$moe" train $mix --moe-router-pre-softmax --moe-router-norm-topk-prob true --train-iters 3 \
  --save "$tmp/fm"
expect 0 "$moe" convert --load "$tmp/fm" --to hf "$tmp/bhf"
# shellcheck disable=SC2086
expect 0 "$moe" train $mix --train-iters 4 --init-from "$tmp/bhf" --save "$tmp/fi"
expect 0 "$moe" train --load "$tmp/fm/step-00000003" --finetune --train-iters 4 --save "$tmp/ff"
grep -q "initialised from the weights of $tmp/fm/step-00000003 (--finetune)" "$tmp/out" ||
  fail "finetune message: $(head -3 "$tmp/out")"
strip "$tmp/fi/metrics.jsonl" >"$tmp/fi.m"; strip "$tmp/ff/metrics.jsonl" >"$tmp/ff.m"
cmp -s "$tmp/fi.m" "$tmp/ff.m" || { diff "$tmp/fi.m" "$tmp/ff.m" | head -5; fail "finetune"; }
expect 2 "$moe" train --load "$tmp/b" --finetune --save "$tmp/b"
grep -q "already holds a checkpoint: --finetune starts a new run" "$tmp/out" ||
  fail "finetune into the run it loads: $(cat "$tmp/out")"
expect 2 "$moe" train --finetune --data-path "$tmp/data"
grep -q "finetune is about the checkpoint given with --load" "$tmp/out" || fail "$(cat "$tmp/out")"
expect 2 "$moe" train --load "$tmp/b" --finetune --init-from "$tmp/bhf" --save "$tmp/fb"
grep -q "not both" "$tmp/out" || fail "finetune and init-from: $(cat "$tmp/out")"
# a run given where a Hugging Face directory belongs says how to give it
expect 1 "$moe" train --init-from "$tmp/fm/step-00000003" --save "$tmp/fb"
grep -q "is a moe run or checkpoint (.*), not a Hugging Face model directory: give it with --load" \
  "$tmp/out" || fail "init-from a run: $(cat "$tmp/out")"
# DeepSpeed's eval_capacity_factor: evaluation with a factor of E/k (here 2) drops nothing (the
# dropless run's figures), with 0.5 it drops; a run trained with a capacity converts to a
# Hugging Face model (which never drops) only with an evaluation factor that drops nothing
expect 0 "$moe" eval --load "$tmp/fm" --data-path "$tmp/data"; cp "$tmp/out" "$tmp/fm.eval"
expect 0 "$moe" eval --load "$tmp/fm" --data-path "$tmp/data" --moe-eval-capacity-factor 2
cmp -s "$tmp/out" "$tmp/fm.eval" || fail "eval capacity E/k: $(cat "$tmp/out" "$tmp/fm.eval")"
expect 0 "$moe" eval --load "$tmp/fm" --data-path "$tmp/data" --moe-eval-capacity-factor 0.5
cmp -s "$tmp/out" "$tmp/fm.eval" && fail "eval capacity 0.5 dropped nothing: $(cat "$tmp/out")"
# shellcheck disable=SC2086
expect 0 "$moe" train $mix --train-iters 1 --moe-expert-capacity-factor 1 --save "$tmp/fcap"
expect 2 "$moe" convert --load "$tmp/fcap" --to hf "$tmp/fcap_hf"
grep -q "dropless outside training (moe-eval-capacity-factor E/k or more)" "$tmp/out" ||
  fail "convert of a capacity run: $(cat "$tmp/out")"
expect 0 "$moe" convert --load "$tmp/fcap" --to hf "$tmp/fcap_hf" --moe-eval-capacity-factor 2
# GShard's local groups: at a factor of E/k no group of 7 tokens drops anything either; a run
# keeps its group size; without a capacity factor the groups are refused
expect 0 "$moe" eval --load "$tmp/fm" --data-path "$tmp/data" --moe-eval-capacity-factor 2 \
  --moe-local-group-size 7
cmp -s "$tmp/out" "$tmp/fm.eval" || fail "local groups at E/k: $(cat "$tmp/out" "$tmp/fm.eval")"
# shellcheck disable=SC2086
expect 0 "$moe" train $mix --train-iters 1 --moe-expert-capacity-factor 1 \
  --moe-local-group-size 32 --save "$tmp/fgrp"
expect 0 "$moe" train --load "$tmp/fgrp" --print-config
grep -q "^moe-local-group-size = 32$" "$tmp/out" || fail "group size not kept: $(cat "$tmp/out")"
# shellcheck disable=SC2086
expect 2 "$moe" train $mix --train-iters 1 --moe-local-group-size 32 --save "$tmp/fgrp2"
grep -q "moe-local-group-size sets the groups a capacity applies to" "$tmp/out" ||
  fail "local groups without a capacity: $(cat "$tmp/out")"
[ ! -e "$tmp/fgrp2" ] || fail "a refused run wrote $tmp/fgrp2"
# Megatron's quantile balancing: a run stopped at step 2 and resumed has the losses of the
# run straight to 4 (the bias is in the checkpoint, each MoE layer's centred and not zero),
# keeps its type and ema; Hugging Face's formats and an aux loss with it are refused
qb="$mix --moe-aux-loss-coeff 0 --moe-router-load-balancing-type quantile_balancing
  --moe-router-quantile-balancing-ema 0.5 --train-iters 4"
# shellcheck disable=SC2086
expect 0 "$moe" train $qb --save "$tmp/qb"
# shellcheck disable=SC2086
resumes_alike qb 2 $qb
expect 0 "$moe" train --load "$tmp/qb" --print-config
grep -q "^moe-router-load-balancing-type = quantile_balancing$" "$tmp/out" &&
  grep -q "^moe-router-quantile-balancing-ema = 0.5$" "$tmp/out" || fail "qb config: $(cat "$tmp/out")"
/usr/bin/python3 - "$tmp/qb/step-00000004/trainer.safetensors" <<'EOF' || fail "qb bias"
import array, json, struct, sys
d = open(sys.argv[1], "rb").read()
n = struct.unpack_from("<Q", d)[0]; head = json.loads(d[8:8 + n]); base = 8 + n
for l in (0, 1):
    lo, hi = head[f"model.layers.{l}.mlp.gate.expert_bias"]["data_offsets"]
    b = array.array("f", d[base + lo:base + hi])
    assert len(b) == 4 and abs(sum(b)) < 1e-5 and max(map(abs, b)) > 1e-3, (l, list(b))
EOF
expect 2 "$moe" convert --load "$tmp/qb" --to hf "$tmp/qb_hf"
grep -q "no quantile balancing (a bias on the router's logits)" "$tmp/out" ||
  fail "convert of a qb run: $(cat "$tmp/out")"
# shellcheck disable=SC2086
expect 2 "$moe" train $mix --moe-router-load-balancing-type quantile_balancing --save "$tmp/qb3"
grep -q "aux losses must be off (moe-aux-loss-coeff 0)" "$tmp/out" || fail "qb with aux: $(cat "$tmp/out")"
# Megatron's upcycling: a dense run's weights go on as an MoE run at the dense run's step (its
# data position and schedule, new Adam moments), each expert a slice of its layer's dense MLP
# (G = 2 slices here) and the router rows repeated per group; with relu2 the scale is exact, so
# at learning rate 0 the upcycled model has the dense model's loss. With --finetune it starts at
# step 0. Refused:
# a width the experts' does not divide, experts not a multiple of G, a dense MLP without the
# gate the experts would need, an MoE checkpoint (the weights: exit 1); no --load, train-iters
# not above the dense step (usage: 2)
dense="$mix --num-experts 0,0 --moe-activation relu2 --ffn-hidden-size 48 --train-iters 2"
# shellcheck disable=SC2086
expect 0 "$moe" train $dense --save "$tmp/dense"
up="--moe-use-upcycling --num-experts 4 --moe-ffn-hidden-size 24 --lr 0 --min-lr 0 --train-iters 3"
# shellcheck disable=SC2086
expect 0 "$moe" train --load "$tmp/dense" $up --save "$tmp/up"
grep -q "upcycled the dense weights of .*dense/step-00000002 into experts, at step 2" "$tmp/out" &&
  [ "$(grep -c '"step":3,' "$tmp/up/metrics.jsonl")" = 1 ] &&
  [ "$(wc -l <"$tmp/up/metrics.jsonl")" = 1 ] || fail "upcycling: $(cat "$tmp/out")"
# shellcheck disable=SC2086
expect 0 "$moe" train --load "$tmp/dense" $up --finetune --train-iters 1 --save "$tmp/up0"
grep -q "into experts, at step 0 with new Adam moments" "$tmp/out" || fail "upcycling at 0: $(cat "$tmp/out")"
expect 0 "$moe" eval --load "$tmp/dense" --data-path "$tmp/data"; grep -o "loss [0-9.]*" "$tmp/out" >"$tmp/dense.loss"
expect 0 "$moe" eval --load "$tmp/up" --data-path "$tmp/data"; grep -o "loss [0-9.]*" "$tmp/out" >"$tmp/up.loss"
cmp -s "$tmp/dense.loss" "$tmp/up.loss" || fail "upcycled $(cat "$tmp/up.loss"), dense $(cat "$tmp/dense.loss")"
# the slices and their scales read back: s = E G / k with the softmax before the top k (4 G / 2
# here, cubed root for relu2), else G (square root for gelu); router rows 2r and 2r + 1 alike
# shellcheck disable=SC2086
expect 0 "$moe" train --load "$tmp/dense" $up --moe-router-pre-softmax --save "$tmp/up_pre"
# shellcheck disable=SC2086
expect 0 "$moe" train --load "$tmp/dense" $up --moe-activation gelu --save "$tmp/up_gelu"
/usr/bin/python3 - "$tmp/dense/step-00000002" "$tmp/up_pre/step-00000003" \
  "$tmp/up_gelu/step-00000003" <<'EOF' || fail "upcycled tensors"
import json, struct, sys
import numpy as np
def load(d):
    b = open(d + "/model.safetensors", "rb").read()
    n = struct.unpack_from("<Q", b)[0]; h = json.loads(b[8:8 + n]); h.pop("__metadata__", None)
    return {k: np.frombuffer(b[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]],
                             np.float32).reshape(v["shape"]) for k, v in h.items()}
dense, pre, gelu = (load(d) for d in sys.argv[1:])
for up, scale in ((pre, (4 * 2 / 2) ** (1 / 3)), (gelu, 2 ** 0.5)):
    for l in (0, 1):
        m = "model.layers.%d.mlp." % l
        for e in range(4):
            c = e % 2
            x = up[m + "experts.%d.up_proj.weight" % e]
            assert np.allclose(x, scale * dense[m + "up_proj.weight"][24 * c:24 * c + 24], rtol=1e-6, atol=0)
            x = up[m + "experts.%d.down_proj.weight" % e]
            assert np.allclose(x, scale * dense[m + "down_proj.weight"][:, 24 * c:24 * c + 24], rtol=1e-6, atol=0)
        g = up[m + "gate.weight"]
        assert (g[0] == g[1]).all() and (g[2] == g[3]).all() and not (g[0] == g[2]).all(), g
    assert (up["model.layers.1.self_attn.q_proj.weight"] == dense["model.layers.1.self_attn.q_proj.weight"]).all()
EOF
for bad in "--moe-ffn-hidden-size 20|a width that moe-ffn-hidden-size (20) divides" \
           "--num-experts 3|num-experts (3) must be a multiple of its dense width" \
           "--moe-activation swiglu|has no model.layers.0.mlp.gate_proj.weight"; do
  # shellcheck disable=SC2086
  expect 1 "$moe" train --load "$tmp/dense" $up ${bad%%|*} --save "$tmp/up2"
  grep -q "${bad#*|}" "$tmp/out" || fail "upcycling ${bad%%|*}: $(cat "$tmp/out")"
  [ ! -e "$tmp/up2" ] || fail "a refused upcycling wrote $tmp/up2"
done
# shellcheck disable=SC2086
expect 2 "$moe" train --load "$tmp/dense" $up --train-iters 2 --save "$tmp/up2"
grep -q "is at step 2: the upcycled run needs train-iters above it (2)" "$tmp/out" &&
  [ ! -e "$tmp/up2" ] || fail "upcycling at its last step: $(cat "$tmp/out")"
# shellcheck disable=SC2086
expect 1 "$moe" train --load "$tmp/up" $up --save "$tmp/up2"
grep -q "has no model.layers.0.mlp.down_proj.weight: upcycling makes the experts" "$tmp/out" ||
  fail "upcycling an MoE checkpoint: $(cat "$tmp/out")"
# shellcheck disable=SC2086
expect 2 "$moe" train $mix --moe-use-upcycling --save "$tmp/up2"
grep -q "moe-use-upcycling is about the checkpoint given with --load RUN" "$tmp/out" ||
  fail "upcycling without --load: $(cat "$tmp/out")"
# Megatron's moe-apply-probs-on-input: trains and resumes, keeps the setting; Hugging Face's
# formats refuse it, and so does the layer with biases in the experts
poi="$mix --moe-apply-probs-on-input --moe-router-topk 1 --moe-router-score-function sigmoid
  --train-iters 3"
# shellcheck disable=SC2086
expect 0 "$moe" train $poi --save "$tmp/poi"
# shellcheck disable=SC2086
resumes_alike poi 2 $poi
expect 0 "$moe" train --load "$tmp/poi" --print-config
grep -q "^moe-apply-probs-on-input = true$" "$tmp/out" || fail "poi config: $(cat "$tmp/out")"
expect 2 "$moe" convert --load "$tmp/poi" --to hf "$tmp/poi_hf"
grep -q "no routing weights on the experts' inputs" "$tmp/out" || fail "poi to hf: $(cat "$tmp/out")"
# shellcheck disable=SC2086
expect 2 "$moe" train $poi --moe-expert-linear-bias --save "$tmp/poi3"
grep -q "moe-apply-probs-on-input scales the experts' inputs: not with biases" "$tmp/out" ||
  fail "poi with biases: $(cat "$tmp/out")"
# Megatron's list of load-balancing types, each with its coefficient: at step 1 (the same
# parameters and routing) the aux metric is the sum of the runs with each type alone, and
# metrics.jsonl's aux_terms hold each of those; a run
# stopped at step 1 and resumed has the losses of the run straight to 3 (the global loss's
# counts start again each step); the checkpoint keeps both lists; a coefficient short is refused
lst="$mix --moe-router-load-balancing-type seq_aux_loss global_aux_loss
  --moe-aux-loss-coeff 0.02 0.005"
# shellcheck disable=SC2086
expect 0 "$moe" train $lst --train-iters 3 --save "$tmp/lst"
# shellcheck disable=SC2086
resumes_alike lst 1 $lst --train-iters 3
expect 0 "$moe" train --load "$tmp/lst" --print-config
grep -q "^moe-router-load-balancing-type = seq_aux_loss global_aux_loss$" "$tmp/out" &&
  grep -q "^moe-aux-loss-coeff = 0.02 0.005$" "$tmp/out" || fail "list config: $(cat "$tmp/out")"
for one in "seq_aux_loss 0.02" "global_aux_loss 0.005"; do
  # shellcheck disable=SC2086
  expect 0 "$moe" train $mix --train-iters 1 --moe-router-load-balancing-type ${one% *} \
    --moe-aux-loss-coeff ${one#* } --save "$tmp/lst_${one% *}"
done
/usr/bin/python3 - "$tmp/lst" "$tmp/lst_seq_aux_loss" "$tmp/lst_global_aux_loss" <<'EOF' ||
import json, sys
both, seq, glob = (json.loads(open(d + "/metrics.jsonl").readline()) for d in sys.argv[1:])
assert both["aux"] > 0 and seq["aux"] > 0 and glob["aux"] > 0, (both, seq, glob)
assert abs(both["aux"] - seq["aux"] - glob["aux"]) <= 1e-9 * both["aux"], (both, seq, glob)
# each logged on its own (a single type is "aux" alone)
assert both["aux_terms"] == {"seq_aux_loss": seq["aux"], "global_aux_loss": glob["aux"]}, both
assert "aux_terms" not in seq and "aux_terms" not in glob, (seq, glob)
assert both["nll"] == seq["nll"] == glob["nll"], (both, seq, glob)
EOF
  fail "the list's aux loss is not the sum of its types'"
# shellcheck disable=SC2086
expect 2 "$moe" train $mix --moe-router-load-balancing-type aux_loss seq_aux_loss --save "$tmp/lst3"
grep -q "gives 2 types and moe-aux-loss-coeff 1 coefficient" "$tmp/out" ||
  fail "a list with one coefficient: $(cat "$tmp/out")"
[ ! -e "$tmp/lst3" ] || fail "a refused run wrote $tmp/lst3"
# Tutel's cosine router: its four tensors per MoE layer in the checkpoint, no gate.weight, the
# temperature at ln(1 / init_t) to start; a run resumed has the losses of the run straight
# through; Hugging Face's formats refuse it
cos="$mix --moe-router-cosine-dim 8 --moe-router-cosine-init-temperature 0.25 --train-iters 4"
# shellcheck disable=SC2086
expect 0 "$moe" train $cos --save "$tmp/cos" --save-interval 2 --keep-last 2
# shellcheck disable=SC2086
resumes_alike cos 2 $cos
/usr/bin/python3 - "$tmp/cos/step-00000002/model.safetensors" "$tmp/cos/step-00000004/model.safetensors" <<'EOF' ||
import array, json, math, struct, sys
def tensors(path):
    d = open(path, "rb").read()
    n = struct.unpack_from("<Q", d)[0]; head = json.loads(d[8:8 + n]); base = 8 + n
    head.pop("__metadata__")
    return {k: (v["shape"], array.array("f", d[base + v["data_offsets"][0]:base + v["data_offsets"][1]]))
            for k, v in head.items()}
a, b = tensors(sys.argv[1]), tensors(sys.argv[2])
for l in (0, 1):
    g = f"model.layers.{l}.mlp.gate."
    assert g + "weight" not in a, "a linear router's weight"
    shapes = [a[g + n][0] for n in ("cosine_projector.weight", "cosine_projector.bias",
                                     "cosine_directions", "temperature")]
    assert shapes == [[8, 32], [8], [4, 8], [1]], shapes
    t2, t4 = a[g + "temperature"][1][0], b[g + "temperature"][1][0]
    assert abs(t2 - math.log(4)) < 0.05 and t4 != t2, (t2, t4)  # trained from ln(1 / 0.25)
EOF
  fail "cosine router tensors"
expect 2 "$moe" convert --load "$tmp/cos" --to hf "$tmp/cos_hf"
grep -q "no cosine router (Tutel's)" "$tmp/out" || fail "convert of a cosine run: $(cat "$tmp/out")"
# --no-load-optim: the step and the schedule go on, Adam starts over; after one step each
# moment holds one gradient g, m = (1 - beta1) g and v = (1 - beta2) g^2
expect 0 "$moe" train --load "$tmp/b/step-00000006" --no-load-optim --exit-interval 7 \
  --save "$tmp/no" --no-load-rng
grep -q "at step 6 with new Adam moments" "$tmp/out" || fail "no-load-optim: $(head -3 "$tmp/out")"
[ "$(sed -n 7p "$tmp/a/metrics.jsonl" | grep -o '"lr":[^,]*')" = \
  "$(grep -o '"lr":[^,]*' "$tmp/no/metrics.jsonl")" ] || fail "no-load-optim: another schedule"
/usr/bin/python3 - "$tmp/no/step-00000007/trainer.safetensors" <<'EOF' || fail "no-load-optim moments"
import array, json, struct, sys
d = open(sys.argv[1], "rb").read()
n = struct.unpack_from("<Q", d)[0]; head = json.loads(d[8:8 + n]); base = 8 + n
meta = head.pop("__metadata__")
assert meta["moe.step"] == "7" and meta["moe.updates"] == "1", meta
def get(name):
    lo, hi = head[name]["data_offsets"]; return array.array("f", d[base + lo:base + hi])
checked = 0
for name in head:
    if not name.startswith("optimizer.adam_m."): continue
    m, v = get(name), get(name.replace("adam_m", "adam_v"))
    for a, b in zip(m, v):
        if abs(a) > 1e-12:
            assert abs(b / (a * a) - 0.05 / 0.01) < 1e-4 * 5, (name, a, b)
            checked += 1
assert checked > 1000, checked
EOF
# a run with DeepSpeed's Jitter policy (whose jitter eps the checkpoint does not keep as its own)
# resumes bitwise
# shellcheck disable=SC2086
expect 0 "$moe" train $mix --train-iters 4 --moe-noisy-gate-policy Jitter --save "$tmp/j0"
# shellcheck disable=SC2086
expect 0 "$moe" train $mix --train-iters 4 --moe-noisy-gate-policy Jitter --save "$tmp/j1" \
  --exit-interval 2
expect 0 "$moe" train --load "$tmp/j1"
strip "$tmp/j0/metrics.jsonl" >"$tmp/j0.m"; strip "$tmp/j1/metrics.jsonl" >"$tmp/j1.m"
cmp -s "$tmp/j0.m" "$tmp/j1.m" || { diff "$tmp/j0.m" "$tmp/j1.m" | head -5; fail "Jitter resumed"; }
# a data directory with a space in its name trains; once it is gone, its checkpoint still
# generates (the blend form is checked where given, not in a checkpoint's options)
cp -r "$tmp/data" "$tmp/my data"
# shellcheck disable=SC2086
expect 0 "$moe" train $mix --train-iters 1 --data-path "$tmp/my data" --save "$tmp/spc"
mv "$tmp/my data" "$tmp/gone"
expect 0 "$moe" generate --load "$tmp/spc" --prompt x --max-new-tokens 2
# The rows of a step are the global batch's whatever the micro-batch size (Megatron's: it is
# memory, not data): micro-batches of 4 and of 2 train alike (no aux loss: it is per micro-batch)
for mb in 4 2; do
  # shellcheck disable=SC2086
  expect 0 "$moe" train $tiny --train-iters 3 --micro-batch-size $mb --moe-aux-loss-coeff 0 \
    --eval-interval 0 --save "$tmp/mb$mb"
done
/usr/bin/python3 - "$tmp/mb4/metrics.jsonl" "$tmp/mb2/metrics.jsonl" <<'EOF' || fail "micro-batch size changed the data"
import json, sys
a, b = ([json.loads(l) for l in open(p)] for p in sys.argv[1:])
for x, y in zip(a, b):
    for k in ("nll", "grad_norm"):
        assert abs(x[k] - y[k]) <= 1e-5 * abs(x[k]), (k, x[k], y[k])
assert len(a) == len(b) == 3
EOF
# A Megatron Mixtral script's flags (the seed's, at a tiny size) run as written: the flags for
# what moe.c always does change nothing (the same metrics as without them), events go to
# --tensorboard-dir; tensor parallelism and whole-model bf16 are refused saying why
mg="--num-layers 2 --hidden-size 32 --ffn-hidden-size 64 --num-attention-heads 4
  --num-query-groups 2 --seq-length 32 --max-position-embeddings 64 --init-method-std 0.01
  --untie-embeddings-and-output-weights --num-experts 4 --moe-router-load-balancing-type aux_loss
  --moe-router-topk 2 --moe-aux-loss-coeff 1e-2 --data-path $tmp/data --micro-batch-size 1
  --global-batch-size 4 --lr 1e-4 --train-iters 2 --lr-decay-iters 2 --lr-decay-style cosine
  --min-lr 1.0e-5 --weight-decay 0.1 --lr-warmup-iters 1 --clip-grad 1.0 --log-interval 1
  --eval-interval 2 --eval-iters 1"
noop="--use-mcore-models --disable-bias-linear --attention-dropout 0.0 --hidden-dropout 0.0
  --normalization RMSNorm --position-embedding-type rope --swiglu --group-query-attention
  --no-masked-softmax-fusion --no-position-embedding --moe-grouped-gemm
  --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --sequence-parallel
  --use-distributed-optimizer"
# shellcheck disable=SC2086
expect 0 "$moe" train $mg $noop --save "$tmp/mg" --save-interval 2 --tensorboard-dir "$tmp/mg/tb"
ls "$tmp"/mg/tb/events.out.tfevents.* >/dev/null 2>&1 && ! ls "$tmp"/mg/events.* >/dev/null 2>&1 ||
  fail "tensorboard-dir: $(ls "$tmp/mg" "$tmp/mg/tb")"
# shellcheck disable=SC2086
expect 0 "$moe" train $mg --save "$tmp/mg0"
strip "$tmp/mg/metrics.jsonl" >"$tmp/mg.m"; strip "$tmp/mg0/metrics.jsonl" >"$tmp/mg0.m"
cmp -s "$tmp/mg.m" "$tmp/mg0.m" || fail "Megatron's no-op flags changed the run"
# shellcheck disable=SC2086
expect 2 "$moe" train $mg --tensor-model-parallel-size 4
[ "$(cat "$tmp/out")" = "moe train: --tensor-model-parallel-size: only 1 is supported (Megatron's: tensor parallelism (1 only: the experts split over processes with expert-model-parallel-size))" ] ||
  fail "tensor parallelism: $(cat "$tmp/out")"
# shellcheck disable=SC2086
expect 2 "$moe" train $mg --bf16
grep -q "unknown option --bf16 (Megatron's: the whole model in bf16 is not implemented; moe-expert-bf16" \
  "$tmp/out" || fail "--bf16: $(cat "$tmp/out")"
# Megatron's blend of datasets: "--data-path W1 DIR1 W2 DIR2" as separate words (or one value, as
# --print-config writes it): trained on both, evaluated on each validation split and on the
# blend; resumed from the run's own options, bitwise the straight run
expect 0 "$moe" prepare --out "$tmp/d2" --val-fraction 0.3 "$src/README.md"
blend="--data-path 1 $tmp/data 3 $tmp/d2"
# shellcheck disable=SC2086
expect 0 "$moe" train $tiny $blend --train-iters 4 --eval-interval 2 --save "$tmp/bl"
grep -q "^data: a blend of 2 datasets: $tmp/data 0.25 $tmp/d2 0.75$" "$tmp/out" ||
  fail "blend: $(head -3 "$tmp/out")"
expect 0 "$moe" train --load "$tmp/bl" --print-config
grep -q "^data-path = 1 $tmp/data 3 $tmp/d2$" "$tmp/out" || fail "blend not kept: $(grep data "$tmp/out")"
# shellcheck disable=SC2086
expect 0 "$moe" train $tiny --data-path "1 $tmp/data 3 $tmp/d2" --train-iters 4 --eval-interval 2 \
  --save "$tmp/bl1" --exit-interval 2
expect 0 "$moe" train --load "$tmp/bl1" --save "$tmp/bl1"
strip "$tmp/bl/metrics.jsonl" >"$tmp/bl.m"; strip "$tmp/bl1/metrics.jsonl" >"$tmp/bl1.m"
cmp -s "$tmp/bl.m" "$tmp/bl1.m" || { diff "$tmp/bl.m" "$tmp/bl1.m" | head -4; fail "blend resumed"; }
# shellcheck disable=SC2086
expect 0 "$moe" train $tiny --train-iters 4 --eval-interval 2 --save "$tmp/bl0"
strip "$tmp/bl0/metrics.jsonl" | cmp -s - "$tmp/bl.m" && fail "the blend trained as the first dataset alone"
expect 0 "$moe" eval --load "$tmp/bl"
[ "$(grep -c "^eval .* on $tmp/\(data\|d2\)/val.bin: [0-9]* tokens, loss" "$tmp/out")" = 2 ] &&
  grep -q "^eval .* on the blend (its weights): loss " "$tmp/out" || fail "blend eval: $(cat "$tmp/out")"
# a dataset without a validation split is left out of the blend's evaluation, as in training;
# a blend of one directory is that directory's split
expect 0 "$moe" prepare --out "$tmp/d0" --val-fraction 0 "$src/README.md"
# shellcheck disable=SC2086
expect 0 "$moe" train $tiny --data-path 1 "$tmp/data" 1 "$tmp/d0" --train-iters 2 --save "$tmp/bl2"
expect 0 "$moe" eval --load "$tmp/bl2"
grep -q "^eval .*: $tmp/d0/val.bin holds no validation tokens: left out$" "$tmp/out" &&
  grep -q "^eval .* on the blend (its weights): loss " "$tmp/out" || fail "blend without val: $(cat "$tmp/out")"
expect 0 "$moe" eval --load "$tmp/bl2" --data-path 1 "$tmp/data"
grep -q "^eval .* on $tmp/data/val.bin: [0-9]* tokens" "$tmp/out" || fail "a blend of one: $(cat "$tmp/out")"
# expert choice ranks each token against the tokens after it: a model routed so is evaluated
# (whole sequences), not decoded token by token
# shellcheck disable=SC2086
expect 0 "$moe" train $tiny --train-iters 1 --moe-router-type expert_choice --moe-aux-loss-coeff 0 \
  --moe-router-score-function softmax --moe-router-enable-expert-bias=false --save "$tmp/ec"
cp "$tmp/out" "$tmp/ec.out"
expect 0 "$moe" eval --load "$tmp/ec" --data-path "$tmp/data"
expect 2 "$moe" generate --load "$tmp/ec" --prompt "The " --max-new-tokens 4
grep -q "expert choice.*cannot decode token by token" "$tmp/out" ||
  fail "generate with expert choice: $(cat "$tmp/out")"
grep -q "sample:" "$tmp/ec.out" && fail "train decoded a sample of an expert-choice model"
# a checkpoint of more shards than any fixed table (here 309: one per tensor, as an
# expert-parallel save over many ranks gives) loads: the same evaluation, and a resume from it
# the same optimizer state as from the one-file checkpoint
# shellcheck disable=SC2086
expect 0 "$moe" train $tiny --num-experts 96 --moe-ffn-hidden-size 8 --train-iters 2 --save "$tmp/w"
/usr/bin/python3 "$src/tests/reshard.py" "$tmp/w/step-00000002" "$tmp/wn" >"$tmp/out" 2>&1 &&
  [ "$(ls "$tmp"/wn/model-*.safetensors | wc -l)" -gt 256 ] || fail "reshard: $(cat "$tmp/out")"
expect 0 "$moe" eval --load "$tmp/w" --data-path "$tmp/data"
sed 's/^eval [^ ]*//' "$tmp/out" >"$tmp/w.eval"
expect 0 "$moe" eval --load "$tmp/wn" --data-path "$tmp/data"
sed 's/^eval [^ ]*//' "$tmp/out" | cmp -s - "$tmp/w.eval" || fail "309 shards: $(cat "$tmp/out")"
expect 0 "$moe" train --load "$tmp/w" --save "$tmp/w4" --train-iters 4
expect 0 "$moe" train --load "$tmp/wn" --save "$tmp/wn_4" --train-iters 4
cmp -s "$tmp/w4/step-00000004/trainer.safetensors" "$tmp/wn_4/step-00000004/trainer.safetensors" ||
  fail "a resume from 309 shards differs"
# a run stopped after its last checkpoint (here: 'latest' back at step 8 of a's copy) resumes
# into its own directory without --save, and its metrics are cut back to step 8 first: the same
# lines as the straight run, each step once
cp -r "$tmp/a" "$tmp/c"; echo step-00000008 >"$tmp/c/latest"
expect 0 "$moe" train --load "$tmp/c"
grep -q "saved checkpoint $tmp/c/step-00000012" "$tmp/out" || fail "resume without --save: $(cat "$tmp/out")"
strip "$tmp/c/metrics.jsonl" >"$tmp/c.m"
cmp -s "$tmp/a.m" "$tmp/c.m" || { diff "$tmp/a.m" "$tmp/c.m" | head -5; fail "metrics after a resume"; }
# the resumed run's event file tells TensorBoard to drop the copied steps 9..12 (a SessionLog
# START of step 9 after its file_version; TensorBoard purges the events of step >= 9 it read
# before): after that purge each step's scalars are there once (records read with their CRCs)
/usr/bin/python3 - "$tmp/c" >"$tmp/out" 2>&1 <<'EOF' || fail "events of a resume: $(cat "$tmp/out")"
import glob, struct, sys
def crc(b):
    c = 0xFFFFFFFF
    for x in b:
        c ^= x
        for _ in range(8): c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
    c ^= 0xFFFFFFFF
    return ((((c >> 15) | (c << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF
def varint(b, i):
    r = s = 0
    while True:
        r |= (b[i] & 0x7F) << s; s += 7; i += 1
        if not b[i - 1] & 0x80: return r, i
def fields(b):  # field number -> (wire type, value); the last one of a repeated field
    i, out = 0, {}
    while i < len(b):
        k, i = varint(b, i)
        if k & 7 == 0: v, i = varint(b, i)
        elif k & 7 == 1: v, i = b[i:i + 8], i + 8
        elif k & 7 == 5: v, i = b[i:i + 4], i + 4
        elif k & 7 == 2: n, i = varint(b, i); v, i = b[i:i + n], i + n
        else: sys.exit("wire type %d" % (k & 7))
        out[k >> 3] = (k & 7, v)
    assert i == len(b), "field overrun"
    return out
seen, starts = {}, []
for path in sorted(glob.glob(sys.argv[1] + "/events.out.tfevents.*")):
    d, i, prev = open(path, "rb").read(), 0, None
    while i < len(d):
        n = struct.unpack_from("<Q", d, i)[0]; rec = d[i + 12:i + 12 + n]
        assert struct.unpack_from("<I", d, i + 8)[0] == crc(d[i:i + 8]), "length CRC"
        assert struct.unpack_from("<I", d, i + 12 + n)[0] == crc(rec), "data CRC"
        i += n + 16
        ev = fields(rec); step = ev.get(2, (0, 0))[1]
        if 6 in ev:
            assert ev[6][0] == 2 and fields(ev[6][1]) == {1: (0, 1)}, "not a SessionLog START"
            assert prev is not None and 3 in prev, "START not right after a file_version"
            starts.append(step)
            seen = {k: v for k, v in seen.items() if k[0] < step}
        if 5 in ev:
            tag = fields(fields(ev[5][1])[1][1])[1][1].decode()
            seen[step, tag] = seen.get((step, tag), 0) + 1
        prev = ev
assert starts == [9], "SessionLog START steps %s" % starts
assert sorted({k[0] for k in seen}) == list(range(1, 13)), "steps %s" % sorted({k[0] for k in seen})
twice = [k for k, v in seen.items() if v != 1]
assert not twice, "more than once after the purge: %s" % twice[:3]
EOF
# a crash can leave a partial line or a tail of NUL bytes after the checkpoint's steps: the
# resumed run cuts them off and appends after whole lines (the straight run's lines), which
# moe report reads
for t in partial nul; do
  cp -r "$tmp/a" "$tmp/t_$t"; rm -r "$tmp/t_$t/step-00000012"
  echo step-00000008 >"$tmp/t_$t/latest"
  head -8 "$tmp/a/metrics.jsonl" >"$tmp/t_$t/metrics.jsonl"
  if [ $t = partial ]; then printf '{"step":1' >>"$tmp/t_$t/metrics.jsonl"
  else printf '\000\000\000\000\n\000\000\000' >>"$tmp/t_$t/metrics.jsonl"; fi
  expect 0 "$moe" train --load "$tmp/t_$t"
  strip "$tmp/t_$t/metrics.jsonl" | cmp -s "$tmp/a.m" - ||
    { strip "$tmp/t_$t/metrics.jsonl" | diff "$tmp/a.m" - | head -5; fail "metrics, $t tail"; }
  expect 0 "$moe" report "$tmp/t_$t"
done
# resuming never writes into another run's directory, nor over the newer checkpoints of its own
cp "$tmp/b/latest" "$tmp/b.latest"
expect 2 "$moe" train --load "$tmp/c/step-00000008" --save "$tmp/b"
grep -q "already holds checkpoints and .*step-00000008 is not its latest" "$tmp/out" || fail "other run: $(cat "$tmp/out")"
expect 2 "$moe" train --load "$tmp/c/step-00000008"
grep -q "already holds checkpoints" "$tmp/out" || fail "older checkpoint: $(cat "$tmp/out")"
cmp -s "$tmp/b/latest" "$tmp/b.latest" && [ -d "$tmp/c/step-00000012" ] || fail "a refused resume changed a run"
expect 0 "$moe" train --load "$tmp/c/step-00000008" --save "$tmp/c8" --train-iters 10
[ "$(cat "$tmp/c8/latest")" = "step-00000010" ] || fail "resume into a new directory"
# a train-iters below the checkpoint's step is a usage error that writes nothing
cp "$tmp/c/metrics.jsonl" "$tmp/c.metrics"; ls "$tmp/c" >"$tmp/c.files"
expect 2 "$moe" train --load "$tmp/c" --train-iters 4
[ "$(wc -l <"$tmp/out")" = 1 ] && grep -q "is at step 12, beyond train-iters 4" "$tmp/out" ||
  fail "train-iters below the checkpoint: $(cat "$tmp/out")"
ls "$tmp/c" | cmp -s - "$tmp/c.files" && cmp -s "$tmp/c/metrics.jsonl" "$tmp/c.metrics" ||
  fail "a refused resume wrote into the run: $(ls "$tmp/c")"
# a checkpoint whose model and trainer files are of different steps (an interrupted save)
cp "$tmp/c/step-00000008/trainer.safetensors" "$tmp/c/step-00000012/"
expect 1 "$moe" train --load "$tmp/c" --train-iters 14
grep -q "the model file is of step 12 and the trainer file of step 8" "$tmp/out" || fail "mixed steps: $(cat "$tmp/out")"
# a model file alone of a model that routes with expert biases (kept in the trainer file)
mkdir "$tmp/mo_only"; cp "$tmp/a/step-00000008/model.safetensors" "$tmp/mo_only/"
expect 1 "$moe" eval --load "$tmp/mo_only"
grep -q "trainer.safetensors.*(this model routes with selection biases, which a checkpoint keeps in trainer.safetensors)" \
  "$tmp/out" || fail "model file alone: $(cat "$tmp/out")"
# shellcheck disable=SC2086
expect 2 "$moe" train $tiny --exit-interval 6
grep -q "exit-interval stops with a checkpoint: it needs --save" "$tmp/out" || fail "exit-interval without --save"
# generation (KV cache), evaluation, inspection of the run
expect 0 "$moe" generate --load "$tmp/a" --prompt "The " --max-new-tokens 40 --top-k 20 --top-p 0.9
head -c 4 "$tmp/out" | grep -q "^The " || fail "generate output: $(cat "$tmp/out")"
expect 0 "$moe" eval --load "$tmp/a" --data-path "$tmp/data"
grep -q "perplexity" "$tmp/out" || fail "eval output: $(cat "$tmp/out")"
expect 0 "$moe" eval --load "$tmp/a" --data "$tmp/data/train.bin"
grep -q "train.bin: .* perplexity" "$tmp/out" || fail "eval --data FILE: $(cat "$tmp/out")"
# a --data that does not exist is named as given; text that is not UTF-8 for a model
# directory's tokenizer is named with the byte
expect 1 "$moe" eval --load "$tmp/a" --data "$tmp/nonexist.bin"
grep -q "cannot open $tmp/nonexist.bin: No such" "$tmp/out" ||
  fail "eval --data missing: $(cat "$tmp/out")"
# an empty validation split (prepared with --val-fraction 0) is said so, with how to give data
expect 1 "$moe" eval --load "$tmp/a" --data-path "$tmp/p/d"
grep -q "validation split $tmp/p/d/val.bin is empty (.*--val-fraction 0): .* --data-path FILE" \
  "$tmp/out" || fail "eval of an empty validation split: $(cat "$tmp/out")"
expect 0 "$moe" train --num-layers 1 --hidden-size 16 --num-attention-heads 2 --num-query-groups 2 \
  --num-experts 2 --moe-router-topk 2 --moe-ffn-hidden-size 8 --seq-length 16 --micro-batch-size 2 \
  --global-batch-size 2 --train-iters 1 --data-path "$tmp/data" --save "$tmp/m1"
expect 0 "$moe" convert --load "$tmp/m1" --to hf "$tmp/hf"
# found after a file that went to train.bin.next and val.bin.next: the previous pair stays
# as it was, and no .next file
printf 'good\n\nab\377cd\n' >"$tmp/p/bad.txt"
expect 0 "$moe" prepare --model "$tmp/hf" --out "$tmp/p/u" --val-fraction 0.2 "$src/SECURITY.md"
cp "$tmp/p/u/train.bin" "$tmp/p/train.before"; cp "$tmp/p/u/val.bin" "$tmp/p/val.before"
expect 1 "$moe" prepare --model "$tmp/hf" --out "$tmp/p/u" "$src/README.md" "$tmp/p/bad.txt"
grep -q "^moe prepare: $tmp/p/bad.txt is not UTF-8 (byte 8)$" "$tmp/out" ||
  fail "not UTF-8: $(cat "$tmp/out")"
cmp -s "$tmp/p/train.before" "$tmp/p/u/train.bin" && cmp -s "$tmp/p/val.before" "$tmp/p/u/val.bin" ||
  fail "a prepare that failed on its second file changed the pair"
[ "$(ls "$tmp/p/u")" = "$(printf 'train.bin\nval.bin')" ] || fail "prepare left $(ls "$tmp/p/u")"
# a prompt that is not UTF-8 is bad input: exit 2 in every command that encodes it
for cmd in tokenize generate eval; do
  expect 2 "$moe" $cmd --model "$tmp/hf" --prompt-file "$tmp/p/bad.txt"
  grep -q "^moe $cmd: the text is not UTF-8" "$tmp/out" || fail "$cmd, not UTF-8: $(cat "$tmp/out")"
done
# every layer dense (--num-experts 0,0): the top-k of experts that no layer has is not checked
expect 0 "$moe" train --num-layers 2 --hidden-size 16 --num-attention-heads 2 --num-query-groups 2 \
  --num-experts 0,0 --seq-length 16 --micro-batch-size 2 --global-batch-size 2 --train-iters 1 \
  --data-path "$tmp/data"
grep -q "2 layers (0 MoE)" "$tmp/out" || fail "dense model: $(cat "$tmp/out")"
# --print-config of a run started with --init-from reproduces it (init-from is written); the
# checkpoints do not keep it, so that resuming one is no new start
expect 0 "$moe" train --init-from "$tmp/hf" --train-iters 1 --micro-batch-size 2 \
  --global-batch-size 2 --data-path "$tmp/data" --print-config
cp "$tmp/out" "$tmp/init.cfg"
grep -q "^init-from = $tmp/hf$" "$tmp/init.cfg" || fail "print-config without init-from"
expect 0 "$moe" train --config "$tmp/init.cfg" --save "$tmp/fromhf"
grep -q "^initialised from $tmp/hf (mixtral)" "$tmp/out" || fail "printed config: $(cat "$tmp/out")"
expect 0 "$moe" train --load "$tmp/fromhf" --train-iters 2
grep -q "^resumed from $tmp/fromhf/step-00000001 at step 1" "$tmp/out" || fail "resume: $(cat "$tmp/out")"
expect 0 "$moe" inspect "$tmp/a"
grep -q "model.layers.1.mlp.experts.3.down_proj.weight" "$tmp/out" && grep -q "optimizer.adam_m" "$tmp/out" \
  || fail "inspect output: $(cat "$tmp/out")"
expect 2 "$moe" generate --prompt "x"
# a checkpoint whose final norm overflows the logits: generate stops with one clear error, not
# with text drawn from NaN probabilities
# set FILE TENSOR VALUE [INDEX]: every element of a tensor of a checkpoint file (or one) to VALUE
set_value() {
  /usr/bin/python3 - "$@" <<'EOF' || fail "writing $2"
import json, struct, sys
p, name, v = sys.argv[1], sys.argv[2], float(sys.argv[3])
b = bytearray(open(p, "rb").read()); n = struct.unpack("<Q", b[:8])[0]
a, e = json.loads(b[8:8 + n])[name]["data_offsets"]
at = range(8 + n + a, 8 + n + e, 4) if len(sys.argv) < 5 else [8 + n + a + 4 * int(sys.argv[4])]
for i in at: b[i:i + 4] = struct.pack("<f", v)
open(p, "wb").write(bytes(b))
EOF
}
cp -r "$tmp/a" "$tmp/nan"
set_value "$tmp/nan/$(cat "$tmp/nan/latest")/model.safetensors" model.norm.weight 3e38
expect 1 "$moe" generate --load "$tmp/nan" --prompt "x" --max-new-tokens 3
grep -q "the logits of new token 1 are not finite" "$tmp/out" || fail "NaN logits: $(cat "$tmp/out")"
# a NaN in a checkpoint's weights or Adam state (a negative second moment too) is refused on
# load by every command, before anything is written: a resumed run would otherwise save NaN
# checkpoints over the good ones
cp -r "$tmp/a" "$tmp/nan2"; last="$tmp/nan2/$(cat "$tmp/nan2/latest")"
set_value "$last/model.safetensors" model.layers.1.mlp.experts.2.up_proj.weight nan 5
cp -r "$tmp/fm" "$tmp/nan3" # (a model that converts)
set_value "$tmp/nan3/step-00000003/model.safetensors" model.layers.1.mlp.experts.2.up_proj.weight nan 5
for cmd in "eval --load $tmp/nan2 --data-path $tmp/data" "generate --load $tmp/nan2 --prompt x" \
  "train --load $tmp/nan2 --train-iters 14" "convert --load $tmp/nan3 --to hf $tmp/nan3hf"; do
  # shellcheck disable=SC2086
  expect 1 "$moe" $cmd
  grep -q "tensor 'model.layers.1.mlp.experts.2.up_proj.weight' holds a non-finite value (nan at element 5)" \
    "$tmp/out" || fail "$cmd of a NaN checkpoint: $(cat "$tmp/out")"
done
[ ! -e "$tmp/nan3hf" ] && [ "$(cat "$tmp/nan2/latest")" = step-00000012 ] &&
  [ "$(ls "$tmp/nan2")" = "$(ls "$tmp/a")" ] || fail "a NaN checkpoint's load wrote"
cp -r "$tmp/a" "$tmp/nanb"; last="$tmp/nanb/$(cat "$tmp/nanb/latest")" # an expert bias
set_value "$last/trainer.safetensors" model.layers.1.mlp.gate.expert_bias inf 2
expect 1 "$moe" eval --load "$tmp/nanb" --data-path "$tmp/data"
grep -q "tensor 'model.layers.1.mlp.gate.expert_bias' holds a non-finite value (inf at element 2)" \
  "$tmp/out" || fail "a non-finite expert bias: $(cat "$tmp/out")"
for v in nan -1; do
  cp -r "$tmp/a" "$tmp/nanv"; last="$tmp/nanv/$(cat "$tmp/nanv/latest")"
  set_value "$last/trainer.safetensors" optimizer.adam_v.model.norm.weight "$v" 3
  expect 1 "$moe" train --load "$tmp/nanv" --train-iters 14
  grep -q "optimizer.adam_v.model.norm.weight.* (element 3: $v; --no-load-optim starts Adam over)" \
    "$tmp/out" || fail "Adam state $v: $(cat "$tmp/out")"
  expect 0 "$moe" train --load "$tmp/nanv" --train-iters 13 --no-load-optim # the way out
  grep -q "^step 13/13 | loss [0-9]" "$tmp/out" || fail "no-load-optim past bad moments: $(cat "$tmp/out")"
  rm -r "$tmp/nanv"
done
# an empty tensor where another begins (files put them there) is no overlap, in either order of
# the header; one inside another's bytes is
for order in ab ba inside; do
  /usr/bin/python3 - "$tmp/z_$order.safetensors" "$order" <<'EOF' || fail "writing $order"
import json, struct, sys
at = 4 if sys.argv[2] == "inside" else 0
meta = {"a": {"dtype": "F32", "shape": [0], "data_offsets": [at, at]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
h = json.dumps({k: meta[k] for k in (["b", "a"] if sys.argv[2] == "ba" else ["a", "b"])}).encode()
h += b" " * (-len(h) % 8)
open(sys.argv[1], "wb").write(struct.pack("<Q", len(h)) + h + struct.pack("<2f", 1.5, -2))
EOF
done
expect 0 "$moe" inspect "$tmp/z_ab.safetensors"
expect 0 "$moe" inspect "$tmp/z_ba.safetensors"
expect 1 "$moe" inspect "$tmp/z_inside.safetensors"
grep -q "tensors 'b' and 'a' overlap" "$tmp/out" || fail "overlap message: $(cat "$tmp/out")"
# the prompt is its bytes, NUL included; a truncated checkpoint or one without files is an
# error for inspect; flags that drop tensors of the checkpoint are refused
printf 'The \000 doc' >"$tmp/nul.txt"
expect 0 "$moe" generate --load "$tmp/a" --prompt-file "$tmp/nul.txt" --max-new-tokens 4 --temperature 0
head -c 9 "$tmp/out" | cmp -s - "$tmp/nul.txt" || fail "prompt with a NUL byte: $(od -c "$tmp/out" | head -2)"
cp -r "$tmp/a/step-00000008" "$tmp/ins"; head -c 500 "$tmp/a/step-00000008/model.safetensors" >"$tmp/ins/model.safetensors"
expect 1 "$moe" inspect "$tmp/ins"
mkdir -p "$tmp/ins2/step-00000001"; echo step-00000001 >"$tmp/ins2/latest"
expect 1 "$moe" inspect "$tmp/ins2"
grep -q "holds no .safetensors files" "$tmp/out" || fail "inspect without files: $(cat "$tmp/out")"
# every safetensors dtype is listed (FP8 checkpoints, integer and bool buffers), though only
# float tensors load as parameters; a text value's lines counted whole
/usr/bin/python3 - "$tmp/f8.safetensors" <<'EOF' || fail "writing f8.safetensors"
import json, struct, sys
hdr = {"a": {"dtype": "F8_E4M3", "shape": [2, 3], "data_offsets": [0, 6]},
       "b": {"dtype": "BOOL", "shape": [2], "data_offsets": [6, 8]},
       "c": {"dtype": "U16", "shape": [3], "data_offsets": [8, 14]},
       "__metadata__": {"note": "v\nnewline"}}
h = json.dumps(hdr).encode()
open(sys.argv[1], "wb").write(struct.pack("<Q", len(h)) + h + bytes(14))
EOF
expect 0 "$moe" inspect "$tmp/f8.safetensors"
grep -q "^  a  *F8_E4M3 \[2, 3\]$" "$tmp/out" && grep -q "^  b  *BOOL \[2\]$" "$tmp/out" &&
  grep -q "^  c  *U16  \[3\]$" "$tmp/out" && grep -q "metadata note: 2 lines of text" "$tmp/out" ||
  fail "inspect of other dtypes: $(cat "$tmp/out")"
expect 1 "$moe" eval --load "$tmp/a" --data-path "$tmp/data" --num-layers 1 --first-k-dense 0
grep -q "holds model.layers.[01].* which this model does not have" "$tmp/out" || fail "fewer layers: $(cat "$tmp/out")"
[ -f "$tmp/a/topics.json" ] || fail "no topics.json"
expect 0 "$moe" report "$tmp/a"
grep -q "<svg" "$tmp/a/report.html" && grep -q "experts used by each topic" "$tmp/a/report.html" \
  && grep -q "LAYER.md" "$tmp/a/report.html" || fail "report.html content"
echo "not json" >>"$tmp/a/metrics.jsonl"
expect 1 "$moe" report "$tmp/a"
grep -q "metrics.jsonl:13: not a JSON object" "$tmp/out" || fail "report on bad metrics: $(cat "$tmp/out")"
mkdir "$tmp/rep"; echo '{"step":1,"loss":2,"expert_load":[{"counts":[1,2]}]}' >"$tmp/rep/metrics.jsonl"
expect 1 "$moe" report "$tmp/rep"
grep -q "metrics.jsonl:1: expert_load is not a list" "$tmp/out" || fail "report, entry without layer: $(cat "$tmp/out")"
head -3 "$tmp/b/metrics.jsonl" >"$tmp/rep/metrics.jsonl"; echo '{"topics":[{"name":"y","layers":[{"layer":1}]}]}' >"$tmp/rep/topics.json"
expect 1 "$moe" report "$tmp/rep"
grep -q "topics.json is not" "$tmp/out" || fail "report, topic without counts: $(cat "$tmp/out")"
# metrics.jsonl is read by length: a NUL byte makes its line malformed (it ended the reading
# before); a complete malformed line is an error whose number counts blank lines; an incomplete
# last line (a run stopped while writing it) is left out with a warning, a complete one is read
mkdir "$tmp/rp"
{ head -3 "$tmp/b/metrics.jsonl"; printf '\000\000\n'; sed -n 4,6p "$tmp/b/metrics.jsonl"; } \
  >"$tmp/rp/metrics.jsonl"
expect 1 "$moe" report "$tmp/rp"
[ "$(cat "$tmp/out")" = "moe report: $tmp/rp/metrics.jsonl:4: not a JSON object" ] ||
  fail "report, NUL bytes: $(cat "$tmp/out")"
{ head -1 "$tmp/b/metrics.jsonl"; echo; echo; echo "not json"; } >"$tmp/rp/metrics.jsonl"
expect 1 "$moe" report "$tmp/rp"
grep -q "metrics.jsonl:4: not a JSON object" "$tmp/out" ||
  fail "report, blank lines: $(cat "$tmp/out")"
{ head -3 "$tmp/b/metrics.jsonl"; printf '{"step":4,"lo'; } >"$tmp/rp/metrics.jsonl"
expect 0 "$moe" report "$tmp/rp"
grep -q "^moe report: warning: .*metrics.jsonl:4: left out an incomplete last line" "$tmp/out" &&
  [ "$(wc -l <"$tmp/out")" = 2 ] && grep -q ": 3 steps, last step 3," "$tmp/rp/report.html" ||
  fail "report, incomplete last line: $(cat "$tmp/out")"
{ head -3 "$tmp/b/metrics.jsonl"; sed -n 4p "$tmp/b/metrics.jsonl" | tr -d '\n'; } \
  >"$tmp/rp/metrics.jsonl"
expect 0 "$moe" report "$tmp/rp"
[ "$(wc -l <"$tmp/out")" = 1 ] && grep -q ": 4 steps, last step 4," "$tmp/rp/report.html" ||
  fail "report, last line without a newline: $(cat "$tmp/out")"
# a record of fewer experts or without expert_load: what it leaves out is drawn as no tokens
# (white), the same whatever memory holds (glibc's perturb fills fresh allocations: 64 experts
# make them too large for its per-thread cache, which it does not fill)
printf '%s\n' '{"step":1,"loss":1,"expert_load":[{"layer":1,"counts":['"$(seq -s, 1 64)"']}]}' \
  '{"step":2,"loss":1,"expert_load":[{"layer":1,"counts":[5]}]}' '{"step":3,"loss":1}' \
  >"$tmp/rp/metrics.jsonl"
for p in 0 170; do
  expect 0 env GLIBC_TUNABLES=glibc.malloc.perturb=$p "$moe" report "$tmp/rp"
  [ "$(grep -o 'rgb(255,255,255)' "$tmp/rp/report.html" | wc -l)" = 127 ] ||
    fail "report, fewer experts (perturb $p): $(grep -o 'rgb([0-9,]*)' "$tmp/rp/report.html")"
done
# every MoE layer gets its heatmap (there were 64 at most), and a heatmap stays under 20000 cells
# (here 250 steps x 300 experts): steps and experts are averaged, as its caption says
cat >"$tmp/gen.py" <<'EOF'
import json, sys
L, E, n = (int(a) for a in sys.argv[2:])  # layers, experts, steps
with open(sys.argv[1], "w") as f:
    for s in range(1, n + 1):
        load = [{"layer": l, "counts": [(s * e + l) % 7 for e in range(E)]} for l in range(L)]
        f.write(json.dumps({"step": s, "loss": 1, "expert_load": load}) + "\n")
EOF
/usr/bin/python3 "$tmp/gen.py" "$tmp/rp/metrics.jsonl" 70 2 3
expect 0 "$moe" report "$tmp/rp"
[ "$(grep -o "layer [0-9]*: expert load" "$tmp/rp/report.html" | wc -l)" = 70 ] &&
  grep -q "layer 69: expert load" "$tmp/rp/report.html" || fail "report of 70 MoE layers"
/usr/bin/python3 "$tmp/gen.py" "$tmp/rp/metrics.jsonl" 1 300 250
expect 0 "$moe" report "$tmp/rp"
cells=$(grep -o "<rect" "$tmp/rp/report.html" | wc -l)
[ "$cells" -le 20002 ] && grep -q "experts 0..299 in 100 groups of about 3 (their mean); columns: \
200, each the mean of about 1.25 steps" "$tmp/rp/report.html" ||
  fail "report, heatmap of 250 steps x 300 experts: $cells cells"
if command -v chromium >/dev/null 2>&1; then # the page renders (where a browser is installed)
  sed -i '$d' "$tmp/a/metrics.jsonl"
  expect 0 "$moe" report "$tmp/a"
  timeout 60 chromium --headless --no-sandbox --disable-gpu --screenshot="$tmp/report.png" \
    --window-size=760,1600 "file://$tmp/a/report.html" >/dev/null 2>&1
  [ -s "$tmp/report.png" ] || fail "chromium did not render report.html"
fi
# SIGTERM: the run saves a checkpoint and exits with 128 + 15, as a shell reports a process a
# signal ended (a scheduler tells it from a finished run); SIGINT without --save: 128 + 2
# shellcheck disable=SC2086
for sig in TERM INT; do
  n=15 save=""
  [ $sig = INT ] && n=2
  [ $sig = TERM ] && save="--save $tmp/sig"
  "$moe" train $tiny --train-iters 1000000 $save >"$tmp/sig.log" 2>&1 &
  pid=$!
  for _ in $(seq 50); do grep -q "^step 1/" "$tmp/sig.log" 2>/dev/null && break; sleep 0.1; done
  sleep 0.5
  kill -$sig $pid
  wait $pid; rc=$?
  [ "$rc" = $((128 + n)) ] || { tail -5 "$tmp/sig.log"; fail "SIG$sig: exit $rc"; }
  tail="$([ $sig = TERM ] || echo " (no --save: nothing saved)")"
  grep -q "^stopped by signal $n after step [0-9]*$tail\$" "$tmp/sig.log" ||
    fail "SIG$sig: $(tail -2 "$tmp/sig.log")"
done
[ -f "$tmp/sig/latest" ] || fail "SIGTERM: no checkpoint"
# a storm of SIGTERMs during a step: one stop, with a checkpoint. The signals must not be
# handled on a computing thread: oneDNN 2.6's GEMM kernels point rsp into the heap, where a
# signal frame then lands (the heap was corrupted in most runs of this test when they were);
# and a second signal must not fall back to the default action (it killed the run)
# (steps of 8 micro-batches, about a second here, which the storm's 30 ms fall well inside: the
# signals must all arrive before the run stops and restores the default action)
"$moe" train --config "$src/configs/default.cfg" --num-layers 1 --micro-batch-size 32 \
  --global-batch-size 256 --data-path "$tmp/data" --save "$tmp/storm" >"$tmp/storm.log" 2>&1 &
pid=$!
for _ in $(seq 100); do grep -q "^step 1/" "$tmp/storm.log" 2>/dev/null && break; sleep 0.1; done
sleep 0.05 # inside step 2
n=0
while [ $n -lt 3000 ] && kill -TERM $pid 2>/dev/null; do n=$((n + 1)); done
wait $pid; rc=$?
[ "$rc" = 143 ] && grep -q "stopped by signal 15" "$tmp/storm.log" && [ -f "$tmp/storm/latest" ] ||
  { tail -3 "$tmp/storm.log"; fail "a storm of $n SIGTERMs: exit $rc"; }
# a fresh run never overwrites an earlier run's checkpoints
# shellcheck disable=SC2086
expect 2 "$moe" train $tiny --save "$tmp/a"
grep -q "already holds a checkpoint" "$tmp/out" || fail "overwrite guard: $(cat "$tmp/out")"
# ... also when its 'latest' file is gone (the newest step-N stands for it), or when it holds
# only metrics.jsonl; the newest checkpoint resumes, named with a trailing slash too
cp -r "$tmp/b" "$tmp/nl"; rm "$tmp/nl/latest"; ls -R "$tmp/nl" >"$tmp/nl.files"
cp "$tmp/nl/metrics.jsonl" "$tmp/nl.m"
# shellcheck disable=SC2086
expect 2 "$moe" train $tiny --save "$tmp/nl"
grep -q "already holds checkpoints (no 'latest' file); resume with --load .*nl/step-00000012" \
  "$tmp/out" || fail "no latest, fresh run: $(cat "$tmp/out")"
expect 2 "$moe" train --load "$tmp/nl/step-00000006"
grep -q "no 'latest' file and .*step-00000006 is not its newest checkpoint" "$tmp/out" ||
  fail "no latest, older checkpoint: $(cat "$tmp/out")"
ls -R "$tmp/nl" | cmp -s "$tmp/nl.files" - && cmp -s "$tmp/nl.m" "$tmp/nl/metrics.jsonl" ||
  fail "a refused run changed a run directory without 'latest'"
mkdir "$tmp/mo"; cp "$tmp/nl.m" "$tmp/mo/metrics.jsonl"
# shellcheck disable=SC2086
expect 2 "$moe" train $tiny --save "$tmp/mo"
grep -q "holds a run's files (metrics.jsonl) but no checkpoint" "$tmp/out" &&
  cmp -s "$tmp/nl.m" "$tmp/mo/metrics.jsonl" || fail "metrics only: $(cat "$tmp/out")"
expect 0 "$moe" train --load "$tmp/nl/step-00000012/" --train-iters 13
[ "$(cat "$tmp/nl/latest")" = "step-00000013" ] || fail "resume from the newest without latest"
# a save killed before its last file (no 'latest' yet): that step is no checkpoint, the newest
# whole one resumes; a first save killed so leaves a run that says to choose another --save
cp -r "$tmp/b" "$tmp/ks"; rm "$tmp/ks/latest"
mv "$tmp/ks/step-00000012/trainer.safetensors" "$tmp/ks/step-00000012/trainer.safetensors.tmp"
expect 0 "$moe" train --load "$tmp/ks/step-00000006" --train-iters 7
[ "$(cat "$tmp/ks/latest")" = "step-00000007" ] || fail "resume past a killed save: $(cat "$tmp/out")"
mkdir -p "$tmp/k1/step-00000001"; head -1 "$tmp/b/metrics.jsonl" >"$tmp/k1/metrics.jsonl"
cp "$tmp/b/step-00000006/model.safetensors" "$tmp/k1/step-00000001/"
# shellcheck disable=SC2086
expect 2 "$moe" train $tiny --save "$tmp/k1"
grep -q "holds a run's files (metrics.jsonl) but no checkpoint: choose another --save" "$tmp/out" ||
  fail "a killed first save: $(cat "$tmp/out")"
# bad input: one clear line, non-zero exit, nothing saved is lost
cp -r "$tmp/a/step-00000012" "$tmp/keep"
head -c 3000 "$tmp/a/step-00000012/model.safetensors" >"$tmp/trunc.st"
cp "$tmp/trunc.st" "$tmp/a/step-00000012/model.safetensors"
expect 1 "$moe" train --load "$tmp/a"
grep -q "exceeds the file\|do not fit" "$tmp/out" || fail "truncated checkpoint message: $(cat "$tmp/out")"
cp "$tmp/keep/model.safetensors" "$tmp/a/step-00000012/model.safetensors"
# shellcheck disable=SC2086
expect 1 "$moe" train $tiny --load "$tmp/a" --moe-ffn-hidden-size 16
grep -q "has shape" "$tmp/out" || fail "shape mismatch message: $(cat "$tmp/out")"
cmp -s "$tmp/keep/model.safetensors" "$tmp/a/step-00000012/model.safetensors" || fail "checkpoint changed"
head -c 1000 "$tmp/data/train.bin" >"$tmp/data/short.bin"; mkdir "$tmp/bad"; cp "$tmp/data/short.bin" "$tmp/bad/train.bin"; cp "$tmp/data/val.bin" "$tmp/bad/val.bin"
# shellcheck disable=SC2086
expect 1 "$moe" train $tiny --data-path "$tmp/bad"
grep -q "truncated" "$tmp/out" || fail "truncated token file message: $(cat "$tmp/out")"
# token files whose fields break docs/FORMATS.md §1, each refused by name; and a train.bin and
# val.bin of different vocabularies are no pair
/usr/bin/python3 - "$tmp/data/val.bin" "$tmp/tok" <<'EOF' || fail "writing malformed token files"
import struct, sys
b = open(sys.argv[1], "rb").read(); out = sys.argv[2]
n, nd = struct.unpack_from("<Q", b, 16)[0], struct.unpack_from("<Q", b, 32)[0]
docs = 64 + 2 * n
def put(name, data): open(f"{out}_{name}.bin", "wb").write(data)
def field(at, fmt, v, data=b): d = bytearray(data); struct.pack_into(fmt, d, at, v); return bytes(d)
put("reserved", field(50, "<B", 1))
put("first", field(docs, "<Q", 1))
put("nodocs", field(32, "<Q", 0, b[:docs] + b[docs + 16 * nd:]))
put("eot257", field(28, "<I", 10))
put("docend", field(28, "<I", 299, field(24, "<I", 300)))
put("v300", field(24, "<I", 300))
EOF
for c in "reserved:reserved header byte 50 is not zero" "first:bad document table entry 0" \
    "nodocs:tokens in no document" "eot257:end-of-text id 10 with the byte vocabulary" \
    "docend:document 0 does not end with the end-of-text id 299"; do
  expect 1 "$moe" eval --load "$tmp/a" --data "$tmp/tok_${c%%:*}.bin"
  grep -q "tok_${c%%:*}.bin: .*${c#*:}" "$tmp/out" || fail "token file ${c%%:*}: $(cat "$tmp/out")"
done
cp "$tmp/data/train.bin" "$tmp/bad/train.bin"; cp "$tmp/tok_v300.bin" "$tmp/bad/val.bin"
# shellcheck disable=SC2086
expect 1 "$moe" train $tiny --data-path "$tmp/bad" --vocab-size 300
grep -q "train.bin and .*val.bin are not a pair: vocabulary 257 and 300" "$tmp/out" ||
  fail "mismatched train.bin and val.bin: $(cat "$tmp/out")"
# without validation tokens (--val-fraction 0) nothing is evaluated: the run says so once, and no
# line, metric or TensorBoard value calls the training loss a validation loss
expect 0 "$moe" prepare --out "$tmp/noval" --val-fraction 0 "$src/README.md"
# shellcheck disable=SC2086
expect 0 "$moe" train $tiny --train-iters 3 --eval-interval 1 \
  --data-path "$tmp/noval" --save "$tmp/nv"
[ "$(grep -c "holds no validation tokens" "$tmp/out")" = 1 ] ||
  fail "no validation note: $(cat "$tmp/out")"
grep -q "val_nll" "$tmp/nv/metrics.jsonl" && fail "val_nll in metrics.jsonl without val.bin"
grep -q "val/nll" "$tmp"/nv/events.out.tfevents.* && fail "val/nll in TensorBoard without val.bin"
grep "val nll" "$tmp/out" && fail "a val nll without validation tokens"
grep -q "^done: 3 steps in .* tokens/s)$" "$tmp/out" ||
  fail "done line without validation: $(cat "$tmp/out")"
# a vocabulary of other than bytes (here 300): evaluations are per token, as the done line is
/usr/bin/python3 - "$tmp/data" "$tmp/d300" <<'EOF' || fail "writing 300-token data"
import os, struct, sys
os.mkdir(sys.argv[2])
for f in ("train.bin", "val.bin"):
    b = bytearray(open(f"{sys.argv[1]}/{f}", "rb").read()); struct.pack_into("<I", b, 24, 300)
    open(f"{sys.argv[2]}/{f}", "wb").write(b)
EOF
# shellcheck disable=SC2086
expect 0 "$moe" train $tiny --train-iters 2 --eval-interval 1 --vocab-size 300 \
  --data-path "$tmp/d300"
grep -q "^eval step 1 | val nll .* nats/token (.* bits/token)$" "$tmp/out" &&
  grep -q "final val nll .* nats/token$" "$tmp/out" && ! grep -q "/byte" "$tmp/out" ||
  fail "units of a 300-token vocabulary: $(cat "$tmp/out")"
# shellcheck disable=SC2086
expect 1 "$moe" train $tiny --vocab-size 100
grep -q "vocabulary (257) is larger than the model's (100)" "$tmp/out" || fail "vocabulary mismatch: $(cat "$tmp/out")"
# eval of a blend names the dataset whose tokens the model does not take
expect 1 "$moe" eval --load "$tmp/a" --data-path 1 "$tmp/data" 1 "$tmp/d300"
grep -q "$tmp/d300/val.bin: .*vocabulary (300) is larger than the model's (257)" "$tmp/out" ||
  fail "eval of a blend with another vocabulary: $(cat "$tmp/out")"
# a model of other than byte tokens trains without a text sample, and generate --load refuses it
# shellcheck disable=SC2086
expect 0 "$moe" train $tiny --train-iters 2 --vocab-size 300 --save "$tmp/v300"
grep -q "sample:" "$tmp/out" && fail "a text sample from a 300-token model"
expect 2 "$moe" generate --load "$tmp/v300" --prompt "ab"
grep -q "vocabulary has 300 tokens" "$tmp/out" || fail "generate, 300 tokens: $(cat "$tmp/out")"
# one token of context: the window slides by one
# shellcheck disable=SC2086
expect 0 "$moe" train $tiny --train-iters 2 --seq-length 1
grep -q "sample:" "$tmp/out" || fail "seq-length 1: $(cat "$tmp/out")"
# shellcheck disable=SC2086
expect 1 "$moe" train $tiny --seq-length 100000
grep -q "longer than the data" "$tmp/out" || fail "sequence length message: $(cat "$tmp/out")"
# shellcheck disable=SC2086
expect 1 "$moe" train $tiny --save /proc/moe-cannot-write
grep -q "cannot create" "$tmp/out" || fail "unwritable directory message: $(cat "$tmp/out")"
echo "train ok"
