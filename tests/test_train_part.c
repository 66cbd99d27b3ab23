// ----------------------------------------------------------------------------
// train_lora: gradient checks, forward == engine, adapters, merge, training
//
// (tests/test_train_part.c: pasted into test_all.c; uses its check().)
//
// Gradient checks compare train_lora.c's hand-written float backward with
// central finite differences of an independent double-precision forward
// written below from the Hugging Face semantics (tt_ref_*), on tiny models
// built in memory, for every parameter entry of every group. For a group
// with analytic gradient g and numeric gradient n (step 1e-5, in double),
//   err = max_i |g_i - n_i| / max_i |n_i|
// must be <= 1e-4 (observed: about 1e-6, float rounding of the backward).
#include "train_lora.h"

#define TT_GRAD_TOL 1e-4

static Config tt_tiny_config(int tied, int scaled) {
    Config c;
    memset(&c, 0, sizeof(c));
    c.dim = 16; c.hidden_dim = 32; c.n_layers = 2; c.n_heads = 4; c.n_kv_heads = 2; c.head_dim = 8;
    c.vocab_size = 64; c.max_seq_len = 64; c.rope_theta = 10000.0f; c.norm_eps = 1e-5f;
    c.tied_embeddings = tied; c.weight_type = WEIGHT_FP32; c.bos_id = 1; c.n_eos = 1; c.eos_ids[0] = 2;
    if (scaled) {
        // head_dim 8 gives wavelengths 6.3, 63, 628, 6283: with these
        // settings each of the three llama3 branches is taken once or more
        c.rope_scaling = ROPE_LLAMA3; c.rope_factor = 8.0f; c.rope_low_freq_factor = 1.0f;
        c.rope_high_freq_factor = 4.0f; c.rope_original_max_pos = 64;
    }
    return c;
}

// --- the double-precision reference -----------------------------------------

typedef struct {
    Config c;
    double* w;        // the full parameter block (file order, as train_tensor_offset)
    double* lora;     // the adapter payload (lora_part.c order), or NULL
    int rank, mask, lb, le;
    double scale;
    float dropout;
    uint64_t drop_seed;
} TTRef;

static const double* tt_tensor(const TTRef* r, int tn, int layer, size_t per_layer) {
    return r->w + train_tensor_offset(&r->c, tn, NULL) + (size_t)layer * per_layer;
}

static size_t tt_lora_offset(const Config* c, int rank, int mask, int lb, int layer, int target) {
    size_t off = 0;
    for (int l = lb; l <= layer; l++)
        for (int t = 0; t < LORA_N_TARGETS; t++) {
            if (!(mask & (1 << t))) continue;
            if (l == layer && t == target) return off;
            int in, out;
            lora_dims(c, t, &in, &out);
            off += (size_t)rank * (in + out);
        }
    return off;
}

// y (N, out) = x W^T (+ scale B A drop(x) for an adapted projection)
static void tt_linear(double* y, const double* x, int N, const double* W, int in, int out, const TTRef* r,
                      int use_lora, int layer, int target) {
    for (int i = 0; i < N; i++)
        for (int o = 0; o < out; o++) {
            double s = 0.0;
            for (int k = 0; k < in; k++) s += W[(size_t)o * in + k] * x[(size_t)i * in + k];
            y[(size_t)i * out + o] = s;
        }
    if (!use_lora || !r->lora || !(r->mask & (1 << target)) || layer < r->lb || layer >= r->le) return;
    const double* A = r->lora + tt_lora_offset(&r->c, r->rank, r->mask, r->lb, layer, target);
    const double* B = A + (size_t)r->rank * in;
    uint64_t seed = train_dropout_seed(r->drop_seed, layer, target);
    double* xd = malloc(in * sizeof(double));
    double* u = malloc(r->rank * sizeof(double));
    for (int i = 0; i < N; i++) {
        for (int k = 0; k < in; k++) {
            double v = x[(size_t)i * in + k];
            if (r->dropout > 0) v = lora_dropout_keep(seed, (size_t)i * in + k, r->dropout) ? v / (1.0 - r->dropout) : 0.0;
            xd[k] = v;
        }
        for (int j = 0; j < r->rank; j++) {
            double s = 0.0;
            for (int k = 0; k < in; k++) s += A[(size_t)j * in + k] * xd[k];
            u[j] = s;
        }
        for (int o = 0; o < out; o++) {
            double s = 0.0;
            for (int j = 0; j < r->rank; j++) s += B[(size_t)o * r->rank + j] * u[j];
            y[(size_t)i * out + o] += r->scale * s;
        }
    }
    free(xd); free(u);
}

static void tt_rmsnorm(double* out, const double* x, const double* w, int N, int D, double eps) {
    for (int i = 0; i < N; i++) {
        double ss = 0.0;
        for (int j = 0; j < D; j++) ss += x[(size_t)i * D + j] * x[(size_t)i * D + j];
        double rs = 1.0 / sqrt(ss / D + eps);
        for (int j = 0; j < D; j++) out[(size_t)i * D + j] = w[j] * x[(size_t)i * D + j] * rs;
    }
}

// HF rotate_half RoPE on (N, n_heads * hd), row i at position i % T
static void tt_rope(double* x, int N, int T, int n_heads, int hd, const float* inv_freq) {
    int half = hd / 2;
    for (int i = 0; i < N; i++)
        for (int h = 0; h < n_heads; h++) {
            double* v = x + (size_t)i * n_heads * hd + (size_t)h * hd;
            for (int j = 0; j < half; j++) {
                double ang = (double)(i % T) * inv_freq[j], a = v[j], b = v[j + half];
                v[j] = a * cos(ang) - b * sin(ang);
                v[j + half] = b * cos(ang) + a * sin(ang);
            }
        }
}

