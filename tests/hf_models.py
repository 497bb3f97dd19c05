"""A tiny random-weight MoE model in the Hugging Face layout, and its logits from an independent
float64 PyTorch implementation of the family's forward pass, written from the published modeling
formulas. mixtral: RMSNorm, rotate-half RoPE, grouped-query causal attention, softmax router with
top-k renormalised, SwiGLU experts w1/w3/w2. qwen2_moe: the same with q/k/v biases, top-k of the
softmax without renormalisation (norm_topk_prob false), and a shared SwiGLU expert scaled by
sigmoid(shared_expert_gate x). qwen3_moe: q and k RMSNorm per head before RoPE, renormalised
top-k. olmoe: q and k RMSNorm over the whole projection, top-k not renormalised.

usage: hf_models.py OUT_DIR DTYPE SHARDS SEED [VOCAB [FAMILY]]  ->  OUT_DIR/{config.json,
       *.safetensors, ids.txt, ref.npy (logits of ids), greedy.txt (8 greedy next ids)}"""
import json, os, struct, sys

import numpy as np
import torch

out, dtype, shards, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
V = int(sys.argv[5]) if len(sys.argv) > 5 else 97
family = sys.argv[6] if len(sys.argv) > 6 else "mixtral"
qwen = family == "qwen2_moe"
renorm = family in ("mixtral", "qwen3_moe")
qk_norm = {"qwen3_moe": "head", "olmoe": "whole"}.get(family)
g = torch.Generator().manual_seed(seed)
d, L, H, KV, f, E, k, theta, eps, fs = 32, 2, 4, 2, 24, 4, 2, 10000.0, 1e-5, 20
hd = 12 if family == "qwen3_moe" else d // H  # Qwen3's heads: head_dim x heads != hidden size
dt = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}[dtype]
if qwen:
    cfg = {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "vocab_size": V,
           "hidden_size": d, "intermediate_size": 48, "moe_intermediate_size": f,
           "shared_expert_intermediate_size": fs, "num_hidden_layers": L,
           "num_attention_heads": H, "num_key_value_heads": KV, "num_experts": E,
           "num_experts_per_tok": k, "norm_topk_prob": False, "decoder_sparse_step": 1,
           "mlp_only_layers": [], "rms_norm_eps": eps, "rope_theta": theta,
           "max_position_embeddings": 128, "hidden_act": "silu", "tie_word_embeddings": False,
           "use_sliding_window": False, "torch_dtype": dt}
elif qk_norm:
    cfg = {"architectures": ["Qwen3MoeForCausalLM" if qk_norm == "head" else "OlmoeForCausalLM"],
           "model_type": family, "vocab_size": V, "hidden_size": d, "num_hidden_layers": L,
           "num_attention_heads": H, "num_key_value_heads": KV, "num_experts": E,
           "num_experts_per_tok": k, "norm_topk_prob": renorm, "rms_norm_eps": eps,
           "rope_theta": theta, "max_position_embeddings": 128, "hidden_act": "silu",
           "tie_word_embeddings": False, "attention_bias": False, "torch_dtype": dt}
    if qk_norm == "head":
        cfg.update({"intermediate_size": 48, "moe_intermediate_size": f, "head_dim": hd,
                    "decoder_sparse_step": 1, "mlp_only_layers": [], "use_sliding_window": False})
    else:
        cfg.update({"intermediate_size": f, "clip_qkv": None})
else:
    cfg = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": V,
           "hidden_size": d, "intermediate_size": f, "num_hidden_layers": L,
           "num_attention_heads": H, "num_key_value_heads": KV, "num_local_experts": E,
           "num_experts_per_tok": k, "rms_norm_eps": eps, "rope_theta": theta,
           "max_position_embeddings": 128, "hidden_act": "silu", "tie_word_embeddings": False,
           "torch_dtype": dt}
