// run.c -- the unlearn.c engine: Llama-3 inference in one file of plain C.
//
// Reads a model file written by export.py (fp32 or int8 Q8_0, mmap'd
// read-only), a tokenizer file (byte-level BPE, exact Llama-3 behaviour),
// and runs the transformer: batched prompt processing, KV-cached decoding,
// sampling, the Llama-3 chat template. The file layouts are documented in
// run.h. Every other program (train_lora, sae, guard, test_all) links this
// engine; compiled with -DRUN_LIBRARY it has no main().
//
//   ./run MODEL.bin -z TOK -i "Once upon a time"        generate
//   ./run MODEL.bin -z TOK -m chat -y "Be brief." -i Hi  chat
//   ./run --help                                         everything else
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <time.h>
#include <errno.h>
#include <stdarg.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef USE_BLAS
#include <cblas.h>
#endif
#include <limits.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h> // SIMD kernels, each behind its own #if with a plain C twin
#endif
#include "run.h"
#include "eval.h"
#include "unicode_ranges.h"

// ----------------------------------------------------------------------------
// Utilities

long time_in_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void* xmalloc(size_t n) {
    void* p = malloc(n ? n : 1);
    if (!p) { fprintf(stderr, "error: out of memory allocating %zu bytes\n", n); exit(EXIT_FAILURE); }
    return p;
}

void* xcalloc(size_t n, size_t size) {
    void* p = calloc(n ? n : 1, size ? size : 1);
    if (!p) { fprintf(stderr, "error: out of memory allocating %zu x %zu bytes\n", n, size); exit(EXIT_FAILURE); }
    return p;
}

void* xrealloc(void* p, size_t n) {
    void* q = realloc(p, n ? n : 1);
    if (!q) { fprintf(stderr, "error: out of memory allocating %zu bytes\n", n); exit(EXIT_FAILURE); }
    return q;
}

char* xstrndup(const char* s, size_t n) {
    char* d = xmalloc(n + 1);
    memcpy(d, s, n);
    d[n] = '\0';
    return d;
}

char* xstrdup(const char* s) { return xstrndup(s, strlen(s)); }

void* xcalloc_counted(size_t* bytes, int dry, size_t n, size_t size) {
    *bytes += n * size;
    return dry ? NULL : xcalloc(n, size);
}

char* read_file(const char* path, size_t* len) {
    FILE* f = fopen(path, "rb");
    if (!f) { fprintf(stderr, "error: cannot open %s: %s\n", path, strerror(errno)); exit(EXIT_FAILURE); }
    if (fseek(f, 0, SEEK_END) != 0) { fprintf(stderr, "error: cannot seek %s\n", path); exit(EXIT_FAILURE); }
    long size = ftell(f);
    if (size < 0) { fprintf(stderr, "error: cannot size %s (not a regular file?)\n", path); exit(EXIT_FAILURE); }
    rewind(f);
    char* buf = xmalloc((size_t)size + 1); // +1: always NUL-terminated for text users
    if (fread(buf, 1, (size_t)size, f) != (size_t)size) {
        fprintf(stderr, "error: cannot read %s\n", path); exit(EXIT_FAILURE);
    }
    buf[size] = '\0';
    fclose(f);
    if (len) *len = (size_t)size;
    return buf;
}

int write_file_atomic(const char* path, const void* data, size_t len) {
    // write path.tmp, flush it to disk, then rename: a reader (or a crash)
    // sees the old file or the new one, never half of one
    size_t plen = strlen(path);
    char* tmp = xmalloc(plen + 5);
    memcpy(tmp, path, plen);
    memcpy(tmp + plen, ".tmp", 5);
    FILE* f = fopen(tmp, "wb");
    if (!f) { free(tmp); return -1; }
    int ok = fwrite(data, 1, len, f) == len;
    ok = (fflush(f) == 0) && ok;
    ok = (fsync(fileno(f)) == 0) && ok;
    ok = (fclose(f) == 0) && ok;
    if (!ok || rename(tmp, path) != 0) { remove(tmp); free(tmp); return -1; }
    free(tmp);
    return 0;
}

int engine_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

int engine_thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

void die(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "error: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(EXIT_FAILURE);
}