// Logits (N, V) after all layers, or the residual stream (N, D) after n_layers < L.
static void tt_ref_forward(const TTRef* r, const int* inputs, int B, int T, int n_layers, int use_lora, double* out) {
    const Config* c = &r->c;
    int N = B * T, D = c->dim, H = c->hidden_dim, nh = c->n_heads, nkv = c->n_kv_heads, hd = c->head_dim;
    int qd = nh * hd, kvd = nkv * hd, V = c->vocab_size, L = c->n_layers;
    double* x = calloc((size_t)N * D, sizeof(double));
    double* xn = calloc((size_t)N * D, sizeof(double));
    double* q = calloc((size_t)N * qd, sizeof(double));
    double* k = calloc((size_t)N * kvd, sizeof(double));
    double* v = calloc((size_t)N * kvd, sizeof(double));
    double* ao = calloc((size_t)N * qd, sizeof(double));
    double* o = calloc((size_t)N * D, sizeof(double));
    double* g = calloc((size_t)N * H, sizeof(double));
    double* u = calloc((size_t)N * H, sizeof(double));
    double* p = calloc(T, sizeof(double));
    float inv_freq[512];
    rope_inv_freq(inv_freq, c);
    const double* emb = tt_tensor(r, 0, 0, 0);
    for (int i = 0; i < N; i++) memcpy(x + (size_t)i * D, emb + (size_t)inputs[i] * D, D * sizeof(double));
    for (int l = 0; l < n_layers; l++) {
        tt_rmsnorm(xn, x, tt_tensor(r, 1, l, D), N, D, c->norm_eps);
        tt_linear(q, xn, N, tt_tensor(r, 2, l, (size_t)qd * D), D, qd, r, use_lora, l, LORA_Q);
        tt_linear(k, xn, N, tt_tensor(r, 3, l, (size_t)kvd * D), D, kvd, r, use_lora, l, LORA_K);
        tt_linear(v, xn, N, tt_tensor(r, 4, l, (size_t)kvd * D), D, kvd, r, use_lora, l, LORA_V);
        tt_rope(q, N, T, nh, hd, inv_freq);
        tt_rope(k, N, T, nkv, hd, inv_freq);
        for (int b = 0; b < B; b++)
            for (int h = 0; h < nh; h++) {
                int g0 = h / (nh / nkv);
                for (int i = 0; i < T; i++) {
                    const double* qi = q + (size_t)(b * T + i) * qd + h * hd;
                    double mx = -1e300, sum = 0.0;
                    for (int j = 0; j <= i; j++) {
                        const double* kj = k + (size_t)(b * T + j) * kvd + g0 * hd;
                        double s = 0.0;
                        for (int d = 0; d < hd; d++) s += qi[d] * kj[d];
                        p[j] = s / sqrt((double)hd);
                        if (p[j] > mx) mx = p[j];
                    }
                    for (int j = 0; j <= i; j++) { p[j] = exp(p[j] - mx); sum += p[j]; }
                    double* oi = ao + (size_t)(b * T + i) * qd + h * hd;
                    for (int d = 0; d < hd; d++) {
                        double s = 0.0;
                        for (int j = 0; j <= i; j++) s += p[j] / sum * v[(size_t)(b * T + j) * kvd + g0 * hd + d];
                        oi[d] = s;
                    }
                }
            }
        tt_linear(o, ao, N, tt_tensor(r, 5, l, (size_t)D * qd), qd, D, r, use_lora, l, LORA_O);
        for (size_t i = 0; i < (size_t)N * D; i++) x[i] += o[i];
        tt_rmsnorm(xn, x, tt_tensor(r, 6, l, D), N, D, c->norm_eps);
        tt_linear(g, xn, N, tt_tensor(r, 7, l, (size_t)H * D), D, H, r, use_lora, l, LORA_GATE);
        tt_linear(u, xn, N, tt_tensor(r, 8, l, (size_t)H * D), D, H, r, use_lora, l, LORA_UP);
        for (size_t i = 0; i < (size_t)N * H; i++) g[i] = g[i] / (1.0 + exp(-g[i])) * u[i];
        tt_linear(o, g, N, tt_tensor(r, 9, l, (size_t)D * H), H, D, r, use_lora, l, LORA_DOWN);
        for (size_t i = 0; i < (size_t)N * D; i++) x[i] += o[i];
    }
    if (n_layers < L) {
        memcpy(out, x, (size_t)N * D * sizeof(double));
    } else {
        tt_rmsnorm(xn, x, tt_tensor(r, 10, 0, 0), N, D, c->norm_eps);
        const double* cls = c->tied_embeddings ? emb : tt_tensor(r, 11, 0, 0);
        tt_linear(out, xn, N, cls, D, V, r, 0, 0, 0);
    }
    free(x); free(xn); free(q); free(k); free(v); free(ao); free(o); free(g); free(u); free(p);
}

// log-softmax of each row, in place
static void tt_log_softmax(double* z, int N, int V) {
    for (int i = 0; i < N; i++) {
        double* r = z + (size_t)i * V, mx = r[0], s = 0.0;
        for (int j = 1; j < V; j++) if (r[j] > mx) mx = r[j];
        for (int j = 0; j < V; j++) s += exp(r[j] - mx);
        double l = mx + log(s);
        for (int j = 0; j < V; j++) r[j] -= l;
    }
}

static double tt_softplus(double x) { return log1p(exp(x)); }

// The objective, from its formula (research notes, section 5), in double.
static double tt_ref_objective(const TTRef* r, const ObjectiveConfig* oc, const Batch* fb, const Batch* rb) {
    const Config* c = &r->c;
    int V = c->vocab_size, D = c->dim, L = c->n_layers;
    double loss = 0.0;
    if (fb) {
        int N = fb->B * fb->T;
        double W = 0.0;
        for (int i = 0; i < N; i++) W += fb->weights[i];
        if (oc->objective == OBJ_RMU) {
            double* h = malloc((size_t)N * D * sizeof(double));
            tt_ref_forward(r, fb->inputs, fb->B, fb->T, oc->rmu_layer + 1, 1, h);
            double s = 0.0;
            for (int i = 0; i < N; i++)
                for (int j = 0; j < D; j++) {
                    double d = h[(size_t)i * D + j] - (double)oc->rmu_c * oc->rmu_u[j];
                    s += fb->weights[i] * d * d / D;
                }
            loss += oc->gamma * s / W;
            free(h);
        } else {
            double* z = malloc((size_t)N * V * sizeof(double));
            tt_ref_forward(r, fb->inputs, fb->B, fb->T, L, 1, z);
            tt_log_softmax(z, N, V);
            if (oc->objective == OBJ_WHP) {
                int Nt = fb->B * fb->Tt;
                double* t = malloc((size_t)Nt * V * sizeof(double));
                tt_ref_forward(r, fb->trans_inputs, fb->B, fb->Tt, L, 0, t);
                tt_log_softmax(t, Nt, V);
                double s = 0.0;
                for (int b = 0; b < fb->B; b++)
                    for (int i = 0; i < fb->T; i++) {
                        int lp = fb->label_pos[b * fb->T + i];
                        double w = fb->weights[b * fb->T + i];
                        if (lp < 0 || w == 0) continue;
                        const double* tr = t + (size_t)(b * fb->Tt + lp) * V;
                        const double* zr = z + (size_t)(b * fb->T + i) * V;
                        double kl = 0.0;
                        for (int j = 0; j < V; j++) kl += exp(tr[j]) * (tr[j] - zr[j]);
                        s += w * kl;
                    }
                loss += oc->gamma * s / W;
                free(t);
            } else if (oc->objective == OBJ_NPO || oc->objective == OBJ_SIMNPO) {
                double* zr = malloc((size_t)N * V * sizeof(double));
                tt_ref_forward(r, fb->inputs, fb->B, fb->T, L, 0, zr);
                tt_log_softmax(zr, N, V);
                double s = 0.0;
                int rows = 0;
                for (int b = 0; b < fb->B; b++) {
                    double lp = 0.0, lpr = 0.0, len = 0.0;
                    for (int i = 0; i < fb->T; i++) {
                        int idx = b * fb->T + i;
                        lp += fb->weights[idx] * z[(size_t)idx * V + fb->targets[idx]];
                        lpr += fb->weights[idx] * zr[(size_t)idx * V + fb->targets[idx]];
                        len += fb->weights[idx];
                    }
                    if (len <= 0) continue;
                    rows++;
                    if (oc->objective == OBJ_NPO) s += 2.0 / oc->beta * tt_softplus(oc->beta * (lp - lpr));
                    else s += 2.0 / oc->beta * tt_softplus(oc->beta * lp / len + oc->delta);
                }
                loss += oc->gamma * s / rows;
                free(zr);
            } else {
                double s = 0.0;
                for (int i = 0; i < N; i++) s -= fb->weights[i] * z[(size_t)i * V + fb->targets[i]];
                double sign = oc->objective == OBJ_SFT ? 1.0 : -1.0;
                loss += sign * oc->gamma * s / W;
            }
            free(z);
        }
    }
    if (rb && (oc->retain_loss != RETAIN_NONE || oc->objective == OBJ_RMU)) {
        int N = rb->B * rb->T;
        double W = 0.0;
        for (int i = 0; i < N; i++) W += rb->weights[i];
        if (oc->objective == OBJ_RMU) {
            double* h = malloc((size_t)N * D * sizeof(double));
            double* h0 = malloc((size_t)N * D * sizeof(double));
            tt_ref_forward(r, rb->inputs, rb->B, rb->T, oc->rmu_layer + 1, 1, h);
            tt_ref_forward(r, rb->inputs, rb->B, rb->T, oc->rmu_layer + 1, 0, h0);
            double s = 0.0;
            for (int i = 0; i < N; i++)
                for (int j = 0; j < D; j++) {
                    double d = h[(size_t)i * D + j] - h0[(size_t)i * D + j];
                    s += rb->weights[i] * d * d / D;
                }
            loss += oc->rmu_alpha * s / W;
            free(h); free(h0);
        } else {
            double* z = malloc((size_t)N * V * sizeof(double));
            tt_ref_forward(r, rb->inputs, rb->B, rb->T, L, 1, z);
            tt_log_softmax(z, N, V);
            double s = 0.0;
            if (oc->retain_loss == RETAIN_KL) {
                double* zr = malloc((size_t)N * V * sizeof(double));
                tt_ref_forward(r, rb->inputs, rb->B, rb->T, L, 0, zr);
                tt_log_softmax(zr, N, V);
                for (int i = 0; i < N; i++) {
                    double kl = 0.0;
                    for (int j = 0; j < V; j++) kl += exp(zr[(size_t)i * V + j]) * (zr[(size_t)i * V + j] - z[(size_t)i * V + j]);
                    s += rb->weights[i] * kl;
                }
                free(zr);
            } else {
                for (int i = 0; i < N; i++) s -= rb->weights[i] * z[(size_t)i * V + rb->targets[i]];
            }
            loss += oc->lambda * s / W;
            free(z);
        }
    }
    return loss;
}

