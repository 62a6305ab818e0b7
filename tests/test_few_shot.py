"""Few-shot evaluation on a tiny Qwen3 and the synthetic suite: the plan, adaptation, NLL, generation, CLI.

The references are independent of the code under test: adaptation = a deep copy of the model and
``torch.optim.SGD`` on the module's own LoRA parameters over ONE batch of all shots (its token mean is
the full-batch loss that micro-batched steps must reproduce); NLL = ``causal_lm_loss_tensors`` of that copy;
generation = an argmax loop without KV cache, padding or ``generate``. fp64, so greedy choices are
not flipped by rounding.
"""

import copy
import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from lora_maml.config import Config, LoraConfig, config_to_dict
from lora_maml.data.prepare import load_split, prepare
from lora_maml.data.synthetic import synthetic_records
from lora_maml.data.tokenize import prompt_ids, collate, encode_example
from lora_maml.cli import main as cli_main
from lora_maml.eval import few_shot, generation
from lora_maml.eval.few_shot import AdaptSettings, evaluate_model
from lora_maml.eval.plan import Episode, episode_records, plan_episodes, plan_fingerprint
from lora_maml.eval.report import build_report, render_markdown
from lora_maml.load_trained import load_trained
from lora_maml.loss import causal_lm_loss_tensors
from lora_maml.tiny_model import build_tiny_model
from lora_maml import checkpoint as ckpt

LORA = LoraConfig(r=8, alpha=16)
MAX_LENGTH = 256
ADAPT = AdaptSettings(lr=0.5, steps=3, batch_size=2, max_length=MAX_LENGTH, truncation="right")
EVAL = dict(max_new_tokens=6, gen_batch_size=2)


def main(argv):
    """``lora-maml eval ...`` as users run it: errors become one ``error:`` line and exit code 1."""
    return cli_main(["eval", *argv])


@pytest.fixture(scope="module")
def records():
    return synthetic_records(12, 0)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, records):
    # 12 per task: support 4, query 2, test 6; precalculus held out: 12 test records, no support.
    out = tmp_path_factory.mktemp("data") / "prepared"
    prepare(records, out, support_ratio=0.4, query_ratio=0.2, seed=0, holdout_tasks=["precalculus"],
            source_description={"source": "synthetic"})
    return out


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, records):
    texts = [f"{r['prompt']}\n{r['response']}" for r in records]
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", texts, vocab_size=400, hidden_size=32,
                            intermediate_size=64, head_dim=8)


def load(tiny_dir, dtype="fp64"):
    return load_trained(str(tiny_dir), dtype=dtype, lora=LORA)


def sharpen(trained, *, embeddings_only=False):
    """Scale base weights by 10 (std 0.02 -> 0.2). At random init every logit is near 0 and greedy decoding
    gives "\n" for every prompt, whatever the weights; larger weights make generations prompt-dependent and
    sensitive to the weights (all matrices), or let a few SGD steps move the argmax (tied embeddings only)."""
    with torch.no_grad():
        if embeddings_only:
            trained.model.get_input_embeddings().weight.mul_(10)
        else:
            for name, p in trained.model.named_parameters():
                if ".lora_" not in name and p.ndim == 2:
                    p.mul_(10)
    return trained


def eos_ids(trained):
    eos = trained.model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])


def reference_adapted(trained, shots, lr, steps, optimizer=torch.optim.SGD, **options):
    model = copy.deepcopy(trained.model).train()
    own = dict(model.named_parameters())
    params = [own[name].requires_grad_(True) for name in trained.params]
    opt = optimizer(params, lr=lr, **options)
    batch = collate(shots, trained.tokenizer.pad_token_id, packed=False)
    for _ in range(steps):
        opt.zero_grad()
        causal_lm_loss_tensors(model, batch)[0].backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def greedy_from_ids(model, tokenizer, ids, max_new_tokens, eos):
    ids, out = list(ids), []
    for _ in range(max_new_tokens):
        token = int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax())
        if token in eos:
            break
        out.append(token)
        ids.append(token)
    return tokenizer.decode(out, skip_special_tokens=True)


def reference_greedy(model, tokenizer, prompt, max_new_tokens, eos):
    return greedy_from_ids(model, tokenizer, prompt_ids(tokenizer, prompt), max_new_tokens, eos)


@torch.no_grad()
def nll_of(model, tokenizer, example):
    loss, tokens = causal_lm_loss_tensors(model, collate([example], tokenizer.pad_token_id, packed=False))
    return float(loss), int(tokens)


def reference_nll(model, tokenizer, record):
    return nll_of(model, tokenizer, encode_example(tokenizer, record["prompt"], record["response"],
                                                   max_length=MAX_LENGTH, truncation="right"))


