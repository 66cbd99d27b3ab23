// model_write.c -- writes model files (the format of run.h): the one writer
// behind `train_lora merge`, full-model training's saves and the harness's
// quantization attack (merge an adapter, requantize). Streamed tensor by
// tensor in file order, fp32 rows fetched in chunks from a RowSource, to a
// temporary file that is renamed into place only when complete.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <unistd.h>

#include "run.h"

// big loops run in parallel; the toy model's small ones do not
#define PAR(work) ((double)(work) > 1048576.0)

// ----------------------------------------------------------------------------
// The tensors of a model, in file order

static const char* const tensor_names[TN_COUNT] = {"token_embedding", "rms_att", "wq", "wk", "wv", "wo", "rms_ffn",
                                                   "w_gate", "w_up", "w_down", "rms_final", "wcls"};

const char* tensor_name(int tn) { return tn >= 0 && tn < TN_COUNT ? tensor_names[tn] : "?"; }

// count copies (layers) of a rows x cols tensor; norms are rows = 1
void tensor_shape(const Config* c, int tn, int* count, int* rows, int* cols) {
    int L = c->n_layers, D = c->dim, H = c->hidden_dim;
    int qd = c->n_heads * c->head_dim, kvd = c->n_kv_heads * c->head_dim;
    switch (tn) {
        case TN_EMB:       *count = 1; *rows = c->vocab_size; *cols = D; break;
        case TN_RMS_ATT:   *count = L; *rows = 1; *cols = D; break;
        case TN_WQ:        *count = L; *rows = qd; *cols = D; break;
        case TN_WK:
        case TN_WV:        *count = L; *rows = kvd; *cols = D; break;
        case TN_WO:        *count = L; *rows = D; *cols = qd; break;
        case TN_RMS_FFN:   *count = L; *rows = 1; *cols = D; break;
        case TN_GATE:
        case TN_UP:        *count = L; *rows = H; *cols = D; break;
        case TN_DOWN:      *count = L; *rows = D; *cols = H; break;
        case TN_RMS_FINAL: *count = 1; *rows = 1; *cols = D; break;
        default:           *count = c->tied_embeddings ? 0 : 1; *rows = c->vocab_size; *cols = D; break; // TN_WCLS
    }
}

int tensor_is_norm(int tn) { return tn == TN_RMS_ATT || tn == TN_RMS_FFN || tn == TN_RMS_FINAL; }

// The matrix of LoRA target t in a layer (q, k, v, o, gate, up, down).
Matrix* layer_matrix(LayerWeights* lw, int t) {
    switch (t) {
        case LORA_Q: return &lw->wq;
        case LORA_K: return &lw->wk;
        case LORA_V: return &lw->wv;
        case LORA_O: return &lw->wo;
        case LORA_GATE: return &lw->w_gate;
        case LORA_UP: return &lw->w_up;
        default: return &lw->w_down;
    }
}

// The LoRA target of a per-layer matrix tensor, or -1 (embeddings, norms)
int tensor_target(int tn) {
    switch (tn) {
        case TN_WQ: return LORA_Q;
        case TN_WK: return LORA_K;
        case TN_WV: return LORA_V;
        case TN_WO: return LORA_O;
        case TN_GATE: return LORA_GATE;
        case TN_UP: return LORA_UP;
        case TN_DOWN: return LORA_DOWN;
        default: return -1;
    }
}


// rows [r0, r0+nr) of a matrix as fp32 (Q8_0 dequantized as embed_row does)
void dequant_rows(float* out, const Matrix* w, int r0, int nr) {
    size_t cols = w->cols;
    if (w->f) { memcpy(out, w->f + (size_t)r0 * cols, (size_t)nr * cols * sizeof(float)); return; }
    int gs = w->group_size;
    #pragma omp parallel for schedule(static) if (PAR((size_t)nr * cols))
    for (int r = 0; r < nr; r++) {
        const int8_t* q = w->q + (size_t)(r0 + r) * cols;
        const float* s = w->s + (size_t)(r0 + r) * cols / gs;
        float* o = out + (size_t)r * cols;
        for (size_t j = 0; j < cols; j++) o[j] = q[j] * s[j / gs];
    }
}

