"""Build the embedded tiny base model `moelora_lit/assets/tiny-base` from a seed (CPU, a few minutes).

    python scripts/build_tiny_base.py [--out DIR] [--seed 0] [--steps N]

1. A synthetic pretraining corpus of plain statements: addition facts for 0-19 and unit times facts for 1-26
   ("17 plus 5 is 22.", "13 times 7 is 91."), unit facts ("A week is 7 days."), comparisons ("74 is
   larger than 47."), and stories that are repeated or recalled ("Kim has 36 coins and Ben has 33
   coins. So Ben has 33 coins."), which teach in-context copying. It teaches the building blocks of
   `moelora_lit.data.synthetic` but never its question -> chain of thought -> "The answer is N."
   format, so the base is poor zero-shot and an adapter has to learn the mapping.
2. A byte-level BPE tokenizer (`tokenizers`; numbers split from words, any text encodes).
3. Full training of a small `LlamaForCausalLM` (1.9M parameters) with fixed seeds, deterministic
   algorithms and 1 thread: the same command on the same machine and library versions gives the same
   bytes (about 10 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moelora_lit.data.synthetic import ADD_RANGE, FACTORS, ITEMS, NAMES, UNIT_COUNTS, UNITS  # noqa: E402

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
TEMPLATE = ("Below is an instruction that describes a task. Write a response that appropriately "
            "completes the request. \n\n### Instruction:\n{q}\n\n### Response:\n")
MODEL = dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
             intermediate_size=512, max_position_embeddings=512, tie_word_embeddings=True)
BLOCK, BATCH, LR, WARMUP = 128, 16, 3e-3, 60


# ----------------------------------------------------------------------------- corpus
# Statements only: facts ("7 plus 5 is 12."), comparisons, unit facts, and stories that are repeated or
# recalled ("... So Ben has 33 coins."), which teach in-context copying. Never the suite's questions,
# its "### Instruction" template around a task, or "The answer is".
# Every fact the suite's chains of thought use (its held-out test facts included) is a pretraining fact.


def add_fact(rng: random.Random) -> str:
    a, b = rng.randint(0, ADD_RANGE[-1]), rng.randint(0, ADD_RANGE[-1])
    return f"{a} plus {b} is {a + b}."


def times_fact(rng: random.Random) -> str:
    factor, k = rng.choice(FACTORS), rng.randint(1, UNIT_COUNTS[-1])
    return f"{k} times {factor} is {k * factor}."


def unit_fact(rng: random.Random) -> str:
    one, _, small, factor = rng.choice(UNITS)
    return f"A {one} is {factor} {small}."


def comparison(rng: random.Random) -> str:
    a, b = rng.sample(range(10, 100), 2)
    return rng.choice([f"{max(a, b)} is larger than {min(a, b)}.", f"{min(a, b)} is smaller than {max(a, b)}."])


def _holdings(rng: random.Random, top: int) -> tuple[list[str], str, list[int], str]:
    k = rng.randint(2, 4)
    names, item = rng.sample(NAMES, k), rng.choice(ITEMS)
    counts = [rng.randint(2, top) for _ in names]
    parts = [f"{n} has {v} {item}" for n, v in zip(names, counts, strict=True)]
    return names, item, counts, ", ".join(parts[:-1]) + " and " + parts[-1] + "."


def story(rng: random.Random) -> str:
    names, item, counts, head = _holdings(rng, 60)
    j = rng.randrange(len(names))
    return head + " " + rng.choice([f"So {names[j]} has {counts[j]} {item}.", f"{names[j]} has {counts[j]} {item}.",
                                    f"{names[j]} keeps the {counts[j]} {item}."])


def plain(rng: random.Random) -> str:
    a, b = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    return rng.choice([
        f"{a} buys more {item}.", f"{a} writes an instruction that describes a task.",
        f"{b} writes a response that appropriately completes the request.", f"{a} and {b} count the {item}.",
        "Which one is the largest number?", f"{a} wants to know how many {item} there are.",
        f"Below is a list of {item}.", f"{b} has the most {item}.",
    ])  # fmt: skip


def repeat(rng: random.Random) -> str:
    _, _, _, head = _holdings(rng, 99)
    return head + " " + head


def recall_all(rng: random.Random) -> str:
    names, item, counts, head = _holdings(rng, 99)
    order = list(range(len(names)))
    rng.shuffle(order)
    return head + " " + " ".join(f"{names[j]} has {counts[j]} {item}." for j in order)


def pair_compare(rng: random.Random) -> str:
    a, b = rng.sample(range(10, 100), 2)
    return f"Of {a} and {b}, {max(a, b)} is larger than {min(a, b)}."


KINDS = [repeat, recall_all, recall_all, pair_compare, pair_compare, *[add_fact] * 5, *[times_fact] * 4,
         unit_fact, comparison, comparison, story, story, story, plain]


def document(rng: random.Random) -> str:
    # Some line breaks, so numbers at the start of a line are practised too.
    return "".join(rng.choice(KINDS)(rng) + rng.choice((" ", " ", "\n")) for _ in range(rng.randint(3, 8))).strip()


# ----------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r" ?[0-9]+"), behavior="isolated"),  # numbers apart from words
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])  # fmt: skip
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, min_frequency=2, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", model_max_length=MODEL["max_position_embeddings"])


# ----------------------------------------------------------------------------- training
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "moelora_lit/assets/tiny-base"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--threads", type=int, default=1, help="bit-for-bit equal only at equal thread counts")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    start = time.time()

    rng = random.Random(args.seed)
    n_docs = args.steps * BATCH * BLOCK // 100  # ~100 tokens per document: about one pass over the corpus
    docs = [document(rng) for _ in range(n_docs)]
    tok_texts = docs[:20000] + [TEMPLATE.format(q=document(rng)) for _ in range(200)]
    tokenizer = train_tokenizer(tok_texts)
    ids = [i for enc in tokenizer(docs)["input_ids"] for i in (*enc, tokenizer.eos_token_id)]
    data = torch.tensor(ids[: len(ids) // BLOCK * BLOCK]).view(-1, BLOCK)
    print(f"corpus: {len(docs)} documents, {len(ids)} tokens, {data.shape[0]} blocks of {BLOCK}; "
          f"vocab {len(tokenizer)}; template = {len(tokenizer(TEMPLATE.format(q='')).input_ids)} tokens")
    print("sample:", docs[0][:300])

    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **MODEL)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, {config.num_hidden_layers} layers, hidden {config.hidden_size}")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.cat([torch.randperm(len(data), generator=gen) for _ in range(1 + args.steps * BATCH // len(data))])
    model.train()
    t0, ema = time.time(), None
    for step in range(args.steps):
        lr_scale = min(1.0, (step + 1) / WARMUP) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for group in opt.param_groups:
            group["lr"] = LR * lr_scale
        batch = data[order[step * BATCH : (step + 1) * BATCH]]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  ema {ema:.4f}  {time.time() - t0:.0f}s", flush=True)
    train_time = time.time() - t0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # Name the class every transformers version knows (v5 writes "TokenizersBackend"), plus the v4 map.
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    specials = {k: tok_config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    digest = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()[:16]
    print(f"trained {args.steps} steps ({args.steps * BATCH * BLOCK} tokens) in {train_time:.0f}s, "
          f"final loss (ema) {ema:.4f}; total {time.time() - start:.0f}s")
    print(f"saved {out} ({size:.1f} MiB, model.safetensors sha256 {digest})")


if __name__ == "__main__":
    main()
