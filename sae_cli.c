// sae_cli.c -- the sae program: sparse autoencoders on the residual stream
// of Llama-3 (the method is sae.c, its maths and file format sae.h).
//
//   ./sae capture  MODEL.bin -z TOK --layer L --data FILE... -o ACTS   the activation cache
//   ./sae train    MODEL.bin -z TOK --layer L --data FILE... -o SAE.bin [--cache ACTS]
//   ./sae measure  MODEL.bin -z TOK --sae SAE.bin --forget F --retain R
//   ./sae score    MODEL.bin -z TOK --sae SAE.bin --forget F --retain R -o latents.csv
//   ./sae generate MODEL.bin -z TOK --sae SAE.bin --latents latents.csv --clamp 50 --select 20 -i PROMPT
//   ./sae chat | eval ...  (the same intervention flags)
//   ./sae planted  (a synthetic planted dictionary; no model)
//   ./sae info SAE.bin
//
// Every subcommand has --help. generate, chat and eval only install the
// SAE's hook (and its gate rule for prompts, sae_prefill) and run the
// engine's generate() and chat_loop() and the shared harness.
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include "run.h"
#include "cli.h"
#include "sae.h"
#include "eval.h"
#include "data.h"
#include "dist.h"

// ----------------------------------------------------------------------------
// Data: rows of token ids with a mask of the content positions.
//
//   text files: cut into rows of T = --seq-len positions, each BOS + T-1 tokens
//               (the same rows as train_lora and the perplexity of run)
//   .tsv files: "question<TAB>answer[<TAB>split]" lines (data.h reads
//               them), each one row in the Llama-3 chat template (user
//               question, assistant answer)
// Content positions are everything but BOS and the chat template: the
// special tokens, the role name between <|start_header_id|> and
// <|end_header_id|>, and the "\n\n" right after <|end_header_id|>. Only
// content positions are captured, scored, spliced and counted.

typedef struct {
    int* ids;
    int n;
    unsigned char* keep;   // (n,) 1 = content position
    unsigned char* kw;     // (n,) 1 = inside a keyword occurrence (score), or NULL
    char* question;        // .tsv rows (eval), else NULL
    char* answer;
    int split;             // 0 = forget, 1 = retain
} Row;

typedef struct {
    Row* rows;
    int n, cap;
} RowSet;

static Row* new_row(RowSet* set) {
    if (set->n == set->cap) {
        set->cap = set->cap ? 2 * set->cap : 64;
        set->rows = xrealloc(set->rows, (size_t)set->cap * sizeof(Row));
    }
    Row* r = &set->rows[set->n++];
    memset(r, 0, sizeof(*r));
    return r;
}

static void free_rows(RowSet* set) {
    for (int i = 0; i < set->n; i++) {
        Row* r = &set->rows[i];
        free(r->ids); free(r->keep); free(r->kw); free(r->question); free(r->answer);
    }
    free(set->rows);
    memset(set, 0, sizeof(*set));
}

static int ends_with(const char* s, const char* suffix) {
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && !strcmp(s + a - b, suffix);
}

// template positions of a chat row: specials, role names, the "\n\n" after a header
static void chat_keep_mask(const Tokenizer* tok, const int* ids, int n, unsigned char* keep) {
    int start_header = tokenizer_lookup(tok, "<|start_header_id|>");
    int end_header = tokenizer_lookup(tok, "<|end_header_id|>");
    int in_header = 0, after_header = 0;
    for (int i = 0; i < n; i++) {
        int id = ids[i];
        keep[i] = !tok->is_special[id] && !in_header && !after_header;
        after_header = 0;
        if (id == start_header) in_header = 1;
        else if (id == end_header) { in_header = 0; after_header = 1; }
    }
}

// The chat row of one QA pair: system (optional), user question, and the
// assistant answer when with_answer (the prompt only when not).
static int chat_row_ids(const Tokenizer* tok, const char* system, const char* question, const char* answer,
                        int with_answer, int* ids, int cap) {
    ChatMessage msgs[3];
    int m = 0;
    if (system) { msgs[m].role = "system"; msgs[m].content = system; m++; }
    msgs[m].role = "user"; msgs[m].content = question; m++;
    if (with_answer) { msgs[m].role = "assistant"; msgs[m].content = answer; m++; }
    return chat_encode(tok, msgs, m, !with_answer, 1, ids, cap);
}

// The chat row of one QA pair, cut to T positions, and its content mask.
static void add_qa_row(RowSet* set, const Tokenizer* tok, const char* system, const char* question, const char* answer,
                       int T, int split) {
    int cap = (int)(strlen(question) + strlen(answer) + (system ? strlen(system) : 0)) + 64;   // ids <= bytes + template
    int* ids = xmalloc((size_t)cap * sizeof(int));
    int n = chat_row_ids(tok, system, question, answer, 1, ids, cap);
    if (n > T) n = T;
    Row* r = new_row(set);
    r->n = n;
    r->ids = xmalloc((size_t)n * sizeof(int));
    memcpy(r->ids, ids, (size_t)n * sizeof(int));
    r->keep = xmalloc((size_t)n);
    chat_keep_mask(tok, r->ids, n, r->keep);
    r->question = xstrdup(question);
    r->answer = xstrdup(answer);
    r->split = split;
    free(ids);
}

// A .tsv of QA rows (data.h's reader); a third field forget|retain sets a
// row's split, otherwise split (-1: forget, and any other third field is an error).
static void load_qa_rows(RowSet* set, const Tokenizer* tok, const char* path, int T, int split, const char* system) {
    QAFile f;
    qa_read(&f, path);
    for (int i = 0; i < f.n; i++) {
        const QARow* q = &f.rows[i];
        int row_split = split;
        if (q->third) {
            if (!strncmp(q->third, "forget", 6)) row_split = 0;
            else if (!strncmp(q->third, "retain", 6)) row_split = 1;
            else if (split < 0) die("%s:%d: split must be 'forget' or 'retain', got '%s'", path, q->line, q->third);
        }
        add_qa_row(set, tok, system, q->question, q->answer, T, row_split < 0 ? 0 : row_split);
    }
    qa_free(&f);
}

// Text: rows of BOS + T-1 tokens.
static void load_text_rows(RowSet* set, const Tokenizer* tok, const char* path, int T, int split) {
    size_t len;
    char* text = read_file(path, &len);
    if (!utf8_valid(text, len)) die("%s is not valid UTF-8", path);
    int* ids = xmalloc((len + 1) * sizeof(int));
    int n = encode(tok, text, len, 0, ids, (int)len + 1);
    for (int start = 0; start < n; start += T - 1) {
        int m = n - start < T - 1 ? n - start : T - 1;
        Row* r = new_row(set);
        r->n = m + 1;
        r->ids = xmalloc((size_t)(m + 1) * sizeof(int));
        r->keep = xmalloc((size_t)(m + 1));
        r->ids[0] = tok->bos_id;
        r->keep[0] = 0;
        memcpy(r->ids + 1, ids + start, (size_t)m * sizeof(int));
        memset(r->keep + 1, 1, (size_t)m);
        r->split = split < 0 ? 0 : split;
    }
    free(ids);
    free(text);
}

static void load_rows(RowSet* set, const Tokenizer* tok, const char* path, int T, int split, const char* system) {
    int before = set->n;
    if (ends_with(path, ".tsv")) load_qa_rows(set, tok, path, T, split, system);
    else load_text_rows(set, tok, path, T, split);
    if (set->n == before) die("%s has no rows", path);
}

static int64_t content_tokens(const RowSet* set) {
    int64_t c = 0;
    for (int i = 0; i < set->n; i++) for (int p = 0; p < set->rows[i].n; p++) c += set->rows[i].keep[p];
    return c;
}

// Keywords: one per line ('#' comments). An occurrence is a
// case-insensitive match bounded by non-alphanumeric bytes; every token
// overlapping it is a keyword position.
typedef struct { char** words; int n; } Keywords;

static void load_keywords(Keywords* kw, const char* path) {
    size_t len;
    char* text = read_file(path, &len);
    if (strlen(text) != len) die("%s holds a NUL byte", path);
    memset(kw, 0, sizeof(*kw));
    int cap = 0;
    for (char* line = strtok(text, "\n"); line; line = strtok(NULL, "\n")) {
        size_t ll = strlen(line);
        while (ll && (line[ll - 1] == '\r' || line[ll - 1] == ' ')) line[--ll] = '\0';
        if (ll == 0 || line[0] == '#') continue;
        if (kw->n == cap) { cap = cap ? 2 * cap : 64; kw->words = xrealloc(kw->words, (size_t)cap * sizeof(char*)); }
        char* w = xstrdup(line);
        for (char* p = w; *p; p++) if (*p >= 'A' && *p <= 'Z') *p += 32;
        kw->words[kw->n++] = w;
    }
    free(text);
    if (kw->n == 0) die("%s has no keywords", path);
}

static int is_alnum_byte(unsigned char c) { return (c >= '0' && c <= '9') || ((c | 32) >= 'a' && (c | 32) <= 'z') || c >= 0x80; }

static void mark_keywords(RowSet* set, const Tokenizer* tok, const Keywords* kw) {
    for (int ri = 0; ri < set->n; ri++) {
        Row* r = &set->rows[ri];
        int* start = xmalloc((size_t)(r->n + 1) * sizeof(int));
        size_t total = 0;
        for (int p = 0; p < r->n; p++) { int l; token_piece(tok, r->ids[p], &l); total += l; }
        char* text = xmalloc(total + 1);
        size_t at = 0;
        for (int p = 0; p < r->n; p++) {
            int l;
            const char* piece = token_piece(tok, r->ids[p], &l);
            start[p] = (int)at;
            for (int b = 0; b < l; b++) { char c = piece[b]; text[at++] = (c >= 'A' && c <= 'Z') ? c + 32 : c; }
        }
        start[r->n] = (int)at;
        text[at] = '\0';
        r->kw = xcalloc(r->n, 1);
        for (int w = 0; w < kw->n; w++) {
            size_t wl = strlen(kw->words[w]);
            for (const char* hit = strstr(text, kw->words[w]); hit; hit = strstr(hit + 1, kw->words[w])) {
                size_t b = (size_t)(hit - text), e = b + wl;
                if ((b > 0 && is_alnum_byte(text[b - 1])) || (e < at && is_alnum_byte(text[e]))) continue;
                for (int p = 0; p < r->n; p++) if (start[p] < (int)e && start[p + 1] > (int)b) r->kw[p] = 1;
            }
        }
        free(text); free(start);
    }
}


// The content positions of a row at one engine layer, packed: returns the count.
static int capture_content(Transformer* t, const Row* r, int layer, float* tmp, float* out) {
    int d = t->config.dim, m = 0;
    sae_capture(t, r->ids, r->n, layer, layer, tmp);
    for (int p = 0; p < r->n; p++)
        if (r->keep[p]) memcpy(out + (size_t)(m++) * d, tmp + (size_t)p * d, (size_t)d * sizeof(float));
    return m;
}

// Capture shared by the MPI ranks (one process: a group of one row). Rank j
// captures row idx[j] of a group of k <= ranks rows into block j of group
// (ranks, 1 + T*dim): its content count (a float, exact below 2^24), then
// the activations. Every rank ends with every block.
static void capture_group(Transformer* t, const RowSet* rows, const int* idx, int k, int layer, float* tmp,
                          float* group, size_t block) {
    int r = dist_rank();
    float* b = group + (size_t)r * block;
    b[0] = r < k ? (float)capture_content(t, &rows->rows[idx[r]], layer, tmp, b + 1) : 0.0f;
    dist_allgather_floats(group, block);
}

// ----------------------------------------------------------------------------
// The activation stream for training: rows in a shuffled order (a new order
// each epoch), content positions only, tokens whose norm exceeds
// max_norm dropped. From the model, or from a cache file.
//
// Cache file (--cache): written by one pass over all of --data, then read
// by every run with the same model file, layer and data:
//   uint32 magic "ULAC", int32 version 1, int32 dim, int32 engine layer,
//   int64 n_tokens, int64 model file size, int64 data fingerprint
//   (total bytes of the data files and --seq-len), then 24 zero bytes;
//   then fp32 (n_tokens, dim).
#define CACHE_MAGIC 0x43414c55u  // "ULAC"
#define CACHE_HEADER 64

