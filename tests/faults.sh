#!/bin/sh
# Faults during training: non-finite losses and gradients (injected), a full disk (a file-size
# limit), and the trainer killed with SIGKILL at random moments while it saves, many times.
moe=$1; src=$2
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*"; exit 1; }
expect() { # expect CODE command...: runs it, checks the exit code; output in $tmp/out
  code=$1; shift
  "$@" >"$tmp/out" 2>&1; rc=$?
  [ "$rc" = "$code" ] || { tail -20 "$tmp/out"; fail "'$*' exited $rc, expected $code"; }
}
has() { grep -q "$1" "$tmp/out" || { tail -20 "$tmp/out"; fail "no '$1' in the output"; }; }
# same_tensors A B: the tensor bytes of two safetensors files are identical (headers may differ)
same_tensors() {
  /usr/bin/python3 - "$1" "$2" <<'EOF' || fail "tensors of $1 and $2 differ"
import json, struct, sys
def load(p):
    b = open(p, "rb").read(); n = struct.unpack("<Q", b[:8])[0]
    h = json.loads(b[8:8 + n]); h.pop("__metadata__", None)
    return {k: b[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]] for k, v in h.items()}
a, b = load(sys.argv[1]), load(sys.argv[2])
sys.exit(0 if a == b and len(a) > 0 else 1)
EOF
}
expect 0 "$moe" prepare --out "$tmp/data" --val-fraction 0.2 "$src/README.md" "$src/docs"
tiny="--num-layers 2 --hidden-size 32 --num-attention-heads 4 --num-query-groups 2 --num-experts 4
  --moe-router-topk 2 --moe-ffn-hidden-size 24 --ffn-hidden-size 32 --first-k-dense 1
  --seq-length 32 --micro-batch-size 4 --global-batch-size 8 --eval-interval 0 --eval-iters 1
  --moe-router-enable-expert-bias --moe-aux-loss-coeff 0.01 --data-path $tmp/data"

# 1. A NaN in the gradient of step 3 and an Inf in the loss of step 5: both skipped, said so,
#    and the run goes on to the end.
# shellcheck disable=SC2086
expect 0 "$moe" train $tiny --train-iters 8 --log-interval 1 --inject-fault nan-grad@3,inf-loss@5
has "step 3 skipped: loss .*, gradient norm nan not finite (1 in a row"
has "step 5 skipped: loss inf"
has "step 8/8"
grep -q "step [35]/8" "$tmp/out" && fail "a skipped step was reported as a normal step"
# metrics.jsonl records a skipped step as such, with its evaluation when it has one (the last
# step, 5); the report's final losses are the last ones there are (step 4's training loss)
# shellcheck disable=SC2086
expect 0 "$moe" train $tiny --train-iters 5 --inject-fault nan-grad@3,inf-loss@5 \
  --eval-interval 5 --save "$tmp/sk"
val=$(sed -n 's/^eval step 5 | val nll \([0-9.]*\) .*/\1/p' "$tmp/out")
/usr/bin/python3 - "$tmp/sk/metrics.jsonl" "$val" <<'EOF' || fail "metrics of skipped steps"
import json, sys
rec = [json.loads(line) for line in open(sys.argv[1])]
assert [r["step"] for r in rec] == [1, 2, 3, 4, 5], rec
assert rec[2] == {"step": 3, "skipped": True}, rec[2]
assert sorted(rec[4]) == ["skipped", "step", "val_nll"] and rec[4]["skipped"] is True, rec[4]
assert abs(rec[4]["val_nll"] - float(sys.argv[2])) < 1e-4, (rec[4], sys.argv[2])
assert "loss" in rec[3] and "skipped" not in rec[3], rec
EOF
loss=$(/usr/bin/python3 -c 'import json,sys; print("%.4f" % json.loads(open(sys.argv[1]).readlines()[3])["loss"])' "$tmp/sk/metrics.jsonl")
expect 0 "$moe" report "$tmp/sk"
# in a report of more steps than columns, a column's load is the mean over its steps that were
# not skipped: 400 steps of equal load, one skipped, every cell the same colour
mkdir "$tmp/sk400"
/usr/bin/python3 -c '
import json
for i in range(1, 401):
    r = {"step": i, "skipped": True} if i == 21 else {"step": i, "loss": 1.0, "expert_load": [{"layer": 1, "dropped": 0, "counts": [3, 3, 3, 3]}]}
    print(json.dumps(r))' >"$tmp/sk400/metrics.jsonl"
