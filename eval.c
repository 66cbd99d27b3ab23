// eval.c -- the evaluation harness shared by run, train_lora, sae and guard.
// See eval.h for the interface. Everything here goes through the engine's
// forward pass and tokenizer; nothing in this file knows how a method
// changes the model: it only sees an answer function and a hook.
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include "eval.h"

// ----------------------------------------------------------------------------
// A growable string (JSON, CSV, SVG and markdown are all built in one)

typedef struct { char* s; size_t len, cap; } Str;

static void str_add(Str* b, const char* s, size_t n) {
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (b->len + n + 1 > cap) cap *= 2;
        char* p = realloc(b->s, cap);
        if (!p) die("out of memory");
        b->s = p;
        b->cap = cap;
    }
    memcpy(b->s + b->len, s, n);
    b->len += n;
    b->s[b->len] = '\0';
}
static void str_cat(Str* b, const char* s) { str_add(b, s, strlen(s)); }
static void str_printf(Str* b, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
static void str_printf(Str* b, const char* fmt, ...) {
    char tmp[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    if (n < (int)sizeof(tmp)) { str_add(b, tmp, (size_t)n); return; }
    char* big = xmalloc((size_t)n + 1);
    va_start(ap, fmt);
    vsnprintf(big, (size_t)n + 1, fmt, ap);
    va_end(ap);
    str_add(b, big, (size_t)n);
    free(big);
}
static char* str_take(Str* b) { if (!b->s) str_add(b, "", 0); return b->s; }

static char* xstrdup(const char* s) {
    size_t n = strlen(s);
    char* d = xmalloc(n + 1);
    memcpy(d, s, n + 1);
    return d;
}

// ----------------------------------------------------------------------------
// Answering

int eval_chat_tokens(const Tokenizer* tok, const char* system, const ChatMessage* msgs, int n_msgs, int** out) {
    ChatMessage* all = xmalloc((size_t)(n_msgs + 1) * sizeof(ChatMessage));
    int n_all = 0;
    size_t cap = 64;
    if (system) { all[0].role = "system"; all[0].content = system; n_all = 1; cap += strlen(system) + 16; }
    for (int i = 0; i < n_msgs; i++) {
        all[n_all++] = msgs[i];
        cap += strlen(msgs[i].content ? msgs[i].content : "") + strlen(msgs[i].role ? msgs[i].role : "") + 16;
    }
    int* ids = xmalloc(cap * sizeof(int));
    int n = chat_encode(tok, all, n_all, 1, 1, ids, (int)cap);
    free(all);
    *out = ids;
    return n;
}

int answer_greedy(void* ctx, const ChatMessage* msgs, int n_msgs, char* out, size_t cap) {
    GreedyAnswerer* g = ctx;
    Transformer* t = g->t;
    int ctx_len = t->state.seq_len;
    int max_new = g->max_new > 0 ? g->max_new : 48;
    int* ids;
    int n = eval_chat_tokens(g->tok, g->system, msgs, n_msgs, &ids);
    size_t len = 0;
    out[0] = '\0';
    if (n + 1 >= ctx_len) { free(ids); return n; } // no room to answer: empty answer
    float* logits = forward_batch(t, ids, n, 0, NULL);
    int V = t->config.vocab_size;
    for (int step = 0; step < max_new && n + step < ctx_len; step++) {
        int next = 0;
        for (int j = 1; j < V; j++) if (logits[j] > logits[next]) next = j;
        if (is_stop_token(&t->config, g->tok, next)) break;
        if (!g->tok->is_special[next]) {
            int plen;
            const char* piece = token_piece(g->tok, next, &plen);
            if (len + plen < cap) { memcpy(out + len, piece, plen); len += plen; out[len] = '\0'; }
        }
        if (n + step + 1 >= ctx_len) break;
        logits = forward(t, next, n + step);
    }
    free(ids);
    return n;
}

static int is_word_char(unsigned char c) { return isalnum(c) || c >= 0x80; }

int answer_contains(const char* answer, const char* gold) {
    size_t la = strlen(answer), lg = strlen(gold);
    if (lg == 0) return 0;
    for (size_t i = 0; i + lg <= la; i++) {
        if (strncasecmp(answer + i, gold, lg) != 0) continue;
        int left_ok = i == 0 || !is_word_char((unsigned char)answer[i - 1]) || !is_word_char((unsigned char)gold[0]);
        int right_ok = i + lg == la || !is_word_char((unsigned char)answer[i + lg]) ||
                       !is_word_char((unsigned char)gold[lg - 1]);
        if (left_ok && right_ok) return 1;
    }
    return 0;
}

// ----------------------------------------------------------------------------
// QA accuracy

static SplitScore* split_for(QAResult* r, const char* name) {
    for (int i = 0; i < r->n_splits; i++) if (!strcmp(r->splits[i].name, name)) return &r->splits[i];
    if (r->n_splits == EVAL_MAX_SPLITS) return NULL;
    SplitScore* s = &r->splits[r->n_splits++];
    memset(s, 0, sizeof(*s));
    snprintf(s->name, sizeof(s->name), "%s", name);
    return s;
}

void eval_qa(const char* path, AnswerFn fn, void* ctx, int max_rows, FILE* log, QAResult* res) {
    memset(res, 0, sizeof(*res));
    size_t len;
    char* text = read_file(path, &len);
    if (!utf8_valid(text, len)) { fprintf(stderr, "error: %s is not valid UTF-8\n", path); exit(EXIT_FAILURE); }
    long t0 = time_in_ms();
    char answer[2048];
    int line_no = 0;
    for (char* line = text; line && *line; ) {
        char* next = strchr(line, '\n');
        if (next) *next++ = '\0';
        line_no++;
        if (line[0] == '\0') { line = next; continue; }
        char* question = line;
        char* gold = strchr(question, '\t');
        if (!gold) { fprintf(stderr, "error: %s:%d: expected question TAB answer\n", path, line_no); exit(EXIT_FAILURE); }
        *gold++ = '\0';
        char* split = strchr(gold, '\t');
        if (split) *split++ = '\0';
        ChatMessage msg = {"user", question};
        res->prompt_tokens += fn(ctx, &msg, 1, answer, sizeof(answer));
        int ok = answer_contains(answer, gold);
        res->total++;
        res->correct += ok;
        SplitScore* s = split_for(res, split && *split ? split : "all");
        if (s) { s->total++; s->correct += ok; }
        if (log) fprintf(log, "%s\t%s\t%s\t%d\n", question, gold, answer, ok);
        if (max_rows > 0 && res->total >= max_rows) break;
        line = next;
    }
    res->seconds = (time_in_ms() - t0) / 1000.0;
    free(text);
}

double qa_accuracy(const QAResult* r, const char* split) {
    if (!split) return r->total ? (double)r->correct / r->total : 0.0;
    for (int i = 0; i < r->n_splits; i++)
        if (!strcmp(r->splits[i].name, split))
            return r->splits[i].total ? (double)r->splits[i].correct / r->splits[i].total : 0.0;
    return 0.0;
}

// ----------------------------------------------------------------------------
// Metrics on plain data

// rouge_score's default tokenizer: lower-case, every run of [a-z0-9] is a
// word, everything else (punctuation, spaces, non-ASCII bytes) separates.
// Returns the word count; words[i] = start offset in low, lens[i] = length.
static int rouge_words(const char* text, char** low_out, int** starts_out, int** lens_out) {
    size_t n = strlen(text);
    char* low = xmalloc(n + 1);
    int* starts = xmalloc((n / 2 + 1) * sizeof(int));
    int* lens = xmalloc((n / 2 + 1) * sizeof(int));
    int count = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)text[i];
        low[i] = (char)((c >= 'A' && c <= 'Z') ? c + 32 : c);
    }
    low[n] = '\0';
    for (size_t i = 0; i < n;) {
        unsigned char c = (unsigned char)low[i];
        int word = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
        if (!word) { i++; continue; }
        size_t j = i;
        while (j < n && ((low[j] >= 'a' && low[j] <= 'z') || (low[j] >= '0' && low[j] <= '9'))) j++;
        starts[count] = (int)i;
        lens[count] = (int)(j - i);
        count++;
        i = j;
    }
    *low_out = low; *starts_out = starts; *lens_out = lens;
    return count;
}

Rouge rouge_l(const char* candidate, const char* reference) {
    Rouge r = {0, 0, 0};
    char *lc, *lr;
    int *sc, *nc, *sr, *nr;
    int m = rouge_words(candidate, &lc, &sc, &nc);
    int n = rouge_words(reference, &lr, &sr, &nr);
    if (m > 0 && n > 0) {
        // LCS by dynamic programming, two rows of (n+1)
        int* prev = xcalloc((size_t)n + 1, sizeof(int));
        int* cur = xcalloc((size_t)n + 1, sizeof(int));
        for (int i = 1; i <= m; i++) {
            cur[0] = 0;
            for (int j = 1; j <= n; j++) {
                int same = nc[i - 1] == nr[j - 1] && !memcmp(lc + sc[i - 1], lr + sr[j - 1], (size_t)nc[i - 1]);
                cur[j] = same ? prev[j - 1] + 1 : (prev[j] > cur[j - 1] ? prev[j] : cur[j - 1]);
            }
            int* tmp = prev; prev = cur; cur = tmp;
        }
        int lcs = prev[n];
        free(prev); free(cur);
        r.precision = (double)lcs / m;
        r.recall = (double)lcs / n;
        r.f1 = lcs > 0 ? 2.0 * r.precision * r.recall / (r.precision + r.recall) : 0.0;
    }
    free(lc); free(sc); free(nc); free(lr); free(sr); free(nr);
    return r;
}