// --- batches -------------------------------------------------------------------

static void tt_make_batch(Batch* b, int B, int T, int V, uint64_t seed, int Tt) {
    memset(b, 0, sizeof(*b));
    b->B = B; b->T = T;
    b->inputs = malloc((size_t)B * T * sizeof(int));
    b->targets = malloc((size_t)B * T * sizeof(int));
    b->weights = malloc((size_t)B * T * sizeof(float));
    uint64_t s = seed;
    for (int i = 0; i < B * T; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        b->inputs[i] = (int)((s >> 33) % V);
        b->targets[i] = (int)((s >> 17) % V);
        int k = (int)((s >> 45) % 4);
        b->weights[i] = k == 0 ? 0.0f : (k == 1 ? 0.5f : 1.0f); // answer-only style masks, and non-unit weights
    }
    if (Tt > 0) {
        b->Tt = Tt;
        b->trans_inputs = malloc((size_t)B * Tt * sizeof(int));
        b->label_pos = malloc((size_t)B * T * sizeof(int));
        for (int i = 0; i < B * Tt; i++) { s = s * 6364136223846793005ull + 1; b->trans_inputs[i] = (int)((s >> 33) % V); }
        for (int i = 0; i < B * T; i++) {
            s = s * 6364136223846793005ull + 1;
            int lp = (int)((s >> 33) % (Tt + 1)) - 1;  // -1: no label
            b->label_pos[i] = lp;
            if (lp < 0) b->weights[i] = 0.0f;
        }
    }
}

static void tt_free_batch(Batch* b) {
    free(b->inputs); free(b->targets); free(b->weights); free(b->trans_inputs); free(b->label_pos);
    memset(b, 0, sizeof(*b));
}

// --- the check ---------------------------------------------------------------

typedef struct {
    TrainModel* m;
    TTRef* r;
    const ObjectiveConfig* oc;
    const Batch* fb;
    const Batch* rb;
} TTCase;

static void tt_ref_from_model(TTRef* r, const TrainModel* m, int with_lora) {
    memset(r, 0, sizeof(*r));
    r->c = m->config;
    size_t n = 0;
    for (int tn = 0; tn < TRAIN_N_TENSORS; tn++) { size_t k; train_tensor_offset(&m->config, tn, &k); n += k; }
    r->w = malloc(n * sizeof(double));
    // the weights the trainable forward reads (fp32)
    const float* src = m->full ? m->params : NULL;
    if (!src) {
        // LoRA over an in-memory base: the base tensors, copied through the Weights views
        const Weights* w = &m->base;
        const Config* c = &m->config;
        double* p = r->w;
        int D = c->dim, L = c->n_layers;
        for (size_t i = 0; i < (size_t)c->vocab_size * D; i++) *p++ = w->token_embedding.f[i];
        for (int l = 0; l < L; l++) for (int j = 0; j < D; j++) *p++ = w->layers[l].rms_att[j];
#define TT_COPY(field) for (int l = 0; l < L; l++) { const Matrix* mm = &w->layers[l].field; \
        for (size_t i = 0; i < (size_t)mm->rows * mm->cols; i++) *p++ = mm->f[i]; }
        TT_COPY(wq) TT_COPY(wk) TT_COPY(wv) TT_COPY(wo)
        for (int l = 0; l < L; l++) for (int j = 0; j < D; j++) *p++ = w->layers[l].rms_ffn[j];
        TT_COPY(w_gate) TT_COPY(w_up) TT_COPY(w_down)
#undef TT_COPY
        for (int j = 0; j < D; j++) *p++ = w->rms_final[j];
        if (!c->tied_embeddings) for (size_t i = 0; i < (size_t)c->vocab_size * D; i++) *p++ = w->wcls.f[i];
    } else {
        for (size_t i = 0; i < n; i++) r->w[i] = src[i];
    }
    if (with_lora) {
        r->lora = malloc(m->n_params * sizeof(double));
        for (size_t i = 0; i < m->n_params; i++) r->lora[i] = m->params[i];
        r->rank = m->lora.rank; r->mask = m->lora.target_mask; r->lb = m->lora.layer_begin; r->le = m->lora.layer_end;
        r->scale = m->lora.scale;
        r->dropout = m->lora_dropout;
        r->drop_seed = m->dropout_seed;
    }
}

static void tt_ref_free(TTRef* r) { free(r->w); free(r->lora); }

// max |g - n| / max |n| over entries [off, off+n) of the double block
static double tt_check_range(TTCase* tc, double* block, size_t off, size_t n, double* max_fd) {
    double eps = 1e-5, worst = 0.0, mx = 0.0;
    for (size_t i = off; i < off + n; i++) {
        double keep = block[i];
        block[i] = keep + eps;
        double lp = tt_ref_objective(tc->r, tc->oc, tc->fb, tc->rb);
        block[i] = keep - eps;
        double lm = tt_ref_objective(tc->r, tc->oc, tc->fb, tc->rb);
        block[i] = keep;
        double fd = (lp - lm) / (2.0 * eps);
        double g = tc->m->grads[i];
        worst = fmax(worst, fabs(g - fd));
        mx = fmax(mx, fabs(fd));
    }
    *max_fd = mx;
    return mx > 0 ? worst / mx : worst;
}

// Runs the float forward + backward of the objective, then compares every
// parameter group with double-precision finite differences.
static double tt_gradcheck(TrainModel* m, const ObjectiveConfig* oc, const Batch* fb, const Batch* rb,
                           const char* what, int per_group) {
    train_zero_grads(m);
    LossTerms lt;
    train_objective(m, oc, fb, rb, 1.0f, 1, &lt);
    TTRef r;
    tt_ref_from_model(&r, m, !m->full);
    TTCase tc = {m, &r, oc, fb, rb};
    double ref_loss = tt_ref_objective(&r, oc, fb, rb);
    double worst = 0.0;
    char groups[1024] = "";
    if (m->full) {
        for (int tn = 0; tn < TRAIN_N_TENSORS; tn++) {
            size_t n, off = train_tensor_offset(&m->config, tn, &n);
            if (n == 0) continue;
            double mx, e = tt_check_range(&tc, r.w, off, n, &mx);
            worst = fmax(worst, e);
            if (mx == 0.0) worst = 1.0; // a group with no gradient at all is a bug here
            size_t len = strlen(groups);
            snprintf(groups + len, sizeof(groups) - len, " %s %.1e", train_tensor_name(tn), e);
        }
    } else if (per_group) {
        for (int t = 0; t < LORA_N_TARGETS; t++)
            for (int ab = 0; ab < 2; ab++) {
                double e = 0.0, mx_all = 0.0;
                for (int l = m->lora.layer_begin; l < m->lora.layer_end; l++) {
                    int in, out;
                    lora_dims(&m->config, t, &in, &out);
                    size_t off = tt_lora_offset(&m->config, m->lora.rank, m->lora.target_mask, m->lora.layer_begin, l, t);
                    size_t na = (size_t)m->lora.rank * in, nb = (size_t)out * m->lora.rank;
                    double mx;
                    e = fmax(e, tt_check_range(&tc, r.lora, ab ? off + na : off, ab ? nb : na, &mx));
                    mx_all = fmax(mx_all, mx);
                }
                worst = fmax(worst, e);
                if (mx_all == 0.0) worst = 1.0;
                size_t len = strlen(groups);
                snprintf(groups + len, sizeof(groups) - len, " %s.%s %.1e", lora_target_name(t), ab ? "B" : "A", e);
            }
    } else {
        double mx;
        worst = tt_check_range(&tc, r.lora, 0, m->n_params, &mx);
        if (mx == 0.0) worst = 1.0;
        snprintf(groups, sizeof(groups), " all LoRA %.1e", worst);
    }
    double loss_err = fabs(lt.loss - ref_loss) / fmax(1.0, fabs(ref_loss));
    check(worst <= TT_GRAD_TOL && loss_err < 1e-4,
          "gradcheck %s: loss %.6f (double ref %.6f), max rel err per group:%s (tol %.0e)", what, lt.loss, ref_loss,
          groups, TT_GRAD_TOL);
    tt_ref_free(&r);
    return worst;
}

