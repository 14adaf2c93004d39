"""The auxiliary losses against their formulas on hand-sized examples (docs/design.md §1.3 and §1.4)."""

from __future__ import annotations

import math
import warnings
from collections import deque

import pytest
import torch
from contrastive_reference import bounded_loss_and_gradient, contrastive_loss, expert_contrastive_loss

from moelora_lit import MoELoRAConfig, kernels, losses
from moelora_lit.losses import cv2_balance_loss, push_queue, switch_balance_loss, z_loss


def unit(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


def naive_contrastive(anchors, experts, weights, queues, tau) -> float:
    """docs/design.md §1.3 as a loop: mean over (anchor, positive) pairs of -log(exp(l_p) / sum_c exp(l_c))."""
    terms = []
    candidates = [q for queue in queues for q in queue]
    for z, expert, weight in zip(anchors, experts, weights, strict=True):
        if weight == 0:
            continue
        denominator = sum(math.exp((z[0] * c[0] + z[1] * c[1]) / tau) for c in candidates)
        for p in queues[expert]:
            positive = math.exp((z[0] * p[0] + z[1] * p[1]) / tau)
            terms.append(-math.log(positive / denominator))
    return sum(terms) / len(terms) if terms else 0.0


def queue_tensor(queues: list[list[list[float]]], size: int, junk: float = 7.0):
    """(N, Q, 2) queue holding ``queues`` with junk in the unfilled slots (they must be ignored)."""
    queue = torch.full((len(queues), size, 2), junk)
    for i, entries in enumerate(queues):
        if entries:
            queue[i, : len(entries)] = torch.tensor(entries)
    return queue, torch.tensor([len(entries) for entries in queues])


def test_contrastive_single_pair_by_hand():
    # anchor (1,0) of expert 0; queue 0 = [(1,0)], queue 1 = [(0,1)], tau = 1:
    # -log(e^1 / (e^1 + e^0)) = log(1 + e^-1)
    queue, count = queue_tensor([[[1.0, 0.0]], [[0.0, 1.0]]], size=2)
    loss = contrastive_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([0]), torch.ones(1), queue, count, 1.0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)


def test_contrastive_matches_the_definition_with_padding_and_partial_queues(cpu_path):
    queues = [[unit(0), unit(90)], [unit(180)]]                         # queue size 3, partly filled
    anchors = [unit(0), unit(53.13), unit(-90), unit(200)]
    experts = [0, 1, 0, 1]
    weights = [1.0, 1.0, 0.0, 1.0]                                      # the third anchor is padding
    tau = 0.5
    queue, count = queue_tensor(queues, size=3)
    loss = contrastive_loss(torch.tensor(anchors), torch.tensor(experts), torch.tensor(weights), queue, count, tau)
    expected = naive_contrastive(anchors, experts, weights, queues, tau)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_padding_anchors_contribute_nothing(cpu_path):
    queue, count = queue_tensor([[unit(10), unit(100)], [unit(200), unit(300)]], size=2)
    experts, weights = torch.tensor([0, 1, 1]), torch.tensor([1.0, 1.0, 0.0])
    base = contrastive_loss(torch.tensor([unit(0), unit(30), unit(60)]), experts, weights, queue, count, 0.1)
    moved = contrastive_loss(torch.tensor([unit(0), unit(30), unit(250)]), experts, weights, queue, count, 0.1)
    alone = contrastive_loss(torch.tensor([unit(0), unit(30)]), experts[:2], weights[:2], queue, count, 0.1)
    assert torch.equal(base, moved)
    assert base.item() == pytest.approx(alone.item(), rel=1e-6)
    none = contrastive_loss(torch.tensor([unit(0)]), experts[:1], torch.zeros(1), queue, count, 0.1)
    assert none.item() == 0.0


def test_contrastive_is_zero_with_finite_gradient_on_empty_queues(cpu_path):
    anchors = torch.tensor([unit(0), unit(45)], requires_grad=True)
    queue = torch.randn(2, 3, 2)                                        # junk, but nothing is filled
    loss = contrastive_loss(anchors, torch.tensor([0, 1]), torch.ones(2), queue, torch.zeros(2, dtype=torch.long), 0.07)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(anchors.grad).all() and not anchors.grad.any()


