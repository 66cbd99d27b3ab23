#!/bin/sh
# Runs test_all built with -fsanitize=address,undefined (`make test-asan`,
# which builds build/asan/root/{run,train_lora,sae,guard,test_all} first).
# POSIX sh.
#
# test_all runs ./run, ./train_lora, ./sae and ./guard and reads data/,
# tests/ and build/ relative to its working directory. So the
# sanitized binaries live in build/asan/root, next to links to every other
# entry of the checkout, with their own build/ (fixtures made here by
# tests/prepare.sh, the tokenizer linked): nothing the normal `make test`
# writes is shared, and the two can run at the same time.
#
# Every sanitizer report goes to build/asan/logs/ (log_path): a report from
# a program that a test expects to fail would otherwise pass unnoticed. The
# run fails when test_all fails or when any report was written.
set -eu
cd "$(dirname "$0")/.."
ROOT=build/asan/root
LOGS=build/asan/logs
PY=${PYTHON:-/usr/bin/python3}
for p in run train_lora sae guard test_all; do
    [ -x "$ROOT/$p" ] || { echo "asan.sh: $ROOT/$p not built (make test-asan builds it)" >&2; exit 1; }
done

# the link farm: every top-level entry but the build outputs
for f in *; do
    case "$f" in
        build|run|train_lora|sae|guard|test_all|test_all_noblas|bench|*.o|*.d|fuzz-*.log) continue ;;
    esac
    ln -sfn "../../../$f" "$ROOT/$f"
done
mkdir -p "$ROOT/build"
ln -sfn ../../../llama3.tok "$ROOT/build/llama3.tok"
(cd "$ROOT" && PYTHON="$PY" sh tests/prepare.sh)

rm -rf "$LOGS"
mkdir -p "$LOGS"
LOG_ABS="$(pwd)/$LOGS"
# exitcode 86: a sanitizer report is never mistaken for the exit(1) of a
# clean error message. detect_leaks: a leak is a failure too.
ASAN_OPTIONS="detect_leaks=1:exitcode=86:abort_on_error=0:log_path=$LOG_ABS/asan:strict_string_checks=1:detect_stack_use_after_return=1"
UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=86:log_path=$LOG_ABS/ubsan"
export ASAN_OPTIONS UBSAN_OPTIONS
echo "test_all under ASan + UBSan (reports: $LOGS/)"
status=0
(cd "$ROOT" && ./test_all) > "$LOGS/test_all.out" 2>&1 || status=$?
grep -E '^(FAIL|engine:)' "$LOGS/test_all.out" || true
tail -n 1 "$LOGS/test_all.out"
reports=$(find "$LOGS" -name 'asan.*' -o -name 'ubsan.*' | sort)
if [ -n "$reports" ]; then
    for r in $reports; do echo "== $r"; head -n 40 "$r"; done
    echo "test-asan: FAILED: $(echo "$reports" | wc -l) sanitizer report(s) in $LOGS/"
    exit 1
fi
if [ "$status" -ne 0 ]; then
    echo "test-asan: FAILED: test_all exited with $status (output in $LOGS/test_all.out)"
    exit 1
fi
echo "test-asan: passed, no sanitizer reports"
