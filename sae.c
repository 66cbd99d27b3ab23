// sae.c -- sparse autoencoders on the residual stream of Llama-3, in plain C:
// the method. The SAE file, encoding and decoding, TopK SAE training (Gao
// et al. 2024: forward, backward, Adam step), activation capture, latent
// scoring, and the clamping hook that edits the residual stream during
// generation. The program (subcommands, options, drivers) is sae_cli.c.
//
// Everything reads the model through the engine (run.h): activations come
// from the engine's per-layer residual hook, and the interventions are that
// same hook editing the residual stream in place. No forward pass is copied.
// The SAE maths and the file format are documented in sae.h.
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <setjmp.h>
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "run.h"
#include "sae.h"

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

float sae_norm(const float* x, int n) { return sqrtf(dot(x, x, n)); }

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
        float norm = sae_norm(w, d);
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

// One gradient pass (sae_train_grad) over a batch, in blocks of R rows with
// at most cap active latents each (k + k_aux for TopK, n for ReLU).
typedef struct {
    const SaeTrainer* tr;
    const float* x;       // (B, d) the batch
    double D;             // sum_b |x_b - mean(x)|^2, the FVU denominator
    unsigned char* dead;  // (n,) latents without firing for dead_tokens tokens
    int k_aux;            // AuxK latents per row this step (0 = off)
    float aux_scale;      // min(n_dead / k_aux, 1)
    float l1_unit;        // d(L1 term)/d f_bi (ReLU)
    int R, cap;
    float* pre;           // (R, n) pre-activations of a block of rows
    int* e_idx;           // (R, cap) each row's entries: active latents, then the AuxK ones
    float* e_val;         // (R, cap) f (or the AuxK code)
    float* e_dpre;        // (R, cap) dLoss/dpre
    int* n_main;          // (R,) active entries per row
    int* n_all;           // (R,) all entries per row
    float* G;             // (R, d) dLoss/dx^ per row
    float* GA;            // (R, d) dLoss/d(AuxK reconstruction) per row
    int* lat_count;       // (n + 1,) entries per latent, prefix-summed
    int* lat_entry;       // (R * cap,) entries grouped by latent
    unsigned char* fired; // (n,) latents active in this batch
    double* db_thread;    // (threads, d) the b_dec gradient of each thread
} GradPass;

// Per-thread sums of the loss terms
typedef struct { double sse, aux_sse, l1_sum, l0_sum; } GradSums;

// Centres the batch on b_dec (xc = x - b_dec) and returns its variance sum D.
static double center_batch(const Sae* s, const float* x, int B, float* xc) {
    int d = s->d;
    double* mean = xcalloc(d, sizeof(double));
    for (int b = 0; b < B; b++) for (int j = 0; j < d; j++) mean[j] += x[(size_t)b * d + j];
    for (int j = 0; j < d; j++) mean[j] /= B;
    double D = 0.0;
    for (int b = 0; b < B; b++)
        for (int j = 0; j < d; j++) { double e = x[(size_t)b * d + j] - mean[j]; D += e * e; }
    if (D <= 0.0) D = 1e-12;
    free(mean);
    for (int b = 0; b < B; b++) for (int j = 0; j < d; j++) xc[(size_t)b * d + j] = x[(size_t)b * d + j] - s->b_dec[j];
    return D;
}

// The dead latents and this step's AuxK setting, the L1 unit, the buffers.
static void grad_pass_init(GradPass* g, const SaeTrainer* tr, const float* x, int B, double D) {
    const Sae* s = tr->sae;
    const SaeTrainConfig* c = &tr->cfg;
    int d = s->d, n = s->n, topk = s->arch == SAE_TOPK;
    memset(g, 0, sizeof(*g));
    g->tr = tr; g->x = x; g->D = D;
    g->dead = xcalloc(n, 1);
    int n_dead = 0;
    for (int i = 0; i < n; i++) if (tr->since_fired[i] >= c->dead_tokens) { g->dead[i] = 1; n_dead++; }
    if (topk && c->auxk_alpha > 0.0f && n_dead > 0) {
        g->k_aux = c->k_aux < n_dead ? c->k_aux : n_dead;
        g->aux_scale = fminf((float)n_dead / c->k_aux, 1.0f);
    }
    g->l1_unit = topk ? 0.0f : c->l1 / (float)(B * sqrt(D / B));
    g->cap = topk ? s->k + g->k_aux : n;
    g->R = block_rows(n, g->cap);
    if (g->R > B) g->R = B;
    size_t R = g->R, cap = g->cap;
    g->pre = xmalloc(R * n * sizeof(float));
    g->e_idx = xmalloc(R * cap * sizeof(int));
    g->e_val = xmalloc(R * cap * sizeof(float));
    g->e_dpre = xmalloc(R * cap * sizeof(float));
    g->n_main = xmalloc(R * sizeof(int));
    g->n_all = xmalloc(R * sizeof(int));
    g->G = xmalloc(R * d * sizeof(float));
    g->GA = xmalloc(R * d * sizeof(float));
    g->lat_count = xmalloc((size_t)(n + 1) * sizeof(int));
    g->lat_entry = xmalloc(R * cap * sizeof(int));
    g->fired = xcalloc(n, 1);
    g->db_thread = xcalloc((size_t)engine_threads() * d, sizeof(double));
}

