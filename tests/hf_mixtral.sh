#!/bin/sh
# Hugging Face Mixtral directories: tiny random-weight models written by hf_mixtral.py (fp32
# in one file, bf16 in 2 shards, fp16 in 3), their logits from moe eval --model --ids
# --dump-logits against the script's own float64 forward pass; malformed directories refused
# with one message and a non-zero exit.
moe=$1; src=$2
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*"; exit 1; }
seed=$(od -An -N2 -tu2 /dev/urandom | tr -d ' ')
for v in "F32 1" "BF16 2" "F16 3"; do
  set -- $v
  dir="$tmp/m$1"
  /usr/bin/python3 "$src/tests/hf_mixtral.py" "$dir" "$1" "$2" "$seed" || fail "writing the $1 model"
  "$moe" eval --model "$dir" --ids "$(cat "$dir/ids.txt")" --dump-logits "$dir/out.npy" >"$tmp/out" 2>&1 ||
    fail "$1: $(cat "$tmp/out")"
  /usr/bin/python3 - "$dir" "$1" <<'PY' || fail "$1 logits differ from the reference (seed $seed)"
import sys
import numpy as np
d = sys.argv[1]
a, b = np.load(d + "/out.npy"), np.load(d + "/ref.npy")
assert a.dtype == np.float32 and a.shape == b.shape, (a.dtype, a.shape, b.shape)
err = float(np.abs(a - b).max()); scale = max(1.0, float(np.abs(b).max()))
print("%s: max |logit error| %.2e (largest logit %.2f)" % (sys.argv[2], err, scale))
sys.exit(0 if err <= 2e-5 * scale else 1)
PY
done
# malformed: each a clear error, exit 1
bad() { # bad NAME EXPECTED-TEXT: run moe eval on $tmp/bad
  "$moe" eval --model "$tmp/bad" --ids 1,2,3 >"$tmp/out" 2>&1 && fail "$1 accepted"
  [ "$(wc -l <"$tmp/out")" = 1 ] || fail "$1: not one line: $(cat "$tmp/out")"
  grep -q "$2" "$tmp/out" || fail "$1: $(cat "$tmp/out")"
}
fresh() { rm -rf "$tmp/bad"; cp -r "$tmp/m$1" "$tmp/bad"; }
fresh F32; sed -i 's/"mixtral"/"llama9"/' "$tmp/bad/config.json"; bad "unknown model_type" 'model_type "llama9" is not supported'
fresh F32; sed -i 's/"num_experts_per_tok": 2/"num_experts_per_tok": 9/' "$tmp/bad/config.json"; bad "top-k above E" "must be between 1 and num-experts"
fresh F32; sed -i 's/"hidden_size": 32/"hidden_size": "32"/' "$tmp/bad/config.json"; bad "string hidden size" '"hidden_size" must be an integer'
fresh F32; echo '{"model_type": "mixtral",' >"$tmp/bad/config.json"; bad "broken JSON" "not a JSON object"
fresh F32; head -c 5000 "$tmp/mF32/model.safetensors" >"$tmp/bad/model.safetensors"; bad "truncated file" "model.safetensors"
fresh BF16; rm "$tmp/bad/model-00002-of-00002.safetensors"; bad "missing shard" "model-00002-of-00002.safetensors"
fresh BF16; sed -i 's/"model.norm.weight": "[^"]*", *//; s/, *"model.norm.weight": "[^"]*"//' "$tmp/bad/model.safetensors.index.json"
bad "tensor missing from the index" "model.norm.weight"
"$moe" eval --model "$tmp/mF32" --ids 1,200 >"$tmp/out" 2>&1 && fail "id beyond the vocabulary accepted"
grep -q "not a token id below the vocabulary size 97" "$tmp/out" || fail "ids message: $(cat "$tmp/out")"
echo "hf_mixtral: ok"
