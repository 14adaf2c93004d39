"""Batched generation for evaluation (left-padded prompts, KV cache, stop at EOS): greedy or beam search."""

from __future__ import annotations

from typing import Any

import torch

from moelora_lit.inject import set_token_mask


@torch.no_grad()
def generate_texts(module: Any, batch: dict[str, Any], max_new_tokens: int, num_beams: int = 1) -> list[str]:
    """Decode the continuation of each left-padded prompt in ``batch`` (keys ``prompt_input_ids`` and
    ``prompt_attention_mask``); returns the new text only, special tokens removed.

    Args:
        num_beams: 1 for greedy search; more for beam search without sampling (LLM-Adapters' ``evaluate.py``
            uses 4: its temperature / top-p / top-k settings are inert because it never samples).
    """
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    model, tokenizer = module.model, module.tokenizer
    input_ids, attention_mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    # The prefill's padding (generate repeats each prompt num_beams times); cached decoding steps are all real.
    set_token_mask(model, attention_mask.repeat_interleave(num_beams, dim=0))
    output = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False,
        num_beams=num_beams, use_cache=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    set_token_mask(model, None)
    return tokenizer.batch_decode(output[:, input_ids.shape[1]:], skip_special_tokens=True)
