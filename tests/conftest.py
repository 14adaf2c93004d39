"""Shared test helpers: tiny random Hugging Face models built from their config classes (no downloads).

Plain functions (import them with ``from conftest import tiny_llama``) and thin fixtures around them:

- ``tiny_model(arch, seed=0, **config_overrides)``: a fresh random model of one of :data:`ARCHITECTURES`,
  in eval mode; the same ``seed`` always gives bit-identical base weights.
- ``tiny_llama(seed=0, **config_overrides)``: the Llama one (hidden 64, 2 layers, 4 heads, 2 KV heads).
- ``token_batch(...)``: ``{"input_ids", "attention_mask", "labels"}`` for those models.
- ``adapter_config(**overrides)``: a small, deterministic :class:`MoELoRAConfig` (r=8, 4 experts, top-2,
  no dropout) for tests.
- ``randomize_adapter(model, seed)``: give every ``lora_B`` (and router) random non-zero values, so an
  injected model no longer equals its base (for round trips and gradient checks).
"""

from __future__ import annotations

import os

# The compiled CPU contrastive kernel (moelora_lit/kernels.py) costs a compile per layer shape and process: 2-5 s
# each, which takes the suite from about 2.5 to 8 minutes on a cold Inductor cache. Tests (and the subprocesses they
# start) run the default contrastive_kernel="auto" as "attention" through the kernel's documented environment
# override, unless marked ``compiled_kernel``; the kernel's own tests set contrastive_kernel explicitly.
os.environ.setdefault("MOELORA_COMPILE_CONTRASTIVE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from moelora_lit import MoELoRAConfig, MoELoRALinear, moelora_layers  # noqa: E402

# Tiny matrices: one intra-op thread is ~10x faster than two on a shared 2-core machine (no thread contention).
torch.set_num_threads(1)

VOCAB = 128
_TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
_DECODER = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **_TOKENS)

# name -> (transformers config class, config kwargs, target_modules that make sense for it); all have
# NUM_LAYERS layers. transformers is imported lazily so tests that need no model start fast.
ARCHITECTURES: dict[str, tuple[str, dict, list[str]]] = {
    "llama": ("LlamaConfig", _DECODER, ["q_proj", "v_proj"]),
    "mistral": ("MistralConfig", _DECODER, ["q_proj", "v_proj"]),
    "qwen2": ("Qwen2Config", _DECODER, ["q_proj", "v_proj"]),
    "phi3": ("Phi3Config", _DECODER, ["qkv_proj"]),                   # fused q/k/v projection
    "phi": ("PhiConfig", _DECODER, ["q_proj", "v_proj", "dense"]),     # `dense` is the attention output
    "gpt2": ("GPT2Config", dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                              **_TOKENS), ["c_attn"]),                 # transformers' Conv1D, weight in x out
}
NUM_LAYERS = 2


def tiny_model(arch: str = "llama", seed: int = 0, **overrides) -> nn.Module:
    """A tiny random causal LM of ``arch`` (see :data:`ARCHITECTURES`) in eval mode; weights depend on ``seed`` only."""
    import transformers

    config_name, kwargs, _ = ARCHITECTURES[arch]
    config = getattr(transformers, config_name)(**{**kwargs, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    return model.eval()


def tiny_llama(seed: int = 0, **overrides) -> nn.Module:
    """``LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, ...)``."""
    return tiny_model("llama", seed, **overrides)


def target_modules(arch: str) -> list[str]:
    """Sensible ``target_modules`` for ``arch``."""
    return list(ARCHITECTURES[arch][2])


def token_batch(batch: int = 2, seq: int = 8, seed: int = 0, pad: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids (never the pad id 0) with ``pad`` right-padded positions in every row but the first."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, seq), generator=generator)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    if pad:
        attention_mask[1:, seq - pad:] = 0
        input_ids[1:, seq - pad:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def adapter_config(**overrides) -> MoELoRAConfig:
    """A small deterministic adapter config for tests (override any field)."""
    values = dict(r=8, num_experts=4, top_k=2, lora_alpha=16.0, lora_dropout=0.0,
                  target_modules=["q_proj", "v_proj"], contrastive_queue_size=16)
    values.update(overrides)
    return MoELoRAConfig(**values)


@torch.no_grad()
def randomize_adapter(model: nn.Module, seed: int = 1) -> None:
    """Random non-zero ``lora_B`` (and fresh ``lora_A`` / router) weights in every MoELoRA layer."""
    generator = torch.Generator().manual_seed(seed)
    for _, layer in moelora_layers(model):
        for name, param in layer.named_parameters():
            if name.split(".", 1)[0] in MoELoRALinear.adapter_module_names:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def trainable_names(model: nn.Module) -> list[str]:
    return [name for name, param in model.named_parameters() if param.requires_grad]


@pytest.fixture
def llama() -> nn.Module:
    """A fresh tiny Llama (seed 0, eval mode)."""
    return tiny_llama()


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    """A (2, 8) token batch with two padded positions in the second row."""
    return token_batch(pad=2)


@pytest.fixture(autouse=True)
def _compiled_kernel_when_marked(request, monkeypatch):
    """Tests marked ``compiled_kernel`` run contrastive_kernel="auto" as users get it: compiled on CPU."""
    if request.node.get_closest_marker("compiled_kernel") is not None:
        monkeypatch.delenv("MOELORA_COMPILE_CONTRASTIVE", raising=False)
