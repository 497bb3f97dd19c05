#!/usr/bin/env bash
# The scaling tables of bench/RESULTS.md: cost per token as T grows, and cost as E grows at
# fixed active parameters (at T=4096 and at T=16384), each row with the SGEMM ceiling and the
# roofline of its table.
# Each row is the fastest of REPEATS runs (default 3): on a shared machine a run is slowed by
# whatever else runs, never sped up, so the minimum is the layer's own cost; the ceilings of a
# table are likewise the best SGEMM rate and STREAM bandwidth its runs measured. The rows of a
# table take turns (all rows once, then again), so that a slow spell of the machine falls on
# every row rather than on one.
# Usage: bench/scaling.sh [path/to/moe]   (REPEATS=n to change the runs per row)
set -euo pipefail
moe=${1:-./build/moe}
run() { "$moe" bench layer --json --iters 3 "$@"; }
table() {
  /usr/bin/python3 -c '
import json, sys
key = sys.argv[1]
runs = [json.loads(line) for line in sys.stdin]
# one ceiling for the whole table: the best SGEMM rate and STREAM bandwidth of its runs (a run
# measures its own, and a slow spell of the machine during that measurement alone would
# otherwise put its row above 100 % of SGEMM)
sgemm = max(r["sgemm_gflops"] for r in runs)
stream = max(r["stream_gbs"] for r in runs)
print(f"| {key} | fwd+bwd ms | µs per token | of SGEMM | roofline ms | x roofline |")
print("|---|---|---|---|---|---|")
best = {}
for r in runs:
    if r[key] not in best or r["fwd_ms"] + r["bwd_ms"] < best[r[key]]["fwd_ms"] + best[r[key]]["bwd_ms"]:
        best[r[key]] = r
for r in best.values():
    ms = r["fwd_ms"] + r["bwd_ms"]
    roof = max(1e3 * r["gflop_per_call"] / sgemm, r["weight_traffic_mb"] / stream)
    rate = r["gflop_per_call"] / (1e-3 * ms)
    cells = [r[key], "%.1f" % ms, "%.1f" % (1e3 * ms / r["T"]), "%.1f %%" % (100 * rate / sgemm),
             "%.1f" % roof, "%.2f" % (ms / roof)]
    print("| " + " | ".join(str(c) for c in cells) + " |")
print(f"(ceilings, the best of the table\x27s runs: SGEMM {sgemm:.1f} GFLOP/s, "
      f"STREAM triad {stream:.1f} GB/s)")
' "$1"
}
echo "T scaling: d=512 f=1024 E=8 k=2"
for _ in $(seq "${REPEATS:-3}"); do
  for T in 256 1024 4096 16384; do
    run --tokens "$T" --hidden-size 512 --moe-ffn-hidden-size 1024 --num-experts 8 --moe-router-topk 2
  done
done | table T
echo
# the E table at two batch sizes: at T=4096 an expert of E=256 gets 32 rows, at T=16384 128
for T in 4096 16384; do
  echo
  echo "E scaling at fixed active parameters: T=$T d=512 f=512 k=2"
  for _ in $(seq "${REPEATS:-3}"); do
    for E in 8 32 128 256; do
      run --tokens "$T" --hidden-size 512 --moe-ffn-hidden-size 512 --num-experts "$E" --moe-router-topk 2
    done
  done | table E
done
