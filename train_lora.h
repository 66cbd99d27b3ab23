// train_lora.h -- the training side of unlearn.c (implemented in train_lora.c).
//
// Hand-written forward-with-cache and backward through Llama-3, LoRA and
// full-weight training, the unlearning objectives, the training data and
// its batches. The train_lora program (train_lora_cli.c), test_all and
// fuzz.c link train_lora.o and call these.
#ifndef TRAIN_LORA_H
#define TRAIN_LORA_H

#include <stdint.h>
#include <stddef.h>
#include "run.h"

// ----------------------------------------------------------------------------
// A batch: B rows of T positions. Position i of row b reads inputs[b*T+i]
// and is trained to predict targets[b*T+i] with weight weights[b*T+i]
// (0 = not counted: prompt tokens, padding). Every row starts at position 0.

typedef struct {
    int B, T;
    int* inputs;      // (B, T)
    int* targets;     // (B, T)
    float* weights;   // (B, T)
    // WHP only: the "translated" rows (anchored terms replaced by generic
    // ones) on which the base model's predictions become the labels
    int Tt;           // positions per translated row (0 = none)
    int* trans_inputs;// (B, Tt)
    int* label_pos;   // (B, T) position in the translated row that labels this one, -1 = none
    // packed rows (several sequences per row), or NULL: the position of
    // each entry within its sequence; a sequence starts where pos is 0
    int* pos;         // (B, T)
} Batch;

// ----------------------------------------------------------------------------
// Objectives

enum { OBJ_SFT, OBJ_GA, OBJ_GRADDIFF, OBJ_KL, OBJ_NPO, OBJ_SIMNPO, OBJ_WHP, OBJ_RMU, OBJ_COUNT };
enum { RETAIN_NONE, RETAIN_NLL, RETAIN_KL };

typedef struct {
    int objective;       // OBJ_*
    int retain_loss;     // RETAIN_* (set from the objective unless given)
    float gamma;         // weight of the forget term (1)
    float lambda;        // weight of the retain term (1)
    float beta;          // NPO / SimNPO inverse temperature (CLI defaults 0.1 / 4.5)
    float delta;         // SimNPO margin (0)
    int rmu_layer;       // RMU: residual stream after this layer
    float rmu_c;         // RMU steering coefficient
    float rmu_alpha;     // RMU retain weight
    float* rmu_u;        // (dim,) RMU random unit vector
    float whp_alpha;     // WHP: v_base - alpha * ReLU(v_reinforced - v_base)
    const Lora* whp_reinforced; // WHP reinforced adapter, or NULL
} ObjectiveConfig;

typedef struct {
    double loss;        // the objective, what is minimised
    double forget_term; // the forget part of loss (weighted by gamma)
    double retain_term; // the retain part of loss (weighted by lambda / rmu_alpha)
    double forget_nll;  // mean NLL per counted forget token (NAN when not computed)
    double retain_nll;  // mean NLL per counted retain token (NAN when not computed)
    double retain_kl;   // mean KL(ref || model) per counted retain token (NAN when not computed)
    double tokens;      // positions processed (forward + backward)
} LossTerms;

// ----------------------------------------------------------------------------
// The training model: a frozen base plus trainable parameters (LoRA or every
// weight), activation buffers, gradients, AdamW moments.

