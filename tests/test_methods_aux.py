"""The family's auxiliary terms against their formulas: LoRAMoE's localized constraint, MixLoRA's switch term, FlyLoRA's
bias update after backward (once per step, real tokens only, identical on every rank)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import token_batch
from family import build, capture_inputs, fly_layers, layers_of

from moelora_lit import collect_aux_losses, set_token_mask
from moelora_lit.adapters import adapters_of
from moelora_lit.ffn_block import MixLoRAFFN
from moelora_lit.training_step import after_backward


# --------------------------------------------------------------------------------------------- aux terms
def test_loramoe_localized_constraint_matches_its_formula_with_padding_masked():
    model = build("loramoe", dtype=torch.float64).train()
    batch = token_batch(batch=3, seq=8, pad=3)
    groups = torch.tensor([1, 0, -1])                      # label 1: first N/2 experts; 0: last N/2; -1: none
    set_token_mask(model, batch["attention_mask"])
    adapters_of(model).set_task_groups(groups)
    inputs, handles = capture_inputs(model)
    model(**batch)
    for h in handles:
        h.remove()
    config = adapters_of(model).config
    delta, n = config.localized_delta, 4
    real = batch["attention_mask"].to(torch.float64)                       # (B, S)
    weight = torch.tensor([[1 + delta] * 2 + [1 - delta] * 2, [1 - delta] * 2 + [1 + delta] * 2, [1 - delta] * 4],
                          dtype=torch.float64)
    total = 0.0
    for name, layer in layers_of(model):
        p = (inputs[name] @ layer.router.weight.T).softmax(-1).view(3, 8, n)
        q = (p * real[..., None]).sum(1)                                    # (B, N), padding masked
        v = (q * weight).flatten()
        expected = v.var(unbiased=True) / (v.mean() ** 2 + 1e-10)
        got = layer.aux_losses["balance"]
        torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-5, msg=name)
        unmasked = (p.sum(1) * weight).flatten()
        assert abs(float(unmasked.var() / unmasked.mean() ** 2) - float(expected)) > 1e-6   # padding matters
        total = total + expected
    aux = collect_aux_losses(model)
    torch.testing.assert_close(aux["balance"].double(), config.balance_weight * total, atol=1e-6, rtol=1e-5)
    assert aux["balance"].requires_grad


def test_loramoe_localized_constraint_needs_task_groups():
    model = build("loramoe").train()
    with pytest.raises(ValueError, match="task_group"):
        model(**token_batch())


def test_mixlora_switch_term_counts_tokens_summing_to_k_with_padding_masked():
    model = build("mixlora", dtype=torch.float64).train()
    batch = token_batch(batch=3, seq=8, pad=3)
    set_token_mask(model, batch["attention_mask"])
    inputs, handles = capture_inputs(model)
    model(**batch)
    for h in handles:
        h.remove()
    config = adapters_of(model).config
    real = batch["attention_mask"].reshape(-1).to(torch.float64)
    total, blocks = 0.0, 0
    for name, layer in layers_of(model):
        if not isinstance(layer, MixLoRAFFN):
            assert "balance" not in layer.aux_losses                     # attention: plain LoRA, no term
            continue
        p = (inputs[name] @ layer.router.weight.T).softmax(-1)             # (T, N)
        chosen = F.one_hot(p.topk(config.top_k).indices, layer.num_experts).sum(1).to(p.dtype)   # (T, N)
        f = (chosen * real[:, None]).sum(0) / real.sum()
        big_p = (p * real[:, None]).sum(0) / real.sum()
        torch.testing.assert_close(f.sum(), torch.tensor(float(config.top_k), dtype=torch.float64))
        expected = layer.num_experts * (f * big_p).sum()
        torch.testing.assert_close(layer.aux_losses["balance"].double(), expected, atol=1e-7, rtol=1e-6, msg=name)
        total, blocks = total + expected, blocks + 1
    assert blocks == 2
    torch.testing.assert_close(collect_aux_losses(model)["balance"].double(), config.balance_weight * total,
                               atol=1e-7, rtol=1e-6)




def _fly_step(model, batch, checkpointing: bool = False):
    set_token_mask(model, batch["attention_mask"])
    inputs, handles = capture_inputs(model)
    model(**batch).loss.backward()
    for h in handles:
        h.remove()
    return inputs


def _fly_expected(model, inputs, before, mask):
    """d + u * sign(mean(c) - c), c the choices of top-k(A x + d) per rank over real tokens."""
    config = adapters_of(model).config
    real = mask.reshape(-1).bool()
    out = {}
    for name, layer in fly_layers(model):
        ax = inputs[name] @ layer.lora_A.weight.T
        chosen = (ax + before[name]).topk(config.top_k).indices[real]
        counts = torch.bincount(chosen.flatten(), minlength=config.r).float()
        assert counts.sum() == real.sum() * config.top_k                   # padding excluded
        out[name] = before[name] + config.bias_update_rate * torch.sign(counts.mean() - counts)
    return out


def test_flylora_bias_update_after_backward_once_per_step_real_tokens_only():
    model = build("flylora").train()
    batch = token_batch(batch=2, seq=8, pad=3)
    before = {n: layer.rank_bias.clone() for n, layer in fly_layers(model)}
    inputs = _fly_step(model, batch)
    for name, layer in fly_layers(model):                                 # nothing moves before the step's end
        assert torch.equal(layer.rank_bias, before[name])
    after_backward(model)
    expected = _fly_expected(model, inputs, before, batch["attention_mask"])
    moved = 0
    for name, layer in fly_layers(model):
        torch.testing.assert_close(layer.rank_bias, expected[name], atol=1e-7, rtol=0, msg=name)
        moved += int((layer.rank_bias != before[name]).sum())
    assert moved > 0
    updated = {n: layer.rank_bias.clone() for n, layer in fly_layers(model)}
    after_backward(model)                                                  # a second call: nothing left to apply
    with torch.no_grad():                                                  # no-grad training forward
        model(**batch)
    after_backward(model)
    model.eval()
    model(**batch).loss.backward()                                         # eval forward, even with a backward
    after_backward(model)
    for name, layer in fly_layers(model):
        assert torch.equal(layer.rank_bias, updated[name]), name


def test_flylora_bias_update_left_pending_is_applied_by_the_next_training_forward():
    model = build("flylora").train()
    batch = token_batch(pad=2)
    before = {n: layer.rank_bias.clone() for n, layer in fly_layers(model)}
    inputs = _fly_step(model, batch)
    expected = _fly_expected(model, inputs, before, batch["attention_mask"])
    model(**token_batch(seed=1))                                          # no after_backward in between
    for name, layer in fly_layers(model):
        torch.testing.assert_close(layer.rank_bias, expected[name], atol=1e-7, rtol=0, msg=name)


def test_flylora_bias_update_is_not_repeated_by_a_checkpoint_recomputed_forward():
    plain, ckpt = build("flylora").train(), build("flylora").train()
    ckpt.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    before = {n: layer.rank_bias.clone() for n, layer in fly_layers(plain)}
    batch = token_batch(batch=2, seq=8, pad=3)
    inputs = _fly_step(plain, batch)
    calls = []
    handle = fly_layers(ckpt)[0][1].register_forward_hook(lambda *args: calls.append(1))
    _fly_step(ckpt, batch)
    handle.remove()
    assert len(calls) == 2                                                 # the forward ran again inside backward
    for model in (plain, ckpt):
        after_backward(model)
    expected = _fly_expected(plain, inputs, before, batch["attention_mask"])
    for (name, a), (_, b) in zip(fly_layers(plain), fly_layers(ckpt), strict=True):
        assert torch.equal(a.rank_bias, b.rank_bias), name
        torch.testing.assert_close(b.rank_bias, expected[name], atol=1e-7, rtol=0, msg=name)
    for (name, a), (_, b) in zip(fly_layers(plain), fly_layers(ckpt), strict=True):
        torch.testing.assert_close(b.lora_B.weight.grad, a.lora_B.weight.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_flylora_refuses_reentrant_checkpointing_which_would_silently_freeze_its_bias():
    from moelora_lit.training_step import step_loss

    model = build("flylora").train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    out = model(**token_batch())                       # reentrant: the first forward runs without autograd
    with pytest.raises(ValueError, match="use_reentrant.*rank-bias|rank-bias.*use_reentrant"):
        step_loss(model, out.loss)


def test_flylora_bias_is_identical_on_every_rank_and_follows_the_summed_counts():
    ranks = [build("flylora").train(), build("flylora").train()]
    batches = [token_batch(batch=2, seq=8, seed=0, pad=3), token_batch(batch=2, seq=8, seed=1, pad=1)]
    before = {n: layer.rank_bias.clone() for n, layer in fly_layers(ranks[0])}
    for model, batch in zip(ranks, batches, strict=True):
        _fly_step(model, batch)
    local = [torch.stack([layer.bias_counts.float() for _, layer in fly_layers(m)]) for m in ranks]   # (L, r)
    assert not torch.equal(local[0], local[1])

    def fake_all_gather(rank: int):
        def gather(tensor: torch.Tensor) -> torch.Tensor:
            assert torch.equal(tensor, local[rank])
            return torch.stack(local)
        return gather

    for rank, model in enumerate(ranks):
        after_backward(model, all_gather=fake_all_gather(rank))
    summed = local[0] + local[1]
    u = adapters_of(ranks[0]).config.bias_update_rate
    differs_from_local = False
    for i, ((name, a), (_, b)) in enumerate(zip(fly_layers(ranks[0]), fly_layers(ranks[1]), strict=True)):
        assert torch.equal(a.rank_bias, b.rank_bias), name
        expected = before[name] + u * torch.sign(summed[i].mean() - summed[i])
        torch.testing.assert_close(a.rank_bias, expected, atol=1e-7, rtol=0, msg=name)
        own = before[name] + u * torch.sign(local[0][i].mean() - local[0][i])
        differs_from_local |= not torch.allclose(own, expected)
    assert differs_from_local
