#!/bin/sh
# Training across processes (mpirun --oversubscribe): the loss curve of 4 ranks (expert
# parallel 2 x data parallel 2, and expert parallel 4) against one process; checkpoints saved
# with ep = 4 resumed with ep = 1 and ep = 2 and back, exactly; a killed rank stops the others.
moe=$1; src=$2; mpirun=$3
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*"; exit 1; }
run() { # run NP OUT args...: moe train on NP ranks, output in OUT
  np=$1; out=$2; shift 2
  if [ "$np" = 1 ]; then "$moe" train "$@" >"$out" 2>&1
  else $mpirun --oversubscribe --allow-run-as-root --bind-to none -np "$np" "$moe" train "$@" >"$out" 2>&1
  fi || { tail -20 "$out"; fail "moe train on $np ranks ($*)"; }
}
losses() { sed -n 's/^.*step \([0-9]*\)\/[0-9]* | loss \([0-9.]*\) | nll \([0-9.]*\) aux \([0-9.e-]*\) .*gnorm \([0-9.]*\).*$/\1 \2 \3 \4 \5/p' "$1"; }
# tensors NAME DIR: every tensor of the checkpoint DIR (one file or shards) by name -> sha256
tensors() {
  /usr/bin/python3 - "$2" >"$tmp/$1.sum" <<'EOF' || fail "reading $2"
import glob, hashlib, json, os, struct, sys
out = {}
for p in sorted(glob.glob(os.path.join(sys.argv[1], "*.safetensors"))):
    b = open(p, "rb").read(); n = struct.unpack("<Q", b[:8])[0]
    h = json.loads(b[8:8 + n]); h.pop("__metadata__", None)
    for k, v in h.items():
        assert k not in out, k
        out[k] = hashlib.sha256(b[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]]).hexdigest()
for k in sorted(out): print(k, out[k])
EOF
}
"$moe" prepare --out "$tmp/data" --val-fraction 0.2 "$src/README.md" "$src/docs" >/dev/null ||
  fail "prepare"
tiny="--num-layers 3 --hidden-size 32 --num-attention-heads 4 --num-query-groups 2 --num-experts 8
  --moe-router-topk 2 --moe-ffn-hidden-size 16 --ffn-hidden-size 32 --first-k-dense 1
  --seq-length 32 --micro-batch-size 2 --global-batch-size 8 --eval-interval 10 --eval-iters 4
  --moe-aux-loss-coeff 0.01 --moe-z-loss-coeff 0.001 --moe-shared-expert-intermediate-size 8
  --moe-router-enable-expert-bias --moe-router-score-function sigmoid --lr 3e-3
  --lr-warmup-iters 3 --log-interval 1 --data-path $tmp/data"

# 1. 20 steps: one process, 4 ranks (ep 2 x dp 2), 4 ranks (ep 4), 4 ranks (ep 2 with
#    replicated tokens, data parallel over the 2 expert-data groups), 4 ranks (ep 4 with the
#    two-stage all-to-all over 2 pretend machines of 2 ranks): the same losses
# shellcheck disable=SC2086
run 1 "$tmp/one" $tiny --train-iters 20
# shellcheck disable=SC2086
run 4 "$tmp/ep2" $tiny --train-iters 20 --expert-model-parallel-size 2
# shellcheck disable=SC2086
run 4 "$tmp/ep4" $tiny --train-iters 20 --expert-model-parallel-size 4
# shellcheck disable=SC2086
run 4 "$tmp/ep2r" $tiny --train-iters 20 --expert-model-parallel-size 2 --moe-token-dispatcher-type allgather
# shellcheck disable=SC2086
run 4 "$tmp/ep4h" $tiny --train-iters 20 --expert-model-parallel-size 4 --moe-hierarchical-alltoall \
  --ranks-per-node 2
