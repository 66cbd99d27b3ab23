// run.h -- the public API of the unlearn.c engine: engine.c (model, forward
// pass, LoRA, sampling, chat template, generation, utilities), tokenizer.c
// (the Llama-3 tokenizer) and kernels.c (GEMM, int8 matmuls, vector ops).
//
// Every program in this directory (run, train_lora, sae, guard, test_all)
// links the same engine: one model loader, one tokenizer, one forward pass,
// one matmul. This header is the contract between them, and it also
// documents the two binary file formats the engine reads.
#ifndef RUN_H
#define RUN_H

#include <stdint.h>
#include <stddef.h>

// ----------------------------------------------------------------------------
// Model file format (written by `export.py model`, read by load_model)
//
// All integers little-endian int32 unless noted, floats IEEE fp32.
// The file starts with a 256-byte header:
//
//   offset  field
//   0       uint32 magic = MODEL_MAGIC ("ULC3" as bytes 'U','L','C','3')
//   4       int32  version = MODEL_VERSION
//   8       int32  dim               hidden size
//   12      int32  hidden_dim        MLP intermediate size
//   16      int32  n_layers
//   20      int32  n_heads           query heads
//   24      int32  n_kv_heads        key/value heads (GQA when < n_heads)
//   28      int32  head_dim          usually dim / n_heads
//   32      int32  vocab_size
//   36      int32  max_seq_len       max_position_embeddings of the checkpoint
//   40      float  rope_theta
//   44      int32  rope_scaling      0 = none (the next four fields are then 0), 1 = "llama3"
//   48      float  rope_factor       llama3 scaling: factor
//   52      float  rope_low_freq_factor
//   56      float  rope_high_freq_factor
//   60      int32  rope_original_max_pos  original_max_position_embeddings
//   64      float  norm_eps          rms_norm_eps
//   68      int32  tied_embeddings   1 = classifier is the token embedding
//   72      int32  weight_type       0 = fp32, 1 = int8 Q8_0
//   76      int32  group_size        Q8_0 group (64 by default); 0 for fp32
//   80      int32  bos_id
//   84      int32  n_eos             number of valid entries in eos_ids
//   88      int32  eos_ids[8]        every id that ends generation (unused slots -1)
//   120..255 zero
//
// Then the tensors, in this order, each starting at an offset that is a
// multiple of 64 bytes (zero padding in between and after the last one, so
// the file size is a multiple of 64). "matrix" below means a
// row-major [rows, cols] weight as Hugging Face stores it (y = W x,
// W[out, in]); stacked over layers, layer-major. q_proj and k_proj keep the
// Hugging Face row layout: RoPE rotates the pairs (j, j + head_dim/2) of
// each head ("rotate_half"), so no weight permutation exists anywhere.
//
//   token_embedding  matrix [vocab_size, dim]
//   rms_att          fp32   [n_layers, dim]          input_layernorm
//   wq               matrix [n_layers, n_heads*head_dim, dim]
//   wk               matrix [n_layers, n_kv_heads*head_dim, dim]
//   wv               matrix [n_layers, n_kv_heads*head_dim, dim]
//   wo               matrix [n_layers, dim, n_heads*head_dim]
//   rms_ffn          fp32   [n_layers, dim]          post_attention_layernorm
//   w_gate           matrix [n_layers, hidden_dim, dim]
//   w_up             matrix [n_layers, hidden_dim, dim]
//   w_down           matrix [n_layers, dim, hidden_dim]
//   rms_final        fp32   [dim]
//   wcls             matrix [vocab_size, dim]        only when not tied
//
// A matrix of weight_type 0 is one fp32 block of rows*cols floats.
// A matrix of weight_type 1 (Q8_0) is two blocks, each 64-byte aligned:
//   q  int8 [rows*cols]                   round(w / scale), in [-127, 127]
//   s  fp32 [rows*cols / group_size]      scale = max|w| / 127 of each group
// (for stacked tensors: all layers' q, then all layers' s). Groups run
// along a row, so cols must be a multiple of group_size. The loader checks
// magic, version, sane dims and the exact file size, and refuses anything
// else.

