#!/usr/bin/env bash
# The README's zoo table ("Gate a release in CI"): the three tiny zoo models on the same vrp-synth
# validation samples, evaluated one at a time, then `vrp-eval compare`. Rerun it after retraining a model:
#   bash docs/ci/zoo-table.sh [OUT]      (OUT defaults to runs/zoo; LIMIT=200 unless set)
# About 5 minutes per model on two CPU cores.
set -euo pipefail
OUT=${1:-runs/zoo}
LIMIT=${LIMIT:-200}
for model in tiny-llava tiny-paligemma tiny-qwen2vl; do
  vrp-eval run --model "$model" --limit "$LIMIT" --output "$OUT/$model" --overwrite
done
vrp-eval compare "$OUT/tiny-llava" "$OUT/tiny-paligemma" "$OUT/tiny-qwen2vl" --output "$OUT"
