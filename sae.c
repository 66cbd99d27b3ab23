// sae.c -- sparse autoencoders on the residual stream of Llama-3, in plain C:
// activation capture, TopK SAE training (Gao et al. 2024), measuring,
// finding the Harry Potter latents, and clamping them during generation.
//
//   ./sae train    MODEL.bin -z TOK --layer L --data FILE... -o SAE.bin
//   ./sae measure  MODEL.bin -z TOK --sae SAE.bin --forget F --retain R
//   ./sae score    MODEL.bin -z TOK --sae SAE.bin --forget F --retain R -o latents.csv
//   ./sae generate MODEL.bin -z TOK --sae SAE.bin --latents latents.csv --mode clamp -c 50 -N 20 -i PROMPT
//   ./sae chat | eval ...  (same intervention options)
//   ./sae planted  (a synthetic planted dictionary; no model)
//   ./sae info SAE.bin
//   ./sae --help
//
// Everything reads the model through the engine (run.h): activations come
// from the engine's per-layer residual hook, and the interventions are that
// same hook editing the residual stream in place. No forward pass is copied.
// The SAE maths and the file format are documented in sae.h. Compiled with
// -DSAE_LIBRARY there is no main() and test_all links these functions.
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <stdarg.h>
#include <setjmp.h>
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <limits.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "run.h"
#include "sae.h"
#include "eval.h"

// ----------------------------------------------------------------------------
// Small utilities

static double rand_uniform(uint64_t* s) { return (splitmix64(s) >> 11) * (1.0 / 9007199254740992.0); }
static float rand_normal(uint64_t* s) {
    double u1 = rand_uniform(s), u2 = rand_uniform(s);
    if (u1 < 1e-300) u1 = 1e-300;
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

static size_t align64(size_t n) { return (n + 63) / 64 * 64; }

static float dot(const float* a, const float* b, int n) {
    float s = 0.0f;
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

static void axpy(float* y, float a, const float* x, int n) {
    for (int i = 0; i < n; i++) y[i] += a * x[i];
}

// ----------------------------------------------------------------------------
// The SAE file (format in sae.h). In memory, one block holds the whole file
// image: the 256-byte header, then the tensors at their file offsets. So
// saving is one write, and loading is one mmap.

typedef struct { size_t W_enc, b_enc, W_dec, b_dec, threshold, r_mag, b_mag, end; } SaeLayout;

static SaeLayout sae_layout(int d, int n, int arch) {
    SaeLayout L;
    memset(&L, 0, sizeof(L));
    size_t off = SAE_HEADER_BYTES, nd = (size_t)n * d * sizeof(float), nb = (size_t)n * sizeof(float);
    L.W_enc = off; off = align64(off + nd);
    L.b_enc = off; off = align64(off + nb);
    L.W_dec = off; off = align64(off + nd);
    L.b_dec = off; off = align64(off + (size_t)d * sizeof(float));
    if (arch == SAE_JUMPRELU) { L.threshold = off; off = align64(off + nb); }
    if (arch == SAE_GATED) { L.r_mag = off; off = align64(off + nb); L.b_mag = off; off = align64(off + nb); }
    L.end = off;
    return L;
}

const char* sae_arch_name(int arch) {
    static const char* names[SAE_N_ARCH] = {"topk", "relu", "jumprelu", "gated"};
    return arch >= 0 && arch < SAE_N_ARCH ? names[arch] : "unknown";
}

size_t sae_file_size(int d, int n, int arch) { return sae_layout(d, n, arch).end; }

static void sae_point(Sae* s) {
    SaeLayout L = sae_layout(s->d, s->n, s->arch);
    unsigned char* b = s->memory;
    s->W_enc = (float*)(b + L.W_enc);
    s->b_enc = (float*)(b + L.b_enc);
    s->W_dec = (float*)(b + L.W_dec);
    s->b_dec = (float*)(b + L.b_dec);
    s->threshold = L.threshold ? (float*)(b + L.threshold) : NULL;
    s->r_mag = L.r_mag ? (float*)(b + L.r_mag) : NULL;
    s->b_mag = L.b_mag ? (float*)(b + L.b_mag) : NULL;
}

void sae_alloc(Sae* s, int d, int n, int k, int arch) {
    memset(s, 0, sizeof(*s));
    s->d = d; s->n = n; s->k = k; s->arch = arch;
    s->sub_bdec = 1;
    s->act_scale = 1.0f;
    s->memory_size = sae_file_size(d, n, arch);
    void* p = NULL;
    if (posix_memalign(&p, 64, s->memory_size) != 0) die("out of memory (SAE of %zu bytes)", s->memory_size);
    memset(p, 0, s->memory_size);
    s->memory = p;
    sae_point(s);
}

void sae_free(Sae* s) {
    if (s->memory) {
        if (s->mapped) munmap(s->memory, s->memory_size);
        else free(s->memory);
    }
    memset(s, 0, sizeof(*s));
}


int sae_engine_layer(const Sae* s) { return s->hook == SAE_HOOK_RESID_PRE ? s->layer - 1 : s->layer; }

int sae_save(const Sae* s, const char* path) {
    unsigned char h[SAE_HEADER_BYTES];
    memset(h, 0, sizeof(h));
    put_i32(h + 0, (int32_t)SAE_MAGIC);
    put_i32(h + 4, SAE_VERSION);
    put_i32(h + 8, s->d);
    put_i32(h + 12, s->n);
    put_i32(h + 16, s->k);
    put_i32(h + 20, s->arch);
    put_i32(h + 24, s->layer);
    put_i32(h + 28, s->hook);
    put_i32(h + 32, s->sub_bdec);
    put_f32(h + 36, s->act_scale);
    memcpy(h + 40, &s->train_tokens, 8);
    put_f32(h + 48, s->train_fvu);
    put_i32(h + 52, 0);
    char tmp[4096];
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    FILE* f = fopen(tmp, "wb");
    if (!f) return -1;
    const unsigned char* body = (const unsigned char*)s->memory + SAE_HEADER_BYTES;
    size_t body_len = s->memory_size - SAE_HEADER_BYTES;
    int ok = fwrite(h, 1, sizeof(h), f) == sizeof(h) && fwrite(body, 1, body_len, f) == body_len;
    ok = (fclose(f) == 0) && ok;
    if (!ok || rename(tmp, path) != 0) { unlink(tmp); return -1; }
    return 0;
}

int sae_load(Sae* s, const char* path, char* err, size_t errlen) {
    memset(s, 0, sizeof(*s));
    int fd = open(path, O_RDONLY);
    if (fd < 0) { snprintf(err, errlen, "cannot open %s: %s", path, strerror(errno)); return -1; }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) { close(fd); snprintf(err, errlen, "%s is not a regular file", path); return -1; }
    size_t size = (size_t)st.st_size;
    if (size < SAE_HEADER_BYTES) { close(fd); snprintf(err, errlen, "%s: file too small (%zu bytes) to be an SAE", path, size); return -1; }
    // copy-on-write: the tensors can be edited in memory (finetuning) without touching the file
    void* map = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) { snprintf(err, errlen, "cannot mmap %s: %s", path, strerror(errno)); return -1; }
    const unsigned char* h = map;
    const char* why = NULL;
    char buf[200];
    int d = get_i32(h + 8), n = get_i32(h + 12), k = get_i32(h + 16), arch = get_i32(h + 20);
    int hook = get_i32(h + 28), dtype = get_i32(h + 52);
    float scale = get_f32(h + 36);
    if ((uint32_t)get_i32(h) != SAE_MAGIC) why = "bad magic: not an SAE file (sae_export.py writes them)";
    else if (get_i32(h + 4) != SAE_VERSION) { snprintf(buf, sizeof(buf), "version %d, expected %d", get_i32(h + 4), SAE_VERSION); why = buf; }
    else if (d <= 0 || d > (1 << 16) || n <= 0 || n > (1 << 24)) { snprintf(buf, sizeof(buf), "bad dims d=%d n=%d", d, n); why = buf; }
    else if (arch < 0 || arch >= SAE_N_ARCH) { snprintf(buf, sizeof(buf), "unknown architecture %d", arch); why = buf; }
    else if (arch == SAE_TOPK && (k <= 0 || k > n)) { snprintf(buf, sizeof(buf), "TopK k=%d not in [1, n=%d]", k, n); why = buf; }
    else if (hook != SAE_HOOK_RESID_POST && hook != SAE_HOOK_RESID_PRE) { snprintf(buf, sizeof(buf), "unknown hook convention %d", hook); why = buf; }
    else if (get_i32(h + 24) < 0 || get_i32(h + 24) > (1 << 16)) { snprintf(buf, sizeof(buf), "bad layer %d", get_i32(h + 24)); why = buf; }
    else if (get_i32(h + 32) != 0 && get_i32(h + 32) != 1) { snprintf(buf, sizeof(buf), "sub_bdec %d (0 or 1)", get_i32(h + 32)); why = buf; }
    else if (dtype != 0) { snprintf(buf, sizeof(buf), "dtype %d (only 0 = fp32)", dtype); why = buf; }
    else if (!isfinite(scale) || scale <= 0.0f) why = "act_scale must be > 0";
    else if (size != sae_file_size(d, n, arch)) {
        snprintf(buf, sizeof(buf), "size %zu bytes, expected %zu for d=%d n=%d %s (truncated?)", size,
                 sae_file_size(d, n, arch), d, n, sae_arch_name(arch));
        why = buf;
    }
    if (why) { munmap(map, size); snprintf(err, errlen, "%s: %s", path, why); return -1; }
    s->d = d; s->n = n; s->k = k; s->arch = arch;
    s->layer = get_i32(h + 24); s->hook = hook; s->sub_bdec = get_i32(h + 32);
    s->act_scale = scale;
    memcpy(&s->train_tokens, h + 40, 8);
    s->train_fvu = get_f32(h + 48);
    s->memory = map; s->memory_size = size; s->mapped = 1;
    sae_point(s);
    return 0;
}

// ----------------------------------------------------------------------------
// Encode / decode

// The k-th largest (k >= 1) of a[0..n): quickselect, reorders a.
static float kth_largest(float* a, int n, int k) {
    int lo = 0, hi = n - 1, want = k - 1;   // index in descending order
    while (lo < hi) {
        float pivot = a[lo + (hi - lo) / 2];
        int i = lo, j = hi;
        while (i <= j) {
            while (a[i] > pivot) i++;
            while (a[j] < pivot) j--;
            if (i <= j) { float t = a[i]; a[i] = a[j]; a[j] = t; i++; j--; }
        }
        if (want <= j) hi = j;
        else if (want >= i) lo = i;
        else return a[want];
    }
    return a[want];
}

// Indices of the k largest row[i] among the allowed ones (allowed NULL = all).
// scratch (n,). Returns the count written to idx (< k when fewer allowed).
static int top_k_indices(const float* row, int n, const unsigned char* allowed, int k, float* scratch, int* idx) {
    int c = 0;
    for (int i = 0; i < n; i++) if (!allowed || allowed[i]) scratch[c++] = row[i];
    if (k >= c) {
        int m = 0;
        for (int i = 0; i < n; i++) if (!allowed || allowed[i]) idx[m++] = i;
        return m;
    }
    float thr = kth_largest(scratch, c, k);
    int m = 0;
    for (int i = 0; i < n && m < k; i++) if ((!allowed || allowed[i]) && row[i] > thr) idx[m++] = i;
    for (int i = 0; i < n && m < k; i++) if ((!allowed || allowed[i]) && row[i] == thr) idx[m++] = i;
    return m;
}

// Activation of one row of pre-activations (b_enc already added), in place.
static void activate_row(const Sae* s, float* pre, float* scratch, int* iscratch) {
    int n = s->n;
    switch (s->arch) {
    case SAE_TOPK: {
        int m = top_k_indices(pre, n, NULL, s->k, scratch, iscratch);
        for (int j = 0; j < m; j++) scratch[j] = pre[iscratch[j]];
        memset(pre, 0, (size_t)n * sizeof(float));
        for (int j = 0; j < m; j++) pre[iscratch[j]] = scratch[j] > 0.0f ? scratch[j] : 0.0f;
        break;
    }
    case SAE_RELU:
        for (int i = 0; i < n; i++) if (!(pre[i] > 0.0f)) pre[i] = 0.0f;
        break;
    case SAE_JUMPRELU:
        for (int i = 0; i < n; i++) if (!(pre[i] > 0.0f && pre[i] > s->threshold[i])) pre[i] = 0.0f;
        break;
    case SAE_GATED:
        for (int i = 0; i < n; i++) {
            float mag = expf(s->r_mag[i]) * (pre[i] - s->b_enc[i]) + s->b_mag[i];
            pre[i] = pre[i] > 0.0f && mag > 0.0f ? mag : 0.0f;
        }
        break;
    }
}

// u = act_scale * x - sub_bdec * b_dec, the encoder's input
static void encoder_input(const Sae* s, const float* x, float* u) {
    for (int j = 0; j < s->d; j++) u[j] = s->act_scale * x[j] - (s->sub_bdec ? s->b_dec[j] : 0.0f);
}

void sae_encode(const Sae* s, const float* x, int m, float* f) {
    int d = s->d, n = s->n;
    float* u = xmalloc((size_t)m * d * sizeof(float));
    for (int r = 0; r < m; r++) encoder_input(s, x + (size_t)r * d, u + (size_t)r * d);
    gemm(0, 1, m, n, d, 1.0f, u, d, s->W_enc, d, 0.0f, f, n);   // f = u W_enc^T
    #pragma omp parallel if ((size_t)m * n > (1u << 18))
    {
        float* scratch = s->arch == SAE_TOPK ? xmalloc((size_t)n * sizeof(float)) : NULL;
        int* iscratch = s->arch == SAE_TOPK ? xmalloc((size_t)s->k * sizeof(int)) : NULL;
        #pragma omp for schedule(static)
        for (int r = 0; r < m; r++) {
            float* row = f + (size_t)r * n;
            for (int i = 0; i < n; i++) row[i] += s->b_enc[i];
            activate_row(s, row, scratch, iscratch);
        }
        free(scratch); free(iscratch);
    }
    free(u);
}

