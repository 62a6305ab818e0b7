"""The meta-gradients are checked against independent implementations (fp64, tiny random Qwen3).

Reference = deep copy of the model, K in-place ``torch.optim.SGD`` steps on the module's own
parameters, then ``.backward()`` of the query loss: no fast weights, no functional_call, and the
full-logits loss even where the meta-learner's model has a chunked one (``model.loss_chunk_size``).
"""

import collections
import contextlib
import copy
from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import Qwen3Config, Qwen3ForCausalLM

from lora_maml.config import LoraConfig, MetaConfig, OptimConfig
from lora_maml.loss import causal_lm_loss_tensors, set_loss_chunk_size
from lora_maml.meta.algorithms import MetaLearner, TaskBatch, adapt
from lora_maml.meta.fast_weights import FunctionalLoss, weights_copied_in
from lora_maml.models import add_lora, adapted_parameters, compile_decoder, enable_gradient_checkpointing
from lora_maml.optim import build_optimizer, build_scheduler

VOCAB = 128
INNER_LR = 0.3
K = 3
# model.loss_chunk_size of the meta-learner's model: the full logits, or 5 label positions per chunk
# (a batch of random_batch has 13 label tokens: three chunks, the last one ragged).
CHUNKS = pytest.mark.parametrize("chunk", [None, 5], ids=["logits", "chunked"])


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(adapter="lora", *, dtype=torch.float64, checkpointing=False, tie=False, attn="eager", seed=0,
               chunk=None):
    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=tie,
        attn_implementation=attn, initializer_range=0.2,
    )
    model = Qwen3ForCausalLM(cfg).to(dtype)
    set_loss_chunk_size(model, chunk)
    if checkpointing:
        enable_gradient_checkpointing(model)
    if adapter == "lora":
        model.requires_grad_(False)
        model = add_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    params = adapted_parameters(model, adapter)
    if adapter == "lora":
        with torch.no_grad():  # peft's B = 0 would make every gradient w.r.t. A vanish at θ
            for p in params.values():
                p.normal_(0, 0.3)
    return model.train(), params


