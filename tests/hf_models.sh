#!/bin/sh
# Hugging Face directories: tiny random-weight Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2 and -V3 models written by
# hf_models.py (fp32 in one file, bf16 and fp16 in shards), their logits from moe eval --model --ids
# --dump-logits against the script's own float64 forward pass, and the greedy continuation of
# moe generate --model (KV cache) token for token; moe convert --to hf of those and
# of our own checkpoint (every tensor compared, config.json values kept as written, a tokenizer
# only for the byte vocabulary, RoPE only DeepSeek has refused); keys left to Hugging Face's
# defaults and transformers v5's rope_parameters; malformed directories, RoPE scaling and windows
# we do not model refused with one message and a non-zero exit.
moe=$1; src=$2
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*"; exit 1; }
seed=$(od -An -N2 -tu2 /dev/urandom | tr -d ' ')
logits_match() { # logits_match DIR LABEL: moe eval's logits of DIR's ids against its ref.npy
  "$moe" eval --model "$1" --ids "$(cat "$1/ids.txt")" --dump-logits "$1/out.npy" >"$tmp/out" 2>&1 ||
    fail "$2: $(cat "$tmp/out")"
  /usr/bin/python3 - "$1" "$2" <<'PY' || fail "$2 logits differ from the reference (seed $seed)"
import sys
import numpy as np
d = sys.argv[1]
a, b = np.load(d + "/out.npy"), np.load(d + "/ref.npy")
assert a.dtype == np.float32 and a.shape == b.shape, (a.dtype, a.shape, b.shape)
err = float(np.abs(a - b).max()); scale = max(1.0, float(np.abs(b).max()))
print("%s: max |logit error| %.2e (largest logit %.2f)" % (sys.argv[2], err, scale))
sys.exit(0 if err <= 2e-5 * scale else 1)
PY
}
edit() { # edit DIR PYTHON: PYTHON changes c, DIR/config.json's object, written back
  /usr/bin/python3 - "$1" "$2" <<'PY' || fail "editing $1/config.json"
import json, sys
p = sys.argv[1] + "/config.json"
c = json.load(open(p))
exec(sys.argv[2])
json.dump(c, open(p, "w"), indent=2)
PY
}
# The models the checks below read. variants: DTYPE SHARDS FAMILY DIR-PREFIX, one a line;
# defaults: a family and the config.json keys (JSON) its check of Hugging Face's defaults sets
# (num_key_value_heads: 8 of Mixtral's 16 heads, 16 of Qwen2-MoE's 32, 4 of Qwen3-MoE's 8;
# heads at least 4 wide, so that rope_theta matters)
variants='F32 1 mixtral m
BF16 2 mixtral m
F16 3 mixtral m
F32 1 qwen2_moe q
BF16 3 qwen2_moe q
F16 2 qwen3_moe q3
BF16 1 olmoe o
F32 1 deepseek_v2 d2
BF16 2 deepseek_v3 d3'
defaults='mixtral {"hidden_size": 64, "num_attention_heads": 16, "num_key_value_heads": 8, "rope_theta": 1e6, "rms_norm_eps": 1e-5}
qwen2_moe {"hidden_size": 128, "num_attention_heads": 32, "num_key_value_heads": 16, "rms_norm_eps": 1e-6, "norm_topk_prob": false, "shared_expert_intermediate_size": 5632}
qwen3_moe {"num_attention_heads": 8, "num_key_value_heads": 4, "rms_norm_eps": 1e-6, "norm_topk_prob": false}
olmoe {"num_key_value_heads": 4, "rms_norm_eps": 1e-5, "norm_topk_prob": false}
deepseek_v2 {"rms_norm_eps": 1e-6, "n_shared_experts": 2, "routed_scaling_factor": 1.0}
deepseek_v3 {"n_routed_experts": 16, "n_group": 8, "topk_group": 4, "rms_norm_eps": 1e-6, "scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": true, "rope_interleave": true, "n_shared_experts": 1, "routed_scaling_factor": 2.5}'
nl='
'
ifs=$IFS
# all of them written first, by one process: importing torch takes 1.6 s of each model's 1.8
# (one line per model: hf_models.py's arguments, tab-separated)
set -f; IFS=$nl
for v in $variants; do
  set +f; IFS=$ifs; set -- $v
  printf '%s\t%s\t%s\t%s\t97\t%s\n' "$tmp/$4$1" "$1" "$2" "$seed" "$3"
done >"$tmp/models.tsv"
set -f; IFS=$nl
for v in $defaults; do
  set +f; IFS=$ifs
  printf '%s\tF32\t1\t%s\t97\t%s\t%s\n' "$tmp/def${v%% *}" "$seed" "${v%% *}" "${v#* }"
done >>"$tmp/models.tsv"
{ # MLA's eps; a vocabulary beyond 65536 ids; fine-tuning from a Mixtral and a Qwen2-MoE model
  printf '%s\tF32\t1\t%s\t97\tdeepseek_v3\t{"rms_norm_eps": 0.01}\n' "$tmp/d3eps" "$seed"
  printf '%s\tF32\t1\t%s\t70000\n' "$tmp/big" "$seed"
  printf '%s\tBF16\t2\t%s\t300\n' "$tmp/mv" "$seed"
  printf '%s\tF32\t1\t%s\t300\tqwen2_moe\n' "$tmp/qv" "$seed"
  printf '%s\tF32\t1\t%s\t97\tqwen2_moe\t{"shared_expert_intermediate_size": 0, "mlp_only_layers": null}\n' "$tmp/q0" "$seed"
  # dense layers: Qwen2-MoE's 1 of 3 (mlp_only_layers), Qwen3-MoE's 3 of 4 (decoder_sparse_step
  # 2 and mlp_only_layers, with a number of no layer)
  printf '%s\tF32\t1\t%s\t97\tqwen2_moe\t{"num_hidden_layers": 3, "mlp_only_layers": [1]}\n' "$tmp/qd" "$seed"
  printf '%s\tBF16\t2\t%s\t97\tqwen3_moe\t{"num_hidden_layers": 4, "decoder_sparse_step": 2, "mlp_only_layers": [3, 9]}\n' "$tmp/q3d" "$seed"
} >>"$tmp/models.tsv"
/usr/bin/python3 "$src/tests/hf_models.py" --batch "$tmp/models.tsv" || fail "writing the models"
set -f; IFS=$nl
for v in $variants; do
  set +f; IFS=$ifs; set -- $v
  dir="$tmp/$4$1"
  logits_match "$dir" "$3 $1"
  "$moe" generate --model "$dir" --ids "$(cat "$dir/ids.txt")" --max-new-tokens 8 --temperature 0 \
    >"$tmp/gen" 2>&1 || fail "$3 $1 generate: $(cat "$tmp/gen")"
  [ "$(cat "$tmp/gen")" = "$(cat "$dir/greedy.txt")" ] ||
    fail "$3 $1 greedy continuation $(cat "$tmp/gen"), reference $(cat "$dir/greedy.txt") (seed $seed)"
done
# the window: config.json's 128 positions by default (no slide before them, no note), or
# --seq-length's, past which it slides, with a note on stderr (stdout: the ids alone)
d="$tmp/mF32"
"$moe" generate --model "$d" --ids "$(cat "$d/ids.txt")" --max-new-tokens 30 --temperature 0 \
  >"$tmp/g128" 2>"$tmp/g128.err" && [ ! -s "$tmp/g128.err" ] || fail "window 128: $(cat "$tmp/g128.err")"
"$moe" generate --model "$d" --ids "$(cat "$d/ids.txt")" --max-new-tokens 30 --temperature 0 \
  --seq-length 16 >"$tmp/g16" 2>"$tmp/g16.err" || fail "window 16: $(cat "$tmp/g16.err")"
grep -q "the window of 16 positions slides past them, before max_position_embeddings (128)" "$tmp/g16.err" ||
  fail "window 16 note: $(cat "$tmp/g16.err")"