#define MODEL_MAGIC 0x33434c55u   // "ULC3" read as little-endian uint32
#define MODEL_VERSION 1
#define MODEL_HEADER_BYTES 256
#define TENSOR_ALIGN 64
#define MAX_EOS 8

enum { WEIGHT_FP32 = 0, WEIGHT_Q8 = 1 };
enum { ROPE_NONE = 0, ROPE_LLAMA3 = 1 };

typedef struct {
    int dim;            // hidden size (4096 for 8B)
    int hidden_dim;     // MLP intermediate size (14336 for 8B)
    int n_layers;
    int n_heads;
    int n_kv_heads;
    int head_dim;
    int vocab_size;
    int max_seq_len;    // what the checkpoint supports; the KV cache uses RunState.seq_len
    float rope_theta;
    int rope_scaling;
    float rope_factor;
    float rope_low_freq_factor;
    float rope_high_freq_factor;
    int rope_original_max_pos;
    float norm_eps;
    int tied_embeddings;
    int weight_type;
    int group_size;
    int bos_id;
    int n_eos;
    int eos_ids[MAX_EOS];
} Config;

// A weight matrix: either fp32 (f != NULL) or Q8_0 (q, s != NULL).
// Points into the mmap'd file, or into heap memory for trainable weights.
typedef struct {
    float* f;        // (rows, cols) fp32, or NULL
    int8_t* q;       // (rows, cols) int8, or NULL
    float* s;        // (rows * cols / group_size) scales, or NULL
    int rows;
    int cols;
    int group_size;
} Matrix;

// Per-layer view of the weights. Pointers point into the mapping.
typedef struct {
    float* rms_att;  // (dim,)
    float* rms_ffn;  // (dim,)
    Matrix wq;       // (n_heads*head_dim, dim)
    Matrix wk;       // (n_kv_heads*head_dim, dim)
    Matrix wv;       // (n_kv_heads*head_dim, dim)
    Matrix wo;       // (dim, n_heads*head_dim)
    Matrix w_gate;   // (hidden_dim, dim)
    Matrix w_up;     // (hidden_dim, dim)
    Matrix w_down;   // (dim, hidden_dim)
} LayerWeights;

typedef struct {
    Matrix token_embedding; // (vocab_size, dim)
    LayerWeights* layers;   // (n_layers,)
    float* rms_final;       // (dim,)
    Matrix wcls;            // (vocab_size, dim); same memory as token_embedding when tied
} Weights;

// LoRA adapters (applied unmerged: y = W x + (alpha/rank) * B (A x)).
// The seven targets, in this order, everywhere (files, CLI, PEFT names).
enum { LORA_Q, LORA_K, LORA_V, LORA_O, LORA_GATE, LORA_UP, LORA_DOWN, LORA_N_TARGETS };

typedef struct {
    float* a;        // (rank, in) or NULL when this target/layer has no adapter
    float* b;        // (out, rank)
} LoraPair;

typedef struct {
    int rank;
    float alpha;
    float scale;                    // alpha / rank
    int target_mask;                // bit t set = target t adapted
    int layer_begin, layer_end;     // adapted layers [begin, end)
    LoraPair (*pairs)[LORA_N_TARGETS]; // (n_layers, LORA_N_TARGETS)
    void* memory;                   // owns every a/b buffer
} Lora;

// Scratch of the int8 matmuls (kernels.c): quantized rows of x, and per thread
// the packed weight panels of matmul_q8's GEMM (allocated only in builds
// that have it). kc may be lowered after q8_scratch_init (tests do), never raised.
typedef struct {
    int n_cap, max_cols, gs, kc, n_threads;
    size_t bytes;         // all buffers together
    int8_t* xq;           // (n_cap, max_cols) quantized rows of x
    float* xs;            // (n_cap, max_cols / gs) their scales
    int32_t* xcorr;       // (n_cap, kc / gs) -128 * the sum of each group's bytes (GEMM)
    uint8_t* panels;      // (n_threads, 32 * kc) packed weight panels (GEMM)
    float* panel_scales;  // (n_threads, 32 * kc / gs) their scales
    float* pack_tmp;      // (n_threads, 32 * gs) dequantized values while requantizing W^T
} Q8Scratch;