expect 0 "$moe" report "$tmp/sk400"
[ "$(grep -o "fill=.rgb([0-9,]*)" "$tmp/sk400/report.html" | sort -u | wc -l)" = 1 ] ||
  fail "a skipped step lightened its column: $(grep -o "fill=.rgb([0-9,]*)" "$tmp/sk400/report.html" | sort | uniq -c)"
grep -q "5 steps, last step 5, final training loss $loss, last validation loss $val nats/byte" \
  "$tmp/sk/report.html" || fail "report of a run ending in a skipped step: $(grep -o '[0-9] steps[^<]*' "$tmp/sk/report.html")"
# A skipped step changes nothing: the same run with the fault at step 8 (the last) ends with
# the parameters and optimizer state of the run stopped after step 7.
# shellcheck disable=SC2086
expect 0 "$moe" train $tiny --train-iters 7 --save "$tmp/s7"
# shellcheck disable=SC2086
expect 0 "$moe" train $tiny --train-iters 8 --save "$tmp/s8" --inject-fault nan-grad@8
has "step 8 skipped"
same_tensors "$tmp/s7/step-00000007/model.safetensors" "$tmp/s8/step-00000008/model.safetensors"
same_tensors "$tmp/s7/step-00000007/trainer.safetensors" "$tmp/s8/step-00000008/trainer.safetensors"

# A skipped first step makes no update, so the next is Adam's first: each parameter moves by
# lr * g / (|g| + eps), about lr, as torch's AdamW moves it (the bias correction counts the
# updates, not the steps; counting the skipped step would move it 0.73 lr).
# shellcheck disable=SC2086
expect 0 "$moe" train $tiny --train-iters 2 --save "$tmp/f1" --save-interval 1 --lr 0.01 \
  --min-lr 0 --lr-warmup-iters 0 --lr-decay-style constant --weight-decay 0 --clip-grad 0 \
  --inject-fault nan-loss@1
