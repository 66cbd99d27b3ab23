// train_lora.c -- machine unlearning for Llama-3 in plain C: a training
// forward that keeps its activations, a hand-written backward through the
// whole stack, LoRA (over an fp32 or int8 base) and full-weight training,
// AdamW, and the unlearning objectives (GA, GradDiff, KL, NPO, SimNPO, WHP,
// RMU) plus plain SFT for knowledge injection and relearning attacks.
//
// The style is llm.c's train_gpt2.c: explicit activation buffers with their
// shapes, one *_forward / *_backward pair per operation, a backward that
// walks the layers in reverse, gradients accumulated with +=. The forward
// is the engine's (engine.c forward_chunk) op for op, through the same kernels
// (matmul, gemm, rmsnorm, softmax, rope_rotate, embed_row), so its logits
// are bit-identical to the engine's (tested, fp32 and int8, with an adapter).
// The program around it (options, the training driver) is train_lora_cli.c.
//
// How the pieces fit:
//   - The frozen base is the mapped model file (fp32 or Q8_0). Its forward
//     goes through the engine's matmul (int8 dot products for Q8_0, exactly
//     as inference); its backward (dx = dy W) is an int8 GEMM too, against
//     W^T requantized on the fly (matmul_q8), or where the build lacks
//     AVX-512 VNNI dequantizes one tile of rows at a time into a 64 MiB
//     scratch (QLoRA style: W is never trained).
//   - LoRA: y = W x + (alpha/rank) B A drop(x), A (rank, in), B (out, rank),
//     on any of q k v o gate up down, any layer range. The trainable
//     parameters are one block laid out as the adapter file's payload.
//   - --full: every weight is trainable, one fp32 block in model-file
//     order; the base stays mapped as the frozen reference model.
//   - The reference model of KL, NPO, WHP and RMU is the base with the
//     adapter switched off: no second copy of the weights.
//   - Objectives (per micro-batch; "mean" is over counted positions, whose
//     weights come from the data: all text tokens, or only answer tokens):
//       sft       gamma * mean NLL(forget)                      (descent)
//       ga        -gamma * mean NLL(forget)
//       graddiff  -gamma * mean NLL(forget) + lambda * mean NLL(retain)
//       kl        -gamma * mean NLL(forget) + lambda * mean KL(base || model)(retain)
//       npo       gamma * mean_rows (2/beta) softplus(beta (log p(row) - log p_base(row)))
//       simnpo    gamma * mean_rows (2/beta) softplus(beta log p(row) / |row| + delta)
//       whp       gamma * mean KL(generic || model), generic = softmax of the base's
//                 logits on the translated text, optionally v_b - a ReLU(v_r - v_b)
//       rmu       gamma * mean |h_l - c u|^2 / dim (forget) + alpha * mean |h_l - h_l,base|^2 / dim
//     with log p(row) = -sum of the row's weighted NLL. npo, simnpo and whp
//     add lambda * mean NLL(retain) when --retain is given (--retain-loss).
//   - Gradient checks (test_all.c): every parameter group,
//     LoRA and --full, and every objective, against central differences of
//     an independent double-precision forward; max error ~1e-6 relative.
//   - Determinism: data order, dropout masks and init come from the seed;
//     OpenMP loops never share an accumulator, so a run and its --resume
//     from any checkpoint produce the same bits (with the same thread count).
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <time.h>
#include <errno.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "run.h"
#include "train_lora.h"
#include "data.h"

// ----------------------------------------------------------------------------
// Small utilities

// Threads only where the work pays for them: with small tensors an OpenMP
// region costs more than it saves, and idle OpenMP threads spinning next to
// OpenBLAS's own threads slow both down.
#define PAR(work) ((double)(work) > 1048576.0)

static uint64_t hash64(uint64_t x) { return splitmix64(&x); }

static float rng_uniform(uint64_t* state) { return (float)((splitmix64(state) >> 40) * (1.0 / 16777216.0)); } // [0, 1)

static float rng_normal(uint64_t* state) {
    // Box-Muller in double; u1 in (0, 1]
    double u1 = ((splitmix64(state) >> 11) + 1.0) * (1.0 / 9007199254740992.0);
    double u2 = (splitmix64(state) >> 11) * (1.0 / 9007199254740992.0);
    return (float)(sqrt(-2.0 * log(u1)) * cos(2.0 * M_PI * u2));
}

uint64_t train_dropout_seed(uint64_t seed, int layer, int target) {
    return hash64(seed ^ hash64(((uint64_t)layer << 8) | (uint64_t)target));
}

uint64_t train_step_seed(uint64_t seed, int step, int micro) {
    return hash64(seed ^ hash64(((uint64_t)step << 16) | (uint64_t)micro));
}

float* rmu_direction(int dim, uint64_t seed) {
    float* u = xmalloc(dim * sizeof(float));
    uint64_t rng = hash64(seed ^ 0x726d75ull);
    double norm = 0.0;
    for (int j = 0; j < dim; j++) { u[j] = rng_uniform(&rng); norm += (double)u[j] * u[j]; }
    for (int j = 0; j < dim; j++) u[j] = (float)(u[j] / sqrt(norm));
    return u;
}

int lora_dropout_keep(uint64_t layer_seed, size_t index, float p) {
    uint64_t h = hash64(layer_seed + index);
    return (float)((h >> 40) * (1.0 / 16777216.0)) >= p;
}

static void zero(float* p, size_t n) { memset(p, 0, n * sizeof(float)); }

#include <stdarg.h>
// ----------------------------------------------------------------------------
// The tensors of a model, in file order (run.h's TN_*), and fp32 views onto a block

static size_t tensor_numel(const Config* c, int tn) {
    int count, rows, cols;
    tensor_shape(c, tn, &count, &rows, &cols);
    return (size_t)count * rows * cols;
}

size_t train_tensor_offset(const Config* c, int tn, size_t* numel) {
    size_t off = 0;
    for (int i = 0; i < tn; i++) off += tensor_numel(c, i);
    if (numel) *numel = tensor_numel(c, tn);
    return off;
}

static size_t full_param_count(const Config* c) {
    size_t n = 0;
    for (int tn = 0; tn < TN_COUNT; tn++) n += tensor_numel(c, tn);
    return n;
}

static Matrix fp32_matrix(float* f, int rows, int cols) {
    Matrix m = {0};
    m.f = f; m.rows = rows; m.cols = cols;
    return m;
}

// Points w at the tensors of an fp32 block laid out in file order (no padding).
static void weights_view(Weights* w, const Config* c, float* block) {
    float* p = block;
    w->layers = xcalloc(c->n_layers, sizeof(LayerWeights));
    for (int tn = 0; tn < TN_COUNT; tn++) {
        int count, rows, cols;
        tensor_shape(c, tn, &count, &rows, &cols);
        for (int l = 0; l < count; l++) {
            float* t = p + (size_t)l * rows * cols;
            switch (tn) {
                case TN_EMB: w->token_embedding = fp32_matrix(t, rows, cols); break;
                case TN_RMS_ATT: w->layers[l].rms_att = t; break;
                case TN_RMS_FFN: w->layers[l].rms_ffn = t; break;
                case TN_RMS_FINAL: w->rms_final = t; break;
                case TN_WCLS: w->wcls = fp32_matrix(t, rows, cols); break;
                default: *layer_matrix(&w->layers[l], tensor_target(tn)) = fp32_matrix(t, rows, cols);
            }
        }
        p += (size_t)count * rows * cols;
    }
    if (c->tied_embeddings) w->wcls = w->token_embedding; // no wcls tensor in the file
}

// The checks the loader makes on a header, for a model built in memory
void train_check_config(const Config* c, const char* what) {
    unsigned char h[MODEL_HEADER_BYTES];
    pack_model_header(h, c);
    char err[256];
    Config chk;
    // the header alone: no file size to compare yet
    if (parse_model_header(h, MODEL_HEADER_BYTES, &chk, err, sizeof(err)) != 0 && !strstr(err, "file size"))
        die("%s: %s", what, err);
}

typedef struct { const Weights* w; int dim; } WeightsSource;

static void weights_source_rows(void* ctx, int tn, int layer, int r0, int nr, float* out) {
    WeightsSource* s = ctx;
    weights_rows(s->w, tn, layer, r0, nr, s->dim, out);
}

int save_model_fp32(const TrainModel* m, const char* path) {
    Config c = m->config;
    c.weight_type = WEIGHT_FP32;
    c.group_size = 0;
    WeightsSource src = {&m->w, c.dim};
    return write_model_file(path, &c, weights_source_rows, &src);
}

// ----------------------------------------------------------------------------
// The training model: loading, parameters, activation buffers

static void check_config_for_training(const Config* c) {
    if (c->n_heads % c->n_kv_heads != 0 || c->head_dim % 2 != 0) die("unsupported head configuration");
}

void train_model_from_file(TrainModel* m, const char* path) {
    memset(m, 0, sizeof(*m));
    m->file = xmalloc(sizeof(Transformer));
    build_transformer(m->file, path, 1); // its run state is unused: a 1-position cache
    m->config = m->file->config;
    check_config_for_training(&m->config);
    m->base = m->file->weights;
    m->w = m->base;
    m->min_layer = m->config.n_layers;
}

void train_model_random(TrainModel* m, const Config* c, uint64_t seed) {
    memset(m, 0, sizeof(*m));
    m->config = *c;
    m->config.weight_type = WEIGHT_FP32;
    m->config.group_size = 0;
    check_config_for_training(&m->config);
    size_t n = full_param_count(&m->config);
    m->base_copy = xmalloc(n * sizeof(float));
    // every matrix N(0, 0.02) as Hugging Face's initializer_range; norms 1
    uint64_t rng = seed;
    float* p = m->base_copy;
    for (int tn = 0; tn < TN_COUNT; tn++) {
        size_t k = tensor_numel(&m->config, tn);
        for (size_t i = 0; i < k; i++) p[i] = tensor_is_norm(tn) ? 1.0f : 0.02f * rng_normal(&rng);
        p += k;
    }
    weights_view(&m->base, &m->config, m->base_copy);
    m->w = m->base;
    m->min_layer = m->config.n_layers;
}

void train_setup_full(TrainModel* m, int keep_reference) {
    Config* c = &m->config;
    m->full = 1;
    m->n_params = full_param_count(c);
    m->params = xmalloc(m->n_params * sizeof(float));
    m->grads = xcalloc(m->n_params, sizeof(float));
    m->adam_m = xcalloc(m->n_params, sizeof(float));
    m->adam_v = xcalloc(m->n_params, sizeof(float));
    m->no_decay = xcalloc(m->n_params, 1);
    float* p = m->params;
    unsigned char* nd = m->no_decay;
    for (int tn = 0; tn < TN_COUNT; tn++) {
        int count, rows, cols;
        tensor_shape(c, tn, &count, &rows, &cols);
        for (int l = 0; l < count; l++) {
            weights_rows(&m->base, tn, l, 0, rows, c->dim, p);
            if (tensor_is_norm(tn)) memset(nd, 1, (size_t)rows * cols);
            p += (size_t)rows * cols;
            nd += (size_t)rows * cols;
        }
    }
    weights_view(&m->w, c, m->params);
    weights_view(&m->gw, c, m->grads);
    m->min_layer = 0;
    if (!keep_reference && m->base_copy) {
        // no frozen reference needed: drop the copy, the base is the model itself
        free(m->base.layers);
        free(m->base_copy);
        m->base_copy = NULL;
        weights_view(&m->base, c, m->params);
    }
}