typedef struct {
    Transformer* t;
    const RowSet* rows;
    int layer, dim;
    uint64_t rng;
    int* order;          // row order of this epoch
    int at;              // next row in order
    int epoch;
    float* tmp;          // (T, dim) capture scratch
    float* group;        // (ranks, 1 + T*dim) the rows captured together (capture_group)
    size_t block;        // 1 + T*dim
    int group_at;        // next block of group to read (ranks: capture the next group)
    float* row_acts;     // (T, dim) content activations of the current row, in group
    int row_n, row_at;
    float* cache;        // mapped cache (n_tokens, dim), or NULL
    size_t cache_bytes;
    int64_t cache_n, cache_at;
    int64_t* block_order;// cache blocks of 256 tokens, shuffled per epoch
    int64_t n_blocks, block_at, block_left;
    float max_norm;      // drop tokens above this norm (INFINITY = keep all)
    int64_t dropped, produced;
} ActStream;

static void shuffle_ints(int* a, int n, uint64_t* rng) {
    for (int i = n - 1; i > 0; i--) { int j = (int)(splitmix64(rng) % (uint64_t)(i + 1)); int t = a[i]; a[i] = a[j]; a[j] = t; }
}
static void shuffle_i64(int64_t* a, int64_t n, uint64_t* rng) {
    for (int64_t i = n - 1; i > 0; i--) { int64_t j = (int64_t)(splitmix64(rng) % (uint64_t)(i + 1)); int64_t t = a[i]; a[i] = a[j]; a[j] = t; }
}

static void stream_next_raw(ActStream* st, float* out) {
    int d = st->dim;
    if (st->cache) {
        if (st->block_left == 0) {
            if (st->block_at == st->n_blocks) { shuffle_i64(st->block_order, st->n_blocks, &st->rng); st->block_at = 0; st->epoch++; }
            st->cache_at = st->block_order[st->block_at++] * 256;
            st->block_left = st->cache_n - st->cache_at < 256 ? st->cache_n - st->cache_at : 256;
        }
        memcpy(out, st->cache + (size_t)st->cache_at * d, (size_t)d * sizeof(float));
        st->cache_at++;
        st->block_left--;
        return;
    }
    while (st->row_at >= st->row_n) {
        int P = dist_size();
        if (st->group_at == P) {   // the next rows of the order, one per rank
            int* idx = xmalloc((size_t)P * sizeof(int));
            for (int j = 0; j < P; j++) {
                if (st->at == st->rows->n) { shuffle_ints(st->order, st->rows->n, &st->rng); st->at = 0; st->epoch++; }
                idx[j] = st->order[st->at++];
            }
            capture_group(st->t, st->rows, idx, P, st->layer, st->tmp, st->group, st->block);
            free(idx);
            st->group_at = 0;
        }
        float* b = st->group + (size_t)(st->group_at++) * st->block;
        st->row_n = (int)b[0];
        st->row_acts = b + 1;
        st->row_at = 0;
    }
    memcpy(out, st->row_acts + (size_t)(st->row_at++) * d, (size_t)d * sizeof(float));
}

static void stream_next(ActStream* st, float* out) {
    for (;;) {
        stream_next_raw(st, out);
        if (isinf(st->max_norm) || sae_norm(out, st->dim) <= st->max_norm) break;
        st->dropped++;
    }
    st->produced++;
}

static int64_t data_fingerprint(const char* const* paths, int n_paths, int T) {
    int64_t fp = T;
    for (int i = 0; i < n_paths; i++) {
        struct stat s;
        if (stat(paths[i], &s) == 0) fp += (int64_t)s.st_size;
    }
    return fp;
}

// One pass over every row, content activations appended to path
// (atomically). Under MPI the ranks capture a group of rows at a time and
// rank 0 writes.
static void write_cache(Transformer* t, const RowSet* rows, int layer, int T, const char* path, int64_t fingerprint) {
    int d = t->config.dim, P = dist_size(), writer = dist_rank() == 0;
    char tmp_path[4096];
    snprintf(tmp_path, sizeof(tmp_path), "%s.tmp", path);
    FILE* f = writer ? fopen(tmp_path, "wb") : NULL;
    if (writer && !f) die("cannot write %s: %s", tmp_path, strerror(errno));
    unsigned char h[CACHE_HEADER];
    memset(h, 0, sizeof(h));
    if (writer) fwrite(h, 1, sizeof(h), f);
    size_t block = 1 + (size_t)T * d;
    float* tmp = xmalloc((size_t)T * d * sizeof(float));
    float* group = xmalloc((size_t)P * block * sizeof(float));
    int* idx = xmalloc((size_t)P * sizeof(int));
    int64_t total = 0;
    long t0 = time_in_ms();
    for (int i0 = 0; i0 < rows->n; i0 += P) {
        int k = rows->n - i0 < P ? rows->n - i0 : P;
        for (int j = 0; j < k; j++) idx[j] = i0 + j;
        capture_group(t, rows, idx, k, layer, tmp, group, block);
        for (int j = 0; j < k; j++) {
            size_t m = (size_t)group[j * block];
            if (writer && fwrite(group + j * block + 1, sizeof(float), m * d, f) != m * d)
                die("cannot write %s: %s", tmp_path, strerror(errno));
            total += (int64_t)m;
        }
        long ms = time_in_ms() - t0;
        if (writer && (i0 / P % 16 == 15 || i0 + k == rows->n))
            fprintf(stderr, "\rcache: %d/%d rows, %lld tokens, %.0f tok/s", i0 + k, rows->n, (long long)total,
                    ms > 0 ? total * 1000.0 / ms : 0.0);
    }
    free(tmp); free(group); free(idx);
    if (!writer) return;
    fprintf(stderr, "\n");
    int64_t model_size = (int64_t)t->file_size;
    put_i32(h, (int32_t)CACHE_MAGIC); put_i32(h + 4, 1); put_i32(h + 8, d); put_i32(h + 12, layer);
    memcpy(h + 16, &total, 8); memcpy(h + 24, &model_size, 8); memcpy(h + 32, &fingerprint, 8);
    if (fseek(f, 0, SEEK_SET) != 0 || fwrite(h, 1, sizeof(h), f) != sizeof(h) || fclose(f) != 0 || rename(tmp_path, path) != 0)
        die("cannot write %s: %s", path, strerror(errno));
}

static void open_cache(ActStream* st, const char* path, int64_t model_size, int64_t fingerprint) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) die("cannot open cache %s: %s", path, strerror(errno));
    struct stat s;
    fstat(fd, &s);
    if ((size_t)s.st_size < CACHE_HEADER) die("cache %s: too small", path);
    void* map = mmap(NULL, (size_t)s.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) die("cannot mmap cache %s: %s", path, strerror(errno));
    const unsigned char* h = map;
    int64_t n, msize, fp;
    memcpy(&n, h + 16, 8); memcpy(&msize, h + 24, 8); memcpy(&fp, h + 32, 8);
    if ((uint32_t)get_i32(h) != CACHE_MAGIC || get_i32(h + 4) != 1) die("cache %s: not an activation cache", path);
    if (get_i32(h + 8) != st->dim || get_i32(h + 12) != st->layer || msize != model_size || fp != fingerprint)
        die("cache %s was made from another model, layer or data (delete it to recapture)", path);
    if ((size_t)s.st_size != CACHE_HEADER + (size_t)n * st->dim * sizeof(float) || n <= 0)
        die("cache %s: size does not match its %lld tokens (truncated?)", path, (long long)n);
    st->cache = (float*)((unsigned char*)map + CACHE_HEADER);
    st->cache_bytes = (size_t)s.st_size;
    st->cache_n = n;
    st->n_blocks = (n + 255) / 256;
    st->block_order = xmalloc((size_t)st->n_blocks * sizeof(int64_t));
    for (int64_t b = 0; b < st->n_blocks; b++) st->block_order[b] = b;
    st->block_at = st->n_blocks;   // shuffle on first use
    st->block_left = 0;
}

// A shuffle buffer: each draw takes a random slot and refills it from the
// stream, so batches mix tokens from many rows.
typedef struct {
    float* buf;
    int cap, dim;
    uint64_t rng;
} ShuffleBuffer;

static void buffer_draw(ShuffleBuffer* sb, ActStream* st, float* out, int B) {
    for (int b = 0; b < B; b++) {
        int j = (int)(splitmix64(&sb->rng) % (uint64_t)sb->cap);
        float* slot = sb->buf + (size_t)j * sb->dim;
        memcpy(out + (size_t)b * sb->dim, slot, (size_t)sb->dim * sizeof(float));
        stream_next(st, slot);
    }
}

static int cmp_float(const void* a, const void* b) {
    float x = *(const float*)a, y = *(const float*)b;
    return (x > y) - (x < y);
}

// ----------------------------------------------------------------------------
// Options: the common flags (cli.h) in co, and sae's own, all long names

typedef struct {
    const char* cmd;
    CommonOpts co;        // -z -i -n -t -p -s -c -o --system, as each subcommand takes them
    const char* sae;
    const char* data[64];
    int n_data;
    const char *forget, *retain, *qa;       // the sets of measure and score
    const char *keywords, *rule, *latents;  // how score ranks the latents; those selected
    const char *cache, *finetune;           // train's activation cache and starting SAE
    int layer, hook, n_latents, expansion, k, arch, batch, accum, buffer, T, warmup, k_aux, median;
    int64_t tokens, dead_tokens;
    float lr, decay_frac, auxk_alpha, l1, max_norm_ratio;
    int log_every, save_every;
    float tau;
    int N, contexts;
    int mode;
    float clamp_c, scale_m;
    int gate;
    float gate_alpha;
    int selftest;
    int planted_d, planted_true, planted_s;
} Opts;

// sae's own flags, in groups; a subcommand takes some groups
enum {
    G_SAE = 1 << 0,      // --sae --no-selftest
    G_DATA = 1 << 1,     // --layer --hook --data --seq-len
    G_RECIPE = 1 << 2,   // the training recipe: --n-latents ... --log-every
    G_STREAM = 1 << 3,   // the activation stream: --buffer --max-norm --cache --finetune --save-every
    G_PLANTED = 1 << 4,  // --d --true --s
    G_SETS = 1 << 5,     // --forget --retain --qa --seq-len
    G_SCORE = 1 << 6,    // --keywords --rule --tau --select --contexts
    G_INTERV = 1 << 7,   // --latents --select --mode --clamp --scale --gate --gate-alpha
};

static void opts_init(Opts* o, const char* cmd, unsigned accepts) {
    memset(o, 0, sizeof(*o));
    o->cmd = cmd;
    o->co = (CommonOpts){ .max_new = 256, .temperature = 0.0f, .topp = 0.9f, .seed = 1337, .accepts = accepts,
                          .input_help = "the prompt (generate) or the one user message (chat)" };
    o->co.out_help = !strcmp(cmd, "capture") ? "the activation cache to write (what train --cache reads), required"
                   : !strcmp(cmd, "train") ? "the SAE file to write, required"
                   : !strcmp(cmd, "score") ? "the latents CSV to write (every latent, best first), required"
                   : "also save the trained SAE here";
    o->T = 256; o->expansion = 8; o->k = -1; o->arch = SAE_TOPK; o->batch = 4096; o->accum = 1; o->buffer = 65536;
    o->tokens = -1; o->dead_tokens = -1; o->lr = -1; o->warmup = -1; o->decay_frac = 0.2f; o->auxk_alpha = 1.0f / 32.0f;
    o->k_aux = -1; o->l1 = 0.1f; o->median = 1; o->max_norm_ratio = 10.0f; o->log_every = 10;
    o->save_every = 500; o->layer = -1000; o->rule = "freq"; o->tau = 0.01f; o->N = 20; o->contexts = 5;
    o->mode = SAE_MODE_CLAMP; o->clamp_c = 50.0f; o->scale_m = 1.0f; o->gate_alpha = -1.0f;
    o->selftest = 1;
    o->planted_d = 64; o->planted_true = 128; o->planted_s = 4;
}