has "step 1 skipped"
/usr/bin/python3 - "$tmp/f1" <<'EOF' || fail "the first update after a skipped step"
import json, struct, sys
def load(p):
    b = open(p, "rb").read(); n = struct.unpack("<Q", b[:8])[0]
    h = json.loads(b[8:8 + n]); meta = h.pop("__metadata__", {})
    t = {}
    for k, v in h.items():
        raw = b[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]]
        t[k] = struct.unpack("<%df" % (len(raw) // 4), raw)
    return meta, t
_, p0 = load(sys.argv[1] + "/step-00000001/model.safetensors")
_, p1 = load(sys.argv[1] + "/step-00000002/model.safetensors")
meta, _ = load(sys.argv[1] + "/step-00000002/trainer.safetensors")
moves = sorted(abs(b - a) / 0.01 for k in p0 if "norm" in k for a, b in zip(p0[k], p1[k]))
median = moves[len(moves) // 2]
print("norm weights:", len(moves), "median |dp|/lr", median, "updates", meta.get("moe.updates"))
sys.exit(0 if len(moves) > 100 and 0.99 < median < 1.001 and meta.get("moe.updates") == "1" else 1)
EOF
# and the count of updates is part of the checkpoint: resumed, the next step is the straight run's
expect 0 "$moe" train --load "$tmp/f1" --train-iters 3
# shellcheck disable=SC2086
expect 0 "$moe" train $tiny --train-iters 3 --save "$tmp/f3" --lr 0.01 --min-lr 0 \
  --lr-warmup-iters 0 --lr-decay-style constant --weight-decay 0 --clip-grad 0 \
  --inject-fault nan-loss@1
same_tensors "$tmp/f1/step-00000003/model.safetensors" "$tmp/f3/step-00000003/model.safetensors"

# 2. Non-finite from step 5 on: after --max-bad-steps 3 in a row the run stops (exit 1) with a
#    checkpoint holding the state of step 4, the last good one.
# shellcheck disable=SC2086
expect 1 "$moe" train $tiny --train-iters 20 --save "$tmp/b" --save-interval 2 \
  --inject-fault nan-loss@5-20 --max-bad-steps 3
has "3 consecutive steps had a loss or gradient that is not finite (the last: step 7); stopped"
has "saving the last good state"
[ "$(cat "$tmp/b/latest")" = "step-00000007" ] || fail "latest after the stop: $(cat "$tmp/b/latest")"
same_tensors "$tmp/b/step-00000004/model.safetensors" "$tmp/b/step-00000007/model.safetensors"
# The streak of bad steps counts on across a resume: stopped (with a checkpoint) at step 4 of
# three bad steps 3-5, the resumed run stops at step 5 as the straight run does.
# shellcheck disable=SC2086
expect 1 "$moe" train $tiny --train-iters 10 --inject-fault nan-loss@3-5 --max-bad-steps 3
has "(the last: step 5)"
# shellcheck disable=SC2086
expect 0 "$moe" train $tiny --train-iters 10 --save "$tmp/bs" --inject-fault nan-loss@3-5 \
  --max-bad-steps 3 --exit-interval 4
expect 1 "$moe" train --load "$tmp/bs" --inject-fault nan-loss@3-5
has "(the last: step 5)"
# The last good state not saved (a file-size limit): said so, and no partial checkpoint left.
# shellcheck disable=SC2086
(ulimit -f 150; "$moe" train $tiny --train-iters 10 --save "$tmp/f" --inject-fault nan-loss@3-10 \
  --max-bad-steps 2 >"$tmp/out" 2>&1)
rc=$?
[ "$rc" = 1 ] || { tail -5 "$tmp/out"; fail "failed last save: exit $rc, expected 1"; }
has "stopped. Lower lr or check the data. Saving the last good state failed: cannot write"
ls -d "$tmp"/f/step-* >/dev/null 2>&1 && fail "a failed save left $(ls "$tmp/f")"
expect 2 "$moe" train $tiny --inject-fault nan-loss@x # a bad value: a usage error
has "inject-fault: 'nan-loss@x' is not a list of KIND@STEP"
expect 2 "$moe" train $tiny --max-bad-steps 0
has "max-bad-steps"

# 3. A full disk (here a file-size limit below the checkpoint's size): a clear error, exit 1,
#    and the previous checkpoint intact and loadable.
# shellcheck disable=SC2086
expect 0 "$moe" train $tiny --train-iters 2 --save "$tmp/d"
cp "$tmp/d/step-00000002/model.safetensors" "$tmp/model.before"
# shellcheck disable=SC2086
(ulimit -f 150; "$moe" train $tiny --train-iters 4 --load "$tmp/d" --save "$tmp/d" >"$tmp/out" 2>&1)
rc=$?
[ "$rc" = 1 ] || { tail -5 "$tmp/out"; fail "full disk: exit $rc, expected 1"; }
has "cannot write .*\.tmp: File too large"
[ "$(cat "$tmp/d/latest")" = "step-00000002" ] || fail "latest moved after a failed save"
cmp -s "$tmp/model.before" "$tmp/d/step-00000002/model.safetensors" || fail "previous checkpoint changed"
ls "$tmp"/d/step-*/*.tmp >/dev/null 2>&1 && fail "temporary files left behind"
expect 0 "$moe" eval --load "$tmp/d" --data "$tmp/data/val.bin"
# prepare over an existing dataset on a full disk: the old train.bin and val.bin stay a pair
# (here the small new train split fits and the large validation split does not)
expect 0 "$moe" prepare --out "$tmp/pd" --val-fraction 0.2 "$src/SECURITY.md" "$src/configs"
cp "$tmp/pd/train.bin" "$tmp/train.before"; cp "$tmp/pd/val.bin" "$tmp/val.before"
(ulimit -f 100; "$moe" prepare --out "$tmp/pd" --val-fraction 0.9 "$src/README.md" "$src/docs" \
  >"$tmp/out" 2>&1)
rc=$?
[ "$rc" = 1 ] || { tail -5 "$tmp/out"; fail "prepare on a full disk: exit $rc, expected 1"; }
cmp -s "$tmp/train.before" "$tmp/pd/train.bin" && cmp -s "$tmp/val.before" "$tmp/pd/val.bin" \
  || fail "prepare on a full disk changed the dataset"
[ "$(ls "$tmp/pd")" = "$(printf 'train.bin\nval.bin')" ] || fail "prepare left $(ls "$tmp/pd")"
# the second rename failing (val.bin a directory that is not empty) puts train.bin back as it
# was, or takes the new one away where there was none
rm "$tmp/pd/val.bin"; mkdir "$tmp/pd/val.bin" "$tmp/pd2" "$tmp/pd2/val.bin"
touch "$tmp/pd/val.bin/x" "$tmp/pd2/val.bin/x"
expect 1 "$moe" prepare --out "$tmp/pd" "$src/README.md"
has "cannot rename .*val.bin.next to .*val.bin: "
cmp -s "$tmp/train.before" "$tmp/pd/train.bin" ||
  fail "a failed rename of val.bin changed train.bin"
[ "$(ls "$tmp/pd")" = "$(printf 'train.bin\nval.bin')" ] || fail "prepare left $(ls "$tmp/pd")"
expect 1 "$moe" prepare --out "$tmp/pd2" "$src/README.md"
[ "$(ls "$tmp/pd2")" = val.bin ] || fail "a failed rename of val.bin left $(ls "$tmp/pd2")"
# metrics.jsonl on a full disk (/dev/full): the run stops with an error, not a shorter log
mkdir "$tmp/full"; ln -s /dev/full "$tmp/full/metrics.jsonl"
# shellcheck disable=SC2086
expect 1 "$moe" train $tiny --train-iters 4 --save "$tmp/full"
has "cannot write $tmp/full/metrics.jsonl: No space left on device"

# 3b. A configuration that cannot fit the machine is refused before anything is allocated,
#     with the estimate in the message.
# shellcheck disable=SC2086
expect 1 "$moe" train $tiny --hidden-size 16384 --num-layers 48 --num-experts 64 --moe-ffn-hidden-size 8192
has "the model needs about .* GiB (.* parameters and their gradients, activations for 128 tokens) but this machine allows .* GiB; nothing was allocated"
expect 1 "$moe" demo --tokens 100000000 --hidden-size 8192
has "the MoE layer needs about .* GiB .* nothing was allocated"

# 3c. Absurd sizes in files are refused without allocating: a checkpoint tensor announcing
#     2^62 bytes, a token file announcing 10^12 tokens or a vocabulary of 4e9.
cp -r "$tmp/d" "$tmp/huge"
/usr/bin/python3 - "$tmp/huge/step-00000002/model.safetensors" <<'EOF2'
import json, struct, sys
p = sys.argv[1]; b = open(p, "rb").read(); n = struct.unpack("<Q", b[:8])[0]
h = json.loads(b[8:8 + n])
name = next(k for k in h if k != "__metadata__")
h[name]["shape"] = [2 ** 30, 2 ** 30]; h[name]["data_offsets"] = [0, 2 ** 62]
hb = json.dumps(h).encode()
open(p, "wb").write(struct.pack("<Q", len(hb)) + hb + b[8 + n:])
EOF2
expect 1 "$moe" eval --load "$tmp/huge" --data "$tmp/data/val.bin"
has "has data_offsets \[0, 4611686018427387904\] that do not fit its shape or the file"
/usr/bin/python3 - "$tmp/data/val.bin" "$tmp/bad-n.bin" "$tmp/bad-vocab.bin" <<'EOF2'
import struct, sys
b = bytearray(open(sys.argv[1], "rb").read())
n = bytearray(b); n[16:24] = struct.pack("<Q", 10 ** 12); open(sys.argv[2], "wb").write(n)
v = bytearray(b); v[24:28] = struct.pack("<I", 4000000000); open(sys.argv[3], "wb").write(v)
EOF2
expect 1 "$moe" eval --load "$tmp/d" --data "$tmp/bad-n.bin"
has "truncated: 1000000000000 tokens announced"
expect 1 "$moe" eval --load "$tmp/d" --data "$tmp/bad-vocab.bin"
has "bad vocabulary size 4000000000"

# 4. SIGKILL at random moments, 60 times, while the trainer saves a checkpoint after every
#    step (two kept): after every kill the newest complete checkpoint loads, and the run
#    resumes from it (more kills while the last left no 'latest'); finally it runs to the end.
kills=0 i=0 run="$tmp/k" restarts=0 resumable=0
while [ $i -lt 60 ] || { [ ! -f "$run/latest" ] && [ $i -lt 80 ]; }; do
  i=$((i + 1))
  load=""; [ $resumable = 1 ] && load="--load $run"
  # shellcheck disable=SC2086
  "$moe" train $tiny --train-iters 100000 --save "$run" --save-interval 1 --keep-last 2 \
    --log-interval 1000 $load >"$tmp/kill.out" 2>&1 &
  pid=$!
  # 20 to 300 ms: start-up, loading, training steps and saves all get hit; up to 2 s while no
  # checkpoint exists yet (a loaded machine, a sanitizer build: start-up alone can take 300 ms)
  span=280; [ $resumable = 1 ] || span=1980
  ms=$(( ($(od -An -N2 -tu2 /dev/urandom) % span) + 20 ))
  sleep "$((ms / 1000)).$(printf '%03d' $((ms % 1000)))"
  kill -9 $pid 2>/dev/null && kills=$((kills + 1))
  wait $pid 2>/dev/null
  # the newest complete checkpoint loads, whether 'latest' names it yet or not
  resumable=0
  if [ -f "$run/latest" ]; then
    expect 0 "$moe" eval --load "$run" --data "$tmp/data/val.bin"
    resumable=1
  elif [ -d "$run" ] && "$moe" eval --load "$run" --data "$tmp/data/val.bin" >"$tmp/out" 2>&1; then
    resumable=1
  elif [ -s "$run/metrics.jsonl" ]; then
    # killed after a step's line in the log and before its checkpoint was complete (a loaded
    # machine stretches that moment): the directory takes no fresh run, which would overwrite
    # the log, and says so; the loop starts over in a new one
    expect 2 "$moe" train $tiny --train-iters 1 --save "$run"
    has "already holds a run's files (metrics.jsonl) but no checkpoint: choose another --save"
    rm -rf "$run"
    restarts=$((restarts + 1))
  fi
done
[ $kills -ge 50 ] || fail "only $kills kills landed"
[ -f "$run/latest" ] || fail "no checkpoint after $kills kills"
step=$(sed 's/step-0*//' "$run/latest")
[ "$step" -gt 0 ] || fail "latest: $(cat "$run/latest")"
# shellcheck disable=SC2086
expect 0 "$moe" train $tiny --train-iters $((step + 3)) --load "$run" --save "$run" --save-interval 1
has "resumed from .*step-0*$step at step $step"
has "step $((step + 3))/$((step + 3))"

# 5. A save that stopped before it was named latest leaves its directory, here with another
#    layout's files (an index naming two shards); the run resumed from latest saves that step
#    again into it: once the new files are latest the old ones go, and the checkpoint loads as
#    the straight run's.
# shellcheck disable=SC2086
expect 0 "$moe" train $tiny --train-iters 2 --save "$tmp/s2"
# shellcheck disable=SC2086
expect 0 "$moe" train $tiny --train-iters 1 --save "$tmp/re"
mkdir "$tmp/re/step-00000002"
printf '{"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}' \
  >"$tmp/re/step-00000002/model.safetensors.index.json"
: >"$tmp/re/step-00000002/trainer-00002-of-00002.safetensors"
# shellcheck disable=SC2086
expect 0 "$moe" train $tiny --train-iters 2 --load "$tmp/re" --save "$tmp/re"
for f in model.safetensors.index.json trainer-00002-of-00002.safetensors; do
  [ ! -e "$tmp/re/step-00000002/$f" ] || fail "a stale $f was kept"
done
expect 0 "$moe" eval --load "$tmp/re" --data "$tmp/data/val.bin"
same_tensors "$tmp/s2/step-00000002/model.safetensors" "$tmp/re/step-00000002/model.safetensors"

# 6. keep-last counts the checkpoints up to the one just saved: a later step's directory (a save
#    that stopped before it was named latest) is neither counted nor removed, nor are
#    directories whose names only resemble a checkpoint's (4294967300 is 4 in 32 bits).
# shellcheck disable=SC2086
expect 0 "$moe" train $tiny --train-iters 4 --save "$tmp/ln" --save-interval 2
mkdir "$tmp/ln/step-00000006" "$tmp/ln/step-1" "$tmp/ln/step-+0000001" "$tmp/ln/step-4294967300"
: >"$tmp/ln/step-00000006/model.safetensors"
: >"$tmp/ln/step-1/keep"
# shellcheck disable=SC2086
expect 0 "$moe" train $tiny --train-iters 5 --load "$tmp/ln" --save "$tmp/ln" --save-interval 1 \
  --keep-last 2
ls "$tmp/ln" | grep -E "^(latest|step-)" | LC_ALL=C sort | tr '\n' ' ' >"$tmp/out"
[ "$(cat "$tmp/out")" = "latest step-+0000001 step-00000004 step-00000005 step-00000006 step-1 \
step-4294967300 " ] ||
  fail "checkpoints after the resumed run: $(cat "$tmp/out")"
[ -e "$tmp/ln/step-1/keep" ] || fail "step-1/keep was removed"

# 7. A trainer file whose bad-step count is not a count, or of another step than the model
# file (its update count then above its step: the steps are what the message names): one
# clear error, nothing loaded.
set_meta() { # set_meta FILE KEY=VALUE...: the safetensors file's metadata entries set
  /usr/bin/python3 - "$@" <<'EOF2' || fail "rewriting the metadata"
import json, struct, sys
p = sys.argv[1]; b = open(p, "rb").read(); n = struct.unpack("<Q", b[:8])[0]
h = json.loads(b[8:8 + n])
for kv in sys.argv[2:]:
    k, v = kv.split("=", 1); h["__metadata__"][k] = v
head = json.dumps(h).encode(); head += b" " * (-len(head) % 8)
open(p, "wb").write(struct.pack("<Q", len(head)) + head + b[8 + n:])
EOF2
}
set_meta "$tmp/re/step-00000002/trainer.safetensors" moe.bad_streak=abc
# shellcheck disable=SC2086
expect 1 "$moe" train $tiny --train-iters 3 --load "$tmp/re"
has "bad moe.bad_streak"
set_meta "$tmp/re/step-00000002/trainer.safetensors" moe.bad_streak=0 moe.step=1 moe.updates=2
# shellcheck disable=SC2086
expect 1 "$moe" train $tiny --train-iters 3 --load "$tmp/re"
has "the model file is of step 2 and the trainer file of step 1"
echo "faults: ok ($kills kills, $restarts of them before a first checkpoint; resumed at step $step)"
