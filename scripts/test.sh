#!/usr/bin/env bash
# README command 2: install what is missing, build (gcc Release with CUDA where nvcc is found,
# gcc ASan+UBSan, clang without MPI or CUDA), and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
start=$(date +%s)
stage() { echo "== $* (at $(( $(date +%s) - start )) s)"; }
stage "gcc Release build"
bash scripts/build.sh build
stage "clang build without MPI or CUDA, library, tool and tests (warnings are errors)"
CC=clang bash scripts/build.sh build-clang -DMOE_MPI=OFF -DMOE_CUDA=OFF
stage "gcc ASan+UBSan build"
bash scripts/build.sh build-asan -DCMAKE_BUILD_TYPE=Debug -DMOE_SANITIZE=ON
stage "tests (Release)"
ctest --test-dir build --output-on-failure -j1
stage "tests (clang, one process without MPI)"
ctest --test-dir build-clang --output-on-failure -j2
stage "tests (ASan+UBSan)"
ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
  ctest --test-dir build-asan --output-on-failure -j2
stage "training under valgrind memcheck"
bash scripts/valgrind.sh
stage "fuzzing every parser of outside data (libFuzzer, ASan+UBSan), ${MOE_FUZZ_SECONDS:-12} s each"
bash scripts/fuzz.sh "${MOE_FUZZ_SECONDS:-12}"
echo "== all tests passed in $(( $(date +%s) - start )) s"
