"""moelora_lit.flops against torch's FlopCounterMode (dense matmuls) on a tiny Llama, and hand counts of the family's
layouts. The contrastive loss is off in the counted steps (its kernel is not a dense matmul the counter sees)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from moelora_lit import MoELoRAConfig, collect_aux_losses, inject_moelora
from moelora_lit.flops import adapter_flops_per_token, base_flops_per_token, matmul

ROOT = Path(__file__).resolve().parents[1]
METHODS = ROOT / "experiments" / "methods"
FAMILY = ["lora", "moelora", "loramoe", "hydralora", "mola", "flylora", "mixlora"]
BATCH, SEQ = 2, 12
TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]


def tiny_llama(layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attn_implementation="eager")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).train()
    for p in model.parameters():
        p.requires_grad_(False)
    # Every linear then needs its input gradient, as the count assumes (see moelora_lit.flops).
    model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
    return model


def in_place_addmm_flop(input_shape, mat1_shape, mat2_shape, *args, out_shape=None, **kwargs) -> int:
    """The in-place GEMMs that the layers run (B's product added into the base output, MixLoRA's per-expert rows)
    do an out-of-place addmm's arithmetic; FlopCounterMode maps only the out-of-place op."""
    (m, k), n = mat1_shape, mat2_shape[1]
    return 2 * m * k * n


IN_PLACE = {torch.ops.aten.addmm_: in_place_addmm_flop}


def counted_step(model) -> int:
    ids = torch.randint(3, 96, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    with FlopCounterMode(display=False, custom_mapping=IN_PLACE) as counter:
        loss = model(input_ids=ids, labels=ids).loss
        if getattr(model, "moelora_config", None) is not None:
            loss = loss + sum(collect_aux_losses(model).values())
        loss.backward()
    return counter.get_total_flops()


def shapes(model) -> dict[str, tuple[int, int]]:
    return {n: (m.in_features, m.out_features) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in TARGETS}


def description(model, **entry) -> dict:
    return {"modules": [{"name": n, "in": i, "out": o, **entry} for n, (i, o) in shapes(model).items()]}


def test_base_model_matches_counter():
    model = tiny_llama()
    expected = base_flops_per_token(model.config, SEQ)["total"] * BATCH * SEQ
    assert counted_step(model) == expected


@pytest.mark.parametrize("router", ["topk", "dense", "noisy", "random"])
def test_moelora_executed_count_matches_counter(router):
    model = tiny_llama()
    desc = description(model, experts=4, rank=8, top_k=2, layout="slices", router=router)
    inject_moelora(model, MoELoRAConfig(r=8, num_experts=4, top_k=2, router=router, target_modules=TARGETS,
                                        contrastive_weight=0.0, balance_weight=0.01, z_loss_weight=0.01))
    adapter = adapter_flops_per_token(desc, executed=True)
    base = base_flops_per_token(model.config, SEQ)["total"]
    assert counted_step(model) == (base + adapter["matmul"]) * BATCH * SEQ
    own = adapter_flops_per_token(desc)
    if router in ("topk", "noisy"):   # the layer runs all 8 ranks; the method needs the 2 chosen experts' 4
        assert own["experts"] == pytest.approx(adapter["experts"] / 2)
    else:
        assert own["experts"] == adapter["experts"]
    assert own["router"] == adapter["router"]


def test_peft_lora_matches_counter():
    from peft import LoraConfig, get_peft_model

    model = tiny_llama()
    desc = description(model, experts=1, rank=8, top_k=1, layout="slices", router="none")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0))
    adapter = adapter_flops_per_token(desc)
    assert adapter == adapter_flops_per_token(desc, executed=True)
    base = base_flops_per_token(model.config, SEQ)["total"]
    assert counted_step(model) == (base + adapter["matmul"]) * BATCH * SEQ


def method_config(name: str) -> MoELoRAConfig:
    data = yaml.safe_load((METHODS / f"{name}.yaml").read_text())
    adapter = data.get("model.adapter") or data["model"]["adapter"]
    return MoELoRAConfig.from_dict({**adapter, "contrastive_weight": 0.0})


@pytest.mark.parametrize("name", FAMILY)
def test_family_executed_count_matches_counter(name):
    """Every method preset (experiments/methods/), as the package's layers run it, through describe's JSON."""
    from moelora_lit.describe import describe_model

    model = tiny_llama(layers=4)          # MoLA: one expert count per quarter of the blocks
    inject_moelora(model, method_config(name))
    adapter = adapter_flops_per_token(describe_model(model), executed=True)
    base = base_flops_per_token(model.config, SEQ)["total"]
    assert counted_step(model) == (base + adapter["matmul"]) * BATCH * SEQ
    own = adapter_flops_per_token(describe_model(model))
    if name in ("moelora", "mola", "flylora"):   # top-k: the linear layers compute every expert
        assert own["matmul"] < adapter["matmul"]
    else:                             # dense routers, one expert, MixLoRA's sorted dispatch: the same work
        assert own["matmul"] == adapter["matmul"]


