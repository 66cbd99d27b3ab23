// kernels.c -- the engine's numeric kernels: vector ops, the fp32 GEMM
// (OpenBLAS or plain C), and the int8 Q8_0 dot products and GEMM. Every
// SIMD kernel sits beside its plain C twin behind an #if, and equals it
// bit for bit where run.h says so (test_all checks it).
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef USE_BLAS
#include <cblas.h>
#endif
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h> // SIMD kernels, each behind its own #if with a plain C twin
#endif
#include "run.h"

// ----------------------------------------------------------------------------
// Vector kernels: norms, softmax, dot products, one head's attention

void rmsnorm(float* out, const float* x, const float* weight, int dim, float eps) {
    float ss = 0.0f;
    for (int j = 0; j < dim; j++) ss += x[j] * x[j];
    float rstd = 1.0f / sqrtf(ss / dim + eps);
    for (int j = 0; j < dim; j++) out[j] = weight[j] * (rstd * x[j]);
}

double cross_entropy(const float* logits, int n, int target) {
    // -log softmax(logits)[target], in double so long rows sum accurately
    float mx = logits[0];
    for (int i = 1; i < n; i++) if (logits[i] > mx) mx = logits[i];
    double sum = 0.0;
    for (int i = 0; i < n; i++) sum += exp((double)logits[i] - mx);
    return log(sum) + mx - logits[target];
}

void softmax(float* x, int n) {
    float max_val = x[0];
    for (int i = 1; i < n; i++) if (x[i] > max_val) max_val = x[i];
    float sum = 0.0f;
    for (int i = 0; i < n; i++) { x[i] = expf(x[i] - max_val); sum += x[i]; }
    for (int i = 0; i < n; i++) x[i] /= sum;
}

// fp32 dot product. The simd reduction lets the compiler keep several
// partial sums in vector registers (plain C cannot reorder floats).
static float dot_f32(const float* a, const float* b, int n) {
    float sum = 0.0f;
    #pragma omp simd reduction(+:sum)
    for (int j = 0; j < n; j++) sum += a[j] * b[j];
    return sum;
}

// Causal attention of one query head for n queries, as two matrix products
// (the prompt and training paths; decoding, n = 1, runs them as loops):
//   scores (n, n_keys) = q (n, hd) @ k^T / sqrt(hd), n_keys = pos0 + n
//   row i: softmax over keys start_i .. pos0 + i, exactly 0 elsewhere
//   out (n, hd) = probs @ v
// Query i sits at key index pos0 + i; start_i = 0, or with pos_in_seq (a
// packed training row: several sequences one after the other) the first key
// of its own sequence, pos0 + i - pos_in_seq[i]. q, k, v, out are rows of a
// wider matrix (strides ldq, ldkv, ldo: one head's slice). probs (n, n_keys)
// receives the probabilities (train_lora keeps them for the backward pass).
// The masked part of the product is computed and discarded: twice the work
// of the triangle, but as a GEMM, far faster than loops over the triangle.
// train_lora calls this same function, so its forward equals the engine's.
void attention_head(float* out, int ldo, float* probs, const float* q, int ldq, const float* k, const float* v,
                    int ldkv, int n, int pos0, const int* pos_in_seq, int hd) {
    int n_keys = pos0 + n;
    if (n == 1 && !pos_in_seq) {
        // decoding: one query, so the two products are matrix-vector
        // loops (gemm would pack, and the plain C one allocate, per call)
        float inv_sqrt = 1.0f / sqrtf((float)hd);
        for (int j = 0; j < n_keys; j++) probs[j] = dot_f32(q, k + (size_t)j * ldkv, hd) * inv_sqrt;
        softmax(probs, n_keys);
        for (int d = 0; d < hd; d++) out[d] = 0.0f;
        for (int j = 0; j < n_keys; j++) {
            const float* vj = v + (size_t)j * ldkv;
            float p = probs[j];
            #pragma omp simd
            for (int d = 0; d < hd; d++) out[d] += p * vj[d];
        }
        return;
    }
    gemm(0, 1, n, n_keys, hd, 1.0f / sqrtf((float)hd), q, ldq, k, ldkv, 0.0f, probs, n_keys);
    for (int i = 0; i < n; i++) {
        float* row = probs + (size_t)i * n_keys;
        int last = pos0 + i, start = pos_in_seq ? last - pos_in_seq[i] : 0;
        softmax(row + start, last - start + 1);
        for (int j = 0; j < start; j++) row[j] = 0.0f;
        for (int j = last + 1; j < n_keys; j++) row[j] = 0.0f;
    }
    gemm(0, 0, n, hd, n_keys, 1.0f, probs, n_keys, v, ldkv, 0.0f, out, ldo);
}

// ----------------------------------------------------------------------------
// fp32 GEMM: cblas_sgemm with OpenBLAS, else the portable GEMM below
// C (M,N) = alpha * op(A) @ op(B) + beta * C, row-major, exactly cblas_sgemm's
// contract, with op(A)[i][p] = trans_a ? A[p*lda+i] : A[i*lda+p] (likewise B).
//
// The naive loop (gemm_reference) does 2 flops per 2 loads and streams B
// through the cache once per row of C, so it runs at cache/memory speed.
// gemm_portable is the classic Goto/BLIS scheme instead, in plain C, which
// comes close to OpenBLAS on large shapes:
//
//   for jc in N step NC:                  (bounds the packed B block)
//     for pc in K step KC:
//       pack op(B)[pc:pc+kc, jc:jc+nc] -> Bp      all threads together (L3)
//       for each tile (ti, tj) of C (<= MC x NB), split among the threads:
//         pack op(A)[rows of ti, pc:pc+kc] -> Ap   this thread only (L2)
//         for jr in tj step NR:           B micro-panel (kc, NR): 16 KiB, stays in L1
//           for ir in ti step MR:         A micro-panel (kc, MR): streamed from L2
//             micro-kernel: C[ir:ir+MR, jr:jr+NR] (+)= Ap[ir] @ Bp[jr]
//
// Two special cases: with M <= MC (one tile row) each thread packs the B of
// its own tiles instead of sharing Bp (see gemm_portable), and M < MR reads
// B in place (gemm_small_m).
//
// Packing copies each micro-panel into the exact order the micro-kernel reads
// it (contiguous, zero-padded to MR/NR), so the kernel never sees strides,
// transposes or edges. The micro-kernel keeps an MR x NR block of C in
// registers for the whole K loop: per step p it loads NR floats of B and MR
// of A and does MR*NR multiply-adds, which is what makes it compute bound.
//
// GEMM_MR x GEMM_NR = 6 x 16: larger tiles were no faster with AVX-512, and
// this one fits the 16 vector registers of AVX2 (12 accumulators of 8
// floats). The kernel relies on the compiler vectorizing
// the j loop (`omp simd`; without it GCC fully unrolls the 16-wide loop into
// scalar code) and on fmaf being a single instruction (FP_FAST_FMAF, i.e.
// -mfma or -march=native); elsewhere a plain multiply-add is used, since a
// library fmaf call would be far slower than the rounding it saves.
#define GEMM_MR 6     // rows of C per micro-kernel call
#define GEMM_NR 16    // columns of C per micro-kernel call
#define GEMM_KC 256   // depth of one packed panel: Bp micro-panel = KC*NR*4 = 16 KiB (L1)
#define GEMM_MC 120   // max rows of a C tile (multiple of MR): Ap = MC*KC*4 = 120 KiB (L2)
#define GEMM_NB 256   // max columns of a C tile (multiple of NR): the unit of work
#define GEMM_NC 4096  // max columns of packed B: Bp = KC*NC*4 = 4 MiB (L3)
#define GEMM_PACK_COLS 64   // columns of B per packing work item (multiple of NR)
#ifdef FP_FAST_FMAF
#define GEMM_FMA(a, b, c) fmaf(a, b, c)
#else
#define GEMM_FMA(a, b, c) ((a) * (b) + (c))
#endif
// gemm work below this many flops stays on one thread (waking the team
// costs more than it saves)
#define GEMM_PAR_FLOPS 2e6

