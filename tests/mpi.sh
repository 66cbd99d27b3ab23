#!/bin/sh
# tests/mpi.sh -- data-parallel training under mpirun (docs/mpi.md), run by
# `make test` after test_all. Needs build/mpi/train_lora and build/mpi/sae
# (the Makefile builds them when mpicc and mpirun are installed) and the
# fixtures of tests/prepare.sh; says "skipped" without MPI. Two ranks on this
# machine (--oversubscribe, loopback), one OpenMP thread each:
#   - train_lora: 2 ranks x --batch 2 == one process --batch 1 --accum 2, bit
#     for bit; 2 ranks with --accum 2 == one process with --accum 4 within a
#     rounding bound; a killed rank leaves a checkpoint that resumes to the
#     uninterrupted run, bit for bit
#   - sae: capture shared by 2 ranks == one process; sae train 2 ranks x
#     --batch 128 == one process --batch 64 --accum 2, bit for bit
#   - ranks that disagree (model file, adapter shape, data) stop with one
#     "error:" line; a state saved by 2 ranks does not resume on 1
set -u
cd "$(dirname "$0")/.."
if [ "${HAVE_MPI:-}" != 1 ] || [ ! -x build/mpi/train_lora ] || [ ! -x build/mpi/sae ] || ! command -v mpirun >/dev/null; then
    echo "mpi: skipped: no MPI (apt-get install libopenmpi-dev openmpi-bin, then make test)"
    exit 0
