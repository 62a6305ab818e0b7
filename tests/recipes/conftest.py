"""Fixtures of the recipe-level tests: one prepared synthetic data dir and one tiny Qwen3 per session.

No ``__init__.py`` here on purpose: it would make this directory a package named ``recipes`` and
shadow the repository's ``recipes`` package.
"""

from __future__ import annotations

import pytest
from recipe_helpers import RecipeInputs, run_args, run_in_process


@pytest.fixture(scope="session")
def recipe_inputs(tmp_path_factory) -> RecipeInputs:
    """A prepared synthetic data dir (40 problems per task) and a tiny Qwen3 (hidden 32, 2 layers)."""
    from recipes.build_tiny_model import main as tiny_model_main
    from recipes.prepare_math_data import main as prepare_main

    root = tmp_path_factory.mktemp("recipe_inputs")
    data_dir, model_dir = root / "data", root / "tiny_qwen3"
    code = prepare_main(
        ["--source", "synthetic", "--synthetic-per-task", "40", "--output-dir", str(data_dir), "--seed", "42"]
    )
    assert code == 0, "recipes/prepare_math_data.py failed on the synthetic suite"
    tiny_model_main([
        "--output-dir", str(model_dir), "--data-dir", str(data_dir), "--vocab-size", "512",
        "--hidden-size", "32", "--num-hidden-layers", "2", "--num-attention-heads", "2",
        "--num-key-value-heads", "1", "--head-dim", "16", "--intermediate-size", "64",
    ])
    return RecipeInputs(data_dir, model_dir)



@pytest.fixture(scope="session")
def fomaml_reference(recipe_inputs, tmp_path_factory):
    """The default 4-step FOMAML run of :func:`run_args`, one process: the reference of the
    multi-process tests and the run the SFT baseline matches tokens with."""
    import recipes.fomaml_math as fomaml

    out = tmp_path_factory.mktemp("fomaml_reference") / "run"
    assert run_in_process(fomaml.main, run_args(recipe_inputs, out)) == 0
    return out
