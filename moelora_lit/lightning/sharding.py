"""Training beyond one process: FSDP2 sharding of the base under Lightning's ``ModelParallelStrategy``, full adapter
tensors for checkpoints and exports, and the strategies refused because the module cannot make them correct.

- :func:`prepare_strategy` (the CLI, before any process group exists): ``ModelParallelStrategy``'s ``"auto"`` sizes
  become pure data parallelism (``data_parallel_size`` = world size, ``tensor_parallel_size=1``); Lightning's own
  "auto" would make every device of a node one tensor-parallel group, which this module does not implement.
- :func:`shard_model` (``MoELoRAModule.configure_model``): ``fully_shard`` on every block of the base
  (``_no_split_modules``: each decoder layer with its MoELoRA layers, frozen base weights and trainable adapters in
  one FSDP2 unit) and on the root (embeddings, final norm, head). Gradients are reduce-scattered as averages, so a
  step equals DDP's. The contrastive queues are buffers, which FSDP2 neither shards nor broadcasts: they stay
  whole on every rank and identical, because every rank pushes all ranks' anchors (``push_queues`` with
  ``all_gather``). Checkpoints become one adapter-only file (``save_distributed_checkpoint=False``).
- :func:`full_adapter_tensors`: inside it, sharded adapter parameters are their full tensors (a collective: every
  rank enters), so ``adapter_state_dict``, ``save_adapter`` and ``load_adapter_state_dict`` work unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from moelora_lit.inject import moelora_layers

FSDP2_HINT = ('trainer.strategy={"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"} '
              "(FSDP2, sharded data parallelism) or trainer.strategy=ddp")


def _model_parallel_strategy() -> type:
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy


def prepare_strategy(trainer: Any) -> None:
    """Resolve ``ModelParallelStrategy``'s ``"auto"`` sizes to data parallelism over every process, before the
    device mesh is built; refuse the strategies :func:`check_strategy` refuses, before anything loads."""
    strategy = trainer.strategy
    if isinstance(strategy, _model_parallel_strategy()):
        world = strategy.num_nodes * strategy.num_processes
        if strategy._tensor_parallel_size == "auto":
            strategy._tensor_parallel_size = 1
        if strategy._data_parallel_size == "auto" and isinstance(strategy._tensor_parallel_size, int):
            strategy._data_parallel_size = max(world // strategy._tensor_parallel_size, 1)
        _refuse_tensor_parallel(strategy._tensor_parallel_size, strategy._data_parallel_size)
    check_strategy(trainer)


def _refuse_tensor_parallel(tensor_parallel: Any, data_parallel: Any) -> None:
    if isinstance(tensor_parallel, int) and tensor_parallel > 1:
        raise ValueError(
            f"trainer.strategy=ModelParallelStrategy with tensor_parallel_size={tensor_parallel} "
            f"(data_parallel_size={data_parallel}): MoELoRAModule shards the base data-parallel only (FSDP2) and "
            "does not split layers across devices. Set trainer.strategy.init_args.tensor_parallel_size=1 and "
            "data_parallel_size to the number of processes (the CLI does so when both are left at 'auto')."
        )


def check_strategy(trainer: Any) -> None:
    """Refuse, with the key and the alternative, a strategy under which MoELoRA would not train correctly."""
    strategy = trainer.strategy
    name = type(strategy).__name__
    if name == "FSDPStrategy" and trainer.world_size > 1:
        # FSDP1 flat parameters: outside forward each rank holds a slice of the adapters, so the exported adapter
        # and the checkpoint would hold slices. Only one process (no sharding) is supported and checked.
        raise ValueError(f"trainer.strategy=fsdp (FSDP1) on {trainer.world_size} processes is not supported by "
                         f"MoELoRAModule (adapter export and checkpoints need whole tensors); use {FSDP2_HINT}")
    if name.startswith("DeepSpeed"):
        # Lightning's DeepSpeedStrategy drops the checkpoint's state_dict (the contrastive queues: no exact resume)
        # and saves the engine's module states instead; it also runs on CUDA only, so it is untested here.
        raise ValueError(f"trainer.strategy={name}: DeepSpeed is not supported by MoELoRAModule (its checkpoints "
                         f"lose the contrastive queues and are not adapter-only); use {FSDP2_HINT}")


def shard_model(module: Any) -> None:
    """Apply FSDP2 to ``module.model`` when the trainer's strategy is ``ModelParallelStrategy``; else check only."""
    trainer = module._trainer
    if trainer is None or module.model is None:
        return
    check_strategy(trainer)
    strategy = trainer.strategy
    if not isinstance(strategy, _model_parallel_strategy()):
        return
    from torch.distributed.fsdp import fully_shard

    mesh = module.device_mesh
    _refuse_tensor_parallel(mesh["tensor_parallel"].size(), mesh["data_parallel"].size())
    strategy._save_distributed_checkpoint = False  # one adapter-only file (the base is never saved)
    data_mesh = mesh["data_parallel"]
    model: nn.Module = module.model
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    for block in [m for m in model.modules() if type(m).__name__ in blocks]:
        fully_shard(block, mesh=data_mesh)  # a decoder layer with its MoELoRA layers: one all-gather per block
    fully_shard(model, mesh=data_mesh)       # the rest: embeddings, final norm, head
    model._is_fsdp_managed_module = True     # transformers' generate then keeps the ranks in step (synced_gpus)


def is_sharded(model: nn.Module | None) -> bool:
    """True when ``model`` holds DTensor parameters (FSDP2)."""
    from torch.distributed.tensor import DTensor

    return model is not None and any(isinstance(p, DTensor) for p in model.parameters())


@contextmanager
def full_adapter_tensors(model: nn.Module, write_back: bool = False) -> Iterator[None]:
    """Within the block, every sharded adapter parameter of ``model`` is a plain tensor holding its full value.

    Every rank must enter (each parameter is all-gathered). With ``write_back``, values written into the full
    tensors are scattered back into the shards on exit (loading). A model without DTensors is left as it is.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    swapped: list[tuple[nn.Module, str, DTensor]] = []
    for _, layer in moelora_layers(model):
        for child_name, top in layer.named_children():
            if child_name not in layer.adapter_module_names:
                continue
            for child in top.modules():   # a MixLoRA block keeps its projections' adapters in ModuleDicts
                for name, param in list(child._parameters.items()):
                    if isinstance(param, DTensor):
                        full = nn.Parameter(param.full_tensor().detach(), requires_grad=False)   # (out, in) whole
                        child._parameters[name] = full
                        swapped.append((child, name, param))
    try:
        yield
    finally:
        for child, name, sharded in swapped:
            full = child._parameters[name]
            child._parameters[name] = sharded
            if write_back:
                with torch.no_grad():
                    local = distribute_tensor(full.detach().to(sharded.dtype), sharded.device_mesh, sharded.placements)
                    sharded.to_local().copy_(local.to_local())


def checkpoint_state_dict(module: Any, checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's ``state_dict``. ``ModelParallelStrategy`` loads it itself (non-strictly) and removes it
    before ``on_load_checkpoint``; it is then read again from the (adapter-only, small) file to be checked."""
    if "state_dict" in checkpoint or not is_sharded(module.model) or module._trainer is None:
        return checkpoint.get("state_dict", {})
    path = module.trainer.ckpt_path
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)["state_dict"]
