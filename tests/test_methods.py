"""The mixture-of-LoRA family (docs/design.md §8, methods.md): each method's forward against its formula in float64,
computed by hand from the layer's tensors; what trains and what stays frozen; the N = 1 reductions to LoRA (PEFT's,
or ours on all seven projections for MixLoRA); the auxiliary terms (LoRAMoE's localized constraint, MixLoRA's switch
term, FlyLoRA's bias update after backward); trainable counts against the formulas; adapter files and exact resume;
FlyLoRA's bias under data parallelism; and the configuration errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama, tiny_model, token_batch
from safetensors import safe_open

from moelora_lit import MoELoRAConfig, collect_aux_losses, inject_moelora, load_adapter, save_adapter, set_token_mask
from moelora_lit.adapter_io import adapter_state_dict, load_adapter_state_dict
from moelora_lit.adapters import adapters_of
from moelora_lit.describe import describe_model, formula_params
from moelora_lit.ffn_block import MixLoRAFFN
from moelora_lit.layer import MoELoRALinear
from moelora_lit.training_step import after_backward

METHODS = ("moelora", "lora", "loramoe", "hydralora", "mola", "flylora", "mixlora")
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FFN = ["gate_proj", "up_proj", "down_proj"]

# Small versions of the presets in experiments/methods/ (no dropout: the forwards are compared exactly).
SETTINGS = {
    "moelora": dict(r=8, num_experts=4, top_k=2, lora_alpha=16.0, target_modules=["q_proj", "v_proj"], router="topk",
                    contrastive_weight=0.1, contrastive_queue_size=16, balance_loss="cv2", balance_weight=0.01),
    "lora": dict(r=8, num_experts=1, top_k=1, lora_alpha=16.0, target_modules=SEVEN, contrastive_weight=0.0,
                 balance_weight=0.0),
    "loramoe": dict(r=4, num_experts=4, top_k=4, lora_alpha=32.0, target_modules=FFN, router="dense",
                    contrastive_weight=0.0, balance_loss="localized", balance_weight=0.1, localized_delta=0.1),
    "hydralora": dict(r=4, num_experts=3, top_k=3, lora_alpha=32.0, target_modules=FFN, router="dense",
                      contrastive_weight=0.0, balance_weight=0.0),
    "mola": dict(r=4, num_experts=[2, 4, 6, 8], top_k=2, lora_alpha=16.0, target_modules=SEVEN, router="topk",
                 contrastive_weight=0.0, balance_loss="switch", balance_weight=0.0),
    "flylora": dict(r=8, num_experts=1, top_k=2, lora_alpha=16.0, target_modules=SEVEN, router="implicit",
                    contrastive_weight=0.0, balance_weight=0.0, bias_update_rate=0.01),
    "mixlora": dict(r=4, num_experts=4, top_k=2, lora_alpha=8.0, target_modules=SEVEN, router="topk",
                    contrastive_weight=0.0, balance_loss="switch_topk", balance_weight=0.01),
}


def method_config(method: str, **overrides) -> MoELoRAConfig:
    return MoELoRAConfig(method=method, **{"lora_dropout": 0.0, **SETTINGS[method], **overrides})


def build(method: str, seed: int = 0, randomize: bool = True, dtype: torch.dtype = torch.float32,
          **overrides) -> torch.nn.Module:
    """A tiny Llama (4 blocks for MoLA's four depth groups, else 2) injected with ``method``; with ``randomize``,
    random non-zero B, routers and FlyLoRA biases (B is zero at init)."""
    config = method_config(method, **overrides)
    model = tiny_llama(num_hidden_layers=4 if isinstance(config.num_experts, list) else 2)
    inject_moelora(model, config)
    model.to(dtype)
    if randomize:
        randomize_family(model, seed)
    return model


@torch.no_grad()
def randomize_family(model: torch.nn.Module, seed: int = 1) -> None:
    """Random B (std 0.1), routers (std 1: well-separated logits, no top-k ties) and FlyLoRA biases; A stays as
    initialised (FlyLoRA's sparse frozen A included)."""
    generator = torch.Generator().manual_seed(seed)

    def fill(tensor: torch.Tensor, std: float) -> None:
        tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=torch.float64) * std)

    for _, layer in adapters_of(model).named_layers():
        bs = layer.lora_B.values() if isinstance(layer, MixLoRAFFN) else [layer.lora_B]
        for b in bs:
            fill(b.weight, 0.1)
        if layer.router is not None:
            fill(layer.router.weight, 1.0)
        if getattr(layer, "layout", None) == "fly":
            fill(layer.rank_bias, 0.05)


