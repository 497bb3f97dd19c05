#!/bin/sh
# moe convert --to gguf: tiny random-weight Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE directories
# (hf_models.py: F32, BF16 and F16 tensors, with and without a tokenizer.json: SentencePiece
# style with byte fallback, Qwen2's byte-level split, GPT-2's) and a checkpoint of our own
# (tied embeddings, moe prepare's bytes) written as llama.cpp's architectures, each file read
# and checked by gguf_check.py (every tensor, the metadata, the vocabulary, and the logits of a
# float64 forward pass with llama.cpp's semantics against the directory's reference logits);
# f16 and bf16 files rounded from the same values; models llama.cpp's architectures do not
# compute refused with one message, exit 2 and no file.
moe=$1; src=$2
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*"; exit 1; }
seed=$(od -An -N2 -tu2 /dev/urandom | tr -d ' ')
py=/usr/bin/python3
# DIR DTYPE SHARDS SEED VOCAB FAMILY [OVERRIDES]
{
  printf '%s\tF32\t1\t%s\t300\tmixtral\n' "$tmp/mx" "$seed"
  printf '%s\tBF16\t2\t%s\t97\tmixtral\n' "$tmp/mb" "$seed"
  printf '%s\tF32\t1\t%s\t300\tqwen2_moe\n' "$tmp/q2" "$seed"
  printf '%s\tF16\t3\t%s\t300\tqwen3_moe\n' "$tmp/q3" "$seed"
  printf '%s\tBF16\t1\t%s\t300\tolmoe\t{"num_key_value_heads": 4}\n' "$tmp/ol" "$seed"
  # rows of 256 for the K-quants' blocks
  printf '%s\tF32\t1\t%s\t300\tmixtral\t{"hidden_size": 256, "intermediate_size": 256}\n' "$tmp/mk" "$seed"
  # refused: no shared expert, grouped key/value heads, a dense layer, DeepSeek, top-k weights
  # renormalised where llama.cpp's qwen2moe does not
  printf '%s\tF32\t1\t%s\t97\tqwen2_moe\t{"shared_expert_intermediate_size": 0}\n' "$tmp/q0" "$seed"
  printf '%s\tF32\t1\t%s\t97\tolmoe\n' "$tmp/og" "$seed"
  printf '%s\tF32\t1\t%s\t97\tqwen2_moe\t{"num_hidden_layers": 3, "mlp_only_layers": [1]}\n' "$tmp/qd" "$seed"
  printf '%s\tF32\t1\t%s\t97\tdeepseek_v2\n' "$tmp/d2" "$seed"
  printf '%s\tF32\t1\t%s\t97\tqwen2_moe\t{"norm_topk_prob": true}\n' "$tmp/qn" "$seed"
  # refused: a SentencePiece vocabulary without byte tokens
  printf '%s\tF32\t1\t%s\t97\tqwen3_moe\n' "$tmp/qm" "$seed"
} >"$tmp/models.tsv"
$py "$src/tests/hf_models.py" --batch "$tmp/models.tsv" || fail "writing the models"

# tokenizer.json files: SentencePiece style (byte fallback, BOS) for mx, Qwen2's split for q2,
# GPT-2's with an end-of-text suffix for ol, today's Mistral's (Metaspace, byte fallback) for
# q3, older Llama's (Metaspace, no byte tokens: refused) for qm
$py - "$tmp" <<'PY' || fail "writing the tokenizers"
import json, sys
tmp = sys.argv[1]
keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
chars, extra = {}, 0
for b in range(256):
    chars[b] = chr(b) if b in keep else chr(256 + extra)
    extra += b not in keep
def added(i, t):
    return {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}
def bpe(vocab, merges, **kw):
    m = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
         "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "vocab": vocab,
         "merges": merges}
    m.update(kw)
    return m