def test_anchor_of_an_empty_expert_queue_has_no_pairs_and_finite_gradient(cpu_path):
    queue, count = queue_tensor([[unit(0)], []], size=2)                # expert 1 has no entries yet
    anchors = torch.tensor([unit(20), unit(70)], requires_grad=True)
    loss = contrastive_loss(anchors, torch.tensor([0, 1]), torch.ones(2), queue, count, 0.5)
    expected = naive_contrastive([unit(20), unit(70)], [0, 1], [1.0, 1.0], [[unit(0)], []], 0.5)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    assert torch.isfinite(anchors.grad).all()


def differentiable_reference(anchors, experts, weights, queue, count, tau):
    """docs/design.md §1.3 with torch ops per (anchor, positive) pair, so autograd gives the reference gradient."""
    candidates = torch.cat([queue[i, : count[i]] for i in range(queue.shape[0])])
    terms = []
    for a in range(anchors.shape[0]):
        if weights[a] == 0:
            continue
        log_norm = torch.logsumexp(candidates @ anchors[a] / tau, 0)
        for p in queue[experts[a], : count[experts[a]]]:
            terms.append(log_norm - p @ anchors[a] / tau)
    return torch.stack(terms).mean()


@pytest.fixture(params=["compiled kernel", "fused CPU kernel", "matmul and softmax"])
def cpu_path(request, monkeypatch) -> str:
    """Every way the loss is computed in float32 on CPU: the Inductor-compiled loop (the default), PyTorch's fused
    attention kernel (its fallback) and plain matmul + softmax (where torch lacks that op). Returns the
    ``contrastive_kernel`` setting to pass."""
    if request.param == "fused CPU kernel":
        assert kernels._CPU_FLASH is not None, "torch lacks the fused CPU attention op"
    elif request.param == "matmul and softmax":
        monkeypatch.setattr(kernels, "_CPU_FLASH", None)                # simulates a torch without the op
    return "compiled" if request.param == "compiled kernel" else "attention"


def random_case(seed: int = 3, anchors: int = 40, experts: int = 4, size: int = 16, dim: int = 4):
    generator = torch.Generator().manual_seed(seed)
    queue = torch.nn.functional.normalize(torch.randn(experts, size, dim, generator=generator), dim=-1)
    count = torch.randint(0, size + 1, (experts,), generator=generator)
    count[0] = size
    chosen = torch.randint(0, experts, (anchors,), generator=generator)
    weights = (torch.rand(anchors, generator=generator) > 0.2).float()
    z = torch.nn.functional.normalize(torch.randn(anchors, dim, generator=generator), dim=-1)
    return z, chosen, weights, queue, count


@pytest.mark.parametrize("dim", [2, 4, 8])
def test_compiled_kernel_is_used_and_agrees_with_the_attention_kernel(dim, monkeypatch):
    z, chosen, weights, queue, count = random_case(dim=dim)
    compiled = kernels.CompiledKernels()                                # a fresh process state
    calls = []
    original = compiled.run
    monkeypatch.setattr(compiled, "run", lambda function, *args, **kw: calls.append(1) or original(function, *args))
    monkeypatch.setattr(kernels, "COMPILED", compiled)
    results = {}
    for kernel in ("compiled", "attention"):
        ours = z.clone().requires_grad_()
        loss = contrastive_loss(ours, chosen, weights, queue, count, 0.07, kernel=kernel)
        loss.backward()
        results[kernel] = (loss.detach(), ours.grad)
    assert len(calls) == 1 and not compiled.failed                      # only the compiled run went through it
    torch.testing.assert_close(results["compiled"], results["attention"], atol=1e-5, rtol=1e-5)


