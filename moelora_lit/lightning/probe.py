"""Per-example routing of held-out rows at step 0 and after training: the :class:`RoutingProbe` callback and the
numpy summary it writes (specialisation against a task-label permutation null, gate entropy, per-task expert use).

    --trainer.callbacks+=moelora_lit.lightning.probe.RoutingProbe

At the start of training (the untrained router; the adapters are still the identity, so every layer sees the
base model's hidden states) and at its end, the model reads the same rows, prompt and reference response
teacher-forced, in eval mode without gradients. Per example and layer the gates are averaged over its tokens after
the shared prompt header; :func:`summarise` turns them into the per-layer specialisation with its permutation
p-value, the gate entropy and the per-task expert use. The result is ``<log_dir>/routing_probe.json`` (a few tens of
kB); runs with one expert (LoRA) write nothing. The analysis of these files is :mod:`moelora_lit.analysis.routing`.

- **Specialisation** of layer l: the mean over task pairs of the Jensen-Shannon divergence (bits) between the
  tasks' mean expert-use distributions, against a **task-label permutation test** (labels shuffled over examples,
  the same shuffle for every layer) and the same router at step 0.
- **Routing entropy** per layer: the mean over tokens of the gate entropy (nats).

Real data instead of the synthetic families: ``data`` lists LLM-Adapters files, one task each, e.g.
``{name: arc_e, path: ARC-Easy/train.json, offset: 1000}`` (held-out rows of a training file). The step-0 summary
travels in the training checkpoint, so a resumed run compares against the router it started from.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from moelora_lit.data.prompts import ALPACA, build_prompt
from moelora_lit.data.specs import DatasetSpec, rewrite_responses
from moelora_lit.data.synthetic import SYNTHETIC_TASKS, synthetic_rows
from moelora_lit.inject import moelora_layers, set_token_mask


def js_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence in bits along the last axis (0 for equal, 1 for disjoint distributions)."""
    p = np.asarray(p, dtype=float) / np.asarray(p, dtype=float).sum(-1, keepdims=True)
    q = np.asarray(q, dtype=float) / np.asarray(q, dtype=float).sum(-1, keepdims=True)
    m = (p + q) / 2

    def kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(a > 0, a * np.log2(a / b), 0.0).sum(-1)

    return (kl(p, m) + kl(q, m)) / 2


def task_means(loads: np.ndarray, labels: np.ndarray, n_tasks: int) -> np.ndarray:
    """(tasks, layers, N) mean loads per task from (examples, layers, N) ``loads`` and integer ``labels``."""
    onehot = np.eye(n_tasks)[labels]                                                  # (E, K)
    return np.einsum("ek,eln->kln", onehot, loads) / onehot.sum(0)[:, None, None]


def specialisation(means: np.ndarray) -> np.ndarray:
    """Per layer, the mean over task pairs of the JS divergence between tasks' expert use; ``means`` is
    (..., tasks, layers, N), the result (..., layers)."""
    pairs = list(combinations(range(means.shape[-3]), 2))
    return np.mean([js_divergence(means[..., a, :, :], means[..., b, :, :]) for a, b in pairs], axis=0)


def permutation_test(loads: np.ndarray, labels: Sequence[int], permutations: int = 1000,
                     seed: int = 0) -> dict[str, Any]:
    """Specialisation per layer and for the layer mean, against task labels shuffled over the examples.

    Returns ``specialisation`` (layers,), ``null_mean`` (layers,), ``p`` (layers,) and the same for the layer mean
    (``mean_specialisation``, ``mean_null``, ``mean_p``); p = (1 + #{null >= observed}) / (1 + permutations).
    """
    loads, labels = np.asarray(loads, dtype=float), np.asarray(labels)
    n_tasks = int(labels.max()) + 1
    observed = specialisation(task_means(loads, labels, n_tasks))                     # (L,)
    rng = np.random.default_rng(seed)
    shuffled = np.stack([rng.permutation(labels) for _ in range(permutations)])       # (P, E)
    onehot = np.eye(n_tasks)[shuffled]                                                # (P, E, K)
    means = np.einsum("pek,eln->pkln", onehot, loads) / onehot.sum(1)[:, :, None, None]
    null = specialisation(means)                                                      # (P, L)
    p = (1 + (null >= observed - 1e-12).sum(0)) / (1 + permutations)
    mean_null = null.mean(1)
    mean_p = (1 + (mean_null >= observed.mean() - 1e-12).sum()) / (1 + permutations)
    return {"specialisation": observed.tolist(), "null_mean": null.mean(0).tolist(), "p": p.tolist(),
            "mean_specialisation": float(observed.mean()), "mean_null": float(mean_null.mean()),
            "mean_p": float(mean_p)}


