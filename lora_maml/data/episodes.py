"""Which tasks and which examples each meta-training step uses.

A step draws ``meta_batch_size`` tasks; each drawn task gets ``num_inner_steps`` support batches of
``inner_batch_size`` indices into its support split (the inner loop) and one query batch of
``query_batch_size`` indices into its query split (the outer loss).

Everything is a pure function of ``(seed, step)`` and the settings, so

* every process computes the same draws (rank r of w takes ``draws[r::w]``), and
* resuming needs nothing but the step number (:meth:`EpisodeSampler.state_dict`).

Tasks: step s shuffles the tasks with ``default_rng([seed, 0, s])`` and takes the first
``meta_batch_size`` (distinct tasks); a larger meta batch takes whole rounds of all tasks.

Examples: every (task, split) has a stream of per-epoch permutations, epoch e drawn with
``default_rng([seed, 1 or 2, task index, e])``. The k-th time a task is drawn (its k-th *visit*) it takes
the next chunk of ``need`` indices (``need`` = num_inner_steps x inner_batch_size for support,
query_batch_size for query). An epoch lasts ``ceil(n / need)`` visits; its last chunk wraps around to
the start of the same permutation. Hence, as long as a split holds at least ``need`` examples,

* a chunk never repeats an example (the support batches of a step are disjoint), and
* every example of the split is used once in each epoch of ``ceil(n / need)`` visits, in a fresh order
  each epoch (the wrapped-around chunk re-uses ``ceil(n / need) * need - n`` of them).

A smaller split repeats examples inside a chunk (it is tiled). The visit count of a task before step s
depends on the task draws of all earlier steps; it is replayed from the seed (cached, so sequential
sampling costs O(1) per step and jumping to step s at most O(s) once).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np

# Streams of the seed sequence: task order, support permutations, query permutations.
_TASKS, _SUPPORT, _QUERY = 0, 1, 2
# Keep the replayed visit counts every this many steps, so any step is at most this far from a checkpoint.
_CHECKPOINT_EVERY = 256
# Part of the fingerprint: bump when the sampling scheme changes, so old checkpoints refuse to resume.
_SCHEME = "episodes-v1"


@dataclass(frozen=True)
class TaskDraw:
    """One task of a meta batch: indices into that task's support and query splits."""

    task: str
    support_batches: list[list[int]]
    query_indices: list[int]


