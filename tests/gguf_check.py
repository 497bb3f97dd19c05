"""A GGUF file of moe convert --to gguf, read by this script's own parser (written from the GGUF
specification, version 3: header, typed metadata, tensor infos, data at the running sum of the
aligned sizes) and checked against the Hugging Face directory it stands for:

- every tensor of the directory under llama.cpp's name, with its values: stacked experts, dims
  fastest first, q and k rows of the llama architecture in llama.cpp's RoPE pair order; F32, or
  the directory's values rounded to F16 / BF16 (round to nearest even) or quantised to Q8_0 as
  ggml's reference quantiser does it (gguf_files.py's, which equals ggml's: llama_cpp.py) for
  --outtype; vectors, norms, routers and, for Q8_0, rows not of whole blocks F32; no other
  tensor (output.weight duplicated where the architecture needs it);
- the metadata llama.cpp reads, with the value types it requires (u32, f32, bool, string);
- the vocabulary of the directory's tokenizer.json (tokens by id, token types, merges or
  SentencePiece scores in merge order, the pre-tokenizer's name, end and start ids);
- the logits of a float64 forward pass with llama.cpp's semantics, computed from the file's
  tensors alone (its layout; RoPE over adjacent pairs for llama, over halves for the others;
  each architecture's fixed choice of renormalising the top-k weights; Qwen2-MoE's gated shared
  expert), against reference logits of the same ids.

usage: gguf_check.py FILE.gguf HF_DIR REF.npy IDS TOLERANCE [f32|f16|bf16|q8_0]
(IDS: comma-separated; TOLERANCE: of the largest |logit error|, relative to max(1, |logit|); -
for none: a rounded file's logits may move far where a rounding changes a token's experts, so
its values are checked, not its logits)"""
import json
import os
import struct
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gguf_files  # noqa: E402

path, hf, ref_path, ids_text, tol = sys.argv[1:6]
outtype = sys.argv[6] if len(sys.argv) > 6 else "f32"
ids = [int(x) for x in ids_text.split(",")]

# ---------------------------------------------------------------- the file
buf = open(path, "rb").read()
pos = 0


def take(fmt):
    global pos
    v = struct.unpack_from("<" + fmt, buf, pos)[0]
    pos += struct.calcsize("<" + fmt)
    return v


def string():
    global pos
    n = take("Q")
    assert pos + n <= len(buf), "string past the end"
    s = buf[pos:pos + n].decode("utf-8")
    pos += n
    return s


SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "B", 10: "Q", 11: "q",
           12: "d"}


def value(t):
    if t == 8:
        return string()
    if t == 9:
        et, n = take("I"), take("Q")
        assert et != 9, "nested array"
        return [value(et) for _ in range(n)]
    v = take(SCALARS[t])
    assert t != 7 or v in (0, 1), "bool %d" % v
    return v


assert buf[:4] == b"GGUF", "magic"
pos = 4
assert take("I") == 3, "version"
n_tensors, n_kv = take("Q"), take("Q")
kv = {}
for _ in range(n_kv):
    k = string()
    assert k and k not in kv, "key %r empty or twice" % k
    t = take("I")
    kv[k] = (t, value(t))
align = kv.get("general.alignment", (4, 32))
assert align[0] == 4 and align[1] & (align[1] - 1) == 0, align
align = align[1]
infos = []
for _ in range(n_tensors):
    name = string()
    assert 0 < len(name.encode()) < 64, name
    nd = take("I")
    assert 1 <= nd <= 4, (name, nd)
    ne = [take("Q") for _ in range(nd)]
    infos.append((name, ne, take("I"), take("Q")))