uint64_t splitmix64(uint64_t* state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

int parse_int_arg(const char* flag, const char* s) {
    char* end;
    long v = strtol(s, &end, 10);
    if (*s == '\0' || *end != '\0' || v < -2147483647L || v > 2147483647L) die("%s expects an integer, got '%s'", flag, s);
    return (int)v;
}

float parse_float_arg(const char* flag, const char* s) {
    char* end;
    float v = strtof(s, &end);
    if (*s == '\0' || *end != '\0' || !isfinite(v)) die("%s expects a number, got '%s'", flag, s);
    return v;
}

void put_i32(unsigned char* p, int32_t v) { memcpy(p, &v, 4); }
void put_f32(unsigned char* p, float v) { memcpy(p, &v, 4); }
int32_t get_i32(const unsigned char* p) { int32_t v; memcpy(&v, p, 4); return v; }
float get_f32(const unsigned char* p) { float v; memcpy(&v, p, 4); return v; }

int is_stop_token(const Config* c, const Tokenizer* tok, int id) {
    for (int i = 0; i < c->n_eos; i++) if (c->eos_ids[i] == id) return 1;
    return is_eot(tok, id);
}

// Prints a token's bytes. Special tokens are not printed: they are markup.
// Bytes are written as they come, so a UTF-8 character split over two
// tokens is reassembled by the terminal.
void print_token(const Tokenizer* tok, int id) {
    if (tok->is_special[id]) return;
    int len;
    const char* piece = token_piece(tok, id, &len);
    fwrite(piece, 1, len, stdout);
    fflush(stdout);
}


// ----------------------------------------------------------------------------
// Model file: header parsing and the tensor layout

static size_t align_up(size_t n) { return (n + TENSOR_ALIGN - 1) / TENSOR_ALIGN * TENSOR_ALIGN; }

// Bytes a matrix (possibly stacked over layers: count copies of rows x cols)
// takes in the file, padding included.
static size_t matrix_bytes(const Config* c, size_t count, size_t rows, size_t cols) {
    size_t n = count * rows * cols;
    if (c->weight_type == WEIGHT_FP32) return align_up(n * sizeof(float));
    return align_up(n) + align_up(n / c->group_size * sizeof(float));
}

size_t model_file_size(const Config* c) {
    size_t L = c->n_layers, dim = c->dim, hid = c->hidden_dim;
    size_t q_dim = (size_t)c->n_heads * c->head_dim, kv_dim = (size_t)c->n_kv_heads * c->head_dim;
    size_t size = MODEL_HEADER_BYTES;
    size += matrix_bytes(c, 1, c->vocab_size, dim);          // token_embedding
    size += align_up(L * dim * sizeof(float));               // rms_att
    size += matrix_bytes(c, L, q_dim, dim);                  // wq
    size += matrix_bytes(c, L, kv_dim, dim);                 // wk
    size += matrix_bytes(c, L, kv_dim, dim);                 // wv
    size += matrix_bytes(c, L, dim, q_dim);                  // wo
    size += align_up(L * dim * sizeof(float));               // rms_ffn
    size += matrix_bytes(c, L, hid, dim);                    // w_gate
    size += matrix_bytes(c, L, hid, dim);                    // w_up
    size += matrix_bytes(c, L, dim, hid);                    // w_down
    size += align_up(dim * sizeof(float));                   // rms_final
    if (!c->tied_embeddings) size += matrix_bytes(c, 1, c->vocab_size, dim); // wcls
    return size;
}


int parse_model_header(const void* data, size_t size, Config* c, char* err, size_t errlen) {
    const unsigned char* h = data;
    if (size < MODEL_HEADER_BYTES) { snprintf(err, errlen, "file too small for a header (%zu bytes)", size); return -1; }
    if ((uint32_t)get_i32(h) != MODEL_MAGIC) { snprintf(err, errlen, "bad magic (not an unlearn.c model file)"); return -1; }
    int version = get_i32(h + 4);
    if (version != MODEL_VERSION) { snprintf(err, errlen, "unsupported version %d (expected %d)", version, MODEL_VERSION); return -1; }
    memset(c, 0, sizeof(*c));
    c->dim = get_i32(h + 8);
    c->hidden_dim = get_i32(h + 12);
    c->n_layers = get_i32(h + 16);
    c->n_heads = get_i32(h + 20);
    c->n_kv_heads = get_i32(h + 24);
    c->head_dim = get_i32(h + 28);
    c->vocab_size = get_i32(h + 32);
    c->max_seq_len = get_i32(h + 36);
    c->rope_theta = get_f32(h + 40);
    c->rope_scaling = get_i32(h + 44);
    c->rope_factor = get_f32(h + 48);
    c->rope_low_freq_factor = get_f32(h + 52);
    c->rope_high_freq_factor = get_f32(h + 56);
    c->rope_original_max_pos = get_i32(h + 60);
    c->norm_eps = get_f32(h + 64);
    c->tied_embeddings = get_i32(h + 68);
    c->weight_type = get_i32(h + 72);
    c->group_size = get_i32(h + 76);
    c->bos_id = get_i32(h + 80);
    c->n_eos = get_i32(h + 84);
    // every field checked before any size arithmetic, so lying headers
    // (negative or huge dims) cannot overflow the size computation below
    if (c->dim <= 0 || c->dim > 65536 || c->hidden_dim <= 0 || c->hidden_dim > 262144 ||
        c->n_layers <= 0 || c->n_layers > 1024 || c->n_heads <= 0 || c->n_heads > 1024 ||
        c->n_kv_heads <= 0 || c->n_kv_heads > c->n_heads || c->n_heads % c->n_kv_heads != 0 ||
        c->head_dim <= 0 || c->head_dim > 1024 || c->head_dim % 2 != 0 ||
        c->vocab_size <= 0 || c->vocab_size > 4194304 || c->max_seq_len <= 0) {
        snprintf(err, errlen, "invalid dimensions in header"); return -1;
    }
    if (!(c->rope_theta > 0) || !(c->norm_eps > 0) || !isfinite(c->rope_theta) || !isfinite(c->norm_eps)) {
        snprintf(err, errlen, "invalid rope_theta or norm_eps in header"); return -1;
    }
    if (c->rope_scaling == ROPE_LLAMA3) {
        if (!(c->rope_factor >= 1) || !(c->rope_high_freq_factor > c->rope_low_freq_factor) ||
            !(c->rope_low_freq_factor > 0) || c->rope_original_max_pos <= 0) {
            snprintf(err, errlen, "invalid llama3 rope scaling parameters"); return -1;
        }
    } else if (c->rope_scaling != ROPE_NONE) {
        snprintf(err, errlen, "unknown rope scaling type %d", c->rope_scaling); return -1;
    }
    if (c->tied_embeddings != 0 && c->tied_embeddings != 1) { snprintf(err, errlen, "invalid tied flag"); return -1; }
    if (c->weight_type == WEIGHT_FP32) {
        c->group_size = 0;
    } else if (c->weight_type == WEIGHT_Q8) {
        int gs = c->group_size;
        if (gs <= 0 || gs > 4096 || c->dim % gs || c->hidden_dim % gs || (c->n_heads * c->head_dim) % gs) {
            snprintf(err, errlen, "invalid Q8_0 group size %d for these dims", gs); return -1;
        }
    } else {
        snprintf(err, errlen, "unknown weight type %d", c->weight_type); return -1;
    }
    if (c->n_eos < 0 || c->n_eos > MAX_EOS) { snprintf(err, errlen, "invalid eos count %d", c->n_eos); return -1; }
    for (int i = 0; i < c->n_eos; i++) {
        c->eos_ids[i] = get_i32(h + 88 + 4 * i);
        if (c->eos_ids[i] < 0 || c->eos_ids[i] >= c->vocab_size) { snprintf(err, errlen, "eos id out of range"); return -1; }
    }
    if (c->bos_id < -1 || c->bos_id >= c->vocab_size) { snprintf(err, errlen, "bos id out of range"); return -1; }
    size_t expect = model_file_size(c);
    if (size != expect) {
        snprintf(err, errlen, "file size %zu does not match the header (expected %zu bytes): truncated or corrupt", size, expect);
        return -1;
    }
    return 0;
}

// Walks the mapping in the documented order, pointing each tensor into it.
static Matrix map_matrix(const Config* c, unsigned char** p, size_t count, int rows, int cols) {
    Matrix m = {0};
    m.rows = rows; m.cols = cols;
    size_t n = count * (size_t)rows * cols;
    if (c->weight_type == WEIGHT_FP32) {
        m.f = (float*)*p;
        *p += align_up(n * sizeof(float));
    } else {
        m.group_size = c->group_size;
        m.q = (int8_t*)*p;
        *p += align_up(n);
        m.s = (float*)*p;
        *p += align_up(n / c->group_size * sizeof(float));
    }
    return m;
}

static float* map_floats(unsigned char** p, size_t n) {
    float* f = (float*)*p;
    *p += align_up(n * sizeof(float));
    return f;
}

// The layer-l slice of a matrix stacked over layers.
static Matrix layer_slice(Matrix m, int l) {
    size_t n = (size_t)m.rows * m.cols;
    if (m.f) m.f += l * n;
    if (m.q) { m.q += l * n; m.s += l * n / m.group_size; }
    return m;
}

static void map_weights(Transformer* t) {
    Config* c = &t->config;
    Weights* w = &t->weights;
    int L = c->n_layers, dim = c->dim, hid = c->hidden_dim;
    int q_dim = c->n_heads * c->head_dim, kv_dim = c->n_kv_heads * c->head_dim;
    unsigned char* p = (unsigned char*)t->data + MODEL_HEADER_BYTES;
    w->token_embedding = map_matrix(c, &p, 1, c->vocab_size, dim);
    float* rms_att = map_floats(&p, (size_t)L * dim);
    Matrix wq = map_matrix(c, &p, L, q_dim, dim);
    Matrix wk = map_matrix(c, &p, L, kv_dim, dim);
    Matrix wv = map_matrix(c, &p, L, kv_dim, dim);
    Matrix wo = map_matrix(c, &p, L, dim, q_dim);
    float* rms_ffn = map_floats(&p, (size_t)L * dim);
    Matrix w_gate = map_matrix(c, &p, L, hid, dim);
    Matrix w_up = map_matrix(c, &p, L, hid, dim);
    Matrix w_down = map_matrix(c, &p, L, dim, hid);
    w->rms_final = map_floats(&p, dim);
    w->wcls = c->tied_embeddings ? w->token_embedding : map_matrix(c, &p, 1, c->vocab_size, dim);
    w->layers = xcalloc(L, sizeof(LayerWeights));
    for (int l = 0; l < L; l++) {
        LayerWeights* lw = &w->layers[l];
        lw->rms_att = rms_att + (size_t)l * dim;
        lw->rms_ffn = rms_ffn + (size_t)l * dim;
        lw->wq = layer_slice(wq, l);
        lw->wk = layer_slice(wk, l);
        lw->wv = layer_slice(wv, l);
        lw->wo = layer_slice(wo, l);
        lw->w_gate = layer_slice(w_gate, l);
        lw->w_up = layer_slice(w_up, l);
        lw->w_down = layer_slice(w_down, l);
    }
}

static void malloc_run_state(RunState* s, const Config* c, int seq_len) {
    int dim = c->dim, hid = c->hidden_dim;
    int q_dim = c->n_heads * c->head_dim, kv_dim = c->n_kv_heads * c->head_dim;
    s->seq_len = seq_len;
    s->batch_cap = seq_len < 128 ? seq_len : 128;
    s->n_threads = engine_threads();
    size_t B = s->batch_cap;
    int max_in = dim > hid ? dim : hid;
    if (q_dim > max_in) max_in = q_dim;
    s->x = xcalloc(B * dim, sizeof(float));
    s->xb = xcalloc(B * dim, sizeof(float));
    s->att_out = xcalloc(B * q_dim, sizeof(float));
    s->xb2 = xcalloc(B * dim, sizeof(float));
    s->hb = xcalloc(B * hid, sizeof(float));
    s->hb2 = xcalloc(B * hid, sizeof(float));
    s->q = xcalloc(B * q_dim, sizeof(float));
    s->k = xcalloc(B * kv_dim, sizeof(float));
    s->v = xcalloc(B * kv_dim, sizeof(float));
    s->rope_cos = xcalloc(B * (c->head_dim / 2), sizeof(float));
    s->rope_sin = xcalloc(B * (c->head_dim / 2), sizeof(float));
    s->att = xcalloc((size_t)s->n_threads * B * seq_len, sizeof(float));
    s->logits = xcalloc(c->vocab_size, sizeof(float));
    s->lora_tmp = NULL;
    if (c->weight_type == WEIGHT_Q8) {
        q8_scratch_init(&s->q8, (int)B, max_in, c->group_size);
    }
    s->key_cache = xcalloc((size_t)c->n_layers * seq_len * kv_dim, sizeof(float));
    s->value_cache = xcalloc((size_t)c->n_layers * seq_len * kv_dim, sizeof(float));
    s->rope_inv_freq = xcalloc(c->head_dim / 2, sizeof(float));
    rope_inv_freq(s->rope_inv_freq, c);
}

static void free_run_state(RunState* s) {
    free(s->x); free(s->xb); free(s->att_out); free(s->xb2); free(s->hb); free(s->hb2);
    free(s->q); free(s->k); free(s->v); free(s->rope_cos); free(s->rope_sin); free(s->att);
    free(s->logits); free(s->lora_tmp); q8_scratch_free(&s->q8);
    free(s->key_cache); free(s->value_cache); free(s->rope_inv_freq);
    memset(s, 0, sizeof(*s));
}

void build_transformer(Transformer* t, const char* path, int ctx) {
    memset(t, 0, sizeof(*t));
    t->fd = open(path, O_RDONLY);
    if (t->fd < 0) { fprintf(stderr, "error: cannot open model %s: %s\n", path, strerror(errno)); exit(EXIT_FAILURE); }
    struct stat st;
    if (fstat(t->fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        fprintf(stderr, "error: model %s is not a regular file\n", path); exit(EXIT_FAILURE);
    }
    t->file_size = (size_t)st.st_size;
    if (t->file_size < MODEL_HEADER_BYTES) {
        fprintf(stderr, "error: model %s: file too small (%zu bytes) to be a model\n", path, t->file_size);
        exit(EXIT_FAILURE);
    }
    t->data = mmap(NULL, t->file_size, PROT_READ, MAP_PRIVATE, t->fd, 0);
    if (t->data == MAP_FAILED) { fprintf(stderr, "error: cannot mmap %s: %s\n", path, strerror(errno)); exit(EXIT_FAILURE); }
    char err[256];
    if (parse_model_header(t->data, t->file_size, &t->config, err, sizeof(err)) != 0) {
        fprintf(stderr, "error: model %s: %s\n", path, err); exit(EXIT_FAILURE);
    }
    Config* c = &t->config;
    // never size the KV cache by max_position_embeddings (131072 for
    // Llama 3.1/3.2 would be 8 GiB of cache for 1B): it is a run option
    int max_ctx = c->max_seq_len;
    if (ctx <= 0) ctx = max_ctx < 4096 ? max_ctx : 4096;
    if (ctx > max_ctx) {
        fprintf(stderr, "error: context %d exceeds the model's maximum of %d positions\n", ctx, max_ctx);
        exit(EXIT_FAILURE);
    }
    map_weights(t);
    malloc_run_state(&t->state, c, ctx);
}

void free_transformer(Transformer* t) {
    free(t->weights.layers);
    free_run_state(&t->state);
    if (t->lora) { free_lora(t->lora); free(t->lora); }
    if (t->data && t->data != MAP_FAILED) munmap(t->data, t->file_size);
    if (t->fd >= 0) close(t->fd);
    memset(t, 0, sizeof(*t));
}

// ----------------------------------------------------------------------------
// Kernels

void rmsnorm(float* out, const float* x, const float* weight, int dim, float eps) {
    float ss = 0.0f;
    for (int j = 0; j < dim; j++) ss += x[j] * x[j];
    float rstd = 1.0f / sqrtf(ss / dim + eps);
    for (int j = 0; j < dim; j++) out[j] = weight[j] * (rstd * x[j]);
}

double cross_entropy(const float* logits, int n, int target) {
    // -log softmax(logits)[target], in double so long rows sum accurately
    float mx = logits[0];
    for (int i = 1; i < n; i++) if (logits[i] > mx) mx = logits[i];
    double sum = 0.0;
    for (int i = 0; i < n; i++) sum += exp((double)logits[i] - mx);
    return log(sum) + mx - logits[target];
}

void softmax(float* x, int n) {
    float max_val = x[0];
    for (int i = 1; i < n; i++) if (x[i] > max_val) max_val = x[i];
    float sum = 0.0f;
    for (int i = 0; i < n; i++) { x[i] = expf(x[i] - max_val); sum += x[i]; }
    for (int i = 0; i < n; i++) x[i] /= sum;
}

// ---- Portable GEMM --------------------------------------------------------
// C (M,N) = alpha * op(A) @ op(B) + beta * C, row-major, exactly cblas_sgemm's
// contract, with op(A)[i][p] = trans_a ? A[p*lda+i] : A[i*lda+p] (likewise B).
//
// The naive loop (gemm_reference) does 2 flops per 2 loads and streams B
// through the cache once per row of C, so it runs at cache/memory speed
// (1-25 GFLOP/s per core here, depending on the transposes). gemm_portable
// is the classic Goto/BLIS scheme instead, in plain C (80-100 GFLOP/s per
// core here on large shapes, OpenBLAS 85-100):
//
//   for jc in N step NC:                  (bounds the packed B block)
//     for pc in K step KC:
//       pack op(B)[pc:pc+kc, jc:jc+nc] -> Bp      all threads together (L3)
//       for each tile (ti, tj) of C (<= MC x NB), split among the threads:
//         pack op(A)[rows of ti, pc:pc+kc] -> Ap   this thread only (L2)
//         for jr in tj step NR:           B micro-panel (kc, NR): 16 KiB, stays in L1
//           for ir in ti step MR:         A micro-panel (kc, MR): streamed from L2
//             micro-kernel: C[ir:ir+MR, jr:jr+NR] (+)= Ap[ir] @ Bp[jr]
//
// Two special cases: with M <= MC (one tile row) each thread packs the B of
// its own tiles instead of sharing Bp (see gemm_portable), and M < MR reads
// B in place (gemm_small_m).
//
// Packing copies each micro-panel into the exact order the micro-kernel reads
// it (contiguous, zero-padded to MR/NR), so the kernel never sees strides,
// transposes or edges. The micro-kernel keeps an MR x NR block of C in
// registers for the whole K loop: per step p it loads NR floats of B and MR
// of A and does MR*NR multiply-adds, which is what makes it compute bound.
//
// GEMM_MR x GEMM_NR = 6 x 16 was picked by measurement on Zen 4 (AVX-512):
// 8x16, 12x16, 4x32, 6x32, 12x32 ran within noise of it, and 6x16 is also
// the tile that fits the 16 vector registers of an AVX2-only machine (12
// accumulators of 8 floats). The kernel relies on the compiler vectorizing
// the j loop (`omp simd`; without it GCC fully unrolls the 16-wide loop into
// scalar code) and on fmaf being a single instruction (FP_FAST_FMAF, i.e.
// -mfma or -march=native); elsewhere a plain multiply-add is used, since a
// library fmaf call would be far slower than the rounding it saves.
#define GEMM_MR 6     // rows of C per micro-kernel call
#define GEMM_NR 16    // columns of C per micro-kernel call
#define GEMM_KC 256   // depth of one packed panel: Bp micro-panel = KC*NR*4 = 16 KiB (L1)
#define GEMM_MC 120   // max rows of a C tile (multiple of MR): Ap = MC*KC*4 = 120 KiB (L2)
#define GEMM_NB 256   // max columns of a C tile (multiple of NR): the unit of work
#define GEMM_NC 4096  // max columns of packed B: Bp = KC*NC*4 = 4 MiB (L3)
#define GEMM_PACK_COLS 64   // columns of B per packing work item (multiple of NR)
#ifdef FP_FAST_FMAF
#define GEMM_FMA(a, b, c) fmaf(a, b, c)
#else
#define GEMM_FMA(a, b, c) ((a) * (b) + (c))
#endif
// gemm work below this many flops stays on one thread (waking the team
// costs more than it saves)
#define GEMM_PAR_FLOPS 2e6

// The old naive loop, kept as the simplest statement of the contract and as
// the fallback when the packing buffers cannot be allocated. Rows of C are
// independent, so threads split them.
static void gemm_reference(int trans_a, int trans_b, int M, int N, int K, float alpha, const float* A, int lda,
                           const float* B, int ldb, float beta, float* C, int ldc) {
    #pragma omp parallel for schedule(static)
    for (int i = 0; i < M; i++) {
        float* c_row = C + (size_t)i * ldc;
        if (beta == 0.0f) for (int j = 0; j < N; j++) c_row[j] = 0.0f;
        else if (beta != 1.0f) for (int j = 0; j < N; j++) c_row[j] *= beta;
        if (!trans_b) {
            // C_i += alpha * sum_p a_ip * B_p   (B rows contiguous)
            for (int p = 0; p < K; p++) {
                float a_ip = alpha * (trans_a ? A[(size_t)p * lda + i] : A[(size_t)i * lda + p]);
                const float* b_row = B + (size_t)p * ldb;
                for (int j = 0; j < N; j++) c_row[j] += a_ip * b_row[j];
            }
        } else {
            // C_ij += alpha * dot(A_i, B_j)   (B stored as rows of length K)
            for (int j = 0; j < N; j++) {
                const float* b_row = B + (size_t)j * ldb;
                float sum = 0.0f;
                if (!trans_a) {
                    const float* a_row = A + (size_t)i * lda;
                    for (int p = 0; p < K; p++) sum += a_row[p] * b_row[p];
                } else {
                    for (int p = 0; p < K; p++) sum += A[(size_t)p * lda + i] * b_row[p];
                }
                c_row[j] += alpha * sum;
            }
        }
    }
}

// C block (mr, nr) at c = alpha * acc + beta * C. beta == 0 writes without
// reading C, so NaN garbage in an output buffer is overwritten, as in BLAS.
// (acc is not const: C before C23 will not pass float[][NR] as const float[][NR] silently)
static void gemm_store(float* c, int ldc, float acc[GEMM_MR][GEMM_NR], int mr, int nr, float alpha, float beta) {
    if (mr == GEMM_MR && nr == GEMM_NR) {   // full block: constant bounds, vector code
        for (int i = 0; i < GEMM_MR; i++) {
            float* ci = c + (size_t)i * ldc;
            if (beta == 0.0f) {
                #pragma omp simd
                for (int j = 0; j < GEMM_NR; j++) ci[j] = alpha * acc[i][j];
            } else {
                #pragma omp simd
                for (int j = 0; j < GEMM_NR; j++) ci[j] = alpha * acc[i][j] + beta * ci[j];
            }
        }
    } else {                                 // edge block of C: only the valid part
        for (int i = 0; i < mr; i++) {
            float* ci = c + (size_t)i * ldc;
            for (int j = 0; j < nr; j++) ci[j] = beta == 0.0f ? alpha * acc[i][j] : alpha * acc[i][j] + beta * ci[j];
        }
    }
}

// The micro-kernel: C[0:mr, 0:nr] (at c, row stride ldc) = alpha * a @ b + beta * C
// a: (kc, MR) packed A micro-panel, a[p*MR + i] = op(A)[i][p]
// b: (kc, NR) packed B micro-panel, b[p*NR + j] = op(B)[p][j]
// Always computes the full MR x NR block (padding is zeros); stores mr x nr.
static void gemm_micro(int kc, const float* restrict a, const float* restrict b, float* c, int ldc, int mr, int nr,
                       float alpha, float beta) {
    float acc[GEMM_MR][GEMM_NR] = {{0.0f}};   // (MR, NR) block of C: lives in registers
#if defined(__GNUC__)
    // ask for the C rows now: with K > KC they were evicted since the last
    // panel, and the miss would otherwise stall the store at the end
    for (int i = 0; i < mr; i++) __builtin_prefetch(c + (size_t)i * ldc, 1);
#endif
    for (int p = 0; p < kc; p++, a += GEMM_MR, b += GEMM_NR) {
        for (int i = 0; i < GEMM_MR; i++) {
            #pragma omp simd
            for (int j = 0; j < GEMM_NR; j++) acc[i][j] = GEMM_FMA(a[i], b[j], acc[i][j]);
        }
    }
    gemm_store(c, ldc, acc, mr, nr, alpha, beta);
}

// Pack op(A)[i0:i0+m, p0:p0+kc] into ceil(m/MR) micro-panels, each (kc, MR):
// dst[(q*kc + p)*MR + i] = op(A)[i0 + q*MR + i][p0+p], zero past row m.
static void gemm_pack_a(float* restrict dst, const float* A, int lda, int trans_a, int i0, int m, int p0, int kc) {
    int np = (m + GEMM_MR - 1) / GEMM_MR;
    if (!trans_a) {
        // op(A) rows are contiguous: a transpose, done in blocks of 16 values
        // of p (one cache line of each of the MR rows), like gemm_pack_b
        for (int q = 0; q < np; q++) {
            float* d = dst + (size_t)q * kc * GEMM_MR;
            int mr = m - q * GEMM_MR < GEMM_MR ? m - q * GEMM_MR : GEMM_MR;
            const float* src = A + (size_t)(i0 + q * GEMM_MR) * lda + p0;
            for (int pb = 0; pb < kc; pb += 16) {
                int pe = kc - pb < 16 ? kc : pb + 16;
                for (int i = 0; i < mr; i++)
                    for (int p = pb; p < pe; p++) d[p * GEMM_MR + i] = src[(size_t)i * lda + p];
            }
            for (int i = mr; i < GEMM_MR; i++)
                for (int p = 0; p < kc; p++) d[p * GEMM_MR + i] = 0.0f;
        }
    } else {
        // op(A) columns are contiguous (A is (K, M)): p outermost reads row p
        // of A as one run of m floats, split into the panels
        for (int p = 0; p < kc; p++) {
            const float* src = A + (size_t)(p0 + p) * lda + i0;
            for (int q = 0; q < np; q++) {
                float* d = dst + ((size_t)q * kc + p) * GEMM_MR;
                int mr = m - q * GEMM_MR < GEMM_MR ? m - q * GEMM_MR : GEMM_MR;
                for (int i = 0; i < mr; i++) d[i] = src[q * GEMM_MR + i];
                for (int i = mr; i < GEMM_MR; i++) d[i] = 0.0f;
            }
        }
    }
}

// Pack op(B)[p0:p0+kc, j0:j0+n] into ceil(n/NR) micro-panels, each (kc, NR):
// dst[(q*kc + p)*NR + j] = op(B)[p0+p][j0 + q*NR + j], zero past column n.
static void gemm_pack_b(float* restrict dst, const float* B, int ldb, int trans_b, int j0, int n, int p0, int kc) {
    int np = (n + GEMM_NR - 1) / GEMM_NR;
    if (!trans_b) {
        // op(B) rows are contiguous: p outermost reads row p as one run of n
        // floats, split into the panels. (One panel at a time would read 64
        // bytes per row, a row apart: a pattern the prefetcher does not follow.)
        for (int p = 0; p < kc; p++) {
            const float* src = B + (size_t)(p0 + p) * ldb + j0;
            for (int q = 0; q < np; q++) {
                float* d = dst + ((size_t)q * kc + p) * GEMM_NR;
                int nr = n - q * GEMM_NR < GEMM_NR ? n - q * GEMM_NR : GEMM_NR;
                if (nr == GEMM_NR) {
                    for (int j = 0; j < GEMM_NR; j++) d[j] = src[q * GEMM_NR + j];   // constant trip: vector copy
                } else {
                    for (int j = 0; j < nr; j++) d[j] = src[q * GEMM_NR + j];
                    for (int j = nr; j < GEMM_NR; j++) d[j] = 0.0f;
                }
            }
        }
    } else {
        // transposed (B is (N, K)): a real transpose, done in 16 x NR blocks
        // so that each cache line read (16 floats of one row of B) is used
        // completely while it is in L1. Rows of B are often a power-of-two
        // bytes apart, so reading many of them in lockstep would make their
        // lines collide in the same L1 sets.
        for (int q = 0; q < np; q++) {
            float* d = dst + (size_t)q * kc * GEMM_NR;
            int nr = n - q * GEMM_NR < GEMM_NR ? n - q * GEMM_NR : GEMM_NR;
            const float* src = B + (size_t)(j0 + q * GEMM_NR) * ldb + p0;
            for (int pb = 0; pb < kc; pb += 16) {
                int pe = kc - pb < 16 ? kc : pb + 16;
                for (int j = 0; j < nr; j++)
                    for (int p = pb; p < pe; p++) d[p * GEMM_NR + j] = src[(size_t)j * ldb + p];
            }
            for (int p = 0; p < kc; p++)
                for (int j = nr; j < GEMM_NR; j++) d[p * GEMM_NR + j] = 0.0f;
        }
    }
}

// M < MR (a few tokens): packing B would cost as much as the multiply (each
// element of B is used only M times) and an MR-row kernel would waste most of
// its work on padding, so B is read in place. A is copied once into At.
// Threads split the columns of C into one wide chunk each: reading B in
// long runs is what keeps this memory-bound case at memory speed.
#define GEMM_SMALL_W 4096   // max columns per chunk: acc (M, w) <= 5*4096*4 = 80 KiB (L2)
static int gemm_small_m(int trans_a, int trans_b, int M, int N, int K, float alpha, const float* A, int lda,
                        const float* B, int ldb, float beta, float* C, int ldc) {
    int par = 2.0 * M * N * K > GEMM_PAR_FLOPS, nthr = par ? engine_threads() : 1;
    int w = (N + nthr - 1) / nthr;                  // chunk width: a multiple of NR, at most SMALL_W
    w = (w + GEMM_NR - 1) / GEMM_NR * GEMM_NR;
    if (w > GEMM_SMALL_W) w = GEMM_SMALL_W;
    int nchunks = (N + w - 1) / w;
    float* At = malloc(((size_t)M * K + (size_t)nthr * M * w) * sizeof(float));   // (M, K) op(A), rows contiguous
    if (!At) return 0;
    float* accs = At + (size_t)M * K;               // (nthr, M, w) accumulators, one block per thread
    for (int i = 0; i < M; i++)
        for (int p = 0; p < K; p++) At[(size_t)i * K + p] = trans_a ? A[(size_t)p * lda + i] : A[(size_t)i * lda + p];
    #pragma omp parallel for schedule(static) if (par)
    for (int q = 0; q < nchunks; q++) {
        int j0 = q * w, nw = N - j0 < w ? N - j0 : w;
        float* acc = accs + (size_t)engine_thread_id() * M * w;   // (M, nw) block of C, row stride w
        if (!trans_b) {
            // rows of B are contiguous: C_i += a_ip * B_p, streaming B row by row
            for (int i = 0; i < M; i++)
                for (int j = 0; j < nw; j++) acc[(size_t)i * w + j] = 0.0f;
            for (int p = 0; p < K; p++) {
                const float* b = B + (size_t)p * ldb + j0;
                for (int i = 0; i < M; i++) {
                    float a = At[(size_t)i * K + p];
                    float* acc_i = acc + (size_t)i * w;
                    #pragma omp simd
                    for (int j = 0; j < nw; j++) acc_i[j] = GEMM_FMA(a, b[j], acc_i[j]);
                }
            }
        } else {
            // columns of op(B) are rows of B: C_ij = dot(At_i, B_j), with 16
            // independent partial sums so the dot product vectorizes (C may
            // not reorder a single float sum by itself)
            for (int j = 0; j < nw; j++) {
                const float* b = B + (size_t)(j0 + j) * ldb;
                for (int i = 0; i < M; i++) {
                    const float* a = At + (size_t)i * K;
                    float part[16] = {0.0f};
                    int p = 0;
                    for (; p + 16 <= K; p += 16) {
                        #pragma omp simd
                        for (int l = 0; l < 16; l++) part[l] = GEMM_FMA(a[p + l], b[p + l], part[l]);
                    }
                    float sum = 0.0f;
                    for (; p < K; p++) sum = GEMM_FMA(a[p], b[p], sum);
                    for (int l = 0; l < 16; l++) sum += part[l];
                    acc[(size_t)i * w + j] = sum;
                }
            }
        }
        for (int i = 0; i < M; i++) {
            float* c = C + (size_t)i * ldc + j0;
            const float* acc_i = acc + (size_t)i * w;
            if (beta == 0.0f) for (int j = 0; j < nw; j++) c[j] = alpha * acc_i[j];
            else for (int j = 0; j < nw; j++) c[j] = alpha * acc_i[j] + beta * c[j];
        }
    }
    free(At);
    return 1;
}

void gemm_portable(int trans_a, int trans_b, int M, int N, int K, float alpha, const float* A, int lda,
                   const float* B, int ldb, float beta, float* C, int ldc) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0 || alpha == 0.0f) {   // no product: C = beta * C (A and B are not read)
        for (int i = 0; i < M; i++)
            for (int j = 0; j < N; j++) {
                float* cij = C + (size_t)i * ldc + j;
                *cij = beta == 0.0f ? 0.0f : beta * *cij;
            }
        return;
    }
    if (M < GEMM_MR) {
        if (!gemm_small_m(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc))
            gemm_reference(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    int kc_max = K < GEMM_KC ? K : GEMM_KC, nc_max = N < GEMM_NC ? N : GEMM_NC;
    int pm = (M + GEMM_MR - 1) / GEMM_MR;                     // A micro-panels over all of M
    int mt = (pm + GEMM_MC / GEMM_MR - 1) / (GEMM_MC / GEMM_MR);   // tile rows: pm split evenly in mt
    // With a single tile row (M <= MC: a short prompt, a LoRA rank) each B
    // panel is used by one thread only: each thread then packs the columns
    // of its own tile into its Bt just before using them (still in L2), and
    // no shared Bp is needed.
    int shared_b = mt > 1;
    int par = 2.0 * M * N * K > GEMM_PAR_FLOPS, nthr = par ? engine_threads() : 1;
    // One allocation per call (not per kernel call): the shared Bp, then Ap and Bt per thread.
    size_t bp_floats = shared_b ? (size_t)kc_max * ((nc_max + GEMM_NR - 1) / GEMM_NR * GEMM_NR) : 0;   // (NC/NR, kc, NR)
    size_t ap_floats = (size_t)GEMM_MC * kc_max;                                         // (MC/MR, kc, MR)
    size_t bt_floats = shared_b ? 0 : (size_t)kc_max * GEMM_NB;                          // (NB/NR, kc, NR)
    size_t bytes = (bp_floats + (size_t)nthr * (ap_floats + bt_floats)) * sizeof(float);
    float* buf = aligned_alloc(64, (bytes + 63) / 64 * 64);   // 64: panels start on cache lines
    if (!buf) { gemm_reference(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc); return; }
    float* Bp = buf;
    #pragma omp parallel if (par)
    {
        // (a team smaller than nthr only leaves buffers unused)
        float* Ap = buf + bp_floats + (size_t)engine_thread_id() * (ap_floats + bt_floats);
        float* Bt = Ap + ap_floats;
        for (int jc = 0; jc < N; jc += GEMM_NC) {
            int nc = N - jc < GEMM_NC ? N - jc : GEMM_NC;
            int pn = (nc + GEMM_NR - 1) / GEMM_NR;                          // B micro-panels in this block
            int nt = (pn + GEMM_NB / GEMM_NR - 1) / (GEMM_NB / GEMM_NR);    // tile columns
            // equal tiles, a multiple of the thread count when possible, so a
            // static split of the tiles is also an even split of the work
            while ((mt * nt) % nthr != 0 && nt < pn) nt++;
            for (int pc = 0; pc < K; pc += GEMM_KC) {
                int kc = K - pc < GEMM_KC ? K - pc : GEMM_KC;
                float beta_pc = pc == 0 ? beta : 1.0f;   // later K panels accumulate
                if (shared_b) {
                    // in chunks of GEMM_PACK_COLS columns (whole panels)
                    #pragma omp for schedule(static)   // (implicit barrier: Bp complete)
                    for (int j = 0; j < nc; j += GEMM_PACK_COLS) {
                        int n = nc - j < GEMM_PACK_COLS ? nc - j : GEMM_PACK_COLS;
                        gemm_pack_b(Bp + (size_t)j * kc, B, ldb, trans_b, jc + j, n, pc, kc);
                    }
                }
                // tiles are numbered row-major, so a thread's consecutive tiles
                // mostly share a tile row and Ap is packed once per tile row
                int packed_ti = -1;
                #pragma omp for schedule(static) collapse(2)   // (implicit barrier: Bp free to refill)
                for (int ti = 0; ti < mt; ti++) {
                    for (int tj = 0; tj < nt; tj++) {
                        int qa0 = (int)((long)ti * pm / mt), qa1 = (int)((long)(ti + 1) * pm / mt);
                        int qb0 = (int)((long)tj * pn / nt), qb1 = (int)((long)(tj + 1) * pn / nt);
                        if (packed_ti != ti) {
                            int i = qa0 * GEMM_MR, m = qa1 * GEMM_MR < M ? (qa1 - qa0) * GEMM_MR : M - i;
                            gemm_pack_a(Ap, A, lda, trans_a, i, m, pc, kc);
                            packed_ti = ti;
                        }
                        const float* b_tile = Bp + (size_t)qb0 * kc * GEMM_NR;   // panel qb0 of this tile
                        if (!shared_b) {
                            int j = qb0 * GEMM_NR, n = qb1 * GEMM_NR < nc ? (qb1 - qb0) * GEMM_NR : nc - j;
                            gemm_pack_b(Bt, B, ldb, trans_b, jc + j, n, pc, kc);
                            b_tile = Bt;
                        }
                        for (int qb = qb0; qb < qb1; qb++) {
                            int j = qb * GEMM_NR, nr = nc - j < GEMM_NR ? nc - j : GEMM_NR;
                            const float* b = b_tile + (size_t)(qb - qb0) * kc * GEMM_NR;
                            for (int qa = qa0; qa < qa1; qa++) {
                                int i = qa * GEMM_MR, mr = M - i < GEMM_MR ? M - i : GEMM_MR;
                                gemm_micro(kc, Ap + (size_t)(qa - qa0) * kc * GEMM_MR, b,
                                           C + (size_t)i * ldc + jc + j, ldc, mr, nr, alpha, beta_pc);
                            }
                        }
                    }
                }
            }
        }
    }
    free(buf);
}

#ifdef USE_BLAS
char* openblas_get_corename(void); // OpenBLAS's own API, not in cblas.h
int openblas_get_parallel(void);   // 0 sequential, 1 pthreads, 2 OpenMP
#endif

const char* engine_build_info(void) {
#ifdef USE_BLAS
    static char info[256];
    int par = openblas_get_parallel();
    const char* core = openblas_get_corename();
    snprintf(info, sizeof(info), "OpenBLAS (core %s, %s threads), %d threads%s%s", core,
             par == 2 ? "OpenMP" : par == 1 ? "pthreads" : "no",
             engine_threads(),
             // a pthreads OpenBLAS spins beside our OpenMP threads
             par == 1 ? "; slow: install libopenblas0-openmp or set OMP_WAIT_POLICY=passive" : "",
             // Debian 12's 0.3.21 mis-detects some recent CPUs as Prescott and
             // then runs ~6x slower GEMMs
             !strcmp(core, "Prescott") ? "; slow core: set OPENBLAS_CORETYPE=SkylakeX (AVX-512) or Haswell (AVX2)" : "");
    return info;
#else
    static char info[64];
    snprintf(info, sizeof(info), "plain C GEMM, %d threads", engine_threads());
    return info;
#endif
}

void gemm(int trans_a, int trans_b, int M, int N, int K, float alpha, const float* A, int lda,
          const float* B, int ldb, float beta, float* C, int ldc) {
#ifdef USE_BLAS
    cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
                M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
#else
    gemm_portable(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
#endif
}

// fp32 dot product. The simd reduction lets the compiler keep several
// partial sums in vector registers (plain C cannot reorder floats).
static float dot_f32(const float* a, const float* b, int n) {
    float sum = 0.0f;
    #pragma omp simd reduction(+:sum)
    for (int j = 0; j < n; j++) sum += a[j] * b[j];
    return sum;
}

// Q8_0 quantization of one group of gs values: scale = max|x| / 127 and
// q = round(x / scale), written as x * (1 / scale). Returns the scale.
//
// A NaN or Inf value (a model file with such weights, an overflow) never
// reaches the int8 cast (undefined behaviour): the group's scale becomes NaN
// instead, so its dot products are NaN as in the fp32 path.
float quantize_group_portable(int8_t* q, const float* x, int gs) {
    float xmax = 0.0f, poison = 0.0f;
    for (int j = 0; j < gs; j++) {
        float a = fabsf(x[j]);
        if (a > xmax) xmax = a;
        poison += x[j] * 0.0f; // NaN when some x is NaN or Inf
    }
    float scale = xmax / 127.0f;
    float inv = scale > 0.0f && isfinite(scale) ? 1.0f / scale : 0.0f;
    for (int j = 0; j < gs; j++) q[j] = (int8_t)fmaxf(-127.0f, fminf(127.0f, roundf(x[j] * inv)));
    return scale + poison;
}

#if defined(__AVX512F__)
// roundf (halves away from zero) of 16 floats, exactly: t - trunc(t) is exact
// in float, so comparing its magnitude with 0.5 decides the rounding without
// the double rounding of trunc(t + 0.5).
static inline __m512 round_half_away_avx512(__m512 t) {
    __m512 whole = _mm512_roundscale_ps(t, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    __m512 frac = _mm512_abs_ps(_mm512_sub_ps(t, whole));
    __mmask16 up = _mm512_cmp_ps_mask(frac, _mm512_set1_ps(0.5f), _CMP_GE_OQ);
    __m512 one = _mm512_or_ps(_mm512_set1_ps(1.0f), _mm512_and_ps(t, _mm512_set1_ps(-0.0f))); // +-1 with t's sign
    return _mm512_mask_add_ps(whole, up, whole, one);
}

// (int8_t)fmaxf(-127, fminf(127, roundf(t))) for 16 floats, as int32 lanes.
// vminps returns its second operand when the first is NaN, as fminf does.
static inline __m512i quantize_value_avx512(__m512 t) {
    __m512 r = round_half_away_avx512(t);
    r = _mm512_max_ps(_mm512_min_ps(r, _mm512_set1_ps(127.0f)), _mm512_set1_ps(-127.0f));
    return _mm512_cvttps_epi32(r);
}

// quantize_group_portable, 16 lanes at a time (gs a multiple of 16); the
// same scale and the same bytes. The max and the poison sum do not depend on
// their order (a max; a sum of zeros or NaN).
static float quantize_group_avx512(int8_t* q, const float* x, int gs) {
    __m512 vmax = _mm512_setzero_ps(), vpoison = _mm512_setzero_ps();
    for (int j = 0; j < gs; j += 16) {
        __m512 v = _mm512_loadu_ps(x + j);
        vmax = _mm512_max_ps(_mm512_abs_ps(v), vmax); // NaN lanes keep the old max, as "a > xmax" does
        vpoison = _mm512_add_ps(vpoison, _mm512_mul_ps(v, _mm512_setzero_ps()));
    }
    float scale = _mm512_reduce_max_ps(vmax) / 127.0f;
    float poison = _mm512_reduce_add_ps(vpoison);
    __m512 inv = _mm512_set1_ps(scale > 0.0f && isfinite(scale) ? 1.0f / scale : 0.0f);
    for (int j = 0; j < gs; j += 16) {
        __m512i r = quantize_value_avx512(_mm512_mul_ps(_mm512_loadu_ps(x + j), inv));
        _mm_storeu_si128((__m128i*)(q + j), _mm512_cvtepi32_epi8(r));
    }
    return scale + poison;
}
#endif

float quantize_group(int8_t* q, const float* x, int gs) {
#if defined(__AVX512F__)
    if (gs % 16 == 0) return quantize_group_avx512(q, x, gs);
#endif
    return quantize_group_portable(q, x, gs);
}

// Q8_0 quantization of activations, row by row: x (n, cols) -> q (n, cols),
// s (n, cols/gs).
static void quantize_rows(int8_t* q, float* s, const float* x, int n, int cols, int gs) {
    int groups = cols / gs;
    for (int i = 0; i < n; i++)
        for (int g = 0; g < groups; g++) {
            size_t off = (size_t)i * cols + (size_t)g * gs;
            s[(size_t)i * groups + g] = quantize_group(q + off, x + off, gs);
        }
}

// One Q8_0 dot product: int32 sums per group, scaled once per group. This is
// the portable reference; dot_q8 below may be a SIMD version of it.
float dot_q8_portable(const int8_t* wq, const float* ws, const int8_t* xq, const float* xs, int cols, int gs) {
    float sum = 0.0f;
    for (int g = 0; g < cols / gs; g++) {
        int32_t acc = 0;
        const int8_t* a = wq + (size_t)g * gs;
        const int8_t* b = xq + (size_t)g * gs;
        #pragma omp simd reduction(+:acc)
        for (int j = 0; j < gs; j++) acc += (int32_t)a[j] * (int32_t)b[j];
        sum += (float)acc * ws[g] * xs[g];
    }
    return sum;
}

#if defined(__AVX2__) && defined(__FMA__)
// AVX2: 32 int8 products per instruction. maddubs multiplies unsigned by
// signed bytes, so |a| goes in as the unsigned operand and a's sign is moved
// onto b (sign_epi8); pairs sum to int16 without overflow since |a|,|b| <= 127.
// Each group's int32 lanes are scaled and accumulated in float lanes, and
// summed across lanes once at the end.
static float dot_q8_avx2(const int8_t* wq, const float* ws, const int8_t* xq, const float* xs, int cols, int gs) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc = _mm256_setzero_ps();
    for (int g = 0; g < cols / gs; g++) {
        __m256i sum32 = _mm256_setzero_si256();
        for (int j = 0; j < gs; j += 32) {
            __m256i a = _mm256_loadu_si256((const __m256i*)(wq + (size_t)g * gs + j));
            __m256i b = _mm256_loadu_si256((const __m256i*)(xq + (size_t)g * gs + j));
            __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a));
            sum32 = _mm256_add_epi32(sum32, _mm256_madd_epi16(pairs, ones));
        }
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum32), _mm256_set1_ps(ws[g] * xs[g]), acc);
    }
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
enum { dot_q8_has_avx512 = 1 };
// AVX-512 VNNI: 64 products per vpdpbusd, half the instructions per weight
// byte of AVX2. Decoding needs that: at AVX2's rate, two cores process Q8_0
// rows from cache at about the speed memory delivers them (40 GB/s here), so
// compute and memory could not overlap. As in AVX2, |w| is the unsigned
// operand and x takes w's sign (a masked negation: AVX-512 has no vpsignb).
// Each load also asks for the weight bytes 4 KiB ahead (two rows of the
// 1B shape; past a matrix's end this only prefetches, it never faults): in
// 8 paired decode runs of the 1.04B shape it raised the roofline fraction
// every time (+0.04 to +0.25) and tok/s by 5% on average (2 and 8 KiB
// ahead showed no gain in a shorter comparison).
#define DOT_Q8_PREFETCH 4096
static float dot_q8_avx512(const int8_t* wq, const float* ws, const int8_t* xq, const float* xs, int cols, int gs) {
    __m512 acc = _mm512_setzero_ps();
    for (int g = 0; g < cols / gs; g++) {
        __m512i sum32 = _mm512_setzero_si512();
        for (int j = 0; j < gs; j += 64) {
            _mm_prefetch((const char*)(wq + (size_t)g * gs + j + DOT_Q8_PREFETCH), _MM_HINT_T0);
            __m512i a = _mm512_loadu_si512(wq + (size_t)g * gs + j);
            __m512i b = _mm512_loadu_si512(xq + (size_t)g * gs + j);
            __m512i signed_b = _mm512_mask_sub_epi8(b, _mm512_movepi8_mask(a), _mm512_setzero_si512(), b);
            sum32 = _mm512_dpbusd_epi32(sum32, _mm512_abs_epi8(a), signed_b);
        }
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum32), _mm512_set1_ps(ws[g] * xs[g]), acc);
    }
    return _mm512_reduce_add_ps(acc);
}
#else
enum { dot_q8_has_avx512 = 0 };
#endif

