"""The mixture-of-LoRA family (docs/design.md §10, methods.md): each method's forward against its formula in float64,
computed by hand from the layer's tensors; what trains and what stays frozen; the N = 1 reductions to LoRA (PEFT's,
or ours on all seven projections for MixLoRA)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama, token_batch
from family import FFN, METHODS, build, layers_of

from moelora_lit import collect_aux_losses, set_token_mask
from moelora_lit.adapters import adapters_of
from moelora_lit.ffn_block import MixLoRAFFN
from moelora_lit.layer import MoELoRALinear


# ------------------------------------------------------------------------------------------ formulas by hand
def gates_by_hand(logits: torch.Tensor, router: str, k: int) -> torch.Tensor:
    """Dense: softmax. Top-k: the k largest probabilities, renormalised to sum 1 (MoLA's, MixLoRA's wording)."""
    p = logits.softmax(-1)
    if router == "dense":
        return p
    top = p.topk(k, dim=-1)
    return torch.zeros_like(p).scatter(-1, top.indices, top.values / top.values.sum(-1, keepdim=True))


def linear_by_hand(layer: MoELoRALinear, x: torch.Tensor) -> torch.Tensor:
    """methods.md's formula of a wrapped linear, expert by expert, from the layer's tensors."""
    c, n = layer.config, layer.num_experts
    w0, a, b = layer.base_layer.weight, layer.lora_A.weight, layer.lora_B.weight
    y = x @ w0.T
    if layer.layout == "fly":                            # top-k of A x + d (signed); s * B (A x * mask)
        ax = x @ a.T
        chosen = (ax + layer.rank_bias).topk(c.top_k, dim=-1).indices
        mask = torch.zeros_like(ax).scatter(-1, chosen, 1.0)
        return y + (c.lora_alpha / c.r) * (ax * mask) @ b.T
    g = torch.ones(x.shape[0], 1, dtype=x.dtype) if n == 1 else gates_by_hand(x @ layer.router.weight.T, c.router,
                                                                                c.top_k)
    for i in range(n):
        if layer.layout == "slices":                     # MoELoRA: rank slices of one LoRA, scaled alpha / (r/N)
            s = c.r // n
            a_i, b_i, scale = a[i * s:(i + 1) * s], b[:, i * s:(i + 1) * s], c.lora_alpha / s
        elif layer.layout == "independent":              # LoRAMoE, MoLA: N LoRAs of rank r
            a_i, b_i, scale = a[i * c.r:(i + 1) * c.r], b[:, i * c.r:(i + 1) * c.r], c.lora_alpha / c.r
        else:                                            # HydraLoRA: one shared A, heads B_i
            a_i, b_i, scale = a, b[:, i * c.r:(i + 1) * c.r], c.lora_alpha / c.r
        y = y + scale * g[:, i:i + 1] * (x @ a_i.T @ b_i.T)
    return y


def block_by_hand(block: MixLoRAFFN, x: torch.Tensor) -> torch.Tensor:
    """MixLoRA: sum over the top-k experts of g_e * E_e(x), E_e the whole FFN with expert e's three LoRAs."""
    mlp, c, r = block.mlp, block.config, block.config.r
    g = gates_by_hand(x @ block.router.weight.T, "topk", c.top_k)
    s = c.lora_alpha / r

    def proj(name: str, inputs: torch.Tensor, e: int) -> torch.Tensor:
        a = block.lora_A[name].weight[e * r:(e + 1) * r]
        b = block.lora_B[name].weight[:, e * r:(e + 1) * r]
        return inputs @ getattr(mlp, name).weight.T + s * inputs @ a.T @ b.T

    out = torch.zeros_like(x)
    for e in range(block.num_experts):
        hidden = mlp.act_fn(proj("gate_proj", x, e)) * proj("up_proj", x, e)
        out = out + g[:, e:e + 1] * proj("down_proj", hidden, e)
    return out


@pytest.mark.parametrize("method", METHODS)
def test_forward_equals_the_methods_formula_in_float64(method):
    model = build(method, dtype=torch.float64).eval()
    generator = torch.Generator().manual_seed(3)
    kinds = set()
    for name, layer in layers_of(model):
        x = torch.randn(12, layer.in_features, generator=generator, dtype=torch.float64)
        with torch.no_grad():
            y = layer(x)
            expected = block_by_hand(layer, x) if isinstance(layer, MixLoRAFFN) else linear_by_hand(layer, x)
            base = layer.mlp(x) if isinstance(layer, MixLoRAFFN) else layer.base_layer(x)
        assert (y - base).abs().max() > 1e-3, name                         # the adapter is active
        torch.testing.assert_close(y, expected, atol=1e-11, rtol=1e-11, msg=name)
        kinds.add(type(layer).__name__ + ":" + str(getattr(layer, "num_experts", None)))
    if method == "mola":                                                   # four depth groups: 2, 4, 6, 8 experts
        counts = [layer.num_experts for name, layer in layers_of(model) if name.endswith("q_proj")]
        assert counts == [2, 4, 6, 8]
    if method == "mixlora":
        assert {type(layer).__name__ for _, layer in layers_of(model)} == {"MoELoRALinear", "MixLoRAFFN"}


