"""Tokenizers of Hugging Face model directories (moe tokenize --model DIR), against this script's
own implementation of the tokenizers library's pipeline, written from its documentation with
Python's unicodedata (no regular expressions: the split patterns are hand-written matchers, so
moe's PCRE2 patterns are checked by an independent route).

Usage: tokenizers.py MOE_BINARY [SEED]   (a fresh seed by default, printed)

For each style (Qwen2: NFC + Qwen's split pattern + byte-level BPE; GPT-NeoX / OLMoE: byte-level
BPE with GPT-2's split and an end-of-text suffix; Mixtral: SentencePiece-style BPE with byte
fallback, BOS, unk; older Llama: Metaspace pre-tokenizer and decoder) it trains a small BPE on a
multilingual corpus, writes tokenizer.json, and checks known texts (ASCII, accents precomposed and
decomposed, CJK, emoji, whitespace runs, contractions, digits, special tokens in the text) and
random texts drawn from the seed: ids equal to the reference's, and decoding gives back the text's
bytes (the reference's decoding for texts the style does not keep exactly)."""
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import unicodedata

MOE = sys.argv[1]
SEED = int(sys.argv[2]) if len(sys.argv) > 2 else int.from_bytes(os.urandom(4), "little")
WORK = tempfile.mkdtemp(prefix="moe-tokenizers-")
rng = random.Random(SEED)
print("seed %d" % SEED)


def bytes_to_unicode():
    """GPT-2's printable stand-ins for bytes."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


B2U = bytes_to_unicode()
U2B = {v: k for k, v in B2U.items()}


def is_letter(c):
    return unicodedata.category(c).startswith("L")


def is_number(c):
    return unicodedata.category(c).startswith("N")


def is_space(c):
    return c in " \t\n\r\x0b\x0c\x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000" or "\u2000" <= c <= "\u200a"


def is_other(c):
    return not (is_space(c) or is_letter(c) or is_number(c))


def run(s, i, pred):
    while i < len(s) and pred(s[i]):
        i += 1
    return i


CONTRACTIONS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d"]


def space_tail(s, i):
    """\\s+(?!\\S) then \\s+ at a whitespace character."""
    k = run(s, i, is_space)
    if k == len(s) or k - i < 2:
        return k
    return k - 1


def gpt2_split(s):
    """'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"""
    out, i = [], 0
    while i < len(s):
        j = None
        for c in CONTRACTIONS:
            if s.startswith(c, i):
                j = i + len(c)
                break
        if j is None:
            k = i + 1 if s[i] == " " and i + 1 < len(s) else i
            for pred in (is_letter, is_number, is_other):
                if pred(s[k]):
                    j = run(s, k, pred)
                    break
        if j is None:
            j = space_tail(s, i)
        out.append(s[i:j])
        i = j
    return out


def qwen2_split(s):
    """(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|
    \\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"""
    out, i = [], 0
    while i < len(s):
        j = None
        for c in CONTRACTIONS:
            if s[i:i + len(c)].lower() == c:
                j = i + len(c)
                break
        if j is None and s[i] not in "\r\n" and not is_letter(s[i]) and not is_number(s[i]) \
                and i + 1 < len(s) and is_letter(s[i + 1]):
            j = run(s, i + 1, is_letter)
        if j is None and is_letter(s[i]):
            j = run(s, i, is_letter)
        if j is None and is_number(s[i]):
            j = i + 1
        if j is None:
            k = i + 1 if s[i] == " " and i + 1 < len(s) and is_other(s[i + 1]) else i
            if is_other(s[k]):
                j = run(s, run(s, k, is_other), lambda c: c in "\r\n")
        if j is None:
            k = run(s, i, is_space)
            last_nl = max((p for p in range(i, k) if s[p] in "\r\n"), default=None)
            j = last_nl + 1 if last_nl is not None else space_tail(s, i)
        out.append(s[i:j])
        i = j
    return out


