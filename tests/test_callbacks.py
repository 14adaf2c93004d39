"""RoutingStatsCallback: statistics against hand computations, TensorBoard tags, per-dataset eval loads, DDP."""

from __future__ import annotations

import json
import math
import multiprocessing

import lightning as L
import pytest
import torch
from conftest import adapter_config, randomize_adapter, tiny_llama, token_batch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, Dataset

from moelora_lit import inject_moelora, moelora_layers, set_token_mask
from moelora_lit.lightning.routing import RoutingAccumulator, RoutingStatsCallback, gate_entropy, load_cv, load_shares

# Two tokens of 3 experts; the second has a zero gate (0 log 0 = 0); a third, padded token must not count.
GATES = torch.tensor([[0.5, 0.25, 0.25], [0.0, 0.5, 0.5], [1.0, 0.0, 0.0]])
MASK = torch.tensor([True, True, False])


def h(*ps: float) -> float:
    return -sum(p * math.log(p) for p in ps if p > 0)


# ------------------------------------------------------------------ pure statistics
def test_gate_entropy_masks_padding_and_zero_gates():
    total, count = gate_entropy(GATES, MASK)
    assert count.item() == 2
    assert total.item() == pytest.approx(h(0.5, 0.25, 0.25) + h(0.5, 0.5))
    total, count = gate_entropy(GATES)                                   # no mask: all three tokens
    assert count.item() == 3 and total.item() == pytest.approx(h(0.5, 0.25, 0.25) + h(0.5, 0.5) + 0.0)
    assert not torch.isnan(total)


def test_load_shares_cv_max_min():
    shares = load_shares(torch.tensor([3.0, 1.0, 0.0, 4.0]))
    assert shares.tolist() == pytest.approx([3 / 8, 1 / 8, 0.0, 4 / 8])
    mean = 0.25
    std = math.sqrt(sum((s - mean) ** 2 for s in [3 / 8, 1 / 8, 0, 4 / 8]) / 4)      # population std
    assert load_cv(shares).item() == pytest.approx(std / mean)
    assert load_cv(torch.full((4,), 0.25)).item() == pytest.approx(0.0)
    assert load_cv(torch.tensor([1.0, 0, 0, 0])).item() == pytest.approx(math.sqrt(3))  # one expert: sqrt(N-1)
    assert load_shares(torch.zeros(3)).tolist() == [0.0, 0.0, 0.0]


def test_accumulator_hand_computation():
    acc = RoutingAccumulator(num_layers=1, num_experts=3)
    acc.update(GATES, MASK, layer=0)
    stats = acc.stats()
    assert acc.count.tolist() == [2.0]
    assert acc.routed[0].tolist() == [1.0, 2.0, 2.0]                     # gates > 0 on real tokens
    assert stats["load"][0].tolist() == pytest.approx([0.25, 0.375, 0.375])
    assert stats["entropy"][0].item() == pytest.approx((h(0.5, 0.25, 0.25) + h(0.5, 0.5)) / 2)
    assert stats["max"][0].item() == pytest.approx(0.375) and stats["min"][0].item() == pytest.approx(0.25)
    assert stats["cv"][0].item() == pytest.approx(torch.tensor([0.25, 0.375, 0.375]).std(correction=0).item() * 3)
    assert stats["routed"][0].tolist() == pytest.approx([0.2, 0.4, 0.4])


def test_accumulation_equals_statistics_of_concatenated_gates():
    torch.manual_seed(0)
    steps = [(torch.rand(5, 4).softmax(-1), torch.rand(5) > 0.3) for _ in range(3)]
    acc = RoutingAccumulator(num_layers=2, num_experts=4)
    for gates, mask in steps:
        acc.update(torch.stack([gates, gates.flip(-1)]), mask)          # batched over layers, shared mask
    gates = torch.cat([g for g, _ in steps])[torch.cat([m for _, m in steps])]   # real tokens only
    stats = acc.stats()
    for row, g in enumerate([gates, gates.flip(-1)]):
        shares = g.sum(0) / g.sum()
        assert stats["load"][row].tolist() == pytest.approx(shares.tolist())
        assert stats["entropy"][row].item() == pytest.approx((-(g * g.log()).sum(-1)).mean().item(), rel=1e-5)
        assert stats["cv"][row].item() == pytest.approx((shares.std(correction=0) / shares.mean()).item(), rel=1e-5)
    acc.reset()
    assert acc.packed.abs().sum() == 0


def test_per_layer_masks_and_unbatched_updates_agree():
    torch.manual_seed(1)
    gates, masks = torch.rand(3, 6, 4).softmax(-1), torch.rand(3, 6) > 0.5
    batched, single = RoutingAccumulator(3, 4), RoutingAccumulator(3, 4)
    batched.update(gates, masks)
    for i in range(3):
        single.update(gates[i], masks[i], layer=i)
    assert torch.allclose(batched.packed, single.packed)


