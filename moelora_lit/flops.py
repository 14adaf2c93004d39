"""Arithmetic of a training step, counted: adapter and base-model FLOPs per token (pure functions).

Conventions (every count is per token of the batch, padding included, since every layer runs on every position):

- A ``(T x a) @ (a x b)`` matmul is ``2*T*a*b`` FLOPs forward.
- Backward of a matmul with a trainable weight is 2x its forward (input gradient + weight gradient); with a frozen
  weight it is 1x (input gradient only). Every linear is counted as needing its input gradient, as if the
  embeddings required grad; with frozen embeddings torch skips it for the first block's q/k/v projections (and their
  LoRA A), which this count does not model.
- ``matmul`` in a result is what ``torch.utils.flop_counter.FlopCounterMode`` sees: dense matmuls only.
  Elementwise work (gating, dropout, softmax, top-k, the activation) is not counted, except in the auxiliary terms,
  where it is counted approximately (one FLOP per elementwise op) because it is most of their work.

Two counts of an adapter:

- method's own work (``executed=False``, the default, and what ``benchmarks/bench.py`` uses for its FLOP ratio and
  ``efficiency_vs_peft_lora``): only the experts a token is routed to run (top-k for sparse routers, all N for
  dense and random ones); FlyLoRA's B over its k active ranks.
- executed (``executed=True``): what the package's layers run. The layouts in ``dense_layouts`` (by default those
  of ``MoELoRALinear``) compute every expert densely: ``MoELoRALinear`` runs A over all its rows and B over all its
  columns and applies the gates in between (FlyLoRA: B over all r ranks). MixLoRA's FFN linears (``ffn_expert``)
  run only the selected experts (the (token, slot) pairs sorted by expert, one matmul pair per expert), so their
  executed count is the method's own. ``tests/test_flops.py`` holds this count to ``FlopCounterMode``.

Per-module arithmetic (``in -> out``, rank ``r``, N experts, k = top-k), forward:

- router (topk, dense, noisy): ``2*in*N`` (noisy: twice, the noise projection); trainable. random, implicit (FlyLoRA)
  and none (PEFT LoRA): 0. A block router (MixLoRA) ``2*hidden*N`` per block.
- slices (MoELoRA, LoRA): active ranks ``m*r/N`` with m active experts: ``2*in*m*r/N + 2*m*r/N*out``.
- independent (LoRAMoE, MoLA) and ffn_expert (MixLoRA's FFN linears): ``m * (2*in*r + 2*r*out)``.
- shared_a (HydraLoRA): ``2*in*r + m*2*r*out``.
- fly (FlyLoRA): frozen A ``2*in*r`` (backward 1x), trainable B ``2*k*out`` (executed: ``2*r*out``).
- MixLoRA block: the frozen down projection runs once per selected expert (the activation sits before it), so
  ``(k - 1) * 2*hidden*intermediate`` beyond the base model's one run (frozen: backward 1x). The frozen gate and up
  projections do not depend on the expert and run once, as the package computes them; the reference implementation
  (MoE-PEFT) runs the whole frozen FFN per expert: ``share_ffn_inputs=False`` counts ``(k - 1) * 3`` runs.

Auxiliary terms (per module with a router, per token):

- contrastive (weight > 0; layouts slices, independent, ffn_expert; representation width d = per-expert rank):
  anchors per token m * real-token fraction; each anchor scores N x queue entries: logits ``2*N*Q*d`` and the
  softmax-weighted queue mean for the closed-form gradient ``2*N*Q*d`` (matmuls), plus about ``3*N*Q`` elementwise
  (scale, exp, sum) and ``4*d`` for the gradient.
- balance (weight > 0): ``4*N`` (cv2, localized: importance sums and their gradient), ``10*N`` (switch,
  switch_topk: full softmax, shares and their gradient); FlyLoRA's bias update ``r`` (counting picks). z-loss
  (weight > 0): ``4*N + 4``.
"""

from __future__ import annotations

from typing import Any

AUX_KEYS = ("contrastive_weight", "contrastive_queue_size", "balance_weight", "balance_loss", "z_loss_weight",
            "real_token_fraction")
TRAINED_ROUTERS = ("topk", "dense", "noisy", "block")
ALL_EXPERT_ROUTERS = ("dense", "random")  # every gate is non-zero: every expert runs
CONTRASTIVE_LAYOUTS = ("slices", "independent", "ffn_expert")
# Computed densely by the package's layers: A and B over every expert's ranks, gates applied between (MoELoRALinear).
# MixLoRA's FFN experts (ffn_expert) run the selected experts only.
DENSE_LAYOUTS = ("slices", "independent", "shared_a", "fly")


def matmul(tokens: float, a: int, b: int) -> float:
    """Forward FLOPs of a ``(tokens x a) @ (a x b)`` matmul."""
    return 2.0 * tokens * a * b


