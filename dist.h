// dist.h -- data-parallel training across processes (implemented in dist.c).
//
// Built with USE_MPI (`make MPI=1`: build/mpi/train_lora, build/mpi/sae) these
// are thin wrappers over MPI: one process per machine (or per core), started
// by mpirun. Without it they describe one process (rank 0 of 1) and move no
// data, so the programs call them unconditionally. Only train_lora and sae
// call them; docs/mpi.md says how the ranks share a training step.
#ifndef DIST_H
#define DIST_H

#include <stddef.h>
#include <stdint.h>

// Starts MPI (when built with it). The ranks other than 0 send stdout to
// /dev/null: rank 0 prints progress, and writes logs and checkpoints.
void dist_init(int* argc, char*** argv);
void dist_finalize(void);          // before a normal exit of a program that called dist_init
int dist_rank(void);               // 0 .. dist_size()-1 (0 without MPI)
int dist_size(void);               // ranks (1 without MPI)

// Collectives: every rank calls them in the same order. In place; every
// rank ends with the same result.
void dist_sum_floats(float* x, size_t n);
void dist_sum_doubles(double* x, size_t n);
void dist_or_bytes(unsigned char* x, size_t n);
// all (size, n_each): rank r's block r goes in; every block comes out on every rank
void dist_allgather_floats(float* all, size_t n_each);
void dist_barrier(void);

// Dies on every rank, with one "error: ..." line from rank 0 only, when the
// ranks hold different values of h ("the ranks disagree on WHAT").
void dist_check_same(uint64_t h, const char* what);
// An error every rank meets at the same point (the ranks hold the same
// state): one "error: ..." line from rank 0, then every rank exits with 1.
void dist_fail(const char* fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

// A checksum for dist_check_same: FNV-1a over n bytes, continuing from h
// (start with DIST_HASH_INIT). dist_hash_sampled reads at most about 64 KiB
// of a large block (its start and 15 evenly spaced 4 KiB pieces) plus its size.
#define DIST_HASH_INIT 0xcbf29ce484222325ull
uint64_t dist_hash(uint64_t h, const void* p, size_t n);
uint64_t dist_hash_sampled(uint64_t h, const void* p, size_t n);

// What dist_sum_floats cost so far: seconds moving and adding the data,
// seconds waiting for the slowest rank before, bytes summed (each rank's buffer)
void dist_sum_stats(double* seconds, double* wait_seconds, double* bytes);

#endif