static int cmp_float_asc(const void* a, const void* b) {
    float x = *(const float*)a, y = *(const float*)b;
    return (x > y) - (x < y);
}

double min_k_score(float* logprobs, int n, double k) {
    if (n <= 0) return NAN;
    qsort(logprobs, (size_t)n, sizeof(float), cmp_float_asc); // least likely first
    int m = (int)floor(k * n);
    if (m < 1) m = 1;
    if (m > n) m = n;
    double s = 0.0;
    for (int i = 0; i < m; i++) s -= logprobs[i];
    return s / m;
}

static int cmp_double_asc(const void* a, const void* b) {
    double x = *(const double*)a, y = *(const double*)b;
    return (x > y) - (x < y);
}

double auc_score(const double* a, int n_a, const double* b, int n_b) {
    if (n_a <= 0 || n_b <= 0) return NAN;
    // sort b once, then for each a count the b below it and the b equal to
    // it: O((n_a + n_b) log n_b) instead of every pair
    double* sb = xmalloc((size_t)n_b * sizeof(double));
    memcpy(sb, b, (size_t)n_b * sizeof(double));
    qsort(sb, (size_t)n_b, sizeof(double), cmp_double_asc);
    double wins = 0.0;
    for (int i = 0; i < n_a; i++) {
        int lo = 0, hi = n_b;            // first index with sb >= a[i]
        while (lo < hi) { int mid = (lo + hi) / 2; if (sb[mid] < a[i]) lo = mid + 1; else hi = mid; }
        int below = lo;
        hi = n_b;                        // first index with sb > a[i]
        while (lo < hi) { int mid = (lo + hi) / 2; if (sb[mid] <= a[i]) lo = mid + 1; else hi = mid; }
        wins += below + 0.5 * (lo - below);
    }
    free(sb);
    return wins / ((double)n_a * n_b);
}

double privleak(double auc_method, double auc_gold) {
    if (!(auc_gold > 0.0) || isnan(auc_method)) return NAN;
    return (auc_method - auc_gold) / auc_gold * 100.0;
}

// ----------------------------------------------------------------------------
// Measurements through the engine

int token_logprobs(Transformer* t, const Tokenizer* tok, const char* text, float* lp, int cap, float* all_logits) {
    size_t len = strlen(text);
    int ctx = t->state.seq_len, V = t->config.vocab_size;
    int* ids = xmalloc((len + 2) * sizeof(int));
    int n = 0;
    if (t->config.bos_id >= 0) ids[n++] = t->config.bos_id;
    n += encode(tok, text, len, 0, ids + n, (int)len + 1);
    if (n > ctx) n = ctx;
    if (n - 1 > cap) n = cap + 1;
    // predict tokens 1..n-1, in chunks that fit the logits buffer
    int count = 0;
    for (int p = 0; p < n - 1; p += t->state.batch_cap) {
        int k = n - 1 - p < t->state.batch_cap ? n - 1 - p : t->state.batch_cap;
        forward_batch(t, ids + p, k, p, all_logits);
        for (int i = 0; i < k; i++) lp[count++] = -(float)cross_entropy(all_logits + (size_t)i * V, V, ids[p + i + 1]);
    }
    free(ids);
    return count;
}

double eval_perplexity(Transformer* t, Tokenizer* tok, const char* path, int max_lines) {
    size_t len;
    char* text = read_file(path, &len);
    if (!utf8_valid(text, len)) { fprintf(stderr, "error: %s is not valid UTF-8\n", path); exit(EXIT_FAILURE); }
    int ctx = t->state.seq_len, V = t->config.vocab_size;
    float* logits = xmalloc((size_t)t->state.batch_cap * V * sizeof(float));
    float* lp = xmalloc((size_t)ctx * sizeof(float));
    double nll = 0.0;
    long count = 0;
    int lines = 0;
    for (char* line = text; line && *line; ) {
        char* next = strchr(line, '\n');
        if (next) *next++ = '\0';
        if (line[0] == '\0') { line = next; continue; }
        int n = token_logprobs(t, tok, line, lp, ctx, logits);
        for (int i = 0; i < n; i++) nll -= lp[i];
        count += n;
        lines++;
        if (max_lines > 0 && lines >= max_lines) break;
        line = next;
    }
    free(logits); free(lp); free(text);
    return count ? exp(nll / count) : NAN;
}

int continue_greedy(Transformer* t, const Tokenizer* tok, const char* prompt, int max_new, char* out, size_t cap) {
    size_t len = strlen(prompt), at = 0;
    int ctx = t->state.seq_len, V = t->config.vocab_size;
    int* ids = xmalloc((len + 2) * sizeof(int));
    int n = 0;
    if (t->config.bos_id >= 0) ids[n++] = t->config.bos_id;
    n += encode(tok, prompt, len, 0, ids + n, (int)len + 1);
    out[0] = '\0';
    if (n >= ctx) { free(ids); return 0; }  // no room: an empty continuation
    float* logits = forward_batch(t, ids, n, 0, NULL);
    int gen = 0;
    for (int pos = n; gen < max_new && pos < ctx; pos++) {
        int next = 0;
        for (int j = 1; j < V; j++) if (logits[j] > logits[next]) next = j;
        gen++;
        if (is_stop_token(&t->config, tok, next)) break;
        if (!tok->is_special[next]) {
            int plen;
            const char* piece = token_piece(tok, next, &plen);
            if (at + plen < cap) { memcpy(out + at, piece, plen); at += plen; out[at] = '\0'; }
        }
        if (pos + 1 >= ctx) break;
        logits = forward(t, next, pos);
    }
    free(ids);
    return gen;
}

// ----------------------------------------------------------------------------
// Reading the evaluation sets

static char* read_text(const char* path) {
    size_t len;
    char* text = read_file(path, &len);
    if (strlen(text) != len || !utf8_valid(text, len)) die("%s is not UTF-8 text", path);
    return text;
}

static int file_exists(const char* path) {
    FILE* f = fopen(path, "rb");
    if (f) fclose(f);
    return f != NULL;
}

// Splits text into its non-empty lines in place; returns the count.
static int split_lines(char* text, char*** out) {
    int n = 0, cap = 256;
    char** lines = xmalloc((size_t)cap * sizeof(char*));
    for (char* line = text; line && *line;) {
        char* next = strchr(line, '\n');
        if (next) *next++ = '\0';
        size_t l = strlen(line);
        if (l && line[l - 1] == '\r') line[--l] = '\0';
        if (l) {
            if (n == cap) { cap *= 2; lines = realloc(lines, (size_t)cap * sizeof(char*)); if (!lines) die("out of memory"); }
            lines[n++] = line;
        }
        line = next;
    }
    *out = lines;
    return n;
}

// m of n items, evenly spread: item k is kept when floor((k+1) m / n) > floor(k m / n)
static int keep_evenly(long k, long n, long m) {
    if (m <= 0 || m >= n) return 1;
    return ((k + 1) * m) / n > (k * m) / n;
}

typedef struct {
    char* question;
    char* gold;
    char* split;      // "trained", "heldout", ... ("all" when the file has no split column)
    int relearn;      // 1: a fact the relearning attack trains on
} QARow;

typedef struct { QARow* rows; int n; char* text; } QASet;

typedef struct { char* subject; char* answer; } Fact;

static void load_facts(const char* path, Fact** out, int* n_out, char** text_out) {
    char* text = read_text(path);
    char** lines;
    int n = split_lines(text, &lines);
    Fact* f = xmalloc((size_t)(n ? n : 1) * sizeof(Fact));
    for (int i = 0; i < n; i++) {
        char* a = strchr(lines[i], '\t');
        char* b = a ? strchr(a + 1, '\t') : NULL;
        if (!b) die("%s:%d: expected subject TAB relation TAB answer", path, i + 1);
        *a = '\0';
        f[i].subject = lines[i];
        f[i].answer = b + 1;
        // the QA gold is the answer without a leading article (data/README.md)
        for (const char* art[] = {"the ", "a ", "an ", NULL}, **p = art; *p; p++)
            if (!strncasecmp(f[i].answer, *p, strlen(*p))) { f[i].answer += strlen(*p); break; }
    }
    free(lines);
    *out = f; *n_out = n; *text_out = text;
}