# --- the plan --------------------------------------------------------------------------------
def test_plan_is_a_pure_function_shared_by_every_n_and_episode(data_dir):
    plan = plan_episodes(data_dir, ["algebra", "precalculus"], [0, 2, 4], 3, 3, seed=0)
    assert plan == plan_episodes(data_dir, ["algebra", "precalculus"], [0, 2, 4], 3, 3, seed=0)
    assert plan_fingerprint(plan) == plan_fingerprint(list(plan))
    assert [(ep.task, ep.n, ep.seed) for ep in plan] == [
        (task, n, s) for task in ("algebra", "precalculus") for n, seeds in ((0, [0]), (2, [0, 1, 2]), (4, [0, 1, 2]))
        for s in seeds
    ]
    for task in ("algebra", "precalculus"):
        episodes = [ep for ep in plan if ep.task == task]
        assert len({ep.test_ids for ep in episodes}) == 1  # one scored subset per task
        test_ids = episodes[0].test_ids
        assert len(test_ids) == 3 == len(set(test_ids))
        split_test = {r["id"] for r in load_split(data_dir, task, "test")}
        assert set(test_ids) <= split_test
        for ep in episodes:
            assert len(ep.shot_ids) == ep.n == len(set(ep.shot_ids))
            assert not set(ep.shot_ids) & set(test_ids)
            assert ep.holdout == (task == "precalculus")
        shots = {i for ep in episodes for i in ep.shot_ids}
        if task == "algebra":
            assert shots <= {r["id"] for r in load_split(data_dir, task, "support")}
        else:  # held out: shots from the test split's unscored problems
            assert shots <= split_test - set(test_ids)
        draws = {ep.shot_ids for ep in episodes if ep.n == 2}
        assert len(draws) > 1, "episode seeds must draw different shots"

    larger = plan_episodes(data_dir, ["algebra"], [0], 1, 5, seed=0)[0].test_ids
    assert larger[:3] == plan[0].test_ids  # a larger subset extends the smaller one
    other = [ep.test_ids for ep in plan_episodes(data_dir, None, [0], 1, 3, seed=1)]
    assert other != [ep.test_ids for ep in plan_episodes(data_dir, None, [0], 1, 3, seed=0)]
    explicit = plan_episodes(data_dir, ["algebra"], [2], [7, 3], 2, seed=0)
    assert [ep.seed for ep in explicit] == [7, 3]


