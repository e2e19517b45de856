#!/usr/bin/env bash
# RESULTS.md, QDyLoRA vs QLoRA: one QDyLoRA run (ranks 1..16) against QLoRA trained separately at
# ranks 2, 8 and 16, same data, steps, batch, learning rate and alpha. About 20 minutes on 2 CPU cores.
#   bash scripts/results_qdylora.sh && .venv/bin/python scripts/results_plot.py qdylora
source "$(dirname "$0")/results_common.sh"
$T train examples/qdylora.yaml output_dir="$OUT/qdylora-r16" train.max_steps="$STEPS" --overwrite
$T eval "$OUT/qdylora-r16" --ranks 1,2,3,4,6,8,12,16 --limit "$EVAL" --no-exact-match --json "$OUT/qdylora-r16.json"
for r in 2 8 16; do
  $T train examples/qlora.yaml method.r="$r" output_dir="$OUT/qlora-r$r" train.max_steps="$STEPS" --overwrite
  $T eval "$OUT/qlora-r$r" --limit "$EVAL" --no-exact-match --json "$OUT/qlora-r$r.json"
done