# ------------------------------------------------------------------ Lightning runs on a tiny Llama
class Tokens(Dataset):
    def __init__(self, n: int, seed: int, pad: int = 2) -> None:
        self.batch = token_batch(batch=n, seq=8, seed=seed, pad=pad)

    def __len__(self) -> int:
        return self.batch["input_ids"].shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.batch.items()}


class TinyModule(L.LightningModule):
    """Minimal stand-in for MoELoRAModule: sets the token mask, trains on LM loss, evaluates with a forward
    (and optionally a short greedy generation, so decode steps are routed too)."""

    def __init__(self, generate: bool = False, lr: float = 1e-2) -> None:
        super().__init__()
        self.lr = lr
        self.model = tiny_llama()
        inject_moelora(self.model, adapter_config(contrastive_weight=0.0, balance_weight=0.0))
        randomize_adapter(self.model)
        self.generate = generate

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        set_token_mask(self.model, batch["attention_mask"])
        return self.model(**batch).loss

    def _eval(self, batch: dict) -> None:
        set_token_mask(self.model, batch["attention_mask"])
        self.model(**batch)
        if self.generate:
            self.model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                max_new_tokens=2, do_sample=False, pad_token_id=0)

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval(batch)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


class TinyData(L.LightningDataModule):
    val_names = ["alpha", "beta"]
    test_names = ["gamma"]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(Tokens(16, seed=0), batch_size=4)

    def val_dataloader(self) -> list[DataLoader]:
        return [DataLoader(Tokens(8, seed=1), batch_size=4), DataLoader(Tokens(4, seed=2, pad=0), batch_size=2)]

    def test_dataloader(self) -> DataLoader:
        return DataLoader(Tokens(4, seed=3), batch_size=4)


