"""Beyond one process, on 2 CPU processes over gloo through the real CLI: two nodes (torchrun, DDP) and FSDP2
(Lightning's ``ModelParallelStrategy``, :mod:`moelora_lit.lightning.sharding`), which must train exactly as DDP
does, keep the contrastive queues identical on every rank, and write one adapter-only checkpoint that resumes
exactly. Three launches of two processes each (about 15 s apiece on 2 cores); every check reads their files."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hf_folder import build_tiny_hf_folder

from moelora_lit import load_adapter, moelora_layers
from moelora_lit.adapter_io import adapter_state_dict
from moelora_lit.lightning.sharding import check_strategy, full_adapter_tensors, is_sharded

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "experiments" / "smoke.yaml")
MODEL_PARALLEL = '{"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}'
STEPS = (1, 2, 3)
# 3 steps of 2 rows per rank; the queues (1024 per expert) keep every anchor of every rank.
FAST = ["--data.train=[{name: synth_all, limit: 64}]", "--data.val=null", "--data.test=null", "--data.batch_size=2",
        "--trainer.log_every_n_steps=1", "--test_after_fit=false", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--trainer.accelerator=cpu", "--trainer.max_steps=3",
        "--model.adapter.contrastive_queue_size=1024"]
TIMEOUT = 240


class Probe(L.Callback):
    """Per rank and step: this rank's new anchors, the loss and every queue; at the end the whole adapter and how
    the base is laid out. With ``save_at_step`` it also writes a checkpoint after that step."""

    def __init__(self, out: str, save_at_step: int = 0) -> None:
        self.out, self.save_at_step = Path(out), save_at_step
        self.out.mkdir(parents=True, exist_ok=True)

    def on_after_backward(self, trainer, pl_module) -> None:           # before the module pushes the queues
        self.pending = {n: layer.pending[0][layer.pending[2] > 0].clone()
                        for n, layer in moelora_layers(pl_module.model)}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        queues = {n: (layer.contrastive_queue.clone(), layer.contrastive_queue_count.clone())
                  for n, layer in moelora_layers(pl_module.model)}
        torch.save({"pending": self.pending, "queues": queues, "loss": outputs["loss"].detach().clone()},
                   self.out / f"rank{trainer.global_rank}_step{trainer.global_step}.pt")
        if trainer.global_step == self.save_at_step:
            trainer.save_checkpoint(self.out / f"step{self.save_at_step}.ckpt")

    def on_train_end(self, trainer, pl_module) -> None:
        model = pl_module.model
        block = model.model.layers[0].mlp.up_proj.weight                  # a frozen base weight
        local = block.to_local() if is_sharded(model) else block
        with full_adapter_tensors(model):
            adapter = {k: v.clone() for k, v in adapter_state_dict(model).items()}
        torch.save({"adapter": adapter, "sharded": is_sharded(model), "block_rows": (local.shape[0], block.shape[0]),
                    "trainable_sharded": is_sharded(model) and type(model.model.layers[0].self_attn.q_proj.lora_A
                                                                   .weight).__name__ == "DTensor"},
                   self.out / f"rank{trainer.global_rank}_end.pt")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
            "MOELORA_COMPILE_CONTRASTIVE": "0"}


def _fit_args(base: str, root: Path, probe: Path, save_at_step: int = 0) -> list[str]:
    callback = json.dumps({"class_path": "test_strategies.Probe",
                           "init_args": {"out": str(probe), "save_at_step": save_at_step}})
    return ["fit", "--config", SMOKE, "--model.base_model", base, "--trainer.default_root_dir", str(root), *FAST,
            f"--trainer.callbacks+={callback}"]


def _launch(cmds: list[list[str]], cwd: Path) -> list[subprocess.CompletedProcess]:
    """Start every command at once (they rendezvous with each other), wait for all, bounded."""
    procs = [subprocess.Popen(c, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in cmds]
    done = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=TIMEOUT)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc in done:
        assert proc.returncode == 0, proc.stdout[-4000:]
    return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The three launches: two torchrun nodes (DDP), FSDP2 on 2 processes, FSDP2 resumed from its step-2 checkpoint."""
    tmp = tmp_path_factory.mktemp("strategies")
    base = build_tiny_hf_folder(tmp / "base")
    port = _free_port()
    nodes = [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank",
              str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "moelora_lit",
              *_fit_args(base, tmp / "ddp", tmp / "ddp_probe"), "--trainer.num_nodes", "2", "--trainer.devices", "1",
              "--trainer.strategy", "ddp"] for rank in (0, 1)]
    outputs = _launch(nodes, tmp)
    fsdp = [sys.executable, "-m", "moelora_lit", *_fit_args(base, tmp / "fsdp", tmp / "fsdp_probe", save_at_step=2),
            "--trainer.strategy", MODEL_PARALLEL, "--trainer.devices", "2"]
    _launch([fsdp], tmp)
    resume = [sys.executable, "-m", "moelora_lit", *_fit_args(base, tmp / "resumed", tmp / "resumed_probe"),
              "--trainer.strategy", MODEL_PARALLEL, "--trainer.devices", "2",
              "--ckpt_path", str(tmp / "fsdp_probe" / "step2.ckpt")]
    _launch([resume], tmp)
    return {"base": Path(base), "tmp": tmp, "node_logs": [o.stdout for o in outputs]}


