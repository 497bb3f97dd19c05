#!/usr/bin/env python3
"""The peer a user would pick instead of moe.c: the same MoE layer and model in PyTorch
(Debian's python3-torch), with the same shapes and the same figures as `moe bench`, so that a
side-by-side comparison is one command each:

  moe bench layer --tokens 4096 --hidden-size 1024 --moe-ffn-hidden-size 2816 --num-experts 8 --moe-router-topk 2
  /usr/bin/python3 bench/peer_torch.py layer --tokens 4096 --hidden-size 1024 --moe-ffn-hidden-size 2816 --num-experts 8 --moe-router-topk 2

  moe bench train --config configs/default.cfg
  /usr/bin/python3 bench/peer_torch.py train --config configs/default.cfg

Layer styles: "hf" is Hugging Face Mixtral's loop over experts with index_add; "grouped" sorts
the slots by expert and runs one matmul pair per contiguous block. GFLOP/s counts the same GEMM
work as moe.c (router, experts over the T*k routed rows; backward = 2 x forward)."""
import argparse
import math
import time

import torch
import torch.nn.functional as F


def sgemm_rate(n=2048, reps=5):
    a, b = torch.rand(n, n), torch.rand(n, n)
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t))
    return best


class MoELayer(torch.nn.Module):
    def __init__(self, d, f, E, k, style):
        super().__init__()
        self.E, self.k, self.style = E, k, style
        self.router = torch.nn.Parameter(torch.randn(E, d) * 0.02)
        self.w_in = torch.nn.Parameter(torch.randn(E, 2 * f, d) * 0.02)  # gate; up
        self.w_out = torch.nn.Parameter(torch.randn(E, d, f) * 0.02)
        self.f = f

    def expert(self, e, x):
        h = x @ self.w_in[e].t()
        return (F.silu(h[:, :self.f]) * h[:, self.f:]) @ self.w_out[e].t()

    def forward(self, x):
        logits = x @ self.router.t()
        top_v, top_i = torch.topk(logits, self.k, dim=-1)
        w = torch.softmax(top_v, -1)  # softmax over the k selected (Mixtral)
        out = torch.zeros_like(x)
        if self.style == "hf":
            for e in range(self.E):
                tok, slot = torch.where(top_i == e)
                if tok.numel():
                    out.index_add_(0, tok, self.expert(e, x[tok]) * w[tok, slot, None])
        else:
            flat = top_i.reshape(-1)
            order = torch.argsort(flat, stable=True)
            tok = order // self.k
            counts = torch.bincount(flat, minlength=self.E).tolist()
            xs = x[tok]
            ws = w.reshape(-1)[order]
            ys, o = [], 0
            for e, n in enumerate(counts):
                if n:
                    ys.append(self.expert(e, xs[o:o + n]))
                o += n
            out.index_add_(0, tok, torch.cat(ys) * ws[:, None])
        return out


def layer_flops(T, d, f, E, k):
    return 2.0 * T * d * E + T * k * (2.0 * d * 3 * f)


def bench_layer(a):
    torch.manual_seed(a.seed)
    T, d, f, E, k = a.tokens, a.hidden_size, a.moe_ffn_hidden_size, a.num_experts, a.moe_router_topk
    peak = sgemm_rate()
    print(f"peer_torch layer: T={T} d={d} f={f} E={E} k={k}, fp32, {torch.get_num_threads()} "
          f"threads, PyTorch {torch.__version__}")
    print(f"ceiling: torch.mm 2048^3 = {peak * 1e-9:.1f} GFLOP/s (best of 5, this run)")
    x = torch.rand(T, d) * 2 - 1
    dout = torch.rand(T, d) * 2 - 1
    flops = layer_flops(T, d, f, E, k)
    for style in (["hf", "grouped"] if a.style == "both" else [a.style]):
        layer = MoELayer(d, f, E, k, style)
        xi = x.clone().requires_grad_()
        tf = tb = 0.0
        for it in range(a.iters + 1):
            t0 = time.perf_counter()
            out = layer(xi)
            t1 = time.perf_counter()
            out.backward(dout)
            t2 = time.perf_counter()
            if it:
                tf, tb = tf + t1 - t0, tb + t2 - t1
        n = a.iters
        rate = 3 * flops * n / (tf + tb)
        print(f"{style:8s} forward {1e3 * tf / n:9.3f} ms  backward {1e3 * tb / n:9.3f} ms  "
              f"fwd+bwd {rate * 1e-9:7.1f} GFLOP/s  {100 * rate / peak:5.1f}% of torch.mm")


