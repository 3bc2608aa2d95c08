"""Synthetic long-context tasks for training the byte-level demo RAMba (ramba-tiny).

Every sample is a byte string of exactly `length + 1` bytes (token id = byte) with a per-target
weight class: for target position i (predicting byte i+1 from bytes 0..i), `answer[i]` is True
when byte i+1 belongs to an answer the model must retrieve. The trainer puts most of the loss on
answer targets.

Tasks
  * passkey: a needle holding a random key (digits, letters, alphanumerics, hex, grouped or
    word-number keys) hidden at a uniformly random depth of a filler haystack (random bytes,
    random printable text, repeated classic sentences, generated sentences, Python stdlib text,
    or a mix), then a question; the answer is " {key}." (or the template's variant). Several
    needle/question templates, the classic one among them.
  * kv: multi-query key-value recall: many "key: value" pairs (varied syntax and separators,
    optionally interleaved with filler), a filler gap, then queries "key: " whose answers are
    the values.

Deterministic: everything is drawn from the `random.Random` passed in.
"""
import os
import random
import sysconfig

import numpy as np

# --------------------------------------------------------------------------------------------
# Filler
# --------------------------------------------------------------------------------------------

CLASSIC_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
                  "There and back again. ")

WORDS = ("time person year way day thing man world life hand part child eye woman place work week "
         "case point government company number group problem fact river garden window table paper "
         "market letter music story city morning island forest bridge kitchen engine station road "
         "mountain winter summer library doctor teacher farmer driver painter sailor student "
         "village harbor castle lantern candle mirror blanket basket bottle ladder pencil hammer "
         "rabbit horse eagle salmon tiger falcon dolphin spider beetle").split()
ADJS = ("old new small large quiet loud bright dark warm cold green blue red yellow heavy light "
        "ancient modern simple strange gentle busy empty narrow wide silent golden wooden").split()
VERBS = ("sees finds builds carries opens paints watches follows reads writes visits cleans moves "
         "repairs sells buys draws counts measures remembers forgets").split()
PLACES = ("near the river", "in the morning", "after the storm", "by the old bridge",
          "at the market", "under the trees", "before dinner", "during the winter",
          "on the hill", "across the street", "in the library", "at the harbor")
SENTENCE_FORMS = (
    "The {a} {n} {v} the {a2} {n2} {p}.",
    "A {n} {v} a {a} {n2}.",
    "Every {n} {v} the {n2} {p}.",
    "{N} and {n2} are {a}.",
    "Nobody knows why the {n} is so {a}.",
    "The {n} was {a} {p}, and the {n2} was {a2}.",
    "Yesterday the {n} {v} {num} {n2}s {p}.",
    "Is the {n} {a}? Perhaps, {p}.",
)

_STDLIB_TEXT = None


def stdlib_text(max_bytes=6_000_000):
    """ASCII text of the running Python's standard library sources (a plain-text corpus that
    exists on every host with Python): used as one kind of filler. Deterministic per host."""
    global _STDLIB_TEXT
    if _STDLIB_TEXT is not None:
        return _STDLIB_TEXT
    root = sysconfig.get_paths().get("stdlib", "")
    chunks, total = [], 0
    if root and os.path.isdir(root):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in ("test", "tests", "site-packages",
                                                                   "dist-packages", "__pycache__",
                                                                   "idle_test", "lib2to3"))
            for fn in sorted(filenames):
                if not fn.endswith(".py"):
                    continue
                try:
                    with open(os.path.join(dirpath, fn), "rb") as f:
                        b = f.read()
                except OSError:
                    continue
                b = bytes(c for c in b if 9 <= c < 127)
                chunks.append(b)
                total += len(b)
                if total >= max_bytes:
                    break
            if total >= max_bytes:
                break
    text = b"\n".join(chunks)
    if len(text) < 100_000:  # no stdlib sources: fall back to generated sentences
        text = b""
    _STDLIB_TEXT = text
    return text