static void grad_pass_free(GradPass* g) {
    free(g->pre); free(g->e_idx); free(g->e_val); free(g->e_dpre); free(g->n_main); free(g->n_all); free(g->G);
    free(g->GA); free(g->lat_count); free(g->lat_entry); free(g->fired); free(g->db_thread); free(g->dead);
}

// Row r of the block at r0: forward (codes, reconstruction, AuxK) and the
// backward to the codes and the input. scratch (n,), sel (cap,), xh and
// dxc (d,) are the thread's; db is its b_dec gradient.
static void grad_row(GradPass* g, int r0, int r, float* scratch, int* sel, float* xh, float* dxc, double* db,
                     GradSums* sums) {
    const Sae* s = g->tr->sae;
    const SaeTrainConfig* c = &g->tr->cfg;
    int d = s->d, n = s->n, cap = g->cap;
    double D = g->D;
    const float* xb = g->x + (size_t)(r0 + r) * d;
    float* row = g->pre + (size_t)r * n;
    for (int i = 0; i < n; i++) row[i] += s->b_enc[i];
    int* idx = g->e_idx + (size_t)r * cap;
    float* val = g->e_val + (size_t)r * cap;
    float* dpre = g->e_dpre + (size_t)r * cap;
    // the active latents: top k (TopK) or every positive one (ReLU)
    int nm = 0;
    if (s->arch == SAE_TOPK) {
        int got = top_k_indices(row, n, NULL, s->k, scratch, sel);
        for (int j = 0; j < got; j++) if (row[sel[j]] > 0.0f) { idx[nm] = sel[j]; val[nm] = row[sel[j]]; nm++; }
    } else {
        for (int i = 0; i < n; i++) if (row[i] > 0.0f) { idx[nm] = i; val[nm] = row[i]; nm++; }
    }
    // reconstruction and its error
    float* gr = g->G + (size_t)r * d;
    memcpy(xh, s->b_dec, (size_t)d * sizeof(float));
    for (int j = 0; j < nm; j++) axpy(xh, val[j], s->W_dec + (size_t)idx[j] * d, d);
    for (int j = 0; j < d; j++) {
        float e = xh[j] - xb[j];
        sums->sse += (double)e * e;
        gr[j] = (float)(2.0 * e / D);
    }
    sums->l0_sum += nm;
    for (int j = 0; j < nm; j++) {
        dpre[j] = dot(gr, s->W_dec + (size_t)idx[j] * d, d) + g->l1_unit;
        sums->l1_sum += val[j];
    }
    // AuxK: the top k_aux dead latents model the residual
    int na = 0;
    if (g->k_aux > 0) {
        int got = top_k_indices(row, n, g->dead, g->k_aux, scratch, sel);
        for (int j = 0; j < got; j++)
            if (row[sel[j]] > 0.0f) { idx[nm + na] = sel[j]; val[nm + na] = row[sel[j]]; na++; }
        float* ga = g->GA + (size_t)r * d;
        // a - r = a - (x - x^) = a + e, with e = x^ - x still in gr * D / 2
        for (int j = 0; j < d; j++) ga[j] = (float)(gr[j] * D / 2.0);
        for (int j = 0; j < na; j++) axpy(ga, val[nm + j], s->W_dec + (size_t)idx[nm + j] * d, d);
        for (int j = 0; j < d; j++) {
            sums->aux_sse += (double)ga[j] * ga[j];
            ga[j] = (float)(2.0 * c->auxk_alpha * g->aux_scale * ga[j] / D);
        }
        for (int j = 0; j < na; j++) dpre[nm + j] = dot(ga, s->W_dec + (size_t)idx[nm + j] * d, d);
    }
    g->n_main[r] = nm;
    g->n_all[r] = nm + na;
    // back to the input: x enters as x - b_dec, and x^ holds + b_dec
    memset(dxc, 0, (size_t)d * sizeof(float));
    for (int j = 0; j < nm + na; j++) axpy(dxc, dpre[j], s->W_enc + (size_t)idx[j] * d, d);
    for (int j = 0; j < d; j++) db[j] += gr[j] - dxc[j];
}