class Style:
    """One tokenizer configuration: how text becomes words, how tokens become text."""

    def __init__(self, name):
        self.name = name
        self.byte_level = name in ("qwen2", "neox")
        self.added = {"qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                      "neox": ["<|endoftext|>", "<|padding|>"],
                      "mixtral": ["<unk>", "<s>", "</s>"],
                      "llama": ["<unk>", "<s>", "</s>"]}[name]

    def words(self, segment, first):
        """Normaliser and pre-tokeniser of one segment between added tokens."""
        if self.name == "qwen2":
            seg = unicodedata.normalize("NFC", segment)
            return ["".join(B2U[b] for b in w.encode()) for w in qwen2_split(seg)]
        if self.name == "neox":
            seg = unicodedata.normalize("NFC", segment)
            return ["".join(B2U[b] for b in w.encode()) for w in gpt2_split(seg)]
        if self.name == "mixtral":  # Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer
            return ["▁" + segment.replace(" ", "▁")] if segment else []
        # llama: Metaspace(prepend_scheme first, split true); empty segments give nothing
        seg = segment.replace(" ", "▁")
        if not seg:
            return []
        if first and not seg.startswith("▁"):
            seg = "▁" + seg
        out, cur = [], ""
        for c in seg:
            if c == "▁" and cur:
                out.append(cur)
                cur = ""
            cur += c
        return out + ([cur] if cur else [])


def train(style, corpus, n_merges):
    """A small BPE: the base alphabet, then the most frequent adjacent pairs."""
    counts = {}
    for text in corpus:
        for w in style.words(text, True):
            counts[w] = counts.get(w, 0) + 1
    if style.byte_level:
        alphabet = [B2U[b] for b in range(256)]
    else:  # characters seen (minus a few, to exercise byte fallback), bytes, unk and friends
        seen = sorted({c for w in counts for c in w})
        alphabet = [c for c in seen if c not in "æøß"]
    vocab = {}
    if not style.byte_level:
        for t in style.added:
            vocab[t] = len(vocab)
        if style.name == "mixtral":
            for b in range(256):
                vocab["<0x%02X>" % b] = len(vocab)
    for c in alphabet:
        vocab.setdefault(c, len(vocab))
    words = {tuple(c for c in w): n for w, n in counts.items()}
    merges = []
    for _ in range(n_merges):
        pairs = {}
        for w, n in words.items():
            for a, b in zip(w, w[1:]):
                if a in vocab and b in vocab:
                    pairs[(a, b)] = pairs.get((a, b), 0) + n
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        new = {}
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new[tuple(out)] = new.get(tuple(out), 0) + n
        words = new
    return vocab, merges


