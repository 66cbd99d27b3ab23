// sae.h -- sparse autoencoders on the residual stream (implemented in sae.c;
// the program is sae_cli.c).
//
// A sparse autoencoder (SAE) rewrites one residual-stream vector x (dim d)
// as a sparse, non-negative code f over n >> d latents and a dictionary of
// n unit directions (the rows of W_dec):
//
//   u    = act_scale * x                          (1 unless a checkpoint says otherwise)
//   pre  = W_enc (u - sub_bdec * b_dec) + b_enc   (n,)  one dot product per latent
//   f    = act(pre)                               TOPK:     the k largest of relu(pre), the rest 0
//                                                 RELU:     relu(pre)
//                                                 JUMPRELU: pre where pre > threshold, else 0
//                                                 GATED:    [pre > 0] * relu(exp(r_mag) (pre - b_enc) + b_mag)
//   x^   = (W_dec^T f + b_dec) / act_scale        (d,)  the reconstruction
//
// The interventions keep the SAE's error term x - x^ (what the dictionary
// does not explain) and change only the selected latents:
//   x' = x + sum_{i in S} (f'_i - f_i) W_dec[i] / act_scale
// so a latent set S that never fires leaves x bit-identical.
//
// Hook convention. The engine's hook for layer l sees the residual stream
// after block l ("resid_post" of l, Hugging Face hidden_states[l+1]). An SAE
// file names its layer L and one of two conventions:
//   SAE_HOOK_RESID_POST  L = output of block L  -> engine hook l = L
//   SAE_HOOK_RESID_PRE   L = input of block L   -> engine hook l = L - 1
//                        (hidden_states[L]; L = 0 would be the embeddings,
//                        which the engine does not hook)
// SAEs trained by sae.c use RESID_POST. EleutherAI's early Llama-3-8B
// checkpoints (sae-llama-3-8b-32x, "layers.N") were trained on
// hidden_states[N] = RESID_PRE N; SAELens names say hook_resid_post/pre.
// When a file is loaded against a model, a self-test measures the FVU at
// the file's layer and its two neighbours and warns when a neighbour fits
// better (a wrong convention shows up as FVU near or above 1).
//
// ----------------------------------------------------------------------------
// SAE file format (written by `sae train` and by sae_export.py)
//
// Little-endian; int32 unless noted; floats IEEE fp32. A 256-byte header:
//
//   offset  field
//   0       uint32 magic = SAE_MAGIC ("ULSA" as bytes 'U','L','S','A')
//   4       int32  version = SAE_VERSION
//   8       int32  d            input dimension (the model's dim)
//   12      int32  n            number of latents
//   16      int32  k            TopK: latents kept per token; 0 for the others
//   20      int32  arch         SAE_TOPK, SAE_RELU, SAE_JUMPRELU, SAE_GATED
//   24      int32  layer        L, in the convention below
//   28      int32  hook         SAE_HOOK_RESID_POST (0) or SAE_HOOK_RESID_PRE (1)
//   32      int32  sub_bdec     1: encode u - b_dec; 0: encode u (Goodfire, some SAELens)
//   36      float  act_scale    input scale (1 = none)
//   40      int64  train_tokens tokens the SAE was trained on (0 = unknown)
//   48      float  train_fvu    FVU at the end of training (0 = unknown)
//   52      int32  dtype        0 = fp32 (the only one)
//   56..255 zero
//
// Then the tensors, each starting at a multiple of 64 bytes (zero padding):
//   W_enc      fp32 (n, d)   row i = encoder direction of latent i
//   b_enc      fp32 (n,)     (GATED: b_gate)
//   W_dec      fp32 (n, d)   row i = decoder direction of latent i (unit norm when trained here)
//   b_dec      fp32 (d,)
//   threshold  fp32 (n,)     JUMPRELU only
//   r_mag      fp32 (n,)     GATED only
//   b_mag      fp32 (n,)     GATED only
// The loader checks magic, version, dims and the exact file size.
#ifndef SAE_H
#define SAE_H

#include <stdint.h>
#include <stddef.h>
#include "run.h"

#define SAE_MAGIC 0x41534c55u   // "ULSA" read as little-endian uint32
#define SAE_VERSION 1
#define SAE_HEADER_BYTES 256

enum { SAE_TOPK = 0, SAE_RELU = 1, SAE_JUMPRELU = 2, SAE_GATED = 3, SAE_N_ARCH };
enum { SAE_HOOK_RESID_POST = 0, SAE_HOOK_RESID_PRE = 1 };

typedef struct {
    int d, n, k, arch, layer, hook, sub_bdec;
    float act_scale;
    int64_t train_tokens;
    float train_fvu;
    float* W_enc;      // (n, d)
    float* b_enc;      // (n,)
    float* W_dec;      // (n, d)
    float* b_dec;      // (d,)
    float* threshold;  // (n,) JUMPRELU, else NULL
    float* r_mag;      // (n,) GATED, else NULL
    float* b_mag;      // (n,) GATED, else NULL
    void* memory;      // heap block or file mapping that owns the tensors
    size_t memory_size;
    int mapped;
} Sae;