// The weight gradients of m rows at r0: entries grouped by latent (counting
// sort), then one thread per latent row, so no two threads write one row.
static void grad_weights(GradPass* g, int r0, int m) {
    const Sae* s = g->tr->sae;
    int d = s->d, n = s->n, cap = g->cap;
    SaeLayout L = sae_layout(d, n, s->arch);
    float* grad = g->tr->grad;
    float* gW_enc = grad + L.W_enc / sizeof(float);
    float* gb_enc = grad + L.b_enc / sizeof(float);
    float* gW_dec = grad + L.W_dec / sizeof(float);
    int* lat_count = g->lat_count;
    memset(lat_count, 0, (size_t)(n + 1) * sizeof(int));
    for (int r = 0; r < m; r++) for (int j = 0; j < g->n_all[r]; j++) lat_count[g->e_idx[(size_t)r * cap + j] + 1]++;
    for (int i = 0; i < n; i++) lat_count[i + 1] += lat_count[i];
    int* fill = xmalloc((size_t)n * sizeof(int));
    memcpy(fill, lat_count, (size_t)n * sizeof(int));
    for (int r = 0; r < m; r++)
        for (int j = 0; j < g->n_all[r]; j++) g->lat_entry[fill[g->e_idx[(size_t)r * cap + j]]++] = r * cap + j;
    free(fill);
    const float* xc = g->tr->xc;
    #pragma omp parallel for schedule(dynamic, 16) if ((size_t)m * cap * d > (1u << 22))
    for (int i = 0; i < n; i++) {
        float* gwd = gW_dec + (size_t)i * d;
        float* gwe = gW_enc + (size_t)i * d;
        for (int q = lat_count[i]; q < lat_count[i + 1]; q++) {
            int e = g->lat_entry[q], r = e / cap, j = e % cap;
            int is_main = j < g->n_main[r];
            axpy(gwd, g->e_val[e], (is_main ? g->G : g->GA) + (size_t)r * d, d);
            axpy(gwe, g->e_dpre[e], xc + (size_t)(r0 + r) * d, d);
            gb_enc[i] += g->e_dpre[e];
            if (is_main) g->fired[i] = 1;
        }
    }
}