static int64_t parse_count(const char* flag, const char* s) {
    // integers with an optional k/M/G suffix: 2M = 2000000
    char* end;
    double v = strtod(s, &end);
    if (*end == 'k' || *end == 'K') { v *= 1e3; end++; }
    else if (*end == 'M') { v *= 1e6; end++; }
    else if (*end == 'G') { v *= 1e9; end++; }
    if (*s == '\0' || *end != '\0' || !(v >= 0) || v > 9e18) die("%s expects a count such as 500000 or 2M, got '%s'", flag, s);
    return (int64_t)v;
}

// One of two words: 0 for a, 1 for b; dies otherwise.
static int parse_choice(const char* flag, const char* v, const char* a, const char* b) {
    if (!strcmp(v, a)) return 0;
    if (!strcmp(v, b)) return 1;
    die("%s must be %s or %s, got '%s'", flag, a, b, v);
}

static int parse_mode(const char* v) {
    if (!strcmp(v, "clamp")) return SAE_MODE_CLAMP;
    if (!strcmp(v, "zero")) return SAE_MODE_ZERO;
    if (!strcmp(v, "scale")) return SAE_MODE_SCALE;
    die("--mode must be clamp, zero or scale, got '%s'", v);
}

// --data FILE...: one or more files, up to the next flag
static void parse_data(Opts* o, int argc, char** argv, int* i) {
    if (*i + 1 >= argc) die("--data needs a value (see --help)");
    while (*i + 1 < argc && argv[*i + 1][0] != '-') {
        if (o->n_data == 64) die("--data: at most 64 files");
        o->data[o->n_data++] = argv[++*i];
    }
}

// If argv[*i] is one of sae's flags in groups, takes it (and its value,
// moving *i) into o and returns 1; otherwise returns 0.
static int sae_flag(Opts* o, unsigned groups, int argc, char** argv, int* i) {
    // the flags with a plain value, and the groups that take each
    const struct { unsigned groups; CliFlag flag; } plain[] = {
        {G_SAE, {"--sae", CLI_TEXT, &o->sae}},
        {G_DATA, {"--layer", CLI_INT, &o->layer}},
        {G_RECIPE, {"--n-latents", CLI_INT, &o->n_latents}},
        {G_RECIPE, {"--expansion", CLI_INT, &o->expansion}},
        {G_RECIPE, {"--topk", CLI_INT, &o->k}},
        {G_RECIPE, {"--batch", CLI_INT, &o->batch}},
        {G_RECIPE, {"--accum", CLI_INT, &o->accum}},
        {G_RECIPE, {"--lr", CLI_FLOAT, &o->lr}},
        {G_RECIPE, {"--warmup", CLI_INT, &o->warmup}},
        {G_RECIPE, {"--decay-frac", CLI_FLOAT, &o->decay_frac}},
        {G_RECIPE, {"--auxk-alpha", CLI_FLOAT, &o->auxk_alpha}},
        {G_RECIPE, {"--k-aux", CLI_INT, &o->k_aux}},
        {G_RECIPE, {"--l1", CLI_FLOAT, &o->l1}},
        {G_RECIPE, {"--log-every", CLI_INT, &o->log_every}},
        {G_STREAM, {"--buffer", CLI_INT, &o->buffer}},
        {G_STREAM, {"--max-norm", CLI_FLOAT, &o->max_norm_ratio}},
        {G_STREAM, {"--cache", CLI_TEXT, &o->cache}},
        {G_STREAM, {"--finetune", CLI_TEXT, &o->finetune}},
        {G_STREAM, {"--save-every", CLI_INT, &o->save_every}},
        {G_PLANTED, {"--d", CLI_INT, &o->planted_d}},
        {G_PLANTED, {"--true", CLI_INT, &o->planted_true}},
        {G_PLANTED, {"--s", CLI_INT, &o->planted_s}},
        {G_SETS, {"--forget", CLI_TEXT, &o->forget}},
        {G_SETS, {"--retain", CLI_TEXT, &o->retain}},
        {G_SETS, {"--qa", CLI_TEXT, &o->qa}},
        {G_SCORE, {"--keywords", CLI_TEXT, &o->keywords}},
        {G_SCORE, {"--rule", CLI_TEXT, &o->rule}},
        {G_SCORE, {"--tau", CLI_FLOAT, &o->tau}},
        {G_SCORE, {"--contexts", CLI_INT, &o->contexts}},
        {G_INTERV, {"--latents", CLI_TEXT, &o->latents}},
        {G_INTERV, {"--clamp", CLI_FLOAT, &o->clamp_c}},
        {G_INTERV, {"--scale", CLI_FLOAT, &o->scale_m}},
        {G_INTERV, {"--gate", CLI_INT, &o->gate}},
        {G_INTERV, {"--gate-alpha", CLI_FLOAT, &o->gate_alpha}},
        // the flags of two groups
        {G_DATA | G_SETS, {"--seq-len", CLI_INT, &o->T}},
        {G_SCORE | G_INTERV, {"--select", CLI_INT, &o->N}},
    };
    for (size_t k = 0; k < sizeof(plain) / sizeof(plain[0]); k++)
        if ((groups & plain[k].groups) && cli_flag(&plain[k].flag, 1, argc, argv, i)) return 1;
    // the others: one of two words, a count with a k/M/G suffix, a list of files
    const char* f = argv[*i];
    if ((groups & G_SAE) && !strcmp(f, "--no-selftest")) o->selftest = !parse_int_arg(f, cli_value(argc, argv, i));
    else if ((groups & G_DATA) && !strcmp(f, "--data")) parse_data(o, argc, argv, i);
    else if ((groups & G_DATA) && !strcmp(f, "--hook"))
        o->hook = parse_choice(f, cli_value(argc, argv, i), "post", "pre") ? SAE_HOOK_RESID_PRE : SAE_HOOK_RESID_POST;
    else if ((groups & G_RECIPE) && !strcmp(f, "--arch"))
        o->arch = parse_choice(f, cli_value(argc, argv, i), "topk", "relu") ? SAE_RELU : SAE_TOPK;
    else if ((groups & G_RECIPE) && !strcmp(f, "--bdec")) o->median = !parse_choice(f, cli_value(argc, argv, i), "median", "mean");
    else if ((groups & G_RECIPE) && !strcmp(f, "--tokens")) o->tokens = parse_count(f, cli_value(argc, argv, i));
    else if ((groups & G_RECIPE) && !strcmp(f, "--dead-tokens")) o->dead_tokens = parse_count(f, cli_value(argc, argv, i));
    else if ((groups & G_INTERV) && !strcmp(f, "--mode")) o->mode = parse_mode(cli_value(argc, argv, i));
    else return 0;
    return 1;
}

// The --help lines of sae's own flags, by the groups that take them, in the order printed.
static const struct { unsigned groups; const char* lines; } SAE_FLAG_HELP[] = {
    {G_SAE,
"  --sae FILE       the SAE (from sae train or sae_export.py), required\n"
"  --no-selftest 1  skip the FVU check at layers L-1, L, L+1 when loading the SAE\n"},
    {G_DATA,
"  --layer L        the residual stream after block L (0-based; the engine's hook L,\n"
"                   Hugging Face hidden_states[L+1]), required\n"
"  --hook post|pre  pre: the input of block L instead (default post)\n"
"  --data FILE...   one or more files: text is cut into rows of --seq-len positions (BOS +\n"
"                   text); .tsv holds question<TAB>answer[<TAB>forget|retain] lines, each\n"
"                   one row in the Llama-3 chat template\n"},
    {G_DATA | G_SETS,
"  --seq-len N      positions per row (default 256)\n"},
    {G_RECIPE,
"  --arch topk|relu SAE architecture (default topk)\n"
"  --topk K         TopK k (default 32; planted: --s)\n"
"  --n-latents N    latents (default --expansion x dim; planted: 2 x --true)\n"
"  --expansion E    latents per model dimension (default 8)\n"
"  --tokens N       training tokens, k/M/G suffixes (default 1M; planted: 400k)\n"
"  --batch N        batch in tokens (default 4096; planted: 256); under mpirun, shared by\n"
"                   the ranks\n"
"  --accum N        batches per Adam step, their gradients averaged (default 1)\n"
"  --lr X           Adam lr (default 2e-4/sqrt(n/16384); planted: 1e-2)\n"
"  --warmup N       warmup steps (default min(1000, steps/10))\n"
"  --decay-frac F   linear decay to 0 over the last F of the steps (default 0.2)\n"
"  --auxk-alpha X   AuxK weight (default 1/32; 0 = off)\n"
"  --k-aux N        AuxK latents per token (default dim/2)\n"
"  --dead-tokens N  dead after N tokens without firing (default min(10M, tokens/10); planted: 20000)\n"
"  --l1 X           ReLU: L1 weight on sum f / rms(x - mean) (default 0.1)\n"
"  --bdec median|mean  b_dec init (default median)\n"
"  --log-every N    progress every N steps (default 10)\n"},
    {G_STREAM,
"  --buffer N       shuffle buffer in tokens (default 65536, at most 1 GiB)\n"
"  --max-norm R     drop tokens whose norm exceeds R x the median (default 10; 0 = off)\n"
"  --cache FILE     activation cache (sae capture writes one): written by one pass over\n"
"                   --data if missing, then reused\n"
"  --finetune FILE  start from this SAE instead of a fresh init\n"
"  --save-every N   save every N steps (default 500; 0 = at the end only)\n"},
    {G_PLANTED,
"  --d D            dimension (default 64)\n"
"  --true N         planted directions (default 128)\n"
"  --s S            directions active per sample (default 4)\n"},
    {G_SETS,
"  --forget FILE    forget text or QA .tsv\n"
"  --retain FILE    retain text or QA .tsv\n"
"  --qa FILE        one QA .tsv with a forget|retain column, instead of the two\n"},
    {G_SCORE,
"  --rule R         freq|diff|ratio|sq_ratio|keyword (default freq; sae.h says what each is)\n"
"  --keywords FILE  keyword list: statistics at keyword positions (needed by --rule keyword)\n"
"  --tau X          eligible only when the retain frequency <= X (default 0.01)\n"
"  --contexts N     top contexts printed per selected latent (default 5)\n"},
    {G_SCORE | G_INTERV,
"  --select N       latents selected: the first N eligible ones (default 20)\n"},
    {G_INTERV,
"  --latents CSV    from sae score (its first --select eligible rows), or a list such as 12,345\n"
"  --mode M         clamp|zero|scale (default clamp): an active selected latent is set to\n"
"                   -clamp, to 0, or to -scale times its value; the SAE error term is kept\n"
"  --clamp C        clamp value (default 50)\n"
"  --scale M        scale factor (default 1)\n"
"  --gate 1         per-sequence gate: intervene only once the fraction of positions with a\n"
"                   selected latent active exceeds alpha\n"
"  --gate-alpha X   alpha (default: from the CSV when --select matches the score run)\n"},
};

static void print_sae_flags(FILE* f, unsigned groups) {
    for (size_t k = 0; k < sizeof(SAE_FLAG_HELP) / sizeof(SAE_FLAG_HELP[0]); k++)
        if (groups & SAE_FLAG_HELP[k].groups) fputs(SAE_FLAG_HELP[k].lines, f);
}

static const Command* find_command(const char* name);

static void usage(const Opts* o, unsigned groups) {
    const char* positional = !strcmp(o->cmd, "planted") ? "" : !strcmp(o->cmd, "info") ? "SAE.bin " : "MODEL.bin ";
    printf("Usage: sae %s %s[flags]   %s\n\n", o->cmd, positional, find_command(o->cmd)->summary);
    cli_print_common(stdout, &o->co);
    print_sae_flags(stdout, groups);
    cli_print_help_flag(stdout);
    exit(EXIT_SUCCESS);
}

// Parses a subcommand's flags (argv[0] is its name) into o.
static void parse_args(Opts* o, unsigned accepts, unsigned groups, int argc, char** argv) {
    opts_init(o, argv[0], accepts);
    for (int i = cli_model(&o->co, argc, argv); i < argc; i++) {
        if (cli_is_help(argv[i])) usage(o, groups);
        if (cli_common(&o->co, argc, argv, &i)) continue;
        if (!sae_flag(o, groups, argc, argv, &i)) cli_unknown(argv[i]);
    }
    cli_check(&o->co);
    if (o->T < 2) die("--seq-len must be >= 2");
    if (o->batch < 1 || o->accum < 1) die("--batch and --accum must be >= 1");
    if (o->N < 0) die("--select must be >= 0");
}