float dot_q8(const int8_t* wq, const float* ws, const int8_t* xq, const float* xs, int cols, int gs) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    if (gs % 64 == 0) return dot_q8_avx512(wq, ws, xq, xs, cols, gs);
#endif
#if defined(__AVX2__) && defined(__FMA__)
    if (gs % 32 == 0) return dot_q8_avx2(wq, ws, xq, xs, cols, gs);
#endif
    return dot_q8_portable(wq, ws, xq, xs, cols, gs);
}

// Prefill: one weight row against four quantized input rows (xq: (4, cols),
// xs: (4, cols/gs)), out[t] = dot_q8 of row t. Decoding reads each weight
// once per token and is bandwidth bound; a prompt reuses it, so here the
// weight bytes are loaded, and their signs taken, once for four inputs.
#if defined(__AVX2__) && defined(__FMA__)
static void dot_q8_x4_avx2(float* out, const int8_t* wq, const float* ws, const int8_t* xq, const float* xs,
                           int cols, int gs) {
    int groups = cols / gs;
    __m256 acc[4];
    for (int t = 0; t < 4; t++) acc[t] = _mm256_setzero_ps();
    for (int g = 0; g < groups; g++) {
        __m256i sum32[4];
        for (int t = 0; t < 4; t++) sum32[t] = _mm256_setzero_si256();
        for (int j = 0; j < gs; j += 32) {
            __m256i a = _mm256_loadu_si256((const __m256i*)(wq + (size_t)g * gs + j));
            __m256i abs_a = _mm256_sign_epi8(a, a);
            for (int t = 0; t < 4; t++) {
                __m256i b = _mm256_loadu_si256((const __m256i*)(xq + (size_t)t * cols + (size_t)g * gs + j));
                __m256i signed_b = _mm256_sign_epi8(b, a);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
                // VNNI: the four u8 x s8 products of each int32 lane summed in one instruction
                sum32[t] = _mm256_dpbusd_epi32(sum32[t], abs_a, signed_b);
#else
                __m256i pairs = _mm256_maddubs_epi16(abs_a, signed_b);
                sum32[t] = _mm256_add_epi32(sum32[t], _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
#endif
            }
        }
        // the same int32 lanes as dot_q8_avx2, scaled in the same order:
        // every result equals dot_q8's bit for bit
        for (int t = 0; t < 4; t++)
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum32[t]), _mm256_set1_ps(ws[g] * xs[(size_t)t * groups + g]), acc[t]);
    }
    for (int t = 0; t < 4; t++) {
        __m128 lo = _mm_add_ps(_mm256_castps256_ps128(acc[t]), _mm256_extractf128_ps(acc[t], 1));
        lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
        lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
        out[t] = _mm_cvtss_f32(lo);
    }
}
#endif

void dot_q8_x4(float* out, const int8_t* wq, const float* ws, const int8_t* xq, const float* xs, int cols, int gs) {
#if defined(__AVX2__) && defined(__FMA__)
    // (with AVX-512 VNNI dot_q8 is the 512-bit kernel, whose sums these
    // 256-bit lanes would not reproduce: four calls instead; that build's
    // matmul takes the GEMM from four rows on, so this is rarely called)
    if (gs % 32 == 0 && !(dot_q8_has_avx512 && gs % 64 == 0)) { dot_q8_x4_avx2(out, wq, ws, xq, xs, cols, gs); return; }
#endif
    int groups = cols / gs;
    for (int t = 0; t < 4; t++) out[t] = dot_q8(wq, ws, xq + (size_t)t * cols, xs + (size_t)t * groups, cols, gs);
}

// Multiply-adds below which a loop runs on the calling thread alone (the
// toy model's 128 x 128 projections; every Llama-3 projection is far above).
#define PARALLEL_MIN_WORK (1L << 17)

// ---- Int8 matrix-matrix products ------------------------------------------
// Prompts and training multiply many rows of x by the same weights. matmul's
// int8 path above reads a weight row once per four input rows; matmul_q8
// instead packs Q8_NR = 32 weight rows ("a panel") so that one 64-byte load
// holds 4 consecutive k of 16 rows, and AVX-512 VNNI's vpdpbusd multiplies it
// with 4 bytes of one input row, broadcast: 64 multiply-adds per instruction
// into 16 int32 sums. A micro-kernel keeps Q8_MR x Q8_NR = 6 x 32 outputs in
// registers, as int32 sums for the current group and as floats across groups.
// At the end of each group of gs k every sum becomes float once:
//
//     y = fma(acc_G, ws_G * xs_G, ... fma(acc_2, ws_2 * xs_2, fma(acc_1, ws_1 * xs_1, y0)))
//
// with acc_g the exact int32 dot product of group g (|acc| <= gs * 127^2 <
// 2^24, so the conversion is exact too) and y0 = 0, or y's old value when
// accumulating. matmul_q8_portable computes the same expression in plain C,
// and test_all compares the two bit for bit.
//
// vpdpbusd multiplies unsigned by signed bytes: the panel stores w + 128 (the
// byte w ^ 0x80) and each group's int32 sum starts at -128 * sum(x) of that
// group, which cancels the offset exactly.
//
// Transposed (training's dx = dy W): the sum now runs down W's columns, across
// its quantization groups (each row has its own scale per group of columns),
// so the panel holds W^T requantized: each run of gs rows of a column gets
// its own scale, max|s*q| / 127, exactly as quantize_group would give from the
// dequantized values. This second rounding is the price of int8 arithmetic in
// the backward pass (its size is measured in test_all).
//
// The k dimension is cut in blocks of kc (Q8Scratch.kc): x's block is
// quantized (all threads), then each thread packs its panels' block and runs
// the micro-kernel over all rows of x. Blocks after the first continue the
// fma chain from y, so the result does not depend on kc.
#define Q8_MR 6     // rows of x per micro-kernel call
#define Q8_NR 32    // weight rows (outputs) per packed panel: two 16-lane vectors
#define Q8_KC 4096  // default k block: a panel is Q8_NR * Q8_KC = 128 KiB (L2)
#define Q8_GEMM_MIN_ROWS 4 // matmul takes the GEMM from this many rows of x

int matmul_q8_fast(int rows, int gs, int trans) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    return gs > 0 && gs % 4 == 0 && (!trans || (gs % 32 == 0 && rows % gs == 0));
#else
    (void)rows; (void)gs; (void)trans;
    return 0;
#endif
}

// Every buffer of the scratch, their sum in sc->bytes; with dry != 0 nothing
// is allocated, only counted (q8_scratch_bytes).
static void q8_scratch_setup(Q8Scratch* sc, int n_cap, int max_cols, int gs, int dry) {
    memset(sc, 0, sizeof(*sc));
    sc->n_cap = n_cap;
    sc->gs = gs;
    sc->max_cols = max_cols;
    int kc = Q8_KC / gs * gs;
    if (kc < gs) kc = gs;
    if (kc > max_cols / gs * gs) kc = max_cols / gs * gs;
    sc->kc = kc;
    sc->n_threads = engine_threads();
    size_t n = n_cap, threads = sc->n_threads;
    // xq/xs serve both paths: the dot products take whole rows (n, max_cols),
    // the GEMM one k block at a time (n, kc), kc <= max_cols
    sc->xq = xcalloc_counted(&sc->bytes, dry, n * max_cols, 1);
    sc->xs = xcalloc_counted(&sc->bytes, dry, n * (max_cols / gs), sizeof(float));
    if (matmul_q8_fast(0, gs, 0)) {
        sc->xcorr = xcalloc_counted(&sc->bytes, dry, n * (kc / gs), sizeof(int32_t));
        sc->panels = xcalloc_counted(&sc->bytes, dry, threads * Q8_NR * kc, 1);
        sc->panel_scales = xcalloc_counted(&sc->bytes, dry, threads * Q8_NR * (kc / gs), sizeof(float));
        sc->pack_tmp = xcalloc_counted(&sc->bytes, dry, threads * Q8_NR * gs, sizeof(float));
    }
}

void q8_scratch_init(Q8Scratch* sc, int n_cap, int max_cols, int gs) { q8_scratch_setup(sc, n_cap, max_cols, gs, 0); }

size_t q8_scratch_bytes(int n_cap, int max_cols, int gs) {
    Q8Scratch sc;
    q8_scratch_setup(&sc, n_cap, max_cols, gs, 1);
    return sc.bytes;
}

void q8_scratch_free(Q8Scratch* sc) {
    free(sc->xq); free(sc->xs); free(sc->xcorr); free(sc->panels); free(sc->panel_scales); free(sc->pack_tmp);
    memset(sc, 0, sizeof(*sc));
}

