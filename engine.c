// engine.c -- the unlearn.c engine: Llama-3 inference in plain C.
//
// Reads a model file written by export.py (fp32 or int8 Q8_0, mmap'd
// read-only) and runs the transformer: batched prompt processing, KV-cached
// decoding, LoRA adapters applied unmerged, sampling, the Llama-3 chat
// template, the one generation loop and the one chat loop. The file layouts
// are documented in run.h. The tokenizer is in tokenizer.c, the matrix
// kernels in kernels.c; every program (run, train_lora, sae, guard,
// test_all) links these three files.
//
// In reading order: the forward pass and the model pieces it calls, the
// model file loader, LoRA, sampling, the chat template, generation, and
// the small utilities every program uses.
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <time.h>
#include <errno.h>
#include <stdarg.h>
#include <limits.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "run.h"

// The forward pass reads top-down: each function comes before the ones it calls.
static void forward_chunk(Transformer* t, const int* tokens, int n, int pos0);
static void classify(Transformer* t, float* logits, int row0, int n);
static void attention(Transformer* t, int layer, int n, int pos0);
static void project(Transformer* t, float* y, const float* x, const Matrix* w, int layer, int target, int n);

// ----------------------------------------------------------------------------
// The forward pass

float* forward(Transformer* t, int token, int pos) {
    return forward_batch(t, &token, 1, pos, NULL);
}