// ----------------------------------------------------------------------------
// Loading a model, a tokenizer and an SAE, and the SAE's self-test

static void open_model(Transformer* t, Tokenizer* tok, const Opts* o, int ctx) {
    cli_need(o->co.model != NULL, o->cmd, "a model file as its first argument");
    cli_need(o->co.tokenizer != NULL, o->cmd, "a tokenizer (-z FILE)");
    cli_load_model(&o->co, ctx, t, tok);
}

static void print_sae(const Sae* s, const char* path) {
    int e = sae_engine_layer(s);
    printf("sae %s: d %d, n %d, %s", path, s->d, s->n, sae_arch_name(s->arch));
    if (s->arch == SAE_TOPK) printf(" k %d", s->k);
    printf(", layer %d (%s, engine hook %d)", s->layer,
           s->hook == SAE_HOOK_RESID_PRE ? "input of block = resid_pre" : "output of block = resid_post", e);
    if (s->train_tokens) printf(", trained on %lld tokens, FVU %.4f", (long long)s->train_tokens, s->train_fvu);
    printf("\n");
}

// The SAE of --sae, checked against model t, its header printed.
static void load_sae_for(Sae* s, const char* path, const Transformer* t) {
    char err[512];
    if (!path) die("an SAE is required (--sae FILE; see --help)");
    if (sae_load(s, path, err, sizeof(err)) != 0) die("%s", err);
    if (s->d != t->config.dim) die("SAE %s has d=%d but the model's dim is %d", path, s->d, t->config.dim);
    int e = sae_engine_layer(s);
    if (e < 0 || e >= t->config.n_layers)
        die("SAE layer %d (%s) cannot be hooked in a model of %d layers", s->layer,
            s->hook == SAE_HOOK_RESID_PRE ? "input of the block" : "output of the block", t->config.n_layers);
    print_sae(s, path);
}

static const char* SELFTEST_TEXT =
    "The river ran quietly past the old mill, where a few children were skipping stones across the water. "
    "In the town square, the baker opened his shop early and the smell of fresh bread drifted down the street. "
    "Scientists measure the speed of light in a vacuum as about three hundred thousand kilometres per second, "
    "and the capital of France is Paris.";

// FVU of the SAE on up to max_tokens content positions at its own layer
// and at the two neighbouring layers. A neighbour that fits better means
// the layer or the hook convention is wrong (sae.h).
static void sae_selftest(Transformer* t, const Tokenizer* tok, const Sae* s, const RowSet* rows, int max_tokens) {
    RowSet builtin;
    memset(&builtin, 0, sizeof(builtin));
    if (!rows || rows->n == 0) {
        size_t len = strlen(SELFTEST_TEXT);
        int* ids = xmalloc((len + 2) * sizeof(int));
        ids[0] = tok->bos_id;
        int n = 1 + encode(tok, SELFTEST_TEXT, len, 0, ids + 1, (int)len + 1);
        if (n > t->state.seq_len) n = t->state.seq_len;
        Row* r = new_row(&builtin);
        r->ids = ids; r->n = n;
        r->keep = xmalloc(n);
        memset(r->keep, 1, n);
        r->keep[0] = 0;
        rows = &builtin;
    }
    int d = s->d, e = sae_engine_layer(s), L = t->config.n_layers;
    int lo = e > 0 ? e - 1 : e, hi = e + 1 < L ? e + 1 : e, nl = hi - lo + 1;
    float* acts = xmalloc((size_t)nl * max_tokens * d * sizeof(float));
    int got = 0;
    for (int i = 0; i < rows->n && got < max_tokens; i++) {
        const Row* r = &rows->rows[i];
        if (r->n > t->state.seq_len) continue;
        float* tmp = xmalloc((size_t)nl * r->n * d * sizeof(float));
        sae_capture(t, r->ids, r->n, lo, hi, tmp);
        for (int p = 0; p < r->n && got < max_tokens; p++) {
            if (!r->keep[p]) continue;
            for (int l = 0; l < nl; l++)
                memcpy(acts + ((size_t)l * max_tokens + got) * d, tmp + ((size_t)l * r->n + p) * d, (size_t)d * sizeof(float));
            got++;
        }
        free(tmp);
    }
    if (got == 0) { fprintf(stderr, "warning: sae self-test: no content tokens\n"); free(acts); free_rows(&builtin); return; }
    double fvu[3], l0[3];
    int best = 0;
    printf("self-test on %d tokens: FVU", got);
    for (int l = 0; l < nl; l++) {
        fvu[l] = sae_fvu(s, acts + (size_t)l * max_tokens * d, got, &l0[l]);
        if (fvu[l] < fvu[best]) best = l;
        printf("%s layer %d%s %.4f", l ? " |" : "", s->layer + (lo + l - e), lo + l == e ? " (its own)" : "", fvu[l]);
    }
    printf("; L0 %.1f\n", l0[e - lo]);
    if (lo + best != e)
        fprintf(stderr, "warning: the SAE reconstructs layer %d better than its own layer %d: wrong --layer or hook "
                "convention? (see sae.h)\n", s->layer + (lo + best - e), s->layer);
    if (fvu[e - lo] > 0.5)
        fprintf(stderr, "warning: FVU %.3f at the SAE's own layer: it does not fit this model's activations\n", fvu[e - lo]);
    free(acts);
    free_rows(&builtin);
}

// ----------------------------------------------------------------------------
// sae capture / sae train / sae planted

static void train_config_from_opts(SaeTrainConfig* c, const Opts* o, int d, int n, int k, int arch, int steps) {
    sae_train_defaults(c, d, n, k, arch);
    if (o->lr > 0) c->lr = o->lr;
    c->total_steps = steps;
    c->warmup = o->warmup >= 0 ? o->warmup : (steps / 10 < 1000 ? steps / 10 : 1000);
    c->decay_frac = o->decay_frac;
    c->auxk_alpha = o->auxk_alpha;
    if (o->k_aux > 0) c->k_aux = o->k_aux;
    c->l1 = o->l1;
    int64_t step_tokens = (int64_t)o->batch * o->accum, tokens = steps * step_tokens;
    c->dead_tokens = o->dead_tokens > 0 ? o->dead_tokens : (tokens / 10 < 10000000 ? tokens / 10 : 10000000);
    if (c->dead_tokens < step_tokens) c->dead_tokens = step_tokens;
}

static void print_progress(int step, int steps, int64_t tokens, long ms, const SaeTrainStats* st, int relu) {
    printf("step %5d/%d | %9lld tok | %7.0f tok/s | FVU %.4f | L0 %6.1f | dead %5.1f%% | %s %.4f | lr %.2e\n",
           step, steps, (long long)tokens, ms > 0 ? tokens * 1000.0 / ms : 0.0, st->fvu, st->l0,
           100.0 * st->dead_frac, relu ? "L1" : "auxk", relu ? st->l1 : st->auxk, st->lr);
    fflush(stdout);
}

static void save_or_die(const Sae* s, const char* path) {
    if (dist_rank() != 0) return;   // under mpirun the ranks hold the same SAE; rank 0 writes it
    if (sae_save(s, path) != 0) die("cannot write %s: %s", path, strerror(errno));
}

// The engine hook layer of --layer (and --hook); dies when the model has none such.
static int data_layer(const Opts* o, const Transformer* t) {
    int e = o->hook == SAE_HOOK_RESID_PRE ? o->layer - 1 : o->layer;
    if (e < 0 || e >= t->config.n_layers)
        die("--layer %d%s is not a hookable layer of this %d-layer model", o->layer, o->hook ? " --hook pre" : "", t->config.n_layers);
    return e;
}

// The rows of every --data file; dies when they hold no content token.
static int64_t load_data_rows(RowSet* rows, const Tokenizer* tok, const Opts* o, int e) {
    memset(rows, 0, sizeof(*rows));
    for (int i = 0; i < o->n_data; i++) load_rows(rows, tok, o->data[i], o->T, 0, o->co.system);
    int64_t data_tokens = content_tokens(rows);
    if (data_tokens == 0) die("the --data files have no content tokens");
    printf("data: %d rows, %lld content tokens; layer %d (%s), engine hook %d\n", rows->n, (long long)data_tokens,
           o->layer, o->hook ? "input of the block" : "output of the block", e);
    return data_tokens;
}

// What capture and train start from (they need --layer, --data and -o,
// out_file named when missing): the model, its tokenizer and the rows of
// --data. Returns the engine hook layer; *data_tokens the content tokens.
static int open_data(const Opts* o, const char* out_file, Transformer* t, Tokenizer* tok, RowSet* rows,
                     int64_t* data_tokens) {
    cli_need(o->layer != -1000, o->cmd, "--layer L");
    cli_need(o->n_data > 0, o->cmd, "--data FILE...");
    cli_need(o->co.out != NULL, o->cmd, out_file);
    open_model(t, tok, o, o->T);
    int e = data_layer(o, t);
    *data_tokens = load_data_rows(rows, tok, o, e);
    return e;
}

static int capture_main(int argc, char** argv) {
    Opts o;
    parse_args(&o, CLI_TOK | CLI_OUT | CLI_SYSTEM, G_DATA, argc, argv);
    dist_init(&argc, &argv);   // under mpirun the ranks share the rows
    Transformer t;
    Tokenizer tok;
    RowSet rows;
    int64_t data_tokens;
    int e = open_data(&o, "-o ACTS (the cache file)", &t, &tok, &rows, &data_tokens);
    write_cache(&t, &rows, e, o.T, o.co.out, data_fingerprint(o.data, o.n_data, o.T));
    printf("wrote %s\n", o.co.out);
    free_rows(&rows);
    free_transformer(&t);
    free_tokenizer(&tok);
    dist_finalize();
    return 0;
}

// The activation stream over rows at engine layer e, from --cache when given
// (captured first if missing). Returns the tokens it holds.
static int64_t stream_open(ActStream* st, Transformer* t, const RowSet* rows, int e, const Opts* o, int64_t data_tokens) {
    int d = t->config.dim;
    memset(st, 0, sizeof(*st));
    st->t = t; st->rows = rows; st->layer = e; st->dim = d; st->rng = o->co.seed * 7919 + 1;
    st->max_norm = INFINITY;
    st->order = xmalloc((size_t)rows->n * sizeof(int));
    for (int i = 0; i < rows->n; i++) st->order[i] = i;
    st->at = rows->n;   // shuffle on first use
    st->tmp = xmalloc((size_t)o->T * d * sizeof(float));
    st->block = 1 + (size_t)o->T * d;
    st->group = xmalloc((size_t)dist_size() * st->block * sizeof(float));
    st->group_at = dist_size();   // capture on first use
    if (!o->cache) return data_tokens;
    int64_t fp = data_fingerprint(o->data, o->n_data, o->T);
    // rank 0 decides whether to capture (the ranks share the file), and
    // every rank opens the cache once rank 0 has renamed it into place
    unsigned char missing = dist_rank() == 0 && access(o->cache, F_OK) != 0;
    dist_or_bytes(&missing, 1);
    if (missing) {
        printf("capturing activations into the cache %s\n", o->cache);
        write_cache(t, rows, e, o->T, o->cache, fp);
    }
    dist_barrier();
    open_cache(st, o->cache, (int64_t)t->file_size, fp);
    printf("cache %s: %lld tokens\n", o->cache, (long long)st->cache_n);
    return st->cache_n;
}

static void stream_close(ActStream* st) {
    free(st->order); free(st->tmp); free(st->group); free(st->block_order);
    if (st->cache) munmap((char*)st->cache - CACHE_HEADER, st->cache_bytes);
}

