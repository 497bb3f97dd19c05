#!/usr/bin/env bash
# Fuzzes every parser of outside data with libFuzzer (clang, ASan + UBSan), SECONDS each
# (default 60): scripts/fuzz.sh [SECONDS] [TARGET...]. New corpus entries go to
# build-fuzz/corpus/NAME (the seeds in fuzz/corpus stay as they are); a crash leaves its input
# in build-fuzz/artifacts/ and makes the script fail. Prints one summary line per target.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}; shift || true
targets=${*:-safetensors tokens options checkpoint tokenizer gguf}
mkdir -p build-fuzz
if ! cmake -S . -B build-fuzz -DCMAKE_C_COMPILER=clang -DCMAKE_BUILD_TYPE=RelWithDebInfo \
     -DMOE_FUZZ=ON -DMOE_SANITIZE=ON -DMOE_BUILD_TESTS=OFF -DMOE_WERROR=ON >build-fuzz/build.log 2>&1 ||
   ! cmake --build build-fuzz -j"$(nproc)" >>build-fuzz/build.log 2>&1; then
  tail -30 build-fuzz/build.log; exit 1
fi
mkdir -p build-fuzz/artifacts
status=0
for t in $targets; do
  mkdir -p "build-fuzz/corpus/$t"
  log=build-fuzz/fuzz_$t.log
  # one process; ASan's leak check on; inputs up to 64 KiB or the largest seed's size
  dict=(); [ -f "fuzz/$t.dict" ] && dict=(-dict="fuzz/$t.dict")
  seeds=("fuzz/corpus/$t"); [ -d "fuzz/regressions/$t" ] && seeds+=("fuzz/regressions/$t")
  max=$(find "${seeds[@]}" -type f -printf '%s\n' | sort -n | tail -1)
  [ "${max:-0}" -gt 65536 ] || max=65536
  if OMP_NUM_THREADS=1 OMP_WAIT_POLICY=passive "build-fuzz/fuzz_$t" -max_total_time="$secs" \
       -max_len="$max" -timeout=20 -rss_limit_mb=4096 -print_final_stats=1 \
       -artifact_prefix="build-fuzz/artifacts/$t-" "${dict[@]}" \
       "build-fuzz/corpus/$t" "${seeds[@]}" >"$log" 2>&1; then
    result=ok
  else
    result="CRASH (see $log and build-fuzz/artifacts/)"; status=1
  fi
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1 || true)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 || true)
  echo "fuzz $t: ${execs:-?} executions in ${secs} s, ${cov:-cov: ?}, corpus $(ls "build-fuzz/corpus/$t" | wc -l) new inputs: $result"
done
exit $status
