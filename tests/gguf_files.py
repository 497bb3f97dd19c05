"""GGUF files for moe's reader, written here from the GGUF specification (version 3) and ggml's
block layouts: Q8_0 (blocks of 32: an f16 scale d, 32 signed bytes q; value d q) and Q4_0 (an
f16 scale d, 16 bytes of nibbles, the low ones the block's first 16 values, the high ones its
last 16; value d (q - 8)); and malformed files.

usage: gguf_files.py quantise IN.gguf OUT.gguf q8_0|q4_0 EXPECT.npz
         every tensor of IN (F32) with two or more dimensions and rows of whole blocks, but the
         norms and routers, re-encoded; EXPECT.npz: every tensor's values as the format defines
         them (float32)
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


def quant(x, kind):
    """bytes of x (float32, a multiple of 32 values) and its values as the format defines them"""
    blocks = x.reshape(-1, 32).astype(np.float32)
    raw, vals = bytearray(), np.empty_like(blocks)
    for i, v in enumerate(blocks):
        if kind == "q8_0":
            d = np.abs(v).max() / 127
            q = np.clip(np.round(v / d) if d else np.zeros(32), -127, 127).astype(np.int8)
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


def quantisable(name, ne):
    return len(ne) >= 2 and ne[0] % 32 == 0 and "_norm" not in name and "ffn_gate_inp" not in name


def quantise(src, dst, kind, expect):
    kvs, tensors, align = parse(src)
    want, n = {}, 0
    for t in tensors:
        x = np.frombuffer(t[3], dtype=np.float32).reshape(t[1][::-1])
        want[t[0]] = x
        if quantisable(t[0], t[1]):
            t[3], want[t[0]] = quant(x, kind)
            t[2] = 8 if kind == "q8_0" else 2
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
    fault("q4k", build(kvs, with_tensor(big, type=12), align=align), "is Q4_K (ggml type 12)")
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


{"quantise": quantise, "compare": compare, "malform": malform}[sys.argv[1]](*sys.argv[2:])