// The shuffle buffer, filled once; then the norm filter from its median.
static void buffer_fill(ShuffleBuffer* sb, ActStream* st, int64_t data_tokens, const Opts* o) {
    int d = st->dim;
    int64_t buf_cap = o->buffer;
    if (buf_cap > (1 << 28) / d) buf_cap = (1 << 28) / d;
    if (buf_cap > data_tokens) buf_cap = data_tokens;
    if (buf_cap < 1) buf_cap = 1;
    *sb = (ShuffleBuffer){xmalloc((size_t)buf_cap * d * sizeof(float)), (int)buf_cap, d, o->co.seed * 31 + 7};
    for (int64_t i = 0; i < buf_cap; i++) stream_next(st, sb->buf + (size_t)i * d);
    if (o->max_norm_ratio <= 0) return;
    float* norms = xmalloc((size_t)buf_cap * sizeof(float));
    for (int64_t i = 0; i < buf_cap; i++) norms[i] = sae_norm(sb->buf + (size_t)i * d, d);
    qsort(norms, (size_t)buf_cap, sizeof(float), cmp_float);
    float median = norms[buf_cap / 2];
    st->max_norm = o->max_norm_ratio * median;
    for (int64_t i = 0; i < buf_cap; i++) {
        float* slot = sb->buf + (size_t)i * d;
        if (sae_norm(slot, d) > st->max_norm) { st->dropped++; stream_next(st, slot); }
    }
    printf("token norms: median %.3f, dropping tokens above %.3f\n", median, st->max_norm);
    free(norms);
}

// The SAE to train: a copy of --finetune's, or a fresh one (initialised from data later).
static void training_sae(Sae* s, const Opts* o, int d) {
    int k = o->k > 0 ? o->k : 32;
    if (o->finetune) {
        Sae from;
        char err[512];
        if (sae_load(&from, o->finetune, err, sizeof(err)) != 0) die("%s", err);
        if (from.d != d) die("--finetune SAE has d=%d, the model %d", from.d, d);
        if (from.arch != SAE_TOPK && from.arch != SAE_RELU) die("--finetune: cannot train a %s SAE", sae_arch_name(from.arch));
        sae_alloc(s, from.d, from.n, o->k > 0 ? o->k : from.k, from.arch);
        memcpy((char*)s->memory + SAE_HEADER_BYTES, (char*)from.memory + SAE_HEADER_BYTES, s->memory_size - SAE_HEADER_BYTES);
        s->sub_bdec = from.sub_bdec; s->act_scale = from.act_scale; s->train_tokens = from.train_tokens;
        if (s->sub_bdec != 1 || s->act_scale != 1.0f) die("--finetune needs an SAE that encodes x - b_dec with act_scale 1");
        sae_free(&from);
    } else {
        int n = o->n_latents > 0 ? o->n_latents : o->expansion * d;
        if (o->arch == SAE_TOPK && (k < 1 || k > n)) die("--topk %d must be in [1, %d]", k, n);
        sae_alloc(s, d, n, o->arch == SAE_TOPK ? k : 0, o->arch);
    }
    s->layer = o->layer;
    s->hook = o->hook;
}

// One Adam step on the step's tokens x: --accum x ranks micro-batches of mb
// tokens, this rank's being a*ranks + rank. Each gradient starts from zero;
// they are summed here and over the ranks, then averaged, so a step is the
// same sum whether its micro-batches ran in one process or on several ranks
// (docs/mpi.md). A latent fired when it fired in any micro-batch.
static SaeTrainStats accum_step(SaeTrainer* tr, const float* x, int mb, int A, float* acc, unsigned char* fired) {
    const Sae* s = tr->sae;
    int P = dist_size(), micros = A * P, d = s->d, n = s->n;
    size_t count = s->memory_size / sizeof(float);
    double sum[5] = {0};   // loss, fvu, auxk, l1, l0: means over the micro-batches
    for (int a = 0; a < A; a++) {
        SaeTrainStats st = sae_train_grad(tr, x + (size_t)(a * P + dist_rank()) * mb * d, mb);
        double v[5] = {st.loss, st.fvu, st.auxk, st.l1, st.l0};
        for (int k = 0; k < 5; k++) sum[k] += v[k] / micros;
        if (A == 1) break;
        if (a == 0) { memcpy(acc, tr->grad, count * sizeof(float)); memcpy(fired, tr->fired, (size_t)n); continue; }
        for (size_t q = 0; q < count; q++) acc[q] += tr->grad[q];
        for (int i = 0; i < n; i++) fired[i] |= tr->fired[i];
    }
    if (A > 1) { memcpy(tr->grad, acc, count * sizeof(float)); memcpy(tr->fired, fired, (size_t)n); }
    dist_sum_floats(tr->grad, count);   // the one sum of the step's gradients over the ranks
    dist_or_bytes(tr->fired, (size_t)n);
    dist_sum_doubles(sum, 5);
    if (micros > 1) for (size_t q = 0; q < count; q++) tr->grad[q] *= 1.0f / micros;
    tr->batch = mb * micros;
    SaeTrainStats st = {.loss = sum[0], .fvu = sum[1], .auxk = sum[2], .l1 = sum[3], .l0 = sum[4]};
    st.lr = sae_train_update(tr);
    int dead = 0;
    for (int i = 0; i < n; i++) dead += tr->since_fired[i] >= tr->cfg.dead_tokens;
    st.dead_frac = (double)dead / n;
    tr->sae->train_fvu = (float)st.fvu;
    return st;
}

// steps Adam steps on batches drawn from the buffer (x holds the first
// step's --batch x --accum tokens already), with progress lines and
// periodic saves to -o.
static void train_steps(Sae* s, ShuffleBuffer* sb, ActStream* st, float* x, const Opts* o, int steps, long t0) {
    int B = o->batch * o->accum, mb = o->batch / dist_size();
    SaeTrainConfig cfg;
    train_config_from_opts(&cfg, o, s->d, s->n, s->k, s->arch, steps);
    printf("training a %s SAE: d %d, n %d%s%d, %d steps of %d tokens, lr %.2e, warmup %d, dead after %lld tokens\n",
           sae_arch_name(s->arch), s->d, s->n, s->arch == SAE_TOPK ? ", k " : ", l1 x1000 ",
           s->arch == SAE_TOPK ? s->k : (int)(cfg.l1 * 1000), steps, B, cfg.lr, cfg.warmup, (long long)cfg.dead_tokens);
    SaeTrainer tr;
    sae_trainer_init(&tr, s, &cfg, mb);
    float* acc = o->accum > 1 ? xmalloc(s->memory_size) : NULL;
    unsigned char* fired = o->accum > 1 ? xmalloc((size_t)s->n) : NULL;
    for (int step = 0; step < steps; step++) {
        if (step > 0) buffer_draw(sb, st, x, B);
        SaeTrainStats stats = accum_step(&tr, x, mb, o->accum, acc, fired);
        if (o->log_every > 0 && ((step + 1) % o->log_every == 0 || step == 0 || step == steps - 1))
            print_progress(step + 1, steps, (int64_t)(step + 1) * B, time_in_ms() - t0, &stats, s->arch == SAE_RELU);
        if (o->save_every > 0 && (step + 1) % o->save_every == 0 && step != steps - 1) save_or_die(s, o->co.out);
    }
    save_or_die(s, o->co.out);
    free(acc); free(fired);
    sae_trainer_free(&tr);
}

// Under mpirun: the ranks must start from the same model, data, options and
// SAE, or their sums would mix different runs. A difference stops every
// rank with one error, before the first capture.
static void check_ranks_agree(const Opts* o, const Transformer* t, const RowSet* rows, const Sae* s) {
    uint64_t h = dist_hash(DIST_HASH_INIT, &t->config, sizeof(t->config));
    dist_check_same(dist_hash_sampled(h, t->data, t->file_size), "the model file (its header, size or weights)");
    h = DIST_HASH_INIT;
    for (int i = 0; i < rows->n; i++) {
        h = dist_hash(h, rows->rows[i].ids, (size_t)rows->rows[i].n * sizeof(int));
        h = dist_hash(h, rows->rows[i].keep, (size_t)rows->rows[i].n);
    }
    dist_check_same(dist_hash(h, &rows->n, sizeof(rows->n)), "the data (--data, the tokenizer)");
    int32_t iv[] = {o->layer, o->hook, o->batch, o->accum, o->buffer, o->T, o->warmup, o->k_aux, o->median, o->save_every};
    float fv[] = {o->lr, o->decay_frac, o->auxk_alpha, o->l1, o->max_norm_ratio};
    int64_t lv[] = {o->tokens, o->dead_tokens, (int64_t)o->co.seed, o->cache != NULL};
    h = dist_hash(dist_hash(dist_hash(DIST_HASH_INIT, iv, sizeof(iv)), fv, sizeof(fv)), lv, sizeof(lv));
    dist_check_same(h, "the training options");
    int32_t sv[] = {s->d, s->n, s->k, s->arch};
    h = dist_hash(DIST_HASH_INIT, sv, sizeof(sv));
    dist_check_same(dist_hash_sampled(h, s->memory, s->memory_size), "the SAE (--n-latents, --topk, --finetune)");
}

static int train_main(int argc, char** argv) {
    Opts o;
    parse_args(&o, CLI_TOK | CLI_OUT | CLI_SEED | CLI_SYSTEM, G_DATA | G_RECIPE | G_STREAM, argc, argv);
    dist_init(&argc, &argv);
    if (o.batch % dist_size()) dist_fail("--batch %d must be a multiple of the %d MPI ranks", o.batch, dist_size());
    Transformer t;
    Tokenizer tok;
    RowSet rows;
    int64_t data_tokens;
    int e = open_data(&o, "-o SAE.bin", &t, &tok, &rows, &data_tokens), d = t.config.dim;
    Sae s;
    training_sae(&s, &o, d);
    check_ranks_agree(&o, &t, &rows, &s);
    ActStream st;
    data_tokens = stream_open(&st, &t, &rows, e, &o, data_tokens);
    long t0 = time_in_ms();
    ShuffleBuffer sb;
    buffer_fill(&sb, &st, data_tokens, &o);
    int64_t tokens = o.tokens >= 0 ? o.tokens : 1000000;
    int B = o.batch * o.accum, steps = (int)(tokens / B);   // B: the tokens of one Adam step
    if (steps < 1) die("--tokens %lld is less than one step of %d", (long long)tokens, B);
    float* x = xmalloc((size_t)B * d * sizeof(float));
    buffer_draw(&sb, &st, x, B);
    if (!o.finetune) sae_init_from_data(&s, x, B, o.median, o.co.seed);
    train_steps(&s, &sb, &st, x, &o, steps, t0);
    printf("saved %s (%d epochs of the data%s; %lld tokens dropped as outliers)\n", o.co.out, st.epoch,
           st.cache ? " cache" : "", (long long)st.dropped);
    free(x); free(sb.buf);
    stream_close(&st);
    sae_free(&s);
    free_rows(&rows);
    free_transformer(&t);
    free_tokenizer(&tok);
    dist_finalize();
    return 0;
}

static int planted_main(int argc, char** argv) {
    Opts o;
    parse_args(&o, CLI_SEED | CLI_OUT, G_RECIPE | G_PLANTED, argc, argv);
    int d = o.planted_d, nt = o.planted_true, sp = o.planted_s;
    int n = o.n_latents > 0 ? o.n_latents : 2 * nt, k = o.k > 0 ? o.k : sp;
    int B = o.batch == 4096 ? 256 : o.batch;
    int64_t tokens = o.tokens >= 0 ? o.tokens : 400000;
    if (d < 2 || nt < 1 || sp < 1 || sp > nt || k > n) die("planted: need d >= 2, 1 <= s <= true, k <= n");
    if (o.accum != 1) die("--accum is for sae train");
    Planted p;
    planted_init(&p, d, nt, sp, 0.01f, o.co.seed);
    Sae s;
    sae_alloc(&s, d, n, o.arch == SAE_TOPK ? k : 0, o.arch);
    float* x = xmalloc((size_t)B * d * sizeof(float));
    planted_sample(&p, x, B);
    sae_init_from_data(&s, x, B, o.median, o.co.seed + 1);
    int steps = (int)(tokens / B);
    if (steps < 1) die("--tokens below one batch");
    Opts oo = o;
    oo.batch = B;
    if (oo.lr <= 0) oo.lr = 1e-2f;
    SaeTrainConfig cfg;
    train_config_from_opts(&cfg, &oo, d, n, k, o.arch, steps);
    if (o.dead_tokens <= 0) cfg.dead_tokens = 20000;
    printf("planted dictionary: %d directions in %d dims, %d active per sample; SAE n %d k %d, %d steps of %d\n",
           nt, d, sp, n, k, steps, B);
    SaeTrainer tr;
    sae_trainer_init(&tr, &s, &cfg, B);
    long t0 = time_in_ms();
    SaeTrainStats st;
    for (int step = 0; step < steps; step++) {
        planted_sample(&p, x, B);
        st = sae_train_step(&tr, x, B);
        if (o.log_every > 0 && ((step + 1) % (o.log_every * 10) == 0 || step == steps - 1))
            print_progress(step + 1, steps, (int64_t)(step + 1) * B, time_in_ms() - t0, &st, o.arch == SAE_RELU);
    }
    int m = 8192;
    float* test = xmalloc((size_t)m * d * sizeof(float));
    planted_sample(&p, test, m);
    double l0, fvu = sae_fvu(&s, test, m, &l0);
    printf("held-out FVU %.4f, L0 %.2f, planted directions recovered at cosine > 0.9: %.1f%%\n", fvu, l0,
           100.0 * planted_recovery(&p, &s, 0.9f));
    if (o.co.out) save_or_die(&s, o.co.out);
    sae_trainer_free(&tr);
    free(x); free(test);
    sae_free(&s);
    planted_free(&p);
    return 0;
}

