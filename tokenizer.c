// tokenizer.c -- the exact Llama-3 byte-level BPE tokenizer (file format in run.h).
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <limits.h>
#include "run.h"
#include "unicode_ranges.h"

// ----------------------------------------------------------------------------
// Tokenizer: exact Llama-3 byte-level BPE, as Hugging Face `tokenizers` runs
// Meta's tokenizer.json (the ids match HF AutoTokenizer id for id).
//
// encode(text) =
//   1. (parse_special) split the text around special token strings,
//      leftmost match first, longest special at that position;
//   2. pre-tokenize each piece in between with the Llama-3 regex
//        (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
//         ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
//      run by a hand-written matcher over UTF-8 codepoints (tok_match);
//   3. BPE each pre-token: if ignore_merges and the whole pre-token is a
//      vocab entry, emit it; else start from one token per byte and keep
//      merging the adjacent pair of lowest merge rank (leftmost on ties).
//
// Invalid UTF-8 (which HF never sees: Rust strings are valid UTF-8) is
// handled deterministically: each byte that does not start a valid
// sequence is one codepoint of its own that is neither \p{L}, \p{N} nor
// \s (like Python's surrogateescape). Its byte still has a token, so the
// text round-trips. The chat CLI rejects invalid UTF-8 with utf8_valid.


// bytes -> id, open addressing (linear probing) over token ids
typedef struct {
    int cap;                          // power of two, >= 2 * entries
    int* slot;                        // (cap,) token id, or -1 when empty
    int byte_id[256];                 // token of each single byte: the BPE start symbols
    unsigned char special_first[256]; // 1 if some special token starts with this byte
} TokVocabIndex;

// (left, right) -> (rank, merged), open addressing over packed pair keys
typedef struct {
    int cap;                          // power of two, >= 2 * n_merges
    uint64_t* key;                    // (cap,) left << 32 | right, TOK_EMPTY_KEY when empty
    int* rank;                        // (cap,)
    int* merged;                      // (cap,)
} TokMergeIndex;

#define TOK_EMPTY_KEY UINT64_MAX
#define TOK_INVALID_CP 0x110000u  // + byte: a byte that is not valid UTF-8

static uint32_t tok_hash_bytes(const char* s, int n) {
    uint64_t h = 1469598103934665603ull; // FNV-1a 64
    for (int i = 0; i < n; i++) { h ^= (unsigned char)s[i]; h *= 1099511628211ull; }
    return (uint32_t)(h ^ (h >> 32));
}

static uint32_t tok_hash_pair(uint64_t key) {
    key ^= key >> 33; key *= 0xff51afd7ed558ccdull; key ^= key >> 33; // murmur3 finalizer
    key *= 0xc4ceb9fe1a85ec53ull; key ^= key >> 33;
    return (uint32_t)key;
}

static int tok_pow2_at_least(long n) {
    int cap = 16;
    while (cap < n) cap *= 2;
    return cap;
}

// The id of exactly these n bytes, or -1 (special tokens included; when a
// special and a normal token share bytes, the normal one is indexed).
static int tok_vocab_find(const Tokenizer* tok, const char* s, int n) {
    const TokVocabIndex* vi = (const TokVocabIndex*)tok->vocab_index;
    uint32_t mask = (uint32_t)vi->cap - 1;
    for (uint32_t h = tok_hash_bytes(s, n) & mask;; h = (h + 1) & mask) {
        int id = vi->slot[h];
        if (id < 0) return -1;
        if (tok->token_len[id] == n && memcmp(tok->token_bytes[id], s, (size_t)n) == 0) return id;
    }
}

// Merge of the pair (left, right): returns its rank and sets *merged, or -1.
static int tok_merge_find(const TokMergeIndex* mi, int left, int right, int* merged) {
    uint64_t key = ((uint64_t)(uint32_t)left << 32) | (uint32_t)right;
    uint32_t mask = (uint32_t)mi->cap - 1;
    for (uint32_t h = tok_hash_pair(key) & mask;; h = (h + 1) & mask) {
        if (mi->key[h] == TOK_EMPTY_KEY) return -1;
        if (mi->key[h] == key) { *merged = mi->merged[h]; return mi->rank[h]; }
    }
}

// ---- reading the file

typedef struct {
    const unsigned char* p;
    size_t left;
    const char* path;
} TokReader;

