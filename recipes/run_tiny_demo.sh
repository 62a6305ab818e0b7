#!/usr/bin/env bash
# The whole pipeline, offline, on CPU, in a few minutes:
#   embedded synthetic suite -> tiny random-init Qwen3 -> FOMAML -> SFT (matched training tokens)
#   -> few-shot comparison of base / SFT / FOMAML on identical episodes -> merged model.
# Everything goes under $OUT (default ./outputs/demo). Extra arguments are overrides for both runs.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-./outputs/demo}
CONFIG=recipes/configs/tiny_cpu.yaml
DATA=$OUT/data
MODEL=$OUT/tiny_qwen3
COMMON=(data.data_dir="$DATA" model.partial_pretrain="$MODEL" "$@")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} HF_HUB_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-offline}

echo "== 1/5 meta-train with FOMAML (prepares the suite and builds the tiny model on first use)"
lora-maml train --config "$CONFIG" trainer.default_local_dir="$OUT/fomaml" "${COMMON[@]}"

echo "== 2/5 the multi-task SFT baseline, matched to FOMAML's training tokens"
# (5x the steps of FOMAML at a fifth of the sequences per step: evaluate and save as often in wall time)
lora-maml sft --config "$CONFIG" trainer.default_local_dir="$OUT/sft" trainer.experiment_name=tiny_sft \
  sft.match_tokens_of="$OUT/fomaml" trainer.test_freq=100 trainer.save_freq=100 "${COMMON[@]}"

echo "== 3/5 few-shot comparison on identical episodes"
lora-maml eval --compare base="$MODEL" sft="$OUT/sft" fomaml="$OUT/fomaml" --data-dir "$DATA" \
  --n-shots 0 5 10 25 50 --seeds 2 --max-test-per-task 6 --max-new-tokens 40 \
  --metrics-jsonl "$OUT/fomaml/metrics.jsonl" "$OUT/sft/metrics.jsonl" --output-dir "$OUT/eval"

echo "== 4/5 merge the FOMAML adapter into the base"
lora-maml merge --checkpoint "$OUT/fomaml" --output "$OUT/merged" --overwrite

echo "== 5/5 done"
echo "results:  $OUT/eval/results.md"
echo "plots:    $OUT/eval/few_shot_curve.png $OUT/eval/learning_curves.png"
echo "merged:   $OUT/merged"
