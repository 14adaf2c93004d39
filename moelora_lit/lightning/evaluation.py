"""The module's evaluation choices: ``model.scoring`` (generate or loglikelihood) and ``model.loglik_prompt``.

:class:`~moelora_lit.lightning.module.MoELoRAModule` dispatches here: multiple-choice sets are scored by option
log-likelihood (:mod:`moelora_lit.eval.loglik`), the math sets keep generation (said once per dataset).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torchmetrics import SumMetric

from moelora_lit.data.batching import eval_column
from moelora_lit.eval.answers import extract_answer, is_correct
from moelora_lit.eval.choices import (
    LOGLIK_PROMPTS,
    MULTIPLE_CHOICE,
    Question,
    harness_requests,
    is_multiple_choice,
    match_option,
    parse_question,
    training_requests,
)
from moelora_lit.eval.loglik import picks, score_questions

SCORINGS = ("generate", "loglikelihood")


def check_scoring(scoring: Any, loglik_prompt: Any) -> None:
    """ValueError naming the key and its values for an unknown ``model.scoring`` / ``model.loglik_prompt``."""
    if scoring not in SCORINGS:
        raise ValueError(f"model.scoring={scoring!r}: choose one of {', '.join(SCORINGS)}")
    if loglik_prompt is not None and loglik_prompt not in LOGLIK_PROMPTS:
        raise ValueError(f"model.loglik_prompt={loglik_prompt!r}: choose one of {', '.join(LOGLIK_PROMPTS)} "
                         "(or leave it unset: harness without a trained or loaded adapter, else training)")


def init_scoring(module: Any, scoring: Any, loglik_prompt: Any, batch_sequences: Any) -> None:
    """Check and store the scoring arguments on ``module`` with the state the evaluation keeps."""
    check_scoring(scoring, loglik_prompt)
    if isinstance(batch_sequences, bool) or not isinstance(batch_sequences, int) or batch_sequences < 1:
        raise ValueError(f"model.loglik_batch_sequences must be an integer >= 1, got {batch_sequences!r}")
    module.scoring, module.loglik_prompt, module.loglik_batch_sequences = scoring, loglik_prompt, batch_sequences
    module.loglik_prompt_used = None          # decided at the start of each evaluation
    module.adapter_trained = False            # set when fit ends
    module.dataset_scoring = {}               # dataset -> the scoring it got
    module.generate_notices = set()           # datasets told that they generate
    module.correct_norm = nn.ModuleDict()     # acc_norm numerators


def check_rows(module: Any) -> None:
    """Parse every option of the val/test sets the loglikelihood scoring will read (at setup, before the model
    loads); a row whose options cannot be read raises a ValueError naming the config key, file and row."""
    datamodule = getattr(module.trainer, "datamodule", None) if module._trainer is not None else None
    if module.scoring != "loglikelihood" or datamodule is None:
        return
    for role in ("val", "test"):
        for part in getattr(datamodule, "parts", {}).get(role, []):
            if not is_multiple_choice(part.task):
                continue
            for n, row in enumerate(part.rows):
                try:
                    parse_question(part.task, row.get("source_instruction", row["instruction"]), row["answer"])
                except ValueError as err:
                    raise ValueError(f"{part.key}: {part.origin}: row {n} (0-based): {err}; model.scoring="
                                     "loglikelihood needs each option (or model.scoring=generate)") from None


def resolve_loglik_prompt(module: Any) -> str:
    """``model.loglik_prompt``, or when unset: ``training`` if an adapter was trained (fit before test) or loaded
    (``init_adapter`` / ``ckpt_path``), else ``harness``."""
    if module.loglik_prompt is not None:
        return module.loglik_prompt
    trainer = module.trainer if module._trainer is not None else None
    fitting = trainer is not None and (trainer.state.fn == "fit" or bool(trainer.ckpt_path))
    return "training" if fitting or module.adapter_trained or module.init_adapter else "harness"


def start_epoch(module: Any, stage: str) -> None:
    """Decide and announce the prompt of this evaluation (the choice is also written to test_results.json)."""
    module.loglik_prompt_used = resolve_loglik_prompt(module)
    if module.scoring == "loglikelihood":
        rank_zero_info(f"{stage}: multiple-choice sets scored by option log-likelihood with the "
                       f"'{module.loglik_prompt_used}' prompt (model.loglik_prompt)")


def uses_loglik(module: Any, name: str, task: str) -> bool:
    """Whether dataset ``name`` is scored by log-likelihood; says once per dataset that a math set generates."""
    scored = module.scoring == "loglikelihood" and is_multiple_choice(task)
    module.dataset_scoring[name] = "loglikelihood" if scored else "generate"
    if module.scoring == "loglikelihood" and not scored and name not in module.generate_notices:
        module.generate_notices.add(name)
        rank_zero_warn(f"model.scoring=loglikelihood: '{name}' ({task}) is not multiple choice (that is "
                       f"{', '.join(MULTIPLE_CHOICE)}); it is scored by generation")
    return scored


def norm_metric(module: Any, key: str) -> SumMetric:
    """The ``acc_norm`` numerator of dataset ``key`` (created on first use)."""
    if key not in module.correct_norm:
        module.correct_norm[key] = SumMetric().to(module.device)
    return module.correct_norm[key]


def loglik_rows(module: Any, batch: dict[str, Any], name: str, key: str) -> list[dict[str, Any]]:
    """Score a batch of multiple-choice rows by option log-likelihood; update ``acc`` / ``acc_norm`` / ``n``."""
    prompt = module.loglik_prompt_used or resolve_loglik_prompt(module)
    questions: list[Question] = []
    for task, instruction, answer, index in zip(batch["task"], eval_column(batch, "source_instruction"),
                                                batch["answer"], batch["index"], strict=True):
        try:
            questions.append(parse_question(task, instruction, answer))
        except ValueError as err:
            raise ValueError(f"dataset '{name}': row {index} (0-based): {err}") from None
    styles = eval_column(batch, "response")
    requests = [harness_requests(q) if prompt == "harness" else training_requests(q, p, style)
                for q, p, style in zip(questions, batch["prompt"], styles, strict=True)]
    logliks = score_questions(module.model, module.tokenizer, requests, joint=prompt == "harness",
                              max_sequences=module.loglik_batch_sequences)
    rows = []
    for q, r, lls, index in zip(questions, requests, logliks, batch["index"], strict=True):
        pick, pick_norm = picks(lls, r.norm_lengths)
        rows.append({"dataset": name, "index": index, "scoring": "loglikelihood", "loglik_prompt": prompt,
                     "context": r.contexts[0], "continuations": list(r.continuations), "loglik": lls,
                     "pred": pick, "pred_norm": pick_norm, "gold": q.gold,
                     "correct": pick == q.gold, "correct_norm": pick_norm == q.gold})
    device = module.device
    module.correct[key].update(torch.tensor(float(sum(r["correct"] for r in rows)), device=device))
    norm_metric(module, key).update(torch.tensor(float(sum(r["correct_norm"] for r in rows)), device=device))
    module.total[key].update(torch.tensor(float(len(rows)), device=device))
    return rows


def generated_row(name: str, task: str, prompt: str, text: str, gold: str, response: str, source: str,
                  protocol: str) -> dict[str, Any]:
    """One generation's prediction row. A ``cloze`` multiple-choice row names its option's text, which
    :func:`~moelora_lit.eval.choices.match_option` maps to the option's label; every other row is read by the answer
    protocol."""
    if response == "cloze" and is_multiple_choice(task):
        q = parse_question(task, source, gold)
        option = match_option(q, text)
        extracted = None if option is None else q.labels[option]
        return {"dataset": name, "prompt": prompt, "generation": text, "extracted": extracted,
                "gold": q.labels[q.gold], "correct": option == q.gold, "answer_rule": "cloze_option"}
    return {"dataset": name, "prompt": prompt, "generation": text, "extracted": extract_answer(task, text, protocol),
            "gold": gold, "correct": is_correct(task, text, gold, protocol)}


def dataset_result(module: Any, name: str, key: str, accuracy: float, n: int) -> dict[str, Any]:
    """One dataset's entry of test_results.json: ``accuracy`` (= ``acc``), ``acc``, ``acc_norm``, ``n`` and the
    scoring used; resets the ``acc_norm`` metric."""
    result: dict[str, Any] = {"accuracy": accuracy, "acc": accuracy, "n": n}
    scoring = module.dataset_scoring.get(name, module.scoring)
    result["scoring"] = scoring
    if scoring == "loglikelihood":
        metric = module.correct_norm[key]
        result["acc_norm"] = float(metric.compute()) / max(n, 1)
        result["loglik_prompt"] = module.loglik_prompt_used
        metric.reset()
    return result


def table(results: dict[str, dict[str, Any]]) -> str:
    """The printed summary: dataset, accuracy (``acc``), ``acc_norm`` where scored by log-likelihood, n."""
    width = max([len(n) for n in results] + [7])
    lines = [f"{'dataset':<{width}}  accuracy  acc_norm      n", "-" * (width + 27)]
    for n, r in results.items():
        norm = f"{r['acc_norm']:8.4f}" if "acc_norm" in r else " " * 8
        lines.append(f"{n:<{width}}  {r['accuracy']:8.4f}  {norm}  {r['n']:5d}")
    if results:
        mean = sum(r["accuracy"] for r in results.values()) / len(results)
        lines += ["-" * (width + 27), f"{'mean':<{width}}  {mean:8.4f}"]
    return "\n".join(lines)


def log_accuracy(module: Any, stage: str, names: list[str]) -> dict[str, dict[str, Any]]:
    """Log ``<stage>/acc/<dataset>`` from the synced metrics, reset them, and return each dataset's result."""
    results = {}
    for name in names:
        key = name.replace(".", "_")
        if key not in module.correct or not module.total[key].update_called:
            continue
        correct, total = module.correct[key].compute(), module.total[key].compute()
        accuracy = correct / total.clamp_min(1)
        module.log(f"{stage}/acc/{name}", accuracy, add_dataloader_idx=False)
        results[name] = dataset_result(module, name, key, float(accuracy), int(total))
        module.correct[key].reset()
        module.total[key].reset()
    return results

def write_test_outputs(module: Any, results: dict[str, dict[str, Any]]) -> None:
    """``test_results.json``, ``predictions.jsonl`` and a printed table, on global rank 0."""
    rows = module.predictions
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, rows)
        rows = [row for part in gathered for row in part]
    log_dir = Path(module.trainer.log_dir or module.trainer.default_root_dir)  # a collective: every rank
    if not module.trainer.is_global_zero or module.trainer.sanity_checking:
        return
    results = {name: {**r, **module.evaluation_settings()} for name, r in results.items()}
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / "test_results.json").write_text(json.dumps(results, indent=2))
    with open(log_dir / "predictions.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(table(results) + f"\n(test_results.json and predictions.jsonl in {log_dir})")
