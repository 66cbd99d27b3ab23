#!/usr/bin/env python3
"""Train the toy world's byte-level BPE tokenizer (Python standard library only).

    python3 data/train_tokenizer.py CORPUS.jsonl OUT/tokenizer.json [--vocab 2048]

The result is a Hugging Face style tokenizer.json with exactly the structure of
Llama-3's: byte-level BPE, the Llama-3 pre-tokenizer regex, `ignore_merges`,
and the 256 Llama-3 special tokens (<|begin_of_text|>, <|eot_id|>, ...) placed
after the learned vocabulary. So `export.py tokenizer` converts it and the C
tokenizer in tokenizer.c encodes with it unchanged: one tokenizer code path serves
the real model and the toy.

Training is the classic BPE loop (Sennrich et al. 2016, byte-level as in
GPT-2): split the text into pre-tokens, count them, then repeatedly merge the
most frequent adjacent pair of symbols, ties broken by the pair's bytes so the
result is deterministic.

Python's `re` has no \\p{L}/\\p{N}, so pre-tokenizing here uses close stand-ins
(letters = [^\\W\\d_], numbers = \\d). That only affects which merges are
learned; encoding always uses the exact regex in C.
"""
import argparse
import collections
import json
import os
import re
import sys

LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# the same pattern with Python-re classes: L = [^\W\d_], N = \d
PY_PRETOKENIZER = re.compile(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
    r"|(?:[^\r\n\w]|_)?[^\W\d_]+"
    r"|\d{1,3}"
    r"| ?(?:[^\s\w]|_)+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+")

LLAMA3_SPECIAL = (["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>",
                   "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
                  + ["<|reserved_special_token_%d|>" % i for i in range(3, 248)])


def bytes_to_unicode():
    """GPT-2's byte -> printable character table used by byte-level BPE files:
    printable Latin-1 bytes map to themselves, the rest to U+0100 onwards."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def corpus_texts(path):
    """Every string a model will read: plain texts, chat contents, role names."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            ex = json.loads(line)
            if "text" in ex:
                yield ex["text"]
            for m in ex.get("messages", []):
                yield m["role"]
                yield "\n\n" + m["content"].strip()


def train(texts, n_merges):
    words = collections.Counter()
    for t in texts:
        for piece in PY_PRETOKENIZER.findall(t):
            words[piece.encode("utf-8")] += 1
    # each word is a tuple of symbols (bytes objects), with its count
    vocab = {tuple(bytes([b]) for b in w): c for w, c in words.items()}
    merges = []
    for step in range(n_merges):
        pairs = collections.Counter()
        for symbols, c in vocab.items():
            for a, b in zip(symbols, symbols[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        # most frequent; ties by the bytes themselves so runs are reproducible
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0][0] + b"\x00" + kv[0][1]))[0]
        merges.append(best)
        merged = best[0] + best[1]
        new_vocab = {}
        for symbols, c in vocab.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == best[0] and symbols[i + 1] == best[1]:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            new_vocab[tuple(out)] = new_vocab.get(tuple(out), 0) + c
        vocab = new_vocab
        if (step + 1) % 256 == 0:
            print("merge %d/%d: %r (count %d)" % (step + 1, n_merges, merged, pairs[best]), file=sys.stderr)
    return merges


def write_tokenizer_json(merges, out_path):
    b2u = bytes_to_unicode()
    enc = lambda bs: "".join(b2u[b] for b in bs)
    vocab = {enc(bytes([b])): b for b in range(256)}
    for a, b in merges:
        vocab[enc(a + b)] = len(vocab)
    n = len(vocab)
    added = [{"id": n + i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, s in enumerate(LLAMA3_SPECIAL)]
    tj = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": True, "vocab": vocab,
                  "merges": [enc(a) + " " + enc(b) for a, b in merges]},
    }
    tmp = out_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(tj, f, ensure_ascii=False, indent=1)
    os.replace(tmp, out_path)
    return n + len(LLAMA3_SPECIAL)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("corpus", help="corpus.jsonl from data/gen_toy.py")
    ap.add_argument("out", help="tokenizer.json to write")
    ap.add_argument("--vocab", type=int, default=2048,
                    help="total vocabulary incl. 256 bytes and 256 specials (default 2048)")
    args = ap.parse_args()
    n_merges = args.vocab - 256 - len(LLAMA3_SPECIAL)
    if n_merges < 1:
        sys.exit("error: --vocab must exceed 512 (256 bytes + 256 special tokens)")
    merges = train(corpus_texts(args.corpus), n_merges)
    total = write_tokenizer_json(merges, args.out)
    print("wrote %s: %d merges, vocab %d" % (args.out, len(merges), total), file=sys.stderr)


if __name__ == "__main__":
    main()
