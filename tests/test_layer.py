"""MoELoRALinear and its routers (docs/design.md §1.1-1.3): identity at init, gates, the per-expert formula,
fixed-shape computation (no loop over experts, no host sync)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from conftest import adapter_config
from contrastive_reference import contrastive_loss
from torch import nn
from torch.profiler import profile

from moelora_lit import MoELoRALinear
from moelora_lit.losses import cv2_balance_loss

ROUTERS = ["topk", "dense", "noisy", "random"]
IN, OUT = 16, 12


def make_layer(router: str = "topk", base: nn.Module | None = None, **overrides) -> MoELoRALinear:
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT) if base is None else base
    return MoELoRALinear(base, adapter_config(router=router, target_modules=["layer"], **overrides))


def inputs(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def randomize(layer: MoELoRALinear, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator))


def reference_output(layer: MoELoRALinear, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """docs/design.md §1.1 with an explicit loop over experts: W0 x + sum_i g_i (alpha / s) B_i A_i x."""
    c = layer.config
    s = c.r // c.num_experts
    x_flat = x.reshape(-1, IN)
    out = layer.base_layer(x_flat)
    for i in range(c.num_experts):
        a_i = layer.lora_A.weight[i * s:(i + 1) * s]                   # (s, in)
        b_i = layer.lora_B.weight[:, i * s:(i + 1) * s]                # (out, s)
        out = out + gates[:, i:i + 1] * (c.lora_alpha / s) * (x_flat @ a_i.T @ b_i.T)
    return out.reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("training", [True, False])
def test_output_equals_base_exactly_at_init(router, training):
    layer = make_layer(router, lora_dropout=0.1, contrastive_weight=0.1).train(training)
    assert not layer.lora_B.weight.any() and layer.lora_A.weight.abs().sum() > 0
    x = inputs(2, 5, IN)
    assert torch.equal(layer(x), layer.base_layer(x))


@pytest.mark.parametrize("router", ROUTERS)
def test_parameter_shapes(router):
    layer = make_layer(router, r=8, num_experts=4)
    assert layer.lora_A.weight.shape == (8, IN) and layer.lora_B.weight.shape == (OUT, 8)
    if router == "random":
        assert layer.router is None
        assert not any("router" in name for name, _ in layer.named_parameters())
    else:
        assert layer.router.weight.shape == (4, IN) and layer.router.bias is None
    assert (layer.router_noise is not None) == (router == "noisy")


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_topk_router_keeps_exactly_top_k_largest_logits(top_k):
    layer = make_layer("topk", top_k=top_k).eval()
    x = inputs(3, 7, IN)
    layer(x)
    gates = layer.last_gates
    assert gates.shape == (21, 4) and not gates.requires_grad
    assert ((gates > 0).sum(-1) == top_k).all()
    torch.testing.assert_close(gates.sum(-1), torch.ones(21))
    logits = layer.router(x.reshape(-1, IN))
    largest = torch.zeros_like(gates, dtype=torch.bool).scatter(1, logits.topk(top_k).indices, True)
    assert torch.equal(gates > 0, largest)
    kept = logits.masked_fill(gates == 0, float("-inf")).softmax(-1)
    torch.testing.assert_close(gates, kept)


def test_dense_router_is_softmax_over_all_experts():
    layer = make_layer("dense").eval()
    x = inputs(2, 5, IN)
    layer(x)
    assert (layer.last_gates > 0).all()
    torch.testing.assert_close(layer.last_gates, layer.router(x.reshape(-1, IN)).softmax(-1))


def test_noisy_router_is_sparse_and_random_in_training_and_plain_topk_in_eval():
    layer = make_layer("noisy", top_k=2).train()
    x = inputs(4, 8, IN)
    layer(x)
    first = layer.last_gates
    layer(x)
    assert ((first > 0).sum(-1) == 2).all() and ((layer.last_gates > 0).sum(-1) == 2).all()
    torch.testing.assert_close(first.sum(-1), torch.ones(32))
    assert not torch.equal(first, layer.last_gates)                    # noise is drawn in training
    layer.eval()
    layer(x)
    logits = layer.router(x.reshape(-1, IN))
    kept, chosen = logits.topk(2)
    expected = torch.zeros_like(logits).scatter(1, chosen, kept.softmax(-1))
    torch.testing.assert_close(layer.last_gates, expected)             # no noise in eval


def test_random_router_has_no_trainable_router_and_normalised_random_gates():
    layer = make_layer("random").train()
    x = inputs(2, 5, IN)
    layer(x)
    first = layer.last_gates
    layer(x)
    assert layer.router is None
    assert (first > 0).all()
    torch.testing.assert_close(first.sum(-1), torch.ones(10))
    assert not torch.equal(first, layer.last_gates)


@pytest.mark.parametrize("router", ["topk", "dense", "random"])
def test_forward_equals_per_expert_formula(router):
    layer = make_layer(router, r=8, num_experts=4, lora_alpha=6.0).eval()
    randomize(layer)
    x = inputs(2, 5, IN)
    y = layer(x)
    torch.testing.assert_close(y, reference_output(layer, x, layer.last_gates), atol=1e-5, rtol=1e-5)


def test_a_base_of_another_dtype_gets_the_adapter_delta_in_its_own_dtype():
    """A bf16 base under float32 adapters (the SmolLM2 studies) takes the separate add, not ``addmm``: the output
    stays bf16 and equals the base plus the float32 formula's delta, rounded once."""
    layer = make_layer("topk", base=nn.Linear(IN, OUT).to(torch.bfloat16)).eval()
    randomize(layer)
    assert layer.lora_B.weight.dtype == torch.float32
    x = inputs(2, 5, IN).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    c, s = layer.config, layer.expert_dim
    x_flat = x.reshape(-1, IN).float()
    delta = sum(layer.last_gates[:, i:i + 1] * (c.lora_alpha / s) * (x_flat @ layer.lora_A.weight[i * s:(i + 1) * s].T
                                                                     @ layer.lora_B.weight[:, i * s:(i + 1) * s].T)
                for i in range(c.num_experts))
    expected = layer.base_layer(x).reshape(-1, OUT) + delta.to(torch.bfloat16)
    torch.testing.assert_close(y.reshape(-1, OUT), expected)


