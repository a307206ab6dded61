#!/usr/bin/env bash
# Your own taxonomy end to end on the tiny model, on the CPU (about two minutes):
# data → rule annotation → train (convert, router, sft, refit) → predict → score.
#
#   bash examples/custom-taxonomy/run.sh                  # writes examples/custom-taxonomy/{data,runs}
#   OUT=/tmp/wh N=60 EPOCHS=1 bash examples/custom-taxonomy/run.sh  # elsewhere, smaller (the tests' run)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=$(mkdir -p "${OUT:-$HERE}" && cd "${OUT:-$HERE}" && pwd)
N=${N:-600}
EPOCHS=${EPOCHS:-3}
MOSE=${MOSE:-mose}
PY=${PY:-python}
cd "$HERE"  # the recipe, taxonomy and rules name one another relative to this folder

$MOSE taxonomy warehouse.yaml
$PY make_data.py --out "$OUT/data" --n "$N" --test $((N / 6 + 3))
for split in train test; do
  $MOSE annotate --taxonomy warehouse.yaml --rules rules.yaml \
    --data "$OUT/data/$split.jsonl" --out "$OUT/data/$split.labelled.jsonl"
done
$MOSE train --config recipe.yaml --no-progress output_dir="$OUT/runs/warehouse" \
  data.train="$OUT/data/train.labelled.jsonl" stages.router.labelled="$N" stages.refit.labelled="$N" \
  stages.sft.epochs="$EPOCHS"
$MOSE predict --model "$OUT/runs/warehouse/refit" --data "$OUT/data/test.labelled.jsonl" \
  --out "$OUT/runs/warehouse/predictions.jsonl" --max-new-tokens 8 --device cpu
$MOSE score world --pred "$OUT/runs/warehouse/predictions.jsonl" --ref "$OUT/data/test.labelled.jsonl" \
  --out "$OUT/runs/warehouse/scores.json"