typedef struct {
    int B, T;            // shape of the last forward
    const int* pos;      // (B*T,) its positions (packed rows), or NULL
    int N_cap, T_cap;    // capacity: positions, positions per row
    int n_layers_run;    // layers the last forward ran
    // saved by the forward, read by the backward (L = n_layers, N = B*T)
    float* x;        // (L+1, N, dim) residual stream entering each layer; x[L] = last layer's output
    float* xn1;      // (L, N, dim) rmsnorm(x) before attention
    float* rstd1;    // (L, N)
    float* q;        // (L, N, n_heads*head_dim) after RoPE
    float* k;        // (L, N, n_kv_heads*head_dim) after RoPE
    float* v;        // (L, N, n_kv_heads*head_dim)
    float* att;      // (L, B, n_heads, T, T) softmax probabilities, causal (0 outside each sequence)
    float* att_out;  // (L, N, n_heads*head_dim)
    float* xmid;     // (L, N, dim) residual after the attention block
    float* xn2;      // (L, N, dim) rmsnorm(xmid) before the MLP
    float* rstd2;    // (L, N)
    float* gate;     // (L, N, hidden_dim) w_gate xn2, before SiLU
    float* up;       // (L, N, hidden_dim)
    float* h;        // (L, N, hidden_dim) silu(gate) * up
    float* xf;       // (N, dim) final rmsnorm
    float* rstdf;    // (N,)
    float* logits;   // (N, vocab); the loss backward overwrites it with dlogits
    float* lse;      // (N,) logsumexp of each logits row
    float* nll;      // (N,) -log p(target) (0 where weight is 0)
    float* lora_u;   // (L, 7, N, rank) A·drop(x) of each adapted projection
    // backward scratch
    float* dres;     // (N, dim) gradient of the residual stream (input of RMU's backward)
    float* dmid;     // (N, dim)
    float* dbranch;  // (N, dim)
    float* dxn;      // (N, dim)
    float* dq;       // (N, n_heads*head_dim)
    float* dk;       // (N, n_kv_heads*head_dim)
    float* dv;       // (N, n_kv_heads*head_dim)
    float* dkh;      // (N, n_heads*head_dim) dk per query head, before the GQA sum
    float* dvh;      // (N, n_heads*head_dim)
    float* datt;     // (N, n_heads*head_dim)
    float* dgate;    // (N, hidden_dim)
    float* dup;      // (N, hidden_dim)
    float* dh;       // (N, hidden_dim)
    float* dxf;      // (N, dim)
    float* dnll;     // (N,) dLoss/dnll of each position
    float* dkl;      // (N,) dLoss/dKL of each position
    float* ref;      // (N, vocab) reference log-probs (KL, WHP), or NULL
    float* ref_hidden; // (N, dim) frozen activations (RMU), or NULL
    float* tmp;      // (N, max(dim, hidden, q_dim)) projection output / dropout scratch
    float* tmp2;     // (N, max(dim, hidden, q_dim))
    float* u_tmp;    // (N, max rank) A x of an adapter that is not trained (WHP reinforced)
    float* du;       // (N, max rank)
    float* deq;      // (tile rows, max in) dequantized rows of an int8 matrix (no int8 GEMM), or NULL
    int deq_rows;
    float* dp;       // (threads, T_cap, T_cap) attention backward: dP, then dS, of one head
    Q8Scratch q8;    // int8 matmul scratch (the engine's Q8 path), k up to max(in, vocab)
    float* rope_cos; // (T_cap, head_dim/2)
    float* rope_sin; // (T_cap, head_dim/2)
    float* rope_nsin;// (T_cap, head_dim/2) -sin: RoPE backward is the inverse rotation
} TrainActs;

typedef struct {
    Config config;
    Transformer* file;   // the mapped model file (owner), or NULL (in-memory model)
    Weights base;        // frozen weights: the reference model (KL, NPO, WHP, RMU)
    Weights w;           // what the trainable forward reads: base (LoRA) or views into params (full)
    Weights gw;          // full: views into grads with the layout of w
    int full;            // 1: every weight trainable
    float* base_copy;    // full: a frozen copy backing base when there is no file (or NULL)
    // trainable parameters: one block each (llm.c style)
    size_t n_params;
    float* params;       // full: the model tensors in file order; LoRA: the adapter payload
    float* grads;
    float* adam_m;
    float* adam_v;
    unsigned char* no_decay; // (n_params,) 1 = no weight decay (norm weights), or NULL
    Lora lora;           // LoRA: views into params (rank 0 when full)
    Lora dlora;          // LoRA: views into grads
    float lora_dropout;
    uint64_t dropout_seed; // per micro-batch, set by the trainer
    int min_layer;       // lowest layer with trainable weights (the backward stops there)
    TrainActs acts;
    size_t acts_bytes;   // what train_alloc_acts allocated
} TrainModel;

// --full parameters: the model's tensors in file order (run.h), no padding:
// token_embedding, rms_att, wq, wk, wv, wo, rms_ffn, w_gate, w_up, w_down,
// rms_final, wcls (numel 0 when tied): run.h's TN_* order and tensor_name()
size_t train_tensor_offset(const Config* c, int tn, size_t* numel);

// Loading and building (exit with a message on errors)
void train_model_from_file(TrainModel* m, const char* path);
// A fresh model of config c (fp32), every weight N(0, 0.02), norms 1, seeded
void train_model_random(TrainModel* m, const Config* c, uint64_t seed);
void train_model_free(TrainModel* m);
// Make every weight trainable (dequantizing an int8 base); keeps the base as reference
void train_setup_full(TrainModel* m, int keep_reference);
// Add a LoRA adapter: A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0 (PEFT's init)
void train_setup_lora(TrainModel* m, int rank, float alpha, float dropout, int target_mask, int layer_begin,
                      int layer_end, uint64_t seed);
// Activation buffers for up to N_cap positions, rows of up to T_cap positions
void train_alloc_acts(TrainModel* m, int N_cap, int T_cap, int need_ref, int need_ref_hidden);

// Bytes of activations and trainable state (params, grads, AdamW; LoRA on
// all targets of all layers), the model weights not included
size_t train_memory_bytes(const Config* c, int full, int rank, int N_cap, int T_cap, int need_ref, int need_ref_hidden);

// Forward over B rows of T positions with weights w (and adapter lora, or
// NULL); runs n_layers layers (all: config.n_layers, then the logits too).
// pos: positions of packed rows (see Batch), or NULL. Rows of up to T_cap.
void train_forward(TrainModel* m, const Weights* w, const Lora* lora, int dropout, const int* inputs, const int* pos,
                   int B, int T, int n_layers);