def random_batch(gen, b=2, t=12, prompt=4):
    ids = torch.randint(0, VOCAB, (b, t), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    labels = ids.clone()
    labels[:, :prompt] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def random_tasks(n=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [TaskBatch(f"task{i}", [random_batch(gen), random_batch(gen)], random_batch(gen)) for i in range(n)]


def meta_cfg(algorithm="fomaml", steps=K, lr=INNER_LR, tasks=2):
    return MetaConfig(algorithm=algorithm, inner_optimizer="sgd", inner_lr=lr, num_inner_steps=steps, meta_batch_size=tasks)


def full_logits_copy(model):
    """An independent copy of ``model`` whose loss forms the full [B, T, V] logits."""
    m = copy.deepcopy(model)
    set_loss_chunk_size(m, None)
    return m


def inplace_adapt(model, names, task, steps, lr, optimizer="sgd"):
    """A full-logits copy of ``model`` after ``steps`` in-place torch.optim steps (SGD, or Adam with the
    inner loop's betas and eps) on the task's support batches; ``lr`` is one rate or one per tensor
    (a parameter group each). Returns (the copy, its adapted parameters named by ``names``)."""
    from lora_maml.meta import algorithms

    m = full_logits_copy(model)
    own = dict(m.named_parameters())
    params = [own[n] for n in names]
    lrs = lr if isinstance(lr, (list, tuple)) else [lr] * len(params)
    groups = [{"params": [p], "lr": rate} for p, rate in zip(params, lrs)]
    opt = (torch.optim.Adam(groups, betas=algorithms.ADAM_BETAS, eps=algorithms.ADAM_EPS) if optimizer == "adam"
           else torch.optim.SGD(groups))
    for k in range(steps):
        opt.zero_grad()
        causal_lm_loss_tensors(m, task.support[k % len(task.support)])[0].backward()
        opt.step()
    return m, params


def reference(model, names, tasks, steps, lr, algorithm="fomaml", optimizer="sgd"):
    """Mean over tasks of the in-place FOMAML gradient (or Reptile's θ − φ_K)."""
    own = dict(model.named_parameters())
    total = None
    for task in tasks:
        m, params = inplace_adapt(model, names, task, steps, lr, optimizer)
        if algorithm == "reptile":
            grads = [own[n].detach() - p.detach() for n, p in zip(names, params)]
        else:
            for p in params:
                p.grad = None
            causal_lm_loss_tensors(m, task.query)[0].backward()
            grads = [p.grad.clone() for p in params]
        total = grads if total is None else [a + b for a, b in zip(total, grads)]
    return [g / len(tasks) for g in total]


def max_err(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@CHUNKS
@pytest.mark.parametrize("checkpointing", [False, True], ids=["no_ckpt", "ckpt"])
@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_fomaml_matches_inplace_sgd(adapter, checkpointing, chunk):
    # full mode with tied embeddings: one fast weight must replace both embed_tokens and lm_head
    # (chunked: the LM head's weight is read through the module at call time, i.e. the fast weight).
    model, params = tiny_model(adapter, checkpointing=checkpointing, tie=adapter == "full", chunk=chunk)
    tasks = random_tasks()
    ours = list(MetaLearner(model, params, meta_cfg()).meta_gradient(tasks).grads.values())
    ref = reference(model, list(params), tasks, K, INNER_LR)
    plain = reference(model, list(params), tasks, 0, INNER_LR)
    assert max_err(ours, ref) <= 1e-9
    assert max_err(plain, ref) > 1e-3  # adaptation changes the gradient: the check has teeth


def test_micro_batches_are_one_token_weighted_batch():
    """A support entry / query given as micro-batches (rows of one batch) gives the same meta-gradient
    and metrics as the whole batch: Σ_m n_m L_m / Σ_m n_m with gradients accumulated."""
    model, params = tiny_model("lora", checkpointing=True)
    gen = torch.Generator().manual_seed(3)
    whole = [TaskBatch(f"task{i}", [random_batch(gen, b=3), random_batch(gen, b=3)], random_batch(gen, b=3))
             for i in range(2)]
    split = lambda b: [{k: v[:1] for k, v in b.items()}, {k: v[1:] for k, v in b.items()}]  # noqa: E731
    micro = [TaskBatch(t.name, [split(b) for b in t.support], split(t.query)) for t in whole]
    for algorithm in ("fomaml", "reptile"):
        a = MetaLearner(model, params, meta_cfg(algorithm)).meta_gradient(whole)
        grads = [g.clone() for g in a.grads.values()]
        b = MetaLearner(model, params, meta_cfg(algorithm)).meta_gradient(micro)
        # 1e-6: fp32 RMSNorm/softmax inside the fp64 model see 1-row vs 3-row matmul roundings
        assert max_err(b.grads.values(), grads) <= 1e-6
        assert b.metrics == pytest.approx(a.metrics, rel=1e-6)
        assert b.task_metrics == pytest.approx(a.task_metrics, rel=1e-6)


def test_micro_batch_weights_are_in_the_loss_dtype():
    """fp64 end to end: the micro-batches' weights n_m / Σ n are fp64 like their losses. An fp32 weight
    (int / int tensors) puts ~1e-8 relative error on an fp64 loss and its gradient."""
    from lora_maml.meta.fast_weights import loss_and_grads

    model, params = tiny_model("lora")
    gen = torch.Generator().manual_seed(5)
    micro = [random_batch(gen, b=1, prompt=4), random_batch(gen, b=2, prompt=2)]  # 5 + 17 label tokens
    wrt = list(params.values())
    loss, n_tokens, grads = loss_and_grads(model, micro, wrt)
    parts = [causal_lm_loss_tensors(model, m) for m in micro]
    assert [int(n) for _, n in parts] == [5, 17] and int(n_tokens) == 22
    expected = sum(part * (int(n) / 22) for part, n in parts)  # Python floats: fp64 weights
    expected_grads = torch.autograd.grad(expected, wrt)
    assert loss.dtype == torch.float64
    # Both sides add the same fp64 terms; only the gradients' accumulation order may differ (a few ulps).
    assert abs((loss - expected).item()) <= 1e-14 * abs(expected.item())
    assert max_err(grads, expected_grads) <= 1e-13 * max(g.abs().max().item() for g in expected_grads)


def test_naive_functional_call_then_grad_is_wrong_under_checkpointing():
    """Pins the pitfall: functional_call for the forward, autograd.grad after it returns → the
    checkpointed layers are recomputed with the module's own weights, not the fast ones."""
    results = {}
    for checkpointing in (False, True):
        model, params = tiny_model("lora", checkpointing=checkpointing)
        batch = random_tasks(1)[0].query
        fast = {n: (p.detach() + 0.2 * torch.randn_like(p)).requires_grad_() for n, p in params.items()}
        loss_of = lambda m, b: causal_lm_loss_tensors(m, b)[0]  # noqa: E731
        wrapper = torch.nn.Module()
        wrapper.model = model
        wrapper.forward = lambda b: loss_of(wrapper.model, b)
        loss = torch.func.functional_call(wrapper, {"model." + n: t for n, t in fast.items()}, (batch,))
        naive = torch.autograd.grad(loss, list(fast.values()))
        _, _, right = FunctionalLoss(model, list(params)).loss_and_grads(list(fast.values()), batch)
        results[checkpointing] = max_err(naive, right)
    assert results[False] <= 1e-12
    assert results[True] > 1e-3


def _rms_norm_in_input_dtype(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _rope_in_input_dtype(self, x, position_ids):
    freqs = position_ids[..., None].to(x.dtype) * self.inv_freq.to(device=x.device, dtype=x.dtype)
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos() * self.attention_scaling, angles.sin() * self.attention_scaling


@contextlib.contextmanager
def fp64_throughout():
    """Make the fp64 tiny Qwen3 (built with ``attn="sdpa"``) fp64 throughout; :class:`Fp64Probe` checks it.

    Qwen3's RMSNorm casts to fp32 and its eager attention takes the softmax in fp32: fp32 rounding
    of θ-dependent values puts ~1e-7 noise on the loss, which swamps a difference quotient at
    eps = 1e-6, and makes two layouts of the same sums (1 process vs rows split over 2) round
    differently on one CPU and alike on another. RMSNorm is patched to compute in its input dtype,
    and attention goes through SDPA's math backend, which has a double backward (the default CPU SDPA
    kernel has none). The RoPE angles, also fp32, are made fp64 too: torch.compile's cos/sin differ
    from eager's by fp32 ulps. Also used inside the workers of the multi-process tests.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers.models.qwen3 import modeling_qwen3

    with (
        mock.patch.object(modeling_qwen3.Qwen3RMSNorm, "forward", _rms_norm_in_input_dtype),
        mock.patch.object(modeling_qwen3.Qwen3RotaryEmbedding, "forward", _rope_in_input_dtype),
        sdpa_kernel(SDPBackend.MATH),
    ):
        yield


@pytest.fixture
def exact_fp64():
    """:func:`fp64_throughout` for one test."""
    with fp64_throughout():
        yield


class Fp64Probe(TorchDispatchMode):
    """Counts the ops that produce a floating-point tensor in another dtype than fp64 (forward,
    backward, optimizer, collectives): on an fp64 model, each is a place that silently computes in
    lower precision. Empty tensors (placeholders) compute nothing and are not counted."""

    def __init__(self):
        super().__init__()
        self.other: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 and t.numel():
                self.other[f"{func} -> {t.dtype}"] += 1
        return out


@CHUNKS
def test_maml_matches_central_finite_differences(exact_fp64, chunk):
    """Second order through the inner loop; chunked: also through the checkpointed chunks' recomputation
    (non-reentrant checkpointing supports the double backward), against a full-logits reference."""
    model, params = tiny_model("lora", attn="sdpa", chunk=chunk)
    names, tasks, steps = list(params), random_tasks(), 2
    maml = MetaLearner(model, params, meta_cfg("maml", steps)).meta_gradient(tasks)
    grads = [g.clone() for g in maml.grads.values()]
    fomaml = list(MetaLearner(model, params, meta_cfg("fomaml", steps)).meta_gradient(tasks).grads.values())

    def objective(direction, eps):
        """mean_t L(φ_K(θ + eps·d); Q_t), φ_K from in-place SGD on a copy."""
        m = full_logits_copy(model)
        own = dict(m.named_parameters())
        with torch.no_grad():
            for n, d in zip(names, direction):
                own[n].add_(eps * d)
        total = 0.0
        for task in tasks:
            c, _ = inplace_adapt(m, names, task, steps, INNER_LR)
            with torch.no_grad():
                total += causal_lm_loss_tensors(c, task.query)[0].item()
        return total / len(tasks)

    gen = torch.Generator().manual_seed(5)
    eps = 1e-6
    for _ in range(2):
        d = [torch.randn(g.shape, generator=gen, dtype=g.dtype) for g in grads]
        fd = (objective(d, eps) - objective(d, -eps)) / (2 * eps)
        analytic = sum((g * v).sum().item() for g, v in zip(grads, d))
        assert abs(fd - analytic) <= 1e-7 * max(1.0, abs(analytic)), (fd, analytic)
        first_order = sum((g * v).sum().item() for g, v in zip(fomaml, d))
        assert abs(first_order - analytic) > 1e-2 * abs(analytic)  # the second-order terms matter


@pytest.mark.parametrize(
    "adapter, backend",
    [("lora", "aot_eager"), ("full", "aot_eager"), pytest.param("lora", "inductor", marks=pytest.mark.slow)],
)
def test_compiled_decoder_gives_the_eager_meta_gradient(exact_fp64, adapter, backend):
    """model.compile: the FOMAML meta-gradient through functional_call with a torch.compile'd decoder body
    (aot_eager: dynamo + AOTAutograd capture; inductor: the default backend, generated kernels) equals the
    eager one, which test_fomaml_matches_inplace_sgd pins to the in-place reference. LoRA with gradient
    checkpointing (as the 4B config) and the chunked loss; full with tied embeddings and full logits."""
    from torch._dynamo.utils import counters

    lora = checkpointing = adapter == "lora"
    chunk = 5 if lora else None
    model, params = tiny_model(adapter, checkpointing=checkpointing, tie=not lora, attn="sdpa", chunk=chunk)
    tasks = random_tasks()
    eager = [g.clone() for g in MetaLearner(model, params, meta_cfg()).meta_gradient(tasks).grads.values()]
    unadapted = [g.clone() for g in MetaLearner(model, params, meta_cfg(steps=0)).meta_gradient(tasks).grads.values()]
    frames_before = counters["frames"]["ok"]
    compile_decoder(model, backend=backend)
    ours = MetaLearner(model, params, meta_cfg()).meta_gradient(tasks).grads.values()
    assert counters["frames"]["ok"] > frames_before  # the decoder did run compiled
    assert max_err(ours, eager) <= 1e-12
    assert max_err(unadapted, eager) > 1e-3  # compiled code that ignored the fast weights would fail
    if not checkpointing:  # (with checkpointing, maml is refused for that first)
        with pytest.raises(ValueError, match="model.compile=false"):  # no double backward through compile
            MetaLearner(model, params, meta_cfg("maml"))


@pytest.mark.parametrize("algorithm", ["fomaml", "maml"])
def test_zero_inner_steps_is_the_multitask_query_gradient(algorithm):
    model, params = tiny_model("lora")
    tasks = random_tasks(3)
    result = MetaLearner(model, params, meta_cfg(algorithm, 0, tasks=3)).meta_gradient(tasks)
    m = copy.deepcopy(model)
    own = dict(m.named_parameters())
    loss = sum(causal_lm_loss_tensors(m, t.query)[0] for t in tasks) / len(tasks)
    expected = torch.autograd.grad(loss, [own[n] for n in params])
    # 1e-6, not 1e-12: Qwen3's RMSNorm and eager softmax run in fp32 even in an fp64 model, and the
    # reference scales the upstream gradient by 1/3 before them, the meta-learner after.
    assert max_err(result.grads.values(), expected) <= 1e-6
    assert "meta/avg_adaptation_gap" not in result.metrics  # undefined without inner steps


def test_reptile_pseudo_gradient_is_theta_minus_adapted():
    model, params = tiny_model("lora")
    tasks = random_tasks()
    ours = MetaLearner(model, params, meta_cfg("reptile")).meta_gradient(tasks)
    ref = reference(model, list(params), tasks, K, INNER_LR, algorithm="reptile")
    assert max_err(ours.grads.values(), ref) <= 1e-12
    assert max(r.abs().max().item() for r in ref) > 1e-3


def test_adapt_returns_inplace_sgd_weights_and_leaves_model_alone():
    model, params = tiny_model("lora")
    task = random_tasks(1)[0]
    before = {n: p.detach().clone() for n, p in params.items()}
    adapted = adapt(model, params, task.support, INNER_LR, K)
    assert all(torch.equal(before[n], p) for n, p in params.items())
    m, ps = inplace_adapt(model, list(params), task, K, INNER_LR)
    assert max_err(adapted.values(), ps) <= 1e-12
    with torch.no_grad():
        with weights_copied_in(params, adapted):
            inside = causal_lm_loss_tensors(model, task.query)[0]
        assert inside == causal_lm_loss_tensors(m, task.query)[0]
    assert all(torch.equal(before[n], p) for n, p in params.items())


def outer_setup(model, params, cfg, optim_cfg=None, total_steps=10):
    optim_cfg = optim_cfg or OptimConfig(weight_decay=0.1, lr_scheduler="constant")
    learner = MetaLearner(model, params, cfg)
    optimizer = build_optimizer(params, cfg.outer_lr, optim_cfg)
    return learner, optimizer, build_scheduler(optimizer, optim_cfg, total_steps), optim_cfg.clip_grad


@pytest.mark.parametrize("inner", ["sgd", "adam"])
def test_an_fp64_meta_gradient_computes_in_fp64_only(exact_fp64, inner):
    """The meta-gradient of an fp64 full-mode model (micro-batched support and query, diagnostics)
    produces no floating-point tensor of another dtype in its forwards, backwards, inner loop, losses and
    sums: the premise of every fp64 tolerance here and in tests/recipes/test_full_mode.py. Catches e.g.
    an int / int tensor division (fp32, the default dtype) or a tensor made without a dtype. (The outer
    step is left out: AdamW keeps its step counts as fp32 tensors, exact integers it reads as floats.)"""
    model, params = tiny_model("full", tie=True, attn="sdpa")
    gen = torch.Generator().manual_seed(7)
    split = lambda b: [{k: v[:1] for k, v in b.items()}, {k: v[1:] for k, v in b.items()}]  # noqa: E731
    tasks = [TaskBatch(f"task{i}", [split(random_batch(gen, b=3))], split(random_batch(gen, b=3))) for i in range(2)]
    cfg = MetaConfig(algorithm="fomaml", inner_optimizer=inner, inner_lr=0.01, num_inner_steps=2, meta_batch_size=2)
    learner = MetaLearner(model, params, cfg)
    with Fp64Probe() as probe:
        metrics = learner.meta_gradient(tasks, diagnostics=True).metrics
    assert metrics["meta/inner_progress"] != 0.0  # the diagnostics' forwards ran
    assert not probe.other, f"computed in another dtype than fp64: {dict(probe.other)}"


def test_lora_meta_steps_leave_base_bit_identical():
    model, params = tiny_model("lora", checkpointing=True)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if n not in params}
    lora = {n: p.detach().clone() for n, p in params.items()}
    learner, opt, sched, clip = outer_setup(model, params, meta_cfg())
    tasks = random_tasks()
    learner.meta_gradient(tasks)
    assert all(torch.equal(lora[n], p) for n, p in params.items())  # the inner loop writes nothing
    for _ in range(3):
        learner.step(tasks, opt, sched, clip)
    own = dict(model.named_parameters())
    assert all(torch.equal(base[n], own[n]) for n in base)
    assert all(not torch.equal(lora[n], p) for n, p in params.items())


def shift_task(name, shift, gen, batches=2, b=4, t=16):
    """Learnable toy task: x_{t+1} = (x_t + shift) mod V from a random start."""
    def batch():
        start = torch.randint(0, VOCAB, (b, 1), generator=gen)
        ids = (start + shift * torch.arange(t)) % VOCAB
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    return TaskBatch(name, [batch() for _ in range(batches)], batch())


def test_meta_steps_lower_meta_loss():
    model, params = tiny_model("lora", dtype=torch.float32)
    cfg = MetaConfig(algorithm="fomaml", inner_optimizer="sgd", inner_lr=0.05, num_inner_steps=1, outer_lr=3e-2, meta_batch_size=2)
    learner, opt, sched, clip = outer_setup(model, params, cfg, OptimConfig(lr_scheduler="constant"))
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(12):
        metrics, _ = learner.step([shift_task("a", 1, gen), shift_task("b", 3, gen)], opt, sched, clip,
                                  diagnostics=False)
        losses.append(metrics["meta/loss"])
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2, losses


def test_bf16_base_fp32_lora_takes_small_outer_steps():
    model, params = tiny_model("lora", dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in params.values())
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if n not in params)
    before = {n: p.detach().clone() for n, p in params.items()}
    cfg = MetaConfig(algorithm="fomaml", inner_optimizer="sgd", inner_lr=1e-3, num_inner_steps=1, outer_lr=1e-4, meta_batch_size=2)
    learner, opt, sched, clip = outer_setup(model, params, cfg)
    metrics, _ = learner.step(random_tasks(), opt, sched, clip)
    assert metrics["meta/skipped_step"] == 0.0 and torch.isfinite(torch.tensor(metrics["meta/grad_norm"]))
    for n, p in params.items():
        step = (p.detach() - before[n]).abs()
        assert step.max() > 5e-5 and step.max() < 2e-4, n  # AdamW's first step is ~lr per coordinate
        # The same step applied in bf16 would mostly round away: why LoRA weights stay fp32.
        assert (p.detach().bfloat16() == before[n].bfloat16()).float().mean() > 0.5


def test_all_reduce_of_two_processes_equals_one_process():
    model, params = tiny_model("lora")
    tasks = random_tasks(4)
    single = MetaLearner(model, params, meta_cfg(tasks=4)).meta_gradient(tasks)
    single_grads = [g.clone() for g in single.grads.values()]

    local_sums = {}
    second = MetaLearner(model, params, meta_cfg(tasks=4), all_reduce=lambda flat: local_sums.update(b=flat.clone()))
    second.meta_gradient(tasks[2:])
    first = MetaLearner(model, params, meta_cfg(tasks=4), all_reduce=lambda flat: flat.add_(local_sums["b"]))
    combined = first.meta_gradient(tasks[:2])
    assert max_err(combined.grads.values(), single_grads) <= 1e-12
    assert combined.metrics.keys() == single.metrics.keys()
    for key, value in single.metrics.items():
        assert combined.metrics[key] == pytest.approx(value, rel=1e-12), key
    # The local per-task metrics of both "processes" together are the single process's.
    assert set(combined.task_metrics) == {k for k in single.task_metrics if k.startswith(("task0", "task1"))}


def test_metrics_are_consistent():
    model, params = tiny_model("lora")
    tasks = random_tasks(2)
    result = MetaLearner(model, params, meta_cfg()).meta_gradient(tasks)
    m, t = result.metrics, result.task_metrics
    assert m["meta/loss"] == pytest.approx((t["task0/query_loss"] + t["task1/query_loss"]) / 2)
    for i, task in enumerate(tasks):
        name = f"task{i}"
        assert t[f"{name}/adaptation_gap"] == pytest.approx(t[f"{name}/query_loss"] - t[f"{name}/support_loss"])
        with torch.no_grad():
            assert t[f"{name}/query_loss_pre"] == pytest.approx(causal_lm_loss_tensors(model, task.query)[0].item())
    gap = sum(t[f"task{i}/adaptation_gap"] for i in range(2)) / 2
    assert m["meta/avg_adaptation_gap"] == pytest.approx(gap)
    tokens = lambda b: int((b["labels"][:, 1:] != -100).sum())  # noqa: E731
    assert m["meta/query_tokens"] == sum(tokens(x.query) for x in tasks)
    assert m["meta/support_tokens"] == sum(tokens(x.support[k % 2]) for x in tasks for k in range(K))


def test_nonfinite_meta_gradient_skips_the_outer_step():
    model, params = tiny_model("lora")
    before = {n: p.detach().clone() for n, p in params.items()}
    learner, opt, sched, clip = outer_setup(model, params, meta_cfg())
    learner._all_reduce = lambda flat: flat[0].fill_(float("nan"))  # a process that produced NaN
    metrics, _ = learner.step(random_tasks(), opt, sched, clip)
    assert metrics["meta/skipped_step"] == 1.0 and metrics["meta/grad_norm"] != metrics["meta/grad_norm"]
    assert all(torch.equal(before[n], p) for n, p in params.items())
    assert sched.last_epoch == 0


def test_outer_step_clips_and_reports_norm_before_clipping():
    model, params = tiny_model("lora")
    optim_cfg = OptimConfig(clip_grad=1e-3, lr_scheduler="cosine", lr_warmup_steps_ratio=0.5)
    learner, opt, sched, clip = outer_setup(model, params, meta_cfg(), optim_cfg, total_steps=4)
    result = learner.meta_gradient(random_tasks())
    norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in result.grads.values()])).item()
    metrics = learner.outer_step(opt, sched, clip)
    assert metrics["meta/grad_norm"] == pytest.approx(norm) and norm > 1e-3
    assert metrics["meta/lr"] == 0.0  # first warm-up step (2 warm-up steps of 4)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * MetaConfig().outer_lr)


def test_invalid_configurations_are_rejected():
    model, params = tiny_model("lora", checkpointing=True)
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        MetaLearner(model, params, meta_cfg("maml"))
    with pytest.raises(ValueError, match="num_inner_steps"):
        MetaLearner(model, params, meta_cfg("reptile", 0))


def test_optimizer_and_schedules_follow_the_config():
    _, params = tiny_model("lora")
    cfg = OptimConfig(weight_decay=0.05, betas=(0.8, 0.95), eps=1e-6, lr_warmup_steps_ratio=0.25)
    opt = build_optimizer(params, 1e-3, cfg)
    group = opt.param_groups[0]
    assert isinstance(opt, torch.optim.AdamW) and len(group["params"]) == len(params)
    assert (group["weight_decay"], group["betas"], group["eps"]) == (0.05, (0.8, 0.95), 1e-6)
    lrs = {}
    for kind in ("cosine", "constant"):
        opt = build_optimizer(params, 1e-3, cfg)
        sched = build_scheduler(opt, cfg.model_copy(update={"lr_scheduler": kind}), total_steps=8)
        lrs[kind] = []
        for _ in range(8):
            lrs[kind].append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
    assert lrs["constant"] == pytest.approx([0, 5e-4] + [1e-3] * 6)  # 2 warm-up steps = 0.25 × 8
    assert lrs["cosine"][:3] == pytest.approx([0, 5e-4, 1e-3])
    assert all(a > b for a, b in zip(lrs["cosine"][2:], lrs["cosine"][3:]))  # decays after warm-up
    with pytest.raises(ValueError, match="requires_grad"):
        build_optimizer([torch.nn.Parameter(torch.zeros(2), requires_grad=False)], 1e-3, cfg)