def byte_level(merges, pre, post, name):
    vocab = {chars[b]: b for b in range(256)}
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    eot = len(vocab)
    bl = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    j = {"version": "1.0", "truncation": None, "padding": None,
         "added_tokens": [added(eot, "<|endoftext|>"), added(eot + 1, "<|im_start|>")],
         "normalizer": {"type": "NFC"}, "pre_tokenizer": pre(bl), "post_processor": post(bl, eot),
         "decoder": bl, "model": bpe(vocab, merges)}
    json.dump(j, open("%s/%s/tokenizer.json" % (tmp, name), "w"), ensure_ascii=False)
    if j["post_processor"] is not bl:  # its template ends with <|endoftext|>: generation stops there
        open("%s/%s/end_id.txt" % (tmp, name), "w").write(str(eot))
qwen2 = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+"
         "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
byte_level(["Ġ t", "h e", "Ġt he", "i n", "Ġ a"],
           lambda bl: {"type": "Sequence", "pretokenizers": [
               {"type": "Split", "pattern": {"Regex": qwen2}, "behavior": "Isolated", "invert": False}, bl]},
           lambda bl, eot: bl, "q2")
byte_level(["Ġ t", "Ġt h", "e r", "Ġth e"], lambda bl: dict(bl, use_regex=True),
           lambda bl, eot: {"type": "TemplateProcessing",
                            "single": [{"Sequence": {"id": "A", "type_id": 0}},
                                       {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}],
                            "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [eot],
                                                                 "tokens": ["<|endoftext|>"]}}}, "ol")
vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
for b in range(256):
    vocab["<0x%02X>" % b] = len(vocab)
merges = ["▁ t", "h e", "▁t he", "▁ a", "n d", "▁a nd"]
for c in "▁theand":
    vocab.setdefault(c, len(vocab))
for m in merges:
    vocab.setdefault(m.replace(" ", ""), len(vocab))