static int32_t tok_get_i32(TokReader* r, const char* what) {
    if (r->left < 4)
        die("tokenizer file %s: truncated (reading %s)", r->path, what);
    uint32_t v = (uint32_t)r->p[0] | (uint32_t)r->p[1] << 8 | (uint32_t)r->p[2] << 16 | (uint32_t)r->p[3] << 24;
    r->p += 4; r->left -= 4;
    return (int32_t)v;
}

static void tok_bad(const char* path, const char* why, long a) {
    die("tokenizer file %s: %s (%ld)", path, why, a);
}

typedef struct { int len, id; } TokSpecialKey;

static int tok_cmp_special(const void* a, const void* b) {
    const TokSpecialKey* x = (const TokSpecialKey*)a;
    const TokSpecialKey* y = (const TokSpecialKey*)b;
    if (x->len != y->len) return y->len - x->len; // longest first
    return x->id - y->id;
}

// The header: sizes and ids, every one checked before anything is sized by it.
static void tok_read_header(Tokenizer* tok, TokReader* r) {
    const char* path = r->path;
    uint32_t magic = (uint32_t)tok_get_i32(r, "magic");
    if (magic != TOK_MAGIC) tok_bad(path, "bad magic, not a tokenizer file", (long)magic);
    int version = tok_get_i32(r, "version");
    if (version != TOK_VERSION) tok_bad(path, "unsupported version", version);
    int vocab_size = tok_get_i32(r, "vocab_size");
    if (vocab_size < 256 || vocab_size > (1 << 24)) tok_bad(path, "bad vocab_size", vocab_size);
    int n_merges = tok_get_i32(r, "n_merges");
    if (n_merges < 0 || n_merges > (1 << 26)) tok_bad(path, "bad n_merges", n_merges);
    int bos_id = tok_get_i32(r, "bos_id");
    if (bos_id < -1 || bos_id >= vocab_size) tok_bad(path, "bad bos_id", bos_id);
    int n_eot = tok_get_i32(r, "n_eot");
    if (n_eot < 0 || n_eot > 256) tok_bad(path, "bad n_eot", n_eot);
    tok->vocab_size = vocab_size;
    tok->n_merges = n_merges;
    tok->bos_id = bos_id;
    tok->n_eot = n_eot;
    tok->eot_ids = (int*)xcalloc((size_t)n_eot + 1, sizeof(int));
    for (int i = 0; i < n_eot; i++) {
        tok->eot_ids[i] = tok_get_i32(r, "eot_ids");
        if (tok->eot_ids[i] < 0 || tok->eot_ids[i] >= vocab_size) tok_bad(path, "bad eot id", tok->eot_ids[i]);
    }
    int ignore_merges = tok_get_i32(r, "ignore_merges");
    if (ignore_merges != 0 && ignore_merges != 1) tok_bad(path, "bad ignore_merges", ignore_merges);
    tok->ignore_merges = ignore_merges;
    // counts are checked against the bytes that follow before anything is
    // sized by them: a lying header is an error, not gigabytes of tables
    // (each token takes at least 5 bytes, each merge exactly 12)
    if ((size_t)vocab_size * 5 + (size_t)n_merges * 12 > r->left)
        tok_bad(path, "file too small for its vocab_size and n_merges", (long)r->left);
}

// The tokens: one blob holding every token's bytes, each NUL-terminated for
// convenience; token_bytes[0] is the start of the blob (freed by it).
// Leaves r at the merges.
static void tok_read_tokens(Tokenizer* tok, TokReader* r) {
    int vocab_size = tok->vocab_size;
    const char* path = r->path;
    tok->token_bytes = (char**)xmalloc((size_t)vocab_size * sizeof(char*));
    tok->token_len = (int*)xmalloc((size_t)vocab_size * sizeof(int));
    tok->is_special = (unsigned char*)xmalloc((size_t)vocab_size);
    TokReader v = *r;
    size_t total = 0;
    for (int i = 0; i < vocab_size; i++) { // first pass: validate, measure
        if (v.left < 5) tok_bad(path, "truncated in token", i);
        unsigned char flags = v.p[0];
        v.p += 1; v.left -= 1;
        int len = tok_get_i32(&v, "token length");
        if (flags > 1) tok_bad(path, "bad token flags", i);
        if (len < 0 || (size_t)len > v.left) tok_bad(path, "bad token length", i);
        v.p += len; v.left -= (size_t)len;
        total += (size_t)len + 1;
    }
    if (v.left != (size_t)tok->n_merges * 12) tok_bad(path, "size after the tokens does not match n_merges", (long)v.left);
    char* blob = (char*)xmalloc(total);
    size_t at = 0;
    for (int i = 0; i < vocab_size; i++) { // second pass: copy (already validated)
        tok->is_special[i] = r->p[0];
        r->p += 1; r->left -= 1;
        int len = tok_get_i32(r, "token length");
        memcpy(blob + at, r->p, (size_t)len);
        blob[at + (size_t)len] = '\0';
        tok->token_bytes[i] = blob + at;
        tok->token_len[i] = len;
        r->p += len; r->left -= (size_t)len;
        at += (size_t)len + 1;
    }
}