// ----------------------------------------------------------------------------
// sae measure: FVU, L0, dead latents, and the next-token loss with the SAE
// spliced in (x -> x^ at the content positions of the SAE's layer), with
// that layer zero-ablated, and (with --latents) with the intervention.

// Mean NLL of the content tokens of a row (targets that are content positions).
static double row_nll(Transformer* t, const Row* r, float* all, int64_t* count) {
    int V = t->config.vocab_size;
    forward_batch(t, r->ids, r->n, 0, all);
    double nll = 0.0;
    for (int p = 0; p + 1 < r->n; p++) {
        if (!r->keep[p + 1]) continue;
        const float* row = all + (size_t)p * V;
        float mx = row[0];
        for (int j = 1; j < V; j++) if (row[j] > mx) mx = row[j];
        double sum = 0.0;
        for (int j = 0; j < V; j++) sum += exp((double)row[j] - mx);
        nll += log(sum) + mx - row[r->ids[p + 1]];
        (*count)++;
    }
    return nll;
}

typedef struct { int* sel; int n_sel; float gate_alpha; int gate_n; } Selection;

static void read_latents(Selection* sel, const char* spec, int N, int n_latents) {
    memset(sel, 0, sizeof(*sel));
    sel->gate_alpha = -1.0f;
    sel->sel = xmalloc((size_t)(N > 0 ? N : 1) * sizeof(int));
    if (access(spec, F_OK) != 0) {
        // not a file: a list such as 12,345
        for (const char* p = spec; *p && sel->n_sel < N;) {
            char* end;
            long v = strtol(p, &end, 10);
            if (end == p || v < 0 || v >= n_latents) die("--latents %s: not a file, nor a list of latent ids below %d", spec, n_latents);
            sel->sel[sel->n_sel++] = (int)v;
            p = *end == ',' ? end + 1 : end;
            if (*end && *end != ',') die("--latents %s: not a file, nor a list of latent ids", spec);
        }
        return;
    }
    size_t len;
    char* text = read_file(spec, &len);
    int line_no = 0;
    for (char* line = strtok(text, "\n"); line; line = strtok(NULL, "\n")) {
        line_no++;
        if (line[0] == '#') {
            int gn;
            float ga;
            if (sscanf(line, "# gate N=%d alpha=%f", &gn, &ga) == 2) { sel->gate_n = gn; sel->gate_alpha = ga; }
            continue;
        }
        if (!strncmp(line, "rank,", 5)) continue;
        int rank, latent, eligible;
        if (sscanf(line, "%d,%d,%d", &rank, &latent, &eligible) != 3) die("%s:%d: not a latents CSV row", spec, line_no);
        if (latent < 0 || latent >= n_latents) die("%s:%d: latent %d but the SAE has %d", spec, line_no, latent, n_latents);
        if (eligible && sel->n_sel < N) sel->sel[sel->n_sel++] = latent;
    }
    free(text);
}

static const char* mode_name(int mode) {
    switch (mode) {
    case SAE_MODE_ZERO: return "zero";
    case SAE_MODE_CLAMP: return "clamp";
    case SAE_MODE_SCALE: return "scale";
    case SAE_MODE_SPLICE: return "splice";
    default: return "ablate";
    }
}

// The intervention hook of the options (not installed); sel must outlive it.
static void setup_intervention(SaeHook* h, const Sae* s, const Opts* o, Selection* sel) {
    read_latents(sel, o->latents, o->N, s->n);
    float value = o->mode == SAE_MODE_SCALE ? o->scale_m : o->clamp_c;
    sae_hook_init(h, s, sae_engine_layer(s), sel->sel, sel->n_sel, o->mode, value);
    if (o->gate) {
        h->gate = 1;
        if (o->gate_alpha >= 0) h->gate_alpha = o->gate_alpha;
        else if (sel->gate_alpha >= 0 && sel->gate_n == sel->n_sel) h->gate_alpha = sel->gate_alpha;
        else die("--gate needs --gate-alpha, or a CSV scored with --select %d", sel->n_sel);
    }
    printf("intervention: %d latents (", sel->n_sel);
    for (int q = 0; q < sel->n_sel && q < 12; q++) printf(q ? " %d" : "%d", sel->sel[q]);
    if (sel->n_sel > 12) printf(" ...");
    printf("), mode %s", mode_name(o->mode));
    if (o->mode == SAE_MODE_CLAMP) printf(" --clamp %g", o->clamp_c);
    if (o->mode == SAE_MODE_SCALE) printf(" --scale %g", o->scale_m);
    if (h->gate) printf(", gate alpha %.4f", h->gate_alpha);
    printf("\n");
}

static void load_split_rows(RowSet* forget, RowSet* retain, const Tokenizer* tok, const Opts* o, int need) {
    memset(forget, 0, sizeof(*forget));
    memset(retain, 0, sizeof(*retain));
    if (o->qa) {
        RowSet all;
        memset(&all, 0, sizeof(all));
        load_rows(&all, tok, o->qa, o->T, -1, o->co.system);
        for (int i = 0; i < all.n; i++) *new_row(all.rows[i].split ? retain : forget) = all.rows[i];
        free(all.rows);
    }
    if (o->forget) load_rows(forget, tok, o->forget, o->T, 0, o->co.system);
    if (o->retain) load_rows(retain, tok, o->retain, o->T, 1, o->co.system);
    if (need && (forget->n == 0 || retain->n == 0)) die("%s needs --forget F and --retain R (or --qa FILE)", o->cmd);
}

static int measure_main(int argc, char** argv) {
    Opts opts;
    parse_args(&opts, CLI_TOK | CLI_SYSTEM, G_SAE | G_SETS | G_INTERV, argc, argv);
    const Opts* o = &opts;
    Transformer t;
    Tokenizer tok;
    open_model(&t, &tok, o, o->T);
    Sae s;
    load_sae_for(&s, o->sae, &t);
    RowSet sets[2];
    load_split_rows(&sets[0], &sets[1], &tok, o, 1);
    if (o->selftest) sae_selftest(&t, &tok, &s, &sets[1], 256);
    Selection sel;
    SaeHook inter;
    int with_inter = o->latents != NULL;
    if (with_inter) setup_intervention(&inter, &s, o, &sel);
    int e = sae_engine_layer(&s);
    float* all = xmalloc((size_t)o->T * t.config.vocab_size * sizeof(float));
    printf("%-7s %8s %8s %7s %9s %9s %9s %8s %8s", "set", "tokens", "FVU", "L0", "CE clean", "CE +SAE", "CE 0-abl",
           "dCE SAE", "CE score");
    if (with_inter) printf(" %9s %9s %9s", "CE interv", "dCE int", "edited");
    printf("\n");
    unsigned char* ever = xcalloc(s.n, 1);
    int64_t all_tokens = 0;
    for (int set = 0; set < 2; set++) {
        SaeHook splice, ablate;
        sae_hook_init(&splice, &s, e, NULL, 0, SAE_MODE_SPLICE, 0.0f);
        sae_hook_init(&ablate, &s, e, NULL, 0, SAE_MODE_ABLATE, 0.0f);
        double nll[4] = {0, 0, 0, 0};
        int64_t cnt[4] = {0, 0, 0, 0};
        int64_t inter_tokens0 = with_inter ? inter.n_tokens : 0, inter_changed0 = with_inter ? inter.n_changed : 0;
        const RowSet* rs = &sets[set];
        for (int i = 0; i < rs->n; i++) {
            const Row* r = &rs->rows[i];
            t.hook = NULL;
            nll[0] += row_nll(&t, r, all, &cnt[0]);
            splice.keep = r->keep;
            t.hook = sae_hook_fn; t.hook_ctx = &splice;
            nll[1] += row_nll(&t, r, all, &cnt[1]);
            ablate.keep = r->keep;
            t.hook_ctx = &ablate;
            nll[2] += row_nll(&t, r, all, &cnt[2]);
            if (with_inter) {
                sae_hook_reset_sequence(&inter);
                t.hook_ctx = &inter;
                nll[3] += row_nll(&t, r, all, &cnt[3]);
            }
            t.hook = NULL;
        }
        double ce[4];
        for (int q = 0; q < 4; q++) ce[q] = cnt[q] ? nll[q] / cnt[q] : 0.0;
        double n_tok = (double)splice.splice_tokens, var = splice.sumsq;
        for (int j = 0; j < s.d; j++) var -= splice.sumx[j] * splice.sumx[j] / (n_tok > 0 ? n_tok : 1);
        double fvu = var > 0 ? splice.sse / var : 0.0;
        double score = ce[2] != ce[0] ? (ce[2] - ce[1]) / (ce[2] - ce[0]) : 0.0;
        printf("%-7s %8lld %8.4f %7.1f %9.4f %9.4f %9.4f %+8.4f %8.4f", set ? "retain" : "forget", (long long)cnt[0], fvu,
               n_tok > 0 ? splice.l0_sum / n_tok : 0.0, ce[0], ce[1], ce[2], ce[1] - ce[0], score);
        if (with_inter) {
            int64_t seen = inter.n_tokens - inter_tokens0, changed = inter.n_changed - inter_changed0;
            printf(" %9.4f %+9.4f %8.1f%%", ce[3], ce[3] - ce[0], seen ? 100.0 * changed / seen : 0.0);
        }
        printf("\n");
        for (int i = 0; i < s.n; i++) ever[i] |= splice.ever[i];
        all_tokens += splice.splice_tokens;
        sae_hook_free(&splice);
        sae_hook_free(&ablate);
    }
    int never = 0;
    for (int i = 0; i < s.n; i++) never += !ever[i];
    printf("latents that never fired on these %lld tokens: %d of %d (%.1f%%)\n", (long long)all_tokens, never, s.n,
           100.0 * never / s.n);
    printf("(CE: mean next-token loss on content tokens; CE score = (CE 0-abl - CE +SAE) / (CE 0-abl - CE clean))\n");
    free(ever); free(all);
    if (with_inter) { sae_hook_free(&inter); free(sel.sel); }
    free_rows(&sets[0]); free_rows(&sets[1]);
    sae_free(&s);
    free_transformer(&t);
    free_tokenizer(&tok);
    return 0;
}

// ----------------------------------------------------------------------------
// sae score: which latents fire on the forget text and not on the retain
// text. Per latent and per set: firing frequency P(f > 0), mean activation
// E[f], mean square E[f^2]; at keyword positions: frequency and mean. The
// top contexts (activation, row, position) of every latent are kept in a
// small min-heap per latent, so the selected ones can be shown.

typedef struct { float act; int row; int pos; } TopCtx;