assert len({i[0] for i in infos}) == len(infos), "a tensor name twice"
start = (pos + align - 1) // align * align
assert buf[pos:start] == bytes(start - pos), "padding before the data"
T, types, expect = {}, {}, 0
for name, ne, typ, off in infos:
    assert off == expect, "%s at offset %d, expected %d" % (name, off, expect)
    n = int(np.prod(ne))
    nbytes = n // 32 * 34 if typ == 8 else n * {0: 4, 1: 2, 30: 2}[typ]
    raw = buf[start + off:start + off + nbytes]
    assert len(raw) == nbytes, name + " past the end"
    if typ == 8:  # Q8_0: blocks of an f16 d and 32 signed bytes q, values d q
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 34)
        a = b[:, :2].copy().view(np.float16).astype(np.float32) * b[:, 2:].view(np.int8)
    else:
        a = np.frombuffer(raw, dtype={0: np.float32, 1: np.float16, 30: np.uint16}[typ])
    if typ == 30:
        a = (a.astype(np.uint32) << 16).view(np.float32)
    T[name], types[name] = a.astype(np.float64).reshape(ne[::-1]), typ
    end = off + (nbytes + align - 1) // align * align
    assert buf[start + off + nbytes:start + end] == bytes(end - off - nbytes), name + " padding"
    expect = end
assert len(buf) == start + expect, "%d bytes, the tensors end at %d" % (len(buf), start + expect)


def meta(key, typ):
    t, v = kv[key]
    assert t == typ, "%s has type %d, llama.cpp reads %d" % (key, t, typ)
    return v


# ---------------------------------------------------------------- the directory
cfg = json.load(open(os.path.join(hf, "config.json")))
family = cfg["model_type"]
arch = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe",
        "olmoe": "olmoe"}[family]
W = {}
for f in sorted(os.listdir(hf)):
    if not f.endswith(".safetensors"):
        continue
    b = open(os.path.join(hf, f), "rb").read()
    n = struct.unpack_from("<Q", b, 0)[0]
    for name, t in json.loads(b[8:8 + n]).items():
        if name == "__metadata__":
            continue
        lo, hi = t["data_offsets"]
        raw = bytearray(b[8 + n + lo:8 + n + hi])
        dt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[t["dtype"]]
        W[name] = torch.frombuffer(raw, dtype=dt).reshape(t["shape"]).to(torch.float64).numpy() \
            if raw else np.zeros(t["shape"])

d, L, H = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]
KV = cfg["num_key_value_heads"]
hd = cfg.get("head_dim") or d // H
E = cfg.get("num_local_experts", cfg.get("num_experts"))
k = cfg["num_experts_per_tok"]
f_exp = cfg["intermediate_size"] if family in ("mixtral", "olmoe") else cfg["moe_intermediate_size"]
assert meta("general.architecture", 8) == arch
for key, want in [("vocab_size", cfg["vocab_size"]),
                  ("context_length", cfg["max_position_embeddings"]),
                  ("embedding_length", d), ("block_count", L), ("attention.head_count", H),
                  ("attention.head_count_kv", KV), ("expert_count", E), ("expert_used_count", k),
                  ("expert_feed_forward_length", f_exp), ("attention.key_length", hd),
                  ("attention.value_length", hd), ("rope.dimension_count", hd),
                  ("feed_forward_length",
                   f_exp if arch in ("llama", "olmoe") else cfg["intermediate_size"])]:
    assert meta(arch + "." + key, 4) == want, (key, kv[arch + "." + key], want)
if family == "qwen2_moe":
    assert meta(arch + ".expert_shared_feed_forward_length", 4) == \
        cfg["shared_expert_intermediate_size"]
assert meta(arch + ".rope.freq_base", 6) == np.float32(cfg.get("rope_theta", 10000.0))
assert meta(arch + ".attention.layer_norm_rms_epsilon", 6) == np.float32(cfg["rms_norm_eps"])
assert meta("general.file_type", 4) == {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7}[outtype]


def permute(w, heads):  # llama.cpp's pairs: row h hd + 2i + j <- row h hd + j hd/2 + i
    w2 = w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
    return w2.swapaxes(1, 2).reshape(w.shape)


