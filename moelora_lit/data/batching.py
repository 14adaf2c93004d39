"""Tokenization of prompt + response, collation (dynamic padding) and the length-grouped sampler."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler

from moelora_lit.data.prompts import build_prompt

EVAL_LISTS = ("dataset", "task", "answer", "prompt", "instruction", "source_instruction", "index", "response")


def encode_rows(batch: dict[str, list], tokenizer: Any, template: str, max_length: int, train_on_inputs: bool,
                with_prompt: bool) -> dict[str, list]:  # fmt: skip
    """Tokenize a batch of LLM-Adapters rows (a `datasets.Dataset.map` function, batched).

    ``input_ids`` = prompt (with the tokenizer's BOS) + response + EOS, cut to `max_length`; ``labels``
    are the same ids with -100 on the prompt unless `train_on_inputs`. Prompt and response are
    tokenized separately, so the masked prefix is exactly what generation is given. With
    `with_prompt`, also ``prompt_input_ids`` (uncut) and the ``prompt`` text.
    """
    prompts = [build_prompt(template, i, x) for i, x in zip(batch["instruction"], batch["input"], strict=True)]
    prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(batch["output"], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    out: dict[str, list] = {"input_ids": [], "labels": [], "prompt_len": [], "full_len": []}
    for p, r in zip(prompt_ids, response_ids, strict=True):
        ids = p + r + [eos]
        labels = list(ids) if train_on_inputs else [-100] * len(p) + r + [eos]
        out["input_ids"].append(ids[:max_length])
        out["labels"].append(labels[:max_length])
        out["prompt_len"].append(len(p))
        out["full_len"].append(len(ids))
    if with_prompt:
        out["prompt_input_ids"], out["prompt"] = prompt_ids, prompts
    return out


def _eval_default(row: dict[str, Any], key: str) -> Any:
    """An eval row without ``source_instruction`` (every style but ``cloze``) reads its options from its instruction;
    a row built without the datamodule has the ``dataset`` response style."""
    if key == "source_instruction":
        return row["instruction"]
    if key == "response":
        return "dataset"
    raise KeyError(f"an eval row needs '{key}' (one of {EVAL_LISTS})")


def eval_column(batch: dict[str, Any], key: str) -> list[Any]:
    """``batch[key]``; for a batch that lacks it (built without :class:`Collator`), each row's default."""
    if key in batch:
        return batch[key]
    lists = [k for k in EVAL_LISTS if k in batch]  # the rows' own columns, not the batch's tensors
    rows = [dict(zip(lists, values, strict=True)) for values in zip(*(batch[k] for k in lists), strict=True)]
    return [_eval_default(row, key) for row in rows]


def pad(seqs: Sequence[Sequence[int]], value: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest sequence: (B, L) long tensor and its (B, L) attention mask."""
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s) == 0:
            continue
        span = slice(width - len(s), width) if left else slice(0, len(s))
        out[i, span] = torch.as_tensor(s, dtype=torch.long)
        mask[i, span] = 1
    return out, mask


class Collator:
    """Turns a list of tokenized rows into a batch dict (picklable, for DataLoader workers).

    Train: ``input_ids`` / ``attention_mask`` / ``labels`` (B, L), right padded, labels -100 on
    padding, and ``task_group`` (B,) where the rows carry one (``DatasetSpec.task_group``).
    Eval adds ``prompt_input_ids`` / ``prompt_attention_mask`` (B, P), LEFT padded for
    generation, and python lists ``dataset``, ``task``, ``answer``, ``prompt``, ``instruction``,
    ``source_instruction`` (where the options are read from), ``index``, ``response`` (the set's response style).
    """

    def __init__(self, pad_token_id: int, eval_mode: bool) -> None:
        self.pad_token_id, self.eval_mode = pad_token_id, eval_mode

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        input_ids, attention_mask = pad([r["input_ids"] for r in rows], self.pad_token_id)
        labels, _ = pad([r["labels"] for r in rows], -100)
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if "task_group" in rows[0]:                                   # (B,) long: LoRAMoE's localized balance loss
            batch["task_group"] = torch.tensor([r["task_group"] for r in rows], dtype=torch.long)
        if self.eval_mode:
            prompt_ids, prompt_mask = pad([r["prompt_input_ids"] for r in rows], self.pad_token_id, left=True)
            batch["prompt_input_ids"], batch["prompt_attention_mask"] = prompt_ids, prompt_mask
            for key in EVAL_LISTS:
                batch[key] = [r[key] if key in r else _eval_default(r, key) for r in rows]
        return batch


class LengthGroupedSampler(Sampler[int]):
    """Indices ordered so that consecutive `batch_size` chunks have similar lengths.

    Each epoch: shuffle, cut into mega-chunks of ``mega_batches * batch_size`` rows, sort each by
    length (longest first), cut into batches, shuffle the full batches and put the one partial batch
    last, so the DataLoader's chunks coincide with the grouped batches (as HF's LengthGroupedSampler).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, mega_batches: int = 50) -> None:
        self.lengths, self.batch_size, self.seed, self.mega = list(lengths), batch_size, seed, mega_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(len(self.lengths), generator=g).tolist()
        size = self.batch_size * self.mega
        batches: list[list[int]] = []
        for start in range(0, len(perm), size):
            chunk = sorted(perm[start : start + size], key=lambda j: -self.lengths[j])
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        full = [b for b in batches if len(b) == self.batch_size]
        partial = [b for b in batches if len(b) < self.batch_size]
        for k in torch.randperm(len(full), generator=g).tolist():
            yield from full[k]
        for b in partial:
            yield from b
