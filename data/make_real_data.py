#!/usr/bin/env python3
"""make_real_data.py: build the real-model data files from your own downloads.

    python3 data/make_real_data.py --books BOOKS --wikitext WIKI [--out data/real]

BOOKS is a folder holding the seven Harry Potter books as .txt files (or the
.txt files themselves, in series order). In a folder the files are taken in
the order of the first number in their names ("1 Philosopher's Stone.txt",
"Book 2 - ..."), then by name. WIKI is a WikiText file in the raw format of the
Salesforce/wikitext release (wiki.train.raw, wiki.test.raw, ...; lines, with
" = Title = " headings), or a .jsonl file with one {"text": ...} per line.

Writes, in --out (default data/real/, which git ignores: the books are not ours
to redistribute):
  harry_potter_dataset.txt  the books joined, in order (forget set for LoRA)
  hp_perp.txt               --hp-samples passages of the books (default 1000),
                            one per line, for perplexity on Harry Potter text
  wiki2_perp.txt            --wiki-samples WikiText paragraphs (default 1000),
                            one per line, none mentioning a Harry Potter keyword

Deterministic: the same inputs and --seed give byte-identical outputs.
Python 3 standard library only.
"""

import argparse
import os
import random
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def read_text(path):
    with open(path, "rb") as f:
        raw = f.read()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("cp1252", errors="replace")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def book_files(args):
    if len(args) == 1 and os.path.isdir(args[0]):
        names = [n for n in os.listdir(args[0]) if n.lower().endswith(".txt")]

        def key(n):
            m = re.search(r"\d+", n)
            return (int(m.group()) if m else 10 ** 9, n)
        return [os.path.join(args[0], n) for n in sorted(names, key=key)]
    return list(args)


def clean_book(text):
    lines = [ln.rstrip() for ln in text.split("\n")]
    text = "\n".join(lines).strip("\n")
    return re.sub(r"\n{3,}", "\n\n", text)


PAGE_RE = re.compile(r"^\s*(page\s*\|?\s*\d+.*|\d+)\s*$", re.I)


def paragraphs(text):
    """Paragraphs of a book: blank-line separated, or one per line when the file
    has (almost) no blank lines. Page-number lines are dropped."""
    if text.count("\n\n") < 0.1 * max(1, text.count("\n")):
        parts = text.split("\n")
    else:
        parts = text.split("\n\n")
    out = []
    for p in parts:
        p = " ".join(p.split())
        if p and not PAGE_RE.match(p):
            out.append(p)
    return out


def pack(paras, target):
    """Consecutive paragraphs packed into passages of about `target` words
    (at least target, at most about 2*target; long paragraphs are cut)."""
    out, cur, n = [], [], 0
    for p in paras:
        words = p.split()
        while len(words) > 2 * target:
            if cur:
                out.append(" ".join(cur))
                cur, n = [], 0
            out.append(" ".join(words[:target]))
            words = words[target:]
        cur.append(" ".join(words))
        n += len(words)
        if n >= target:
            out.append(" ".join(cur))
            cur, n = [], 0
    if cur and n >= target // 2:
        out.append(" ".join(cur))
    return out


def sample(items, k, seed, tag):
    r = random.Random("%s|%s" % (seed, tag))
    if k >= len(items):
        return list(items)
    idx = sorted(r.sample(range(len(items)), k))
    return [items[i] for i in idx]


def wiki_lines(path):
    """Lines of a WikiText file, streamed (wiki.train.raw of WikiText-103 is 500 MB)."""
    if path.endswith(".jsonl"):
        import json
        with open(path, encoding="utf-8") as f:
            for ln in f:
                if ln.strip():
                    yield from json.loads(ln).get("text", "").split("\n")
    else:
        with open(path, encoding="utf-8", errors="replace") as f:
            yield from f


def wiki_paragraphs(path, detok, lo, hi):
    """(index, paragraph) for body paragraphs of lo..hi words; headings dropped."""
    i = 0
    for ln in wiki_lines(path):
        s = ln.strip()
        if not s or (s.startswith("=") and s.endswith("=")):
            continue
        n = s.count(" ") + 1
        if n < lo or n > 2 * hi:
            continue
        s = " ".join(s.split())
        if detok:
            s = s.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
        if lo <= len(s.split()) <= hi:
            yield i, s
            i += 1