const char* sae_arch_name(int arch);            // "topk", "relu", "jumprelu", "gated"
size_t sae_file_size(int d, int n, int arch);   // the exact size of a valid file
void sae_alloc(Sae* s, int d, int n, int k, int arch); // zeroed tensors, act_scale 1, sub_bdec 1
void sae_free(Sae* s);
int sae_save(const Sae* s, const char* path);   // atomic; 0 = ok
// Maps a file (copy-on-write, so the tensors may be edited in memory).
// Returns 0, or writes a one-line reason to err.
int sae_load(Sae* s, const char* path, char* err, size_t errlen);
// The engine hook layer this SAE reads (-1 when it cannot be hooked).
int sae_engine_layer(const Sae* s);

// Dense codes f (m, n) of the rows x (m, d): one GEMM, then the activation.
void sae_encode(const Sae* s, const float* x, int m, float* f);
// xhat (m, d) = reconstruction of codes f (m, n); only non-zero f are read.
void sae_decode(const Sae* s, const float* f, int m, float* xhat);
// FVU = sum |x - x^|^2 / sum |x - mean(x)|^2 over the rows, and the mean L0.
double sae_fvu(const Sae* s, const float* x, int m, double* l0);
float sae_norm(const float* x, int n);   // |x|, the Euclidean norm of x (n,)

// The residual stream after engine layers lo..hi of one sequence ids (n,),
// out (hi-lo+1, n, dim). The forward stops after layer hi; the KV cache is
// left filled for layers <= hi only.
void sae_capture(Transformer* t, const int* ids, int n, int lo, int hi, float* out);

// ----------------------------------------------------------------------------
// Training (TopK with AuxK, or ReLU + L1), on batches of activations

typedef struct {
    int arch;            // SAE_TOPK or SAE_RELU
    int k;               // TopK k
    int k_aux;           // AuxK latents per token (default d/2)
    float auxk_alpha;    // AuxK weight (default 1/32; 0 = off)
    float l1;            // ReLU mode: L1 weight on sum_i f_i / rms(x - mean)
    int64_t dead_tokens; // a latent is dead after this many tokens without firing
    float lr;            // peak Adam learning rate (default 2e-4 / sqrt(n / 16384))
    int warmup;          // linear warmup steps
    int total_steps;     // for the final linear decay (0 = constant lr)
    float decay_frac;    // decay over this last fraction of total_steps (default 0.2)
    float beta1, beta2, eps;
} SaeTrainConfig;

typedef struct {
    double loss;       // what is minimised: fvu + auxk_alpha * auxk, or fvu + l1 * l1
    double fvu, auxk, l1, l0, dead_frac, lr;
} SaeTrainStats;

typedef struct {
    Sae* sae;
    SaeTrainConfig cfg;
    int step;
    float* grad;          // gradients, same layout as the parameter block
    float* m;             // Adam moments
    float* v;
    int64_t* since_fired; // (n,) tokens since each latent last fired
    unsigned char* fired; // (n,) fired in the last batch
    int batch;            // rows of the last batch
    float* xc;            // (B, d) x - b_dec of the current batch
    int cap_rows;         // rows per block of the sparse pass
} SaeTrainer;

void sae_train_defaults(SaeTrainConfig* c, int d, int n, int k, int arch);
// Initialises b_dec (geometric median of x when median, else the mean),
// tied weights (W_dec unit rows, W_enc = W_dec scaled so that the first
// batch is reconstructed at its own norm), b_enc = 0.
void sae_init_from_data(Sae* s, const float* x, int m, int median, uint64_t seed);
void sae_trainer_init(SaeTrainer* tr, Sae* s, const SaeTrainConfig* cfg, int max_batch);
void sae_trainer_free(SaeTrainer* tr);
// One Adam step on the batch x (B, d) = sae_train_grad + sae_train_update.
SaeTrainStats sae_train_step(SaeTrainer* tr, const float* x, int B);
// The loss and its gradient (tr->grad, laid out like the file image) on x,
// parameters unchanged; the gradient check of the test calls it.
SaeTrainStats sae_train_grad(SaeTrainer* tr, const float* x, int B);
float sae_train_update(SaeTrainer* tr);  // project, Adam, renormalise; returns the lr

// Planted dictionary (synthetic data, no model): n_true random unit
// directions in d dims; each sample is a mean vector plus s of them with
// magnitudes in [0.5, 1.5) plus noise. For the test and `sae planted`.
typedef struct {
    int d, n_true, s;
    float noise;
    float* dirs;   // (n_true, d)
    float* mean;   // (d,)
    uint64_t rng;
} Planted;
void planted_init(Planted* p, int d, int n_true, int s, float noise, uint64_t seed);
void planted_sample(Planted* p, float* x, int m);
void planted_free(Planted* p);
// Fraction of planted directions with some decoder row at cosine > thresh.
double planted_recovery(const Planted* p, const Sae* s, float thresh);