// bytes -> id. The first normal token with given bytes wins; a special
// token is indexed only when no normal token has its bytes.
static void tok_index_vocab(Tokenizer* tok, const char* path) {
    int vocab_size = tok->vocab_size;
    TokVocabIndex* vi = (TokVocabIndex*)xcalloc(1, sizeof(TokVocabIndex));
    vi->cap = tok_pow2_at_least(2L * vocab_size);
    vi->slot = (int*)xmalloc((size_t)vi->cap * sizeof(int));
    for (int i = 0; i < vi->cap; i++) vi->slot[i] = -1;
    tok->vocab_index = vi;
    uint32_t vmask = (uint32_t)vi->cap - 1;
    for (int id = 0; id < vocab_size; id++) {
        int n = tok->token_len[id];
        if (n == 0) continue;
        uint32_t h = tok_hash_bytes(tok->token_bytes[id], n) & vmask;
        for (;; h = (h + 1) & vmask) {
            int o = vi->slot[h];
            if (o < 0) { vi->slot[h] = id; break; }
            if (tok->token_len[o] == n && memcmp(tok->token_bytes[o], tok->token_bytes[id], (size_t)n) == 0) {
                if (tok->is_special[o] && !tok->is_special[id]) vi->slot[h] = id;
                break;
            }
        }
    }
    for (int b = 0; b < 256; b++) {
        char c = (char)b;
        int id = tok_vocab_find(tok, &c, 1);
        if (id < 0 || tok->is_special[id]) tok_bad(path, "no token for byte (not a byte-level BPE)", b);
        vi->byte_id[b] = id;
    }
}

// The merges: (left, right) -> (rank, merged); a repeated pair keeps its
// last rank, as HF's HashMap collect does. Each must spell left + right.
static void tok_read_merges(Tokenizer* tok, TokReader* r) {
    int vocab_size = tok->vocab_size, n_merges = tok->n_merges;
    const char* path = r->path;
    TokMergeIndex* mi = (TokMergeIndex*)xcalloc(1, sizeof(TokMergeIndex));
    mi->cap = tok_pow2_at_least(2L * n_merges + 1);
    mi->key = (uint64_t*)xmalloc((size_t)mi->cap * sizeof(uint64_t));
    mi->rank = (int*)xmalloc((size_t)mi->cap * sizeof(int));
    mi->merged = (int*)xmalloc((size_t)mi->cap * sizeof(int));
    for (int i = 0; i < mi->cap; i++) mi->key[i] = TOK_EMPTY_KEY;
    tok->merge_index = mi;
    uint32_t mmask = (uint32_t)mi->cap - 1;
    for (int k = 0; k < n_merges; k++) {
        int a = tok_get_i32(r, "merge"), b = tok_get_i32(r, "merge"), m = tok_get_i32(r, "merge");
        if (a < 0 || a >= vocab_size || b < 0 || b >= vocab_size || m < 0 || m >= vocab_size)
            tok_bad(path, "merge id out of range at rank", k);
        if (tok->is_special[a] || tok->is_special[b] || tok->is_special[m])
            tok_bad(path, "merge uses a special token at rank", k);
        int la = tok->token_len[a], lb = tok->token_len[b];
        if (la == 0 || lb == 0 || tok->token_len[m] != la + lb
            || memcmp(tok->token_bytes[m], tok->token_bytes[a], (size_t)la) != 0
            || memcmp(tok->token_bytes[m] + la, tok->token_bytes[b], (size_t)lb) != 0)
            tok_bad(path, "merged token is not left + right at rank", k);
        uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
        for (uint32_t h = tok_hash_pair(key) & mmask;; h = (h + 1) & mmask) {
            if (mi->key[h] == TOK_EMPTY_KEY || mi->key[h] == key) {
                mi->key[h] = key; mi->rank[h] = k; mi->merged[h] = m;
                break;
            }
        }
    }
    if (r->left != 0) tok_bad(path, "trailing bytes after the merges", (long)r->left);
}

