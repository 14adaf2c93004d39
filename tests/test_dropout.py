"""The adapters' CPU dropout (moelora_lit/dropout.py) against nn.Dropout's semantics."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from moelora_lit import MoELoRAConfig
from moelora_lit.dropout import RESOLUTION, LoRADropout, keep_mask, keep_threshold
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_forward_and_backward_use_one_mask(dtype):
    torch.manual_seed(2)
    layer = LoRADropout(0.2)
    x = (torch.rand(64, 96, dtype=dtype) + 1).requires_grad_()           # no zeros: every drop is visible
    out = layer(x)
    assert out.dtype == dtype
    kept = out != 0
    scale = RESOLUTION / (RESOLUTION - keep_threshold(0.2))
    torch.testing.assert_close(out[kept], (x * scale).to(dtype)[kept])
    grad = torch.randn_like(x)
    out.backward(grad)
    expected = torch.where(kept, grad * torch.tensor(scale, dtype=dtype), torch.zeros_like(grad))
    torch.testing.assert_close(x.grad, expected)


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
