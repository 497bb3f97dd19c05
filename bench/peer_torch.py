#!/usr/bin/env python3
"""The peer a user would pick instead of moe.c: the same MoE layer and model in PyTorch
(Debian's python3-torch), with the same shapes and the same figures as `moe bench`, so that a
side-by-side comparison is one command each:

  moe bench layer --tokens 4096 --hidden-size 1024 --moe-ffn-hidden-size 2816 \
      --num-experts 8 --moe-router-topk 2
  /usr/bin/python3 bench/peer_torch.py layer --tokens 4096 --hidden-size 1024 \
      --moe-ffn-hidden-size 2816 --num-experts 8 --moe-router-topk 2

  moe bench train --config configs/default.cfg
  /usr/bin/python3 bench/peer_torch.py train --config configs/default.cfg

  moe bench generate --hidden-size 1024 --num-layers 8 --num-attention-heads 16 \
      --num-query-groups 4 --moe-ffn-hidden-size 2816 --num-experts 8 --moe-router-topk 2 \
      --seq-length 1024 --tokens 512 --max-new-tokens 64 --vocab-size 32000
  /usr/bin/python3 bench/peer_torch.py generate (the same flags)

(generate: the model's shape from the flags; its decoding keeps a key/value cache as moe.c's)

On an NVIDIA GPU (against moe.c's CUDA layer), parameters and input on the device in bf16:

  python3 bench/peer_torch.py layer --device cuda --dtype bf16 --tokens 16384 \
      --hidden-size 4096 --moe-ffn-hidden-size 14336 --num-experts 8 --moe-router-topk 2 \
      --style all

and generation in fp32 (against moe bench generate --device cuda, the same flags):

  python3 bench/peer_torch.py generate --device cuda --hidden-size 1024 ... --vocab-size 32000

Layer styles: "hf" is Hugging Face Mixtral's loop over experts with index_add; "grouped" sorts
the slots by expert and runs one matmul pair per contiguous block; "grouped_mm" sorts the same
way and runs each of the two expert GEMMs as one torch._grouped_mm call over all experts (CUDA,
bf16, PyTorch >= 2.8; skipped with a note elsewhere). --style both = hf and grouped (as before),
all = every style. GFLOP/s counts the same GEMM work as moe.c (router, experts over the T*k
routed rows; backward = 2 x forward). On cpu the ceiling is an fp32 torch.mm 2048^3 and
--threads sets the threads; on cuda it is a torch.matmul 8192^3 in --dtype, rates are TFLOP/s,
each timed iteration is bracketed by torch.cuda.synchronize() after 2 warm-up iterations."""
import argparse
import math
import sys
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


def matmul_rate(device, dtype, n=8192, warmup=2, reps=5):
    """Dense GPU ceiling: best of `reps` n^3 torch.matmul in `dtype` after `warmup` untimed."""
    a = torch.rand(n, n, device=device, dtype=dtype)
    b = torch.rand(n, n, device=device, dtype=dtype)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = 0.0
    for i in range(warmup + reps):
        torch.cuda.synchronize()
        start.record()
        torch.matmul(a, b)
        end.record()
        end.synchronize()
        if i >= warmup:
            best = max(best, 2 * n ** 3 / (start.elapsed_time(end) * 1e-3))
    return best


