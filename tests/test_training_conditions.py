"""Correct under real training conditions: gradient checkpointing, DDP-consistent queues,
reproducible evaluation of the random router, and configurations that cannot train refused early."""

from __future__ import annotations

import multiprocessing

import lightning as L
import pytest
import torch
from conftest import adapter_config, randomize_adapter, tiny_llama, token_batch
from hf_folder import build_tiny_hf_folder
from torch.utils.data import DataLoader, Dataset

from moelora_lit import MoELoRAConfig, collect_aux_losses, inject_moelora, moelora_layers, push_queues, set_token_mask
from moelora_lit.lightning.module import MoELoRAModule

# Gradient checkpointing and DDP on the kernel users get on CPU (DDP's forked ranks fall back to the attention one).
pytestmark = pytest.mark.compiled_kernel

ROUTERS = ["topk", "dense", "noisy", "random"]


def _model(router: str, checkpointing: bool, reentrant: bool = False) -> torch.nn.Module:
    model = tiny_llama().train()
    inject_moelora(model, adapter_config(router=router, lora_dropout=0.1, contrastive_weight=0.5,
                                         balance_weight=0.5, z_loss_weight=0.1, contrastive_queue_size=64))
    randomize_adapter(model)
    if router == "noisy":  # a non-zero noise scale, so the recomputed forward must redraw the same noise
        for _, layer in moelora_layers(model):
            torch.nn.init.normal_(layer.router_noise.weight, std=0.1, generator=torch.Generator().manual_seed(2))
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    return model


def _step(model: torch.nn.Module, seed: int) -> torch.Tensor:
    """One training step's forward + backward (no optimizer), then the queue push; returns the total loss."""
    batch = token_batch(batch=2, seq=8, seed=seed, pad=2)
    set_token_mask(model, batch["attention_mask"])
    torch.manual_seed(100 + seed)                       # dropout, noisy and random routers draw the same numbers
    loss = model(**batch).loss
    loss = loss + sum(collect_aux_losses(model).values())
    loss.backward()
    push_queues(model)
    return loss.detach()


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    queues = {n: b.clone() for n, b in model.named_buffers() if "contrastive_queue" in n}
    return grads | queues


@pytest.mark.parametrize("router", ROUTERS)
def test_gradient_checkpointing_gives_the_same_step(router):
    plain, ckpt = _model(router, False), _model(router, True)
    for seed in (0, 1):                                  # step 0 fills the queues, step 1 scores against them
        for m in (plain, ckpt):
            m.zero_grad()
        loss_plain, loss_ckpt = _step(plain, seed), _step(ckpt, seed)
        torch.testing.assert_close(loss_ckpt, loss_plain, rtol=1e-5, atol=1e-5)
        a, b = _state(plain), _state(ckpt)
        assert a.keys() == b.keys() and any(".lora_A." in k for k in a) and any("queue" in k for k in a)
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-5, msg=key)
    layer = next(layer for _, layer in moelora_layers(ckpt))
    assert layer.aux_losses["contrastive"] > 0                             # the second step had a queue
    # every anchor entered once: 2 steps x 14 real tokens x (top-2, or all 4 experts for dense/random)
    assert int(layer.contrastive_queue_count.sum()) == 2 * 14 * (2 if router in ("topk", "noisy") else 4)


def test_reentrant_checkpointing_is_refused_with_the_setting_named():
    model = _model("topk", True, reentrant=True)
    batch = token_batch()
    model(**batch)
    with pytest.raises(ValueError, match="use_reentrant"):
        collect_aux_losses(model)


def test_random_router_is_reproducible_in_eval_and_random_in_training():
    model = tiny_llama()
    inject_moelora(model, adapter_config(router="random"))
    randomize_adapter(model)
    batch = token_batch(pad=2)
    with torch.no_grad():
        first = model.eval()(**batch).logits
        layers = [layer for _, layer in moelora_layers(model)]
        gates = [layer.last_gates for layer in layers]
        torch.manual_seed(123)                                            # the global RNG plays no part in eval
        second = model(**batch).logits
        assert torch.equal(first, second)
        assert all(torch.equal(g, layer.last_gates) for g, layer in zip(gates, layers, strict=True))
        assert not torch.equal(gates[0], gates[1])                       # each layer its own stream
        train_a = model.train()(**batch).logits
        train_b = model(**batch).logits
        assert not torch.equal(train_a, train_b)                         # training keeps its random draws


