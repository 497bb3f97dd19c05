"""GGUF files for moe's reader, written here from the GGUF specification (version 3) and ggml's
block layouts (ggml-common.h; values computed in float32 in the order of ggml's
dequantize_row_*): Q8_0 and Q4_0 quantised from the values (blocks of 32: an f16 scale d, 32
signed bytes q, value d q; or d and 16 bytes of nibbles, the low ones the block's first 16
values, the high ones its last 16, value d (q - 8)); Q4_1, Q5_0, Q5_1, the K-quants Q2_K to
Q6_K, IQ4_NL and IQ4_XS as blocks of random bits with finite scales of the tensor's size (every
bit of the layout matters, so a reader that misplaces one gets other values); and malformed
files.

usage: gguf_files.py quantise IN.gguf OUT.gguf TYPE EXPECT.npz
         TYPE q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k, q4_k, q5_k, q6_k, iq4_nl or iq4_xs, or
         several separated by commas (taken in turn): every tensor of IN (F32) with two or more
         dimensions and rows of whole blocks, but the norms and routers, re-encoded;
         EXPECT.npz: every tensor's values as the format defines them (float32)
       gguf_files.py compare FILE.gguf EXPECT.npz
         FILE's tensors (F32) equal EXPECT's, bit for bit
       gguf_files.py malform IN.gguf DIR
         DIR/NAME.gguf, each IN with one fault, and DIR/faults.tsv: NAME, the message expected"""
import os
import struct
import sys

import numpy as np

SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def parse(path):
    """([(key, type, value bytes)], [[name, ne, type, data bytes]], alignment)"""
    b = open(path, "rb").read()
    assert b[:4] == b"GGUF" and struct.unpack_from("<I", b, 4)[0] == 3
    n_t, n_kv = struct.unpack_from("<QQ", b, 8)
    pos, align = 24, 32

    def skip(t):
        nonlocal pos
        if t == 8:
            pos += 8 + struct.unpack_from("<Q", b, pos)[0]
        elif t == 9:
            et, n = struct.unpack_from("<IQ", b, pos)
            pos += 12
            for _ in range(n):
                skip(et)
        else:
            pos += SIZES[t]

    kvs = []
    for _ in range(n_kv):
        n = struct.unpack_from("<Q", b, pos)[0]
        key = b[pos + 8:pos + 8 + n].decode()
        t = struct.unpack_from("<I", b, pos + 8 + n)[0]
        pos += 12 + n
        at = pos
        skip(t)
        kvs.append((key, t, b[at:pos]))
        if key == "general.alignment":
            align = struct.unpack_from("<I", b, at)[0]
    infos = []
    for _ in range(n_t):
        n = struct.unpack_from("<Q", b, pos)[0]
        name = b[pos + 8:pos + 8 + n].decode()
        pos += 8 + n
        nd = struct.unpack_from("<I", b, pos)[0]
        ne = list(struct.unpack_from("<%dQ" % nd, b, pos + 4))
        typ, off = struct.unpack_from("<IQ", b, pos + 4 + 8 * nd)
        pos += 4 + 8 * nd + 12
        infos.append((name, ne, typ, off))
    start = (pos + align - 1) // align * align
    tensors = []
    for name, ne, typ, off in infos:
        assert typ == 0, name + " is not F32"
        tensors.append([name, ne, typ, b[start + off:start + off + 4 * int(np.prod(ne))]])
    return kvs, tensors, align


def build(kvs, tensors, version=3, align=32, offsets=None, ndims=None):
    """The file's bytes: offsets (a tensor's, by index) and ndims override what the data say."""
    head, data, offs = bytearray(), bytearray(), []
    for _, _, _, body in tensors:
        offs.append(len(data))
        data += body + bytes((-len(body)) % align)
    for i, (name, ne, t, body) in enumerate(tensors):
        n = name.encode()
        nd = (ndims or {}).get(i, len(ne))
        dims = (ne + [1] * 4)[:nd]
        head += struct.pack("<Q", len(n)) + n + struct.pack("<I", nd) + struct.pack("<%dQ" % nd, *dims)
        head += struct.pack("<IQ", t, (offsets or {}).get(i, offs[i]))
    kv = b"".join(struct.pack("<Q", len(k.encode())) + k.encode() + struct.pack("<I", t) + v
                  for k, t, v in kvs)
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs)) + kv + head
    return out + bytes((-len(out)) % align) + data


