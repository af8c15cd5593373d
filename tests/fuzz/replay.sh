#!/usr/bin/env bash
# replay.sh: replays the committed corpus of every harness tests/fuzz/fuzz_NAME.c through
# tests/fuzz/replay_NAME (built by `make fuzz-replays`, part of `make test` and `make asan`), one check
# per harness. A harness aborts on a broken property, so a failing check names the corpus inputs
# that fail, each replayed on its own. Ends with `N passed, N failed`.
cd "$(dirname "$0")/../.." || exit 2
passed=0
failed=0

for src in tests/fuzz/fuzz_*.c; do
    [ -f "$src" ] || continue
    name=${src#tests/fuzz/fuzz_}
    name=${name%.c}
    bin=tests/fuzz/replay_$name
    corpus=tests/fuzz/corpus/$name
    if [ ! -x "$bin" ]; then
        echo "not ok - fuzz/$name: $bin is not built (the Makefile needs FUZZ_TARGETS += $name; make fuzz-replays)"
        failed=$((failed + 1))
        continue
    fi
    count=$(find "$corpus" -type f ! -name '.*' 2>/dev/null | wc -l)
    if [ "$count" -eq 0 ]; then
        echo "not ok - fuzz/$name: no corpus in $corpus (commit the seeds there)"
        failed=$((failed + 1))
        continue
    fi
    if out=$("$bin" "$corpus" 2>&1); then
        echo "ok - fuzz/$name: the corpus replayed ($count inputs)"
        passed=$((passed + 1))
        continue
    fi
    bad=""
    for f in "$corpus"/*; do
        [ -f "$f" ] || continue
        "$bin" "$f" > /dev/null 2>&1 || bad="$bad $f"
    done
    echo "not ok - fuzz/$name: the corpus fails on:${bad:- (no single input; see below)}; reproduce: $bin FILE"
    printf '%s\n' "$out" | tail -n 20 | sed 's/^/#   /'
    failed=$((failed + 1))
done

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