def forward_matmuls(layer, x) -> int:
    """Matmul kernels (``mm``, ``addmm``, ``addmm_``) that one forward of ``layer`` runs."""
    with profile() as prof:
        layer(x)
    return sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm", "aten::addmm_"))


@pytest.mark.parametrize("dropout", [0.0, 0.05, 0.2])
def test_router_and_a_share_one_matmul_only_without_dropout(dropout):
    """With gradients on and without dropout the router's logits and A's projection come from one matmul against
    the stacked weights, and B's product is added into the base output by the same GEMM (``addmm``); values and
    every gradient equal the separate computation (float64). Without gradients (decoding) nothing is stacked."""
    layer = make_layer("topk", r=8, num_experts=4, top_k=2, lora_dropout=dropout).double().train()
    randomize(layer)
    x = inputs(3, IN).double().requires_grad_()
    assert forward_matmuls(layer, x) == (3 if dropout == 0 else 4)      # base, stacked, B; or base, A, router, B
    with torch.no_grad():
        assert forward_matmuls(layer.eval(), x) == 4
    layer.train()
    torch.manual_seed(7)
    layer(x).square().sum().backward()
    got = [t.grad.clone() for t in (x, layer.lora_A.weight, layer.router.weight, layer.lora_B.weight)]
    for t in (x, layer.lora_A.weight, layer.router.weight, layer.lora_B.weight):
        t.grad = None
    torch.manual_seed(7)
    dropped = layer.lora_dropout(x)
    a = F.linear(dropped, layer.lora_A.weight)
    logits = F.linear(x, layer.router.weight)
    kept, chosen = logits.topk(2, -1)
    gates = torch.zeros_like(logits).scatter(-1, chosen, kept.softmax(-1))
    mixed = (a.view(3, 4, 2) * gates[..., None] * layer.scaling).reshape(3, -1)
    (layer.base_layer(x) + layer.lora_B(mixed)).square().sum().backward()
    for g, t in zip(got, (x, layer.lora_A.weight, layer.router.weight, layer.lora_B.weight), strict=True):
        torch.testing.assert_close(g, t.grad)