def gen_sentences(rng, n):
    out, size = [], 0
    while size < n:
        form = rng.choice(SENTENCE_FORMS)
        noun = rng.choice(WORDS)
        s = form.format(a=rng.choice(ADJS), a2=rng.choice(ADJS), n=noun, N=noun.capitalize(),
                        n2=rng.choice(WORDS), v=rng.choice(VERBS), p=rng.choice(PLACES),
                        num=rng.randint(2, 99))
        s = s[0].upper() + s[1:] + rng.choice((" ", " ", " ", "\n"))
        out.append(s)
        size += len(s)
    return "".join(out).encode()[:n]


PRINTABLE = bytes(range(32, 127)) + b"\n"


def filler(rng, n, kind=None):
    """n bytes of haystack filler of a random (or given) kind."""
    if n <= 0:
        return b""
    kinds = ("classic", "sentences", "stdlib", "printable", "bytes", "mixed")
    weights = (3, 3, 3, 1, 1, 4)
    if kind is None:
        kind = rng.choices(kinds, weights)[0]
    if kind == "classic":
        base = CLASSIC_FILLER if rng.random() < 0.7 else gen_sentences(rng, rng.randint(60, 300)).decode()
        reps = n // len(base) + 2
        s = (base * reps).encode()
        off = rng.randrange(len(base)) if rng.random() < 0.5 else 0
        return s[off:off + n]
    if kind == "sentences":
        return gen_sentences(rng, n)
    if kind == "stdlib":
        text = stdlib_text()
        if not text:
            return gen_sentences(rng, n)
        start = rng.randrange(max(1, len(text) - n))
        nl = text.find(b"\n", start, start + 200)
        start = nl + 1 if nl >= 0 else start
        s = text[start:start + n]
        return s if len(s) == n else (s + gen_sentences(rng, n - len(s)))
    if kind == "printable":
        nrng = np.random.default_rng(rng.getrandbits(63))
        return bytes(np.frombuffer(PRINTABLE, np.uint8)[nrng.integers(0, len(PRINTABLE), n)])
    if kind == "bytes":
        nrng = np.random.default_rng(rng.getrandbits(63))
        return nrng.integers(0, 256, n, dtype=np.uint8).tobytes()
    # mixed: segments of the other kinds
    parts, size = [], 0
    while size < n:
        m = min(n - size, rng.randint(100, 1200))
        parts.append(filler(rng, m, rng.choices(kinds[:-1], (3, 3, 3, 1, 1))[0]))
        size += m
    return b"".join(parts)[:n]


# --------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------

DIGITS = "0123456789"
LOWER = "abcdefghijklmnopqrstuvwxyz"
UPPER = LOWER.upper()
KEY_FORMATS = ("digits", "lower", "upper", "letters", "alnum", "alnum_upper", "hex", "grouped",
               "wordnum")


def make_key(rng, fmt=None):
    if fmt is None:
        fmt = rng.choice(KEY_FORMATS)
    n = rng.randint(4, 10)
    if fmt == "digits":
        return "".join(rng.choice(DIGITS) for _ in range(n))
    if fmt == "lower":
        return "".join(rng.choice(LOWER) for _ in range(n))
    if fmt == "upper":
        return "".join(rng.choice(UPPER) for _ in range(n))
    if fmt == "letters":
        return "".join(rng.choice(LOWER + UPPER) for _ in range(n))
    if fmt == "alnum":
        return "".join(rng.choice(LOWER + UPPER + DIGITS) for _ in range(n))
    if fmt == "alnum_upper":
        return "".join(rng.choice(UPPER + DIGITS) for _ in range(n))
    if fmt == "hex":
        h = "0123456789abcdef" if rng.random() < 0.6 else "0123456789ABCDEF"
        return "".join(rng.choice(h) for _ in range(n))
    if fmt == "grouped":  # 2-3 groups of 2-4 digits or alnum, joined by '-' or '_'
        alpha = DIGITS if rng.random() < 0.6 else UPPER + DIGITS
        sep = rng.choice("-_")
        return sep.join("".join(rng.choice(alpha) for _ in range(rng.randint(2, 4)))
                        for _ in range(rng.randint(2, 3)))
    if fmt == "wordnum":
        return rng.choice(WORDS + ADJS) + rng.choice("-_") + "".join(
            rng.choice(DIGITS) for _ in range(rng.randint(2, 6)))
    raise ValueError(fmt)


