#!/bin/sh
# Regenerates the committed reference dumps tests/ref_tiny-3.2.bin and
# tests/ref_tiny-3.0.bin (what `make refs` runs). POSIX sh.
#
#   PYTHON=/usr/bin/python3 sh tests/make_refs.sh [RUN_BINARY]
#
# Environment: PYTHON (a python3 with numpy), RUN (the C `run` binary,
# default ./run; the first argument overrides it), TOK (the tokenizer file,
# default build/llama3.tok, made with `export.py tokenizer` when missing).
#
# For each tiny preset: a synthetic checkpoint (seed 0) in build/synth/, the
# prompt tests/ref_prompt.txt tokenized by the C tokenizer with BOS prepended,
# and the numpy reference logits (export.py ref). Then it proves that the
# llama3 rope scaling matters at these positions: the tiny-3.2 reference with
# and without scaling must differ by far more than the test tolerance.
set -eu
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-/usr/bin/python3}
RUN=${1:-${RUN:-./run}}
TOK=${TOK:-build/llama3.tok}
BOS=128000

[ -x "$RUN" ] || { echo "make_refs.sh: $RUN not found (build it with make)" >&2; exit 1; }
mkdir -p build/synth
[ -f "$TOK" ] || "$PYTHON" export.py tokenizer tests/llama3/tokenizer.json.gz "$TOK"

# "$(cat ...)" drops the file's final newline: the prompt is the text itself
ids=$("$RUN" tokenize -z "$TOK" -i "$(cat tests/ref_prompt.txt)")
n=0
for id in $ids; do
    case "$id" in
        ''|*[!0-9]*) echo "make_refs.sh: unexpected tokenizer output: $id" >&2; exit 1 ;;
    esac
    n=$((n + 1))
done
[ "$n" -ge 150 ] || { echo "make_refs.sh: the prompt has only $n tokens (need >= 150)" >&2; exit 1; }
ids="$BOS,$(echo $ids | tr ' ' ',')"
echo "prompt: $n tokens + BOS"

for preset in tiny-3.2 tiny-3.0; do
    "$PYTHON" export.py synth "build/synth/$preset" --preset "$preset" --seed 0
    "$PYTHON" export.py ref "build/synth/$preset" "tests/ref_$preset.bin" --ids "$ids"
done

"$PYTHON" export.py ref build/synth/tiny-3.2 build/ref_tiny-3.2.noscale.bin --ids "$ids" --no-rope-scaling
echo "llama3 rope scaling on vs off (tiny-3.2):"
"$PYTHON" export.py refdiff tests/ref_tiny-3.2.bin build/ref_tiny-3.2.noscale.bin --expect-above 0.01