# without the aux loss (whose counts are the ranks' concurrent micro-batches, where one process
# has seen only those before: Megatron's global aux loss) ep 2 x dp 2 is one process up to the
# order of float additions: loss and nll within 1e-6 over 20 steps (6e-9 seen), the gradient
# norm within 1e-4 (9e-6 seen: the ranks add the gradients in another order), from
# metrics.jsonl's full digits (the printed ones round a last-bit difference to a whole digit).
# A last-bit difference can flip a near tie of the router: at a step whose expert loads differ,
# at most one token's choices may have moved (load counts differing by 4 in all) and the loss
# and nll be within 1e-5 (one slot moved in 2 of 20 steps, 1.3e-6, with this README as data)
# Quantile balancing and Tutel's cosine router too: the quantiles averaged over the
# micro-batches of one process or over the ranks', the cosine router's tensors replicated like
# the linear router's (12 steps)
close_to_one() { # ONE_METRICS RANKS_METRICS LABEL STEPS
  /usr/bin/python3 - "$@" <<'EOF'
import json, sys
a, b = ([json.loads(l) for l in open(p)] for p in sys.argv[1:3])
what, n = sys.argv[3], int(sys.argv[4])
assert len(a) == len(b) == n, (len(a), len(b))
def moved(x, y):  # slots that went to other experts, twice over (one slot: two counts move)
    return sum(abs(p - q) for la, lb in zip(x["expert_load"], y["expert_load"])
               for p, q in zip(la["counts"], lb["counts"]))
flips = [x["step"] for x, y in zip(a, b) if moved(x, y)]
print("%s: expert loads differ at steps %s" % (what, flips))
assert len(flips) <= 5 and all(moved(x, y) <= 4 for x, y in zip(a, b)), "routing differs"
for k, tol in (("loss", 1e-6), ("nll", 1e-6), ("grad_norm", 1e-4)):
    worst = max(abs(x[k] - y[k]) / abs(x[k]) / (10 if moved(x, y) and tol < 1e-4 else 1)
                for x, y in zip(a, b))
    print("%s: %s within %.2e of one process (x10 at a flip)" % (what, k, worst))
    assert worst <= tol, k
EOF
}
# shellcheck disable=SC2086
run 1 "$tmp/one0" $tiny --train-iters 20 --moe-aux-loss-coeff 0 --save "$tmp/one0s"
# shellcheck disable=SC2086
run 4 "$tmp/ep20" $tiny --train-iters 20 --moe-aux-loss-coeff 0 --expert-model-parallel-size 2 \
  --save "$tmp/ep20s"
close_to_one "$tmp/one0s/metrics.jsonl" "$tmp/ep20s/metrics.jsonl" \
  "ep 2 x dp 2 without the aux loss" 20 || fail "ep 2 x dp 2 without the aux loss differs"
qb="--moe-aux-loss-coeff 0 --moe-router-enable-expert-bias=false --train-iters 12
  --moe-router-load-balancing-type quantile_balancing --moe-router-cosine-dim 16"
# shellcheck disable=SC2086
run 1 "$tmp/oneqb" $tiny $qb --save "$tmp/oneqbs"
# shellcheck disable=SC2086
run 4 "$tmp/ep2qb" $tiny $qb --expert-model-parallel-size 2 --save "$tmp/ep2qbs"
close_to_one "$tmp/oneqbs/metrics.jsonl" "$tmp/ep2qbs/metrics.jsonl" \
  "ep 2 x dp 2, quantile balancing, cosine router" 12 ||
  fail "ep 2 x dp 2 with quantile balancing and the cosine router differs"
# Upcycling under expert parallelism: each rank makes its experts from the dense run's MLPs
# (G = 2 slices, 3 experts a rank: a rank's local expert index would take other slices), and
# ep 2 x dp 2 goes on from the dense run's step 4 as one process does (12 steps)
# shellcheck disable=SC2086
run 1 "$tmp/dense" $tiny --num-experts 0,0,0 --moe-shared-expert-intermediate-size 0 \
  --train-iters 4 --save "$tmp/denses"