def _run_dir(root: Path) -> Path:
    (run,) = list((root / "lightning_logs").iterdir())     # one run folder, written by global rank 0 alone
    return run


def _probe(folder: Path, rank: int, step: int | str) -> dict:
    return torch.load(folder / f"rank{rank}_{'step' if isinstance(step, int) else ''}{step}.pt", weights_only=True)


def _check_queues(folder: Path) -> None:
    """Every step: both ranks' queues bit-identical and holding every anchor of every rank so far."""
    seen: dict[str, list[torch.Tensor]] = {}
    for step in STEPS:
        ranks = [_probe(folder, r, step) for r in (0, 1)]
        for name, (queue, count) in ranks[0]["queues"].items():
            other_queue, other_count = ranks[1]["queues"][name]
            assert torch.equal(queue, other_queue) and torch.equal(count, other_count), (step, name)
            for r in (0, 1):
                assert ranks[r]["pending"][name].shape[0] > 0
                seen.setdefault(name, []).append(ranks[r]["pending"][name])
            entries = queue[torch.arange(queue.shape[1]) < count[:, None]]              # (filled, s)
            expected = torch.cat(seen[name])
            assert entries.shape[0] == expected.shape[0], (step, name)
            distance = torch.cdist(expected, entries, compute_mode="donot_use_mm_for_euclid_dist").amin(1)
            assert distance.max() < 1e-6, (step, name)


def test_two_nodes_write_one_run_and_one_adapter_with_identical_queues(runs):
    assert "GLOBAL_RANK: 1" in runs["node_logs"][1] and "GLOBAL_RANK: 0" in runs["node_logs"][0]
    run = _run_dir(runs["tmp"] / "ddp")
    assert (run / "adapter" / "adapter.safetensors").is_file()
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    _check_queues(runs["tmp"] / "ddp_probe")
    ends = [_probe(runs["tmp"] / "ddp_probe", r, "end") for r in (0, 1)]
    for key, value in ends[0]["adapter"].items():                        # DDP: every rank holds the same adapter
        assert torch.equal(value, ends[1]["adapter"][key]), key


