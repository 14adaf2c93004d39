"""MoELoRAConfig: validation names the bad field, dict round trip refuses unknown keys (docs/design.md §2)."""

from __future__ import annotations

import math

import pytest

from moelora_lit import MoELoRAConfig


def test_defaults_follow_author_code():
    config = MoELoRAConfig()
    assert (config.r, config.num_experts, config.top_k, config.lora_alpha) == (8, 8, 2, 32.0)
    assert config.target_modules == ["q_proj", "v_proj"]
    assert config.router == "topk" and config.balance_loss == "cv2"
    assert config.contrastive_weight == config.balance_weight == 0.01 and config.z_loss_weight == 0.0


def test_expert_rank_and_scaling_use_per_expert_rank():
    config = MoELoRAConfig(r=32, num_experts=8, lora_alpha=64)
    assert config.expert_rank == 4
    assert config.scaling == 16.0                       # alpha / s, not alpha / r
    lora = MoELoRAConfig(r=8, num_experts=1, top_k=1, lora_alpha=16)
    assert lora.scaling == 2.0                          # N = 1: LoRA's alpha / r


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(r=6, num_experts=4), "r"),
        (dict(r=0), "r"),
        (dict(r=8.0), "r"),
        (dict(num_experts=0), "num_experts"),
        (dict(top_k=5, num_experts=4, r=8), "top_k"),
        (dict(top_k=0), "top_k"),
        (dict(router="switch"), "router"),
        (dict(balance_loss="l2"), "balance_loss"),
        (dict(aux_reduction="max"), "aux_reduction"),
        (dict(contrastive_kernel="inductor"), "contrastive_kernel"),
        (dict(contrastive_compact_cpu="yes"), "contrastive_compact_cpu"),
        (dict(contrastive_weight=-0.01), "contrastive_weight"),
        (dict(balance_weight=-1.0), "balance_weight"),
        (dict(z_loss_weight=-1e-3), "z_loss_weight"),
        (dict(lora_alpha=-1.0), "lora_alpha"),
        (dict(contrastive_weight=math.nan), "contrastive_weight"),
        (dict(balance_weight=math.inf), "balance_weight"),
        (dict(contrastive_temperature=0.0), "contrastive_temperature"),
        (dict(contrastive_queue_size=0), "contrastive_queue_size"),
        (dict(lora_dropout=1.0), "lora_dropout"),
        (dict(lora_dropout=1.5), "lora_dropout"),
        (dict(lora_dropout=-0.1), "lora_dropout"),
        (dict(target_modules=[]), "target_modules"),
        (dict(target_modules=""), "target_modules"),
        (dict(target_modules=["q_proj", ""]), "target_modules"),
    ],
)
def test_bad_config_raises_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"MoELoRAConfig\.{field}="):
        MoELoRAConfig(**overrides)


@pytest.mark.parametrize("router", ["topk", "dense", "noisy", "random"])
def test_every_router_and_balance_loss_is_accepted(router):
    for balance in ("cv2", "switch"):
        weight = 0.0 if (router, balance) == ("dense", "switch") else 0.01   # that pair is a constant: refused
        assert MoELoRAConfig(router=router, balance_loss=balance, balance_weight=weight).router == router


def test_tuple_targets_become_a_list_and_regex_string_is_kept():
    assert MoELoRAConfig(target_modules=("q_proj", "v_proj")).target_modules == ["q_proj", "v_proj"]
    assert MoELoRAConfig(target_modules=r".*\.q_proj").target_modules == r".*\.q_proj"


def test_dict_round_trip():
    config = MoELoRAConfig(r=16, num_experts=4, router="noisy", balance_loss="switch", aux_reduction="mean")
    assert MoELoRAConfig.from_dict(config.to_dict()) == config


def test_from_dict_refuses_unknown_key():
    with pytest.raises(ValueError, match="num_expert"):
        MoELoRAConfig.from_dict({"r": 8, "num_expert": 4})


def test_rank_one_experts_with_contrastive_loss_warn():
    with pytest.warns(UserWarning, match="per-expert rank 1"):
        MoELoRAConfig(r=8, num_experts=8, contrastive_weight=0.01)