class _ResumableSampler:
    """Shared by the samplers: draws are a pure function of (seed, settings, step), so the state to
    resume is the next step, guarded by a fingerprint of everything else the draws depend on."""

    seed: int
    next_step: int = 0

    def settings(self) -> dict:
        raise NotImplementedError

    def sample(self, step: int):
        raise NotImplementedError

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.settings(), sort_keys=True).encode()).hexdigest()[:16]

    # -- iteration and resume ---------------------------------------------------------------
    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        draws = self.sample(self.next_step)
        self.next_step += 1
        return draws

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "next_step": self.next_step,
            "fingerprint": self.fingerprint(),
            "settings": self.settings(),
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Resume at ``state["next_step"]``; refuse if the seed, the data sizes or the settings changed."""
        name = type(self).__name__
        missing = {"seed", "next_step", "fingerprint"} - set(state)
        if missing:
            raise ValueError(f"{name}.load_state_dict: missing keys {sorted(missing)}")
        if state["seed"] != self.seed:
            raise ValueError(
                f"{name}.load_state_dict: checkpoint seed {state['seed']} != current seed {self.seed};"
                " resuming would draw different episodes"
            )
        if state["fingerprint"] != self.fingerprint():
            saved = state.get("settings", {})
            current = self.settings()
            changed = [
                f"  {key}: checkpoint {saved.get(key, '?')!r} -> now {current[key]!r}"
                for key in current
                if saved.get(key) != current[key]
            ]
            raise ValueError(
                f"{name}.load_state_dict: the data splits or the sampling settings changed since the "
                "checkpoint was written; resuming would not continue the same episodes:\n"
                + ("\n".join(changed) or f"  fingerprint {state['fingerprint']} -> {self.fingerprint()}")
            )
        next_step = state["next_step"]
        if isinstance(next_step, bool) or not isinstance(next_step, (int, np.integer)) or next_step < 0:
            raise ValueError(f"{name}.load_state_dict: next_step must be an integer >= 0, got {next_step!r}")
        self.next_step = int(next_step)


class EpisodeSampler(_ResumableSampler):
    """Draws the tasks and example indices of every meta-training step (see the module docstring).

    ``task_sizes`` maps each task to ``(n_support, n_query)``, the sizes of its splits. Tasks are
    ordered by name, so the mapping's order does not matter.
    """

    def __init__(
        self,
        task_sizes: Mapping[str, tuple[int, int]],
        *,
        meta_batch_size: int,
        num_inner_steps: int,
        inner_batch_size: int,
        query_batch_size: int,
        seed: int,
    ) -> None:
        for key, value, low in (
            ("meta.meta_batch_size", meta_batch_size, 1),
            ("meta.num_inner_steps", num_inner_steps, 0),
            ("meta.inner_batch_size", inner_batch_size, 1),
            ("meta.query_batch_size", query_batch_size, 1),
            ("seed", seed, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"EpisodeSampler: {key} must be an integer >= {low}, got {value!r}")
        if not task_sizes:
            raise ValueError("EpisodeSampler: task_sizes is empty; there are no tasks to sample")
        self.meta_batch_size = int(meta_batch_size)
        self.num_inner_steps = int(num_inner_steps)
        self.inner_batch_size = int(inner_batch_size)
        self.query_batch_size = int(query_batch_size)
        self.seed = int(seed)
        self.support_need = self.num_inner_steps * self.inner_batch_size

        self.tasks: tuple[str, ...] = tuple(sorted(task_sizes))
        self.task_sizes: dict[str, tuple[int, int]] = {}
        for task in self.tasks:
            sizes = task_sizes[task]
            if len(sizes) != 2 or any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) for n in sizes):
                raise ValueError(f"EpisodeSampler: task {task!r}: expected (n_support, n_query) integers, got {sizes!r}")
            n_support, n_query = int(sizes[0]), int(sizes[1])
            if n_query < 1:
                raise ValueError(f"EpisodeSampler: task {task!r} has an empty query split (n_query={n_query})")
            if self.support_need and n_support < 1:
                raise ValueError(
                    f"EpisodeSampler: task {task!r} has an empty support split but meta.num_inner_steps="
                    f"{self.num_inner_steps} needs support batches"
                )
            self.task_sizes[task] = (n_support, n_query)

        self.next_step = 0
        # _checkpoints[i] = visits of every task during steps [0, i * _CHECKPOINT_EVERY).
        self._checkpoints: list[np.ndarray] = [np.zeros(len(self.tasks), dtype=np.int64)]
        self._cursor: tuple[int, np.ndarray] = (0, self._checkpoints[0])

    # -- settings ---------------------------------------------------------------------------
    def settings(self) -> dict:
        """Everything the draws depend on besides the seed and the step."""
        return {
            "scheme": _SCHEME,
            "task_sizes": {task: list(self.task_sizes[task]) for task in self.tasks},
            "meta_batch_size": self.meta_batch_size,
            "num_inner_steps": self.num_inner_steps,
            "inner_batch_size": self.inner_batch_size,
            "query_batch_size": self.query_batch_size,
        }

    # -- draws ------------------------------------------------------------------------------
    def task_order(self, step: int) -> list[int]:
        """Indices (into :attr:`tasks`) of the tasks drawn at ``step``, in draw order."""
        rng = np.random.default_rng([self.seed, _TASKS, step])
        n_tasks = len(self.tasks)
        rounds = math.ceil(self.meta_batch_size / n_tasks)
        order = np.concatenate([rng.permutation(n_tasks) for _ in range(rounds)])
        return order[: self.meta_batch_size].tolist()

    def _visits_before(self, step: int) -> np.ndarray:
        block = step // _CHECKPOINT_EVERY
        while len(self._checkpoints) <= block:
            start = (len(self._checkpoints) - 1) * _CHECKPOINT_EVERY
            counts = self._checkpoints[-1].copy()
            for s in range(start, start + _CHECKPOINT_EVERY):
                np.add.at(counts, self.task_order(s), 1)
            self._checkpoints.append(counts)
        cursor_step, cursor_counts = self._cursor
        if block * _CHECKPOINT_EVERY <= cursor_step <= step:
            start, counts = cursor_step, cursor_counts.copy()
        else:
            start, counts = block * _CHECKPOINT_EVERY, self._checkpoints[block].copy()
        for s in range(start, step):
            np.add.at(counts, self.task_order(s), 1)
        self._cursor = (step, counts.copy())
        return counts

    def _chunk(self, stream: int, task_index: int, n: int, need: int, visit: int) -> list[int]:
        visits_per_epoch = math.ceil(n / need)
        epoch, j = divmod(visit, visits_per_epoch)
        perm = np.random.default_rng([self.seed, stream, task_index, epoch]).permutation(n)
        return perm[(j * need + np.arange(need)) % n].tolist()

    def sample(self, step: int) -> list[TaskDraw]:
        """The draws of ``step`` (a pure function of the seed, the settings and ``step``)."""
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"EpisodeSampler.sample: step must be an integer >= 0, got {step!r}")
        step = int(step)
        visits = self._visits_before(step)
        draws = []
        for t in self.task_order(step):
            task = self.tasks[t]
            n_support, n_query = self.task_sizes[task]
            visit = int(visits[t])
            visits[t] += 1
            support_batches = []
            if self.support_need:
                flat = self._chunk(_SUPPORT, t, n_support, self.support_need, visit)
                size = self.inner_batch_size
                support_batches = [flat[i : i + size] for i in range(0, self.support_need, size)]
            query = self._chunk(_QUERY, t, n_query, self.query_batch_size, visit)
            draws.append(TaskDraw(task=task, support_batches=support_batches, query_indices=query))
        return draws


class MixedBatchSampler(_ResumableSampler):
    """Batches for the multi-task SFT baseline: the support and query splits of all tasks pooled.

    The pool (every (task, split, index), in task-name order) is shuffled per epoch with
    ``default_rng([seed, 3, epoch])`` and cut into consecutive batches of ``batch_size``; an epoch's
    last batch takes its missing examples from the start of the same permutation. Like
    :class:`EpisodeSampler`, the batch of step s is a pure function of (seed, settings, s).

    With ``max_shots`` K > 0 (MetaICL, :meth:`shots`) every example of a batch also gets in-context
    examples: k uniform in 0..K, then k distinct examples of the same task's pool (its support and query
    splits: the meta-training records SFT trains on, so no evaluation task's problem is ever a shot), never
    the example itself; k is cut to the task's pool size - 1. Drawn with ``default_rng([seed, 4, step])``,
    so they too are a pure function of (seed, settings, step). The batches themselves do not depend on K.
    """

    def __init__(self, task_sizes: Mapping[str, tuple[int, int]], *, batch_size: int, seed: int,
                 max_shots: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"MixedBatchSampler: batch_size must be >= 1, got {batch_size}")
        if isinstance(max_shots, bool) or not isinstance(max_shots, (int, np.integer)) or max_shots < 0:
            raise ValueError(f"MixedBatchSampler: sft.icl_max_shots must be an integer >= 0, got {max_shots!r}")
        self.tasks = tuple(sorted(task_sizes))
        self.task_sizes = {t: (int(task_sizes[t][0]), int(task_sizes[t][1])) for t in self.tasks}
        self.pool = [
            (task, part, i)
            for task in self.tasks
            for part, n in zip(("support", "query"), self.task_sizes[task])
            for i in range(n)
        ]
        if not self.pool:
            raise ValueError("MixedBatchSampler: the support and query splits are all empty")
        # Where each task's examples start in the pool (they are contiguous), for the shot draws.
        sizes = [sum(self.task_sizes[t]) for t in self.tasks]
        self._task_start = dict(zip(self.tasks, np.cumsum([0, *sizes]).tolist()))
        self.batch_size = int(batch_size)
        self.max_shots = int(max_shots)
        self.seed = int(seed)
        self.next_step = 0

    def settings(self) -> dict:
        settings = {
            "scheme": "mixed-v1",
            "task_sizes": {task: list(self.task_sizes[task]) for task in self.tasks},
            "batch_size": self.batch_size,
        }
        # Only when set: a plain SFT checkpoint written before the key existed keeps its fingerprint.
        return settings | ({"max_shots": self.max_shots} if self.max_shots else {})

    def _positions(self, step: int) -> list[int]:
        n = len(self.pool)
        batches_per_epoch = math.ceil(n / self.batch_size)
        epoch, j = divmod(int(step), batches_per_epoch)
        perm = np.random.default_rng([self.seed, 3, epoch]).permutation(n)
        return perm[(j * self.batch_size + np.arange(self.batch_size)) % n].tolist()

    def sample(self, step: int) -> list[tuple[str, str, int]]:
        """(task, "support" | "query", index) of the examples of ``step``'s batch."""
        return [self.pool[k] for k in self._positions(step)]

    def shots(self, step: int) -> list[list[tuple[str, str, int]]]:
        """For every example of ``sample(step)``, in order, the (task, split, index) of its in-context
        examples in the order they go into the prompt (see the class docstring; all empty when K = 0)."""
        positions = self._positions(step)
        if not self.max_shots:
            return [[] for _ in positions]
        rng = np.random.default_rng([self.seed, 4, int(step)])
        out = []
        for position in positions:
            task = self.pool[position][0]
            start, n = self._task_start[task], sum(self.task_sizes[task])
            k = min(int(rng.integers(0, self.max_shots + 1)), n - 1)
            # k of the task's other n - 1 examples: offsets past the example's own skip it.
            others = rng.choice(n - 1, size=k, replace=False) if k else []
            own = position - start
            out.append([self.pool[start + o + (o >= own)] for o in others])
        return out
