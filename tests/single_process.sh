#!/bin/sh
# A build without MPI refuses to run as one of several processes of a launcher (mpirun would
# start N rank-0 runs writing the same files), and runs alone when the launcher says 1.
moe=$1
out=$(mktemp); trap 'rm -f "$out"' EXIT
fail() { echo "FAIL: $*"; cat "$out"; exit 1; }
for var in OMPI_COMM_WORLD_SIZE PMI_SIZE; do
  env "$var=3" "$moe" --version >"$out" 2>&1 && fail "$var=3: exit 0"
  [ "$(wc -l <"$out")" = 1 ] && grep -q "built without MPI.*one of 3 processes" "$out" ||
    fail "$var=3: not the one-line error"
  env "$var=1" "$moe" --version >"$out" 2>&1 || fail "$var=1 should run"
done
echo "single_process: ok"
