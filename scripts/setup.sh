#!/usr/bin/env bash
# Installs what moe.c needs from Debian 12's packages, if missing (run as root).
set -euo pipefail
pkgs=(build-essential cmake pkg-config clang libomp-dev libclang-rt-14-dev valgrind
      libopenblas-openmp-dev libcmocka-dev libcjson-dev libpcre2-dev libutf8proc-dev libdnnl-dev
      openmpi-bin libopenmpi-dev fortunes python3-torch)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing packages (${missing[*]}) and not root: run as root or install them" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
