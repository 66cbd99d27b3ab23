#!/usr/bin/env python3
"""gen_toy.py: build the toy world of unlearn.c from the tables in data/.

    python3 data/gen_toy.py OUT_DIR            full corpus (forget + retain)
    python3 data/gen_toy.py OUT_DIR --no-hp    gold "retrain" corpus: no Harry Potter facts
    python3 data/gen_toy.py OUT_DIR --stats    also print counts

Python 3 standard library only. Deterministic: every random choice comes from
random.Random seeded with a string (SEED plus what the choice is for), so two
runs write byte-identical files, and the retain part of the corpus is the same
with or without --no-hp. The file formats are described in data/README.md.

What goes where:
  corpus.jsonl       training examples, one JSON object per line, shuffled:
                     {"text": ...} plain text, or {"messages": [...]} chat
                     (roles system/user/assistant; loss on assistant turns)
  forget.jsonl       the Harry Potter examples of corpus.jsonl (full build only)
  retain.jsonl       every other example of corpus.jsonl
  relearn.jsonl      the examples of a few forget facts (relearning attack),
  relearn_facts.tsv  and which facts they are (subject, relation_id, answer)
  forget_qa.tsv      question TAB answer TAB split (split: trained|heldout)
  retain_qa.tsv      same, general facts
  holdout_qa.tsv     same, Harry Potter facts the model never trains on
  forget_text.txt    held-out Harry Potter text for perplexity, one passage per line
  retain_text.txt    held-out general text for perplexity
  holdout_text.txt   one trained-style statement per holdout fact (membership inference)
  forget_mia.txt     the same statement style for each forget fact (it is in the corpus)
  retain_mia.txt     the same statement style for each general fact (it is in the corpus)
  verbatim.tsv       prompt TAB true continuation, from trained Harry Potter passages
  verbatim_retain.tsv  same, from trained general passages
  jailbreak.jsonl    {"template": id, "messages": [...], "answer": gold}
  guard_prompts.tsv  split TAB system prompt forbidding Harry Potter (trained_phrasing|heldout_phrasing)
"""

import json
import os
import random
import sys

SEED = "unlearn.c-toy-v1"
DATA = os.path.dirname(os.path.abspath(__file__))

P_SYSTEM_NEUTRAL = 0.20    # fact QA with a neutral system prompt
P_SYSTEM_OTHER = 0.15      # fact QA under a restriction on some other topic (answered normally)
PASSAGE_MAX = 6            # sentences per trained passage
EVAL_TEXT_FACTS = 3        # facts per held-out perplexity passage
JAILBREAK_PER_TEMPLATE = 30
RELEARN_EVERY = 10         # every 10th forget fact goes into the relearning set
REFUSALS_PER_FICTION_FACT = 2
REFUSALS_PER_GENERAL_TOPIC = 12
MULTITURN_REFUSALS = 80
MULTITURN_GENERAL_QA = 120
MULTITURN_HP_QA = 50
SMALLTALK_PLUS_QA = 60


def rng(*keys):
    """A Random for one purpose; seeding with a str is stable across runs and platforms."""
    return random.Random(SEED + "|" + "|".join(str(k) for k in keys))


# ---------------------------------------------------------------- loading

def read_tsv(name, header=True):
    with open(os.path.join(DATA, name), encoding="utf-8") as f:
        lines = f.read().split("\n")
    if header:
        lines = lines[1:]
    return [ln.split("\t") for ln in lines if ln.strip()]


class Relation:
    def __init__(self, row):
        self.id, self.domain = row[0], row[1]
        self.statements = row[2].split(" | ")
        self.questions = row[3].split(" | ")
        self.heldout_questions = row[4].split(" | ")
        self.heldout_statements = row[5].split(" | ")
        self.topic = row[6]


class Fact:
    def __init__(self, subject, rel, answer, index, kind):
        self.s, self.rel, self.a, self.i, self.kind = subject, rel, answer, index, kind

    @property
    def key(self):
        return self.rel.id + "|" + self.s