def test_fsdp2_shards_the_base_and_trains_as_ddp_does(runs):
    fsdp, ddp = runs["tmp"] / "fsdp_probe", runs["tmp"] / "ddp_probe"
    ends = [_probe(fsdp, r, "end") for r in (0, 1)]
    assert all(end["sharded"] and end["trainable_sharded"] for end in ends)
    local_rows, rows = ends[0]["block_rows"]
    assert local_rows == rows // 2                                       # each rank holds half of a base block
    for step in STEPS:                                                   # same loss as DDP, on each rank's shard
        for r in (0, 1):
            torch.testing.assert_close(_probe(fsdp, r, step)["loss"], _probe(ddp, r, step)["loss"],
                                       rtol=1e-5, atol=1e-6)
    _check_queues(fsdp)
    reference = _probe(ddp, 0, "end")["adapter"]
    assert ends[0]["adapter"].keys() == reference.keys()
    for key, value in reference.items():                                 # gradients were averaged over the ranks
        assert torch.equal(ends[0]["adapter"][key], ends[1]["adapter"][key]), key
        torch.testing.assert_close(ends[0]["adapter"][key], value, rtol=1e-4, atol=1e-6, msg=key)
    for name, (queue, _) in _probe(ddp, 0, 3)["queues"].items():
        torch.testing.assert_close(_probe(fsdp, 0, 3)["queues"][name][0], queue, rtol=1e-4, atol=1e-5)


def test_fsdp2_checkpoint_is_one_adapter_only_file_that_resumes_exactly(runs):
    run = _run_dir(runs["tmp"] / "fsdp")
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_file()                                                # one file, not a distributed folder
    checkpoint = torch.load(last, weights_only=True)
    keys = list(checkpoint["state_dict"])
    assert keys and all(".lora_" in k or ".router" in k or ".contrastive_queue" in k for k in keys)
    assert not any("embed_tokens" in k or "mlp" in k for k in keys)
    trainable = [k for k in keys if ".lora_" in k or ".router" in k]
    assert len(checkpoint["optimizer_states"][0]["state"]) == len(trainable)      # AdamW state of adapters only
    straight, resumed = _probe(runs["tmp"] / "fsdp_probe", 0, "end"), _probe(runs["tmp"] / "resumed_probe", 0, "end")
    for key, value in straight["adapter"].items():
        assert torch.equal(resumed["adapter"][key], value), key
    queues = _probe(runs["tmp"] / "resumed_probe", 1, 3)["queues"]
    for name, (queue, count) in _probe(runs["tmp"] / "fsdp_probe", 1, 3)["queues"].items():
        assert torch.equal(queues[name][0], queue) and torch.equal(queues[name][1], count), name
    torch.testing.assert_close(_probe(runs["tmp"] / "resumed_probe", 0, 3)["loss"],
                               _probe(runs["tmp"] / "fsdp_probe", 0, 3)["loss"], rtol=0, atol=0)

    # the exported adapter is whole and loads onto a plain, unwrapped base
    from transformers import AutoModelForCausalLM

    model = load_adapter(AutoModelForCausalLM.from_pretrained(runs["base"]), run / "adapter")
    for key, value in adapter_state_dict(model).items():
        assert torch.equal(value, straight["adapter"][key]), key


def test_tensor_parallelism_is_refused_with_the_key_named(capsys, tmp_path):
    from moelora_lit.__main__ import main

    strategy = ('{"class_path": "lightning.pytorch.strategies.ModelParallelStrategy", '
                '"init_args": {"tensor_parallel_size": 2, "data_parallel_size": 1}}')
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", SMOKE, "--trainer.default_root_dir", str(tmp_path), "--trainer.strategy", strategy,
              "--trainer.devices", "2", "--trainer.accelerator", "cpu"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "tensor_parallel_size=2" in err and "tensor_parallel_size=1" in err
    assert not (tmp_path / "lightning_logs").exists()


def test_strategies_that_cannot_be_made_correct_are_refused():
    from lightning.pytorch.strategies import FSDPStrategy

    deepspeed = type("DeepSpeedStrategy", (), {})()    # Lightning's class needs the deepspeed package to build
    for strategy, world_size in ((FSDPStrategy(), 2), (deepspeed, 1)):
        trainer = type("Trainer", (), {"strategy": strategy, "world_size": world_size})()
        with pytest.raises(ValueError, match=r"trainer\.strategy=.*ModelParallelStrategy"):
            check_strategy(trainer)
    check_strategy(type("Trainer", (), {"strategy": FSDPStrategy(), "world_size": 1})())   # one GPU: allowed