// The residual-stream hook: called after every transformer block with the
// residual stream x (n_pos, dim) of positions pos0 .. pos0+n_pos-1, after the
// block's output has been added ("resid_post" of layer `layer`). The hook may
// read and modify x in place. Used by SAE capture/ablation.
typedef void (*ResidualHook)(void* ctx, int layer, int pos0, int n_pos, float* x, int dim);

// Activation buffers for inference. Prompts are processed in chunks of up to
// batch_cap positions; single-token decode is a chunk of one (row 0).
typedef struct {
    int seq_len;         // KV cache length (the -c option), <= max_seq_len
    int batch_cap;       // positions per prefill chunk
    int n_threads;       // rows of the att scratch (one per OpenMP thread)
    float* x;            // (batch_cap, dim) residual stream
    float* xb;           // (batch_cap, dim) RMS-normed input of a sublayer
    float* att_out;      // (batch_cap, n_heads*head_dim) attention output, before wo
    float* xb2;          // (batch_cap, dim) sublayer output (wo or w_down)
    float* hb;           // (batch_cap, hidden_dim) gate, then silu(gate) * up
    float* hb2;          // (batch_cap, hidden_dim) up
    float* q;            // (batch_cap, n_heads*head_dim)
    float* k;            // (batch_cap, n_kv_heads*head_dim)
    float* v;            // (batch_cap, n_kv_heads*head_dim)
    float* rope_cos;     // (batch_cap, head_dim/2) cos(pos * inv_freq) of the chunk's positions
    float* rope_sin;     // (batch_cap, head_dim/2)
    float* att;          // (n_threads, batch_cap, seq_len) attention probabilities of one head
    float* logits;       // (vocab_size,) logits of the chunk's last position
    float* lora_tmp;     // (batch_cap, lora rank) A x, allocated when an adapter is set
    Q8Scratch q8;        // int8 matmul scratch (quantized activations, packed panels); empty for fp32
    float* key_cache;    // (n_layers, seq_len, n_kv_heads*head_dim)
    float* value_cache;  // (n_layers, seq_len, n_kv_heads*head_dim)
    float* rope_inv_freq;// (head_dim/2,) with llama3 scaling applied
} RunState;

typedef struct {
    Config config;
    Weights weights;
    RunState state;
    Lora* lora;          // optional adapter, NULL when none
    ResidualHook hook;   // optional, NULL when none
    void* hook_ctx;
    // memory mapping
    int fd;
    void* data;
    size_t file_size;
} Transformer;

// Load a model file and allocate run state with a KV cache of ctx positions
// (ctx <= 0: min(max_seq_len, 4096)). Exits with a message on any error.
void build_transformer(Transformer* t, const char* path, int ctx);
void free_transformer(Transformer* t);
// Parse and validate a model header from memory (used by the loader and the
// fuzzer); returns 0 on success, or writes a one-line reason to err.
int parse_model_header(const void* data, size_t size, Config* c, char* err, size_t errlen);
size_t model_file_size(const Config* c); // the exact size a valid file has
// Bytes one matrix (count copies of rows x cols, stacked) takes in the file,
// padding included: fp32, or int8 plus its scales.
size_t matrix_bytes(const Config* c, size_t count, size_t rows, size_t cols);

// One token at position pos, through the KV cache. Returns logits (vocab_size,).
float* forward(Transformer* t, int token, int pos);
// n tokens at positions pos0..pos0+n-1 (the prompt path: one matmul per
// projection per chunk of batch_cap positions). Fills the KV cache. Returns
// the last position's logits (vocab_size,); if all_logits is not NULL it also
// receives every position's logits (n, vocab_size).
float* forward_batch(Transformer* t, const int* tokens, int n, int pos0, float* all_logits);

