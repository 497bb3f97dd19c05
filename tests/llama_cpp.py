"""moe's GGUF files in llama.cpp itself (tests/llama_cpp.mjs through node-llama-cpp, installed
under $MOE_LLAMA_CPP): what llama.cpp computes and splits from a file against what moe does.

usage: llama_cpp.py MOE probs FILE IDS LOGITS.npy TOLERANCE
         llama.cpp's next-token probabilities at every position of IDS within TOLERANCE of the
         softmax of LOGITS (a reference's or moe eval's)
       llama_cpp.py MOE quant QFILE F32FILE IDS LOGITS.npy TOLERANCE
         QFILE quantised, F32FILE its values as moe reads them (moe convert), LOGITS moe eval's
         of QFILE: llama.cpp on F32FILE within TOLERANCE of LOGITS, and llama.cpp on QFILE no
         further from LOGITS than from its own result on F32FILE, plus TOLERANCE (llama.cpp
         multiplies quantised weights by activations it rounds to 8 bits, which moe does not)
       llama_cpp.py MOE tokens FILE TEXT...
         llama.cpp's ids of each TEXT (special tokens parsed, start and end tokens as its flags
         say) equal moe tokenize --model FILE's
       llama_cpp.py MOE dequant
         ggml's own dequantize_row_* (its libggml-base.so) of blocks of every type read here, as
         gguf_files.py writes them, equal gguf_files.py's values bit for bit (which moe's equal:
         tests/gguf.sh), and its quantize_row_q8_0_ref's blocks gguf_files.py's (which moe
         convert --outtype q8_0 writes: gguf_check.py)"""
import ctypes
import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def llama(path, ids, texts=()):
    r = subprocess.run(["node", os.path.join(HERE, "llama_cpp.mjs"), path, ids] + list(texts),
                       capture_output=True, text=True)
    if r.returncode:
        sys.exit("llama.cpp on %s: exit %d, %s" % (path, r.returncode, r.stderr.strip()[-500:]))
    return json.loads(r.stdout)


def probs(path, ids):
    return np.array(llama(path, ids)["probs"], dtype=np.float64)


def softmax(path, n):
    x = np.load(path).astype(np.float64).reshape(n, -1)
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def check_probs(moe, path, ids, logits, tol):
    p = probs(path, ids)
    err = np.abs(p - softmax(logits, len(p))).max()
    print("%s in llama.cpp: %d positions, max |probability error| %.3g (largest %.3g)"
          % (os.path.basename(path), len(p), err, p.max()))
    assert err <= float(tol), "beyond %s" % tol


def check_quant(moe, qpath, fpath, ids, logits, tol):
    pq, pf = probs(qpath, ids), probs(fpath, ids)
    ours = softmax(logits, len(pq))
    own, f32, q = np.abs(pq - pf).max(), np.abs(ours - pf).max(), np.abs(ours - pq).max()
    print("%s in llama.cpp: %.3g from moe eval, %.3g from its own result on the values as moe "
          "reads them, which are %.3g from moe eval's" % (os.path.basename(qpath), q, own, f32))
    assert f32 <= float(tol) and q <= own + float(tol), "beyond %s" % tol


def check_tokens(moe, path, *texts):
    got = llama(path, "-", texts)["tokens"]
    for text in texts:
        r = subprocess.run([moe, "tokenize", "--model", path, "--prompt", text],
                           capture_output=True, text=True, check=True)
        ours = [int(t) for t in r.stdout.strip().split(",")]
        assert got[text] == ours, "%r: llama.cpp %s, moe %s" % (text, got[text], ours)
    print("%s in llama.cpp: the ids of %d texts equal moe's" % (os.path.basename(path), len(texts)))


def check_dequant(moe):
    sys.path.insert(0, HERE)
    import gguf_files
    lib = ctypes.CDLL(os.path.join(os.environ["MOE_LLAMA_CPP"], "node_modules", "@node-llama-cpp",
                                   "linux-x64", "bins", "linux-x64", "libggml-base.so"))
    rng = np.random.default_rng()
    for kind, (_, per, size) in gguf_files.TYPES.items():
        x = rng.standard_normal(per * 64).astype(np.float32)
        raw, want = gguf_files.quant(x, kind, rng)
        f = getattr(lib, "dequantize_row_" + (kind[:-1] + "K" if kind.endswith("_k") else kind))
        f.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int64]
        got = np.zeros(x.size, np.float32)
        f(raw, got.ctypes.data, x.size)
        assert np.array_equal(got.view(np.uint32), want.reshape(-1).view(np.uint32)), kind
    f = lib.quantize_row_q8_0_ref
    f.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int64]
    # ties (values of half-integers times the scale) and zero blocks among normal ones
    x = rng.standard_normal(32 * 256).astype(np.float32)
    x[:32 * 64] = (rng.integers(-254, 255, 32 * 64) / 2).astype(np.float32)
    x[-32:] = 0
    got = ctypes.create_string_buffer(34 * 256)
    f(x.ctypes.data, got, x.size)
    assert got.raw == gguf_files.quant(x, "q8_0")[0], "q8_0's blocks"
    print("ggml's dequantize_row_* of %s: the values of gguf_files.py, bit for bit; its "
          "quantize_row_q8_0_ref: the blocks of gguf_files.py" % ", ".join(gguf_files.TYPES))


if __name__ == "__main__":
    {"probs": check_probs, "quant": check_quant, "tokens": check_tokens,
     "dequant": check_dequant}[sys.argv[2]](sys.argv[1], *sys.argv[3:])