def test_the_kernel_setting_and_its_environment_override(monkeypatch):
    """``auto`` compiles unless MOELORA_COMPILE_CONTRASTIVE=0 (read at every call); ``compiled`` and ``attention``
    ignore the variable; only float32 CPU tensors compile; a bad setting is refused naming the field."""
    compiled, cpu = kernels.CompiledKernels(), torch.zeros(2)
    for value, auto in ((None, True), ("0", False), ("1", True)):
        if value is None:
            monkeypatch.delenv(kernels.ENVIRONMENT_OVERRIDE, raising=False)
        else:
            monkeypatch.setenv(kernels.ENVIRONMENT_OVERRIDE, value)
        assert compiled.applies("auto", bounded_loss_and_gradient, cpu) is auto
        assert compiled.applies("compiled", bounded_loss_and_gradient, cpu)
        assert not compiled.applies("attention", bounded_loss_and_gradient, cpu)
    assert not compiled.applies("compiled", bounded_loss_and_gradient, cpu.double())
    compiled.forked = True
    assert not compiled.applies("compiled", bounded_loss_and_gradient, cpu)
    with pytest.raises(ValueError, match="contrastive_kernel='fast'.*auto, compiled, attention"):
        MoELoRAConfig(contrastive_kernel="fast")


def test_a_failed_compile_warns_once_and_falls_back_to_the_attention_kernel(monkeypatch):
    def broken(*args):
        raise RuntimeError("no C++ compiler")
    compiled = kernels.CompiledKernels()
    monkeypatch.setattr(kernels, "COMPILED", compiled)
    monkeypatch.setattr(torch, "compile", lambda function, **kwargs: broken)
    queue, count = queue_tensor([[unit(10), unit(100)], [unit(200)]], size=2)
    anchors, experts = torch.tensor([unit(0), unit(30)]), torch.tensor([0, 1])
    expected = naive_contrastive([unit(0), unit(30)], [0, 1], [1.0, 1.0], [[unit(10), unit(100)], [unit(200)]], 0.1)
    with pytest.warns(RuntimeWarning, match="MOELORA_COMPILE_CONTRASTIVE=0"):
        first = contrastive_loss(anchors, experts, torch.ones(2), queue, count, 0.1, kernel="compiled")
    assert first.item() == pytest.approx(expected, rel=1e-5)
    assert compiled.failed == {bounded_loss_and_gradient}               # that kernel only
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                  # no second warning
        again = contrastive_loss(anchors, experts, torch.ones(2), queue, count, 0.1, kernel="compiled")
        assert again.item() == first.item()


def test_low_temperature_stays_exact_past_the_compiled_kernels_range(cpu_path):
    # tau 0.01: logits up to 100, beyond the compiled kernel's bounded shift; the attention kernel takes over.
    queue, count = queue_tensor([[unit(0), unit(170)], [unit(90)]], size=2)
    anchors = torch.tensor([unit(175), unit(95)])
    loss = contrastive_loss(anchors, torch.tensor([0, 1]), torch.ones(2), queue, count, 0.01, kernel=cpu_path)
    expected = naive_contrastive([unit(175), unit(95)], [0, 1], [1.0, 1.0], [[unit(0), unit(170)], [unit(90)]], 0.01)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_contrastive_gradient_matches_autograd_of_the_definition(dtype, cpu_path):
    generator = torch.Generator().manual_seed(0)
    queue = torch.nn.functional.normalize(torch.randn(3, 4, 5, generator=generator, dtype=dtype), dim=-1)
    count = torch.tensor([4, 2, 0])
    experts = torch.tensor([0, 1, 2, 1, 0, 2])
    weights = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 1.0], dtype=dtype)
    raw = torch.randn(6, 5, generator=generator, dtype=dtype)
    ours = torch.nn.functional.normalize(raw, dim=-1).requires_grad_()
    ref = ours.detach().clone().requires_grad_()
    loss = contrastive_loss(ours, experts, weights, queue, count, 0.3, kernel=cpu_path)
    expected = differentiable_reference(ref, experts, weights, queue, count, 0.3)
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(loss, expected, **tolerance)
    (2.5 * loss).backward()                                             # upstream gradient is not 1
    (2.5 * expected).backward()
    torch.testing.assert_close(ours.grad, ref.grad, **tolerance)
    assert not ours.grad[3].any()                                       # padding anchor: no gradient
    with torch.no_grad():
        torch.testing.assert_close(contrastive_loss(ours, experts, weights, queue, count, 0.3, kernel=cpu_path),
                                   loss.detach())