upc="--load $tmp/denses --moe-use-upcycling --num-experts 6 --moe-ffn-hidden-size 16
  --moe-aux-loss-coeff 0 --moe-router-enable-expert-bias=false --train-iters 16"
# shellcheck disable=SC2086
run 1 "$tmp/oneup" $upc --save "$tmp/oneups"
# shellcheck disable=SC2086
run 4 "$tmp/ep2up" $upc --expert-model-parallel-size 2 --save "$tmp/ep2ups"
grep -q "into experts, at step 4" "$tmp/ep2up" || fail "upcycled on 4 ranks: $(cat "$tmp/ep2up")"
close_to_one "$tmp/oneups/metrics.jsonl" "$tmp/ep2ups/metrics.jsonl" \
  "ep 2 x dp 2, upcycled" 12 || fail "ep 2 x dp 2 upcycled differs from one process"
# ... and with a capacity factor (each rank decides its own micro-batch's drops, as one process
# does per micro-batch), data parallel 4 and ep 2 x dp 2, both drop policies; every run ends
# with its sample text, which every rank generates alike (it once hung there: the ranks'
# identical tokens pooled for one capacity decision dropped each other's copies)
cap_pos="--moe-expert-capacity-factor 1.0 --moe-token-drop-policy position"
cap_probs="--moe-expert-capacity-factor 1.25 --moe-token-drop-policy probs"
# shellcheck disable=SC2086
run 1 "$tmp/onecp" $tiny --train-iters 20 $cap_pos
# shellcheck disable=SC2086
run 4 "$tmp/ep2cp" $tiny --train-iters 20 $cap_pos --expert-model-parallel-size 2
# shellcheck disable=SC2086
run 1 "$tmp/onecq" $tiny --train-iters 20 $cap_probs
# shellcheck disable=SC2086
run 4 "$tmp/dp4cq" $tiny --train-iters 20 $cap_probs
for r in onecp ep2cp onecq dp4cq; do
  grep -q "^sample:" "$tmp/$r" || fail "$r: no sample at the end: $(tail -3 "$tmp/$r")"
done
losses "$tmp/one" >"$tmp/one.l"
losses "$tmp/onecp" >"$tmp/onecp.l"
losses "$tmp/onecq" >"$tmp/onecq.l"
[ "$(wc -l <"$tmp/one.l")" = 20 ] || fail "20 loss lines expected: $(cat "$tmp/one.l")"
cmp -s "$tmp/one.l" "$tmp/onecp.l" || cmp -s "$tmp/one.l" "$tmp/onecq.l" && fail "the capacity dropped nothing"
# With the aux loss, the all-to-all modes give loss, nll and aux within 2e-3 over 20
# steps (the printed digits in these runs); the gradient norm is not compared there: the global
# aux counts moved it by 5e-3 at a spike above the clip (ep 2, step 16, gnorm 3.060 against
# 3.045; the next steps equal again, the clip bounding the update).
# Replicated tokens sum the experts' partial outputs and input gradients over the group
# (MPI_Allreduce), a different order of fp32 additions than one process's slot-order sums: the
# loss and nll stay within 1e-4 over 20 steps (1.8e-5 seen), while the aux loss (discrete
# counts) moves by up to 3e-3, so for that mode the loss and nll are compared.
for rb in ep2:one ep4:one ep2r:one ep4h:one ep2cp:onecp dp4cq:onecq; do
  r=${rb%:*}; base=${rb#*:}
  losses "$tmp/$r" >"$tmp/$r.l"
  case $r in ep2r) cols=2; tol=1e-4 ;; *) cols=3; tol=2e-3 ;; esac
  /usr/bin/python3 - "$tmp/$base.l" "$tmp/$r.l" "$cols" "$tol" <<'EOF' || fail "$r: the loss curve differs from one process"
