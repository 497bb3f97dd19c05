#!/bin/sh
# Runs a fuzz target's seed corpus and regression inputs once each: fuzz_inputs.sh DRIVER FUZZDIR NAME
driver=$1; dir=$2; name=$3
set -- "$dir/corpus/$name"/* "$dir/regressions/$name"/*
files=""
for f in "$@"; do [ -f "$f" ] && files="$files $f"; done
[ -n "$files" ] || { echo "FAIL: no inputs for $name in $dir"; exit 1; }
# shellcheck disable=SC2086
"$driver" $files || { echo "FAIL: $name"; exit 1; }