def layers_of(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return adapters_of(model).named_layers()


def capture_inputs(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], list]:
    """Record every adapter layer's input of the next forwards (by layer name)."""
    seen, handles = {}, []
    for name, layer in layers_of(model):
        def hook(module, args, name=name):
            seen[name] = args[0].detach().reshape(-1, args[0].shape[-1])
        handles.append(layer.register_forward_pre_hook(hook))
    return seen, handles


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


def _fly_layers(model):
    return [(n, layer) for n, layer in layers_of(model) if getattr(layer, "layout", None) == "fly"]


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
    for name, layer in _fly_layers(model):
        ax = inputs[name] @ layer.lora_A.weight.T
        chosen = (ax + before[name]).topk(config.top_k).indices[real]
        counts = torch.bincount(chosen.flatten(), minlength=config.r).float()
        assert counts.sum() == real.sum() * config.top_k                   # padding excluded
        out[name] = before[name] + config.bias_update_rate * torch.sign(counts.mean() - counts)
    return out


def test_flylora_bias_update_after_backward_once_per_step_real_tokens_only():
    model = build("flylora").train()
    batch = token_batch(batch=2, seq=8, pad=3)
    before = {n: layer.rank_bias.clone() for n, layer in _fly_layers(model)}
    inputs = _fly_step(model, batch)
    for name, layer in _fly_layers(model):                                 # nothing moves before the step's end
        assert torch.equal(layer.rank_bias, before[name])
    after_backward(model)
    expected = _fly_expected(model, inputs, before, batch["attention_mask"])
    moved = 0
    for name, layer in _fly_layers(model):
        torch.testing.assert_close(layer.rank_bias, expected[name], atol=1e-7, rtol=0, msg=name)
        moved += int((layer.rank_bias != before[name]).sum())
    assert moved > 0
    updated = {n: layer.rank_bias.clone() for n, layer in _fly_layers(model)}
    after_backward(model)                                                  # a second call: nothing left to apply
    with torch.no_grad():                                                  # no-grad training forward
        model(**batch)
    after_backward(model)
    model.eval()
    model(**batch).loss.backward()                                         # eval forward, even with a backward
    after_backward(model)
    for name, layer in _fly_layers(model):
        assert torch.equal(layer.rank_bias, updated[name]), name


def test_flylora_bias_update_left_pending_is_applied_by_the_next_training_forward():
    model = build("flylora").train()
    batch = token_batch(pad=2)
    before = {n: layer.rank_bias.clone() for n, layer in _fly_layers(model)}
    inputs = _fly_step(model, batch)
    expected = _fly_expected(model, inputs, before, batch["attention_mask"])
    model(**token_batch(seed=1))                                          # no after_backward in between
    for name, layer in _fly_layers(model):
        torch.testing.assert_close(layer.rank_bias, expected[name], atol=1e-7, rtol=0, msg=name)