static void heap_push(TopCtx* heap, int* n, int cap, TopCtx v) {
    if (*n < cap) {
        int i = (*n)++;
        heap[i] = v;
        while (i > 0 && heap[(i - 1) / 2].act > heap[i].act) { TopCtx t = heap[i]; heap[i] = heap[(i - 1) / 2]; heap[(i - 1) / 2] = t; i = (i - 1) / 2; }
        return;
    }
    if (cap == 0 || v.act <= heap[0].act) return;
    heap[0] = v;
    for (int i = 0;;) {
        int l = 2 * i + 1, r = l + 1, m = i;
        if (l < cap && heap[l].act < heap[m].act) m = l;
        if (r < cap && heap[r].act < heap[m].act) m = r;
        if (m == i) break;
        TopCtx t = heap[i]; heap[i] = heap[m]; heap[m] = t;
        i = m;
    }
}

static int cmp_ctx_desc(const void* a, const void* b) {
    float x = ((const TopCtx*)a)->act, y = ((const TopCtx*)b)->act;
    return (x < y) - (x > y);
}

static void print_context(const Tokenizer* tok, const Row* r, int pos) {
    int a = pos - 12 > 0 ? pos - 12 : 0, b = pos + 4 < r->n ? pos + 4 : r->n - 1;
    printf("\"");
    for (int p = a; p <= b; p++) {
        int len;
        const char* piece = token_piece(tok, r->ids[p], &len);
        if (p == pos) printf("[");
        for (int c = 0; c < len; c++) {
            unsigned char ch = (unsigned char)piece[c];
            if (ch == '\n') printf("\\n");
            else if (ch == '"') printf("\\\"");
            else putchar(ch);
        }
        if (p == pos) printf("]");
    }
    printf("\"");
}

// A latent with what it is ranked by (qsort has no context argument, so the
// keys travel with the index): eligible ones first, then by score, highest
// first, then by index, so ties come out the same with any qsort.

// Per row of rs: the fraction of positions (all but BOS, as the hook sees
// them in generation) with any selected latent active. A QA row counts its
// prompt only (question and assistant header): that is all the gate sees
// when it decides, before the answer exists.
static double* row_fractions(Transformer* t, const Tokenizer* tok, const char* system, const Sae* s,
                             const RowSet* rs, const int* sel, int n_sel) {
    int e = sae_engine_layer(s), d = s->d;
    double* frac = xmalloc((size_t)(rs->n > 0 ? rs->n : 1) * sizeof(double));
    SaeHook obs;
    sae_hook_init(&obs, s, e, sel, n_sel, SAE_MODE_CLAMP, 0.0f);
    obs.gate = 1;
    obs.gate_alpha = 2.0f;   // never opens: observe only
    for (int i = 0; i < rs->n; i++) {
        const Row* r = &rs->rows[i];
        int n = r->n;
        if (r->question) {
            int* prompt = xmalloc((size_t)r->n * sizeof(int));
            int n_prompt = chat_row_ids(tok, system, r->question, NULL, 0, prompt, r->n);
            free(prompt);
            if (n_prompt > 0 && n_prompt < n) n = n_prompt;
        }
        float* acts = xmalloc((size_t)n * d * sizeof(float));
        sae_capture(t, r->ids, n, e, e, acts);
        sae_hook_reset_sequence(&obs);
        sae_hook_fn(&obs, e, 0, n, acts, d);
        frac[i] = obs.seq_tokens ? (double)obs.seq_hits / obs.seq_tokens : 0.0;
        free(acts);
    }
    sae_hook_free(&obs);
    return frac;
}

static int cmp_double(const void* a, const void* b) {
    double x = *(const double*)a, y = *(const double*)b;
    return (x > y) - (x < y);
}

// The top contexts of every latent: a min-heap of M per latent, over the
// rows of both sets (retain rows numbered after the forget ones).
typedef struct {
    int M;
    TopCtx* heaps;   // (n, M)
    int* heap_n;     // (n,)
} TopContexts;

// The codes f (m, n) of the positions pos (m,) of row row_id, into the heaps.
static void contexts_add(TopContexts* tc, const float* f, int m, int n, const int* pos, int row_id) {
    if (tc->M == 0) return;
    #pragma omp parallel for schedule(static) if ((size_t)m * n > (1u << 18))
    for (int lat = 0; lat < n; lat++)
        for (int q = 0; q < m; q++) {
            float v = f[(size_t)q * n + lat];
            if (v != 0.0f) heap_push(tc->heaps + (size_t)lat * tc->M, &tc->heap_n[lat], tc->M, (TopCtx){v, row_id, pos[q]});
        }
}

// Every content position of both sets through the SAE: the statistics of
// each latent and its top contexts.
static void score_rows(Transformer* t, const Sae* s, const RowSet sets[2], int T, LatentStats* ls, TopContexts* tc) {
    int n = s->n, d = s->d, e = sae_engine_layer(s), block = 64;
    float* tmp = xmalloc((size_t)T * d * sizeof(float));
    float* acts = xmalloc((size_t)T * d * sizeof(float));
    int* pos = xmalloc((size_t)T * sizeof(int));
    unsigned char* kw = xmalloc((size_t)T);
    float* f = xmalloc((size_t)block * n * sizeof(float));
    long t0 = time_in_ms();
    for (int set = 0; set < 2; set++) {
        for (int i = 0; i < sets[set].n; i++) {
            const Row* r = &sets[set].rows[i];
            sae_capture(t, r->ids, r->n, e, e, tmp);
            int m = 0;
            for (int p = 0; p < r->n; p++) {
                if (!r->keep[p]) continue;
                memcpy(acts + (size_t)m * d, tmp + (size_t)p * d, (size_t)d * sizeof(float));
                kw[m] = r->kw && r->kw[p];
                pos[m++] = p;
            }
            for (int b0 = 0; b0 < m; b0 += block) {
                int mb = m - b0 < block ? m - b0 : block;
                sae_encode(s, acts + (size_t)b0 * d, mb, f);
                latent_stats_add(ls, set, f, mb, r->kw ? kw + b0 : NULL);
                contexts_add(tc, f, mb, n, pos + b0, set ? sets[0].n + i : i);
            }
        }
        fprintf(stderr, "scored %s: %d rows, %lld tokens (%.1f s)\n", set ? "retain" : "forget", sets[set].n,
                (long long)ls->tokens[set], (time_in_ms() - t0) / 1000.0);
    }
    free(tmp); free(acts); free(pos); free(kw); free(f);
}

// The gate threshold of the selected latents: the 95th percentile, over the
// retain rows, of the fraction of positions with one active; and how many
// rows of each set it opens on.
static double gate_alpha_of(Transformer* t, const Tokenizer* tok, const Opts* o, const Sae* s, const RowSet sets[2],
                            const int* sel, int N, int open[2]) {
    double* frac_r = row_fractions(t, tok, o->co.system, s, &sets[1], sel, N);
    double* frac_f = row_fractions(t, tok, o->co.system, s, &sets[0], sel, N);
    double* sorted = xmalloc((size_t)sets[1].n * sizeof(double));
    memcpy(sorted, frac_r, (size_t)sets[1].n * sizeof(double));
    qsort(sorted, sets[1].n, sizeof(double), cmp_double);
    int at95 = (int)ceil(0.95 * sets[1].n) - 1;
    double alpha = sorted[at95 < 0 ? 0 : at95];
    open[0] = open[1] = 0;
    for (int i = 0; i < sets[0].n; i++) open[0] += frac_f[i] > alpha;
    for (int i = 0; i < sets[1].n; i++) open[1] += frac_r[i] > alpha;
    free(frac_r); free(frac_f); free(sorted);
    return alpha;
}

// The latents CSV (atomically), best first: every statistic of every latent.
static void write_latents_csv(const Opts* o, const Sae* s, const LatentStats* ls, const double* score,
                              const unsigned char* eligible, const int* order, int N, double alpha) {
    double dn[3];
    latent_stats_denoms(ls, dn);
    char tmp_path[4096];
    snprintf(tmp_path, sizeof(tmp_path), "%s.tmp", o->co.out);
    FILE* csv = fopen(tmp_path, "w");
    if (!csv) die("cannot write %s: %s", o->co.out, strerror(errno));
    fprintf(csv, "# sae=%s layer=%d hook=%s rule=%s tau=%g forget_tokens=%lld retain_tokens=%lld keyword_tokens=%lld\n",
            o->sae, s->layer, s->hook ? "pre" : "post", o->rule, o->tau, (long long)ls->tokens[0], (long long)ls->tokens[1],
            (long long)ls->tokens_kw);
    fprintf(csv, "# gate N=%d alpha=%.6f\n", N, alpha);
    fprintf(csv, "rank,latent,eligible,score,freq_forget,freq_retain,mean_forget,mean_retain,sq_forget,sq_retain,"
                 "freq_keyword,mean_keyword\n");
    for (int q = 0; q < s->n; q++) {
        int i = order[q];
        fprintf(csv, "%d,%d,%d,%.6g,%.6g,%.6g,%.6g,%.6g,%.6g,%.6g,%.6g,%.6g\n", q + 1, i, eligible[i], score[i],
                ls->cnt[0][i] / dn[0], ls->cnt[1][i] / dn[1], ls->sum[0][i] / dn[0], ls->sum[1][i] / dn[1],
                ls->sq[0][i] / dn[0], ls->sq[1][i] / dn[1], ls->cnt_kw[i] / dn[2],
                ls->cnt_kw[i] > 0 ? ls->sum_kw[i] / ls->cnt_kw[i] : 0.0);
    }
    if (fclose(csv) != 0 || rename(tmp_path, o->co.out) != 0) die("cannot write %s: %s", o->co.out, strerror(errno));
}

// The selected latents and where they fire most.
static void print_selected(const Tokenizer* tok, const LatentStats* ls, const double* score, const int* order, int N,
                           TopContexts* tc, const RowSet sets[2]) {
    double dn[3];
    latent_stats_denoms(ls, dn);
    printf("\n%4s %7s %10s %9s %9s %9s %9s %9s\n", "rank", "latent", "score", "f_forget", "f_retain", "mean_f", "mean_r", "f_keyword");
    for (int q = 0; q < N; q++) {
        int i = order[q];
        printf("%4d %7d %10.4g %9.4f %9.5f %9.4f %9.4f %9.4f\n", q + 1, i, score[i], ls->cnt[0][i] / dn[0],
               ls->cnt[1][i] / dn[1], ls->sum[0][i] / dn[0], ls->sum[1][i] / dn[1], ls->cnt_kw[i] / dn[2]);
        TopCtx* h = tc->heaps + (size_t)i * tc->M;
        qsort(h, tc->heap_n[i], sizeof(TopCtx), cmp_ctx_desc);
        for (int c = 0; c < tc->heap_n[i]; c++) {
            int from_retain = h[c].row >= sets[0].n;
            const Row* r = from_retain ? &sets[1].rows[h[c].row - sets[0].n] : &sets[0].rows[h[c].row];
            printf("        %8.3f %s ", h[c].act, from_retain ? "retain" : "forget");
            print_context(tok, r, h[c].pos);
            printf("\n");
        }
    }
}

// Marks the keyword positions of both sets (--keywords).
static void mark_sets(RowSet sets[2], const Tokenizer* tok, const char* path) {
    Keywords kw;
    load_keywords(&kw, path);
    mark_keywords(&sets[0], tok, &kw);
    mark_keywords(&sets[1], tok, &kw);
    for (int w = 0; w < kw.n; w++) free(kw.words[w]);
    free(kw.words);
}

