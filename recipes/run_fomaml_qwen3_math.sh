#!/usr/bin/env bash
# The guide's one-command launcher: meta-train on every visible GPU (one process per GPU, tasks spread
# over them). The recipe prepares data.data_dir from data.source first if it is missing.
#   bash recipes/run_fomaml_qwen3_math.sh [dotted overrides...]
#   bash recipes/run_fomaml_qwen3_math.sh data.source=../shared/data/MATH.tar.gz trainer.total_steps=2000
#   CONFIG=my_config.yaml bash recipes/run_fomaml_qwen3_math.sh
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG=${CONFIG:-recipes/configs/qwen3_4b_math.yaml}
NUM_GPUS=$(nvidia-smi --list-gpus 2>/dev/null | wc -l || true)
if [ "${NUM_GPUS:-0}" -gt 1 ]; then
  LAUNCH=(accelerate launch --multi_gpu --num_processes "$NUM_GPUS" --mixed_precision no)
else
  LAUNCH=(accelerate launch --num_processes 1 --mixed_precision no)
fi
echo "[run] ${NUM_GPUS:-0} GPU(s): ${LAUNCH[*]} recipes/fomaml_math.py --config $CONFIG $*"
exec "${LAUNCH[@]}" recipes/fomaml_math.py --config "$CONFIG" "$@"
