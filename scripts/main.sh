#!/usr/bin/env bash
# README command 1: install what is missing, build, prepare Debian's fortunes as the default
# corpus, and train the default MoE language model (configs/default.cfg) with a progress line;
# it ends with a validation loss, a text sample and the HTML report RUN/report.html.
# Extra arguments go to moe train.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh build
[ -f data/fortunes/train.bin ] && [ -f data/fortunes/val.bin ] || ./build/moe prepare
run="runs/default-$(date +%Y%m%d-%H%M%S)"
./build/moe train --config configs/default.cfg --save "$run" "$@"
./build/moe report "$run"
