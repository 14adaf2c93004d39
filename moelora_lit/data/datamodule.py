"""`ReasoningDataModule`: named reasoning datasets -> tokenized, response-masked batches.

Rows are read and validated in ``__init__`` (cheap, and before any model is loaded); tokenization
happens in ``setup``. Train batches hold ``input_ids`` / ``attention_mask`` / ``labels`` (right
padded, prompt tokens masked to -100). Eval batches add the prompt alone, left padded, for
generation (``prompt_input_ids`` / ``prompt_attention_mask``) and python lists ``dataset``,
``task``, ``answer``, ``prompt``, ``instruction``, ``source_instruction``, ``index``, ``response``.
There is one eval dataloader per spec,
in the order of `val_names` / `test_names`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

from lightning import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from moelora_lit.data.batching import Collator, LengthGroupedSampler, encode_rows
from moelora_lit.data.formats import REGISTRY, convert_rows, resolve_name
from moelora_lit.data.prompts import check_template
from moelora_lit.data.resumable import ResumableDataLoader
from moelora_lit.data.sources import load_raw
from moelora_lit.data.specs import DatasetSpec, as_spec, check_positive, rewrite_responses
from moelora_lit.eval.answers import answer_kind, normalize_gold


@dataclass
class _Part:
    """A loaded, validated dataset spec."""

    key: str
    task: str
    display: str
    origin: str
    rows: list[dict[str, str]]
    response: str = "dataset"
    task_group: int | None = None


class ReasoningDataModule(LightningDataModule):
    """Math / common-sense reasoning data in the LLM-Adapters format (see `moelora_lit.data.formats`).

    Args:
        tokenizer: HF tokenizer folder or hub id (the CLI links it from ``model.base_model``).
        train / val / test: dataset specs (`DatasetSpec`, dicts or bare names). Test specs also serve
            ``predict``. Without val specs there is no validation loop.
        batch_size / eval_batch_size: rows per batch (eval default: `batch_size`).
        max_length: token budget of prompt + response (train rows whose prompt alone fills it are dropped).
        prompt_template: ``"alpaca"`` (LLM-Adapters) or a string with ``{instruction}`` / ``{input}``.
        train_on_inputs: also train on prompt tokens (LLM-Adapters' flag; default off).
        group_by_length: train batches of similar length (shuffled length buckets).
        num_workers: DataLoader workers. seed: shuffling and synthetic-data seed.
        cache_dir: cache for hub downloads and tokenized datasets.
    """

    def __init__(
        self,
        tokenizer: str | None = None,
        train: list[DatasetSpec | str] | None = None,
        val: list[DatasetSpec | str] | None = None,
        test: list[DatasetSpec | str] | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        max_length: int = 512,
        prompt_template: str = "alpaca",
        train_on_inputs: bool = False,
        group_by_length: bool = False,
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        check_positive(batch_size, "data.batch_size")
        check_positive(eval_batch_size, "data.eval_batch_size", allow_none=True)
        check_positive(max_length, "data.max_length", minimum=2)
        check_positive(num_workers, "data.num_workers", minimum=0)
        check_template(prompt_template)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.max_length, self.prompt_template = max_length, prompt_template
        self.train_on_inputs, self.group_by_length = train_on_inputs, group_by_length
        self.num_workers, self.seed, self.cache_dir = num_workers, seed, cache_dir
        specs = {role: self._specs(specs, role) for role, specs in (("train", train), ("val", val), ("test", test))}
        self.tokenizer_name = tokenizer
        self.tokenizer = self._load_tokenizer(tokenizer) if tokenizer is not None else None
        # Reading + validating rows is cheap; doing it here fails fast, before the model loads.
        self.parts = {role: [self._load(s, role, i) for i, s in enumerate(ss)] for role, ss in specs.items()}
        self.val_names = [p.display for p in self.parts["val"]]
        self.test_names = [p.display for p in self.parts["test"]]
        self.val_tasks = [p.task for p in self.parts["val"]]
        self.test_tasks = [p.task for p in self.parts["test"]]
        self._built: dict[str, Any] = {}

    # ------------------------------------------------------------------ validation and loading
    @staticmethod
    def _specs(specs: list | None, role: str) -> list[DatasetSpec]:
        if specs is None:
            return []
        if isinstance(specs, (str, dict, DatasetSpec)):
            specs = [specs]
        out = []
        for i, raw in enumerate(specs):
            spec = as_spec(raw, f"data.{role}[{i}]")
            check_positive(spec.limit, f"data.{role}[{i}].limit", allow_none=True)
            check_positive(spec.offset, f"data.{role}[{i}].offset", minimum=0)
            if spec.path is not None and not os.path.exists(os.path.expanduser(str(spec.path))):
                raise FileNotFoundError(f"data.{role}[{i}].path: {spec.path} does not exist")
            out.append(dataclasses.replace(spec, name=resolve_name(spec.name, f"data.{role}[{i}].name")))
        seen: dict[str, int] = {}
        for i, spec in enumerate(out):
            display = spec.alias or spec.name
            if role != "train" and display in seen:
                raise ValueError(
                    f"data.{role}[{i}]: display name '{display}' is already used by data.{role}[{seen[display]}]; "
                    f"set data.{role}[{i}].alias to tell them apart in metric tags"
                )
            seen[display] = i
        return out

    def _load(self, spec: DatasetSpec, role: str, i: int) -> _Part:
        key = f"data.{role}[{i}]"
        limit = None if spec.limit is None else spec.offset + spec.limit
        raw, origin = load_raw(spec.name, role, spec.path, spec.hub_id, spec.hub_config, spec.split,
                               limit, self.seed, self.cache_dir, key)  # fmt: skip
        if spec.offset:
            if spec.offset >= len(raw):
                raise ValueError(f"{key}.offset={spec.offset}: {origin} has only {len(raw)} rows; lower the offset")
            raw = raw[spec.offset:]
        rows = convert_rows(raw, origin, key)
        mixed = REGISTRY[spec.name].mixed
        kind = None if mixed else answer_kind(spec.name)
        for n, row in enumerate(rows):
            where = f"{key}: {origin}: row {n + spec.offset} (0-based)"
            if role == "train" and not row["output"].strip():
                raise ValueError(f"{where}: empty 'output' (the response to train on)")
            if kind is None:
                continue
            try:
                row["answer"] = normalize_gold(spec.name, row["answer"])
            except ValueError:
                raise ValueError(
                    f"{where}: answer {row['answer']!r} does not fit dataset '{spec.name}' (expected a {kind} "
                    f"answer); is {key}.name right?"
                ) from None
        rewrite_responses(rows, spec, key, origin)
        return _Part(key, spec.name, spec.alias or spec.name, origin, rows, spec.response, spec.task_group)

    @staticmethod
    def _load_tokenizer(name: str) -> Any:
        from transformers import AutoTokenizer

        from moelora_lit.models.gguf import gguf_tokenizer, tokenizer_args
        from moelora_lit.models.loading import packaged_path

        path = packaged_path(os.path.expanduser(name))
        if not os.path.exists(path) and (name.startswith((".", "/", "~")) or name.count("/") > 1):
            raise FileNotFoundError(f"data.tokenizer: {name} does not exist")
        path, gguf = tokenizer_args(path)  # a GGUF file or package:<pkg>/<file>: folder + gguf_file
        try:
            tok = gguf_tokenizer(path, **gguf) if gguf else AutoTokenizer.from_pretrained(path)
        except Exception as err:  # OSError, ValueError, hub errors
            raise ValueError(
                f"data.tokenizer: could not load a tokenizer from {name!r} ({type(err).__name__}: {err}); "
                "pass a local HF folder (with tokenizer.json) or a reachable hub id"
            ) from err
        if tok.pad_token_id is None:
            if tok.eos_token is None:
                raise ValueError(f"data.tokenizer: {name!r} has neither a pad nor an eos token")
            tok.pad_token = tok.eos_token
        if tok.eos_token_id is None:
            raise ValueError(f"data.tokenizer: {name!r} has no eos token (needed to end responses)")
        return tok

    # ------------------------------------------------------------------ tokenization
    def _encode(self, part: _Part, train: bool) -> Any:
        import datasets
        from datasets.fingerprint import generate_random_fingerprint

        ds = datasets.Dataset.from_list(part.rows)
        keep = [] if train else ["instruction", "answer", "source_instruction"]
        # Our own fingerprint: datasets would otherwise pickle and hash the tokenizer on every map.
        kwargs: dict[str, Any] = {"new_fingerprint": generate_random_fingerprint()}
        if self.cache_dir:
            kwargs["new_fingerprint"] = fingerprint = self._fingerprint(part, train)
            kwargs["cache_file_name"] = os.path.join(self.cache_dir, f"tokenized-{fingerprint}.arrow")
            os.makedirs(self.cache_dir, exist_ok=True)
        remove = [c for c in ds.column_names if c not in keep]
        fn_kwargs = {"tokenizer": self.tokenizer, "template": self.prompt_template, "max_length": self.max_length,
                     "train_on_inputs": self.train_on_inputs, "with_prompt": not train}  # fmt: skip
        return ds.map(encode_rows, batched=True, fn_kwargs=fn_kwargs, remove_columns=remove,
                      desc=f"tokenizing {part.display}", **kwargs)  # fmt: skip

    def _fingerprint(self, part: _Part, train: bool) -> str:
        tok = self.tokenizer
        backend = getattr(tok, "backend_tokenizer", None)
        h = hashlib.sha256(json.dumps(part.rows, sort_keys=True).encode())
        settings = (self.prompt_template, self.max_length, self.train_on_inputs, train, tok.eos_token_id,
                    backend.to_str() if backend is not None else repr(tok))  # fmt: skip
        h.update(json.dumps(settings).encode())
        return h.hexdigest()[:20]

    def _build_train(self) -> Any:
        import datasets

        if not self.parts["train"]:
            raise ValueError("data.train is empty; add a dataset, e.g. train: [{name: math_10k, path: ...}]")
        parts = [self._encode(p, train=True) for p in self.parts["train"]]
        if any(p.task_group is not None for p in self.parts["train"]):   # LoRAMoE's localized balance loss
            parts = [ds.add_column("task_group", [-1 if p.task_group is None else p.task_group] * len(ds))
                     for ds, p in zip(parts, self.parts["train"], strict=True)]
        ds = datasets.concatenate_datasets(parts)
        prompt_len, full_len = ds["prompt_len"], ds["full_len"]
        dropped = sum(p >= self.max_length for p in prompt_len)
        truncated = sum(p < self.max_length < f for p, f in zip(prompt_len, full_len, strict=True))
        if dropped == len(ds):
            raise ValueError(
                f"data.train: every one of the {len(ds)} rows has a prompt of >= data.max_length={self.max_length} "
                f"tokens (longest {max(full_len)}), so no response token is left to train on; raise data.max_length"
            )
        if dropped or truncated:
            rank_zero_warn(
                f"data.train: {dropped} of {len(ds)} rows have a prompt of >= data.max_length={self.max_length} "
                f"tokens and are dropped; {truncated} more are truncated (longest row: {max(full_len)} tokens). "
                "Raise data.max_length to keep them."
            )
        if dropped:
            ds = ds.select([i for i, n in enumerate(ds["prompt_len"]) if n < self.max_length])
        return ds

    def _build_eval(self, part: _Part) -> Any:
        ds = self._encode(part, train=False)
        longer = sum(f > self.max_length for f in ds["full_len"])
        if longer:
            rank_zero_warn(
                f"{part.key} ({part.display}): {longer} of {len(ds)} rows exceed data.max_length={self.max_length} "
                "tokens; their teacher-forced loss sees a truncated text (generation uses the full prompt)"
            )
        ds = ds.add_column("dataset", [part.display] * len(ds)).add_column("task", [part.task] * len(ds))
        # source_instruction is a column of cloze rows only (data.specs); the Collator defaults it to the instruction
        ds = ds.add_column("index", list(range(len(ds))))
        return ds.add_column("response", [part.response] * len(ds))

    def setup(self, stage: str | None = None) -> None:
        """Tokenize the splits `stage` needs ("fit", "validate", "test", "predict" or None for all)."""
        if self.tokenizer is None:
            raise ValueError("data.tokenizer is not set; pass a HF folder or hub id (the CLI links model.base_model)")
        if stage in ("fit", None) and "train" not in self._built:
            self._built["train"] = self._build_train()
        if stage in ("fit", "validate", None) and "val" not in self._built:
            self._built["val"] = [self._build_eval(p) for p in self.parts["val"]]
        if stage in ("test", "predict", None) and "test" not in self._built:
            if not self.parts["test"] and stage is not None:
                raise ValueError(f"data.test is empty; {stage} needs e.g. test: [{{name: gsm8k, path: ...}}]")
            self._built["test"] = [self._build_eval(p) for p in self.parts["test"]]

    # ------------------------------------------------------------------ dataloaders
    def _loader_kwargs(self) -> dict[str, Any]:
        return {"num_workers": self.num_workers, "persistent_workers": self.num_workers > 0}

    def train_dataloader(self) -> DataLoader:
        import torch

        ds = self._built.get("train")
        if ds is None:
            self.setup("fit")
            ds = self._built["train"]
        columns = ["input_ids", "labels"] + (["task_group"] if "task_group" in ds.column_names else [])
        ds = ds.select_columns(columns) if "full_len" in ds.column_names else ds
        collate = Collator(self.tokenizer.pad_token_id, eval_mode=False)
        if self.group_by_length:
            lengths = [len(x) for x in ds["input_ids"]]
            sampler = LengthGroupedSampler(lengths, self.batch_size, seed=self.seed)
            return ResumableDataLoader(ds, self.batch_size, sampler=sampler, collate_fn=collate,
                                       **self._loader_kwargs())
        generator = torch.Generator().manual_seed(self.seed)
        return ResumableDataLoader(ds, self.batch_size, shuffle=True, generator=generator, collate_fn=collate,
                          **self._loader_kwargs())  # fmt: skip

    def _eval_loaders(self, role: str) -> list[DataLoader]:
        if role not in self._built:
            self.setup("validate" if role == "val" else "test")
        collate = Collator(self.tokenizer.pad_token_id, eval_mode=True)
        return [DataLoader(ds, self.eval_batch_size, shuffle=False, collate_fn=collate, **self._loader_kwargs())
                for ds in self._built[role]]  # fmt: skip

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("val") if self.parts["val"] else []

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("test")

    def predict_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("test")
