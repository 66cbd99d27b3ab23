// bench.c -- `run bench`: how fast the engine runs one model file, next to
// the limits of the machine it runs on (`make bench` calls it;
// tests/bench.sh collects the results).
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
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <time.h>
#include <errno.h>
#include <sys/resource.h>
#include "run.h"
#include "bench.h"
#include "cli.h"

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
// decode repetition (bench_decode), so that each decode rate is compared with
// the bandwidth of the same moment (memory bandwidth drifts during a run). "triad" computes a = b + s*c (12 bytes per element:
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
// or int8 plus the fp32 scales; matrix_bytes), the norm weights, one
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
    printf(
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
    exit(EXIT_SUCCESS);
}

// What `run bench` was asked for.
typedef struct {
    const char* model_path;
    const char* csv_path;      // also write the CSV here, or NULL
    int reps, n_decode, bw_mib, gemm_size;
    int prefill[BENCH_MAX_PREFILL], n_prefill;
} BenchOpts;

// --prefill LIST: comma-separated prompt lengths, each >= 1
static void bench_parse_prefill(BenchOpts* o, const char* v) {
    o->n_prefill = 0;
    const char* p = v;
    while (1) {
        char num[16];
        size_t len = strcspn(p, ",");
        if (o->n_prefill == BENCH_MAX_PREFILL) die("--prefill takes at most %d lengths", BENCH_MAX_PREFILL);
        if (len == 0 || len >= sizeof(num)) die("--prefill expects lengths such as 128,512, got '%s'", v);
        memcpy(num, p, len);
        num[len] = '\0';
        o->prefill[o->n_prefill] = parse_int_arg("--prefill", num);
        if (o->prefill[o->n_prefill] < 1) die("--prefill lengths must be >= 1, got '%s'", v);
        o->n_prefill++;
        if (p[len] == '\0') break;
        p += len + 1;
    }
}

static void bench_parse(BenchOpts* o, int argc, char** argv) {
    *o = (BenchOpts){ .reps = 5, .n_decode = 32, .bw_mib = 256, .gemm_size = 2048, .prefill = {128, 512}, .n_prefill = 2 };
    for (int i = 1; i < argc; i++) {
        const char* a = argv[i];
        if (cli_is_help(a)) bench_usage();
        if (a[0] != '-') {
            if (o->model_path) die("bench: unexpected argument '%s' (one model file; see run bench --help)", a);
            o->model_path = a;
            continue;
        }
        const char* v = cli_value(argc, argv, &i);
        if (!strcmp(a, "--reps")) o->reps = parse_int_arg(a, v);
        else if (!strcmp(a, "--decode")) o->n_decode = parse_int_arg(a, v);
        else if (!strcmp(a, "--bw-mib")) o->bw_mib = parse_int_arg(a, v);
        else if (!strcmp(a, "--gemm")) o->gemm_size = parse_int_arg(a, v);
        else if (!strcmp(a, "--csv")) o->csv_path = v;
        else if (!strcmp(a, "--prefill")) bench_parse_prefill(o, v);
        else cli_unknown(a);
    }
    if (!o->model_path) die("bench needs a model file (run bench MODEL.bin; see run bench --help)");
    if (o->reps < 1 || o->reps > 10000) die("--reps must be in [1, 10000]");
    if (o->n_decode < 1) die("--decode must be >= 1");
    if (o->bw_mib < 1 || o->bw_mib > 65536) die("--bw-mib must be in [1, 65536]");
    if (o->gemm_size < 1 || o->gemm_size > 16384) die("--gemm must be in [1, 16384]");
    if (o->csv_path) {
        // fail now, not after minutes of measuring (written via FILE.tmp)
        char tmp[4096];
        snprintf(tmp, sizeof(tmp), "%s.tmp", o->csv_path);
        FILE* f = fopen(tmp, "w");
        if (!f) die("cannot write %s: %s", tmp, strerror(errno));
        fclose(f);
        remove(tmp);
    }
}

// Prompts: the whole prompt in one forward_batch call (chunks of batch_cap
// positions inside). tok_s (n_prefill,) gets each length's median tok/s.
static void bench_prefill(BenchTable* b, Transformer* t, const int* tokens, const BenchOpts* o, double* v,
                          double* tok_s) {
    for (int k = 0; k < o->n_prefill; k++) {
        for (int r = 0; r < o->reps; r++) {
            double t0 = bench_now();
            forward_batch(t, tokens, o->prefill[k], 0, NULL);
            v[r] = o->prefill[k] / (bench_now() - t0);
        }
        char name[48];
        snprintf(name, sizeof(name), "prefill_%d", o->prefill[k]);
        tok_s[k] = bench_samples(b, name, "tok/s", v, o->reps);
    }
}

