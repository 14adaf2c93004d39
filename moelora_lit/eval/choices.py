"""Multiple-choice questions from LLM-Adapters rows, written as log-likelihood requests.

A row (LLM-Adapters format, or a native hub row after :func:`moelora_lit.data.formats.convert_rows`) becomes a
:class:`Question`: the question text, its options and the gold option's index. Options are read from the
instruction: ``Answer1: .. Answer2: ..`` (ARC, OBQA, SIQA), ``Solution1:`` (PIQA), ``Ending1:`` (HellaSwag),
``Option1:`` (WinoGrande), ``Answer Choices: (A) .. (B) ..`` (AQuA) and true/false (BoolQ).

A question is then scored as a list of ``(context, continuation)`` pairs (:class:`Requests`), in one of two prompts:

- ``harness``: lm-evaluation-harness 0.4.13's zero-shot templates (``lm_eval/tasks/<task>/*.yaml``), the option
  following the context after one space. WinoGrande is "partial scoring" as the harness does it: each option fills
  the blank and the shared rest of the sentence is the continuation.
- ``training``: the Alpaca prompt the adapter was trained with, each option written as the trained response
  writes it (``the correct answer is answer2``; AQuA: ``The answer is B.``; with the ``option_first`` response
  style the option's text comes first, :func:`trained_response`).

``acc_norm`` divides by the character length of what the harness calls the choice (the option text; for
WinoGrande the filled-in context), as ``lm_eval.api.task.ConfigurableTask.process_results`` does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from moelora_lit.eval.answers import canonical_dataset

LOGLIK_PROMPTS = ("harness", "training")
# How a trained response names the chosen option (``data.<split>[i].response``, :func:`trained_response`).
RESPONSES = ("dataset", "option_first", "cloze")
# Datasets whose options can be scored; the math sets (numbers) are generated.
MULTIPLE_CHOICE = ("arc_e", "arc_c", "obqa", "piqa", "siqa", "hellaswag", "winogrande", "boolq", "aqua")

_LABEL = re.compile(r"(?:^|(?<=\s))(Answer|Solution|Option|Ending)(\d+):[ \t]*")
_FORMAT_TAIL = re.compile(r"\s*Answer format:.*$", re.DOTALL)
_HEAD_PREFIX = re.compile(
    r"^Please choose the correct \w+ to (?:the question|complete the given sentence"
    r"|fill in the blank to complete the given sentence):\s*", re.DOTALL)
_BOOLQ = re.compile(r"^Please answer the following question with true or false, question:\s*(.*?)\s*"
                    r"(?:\n\s*\n\s*)?Answer format: true/false\s*$", re.DOTALL)
_AQUA = re.compile(r"^(.*?)\s*Answer Choices:\s*(.*)$", re.DOTALL)
_AQUA_OPTION = re.compile(r"\(([A-E])\)\s*")


@dataclass(frozen=True)
class Question:
    """One multiple-choice row.

    Attributes:
        task: canonical dataset name (``arc_e``, ``piqa``, ...).
        question: the question (PIQA's goal, HellaSwag's context, WinoGrande's sentence with ``_``).
        options: the option texts, in order.
        labels: the label the trained response names for each option (``answer1``, ``true``, ``B``).
        gold: index of the correct option.
    """

    task: str
    question: str
    options: tuple[str, ...]
    labels: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class Requests:
    """A question as log-likelihood requests: option ``i`` scores ``continuations[i]`` after ``contexts[i]``;
    ``norm_lengths[i]`` is the character length ``acc_norm`` divides by."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    norm_lengths: tuple[int, ...]
    gold: int


def is_multiple_choice(task: str) -> bool:
    """True for the datasets scored by option log-likelihood (not the math sets)."""
    return canonical_dataset(task) in MULTIPLE_CHOICE


def parse_question(task: str, instruction: str, answer: str) -> Question:
    """Read the options and gold index of one LLM-Adapters row; ValueError saying what is missing."""
    task = canonical_dataset(task)
    if task == "boolq":
        m = _BOOLQ.match(instruction.strip())
        question = (m.group(1) if m else instruction.strip()).rstrip("?").strip()
        gold = {"false": 0, "true": 1}.get(str(answer).strip().lower())
        if gold is None:
            raise ValueError(f"BoolQ answer {answer!r} is not true/false")
        return Question(task, question, ("no", "yes"), ("false", "true"), gold)
    if task == "aqua":
        m = _AQUA.match(instruction.strip())
        parts = _AQUA_OPTION.split(m.group(2)) if m else []
        letters, texts = parts[1::2], [t.strip() for t in parts[2::2]]
        if not m or len(letters) < 2 or letters != [chr(65 + i) for i in range(len(letters))]:
            raise ValueError("no options 'Answer Choices: (A) .. (B) ..' in the instruction")
        letter = str(answer).strip().upper()
        if letter not in letters:
            raise ValueError(f"gold answer {answer!r} is not one of the options {letters}")
        return Question(task, m.group(1).strip(), tuple(texts), tuple(letters), letters.index(letter))
    marks = list(_LABEL.finditer(instruction))
    words = {m.group(1).lower() for m in marks}
    numbers = [int(m.group(2)) for m in marks]
    if len(marks) < 2 or len(words) != 1 or numbers != list(range(1, len(marks) + 1)):
        raise ValueError("no numbered options ('Answer1: .. Answer2: ..', 'Solution1:', 'Option1:' or 'Ending1:') "
                         "in the instruction")
    word = words.pop()
    ends = [m.start() for m in marks[1:]] + [len(instruction)]
    options = [instruction[m.end():end].strip() for m, end in zip(marks, ends, strict=True)]
    options[-1] = _FORMAT_TAIL.sub("", options[-1]).strip()
    if any(not o for o in options):
        raise ValueError(f"an empty option among {options}")
    labels = tuple(f"{word}{i}" for i in range(1, len(options) + 1))
    gold_label = str(answer).strip().lower()
    if gold_label not in labels:
        raise ValueError(f"gold answer {answer!r} is not one of {list(labels)}")
    question = _HEAD_PREFIX.sub("", instruction[:marks[0].start()]).strip()
    if task == "winogrande" and question.count("_") != 1:
        raise ValueError(f"WinoGrande sentence {question!r} has no single '_' blank")
    return Question(task, question, tuple(options), labels, labels.index(gold_label))


# ------------------------------------------------------------------------------------- harness templates
def _hellaswag_clean(text: str) -> str:
    """lm_eval/tasks/hellaswag/utils.py ``preprocess``: WikiHow's bracket artefacts removed."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def harness_requests(q: Question) -> Requests:
    """lm-evaluation-harness 0.4.13's zero-shot requests (``doc_to_text`` + ``target_delimiter`` + choice)."""
    if q.task == "winogrande":  # lm_eval/tasks/winogrande/preprocess_winogrande.py: partial scoring
        idx = q.question.index("_")
        contexts = tuple(q.question[:idx] + option for option in q.options)
        rest = " " + q.question[idx + 1:].strip()
        return Requests(contexts, (rest,) * len(contexts), tuple(len(c) for c in contexts), q.gold)
    options = q.options
    if q.task == "hellaswag":
        context, options = _hellaswag_clean(q.question), tuple(_hellaswag_clean(o) for o in q.options)
    elif q.task == "obqa":
        context = q.question                                   # doc_to_text: question_stem
    elif q.task == "siqa":
        context = f"Q: {q.question}\nA:"
    elif q.task == "boolq":                                    # the passage line only where rows have one
        context = f"Question: {q.question}?\nAnswer:"
    else:                                                      # ARC, PIQA (goal), AQuA
        context = f"Question: {q.question}\nAnswer:"
    return Requests((context,) * len(options), tuple(" " + o for o in options), tuple(len(o) for o in options),
                    q.gold)


def trained_response(q: Question, option: int, response: str = "dataset") -> str:
    """The response that names option ``option`` in style ``response`` (one of :data:`RESPONSES`).

    ``dataset``: LLM-Adapters' own (``the correct answer is answer2``; AQuA: ``The answer is B.``).
    ``option_first``: the option's text first, then that statement (``a bacterial population in the bloodstream,
    so the correct answer is answer2``) for the sets with numbered options; BoolQ (whose options are the answer
    words) and AQuA (trained on rationales) keep ``dataset``.
    ``cloze``: the option's text alone (BoolQ: ``yes`` / ``no``); its prompt holds the question without the options
    (:func:`cloze_instruction`).
    """
    if response not in RESPONSES:
        raise ValueError(f"response {response!r}: choose one of {', '.join(RESPONSES)}")
    if response == "cloze":
        return q.options[option]
    label = q.labels[option]
    if q.task == "aqua":
        return f"The answer is {label}."
    stated = f"the correct answer is {label}"
    if response == "option_first" and q.task != "boolq":
        return f"{q.options[option]}, so {stated}"
    return stated


def cloze_instruction(q: Question) -> str:
    """The instruction of a ``cloze`` row: the question alone, as the harness's templates ask it (BoolQ with its
    question mark), without the list of options."""
    return f"{q.question}?" if q.task == "boolq" else q.question


def _plain(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .!?;:,\"'")


def match_option(q: Question, generation: str) -> int | None:
    """The option a ``cloze`` generation names: the one whose text its first line is (case, spacing and closing
    punctuation ignored), else the single option that line begins with; None when none or several fit."""
    lines = generation.strip().splitlines()
    said = _plain(lines[0]) if lines else ""
    if not said:
        return None
    options = [_plain(o) for o in q.options]
    exact = [i for i, o in enumerate(options) if o == said]
    if len(exact) == 1:
        return exact[0]
    begins = [i for i, o in enumerate(options) if o and said.startswith(o)]
    return begins[0] if len(begins) == 1 else None


def training_requests(q: Question, prompt: str, response: str = "dataset") -> Requests:
    """The trained prompt (``prompt``, already rendered) and each option as the trained response writes it."""
    responses = tuple(trained_response(q, i, response) for i in range(len(q.options)))
    return Requests((prompt,) * len(responses), responses, tuple(len(r) for r in responses), q.gold)


def harness_doc(task: str, row: dict) -> dict:
    """A harness document (``query`` / ``choices`` / ``gold``; WinoGrande: ``contexts`` / ``continuation``) for
    an LLM-Adapters row, used by the shipped task YAMLs (:mod:`moelora_lit.eval.harness_tasks`)."""
    r = harness_requests(parse_question(task, row["instruction"], row["answer"]))
    if canonical_dataset(task) == "winogrande":
        return {"contexts": list(r.contexts), "continuation": r.continuations[0], "gold": r.gold}
    return {"query": r.contexts[0], "choices": [c[1:] for c in r.continuations], "gold": r.gold}
