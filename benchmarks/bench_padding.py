"""Benchmark: how much of the processed tokens are real, padded vs packed batches of meta-training episodes.

Episodes are drawn as training draws them (``EpisodeSampler``: ``--meta-batch`` tasks per step,
``--inner-steps`` support batches of ``--inner-batch`` examples and one query batch of
``--query-batch`` per task), the examples encoded as training encodes them (``encode_records``,
``--max-length``, right truncation), and every batch collated both ways with
``lora_maml.data.tokenize.collate``. Reported per task and overall, token-weighted over all batches:

  token efficiency  = real tokens / processed token slots (``input_ids.numel()``); goal >= 0.95 packed
  attention eff.    = Σ L_i² (the score cells inside the examples' own blocks) / the cells of the
                      square(s) an attention kernel given an explicit mask computes (sdpa's math and
                      memory-efficient kernels, eager): padded B x T_max², packed one (Σ L_i)² row. A
                      padded batch without padding runs sdpa's is_causal flash kernel instead (half of
                      B x T²); packed flash-attention varlen computes only the blocks (1.0).

Data: ``--data-dir`` (prepared by ``lora-maml prepare``), else ``--source`` prepared into a temporary
directory (default ../shared/data/MATH.tar.gz; ``synthetic`` for the generated suite); a missing source
is skipped with a message. Tokenizer: ``--tokenizer PATH`` (a local Hugging Face tokenizer, e.g.
Qwen3-4B-Instruct-2507's), else a tiny Qwen-style BPE trained on the spot on the data's texts (longer
token sequences than Qwen's 151k vocabulary, so truncation at ``--max-length`` bites earlier).

    python benchmarks/bench_padding.py                                    # MATH, tiny tokenizer
    python benchmarks/bench_padding.py --tokenizer /models/Qwen3-4B-Instruct-2507 --out padding.json
    python benchmarks/bench_padding.py --source synthetic --synthetic-per-task 40 --steps 20
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

from lora_maml.atomic import write_text_atomic
from lora_maml.data.episodes import EpisodeSampler
from lora_maml.data.prepare import list_tasks, load_split, prepare_from_source
from lora_maml.data.tokenize import collate, encode_records, padding_efficiency

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "MATH.tar.gz"
GOAL_PACKED = 0.95


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=None, help="a prepared data directory (lora-maml prepare)")
    p.add_argument("--source", default=str(DEFAULT_SOURCE),
                   help="what to prepare when --data-dir is not given: MATH dir/.tar.gz/jsonl/parquet, or 'synthetic'")
    p.add_argument("--synthetic-per-task", type=int, default=60, help="records per task with --source synthetic")
    p.add_argument("--tokenizer", default=None, help="local tokenizer directory (default: a tiny BPE trained here)")
    p.add_argument("--tiny-vocab", type=int, default=512, help="vocabulary of the tiny tokenizer")
    p.add_argument("--max-length", type=int, default=2048, help="data.max_length (longer examples are cut)")
    p.add_argument("--steps", type=int, default=200, help="meta-steps of episodes to draw")
    p.add_argument("--meta-batch", type=int, default=4)
    p.add_argument("--inner-steps", type=int, default=5)
    p.add_argument("--inner-batch", type=int, default=4)
    p.add_argument("--query-batch", type=int, default=4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", type=Path, default=None, help="write the table as JSON")
    return p.parse_args(argv)


def prepared_dir(args, stack: contextlib.ExitStack) -> Path | None:
    """The prepared data directory to read, preparing ``--source`` into a temporary one if needed."""
    if args.data_dir is not None:
        return args.data_dir
    if args.source != "synthetic" and not Path(args.source).exists():
        print(f"bench_padding: skipped, data source {args.source} not found (pass --data-dir or --source)")
        return None
    out = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_padding-"))) / "data"
    prepare_from_source(args.source, out, seed=args.seed, synthetic_per_task=args.synthetic_per_task)
    return out


def load_tokenizer(args, texts: list[str]):
    if args.tokenizer is not None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(args.tokenizer)
    from lora_maml.tiny_model import train_tiny_tokenizer

    return train_tiny_tokenizer(texts, vocab_size=args.tiny_vocab, model_max_length=args.max_length)


class Tally:
    """Token and attention-cell counts of one group of batches (a task, or everything)."""

    def __init__(self) -> None:
        self.batches = self.examples = self.real = self.padded = self.packed = 0
        self.attn_real = self.attn_padded = self.attn_packed_dense = 0

    def add(self, examples: list[dict], pad_id: int) -> None:
        padded = collate(examples, pad_id, packed=False)
        packed = collate(examples, pad_id, packed=True)
        lengths = [len(e["input_ids"]) for e in examples]
        real = int(padded["attention_mask"].sum())
        if real != sum(lengths) or abs(padding_efficiency(padded) - real / padded["input_ids"].numel()) > 1e-12:
            raise RuntimeError(f"collate(padded) holds {real} real tokens, the examples {sum(lengths)}")
        self.batches += 1
        self.examples += len(examples)
        self.real += real
        self.padded += padded["input_ids"].numel()
        self.packed += packed["input_ids"].numel()
        self.attn_real += sum(n * n for n in lengths)
        self.attn_padded += len(lengths) * max(lengths) ** 2
        self.attn_packed_dense += packed["input_ids"].shape[1] ** 2

    def row(self, name: str) -> dict:
        return dict(
            task=name, batches=self.batches, mean_len=self.real / max(self.examples, 1),
            padded_eff=self.real / max(self.padded, 1), packed_eff=self.real / max(self.packed, 1),
            attn_padded_eff=self.attn_real / max(self.attn_padded, 1),
            attn_packed_dense_eff=self.attn_real / max(self.attn_packed_dense, 1),
        )


def measure(args, data_dir: Path) -> tuple[list[dict], dict]:
    tasks = list_tasks(data_dir)["meta_train"]
    records = {t: {part: load_split(data_dir, t, part) for part in ("support", "query")} for t in tasks}
    texts = [f"{r['prompt']}\n{r['response']}" for t in tasks for part in records[t].values() for r in part]
    tokenizer = load_tokenizer(args, texts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded, truncated, total = {}, 0, 0
    for t in tasks:
        encoded[t] = {}
        for part, recs in records[t].items():
            encoded[t][part], cut = encode_records(recs, tokenizer, max_length=args.max_length, truncation="right")
            truncated += cut
            total += len(recs)
    sampler = EpisodeSampler(
        {t: (len(encoded[t]["support"]), len(encoded[t]["query"])) for t in tasks},
        meta_batch_size=args.meta_batch, num_inner_steps=args.inner_steps, inner_batch_size=args.inner_batch,
        query_batch_size=args.query_batch, seed=args.seed,
    )
    tallies = {t: Tally() for t in tasks}
    overall = Tally()
    for step in range(args.steps):
        for draw in sampler.sample(step):
            data = encoded[draw.task]
            batches = [[data["support"][i] for i in b] for b in draw.support_batches]
            batches.append([data["query"][i] for i in draw.query_indices])
            for examples in batches:
                tallies[draw.task].add(examples, pad_id)
                overall.add(examples, pad_id)
    rows = [tallies[t].row(t) for t in tasks if tallies[t].batches] + [overall.row("overall")]
    info = dict(data_dir=str(data_dir), tokenizer=args.tokenizer or f"tiny BPE, vocab {len(tokenizer)}",
                examples=total, truncated=truncated, max_length=args.max_length, steps=args.steps,
                meta_batch=args.meta_batch, inner_steps=args.inner_steps, inner_batch=args.inner_batch,
                query_batch=args.query_batch, seed=args.seed)
    return rows, info


def print_table(rows: list[dict], info: dict) -> None:
    print(f"data {info['data_dir']} | tokenizer {info['tokenizer']} | {info['examples']} support+query examples, "
          f"{info['truncated']} truncated at {info['max_length']} | {info['steps']} meta-steps of "
          f"{info['meta_batch']} tasks x ({info['inner_steps']} support batches of {info['inner_batch']} "
          f"+ 1 query batch of {info['query_batch']})")
    header = (f"{'task':26s} {'batches':>7s} {'mean len':>8s} {'padded':>7s} {'packed':>7s}   "
              f"{'attn padded':>11s} {'attn packed-dense':>17s}")
    print("\n" + f"{'':26s} {'':>7s} {'':>8s} {'-- token eff. --':>15s}   {'-- attention-work eff. --':>29s}")
    print(header)
    print("-" * len(header))
    for r in rows:
        if r["task"] == "overall":
            print("-" * len(header))
        print(f"{r['task']:26s} {r['batches']:7d} {r['mean_len']:8.1f} {r['padded_eff']:7.3f} {r['packed_eff']:7.3f}   "
              f"{r['attn_padded_eff']:11.3f} {r['attn_packed_dense_eff']:17.3f}")
    packed = rows[-1]["packed_eff"]
    verdict = "ok" if packed >= GOAL_PACKED else "MISSED"
    print(f"\npacked token efficiency {packed:.3f} (goal >= {GOAL_PACKED}: {verdict}); packed processes "
          f"{packed / rows[-1]['padded_eff']:.2f}x fewer token slots than padded.")
    print("attention-work eff.: Σ L² / the score cells a kernel given an explicit mask computes (padded B x T², "
          "packed (Σ L)²); packed flash-attention varlen computes only the Σ L² blocks (1.000).")


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(payload, indent=2))


def main(argv=None) -> int:
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        data_dir = prepared_dir(args, stack)
        if data_dir is None:
            return 0
        rows, info = measure(args, data_dir)
    print_table(rows, info)
    if args.out is not None:
        write_json(args.out, {"settings": info, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