// The naive loop: the simplest statement of the contract, and the fallback
// when the packing buffers cannot be allocated. Rows of C are
// independent, so threads split them.
static void gemm_reference(int trans_a, int trans_b, int M, int N, int K, float alpha, const float* A, int lda,
                           const float* B, int ldb, float beta, float* C, int ldc) {
    #pragma omp parallel for schedule(static)
    for (int i = 0; i < M; i++) {
        float* c_row = C + (size_t)i * ldc;
        if (beta == 0.0f) for (int j = 0; j < N; j++) c_row[j] = 0.0f;
        else if (beta != 1.0f) for (int j = 0; j < N; j++) c_row[j] *= beta;
        if (!trans_b) {
            // C_i += alpha * sum_p a_ip * B_p   (B rows contiguous)
            for (int p = 0; p < K; p++) {
                float a_ip = alpha * (trans_a ? A[(size_t)p * lda + i] : A[(size_t)i * lda + p]);
                const float* b_row = B + (size_t)p * ldb;
                for (int j = 0; j < N; j++) c_row[j] += a_ip * b_row[j];
            }
        } else {
            // C_ij += alpha * dot(A_i, B_j)   (B stored as rows of length K)
            for (int j = 0; j < N; j++) {
                const float* b_row = B + (size_t)j * ldb;
                float sum = 0.0f;
                if (!trans_a) {
                    const float* a_row = A + (size_t)i * lda;
                    for (int p = 0; p < K; p++) sum += a_row[p] * b_row[p];
                } else {
                    for (int p = 0; p < K; p++) sum += A[(size_t)p * lda + i] * b_row[p];
                }
                c_row[j] += alpha * sum;
            }
        }
    }
}

// C block (mr, nr) at c = alpha * acc + beta * C. beta == 0 writes without
// reading C, so NaN garbage in an output buffer is overwritten, as in BLAS.
// (acc is not const: C before C23 will not pass float[][NR] as const float[][NR] silently)
static void gemm_store(float* c, int ldc, float acc[GEMM_MR][GEMM_NR], int mr, int nr, float alpha, float beta) {
    if (mr == GEMM_MR && nr == GEMM_NR) {   // full block: constant bounds, vector code
        for (int i = 0; i < GEMM_MR; i++) {
            float* ci = c + (size_t)i * ldc;
            if (beta == 0.0f) {
                #pragma omp simd
                for (int j = 0; j < GEMM_NR; j++) ci[j] = alpha * acc[i][j];
            } else {
                #pragma omp simd
                for (int j = 0; j < GEMM_NR; j++) ci[j] = alpha * acc[i][j] + beta * ci[j];
            }
        }
    } else {                                 // edge block of C: only the valid part
        for (int i = 0; i < mr; i++) {
            float* ci = c + (size_t)i * ldc;
            for (int j = 0; j < nr; j++) ci[j] = beta == 0.0f ? alpha * acc[i][j] : alpha * acc[i][j] + beta * ci[j];
        }
    }
}

// The micro-kernel: C[0:mr, 0:nr] (at c, row stride ldc) = alpha * a @ b + beta * C
// a: (kc, MR) packed A micro-panel, a[p*MR + i] = op(A)[i][p]
// b: (kc, NR) packed B micro-panel, b[p*NR + j] = op(B)[p][j]
// Always computes the full MR x NR block (padding is zeros); stores mr x nr.
static void gemm_micro(int kc, const float* restrict a, const float* restrict b, float* c, int ldc, int mr, int nr,
                       float alpha, float beta) {
    float acc[GEMM_MR][GEMM_NR] = {{0.0f}};   // (MR, NR) block of C: lives in registers
#if defined(__GNUC__)
    // ask for the C rows now: with K > KC they were evicted since the last
    // panel, and the miss would otherwise stall the store at the end
    for (int i = 0; i < mr; i++) __builtin_prefetch(c + (size_t)i * ldc, 1);
#endif
    for (int p = 0; p < kc; p++, a += GEMM_MR, b += GEMM_NR) {
        for (int i = 0; i < GEMM_MR; i++) {
            #pragma omp simd
            for (int j = 0; j < GEMM_NR; j++) acc[i][j] = GEMM_FMA(a[i], b[j], acc[i][j]);
        }
    }
    gemm_store(c, ldc, acc, mr, nr, alpha, beta);
}

// Packing A and packing B are one operation: cut a kc-deep slice of an
// operand X into ceil(n/w) micro-panels of w lines, each (kc, w):
// dst[(q*kc + p)*w + r] = X[r0 + q*w + r][p0 + p], zero past line n.
// For A, X = op(A) and w = MR (lines are rows of C); for B, X = op(B)^T and
// w = NR (lines are columns of C). X[r][p] is src[r*ld + p] when the depth p
// is contiguous (A as is, B transposed), else src[p*ld + r]. Inline, so
// that each call has a constant w: its copy loops then vectorize.
static inline void gemm_pack(float* restrict dst, const float* src, int ld, int p_contiguous, int w, int r0, int n,
                             int p0, int kc) {
    int np = (n + w - 1) / w;
    if (p_contiguous) {
        // a real transpose, done in blocks of 16 values of p so that each
        // cache line read (16 floats of one line of X) is used completely
        // while it is in L1. Lines of X are often a power-of-two bytes apart,
        // so reading many of them in lockstep would make their cache lines
        // collide in the same L1 sets.
        for (int q = 0; q < np; q++) {
            float* d = dst + (size_t)q * kc * w;
            int nr = n - q * w < w ? n - q * w : w;
            const float* s = src + (size_t)(r0 + q * w) * ld + p0;
            for (int pb = 0; pb < kc; pb += 16) {
                int pe = kc - pb < 16 ? kc : pb + 16;
                for (int r = 0; r < nr; r++)
                    for (int p = pb; p < pe; p++) d[p * w + r] = s[(size_t)r * ld + p];
            }
            for (int p = 0; p < kc; p++)
                for (int r = nr; r < w; r++) d[p * w + r] = 0.0f;
        }
    } else {
        // lines are contiguous: p outermost reads src row p as one run of n
        // floats, split into the panels. (One panel at a time would read w
        // floats per row, a row apart: a pattern the prefetcher does not follow.)
        for (int p = 0; p < kc; p++) {
            const float* s = src + (size_t)(p0 + p) * ld + r0;
            for (int q = 0; q < np; q++) {
                float* d = dst + ((size_t)q * kc + p) * w;
                int nr = n - q * w < w ? n - q * w : w;
                if (nr == w) {
                    for (int r = 0; r < w; r++) d[r] = s[q * w + r];   // constant trip once inlined: vector copy
                } else {
                    for (int r = 0; r < nr; r++) d[r] = s[q * w + r];
                    for (int r = nr; r < w; r++) d[r] = 0.0f;
                }
            }
        }
    }
}

