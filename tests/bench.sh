#!/bin/sh
# tests/bench.sh -- the benchmark suite behind `make bench`
# (docs/performance.md). Runs, on the synthetic models of build/bench/ (random
# weights; the Makefile makes them once):
#
#   run bench    decode and prompt speed of the 1.04B shape (Llama-3.2-1B
#                dims, 32000 vocab), fp32 and int8, with the memory read
#                bandwidth and sgemm rate measured in the same process, and
#                the roofline fractions (see run bench --help)
#   train_lora   LoRA training on the full Llama-3.2-1B shape (128256 vocab),
#                B*T = 256 (--batch 1 --seq-len 256), rank 8 on q,v, fp32 and int8 base:
#                tok/s per optimizer step, and the peak RSS of the process
#   sae train    a TopK SAE (d 2048, 16384 latents, k 32) on layer 7 of the
#                same model: capture tok/s (the forward through layers 0..7
#                into the activation cache) and training tok/s per step
#   mpi          (BENCH_MPI=1, make bench MPI=1; docs/mpi.md) LoRA training of
#                the int8 1B model under mpirun: 1 and 2 ranks of one OpenMP
#                thread each (B*T = 256 per rank) against one process of two
#                threads (B*T = 512), and the allreduce time and bytes per step
#                for rank-8 and rank-64 adapters on all targets
#
# Every value is a median of BENCH_REPS repetitions (timed steps after one
# untimed warm-up step for train_lora and sae). Writes BENCH_DIR/results.csv
# (one schema for every row: metric,weights,model,value,unit,n,min,max),
# results.json (the same rows) and results.md (the table it prints). It
# measures and reports; it asserts no speed.
#
# Environment: BENCH_REPS (5), BENCH_DIR (build/bench), BENCH_DECODE (32
# tokens), BENCH_PREFILL (128,512), BENCH_SAE_LAYER (7), BENCH_PARTS
# ("engine lora sae", plus mpi with BENCH_MPI=1: a subset runs only those),
# BENCH_MPI_MODEL (the mpi part's model, default BENCH_DIR/1b.q8.bin), BENCH_8B (0; 1 adds
# Llama-3-8B int8: decode, a 128-token prompt and LoRA training, as a third
# column), PYTHON (python3; used for
# getrusage(RUSAGE_CHILDREN), so no /usr/bin/time is needed), TOK
# (build/llama3.tok).
set -eu
REPS=${BENCH_REPS:-5}
DIR=${BENCH_DIR:-build/bench}
DECODE=${BENCH_DECODE:-32}
PREFILL=${BENCH_PREFILL:-128,512}
SAE_LAYER=${BENCH_SAE_LAYER:-7}
PARTS=${BENCH_PARTS:-engine lora sae}
[ "${BENCH_MPI:-0}" = 1 ] && [ -z "${BENCH_PARTS:-}" ] && PARTS="$PARTS mpi"
MPI_MODEL=${BENCH_MPI_MODEL:-$DIR/1b.q8.bin}
BIG=${BENCH_8B:-0}
PY=${PYTHON:-python3}
TOK=${TOK:-build/llama3.tok}
LOGS=$DIR/logs
WORK=$DIR/work

case $REPS in ''|*[!0-9]*|0) echo "error: BENCH_REPS must be a positive integer, got '$REPS'"; exit 1 ;; esac
has_part() { case " $PARTS " in *" $1 "*) return 0 ;; esac; return 1; }
for p in $PARTS; do
    case $p in engine|lora|sae|mpi) ;; *) echo "error: unknown BENCH_PARTS entry '$p' (engine, lora, sae, mpi)"; exit 1 ;; esac
