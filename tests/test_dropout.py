"""The adapters' CPU dropout (moelora_lit/dropout.py) against nn.Dropout's semantics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moelora_lit import MoELoRAConfig
from moelora_lit.dropout import (
    RESOLUTION,
    SPARSE_BELOW,
    LoRADropout,
    draw_drop,
    drop_positions,
    keep_mask,
    keep_threshold,
)
from moelora_lit.dropped_projection import dropped_projection
from moelora_lit.layer import MoELoRALinear


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_drop_rate_is_p_in_every_lane(p):
    """Each of the four 15-bit lanes cut from one 64-bit draw drops at rate p (a lane with a missing bit would
    drop at 2p or 0); bounds are 5 standard errors of 250,000 Bernoulli draws."""
    torch.manual_seed(0)
    scaled = keep_mask(torch.Size([4 * 250_000]), p, torch.float32, torch.device("cpu"))
    scale = RESOLUTION / (RESOLUTION - keep_threshold(p))
    assert set(scaled.unique().tolist()) == {0.0, torch.tensor(scale, dtype=torch.float32).item()}
    per_lane = 1 - (scaled > 0).view(-1, 4).float().mean(0)               # drop rate of each lane
    bound = 5 * math.sqrt(p * (1 - p) / 250_000)
    assert (per_lane - p).abs().max().item() < bound, per_lane
    assert scale * (1 - keep_threshold(p) / RESOLUTION) == pytest.approx(1.0, abs=1e-12)   # unbiased
    assert abs(keep_threshold(p) / RESOLUTION - p) <= 0.5 / RESOLUTION


def test_masks_are_not_correlated_across_positions():
    """Neighbouring elements (same 64-bit draw) are independent: P(both dropped) = p^2 within 5 standard errors."""
    torch.manual_seed(1)
    p = 0.3
    dropped = (keep_mask(torch.Size([1_000_000]), p, torch.float32, torch.device("cpu")) == 0).view(-1, 2)
    both = (dropped[:, 0] & dropped[:, 1]).float().mean().item()
    assert abs(both - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / 500_000)


@pytest.mark.parametrize("p", [0.05, 0.1])
@pytest.mark.parametrize("batch", [None, 7])
def test_sparse_positions_are_a_bernoulli_sequence(p, batch):
    """Below SPARSE_BELOW the mask is the dropped positions, from geometric gaps: sorted, distinct, in range, rate p
    and independent neighbours (P(both dropped) = p^2), within 5 standard errors of 1,000,000 draws; ``batch=7``
    forces thousands of continuation draws, which must not change the distribution."""
    assert p < SPARSE_BELOW
    torch.manual_seed(6)
    n = 1_000_000
    positions = drop_positions(n, p, batch=batch)
    assert positions.dtype == torch.int64 and (positions[1:] > positions[:-1]).all()
    assert positions.min() >= 0 and positions.max() < n
    assert abs(len(positions) / n - p) < 5 * math.sqrt(p * (1 - p) / n)
    dropped = torch.zeros(n, dtype=torch.bool)
    dropped[positions] = True
    pairs = dropped.view(-1, 2)
    both = (pairs[:, 0] & pairs[:, 1]).float().mean().item()
    assert abs(both - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / (n // 2))
    gaps = positions.diff().float()                                     # geometric: mean 1/p, variance (1-p)/p^2
    assert abs(gaps.mean().item() - 1 / p) < 5 * math.sqrt((1 - p) / p**2 / len(gaps))
    assert abs(gaps.var().item() / ((1 - p) / p**2) - 1) < 0.05


@pytest.mark.parametrize("p", [0.05, 0.2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_forward_and_backward_use_one_mask(dtype, p):
    """Both forms of the draw (positions below SPARSE_BELOW, the dense mask above) drop the same elements of the
    input and of its gradient, and scale the kept ones by ``1 / keep rate``."""
    torch.manual_seed(2)
    layer = LoRADropout(p)
    x = (torch.rand(64, 96, dtype=dtype) + 1).requires_grad_()           # no zeros: every drop is visible
    out = layer(x)
    assert out.dtype == dtype
    kept = out != 0
    assert 0 < (~kept).sum() < x.numel()
    scale = 1 / (1 - p) if p < SPARSE_BELOW else RESOLUTION / (RESOLUTION - keep_threshold(p))
    torch.testing.assert_close(out[kept], (x * scale).to(dtype)[kept])
    grad = torch.randn_like(x)
    out.backward(grad)
    expected = torch.where(kept, grad * torch.tensor(scale, dtype=dtype), torch.zeros_like(grad))
    torch.testing.assert_close(x.grad, expected)


@pytest.mark.parametrize("p", [0.05, 0.3])
@pytest.mark.parametrize("router", [True, False])
@pytest.mark.parametrize("train_a", [True, False])
def test_dropped_projection_equals_dropout_then_linear(p, router, train_a):
    """The fused dropout + A + router function gives the values and the gradients (x, A, router) of
    ``F.linear(dropout(x), A), F.linear(x, R)`` with the same draw (float64), with or without a router and with a
    frozen A (FlyLoRA)."""
    torch.manual_seed(8)
    x = torch.randn(40, 24, dtype=torch.float64, requires_grad=True)
    a_weight = torch.randn(12, 24, dtype=torch.float64, requires_grad=train_a)
    r_weight = torch.randn(4, 24, dtype=torch.float64, requires_grad=True) if router else None
    g_a, g_logits = torch.randn(40, 12, dtype=torch.float64), torch.randn(40, 4, dtype=torch.float64)

    def run(fn):
        torch.manual_seed(9)
        a, logits = fn()
        loss = (a * g_a).sum() + ((logits * g_logits).sum() if router else 0)
        grads = torch.autograd.grad(loss, [t for t in (x, a_weight, r_weight) if t is not None and t.requires_grad])
        return (a, logits, *grads)

    fused = run(lambda: dropped_projection(x, a_weight, r_weight, p))
    reference = run(lambda: (F.linear(LoRADropout(p)(x), a_weight),
                             F.linear(x, r_weight) if router else None))
    assert not torch.allclose(fused[0], F.linear(x, a_weight))          # the draw dropped some inputs
    for got, want in zip(fused, reference, strict=True):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want)


def test_draw_drop_picks_its_form_by_p():
    positions, scale = draw_drop(torch.Size([10, 10]), 0.05, torch.float32, torch.device("cpu"))
    assert positions.dtype == torch.int64 and scale == pytest.approx(1 / 0.95)
    mask, scale = draw_drop(torch.Size([10, 10]), 0.5, torch.float32, torch.device("cpu"))
    assert mask.shape == (10, 10) and mask.dtype == torch.float32 and scale == pytest.approx(2.0)


def test_eval_mode_and_p_zero_are_identity_and_seeds_reproduce():
    x = torch.randn(8, 16)
    layer = LoRADropout(0.5).eval()
    assert layer(x) is x
    assert LoRADropout(0.0).train()(x) is x
    layer.train()
    torch.manual_seed(3)
    first = layer(x)
    torch.manual_seed(3)
    assert torch.equal(first, layer(x))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        LoRADropout(1.0)


def test_adapter_layer_uses_it_and_matches_a_reference_forward():
    """The layer's training forward equals its eval forward with the same mask applied by hand: the mask only
    touches the adapter input, never the frozen base."""
    torch.manual_seed(4)
    base = nn.Linear(32, 24)
    config = MoELoRAConfig(r=8, num_experts=4, top_k=2, lora_dropout=0.25, target_modules=["x"],
                           contrastive_weight=0.0, balance_weight=0.0)
    layer = MoELoRALinear(base, config)
    nn.init.normal_(layer.lora_B.weight)
    assert isinstance(layer.lora_dropout, LoRADropout)
    x = torch.randn(10, 32)
    torch.manual_seed(5)
    trained = layer.train()(x)
    torch.manual_seed(5)
    dropped = x * keep_mask(x.shape, 0.25, x.dtype, x.device)
    layer.eval()
    a = layer.lora_A(dropped)
    gates = torch.softmax(layer.router(x).topk(2, -1).values, -1)
    full = torch.zeros(10, 4).scatter(-1, layer.router(x).topk(2, -1).indices, gates)
    mixed = (a.view(10, 4, 2) * full[..., None] * layer.scaling).reshape(10, -1)
    torch.testing.assert_close(trained, base(x) + layer.lora_B(mixed))


@pytest.mark.parametrize("method", ["moelora", "mola", "flylora", "mixlora"])
def test_training_step_under_cpu_autocast_with_dropout(method):
    """Under bf16 autocast on CPU (``precision: bf16-mixed``) the fused CPU functions step aside, so autograd's
    casts apply: the backward runs, the adapters' gradients are float32 and finite, and the routers and B get some."""
    from family import build

    model = build(method, lora_dropout=0.1).train()
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all()
                         for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)


