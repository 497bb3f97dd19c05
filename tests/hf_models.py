"""A tiny random-weight MoE model in the Hugging Face layout, and its logits from an independent
float64 PyTorch implementation of the family's forward pass, written from the published modeling
formulas. mixtral: RMSNorm, rotate-half RoPE, grouped-query causal attention, softmax router with
top-k renormalised, SwiGLU experts w1/w3/w2. qwen2_moe: the same with q/k/v biases, top-k of the
softmax without renormalisation (norm_topk_prob false), and a shared SwiGLU expert scaled by
sigmoid(shared_expert_gate x). qwen3_moe: q and k RMSNorm per head before RoPE, renormalised
top-k. Both Qwen families: dense SwiGLU layers where mlp_only_layers and decoder_sparse_step
say. olmoe: q and k RMSNorm over the whole projection, top-k not renormalised.
deepseek_v2 / deepseek_v3: multi-head latent attention (tests/torch_model.py's, from Hugging
Face's DeepseekV3Attention) with YaRN, a dense first layer, shared experts; V2 routes by the
softmax among the groups of the best maxima, weights scaled; V3 by sigmoid + correction bias
among the groups of the best top-2 sums, weights from the unbiased sigmoid, renormalised and
scaled.

usage: hf_models.py OUT_DIR DTYPE SHARDS SEED [VOCAB [FAMILY [OVERRIDES]]]  ->
       OUT_DIR/{config.json, *.safetensors, ids.txt, ref.npy (logits of ids), greedy.txt (8
       greedy next ids)};
       OVERRIDES: a JSON object of config.json keys set before the weights and the reference
       are made (heads, experts, eps, theta, routing...)
       hf_models.py --batch FILE: one model for each line of FILE (those arguments separated by
       tabs) in one process: importing torch is most of a model's time"""
import json, os, runpy, struct, sys