// Loads a QA file, marks the rows of the relearning facts, keeps max rows
// stratified by split (each split keeps its share, evenly spread).
static void load_qa(QASet* s, const char* path, int max, const Fact* facts, int n_facts) {
    s->text = read_text(path);
    char** lines;
    int n = split_lines(s->text, &lines);
    QARow* all = xmalloc((size_t)(n ? n : 1) * sizeof(QARow));
    for (int i = 0; i < n; i++) {
        QARow* r = &all[i];
        r->question = lines[i];
        r->gold = strchr(lines[i], '\t');
        if (!r->gold) die("%s: line %d: expected question TAB answer", path, i + 1);
        *r->gold++ = '\0';
        r->split = strchr(r->gold, '\t');
        if (r->split) { *r->split++ = '\0'; char* more = strchr(r->split, '\t'); if (more) *more = '\0'; }
        if (!r->split || !*r->split) r->split = "all";
        if (!*r->gold) die("%s: line %d: empty answer", path, i + 1);
        r->relearn = 0;
        for (int f = 0; f < n_facts && !r->relearn; f++)
            r->relearn = !strcasecmp(r->gold, facts[f].answer) && strcasestr(r->question, facts[f].subject);
    }
    free(lines);
    // stratified subsample
    const char* names[16];
    int counts[16], n_names = 0;
    for (int i = 0; i < n; i++) {
        int k = 0;
        while (k < n_names && strcmp(names[k], all[i].split)) k++;
        if (k == n_names) {
            if (n_names == 16) die("%s: more than 16 distinct splits", path);
            names[n_names] = all[i].split; counts[n_names++] = 0;
        }
        counts[k]++;
    }
    int seen[16] = {0};
    s->rows = xmalloc((size_t)(n ? n : 1) * sizeof(QARow));
    s->n = 0;
    for (int i = 0; i < n; i++) {
        int k = 0;
        while (strcmp(names[k], all[i].split)) k++;
        long want = max > 0 ? ((long)max * counts[k] + n / 2) / n : counts[k];
        if (keep_evenly(seen[k]++, counts[k], want)) s->rows[s->n++] = all[i];
    }
    free(all);
}

static void free_qa(QASet* s) { free(s->rows); free(s->text); memset(s, 0, sizeof(*s)); }

// --- a small JSON reader: just enough for the jailbreak lines
// (objects, arrays, strings with every escape, numbers, true/false/null)

enum { J_NULL, J_BOOL, J_NUM, J_STR, J_ARR, J_OBJ };
typedef struct JNode { int type; char* str; int n; struct JNode* kids; char** keys; } JNode;
typedef struct { const char* s; const char* err; int depth; } JCursor;

static void j_ws(JCursor* c) { while (*c->s == ' ' || *c->s == '\t' || *c->s == '\n' || *c->s == '\r') c->s++; }
static void j_free(JNode* v) {
    for (int i = 0; i < v->n; i++) { j_free(&v->kids[i]); if (v->keys) free(v->keys[i]); }
    free(v->kids); free(v->keys); free(v->str);
    memset(v, 0, sizeof(*v));
}
static int j_hex4(const char* s, unsigned* out) {
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char h = s[i];
        v <<= 4;
        if (h >= '0' && h <= '9') v |= (unsigned)(h - '0');
        else if (h >= 'a' && h <= 'f') v |= (unsigned)(h - 'a' + 10);
        else if (h >= 'A' && h <= 'F') v |= (unsigned)(h - 'A' + 10);
        else return 0;
    }
    *out = v;
    return 1;
}
static char* j_string(JCursor* c) {
    if (*c->s != '"') { c->err = "expected a string"; return NULL; }
    c->s++;
    Str b = {0};
    while (*c->s != '"') {
        unsigned char ch = (unsigned char)*c->s;
        if (ch == '\0' || ch < 0x20) { c->err = "unterminated string"; free(b.s); return NULL; }
        if (ch != '\\') { str_add(&b, c->s++, 1); continue; }
        char e = c->s[1];
        c->s += 2;
        const char* simple = strchr("\"\\/bfnrt", e);
        if (e && simple) { const char* to = "\"\\/\b\f\n\r\t"; str_add(&b, &to[simple - "\"\\/bfnrt"], 1); continue; }
        unsigned cp;
        if (e != 'u' || !j_hex4(c->s, &cp)) { c->err = "bad escape"; free(b.s); return NULL; }
        c->s += 4;
        if (cp >= 0xD800 && cp <= 0xDBFF) { // a surrogate pair
            unsigned lo;
            if (c->s[0] != '\\' || c->s[1] != 'u' || !j_hex4(c->s + 2, &lo) || lo < 0xDC00 || lo > 0xDFFF) {
                c->err = "bad surrogate pair"; free(b.s); return NULL;
            }
            c->s += 6;
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
        } else if (cp >= 0xDC00 && cp <= 0xDFFF) { c->err = "bad surrogate pair"; free(b.s); return NULL; }
        if (cp == 0) { c->err = "\\u0000 in a string"; free(b.s); return NULL; }
        char u[4];
        int k;
        if (cp < 0x80) { u[0] = (char)cp; k = 1; }
        else if (cp < 0x800) { u[0] = (char)(0xC0 | (cp >> 6)); u[1] = (char)(0x80 | (cp & 63)); k = 2; }
        else if (cp < 0x10000) { u[0] = (char)(0xE0 | (cp >> 12)); u[1] = (char)(0x80 | ((cp >> 6) & 63)); u[2] = (char)(0x80 | (cp & 63)); k = 3; }
        else { u[0] = (char)(0xF0 | (cp >> 18)); u[1] = (char)(0x80 | ((cp >> 12) & 63)); u[2] = (char)(0x80 | ((cp >> 6) & 63)); u[3] = (char)(0x80 | (cp & 63)); k = 4; }
        str_add(&b, u, (size_t)k);
    }
    c->s++;
    return str_take(&b);
}
static int j_value(JCursor* c, JNode* v) {
    memset(v, 0, sizeof(*v));
    if (++c->depth > 64) { c->err = "nested too deeply"; return 0; }
    j_ws(c);
    int ok = 1;
    if (*c->s == '"') { v->type = J_STR; v->str = j_string(c); ok = v->str != NULL; }
    else if (*c->s == '[' || *c->s == '{') {
        int obj = *c->s == '{';
        char close = obj ? '}' : ']';
        v->type = obj ? J_OBJ : J_ARR;
        c->s++;
        j_ws(c);
        int cap = 0;
        while (ok && *c->s != close) {
            if (v->n == cap) {
                cap = cap ? 2 * cap : 4;
                v->kids = realloc(v->kids, (size_t)cap * sizeof(JNode));
                if (obj) v->keys = realloc(v->keys, (size_t)cap * sizeof(char*));
                if (!v->kids || (obj && !v->keys)) die("out of memory");
            }
            if (obj) {
                char* key = j_string(c);
                if (!key) { ok = 0; break; }
                j_ws(c);
                if (*c->s != ':') { free(key); c->err = "expected ':'"; ok = 0; break; }
                c->s++;
                v->keys[v->n] = key;
            }
            if (!j_value(c, &v->kids[v->n])) { if (obj) free(v->keys[v->n]); ok = 0; break; }
            v->n++;
            j_ws(c);
            if (*c->s == ',') { c->s++; j_ws(c); if (*c->s == close) { c->err = "trailing comma"; ok = 0; } }
            else if (*c->s != close) { c->err = "expected ',' or a closing bracket"; ok = 0; }
        }
        if (ok) c->s++;
    } else if (!strncmp(c->s, "true", 4) || !strncmp(c->s, "null", 4)) { v->type = c->s[0] == 't' ? J_BOOL : J_NULL; c->s += 4; }
    else if (!strncmp(c->s, "false", 5)) { v->type = J_BOOL; c->s += 5; }
    else if (*c->s == '-' || (*c->s >= '0' && *c->s <= '9')) {
        char* end;
        strtod(c->s, &end);
        v->type = J_NUM;
        c->s = end;
    } else { c->err = "unexpected character"; ok = 0; }
    c->depth--;
    if (!ok) j_free(v);
    return ok;
}
static const JNode* j_get(const JNode* o, const char* key) {
    if (o->type != J_OBJ) return NULL;
    for (int i = 0; i < o->n; i++) if (!strcmp(o->keys[i], key)) return &o->kids[i];
    return NULL;
}

typedef struct {
    char* template_id;
    ChatMessage* msgs;   // role/content point into the JNode strings
    int n_msgs;
    char** golds;
    int n_golds;
    JNode root;
} JailbreakItem;

typedef struct { JailbreakItem* items; int n; } JailbreakSet;