// Special tokens, longest first, for matching in text.
static void tok_index_specials(Tokenizer* tok) {
    TokVocabIndex* vi = (TokVocabIndex*)tok->vocab_index;
    TokSpecialKey* keys = (TokSpecialKey*)xmalloc((size_t)tok->vocab_size * sizeof(TokSpecialKey));
    int ns = 0;
    for (int id = 0; id < tok->vocab_size; id++) {
        if (tok->is_special[id] && tok->token_len[id] > 0) {
            keys[ns].len = tok->token_len[id];
            keys[ns].id = id;
            ns++;
            vi->special_first[(unsigned char)tok->token_bytes[id][0]] = 1;
        }
    }
    qsort(keys, (size_t)ns, sizeof(TokSpecialKey), tok_cmp_special);
    tok->special_ids = (int*)xmalloc(((size_t)ns + 1) * sizeof(int));
    for (int i = 0; i < ns; i++) tok->special_ids[i] = keys[i].id;
    tok->n_special = ns;
    free(keys);
}

void build_tokenizer(Tokenizer* tok, const char* path) {
    memset(tok, 0, sizeof(*tok));
    size_t size;
    char* data = read_file(path, &size);
    TokReader r = { (const unsigned char*)data, size, path };
    tok_read_header(tok, &r);
    tok_read_tokens(tok, &r);
    tok_index_vocab(tok, path);
    tok_read_merges(tok, &r);
    tok_index_specials(tok);
    free(data);
}

void free_tokenizer(Tokenizer* tok) {
    if (tok->token_bytes) free(tok->token_bytes[0]); // the blob
    free(tok->token_bytes);
    free(tok->token_len);
    free(tok->is_special);
    free(tok->eot_ids);
    free(tok->special_ids);
    TokVocabIndex* vi = (TokVocabIndex*)tok->vocab_index;
    if (vi) { free(vi->slot); free(vi); }
    TokMergeIndex* mi = (TokMergeIndex*)tok->merge_index;
    if (mi) { free(mi->key); free(mi->rank); free(mi->merged); free(mi); }
    memset(tok, 0, sizeof(*tok));
}

// ---- UTF-8

// Decodes one strict UTF-8 sequence at s[0..n) (n >= 1): no overlong forms,
// no surrogates, nothing above U+10FFFF. Returns its byte length and sets
// *cp; on an invalid or truncated sequence returns 1 and sets *cp to
// TOK_INVALID_CP + s[0].
static int tok_utf8_decode(const unsigned char* s, size_t n, uint32_t* cp) {
    unsigned c = s[0];
    if (c < 0x80) { *cp = c; return 1; }
    int len; uint32_t v, min;
    if (c >= 0xC2 && c <= 0xDF) { len = 2; v = c & 0x1F; min = 0x80; }
    else if (c >= 0xE0 && c <= 0xEF) { len = 3; v = c & 0x0F; min = 0x800; }
    else if (c >= 0xF0 && c <= 0xF4) { len = 4; v = c & 0x07; min = 0x10000; }
    else { *cp = TOK_INVALID_CP + c; return 1; }
    if ((size_t)len > n) { *cp = TOK_INVALID_CP + c; return 1; }
    for (int i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80) { *cp = TOK_INVALID_CP + c; return 1; }
        v = (v << 6) | (s[i] & 0x3F);
    }
    if (v < min || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF)) { *cp = TOK_INVALID_CP + c; return 1; }
    *cp = v;
    return len;
}

int utf8_valid(const char* s, size_t len) {
    const unsigned char* p = (const unsigned char*)s;
    size_t i = 0;
    while (i < len) {
        uint32_t cp;
        i += (size_t)tok_utf8_decode(p + i, len - i, &cp);
        if (cp >= TOK_INVALID_CP) return 0;
    }
    return 1;
}

