# unlearn.c -- see README.md
#
#   make            build every program (OpenMP; OpenBLAS when its header is found)
#   make BLAS=0     plain C build, no OpenBLAS (for porting)
#   make test       build and run the test harness (needs python3 with numpy), after
#                   tests/layout.sh (the repository's shape); then tests/mpi.sh
#                   (two ranks under mpirun, skipped when MPI is not installed)
#   make test-asan  the test harness built with ASan + UBSan (build/asan/)
#   make fuzz       libFuzzer targets of fuzz.c, FUZZ_SECONDS each (needs clang)
#   make refs       regenerate the committed reference logits in tests/
#   make toy        rebuild the toy world (data/toy/) from its seed
#   make demo       every method on the toy world, one report (results/toy/)
#   make demo-real MODEL=m.bin TOKENIZER=t.tok [REAL=data/real]   the same on a real model
#   make MPI=1      also build/mpi/train_lora and build/mpi/sae, for mpirun (docs/mpi.md)
#   make bench [BENCH_REPS=5] [BENCH_8B=1] [MPI=1]   speed suite: decode/prefill tok/s, bandwidth, GEMM, roofline,
#                   LoRA and SAE training (build/bench/results.{csv,json,md}; 6-8 min on 2 cores,
#                   plus about 2 min to make the models once, 4 more with BENCH_8B=1)
CC ?= cc
CFLAGS ?= -O3 -march=native
CFLAGS += -std=c11 -Wall -Wextra -Wno-unused-parameter -fopenmp
LDLIBS = -lm