j = {"version": "1.0", "truncation": None, "padding": None,
     "added_tokens": [added(0, "<unk>"), added(1, "<s>"), added(2, "</s>")],
     "normalizer": {"type": "Sequence", "normalizers": [
         {"type": "Prepend", "prepend": "▁"},
         {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
     "pre_tokenizer": None,
     "post_processor": {"type": "TemplateProcessing",
                        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                   {"Sequence": {"id": "A", "type_id": 0}}],
                        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
     "decoder": {"type": "Sequence", "decoders": [
         {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
         {"type": "ByteFallback"}, {"type": "Fuse"},
         {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
     "model": bpe(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True)}
json.dump(j, open(tmp + "/mx/tokenizer.json", "w"), ensure_ascii=False)
# Mistral's today: Metaspace without a split, byte fallback
ms = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
j.update(normalizer=None, pre_tokenizer=ms, decoder={"type": "Sequence", "decoders": [
    ms, {"type": "ByteFallback"}, {"type": "Fuse"}]})
json.dump(j, open(tmp + "/q3/tokenizer.json", "w"), ensure_ascii=False)
# older Llama's: Metaspace, no byte tokens
vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
for c in "▁theandoi":
    vocab.setdefault(c, len(vocab))
for m in merges:
    vocab.setdefault(m.replace(" ", ""), len(vocab))
j.update(pre_tokenizer=dict(ms, split=True), decoder=ms,
         model=bpe(vocab, merges, unk_token="<unk>", fuse_unk=True))
json.dump(j, open(tmp + "/qm/tokenizer.json", "w"), ensure_ascii=False)
PY
cp "$tmp/mx/tokenizer.json" "$tmp/mk/"
# each tokenizer reads (the file is one moe's tokenizer takes)
for m in mx q2 ol q3; do
  "$moe" tokenize --model "$tmp/$m" --prompt "the and a" >"$tmp/out" 2>&1 || fail "$m tokenizer: $(cat "$tmp/out")"
done

check() { # check FILE DIR REF IDS TOLERANCE TYPE
  $py "$src/tests/gguf_check.py" "$@" >"$tmp/check" 2>&1 || fail "$(cat "$tmp/check") (seed $seed)"
  cat "$tmp/check"
}
for m in mx mb q2 q3 ol; do
  d="$tmp/$m"
  "$moe" convert --model "$d" --to gguf "$d.gguf" >"$tmp/out" 2>&1 || fail "$m convert: $(cat "$tmp/out")"
  case $m in mb) note="; no tokenizer.json, so no vocabulary" ;; *) note=", the vocabulary of $d/tokenizer.json" ;; esac
  grep -q "^wrote $d.gguf (llama.cpp's .*$note" "$tmp/out" || fail "$m convert output: $(cat "$tmp/out")"
  check "$d.gguf" "$d" "$d/ref.npy" "$(cat "$d/ids.txt")" 1e-9 f32
done
# half precision and Q8_0: the matrices rounded to nearest even or quantised from the same
# values, checked exactly (not the logits: a rounding may change a token's experts)
for t in f16 bf16 q8_0; do
  for m in q2 mx; do
    d="$tmp/$m"
    "$moe" convert --model "$d" --to gguf "$d.out-$t.gguf" --outtype $t >"$tmp/out" 2>&1 || fail "$m $t: $(cat "$tmp/out")"
    check "$d.out-$t.gguf" "$d" "$d/ref.npy" "$(cat "$d/ids.txt")" - $t
  done
done

# our own checkpoint: a tiny run on bytes (tied embeddings), against moe eval's logits of the
# Hugging Face directory convert writes for it
"$moe" prepare --out "$tmp/data" --val-fraction 0.2 "$src/README.md" >"$tmp/out" 2>&1 || fail "prepare: $(cat "$tmp/out")"
"$moe" train --data-path "$tmp/data" --num-layers 2 --hidden-size 32 --num-attention-heads 4 \
  --num-query-groups 2 --seq-length 32 --num-experts 4 --moe-router-topk 2 --moe-ffn-hidden-size 24 \
  --ffn-hidden-size 48 --micro-batch-size 4 --global-batch-size 4 --train-iters 3 --lr 0.01 \
  --eval-interval 0 --save "$tmp/run" --save-interval 3 >"$tmp/out" 2>&1 || fail "train: $(cat "$tmp/out")"
"$moe" convert --load "$tmp/run" --to hf "$tmp/runhf" >"$tmp/out" 2>&1 || fail "convert hf: $(cat "$tmp/out")"
"$moe" convert --load "$tmp/run" --to gguf "$tmp/run.gguf" >"$tmp/out" 2>&1 || fail "convert run: $(cat "$tmp/out")"
grep -q "llama.cpp's llama, f32, .* the vocabulary of bytes" "$tmp/out" || fail "run output: $(cat "$tmp/out")"
run_ids=$($py -c "import random; print(','.join(str(random.randrange(257)) for _ in range(11)))")
"$moe" eval --model "$tmp/runhf" --ids "$run_ids" --dump-logits "$tmp/run.npy" >"$tmp/out" 2>&1 || fail "eval: $(cat "$tmp/out")"
check "$tmp/run.gguf" "$tmp/runhf" "$tmp/run.npy" "$run_ids" 2e-5 f32

# refusals: one line, exit 2, no file
refuse() { # refuse LABEL MESSAGE ARGS...: exit 2, MESSAGE on stderr, no OUT written
  label=$1 msg=$2; shift 2
  "$moe" convert "$@" >"$tmp/out" 2>&1; rc=$?
  [ $rc = 2 ] && [ "$(wc -l <"$tmp/out")" = 1 ] && grep -q "$msg" "$tmp/out" || fail "$label: exit $rc, $(cat "$tmp/out")"
  [ ! -e "$tmp/no.gguf" ] || fail "$label wrote a file"
}
refuse "no shared expert" "llama.cpp's qwen2moe needs a shared expert" --model "$tmp/q0" --to gguf "$tmp/no.gguf"
refuse "kv heads" "llama.cpp's olmoe needs as many key/value heads as heads" --model "$tmp/og" --to gguf "$tmp/no.gguf"
refuse "dense layer" "llama.cpp's qwen2moe has no dense layers" --model "$tmp/qd" --to gguf "$tmp/no.gguf"
refuse "deepseek" "written for mixtral, qwen2_moe, qwen3_moe and olmoe models, not deepseek_v2" --model "$tmp/d2" --to gguf "$tmp/no.gguf"
refuse "renormalised" "llama.cpp's qwen2moe does not renormalise the top-k weights" --model "$tmp/qn" --to gguf "$tmp/no.gguf"
refuse "outtype" "usage: moe convert" --model "$tmp/mx" --to gguf "$tmp/no.gguf" --outtype q4_0
refuse "outtype hf" "usage: moe convert" --model "$tmp/mx" --to hf "$tmp/nohf" --outtype bf16
"$moe" convert --model "$tmp/qm" --to gguf "$tmp/no.gguf" >"$tmp/out" 2>&1; rc=$?
[ $rc = 1 ] && [ "$(wc -l <"$tmp/out")" = 1 ] && [ ! -e "$tmp/no.gguf" ] &&
  grep -q "qm/tokenizer.json: llama.cpp's SentencePiece vocabulary needs the 256 byte tokens <0x00> ... <0xFF> (byte fallback); this one has 0" "$tmp/out" ||
  fail "no byte tokens: exit $rc, $(cat "$tmp/out")"
cp "$tmp/mx.gguf" "$tmp/keep.gguf"
"$moe" convert --model "$tmp/q2" --to gguf "$tmp/mx.gguf" >"$tmp/out" 2>&1; rc=$?
[ $rc = 2 ] && grep -q "already exists" "$tmp/out" && cmp -s "$tmp/mx.gguf" "$tmp/keep.gguf" ||
  fail "over an existing file: exit $rc, $(cat "$tmp/out")"
# a value beyond float16's range: f16 refused, bf16 written
cp -r "$tmp/q2" "$tmp/q2big"
$py - "$tmp/q2big" <<'PY' || fail "editing a weight"
import json, struct, sys
p = sys.argv[1] + "/model.safetensors"
b = bytearray(open(p, "rb").read())
n = struct.unpack_from("<Q", b, 0)[0]
t = json.loads(b[8:8 + n])["model.layers.0.self_attn.o_proj.weight"]
struct.pack_into("<f", b, 8 + n + t["data_offsets"][0], 70000.0)
open(p, "wb").write(b)
PY
"$moe" convert --model "$tmp/q2big" --to gguf "$tmp/no.gguf" --outtype f16 >"$tmp/out" 2>&1; rc=$?
[ $rc = 1 ] && grep -q "blk.0.attn_output.weight holds 70000, beyond float16's range: write bf16 or f32" "$tmp/out" &&
  [ ! -e "$tmp/no.gguf" ] && [ ! -e "$tmp/no.gguf.tmp" ] || fail "f16 overflow: exit $rc, $(cat "$tmp/out")"
"$moe" convert --model "$tmp/q2big" --to gguf "$tmp/big.gguf" --outtype bf16 >"$tmp/out" 2>&1 || fail "bf16 of 70000: $(cat "$tmp/out")"

# reading: a file stands for its directory. F32: moe eval's logits bit for bit, the greedy
# continuation, written back to GGUF (checked as above); the tokenizer's ids of texts (q3's
# only where no space leads and no special token precedes: there GGUF's SentencePiece puts a ▁
# that Metaspace's "first" scheme does not, in llama.cpp as here)
for m in mx mb q2 q3 ol; do
  d="$tmp/$m" ids=$(cat "$tmp/$m/ids.txt")
  "$moe" eval --model "$d" --ids "$ids" --dump-logits "$d.h.npy" >"$tmp/out" 2>&1 &&
    "$moe" eval --model "$d.gguf" --ids "$ids" --dump-logits "$d.g.npy" >"$tmp/out" 2>&1 ||
    fail "$m eval: $(cat "$tmp/out")"
  cmp -s "$d.h.npy" "$d.g.npy" || fail "$m: the file's logits differ from the directory's"
  # the reference's 8 ids, up to the file's end-of-text id where it has one (ol's): generation
  # stops after it
  want=$(cat "$d/greedy.txt")
  [ -e "$d/end_id.txt" ] && want=$(echo "$want" | awk -F, -v e="$(cat "$d/end_id.txt")" \
    '{ o = $1; for (i = 1; i <= NF; i++) { if (i > 1) o = o "," $i; if ($i == e) break } print o }')
  "$moe" generate --model "$d.gguf" --ids "$ids" --max-new-tokens 8 --temperature 0 >"$tmp/gen" 2>&1 &&
    [ "$(cat "$tmp/gen")" = "$want" ] ||
    fail "$m greedy from the file: $(cat "$tmp/gen"), reference $(cat "$d/greedy.txt") (seed $seed)"
  "$moe" convert --model "$d.gguf" --to gguf "$d.rt.gguf" >"$tmp/out" 2>&1 || fail "$m again: $(cat "$tmp/out")"
  check "$d.rt.gguf" "$d" "$d/ref.npy" "$ids" 1e-9 f32
done
same_ids() { # same_ids MODEL TEXT...
  m=$1; shift
  for text; do
    a=$("$moe" tokenize --model "$tmp/$m" --prompt "$text" 2>&1) && b=$("$moe" tokenize --model "$tmp/$m.gguf" --prompt "$text" 2>&1) &&
      [ "$a" = "$b" ] || fail "$m tokens of '$text': directory $a, file $b"
  done
}
for m in mx q2 ol; do
  same_ids $m "the and a" "  thé   cat<|endoftext|> and 漢字 🙂 " "<s>the</s>" "a
b"
done
same_ids q3 "the and a" "thé   cat and 漢字 🙂 " "a
b"
"$moe" tokenize --model "$tmp/mb.gguf" --prompt "the" >"$tmp/out" 2>&1; rc=$?
[ $rc = 2 ] && grep -q "has no vocabulary (tokenizer.ggml.model none): give token ids with --ids" "$tmp/out" ||
  fail "text without a vocabulary: exit $rc, $(cat "$tmp/out")"
# quantised files (written by gguf_files.py from ggml's block layouts): values dequantised as
# the format defines them, bit for bit (through moe convert back to F32)
"$moe" convert --model "$tmp/mk" --to gguf "$tmp/mk.gguf" >"$tmp/out" 2>&1 || fail "mk convert: $(cat "$tmp/out")"
for mq in mx:q8_0 q2:q8_0 mx:q4_0 q2:q4_0 mx:q4_1 q2:q5_0 mx:q5_1 mk:q2_k mk:q3_k mk:q4_k mk:q5_k mk:q6_k \
  q2:iq4_nl mk:iq4_xs; do
  m=${mq%:*} q=${mq#*:}
  $py "$src/tests/gguf_files.py" quantise "$tmp/$m.gguf" "$tmp/$m.$q.gguf" $q "$tmp/$m.$q.npz" >"$tmp/$m.$q.log" &&
    grep -q ", [1-9][0-9]* of them $q" "$tmp/$m.$q.log" &&
    "$moe" convert --model "$tmp/$m.$q.gguf" --to gguf "$tmp/$m.$q.f32.gguf" >"$tmp/out" 2>&1 &&
    $py "$src/tests/gguf_files.py" compare "$tmp/$m.$q.f32.gguf" "$tmp/$m.$q.npz" >"$tmp/out" 2>&1 ||
    fail "$m $q: $(cat "$tmp/$m.$q.log" "$tmp/out")"
done
# moe inspect counts a file's tensors by type
for mq in mk:iq4_xs q2:q5_0; do
  m=${mq%:*} q=${mq#*:} Q=$(echo "$q" | tr a-z A-Z)
  n=$(sed -n "s/.*, \([0-9]*\) of them $q\$/\1/p" "$tmp/$m.$q.log")
  "$moe" inspect "$tmp/$m.$q.gguf" >"$tmp/out" 2>&1 && grep -Eq "^[0-9]+ tensors(:|.*,) $n $Q(,|;)" "$tmp/out" ||
    fail "inspect $m.$q: $(cat "$tmp/out") ($n $Q expected)"
done
# fine-tuning from a file: its ids for data, a step at lr 0 keeps every weight (the run's
# file checked against the directory without its tokenizer: the run's vocabulary is the
# model's, whose tokenizer.json it does not carry)
"$moe" prepare --model "$tmp/ol.gguf" --out "$tmp/qdata" --val-fraction 0.2 "$src/README.md" >"$tmp/out" 2>&1 ||
  fail "prepare --model FILE: $(cat "$tmp/out")"
"$moe" train --init-from "$tmp/ol.gguf" --data-path "$tmp/qdata" --train-iters 1 --lr 0 --min-lr 0 --seq-length 128 \
  --micro-batch-size 2 --global-batch-size 2 --eval-interval 0 --save "$tmp/qft" --save-interval 1 \
  >"$tmp/out" 2>&1 || fail "init-from FILE: $(cat "$tmp/out")"
"$moe" convert --load "$tmp/qft" --to gguf "$tmp/qft.gguf" >"$tmp/out" 2>&1 || fail "the run's file: $(cat "$tmp/out")"
cp -r "$tmp/ol" "$tmp/olbare" && rm "$tmp/olbare/tokenizer.json"
check "$tmp/qft.gguf" "$tmp/olbare" "$tmp/ol/ref.npy" "$(cat "$tmp/ol/ids.txt")" 1e-9 f32
# malformed files: one message, exit 1
$py "$src/tests/gguf_files.py" malform "$tmp/q2.gguf" "$tmp/bad" >/dev/null || fail "writing the malformed files"
while IFS='	' read -r name msg; do
  "$moe" eval --model "$tmp/bad/$name.gguf" --ids 1,2,3 >"$tmp/out" 2>&1; rc=$?
  [ $rc = 1 ] && [ "$(wc -l <"$tmp/out")" = 1 ] && grep -qF "$msg" "$tmp/out" ||
    fail "malformed $name: exit $rc, $(cat "$tmp/out")"
done <"$tmp/bad/faults.tsv"

# llama.cpp itself, where node-llama-cpp is installed (MOE_LLAMA_CPP: a folder where
# scripts/llama_cpp.sh put it; node 20 or later): the F32 files' probabilities against the references,
# the quantised ones against moe eval's, the vocabularies' ids of texts (not mb's: llama.cpp
# tokenizes nothing without a vocabulary, and node-llama-cpp stops on it)
if [ -n "${MOE_LLAMA_CPP:-}" ]; then
  lc() { $py "$src/tests/llama_cpp.py" "$moe" "$@" >"$tmp/out" 2>&1 || fail "$(cat "$tmp/out") (seed $seed)"; cat "$tmp/out"; }
  for m in mx q2 q3 ol; do
    lc probs "$tmp/$m.gguf" "$(cat "$tmp/$m/ids.txt")" "$tmp/$m/ref.npy" 1e-6
    lc tokens "$tmp/$m.gguf" "the and a" "  thé   cat<|endoftext|> and 漢字 🙂 " "<s>the</s>" "a
b"
  done
  lc probs "$tmp/run.gguf" "$run_ids" "$tmp/run.npy" 1e-6
  lc dequant
  for m in mx q2; do # moe convert --outtype q8_0's files, as the quantised ones below
    "$moe" convert --model "$tmp/$m.out-q8_0.gguf" --to gguf "$tmp/$m.out-q8_0.f32.gguf" >"$tmp/out" 2>&1 ||
      fail "$m q8_0 to f32: $(cat "$tmp/out")"
  done
  for mq in mx:q8_0 q2:q4_0 mx:q4_1 q2:q5_0 mx:q5_1 mk:q2_k mk:q3_k mk:q4_k mk:q5_k mk:q6_k q2:iq4_nl \
    mk:iq4_xs mx:out-q8_0 q2:out-q8_0; do
    m=${mq%:*} q=${mq#*:} ids=$(cat "$tmp/$m/ids.txt")
    "$moe" eval --model "$tmp/$m.$q.gguf" --ids "$ids" --dump-logits "$tmp/$m.$q.npy" >"$tmp/out" 2>&1 ||
      fail "$m $q eval: $(cat "$tmp/out")"
    # mk's random bits make logits up to about 14 from sums of 256 larger terms: the two
    # programs' float32 sums (in other orders) part by up to 2e-5 in a probability there
    tol=1e-5; [ $m != mk ] || tol=1e-4
    lc quant "$tmp/$m.$q.gguf" "$tmp/$m.$q.f32.gguf" "$ids" "$tmp/$m.$q.npy" $tol
  done
else
  echo "gguf: llama.cpp itself not run (MOE_LLAMA_CPP unset)"
fi
echo "gguf: all checks passed (seed $seed)"