// Shared kernels (kernels.c): every program multiplies matrices through these.
// Multiply-adds below which a loop runs on the calling thread alone (the
// toy model's 128 x 128 projections; every Llama-3 projection is far above).
#define PARALLEL_MIN_WORK (1L << 17)
// C (M,N) = alpha * op(A) @ op(B) + beta * C, row-major, op(X) = X or X^T,
// exactly cblas_sgemm's contract. cblas_sgemm when built with OpenBLAS,
// plain C loops (OpenMP) otherwise.
void gemm(int trans_a, int trans_b, int M, int N, int K, float alpha, const float* A, int lda,
          const float* B, int ldb, float beta, float* C, int ldc);
// "OpenBLAS (core Haswell), 2 threads" or "plain C GEMM, 2 threads".
const char* engine_build_info(void);
// The plain C version, always compiled: the reference the BLAS path is tested against.
void gemm_portable(int trans_a, int trans_b, int M, int N, int K, float alpha, const float* A, int lda,
                   const float* B, int ldb, float beta, float* C, int ldc);
// y (n, w->rows) = x (n, w->cols) @ W^T, for fp32 or Q8_0 W. With Q8_0, x is
// quantized per group and multiplied in int32: dot products for a few rows
// (decoding), matmul_q8's GEMM for more where the build has it.
void matmul(float* y, const float* x, const Matrix* w, int n, Q8Scratch* q8);
// Int8 matrix-matrix product with a Q8_0 W (see kernels.c, "Int8 matrix-matrix
// products"), x quantized per group of its rows:
//   trans 0: y (n, w->rows) (+)= x (n, w->cols) @ W^T
//   trans 1: y (n, w->cols) (+)= x (n, w->rows) @ W, W^T requantized along its rows
// accumulate: add to y instead of overwriting it. matmul_q8_fast says whether
// this build has the fast kernel for W (AVX-512 VNNI; the transposed case
// also needs group_size % 32 == 0 and rows % group_size == 0); without it
// matmul_q8 runs matmul_q8_portable, the plain C reference it equals bit for bit.
void matmul_q8(float* y, const float* x, const Matrix* w, int n, int trans, int accumulate, Q8Scratch* q8);
// One Q8_0 group: q (gs,) = round(x / scale), returns scale = max|x| / 127
// (NaN when x holds a NaN or Inf). quantize_group is SIMD where built, equal
// bit for bit to quantize_group_portable.
float quantize_group(int8_t* q, const float* x, int gs);
float quantize_group_portable(int8_t* q, const float* x, int gs);
void matmul_q8_portable(float* y, const float* x, const Matrix* w, int n, int trans, int accumulate);
int matmul_q8_fast(int rows, int group_size, int trans); // rows: W's, used when trans
// n_cap rows of x with up to max_cols columns (the largest k of the dot
// products; the GEMM works in k blocks of kc <= max_cols).
void q8_scratch_init(Q8Scratch* sc, int n_cap, int max_cols, int gs);
void q8_scratch_free(Q8Scratch* sc);
size_t q8_scratch_bytes(int n_cap, int max_cols, int gs); // what q8_scratch_init allocates
// Q8_0 dot product of one weight row with one quantized activation row:
// sum over groups of int32 dot * w_scale * x_scale. dot_q8 uses SIMD where
// the build has it (AVX-512 VNNI, AVX2); dot_q8_portable is the plain C reference.
float dot_q8(const int8_t* wq, const float* ws, const int8_t* xq, const float* xs, int cols, int gs);
float dot_q8_portable(const int8_t* wq, const float* ws, const int8_t* xq, const float* xs, int cols, int gs);
// Four at once for prefill: out[t] = dot_q8(wq, ws, xq + t*cols, xs + t*(cols/gs), cols, gs),
// bit for bit (AVX2, with VNNI where built, shares the weight loads).
void dot_q8_x4(float* out, const int8_t* wq, const float* ws, const int8_t* xq, const float* xs, int cols, int gs);
void rmsnorm(float* out, const float* x, const float* weight, int dim, float eps);
void softmax(float* x, int n);
// Causal attention of one head for n queries at key indices pos0.. (see kernels.c):
// probs (n, pos0 + n) = masked softmax(q k^T / sqrt(hd)), out (n, hd) = probs @ v.
void attention_head(float* out, int ldo, float* probs, const float* q, int ldq, const float* k, const float* v,
                    int ldkv, int n, int pos0, const int* pos_in_seq, int hd);