# --------------------------------------------------------------------------------------------
# Passkey retrieval
# --------------------------------------------------------------------------------------------

# (needle, question, answer); {K} is the key. The answer follows the question directly.
CLASSIC_TEMPLATE = ("The pass key is {K}. Remember it. {K} is the pass key.",
                    "What is the pass key? The pass key is", " {K}.")
PASSKEY_TEMPLATES = (
    CLASSIC_TEMPLATE,
    ("The secret code is {K}. Do not forget the secret code.",
     "What is the secret code? The secret code is", " {K}."),
    ("Remember this magic number: {K}. The magic number is {K}.",
     "What was the magic number? The magic number is", " {K}."),
    ("[note] The access token for the vault is {K}. [end of note]",
     "Q: What is the access token for the vault?\nA: The access token is", " {K}."),
    ("The special key is {K}. I repeat, the special key is {K}.",
     "Tell me the special key. The special key is", " {K}."),
    ("password={K}", "Recall the password.\npassword=", "{K}\n"),
    ("My locker combination is {K}. Keep it safe.",
     "What is my locker combination? It is", " {K}."),
    ("The pass key is {K}.", "What is the pass key? The pass key is", " {K}."),
)
INTROS = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n",
    "Below is a long document. Somewhere inside it is a key. Remember it.\n",
    "Read the following notes carefully.\n",
)


def _answer_mask(length, spans):
    """Targets i (predicting byte i+1) whose byte lies in one of the [a, b) byte spans."""
    m = np.zeros(length, dtype=bool)
    for a, b in spans:
        a, b = max(a, 1), min(b, length + 1)
        if b > a:
            m[a - 1:b - 1] = True
    return m


def passkey_sample(rng, length, template=None, key_fmt=None, depth=None, filler_kind=None):
    """-> (bytes of length+1, answer mask [length], info dict with the answer byte span)."""
    if template is None:
        template = CLASSIC_TEMPLATE if rng.random() < 0.4 else rng.choice(PASSKEY_TEMPLATES)
    needle_t, question, answer_t = template
    key = make_key(rng, key_fmt)
    intro = rng.choice(INTROS).encode() if rng.random() < 0.5 and length >= 1024 else b""
    needle = (rng.choice((" ", "\n", " ", "")) + needle_t.format(K=key) + rng.choice((" ", "\n", " "))).encode()
    q = (rng.choice(("\n", "\n", " ", "\n\n")) + question).encode()
    ans = answer_t.format(K=key).encode()
    fixed = len(intro) + len(needle) + len(q) + len(ans)
    total_filler = length + 1 - fixed
    if total_filler < 0:
        raise ValueError(f"length {length} too short for the passkey sample")
    hay = filler(rng, total_filler, filler_kind)
    d = rng.random() if depth is None else depth
    cut = int(round(d * total_filler))
    seq = intro + hay[:cut] + needle + hay[cut:] + q + ans
    assert len(seq) == length + 1, (len(seq), length)
    a0 = len(seq) - len(ans)
    info = {"key": key, "answer_span": (a0, len(seq)), "needle_pos": len(intro) + cut,
            "depth": d}
    return seq, _answer_mask(length, [(a0, len(seq))]), info


# --------------------------------------------------------------------------------------------
# Multi-query key-value recall
# --------------------------------------------------------------------------------------------

KV_SYNTAX = ("{k}: {v}", "{k} = {v}", "{k} -> {v}", "{k}:{v}", "key {k} has value {v}")
KV_SEPS = ("\n", ", ", "; ", " | ", "\n")


def _kv_token(rng, kind):
    if kind == "word":
        return rng.choice(WORDS) + (str(rng.randint(0, 99)) if rng.random() < 0.5 else "")
    if kind == "num":
        return "".join(rng.choice(DIGITS) for _ in range(rng.randint(2, 7)))
    if kind == "lower":
        return "".join(rng.choice(LOWER) for _ in range(rng.randint(3, 7)))
    return "".join(rng.choice(LOWER + DIGITS) for _ in range(rng.randint(3, 7)))