// Per-position NLL of the targets after a full forward; returns the weighted sum; *wsum the weight sum.
double train_nll(TrainModel* m, const Batch* b, double* wsum);
// Backward of the last trainable forward, gradients += into m->grads. With
// from_layer = n_layers it starts from dlogits (acts.logits, written by the
// loss backward); otherwise from acts.dres, the gradient of the residual
// stream after layer from_layer-1.
void train_backward(TrainModel* m, const int* inputs, int from_layer);
// dlogits in place: row i = dnll[i] (softmax - onehot(target)) + dkl[i] (softmax - exp(ref))
void train_loss_backward(TrainModel* m, const Batch* b);

// One micro-batch of the objective (forward, loss, and when backward != 0
// the backward, scaled by grad_scale). forget or retain may be NULL.
void train_objective(TrainModel* m, const ObjectiveConfig* oc, const Batch* forget, const Batch* retain,
                     float grad_scale, int backward, LossTerms* lt);

// LoRA dropout: the keep-mask of element index (row * in + col) of the
// input of (layer, target) is lora_dropout_keep(train_dropout_seed(seed,
// layer, target), index, p): deterministic, independent of threads.
uint64_t train_dropout_seed(uint64_t seed, int layer, int target);
int lora_dropout_keep(uint64_t layer_seed, size_t index, float p);

// Optimiser (AdamW, PyTorch semantics: decoupled weight decay, bias
// correction; t counts updates from 1)
void train_zero_grads(TrainModel* m);
double train_grad_norm(const TrainModel* m);          // L2 norm of every gradient
void train_scale_grads(TrainModel* m, float s);
void train_adamw(TrainModel* m, float lr, float beta1, float beta2, float eps, float weight_decay, int t);

// The trained model as an fp32 file in run.h format (via path.tmp + rename)
int save_model_fp32(const TrainModel* m, const char* path);

// Parse "q,k,v,o,gate,up,down" (or "all", "attn", "mlp") into a mask; -1 on error
int parse_targets(const char* s);
const char* objective_name(int objective);
int objective_from_name(const char* s);   // -1 when unknown

// Dies ("what: ...") unless c is a config the model loader accepts
void train_check_config(const Config* c, const char* what);
// RMU's fixed random direction: (dim,) uniform [0,1) entries, normalised (as WMDP's RMU); malloc'd
float* rmu_direction(int dim, uint64_t seed);
// The dropout seed of micro-batch `micro` of optimizer step `step` (TrainModel.dropout_seed)
uint64_t train_step_seed(uint64_t seed, int step, int micro);

// ----------------------------------------------------------------------------
// Data sets (train_lora train --help, "Formats", says what each file holds).
// Every row has T+1 tokens (inputs tokens[0..T-1], targets tokens[1..T])
// and T weights (1 = this prediction counts; 0 = prompt, padding). In chat
// rows only the assistant's tokens and their <|eot_id|> count.

typedef struct {
    int n, cap, T;
    int* tokens;      // (n, T+1)
    float* weights;   // (n, T)
    int Tt;           // WHP: positions per translated row (0 = none)
    int* trans;       // (n, Tt) translated inputs
    int* label_pos;   // (n, T)
    int* len;         // (n,) tokens in use (<= T+1), the rest is padding
    int* pos;         // (n, T) positions of packed rows (--pack), or NULL
    long n_tokens;    // counted target tokens
    int truncated;    // chat examples cut at T+1 tokens
    int skipped;      // chat examples with no counted token within T+1 tokens
} Dataset;

// Reads path (format auto|text|tsv|jsonl; auto goes by the extension) into
// rows of T targets; system: a system prompt for question/answer rows, or
// NULL; pack: several examples per row (--pack). Dies on bad input.
void dataset_load(Dataset* d, const Tokenizer* tok, const Config* c, const char* path, const char* format,
                  const char* system, int T, int pack);
void dataset_free(Dataset* d);
double dataset_padding(const Dataset* d);   // fraction of positions that hold no token

// WHP: a dictionary of anchored terms and their generic translations
// (lines "anchored<TAB>generic"), and rows labelled through it
typedef struct { char* from; char* to; size_t from_len; } Term;
int load_dict(const char* path, Term** out);   // returns the number of terms
void free_dict(Term* terms, int n);
void dataset_whp(Dataset* d, const Tokenizer* tok, const Config* c, const char* path, Term* terms, int nt, int T);

// Batches: a seeded shuffle per epoch; (epoch, cursor) is the whole state
typedef struct {
    const Dataset* d;
    uint64_t seed;
    int epoch, cursor;
    int* perm;
} Loader;

void loader_init(Loader* ld, const Dataset* d, uint64_t seed, int epoch, int cursor);
void loader_next(Loader* ld, Batch* b);   // the next B rows (a new shuffle at each epoch's end)
void batch_alloc(Batch* b, int B, int T, int Tt, int packed);
void batch_free(Batch* b);

// Mean NLL per counted token over the first rows of d (B rows at a time
// through b), the adapter on: the early-stopping measure
double train_eval_nll(TrainModel* m, const Dataset* d, int rows, Batch* b);

#endif
