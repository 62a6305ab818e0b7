#!/usr/bin/env bash
# The guide's one-command launcher: prepare MATH if missing, then meta-train on every visible GPU.
#   bash recipes/run_fomaml_qwen3_math.sh [dotted overrides...]
#   CONFIG=recipes/configs/qwen3_4b_math.yaml MATH_SOURCE=../shared/data/MATH.tar.gz bash recipes/run_fomaml_qwen3_math.sh
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG=${CONFIG:-recipes/configs/qwen3_4b_math.yaml}
# data_dir / source / ratios come from the config (overridable on the command line like any key).
read -r DATA_DIR SOURCE SUPPORT QUERY SEED < <(python - "$CONFIG" "$@" <<'PY'
import sys
from lora_maml.config import load_config
cfg = load_config(sys.argv[1], sys.argv[2:])
print(cfg.data.data_dir, cfg.data.source, cfg.data.support_ratio, cfg.data.query_ratio, cfg.trainer.seed)
PY
)
SOURCE=${MATH_SOURCE:-$SOURCE}

if [ ! -f "$DATA_DIR/manifest.json" ]; then
  echo "[run] preparing $SOURCE -> $DATA_DIR"
  lora-maml prepare --source "$SOURCE" --output-dir "$DATA_DIR" \
    --support-ratio "$SUPPORT" --query-ratio "$QUERY" --seed "$SEED" --validate
fi

if command -v nvidia-smi >/dev/null 2>&1; then
  NUM_GPUS=$(nvidia-smi --list-gpus | wc -l)
else
  NUM_GPUS=0
fi
if [ "$NUM_GPUS" -gt 1 ]; then
  LAUNCH=(accelerate launch --multi_gpu --num_processes "$NUM_GPUS" --mixed_precision no)
else
  LAUNCH=(accelerate launch --num_processes 1 --mixed_precision no)
fi
echo "[run] ${NUM_GPUS} GPU(s): ${LAUNCH[*]}"
exec "${LAUNCH[@]}" recipes/fomaml_math.py --config "$CONFIG" "$@"