void sae_decode(const Sae* s, const float* f, int m, float* xhat) {
    int d = s->d, n = s->n;
    #pragma omp parallel for schedule(static) if ((size_t)m * n > (1u << 18))
    for (int r = 0; r < m; r++) {
        float* y = xhat + (size_t)r * d;
        const float* fr = f + (size_t)r * n;
        memcpy(y, s->b_dec, (size_t)d * sizeof(float));
        for (int i = 0; i < n; i++) if (fr[i] != 0.0f) axpy(y, fr[i], s->W_dec + (size_t)i * d, d);
        for (int j = 0; j < d; j++) y[j] /= s->act_scale;
    }
}

double sae_fvu(const Sae* s, const float* x, int m, double* l0) {
    int d = s->d, n = s->n, block = 64;
    double* mean = xcalloc(d, sizeof(double));
    for (int r = 0; r < m; r++) for (int j = 0; j < d; j++) mean[j] += x[(size_t)r * d + j];
    for (int j = 0; j < d; j++) mean[j] /= m > 0 ? m : 1;
    float* f = xmalloc((size_t)block * n * sizeof(float));
    float* xh = xmalloc((size_t)block * d * sizeof(float));
    double sse = 0.0, var = 0.0, active = 0.0;
    for (int r0 = 0; r0 < m; r0 += block) {
        int b = m - r0 < block ? m - r0 : block;
        sae_encode(s, x + (size_t)r0 * d, b, f);
        sae_decode(s, f, b, xh);
        for (int r = 0; r < b; r++) {
            const float* xr = x + (size_t)(r0 + r) * d;
            for (int j = 0; j < d; j++) {
                double e = (double)xh[(size_t)r * d + j] - xr[j], c = xr[j] - mean[j];
                sse += e * e; var += c * c;
            }
            for (int i = 0; i < n; i++) active += f[(size_t)r * n + i] != 0.0f;
        }
    }
    if (l0) *l0 = m > 0 ? active / m : 0.0;
    free(f); free(xh); free(mean);
    return var > 0.0 ? sse / var : 0.0;
}

// ----------------------------------------------------------------------------
// Training: TopK (+ AuxK) or ReLU + L1, Adam, unit-norm decoder rows.
//
// Per batch x (B, d), with xc = x - b_dec and D = sum_b |x_b - mean(x)|^2:
//   pre = xc W_enc^T + b_enc;  f = topk(relu(pre));  x^ = b_dec + f W_dec
//   FVU = sum_b |x^_b - x_b|^2 / D
//   AuxK (Gao et al.): for dead latents (no firing for dead_tokens tokens),
//     a = top-k_aux of relu(pre) restricted to the dead ones; the dead
//     latents are trained to explain the residual r = x - x^ (detached):
//     AuxK = min(n_dead/k_aux, 1) * sum_b |a_b W_dec - r_b|^2 / D
//   loss = FVU + auxk_alpha * AuxK            (TopK)
//   loss = FVU + l1 * sum_b sum_i f_bi / (B * sqrt(D / B))   (ReLU; rows are unit norm)
// The backward touches only the active latents (k + k_aux per row for
// TopK): per row, the gradient of the codes is a dot product with the
// active decoder rows; the weight gradients are accumulated per latent
// (latents are split across threads, so no two threads write one row).
// Then the gradient component parallel to each decoder row is removed,
// Adam steps, and the decoder rows are renormalised to unit length.

void sae_train_defaults(SaeTrainConfig* c, int d, int n, int k, int arch) {
    memset(c, 0, sizeof(*c));
    c->arch = arch;
    c->k = k;
    c->k_aux = d / 2 > 1 ? d / 2 : 1;
    c->auxk_alpha = 1.0f / 32.0f;
    c->l1 = 0.1f;
    c->dead_tokens = 10000000;
    c->lr = 2e-4f / sqrtf(n / 16384.0f);
    c->warmup = 1000;
    c->decay_frac = 0.2f;
    c->beta1 = 0.9f; c->beta2 = 0.999f; c->eps = 6.25e-10f;
}

// Geometric median of the rows of x (m, d) by Weiszfeld's iteration,
// started at the mean: the point minimising the sum of distances.
static void geometric_median(const float* x, int m, int d, float* out) {
    double* y = xcalloc(d, sizeof(double));
    double* num = xmalloc((size_t)d * sizeof(double));
    for (int r = 0; r < m; r++) for (int j = 0; j < d; j++) y[j] += x[(size_t)r * d + j];
    for (int j = 0; j < d; j++) y[j] /= m;
    for (int it = 0; it < 100; it++) {
        memset(num, 0, (size_t)d * sizeof(double));
        double den = 0.0;
        for (int r = 0; r < m; r++) {
            const float* xr = x + (size_t)r * d;
            double dist = 0.0;
            for (int j = 0; j < d; j++) dist += (xr[j] - y[j]) * (xr[j] - y[j]);
            double w = 1.0 / (sqrt(dist) + 1e-8);
            for (int j = 0; j < d; j++) num[j] += w * xr[j];
            den += w;
        }
        double moved = 0.0;
        for (int j = 0; j < d; j++) { double v = num[j] / den; moved += (v - y[j]) * (v - y[j]); y[j] = v; }
        if (moved < 1e-12) break;
    }
    for (int j = 0; j < d; j++) out[j] = (float)y[j];
    free(y); free(num);
}

void sae_init_from_data(Sae* s, const float* x, int m, int median, uint64_t seed) {
    int d = s->d, n = s->n;
    if (median) geometric_median(x, m < 8192 ? m : 8192, d, s->b_dec);
    else {
        for (int j = 0; j < d; j++) {
            double sum = 0.0;
            for (int r = 0; r < m; r++) sum += x[(size_t)r * d + j];
            s->b_dec[j] = (float)(sum / m);
        }
    }
    // tied init: random unit decoder rows, encoder = decoder
    uint64_t rng = seed;
    for (int i = 0; i < n; i++) {
        float* w = s->W_dec + (size_t)i * d;
        for (int j = 0; j < d; j++) w[j] = rand_normal(&rng);
        float norm = sqrtf(dot(w, w, d));
        for (int j = 0; j < d; j++) w[j] /= norm;
    }
    memcpy(s->W_enc, s->W_dec, (size_t)n * d * sizeof(float));
    memset(s->b_enc, 0, (size_t)n * sizeof(float));
    // scale the encoder so that the data is reconstructed at its own norm
    // (codes are linear in the encoder scale when b_enc = 0)
    int mm = m < 1024 ? m : 1024;
    float* f = xmalloc((size_t)mm * n * sizeof(float));
    float* xh = xmalloc((size_t)mm * d * sizeof(float));
    sae_encode(s, x, mm, f);
    sae_decode(s, f, mm, xh);
    double norm_x = 0.0, norm_r = 0.0;
    for (int r = 0; r < mm; r++) {
        double a = 0.0, b = 0.0;
        for (int j = 0; j < d; j++) {
            double c = x[(size_t)r * d + j] - s->b_dec[j], e = xh[(size_t)r * d + j] - s->b_dec[j];
            a += c * c; b += e * e;
        }
        norm_x += sqrt(a); norm_r += sqrt(b);
    }
    float scale = norm_r > 0.0 ? (float)(norm_x / norm_r) : 1.0f;
    for (size_t i = 0; i < (size_t)n * d; i++) s->W_enc[i] *= scale;
    free(f); free(xh);
}

// rows per block of the sparse pass: bounded so that the pre-activations
// (rows, n) and the entry lists (rows, cap) stay near 64 MB
static int block_rows(int n, int cap) {
    int r = 256;
    while (r > 1 && ((size_t)r * n > (1u << 24) || (size_t)r * cap > (1u << 22))) r /= 2;
    return r;
}

void sae_trainer_init(SaeTrainer* tr, Sae* s, const SaeTrainConfig* cfg, int max_batch) {
    if (s->arch != SAE_TOPK && s->arch != SAE_RELU) die("training supports topk and relu SAEs, not %s", sae_arch_name(s->arch));
    memset(tr, 0, sizeof(*tr));
    tr->sae = s;
    tr->cfg = *cfg;
    size_t count = s->memory_size / sizeof(float);
    tr->grad = xcalloc(count, sizeof(float));
    tr->m = xcalloc(count, sizeof(float));
    tr->v = xcalloc(count, sizeof(float));
    tr->since_fired = xcalloc(s->n, sizeof(int64_t));
    tr->fired = xcalloc(s->n, 1);
    tr->xc = xmalloc((size_t)max_batch * s->d * sizeof(float));
    tr->cap_rows = max_batch;
}

void sae_trainer_free(SaeTrainer* tr) {
    free(tr->grad); free(tr->m); free(tr->v); free(tr->since_fired); free(tr->fired); free(tr->xc);
    memset(tr, 0, sizeof(*tr));
}

static float lr_at(const SaeTrainConfig* c, int step) {
    float lr = c->lr;
    if (c->warmup > 0 && step < c->warmup) lr *= (float)(step + 1) / c->warmup;
    if (c->total_steps > 0 && c->decay_frac > 0.0f) {
        float start = c->total_steps * (1.0f - c->decay_frac);
        if (step >= start) lr *= fmaxf(0.0f, (c->total_steps - step) / (c->total_steps - start));
    }
    return lr;
}