def tokenizer_json(style, vocab, merges):
    """The file's JSON; vocab gains the added tokens (byte-level styles: outside the model's
    vocabulary, as Qwen's files have them)."""
    model_vocab = dict(vocab)
    added = []
    for t in style.added:
        if t not in vocab:
            vocab[t] = len(vocab)
        added.append({"id": vocab[t], "content": t, "single_word": False, "lstrip": False,
                      "rstrip": False, "normalized": False, "special": True})
    bl = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
          "use_regex": False}
    model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
             "vocab": model_vocab}
    # half the styles write merges as "a b", the others as pairs (newer files)
    model["merges"] = [a + " " + b for a, b in merges] if style.name in ("qwen2", "mixtral") \
        else [[a, b] for a, b in merges]
    j = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
         "model": model}
    if style.name == "qwen2":
        pat = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+"
               "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
        j["normalizer"] = {"type": "NFC"}
        j["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pat}, "behavior": "Isolated", "invert": False},
            bl]}
        j["post_processor"] = bl
        j["decoder"] = bl
    elif style.name == "neox":
        j["normalizer"] = {"type": "NFC"}
        j["pre_tokenizer"] = dict(bl, use_regex=True)
        j["post_processor"] = {"type": "TemplateProcessing",
                               "single": [{"Sequence": {"id": "A", "type_id": 0}},
                                          {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}],
                               "special_tokens": {"<|endoftext|>": {
                                   "id": "<|endoftext|>", "ids": [vocab["<|endoftext|>"]],
                                   "tokens": ["<|endoftext|>"]}}}
        j["decoder"] = bl
    else:
        model.update(unk_token="<unk>", fuse_unk=True, byte_fallback=style.name == "mixtral")
        j["post_processor"] = {"type": "TemplateProcessing",
                               "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                          {"Sequence": {"id": "A", "type_id": 0}}],
                               "special_tokens": {"<s>": {"id": "<s>", "ids": [1],
                                                          "tokens": ["<s>"]}}}
        if style.name == "mixtral":
            j["normalizer"] = {"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
            j["pre_tokenizer"] = None
            j["decoder"] = {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
        else:
            ms = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": True}
            j["normalizer"] = None
            j["pre_tokenizer"] = ms
            j["decoder"] = ms
    return j


def bpe(word, vocab, ranks, style):
    """Merge the lowest-ranked adjacent pair (leftmost first) until none is left."""
    syms = []
    for c in word:
        if c in vocab:
            syms.append(c)
        elif style.name == "mixtral" and all("<0x%02X>" % b in vocab for b in c.encode()):
            syms += ["<0x%02X>" % b for b in c.encode()]
        elif syms and syms[-1].startswith("<unk>") and "<unk>" in vocab:
            syms[-1] += c  # fused unknowns: one token
        else:
            syms.append("<unk>" + c)
    while True:
        best = None
        for i in range(len(syms) - 1):
            r = ranks.get((syms[i], syms[i + 1]))
            if r is not None and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            break
        i = best[1]
        syms[i:i + 2] = [syms[i] + syms[i + 1]]
    return [vocab["<unk>"] if s.startswith("<unk>") else vocab[s] for s in syms]


def encode(style, vocab, ranks, text):
    ids, at = [], 0
    while at <= len(text):
        hits = [(text.find(t, at), -len(t), t) for t in style.added if text.find(t, at) >= 0]
        pos, _, tok = min(hits) if hits else (len(text), 0, None)
        for w in style.words(text[at:pos], at == 0):
            ids += bpe(w, vocab, ranks, style)
        if tok is None:
            break
        ids.append(vocab[tok])
        at = pos + len(tok)
    if style.name == "neox":
        ids.append(vocab["<|endoftext|>"])
    if style.name in ("mixtral", "llama"):
        ids = [1] + ids
    return ids


def decode(style, inv, ids):
    toks = [inv[i] for i in ids]
    if style.byte_level:
        out = b""
        for t in toks:
            out += bytes(U2B[c] for c in t) if all(c in U2B for c in t) else t.encode()
        return out
    if style.name == "mixtral":
        text, pending = "", b""
        for t in toks + [None]:
            if t is not None and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                pending += bytes([int(t[3:5], 16)])
                continue
            if pending:
                try:
                    text += pending.decode()
                except UnicodeDecodeError:
                    text += "\ufffd" * len(pending)
                pending = b""
            if t is not None:
                text += t.replace("▁", " ")
        return (text[1:] if text.startswith(" ") else text).encode()
    return "".join(t.replace("▁", "") if i == 0 else t.replace("▁", " ")
                   for i, t in enumerate(toks)).encode()


CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 2026 and we're testing tokenizers!",
    "Mixture-of-Experts models route each token to k of E experts; top-2 routing is common.",
    "Ça coûte 12,50 €. Où est la gare ? Éléphant, naïve, façade, crème brûlée.",
    "Straße, Ærø, smørrebrød, Ångström — München ist schön. Übermäßig große Äpfel.",
    "混合专家模型把每个词元分配给少数专家。東京は日本の首都です。한국어 문장도 있습니다.",
    "Emoji: 😀🎉🚀 and 👍🏽 with skin tones, 🇫🇷 flags, ❤️ hearts.",
    "def f(x):\n    return x ** 2  # squares\n\n\nprint(f(3))\t\tdone",
    "I'M SURE THEY'LL COME; YOU'VE SEEN IT, HAVEN'T YOU? We'd go, she's here.",
    "Numbers: 3.14159, 2718281828, 1e-5, 0x1F, 1,000,000 and 42nd street.",
    "Привет, мир! Γειά σου κόσμε. مرحبا بالعالم. שלום עולם. नमस्ते दुनिया।",
]

KNOWN = [
    "Hello world",
    "Hello, world! It's a test.",
    "I'M SURE YOU'LL SEE; we'd've",
    "café crème brûlée",
    "cafe\u0301 and cre\u0300me (decomposed accents)",
    "東京は日本の首都です",
    "混合专家模型",
    "😀🎉🚀👍🏽",
    "a   b    c",
    "  leading and trailing  ",
    "tabs\tand\nnewlines\n\n\nhere\r\n",
    "x\n  y",
    "12345 67 8",
    "Straße smørrebrød Ærø",
    "<|im_start|>user\nHi there<|im_end|>",
    "text<|endoftext|>more",
    "<s>start and </s> end",
    " single leading space",
]

POOL = ("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?'\"-_()[]{}"
        "éèêàçñöüßæøÅΩπДжяあいう漢字中文한국😀🎉\t\n  ")


def random_text(r):
    n = r.randint(1, 40)
    s = "".join(r.choice(POOL) for _ in range(n))
    if r.random() < 0.3:
        s = s.replace(" ", "'s ")
    return s


def moe(*args):
    p = subprocess.run([MOE, "tokenize", *args], capture_output=True)
    if p.returncode != 0:
        raise SystemExit("FAIL: moe tokenize %s: %s" % (args, p.stderr.decode(errors="replace")))
    assert p.stdout.endswith(b"\n")
    return p.stdout[:-1]


def check_style(name):
    style = Style(name)
    vocab, merges = train(style, CORPUS, 250)
    j = tokenizer_json(style, vocab, merges)
    d = write(name, j)
    ranks = {m: i for i, m in enumerate(merges)}
    inv = {i: t for t, i in vocab.items()}
    texts = KNOWN + [random_text(rng) for _ in range(25)]
    multi = 0
    for text in texts:
        want = encode(style, vocab, ranks, text)
        got = [int(x) for x in moe("--model", d, "--prompt", text).split(b",")]
        if got != want:
            raise SystemExit("FAIL %s: %r encodes to\n  %s\nreference\n  %s\n(seed %d)" % (
                name, text, got, want, SEED))
        multi += sum(len(inv[i]) > 1 for i in got)
        back = moe("--model", d, "--ids", ",".join(map(str, got)))
        want_text = decode(style, inv, want)
        if back != want_text:
            raise SystemExit("FAIL %s: %r decodes to %r, reference %r (seed %d)" % (
                name, text, back, want_text, SEED))
        # lossless: byte-level (after NFC), and byte fallback on a text without added tokens
        exact = {"qwen2": unicodedata.normalize("NFC", text).encode(),
                 "neox": unicodedata.normalize("NFC", text).encode() + b"<|endoftext|>",
                 "mixtral": b"<s> " + text.encode()}.get(name)
        plain = not any(t in text for t in style.added)
        if exact is not None and (plain or name != "mixtral") and back != exact:
            raise SystemExit("FAIL %s: %r does not decode back to its bytes: %r" % (name, text, back))
    assert multi > len(texts), "%s: too few merged tokens (%d) to test the merges" % (name, multi)
    print("%s: %d texts (%d known, %d random), %d merges, vocabulary %d: ids and decoding equal "
          "the reference" % (name, len(texts), len(KNOWN), len(texts) - len(KNOWN), len(merges),
                             len(vocab)))


def write(name, j):
    d = os.path.join(WORK, name)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(j if isinstance(j, str) else json.dumps(j, ensure_ascii=False))
    return d


def check_hand():
    """A vocabulary small enough to work out by hand: merges "b c" (rank 0), "a b", "a bc"; words
    split at spaces (removed); no decoder, so tokens are joined with spaces."""
    d = write("hand", {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "c": 2, "bc": 3, "ab": 4,
                                                         "abc": 5},
                                 "merges": ["b c", "a b", "a bc"]},
                       "pre_tokenizer": {"type": "Split", "pattern": {"String": " "},
                                         "behavior": "Removed", "invert": False}})
    # abc: (b,c) first -> a bc -> abc. ab -> ab. cab: c ab. abcbc: a bc b c -> a bc bc -> abc bc.
    for text, want in [("abc ab cab", b"5,4,2,4"), ("abcbc", b"5,3"), ("cba", b"2,1,0")]:
        got = moe("--model", d, "--prompt", text)
        assert got == want, (text, got, want)
    assert moe("--model", d, "--ids", "5,4,2,4") == b"abc ab c ab"
    # an id without a token (a model's padded vocabulary: here 6..8 below the added 9) is dropped
    j = json.load(open(os.path.join(d, "tokenizer.json")))
    j["added_tokens"] = [{"id": 9, "content": "<e>", "special": True}]
    d = write("hole", j)
    assert moe("--model", d, "--ids", "5,7,4,9") == b"abc ab <e>"
    print("hand-worked vocabulary: ids and decoding as worked out")


