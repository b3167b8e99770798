#!/usr/bin/env bash
# Does multi-interest earn its keep? SASRec, SINE with K = 1 and SINE trained side by side, one
# process (one thread) each, started together, under one wall-clock budget: a 2-core machine
# gives each the same share. Then the planted-interest control and its sweep, the same way.
# Writes benchmarks/results/accuracy-{ml-1m,amazon-beauty,synthetic-mix}.{json,md}.
#
#   bash benchmarks/side_by_side.sh            # about 55 minutes on 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."
logs=runs/bench/logs
mkdir -p "$logs"
B=".venv/bin/python -m benchmarks.accuracy --threads 1 --no-progress"
for v in sasrec k1 sine; do
  $B --dataset ml-1m --variants "$v" --epochs 3 --max-minutes 20 --tag side > "$logs/ml1m-$v.log" 2>&1 &
done; wait
for v in sasrec k1 sine; do
  $B --dataset amazon-beauty --variants "$v" --epochs 6 --max-minutes 15 --tag side > "$logs/beauty-$v.log" 2>&1 &
done; wait
$B --dataset synthetic-mix --variants popularity > "$logs/mix-pop.log" 2>&1
for v in sasrec k1 sine; do
  $B --dataset synthetic-mix --variants "$v" --epochs 2 --max-minutes 14 --tag side > "$logs/mix-$v.log" 2>&1 &
done
for s in K=8 tau=1.0 tau_assign=0.03; do
  t=$(echo "$s" | tr -d '=._')
  $B --dataset synthetic-mix --variants sine --epochs 2 --max-minutes 14 --set "$s" --tag "side-$t" \
    > "$logs/mix-$t.log" 2>&1 &
done; wait
for d in ml-1m amazon-beauty synthetic-mix; do $B --dataset "$d" --merge-only > /dev/null; done