SaeTrainStats sae_train_grad(SaeTrainer* tr, const float* x, int B) {
    Sae* s = tr->sae;
    const SaeTrainConfig* c = &tr->cfg;
    int d = s->d, n = s->n, topk = s->arch == SAE_TOPK;
    if (B > tr->cap_rows) die("sae_train_step: batch %d above the trainer's %d", B, tr->cap_rows);
    memset(tr->grad, 0, s->memory_size);
    double D = center_batch(s, x, B, tr->xc);
    GradPass g;
    grad_pass_init(&g, tr, x, B, D);
    double sse = 0.0, aux_sse = 0.0, l1_sum = 0.0, l0_sum = 0.0;
    for (int r0 = 0; r0 < B; r0 += g.R) {
        int m = B - r0 < g.R ? B - r0 : g.R;
        gemm(0, 1, m, n, d, 1.0f, tr->xc + (size_t)r0 * d, d, s->W_enc, d, 0.0f, g.pre, n);
        #pragma omp parallel reduction(+:sse, aux_sse, l1_sum, l0_sum) if ((size_t)m * n * d > (1u << 24))
        {
            float* scratch = xmalloc((size_t)n * sizeof(float));
            int* sel = xmalloc((size_t)(g.cap > 1 ? g.cap : 1) * sizeof(int));
            float* xh = xmalloc((size_t)d * sizeof(float));
            float* dxc = xmalloc((size_t)d * sizeof(float));
            double* db = g.db_thread + (size_t)engine_thread_id() * d;
            GradSums sums = {0.0, 0.0, 0.0, 0.0};
            #pragma omp for schedule(static)
            for (int r = 0; r < m; r++) grad_row(&g, r0, r, scratch, sel, xh, dxc, db, &sums);
            sse += sums.sse; aux_sse += sums.aux_sse; l1_sum += sums.l1_sum; l0_sum += sums.l0_sum;
            free(scratch); free(sel); free(xh); free(dxc);
        }
        grad_weights(&g, r0, m);
    }
    float* gb_dec = tr->grad + sae_layout(d, n, s->arch).b_dec / sizeof(float);
    for (int t = 0; t < engine_threads(); t++) for (int j = 0; j < d; j++) gb_dec[j] += (float)g.db_thread[(size_t)t * d + j];
    memcpy(tr->fired, g.fired, (size_t)n);
    tr->batch = B;

    SaeTrainStats st;
    memset(&st, 0, sizeof(st));
    st.fvu = sse / D;
    st.auxk = g.k_aux > 0 ? g.aux_scale * aux_sse / D : 0.0;
    st.l1 = topk ? 0.0 : l1_sum / (B * sqrt(D / B));
    st.loss = st.fvu + (topk ? c->auxk_alpha * st.auxk : c->l1 * st.l1);
    st.l0 = l0_sum / B;
    grad_pass_free(&g);
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
        float norm = sae_norm(w, d);
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
        float norm = sae_norm(w, d);
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
            float cs = dot(w, v, d) / (sae_norm(v, d) + 1e-12f);
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

// Feeds a prompt through the model that has h's hook installed. With the
// per-sequence gate, a gate that opens inside the prompt means the prompt
// runs again with the intervention from its first position (the hook's
// counters rewound first): a long prompt's first chunks are edited too.
float* sae_prefill(void* ctx, Transformer* t, const int* ids, int n, int pos0) {
    SaeHook* h = ctx;
    if (!h->gate || h->gate_on) return forward_batch(t, ids, n, pos0, NULL);
    SaeHook before = *h;
    float* logits = forward_batch(t, ids, n, pos0, NULL);
    if (h->gate_on) {
        h->seq_tokens = before.seq_tokens; h->seq_hits = before.seq_hits;
        h->n_tokens = before.n_tokens; h->n_active = before.n_active; h->n_changed = before.n_changed;
        logits = forward_batch(t, ids, n, pos0, NULL);
    }
    return logits;
}

// ----------------------------------------------------------------------------
// Activation capture: the residual stream after engine layers lo..hi, by the
// engine's hook. The forward pass stops right after layer hi (the hook
// longjmps out of it): the layers above and the classifier never run. The
// sequence is fed in chunks of batch_cap positions, each its own
// forward_batch call, so the KV cache of layers <= hi is complete for the next.

typedef struct {
    int lo, hi, n;     // layers captured, sequence length
    float* out;        // (hi-lo+1, n, dim)
    jmp_buf stop;
} CaptureHook;

static void capture_hook_fn(void* ctx, int layer, int pos0, int n_pos, float* x, int dim) {
    CaptureHook* c = ctx;
    if (layer < c->lo || layer > c->hi) return;
    memcpy(c->out + ((size_t)(layer - c->lo) * c->n + pos0) * dim, x, (size_t)n_pos * dim * sizeof(float));
    if (layer == c->hi) longjmp(c->stop, 1);
}

void sae_capture(Transformer* t, const int* ids, int n, int lo, int hi, float* out) {
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

// ----------------------------------------------------------------------------
// Latent scoring: which latents fire on the forget set and not on the retain set.

void latent_stats_init(LatentStats* ls, int n) {
    memset(ls, 0, sizeof(*ls));
    ls->n = n;
    for (int set = 0; set < 2; set++) {
        ls->cnt[set] = xcalloc(n, sizeof(double));
        ls->sum[set] = xcalloc(n, sizeof(double));
        ls->sq[set] = xcalloc(n, sizeof(double));
    }
    ls->cnt_kw = xcalloc(n, sizeof(double));
    ls->sum_kw = xcalloc(n, sizeof(double));
}

void latent_stats_free(LatentStats* ls) {
    for (int set = 0; set < 2; set++) { free(ls->cnt[set]); free(ls->sum[set]); free(ls->sq[set]); }
    free(ls->cnt_kw); free(ls->sum_kw);
    memset(ls, 0, sizeof(*ls));
}

void latent_stats_add(LatentStats* ls, int set, const float* f, int m, const unsigned char* kw) {
    int n = ls->n;
    ls->tokens[set] += m;
    for (int q = 0; kw && q < m; q++) ls->tokens_kw += kw[q];
    #pragma omp parallel for schedule(static) if ((size_t)m * n > (1u << 18))
    for (int lat = 0; lat < n; lat++) {
        for (int q = 0; q < m; q++) {
            float v = f[(size_t)q * n + lat];
            if (v == 0.0f) continue;
            ls->cnt[set][lat] += 1.0; ls->sum[set][lat] += v; ls->sq[set][lat] += (double)v * v;
            if (kw && kw[q]) { ls->cnt_kw[lat] += 1.0; ls->sum_kw[lat] += v; }
        }
    }
}

void latent_stats_denoms(const LatentStats* ls, double denom[3]) {
    denom[0] = ls->tokens[0] > 0 ? (double)ls->tokens[0] : 1.0;
    denom[1] = ls->tokens[1] > 0 ? (double)ls->tokens[1] : 1.0;
    denom[2] = ls->tokens_kw > 0 ? (double)ls->tokens_kw : 1.0;
}

static const char* RULE_NAMES[SAE_N_RULES] = {"freq", "diff", "ratio", "sq_ratio", "keyword"};

int sae_rule_from_name(const char* name) {
    for (int q = 0; q < SAE_N_RULES; q++) if (!strcmp(name, RULE_NAMES[q])) return q;
    return -1;
}

static int cmp_double(const void* a, const void* b) {
    double x = *(const double*)a, y = *(const double*)b;
    return (x > y) - (x < y);
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

// sq_ratio's cut (Dynamic SAE Guardrails): the 90th percentile of the
// forget/retain squared-activation ratio over the latents that fire on forget.
static double sq_ratio_cut(const LatentStats* ls, double tf, double trt) {
    int n = ls->n, c = 0;
    double cut = 0.0;
    double* ratios = xmalloc((size_t)n * sizeof(double));
    for (int i = 0; i < n; i++) if (ls->cnt[0][i] > 0) ratios[c++] = (ls->sq[0][i] / tf) / (ls->sq[1][i] / trt + 1e-12);
    if (c > 0) { qsort(ratios, c, sizeof(double), cmp_double); cut = ratios[(int)(0.9 * (c - 1))]; }
    free(ratios);
    return cut;
}

int latent_scores(const LatentStats* ls, int rule, float tau, double* score, unsigned char* eligible, int* order) {
    int n = ls->n;
    double dn[3];
    latent_stats_denoms(ls, dn);
    double tf = dn[0], trt = dn[1], tk = dn[2];
    double ratio_cut = rule == SAE_RULE_SQ_RATIO ? sq_ratio_cut(ls, tf, trt) : 0.0;
    const double* const* cnt = (const double* const*)ls->cnt;
    const double* const* sum = (const double* const*)ls->sum;
    const double* const* sq = (const double* const*)ls->sq;
    for (int i = 0; i < n; i++) {
        double fr = cnt[1][i] / trt;
        switch (rule) {
        case SAE_RULE_FREQ: score[i] = cnt[0][i] / tf; break;
        case SAE_RULE_DIFF: score[i] = sum[0][i] / tf - sum[1][i] / trt; break;
        case SAE_RULE_RATIO: score[i] = log((cnt[0][i] + 1.0) / (tf + 1.0)) - log((cnt[1][i] + 1.0) / (trt + 1.0)); break;
        case SAE_RULE_SQ_RATIO: score[i] = (sq[0][i] / tf) / (sq[1][i] / trt + 1e-12) >= ratio_cut ? sq[0][i] / tf : 0.0; break;
        default: score[i] = ls->cnt_kw[i] / tk - fr; break;
        }
        eligible[i] = cnt[0][i] > 0 && fr <= tau && score[i] > 0.0;
    }
    RankedLatent* ranked = xmalloc((size_t)n * sizeof(RankedLatent));
    for (int i = 0; i < n; i++) ranked[i] = (RankedLatent){i, eligible[i], score[i]};
    qsort(ranked, n, sizeof(RankedLatent), cmp_ranked);
    for (int i = 0; i < n; i++) order[i] = ranked[i].latent;
    free(ranked);
    int n_eligible = 0;
    for (int i = 0; i < n; i++) n_eligible += eligible[i];
    return n_eligible;
}
