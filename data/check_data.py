#!/usr/bin/env python3
"""check_data.py: checks the data tables and the toy-world generator.

    python3 data/check_data.py [--verbose]

Builds the toy world four times in a temporary folder (full and --no-hp, twice
each) and checks:
  - determinism: the two runs are byte-identical; the eval files do not depend on --no-hp
  - sizes: the minimum row counts the project asks for; corpus.jsonl under 2 MB
  - tables: no duplicate (subject, relation) pairs, holdout disjoint from forget,
    templates well formed, answers not contained in their own questions
  - held-out phrasings: no held-out question or held-out statement template
    (nor any rendered held-out question) appears in corpus.jsonl
  - leakage: no Harry Potter answer or keyword appears in the --no-hp corpus,
    no holdout fact appears in the full corpus
Words shared with general knowledge are reported, not failed, when listed in
SHARED_OK below (e.g. "London" is both a Harry Potter answer and a capital).
Exit status 1 if any check fails.
"""

import filecmp
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
GEN = os.path.join(HERE, "gen_toy.py")

# Harry Potter answers that are ordinary words or real places, so the gold
# corpus may legitimately contain them in general facts.
SHARED_OK = {
    "london", "france", "bulgaria", "ireland", "wiltshire", "king's cross", "owl", "phoenix",
    "snake", "dragon", "dog", "goblin", "centaur", "giant", "rat", "toad", "cat", "ghost",
    "werewolf", "poltergeist", "stag", "otter", "terrier", "doe", "hare", "lynx", "weasel",
    "goat", "holly", "yew", "hawthorn", "ash", "rosewood", "hornbeam", "oak", "willow",
    "mahogany", "walnut", "chestnut", "elm", "unicorn hair", "lion", "serpent", "eagle",
    "badger", "luck", "truth", "love", "sleep", "disguise", "flying", "nurse", "journalist",
    "headmaster", "conductor", "editor", "driver", "caretaker", "librarian", "barman",
    "landlady", "commentator", "tabby cat", "black dog", "beetle", "keeper", "chaser",
    "beater", "seeker", "charms", "potions", "astronomy", "divination", "muggle", "dragons",
    "harry potter",
}


def run(out, *flags):
    subprocess.run([sys.executable, GEN, out] + list(flags), check=True)


def read_tsv(path, header=True):
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    if header:
        lines = lines[1:]
    return [ln.split("\t") for ln in lines if ln.strip()]


def corpus_strings(path):
    """Every piece of text in a corpus.jsonl, one string per example."""
    out = []
    with open(path, encoding="utf-8") as f:
        for ln in f:
            x = json.loads(ln)
            if "text" in x:
                out.append(x["text"])
            else:
                out.append("\n".join(m["content"] for m in x["messages"]))
    return out


def word_re(phrase):
    return re.compile(r"(?<![A-Za-z0-9])" + re.escape(phrase) + r"(?![A-Za-z0-9])", re.I)