double cross_entropy(const float* logits, int n, int target); // -log softmax(logits)[target]
void rope_inv_freq(float* inv_freq, const Config* c);   // (head_dim/2,)
// Rotates each head of vec (n_heads, head_dim) by the angles whose cos/sin
// are given (head_dim/2,): pairs (j, j + head_dim/2), Hugging Face layout.
void rope_rotate(float* vec, int n_heads, int head_dim, const float* cos_t, const float* sin_t);
void embed_row(float* out, const Matrix* emb, int token); // dequantizes Q8_0 rows
// LoRA on one projection: y (n, out) += scale * (x (n, in) @ A^T) @ B^T.
void lora_apply(float* y, const float* x, const Lora* lora, int layer, int target, int n, int in, int out,
                float* tmp);
void free_lora(Lora* lora);

// ----------------------------------------------------------------------------
// Writing model files (model_write.c): train_lora merge and full-model saves,
// and the harness's quantization attack

// The tensors of a model file, in file order
enum { TN_EMB, TN_RMS_ATT, TN_WQ, TN_WK, TN_WV, TN_WO, TN_RMS_FFN, TN_GATE, TN_UP, TN_DOWN, TN_RMS_FINAL, TN_WCLS,
       TN_COUNT };
const char* tensor_name(int tn);                // "token_embedding", "rms_att", ...
// count stacked copies (layers) of a rows x cols tensor; norms have rows = 1
void tensor_shape(const Config* c, int tn, int* count, int* rows, int* cols);
int tensor_is_norm(int tn);
int tensor_target(int tn);                      // the LORA_* target of a layer matrix, else -1
Matrix* layer_matrix(LayerWeights* lw, int t);  // the matrix of LoRA target t
void dequant_rows(float* out, const Matrix* w, int r0, int nr); // rows [r0, r0+nr) as fp32
// Rows [r0, r0+nr) of layer `layer` of tensor tn, as fp32 (quantized rows dequantized)
void weights_rows(const Weights* w, int tn, int layer, int r0, int nr, int dim, float* out);
// The fp32 rows of a model to write: get(ctx, tensor, layer, r0, nr, out)
typedef void (*RowSource)(void* ctx, int tn, int layer, int r0, int nr, float* out);
// Writes a model file of config c (c->weight_type and group_size decide the
// quantization), via path.tmp + fsync + rename; 0 on success.
int write_model_file(const char* path, const Config* c, RowSource get, void* ctx);
void pack_model_header(unsigned char* h, const Config* c); // the 256-byte header
// Writes model_path with the adapter merged (adapter_path NULL: none, a plain
// requantization) as weight_type WEIGHT_*; 0 on success, exits on bad input.
int merge_model(const char* model_path, const char* adapter_path, const char* out_path, int weight_type);