// One JSON line -> item; messages are {"role","content"} objects or plain
// strings (user turns); answer is a string or a list of accepted strings.
static void parse_jailbreak(const char* path, int line_no, const char* line, JailbreakItem* it) {
    JCursor c = {line, NULL, 0};
    memset(it, 0, sizeof(*it));
    if (!j_value(&c, &it->root)) die("%s:%d: %s", path, line_no, c.err);
    j_ws(&c);
    if (*c.s) die("%s:%d: text after the JSON value", path, line_no);
    const JNode* tid = j_get(&it->root, "template");
    const JNode* msgs = j_get(&it->root, "messages");
    const JNode* ans = j_get(&it->root, "answer");
    if (!msgs || msgs->type != J_ARR || msgs->n == 0 || !ans) die("%s:%d: expected \"messages\" and \"answer\"", path, line_no);
    it->template_id = tid && tid->type == J_STR ? tid->str : "all";
    it->msgs = xmalloc((size_t)msgs->n * sizeof(ChatMessage));
    for (int i = 0; i < msgs->n; i++) {
        const JNode* m = &msgs->kids[i];
        if (m->type == J_STR) { it->msgs[i].role = "user"; it->msgs[i].content = m->str; }
        else {
            const JNode* role = j_get(m, "role");
            const JNode* content = j_get(m, "content");
            if (!role || role->type != J_STR || !content || content->type != J_STR)
                die("%s:%d: message %d needs \"role\" and \"content\" strings", path, line_no, i + 1);
            it->msgs[i].role = role->str;
            it->msgs[i].content = content->str;
        }
        if (!utf8_valid(it->msgs[i].content, strlen(it->msgs[i].content))) die("%s:%d: invalid UTF-8", path, line_no);
    }
    it->n_msgs = msgs->n;
    int n_golds = ans->type == J_ARR ? ans->n : 1;
    it->golds = xmalloc((size_t)n_golds * sizeof(char*));
    for (int i = 0; i < n_golds; i++) {
        const JNode* g = ans->type == J_ARR ? &ans->kids[i] : ans;
        if (g->type != J_STR || !g->str[0]) die("%s:%d: \"answer\" must be a non-empty string or a list of them", path, line_no);
        it->golds[it->n_golds++] = g->str;
    }
}

static void load_jailbreak(JailbreakSet* s, const char* path, int per_template) {
    char* text = read_text(path);
    char** lines;
    int n = split_lines(text, &lines);
    JailbreakItem* all = xmalloc((size_t)(n ? n : 1) * sizeof(JailbreakItem));
    for (int i = 0; i < n; i++) parse_jailbreak(path, i + 1, lines[i], &all[i]);
    // per_template items of each template, evenly spread over its items
    s->items = xmalloc((size_t)(n ? n : 1) * sizeof(JailbreakItem));
    s->n = 0;
    for (int i = 0; i < n; i++) {
        long k = 0, count = 0;
        for (int j = 0; j < n; j++) {
            if (strcmp(all[j].template_id, all[i].template_id)) continue;
            if (j < i) k++;
            count++;
        }
        if (keep_evenly(k, count, per_template)) s->items[s->n++] = all[i];
        else { j_free(&all[i].root); free(all[i].msgs); free(all[i].golds); }
    }
    free(all); free(lines); free(text);
}

static void free_jailbreak(JailbreakSet* s) {
    for (int i = 0; i < s->n; i++) { j_free(&s->items[i].root); free(s->items[i].msgs); free(s->items[i].golds); }
    free(s->items);
    memset(s, 0, sizeof(*s));
}

// ----------------------------------------------------------------------------
// The harness

void eval_options_init(EvalOptions* o) {
    memset(o, 0, sizeof(*o));
    o->max_new = 32;
    o->verbmem_tokens = 128;
    o->min_k = 0.4f;
    o->train_seconds = -1.0;
}

int eval_is_harness(int argc, char** argv) {
    for (int i = 1; i < argc; i++) if (!strcmp(argv[i], "--sets")) return 1;
    return 0;
}

// One measured number: name, value (or a string), and how many items it is over.
typedef struct { char name[64]; double value; char* text; long n; } Metric;
typedef struct { Metric* m; int n, cap; } Metrics;

static void put_metric(Metrics* ms, const char* name, double value, long n) {
    if (ms->n == ms->cap) {
        ms->cap = ms->cap ? 2 * ms->cap : 64;
        ms->m = realloc(ms->m, (size_t)ms->cap * sizeof(Metric));
        if (!ms->m) die("out of memory");
    }
    Metric* m = &ms->m[ms->n++];
    snprintf(m->name, sizeof(m->name), "%s", name);
    m->value = value;
    m->text = NULL;
    m->n = n;
}
static void put_text(Metrics* ms, const char* name, const char* text) {
    put_metric(ms, name, NAN, 0);
    // CSV-safe: the report splits on commas and newlines
    char* t = xstrdup(text ? text : "");
    for (char* p = t; *p; p++) if (*p == ',' || *p == '\n' || *p == '\r' || *p == '"') *p = ' ';
    ms->m[ms->n - 1].text = t;
}

static int has_part(const EvalOptions* o, const char* part) {
    if (!o->parts) return 1;
    size_t n = strlen(part);
    for (const char* p = o->parts; *p;) {
        const char* e = strchr(p, ',');
        size_t l = e ? (size_t)(e - p) : strlen(p);
        if (l == n && !strncmp(p, part, n)) return 1;
        p += l + (e ? 1 : 0);
    }
    return 0;
}

// The state of one eval run.
typedef struct {
    const EvalOptions* o;
    EvalMethod* m;
    Transformer* t;
    Tokenizer* tok;
    GreedyAnswerer plain;      // the default answerer
    FILE* log;                 // PREFIX.answers.tsv, or NULL
    long tokens;               // prompt + answer tokens of every chat answer
    long bare_tokens;          // what the same chats cost without the method
    long prompt_tokens;
    long queries;
    double answer_seconds;
} Run;

static void install_hook(Run* r) {
    r->t->hook = r->m ? r->m->hook : NULL;
    r->t->hook_ctx = r->m ? r->m->hook_ctx : NULL;
}

static void new_sequence(Run* r) {
    install_hook(r);
    if (r->m && r->m->new_sequence) r->m->new_sequence(r->m);
}

// One chat answer through the method, with its costs tallied.
static void method_answer(Run* r, const ChatMessage* msgs, int n_msgs, char* out, size_t cap) {
    long t0 = time_in_ms();
    new_sequence(r);
    int prompt;
    if (r->m && r->m->answer) prompt = r->m->answer(r->m->answer_ctx, msgs, n_msgs, out, cap);
    else prompt = answer_greedy(&r->plain, msgs, n_msgs, out, cap);
    r->answer_seconds += (time_in_ms() - t0) / 1000.0;
    int* bare_ids;
    int bare = eval_chat_tokens(r->tok, NULL, msgs, n_msgs, &bare_ids);
    free(bare_ids);
    size_t len = strlen(out);
    int* ans = xmalloc((len + 1) * sizeof(int));
    int n_ans = encode(r->tok, out, len, 0, ans, (int)len + 1);
    free(ans);
    r->prompt_tokens += prompt;
    r->bare_tokens += bare;
    r->tokens += prompt + n_ans;
    r->queries++;
}

static void log_row(Run* r, const char* set, const char* group, const char* question, const char* gold,
                    const char* answer, double score) {
    if (!r->log) return;
    // one line per item: tabs and newlines inside fields become spaces
    const char* fields[5] = {set, group, question, gold, answer};
    for (int f = 0; f < 5; f++) {
        for (const char* p = fields[f]; *p; p++) fputc(*p == '\t' || *p == '\n' || *p == '\r' ? ' ' : *p, r->log);
        fputc('\t', r->log);
    }
    fprintf(r->log, "%.4g\n", score);
}

static void progress(const char* name, const char* what, int i, int n) {
    if (i == n || i % 20 == 0) fprintf(stderr, "\r[eval %s] %s %d/%d   ", name, what, i, n);
    if (i == n) fprintf(stderr, "\n");
}

// Forget or retain QA: accuracy per split, KnowMem (ROUGE-L of the answer
// against the gold one), and for the forget set the accuracy on the facts
// the relearning attack does not train on.
static void run_qa(Run* r, Metrics* ms, const char* name, const char* path, const Fact* facts, int n_facts) {
    QASet s;
    load_qa(&s, path, r->o->max_qa, facts, n_facts);
    int forget = !strcmp(name, "forget");
    char answer[4096];
    char key[64];
    const char* splits[8];
    int correct[8] = {0}, total[8] = {0}, n_splits = 0, rest_ok = 0, rest_n = 0, ok_all = 0;
    double rouge_r = 0.0, rouge_f = 0.0;
    for (int i = 0; i < s.n; i++) {
        QARow* q = &s.rows[i];
        ChatMessage msg = {"user", q->question};
        method_answer(r, &msg, 1, answer, sizeof(answer));
        int ok = answer_contains(answer, q->gold);
        Rouge rg = rouge_l(answer, q->gold);
        rouge_r += rg.recall;
        rouge_f += rg.f1;
        ok_all += ok;
        int k = 0;
        while (k < n_splits && strcmp(splits[k], q->split)) k++;
        if (k == n_splits && n_splits < 8) splits[n_splits++] = q->split;
        if (k < 8) { total[k]++; correct[k] += ok; }
        if (!q->relearn) { rest_n++; rest_ok += ok; }
        log_row(r, name, q->split, q->question, q->gold, answer, ok);
        snprintf(key, sizeof(key), "%s QA", name);
        progress(r->o->name, key, i + 1, s.n);
    }
    snprintf(key, sizeof(key), "%s_qa", name);
    put_metric(ms, key, s.n ? (double)ok_all / s.n : NAN, s.n);
    for (int k = 0; k < n_splits; k++) {
        if (!strcmp(splits[k], "all")) continue;
        snprintf(key, sizeof(key), "%s_qa_%s", name, splits[k]);
        put_metric(ms, key, total[k] ? (double)correct[k] / total[k] : NAN, total[k]);
    }
    if (forget && n_facts > 0) put_metric(ms, "forget_qa_rest", rest_n ? (double)rest_ok / rest_n : NAN, rest_n);
    snprintf(key, sizeof(key), "knowmem_%s", name);
    put_metric(ms, key, s.n ? rouge_r / s.n : NAN, s.n);
    snprintf(key, sizeof(key), "knowmem_%s_f1", name);
    put_metric(ms, key, s.n ? rouge_f / s.n : NAN, s.n);
    free_qa(&s);
}