def read_config(path):
    cfg = {}
    for line in open(path):
        line = line.split("#", 1)[0].strip()
        if "=" in line:
            key, val = (s.strip() for s in line.split("=", 1))
            cfg[key.replace("_", "-")] = val.strip("\"'")
    return cfg


class Model(torch.nn.Module):
    """The MoE transformer of moe.c (RMSNorm, RoPE, GQA, SwiGLU MoE FFN, softmax top-k)."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        V, d, L, H, KV = c["vocab"], c["d"], c["layers"], c["heads"], c["kv"]
        hd = d // H
        self.emb = torch.nn.Parameter(torch.randn(V, d) * 0.02)
        self.blocks = torch.nn.ModuleList()
        for _ in range(L):
            b = torch.nn.Module()
            b.n1 = torch.nn.Parameter(torch.ones(d))
            b.q = torch.nn.Linear(d, H * hd, bias=False)
            b.k = torch.nn.Linear(d, KV * hd, bias=False)
            b.v = torch.nn.Linear(d, KV * hd, bias=False)
            b.o = torch.nn.Linear(H * hd, d, bias=False)
            b.n2 = torch.nn.Parameter(torch.ones(d))
            b.moe = MoELayer(d, c["f"], c["E"], c["k"], "grouped")
            self.blocks.append(b)
        self.norm = torch.nn.Parameter(torch.ones(d))
        self.head = torch.nn.Parameter(torch.randn(V, d) * 0.02)

    @staticmethod
    def rms(x, w):
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-5) * w

    def rope(self, x):
        B, S, H, hd = x.shape
        half = hd // 2
        inv = 10000.0 ** (-2.0 * torch.arange(half) / hd)
        ang = torch.arange(S)[:, None] * inv[None, :]
        cos, sin = torch.cos(ang)[None, :, None, :], torch.sin(ang)[None, :, None, :]
        a, b = x[..., :half], x[..., half:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)

    def forward(self, tok, tgt):
        c = self.c
        B, S = tok.shape
        H, KV, d = c["heads"], c["kv"], c["d"]
        hd = d // H
        x = self.emb[tok]
        for b in self.blocks:
            h = self.rms(x, b.n1)
            q = self.rope(b.q(h).view(B, S, H, hd)).transpose(1, 2)
            k = self.rope(b.k(h).view(B, S, KV, hd)).repeat_interleave(H // KV, 2).transpose(1, 2)
            v = b.v(h).view(B, S, KV, hd).repeat_interleave(H // KV, 2).transpose(1, 2)
            att = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(hd) +
                                torch.full((S, S), float("-inf")).triu(1), -1)
            x = x + b.o((att @ v).transpose(1, 2).reshape(B, S, d))
            x = x + b.moe(self.rms(x, b.n2).view(B * S, d)).view(B, S, d)
        logits = self.rms(x, self.norm) @ self.head.t()
        return F.cross_entropy(logits.reshape(B * S, -1), tgt.reshape(-1))


def bench_train(a):
    cfg = read_config(a.config) if a.config else {}
    g = lambda key, dflt: int(cfg.get(key, dflt))  # noqa: E731
    c = {"vocab": g("vocab-size", 257), "d": g("hidden-size", 128), "layers": g("num-layers", 4),
         "heads": g("num-attention-heads", 4), "f": g("moe-ffn-hidden-size", 128),
         "E": g("num-experts", 8), "k": g("moe-router-topk", 2)}
    c["kv"] = g("num-query-groups", c["heads"])
    S, B = g("seq-length", 256), g("micro-batch-size", 8)
    torch.manual_seed(a.seed)
    model = Model(c)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    peak = sgemm_rate()
    print(f"peer_torch train: {c}, seq {S}, batch {B}, {torch.get_num_threads()} threads, "
          f"PyTorch {torch.__version__}")
    print(f"ceiling: torch.mm 2048^3 = {peak * 1e-9:.1f} GFLOP/s (best of 5, this run)")
    t_total = 0.0
    for it in range(a.iters + 1):
        tok = torch.randint(0, c["vocab"], (B, S + 1))
        t0 = time.perf_counter()
        loss = model(tok[:, :-1], tok[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if it:
            t_total += time.perf_counter() - t0
    print(f"training: {a.iters * B * S / t_total:.0f} tokens/s ({1e3 * t_total / a.iters:.1f} ms "
          f"per step of {B * S} tokens)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["layer", "train"])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--moe-ffn-hidden-size", type=int, default=128)
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--moe-router-topk", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--style", choices=["hf", "grouped", "both"], default="both")
    p.add_argument("--config", help="a moe.c config file (moe bench train's shapes)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    (bench_layer if a.what == "layer" else bench_train)(a)


if __name__ == "__main__":
    main()
