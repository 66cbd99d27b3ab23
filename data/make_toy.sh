#!/bin/sh
# make toy: builds the toy world from its seed (what `make toy` runs).
#
#   1. data/gen_toy.py writes the corpus and the evaluation sets twice: with
#      the Harry Potter facts (toy-base) and without them (toy-gold, the
#      "retrain" model of TOFU/MUSE: the standard unlearning is judged by);
#   2. data/train_tokenizer.py learns a byte-level BPE on the full corpus,
#      with Llama-3's pre-tokenizer and special tokens;
#   3. train_lora train --init --full trains each model from scratch, same recipe,
#      same seed, same number of steps;
#   4. run qa measures what each model knows (greedy chat answers).
#
# The committed artifacts (data/toy/: tokenizer and both models) are what
# this script writes; the scratch files go to build/toy/.
# Environment: PYTHON (a python3; numpy only for export.py), STEPS (training
# steps per model, default below), TOY_OUT (default data/toy).
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${TOY_OUT:-data/toy}
B=build/toy
STEPS=${STEPS:-6000}
# dims are multiples of 64 so Q8_0 works: 4 layers, 4 query heads of 32,
# 2 key/value heads (GQA like Llama 3), untied classifier off (tied)
SPEC=dim=128,hidden_dim=512,n_layers=4,n_heads=4,n_kv_heads=2,max_seq_len=512
RECIPE="--objective sft --pack --seq-len 256 --batch 4 --lr 3e-3 --warmup 50 --schedule cosine --min-lr-frac 0.05 -s 1 --log-every 100"

mkdir -p "$OUT" "$B"
echo "== corpus and evaluation sets (data/gen_toy.py)"
"$PY" data/gen_toy.py "$B/base" --stats
"$PY" data/gen_toy.py "$B/gold" --no-hp
echo "== tokenizer (data/train_tokenizer.py)"
"$PY" data/train_tokenizer.py "$B/base/corpus.jsonl" "$OUT/tokenizer.json" --vocab 2048
"$PY" export.py tokenizer "$OUT/tokenizer.json" "$OUT/toy.tok"

for m in base gold; do
    echo "== toy-$m: training from scratch, $STEPS steps"
    ./train_lora train --init "$SPEC" -z "$OUT/toy.tok" --full --forget "$B/$m/corpus.jsonl" $RECIPE \
        --steps "$STEPS" --save-every "$STEPS" --log "$B/toy-$m.csv" -o "$B/toy-$m.bin"
    mv "$B/toy-$m.bin" "$OUT/toy-$m.bin"
done

echo "== what the models know (greedy chat answers; the answer must contain the gold one)"
for m in base gold; do
    for set in forget retain; do
        ./run qa "$OUT/toy-$m.bin" -z "$OUT/toy.tok" -i "$B/base/${set}_qa.tsv" -n 32 \
            -o "$B/toy-$m.$set.log" > "$B/toy-$m.$set.txt"
    done
done
# percent correct of a split in a `run qa` report
pct() { awk -v s="$2" '$1 == s { sub("%", "", $2); print $2 }' "$B/$1.txt"; }
bar() { # name value op limit
    if awk -v v="$2" -v l="$4" -v op="$3" 'BEGIN { exit !((op == ">=") ? v >= l : v <= l) }'; then
        printf '  %-36s %6s%%  (bar %s %s%%)  met\n' "$1" "$2" "$3" "$4"
    else
        printf '  %-36s %6s%%  (bar %s %s%%)  MISSED\n' "$1" "$2" "$3" "$4"; missed=1
    fi
}
missed=0
echo "toy world:"
bar "toy-base forget QA, trained phrasing" "$(pct toy-base.forget trained)" ">=" 90
bar "toy-base forget QA, held-out phrasing" "$(pct toy-base.forget heldout)" ">=" 50
bar "toy-base retain QA, trained phrasing" "$(pct toy-base.retain trained)" ">=" 90
bar "toy-base retain QA, held-out phrasing" "$(pct toy-base.retain heldout)" ">=" 50
bar "toy-gold forget QA, all phrasings" "$(pct toy-gold.forget total)" "<=" 5
bar "toy-gold retain QA, trained phrasing" "$(pct toy-gold.retain trained)" ">=" 90
[ "$missed" = 0 ] && echo "all bars met" || echo "some bars missed (see above)"