# type: (ggml id, values per block, bytes per block)
TYPES = {"q8_0": (8, 32, 34), "q4_0": (2, 32, 18), "q4_1": (3, 32, 20), "q5_0": (6, 32, 22),
         "q5_1": (7, 32, 24), "q2_k": (10, 256, 84), "q3_k": (11, 256, 110),
         "q4_k": (12, 256, 144), "q5_k": (13, 256, 176), "q6_k": (14, 256, 210),
         "iq4_nl": (20, 32, 18), "iq4_xs": (23, 256, 136)}
# where a block's f16 scale d is, and its f16 minimum (m or dmin) with the multiple of d that
# centres the values on 0 (the mean of q; of q times the scales for the K-quants' dmin)
HALVES = {"q4_1": (0, 2, -7.5), "q5_0": (0,), "q5_1": (0, 2, -15.5), "q2_k": (80, 82, 1.5),
          "q3_k": (108,), "q4_k": (0, 2, 7.5), "q5_k": (0, 2, 15.5), "q6_k": (208,),
          "iq4_nl": (0,), "iq4_xs": (0,)}
# the IQ4 types' nibbles index this table (ggml's kvalues_iq4nl)
IQ4 = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
               np.float32)
F = np.float32


def f16(raw, at):
    return raw[:, at:at + 2].copy().view(np.float16).astype(F)[:, 0]


def bits(raw, at, n, width):
    """(blocks, n * 8 / width) fields of width bits from bytes at..at+n, low bits first"""
    b = raw[:, at:at + n]
    return np.stack([(b >> s) & ((1 << width) - 1) for s in range(0, 8, width)], -1)