"$moe" generate --model "$d" --ids "$(cat "$d/ids.txt")" --max-new-tokens 30 --temperature 0 \
  --seq-length 100000 >"$tmp/gbig" 2>&1 && cmp -s "$tmp/gbig" "$tmp/g128" || fail "window beyond the positions"
# generation_config.json's end-of-text ids stop a generation too, as in Hugging Face's generate:
# with the greedy continuation's first id there, the continuation is that id alone
cp -r "$tmp/mF32" "$tmp/gc"
first=$(cut -d, -f1 "$tmp/gc/greedy.txt")
printf '{"eos_token_id": [%s]}\n' "$first" >"$tmp/gc/generation_config.json"
"$moe" generate --model "$tmp/gc" --ids "$(cat "$tmp/gc/ids.txt")" --max-new-tokens 8 --temperature 0 \
  >"$tmp/gen" 2>&1 || fail "generate with generation_config.json: $(cat "$tmp/gen")"
[ "$(cat "$tmp/gen")" = "$first" ] || fail "generation_config.json's eos $first: $(cat "$tmp/gen")"
# an eos_token_id that is no token id, or a generation_config.json that does not parse: an error
for bad in '{"eos_token_id": "x"}|eos_token_id is not a token id' '{"eos_token_id": [1, -2]}|eos_token_id is not a token id' \
           '{"eos_token_id": [1|not a JSON object'; do
  printf '%s\n' "${bad%%|*}" >"$tmp/gc/generation_config.json"
  "$moe" generate --model "$tmp/gc" --ids 1,2 --max-new-tokens 2 >"$tmp/gen" 2>&1; rc=$?
  [ $rc = 1 ] && grep -q "^moe generate: $tmp/gc/generation_config.json: ${bad#*|}" "$tmp/gen" ||
    fail "generation_config.json ${bad%%|*}: exit $rc, $(cat "$tmp/gen")"
done
# Hugging Face's generate takes generation_config.json's ids alone when the file is there: with
# the first id in config.json only, the continuation runs on; a list of 10 stops at its last;
# more than 64 ids are refused, not cut
edit "$tmp/gc" "c['eos_token_id'] = $first"
echo '{"eos_token_id": []}' >"$tmp/gc/generation_config.json"
"$moe" generate --model "$tmp/gc" --ids "$(cat "$tmp/gc/ids.txt")" --max-new-tokens 8 --temperature 0 \
  >"$tmp/gen" 2>&1 && [ "$(cat "$tmp/gen")" = "$(cat "$tmp/gc/greedy.txt")" ] ||
  fail "generation_config.json without the id: $(cat "$tmp/gen")"
rm "$tmp/gc/generation_config.json"
"$moe" generate --model "$tmp/gc" --ids "$(cat "$tmp/gc/ids.txt")" --max-new-tokens 8 --temperature 0 \
  >"$tmp/gen" 2>&1 && [ "$(cat "$tmp/gen")" = "$first" ] || fail "config.json's eos: $(cat "$tmp/gen")"
edit "$tmp/gc" "c['eos_token_id'] = None"
/usr/bin/python3 -c "import json, sys; json.dump({'eos_token_id': [i for i in range(97) if i != $first][:9] + [$first]}, open(sys.argv[1], 'w'))" \
  "$tmp/gc/generation_config.json"
"$moe" generate --model "$tmp/gc" --ids "$(cat "$tmp/gc/ids.txt")" --max-new-tokens 8 --temperature 0 \
  >"$tmp/gen" 2>&1; rc=$?
# (the greedy continuation may meet one of the other 9 first: it stops there)
[ $rc = 0 ] && [ "$(tr ',' '\n' <"$tmp/gen" | tail -1)" != "" ] && {
  /usr/bin/python3 - "$tmp/gen" "$tmp/gc/greedy.txt" "$tmp/gc/generation_config.json" <<'PY' || fail "10 end ids: $(cat "$tmp/gen")"
import json, sys
got = [int(x) for x in open(sys.argv[1]).read().split(",")]
ref = [int(x) for x in open(sys.argv[2]).read().split(",")]
stop = set(json.load(open(sys.argv[3]))["eos_token_id"])
want = []
for t in ref:
    want.append(t)
    if t in stop: break
assert got == want, (got, want)
PY
} || fail "10 end ids: exit $rc, $(cat "$tmp/gen")"
/usr/bin/python3 -c "import json, sys; json.dump({'eos_token_id': list(range(65))}, open(sys.argv[1], 'w'))" "$tmp/gc/generation_config.json"
"$moe" generate --model "$tmp/gc" --ids 1,2 --max-new-tokens 2 >"$tmp/gen" 2>&1 && fail "65 end ids accepted"
grep -q "more than 64 end-of-sequence ids" "$tmp/gen" || fail "65 end ids: $(cat "$tmp/gen")"
rm "$tmp/gc/generation_config.json"
# options that describe the model do not apply with --model (config.json does): refused, not
# ignored; the seed still applies (the sequence length too, to eval --data: below)
for cmd in eval generate; do
  "$moe" $cmd --model "$tmp/gc" --ids "$(cat "$tmp/gc/ids.txt")" --moe-router-topk 1 >"$tmp/out" 2>&1
  rc=$?
  [ "$rc" = 2 ] && grep -q -- "--moe-router-topk does not apply with --model" "$tmp/out" ||
    fail "$cmd --model with --moe-router-topk: exit $rc, $(cat "$tmp/out")"
done
"$moe" eval --model "$tmp/gc" --ids "$(cat "$tmp/gc/ids.txt")" --seed 3 \
  >"$tmp/out" 2>&1 || fail "eval --model with --seed: $(cat "$tmp/out")"
