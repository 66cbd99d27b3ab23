// fuzz.c -- libFuzzer targets for everything unlearn.c reads from outside (`make fuzz`).
//
// One file, one target per binary: each binary holds every target, and
// -DFUZZ_TARGET=NAME picks the one it runs (clang
// -fsanitize=fuzzer,address,undefined; the Makefile builds
// build/fuzz/fuzz_NAME for every NAME). The targets and the layout of their
// inputs:
//
//   tokenize   encode() on arbitrary bytes. Byte 0 bit 0: parse special
//              tokens; the rest is the text. Checked: every id in range, the
//              pieces spell the input back byte for byte, and plain text never
//              yields a special id.
//   chat       chat_encode() and eval_chat_tokens(). Byte 0: bit 0 generation
//              prompt, bit 1 BOS, bit 2 roles come from the input, bit 3 the
//              first field is eval's system prompt; then NUL-separated fields
//              (contents, or role/content pairs). Checked: exactly the
//              template's special tokens, whatever the user typed, and each
//              role and content spelled back as text.
//   model      a model file: parse_model_header; when it passes,
//              build_transformer and a forward pass over whatever weights the
//              file holds (NaN, Inf, huge).
//   tokfile    a tokenizer file: build_tokenizer, then encoding with it
//              (round trip checked as in `tokenize`).
//   lora       an adapter file: lora_read. Byte 0 bit 0: against a
//              Llama-3-8B config (headers that claim huge payloads), else the
//              tiny config of the seeds, where lora_apply then runs.
//   sae        an SAE file: sae_load, then encode and decode a row.
//   traindata  train_lora's data loaders. Byte 0 bits 0-1: plain text, TSV,
//              JSONL, or a WHP dictionary NUL text; bit 2 --pack; bit 3
//              --system; byte 1: T = 2 + byte % 48. Batches are then drawn
//              and checked (ids in range, packed positions consistent).
//   evaldata   eval.c's sets. Byte 0 % 3: facts TSV NUL QA TSV, a QA TSV
//              alone, or jailbreak JSON lines; byte 1: rows to keep.
//
// Seeds are committed in tests/fuzz/NAME/ (tests/fuzz/make_seeds.py writes
// them; tests/fuzz/regress/ holds inputs that once crashed); new inputs
// found while fuzzing go to build/fuzz/corpus/NAME/.
//
// A clean error is not a crash. The loaders report bad input the project's
// way: one "error: ..." line and exit(1) (die()). The fuzz binaries are
// linked with -Wl,--wrap= for exit, malloc, calloc, realloc, posix_memalign
// and free (FUZZ_WRAP in the Makefile): inside GUARDED(...), exit() jumps
// back here and every block allocated since GUARDED began and not freed
// is released, so an error exit costs nothing and leaks nothing, while a
// segfault, a sanitizer report, a hang (-timeout), an allocation driven by
// a lying header (-malloc_limit_mb) or a leak on a successful path is still
// reported. Code that must never exit (encode with enough room, the chat
// template, lora_read, sae_load, a forward pass over a header that passed)
// runs unguarded, so an exit there is reported too. Messages of guarded
// calls are silenced; FUZZ_VERBOSE=1 shows them. The build has no OpenMP,
// so no exit happens on another thread.
//
// The tokenizer of tokenize, chat and traindata is data/toy/toy.tok (the
// toy world's, committed; Llama-3's pre-tokenizer and special tokens);
// FUZZ_TOK=build/llama3.tok uses the real one.
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <setjmp.h>
#include <unistd.h>
#include <sys/mman.h>

#define FT_tokenize 1
#define FT_chat 2
#define FT_model 3
#define FT_tokfile 4
#define FT_lora 5
#define FT_sae 6
#define FT_traindata 7
#define FT_evaldata 8
#define FT_ID_(name) FT_##name
#define FT_ID(name) FT_ID_(name)
#ifndef FUZZ_TARGET
#error "build with -DFUZZ_TARGET=NAME (see the top of fuzz.c)"
#endif
#define TARGET FT_ID(FUZZ_TARGET)
#if TARGET < 1 || TARGET > 8
#error "unknown FUZZ_TARGET (see the top of fuzz.c)"
#endif

