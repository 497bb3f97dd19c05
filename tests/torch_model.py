#!/usr/bin/env python3
"""Independent reference for tests/test_model.c: the same MoE transformer written in PyTorch
(float64, autograd) from the tensors and config in a safetensors file. Compares the C model's
logits, losses and every gradient, and checks a few gradients by float64 finite differences of
this model's loss. Exit status 0 = match."""
import json
import math
import struct
import sys

import numpy as np
import torch

torch.set_default_dtype(torch.float64)
DT = {"F32": np.float32, "F64": np.float64, "I64": np.int64}


def read_safetensors(path):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    meta = header.pop("__metadata__", {})
    out = {}
    for name, v in header.items():
        a, b = v["data_offsets"]
        arr = np.frombuffer(data[a:b], dtype=DT[v["dtype"]]).reshape(v["shape"]).copy()
        out[name] = torch.from_numpy(arr)
    return out, meta


def rmsnorm(x, w, eps):
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * w


def yarn_mscale(factor, m):
    return 0.1 * m * math.log(factor) + 1 if factor > 1 else 1.0


def inv_freq(rd, c):
    """RoPE frequencies of rd rotated values and the cos/sin factor; YaRN as Hugging Face's
    _compute_yarn_parameters writes it: a linear ramp between the correction dimensions of
    beta_fast and beta_slow mixes interpolated (/factor) and extrapolated frequencies."""
    theta, r = c["theta"], c.get("rope", {})
    pos_freqs = theta ** (torch.arange(0, rd, 2) / rd)
    f = r.get("factor", 1.0)
    if f <= 1:
        return 1.0 / pos_freqs, 1.0

    def correction_dim(rotations):
        return (rd * math.log(r["orig"] / (rotations * 2 * math.pi))) / (2 * math.log(theta))
    low = max(math.floor(correction_dim(r["beta_fast"])), 0)
    high = min(math.ceil(correction_dim(r["beta_slow"])), rd - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(rd // 2) - low) / (high - low)).clamp(0, 1)
    extrapolation_factor = 1 - ramp
    inv = (1.0 / (f * pos_freqs)) * (1 - extrapolation_factor) + (1.0 / pos_freqs) * extrapolation_factor
    ms, mall = r.get("mscale", 0), r.get("mscale_all_dim", 0)
    att = yarn_mscale(f, ms) / yarn_mscale(f, mall) if ms and mall else yarn_mscale(f, 1)
    return inv, att


def rope(x, c):  # x [B, S, H, rd]: rotate-half, or pairs (2i, 2i+1) as complex numbers
    B, S, H, rd = x.shape
    inv, att = inv_freq(rd, c)
    ang = torch.arange(S)[:, None] * inv[None, :]  # [S, rd/2]
    if c.get("rope", {}).get("interleave"):
        z = torch.view_as_complex(x.reshape(B, S, H, rd // 2, 2).contiguous())
        w = torch.polar(torch.full_like(ang, att), ang)[None, :, None, :]
        return torch.view_as_real(z * w).reshape(B, S, H, rd)
    cos, sin = att * torch.cos(ang)[None, :, None, :], att * torch.sin(ang)[None, :, None, :]
    half = rd // 2
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)


def mla(h, P, pre, c):
    """DeepSeek's multi-head latent attention (Hugging Face DeepseekV3Attention): the attention
    output [B, S, H*dv] before o_proj."""
    qr, kr, dn, dr, dv = c["mla"]
    B, S, _ = h.shape
    # the latent norms (q_a_layernorm, kv_a_layernorm) are built with RMSNorm's default eps
    # of 1e-6 by Hugging Face, whatever rms_norm_eps is
    H, eps, a = c["n_heads"], 1e-6, pre + ".self_attn."
    if qr:
        q = rmsnorm(h @ P[a + "q_a_proj.weight"].T, P[a + "q_a_layernorm.weight"], eps) @ P[a + "q_b_proj.weight"].T
    else:
        q = h @ P[a + "q_proj.weight"].T
    q_nope, q_pe = q.view(B, S, H, dn + dr).split([dn, dr], -1)
    ckv, k_pe = (h @ P[a + "kv_a_proj_with_mqa.weight"].T).split([kr, dr], -1)
    kv = (rmsnorm(ckv, P[a + "kv_a_layernorm.weight"], eps) @ P[a + "kv_b_proj.weight"].T).view(B, S, H, dn + dv)
    k_nope, v = kv.split([dn, dv], -1)
    q_pe, k_pe = rope(q_pe, c), rope(k_pe.view(B, S, 1, dr), c).expand(B, S, H, dr)
    q, k = torch.cat([q_nope, q_pe], -1), torch.cat([k_nope, k_pe], -1)
    scale = (dn + dr) ** -0.5
    mall, f = c["rope"].get("mscale_all_dim", 0), c["rope"].get("factor", 1.0)
    if mall:
        scale *= yarn_mscale(f, mall) ** 2
    mask = torch.full((S, S), float("-inf")).triu(1)
    att = torch.einsum("bihc,bjhc->bhij", q, k) * scale + mask
    return torch.einsum("bhij,bjhc->bihc", torch.softmax(att, -1), v).reshape(B, S, H * dv)


def mlp(x, P, prefix):
    return (torch.nn.functional.silu(x @ P[prefix + ".gate_proj.weight"].T)
            * (x @ P[prefix + ".up_proj.weight"].T)) @ P[prefix + ".down_proj.weight"].T


def moe(x, P, l, c):
    """Token-choice top-k, softmax after top-k (Megatron default), Megatron aux loss, z-loss,
    shared expert. Loops over slots and experts: no permutation tricks."""
    pre = f"model.layers.{l}.mlp"
    E, k, T = c["n_experts"], c["topk"], x.shape[0]
    z = x @ P[pre + ".gate.weight"].T
    top_v, top_i = torch.topk(z, k, dim=-1)
    w = torch.softmax(top_v, -1)
    y = torch.zeros_like(x)
    counts = torch.zeros(E)
    for j in range(k):
        for e in range(E):
            sel = top_i[:, j] == e
            counts[e] += sel.sum()
            if sel.any():
                y[sel] += w[sel, j:j + 1] * mlp(x[sel], P, f"{pre}.experts.{e}")
    if c["shared_ffn"] > 0:
        y = y + mlp(x, P, pre + ".shared_expert")
    prob = torch.softmax(z, -1)
    aux = c["aux_coeff"] * E * ((counts / (k * T)) * prob.mean(0)).sum()
    zl = c["z_coeff"] * (torch.logsumexp(z, -1) ** 2).mean()
    return y, aux, zl, top_i


def ffn(x, P, l, c, routes, aux_total, z_total):
    """The block's second half: x + FFN(RMSNorm(x)), MoE or dense."""
    B, S, d = x.shape
    pre = f"model.layers.{l}"
    h2 = rmsnorm(x, P[pre + ".post_attention_layernorm.weight"], c["eps"])
    if c["moe_layers"][l]:
        y, aux, zl, top_i = moe(h2.reshape(B * S, d), P, l, c)
        return routes + [top_i], aux_total + aux, z_total + zl, x + y.view(B, S, d)
    return routes, aux_total, z_total, x + mlp(h2, P, pre + ".mlp")


def forward(P, tok, tgt, c):
    B, S = tok.shape
    d, H, KV = c["d"], c["n_heads"], c["n_kv_heads"]
    hd = c["hd"]  # may differ from d / H (Qwen3)
    x = P["model.embed_tokens.weight"][tok]
    aux_total, z_total, routes = 0.0, 0.0, []
    mask = torch.full((S, S), float("-inf")).triu(1)
    for l in range(c["n_layers"]):
        pre = f"model.layers.{l}"
        h = rmsnorm(x, P[pre + ".input_layernorm.weight"], c["eps"])
        if c["mla"][1]:
            x = x + mla(h, P, pre, c) @ P[pre + ".self_attn.o_proj.weight"].T
            routes, aux_total, z_total, x = ffn(x, P, l, c, routes, aux_total, z_total)
            continue
        proj = {}
        for n in "qkv":
            proj[n] = h @ P[pre + f".self_attn.{n}_proj.weight"].T
            if pre + f".self_attn.{n}_proj.bias" in P:  # Qwen2: biases on q, k, v
                proj[n] = proj[n] + P[pre + f".self_attn.{n}_proj.bias"]
        for n, heads in (("q", H), ("k", KV)):  # q/k RMSNorm: per head (Qwen3) or whole (OLMoE)
            wn = P.get(pre + f".self_attn.{n}_norm.weight")
            if wn is not None and wn.shape[0] == hd:
                proj[n] = rmsnorm(proj[n].view(B, S, heads, hd), wn, c["eps"]).reshape(B, S, heads * hd)
            elif wn is not None:
                proj[n] = rmsnorm(proj[n], wn, c["eps"])
        q, kk, v = proj["q"].view(B, S, H, hd), proj["k"].view(B, S, KV, hd), proj["v"].view(B, S, KV, hd)
        q, kk = rope(q, c), rope(kk, c)
        kk = kk.repeat_interleave(H // KV, dim=2)
        v = v.repeat_interleave(H // KV, dim=2)
        att = torch.einsum("bihc,bjhc->bhij", q, kk) / hd ** 0.5 + mask
        o = torch.einsum("bhij,bjhc->bihc", torch.softmax(att, -1), v).reshape(B, S, H * hd)
        x = x + o @ P[pre + ".self_attn.o_proj.weight"].T
        routes, aux_total, z_total, x = ffn(x, P, l, c, routes, aux_total, z_total)
    head = P["model.embed_tokens.weight"] if c["tied"] else P["lm_head.weight"]
    logits = rmsnorm(x, P["model.norm.weight"], c["eps"]) @ head.T
    nll = torch.nn.functional.cross_entropy(logits.view(B * S, -1), tgt.view(-1), ignore_index=-1)
    return logits, nll, aux_total, z_total, routes


def main():
    T, meta = read_safetensors(sys.argv[1])
    c = json.loads(meta["config"])
    tok, tgt = T.pop("in.tokens"), T.pop("in.targets")
    outs = {k: T.pop(k) for k in list(T) if k.startswith("out.")}
    grads = {k[5:]: T.pop(k) for k in list(T) if k.startswith("grad.")}
    P = {k: v.double().requires_grad_() for k, v in T.items()}
    logits, nll, aux, zl, routes = forward(P, tok, tgt, c)
    loss = c["loss_scale"] * (nll + aux + zl)
    loss.backward()
    for p in P.values():  # an expert that received no token has no autograd gradient
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    worst, ok = [], True

    def compare(what, ours, ref, tol):
        nonlocal ok
        ref = ref.detach()
        scale = ref.abs().max().item() + 1e-30
        err = (ours.double() - ref).abs().max().item() / scale
        worst.append((err, what))
        if not err <= tol:
            print(f"MISMATCH {what}: max |ours - torch| / max|torch| = {err:.3g} > {tol}")
            ok = False

    for i, r in enumerate(routes):
        ours = outs[f"out.routing.{i}"]
        if not torch.equal(ours.view(r.shape), r):
            print(f"MISMATCH routing of MoE layer {i}: the selected experts differ")
            ok = False
    # fp32 forward against float64: relative 1e-4 of each tensor's largest magnitude.
    compare("logits", outs["out.logits"].view(logits.shape), logits, 1e-4)
    for name, val in (("nll", nll), ("aux", aux), ("z", zl)):
        compare(name, outs["out." + name], torch.as_tensor(val).view(1), 1e-4)
    for name, p in P.items():
        compare("grad " + name, grads[name], p.grad, 1e-4)
    # Float64 central differences of this model's loss for a few entries of every tensor.
    gen = torch.Generator().manual_seed(int(meta.get("seed", "1")))
    with torch.no_grad():
        for name, p in P.items():
            for _ in range(2):
                i = torch.randint(p.numel(), (1,), generator=gen).item()
                old = p.view(-1)[i].item()
                h = 1e-6
                p.view(-1)[i] = old + h
                lp = c["loss_scale"] * sum(forward(P, tok, tgt, c)[1:4])
                p.view(-1)[i] = old - h
                lm = c["loss_scale"] * sum(forward(P, tok, tgt, c)[1:4])
                p.view(-1)[i] = old
                fd = ((lp - lm) / (2 * h)).item()
                ours = grads[name].view(-1)[i].item()
                scale = p.grad.abs().max().item() + 1e-12
                if abs(ours - fd) > 1e-4 * scale:
                    print(f"MISMATCH finite difference {name}[{i}]: ours {ours:.8g}, fd {fd:.8g}")
                    ok = False
    worst.sort(reverse=True)
    print("largest relative errors: " + ", ".join(f"{w} {e:.2e}" for e, w in worst[:4]))
    print("torch reference: " + ("match" if ok else "MISMATCH"))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