def kv_sample(rng, length):
    """-> (bytes of length+1, answer mask [length], info with the answer byte spans)."""
    syntax = rng.choice(KV_SYNTAX)
    sep = rng.choice(KV_SEPS)
    kkind = rng.choice(("word", "lower", "alnum", "num"))
    vkind = rng.choice(("num", "lower", "alnum", "word"))
    interleave = rng.random() < 0.5
    budget = length + 1
    # about 35-65% of the sequence for the pairs, the rest for a filler gap and queries
    pairs_bytes = int(budget * rng.uniform(0.35, 0.65))
    header = b"Here is a list of keys and values.\n" if rng.random() < 0.5 else b""
    parts, size, pairs, used = [header], len(header), [], set()
    while size < pairs_bytes:
        k = _kv_token(rng, kkind)
        if k in used:
            continue
        used.add(k)
        v = _kv_token(rng, vkind)
        s = (syntax.format(k=k, v=v) + sep).encode()
        parts.append(s)
        size += len(s)
        pairs.append((k, v))
        if interleave and rng.random() < 0.15:
            f = filler(rng, rng.randint(20, max(20, budget // 16))) + sep.encode()
            parts.append(f)
            size += len(f)
    gap = filler(rng, int(budget * rng.uniform(0.02, 0.15)))
    parts.append(gap)
    size += len(gap)
    qhead = rng.choice((b"\nQueries:\n", b"\n", b"\nNow recall the values.\n"))
    parts.append(qhead)
    size += len(qhead)
    spans = []
    # the query prefix is the pair syntax up to the value
    pre_t, post_t = syntax.split("{v}")
    order = []
    while size < budget:
        if not order:  # every pair once (in random order) before any repeats
            order = list(range(len(pairs)))
            rng.shuffle(order)
        k, v = pairs[order.pop()]
        qp = pre_t.format(k=k).encode()
        a = (v + post_t + sep).encode()[: len(v) + 1]  # value and its terminator
        parts.append(qp)
        size += len(qp)
        spans.append((size, size + len(a)))
        parts.append(a)
        size += len(a)
        rest = (post_t + sep).encode()[1:] if len(post_t + sep) > 1 else b""
        parts.append(rest)
        size += len(rest)
    seq = b"".join(parts)[:budget]
    return seq, _answer_mask(length, spans), {"pairs": len(pairs), "queries": len(spans)}


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------

def sample(rng, length, mix=(("passkey", 0.5), ("kv", 0.5))):
    names, w = zip(*mix)
    task = rng.choices(names, w)[0]
    if task == "passkey":
        seq, mask, info = passkey_sample(rng, length)
    elif task == "kv":
        seq, mask, info = kv_sample(rng, length)
    else:
        raise ValueError(task)
    info["task"] = task
    return seq, mask, info


def batch(rng, n, length, mix=(("passkey", 0.5), ("kv", 0.5))):
    """-> tokens uint8 [n, length+1], answer mask bool [n, length], task ids [n] (0 passkey, 1 kv)."""
    toks = np.zeros((n, length + 1), dtype=np.uint8)
    masks = np.zeros((n, length), dtype=bool)
    tasks = np.zeros(n, dtype=np.int64)
    for i in range(n):
        seq, mask, info = sample(rng, length, mix)
        toks[i] = np.frombuffer(seq, dtype=np.uint8)
        masks[i] = mask
        tasks[i] = 0 if info["task"] == "passkey" else 1
    return toks, masks, tasks


if __name__ == "__main__":  # show a few samples
    r = random.Random(0)
    for fn in (passkey_sample, kv_sample):
        s, m, info = fn(r, 700)
        print(info)
        print(s.decode("latin-1"))
        print("ANSWER BYTES:", bytes(b for b, k in zip(s[1:], m) if k))
        print("-" * 80)
