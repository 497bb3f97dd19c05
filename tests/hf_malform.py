"""Writes a malformed copy of a Hugging Face directory (one model.safetensors) for the error
tests: usage: hf_malform.py SRC OUT KIND, KIND one of header-beyond, overlap, out-of-range,
shape, dtype, duplicate, or a tensor added: extra (one the model lacks: q_proj's bias), and
the ones a loader leaves unused, which are accepted: inv-freq (a RoPE buffer), mtp (a layer
past num_hidden_layers, as DeepSeek-V3's multi-token prediction module)."""
import json, struct, sys, shutil, os
src, out, kind = sys.argv[1], sys.argv[2], sys.argv[3]
shutil.copytree(src, out)
p = out + "/model.safetensors"
b = open(p, "rb").read(); n = struct.unpack("<Q", b[:8])[0]; h = json.loads(b[8:8 + n]); data = b[8 + n:]
names = [k for k in h if k != "__metadata__"]
if kind == "header-beyond":
    open(p, "wb").write(struct.pack("<Q", len(b) + 100) + b[8:]); sys.exit()
if kind == "overlap":
    a, c = h[names[0]], h[names[1]]
    c["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + c["data_offsets"][1] - c["data_offsets"][0]]
if kind == "out-of-range":
    a = h[names[0]]; L = a["data_offsets"][1] - a["data_offsets"][0]
    a["data_offsets"] = [len(data) - L + 4, len(data) + 4]
if kind == "shape":
    t = h["model.layers.0.self_attn.q_proj.weight"]; t["shape"] = [t["shape"][1], t["shape"][0]] if t["shape"][0] != t["shape"][1] else [t["shape"][0] // 2, t["shape"][1] * 2]
if kind == "dtype":
    t = h["model.norm.weight"]; t["dtype"] = "I32"
added = {"extra": "model.layers.0.self_attn.q_proj.bias",
         "inv-freq": "model.layers.0.self_attn.rotary_emb.inv_freq",
         "mtp": "model.layers.%d.mlp.gate.weight" % json.load(open(out + "/config.json"))["num_hidden_layers"]}
if kind in added:
    h[added[kind]] = {"dtype": "F32", "shape": [4], "data_offsets": [len(data), len(data) + 16]}
    data += struct.pack("<4f", 1, 2, 3, 4)
text = json.dumps(h)
if kind == "duplicate":
    k = names[0]; entry = json.dumps(h[k])
    text = text[:-1] + ', "%s": %s}' % (k, entry)
hb = text.encode(); hb += b" " * ((8 - len(hb) % 8) % 8)
open(p, "wb").write(struct.pack("<Q", len(hb)) + hb + data)
