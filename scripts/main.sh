#!/usr/bin/env bash
# README command 1: install what is missing, build, prepare Debian's fortunes as the default
# corpus, and train the default MoE language model (configs/default.cfg) with a progress line;
# it ends with a validation loss and a text sample. Extra arguments go to moe train.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh build
[ -f data/fortunes/train.bin ] && [ -f data/fortunes/val.bin ] || ./build/moe prepare
./build/moe train --config configs/default.cfg --save "runs/default-$(date +%Y%m%d-%H%M%S)" "$@"