static void run_ppl(Run* r, Metrics* ms, const char* key, const char* path, float* logits, float* lp) {
    char* text = read_text(path);
    char** lines;
    int n = split_lines(text, &lines), ctx = r->t->state.seq_len, used = 0;
    double nll = 0.0;
    long count = 0;
    for (int i = 0; i < n; i++) {
        if (!keep_evenly(i, n, r->o->max_text)) continue;
        new_sequence(r);
        int k = token_logprobs(r->t, r->tok, lines[i], lp, ctx, logits);
        for (int j = 0; j < k; j++) nll -= lp[j];
        count += k;
        used++;
    }
    put_metric(ms, key, count ? exp(nll / count) : NAN, used);
    free(lines); free(text);
}

// Min-K% scores of the sentences of a file (evenly subsampled).
static double* mia_scores(Run* r, const char* path, int* n_out, float* logits, float* lp) {
    char* text = read_text(path);
    char** lines;
    int n = split_lines(text, &lines), ctx = r->t->state.seq_len;
    double* s = xmalloc((size_t)(n ? n : 1) * sizeof(double));
    int m = 0;
    for (int i = 0; i < n; i++) {
        if (!keep_evenly(i, n, r->o->max_mia)) continue;
        new_sequence(r);
        int k = token_logprobs(r->t, r->tok, lines[i], lp, ctx, logits);
        if (k > 0) s[m++] = min_k_score(lp, k, r->o->min_k);
    }
    free(lines); free(text);
    *n_out = m;
    return s;
}

static double mean_of(const double* x, int n) {
    double s = 0.0;
    for (int i = 0; i < n; i++) s += x[i];
    return n ? s / n : NAN;
}

// VerbMem (MUSE): greedy continuation of a trained passage's start, ROUGE-L
// against the true continuation. MUSE cuts both to 128 tokens; our passages
// are shorter, so the model continues for as many tokens as the truth has
// (at most --verbmem-tokens) and longer texts are not penalised for length.
static void run_verbatim(Run* r, Metrics* ms, const char* path) {
    char* text = read_text(path);
    char** lines;
    int n = split_lines(text, &lines), used = 0, cap = r->o->verbmem_tokens;
    double f1 = 0.0, rec = 0.0;
    char gen[16384];
    for (int i = 0; i < n; i++) {
        if (!keep_evenly(i, n, r->o->max_verbatim)) continue;
        char* truth = strchr(lines[i], '\t');
        if (!truth) die("%s: line %d: expected prompt TAB continuation", path, i + 1);
        *truth++ = '\0';
        // the truth, cut to `cap` tokens
        size_t tl = strlen(truth);
        int* ids = xmalloc((tl + 1) * sizeof(int));
        int nt = encode(r->tok, truth, tl, 0, ids, (int)tl + 1);
        if (nt > cap) nt = cap;
        Str cut = {0};
        for (int j = 0; j < nt; j++) {
            int pl;
            const char* piece = token_piece(r->tok, ids[j], &pl);
            if (!r->tok->is_special[ids[j]]) str_add(&cut, piece, (size_t)pl);
        }
        free(ids);
        new_sequence(r);
        continue_greedy(r->t, r->tok, lines[i], nt, gen, sizeof(gen));
        if (r->m && r->m->blocks && r->m->blocks(r->m, gen)) gen[0] = '\0';
        Rouge rg = rouge_l(gen, str_take(&cut));
        f1 += rg.f1;
        rec += rg.recall;
        used++;
        log_row(r, "verbatim", "all", lines[i], cut.s, gen, rg.f1);
        free(cut.s);
        progress(r->o->name, "VerbMem", used, r->o->max_verbatim > 0 && r->o->max_verbatim < n ? r->o->max_verbatim : n);
    }
    put_metric(ms, "verbmem", used ? f1 / used : NAN, used);
    put_metric(ms, "verbmem_recall", used ? rec / used : NAN, used);
    free(lines); free(text);
}

// Leak under attack: the share of jailbreak prompts whose answer contains
// the gold answer, overall and per template.
static void run_jailbreak(Run* r, Metrics* ms, const char* path) {
    JailbreakSet s;
    load_jailbreak(&s, path, r->o->max_jailbreak);
    char answer[4096];
    const char** names = xmalloc((size_t)(s.n ? s.n : 1) * sizeof(char*));
    int* leaks = xcalloc((size_t)(s.n ? s.n : 1), sizeof(int));
    int* counts = xcalloc((size_t)(s.n ? s.n : 1), sizeof(int));
    int n_names = 0, total = 0;
    for (int i = 0; i < s.n; i++) {
        JailbreakItem* it = &s.items[i];
        method_answer(r, it->msgs, it->n_msgs, answer, sizeof(answer));
        int leak = 0;
        for (int g = 0; g < it->n_golds && !leak; g++) leak = answer_contains(answer, it->golds[g]);
        int k = 0;
        while (k < n_names && strcmp(names[k], it->template_id)) k++;
        if (k == n_names) names[n_names++] = it->template_id;
        counts[k]++;
        leaks[k] += leak;
        total += leak;
        log_row(r, "jailbreak", it->template_id, it->msgs[it->n_msgs - 1].content, it->golds[0], answer, leak);
        progress(r->o->name, "jailbreak", i + 1, s.n);
    }
    put_metric(ms, "leak", s.n ? (double)total / s.n : NAN, s.n);
    char key[64];
    for (int k = 0; k < n_names; k++) {
        snprintf(key, sizeof(key), "leak:%s", names[k]);
        put_metric(ms, key, (double)leaks[k] / counts[k], counts[k]);
    }
    free(names); free(leaks); free(counts);
    free_jailbreak(&s);
}

// "DIR/name" when the option is unset and the file exists in --sets
static const char* set_file(const EvalOptions* o, const char* given, const char* name, char* buf, size_t cap) {
    if (given) {
        if (!file_exists(given)) die("cannot read %s", given);
        return given;
    }
    if (!o->sets) return NULL;
    snprintf(buf, cap, "%s/%s", o->sets, name);
    return file_exists(buf) ? buf : NULL;
}

static void write_outputs(const EvalOptions* o, const EvalMethod* m, const Metrics* ms) {
    Str json = {0}, csv = {0};
    str_cat(&json, "{\n");
    str_cat(&csv, "method,metric,value,n\n");
    for (int i = 0; i < ms->n; i++) {
        const Metric* x = &ms->m[i];
        str_printf(&json, "  \"%s\": ", x->name);
        if (x->text) {
            str_cat(&json, "\"");
            for (const char* p = x->text; *p; p++) {
                if (*p == '\\' || *p == '"') str_add(&json, "\\", 1);
                str_add(&json, p, 1);
            }
            str_cat(&json, "\"");
            str_printf(&csv, "%s,%s,%s,\n", o->name, x->name, x->text);
        } else if (isnan(x->value) || isinf(x->value)) {
            str_cat(&json, "null");
            str_printf(&csv, "%s,%s,nan,%ld\n", o->name, x->name, x->n);
        } else {
            str_printf(&json, "%.6g", x->value);
            str_printf(&csv, "%s,%s,%.6g,%ld\n", o->name, x->name, x->value, x->n);
        }
        str_cat(&json, i + 1 < ms->n ? ",\n" : "\n");
    }
    str_cat(&json, "}\n");
    (void)m;
    char path[4096];
    snprintf(path, sizeof(path), "%s.json", o->out);
    if (write_file_atomic(path, json.s, json.len) != 0) die("cannot write %s: %s", path, strerror(errno));
    snprintf(path, sizeof(path), "%s.csv", o->out);
    if (write_file_atomic(path, csv.s, csv.len) != 0) die("cannot write %s: %s", path, strerror(errno));
    free(json.s); free(csv.s);
}

static void print_summary(const EvalOptions* o, const Metrics* ms) {
    printf("eval %s:\n", o->name);
    for (int i = 0; i < ms->n; i++) {
        const Metric* x = &ms->m[i];
        if (x->text) printf("  %-24s %s\n", x->name, x->text);
        else printf("  %-24s %.4f (n=%ld)\n", x->name, x->value, x->n);
    }
    fflush(stdout);
}