def dequant(kind, raw):
    """(blocks, values) float32: the values of the blocks raw (uint8, blocks x bytes)"""
    nb = raw.shape[0]
    if kind in ("q4_1", "q5_0", "q5_1"):
        d, has_min, five = f16(raw, 0), kind.endswith("_1"), kind.startswith("q5")
        qs = raw[:, 2 + 2 * has_min + 4 * five:]
        q = np.concatenate([qs & 15, qs >> 4], 1).astype(np.int32)
        if five:  # bit j of the 32 high bits is value j's fifth bit
            qh = raw[:, 2 + 2 * has_min:6 + 2 * has_min].copy().view("<u4")
            q |= (((qh >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.int32)
        if has_min:
            return q.astype(F) * d[:, None] + f16(raw, 2)[:, None]
        return (q - (16 if five else 8)).astype(F) * d[:, None]
    if kind == "q2_k":
        d, dmin, sc = f16(raw, 80), f16(raw, 82), raw[:, :16]
        # 128 values a half: bytes 0-31 of the half at shifts 0, 2, 4, 6; 16 bytes a scale
        q = bits(raw, 16, 64, 2).reshape(nb, 2, 32, 4).transpose(0, 1, 3, 2).reshape(nb, 16, 16)
        dl, ml = d[:, None] * (sc & 15).astype(F), dmin[:, None] * (sc >> 4).astype(F)
        return (dl[:, :, None] * q.astype(F) - ml[:, :, None]).reshape(nb, 256)
    if kind == "q3_k":
        d, s = f16(raw, 108), raw[:, 96:108].astype(np.int32)
        lo = np.concatenate([s[:, :8] & 15, s[:, :8] >> 4], 1)
        hi = (s[:, 8:12, None] >> (2 * np.arange(4))) & 3  # (byte j % 4, shift j / 4)
        sc = lo | (hi.transpose(0, 2, 1).reshape(nb, 16) << 4)
        q = bits(raw, 32, 64, 2).reshape(nb, 2, 32, 4).transpose(0, 1, 3, 2).reshape(nb, 8, 32)
        h = bits(raw, 0, 32, 1).transpose(0, 2, 1)  # (blocks, 8 masks, 32)
        v = (q.astype(np.int32) - np.where(h == 1, 0, 4)).reshape(nb, 16, 16)
        dl = d[:, None] * (sc - 32).astype(F)
        return (dl[:, :, None] * v.astype(F)).reshape(nb, 256)
    if kind in ("q4_k", "q5_k"):
        d, dmin, s = f16(raw, 0), f16(raw, 2), raw[:, 4:16].astype(np.int32)
        sc = np.concatenate([s[:, :4] & 63, (s[:, 8:] & 15) | ((s[:, :4] >> 6) << 4)], 1)
        m = np.concatenate([s[:, 4:8] & 63, (s[:, 8:] >> 4) | ((s[:, 4:8] >> 6) << 4)], 1)
        five = kind == "q5_k"
        qs = raw[:, 16 + 32 * five:].reshape(nb, 4, 32).astype(np.int32)
        q = np.stack([qs & 15, qs >> 4], 2).reshape(nb, 8, 32)  # 32 values a scale
        if five:
            q |= bits(raw, 16, 32, 1).transpose(0, 2, 1).astype(np.int32) << 4
        d1, m1 = d[:, None] * sc.astype(F), dmin[:, None] * m.astype(F)
        return (d1[:, :, None] * q.astype(F) - m1[:, :, None]).reshape(nb, 256)
    if kind == "q6_k":
        d, sc = f16(raw, 208), raw[:, 192:208].view(np.int8).astype(F)
        ql = raw[:, :128].reshape(nb, 2, 2, 32).astype(np.int32)
        qh = bits(raw, 128, 64, 2).reshape(nb, 2, 32, 4).transpose(0, 1, 3, 2)
        # a half's 4 rows of 32: low nibbles of bytes 0-31, of 32-63, high nibbles of each
        q = np.stack([ql[:, :, 0] & 15, ql[:, :, 1] & 15, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], 2)
        q = (q | (qh.astype(np.int32) << 4)) - 32
        scale = (d[:, None] * sc).reshape(nb, 2, 4, 2)  # a scale per 16 values
        return (np.repeat(scale, 16, 3) * q.astype(F)).reshape(nb, 256)
    if kind == "iq4_nl":  # d, 16 bytes: low nibbles values 0-15, high ones 16-31
        qs = raw[:, 2:]
        return f16(raw, 0)[:, None] * IQ4[np.concatenate([qs & 15, qs >> 4], 1)]
    if kind == "iq4_xs":  # d, u16 of 2-bit highs, 4 bytes of 4-bit lows of 8 scales, nibbles
        high = raw[:, 2:4].copy().view("<u2").astype(np.int32)  # (blocks, 1)
        j = np.arange(8)
        low = raw[:, 4 + j // 2].astype(np.int32) >> (4 * (j % 2)) & 15
        sc = low | (high >> (2 * j) & 3) << 4
        qs = raw[:, 8:].reshape(nb, 8, 16)
        q = IQ4[np.concatenate([qs & 15, qs >> 4], 2)]  # (blocks, 8 scales, 32)
        return ((f16(raw, 0)[:, None] * (sc - 32).astype(F))[:, :, None] * q).reshape(nb, 256)
    raise ValueError(kind)


def random_blocks(x, kind, rng):
    """blocks of random bits for x's values, the f16 scales finite, the values centred on 0 and
    of x's spread"""
    _, per, size = TYPES[kind]
    raw = rng.integers(0, 256, (x.size // per, size), dtype=np.uint8)
    at = HALVES[kind]

    def scales(d):
        raw[:, at[0]:at[0] + 2] = d.astype(np.float16).reshape(-1, 1).view(np.uint8)
        if len(at) > 1:
            raw[:, at[1]:at[1] + 2] = (d * at[2]).astype(np.float16).reshape(-1, 1).view(np.uint8)

    scales(np.ones(raw.shape[0]))
    unit = float(dequant(kind, raw).std())
    scales(rng.uniform(0.5, 1, raw.shape[0]) * (float(x.std()) or 1.0) / unit)
    return raw.tobytes(), dequant(kind, raw).reshape(x.shape)


def quant(x, kind, rng=None):
    """bytes of x (float32, a multiple of 32 values) and its values as the format defines them"""
    if kind not in ("q8_0", "q4_0"):
        return random_blocks(x, kind, rng)
    blocks = x.reshape(-1, 32).astype(np.float32)
    raw, vals = bytearray(), np.empty_like(blocks)
    for i, v in enumerate(blocks):
        if kind == "q8_0":  # as ggml's quantize_row_q8_0_ref: x times 1 / d, half away from 0
            d = np.abs(v).max() / F(127)
            s = (v * (F(1) / d if d else F(0))).astype(np.float64)
            q = (np.sign(s) * np.floor(np.abs(s) + 0.5)).astype(np.int8)
            d16 = np.float16(d)
            raw += d16.tobytes() + q.tobytes()
            vals[i] = np.float32(d16) * q.astype(np.float32)
        else:
            d = v[np.argmax(np.abs(v))] / -8
            q = np.clip(np.floor(v / d + 8.5), 0, 15).astype(np.uint8) if d else np.full(32, 8, np.uint8)
            d16 = np.float16(d)
            raw += d16.tobytes() + (q[:16] | (q[16:] << 4)).astype(np.uint8).tobytes()
            vals[i] = np.float32(d16) * (q.astype(np.float32) - 8)
    return bytes(raw), vals.reshape(x.shape)


def quantisable(name, ne, per):
    return len(ne) >= 2 and ne[0] % per == 0 and "_norm" not in name and "ffn_gate_inp" not in name


def quantise(src, dst, kind, expect):
    kvs, tensors, align = parse(src)
    want, n = {}, 0
    rng = np.random.default_rng()
    kinds = kind.split(",")
    for t in tensors:
        x = np.frombuffer(t[3], dtype=np.float32).reshape(t[1][::-1])
        want[t[0]] = x
        k = kinds[n % len(kinds)]
        if quantisable(t[0], t[1], TYPES[k][1]):
            t[3], want[t[0]] = quant(x, k, rng)
            t[2] = TYPES[k][0]
            n += 1
    open(dst, "wb").write(build(kvs, tensors, align=align))
    np.savez(expect, **want)
    print("%s: %d tensors, %d of them %s" % (dst, len(tensors), n, kind))


def compare(path, expect):
    want = np.load(expect)
    _, tensors, _ = parse(path)
    assert sorted(want.files) == sorted(t[0] for t in tensors), "other tensors"
    for name, ne, _, raw in tensors:
        got = np.frombuffer(raw, dtype=np.float32).reshape(ne[::-1])
        assert np.array_equal(got, want[name]), name + " differs from its dequantised values"
    print("%s: %d tensors equal to the dequantised values" % (path, len(tensors)))


def malform(src, out):
    kvs, tensors, align = parse(src)
    os.makedirs(out, exist_ok=True)
    good = build(kvs, tensors, align=align)
    faults = []

    def fault(name, data, msg):
        open(os.path.join(out, name + ".gguf"), "wb").write(data)
        faults.append((name, msg))

    def kv_set(key, t, v):
        return [(k, t, v) if k == key else (k, kt, kv) for k, kt, kv in kvs]

    def with_tensor(i, **change):
        ts = [list(t) for t in tensors]
        for field, v in change.items():
            ts[i][{"name": 0, "ne": 1, "type": 2, "data": 3}[field]] = v
        return ts

    s = lambda text: struct.pack("<Q", len(text)) + text.encode()  # noqa: E731
    fault("truncated", good[:len(good) // 2], "past the end")
    fault("header", good[:20], "not a GGUF file")
    fault("version", build(kvs, tensors, version=1, align=align), "GGUF version 1")
    fault("twice", build(kvs + [kvs[0]], tensors, align=align), "key %s appears twice" % kvs[0][0])
    fault("align", build(kv_set("general.alignment", 4, struct.pack("<I", 24)), tensors, align=align),
          "general.alignment is not a power of 2")
    fault("misaligned", build(kvs, tensors, align=align, offsets={1: 4}), "not a multiple of the alignment")
    big = max(range(len(tensors)), key=lambda i: len(tensors[i][3]))
    fault("overlap", build(kvs, tensors, align=align, offsets={big: 0 if big else align}), "overlap")
    fault("dims", build(kvs, tensors, align=align, ndims={0: 5}), "malformed")
    fault("past", build(kvs, tensors, align=align, offsets={0: len(good)}), "past the end")
    fault("iq2", build(kvs, with_tensor(big, type=16), align=align), "is IQ2_XXS (ggml type 16)")
    fault("q4k", build(kvs, with_tensor(big, type=12), align=align), "not whole Q4_K blocks")
    nan = bytearray(tensors[big][3])
    nan[4:8] = struct.pack("<f", float("nan"))
    fault("nan", build(kvs, with_tensor(big, data=bytes(nan)), align=align), "holds nan")
    fault("arch", build(kv_set("general.architecture", 8, s("gpt2")), tensors, align=align),
          'general.architecture "gpt2" is not read here')
    down = [t[0] for t in tensors].index("blk.0.ffn_down_exps.weight")
    fault("renamed", build(kvs, with_tensor(down, name="blk.9.ffn_down_exps.weight"), align=align),
          "tensor blk.0.ffn_down_exps.weight is missing")
    extra = [list(t) for t in tensors] + [["blk.0.extra.weight", [4], 0, bytes(16)]]
    fault("extra", build(kvs, extra, align=align), "blk.0.extra.weight is not part of the model")
    fault("keys", good[:16] + struct.pack("<Q", 1 << 40) + good[24:], "do not fit")
    with open(os.path.join(out, "faults.tsv"), "w") as f:
        for name, msg in faults:
            f.write("%s\t%s\n" % (name, msg))
    print("%d malformed files in %s" % (len(faults), out))


if __name__ == "__main__":
    {"quantise": quantise, "compare": compare, "malform": malform}[sys.argv[1]](*sys.argv[2:])