static void tt_randomize_lora(TrainModel* m, uint64_t seed) {
    uint64_t s = seed;
    for (size_t i = 0; i < m->n_params; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        m->params[i] = ((float)((s >> 40) & 0xFFFF) / 65536.0f - 0.5f) * 0.4f;
    }
}

// Matrices x10 (std 0.2), norm weights 1 + N(0, 0.1): every path carries signal, softmaxes stay soft
static void tt_spread_weights(float* block, const Config* c) {
    uint64_t s = 99;
    for (int tn = 0; tn < TRAIN_N_TENSORS; tn++) {
        size_t n, off = train_tensor_offset(c, tn, &n);
        int norm = tn == 1 || tn == 6 || tn == 10;
        for (size_t i = off; i < off + n; i++) {
            s = s * 6364136223846793005ull + 1442695040888963407ull;
            block[i] = norm ? 1.0f + 0.2f * ((float)((s >> 40) & 0xFFFF) / 65536.0f - 0.5f) : block[i] * 10.0f;
        }
    }
}

static void test_train_gradcheck(void) {
    int B = 2, T = 6, Tt = 7;
    // --full: every weight, tied and untied, SFT (descent) and GA (ascent) loss
    for (int tied = 0; tied < 2; tied++) {
        Config c = tt_tiny_config(tied, !tied);
        TrainModel m;
        train_model_random(&m, &c, 7 + tied);
        train_setup_full(&m, 0);
        tt_spread_weights(m.params, &c);
        train_alloc_acts(&m, B * T, T, 0, 0);
        Batch fb;
        tt_make_batch(&fb, B, T, c.vocab_size, 11, 0);
        ObjectiveConfig oc = {0};
        oc.objective = OBJ_SFT; oc.gamma = 1.0f; oc.lambda = 1.0f;
        tt_gradcheck(&m, &oc, &fb, NULL, tied ? "--full sft (tied embeddings)" : "--full sft (untied, llama3 rope)", 1);
        tt_free_batch(&fb);
        train_model_free(&m);
    }
    // LoRA on every target of every layer, dropout on, per group, graddiff
    Config c = tt_tiny_config(0, 1);
    TrainModel m;
    train_model_random(&m, &c, 3);
    tt_spread_weights(m.base_copy, &c);
    train_setup_lora(&m, 2, 4.0f, 0.25f, (1 << LORA_N_TARGETS) - 1, 0, c.n_layers, 5);
    tt_randomize_lora(&m, 9);
    m.dropout_seed = 12345;
    train_alloc_acts(&m, B * Tt, Tt, 1, 1);
    Batch fb, rb;
    tt_make_batch(&fb, B, T, c.vocab_size, 21, Tt);
    tt_make_batch(&rb, B, T, c.vocab_size, 22, 0);
    ObjectiveConfig oc = {0};
    oc.gamma = 1.0f; oc.lambda = 0.7f;
    oc.objective = OBJ_GRADDIFF; oc.retain_loss = RETAIN_NLL;
    tt_gradcheck(&m, &oc, &fb, &rb, "LoRA graddiff (7 targets x A/B, dropout 0.25)", 1);
    oc.objective = OBJ_GA; oc.retain_loss = RETAIN_NONE;
    tt_gradcheck(&m, &oc, &fb, NULL, "LoRA ga", 0);
    oc.objective = OBJ_KL; oc.retain_loss = RETAIN_KL;
    tt_gradcheck(&m, &oc, &fb, &rb, "LoRA kl (GA + KL(base || model) on retain)", 0);
    oc.objective = OBJ_NPO; oc.beta = 0.5f; oc.retain_loss = RETAIN_NLL;
    tt_gradcheck(&m, &oc, &fb, &rb, "LoRA npo + retain nll (beta 0.5)", 0);
    oc.objective = OBJ_SIMNPO; oc.beta = 0.5f; oc.delta = 1.0f; oc.retain_loss = RETAIN_NONE;
    tt_gradcheck(&m, &oc, &fb, NULL, "LoRA simnpo (beta 0.5, delta 1)", 0);
    oc.objective = OBJ_WHP; oc.retain_loss = RETAIN_NONE;
    tt_gradcheck(&m, &oc, &fb, NULL, "LoRA whp (KL to base on translated rows)", 0);
    float u[16];
    for (int j = 0; j < c.dim; j++) u[j] = (float)(j % 5) / 5.0f - 0.3f;
    oc.objective = OBJ_RMU; oc.rmu_layer = 0; oc.rmu_c = 3.0f; oc.rmu_alpha = 5.0f; oc.rmu_u = u;
    train_model_free(&m);
    // RMU: adapter only on layers <= l, backward from layer l
    train_model_random(&m, &c, 3);
    tt_spread_weights(m.base_copy, &c);
    train_setup_lora(&m, 2, 4.0f, 0.0f, (1 << LORA_N_TARGETS) - 1, 0, 1, 5);
    tt_randomize_lora(&m, 10);
    train_alloc_acts(&m, B * T, T, 0, 1);
    tt_gradcheck(&m, &oc, &fb, &rb, "LoRA rmu (layer 0, c 3, alpha 5)", 0);
    tt_free_batch(&fb);
    tt_free_batch(&rb);
    train_model_free(&m);
}

// --- the training forward is the engine's forward ------------------------------

static void tt_random_tokens(int* ids, int n, int V, uint64_t seed) {
    uint64_t s = seed;
    for (int i = 0; i < n; i++) { s = s * 6364136223846793005ull + 1442695040888963407ull; ids[i] = (int)((s >> 33) % V); }
}

// max |a - b| over rows, relative to each row's std in a
static float tt_max_row_err(const float* a, const float* b, int rows, int V, int* identical) {
    float worst = 0.0f;
    *identical = memcmp(a, b, (size_t)rows * V * sizeof(float)) == 0;
    for (int i = 0; i < rows; i++) {
        const float* ra = a + (size_t)i * V;
        const float* rb = b + (size_t)i * V;
        double mean = 0.0, var = 0.0;
        for (int j = 0; j < V; j++) mean += ra[j];
        mean /= V;
        for (int j = 0; j < V; j++) var += (ra[j] - mean) * (ra[j] - mean);
        float sd = (float)sqrt(var / V);
        for (int j = 0; j < V; j++) worst = fmaxf(worst, fabsf(ra[j] - rb[j]) / sd);
    }
    return worst;
}