// Reads every set once before the model loads, so that a missing or
// malformed file is a one-line error that comes fast.
static void check_sets(const EvalOptions* o) {
    char b[4096];
    Fact* facts = NULL;
    int n_facts = 0;
    char* facts_text = NULL;
    const char* rf = set_file(o, o->relearn_facts, "relearn_facts.tsv", b, sizeof(b));
    if (rf) load_facts(rf, &facts, &n_facts, &facts_text);
    QASet q;
    const char* p = set_file(o, o->forget_qa, "forget_qa.tsv", b, sizeof(b));
    if (p) { load_qa(&q, p, 0, facts, n_facts); free_qa(&q); }
    if ((p = set_file(o, o->retain_qa, "retain_qa.tsv", b, sizeof(b)))) { load_qa(&q, p, 0, NULL, 0); free_qa(&q); }
    JailbreakSet j;
    if ((p = set_file(o, o->jailbreak, "jailbreak.jsonl", b, sizeof(b)))) { load_jailbreak(&j, p, 0); free_jailbreak(&j); }
    if ((p = set_file(o, o->verbatim, "verbatim.tsv", b, sizeof(b)))) {
        char* text = read_text(p);
        char** lines;
        int n = split_lines(text, &lines);
        for (int i = 0; i < n; i++) if (!strchr(lines[i], '\t')) die("%s: line %d: expected prompt TAB continuation", p, i + 1);
        free(lines); free(text);
    }
    const char* names[4] = {"forget_text.txt", "retain_text.txt", "forget_mia.txt", "holdout_text.txt"};
    const char* given[4] = {o->forget_text, o->retain_text, o->forget_mia, o->holdout_mia};
    for (int k = 0; k < 4; k++) if ((p = set_file(o, given[k], names[k], b, sizeof(b)))) free(read_text(p));
    free(facts); free(facts_text);
}

void eval_run(const EvalOptions* o, EvalMethod* m, Transformer* t, Tokenizer* tok) {
    long t0 = time_in_ms();
    Run r;
    memset(&r, 0, sizeof(r));
    r.o = o; r.m = m; r.t = t; r.tok = tok;
    r.plain.t = t; r.plain.tok = tok; r.plain.max_new = o->max_new; r.plain.system = NULL;
    int ctx = t->state.seq_len;
    char b[10][4096];
    const char* fq = set_file(o, o->forget_qa, "forget_qa.tsv", b[0], sizeof(b[0]));
    const char* rq = set_file(o, o->retain_qa, "retain_qa.tsv", b[1], sizeof(b[1]));
    const char* ft = set_file(o, o->forget_text, "forget_text.txt", b[2], sizeof(b[2]));
    const char* rt = set_file(o, o->retain_text, "retain_text.txt", b[3], sizeof(b[3]));
    const char* vb = set_file(o, o->verbatim, "verbatim.tsv", b[4], sizeof(b[4]));
    const char* fm = set_file(o, o->forget_mia, "forget_mia.txt", b[5], sizeof(b[5]));
    const char* hm = set_file(o, o->holdout_mia, "holdout_text.txt", b[6], sizeof(b[6]));
    const char* jb = set_file(o, o->jailbreak, "jailbreak.jsonl", b[7], sizeof(b[7]));
    const char* rf = set_file(o, o->relearn_facts, "relearn_facts.tsv", b[8], sizeof(b[8]));
    if (o->out) {
        snprintf(b[9], sizeof(b[9]), "%s.answers.tsv.tmp", o->out);
        r.log = fopen(b[9], "w");
        if (!r.log) die("cannot write %s: %s", b[9], strerror(errno));
        fprintf(r.log, "set\tgroup\tprompt\tgold\tanswer\tscore\n");
    }
    Fact* facts = NULL;
    int n_facts = 0;
    char* facts_text = NULL;
    if (rf) load_facts(rf, &facts, &n_facts, &facts_text);

    Metrics ms = {0};
    put_text(&ms, "kind", m && m->kind ? m->kind : "model");
    put_text(&ms, "model", o->model);
    put_text(&ms, "lora", o->lora ? o->lora : "");
    put_text(&ms, "engine", engine_build_info());
    if (o->train_seconds >= 0) put_metric(&ms, "train_seconds", o->train_seconds, 1);
    float* logits = xmalloc((size_t)t->state.batch_cap * t->config.vocab_size * sizeof(float));
    float* lp = xmalloc((size_t)ctx * sizeof(float));

    if (fq && has_part(o, "forget_qa")) run_qa(&r, &ms, "forget", fq, facts, n_facts);
    if (rq && has_part(o, "retain_qa")) run_qa(&r, &ms, "retain", rq, NULL, 0);
    if (jb && has_part(o, "jailbreak")) run_jailbreak(&r, &ms, jb);
    if (has_part(o, "ppl")) {
        long p0 = time_in_ms();
        if (ft) run_ppl(&r, &ms, "ppl_forget", ft, logits, lp);
        if (rt) run_ppl(&r, &ms, "ppl_retain", rt, logits, lp);
        if (ft || rt) fprintf(stderr, "[eval %s] perplexity (%.1f s)\n", o->name, (time_in_ms() - p0) / 1000.0);
    }
    if (vb && has_part(o, "verbmem")) run_verbatim(&r, &ms, vb);
    if (fm && hm && has_part(o, "mia")) {
        long p0 = time_in_ms();
        int nf, nh;
        double* sf = mia_scores(&r, fm, &nf, logits, lp);
        double* sh = mia_scores(&r, hm, &nh, logits, lp);
        put_metric(&ms, "mia_auc", auc_score(sf, nf, sh, nh), nf + nh);
        put_metric(&ms, "mia_mink_forget", mean_of(sf, nf), nf);
        put_metric(&ms, "mia_mink_holdout", mean_of(sh, nh), nh);
        free(sf); free(sh);
        fprintf(stderr, "[eval %s] Min-K%% membership (%.1f s)\n", o->name, (time_in_ms() - p0) / 1000.0);
    }
    if (r.queries) {
        put_metric(&ms, "prompt_tokens", (double)r.prompt_tokens / r.queries, r.queries);
        put_metric(&ms, "extra_prompt_tokens", (double)(r.prompt_tokens - r.bare_tokens) / r.queries, r.queries);
        put_metric(&ms, "tokens_per_s", r.answer_seconds > 0 ? r.tokens / r.answer_seconds : NAN, r.tokens);
        put_metric(&ms, "ms_per_query", 1000.0 * r.answer_seconds / r.queries, r.queries);
    }
    put_metric(&ms, "eval_seconds", (time_in_ms() - t0) / 1000.0, 1);
    t->hook = NULL;
    t->hook_ctx = NULL;

    print_summary(o, &ms);
    if (o->out) {
        fclose(r.log);
        char final[4096];
        snprintf(final, sizeof(final), "%s.answers.tsv", o->out);
        if (rename(b[9], final) != 0) die("cannot write %s: %s", final, strerror(errno));
        write_outputs(o, m, &ms);
        fprintf(stderr, "[eval %s] wrote %s.json, %s.csv, %s.answers.tsv\n", o->name, o->out, o->out, o->out);
    }
    for (int i = 0; i < ms.n; i++) free(ms.m[i].text);
    free(ms.m); free(logits); free(lp); free(facts); free(facts_text);
}

void eval_usage(const char* prog, const EvalMethod* m) {
    fprintf(stderr,
"Usage:   %s eval MODEL.bin -z TOK --sets DIR [options]   the shared evaluation harness (eval.c)\n"
"Example: %s eval data/toy/toy-base.bin -z data/toy/toy.tok --sets data/toy/eval -o results/toy/toy-base\n"
"Measures, with the method applied, on the same sets for every method:\n"
"  forget / retain QA accuracy (greedy chat answer contains the gold answer, per split),\n"
"  KnowMem (ROUGE-L recall of the answers), perplexity on held-out text, VerbMem (ROUGE-L F1\n"
"  of a greedy continuation of trained passages), Min-K%% membership AUC forget vs holdout\n"
"  (PrivLeak needs the gold model's AUC: report computes it), jailbreak leak rate per template,\n"
"  prompt tokens per query and tokens/s.\n"
"Sets (each defaults to DIR/<name>; a missing file skips its metric):\n"
"  --sets DIR           folder of the files below (data/toy/eval, or the real-model set)\n"
"  --forget-qa F        forget_qa.tsv      question TAB answer [TAB split]\n"
"  --retain-qa F        retain_qa.tsv\n"
"  --forget-text F      forget_text.txt    one passage per line (perplexity)\n"
"  --retain-text F      retain_text.txt\n"
"  --verbatim F         verbatim.tsv       prompt TAB true continuation\n"
"  --forget-mia F       forget_mia.txt     trained sentences, one per line\n"
"  --holdout-mia F      holdout_text.txt   never-trained sentences of the same kind\n"
"  --jailbreak F        jailbreak.jsonl    {\"template\", \"messages\", \"answer\"} lines\n"
"  --relearn-facts F    relearn_facts.tsv  subject TAB relation TAB answer: forget_qa_rest\n"
"                       is the forget accuracy without these facts' questions\n"
"Options:\n"
"  -z FILE              tokenizer (required)\n"
"  -o PREFIX            write PREFIX.json, PREFIX.csv, PREFIX.answers.tsv (default: print only)\n"
"  --name NAME          the method's name in the outputs (default: the method's kind)\n"
"  --lora FILE          apply a LoRA adapter unmerged (on top of any method)\n"
"  --parts LIST         forget_qa,retain_qa,jailbreak,ppl,verbmem,mia (default all)\n"
"  --max-qa N           questions per QA set, stratified by split (default 0 = all)\n"
"  --max-text N         passages per perplexity set (default 0 = all)\n"
"  --max-verbatim N     passages for VerbMem (default 0 = all)\n"
"  --max-mia N          sentences per membership set (default 0 = all)\n"
"  --max-jailbreak N    prompts per attack template (default 0 = all)\n"
"  --max-new N          answer tokens (default 32)\n"
"  --verbmem-tokens N   continuation cap in tokens (default 128, MUSE's)\n"
"  --min-k X            Min-K%% fraction (default 0.4, MUSE's)\n"
"  -c, --ctx CTX        context length (default min(model max, 1024))\n"
"  --train-seconds X    the method's training time, recorded in the outputs (default none)\n"
"  -h, --help           this text\n", prog, prog);
    if (m && m->usage) fprintf(stderr, "Method options:\n%s", m->usage);
    exit(EXIT_FAILURE);
}