def test_only_the_chosen_experts_receive_gradient():
    layer = make_layer("topk", r=8, num_experts=4, top_k=2).train()
    randomize(layer)
    x = inputs(1, IN)
    layer(x).square().sum().backward()
    chosen = (layer.last_gates[0] > 0).repeat_interleave(2)            # s = 2 rank rows per expert
    grad_a = layer.lora_A.weight.grad.abs().sum(1)
    grad_b = layer.lora_B.weight.grad.abs().sum(0)
    assert (grad_a[chosen] > 0).all() and not grad_a[~chosen].any()
    assert (grad_b[chosen] > 0).all() and not grad_b[~chosen].any()
    assert layer.router.weight.grad.abs().sum() > 0


def test_wraps_transformers_conv1d():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(OUT, IN)                                              # weight (in, out)
    nn.init.normal_(conv.weight)
    nn.init.normal_(conv.bias)
    layer = make_layer("topk", base=conv).eval()
    assert (layer.in_features, layer.out_features) == (IN, OUT)
    x = inputs(2, 5, IN)
    assert torch.equal(layer(x), conv(x))
    randomize(layer)
    torch.testing.assert_close(layer(x), reference_output(layer, x, layer.last_gates), atol=1e-5, rtol=1e-5)


def test_refuses_a_non_linear_base():
    with pytest.raises(TypeError, match="Embedding"):
        MoELoRALinear(nn.Embedding(10, IN), adapter_config(target_modules=["x"]))


def test_aux_losses_only_in_training_with_grad_enabled():
    layer = make_layer("topk", contrastive_weight=0.1, balance_weight=0.1, z_loss_weight=0.1)
    x = inputs(2, 5, IN)
    layer.eval()(x)
    assert layer.aux_losses == {}
    layer.train()
    with torch.no_grad():
        layer(x)
    assert layer.aux_losses == {} and not layer.contrastive_queue_count.any()
    layer(x)
    assert set(layer.aux_losses) == {"contrastive", "balance", "z"}
    random = make_layer("random", contrastive_weight=0.1, balance_weight=0.1, z_loss_weight=0.1).train()
    random(x)
    assert set(random.aux_losses) == {"contrastive"}                    # no router logits to balance
    off = make_layer("topk", contrastive_weight=0.0, balance_weight=0.1).train()
    off(x)
    assert set(off.aux_losses) == {"balance"} and not off.contrastive_queue_count.any()


def test_contrastive_loss_of_a_step_uses_only_earlier_steps():
    layer = make_layer("topk", r=8, num_experts=4, top_k=2, contrastive_weight=1.0,
                       contrastive_queue_size=64, contrastive_temperature=0.5).train()
    x = inputs(2, 5, IN)
    layer(x)
    assert layer.aux_losses["contrastive"].item() == 0.0               # first step: empty queue
    assert not layer.contrastive_queue_count.any()                      # anchors wait for the push after backward
    layer.push_pending()
    assert layer.contrastive_queue_count.sum().item() == 10 * 2 and layer.pending is None
    queue, count = layer.contrastive_queue.clone(), layer.contrastive_queue_count.clone()

    x2 = inputs(2, 5, IN, seed=1)
    layer(x2)
    gates = layer.last_gates
    z = F.normalize(layer.lora_A(x2.reshape(-1, IN)).view(10, 4, 2), dim=-1)
    token, expert = torch.nonzero(gates > 0, as_tuple=True)
    expected = contrastive_loss(z[token, expert], expert, torch.ones(len(token)), queue, count, 0.5)
    got = layer.aux_losses["contrastive"]
    assert got.item() > 0
    torch.testing.assert_close(got, expected)
    assert layer.contrastive_queue_count.sum().item() == 20
    layer(x2)                                                           # no push after backward: the next forward
    assert layer.contrastive_queue_count.sum().item() == 40            # pushes the previous step's anchors first


