// eval.c -- the evaluation harness shared by run, train_lora, sae and guard.
// See eval.h for the interface. Everything here goes through the engine's
// forward pass and tokenizer.
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ctype.h>
#include <math.h>
#include "eval.h"

// ----------------------------------------------------------------------------
// Answering

int answer_greedy(void* ctx, const ChatMessage* msgs, int n_msgs, char* out, size_t cap) {
    GreedyAnswerer* g = ctx;
    Transformer* t = g->t;
    int ctx_len = t->state.seq_len;
    int max_new = g->max_new > 0 ? g->max_new : 48;
    // prepend the method's system prompt, if any
    ChatMessage* all = xmalloc((size_t)(n_msgs + 1) * sizeof(ChatMessage));
    int n_all = 0;
    if (g->system) { all[0].role = "system"; all[0].content = g->system; n_all = 1; }
    memcpy(all + n_all, msgs, (size_t)n_msgs * sizeof(ChatMessage));
    n_all += n_msgs;
    int* ids = xmalloc((size_t)ctx_len * sizeof(int));
    int n = chat_encode(g->tok, all, n_all, 1, 1, ids, ctx_len);
    free(all);
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
// Perplexity

double eval_perplexity(Transformer* t, Tokenizer* tok, const char* path, int max_lines) {
    size_t len;
    char* text = read_file(path, &len);
    if (!utf8_valid(text, len)) { fprintf(stderr, "error: %s is not valid UTF-8\n", path); exit(EXIT_FAILURE); }
    int ctx = t->state.seq_len, V = t->config.vocab_size;
    int* ids = xmalloc((size_t)(len + 2) * sizeof(int));
    float* logits = xmalloc((size_t)t->state.batch_cap * V * sizeof(float));
    double nll = 0.0;
    long count = 0;
    int lines = 0;
    for (char* line = text; line && *line; ) {
        char* next = strchr(line, '\n');
        if (next) *next++ = '\0';
        size_t ll = strlen(line);
        if (ll == 0) { line = next; continue; }
        int n = 0;
        if (t->config.bos_id >= 0) ids[n++] = t->config.bos_id;
        n += encode(tok, line, ll, 0, ids + n, (int)ll + 1);
        if (n > ctx) n = ctx;
        // predict tokens 1..n-1, in chunks that fit the logits buffer
        for (int p = 0; p < n - 1; p += t->state.batch_cap) {
            int k = n - 1 - p < t->state.batch_cap ? n - 1 - p : t->state.batch_cap;
            forward_batch(t, ids + p, k, p, logits);
            for (int i = 0; i < k; i++) {
                nll += cross_entropy(logits + (size_t)i * V, V, ids[p + i + 1]);
                count++;
            }
        }
        lines++;
        if (max_lines > 0 && lines >= max_lines) break;
        line = next;
    }
    free(logits); free(ids); free(text);
    return count ? exp(nll / count) : NAN;
}