// Training-forward logits of B rows vs run.c's forward_batch on each row,
// without and with a LoRA adapter (saved, then loaded by load_lora).
static void tt_engine_compare(const char* path, int with_lora) {
    TrainModel m;
    train_model_from_file(&m, path);
    int B = 2, T = 48, V = m.config.vocab_size, L = m.config.n_layers;
    const char* adapter = "build/test_train_engine.lora";
    if (with_lora) {
        train_setup_lora(&m, 4, 8.0f, 0.0f, (1 << LORA_N_TARGETS) - 1, 0, L, 1);
        tt_randomize_lora(&m, 3);
        for (size_t i = 0; i < m.n_params; i++) m.params[i] *= 0.25f;
        check(lora_save(&m.lora, &m.config, adapter) == 0, "adapter: lora_save writes %s", adapter);
    }
    train_alloc_acts(&m, B * T, T, 0, 0);
    int* ids = malloc((size_t)B * T * sizeof(int));
    tt_random_tokens(ids, B * T, V, 77);
    ids[0] = ids[T] = m.config.bos_id;
    train_forward(&m, &m.w, with_lora ? &m.lora : NULL, 0, ids, B, T, L);
    Transformer t;
    build_transformer(&t, path, T);
    if (with_lora) load_lora(&t, adapter);
    float* eng = malloc((size_t)B * T * V * sizeof(float));
    for (int b = 0; b < B; b++) forward_batch(&t, ids + b * T, T, 0, eng + (size_t)b * T * V);
    int same;
    float err = tt_max_row_err(eng, m.acts.logits, B * T, V, &same);
    check(err <= 1e-5f, "train forward == run.c forward_batch: %s%s, %d x %d positions, max |diff| %.1e x row std%s",
          path, with_lora ? " + LoRA (all targets)" : "", B, T, err, same ? " (bit-identical)" : "");
    free(eng); free(ids);
    free_transformer(&t);
    train_model_free(&m);
}

static void test_train_matches_engine(void) {
    tt_engine_compare("build/models/tiny-3.2.f32.bin", 0);
    tt_engine_compare("build/models/tiny-3.2.f32.bin", 1);
    tt_engine_compare("build/models/tiny-3.0.f32.bin", 1);
    tt_engine_compare("build/models/tiny-3.2.q8.bin", 1);
}

// --- adapter files -------------------------------------------------------------

static void tt_write_bytes(const char* path, const void* data, size_t len) {
    FILE* f = fopen(path, "wb");
    if (f) { fwrite(data, 1, len, f); fclose(f); }
}

static void test_train_adapter_file(void) {
    Config c = tt_tiny_config(0, 1);
    TrainModel m;
    train_model_random(&m, &c, 1);
    int mask = (1 << LORA_Q) | (1 << LORA_V) | (1 << LORA_DOWN);
    train_setup_lora(&m, 3, 6.0f, 0.0f, mask, 1, 2, 4);
    tt_randomize_lora(&m, 5);
    const char* path = "build/test_train_rt.lora";
    check(lora_save(&m.lora, &c, path) == 0, "adapter: saved (rank 3, q/v/down, layer 1)");
    Lora back;
    char err[512];
    int rc = lora_read(&back, &c, path, err, sizeof(err));
    int same = rc == 0 && back.rank == 3 && back.alpha == 6.0f && back.target_mask == mask && back.layer_begin == 1 &&
               back.layer_end == 2 && back.pairs[0][LORA_Q].a == NULL;
    for (int t = 0; same && t < LORA_N_TARGETS; t++) {
        if (!(mask & (1 << t))) { same = back.pairs[1][t].a == NULL; continue; }
        int in, out;
        lora_dims(&c, t, &in, &out);
        same = !memcmp(back.pairs[1][t].a, m.lora.pairs[1][t].a, (size_t)3 * in * sizeof(float)) &&
               !memcmp(back.pairs[1][t].b, m.lora.pairs[1][t].b, (size_t)3 * out * sizeof(float));
    }
    check(same, "adapter: read back bit for bit, header fields and layout");
    if (rc == 0) free_lora(&back);
    // refusals: other dims, truncated, bad magic
    Config other = c;
    other.hidden_dim = 48;
    rc = lora_read(&back, &other, path, err, sizeof(err));
    check(rc != 0 && strstr(err, "hidden_dim"), "adapter: refused by a model of other dims (\"%s\")", err);
    size_t len;
    char* bytes = read_file(path, &len);
    tt_write_bytes("build/test_train_trunc.lora", bytes, len - 4);
    rc = lora_read(&back, &c, "build/test_train_trunc.lora", err, sizeof(err));
    check(rc != 0, "adapter: truncated file refused (\"%s\")", err);
    bytes[0] = 'X';
    tt_write_bytes("build/test_train_magic.lora", bytes, len);
    rc = lora_read(&back, &c, "build/test_train_magic.lora", err, sizeof(err));
    check(rc != 0, "adapter: bad magic refused (\"%s\")", err);
    free(bytes);
    train_model_free(&m);
}

// --- merge, model files --------------------------------------------------------

static float* tt_engine_logits(const char* model, const char* adapter, const int* ids, int n) {
    Transformer t;
    build_transformer(&t, model, n);
    if (adapter) load_lora(&t, adapter);
    float* out = malloc((size_t)n * t.config.vocab_size * sizeof(float));
    forward_batch(&t, ids, n, 0, out);
    free_transformer(&t);
    return out;
}

static void test_train_merge(void) {
    // the adapter from test_train_matches_engine: random, all targets, every layer
    const char* model = "build/models/tiny-3.2.f32.bin";
    const char* adapter = "build/test_train_engine.lora";
    int n = 40, V = 128256, same;
    int ids[40];
    tt_random_tokens(ids, n, V, 5);
    check(merge_model(model, adapter, "build/test_train_merged.f32.bin", 0) == 0, "merge: fp32 model written");
    check(merge_model(model, adapter, "build/test_train_merged.q8.bin", 1) == 0, "merge: int8 model written");
    float* unmerged = tt_engine_logits(model, adapter, ids, n);
    float* merged = tt_engine_logits("build/test_train_merged.f32.bin", NULL, ids, n);
    float* merged8 = tt_engine_logits("build/test_train_merged.q8.bin", NULL, ids, n);
    float err = tt_max_row_err(unmerged, merged, n, V, &same);
    check(err < 1e-4f, "merge: merged fp32 model == base + unmerged adapter (max %.1e x row std)", err);
    int top1 = 0;
    for (int i = 0; i < n; i++) {
        int a = 0, b = 0;
        for (int j = 1; j < V; j++) {
            if (unmerged[(size_t)i * V + j] > unmerged[(size_t)i * V + a]) a = j;
            if (merged8[(size_t)i * V + j] > merged8[(size_t)i * V + b]) b = j;
        }
        top1 += a == b;
    }
    check(top1 >= n * 9 / 10, "merge: merged int8 model agrees on top-1 at %d/%d positions", top1, n);
    free(unmerged); free(merged); free(merged8);

    // a fresh model saved by save_model_fp32 loads in the engine with the same logits
    Config c = tt_tiny_config(0, 1);
    TrainModel m;
    train_model_random(&m, &c, 42);
    train_setup_full(&m, 0);
    train_alloc_acts(&m, 12, 12, 0, 0);
    tt_random_tokens(ids, 12, c.vocab_size, 6);
    train_forward(&m, &m.w, NULL, 0, ids, 1, 12, c.n_layers);
    check(save_model_fp32(&m, "build/test_train_fresh.bin") == 0, "model file: a fresh --full model is saved");
    float* eng = tt_engine_logits("build/test_train_fresh.bin", NULL, ids, 12);
    err = tt_max_row_err(eng, m.acts.logits, 12, c.vocab_size, &same);
    check(err <= 1e-5f, "model file: the engine loads it, logits %s (max %.1e x std)", same ? "bit-identical" : "match", err);
    free(eng);
    train_model_free(&m);
}