class MoELayer(torch.nn.Module):
    def __init__(self, d, f, E, k, style, device=None, dtype=None):
        super().__init__()
        self.E, self.k, self.style = E, k, style
        kw = {"device": device, "dtype": dtype}  # None, None: the default cpu fp32, as before
        self.router = torch.nn.Parameter(torch.randn(E, d, **kw) * 0.02)
        self.w_in = torch.nn.Parameter(torch.randn(E, 2 * f, d, **kw) * 0.02)  # gate; up
        self.w_out = torch.nn.Parameter(torch.randn(E, d, f, **kw) * 0.02)
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
        elif self.style == "grouped":
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
        else:  # grouped_mm
            # torch._grouped_mm(mat_a, mat_b, offs=None, bias=None, out_dtype=None), read in
            # PyTorch's native_functions.yaml, GroupedMMUtils.h, cuda/GroupedBlas.cpp, GroupMM.cu:
            # a 2-D mat_a [M, K] times a 3-D mat_b [G, K, N] with offs = int32 1-D [G] of
            # cumulative row END indices (no leading 0; group g = rows offs[g-1]..offs[g], an
            # empty expert repeats the offset) gives [M, N]; offs.size(0) must equal G. Each
            # operand needs one of its last two strides to be 1 and the other a multiple of 16
            # bytes (d and f multiples of 8 in bf16, checked before this style runs) and a
            # 16-byte aligned data pointer (fresh tensors and the parameters' bases are). Either
            # layout of mat_b is accepted (the CUTLASS kernel is dispatched on a_row_major x
            # b_row_major), so the transposed weight views go in without a .contiguous() copy,
            # as Hugging Face's Mixtral passes weight.transpose(-2, -1). out_dtype must be
            # mat_a's dtype; bias is refused. The bf16 CUTLASS path (sm90/sm100) needs no
            # device-to-host sync, so the offsets stay on the device: offs[e] = the number of
            # slots routed to experts <= e (the int32 cumulative row counts), by searchsorted,
            # since a CUDA bincount reads its maximum back to the host. Autograd:
            # derivatives.yaml gives both operands' gradients (_grouped_mm_mat1/mat2_backward).
            flat = top_i.reshape(-1)
            sorted_e, order = torch.sort(flat, stable=True)
            tok = order // self.k
            experts = torch.arange(self.E, device=flat.device, dtype=flat.dtype)
            offs = torch.searchsorted(sorted_e, experts, right=True, out_int32=True)
            xs = x[tok]
            ws = w.reshape(-1)[order]
            h = torch._grouped_mm(xs, self.w_in.transpose(-2, -1), offs=offs)  # [T*k, 2f]
            act = F.silu(h[:, :self.f]) * h[:, self.f:]
            y = torch._grouped_mm(act, self.w_out.transpose(-2, -1), offs=offs)  # [T*k, d]
            out.index_add_(0, tok, y * ws[:, None])
        return out


def layer_flops(T, d, f, E, k):
    return 2.0 * T * d * E + T * k * (2.0 * d * 3 * f)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def grouped_mm_unavailable(a):
    """Why the grouped_mm style cannot run with these arguments here, or None if it can."""
    if not hasattr(torch, "_grouped_mm"):
        return f"PyTorch {torch.__version__} has no torch._grouped_mm (it came with about 2.8)"
    if a.device != "cuda":
        return "it needs --device cuda"
    if a.dtype != "bf16":
        return "it needs --dtype bf16 (the dtype of torch._grouped_mm's grouped kernel)"
    if a.hidden_size % 8 or a.moe_ffn_hidden_size % 8:
        return "torch._grouped_mm needs 16-byte strides: hidden and ffn sizes multiples of 8"
    return None