// The reference: every output as the fma chain above. In the transposed case
// W^T's requantized column groups are built one at a time with
// quantize_group_portable (tmp: (gs,) floats, tq: (gs,) bytes).
void matmul_q8_portable(float* y, const float* x, const Matrix* w, int n, int trans, int accumulate) {
    int gs = w->group_size, gpr = w->cols / gs; // scales per weight row
    int K = trans ? w->rows : w->cols, M = trans ? w->cols : w->rows, groups = K / gs;
    int8_t* xq = xmalloc((size_t)K);
    float* xs = xmalloc((size_t)groups * sizeof(float));
    float* tmp = xmalloc((size_t)gs * sizeof(float));
    int8_t* tq = xmalloc((size_t)gs);
    for (int i = 0; i < n; i++) {
        quantize_rows(xq, xs, x + (size_t)i * K, 1, K, gs);
        for (int j = 0; j < M; j++) {
            float sum = accumulate ? y[(size_t)i * M + j] : 0.0f;
            for (int g = 0; g < groups; g++) {
                const int8_t* wq;
                float ws;
                if (!trans) {
                    wq = w->q + (size_t)j * K + (size_t)g * gs;
                    ws = w->s[(size_t)j * gpr + g];
                } else { // column j of W, rows g*gs .. g*gs+gs-1, requantized
                    for (int o = 0; o < gs; o++) {
                        size_t row = (size_t)g * gs + o;
                        tmp[o] = w->s[row * gpr + j / gs] * (float)w->q[row * w->cols + j];
                    }
                    ws = quantize_group_portable(tq, tmp, gs);
                    wq = tq;
                }
                int32_t acc = 0;
                for (int k = 0; k < gs; k++) acc += (int32_t)wq[k] * (int32_t)xq[(size_t)g * gs + k];
                sum = fmaf((float)acc, ws * xs[g], sum);
            }
            y[(size_t)i * M + j] = sum;
        }
    }
    free(xq); free(xs); free(tmp); free(tq);
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// 16 x 16 dwords: out[c] lane i = rows[i] lane c (unpack pairs, then quads,
// then 128-bit lanes twice).
static void transpose_16x16_epi32(__m512i out[16], const __m512i rows[16]) {
    __m512i t[16], u[16], v[16];
    for (int R = 0; R < 16; R += 4) {
        t[R] = _mm512_unpacklo_epi32(rows[R], rows[R + 1]);
        t[R + 1] = _mm512_unpackhi_epi32(rows[R], rows[R + 1]);
        t[R + 2] = _mm512_unpacklo_epi32(rows[R + 2], rows[R + 3]);
        t[R + 3] = _mm512_unpackhi_epi32(rows[R + 2], rows[R + 3]);
        // u[R + m], lane L: column 4L + m of rows R .. R+3
        u[R] = _mm512_unpacklo_epi64(t[R], t[R + 2]);
        u[R + 1] = _mm512_unpackhi_epi64(t[R], t[R + 2]);
        u[R + 2] = _mm512_unpacklo_epi64(t[R + 1], t[R + 3]);
        u[R + 3] = _mm512_unpackhi_epi64(t[R + 1], t[R + 3]);
    }
    for (int m = 0; m < 4; m++) {
        v[m] = _mm512_shuffle_i32x4(u[m], u[m + 4], 0x88);          // lanes 0, 2 of rows 0-3 and 4-7
        v[m + 4] = _mm512_shuffle_i32x4(u[m], u[m + 4], 0xdd);      // lanes 1, 3
        v[m + 8] = _mm512_shuffle_i32x4(u[m + 8], u[m + 12], 0x88); // the same for rows 8-15
        v[m + 12] = _mm512_shuffle_i32x4(u[m + 8], u[m + 12], 0xdd);
    }
    for (int m = 0; m < 4; m++) {
        out[m] = _mm512_shuffle_i32x4(v[m], v[m + 8], 0x88);
        out[m + 8] = _mm512_shuffle_i32x4(v[m], v[m + 8], 0xdd);
        out[m + 4] = _mm512_shuffle_i32x4(v[m + 4], v[m + 12], 0x88);
        out[m + 12] = _mm512_shuffle_i32x4(v[m + 4], v[m + 12], 0xdd);
    }
}

// Packs weight rows j0 .. j0+nr-1, columns k0 .. k0+kb-1 (forward):
// panel[(kk * Q8_NR + j) * 4 + b] = w[j0+j][k0 + 4*kk + b] ^ 0x80 and
// scales[g * Q8_NR + j] = the row's scale of group g; rows past nr are zero
// weights (byte 0x80) with scale 0.
static void q8_pack_rows(uint8_t* panel, float* scales, const Matrix* w, int j0, int nr, int k0, int kb) {
    int gs = w->group_size, gpr = w->cols / gs, words = kb / 4;
    uint32_t* dst = (uint32_t*)panel;
    __m512i offset_bytes = _mm512_set1_epi32((int)0x80808080u);
    // 16 rows x 16 dwords at a time, each row read as one 64-byte stream;
    // rows past nr are zero (bytes 0x80 after the offset: weight 0)
    for (int half = 0; half < 2; half++)
        for (int kk = 0; kk < words; kk += 16) {
            int nw = words - kk < 16 ? words - kk : 16;
            __mmask16 mask = nw == 16 ? 0xFFFF : (__mmask16)((1u << nw) - 1);
            __m512i rows[16], cols[16];
            for (int i = 0; i < 16; i++) {
                int j = 16 * half + i;
                rows[i] = j < nr ? _mm512_maskz_loadu_epi32(mask, w->q + (size_t)(j0 + j) * w->cols + k0 + 4 * kk)
                                 : _mm512_setzero_si512();
            }
            transpose_16x16_epi32(cols, rows);
            for (int c = 0; c < nw; c++)
                _mm512_storeu_si512(dst + (size_t)(kk + c) * Q8_NR + 16 * half, _mm512_xor_si512(cols[c], offset_bytes));
        }
    for (int j = 0; j < Q8_NR; j++)
        for (int g = 0; g < kb / gs; g++)
            scales[g * Q8_NR + j] = j < nr ? w->s[(size_t)(j0 + j) * gpr + k0 / gs + g] : 0.0f;
}

// Packs W^T (transposed): outputs are W's columns j0 .. j0+nr-1, k runs over
// W's rows k0 .. k0+kb-1. Each group of gs rows of a column is requantized
// from s*q as quantize_group would (16 columns per vector; needs gs % 32 == 0
// so that the panel's 32 columns share one scale group of each row).
static void q8_pack_cols(uint8_t* panel, float* scales, const Matrix* w, int j0, int nr, int k0, int kb, float* tmp) {
    int gs = w->group_size, gpr = w->cols / gs;
    __mmask32 cols_mask = nr >= 32 ? 0xFFFFFFFFu : (1u << nr) - 1;
    for (int g = 0; g < kb / gs; g++) {
        // tmp (gs, 32): the dequantized values, and each column's max and poison
        __m512 vmax[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
        __m512 vpoison[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int o = 0; o < gs; o++) {
            size_t row = (size_t)k0 + (size_t)g * gs + o;
            __m256i q = _mm256_maskz_loadu_epi8(cols_mask, w->q + row * w->cols + j0);
            __m512 s = _mm512_set1_ps(w->s[row * gpr + j0 / gs]);
            for (int h = 0; h < 2; h++) {
                __m128i q16 = h ? _mm256_extracti128_si256(q, 1) : _mm256_castsi256_si128(q);
                __m512 v = _mm512_mul_ps(s, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q16)));
                _mm512_storeu_ps(tmp + (size_t)o * 32 + 16 * h, v);
                vmax[h] = _mm512_max_ps(_mm512_abs_ps(v), vmax[h]);
                vpoison[h] = _mm512_add_ps(vpoison[h], _mm512_mul_ps(v, _mm512_setzero_ps()));
            }
        }
        __m512 inv[2];
        for (int h = 0; h < 2; h++) {
            // scale = max / 127; inv = 1 / scale where that is finite and > 0, else 0
            __m512 scale = _mm512_div_ps(vmax[h], _mm512_set1_ps(127.0f));
            __mmask16 ok = _mm512_cmp_ps_mask(scale, _mm512_setzero_ps(), _CMP_GT_OQ) &
                           _mm512_cmp_ps_mask(scale, _mm512_set1_ps(INFINITY), _CMP_LT_OQ);
            inv[h] = _mm512_maskz_div_ps(ok, _mm512_set1_ps(1.0f), scale);
            _mm512_storeu_ps(scales + g * Q8_NR + 16 * h, _mm512_add_ps(scale, vpoison[h]));
        }
        // four rows at a time into one dword per column: byte b = row 4*kk + b, plus 128
        uint32_t* dst = (uint32_t*)panel + (size_t)g * (gs / 4) * Q8_NR;
        for (int kk = 0; kk < gs / 4; kk++)
            for (int h = 0; h < 2; h++) {
                __m512i word = _mm512_setzero_si512();
                for (int b = 0; b < 4; b++) {
                    __m512 v = _mm512_loadu_ps(tmp + (size_t)(4 * kk + b) * 32 + 16 * h);
                    __m512i q = quantize_value_avx512(_mm512_mul_ps(v, inv[h]));
                    q = _mm512_and_si512(_mm512_add_epi32(q, _mm512_set1_epi32(128)), _mm512_set1_epi32(255));
                    word = _mm512_or_si512(word, _mm512_slli_epi32(q, 8 * b));
                }
                _mm512_storeu_si512(dst + (size_t)kk * Q8_NR + 16 * h, word);
            }
    }
}

// x (n, kb) block -> xq (n, kb), xs (n, kb/gs), xcorr (n, kb/gs) = -128 * sum of each group's bytes
static void q8_quantize_block(Q8Scratch* sc, const float* x, int ldx, int n, int kb) {
    int gs = sc->gs, groups = kb / gs;
    #pragma omp parallel for schedule(static) if ((long)n * kb >= PARALLEL_MIN_WORK)
    for (int i = 0; i < n; i++)
        for (int g = 0; g < groups; g++) {
            int8_t* q = sc->xq + (size_t)i * kb + (size_t)g * gs;
            sc->xs[(size_t)i * groups + g] = quantize_group(q, x + (size_t)i * ldx + (size_t)g * gs, gs);
            int32_t sum = 0;
            for (int k = 0; k < gs; k++) sum += q[k];
            sc->xcorr[(size_t)i * groups + g] = -128 * sum;
        }
}

// y[i][j] for i < mr, j < nr of one 6 x 32 tile: the fma chain over the
// block's groups (load: start from y, else from 0). Rows past mr read row 0.
static void q8_kernel(int groups, int gs, const uint8_t* panel, const float* pscale, const int8_t* xq, int kb,
                      const float* xs, const int32_t* xcorr, float* y, int ldy, int mr, int nr, int load) {
    const int8_t* xr[Q8_MR];
    for (int i = 0; i < Q8_MR; i++) xr[i] = xq + (size_t)(i < mr ? i : 0) * kb;
    int rows[Q8_MR];
    for (int i = 0; i < Q8_MR; i++) rows[i] = (i < mr ? i : 0) * groups;
    __mmask16 m0 = nr >= 16 ? 0xFFFF : (__mmask16)((1u << nr) - 1);
    __mmask16 m1 = nr >= 32 ? 0xFFFF : nr > 16 ? (__mmask16)((1u << (nr - 16)) - 1) : 0;
    __m512 c[Q8_MR][2];
    #pragma GCC unroll 6
    for (int i = 0; i < Q8_MR; i++) {
        c[i][0] = load && i < mr ? _mm512_maskz_loadu_ps(m0, y + (size_t)i * ldy) : _mm512_setzero_ps();
        c[i][1] = load && i < mr ? _mm512_maskz_loadu_ps(m1, y + (size_t)i * ldy + 16) : _mm512_setzero_ps();
    }
    const uint8_t* b = panel;
    for (int g = 0; g < groups; g++) {
        __m512i acc[Q8_MR][2];
        #pragma GCC unroll 6
        for (int i = 0; i < Q8_MR; i++) acc[i][0] = acc[i][1] = _mm512_set1_epi32(xcorr[rows[i] + g]);
        for (int kk = 0; kk < gs / 4; kk++) {
            __m512i b0 = _mm512_loadu_si512(b), b1 = _mm512_loadu_si512(b + 64);
            b += 4 * Q8_NR;
            #pragma GCC unroll 6
            for (int i = 0; i < Q8_MR; i++) {
                int32_t word;
                memcpy(&word, xr[i] + (size_t)g * gs + 4 * kk, 4);
                __m512i a = _mm512_set1_epi32(word);
                acc[i][0] = _mm512_dpbusd_epi32(acc[i][0], b0, a);
                acc[i][1] = _mm512_dpbusd_epi32(acc[i][1], b1, a);
            }
        }
        __m512 s0 = _mm512_loadu_ps(pscale + g * Q8_NR), s1 = _mm512_loadu_ps(pscale + g * Q8_NR + 16);
        #pragma GCC unroll 6
        for (int i = 0; i < Q8_MR; i++) {
            __m512 xsc = _mm512_set1_ps(xs[rows[i] + g]);
            c[i][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][0]), _mm512_mul_ps(s0, xsc), c[i][0]);
            c[i][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][1]), _mm512_mul_ps(s1, xsc), c[i][1]);
        }
    }
    for (int i = 0; i < mr; i++) {
        _mm512_mask_storeu_ps(y + (size_t)i * ldy, m0, c[i][0]);
        _mm512_mask_storeu_ps(y + (size_t)i * ldy + 16, m1, c[i][1]);
    }
}
#endif

void matmul_q8(float* y, const float* x, const Matrix* w, int n, int trans, int accumulate, Q8Scratch* sc) {
    int gs = w->group_size;
    if (gs != sc->gs || n > sc->n_cap) die("matmul_q8: scratch for group %d and %d rows, asked for %d and %d", sc->gs, sc->n_cap, gs, n);
    if (!matmul_q8_fast(w->rows, gs, trans)) {
        matmul_q8_portable(y, x, w, n, trans, accumulate);
        return;
    }
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    int K = trans ? w->rows : w->cols, M = trans ? w->cols : w->rows;
    int n_panels = (M + Q8_NR - 1) / Q8_NR;
    for (int k0 = 0; k0 < K; k0 += sc->kc) {
        int kb = K - k0 < sc->kc ? K - k0 : sc->kc, groups = kb / gs;
        q8_quantize_block(sc, x + k0, K, n, kb);
        int load = accumulate || k0 > 0;
        #pragma omp parallel for schedule(static) num_threads(sc->n_threads) if ((long)n * M * kb >= PARALLEL_MIN_WORK)
        for (int p = 0; p < n_panels; p++) {
            int t = engine_thread_id();
            uint8_t* panel = sc->panels + (size_t)t * Q8_NR * sc->kc;
            float* pscale = sc->panel_scales + (size_t)t * Q8_NR * (sc->kc / gs);
            int j0 = p * Q8_NR, nr = M - j0 < Q8_NR ? M - j0 : Q8_NR;
            if (trans) q8_pack_cols(panel, pscale, w, j0, nr, k0, kb, sc->pack_tmp + (size_t)t * Q8_NR * gs);
            else q8_pack_rows(panel, pscale, w, j0, nr, k0, kb);
            for (int i0 = 0; i0 < n; i0 += Q8_MR)
                q8_kernel(groups, gs, panel, pscale, sc->xq + (size_t)i0 * kb, kb, sc->xs + (size_t)i0 * groups,
                          sc->xcorr + (size_t)i0 * groups, y + (size_t)i0 * M + j0, M, n - i0 < Q8_MR ? n - i0 : Q8_MR, nr, load);
        }
    }
#endif
}

void matmul(float* y, const float* x, const Matrix* w, int n, Q8Scratch* q8) {
    int rows = w->rows, cols = w->cols;
    if (w->f) {
        if (n == 1) {
            // decode: one matrix-vector product, bandwidth bound, threads over rows
            // (a small one runs on this thread: waking the team costs more
            // than it saves, and far more when another process holds a core)
            #pragma omp parallel for schedule(static) if ((long)rows * cols >= PARALLEL_MIN_WORK)
            for (int r = 0; r < rows; r++) y[r] = dot_f32(w->f + (size_t)r * cols, x, cols);
        } else {
            // prompt: y = x @ W^T as one GEMM
            gemm(0, 1, n, rows, cols, 1.0f, x, cols, w->f, cols, 0.0f, y, rows);
        }
        return;
    }
    if (n >= Q8_GEMM_MIN_ROWS && matmul_q8_fast(rows, w->group_size, 0)) {
        // a prompt or a training batch: the packed VNNI GEMM
        matmul_q8(y, x, w, n, 0, 0, q8);
        return;
    }
    int gs = w->group_size, groups = cols / gs;
    int8_t* xq = q8->xq;
    float* xs = q8->xs;
    quantize_rows(xq, xs, x, n, cols, gs);
    // each weight row is read once and dotted with all n quantized inputs,
    // four at a time (dot_q8_x4 shares the weight loads between them)
    #pragma omp parallel for schedule(static) if ((long)rows * cols * n >= PARALLEL_MIN_WORK)
    for (int r = 0; r < rows; r++) {
        const int8_t* wq = w->q + (size_t)r * cols;
        const float* ws = w->s + (size_t)r * groups;
        int i = 0;
        for (; i + 4 <= n; i += 4) {
            float out[4];
            dot_q8_x4(out, wq, ws, xq + (size_t)i * cols, xs + (size_t)i * groups, cols, gs);
            for (int t = 0; t < 4; t++) y[(size_t)(i + t) * rows + r] = out[t];
        }
        for (; i < n; i++)
            y[(size_t)i * rows + r] = dot_q8(wq, ws, xq + (size_t)i * cols, xs + (size_t)i * groups, cols, gs);
    }
}

void embed_row(float* out, const Matrix* emb, int token) {
    size_t cols = emb->cols;
    if (emb->f) { memcpy(out, emb->f + (size_t)token * cols, cols * sizeof(float)); return; }
    // Q8_0: dequantize just this row (never the whole 128256-row table)
    const int8_t* q = emb->q + (size_t)token * cols;
    const float* s = emb->s + (size_t)token * cols / emb->group_size;
    for (size_t j = 0; j < cols; j++) out[j] = q[j] * s[j / emb->group_size];
}

void rope_inv_freq(float* inv_freq, const Config* c) {
    int half = c->head_dim / 2;
    for (int i = 0; i < half; i++) {
        // base frequency theta^(-2i/head_dim), as Hugging Face computes it
        float f = 1.0f / powf(c->rope_theta, (float)(2 * i) / (float)c->head_dim);
        if (c->rope_scaling == ROPE_LLAMA3) {
            // Llama 3.1 "llama3" scaling: long wavelengths are slowed down by
            // `factor`, short ones kept, and the band between interpolated
            float low_wavelen = c->rope_original_max_pos / c->rope_low_freq_factor;
            float high_wavelen = c->rope_original_max_pos / c->rope_high_freq_factor;
            float wavelen = 2.0f * (float)M_PI / f;
            if (wavelen > low_wavelen) {
                f = f / c->rope_factor;
            } else if (wavelen >= high_wavelen) {
                float smooth = (c->rope_original_max_pos / wavelen - c->rope_low_freq_factor) /
                               (c->rope_high_freq_factor - c->rope_low_freq_factor);
                f = (1.0f - smooth) * f / c->rope_factor + smooth * f;
            }
        }
        inv_freq[i] = f;
    }
}

void rope_rotate(float* vec, int n_heads, int head_dim, const float* cos_t, const float* sin_t) {
    int half = head_dim / 2;
    for (int h = 0; h < n_heads; h++) {
        float* v = vec + (size_t)h * head_dim;
        for (int j = 0; j < half; j++) {
            // Hugging Face "rotate_half" layout: element j pairs with j + half
            float a = v[j], b = v[j + half];
            v[j] = a * cos_t[j] - b * sin_t[j];
            v[j + half] = b * cos_t[j] + a * sin_t[j];
        }
    }
}

// ----------------------------------------------------------------------------
// LoRA (applied unmerged, so it works over an int8 base)

void lora_apply(float* y, const float* x, const Lora* lora, int layer, int target, int n, int in, int out,
                float* tmp) {
    const LoraPair* p = &lora->pairs[layer][target];
    if (!p->a) return;
    int r = lora->rank;
    // tmp (n, r) = x (n, in) @ A^T ;  y (n, out) += scale * tmp @ B^T
    gemm(0, 1, n, r, in, 1.0f, x, in, p->a, in, 0.0f, tmp, r);
    gemm(0, 1, n, out, r, lora->scale, tmp, r, p->b, r, 1.0f, y, out);
}