// Rows [r0, r0+nr) of layer `layer` of tensor tn of a model, as fp32.
void weights_rows(const Weights* w, int tn, int layer, int r0, int nr, int dim, float* out) {
    switch (tn) {
        case TN_EMB: dequant_rows(out, &w->token_embedding, r0, nr); break;
        case TN_RMS_ATT: memcpy(out, w->layers[layer].rms_att, dim * sizeof(float)); break;
        case TN_RMS_FFN: memcpy(out, w->layers[layer].rms_ffn, dim * sizeof(float)); break;
        case TN_RMS_FINAL: memcpy(out, w->rms_final, dim * sizeof(float)); break;
        case TN_WCLS: dequant_rows(out, &w->wcls, r0, nr); break;
        default: dequant_rows(out, layer_matrix(&w->layers[layer], tensor_target(tn)), r0, nr);
    }
}

// ----------------------------------------------------------------------------
// Writing model files (run.h format), streamed: tmp file, fsync, rename

typedef struct {
    FILE* f;
    char* tmp;
    size_t off;
    int ok;
} ModelWriter;

static int mw_open(ModelWriter* mw, const char* path) {
    size_t n = strlen(path);
    mw->tmp = xmalloc(n + 5);
    memcpy(mw->tmp, path, n);
    memcpy(mw->tmp + n, ".tmp", 5);
    mw->f = fopen(mw->tmp, "wb");
    mw->off = 0;
    mw->ok = mw->f != NULL;
    return mw->ok ? 0 : -1;
}

static void mw_write(ModelWriter* mw, const void* data, size_t len) {
    if (mw->ok && fwrite(data, 1, len, mw->f) != len) mw->ok = 0;
    mw->off += len;
}

static void mw_pad(ModelWriter* mw) {
    static const char zeros[TENSOR_ALIGN] = {0};
    size_t pad = (TENSOR_ALIGN - mw->off % TENSOR_ALIGN) % TENSOR_ALIGN;
    mw_write(mw, zeros, pad);
}

static int mw_close(ModelWriter* mw, const char* path) {
    int ok = mw->ok;
    if (mw->f) {
        ok = (fflush(mw->f) == 0) && ok;
        ok = (fsync(fileno(mw->f)) == 0) && ok;
        ok = (fclose(mw->f) == 0) && ok;
    }
    if (!ok || rename(mw->tmp, path) != 0) { remove(mw->tmp); free(mw->tmp); return -1; }
    free(mw->tmp);
    return 0;
}

void pack_model_header(unsigned char* h, const Config* c) {
    memset(h, 0, MODEL_HEADER_BYTES);
    uint32_t magic = MODEL_MAGIC;
    int32_t version = MODEL_VERSION;
    memcpy(h + 0, &magic, 4);
    memcpy(h + 4, &version, 4);
    // then 4 bytes each (int32 or fp32) from byte 8, in the order parse_model_header reads them
    const void* fields[] = {&c->dim, &c->hidden_dim, &c->n_layers, &c->n_heads, &c->n_kv_heads, &c->head_dim,
                            &c->vocab_size, &c->max_seq_len, &c->rope_theta, &c->rope_scaling, &c->rope_factor,
                            &c->rope_low_freq_factor, &c->rope_high_freq_factor, &c->rope_original_max_pos,
                            &c->norm_eps, &c->tied_embeddings, &c->weight_type, &c->group_size, &c->bos_id, &c->n_eos};
    for (size_t i = 0; i < sizeof(fields) / sizeof(fields[0]); i++) memcpy(h + 8 + 4 * i, fields[i], 4);
    memcpy(h + 88, c->eos_ids, 4 * MAX_EOS);
}

// Q8_0 as export.py quantize_q8 does: scale = max|w| / 127 per group,
// q = round-half-even(w / scale), an all-zero group gets scale 0.
static void quantize_q8(int8_t* q, float* s, const float* w, size_t rows, int cols, int gs) {
    #pragma omp parallel for schedule(static) if (PAR(rows * cols))
    for (size_t r = 0; r < rows; r++) {
        for (int g = 0; g < cols / gs; g++) {
            const float* wg = w + r * cols + (size_t)g * gs;
            int8_t* qg = q + r * cols + (size_t)g * gs;
            float amax = 0.0f;
            for (int j = 0; j < gs; j++) amax = fmaxf(amax, fabsf(wg[j]));
            float scale = amax / 127.0f;
            for (int j = 0; j < gs; j++) {
                float v = scale > 0.0f ? nearbyintf(wg[j] / scale) : 0.0f;
                qg[j] = (int8_t)fmaxf(-127.0f, fminf(127.0f, v));
            }
            s[r * (cols / gs) + g] = scale;
        }
    }
}