want = {}
moe = "block_sparse_moe" if family == "mixtral" else "mlp"
proj = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
names = {"input_layernorm.weight": "attn_norm.weight",
         "post_attention_layernorm.weight": "ffn_norm.weight",
         "self_attn.o_proj.weight": "attn_output.weight",
         "self_attn.q_norm.weight": "attn_q_norm.weight",
         "self_attn.k_norm.weight": "attn_k_norm.weight",
         moe + ".gate.weight": "ffn_gate_inp.weight",
         "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight"}
for x in "qkv":
    names["self_attn.%s_proj.weight" % x] = "attn_%s.weight" % x
    names["self_attn.%s_proj.bias" % x] = "attn_%s.bias" % x
for a, b in zip(("gate_proj", "up_proj", "down_proj"), ("gate", "up", "down")):
    names["mlp.shared_expert.%s.weight" % a] = "ffn_%s_shexp.weight" % b
want["token_embd.weight"] = W["model.embed_tokens.weight"]
want["output_norm.weight"] = W["model.norm.weight"]
seen = {"model.embed_tokens.weight", "model.norm.weight"}
tied = cfg.get("tie_word_embeddings", False)
if not tied:
    want["output.weight"] = W["lm_head.weight"]
    seen.add("lm_head.weight")
elif arch in ("qwen2moe", "olmoe"):
    want["output.weight"] = W["model.embed_tokens.weight"]
for l in range(L):
    p = "model.layers.%d." % l
    for ours, theirs in names.items():
        if p + ours in W:
            w = W[p + ours]
            if arch == "llama" and ours in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
                w = permute(w, H if ours[10] == "q" else KV)
            want["blk.%d.%s" % (l, theirs)] = w
            seen.add(p + ours)
    for pr, theirs in zip(proj, ("gate", "up", "down")):
        each = ["%s%s.experts.%d.%s.weight" % (p, moe, e, pr) for e in range(E)]
        want["blk.%d.ffn_%s_exps.weight" % (l, theirs)] = np.stack([W[e] for e in each])
        seen.update(each)
assert seen == set(W), ("tensors of the directory not in the file", sorted(set(W) - seen))
assert sorted(T) == sorted(want), ("tensors", sorted(set(T) ^ set(want)))


def rounded(w, typ):
    if typ == 0:
        return w
    if typ == 8:
        return gguf_files.quant(w.astype(np.float32), "q8_0")[1].astype(np.float64)
    dt = torch.float16 if typ == 1 else torch.bfloat16
    return torch.tensor(w.astype(np.float32)).to(dt).to(torch.float64).numpy()


for name, w in want.items():
    f32 = w.ndim < 2 or "ffn_gate_inp" in name or name.endswith("_norm.weight") or \
        outtype == "q8_0" and w.shape[-1] % 32
    typ = 0 if f32 else {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8}[outtype]
    assert types[name] == typ, (name, types[name], typ)
    assert T[name].shape == w.shape, (name, T[name].shape, w.shape)
    assert np.array_equal(T[name], rounded(w, typ)), name + " differs"