// M < MR (a few tokens): packing B would cost as much as the multiply (each
// element of B is used only M times) and an MR-row kernel would waste most of
// its work on padding, so B is read in place. A is copied once into At.
// Threads split the columns of C into one wide chunk each: reading B in
// long runs is what keeps this memory-bound case at memory speed.
#define GEMM_SMALL_W 4096   // max columns per chunk: acc (M, w) <= 5*4096*4 = 80 KiB (L2)
static int gemm_small_m(int trans_a, int trans_b, int M, int N, int K, float alpha, const float* A, int lda,
                        const float* B, int ldb, float beta, float* C, int ldc) {
    int par = 2.0 * M * N * K > GEMM_PAR_FLOPS, nthr = par ? engine_threads() : 1;
    int w = (N + nthr - 1) / nthr;                  // chunk width: a multiple of NR, at most SMALL_W
    w = (w + GEMM_NR - 1) / GEMM_NR * GEMM_NR;
    if (w > GEMM_SMALL_W) w = GEMM_SMALL_W;
    int nchunks = (N + w - 1) / w;
    float* At = malloc(((size_t)M * K + (size_t)nthr * M * w) * sizeof(float));   // (M, K) op(A), rows contiguous
    if (!At) return 0;
    float* accs = At + (size_t)M * K;               // (nthr, M, w) accumulators, one block per thread
    for (int i = 0; i < M; i++)
        for (int p = 0; p < K; p++) At[(size_t)i * K + p] = trans_a ? A[(size_t)p * lda + i] : A[(size_t)i * lda + p];
    #pragma omp parallel for schedule(static) if (par)
    for (int q = 0; q < nchunks; q++) {
        int j0 = q * w, nw = N - j0 < w ? N - j0 : w;
        float* acc = accs + (size_t)engine_thread_id() * M * w;   // (M, nw) block of C, row stride w
        if (!trans_b) {
            // rows of B are contiguous: C_i += a_ip * B_p, streaming B row by row
            for (int i = 0; i < M; i++)
                for (int j = 0; j < nw; j++) acc[(size_t)i * w + j] = 0.0f;
            for (int p = 0; p < K; p++) {
                const float* b = B + (size_t)p * ldb + j0;
                for (int i = 0; i < M; i++) {
                    float a = At[(size_t)i * K + p];
                    float* acc_i = acc + (size_t)i * w;
                    #pragma omp simd
                    for (int j = 0; j < nw; j++) acc_i[j] = GEMM_FMA(a, b[j], acc_i[j]);
                }
            }
        } else {
            // columns of op(B) are rows of B: C_ij = dot(At_i, B_j), with 16
            // independent partial sums so the dot product vectorizes (C may
            // not reorder a single float sum by itself)
            for (int j = 0; j < nw; j++) {
                const float* b = B + (size_t)(j0 + j) * ldb;
                for (int i = 0; i < M; i++) {
                    const float* a = At + (size_t)i * K;
                    float part[16] = {0.0f};
                    int p = 0;
                    for (; p + 16 <= K; p += 16) {
                        #pragma omp simd
                        for (int l = 0; l < 16; l++) part[l] = GEMM_FMA(a[p + l], b[p + l], part[l]);
                    }
                    float sum = 0.0f;
                    for (; p < K; p++) sum = GEMM_FMA(a[p], b[p], sum);
                    for (int l = 0; l < 16; l++) sum += part[l];
                    acc[(size_t)i * w + j] = sum;
                }
            }
        }
        for (int i = 0; i < M; i++) {
            float* c = C + (size_t)i * ldc + j0;
            const float* acc_i = acc + (size_t)i * w;
            if (beta == 0.0f) for (int j = 0; j < nw; j++) c[j] = alpha * acc_i[j];
            else for (int j = 0; j < nw; j++) c[j] = alpha * acc_i[j] + beta * c[j];
        }
    }
    free(At);
    return 1;
}