@pytest.mark.parametrize("subset", [False, True])
def test_expert_contrastive_loss_matches_autograd_through_normalize_and_gather(subset, cpu_path):
    """The fused layer-level loss: value, gradient with respect to the raw projections and the returned anchors."""
    generator = torch.Generator().manual_seed(5)
    tokens, experts, top_k, dim = 7, 4, 2, 4
    queue = torch.nn.functional.normalize(torch.randn(experts, 6, dim, generator=generator), dim=-1)
    count = torch.tensor([6, 3, 0, 6])
    raw = torch.randn(tokens, experts, dim, generator=generator)
    raw[2, :] = 0.0                                                     # zero projections: normalize's eps branch
    chosen = torch.stack([torch.randperm(experts, generator=generator)[:top_k] for _ in range(tokens)])
    keep = (torch.rand(tokens, top_k, generator=generator) > 0.25).float()
    scored = torch.tensor([0, 3, 4, 9, 12, 13]) if subset else None
    ours = raw.clone().requires_grad_()
    loss, anchors = expert_contrastive_loss(ours, chosen, keep, queue, count, 0.2, scored, kernel=cpu_path)
    ref = raw.clone().requires_grad_()
    z = torch.nn.functional.normalize(ref, dim=-1).gather(1, chosen[..., None].expand(-1, -1, dim)).reshape(-1, dim)
    pick = torch.arange(tokens * top_k) if scored is None else scored
    expected = differentiable_reference(z[pick], chosen.reshape(-1)[pick], keep.reshape(-1)[pick], queue, count, 0.2)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(anchors, z.detach(), atol=1e-6, rtol=1e-6)   # every anchor, scored or not
    assert not anchors.requires_grad
    (3.0 * loss).backward()
    (3.0 * expected).backward()
    torch.testing.assert_close(ours.grad, ref.grad, atol=1e-5, rtol=1e-5)


def test_contrastive_gradcheck():
    generator = torch.Generator().manual_seed(1)
    queue = torch.randn(2, 3, 4, generator=generator, dtype=torch.float64)
    anchors = torch.randn(5, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    experts, weights, count = torch.tensor([0, 1, 1, 0, 1]), torch.ones(5, dtype=torch.float64), torch.tensor([3, 1])
    assert torch.autograd.gradcheck(lambda a: contrastive_loss(a, experts, weights, queue, count, 0.5), (anchors,))


def test_push_queue_keeps_newest_entries_per_expert_like_a_fifo():
    num_experts, size = 3, 3
    queue = torch.zeros(num_experts, size, 1)
    ptr = torch.zeros(num_experts, dtype=torch.long)
    count = torch.zeros(num_experts, dtype=torch.long)
    reference = [deque(maxlen=size) for _ in range(num_experts)]
    generator = torch.Generator().manual_seed(0)
    next_id = 1.0
    for batch in (2, 7, 1, 5, 4):                                       # some batches overflow the queue
        experts = torch.randint(num_experts, (batch,), generator=generator)
        weights = (torch.rand(batch, generator=generator) > 0.25).float()
        ids = torch.arange(next_id, next_id + batch)[:, None]
        next_id += batch
        queue, ptr, count = push_queue(queue, ptr, count, ids, experts, weights)
        for entry, expert, weight in zip(ids[:, 0].tolist(), experts.tolist(), weights.tolist(), strict=True):
            if weight > 0:
                reference[expert].append(entry)
        for expert in range(num_experts):
            filled = queue[expert, : count[expert], 0].tolist()
            assert sorted(filled) == sorted(reference[expert]), f"expert {expert}"
            assert count[expert].item() == len(reference[expert])
            if reference[expert]:                                       # the slot before ptr is the newest
                newest = queue[expert, (ptr[expert] - 1) % size, 0].item()
                assert newest == reference[expert][-1]


def test_push_queue_overflow_in_one_step_and_ring_order():
    queue = torch.zeros(2, 3, 1)
    ptr, count = torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long)
    ids = torch.arange(1.0, 7.0)[:, None]                               # five for expert 0, one for expert 1
    queue, ptr, count = push_queue(queue, ptr, count, ids, torch.tensor([0, 0, 0, 1, 0, 0]), torch.ones(6))
    assert sorted(queue[0, :, 0].tolist()) == [3.0, 5.0, 6.0]
    assert queue[1, 0, 0].item() == 4.0 and count.tolist() == [3, 1]
    queue, ptr, count = push_queue(queue, ptr, count, torch.tensor([[7.0]]), torch.tensor([0]), torch.ones(1))
    assert sorted(queue[0, :, 0].tolist()) == [5.0, 6.0, 7.0]          # the oldest (3) went out


