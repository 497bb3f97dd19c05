"""Splits a one-file moe checkpoint (model.safetensors, trainer.safetensors) into one shard per
model tensor, named by a model.safetensors.index.json as an expert-parallel save names them:
model-0000i-of-N.safetensors, and trainer shards mirroring the model's (a parameter's optimizer
moments in its shard, other trainer tensors with the token embedding). Usage: reshard.py SRC DST"""
import json
import os
import struct
import sys


def read(path):
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", {})
    body = data[8 + n:]
    return meta, {k: (v["dtype"], v["shape"], body[v["data_offsets"][0]:v["data_offsets"][1]])
                  for k, v in header.items()}


def write(path, meta, tensors):
    header, blobs, off = {"__metadata__": meta}, [], 0
    for name, (dtype, shape, blob) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(blob)]}
        blobs.append(blob)
        off += len(blob)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst)
model_meta, model = read(os.path.join(src, "model.safetensors"))
trainer_meta, trainer = read(os.path.join(src, "trainer.safetensors"))
n = len(model)
shard = {name: i for i, name in enumerate(model)}
name = lambda kind, i: "%s-%05d-of-%05d.safetensors" % (kind, i + 1, n)
model_parts = [{} for _ in range(n)]
trainer_parts = [{} for _ in range(n)]
for p, t in model.items():
    model_parts[shard[p]][p] = t
for k, t in trainer.items():
    p = k.split(".", 2)[2] if k.startswith("optimizer.adam_") else "model.embed_tokens.weight"
    trainer_parts[shard[p]][k] = t
for i in range(n):
    write(os.path.join(dst, name("model", i)), model_meta, model_parts[i])
    write(os.path.join(dst, name("trainer", i)), trainer_meta, trainer_parts[i])
with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": {p: name("model", i) for p, i in shard.items()}}, f)
print("resharded %d tensors into %d shards" % (n, n))