void gemm_portable(int trans_a, int trans_b, int M, int N, int K, float alpha, const float* A, int lda,
                   const float* B, int ldb, float beta, float* C, int ldc) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0 || alpha == 0.0f) {   // no product: C = beta * C (A and B are not read)
        for (int i = 0; i < M; i++)
            for (int j = 0; j < N; j++) {
                float* cij = C + (size_t)i * ldc + j;
                *cij = beta == 0.0f ? 0.0f : beta * *cij;
            }
        return;
    }
    if (M < GEMM_MR) {
        if (!gemm_small_m(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc))
            gemm_reference(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    int kc_max = K < GEMM_KC ? K : GEMM_KC, nc_max = N < GEMM_NC ? N : GEMM_NC;
    int pm = (M + GEMM_MR - 1) / GEMM_MR;                     // A micro-panels over all of M
    int mt = (pm + GEMM_MC / GEMM_MR - 1) / (GEMM_MC / GEMM_MR);   // tile rows: pm split evenly in mt
    // With a single tile row (M <= MC: a short prompt, a LoRA rank) each B
    // panel is used by one thread only: each thread then packs the columns
    // of its own tile into its Bt just before using them (still in L2), and
    // no shared Bp is needed.
    int shared_b = mt > 1;
    int par = 2.0 * M * N * K > GEMM_PAR_FLOPS, nthr = par ? engine_threads() : 1;
    // One allocation per call (not per kernel call): the shared Bp, then Ap and Bt per thread.
    size_t bp_floats = shared_b ? (size_t)kc_max * ((nc_max + GEMM_NR - 1) / GEMM_NR * GEMM_NR) : 0;   // (NC/NR, kc, NR)
    size_t ap_floats = (size_t)GEMM_MC * kc_max;                                         // (MC/MR, kc, MR)
    size_t bt_floats = shared_b ? 0 : (size_t)kc_max * GEMM_NB;                          // (NB/NR, kc, NR)
    size_t bytes = (bp_floats + (size_t)nthr * (ap_floats + bt_floats)) * sizeof(float);
    float* buf = aligned_alloc(64, (bytes + 63) / 64 * 64);   // 64: panels start on cache lines
    if (!buf) { gemm_reference(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc); return; }
    float* Bp = buf;
    #pragma omp parallel if (par)
    {
        // (a team smaller than nthr only leaves buffers unused)
        float* Ap = buf + bp_floats + (size_t)engine_thread_id() * (ap_floats + bt_floats);
        float* Bt = Ap + ap_floats;
        for (int jc = 0; jc < N; jc += GEMM_NC) {
            int nc = N - jc < GEMM_NC ? N - jc : GEMM_NC;
            int pn = (nc + GEMM_NR - 1) / GEMM_NR;                          // B micro-panels in this block
            int nt = (pn + GEMM_NB / GEMM_NR - 1) / (GEMM_NB / GEMM_NR);    // tile columns
            // equal tiles, a multiple of the thread count when possible, so a
            // static split of the tiles is also an even split of the work
            while ((mt * nt) % nthr != 0 && nt < pn) nt++;
            for (int pc = 0; pc < K; pc += GEMM_KC) {
                int kc = K - pc < GEMM_KC ? K - pc : GEMM_KC;
                float beta_pc = pc == 0 ? beta : 1.0f;   // later K panels accumulate
                if (shared_b) {
                    // in chunks of GEMM_PACK_COLS columns (whole panels)
                    #pragma omp for schedule(static)   // (implicit barrier: Bp complete)
                    for (int j = 0; j < nc; j += GEMM_PACK_COLS) {
                        int n = nc - j < GEMM_PACK_COLS ? nc - j : GEMM_PACK_COLS;
                        gemm_pack(Bp + (size_t)j * kc, B, ldb, trans_b, GEMM_NR, jc + j, n, pc, kc);
                    }
                }
                // tiles are numbered row-major, so a thread's consecutive tiles
                // mostly share a tile row and Ap is packed once per tile row
                int packed_ti = -1;
                #pragma omp for schedule(static) collapse(2)   // (implicit barrier: Bp free to refill)
                for (int ti = 0; ti < mt; ti++) {
                    for (int tj = 0; tj < nt; tj++) {
                        int qa0 = (int)((long)ti * pm / mt), qa1 = (int)((long)(ti + 1) * pm / mt);
                        int qb0 = (int)((long)tj * pn / nt), qb1 = (int)((long)(tj + 1) * pn / nt);
                        if (packed_ti != ti) {
                            int i = qa0 * GEMM_MR, m = qa1 * GEMM_MR < M ? (qa1 - qa0) * GEMM_MR : M - i;
                            gemm_pack(Ap, A, lda, !trans_a, GEMM_MR, i, m, pc, kc);
                            packed_ti = ti;
                        }
                        const float* b_tile = Bp + (size_t)qb0 * kc * GEMM_NR;   // panel qb0 of this tile
                        if (!shared_b) {
                            int j = qb0 * GEMM_NR, n = qb1 * GEMM_NR < nc ? (qb1 - qb0) * GEMM_NR : nc - j;
                            gemm_pack(Bt, B, ldb, trans_b, GEMM_NR, jc + j, n, pc, kc);
                            b_tile = Bt;
                        }
                        for (int qb = qb0; qb < qb1; qb++) {
                            int j = qb * GEMM_NR, nr = nc - j < GEMM_NR ? nc - j : GEMM_NR;
                            const float* b = b_tile + (size_t)(qb - qb0) * kc * GEMM_NR;
                            for (int qa = qa0; qa < qa1; qa++) {
                                int i = qa * GEMM_MR, mr = M - i < GEMM_MR ? M - i : GEMM_MR;
                                gemm_micro(kc, Ap + (size_t)(qa - qa0) * kc * GEMM_MR, b,
                                           C + (size_t)i * ldc + jc + j, ldc, mr, nr, alpha, beta_pc);
                            }
                        }
                    }
                }
            }
        }
    }
    free(buf);
}

#ifdef USE_BLAS
char* openblas_get_corename(void); // OpenBLAS's own API, not in cblas.h
int openblas_get_parallel(void);   // 0 sequential, 1 pthreads, 2 OpenMP
#endif

const char* engine_build_info(void) {
#ifdef USE_BLAS
    static char info[256];
    int par = openblas_get_parallel();
    const char* core = openblas_get_corename();
    snprintf(info, sizeof(info), "OpenBLAS (core %s, %s threads), %d threads%s%s", core,
             par == 2 ? "OpenMP" : par == 1 ? "pthreads" : "no",
             engine_threads(),
             // a pthreads OpenBLAS spins beside our OpenMP threads
             par == 1 ? "; slow: install libopenblas0-openmp or set OMP_WAIT_POLICY=passive" : "",
             // an OpenBLAS that mis-detects the CPU as Prescott runs far slower GEMMs
             !strcmp(core, "Prescott") ? "; slow core: set OPENBLAS_CORETYPE=SkylakeX (AVX-512) or Haswell (AVX2)" : "");
    return info;
#else
    static char info[64];
    snprintf(info, sizeof(info), "plain C GEMM, %d threads", engine_threads());
    return info;
#endif
}

void gemm(int trans_a, int trans_b, int M, int N, int K, float alpha, const float* A, int lda,
          const float* B, int ldb, float beta, float* C, int ldc) {
#ifdef USE_BLAS
    cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
                M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
#else
    gemm_portable(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
#endif
}


// ----------------------------------------------------------------------------
// Int8 (Q8_0): quantization, dot products, and matrix-matrix products

// Q8_0 quantization of one group of gs values: scale = max|x| / 127 and
// q = round(x / scale), written as x * (1 / scale). Returns the scale.
//
// A NaN or Inf value (a model file with such weights, an overflow) never
// reaches the int8 cast (undefined behaviour): the group's scale becomes NaN
// instead, so its dot products are NaN as in the fp32 path.
float quantize_group_portable(int8_t* q, const float* x, int gs) {
    float xmax = 0.0f, poison = 0.0f;
    for (int j = 0; j < gs; j++) {
        float a = fabsf(x[j]);
        if (a > xmax) xmax = a;
        poison += x[j] * 0.0f; // NaN when some x is NaN or Inf
    }
    float scale = xmax / 127.0f;
    float inv = scale > 0.0f && isfinite(scale) ? 1.0f / scale : 0.0f;
    for (int j = 0; j < gs; j++) q[j] = (int8_t)fmaxf(-127.0f, fminf(127.0f, roundf(x[j] * inv)));
    return scale + poison;
}

#if defined(__AVX512F__)
// roundf (halves away from zero) of 16 floats, exactly: t - trunc(t) is exact
// in float, so comparing its magnitude with 0.5 decides the rounding without
// the double rounding of trunc(t + 0.5).
static inline __m512 round_half_away_avx512(__m512 t) {
    __m512 whole = _mm512_roundscale_ps(t, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    __m512 frac = _mm512_abs_ps(_mm512_sub_ps(t, whole));
    __mmask16 up = _mm512_cmp_ps_mask(frac, _mm512_set1_ps(0.5f), _CMP_GE_OQ);
    __m512 one = _mm512_or_ps(_mm512_set1_ps(1.0f), _mm512_and_ps(t, _mm512_set1_ps(-0.0f))); // +-1 with t's sign
    return _mm512_mask_add_ps(whole, up, whole, one);
}

// (int8_t)fmaxf(-127, fminf(127, roundf(t))) for 16 floats, as int32 lanes.
// vminps returns its second operand when the first is NaN, as fminf does.
static inline __m512i quantize_value_avx512(__m512 t) {
    __m512 r = round_half_away_avx512(t);
    r = _mm512_max_ps(_mm512_min_ps(r, _mm512_set1_ps(127.0f)), _mm512_set1_ps(-127.0f));
    return _mm512_cvttps_epi32(r);
}

// quantize_group_portable, 16 lanes at a time (gs a multiple of 16); the
// same scale and the same bytes. The max and the poison sum do not depend on
// their order (a max; a sum of zeros or NaN).
static float quantize_group_avx512(int8_t* q, const float* x, int gs) {
    __m512 vmax = _mm512_setzero_ps(), vpoison = _mm512_setzero_ps();
    for (int j = 0; j < gs; j += 16) {
        __m512 v = _mm512_loadu_ps(x + j);
        vmax = _mm512_max_ps(_mm512_abs_ps(v), vmax); // NaN lanes keep the old max, as "a > xmax" does
        vpoison = _mm512_add_ps(vpoison, _mm512_mul_ps(v, _mm512_setzero_ps()));
    }
    float scale = _mm512_reduce_max_ps(vmax) / 127.0f;
    float poison = _mm512_reduce_add_ps(vpoison);
    __m512 inv = _mm512_set1_ps(scale > 0.0f && isfinite(scale) ? 1.0f / scale : 0.0f);
    for (int j = 0; j < gs; j += 16) {
        __m512i r = quantize_value_avx512(_mm512_mul_ps(_mm512_loadu_ps(x + j), inv));
        _mm_storeu_si128((__m128i*)(q + j), _mm512_cvtepi32_epi8(r));
    }
    return scale + poison;
}
#endif

float quantize_group(int8_t* q, const float* x, int gs) {
#if defined(__AVX512F__)
    if (gs % 16 == 0) return quantize_group_avx512(q, x, gs);
#endif
    return quantize_group_portable(q, x, gs);
}

// Q8_0 quantization of activations, row by row: x (n, cols) -> q (n, cols),
// s (n, cols/gs).
static void quantize_rows(int8_t* q, float* s, const float* x, int n, int cols, int gs) {
    int groups = cols / gs;
    for (int i = 0; i < n; i++)
        for (int g = 0; g < groups; g++) {
            size_t off = (size_t)i * cols + (size_t)g * gs;
            s[(size_t)i * groups + g] = quantize_group(q + off, x + off, gs);
        }
}

// One Q8_0 dot product: int32 sums per group, scaled once per group. This is
// the portable reference; dot_q8 below may be a SIMD version of it.
float dot_q8_portable(const int8_t* wq, const float* ws, const int8_t* xq, const float* xs, int cols, int gs) {
    float sum = 0.0f;
    for (int g = 0; g < cols / gs; g++) {
        int32_t acc = 0;
        const int8_t* a = wq + (size_t)g * gs;
        const int8_t* b = xq + (size_t)g * gs;
        #pragma omp simd reduction(+:acc)
        for (int j = 0; j < gs; j++) acc += (int32_t)a[j] * (int32_t)b[j];
        sum += (float)acc * ws[g] * xs[g];
    }
    return sum;
}

#if defined(__AVX2__) && defined(__FMA__)
// AVX2: 32 int8 products per instruction. maddubs multiplies unsigned by
// signed bytes, so |a| goes in as the unsigned operand and a's sign is moved
// onto b (sign_epi8); pairs sum to int16 without overflow since |a|,|b| <= 127.
// Each group's int32 lanes are scaled and accumulated in float lanes, and
// summed across lanes once at the end.
static float dot_q8_avx2(const int8_t* wq, const float* ws, const int8_t* xq, const float* xs, int cols, int gs) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc = _mm256_setzero_ps();
    for (int g = 0; g < cols / gs; g++) {
        __m256i sum32 = _mm256_setzero_si256();
        for (int j = 0; j < gs; j += 32) {
            __m256i a = _mm256_loadu_si256((const __m256i*)(wq + (size_t)g * gs + j));
            __m256i b = _mm256_loadu_si256((const __m256i*)(xq + (size_t)g * gs + j));
            __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a));
            sum32 = _mm256_add_epi32(sum32, _mm256_madd_epi16(pairs, ones));
        }
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum32), _mm256_set1_ps(ws[g] * xs[g]), acc);
    }
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
enum { dot_q8_has_avx512 = 1 };
// AVX-512 VNNI: 64 products per vpdpbusd, half the instructions per weight
// byte of AVX2, so that decoding on few cores stays memory bound rather
// than compute bound. As in AVX2, |w| is the unsigned operand and x takes
// w's sign (a masked negation: AVX-512 has no vpsignb). Each load also
// prefetches the weight bytes 4 KiB ahead (past a matrix's end this only
// prefetches, it never faults), which raises decode speed.
#define DOT_Q8_PREFETCH 4096
static float dot_q8_avx512(const int8_t* wq, const float* ws, const int8_t* xq, const float* xs, int cols, int gs) {
    __m512 acc = _mm512_setzero_ps();
    for (int g = 0; g < cols / gs; g++) {
        __m512i sum32 = _mm512_setzero_si512();
        for (int j = 0; j < gs; j += 64) {
            _mm_prefetch((const char*)(wq + (size_t)g * gs + j + DOT_Q8_PREFETCH), _MM_HINT_T0);
            __m512i a = _mm512_loadu_si512(wq + (size_t)g * gs + j);
            __m512i b = _mm512_loadu_si512(xq + (size_t)g * gs + j);
            __m512i signed_b = _mm512_mask_sub_epi8(b, _mm512_movepi8_mask(a), _mm512_setzero_si512(), b);
            sum32 = _mm512_dpbusd_epi32(sum32, _mm512_abs_epi8(a), signed_b);
        }
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum32), _mm512_set1_ps(ws[g] * xs[g]), acc);
    }
    return _mm512_reduce_add_ps(acc);
}
#else
enum { dot_q8_has_avx512 = 0 };
#endif

