import os
from pathlib import Path

import pytest
import torch

# Nothing in the test suite may reach the network or a wandb server.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# vLLM (tests/test_vllm_backend.py) reports usage statistics to its server unless told not to.
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
MATH_ARCHIVE = REPO_ROOT.parent / "shared" / "data" / "MATH.tar.gz"


@pytest.fixture
def math_archive() -> Path:
    if not MATH_ARCHIVE.exists():
        pytest.skip(f"real MATH data not found at {MATH_ARCHIVE} (see ../shared/data/README.md)")
    return MATH_ARCHIVE


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: intra-op threads cost more than they save (10 s vs 60 s on 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