def gemms(layer, x) -> set[str]:
    """The GEMM ops of one forward of ``layer``."""
    from torch.profiler import profile

    with profile() as prof:
        layer(x)
    return {e.key for e in prof.key_averages() if e.key.startswith("aten::addmm")}


def test_a_full_backward_hook_on_mixlora_down_projection_works():
    """MixLoRA writes into the down projection's output in place only when no hook can hold it."""
    from family import build

    from moelora_lit.ffn_block import MixLoRAFFN

    model = build("mixlora", lora_dropout=0.05).train()
    grads = []
    for module in model.modules():
        if isinstance(module, MixLoRAFFN):
            module.mlp.down_proj.register_full_backward_hook(lambda m, grad_in, grad_out: grads.append(grad_out[0]))
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    assert grads and all(g is not None for g in grads)


def test_hooks_on_the_base_see_its_own_output_and_double_backward_fails_loudly():
    """B's product goes into the base's output in place only while no hook can hold that output: with hooks it is
    added out of place, so a forward hook keeps the base's own output and a full backward hook works. The fused CPU
    functions have no second derivative and say so instead of returning a wrong one."""
    torch.manual_seed(10)
    base = nn.Linear(16, 12)
    layer = MoELoRALinear(base, MoELoRAConfig(r=8, num_experts=4, top_k=2, lora_dropout=0.05, target_modules=["x"],
                                              contrastive_weight=0.0, balance_weight=0.0)).train()
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(6, 16, requires_grad=True)
    assert "aten::addmm_" in gemms(layer, x)                           # nothing can see the base's output: in place
    seen = {}

    def keep_output(module, args, output):
        seen["output"] = output.detach().clone()      # what the base returned, as it left the hook
        seen["held"] = output                         # and the tensor itself, as a hook could keep it

    def keep_grad(module, grad_in, grad_out):
        seen["grad"] = grad_out[0]

    base.register_forward_hook(keep_output)
    base.register_full_backward_hook(keep_grad)
    assert gemms(layer, x) >= {"aten::addmm"} and "aten::addmm_" not in gemms(layer, x)
    y = layer(x)
    torch.testing.assert_close(seen["held"], seen["output"])   # nothing wrote into the held output
    torch.testing.assert_close(seen["output"], base(x))
    assert not torch.allclose(y, base(x))
    y.sum().backward()
    assert seen["grad"] is not None and x.grad is not None
    first, = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        first.sum().backward()