void utf8_strip(const char* s, size_t len, size_t* b, size_t* e) {
    size_t at = 0;
    int seen = 0;
    *b = *e = 0;
    while (at < len) {
        uint32_t c;
        size_t l = (size_t)tok_utf8_decode((const unsigned char*)s + at, len - at, &c);
        int space = c < TOK_INVALID_CP && unicode_is_pystrip(c);
        if (!space) { if (!seen) { *b = at; seen = 1; } *e = at + l; }
        at += l;
    }
}

// ---- pre-tokenizer

enum { TC_OTHER = 0, TC_LETTER = 1, TC_NUMBER = 2, TC_SPACE = 3 };

static unsigned char tok_class(uint32_t cp) {
    if (cp < 0x80) {
        if ((cp | 0x20) >= 'a' && (cp | 0x20) <= 'z') return TC_LETTER;
        if (cp >= '0' && cp <= '9') return TC_NUMBER;
        if (cp == ' ' || (cp >= 0x09 && cp <= 0x0D)) return TC_SPACE;
        return TC_OTHER;
    }
    if (cp >= TOK_INVALID_CP) return TC_OTHER;
    if (unicode_is_letter(cp)) return TC_LETTER;
    if (unicode_is_number(cp)) return TC_NUMBER;
    if (unicode_is_space(cp)) return TC_SPACE;
    return TC_OTHER;
}

// Case folding for the (?i:...) contractions. Only ASCII letters and
// U+017F LATIN SMALL LETTER LONG S (which folds to 's') can match them;
// Oniguruma, the Rust regex crate and Python's regex all match "'ſ" as 's.
static uint32_t tok_fold(uint32_t c) {
    if (c >= 'A' && c <= 'Z') return c + 32;
    if (c == 0x17F) return 's';
    return c;
}

static int tok_is_crlf(uint32_t c) { return c == '\r' || c == '\n'; }

// The Llama-3 regex at codepoint i of cp[0..n) (cls = tok_class of each):
// returns the end (exclusive) of the match starting at i. Some alternative
// always matches at least one codepoint, so the pieces tile the text. The
// alternatives are tried in order, leftmost-first, exactly as a
// backtracking engine (Oniguruma) resolves them:
static int tok_match(const uint32_t* cp, const unsigned char* cls, int i, int n) {
    uint32_t c = cp[i];
    // 1. (?i:'s|'t|'re|'ve|'m|'ll|'d): no alternative is a prefix of another
    if (c == '\'' && i + 1 < n) {
        uint32_t a = tok_fold(cp[i + 1]);
        if (a == 's' || a == 't' || a == 'm' || a == 'd') return i + 2;
        if (i + 2 < n) {
            uint32_t b = tok_fold(cp[i + 2]);
            if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return i + 3;
        }
    }
    // 2. [^\r\n\p{L}\p{N}]?\p{L}+ : one optional lead char (a space, tab,
    //    punctuation, ...) only if a letter follows it, then all the letters
    int k = i;
    if (cls[k] != TC_LETTER && cls[k] != TC_NUMBER && !tok_is_crlf(c) && k + 1 < n && cls[k + 1] == TC_LETTER) k++;
    if (cls[k] == TC_LETTER) {
        while (k < n && cls[k] == TC_LETTER) k++;
        return k;
    }
    // 3. \p{N}{1,3}
    if (cls[i] == TC_NUMBER) {
        k = i + 1;
        while (k < n && k < i + 3 && cls[k] == TC_NUMBER) k++;
        return k;
    }
    // 4. " ?[^\s\p{L}\p{N}]+[\r\n]*" : the optional space only if a symbol follows
    k = i;
    if (c == ' ' && k + 1 < n && cls[k + 1] == TC_OTHER) k++;
    if (cls[k] == TC_OTHER) {
        while (k < n && cls[k] == TC_OTHER) k++;
        while (k < n && tok_is_crlf(cp[k])) k++;
        return k;
    }
    // cp[i] is whitespace now; [i, j) is the whole whitespace run
    int j = i;
    while (j < n && cls[j] == TC_SPACE) j++;
    // 5. \s*[\r\n]+ : \s* backs off until [\r\n]+ can match, i.e. the match
    //    ends just after the LAST \r or \n of the run (what follows that
    //    newline inside the run is not a newline, so [\r\n]+ takes one)
    for (k = j - 1; k >= i; k--)
        if (tok_is_crlf(cp[k])) return k + 1;
    // 6. \s+(?!\S) : the whole run at the end of the text; else the run minus
    //    its last char (that char then leads the next word: " Hello")
    if (j == n) return j;
    if (j - i >= 2) return j - 1;
    // 7. \s+ : a single whitespace char before a non-space
    return j;
}