float* forward_batch(Transformer* t, const int* tokens, int n, int pos0, float* all_logits) {
    Config* c = &t->config;
    RunState* s = &t->state;
    if (n <= 0 || pos0 < 0 || pos0 + n > s->seq_len)
        die("positions %d..%d do not fit the context of %d", pos0, pos0 + n - 1, s->seq_len);
    for (int i = 0; i < n; i++) {
        if (tokens[i] < 0 || tokens[i] >= c->vocab_size)
            die("token id %d out of range [0, %d)", tokens[i], c->vocab_size);
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

// Final norm and classifier for rows [row0, row0+n) of the chunk.
static void classify(Transformer* t, float* logits, int row0, int n) {
    Config* c = &t->config;
    RunState* s = &t->state;
    for (int i = 0; i < n; i++)
        rmsnorm(s->xb + (size_t)i * c->dim, s->x + (size_t)(row0 + i) * c->dim, t->weights.rms_final, c->dim, c->norm_eps);
    matmul(logits, s->xb, &t->weights.wcls, n, &s->q8);
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

// One projection: y = x W^T, plus the adapter's B A x when one is set.
static void project(Transformer* t, float* y, const float* x, const Matrix* w, int layer, int target, int n) {
    RunState* s = &t->state;
    matmul(y, x, w, n, &s->q8);
    if (t->lora) lora_apply(y, x, t->lora, layer, target, n, w->cols, w->rows, s->lora_tmp);
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
// Model file: header parsing and the tensor layout

static size_t align_up(size_t n) { return (n + TENSOR_ALIGN - 1) / TENSOR_ALIGN * TENSOR_ALIGN; }

// Bytes a matrix (possibly stacked over layers: count copies of rows x cols)
// takes in the file, padding included.
size_t matrix_bytes(const Config* c, size_t count, size_t rows, size_t cols) {
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
    if (t->fd < 0) die("cannot open model %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(t->fd, &st) != 0 || !S_ISREG(st.st_mode))
        die("model %s is not a regular file", path);
    t->file_size = (size_t)st.st_size;
    if (t->file_size < MODEL_HEADER_BYTES)
        die("model %s: file too small (%zu bytes) to be a model", path, t->file_size);
    t->data = mmap(NULL, t->file_size, PROT_READ, MAP_PRIVATE, t->fd, 0);
    if (t->data == MAP_FAILED) die("cannot mmap %s: %s", path, strerror(errno));
    char err[256];
    if (parse_model_header(t->data, t->file_size, &t->config, err, sizeof(err)) != 0)
        die("model %s: %s", path, err);
    Config* c = &t->config;
    // never size the KV cache by max_position_embeddings (131072 for
    // Llama 3.1/3.2 would be 8 GiB of cache for 1B): it is a run option
    int max_ctx = c->max_seq_len;
    if (ctx <= 0) ctx = max_ctx < 4096 ? max_ctx : 4096;
    if (ctx > max_ctx)
        die("context %d exceeds the model's maximum of %d positions", ctx, max_ctx);
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
    // then int32 fields from byte 16: what it adapts, and the model it was
    // trained for (lora_read refuses it for any other)
    int32_t fields[] = {lora->target_mask, lora->layer_begin, lora->layer_end, c->dim, c->hidden_dim, c->n_layers,
                        c->n_heads, c->n_kv_heads, c->head_dim, c->vocab_size};
    for (size_t i = 0; i < sizeof(fields) / sizeof(fields[0]); i++) put_i32(buf + 16 + 4 * i, fields[i]);
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
    if (lora_read(lora, &t->config, path, err, sizeof(err)) != 0)
        die("%s", err);
    if (t->lora) { free_lora(t->lora); free(t->lora); }
    t->lora = lora;
    free(t->state.lora_tmp);
    t->state.lora_tmp = xcalloc((size_t)t->state.batch_cap * lora->rank, sizeof(float));
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

int argmax(const float* p, int n) {
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
    if (s->temperature == 0.0f) return argmax(logits, s->vocab_size);
    for (int i = 0; i < s->vocab_size; i++) logits[i] /= s->temperature;
    softmax(logits, s->vocab_size);
    float coin = random_f32(&s->rng_state);
    if (s->topp <= 0.0f || s->topp >= 1.0f) return sample_mult(logits, s->vocab_size, coin);
    return sample_topp(logits, s->vocab_size, s->topp, s->probindex, coin);
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
    if (id < 0 || !tok->is_special[id])
        die("chat template: the tokenizer has no special token %s", s);
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
        size_t b, e;   // trim: [b, e) of content without leading/trailing Python whitespace
        utf8_strip(content, strlen(content), &b, &e);
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
    die("chat_encode: the dialogue needs more than %d tokens", max_ids);
}

// ----------------------------------------------------------------------------
// Generation: the one decoding loop and the one chat loop (see run.h)

GenResult generate(Transformer* t, const Tokenizer* tok, float* logits, int pos, const GenConfig* g) {
    GenResult r = { 0, pos, -1, GEN_MAX_NEW };
    while (r.n_sampled < g->max_new) {
        int next = g->sampler ? sample(g->sampler, logits) : argmax(logits, t->config.vocab_size);
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
    const ChatFilter* f = c->filter;
    float* logits = f && f->prefill ? f->prefill(f->ctx, c->t, ids, n, c->n_cached)
                                    : forward_batch(c->t, ids, n, c->n_cached, NULL);
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
    c->answer_len = 0;
    if (c->answer) c->answer[0] = '\0';
    GenConfig g = { max_new, sampler, chat_on_token, c };
    GenResult r = generate(c->t, c->tok, logits, answer_pos, &g);
    c->n_cached = r.pos;
    const char* answer = c->answer ? c->answer : "";
    if (f && f->after) kept = f->after(f->ctx, c->conv, c->n_conv, answer, r.stop == GEN_FILTERED);
    if (!kept && r.stop == GEN_FILTERED) kept = xstrdup(answer);
    long t2 = time_in_ms();
    printf("\n");
    report_speed(n_prompt, t1 - t0, r.n_sampled, t2 - t1);
    if (kept) {
        chat_replace_answer(c, answer_pos, kept);
        r.last = -1;
    }
    chat_push(c, "assistant", kept ? kept : xstrdup(answer));
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
// Utilities

long time_in_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void* xmalloc(size_t n) {
    void* p = malloc(n ? n : 1);
    if (!p) die("out of memory allocating %zu bytes", n);
    return p;
}

void* xcalloc(size_t n, size_t size) {
    void* p = calloc(n ? n : 1, size ? size : 1);
    if (!p) die("out of memory allocating %zu x %zu bytes", n, size);
    return p;
}

void* xrealloc(void* p, size_t n) {
    void* q = realloc(p, n ? n : 1);
    if (!q) die("out of memory allocating %zu bytes", n);
    return q;
}

char* xstrndup(const char* s, size_t n) {
    char* d = xmalloc(n + 1);
    memcpy(d, s, n);
    d[n] = '\0';
    return d;
}

char* xstrdup(const char* s) { return xstrndup(s, strlen(s)); }

void str_add(Str* b, const char* s, size_t n) {
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (b->len + n + 1 > cap) cap *= 2;
        b->s = xrealloc(b->s, cap);
        b->cap = cap;
    }
    memcpy(b->s + b->len, s, n);
    b->len += n;
    b->s[b->len] = '\0';
}

void str_cat(Str* b, const char* s) { str_add(b, s, strlen(s)); }

void str_printf(Str* b, const char* fmt, ...) {
    char tmp[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    if (n < 0) return; // an encoding error: nothing to add
    if (n < (int)sizeof(tmp)) { str_add(b, tmp, (size_t)n); return; }
    char* big = xmalloc((size_t)n + 1);
    va_start(ap, fmt);
    vsnprintf(big, (size_t)n + 1, fmt, ap);
    va_end(ap);
    str_add(b, big, (size_t)n);
    free(big);
}

char* str_take(Str* b) { if (!b->s) str_add(b, "", 0); return b->s; }

void* xcalloc_counted(size_t* bytes, int dry, size_t n, size_t size) {
    *bytes += n * size;
    return dry ? NULL : xcalloc(n, size);
}

char* read_file(const char* path, size_t* len) {
    FILE* f = fopen(path, "rb");
    if (!f) die("cannot open %s: %s", path, strerror(errno));
    if (fseek(f, 0, SEEK_END) != 0) die("cannot seek %s", path);
    long size = ftell(f);
    if (size < 0) die("cannot size %s (not a regular file?)", path);
    rewind(f);
    char* buf = xmalloc((size_t)size + 1); // +1: always NUL-terminated for text users
    if (fread(buf, 1, (size_t)size, f) != (size_t)size)
        die("cannot read %s", path);
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