done
need() { [ -f "$1" ] || { echo "error: $1 is missing (make bench builds it)"; exit 1; }; }
if has_part engine; then need $DIR/1b-32k.f32.bin; need $DIR/1b-32k.q8.bin; fi
if has_part lora || has_part sae; then need $DIR/1b.f32.bin; need $DIR/1b.q8.bin; need "$TOK"; fi
if has_part mpi; then need "$MPI_MODEL"; need build/mpi/train_lora; need "$TOK"; fi
case $BIG in 0) ;; 1) need $DIR/8b.q8.bin; need "$TOK" ;; *) echo "error: BENCH_8B must be 0 or 1, got '$BIG'"; exit 1 ;; esac
mkdir -p "$LOGS" "$WORK"
ROWS=$WORK/rows.csv
: > "$ROWS"

# Runs a program with its output in LOGS/NAME.log; on failure shows the log.
logged() {
    name=$1; shift
    if ! "$@" > "$LOGS/$name.log" 2>&1; then
        tail -n 20 "$LOGS/$name.log"
        echo "error: $name failed (log $LOGS/$name.log)"
        exit 1
    fi
}

# The peak RSS of one command, in KiB: getrusage(RUSAGE_CHILDREN) in a
# parent whose only child is the command.
PEAK_RSS='import resource, subprocess, sys
rc = subprocess.call(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    f.write("%d\n" % resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(rc)'

# Reads numbers, one a line; prints "median n min max" (the median of an
# even count is the mean of the middle two).
stats() {
    sort -g | awk 'NF { v[++n] = $1 } END {
        if (n == 0) { print "nan 0 nan nan"; exit }
        m = n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
        printf "%.6g %d %.6g %.6g\n", m, n, v[1], v[n] }'
}

# add_row METRIC WEIGHTS MODEL UNIT: a measured row from the numbers on stdin
add_row() {
    set -- "$1" "$2" "$3" "$4" $(stats)
    if [ "$6" = 0 ]; then echo "$1,$2,$3,,$4,,," >> "$ROWS"   # nothing measured: empty fields
    else echo "$1,$2,$3,$5,$4,$6,$7,$8" >> "$ROWS"; fi
}

# The page cache holds the model files between programs (11.5 GB in all);
# reading one first keeps disk reads out of the first timed step.
warm() { cat "$1" > /dev/null; }

# A fixed plain-text corpus from committed data (question and answer of each
# row): about 2700 tokens, 11 rows of 256.
TEXT=$WORK/text.txt
cut -f1,2 data/real_retain_qa.tsv data/small_talk.tsv | tr '\t' ' ' > "$TEXT"

if has_part engine; then
    for w in f32 q8; do
        echo "== run bench $DIR/1b-32k.$w.bin (reps $REPS, decode $DECODE, prefill $PREFILL)"
        logged engine-$w ./run bench $DIR/1b-32k.$w.bin --reps "$REPS" --decode "$DECODE" --prefill "$PREFILL" \
            --csv $WORK/engine-$w.csv
        tail -n +2 $WORK/engine-$w.csv >> "$ROWS"
    done
fi

# lora_bench NAME MODEL WEIGHTS: LoRA training tok/s and peak RSS of one model
lora_bench() {
    tag=$1 model=$2 wt=$3   # (not "name": logged() sets that; sh has no locals)
    steps=$((REPS + 1))
    echo "== train_lora $DIR/$model: $steps steps of B*T = 256, rank 8, q,v"
    warm $DIR/$model
    rm -f $WORK/lora-$tag.lora $WORK/lora-$tag.lora.csv $WORK/lora-$tag.lora.state
    logged lora-$tag "$PY" -c "$PEAK_RSS" $WORK/lora-$tag.rss ./train_lora train $DIR/$model -z "$TOK" \
        --objective sft --forget "$TEXT" --batch 1 --seq-len 256 --rank 8 --targets q,v --steps $steps \
        --save-every 0 -o $WORK/lora-$tag.lora --log $WORK/lora-$tag.lora.csv
    [ -s $WORK/lora-$tag.lora.csv ] && [ -s $WORK/lora-$tag.rss ] || { echo "error: train_lora wrote no log or RSS for $model"; exit 1; }
    # B*T = 256 positions over each step's time (differences of the log's
    # elapsed_s, column 11), every step but the first. Not the log's
    # tokens_per_s: that counts loss tokens, fewer in the one short row at
    # the end of the text.
    awk -F, 'NR > 1 { if (NR > 2 && $11 > prev) print 256 / ($11 - prev); prev = $11 }' $WORK/lora-$tag.lora.csv |
        add_row lora_train $wt $model tok/s
    echo "lora_train_peak_rss,$wt,$model,$(awk '{ printf "%.0f", $1 / 1024 }' $WORK/lora-$tag.rss),MiB,,," >> "$ROWS"
}

if has_part lora; then
    lora_bench f32 1b.f32.bin fp32
    lora_bench q8 1b.q8.bin int8
fi

# Llama-3-8B in int8 (BENCH_8B=1): the engine on a 128-token prompt, and
# LoRA training; its rows carry the model name 8b.q8.bin
if [ "$BIG" = 1 ]; then
    echo "== run bench $DIR/8b.q8.bin (reps $REPS, decode $DECODE, prefill 128)"
    warm $DIR/8b.q8.bin
    logged engine-8b ./run bench $DIR/8b.q8.bin --reps "$REPS" --decode "$DECODE" --prefill 128 --csv $WORK/engine-8b.csv
    tail -n +2 $WORK/engine-8b.csv | grep -v '^engine,\|^threads,' >> "$ROWS"
    lora_bench 8b 8b.q8.bin int8
fi

if has_part sae; then
    for w in f32 q8; do
        wt=fp32; [ $w = q8 ] && wt=int8
        steps=$((REPS + 1))
        echo "== sae train $DIR/1b.$w.bin --layer $SAE_LAYER: capture, then $steps steps of 2048 tokens"
        warm $DIR/1b.$w.bin
        rm -f $WORK/sae-$w.cache $WORK/sae-$w.sae
        logged sae-$w ./sae train $DIR/1b.$w.bin -z "$TOK" --layer "$SAE_LAYER" --data "$TEXT" --batch 2048 \
            --tokens $((steps * 2048)) --log-every 1 --save-every 0 --cache $WORK/sae-$w.cache -o $WORK/sae-$w.sae
        # capture: the last "cache: R/R rows, N tokens, X tok/s" report (one
        # pass over the data; its \r-separated updates are split first)
        tr '\r' '\n' < $LOGS/sae-$w.log | awk '/^cache: .* tok\/s/ { x = $(NF - 1) } END { print x }' |
            add_row sae_capture $wt 1b.$w.bin tok/s
        # training: the progress lines carry cumulative tokens and tok/s,
        # so each step's rate is its tokens over the difference of the
        # cumulative times; the first step is the warm-up
        awk '/^step .* tok\/s/ {
                 for (i = 1; i <= NF; i++) { if ($i == "tok") tok = $(i - 1); if ($i == "tok/s") rate = $(i - 1) }
                 t = rate > 0 ? tok / rate : 0
                 if (n++ > 0 && t > prev_t) print (tok - prev_tok) / (t - prev_t)
                 prev_t = t; prev_tok = tok }' $LOGS/sae-$w.log | add_row sae_train $wt 1b.$w.bin tok/s
    done