def check_deepseek():
    """DeepSeek-V3's kind of pre-tokenizer: digits in runs of at most three, CJK runs apart, then
    GPT-2's split, byte-level BPE: lossless, and no token holds more than three digits."""
    style = Style("neox")  # trained on GPT-2's split: merges across long digit runs
    vocab, merges = train(style, CORPUS + ["a1234567890," * 20], 250)
    assert any(sum(c.isdigit() for c in t) > 3 for t in vocab), "no long digit tokens to refuse"
    j = tokenizer_json(Style("qwen2"), vocab, merges)
    j["normalizer"] = None
    j["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\p{N}{1,3}"}, "behavior": "Isolated", "invert": False},
        {"type": "Split", "pattern": {"Regex": "[一-龥\u3040-ゟ゠-ヿ]+"}, "behavior": "Isolated",
         "invert": False},
        {"type": "Split", "pattern": {"Regex": GPT2}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}
    d = write("deepseek", j)
    inv = {i: t for t, i in vocab.items()}
    for text in KNOWN + ["1234567890 12 123456"] + [random_text(rng) for _ in range(20)]:
        ids = moe("--model", d, "--prompt", text)
        assert moe("--model", d, "--ids", ids.decode()) == text.encode(), text
        for i in ids.split(b","):
            tok = bytes(U2B[c] for c in inv[int(i)]) if all(c in U2B for c in inv[int(i)]) else b""
            assert sum(c in b"0123456789" for c in tok) <= 3, (text, tok)
    print("DeepSeek-style pre-tokenizer: lossless, digit runs of at most three")


