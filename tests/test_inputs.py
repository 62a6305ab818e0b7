"""lora_maml.inputs: the fingerprints a checkpoint records of its data and base, what changes them and what not."""

import os
import shutil
import struct

from lora_maml.data.prepare import prepare, read_manifest
from lora_maml.data.synthetic import synthetic_records
from lora_maml.inputs import base_changes, base_fingerprint, data_changes, data_fingerprint
from lora_maml.tiny_model import build_tiny_model

TEXTS = ["What is $1+2$? The sum is $\\boxed{3}$.", "Solve $x^2 - 5x + 6 = 0$: $2$ and $3$."] * 4


def prepared(directory, seed):
    return prepare(synthetic_records(12, 0), directory, support_ratio=0.4, query_ratio=0.2, seed=seed,
                   source_description={"source": "synthetic"})


def test_the_data_fingerprint_is_the_rows_not_the_split_sizes(tmp_path):
    prepared(tmp_path / "a", seed=0)
    prepared(tmp_path / "b", seed=1)  # the same records split otherwise: every split keeps its size
    prepared(tmp_path / "c", seed=0)
    assert read_manifest(tmp_path / "a")["counts"] == read_manifest(tmp_path / "b")["counts"]
    a, b = data_fingerprint(tmp_path / "a"), data_fingerprint(tmp_path / "b")
    assert data_fingerprint(tmp_path / "c") == a and data_changes(a, a) is None
    assert a.keys() == b.keys() and a != b
    assert data_changes(a, b).startswith(f"{sum(a[f] != b[f] for f in a)} files with other rows, e.g. few_shot_eval/")
    fewer = {f: v for f, v in a.items() if "/algebra_" not in f}
    assert data_changes(a, fewer) == "3 files removed, e.g. few_shot_eval/algebra_test.parquet, meta_train/algebra_query.parquet"
    assert data_changes(a, fewer, common_only=True) is None  # evaluation compares the files both have


def test_the_base_fingerprint_tells_another_init_of_the_same_shape_apart(tmp_path):
    m0 = build_tiny_model(tmp_path / "m0", TEXTS, vocab_size=300, seed=0)
    m1 = build_tiny_model(tmp_path / "m1", TEXTS, vocab_size=300, seed=1)
    weights0, weights1 = (m / "model.safetensors" for m in (m0, m1))
    # File sizes and safetensors headers (names, dtypes, shapes, offsets) alone would not tell them apart.
    assert weights0.stat().st_size == weights1.stat().st_size
    headers = []
    for path in (weights0, weights1):
        with open(path, "rb") as f:
            headers.append(f.read(8 + struct.unpack("<Q", f.read(8))[0]))
    assert headers[0] == headers[1]
    fp0, fp1 = base_fingerprint(str(m0)), base_fingerprint(str(m1))
    assert set(fp0) == {"model.safetensors"} and fp0 != fp1
    assert base_changes(fp0, fp1) == "other weights in model.safetensors"
    # A copy elsewhere, with other file times, is the same base.
    moved = shutil.copytree(m0, tmp_path / "moved", copy_function=shutil.copyfile)
    os.utime(moved / "model.safetensors", (1, 1))
    assert base_fingerprint(str(moved)) == fp0 and base_changes(fp0, base_fingerprint(str(moved))) is None
    # Not a directory nor a cached hub model: nothing to compare.
    assert base_fingerprint(str(tmp_path / "nothing")) is None and base_changes(fp0, None) is None


def test_other_weight_formats_are_sampled_across_the_file(tmp_path):
    """A weight file without a safetensors header (a .bin, a GGUF file) is sampled at 64 evenly spaced blocks:
    another model of the same size (whose every byte moved) differs, the same bytes elsewhere do not."""
    one, other, copy = tmp_path / "one", tmp_path / "other", tmp_path / "copy"
    data = os.urandom(1 << 20)
    for directory, content in ((one, data), (copy, data), (other, data[:1000] + os.urandom((1 << 20) - 1000))):
        directory.mkdir()
        (directory / "pytorch_model.bin").write_bytes(content)
    fp = base_fingerprint(str(one))
    assert set(fp) == {"pytorch_model.bin"} and base_fingerprint(str(copy)) == fp
    assert base_fingerprint(str(other)) != fp  # its first block (the file's header) is the same