fi

# mpi_bench TAG RANKS THREADS BATCH RANK: train_lora on RANKS ranks (0 = one
# process without mpirun) of THREADS threads, --batch BATCH rows of 256,
# LoRA rank RANK on all targets: tok/s per step (positions over each step's
# time, the first step a warm-up), and with ranks rank 0's allreduce line
mpi_bench() {
    tag=$1 np=$2 th=$3 b=$4 r=$5
    steps=$((REPS + 1))
    wt=fp32; case $MPI_MODEL in *q8*) wt=int8 ;; esac
    model=$(basename "$MPI_MODEL")
    echo "== train_lora $MPI_MODEL: $steps steps, ranks $np x $th threads, --batch $b --seq-len 256, rank $r (all targets)"
    rm -f $WORK/mpi-$tag.lora $WORK/mpi-$tag.lora.csv $WORK/mpi-$tag.lora.state
    set -- train "$MPI_MODEL" -z "$TOK" --objective sft --forget "$TEXT" --batch $b --seq-len 256 --rank $r \
        --steps $steps --save-every 0 -o $WORK/mpi-$tag.lora --log $WORK/mpi-$tag.lora.csv
    if [ $np = 0 ]; then logged mpi-$tag env OMP_NUM_THREADS=$th ./train_lora "$@"
    else logged mpi-$tag mpirun $MPI_ROOT --oversubscribe -np $np -x OMP_NUM_THREADS=$th build/mpi/train_lora "$@"; fi
    awk -F, -v pos=$((b * 256)) 'NR > 1 { if (NR > 2 && $11 > prev) print pos / ($11 - prev); prev = $11 }' \
        $WORK/mpi-$tag.lora.csv | add_row mpi_train_$tag $wt $model tok/s
    [ $np -gt 1 ] || return 0
    # "allreduce: 2 ranks, X ms per step, Y bytes per step (...), after Z ms per step waiting ..."
    line=$(grep '^allreduce:' $LOGS/mpi-$tag.log)
    echo "$line" | awk '{ print $4 }' | add_row mpi_allreduce_ms_r$r $wt $model ms
    echo "$line" | awk '{ print $8 }' | add_row mpi_allreduce_bytes_r$r $wt $model bytes
}