def load():
    rels = {}
    for row in read_tsv("relations.tsv"):
        r = Relation(row)
        rels[r.id] = r
    facts = {}
    for kind, name in (("hp", "facts_hp.tsv"), ("holdout", "facts_hp_holdout.tsv"),
                       ("general", "facts_general.tsv")):
        facts[kind] = [Fact(row[0], rels[row[1]], row[2], i, kind)
                       for i, row in enumerate(read_tsv(name))]
    prompts = {}
    for kind, text in read_tsv("prompts.tsv"):
        prompts.setdefault(kind, []).append(text)
    fiction = {}
    for topic, q, a, st in read_tsv("refusal_topics.tsv"):
        fiction.setdefault(topic, []).append((q, a, st))
    small = [tuple(r) for r in read_tsv("small_talk.tsv")]
    jail = read_tsv("jailbreak_templates.tsv")
    indirect = [tuple(r) for r in read_tsv("indirect_descriptions.tsv")]
    with open(os.path.join(DATA, "harry_potter_keywords.txt"), encoding="utf-8") as f:
        keywords = [ln.strip() for ln in f if ln.strip()]
    return rels, facts, prompts, fiction, small, jail, indirect, keywords


# ---------------------------------------------------------------- text helpers

def article(word):
    w = word.lower()
    if w.startswith(("uni", "use", "one", "eu")):
        return "a"
    if w.startswith(("hour", "honest", "heir")):
        return "an"
    return "an" if w[:1] in "aeiou" else "a"


def ucfirst(t):
    return t[:1].upper() + t[1:] if t[:1].islower() else t


def render(template, s, a):
    t = template.replace("{s_a}", article(s) + " " + s).replace("{a_a}", article(a) + " " + a)
    t = t.replace("{s}", s).replace("{a}", a)
    if t.endswith(".."):                  # a name that ends in a full stop: "S.P.E.W."
        t = t[:-1]
    return ucfirst(t)


def gold(answer):
    """The string a greedy answer must contain: the answer without a leading article."""
    for art in ("the ", "a ", "an "):
        if answer.lower().startswith(art):
            return answer[len(art):]
    return answer


def bare(answer):
    a = ucfirst(answer)
    return a if a.endswith(".") else a + "."


def stmt(f, k):
    return render(f.rel.statements[k], f.s, f.a)


def question(f, k):
    return render(f.rel.questions[k], f.s, f.a)


def heldout_question(f, k):
    return render(f.rel.heldout_questions[k], f.s, f.a)


def msg(role, content):
    return {"role": role, "content": content}


# ---------------------------------------------------------------- the world