SaeTrainStats sae_train_grad(SaeTrainer* tr, const float* x, int B) {
    Sae* s = tr->sae;
    const SaeTrainConfig* c = &tr->cfg;
    int d = s->d, n = s->n, topk = s->arch == SAE_TOPK;
    if (B > tr->cap_rows) die("sae_train_step: batch %d above the trainer's %d", B, tr->cap_rows);
    SaeLayout L = sae_layout(d, n, s->arch);
    float* gW_enc = tr->grad + L.W_enc / sizeof(float);
    float* gb_enc = tr->grad + L.b_enc / sizeof(float);
    float* gW_dec = tr->grad + L.W_dec / sizeof(float);
    float* gb_dec = tr->grad + L.b_dec / sizeof(float);
    size_t count = s->memory_size / sizeof(float);
    memset(tr->grad, 0, count * sizeof(float));

    // batch variance (the FVU denominator) and the centred inputs
    double* mean = xcalloc(d, sizeof(double));
    for (int b = 0; b < B; b++) for (int j = 0; j < d; j++) mean[j] += x[(size_t)b * d + j];
    for (int j = 0; j < d; j++) mean[j] /= B;
    double D = 0.0;
    for (int b = 0; b < B; b++)
        for (int j = 0; j < d; j++) { double e = x[(size_t)b * d + j] - mean[j]; D += e * e; }
    if (D <= 0.0) D = 1e-12;
    free(mean);
    float* xc = tr->xc;
    for (int b = 0; b < B; b++) for (int j = 0; j < d; j++) xc[(size_t)b * d + j] = x[(size_t)b * d + j] - s->b_dec[j];

    // dead latents and the AuxK setting of this step
    unsigned char* dead = xcalloc(n, 1);
    int n_dead = 0;
    for (int i = 0; i < n; i++) if (tr->since_fired[i] >= c->dead_tokens) { dead[i] = 1; n_dead++; }
    int k_aux = 0;
    float aux_scale = 0.0f;
    if (topk && c->auxk_alpha > 0.0f && n_dead > 0) {
        k_aux = c->k_aux < n_dead ? c->k_aux : n_dead;
        aux_scale = fminf((float)n_dead / c->k_aux, 1.0f);
    }
    float l1_unit = topk ? 0.0f : c->l1 / (float)(B * sqrt(D / B)); // d(L1 term)/d f_bi

    int cap = topk ? s->k + k_aux : n;        // entries per row
    int R = block_rows(n, cap);
    if (R > B) R = B;
    float* pre = xmalloc((size_t)R * n * sizeof(float));
    int* e_idx = xmalloc((size_t)R * cap * sizeof(int));
    float* e_val = xmalloc((size_t)R * cap * sizeof(float));    // f (or the AuxK code)
    float* e_dpre = xmalloc((size_t)R * cap * sizeof(float));   // dLoss/dpre
    int* n_main = xmalloc((size_t)R * sizeof(int));
    int* n_all = xmalloc((size_t)R * sizeof(int));
    float* G = xmalloc((size_t)R * d * sizeof(float));    // dLoss/dx^ per row
    float* GA = xmalloc((size_t)R * d * sizeof(float));   // dLoss/d(AuxK reconstruction) per row
    int* lat_count = xmalloc((size_t)(n + 1) * sizeof(int));
    int* lat_entry = xmalloc((size_t)R * cap * sizeof(int));
    unsigned char* fired = xcalloc(n, 1);
    int nt = engine_threads();
    double* db_thread = xcalloc((size_t)nt * d, sizeof(double));
    double sse = 0.0, aux_sse = 0.0, l1_sum = 0.0, l0_sum = 0.0;

    for (int r0 = 0; r0 < B; r0 += R) {
        int m = B - r0 < R ? B - r0 : R;
        gemm(0, 1, m, n, d, 1.0f, xc + (size_t)r0 * d, d, s->W_enc, d, 0.0f, pre, n);
        #pragma omp parallel reduction(+:sse, aux_sse, l1_sum, l0_sum) if ((size_t)m * n * d > (1u << 24))
        {
            float* scratch = xmalloc((size_t)n * sizeof(float));
            int* sel = xmalloc((size_t)(cap > 1 ? cap : 1) * sizeof(int));
            float* xh = xmalloc((size_t)d * sizeof(float));
            float* dxc = xmalloc((size_t)d * sizeof(float));
            double* db = db_thread + (size_t)engine_thread_id() * d;
            #pragma omp for schedule(static)
            for (int r = 0; r < m; r++) {
                int b = r0 + r;
                const float* xb = x + (size_t)b * d;
                float* row = pre + (size_t)r * n;
                for (int i = 0; i < n; i++) row[i] += s->b_enc[i];
                int* idx = e_idx + (size_t)r * cap;
                float* val = e_val + (size_t)r * cap;
                float* dpre = e_dpre + (size_t)r * cap;
                // the active latents: top k (TopK) or every positive one (ReLU)
                int nm = 0;
                if (topk) {
                    int got = top_k_indices(row, n, NULL, s->k, scratch, sel);
                    for (int j = 0; j < got; j++) if (row[sel[j]] > 0.0f) { idx[nm] = sel[j]; val[nm] = row[sel[j]]; nm++; }
                } else {
                    for (int i = 0; i < n; i++) if (row[i] > 0.0f) { idx[nm] = i; val[nm] = row[i]; nm++; }
                }
                // reconstruction and its error
                float* g = G + (size_t)r * d;
                memcpy(xh, s->b_dec, (size_t)d * sizeof(float));
                for (int j = 0; j < nm; j++) axpy(xh, val[j], s->W_dec + (size_t)idx[j] * d, d);
                for (int j = 0; j < d; j++) {
                    float e = xh[j] - xb[j];
                    sse += (double)e * e;
                    g[j] = (float)(2.0 * e / D);
                }
                l0_sum += nm;
                for (int j = 0; j < nm; j++) {
                    dpre[j] = dot(g, s->W_dec + (size_t)idx[j] * d, d) + l1_unit;
                    l1_sum += val[j];
                }
                // AuxK: the top k_aux dead latents model the residual
                int na = 0;
                if (k_aux > 0) {
                    int got = top_k_indices(row, n, dead, k_aux, scratch, sel);
                    for (int j = 0; j < got; j++)
                        if (row[sel[j]] > 0.0f) { idx[nm + na] = sel[j]; val[nm + na] = row[sel[j]]; na++; }
                    float* ga = GA + (size_t)r * d;
                    // a - r = a - (x - x^) = a + e, with e = x^ - x still in g * D / 2
                    for (int j = 0; j < d; j++) ga[j] = (float)(g[j] * D / 2.0);
                    for (int j = 0; j < na; j++) axpy(ga, val[nm + j], s->W_dec + (size_t)idx[nm + j] * d, d);
                    for (int j = 0; j < d; j++) {
                        aux_sse += (double)ga[j] * ga[j];
                        ga[j] = (float)(2.0 * c->auxk_alpha * aux_scale * ga[j] / D);
                    }
                    for (int j = 0; j < na; j++) dpre[nm + j] = dot(ga, s->W_dec + (size_t)idx[nm + j] * d, d);
                }
                n_main[r] = nm;
                n_all[r] = nm + na;
                // back to the input: x enters as x - b_dec, and x^ holds + b_dec
                memset(dxc, 0, (size_t)d * sizeof(float));
                for (int j = 0; j < nm + na; j++) axpy(dxc, dpre[j], s->W_enc + (size_t)idx[j] * d, d);
                for (int j = 0; j < d; j++) db[j] += g[j] - dxc[j];
            }
            free(scratch); free(sel); free(xh); free(dxc);
        }
        // entries grouped by latent (counting sort), then one thread per latent row
        memset(lat_count, 0, (size_t)(n + 1) * sizeof(int));
        for (int r = 0; r < m; r++) for (int j = 0; j < n_all[r]; j++) lat_count[e_idx[(size_t)r * cap + j] + 1]++;
        for (int i = 0; i < n; i++) lat_count[i + 1] += lat_count[i];
        int* fill = xmalloc((size_t)n * sizeof(int));
        memcpy(fill, lat_count, (size_t)n * sizeof(int));
        for (int r = 0; r < m; r++)
            for (int j = 0; j < n_all[r]; j++) lat_entry[fill[e_idx[(size_t)r * cap + j]]++] = r * cap + j;
        free(fill);
        #pragma omp parallel for schedule(dynamic, 16) if ((size_t)m * cap * d > (1u << 22))
        for (int i = 0; i < n; i++) {
            float* gwd = gW_dec + (size_t)i * d;
            float* gwe = gW_enc + (size_t)i * d;
            for (int q = lat_count[i]; q < lat_count[i + 1]; q++) {
                int e = lat_entry[q], r = e / cap, j = e % cap;
                int is_main = j < n_main[r];
                axpy(gwd, e_val[e], (is_main ? G : GA) + (size_t)r * d, d);
                axpy(gwe, e_dpre[e], xc + (size_t)(r0 + r) * d, d);
                gb_enc[i] += e_dpre[e];
                if (is_main) fired[i] = 1;
            }
        }
    }
    for (int t = 0; t < nt; t++) for (int j = 0; j < d; j++) gb_dec[j] += (float)db_thread[(size_t)t * d + j];
    memcpy(tr->fired, fired, (size_t)n);
    tr->batch = B;

    SaeTrainStats st;
    memset(&st, 0, sizeof(st));
    st.fvu = sse / D;
    st.auxk = k_aux > 0 ? aux_scale * aux_sse / D : 0.0;
    st.l1 = topk ? 0.0 : l1_sum / (B * sqrt(D / B));
    st.loss = st.fvu + (topk ? c->auxk_alpha * st.auxk : c->l1 * st.l1);
    st.l0 = l0_sum / B;
    free(pre); free(e_idx); free(e_val); free(e_dpre); free(n_main); free(n_all); free(G); free(GA);
    free(lat_count); free(lat_entry); free(fired); free(db_thread); free(dead);
    return st;
}

// Projection, Adam, renormalisation, dead-latent bookkeeping; returns the lr used.
float sae_train_update(SaeTrainer* tr) {
    Sae* s = tr->sae;
    const SaeTrainConfig* c = &tr->cfg;
    int d = s->d, n = s->n;
    SaeLayout L = sae_layout(d, n, s->arch);
    float* gW_dec = tr->grad + L.W_dec / sizeof(float);
    size_t count = s->memory_size / sizeof(float);
    // unit-norm decoder: drop the gradient component along each row
    #pragma omp parallel for schedule(static) if ((size_t)n * d > (1u << 20))
    for (int i = 0; i < n; i++) {
        const float* w = s->W_dec + (size_t)i * d;
        float* g = gW_dec + (size_t)i * d;
        axpy(g, -dot(g, w, d), w, d);
    }
    // Adam over the whole parameter block (the padding has zero gradient and stays zero)
    float lr = lr_at(c, tr->step);
    tr->step++;
    float bc1 = 1.0f - powf(c->beta1, tr->step), bc2 = 1.0f - powf(c->beta2, tr->step);
    float* p = (float*)s->memory;
    size_t first = SAE_HEADER_BYTES / sizeof(float);
    #pragma omp parallel for schedule(static) if (count > (1u << 20))
    for (size_t q = first; q < count; q++) {
        float g = tr->grad[q];
        tr->m[q] = c->beta1 * tr->m[q] + (1.0f - c->beta1) * g;
        tr->v[q] = c->beta2 * tr->v[q] + (1.0f - c->beta2) * g * g;
        p[q] -= lr * (tr->m[q] / bc1) / (sqrtf(tr->v[q] / bc2) + c->eps);
    }
    #pragma omp parallel for schedule(static) if ((size_t)n * d > (1u << 20))
    for (int i = 0; i < n; i++) {
        float* w = s->W_dec + (size_t)i * d;
        float norm = sqrtf(dot(w, w, d));
        if (norm > 0.0f) for (int j = 0; j < d; j++) w[j] /= norm;
    }
    for (int i = 0; i < n; i++) tr->since_fired[i] = tr->fired[i] ? 0 : tr->since_fired[i] + tr->batch;
    s->train_tokens += tr->batch;
    return lr;
}

SaeTrainStats sae_train_step(SaeTrainer* tr, const float* x, int B) {
    SaeTrainStats st = sae_train_grad(tr, x, B);
    st.lr = sae_train_update(tr);
    int dead = 0;
    for (int i = 0; i < tr->sae->n; i++) dead += tr->since_fired[i] >= tr->cfg.dead_tokens;
    st.dead_frac = (double)dead / tr->sae->n;
    tr->sae->train_fvu = (float)st.fvu;
    return st;
}

// ----------------------------------------------------------------------------
// A planted dictionary: data with a known sparse structure, to check that
// training recovers it.

void planted_init(Planted* p, int d, int n_true, int s, float noise, uint64_t seed) {
    memset(p, 0, sizeof(*p));
    p->d = d; p->n_true = n_true; p->s = s; p->noise = noise;
    p->rng = seed;
    p->dirs = xmalloc((size_t)n_true * d * sizeof(float));
    p->mean = xmalloc((size_t)d * sizeof(float));
    for (int i = 0; i < n_true; i++) {
        float* w = p->dirs + (size_t)i * d;
        for (int j = 0; j < d; j++) w[j] = rand_normal(&p->rng);
        float norm = sqrtf(dot(w, w, d));
        for (int j = 0; j < d; j++) w[j] /= norm;
    }
    for (int j = 0; j < d; j++) p->mean[j] = 0.5f * rand_normal(&p->rng);
}

void planted_sample(Planted* p, float* x, int m) {
    int d = p->d;
    int* chosen = xmalloc((size_t)p->s * sizeof(int));
    for (int r = 0; r < m; r++) {
        float* xr = x + (size_t)r * d;
        for (int j = 0; j < d; j++) xr[j] = p->mean[j] + p->noise * rand_normal(&p->rng);
        for (int a = 0; a < p->s; a++) {
            int i, dup;
            do {
                i = (int)(splitmix64(&p->rng) % (uint64_t)p->n_true);
                dup = 0;
                for (int q = 0; q < a; q++) dup |= chosen[q] == i;
            } while (dup);
            chosen[a] = i;
            axpy(xr, 0.5f + (float)rand_uniform(&p->rng), p->dirs + (size_t)i * d, d);
        }
    }
    free(chosen);
}

void planted_free(Planted* p) { free(p->dirs); free(p->mean); memset(p, 0, sizeof(*p)); }

double planted_recovery(const Planted* p, const Sae* s, float thresh) {
    int found = 0, d = p->d;
    for (int t = 0; t < p->n_true; t++) {
        const float* w = p->dirs + (size_t)t * d;
        float best = -1.0f;
        for (int i = 0; i < s->n; i++) {
            const float* v = s->W_dec + (size_t)i * d;
            float cs = dot(w, v, d) / (sqrtf(dot(v, v, d)) + 1e-12f);
            if (cs > best) best = cs;
        }
        found += best > thresh;
    }
    return (double)found / p->n_true;
}

// ----------------------------------------------------------------------------
// Interventions: the engine's residual hook, at the SAE's layer.
//
// For the selection modes, with f the codes of the selected latents S and
// f' their new values, x' = x + sum_{i in S} (f'_i - f_i) W_dec[i] / act_scale
// (the SAE's error term is kept). Only active latents (f_i > 0) are
// changed, so the edit is conditional: text that never activates S runs
// exactly as without the hook.

void sae_hook_init(SaeHook* h, const Sae* s, int layer, const int* sel, int n_sel, int mode, float value) {
    memset(h, 0, sizeof(*h));
    h->sae = s;
    h->layer = layer;
    h->sel = sel;
    h->n_sel = n_sel;
    h->mode = mode;
    h->value = value;
    h->skip_pos0 = 1;
    if (mode == SAE_MODE_SPLICE) {
        h->sumx = xcalloc(s->d, sizeof(double));
        h->ever = xcalloc(s->n, 1);
    }
}

void sae_hook_free(SaeHook* h) {
    free(h->f); free(h->fs); free(h->sumx); free(h->ever);
    memset(h, 0, sizeof(*h));
}

void sae_hook_reset_sequence(SaeHook* h) { h->gate_on = 0; h->seq_tokens = 0; h->seq_hits = 0; }

static void hook_scratch(SaeHook* h, int rows) {
    if (rows <= h->f_rows) return;
    free(h->f); free(h->fs);
    int dense = h->sae->arch == SAE_TOPK || h->mode == SAE_MODE_SPLICE;
    h->f = dense ? xmalloc((size_t)rows * h->sae->n * sizeof(float)) : NULL;
    h->fs = xmalloc((size_t)rows * (h->n_sel > 0 ? h->n_sel : 1) * sizeof(float));
    h->f_rows = rows;
}

// fs (m, n_sel) = the codes of the selected latents for the rows x (m, d)
static void selected_codes(SaeHook* h, const float* x, int m) {
    const Sae* s = h->sae;
    int d = s->d, ns = h->n_sel;
    if (s->arch == SAE_TOPK) {
        // membership of the top k depends on every latent: full encode
        sae_encode(s, x, m, h->f);
        for (int r = 0; r < m; r++)
            for (int q = 0; q < ns; q++) h->fs[(size_t)r * ns + q] = h->f[(size_t)r * s->n + h->sel[q]];
        return;
    }
    float* u = xmalloc((size_t)d * sizeof(float));
    // one latent's pre-activation is one dot product: compute only those
    Sae one = *s;   // a view of latent i alone, to reuse activate_row
    for (int r = 0; r < m; r++) {
        encoder_input(s, x + (size_t)r * d, u);
        for (int q = 0; q < ns; q++) {
            int i = h->sel[q];
            float pre = dot(s->W_enc + (size_t)i * d, u, d) + s->b_enc[i];
            one.n = 1;
            one.b_enc = s->b_enc + i;
            one.threshold = s->threshold ? s->threshold + i : NULL;
            one.r_mag = s->r_mag ? s->r_mag + i : NULL;
            one.b_mag = s->b_mag ? s->b_mag + i : NULL;
            activate_row(&one, &pre, NULL, NULL);
            h->fs[(size_t)r * ns + q] = pre;
        }
    }
    free(u);
}