def test_push_queue_skips_invalid_entries_and_does_not_write_in_place():
    queue = torch.zeros(2, 2, 1)
    ptr, count = torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long)
    new_queue, new_ptr, new_count = push_queue(
        queue, ptr, count, torch.tensor([[5.0], [6.0]]), torch.tensor([0, 1]), torch.tensor([0.0, 1.0])
    )
    assert new_count.tolist() == [0, 1] and new_ptr.tolist() == [0, 1]
    assert new_queue[0].abs().sum().item() == 0.0 and new_queue[1, 0, 0].item() == 6.0
    assert not queue.any() and not count.any()                         # the old queue is still intact


def test_cv2_balance_by_hand():
    gates = torch.tensor([[1.0, 0.0], [0.5, 0.5], [1.0, 0.0]])
    # importance = (2.5, 0.5): mean 1.5, unbiased variance 2.0
    assert cv2_balance_loss(gates, torch.ones(3)).item() == pytest.approx(2.0 / (1.5**2 + 1e-10), rel=1e-6)
    # the third token is padding: importance = (1.5, 0.5): mean 1, unbiased variance 0.5
    assert cv2_balance_loss(gates, torch.tensor([1.0, 1.0, 0.0])).item() == pytest.approx(0.5, rel=1e-6)
    assert cv2_balance_loss(torch.tensor([[0.5, 0.5], [0.5, 0.5]]), torch.ones(2)).item() == 0.0


def test_cv2_is_zero_for_a_single_expert():
    assert cv2_balance_loss(torch.ones(5, 1), torch.ones(5)).item() == 0.0


def test_switch_balance_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5], [0.3, 0.2, 0.1], [-1.0, 0.0, 3.0]])
    gates = torch.zeros(4, 3)
    top2 = logits.topk(2, dim=-1).indices
    gates.scatter_(1, top2, 0.5)
    weight = [1.0, 1.0, 1.0, 0.0]                                       # the last token is padding
    rows = [i for i, w in enumerate(weight) if w]
    f = [sum(gates[t, i].item() > 0 for t in rows) / (2 * len(rows)) for i in range(3)]
    probs = [[math.exp(v) / sum(math.exp(u) for u in logits[t].tolist()) for v in logits[t].tolist()] for t in rows]
    p = [sum(row[i] for row in probs) / len(rows) for i in range(3)]
    expected = 3 * sum(fi * pi for fi, pi in zip(f, p, strict=True))
    got = switch_balance_loss(gates, logits, torch.tensor(weight))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    subset = switch_balance_loss(gates[:3], logits[:3], torch.ones(3))
    assert got.item() == pytest.approx(subset.item(), rel=1e-6)


def test_switch_balance_is_one_when_uniform():
    gates = torch.eye(4)                                               # every expert gets one token
    assert switch_balance_loss(gates, torch.zeros(4, 4), torch.ones(4)).item() == pytest.approx(1.0)


def test_z_loss_by_hand_and_masked():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0], [5.0, -5.0]])
    lse = [math.log(sum(math.exp(v) for v in row)) for row in logits.tolist()]
    assert z_loss(logits, torch.ones(3)).item() == pytest.approx(sum(v * v for v in lse) / 3, rel=1e-6)
    masked = z_loss(logits, torch.tensor([1.0, 0.0, 1.0])).item()
    assert masked == pytest.approx((lse[0] ** 2 + lse[2] ** 2) / 2, rel=1e-6)