// The code under test, linked from the objects (eval.c's set loaders are
// in eval.h, train_lora's data loaders in train_lora.h).
#include "run.h"
#include "eval.h"
#include "sae.h"
#include "train_lora.h"

// ----------------------------------------------------------------------------
// Allocation tracking and exit() interception (the --wrap'ed functions)

void* __real_malloc(size_t n);
void* __real_calloc(size_t n, size_t size);
void* __real_realloc(void* p, size_t n);
int __real_posix_memalign(void** out, size_t align, size_t n);
void __real_free(void* p);
void __real_exit(int code) __attribute__((noreturn));

// the blocks allocated inside the current GUARDED call: open addressing
// (linear probing, backward-shift deletion) over pointer values
static struct { void** slot; size_t cap, n; } g_live;
static int g_guarded;
static jmp_buf g_jump;
static FILE *g_saved_out, *g_saved_err, *g_null;
static int g_verbose;
static volatile int g_exited; // the last GUARDED call exited

static size_t live_hash(const void* p) {
    uint64_t x = (uint64_t)(uintptr_t)p;
    x ^= x >> 33; x *= 0xff51afd7ed558ccdull; x ^= x >> 33;
    return (size_t)x & (g_live.cap - 1);
}

static void live_insert(void* p);

static void live_grow(void) {
    void** old = g_live.slot;
    size_t old_cap = g_live.cap;
    g_live.cap = old_cap ? 2 * old_cap : 1024;
    g_live.slot = __real_calloc(g_live.cap, sizeof(void*));
    if (!g_live.slot) { fprintf(stderr, "fuzz: out of memory\n"); abort(); }
    g_live.n = 0;
    for (size_t i = 0; i < old_cap; i++) if (old[i]) live_insert(old[i]);
    __real_free(old);
}

static void live_insert(void* p) {
    if (!p) return;
    if (2 * (g_live.n + 1) > g_live.cap) live_grow();
    size_t mask = g_live.cap - 1, i = live_hash(p);
    while (g_live.slot[i]) i = (i + 1) & mask;
    g_live.slot[i] = p;
    g_live.n++;
}

static int live_remove(void* p) {
    if (!p || g_live.n == 0) return 0;
    size_t mask = g_live.cap - 1, i = live_hash(p);
    while (g_live.slot[i] != p) {
        if (!g_live.slot[i]) return 0;
        i = (i + 1) & mask;
    }
    // backward shift: pull later entries of the probe run into the hole
    for (size_t j = i;;) {
        j = (j + 1) & mask;
        void* q = g_live.slot[j];
        if (!q) break;
        size_t k = live_hash(q); // q may move to i only if its home is not in (i, j]
        if (i <= j ? (i < k && k <= j) : (i < k || k <= j)) continue;
        g_live.slot[i] = q;
        i = j;
    }
    g_live.slot[i] = NULL;
    g_live.n--;
    return 1;
}

static void live_clear(int release) {
    if (g_live.n == 0) return;
    for (size_t i = 0; i < g_live.cap; i++) {
        if (g_live.slot[i] && release) __real_free(g_live.slot[i]);
        g_live.slot[i] = NULL;
    }
    g_live.n = 0;
}

void* __wrap_malloc(size_t n) {
    void* p = __real_malloc(n);
    if (g_guarded) live_insert(p);
    return p;
}

void* __wrap_calloc(size_t n, size_t size) {
    void* p = __real_calloc(n, size);
    if (g_guarded) live_insert(p);
    return p;
}

void* __wrap_realloc(void* p, size_t n) {
    int tracked = g_guarded && live_remove(p);
    void* q = __real_realloc(p, n);
    if (!q) { if (tracked) live_insert(p); return NULL; }
    if (g_guarded && (tracked || !p)) live_insert(q);
    return q;
}