def _linear(fwd: float, trainable: bool) -> tuple[float, float]:
    """(forward, backward) of a matmul: backward 2x with a trainable weight, 1x with a frozen one."""
    return fwd, (2.0 if trainable else 1.0) * fwd


def aux_settings(description: dict, settings: dict | None = None) -> dict:
    """The auxiliary-term settings: ``description["config"]`` (or ``["adapter"]``), then top-level keys of
    ``description``, then ``settings``; later ones win. Missing weights count as 0."""
    merged: dict[str, Any] = {}
    for source in (description.get("config"), description.get("adapter"), description, settings):
        if isinstance(source, dict):
            merged.update({k: source[k] for k in AUX_KEYS if k in source})
    return merged


def _active(module: dict, executed: bool, dense_layouts: tuple[str, ...]) -> int:
    """How many experts of ``module`` run for one token."""
    n = int(module.get("experts") or 1)
    if module.get("router") in ALL_EXPERT_ROUTERS or (executed and module.get("layout") in dense_layouts):
        return n
    return min(int(module.get("top_k") or n), n)


def module_flops(module: dict, executed: bool = False, dense_layouts: tuple[str, ...] = DENSE_LAYOUTS) -> dict:
    """Forward and backward matmul FLOPs per token of one wrapped linear (router and experts), see the module doc."""
    fan_in, fan_out, r = int(module["in"]), int(module["out"]), int(module["rank"])
    n, layout, router = int(module.get("experts") or 1), module.get("layout", "slices"), module.get("router")
    m = _active(module, executed, dense_layouts)
    parts: list[tuple[float, float]] = []
    if layout == "slices":
        ranks = m * r // n
        parts += [_linear(matmul(1, fan_in, ranks), True), _linear(matmul(1, ranks, fan_out), True)]
    elif layout in ("independent", "ffn_expert"):
        parts += [_linear(m * (matmul(1, fan_in, r) + matmul(1, r, fan_out)), True)]
    elif layout == "shared_a":
        parts += [_linear(matmul(1, fan_in, r), True), _linear(m * matmul(1, r, fan_out), True)]
    elif layout == "fly":
        k = r if executed and "fly" in dense_layouts else min(int(module.get("top_k") or r), r)
        parts += [_linear(matmul(1, fan_in, r), False), _linear(matmul(1, k, fan_out), True)]
    else:
        raise ValueError(f"adapter_flops_per_token: unknown layout {layout!r} in module {module.get('name')!r}")
    experts = (sum(f for f, _ in parts), sum(b for _, b in parts))
    routers = 0 if router not in ("topk", "dense", "noisy") else 2 if router == "noisy" else 1
    route = _linear(routers * matmul(1, fan_in, n), True)
    return {"experts_forward": experts[0], "experts_backward": experts[1],
            "router_forward": route[0], "router_backward": route[1]}


def _aux_flops(module: dict, aux: dict) -> dict:
    """Contrastive, balance and z-loss FLOPs per token of one router (see the module doc)."""
    n, r, router = int(module.get("experts") or 1), int(module.get("rank") or 0), module.get("router")
    layout = module.get("layout", "slices")
    out = {"contrastive": 0.0, "balance": 0.0, "z": 0.0}
    if float(aux.get("contrastive_weight") or 0) > 0 and layout in CONTRASTIVE_LAYOUTS:
        d = r // n if layout == "slices" else r
        q = int(aux.get("contrastive_queue_size") or 128)
        anchors = _active(module, False, ()) * float(aux.get("real_token_fraction", 1.0))
        out["contrastive"] = anchors * (2 * matmul(1, d, n * q) + 3.0 * n * q + 4.0 * d)
    if router == "implicit":
        out["balance"] = float(r)  # FlyLoRA's per-rank bias update: counting each rank's picks
    elif router in TRAINED_ROUTERS:
        if float(aux.get("balance_weight") or 0) > 0:
            out["balance"] = (10.0 if str(aux.get("balance_loss")).startswith("switch") else 4.0) * n
        if float(aux.get("z_loss_weight") or 0) > 0:
            out["z"] = 4.0 * n + 4.0
    return out