if has_part mpi; then
    MPI_ROOT=; [ "$(id -u)" = 0 ] && MPI_ROOT=--allow-run-as-root   # a CI container runs as root
    warm "$MPI_MODEL"
    mpi_bench 1rank 1 1 1 8
    mpi_bench 2ranks 2 1 2 8
    mpi_bench 2threads 0 2 2 8
    mpi_bench 2ranks_r64 2 1 2 64
fi

# results.csv: the header of run bench's CSV, then every row
{ echo "metric,weights,model,value,unit,n,min,max"; cat "$ROWS"; } > $DIR/results.csv

# results.json: the same rows as objects; empty fields are null, the engine
# row's value is a string (the only quoted CSV field)
awk -v reps="$REPS" '
    function str(s) { gsub(/\\/, "\\\\", s); gsub(/"/, "\\\"", s); return "\"" s "\"" }
    function num(s) { return s == "" ? "null" : s }
    NR == 1 { printf "{\n  \"reps\": %d,\n  \"rows\": [", reps; next }
    {
        if ($0 ~ /^engine,/) {   # engine,W,M,"text",,,,
            split($0, f, ","); q1 = index($0, "\""); rest = substr($0, q1 + 1)
            text = substr(rest, 1, length(rest) - 5); gsub(/""/, "\"", text)
            value = str(text); unit = ""; n = ""; lo = ""; hi = ""
        } else {
            split($0, f, ","); value = num(f[4]); unit = f[5]; n = f[6]; lo = f[7]; hi = f[8]
        }
        printf "%s\n    {\"metric\": %s, \"weights\": %s, \"model\": %s, \"value\": %s, \"unit\": %s, \"n\": %s, \"min\": %s, \"max\": %s}",
            (NR > 2 ? "," : ""), str(f[1]), str(f[2]), str(f[3]), value, str(unit), num(n), num(lo), num(hi)
    }
    END { printf "\n  ]\n}\n" }' $DIR/results.csv > $DIR/results.json