def bench_layer(a):
    torch.manual_seed(a.seed)
    T, d, f, E, k = a.tokens, a.hidden_size, a.moe_ffn_hidden_size, a.num_experts, a.moe_router_topk
    cuda = a.device == "cuda"
    dev, dt = torch.device(a.device), DTYPES[a.dtype]
    if cuda:
        peak = matmul_rate(dev, dt)
        print(f"peer_torch layer: T={T} d={d} f={f} E={E} k={k}, {a.dtype}, cuda "
              f"{torch.cuda.get_device_name(dev)}, PyTorch {torch.__version__} "
              f"(CUDA {torch.version.cuda})")
        print(f"ceiling: torch.matmul 8192^3 {a.dtype} = {peak * 1e-12:.1f} TFLOP/s "
              f"(best of 5 after 2 warm-ups, this run)")
    else:
        peak = sgemm_rate()
        print(f"peer_torch layer: T={T} d={d} f={f} E={E} k={k}, {a.dtype}, "
              f"{torch.get_num_threads()} threads, PyTorch {torch.__version__}")
        tag = "" if a.dtype == "fp32" else " fp32"
        print(f"ceiling: torch.mm 2048^3{tag} = {peak * 1e-9:.1f} GFLOP/s (best of 5, this run)")
    x = (torch.rand(T, d) * 2 - 1).to(device=dev, dtype=dt)
    dout = (torch.rand(T, d) * 2 - 1).to(device=dev, dtype=dt)
    flops = layer_flops(T, d, f, E, k)
    styles = {"both": ["hf", "grouped"], "all": ["hf", "grouped", "grouped_mm"]}
    styles = styles.get(a.style, [a.style])
    width = max(8, *(len(st) for st in styles))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    warmup = 2 if cuda else 1
    for style in styles:
        if style == "grouped_mm":
            why = grouped_mm_unavailable(a)
            if why:
                print(f"{style:{width}s} skipped: {why}")
                continue
        try:
            layer = MoELayer(d, f, E, k, style, dev, dt)
            xi = x.clone().requires_grad_()
            tf = tb = 0.0
            for it in range(warmup + a.iters):
                sync()
                t0 = time.perf_counter()
                out = layer(xi)
                sync()
                t1 = time.perf_counter()
                out.backward(dout)
                sync()
                t2 = time.perf_counter()
                if it >= warmup:
                    tf, tb = tf + t1 - t0, tb + t2 - t1
        except RuntimeError as e:  # a refusal by torch._grouped_mm is reported, not fatal
            if style != "grouped_mm":
                raise
            print(f"{style:{width}s} skipped: it failed: {str(e).splitlines()[0]}")
            continue
        finally:
            layer = xi = out = None  # free this style's parameters and graph before the next
        n = a.iters
        rate = 3 * flops * n / (tf + tb)
        if cuda:
            print(f"{style:{width}s} forward {1e3 * tf / n:9.3f} ms  backward {1e3 * tb / n:9.3f} "
                  f"ms  fwd+bwd {rate * 1e-12:7.1f} TFLOP/s  {100 * rate / peak:5.1f}% of "
                  f"torch.matmul")
        else:
            print(f"{style:{width}s} forward {1e3 * tf / n:9.3f} ms  backward {1e3 * tb / n:9.3f} "
                  f"ms  fwd+bwd {rate * 1e-9:7.1f} GFLOP/s  {100 * rate / peak:5.1f}% of torch.mm")


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

    def rope(self, x, p0=0):
        B, S, H, hd = x.shape
        half = hd // 2
        inv = 10000.0 ** (-2.0 * torch.arange(half) / hd)
        ang = torch.arange(p0, p0 + S)[:, None] * inv[None, :]
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

    @torch.no_grad()
    def decode(self, tok, cache, p0):
        """Logits of the last of the n tokens tok [1, n] at positions p0.., with the key/value
        cache (one [1, S, KV, hd] pair per block, filled up to p0)."""
        c = self.c
        n = tok.shape[1]
        H, KV, d = c["heads"], c["kv"], c["d"]
        hd = d // H
        x = self.emb[tok]
        mask = torch.full((n, p0 + n), float("-inf")).triu(p0 + 1)
        for b, (K, V) in zip(self.blocks, cache):
            h = self.rms(x, b.n1)
            q = self.rope(b.q(h).view(1, n, H, hd), p0).transpose(1, 2)
            K[:, p0:p0 + n] = self.rope(b.k(h).view(1, n, KV, hd), p0)
            V[:, p0:p0 + n] = b.v(h).view(1, n, KV, hd)
            k = K[:, :p0 + n].repeat_interleave(H // KV, 2).transpose(1, 2)
            v = V[:, :p0 + n].repeat_interleave(H // KV, 2).transpose(1, 2)
            att = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(hd) + mask, -1)
            x = x + b.o((att @ v).transpose(1, 2).reshape(1, n, d))
            x = x + b.moe(self.rms(x, b.n2).view(n, d)).view(1, n, d)
        return self.rms(x[0, -1], self.norm) @ self.head.t()


def model_shape(cfg):
    g = lambda key, dflt: int(cfg.get(key, dflt))  # noqa: E731
    c = {"vocab": g("vocab-size", 257), "d": g("hidden-size", 128), "layers": g("num-layers", 4),
         "heads": g("num-attention-heads", 4), "f": g("moe-ffn-hidden-size", 128),
         "E": g("num-experts", 8), "k": g("moe-router-topk", 2)}
    c["kv"] = g("num-query-groups", c["heads"])
    return c, g


def bench_generate(a):
    """moe bench generate's measurement: a prompt of --tokens random tokens in one call, then
    --max-new-tokens greedy tokens one call each with the key/value cache; best of --iters."""
    if a.config:
        sys.exit("generate takes the model's shape from the flags, not --config")
    c, g = model_shape({k.replace("_", "-"): str(v) for k, v in vars(a).items()
                           if v is not None})
    S = g("seq-length", 1024)
    P, N = a.tokens, a.max_new_tokens
    if P + N > S:
        sys.exit(f"--tokens {P} + --max-new-tokens {N} exceed --seq-length {S}")
    if a.device == "cuda":  # every tensor made from here on (parameters, cache, masks) there
        torch.set_default_device("cuda")
    torch.manual_seed(a.seed)
    model = Model(c)
    hd = c["d"] // c["heads"]
    prompt = torch.randint(0, c["vocab"], (1, P))
    where = (f"cuda {torch.cuda.get_device_name()}" if a.device == "cuda"
             else f"{torch.get_num_threads()} threads")
    print(f"peer_torch generate: {c}, prompt {P}, new {N}, {where}, PyTorch {torch.__version__}")
    best_p = best_d = float("inf")
    for _ in range(a.iters):
        cache = [(torch.zeros(1, S, c["kv"], hd), torch.zeros(1, S, c["kv"], hd))
                 for _ in range(c["layers"])]
        t0 = time.perf_counter()
        nxt = int(model.decode(prompt, cache, 0).argmax())
        t1 = time.perf_counter()
        for i in range(N):
            nxt = int(model.decode(torch.tensor([[nxt]]), cache, P + i).argmax())
        t2 = time.perf_counter()
        best_p, best_d = min(best_p, t1 - t0), min(best_d, (t2 - t1) / N)
    print(f"prefill: {1e3 * best_p:.1f} ms, {P / best_p:.0f} tokens/s")
    print(f"decode: {1e3 * best_d:.3f} ms per token, {1 / best_d:.1f} tokens/s")


def bench_train(a):
    c, g = model_shape(read_config(a.config) if a.config else {})
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
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["layer", "train", "generate"])
    p.add_argument("--tokens", type=int, default=1024, help="layer: tokens; generate: the prompt")
    p.add_argument("--max-new-tokens", type=int, default=64, help="generate only")
    for name in ["num-layers", "num-attention-heads", "num-query-groups", "vocab-size",
                 "seq-length"]:
        p.add_argument("--" + name, type=int, help="generate only (else the config's)")
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--moe-ffn-hidden-size", type=int, default=128)
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--moe-router-topk", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="CPU threads (cpu only)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--style", choices=["hf", "grouped", "grouped_mm", "both", "all"],
                   default="both", help="both = hf and grouped; all = every style")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="layer, generate")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="layer only")
    p.add_argument("--config", help="a moe.c config file (moe bench train's shapes)")
    a = p.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this PyTorch sees no CUDA device")
    if a.what == "train" and a.device != "cpu":
        p.error("--device applies to layer and generate")
    if a.what != "layer" and a.dtype != "fp32":
        p.error("--dtype applies to layer only")
    if a.device == "cpu":  # --threads is for cpu; on cuda the host side keeps torch's default
        torch.set_num_threads(a.threads)
    {"layer": bench_layer, "train": bench_train, "generate": bench_generate}[a.what](a)


if __name__ == "__main__":
    main()