void train_setup_lora(TrainModel* m, int rank, float alpha, float dropout, int target_mask, int layer_begin,
                      int layer_end, uint64_t seed) {
    Config* c = &m->config;
    if (rank <= 0 || target_mask <= 0 || layer_begin < 0 || layer_end > c->n_layers || layer_begin >= layer_end)
        die("invalid LoRA configuration (rank %d, targets %d, layers [%d, %d))", rank, target_mask, layer_begin,
            layer_end);
    m->full = 0;
    m->n_params = lora_param_count(c, rank, target_mask, layer_begin, layer_end);
    m->params = xmalloc(m->n_params * sizeof(float));
    m->grads = xcalloc(m->n_params, sizeof(float));
    m->adam_m = xcalloc(m->n_params, sizeof(float));
    m->adam_v = xcalloc(m->n_params, sizeof(float));
    lora_layout(&m->lora, c, rank, alpha, target_mask, layer_begin, layer_end, m->params, 0);
    lora_layout(&m->dlora, c, rank, alpha, target_mask, layer_begin, layer_end, m->grads, 0);
    m->lora_dropout = dropout;
    m->min_layer = layer_begin;
    // PEFT's init: A kaiming-uniform (bound 1/sqrt(in)), B = 0, so training starts at the base model
    uint64_t rng = seed;
    for (int l = layer_begin; l < layer_end; l++)
        for (int t = 0; t < LORA_N_TARGETS; t++) {
            if (!(target_mask & (1 << t))) continue;
            int in, out;
            lora_dims(c, t, &in, &out);
            float bound = 1.0f / sqrtf((float)in);
            LoraPair* p = &m->lora.pairs[l][t];
            for (size_t i = 0; i < (size_t)rank * in; i++) p->a[i] = bound * (2.0f * rng_uniform(&rng) - 1.0f);
            zero(p->b, (size_t)out * rank);
        }
}

static int max_in_dim(const Config* c) {
    int q_dim = c->n_heads * c->head_dim;
    int m = c->dim > c->hidden_dim ? c->dim : c->hidden_dim;
    return q_dim > m ? q_dim : m;
}

// Whether every int8 matrix's dx = dy W can run as the engine's int8 GEMM
// (matmul_q8, transposed): the build has it and each row count is a whole
// number of groups.
static int int8_backward_fast(const Config* c) {
    int gs = c->group_size, qd = c->n_heads * c->head_dim, kvd = c->n_kv_heads * c->head_dim;
    int rows[] = {qd, kvd, c->dim, c->hidden_dim, c->vocab_size};
    for (int i = 0; i < 5; i++)
        if (!matmul_q8_fast(rows[i], gs, 1)) return 0;
    return 1;
}


// Every activation buffer; with dry != 0 nothing is allocated and only the
// bytes are counted (train_memory_bytes).
static size_t acts_setup(TrainModel* m, int N_cap, int T_cap, int need_ref, int need_ref_hidden, int dry) {
    size_t bytes = 0;
    Config* c = &m->config;
    TrainActs* a = &m->acts;
    size_t L = c->n_layers, D = c->dim, H = c->hidden_dim, V = c->vocab_size, N = N_cap;
    size_t qd = (size_t)c->n_heads * c->head_dim, kvd = (size_t)c->n_kv_heads * c->head_dim;
    size_t half = c->head_dim / 2, mx = max_in_dim(c);
    a->N_cap = N_cap;
    a->T_cap = T_cap;
    size_t B_cap = (N_cap + T_cap - 1) / T_cap;
    a->x = xcalloc_counted(&bytes, dry, (L + 1) * N * D, sizeof(float));
    a->xn1 = xcalloc_counted(&bytes, dry, L * N * D, sizeof(float));
    a->rstd1 = xcalloc_counted(&bytes, dry, L * N, sizeof(float));
    a->q = xcalloc_counted(&bytes, dry, L * N * qd, sizeof(float));
    a->k = xcalloc_counted(&bytes, dry, L * N * kvd, sizeof(float));
    a->v = xcalloc_counted(&bytes, dry, L * N * kvd, sizeof(float));
    a->att = xcalloc_counted(&bytes, dry, L * B_cap * c->n_heads * (size_t)T_cap * T_cap, sizeof(float));
    a->att_out = xcalloc_counted(&bytes, dry, L * N * qd, sizeof(float));
    a->xmid = xcalloc_counted(&bytes, dry, L * N * D, sizeof(float));
    a->xn2 = xcalloc_counted(&bytes, dry, L * N * D, sizeof(float));
    a->rstd2 = xcalloc_counted(&bytes, dry, L * N, sizeof(float));
    a->gate = xcalloc_counted(&bytes, dry, L * N * H, sizeof(float));
    a->up = xcalloc_counted(&bytes, dry, L * N * H, sizeof(float));
    a->h = xcalloc_counted(&bytes, dry, L * N * H, sizeof(float));
    a->xf = xcalloc_counted(&bytes, dry, N * D, sizeof(float));
    a->rstdf = xcalloc_counted(&bytes, dry, N, sizeof(float));
    a->logits = xcalloc_counted(&bytes, dry, N * V, sizeof(float));
    a->lse = xcalloc_counted(&bytes, dry, N, sizeof(float));
    a->nll = xcalloc_counted(&bytes, dry, N, sizeof(float));
    int rank = m->full ? 0 : m->lora.rank;
    int rank_max = rank;
    if (rank > 0) a->lora_u = xcalloc_counted(&bytes, dry, L * LORA_N_TARGETS * N * rank, sizeof(float));
    a->dres = xcalloc_counted(&bytes, dry, N * D, sizeof(float));
    a->dmid = xcalloc_counted(&bytes, dry, N * D, sizeof(float));
    a->dbranch = xcalloc_counted(&bytes, dry, N * D, sizeof(float));
    a->dxn = xcalloc_counted(&bytes, dry, N * D, sizeof(float));
    a->dq = xcalloc_counted(&bytes, dry, N * qd, sizeof(float));
    a->dk = xcalloc_counted(&bytes, dry, N * kvd, sizeof(float));
    a->dv = xcalloc_counted(&bytes, dry, N * kvd, sizeof(float));
    a->dkh = xcalloc_counted(&bytes, dry, N * qd, sizeof(float));
    a->dvh = xcalloc_counted(&bytes, dry, N * qd, sizeof(float));
    a->datt = xcalloc_counted(&bytes, dry, N * qd, sizeof(float));
    a->dgate = xcalloc_counted(&bytes, dry, N * H, sizeof(float));
    a->dup = xcalloc_counted(&bytes, dry, N * H, sizeof(float));
    a->dh = xcalloc_counted(&bytes, dry, N * H, sizeof(float));
    a->dxf = xcalloc_counted(&bytes, dry, N * D, sizeof(float));
    a->dnll = xcalloc_counted(&bytes, dry, N, sizeof(float));
    a->dkl = xcalloc_counted(&bytes, dry, N, sizeof(float));
    a->ref = need_ref ? xcalloc_counted(&bytes, dry, N * V, sizeof(float)) : NULL;
    a->ref_hidden = need_ref_hidden ? xcalloc_counted(&bytes, dry, N * D, sizeof(float)) : NULL;
    a->tmp = xcalloc_counted(&bytes, dry, N * mx, sizeof(float));
    a->tmp2 = xcalloc_counted(&bytes, dry, N * mx, sizeof(float));
    if (rank_max < 64) rank_max = 64; // room for a reinforced (WHP) adapter of another rank
    a->u_tmp = xcalloc_counted(&bytes, dry, N * rank_max, sizeof(float));
    a->du = xcalloc_counted(&bytes, dry, N * rank_max, sizeof(float));
    a->dp = xcalloc_counted(&bytes, dry, (size_t)engine_threads() * T_cap * T_cap, sizeof(float));
    // an int8 base: the engine's int8 matmul scratch (its transposed GEMM
    // also serves dx = dy W, in k blocks, so W's rows may exceed mx), and
    // where that GEMM is not built (or a shape does not fit it) dx = dy W
    // dequantizes W a tile of rows at a time
    if (c->weight_type == WEIGHT_Q8) {
        int gs = c->group_size;
        if (dry) bytes += q8_scratch_bytes((int)N, (int)mx, gs);
        else q8_scratch_init(&a->q8, (int)N, (int)mx, gs);
        if (!int8_backward_fast(c)) {
            size_t rows = ((size_t)1 << 24) / mx; // 64 MiB of fp32 per tile
            if (rows < 1) rows = 1;
            if (rows > V) rows = V;
            a->deq_rows = (int)rows;
            a->deq = xcalloc_counted(&bytes, dry, rows * mx, sizeof(float));
        }
    }
    a->rope_cos = xcalloc_counted(&bytes, dry, (size_t)T_cap * half, sizeof(float));
    a->rope_sin = xcalloc_counted(&bytes, dry, (size_t)T_cap * half, sizeof(float));
    a->rope_nsin = xcalloc_counted(&bytes, dry, (size_t)T_cap * half, sizeof(float));
    if (dry) { memset(a, 0, sizeof(*a)); return bytes; }
    float* inv_freq = xcalloc(half, sizeof(float));
    rope_inv_freq(inv_freq, c);
    for (int i = 0; i < T_cap; i++)
        for (size_t j = 0; j < half; j++) {
            // exactly the engine's angles: (float)pos * inv_freq, cosf/sinf
            float angle = (float)i * inv_freq[j];
            a->rope_cos[i * half + j] = cosf(angle);
            a->rope_sin[i * half + j] = sinf(angle);
            a->rope_nsin[i * half + j] = -a->rope_sin[i * half + j];
        }
    free(inv_freq);
    return bytes;
}

void train_alloc_acts(TrainModel* m, int N_cap, int T_cap, int need_ref, int need_ref_hidden) {
    m->acts_bytes = acts_setup(m, N_cap, T_cap, need_ref, need_ref_hidden, 0);
}

size_t train_memory_bytes(const Config* c, int full, int rank, int N_cap, int T_cap, int need_ref, int need_ref_hidden) {
    TrainModel m;
    memset(&m, 0, sizeof(m));
    m.config = *c;
    m.full = full;
    m.lora.rank = rank;
    size_t n_params = full ? full_param_count(c) : lora_param_count(c, rank, (1 << LORA_N_TARGETS) - 1, 0, c->n_layers);
    // activations + params, grads, AdamW m and v (+ the frozen fp32 copy of --full)
    return acts_setup(&m, N_cap, T_cap, need_ref, need_ref_hidden, 1) + n_params * sizeof(float) * (full ? 5 : 4);
}

static void free_acts(TrainActs* a) {
    float* bufs[] = {a->x, a->xn1, a->rstd1, a->q, a->k, a->v, a->att, a->att_out, a->xmid, a->xn2, a->rstd2,
                     a->gate, a->up, a->h, a->xf, a->rstdf, a->logits, a->lse, a->nll, a->lora_u, a->dres, a->dmid,
                     a->dbranch, a->dxn, a->dq, a->dk, a->dv, a->dkh, a->dvh, a->datt, a->dgate, a->dup, a->dh,
                     a->dxf, a->dnll, a->dkl, a->ref, a->ref_hidden, a->tmp, a->tmp2, a->u_tmp, a->du, a->deq,
                     a->dp, a->rope_cos, a->rope_sin, a->rope_nsin};
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++) free(bufs[i]);
    q8_scratch_free(&a->q8);
    memset(a, 0, sizeof(*a));
}

void train_model_free(TrainModel* m) {
    free_acts(&m->acts);
    if (m->full) {
        free(m->w.layers);
        free(m->gw.layers);
    } else if (m->lora.pairs) {
        free_lora(&m->lora);   // memory is m->params, not owned: free_lora frees only pairs
        free_lora(&m->dlora);
    }
    if (!m->file) free(m->base.layers); // in-memory base (random, or the params themselves)
    free(m->base_copy);
    free(m->params); free(m->grads); free(m->adam_m); free(m->adam_v); free(m->no_decay);
    if (m->file) { free_transformer(m->file); free(m->file); }
    memset(m, 0, sizeof(*m));
}

// ----------------------------------------------------------------------------
// Layers: one *_forward / *_backward pair per operation. N = B*T positions.
// Backward functions accumulate (+=) into their gradient outputs.

// x (N, D) = rows of the embedding table
static void embedding_forward(float* x, const int* inputs, int N, const Matrix* emb, int D) {
    for (int i = 0; i < N; i++) embed_row(x + (size_t)i * D, emb, inputs[i]);
}

// demb (V, D) += scatter of dx (N, D); serial, so repeated tokens add in a fixed order
static void embedding_backward(float* demb, const float* dx, const int* inputs, int N, int D) {
    for (int i = 0; i < N; i++) {
        float* row = demb + (size_t)inputs[i] * D;
        const float* g = dx + (size_t)i * D;
        for (int j = 0; j < D; j++) row[j] += g[j];
    }
}