import sys
a = [list(map(float, l.split())) for l in open(sys.argv[1])]
b = [list(map(float, l.split())) for l in open(sys.argv[2])]
cols, tol = int(sys.argv[3]), float(sys.argv[4])
assert len(a) == len(b) == 20, (len(a), len(b))
worst = max(abs(x - y) / max(1e-3, abs(x)) for ra, rb in zip(a, b) for x, y in zip(ra[1:1 + cols], rb[1:1 + cols]))
print("max relative difference of the first %d of loss, nll, aux, gnorm over 20 steps: %.2e" % (cols, worst))
sys.exit(0 if worst < tol else 1)
EOF
done
grep -q "4 processes: expert parallel 2 x expert-data parallel 2" "$tmp/ep2" || fail "grid line"

# 2. resharding: saved with ep = 4, re-saved by 1 process, by 2 ranks (ep 2), by 4 (ep 4):
#    every tensor (parameters, Adam moments, expert biases) is the same in every layout
# shellcheck disable=SC2086
run 4 "$tmp/out" $tiny --train-iters 6 --expert-model-parallel-size 4 --save "$tmp/a"
[ -f "$tmp/a/step-00000006/model.safetensors.index.json" ] || fail "no index for 4 shards"
# shellcheck disable=SC2086
run 1 "$tmp/out" $tiny --train-iters 6 --load "$tmp/a" --save "$tmp/b"
[ -f "$tmp/b/step-00000006/model.safetensors" ] || fail "one process writes one file"
# shellcheck disable=SC2086
run 2 "$tmp/out" $tiny --train-iters 6 --load "$tmp/b" --save "$tmp/c" --expert-model-parallel-size 2
# shellcheck disable=SC2086
run 4 "$tmp/out" $tiny --train-iters 6 --load "$tmp/c" --save "$tmp/d" --expert-model-parallel-size 4
for r in a b c d; do tensors "$r" "$tmp/$r/step-00000006"; done
[ "$(wc -l <"$tmp/a.sum")" -gt 50 ] || fail "too few tensors: $(wc -l <"$tmp/a.sum")"
for r in b c d; do cmp -s "$tmp/a.sum" "$tmp/$r.sum" || { diff "$tmp/a.sum" "$tmp/$r.sum" | head -5; fail "layout $r differs"; }; done
# and training resumed in another layout continues the same curve: 6 of 12 steps with ep 4,
# then the other 6 in one process, against 12 in one process
# shellcheck disable=SC2086
run 4 "$tmp/out" $tiny --train-iters 12 --exit-interval 6 --expert-model-parallel-size 4 --save "$tmp/e"
# shellcheck disable=SC2086
run 1 "$tmp/out" $tiny --train-iters 12 --load "$tmp/e" --save "$tmp/e"
# shellcheck disable=SC2086
run 1 "$tmp/one12" $tiny --train-iters 12
losses "$tmp/out" | tail -1 >"$tmp/x.l"
losses "$tmp/one12" | tail -1 >"$tmp/y.l"
/usr/bin/python3 -c "
import sys
a = list(map(float, open('$tmp/x.l').read().split())); b = list(map(float, open('$tmp/y.l').read().split()))
sys.exit(0 if a[0] == b[0] == 12 and abs(a[1] - b[1]) < 2e-3 * abs(b[1]) else 1)" ||
  fail "resumed in another layout: $(cat "$tmp/x.l") against $(cat "$tmp/y.l")"

# 3. bad grids and a killed rank: a clear error, never a hang. Errors of the options, the grid
#    or the options against the grid are one line (not one per rank) and exit 2, a usage error.
once() { # once NP 'LINE' args...: moe train on NP ranks exits 2 with LINE, once
  np=$1; line=$2; shift 2
  $mpirun --oversubscribe --allow-run-as-root --bind-to none -np "$np" "$moe" train "$@" >"$tmp/out" 2>&1
  rc=$?
  [ $rc = 2 ] && [ "$(grep -c '^moe' "$tmp/out")" = 1 ] && grep -qxF "$line" "$tmp/out" ||
    fail "$np ranks, $*: exit $rc, expected 2 and once '$line': $(grep '^moe' "$tmp/out")"
}
# shellcheck disable=SC2086
once 3 "moe train: expert-model-parallel-size 2 does not divide the 3 processes" $tiny \
  --expert-model-parallel-size 2
