#!/usr/bin/env bash
# fuzz.sh NAME...: runs the libFuzzer harnesses tests/fuzz/fuzz_NAME (built by `make fuzz`) one after
# the other, each for FUZZ_SECONDS (60), seeded with its committed corpus tests/fuzz/corpus/NAME/.
#
# New inputs go to $FUZZ_OUT/NAME/new (tests/fuzz/out/NAME/new), which later runs start from too; the
# committed corpus only grows by a deliberate merge and commit. An input that crashes a harness (or
# leaks, or hangs past 30 s) is written to $FUZZ_OUT/NAME/crashes/; the summary says which, how to
# reproduce it, and to copy it into the corpus once fixed, so `make test` replays it from then on.
# Exits 1 when any harness crashed, 2 when one could not run.
cd "$(dirname "$0")/../.." || exit 2
seconds=${FUZZ_SECONDS:-60}
out=${FUZZ_OUT:-tests/fuzz/out}
crashed=0
broken=0

for name in "$@"; do
    bin=tests/fuzz/fuzz_$name
    corpus=tests/fuzz/corpus/$name
    dir=$out/$name
    if [ ! -x "$bin" ] || [ ! -d "$corpus" ]; then
        echo "fuzz $name: $bin or $corpus is missing (build with make fuzz-build; seeds go in $corpus)"
        broken=1
        continue
    fi
    mkdir -p "$dir/new" "$dir/crashes" || exit 2
    stamp=$dir/.started
    : > "$stamp"
    echo "fuzz $name: $seconds s (log: $dir/log)"
    "$bin" "$dir/new" "$corpus" -max_total_time="$seconds" -timeout=30 -print_final_stats=1 \
        -artifact_prefix="$dir/crashes/" > "$dir/log" 2>&1
    rc=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$dir/log" | tail -n 1)
    cov=$(grep -Eo 'cov: [0-9]+ ft: [0-9]+' "$dir/log" | tail -n 1)
    found=$(find "$dir/crashes" -type f -newer "$stamp" | sort)
    if [ -n "$found" ]; then
        crashed=1
        echo "fuzz $name: CRASHED after ${runs:-?} runs; the input:"
        for f in $found; do
            echo "  $f"
            echo "    reproduce:  $bin $f   (or tests/fuzz/replay_$name $f, without libFuzzer)"
            echo "    once fixed: cp $f $corpus/ && git add $corpus/$(basename "$f")"
        done
        grep -E '^(==[0-9]+==ERROR|SUMMARY|fuzz_)' "$dir/log" | head -n 5 | sed 's/^/    /'
    elif [ "$rc" -ne 0 ]; then
        broken=1
        echo "fuzz $name: exited $rc without a crash input; see $dir/log"
    else
        echo "fuzz $name: ${runs:-?} runs, no crash (${cov:-cov ?}); $(find "$dir/new" -type f | wc -l) inputs in $dir/new"
        echo "  to keep the new inputs that add coverage: $bin -merge=1 $corpus $dir/new, then commit $corpus"
    fi
    rm -f "$stamp"
done
[ "$broken" -eq 0 ] || exit 2
[ "$crashed" -eq 0 ] || exit 1