def wiki_sample(path, detok, lo, hi, k, seed, kw):
    """k paragraphs chosen by a seeded hash (one pass, memory O(k)), skipping any that
    match a Harry Potter keyword; returned in file order."""
    import hashlib
    import heapq

    def key(item):
        return hashlib.sha1(("%s|%d|%s" % (seed, item[0], item[1])).encode("utf-8")).hexdigest()
    counted = [0]

    def gen():
        for item in wiki_paragraphs(path, detok, lo, hi):
            counted[0] += 1
            yield item
    pool = heapq.nsmallest(3 * k + 100, gen(), key=key)
    chosen, dropped = [], 0
    for item in pool:
        if len(chosen) == k:
            break
        if kw.search(item[1]):
            dropped += 1
            continue
        chosen.append(item)
    chosen.sort()
    return [p for _, p in chosen], counted[0], dropped


def keyword_regex(path):
    with open(path, encoding="utf-8") as f:
        kws = [k.strip() for k in f if k.strip()]
    kws.sort(key=len, reverse=True)
    body = "|".join(re.escape(k) for k in kws)
    return re.compile(r"(?<![A-Za-z0-9])(?:" + body + r")(?![A-Za-z0-9])", re.I)


def write_lines(path, rows):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            assert "\n" not in r
            f.write(r + "\n")


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--books", nargs="+", required=True, help="folder with the 7 books as .txt, or the files in order")
    ap.add_argument("--wikitext", required=True, help="WikiText raw file (wiki.*.raw) or .jsonl with a text field")
    ap.add_argument("--out", default=os.path.join(HERE, "real"), help="output folder (default data/real)")
    ap.add_argument("--hp-samples", type=int, default=1000)
    ap.add_argument("--wiki-samples", type=int, default=1000)
    ap.add_argument("--words", type=int, default=150, help="target words per Harry Potter passage (default 150)")
    ap.add_argument("--wiki-min-words", type=int, default=40, help="shortest WikiText paragraph kept (default 40)")
    ap.add_argument("--wiki-max-words", type=int, default=300, help="longest WikiText paragraph kept (default 300)")
    ap.add_argument("--detok", action="store_true", help="undo WikiText's @-@ @,@ @.@ tokens")
    ap.add_argument("--keywords", default=os.path.join(HERE, "harry_potter_keywords.txt"),
                    help="WikiText paragraphs matching any of these are dropped")
    ap.add_argument("--seed", default="unlearn.c-real-v1")
    a = ap.parse_args(argv)

    files = book_files(a.books)
    if not files:
        sys.exit("no .txt books found in %s" % " ".join(a.books))
    for p in files:
        if not os.path.isfile(p):
            sys.exit("not a file: %s" % p)
    if len(files) != 7:
        print("warning: %d book files (expected 7)" % len(files), file=sys.stderr)
    os.makedirs(a.out, exist_ok=True)

    books = [clean_book(read_text(p)) for p in files]
    joined = "\n\n".join(books) + "\n"
    with open(os.path.join(a.out, "harry_potter_dataset.txt"), "w", encoding="utf-8", newline="\n") as f:
        f.write(joined)

    passages = []
    for b in books:                     # passages never straddle two books
        passages.extend(pack(paragraphs(b), a.words))
    hp = sample(passages, a.hp_samples, a.seed, "hp_perp")
    write_lines(os.path.join(a.out, "hp_perp.txt"), hp)

    kw = keyword_regex(a.keywords)
    wiki, n_wiki, n_dropped = wiki_sample(a.wikitext, a.detok, a.wiki_min_words, a.wiki_max_words,
                                          a.wiki_samples, a.seed + "|wiki2_perp", kw)
    write_lines(os.path.join(a.out, "wiki2_perp.txt"), wiki)

    print("books, in this order:")
    for p, b in zip(files, books):
        print("  %-60s %8d words" % (os.path.basename(p), len(b.split())))
    print("harry_potter_dataset.txt  %d bytes" % len(joined.encode("utf-8")))
    print("hp_perp.txt     %d passages (of %d, ~%d words each)" % (len(hp), len(passages), a.words))
    print("wiki2_perp.txt  %d paragraphs (of %d of %d-%d words; %d candidates dropped for Harry Potter keywords)" % (
        len(wiki), n_wiki, a.wiki_min_words, a.wiki_max_words, n_dropped))
    for name, got, want in (("hp_perp.txt", len(hp), a.hp_samples), ("wiki2_perp.txt", len(wiki), a.wiki_samples)):
        if got < want:
            print("warning: %s has only %d of the %d samples asked for" % (name, got, want), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
