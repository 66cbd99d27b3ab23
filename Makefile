# unlearn.c -- see README.md
#
#   make            build every program (OpenMP; OpenBLAS when its header is found)
#   make BLAS=0     plain C build, no OpenBLAS (for porting)
#   make test       build and run the test harness (needs python3 with numpy)
#   make refs       regenerate the committed reference logits in tests/
#   make toy        rebuild the toy world (data/toy/) from its seed
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

engine.o: run.c run.h unicode_ranges.h
	$(CC) $(CFLAGS) -DRUN_LIBRARY -c run.c -o $@

eval.o: eval.c eval.h run.h
	$(CC) $(CFLAGS) -c eval.c -o $@

run: run.c run.h unicode_ranges.h eval.o
	$(CC) $(CFLAGS) run.c eval.o -o $@ $(LDLIBS)

sae: sae.c sae.h run.h engine.o
	$(CC) $(CFLAGS) sae.c engine.o -o $@ $(LDLIBS)

sae_lib.o: sae.c sae.h run.h
	$(CC) $(CFLAGS) -DSAE_LIBRARY -c sae.c -o $@

guard: guard.c guard.h run.h eval.h engine.o eval.o
	$(CC) $(CFLAGS) guard.c engine.o eval.o -o $@ $(LDLIBS)

guard_lib.o: guard.c guard.h run.h
	$(CC) $(CFLAGS) -DGUARD_LIBRARY -c guard.c -o $@

train_lora: train_lora.c train_lora.h run.h engine.o
	$(CC) $(CFLAGS) train_lora.c engine.o -o $@ $(LDLIBS)

train_lib.o: train_lora.c train_lora.h run.h
	$(CC) $(CFLAGS) -DTRAIN_LIBRARY -c train_lora.c -o $@

test_all: test_all.c engine.o eval.o train_lib.o sae_lib.o guard_lib.o run.h eval.h train_lora.h sae.h guard.h
	$(CC) $(CFLAGS) test_all.c engine.o eval.o train_lib.o sae_lib.o guard_lib.o -o $@ $(LDLIBS)

# Synthetic checkpoints and exported models live in build/ (git-ignored).
TOK = build/llama3.tok
$(TOK): export.py tok_export.py ../shared/llama3-tokenizer/tokenizer.json
	@test -n "$(PYTHON)" || { echo "error: no python3 with numpy found (apt-get install python3-numpy)"; exit 1; }
	@mkdir -p build
	$(PYTHON) export.py tokenizer ../shared/llama3-tokenizer/tokenizer.json $@

test: all $(TOK)
	@test -n "$(PYTHON)" || { echo "error: no python3 with numpy found (apt-get install python3-numpy)"; exit 1; }
	PYTHON=$(PYTHON) sh tests/prepare.sh
	./test_all

# The toy world: corpus, tokenizer, toy-base and toy-gold trained from
# scratch (about 25 minutes on 2 cores); writes data/toy/.
toy: run train_lora
	PYTHON=$(PYTHON) sh data/make_toy.sh

refs: run $(TOK)
	PYTHON=$(PYTHON) sh tests/make_refs.sh

clean:
	rm -f $(PROGRAMS) *.o

.PHONY: all test refs toy clean