int __wrap_posix_memalign(void** out, size_t align, size_t n) {
    int rc = __real_posix_memalign(out, align, n);
    if (rc == 0 && g_guarded) live_insert(*out);
    return rc;
}

void __wrap_free(void* p) {
    if (g_guarded) live_remove(p);
    __real_free(p);
}

void __wrap_exit(int code) {
    if (g_guarded) longjmp(g_jump, 1);
    __real_exit(code);
}

static void guard_enter(void) {
    g_exited = 0;
    if (!g_verbose) {
        fflush(stdout);
        g_saved_out = stdout; g_saved_err = stderr;
        stdout = g_null; stderr = g_null;
    }
    g_guarded = 1;
}

static void guard_leave(int exited) {
    g_guarded = 0;
    live_clear(exited); // an exit: free what the call left behind
    if (!g_verbose) { stdout = g_saved_out; stderr = g_saved_err; }
    g_exited = exited;
}

// Runs the statements; afterwards g_exited says whether they exit()ed.
#define GUARDED(...) do { \
        if (setjmp(g_jump) == 0) { guard_enter(); __VA_ARGS__; guard_leave(0); } \
        else guard_leave(1); \
    } while (0)

#define FUZZ_CHECK(cond, ...) do { \
        if (!(cond)) { fprintf(stderr, "fuzz check failed: %s: ", #cond); fprintf(stderr, __VA_ARGS__); \
                       fprintf(stderr, "\n"); abort(); } \
    } while (0)

// ----------------------------------------------------------------------------
// Inputs as files: the loaders take paths, so each input is written to an
// anonymous memory file and read through /proc/self/fd/N.

static int g_memfd[2] = {-1, -1};
static char g_path[2][64];

static const char* as_file(int slot, const uint8_t* data, size_t size) {
    int fd = g_memfd[slot];
    if (ftruncate(fd, 0) != 0 || (size && pwrite(fd, data, size, 0) != (ssize_t)size)) {
        fprintf(stderr, "fuzz: cannot write the memory file\n");
        abort();
    }
    return g_path[slot];
}

// Two files in one input, split at its first NUL byte (no NUL: all of it
// is the first file, the second is empty).
static void as_two_files(const uint8_t* data, size_t size, const char** first,
                                                 const char** second) {
    const uint8_t* nul = memchr(data, 0, size);
    size_t n1 = nul ? (size_t)(nul - data) : size;
    *first = as_file(0, data, n1);
    *second = nul ? as_file(1, nul + 1, size - n1 - 1) : as_file(1, data, 0);
}

// A loader that refuses a bad file is doing its job: rejected(rc) is 1
// (the input is done) when the loader returned rc != 0, with the reason it
// wrote to g_err shown under FUZZ_VERBOSE=1.
static char g_err[512];
static int rejected(int rc) {
    if (rc != 0 && g_verbose) fprintf(stderr, "rejected: %s\n", g_err);
    return rc != 0;
}

static Tokenizer g_tok; // the tokenizer of tokenize, chat and traindata

int LLVMFuzzerInitialize(int* argc, char*** argv) {
    (void)argc; (void)argv;
    g_verbose = getenv("FUZZ_VERBOSE") && atoi(getenv("FUZZ_VERBOSE"));
    g_null = fopen("/dev/null", "w");
    for (int i = 0; i < 2; i++) {
        g_memfd[i] = memfd_create("fuzz-input", 0);
        if (g_memfd[i] < 0 || !g_null) { perror("fuzz: memfd_create or /dev/null"); abort(); }
        snprintf(g_path[i], sizeof(g_path[i]), "/proc/self/fd/%d", g_memfd[i]);
    }
#if TARGET == FT_tokenize || TARGET == FT_chat || TARGET == FT_traindata
    const char* tok_path = getenv("FUZZ_TOK") ? getenv("FUZZ_TOK") : "data/toy/toy.tok";
    build_tokenizer(&g_tok, tok_path);
#endif
    return 0;
}

// ----------------------------------------------------------------------------
// Checks shared by the tokenizer targets