def test_flylora_ranks_signed_values_plus_bias_and_masks_the_unbiased_projection():
    model = build("flylora", dtype=torch.float64).eval()
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    with torch.no_grad():
        layer.rank_bias.zero_()
        layer.rank_bias[0] = 100.0                                         # rank 0 is always chosen
        x = torch.randn(6, layer.in_features, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        layer(x)
    gates = layer.last_gates
    assert (gates[:, 0] > 0).all() and ((gates > 0).sum(-1) == 2).all()
    ax = x @ layer.lora_A.weight.T
    second = ax[:, 1:].topk(1).indices[:, 0] + 1                           # signed, not magnitude
    assert torch.equal((gates > 0).nonzero()[:, 1].view(6, 2)[:, 1], second)


# ---------------------------------------------------------------------------------------------- what trains
@pytest.mark.parametrize("method", METHODS)
def test_adapters_and_routers_get_gradients_base_and_flylora_a_stay_frozen(method):
    model = build(method).train()
    batch = token_batch(pad=2)
    set_token_mask(model, batch["attention_mask"])
    adapters_of(model).set_task_groups(torch.tensor([1, 0]))
    loss = model(**batch).loss + sum(collect_aux_losses(model).values())
    loss.backward()
    adapter_params = set()
    for name, layer in layers_of(model):
        ffn = isinstance(layer, MixLoRAFFN)
        a_list = list(layer.lora_A.values()) if ffn else [layer.lora_A]
        b_list = list(layer.lora_B.values()) if ffn else [layer.lora_B]
        for b in b_list:
            assert b.weight.requires_grad and b.weight.grad is not None and b.weight.grad.abs().sum() > 0, name
            adapter_params.add(b.weight)
        for a in a_list:
            if getattr(layer, "layout", None) == "fly":                   # frozen sparse random projection
                assert not a.weight.requires_grad and a.weight.grad is None, name
            else:
                assert a.weight.requires_grad and a.weight.grad.abs().sum() > 0, name
                adapter_params.add(a.weight)
        if layer.router is not None:
            assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0, name
            adapter_params.add(layer.router.weight)
        else:
            assert layer.num_experts == 1 or layer.layout == "fly", name        # LoRA (MixLoRA's attention), FlyLoRA
        if getattr(layer, "layout", None) == "fly":
            assert "rank_bias" in dict(layer.named_buffers()) and "rank_bias" not in dict(layer.named_parameters())
    for name, param in model.named_parameters():
        if not any(param is p for p in adapter_params):
            assert not param.requires_grad and param.grad is None, name


# ------------------------------------------------------------------------------------------- N = 1 == LoRA
def _peft_model(targets: list[str], r: int, alpha: float, layers: int):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(tiny_llama(num_hidden_layers=layers),
                          LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0)).double()


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("method", ["loramoe", "hydralora", "mola"])
def test_one_expert_equals_peft_lora(method):
    ours = build(method, dtype=torch.float64, num_experts=1, top_k=1, balance_weight=0.0).train()
    config = adapters_of(ours).config
    layers = ours.config.num_hidden_layers
    peft_model = _peft_model(list(config.target_modules), config.r, config.lora_alpha, layers).train()
    peft_base = peft_model.get_base_model()
    with torch.no_grad():
        for name, layer in layers_of(ours):
            assert layer.router is None and layer.lora_A.weight.shape[0] == config.r
            lora = peft_base.get_submodule(name)
            lora.lora_A["default"].weight.copy_(layer.lora_A.weight)
            lora.lora_B["default"].weight.copy_(layer.lora_B.weight)
            assert lora.scaling["default"] == layer.scaling
    batch = token_batch(pad=2)
    out, ref = ours(**batch), peft_model(**batch)
    assert not torch.allclose(out.logits, tiny_llama(num_hidden_layers=layers).double()(**batch).logits)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-10, rtol=1e-10)
    out.loss.backward()
    ref.loss.backward()
    for name, layer in layers_of(ours):
        lora = peft_base.get_submodule(name)
        torch.testing.assert_close(layer.lora_A.weight.grad, lora.lora_A["default"].weight.grad, atol=1e-10, rtol=1e-8)
        torch.testing.assert_close(layer.lora_B.weight.grad, lora.lora_B["default"].weight.grad, atol=1e-10, rtol=1e-8)


def test_mixlora_with_one_expert_equals_lora_on_all_seven_projections():
    mix = build("mixlora", dtype=torch.float64, num_experts=1, top_k=1, balance_weight=0.0).train()
    lora = build("lora", dtype=torch.float64, r=4, lora_alpha=8.0, randomize=False).train()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(7)
        for name, layer in layers_of(mix):
            if isinstance(layer, MixLoRAFFN):
                for proj in FFN:
                    target = lora.get_submodule(f"{name}.{proj}")
                    layer.lora_A[proj].weight.normal_(0, 0.1, generator=generator)
                    target.lora_A.weight.copy_(layer.lora_A[proj].weight)
                    target.lora_B.weight.copy_(layer.lora_B[proj].weight)
            else:
                target = lora.get_submodule(name)
                target.lora_A.weight.copy_(layer.lora_A.weight)
                target.lora_B.weight.copy_(layer.lora_B.weight)
    batch = token_batch(pad=2)
    out, ref = mix(**batch), lora(**batch)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-10, rtol=1e-10)
    out.loss.backward()
    ref.loss.backward()
    for name, layer in layers_of(mix):
        if isinstance(layer, MixLoRAFFN):
            for proj in FFN:
                target = lora.get_submodule(f"{name}.{proj}")
                torch.testing.assert_close(layer.lora_B[proj].weight.grad, target.lora_B.weight.grad, atol=1e-10,
                                           rtol=1e-8)
                torch.testing.assert_close(layer.lora_A[proj].weight.grad, target.lora_A.weight.grad, atol=1e-10,
                                           rtol=1e-8)
