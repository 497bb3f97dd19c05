#!/usr/bin/env bash
# A training smoke run under valgrind memcheck: no invalid access, no definite or indirect
# leak (exit 99 otherwise). valgrind does not know AVX-512: the build targets baseline x86-64
# (MOE_NATIVE=OFF) and OpenBLAS runs its AVX2 kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh build-valgrind -DMOE_NATIVE=OFF -DMOE_BUILD_TESTS=OFF -DMOE_CUDA=OFF \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
./build-valgrind/moe prepare --out "$tmp/data" README.md docs >/dev/null
tiny=(--num-layers 2 --hidden-size 32 --num-attention-heads 4 --num-query-groups 2 --num-experts 4
      --moe-router-topk 2 --moe-ffn-hidden-size 24 --ffn-hidden-size 32 --first-k-dense 1
      --seq-length 32 --micro-batch-size 4 --global-batch-size 8 --eval-interval 2 --eval-iters 1
      --moe-aux-loss-coeff 0.01 --moe-z-loss-coeff 0.001 --moe-router-enable-expert-bias
      --moe-shared-expert-intermediate-size 16 --data-path "$tmp/data")
vg=(valgrind --quiet --leak-check=full --errors-for-leak-kinds=definite,indirect
    --show-leak-kinds=definite,indirect --error-exitcode=99)
export MOE_BLAS_CORETYPE=Haswell OMP_NUM_THREADS=2 OMP_WAIT_POLICY=passive
"${vg[@]}" ./build-valgrind/moe train "${tiny[@]}" --train-iters 3 --save "$tmp/run" >"$tmp/log" 2>&1 ||
  { tail -40 "$tmp/log"; echo "valgrind: train failed"; exit 1; }
"${vg[@]}" ./build-valgrind/moe generate --load "$tmp/run" --prompt "The " --max-new-tokens 20 >"$tmp/log" 2>&1 ||
  { tail -40 "$tmp/log"; echo "valgrind: generate failed"; exit 1; }
echo "valgrind: train (3 steps, checkpoint) and generate clean"