def trainer(tmp_path, **kwargs) -> L.Trainer:
    options = dict(accelerator="cpu", devices=1, logger=TensorBoardLogger(tmp_path, name="run", version=0),
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    return L.Trainer(**{**options, **kwargs})


def layer_names(module: L.LightningModule) -> list[str]:
    return [name.removeprefix("model.") for name, _ in moelora_layers(module)]


def test_fit_writes_routing_tags_and_heatmap(tmp_path):
    module, callback = TinyModule(), RoutingStatsCallback(heatmap_every_n_logs=1)
    run = trainer(tmp_path, max_steps=6, log_every_n_steps=2, limit_val_batches=0, callbacks=[callback])
    run.fit(module, datamodule=TinyData())
    events = EventAccumulator(run.logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars, images = set(events.Tags()["scalars"]), set(events.Tags()["images"])
    names = layer_names(module)
    assert names and names[0] == "model.layers.0.self_attn.q_proj"
    for name in names:
        for stat in ("entropy", "load_cv", "max_load", "min_load"):
            assert f"routing/{stat}/{name}" in scalars
        assert f"routing/load/{name}/expert_3" in scalars
    entropy = events.Scalars(f"routing/entropy/{names[0]}")
    assert [e.step for e in entropy] == [1, 3, 5]                         # every 2 steps, train/* x-axis
    assert all(0 < e.value <= math.log(2) + 1e-6 for e in entropy)        # top-2 gates: entropy <= log 2
    shares = [events.Scalars(f"routing/load/{names[0]}/expert_{i}")[-1].value for i in range(4)]
    assert sum(shares) == pytest.approx(1.0, abs=1e-5)
    assert max(shares) == pytest.approx(events.Scalars(f"routing/max_load/{names[0]}")[-1].value)
    assert "routing/load_heatmap" in images and len(events.Images("routing/load_heatmap")) == 3


def test_validate_logs_load_per_dataset(tmp_path):
    module, callback = TinyModule(), RoutingStatsCallback()
    run = trainer(tmp_path, callbacks=[callback])
    run.validate(module, datamodule=TinyData())
    payload = json.loads((tmp_path / "run" / "version_0" / "routing_validate.json").read_text())
    names = layer_names(module)
    assert payload["layers"] == names and set(payload["datasets"]) == {"alpha", "beta"}
    # Hand computation for "alpha": its two batches' gates on real tokens, layer by layer.
    gates = {name: [] for name in names}
    for batch in TinyData().val_dataloader()[0]:
        set_token_mask(module.model, batch["attention_mask"])
        with torch.no_grad():
            module.model(**batch)
        for name, layer in moelora_layers(module.model):
            gates[name].append(layer.last_gates[layer.last_token_mask])
    for row, name in enumerate(names):
        g = torch.cat(gates[name])
        assert payload["datasets"]["alpha"][row] == pytest.approx((g.sum(0) / g.sum()).tolist(), abs=1e-6)
    assert payload["tokens"] == {"alpha": 8 * 8 - 7 * 2, "beta": 4 * 8}
    assert torch.allclose(callback.eval_load["validate"]["alpha"], torch.tensor(payload["datasets"]["alpha"]))
    events = EventAccumulator(run.logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert {"routing/validate_load_heatmap/alpha", "routing/validate_load_heatmap/beta"} <= set(events.Tags()["images"])
    assert {"routing/validate_entropy/alpha", "routing/validate_entropy/beta"} <= set(events.Tags()["scalars"])
    assert not any(layer._forward_hooks for _, layer in moelora_layers(module))   # hooks removed


def test_test_counts_generation_steps(tmp_path):
    module, callback = TinyModule(generate=True), RoutingStatsCallback()
    run = trainer(tmp_path, callbacks=[callback])
    run.test(module, datamodule=TinyData())
    payload = json.loads((tmp_path / "run" / "version_0" / "routing_test.json").read_text())
    real = 4 * 8 - 3 * 2
    # forward (real tokens) + generate prefill (real tokens) + one decode step of 4 tokens (the 2nd new token)
    assert payload["tokens"] == {"gamma": 2 * real + 4}
    assert callback.eval_load["test"]["gamma"].shape == (len(layer_names(module)), 4)


def _run(tmp_path, fn: str, **kwargs) -> tuple[dict, EventAccumulator]:
    """Validate and fit (lr=0: the routing never changes) a fresh module; the JSON and the event file."""
    run = trainer(tmp_path, callbacks=[RoutingStatsCallback()], **{"limit_val_batches": 0, **kwargs})
    getattr(run, fn)(TinyModule(lr=0.0), datamodule=TinyData())
    events = EventAccumulator(run.logger.log_dir)
    events.Reload()
    path = tmp_path / "run" / "version_0" / "routing_validate.json"
    return (json.loads(path.read_text()) if path.exists() else {}), events


@pytest.mark.slow
def test_ddp_two_processes_reduce_to_the_single_process_result(tmp_path):
    if "fork" not in multiprocessing.get_all_start_methods() or torch.cuda.is_initialized():
        pytest.skip("ddp_fork needs fork and an uninitialised CUDA (ddp_spawn works too but re-imports: ~1 min)")
    # Validation: each rank sees half of each dataset; the summed result must equal one process on all of it.
    single, _ = _run(tmp_path / "single", "validate", limit_val_batches=1.0)
    ddp, _ = _run(tmp_path / "ddp", "validate", limit_val_batches=1.0, strategy="ddp_fork", devices=2)
    assert ddp["tokens"] == single["tokens"]                              # both ranks' tokens are counted
    for name in ("alpha", "beta"):
        assert torch.allclose(torch.tensor(ddp["datasets"][name]), torch.tensor(single["datasets"][name]), atol=1e-6)
    # Training: 4 steps x 4 samples on one process == 2 steps x 4 samples x 2 ranks (the same 16 samples).
    _, one = _run(tmp_path / "fit1", "fit", max_steps=4, log_every_n_steps=4)
    _, two = _run(tmp_path / "fit2", "fit", max_steps=2, log_every_n_steps=2, strategy="ddp_fork", devices=2)
    tags = [t for t in one.Tags()["scalars"] if t.startswith("routing/")]
    assert tags and sorted(tags) == sorted(t for t in two.Tags()["scalars"] if t.startswith("routing/"))
    for tag in tags:
        assert two.Scalars(tag)[-1].value == pytest.approx(one.Scalars(tag)[-1].value, rel=1e-4, abs=1e-6), tag


def test_tensorboard_has_custom_scalars_layout_labelled_heatmap_and_no_hp_metric(tmp_path):
    from tensorboard.plugins.custom_scalar import layout_pb2

    module = TinyModule()
    run = trainer(tmp_path, max_steps=2, log_every_n_steps=1, limit_val_batches=0, callbacks=[RoutingStatsCallback()])
    run.fit(module, datamodule=TinyData())
    events = EventAccumulator(run.logger.log_dir, size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    assert "hp_metric" not in events.Tags()["scalars"]                     # Lightning's -1 placeholder is gone
    (config,) = events.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for c in layout.category for chart in c.chart}
    assert charts["gate entropy (nats per token)"] == ["routing/entropy/.*"]
    assert "train/contrastive_loss$" in charts["auxiliary terms (weighted)"]
    (image,) = events.Images("routing/load_heatmap")                       # the first interval, labelled
    assert image.width > 300 and image.height > 200                        # a figure, not a 4 x 8-cell grid
