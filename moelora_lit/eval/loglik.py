"""Log-likelihood of continuations, batched: lm-evaluation-harness's ``loglikelihood`` without its per-request loop.

Tokenisation follows the harness's causal ``_encode_pair`` (``joint=True``): trailing spaces of the context move to
the continuation, context + continuation is encoded whole and the continuation is what follows the context's own
tokens. ``joint=False`` encodes them apart (context with special tokens, continuation without), as the training
data does (:func:`moelora_lit.data.batching.encode_rows`), for the ``training`` prompt.

Options that share their context (every task but WinoGrande) share one forward of it: the contexts of a batch of
questions go through the decoder once (left padded), their KV cache is repeated once per option and the options
(``continuation[:-1]``, right padded) follow it; the context's last position predicts each option's first token.
Otherwise (:func:`continuation_logliks`) sequences ``(context + continuation)[:-1]`` are left padded so that every
continuation ends at the last position. Either way only the scored positions go through the LM head, as one
contiguous (S, H) matrix, and position ids follow the attention mask, so padding changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from moelora_lit.eval.choices import Requests
from moelora_lit.inject import moelora_layers, set_token_mask


def _mark_tokens(model: nn.Module, mask: Tensor | None) -> None:
    """MoELoRA layers: routing statistics over real tokens only; a plain model (zero-shot) has nothing to tell."""
    if next(moelora_layers(model), None) is not None:
        set_token_mask(model, mask)


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
    _mark_tokens(model, mask)
    try:
        logits = _scored_logits(model, input_ids, mask, position_ids, scored)                  # (S, V)
    finally:
        _mark_tokens(model, None)
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


@torch.no_grad()
def shared_context_logliks(model: nn.Module, contexts: Sequence[list[int]], options: Sequence[Sequence[list[int]]],
                           pad_token_id: int) -> list[list[float]]:
    """Summed log-probability of each option after its question's context, the context computed once.

    Args:
        model: a causal LM with a decoder (``model.base_model``) that returns a KV cache, and an LM head.
        contexts: per question, the context ids (non-empty).
        options: per question, each option's continuation ids (non-empty).
    """
    decoder, head = model.base_model, model.get_output_embeddings()
    device = next(model.parameters()).device
    counts = [len(o) for o in options]
    conts = [c for o in options for c in o]
    if any(not c for c in conts) or any(not c for c in contexts):
        raise ValueError("an empty context or continuation")
    width, keep = max(len(c) for c in contexts), max(len(c) for c in conts) - 1
    ctx_ids = torch.full((len(contexts), width), pad_token_id, dtype=torch.long)                # (B, W) left padded
    ctx_mask = torch.zeros((len(contexts), width), dtype=torch.long)                            # (B, W)
    for i, c in enumerate(contexts):
        ctx_ids[i, width - len(c):], ctx_mask[i, width - len(c):] = torch.as_tensor(c), 1
    opt_ids = torch.full((len(conts), max(keep, 1)), pad_token_id, dtype=torch.long)          # (S, K) right padded
    opt_mask = torch.zeros((len(conts), max(keep, 1)), dtype=torch.long)                        # (S, K)
    target = torch.zeros((len(conts), keep + 1), dtype=torch.long)                              # (S, 1 + K)
    for s, c in enumerate(conts):
        opt_ids[s, :len(c) - 1], opt_mask[s, :len(c) - 1] = torch.as_tensor(c[:-1], dtype=torch.long), 1
        target[s, :len(c)] = torch.as_tensor(c)
    scored = torch.arange(keep + 1)[None] < torch.tensor([len(c) for c in conts])[:, None]     # (S, 1 + K)
    ctx_ids, ctx_mask, opt_ids, opt_mask, target, scored = (
        x.to(device) for x in (ctx_ids, ctx_mask, opt_ids, opt_mask, target, scored))
    owner = torch.repeat_interleave(torch.arange(len(contexts), device=device),
                                    torch.tensor(counts, device=device))                       # (S,) question
    try:
        _mark_tokens(model, ctx_mask)
        first = decoder(input_ids=ctx_ids, attention_mask=ctx_mask, position_ids=(ctx_mask.cumsum(-1) - 1).clamp_min(0),
                        use_cache=True)
        hidden = first.last_hidden_state[:, -1][owner][:, None]                                # (S, 1, H)
        if keep > 0:
            cache = first.past_key_values
            cache.batch_select_indices(owner)
            _mark_tokens(model, opt_mask)
            positions = ctx_mask.sum(-1)[owner][:, None] + torch.arange(keep, device=device)    # (S, K)
            rest = decoder(input_ids=opt_ids, attention_mask=torch.cat([ctx_mask[owner], opt_mask], -1),
                           position_ids=positions, past_key_values=cache, use_cache=True).last_hidden_state
            hidden = torch.cat([hidden, rest], 1)                                               # (S, 1 + K, H)
    finally:
        _mark_tokens(model, None)
    logits = head(hidden[scored].contiguous()).float()                                          # (N, V)
    cap = getattr(model.config, "final_logit_softcapping", None)
    logits = logits if cap is None else torch.tanh(logits / cap) * cap
    picked = logits.gather(-1, target[scored][:, None]).squeeze(-1) - logits.logsumexp(-1)     # (N,)
    per_token = torch.zeros(scored.shape, dtype=picked.dtype, device=picked.device)             # (S, 1 + K)
    per_token[scored] = picked
    values = per_token.sum(-1).tolist()
    return [values[sum(counts[:i]):sum(counts[:i + 1])] for i in range(len(counts))]


def score_questions(model: nn.Module, tokenizer: Any, questions: Sequence[Requests], joint: bool = True,
                    max_sequences: int = 64, shared_prefix: bool = True) -> list[list[float]]:
    """Log-likelihood of every option of every question. Questions of similar length are batched, whole, up to
    ``max_sequences`` option sequences per forward; with ``shared_prefix`` a context shared by a question's options
    is computed once (:func:`shared_context_logliks`)."""
    encoded = [[encode_pair(tokenizer, c, x, joint) for c, x in zip(q.contexts, q.continuations, strict=True)]
               for q in questions]
    out: list[list[float]] = [[] for _ in encoded]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prefix = _prefix_token(tokenizer) if any(not a for q in encoded for a, _ in q) else None
    can_share = shared_prefix and getattr(model, "base_model", model) is not model
    shared = [can_share and all(a == q[0][0] and a for a, _ in q) for q in encoded]

    def flush(chunk: list[int], share: bool) -> None:
        if share:
            values = shared_context_logliks(model, [encoded[i][0][0] for i in chunk],
                                            [[b for _, b in encoded[i]] for i in chunk], pad)
            out_rows = dict(zip(chunk, values, strict=True))
        else:
            flat = continuation_logliks(model, [p for i in chunk for p in encoded[i]], pad, prefix).tolist()
            out_rows = {}
            for i in chunk:
                out_rows[i], flat = flat[:len(encoded[i])], flat[len(encoded[i]):]
        for i, values in out_rows.items():
            out[i] = values

    for share in (True, False):
        order = sorted((i for i in range(len(encoded)) if shared[i] == share),
                       key=lambda i: max(len(a) + len(b) for a, b in encoded[i]))
        chunk: list[int] = []
        for i in order:
            if chunk and sum(len(encoded[j]) for j in chunk) + len(encoded[i]) > max_sequences:
                flush(chunk, share)
                chunk = []
            chunk.append(i)
        if chunk:
            flush(chunk, share)
    return out


def picks(logliks: Sequence[float], norm_lengths: Sequence[int]) -> tuple[int, int]:
    """``acc``'s pick (highest summed log-probability) and ``acc_norm``'s (highest per character of the choice);
    ties go to the first option, as ``numpy.argmax``."""
    per_char = [ll / max(n, 1) for ll, n in zip(logliks, norm_lengths, strict=True)]
    return max(range(len(logliks)), key=lambda i: (logliks[i], -i)), max(range(len(per_char)),
                                                                         key=lambda i: (per_char[i], -i))
