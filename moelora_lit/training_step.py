"""The trainer-agnostic training step (docs/design.md §1.5 and §7): one function composes the loss, one runs the
after-backward queue push. The Lightning module and the Hugging Face trainers both call these two, and nothing else
of the auxiliary-loss machinery."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from moelora_lit.adapters import require_adapters

LOSS_TERMS = ("task_loss", "contrastive_loss", "balance_loss", "z_loss")  # train/<term> tags, in this order


def step_loss(model: nn.Module, task_loss: Tensor, aux_divisor: int = 1) -> dict[str, Tensor]:
    """``L = L_task + (w_cl sum L_cl + w_bal sum L_bal + w_z sum L_z) / aux_divisor`` (docs/design.md §1.5).

    Args:
        model: the injected model whose latest training forward produced ``task_loss``.
        task_loss: the task loss of that forward, as the trainer will back-propagate it.
        aux_divisor: the gradient-accumulation steps when the trainer does not divide the returned loss itself
            (its task loss is already normalised over the accumulated batch), else 1. The auxiliary terms are
            per-micro-batch means, so either way each enters the optimizer step with weight 1 / steps.

    Returns:
        ``loss`` (to back-propagate) and the weighted terms by :data:`LOSS_TERMS` name, undivided.
    """
    aux = require_adapters(model, "step_loss").aux_losses(model)
    loss = task_loss + (aux["contrastive"] + aux["balance"] + aux["z"]) / aux_divisor
    return {"loss": loss, "task_loss": task_loss, "contrastive_loss": aux["contrastive"],
            "balance_loss": aux["balance"], "z_loss": aux["z"]}


def after_backward(model: nn.Module, all_gather: Callable[[Tensor], Tensor] | None = None) -> None:
    """This micro-batch's contrastive anchors into the queues (docs/design.md §1.3) and FlyLoRA's rank-bias update,
    after backward, so that a forward recomputed by gradient checkpointing saw the same state. ``all_gather`` (under
    data parallelism: a local tensor to the stacked ``(world, ...)`` tensors of all ranks) makes every rank push all
    ranks' anchors in rank order and sum all ranks' choices, so the state stays identical everywhere."""
    require_adapters(model, "after_backward").step_end(all_gather)