float dot_q8(const int8_t* wq, const float* ws, const int8_t* xq, const float* xs, int cols, int gs) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    if (gs % 64 == 0) return dot_q8_avx512(wq, ws, xq, xs, cols, gs);
#endif
#if defined(__AVX2__) && defined(__FMA__)
    if (gs % 32 == 0) return dot_q8_avx2(wq, ws, xq, xs, cols, gs);
#endif
    return dot_q8_portable(wq, ws, xq, xs, cols, gs);
}

// Prefill: one weight row against four quantized input rows (xq: (4, cols),
// xs: (4, cols/gs)), out[t] = dot_q8 of row t. Decoding reads each weight
// once per token and is bandwidth bound; a prompt reuses it, so here the
// weight bytes are loaded, and their signs taken, once for four inputs.
#if defined(__AVX2__) && defined(__FMA__)
static void dot_q8_x4_avx2(float* out, const int8_t* wq, const float* ws, const int8_t* xq, const float* xs,
                           int cols, int gs) {
    int groups = cols / gs;
    __m256 acc[4];
    for (int t = 0; t < 4; t++) acc[t] = _mm256_setzero_ps();
    for (int g = 0; g < groups; g++) {
        __m256i sum32[4];
        for (int t = 0; t < 4; t++) sum32[t] = _mm256_setzero_si256();
        for (int j = 0; j < gs; j += 32) {
            __m256i a = _mm256_loadu_si256((const __m256i*)(wq + (size_t)g * gs + j));
            __m256i abs_a = _mm256_sign_epi8(a, a);
            for (int t = 0; t < 4; t++) {
                __m256i b = _mm256_loadu_si256((const __m256i*)(xq + (size_t)t * cols + (size_t)g * gs + j));
                __m256i signed_b = _mm256_sign_epi8(b, a);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
                // VNNI: the four u8 x s8 products of each int32 lane summed in one instruction
                sum32[t] = _mm256_dpbusd_epi32(sum32[t], abs_a, signed_b);
#else
                __m256i pairs = _mm256_maddubs_epi16(abs_a, signed_b);
                sum32[t] = _mm256_add_epi32(sum32[t], _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
#endif
            }
        }
        // the same int32 lanes as dot_q8_avx2, scaled in the same order:
        // every result equals dot_q8's bit for bit
        for (int t = 0; t < 4; t++)
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum32[t]), _mm256_set1_ps(ws[g] * xs[(size_t)t * groups + g]), acc[t]);
    }
    for (int t = 0; t < 4; t++) {
        __m128 lo = _mm_add_ps(_mm256_castps256_ps128(acc[t]), _mm256_extractf128_ps(acc[t], 1));
        lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
        lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
        out[t] = _mm_cvtss_f32(lo);
    }
}
#endif

void dot_q8_x4(float* out, const int8_t* wq, const float* ws, const int8_t* xq, const float* xs, int cols, int gs) {
#if defined(__AVX2__) && defined(__FMA__)
    // (with AVX-512 VNNI dot_q8 is the 512-bit kernel, whose sums these
    // 256-bit lanes would not reproduce: four calls instead; that build's
    // matmul takes the GEMM from four rows on, so this is rarely called)
    if (gs % 32 == 0 && !(dot_q8_has_avx512 && gs % 64 == 0)) { dot_q8_x4_avx2(out, wq, ws, xq, xs, cols, gs); return; }
#endif
    int groups = cols / gs;
    for (int t = 0; t < 4; t++) out[t] = dot_q8(wq, ws, xq + (size_t)t * cols, xs + (size_t)t * groups, cols, gs);
}