def test_token_mask_keeps_padding_out_of_queue_and_balance():
    layer = make_layer("topk", contrastive_weight=1.0, balance_weight=1.0, contrastive_queue_size=64).train()
    x = inputs(2, 5, IN)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    layer.token_mask = mask
    layer(x)
    layer.push_pending()
    real = mask.reshape(-1).bool()
    assert torch.equal(layer.last_token_mask, real)
    assert layer.contrastive_queue_count.sum().item() == 7 * 2
    torch.testing.assert_close(layer.aux_losses["balance"], cv2_balance_loss(layer.last_gates[real], torch.ones(7)))
    layer.token_mask = torch.ones(3, 3)                                 # wrong size (e.g. cached decoding): ignored
    layer(x)
    layer.push_pending()
    assert layer.last_token_mask is None
    assert layer.contrastive_queue_count.sum().item() == 7 * 2 + 10 * 2


def op_counts(num_experts: int, router: str = "topk", **overrides) -> Counter:
    """aten ops of one training step, on the eager path (the compiled CPU kernels hide their ops from the profiler)."""
    layer = make_layer(router, r=16, num_experts=num_experts, top_k=2, contrastive_weight=0.1, balance_weight=0.1,
                       z_loss_weight=0.1, contrastive_kernel="attention", **({"lora_dropout": 0.1} | overrides)).train()
    layer.token_mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    x = inputs(2, 6, IN)
    layer(x)                                                            # fill the queues first
    with profile() as prof:
        y = layer(x)
        (y.square().mean() + sum(layer.aux_losses.values())).backward()
    return Counter({event.key: event.count for event in prof.key_averages() if event.key.startswith("aten::")})


MATMULS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::matmul", "aten::linear", "aten::einsum",
           "aten::baddbmm")


@pytest.mark.parametrize("router", ["topk", "random"])
def test_no_python_loop_over_experts(router):
    two, eight = op_counts(2, router), op_counts(8, router)
    assert {op: two[op] for op in MATMULS} == {op: eight[op] for op in MATMULS}
    assert sum(two.values()) == sum(eight.values()), (two - eight) + (eight - two)


SYNC_OPS = {"aten::nonzero", "aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::masked_select"}


@pytest.mark.parametrize("router", ROUTERS)
def test_forward_and_backward_with_contrastive_loss_never_sync_with_host(router):
    # the fixed-shape path devices take; CPU dropout reads its draw's length (free on CPU), devices use F.dropout
    counts = op_counts(4, router, contrastive_compact_cpu=False, lora_dropout=0.0)
    assert counts["aten::mm"] + counts["aten::addmm"] > 0               # the profiler saw the step
    assert not SYNC_OPS & set(counts), sorted(SYNC_OPS & set(counts))


@pytest.mark.compiled_kernel
@pytest.mark.parametrize("router", ["topk", "dense"])
def test_cpu_compaction_of_padding_gives_the_same_loss_gradient_and_queue(router):
    results = []
    for compact in (True, False):
        layer = make_layer(router, contrastive_weight=1.0, contrastive_queue_size=64,
                           contrastive_compact_cpu=compact).train()
        layer.token_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
        for seed in (0, 1):                                              # the second step scores a filled queue
            layer.zero_grad()
            layer(inputs(2, 5, IN, seed=seed))
            layer.aux_losses["contrastive"].backward()
            layer.push_pending()
        results.append((layer.aux_losses["contrastive"].detach(), layer.lora_A.weight.grad.clone(),
                        layer.contrastive_queue.clone(), layer.contrastive_queue_count.clone()))
    assert results[0][0] > 0
    for got, expected in zip(*results, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_contrastive_max_anchors_scores_a_uniform_subset_and_queues_every_anchor():
    full = make_layer("topk", contrastive_weight=1.0, contrastive_queue_size=256).train()
    capped = make_layer("topk", contrastive_weight=1.0, contrastive_queue_size=256, contrastive_max_anchors=6).train()
    x = inputs(4, 8, IN)
    estimates = []
    for layer in (full, capped):
        layer(x)
        layer.push_pending()
        assert int(layer.contrastive_queue_count.sum()) == 4 * 8 * 2          # every anchor still queued
    full(x)
    for seed in range(40):
        torch.manual_seed(seed)
        capped(x)
        capped.pending = None                                                # keep the queue fixed
        estimates.append(float(capped.aux_losses["contrastive"]))
    assert len(set(estimates)) > 1                                           # different subsets per draw
    mean = sum(estimates) / len(estimates)
    assert abs(mean - float(full.aux_losses["contrastive"])) < 0.1 * float(full.aux_losses["contrastive"])