// encode(text) with room for every byte: ids in range, pieces spell the text
// back, no special id unless parse_special.
static void check_encode(const Tokenizer* tok, const char* text, size_t len, int parse_special) {
    int* ids = malloc((len + 1) * sizeof(int));
    int n = encode(tok, text, len, parse_special, ids, (int)len + 1);
    FUZZ_CHECK(n >= 0 && (size_t)n <= len, "n = %d for %zu bytes", n, len);
    size_t at = 0;
    for (int i = 0; i < n; i++) {
        FUZZ_CHECK(ids[i] >= 0 && ids[i] < tok->vocab_size, "id %d", ids[i]);
        FUZZ_CHECK(parse_special || !tok->is_special[ids[i]], "special id %d from plain text", ids[i]);
        int pl;
        const char* piece = token_piece(tok, ids[i], &pl);
        FUZZ_CHECK(pl > 0 && at + (size_t)pl <= len && memcmp(text + at, piece, (size_t)pl) == 0,
                   "token %d (id %d) does not spell the text at byte %zu", i, ids[i], at);
        at += (size_t)pl;
    }
    FUZZ_CHECK(at == len, "the pieces spell %zu of %zu bytes", at, len);
    free(ids);
}

// ----------------------------------------------------------------------------
// The targets

static int fuzz_tokenize(const uint8_t* data, size_t size) {
    if (size == 0) return 0;
    check_encode(&g_tok, (const char*)data + 1, size - 1, data[0] & 1);
    return 0;
}

// Walks the template tokens of one message from ids[*at]: the header, the
// role spelled as text, the end of the header, "\n\n" and text that occurs
// in the content, <|eot_id|> (or, for the generation prompt, the header of
// "assistant" and "\n\n").
static int spell(const Tokenizer* tok, const int* ids, int n, int* at, char* out, size_t cap) {
    size_t k = 0;
    while (*at < n && !tok->is_special[ids[*at]]) {
        int pl;
        const char* piece = token_piece(tok, ids[*at], &pl);
        FUZZ_CHECK(k + (size_t)pl < cap, "message text longer than its input");
        memcpy(out + k, piece, (size_t)pl);
        k += (size_t)pl;
        (*at)++;
    }
    out[k] = '\0';
    return (int)k;
}

static void check_template(const Tokenizer* tok, const int* ids, int n, const ChatMessage* msgs, int n_msgs,
                           int gen, int bos, size_t cap) {
    int sh = tokenizer_lookup(tok, "<|start_header_id|>"), eh = tokenizer_lookup(tok, "<|end_header_id|>");
    int eot = tokenizer_lookup(tok, "<|eot_id|>");
    int at = 0, n_special = 0;
    for (int i = 0; i < n; i++) n_special += tok->is_special[ids[i]];
    int want = (bos && tok->bos_id >= 0) + 3 * n_msgs + (gen ? 2 : 0);
    FUZZ_CHECK(n_special == want, "%d special tokens, the template has %d", n_special, want);
    if (bos && tok->bos_id >= 0) { FUZZ_CHECK(ids[0] == tok->bos_id, "no BOS"); at = 1; }
    char* buf = malloc(cap + 1);
    for (int m = 0; m <= n_msgs; m++) {
        if (m == n_msgs && !gen) break;
        const char* role = m < n_msgs ? (msgs[m].role ? msgs[m].role : "") : "assistant";
        FUZZ_CHECK(at < n && ids[at] == sh, "message %d: no <|start_header_id|>", m);
        at++;
        int l = spell(tok, ids, n, &at, buf, cap);
        FUZZ_CHECK((size_t)l == strlen(role) && !memcmp(buf, role, (size_t)l), "message %d: role not spelled back", m);
        FUZZ_CHECK(at < n && ids[at] == eh, "message %d: no <|end_header_id|>", m);
        at++;
        l = spell(tok, ids, n, &at, buf, cap);
        FUZZ_CHECK(l >= 2 && buf[0] == '\n' && buf[1] == '\n', "message %d: no blank line after the header", m);
        if (m == n_msgs) { FUZZ_CHECK(l == 2 && at == n, "generation prompt: text after the header"); break; }
        const char* content = msgs[m].content ? msgs[m].content : "";
        FUZZ_CHECK(l == 2 || memmem(content, strlen(content), buf + 2, (size_t)l - 2),
                   "message %d: text that is not in the content", m);
        FUZZ_CHECK(at < n && ids[at] == eot, "message %d: no <|eot_id|>", m);
        at++;
    }
    FUZZ_CHECK(at == n, "%d tokens after the template", n - at);
    free(buf);
}