def test_plan_defaults_and_limits(data_dir):
    plan = plan_episodes(data_dir, None, [0, 4], 1, None, seed=0)
    assert {ep.task for ep in plan} == {"algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                                         "number_theory", "prealgebra", "precalculus"}
    held = [ep for ep in plan if ep.task == "precalculus"]
    assert all(ep.holdout for ep in held) and len(held[0].test_ids) == 12 - 4  # 4 kept back as shots
    assert len(next(ep for ep in plan if ep.task == "algebra").test_ids) == 6
    with pytest.raises(ValueError, match="support split has 4 records, fewer than n=5"):
        plan_episodes(data_dir, ["algebra"], [5], 1, 2)
    with pytest.raises(ValueError, match="too few to draw 12 shots"):
        plan_episodes(data_dir, ["precalculus"], [12], 1, 2)
    with pytest.raises(ValueError, match="--tasks"):
        plan_episodes(data_dir, ["calculus"], [0], 1, 2)
    with pytest.raises(ValueError, match="duplicate episode seeds"):
        plan_episodes(data_dir, ["algebra"], [2], [1, 1], 2)


# --- evaluation against independent references ------------------------------------------------
@pytest.fixture(scope="module")
def evaluated(data_dir, tiny_dir):
    trained = load(tiny_dir)
    sharpen(trained)
    plan = plan_episodes(data_dir, ["algebra", "precalculus"], [0, 3], 1, 3, seed=0)
    records = episode_records(data_dir, plan)
    before = {name: p.detach().clone() for name, p in trained.params.items()}
    rows = evaluate_model(trained, plan, records, ADAPT, **EVAL)
    return SimpleNamespace(trained=trained, plan=plan, records=records, rows=rows, before=before)


def test_rows_cover_every_episode_and_problem(evaluated):
    keys = [(r["task"], r["n"], r["seed"], r["id"], tuple(r["shot_ids"])) for r in evaluated.rows]
    assert keys == [(ep.task, ep.n, ep.seed, pid, ep.shot_ids) for ep in evaluated.plan for pid in ep.test_ids]
    for row in evaluated.rows:
        assert row["holdout"] == (row["task"] == "precalculus")
        assert row["gold"] == evaluated.records[row["id"]]["answer"]
        assert isinstance(row["correct"], bool) and isinstance(row["strict"], bool)
        assert row["tokens"] > 0 and not row["truncated"] and 0 <= row["gen_tokens"] <= EVAL["max_new_tokens"]


def test_loaded_weights_and_mode_are_unchanged(evaluated):
    for name, p in evaluated.trained.params.items():
        assert torch.equal(p, evaluated.before[name]), name
    assert not evaluated.trained.model.training  # load_trained returns it in eval mode


def test_n0_is_the_unadapted_model(evaluated):
    trained = evaluated.trained
    for row in (r for r in evaluated.rows if r["n"] == 0):
        record = evaluated.records[row["id"]]
        nll, tokens = reference_nll(trained.model, trained.tokenizer, record)
        assert row["nll"] == pytest.approx(nll, rel=1e-10) and row["tokens"] == tokens
        assert row["generation"] == reference_greedy(trained.model, trained.tokenizer, record["prompt"],
                                                     EVAL["max_new_tokens"], eos_ids(trained))


def test_adapted_nll_and_generation_equal_an_sgd_reference(evaluated):
    trained = evaluated.trained
    zero_shot = {(r["task"], r["id"]): r for r in evaluated.rows if r["n"] == 0}
    changed = 0
    for ep in (ep for ep in evaluated.plan if ep.n > 0):
        shots = [encode_example(trained.tokenizer, evaluated.records[i]["prompt"], evaluated.records[i]["response"],
                                max_length=MAX_LENGTH, truncation="right") for i in ep.shot_ids]
        model = reference_adapted(trained, shots, ADAPT.lr, ADAPT.steps)
        rows = [r for r in evaluated.rows if (r["task"], r["n"], r["seed"]) == (ep.task, ep.n, ep.seed)]
        for row in rows:
            record = evaluated.records[row["id"]]
            nll, _ = reference_nll(model, trained.tokenizer, record)
            assert row["nll"] == pytest.approx(nll, rel=1e-8)
            assert abs(row["nll"] - zero_shot[(ep.task, row["id"])]["nll"]) > 1e-3  # adaptation did something
            assert row["generation"] == reference_greedy(model, trained.tokenizer, record["prompt"],
                                                         EVAL["max_new_tokens"], eos_ids(trained))
            changed += row["generation"] != zero_shot[(ep.task, row["id"])]["generation"]
    assert changed, "adaptation changed no generation: this test could not tell adapted from loaded weights"


# --- in context: the shots in the prompt ------------------------------------------------------
def in_context_ids(tokenizer, records, shot_ids, rid):
    """The prompt of ``rid`` after ``shot_ids``, built here from plain chat messages (not through the code
    under test): each shot a user then an assistant turn, then the problem."""
    messages = []
    for i in shot_ids:
        messages += [{"role": "user", "content": records[i]["prompt"]},
                     {"role": "assistant", "content": records[i]["response"]}]
    messages.append({"role": "user", "content": records[rid]["prompt"]})
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def in_context_example(tokenizer, records, shot_ids, rid):
    prompt = in_context_ids(tokenizer, records, shot_ids, rid)
    response = tokenizer(records[rid]["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {"input_ids": prompt + response, "labels": [-100] * len(prompt) + response}


@pytest.mark.parametrize("steps", [0, 2], ids=["icl", "icl+gradient"])
def test_in_context_rows_equal_a_reference_and_pair_with_gradient_rows(evaluated, steps):
    """ICL (steps=0): every problem scored and generated after its episode's shots in the prompt, at the
    loaded weights; ICL + gradient: SGD on each shot after the episode's OTHER shots, then scored in context.
    The rows have the keys, order and scored tokens of the gradient rows (they pair); n = 0 is unchanged."""
    trained = evaluated.trained
    tok = trained.tokenizer
    settings = replace(ADAPT, steps=steps, shots_in_prompt=True)
    rows = evaluate_model(trained, evaluated.plan, evaluated.records, settings, **EVAL)
    plain = {(r["task"], r["n"], r["seed"], r["id"]): r for r in evaluated.rows}
    assert [(r["task"], r["n"], r["seed"], r["id"]) for r in rows] == list(plain)
    differ = 0
    for ep in evaluated.plan:
        model = trained.model
        if ep.n and steps:
            shots = [in_context_example(tok, evaluated.records, [j for j in ep.shot_ids if j != i], i)
                     for i in ep.shot_ids]
            model = reference_adapted(trained, shots, ADAPT.lr, steps)
        for row in (r for r in rows if (r["task"], r["n"], r["seed"]) == (ep.task, ep.n, ep.seed)):
            same = plain[(ep.task, ep.n, ep.seed, row["id"])]
            assert row["in_context"] is True and row["tokens"] == same["tokens"]
            assert row["answer_tokens"] == same["answer_tokens"]
            example = in_context_example(tok, evaluated.records, ep.shot_ids, row["id"])
            nll, _ = nll_of(model, tok, example)
            pre, _ = nll_of(trained.model, tok, example)
            assert row["nll"] == pytest.approx(nll, rel=1e-8) and row["nll_pre"] == pytest.approx(pre, rel=1e-8)
            assert row["generation"] == greedy_from_ids(model, tok, in_context_ids(tok, evaluated.records, ep.shot_ids,
                                                                                   row["id"]),
                                                        EVAL["max_new_tokens"], eos_ids(trained))
            if ep.n == 0:
                assert row["nll"] == pytest.approx(same["nll"], rel=1e-12)
            else:
                differ += abs(row["nll"] - same["nll"]) > 1e-6
    assert differ, "the shots in the prompt changed no score: this test could not tell ICL from the plain rows"


def test_in_context_examples_are_capped_per_shot_and_named_when_too_long(evaluated):
    """An example with k shots in its prompt holds k + 1 records: its cap is (k + 1) x max_length; over it,
    truncation=error names the record and its shots before anything runs."""
    episode = next(ep for ep in evaluated.plan if ep.n > 0)
    longest = max(len(in_context_example(evaluated.trained.tokenizer, evaluated.records, episode.shot_ids, i)["input_ids"])
                  for i in episode.test_ids)
    tight = replace(ADAPT, steps=0, shots_in_prompt=True, truncation="error", max_length=longest // (episode.n + 1) - 1)
    with pytest.raises(ValueError, match=rf"record \S+ after the in-context shots \[.*\]: example has \d+ tokens "
                                         rf"\(prompt \d+ with {episode.n} in-context examples"):
        few_shot.check_lengths(evaluated.trained.tokenizer, [episode], evaluated.records, tight)
    roomy = replace(tight, max_length=-(-longest // (episode.n + 1)))
    few_shot.check_lengths(evaluated.trained.tokenizer, [episode], evaluated.records, roomy)


def test_generation_does_not_depend_on_the_batch(evaluated):
    trained = evaluated.trained
    episodes = [ep for ep in evaluated.plan if ep.n == 0]
    rows = evaluate_model(trained, episodes, evaluated.records, ADAPT, **{**EVAL, "gen_batch_size": 3})
    assert [r["generation"] for r in rows] == [r["generation"] for r in evaluated.rows if r["n"] == 0]


def test_the_adapted_weights_generate(data_dir, tiny_dir):
    """Shots whose solutions are all "7": after adapting on them the model answers "7"; before it does not."""
    trained = sharpen(load(tiny_dir, "fp32"), embeddings_only=True)
    plan = plan_episodes(data_dir, ["algebra"], [0], 1, 3, seed=0)
    records = episode_records(data_dir, plan)
    fake = {f"fixed/{i}": {"id": f"fixed/{i}", "prompt": f"Question {i}: what now?", "response": "7", "answer": "7"}
            for i in range(4)}
    records.update(fake)
    adapted = Episode("algebra", 4, 0, tuple(fake), plan[0].test_ids)
    adapt = replace(ADAPT, lr=0.1, steps=25, batch_size=4)
    settings = {**EVAL, "max_new_tokens": 4, "gen_batch_size": 3}
    before, after, again = (evaluate_model(trained, [ep], records, adapt, **settings) for ep in (plan[0], adapted, plan[0]))
    assert [r["generation"] for r in after] == ["7"] * 3 and all(r["finished"] for r in after)
    assert all(r["generation"] != "7" for r in before)
    assert [r["generation"] for r in again] == [r["generation"] for r in before]  # restored after the episode


def test_adaptation_settings_are_required_for_shots(data_dir, tiny_dir, evaluated):
    episode = next(ep for ep in evaluated.plan if ep.n > 0)
    with pytest.raises(ValueError, match="lr must be a positive number"):
        evaluate_model(evaluated.trained, [episode], evaluated.records, replace(ADAPT, lr=None), **EVAL)


def test_nll_pre_is_the_nll_at_the_loaded_weights(evaluated):
    trained = evaluated.trained
    zero_shot = {(r["task"], r["id"]): r["nll"] for r in evaluated.rows if r["n"] == 0}
    for row in evaluated.rows:
        if row["n"] == 0:
            assert row["nll_pre"] == row["nll"]  # unadapted: the same value, not a second forward
            continue
        nll, _ = reference_nll(trained.model, trained.tokenizer, evaluated.records[row["id"]])
        assert row["nll_pre"] == pytest.approx(nll, rel=1e-10)
        assert row["nll_pre"] == zero_shot[(row["task"], row["id"])]
        assert abs(row["nll_pre"] - row["nll"]) > 1e-3  # the adapted NLL is another number


def test_unadapted_nll_is_computed_once_per_problem(data_dir, evaluated, monkeypatch):
    calls = []

    class CountingLoss(few_shot.FunctionalLoss):
        def logits(self, *args, **kwargs):
            calls.append(1)
            return super().logits(*args, **kwargs)

    monkeypatch.setattr(few_shot, "FunctionalLoss", CountingLoss)
    plan = plan_episodes(data_dir, ["algebra", "geometry"], [0, 2, 3], 2, 2, seed=0)
    records = episode_records(data_dir, plan)
    rows = evaluate_model(evaluated.trained, plan, records, ADAPT, **{**EVAL, "generate": False})
    problems = {pid for ep in plan for pid in ep.test_ids}
    adapted = sum(len(ep.test_ids) for ep in plan if ep.n > 0)
    assert len(calls) == len(problems) + adapted  # one unadapted forward per problem, one per adapted row
    pre = {}
    for row in rows:
        assert pre.setdefault(row["id"], row["nll_pre"]) == row["nll_pre"]


def test_generate_false_scores_nll_only(evaluated, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("generate=False must neither generate nor grade")

    monkeypatch.setattr(generation, "generate_greedy", refuse)
    monkeypatch.setattr(few_shot, "load_metric", refuse)
    rows = evaluate_model(evaluated.trained, evaluated.plan, evaluated.records, ADAPT, **{**EVAL, "generate": False})
    assert len(rows) == len(evaluated.rows)
    for row, full in zip(rows, evaluated.rows):
        assert row.keys() == full.keys()
        for key in ("task", "n", "seed", "id", "shot_ids", "nll", "nll_pre", "tokens", "truncated", "gold"):
            assert row[key] == full[key], key
        for key in ("generation", "gen_tokens", "finished", "extracted", "correct", "strict"):
            assert row[key] is None, key


def test_over_long_problems_are_cut_to_what_the_model_takes(evaluated, caplog):
    """A 100,000-character problem (which made `lora-maml eval` allocate ~50 GB): as a shot and as a
    reference it is cut to --max-length like in training; its generation prompt keeps its last
    max_position_embeddings - max_new_tokens tokens; one warning counts both. With truncation=error the
    evaluation stops before the first episode, naming the record."""
    trained = evaluated.trained
    episode = next(ep for ep in evaluated.plan if ep.n > 0 and not ep.holdout)
    long_test, long_shot = episode.test_ids[0], episode.shot_ids[0]
    records = {k: dict(v) for k, v in evaluated.records.items()}
    for rid in (long_test, long_shot):
        records[rid]["prompt"] = "What is " + "1 + " * 25_000 + "1?"
    positions = trained.model.config.max_position_embeddings
    full_prompt = prompt_ids(trained.tokenizer, records[long_test]["prompt"])
    # A --max-length beyond the model's positions: the positions bound the lengths.
    encoded, prompts, cut = few_shot._encode_plan(trained.tokenizer, positions, [episode], records,
                                                 replace(ADAPT, max_length=4 * positions, truncation="right"),
                                                 max_new_tokens=6)
    test_key, shot_key = ((), long_test), ((), long_shot)
    assert cut == {test_key} and len(prompts[test_key]) == positions - 6 < len(full_prompt)
    assert prompts[test_key] == full_prompt[-(positions - 6):]  # the end: the question's end, the assistant turn
    assert encoded[shot_key]["truncated"] and len(encoded[shot_key]["input_ids"]) == positions
    assert all(prompts[key] == prompt_ids(trained.tokenizer, records[key[1]]["prompt"]) for key in prompts
               if key != test_key)

    rows = evaluate_model(trained, [episode], records, ADAPT, **EVAL)
    assert [r["prompt_truncated"] for r in rows] == [r["id"] == long_test for r in rows]
    assert next(r for r in rows if r["id"] == long_test)["truncated"]
    assert f"1 of {len(episode.test_ids)} generation prompts cut to their last tokens" in caplog.text
    with pytest.raises(ValueError, match=rf"record {long_shot}: example has \d+ tokens"):
        evaluate_model(trained, [episode], records, replace(ADAPT, truncation="error"), **EVAL)


def test_adam_adaptation_equals_a_torch_adam_reference(data_dir, evaluated):
    trained = evaluated.trained
    plan = plan_episodes(data_dir, ["algebra"], [3], 1, 2, seed=0)
    records = episode_records(data_dir, plan)
    settings = {**EVAL, "generate": False}
    adapt = replace(ADAPT, lr=0.02)
    adam = evaluate_model(trained, plan, records, replace(adapt, optimizer="adam"), **settings)
    sgd = evaluate_model(trained, plan, records, adapt, **settings)
    shots = [encode_example(trained.tokenizer, records[i]["prompt"], records[i]["response"], max_length=MAX_LENGTH,
                            truncation="right") for i in plan[0].shot_ids]
    model = reference_adapted(trained, shots, 0.02, ADAPT.steps, torch.optim.Adam, betas=(0.9, 0.999), eps=1e-8)
    for row_adam, row_sgd in zip(adam, sgd):
        nll, _ = reference_nll(model, trained.tokenizer, records[row_adam["id"]])
        assert row_adam["nll"] == pytest.approx(nll, rel=1e-8)
        assert abs(row_adam["nll"] - row_sgd["nll"]) > 1e-3
        assert row_adam["nll_pre"] == row_sgd["nll_pre"]
    # Per-parameter rates: equal rates are the scalar; a missing name is an error.
    rates = {name: 0.02 for name in trained.params}
    per_tensor = evaluate_model(trained, plan, records, replace(adapt, lr=rates, optimizer="adam"), **settings)
    assert [r["nll"] for r in per_tensor] == [r["nll"] for r in adam]
    with pytest.raises(KeyError, match="no inner learning rate"):
        evaluate_model(trained, plan, records, replace(adapt, lr=dict(list(rates.items())[1:])), **settings)
    for bad in (0.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="lr must be a positive finite number"):
            evaluate_model(trained, plan, records, replace(adapt, lr={**rates, next(iter(rates)): bad}), **settings)
    with pytest.raises(ValueError, match=r"optimizer must be one of sgd\|adam, got 'rmsprop'"):
        evaluate_model(trained, plan, records, replace(adapt, optimizer="rmsprop"), **settings)


# --- command line ----------------------------------------------------------------------------
def save_fomaml_run(tiny_dir, run_dir):
    cfg = Config.model_validate({
        "model": {"partial_pretrain": str(tiny_dir), "dtype": "fp32", "enable_gradient_checkpointing": False,
                  "lora": {"r": 4, "alpha": 8}},
        "meta": {"inner_lr": 0.05, "num_inner_steps": 2, "inner_batch_size": 2, "inner_optimizer": "adam"},
        "data": {"max_length": 200},
        "trainer": {"default_local_dir": str(run_dir)},
    })
    trained = load_trained(str(tiny_dir), dtype="fp32", lora=cfg.model.lora)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in trained.params.items():
            if ".lora_B." in name:
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.05)
    ckpt.save_checkpoint(
        run_dir, 1, model_state_dict={n: p.detach() for n, p in trained.params.items()},
        optimizer_state_dict={"state": {}, "param_groups": []}, config=config_to_dict(cfg),
        trainer_state={"kind": "fomaml"}, rng_states=[ckpt.capture_rng_state()],
        save_pretrained=lambda d: trained.model.save_pretrained(d, safe_serialization=True), pretrained_kind="adapter",
    )
    return run_dir


def test_cli_compares_methods_on_identical_episodes(data_dir, tiny_dir, tmp_path, capsys):
    run_dir = save_fomaml_run(tiny_dir, tmp_path / "fomaml_run")
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "meta/loss": 1 / s, "algebra/query_loss": 1 / s}) + "\n"
                               for s in range(1, 4)))
    out = tmp_path / "out"
    common = ["--data-dir", str(data_dir), "--tasks", "algebra", "precalculus", "--n-shots", "0", "2", "--seeds", "2",
              "--max-test-per-task", "2", "--max-new-tokens", "3", "--gen-batch-size", "2", "--n-boot", "50",
              "--dtype", "fp32", "--device", "cpu", "--output-dir", str(out)]
    code = main(["--compare", f"base={tiny_dir}", f"fomaml={run_dir}", "--adapt-steps", "base=1",
                 "--adapt-optimizer", "base=sgd", "--metrics-jsonl", str(metrics), *common])
    assert code == 0
    assert {p.name for p in out.iterdir()} == {"plan.json", "rows", "results.json", "results.md",
                                              "few_shot_curve.png", "learning_curves.png"}
    results = json.loads((out / "results.json").read_text())
    base, fomaml = results["metadata"]["methods"]["base"], results["metadata"]["methods"]["fomaml"]
    # The FOMAML run's inner loop is every method's default; NAME=V overrides it for one method.
    assert (fomaml["adapt_lr"], fomaml["adapt_steps"], fomaml["adapt_batch_size"], fomaml["max_length"]) == (0.05, 2, 2, 200)
    assert (base["adapt_lr"], base["adapt_steps"], base["adapt_batch_size"]) == (0.05, 1, 2)
    assert (fomaml["adapt_optimizer"], base["adapt_optimizer"]) == ("adam", "sgd")
    assert base["defaults_from"] == fomaml["defaults_from"] == "fomaml"

    def keys(name):
        rows = json.loads((out / "rows" / f"{name}.json").read_text())["rows"]
        return [(r["task"], r["n"], r["seed"], r["id"], tuple(r["shot_ids"]), r["holdout"]) for r in rows]

    assert keys("base") == keys("fomaml") and len(keys("base")) == 2 * (1 + 2) * 2
    assert any(k[5] for k in keys("base"))
    plan = json.loads((out / "plan.json").read_text())
    assert plan["plan_sha256"] == results["metadata"]["plan"]["plan_sha256"]
    markdown = (out / "results.md").read_text()
    assert "| fomaml vs base |" in markdown and "## Adaptation to an unseen subject" in markdown
    assert markdown in capsys.readouterr().out
    for name in ("few_shot_curve.png", "learning_curves.png"):
        assert (out / name).stat().st_size > 10_000


def test_cli_scores_a_method_in_context_beside_gradient_adaptation(data_dir, tiny_dir, tmp_path, capsys):
    """--in-context NAME: that method's shots go into the prompt; with --adapt-steps NAME=0 no rate is needed (no
    gradient step). Its rows pair with the other method's and the report compares the two."""
    out = tmp_path / "out"
    code = main(["--compare", f"base={tiny_dir}", f"base_icl={tiny_dir}", "--in-context", "base_icl",
                 "--adapt-steps", "base=1", "base_icl=0", "--adapt-lr", "base=0.05", "--adapt-batch-size", "2",
                 "--data-dir", str(data_dir), "--tasks", "algebra", "--n-shots", "0", "2", "--seeds", "1",
                 "--max-test-per-task", "2", "--no-generate", "--n-boot", "50", "--dtype", "fp32", "--output-dir", str(out)])
    assert code == 0, capsys.readouterr().err
    rows = {m: json.loads((out / "rows" / f"{m}.json").read_text())["rows"] for m in ("base", "base_icl")}
    assert [(r["n"], r["id"]) for r in rows["base"]] == [(r["n"], r["id"]) for r in rows["base_icl"]]
    assert all(r["in_context"] for r in rows["base_icl"]) and not any(r["in_context"] for r in rows["base"])
    assert all(r["nll"] == r["nll_pre"] for r in rows["base_icl"])  # no gradient step
    results = json.loads((out / "results.json").read_text())
    assert results["metadata"]["methods"]["base_icl"]["in_context"] is True
    assert {(r["a"], r["b"]) for r in results["significance"]} == {("base_icl", "base")}
    assert main(["--model-path", str(tiny_dir), "--in-context", "nobody", "--data-dir", str(data_dir),
                 "--output-dir", str(tmp_path / "x")]) == 1
    assert "--in-context nobody: no such method" in capsys.readouterr().err


def test_cli_without_a_run_config_needs_the_adaptation_settings(data_dir, tiny_dir, tmp_path, capsys):
    code = main(["--model-path", str(tiny_dir), "--data-dir", str(data_dir), "--tasks", "algebra", "--n-shots", "0", "2",
                 "--adapt-lr", "0.1", "--output-dir", str(tmp_path / "out")])
    assert code == 1
    err = capsys.readouterr().err
    assert "no run checkpoint among the methods" in err and "--adapt-steps --adapt-batch-size" in err
    assert not (tmp_path / "out").exists()  # nothing was evaluated
    code = main(["--compare", "a=x", "a=y", "--data-dir", str(data_dir), "--output-dir", str(tmp_path / "out")])
    assert code == 1 and "given twice" in capsys.readouterr().err


def test_cli_refuses_an_output_dir_that_is_a_file_before_loading(data_dir, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code = main(["--model-path", str(tmp_path / "no_model"), "--data-dir", str(data_dir), "--tasks", "algebra",
                 "--n-shots", "0", "--output-dir", str(blocker)])
    assert code == 1
    assert capsys.readouterr().err == f"error: --output-dir={blocker}: not a writable directory ({blocker} is a file)\n"


def test_cli_method_names_are_plain_file_names_checked_before_anything_is_written(data_dir, tiny_dir, tmp_path, capsys):
    """A method's name becomes rows/NAME.json under --output-dir: --name is checked like --compare's names,
    so `--name ../../ESCAPE` cannot write outside it (nor over a checkpoint's files)."""
    out = tmp_path / "deep" / "out"
    common = ["--data-dir", str(data_dir), "--tasks", "algebra", "--n-shots", "0", "--max-test-per-task", "1",
              "--no-generate", "--device", "cpu", "--output-dir", str(out)]
    for name in ("../../ESCAPE", "../../../RUN/step_2/trainer_state", "a/b", "", "x\n", "../" * 100 + "X"):
        assert main(["--model-path", str(tiny_dir), "--name", name, *common]) == 1
        err = capsys.readouterr().err
        assert f"error: --name {name[:100]!r}: expected a NAME made of letters, digits, _ . -\n" in err, err
        assert err.count("error:") == 1 and "Traceback" not in err
    assert main(["--compare", "../ESCAPE=" + str(tiny_dir), *common]) == 1
    assert "error: --compare '../ESCAPE=" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written: no output dir, no ESCAPE.json


def test_cli_adapt_optimizer_errors_name_the_flag(data_dir, tiny_dir, tmp_path, capsys):
    common = ["--compare", f"a={tiny_dir}", f"b={tiny_dir}", "--data-dir", str(data_dir), "--tasks", "algebra",
              "--n-shots", "0", "2", "--adapt-lr", "0.1", "--adapt-steps", "1", "--adapt-batch-size", "2",
              "--output-dir", str(tmp_path / "out")]
    assert main([*common, "--adapt-optimizer", "b=rmsprop"]) == 1
    err = capsys.readouterr().err
    assert "--adapt-optimizer 'b=rmsprop'" in err and "not a valid optimizer (sgd|adam)" in err
    assert main([*common, "--adapt-optimizer", "c=adam"]) == 1
    assert "--adapt-optimizer 'c=adam': no method named 'c'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_adapts_a_meta_sgd_run_with_its_learned_rates(data_dir, tiny_dir, tmp_path, capsys, monkeypatch):
    import recipes.evaluate_few_shot as recipe

    run_dir = save_fomaml_run(tiny_dir, tmp_path / "fomaml_run")
    loader = recipe.load_trained

    def with_learned_rates(path, **kwargs):
        trained = loader(path, **kwargs)
        # Rates so small that adapting changes nothing measurable: the scalar 0.05 (Adam) changes a lot.
        if trained.kind == "checkpoint":
            trained.inner_lrs = {name: 1e-12 for name in trained.params}
        return trained

    monkeypatch.setattr(recipe, "load_trained", with_learned_rates)
    common = ["--data-dir", str(data_dir), "--tasks", "algebra", "--n-shots", "0", "2", "--seeds", "1",
              "--max-test-per-task", "2", "--max-new-tokens", "2", "--n-boot", "20", "--dtype", "fp64", "--device", "cpu"]
    out = tmp_path / "learned"
    assert main(["--compare", f"base={tiny_dir}", f"fomaml={run_dir}", *common, "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[fomaml]" in printed and "adapt adam lr=learned per-tensor (Meta-SGD: " in printed
    methods = json.loads((out / "results.json").read_text())["metadata"]["methods"]
    assert methods["fomaml"]["adapt_lr"] == "learned"
    assert set(methods["fomaml"]["learned_inner_lrs"].values()) == {1e-12}
    assert methods["base"]["adapt_lr"] == 0.05 and "learned_inner_lrs" not in methods["base"]

    def gains(directory, name):
        rows = json.loads((directory / "rows" / f"{name}.json").read_text())["rows"]
        return [abs(r["nll_pre"] - r["nll"]) for r in rows if r["n"] > 0]

    assert max(gains(out, "fomaml")) < 1e-6 and min(gains(out, "base")) > 1e-3
    explicit = tmp_path / "explicit"  # an explicit rate for the method wins over its learned ones
    assert main(["--model-path", str(run_dir), "--name", "fomaml", "--adapt-lr", "fomaml=0.05", *common,
                 "--output-dir", str(explicit)]) == 0
    methods = json.loads((explicit / "results.json").read_text())["metadata"]["methods"]
    assert methods["fomaml"]["adapt_lr"] == 0.05 and "learned_inner_lrs" not in methods["fomaml"]
    assert min(gains(explicit, "fomaml")) > 1e-3


def test_scores_are_the_training_loss_and_the_answer_tokens(evaluated):
    """``nll`` is the training loss of the reference at the loaded weights (n = 0); ``answer_*`` score exactly
    the tokens of the final boxed answer, recomputed here from the logits by hand."""
    from lora_maml.data.tokenize import collate, encode_example
    from lora_maml.meta.fast_weights import FunctionalLoss

    trained = evaluated.trained
    fn = FunctionalLoss(trained.model, list(trained.params))
    weights = [p.detach() for p in trained.params.values()]
    checked = 0
    for row in (r for r in evaluated.rows if r["n"] == 0):
        record = evaluated.records[row["id"]]
        example = encode_example(trained.tokenizer, record["prompt"], record["response"], max_length=ADAPT.max_length,
                                 truncation=ADAPT.truncation, answer=record["answer"])
        batch = collate([example], trained.tokenizer.pad_token_id, packed=False)
        with torch.no_grad():
            loss, _ = fn.loss(weights, batch)
            logits = fn.logits(weights, batch)[0]
        assert row["nll"] == pytest.approx(float(loss), rel=1e-5)
        targets = [(t - 1, token) for t, token in enumerate(example["answer_labels"]) if token != -100]
        text = trained.tokenizer.decode([token for _, token in targets])
        assert text.replace(" ", "") == record["answer"].replace(" ", "") and row["answer_tokens"] == len(targets)
        logp = torch.log_softmax(logits.double(), -1)
        assert row["answer_nll"] == pytest.approx(float(-sum(logp[t, token] for t, token in targets) / len(targets)), rel=1e-4)
        hits = sum(int(logits[t].argmax()) == token for t, token in targets)
        assert row["answer_accuracy"] == pytest.approx(hits / len(targets))
        checked += 1
    assert checked


# --- non-finite numbers are never scored ---------------------------------------------------------
def test_a_diverged_adaptation_marks_its_rows_invalid_never_zero(data_dir, tiny_dir, evaluated):
    """An adaptation at lr 1e30 ends in non-finite weights or logits: its rows are marked invalid with no
    score, generation or grade (not answer_accuracy 0 and correct False), and the report counts them and
    leaves them out of its means. The unadapted rows are scored as usual."""
    trained = sharpen(load(tiny_dir, "fp32"))
    plan = plan_episodes(data_dir, ["algebra"], [0, 2], 2, 2, seed=0)
    records = episode_records(data_dir, plan)
    rows = evaluate_model(trained, plan, records, replace(ADAPT, lr=1e30, steps=2), **EVAL)
    adapted = [r for r in rows if r["n"] > 0]
    assert len(adapted) == 4 and all(r["n"] == 0 for r in rows if r not in adapted)
    for row in adapted:
        assert row["invalid"].startswith(("non-finite adapted weight", "non-finite logits at the adapted weights"))
        assert row["nll"] != row["nll"] and row["answer_accuracy"] != row["answer_accuracy"]  # NaN: no score
        assert row["correct"] is None and row["strict"] is None and row["generation"] is None
        assert row["nll_pre"] > 0  # the loaded weights' scores stay
    for row in (r for r in rows if r["n"] == 0):
        assert row["invalid"] is None and isinstance(row["correct"], bool) and row["answer_accuracy"] >= 0
    report = build_report({"fomaml": rows}, n_boot=50)
    cell = next(r for r in report["summary"] if r["task"] == "algebra" and r["n"] == 2)
    assert cell["invalid"] == 4 and cell["answer_accuracy"] != cell["answer_accuracy"]  # no mean, not 0.000
    assert report["diagnostics"]["fomaml"]["invalid_rows"] == 4
    markdown = render_markdown(report)
    assert "**Invalid rows**" in markdown and "fomaml 4" in markdown and "– (4 invalid)" in markdown


def test_weights_that_give_non_finite_logits_are_an_error_naming_the_model(data_dir, tiny_dir, tmp_path, capsys):
    """An adapter whose adapter_config.json says lora_alpha: 1e30 loads (its weights are finite) but its
    logits are not: `lora-maml eval` fails with one error line naming it, instead of scoring accuracy 0."""
    trained = load(tiny_dir, "fp32")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in trained.params.items():
            if ".lora_B." in name:
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.05)
    adapter = tmp_path / "adapter"
    trained.model.save_pretrained(adapter, safe_serialization=True)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 1e30}))
    code = main(["--model-path", str(adapter), "--data-dir", str(data_dir), "--tasks", "algebra", "--n-shots", "0",
                 "--max-test-per-task", "2", "--no-generate", "--dtype", "fp32", "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith(f"error: {adapter}: its loaded weights give non-finite logits on problem")
    assert not (tmp_path / "out" / "results.json").exists()