GPT2 = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"


def check_malformed():
    """Bad files: one line naming the problem, exit 1, no crash."""
    good = open(os.path.join(WORK, "hand", "tokenizer.json"), encoding="utf-8").read()
    j = json.loads(good)
    cases = {
        "truncated": (good[:len(good) // 2], "not valid JSON"),
        "unigram": (json.dumps(dict(j, model=dict(j["model"], type="Unigram"))), "BPE only"),
        "merge": (json.dumps(dict(j, model=dict(j["model"], merges=["b x"]))), "not in the vocabulary"),
        "pair": (json.dumps(dict(j, model=dict(j["model"], merges=[["a"]]))), "neither"),
        "duplicate id": (good.replace('"abc": 5', '"abc": 4'), "id 4 given to"),
        "negative id": (good.replace('"abc": 5', '"abc": -5'), "no id in"),
        "pre-tokenizer": (json.dumps(dict(j, pre_tokenizer={"type": "Punctuation"})),
                          'pre_tokenizer "Punctuation" is not supported'),
        "regex": (json.dumps(dict(j, pre_tokenizer={"type": "Split", "pattern": {"Regex": "(a"},
                                                    "behavior": "Isolated"})), "missing closing"),
        "behavior": (json.dumps(dict(j, pre_tokenizer={"type": "Split", "pattern": {"String": "a"},
                                                       "behavior": "Sideways"})), "Sideways"),
        "post": (json.dumps(dict(j, post_processor={"type": "TemplateProcessing", "single": [
            {"SpecialToken": {"id": "<s>"}}, {"Sequence": {"id": "A"}}], "special_tokens": {}})),
            "has no ids"),
        "no vocab": (json.dumps({"model": {"type": "BPE"}}), "no model vocabulary"),
    }
    for name, (text, want) in cases.items():
        d = write("bad", text)
        p = subprocess.run([MOE, "tokenize", "--model", d, "--prompt", "abc"], capture_output=True)
        err = p.stderr.decode(errors="replace")
        if p.returncode != 1 or err.count("\n") != 1 or want not in err:
            raise SystemExit("FAIL malformed %s: exit %d, %r" % (name, p.returncode, err))
    print("%d malformed tokenizer.json files refused with one line each" % len(cases))


try:
    for style_name in ("qwen2", "neox", "mixtral", "llama"):
        check_style(style_name)
    check_hand()
    check_deepseek()
    check_malformed()
finally:
    shutil.rmtree(WORK)