static int fuzz_chat(const uint8_t* data, size_t size) {
    if (size == 0) return 0;
    int flags = data[0];
    char* text = malloc(size); // the fields, NUL-terminated
    memcpy(text, data + 1, size - 1);
    text[size - 1] = '\0';
    const char* field[33];
    int n_field = 0;
    for (size_t at = 0; at < size && n_field < 33;) {
        field[n_field++] = text + at;
        at += strlen(text + at) + 1;
    }
    const char* system = NULL;
    int f0 = 0;
    if (flags & 8) system = field[f0++];
    ChatMessage msgs[16];
    int n_msgs = 0;
    static const char* roles[3] = {"system", "user", "assistant"};
    size_t cap = 16;
    while (f0 < n_field && n_msgs < 16) {
        if (flags & 4) {
            if (f0 + 1 >= n_field) break;
            msgs[n_msgs].role = field[f0]; msgs[n_msgs].content = field[f0 + 1]; f0 += 2;
        } else {
            msgs[n_msgs].role = roles[n_msgs % 3]; msgs[n_msgs].content = field[f0++];
        }
        cap += strlen(msgs[n_msgs].role) + strlen(msgs[n_msgs].content) + 5;
        n_msgs++;
    }
    int gen = flags & 1, bos = (flags >> 1) & 1;
    int* ids = malloc(cap * sizeof(int));
    int n = chat_encode(&g_tok, msgs, n_msgs, gen, bos, ids, (int)cap);
    check_template(&g_tok, ids, n, msgs, n_msgs, gen, bos, cap);
    free(ids);
    // the harness's wrapper: system prompt in front, BOS and generation prompt
    int* eids;
    n = eval_chat_tokens(&g_tok, system, msgs, n_msgs, &eids);
    ChatMessage all[17];
    int n_all = 0;
    if (system) { all[0].role = "system"; all[0].content = system; n_all = 1; cap += strlen(system) + 5; }
    for (int i = 0; i < n_msgs; i++) all[n_all++] = msgs[i];
    check_template(&g_tok, eids, n, all, n_all, 1, 1, cap);
    free(eids);
    free(text);
    return 0;
}

static int fuzz_model(const uint8_t* data, size_t size) {
    Config c;
    if (rejected(parse_model_header(data, size, &c, g_err, sizeof(g_err)))) return 0;
    // the header passed: the loader must now succeed, and the forward pass
    // must survive whatever the weights are
    Transformer t;
    int ctx = c.max_seq_len < 4 ? c.max_seq_len : 4;
    build_transformer(&t, as_file(0, data, size), ctx);
    FUZZ_CHECK(!memcmp(&t.config, &c, sizeof(c)), "the loader read another header than parse_model_header");
    int tokens[3] = {0, c.vocab_size - 1, c.bos_id >= 0 ? c.bos_id : 0};
    int n = ctx < 3 ? ctx : 3;
    forward_batch(&t, tokens, n, 0, NULL);
    if (n < ctx) forward(&t, c.vocab_size / 2, n);
    free_transformer(&t);
    return 0;
}

static int fuzz_tokfile(const uint8_t* data, size_t size) {
    static Tokenizer tok; // static: set inside GUARDED, read after it
    GUARDED(build_tokenizer(&tok, as_file(0, data, size)));
    if (g_exited) return 0;
    static const char sample[] = "Hello world! It's <|eot_id|> caf\xc3\xa9 \xf0\x9f\x98\x80 12345\n\n  the thing";
    check_encode(&tok, sample, sizeof(sample) - 1, 0);
    check_encode(&tok, sample, sizeof(sample) - 1, 1);
    check_encode(&tok, (const char*)data, size < 512 ? size : 512, 1);
    free_tokenizer(&tok);
    return 0;
}

