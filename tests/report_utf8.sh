#!/bin/sh
# topics.json and report.html stay UTF-8 (topics.json valid JSON) when a source file's name or
# the run directory's name is not UTF-8 (Latin-1 bytes): such bytes become U+FFFD.
moe=$1
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*"; exit 1; }
mkdir "$tmp/in" || fail "mkdir"
name=$(printf 'caf\351<b>&"x.txt')
i=0
while [ $i -lt 300 ]; do
  printf 'document %d: the quick brown fox jumps over the lazy dog\n\n' $i
  i=$((i + 1))
done >"$tmp/in/$name"
"$moe" prepare --out "$tmp/data" --val-fraction 0.2 "$tmp/in" >"$tmp/out" 2>&1 ||
  { cat "$tmp/out"; fail "prepare"; }
run="$tmp/$(printf 'run\351')"
"$moe" train --num-layers 1 --hidden-size 32 --num-attention-heads 4 --num-query-groups 2 \
  --num-experts 4 --moe-ffn-hidden-size 16 --seq-length 32 --micro-batch-size 2 \
  --global-batch-size 2 --train-iters 2 --eval-iters 1 --data-path "$tmp/data" \
  --save "$run" >"$tmp/out" 2>&1 || { tail -5 "$tmp/out"; fail "train"; }
"$moe" report "$run" >"$tmp/out" 2>&1 || { cat "$tmp/out"; fail "report"; }
/usr/bin/python3 - "$run" <<'PY' || fail "topics.json or report.html is not UTF-8"
import json, os, sys
run = os.fsencode(sys.argv[1])
with open(run + b"/topics.json", "rb") as f:
    topics = json.loads(f.read().decode("utf-8"))
names = [t["name"] for t in topics["topics"]]
assert names == ['caf\ufffd<b>&"x.txt'], names
with open(run + b"/report.html", "rb") as f:
    html = f.read().decode("utf-8")
assert "caf\ufffd&#60;b>&#38;&#34;x.txt" in html, "topic name"
assert "run\ufffd" in html, "run name"
PY
echo "report_utf8: ok"