# OpenBLAS is optional: BLAS=1 forces it, BLAS=0 disables it, default is
# "use it when cblas.h is installed" (Debian: libopenblas-dev).
BLAS ?= $(shell echo 'int main(void){return 0;}' | $(CC) -include cblas.h -x c - -o /dev/null -lopenblas 2>/dev/null && echo 1 || echo 0)
ifeq ($(BLAS),1)
  CFLAGS += -DUSE_BLAS
  # Prefer Debian's OpenMP build of OpenBLAS (package libopenblas0-openmp):
  # the default pthreads build keeps its own threads spinning beside ours
  # and halves training speed on 2 cores. Linked by path, so no system-wide
  # alternatives change is needed.
  OPENBLAS_OMP_DIR ?= $(firstword $(wildcard /usr/lib/*-linux-gnu/openblas-openmp /usr/lib64/openblas-openmp))
  ifneq ($(OPENBLAS_OMP_DIR),)
    LDLIBS += -L$(OPENBLAS_OMP_DIR) -Wl,-rpath,$(OPENBLAS_OMP_DIR) -l:libopenblas.so.0
  else
    LDLIBS += -lopenblas
  endif
endif

# A python3 that has numpy (the pyenv python3 on PATH may not; Debian's does).
PYTHON ?= $(shell for p in python3 /usr/bin/python3 /usr/local/bin/python3; do $$p -c 'import numpy' 2>/dev/null && echo $$p && break; done)

PROGRAMS = run train_lora sae guard test_all

all: $(PROGRAMS)

# Every .c file is compiled once into its .o; -MMD records the headers it
# includes in a .d file beside it, so editing a header rebuilds its users.
# Layers, bottom up: the engine; the grammar (cli), the data readers and the
# harness (eval); the methods; the programs, each a CLI file over them.
ENGINE_OBJS = engine.o tokenizer.o kernels.o model_write.o
SHARED_OBJS = $(ENGINE_OBJS) cli.o data.o eval.o
METHOD_OBJS = train_lora.o sae.o guard.o
run_OBJS = run.o bench.o $(SHARED_OBJS)
train_lora_OBJS = train_lora_cli.o train_lora.o dist.o $(SHARED_OBJS)
sae_OBJS = sae_cli.o sae.o dist.o $(SHARED_OBJS)
guard_OBJS = guard_cli.o guard.o $(SHARED_OBJS)
test_all_OBJS = test_all.o $(METHOD_OBJS) $(SHARED_OBJS)

%.o: %.c
	$(CC) $(CFLAGS) -MMD -MP -c $< -o $@

run: $(run_OBJS)
train_lora: $(train_lora_OBJS)
sae: $(sae_OBJS)
guard: $(guard_OBJS)
test_all: $(test_all_OBJS)
$(PROGRAMS):
	$(CC) $(CFLAGS) $^ -o $@ $(LDLIBS)

-include $(wildcard *.d)

# Many machines (docs/mpi.md): `make MPI=1` also builds build/mpi/train_lora
# and build/mpi/sae for mpirun. They differ from ./train_lora and ./sae only
# in dist.o (compiled by mpicc with USE_MPI into build/mpi/) and are linked
# by mpicc; every other object is the plain build's. `make test` builds and
# tests them whenever mpicc and mpirun are installed (Debian: libopenmpi-dev
# openmpi-bin), and says it skipped them otherwise.
MPI ?= 0
MPICC ?= mpicc
MPI_DIR = build/mpi
MPI_PROGRAMS = $(MPI_DIR)/train_lora $(MPI_DIR)/sae
HAVE_MPI := $(shell command -v $(MPICC) >/dev/null 2>&1 && command -v mpirun >/dev/null 2>&1 && echo 1)
ifeq ($(MPI),1)
  ifneq ($(HAVE_MPI),1)
    $(error MPI=1 needs mpicc and mpirun (Debian: apt-get install libopenmpi-dev openmpi-bin))
  endif
all: $(MPI_PROGRAMS)
endif
$(MPI_DIR)/dist.o: dist.c dist.h run.h
	@mkdir -p $(MPI_DIR)
	$(MPICC) $(CFLAGS) -DUSE_MPI -c $< -o $@
$(MPI_DIR)/train_lora: $(MPI_DIR)/dist.o $(filter-out dist.o,$(train_lora_OBJS))
$(MPI_DIR)/sae: $(MPI_DIR)/dist.o $(filter-out dist.o,$(sae_OBJS))
$(MPI_PROGRAMS):
	$(MPICC) $(CFLAGS) $^ -o $@ $(LDLIBS)

# Synthetic checkpoints and exported models live in build/ (git-ignored).
TOK = build/llama3.tok
# The real Llama-3 tokenizer.json ships gzip-compressed in tests/llama3/.
LLAMA3_TOKENIZER = tests/llama3/tokenizer.json.gz
$(TOK): export.py tok_export.py $(LLAMA3_TOKENIZER)
	@test -n "$(PYTHON)" || { echo "error: no python3 with numpy found (apt-get install python3-numpy)"; exit 1; }
	@mkdir -p build
	$(PYTHON) export.py tokenizer $(LLAMA3_TOKENIZER) $@

test: all $(TOK) $(if $(HAVE_MPI),$(MPI_PROGRAMS))
	@test -n "$(PYTHON)" || { echo "error: no python3 with numpy found (apt-get install python3-numpy)"; exit 1; }
	sh tests/layout.sh
	PYTHON=$(PYTHON) sh tests/prepare.sh
	./test_all
	HAVE_MPI=$(HAVE_MPI) PYTHON=$(PYTHON) sh tests/mpi.sh

# The toy world: corpus, tokenizer, toy-base and toy-gold trained from
# scratch (about 25 minutes on 2 cores); writes data/toy/.
toy: run train_lora
	PYTHON=$(PYTHON) sh data/make_toy.sh

demo: all
	sh demo.sh

demo-real: all
	@test -n "$(MODEL)" -a -n "$(TOKENIZER)" || { echo "usage: make demo-real MODEL=model.bin TOKENIZER=model.tok [REAL=data/real]"; exit 1; }
	sh demo.sh --real $(MODEL) $(TOKENIZER) $(REAL)

refs: run $(TOK)
	PYTHON=$(PYTHON) sh tests/make_refs.sh

# The benchmark suite (docs/performance.md; tests/bench.sh says what it
# runs). Every value is the median of BENCH_REPS repetitions (the reference
# numbers in docs/performance.md use 15). Its synthetic models (random weights) are made
# once and kept in build/bench/: the 1.04B comparison shape (Llama-3.2-1B
# dims, 32000 vocab) for decode and prefill, the full Llama-3.2-1B shape
# (128256 vocab) for training. Deliberately no dependency on export.py:
# regenerating takes minutes and 11 GB of files. The bf16 HF checkpoint is
# deleted once both exports exist.
BENCH_REPS ?= 5
BENCH_DIR = build/bench
BENCH_MODELS = $(BENCH_DIR)/1b-32k.f32.bin $(BENCH_DIR)/1b-32k.q8.bin $(BENCH_DIR)/1b.f32.bin $(BENCH_DIR)/1b.q8.bin
# BENCH_8B=1 adds Llama-3-8B in int8 (decode, a 128-token prompt, LoRA
# training): an 8.5 GB file, made once from a 16 GB bf16 checkpoint that is
# deleted afterwards (so 25 GB of disk while it is made, ~15 min here), and
# about 12 GB of RAM while it trains.
BENCH_8B ?= 0
ifeq ($(BENCH_8B),1)
BENCH_MODELS += $(BENCH_DIR)/8b.q8.bin
endif

bench: run train_lora sae $(TOK) $(BENCH_MODELS) $(if $(filter 1,$(MPI)),$(MPI_PROGRAMS))
	BENCH_REPS=$(BENCH_REPS) BENCH_DIR=$(BENCH_DIR) BENCH_8B=$(BENCH_8B) BENCH_MPI=$(MPI) PYTHON=$(PYTHON) TOK=$(TOK) sh tests/bench.sh

bench_preset_1b-32k = llama-3.2-1b-32k
bench_preset_1b = llama-3.2-1b
$(BENCH_DIR)/%.f32.bin:
	@test -n "$(PYTHON)" || { echo "error: no python3 with numpy found (apt-get install python3-numpy)"; exit 1; }
	test -f $(BENCH_DIR)/hf-$*/config.json || $(PYTHON) export.py synth $(BENCH_DIR)/hf-$* --preset $(bench_preset_$*)
	$(PYTHON) export.py model $(BENCH_DIR)/hf-$* $@
# Llama-3-8B: int8 only (an fp32 file would be 32 GB)
$(BENCH_DIR)/8b.q8.bin:
	@test -n "$(PYTHON)" || { echo "error: no python3 with numpy found (apt-get install python3-numpy)"; exit 1; }
	test -f $(BENCH_DIR)/hf-8b/config.json || $(PYTHON) export.py synth $(BENCH_DIR)/hf-8b --preset llama-3-8b
	$(PYTHON) export.py model $(BENCH_DIR)/hf-8b $@ --int8
	rm -rf $(BENCH_DIR)/hf-8b
# after the fp32 file (order-only), so the two never synthesize at once
$(BENCH_DIR)/%.q8.bin: | $(BENCH_DIR)/%.f32.bin
	@test -n "$(PYTHON)" || { echo "error: no python3 with numpy found (apt-get install python3-numpy)"; exit 1; }
	test -f $(BENCH_DIR)/hf-$*/config.json || $(PYTHON) export.py synth $(BENCH_DIR)/hf-$* --preset $(bench_preset_$*)
	$(PYTHON) export.py model $(BENCH_DIR)/hf-$* $@ --int8
	rm -rf $(BENCH_DIR)/hf-$*

clean:
	rm -f $(PROGRAMS) *.o *.d
	rm -rf $(MPI_DIR)

.PHONY: all test refs toy demo demo-real bench clean

# ----------------------------------------------------------------------------
# Robustness (docs/robustness.md): libFuzzer targets and the sanitizer build.
#
#   make fuzz [FUZZ_SECONDS=60] [FUZZ_TARGETS="tokenize chat ..."]
#                   build every fuzz target of fuzz.c (clang) and run each for
#                   FUZZ_SECONDS on its corpus, one after another, at nice 19
#   make fuzz-build just the binaries, build/fuzz/fuzz_NAME
#   make test-asan  test_all and the programs it runs, built with
#                   -fsanitize=address,undefined in build/asan/, run clean
FUZZ_CC ?= clang
FUZZ_TARGETS ?= tokenize chat model tokfile lora sae traindata evaldata
FUZZ_SECONDS ?= 60
FUZZ_DIR = build/fuzz
FUZZ_CFLAGS = -g -O1 -march=native -std=c11 -Wall -Wextra -Wno-unused-parameter -Wno-unknown-pragmas \
              -Wno-source-uses-openmp -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all
# exit() and the allocator go through fuzz.c's wrappers (see the top of fuzz.c)
FUZZ_WRAP = -Wl,--wrap=exit,--wrap=malloc,--wrap=calloc,--wrap=realloc,--wrap=posix_memalign,--wrap=free
FUZZ_OPTS = -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=256 -print_final_stats=1

# the library objects, instrumented, in one archive every fuzz binary links
$(FUZZ_DIR)/%.o: %.c
	@mkdir -p $(FUZZ_DIR)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer-no-link -MMD -MP -c $< -o $@

$(FUZZ_DIR)/libunlearn.a: $(addprefix $(FUZZ_DIR)/,$(SHARED_OBJS) $(METHOD_OBJS))
	rm -f $@
	ar rcs $@ $^

$(FUZZ_DIR)/fuzz_%: fuzz.c $(FUZZ_DIR)/libunlearn.a $(wildcard *.h)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer -DFUZZ_TARGET=$* fuzz.c $(FUZZ_DIR)/libunlearn.a -o $@ -lm $(FUZZ_WRAP)

-include $(wildcard $(FUZZ_DIR)/*.d)

fuzz-build: $(addprefix $(FUZZ_DIR)/fuzz_,$(FUZZ_TARGETS))

# One target at a time, one process each (libFuzzer's default: no -jobs,
# no forks); new inputs go to build/fuzz/corpus/NAME, crashes to
# build/fuzz/crash-NAME-*. Stops at the first target that fails.
fuzz: fuzz-build
	@for t in $(FUZZ_TARGETS); do \
	    mkdir -p $(FUZZ_DIR)/corpus/$$t; \
	    regress=; [ -d tests/fuzz/regress/$$t ] && regress=tests/fuzz/regress/$$t; \
	    echo "== fuzz $$t for $(FUZZ_SECONDS) s"; \
	    nice -n 19 $(FUZZ_DIR)/fuzz_$$t $(FUZZ_DIR)/corpus/$$t tests/fuzz/$$t $$regress $(FUZZ_OPTS) \
	        -max_total_time=$(FUZZ_SECONDS) -artifact_prefix=$(FUZZ_DIR)/crash-$$t- >$(FUZZ_DIR)/$$t.log 2>&1; \
	    rc=$$?; grep -E '^(#[0-9]+ +DONE|stat::number_of_executed_units|stat::peak_rss_mb)' $(FUZZ_DIR)/$$t.log; \
	    [ $$rc -eq 0 ] || { tail -n 60 $(FUZZ_DIR)/$$t.log; echo "fuzz $$t: FAILED (log $(FUZZ_DIR)/$$t.log)"; exit 1; }; \
	done

.PHONY: fuzz fuzz-build test-asan

# The sanitizer build: every program and test_all with ASan + UBSan (gcc is
# fine), objects and binaries in build/asan/ (the normal build is not
# touched). tests/asan.sh runs test_all in build/asan/root, a copy of the
# checkout made of links whose ./run, ./train_lora, ./sae and ./guard are
# the sanitized binaries and whose build/ has its own fixtures, so it can
# run beside `make test`. Any sanitizer report (also from a program a test
# runs and expects to fail) fails it.
ASAN_DIR = build/asan
ASAN_CFLAGS = $(CFLAGS) -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all
ASAN_PROGRAMS = $(addprefix $(ASAN_DIR)/root/,$(PROGRAMS))

$(ASAN_DIR)/root:
	mkdir -p $@
$(ASAN_DIR)/%.o: %.c | $(ASAN_DIR)/root
	$(CC) $(ASAN_CFLAGS) -MMD -MP -c $< -o $@
$(ASAN_DIR)/root/run: $(addprefix $(ASAN_DIR)/,$(run_OBJS))
$(ASAN_DIR)/root/train_lora: $(addprefix $(ASAN_DIR)/,$(train_lora_OBJS))
$(ASAN_DIR)/root/sae: $(addprefix $(ASAN_DIR)/,$(sae_OBJS))
$(ASAN_DIR)/root/guard: $(addprefix $(ASAN_DIR)/,$(guard_OBJS))
$(ASAN_DIR)/root/test_all: $(addprefix $(ASAN_DIR)/,$(test_all_OBJS))
$(ASAN_PROGRAMS):
	$(CC) $(ASAN_CFLAGS) $^ -o $@ $(LDLIBS)

-include $(wildcard $(ASAN_DIR)/*.d)

test-asan: $(ASAN_PROGRAMS) $(TOK)
	@test -n "$(PYTHON)" || { echo "error: no python3 with numpy found (apt-get install python3-numpy)"; exit 1; }
	PYTHON=$(PYTHON) sh tests/asan.sh