# keys left out mean Hugging Face's defaults (transformers' configuration_<family>.py): each
# family written with them set, then without them, gives the reference's logits
set -f; IFS=$nl
for v in $defaults; do
  set +f; IFS=$ifs
  fam=${v%% *}; over=${v#* }
  edit "$tmp/def$fam" "
for k in list(json.loads('$over')) + ['rope_theta']:  # theta: 10000, Mixtral's 1e6
    if k not in ('hidden_size', 'num_attention_heads', 'n_routed_experts'): c.pop(k, None)"
  logits_match "$tmp/def$fam" "$fam with Hugging Face's defaults"
done
# MLA's latent norms take 1e-6 whatever rms_norm_eps says (Hugging Face's RMSNorm default)
logits_match "$tmp/d3eps" "deepseek_v3 with rms_norm_eps 0.01"
# transformers v5 writes RoPE as rope_parameters (rope_theta, rope_type and YaRN's keys): the
# same logits as rope_theta and rope_scaling
cp -r "$tmp/mF32" "$tmp/v5m"
edit "$tmp/v5m" "c['rope_parameters'] = {'rope_type': 'default', 'rope_theta': c.pop('rope_theta')}"
logits_match "$tmp/v5m" "mixtral with rope_parameters"
cp -r "$tmp/d2F32" "$tmp/v5d2"
edit "$tmp/v5d2" "r = c.pop('rope_scaling'); r['rope_type'] = r.pop('type'); r['rope_theta'] = c.pop('rope_theta')
c['rope_parameters'] = r"
logits_match "$tmp/v5d2" "deepseek_v2 with rope_parameters"
# Mixtral's sliding_window at least max_position_embeddings long never applies
cp -r "$tmp/mF32" "$tmp/swm"
edit "$tmp/swm" "c['sliding_window'] = c['max_position_embeddings']"
logits_match "$tmp/swm" "mixtral with sliding_window = max_position_embeddings"

# text: a tokenizer.json (SentencePiece style, Metaspace; 97 ids as the model's vocabulary) in
# the Mixtral directory; moe generate --prompt gives the text of the greedy ids of the prompt's
# ids (decoded here with the Metaspace rule, special tokens left out)
/usr/bin/python3 - "$tmp/mF32/tokenizer.json" <<'PY' || fail "writing tokenizer.json"
import json, sys
vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
for c in "▁abcdefghijklmnopqrstuvwxyz.,!?'ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789":
    vocab[c] = len(vocab)
merges = []
for a, b in [("▁", "t"), ("h", "e"), ("▁t", "he"), ("a", "t"), ("▁", "c"), ("▁c", "at"), ("▁", "s"),
             ("▁s", "at"), ("o", "n"), ("▁", "on"), ("i", "n"), ("▁", "m"), ("▁m", "at")]:
    merges.append(a + " " + b); vocab[a + b] = len(vocab)
while len(vocab) < 97:
    vocab["<extra_%d>" % len(vocab)] = len(vocab)
ms = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": True}
special = lambda i, t: {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                        "normalized": False, "special": True}
j = {"version": "1.0", "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
     "normalizer": None, "pre_tokenizer": ms, "decoder": ms,
     "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                        {"Sequence": {"id": "A", "type_id": 0}}],
                        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
     "model": {"type": "BPE", "unk_token": "<unk>", "fuse_unk": True, "byte_fallback": False,
               "vocab": vocab, "merges": merges}}
json.dump(j, open(sys.argv[1], "w", encoding="utf-8"), ensure_ascii=False)
PY
m=$tmp/mF32
# worked out by hand: <s> ▁the ▁cat ▁sat ▁on ▁the ▁mat (ids 73.. are the merges in order)
ids=$("$moe" tokenize --model "$m" --prompt "the cat sat on the mat") || fail "tokenize"
[ "$ids" = "1,73,76,78,80,73,83" ] || fail "the prompt's ids: $ids"
"$moe" generate --model "$m" --ids "$ids" --max-new-tokens 12 --temperature 0 >"$tmp/gen" 2>&1 ||
  fail "generate --ids: $(cat "$tmp/gen")"
"$moe" generate --model "$m" --prompt "the cat sat on the mat" --max-new-tokens 12 --temperature 0 \
  >"$tmp/text" 2>&1 || fail "generate --prompt: $(cat "$tmp/text")"
/usr/bin/python3 - "$m/tokenizer.json" "$ids,$(cat "$tmp/gen")" "$tmp/text" <<'PY' ||
import json, sys
vocab = json.load(open(sys.argv[1], encoding="utf-8"))["model"]["vocab"]
inv = {i: t for t, i in vocab.items()}
toks = [inv[int(i)] for i in sys.argv[2].split(",") if int(i) > 2]
want = "".join(t.replace("\u2581", "") if k == 0 else t.replace("\u2581", " ") for k, t in enumerate(toks))
got = open(sys.argv[3], encoding="utf-8").read()
assert got == want + "\n", (got, want)
print("generate --prompt: %r" % got.strip())
PY
  fail "generate --prompt text differs from the decoded greedy ids (seed $seed)"
# --prompt-file: the same ids as --prompt, and prompts longer than an option string (2400 bytes);
# eval --prompt: the loss of eval --ids of the same ids
printf 'the cat sat on the mat' >"$tmp/prompt.txt"
[ "$("$moe" tokenize --model "$m" --prompt-file "$tmp/prompt.txt")" = "$ids" ] || fail "--prompt-file ids"
/usr/bin/python3 -c "import sys; open(sys.argv[1], 'w').write(('the cat ' * 300).rstrip())" "$tmp/long.txt"
n=$("$moe" tokenize --model "$m" --prompt-file "$tmp/long.txt" | tr ',' '\n' | wc -l)
[ "$n" = 601 ] || fail "a 2400-byte prompt gave $n ids, expected <s> + 600"
"$moe" tokenize --model "$m" --prompt x --prompt-file "$tmp/long.txt" >"$tmp/out" 2>&1; [ $? = 2 ] ||
  fail "--prompt with --prompt-file: $(cat "$tmp/out")"
# an empty prompt is the tokenizer's special tokens alone (<s> here), continued as any prompt
[ "$("$moe" tokenize --model "$m" --prompt "")" = "${ids%%,*}" ] || fail "empty prompt's ids"
"$moe" generate --model "$m" --prompt "" --max-new-tokens 2 --temperature 0 >"$tmp/out" 2>&1 ||
  fail "generate from an empty prompt: $(cat "$tmp/out")"
a=$("$moe" eval --model "$m" --prompt "the cat sat on the mat" | sed -n 's/.*loss \([0-9.]*\) nats.*/\1/p')
b=$("$moe" eval --model "$m" --ids "$ids" | sed -n 's/.*loss \([0-9.]*\) nats.*/\1/p')
[ -n "$a" ] && [ "$a" = "$b" ] || fail "eval --prompt loss $a, --ids loss $b"
# eos_token_id in config.json stops generation after that token (here the first greedy token)
first=$(cut -d, -f1 "$tmp/gen")
sed -i "s/\"model_type\"/\"eos_token_id\": [$first], \"model_type\"/" "$m/config.json"
"$moe" generate --model "$m" --ids "$ids" --max-new-tokens 12 --temperature 0 >"$tmp/gen2" 2>&1 ||
  fail "generate with eos: $(cat "$tmp/gen2")"
[ "$(cat "$tmp/gen2")" = "$first" ] || fail "did not stop at eos_token_id $first: $(cat "$tmp/gen2")"
# moe prepare --model DIR: documents in the model's token ids (no BOS), each ended by its
# eos_token_id; read back here from the file's header and token table
tokens_of() { # tokens_of FILE: "dtype vocab eot: id,id,..."
  /usr/bin/python3 -c "
import struct, sys
b = open(sys.argv[1], 'rb').read(); dt, n, v, e = struct.unpack('<IQII', b[12:32])
print('%d %d %d:' % (dt, v, e), ','.join(map(str, struct.unpack('<%d%s' % (n, 'H' if dt == 2 else 'I'), b[64:64 + dt * n]))))" "$1"
}
ids_of() { # ids_of DIR DOC...: the documents' ids (BOS dropped), each followed by EOS
  d=$1 eos=$2; shift 2; out=""
  for doc in "$@"; do out="$out$("$moe" tokenize --model "$d" --prompt "$doc" | cut -d, -f2-),$eos,"; done
  echo "${out%,}"
}
printf 'the cat\n\nsat on the mat\n' >"$tmp/cat.txt"
"$moe" prepare --model "$m" --val-fraction 0 --out "$tmp/catdata" "$tmp/cat.txt" >"$tmp/out" 2>&1 ||
  fail "prepare --model: $(cat "$tmp/out")"
want="2 97 $first: $(ids_of "$m" "$first" "the cat
" "sat on the mat
")"
[ "$(tokens_of "$tmp/catdata/train.bin")" = "$want" ] ||
  fail "prepare --model wrote $(tokens_of "$tmp/catdata/train.bin"), expected $want"
"$moe" eval --model "$m" --data "$tmp/catdata/train.bin" >"$tmp/out" 2>&1 || fail "eval of prepared data: $(cat "$tmp/out")"
"$moe" prepare --model "$tmp/mBF16" --out "$tmp/nodata" "$tmp/cat.txt" >"$tmp/out" 2>&1 && fail "prepare without tokenizer"
grep -q "tokenizer.json" "$tmp/out" || fail "prepare without tokenizer: $(cat "$tmp/out")"
# a vocabulary beyond 65536 ids: 32-bit token files, read by eval and fine-tuning
/usr/bin/python3 - "$m/tokenizer.json" "$tmp/big/tokenizer.json" <<'PY' || fail "big tokenizer"
import json, sys
j = json.load(open(sys.argv[1], encoding="utf-8"))
j["added_tokens"].append({"id": 69999, "content": "<big>", "special": False})
json.dump(j, open(sys.argv[2], "w", encoding="utf-8"), ensure_ascii=False)
PY
sed -i 's/"model_type"/"eos_token_id": 2, "model_type"/' "$tmp/big/config.json"
printf 'the <big> cat\n\nthe mat <big>\n\nthe cat <big> sat on the mat\n' >"$tmp/big.txt"
"$moe" prepare --model "$tmp/big" --val-fraction 0 --out "$tmp/bigdata" "$tmp/big.txt" >/dev/null 2>&1 || fail "prepare big"
got=$(tokens_of "$tmp/bigdata/train.bin")
want="4 70000 2: $(ids_of "$tmp/big" 2 "the <big> cat
" "the mat <big>
" "the cat <big> sat on the mat
")"
[ "$got" = "$want" ] && echo "$got" | grep -q 69999 || fail "32-bit token file: $got, expected $want"
"$moe" eval --model "$tmp/big" --data "$tmp/bigdata/train.bin" >"$tmp/out" 2>&1 || fail "eval 32-bit: $(cat "$tmp/out")"
"$moe" train --init-from "$tmp/big" --data-path "$tmp/bigdata" --seq-length 8 --micro-batch-size 1 \
  --global-batch-size 1 --train-iters 2 >"$tmp/out" 2>&1 || fail "fine-tune on 32-bit tokens: $(tail -3 "$tmp/out")"
"$moe" generate --model "$tmp/mBF16" --prompt "the cat" >"$tmp/out" 2>&1 && fail "--prompt without tokenizer.json"
grep -q "has no tokenizer.json: give token ids with --ids" "$tmp/out" || fail "no-tokenizer message: $(cat "$tmp/out")"

# Qwen2-MoE without a shared expert (width 0; mlp_only_layers null is transformers' []): read
# as Hugging Face computes it, and written as qwen2_moe with that class's empty shared expert
# and a zero gate, which give the same logits
logits_match "$tmp/q0" "qwen2_moe without a shared expert"
"$moe" convert --model "$tmp/q0" --to hf "$tmp/xq0" >"$tmp/out" 2>&1 && grep -q "(qwen2_moe, " "$tmp/out" ||
  fail "convert qwen2_moe without a shared expert: $(cat "$tmp/out")"
"$moe" eval --model "$tmp/xq0" --ids "$(cat "$tmp/q0/ids.txt")" --dump-logits "$tmp/xq0.npy" >"$tmp/out" 2>&1 &&
  cmp -s "$tmp/xq0.npy" "$tmp/q0/out.npy" || fail "converted qwen2_moe without a shared expert: other logits"
/usr/bin/python3 - "$tmp/xq0/model.safetensors" <<'PY' || fail "the empty shared expert's tensors"
import json, struct, sys
import numpy as np
b = open(sys.argv[1], "rb").read(); n = struct.unpack("<Q", b[:8])[0]; h = json.loads(b[8:8 + n])
for l in range(2):
    p = "model.layers.%d.mlp." % l
    shapes = [h[p + q + ".weight"]["shape"] for q in ("shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj", "shared_expert_gate")]
    assert shapes == [[0, 32], [0, 32], [32, 0], [1, 32]], shapes
    o = h[p + "shared_expert_gate.weight"]["data_offsets"]
    assert not np.frombuffer(b[8 + n + o[0]:8 + n + o[1]], np.float32).any()
PY

# Qwen's dense layers (mlp_only_layers, decoder_sparse_step): read as Hugging Face computes
# them, and generated from
for t in qd q3d; do
  logits_match "$tmp/$t" "$t: dense layers"
  "$moe" generate --model "$tmp/$t" --ids "$(cat "$tmp/$t/ids.txt")" --max-new-tokens 8 \
    --temperature 0 >"$tmp/gen" 2>&1 || fail "$t generate: $(cat "$tmp/gen")"
  [ "$(cat "$tmp/gen")" = "$(cat "$tmp/$t/greedy.txt")" ] ||
    fail "$t greedy continuation $(cat "$tmp/gen"), reference $(cat "$tmp/$t/greedy.txt") (seed $seed)"
done

# export: moe convert --model DIR --to hf OUT writes the same tensors (as F32) under the same
# names, and OUT gives bitwise the same logits
cmp_tensors() { # cmp_tensors A B [rename]: every tensor of dir A equals dir B's (B: one file)
  /usr/bin/python3 - "$1" "$2" "${3:-}" <<'PY'
import glob, json, struct, sys
import numpy as np
def read(d):
    out = {}
    for p in sorted(glob.glob(d + "/model*.safetensors")):
        b = open(p, "rb").read(); n = struct.unpack("<Q", b[:8])[0]; h = json.loads(b[8:8 + n])
        h.pop("__metadata__", None)
        for k, v in h.items():
            raw = b[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]]
            if v["dtype"] == "BF16":
                x = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
            else:
                x = np.frombuffer(raw, {"F32": np.float32, "F16": np.float16}[v["dtype"]]).astype(np.float32)
            out[k] = x.reshape(v["shape"])
    return out
a, b = read(sys.argv[1]), read(sys.argv[2])
if sys.argv[3] == "ours":  # our checkpoint names -> Mixtral's
    a = {k.replace(".mlp.gate.", ".block_sparse_moe.gate.").replace(".mlp.experts.", ".block_sparse_moe.experts.")
          .replace("gate_proj", "w1").replace("up_proj", "w3").replace("down_proj", "w2"): v for k, v in a.items()}
assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))[:5]
experts = sum(".experts." in k for k in a)
for k in a:
    assert a[k].shape == b[k].shape and np.array_equal(a[k], b[k]), k