moe = "block_sparse_moe" if family == "mixtral" else "mlp"
proj = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")

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
    w[p + moe + ".gate.weight"] = rnd(E, d, scale=0.5)
    for e in range(E):
        q = p + moe + ".experts.%d." % e
        w[q + proj[0] + ".weight"] = rnd(f, d)
        w[q + proj[1] + ".weight"] = rnd(f, d)
        w[q + proj[2] + ".weight"] = rnd(d, f)
    if qwen:
        for n, rows in (("q", H * hd), ("k", KV * hd), ("v", KV * hd)):
            w[p + "self_attn.%s_proj.bias" % n] = rnd(rows)
        q = p + "mlp.shared_expert."
        w[q + "gate_proj.weight"], w[q + "up_proj.weight"] = rnd(fs, d), rnd(fs, d)
        w[q + "down_proj.weight"] = rnd(d, fs)
        w[p + "mlp.shared_expert_gate.weight"] = rnd(1, d, scale=0.5)
    if qk_norm:
        wq, wk = (hd, hd) if qk_norm == "head" else (H * hd, KV * hd)
        w[p + "self_attn.q_norm.weight"] = 1 + rnd(wq, scale=0.1)
        w[p + "self_attn.k_norm.weight"] = 1 + rnd(wk, scale=0.1)

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


def forward(ids):
    n = len(ids)
    h = w["model.embed_tokens.weight"][ids]
    for l in range(L):
        p = "model.layers.%d." % l
        x = rmsnorm(h, w[p + "input_layernorm.weight"])
        def lin(name):
            y = x @ w[p + "self_attn.%s_proj.weight" % name].T
            return y + w[p + "self_attn.%s_proj.bias" % name] if qwen else y
        def normed(name, heads):
            y = lin(name)
            if qk_norm == "whole":
                y = rmsnorm(y, w[p + "self_attn.%s_norm.weight" % name])
            y = y.view(n, heads, hd)
            if qk_norm == "head":
                y = rmsnorm(y, w[p + "self_attn.%s_norm.weight" % name])
            return y
        q = rope(normed("q", H), n)
        kk = rope(normed("k", KV), n)
        vv = lin("v").view(n, KV, hd)
        kk, vv = kk.repeat_interleave(H // KV, 1), vv.repeat_interleave(H // KV, 1)
        s = torch.einsum("qhd,khd->hqk", q, kk) / hd ** 0.5
        s = s.masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool), 1), float("-inf"))
        a = torch.einsum("hqk,khd->qhd", s.softmax(-1), vv).reshape(n, H * hd)
        h = h + a @ w[p + "self_attn.o_proj.weight"].T
        x = rmsnorm(h, w[p + "post_attention_layernorm.weight"])
        probs = (x @ w[p + moe + ".gate.weight"].T).softmax(-1)
        top, sel = probs.topk(k, -1)
        if renorm:  # Mixtral and Qwen3-MoE renormalise the k weights; Qwen2-MoE and OLMoE do not
            top = top / top.sum(-1, keepdim=True)
        def swiglu(v, q_):
            u = torch.nn.functional.silu(v @ w[q_ + proj[0] + ".weight"].T) * (v @ w[q_ + proj[1] + ".weight"].T)
            return u @ w[q_ + proj[2] + ".weight"].T
        y = torch.zeros_like(x)
        for t in range(n):
            for j in range(k):
                y[t] += top[t, j] * swiglu(x[t], p + moe + ".experts.%d." % int(sel[t, j]))
        if qwen:
            gate = torch.sigmoid(x @ w[p + "mlp.shared_expert_gate.weight"].T)
            y = y + gate * swiglu(x, p + "mlp.shared_expert.")
        h = h + y
    logits = rmsnorm(h, w["model.norm.weight"]) @ w["lm_head.weight"].T
    return logits


logits = forward(ids)
greedy = list(map(int, ids))  # greedy continuation, recomputed in full each step
for _ in range(8):
    greedy.append(int(forward(torch.tensor(greedy))[-1].argmax()))
open(os.path.join(out, "ids.txt"), "w").write(",".join(str(int(i)) for i in ids))
np.save(os.path.join(out, "ref.npy"), logits.numpy())
open(os.path.join(out, "greedy.txt"), "w").write(",".join(str(i) for i in greedy[len(ids):]))