// out (N, D) = w * x / rms(x); rstd (N,) saved. The engine's rmsnorm, row by row.
static void rmsnorm_forward(float* out, float* rstd, const float* x, const float* w, int N, int D, float eps) {
    #pragma omp parallel for schedule(static) if (PAR((size_t)N * D))
    for (int i = 0; i < N; i++) {
        const float* xi = x + (size_t)i * D;
        rmsnorm(out + (size_t)i * D, xi, w, D, eps);
        float ss = 0.0f; // the same sum, in the same order, as rmsnorm's
        for (int j = 0; j < D; j++) ss += xi[j] * xi[j];
        rstd[i] = 1.0f / sqrtf(ss / D + eps);
    }
}

// y = w * x * r with r = (mean(x^2) + eps)^-1/2:
//   dx_k += r w_k dy_k - r^3 x_k / D * sum_j dy_j w_j x_j,   dw_j += sum_i dy_ij x_ij r_i
static void rmsnorm_backward(float* dx, float* dw, const float* dout, const float* x, const float* w,
                             const float* rstd, int N, int D) {
    #pragma omp parallel for schedule(static) if (PAR((size_t)N * D))
    for (int i = 0; i < N; i++) {
        const float* xi = x + (size_t)i * D;
        const float* gi = dout + (size_t)i * D;
        float* dxi = dx + (size_t)i * D;
        double dot = 0.0;
        for (int j = 0; j < D; j++) dot += (double)gi[j] * w[j] * xi[j];
        float r = rstd[i];
        float c = (float)(dot * r * r * r / D);
        for (int j = 0; j < D; j++) dxi[j] += r * w[j] * gi[j] - c * xi[j];
    }
    if (dw) {
        #pragma omp parallel for schedule(static) if (PAR((size_t)N * D))
        for (int j = 0; j < D; j++) {
            double sum = 0.0;
            for (int i = 0; i < N; i++) sum += (double)dout[(size_t)i * D + j] * x[(size_t)i * D + j] * rstd[i];
            dw[j] += (float)sum;
        }
    }
}

// LoRA dropout on the adapter's input (the base path sees x unchanged)
typedef struct { float p; uint64_t seed; } Dropout;

static void dropout_apply(float* out, const float* x, size_t n, Dropout d) {
    float scale = 1.0f / (1.0f - d.p);
    #pragma omp parallel for schedule(static) if (PAR(n))
    for (size_t i = 0; i < n; i++) out[i] = lora_dropout_keep(d.seed, i, d.p) ? x[i] * scale : 0.0f;
}

// y (N, out) = x (N, in) @ W^T through the engine's matmul (fp32 GEMM, or
// int8 dot products with x quantized per group, exactly as the engine), then the
// adapter: u (N, r) = drop(x) @ A^T, y += scale * u @ B^T (the engine's lora_apply).
static void matmul_forward(float* y, const float* x, int N, const Matrix* w, const LoraPair* lp, float scale,
                           int rank, float* u, Dropout drop, TrainActs* a) {
    matmul(y, x, w, N, &a->q8);
    if (!lp || !lp->a) return;
    int in = w->cols, out = w->rows;
    const float* xin = x;
    if (drop.p > 0.0f) { dropout_apply(a->tmp2, x, (size_t)N * in, drop); xin = a->tmp2; }
    gemm(0, 1, N, rank, in, 1.0f, xin, in, lp->a, in, 0.0f, u, rank);
    gemm(0, 1, N, out, rank, scale, u, rank, lp->b, rank, 1.0f, y, out);
}

// dx (N, in) += dy @ W (int8: the engine's int8 GEMM with W^T requantized,
// or where that is not built one dequantized tile of rows at a time)
// dW (out, in) += dy^T @ x                        (full training)
// LoRA: dB += scale dy^T u;  du = scale dy B;  dA += du^T drop(x);  dx += drop(du A)
static void matmul_backward(float* dx, float* dw, const float* dy, const float* x, int N, const Matrix* w,
                            const LoraPair* lp, LoraPair* dlp, float scale, int rank, const float* u, Dropout drop,
                            TrainActs* a) {
    int in = w->cols, out = w->rows;
    if (dx) {
        if (w->f) {
            gemm(0, 0, N, in, out, 1.0f, dy, out, w->f, in, 1.0f, dx, in);
        } else if (!a->deq) {
            matmul_q8(dx, dy, w, N, 1, 1, &a->q8); // int8 GEMM against W^T requantized
        } else {
            for (int r0 = 0; r0 < out; r0 += a->deq_rows) {
                int nr = out - r0 < a->deq_rows ? out - r0 : a->deq_rows;
                dequant_rows(a->deq, w, r0, nr);
                gemm(0, 0, N, in, nr, 1.0f, dy + r0, out, a->deq, in, 1.0f, dx, in);
            }
        }
    }
    if (dw) gemm(1, 0, out, in, N, 1.0f, dy, out, x, in, 1.0f, dw, in);
    if (!lp || !lp->a) return;
    const float* xin = x;
    if (drop.p > 0.0f) { dropout_apply(a->tmp, x, (size_t)N * in, drop); xin = a->tmp; }
    gemm(1, 0, out, rank, N, scale, dy, out, u, rank, 1.0f, dlp->b, rank);
    gemm(0, 0, N, rank, out, scale, dy, out, lp->b, rank, 0.0f, a->du, rank);
    gemm(1, 0, rank, in, N, 1.0f, a->du, rank, xin, in, 1.0f, dlp->a, in);
    if (dx) {
        if (drop.p <= 0.0f) {
            gemm(0, 0, N, in, rank, 1.0f, a->du, rank, lp->a, in, 1.0f, dx, in);
        } else {
            gemm(0, 0, N, in, rank, 1.0f, a->du, rank, lp->a, in, 0.0f, a->tmp2, in);
            float s = 1.0f / (1.0f - drop.p);
            #pragma omp parallel for schedule(static) if (PAR((size_t)N * in))
            for (size_t i = 0; i < (size_t)N * in; i++)
                if (lora_dropout_keep(drop.seed, i, drop.p)) dx[i] += a->tmp2[i] * s;
        }
    }
}

// Positions: row r of a batch holds positions 0..T-1, or, in a packed row,
// several sequences whose positions each restart at 0 (pos (N,) gives the
// position of every entry; NULL = i % T). A position p attends to the p+1
// entries ending at itself, so every packed sequence is computed exactly as
// if it were alone.

// RoPE on each row's heads at its position: the engine's rope_rotate with
// the cos/sin of that position.
static void rope_forward(float* x, const int* pos_of, int N, int T, int n_heads, int hd, const float* cos_t,
                         const float* sin_t) {
    int half = hd / 2;
    #pragma omp parallel for schedule(static) if (PAR((size_t)N * n_heads * hd))
    for (int i = 0; i < N; i++) {
        int pos = pos_of ? pos_of[i] : i % T;
        rope_rotate(x + (size_t)i * n_heads * hd, n_heads, hd, cos_t + (size_t)pos * half, sin_t + (size_t)pos * half);
    }
}

// The rotation is orthogonal: its backward is the rotation by -angle.
static void rope_backward(float* dx, const int* pos_of, int N, int T, int n_heads, int hd, const float* cos_t,
                          const float* nsin_t) {
    rope_forward(dx, pos_of, N, T, n_heads, hd, cos_t, nsin_t);
}

// Causal GQA attention. q (N, nh*hd), k and v (N, nkv*hd) after RoPE;
// att (B, nh, T, T) softmax probabilities saved; out (N, nh*hd). Each (batch
// row, head) is the engine's attention_head, the very function the engine's
// prompt path calls, so the two agree bit for bit.
static void attention_forward(float* out, float* att, const float* q, const float* k, const float* v,
                              const int* pos_of, int B, int T, int nh, int nkv, int hd) {
    int qd = nh * hd, kvd = nkv * hd, kv_mul = nh / nkv;
    #pragma omp parallel for schedule(dynamic) if (PAR((size_t)B * nh * T * T * hd))
    for (int bh = 0; bh < B * nh; bh++) {
        int b = bh / nh, h = bh % nh, kv_off = (h / kv_mul) * hd;
        size_t row0 = (size_t)b * T;
        attention_head(out + row0 * qd + (size_t)h * hd, qd, att + (size_t)bh * T * T, q + row0 * qd + (size_t)h * hd,
                       qd, k + row0 * kvd + kv_off, v + row0 * kvd + kv_off, kvd, T, 0, pos_of ? pos_of + row0 : NULL, hd);
    }
}

// With P = softmax(S), S = q k^T / sqrt(hd), out = P v, per (batch row, head)
// as matrix products over the whole T x T block (P and so dS are 0 outside
// each row's causal range, which keeps the masked entries out of the sums):
//   dP = dout v^T,  dS_ij = P_ij (dP_ij - sum_k P_ik dP_ik) / sqrt(hd),
//   dq += dS k,  dk += dS^T q,  dv += P^T dout.
// Threads own (batch row, query head) pairs; dk and dv are first gathered
// per query head (dkh, dvh) and then summed over each GQA group, so no two
// threads write the same float and the result does not depend on threads.
static void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* att, const float* q,
                               const float* k, const float* v, const int* pos_of, int B, int T, int nh, int nkv,
                               int hd, TrainActs* a) {
    int qd = nh * hd, kvd = nkv * hd, kv_mul = nh / nkv, N = B * T;
    float inv_sqrt = 1.0f / sqrtf((float)hd);
    zero(a->dkh, (size_t)N * qd);
    zero(a->dvh, (size_t)N * qd);
    #pragma omp parallel for schedule(dynamic) if (PAR((size_t)B * nh * T * T * hd))
    for (int bh = 0; bh < B * nh; bh++) {
        int b = bh / nh, h = bh % nh, kv_off = (h / kv_mul) * hd;
        size_t row0 = (size_t)b * T, q_off = row0 * qd + (size_t)h * hd, kv_at = row0 * kvd + kv_off;
        const float* p = att + (size_t)bh * T * T;
        float* ds = a->dp + (size_t)engine_thread_id() * a->T_cap * a->T_cap; // dP, then dS in place
        gemm(0, 1, T, T, hd, 1.0f, dout + q_off, qd, v + kv_at, kvd, 0.0f, ds, T);
        for (int i = 0; i < T; i++) {
            const float* prow = p + (size_t)i * T;
            float* drow = ds + (size_t)i * T;
            int j0 = pos_of ? i - pos_of[row0 + i] : 0;
            float s = 0.0f;
            for (int j = j0; j <= i; j++) s += prow[j] * drow[j];
            for (int j = 0; j < T; j++) drow[j] = j >= j0 && j <= i ? prow[j] * (drow[j] - s) * inv_sqrt : 0.0f;
        }
        gemm(0, 0, T, hd, T, 1.0f, ds, T, k + kv_at, kvd, 1.0f, dq + q_off, qd);
        gemm(1, 0, T, hd, T, 1.0f, ds, T, q + q_off, qd, 1.0f, a->dkh + q_off, qd);
        gemm(1, 0, T, hd, T, 1.0f, p, T, dout + q_off, qd, 1.0f, a->dvh + q_off, qd);
    }
    #pragma omp parallel for schedule(static) if (PAR((size_t)N * qd))
    for (int i = 0; i < N; i++)
        for (int g = 0; g < nkv; g++)
            for (int h = g * kv_mul; h < (g + 1) * kv_mul; h++)
                for (int d = 0; d < hd; d++) {
                    dk[(size_t)i * kvd + g * hd + d] += a->dkh[(size_t)i * qd + h * hd + d];
                    dv[(size_t)i * kvd + g * hd + d] += a->dvh[(size_t)i * qd + h * hd + d];
                }
}