def test_dense_router_with_switch_balance_is_refused():
    with pytest.raises(ValueError, match=r"balance_loss.*router|router.*balance_loss"):
        MoELoRAConfig(r=8, num_experts=4, router="dense", balance_loss="switch")
    MoELoRAConfig(r=8, num_experts=4, router="dense", balance_loss="switch", balance_weight=0.0)   # inert: allowed
    MoELoRAConfig(r=8, num_experts=4, router="topk", balance_loss="switch")


# ------------------------------------------------------------------------------------------------------ DDP
class _Tokens(Dataset):
    def __init__(self, n: int) -> None:
        self.batch = token_batch(batch=n, seq=8, seed=5, pad=3)
        self.batch["input_ids"] = self.batch["input_ids"] % 300 + 4     # inside the tiny folder's vocabulary

    def __len__(self) -> int:
        return self.batch["input_ids"].shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.batch.items()}


class StepProbe(L.Callback):
    """Saves, per rank and step, ``before(layer)`` of every adapter layer just before the module's after-backward
    state update (queue push, bias update) and ``after(layer)`` at the step's end."""

    def __init__(self, out, before, after) -> None:
        self.out, self.before, self.after = out, before, after

    def on_after_backward(self, trainer, pl_module) -> None:           # runs before the module's own hook
        self.state = {n: self.before(layer) for n, layer in moelora_layers(pl_module.model)}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        after = {n: self.after(layer) for n, layer in moelora_layers(pl_module.model)}
        torch.save({"before": self.state, "after": after},
                   self.out / f"rank{trainer.global_rank}_step{trainer.global_step}.pt")


@pytest.mark.slow
def test_ddp_queues_are_identical_on_every_rank_and_hold_every_ranks_anchors(tmp_path):
    if "fork" not in multiprocessing.get_all_start_methods() or torch.cuda.is_initialized():
        pytest.skip("ddp_fork needs fork and an uninitialised CUDA")
    base = build_tiny_hf_folder(tmp_path / "base")
    module = MoELoRAModule(base_model=base, adapter=MoELoRAConfig(
        r=8, num_experts=4, top_k=2, lora_dropout=0.0, contrastive_weight=0.1, contrastive_queue_size=1024))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_fork", max_steps=3, logger=False,
                        default_root_dir=tmp_path,                  # the exported adapter goes here, not the cwd
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[StepProbe(tmp_path, lambda layer: layer.pending[0][layer.pending[2] > 0].clone(),
                                             lambda layer: (layer.contrastive_queue.clone(),
                                                            layer.contrastive_queue_count.clone()))])
    trainer.fit(module, train_dataloaders=DataLoader(_Tokens(24), batch_size=4))
    seen: dict[str, list[torch.Tensor]] = {}
    for step in (1, 2, 3):
        ranks = [torch.load(tmp_path / f"rank{r}_step{step}.pt") for r in (0, 1)]
        for name, (queue, count) in ranks[0]["after"].items():
            other_queue, other_count = ranks[1]["after"][name]
            assert torch.equal(queue, other_queue) and torch.equal(count, other_count), (step, name)
            for r in (0, 1):
                seen.setdefault(name, []).append(ranks[r]["before"][name])
            entries = queue[torch.arange(queue.shape[1]) < count[:, None]]            # (filled, s)
            expected = torch.cat(seen[name])                  # every anchor of every rank so far, nothing lost
            assert entries.shape[0] == expected.shape[0], (step, name)
            distance = torch.cdist(expected, entries, compute_mode="donot_use_mm_for_euclid_dist").amin(1)
            assert distance.max() < 1e-6, (step, name)
    assert all(p[name].shape[0] > 0 for p in (ranks[0]["before"], ranks[1]["before"]) for name in p)