// LoRA gradients over the int8 base (activations quantized in the forward,
// W dequantized tile by tile in the backward) against the same adapter over
// the exactly dequantized fp32 model (a merge with an all-zero adapter).
static void test_train_int8_backward(void) {
    const char* q8 = "build/models/tiny-3.2.q8.bin";
    TrainModel mq, mf;
    train_model_from_file(&mq, q8);
    int L = mq.config.n_layers, B = 2, T = 32;
    train_setup_lora(&mq, 4, 8.0f, 0.0f, (1 << LORA_N_TARGETS) - 1, 0, L, 1);
    for (size_t i = 0; i < mq.n_params; i++) mq.params[i] = 0.0f;
    lora_save(&mq.lora, &mq.config, "build/test_train_zero.lora");
    check(merge_model(q8, "build/test_train_zero.lora", "build/test_train_deq.f32.bin", 0) == 0,
          "int8: dequantized fp32 copy written (merge of a zero adapter)");
    train_model_from_file(&mf, "build/test_train_deq.f32.bin");
    train_setup_lora(&mf, 4, 8.0f, 0.0f, (1 << LORA_N_TARGETS) - 1, 0, L, 1);
    tt_randomize_lora(&mq, 8);
    for (size_t i = 0; i < mq.n_params; i++) mq.params[i] *= 0.25f;
    memcpy(mf.params, mq.params, mq.n_params * sizeof(float));
    train_alloc_acts(&mq, B * T, T, 0, 0);
    train_alloc_acts(&mf, B * T, T, 0, 0);
    Batch fb;
    tt_make_batch(&fb, B, T, mq.config.vocab_size, 31, 0);
    ObjectiveConfig oc = {0};
    oc.objective = OBJ_SFT; oc.gamma = 1.0f;
    LossTerms lq, lf;
    train_zero_grads(&mq); train_zero_grads(&mf);
    train_objective(&mq, &oc, &fb, NULL, 1.0f, 1, &lq);
    train_objective(&mf, &oc, &fb, NULL, 1.0f, 1, &lf);
    double dot = 0, nq = 0, nf = 0, diff = 0;
    for (size_t i = 0; i < mq.n_params; i++) {
        dot += (double)mq.grads[i] * mf.grads[i];
        nq += (double)mq.grads[i] * mq.grads[i];
        nf += (double)mf.grads[i] * mf.grads[i];
        diff += ((double)mq.grads[i] - mf.grads[i]) * ((double)mq.grads[i] - mf.grads[i]);
    }
    double cosine = dot / sqrt(nq * nf), rel = sqrt(diff / nf);
    check(cosine > 0.99 && rel < 0.1 && fabs(lq.loss - lf.loss) < 0.01 * fabs(lf.loss),
          "int8: LoRA gradients over the int8 base vs its fp32 dequantization: cosine %.5f, rel L2 diff %.3f, loss %.5f vs %.5f",
          cosine, rel, lq.loss, lf.loss);
    tt_free_batch(&fb);
    train_model_free(&mq);
    train_model_free(&mf);
}

// --- a short graddiff run on a tiny model that knows its data ------------------
//
// A tiny model is first trained from scratch (--full, SFT) on two kinds of
// data: "forget" facts (8 fixed sequences over tokens 64..95, memorised)
// and "retain" text (a Markov chain over tokens 0..63, 4 successors per
// token with probabilities .55/.25/.15/.05, so its NLL stays near the
// chain's entropy, ~1.2 nats). Then a LoRA adapter is trained with graddiff
// (ascent on the facts, descent on retain text). The forget NLL must rise
// far above its trained level while the retain NLL, measured on held-out
// chain samples, moves by less than 5%.

static double tt_eval(TrainModel* m, const Batch* b, int with_lora) {
    train_forward(m, &m->w, with_lora ? &m->lora : NULL, 0, b->inputs, b->B, b->T, m->config.n_layers);
    double w, s = train_nll(m, b, &w);
    return s / w;
}

static void tt_markov_batch(Batch* b, int B, int T, uint64_t seed) {
    tt_make_batch(b, B, T, 64, seed, 0);
    static const float probs[4] = {0.55f, 0.25f, 0.15f, 0.05f};
    uint64_t s = seed;
    for (int r = 0; r < B; r++) {
        int tokv = b->inputs[r * T];
        for (int i = 0; i < T; i++) {
            s = s * 6364136223846793005ull + 1442695040888963407ull;
            float u = (float)((s >> 40) & 0xFFFFFF) / 16777216.0f, cdf = 0.0f;
            int k = 3;
            for (int j = 0; j < 4; j++) { cdf += probs[j]; if (u < cdf) { k = j; break; } }
            int next = (tokv * 7 + k * 13 + 5) % 64;
            b->inputs[r * T + i] = tokv;
            b->targets[r * T + i] = next;
            b->weights[r * T + i] = 1.0f;
            tokv = next;
        }
    }
}

static void tt_fact_batch(Batch* b, int B, int T, uint64_t seed) {
    tt_make_batch(b, B, T, 32, seed, 0);
    for (int r = 0; r < B; r++)
        for (int i = 0; i < T; i++) {
            int idx = r * T + i;
            b->targets[idx] += 64;
            b->inputs[idx] = i > 0 ? b->targets[idx - 1] : 64 + r;
            b->weights[idx] = 1.0f;
        }
}

static void test_train_graddiff_tiny(void) {
    Config c = tt_tiny_config(1, 0);
    c.dim = 32; c.hidden_dim = 64; c.vocab_size = 96;
    int T = 16, NF = 8, NR = 24, B = 8;
    Batch facts, chain, held, all, rb;
    tt_fact_batch(&facts, NF, T, 101);
    tt_markov_batch(&held, 4 * B, T, 303);
    tt_make_batch(&all, NF + NR, T, 96, 1, 0);
    memcpy(all.inputs, facts.inputs, (size_t)NF * T * sizeof(int));
    memcpy(all.targets, facts.targets, (size_t)NF * T * sizeof(int));
    memcpy(all.weights, facts.weights, (size_t)NF * T * sizeof(float));
    // 1. the "target model", trained from scratch on both
    TrainModel m;
    train_model_random(&m, &c, 1);
    train_setup_full(&m, 0);
    train_alloc_acts(&m, (NF + NR) * T, T, 0, 0);
    ObjectiveConfig sft = {0};
    sft.objective = OBJ_SFT; sft.gamma = 1.0f;
    LossTerms lt;
    for (int step = 1; step <= 400; step++) {
        // fresh chain samples every step: the model learns the chain, it cannot memorise it
        tt_markov_batch(&chain, NR, T, 1000 + step);
        memcpy(all.inputs + NF * T, chain.inputs, (size_t)NR * T * sizeof(int));
        memcpy(all.targets + NF * T, chain.targets, (size_t)NR * T * sizeof(int));
        memcpy(all.weights + NF * T, chain.weights, (size_t)NR * T * sizeof(float));
        tt_free_batch(&chain);
        train_zero_grads(&m);
        train_objective(&m, &sft, &all, NULL, 1.0f, 1, &lt);
        train_adamw(&m, 3e-3f, 0.9f, 0.999f, 1e-8f, 0.0f, step);
    }
    double f0 = tt_eval(&m, &facts, 0), r0 = tt_eval(&m, &held, 0);
    check(f0 < 0.1 && r0 < 1.6, "tiny model from scratch (--full sft, 400 steps): facts NLL %.4f, held-out chain NLL %.4f",
          f0, r0);
    check(save_model_fp32(&m, "build/test_train_tiny.bin") == 0, "tiny model saved");
    train_model_free(&m);
    // 2. graddiff with LoRA over the saved model
    train_model_from_file(&m, "build/test_train_tiny.bin");
    train_setup_lora(&m, 4, 8.0f, 0.0f, (1 << LORA_N_TARGETS) - 1, 0, c.n_layers, 2);
    train_alloc_acts(&m, 4 * B * T, T, 0, 0);
    ObjectiveConfig gd = {0};
    gd.objective = OBJ_GRADDIFF; gd.retain_loss = RETAIN_NLL; gd.gamma = 1.0f; gd.lambda = 1.0f;
    double fa = tt_eval(&m, &facts, 1), ra = tt_eval(&m, &held, 1);
    for (int step = 1; step <= 30; step++) {
        tt_markov_batch(&rb, B, T, 5000 + step);
        train_zero_grads(&m);
        train_objective(&m, &gd, &facts, &rb, 1.0f, 1, &lt);
        tt_free_batch(&rb);
        double gn = train_grad_norm(&m);
        if (gn > 1.0) train_scale_grads(&m, (float)(1.0 / gn));
        train_adamw(&m, 1e-3f, 0.9f, 0.999f, 1e-8f, 0.0f, step);
    }
    double f1 = tt_eval(&m, &facts, 1), r1 = tt_eval(&m, &held, 1);
    check(fabs(fa - f0) < 1e-6 && fabs(ra - r0) < 1e-6, "graddiff: a fresh adapter (B = 0) leaves the model unchanged");
    check(f1 > 2.0 && f1 > 10.0 * f0 && fabs(r1 - r0) <= 0.05 * r0,
          "graddiff (LoRA rank 4, 30 steps): forget NLL %.4f -> %.4f, retain NLL (held out) %.4f -> %.4f (%+.1f%%, bound 5%%)",
          f0, f1, r0, r1, 100.0 * (r1 - r0) / r0);
    train_model_free(&m);
    tt_free_batch(&facts); tt_free_batch(&held); tt_free_batch(&all);
}