// ---- BPE

// Work buffers of one encode call.
typedef struct {
    int* out;         // the caller's ids
    int n_out;
    int max_out;
    // per pre-token BPE scratch, grown on demand
    int cap;
    int* sym;         // (cap,) token id of the symbol starting at byte i, -1 if merged away
    int* next;        // (cap,) next live symbol, -1 at the end
    int* prev;        // (cap,) previous live symbol, -1 at the start
    uint64_t* heap;   // (3 * cap,) candidate merges: rank << 32 | position, min-heap
} TokWork;

static void tok_emit(TokWork* w, int id) {
    if (w->n_out >= w->max_out)
        die("encode: the text needs more than %d tokens", w->max_out);
    w->out[w->n_out++] = id;
}

static void tok_heap_push(uint64_t* heap, int* n, uint64_t v) {
    int i = (*n)++;
    while (i > 0) {
        int p = (i - 1) / 2;
        if (heap[p] <= v) break;
        heap[i] = heap[p];
        i = p;
    }
    heap[i] = v;
}

static uint64_t tok_heap_pop(uint64_t* heap, int* n) {
    uint64_t top = heap[0];
    uint64_t v = heap[--(*n)];
    int i = 0;
    for (;;) {
        int c = 2 * i + 1;
        if (c >= *n) break;
        if (c + 1 < *n && heap[c + 1] < heap[c]) c++;
        if (v <= heap[c]) break;
        heap[i] = heap[c];
        i = c;
    }
    heap[i] = v;
    return top;
}

static void tok_push_merge(const TokMergeIndex* mi, TokWork* w, int* hn, int pos, int right_pos) {
    int merged;
    int rank = tok_merge_find(mi, w->sym[pos], w->sym[right_pos], &merged);
    if (rank >= 0) tok_heap_push(w->heap, hn, ((uint64_t)(uint32_t)rank << 32) | (uint32_t)pos);
}

// BPE of one pre-token s[0..n), appending its ids. The heap holds every
// adjacent pair that has a merge, keyed (rank, left byte position), so the
// pop order is lowest rank, then leftmost: HF's word.merge_all exactly.
// Stale entries (a symbol merged since) are skipped on pop. O(n log n).
static void tok_bpe(const Tokenizer* tok, TokWork* w, const char* s, int n) {
    const TokVocabIndex* vi = (const TokVocabIndex*)tok->vocab_index;
    const TokMergeIndex* mi = (const TokMergeIndex*)tok->merge_index;
    if (n == 1) { tok_emit(w, vi->byte_id[(unsigned char)s[0]]); return; }
    if (tok->ignore_merges) {
        int id = tok_vocab_find(tok, s, n);
        if (id >= 0 && !tok->is_special[id]) { tok_emit(w, id); return; }
    }
    if (n > w->cap) {
        int cap = w->cap ? w->cap : 64;
        while (cap < n) cap *= 2;
        free(w->sym); free(w->next); free(w->prev); free(w->heap);
        w->sym = (int*)xmalloc((size_t)cap * sizeof(int));
        w->next = (int*)xmalloc((size_t)cap * sizeof(int));
        w->prev = (int*)xmalloc((size_t)cap * sizeof(int));
        w->heap = (uint64_t*)xmalloc((size_t)cap * 3 * sizeof(uint64_t));
        w->cap = cap;
    }
    for (int i = 0; i < n; i++) {
        w->sym[i] = vi->byte_id[(unsigned char)s[i]];
        w->prev[i] = i - 1;
        w->next[i] = i + 1 < n ? i + 1 : -1;
    }
    int hn = 0;
    for (int i = 0; i + 1 < n; i++) tok_push_merge(mi, w, &hn, i, i + 1);
    while (hn > 0) {
        uint64_t top = tok_heap_pop(w->heap, &hn);
        int pos = (int)(uint32_t)top, rank = (int)(top >> 32);
        if (w->sym[pos] < 0) continue;        // merged into its left neighbour
        int nx = w->next[pos];
        if (nx < 0) continue;
        int merged = -1;
        if (tok_merge_find(mi, w->sym[pos], w->sym[nx], &merged) != rank) continue; // pair changed
        w->sym[pos] = merged;
        w->sym[nx] = -1;
        w->next[pos] = w->next[nx];
        if (w->next[nx] >= 0) w->prev[w->next[nx]] = pos;
        if (w->prev[pos] >= 0) tok_push_merge(mi, w, &hn, w->prev[pos], pos);
        if (w->next[pos] >= 0) tok_push_merge(mi, w, &hn, pos, w->next[pos]);
    }
    for (int i = 0; i >= 0; i = w->next[i]) tok_emit(w, w->sym[i]);
}

