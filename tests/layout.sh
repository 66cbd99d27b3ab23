#!/bin/sh
# Checks the repository's shape (run by `make test`):
#   - nothing reads a folder beside the checkout (a user's clone has none);
#   - the include graph goes one way: engine <- data/cli/dist <- eval <- methods
#     <- programs and tests; the engine includes no program or eval header;
#   - no C function is longer than 120 lines.
# POSIX sh + awk.
set -eu
cd "$(dirname "$0")/.."
mkdir -p build
fail=0
bad() { echo "layout: $*"; fail=1; }

# 1. no ../shared (or any sibling folder) in what builds, tests or runs
sibling=shared   # spelled in two parts so that this script does not match itself
hits=$(grep -rln "$sibling/" --include='*.c' --include='*.h' --include=Makefile --include='*.sh' --include='*.py' . \
       2>/dev/null | grep -v '^./build/' || true)
[ -z "$hits" ] || bad "a path into $sibling/ in: $hits"

# 2. layers: a file may include only headers of its own layer or below
layer() {
    case "$1" in
        run.h|unicode_ranges.h|engine.c|tokenizer.c|kernels.c|model_write.c) echo 0 ;;
        cli.h|cli.c|data.h|data.c|dist.h|dist.c) echo 1 ;;
        eval.h|eval.c) echo 2 ;;
        train_lora.h|train_lora.c|sae.h|sae.c|guard.h|guard.c) echo 3 ;;
        *) echo 4 ;;   # the programs, bench.c, test_all.c, fuzz.c
    esac
}
for f in *.c *.h; do
    lf=$(layer "$f")
    for h in $(sed -n 's/^#include "\([^"]*\)".*/\1/p' "$f"); do
        lh=$(layer "$h")
        [ "$lh" -le "$lf" ] || bad "$f (layer $lf) includes $h (layer $lh)"
        case "$h" in *.c) bad "$f includes the source file $h" ;; esac
    done
done

# 3. functions of at most 120 lines (a definition starts at column 0 and
#    ends at the first "}" in column 0)
for f in *.c; do
    awk -v f="$f" '
        /^[A-Za-z_].*\) *\{ *$/ && !/^(typedef|struct|enum|union)/ { start = NR; name = $0; next }
        /^[A-Za-z_].*[(,] *$/ && !/;/ && !start { start = NR; name = $0; next }
        /^\}/ && start { if (NR - start + 1 > 120) printf "layout: %s:%d: %d lines: %s\n", f, start, NR - start + 1, name; start = 0 }
    ' "$f"
done > build/layout.long 2>&1 || true
if [ -s build/layout.long ]; then cat build/layout.long; fail=1; fi

[ $fail -eq 0 ] && echo "layout: ok (no sibling paths, one-way includes, functions <= 120 lines)"
exit $fail
