// bench.h -- `run bench` (bench.c): the engine's speed on one model file.
#ifndef BENCH_H
#define BENCH_H

// argv[0] is "bench"; prints the CSV on stdout (see `run bench --help`).
int bench_main(int argc, char** argv);

#endif
