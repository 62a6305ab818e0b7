import json
import math
from collections import Counter, defaultdict

import pytest

from lora_maml.data.episodes import EpisodeSampler, MixedBatchSampler, TaskDraw

SIZES = {"algebra": (10, 7), "geometry": (3, 12), "number_theory": (20, 9), "prealgebra": (6, 5)}
SETTINGS = dict(meta_batch_size=2, num_inner_steps=2, inner_batch_size=3, query_batch_size=4, seed=7)


def make(sizes=SIZES, **overrides) -> EpisodeSampler:
    return EpisodeSampler(sizes, **{**SETTINGS, **overrides})


def visits_by_task(sampler: EpisodeSampler, n_steps: int) -> dict[str, list[TaskDraw]]:
    """Every draw of every task over steps [0, n_steps), in visit order."""
    visits = defaultdict(list)
    for step in range(n_steps):
        for draw in sampler.sample(step):
            visits[draw.task].append(draw)
    return visits


def test_draws_are_a_pure_function_of_seed_and_step():
    a, b = make(), make(sizes=dict(reversed(list(SIZES.items()))))  # mapping order must not matter
    steps = [0, 1, 2, 3, 600, 257, 256, 5, 1000, 4]  # out of order and across replay checkpoints
    from_b = {step: b.sample(step) for step in steps}
    for step in sorted(steps):
        assert a.sample(step) == from_b[step], step
    assert a.sample(0) != a.sample(1)
    assert make(seed=8).sample(0) != a.sample(0)


def test_shapes_ranges_and_distinct_tasks():
    sampler = make()
    for step in range(50):
        draws = sampler.sample(step)
        assert len(draws) == SETTINGS["meta_batch_size"]
        assert len({d.task for d in draws}) == len(draws)
        for d in draws:
            n_support, n_query = SIZES[d.task]
            assert len(d.support_batches) == SETTINGS["num_inner_steps"]
            assert all(len(batch) == SETTINGS["inner_batch_size"] for batch in d.support_batches)
            assert len(d.query_indices) == SETTINGS["query_batch_size"]
            assert all(0 <= i < n_support for batch in d.support_batches for i in batch)
            assert all(0 <= i < n_query for i in d.query_indices)
            support = [i for batch in d.support_batches for i in batch]
            if n_support >= len(support):
                assert len(set(support)) == len(support), "support batches of one step repeat an example"
            if n_query >= len(d.query_indices):
                assert len(set(d.query_indices)) == len(d.query_indices)


def test_no_inner_steps_means_no_support_batches():
    sampler = make(sizes={"a": (0, 5), "b": (4, 5)}, num_inner_steps=0)
    for step in range(10):
        for d in sampler.sample(step):
            assert d.support_batches == []
            assert len(d.query_indices) == SETTINGS["query_batch_size"]


def test_meta_batch_larger_than_task_count_takes_whole_rounds():
    sampler = make(meta_batch_size=10)  # 4 tasks: rounds of 4, 4, then 2
    for step in range(20):
        tasks = [d.task for d in sampler.sample(step)]
        assert sorted(tasks[:4]) == sorted(SIZES) and sorted(tasks[4:8]) == sorted(SIZES)
        assert len(set(tasks[8:])) == 2
        # Two visits of a task in one step take consecutive, different chunks.
        by_task = defaultdict(list)
        for d in sampler.sample(step):
            by_task[d.task].append(d.query_indices)
        for task, chunks in by_task.items():
            if SIZES[task][1] >= 2 * SETTINGS["query_batch_size"]:
                assert chunks[0] != chunks[1]