def summarise(loads: np.ndarray, labels: Sequence[int], tasks: Sequence[str], entropy: np.ndarray,
              permutations: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The per-run summary of one routing state: the permutation test, per-layer entropy, and per task the
    (layers, N) expert use, rounded for a small JSON file."""
    test = permutation_test(loads, labels, permutations, seed)
    means = task_means(np.asarray(loads, dtype=float), np.asarray(labels), len(tasks))
    rounded = {k: (np.round(v, 5).tolist() if isinstance(v, list) else round(v, 6)) for k, v in test.items()}
    return rounded | {"entropy": np.round(np.asarray(entropy, dtype=float), 5).tolist(),
                      "use": {t: np.round(means[i], 4).tolist() for i, t in enumerate(tasks)},
                      "examples": int(len(labels))}


class RoutingProbe(L.Callback):
    """Per-example routing of ``limit`` rows of each task's ``split`` at step 0 and after training.

    Args:
        tasks: synthetic families to read (default: all four).
        split: ``test`` (default) or ``validation``.
        limit: rows per task.
        permutations: task-label permutations for the p-values.
        batch_size: rows per forward.
        data: LLM-Adapters files to read instead, each ``{name, path, offset, response}`` (``limit`` rows from
            ``offset``, written in the ``response`` style of :class:`moelora_lit.data.specs.DatasetSpec`); the names
            become the tasks.
    """

    def __init__(self, tasks: list[str] | None = None, split: str = "test", limit: int = 50,
                 permutations: int = 2000, batch_size: int = 50, data: list[dict[str, Any]] | None = None) -> None:
        self.data = [dict(d) for d in data or []]
        for i, spec in enumerate(self.data):
            if not {"name", "path"} <= set(spec) or not Path(spec["path"]).is_file():
                raise ValueError(f"RoutingProbe data[{i}]={spec}: needs 'name' and 'path' of an existing JSON file")
        self.tasks = [d["name"] for d in self.data] if self.data else list(tasks or SYNTHETIC_TASKS)
        self.split, self.limit, self.permutations, self.batch_size = split, limit, permutations, batch_size
        self.step0: dict[str, Any] | None = None

    def _rows(self, i: int) -> list[dict[str, Any]]:
        if not self.data:
            return synthetic_rows(self.tasks[i], self.split, self.limit)
        offset = int(self.data[i].get("offset", 0))
        rows = json.loads(Path(self.data[i]["path"]).read_text())[offset:offset + self.limit]
        spec = DatasetSpec(self.tasks[i], offset=offset, response=self.data[i].get("response", "dataset"))
        rewrite_responses(rows, spec, f"RoutingProbe data[{i}]", self.data[i]["path"])  # as the model was trained
        return rows

    def _texts(self) -> tuple[list[str], np.ndarray]:
        rows = [(i, build_prompt("alpaca", r["instruction"], r.get("input", "")) + r["output"])
                for i in range(len(self.tasks)) for r in self._rows(i)]
        random.Random(0).shuffle(rows)  # mixed batches: the random router's eval gates depend on the position
        return [t for _, t in rows], np.array([i for i, _ in rows])

    @torch.no_grad()
    def measure(self, pl_module: L.LightningModule) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
        """(loads (examples, layers, N), entropy (layers,), layer names), or None with a single expert."""
        layers = [(n, layer) for n, layer in moelora_layers(pl_module.model) if layer.num_experts > 1]  # routed ones
        if not layers:
            return None
        width = max(layer.num_experts for _, layer in layers)            # fewer experts: zero-padded loads
        tok = pl_module.tokenizer
        texts, _ = self._texts()
        skip = len(tok(ALPACA.split("{instruction}")[0]).input_ids)  # the header every example shares
        was_training = pl_module.model.training
        pl_module.model.eval()
        loads, ent_sum, ent_count = [], 0.0, 0.0
        try:
            for start in range(0, len(texts), self.batch_size):
                ids = [tok(t).input_ids for t in texts[start:start + self.batch_size]]     # right-padded here
                longest = max(len(i) for i in ids)
                input_ids = torch.tensor([i + [tok.pad_token_id] * (longest - len(i)) for i in ids])
                attention = torch.tensor([[1] * len(i) + [0] * (longest - len(i)) for i in ids])
                enc = {"input_ids": input_ids.to(pl_module.device), "attention_mask": attention.to(pl_module.device)}
                mask = enc["attention_mask"].bool()
                mask[:, :skip] = False
                set_token_mask(pl_module.model, enc["attention_mask"])
                pl_module.model(**enc)
                batch, seq = mask.shape
                gates = torch.stack([torch.nn.functional.pad(layer.last_gates.float(), (0, width - layer.num_experts))
                                     .view(batch, seq, -1) for _, layer in layers], 1)
                weight = mask[:, None, :, None].float()                                   # (B, 1, S, 1)
                loads.append(((gates * weight).sum(2) / weight.sum(2)).cpu().numpy())     # (B, L, N)
                logp = torch.where(gates > 0, gates.clamp_min(1e-12).log(), torch.zeros_like(gates))
                ent_sum = ent_sum + (-(gates * logp).sum(-1) * mask[:, None, :]).sum((0, 2))  # (L,)
                ent_count += float(mask.sum())
        finally:
            set_token_mask(pl_module.model, None)
            pl_module.model.train(was_training)
        return np.concatenate(loads), (ent_sum / ent_count).cpu().numpy(), [n for n, _ in layers]

    def _summary(self, pl_module: L.LightningModule) -> dict[str, Any] | None:
        measured = self.measure(pl_module)
        if measured is None:
            return None
        loads, entropy, names = measured
        _, labels = self._texts()
        return {"layers": names} | summarise(loads, labels, self.tasks, entropy, self.permutations)

    def state_dict(self) -> dict[str, Any]:
        return {"step0": json.dumps(self.step0)}  # a string: checkpoints load with weights_only=True

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step0 = json.loads(state_dict.get("step0", "null"))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.step0 is None or trainer.global_step == 0:  # a resumed run keeps the step-0 state it restored
            self.step0 = self._summary(pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trained = self._summary(pl_module)
        if trained is None or self.step0 is None or not trainer.is_global_zero or trainer.log_dir is None:
            return
        layers = trained.pop("layers")
        self.step0.pop("layers", None)
        payload = {"split": self.split, "limit": self.limit, "tasks": self.tasks, "permutations": self.permutations,
                   "step": trainer.global_step, "layers": layers, "step0": self.step0, "trained": trained}
        Path(trainer.log_dir).mkdir(parents=True, exist_ok=True)
        (Path(trainer.log_dir) / "routing_probe.json").write_text(json.dumps(payload))
