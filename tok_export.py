"""Exports a Hugging Face byte-level BPE tokenizer.json (Llama 3) to the
tokenizer file format of run.h ("ULTK", version 1).

    python3 tok_export.py path/to/tokenizer.json out.tok

export_tokenizer(json_path, out_path) is what `export.py tokenizer` calls.
Standard library only.

What it writes, per run.h:
  - every id 0..max_id: the token's raw bytes. Model vocab entries have
    GPT-2's bytes_to_unicode mapping undone ("Ġ" -> b" "); added tokens are
    their content as UTF-8. Ids nobody uses become empty non-special tokens.
  - flags 1 for the added tokens (all "special"; others are refused).
  - merges "a b" (or ["a", "b"]) as (id(a), id(b), id(a+b)), file order = rank.
  - bos = <|begin_of_text|> (or -1), eot = <|eot_id|>, <|eom_id|>,
    <|end_of_text|> where present, ignore_merges from the model.

It refuses (ValueError) anything the C tokenizer would not reproduce
exactly: a model that is not BPE, not byte-level, a normalizer, a
pre-tokenizer other than Llama 3's Split regex + ByteLevel, or added tokens
that are not special or have lstrip/rstrip/single_word behaviour.
"""
import gzip
import json
import os
import struct
import sys

TOK_MAGIC = 0x4B544C55  # "ULTK"
TOK_VERSION = 1


def open_json_bytes(path):
    """A tokenizer.json, or the gzip-compressed copy the repository ships (.gz)."""
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

EOT_NAMES = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")
BOS_NAME = "<|begin_of_text|>"