print("%d tensors identical (%d expert tensors)" % (len(a), experts))
PY
}
# and the source's config.json values as written, but torch_dtype (1e-5 stays 1e-5, not
# 9.99999974737875e-06; initializer_range, read by no loader, stays 0.006; rope_parameters)
same_config() { # same_config SRC OUT
  /usr/bin/python3 - "$1" "$2" <<'PY'
import json, sys
a, b = (json.load(open(d + "/config.json")) for d in sys.argv[1:])
bad = [(k, v, b.get(k)) for k, v in a.items() if k != "torch_dtype" and b.get(k, KeyError) != v]
assert not bad, bad
PY
}
for t in mF32 mBF16 mF16 qF32 qBF16 q3F16 oBF16 d2F32 d3BF16 v5m v5d2 qd; do # every family written as itself
  "$moe" convert --model "$tmp/$t" --to hf "$tmp/x$t" >"$tmp/out" 2>&1 || fail "convert $t: $(cat "$tmp/out")"
  fam=$(sed -n 's/.*"model_type": *"\([a-z0-9_]*\)".*/\1/p' "$tmp/$t/config.json")
  grep -q "($fam, " "$tmp/out" || fail "convert $t: not written as $fam: $(cat "$tmp/out")"
  cmp_tensors "$tmp/$t" "$tmp/x$t" || fail "convert $t changed tensors"
  "$moe" eval --model "$tmp/x$t" --ids "$(cat "$tmp/$t/ids.txt")" --dump-logits "$tmp/x$t.npy" >"$tmp/out" 2>&1 ||
    fail "eval of the converted $t: $(cat "$tmp/out")"
  cmp -s "$tmp/x$t.npy" "$tmp/$t/out.npy" || fail "converted $t: other logits"
  same_config "$tmp/$t" "$tmp/x$t" || fail "convert $t changed config.json values"
done
cmp -s "$tmp/mF32/tokenizer.json" "$tmp/xmF32/tokenizer.json" || fail "convert did not copy tokenizer.json"
# Qwen3-MoE's dense layers by decoder_sparse_step are written as mlp_only_layers, step 1
"$moe" convert --model "$tmp/q3d" --to hf "$tmp/xq3d" >"$tmp/out" 2>&1 && cmp_tensors "$tmp/q3d" "$tmp/xq3d" ||
  fail "convert q3d: $(cat "$tmp/out")"
/usr/bin/python3 -c "
import json, sys
c = json.load(open(sys.argv[1] + '/config.json'))
assert c['mlp_only_layers'] == [0, 2, 3] and c['decoder_sparse_step'] == 1, c" "$tmp/xq3d" ||
  fail "q3d's dense layers written wrongly"
