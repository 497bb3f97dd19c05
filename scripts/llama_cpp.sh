#!/usr/bin/env bash
# Installs llama.cpp for tests/gguf.sh's checks of GGUF files in llama.cpp itself:
# node-llama-cpp 3.22.1 with its prebuilt CPU libraries for x86-64 Linux, from the npm registry,
# into DIR (default build/llama-cpp, about 85 MB). Needs node 20 or later and npm (Debian 12's
# node is 18: NodeSource's packages, for one). Then: MOE_LLAMA_CPP=DIR ctest -R gguf, or
# MOE_LLAMA_CPP=DIR sh tests/gguf.sh build/moe .
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-build/llama-cpp}
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "llama_cpp.sh: node and npm are needed (node 20 or later)" >&2; exit 1
fi
if ! node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)'; then
  echo "llama_cpp.sh: node $(node --version) is older than node-llama-cpp's 20" >&2; exit 1
fi
mkdir -p "$dir"
cd "$dir"
[ -f package.json ] || npm init -y >/dev/null
npm install --no-audit --no-fund --omit=optional --ignore-scripts \
  node-llama-cpp@3.22.1 @node-llama-cpp/linux-x64@3.22.1 >/dev/null
echo "llama.cpp (node-llama-cpp 3.22.1) in $PWD: MOE_LLAMA_CPP=$PWD"