fi
PY=${PYTHON:-python3}
W=build/mpi_test
rm -rf $W
mkdir -p $W
pass=0 fail=0
check() {   # check CONDITION-STATUS MESSAGE
    if [ "$1" = 0 ]; then pass=$((pass + 1)); echo "ok   mpi: $2"; else fail=$((fail + 1)); echo "FAIL mpi: $2"; fi
}
# Open MPI refuses to start as root unless told (a CI container runs as root)
if [ "$(id -u)" = 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
export OMP_NUM_THREADS=1
MPIRUN="mpirun --oversubscribe -x OMP_NUM_THREADS=1"
MODEL=build/models/tiny-3.2.f32.bin
cut -f1,2 data/real_forget_qa.tsv | head -40 | tr '\t' ' ' > $W/forget.txt
cut -f1,2 data/real_retain_qa.tsv | head -40 | tr '\t' ' ' > $W/retain.txt

# 1 when stderr file $1 holds exactly one "error:" line and it contains $2
one_error() { [ "$(grep -c '^error:' "$1")" = 1 ] && grep '^error:' "$1" | grep -q "$2"; }

# --- train_lora -----------------------------------------------------------
T="train $MODEL -z build/llama3.tok --seq-len 32 --lr 1e-3 --objective graddiff --forget $W/forget.txt --retain $W/retain.txt --dropout 0.1"
./train_lora $T --steps 3 --batch 1 --accum 2 -o $W/one.lora > $W/one.out 2>&1
r1=$?
$MPIRUN -np 2 build/mpi/train_lora $T --steps 3 --batch 2 -o $W/two.lora > $W/two.out 2>&1
r2=$?
[ $r1 = 0 ] && [ $r2 = 0 ] && cmp -s $W/one.lora $W/two.lora
check $? "train_lora: 2 ranks x --batch 2 == 1 process --batch 1 --accum 2, adapter bit for bit"
grep -q '^allreduce: 2 ranks, .* 131072 bytes per step' $W/two.out
check $? "train_lora: rank 0 reports the allreduce (32768 LoRA parameters = 131072 bytes per step)"

# with --accum 2 on each rank the sum runs in another order: within rounding.
# Adam divides by sqrt(v), so a parameter whose summed gradient is near 0
# may move by up to lr per step either way; the bound is on the median
# (rounding) and the largest (Adam's step) difference.
./train_lora $T --steps 2 --batch 1 --accum 4 -o $W/one4.lora > $W/one4.out 2>&1
$MPIRUN -np 2 build/mpi/train_lora $T --steps 2 --batch 2 --accum 2 -o $W/two4.lora > $W/two4.out 2>&1
$PY -c '
import numpy as np, sys
a = np.fromfile(sys.argv[1], dtype=np.uint8)[128:].view(np.float32)   # after the 128-byte adapter header
b = np.fromfile(sys.argv[2], dtype=np.uint8)[128:].view(np.float32)
d = np.abs(a - b)
print("     accum 4 vs 2 ranks x accum 2: median |diff| %.2e, max %.2e, %d of %d parameters differ" % (np.median(d), d.max(), (d > 0).sum(), d.size))
sys.exit(0 if a.size == b.size and np.median(d) <= 1e-6 and d.max() <= 2 * 2 * 1e-3 else 1)
' $W/one4.lora $W/two4.lora
check $? "train_lora: 2 ranks x --accum 2 == 1 process --accum 4 within rounding (median diff <= 1e-6, max <= 2 lr steps)"

# a killed rank: rank 0's last checkpoint stays whole and resumes to the uninterrupted run
K="$T --steps 10 --batch 2 --save-every 1"
$MPIRUN -np 2 build/mpi/train_lora $K -o $W/full.lora > $W/full.out 2>&1
cat > $W/kill1.sh <<'EOF'
# rank 1 is killed (SIGKILL) once rank 0 has logged 3 steps
"$@" & pid=$!
if [ "$OMPI_COMM_WORLD_RANK" = 1 ]; then
    while [ "$(cat build/mpi_test/k.lora.csv 2>/dev/null | wc -l)" -lt 4 ]; do sleep 0.01; done
    kill -9 $pid
fi
wait $pid
EOF
$MPIRUN -np 2 sh $W/kill1.sh build/mpi/train_lora $K -o $W/k.lora > $W/k.out 2> $W/k.err
rk=$?
steps=$(($(wc -l < $W/k.lora.csv) - 1))
$MPIRUN -np 2 build/mpi/train_lora $K -o $W/k.lora --resume > $W/kr.out 2>&1
[ $rk != 0 ] && [ $steps -ge 3 ] && [ $steps -lt 10 ] && grep -q '^resumed from .* at step [1-9]' $W/kr.out &&
    cmp -s $W/full.lora $W/k.lora && cmp -s $W/full.lora.state $W/k.lora.state
check $? "train_lora: rank 1 killed after $steps of 10 steps (mpirun rc $rk): the checkpoint resumes on 2 ranks to the uninterrupted run, bit for bit"

./train_lora $K -o $W/k.lora --resume > $W/k1.out 2> $W/k1.err
[ $? = 1 ] && one_error $W/k1.err "saved by a run on 2 MPI ranks"
check $? "train_lora: a state saved by 2 ranks does not resume on 1 ($(head -c 100 $W/k1.err))"

# ranks that disagree stop together with one error from rank 0, before writing
E="-z build/llama3.tok --seq-len 32 --objective graddiff --forget $W/forget.txt --retain $W/retain.txt --steps 2 --batch 2"
$MPIRUN -np 1 build/mpi/train_lora train $MODEL $E -o $W/bad.lora : \
        -np 1 build/mpi/train_lora train build/models/tiny-3.2.q8.bin $E -o $W/bad.lora > /dev/null 2> $W/bad1.err
[ $? != 0 ] && one_error $W/bad1.err "the ranks disagree on the model file" && [ ! -e $W/bad.lora ] && [ ! -e $W/bad.lora.csv ]
check $? "train_lora: ranks with different model files -> one error, nothing written ($(grep '^error:' $W/bad1.err))"
$MPIRUN -np 1 build/mpi/train_lora train $MODEL $E -o $W/bad.lora : \
        -np 1 build/mpi/train_lora train $MODEL $E --rank 4 -o $W/bad.lora > /dev/null 2> $W/bad2.err
[ $? != 0 ] && one_error $W/bad2.err "the ranks disagree on the trainable parameters" && [ ! -e $W/bad.lora ]
check $? "train_lora: ranks with different adapter shapes -> one error ($(grep '^error:' $W/bad2.err))"
$MPIRUN -np 2 build/mpi/train_lora train $MODEL $E --batch 3 -o $W/bad.lora > /dev/null 2> $W/bad3.err
[ $? != 0 ] && one_error $W/bad3.err "multiples of the 2 MPI ranks"
check $? "train_lora: --batch 3 on 2 ranks -> one error ($(grep '^error:' $W/bad3.err))"

# --- sae --------------------------------------------------------------------
./sae capture $MODEL -z build/llama3.tok --layer 0 --data $W/forget.txt --seq-len 32 -o $W/one.acts > /dev/null 2>&1
$MPIRUN -np 2 build/mpi/sae capture $MODEL -z build/llama3.tok --layer 0 --data $W/forget.txt --seq-len 32 \
        -o $W/two.acts > /dev/null 2>&1
cmp -s $W/one.acts $W/two.acts
check $? "sae capture: 2 ranks sharing the rows == 1 process, cache bit for bit"

S="train $MODEL -z build/llama3.tok --layer 0 --data $W/forget.txt --seq-len 32 --tokens 2048 --buffer 256 --expansion 2 --topk 4"
./sae $S --batch 64 --accum 2 -o $W/one.sae > $W/sone.out 2>&1
r1=$?
$MPIRUN -np 2 build/mpi/sae $S --batch 128 -o $W/two.sae > $W/stwo.out 2>&1
r2=$?
[ $r1 = 0 ] && [ $r2 = 0 ] && cmp -s $W/one.sae $W/two.sae
check $? "sae train: 2 ranks x --batch 128 (capture shared) == 1 process --batch 64 --accum 2, SAE bit for bit"

$MPIRUN -np 1 build/mpi/sae $S --batch 128 -o $W/bad.sae : -np 1 build/mpi/sae $S --data $W/retain.txt --batch 128 \
        -o $W/bad.sae > /dev/null 2> $W/bad4.err
[ $? != 0 ] && one_error $W/bad4.err "the ranks disagree on the data" && [ ! -e $W/bad.sae ]
check $? "sae train: ranks with different --data -> one error, nothing written ($(grep '^error:' $W/bad4.err))"

echo "mpi: $pass passed, $fail failed"
[ $fail = 0 ]