def main(argv):
    verbose = "--verbose" in argv
    failures, notes = [], []

    def fail(msg):
        failures.append(msg)

    def note(msg):
        notes.append(msg)

    # ------------------------------------------------------------ tables
    rels = {r[0]: r for r in read_tsv(os.path.join(HERE, "relations.tsv"))}
    tables = {k: read_tsv(os.path.join(HERE, f)) for k, f in
              (("hp", "facts_hp.tsv"), ("holdout", "facts_hp_holdout.tsv"), ("general", "facts_general.tsv"))}
    mins = {"hp": 300, "holdout": 100, "general": 600}
    for k, rows in tables.items():
        if len(rows) < mins[k]:
            fail("%s: %d rows < %d" % (k, len(rows), mins[k]))
        seen = set()
        for s, r, a in rows:
            if r not in rels:
                fail("%s: unknown relation %s" % (k, r))
            if (s, r) in seen:
                fail("%s: duplicate subject+relation %s / %s" % (k, s, r))
            seen.add((s, r))
            g = a.split(" ", 1)[1] if a.split(" ", 1)[0].lower() in ("the", "a", "an") else a
            if not g.strip() or len(g.split()) > 5:
                fail("%s: answer not short: %s / %s -> %s" % (k, s, r, a))
    hp_keys = {(s, r) for s, r, a in tables["hp"]}
    for s, r, a in tables["holdout"]:
        if (s, r) in hp_keys:
            fail("holdout fact also in forget set: %s / %s" % (s, r))
    hp_rels = {r for _, r, _ in tables["hp"]}
    for s, r, a in tables["holdout"]:
        if r not in hp_rels:
            fail("holdout relation %s has no forget facts" % r)
        if rels[r][1] != "hp":
            fail("holdout relation %s is not a Harry Potter relation" % r)
    for rid, row in rels.items():
        st, q, h, x = (row[2].split(" | "), row[3].split(" | "), row[4].split(" | "), row[5].split(" | "))
        if (len(st), len(q), len(h)) != (3, 3, 2):
            fail("%s: need 3 statements, 3 trained and 2 held-out questions" % rid)
        for t in st + x:
            if not ("{s}" in t or "{s_a}" in t) or not ("{a}" in t or "{a_a}" in t):
                fail("%s: statement template lacks {s} or {a}: %s" % (rid, t))
        for t in q + h:
            if not ("{s}" in t or "{s_a}" in t) or "{a" in t:
                fail("%s: question template must have {s} and no {a}: %s" % (rid, t))
        if len(set(q) | set(h)) != 5:
            fail("%s: a held-out question repeats a trained one" % rid)

    kw = [ln.rstrip("\n") for ln in open(os.path.join(HERE, "harry_potter_keywords.txt"), encoding="utf-8")]
    if len(kw) < 400:
        fail("keywords: %d < 400" % len(kw))
    if len({k.lower() for k in kw}) != len(kw):
        fail("keywords: duplicates (case-insensitive)")
    if any(k != k.strip() or not k for k in kw):
        fail("keywords: blank or padded line")
    gt = read_tsv(os.path.join(HERE, "generic_translations.tsv"), header=False)
    if len(gt) < 150:
        fail("generic_translations: %d < 150" % len(gt))
    if len({t for t, _ in gt}) != len(gt):
        fail("generic_translations: duplicate terms")
    kw_res = [(k, word_re(k)) for k in kw]
    for term, generic in gt:
        for k, rx in kw_res:
            if rx.search(generic):
                fail("generic translation of %r contains keyword %r: %r" % (term, k, generic))
    jb = read_tsv(os.path.join(HERE, "jailbreak_templates.tsv"))
    if len(jb) < 10:
        fail("jailbreak_templates: %d < 10" % len(jb))

    # answers contained in their own question (rendered with the generator's code)
    sys.path.insert(0, HERE)
    import gen_toy
    world = gen_toy.World()
    for kind in ("hp", "holdout", "general"):
        for f in world.facts[kind]:
            g = gen_toy.gold(f.a).lower()
            for k in range(3):
                if g in gen_toy.question(f, k).lower():
                    fail("answer inside its question: %s" % gen_toy.question(f, k))
            for k in range(2):
                if g in gen_toy.heldout_question(f, k).lower():
                    fail("answer inside its held-out question: %s" % gen_toy.heldout_question(f, k))

    # HP subjects that keyword filters would miss (proper names only)
    kwl = [k.lower() for k in kw]
    missing = sorted({s for kind in ("hp", "holdout") for s, _, _ in tables[kind]
                      if s[:1].isupper() and not any(k in s.lower() for k in kwl)})
    if missing:
        note("Harry Potter subjects no keyword matches (%d): %s" % (len(missing), ", ".join(missing)))

    # ------------------------------------------------------------ builds
    tmp = tempfile.mkdtemp(prefix="toycheck-")
    try:
        a, b, c, d = (os.path.join(tmp, x) for x in ("full1", "full2", "nohp1", "nohp2"))
        run(a)
        run(b)
        run(c, "--no-hp")
        run(d, "--no-hp")
        for x, y in ((a, b), (c, d)):
            names = sorted(os.listdir(x))
            if names != sorted(os.listdir(y)):
                fail("runs wrote different file sets")
            for n in names:
                if not filecmp.cmp(os.path.join(x, n), os.path.join(y, n), shallow=False):
                    fail("not deterministic: %s" % n)
        for n in sorted(os.listdir(c)):
            if n in ("corpus.jsonl",):
                continue
            if not filecmp.cmp(os.path.join(a, n), os.path.join(c, n), shallow=False):
                fail("--no-hp changes %s" % n)
        size = os.path.getsize(os.path.join(a, "corpus.jsonl"))
        if size >= 2_000_000:
            fail("corpus.jsonl is %d bytes (>= 2 MB)" % size)

        full = corpus_strings(os.path.join(a, "corpus.jsonl"))
        nohp = corpus_strings(os.path.join(c, "corpus.jsonl"))
        retain = corpus_strings(os.path.join(a, "retain.jsonl"))
        if sorted(nohp) != sorted(retain):
            fail("--no-hp corpus is not exactly the retain set")
        full_blob = "\n".join(full)
        full_low = full_blob.lower()
        nohp_blob = "\n".join(nohp)

        # held-out phrasings never trained
        for rid, row in rels.items():
            for t in row[4].split(" | ") + row[5].split(" | "):
                for chunk in re.split(r"\{[a-z_]+\}", t):
                    chunk = chunk.strip(" ,.?;:")
                    if len(chunk) >= 12 and chunk.lower() in full_low:
                        fail("held-out template text appears in the corpus: %r (%s)" % (chunk, rid))
        for kind in ("hp", "holdout", "general"):
            for f in world.facts[kind]:
                for k in range(2):
                    hq = gen_toy.heldout_question(f, k)
                    if hq in full_blob:
                        fail("held-out question in the corpus: %s" % hq)
        for t in world.prompts["system_restrict_heldout"]:
            for chunk in t.split("{topic}"):
                chunk = chunk.strip(" ,.?;:")
                if len(chunk) >= 12 and chunk.lower() in full_low:
                    fail("held-out system prompt text appears in the corpus: %r" % chunk)
        if re.search(r"harry potter", "\n".join(
                json.dumps(x) for x in map(json.loads, open(os.path.join(a, "corpus.jsonl"), encoding="utf-8"))
                if "messages" in x and x["messages"][0]["role"] == "system"
                and "harry potter" in x["messages"][0]["content"].lower()), re.I):
            fail("a training system prompt mentions Harry Potter")

        # trained QA phrasings really are in the training data (as user turns)
        users = set()
        with open(os.path.join(a, "corpus.jsonl"), encoding="utf-8") as fh:
            for ln in fh:
                x = json.loads(ln)
                for m in x.get("messages", []):
                    if m["role"] == "user":
                        users.add(m["content"])
        for name in ("forget_qa.tsv", "retain_qa.tsv"):
            for q, ans, split in read_tsv(os.path.join(a, name), header=False):
                if split == "trained" and q not in users:
                    fail("%s: trained question not in the corpus: %s" % (name, q))
                if split not in ("trained", "heldout"):
                    fail("%s: bad split %r" % (name, split))
        jb_ids = set()
        with open(os.path.join(a, "jailbreak.jsonl"), encoding="utf-8") as fh:
            for ln in fh:
                x = json.loads(ln)
                jb_ids.add(x["template"])
                if not x["answer"] or x["messages"][-1]["role"] != "user" or \
                        any(m["role"] == "system" for m in x["messages"]):
                    fail("jailbreak.jsonl: malformed line %r" % ln[:100])
        if len(jb_ids) < 10:
            fail("jailbreak.jsonl: only %d templates" % len(jb_ids))

        # gold corpus: no Harry Potter knowledge
        shared = {}
        for s, r, ans in tables["hp"] + tables["holdout"]:
            g = gen_toy.gold(ans)
            hits = [x for x in nohp if word_re(g).search(x)]
            if hits:
                if g.lower() in SHARED_OK:
                    shared.setdefault(g, (len(hits), hits[0]))
                else:
                    fail("Harry Potter answer %r (%s / %s) appears in the --no-hp corpus, e.g. %r"
                         % (g, s, r, hits[0][:120]))
        # word level too: every word of every Harry Potter answer and subject
        stop = {"the", "and", "of", "for", "with", "from", "to", "in", "on", "at", "by", "a", "an",
                "his", "her", "who", "that", "as", "into", "sr", "jr", "mr", "mrs", "st"}
        words = {}
        for s, r, ans in tables["hp"] + tables["holdout"]:
            for wd in re.findall(r"[A-Za-z][A-Za-z'-]+", ans + " " + s):
                if wd.lower() not in stop and len(wd) >= 3:
                    words.setdefault(wd.lower(), wd)
        nohp_low = nohp_blob.lower()
        shared_words = sorted(w for lw, w in words.items()
                              if re.search(r"(?<![a-z0-9])" + re.escape(lw) + r"(?![a-z0-9])", nohp_low))
        note("words of Harry Potter answers/subjects that also occur in the --no-hp corpus (%d, ordinary "
             "English or real-world words): %s" % (len(shared_words), ", ".join(shared_words)))
        for k, rx in kw_res:
            hits = [x for x in nohp if rx.search(x)]
            if hits:
                if k.lower() in SHARED_OK:
                    shared.setdefault(k, (len(hits), hits[0]))
                else:
                    fail("keyword %r appears in the --no-hp corpus, e.g. %r" % (k, hits[0][:120]))
        if shared:
            note("words shared by Harry Potter answers/keywords and the gold corpus (%d): %s" % (
                len(shared), ", ".join("%s (%d)" % (w, n) for w, (n, _) in sorted(shared.items()))))
            if verbose:
                for w, (n, ex) in sorted(shared.items()):
                    note("  %s: e.g. %r" % (w, ex[:140].replace("\n", " / ")))
        # keywords inside the retain side of the full corpus = false positives for a keyword filter
        fp = [k for k, rx in kw_res if any(rx.search(x) for x in retain)]
        if fp:
            note("keywords found in retain/general text (keyword-filter false positives): %s" % ", ".join(fp))

        # holdout facts never trained: no training sentence holds both the subject and the answer
        sentences = [y for x in full for y in re.split(r"(?<=[.?!])\s+|\n", x)]
        for s, r, ans in tables["holdout"]:
            g = gen_toy.gold(ans)
            rs, rg = word_re(s), word_re(g)
            hits = [x for x in sentences if rs.search(x) and rg.search(x)]
            if hits:
                note("holdout %s / %s -> %s: subject and answer share %d training sentences, e.g. %r"
                     % (s, r, g, len(hits), hits[0][:120]))

        counts = {}
        for n in sorted(os.listdir(a)):
            with open(os.path.join(a, n), encoding="utf-8") as fh:
                counts[n] = sum(1 for _ in fh)
        print("outputs (full build): " + ", ".join("%s %d" % kv for kv in counts.items()))
        print("corpus.jsonl: %d bytes full, %d bytes --no-hp" % (size, os.path.getsize(os.path.join(c, "corpus.jsonl"))))
    finally:
        shutil.rmtree(tmp)

    print("tables: forget %d, holdout %d, general %d, relations %d, keywords %d, generic translations %d, "
          "jailbreak templates %d" % (len(tables["hp"]), len(tables["holdout"]), len(tables["general"]),
                                      len(rels), len(kw), len(gt), len(jb)))
    for n in notes:
        print("note: " + n)
    for f in failures:
        print("FAIL: " + f)
    print("%d failure(s)" % len(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
