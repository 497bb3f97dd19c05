#!/usr/bin/env bash
# Configures and builds one variant, warnings as errors: scripts/build.sh DIR [cmake options...]
set -euo pipefail
dir=$1; shift
mkdir -p "$dir"
if ! cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=Release -DMOE_WERROR=ON "$@" >"$dir/configure.log" 2>&1; then
  cat "$dir/configure.log"; exit 1
fi
grep "moe:" "$dir/configure.log" || true
if ! cmake --build "$dir" -j"$(nproc)" >"$dir/build.log" 2>&1; then
  grep -E -B2 -A8 "error|warning" "$dir/build.log" || tail -50 "$dir/build.log"; exit 1
fi
echo "built $dir"