// Pre-tokenize and BPE a text without special tokens.
static void tok_encode_plain(const Tokenizer* tok, TokWork* w, const char* text, size_t len,
                             uint32_t* cp, int* off, unsigned char* cls) {
    const unsigned char* s = (const unsigned char*)text;
    int n = 0;
    size_t at = 0;
    while (at < len) {
        off[n] = (int)at;
        at += (size_t)tok_utf8_decode(s + at, len - at, &cp[n]);
        cls[n] = tok_class(cp[n]);
        n++;
    }
    off[n] = (int)len;
    for (int i = 0; i < n;) {
        int j = tok_match(cp, cls, i, n);
        tok_bpe(tok, w, text + off[i], off[j] - off[i]);
        i = j;
    }
}

// The longest special token that starts at s[0..n), or -1.
static int tok_match_special(const Tokenizer* tok, const char* s, size_t n) {
    for (int k = 0; k < tok->n_special; k++) {
        int id = tok->special_ids[k];
        size_t l = (size_t)tok->token_len[id];
        if (l <= n && memcmp(s, tok->token_bytes[id], l) == 0) return id;
    }
    return -1;
}

int encode(const Tokenizer* tok, const char* text, size_t len, int parse_special, int* ids, int max_ids) {
    if (len >= (size_t)INT_MAX / 2)
        die("encode: text of %zu bytes is too long", len);
    const TokVocabIndex* vi = (const TokVocabIndex*)tok->vocab_index;
    TokWork w = { ids, 0, max_ids, 0, NULL, NULL, NULL, NULL };
    // codepoints of the text: cp (len,), byte offset of each (len + 1,), class (len,)
    uint32_t* cp = (uint32_t*)xmalloc((len + 1) * sizeof(uint32_t));
    int* off = (int*)xmalloc((len + 1) * sizeof(int));
    unsigned char* cls = (unsigned char*)xmalloc(len + 1);
    size_t start = 0; // start of the plain text not yet encoded
    if (parse_special) {
        for (size_t p = 0; p < len;) {
            int id = vi->special_first[(unsigned char)text[p]] ? tok_match_special(tok, text + p, len - p) : -1;
            if (id < 0) { p++; continue; }
            tok_encode_plain(tok, &w, text + start, p - start, cp, off, cls);
            tok_emit(&w, id);
            p += (size_t)tok->token_len[id];
            start = p;
        }
    }
    tok_encode_plain(tok, &w, text + start, len - start, cp, off, cls);
    free(cp); free(off); free(cls);
    free(w.sym); free(w.next); free(w.prev); free(w.heap);
    return w.n_out;
}

const char* token_piece(const Tokenizer* tok, int id, int* len) {
    if (id < 0 || id >= tok->vocab_size)
        die("token id %d out of range [0, %d)", id, tok->vocab_size);
    *len = tok->token_len[id];
    return tok->token_bytes[id];
}

int tokenizer_lookup(const Tokenizer* tok, const char* s) {
    size_t n = strlen(s);
    if (n == 0 || n > INT_MAX) return -1;
    return tok_vocab_find(tok, s, (int)n);
}

int is_eot(const Tokenizer* tok, int id) {
    for (int i = 0; i < tok->n_eot; i++)
        if (tok->eot_ids[i] == id) return 1;
    return 0;
}
