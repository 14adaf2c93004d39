"""FlyLoRA's rank bias under real data parallelism (two gloo processes): after every step it is identical on both
ranks and moved by the update of the two ranks' summed choices."""

from __future__ import annotations

import multiprocessing

import lightning as L
import pytest
import torch
from hf_folder import build_tiny_hf_folder
from test_training_conditions import StepProbe, _Tokens
from torch.utils.data import DataLoader

from moelora_lit import MoELoRAConfig
from moelora_lit.lightning.module import MoELoRAModule


@pytest.mark.slow
def test_ddp_flylora_bias_is_identical_on_every_rank_and_follows_the_summed_choices(tmp_path):
    if "fork" not in multiprocessing.get_all_start_methods() or torch.cuda.is_initialized():
        pytest.skip("ddp_fork needs fork and an uninitialised CUDA")
    base = build_tiny_hf_folder(tmp_path / "base")
    u = 0.01
    module = MoELoRAModule(base_model=base, adapter=MoELoRAConfig(
        method="flylora", r=8, num_experts=1, top_k=2, lora_alpha=16.0, lora_dropout=0.0, router="implicit",
        target_modules=["q_proj", "v_proj", "down_proj"], contrastive_weight=0.0, balance_weight=0.0,
        bias_update_rate=u))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_fork", max_steps=2, logger=False,
                        default_root_dir=tmp_path, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False,
                        callbacks=[StepProbe(tmp_path,
                                             lambda layer: (layer.rank_bias.clone(), layer.bias_counts.clone()),
                                             lambda layer: layer.rank_bias.clone())])
    trainer.fit(module, train_dataloaders=DataLoader(_Tokens(16), batch_size=4))
    for step in (1, 2):
        ranks = [torch.load(tmp_path / f"rank{r}_step{step}.pt") for r in (0, 1)]
        assert ranks[0]["after"].keys() and ranks[0]["after"].keys() == ranks[1]["after"].keys()
        for name, after in ranks[0]["after"].items():
            assert torch.equal(after, ranks[1]["after"][name]), (step, name)
            before = ranks[0]["before"][name][0]
            assert torch.equal(before, ranks[1]["before"][name][0]), (step, name)
            local = [ranks[r]["before"][name][1].float() for r in (0, 1)]
            assert local[0].sum() > 0 and local[1].sum() > 0 and not torch.equal(local[0], local[1])
            summed = local[0] + local[1]
            torch.testing.assert_close(after, before + u * torch.sign(summed.mean() - summed), atol=1e-7, rtol=0)