int eval_main(int argc, char** argv, EvalMethod* m) {
    // the program's name: run, train_lora, sae or guard (argv[0] is "eval")
    const char* prog = m && m->prog ? m->prog : "run";
    EvalOptions o;
    eval_options_init(&o);
    int i = 1;
    if (argc >= 2 && argv[1][0] != '-') { o.model = argv[1]; i = 2; }
    for (; i < argc; i++) {
        const char* f = argv[i];
        if (!strcmp(f, "-h") || !strcmp(f, "--help")) eval_usage(prog, m);
        // the method's own options first: they may share a name with nothing here
        int took = 0;
        if (m && m->parse) took = m->parse(m, argc, argv, i);
        if (took > 0) { i += took - 1; continue; }
        if (i + 1 >= argc) die("%s needs a value, or is not an eval option (see --help)", f);
        const char* v = argv[++i];
        if (!strcmp(f, "-z")) o.tok = v;
        else if (!strcmp(f, "--sets")) o.sets = v;
        else if (!strcmp(f, "--forget-qa")) o.forget_qa = v;
        else if (!strcmp(f, "--retain-qa")) o.retain_qa = v;
        else if (!strcmp(f, "--forget-text")) o.forget_text = v;
        else if (!strcmp(f, "--retain-text")) o.retain_text = v;
        else if (!strcmp(f, "--verbatim")) o.verbatim = v;
        else if (!strcmp(f, "--forget-mia")) o.forget_mia = v;
        else if (!strcmp(f, "--holdout-mia")) o.holdout_mia = v;
        else if (!strcmp(f, "--jailbreak")) o.jailbreak = v;
        else if (!strcmp(f, "--relearn-facts")) o.relearn_facts = v;
        else if (!strcmp(f, "--lora")) o.lora = v;
        else if (!strcmp(f, "-o")) o.out = v;
        else if (!strcmp(f, "--name")) o.name = v;
        else if (!strcmp(f, "--parts")) o.parts = v;
        else if (!strcmp(f, "--max-qa")) o.max_qa = parse_int_arg(f, v);
        else if (!strcmp(f, "--max-text")) o.max_text = parse_int_arg(f, v);
        else if (!strcmp(f, "--max-verbatim")) o.max_verbatim = parse_int_arg(f, v);
        else if (!strcmp(f, "--max-mia")) o.max_mia = parse_int_arg(f, v);
        else if (!strcmp(f, "--max-jailbreak")) o.max_jailbreak = parse_int_arg(f, v);
        else if (!strcmp(f, "--max-new")) o.max_new = parse_int_arg(f, v);
        else if (!strcmp(f, "--verbmem-tokens")) o.verbmem_tokens = parse_int_arg(f, v);
        else if (!strcmp(f, "--min-k")) o.min_k = parse_float_arg(f, v);
        else if (!strcmp(f, "-c") || !strcmp(f, "--ctx")) o.ctx = parse_int_arg(f, v);
        else if (!strcmp(f, "--train-seconds")) o.train_seconds = parse_float_arg(f, v);
        else die("unknown option %s (see %s --help)", f, prog);
    }
    if (!o.model) die("eval needs a model file as its first argument (see --help)");
    if (!o.tok) die("a tokenizer is required (-z FILE; see --help)");
    if (o.max_qa < 0 || o.max_text < 0 || o.max_verbatim < 0 || o.max_mia < 0 || o.max_jailbreak < 0)
        die("--max-* options must be >= 0");
    if (o.max_new < 1) die("--max-new must be >= 1");
    if (o.verbmem_tokens < 1) die("--verbmem-tokens must be >= 1");
    if (!(o.min_k > 0.0f && o.min_k <= 1.0f)) die("--min-k must be in (0, 1]");
    if (o.ctx < 0) die("-c must be > 0");
    if (o.parts) {
        static const char* known[] = {"forget_qa", "retain_qa", "jailbreak", "ppl", "verbmem", "mia", NULL};
        for (const char* p = o.parts; *p;) {
            const char* e = strchr(p, ',');
            size_t l = e ? (size_t)(e - p) : strlen(p);
            int ok = 0;
            for (int k = 0; known[k] && !ok; k++) ok = strlen(known[k]) == l && !strncmp(known[k], p, l);
            if (!ok) die("--parts: unknown part '%.*s' (forget_qa, retain_qa, jailbreak, ppl, verbmem, mia)", (int)l, p);
            p += l + (e ? 1 : 0);
        }
    }
    if (!o.name) o.name = m && m->kind ? m->kind : "model";
    for (const char* p = o.name; *p; p++)
        if (*p == ',' || *p == '/' || *p == '\n' || *p == '\t') die("--name must not contain ',', '/', tabs or newlines");

    check_sets(&o);
    Tokenizer tok;
    build_tokenizer(&tok, o.tok);
    Transformer t;
    // a KV cache of 1024 positions is enough for every set: do not size it by the model's maximum
    build_transformer(&t, o.model, o.ctx);
    if (o.ctx == 0 && t.state.seq_len > 1024) {
        free_transformer(&t);
        build_transformer(&t, o.model, 1024);
    }
    if (tok.vocab_size != t.config.vocab_size)
        die("tokenizer has %d tokens but the model has %d: wrong tokenizer for this model", tok.vocab_size, t.config.vocab_size);
    if (o.lora) load_lora(&t, o.lora);
    if (m && m->setup) m->setup(m, &t, &tok, o.max_new);
    fprintf(stderr, "[eval %s] %s%s%s, context %d, %s\n", o.name, o.model, o.lora ? " + " : "", o.lora ? o.lora : "",
            t.state.seq_len, engine_build_info());
    eval_run(&o, m, &t, &tok);
    if (m && m->teardown) m->teardown(m);
    free_transformer(&t);
    free_tokenizer(&tok);
    return 0;
}

// ----------------------------------------------------------------------------
// SVG charts. Plain text, one <svg> element, fixed sizes; colours from a
// small palette that stays readable in grey.

static const char* PALETTE[] = {"#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948",
                                "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"};
#define N_PALETTE 10

static void svg_text(Str* b, const char* text) {
    for (const char* p = text; *p; p++) {
        switch (*p) {
        case '&': str_cat(b, "&amp;"); break;
        case '<': str_cat(b, "&lt;"); break;
        case '>': str_cat(b, "&gt;"); break;
        case '"': str_cat(b, "&quot;"); break;
        default: str_add(b, p, 1);
        }
    }
}

// <text ...>escaped</text>
static void svg_label(Str* b, double x, double y, const char* anchor, int size, const char* extra, const char* text) {
    str_printf(b, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"%s\" font-size=\"%d\"%s%s>", x, y, anchor, size,
               extra ? " " : "", extra ? extra : "");
    svg_text(b, text);
    str_cat(b, "</text>\n");
}

static void svg_open(Str* b, int w, int h, const char* title) {
    str_printf(b, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
                  "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" viewBox=\"0 0 %d %d\" "
                  "font-family=\"sans-serif\">\n<rect width=\"%d\" height=\"%d\" fill=\"white\"/>\n", w, h, w, h, w, h);
    svg_label(b, w / 2.0, 22, "middle", 15, "font-weight=\"bold\"", title);
}

// A "nice" axis step for a range (1, 2 or 5 times a power of ten).
static double nice_step(double range, int ticks) {
    if (!(range > 0)) return 1.0;
    double raw = range / ticks, p = pow(10.0, floor(log10(raw))), f = raw / p;
    return (f < 1.5 ? 1 : f < 3.5 ? 2 : f < 7.5 ? 5 : 10) * p;
}