def test_flylora_bias_update_is_not_repeated_by_a_checkpoint_recomputed_forward():
    plain, ckpt = build("flylora").train(), build("flylora").train()
    ckpt.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    before = {n: layer.rank_bias.clone() for n, layer in _fly_layers(plain)}
    batch = token_batch(batch=2, seq=8, pad=3)
    inputs = _fly_step(plain, batch)
    calls = []
    handle = _fly_layers(ckpt)[0][1].register_forward_hook(lambda *args: calls.append(1))
    _fly_step(ckpt, batch)
    handle.remove()
    assert len(calls) == 2                                                 # the forward ran again inside backward
    for model in (plain, ckpt):
        after_backward(model)
    expected = _fly_expected(plain, inputs, before, batch["attention_mask"])
    for (name, a), (_, b) in zip(_fly_layers(plain), _fly_layers(ckpt), strict=True):
        assert torch.equal(a.rank_bias, b.rank_bias), name
        torch.testing.assert_close(b.rank_bias, expected[name], atol=1e-7, rtol=0, msg=name)
    for (name, a), (_, b) in zip(_fly_layers(plain), _fly_layers(ckpt), strict=True):
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
    before = {n: layer.rank_bias.clone() for n, layer in _fly_layers(ranks[0])}
    for model, batch in zip(ranks, batches, strict=True):
        _fly_step(model, batch)
    local = [torch.stack([layer.bias_counts.float() for _, layer in _fly_layers(m)]) for m in ranks]   # (L, r)
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
    for i, ((name, a), (_, b)) in enumerate(zip(_fly_layers(ranks[0]), _fly_layers(ranks[1]), strict=True)):
        assert torch.equal(a.rank_bias, b.rank_bias), name
        expected = before[name] + u * torch.sign(summed[i].mean() - summed[i])
        torch.testing.assert_close(a.rank_bias, expected, atol=1e-7, rtol=0, msg=name)
        own = before[name] + u * torch.sign(local[0][i].mean() - local[0][i])
        differs_from_local |= not torch.allclose(own, expected)
    assert differs_from_local


# --------------------------------------------------------------------------------------------- param counts
def formula_by_hand(method: str, entry: dict) -> int:
    """methods.md's per-linear counts, written out per method (independently of describe.formula_params)."""
    i, o, n, r = entry["in"], entry["out"], entry["experts"], entry["rank"]
    if method == "moelora":
        return r * i + o * r + n * i
    if method == "lora" or (method == "mixlora" and entry["layout"] == "slices"):
        return r * (i + o)
    if method in ("loramoe", "mola"):
        return n * r * (i + o) + n * i
    if method == "hydralora":
        return r * i + n * o * r + n * i
    if method == "flylora":
        return o * r
    return n * r * (i + o)                                                 # MixLoRA's FFN linears


@pytest.mark.parametrize("method", METHODS)
def test_trainable_count_equals_the_formula_and_the_real_parameters(method):
    model = build(method, randomize=False)
    description = describe_model(model)
    real = sum(p.numel() for p in model.parameters() if p.requires_grad)
    by_formula = sum(formula_params(m) for m in description["modules"]) + sum(
        r["trainable"] for r in description["routers"])
    assert sum(formula_by_hand(method, m) for m in description["modules"]) + sum(
        r["trainable"] for r in description["routers"]) == by_formula
    assert description["trainable_params"] == by_formula == real
    entries = {m["name"]: m for m in description["modules"]}
    for name, layer in layers_of(model):
        own = sum(p.numel() for p in layer.parameters() if p.requires_grad)
        if isinstance(layer, MixLoRAFFN):
            router = layer.num_experts * layer.hidden
            assert sum(formula_params(entries[f"{name}.{p}"]) for p in FFN) + router == own, name
            assert [r["trainable"] for r in description["routers"] if r["name"] == f"{name}.router"] == [router]
        else:
            assert formula_params(entries[name]) == own, name
    if method == "flylora":                                                # the frozen A is reported as such
        assert description["frozen_adapter_params"] == sum(
            layer.lora_A.weight.numel() for _, layer in layers_of(model))
    if method == "mixlora":
        assert len(description["routers"]) == len(description["blocks"]) == 2


