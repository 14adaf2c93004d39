"""The mixture-of-LoRA family as choices of one layer's parts (docs/design.md §10, ``../shared/methods.md``).

A method is a name plus the parts it defaults to: its expert layout, its placement, and which routers and auxiliary
terms its layout can use. :class:`moelora_lit.config.MoELoRAConfig` reads these tables; the presets in
``experiments/methods/`` set the rest (rank, experts, top-k, weights).

Expert layouts (``r`` is always the method's own rank, as its paper defines it):

- ``slices``: rank slices of one LoRA (MoELoRA): A (r x in), B (out x r), expert i owns r/N rows and columns.
- ``independent``: N LoRAs of rank r each (LoRAMoE, MoLA, MixLoRA's FFN experts): stored as one A (N*r x in) and one
  B (out x N*r), so the forward is the slices layout's, two matmuls for all experts.
- ``shared_a``: one A (r x in) shared by N heads B_i (out x r) (HydraLoRA).
- ``fly``: FlyLoRA: the r ranks are the experts, A is frozen and sparse random, a rank is chosen by the implicit
  top-k of ``A x + d`` (``d`` a balancing bias, a buffer).
"""

from __future__ import annotations

METHODS = ("moelora", "lora", "loramoe", "hydralora", "mola", "flylora", "mixlora")
LAYOUTS = ("slices", "independent", "shared_a", "fly")
PLACEMENTS = ("linear", "ffn_block")
ROUTERS = ("topk", "dense", "noisy", "random", "implicit")

DEFAULT_LAYOUT = {"moelora": "slices", "lora": "slices", "loramoe": "independent", "hydralora": "shared_a",
                  "mola": "independent", "flylora": "fly", "mixlora": "independent"}
DEFAULT_PLACEMENT = {"mixlora": "ffn_block"}

# Which routers a layout can use: the fly layout routes implicitly (no router), the others through a router.
LAYOUT_ROUTERS = {"slices": ("topk", "dense", "noisy", "random"), "independent": ("topk", "dense", "noisy", "random"),
                  "shared_a": ("topk", "dense", "noisy", "random"), "fly": ("implicit",)}

# Layouts whose experts have representations of their own (their rows of A), so the contrastive loss applies.
CONTRASTIVE_LAYOUTS = ("slices", "independent")

# FFN blocks that placement ffn_block accepts: an MLP with these three projections (Llama, Mistral, Qwen2, SmolLM2).
FFN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