@pytest.mark.parametrize("split", ["support", "query"])
def test_every_epoch_is_a_fresh_permutation_of_the_split(split):
    sampler = make()
    need = SETTINGS["num_inner_steps"] * SETTINGS["inner_batch_size"] if split == "support" else SETTINGS["query_batch_size"]
    visits = visits_by_task(sampler, 300)
    for task, draws in visits.items():
        n = SIZES[task][0 if split == "support" else 1]
        chunks = [
            [i for batch in d.support_batches for i in batch] if split == "support" else d.query_indices for d in draws
        ]
        if n < need:
            # Tiled: inside a chunk every example appears floor or ceil(need / n) times.
            for chunk in chunks:
                counts = Counter(chunk)
                assert set(counts) == set(range(n))
                assert set(counts.values()) <= {need // n, math.ceil(need / n)}
            continue
        per_epoch = math.ceil(n / need)
        epochs = [chunks[k : k + per_epoch] for k in range(0, len(chunks) - per_epoch + 1, per_epoch)]
        assert len(epochs) >= 3, f"{task}: too few visits for the test"
        orders = []
        for epoch in epochs:
            flat = [i for chunk in epoch for i in chunk]
            assert sorted(flat[:n]) == list(range(n)), f"{task} {split}: epoch is not a permutation"
            assert flat[n:] == flat[: len(flat) - n], "the last chunk wraps around to the epoch's start"
            orders.append(tuple(flat[:n]))
        assert len(set(orders)) > 1, f"{task} {split}: every epoch has the same order"


def test_resume_from_state_dict_continues_the_same_episodes():
    uninterrupted = make()
    expected = [next(uninterrupted) for _ in range(40)]

    first = make()
    got = [next(first) for _ in range(13)]
    state = json.loads(json.dumps(first.state_dict()))  # it must survive a JSON checkpoint
    assert state["next_step"] == 13 and state["seed"] == SETTINGS["seed"]
    resumed = make()
    resumed.load_state_dict(state)
    got += [draws for _, draws in zip(range(27), resumed)]
    assert got == expected
    assert resumed.next_step == 40


@pytest.mark.parametrize(
    "change, mentioned",
    [
        (dict(sizes={**SIZES, "algebra": (11, 7)}), "task_sizes"),
        (dict(sizes={k: v for k, v in SIZES.items() if k != "geometry"}), "task_sizes"),
        (dict(query_batch_size=5), "query_batch_size"),
        (dict(num_inner_steps=3), "num_inner_steps"),
        (dict(seed=8), "seed"),
    ],
)
def test_resume_refuses_changed_data_or_settings(change, mentioned):
    state = make().state_dict()
    with pytest.raises(ValueError, match=mentioned):
        make(**change).load_state_dict(state)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sizes={}), "empty"),
        (dict(sizes={"a": (5, 0)}), "empty query"),
        (dict(sizes={"a": (0, 5)}), "empty support"),
        (dict(meta_batch_size=0), "meta.meta_batch_size"),
        (dict(inner_batch_size=0), "meta.inner_batch_size"),
        (dict(seed=-1), "seed"),
    ],
)
def test_invalid_settings_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(**kwargs)


# -- the SFT baseline's batches and MetaICL's shots ------------------------------------------------------


def test_plain_sft_batches_and_fingerprint_are_unchanged_by_the_metaicl_option():
    """max_shots=0 is plain SFT: the batches and the fingerprint (so a plain checkpoint written before the
    option existed still resumes) are pinned to what the sampler gave before; max_shots only adds shots."""
    plain = MixedBatchSampler(SIZES, batch_size=5, seed=7)
    icl = MixedBatchSampler(SIZES, batch_size=5, seed=7, max_shots=4)
    assert plain.fingerprint() == "b29095d256725d53" and "max_shots" not in plain.settings()
    assert plain.sample(0) == [("prealgebra", "support", 2), ("number_theory", "support", 7),
                               ("prealgebra", "support", 3), ("prealgebra", "support", 5), ("algebra", "query", 5)]
    assert all(plain.sample(s) == icl.sample(s) for s in range(100))
    assert all(shots == [] for s in range(20) for shots in plain.shots(s))
    with pytest.raises(ValueError, match=r"max_shots: checkpoint '\?' -> now 4"):
        icl.load_state_dict(plain.state_dict())  # a resume with another number of shots is refused
    with pytest.raises(ValueError, match="sft.icl_max_shots must be an integer >= 0"):
        MixedBatchSampler(SIZES, batch_size=5, seed=7, max_shots=-1)


def test_metaicl_shots_come_from_the_same_task_never_the_example_and_k_is_uniform():
    sizes = {"a": (30, 20), "b": (12, 8), "c": (1, 1)}  # c: a pool of 2, so at most 1 shot
    sampler = MixedBatchSampler(sizes, batch_size=8, seed=3, max_shots=4)
    ks = Counter()
    for step in range(600):
        for example, shots in zip(sampler.sample(step), sampler.shots(step)):
            assert len(shots) == len(set(shots)), "a shot repeats"
            assert example not in shots
            assert {task for task, _, _ in shots} <= {example[0]}
            assert all(0 <= i < dict(zip(("support", "query"), sizes[t]))[p] for t, p, i in shots)
            if example[0] == "c":
                assert len(shots) <= 1
            else:
                ks[len(shots)] += 1
    total = sum(ks.values())
    assert set(ks) == {0, 1, 2, 3, 4}
    for k, count in ks.items():  # ~940 draws each: a uniform k stays within 15% of total / 5
        assert abs(count - total / 5) < 0.15 * total / 5, ks


def test_metaicl_shots_are_a_pure_function_of_seed_and_step_and_resume():
    def make_icl(seed=3):
        return MixedBatchSampler(SIZES, batch_size=6, seed=seed, max_shots=3)

    a, b = make_icl(), make_icl()
    steps = [5, 0, 41, 2, 17]
    from_b = {step: b.shots(step) for step in steps}
    assert all(a.shots(step) == from_b[step] for step in sorted(steps))
    assert a.shots(0) != a.shots(1) and make_icl(seed=4).shots(0) != a.shots(0)
    first = make_icl()
    for _ in range(7):
        next(first)
    resumed = make_icl()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert resumed.next_step == 7 and resumed.shots(resumed.next_step) == a.shots(7)
