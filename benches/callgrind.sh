#!/usr/bin/env bash
# Instruction counts of benches/throughput.rs under callgrind, per variant:
# numbers that load on the machine does not move, to compare two commits.
#
# Each variant runs alone (BENCH_ONLY=<its name>) in quick mode
# (BENCH_QUICK=1: one warm-up run and one timed run of 20,000 items),
# RUNS times, counted over the whole process (--collect-atstart=yes, the
# default). The table gives the total Ir per process, min / median / max
# over the runs, the noise (max - min) / median, and the median's Ir per
# item: total Ir divided by every item the process moved (warm-up
# included, 40,000 by default), so start-up, the tokio runtime and the
# pipeline builds are in it too. Callgrind runs one thread at a time, and
# how it interleaves them moves the counts a little from run to run.
#
#   benches/callgrind.sh                     # all six variants, 3 runs each
#   benches/callgrind.sh "tracking on" batched   # only variants whose name contains these
#   RUNS=5 BENCH_ITEMS=10000 benches/callgrind.sh
#
# Environment:
#   RUNS            runs per variant (3)
#   BENCH_ITEMS     items per timed run (quick mode's 20,000)
#   OUT             where the callgrind.out.*, logs and bench output go
#                   (target/callgrind/<commit>, "-dirty" with uncommitted changes)
#   CALLGRIND_ARGS  more valgrind options, e.g. --fair-sched=yes
#
# The callgrind.out files keep function-level counts (no per-line or
# per-instruction data), for `callgrind_annotate` on a difference.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v valgrind >/dev/null || { echo "valgrind is not installed" >&2; exit 1; }
RUNS=${RUNS:-3}
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || { echo "RUNS=$RUNS is not a positive number" >&2; exit 1; }

commit=$(git rev-parse --short HEAD)
[[ -z $(git status --porcelain --untracked-files=no) ]] || commit="$commit-dirty"
OUT=${OUT:-target/callgrind/$commit}
mkdir -p "$OUT"

bin=$(cargo bench --bench throughput --no-run --message-format=json \
  | grep '"kind":\["bench"\]' | grep '"name":"throughput"' \
  | grep -o '"executable":"[^"]*"' | cut -d'"' -f4)
[[ -x $bin ]] || { echo "throughput bench binary not found" >&2; exit 1; }

if (($# > 0)); then
  variants=("$@")
else
  variants=("async-channel mpmc" "tokio shared rx" "tokio rr channels"
    "tokio batched" "bergtalzug tracking on" "bergtalzug tracking off")
fi

echo "commit $commit, $(valgrind --version), $RUNS runs per variant, binary $bin"
echo "output in $OUT"
rows=()
for variant in "${variants[@]}"; do
  slug=${variant// /-}
  counts=()
  for ((run = 1; run <= RUNS; run++)); do
    base="$OUT/$slug.$run"
    # shellcheck disable=SC2086 # CALLGRIND_ARGS is a list of options
    BENCH_QUICK=1 BENCH_ONLY="$variant" valgrind --tool=callgrind \
      --collect-atstart=yes --dump-instr=no --dump-line=no \
      --callgrind-out-file="$base.out" --log-file="$base.log" \
      ${CALLGRIND_ARGS:-} "$bin" --bench >"$base.txt"
    ir=$(sed -n 's/^==[0-9]*== Collected : \([0-9]*\)$/\1/p' "$base.log")
    items=$(sed -n 's/^items run per variant: \([0-9]*\) .*/\1/p' "$base.txt")
    [[ -n $ir && -n $items ]] || { echo "no count in $base.log / $base.txt" >&2; exit 1; }
    echo "  $variant, run $run: $ir Ir, $items items"
    counts+=("$ir")
  done
  rows+=("$(printf '%s\n' "${counts[@]}" | sort -n | awk -v name="$variant" -v items="$items" '
    { v[NR] = $1 }
    END {
      med = NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
      printf "| %s | %.0f | %.0f | %.0f | %.2f %% | %.0f |\n",
        name, v[1], med, v[NR], 100 * (v[NR] - v[1]) / med, med / items
    }')")
done

echo
echo "Ir per process at $commit, $RUNS runs each, quick mode (${BENCH_ITEMS:-20000} timed items + warm-up):"
echo
echo "| variant | Ir min | Ir median | Ir max | (max-min)/median | Ir/item (median) |"
echo "|---|---:|---:|---:|---:|---:|"
printf '%s\n' "${rows[@]}"