"$moe" eval --model "$tmp/xq3d" --ids "$(cat "$tmp/q3d/ids.txt")" --dump-logits "$tmp/xq3d.npy" >"$tmp/out" 2>&1 &&
  cmp -s "$tmp/xq3d.npy" "$tmp/q3d/out.npy" || fail "converted q3d: other logits"
# the source's other config.json keys are kept (eos_token_id, 32768 positions though we plan 4096)
sed -i 's/"max_position_embeddings": 128/"max_position_embeddings": 32768, "bos_token_id": 1/' "$tmp/mF16/config.json"
"$moe" convert --model "$tmp/mF16" --to hf "$tmp/xpos" >"$tmp/out" 2>&1 || fail "convert 32768: $(cat "$tmp/out")"
/usr/bin/python3 -c "
import json, sys
b = json.load(open(sys.argv[1] + '/config.json'))
assert b['max_position_embeddings'] == 32768 and b['bos_token_id'] == 1, b
" "$tmp/xpos" || fail "convert lost the source's config keys"
/usr/bin/python3 -c "
import json, sys
a, b = (json.load(open(p + '/config.json')) for p in sys.argv[1:])
assert b['eos_token_id'] == a['eos_token_id'], (a.get('eos_token_id'), b.get('eos_token_id'))
" "$tmp/mF32" "$tmp/xmF32" || fail "convert lost eos_token_id"
"$moe" convert --model "$tmp/mF32" --to hf "$tmp/xmF32" >"$tmp/out" 2>&1 && fail "convert over a model accepted"
grep -q "already holds a model" "$tmp/out" || fail "overwrite message: $(cat "$tmp/out")"
# nor over (or beside) tokenizer files already there: nothing written, theirs unchanged
mkdir "$tmp/tk"; echo '{"mine": 1}' >"$tmp/tk/tokenizer_config.json"
"$moe" convert --model "$tmp/mF32" --to hf "$tmp/tk" >"$tmp/out" 2>&1; rc=$?
[ $rc = 2 ] && grep -q "already holds tokenizer_config.json" "$tmp/out" && [ "$(ls "$tmp/tk")" = tokenizer_config.json ] &&
  [ "$(cat "$tmp/tk/tokenizer_config.json")" = '{"mine": 1}' ] || fail "convert over tokenizer files: exit $rc, $(cat "$tmp/out")"
# our own checkpoint to Mixtral: every tensor under its Mixtral name; a shared expert refused
"$moe" prepare --out "$tmp/data" --val-fraction 0.2 "$src/README.md" >/dev/null || fail "prepare"
# a blend of datasets in two tokenizers' ids (bytes and the model's) is refused, saying why
"$moe" train --data-path 1 "$tmp/data" 1 "$tmp/catdata" --train-iters 1 >"$tmp/out" 2>&1
[ $? = 1 ] && grep -q "^moe train: $tmp/catdata has vocabulary 97 .*: the datasets of a blend need one tokenizer$" "$tmp/out" ||
  fail "a blend of two vocabularies: $(cat "$tmp/out")"
tiny="--num-layers 2 --hidden-size 32 --num-attention-heads 4 --num-query-groups 2 --num-experts 4
  --moe-ffn-hidden-size 16 --seq-length 32 --micro-batch-size 2 --global-batch-size 2
  --train-iters 3 --data-path $tmp/data --untie-embeddings-and-output-weights"
# shellcheck disable=SC2086
"$moe" train $tiny --save "$tmp/run" >"$tmp/out" 2>&1 || fail "train: $(tail -3 "$tmp/out")"
"$moe" convert --load "$tmp/run" --to hf "$tmp/xrun" >"$tmp/out" 2>&1 || fail "convert run: $(cat "$tmp/out")"
cmp_tensors "$tmp/run/step-00000003" "$tmp/xrun" ours || fail "our checkpoint converted wrongly"
"$moe" eval --model "$tmp/xrun" --ids 72,101,108,108,111 >"$tmp/out" 2>&1 || fail "eval converted run: $(cat "$tmp/out")"
# a loss needs a target: one token is a usage error, not "loss 0 over 0 targets"
"$moe" eval --model "$tmp/xrun" --ids 104 >"$tmp/out" 2>&1; rc=$?
[ $rc = 2 ] && grep -q "needs a sequence of at least two tokens" "$tmp/out" ||
  fail "eval of one token: rc $rc, $(cat "$tmp/out")"
# a model in a run directory would stand in for its checkpoints at --load: convert refuses a
# run or checkpoint directory, train --save a model directory (exit 2, nothing written), and a
# directory that holds both is refused at load by name (not "has no moe.config metadata")
for d in "$tmp/run" "$tmp/run/step-00000003"; do
  "$moe" convert --load "$tmp/run" --to hf "$d" >"$tmp/out" 2>&1; rc=$?
  [ $rc = 2 ] && grep -q "holds a moe run or checkpoint" "$tmp/out" && [ ! -e "$d/config.json" ] ||
    fail "convert into $d: rc $rc, $(cat "$tmp/out")"
done
# shellcheck disable=SC2086
"$moe" train $tiny --save "$tmp/xrun" >"$tmp/out" 2>&1; rc=$?
[ $rc = 2 ] && grep -q "xrun holds a model (config.json)" "$tmp/out" && [ ! -e "$tmp/xrun/latest" ] ||
  fail "train --save into a model directory: rc $rc, $(cat "$tmp/out")"
cp -r "$tmp/run" "$tmp/both" && cp "$tmp/xrun/config.json" "$tmp/xrun/model.safetensors" "$tmp/both"
"$moe" eval --load "$tmp/both" >"$tmp/out" 2>&1; rc=$?
[ $rc = 1 ] && grep -q "holds both a moe run ('latest') and a model (config.json.*--load $tmp/both/step-00000003" "$tmp/out" ||
  fail "--load of a run holding a model: rc $rc, $(cat "$tmp/out")"
"$moe" eval --load "$tmp/xrun" >"$tmp/out" 2>&1; rc=$?
[ $rc = 1 ] && grep -q "is a Hugging Face model directory (config.json), not a moe checkpoint" "$tmp/out" ||
  fail "--load of a model directory: rc $rc, $(cat "$tmp/out")"
# its tokenizer.json is our byte vocabulary: UTF-8 bytes as ids, end-of-text 256 (its eos_token_id)
grep -q '"eos_token_id":[[:space:]]*256' "$tmp/xrun/config.json" || fail "no eos_token_id 256 for our vocabulary"
[ "$("$moe" tokenize --model "$tmp/xrun" --prompt "Héllo<|endoftext|>")" = "72,195,169,108,108,111,256" ] ||
  fail "the converted run's tokenizer: $("$moe" tokenize --model "$tmp/xrun" --prompt "Héllo<|endoftext|>")"
[ "$("$moe" tokenize --model "$tmp/xrun" --ids 72,195,169,10,256)" = "$(printf 'H\303\251\n<|endoftext|>')" ] ||
  fail "the converted run's tokenizer decodes wrongly"
# a tokenizer that adds no token to an empty text: an empty prompt is refused, naming the flag;
# a prompt file that cannot be read is an error of reading (exit 1), with the reason
: >"$tmp/empty.txt"
"$moe" generate --model "$tmp/xrun" --prompt-file "$tmp/empty.txt" >"$tmp/out" 2>&1; rc=$?
[ $rc = 2 ] && grep -q -- "--prompt-file: no tokens" "$tmp/out" || fail "empty prompt file: rc $rc, $(cat "$tmp/out")"
for cmd in eval generate; do
  "$moe" $cmd --model "$tmp/xrun" --prompt-file "$tmp" >"$tmp/out" 2>&1; rc=$?
  [ $rc = 1 ] && grep -q "cannot read $tmp: Is a directory" "$tmp/out" || fail "$cmd, a directory as prompt file: rc $rc, $(cat "$tmp/out")"