static int score_main(int argc, char** argv) {
    Opts o;
    parse_args(&o, CLI_TOK | CLI_OUT | CLI_SYSTEM, G_SAE | G_SETS | G_SCORE, argc, argv);
    cli_need(o.co.out != NULL, "score", "-o latents.csv");
    Transformer t;
    Tokenizer tok;
    open_model(&t, &tok, &o, o.T);
    Sae s;
    load_sae_for(&s, o.sae, &t);
    RowSet sets[2];
    load_split_rows(&sets[0], &sets[1], &tok, &o, 1);
    int rule = sae_rule_from_name(o.rule);
    if (rule < 0) die("--rule must be freq, diff, ratio, sq_ratio or keyword, got '%s'", o.rule);
    if (rule == SAE_RULE_KEYWORD && !o.keywords) die("--rule keyword needs --keywords FILE");
    if (o.keywords) mark_sets(sets, &tok, o.keywords);
    if (o.selftest) sae_selftest(&t, &tok, &s, &sets[1], 256);
    int n = s.n;
    LatentStats ls;
    latent_stats_init(&ls, n);
    TopContexts tc = { o.contexts > 0 ? o.contexts : 0, NULL, xcalloc(n, sizeof(int)) };
    tc.heaps = xmalloc((size_t)n * (tc.M > 0 ? tc.M : 1) * sizeof(TopCtx));
    score_rows(&t, &s, sets, o.T, &ls, &tc);
    double* score = xmalloc((size_t)n * sizeof(double));
    unsigned char* eligible = xcalloc(n, 1);
    int* order = xmalloc((size_t)n * sizeof(int));
    int n_eligible = latent_scores(&ls, rule, o.tau, score, eligible, order);
    int N = o.N < n_eligible ? o.N : n_eligible;
    int open[2];
    double alpha = gate_alpha_of(&t, &tok, &o, &s, sets, order, N, open);
    write_latents_csv(&o, &s, &ls, score, eligible, order, N, alpha);
    printf("wrote %s: %d latents, %d eligible (retain frequency <= %g), rule %s\n", o.co.out, n, n_eligible, o.tau, o.rule);
    printf("gate for the top %d: alpha = %.4f (95th percentile over %d retain rows); it opens on %d/%d forget rows, "
           "%d/%d retain rows\n", N, alpha, sets[1].n, open[0], sets[0].n, open[1], sets[1].n);
    print_selected(&tok, &ls, score, order, N, &tc, sets);
    free(order); free(score); free(eligible); free(tc.heaps); free(tc.heap_n);
    latent_stats_free(&ls);
    free_rows(&sets[0]); free_rows(&sets[1]);
    sae_free(&s);
    free_transformer(&t);
    free_tokenizer(&tok);
    return 0;
}

// ----------------------------------------------------------------------------
// Generation with the intervention: generate, chat, eval. sae only installs
// its hook; the engine's generate() and chat_loop() and the shared harness
// do the rest, with sae_prefill feeding prompts (the gate's rerun).

static void report_hook(const SaeHook* h) {
    fprintf(stderr, "[sae] %lld positions seen, %lld with a selected latent active, %lld edited%s\n",
            (long long)h->n_tokens, (long long)h->n_active, (long long)h->n_changed,
            h->gate ? (h->gate_on ? "; gate open" : "; gate closed") : "");
}

// Model, tokenizer, SAE (self-tested) and the intervention hook of
// --latents (installed on the model, when given).
typedef struct {
    Transformer t;
    Tokenizer tok;
    Sae s;
    SaeHook h;
    Selection sel;
    int has_hook;
} Session;

static void open_session(Session* ss, const Opts* o) {
    memset(ss, 0, sizeof(*ss));
    open_model(&ss->t, &ss->tok, o, o->co.ctx);
    load_sae_for(&ss->s, o->sae, &ss->t);
    if (o->selftest) sae_selftest(&ss->t, &ss->tok, &ss->s, NULL, 256);
    if (o->latents) {
        setup_intervention(&ss->h, &ss->s, o, &ss->sel);
        ss->has_hook = 1;
        ss->t.hook = sae_hook_fn;
        ss->t.hook_ctx = &ss->h;
        sae_hook_reset_sequence(&ss->h);
    } else {
        fprintf(stderr, "note: no --latents: the model runs without an intervention\n");
    }
    fflush(stdout);
}

static void close_session(Session* ss) {
    if (ss->has_hook) { report_hook(&ss->h); sae_hook_free(&ss->h); free(ss->sel.sel); }
    sae_free(&ss->s);
    free_transformer(&ss->t);
    free_tokenizer(&ss->tok);
}

static int generate_main(int argc, char** argv) {
    Opts o;
    parse_args(&o, CLI_TOK | CLI_INPUT | CLI_SAMPLING | CLI_CTX, G_SAE | G_INTERV, argc, argv);
    const char* prompt = o.co.input;
    cli_need(prompt != NULL, "generate", "a prompt (-i TEXT)");
    if (!utf8_valid(prompt, strlen(prompt))) die("prompt is not valid UTF-8");
    Session ss;
    open_session(&ss, &o);
    size_t len = strlen(prompt);
    int* ids = xmalloc((len + 2) * sizeof(int));
    int n = 0;
    ids[n++] = ss.tok.bos_id;
    n += encode(&ss.tok, prompt, len, 1, ids + n, (int)len + 1);
    int ctx = ss.t.state.seq_len;
    if (n > ctx) die("prompt of %d tokens does not fit the context of %d (raise -c)", n, ctx);
    Sampler sm;
    build_sampler(&sm, ss.t.config.vocab_size, o.co.temperature, o.co.topp, o.co.seed);
    for (int i = 1; i < n; i++) print_token(&ss.tok, ids[i]);
    long t0 = time_in_ms();
    float* logits = ss.has_hook ? sae_prefill(&ss.h, &ss.t, ids, n, 0) : forward_batch(&ss.t, ids, n, 0, NULL);
    long t1 = time_in_ms();
    GenConfig g = { o.co.max_new, &sm, gen_print, NULL };
    GenResult r = generate(&ss.t, &ss.tok, logits, n, &g);
    long t2 = time_in_ms();
    if (r.stop == GEN_CONTEXT_FULL) fprintf(stderr, "\n[context of %d positions full]\n", ctx);
    printf("\n");
    report_speed(n, t1 - t0, r.n_sampled, t2 - t1);
    free_sampler(&sm);
    free(ids);
    close_session(&ss);
    return 0;
}

static int chat_main(int argc, char** argv) {
    Opts o;
    parse_args(&o, CLI_TOK | CLI_INPUT | CLI_SAMPLING | CLI_CTX | CLI_SYSTEM, G_SAE | G_INTERV, argc, argv);
    Session ss;
    open_session(&ss, &o);
    Sampler sm;
    build_sampler(&sm, ss.t.config.vocab_size, o.co.temperature, o.co.topp, o.co.seed);
    // the whole dialogue is one sequence for the gate; prompts go through its rerun rule
    ChatFilter gate = { .ctx = &ss.h, .prefill = sae_prefill };
    chat_loop(&ss.t, &ss.tok, &sm, o.co.system, o.co.input, o.co.max_new, ss.has_hook ? &gate : NULL);
    free_sampler(&sm);
    close_session(&ss);
    return 0;
}

// eval: the shared harness (eval.c) with the intervention applied. The SAE
// method plugs in its flags (--sae and the intervention's), its hook for
// raw text and its chat answerer (prompts through sae_prefill).
typedef struct {
    Opts o;
    Sae s;
    SaeHook h;
    Selection sel;
    Transformer* t;
    const Tokenizer* tok;
    int max_new;
} SaeMethod;

static int sae_method_parse(EvalMethod* m, int argc, char** argv, int i) {
    SaeMethod* sm = m->user;
    int j = i;
    return sae_flag(&sm->o, G_SAE | G_INTERV, argc, argv, &j) ? j - i + 1 : 0;
}

static void sae_method_setup(EvalMethod* m, Transformer* t, Tokenizer* tok, int max_new) {
    SaeMethod* sm = m->user;
    if (!sm->o.latents) die("sae eval needs --latents CSV (from sae score) or a list such as 12,345");
    sm->t = t; sm->tok = tok; sm->max_new = max_new;
    load_sae_for(&sm->s, sm->o.sae, t);
    if (sm->o.selftest) sae_selftest(t, tok, &sm->s, NULL, 256);
    setup_intervention(&sm->h, &sm->s, &sm->o, &sm->sel);
    fflush(stdout);
    m->hook = sae_hook_fn;
    m->hook_ctx = &sm->h;
    m->answer_ctx = sm;
}

static void sae_method_new_sequence(EvalMethod* m) { sae_hook_reset_sequence(&((SaeMethod*)m->user)->h); }

// Greedy, as answer_greedy, with the prompt fed by sae_prefill (the hook is installed).
static int sae_method_answer(void* ctx, const ChatMessage* msgs, int n_msgs, char* out, size_t cap) {
    SaeMethod* sm = ctx;
    int* ids;
    int n = eval_chat_tokens(sm->tok, NULL, msgs, n_msgs, &ids);
    int seq_len = sm->t->state.seq_len;
    if (n + sm->max_new > seq_len) die("a prompt of %d tokens + %d new does not fit the context of %d (raise -c)", n, sm->max_new, seq_len);
    float* logits = sae_prefill(&sm->h, sm->t, ids, n, 0);
    out[0] = '\0';
    TextBuf text = { out, cap, 0 };
    GenConfig g = { sm->max_new, NULL, gen_append, &text };
    generate(sm->t, sm->tok, logits, n, &g);
    free(ids);
    return n;
}

static void sae_method_teardown(EvalMethod* m) {
    SaeMethod* sm = m->user;
    report_hook(&sm->h);
    sae_hook_free(&sm->h);
    free(sm->sel.sel);
    sae_free(&sm->s);
}

static int eval_cmd_main(int argc, char** argv) {
    SaeMethod sm;
    memset(&sm, 0, sizeof(sm));
    opts_init(&sm.o, "eval", 0);
    // the flags' --help lines, as the other subcommands print them
    char* flags = NULL;
    size_t flags_len = 0;
    FILE* f = open_memstream(&flags, &flags_len);
    if (!f) die("out of memory (help text)");
    print_sae_flags(f, G_SAE | G_INTERV);
    fclose(f);
    EvalMethod m = {
        .prog = "sae", .kind = "sae", .usage = flags,
        .parse = sae_method_parse, .setup = sae_method_setup, .teardown = sae_method_teardown,
        .new_sequence = sae_method_new_sequence, .answer = sae_method_answer, .user = &sm,
    };
    int rc = eval_main(argc, argv, &m);
    free(flags);
    return rc;
}

static int info_main(int argc, char** argv) {
    Opts o;
    parse_args(&o, 0, 0, argc, argv);
    if (!o.co.model) die("info needs an SAE file: sae info SAE.bin");
    Sae s;
    char err[512];
    if (sae_load(&s, o.co.model, err, sizeof(err)) != 0) die("%s", err);
    print_sae(&s, o.co.model);
    double norm_dec = 0.0, norm_enc = 0.0;
    for (int i = 0; i < s.n; i++) {
        norm_dec += sae_norm(s.W_dec + (size_t)i * s.d, s.d);
        norm_enc += sae_norm(s.W_enc + (size_t)i * s.d, s.d);
    }
    printf("sub_bdec %d, act_scale %g, mean |W_dec row| %.4f, mean |W_enc row| %.4f, |b_dec| %.4f, file %zu bytes\n",
           s.sub_bdec, s.act_scale, norm_dec / s.n, norm_enc / s.n, sae_norm(s.b_dec, s.d), s.memory_size);
    sae_free(&s);
    return 0;
}

static const Command COMMANDS[] = {
    {"capture", capture_main, "write the activation cache of --data at --layer (what train --cache reads)"},
    {"train", train_main, "train a TopK (or ReLU) SAE on one layer's residual stream"},
    {"measure", measure_main, "FVU, L0, dead latents, and the next-token loss with the SAE spliced in"},
    {"score", score_main, "rank the latents that fire on the forget set and not on the retain set"},
    {"generate", generate_main, "continue the prompt -i with the intervention on"},
    {"chat", chat_main, "chat with the intervention on (turns from stdin, or the one -i)"},
    {"eval", eval_cmd_main, "the shared evaluation harness with the intervention on"},
    {"planted", planted_main, "train on a synthetic planted dictionary (no model) and report recovery"},
    {"info", info_main, "print an SAE file's header"},
};
#define N_COMMANDS (int)(sizeof(COMMANDS) / sizeof(COMMANDS[0]))

static const Command* find_command(const char* name) {
    for (int c = 0; c < N_COMMANDS; c++) if (!strcmp(COMMANDS[c].name, name)) return &COMMANDS[c];
    return &COMMANDS[0];
}

int main(int argc, char** argv) {
    const char* about = "sparse autoencoders on the residual stream: train, score, clamp (sae.h)";
    return cli_dispatch("sae", about, COMMANDS, N_COMMANDS, argc, argv);
}