// The tiny config of the seeds (tests/fuzz/make_seeds.py) and Llama-3-8B.
static const Config tiny_config = {.dim = 8, .hidden_dim = 16, .n_layers = 2, .n_heads = 2, .n_kv_heads = 1,
                                   .head_dim = 4, .vocab_size = 16};
static const Config llama8b_config = {.dim = 4096, .hidden_dim = 14336, .n_layers = 32, .n_heads = 32,
                                      .n_kv_heads = 8, .head_dim = 128, .vocab_size = 128256};

static int fuzz_lora(const uint8_t* data, size_t size) {
    if (size == 0) return 0;
    const Config* c = data[0] & 1 ? &llama8b_config : &tiny_config;
    Lora lora;
    if (rejected(lora_read(&lora, c, as_file(0, data + 1, size - 1), g_err, sizeof(g_err)))) return 0;
    if (c == &tiny_config) {
        float x[2 * 16] = {0}, y[2 * 16] = {0}, tmp[2 * 64];
        for (int i = 0; i < 32; i++) x[i] = 0.1f * (float)(i % 7) - 0.3f;
        FUZZ_CHECK(lora.rank <= 64, "rank %d above the tiny model's scratch", lora.rank);
        for (int l = lora.layer_begin; l < lora.layer_end; l++)
            for (int tg = 0; tg < LORA_N_TARGETS; tg++) {
                int in, out;
                lora_dims(c, tg, &in, &out);
                lora_apply(y, x, &lora, l, tg, 2, in, out, tmp);
            }
    }
    free_lora(&lora);
    return 0;
}

static int fuzz_sae(const uint8_t* data, size_t size) {
    Sae s;
    if (rejected(sae_load(&s, as_file(0, data, size), g_err, sizeof(g_err)))) return 0;
    (void)sae_engine_layer(&s);
    float* x = calloc((size_t)s.d, sizeof(float));
    float* f = calloc((size_t)s.n, sizeof(float));
    float* xhat = calloc((size_t)s.d, sizeof(float));
    for (int j = 0; j < s.d; j++) x[j] = 0.25f * (float)(j % 5) - 0.5f;
    sae_encode(&s, x, 1, f);
    sae_decode(&s, f, 1, xhat);
    int active = 0;
    for (int i = 0; i < s.n; i++) active += f[i] != 0.0f;
    FUZZ_CHECK(s.arch != SAE_TOPK || active <= s.k, "TopK SAE with k=%d has %d active latents", s.k, active);
    free(x); free(f); free(xhat);
    sae_free(&s);
    return 0;
}