// h = silu(gate) * up, written as the engine writes it
static void swiglu_forward(float* h, const float* gate, const float* up, size_t n) {
    #pragma omp parallel for schedule(static) if (PAR(8 * n))
    for (size_t i = 0; i < n; i++) {
        float g = gate[i];
        h[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

// silu'(g) = sig(g) (1 + g (1 - sig(g)))
static void swiglu_backward(float* dgate, float* dup, const float* dh, const float* gate, const float* up, size_t n) {
    #pragma omp parallel for schedule(static) if (PAR(8 * n))
    for (size_t i = 0; i < n; i++) {
        float g = gate[i];
        float sig = 1.0f / (1.0f + expf(-g));
        dgate[i] += dh[i] * up[i] * sig * (1.0f + g * (1.0f - sig));
        dup[i] += dh[i] * g * sig;
    }
}

static void residual_forward(float* out, const float* a, const float* b, size_t n) {
    #pragma omp parallel for schedule(static) if (PAR(n))
    for (size_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

static void residual_backward(float* da, float* db, const float* dout, size_t n) {
    #pragma omp parallel for schedule(static) if (PAR(n))
    for (size_t i = 0; i < n; i++) { da[i] += dout[i]; db[i] += dout[i]; }
}

// Per-position NLL of the targets: lse (N,), nll (N,) for rows with weight != 0.
static void crossentropy_forward(float* nll, float* lse, const float* logits, const int* targets,
                                 const float* weights, int N, int V) {
    #pragma omp parallel for schedule(static) if (PAR((size_t)N * V))
    for (int i = 0; i < N; i++) {
        if (weights[i] == 0.0f) { nll[i] = 0.0f; lse[i] = 0.0f; continue; }
        const float* z = logits + (size_t)i * V;
        float mx = z[0];
        for (int j = 1; j < V; j++) if (z[j] > mx) mx = z[j];
        double sum = 0.0;
        for (int j = 0; j < V; j++) sum += expf(z[j] - mx);
        double l = mx + log(sum);
        lse[i] = (float)l;
        nll[i] = (float)(l - z[targets[i]]);
    }
}

// In place over the logits: dz_i = dnll_i (softmax(z_i) - onehot(t_i)) + dkl_i (softmax(z_i) - exp(ref_i)),
// ref holding log-probabilities (the KL target). Rows with no gradient become 0.
static void crossentropy_backward(float* logits, const float* lse, const int* targets, const float* dnll,
                                  const float* dkl, const float* ref, int N, int V) {
    #pragma omp parallel for schedule(static) if (PAR((size_t)N * V))
    for (int i = 0; i < N; i++) {
        float* z = logits + (size_t)i * V;
        float a = dnll[i], c = dkl[i];
        if (a == 0.0f && c == 0.0f) { memset(z, 0, (size_t)V * sizeof(float)); continue; }
        float l = lse[i];
        const float* r = ref ? ref + (size_t)i * V : NULL;
        for (int j = 0; j < V; j++) {
            float p = expf(z[j] - l);
            float g = (a + c) * p;
            if (c != 0.0f) g -= c * expf(r[j]);
            z[j] = g;
        }
        if (a != 0.0f) z[targets[i]] -= a;
    }
}

// KL(ref || model) per position, ref given as log-probabilities (N, V)
static void kl_forward(float* kl, const float* logits, const float* lse, const float* ref, const float* weights,
                       int N, int V) {
    #pragma omp parallel for schedule(static) if (PAR((size_t)N * V))
    for (int i = 0; i < N; i++) {
        if (weights[i] == 0.0f) { kl[i] = 0.0f; continue; }
        const float* z = logits + (size_t)i * V;
        const float* r = ref + (size_t)i * V;
        double sum = 0.0;
        for (int j = 0; j < V; j++) {
            double pr = exp((double)r[j]);
            if (pr > 0.0) sum += pr * ((double)r[j] - ((double)z[j] - lse[i]));
        }
        kl[i] = (float)sum;
    }
}

// rows of logits -> log-probabilities, in place
static void log_softmax_rows(float* z, int N, int V) {
    #pragma omp parallel for schedule(static) if (PAR((size_t)N * V))
    for (int i = 0; i < N; i++) {
        float* r = z + (size_t)i * V;
        float mx = r[0];
        for (int j = 1; j < V; j++) if (r[j] > mx) mx = r[j];
        double sum = 0.0;
        for (int j = 0; j < V; j++) sum += expf(r[j] - mx);
        float l = (float)(mx + log(sum));
        for (int j = 0; j < V; j++) r[j] -= l;
    }
}

// ----------------------------------------------------------------------------
// The model: forward over a batch, saving activations; backward in reverse

// activation of layer l: base + l * (N * width)
#define LAYER(buf, l, width) ((buf) + (size_t)(l) * N * (width))

// What the forward saves of one layer and the backward reads again, for the
// shape of the last forward (acts.B x acts.T).
typedef struct {
    float *x, *xn1, *rstd1, *q, *k, *v, *att, *att_out, *xmid, *xn2, *rstd2, *gate, *up, *h;
} LayerActs;

static LayerActs layer_acts(TrainModel* m, int l) {
    const Config* c = &m->config;
    TrainActs* a = &m->acts;
    int B = a->B, T = a->T, N = B * T, D = c->dim, H = c->hidden_dim;
    int qd = c->n_heads * c->head_dim, kvd = c->n_kv_heads * c->head_dim;
    return (LayerActs){
        .x = LAYER(a->x, l, D), .xn1 = LAYER(a->xn1, l, D), .rstd1 = LAYER(a->rstd1, l, 1),
        .q = LAYER(a->q, l, qd), .k = LAYER(a->k, l, kvd), .v = LAYER(a->v, l, kvd),
        .att = a->att + (size_t)l * B * c->n_heads * T * T, .att_out = LAYER(a->att_out, l, qd),
        .xmid = LAYER(a->xmid, l, D), .xn2 = LAYER(a->xn2, l, D), .rstd2 = LAYER(a->rstd2, l, 1),
        .gate = LAYER(a->gate, l, H), .up = LAYER(a->up, l, H), .h = LAYER(a->h, l, H),
    };
}

static Dropout dropout_for(const TrainModel* m, int on, int layer, int target) {
    Dropout d = {0.0f, 0};
    if (on && m->lora_dropout > 0.0f) { d.p = m->lora_dropout; d.seed = train_dropout_seed(m->dropout_seed, layer, target); }
    return d;
}

void train_forward(TrainModel* m, const Weights* w, const Lora* lora, int dropout, const int* inputs, const int* pos,
                   int B, int T, int n_layers) {
    Config* c = &m->config;
    TrainActs* a = &m->acts;
    int N = B * T, D = c->dim, H = c->hidden_dim, hd = c->head_dim, nh = c->n_heads, nkv = c->n_kv_heads;
    int V = c->vocab_size, L = c->n_layers;
    if (N > a->N_cap || T > a->T_cap || B <= 0 || T <= 0) die("batch %d x %d exceeds the buffers (%d positions, rows of %d)", B, T, a->N_cap, a->T_cap);
    if (lora && lora->rank > 64 && lora != &m->lora) die("a reference adapter of rank > 64 is not supported");
    for (int i = 0; i < N; i++)
        if (inputs[i] < 0 || inputs[i] >= V) die("token id %d out of range [0, %d)", inputs[i], V);
    if (pos)
        for (int i = 0; i < N; i++)
            if (pos[i] < 0 || pos[i] > i % T || (pos[i] > 0 && i % T > 0 && pos[i] != pos[i - 1] + 1))
                die("invalid positions in a packed row");
    a->B = B;
    a->T = T;
    a->pos = pos;
    a->n_layers_run = n_layers;
    // the trainable adapter saves A x for its backward; another one (WHP's reinforced) uses scratch
    int save_u = lora && lora == &m->lora;
    int r = lora ? lora->rank : 0;
    float scale = lora ? lora->scale : 0.0f;
    int use_drop = dropout && save_u;

    embedding_forward(a->x, inputs, N, &w->token_embedding, D);
    for (int l = 0; l < n_layers; l++) {
        LayerWeights* lw = &w->layers[l];
        const LoraPair* lp = lora ? lora->pairs[l] : NULL;
        float* u[LORA_N_TARGETS];
        for (int t = 0; t < LORA_N_TARGETS; t++)
            u[t] = save_u ? a->lora_u + ((size_t)l * LORA_N_TARGETS + t) * N * r : a->u_tmp;
        LayerActs s = layer_acts(m, l);
        // attention block: xmid = x + wo(attention(rope(wq xn1), rope(wk xn1), wv xn1))
        rmsnorm_forward(s.xn1, s.rstd1, s.x, lw->rms_att, N, D, c->norm_eps);
        matmul_forward(s.q, s.xn1, N, &lw->wq, lp ? &lp[LORA_Q] : NULL, scale, r, u[LORA_Q], dropout_for(m, use_drop, l, LORA_Q), a);
        matmul_forward(s.k, s.xn1, N, &lw->wk, lp ? &lp[LORA_K] : NULL, scale, r, u[LORA_K], dropout_for(m, use_drop, l, LORA_K), a);
        matmul_forward(s.v, s.xn1, N, &lw->wv, lp ? &lp[LORA_V] : NULL, scale, r, u[LORA_V], dropout_for(m, use_drop, l, LORA_V), a);
        rope_forward(s.q, pos, N, T, nh, hd, a->rope_cos, a->rope_sin);
        rope_forward(s.k, pos, N, T, nkv, hd, a->rope_cos, a->rope_sin);
        attention_forward(s.att_out, s.att, s.q, s.k, s.v, pos, B, T, nh, nkv, hd);
        matmul_forward(a->tmp, s.att_out, N, &lw->wo, lp ? &lp[LORA_O] : NULL, scale, r, u[LORA_O], dropout_for(m, use_drop, l, LORA_O), a);
        residual_forward(s.xmid, s.x, a->tmp, (size_t)N * D);
        // MLP block: x_next = xmid + w_down(silu(w_gate xn2) * w_up xn2)
        rmsnorm_forward(s.xn2, s.rstd2, s.xmid, lw->rms_ffn, N, D, c->norm_eps);
        matmul_forward(s.gate, s.xn2, N, &lw->w_gate, lp ? &lp[LORA_GATE] : NULL, scale, r, u[LORA_GATE], dropout_for(m, use_drop, l, LORA_GATE), a);
        matmul_forward(s.up, s.xn2, N, &lw->w_up, lp ? &lp[LORA_UP] : NULL, scale, r, u[LORA_UP], dropout_for(m, use_drop, l, LORA_UP), a);
        swiglu_forward(s.h, s.gate, s.up, (size_t)N * H);
        matmul_forward(a->tmp, s.h, N, &lw->w_down, lp ? &lp[LORA_DOWN] : NULL, scale, r, u[LORA_DOWN], dropout_for(m, use_drop, l, LORA_DOWN), a);
        residual_forward(LAYER(a->x, l + 1, D), s.xmid, a->tmp, (size_t)N * D);
    }
    if (n_layers < L) return;
    // final norm and classifier
    rmsnorm_forward(a->xf, a->rstdf, LAYER(a->x, L, D), w->rms_final, N, D, c->norm_eps);
    matmul_forward(a->logits, a->xf, N, &w->wcls, NULL, 0.0f, 0, NULL, (Dropout){0.0f, 0}, a);
}

double train_nll(TrainModel* m, const Batch* b, double* wsum) {
    TrainActs* a = &m->acts;
    int N = b->B * b->T;
    crossentropy_forward(a->nll, a->lse, a->logits, b->targets, b->weights, N, m->config.vocab_size);
    double sum = 0.0, ws = 0.0;
    for (int i = 0; i < N; i++) { sum += (double)b->weights[i] * a->nll[i]; ws += b->weights[i]; }
    if (wsum) *wsum = ws;
    return sum;
}

void train_loss_backward(TrainModel* m, const Batch* b) {
    TrainActs* a = &m->acts;
    crossentropy_backward(a->logits, a->lse, b->targets, a->dnll, a->dkl, a->ref, b->B * b->T, m->config.vocab_size);
}

// Backward through projection t (LORA_Q .. LORA_DOWN) of layer l, whose
// input was x: dx += dy W (none when dx is NULL), and into the gradients of
// what trains, the full weight or the adapter pair.
static void proj_backward(TrainModel* m, int l, int t, float* dx, const float* dy, const float* x) {
    TrainActs* a = &m->acts;
    int N = a->B * a->T;
    const Lora* lora = m->full ? NULL : &m->lora;
    int r = lora ? lora->rank : 0;
    const LoraPair* lp = lora ? lora->pairs[l] : NULL;
    LoraPair* dlp = lora ? m->dlora.pairs[l] : NULL;
    const float* u = r ? a->lora_u + ((size_t)l * LORA_N_TARGETS + t) * N * r : NULL;
    matmul_backward(dx, m->full ? layer_matrix(&m->gw.layers[l], t)->f : NULL, dy, x, N, layer_matrix(&m->w.layers[l], t),
                    lp ? &lp[t] : NULL, dlp ? &dlp[t] : NULL, lora ? lora->scale : 0.0f, r, u,
                    dropout_for(m, 1, l, t), a);
}

// The residual y = x + branch(x) hands dy unchanged to both: dx = dbranch = dy.
static void residual_split(float* dx, float* dbranch, const float* dy, size_t n) {
    zero(dx, n);
    zero(dbranch, n);
    residual_backward(dx, dbranch, dy, n);
}

void train_backward(TrainModel* m, const int* inputs, int from_layer) {
    Config* c = &m->config;
    TrainActs* a = &m->acts;
    const Weights* w = &m->w;
    int B = a->B, T = a->T, N = B * T, D = c->dim, H = c->hidden_dim, hd = c->head_dim, nh = c->n_heads;
    int nkv = c->n_kv_heads, qd = nh * hd, kvd = nkv * hd, L = c->n_layers;
    int full = m->full;
    if (from_layer > a->n_layers_run) die("backward from layer %d after a forward of %d layers", from_layer, a->n_layers_run);

    if (from_layer == L) {
        // logits = xf @ Wcls^T ; xf = rmsnorm(x_L). dlogits are in a->logits.
        zero(a->dxf, (size_t)N * D);
        matmul_backward(a->dxf, full ? m->gw.wcls.f : NULL, a->logits, a->xf, N, &w->wcls, NULL, NULL, 0.0f, 0, NULL,
                        (Dropout){0.0f, 0}, a);
        zero(a->dres, (size_t)N * D);
        rmsnorm_backward(a->dres, full ? m->gw.rms_final : NULL, a->dxf, LAYER(a->x, L, D), w->rms_final, a->rstdf, N, D);
    } // else a->dres holds the gradient of the residual stream after layer from_layer - 1

    int stop = full ? 0 : m->min_layer;
    for (int l = from_layer - 1; l >= stop; l--) {
        LayerWeights* lw = &w->layers[l];
        LayerWeights* glw = full ? &m->gw.layers[l] : NULL;
        int need_dx = full || l > stop; // below the lowest trainable layer nothing needs gradients
        LayerActs s = layer_acts(m, l);

        // MLP block backward: x_next = xmid + down(h)
        residual_split(a->dmid, a->dbranch, a->dres, (size_t)N * D);
        zero(a->dh, (size_t)N * H);
        proj_backward(m, l, LORA_DOWN, a->dh, a->dbranch, s.h);
        zero(a->dgate, (size_t)N * H);
        zero(a->dup, (size_t)N * H);
        swiglu_backward(a->dgate, a->dup, a->dh, s.gate, s.up, (size_t)N * H);
        zero(a->dxn, (size_t)N * D);
        proj_backward(m, l, LORA_GATE, a->dxn, a->dgate, s.xn2);
        proj_backward(m, l, LORA_UP, a->dxn, a->dup, s.xn2);
        rmsnorm_backward(a->dmid, full ? glw->rms_ffn : NULL, a->dxn, s.xmid, lw->rms_ffn, s.rstd2, N, D);

        // attention block backward: xmid = x + wo(att_out)
        residual_split(a->dres, a->dbranch, a->dmid, (size_t)N * D);
        zero(a->datt, (size_t)N * qd);
        proj_backward(m, l, LORA_O, a->datt, a->dbranch, s.att_out);
        zero(a->dq, (size_t)N * qd);
        zero(a->dk, (size_t)N * kvd);
        zero(a->dv, (size_t)N * kvd);
        attention_backward(a->dq, a->dk, a->dv, a->datt, s.att, s.q, s.k, s.v, a->pos, B, T, nh, nkv, hd, a);
        rope_backward(a->dq, a->pos, N, T, nh, hd, a->rope_cos, a->rope_nsin);
        rope_backward(a->dk, a->pos, N, T, nkv, hd, a->rope_cos, a->rope_nsin);
        zero(a->dxn, (size_t)N * D);
        float* dxn = need_dx ? a->dxn : NULL;
        proj_backward(m, l, LORA_Q, dxn, a->dq, s.xn1);
        proj_backward(m, l, LORA_K, dxn, a->dk, s.xn1);
        proj_backward(m, l, LORA_V, dxn, a->dv, s.xn1);
        if (need_dx)
            rmsnorm_backward(a->dres, full ? glw->rms_att : NULL, a->dxn, s.x, lw->rms_att, s.rstd1, N, D);
    }
    if (full) embedding_backward(m->gw.token_embedding.f, a->dres, inputs, N, D);
}

// ----------------------------------------------------------------------------
// Objectives. Every term is a mean over counted positions (weights) or over
// rows (NPO, SimNPO); the forget and retain batches run one after the other,
// each forward immediately followed by its backward.

static const char* const objective_names[OBJ_COUNT] = {"sft", "ga", "graddiff", "kl", "npo", "simnpo", "whp", "rmu"};

const char* objective_name(int objective) { return objective >= 0 && objective < OBJ_COUNT ? objective_names[objective] : "?"; }

int objective_from_name(const char* s) {
    for (int i = 0; i < OBJ_COUNT; i++) if (!strcmp(s, objective_names[i])) return i;
    return -1;
}

static double softplus(double x) { return x > 30.0 ? x : log1p(exp(x)); }
static double sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }

static const Lora* trainable_lora(const TrainModel* m) { return m->full ? NULL : &m->lora; }

// The sequences of a batch (a row, or each sequence of a packed row):
// seq_of (N,) gets each position's sequence index; returns their count.
static int batch_sequences(const Batch* b, int* seq_of) {
    int n = 0;
    for (int i = 0; i < b->B * b->T; i++) {
        if (i % b->T == 0 || (b->pos && b->pos[i] == 0)) n++;
        seq_of[i] = n - 1;
    }
    return n;
}

// per-sequence sums of weight and weighted NLL after train_nll
static void sequence_sums(const TrainModel* m, const Batch* b, const int* seq_of, int n_seq, double* wseq,
                          double* nllseq) {
    for (int s = 0; s < n_seq; s++) wseq[s] = nllseq[s] = 0.0;
    for (int i = 0; i < b->B * b->T; i++) {
        wseq[seq_of[i]] += b->weights[i];
        nllseq[seq_of[i]] += (double)b->weights[i] * m->acts.nll[i];
    }
}

static void clear_loss_grads(TrainModel* m, int N) {
    zero(m->acts.dnll, N);
    zero(m->acts.dkl, N);
}

// WHP generic targets for a forget batch, into acts.ref as log-probs:
// the base model's logits on the translated rows, gathered at label_pos,
// optionally v_base - alpha * ReLU(v_reinforced - v_base).
static void whp_targets(TrainModel* m, const ObjectiveConfig* oc, const Batch* b) {
    TrainActs* a = &m->acts;
    int V = m->config.vocab_size, L = m->config.n_layers, N = b->B * b->T;
    if (!b->trans_inputs || !b->label_pos || b->Tt <= 0) die("the whp objective needs translated rows (--dict)");
    if (!a->ref) die("internal: no reference buffer");
    train_forward(m, &m->base, NULL, 0, b->trans_inputs, NULL, b->B, b->Tt, L);
    for (int r = 0; r < b->B; r++)
        for (int i = 0; i < b->T; i++) {
            int lp = b->label_pos[r * b->T + i];
            float* dst = a->ref + (size_t)(r * b->T + i) * V;
            if (lp >= 0) memcpy(dst, a->logits + (size_t)(r * b->Tt + lp) * V, (size_t)V * sizeof(float));
            else zero(dst, V);
        }
    if (oc->whp_reinforced) {
        train_forward(m, &m->base, oc->whp_reinforced, 0, b->trans_inputs, NULL, b->B, b->Tt, L);
        for (int r = 0; r < b->B; r++)
            for (int i = 0; i < b->T; i++) {
                int lp = b->label_pos[r * b->T + i];
                if (lp < 0) continue;
                float* vb = a->ref + (size_t)(r * b->T + i) * V;
                const float* vr = a->logits + (size_t)(r * b->Tt + lp) * V;
                for (int j = 0; j < V; j++) vb[j] -= oc->whp_alpha * fmaxf(vr[j] - vb[j], 0.0f);
            }
    }
    log_softmax_rows(a->ref, N, V);
}

// RMU: sum over counted rows of mean_j (h_ij - target_ij)^2, and its gradient into dres
static double rmu_mse(TrainModel* m, const Batch* b, const float* target, const float* target_vec, double coef,
                      float grad_scale, int backward) {
    TrainActs* a = &m->acts;
    int N = b->B * b->T, D = m->config.dim;
    const float* h = a->x + (size_t)(m->acts.n_layers_run) * N * D;
    double wsum = 0.0, sum = 0.0;
    for (int i = 0; i < N; i++) wsum += b->weights[i];
    if (wsum <= 0.0) return 0.0;
    if (backward) zero(a->dres, (size_t)N * D);
    for (int i = 0; i < N; i++) {
        float w = b->weights[i];
        if (w == 0.0f) continue;
        const float* t = target ? target + (size_t)i * D : target_vec;
        double s = 0.0;
        for (int j = 0; j < D; j++) {
            double d = (double)h[(size_t)i * D + j] - t[j];
            s += d * d;
            if (backward) a->dres[(size_t)i * D + j] = (float)(grad_scale * coef * w * 2.0 * d / (D * wsum));
        }
        sum += w * s / D;
    }
    return coef * sum / wsum;
}

// RMU on a forget batch: steer the activations after layer rmu_layer
// toward c * u (only the layers up to it run)
static void rmu_forget(TrainModel* m, const ObjectiveConfig* oc, const Batch* b, float gs, int backward, LossTerms* lt) {
    int l = oc->rmu_layer;
    train_forward(m, &m->w, trainable_lora(m), 1, b->inputs, b->pos, b->B, b->T, l + 1);
    lt->tokens += b->B * b->T;
    float* cu = xmalloc(m->config.dim * sizeof(float));
    for (int j = 0; j < m->config.dim; j++) cu[j] = oc->rmu_c * oc->rmu_u[j];
    lt->forget_term = rmu_mse(m, b, NULL, cu, oc->gamma, gs, backward);
    free(cu);
    if (backward) train_backward(m, b->inputs, l + 1);
}

// RMU on a retain batch: keep the activations at layer l where the frozen model has them
static void rmu_retain(TrainModel* m, const ObjectiveConfig* oc, const Batch* b, float gs, int backward, LossTerms* lt) {
    TrainActs* a = &m->acts;
    int l = oc->rmu_layer, N = b->B * b->T;
    train_forward(m, &m->base, NULL, 0, b->inputs, b->pos, b->B, b->T, l + 1);
    memcpy(a->ref_hidden, a->x + (size_t)(l + 1) * N * m->config.dim, (size_t)N * m->config.dim * sizeof(float));
    train_forward(m, &m->w, trainable_lora(m), 1, b->inputs, b->pos, b->B, b->T, l + 1);
    lt->tokens += 2.0 * N;
    lt->retain_term = rmu_mse(m, b, a->ref_hidden, NULL, oc->rmu_alpha, gs, backward);
    if (backward) train_backward(m, b->inputs, l + 1);
}

// The trained model's forward over a batch, every layer: the weighted NLL
// sum (acts.nll per position), its weight sum in *W.
static double trained_nll(TrainModel* m, const Batch* b, LossTerms* lt, double* W) {
    train_forward(m, &m->w, trainable_lora(m), 1, b->inputs, b->pos, b->B, b->T, m->config.n_layers);
    lt->tokens += b->B * b->T;
    return train_nll(m, b, W);
}

static void forget_part(TrainModel* m, const ObjectiveConfig* oc, const Batch* b, float gs, int backward, LossTerms* lt) {
    TrainActs* a = &m->acts;
    int L = m->config.n_layers, N = b->B * b->T, V = m->config.vocab_size;
    double W = 0.0;
    if (oc->objective == OBJ_RMU) { rmu_forget(m, oc, b, gs, backward, lt); return; }
    int* seq_of = xmalloc((size_t)N * sizeof(int));
    int n_seq = batch_sequences(b, seq_of);
    double* wseq = xcalloc(n_seq, sizeof(double));
    double* nseq = xcalloc(n_seq, sizeof(double));
    double* ref_nll = xcalloc(n_seq, sizeof(double));
    if (oc->objective == OBJ_NPO) {
        // the reference: the frozen base (LoRA: the adapter switched off)
        train_forward(m, &m->base, NULL, 0, b->inputs, b->pos, b->B, b->T, L);
        lt->tokens += N;
        train_nll(m, b, &W);
        sequence_sums(m, b, seq_of, n_seq, wseq, ref_nll);
    }
    if (oc->objective == OBJ_WHP) { whp_targets(m, oc, b); lt->tokens += (double)b->B * b->Tt * (oc->whp_reinforced ? 2 : 1); }
    double S = trained_nll(m, b, lt, &W);
    lt->forget_nll = W > 0 ? S / W : NAN;
    sequence_sums(m, b, seq_of, n_seq, wseq, nseq);
    clear_loss_grads(m, N);
    double g = oc->gamma;
    switch (oc->objective) {
        case OBJ_SFT: case OBJ_GA: case OBJ_GRADDIFF: case OBJ_KL: {
            double sign = oc->objective == OBJ_SFT ? 1.0 : -1.0; // descent (sft) or ascent
            lt->forget_term = W > 0 ? sign * g * S / W : 0.0;
            for (int i = 0; i < N; i++) a->dnll[i] = W > 0 ? (float)(gs * sign * g * b->weights[i] / W) : 0.0f;
            break;
        }
        case OBJ_NPO: case OBJ_SIMNPO: {
            // per sequence y (a row, or a packed sequence), log pi(y) = -sum w nll:
            // NPO:    (2/beta) softplus(beta (log pi - log pi_ref))
            // SimNPO: (2/beta) softplus(beta (log pi / |y|) + delta)
            int seqs = 0;
            for (int q = 0; q < n_seq; q++) seqs += wseq[q] > 0;
            double term = 0.0;
            double* coef = xcalloc(n_seq, sizeof(double));
            for (int q = 0; q < n_seq; q++) {
                if (wseq[q] <= 0) continue;
                double z, dz_dnll; // the softplus argument, and its derivative by each counted token's nll / w
                if (oc->objective == OBJ_NPO) {
                    z = oc->beta * (-nseq[q] + ref_nll[q]);
                    dz_dnll = -oc->beta;
                } else {
                    z = oc->beta * (-nseq[q] / wseq[q]) + oc->delta;
                    dz_dnll = -oc->beta / wseq[q];
                }
                term += 2.0 / oc->beta * softplus(z);
                coef[q] = 2.0 / oc->beta * sigmoid(z) * dz_dnll * g / seqs;
            }
            for (int i = 0; i < N; i++) a->dnll[i] = (float)(gs * coef[seq_of[i]] * b->weights[i]);
            free(coef);
            lt->forget_term = seqs ? g * term / seqs : 0.0;
            break;
        }
        case OBJ_WHP: {
            float* kl = a->dkl; // reuse as scratch, then overwrite with the gradient
            kl_forward(kl, a->logits, a->lse, a->ref, b->weights, N, V);
            double sum = 0.0;
            for (int i = 0; i < N; i++) sum += (double)b->weights[i] * kl[i];
            lt->forget_term = W > 0 ? g * sum / W : 0.0;
            for (int i = 0; i < N; i++) a->dkl[i] = W > 0 ? (float)(gs * g * b->weights[i] / W) : 0.0f;
            break;
        }
        default: die("internal: objective %d", oc->objective);
    }
    free(seq_of); free(wseq); free(nseq); free(ref_nll);
    if (backward) {
        train_loss_backward(m, b);
        train_backward(m, b->inputs, L);
    }
}

static void retain_part(TrainModel* m, const ObjectiveConfig* oc, const Batch* b, float gs, int backward, LossTerms* lt) {
    TrainActs* a = &m->acts;
    int L = m->config.n_layers, N = b->B * b->T, V = m->config.vocab_size;
    double W = 0.0;
    if (oc->objective == OBJ_RMU) { rmu_retain(m, oc, b, gs, backward, lt); return; }
    if (oc->retain_loss == RETAIN_KL) {
        train_forward(m, &m->base, NULL, 0, b->inputs, b->pos, b->B, b->T, L);
        lt->tokens += N;
        memcpy(a->ref, a->logits, (size_t)N * V * sizeof(float));
        log_softmax_rows(a->ref, N, V);
    }
    double S = trained_nll(m, b, lt, &W);
    lt->retain_nll = W > 0 ? S / W : NAN;
    clear_loss_grads(m, N);
    double lam = oc->lambda;
    if (oc->retain_loss == RETAIN_KL) {
        float* kl = a->dkl;
        kl_forward(kl, a->logits, a->lse, a->ref, b->weights, N, V);
        double sum = 0.0;
        for (int i = 0; i < N; i++) sum += (double)b->weights[i] * kl[i];
        lt->retain_kl = W > 0 ? sum / W : NAN;
        lt->retain_term = W > 0 ? lam * sum / W : 0.0;
        for (int i = 0; i < N; i++) a->dkl[i] = W > 0 ? (float)(gs * lam * b->weights[i] / W) : 0.0f;
    } else {
        lt->retain_term = W > 0 ? lam * S / W : 0.0;
        for (int i = 0; i < N; i++) a->dnll[i] = W > 0 ? (float)(gs * lam * b->weights[i] / W) : 0.0f;
    }
    if (backward) {
        train_loss_backward(m, b);
        train_backward(m, b->inputs, L);
    }
}

void train_objective(TrainModel* m, const ObjectiveConfig* oc, const Batch* forget, const Batch* retain,
                     float grad_scale, int backward, LossTerms* lt) {
    memset(lt, 0, sizeof(*lt));
    lt->forget_nll = lt->retain_nll = lt->retain_kl = NAN;
    if (forget) forget_part(m, oc, forget, grad_scale, backward, lt);
    if (retain && (oc->retain_loss != RETAIN_NONE || oc->objective == OBJ_RMU))
        retain_part(m, oc, retain, grad_scale, backward, lt);
    lt->loss = lt->forget_term + lt->retain_term;
}

// ----------------------------------------------------------------------------
// Optimiser

void train_zero_grads(TrainModel* m) { zero(m->grads, m->n_params); }

double train_grad_norm(const TrainModel* m) {
    double sum = 0.0;
    for (size_t i = 0; i < m->n_params; i++) sum += (double)m->grads[i] * m->grads[i];
    return sqrt(sum);
}

void train_scale_grads(TrainModel* m, float s) {
    for (size_t i = 0; i < m->n_params; i++) m->grads[i] *= s;
}

void train_adamw(TrainModel* m, float lr, float beta1, float beta2, float eps, float weight_decay, int t) {
    float bc1 = 1.0f - powf(beta1, (float)t), bc2 = 1.0f - powf(beta2, (float)t);
    #pragma omp parallel for schedule(static) if (PAR(m->n_params))
    for (size_t i = 0; i < m->n_params; i++) {
        float g = m->grads[i];
        float mi = beta1 * m->adam_m[i] + (1.0f - beta1) * g;
        float vi = beta2 * m->adam_v[i] + (1.0f - beta2) * g * g;
        m->adam_m[i] = mi;
        m->adam_v[i] = vi;
        float p = m->params[i];
        if (weight_decay > 0.0f && !(m->no_decay && m->no_decay[i])) p -= lr * weight_decay * p;
        p -= lr * (mi / bc1) / (sqrtf(vi / bc2) + eps);
        m->params[i] = p;
    }
}


// ----------------------------------------------------------------------------
// Target and layer parsing

int parse_targets(const char* s) {
    if (!strcmp(s, "all")) return (1 << LORA_N_TARGETS) - 1;
    if (!strcmp(s, "attn")) return (1 << LORA_Q) | (1 << LORA_K) | (1 << LORA_V) | (1 << LORA_O);
    if (!strcmp(s, "mlp")) return (1 << LORA_GATE) | (1 << LORA_UP) | (1 << LORA_DOWN);
    int mask = 0;
    const char* p = s;
    while (*p) {
        const char* e = strchr(p, ',');
        size_t n = e ? (size_t)(e - p) : strlen(p);
        int found = -1;
        for (int t = 0; t < LORA_N_TARGETS; t++) {
            const char* name = lora_target_name(t);
            // accept "q" and PEFT's "q_proj"
            if ((strlen(name) == n && !strncmp(p, name, n)) ||
                (n == strlen(name) + 5 && !strncmp(p, name, strlen(name)) && !strncmp(p + strlen(name), "_proj", 5)))
                found = t;
        }
        if (found < 0) return -1;
        mask |= 1 << found;
        p += n;
        if (*p == ',') p++;
    }
    return mask ? mask : -1;
}

// ----------------------------------------------------------------------------
// Data sets. Every row has T+1 tokens (inputs tokens[0..T-1], targets
// tokens[1..T]) and T weights (1 = this prediction counts; 0 = prompt,
// padding). Sources:
//   plain text (.txt)  the whole file as one token stream, cut into rows of T
//                      targets, each row starting with BOS (the 7 books, wiki text)
//   .tsv               question TAB answer [TAB anything]: a user question and
//                      the assistant's answer in the Llama-3 chat template
//   .jsonl             one object per line: {"text": ...} (plain text, every
//                      token counts), {"messages": [{"role":..,"content":..},..]}
//                      (chat, every assistant turn counts), or
//                      {"question": ..., "answer": ...}
// In chat rows only the assistant's tokens and their <|eot_id|> count.

static void dataset_reserve(Dataset* d, int cap) {
    if (cap <= d->cap) return;
    d->tokens = xrealloc(d->tokens, (size_t)cap * (d->T + 1) * sizeof(int));
    d->weights = xrealloc(d->weights, (size_t)cap * d->T * sizeof(float));
    d->len = xrealloc(d->len, (size_t)cap * sizeof(int));
    if (d->Tt > 0) {
        d->trans = xrealloc(d->trans, (size_t)cap * d->Tt * sizeof(int));
        d->label_pos = xrealloc(d->label_pos, (size_t)cap * d->T * sizeof(int));
    }
    d->cap = cap;
}

static void dataset_init(Dataset* d, int T, int Tt) {
    memset(d, 0, sizeof(*d));
    d->T = T;
    d->Tt = Tt;
    dataset_reserve(d, 64);
}

// A new row, every token pad, every weight 0 (WHP: no labels); returns its index
static int dataset_add_row(Dataset* d, int pad) {
    if (d->n == d->cap) dataset_reserve(d, 2 * d->cap);
    int r = d->n++, T = d->T;
    for (int i = 0; i <= T; i++) d->tokens[(size_t)r * (T + 1) + i] = pad;
    for (int i = 0; i < T; i++) d->weights[(size_t)r * T + i] = 0.0f;
    d->len[r] = T + 1;
    if (d->Tt > 0) {
        for (int i = 0; i < d->Tt; i++) d->trans[(size_t)r * d->Tt + i] = pad;
        for (int i = 0; i < T; i++) d->label_pos[(size_t)r * T + i] = -1;
    }
    return r;
}

void dataset_free(Dataset* d) {
    free(d->tokens); free(d->weights); free(d->trans); free(d->label_pos); free(d->len); free(d->pos);
    memset(d, 0, sizeof(*d));
}

static int pad_token(const Config* c) { return c->bos_id >= 0 ? c->bos_id : 0; }

// Rows of T targets from a token stream: BOS then T-1 inputs per row; without
// a BOS id, rows of T+1 tokens overlapping by one.
static void add_stream_rows(Dataset* d, const int* ids, int n, const Config* c) {
    int T = d->T, bos = c->bos_id;
    for (int start = 0; bos >= 0 ? start < n : start + 1 < n; start += T) {
        int r = dataset_add_row(d, pad_token(c));
        int* tk = d->tokens + (size_t)r * (T + 1);
        float* w = d->weights + (size_t)r * T;
        if (bos >= 0) {
            tk[0] = bos;
            for (int i = 0; i < T && start + i < n; i++) { tk[i + 1] = ids[start + i]; w[i] = 1.0f; }
            d->len[r] = 1 + (n - start < T ? n - start : T);
        } else {
            for (int i = 0; i <= T && start + i < n; i++) tk[i] = ids[start + i];
            for (int i = 0; i < T && start + i + 1 < n; i++) w[i] = 1.0f;
            d->len[r] = n - start < T + 1 ? n - start : T + 1;
        }
        for (int i = 0; i < T; i++) d->n_tokens += w[i] > 0;
    }
}

// One training example before tokenization
typedef struct {
    char* text;          // plain text (every token counts), or NULL
    ChatMessage* msgs;   // a conversation (role and content strings owned)
    int n_msgs;
    int is_qa;           // built from a question and an answer (--system applies)
} Example;

static void example_free(Example* e) {
    free(e->text);
    for (int i = 0; i < e->n_msgs; i++) { free((char*)e->msgs[i].role); free((char*)e->msgs[i].content); }
    free(e->msgs);
}

static void example_qa(Example* e, char* q, char* a) {
    memset(e, 0, sizeof(*e));
    e->msgs = xmalloc(2 * sizeof(ChatMessage));
    e->msgs[0].role = xstrdup("user"); e->msgs[0].content = q;
    e->msgs[1].role = xstrdup("assistant"); e->msgs[1].content = a;
    e->n_msgs = 2;
    e->is_qa = 1;
}

typedef struct { Example* v; int n, cap; } ExampleVec;

static Example* ev_push(ExampleVec* ev) {
    if (ev->n == ev->cap) {
        ev->cap = ev->cap ? 2 * ev->cap : 64;
        ev->v = xrealloc(ev->v, (size_t)ev->cap * sizeof(Example));
    }
    return &ev->v[ev->n++];
}

// question TAB answer [TAB more columns, ignored] (data.h's QA TSV reader;
// it takes text over)
static void parse_tsv(char* text, size_t len, ExampleVec* ev, const char* path) {
    QAFile f;
    qa_parse(&f, path, text, len);
    for (int i = 0; i < f.n; i++) example_qa(ev_push(ev), xstrdup(f.rows[i].question), xstrdup(f.rows[i].answer));
    qa_free(&f);
}

static int is_question_key(const char* k) {
    return !strcmp(k, "question") || !strcmp(k, "prompt") || !strcmp(k, "input") || !strcmp(k, "instruction");
}

static int is_answer_key(const char* k) {
    return !strcmp(k, "answer") || !strcmp(k, "response") || !strcmp(k, "completion") || !strcmp(k, "output");
}

// "messages": [{"role": "...", "content": "..."}, ...]
static void example_messages(Example* e, const JsonValue* msgs, const char* path, int line_no) {
    if (msgs->type != JSON_ARRAY) die("%s:%d: \"messages\" must be an array", path, line_no);
    e->msgs = xmalloc((msgs->n ? msgs->n : 1) * sizeof(ChatMessage));
    for (int i = 0; i < msgs->n; i++) {
        const JsonValue* m = &msgs->items[i];
        if (m->type != JSON_OBJECT) die("%s:%d: a message must be an object", path, line_no);
        const char* role = json_get_string(m, "role");
        const char* content = json_get_string(m, "content");
        if (!role || !content) die("%s:%d: a message needs \"role\" and \"content\" strings", path, line_no);
        if (strcmp(role, "system") && strcmp(role, "user") && strcmp(role, "assistant"))
            die("%s:%d: unknown role \"%s\" (system, user, assistant)", path, line_no, role);
        e->msgs[e->n_msgs].role = xstrdup(role);
        e->msgs[e->n_msgs].content = xstrdup(content);
        e->n_msgs++;
    }
}

// One object per line (data.h's JSON-lines reader): "text", "messages", or
// a question key and an answer key (a key given twice: the last counts)
static void parse_jsonl(const char* text, size_t len, ExampleVec* ev, const char* path) {
    JsonLines jl;
    jsonl_init(&jl, path, text, len);
    JsonValue v;
    while (jsonl_next(&jl, &v)) {
        int line_no = jl.line_no;
        if (v.type != JSON_OBJECT) die("%s:%d: expected a JSON object per line", path, line_no);
        const char *plain = NULL, *question = NULL, *answer = NULL;
        const JsonValue* messages = NULL;
        for (int k = 0; k < v.n; k++) {
            const char* key = v.keys[k];
            const JsonValue* x = &v.items[k];
            if (!strcmp(key, "messages")) messages = x;
            else if (x->type != JSON_STRING) continue;
            else if (!strcmp(key, "text")) plain = x->string;
            else if (is_question_key(key)) question = x->string;
            else if (is_answer_key(key)) answer = x->string;
        }
        if (plain && messages) die("%s:%d: an example has \"text\" or \"messages\", not both", path, line_no);
        if (plain || messages) {
            Example* e = ev_push(ev);
            memset(e, 0, sizeof(*e));
            if (plain) e->text = xstrdup(plain);
            else example_messages(e, messages, path, line_no);
        } else if (question && answer) {
            example_qa(ev_push(ev), xstrdup(question), xstrdup(answer));
        } else {
            die("%s:%d: an example needs \"text\", \"messages\", or \"question\" and \"answer\"", path, line_no);
        }
        json_free(&v);
    }
    jsonl_close(&jl);
}

// A conversation in the Llama-3 template, one row; the tokens of every
// assistant message (content and <|eot_id|>) count. Longer ones are cut.
static void add_chat_row(Dataset* d, const Tokenizer* tok, const Config* c, const ChatMessage* msgs, int n_msgs,
                         const char* path, int index) {
    int cap = 64;
    for (int i = 0; i < n_msgs; i++) cap += (int)strlen(msgs[i].content) + (int)strlen(msgs[i].role) + 16;
    int* full = xmalloc(cap * sizeof(int));
    int* part = xmalloc(cap * sizeof(int));
    unsigned char* counted = xcalloc(cap, 1);
    int nf = chat_encode(tok, msgs, n_msgs, 0, 1, full, cap);
    for (int j = 0; j < n_msgs; j++) {
        if (strcmp(msgs[j].role, "assistant")) continue;
        int a = chat_encode(tok, msgs, j, 1, 1, part, cap);       // ... up to the assistant header
        int b = chat_encode(tok, msgs, j + 1, 0, 1, part, cap);   // ... through its <|eot_id|>
        if (a > b || b > nf || memcmp(part, full, b * sizeof(int)) != 0)
            die("%s: example %d: the chat template of a prefix is not a prefix of the conversation", path, index);
        for (int t = a; t < b; t++) counted[t] = 1;
    }
    int T = d->T, len = nf < T + 1 ? nf : T + 1, any = 0;
    for (int i = 1; i < len; i++) any |= counted[i];
    if (!any) {
        d->skipped++;
    } else {
        int r = dataset_add_row(d, pad_token(c));
        memcpy(d->tokens + (size_t)r * (T + 1), full, len * sizeof(int));
        d->len[r] = len;
        for (int i = 0; i + 1 < len; i++) {
            d->weights[(size_t)r * T + i] = counted[i + 1] ? 1.0f : 0.0f;
            d->n_tokens += counted[i + 1];
        }
        if (nf > T + 1) d->truncated++;
    }
    free(full); free(part); free(counted);
}

// --pack: rows are packed together, best fit decreasing (longest first,
// each into the fullest row that still has room, ties by order: the result
// is deterministic). Each keeps its own positions (0, 1, ...) and attends
// only to itself. The entry that reads a sequence's last token would predict
// the next sequence's BOS: it never counts. Padding continues the last
// sequence's positions and never counts.
static int* g_pack_len; // for the sort below
static int cmp_len_desc(const void* a, const void* b) {
    int x = *(const int*)a, y = *(const int*)b;
    if (g_pack_len[x] != g_pack_len[y]) return g_pack_len[y] - g_pack_len[x];
    return x - y;
}

static void dataset_pack(Dataset* d, const Config* c) {
    int T = d->T, n = d->n;
    if (n == 0) return;
    int* order = xmalloc((size_t)n * sizeof(int));
    int* bin_of = xmalloc((size_t)n * sizeof(int));
    for (int r = 0; r < n; r++) order[r] = r;
    g_pack_len = d->len;
    qsort(order, n, sizeof(int), cmp_len_desc);
    // open bins by free space: a stack per amount of free tokens
    int* head = xmalloc((size_t)(T + 2) * sizeof(int));
    int* next = xmalloc((size_t)n * sizeof(int));
    int* free_tokens = xmalloc((size_t)n * sizeof(int));
    for (int k = 0; k <= T + 1; k++) head[k] = -1;
    int n_bins = 0;
    for (int q = 0; q < n; q++) {
        int r = order[q], len = d->len[r], bin = -1;
        for (int k = len; k <= T + 1 && bin < 0; k++)
            if (head[k] >= 0) { bin = head[k]; head[k] = next[bin]; }
        if (bin < 0) { bin = n_bins++; free_tokens[bin] = T + 1; }
        bin_of[r] = bin;
        free_tokens[bin] -= len;
        next[bin] = head[free_tokens[bin]];
        head[free_tokens[bin]] = bin;
    }
    // build the packed rows (members in their original order)
    int* tokens = xmalloc((size_t)n_bins * (T + 1) * sizeof(int));
    float* weights = xcalloc((size_t)n_bins * T, sizeof(float));
    int* pos = xmalloc((size_t)n_bins * T * sizeof(int));
    int* used = xcalloc(n_bins, sizeof(int));
    for (size_t i = 0; i < (size_t)n_bins * (T + 1); i++) tokens[i] = pad_token(c);
    for (int r = 0; r < n; r++) {
        int b = bin_of[r], len = d->len[r], at = used[b];
        memcpy(tokens + (size_t)b * (T + 1) + at, d->tokens + (size_t)r * (T + 1), len * sizeof(int));
        for (int i = 0; i < len - 1; i++) weights[(size_t)b * T + at + i] = d->weights[(size_t)r * T + i];
        for (int i = 0; i < len && at + i < T; i++) pos[(size_t)b * T + at + i] = i;
        used[b] += len;
    }
    for (int b = 0; b < n_bins; b++) {
        int* pb = pos + (size_t)b * T;
        for (int i = used[b]; i < T; i++) pb[i] = i > 0 ? pb[i - 1] + 1 : 0;
    }
    free(d->tokens); free(d->weights); free(d->pos);
    d->tokens = tokens;
    d->weights = weights;
    d->pos = pos;
    for (int b = 0; b < n_bins; b++) d->len[b] = used[b];
    d->n = d->cap = n_bins;
    free(used); free(order); free(bin_of); free(head); free(next); free(free_tokens);
}

double dataset_padding(const Dataset* d) {
    double used = 0.0;
    for (int r = 0; r < d->n; r++) used += d->len[r] - 1; // inputs in use
    return 1.0 - used / ((double)d->n * d->T);
}

static int ends_with(const char* s, const char* suffix) {
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && !strcmp(s + a - b, suffix);
}

static int* encode_all(const Tokenizer* tok, const char* text, size_t len, int* n) {
    if (len > (size_t)0x7ffffff0) die("text too large (%zu bytes)", len);
    int* ids = xmalloc((len + 1) * sizeof(int));
    *n = encode(tok, text, len, 0, ids, (int)len + 1);
    return ids;
}

void dataset_load(Dataset* d, const Tokenizer* tok, const Config* c, const char* path, const char* format,
                         const char* system, int T, int pack) {
    int kind = 0; // 0 text, 1 tsv, 2 jsonl
    if (!strcmp(format, "auto")) kind = ends_with(path, ".tsv") ? 1 : (ends_with(path, ".jsonl") ? 2 : 0);
    else if (!strcmp(format, "tsv")) kind = 1;
    else if (!strcmp(format, "jsonl")) kind = 2;
    else if (strcmp(format, "text")) die("unknown --format %s (auto, text, tsv, jsonl)", format);
    size_t len;
    char* text = read_file(path, &len);
    dataset_init(d, T, 0);
    if (kind == 0) {
        int n;
        int* ids = encode_all(tok, text, len, &n);
        if (n < 2) die("%s has too little text (%d tokens)", path, n);
        add_stream_rows(d, ids, n, c);
        free(ids);
        free(text);
        if (pack) dataset_pack(d, c);
        return;
    }
    // the readers refuse a NUL byte (rows are C strings) and invalid UTF-8
    ExampleVec ev = {0};
    if (kind == 1) {
        parse_tsv(text, len, &ev, path);
    } else {
        parse_jsonl(text, len, &ev, path);
        free(text);
    }
    if (ev.n == 0) die("%s has no examples", path);
    for (int i = 0; i < ev.n; i++) {
        Example* e = &ev.v[i];
        if (e->text) {
            int n;
            int* ids = encode_all(tok, e->text, strlen(e->text), &n);
            if (n > 0) add_stream_rows(d, ids, n, c);
            free(ids);
        } else if (e->is_qa && system) {
            ChatMessage msgs[3] = {{"system", system}, e->msgs[0], e->msgs[1]};
            add_chat_row(d, tok, c, msgs, 3, path, i + 1);
        } else {
            add_chat_row(d, tok, c, e->msgs, e->n_msgs, path, i + 1);
        }
        example_free(e);
    }
    free(ev.v);
    if (d->n == 0) die("%s: no example has anything to learn within %d positions (raise --seq-len)", path, T);
    if (d->skipped)
        fprintf(stderr, "warning: %s: %d examples with no assistant token within %d positions were skipped\n", path,
                d->skipped, T);
    if (d->truncated) fprintf(stderr, "warning: %s: %d examples were cut at %d positions\n", path, d->truncated, T);
    if (pack) dataset_pack(d, c);
}

// --- WHP: anchored terms -> generic translations ------------------------------

int load_dict(const char* path, Term** out) {
    size_t len;
    char* text = read_file(path, &len);
    if (strlen(text) != len) die("%s holds a NUL byte", path);
    int n = 0, cap = 64, line_no = 0;
    Term* t = xmalloc(cap * sizeof(Term));
    char* p = text;
    while (*p) {
        char* e = strchr(p, '\n');
        size_t l = e ? (size_t)(e - p) : strlen(p);
        char* next = e ? e + 1 : p + l; // before the '\r' is cut: a last line "...\r" must not stall
        line_no++;
        if (l && p[l - 1] == '\r') l--;
        if (l > 0 && p[0] != '#') {
            char* tab = memchr(p, '\t', l);
            if (!tab || tab == p) die("%s:%d: expected anchored<TAB>generic", path, line_no);
            if (n == cap) { cap *= 2; t = xrealloc(t, cap * sizeof(Term)); }
            const char* to = tab + 1;
            const char* tab2 = memchr(to, '\t', l - (size_t)(tab - p) - 1); // further columns are ignored
            t[n].from = xstrndup(p, (size_t)(tab - p));
            t[n].to = xstrndup(to, tab2 ? (size_t)(tab2 - to) : l - (size_t)(tab - p) - 1);
            t[n].from_len = (size_t)(tab - p);
            n++;
        }
        p = next;
    }
    free(text);
    if (n == 0) die("%s has no entries", path);
    *out = t;
    return n;
}

void free_dict(Term* terms, int n) {
    for (int k = 0; k < n; k++) { free(terms[k].from); free(terms[k].to); }
    free(terms);
}

typedef struct { int* v; size_t n, cap; } IntVec;

static void iv_push(IntVec* a, int x) {
    if (a->n == a->cap) { a->cap = a->cap ? 2 * a->cap : 1024; a->v = xrealloc(a->v, a->cap * sizeof(int)); }
    a->v[a->n++] = x;
}

static int word_byte(unsigned char ch) { return ch >= 0x80 || (ch >= '0' && ch <= '9') || ((ch | 32) >= 'a' && (ch | 32) <= 'z') || ch == '_'; }

static int cmp_term_len(const void* a, const void* b) {
    const Term* x = a;
    const Term* y = b;
    return (y->from_len > x->from_len) - (y->from_len < x->from_len);
}

// Encodes a segment and appends its ids to the original stream, and (when
// `to` is NULL) the same ids to the translated stream, aligned one to one.
static void whp_segment(const Tokenizer* tok, const char* s, size_t len, const char* to, size_t to_len,
                        IntVec* orig, IntVec* trans, IntVec* amap, int* buf, int buf_cap) {
    if (len == 0) return;
    int n = encode(tok, s, len, 0, buf, buf_cap);
    if (!to) {
        for (int i = 0; i < n; i++) { iv_push(orig, buf[i]); iv_push(amap, (int)trans->n); iv_push(trans, buf[i]); }
        return;
    }
    // an anchored term: its tokens but the last are not labelled (they spell
    // the term); the last is aligned with the last token of the generic term
    int last = buf[n - 1];
    for (int i = 0; i < n - 1; i++) { iv_push(orig, buf[i]); iv_push(amap, -1); }
    int m = encode(tok, to, to_len, 0, buf, buf_cap);
    for (int i = 0; i < m; i++) iv_push(trans, buf[i]);
    iv_push(orig, last);
    iv_push(amap, m > 0 ? (int)trans->n - 1 : -1);
}

// WHP rows: the text with its anchored terms (whole words, a leading space
// included) replaced by their generic translations; position p of a row
// (which reads original token X) is labelled by the base model's prediction
// at the aligned position of the translated row. Predictions inside an
// anchored term are not counted.
void dataset_whp(Dataset* d, const Tokenizer* tok, const Config* c, const char* path, Term* terms, int nt,
                        int T) {
    if (c->bos_id < 0) die("the whp objective needs a model with a BOS token");
    size_t len;
    char* text = read_file(path, &len);
    qsort(terms, nt, sizeof(Term), cmp_term_len); // longest match first
    int buf_cap = 1 << 16;
    int* buf = xmalloc(buf_cap * sizeof(int));
    IntVec orig = {0}, trans = {0}, amap = {0};
    unsigned char first[256] = {0}; // bytes that start some term: a quick filter
    for (int k = 0; k < nt; k++) first[(unsigned char)terms[k].from[0]] = 1;
    size_t seg = 0, n_terms = 0;
    for (size_t i = 0; i < len;) {
        int hit = -1;
        if (first[(unsigned char)text[i]] && !(i > 0 && word_byte((unsigned char)text[i - 1])))
            for (int k = 0; k < nt; k++) {
                size_t fl = terms[k].from_len;
                if (i + fl <= len && !memcmp(text + i, terms[k].from, fl) &&
                    !(i + fl < len && word_byte((unsigned char)text[i + fl]))) { hit = k; break; }
            }
        if (hit < 0) {
            i++;
            // keep segments short enough for the encode buffer
            if (i - seg >= (size_t)buf_cap / 2 && (text[i - 1] == '\n' || i - seg >= (size_t)buf_cap - 16)) {
                whp_segment(tok, text + seg, i - seg, NULL, 0, &orig, &trans, &amap, buf, buf_cap);
                seg = i;
            }
            continue;
        }
        size_t start = i > seg && text[i - 1] == ' ' ? i - 1 : i;
        whp_segment(tok, text + seg, start - seg, NULL, 0, &orig, &trans, &amap, buf, buf_cap);
        size_t tl = strlen(terms[hit].to);
        char* to = xmalloc(tl + 2);
        size_t k = 0;
        if (start < i) to[k++] = ' ';
        memcpy(to + k, terms[hit].to, tl);
        k += tl;
        whp_segment(tok, text + start, i + terms[hit].from_len - start, to, k, &orig, &trans, &amap, buf, buf_cap);
        free(to);
        i += terms[hit].from_len;
        seg = i;
        n_terms++;
    }
    whp_segment(tok, text + seg, len - seg, NULL, 0, &orig, &trans, &amap, buf, buf_cap);
    free(text);
    free(buf);
    int n = (int)orig.n;
    if (n < 2) die("%s has too little text", path);
    int Tt = T + T / 2, rows = (n + T - 1) / T, bos = c->bos_id;
    dataset_init(d, T, Tt);
    for (int r = 0; r < rows; r++) {
        dataset_add_row(d, bos);
        int start = r * T;
        int* tk = d->tokens + (size_t)r * (T + 1);
        tk[0] = bos;
        for (int i = 0; i < T; i++) tk[i + 1] = start + i < n ? orig.v[start + i] : bos;
        // the translated span aligned with this row's positions 1..T-1
        int j0 = -1, j1 = -1;
        for (int p = 1; p < T && start + p < n; p++) {
            int j = amap.v[start + p - 1];
            if (j < 0) continue;
            if (j0 < 0 || j < j0) j0 = j;
            if (j > j1) j1 = j;
        }
        int* tr = d->trans + (size_t)r * Tt;
        tr[0] = bos;
        for (int q = 1; q < Tt; q++) tr[q] = j0 >= 0 && j0 + q - 1 <= j1 ? trans.v[j0 + q - 1] : bos;
        for (int p = 1; p < T && start + p < n; p++) {
            int j = amap.v[start + p - 1];
            if (j < 0 || 1 + j - j0 >= Tt) continue;
            d->label_pos[(size_t)r * T + p] = 1 + j - j0;
            d->weights[(size_t)r * T + p] = 1.0f;
            d->n_tokens++;
        }
    }
    printf("whp: %s: %zu anchored terms replaced, %d tokens, %d rows\n", path, n_terms, n, rows);
    free(orig.v); free(trans.v); free(amap.v);
}

// ----------------------------------------------------------------------------
// Batches: a seeded shuffle per epoch; (epoch, cursor) is the whole state

static void loader_shuffle(Loader* ld) {
    int n = ld->d->n;
    for (int i = 0; i < n; i++) ld->perm[i] = i;
    uint64_t rng = hash64(ld->seed ^ hash64(0x5eed0000ull + (uint64_t)ld->epoch));
    for (int i = n - 1; i > 0; i--) {
        int j = (int)(splitmix64(&rng) % (uint64_t)(i + 1));
        int t = ld->perm[i]; ld->perm[i] = ld->perm[j]; ld->perm[j] = t;
    }
}

void loader_init(Loader* ld, const Dataset* d, uint64_t seed, int epoch, int cursor) {
    ld->d = d;
    ld->seed = seed;
    ld->epoch = epoch;
    ld->cursor = cursor;
    ld->perm = xmalloc((size_t)d->n * sizeof(int));
    loader_shuffle(ld);
}

void batch_alloc(Batch* b, int B, int T, int Tt, int packed) {
    memset(b, 0, sizeof(*b));
    b->B = B; b->T = T; b->Tt = Tt;
    if (packed) b->pos = xcalloc((size_t)B * T, sizeof(int));
    b->inputs = xcalloc((size_t)B * T, sizeof(int));
    b->targets = xcalloc((size_t)B * T, sizeof(int));
    b->weights = xcalloc((size_t)B * T, sizeof(float));
    if (Tt > 0) {
        b->trans_inputs = xcalloc((size_t)B * Tt, sizeof(int));
        b->label_pos = xcalloc((size_t)B * T, sizeof(int));
    }
}

void batch_free(Batch* b) {
    free(b->pos);
    free(b->inputs); free(b->targets); free(b->weights); free(b->trans_inputs); free(b->label_pos);
}

static void batch_set_row(Batch* b, int r, const Dataset* d, int ex) {
    int T = d->T;
    const int* tk = d->tokens + (size_t)ex * (T + 1);
    for (int i = 0; i < T; i++) {
        b->inputs[r * T + i] = tk[i];
        b->targets[r * T + i] = tk[i + 1];
        b->weights[r * T + i] = d->weights[(size_t)ex * T + i];
    }
    if (b->pos) memcpy(b->pos + (size_t)r * T, d->pos + (size_t)ex * T, T * sizeof(int));
    if (b->Tt > 0) {
        memcpy(b->trans_inputs + (size_t)r * b->Tt, d->trans + (size_t)ex * d->Tt, b->Tt * sizeof(int));
        memcpy(b->label_pos + (size_t)r * T, d->label_pos + (size_t)ex * T, T * sizeof(int));
    }
}

void loader_next(Loader* ld, Batch* b) {
    for (int r = 0; r < b->B; r++) {
        batch_set_row(b, r, ld->d, ld->perm[ld->cursor]);
        if (++ld->cursor == ld->d->n) { ld->epoch++; ld->cursor = 0; loader_shuffle(ld); }
    }
}

// ----------------------------------------------------------------------------
// Evaluation for early stopping: mean NLL over the first rows of a set

double train_eval_nll(TrainModel* m, const Dataset* d, int rows, Batch* b) {
    double S = 0.0, W = 0.0;
    int L = m->config.n_layers, B = b->B;
    if (rows > d->n) rows = d->n;
    for (int r0 = 0; r0 < rows; r0 += B) {
        int k = rows - r0 < B ? rows - r0 : B;
        for (int r = 0; r < k; r++) batch_set_row(b, r, d, r0 + r);
        Batch sub = *b;
        sub.B = k;
        train_forward(m, &m->w, trainable_lora(m), 0, sub.inputs, sub.pos, k, sub.T, L);
        double w;
        S += train_nll(m, &sub, &w);
        W += w;
    }
    return W > 0 ? S / W : NAN;
}