// ----------------------------------------------------------------------------
// LoRA adapter files (written by train_lora, read by `run --lora` and merge)
//
// An adapter is y = W x + (alpha/rank) * B (A x) on some of the seven
// projections of some layers. All integers little-endian int32, floats
// IEEE fp32. The file starts with a 128-byte header:
//
//   offset  field
//   0       uint32 magic = LORA_MAGIC ("ULLA" as bytes 'U','L','L','A')
//   4       int32  version = LORA_VERSION
//   8       int32  rank
//   12      float  alpha              scale = alpha / rank
//   16      int32  target_mask        bit t set = target t adapted, in the
//                                     order q, k, v, o, gate, up, down (bits 0..6)
//   20      int32  layer_begin        adapted layers [layer_begin, layer_end)
//   24      int32  layer_end
//   28      int32  dim                the base model's dims: an adapter is
//   32      int32  hidden_dim         refused by a model whose dims differ
//   36      int32  n_layers
//   40      int32  n_heads
//   44      int32  n_kv_heads
//   48      int32  head_dim
//   52      int32  vocab_size
//   56      int64  n_floats           payload size in floats (a consistency check)
//   64..127 zero
//
// Then the payload, fp32, no padding: for each layer l in [begin, end), for
// each target t in the order above whose bit is set:
//   A  (rank, in)    rows of the down-projection, as PEFT's lora_A.weight
//   B  (out, rank)   as PEFT's lora_B.weight
// where (in, out) of a target are those of its base matrix: q (dim,
// n_heads*head_dim), k and v (dim, n_kv_heads*head_dim), o (n_heads*head_dim,
// dim), gate and up (dim, hidden_dim), down (hidden_dim, dim). The file size
// is exactly 128 + 4 * n_floats bytes; the reader refuses anything else.
// (PEFT names: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj.)

#define LORA_MAGIC 0x414c4c55u   // "ULLA" read as little-endian uint32
#define LORA_VERSION 1
#define LORA_HEADER_BYTES 128

const char* lora_target_name(int target);                      // "q", "k", ... "down"
void lora_dims(const Config* c, int target, int* in, int* out); // base matrix (in, out)
size_t lora_param_count(const Config* c, int rank, int target_mask, int layer_begin, int layer_end);
// Points lora's pairs into memory (lora_param_count floats, payload order);
// own_memory: free_lora frees it.
void lora_layout(Lora* lora, const Config* c, int rank, float alpha, int target_mask, int layer_begin,
                 int layer_end, float* memory, int own_memory);
int lora_save(const Lora* lora, const Config* c, const char* path);     // atomic; 0 = ok
int lora_read(Lora* lora, const Config* c, const char* path, char* err, size_t errlen); // 0 = ok
void load_lora(Transformer* t, const char* path);                      // for run --lora; exits on error

// ----------------------------------------------------------------------------
// Tokenizer file format (written by `export.py tokenizer`, code in tok_export.py)
//
//   uint32 magic = TOK_MAGIC ("ULTK"), int32 version = TOK_VERSION
//   int32  vocab_size      ids 0..vocab_size-1, special tokens included
//   int32  n_merges
//   int32  bos_id
//   int32  n_eot           then int32 eot_ids[n_eot]: ids that end a turn
//   int32  ignore_merges   1: a pre-token that is itself in the vocab is
//                          emitted whole (HF "ignore_merges", Llama-3 sets it)
//   then for each id: uint8 flags (1 = special), int32 len, len raw bytes
//     (the token's bytes, byte-level BPE mapping already undone)
//   then n_merges times: int32 left_id, int32 right_id, int32 merged_id,
//     in priority order (index = rank, lower merges first)

#define TOK_MAGIC 0x4b544c55u   // "ULTK"
#define TOK_VERSION 1

typedef struct {
    int vocab_size;
    char** token_bytes;     // (vocab_size,) raw bytes of each token (not NUL-safe: use token_len)
    int* token_len;         // (vocab_size,)
    unsigned char* is_special; // (vocab_size,)
    int bos_id;
    int n_eot;
    int* eot_ids;           // (n_eot,)
    int ignore_merges;
    int n_merges;
    // hash tables built at load time
    void* vocab_index;      // bytes -> id
    void* merge_index;      // (left, right) -> (rank, merged)
    int* special_ids;       // special ids sorted by length, longest first, for matching in text
    int n_special;
} Tokenizer;