static int fuzz_traindata(const uint8_t* data, size_t size) {
    if (size < 2) return 0;
    int kind = data[0] & 3, pack = (data[0] >> 2) & 1, T = 2 + data[1] % 48;
    const char* system = (data[0] & 8) ? "Be brief." : NULL;
    data += 2; size -= 2;
    Config c;
    memset(&c, 0, sizeof(c));
    c.vocab_size = g_tok.vocab_size;
    c.bos_id = g_tok.bos_id;
    static Dataset d; // static: filled inside GUARDED, read after it
    static Term* terms;
    static int nt;
    if (kind == 3) { // WHP: dictionary NUL text
        const char *dict, *text;
        as_two_files(data, size, &dict, &text);
        GUARDED(nt = load_dict(dict, &terms); dataset_whp(&d, &g_tok, &c, text, terms, nt, T));
        if (!g_exited) free_dict(terms, nt);
    } else {
        static const char* formats[3] = {"text", "tsv", "jsonl"};
        GUARDED(dataset_load(&d, &g_tok, &c, as_file(0, data, size), formats[kind], system, T, pack));
    }
    if (g_exited) return 0;
    // draw batches the way training does and check what the model would read
    FUZZ_CHECK(d.n > 0 && d.T == T, "%d rows of T=%d", d.n, d.T);
    Loader ld;
    loader_init(&ld, &d, 7, 0, 0);
    Batch b;
    batch_alloc(&b, 2, T, d.Tt, d.pos != NULL);
    for (int k = 0; k < 3; k++) {
        loader_next(&ld, &b);
        for (int i = 0; i < 2 * T; i++) {
            FUZZ_CHECK(b.inputs[i] >= 0 && b.inputs[i] < c.vocab_size && b.targets[i] >= 0 &&
                       b.targets[i] < c.vocab_size, "token id out of range at %d", i);
            FUZZ_CHECK(b.weights[i] == 0.0f || b.weights[i] == 1.0f, "weight %g", b.weights[i]);
            if (b.pos) FUZZ_CHECK(b.pos[i] >= 0 && b.pos[i] <= i % T && (b.pos[i] == 0 || i % T == 0 ||
                                  b.pos[i] == b.pos[i - 1] + 1), "packed position %d at %d", b.pos[i], i);
            if (b.Tt > 0) FUZZ_CHECK(b.label_pos[i] >= -1 && b.label_pos[i] < b.Tt, "label position %d", b.label_pos[i]);
        }
        for (int i = 0; i < 2 * b.Tt; i++)
            FUZZ_CHECK(b.trans_inputs[i] >= 0 && b.trans_inputs[i] < c.vocab_size, "translated id out of range");
    }
    batch_free(&b);
    free(ld.perm);
    dataset_free(&d);
    return 0;
}

static int fuzz_evaldata(const uint8_t* data, size_t size) {
    if (size < 2) return 0;
    int kind = data[0] % 3, keep = data[1] % 8;
    data += 2; size -= 2;
    static RelearnFact* facts;
    static int n_facts;
    static char* facts_text;
    static QASet qa;
    static JailbreakSet jb;
    if (kind == 0) { // facts NUL QA
        const char *fpath, *qpath;
        as_two_files(data, size, &fpath, &qpath);
        GUARDED(eval_load_facts(fpath, &facts, &n_facts, &facts_text); eval_load_qa(&qa, qpath, keep, facts, n_facts));
        if (g_exited) return 0;
        for (int i = 0; i < qa.n; i++)
            FUZZ_CHECK(qa.rows[i].question && qa.rows[i].gold && *qa.rows[i].gold && qa.rows[i].split, "row %d", i);
        eval_free_qa(&qa);
        free(facts); free(facts_text);
    } else if (kind == 1) {
        GUARDED(eval_load_qa(&qa, as_file(0, data, size), keep, NULL, 0));
        if (g_exited) return 0;
        FUZZ_CHECK(keep == 0 || qa.n <= keep + 16, "kept %d rows of %d asked", qa.n, keep);
        eval_free_qa(&qa);
    } else {
        GUARDED(eval_load_jailbreak(&jb, as_file(0, data, size), keep));
        if (g_exited) return 0;
        for (int i = 0; i < jb.n; i++) {
            FUZZ_CHECK(jb.items[i].n_msgs > 0 && jb.items[i].n_golds > 0, "item %d", i);
            for (int m = 0; m < jb.items[i].n_msgs; m++)
                FUZZ_CHECK(utf8_valid(jb.items[i].msgs[m].content, strlen(jb.items[i].msgs[m].content)), "UTF-8");
        }
        eval_free_jailbreak(&jb);
    }
    return 0;
}

// The target this binary was built for (-DFUZZ_TARGET=NAME).
int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    static int (*const targets[])(const uint8_t*, size_t) = {
        [FT_tokenize] = fuzz_tokenize, [FT_chat] = fuzz_chat, [FT_model] = fuzz_model, [FT_tokfile] = fuzz_tokfile,
        [FT_lora] = fuzz_lora, [FT_sae] = fuzz_sae, [FT_traindata] = fuzz_traindata, [FT_evaldata] = fuzz_evaldata,
    };
    return targets[TARGET](data, size);
}