static int hook_skips(const SaeHook* h, int pos) {
    return (h->skip_pos0 && pos == 0) || (h->keep && !h->keep[pos]);
}

// Whether row r of the batch has any selected latent active (its codes in h->fs)
static int row_hit(const SaeHook* h, int r) {
    const float* fs = h->fs + (size_t)r * h->n_sel;
    for (int q = 0; q < h->n_sel; q++)
        if (fs[q] > 0.0f) return 1;
    return 0;
}

void sae_hook_fn(void* ctx, int layer, int pos0, int n_pos, float* x, int dim) {
    SaeHook* h = ctx;
    const Sae* s = h->sae;
    if (layer != h->layer || dim != s->d) return;
    int d = s->d;
    if (h->mode == SAE_MODE_ABLATE) {
        for (int r = 0; r < n_pos; r++) if (!hook_skips(h, pos0 + r)) memset(x + (size_t)r * d, 0, (size_t)d * sizeof(float));
        return;
    }
    if (h->mode == SAE_MODE_SPLICE) {
        // x = x^ (the SAE output without its error term), with statistics
        hook_scratch(h, n_pos);
        float* xh = xmalloc((size_t)n_pos * d * sizeof(float));
        sae_encode(s, x, n_pos, h->f);
        sae_decode(s, h->f, n_pos, xh);
        for (int r = 0; r < n_pos; r++) {
            if (hook_skips(h, pos0 + r)) continue;
            float* xr = x + (size_t)r * d;
            const float* fr = h->f + (size_t)r * s->n;
            for (int j = 0; j < d; j++) {
                double e = (double)xh[(size_t)r * d + j] - xr[j];
                h->sse += e * e;
                h->sumsq += (double)xr[j] * xr[j];
                h->sumx[j] += xr[j];
            }
            for (int i = 0; i < s->n; i++) if (fr[i] != 0.0f) { h->ever[i] = 1; h->l0_sum += 1.0; }
            h->splice_tokens++;
            memcpy(xr, xh + (size_t)r * d, (size_t)d * sizeof(float));
        }
        free(xh);
        return;
    }
    if (h->n_sel == 0) return;   // nothing selected: the residual stream is left bit-identical
    hook_scratch(h, n_pos);
    selected_codes(h, x, n_pos);
    // count first, edit second: the per-sequence gate judges the whole batch
    // (a prompt at once), so a prompt whose first token happens to fire a
    // selected latent (a running fraction of 1/1) does not open it
    for (int r = 0; r < n_pos; r++) {
        if (hook_skips(h, pos0 + r)) continue;
        h->n_tokens++; h->seq_tokens++;
        if (row_hit(h, r)) { h->n_active++; h->seq_hits++; }
    }
    // per-sequence gate: open once the fraction of positions with a selected latent active exceeds alpha
    if (h->gate && !h->gate_on && h->seq_hits > h->gate_alpha * h->seq_tokens) h->gate_on = 1;
    if (h->gate && !h->gate_on) return;
    for (int r = 0; r < n_pos; r++) {
        if (hook_skips(h, pos0 + r) || !row_hit(h, r)) continue;
        const float* fs = h->fs + (size_t)r * h->n_sel;
        float* xr = x + (size_t)r * d;
        for (int q = 0; q < h->n_sel; q++) {
            float f = fs[q];
            if (!(f > 0.0f)) continue;
            float target = h->mode == SAE_MODE_CLAMP ? -h->value : (h->mode == SAE_MODE_SCALE ? -h->value * f : 0.0f);
            axpy(xr, (target - f) / s->act_scale, s->W_dec + (size_t)h->sel[q] * d, d);
        }
        h->n_changed++;
    }
}

#ifndef SAE_LIBRARY
// Everything below is the command-line program (not in the -DSAE_LIBRARY build).

// ----------------------------------------------------------------------------
// Data: rows of token ids with a mask of the content positions.
//
//   text files: cut into rows of T positions, each BOS + T-1 tokens of text
//               (the same rows as train_lora and run -m ppl)
//   .tsv files: "question<TAB>answer[<TAB>split]" lines, each one row in the
//               Llama-3 chat template (user question, assistant answer); a
//               first line starting with "question" is a header
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
        set->rows = realloc(set->rows, (size_t)set->cap * sizeof(Row));
        if (!set->rows) die("out of memory (rows)");
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

static void load_rows(RowSet* set, const Tokenizer* tok, const char* path, int T, int split, const char* system) {
    size_t len;
    char* text = read_file(path, &len);
    if (!utf8_valid(text, len)) die("%s is not valid UTF-8", path);
    if (ends_with(path, ".tsv") && strlen(text) != len) die("%s holds a NUL byte", path); // rows are C strings
    int before = set->n;
    if (ends_with(path, ".tsv")) {
        int line_no = 0;
        for (char* line = text; line && *line;) {
            char* next = strchr(line, '\n');
            size_t ll = next ? (size_t)(next - line) : strlen(line);
            if (next) next++;
            line_no++;
            if (ll && line[ll - 1] == '\r') ll--;
            char* l = xstrndup(line, ll);
            line = next;
            char* tab1 = strchr(l, '\t');
            if (ll == 0 || l[0] == '#' || (line_no == 1 && !strncmp(l, "question", 8))) { free(l); continue; }
            if (!tab1) die("%s:%d: expected question<TAB>answer", path, line_no);
            *tab1 = '\0';
            char* ans = tab1 + 1;
            char* tab2 = strchr(ans, '\t');
            int row_split = split;
            if (tab2) {
                *tab2 = '\0';
                const char* sp = tab2 + 1;
                if (!strncmp(sp, "forget", 6)) row_split = 0;
                else if (!strncmp(sp, "retain", 6)) row_split = 1;
                else if (split < 0) die("%s:%d: split must be 'forget' or 'retain', got '%s'", path, line_no, sp);
            }
            if (row_split < 0) row_split = 0;
            int cap = (int)(strlen(l) + strlen(ans) + (system ? strlen(system) : 0)) + 64;   // ids <= bytes + template
            int* ids = xmalloc((size_t)cap * sizeof(int));
            int n = chat_row_ids(tok, system, l, ans, 1, ids, cap);
            if (n > T) n = T;
            Row* r = new_row(set);
            r->n = n;
            r->ids = xmalloc((size_t)n * sizeof(int));
            memcpy(r->ids, ids, (size_t)n * sizeof(int));
            r->keep = xmalloc((size_t)n);
            chat_keep_mask(tok, r->ids, n, r->keep);
            r->question = strdup(l);
            r->answer = strdup(ans);
            r->split = row_split;
            free(ids);
            free(l);
        }
    } else {
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
    }
    if (set->n == before) die("%s has no rows", path);
    free(text);
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
        if (kw->n == cap) { cap = cap ? 2 * cap : 64; kw->words = realloc(kw->words, (size_t)cap * sizeof(char*)); }
        char* w = strdup(line);
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

// ----------------------------------------------------------------------------
// Capture: the residual stream after engine layers lo..hi of one row, by
// the engine's hook. The forward pass stops right after layer hi (the hook
// longjmps out of it): the layers above and the classifier never run. Rows
// are fed in chunks of batch_cap positions, each its own forward_batch
// call, so the KV cache of layers <= hi is complete for the next chunk.

typedef struct {
    int lo, hi, n;     // layers captured, row length
    float* out;        // (hi-lo+1, n, dim)
    jmp_buf stop;
} CaptureHook;

static void capture_hook_fn(void* ctx, int layer, int pos0, int n_pos, float* x, int dim) {
    CaptureHook* c = ctx;
    if (layer < c->lo || layer > c->hi) return;
    memcpy(c->out + ((size_t)(layer - c->lo) * c->n + pos0) * dim, x, (size_t)n_pos * dim * sizeof(float));
    if (layer == c->hi) longjmp(c->stop, 1);
}

static void capture_row(Transformer* t, const int* ids, int n, int lo, int hi, float* out) {
    CaptureHook c;
    c.lo = lo; c.hi = hi; c.n = n; c.out = out;
    ResidualHook saved = t->hook;
    void* saved_ctx = t->hook_ctx;
    t->hook = capture_hook_fn;
    t->hook_ctx = &c;
    int cap = t->state.batch_cap;
    for (volatile int done = 0; done < n; done += cap) {
        int m = n - done < cap ? n - done : cap;
        if (setjmp(c.stop) == 0) forward_batch(t, ids + done, m, done, NULL);
    }
    t->hook = saved;
    t->hook_ctx = saved_ctx;
}

// The content positions of a row at one engine layer, packed: returns the count.
static int capture_content(Transformer* t, const Row* r, int layer, float* tmp, float* out) {
    int d = t->config.dim, m = 0;
    capture_row(t, r->ids, r->n, layer, layer, tmp);
    for (int p = 0; p < r->n; p++)
        if (r->keep[p]) memcpy(out + (size_t)(m++) * d, tmp + (size_t)p * d, (size_t)d * sizeof(float));
    return m;
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
//   (total bytes of the data files and -T), then 24 zero bytes;
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
    float* row_acts;     // (T, dim) content activations of the current row
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
        if (st->at == st->rows->n) { shuffle_ints(st->order, st->rows->n, &st->rng); st->at = 0; st->epoch++; }
        const Row* r = &st->rows->rows[st->order[st->at++]];
        st->row_n = capture_content(st->t, r, st->layer, st->tmp, st->row_acts);
        st->row_at = 0;
    }
    memcpy(out, st->row_acts + (size_t)(st->row_at++) * d, (size_t)d * sizeof(float));
}

static void stream_next(ActStream* st, float* out) {
    for (;;) {
        stream_next_raw(st, out);
        if (isinf(st->max_norm) || sqrtf(dot(out, out, st->dim)) <= st->max_norm) break;
        st->dropped++;
    }
    st->produced++;
}

static int64_t data_fingerprint(const char** paths, int n_paths, int T) {
    int64_t fp = T;
    for (int i = 0; i < n_paths; i++) {
        struct stat s;
        if (stat(paths[i], &s) == 0) fp += (int64_t)s.st_size;
    }
    return fp;
}

