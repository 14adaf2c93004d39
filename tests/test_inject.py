"""Injection into a tiny Llama, training properties, equality with PEFT LoRA, aux-loss collection and
adapter save/load (docs/design.md §1.5, §2 and §5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import adapter_config, randomize_adapter, tiny_llama, token_batch, trainable_names
from safetensors import safe_open

from moelora_lit import (
    MoELoRALinear,
    adapter_state_dict,
    collect_aux_losses,
    inject_moelora,
    load_adapter,
    moelora_layers,
    push_queues,
    save_adapter,
    set_token_mask,
)
from moelora_lit.adapters import adapters_of
from moelora_lit.aux import AuxGroup

ROUTERS = ["topk", "dense", "noisy", "random"]
ADAPTER_PARTS = (".lora_A.", ".lora_B.", ".router.", ".router_noise.")


def logits(model, batch, grad: bool = False) -> torch.Tensor:
    with torch.set_grad_enabled(grad):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def expected_trainable(model, config) -> int:
    """sum over wrapped layers of r*(in+out) + N*in (router), + N*in (noise) for noisy, no router for random."""
    total = 0
    for _, layer in moelora_layers(model):
        in_features, out_features = layer.base_layer.weight.shape[1], layer.base_layer.weight.shape[0]
        total += config.r * (in_features + out_features)
        total += {"random": 0, "noisy": 2}.get(config.router, 1) * config.num_experts * in_features
    return total


# ----------------------------------------------------------------------------------------------- identity


@pytest.mark.parametrize("router", ROUTERS)
def test_injected_model_equals_base_exactly(router):
    model = tiny_llama()
    batch = token_batch(pad=2)
    base_eval = logits(model, batch)
    base_train = logits(model.train(), batch)
    inject_moelora(model.eval(), adapter_config(router=router, lora_dropout=0.1, contrastive_weight=0.1))
    assert torch.equal(logits(model, batch), base_eval)
    assert torch.equal(logits(model.train(), batch, grad=True), base_train)


# ---------------------------------------------------------------------------------------- what trains


@pytest.mark.parametrize("router", ROUTERS)
def test_only_adapter_tensors_train_and_their_count(router):
    model = tiny_llama()
    config = adapter_config(router=router, r=8, num_experts=4)
    names = inject_moelora(model, config)
    assert len(names) == 4                                              # q_proj and v_proj in 2 layers
    trainable = trainable_names(model)
    assert trainable and all(any(part in name for part in ADAPTER_PARTS) for name in trainable)
    assert any(".lora_A." in n for n in trainable) and any(".lora_B." in n for n in trainable)
    assert any(".router." in n for n in trainable) == (router != "random")
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count == expected_trainable(model, config)
    # q_proj 64->64 and v_proj 64->32 (2 KV heads of 16) in 2 layers: 2*8*(128+96) LoRA + 4*64 per router
    assert count == 3584 + {"random": 0, "noisy": 2 * 1024}.get(router, 1024)


@pytest.mark.parametrize("router", ROUTERS)
def test_training_steps_change_adapters_and_leave_base_weights_bit_identical(router):
    model = tiny_llama().train()
    batch = token_batch(pad=2)
    inject_moelora(model, adapter_config(router=router, lora_dropout=0.1, contrastive_weight=0.1,
                                         balance_weight=0.1, z_loss_weight=0.01))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)   # frozen ones included
    contrastive = []
    for _ in range(3):
        set_token_mask(model, batch["attention_mask"])
        out = model(**batch)
        aux = collect_aux_losses(model)
        contrastive.append(aux["contrastive"].item())
        (out.loss + sum(aux.values())).backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, tensor in model.named_parameters():
        if name in frozen:
            assert torch.equal(tensor, frozen[name]), name
        else:
            assert not torch.equal(tensor, adapters[name]) and torch.isfinite(tensor).all(), name
    assert contrastive[0] == 0.0 and contrastive[-1] > 0


# ------------------------------------------------------------------------------------------------ PEFT


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_one_expert_equals_peft_lora_outputs_and_gradients():
    from peft import LoraConfig, get_peft_model

    batch = token_batch(pad=2)
    ours = tiny_llama().train()
    config = adapter_config(r=8, num_experts=1, top_k=1, lora_alpha=16.0, lora_dropout=0.0,
                            contrastive_weight=0.0, balance_weight=0.0)
    names = inject_moelora(ours, config)
    randomize_adapter(ours)
    lora_config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    peft_model = get_peft_model(tiny_llama().train(), lora_config)
    peft_base = peft_model.get_base_model()
    with torch.no_grad():
        for name in names:
            layer, lora = ours.get_submodule(name), peft_base.get_submodule(name)
            lora.lora_A["default"].weight.copy_(layer.lora_A.weight)
            lora.lora_B["default"].weight.copy_(layer.lora_B.weight)
            assert lora.scaling["default"] == layer.scaling == 2.0
    ours_out, peft_out = ours(**batch), peft_model(**batch)
    assert not torch.equal(ours_out.logits, logits(tiny_llama(), batch))   # the adapter is active
    torch.testing.assert_close(ours_out.logits, peft_out.logits, atol=1e-5, rtol=1e-5)
    ours_out.loss.backward()
    peft_out.loss.backward()
    for name in names:
        layer, lora = ours.get_submodule(name), peft_base.get_submodule(name)
        assert layer.lora_A.weight.grad.abs().sum() > 0
        torch.testing.assert_close(layer.lora_A.weight.grad, lora.lora_A["default"].weight.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.lora_B.weight.grad, lora.lora_B["default"].weight.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize(("r", "num_experts"), [(8, 8), (32, 8)])
def test_parameter_count_is_lora_plus_router(r, num_experts):
    from peft import LoraConfig, get_peft_model

    model = tiny_llama()
    inject_moelora(model, adapter_config(r=r, num_experts=num_experts, contrastive_weight=0.0))
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=r, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    moelora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    routers = sum(num_experts * layer.in_features for _, layer in moelora_layers(model))
    print(f"\ntiny Llama, q_proj+v_proj, r={r}: MoELoRA ({num_experts} experts) {moelora} trainable parameters, "
          f"PEFT LoRA {lora} (+{moelora - lora} router = +{100 * (moelora - lora) / lora:.1f}%)")
    assert moelora == lora + routers


# ------------------------------------------------------------------------------------------- aux losses


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_collect_aux_losses_weights_and_reduces_over_layers(reduction):
    model = tiny_llama().train()
    weights = {"contrastive": 0.5, "balance": 0.25, "z": 0.125}
    inject_moelora(model, adapter_config(contrastive_weight=0.5, balance_weight=0.25, z_loss_weight=0.125,
                                         aux_reduction=reduction))
    batch = token_batch()
    logits(model, batch, grad=True)
    logits(model, token_batch(seed=1), grad=True)                       # the queues are filled now
    aux = collect_aux_losses(model)
    assert set(aux) == {"contrastive", "balance", "z"}
    layers = [layer for _, layer in moelora_layers(model)]
    for key, weight in weights.items():
        terms = torch.stack([layer.aux_losses[key] for layer in layers])
        expected = weight * (terms.sum() if reduction == "sum" else terms.mean())
        assert terms.min() > 0 and aux[key].requires_grad
        torch.testing.assert_close(aux[key], expected)


def test_collect_aux_losses_zero_in_eval_and_when_off():
    model = tiny_llama()
    inject_moelora(model, adapter_config(contrastive_weight=0.5, balance_weight=0.5, z_loss_weight=0.5))
    logits(model.eval(), token_batch())
    aux = collect_aux_losses(model)
    assert set(aux) == {"contrastive", "balance", "z"} and all(v.item() == 0.0 for v in aux.values())
    off = tiny_llama().train()
    inject_moelora(off, adapter_config(contrastive_weight=0.0, balance_weight=0.0))
    logits(off, token_batch(), grad=True)
    assert all(v.item() == 0.0 for v in collect_aux_losses(off).values())
    with pytest.raises(ValueError, match="inject_moelora"):
        collect_aux_losses(tiny_llama())


def test_token_mask_keeps_padding_out_of_every_queue():
    model = tiny_llama().train()
    inject_moelora(model, adapter_config(top_k=2, contrastive_weight=0.1, contrastive_queue_size=64))
    batch = token_batch(batch=2, seq=8, pad=3)                           # 13 real tokens
    set_token_mask(model, batch["attention_mask"])
    logits(model, batch, grad=True)
    push_queues(model)
    for _, layer in moelora_layers(model):
        assert layer.contrastive_queue_count.sum().item() == 13 * 2


# -------------------------------------------------------------------------------------------- save/load


@pytest.fixture
def saved(tmp_path):
    """A trained-looking adapter (random B, filled queues) saved to ``tmp_path``, with its model."""
    model = tiny_llama().train()
    config = adapter_config(router="noisy", contrastive_weight=0.1)
    inject_moelora(model, config)
    randomize_adapter(model)
    logits(model, token_batch(), grad=True)
    push_queues(model)
    assert any(layer.contrastive_queue_count.any() for _, layer in moelora_layers(model))
    save_adapter(model.eval(), tmp_path)
    return model, config, tmp_path


def test_saved_adapter_holds_only_adapter_tensors(saved):
    model, config, path = saved
    with safe_open(str(path / "adapter.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == set(trainable_names(model))
    assert not any("base_layer" in k or "queue" in k for k in keys)
    meta = json.loads((path / "adapter_config.json").read_text())
    assert meta["config"] == config.to_dict()


def test_save_load_round_trip_is_bit_exact(saved):
    model, config, path = saved
    batch = token_batch(seed=3)
    fresh = tiny_llama(seed=7)
    fresh.load_state_dict(tiny_llama(seed=0).state_dict())               # same base weights, other seed
    torch.manual_seed(1234)
    inject_moelora(fresh, config)
    fresh.eval()
    assert not torch.equal(logits(fresh, batch), logits(model, batch))
    load_adapter(fresh, path)
    assert torch.equal(logits(fresh, batch), logits(model, batch))


def test_load_adapter_into_an_uninjected_model_injects_it(saved):
    model, config, path = saved
    fresh = tiny_llama()
    load_adapter(fresh, path)
    assert [n for n, _ in moelora_layers(fresh)] == [n for n, _ in moelora_layers(model)]
    assert adapters_of(fresh).config == config
    assert trainable_names(fresh) == trainable_names(model)
    batch = token_batch(seed=3)
    assert torch.equal(logits(fresh.eval(), batch), logits(model, batch))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(r=16), r"lora_A\.weight has shape \(8, 64\).*\(16, 64\)"),
        (dict(num_experts=2), r"router\.weight has shape \(4, 64\).*\(2, 64\)"),
        (dict(router="topk"), r"unexpected \[.*router_noise\.weight"),
        (dict(target_modules=["q_proj"]), r"unexpected \[.*v_proj\.lora_A\.weight"),
        (dict(target_modules=["q_proj", "v_proj", "o_proj"]), r"missing \[.*o_proj\.lora_A\.weight"),
    ],
)
def test_loading_into_a_different_adapter_raises_naming_the_key(saved, overrides, message):
    _, config, path = saved
    other = tiny_llama()
    inject_moelora(other, adapter_config(**{**config.to_dict(), **overrides}))
    with pytest.raises(ValueError, match=message):
        load_adapter(other, path)


# ---------------------------------------------------------------------------------------------- targets


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        (["model.layers.0.self_attn.q_proj"], ["model.layers.0.self_attn.q_proj"]),
        ([".q_proj"], ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]),
        (["self_attn.v_proj", "mlp.down_proj"], [f"model.layers.{i}.{m}" for i in (0, 1)
                                                  for m in ("self_attn.v_proj", "mlp.down_proj")]),
        (r"model\.layers\.1\.self_attn\.[qv]_proj", ["model.layers.1.self_attn.q_proj",
                                                     "model.layers.1.self_attn.v_proj"]),
        (r".*_proj", [f"model.layers.{i}.{m}" for i in (0, 1) for m in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]),
    ],
)
def test_target_matching(targets, expected):
    model = tiny_llama()
    names = inject_moelora(model, adapter_config(target_modules=targets))
    assert sorted(names) == sorted(expected)
    assert names == [n for n, _ in moelora_layers(model)]
    assert all(isinstance(model.get_submodule(n), MoELoRALinear) for n in expected)


@pytest.mark.parametrize("targets", [["proj"], ["query"], "q_proj", r"layers\.0\..*"])
def test_no_match_lists_candidate_modules(targets):
    with pytest.raises(ValueError, match=r"matched no module.*down_proj.*q_proj"):
        inject_moelora(tiny_llama(), adapter_config(target_modules=targets))


@pytest.mark.parametrize("targets", [["mlp"], ["embed_tokens"], ["self_attn"], r"model\.layers\.0"])
def test_targeting_a_non_linear_module_raises(targets):
    model = tiny_llama()
    with pytest.raises(ValueError, match="not linear"):
        inject_moelora(model, adapter_config(target_modules=targets))
    assert not list(moelora_layers(model)) and all(p.requires_grad for p in model.parameters())


def test_injecting_twice_raises():
    model = tiny_llama()
    inject_moelora(model, adapter_config())
    with pytest.raises(ValueError, match="already"):
        inject_moelora(model, adapter_config(target_modules=["o_proj"]))


@pytest.mark.parametrize("training", [False, True])
def test_new_layers_follow_the_model_mode(training):
    model = tiny_llama().train(training)
    inject_moelora(model, adapter_config(lora_dropout=0.1))
    for _, layer in moelora_layers(model):
        assert all(m.training == training for m in layer.modules())


def test_injection_freezes_every_base_parameter():
    model = tiny_llama()
    inject_moelora(model, adapter_config(target_modules=["q_proj"]))
    for name, param in model.named_parameters():
        assert param.requires_grad == any(part in name for part in ADAPTER_PARTS), name


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.compiled_kernel)])
def test_layers_terms_and_pushes_together_equal_layer_by_layer(compiled):
    """inject_moelora gives the layers one AuxGroup (their terms wait for the first read, then are computed together)
    and push_queues pushes them in one batch: the same contrastive terms and queues, bit for bit, and the same
    balance and z terms and gradients to float rounding, as layers that each compute and push alone."""
    config = adapter_config(contrastive_weight=0.5, contrastive_queue_size=8, balance_weight=0.3, z_loss_weight=0.2)
    together, alone = tiny_llama(), tiny_llama()
    for model in (together, alone):
        inject_moelora(model.train(), config)
        randomize_adapter(model)
    for _, layer in moelora_layers(alone):
        layer.aux_group = AuxGroup()
    layers = [layer for _, layer in moelora_layers(together)]
    assert len({id(layer.aux_group) for layer in layers}) == 1
    for step in range(3):
        batch = token_batch(seed=step, pad=3)
        results = []
        for model in (together, alone):
            set_token_mask(model, batch["attention_mask"])
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            if model is together:
                assert layers[0].aux_group.waiting == layers                 # nothing computed before the read
            aux = collect_aux_losses(model)
            (out.loss + sum(aux.values())).backward()
            if model is together:
                push_queues(model)
            else:
                for _, layer in moelora_layers(model):
                    layer.push_pending()
            results.append(({k: v.detach() for k, v in aux.items()},
                            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                            adapter_state_dict(model, include_queues=True)))
            model.zero_grad(set_to_none=True)
        (aux_a, grads_a, state_a), (aux_b, grads_b, state_b) = results
        assert torch.equal(aux_a["contrastive"], aux_b["contrastive"]) and (step == 0 or aux_a["contrastive"] > 0)
        for key in ("balance", "z"):
            assert aux_a[key] > 0
            torch.testing.assert_close(aux_a[key], aux_b[key], rtol=1e-6, atol=0)
        assert grads_a.keys() == grads_b.keys()
        for key in grads_a:
            torch.testing.assert_close(grads_a[key], grads_b[key], rtol=1e-5, atol=1e-7)
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert int(layers[0].contrastive_queue_count.sum()) > 0


def test_terms_first_read_under_no_grad_keep_their_gradient():
    """The terms are computed at their first read; a read under no_grad (a logging hook) must not detach them."""
    model = tiny_llama()
    inject_moelora(model.train(), adapter_config(contrastive_weight=0.5, balance_weight=0.3))
    randomize_adapter(model)
    for step in range(2):                                                # the second step has a filled queue
        batch = token_batch(seed=step, pad=2)
        set_token_mask(model, batch["attention_mask"])
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        with torch.no_grad():
            logged = {k: float(v) for k, v in collect_aux_losses(model).items()}
        aux = collect_aux_losses(model)
        assert aux["contrastive"].requires_grad and aux["balance"].requires_grad
        assert float(aux["contrastive"]) == logged["contrastive"]
        (aux["contrastive"] + aux["balance"]).backward()
        push_queues(model)
    assert all(layer.lora_A.weight.grad.abs().sum() > 0 for _, layer in moelora_layers(model))


def test_no_step_walks_the_model_after_the_first(monkeypatch):
    """set_token_mask, collect_aux_losses and push_queues ask the model's one owner for its layers: after the first
    step none of them calls the model's named_modules() or modules()."""
    config = adapter_config(contrastive_weight=0.5, contrastive_queue_size=8, balance_weight=0.3, z_loss_weight=0.2)
    model = tiny_llama()
    inject_moelora(model.train(), config)
    calls = []
    for name in ("named_modules", "modules"):
        original = getattr(torch.nn.Module, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            if self is model:
                calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.nn.Module, name, counted)
    for step in range(3):
        batch = token_batch(seed=step, pad=3)
        set_token_mask(model, batch["attention_mask"])
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        before = len(calls)
        set_token_mask(model, batch["attention_mask"])
        aux = collect_aux_losses(model)
        (out.logits.float().square().mean() + sum(aux.values())).backward()
        push_queues(model)
        if step > 0:
            assert calls[before:] == [], f"step {step} walked the model: {calls[before:]}"
    assert adapters_of(model).layers[0].contrastive_queue_count.sum() > 0


def test_trainers_call_the_one_training_step_not_the_helpers():
    """The Lightning module and the Hugging Face trainers compose the loss and push through training_step only."""
    root = Path(__file__).resolve().parents[1] / "moelora_lit"
    for folder in ("lightning", "integrations"):
        for path in (root / folder).rglob("*.py"):
            text = path.read_text()
            assert "collect_aux_losses(" not in text and "push_queues(" not in text, path
    for path in (root / "lightning" / "module.py", root / "integrations" / "mixin.py"):
        text = path.read_text()
        assert "step_loss(" in text and "after_backward(" in text, path