done
# shellcheck disable=SC2086
"$moe" train $tiny --moe-shared-expert-intermediate-size 8 --save "$tmp/run2" >"$tmp/out" 2>&1 || fail "train 2"
# a dense layer: only the Qwen families have them
# shellcheck disable=SC2086
"$moe" train $tiny --train-iters 1 --moe-layer-freq "[0,1]" --save "$tmp/dl" >"$tmp/out" 2>&1 ||
  fail "train a dense layer: $(tail -3 "$tmp/out")"
"$moe" convert --load "$tmp/dl" --to hf "$tmp/xdl" >"$tmp/out" 2>&1 && fail "a dense layer converted"
grep -q "^moe convert: no Hugging Face family takes this model: mixtral: every layer must be an MoE layer (dense layers are written as qwen2_moe and qwen3_moe); qwen2_moe: " "$tmp/out" ||
  fail "dense layer message: $(cat "$tmp/out")"
"$moe" convert --load "$tmp/run2" --to hf "$tmp/xrun2" >"$tmp/out" 2>&1 && fail "shared expert converted"
grep -q "no shared expert" "$tmp/out" || fail "shared expert message: $(cat "$tmp/out")"
[ ! -e "$tmp/xrun2" ] || fail "a refused conversion left a directory"
# interleaved RoPE and YaRN: only DeepSeek's families have them (every family's reason shown,
# a usage error)
for v in "--rotary-interleaved:--rotary-interleaved" \
         "--rotary-scaling-factor 4 --original-max-position-embeddings 16:--rotary-scaling-factor"; do
  # shellcheck disable=SC2086
  "$moe" train $tiny --train-iters 1 ${v%%:*} --save "$tmp/rope" >"$tmp/out" 2>&1 || fail "train ${v%%:*}"
  "$moe" convert --load "$tmp/rope" --to hf "$tmp/xrope" >"$tmp/out" 2>&1; rc=$?
  [ $rc = 2 ] && [ "$(wc -l <"$tmp/out")" = 1 ] &&
    grep -q "^moe convert: no Hugging Face family takes this model: mixtral, qwen2_moe, qwen3_moe, olmoe: .*(${v#*:}.* only written as deepseek_v2 or deepseek_v3; deepseek_v3, deepseek_v2: multi-head latent attention is needed$" \
    "$tmp/out" || fail "${v%%:*}: exit $rc, $(cat "$tmp/out")"
  [ ! -e "$tmp/xrope" ] || fail "a refused conversion left a directory"
  rm -rf "$tmp/rope"
done

# tokenizer.json's Lowercase and Digits as the tokenizers library does them (char::to_lowercase,
# char::is_numeric): İ lowercases to two code points (i, combining dot above), and numbers are
# Unicode's (², Arabic-Indic ٣٤), not ASCII's alone. The ids are worked out by hand: x²3İ is
# x | ²3 | i̇, ²3 one token by the merge "² 3"; a٣٤ is a | ٣٤ (not a٣ | ٤ by "a ٣"); with
# individual digits the numbers stay apart.
mkdir "$tmp/tk" "$tmp/tk/individual"
/usr/bin/python3 - "$tmp/tk" <<'EOF' || fail "writing the tokenizers"
import json, sys
vocab = {"x": 0, "\u00b2": 1, "3": 2, "i": 3, "\u0307": 4, "\u00b23": 5, "<unk>": 6, "a": 7,
         "\u0663\u0664": 8, "\u0663": 9, "\u0664": 10, "a\u0663": 11}
for individual in (False, True):
    tok = {"version": "1.0", "added_tokens": [], "normalizer": {"type": "Lowercase"},
           "pre_tokenizer": {"type": "Digits", "individual_digits": individual},
           "post_processor": None, "decoder": None,
           "model": {"type": "BPE", "vocab": vocab, "merges": ["a \u0663", "\u00b2 3", "\u0663 \u0664"],
                     "unk_token": "<unk>", "fuse_unk": False, "byte_fallback": False}}
    d = sys.argv[1] + ("/individual" if individual else "")
    json.dump(tok, open(d + "/tokenizer.json", "w"), ensure_ascii=False)