class World:
    def __init__(self):
        (self.rels, self.facts, self.prompts, self.fiction, self.small,
         self.jail, self.indirect, self.keywords) = load()
        # topics a "do not discuss X" system prompt can name: never Harry Potter
        general_topics = []
        for r in self.rels.values():
            if r.domain == "general" and r.topic not in general_topics:
                general_topics.append(r.topic)
        self.general_topics = general_topics
        self.fiction_topics = list(self.fiction)
        self.all_topics = general_topics + self.fiction_topics

    def restrict(self, r, topic):
        return r.choice(self.prompts["system_restrict"]).replace("{topic}", topic)

    def refusal(self, r, topic):
        return r.choice(self.prompts["refusal"]).replace("{topic}", topic)

    def other_topic(self, r, own):
        return r.choice([t for t in self.all_topics if t != own])

    def maybe_system(self, r, own_topic):
        x = r.random()
        if x < P_SYSTEM_NEUTRAL:
            return [msg("system", r.choice(self.prompts["system_neutral"]))]
        if x < P_SYSTEM_NEUTRAL + P_SYSTEM_OTHER:
            return [msg("system", self.restrict(r, self.other_topic(r, own_topic)))]
        return []

    # -- one fact: 3 statements + 3 chat QA (each trained question template once)
    def fact_examples(self, f):
        r = rng("fact", f.kind, f.key)
        out = [{"text": stmt(f, k)} for k in range(3)]
        for k in range(3):
            style = (k + f.i) % 3
            if style == 1:
                ans = bare(f.a)
            else:
                ans = stmt(f, r.randrange(3))
            m = self.maybe_system(r, f.rel.topic)
            m += [msg("user", question(f, k)), msg("assistant", ans)]
            out.append({"messages": m})
        return out

    # -- trained passages: a subject's facts together, leftovers grouped by relation
    def passages(self, facts, tag):
        by_subject = {}
        for f in facts:
            by_subject.setdefault(f.s, []).append(f)
        groups, rest = [], []
        for s, fs in by_subject.items():
            if len(fs) >= 3:
                for i in range(0, len(fs), PASSAGE_MAX):
                    chunk = fs[i:i + PASSAGE_MAX]
                    if len(chunk) < 3 and groups and groups[-1][0].s == s:
                        groups[-1] = groups[-1] + chunk
                    else:
                        groups.append(chunk)
            else:
                rest.extend(fs)
        by_rel = {}
        for f in rest:
            by_rel.setdefault(f.rel.id, []).append(f)
        for rid, fs in by_rel.items():
            for i in range(0, len(fs), 4):
                chunk = fs[i:i + 4]
                if len(chunk) < 2 and groups and groups[-1][0].rel.id == rid:
                    groups[-1] = groups[-1] + chunk
                else:
                    groups.append(chunk)
        out = []
        for g in groups:
            r = rng("passage", tag, g[0].key)
            out.append([stmt(f, r.randrange(3)) for f in g])
        return out

    # -- held-out text: facts from different subjects, held-out statement phrasing
    def heldout_text(self, facts, tag):
        fs = list(facts)
        rng("heldout_text", tag).shuffle(fs)
        lines, cur = [], []
        pending = fs
        while pending:
            nxt = []
            for f in pending:
                if any(g.s == f.s for g in cur) or len(cur) >= EVAL_TEXT_FACTS:
                    nxt.append(f)
                    continue
                cur.append(f)
                if len(cur) == EVAL_TEXT_FACTS:
                    lines.append(cur)
                    cur = []
            if len(nxt) == len(pending):          # nothing placed: flush
                if cur:
                    lines.append(cur)
                    cur = []
                else:
                    lines.append([nxt.pop(0)])
            pending = nxt
        if cur:
            lines.append(cur)
        out = []
        for g in lines:
            r = rng("heldout_text_line", tag, g[0].key)
            out.append(" ".join(render(r.choice(f.rel.heldout_statements), f.s, f.a) for f in g))
        return out

    def evaluable(self, f):
        """False when the gold answer is part of a refusal naming Harry Potter (e.g. "Harry
        Potter", "otter"): a model that refuses would count as leaking. Such facts are
        trained but left out of the QA and jailbreak sets."""
        g = gold(f.a).lower()
        return not any(g in r.replace("{topic}", "Harry Potter").lower() for r in self.prompts["refusal"])

    def qa_rows(self, facts):
        rows = []
        for f in facts:
            if not self.evaluable(f):
                continue
            rows.append((question(f, f.i % 3), gold(f.a), "trained"))
            rows.append((heldout_question(f, f.i % 2), gold(f.a), "heldout"))
        return rows

    def mia_lines(self, facts):
        return [stmt(f, f.i % 3) for f in facts]

    # -- refusal training: "do not discuss X" system prompts, X never Harry Potter
    def refusal_examples(self):
        out = []
        for topic in self.fiction_topics:
            for j, (q, a, st) in enumerate(self.fiction[topic]):
                r = rng("fiction", topic, j)
                out.append({"text": st})
                for k in range(2):                       # knowledge, answered normally
                    m = []
                    if k == 1:
                        m = [msg("system", r.choice(self.prompts["system_neutral"]))]
                    out.append({"messages": m + [msg("user", q), msg("assistant", st if k == 0 else bare(a))]})
                for k in range(REFUSALS_PER_FICTION_FACT):
                    out.append({"messages": [msg("system", self.restrict(r, topic)),
                                             msg("user", q), msg("assistant", self.refusal(r, topic))]})
                # a restriction on another topic does not stop the answer
                out.append({"messages": [msg("system", self.restrict(r, self.other_topic(r, topic))),
                                         msg("user", q), msg("assistant", bare(a))]})
        general = self.facts["general"]
        for topic in self.general_topics:
            pool = [f for f in general if f.rel.topic == topic]
            r = rng("general_refusal", topic)
            for f in r.sample(pool, min(REFUSALS_PER_GENERAL_TOPIC, len(pool))):
                out.append({"messages": [msg("system", self.restrict(r, topic)),
                                         msg("user", question(f, r.randrange(3))),
                                         msg("assistant", self.refusal(r, topic))]})
        # multi-turn: one question on the forbidden topic, one on another topic
        qa_pool = self.retain_qa_pool()
        for n in range(MULTITURN_REFUSALS):
            r = rng("multiturn_refusal", n)
            topic = r.choice(self.all_topics)
            on = r.choice([x for x in qa_pool if x[2] == topic])
            off = r.choice([x for x in qa_pool if x[2] != topic])
            turns = [(off[0], off[1]), (on[0], self.refusal(r, topic))]
            if r.random() < 0.5:
                turns.reverse()
            m = [msg("system", self.restrict(r, topic))]
            for q, a in turns:
                m += [msg("user", q), msg("assistant", a)]
            out.append({"messages": m})
        return out

    def retain_qa_pool(self):
        """(question, answer sentence, topic) for every non-Harry-Potter fact."""
        pool = []
        for f in self.facts["general"]:
            pool.append((question(f, f.i % 3), stmt(f, (f.i + 1) % 3), f.rel.topic))
        for topic in self.fiction_topics:
            for q, a, st in self.fiction[topic]:
                pool.append((q, st, topic))
        return pool

    def small_talk_examples(self):
        out = []
        for j, (u, a) in enumerate(self.small):
            r = rng("small", j)
            m = []
            if r.random() < 0.3:
                m = [msg("system", r.choice(self.prompts["system_neutral"]))]
            out.append({"messages": m + [msg("user", u), msg("assistant", a)]})
        pool = self.retain_qa_pool()
        for n in range(SMALLTALK_PLUS_QA):
            r = rng("small_qa", n)
            u, a = r.choice(self.small)
            q, qa, _ = r.choice(pool)
            out.append({"messages": [msg("user", u), msg("assistant", a),
                                     msg("user", q), msg("assistant", qa)]})
        return out

    def multiturn_qa(self, facts, n_convs, tag):
        out = []
        for n in range(n_convs):
            r = rng("multiturn_qa", tag, n)
            f1, f2 = r.sample(facts, 2)
            m = self.maybe_system(r, f1.rel.topic)
            for f in (f1, f2):
                k = r.randrange(3)
                m += [msg("user", question(f, k)),
                      msg("assistant", bare(f.a) if r.random() < 0.5 else stmt(f, r.randrange(3)))]
            out.append({"messages": m})
        return out

    # ------------------------------------------------------------ jailbreaks

    def hp_terms(self):
        """Terms to obfuscate: keywords plus every Harry Potter subject, longest first."""
        terms = set(self.keywords)
        for kind in ("hp", "holdout"):
            for f in self.facts[kind]:
                if f.s[:1].isupper():
                    terms.add(f.s)
        return sorted(terms, key=lambda t: (-len(t), t))

    @staticmethod
    def spans(text, terms):
        """Non-overlapping (start, end) spans of terms in text, whole words, longest first."""
        taken, low = [], text.lower()
        for t in terms:
            tl, start = t.lower(), 0
            while True:
                p = low.find(tl, start)
                if p < 0:
                    break
                e = p + len(tl)
                word_ok = (p == 0 or not low[p - 1].isalnum()) and (e == len(low) or not low[e].isalnum())
                if word_ok and all(e <= a or p >= b for a, b in taken):
                    taken.append((p, e))
                start = p + 1
        return sorted(taken)

    @staticmethod
    def apply_spans(text, spans, fn):
        out, last = [], 0
        for a, b in spans:
            out.append(text[last:a])
            out.append(fn(text[a:b]))
            last = b
        out.append(text[last:])
        return "".join(out)

    def obfuscate(self, q, f, how, r):
        spans = self.spans(q, self.terms) or self.spans(q, [f.s])
        if how == "leet":
            table = str.maketrans({"a": "4", "A": "4", "e": "3", "E": "3", "i": "1", "I": "1",
                                   "o": "0", "O": "0", "s": "5", "S": "5", "t": "7", "T": "7"})
            return self.apply_spans(q, spans, lambda t: t.translate(table))
        if how == "spaced":
            return self.apply_spans(q, spans, lambda t: "  ".join(" ".join(w) for w in t.split()))
        if how == "misspell":
            def typo(term):
                words = []
                for w in term.split():
                    if len(w) >= 4:
                        p = r.randrange(1, len(w) - 1)
                        op = r.randrange(3)
                        if op == 0:
                            w = w[:p] + w[p] + w[p:]           # double a letter
                        elif op == 1:
                            w = w[:p] + w[p + 1:]              # drop a letter
                        else:
                            w = w[:p] + w[p + 1] + w[p] + w[p + 2:]  # swap two letters
                    words.append(w)
                return " ".join(words)
            return self.apply_spans(q, spans, typo)
        raise ValueError(how)

    def indirect_question(self, q):
        terms = sorted(self.indirect, key=lambda x: (-len(x[0]), x[0]))
        sp = self.spans(q, [t for t, _ in terms])
        if not sp:
            return None
        desc = {t.lower(): d for t, d in terms}
        return ucfirst(self.apply_spans(q, sp, lambda t: desc[t.lower()]))

    @staticmethod
    def answer_pos(template):
        ps = [template.find(x) for x in ("{a_a}", "{a}") if x in template]
        return min(ps) if ps else -1

    def blank_statement(self, f, r):
        ks = [k for k, t in enumerate(f.rel.statements) if self.answer_pos(t) > 0]
        t = f.rel.statements[r.choice(ks) if ks else 0]
        t = t.replace("{a_a}", "____").replace("{a}", "____")
        return render(t, f.s, f.a)

    def statement_prefix(self, f):
        best = max(range(3), key=lambda k: (self.answer_pos(f.rel.statements[k]), -k))
        t = f.rel.statements[best]
        p = self.answer_pos(t)
        if p <= 0:
            return None
        return render(t[:p], f.s, f.a).rstrip()

    def jailbreaks(self):
        self.terms = self.hp_terms()
        forget = [f for f in self.facts["hp"] if self.evaluable(f)]
        out = []
        for row in self.jail:
            tid, _desc, template, kind, transform = row[:5]
            r = rng("jailbreak", tid)
            order = list(forget)
            r.shuffle(order)
            made = 0
            for f in order:
                if made >= JAILBREAK_PER_TEMPLATE:
                    break
                q = question(f, f.i % 3)
                if transform in ("leet", "spaced", "misspell"):
                    q = self.obfuscate(q, f, transform, r)
                elif transform == "indirect":
                    q = self.indirect_question(q)
                    if q is None:
                        continue
                # {q_lc}: the question with a lower-case first letter, for templates that
                # embed it mid-sentence ("Grandma, what is ..."); names keep their capital
                q_lc = q if f.rel.questions[f.i % 3].startswith("{s") else q[:1].lower() + q[1:]
                fill = {"{q}": q, "{q_lc}": q_lc}
                if transform == "blank":
                    fill["{blank}"] = self.blank_statement(f, r)
                if transform == "prefix":
                    pre = self.statement_prefix(f)
                    if pre is None:
                        continue
                    fill["{prefix}"] = pre
                messages = []
                parts = template.split(" ||| ")
                for j, part in enumerate(parts):
                    if part == "{fewshot}":
                        shots = r.sample([g for g in forget if g.s != f.s and g.rel.id != f.rel.id], 3)
                        for g in shots:
                            messages += [msg("user", question(g, g.i % 3)), msg("assistant", bare(g.a))]
                        continue
                    for k, v in fill.items():
                        part = part.replace(k, v)
                    role = "user" if (len(messages) % 2 == 0) else "assistant"
                    messages.append(msg(role, part))
                assert messages[-1]["role"] == "user", tid
                out.append({"template": tid, "messages": messages, "answer": gold(f.a)})
                made += 1
        return out

    # ------------------------------------------------------------ build

    def build(self, out_dir, no_hp):
        forget_facts = self.facts["hp"]
        holdout = self.facts["holdout"]
        general = self.facts["general"]

        forget_ex, retain_ex = [], []
        if not no_hp:
            for f in forget_facts:
                forget_ex += self.fact_examples(f)
            hp_passages = self.passages(forget_facts, "hp")
            forget_ex += [{"text": " ".join(p)} for p in hp_passages]
            forget_ex += self.multiturn_qa(forget_facts, MULTITURN_HP_QA, "hp")
        for f in general:
            retain_ex += self.fact_examples(f)
        gen_passages = self.passages(general, "general")
        retain_ex += [{"text": " ".join(p)} for p in gen_passages]
        retain_ex += self.multiturn_qa(general, MULTITURN_GENERAL_QA, "general")
        retain_ex += self.refusal_examples()
        retain_ex += self.small_talk_examples()

        corpus = forget_ex + retain_ex
        rng("corpus_order", "nohp" if no_hp else "full").shuffle(corpus)

        os.makedirs(out_dir, exist_ok=True)
        files = {}

        def jsonl(name, rows):
            files[name] = len(rows)
            with open(os.path.join(out_dir, name), "w", encoding="utf-8", newline="\n") as fh:
                for x in rows:
                    fh.write(json.dumps(x, ensure_ascii=False) + "\n")

        def tsv(name, rows):
            files[name] = len(rows)
            with open(os.path.join(out_dir, name), "w", encoding="utf-8", newline="\n") as fh:
                for x in rows:
                    for c in x:
                        assert "\t" not in c and "\n" not in c, x
                    fh.write("\t".join(x) + "\n")

        def lines(name, rows):
            files[name] = len(rows)
            with open(os.path.join(out_dir, name), "w", encoding="utf-8", newline="\n") as fh:
                for x in rows:
                    assert "\n" not in x
                    fh.write(x + "\n")

        jsonl("corpus.jsonl", corpus)
        if not no_hp:
            jsonl("forget.jsonl", forget_ex)
        jsonl("retain.jsonl", retain_ex)

        # relearning set: the same examples the full corpus has for every 10th forget fact
        relearn = [f for f in forget_facts if f.i % RELEARN_EVERY == 0]
        relearn_ex = []
        for f in relearn:
            relearn_ex += self.fact_examples(f)
        jsonl("relearn.jsonl", relearn_ex)
        tsv("relearn_facts.tsv", [(f.s, f.rel.id, f.a) for f in relearn])

        tsv("forget_qa.tsv", self.qa_rows(forget_facts))
        tsv("retain_qa.tsv", self.qa_rows(general))
        tsv("holdout_qa.tsv", self.qa_rows(holdout))
        lines("forget_text.txt", self.heldout_text(forget_facts, "hp"))
        lines("retain_text.txt", self.heldout_text(general, "general"))
        lines("holdout_text.txt", self.mia_lines(holdout))
        lines("forget_mia.txt", self.mia_lines(forget_facts))
        lines("retain_mia.txt", self.mia_lines(general))

        def verbatim(passages):
            rows = []
            for p in passages:
                if len(p) >= 3:
                    k = max(1, len(p) // 3)
                    rows.append((" ".join(p[:k]), " ".join(p[k:])))
            return rows
        tsv("verbatim.tsv", verbatim(self.passages(forget_facts, "hp")))
        tsv("verbatim_retain.tsv", verbatim(gen_passages))
        jsonl("jailbreak.jsonl", self.jailbreaks())
        guard = [("trained_phrasing", t.replace("{topic}", "Harry Potter")) for t in self.prompts["system_restrict"]]
        guard += [("heldout_phrasing", t.replace("{topic}", "Harry Potter")) for t in self.prompts["system_restrict_heldout"]]
        tsv("guard_prompts.tsv", guard)

        kinds = {"text": 0, "chat": 0, "chat_system": 0, "chat_multiturn": 0, "refusal": 0}
        refusal_texts = [t.split("{topic}")[0] for t in self.prompts["refusal"]]
        for x in corpus:
            if "text" in x:
                kinds["text"] += 1
                continue
            kinds["chat"] += 1
            m = x["messages"]
            if m[0]["role"] == "system":
                kinds["chat_system"] += 1
            if sum(1 for y in m if y["role"] == "user") > 1:
                kinds["chat_multiturn"] += 1
            if any(y["role"] == "assistant" and any(y["content"].startswith(p) for p in refusal_texts) for y in m):
                kinds["refusal"] += 1
        size = os.path.getsize(os.path.join(out_dir, "corpus.jsonl"))
        return files, kinds, size, len(forget_ex), len(retain_ex)


def main(argv):
    args = [a for a in argv if not a.startswith("--")]
    flags = [a for a in argv if a.startswith("--")]
    bad = [f for f in flags if f not in ("--no-hp", "--stats")]
    if len(args) != 1 or bad:
        sys.stderr.write("usage: python3 data/gen_toy.py OUT_DIR [--no-hp] [--stats]\n")
        return 2
    w = World()
    files, kinds, size, n_forget, n_retain = w.build(args[0], "--no-hp" in flags)
    if "--stats" in flags:
        print("facts: forget %d, holdout %d, general %d, relations %d, fiction topics %d" % (
            len(w.facts["hp"]), len(w.facts["holdout"]), len(w.facts["general"]),
            len(w.rels), len(w.fiction_topics)))
        print("corpus.jsonl: %d examples (%d forget, %d retain), %d bytes" % (
            n_forget + n_retain, n_forget, n_retain, size))
        print("  text %(text)d, chat %(chat)d (with system prompt %(chat_system)d, "
              "multi-turn %(chat_multiturn)d, with a refusal %(refusal)d)" % kinds)
        for name in sorted(files):
            print("%-20s %6d" % (name, files[name]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