# ---------------------------------------------------------------- the vocabulary
tok_path = os.path.join(hf, "tokenizer.json")
if os.path.exists(tok_path) or cfg["vocab_size"] == 257 and "tokenizer.ggml.tokens" in kv:
    tj = json.load(open(tok_path)) if os.path.exists(tok_path) else None
    if tj is None:  # moe prepare's bytes: GPT-2's characters, end-of-text 256
        from_bytes = {}
        keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
        extra = 0
        for b in range(256):
            from_bytes[b] = chr(b) if b in keep else chr(256 + (extra := extra + 1) - 1)
        tj = {"model": {"type": "BPE", "vocab": {c: b for b, c in from_bytes.items()}, "merges": [],
                        "byte_fallback": False},
              "added_tokens": [{"id": 256, "content": "<|endoftext|>", "special": True}],
              "pre_tokenizer": {"type": "ByteLevel", "use_regex": False}}
    model = tj["model"]
    spm = bool(model.get("byte_fallback")) or "\u2581" in json.dumps(tj.get("normalizer")) or \
        (tj.get("pre_tokenizer") or {}).get("type") == "Metaspace"
    V = cfg["vocab_size"]
    tokens = ["[PAD%d]" % i for i in range(V)]
    ttype = [5] * V
    for t, i in model["vocab"].items():
        tokens[i], ttype[i] = t, 6 if spm and len(t) == 6 and t.startswith("<0x") else 1
    for a in tj.get("added_tokens", []):
        tokens[a["id"]], ttype[a["id"]] = a["content"], 3 if a["special"] else 4
    unk = model["vocab"].get(model.get("unk_token"))
    if unk is not None:
        ttype[unk] = 2
    assert kv.get("tokenizer.ggml.unknown_token_id", (4, None)) == (4, unk)
    assert meta("tokenizer.ggml.model", 8) == ("llama" if spm else "gpt2")
    assert kv["tokenizer.ggml.tokens"][0] == 9 and kv["tokenizer.ggml.tokens"][1] == tokens
    assert kv["tokenizer.ggml.token_type"][0] == 9 and kv["tokenizer.ggml.token_type"][1] == ttype
    merges = [m if isinstance(m, str) else m[0] + " " + m[1] for m in model["merges"]]
    if spm:
        scores = kv["tokenizer.ggml.scores"][1]
        for i, m in enumerate(merges):
            t = model["vocab"][m.replace(" ", "", 1)]
            assert scores[t] >= -i, (m, scores[t])
        made = {model["vocab"][m.replace(" ", "", 1)] for m in merges}
        assert all(scores[t] < -len(merges) + 1 for t in range(V) if t not in made)
    else:
        assert kv["tokenizer.ggml.merges"][1] == merges
        pre = tj.get("pre_tokenizer") or {}
        want_pre = "default" if not merges else "qwen2" if pre.get("type") == "Sequence" else \
            "olmo" if arch == "olmoe" else "gpt-2"
        assert meta("tokenizer.ggml.pre", 8) == want_pre
    # start and end ids: the post-processor's special tokens before and after the text; the end
    # id config.json's eos_token_id (its first), else the one after
    single = (tj.get("post_processor") or {}).get("single", [])
    kinds = [("A" if "Sequence" in x else x["SpecialToken"]["id"]) for x in single]
    special = {a["content"]: a["id"] for a in tj.get("added_tokens", [])}
    bos = special[kinds[0]] if kinds and kinds[0] != "A" else None
    after = special[kinds[-1]] if kinds and kinds[-1] != "A" else None
    eos = cfg.get("eos_token_id")
    eos = (eos[0] if eos else None) if isinstance(eos, list) else eos
    eos = after if eos is None else eos
    assert meta("tokenizer.ggml.add_bos_token", 7) == (bos is not None)
    assert meta("tokenizer.ggml.add_eos_token", 7) == (after is not None)
    assert kv.get("tokenizer.ggml.bos_token_id", (4, None)) == (4, bos)
    assert kv.get("tokenizer.ggml.eos_token_id", (4, None)) == (4, eos)
    print("vocabulary: %d tokens (%s), %d merges, start %s, end %s"
          % (V, "llama" if spm else "gpt2", len(merges), bos, eos))
else:
    assert meta("tokenizer.ggml.model", 8) == "none" and "tokenizer.ggml.tokens" not in kv

# ---------------------------------------------------------------- llama.cpp's forward
if tol == "-":
    print("%s (%s, %s): %d tensors" % (os.path.basename(path), arch, outtype, len(T)))
    sys.exit(0)
eps, base = float(np.float32(cfg["rms_norm_eps"])), float(np.float32(cfg.get("rope_theta", 1e4)))


def rms(v, w):
    return v / np.sqrt((v * v).mean(-1, keepdims=True) + eps) * w