void free_lora(Lora* lora) {
    free(lora->pairs);
    free(lora->memory);
    memset(lora, 0, sizeof(*lora));
}

// LoRA adapter files: the format is documented in run.h.

static const char* const lora_target_names[LORA_N_TARGETS] = {"q", "k", "v", "o", "gate", "up", "down"};

const char* lora_target_name(int target) { return lora_target_names[target]; }

// (in, out) of the base matrix a target adapts.
void lora_dims(const Config* c, int target, int* in, int* out) {
    int q_dim = c->n_heads * c->head_dim, kv_dim = c->n_kv_heads * c->head_dim;
    switch (target) {
        case LORA_Q:    *in = c->dim; *out = q_dim; break;
        case LORA_K:
        case LORA_V:    *in = c->dim; *out = kv_dim; break;
        case LORA_O:    *in = q_dim; *out = c->dim; break;
        case LORA_GATE:
        case LORA_UP:   *in = c->dim; *out = c->hidden_dim; break;
        default:        *in = c->hidden_dim; *out = c->dim; break;  // LORA_DOWN
    }
}

// Floats of an adapter's payload (A and B of every adapted layer/target).
size_t lora_param_count(const Config* c, int rank, int target_mask, int layer_begin, int layer_end) {
    size_t n = 0;
    for (int l = layer_begin; l < layer_end; l++)
        for (int t = 0; t < LORA_N_TARGETS; t++)
            if (target_mask & (1 << t)) {
                int in, out;
                lora_dims(c, t, &in, &out);
                n += (size_t)rank * in + (size_t)out * rank;
            }
    return n;
}

// Fills a Lora whose a/b point into memory (lora_param_count floats) in file
// order. The Lora owns its pairs table; it owns memory only if own_memory.
void lora_layout(Lora* lora, const Config* c, int rank, float alpha, int target_mask, int layer_begin,
                 int layer_end, float* memory, int own_memory) {
    memset(lora, 0, sizeof(*lora));
    lora->rank = rank;
    lora->alpha = alpha;
    lora->scale = alpha / (float)rank;
    lora->target_mask = target_mask;
    lora->layer_begin = layer_begin;
    lora->layer_end = layer_end;
    lora->pairs = xcalloc((size_t)c->n_layers, sizeof(*lora->pairs));
    lora->memory = own_memory ? memory : NULL;
    float* p = memory;
    for (int l = layer_begin; l < layer_end; l++)
        for (int t = 0; t < LORA_N_TARGETS; t++)
            if (target_mask & (1 << t)) {
                int in, out;
                lora_dims(c, t, &in, &out);
                lora->pairs[l][t].a = p; p += (size_t)rank * in;
                lora->pairs[l][t].b = p; p += (size_t)out * rank;
            }
}


// Writes the adapter atomically (path.tmp + rename). The payload is taken
// pair by pair, so the a/b buffers need not be contiguous. Returns 0 on success.
int lora_save(const Lora* lora, const Config* c, const char* path) {
    size_t n = lora_param_count(c, lora->rank, lora->target_mask, lora->layer_begin, lora->layer_end);
    size_t size = LORA_HEADER_BYTES + n * sizeof(float);
    unsigned char* buf = xcalloc(size, 1);
    put_i32(buf + 0, (int32_t)LORA_MAGIC);
    put_i32(buf + 4, LORA_VERSION);
    put_i32(buf + 8, lora->rank);
    put_f32(buf + 12, lora->alpha);
    put_i32(buf + 16, lora->target_mask);
    put_i32(buf + 20, lora->layer_begin);
    put_i32(buf + 24, lora->layer_end);
    put_i32(buf + 28, c->dim);
    put_i32(buf + 32, c->hidden_dim);
    put_i32(buf + 36, c->n_layers);
    put_i32(buf + 40, c->n_heads);
    put_i32(buf + 44, c->n_kv_heads);
    put_i32(buf + 48, c->head_dim);
    put_i32(buf + 52, c->vocab_size);
    int64_t nf = (int64_t)n;
    memcpy(buf + 56, &nf, 8);
    unsigned char* p = buf + LORA_HEADER_BYTES;
    for (int l = lora->layer_begin; l < lora->layer_end; l++)
        for (int t = 0; t < LORA_N_TARGETS; t++)
            if (lora->target_mask & (1 << t)) {
                int in, out;
                lora_dims(c, t, &in, &out);
                size_t na = (size_t)lora->rank * in, nb = (size_t)out * lora->rank;
                memcpy(p, lora->pairs[l][t].a, na * sizeof(float)); p += na * sizeof(float);
                memcpy(p, lora->pairs[l][t].b, nb * sizeof(float)); p += nb * sizeof(float);
            }
    int rc = write_file_atomic(path, buf, size);
    free(buf);
    return rc;
}

// Reads and validates an adapter for a model of config c. On success fills
// lora (owning its memory; release with free_lora) and returns 0; otherwise
// writes a one-line reason to err and returns -1.
int lora_read(Lora* lora, const Config* c, const char* path, char* err, size_t errlen) {
    memset(lora, 0, sizeof(*lora));
    FILE* f = fopen(path, "rb");
    if (!f) { snprintf(err, errlen, "cannot open adapter %s: %s", path, strerror(errno)); return -1; }
    unsigned char h[LORA_HEADER_BYTES];
    if (fread(h, 1, LORA_HEADER_BYTES, f) != LORA_HEADER_BYTES) {
        fclose(f); snprintf(err, errlen, "adapter %s: file too small for a header", path); return -1;
    }
    if ((uint32_t)get_i32(h) != LORA_MAGIC) {
        fclose(f); snprintf(err, errlen, "adapter %s: bad magic (not an unlearn.c adapter)", path); return -1;
    }
    int version = get_i32(h + 4);
    if (version != LORA_VERSION) {
        fclose(f); snprintf(err, errlen, "adapter %s: unsupported version %d (expected %d)", path, version, LORA_VERSION);
        return -1;
    }
    int rank = get_i32(h + 8), mask = get_i32(h + 16), lb = get_i32(h + 20), le = get_i32(h + 24);
    float alpha = get_f32(h + 12);
    int dims[7] = {get_i32(h + 28), get_i32(h + 32), get_i32(h + 36), get_i32(h + 40), get_i32(h + 44),
                   get_i32(h + 48), get_i32(h + 52)};
    int want[7] = {c->dim, c->hidden_dim, c->n_layers, c->n_heads, c->n_kv_heads, c->head_dim, c->vocab_size};
    static const char* names[7] = {"dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab_size"};
    for (int i = 0; i < 7; i++) {
        if (dims[i] != want[i]) {
            fclose(f);
            snprintf(err, errlen, "adapter %s was trained for a model with %s = %d, this model has %d", path, names[i],
                     dims[i], want[i]);
            return -1;
        }
    }
    if (rank <= 0 || rank > 65536 || !isfinite(alpha) || mask <= 0 || mask >= (1 << LORA_N_TARGETS) || lb < 0 ||
        le > c->n_layers || lb >= le) {
        fclose(f); snprintf(err, errlen, "adapter %s: invalid rank, alpha, targets or layer range in header", path);
        return -1;
    }
    int64_t nf;
    memcpy(&nf, h + 56, 8);
    size_t n = lora_param_count(c, rank, mask, lb, le);
    if (nf != (int64_t)n) {
        fclose(f); snprintf(err, errlen, "adapter %s: header payload size %lld does not match its shape (%zu)", path,
                            (long long)nf, n);
        return -1;
    }
    // the payload must be in the file before it is allocated: a header that
    // claims a huge rank is an error, not an allocation of that size
    struct stat st;
    if (fstat(fileno(f), &st) != 0 || (uint64_t)st.st_size != LORA_HEADER_BYTES + (uint64_t)n * sizeof(float)) {
        fclose(f);
        snprintf(err, errlen, "adapter %s: file size does not match the header (truncated or corrupt)", path);
        return -1;
    }
    float* mem = xmalloc(n * sizeof(float));
    size_t got = fread(mem, sizeof(float), n, f);
    int extra = fgetc(f) != EOF;
    fclose(f);
    if (got != n || extra) {
        free(mem);
        snprintf(err, errlen, "adapter %s: file size does not match the header (truncated or corrupt)", path);
        return -1;
    }
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(mem[i])) { free(mem); snprintf(err, errlen, "adapter %s: non-finite weight", path); return -1; }
    }
    lora_layout(lora, c, rank, alpha, mask, lb, le, mem, 1);
    return 0;
}

// Loads an adapter onto a model for unmerged inference (`run --lora`):
// sets t->lora and allocates the (batch_cap, rank) scratch. Exits on error.
void load_lora(Transformer* t, const char* path) {
    Lora* lora = xmalloc(sizeof(Lora));
    char err[512];
    if (lora_read(lora, &t->config, path, err, sizeof(err)) != 0) {
        fprintf(stderr, "error: %s\n", err);
        exit(EXIT_FAILURE);
    }
    if (t->lora) { free_lora(t->lora); free(t->lora); }
    t->lora = lora;
    free(t->state.lora_tmp);
    t->state.lora_tmp = xcalloc((size_t)t->state.batch_cap * lora->rank, sizeof(float));
}

// ----------------------------------------------------------------------------
// The forward pass

// One projection: y = x W^T, plus the adapter's B A x when one is set.
static void project(Transformer* t, float* y, const float* x, const Matrix* w, int layer, int target, int n) {
    RunState* s = &t->state;
    matmul(y, x, w, n, &s->q8);
    if (t->lora) lora_apply(y, x, t->lora, layer, target, n, w->cols, w->rows, s->lora_tmp);
}

// Causal attention of one query head for n queries, as two matrix products
// (the prompt and training paths; decoding, n = 1, runs them as loops):
//   scores (n, n_keys) = q (n, hd) @ k^T / sqrt(hd), n_keys = pos0 + n
//   row i: softmax over keys start_i .. pos0 + i, exactly 0 elsewhere
//   out (n, hd) = probs @ v
// Query i sits at key index pos0 + i; start_i = 0, or with pos_in_seq (a
// packed training row: several sequences one after the other) the first key
// of its own sequence, pos0 + i - pos_in_seq[i]. q, k, v, out are rows of a
// wider matrix (strides ldq, ldkv, ldo: one head's slice). probs (n, n_keys)
// receives the probabilities (train_lora keeps them for the backward pass).
// The masked part of the product is computed and discarded: twice the work
// of the triangle, but as a GEMM, far faster than loops over the triangle.
// train_lora calls this same function, so its forward equals the engine's.
void attention_head(float* out, int ldo, float* probs, const float* q, int ldq, const float* k, const float* v,
                    int ldkv, int n, int pos0, const int* pos_in_seq, int hd) {
    int n_keys = pos0 + n;
    if (n == 1 && !pos_in_seq) {
        // decoding: one query, so the two products are matrix-vector
        // loops (gemm would pack, and the plain C one allocate, per call)
        float inv_sqrt = 1.0f / sqrtf((float)hd);
        for (int j = 0; j < n_keys; j++) probs[j] = dot_f32(q, k + (size_t)j * ldkv, hd) * inv_sqrt;
        softmax(probs, n_keys);
        for (int d = 0; d < hd; d++) out[d] = 0.0f;
        for (int j = 0; j < n_keys; j++) {
            const float* vj = v + (size_t)j * ldkv;
            float p = probs[j];
            #pragma omp simd
            for (int d = 0; d < hd; d++) out[d] += p * vj[d];
        }
        return;
    }
    gemm(0, 1, n, n_keys, hd, 1.0f / sqrtf((float)hd), q, ldq, k, ldkv, 0.0f, probs, n_keys);
    for (int i = 0; i < n; i++) {
        float* row = probs + (size_t)i * n_keys;
        int last = pos0 + i, start = pos_in_seq ? last - pos_in_seq[i] : 0;
        softmax(row + start, last - start + 1);
        for (int j = 0; j < start; j++) row[j] = 0.0f;
        for (int j = last + 1; j < n_keys; j++) row[j] = 0.0f;
    }
    gemm(0, 0, n, hd, n_keys, 1.0f, probs, n_keys, v, ldkv, 0.0f, out, ldo);
}

// Causal attention for n new positions pos0.. whose q is in s->q and whose
// k, v are already in the cache. Output (n, n_heads*head_dim) in s->att_out.
// Threads take whole heads; each head's two products run on its thread
// (inside a parallel region OpenBLAS and the plain C GEMM stay single-threaded).
static void attention(Transformer* t, int layer, int n, int pos0) {
    Config* c = &t->config;
    RunState* s = &t->state;
    int hd = c->head_dim, kv_dim = c->n_kv_heads * hd, q_dim = c->n_heads * hd;
    int kv_mul = c->n_heads / c->n_kv_heads; // query heads per kv head (GQA)
    float* key_layer = s->key_cache + (size_t)layer * s->seq_len * kv_dim;
    float* value_layer = s->value_cache + (size_t)layer * s->seq_len * kv_dim;
    #pragma omp parallel for schedule(dynamic) if ((long)n * c->n_heads * (pos0 + n) * hd >= PARALLEL_MIN_WORK)
    for (int h = 0; h < c->n_heads; h++) {
        int kv_off = (h / kv_mul) * hd;
        float* probs = s->att + (size_t)engine_thread_id() * s->batch_cap * s->seq_len;
        attention_head(s->att_out + (size_t)h * hd, q_dim, probs, s->q + (size_t)h * hd, q_dim, key_layer + kv_off,
                       value_layer + kv_off, kv_dim, n, pos0, NULL, hd);
    }
}

// One chunk of n <= batch_cap positions through the whole stack. Leaves the
// final residual stream in s->x.
static void forward_chunk(Transformer* t, const int* tokens, int n, int pos0) {
    Config* c = &t->config;
    Weights* w = &t->weights;
    RunState* s = &t->state;
    int dim = c->dim, hid = c->hidden_dim, hd = c->head_dim, half = hd / 2;
    int q_dim = c->n_heads * hd, kv_dim = c->n_kv_heads * hd;

    for (int i = 0; i < n; i++) embed_row(s->x + (size_t)i * dim, &w->token_embedding, tokens[i]);
    for (int i = 0; i < n; i++) {
        for (int j = 0; j < half; j++) {
            float angle = (float)(pos0 + i) * s->rope_inv_freq[j];
            s->rope_cos[(size_t)i * half + j] = cosf(angle);
            s->rope_sin[(size_t)i * half + j] = sinf(angle);
        }
    }

    for (int l = 0; l < c->n_layers; l++) {
        LayerWeights* lw = &w->layers[l];
        // attention sublayer: x += wo(attention(rope(wq xn), rope(wk xn), wv xn))
        for (int i = 0; i < n; i++)
            rmsnorm(s->xb + (size_t)i * dim, s->x + (size_t)i * dim, lw->rms_att, dim, c->norm_eps);
        project(t, s->q, s->xb, &lw->wq, l, LORA_Q, n);
        project(t, s->k, s->xb, &lw->wk, l, LORA_K, n);
        project(t, s->v, s->xb, &lw->wv, l, LORA_V, n);
        float* key_layer = s->key_cache + (size_t)l * s->seq_len * kv_dim;
        float* value_layer = s->value_cache + (size_t)l * s->seq_len * kv_dim;
        for (int i = 0; i < n; i++) {
            const float* cos_t = s->rope_cos + (size_t)i * half;
            const float* sin_t = s->rope_sin + (size_t)i * half;
            rope_rotate(s->q + (size_t)i * q_dim, c->n_heads, hd, cos_t, sin_t);
            rope_rotate(s->k + (size_t)i * kv_dim, c->n_kv_heads, hd, cos_t, sin_t);
            memcpy(key_layer + (size_t)(pos0 + i) * kv_dim, s->k + (size_t)i * kv_dim, kv_dim * sizeof(float));
            memcpy(value_layer + (size_t)(pos0 + i) * kv_dim, s->v + (size_t)i * kv_dim, kv_dim * sizeof(float));
        }
        attention(t, l, n, pos0);
        project(t, s->xb2, s->att_out, &lw->wo, l, LORA_O, n);
        for (size_t j = 0; j < (size_t)n * dim; j++) s->x[j] += s->xb2[j];

        // MLP sublayer: x += w_down(silu(w_gate xn) * w_up xn)
        for (int i = 0; i < n; i++)
            rmsnorm(s->xb + (size_t)i * dim, s->x + (size_t)i * dim, lw->rms_ffn, dim, c->norm_eps);
        project(t, s->hb, s->xb, &lw->w_gate, l, LORA_GATE, n);
        project(t, s->hb2, s->xb, &lw->w_up, l, LORA_UP, n);
        for (size_t j = 0; j < (size_t)n * hid; j++) {
            float g = s->hb[j];
            s->hb[j] = g / (1.0f + expf(-g)) * s->hb2[j];
        }
        project(t, s->xb2, s->hb, &lw->w_down, l, LORA_DOWN, n);
        for (size_t j = 0; j < (size_t)n * dim; j++) s->x[j] += s->xb2[j];

        if (t->hook) t->hook(t->hook_ctx, l, pos0, n, s->x, dim);
    }
}

// Final norm and classifier for rows [row0, row0+n) of the chunk.
static void classify(Transformer* t, float* logits, int row0, int n) {
    Config* c = &t->config;
    RunState* s = &t->state;
    for (int i = 0; i < n; i++)
        rmsnorm(s->xb + (size_t)i * c->dim, s->x + (size_t)(row0 + i) * c->dim, t->weights.rms_final, c->dim, c->norm_eps);
    matmul(logits, s->xb, &t->weights.wcls, n, &s->q8);
}

float* forward_batch(Transformer* t, const int* tokens, int n, int pos0, float* all_logits) {
    Config* c = &t->config;
    RunState* s = &t->state;
    if (n <= 0 || pos0 < 0 || pos0 + n > s->seq_len) {
        fprintf(stderr, "error: positions %d..%d do not fit the context of %d\n", pos0, pos0 + n - 1, s->seq_len);
        exit(EXIT_FAILURE);
    }
    for (int i = 0; i < n; i++) {
        if (tokens[i] < 0 || tokens[i] >= c->vocab_size) {
            fprintf(stderr, "error: token id %d out of range [0, %d)\n", tokens[i], c->vocab_size);
            exit(EXIT_FAILURE);
        }
    }
    for (int done = 0; done < n; done += s->batch_cap) {
        int m = n - done < s->batch_cap ? n - done : s->batch_cap;
        forward_chunk(t, tokens + done, m, pos0 + done);
        if (all_logits) {
            // one classifier GEMM per chunk, straight into the caller's buffer
            classify(t, all_logits + (size_t)done * c->vocab_size, 0, m);
            if (done + m == n) memcpy(s->logits, all_logits + (size_t)(n - 1) * c->vocab_size, c->vocab_size * sizeof(float));
        } else if (done + m == n) {
            classify(t, s->logits, m - 1, 1);
        }
    }
    return s->logits;
}

float* forward(Transformer* t, int token, int pos) {
    return forward_batch(t, &token, 1, pos, NULL);
}

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
    if (r->left < 4) {
        fprintf(stderr, "error: tokenizer file %s: truncated (reading %s)\n", r->path, what);
        exit(EXIT_FAILURE);
    }
    uint32_t v = (uint32_t)r->p[0] | (uint32_t)r->p[1] << 8 | (uint32_t)r->p[2] << 16 | (uint32_t)r->p[3] << 24;
    r->p += 4; r->left -= 4;
    return (int32_t)v;
}

static void tok_bad(const char* path, const char* why, long a) {
    fprintf(stderr, "error: tokenizer file %s: %s (%ld)\n", path, why, a);
    exit(EXIT_FAILURE);
}

typedef struct { int len, id; } TokSpecialKey;

static int tok_cmp_special(const void* a, const void* b) {
    const TokSpecialKey* x = (const TokSpecialKey*)a;
    const TokSpecialKey* y = (const TokSpecialKey*)b;
    if (x->len != y->len) return y->len - x->len; // longest first
    return x->id - y->id;
}