def bytes_to_unicode():
    """GPT-2's reversible byte -> printable unicode char map."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1))
          + list(range(ord("\u00ae"), ord("\u00ff") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _check_pre_tokenizer(pt, where):
    """Llama 3: Sequence[Split(llama3 regex, Isolated), ByteLevel(no prefix space, no regex)]."""
    if not isinstance(pt, dict) or pt.get("type") != "Sequence":
        raise ValueError("%s: pre_tokenizer must be a Sequence of the Llama-3 Split regex and ByteLevel, got %r"
                         % (where, pt if not isinstance(pt, dict) else pt.get("type")))
    seq = pt.get("pretokenizers") or []
    if len(seq) != 2:
        raise ValueError("%s: pre_tokenizer Sequence must hold exactly Split + ByteLevel" % where)
    split, bl = seq
    pattern = (split.get("pattern") or {}).get("Regex") if isinstance(split, dict) else None
    if (split.get("type") != "Split" or pattern != LLAMA3_PATTERN
            or split.get("behavior") != "Isolated" or split.get("invert", False)):
        raise ValueError("%s: first pre-tokenizer is not the Llama-3 Split regex (Isolated); "
                         "only the Llama-3 pattern is implemented in C" % where)
    if (bl.get("type") != "ByteLevel" or bl.get("add_prefix_space", False)
            or bl.get("use_regex", True)):
        raise ValueError("%s: second pre-tokenizer must be ByteLevel with add_prefix_space=false, "
                         "use_regex=false" % where)


def export_tokenizer(json_path, out_path):
    """Converts json_path (HF tokenizer.json) into the run.h tokenizer file out_path.
    Returns a small dict describing what was written."""
    with open_json_bytes(json_path) as f:
        tj = json.loads(f.read().decode("utf-8"))
    where = os.path.basename(json_path)
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError("%s: model type %r is not BPE" % (where, model.get("type")))
    if model.get("byte_fallback"):
        raise ValueError("%s: byte_fallback BPE (SentencePiece style) is not byte-level BPE" % where)
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise ValueError("%s: continuing_subword_prefix/end_of_word_suffix are not supported" % where)
    if model.get("dropout") not in (None, 0, 0.0):
        raise ValueError("%s: BPE dropout is not supported" % where)
    if tj.get("normalizer") is not None:
        raise ValueError("%s: a normalizer is set; the C tokenizer implements none" % where)
    _check_pre_tokenizer(tj.get("pre_tokenizer"), where)

    byte_encoder = bytes_to_unicode()
    byte_decoder = {c: b for b, c in byte_encoder.items()}

    def unmap(s):
        try:
            return bytes(byte_decoder[ch] for ch in s)
        except KeyError as e:
            raise ValueError("%s: vocab entry %r has char %r outside the byte-level alphabet "
                             "(not a byte-level BPE)" % (where, s, e.args[0])) from None

    vocab = model.get("vocab") or {}
    if not vocab:
        raise ValueError("%s: empty vocab" % where)
    tokens = {}      # id -> bytes
    special = {}     # id -> bool
    for s, i in vocab.items():
        if not isinstance(i, int) or i < 0:
            raise ValueError("%s: bad id %r for %r" % (where, i, s))
        if i in tokens:
            raise ValueError("%s: id %d used twice in the vocab" % (where, i))
        tokens[i] = unmap(s)
        special[i] = False
    for b in range(256):
        if byte_encoder[b] not in vocab:
            raise ValueError("%s: byte 0x%02x has no token (not a byte-level BPE)" % (where, b))

    added_by_name = {}
    for t in tj.get("added_tokens") or []:
        i, content = t["id"], t["content"]
        if t.get("lstrip") or t.get("rstrip") or t.get("single_word"):
            raise ValueError("%s: added token %r uses lstrip/rstrip/single_word, not supported"
                             % (where, content))
        if not t.get("special", False):
            # HF splits non-special added tokens out of the text even when
            # special tokens are not parsed; run.h has no such class.
            raise ValueError("%s: non-special added token %r is not supported" % (where, content))
        raw = content.encode("utf-8")
        if i in tokens and tokens[i] != raw:
            raise ValueError("%s: added token %r reuses id %d of vocab entry %r"
                             % (where, content, i, tokens[i]))
        tokens[i] = raw
        special[i] = True
        added_by_name[content] = i

    vocab_size = max(tokens) + 1
    merges_out = []
    for k, m in enumerate(model.get("merges") or []):
        if isinstance(m, str):
            parts = m.split(" ")
        else:
            parts = list(m)
        if len(parts) != 2:
            raise ValueError("%s: merge %d %r is not a pair" % (where, k, m))
        a, b = parts
        for s in (a, b, a + b):
            if s not in vocab:
                raise ValueError("%s: merge %d %r: %r is not in the vocab" % (where, k, m, s))
        merges_out.append((vocab[a], vocab[b], vocab[a + b]))

    bos_id = added_by_name.get(BOS_NAME, -1)
    eot_ids = [added_by_name[n] for n in EOT_NAMES if n in added_by_name]
    ignore_merges = 1 if model.get("ignore_merges", False) else 0

    out = bytearray()
    out += struct.pack("<Iiiiii", TOK_MAGIC, TOK_VERSION, vocab_size, len(merges_out), bos_id, len(eot_ids))
    out += struct.pack("<%di" % len(eot_ids), *eot_ids)
    out += struct.pack("<i", ignore_merges)
    for i in range(vocab_size):
        raw = tokens.get(i, b"")
        out += struct.pack("<Bi", 1 if special.get(i, False) else 0, len(raw))
        out += raw
    for l, r, m in merges_out:
        out += struct.pack("<iii", l, r, m)

    tmp = out_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(out)
    os.replace(tmp, out_path)
    return {"vocab_size": vocab_size, "n_merges": len(merges_out), "bos_id": bos_id,
            "eot_ids": eot_ids, "ignore_merges": ignore_merges,
            "n_special": sum(1 for v in special.values() if v), "bytes": len(out)}


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python3 tok_export.py tokenizer.json out.tok")
    try:
        info = export_tokenizer(sys.argv[1], sys.argv[2])
    except (ValueError, OSError) as e:
        sys.exit("error: %s" % e)
    print("wrote %s: %s" % (sys.argv[2], info))