def rope(v, n):  # v [n, heads, hd]: llama rotates pairs (2i, 2i+1) (NORM), the others (i, i + hd/2)
    ang = np.arange(n)[:, None] * base ** (-2.0 * np.arange(hd // 2) / hd)[None, :]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    out = np.empty_like(v)
    if arch == "llama":
        a, b = v[..., 0::2], v[..., 1::2]
        out[..., 0::2], out[..., 1::2] = a * c - b * s, a * s + b * c
    else:
        a, b = v[..., :hd // 2], v[..., hd // 2:]
        out[..., :hd // 2], out[..., hd // 2:] = a * c - b * s, a * s + b * c
    return out


def softmax(z):
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def silu(z):
    return z / (1 + np.exp(-z))


n = len(ids)
x = T["token_embd.weight"][ids]
for l in range(L):
    p = "blk.%d." % l
    h = rms(x, T[p + "attn_norm.weight"])

    def lin(name):
        y = h @ T[p + name + ".weight"].T
        return y + T[p + name + ".bias"] if p + name + ".bias" in T else y

    q, kk, v = lin("attn_q"), lin("attn_k"), lin("attn_v")
    if arch == "olmoe":  # over the whole projection
        q, kk = rms(q, T[p + "attn_q_norm.weight"]), rms(kk, T[p + "attn_k_norm.weight"])
    q, kk, v = q.reshape(n, H, hd), kk.reshape(n, KV, hd), v.reshape(n, KV, hd)
    if arch == "qwen3moe":  # per head
        q, kk = rms(q, T[p + "attn_q_norm.weight"]), rms(kk, T[p + "attn_k_norm.weight"])
    q, kk = rope(q, n), rope(kk, n)
    kk, v = np.repeat(kk, H // KV, axis=1), np.repeat(v, H // KV, axis=1)
    s = np.einsum("qhd,khd->hqk", q, kk) / np.sqrt(hd)
    s = np.where(np.triu(np.ones((n, n), dtype=bool), 1), -np.inf, s)
    a = np.einsum("hqk,khd->qhd", softmax(s), v).reshape(n, H * hd)
    x = x + a @ T[p + "attn_output.weight"].T
    h = rms(x, T[p + "ffn_norm.weight"])
    probs = softmax(h @ T[p + "ffn_gate_inp.weight"].T)
    sel = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    wt = np.take_along_axis(probs, sel, -1)
    if arch in ("llama", "qwen3moe"):
        wt = wt / wt.sum(-1, keepdims=True)
    G, U, D = (T[p + "ffn_%s_exps.weight" % x_] for x_ in ("gate", "up", "down"))
    y = np.zeros_like(x)
    for t in range(n):
        for j in range(k):
            e = sel[t, j]
            y[t] += wt[t, j] * ((silu(h[t] @ G[e].T) * (h[t] @ U[e].T)) @ D[e].T)
    if arch == "qwen2moe":
        g = 1 / (1 + np.exp(-(h @ T[p + "ffn_gate_inp_shexp.weight"].reshape(-1))))
        sh = (silu(h @ T[p + "ffn_gate_shexp.weight"].T) * (h @ T[p + "ffn_up_shexp.weight"].T)) @ \
            T[p + "ffn_down_shexp.weight"].T
        y = y + g[:, None] * sh
    x = x + y
logits = rms(x, T["output_norm.weight"]) @ T.get("output.weight", T["token_embd.weight"]).T
ref = np.load(ref_path).astype(np.float64)
assert logits.shape == ref.shape, (logits.shape, ref.shape)
err, scale = float(np.abs(logits - ref).max()), max(1.0, float(np.abs(ref).max()))
print("%s (%s, %s): %d tensors, max |logit error| %.2e (largest logit %.2f)"
      % (os.path.basename(path), arch, outtype, len(T), err, scale))
sys.exit(0 if err <= float(tol) * scale else 1)
