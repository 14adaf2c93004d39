"""Log-likelihood of continuations, batched: lm-evaluation-harness's ``loglikelihood`` without its per-request loop.

Tokenisation follows the harness's causal ``_encode_pair`` (``joint=True``): trailing spaces of the context move to
the continuation, context + continuation is encoded whole and the continuation is what follows the context's own
tokens. ``joint=False`` encodes them apart (context with special tokens, continuation without), as the training
data does (:func:`moelora_lit.data.batching.encode_rows`), for the ``training`` prompt.

Sequences ``(context + continuation)[:-1]`` are left padded so that every continuation ends at the last position;
only the last ``max continuation length`` positions go through the LM head (``logits_to_keep``), so the (B, T, V)
logits are never materialised for the prompt. Position ids follow the attention mask, so padding changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from moelora_lit.eval.choices import Requests
from moelora_lit.inject import set_token_mask


def encode_pair(tokenizer: Any, context: str, continuation: str, joint: bool = True) -> tuple[list[int], list[int]]:
    """Token ids of ``context`` and of ``continuation`` after it (see the module docstring)."""
    if not joint:
        return tokenizer(context)["input_ids"], tokenizer(continuation, add_special_tokens=False)["input_ids"]
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = tokenizer(context)["input_ids"] if context else []
    whole = tokenizer(context + continuation)["input_ids"]
    return context_ids, whole[len(context_ids):]


def _prefix_token(tokenizer: Any) -> int:
    """The harness's ``prefix_token_id`` for an empty context: BOS, else EOS."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError("an empty context needs a BOS or EOS token to condition on; the tokenizer has neither")
    return token


@torch.no_grad()
def continuation_logliks(model: nn.Module, pairs: Sequence[tuple[list[int], list[int]]], pad_token_id: int,
                         prefix_token_id: int | None = None) -> Tensor:
    """Summed log-probability of each continuation given its context, in one forward: (n,) float32.

    Args:
        model: a causal LM (``model(input_ids, attention_mask, position_ids, logits_to_keep)``).
        pairs: ``(context ids, continuation ids)``; an empty context is conditioned on ``prefix_token_id``.
        pad_token_id: id written into padding positions (masked out).
    """
    seqs, targets = [], []
    for ctx, cont in pairs:
        if not cont:
            raise ValueError("a continuation encodes to no tokens")
        if not ctx:
            if prefix_token_id is None:
                raise ValueError("an empty context needs prefix_token_id")
            ctx = [prefix_token_id]
        seqs.append((ctx + cont)[:-1])
        targets.append(cont)
    device = next(model.parameters()).device
    width, keep = max(len(s) for s in seqs), max(len(t) for t in targets)
    input_ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)                  # (B, T) left padded
    mask = torch.zeros((len(seqs), width), dtype=torch.long)                                    # (B, T)
    target = torch.zeros((len(seqs), keep), dtype=torch.long)                                   # (B, K) right aligned
    scored = torch.zeros((len(seqs), keep), dtype=torch.bool)                                   # (B, K)
    for i, (s, t) in enumerate(zip(seqs, targets, strict=True)):
        input_ids[i, width - len(s):] = torch.as_tensor(s)
        mask[i, width - len(s):] = 1
        target[i, keep - len(t):] = torch.as_tensor(t)
        scored[i, keep - len(t):] = True
    input_ids, mask, target, scored = (x.to(device) for x in (input_ids, mask, target, scored))
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)                                           # (B, T)
    set_token_mask(model, mask)  # MoELoRA layers: routing statistics over real tokens only
    try:
        logits = _scored_logits(model, input_ids, mask, position_ids, scored)                  # (S, V)
    finally:
        set_token_mask(model, None)
    logits = logits.float()
    picked = logits.gather(-1, target[scored][:, None]).squeeze(-1) - logits.logsumexp(-1)     # (S,)
    per_token = torch.zeros(scored.shape, dtype=picked.dtype, device=picked.device)             # (B, K)
    per_token[scored] = picked
    return per_token.sum(-1)                                                                    # (B,)


def _scored_logits(model: nn.Module, input_ids: Tensor, mask: Tensor, position_ids: Tensor,
                   scored: Tensor) -> Tensor:
    """Logits (S, V) of the S scored positions only: the decoder's hidden states at those positions through the
    LM head as one contiguous (S, H) matrix (a sliced (B, K, H) input made CPU matmuls copy the head per row)."""
    keep = scored.shape[1]
    decoder, head = getattr(model, "base_model", model), model.get_output_embeddings()
    if decoder is model or head is None:  # no separate decoder: the full forward, last positions
        return model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False,
                     logits_to_keep=keep).logits[:, -keep:][scored]
    hidden = decoder(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                     use_cache=False).last_hidden_state                                         # (B, T, H)
    logits = head(hidden[:, -keep:][scored].contiguous())                                       # (S, V)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap


def score_questions(model: nn.Module, tokenizer: Any, questions: Sequence[Requests], joint: bool = True,
                    max_sequences: int = 64) -> list[list[float]]:
    """Log-likelihood of every option of every question; each question's options share one forward, and
    questions of similar length are batched up to ``max_sequences`` sequences per forward."""
    encoded = [[encode_pair(tokenizer, c, x, joint) for c, x in zip(q.contexts, q.continuations, strict=True)]
               for q in questions]
    order = sorted(range(len(encoded)), key=lambda i: max(len(a) + len(b) for a, b in encoded[i]))
    out: list[list[float]] = [[] for _ in encoded]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prefix = _prefix_token(tokenizer) if any(not a for q in encoded for a, _ in q) else None
    chunk: list[int] = []

    def flush() -> None:
        pairs = [p for i in chunk for p in encoded[i]]
        values = continuation_logliks(model, pairs, pad, prefix).tolist()
        for i in chunk:
            out[i], values = values[:len(encoded[i])], values[len(encoded[i]):]
        chunk.clear()

    for i in order:
        if chunk and sum(len(encoded[j]) for j in chunk) + len(encoded[i]) > max_sequences:
            flush()
        chunk.append(i)
    if chunk:
        flush()
    return out


def picks(logliks: Sequence[float], norm_lengths: Sequence[int]) -> tuple[int, int]:
    """``acc``'s pick (highest summed log-probability) and ``acc_norm``'s (highest per character of the choice);
    ties go to the first option, as ``numpy.argmax``."""
    per_char = [ll / max(n, 1) for ll, n in zip(logliks, norm_lengths, strict=True)]
    return max(range(len(logliks)), key=lambda i: (logliks[i], -i)), max(range(len(per_char)),
                                                                         key=lambda i: (per_char[i], -i))