# shellcheck disable=SC2086
once 2 "moe train: layer 1: expert-model-parallel-size (2) must divide num-experts (3)" $tiny \
  --expert-model-parallel-size 2 --num-experts 3
# shellcheck disable=SC2086
once 4 "moe train: global-batch-size (4) must be a multiple of micro-batch-size (2) times the 4 data-parallel processes" \
  $tiny --global-batch-size 4
# shellcheck disable=SC2086
once 2 "moe train: moe-router-topk (9) must be between 1 and num-experts (8)" $tiny --moe-router-topk 9
# shellcheck disable=SC2086
once 2 "moe train: data and expert parallelism run on the CPU so far (--device cpu)" $tiny --device cuda
# a stop every rank decides alike (too many bad steps in a row) is told once too, exit 1
# shellcheck disable=SC2086
$mpirun --oversubscribe --allow-run-as-root --bind-to none -np 4 "$moe" train $tiny --train-iters 8 \
  --expert-model-parallel-size 2 --inject-fault nan-grad@2,inf-loss@4-5 --max-bad-steps 2 >"$tmp/out" 2>&1
rc=$?
[ $rc = 1 ] && [ "$(grep -c '^moe train: 2 consecutive steps' "$tmp/out")" = 1 ] ||
  fail "bad steps on 4 ranks: exit $rc, $(grep '^moe' "$tmp/out")"
# a checkpoint whose expert shard of rank 1 holds a NaN: refused once, exit 1, and the run
# directory untouched (rank 0 loaded its part without error but writes nothing before every
# rank has its part: no metrics cut, no event file)
cp -r "$tmp/ep20s" "$tmp/nanrun"
/usr/bin/python3 - "$tmp/nanrun/step-00000020/model-00002-of-00002.safetensors" <<'EOF' ||
import json, struct, sys
p = sys.argv[1]; b = bytearray(open(p, "rb").read()); n = struct.unpack("<Q", b[:8])[0]
a = json.loads(b[8:8 + n])["model.layers.1.mlp.experts.5.up_proj.weight"]["data_offsets"][0]
b[8 + n + a:8 + n + a + 4] = struct.pack("<f", float("nan")); open(p, "wb").write(bytes(b))
EOF
  fail "writing a NaN into a shard"
ls -lR "$tmp/nanrun" >"$tmp/nanrun.before"
# shellcheck disable=SC2086
$mpirun --oversubscribe --allow-run-as-root --bind-to none -np 4 "$moe" train --load "$tmp/nanrun" \
  --train-iters 22 --expert-model-parallel-size 2 >"$tmp/out" 2>&1
rc=$?
[ $rc = 1 ] && [ "$(grep -c "holds a non-finite value" "$tmp/out")" = 1 ] &&
  grep -q "^moe train (rank 1): .*experts.5.up_proj.weight' holds a non-finite value" "$tmp/out" ||
  fail "a NaN in rank 1's shard: exit $rc, $(grep '^moe' "$tmp/out")"
ls -lR "$tmp/nanrun" | cmp -s "$tmp/nanrun.before" - || fail "a refused load changed the run: $(ls "$tmp/nanrun")"
# shellcheck disable=SC2086
$mpirun --oversubscribe --allow-run-as-root -np 4 "$moe" train $tiny --expert-model-parallel-size 4 \
  --moe-hierarchical-alltoall --ranks-per-node 3 >"$tmp/out" 2>&1 && fail "3 ranks per machine of 4 accepted"