// ---- Int8 matrix-matrix products ------------------------------------------
// Prompts and training multiply many rows of x by the same weights. matmul's
// int8 path for a few rows (below) reads a weight row once per four input rows; matmul_q8
// instead packs Q8_NR = 32 weight rows ("a panel") so that one 64-byte load
// holds 4 consecutive k of 16 rows, and AVX-512 VNNI's vpdpbusd multiplies it
// with 4 bytes of one input row, broadcast: 64 multiply-adds per instruction
// into 16 int32 sums. A micro-kernel keeps Q8_MR x Q8_NR = 6 x 32 outputs in
// registers, as int32 sums for the current group and as floats across groups.
// At the end of each group of gs k every sum becomes float once:
//
//     y = fma(acc_G, ws_G * xs_G, ... fma(acc_2, ws_2 * xs_2, fma(acc_1, ws_1 * xs_1, y0)))
//
// with acc_g the exact int32 dot product of group g (|acc| <= gs * 127^2 <
// 2^24, so the conversion is exact too) and y0 = 0, or y's old value when
// accumulating. matmul_q8_portable computes the same expression in plain C,
// and test_all compares the two bit for bit.
//
// vpdpbusd multiplies unsigned by signed bytes: the panel stores w + 128 (the
// byte w ^ 0x80) and each group's int32 sum starts at -128 * sum(x) of that
// group, which cancels the offset exactly.
//
// Transposed (training's dx = dy W): the sum now runs down W's columns, across
// its quantization groups (each row has its own scale per group of columns),
// so the panel holds W^T requantized: each run of gs rows of a column gets
// its own scale, max|s*q| / 127, exactly as quantize_group would give from the
// dequantized values. This second rounding is the price of int8 arithmetic in
// the backward pass (its size is measured in test_all).
//
// The k dimension is cut in blocks of kc (Q8Scratch.kc): x's block is
// quantized (all threads), then each thread packs its panels' block and runs
// the micro-kernel over all rows of x. Blocks after the first continue the
// fma chain from y, so the result does not depend on kc.
#define Q8_MR 6     // rows of x per micro-kernel call
#define Q8_NR 32    // weight rows (outputs) per packed panel: two 16-lane vectors
#define Q8_KC 4096  // default k block: a panel is Q8_NR * Q8_KC = 128 KiB (L2)
#define Q8_GEMM_MIN_ROWS 4 // matmul takes the GEMM from this many rows of x

int matmul_q8_fast(int rows, int gs, int trans) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    return gs > 0 && gs % 4 == 0 && (!trans || (gs % 32 == 0 && rows % gs == 0));
#else
    (void)rows; (void)gs; (void)trans;
    return 0;
#endif
}

// Every buffer of the scratch, their sum in sc->bytes; with dry != 0 nothing
// is allocated, only counted (q8_scratch_bytes).
static void q8_scratch_setup(Q8Scratch* sc, int n_cap, int max_cols, int gs, int dry) {
    memset(sc, 0, sizeof(*sc));
    sc->n_cap = n_cap;
    sc->gs = gs;
    sc->max_cols = max_cols;
    int kc = Q8_KC / gs * gs;
    if (kc < gs) kc = gs;
    if (kc > max_cols / gs * gs) kc = max_cols / gs * gs;
    sc->kc = kc;
    sc->n_threads = engine_threads();
    size_t n = n_cap, threads = sc->n_threads;
    // xq/xs serve both paths: the dot products take whole rows (n, max_cols),
    // the GEMM one k block at a time (n, kc), kc <= max_cols
    sc->xq = xcalloc_counted(&sc->bytes, dry, n * max_cols, 1);
    sc->xs = xcalloc_counted(&sc->bytes, dry, n * (max_cols / gs), sizeof(float));
    if (matmul_q8_fast(0, gs, 0)) {
        sc->xcorr = xcalloc_counted(&sc->bytes, dry, n * (kc / gs), sizeof(int32_t));
        sc->panels = xcalloc_counted(&sc->bytes, dry, threads * Q8_NR * kc, 1);
        sc->panel_scales = xcalloc_counted(&sc->bytes, dry, threads * Q8_NR * (kc / gs), sizeof(float));
        sc->pack_tmp = xcalloc_counted(&sc->bytes, dry, threads * Q8_NR * gs, sizeof(float));
    }
}

void q8_scratch_init(Q8Scratch* sc, int n_cap, int max_cols, int gs) { q8_scratch_setup(sc, n_cap, max_cols, gs, 0); }

size_t q8_scratch_bytes(int n_cap, int max_cols, int gs) {
    Q8Scratch sc;
    q8_scratch_setup(&sc, n_cap, max_cols, gs, 1);
    return sc.bytes;
}

void q8_scratch_free(Q8Scratch* sc) {
    free(sc->xq); free(sc->xs); free(sc->xcorr); free(sc->panels); free(sc->panel_scales); free(sc->pack_tmp);
    memset(sc, 0, sizeof(*sc));
}

