#!/usr/bin/env bash
# The tail check (tune's tail_rows) against none, on the selection split's cells whose
# choices differ between benchmarks/tuned_selection.csv.gz (tail_rows=0) and
# benchmarks/tuned_selection_tail.csv.gz (tail_rows=8), both re-scored on 512 new noises.
# Usage: benchmarks/tuned_selection_tail_rescore.sh OUTDIR   (about 35 minutes on 2 cores)
# Then: python -m dpmsolver.bench.tuned --from-csv "$(ls OUTDIR/*_tail.csv.gz | paste -sd,)" \
#         --compare "$(ls OUTDIR/*_base.csv.gz | paste -sd,)"
set -euo pipefail
out=${1:?usage: $0 OUTDIR}
mkdir -p "$out"
while read -r problem guidance; do
  for arm_rows in base:0 tail:8; do
    arm=${arm_rows%:*}
    python -m dpmsolver.bench.tuned --split selection --problems "$problem" \
      --guidance "$guidance" --jobs 2 --no-cost --rescore 512 --set "tail_rows=${arm_rows#*:}" \
      --csv "$out/${problem}_${arm}.csv.gz" --out "$out/${problem}_${arm}.md" > /dev/null
  done
  echo "$problem done" >> "$out/progress"
done <<'PAIRS'
diag16-flow 3,7.5,15
ill256-edm 3
ill32-flow3 1,3,7.5,15
ill8-flow 1,7.5
iso1024-flow3 3,15
iso256-sd 1
lowrank128-flow 1,3,15
lowrank16-flow3 3,15
lowrank32-flow 1,3,7.5,15
lowrank512-sd 1,3
lowrank64-cos 3
lowrank64-vplin 1,3,7.5,15
mix16-sd 1,15
PAIRS
echo "ALL DONE" >> "$out/progress"