void build_tokenizer(Tokenizer* tok, const char* path); // exits on error
void free_tokenizer(Tokenizer* tok);
// Encode text into ids. Returns the count written to ids (capacity max_ids;
// exits with a message if it does not fit). If parse_special, special token
// strings in the text ("<|eot_id|>") become their ids; otherwise they are
// encoded as plain text. No BOS is added.
int encode(const Tokenizer* tok, const char* text, size_t len, int parse_special, int* ids, int max_ids);
// The raw bytes of one token (may be a partial UTF-8 sequence).
const char* token_piece(const Tokenizer* tok, int id, int* len);
int tokenizer_lookup(const Tokenizer* tok, const char* s); // exact token -> id, or -1
int is_eot(const Tokenizer* tok, int id);
int utf8_valid(const char* s, size_t len);
// [*b, *e) of s without leading and trailing whitespace as Python's
// str.strip() sees it (the chat template's trim); invalid bytes are not space.
void utf8_strip(const char* s, size_t len, size_t* b, size_t* e);

// ----------------------------------------------------------------------------
// Sampling

typedef struct {
    int vocab_size;
    float temperature;     // 0 = greedy
    float topp;            // nucleus, 1 = off
    uint64_t rng_state;
    void* probindex;       // scratch for top-p
} Sampler;

void build_sampler(Sampler* s, int vocab_size, float temperature, float topp, uint64_t seed);
void free_sampler(Sampler* s);
int sample(Sampler* s, float* logits);
int argmax(const float* x, int n);   // greedy: the first index of the largest value

// ----------------------------------------------------------------------------
// Chat template (Llama-3 instruct):
//   <|begin_of_text|> then per message
//   <|start_header_id|>ROLE<|end_header_id|>\n\nCONTENT<|eot_id|>
//   then <|start_header_id|>assistant<|end_header_id|>\n\n
// Content is encoded as plain text (special strings typed by a user stay text).

typedef struct {
    const char* role;      // "system", "user", "assistant"
    const char* content;
} ChatMessage;

// Writes the template tokens for msgs to ids (BOS first when add_bos; a later
// turn of a conversation continues without it); returns the count.
int chat_encode(const Tokenizer* tok, const ChatMessage* msgs, int n_msgs, int add_generation_prompt,
                int add_bos, int* ids, int max_ids);

// ----------------------------------------------------------------------------
// Generation: the one decoding loop, and the one chat loop, of every program

// Called with each generated token that is not a stop token, before it is
// fed back. Returns 0 to go on, nonzero to stop there (the token is then not
// fed): a per-token filter, e.g. the guardrail's output filter at a hit.
typedef int (*TokenFn)(void* ctx, const Tokenizer* tok, int id);

typedef struct {
    int max_new;        // tokens to sample at most (a sampled stop token counts)
    Sampler* sampler;   // NULL: greedy (argmax, the lowest id on ties)
    TokenFn on_token;   // NULL: none
    void* ctx;          // passed to on_token
} GenConfig;

enum { GEN_MAX_NEW, GEN_STOP_TOKEN, GEN_CONTEXT_FULL, GEN_FILTERED };

typedef struct {
    int n_sampled;      // tokens sampled, a stop token included
    int pos;            // the next free KV-cache position
    int last;           // the last token sampled (-1: none)
    int stop;           // why it ended: GEN_*
} GenResult;

// Samples from logits (the prediction for position pos, with 0..pos-1 in the
// KV cache), then feeds each sampled token at pos, pos+1, ... until a stop
// token, max_new tokens, a full context (a token is fed only while a
// position is left after it) or on_token's stop.
GenResult generate(Transformer* t, const Tokenizer* tok, float* logits, int pos, const GenConfig* g);
// TokenFns: print_token to stdout; append to a TextBuf (special tokens skipped)
int gen_print(void* ctx, const Tokenizer* tok, int id);
typedef struct {
    char* s;            // (cap,) NUL-terminated; a piece that does not fit is dropped
    size_t cap, len;
} TextBuf;
int gen_append(void* ctx, const Tokenizer* tok, int id);

