"""The episode plan of a few-shot evaluation: which shots each episode adapts on, which problems it scores.

A pure function of its arguments and the prepared files (``lora-maml prepare``), so every method is
judged on exactly the same episodes; :func:`plan_fingerprint` tells two plans apart. How the shots and
the scored problems are drawn: docs/evaluation.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from lora_maml.data.prepare import list_tasks, load_split

log = logging.getLogger(__name__)

DEFAULT_N_SHOTS = (0, 5, 10, 25, 50)


@dataclass(frozen=True)
class Episode:
    """One adaptation episode: adapt on ``shot_ids`` (of ``task``), score ``test_ids``."""

    task: str
    n: int
    seed: int
    shot_ids: tuple[str, ...]
    test_ids: tuple[str, ...]
    holdout: bool = False


def _episode_seeds(seeds: int | Sequence[int]) -> list[int]:
    if isinstance(seeds, bool):
        raise ValueError(f"seeds must be a count or a list of ints, got {seeds!r}")
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"seeds: need at least one episode per n, got {seeds}")
        return list(range(seeds))
    out = [int(s) for s in seeds]
    if not out:
        raise ValueError("seeds: empty list")
    if len(set(out)) != len(out):
        raise ValueError(f"seeds: duplicate episode seeds in {out}")
    return out


def plan_episodes(
    data_dir: str | Path,
    tasks: Sequence[str] | None = None,
    n_shots: Sequence[int] = DEFAULT_N_SHOTS,
    seeds: int | Sequence[int] = 3,
    max_test_per_task: int | None = None,
    seed: int = 0,
) -> list[Episode]:
    """The episodes every method is evaluated on.

    ``tasks`` defaults to every task of the prepared ``few_shot_eval`` (held-out ones included, flagged
    ``holdout``). ``seeds``: a count K (episode seeds 0..K-1) or the episode seeds themselves; n = 0 gets
    one episode (the first seed). Per task, the scored problems are the first ``max_test_per_task``
    (default: all) of the test split sorted by id and shuffled with
    ``Random(f"few-shot-test:{seed}:{task}")``, the same for every n and episode; the ``n`` shots are
    drawn without replacement with ``Random(f"few-shot-shots:{seed}:{task}:{n}:{episode_seed}")`` from the
    support split sorted by id, or, for a held-out task, from its unscored test problems (its scored
    subset shrinks, with a warning, to keep ``max(n_shots)`` of them). Order: task (as given), n
    (ascending), episode seed (as given). Raises ``ValueError`` for unknown tasks, repeated or negative
    shot counts, and splits too small for ``max(n_shots)`` shots.
    """
    available = list_tasks(data_dir)
    holdout = set(available["holdout"])
    tasks = list(available["few_shot_eval"]) if tasks is None else list(tasks)
    unknown = [t for t in tasks if t not in available["few_shot_eval"]]
    if unknown or not tasks:
        raise ValueError(f"--tasks {unknown or tasks}: expected a non-empty subset of {available['few_shot_eval']}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"--tasks: duplicate task in {tasks}")
    shots = sorted({int(n) for n in n_shots})
    if not shots or shots[0] < 0 or len(shots) != len(list(n_shots)):
        raise ValueError(f"--n-shots {list(n_shots)}: expected distinct integers >= 0")
    if max_test_per_task is not None and max_test_per_task < 1:
        raise ValueError(f"--max-test-per-task must be >= 1, got {max_test_per_task}")
    episode_seeds = _episode_seeds(seeds)
    max_n = shots[-1]

    episodes = []
    for task in tasks:
        test = sorted(r["id"] for r in load_split(data_dir, task, "test"))
        random.Random(f"few-shot-test:{seed}:{task}").shuffle(test)
        k = len(test) if max_test_per_task is None else min(max_test_per_task, len(test))
        if task in holdout:
            if len(test) - max_n < 1:
                raise ValueError(
                    f"held-out task {task!r} has {len(test)} test records: too few to draw {max_n} shots from "
                    "the test split and keep any to score; lower --n-shots"
                )
            if len(test) - k < max_n:
                log.warning(
                    "held-out task %r: scoring %d of its %d test problems (not %d) to keep %d unscored ones as shots",
                    task, len(test) - max_n, len(test), k, max_n,
                )
                k = len(test) - max_n
            pool = sorted(test[k:])
        else:
            pool = sorted(r["id"] for r in load_split(data_dir, task, "support"))
            if len(pool) < max_n:
                raise ValueError(f"task {task!r}: support split has {len(pool)} records, fewer than n={max_n} shots")
        test_ids = tuple(test[:k])
        for n in shots:
            for episode_seed in episode_seeds[:1] if n == 0 else episode_seeds:
                rng = random.Random(f"few-shot-shots:{seed}:{task}:{n}:{episode_seed}")
                episodes.append(Episode(task, n, episode_seed, tuple(rng.sample(pool, n)), test_ids, task in holdout))
    return episodes


def episode_records(data_dir: str | Path, episodes: Sequence[Episode]) -> dict[str, dict]:
    """``{id: record}`` of every shot and test problem of ``episodes``."""
    wanted = {i for ep in episodes for i in (*ep.shot_ids, *ep.test_ids)}
    holdout = {ep.task for ep in episodes if ep.holdout}
    records: dict[str, dict] = {}
    for task in dict.fromkeys(ep.task for ep in episodes):
        for part in ("test",) if task in holdout else ("support", "test"):
            records.update((r["id"], r) for r in load_split(data_dir, task, part) if r["id"] in wanted)
    missing = wanted - records.keys()
    if missing:
        raise ValueError(f"{data_dir}: records {sorted(missing)[:5]} of the plan are not in the prepared splits")
    return records


def plan_fingerprint(episodes: Sequence[Episode]) -> str:
    """sha256 of the plan (tasks, n, seeds, shot and test ids): equal fingerprints = identical episodes."""
    text = json.dumps([asdict(ep) for ep in episodes], sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
