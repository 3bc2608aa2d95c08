#!/usr/bin/env python3
"""Writes the GPT-NeoX-20B tokenizer goldens used by tests/model/tokenizer_test.cc.

The encodings come from the HF `tokenizers` package (the reference implementation), which lives only
on the lent GPU machine. Regenerate with (from the repo root, on a machine that has `tokenizers`):

  mkdir -p .bundle/tok && cp ../shared/data/gpt-neox-20b/tokenizer.json .bundle/tok/
  python3 scripts/make_tokenizer_goldens.py --tokenizer .bundle/tok/tokenizer.json \
      --cases tests/fixtures/tokenizer/cases.json --out tests/fixtures/tokenizer

(through the device tool: carry [".bundle"], pass --out "$OUT", then copy the two files back.)

Outputs:
  neox_golden.json       one entry per case in cases.json: text, ids, tokens, decode, roundtrip.
  neox_fuzz_golden.json  N random strings from a fixed-seed mix of scripts, whitespace, digits,
                         punctuation, combining marks and special tokens: text, ids, decode.
"""
import argparse
import hashlib
import json
import os
import random
import sys

FUZZ_SEED = 20240601
FUZZ_COUNT = 400

# Pieces the fuzzer glues together; chosen to hit every branch of the GPT-2 split regex, NFC,
# the added whitespace tokens and the special tokens.
FUZZ_PIECES = (
    list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    + list(" " * 12) + ["\t", "\n", "\r\n", "\n\n", "  ", "    "]
    + list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
    + ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL"]
    + ["\u00e9", "e\u0301", "\u00fc", "u\u0308", "\u0301", "\u0308", "\u0323", "\u212b", "\u2126",
       "\u00df", "\u00f1", "n\u0303", "\u0130", "\u0131"]
    + ["\u4e2d", "\u6587", "\u3002", "\u3053", "\u30ab", "\u304b\u3099", "\ud55c", "\u1100\u1161",
       "\u11a8"]
    + ["\u043f", "\u0440", "\u0438", "\u0439", "\u0438\u0306", "\u0627", "\u0644", "\u0661",
       "\u05e9", "\u0928", "\u094d", "\u0e2a", "\u0e31"]
    + ["\U0001f600", "\U0001f468\u200d\U0001f469", "\u2764\ufe0f", "\U0001f44d\U0001f3fd",
       "\U0001f1fa\U0001f1f8", "\u200d", "\ufe0f", "\u200b", "\ufeff"]
    + ["\u00a0", "\u3000", "\u2009", "\u2028", "\u0085", "\u000b", "\u000c", "\x00", "\x7f"]
    + ["\u00bd", "\u00b2", "\u2160", "\uff11", "\U0001d400", "\U00020000", "\ufb01"]
    + ["<|endoftext|>", "<|padding|>", "<|endof", "|>", "<|"]
)


def fuzz_strings():
    rng = random.Random(FUZZ_SEED)
    out = []
    for i in range(FUZZ_COUNT):
        n = rng.randint(1, 40 if i % 10 else 200)
        out.append("".join(rng.choice(FUZZ_PIECES) for _ in range(n)))
    return out


def encode_all(tok, texts, with_tokens):
    rows = []
    for text in texts:
        enc = tok.encode(text)
        ids = list(enc.ids)
        decoded = tok.decode(ids, skip_special_tokens=False)
        row = {"text": text, "ids": ids, "decode": decoded, "roundtrip": decoded == text}
        if with_tokens:
            row["tokens"] = list(enc.tokens)
        rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", required=True, help="path to the GPT-NeoX-20B tokenizer.json")
    ap.add_argument("--cases", required=True, help="tests/fixtures/tokenizer/cases.json")
    ap.add_argument("--out", required=True, help="folder for neox_golden.json and neox_fuzz_golden.json")
    args = ap.parse_args()

    import tokenizers  # imported late so --help works without it

    with open(args.tokenizer, "rb") as f:
        raw = f.read()
    sha = hashlib.sha256(raw).hexdigest()
    tok = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
    with open(args.cases, encoding="utf-8") as f:
        cases = json.load(f)["cases"]

    meta = {"generator": "scripts/make_tokenizer_goldens.py",
            "tokenizers_version": tokenizers.__version__,
            "tokenizer_json_sha256": sha}
    rows = encode_all(tok, [c["text"] for c in cases], with_tokens=True)
    for c, r in zip(cases, rows):
        r["name"] = c["name"]
    fuzz = encode_all(tok, fuzz_strings(), with_tokens=False)

    os.makedirs(args.out, exist_ok=True)
    for name, body in (("neox_golden.json", rows), ("neox_fuzz_golden.json", fuzz)):
        with open(os.path.join(args.out, name), "w", encoding="utf-8") as f:
            json.dump(dict(meta, cases=body), f, ensure_ascii=True, indent=1)
            f.write("\n")
    bad = [r["name"] for r in rows if not r["roundtrip"]]
    print(f"tokenizers {tokenizers.__version__}: {len(rows)} cases ({len(bad)} not round-tripping: "
          f"{bad}), {len(fuzz)} fuzz strings "
          f"({sum(not r['roundtrip'] for r in fuzz)} not round-tripping)")


if __name__ == "__main__":
    sys.exit(main())