// An optional per-turn filter of chat_loop (the guardrail plugs in here).
// With a filter the filter shows the answer (stdout); the loop shows only
// the "User:"/"Assistant:" prompts, and the tokens when on_token is NULL.
typedef struct {
    void* ctx;
    // Before the model answers conv[0..n) (the last message is the user's
    // new one): a malloc'd answer to give instead (a refusal), or NULL. A
    // turn refused here is never fed to the model (it stays out of the KV
    // cache: a refused message longer than the context is no error).
    char* (*before)(void* ctx, const ChatMessage* conv, int n);
    TokenFn on_token;   // each generated token, as in GenConfig
    // After the answer (filtered: on_token stopped it): a malloc'd answer
    // to keep instead, or NULL to keep it as generated.
    char* (*after)(void* ctx, const ChatMessage* conv, int n, const char* answer, int filtered);
    // Feeds a turn's prompt (NULL: forward_batch), for a hook that judges a
    // whole prompt: the SAE gate runs it again once it opens inside it.
    float* (*prefill)(void* ctx, Transformer* t, const int* ids, int n, int pos0);
} ChatFilter;

// "prompt: N tokens, X tok/s | generated: ..." on stderr
void report_speed(int n_prompt, long prompt_ms, int n_gen, long gen_ms);
// The chat: one user turn per line of stdin (or the single turn one_turn),
// the dialogue kept in the KV cache, each answer closed with <|eot_id|>.
// A speed line per turn goes to stderr.
void chat_loop(Transformer* t, const Tokenizer* tok, Sampler* sampler, const char* system, const char* one_turn,
               int max_new, const ChatFilter* filter);

// Utilities
long time_in_ms(void);
void* xmalloc(size_t n);   // malloc that exits with a message on failure
void* xcalloc(size_t n, size_t size);
void* xrealloc(void* p, size_t n);
char* xstrdup(const char* s);
char* xstrndup(const char* s, size_t n);
// A growable string, NUL-terminated once anything is added; {0} is empty.
// (JSON, CSV, SVG, markdown and prompts are all built in one.)
typedef struct { char* s; size_t len, cap; } Str;
void str_add(Str* b, const char* s, size_t n);
void str_cat(Str* b, const char* s);
void str_printf(Str* b, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
char* str_take(Str* b); // the string ("" when nothing was added), the caller's to free
// xcalloc, or with dry != 0 nothing; either way adds n * size to *bytes
// (buffer sets that are both allocated and sized ahead: train_lora, matmul_q8)
void* xcalloc_counted(size_t* bytes, int dry, size_t n, size_t size);
int engine_threads(void);    // OpenMP threads in use (1 without OpenMP)
int engine_thread_id(void);  // this thread's index, inside a parallel region
// fprintf(stderr, "error: " fmt "\n") and exit(EXIT_FAILURE): the one way
// programs report bad input
void die(const char* fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
uint64_t splitmix64(uint64_t* state); // the seeded RNG of training and SAEs
// Command-line numbers; a malformed one is a one-line error naming the flag.
int parse_int_arg(const char* flag, const char* s);
float parse_float_arg(const char* flag, const char* s);
// Little-endian int32/fp32 fields of file headers (unaligned-safe).
void put_i32(unsigned char* p, int32_t v);
void put_f32(unsigned char* p, float v);
int32_t get_i32(const unsigned char* p);
float get_f32(const unsigned char* p);
// An id that ends generation: one of the model's eos ids or the tokenizer's eot ids.
int is_stop_token(const Config* c, const Tokenizer* tok, int id);
// Writes a token's bytes to stdout (special tokens are markup: not printed).
void print_token(const Tokenizer* tok, int id);
// Reads a whole file; exits with a message on failure. *len gets the size.
char* read_file(const char* path, size_t* len);
// Writes data to path via path.tmp + rename; returns 0 on success.
int write_file_atomic(const char* path, const void* data, size_t len);

#endif