// Writes a model file of config c (c->weight_type decides fp32 or Q8_0),
// tensor by tensor in file order, fetching fp32 rows in chunks.
int write_model_file(const char* path, const Config* c, RowSource get, void* ctx) {
    ModelWriter mw;
    if (mw_open(&mw, path) != 0) return -1;
    unsigned char header[MODEL_HEADER_BYTES];
    pack_model_header(header, c);
    mw_write(&mw, header, sizeof(header));
    int q8 = c->weight_type == WEIGHT_Q8, gs = c->group_size;
    const size_t chunk_floats = (size_t)1 << 24;
    for (int tn = 0; tn < TN_COUNT; tn++) {
        int count, rows, cols;
        tensor_shape(c, tn, &count, &rows, &cols);
        if (count == 0) continue;
        int chunk_rows = (int)(chunk_floats / cols);
        if (chunk_rows < 1) chunk_rows = 1;
        if (chunk_rows > rows) chunk_rows = rows;
        float* buf = xmalloc((size_t)chunk_rows * cols * sizeof(float));
        if (!q8 || tensor_is_norm(tn)) {
            for (int l = 0; l < count; l++)
                for (int r0 = 0; r0 < rows; r0 += chunk_rows) {
                    int nr = rows - r0 < chunk_rows ? rows - r0 : chunk_rows;
                    get(ctx, tn, l, r0, nr, buf);
                    mw_write(&mw, buf, (size_t)nr * cols * sizeof(float));
                }
            mw_pad(&mw);
        } else {
            // all layers' int8 values, then all layers' scales
            size_t n = (size_t)count * rows * cols;
            float* scales = xmalloc(n / gs * sizeof(float));
            int8_t* qbuf = xmalloc((size_t)chunk_rows * cols);
            size_t s_off = 0;
            for (int l = 0; l < count; l++)
                for (int r0 = 0; r0 < rows; r0 += chunk_rows) {
                    int nr = rows - r0 < chunk_rows ? rows - r0 : chunk_rows;
                    get(ctx, tn, l, r0, nr, buf);
                    quantize_q8(qbuf, scales + s_off, buf, nr, cols, gs);
                    s_off += (size_t)nr * cols / gs;
                    mw_write(&mw, qbuf, (size_t)nr * cols);
                }
            mw_pad(&mw);
            mw_write(&mw, scales, n / gs * sizeof(float));
            mw_pad(&mw);
            free(scales);
            free(qbuf);
        }
        free(buf);
    }
    if (mw.off != model_file_size(c)) mw.ok = 0; // never write a file the loader would refuse
    return mw_close(&mw, path);
}

// ----------------------------------------------------------------------------
// Merging an adapter into a model file (or requantizing one: no adapter)

typedef struct {
    const Weights* w;
    const Lora* lora;
    const Config* c;
} MergeSource;

static void merge_source_rows(void* ctx, int tn, int layer, int r0, int nr, float* out) {
    MergeSource* s = ctx;
    weights_rows(s->w, tn, layer, r0, nr, s->c->dim, out);
    int t = tensor_target(tn);
    if (t < 0 || !s->lora) return;
    const LoraPair* p = &s->lora->pairs[layer][t];
    if (!p->a) return;
    int in, outd, r = s->lora->rank;
    lora_dims(s->c, t, &in, &outd);
    // W[r0:r0+nr] += scale * B[r0:r0+nr] @ A
    gemm(0, 0, nr, in, r, s->lora->scale, p->b + (size_t)r0 * r, r, p->a, in, 1.0f, out, in);
}

int merge_model(const char* model_path, const char* adapter_path, const char* out_path, int weight_type) {
    Transformer t;
    build_transformer(&t, model_path, 1);
    Lora lora = {0};
    char err[512];
    if (adapter_path && lora_read(&lora, &t.config, adapter_path, err, sizeof(err)) != 0) die("%s", err);
    Config c = t.config;
    c.weight_type = weight_type;
    if (weight_type == WEIGHT_Q8) {
        c.group_size = t.config.weight_type == WEIGHT_Q8 ? t.config.group_size : 64;
        int gs = c.group_size;
        if (c.dim % gs || c.hidden_dim % gs || (c.n_heads * c.head_dim) % gs)
            die("dims are not multiples of the Q8_0 group size %d", gs);
    } else {
        c.weight_type = WEIGHT_FP32;
        c.group_size = 0;
    }
    MergeSource src = {&t.weights, adapter_path ? &lora : NULL, &t.config};
    int rc = write_model_file(out_path, &c, merge_source_rows, &src);
    if (adapter_path) free_lora(&lora);
    free_transformer(&t);
    return rc;
}