if len(sys.argv) == 3 and sys.argv[1] == "--batch":
    for line in open(sys.argv[2], encoding="utf-8"):
        sys.argv = [__file__] + line.rstrip("\n").split("\t")
        runpy.run_path(__file__, run_name="hf_model")  # this file's body afresh, these arguments
    sys.exit(0)

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_model  # noqa: E402  (its multi-head latent attention)

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
ds = family.startswith("deepseek")
v3 = family == "deepseek_v3"
if ds:
    E, k = 8 if v3 else 16, 3 if v3 else 2
    # V3: 2 groups of 4, keep 1, score = sum of the top 2 (Megatron's k / groups would be 3);
    # V2: 2 groups of 8, group-limited greedy, score = a group's maximum (Megatron's: top 2)
    qr, kr, dn, dr, dv = (12 if v3 else 0), 10, 6, 4, 8
    rsf = 2.5 if v3 else 1.5
    cfg = {"architectures": ["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
           "model_type": family, "vocab_size": V, "hidden_size": d, "intermediate_size": 40,
           "moe_intermediate_size": f, "num_hidden_layers": 3, "num_attention_heads": H,
           "num_key_value_heads": H, "n_routed_experts": E, "n_shared_experts": 1 if v3 else 2,
           "num_experts_per_tok": k, "n_group": 2, "topk_group": 1,
           "topk_method": "noaux_tc" if v3 else "group_limited_greedy",
           "scoring_func": "sigmoid" if v3 else "softmax", "norm_topk_prob": v3,
           "routed_scaling_factor": rsf, "first_k_dense_replace": 1, "moe_layer_freq": 1,
           "q_lora_rank": qr or None, "kv_lora_rank": kr, "qk_nope_head_dim": dn,
           "qk_rope_head_dim": dr, "v_head_dim": dv, "rms_norm_eps": eps, "rope_theta": theta,
           "rope_scaling": {"type": "yarn", "factor": 4.0 if v3 else 2.0,
                            "original_max_position_embeddings": 8 if v3 else 6,
                            "beta_fast": 32, "beta_slow": 1,
                            "mscale": 1.0 if v3 else 0.8, "mscale_all_dim": 1.0 if v3 else 0.6},
           "max_position_embeddings": 128, "hidden_act": "silu", "tie_word_embeddings": False,
           "attention_bias": False, "aux_loss_alpha": 0.001, "torch_dtype": dt}
    if v3:
        cfg["rope_interleave"] = True
    L = 3
elif qwen:
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
cfg["initializer_range"] = 0.006  # read by no loader: convert must keep it as written
cfg.update(json.loads(sys.argv[7]) if len(sys.argv) > 7 else {})
d, H, KV = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
L = cfg["num_hidden_layers"]
f = cfg["moe_intermediate_size" if "moe_intermediate_size" in cfg else "intermediate_size"]
k = cfg["num_experts_per_tok"]
E = cfg[{"mixtral": "num_local_experts"}.get(family, "n_routed_experts" if ds else "num_experts")]
eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
hd = cfg.get("head_dim", d // H)
if not ds and family != "mixtral":
    renorm = cfg["norm_topk_prob"]
if qwen:
    fs = cfg["shared_expert_intermediate_size"]
if ds:
    rsf, ys = cfg["routed_scaling_factor"], cfg["rope_scaling"]
    mla_c = {"mla": [qr, kr, dn, dr, dv], "n_heads": H, "eps": eps, "theta": theta,
             "rope": {"interleave": True, "factor": ys["factor"],
                      "orig": ys["original_max_position_embeddings"], "beta_fast": ys["beta_fast"],
                      "beta_slow": ys["beta_slow"], "mscale": ys["mscale"],
                      "mscale_all_dim": ys["mscale_all_dim"]}}
moe = "block_sparse_moe" if family == "mixtral" else "mlp"


def dense_layer(l):
    """Qwen2-MoE and Qwen3-MoE: a dense MLP, intermediate_size wide, where mlp_only_layers
    holds l or (l + 1) % decoder_sparse_step != 0 (transformers' decoder layers)."""
    if family not in ("qwen2_moe", "qwen3_moe"):
        return False
    return l in (cfg.get("mlp_only_layers") or []) or (l + 1) % cfg.get("decoder_sparse_step", 1) != 0


proj = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")

def rnd(*shape, scale=0.2):
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

w = {"model.embed_tokens.weight": rnd(V, d, scale=1.0), "model.norm.weight": 1 + rnd(d, scale=0.1),
     "lm_head.weight": rnd(V, d)}
for l in range(L):
    p = "model.layers.%d." % l
    w[p + "input_layernorm.weight"] = 1 + rnd(d, scale=0.1)
    w[p + "post_attention_layernorm.weight"] = 1 + rnd(d, scale=0.1)
    if ds:
        a = p + "self_attn."
        if qr:
            w[a + "q_a_proj.weight"], w[a + "q_a_layernorm.weight"] = rnd(qr, d), 1 + rnd(qr, scale=0.1)
            w[a + "q_b_proj.weight"] = rnd(H * (dn + dr), qr)
        else:
            w[a + "q_proj.weight"] = rnd(H * (dn + dr), d)
        w[a + "kv_a_proj_with_mqa.weight"] = rnd(kr + dr, d)
        w[a + "kv_a_layernorm.weight"] = 1 + rnd(kr, scale=0.1)
        w[a + "kv_b_proj.weight"] = rnd(H * (dn + dv), kr)
        w[a + "o_proj.weight"] = rnd(d, H * dv)
        mlps = ["mlp."] if l == 0 else ["mlp.experts.%d." % e for e in range(E)] + ["mlp.shared_experts."]
        for m_ in mlps:
            width = 40 if l == 0 else f * (cfg["n_shared_experts"] if "shared" in m_ else 1)
            w[p + m_ + "gate_proj.weight"], w[p + m_ + "up_proj.weight"] = rnd(width, d), rnd(width, d)
            w[p + m_ + "down_proj.weight"] = rnd(d, width)
        if l:  # a flat router: the groups' maxima and top-2 sums often disagree
            w[p + "mlp.gate.weight"] = rnd(E, d, scale=0.1)
            if v3:  # positive: Hugging Face masks other groups with 0, DeepSeek's code with -inf
                w[p + "mlp.gate.e_score_correction_bias"] = 0.05 + rnd(E, scale=0.1).abs()
        continue
    w[p + "self_attn.q_proj.weight"] = rnd(H * hd, d)
    w[p + "self_attn.k_proj.weight"] = rnd(KV * hd, d)
    w[p + "self_attn.v_proj.weight"] = rnd(KV * hd, d)
    w[p + "self_attn.o_proj.weight"] = rnd(d, H * hd)
    if dense_layer(l):
        fd = cfg["intermediate_size"]
        w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"] = rnd(fd, d), rnd(fd, d)
        w[p + "mlp.down_proj.weight"] = rnd(d, fd)
    else:
        w[p + moe + ".gate.weight"] = rnd(E, d, scale=0.5)
    for e in range(0 if dense_layer(l) else E):
        q = p + moe + ".experts.%d." % e
        w[q + proj[0] + ".weight"] = rnd(f, d)
        w[q + proj[1] + ".weight"] = rnd(f, d)
        w[q + proj[2] + ".weight"] = rnd(d, f)
    if qwen:
        for n, rows in (("q", H * hd), ("k", KV * hd), ("v", KV * hd)):
            w[p + "self_attn.%s_proj.bias" % n] = rnd(rows)
    if qwen and not dense_layer(l):
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


def swiglu_ds(v, q_):
    u = torch.nn.functional.silu(v @ w[q_ + "gate_proj.weight"].T) * (v @ w[q_ + "up_proj.weight"].T)
    return u @ w[q_ + "down_proj.weight"].T


def deepseek_moe(x, p):
    """Hugging Face's DeepseekV2Moe / DeepseekV3MoE routing, then experts and shared experts."""
    n, G = x.shape[0], cfg["n_group"]
    logits = x @ w[p + "mlp.gate.weight"].T
    if v3:
        s = torch.sigmoid(logits)
        c = s + w[p + "mlp.gate.e_score_correction_bias"]
        gscore = c.view(n, G, -1).topk(2, -1).values.sum(-1)
    else:
        s = c = logits.softmax(-1)
        gscore = c.view(n, G, -1).max(-1).values
    keep = torch.zeros(n, G, dtype=torch.bool)
    keep.scatter_(1, gscore.topk(cfg["topk_group"], -1).indices, True)
    masked = c.masked_fill(~keep.repeat_interleave(E // G, 1), 0.0)
    sel = masked.topk(k, -1).indices
    top = s.gather(1, sel)
    if v3:
        top = top / (top.sum(-1, keepdim=True) + 1e-20)
    top = top * rsf
    y = torch.zeros_like(x)
    for t in range(n):
        for j in range(k):
            y[t] += top[t, j] * swiglu_ds(x[t], p + "mlp.experts.%d." % int(sel[t, j]))
    return y + swiglu_ds(x, p + "mlp.shared_experts.")


def forward_deepseek(ids):
    n = len(ids)
    h = w["model.embed_tokens.weight"][ids]
    for l in range(L):
        p = "model.layers.%d." % l
        x = rmsnorm(h, w[p + "input_layernorm.weight"])
        h = h + torch_model.mla(x[None], w, p[:-1], mla_c)[0] @ w[p + "self_attn.o_proj.weight"].T
        x = rmsnorm(h, w[p + "post_attention_layernorm.weight"])
        h = h + (swiglu_ds(x, p + "mlp.") if l == 0 else deepseek_moe(x, p))
    return rmsnorm(h, w["model.norm.weight"]) @ w["lm_head.weight"].T


def forward(ids):
    if ds:
        return forward_deepseek(ids)
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
        def swiglu(v, q_):
            u = torch.nn.functional.silu(v @ w[q_ + proj[0] + ".weight"].T) * (v @ w[q_ + proj[1] + ".weight"].T)
            return u @ w[q_ + proj[2] + ".weight"].T
        if dense_layer(l):
            h = h + swiglu(x, p + "mlp.")
            continue
        probs = (x @ w[p + moe + ".gate.weight"].T).softmax(-1)
        top, sel = probs.topk(k, -1)
        if renorm:  # Mixtral and Qwen3-MoE renormalise the k weights; Qwen2-MoE and OLMoE do not
            top = top / top.sum(-1, keepdim=True)
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
