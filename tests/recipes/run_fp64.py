"""``python run_fp64.py SCRIPT ARGS...``: run the recipe SCRIPT (as ``__main__``, e.g. under torchrun) with
the tiny Qwen3 fp64 throughout (``tests/test_meta_gradients.fp64_throughout``), so that fp64 runs can be
compared at fp64 tolerances."""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_meta_gradients import fp64_throughout  # noqa: E402  (needs the path above)

if __name__ == "__main__":
    script, sys.argv = sys.argv[1], sys.argv[1:]
    with fp64_throughout():
        runpy.run_path(script, run_name="__main__")