# The table: one line per metric, fp32 and int8 side by side
awk -v reps="$REPS" -v decode="$DECODE" -v prefill="$PREFILL" -v layer="$SAE_LAYER" '
    NR == 1 { next }
    /^engine,/ { q1 = index($0, "\""); rest = substr($0, q1 + 1); engine = substr(rest, 1, length(rest) - 5); next }
    # Llama-3-8B rows are a third column, keyed "8b"
    { split($0, f, ","); w = f[3] ~ /^8b/ ? "8b" : f[2]; v[f[1], w] = f[4]; if (w == "8b") big = 1 }
    function cell(m, w, fmt, scale) {
        return ((m, w) in v) && v[m, w] != "" ? sprintf(fmt, v[m, w] / (scale == "" ? 1 : scale)) : "-" }
    function line(label, m, fmt, scale) {
        if (!(((m, "fp32") in v) || ((m, "int8") in v) || ((m, "8b") in v))) return
        printf "| %s | %s | %s |", label, cell(m, "fp32", fmt, scale), cell(m, "int8", fmt, scale)
        if (big) printf " %s |", cell(m, "8b", fmt, scale)
        printf "\n" }
    END {
        printf "Engine: %s. Medians of %d repetitions.\n\n", engine == "" ? "(not run)" : engine, reps
        if (big) printf "| | fp32 | int8 (Q8_0) | Llama-3-8B int8 |\n|---|---:|---:|---:|\n"
        else printf "| | fp32 | int8 (Q8_0) |\n|---|---:|---:|\n"
        line("decode, tok/s (1.04B: 1B dims, 32k vocab; " decode " tokens)", "decode", "%.2f")
        n_p = split(prefill, lens, ",")
        for (i = 1; i <= n_p; i++) line("prefill " lens[i] "-token prompt, tok/s", "prefill_" lens[i], "%.1f")
        line("memory read bandwidth, GB/s (in process)", "read_bw", "%.1f")
        line("memory triad bandwidth, GB/s", "triad_bw", "%.1f")
        line("sgemm 2048^3 via gemm(), GFLOP/s", "sgemm_2048", "%.1f")
        line("sgemm prefill shapes (128 rows x 7 projections), GFLOP/s", "sgemm_prefill", "%.1f")
        line("int8 GEMM (matmul_q8) prefill shapes, GOP/s", "q8gemm_prefill", "%.1f")
        line("bytes read per decoded token, GB (weights as stored, KV cache)", "decode_bytes_per_token", "%.3f", 1e9)
        line("decode roofline fraction (tok/s x bytes/token / read bandwidth, per run)", "decode_roofline", "%.2f")
        for (i = 1; i <= n_p; i++) line("prefill " lens[i] " GEMM fraction (prefill FLOP/s / the GEMM rate above: sgemm for fp32, int8 GEMM for int8)",
                                        "prefill_" lens[i] "_gemm_frac", "%.2f")
        line("peak RSS of run bench (model, KV cache, buffers), MiB", "peak_rss", "%.0f")
        line("LoRA training, tok/s (1.24B: 1B, 128k vocab; B*T 256, r 8, q,v)", "lora_train", "%.1f")
        line("LoRA training peak RSS, MiB", "lora_train_peak_rss", "%.0f")
        line("SAE capture, tok/s (one pass: layers 0.." layer " into the cache)", "sae_capture", "%.1f")
        line("SAE training, tok/s (d 2048, 16384 latents, k 32, batch 2048)", "sae_train", "%.1f")
        line("MPI: LoRA training, 1 rank x 1 thread, tok/s (B*T 256, r 8, all targets)", "mpi_train_1rank", "%.1f")
        line("MPI: LoRA training, 2 ranks x 1 thread, tok/s (B*T 2 x 256)", "mpi_train_2ranks", "%.1f")
        line("MPI: LoRA training, 1 process x 2 threads, tok/s (B*T 512)", "mpi_train_2threads", "%.1f")
        for (r = 8; r <= 64; r *= 8) {   # the adapter ranks of the allreduce rows
            line("MPI: allreduce per step, ms (2 ranks, rank " r ")", "mpi_allreduce_ms_r" r, "%.2f")
            line("MPI: allreduce bytes per step, MB (rank " r ")", "mpi_allreduce_bytes_r" r, "%.2f", 1e6)
        }
    }' $DIR/results.csv > $DIR/results.md

echo
cat $DIR/results.md
echo
echo "wrote $DIR/results.csv, $DIR/results.json, $DIR/results.md (logs in $LOGS)"