grep -q "3 ranks per machine do not divide the 4 ranks" "$tmp/out" || fail "machine message: $(tail -3 "$tmp/out")"
# process options that differ between ranks (here the two-stage all-to-all on rank 0 only, whose
# set-up is a collective): refused before any collective that depends on them, never a hang
# shellcheck disable=SC2086,SC2016
timeout 120 $mpirun --oversubscribe --allow-run-as-root --bind-to none -np 2 sh -c \
  'if [ "$OMPI_COMM_WORLD_RANK" = 0 ]; then exec "$0" train "$@" --moe-hierarchical-alltoall
   else exec "$0" train "$@"; fi' "$moe" $tiny --expert-model-parallel-size 2 >"$tmp/out" 2>&1
rc=$?
[ $rc != 0 ] && [ $rc != 124 ] || fail "options differing between ranks: exit $rc"
grep -q "rank 1 has a different configuration or build than rank 0" "$tmp/out" ||
  fail "differing options message: $(tail -3 "$tmp/out")"
# shellcheck disable=SC2086
$mpirun --oversubscribe --allow-run-as-root -np 2 "$moe" generate --load "$tmp/b" >"$tmp/out" 2>&1 &&
  fail "generate under mpirun accepted"
grep -q "runs in one process" "$tmp/out" || fail "one-process message"
$mpirun --oversubscribe --allow-run-as-root -np 2 "$moe" bench layer --tokens 64 --iters 1 >"$tmp/out" 2>&1 &&
  fail "bench layer under mpirun accepted"
[ "$(grep -c "moe bench layer runs in one process" "$tmp/out")" = 1 ] || fail "bench layer under mpirun: $(cat "$tmp/out")"
# Ctrl-C on one rank: every rank stops after the same step with a checkpoint, and the
# signal told is SIGINT's (2), as in one process
# shellcheck disable=SC2086
$mpirun --oversubscribe --allow-run-as-root --bind-to none -np 2 "$moe" train $tiny --train-iters 100000 \
  --expert-model-parallel-size 2 --log-interval 1 --save "$tmp/int" >"$tmp/int.out" 2>&1 &
mpid=$!
i=0 # (past step 2, every rank catches signals: the ranks step in lockstep)
while [ $i -lt 300 ] && ! grep -q "step 2/" "$tmp/int.out"; do sleep 0.1; i=$((i + 1)); done
victim=$(pgrep -P "$mpid" | tail -1)
[ -n "$victim" ] && kill -INT "$victim" || fail "no rank to interrupt: $(tail -3 "$tmp/int.out")"
i=0
while kill -0 $mpid 2>/dev/null && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
kill -0 $mpid 2>/dev/null && { kill -9 $mpid; fail "the ranks still run 30 s after a SIGINT"; }
wait $mpid
grep -q "stopped by signal 2" "$tmp/int.out" && [ -f "$tmp/int/latest" ] ||
  fail "SIGINT to one rank: $(tail -3 "$tmp/int.out")"
# shellcheck disable=SC2086
$mpirun --oversubscribe --allow-run-as-root --bind-to none -np 4 "$moe" train $tiny --train-iters 100000 \
  --expert-model-parallel-size 2 --log-interval 1000 >"$tmp/out" 2>&1 &
mpid=$!
i=0
while [ $i -lt 100 ] && ! grep -q "moe train: 3 layers" "$tmp/out"; do sleep 0.1; i=$((i + 1)); done
grep -q "moe train: 3 layers" "$tmp/out" || fail "4-rank training did not start: $(tail -3 "$tmp/out")"
sleep 1
victim=$(pgrep -P "$mpid" | tail -1) # a rank of this mpirun, not mpirun itself
[ -n "$victim" ] || fail "no rank to kill"
start=$(date +%s)
kill -9 "$victim"
i=0
while kill -0 $mpid 2>/dev/null && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
kill -0 $mpid 2>/dev/null && { kill -9 $mpid; fail "the other ranks still run 30 s after a rank was killed"; }
wait $mpid; rc=$?
[ "$rc" != 0 ] || fail "mpirun exited 0 after a rank was killed"
echo "mpi_train: ok (killed rank: mpirun exited $rc after $(( $(date +%s) - start )) s)"