// --- Llama-3-8B int8 LoRA training fits in 16 GiB (B*T = 256) ------------------
// Counted by the allocation code itself (dry run), plus the exact size of the
// int8 model file, which is mapped and read whole every step.
static void test_train_memory_8b(void) {
    Config c;
    memset(&c, 0, sizeof(c));
    c.dim = 4096; c.hidden_dim = 14336; c.n_layers = 32; c.n_heads = 32; c.n_kv_heads = 8; c.head_dim = 128;
    c.vocab_size = 128256; c.max_seq_len = 8192; c.rope_theta = 500000.0f; c.norm_eps = 1e-5f;
    c.weight_type = WEIGHT_Q8; c.group_size = 64; c.tied_embeddings = 0;
    double gib = 1024.0 * 1024.0 * 1024.0, weights = model_file_size(&c) / gib;
    double gd = train_memory_bytes(&c, 0, 16, 256, 256, 0, 0) / gib;          // graddiff, rank 16, 1 x 256
    double kl = train_memory_bytes(&c, 0, 16, 256, 256, 1, 0) / gib;          // kl retain: reference logits
    double whp = train_memory_bytes(&c, 0, 16, 384, 384, 1, 0) / gib;         // whp: translated rows of 1.5 T
    check(weights + gd < 16.0 && weights + kl < 16.0 && weights + whp < 16.0,
          "memory: Llama-3-8B int8 + LoRA rank 16 on all targets, 1 x 256 positions: weights %.2f GiB + "
          "graddiff %.2f / kl %.2f / whp %.2f GiB (< 16 GiB)", weights, gd, kl, whp);
}

// --- the programs ----------------------------------------------------------------

// Runs cmd; returns its exit status (-1 if it died by a signal); stderr
// goes to *err (malloc'd, caller frees) when err is not NULL.
static int tt_sh(const char* cmd, char** err) {
    char full[4096];
    snprintf(full, sizeof(full), "%s >build/test_train_out.txt 2>build/test_train_err.txt", cmd);
    int status = system(full);
    if (err) { size_t len; *err = read_file("build/test_train_err.txt", &len); }
    if (status == -1 || !WIFEXITED(status)) return -1;
    return WEXITSTATUS(status);
}

static int tt_files_equal(const char* a, const char* b) {
    size_t la, lb;
    char* x = read_file(a, &la);
    char* y = read_file(b, &lb);
    int same = la == lb && memcmp(x, y, la) == 0;
    free(x); free(y);
    return same;
}

static int tt_count_lines(const char* path) {
    size_t len;
    char* s = read_file(path, &len);
    int n = 0;
    for (size_t i = 0; i < len; i++) n += s[i] == '\n';
    free(s);
    return n;
}

// An error exit: non-zero status, no signal, one line "error: ..." on stderr
static void tt_expect_error(const char* what, const char* cmd) {
    char* err;
    int rc = tt_sh(cmd, &err);
    int lines = 0;
    for (char* p = err; *p; p++) lines += *p == '\n';
    size_t len = strlen(err);
    if (len && err[len - 1] == '\n') err[len - 1] = '\0';
    check(rc > 0 && rc < 126 && lines == 1 && !strncmp(err, "error: ", 7), "train_lora bad input: %s -> \"%s\"", what, err);
    free(err);
}