# ----------------------------------------------------------------------------------------- files and resume
@pytest.mark.parametrize("method", METHODS)
def test_save_and_load_adapter_round_trip(method, tmp_path):
    model = build(method).eval()
    batch = token_batch(pad=2)
    with torch.no_grad():
        expected = model(**batch).logits
    save_adapter(model, tmp_path / "adapter")
    torch.manual_seed(1234)                          # a fresh model's own random A (FlyLoRA's frozen one) differs
    fresh = tiny_llama(num_hidden_layers=model.config.num_hidden_layers)
    torch.manual_seed(4321)
    load_adapter(fresh, tmp_path / "adapter")
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, expected)
    if method == "flylora":
        with safe_open(str(tmp_path / "adapter" / "adapter.safetensors"), "pt") as f:
            keys = set(f.keys())
        for name, layer in _fly_layers(model):
            assert {f"{name}.lora_A.weight", f"{name}.rank_bias", f"{name}.lora_B.weight"} <= keys
            assert layer.rank_bias.abs().sum() > 0


def _train_steps(model, optimizer, seeds):
    for seed in seeds:
        batch = token_batch(batch=2, seq=8, seed=seed, pad=2)
        set_token_mask(model, batch["attention_mask"])
        adapters_of(model).set_task_groups(torch.tensor([1, 0]))
        torch.manual_seed(seed)
        loss = model(**batch).loss + sum(collect_aux_losses(model).values())
        loss.backward()
        after_backward(model)
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("method", METHODS)
def test_exact_resume_from_the_adapter_state_with_queues(method):
    overrides = {"lora_dropout": 0.1} if method != "flylora" else {}
    model = build(method, **overrides).train()
    sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    _train_steps(model, sgd, [0, 1])
    state = {k: v.clone() for k, v in adapter_state_dict(model, include_queues=True).items()}
    if method == "moelora":
        assert any(k.endswith("contrastive_queue_count") and v.sum() > 0 for k, v in state.items())
    fresh = build(method, seed=99, **overrides).train()
    load_adapter_state_dict(fresh, state)
    sgd_fresh = torch.optim.SGD([p for p in fresh.parameters() if p.requires_grad], lr=0.1)
    _train_steps(model, sgd, [2, 3])
    _train_steps(fresh, sgd_fresh, [2, 3])
    a, b = adapter_state_dict(model, include_queues=True), adapter_state_dict(fresh, include_queues=True)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert any(not torch.equal(a[k], state[k]) for k in a)               # the two steps changed something


# ---------------------------------------------------------------------------------------------- config errors
def _one_line_naming(err: pytest.ExceptionInfo, field: str) -> None:
    message = str(err.value)
    assert "\n" not in message and f"MoELoRAConfig.{field}=" in message, message


def test_unknown_method_names_the_field():
    with pytest.raises(ValueError) as err:
        MoELoRAConfig(method="nope")
    _one_line_naming(err, "method")
    assert "flylora" in str(err.value)


def test_a_router_the_layout_cannot_use_names_the_field():
    with pytest.raises(ValueError) as err:
        MoELoRAConfig(method="flylora", router="topk", contrastive_weight=0.0, r=8, top_k=2)
    _one_line_naming(err, "router")
    assert "implicit" in str(err.value)


def test_a_per_block_list_longer_than_the_model_names_the_field():
    model = tiny_llama(num_hidden_layers=4)
    config = method_config("mola", num_experts=[2, 4, 6, 8, 10])
    with pytest.raises(ValueError) as err:
        inject_moelora(model, config)
    _one_line_naming(err, "num_experts")
    assert "4 blocks" in str(err.value)
    assert not any(p.requires_grad is False for p in model.parameters())   # nothing was touched


def test_ffn_block_placement_on_gpt2_names_the_block_type():
    model = tiny_model("gpt2")
    config = method_config("mixlora", target_modules=["c_attn", "c_fc", "c_proj"])
    with pytest.raises(ValueError) as err:
        inject_moelora(model, config)
    message = str(err.value)
    assert "\n" not in message and "placement" in message and "GPT2MLP" in message, message