def adapter_flops_per_token(description: dict, settings: dict | None = None, *, executed: bool = False,
                            dense_layouts: tuple[str, ...] = DENSE_LAYOUTS, share_ffn_inputs: bool = True) -> dict:
    """Forward + backward FLOPs per token of an adapter, from ``python -m moelora_lit describe``'s JSON.

    Args:
        description: ``{"modules": [{"in", "out", "experts", "rank", "top_k", "layout", "router"}, ...],
            "routers": [{"experts", "hidden"}, ...], "blocks": [{"hidden", "intermediate", "experts", "top_k"}]}``
            (routers and blocks: MixLoRA's per-block routers and FFN experts). ``router`` of a module is ``topk``,
            ``dense``, ``noisy``, ``random``, ``implicit``, ``block`` or ``none`` (PEFT LoRA). ``rank`` is the
            method's own rank (total for slices and fly, per expert for independent and ffn_expert, the shared A's
            for shared_a).
        settings: the auxiliary settings (``contrastive_weight``, ``contrastive_queue_size``, ``balance_weight``,
            ``balance_loss``, ``z_loss_weight``, ``real_token_fraction``: the share of positions that are real
            tokens, whose anchors the contrastive loss scores); also read from the description, see
            :func:`aux_settings`.
        executed: count what the package's layers run (every expert of the ``dense_layouts`` layouts) instead of
            the method's own work.
        share_ffn_inputs: MixLoRA's frozen gate and up projections run once per token (False: once per selected
            expert, as the reference implementation runs them).

    Returns:
        FLOPs per token: ``router``, ``experts``, ``ffn_reruns`` (MixLoRA's extra frozen FFN runs), ``contrastive``,
        ``balance``, ``z`` (each forward + backward), ``matmul`` (router + experts + ffn_reruns: what a dense-matmul
        counter sees), ``forward``, ``backward`` (matmul parts only) and ``total`` (everything).
    """
    aux = aux_settings(description, settings)
    out = dict.fromkeys(("router", "experts", "ffn_reruns", "contrastive", "balance", "z", "forward", "backward"), 0.0)
    for module in description.get("modules", []):
        f = module_flops(module, executed, dense_layouts)
        out["router"] += f["router_forward"] + f["router_backward"]
        out["experts"] += f["experts_forward"] + f["experts_backward"]
        out["forward"] += f["router_forward"] + f["experts_forward"]
        out["backward"] += f["router_backward"] + f["experts_backward"]
        if module.get("router") != "block":  # a block's linears share its router, counted below
            for key, value in _aux_flops(module, aux).items():
                out[key] += value
    blocks = description.get("blocks", [])
    routers = description.get("routers") or [{"experts": b["experts"], "hidden": b["hidden"]} for b in blocks]
    for router in routers:
        fwd, bwd = _linear(matmul(1, int(router["hidden"]), int(router["experts"])), True)
        out["router"] += fwd + bwd
        out["forward"] += fwd
        out["backward"] += bwd
        block_like = {"experts": router["experts"], "router": "block", "layout": "block", "rank": 0}
        for key, value in _aux_flops(block_like, aux).items():
            out[key] += value
    for block in blocks:
        n = int(block["experts"])
        runs = min(int(block.get("top_k") or n), n)     # the package's block too runs W2 for the selected experts only
        frozen = 1 if share_ffn_inputs or executed else 3
        fwd, bwd = _linear((runs - 1) * frozen * matmul(1, int(block["hidden"]), int(block["intermediate"])), False)
        out["ffn_reruns"] += fwd + bwd
        out["forward"] += fwd
        out["backward"] += bwd
    out["matmul"] = out["router"] + out["experts"] + out["ffn_reruns"]
    out["total"] = out["matmul"] + out["contrastive"] + out["balance"] + out["z"]
    return out


def base_flops_per_token(config: Any, seq_len: int, backward: bool = True) -> dict:
    """Matmul FLOPs per token of a frozen decoder-only model (Llama-like HF config), forward (+ backward).

    Counts every block's q, k, v, o, gate, up and down projections (k and v at ``num_key_value_heads``), the
    attention score and value matmuls over the full ``seq_len`` (``2*seq_len*head_dim*heads`` each, as eager and
    math attention compute them; causal masking is not subtracted) and the LM head over every position. Backward:
    1x for the frozen linears (input gradient only), 2x for the attention matmuls (both operands need gradients).
    Embedding lookups, norms, rotary embeddings and the loss are not matmuls and are not counted.
    """
    get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
    hidden, inter, layers = get("hidden_size"), get("intermediate_size"), get("num_hidden_layers")
    heads = get("num_attention_heads")
    kv_heads = get("num_key_value_heads") or heads
    head_dim = get("head_dim") or hidden // heads
    q_width, kv_width = heads * head_dim, kv_heads * head_dim
    linears = layers * (matmul(1, hidden, q_width) + 2 * matmul(1, hidden, kv_width) + matmul(1, q_width, hidden)
                        + 3 * matmul(1, hidden, inter))
    attention = layers * 2 * matmul(1, seq_len, q_width)
    lm_head = matmul(1, hidden, get("vocab_size"))
    forward = linears + attention + lm_head
    back = (linears + 2 * attention + lm_head) if backward else 0.0
    return {"linears": linears, "attention": attention, "lm_head": lm_head, "forward": forward, "backward": back,
            "total": forward + back}


def step_flops(base_per_token: float, adapter_per_token: float, tokens: int) -> float:
    """FLOPs of a training step over ``tokens`` positions (base and adapter, forward and backward)."""
    return tokens * (base_per_token + adapter_per_token)