char* svg_bar_chart(const char* title, const char* y_label, int n_groups, const char* const* groups,
                    int n_series, const char* const* series, const double* values, double y_max) {
    Str b = {0};
    int bar = 14, gap = 18, left = 60, top = 50, plot_h = 260, bottom = 110;
    int group_w = n_series * bar + gap;
    int legend_w = 160;
    int w = left + n_groups * group_w + 20 + legend_w, h = top + plot_h + bottom;
    if (!(y_max > 0)) y_max = 1.0;
    svg_open(&b, w, h, title);
    // axis, grid and y labels
    double step = nice_step(y_max, 5);
    for (double v = 0; v <= y_max + 1e-9; v += step) {
        double y = top + plot_h - v / y_max * plot_h;
        str_printf(&b, "<line x1=\"%d\" y1=\"%.1f\" x2=\"%d\" y2=\"%.1f\" stroke=\"#dddddd\"/>\n", left, y,
                   left + n_groups * group_w, y);
        char lab[32];
        snprintf(lab, sizeof(lab), "%g", v);
        svg_label(&b, left - 6, y + 4, "end", 11, NULL, lab);
    }
    str_printf(&b, "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"black\"/>\n", left, top + plot_h,
               left + n_groups * group_w, top + plot_h);
    char rot[96];
    snprintf(rot, sizeof(rot), "transform=\"rotate(-90 16 %d)\"", top + plot_h / 2);
    svg_label(&b, 16, top + plot_h / 2, "middle", 12, rot, y_label);
    for (int g = 0; g < n_groups; g++) {
        double x0 = left + g * group_w + gap / 2.0;
        for (int s = 0; s < n_series; s++) {
            double v = values[(size_t)g * n_series + s];
            double x = x0 + s * bar;
            if (isnan(v)) {
                svg_label(&b, x + bar / 2.0, top + plot_h - 4, "middle", 8, NULL, "n/a");
                continue;
            }
            double vv = v < 0 ? 0 : v > y_max ? y_max : v;
            double hh = vv / y_max * plot_h;
            str_printf(&b, "<rect x=\"%.1f\" y=\"%.1f\" width=\"%d\" height=\"%.1f\" fill=\"%s\"><title>", x,
                       top + plot_h - hh, bar - 2, hh, PALETTE[s % N_PALETTE]);
            svg_text(&b, groups[g]);
            str_cat(&b, ", ");
            svg_text(&b, series[s]);
            str_printf(&b, ": %.4g</title></rect>\n", v);
        }
        double xc = x0 + n_series * bar / 2.0, yl = top + plot_h + 12;
        char tr[96];
        snprintf(tr, sizeof(tr), "transform=\"rotate(-35 %.1f %.1f)\"", xc, yl);
        svg_label(&b, xc, yl, "end", 11, tr, groups[g]);
    }
    // legend
    int lx = left + n_groups * group_w + 20;
    for (int s = 0; s < n_series; s++) {
        str_printf(&b, "<rect x=\"%d\" y=\"%d\" width=\"12\" height=\"12\" fill=\"%s\"/>\n", lx, top + s * 18,
                   PALETTE[s % N_PALETTE]);
        svg_label(&b, lx + 18, top + s * 18 + 10, "start", 11, NULL, series[s]);
    }
    str_cat(&b, "</svg>\n");
    return str_take(&b);
}

char* svg_heatmap(const char* title, int n_rows, const char* const* rows, int n_cols, const char* const* cols,
                  const double* values) {
    Str b = {0};
    int cw = 46, ch = 22, left = 130, top = 150;
    int w = left + n_cols * cw + 20, h = top + n_rows * ch + 40;
    svg_open(&b, w, h, title);
    for (int c = 0; c < n_cols; c++) {
        double x = left + c * cw + cw / 2.0, y = top - 6;
        char tr[96];
        snprintf(tr, sizeof(tr), "transform=\"rotate(-50 %.1f %.1f)\"", x, y);
        svg_label(&b, x, y, "start", 11, tr, cols[c]);
    }
    for (int r = 0; r < n_rows; r++) {
        double y = top + r * ch;
        svg_label(&b, left - 6, y + ch / 2.0 + 4, "end", 11, NULL, rows[r]);
        for (int c = 0; c < n_cols; c++) {
            double v = values[(size_t)r * n_cols + c];
            double x = left + c * cw;
            if (isnan(v)) {
                str_printf(&b, "<rect x=\"%.1f\" y=\"%.1f\" width=\"%d\" height=\"%d\" fill=\"#f4f4f4\" stroke=\"white\"/>\n",
                           x, y, cw, ch);
                svg_label(&b, x + cw / 2.0, y + ch / 2.0 + 4, "middle", 9, "fill=\"#999999\"", "n/a");
                continue;
            }
            double u = v < 0 ? 0 : v > 1 ? 1 : v;
            // white (0) to dark red (1)
            int R = (int)(255 - u * (255 - 165)), G = (int)(255 - u * 255), B = (int)(255 - u * (255 - 15));
            if (G < 0) G = 0;
            str_printf(&b, "<rect x=\"%.1f\" y=\"%.1f\" width=\"%d\" height=\"%d\" fill=\"#%02x%02x%02x\" stroke=\"white\"/>\n",
                       x, y, cw, ch, R, G, B);
            char lab[16];
            snprintf(lab, sizeof(lab), "%.0f", 100.0 * v);
            svg_label(&b, x + cw / 2.0, y + ch / 2.0 + 4, "middle", 10, u > 0.55 ? "fill=\"white\"" : NULL, lab);
        }
    }
    svg_label(&b, left, h - 12, "start", 11, NULL, "cell = % of prompts whose answer contains the gold answer");
    str_cat(&b, "</svg>\n");
    return str_take(&b);
}

char* svg_line_panels(const char* title, const char* x_label, int n_panels, const SvgPanel* panels) {
    Str b = {0};
    int cols = n_panels < 3 ? (n_panels > 0 ? n_panels : 1) : 3;
    int rows = (n_panels + cols - 1) / cols;
    if (rows < 1) rows = 1;
    int pw = 300, ph = 200, mx = 60, my = 60;
    int w = cols * (pw + mx) + 20, h = 40 + rows * (ph + my) + 20;
    svg_open(&b, w, h, title);
    for (int p = 0; p < n_panels; p++) {
        const SvgPanel* P = &panels[p];
        int ox = 20 + (p % cols) * (pw + mx) + mx - 20, oy = 40 + (p / cols) * (ph + my) + 20;
        // data range
        double x0 = INFINITY, x1 = -INFINITY, y0 = INFINITY, y1 = -INFINITY;
        for (int l = 0; l < P->n_lines && l < 4; l++)
            for (int i = 0; i < P->n[l]; i++) {
                if (isnan(P->y[l][i]) || isnan(P->x[l][i]) || isinf(P->y[l][i])) continue;
                if (P->x[l][i] < x0) x0 = P->x[l][i];
                if (P->x[l][i] > x1) x1 = P->x[l][i];
                if (P->y[l][i] < y0) y0 = P->y[l][i];
                if (P->y[l][i] > y1) y1 = P->y[l][i];
            }
        svg_label(&b, ox + pw / 2.0, oy - 8, "middle", 12, "font-weight=\"bold\"", P->title);
        str_printf(&b, "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"none\" stroke=\"#888888\"/>\n", ox, oy, pw, ph);
        if (!(x1 >= x0) || !(y1 >= y0)) { svg_label(&b, ox + pw / 2.0, oy + ph / 2.0, "middle", 11, NULL, "no data"); continue; }
        if (x1 == x0) x1 = x0 + 1;
        if (y1 == y0) { y1 += 0.5; y0 -= 0.5; }
        double pad = 0.05 * (y1 - y0);
        y0 -= pad; y1 += pad;
        double step = nice_step(y1 - y0, 4);
        for (double v = ceil(y0 / step) * step; v <= y1; v += step) {
            double y = oy + ph - (v - y0) / (y1 - y0) * ph;
            str_printf(&b, "<line x1=\"%d\" y1=\"%.1f\" x2=\"%d\" y2=\"%.1f\" stroke=\"#eeeeee\"/>\n", ox, y, ox + pw, y);
            char lab[32];
            snprintf(lab, sizeof(lab), "%.3g", fabs(v) < 1e-12 ? 0.0 : v);
            svg_label(&b, ox - 4, y + 4, "end", 10, NULL, lab);
        }
        char lab[64];
        snprintf(lab, sizeof(lab), "%g", x0);
        svg_label(&b, ox, oy + ph + 14, "start", 10, NULL, lab);
        snprintf(lab, sizeof(lab), "%g", x1);
        svg_label(&b, ox + pw, oy + ph + 14, "end", 10, NULL, lab);
        svg_label(&b, ox + pw / 2.0, oy + ph + 14, "middle", 10, NULL, x_label);
        for (int l = 0; l < P->n_lines && l < 4; l++) {
            str_printf(&b, "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"1.5\" points=\"", PALETTE[l % N_PALETTE]);
            for (int i = 0; i < P->n[l]; i++) {
                if (isnan(P->y[l][i]) || isnan(P->x[l][i]) || isinf(P->y[l][i])) continue;
                str_printf(&b, "%.1f,%.1f ", ox + (P->x[l][i] - x0) / (x1 - x0) * pw, oy + ph - (P->y[l][i] - y0) / (y1 - y0) * ph);
            }
            str_cat(&b, "\"/>\n");
            // the legend goes under the panel, one entry per line kind, so it never hides a curve
            int lx = ox + l * (pw / 3);
            str_printf(&b, "<rect x=\"%d\" y=\"%d\" width=\"10\" height=\"3\" fill=\"%s\"/>\n", lx, oy + ph + 25,
                       PALETTE[l % N_PALETTE]);
            svg_label(&b, lx + 14, oy + ph + 30, "start", 10, NULL, P->names[l] ? P->names[l] : "");
        }
    }
    str_cat(&b, "</svg>\n");
    return str_take(&b);
}
