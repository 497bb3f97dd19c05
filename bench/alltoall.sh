#!/usr/bin/env bash
# The expert-parallel table of bench/RESULTS.md: moe bench alltoall at 1, 2 and 4 ranks
# (expert-parallel over all of them, one thread each) and 4 ranks with the two-stage all-to-all
# over 2 pretend machines. On one small machine the ranks share its cores: indicative only.
# Usage: bench/alltoall.sh [path/to/moe] [mpirun]   (run on a quiet machine)
set -euo pipefail
moe=${1:-./build/moe}; mpirun=${2:-mpirun}
shape="--tokens 2048 --hidden-size 512 --moe-ffn-hidden-size 1024 --num-experts 8 --moe-router-topk 2 --iters 10"
row() { # row NP [flags...]
  np=$1; shift
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=1 $mpirun --oversubscribe --allow-run-as-root --bind-to none -np "$np" \
    "$moe" bench alltoall --json $shape "$@"
}
{ row 1; row 2; row 4; row 4 --moe-hierarchical-alltoall --ranks-per-node 2; } | /usr/bin/python3 -c '
import json, sys
print("| ranks | all-to-all | layer ms | tokens/s | exchange ms (share) | waiting ms | moving ms | MB per rank | moving GB/s | plain Alltoallv GB/s | moving / plain |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for line in sys.stdin:
    r = json.loads(line)
    kind = "two-stage (2 x 2)" if r["two_stage"] else ("-" if r["ranks"] == 1 else "flat")
    ratio = "%.2f" % (r["exchange_gbs"] / r["plain_gbs"]) if r["plain_gbs"] else "-"
    cells = [r["ranks"], kind, "%.1f" % r["layer_ms"], "%.0f" % r["tokens_per_s"],
             "%.2f (%.0f %%)" % (r["exchange_ms"], 100 * r["exchange_ms"] / r["layer_ms"]),
             "%.2f" % r["wait_ms"], "%.2f" % r["move_ms"], "%.1f" % r["exchange_mb"],
             "%.2f" % r["exchange_gbs"], "%.2f" % r["plain_gbs"], ratio]
    print("| " + " | ".join(str(c) for c in cells) + " |")
'