// Decode: one token at a time through the KV cache, each repetition right
// after one read pass over the bandwidth array; the roofline fraction is
// taken per repetition (tok/s x bytes per token / the bandwidth just
// measured), and its median reported.
static void bench_decode(BenchTable* b, Transformer* t, const int* tokens, const BenchOpts* o, double* v) {
    int reps = o->reps, n_decode = o->n_decode;
    double bytes = bench_decode_bytes(&t->config, n_decode);
    size_t bw_n = (size_t)o->bw_mib * 1024 * 1024 / sizeof(float);
    float* bw_array = bench_array(bw_n, 1.0f);
    double* bw = xmalloc((size_t)reps * sizeof(double));
    double* frac = xmalloc((size_t)reps * sizeof(double));
    bench_read_pass(bw_array, bw_n); // warm-up
    for (int r = 0; r < reps; r++) {
        bw[r] = bench_read_pass(bw_array, bw_n);
        double t0 = bench_now();
        for (int i = 0; i < n_decode; i++) forward(t, tokens[i], i);
        v[r] = n_decode / (bench_now() - t0);
        frac[r] = v[r] * bytes / (bw[r] * 1e9);
    }
    free(bw_array);
    bench_samples(b, "decode", "tok/s", v, reps);
    bench_value(b, "decode_bytes_per_token", "B", round(bytes));
    bench_samples(b, "read_bw", "GB/s", bw, reps);
    bench_samples(b, "decode_roofline", "fraction", frac, reps);
    free(bw); free(frac);
}

// The other ceilings (triad bandwidth, sgemm, and for int8 the int8 GEMM),
// and each prompt's rate as a fraction of its GEMM ceiling.
static void bench_ceilings(BenchTable* b, Transformer* t, const BenchOpts* o, const double* prefill_tok_s) {
    const Config* c = &t->config;
    bench_triad(b, o->reps, (size_t)o->bw_mib);
    double sgemm_prefill = bench_gemm(b, c, o->reps, o->gemm_size, t->state.batch_cap);
    double gemm_ceiling = sgemm_prefill;
    if (c->weight_type == WEIGHT_Q8) gemm_ceiling = bench_q8gemm(b, c, o->reps, t->state.batch_cap, &t->state.q8);
    for (int k = 0; k < o->n_prefill; k++) {
        char name[48];
        double gflops = prefill_tok_s[k] * bench_prefill_flops(c, o->prefill[k]) / o->prefill[k] / 1e9;
        snprintf(name, sizeof(name), "prefill_%d_gflops", o->prefill[k]);
        bench_value(b, name, "GFLOP/s", gflops);
        snprintf(name, sizeof(name), "prefill_%d_gemm_frac", o->prefill[k]);
        bench_value(b, name, "fraction", gflops / gemm_ceiling);
    }
}

// The CSV on stdout, and in csv_path when given (atomically).
static void bench_output(const BenchTable* b, const char* weights, const char* model, const char* csv_path) {
    char* text = NULL;
    size_t text_len = 0;
    FILE* mem = open_memstream(&text, &text_len);
    if (!mem) die("bench: out of memory");
    bench_write_csv(mem, b, weights, model);
    fclose(mem);
    fwrite(text, 1, text_len, stdout);
    if (csv_path && write_file_atomic(csv_path, text, text_len) != 0) die("cannot write %s: %s", csv_path, strerror(errno));
    free(text);
}

int bench_main(int argc, char** argv) {
    BenchOpts o;
    bench_parse(&o, argc, argv);
    // the KV cache holds the longest run; build_transformer refuses more
    // than the model's maximum with a one-line error
    int ctx = o.n_decode;
    for (int i = 0; i < o.n_prefill; i++) if (o.prefill[i] > ctx) ctx = o.prefill[i];
    Transformer t;
    build_transformer(&t, o.model_path, ctx);
    const Config* c = &t.config;
    const char* weights = c->weight_type == WEIGHT_Q8 ? "int8" : "fp32";
    const char* model = strrchr(o.model_path, '/') ? strrchr(o.model_path, '/') + 1 : o.model_path;
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
    double* v = xmalloc((size_t)o.reps * sizeof(double));

    // the weights into the process, and a first prompt warms its paths
    for (int i = 0; i < (o.n_decode < 2 ? o.n_decode : 2); i++) forward(&t, tokens[i], i);
    forward_batch(&t, tokens, o.prefill[0], 0, NULL);

    double prefill_tok_s[BENCH_MAX_PREFILL];
    bench_prefill(&b, &t, tokens, &o, v, prefill_tok_s);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    bench_value(&b, "peak_rss", "MiB", round(ru.ru_maxrss / 1024.0));   // ru_maxrss is in KiB on Linux
    bench_decode(&b, &t, tokens, &o, v);
    bench_ceilings(&b, &t, &o, prefill_tok_s);
    bench_output(&b, weights, model, o.csv_path);
    free(v);
    free(tokens);
    free_transformer(&t);
    return 0;
}