EOF
for v in "$tmp/tk:x²3İ:0,5,3,4" "$tmp/tk:a٣٤:7,8" "$tmp/tk/individual:x²3:0,1,2" \
         "$tmp/tk/individual:a٣٤:7,9,10"; do
  dir=${v%%:*}; rest=${v#*:}; text=${rest%%:*}; want=${rest#*:}
  got=$("$moe" tokenize --model "$dir" --prompt "$text" 2>&1)
  [ "$got" = "$want" ] || fail "tokenize $text with $dir: $got, expected $want"
done

# GShard's random routing of the second expert changes a forward's experts: no family has it
# shellcheck disable=SC2086
"$moe" train $tiny --train-iters 1 --moe-random-routing --save "$tmp/rr" >"$tmp/out" 2>&1 ||
  fail "train random routing"
"$moe" convert --load "$tmp/rr" --to hf "$tmp/xrr" >"$tmp/out" 2>&1 && fail "random routing converted"
grep -q "^moe convert: no Hugging Face family takes this model: mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3, deepseek_v2: no random routing" "$tmp/out" ||
  fail "random routing message: $(cat "$tmp/out")"
[ ! -e "$tmp/xrr" ] || fail "a refused conversion left a directory"

# fine-tuning: moe train --init-from DIR takes the model's config.json, the flags on top (here
# an aux loss), and its weights: with lr 0 the saved parameters are exactly the model's
ft="--init-from $tmp/mv --seq-length 32 --micro-batch-size 2 --global-batch-size 2 --data-path $tmp/data"
# shellcheck disable=SC2086
"$moe" train $ft --train-iters 1 --lr 0 --min-lr 0 --moe-aux-loss-coeff 0.01 --save "$tmp/ft" >"$tmp/out" 2>&1 ||
  fail "init-from: $(tail -3 "$tmp/out")"
grep -aq "initialised from $tmp/mv (mixtral)" "$tmp/out" || fail "no init line: $(head -3 "$tmp/out")"
! grep -q "note: the model takes" "$tmp/out" || fail "a note for the whole model: $(cat "$tmp/out")"
grep -aq "moe train: 2 layers (2 MoE), d=32" "$tmp/out" || fail "not the model's shape: $(head -3 "$tmp/out")"
grep -a "^step 1/1" "$tmp/out" | grep -qv "aux 0 " || fail "the aux-loss flag was not applied: $(grep -a '^step' "$tmp/out")"
cmp_tensors "$tmp/ft/step-00000001" "$tmp/mv" ours || fail "init-from did not load the model's weights"
# fewer layers than the model's: the first ones, said so (the model's own count: no note)
# shellcheck disable=SC2086
"$moe" train $ft --train-iters 1 --lr 0 --min-lr 0 --num-layers 1 >"$tmp/out" 2>&1 ||
  fail "init-from, one layer: $(tail -3 "$tmp/out")"
grep -aq "^note: the model takes the first 1 of the 2 layers of $tmp/mv (--num-layers)$" "$tmp/out" ||
  fail "no note on the layers left out: $(head -4 "$tmp/out")"
# shellcheck disable=SC2086
"$moe" train --init-from "$tmp/qv" --seq-length 32 --micro-batch-size 2 --global-batch-size 2 \
  --data-path "$tmp/data" --train-iters 1 --lr 0 --min-lr 0 --save "$tmp/qft" >"$tmp/out" 2>&1 ||
  fail "init-from qwen2_moe: $(tail -3 "$tmp/out")"
cmp_tensors "$tmp/qft/step-00000001" "$tmp/qv" || fail "init-from did not load the Qwen model's weights"
# and from one with a dense layer: the run's checkpoint keeps it, and is written back as it was
"$moe" train --init-from "$tmp/qd" --seq-length 8 --micro-batch-size 1 --global-batch-size 1 \
  --data-path "$tmp/catdata" --train-iters 1 --lr 0 --min-lr 0 --save "$tmp/qdft" >"$tmp/out" 2>&1 ||
  fail "init-from qwen2_moe with a dense layer: $(tail -3 "$tmp/out")"
grep -aq "moe train: 3 layers (2 MoE)" "$tmp/out" || fail "not the model's layers: $(head -3 "$tmp/out")"
"$moe" train --init-from "$tmp/qd" --seq-length 8 --micro-batch-size 1 --global-batch-size 1 \
  --data-path "$tmp/catdata" --train-iters 1 --num-layers 2 >"$tmp/out" 2>&1 &&
  grep -aq "moe train: 2 layers (1 MoE)" "$tmp/out" || fail "the first 2 layers of qd: $(head -3 "$tmp/out")"
# the first layer of Qwen3-MoE's q3d alone is dense: its checkpoint reads back as that model
"$moe" train --init-from "$tmp/q3d" --seq-length 8 --micro-batch-size 1 --global-batch-size 1 \
  --data-path "$tmp/catdata" --train-iters 1 --num-layers 1 --save "$tmp/q3d1" >"$tmp/out" 2>&1 &&
  grep -aq "moe train: 1 layers (0 MoE)" "$tmp/out" || fail "the first layer of q3d: $(head -3 "$tmp/out")"
"$moe" eval --load "$tmp/q3d1" --data-path "$tmp/catdata/train.bin" >"$tmp/out" 2>&1 || fail "eval of q3d's first layer: $(cat "$tmp/out")"
"$moe" convert --load "$tmp/qdft" --to hf "$tmp/xqdft" >"$tmp/out" 2>&1 && cmp_tensors "$tmp/qd" "$tmp/xqdft" ||
  fail "qwen2_moe with a dense layer, fine-tuned at lr 0 and converted: $(cat "$tmp/out")"
# our Qwen2-MoE-shaped checkpoint (q/k/v biases, gated shared expert) is written as qwen2_moe
"$moe" convert --load "$tmp/qft" --to hf "$tmp/xq" >"$tmp/out" 2>&1 || fail "convert qwen run: $(cat "$tmp/out")"
grep -q "(qwen2_moe, " "$tmp/out" || fail "qwen run not written as qwen2_moe: $(cat "$tmp/out")"
# its 300 ids are not moe prepare's bytes: no tokenizer.json or end-of-text 256, said so
[ ! -e "$tmp/xq/tokenizer.json" ] || fail "a 300-token run got the byte tokenizer.json"
! grep -q eos_token_id "$tmp/xq/config.json" || fail "a 300-token run got an eos_token_id"
grep -q "vocabulary of 300 tokens is not moe prepare's bytes" "$tmp/out" ||
  fail "no word on the missing tokenizer: $(cat "$tmp/out")"
cmp_tensors "$tmp/qft/step-00000001" "$tmp/xq" || fail "qwen run converted wrongly"
# DeepSeek-V3 fine-tuning keeps MLA, YaRN, the routing and the selection bias: with lr 0 and no
# bias updates the run's checkpoint, written back as deepseek_v3, gives bitwise the same logits
"$moe" train --init-from "$tmp/d3BF16" --data-path "$tmp/catdata" --seq-length 8 --micro-batch-size 1 \
  --global-batch-size 1 --train-iters 2 --lr 0 --min-lr 0 --moe-router-bias-update-rate 0 \
  --save "$tmp/d3ft" >"$tmp/out" 2>&1 || fail "init-from deepseek_v3: $(tail -3 "$tmp/out")"
! grep -q "note: the model takes" "$tmp/out" || fail "a note for the whole model: $(cat "$tmp/out")"
"$moe" convert --load "$tmp/d3ft" --to hf "$tmp/xd3ft" >"$tmp/out" 2>&1 || fail "convert deepseek run: $(cat "$tmp/out")"
grep -q "(deepseek_v3, " "$tmp/out" || fail "deepseek run not written as deepseek_v3: $(cat "$tmp/out")"
# trained at 8 positions, it says the 32 its YaRN extends the original 8 to (factor 4), not 8
/usr/bin/python3 -c "
import json, sys
c = json.load(open(sys.argv[1] + '/config.json'))
assert c['max_position_embeddings'] == 32 and c['rope_scaling']['original_max_position_embeddings'] == 8, c
" "$tmp/xd3ft" || fail "the deepseek run's positions"
"$moe" eval --model "$tmp/xd3ft" --ids "$(cat "$tmp/d3BF16/ids.txt")" --dump-logits "$tmp/xd3ft.npy" >"$tmp/out" 2>&1 ||
  fail "eval of the converted deepseek run: $(cat "$tmp/out")"
cmp -s "$tmp/xd3ft.npy" "$tmp/d3BF16/out.npy" || fail "deepseek_v3 fine-tune round trip: other logits"
# shellcheck disable=SC2086
"$moe" train $ft --train-iters 3 --save "$tmp/ft2" >"$tmp/out" 2>&1 || fail "fine-tune: $(tail -3 "$tmp/out")"
# shellcheck disable=SC2086
"$moe" train $ft --train-iters 4 --load "$tmp/ft2" >"$tmp/out" 2>&1 && fail "--init-from with --load accepted"
grep -q "resume it with --load alone" "$tmp/out" || fail "init-from/load message: $(cat "$tmp/out")"

# eval --data FILE: one window holding the whole token file gives the loss of --ids of the same
# tokens (read from the file here); a vocabulary too small for the file is refused
printf 'Mixture of experts.\n\nA small file of two documents.\n' >"$tmp/small.txt"
"$moe" prepare --out "$tmp/small" --val-fraction 0 "$tmp/small.txt" >/dev/null || fail "prepare small"
ids=$(/usr/bin/python3 -c "
import struct, sys
b = open(sys.argv[1], 'rb').read(); n = struct.unpack('<Q', b[16:24])[0]
print(','.join(str(t) for t in struct.unpack('<%dH' % n, b[64:64 + 2 * n])))" "$tmp/small/train.bin")
n=$(echo "$ids" | tr ',' '\n' | wc -l)
"$moe" eval --model "$tmp/mv" --data "$tmp/small/train.bin" --seq-length $((n - 1)) >"$tmp/out" 2>&1 ||
  fail "eval --data: $(cat "$tmp/out")"
"$moe" eval --model "$tmp/mv" --ids "$ids" >"$tmp/out2" 2>&1 || fail "eval --ids: $(cat "$tmp/out2")"
a=$(sed -n 's/.*loss \([0-9.]*\) nats.*/\1/p' "$tmp/out"); b=$(sed -n 's/.*loss \([0-9.]*\) nats.*/\1/p' "$tmp/out2")
[ -n "$a" ] && [ "$a" = "$b" ] || fail "eval --data loss $a, --ids loss $b"
"$moe" eval --model "$tmp/mF32" --data "$tmp/data/val.bin" >"$tmp/out" 2>&1 && fail "97-token model ran 257-token data"
grep -q "vocab" "$tmp/out" || fail "vocabulary message: $(cat "$tmp/out")"

# inspect: family, shape and parameter counts, against counts from the files' headers
"$moe" inspect "$tmp/mv" >"$tmp/out" 2>&1 || fail "inspect: $(cat "$tmp/out")"
want=$(/usr/bin/python3 - "$tmp/mv" <<'PY'
import glob, json, struct, sys
tot = ex = 0
for p in glob.glob(sys.argv[1] + "/model*.safetensors"):
    b = open(p, "rb").read(16 << 20); n = struct.unpack("<Q", b[:8])[0]; h = json.loads(b[8:8 + n])
    h.pop("__metadata__", None)
    for k, v in h.items():
        c = 1
        for s in v["shape"]: c *= s
        tot += c; ex += c if ".experts." in k else 0
print("parameters %d (%.2f M), in routed experts %d, active per token %d" % (tot, tot / 1e6, ex, tot - ex + ex * 2 // 4))
PY
)
grep -q "Hugging Face mixtral model, 2 layers (2 MoE), d=32, 4 heads (2 key/value), vocab 300" "$tmp/out" ||
  fail "inspect summary: $(head -2 "$tmp/out")"
grep -qF "$want" "$tmp/out" || fail "inspect counts: $(sed -n 2p "$tmp/out") (expected $want)"

# malformed: each a clear error, exit 1
bad() { # bad NAME EXPECTED-TEXT: run moe eval on $tmp/bad
  "$moe" eval --model "$tmp/bad" --ids 1,2,3 >"$tmp/out" 2>&1 && fail "$1 accepted"
  [ "$(wc -l <"$tmp/out")" = 1 ] || fail "$1: not one line: $(cat "$tmp/out")"
  grep -q "$2" "$tmp/out" || fail "$1: $(cat "$tmp/out")"
}
fresh() { rm -rf "$tmp/bad"; cp -r "$tmp/m$1" "$tmp/bad"; }
refused() { # refused SRC PYTHON EXPECTED-TEXT: SRC with config.json changed by PYTHON
  rm -rf "$tmp/bad"; cp -r "$1" "$tmp/bad"; edit "$tmp/bad" "$2"; bad "$2" "$3"
}
refused "$tmp/mF32" "c['rope_scaling'] = {'type': 'linear', 'factor': 2.0}" \
  'rope_scaling of type "linear" is not supported for mixtral (only DeepSeek.s yarn is modelled)'
refused "$tmp/oBF16" "c['rope_scaling'] = {'rope_type': 'dynamic', 'factor': 2.0}" \
  'rope_scaling of type "dynamic" is not supported for olmoe'
refused "$tmp/q3F16" "c['rope_parameters'] = {'rope_type': 'yarn', 'factor': 4.0, 'original_max_position_embeddings': 32}" \
  'rope_parameters of type "yarn" is not supported for qwen3_moe'
refused "$tmp/qF32" "c['rope_scaling'] = {'type': 'yarn', 'factor': 4.0, 'original_max_position_embeddings': 32}" \
  'rope_scaling of type "yarn" is not supported for qwen2_moe'
refused "$tmp/d2F32" "c['rope_scaling']['type'] = 'linear'" \
  'rope_scaling of type "linear" is not supported for deepseek_v2 (only "yarn" is)'
refused "$tmp/mF32" "c['rope_parameters'] = {'rope_theta': 500000.0}" \
  "rope_theta 10000 and rope_parameters' rope_theta 500000 differ"
refused "$tmp/mF32" "c['max_position_embeddings'] = 32768; c['sliding_window'] = 4096" \
  'sliding_window 4096 (below max_position_embeddings 32768) is not supported'
refused "$tmp/mF32" "del c['max_position_embeddings']; c['sliding_window'] = 32768" \
  'sliding_window 32768 (below max_position_embeddings 131072)'
refused "$tmp/qF32" "c['qkv_bias'] = False" 'qkv_bias false is not supported for qwen2_moe'
refused "$tmp/qF32" "c['use_sliding_window'] = True" 'sliding-window attention (use_sliding_window) is not supported'
refused "$tmp/q3F16" "c['mlp_only_layers'] = ['1']" 'mlp_only_layers must be a list of layer numbers'
refused "$tmp/d3BF16" "c['scoring_func'] = 'softmax'" \
  'deepseek_v3 routes with sigmoid scores and noaux_tc in Hugging Face, not scoring_func "softmax"'
refused "$tmp/d2F32" "c['scoring_func'] = 'sigmoid'" 'deepseek_v2 routes with softmax scores'
refused "$tmp/d2F32" "c['rope_interleave'] = False" 'rope_interleave false'
fresh F32; sed -i 's/"mixtral"/"llama9"/' "$tmp/bad/config.json"; bad "unknown model_type" 'model_type "llama9" is not supported (supported: mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3)'
fresh F32; sed -i 's/"num_experts_per_tok": 2/"num_experts_per_tok": 9/' "$tmp/bad/config.json"; bad "top-k above E" "must be between 1 and num-experts"
fresh F32; sed -i 's/"hidden_size": 32/"hidden_size": "32"/' "$tmp/bad/config.json"; bad "string hidden size" '"hidden_size" must be an integer'
fresh F32; echo '{"model_type": "mixtral",' >"$tmp/bad/config.json"; bad "broken JSON" "not a JSON object"
fresh F32; head -c 5000 "$tmp/mF32/model.safetensors" >"$tmp/bad/model.safetensors"; bad "truncated file" "model.safetensors"
fresh BF16; rm "$tmp/bad/model-00002-of-00002.safetensors"; bad "missing shard" "model-00002-of-00002.safetensors"
fresh BF16; sed -i 's/"model.norm.weight": "[^"]*", *//; s/, *"model.norm.weight": "[^"]*"//' "$tmp/bad/model.safetensors.index.json"
bad "tensor missing from the index" "model.norm.weight"
for v in "header-beyond:header length [0-9]* exceeds the file" "overlap:overlap" \
         "out-of-range:that do not fit its shape or the file" "shape:has shape \[16,64\], expected \[32,32\]" \
         "dtype:is not a float tensor" "duplicate:appears twice"; do
  kind=${v%%:*}; want=${v#*:}
  rm -rf "$tmp/bad"
  /usr/bin/python3 "$src/tests/hf_malform.py" "$tmp/mF32" "$tmp/bad" "$kind" || fail "writing $kind"
  bad "$kind" "$want"
done
# a tensor the model lacks is refused (loading without it computes another model); those that
# Hugging Face's classes leave unused are not, and change nothing
rm -rf "$tmp/bad"; /usr/bin/python3 "$src/tests/hf_malform.py" "$tmp/mF32" "$tmp/bad" extra || fail "writing extra"
bad "extra tensor" "holds model.layers.0.self_attn.q_proj.bias, which the model (its config.json, with the options given) does not have"
for kind in inv-freq mtp; do
  rm -rf "$tmp/bad"; /usr/bin/python3 "$src/tests/hf_malform.py" "$tmp/mF32" "$tmp/bad" $kind || fail "writing $kind"
  "$moe" eval --model "$tmp/bad" --ids "$(cat "$tmp/mF32/ids.txt")" --dump-logits "$tmp/bad.npy" >"$tmp/out" 2>&1 ||
    fail "$kind: $(cat "$tmp/out")"
  cmp -s "$tmp/bad.npy" "$tmp/mF32/out.npy" || fail "$kind: other logits"
done
# a key twice in config.json: refused (transformers takes the last value, cJSON the first)
fresh F32; sed -i 's/"num_experts_per_tok": 2,/"num_experts_per_tok": 1, "num_experts_per_tok": 2,/' "$tmp/bad/config.json"
bad "duplicate key" 'config.json: key "num_experts_per_tok" appears twice in one object'
"$moe" eval --model "$tmp/mF32" --ids 1,200 >"$tmp/out" 2>&1 && fail "id beyond the vocabulary accepted"
grep -q "not a token id below the vocabulary size 97" "$tmp/out" || fail "ids message: $(cat "$tmp/out")"
# ids are digits with commas between (spaces around them allowed): nothing else passes
for ids in "1," "+5" "-0" "1,,2" ",1" "0x10" "1 2"; do
  "$moe" eval --model "$tmp/mF32" --ids "$ids" >"$tmp/out" 2>&1; rc=$?
  [ $rc = 2 ] && grep -q "is not a token id" "$tmp/out" || fail "--ids '$ids': exit $rc, $(cat "$tmp/out")"
done
"$moe" eval --model "$tmp/mF32" --ids " 1, 2 ,3" >"$tmp/out" 2>&1 && grep -q "on 3 tokens" "$tmp/out" ||
  fail "--ids with spaces: $(cat "$tmp/out")"
echo "hf_models: ok"
