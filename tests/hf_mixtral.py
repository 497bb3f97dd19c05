"""A tiny random-weight Mixtral in the Hugging Face layout, and its logits from an independent
float64 PyTorch implementation of Mixtral's forward pass (written from the published modeling
formulas: RMSNorm, rotate-half RoPE, grouped-query causal attention, softmax router with top-k
renormalised, SwiGLU experts w1/w3/w2).

usage: hf_mixtral.py OUT_DIR DTYPE SHARDS SEED [VOCAB]  ->  OUT_DIR/{config.json, *.safetensors,
       ids.txt, ref.npy}"""
import json, os, struct, sys

import numpy as np
import torch

out, dtype, shards, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
V = int(sys.argv[5]) if len(sys.argv) > 5 else 97
g = torch.Generator().manual_seed(seed)
d, L, H, KV, f, E, k, theta, eps = 32, 2, 4, 2, 24, 4, 2, 10000.0, 1e-5
hd = d // H
cfg = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": V,
       "hidden_size": d, "intermediate_size": f, "num_hidden_layers": L,
       "num_attention_heads": H, "num_key_value_heads": KV, "num_local_experts": E,
       "num_experts_per_tok": k, "rms_norm_eps": eps, "rope_theta": theta,
       "max_position_embeddings": 128, "hidden_act": "silu", "tie_word_embeddings": False,
       "torch_dtype": {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}[dtype]}

def rnd(*shape, scale=0.2):
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

w = {"model.embed_tokens.weight": rnd(V, d, scale=1.0), "model.norm.weight": 1 + rnd(d, scale=0.1),
     "lm_head.weight": rnd(V, d)}
for l in range(L):
    p = "model.layers.%d." % l
    w[p + "input_layernorm.weight"] = 1 + rnd(d, scale=0.1)
    w[p + "post_attention_layernorm.weight"] = 1 + rnd(d, scale=0.1)
    w[p + "self_attn.q_proj.weight"] = rnd(H * hd, d)
    w[p + "self_attn.k_proj.weight"] = rnd(KV * hd, d)
    w[p + "self_attn.v_proj.weight"] = rnd(KV * hd, d)
    w[p + "self_attn.o_proj.weight"] = rnd(d, H * hd)
    w[p + "block_sparse_moe.gate.weight"] = rnd(E, d, scale=0.5)
    for e in range(E):
        q = p + "block_sparse_moe.experts.%d." % e
        w[q + "w1.weight"] = rnd(f, d)
        w[q + "w3.weight"] = rnd(f, d)
        w[q + "w2.weight"] = rnd(d, f)

# the stored precision is the model's: round once, compute in float64 from the rounded values
tdt = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[dtype]
w = {n: t.to(tdt).to(torch.float64) for n, t in w.items()}

def tensor_bytes(t):
    t = t.to(tdt).contiguous()
    if tdt == torch.bfloat16:
        return t.view(torch.int16).numpy().tobytes()
    return t.numpy().tobytes()

def write_st(path, names):
    header, blobs, off = {}, [], 0
    for n in names:
        b = tensor_bytes(w[n])
        header[n] = {"dtype": dtype, "shape": list(w[n].shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))

os.makedirs(out, exist_ok=True)
json.dump(cfg, open(os.path.join(out, "config.json"), "w"), indent=2)
names = sorted(w)
if shards == 1:
    write_st(os.path.join(out, "model.safetensors"), names)
else:
    parts = [names[i::shards] for i in range(shards)]
    wmap = {}
    for i, part in enumerate(parts):
        fn = "model-%05d-of-%05d.safetensors" % (i + 1, shards)
        write_st(os.path.join(out, fn), part)
        wmap.update({n: fn for n in part})
    json.dump({"metadata": {"total_size": 0}, "weight_map": wmap},
              open(os.path.join(out, "model.safetensors.index.json"), "w"))

def rmsnorm(x, wt):
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * wt

def rope(x, n):  # x [n, heads, hd], rotate-half
    inv = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(n, dtype=torch.float64)[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None, :], torch.cat([ang.sin()] * 2, -1)[:, None, :]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin

ids = torch.randint(0, V, (13,), generator=g)
n = len(ids)
h = w["model.embed_tokens.weight"][ids]
for l in range(L):
    p = "model.layers.%d." % l
    x = rmsnorm(h, w[p + "input_layernorm.weight"])
    q = rope((x @ w[p + "self_attn.q_proj.weight"].T).view(n, H, hd), n)
    kk = rope((x @ w[p + "self_attn.k_proj.weight"].T).view(n, KV, hd), n)
    vv = (x @ w[p + "self_attn.v_proj.weight"].T).view(n, KV, hd)
    kk, vv = kk.repeat_interleave(H // KV, 1), vv.repeat_interleave(H // KV, 1)
    s = torch.einsum("qhd,khd->hqk", q, kk) / hd ** 0.5
    s = s.masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool), 1), float("-inf"))
    a = torch.einsum("hqk,khd->qhd", s.softmax(-1), vv).reshape(n, H * hd)
    h = h + a @ w[p + "self_attn.o_proj.weight"].T
    x = rmsnorm(h, w[p + "post_attention_layernorm.weight"])
    probs = (x @ w[p + "block_sparse_moe.gate.weight"].T).softmax(-1)
    top, sel = probs.topk(k, -1)
    top = top / top.sum(-1, keepdim=True)
    y = torch.zeros_like(x)
    for t in range(n):
        for j in range(k):
            q_ = p + "block_sparse_moe.experts.%d." % int(sel[t, j])
            u = torch.nn.functional.silu(x[t] @ w[q_ + "w1.weight"].T) * (x[t] @ w[q_ + "w3.weight"].T)
            y[t] += top[t, j] * (u @ w[q_ + "w2.weight"].T)
    h = h + y
logits = rmsnorm(h, w["model.norm.weight"]) @ w["lm_head.weight"].T
open(os.path.join(out, "ids.txt"), "w").write(",".join(str(int(i)) for i in ids))
np.save(os.path.join(out, "ref.npy"), logits.numpy())
