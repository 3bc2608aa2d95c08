#!/usr/bin/env bash
# selection-reuse --dump and bench-ops --selection file agree: bench-ops times the attention on
# exactly the selections the model made, so the reuse it reports for them equals the model's.
# Usage: selection_file_test.sh SELECTION_REUSE BENCH_OPS MODEL_DIR TEXT
set -euo pipefail
reuse_bin=$1 bench_bin=$2 model=$3 text=$4
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
"$reuse_bin" --model "$model" --text "$text" --length 2048 --block_rows 8,16 \
  --dump "$dir/sel.bin" > "$dir/reuse.txt"
want8=$(sed -n 's/^ *8 rows per block: \([0-9.]*\) .*/\1/p' "$dir/reuse.txt")
want16=$(sed -n 's/^ *16 rows per block: \([0-9.]*\) .*/\1/p' "$dir/reuse.txt")
"$bench_bin" --device cpu --lengths 2048 --selection file --selection_file "$dir/sel.bin" \
  --reps 1 > "$dir/bench.txt"
got=$(sed -n 's/.*picks per distinct chunk in 8 \/ 16 rows \([0-9.]*\) \/ \([0-9.]*\)).*/\1 \2/p' \
  "$dir/bench.txt")
echo "selection-reuse: $want8 / $want16; bench-ops: $got"
[ -n "$want8" ] && [ "$got" = "$want8 $want16" ] && [ "$want8" != "1.00" ]
