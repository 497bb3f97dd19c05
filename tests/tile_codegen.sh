#!/bin/sh
# The register tiles of kernels/gemm_small.c are register tiles in the optimised build: every
# instantiated tile holds at least one FMA per accumulator in its loop over k, i.e. its loops
# over rows and vectors were unrolled whole and the accumulators live in registers. A compiler
# that leaves those loops rolled keeps the accumulators in memory and the tiles run 4-5 times
# slower (clang did, bench/RESULTS.md session 28) with every result still right, which no other
# test would notice. Reads the disassembly; times nothing.
#   tile_NV_MR   NV * MR vector FMAs (NV vectors of MR rows)
#   tilep_NP_MR  NP * MR (NP vectors of pairs of k by MR weight rows)
#   dot_M_R_0    M * R (fp32), dot_M_R_1 M * R vdpbf16ps (bf16)
#   tn_row8      24 (8 rows of 3 vectors)
# Usage: tile_codegen.sh path/to/moe
set -eu
bin=$1
objdump -d --no-show-raw-insn "$bin" | awk '
function finish() {
    if (name == "") return
    split(name, f, "_")
    if (name ~ /^tile_[0-9]+_[0-9]+$/) need = f[2] * f[3]
    else if (name ~ /^tilep_[0-9]+_[0-9]+$/) need = f[2] * f[3]
    else if (name ~ /^dot_[0-9]+_[0-9]+_[01]$/) need = f[2] * f[3]
    else need = 24
    checked++
    if (fma < need) { printf "%s: %d vector FMAs, at least %d expected\n", name, fma, need; bad++ }
    name = ""
}
/^[0-9a-f]+ <.*>:$/ {
    finish()
    s = $2; gsub(/[<>:]/, "", s)
    if (s ~ /^(tile_[0-9]+_[0-9]+|tilep_[0-9]+_[0-9]+|dot_[0-9]+_[0-9]+_[01]|tn_row8)(\..*)?$/) {
        sub(/\..*/, "", s); name = s; fma = 0
    }
    next
}
name != "" && /vfmadd[0-9]+ps.*zmm|vdpbf16ps.*zmm/ { fma++ }
END {
    finish()
    if (checked < 40) { printf "only %d tiles found in the binary\n", checked; exit 1 }
    if (bad) exit 1
    printf "%d tiles, each with its FMAs unrolled\n", checked
}'
