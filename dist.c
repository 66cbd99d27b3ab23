// dist.c -- data-parallel training across processes: MPI when built with
// USE_MPI, one process otherwise (see dist.h). Every MPI call of the project
// is in this file.
#include <stdio.h>
#include <stdlib.h>
#include <stdarg.h>
#include <string.h>
#include "run.h"
#include "dist.h"
#ifdef USE_MPI
#include <mpi.h>
#endif

static int g_rank = 0, g_size = 1;
#ifdef USE_MPI
static int g_started = 0;
#endif
static double g_sum_seconds = 0.0, g_wait_seconds = 0.0, g_sum_bytes = 0.0;

void dist_init(int* argc, char*** argv) {
#ifdef USE_MPI
    int provided;
    // only the main thread calls MPI; OpenMP threads compute between the calls
    MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &g_size);
    g_started = 1;
    if (g_rank != 0 && !freopen("/dev/null", "w", stdout)) die("cannot open /dev/null");
#endif
}

void dist_finalize(void) {
#ifdef USE_MPI
    if (g_started) MPI_Finalize();
    g_started = 0;
#endif
}

int dist_rank(void) { return g_rank; }
int dist_size(void) { return g_size; }

#ifdef USE_MPI
// MPI counts are ints: large buffers go in pieces of 2^28 elements
#define DIST_PIECE ((size_t)1 << 28)
static void allreduce(void* x, size_t n, size_t elem, MPI_Datatype type, MPI_Op op) {
    for (size_t at = 0; at < n; at += DIST_PIECE) {
        size_t k = n - at < DIST_PIECE ? n - at : DIST_PIECE;
        MPI_Allreduce(MPI_IN_PLACE, (char*)x + at * elem, (int)k, type, op, MPI_COMM_WORLD);
    }
}
#endif

void dist_sum_floats(float* x, size_t n) {
#ifdef USE_MPI
    if (g_size == 1) return;
    // the barrier separates waiting for the slowest rank from moving the data
    double t0 = MPI_Wtime();
    MPI_Barrier(MPI_COMM_WORLD);
    double t1 = MPI_Wtime();
    allreduce(x, n, sizeof(float), MPI_FLOAT, MPI_SUM);
    g_wait_seconds += t1 - t0;
    g_sum_seconds += MPI_Wtime() - t1;
    g_sum_bytes += (double)n * sizeof(float);
#endif
}

void dist_sum_doubles(double* x, size_t n) {
#ifdef USE_MPI
    if (g_size > 1) allreduce(x, n, sizeof(double), MPI_DOUBLE, MPI_SUM);
#endif
}

void dist_or_bytes(unsigned char* x, size_t n) {
#ifdef USE_MPI
    if (g_size > 1) allreduce(x, n, 1, MPI_UNSIGNED_CHAR, MPI_BOR);
#endif
}

void dist_allgather_floats(float* all, size_t n_each) {
#ifdef USE_MPI
    if (g_size == 1) return;
    if (n_each > (size_t)1 << 30) die("dist_allgather_floats: %zu floats per rank is too many", n_each);
    MPI_Allgather(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, all, (int)n_each, MPI_FLOAT, MPI_COMM_WORLD);
#endif
}

void dist_barrier(void) {
#ifdef USE_MPI
    if (g_size > 1) MPI_Barrier(MPI_COMM_WORLD);
#endif
}

void dist_check_same(uint64_t h, const char* what) {
#ifdef USE_MPI
    if (g_size == 1) return;
    uint64_t* all = xmalloc((size_t)g_size * sizeof(uint64_t));
    MPI_Allgather(&h, 1, MPI_UINT64_T, all, 1, MPI_UINT64_T, MPI_COMM_WORLD);
    int differs = -1;
    for (int r = 1; r < g_size && differs < 0; r++) if (all[r] != all[0]) differs = r;
    free(all);
    if (differs >= 0) dist_fail("the ranks disagree on %s (rank %d differs from rank 0)", what, differs);
#endif
}

void dist_fail(const char* fmt, ...) {
    if (g_rank == 0) {
        va_list ap;
        va_start(ap, fmt);
        fprintf(stderr, "error: ");
        vfprintf(stderr, fmt, ap);
        fprintf(stderr, "\n");
        fflush(stderr);
        va_end(ap);
    }
    // every rank finalizes first, so no rank is killed before rank 0 has printed
    dist_finalize();
    exit(EXIT_FAILURE);
}

uint64_t dist_hash(uint64_t h, const void* p, size_t n) {
    const unsigned char* b = p;
    for (size_t i = 0; i < n; i++) { h ^= b[i]; h *= 0x100000001b3ull; }
    return h;
}

uint64_t dist_hash_sampled(uint64_t h, const void* p, size_t n) {
    const size_t piece = 4096, pieces = 16;
    uint64_t n64 = n;
    h = dist_hash(h, &n64, sizeof(n64));
    if (n <= piece * pieces) return dist_hash(h, p, n);
    for (size_t i = 0; i < pieces; i++) {
        size_t at = (n - piece) / (pieces - 1) * i;   // piece 0 is the start (a file's header)
        h = dist_hash(h, (const char*)p + at, piece);
    }
    return h;
}

void dist_sum_stats(double* seconds, double* wait_seconds, double* bytes) {
    *seconds = g_sum_seconds;
    *wait_seconds = g_wait_seconds;
    *bytes = g_sum_bytes;
}
