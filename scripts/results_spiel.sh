#!/usr/bin/env bash
# RESULTS.md, SpIEL vs LoRA: SpIEL-AG and SpIEL-MA with the trainable count of an all-linear LoRA r=16
# (4,884,480 on SmolLM2-135M), LoRA r=16, and full fine-tuning as a reference; same data and steps.
#   bash scripts/results_spiel.sh && .venv/bin/python scripts/results_plot.py spiel
#   ONLY="lora-r16" bash scripts/results_spiel.sh   re-runs only the named runs
source "$(dirname "$0")/results_common.sh"
ONLY=${ONLY:-spiel-ag spiel-ma lora-r16 full}
run() {  # name, config, overrides...
  local name=$1 config=$2; shift 2
  [[ " $ONLY " == *" $name "* ]] || return 0
  $T train "$config" output_dir="$OUT/$name" train.max_steps="$STEPS" "$@" --overwrite
  $T eval "$OUT/$name" --limit "$EVAL" --no-exact-match --json "$OUT/$name.json"
}
# RESULTS.md §2 predates the reference-recipe example: pin its budget, lr, decay and clipping
OLD_RECIPE="method.num_tunable=4884480 train.lr=2e-4 train.weight_decay=0 train.max_grad_norm=1.0"
run spiel-ag examples/spiel.yaml $OLD_RECIPE method.regrowth=ag
run spiel-ma examples/spiel.yaml $OLD_RECIPE method.regrowth=ma train.lr=1e-3
run lora-r16 examples/lora.yaml method.r=16 train.lr=1e-3 data.max_length=256 train.batch_size=4 \
  train.scheduler=linear train.save_steps=0 train.eval_steps=0 train.epochs=1
run full examples/full.yaml data.max_length=256 train.batch_size=4