void build_tokenizer(Tokenizer* tok, const char* path) {
    memset(tok, 0, sizeof(*tok));
    size_t size;
    char* data = read_file(path, &size);
    TokReader r = { (const unsigned char*)data, size, path };

    uint32_t magic = (uint32_t)tok_get_i32(&r, "magic");
    if (magic != TOK_MAGIC) tok_bad(path, "bad magic, not a tokenizer file", (long)magic);
    int version = tok_get_i32(&r, "version");
    if (version != TOK_VERSION) tok_bad(path, "unsupported version", version);
    int vocab_size = tok_get_i32(&r, "vocab_size");
    if (vocab_size < 256 || vocab_size > (1 << 24)) tok_bad(path, "bad vocab_size", vocab_size);
    int n_merges = tok_get_i32(&r, "n_merges");
    if (n_merges < 0 || n_merges > (1 << 26)) tok_bad(path, "bad n_merges", n_merges);
    int bos_id = tok_get_i32(&r, "bos_id");
    if (bos_id < -1 || bos_id >= vocab_size) tok_bad(path, "bad bos_id", bos_id);
    int n_eot = tok_get_i32(&r, "n_eot");
    if (n_eot < 0 || n_eot > 256) tok_bad(path, "bad n_eot", n_eot);
    tok->vocab_size = vocab_size;
    tok->n_merges = n_merges;
    tok->bos_id = bos_id;
    tok->n_eot = n_eot;
    tok->eot_ids = (int*)xcalloc((size_t)n_eot + 1, sizeof(int));
    for (int i = 0; i < n_eot; i++) {
        tok->eot_ids[i] = tok_get_i32(&r, "eot_ids");
        if (tok->eot_ids[i] < 0 || tok->eot_ids[i] >= vocab_size) tok_bad(path, "bad eot id", tok->eot_ids[i]);
    }
    int ignore_merges = tok_get_i32(&r, "ignore_merges");
    if (ignore_merges != 0 && ignore_merges != 1) tok_bad(path, "bad ignore_merges", ignore_merges);
    tok->ignore_merges = ignore_merges;
    // counts are checked against the bytes that follow before anything is
    // sized by them: a lying header is an error, not gigabytes of tables
    // (each token takes at least 5 bytes, each merge exactly 12)
    if ((size_t)vocab_size * 5 + (size_t)n_merges * 12 > r.left) tok_bad(path, "file too small for its vocab_size and n_merges", (long)r.left);

    // tokens: one blob holding every token's bytes, each NUL-terminated for
    // convenience; token_bytes[0] is the start of the blob (freed by it).
    tok->token_bytes = (char**)xmalloc((size_t)vocab_size * sizeof(char*));
    tok->token_len = (int*)xmalloc((size_t)vocab_size * sizeof(int));
    tok->is_special = (unsigned char*)xmalloc((size_t)vocab_size);
    const unsigned char* tokens_start = r.p;
    size_t total = 0;
    for (int i = 0; i < vocab_size; i++) { // first pass: validate, measure
        if (r.left < 5) tok_bad(path, "truncated in token", i);
        unsigned char flags = r.p[0];
        r.p += 1; r.left -= 1;
        int len = tok_get_i32(&r, "token length");
        if (flags > 1) tok_bad(path, "bad token flags", i);
        if (len < 0 || (size_t)len > r.left) tok_bad(path, "bad token length", i);
        r.p += len; r.left -= (size_t)len;
        total += (size_t)len + 1;
    }
    if (r.left != (size_t)n_merges * 12) tok_bad(path, "size after the tokens does not match n_merges", (long)r.left);
    char* blob = (char*)xmalloc(total);
    TokReader t = { tokens_start, size - (size_t)(tokens_start - (const unsigned char*)data), path };
    size_t at = 0;
    for (int i = 0; i < vocab_size; i++) { // second pass: copy (already validated)
        tok->is_special[i] = t.p[0];
        t.p += 1;
        int len = tok_get_i32(&t, "token length");
        memcpy(blob + at, t.p, (size_t)len);
        blob[at + (size_t)len] = '\0';
        tok->token_bytes[i] = blob + at;
        tok->token_len[i] = len;
        t.p += len;
        at += (size_t)len + 1;
    }

    // bytes -> id. The first normal token with given bytes wins; a special
    // token is indexed only when no normal token has its bytes.
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

    // merges: (left, right) -> (rank, merged); a repeated pair keeps its
    // last rank, as HF's HashMap collect does
    TokMergeIndex* mi = (TokMergeIndex*)xcalloc(1, sizeof(TokMergeIndex));
    mi->cap = tok_pow2_at_least(2L * n_merges + 1);
    mi->key = (uint64_t*)xmalloc((size_t)mi->cap * sizeof(uint64_t));
    mi->rank = (int*)xmalloc((size_t)mi->cap * sizeof(int));
    mi->merged = (int*)xmalloc((size_t)mi->cap * sizeof(int));
    for (int i = 0; i < mi->cap; i++) mi->key[i] = TOK_EMPTY_KEY;
    tok->merge_index = mi;
    r.p = t.p; r.left = size - (size_t)(t.p - (const unsigned char*)data);
    uint32_t mmask = (uint32_t)mi->cap - 1;
    for (int k = 0; k < n_merges; k++) {
        int a = tok_get_i32(&r, "merge"), b = tok_get_i32(&r, "merge"), m = tok_get_i32(&r, "merge");
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
    if (r.left != 0) tok_bad(path, "trailing bytes after the merges", (long)r.left);

    // special tokens, longest first, for matching in text
    TokSpecialKey* keys = (TokSpecialKey*)xmalloc((size_t)vocab_size * sizeof(TokSpecialKey));
    int ns = 0;
    for (int id = 0; id < vocab_size; id++) {
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
    if (w->n_out >= w->max_out) {
        fprintf(stderr, "error: encode: the text needs more than %d tokens\n", w->max_out);
        exit(EXIT_FAILURE);
    }
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
    if (len >= (size_t)INT_MAX / 2) {
        fprintf(stderr, "error: encode: text of %zu bytes is too long\n", len);
        exit(EXIT_FAILURE);
    }
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
    if (id < 0 || id >= tok->vocab_size) {
        fprintf(stderr, "error: token id %d out of range [0, %d)\n", id, tok->vocab_size);
        exit(EXIT_FAILURE);
    }
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

// ----------------------------------------------------------------------------
// Chat template
//
// The Llama-3 instruct template as HF renders it (the jinja
//   '<|start_header_id|>' + role + '<|end_header_id|>\n\n' + content | trim + '<|eot_id|>'
// after bos_token), then tokenized as one string with the header/eot
// strings as special tokens. So each message is: the header ids,
// encode(role), encode("\n\n" + trim(content)) as ONE string, eot.
// Meta's ChatFormat encodes "\n\n" and content.strip() separately; the two
// never differ: stripped content starts with a non-space (or is empty), so
// the regex always ends a match exactly after the "\n\n" (\s*[\r\n]+ stops
// at the last newline) and, having no lookbehind, then matches the content
// as it would alone.
// Differences from HF, on purpose: role and content are plain text, so a
// user typing "<|eot_id|>" gets the text's ids, not 128009 (HF's
// apply_chat_template would parse it as the special token).
// trim = Python str.strip(), the whitespace of str.isspace() (Jinja's trim
// and Meta's strip both use it); it includes U+001C..U+001F, which \s does not.

static int tok_special_id(const Tokenizer* tok, const char* s) {
    int id = tokenizer_lookup(tok, s);
    if (id < 0 || !tok->is_special[id]) {
        fprintf(stderr, "error: chat template: the tokenizer has no special token %s\n", s);
        exit(EXIT_FAILURE);
    }
    return id;
}

int chat_encode(const Tokenizer* tok, const ChatMessage* msgs, int n_msgs, int add_generation_prompt,
                int add_bos, int* ids, int max_ids) {
    int start_header = tok_special_id(tok, "<|start_header_id|>");
    int end_header = tok_special_id(tok, "<|end_header_id|>");
    int eot = tok_special_id(tok, "<|eot_id|>");
    int n = 0;
    if (add_bos && tok->bos_id >= 0) {
        if (n >= max_ids) goto full;
        ids[n++] = tok->bos_id;
    }
    for (int m = 0; m < n_msgs; m++) {
        const char* role = msgs[m].role ? msgs[m].role : "";
        const char* content = msgs[m].content ? msgs[m].content : "";
        // trim: [b, e) of content without leading/trailing Python whitespace
        size_t len = strlen(content), b = 0, e = 0, at = 0;
        int seen = 0;
        while (at < len) {
            uint32_t c;
            size_t l = (size_t)tok_utf8_decode((const unsigned char*)content + at, len - at, &c);
            int space = c < TOK_INVALID_CP && unicode_is_pystrip(c);
            if (!space) { if (!seen) { b = at; seen = 1; } e = at + l; }
            at += l;
        }
        char* body = (char*)xmalloc(2 + (e - b) + 1); // "\n\n" + trimmed content
        body[0] = '\n'; body[1] = '\n';
        memcpy(body + 2, content + b, e - b);
        if (n >= max_ids) goto full;
        ids[n++] = start_header;
        n += encode(tok, role, strlen(role), 0, ids + n, max_ids - n);
        if (n >= max_ids) goto full;
        ids[n++] = end_header;
        n += encode(tok, body, 2 + (e - b), 0, ids + n, max_ids - n);
        free(body);
        if (n >= max_ids) goto full;
        ids[n++] = eot;
    }
    if (add_generation_prompt) {
        if (n >= max_ids) goto full;
        ids[n++] = start_header;
        n += encode(tok, "assistant", 9, 0, ids + n, max_ids - n);
        if (n >= max_ids) goto full;
        ids[n++] = end_header;
        n += encode(tok, "\n\n", 2, 0, ids + n, max_ids - n);
    }
    return n;
full:
    fprintf(stderr, "error: chat_encode: the dialogue needs more than %d tokens\n", max_ids);
    exit(EXIT_FAILURE);
}

// ----------------------------------------------------------------------------
// Sampling: greedy, temperature, top-p (nucleus), a seeded xorshift RNG

typedef struct { float prob; int index; } ProbIndex;

void build_sampler(Sampler* s, int vocab_size, float temperature, float topp, uint64_t seed) {
    s->vocab_size = vocab_size;
    s->temperature = temperature;
    s->topp = topp;
    s->rng_state = seed ? seed : 0x9E3779B97F4A7C15ull; // xorshift must not start at 0
    s->probindex = xmalloc((size_t)vocab_size * sizeof(ProbIndex));
}

void free_sampler(Sampler* s) { free(s->probindex); s->probindex = NULL; }

static uint32_t random_u32(uint64_t* state) {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return (uint32_t)((*state * 0x2545F4914F6CDD1Dull) >> 32);
}

static float random_f32(uint64_t* state) { return (random_u32(state) >> 8) / 16777216.0f; } // [0, 1)

static int sample_argmax(const float* p, int n) {
    int best = 0;
    for (int i = 1; i < n; i++) if (p[i] > p[best]) best = i;
    return best;
}

static int sample_mult(const float* p, int n, float coin) {
    float cdf = 0.0f;
    for (int i = 0; i < n; i++) { cdf += p[i]; if (coin < cdf) return i; }
    return n - 1; // rounding
}

static int compare_prob_desc(const void* a, const void* b) {
    const ProbIndex* x = a;
    const ProbIndex* y = b;
    if (x->prob > y->prob) return -1;
    if (x->prob < y->prob) return 1;
    return x->index - y->index; // ties by id: qsort is not stable, results must be
}

// Nucleus sampling: the smallest set of tokens whose probability adds up to
// topp. Tokens below (1 - topp) / (n - 1) can never be in it, so they are
// dropped before sorting.
static int sample_topp(const float* p, int n, float topp, ProbIndex* pi, float coin) {
    int n0 = 0;
    float cutoff = (1.0f - topp) / (n - 1);
    for (int i = 0; i < n; i++) if (p[i] >= cutoff) { pi[n0].index = i; pi[n0].prob = p[i]; n0++; }
    qsort(pi, n0, sizeof(ProbIndex), compare_prob_desc);
    float cum = 0.0f;
    int last = n0 - 1;
    for (int i = 0; i < n0; i++) { cum += pi[i].prob; if (cum > topp) { last = i; break; } }
    float r = coin * cum, cdf = 0.0f;
    for (int i = 0; i <= last; i++) { cdf += pi[i].prob; if (r < cdf) return pi[i].index; }
    return pi[last].index;
}

int sample(Sampler* s, float* logits) {
    if (s->temperature == 0.0f) return sample_argmax(logits, s->vocab_size);
    for (int i = 0; i < s->vocab_size; i++) logits[i] /= s->temperature;
    softmax(logits, s->vocab_size);
    float coin = random_f32(&s->rng_state);
    if (s->topp <= 0.0f || s->topp >= 1.0f) return sample_mult(logits, s->vocab_size, coin);
    return sample_topp(logits, s->vocab_size, s->topp, s->probindex, coin);
}

// ----------------------------------------------------------------------------
// Generation: the one decoding loop and the one chat loop (see run.h)

static int argmax(const float* x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++) if (x[i] > x[best]) best = i;
    return best;
}

GenResult generate(Transformer* t, const Tokenizer* tok, float* logits, int pos, const GenConfig* g) {
    GenResult r = { 0, pos, -1, GEN_MAX_NEW };
    while (r.n_sampled < g->max_new) {
        int next = g->sampler ? sample(g->sampler, logits) : argmax(logits, t->config.vocab_size);
        if (g->out_ids) g->out_ids[r.n_sampled] = next;
        r.n_sampled++;
        r.last = next;
        if (is_stop_token(&t->config, tok, next)) { r.stop = GEN_STOP_TOKEN; break; }
        if (g->on_token && g->on_token(g->ctx, tok, next)) { r.stop = GEN_FILTERED; break; }
        if (r.pos + 1 >= t->state.seq_len) { r.stop = GEN_CONTEXT_FULL; break; }
        logits = forward(t, next, r.pos++);
    }
    return r;
}

int gen_print(void* ctx, const Tokenizer* tok, int id) {
    print_token(tok, id);
    return 0;
}

int gen_append(void* ctx, const Tokenizer* tok, int id) {
    TextBuf* b = ctx;
    if (tok->is_special[id]) return 0;   // markup, never text
    int len;
    const char* piece = token_piece(tok, id, &len);
    if (b->len + len < b->cap) { memcpy(b->s + b->len, piece, len); b->len += len; b->s[b->len] = '\0'; }
    return 0;
}

void report_speed(int n_prompt, long prompt_ms, int n_gen, long gen_ms) {
    fprintf(stderr, "\nprompt: %d tokens, %.1f tok/s | generated: %d tokens, %.2f tok/s\n",
            n_prompt, prompt_ms > 0 ? n_prompt * 1000.0 / prompt_ms : 0.0,
            n_gen, gen_ms > 0 ? n_gen * 1000.0 / gen_ms : 0.0);
}

// chat_loop's state: the dialogue as text (for a filter) and in the cache
typedef struct {
    Transformer* t;
    const Tokenizer* tok;
    const ChatFilter* filter;
    ChatMessage* conv;   // (cap,) user and assistant messages, owned strings
    int n_conv, cap;
    int n_cached;        // tokens of the dialogue in the KV cache
    char* answer;        // the answer as it is generated, growing
    size_t answer_len, answer_cap;
} Chat;

static void chat_push(Chat* c, const char* role, char* content) {
    if (c->n_conv == c->cap) { c->cap = c->cap ? 2 * c->cap : 8; c->conv = xrealloc(c->conv, c->cap * sizeof(ChatMessage)); }
    c->conv[c->n_conv].role = role;
    c->conv[c->n_conv].content = content;
    c->n_conv++;
}

// Collects the answer's text, then shows the token (the filter's way, or printed)
static int chat_on_token(void* ctx, const Tokenizer* tok, int id) {
    Chat* c = ctx;
    if (!tok->is_special[id]) {
        int len;
        const char* piece = token_piece(tok, id, &len);
        if (c->answer_len + len + 1 > c->answer_cap) {
            c->answer_cap = 2 * (c->answer_len + len + 1);
            c->answer = xrealloc(c->answer, c->answer_cap);
        }
        memcpy(c->answer + c->answer_len, piece, len);
        c->answer_len += len;
        c->answer[c->answer_len] = '\0';
    }
    if (c->filter && c->filter->on_token) return c->filter->on_token(c->filter->ctx, tok, id);
    print_token(tok, id);
    return 0;
}

// Prefills ids at the end of the cached dialogue; dies when they do not fit.
static float* chat_feed(Chat* c, const int* ids, int n) {
    int ctx = c->t->state.seq_len;
    if (c->n_cached + n >= ctx)
        die("conversation of %d tokens does not fit the context of %d (raise -c)", c->n_cached + n, ctx);
    float* logits = forward_batch(c->t, ids, n, c->n_cached, NULL);
    c->n_cached += n;
    return logits;
}

// The user's message and the assistant header; returns the prompt's logits.
static float* chat_prompt(Chat* c, const char* system, const char* user, int* n_prompt) {
    ChatMessage msgs[2];
    int m = 0, first = c->n_cached == 0;
    if (first && system) msgs[m++] = (ChatMessage){ "system", system };
    msgs[m++] = (ChatMessage){ "user", user };
    // room for every token (each is at least one byte): a message too long
    // for the context is reported by chat_feed, never cut
    size_t cap = strlen(user) + (first && system ? strlen(system) : 0) + 64;
    if (cap > INT_MAX / 2) die("user message too long");
    int* ids = xmalloc(cap * sizeof(int));
    *n_prompt = chat_encode(c->tok, msgs, m, 1, first, ids, (int)cap);
    float* logits = chat_feed(c, ids, *n_prompt);
    free(ids);
    return logits;
}

// Puts a replacement answer in the cache where the generated one began.
static void chat_replace_answer(Chat* c, int answer_pos, const char* text) {
    size_t len = strlen(text);
    int* ids = xmalloc((len + 1) * sizeof(int));
    int n = encode(c->tok, text, len, 0, ids, (int)len + 1);
    c->n_cached = answer_pos;
    if (n > 0) chat_feed(c, ids, n);
    free(ids);
}

// Closes the assistant's message: its final <|eot_id|> goes into the cache
// (a sampled stop token is never fed by generate). Returns 0 when full.
static int chat_close_answer(Chat* c, int last) {
    const Config* cf = &c->t->config;
    int end = last >= 0 && is_stop_token(cf, c->tok, last) ? last : c->tok->n_eot > 0 ? c->tok->eot_ids[0] : -1;
    if (end < 0) return 1;
    if (c->n_cached + 1 >= c->t->state.seq_len) return 0;
    forward(c->t, end, c->n_cached++);
    return 1;
}

// One turn: the prompt, the answer (or the filter's), the closed message.
// Returns 0 when the context is full (or after the last turn).
static int chat_turn(Chat* c, Sampler* sampler, const char* system, const char* user, int max_new, int last_turn) {
    chat_push(c, "user", xstrdup(user));
    const ChatFilter* f = c->filter;
    char* kept = f && f->before ? f->before(f->ctx, c->conv, c->n_conv) : NULL;
    if (kept) { // refused before the model read it: the turn stays out of the cache
        printf("\n");
        chat_push(c, "assistant", kept);
        return !last_turn;
    }
    long t0 = time_in_ms();
    int n_prompt;
    float* logits = chat_prompt(c, system, user, &n_prompt);
    int answer_pos = c->n_cached;
    long t1 = time_in_ms();
    GenResult r = { 0, answer_pos, -1, GEN_MAX_NEW };
    if (!kept) {
        c->answer_len = 0;
        if (c->answer) c->answer[0] = '\0';
        GenConfig g = { max_new, sampler, chat_on_token, c, NULL };
        r = generate(c->t, c->tok, logits, answer_pos, &g);
        c->n_cached = r.pos;
        if (f && f->after) kept = f->after(f->ctx, c->conv, c->n_conv, c->answer ? c->answer : "", r.stop == GEN_FILTERED);
        if (!kept && r.stop == GEN_FILTERED) kept = xstrdup(c->answer ? c->answer : "");
    }
    long t2 = time_in_ms();
    printf("\n");
    report_speed(n_prompt, t1 - t0, r.n_sampled, t2 - t1);
    if (kept) {
        chat_replace_answer(c, answer_pos, kept);
        chat_push(c, "assistant", kept);
        r.last = -1;
    } else {
        chat_push(c, "assistant", xstrdup(c->answer ? c->answer : ""));
    }
    if (last_turn) return 0;
    if (r.stop == GEN_CONTEXT_FULL || !chat_close_answer(c, r.last)) {
        fprintf(stderr, "[context of %d positions full]\n", c->t->state.seq_len);
        return 0;
    }
    return 1;
}

void chat_loop(Transformer* t, const Tokenizer* tok, Sampler* sampler, const char* system, const char* one_turn,
               int max_new, const ChatFilter* filter) {
    if (system && !utf8_valid(system, strlen(system))) die("system prompt is not valid UTF-8");
    if (one_turn && !utf8_valid(one_turn, strlen(one_turn))) die("user message is not valid UTF-8");
    Chat c = { .t = t, .tok = tok, .filter = filter };
    if (one_turn) {
        chat_turn(&c, sampler, system, one_turn, max_new, 1);
    } else {
        char* line = NULL;   // one user turn per line of stdin, of any length
        size_t line_cap = 0;
        for (;;) {
            printf("User: ");
            fflush(stdout);
            if (getline(&line, &line_cap, stdin) < 0) break;
            line[strcspn(line, "\n")] = '\0';
            if (line[0] == '\0') continue;
            if (!utf8_valid(line, strlen(line))) { fprintf(stderr, "error: not valid UTF-8, type it again\n"); continue; }
            printf("Assistant: ");
            fflush(stdout);
            if (!chat_turn(&c, sampler, system, line, max_new, 0)) break;
        }
        free(line);
    }
    for (int i = 0; i < c.n_conv; i++) free((char*)c.conv[i].content);
    free(c.conv);
    free(c.answer);
}

// ----------------------------------------------------------------------------
// CLI (not compiled into the library build)
#ifndef RUN_LIBRARY
#include "eval.h"

static void error_usage(void) {
    fprintf(stderr,
        "Usage:   run MODEL.bin -z TOKENIZER [options]\n"
        "         run eval MODEL.bin -z TOKENIZER --sets DIR [options]  the shared harness (run eval --help)\n"
        "         run report DIR --methods A,B,... [options]   the comparison table and charts (make demo)\n"
        "         run bench MODEL.bin [--reps N] [--decode N] [--prefill 128,512] [--csv FILE]   speed (run bench --help)\n"
        "Example: run llama3.bin -z llama3.tok -i \"The capital of France is\" -n 32 -t 0\n"
        "Modes (-m):\n"
        "  generate  continue the prompt -i (default); special strings such as\n"
        "            <|eot_id|> in the prompt become special tokens\n"
        "  chat      Llama-3 chat template; -y SYSTEM optional. With -i, answer that\n"
        "            one user message and print only the answer; without, read user\n"
        "            turns from stdin (multi-turn)\n"
        "  tokenize  print the ids of -i TEXT (no BOS, no model needed)\n"
        "  logits    write float32 logits [n x vocab] of BOS + tokens(-i TEXT) to -o FILE\n"
        "  ppl       perplexity of the text file -f FILE (windows of the context length)\n"
        "  qa        QA accuracy on -f FILE (question TAB answer [TAB split] rows): greedy\n"
        "            chat answers (with -y SYSTEM if given), answer must contain the gold\n"
        "            one as whole words; per-row log to -o FILE if given\n"
        "Options:\n"
        "  -z FILE   tokenizer file (from export.py tokenizer), required\n"
        "  -i TEXT   prompt / user message / text\n"
        "  -f FILE   text file (ppl mode)\n"
        "  -o FILE   output file (logits mode)\n"
        "  -y TEXT   system prompt (chat mode)\n"
        "  -n N      max tokens to generate (default 256)\n"
        "  -t T      temperature, 0 = greedy (default 0.6)\n"
        "  -p P      top-p nucleus sampling, 1 = off (default 0.9)\n"
        "  -s SEED   random seed (default 1234: runs are reproducible)\n"
        "  -c CTX    context length = KV cache size (default min(model max, 4096))\n"
        "  --lora FILE  apply a LoRA adapter (from train_lora) unmerged; works over int8\n"
        "  -h, --help  this text\n"
        "Speed (tokens/s for prompt and generation) is printed on stderr.\n");
    exit(EXIT_FAILURE);
}

static void check_prompt_text(const char* what, const char* s) {
    if (!utf8_valid(s, strlen(s))) {
        fprintf(stderr, "error: %s is not valid UTF-8\n", what);
        exit(EXIT_FAILURE);
    }
}

static void check_fits(int n_tokens, int ctx) {
    if (n_tokens > ctx) {
        fprintf(stderr, "error: prompt of %d tokens does not fit the context of %d (raise -c)\n", n_tokens, ctx);
        exit(EXIT_FAILURE);
    }
}

static void check_vocab(const Transformer* t, const Tokenizer* tok) {
    if (tok->vocab_size != t->config.vocab_size) {
        fprintf(stderr, "error: tokenizer has %d tokens but the model has %d: wrong tokenizer for this model\n",
                tok->vocab_size, t->config.vocab_size);
        exit(EXIT_FAILURE);
    }
}

// Encodes BOS + text (special strings parsed). Returns the count; *out owns it.
static int encode_prompt(const Tokenizer* tok, const Config* c, const char* text, int** out) {
    size_t len = strlen(text);
    int cap = (int)(len + 2);
    int* ids = xmalloc((size_t)cap * sizeof(int));
    int n = 0;
    if (c->bos_id >= 0) ids[n++] = c->bos_id;
    n += encode(tok, text, len, 1, ids + n, cap - n);
    *out = ids;
    return n;
}

static void generate_mode(Transformer* t, const Tokenizer* tok, Sampler* sampler, const char* prompt, int steps) {
    check_prompt_text("prompt", prompt);
    int* ids;
    int n = encode_prompt(tok, &t->config, prompt, &ids);
    check_fits(n, t->state.seq_len);
    for (int i = 0; i < n; i++) print_token(tok, ids[i]);
    long t0 = time_in_ms();
    float* logits = forward_batch(t, ids, n, 0, NULL);
    long t1 = time_in_ms();
    GenConfig g = { steps, sampler, gen_print, NULL, NULL };
    GenResult r = generate(t, tok, logits, n, &g);
    long t2 = time_in_ms();
    if (r.stop == GEN_CONTEXT_FULL) fprintf(stderr, "\n[context of %d positions full]\n", t->state.seq_len);
    printf("\n");
    report_speed(n, t1 - t0, r.n_sampled, t2 - t1);
    free(ids);
}

static void tokenize_mode(const Tokenizer* tok, const char* text) {
    check_prompt_text("text", text);
    size_t len = strlen(text);
    int* ids = xmalloc((len + 1) * sizeof(int));
    int n = encode(tok, text, len, 1, ids, (int)len + 1);
    for (int i = 0; i < n; i++) printf(i ? " %d" : "%d", ids[i]);
    printf("\n");
    free(ids);
}

static void logits_mode(Transformer* t, const Tokenizer* tok, const char* text, const char* out_path) {
    check_prompt_text("text", text);
    int* ids;
    int n = encode_prompt(tok, &t->config, text, &ids);
    check_fits(n, t->state.seq_len);
    size_t V = t->config.vocab_size;
    float* all = xmalloc((size_t)n * V * sizeof(float));
    long t0 = time_in_ms();
    forward_batch(t, ids, n, 0, all);
    long t1 = time_in_ms();
    if (write_file_atomic(out_path, all, (size_t)n * V * sizeof(float)) != 0) {
        fprintf(stderr, "error: cannot write %s: %s\n", out_path, strerror(errno));
        exit(EXIT_FAILURE);
    }
    fprintf(stderr, "wrote logits [%d x %zu] to %s (%.1f tok/s)\n", n, V, out_path, t1 > t0 ? n * 1000.0 / (t1 - t0) : 0.0);
    free(all);
    free(ids);
}

// Perplexity: the text is cut into windows of the context length, each
// starting with BOS; every token after BOS is predicted from its prefix.
static void ppl_mode(Transformer* t, const Tokenizer* tok, const char* path) {
    size_t len;
    char* text = read_file(path, &len);
    if (!utf8_valid(text, len)) { fprintf(stderr, "error: %s is not valid UTF-8\n", path); exit(EXIT_FAILURE); }
    int* ids = xmalloc((len + 1) * sizeof(int));
    int n = encode(tok, text, len, 0, ids, (int)len + 1);
    if (n == 0) { fprintf(stderr, "error: %s has no text\n", path); exit(EXIT_FAILURE); }
    int ctx = t->state.seq_len, V = t->config.vocab_size;
    int win = ctx - 1; // tokens per window besides BOS
    int* window = xmalloc((size_t)ctx * sizeof(int));
    float* all = xmalloc((size_t)t->state.batch_cap * V * sizeof(float));
    double nll = 0.0;
    long count = 0, t0 = time_in_ms();
    for (int start = 0; start < n; start += win) {
        int m = n - start < win ? n - start : win;
        window[0] = t->config.bos_id >= 0 ? t->config.bos_id : ids[0];
        memcpy(window + 1, ids + start, m * sizeof(int));
        // chunk by batch_cap so the logits buffer stays small
        for (int p = 0; p < m; p += t->state.batch_cap) {
            int k = m - p < t->state.batch_cap ? m - p : t->state.batch_cap;
            forward_batch(t, window + p, k, p, all);
            for (int i = 0; i < k; i++) {
                nll += cross_entropy(all + (size_t)i * V, V, window[p + i + 1]);
                count++;
            }
        }
        fprintf(stderr, "\rppl: %ld/%d tokens", count, n);
    }
    long t1 = time_in_ms();
    fprintf(stderr, "\n");
    printf("perplexity %.4f over %ld tokens\n", exp(nll / count), count);
    fprintf(stderr, "%.1f tok/s\n", t1 > t0 ? count * 1000.0 / (t1 - t0) : 0.0);
    free(all); free(window); free(ids); free(text);
}

static void qa_mode(Transformer* t, Tokenizer* tok, const char* path, const char* system, int max_new,
                    const char* log_path) {
    GreedyAnswerer g = {t, tok, max_new, system};
    FILE* log = NULL;
    if (log_path && !(log = fopen(log_path, "w"))) {
        fprintf(stderr, "error: cannot write %s: %s\n", log_path, strerror(errno));
        exit(EXIT_FAILURE);
    }
    QAResult r;
    eval_qa(path, answer_greedy, &g, 0, log, &r);
    if (log) fclose(log);
    for (int i = 0; i < r.n_splits; i++)
        printf("%-8s %5.1f%% (%d/%d)\n", r.splits[i].name, 100.0 * r.splits[i].correct / r.splits[i].total,
               r.splits[i].correct, r.splits[i].total);
    printf("%-8s %5.1f%% (%d/%d)\n", "total", 100.0 * qa_accuracy(&r, NULL), r.correct, r.total);
    fprintf(stderr, "%.1f s, %.1f prompt tokens per question\n", r.seconds, r.total ? (double)r.prompt_tokens / r.total : 0.0);
}

// ----------------------------------------------------------------------------
// bench: how fast the engine runs one model file, next to the limits of the
// machine it runs on (`make bench` calls it; tests/bench.sh collects results)
//
//   ./run bench MODEL.bin [--reps N] [--decode N] [--prefill 128,512] [--csv FILE]
//
// No tokenizer: fixed pseudo-random token ids go through the engine's own
// forward() (decode) and forward_batch() (prompt), nothing is reimplemented.
// Beside them, in the same process and with the same OpenMP threads, the
// ceilings those paths are held against:
//   read bandwidth  decode streams every weight once per token, so
//                   tok/s <= bandwidth / bytes read per token (the roofline)
//   GEMM rate       a prompt is one matrix product per projection per chunk
//                   of batch_cap positions: gemm() for fp32 (sgemm_prefill),
//                   matmul_q8 for int8 (q8gemm_prefill), so it cannot beat it
// Every value is the median of --reps timed repetitions after an untimed
// warm-up; each CSV row also has the min and max. decode_roofline is the
// median of per-repetition fractions (each decode run next to its own
// bandwidth pass), the prefill fractions ratios of medians. Nothing here
// asserts a speed: tests only check the format.
#include <sys/resource.h>

#define BENCH_MAX_PREFILL 8
#define BENCH_MAX_ROWS 64

typedef struct {
    char metric[48];
    char text[256];        // a text row's value (the engine line), else ""
    double value;          // median, or a derived value / a count
    double min, max;       // over the repetitions; NAN for derived rows
    int n;                 // repetitions behind the value, 0 for derived rows
    const char* unit;
} BenchRow;

typedef struct {
    BenchRow rows[BENCH_MAX_ROWS];
    int n;
} BenchTable;

static volatile float bench_sink;   // keeps the bandwidth loops from being optimised away

static double bench_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int bench_cmp_double(const void* a, const void* b) {
    double x = *(const double*)a, y = *(const double*)b;
    return (x > y) - (x < y);
}

static BenchRow* bench_row(BenchTable* b, const char* metric, const char* unit) {
    if (b->n == BENCH_MAX_ROWS) die("bench: too many rows");
    BenchRow* r = &b->rows[b->n++];
    memset(r, 0, sizeof(*r));
    snprintf(r->metric, sizeof(r->metric), "%s", metric);
    r->unit = unit;
    r->min = r->max = NAN;
    return r;
}

// A measured row: the median of v[0..n) (the mean of the middle two when n
// is even), with min and max. Sorts v. Returns the median.
static double bench_samples(BenchTable* b, const char* metric, const char* unit, double* v, int n) {
    qsort(v, n, sizeof(double), bench_cmp_double);
    BenchRow* r = bench_row(b, metric, unit);
    r->value = n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
    r->min = v[0];
    r->max = v[n - 1];
    r->n = n;
    fprintf(stderr, "bench: %-24s %10.4g %-8s (median of %d, min %.4g, max %.4g)\n", metric, r->value, unit, n,
            r->min, r->max);
    return r->value;
}

static void bench_value(BenchTable* b, const char* metric, const char* unit, double value) {
    bench_row(b, metric, unit)->value = value;
    fprintf(stderr, "bench: %-24s %10.4g %s\n", metric, value, unit);
}

// Memory bandwidth, STREAM style, over arrays much larger than the caches.
// "read" sums one array (4 bytes per element): one pass of it before each
// decode repetition (bench_main), so that each decode rate is compared with
// the bandwidth of the same moment (this machine drifts by tens of percent
// within a minute). "triad" computes a = b + s*c (12 bytes per element:
// STREAM's count, which leaves out the write-allocate read of a). Pages are
// first touched by the same static schedule that later reads them.
static float* bench_array(size_t n, float value) {
    float* a = xmalloc(n * sizeof(float));
    #pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) a[i] = value;
    return a;
}

// One read pass over x (n a multiple of 64), GB/s
static double bench_read_pass(const float* x, size_t n) {
    float sum = 0.0f;
    double t0 = bench_now();
    #pragma omp parallel reduction(+:sum)
    {
        // 64 partial sums: several independent vector registers, so the
        // adds overlap and the loop is bound by memory, not by the latency
        // of one add chain
        float part[64] = {0};
        #pragma omp for schedule(static)
        for (size_t blk = 0; blk < n / 64; blk++)
            for (int j = 0; j < 64; j++) part[j] += x[blk * 64 + j];
        for (int j = 0; j < 64; j++) sum += part[j];
    }
    double t1 = bench_now();
    bench_sink = sum;
    return 4.0 * n / (t1 - t0) / 1e9;
}

static void bench_triad(BenchTable* b, int reps, size_t mib) {
    size_t n = mib * 1024 * 1024 / sizeof(float);
    float* x = bench_array(n, 1.0f);
    float* y = bench_array(n, 2.0f);
    float* z = bench_array(n, 0.0f);
    double* tr = xmalloc((size_t)reps * sizeof(double));
    for (int r = -1; r < reps; r++) {   // r = -1: the warm-up
        double t1 = bench_now();
        #pragma omp parallel for simd schedule(static)
        for (size_t i = 0; i < n; i++) z[i] = x[i] + 3.0f * y[i];
        double t2 = bench_now();
        bench_sink = z[n / 2];
        if (r >= 0) tr[r] = 12.0 * n / (t2 - t1) / 1e9;
    }
    bench_samples(b, "triad_bw", "GB/s", tr, reps);
    free(tr); free(x); free(y); free(z);
}

static void bench_fill(float* p, size_t n, uint64_t seed) {
    for (size_t i = 0; i < n; i++) p[i] = (float)((splitmix64(&seed) >> 40) / 8388608.0 - 1.0); // [-1, 1)
}

// The seven projections of one layer as (rows, cols) of W, in matmul's order
// (q k v o gate up down), and the largest weight, input row and output row.
static void bench_shapes(const Config* c, int shapes[7][2], size_t* w_max, size_t* in_max, size_t* out_max) {
    int dim = c->dim, hid = c->hidden_dim, q_dim = c->n_heads * c->head_dim, kv_dim = c->n_kv_heads * c->head_dim;
    int s7[7][2] = {{q_dim, dim}, {kv_dim, dim}, {kv_dim, dim}, {dim, q_dim}, {hid, dim}, {hid, dim}, {dim, hid}};
    *w_max = *in_max = *out_max = 0;
    for (int s = 0; s < 7; s++) {
        size_t rows = s7[s][0], cols = s7[s][1];
        shapes[s][0] = s7[s][0];
        shapes[s][1] = s7[s][1];
        if (rows * cols > *w_max) *w_max = rows * cols;
        if (cols > *in_max) *in_max = cols;
        if (rows > *out_max) *out_max = rows;
    }
}

// sgemm through the engine's gemm() on random data: a square size^3
// product, and the seven projections of one layer for one prompt chunk of
// `chunk` positions, each called as matmul() calls it (y = x W^T), so with
// the shapes and the transpose a prompt really uses. GFLOP/s = 2 M N K / s.
static double bench_gemm(BenchTable* b, const Config* c, int reps, int size, int chunk) {
    int shapes[7][2];
    size_t w_max, in_max, out_max;
    bench_shapes(c, shapes, &w_max, &in_max, &out_max);
    size_t sq = (size_t)size * size;
    float* w = xmalloc((w_max > sq ? w_max : sq) * sizeof(float));
    float* x = xmalloc((chunk * in_max > sq ? chunk * in_max : sq) * sizeof(float));
    float* y = xmalloc((chunk * out_max > sq ? chunk * out_max : sq) * sizeof(float));
    bench_fill(w, w_max > sq ? w_max : sq, 1);
    bench_fill(x, chunk * in_max > sq ? chunk * in_max : sq, 2);
    double* v = xmalloc((size_t)reps * sizeof(double));

    for (int r = -1; r < reps; r++) {
        double t0 = bench_now();
        gemm(0, 0, size, size, size, 1.0f, x, size, w, size, 0.0f, y, size);
        if (r >= 0) v[r] = 2.0 * size * size * size / (bench_now() - t0) / 1e9;
    }
    char name[48];
    snprintf(name, sizeof(name), "sgemm_%d", size);
    bench_samples(b, name, "GFLOP/s", v, reps);

    double flops = 0.0;
    for (int s = 0; s < 7; s++) flops += 2.0 * chunk * shapes[s][0] * shapes[s][1];
    for (int r = -1; r < reps; r++) {
        double t0 = bench_now();
        for (int s = 0; s < 7; s++)
            gemm(0, 1, chunk, shapes[s][0], shapes[s][1], 1.0f, x, shapes[s][1], w, shapes[s][1], 0.0f, y, shapes[s][0]);
        if (r >= 0) v[r] = flops / (bench_now() - t0) / 1e9;
    }
    double prefill = bench_samples(b, "sgemm_prefill", "GFLOP/s", v, reps);
    free(v); free(w); free(x); free(y);
    return prefill;
}

// The int8 counterpart of sgemm_prefill, for Q8_0 models: matmul_q8 (the
// GEMM an int8 prompt runs) on random Q8_0 weights of the seven projection
// shapes, one chunk of rows. GOP/s = 2 M N K / s (multiply-adds count twice,
// as for sgemm).
static double bench_q8gemm(BenchTable* b, const Config* c, int reps, int chunk, Q8Scratch* q8) {
    int gs = c->group_size, shapes[7][2];
    size_t w_max, in_max, out_max;
    bench_shapes(c, shapes, &w_max, &in_max, &out_max);
    int8_t* wq = xmalloc(w_max);
    float* ws = xmalloc(w_max / gs * sizeof(float));
    float* x = xmalloc(chunk * in_max * sizeof(float));
    float* y = xmalloc(chunk * out_max * sizeof(float));
    uint64_t seed = 3;
    for (size_t i = 0; i < w_max; i++) wq[i] = (int8_t)((int)(splitmix64(&seed) % 255) - 127);
    for (size_t i = 0; i < w_max / gs; i++) ws[i] = 0.001f;
    bench_fill(x, chunk * in_max, 4);
    double* v = xmalloc((size_t)reps * sizeof(double));
    double ops = 0.0;
    for (int s = 0; s < 7; s++) ops += 2.0 * chunk * shapes[s][0] * shapes[s][1];
    for (int r = -1; r < reps; r++) {
        double t0 = bench_now();
        for (int s = 0; s < 7; s++) {
            Matrix w = {NULL, wq, ws, shapes[s][0], shapes[s][1], gs};
            matmul_q8(y, x, &w, chunk, 0, 0, q8);
        }
        if (r >= 0) v[r] = ops / (bench_now() - t0) / 1e9;
    }
    double rate = bench_samples(b, "q8gemm_prefill", "GOP/s", v, reps);
    free(v); free(wq); free(ws); free(x); free(y);
    return rate;
}

// Parameters of the seven projections of all layers: what decode streams
// and what a prompt multiplies every position by.
static double bench_layer_params(const Config* c) {
    double dim = c->dim, hid = c->hidden_dim, q_dim = (double)c->n_heads * c->head_dim;
    double kv_dim = (double)c->n_kv_heads * c->head_dim;
    return c->n_layers * (2.0 * q_dim * dim + 2.0 * kv_dim * dim + 3.0 * hid * dim);
}

// Bytes one decode step reads, averaged over positions 0..n_decode-1: every
// projection of every layer and the classifier as stored in the file (fp32,
// or int8 plus the fp32 scales; matrix_bytes above), the norm weights, one
// embedding row, and the KV cache of the positions so far (2 x layers x
// kv_dim x 4 bytes per position).
static double bench_decode_bytes(const Config* c, int n_decode) {
    size_t L = c->n_layers, dim = c->dim, hid = c->hidden_dim;
    size_t q_dim = (size_t)c->n_heads * c->head_dim, kv_dim = (size_t)c->n_kv_heads * c->head_dim;
    double bytes = (double)matrix_bytes(c, L, q_dim, dim) + 2.0 * matrix_bytes(c, L, kv_dim, dim) +
                   matrix_bytes(c, L, dim, q_dim) + 2.0 * matrix_bytes(c, L, hid, dim) + matrix_bytes(c, L, dim, hid);
    bytes += matrix_bytes(c, 1, c->vocab_size, dim);                       // classifier
    bytes += (2.0 * L + 1) * dim * sizeof(float);                         // norms
    bytes += (double)matrix_bytes(c, 1, 1, dim);                           // one embedding row
    bytes += 2.0 * L * kv_dim * sizeof(float) * (n_decode + 1) / 2.0;      // KV cache, mean over positions
    return bytes;
}

// FLOPs of one prompt of n tokens from position 0, as forward_batch does it:
// 2 x layer params per token (the projections), the attention (q.k and the
// weighted sum of v, 2 x head_dim each, over pos+1 positions per head), and
// the classifier once (only the last position's logits are computed).
static double bench_prefill_flops(const Config* c, int n) {
    double q_dim = (double)c->n_heads * c->head_dim;
    double attention = 4.0 * q_dim * c->n_layers * ((double)n * (n + 1) / 2.0);
    return 2.0 * bench_layer_params(c) * n + attention + 2.0 * (double)c->vocab_size * c->dim;
}

static void bench_write_text(FILE* f, const char* s) {
    if (!strpbrk(s, ",\"\n\r")) { fputs(s, f); return; }
    fputc('"', f);   // RFC 4180: quoted, quotes doubled
    for (; *s; s++) { if (*s == '"') fputc('"', f); fputc(*s, f); }
    fputc('"', f);
}

static void bench_write_number(FILE* f, double v) {
    if (isnan(v)) return;   // an empty field
    if (v == floor(v) && fabs(v) < 1e15) fprintf(f, "%.0f", v);
    else fprintf(f, "%.6g", v);
}

// One CSV: metric,weights,model,value,unit,n,min,max (n, min, max empty on
// derived rows).
static void bench_write_csv(FILE* f, const BenchTable* b, const char* weights, const char* model) {
    fprintf(f, "metric,weights,model,value,unit,n,min,max\n");
    for (int i = 0; i < b->n; i++) {
        const BenchRow* r = &b->rows[i];
        fprintf(f, "%s,%s,", r->metric, weights);
        bench_write_text(f, model);
        fputc(',', f);
        if (r->text[0]) bench_write_text(f, r->text);
        else bench_write_number(f, r->value);
        fprintf(f, ",%s,", r->unit);
        if (r->n > 0) fprintf(f, "%d", r->n);
        fputc(',', f);
        bench_write_number(f, r->min);
        fputc(',', f);
        bench_write_number(f, r->max);
        fputc('\n', f);
    }
}

static void bench_usage(void) {
    fprintf(stderr,
        "Usage:   run bench MODEL.bin [options]   engine speed on one model file, CSV on stdout\n"
        "Example: run bench build/bench/1b-32k.q8.bin --reps 5 --csv q8.csv\n"
        "Feeds fixed pseudo-random token ids (no tokenizer) through the engine's forward()\n"
        "and forward_batch(), and measures, in the same process and threads, the memory\n"
        "read bandwidth and the sgemm rate they are compared with. Every value is the\n"
        "median of --reps timed repetitions after an untimed warm-up.\n"
        "Options:\n"
        "  --reps N         repetitions of every measurement (default 5)\n"
        "  --decode N       tokens per decode repetition, positions 0..N-1 (default 32)\n"
        "  --prefill LIST   comma-separated prompt lengths, from position 0 (default 128,512)\n"
        "  --bw-mib N       size of each of the 3 bandwidth arrays in MiB (default 256:\n"
        "                   much larger than the caches)\n"
        "  --gemm N         size of the square sgemm (default 2048)\n"
        "  --csv FILE       also write the CSV to FILE\n"
        "  -h, --help       this text\n"
        "CSV columns: metric,weights,model,value,unit,n,min,max. Metrics:\n"
        "  decode, prefill_N (tok/s); read_bw, triad_bw (GB/s); sgemm_SIZE, and\n"
        "  sgemm_prefill (one layer's 7 projections for one chunk of batch_cap rows)\n"
        "  (GFLOP/s); q8gemm_prefill (int8 models: the same shapes through the int8\n"
        "  GEMM, GOP/s); decode_bytes_per_token (weights as stored + norms + KV cache);\n"
        "  decode_roofline = decode tok/s x bytes per token / read_bw, per repetition\n"
        "  (each decode repetition follows one read_bw pass), median;\n"
        "  prefill_N_gflops = (2 x layer params x N + attention + classifier once) / s;\n"
        "  prefill_N_gemm_frac = prefill_N_gflops / sgemm_prefill (fp32) or\n"
        "  q8gemm_prefill (int8); peak_rss (MiB, after the prompts, before the\n"
        "  bandwidth arrays); params; threads; engine.\n");
    exit(EXIT_FAILURE);
}

static int bench_main(int argc, char** argv) {
    const char* model_path = NULL;
    const char* csv_path = NULL;
    int reps = 5, n_decode = 32, bw_mib = 256, gemm_size = 2048;
    int prefill[BENCH_MAX_PREFILL] = {128, 512}, n_prefill = 2;
    for (int i = 1; i < argc; i++) {
        const char* a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) bench_usage();
        if (a[0] != '-') {
            if (model_path) die("bench: unexpected argument '%s' (one model file; see run bench --help)", a);
            model_path = a;
            continue;
        }
        if (i + 1 >= argc) die("%s needs a value (see run bench --help)", a);
        const char* v = argv[++i];
        if (!strcmp(a, "--reps")) reps = parse_int_arg(a, v);
        else if (!strcmp(a, "--decode")) n_decode = parse_int_arg(a, v);
        else if (!strcmp(a, "--bw-mib")) bw_mib = parse_int_arg(a, v);
        else if (!strcmp(a, "--gemm")) gemm_size = parse_int_arg(a, v);
        else if (!strcmp(a, "--csv")) csv_path = v;
        else if (!strcmp(a, "--prefill")) {
            n_prefill = 0;
            const char* p = v;
            while (1) {
                char num[16];
                size_t len = strcspn(p, ",");
                if (n_prefill == BENCH_MAX_PREFILL) die("--prefill takes at most %d lengths", BENCH_MAX_PREFILL);
                if (len == 0 || len >= sizeof(num)) die("--prefill expects lengths such as 128,512, got '%s'", v);
                memcpy(num, p, len);
                num[len] = '\0';
                prefill[n_prefill] = parse_int_arg("--prefill", num);
                if (prefill[n_prefill] < 1) die("--prefill lengths must be >= 1, got '%s'", v);
                n_prefill++;
                if (p[len] == '\0') break;
                p += len + 1;
            }
        } else die("unknown bench option %s (see run bench --help)", a);
    }
    if (!model_path) die("bench needs a model file (run bench MODEL.bin; see run bench --help)");
    if (reps < 1 || reps > 10000) die("--reps must be in [1, 10000]");
    if (n_decode < 1) die("--decode must be >= 1");
    if (bw_mib < 1 || bw_mib > 65536) die("--bw-mib must be in [1, 65536]");
    if (gemm_size < 1 || gemm_size > 16384) die("--gemm must be in [1, 16384]");
    if (csv_path) {
        // fail now, not after minutes of measuring (written via FILE.tmp)
        char tmp[4096];
        snprintf(tmp, sizeof(tmp), "%s.tmp", csv_path);
        FILE* f = fopen(tmp, "w");
        if (!f) die("cannot write %s: %s", tmp, strerror(errno));
        fclose(f);
        remove(tmp);
    }

    // the KV cache holds the longest run; build_transformer refuses more
    // than the model's maximum with a one-line error
    int ctx = n_decode;
    for (int i = 0; i < n_prefill; i++) if (prefill[i] > ctx) ctx = prefill[i];
    Transformer t;
    build_transformer(&t, model_path, ctx);
    const Config* c = &t.config;
    const char* weights = c->weight_type == WEIGHT_Q8 ? "int8" : "fp32";
    const char* model = strrchr(model_path, '/') ? strrchr(model_path, '/') + 1 : model_path;
    double params = (double)c->vocab_size * c->dim * (c->tied_embeddings ? 1 : 2) + bench_layer_params(c) +
                    (2.0 * c->n_layers + 1) * c->dim;
    fprintf(stderr, "bench: %s: %s, %.3gB params, dim %d, %d layers, vocab %d; %s\n", model, weights, params / 1e9,
            c->dim, c->n_layers, c->vocab_size, engine_build_info());

    BenchTable b;
    b.n = 0;
    snprintf(bench_row(&b, "engine", "")->text, sizeof(b.rows[0].text), "%s", engine_build_info());
    bench_value(&b, "threads", "", engine_threads());
    bench_value(&b, "params", "", params);

    int n_tok = ctx;
    int* tokens = xmalloc((size_t)n_tok * sizeof(int));
    uint64_t seed = 0x5eed;
    for (int i = 0; i < n_tok; i++) tokens[i] = (int)(splitmix64(&seed) % (uint64_t)c->vocab_size);
    double* v = xmalloc((size_t)reps * sizeof(double));

    // the weights into the process, and a first prompt warms its paths
    for (int i = 0; i < (n_decode < 2 ? n_decode : 2); i++) forward(&t, tokens[i], i);
    forward_batch(&t, tokens, prefill[0], 0, NULL);

    // prompts: the whole prompt in one forward_batch call (chunks of
    // batch_cap positions inside)
    double prefill_tok_s[BENCH_MAX_PREFILL];
    for (int k = 0; k < n_prefill; k++) {
        for (int r = 0; r < reps; r++) {
            double t0 = bench_now();
            forward_batch(&t, tokens, prefill[k], 0, NULL);
            v[r] = prefill[k] / (bench_now() - t0);
        }
        char name[48];
        snprintf(name, sizeof(name), "prefill_%d", prefill[k]);
        prefill_tok_s[k] = bench_samples(&b, name, "tok/s", v, reps);
    }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    bench_value(&b, "peak_rss", "MiB", round(ru.ru_maxrss / 1024.0));   // ru_maxrss is in KiB on Linux

    // decode: one token at a time through the KV cache, each repetition
    // right after one read pass over the bandwidth array; the roofline
    // fraction is taken per repetition (tok/s x bytes per token / the
    // bandwidth just measured), and its median reported
    double bytes = bench_decode_bytes(c, n_decode);
    size_t bw_n = (size_t)bw_mib * 1024 * 1024 / sizeof(float);
    float* bw_array = bench_array(bw_n, 1.0f);
    double* bw = xmalloc((size_t)reps * sizeof(double));
    double* frac = xmalloc((size_t)reps * sizeof(double));
    bench_read_pass(bw_array, bw_n); // warm-up
    for (int r = 0; r < reps; r++) {
        bw[r] = bench_read_pass(bw_array, bw_n);
        double t0 = bench_now();
        for (int i = 0; i < n_decode; i++) forward(&t, tokens[i], i);
        v[r] = n_decode / (bench_now() - t0);
        frac[r] = v[r] * bytes / (bw[r] * 1e9);
    }
    free(bw_array);
    bench_samples(&b, "decode", "tok/s", v, reps);
    bench_value(&b, "decode_bytes_per_token", "B", round(bytes));
    bench_samples(&b, "read_bw", "GB/s", bw, reps);
    bench_samples(&b, "decode_roofline", "fraction", frac, reps);
    free(bw); free(frac);

    // the other ceilings: triad bandwidth, sgemm, and for int8 the int8 GEMM
    bench_triad(&b, reps, (size_t)bw_mib);
    double sgemm_prefill = bench_gemm(&b, c, reps, gemm_size, t.state.batch_cap);
    double gemm_ceiling = sgemm_prefill;
    if (c->weight_type == WEIGHT_Q8) gemm_ceiling = bench_q8gemm(&b, c, reps, t.state.batch_cap, &t.state.q8);
    for (int k = 0; k < n_prefill; k++) {
        char name[48];
        double gflops = prefill_tok_s[k] * bench_prefill_flops(c, prefill[k]) / prefill[k] / 1e9;
        snprintf(name, sizeof(name), "prefill_%d_gflops", prefill[k]);
        bench_value(&b, name, "GFLOP/s", gflops);
        snprintf(name, sizeof(name), "prefill_%d_gemm_frac", prefill[k]);
        bench_value(&b, name, "fraction", gflops / gemm_ceiling);
    }

    char* text = NULL;
    size_t text_len = 0;
    FILE* mem = open_memstream(&text, &text_len);
    if (!mem) die("bench: out of memory");
    bench_write_csv(mem, &b, weights, model);
    fclose(mem);
    fwrite(text, 1, text_len, stdout);
    if (csv_path && write_file_atomic(csv_path, text, text_len) != 0) die("cannot write %s: %s", csv_path, strerror(errno));
    free(text);
    free(v);
    free(tokens);
    free_transformer(&t);
    return 0;
}

int main(int argc, char** argv) {
    const char* model_path = NULL;
    const char* tok_path = NULL;
    const char* prompt = NULL;
    const char* system = NULL;
    const char* in_file = NULL;
    const char* out_file = NULL;
    const char* mode = "generate";
    const char* lora_path = NULL;
    float temperature = 0.6f, topp = 0.9f;
    int steps = 256, ctx = 0;
    unsigned long long seed = 1234;

    // the evaluation harness (eval.c) on the plain model, or with --lora
    if (argc >= 2 && !strcmp(argv[1], "eval")) return eval_main(argc - 1, argv + 1, NULL);
    // the comparison of every method's results (make demo)
    if (argc >= 2 && !strcmp(argv[1], "report")) return eval_report_main(argc - 1, argv + 1);
    // the speed benchmark of one model file (make bench)
    if (argc >= 2 && !strcmp(argv[1], "bench")) return bench_main(argc - 1, argv + 1);

    // poor man's argparse: the model path first (unless tokenizing), then flag/value pairs
    int i = 1;
    if (argc >= 2 && argv[1][0] != '-') { model_path = argv[1]; i = 2; }
    for (; i < argc; i += 2) {
        const char* flag = argv[i];
        if (!strcmp(flag, "-h") || !strcmp(flag, "--help")) error_usage();
        if (i + 1 >= argc) { fprintf(stderr, "error: %s needs a value (see --help)\n", flag); exit(EXIT_FAILURE); }
        const char* val = argv[i + 1];
        if (!strcmp(flag, "-z")) tok_path = val;
        else if (!strcmp(flag, "-i")) prompt = val;
        else if (!strcmp(flag, "-y")) system = val;
        else if (!strcmp(flag, "-f")) in_file = val;
        else if (!strcmp(flag, "-o")) out_file = val;
        else if (!strcmp(flag, "-m")) mode = val;
        else if (!strcmp(flag, "-n")) steps = parse_int_arg(flag, val);
        else if (!strcmp(flag, "-c")) ctx = parse_int_arg(flag, val);
        else if (!strcmp(flag, "-t")) temperature = parse_float_arg(flag, val);
        else if (!strcmp(flag, "-p")) topp = parse_float_arg(flag, val);
        else if (!strcmp(flag, "-s")) seed = (unsigned long long)parse_int_arg(flag, val);
        else if (!strcmp(flag, "--lora")) lora_path = val;
        else { fprintf(stderr, "error: unknown option %s (see --help)\n", flag); exit(EXIT_FAILURE); }
    }
    if (!tok_path) { fprintf(stderr, "error: a tokenizer is required (-z FILE; see --help)\n"); exit(EXIT_FAILURE); }
    if (temperature < 0.0f) { fprintf(stderr, "error: -t must be >= 0\n"); exit(EXIT_FAILURE); }
    if (topp <= 0.0f || topp > 1.0f) { fprintf(stderr, "error: -p must be in (0, 1]\n"); exit(EXIT_FAILURE); }
    if (steps < 0) { fprintf(stderr, "error: -n must be >= 0\n"); exit(EXIT_FAILURE); }
    if (ctx < 0) { fprintf(stderr, "error: -c must be > 0\n"); exit(EXIT_FAILURE); }

    Tokenizer tok;
    build_tokenizer(&tok, tok_path);
    if (!strcmp(mode, "tokenize")) {
        if (!prompt) { fprintf(stderr, "error: tokenize needs -i TEXT\n"); exit(EXIT_FAILURE); }
        tokenize_mode(&tok, prompt);
        free_tokenizer(&tok);
        return 0;
    }
    if (strcmp(mode, "generate") && strcmp(mode, "chat") && strcmp(mode, "logits") && strcmp(mode, "ppl") &&
        strcmp(mode, "qa")) {
        fprintf(stderr, "error: unknown mode '%s' (generate, chat, tokenize, logits, ppl, qa)\n", mode);
        exit(EXIT_FAILURE);
    }
    if (!model_path) { fprintf(stderr, "error: mode %s needs a model file as the first argument\n", mode); exit(EXIT_FAILURE); }

    Transformer t;
    build_transformer(&t, model_path, ctx);
    check_vocab(&t, &tok);
    if (lora_path) load_lora(&t, lora_path);
    Sampler sampler;
    build_sampler(&sampler, t.config.vocab_size, temperature, topp, seed);

    if (!strcmp(mode, "generate")) {
        if (!prompt) { fprintf(stderr, "error: generate needs a prompt (-i TEXT)\n"); exit(EXIT_FAILURE); }
        generate_mode(&t, &tok, &sampler, prompt, steps);
    } else if (!strcmp(mode, "chat")) {
        chat_loop(&t, &tok, &sampler, system, prompt, steps, NULL);
    } else if (!strcmp(mode, "logits")) {
        if (!prompt || !out_file) { fprintf(stderr, "error: logits needs -i TEXT and -o FILE\n"); exit(EXIT_FAILURE); }
        logits_mode(&t, &tok, prompt, out_file);
    } else if (!strcmp(mode, "qa")) {
        if (!in_file) { fprintf(stderr, "error: qa needs -f FILE\n"); exit(EXIT_FAILURE); }
        qa_mode(&t, &tok, in_file, system, steps, out_file);
    } else {
        if (!in_file) { fprintf(stderr, "error: ppl needs -f FILE\n"); exit(EXIT_FAILURE); }
        ppl_mode(&t, &tok, in_file);
    }
    free_sampler(&sampler);
    free_transformer(&t);
    free_tokenizer(&tok);
    return 0;
}
#endif