def test_masked_tokens_are_ignored_by_every_balance_loss():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=generator)
    gates = logits.softmax(-1)
    weight = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    real = weight.bool()
    garbage_logits = logits.clone()
    garbage_logits[~real] = 100.0
    garbage_gates = garbage_logits.softmax(-1)
    for full, subset in [
        (cv2_balance_loss(garbage_gates, weight), cv2_balance_loss(gates[real], torch.ones(4))),
        (switch_balance_loss(garbage_gates, garbage_logits, weight),
         switch_balance_loss(gates[real], logits[real], torch.ones(4))),
        (z_loss(garbage_logits, weight), z_loss(logits[real], torch.ones(4))),
    ]:
        assert full.item() == pytest.approx(subset.item(), rel=1e-6)


def test_push_queue_with_a_layer_dimension_equals_pushing_each_layer():
    generator = torch.Generator().manual_seed(3)
    layers, num_experts, size, dim, anchors = 3, 4, 5, 2, 9
    queue = torch.randn(layers, num_experts, size, dim, generator=generator)
    ptr = torch.randint(size, (layers, num_experts), generator=generator)
    count = torch.randint(size + 1, (layers, num_experts), generator=generator)
    entries = torch.randn(layers * anchors, dim, generator=generator)
    experts = torch.randint(num_experts, (layers * anchors,), generator=generator)
    weights = (torch.rand(layers * anchors, generator=generator) > 0.3).float()
    together = push_queue(queue, ptr, count, entries, experts, weights)
    for layer in range(layers):
        part = slice(layer * anchors, (layer + 1) * anchors)
        alone = push_queue(queue[layer], ptr[layer], count[layer], entries[part], experts[part], weights[part])
        for got, expected in zip(together, alone, strict=True):
            assert torch.equal(got[layer], expected)


def test_several_layers_losses_are_one_node_with_each_layers_value_and_gradient(cpu_path):
    generator = torch.Generator().manual_seed(8)
    terms, raws = [], []
    for tokens in (5, 9):                                               # layers may differ in shape
        queue = torch.nn.functional.normalize(torch.randn(3, 4, 2, generator=generator), dim=-1)
        raw = torch.randn(tokens, 3, 2, generator=generator)
        chosen = torch.stack([torch.randperm(3, generator=generator)[:2] for _ in range(tokens)])
        raws.append(raw)
        terms.append((raw.clone().requires_grad_(), chosen, torch.ones(tokens, 2), queue, torch.tensor([4, 1, 3]),
                      0.3, None))
    results = losses.expert_contrastive_losses(terms, cpu_path)
    assert results[0][0].grad_fn is results[1][0].grad_fn                # one autograd node for both layers
    (2.0 * results[0][0] - results[1][0]).backward()
    for (projections, *rest), (loss, anchors), raw, scale in zip(terms, results, raws, (2.0, -1.0), strict=True):
        alone = raw.clone().requires_grad_()
        expected, expected_anchors = expert_contrastive_loss(alone, *rest, kernel=cpu_path)
        (scale * expected).backward()
        assert torch.equal(loss.detach(), expected.detach()) and torch.equal(anchors, expected_anchors)
        torch.testing.assert_close(projections.grad, alone.grad, atol=0, rtol=0)


def test_balance_and_z_losses_with_a_layer_dimension_equal_each_layers():
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 10, 4, generator=generator)
    kept, chosen = logits.topk(2, dim=-1)
    gates = torch.zeros_like(logits).scatter(-1, chosen, kept.softmax(-1))
    weight = (torch.rand(3, 10, generator=generator) > 0.2).float()
    together = (cv2_balance_loss(gates, weight), switch_balance_loss(gates, logits, weight), z_loss(logits, weight))
    for layer in range(3):
        alone = (cv2_balance_loss(gates[layer], weight[layer]),
                 switch_balance_loss(gates[layer], logits[layer], weight[layer]), z_loss(logits[layer], weight[layer]))
        for got, expected in zip(together, alone, strict=True):
            assert got.shape == (3,) and expected.shape == ()
            torch.testing.assert_close(got[layer], expected, rtol=1e-6, atol=0)