// The reference: every output as the fma chain above. In the transposed case
// W^T's requantized column groups are built one at a time with
// quantize_group_portable (tmp: (gs,) floats, tq: (gs,) bytes).
void matmul_q8_portable(float* y, const float* x, const Matrix* w, int n, int trans, int accumulate) {
    int gs = w->group_size, gpr = w->cols / gs; // scales per weight row
    int K = trans ? w->rows : w->cols, M = trans ? w->cols : w->rows, groups = K / gs;
    int8_t* xq = xmalloc((size_t)K);
    float* xs = xmalloc((size_t)groups * sizeof(float));
    float* tmp = xmalloc((size_t)gs * sizeof(float));
    int8_t* tq = xmalloc((size_t)gs);
    for (int i = 0; i < n; i++) {
        quantize_rows(xq, xs, x + (size_t)i * K, 1, K, gs);
        for (int j = 0; j < M; j++) {
            float sum = accumulate ? y[(size_t)i * M + j] : 0.0f;
            for (int g = 0; g < groups; g++) {
                const int8_t* wq;
                float ws;
                if (!trans) {
                    wq = w->q + (size_t)j * K + (size_t)g * gs;
                    ws = w->s[(size_t)j * gpr + g];
                } else { // column j of W, rows g*gs .. g*gs+gs-1, requantized
                    for (int o = 0; o < gs; o++) {
                        size_t row = (size_t)g * gs + o;
                        tmp[o] = w->s[row * gpr + j / gs] * (float)w->q[row * w->cols + j];
                    }
                    ws = quantize_group_portable(tq, tmp, gs);
                    wq = tq;
                }
                int32_t acc = 0;
                for (int k = 0; k < gs; k++) acc += (int32_t)wq[k] * (int32_t)xq[(size_t)g * gs + k];
                sum = fmaf((float)acc, ws * xs[g], sum);
            }
            y[(size_t)i * M + j] = sum;
        }
    }
    free(xq); free(xs); free(tmp); free(tq);
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// 16 x 16 dwords: out[c] lane i = rows[i] lane c (unpack pairs, then quads,
// then 128-bit lanes twice).
static void transpose_16x16_epi32(__m512i out[16], const __m512i rows[16]) {
    __m512i t[16], u[16], v[16];
    for (int R = 0; R < 16; R += 4) {
        t[R] = _mm512_unpacklo_epi32(rows[R], rows[R + 1]);
        t[R + 1] = _mm512_unpackhi_epi32(rows[R], rows[R + 1]);
        t[R + 2] = _mm512_unpacklo_epi32(rows[R + 2], rows[R + 3]);
        t[R + 3] = _mm512_unpackhi_epi32(rows[R + 2], rows[R + 3]);
        // u[R + m], lane L: column 4L + m of rows R .. R+3
        u[R] = _mm512_unpacklo_epi64(t[R], t[R + 2]);
        u[R + 1] = _mm512_unpackhi_epi64(t[R], t[R + 2]);
        u[R + 2] = _mm512_unpacklo_epi64(t[R + 1], t[R + 3]);
        u[R + 3] = _mm512_unpackhi_epi64(t[R + 1], t[R + 3]);
    }
    for (int m = 0; m < 4; m++) {
        v[m] = _mm512_shuffle_i32x4(u[m], u[m + 4], 0x88);          // lanes 0, 2 of rows 0-3 and 4-7
        v[m + 4] = _mm512_shuffle_i32x4(u[m], u[m + 4], 0xdd);      // lanes 1, 3
        v[m + 8] = _mm512_shuffle_i32x4(u[m + 8], u[m + 12], 0x88); // the same for rows 8-15
        v[m + 12] = _mm512_shuffle_i32x4(u[m + 8], u[m + 12], 0xdd);
    }
    for (int m = 0; m < 4; m++) {
        out[m] = _mm512_shuffle_i32x4(v[m], v[m + 8], 0x88);
        out[m + 8] = _mm512_shuffle_i32x4(v[m], v[m + 8], 0xdd);
        out[m + 4] = _mm512_shuffle_i32x4(v[m + 4], v[m + 12], 0x88);
        out[m + 12] = _mm512_shuffle_i32x4(v[m + 4], v[m + 12], 0xdd);
    }
}

// Packs weight rows j0 .. j0+nr-1, columns k0 .. k0+kb-1 (forward):
// panel[(kk * Q8_NR + j) * 4 + b] = w[j0+j][k0 + 4*kk + b] ^ 0x80 and
// scales[g * Q8_NR + j] = the row's scale of group g; rows past nr are zero
// weights (byte 0x80) with scale 0.
static void q8_pack_rows(uint8_t* panel, float* scales, const Matrix* w, int j0, int nr, int k0, int kb) {
    int gs = w->group_size, gpr = w->cols / gs, words = kb / 4;
    uint32_t* dst = (uint32_t*)panel;
    __m512i offset_bytes = _mm512_set1_epi32((int)0x80808080u);
    // 16 rows x 16 dwords at a time, each row read as one 64-byte stream;
    // rows past nr are zero (bytes 0x80 after the offset: weight 0)
    for (int half = 0; half < 2; half++)
        for (int kk = 0; kk < words; kk += 16) {
            int nw = words - kk < 16 ? words - kk : 16;
            __mmask16 mask = nw == 16 ? 0xFFFF : (__mmask16)((1u << nw) - 1);
            __m512i rows[16], cols[16];
            for (int i = 0; i < 16; i++) {
                int j = 16 * half + i;
                rows[i] = j < nr ? _mm512_maskz_loadu_epi32(mask, w->q + (size_t)(j0 + j) * w->cols + k0 + 4 * kk)
                                 : _mm512_setzero_si512();
            }
            transpose_16x16_epi32(cols, rows);
            for (int c = 0; c < nw; c++)
                _mm512_storeu_si512(dst + (size_t)(kk + c) * Q8_NR + 16 * half, _mm512_xor_si512(cols[c], offset_bytes));
        }
    for (int j = 0; j < Q8_NR; j++)
        for (int g = 0; g < kb / gs; g++)
            scales[g * Q8_NR + j] = j < nr ? w->s[(size_t)(j0 + j) * gpr + k0 / gs + g] : 0.0f;
}

// Packs W^T (transposed): outputs are W's columns j0 .. j0+nr-1, k runs over
// W's rows k0 .. k0+kb-1. Each group of gs rows of a column is requantized
// from s*q as quantize_group would (16 columns per vector; needs gs % 32 == 0
// so that the panel's 32 columns share one scale group of each row).
static void q8_pack_cols(uint8_t* panel, float* scales, const Matrix* w, int j0, int nr, int k0, int kb, float* tmp) {
    int gs = w->group_size, gpr = w->cols / gs;
    __mmask32 cols_mask = nr >= 32 ? 0xFFFFFFFFu : (1u << nr) - 1;
    for (int g = 0; g < kb / gs; g++) {
        // tmp (gs, 32): the dequantized values, and each column's max and poison
        __m512 vmax[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
        __m512 vpoison[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int o = 0; o < gs; o++) {
            size_t row = (size_t)k0 + (size_t)g * gs + o;
            __m256i q = _mm256_maskz_loadu_epi8(cols_mask, w->q + row * w->cols + j0);
            __m512 s = _mm512_set1_ps(w->s[row * gpr + j0 / gs]);
            for (int h = 0; h < 2; h++) {
                __m128i q16 = h ? _mm256_extracti128_si256(q, 1) : _mm256_castsi256_si128(q);
                __m512 v = _mm512_mul_ps(s, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q16)));
                _mm512_storeu_ps(tmp + (size_t)o * 32 + 16 * h, v);
                vmax[h] = _mm512_max_ps(_mm512_abs_ps(v), vmax[h]);
                vpoison[h] = _mm512_add_ps(vpoison[h], _mm512_mul_ps(v, _mm512_setzero_ps()));
            }
        }
        __m512 inv[2];
        for (int h = 0; h < 2; h++) {
            // scale = max / 127; inv = 1 / scale where that is finite and > 0, else 0
            __m512 scale = _mm512_div_ps(vmax[h], _mm512_set1_ps(127.0f));
            __mmask16 ok = _mm512_cmp_ps_mask(scale, _mm512_setzero_ps(), _CMP_GT_OQ) &
                           _mm512_cmp_ps_mask(scale, _mm512_set1_ps(INFINITY), _CMP_LT_OQ);
            inv[h] = _mm512_maskz_div_ps(ok, _mm512_set1_ps(1.0f), scale);
            _mm512_storeu_ps(scales + g * Q8_NR + 16 * h, _mm512_add_ps(scale, vpoison[h]));
        }
        // four rows at a time into one dword per column: byte b = row 4*kk + b, plus 128
        uint32_t* dst = (uint32_t*)panel + (size_t)g * (gs / 4) * Q8_NR;
        for (int kk = 0; kk < gs / 4; kk++)
            for (int h = 0; h < 2; h++) {
                __m512i word = _mm512_setzero_si512();
                for (int b = 0; b < 4; b++) {
                    __m512 v = _mm512_loadu_ps(tmp + (size_t)(4 * kk + b) * 32 + 16 * h);
                    __m512i q = quantize_value_avx512(_mm512_mul_ps(v, inv[h]));
                    q = _mm512_and_si512(_mm512_add_epi32(q, _mm512_set1_epi32(128)), _mm512_set1_epi32(255));
                    word = _mm512_or_si512(word, _mm512_slli_epi32(q, 8 * b));
                }
                _mm512_storeu_si512(dst + (size_t)kk * Q8_NR + 16 * h, word);
            }
    }
}

// x (n, kb) block -> xq (n, kb), xs (n, kb/gs), xcorr (n, kb/gs) = -128 * sum of each group's bytes
static void q8_quantize_block(Q8Scratch* sc, const float* x, int ldx, int n, int kb) {
    int gs = sc->gs, groups = kb / gs;
    #pragma omp parallel for schedule(static) if ((long)n * kb >= PARALLEL_MIN_WORK)
    for (int i = 0; i < n; i++)
        for (int g = 0; g < groups; g++) {
            int8_t* q = sc->xq + (size_t)i * kb + (size_t)g * gs;
            sc->xs[(size_t)i * groups + g] = quantize_group(q, x + (size_t)i * ldx + (size_t)g * gs, gs);
            int32_t sum = 0;
            for (int k = 0; k < gs; k++) sum += q[k];
            sc->xcorr[(size_t)i * groups + g] = -128 * sum;
        }
}