def test_bench_describer_reads_both_adapters():
    """benchmarks/arithmetic.describe_model: the package's describe (with the config's auxiliary settings) for its
    adapters, the same entries for PEFT LoRA."""
    import sys

    from peft import LoraConfig, get_peft_model

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from arithmetic import describe_model

    model = tiny_llama()
    hand = description(model, experts=4, rank=8, top_k=2, layout="slices", router="topk")
    inject_moelora(model, MoELoRAConfig(r=8, num_experts=4, top_k=2, target_modules=TARGETS))
    got = describe_model(model)
    assert [{k: m[k] for k in hand["modules"][0]} for m in got["modules"]] == hand["modules"]
    assert got["config"]["contrastive_weight"] == 0.01 and adapter_flops_per_token(got)["contrastive"] > 0
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=8, target_modules=TARGETS))
    lora = [{k: v for k, v in m.items() if k != "name"} for m in describe_model(peft_model)["modules"]]
    hand = description(tiny_llama(), experts=1, rank=8, top_k=1, layout="slices", router="none")["modules"]
    assert lora == [{k: v for k, v in m.items() if k != "name"} for m in hand]


def one(**module) -> dict:
    return adapter_flops_per_token({"modules": [{"in": 64, "out": 32, **module}]})


def test_family_layouts_by_hand():
    lora = 2 * matmul(1, 64, 8) + 2 * matmul(1, 8, 32)  # forward + 2x backward = 3x forward
    assert one(experts=1, rank=8, top_k=1, layout="slices", router="none")["total"] == 1.5 * lora
    router = 3 * matmul(1, 64, 4)
    # LoRAMoE: dense router, every one of N = 4 rank-8 experts runs
    assert one(experts=4, rank=8, top_k=4, layout="independent", router="dense")["matmul"] == 4 * 1.5 * lora + router
    # MoLA: top-2 of 4
    assert one(experts=4, rank=8, top_k=2, layout="independent", router="topk")["matmul"] == 2 * 1.5 * lora + router
    # HydraLoRA: one shared A, four B heads
    hydra = 3 * matmul(1, 64, 8) + 4 * 3 * matmul(1, 8, 32) + router
    assert one(experts=4, rank=8, top_k=4, layout="shared_a", router="dense")["matmul"] == hydra
    # FlyLoRA: frozen A over r = 32 (backward 1x), B over k = 8 of 32 ranks (executed: all 32), r picks counted
    fly = one(experts=32, rank=32, top_k=8, layout="fly", router="implicit")
    assert fly["matmul"] == 2 * matmul(1, 64, 32) + 3 * matmul(1, 8, 32) and fly["balance"] == 32
    executed = adapter_flops_per_token({"modules": [{"in": 64, "out": 32, "experts": 32, "rank": 32, "top_k": 8,
                                                     "layout": "fly", "router": "implicit"}]}, executed=True)
    assert executed["matmul"] == 2 * matmul(1, 64, 32) + 3 * matmul(1, 32, 32)


def test_mixlora_block_reruns_the_frozen_ffn():
    hidden, inter, n, k, r = 16, 40, 8, 2, 4
    modules = [{"in": i, "out": o, "experts": n, "rank": r, "top_k": k, "layout": "ffn_expert", "router": "block"}
               for i, o in ((hidden, inter), (hidden, inter), (inter, hidden))]
    desc = {"modules": modules, "blocks": [{"hidden": hidden, "intermediate": inter, "experts": n, "top_k": k,
                                            "rank": r}]}
    got = adapter_flops_per_token(desc, {"balance_weight": 0.01, "balance_loss": "switch"})
    assert got["ffn_reruns"] == (k - 1) * matmul(1, inter, hidden) * 2      # W2 per extra expert, forward + 1x back
    reference = adapter_flops_per_token(desc, share_ffn_inputs=False)       # MoE-PEFT: the whole FFN per expert
    assert reference["ffn_reruns"] == 3 * got["ffn_reruns"]
    assert got["router"] == 3 * matmul(1, hidden, n)                               # one router per block
    assert got["experts"] == k * 3 * (3 * matmul(1, hidden, r) + 3 * matmul(1, r, inter))
    assert got["balance"] == 10 * n and got["contrastive"] == 0


def test_contrastive_term_scales_with_anchors_queue_and_width():
    entry = {"experts": 8, "rank": 32, "top_k": 2, "layout": "slices", "router": "topk"}
    on = adapter_flops_per_token({"modules": [{"in": 64, "out": 64, **entry}], "contrastive_weight": 0.01,
                                  "contrastive_queue_size": 128})
    s, pairs = 4, 2 * 8 * 128                       # per-expert rank, (anchor, entry) pairs per token
    assert on["contrastive"] == pairs * (4 * s + 3) + 2 * 4 * s
    half = adapter_flops_per_token({"modules": [{"in": 64, "out": 64, **entry}]},
                                   {"contrastive_weight": 0.01, "contrastive_queue_size": 128,
                                    "real_token_fraction": 0.5})
    assert half["contrastive"] == on["contrastive"] / 2
    assert adapter_flops_per_token({"modules": [{"in": 64, "out": 64, **entry}]})["contrastive"] == 0