// ----------------------------------------------------------------------------
// Interventions through the engine hook

enum { SAE_MODE_ZERO, SAE_MODE_CLAMP, SAE_MODE_SCALE, SAE_MODE_SPLICE, SAE_MODE_ABLATE };

typedef struct {
    const Sae* sae;
    int layer;            // engine hook layer (sae_engine_layer)
    const int* sel;       // selected latents
    int n_sel;
    int mode;             // SAE_MODE_*: zero, clamp (f' = -value where f > 0), scale (f' = -value f);
                          // splice (x = x^, no error term) and ablate (x = 0) are for measuring
    float value;          // c for clamp, m for scale
    int gate;             // 1: per-sequence gate (intervene once the fraction of tokens with a
                          //    selected latent active exceeds gate_alpha)
    float gate_alpha;
    int gate_on;          // the gate has opened for this sequence
    int64_t seq_tokens, seq_hits;  // this sequence: tokens seen, tokens with a selected latent active
    int64_t n_tokens, n_active, n_changed; // totals: positions seen, with a latent active, edited
    const unsigned char* keep; // optional mask over absolute positions: 0 = leave alone (BOS, template)
    int skip_pos0;        // leave position 0 (BOS) alone
    // splice mode: reconstruction statistics of the spliced positions
    double sse, sumsq, l0_sum;
    double* sumx;         // (d,)
    unsigned char* ever;  // (n,) latents that fired
    int64_t splice_tokens;
    float* f;             // scratch (rows, n)
    float* fs;            // scratch (rows, n_sel)
    int f_rows;
} SaeHook;

void sae_hook_init(SaeHook* h, const Sae* s, int layer, const int* sel, int n_sel, int mode, float value);
void sae_hook_free(SaeHook* h);
void sae_hook_reset_sequence(SaeHook* h);  // a new sequence: clears the gate
// The ResidualHook: install with t->hook = sae_hook_fn, t->hook_ctx = &h.
void sae_hook_fn(void* ctx, int layer, int pos0, int n_pos, float* x, int dim);
// forward_batch of a prompt at pos0 with the hook ctx (a SaeHook) installed;
// when the gate opens inside the prompt, the prompt runs again with the
// intervention from its first position. Also chat_loop's ChatFilter.prefill.
float* sae_prefill(void* ctx, Transformer* t, const int* ids, int n, int pos0);

// ----------------------------------------------------------------------------
// Latent scoring: per latent and per set (0 = forget, 1 = retain), its firing
// count, sum and sum of squares of activations, and the same at keyword
// positions; then a rule turns them into a score:
//   freq      P(f > 0) on forget (SAEBench)
//   diff      E[f] on forget - E[f] on retain
//   ratio     log P(f > 0) on forget - log P(f > 0) on retain (add-one smoothed)
//   sq_ratio  E[f^2] on forget, among the top 10% by forget/retain E[f^2] ratio
//             (Dynamic SAE Guardrails), else 0
//   keyword   P(f > 0) at keyword positions - P(f > 0) on retain
// A latent is eligible when it fires on forget, its retain frequency is at
// most tau, and its score is positive.

enum { SAE_RULE_FREQ, SAE_RULE_DIFF, SAE_RULE_RATIO, SAE_RULE_SQ_RATIO, SAE_RULE_KEYWORD, SAE_N_RULES };

typedef struct {
    int n;                       // latents
    double* cnt[2];              // (n,) positions where the latent fires, per set
    double* sum[2];              // (n,) sum of its activations
    double* sq[2];               // (n,) sum of their squares
    double* cnt_kw;              // (n,) firing count at keyword positions (both sets)
    double* sum_kw;              // (n,)
    int64_t tokens[2], tokens_kw;
} LatentStats;

void latent_stats_init(LatentStats* ls, int n);
void latent_stats_free(LatentStats* ls);
// Adds the codes f (m, n) of m positions of one set; kw (m,) marks keyword positions (NULL: none).
void latent_stats_add(LatentStats* ls, int set, const float* f, int m, const unsigned char* kw);
// The token counts the rates divide by: forget, retain, keyword (each at least 1).
void latent_stats_denoms(const LatentStats* ls, double denom[3]);
int sae_rule_from_name(const char* name);   // "freq", ... "keyword" -> SAE_RULE_*, or -1
// score (n,) and eligible (n,) of every latent by the rule, order (n,) the
// latents best first (eligible ones first, then by score, then by index).
// Returns the number eligible.
int latent_scores(const LatentStats* ls, int rule, float tau, double* score, unsigned char* eligible, int* order);

#endif