// One pass over every row, content activations appended to path (atomically).
static void write_cache(Transformer* t, const RowSet* rows, int layer, int T, const char* path, int64_t fingerprint) {
    int d = t->config.dim;
    char tmp_path[4096];
    snprintf(tmp_path, sizeof(tmp_path), "%s.tmp", path);
    FILE* f = fopen(tmp_path, "wb");
    if (!f) die("cannot write %s: %s", tmp_path, strerror(errno));
    unsigned char h[CACHE_HEADER];
    memset(h, 0, sizeof(h));
    fwrite(h, 1, sizeof(h), f);
    float* tmp = xmalloc((size_t)T * d * sizeof(float));
    float* acts = xmalloc((size_t)T * d * sizeof(float));
    int64_t total = 0;
    long t0 = time_in_ms();
    for (int i = 0; i < rows->n; i++) {
        int m = capture_content(t, &rows->rows[i], layer, tmp, acts);
        if (fwrite(acts, sizeof(float), (size_t)m * d, f) != (size_t)m * d) die("cannot write %s: %s", tmp_path, strerror(errno));
        total += m;
        if (i % 16 == 15 || i == rows->n - 1) {
            long ms = time_in_ms() - t0;
            fprintf(stderr, "\rcache: %d/%d rows, %lld tokens, %.0f tok/s", i + 1, rows->n, (long long)total,
                    ms > 0 ? total * 1000.0 / ms : 0.0);
        }
    }
    fprintf(stderr, "\n");
    int64_t model_size = (int64_t)t->file_size;
    put_i32(h, (int32_t)CACHE_MAGIC); put_i32(h + 4, 1); put_i32(h + 8, d); put_i32(h + 12, layer);
    memcpy(h + 16, &total, 8); memcpy(h + 24, &model_size, 8); memcpy(h + 32, &fingerprint, 8);
    if (fseek(f, 0, SEEK_SET) != 0 || fwrite(h, 1, sizeof(h), f) != sizeof(h) || fclose(f) != 0 || rename(tmp_path, path) != 0)
        die("cannot write %s: %s", path, strerror(errno));
    free(tmp); free(acts);
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
// Options (poor man's argparse: a subcommand, a path, then flag/value pairs)

typedef struct {
    const char* cmd;
    const char* model;
    const char* tok;
    const char* sae;
    const char* out;
    const char* data[64];
    int n_data;
    const char* forget;
    const char* retain;
    const char* qa;
    const char* latents;
    const char* keywords;
    const char* cache;
    const char* finetune;
    const char* prompt;
    const char* system;
    const char* rule;
    int layer, hook, n_latents, expansion, k, arch, batch, buffer, T, ctx, warmup, k_aux, median;
    int64_t tokens, dead_tokens;
    float lr, decay_frac, auxk_alpha, l1, max_norm_ratio;
    int seed, log_every, save_every;
    float tau;
    int N, contexts;
    int mode;
    float clamp_c, scale_m;
    int gate;
    float gate_alpha;
    int steps, selftest;
    float temperature, topp;
    int planted_d, planted_true, planted_s;
} Opts;

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

static void usage(void) {
    fprintf(stderr,
"Usage: sae COMMAND ...   sparse autoencoders on the residual stream (see sae.h)\n"
"  sae train    MODEL.bin -z TOK --layer L --data FILE... -o SAE.bin   train a TopK (or ReLU) SAE\n"
"  sae measure  MODEL.bin -z TOK --sae SAE.bin --forget F --retain R   FVU, L0, dead %%, delta CE\n"
"  sae score    MODEL.bin -z TOK --sae SAE.bin --forget F --retain R -o latents.csv\n"
"  sae generate MODEL.bin -z TOK --sae SAE.bin --latents CSV -i PROMPT   generation with the intervention\n"
"  sae chat     MODEL.bin -z TOK --sae SAE.bin --latents CSV [-i MSG]    chat (stdin turns without -i)\n"
"  sae eval     MODEL.bin -z TOK --sae SAE.bin --latents CSV --sets DIR   the shared harness (sae eval --help)\n"
"  sae planted  [options]      train on a synthetic planted dictionary (no model) and report recovery\n"
"  sae info     SAE.bin        print an SAE file's header\n"
"Example: sae train llama3.bin -z llama3.tok --layer 16 --data hp.txt wiki.txt chat.tsv -o l16.sae\n"
"         sae score llama3.bin -z llama3.tok --sae l16.sae --forget hp.txt --retain wiki.txt \\\n"
"             --keywords data/harry_potter_keywords.txt -o latents.csv\n"
"         sae chat llama3.bin -z llama3.tok --sae l16.sae --latents latents.csv -N 20 --mode clamp -c 50\n"
"Data: text files are cut into rows of -T positions, each BOS + text; .tsv files hold\n"
"  question<TAB>answer[<TAB>forget|retain] lines, each one row in the Llama-3 chat template.\n"
"  BOS and chat-template tokens are never captured, scored or counted.\n"
"Layers: --layer L is the residual stream after block L (0-based; the engine's hook L,\n"
"  Hugging Face hidden_states[L+1]); --hook pre makes it the input of block L instead.\n"
"Common:\n"
"  -z FILE            tokenizer (required with a model)\n"
"  --sae FILE         SAE file (from sae train or sae_export.py)\n"
"  -T N               positions per row (default 256)\n"
"  --ctx N            context length for generate/chat/eval (default: the engine's)\n"
"  --system TEXT      system prompt for .tsv rows, chat and eval (default none)\n"
"  --no-selftest 1    skip the FVU check at layers L-1, L, L+1 when loading an SAE\n"
"Training (train, planted):\n"
"  --layer L          layer (required)             --hook post|pre  convention (default post)\n"
"  --data FILE...     one or more files            -o FILE          output SAE (required for train)\n"
"  --arch topk|relu   (default topk)               -k K             TopK k (default 32)\n"
"  --n-latents N      latents (default: --expansion x dim)   --expansion E (default 8)\n"
"  --tokens N         training tokens, k/M/G suffixes (default 1M)\n"
"  -b N               batch in tokens (default 4096)\n"
"  --lr X             Adam lr (default 2e-4/sqrt(n/16384))   --warmup N (default min(1000, steps/10))\n"
"  --decay-frac F     linear decay to 0 over the last F of the steps (default 0.2)\n"
"  --auxk-alpha X     AuxK weight (default 1/32; 0 = off)    --k-aux N (default dim/2)\n"
"  --dead-tokens N    dead after N tokens without firing (default min(10M, tokens/10))\n"
"  --l1 X             ReLU mode: L1 weight on sum f / rms(x - mean) (default 0.1; sweep it for the L0 you want)\n"
"  --bdec median|mean b_dec init (default median)\n"
"  --buffer N         shuffle buffer in tokens (default 65536, at most 1 GiB)\n"
"  --max-norm R       drop tokens whose norm exceeds R x the median (default 10; 0 = off)\n"
"  --cache FILE       activation cache: written by one pass over --data if missing, then reused\n"
"  --finetune FILE    start from this SAE instead of a fresh init\n"
"  --seed N           (default 1337)   --log-every N (default 10)   --save-every N steps (default 500)\n"
"  planted only: --d D (64) --true N (128) --s S (4); defaults -n 256 -k 4 --tokens 400k -b 256 --lr 1e-2\n"
"Scoring (score):\n"
"  --forget FILE      Harry Potter text or QA      --retain FILE   other text or QA\n"
"  --keywords FILE    keyword list: statistics at keyword positions (default none)\n"
"  --rule R           freq|diff|ratio|sq_ratio|keyword (default freq)\n"
"                     freq: forget firing frequency (SAEBench); diff: mean act forget - retain;\n"
"                     ratio: log frequency ratio; sq_ratio: mean squared act on forget among the\n"
"                     top 10%% by forget/retain squared ratio (Dynamic SAE Guardrails);\n"
"                     keyword: frequency at keyword positions - retain frequency\n"
"  --tau X            eligible only when the retain frequency <= X (default 0.01)\n"
"  -N N               latents selected (default 20); their gate threshold goes into the CSV\n"
"  --contexts N       top contexts printed per selected latent (default 5)\n"
"  -o FILE            CSV of every latent, best first (required)\n"
"Intervention (generate, chat, eval, measure):\n"
"  --latents CSV      from sae score (the first -N eligible rows), or a list such as 12,345\n"
"  -N N               how many latents to use (default 20)\n"
"  --mode M           clamp|zero|scale (default clamp): clamp sets an active latent to -c,\n"
"                     zero to 0, scale to -m times its value; the SAE error term is kept\n"
"  -c C               clamp value (default 50)      -m M   scale factor (default 1)\n"
"  --gate 1           per-sequence gate: intervene only once the fraction of positions with a\n"
"                     selected latent active exceeds alpha (the retain 95th percentile)\n"
"  --gate-alpha X     alpha (default: from the CSV when -N matches the score run)\n"
"Generation: -i TEXT  prompt / message   -n N  max new tokens (default 256; train/planted: -n = --n-latents)\n"
"  -t T  temperature (default 0 = greedy)   -p P  top-p (default 0.9)   -s SEED (= --seed)\n"
"Eval: every metric of eval.c with the intervention on; its options: sae eval --help\n"
"  -h, --help         this text\n");
    exit(EXIT_FAILURE);
}

static void opts_init(Opts* o) {
    memset(o, 0, sizeof(*o));
    o->T = 256; o->expansion = 8; o->k = -1; o->arch = SAE_TOPK; o->batch = 4096; o->buffer = 65536;
    o->tokens = -1; o->dead_tokens = -1; o->lr = -1; o->warmup = -1; o->decay_frac = 0.2f; o->auxk_alpha = 1.0f / 32.0f;
    o->k_aux = -1; o->l1 = 0.1f; o->median = 1; o->max_norm_ratio = 10.0f; o->seed = 1337; o->log_every = 10;
    o->save_every = 500; o->layer = -1000; o->rule = "freq"; o->tau = 0.01f; o->N = 20; o->contexts = 5;
    o->mode = SAE_MODE_CLAMP; o->clamp_c = 50.0f; o->scale_m = 1.0f; o->gate_alpha = -1.0f; o->steps = 256;
    o->selftest = 1; o->temperature = 0.0f; o->topp = 0.9f;
    o->planted_d = 64; o->planted_true = 128; o->planted_s = 4;
}

// One flag and its value; 0 when f is not an option of this program.
static int parse_flag(Opts* o, const char* f, const char* v) {
    if (!strcmp(f, "-z")) o->tok = v;
    else if (!strcmp(f, "--sae")) o->sae = v;
    else if (!strcmp(f, "-o")) o->out = v;
    else if (!strcmp(f, "--forget")) o->forget = v;
    else if (!strcmp(f, "--retain")) o->retain = v;
    else if (!strcmp(f, "--qa")) o->qa = v;
    else if (!strcmp(f, "--latents")) o->latents = v;
    else if (!strcmp(f, "--keywords")) o->keywords = v;
    else if (!strcmp(f, "--cache")) o->cache = v;
    else if (!strcmp(f, "--finetune")) o->finetune = v;
    else if (!strcmp(f, "-i")) o->prompt = v;
    else if (!strcmp(f, "--system")) o->system = v;
    else if (!strcmp(f, "--rule")) o->rule = v;
    else if (!strcmp(f, "--layer")) o->layer = parse_int_arg(f, v);
    else if (!strcmp(f, "--hook")) {
        if (!strcmp(v, "post")) o->hook = SAE_HOOK_RESID_POST;
        else if (!strcmp(v, "pre")) o->hook = SAE_HOOK_RESID_PRE;
        else die("--hook must be post or pre, got '%s'", v);
    }
    else if (!strcmp(f, "--n-latents") || !strcmp(f, "-n") ) {
        if (!strcmp(o->cmd, "train") || !strcmp(o->cmd, "planted")) o->n_latents = parse_int_arg(f, v);
        else o->steps = parse_int_arg(f, v);
    }
    else if (!strcmp(f, "--expansion")) o->expansion = parse_int_arg(f, v);
    else if (!strcmp(f, "-k")) o->k = parse_int_arg(f, v);
    else if (!strcmp(f, "--arch")) {
        if (!strcmp(v, "topk")) o->arch = SAE_TOPK;
        else if (!strcmp(v, "relu")) o->arch = SAE_RELU;
        else die("--arch must be topk or relu, got '%s'", v);
    }
    else if (!strcmp(f, "--tokens")) o->tokens = parse_count(f, v);
    else if (!strcmp(f, "-b")) o->batch = parse_int_arg(f, v);
    else if (!strcmp(f, "--lr")) o->lr = parse_float_arg(f, v);
    else if (!strcmp(f, "--warmup")) o->warmup = parse_int_arg(f, v);
    else if (!strcmp(f, "--decay-frac")) o->decay_frac = parse_float_arg(f, v);
    else if (!strcmp(f, "--auxk-alpha")) o->auxk_alpha = parse_float_arg(f, v);
    else if (!strcmp(f, "--k-aux")) o->k_aux = parse_int_arg(f, v);
    else if (!strcmp(f, "--dead-tokens")) o->dead_tokens = parse_count(f, v);
    else if (!strcmp(f, "--l1")) o->l1 = parse_float_arg(f, v);
    else if (!strcmp(f, "--bdec")) {
        if (!strcmp(v, "median")) o->median = 1;
        else if (!strcmp(v, "mean")) o->median = 0;
        else die("--bdec must be median or mean, got '%s'", v);
    }
    else if (!strcmp(f, "--buffer")) o->buffer = parse_int_arg(f, v);
    else if (!strcmp(f, "--max-norm")) o->max_norm_ratio = parse_float_arg(f, v);
    else if (!strcmp(f, "--seed")) o->seed = parse_int_arg(f, v);
    else if (!strcmp(f, "--log-every")) o->log_every = parse_int_arg(f, v);
    else if (!strcmp(f, "--save-every")) o->save_every = parse_int_arg(f, v);
    else if (!strcmp(f, "-T")) o->T = parse_int_arg(f, v);
    else if (!strcmp(f, "--ctx")) o->ctx = parse_int_arg(f, v);
    else if (!strcmp(f, "--tau")) o->tau = parse_float_arg(f, v);
    else if (!strcmp(f, "-N")) o->N = parse_int_arg(f, v);
    else if (!strcmp(f, "--contexts")) o->contexts = parse_int_arg(f, v);
    else if (!strcmp(f, "--mode")) {
        if (!strcmp(v, "clamp")) o->mode = SAE_MODE_CLAMP;
        else if (!strcmp(v, "zero")) o->mode = SAE_MODE_ZERO;
        else if (!strcmp(v, "scale")) o->mode = SAE_MODE_SCALE;
        else die("--mode must be clamp, zero or scale, got '%s'", v);
    }
    else if (!strcmp(f, "-c")) o->clamp_c = parse_float_arg(f, v);
    else if (!strcmp(f, "-m")) o->scale_m = parse_float_arg(f, v);
    else if (!strcmp(f, "--gate")) o->gate = parse_int_arg(f, v);
    else if (!strcmp(f, "--gate-alpha")) o->gate_alpha = parse_float_arg(f, v);
    else if (!strcmp(f, "-t")) o->temperature = parse_float_arg(f, v);
    else if (!strcmp(f, "-p")) o->topp = parse_float_arg(f, v);
    else if (!strcmp(f, "-s")) o->seed = parse_int_arg(f, v);
    else if (!strcmp(f, "--no-selftest")) o->selftest = !parse_int_arg(f, v);
    else if (!strcmp(f, "--d")) o->planted_d = parse_int_arg(f, v);
    else if (!strcmp(f, "--true")) o->planted_true = parse_int_arg(f, v);
    else if (!strcmp(f, "--s")) o->planted_s = parse_int_arg(f, v);
    else return 0;
    return 1;
}

static void parse_options(Opts* o, int argc, char** argv) {
    opts_init(o);
    if (argc < 2 || !strcmp(argv[1], "-h") || !strcmp(argv[1], "--help")) usage();
    o->cmd = argv[1];
    int i = 2;
    if (argc > 2 && argv[2][0] != '-') { o->model = argv[2]; i = 3; }
    for (; i < argc; i += 2) {
        const char* f = argv[i];
        if (!strcmp(f, "-h") || !strcmp(f, "--help")) usage();
        if (i + 1 >= argc) die("%s needs a value (see --help)", f);
        if (!strcmp(f, "--data")) {
            // one or more files, up to the next flag
            while (i + 1 < argc && argv[i + 1][0] != '-') {
                if (o->n_data == 64) die("--data: at most 64 files");
                o->data[o->n_data++] = argv[++i];
            }
            i--;
            continue;
        }
        if (!parse_flag(o, f, argv[i + 1])) die("unknown option %s (see --help)", f);
    }
    if (o->T < 2) die("-T must be >= 2");
    if (o->batch < 1) die("-b must be >= 1");
    if (o->N < 0) die("-N must be >= 0");
    if (o->temperature < 0.0f) die("-t must be >= 0");
    if (o->topp <= 0.0f || o->topp > 1.0f) die("-p must be in (0, 1]");
    if (o->ctx < 0) die("--ctx must be > 0");
}

// ----------------------------------------------------------------------------
// Loading a model, a tokenizer and an SAE, and the SAE's self-test

static void load_model(Transformer* t, Tokenizer* tok, const Opts* o, int ctx) {
    if (!o->model) die("%s needs a model file as its first argument (see --help)", o->cmd);
    if (!o->tok) die("a tokenizer is required (-z FILE; see --help)");
    build_tokenizer(tok, o->tok);
    build_transformer(t, o->model, ctx);
    if (tok->vocab_size != t->config.vocab_size)
        die("tokenizer has %d tokens but the model has %d: wrong tokenizer for this model", tok->vocab_size, t->config.vocab_size);
}

static void load_sae_for(Sae* s, const char* path, const Transformer* t) {
    char err[512];
    if (!path) die("an SAE is required (--sae FILE; see --help)");
    if (sae_load(s, path, err, sizeof(err)) != 0) die("%s", err);
    if (s->d != t->config.dim) die("SAE %s has d=%d but the model's dim is %d", path, s->d, t->config.dim);
    int e = sae_engine_layer(s);
    if (e < 0 || e >= t->config.n_layers)
        die("SAE layer %d (%s) cannot be hooked in a model of %d layers", s->layer,
            s->hook == SAE_HOOK_RESID_PRE ? "input of the block" : "output of the block", t->config.n_layers);
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
        capture_row(t, r->ids, r->n, lo, hi, tmp);
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
// sae train / sae planted

static void train_config_from_opts(SaeTrainConfig* c, const Opts* o, int d, int n, int k, int arch, int steps) {
    sae_train_defaults(c, d, n, k, arch);
    if (o->lr > 0) c->lr = o->lr;
    c->total_steps = steps;
    c->warmup = o->warmup >= 0 ? o->warmup : (steps / 10 < 1000 ? steps / 10 : 1000);
    c->decay_frac = o->decay_frac;
    c->auxk_alpha = o->auxk_alpha;
    if (o->k_aux > 0) c->k_aux = o->k_aux;
    c->l1 = o->l1;
    int64_t tokens = (int64_t)steps * o->batch;
    c->dead_tokens = o->dead_tokens > 0 ? o->dead_tokens : (tokens / 10 < 10000000 ? tokens / 10 : 10000000);
    if (c->dead_tokens < o->batch) c->dead_tokens = o->batch;
}

static void print_progress(int step, int steps, int64_t tokens, long ms, const SaeTrainStats* st, int relu) {
    printf("step %5d/%d | %9lld tok | %7.0f tok/s | FVU %.4f | L0 %6.1f | dead %5.1f%% | %s %.4f | lr %.2e\n",
           step, steps, (long long)tokens, ms > 0 ? tokens * 1000.0 / ms : 0.0, st->fvu, st->l0,
           100.0 * st->dead_frac, relu ? "L1" : "auxk", relu ? st->l1 : st->auxk, st->lr);
    fflush(stdout);
}

static void save_or_die(const Sae* s, const char* path) {
    if (sae_save(s, path) != 0) die("cannot write %s: %s", path, strerror(errno));
}

static int train_main(Opts* o) {
    if (o->layer == -1000) die("train needs --layer L");
    if (o->n_data == 0) die("train needs --data FILE...");
    if (!o->out) die("train needs -o SAE.bin");
    Transformer t;
    Tokenizer tok;
    load_model(&t, &tok, o, o->T);
    int d = t.config.dim;
    int e = o->hook == SAE_HOOK_RESID_PRE ? o->layer - 1 : o->layer;
    if (e < 0 || e >= t.config.n_layers)
        die("--layer %d%s is not a hookable layer of this %d-layer model", o->layer, o->hook ? " --hook pre" : "", t.config.n_layers);
    RowSet rows;
    memset(&rows, 0, sizeof(rows));
    for (int i = 0; i < o->n_data; i++) load_rows(&rows, &tok, o->data[i], o->T, 0, o->system);
    int64_t data_tokens = content_tokens(&rows);
    if (data_tokens == 0) die("the --data files have no content tokens");
    printf("data: %d rows, %lld content tokens; layer %d (%s), engine hook %d\n", rows.n, (long long)data_tokens,
           o->layer, o->hook ? "input of the block" : "output of the block", e);

    ActStream st;
    memset(&st, 0, sizeof(st));
    st.t = &t; st.rows = &rows; st.layer = e; st.dim = d; st.rng = (uint64_t)o->seed * 7919 + 1;
    st.max_norm = INFINITY;
    st.order = xmalloc((size_t)rows.n * sizeof(int));
    for (int i = 0; i < rows.n; i++) st.order[i] = i;
    st.at = rows.n;   // shuffle on first use
    st.tmp = xmalloc((size_t)o->T * d * sizeof(float));
    st.row_acts = xmalloc((size_t)o->T * d * sizeof(float));
    if (o->cache) {
        int64_t fp = data_fingerprint(o->data, o->n_data, o->T);
        if (access(o->cache, F_OK) != 0) {
            printf("capturing activations into the cache %s\n", o->cache);
            write_cache(&t, &rows, e, o->T, o->cache, fp);
        }
        open_cache(&st, o->cache, (int64_t)t.file_size, fp);
        printf("cache %s: %lld tokens\n", o->cache, (long long)st.cache_n);
        data_tokens = st.cache_n;
    }

    // shuffle buffer, filled once; then the norm filter from its median
    int64_t buf_cap = o->buffer;
    if (buf_cap > (1 << 28) / d) buf_cap = (1 << 28) / d;
    if (buf_cap > data_tokens) buf_cap = data_tokens;
    if (buf_cap < 1) buf_cap = 1;
    ShuffleBuffer sb = {xmalloc((size_t)buf_cap * d * sizeof(float)), (int)buf_cap, d, (uint64_t)o->seed * 31 + 7};
    long t0 = time_in_ms();
    for (int64_t i = 0; i < buf_cap; i++) stream_next(&st, sb.buf + (size_t)i * d);
    if (o->max_norm_ratio > 0) {
        float* norms = xmalloc((size_t)buf_cap * sizeof(float));
        for (int64_t i = 0; i < buf_cap; i++) norms[i] = sqrtf(dot(sb.buf + (size_t)i * d, sb.buf + (size_t)i * d, d));
        qsort(norms, (size_t)buf_cap, sizeof(float), cmp_float);
        float median = norms[buf_cap / 2];
        st.max_norm = o->max_norm_ratio * median;
        for (int64_t i = 0; i < buf_cap; i++) {
            float* slot = sb.buf + (size_t)i * d;
            if (sqrtf(dot(slot, slot, d)) > st.max_norm) { st.dropped++; stream_next(&st, slot); }
        }
        printf("token norms: median %.3f, dropping tokens above %.3f\n", median, st.max_norm);
        free(norms);
    }

    Sae s;
    int k = o->k > 0 ? o->k : 32;
    if (o->finetune) {
        Sae from;
        char err[512];
        if (sae_load(&from, o->finetune, err, sizeof(err)) != 0) die("%s", err);
        if (from.d != d) die("--finetune SAE has d=%d, the model %d", from.d, d);
        if (from.arch != SAE_TOPK && from.arch != SAE_RELU) die("--finetune: cannot train a %s SAE", sae_arch_name(from.arch));
        sae_alloc(&s, from.d, from.n, o->k > 0 ? o->k : from.k, from.arch);
        memcpy((char*)s.memory + SAE_HEADER_BYTES, (char*)from.memory + SAE_HEADER_BYTES, s.memory_size - SAE_HEADER_BYTES);
        s.sub_bdec = from.sub_bdec; s.act_scale = from.act_scale; s.train_tokens = from.train_tokens;
        if (s.sub_bdec != 1 || s.act_scale != 1.0f) die("--finetune needs an SAE that encodes x - b_dec with act_scale 1");
        sae_free(&from);
    } else {
        int n = o->n_latents > 0 ? o->n_latents : o->expansion * d;
        if (o->arch == SAE_TOPK && (k < 1 || k > n)) die("-k %d must be in [1, %d]", k, n);
        sae_alloc(&s, d, n, o->arch == SAE_TOPK ? k : 0, o->arch);
    }
    s.layer = o->layer;
    s.hook = o->hook;
    int64_t tokens = o->tokens >= 0 ? o->tokens : 1000000;
    int B = o->batch, steps = (int)(tokens / B);
    if (steps < 1) die("--tokens %lld is less than one batch of %d", (long long)tokens, B);
    float* x = xmalloc((size_t)B * d * sizeof(float));
    if (!o->finetune) {
        buffer_draw(&sb, &st, x, B);
        sae_init_from_data(&s, x, B, o->median, (uint64_t)o->seed);
    }
    SaeTrainConfig cfg;
    train_config_from_opts(&cfg, o, d, s.n, s.k, s.arch, steps);
    printf("training a %s SAE: d %d, n %d%s%d, %d steps of %d tokens, lr %.2e, warmup %d, dead after %lld tokens\n",
           sae_arch_name(s.arch), d, s.n, s.arch == SAE_TOPK ? ", k " : ", l1 x1000 ", s.arch == SAE_TOPK ? s.k : (int)(cfg.l1 * 1000),
           steps, B, cfg.lr, cfg.warmup, (long long)cfg.dead_tokens);
    SaeTrainer tr;
    sae_trainer_init(&tr, &s, &cfg, B);
    SaeTrainStats stats;
    memset(&stats, 0, sizeof(stats));
    for (int step = 0; step < steps; step++) {
        if (step > 0) buffer_draw(&sb, &st, x, B);
        stats = sae_train_step(&tr, x, B);
        if (o->log_every > 0 && ((step + 1) % o->log_every == 0 || step == 0 || step == steps - 1))
            print_progress(step + 1, steps, (int64_t)(step + 1) * B, time_in_ms() - t0, &stats, s.arch == SAE_RELU);
        if (o->save_every > 0 && (step + 1) % o->save_every == 0 && step != steps - 1) save_or_die(&s, o->out);
    }
    save_or_die(&s, o->out);
    printf("saved %s (%d epochs of the data%s; %lld tokens dropped as outliers)\n", o->out, st.epoch,
           st.cache ? " cache" : "", (long long)st.dropped);
    sae_trainer_free(&tr);
    free(x); free(sb.buf); free(st.order); free(st.tmp); free(st.row_acts); free(st.block_order);
    if (st.cache) munmap((char*)st.cache - CACHE_HEADER, st.cache_bytes);
    sae_free(&s);
    free_rows(&rows);
    free_transformer(&t);
    free_tokenizer(&tok);
    return 0;
}

static int planted_main(Opts* o) {
    int d = o->planted_d, nt = o->planted_true, sp = o->planted_s;
    int n = o->n_latents > 0 ? o->n_latents : 2 * nt, k = o->k > 0 ? o->k : sp;
    int B = o->batch == 4096 ? 256 : o->batch;
    int64_t tokens = o->tokens >= 0 ? o->tokens : 400000;
    if (d < 2 || nt < 1 || sp < 1 || sp > nt || k > n) die("planted: need d >= 2, 1 <= s <= true, k <= n");
    Planted p;
    planted_init(&p, d, nt, sp, 0.01f, (uint64_t)o->seed);
    Sae s;
    sae_alloc(&s, d, n, o->arch == SAE_TOPK ? k : 0, o->arch);
    float* x = xmalloc((size_t)B * d * sizeof(float));
    planted_sample(&p, x, B);
    sae_init_from_data(&s, x, B, o->median, (uint64_t)o->seed + 1);
    int steps = (int)(tokens / B);
    if (steps < 1) die("--tokens below one batch");
    Opts oo = *o;
    oo.batch = B;
    if (oo.lr <= 0) oo.lr = 1e-2f;
    SaeTrainConfig cfg;
    train_config_from_opts(&cfg, &oo, d, n, k, o->arch, steps);
    if (o->dead_tokens <= 0) cfg.dead_tokens = 20000;
    printf("planted dictionary: %d directions in %d dims, %d active per sample; SAE n %d k %d, %d steps of %d\n",
           nt, d, sp, n, k, steps, B);
    SaeTrainer tr;
    sae_trainer_init(&tr, &s, &cfg, B);
    long t0 = time_in_ms();
    SaeTrainStats st;
    for (int step = 0; step < steps; step++) {
        planted_sample(&p, x, B);
        st = sae_train_step(&tr, x, B);
        if (o->log_every > 0 && ((step + 1) % (o->log_every * 10) == 0 || step == steps - 1))
            print_progress(step + 1, steps, (int64_t)(step + 1) * B, time_in_ms() - t0, &st, o->arch == SAE_RELU);
    }
    int m = 8192;
    float* test = xmalloc((size_t)m * d * sizeof(float));
    planted_sample(&p, test, m);
    double l0, fvu = sae_fvu(&s, test, m, &l0);
    printf("held-out FVU %.4f, L0 %.2f, planted directions recovered at cosine > 0.9: %.1f%%\n", fvu, l0,
           100.0 * planted_recovery(&p, &s, 0.9f));
    if (o->out) save_or_die(&s, o->out);
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
        else die("--gate needs --gate-alpha, or a CSV scored with -N %d", sel->n_sel);
    }
    printf("intervention: %d latents (", sel->n_sel);
    for (int q = 0; q < sel->n_sel && q < 12; q++) printf(q ? " %d" : "%d", sel->sel[q]);
    if (sel->n_sel > 12) printf(" ...");
    printf("), mode %s", mode_name(o->mode));
    if (o->mode == SAE_MODE_CLAMP) printf(" -c %g", o->clamp_c);
    if (o->mode == SAE_MODE_SCALE) printf(" -m %g", o->scale_m);
    if (h->gate) printf(", gate alpha %.4f", h->gate_alpha);
    printf("\n");
}

static void load_split_rows(RowSet* forget, RowSet* retain, const Tokenizer* tok, const Opts* o, int need) {
    memset(forget, 0, sizeof(*forget));
    memset(retain, 0, sizeof(*retain));
    if (o->qa) {
        RowSet all;
        memset(&all, 0, sizeof(all));
        load_rows(&all, tok, o->qa, o->T, -1, o->system);
        for (int i = 0; i < all.n; i++) *new_row(all.rows[i].split ? retain : forget) = all.rows[i];
        free(all.rows);
    }
    if (o->forget) load_rows(forget, tok, o->forget, o->T, 0, o->system);
    if (o->retain) load_rows(retain, tok, o->retain, o->T, 1, o->system);
    if (need && (forget->n == 0 || retain->n == 0)) die("%s needs --forget F and --retain R (or --qa FILE)", o->cmd);
}

static int measure_main(Opts* o) {
    Transformer t;
    Tokenizer tok;
    load_model(&t, &tok, o, o->T);
    Sae s;
    load_sae_for(&s, o->sae, &t);
    print_sae(&s, o->sae);
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
typedef struct { int latent, eligible; double score; } RankedLatent;
static int cmp_ranked(const void* a, const void* b) {
    const RankedLatent* x = a;
    const RankedLatent* y = b;
    if (x->eligible != y->eligible) return y->eligible - x->eligible;
    if (x->score != y->score) return (x->score < y->score) - (x->score > y->score);
    return (x->latent > y->latent) - (x->latent < y->latent);
}

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
        capture_row(t, r->ids, n, e, e, acts);
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

static int score_main(Opts* o) {
    if (!o->out) die("score needs -o latents.csv");
    Transformer t;
    Tokenizer tok;
    load_model(&t, &tok, o, o->T);
    Sae s;
    load_sae_for(&s, o->sae, &t);
    print_sae(&s, o->sae);
    RowSet sets[2];
    load_split_rows(&sets[0], &sets[1], &tok, o, 1);
    int rule = -1;
    const char* rules[] = {"freq", "diff", "ratio", "sq_ratio", "keyword"};
    for (int q = 0; q < 5; q++) if (!strcmp(o->rule, rules[q])) rule = q;
    if (rule < 0) die("--rule must be freq, diff, ratio, sq_ratio or keyword, got '%s'", o->rule);
    if (rule == 4 && !o->keywords) die("--rule keyword needs --keywords FILE");
    if (o->keywords) {
        Keywords kw;
        load_keywords(&kw, o->keywords);
        mark_keywords(&sets[0], &tok, &kw);
        mark_keywords(&sets[1], &tok, &kw);
        for (int w = 0; w < kw.n; w++) free(kw.words[w]);
        free(kw.words);
    }
    if (o->selftest) sae_selftest(&t, &tok, &s, &sets[1], 256);
    int n = s.n, d = s.d, e = sae_engine_layer(&s), M = o->contexts > 0 ? o->contexts : 0;
    double* cnt[2] = {xcalloc(n, sizeof(double)), xcalloc(n, sizeof(double))};
    double* sum[2] = {xcalloc(n, sizeof(double)), xcalloc(n, sizeof(double))};
    double* sq[2] = {xcalloc(n, sizeof(double)), xcalloc(n, sizeof(double))};
    double* cnt_kw = xcalloc(n, sizeof(double));
    double* sum_kw = xcalloc(n, sizeof(double));
    TopCtx* heaps = xmalloc((size_t)n * (M > 0 ? M : 1) * sizeof(TopCtx));
    int* heap_n = xcalloc(n, sizeof(int));
    int64_t toks[2] = {0, 0}, tok_kw = 0;
    int block = 64;
    float* tmp = xmalloc((size_t)o->T * d * sizeof(float));
    float* acts = xmalloc((size_t)o->T * d * sizeof(float));
    int* pos = xmalloc((size_t)o->T * sizeof(int));
    float* f = xmalloc((size_t)block * n * sizeof(float));
    long t0 = time_in_ms();
    for (int set = 0; set < 2; set++) {
        for (int i = 0; i < sets[set].n; i++) {
            const Row* r = &sets[set].rows[i];
            capture_row(&t, r->ids, r->n, e, e, tmp);
            int m = 0;
            for (int p = 0; p < r->n; p++) {
                if (!r->keep[p]) continue;
                memcpy(acts + (size_t)m * d, tmp + (size_t)p * d, (size_t)d * sizeof(float));
                pos[m++] = p;
                if (r->kw && r->kw[p]) tok_kw++;
            }
            toks[set] += m;
            int row_id = set ? sets[0].n + i : i;
            for (int b0 = 0; b0 < m; b0 += block) {
                int mb = m - b0 < block ? m - b0 : block;
                sae_encode(&s, acts + (size_t)b0 * d, mb, f);
                #pragma omp parallel for schedule(static) if ((size_t)mb * n > (1u << 18))
                for (int lat = 0; lat < n; lat++) {
                    for (int q = 0; q < mb; q++) {
                        float v = f[(size_t)q * n + lat];
                        if (v == 0.0f) continue;
                        int p = pos[b0 + q];
                        cnt[set][lat] += 1.0; sum[set][lat] += v; sq[set][lat] += (double)v * v;
                        if (r->kw && r->kw[p]) { cnt_kw[lat] += 1.0; sum_kw[lat] += v; }
                        if (M > 0) heap_push(heaps + (size_t)lat * M, &heap_n[lat], M, (TopCtx){v, row_id, p});
                    }
                }
            }
        }
        fprintf(stderr, "scored %s: %d rows, %lld tokens (%.1f s)\n", set ? "retain" : "forget", sets[set].n,
                (long long)toks[set], (time_in_ms() - t0) / 1000.0);
    }
    // the scores
    double tf = toks[0] > 0 ? (double)toks[0] : 1.0, trt = toks[1] > 0 ? (double)toks[1] : 1.0;
    double tk = tok_kw > 0 ? (double)tok_kw : 1.0;
    double* score = xmalloc((size_t)n * sizeof(double));
    unsigned char* eligible = xcalloc(n, 1);
    double ratio_cut = 0.0;
    if (rule == 3) {
        // Dynamic SAE Guardrails: keep the top 10% by forget/retain squared-activation ratio
        double* ratios = xmalloc((size_t)n * sizeof(double));
        int c = 0;
        for (int i = 0; i < n; i++) if (cnt[0][i] > 0) ratios[c++] = (sq[0][i] / tf) / (sq[1][i] / trt + 1e-12);
        if (c > 0) { qsort(ratios, c, sizeof(double), cmp_double); ratio_cut = ratios[(int)(0.9 * (c - 1))]; }
        free(ratios);
    }
    for (int i = 0; i < n; i++) {
        double ff = cnt[0][i] / tf, fr = cnt[1][i] / trt;
        switch (rule) {
        case 0: score[i] = ff; break;
        case 1: score[i] = sum[0][i] / tf - sum[1][i] / trt; break;
        case 2: score[i] = log((cnt[0][i] + 1.0) / (tf + 1.0)) - log((cnt[1][i] + 1.0) / (trt + 1.0)); break;
        case 3: score[i] = (sq[0][i] / tf) / (sq[1][i] / trt + 1e-12) >= ratio_cut ? sq[0][i] / tf : 0.0; break;
        default: score[i] = cnt_kw[i] / tk - fr; break;
        }
        eligible[i] = cnt[0][i] > 0 && fr <= o->tau && score[i] > 0.0;
    }
    RankedLatent* ranked = xmalloc((size_t)n * sizeof(RankedLatent));
    for (int i = 0; i < n; i++) ranked[i] = (RankedLatent){i, eligible[i], score[i]};
    qsort(ranked, n, sizeof(RankedLatent), cmp_ranked);
    int* order = xmalloc((size_t)n * sizeof(int));
    for (int i = 0; i < n; i++) order[i] = ranked[i].latent;
    free(ranked);
    int n_eligible = 0;
    for (int i = 0; i < n; i++) n_eligible += eligible[i];
    int N = o->N < n_eligible ? o->N : n_eligible;
    // the per-sequence gate threshold of the selected latents
    double* frac_r = row_fractions(&t, &tok, o->system, &s, &sets[1], order, N);
    double* frac_f = row_fractions(&t, &tok, o->system, &s, &sets[0], order, N);
    double* sorted = xmalloc((size_t)sets[1].n * sizeof(double));
    memcpy(sorted, frac_r, (size_t)sets[1].n * sizeof(double));
    qsort(sorted, sets[1].n, sizeof(double), cmp_double);
    int at95 = (int)ceil(0.95 * sets[1].n) - 1;
    double alpha = sorted[at95 < 0 ? 0 : at95];
    int open_f = 0, open_r = 0;
    for (int i = 0; i < sets[0].n; i++) open_f += frac_f[i] > alpha;
    for (int i = 0; i < sets[1].n; i++) open_r += frac_r[i] > alpha;

    // the CSV, best first
    char tmp_path[4096];
    snprintf(tmp_path, sizeof(tmp_path), "%s.tmp", o->out);
    FILE* csv = fopen(tmp_path, "w");
    if (!csv) die("cannot write %s: %s", o->out, strerror(errno));
    fprintf(csv, "# sae=%s layer=%d hook=%s rule=%s tau=%g forget_tokens=%lld retain_tokens=%lld keyword_tokens=%lld\n",
            o->sae, s.layer, s.hook ? "pre" : "post", o->rule, o->tau, (long long)toks[0], (long long)toks[1], (long long)tok_kw);
    fprintf(csv, "# gate N=%d alpha=%.6f\n", N, alpha);
    fprintf(csv, "rank,latent,eligible,score,freq_forget,freq_retain,mean_forget,mean_retain,sq_forget,sq_retain,"
                 "freq_keyword,mean_keyword\n");
    for (int q = 0; q < n; q++) {
        int i = order[q];
        fprintf(csv, "%d,%d,%d,%.6g,%.6g,%.6g,%.6g,%.6g,%.6g,%.6g,%.6g,%.6g\n", q + 1, i, eligible[i], score[i],
                cnt[0][i] / tf, cnt[1][i] / trt, sum[0][i] / tf, sum[1][i] / trt, sq[0][i] / tf, sq[1][i] / trt,
                cnt_kw[i] / tk, cnt_kw[i] > 0 ? sum_kw[i] / cnt_kw[i] : 0.0);
    }
    if (fclose(csv) != 0 || rename(tmp_path, o->out) != 0) die("cannot write %s: %s", o->out, strerror(errno));
    printf("wrote %s: %d latents, %d eligible (retain frequency <= %g), rule %s\n", o->out, n, n_eligible, o->tau, o->rule);
    printf("gate for the top %d: alpha = %.4f (95th percentile over %d retain rows); it opens on %d/%d forget rows, "
           "%d/%d retain rows\n", N, alpha, sets[1].n, open_f, sets[0].n, open_r, sets[1].n);

    // the selected latents and where they fire most
    printf("\n%4s %7s %10s %9s %9s %9s %9s %9s\n", "rank", "latent", "score", "f_forget", "f_retain", "mean_f", "mean_r", "f_keyword");
    for (int q = 0; q < N; q++) {
        int i = order[q];
        printf("%4d %7d %10.4g %9.4f %9.5f %9.4f %9.4f %9.4f\n", q + 1, i, score[i], cnt[0][i] / tf, cnt[1][i] / trt,
               sum[0][i] / tf, sum[1][i] / trt, cnt_kw[i] / tk);
        TopCtx* h = heaps + (size_t)i * M;
        qsort(h, heap_n[i], sizeof(TopCtx), cmp_ctx_desc);
        for (int c = 0; c < heap_n[i]; c++) {
            int from_retain = h[c].row >= sets[0].n;
            const Row* r = from_retain ? &sets[1].rows[h[c].row - sets[0].n] : &sets[0].rows[h[c].row];
            printf("        %8.3f %s ", h[c].act, from_retain ? "retain" : "forget");
            print_context(&tok, r, h[c].pos);
            printf("\n");
        }
    }
    free(frac_r); free(frac_f); free(sorted); free(order); free(score); free(eligible);
    for (int q = 0; q < 2; q++) { free(cnt[q]); free(sum[q]); free(sq[q]); free_rows(&sets[q]); }
    free(cnt_kw); free(sum_kw); free(heaps); free(heap_n); free(tmp); free(acts); free(pos); free(f);
    sae_free(&s);
    free_transformer(&t);
    free_tokenizer(&tok);
    return 0;
}

// ----------------------------------------------------------------------------
// Generation with the intervention: generate, chat, eval.

// Prompt tokens at pos0.. With the per-sequence gate, a gate that opens
// inside the prompt means the prompt runs again with the intervention from
// its first position (the hook's counters are rewound first).
static float* prefill(Transformer* t, SaeHook* h, const int* ids, int n, int pos0) {
    if (!h || !h->gate || h->gate_on) return forward_batch(t, ids, n, pos0, NULL);
    SaeHook before = *h;
    float* logits = forward_batch(t, ids, n, pos0, NULL);
    if (h->gate_on) {
        h->seq_tokens = before.seq_tokens; h->seq_hits = before.seq_hits;
        h->n_tokens = before.n_tokens; h->n_active = before.n_active; h->n_changed = before.n_changed;
        logits = forward_batch(t, ids, n, pos0, NULL);
    }
    return logits;
}

// Samples up to max_new tokens after the prompt (whose logits are given),
// appending them to hist; the text goes to stdout (print) and/or out.
static int decode_tokens(Transformer* t, const Tokenizer* tok, Sampler* sm, float* logits, int* hist, int n_hist,
                         int max_new, int print, char* out, size_t out_cap, int* n_gen) {
    size_t at = 0;
    if (out) out[0] = '\0';
    *n_gen = 0;
    while (*n_gen < max_new) {
        int next = sample(sm, logits);
        (*n_gen)++;
        hist[n_hist++] = next;
        if (is_stop_token(&t->config, tok, next)) break;
        if (print) print_token(tok, next);
        if (out && !tok->is_special[next]) {
            int len;
            const char* piece = token_piece(tok, next, &len);
            if (at + len < out_cap) { memcpy(out + at, piece, len); at += len; out[at] = '\0'; }
        }
        if (n_hist >= t->state.seq_len) { fprintf(stderr, "\n[context of %d positions full]\n", t->state.seq_len); break; }
        logits = forward(t, next, n_hist - 1);
    }
    return n_hist;
}

static void report_hook(const SaeHook* h) {
    if (!h) return;
    fprintf(stderr, "[sae] %lld positions seen, %lld with a selected latent active, %lld edited%s\n",
            (long long)h->n_tokens, (long long)h->n_active, (long long)h->n_changed,
            h->gate ? (h->gate_on ? "; gate open" : "; gate closed") : "");
}

// Model, tokenizer, SAE (self-tested) and the intervention hook of -N/--mode (installed).
typedef struct {
    Transformer t;
    Tokenizer tok;
    Sae s;
    SaeHook h;
    Selection sel;
    int has_hook;
} Session;

static void open_session(Session* ss, const Opts* o, int ctx) {
    memset(ss, 0, sizeof(*ss));
    load_model(&ss->t, &ss->tok, o, ctx);
    load_sae_for(&ss->s, o->sae, &ss->t);
    print_sae(&ss->s, o->sae);
    if (o->selftest) sae_selftest(&ss->t, &ss->tok, &ss->s, NULL, 256);
    if (o->latents) {
        setup_intervention(&ss->h, &ss->s, o, &ss->sel);
        ss->has_hook = 1;
    } else {
        fprintf(stderr, "note: no --latents: the model runs without an intervention\n");
    }
    fflush(stdout);
}

static void close_session(Session* ss) {
    if (ss->has_hook) { sae_hook_free(&ss->h); free(ss->sel.sel); }
    sae_free(&ss->s);
    free_transformer(&ss->t);
    free_tokenizer(&ss->tok);
}

static void install(Session* ss) {
    ss->t.hook = ss->has_hook ? sae_hook_fn : NULL;
    ss->t.hook_ctx = ss->has_hook ? &ss->h : NULL;
}

static int generate_main(Opts* o) {
    if (!o->prompt) die("generate needs a prompt (-i TEXT)");
    if (!utf8_valid(o->prompt, strlen(o->prompt))) die("prompt is not valid UTF-8");
    Session ss;
    open_session(&ss, o, o->ctx);
    install(&ss);
    size_t len = strlen(o->prompt);
    int ctx = ss.t.state.seq_len;
    int* hist = xmalloc((size_t)(ctx > (int)len + 2 ? ctx : (int)len + 2) * sizeof(int));
    int n = 0;
    hist[n++] = ss.tok.bos_id;
    n += encode(&ss.tok, o->prompt, len, 1, hist + n, (int)len + 1);
    if (n > ctx) die("prompt of %d tokens does not fit the context of %d (raise --ctx)", n, ctx);
    Sampler sm;
    build_sampler(&sm, ss.t.config.vocab_size, o->temperature, o->topp, (uint64_t)o->seed);
    for (int i = 1; i < n; i++) print_token(&ss.tok, hist[i]);
    if (ss.has_hook) sae_hook_reset_sequence(&ss.h);
    long t0 = time_in_ms();
    float* logits = prefill(&ss.t, ss.has_hook ? &ss.h : NULL, hist, n, 0);
    int n_gen;
    decode_tokens(&ss.t, &ss.tok, &sm, logits, hist, n, o->steps, 1, NULL, 0, &n_gen);
    long ms = time_in_ms() - t0;
    printf("\n");
    fprintf(stderr, "%d prompt + %d generated tokens, %.2f tok/s\n", n, n_gen, ms > 0 ? (n + n_gen) * 1000.0 / ms : 0.0);
    report_hook(ss.has_hook ? &ss.h : NULL);
    free_sampler(&sm);
    free(hist);
    close_session(&ss);
    return 0;
}

static int chat_main(Opts* o) {
    Session ss;
    open_session(&ss, o, o->ctx);
    install(&ss);
    int ctx = ss.t.state.seq_len;
    int* hist = xmalloc((size_t)ctx * sizeof(int));
    int* turn = NULL;
    int n_hist = 0, first = 1;
    Sampler sm;
    build_sampler(&sm, ss.t.config.vocab_size, o->temperature, o->topp, (uint64_t)o->seed);
    if (ss.has_hook) sae_hook_reset_sequence(&ss.h);
    char* line = NULL;   // one user turn per line of stdin, of any length
    size_t line_cap = 0;
    for (;;) {
        const char* user = o->prompt;
        if (!user) {
            printf("User: ");
            fflush(stdout);
            if (getline(&line, &line_cap, stdin) < 0) break;
            line[strcspn(line, "\n")] = '\0';
            if (!line[0]) continue;
            user = line;
        }
        if (!utf8_valid(user, strlen(user))) die("user message is not valid UTF-8");
        ChatMessage msgs[2];
        int m = 0;
        if (first && o->system) { msgs[m].role = "system"; msgs[m].content = o->system; m++; }
        msgs[m].role = "user"; msgs[m].content = user; m++;
        // room for every token (each is at least one byte): a message too
        // long for the context is reported below, never cut
        size_t cap = strlen(user) + (first && o->system ? strlen(o->system) : 0) + 64;
        if (cap > INT_MAX / 2) die("user message too long");
        free(turn);
        turn = xmalloc(cap * sizeof(int));
        int n_turn = chat_encode(&ss.tok, msgs, m, 1, first, turn, (int)cap);
        if (n_hist + n_turn >= ctx) die("conversation of %d tokens does not fit the context of %d (raise --ctx)", n_hist + n_turn, ctx);
        memcpy(hist + n_hist, turn, (size_t)n_turn * sizeof(int));
        if (!o->prompt) { printf("Assistant: "); fflush(stdout); }
        float* logits = prefill(&ss.t, ss.has_hook ? &ss.h : NULL, turn, n_turn, n_hist);
        n_hist += n_turn;
        int n_gen;
        n_hist = decode_tokens(&ss.t, &ss.tok, &sm, logits, hist, n_hist, o->steps, 1, NULL, 0, &n_gen);
        printf("\n");
        first = 0;
        if (o->prompt) break;
        // close the assistant turn in the cache (the sampled eot was never fed)
        int last = hist[n_hist - 1];
        if (!is_stop_token(&ss.t.config, &ss.tok, last) && ss.tok.n_eot > 0) hist[n_hist++] = ss.tok.eot_ids[0];
        if (n_hist >= ctx) { fprintf(stderr, "[context of %d positions full]\n", ctx); break; }
        forward(&ss.t, hist[n_hist - 1], n_hist - 1);
    }
    report_hook(ss.has_hook ? &ss.h : NULL);
    free_sampler(&sm);
    free(hist); free(turn); free(line);
    close_session(&ss);
    return 0;
}

// eval: the shared harness (eval.c) with the intervention applied. The SAE
// method plugs in its options (--sae, --latents, -N, --mode, -c, -m,
// --gate, --gate-alpha, --no-selftest), its hook for raw text and its own
// chat answerer (the gate may re-run the prompt once it opens).
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
    static const char* own[] = {"--sae", "--latents", "-N", "--mode", "-c", "-m", "--gate", "--gate-alpha",
                                "--no-selftest", NULL};
    SaeMethod* sm = m->user;
    for (int k = 0; own[k]; k++) {
        if (strcmp(argv[i], own[k])) continue;
        if (i + 1 >= argc) die("%s needs a value (see --help)", argv[i]);
        parse_flag(&sm->o, argv[i], argv[i + 1]);
        return 2;
    }
    return 0;
}

static void sae_method_setup(EvalMethod* m, Transformer* t, Tokenizer* tok, int max_new) {
    SaeMethod* sm = m->user;
    if (!sm->o.latents) die("sae eval needs --latents CSV (from sae score) or a list such as 12,345");
    sm->t = t; sm->tok = tok; sm->max_new = max_new;
    load_sae_for(&sm->s, sm->o.sae, t);
    print_sae(&sm->s, sm->o.sae);
    if (sm->o.selftest) sae_selftest(t, tok, &sm->s, NULL, 256);
    setup_intervention(&sm->h, &sm->s, &sm->o, &sm->sel);
    fflush(stdout);
    m->hook = sae_hook_fn;
    m->hook_ctx = &sm->h;
    m->answer_ctx = sm;
}

static void sae_method_new_sequence(EvalMethod* m) { sae_hook_reset_sequence(&((SaeMethod*)m->user)->h); }

static int sae_method_answer(void* ctx, const ChatMessage* msgs, int n_msgs, char* out, size_t cap) {
    SaeMethod* sm = ctx;
    int* ids;
    int n = eval_chat_tokens(sm->tok, NULL, msgs, n_msgs, &ids);
    int seq_len = sm->t->state.seq_len;
    if (n + sm->max_new > seq_len) die("a prompt of %d tokens + %d new does not fit the context of %d (raise --ctx)", n, sm->max_new, seq_len);
    int* hist = xmalloc((size_t)seq_len * sizeof(int));
    memcpy(hist, ids, (size_t)n * sizeof(int));
    float* logits = prefill(sm->t, &sm->h, hist, n, 0);
    Sampler greedy;
    build_sampler(&greedy, sm->t->config.vocab_size, 0.0f, 1.0f, 1);
    int n_gen;
    decode_tokens(sm->t, sm->tok, &greedy, logits, hist, n, sm->max_new, 0, out, cap, &n_gen);
    free_sampler(&greedy);
    free(hist); free(ids);
    return n;
}

static void sae_method_teardown(EvalMethod* m) {
    SaeMethod* sm = m->user;
    report_hook(&sm->h);
    sae_hook_free(&sm->h);
    free(sm->sel.sel);
    sae_free(&sm->s);
}

static int eval_harness_main(int argc, char** argv) {
    SaeMethod sm;
    memset(&sm, 0, sizeof(sm));
    opts_init(&sm.o);
    sm.o.cmd = "eval";
    EvalMethod m = {
        .prog = "sae", .kind = "sae",
        .usage = "  --sae FILE           the SAE (required)\n"
                 "  --latents CSV        from sae score, or a list such as 12,345 (required)\n"
                 "  -N N                 latents used (default 20)\n"
                 "  --mode M             clamp|zero|scale (default clamp)\n"
                 "  -c C                 clamp value (default 50; use --ctx for the context here)\n"
                 "  -m M                 scale factor (default 1)\n"
                 "  --gate 1             per-sequence gate (--gate-alpha X, default from the CSV)\n"
                 "  --no-selftest 1      skip the FVU self-test at load\n",
        .parse = sae_method_parse, .setup = sae_method_setup, .teardown = sae_method_teardown,
        .new_sequence = sae_method_new_sequence, .answer = sae_method_answer, .user = &sm,
    };
    return eval_main(argc, argv, &m);
}

static int info_main(Opts* o) {
    if (!o->model) die("info needs an SAE file: sae info SAE.bin");
    Sae s;
    char err[512];
    if (sae_load(&s, o->model, err, sizeof(err)) != 0) die("%s", err);
    print_sae(&s, o->model);
    double norm_dec = 0.0, norm_enc = 0.0;
    for (int i = 0; i < s.n; i++) {
        norm_dec += sqrt(dot(s.W_dec + (size_t)i * s.d, s.W_dec + (size_t)i * s.d, s.d));
        norm_enc += sqrt(dot(s.W_enc + (size_t)i * s.d, s.W_enc + (size_t)i * s.d, s.d));
    }
    printf("sub_bdec %d, act_scale %g, mean |W_dec row| %.4f, mean |W_enc row| %.4f, |b_dec| %.4f, file %zu bytes\n",
           s.sub_bdec, s.act_scale, norm_dec / s.n, norm_enc / s.n, sqrt(dot(s.b_dec, s.b_dec, s.d)), s.memory_size);
    sae_free(&s);
    return 0;
}

int main(int argc, char** argv) {
    if (argc >= 2 && !strcmp(argv[1], "eval")) return eval_harness_main(argc - 1, argv + 1);
    Opts o;
    parse_options(&o, argc, argv);
    if (!strcmp(o.cmd, "train")) return train_main(&o);
    if (!strcmp(o.cmd, "planted")) return planted_main(&o);
    if (!strcmp(o.cmd, "measure")) return measure_main(&o);
    if (!strcmp(o.cmd, "score")) return score_main(&o);
    if (!strcmp(o.cmd, "generate")) return generate_main(&o);
    if (!strcmp(o.cmd, "chat")) return chat_main(&o);
    if (!strcmp(o.cmd, "info")) return info_main(&o);
    die("unknown command '%s' (train, measure, score, generate, chat, eval, planted, info; see --help)", o.cmd);
}
#endif // SAE_LIBRARY