// y[i][j] for i < mr, j < nr of one 6 x 32 tile: the fma chain over the
// block's groups (load: start from y, else from 0). Rows past mr read row 0.
static void q8_kernel(int groups, int gs, const uint8_t* panel, const float* pscale, const int8_t* xq, int kb,
                      const float* xs, const int32_t* xcorr, float* y, int ldy, int mr, int nr, int load) {
    const int8_t* xr[Q8_MR];
    for (int i = 0; i < Q8_MR; i++) xr[i] = xq + (size_t)(i < mr ? i : 0) * kb;
    int rows[Q8_MR];
    for (int i = 0; i < Q8_MR; i++) rows[i] = (i < mr ? i : 0) * groups;
    __mmask16 m0 = nr >= 16 ? 0xFFFF : (__mmask16)((1u << nr) - 1);
    __mmask16 m1 = nr >= 32 ? 0xFFFF : nr > 16 ? (__mmask16)((1u << (nr - 16)) - 1) : 0;
    __m512 c[Q8_MR][2];
    #pragma GCC unroll 6
    for (int i = 0; i < Q8_MR; i++) {
        c[i][0] = load && i < mr ? _mm512_maskz_loadu_ps(m0, y + (size_t)i * ldy) : _mm512_setzero_ps();
        c[i][1] = load && i < mr ? _mm512_maskz_loadu_ps(m1, y + (size_t)i * ldy + 16) : _mm512_setzero_ps();
    }
    const uint8_t* b = panel;
    for (int g = 0; g < groups; g++) {
        __m512i acc[Q8_MR][2];
        #pragma GCC unroll 6
        for (int i = 0; i < Q8_MR; i++) acc[i][0] = acc[i][1] = _mm512_set1_epi32(xcorr[rows[i] + g]);
        for (int kk = 0; kk < gs / 4; kk++) {
            __m512i b0 = _mm512_loadu_si512(b), b1 = _mm512_loadu_si512(b + 64);
            b += 4 * Q8_NR;
            #pragma GCC unroll 6
            for (int i = 0; i < Q8_MR; i++) {
                int32_t word;
                memcpy(&word, xr[i] + (size_t)g * gs + 4 * kk, 4);
                __m512i a = _mm512_set1_epi32(word);
                acc[i][0] = _mm512_dpbusd_epi32(acc[i][0], b0, a);
                acc[i][1] = _mm512_dpbusd_epi32(acc[i][1], b1, a);
            }
        }
        __m512 s0 = _mm512_loadu_ps(pscale + g * Q8_NR), s1 = _mm512_loadu_ps(pscale + g * Q8_NR + 16);
        #pragma GCC unroll 6
        for (int i = 0; i < Q8_MR; i++) {
            __m512 xsc = _mm512_set1_ps(xs[rows[i] + g]);
            c[i][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][0]), _mm512_mul_ps(s0, xsc), c[i][0]);
            c[i][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][1]), _mm512_mul_ps(s1, xsc), c[i][1]);
        }
    }
    for (int i = 0; i < mr; i++) {
        _mm512_mask_storeu_ps(y + (size_t)i * ldy, m0, c[i][0]);
        _mm512_mask_storeu_ps(y + (size_t)i * ldy + 16, m1, c[i][1]);
    }
}
#endif

void matmul_q8(float* y, const float* x, const Matrix* w, int n, int trans, int accumulate, Q8Scratch* sc) {
    int gs = w->group_size;
    if (gs != sc->gs || n > sc->n_cap) die("matmul_q8: scratch for group %d and %d rows, asked for %d and %d", sc->gs, sc->n_cap, gs, n);
    if (!matmul_q8_fast(w->rows, gs, trans)) {
        matmul_q8_portable(y, x, w, n, trans, accumulate);
        return;
    }
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    int K = trans ? w->rows : w->cols, M = trans ? w->cols : w->rows;
    int n_panels = (M + Q8_NR - 1) / Q8_NR;
    for (int k0 = 0; k0 < K; k0 += sc->kc) {
        int kb = K - k0 < sc->kc ? K - k0 : sc->kc, groups = kb / gs;
        q8_quantize_block(sc, x + k0, K, n, kb);
        int load = accumulate || k0 > 0;
        #pragma omp parallel for schedule(static) num_threads(sc->n_threads) if ((long)n * M * kb >= PARALLEL_MIN_WORK)
        for (int p = 0; p < n_panels; p++) {
            int t = engine_thread_id();
            uint8_t* panel = sc->panels + (size_t)t * Q8_NR * sc->kc;
            float* pscale = sc->panel_scales + (size_t)t * Q8_NR * (sc->kc / gs);
            int j0 = p * Q8_NR, nr = M - j0 < Q8_NR ? M - j0 : Q8_NR;
            if (trans) q8_pack_cols(panel, pscale, w, j0, nr, k0, kb, sc->pack_tmp + (size_t)t * Q8_NR * gs);
            else q8_pack_rows(panel, pscale, w, j0, nr, k0, kb);
            for (int i0 = 0; i0 < n; i0 += Q8_MR)
                q8_kernel(groups, gs, panel, pscale, sc->xq + (size_t)i0 * kb, kb, sc->xs + (size_t)i0 * groups,
                          sc->xcorr + (size_t)i0 * groups, y + (size_t)i0 * M + j0, M, n - i0 < Q8_MR ? n - i0 : Q8_MR, nr, load);
        }
    }
#endif
}

// ----------------------------------------------------------------------------
// matmul: every projection of every program, fp32 or int8

void matmul(float* y, const float* x, const Matrix* w, int n, Q8Scratch* q8) {
    int rows = w->rows, cols = w->cols;
    if (w->f) {
        if (n == 1) {
            // decode: one matrix-vector product, bandwidth bound, threads over rows
            // (a small one runs on this thread: waking the team costs more
            // than it saves, and far more when another process holds a core)
            #pragma omp parallel for schedule(static) if ((long)rows * cols >= PARALLEL_MIN_WORK)
            for (int r = 0; r < rows; r++) y[r] = dot_f32(w->f + (size_t)r * cols, x, cols);
        } else {
            // prompt: y = x @ W^T as one GEMM
            gemm(0, 1, n, rows, cols, 1.0f, x, cols, w->f, cols, 0.0f, y, rows);
        }
        return;
    }
    if (n >= Q8_GEMM_MIN_ROWS && matmul_q8_fast(rows, w->group_size, 0)) {
        // a prompt or a training batch: the packed VNNI GEMM
        matmul_q8(y, x, w, n, 0, 0, q8);
        return;
    }
    int gs = w->group_size, groups = cols / gs;
    int8_t* xq = q8->xq;
    float* xs = q8->xs;
    quantize_rows(xq, xs, x, n, cols, gs);
    // each weight row is read once and dotted with all n quantized inputs,
    // four at a time (dot_q8_x4 shares the weight loads between them)
    #pragma omp parallel for schedule(static) if ((long)rows * cols * n >= PARALLEL_MIN_WORK)
    for (int r = 0; r < rows; r++) {
        const int8_t* wq = w->q + (size_t)r * cols;
        const float* ws = w->s + (size_t)r * groups;
        int i = 0;
        for (; i + 4 <= n; i += 4) {
            float out[4];
            dot_q8_x4(out, wq, ws, xq + (size_t)i * cols, xs + (size_t)i * groups, cols, gs);
            for (int t = 0; t < 4; t++) y[(size_t)(i + t) * rows + r] = out[t];
        }
        for (; i < n; i++)
            y[(size_t)i * rows + r] = dot_q8(wq, ws, xq + (size_t)i * cols, xs + (size_t)i * groups, cols, gs);
    }
}