static void test_train_cli(void) {
    const char* M = "build/models/tiny-3.2.f32.bin";
    char cmd[2048];
    // small data files
    FILE* f = fopen("build/tt_forget.txt", "w");
    for (int i = 0; i < 60; i++)
        fprintf(f, "Harry walked to Hogwarts with Hermione and Ron. Dumbledore smiled at Harry in Diagon Alley.%s",
                i % 5 ? " " : "\n");
    fclose(f);
    f = fopen("build/tt_retain.txt", "w");
    for (int i = 0; i < 60; i++) fprintf(f, "The river flooded in %d and the city rebuilt the old bridge. ", 1800 + i);
    fclose(f);
    f = fopen("build/tt_qa.jsonl", "w");
    fprintf(f, "{\"question\": \"Who is Harry's best friend?\", \"answer\": \"Ron Weasley.\", \"id\": 1}\n");
    fprintf(f, "{\"id\": 2, \"answer\": \"Hogwarts \\u00e9cole.\", \"question\": \"Which school?\", \"tags\": [\"a\", {\"b\": 1}]}\n");
    fclose(f);
    f = fopen("build/tt_qa.tsv", "w");
    fprintf(f, "question\tanswer\nWhen was the bridge rebuilt?\tIn 1850.\\nIt took two years.\nWhat flooded?\tThe river.\n");
    fclose(f);
    f = fopen("build/tt_dict.tsv", "w");
    fprintf(f, "# anchored\tgeneric\nHarry\tJon\nHermione\tSarah\nRon\tTom\nHogwarts\tthe academy\nDiagon Alley\tthe market\n");
    fclose(f);
    f = fopen("build/tt_bad.jsonl", "w");
    fprintf(f, "{\"question\": \"unterminated}\n");
    fclose(f);

    const char* base = "./train_lora build/models/tiny-3.2.f32.bin -z build/llama3.tok -T 32 -b 2 --lr 1e-3";
    // a graddiff run: progress lines, CSV, adapter
    snprintf(cmd, sizeof(cmd), "%s --objective graddiff --forget build/tt_forget.txt --retain build/tt_retain.txt "
             "--steps 4 -o build/tt_gd.lora", base);
    int rc = tt_sh(cmd, NULL);
    Lora l;
    char err[512];
    Transformer t;
    build_transformer(&t, M, 1);
    int read_ok = lora_read(&l, &t.config, "build/tt_gd.lora", err, sizeof(err)) == 0;
    if (read_ok) free_lora(&l);
    check(rc == 0 && read_ok && tt_count_lines("build/tt_gd.lora.csv") == 5,
          "train_lora graddiff: 4 steps, adapter readable, CSV header + 4 rows (rc %d)", rc);
    // every objective, one or two steps
    const char* runs[][2] = {
        {"sft (chat JSONL, system prompt)", "--objective sft --forget build/tt_qa.jsonl --system 'Be brief.' -T 48"},
        {"ga (chat TSV)", "--objective ga --forget build/tt_qa.tsv -T 48"},
        {"kl", "--objective kl --forget build/tt_forget.txt --retain build/tt_retain.txt"},
        {"npo + retain", "--objective npo --forget build/tt_forget.txt --retain build/tt_retain.txt"},
        {"simnpo", "--objective simnpo --forget build/tt_forget.txt"},
        {"rmu", "--objective rmu --rmu-layer 1 --forget build/tt_forget.txt --retain build/tt_retain.txt"},
        {"whp", "--objective whp --dict build/tt_dict.tsv --forget build/tt_forget.txt"},
        {"whp with a reinforced adapter", "--objective whp --dict build/tt_dict.tsv --reinforced build/tt_gd.lora "
                                          "--forget build/tt_forget.txt"},
        {"graddiff, int8 base, dropout, accum 2, cosine", "--objective graddiff --forget build/tt_forget.txt --retain "
         "build/tt_retain.txt --dropout 0.1 --accum 2 --schedule cosine --warmup 1 --targets q,v,down --layers 1-1"},
    };
    for (size_t i = 0; i < sizeof(runs) / sizeof(runs[0]); i++) {
        const char* b = i == 8 ? "./train_lora build/models/tiny-3.2.q8.bin -z build/llama3.tok -T 32 -b 2 --lr 1e-3" : base;
        snprintf(cmd, sizeof(cmd), "%s %s --steps 2 -o build/tt_obj.lora", b, runs[i][1]);
        char* e;
        rc = tt_sh(cmd, &e);
        size_t len = strlen(e);
        if (len && e[len - 1] == '\n') e[len - 1] = '\0';
        check(rc == 0, "train_lora %s runs (rc %d%s%s)", runs[i][0], rc, *e ? ": " : "", e);
        free(e);
    }
    // resume continues bit for bit: 5 steps in one go == 2 steps, halt, resume
    const char* rs = "--objective graddiff --forget build/tt_forget.txt --retain build/tt_retain.txt --steps 5 "
                     "--dropout 0.1 --accum 2 --schedule cosine --warmup 2 --save-every 2";
    snprintf(cmd, sizeof(cmd), "%s %s -o build/tt_a.lora", base, rs);
    int r1 = tt_sh(cmd, NULL);
    snprintf(cmd, sizeof(cmd), "%s %s -o build/tt_b.lora --halt-after 2", base, rs);
    int r2 = tt_sh(cmd, NULL);
    snprintf(cmd, sizeof(cmd), "%s %s -o build/tt_b.lora --resume", base, rs);
    int r3 = tt_sh(cmd, NULL);
    check(r1 == 0 && r2 == 0 && r3 == 0 && tt_files_equal("build/tt_a.lora", "build/tt_b.lora") &&
          tt_files_equal("build/tt_a.lora.state", "build/tt_b.lora.state"),
          "train_lora --resume: 2 steps + halt + resume == 5 steps in one run, adapter and optimizer state bit for bit");
    // a NaN loss stops training and keeps the last good checkpoint
    snprintf(cmd, sizeof(cmd), "%s --objective graddiff --forget build/tt_forget.txt --retain build/tt_retain.txt "
             "--steps 4 --save-every 1 --clip 0 --lr 1e30 -o build/tt_nan.lora", base);
    char* e;
    rc = tt_sh(cmd, &e);
    read_ok = lora_read(&l, &t.config, "build/tt_nan.lora", err, sizeof(err)) == 0;
    if (read_ok) free_lora(&l);
    check(rc == 1 && strstr(e, "NaN") && strstr(e, "last good checkpoint (step 1)") && read_ok,
          "train_lora: a NaN loss stops training (rc %d), the step-1 checkpoint is kept and loads", rc);
    free(e);
    // merge, and the merged files run
    rc = tt_sh("./train_lora merge build/models/tiny-3.2.f32.bin build/tt_gd.lora build/tt_merged.bin", NULL);
    int rc8 = tt_sh("./train_lora merge build/models/tiny-3.2.q8.bin build/tt_gd.lora build/tt_merged8.bin --int8", NULL);
    int rr = tt_sh("./run build/tt_merged.bin -z build/llama3.tok -i Hello -n 4 -t 0", NULL);
    int rr8 = tt_sh("./run build/tt_merged8.bin -z build/llama3.tok -i Hello -n 4 -t 0", NULL);
    check(rc == 0 && rc8 == 0 && rr == 0 && rr8 == 0, "train_lora merge: fp32 and int8 merged models are written and run");
    // run --lora: unmerged adapter over fp32 and int8
    int rl = tt_sh("./run build/models/tiny-3.2.f32.bin -z build/llama3.tok --lora build/tt_gd.lora -i Hello -n 4 -t 0", NULL);
    int rl8 = tt_sh("./run build/models/tiny-3.2.q8.bin -z build/llama3.tok --lora build/tt_gd.lora -i Hello -n 4 -t 0", NULL);
    check(rl == 0 && rl8 == 0, "run --lora ADAPTER generates over fp32 and int8 bases");
    // a model from scratch
    snprintf(cmd, sizeof(cmd), "./train_lora --init dim=32,hidden_dim=64,n_layers=2,n_heads=4,n_kv_heads=2,max_seq_len=64 "
             "-z build/llama3.tok --full --objective sft --forget build/tt_forget.txt -T 32 -b 2 --steps 2 "
             "-o build/tt_fresh.bin");
    rc = tt_sh(cmd, NULL);
    rr = tt_sh("./run build/tt_fresh.bin -z build/llama3.tok -i Hello -n 4 -t 0", NULL);
    check(rc == 0 && rr == 0, "train_lora --init ... --full: a fresh model is trained, saved and runs");
    // --help names every option
    tt_sh("./train_lora --help", &e);
    const char* opts[] = {"--forget", "--retain", "--format", "--system", "-T ", "-b ", "--retain-batch", "--accum",
                          "--objective", "--retain-loss", "--gamma", "--lambda", "--beta", "--delta", "--rmu-layer",
                          "--rmu-c", "--rmu-alpha", "--dict", "--reinforced", "--whp-alpha", "--full", "--init",
                          "--rank", "--alpha", "--dropout", "--targets", "--layers", "--adapter-init", "--steps", "--lr",
                          "--warmup", "--schedule", "--min-lr-frac", "--wd", "--adam-b1", "--adam-b2", "--adam-eps",
                          "--clip", "--seed", "--eval-every", "--eval-rows", "--stop-forget-nll", "--gold", "-o ",
                          "--save-every", "--log ", "--log-every", "--resume", "--halt-after", "--dump-rows", "merge"};
    int missing = 0;
    for (size_t i = 0; i < sizeof(opts) / sizeof(opts[0]); i++) if (!strstr(e, opts[i])) { missing++; printf("  missing in --help: %s\n", opts[i]); }
    check(missing == 0, "train_lora --help documents all %zu options", sizeof(opts) / sizeof(opts[0]));
    free(e);
    // bad input: one line "error: ..." and a non-zero exit
    tt_expect_error("no tokenizer", "./train_lora build/models/tiny-3.2.f32.bin --forget build/tt_forget.txt -o build/x.lora");
    tt_expect_error("unknown objective", "./train_lora build/models/tiny-3.2.f32.bin -z build/llama3.tok --objective forget "
                    "--forget build/tt_forget.txt -o build/x.lora");
    tt_expect_error("graddiff without --retain", "./train_lora build/models/tiny-3.2.f32.bin -z build/llama3.tok "
                    "--forget build/tt_forget.txt -o build/x.lora");
    tt_expect_error("malformed JSONL", "./train_lora build/models/tiny-3.2.f32.bin -z build/llama3.tok --objective sft "
                    "--forget build/tt_bad.jsonl -o build/x.lora");
    tt_expect_error("adapter of another model", "./train_lora merge build/models/tiny-3.0.f32.bin build/tt_gd.lora build/x.bin");
    tt_expect_error("run --lora with an adapter of another model",
                    "./run build/models/tiny-3.0.f32.bin -z build/llama3.tok --lora build/tt_gd.lora -i hi");
    tt_expect_error("--resume without a state file", "./train_lora build/models/tiny-3.2.f32.bin -z build/llama3.tok "
                    "--objective ga --forget build/tt_forget.txt -o build/no_such.lora --resume");
    tt_expect_error("bad --targets", "./train_lora build/models/tiny-3.2.f32.bin -z build/llama3.tok --objective ga "
                    "--forget build/tt_forget.txt -o build/x.lora --targets q,z");
    tt_expect_error("rmu adapter above the rmu layer", "./train_lora build/models/tiny-3.2.f32.bin -z build/llama3.tok "
                    "--objective rmu --rmu-layer 0 --layers 0-1 --forget build/tt_forget.txt --retain build/tt_retain.txt -o build/x.lora");
    free_transformer(&t);
}
