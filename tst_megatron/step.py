"""One micro-batch's forward step and loss reduction, as megatron-core's schedules call them.

`make_forward_step` returns the `forward_step_func` that `get_forward_backward_func()` runs for
every micro-batch: the TST model returns a per-position loss ([b, L]: the multi-hot CE in the
superposition phase, the next-token CE in recovery), and the loss function reduces it over the
positions the loss mask keeps -- a masked mean (Megatron's default), or a sum with its count
under --calculate-per-token-loss.
"""
from __future__ import annotations

from functools import partial
from typing import Dict

import torch

def _to_device(batch: Dict[str, torch.Tensor], device) -> Dict[str, torch.Tensor]:
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _masked_mean(loss_mask: torch.Tensor, output: torch.Tensor):
    mask = loss_mask.float()
    loss = (output.float() * mask).sum() / mask.sum().clamp_min(1.0)
    # clone: megatron's schedule divides the returned loss by the micro-batch count in place
    return loss, {"loss": loss.detach().clone()}


def _masked_sum(loss_mask: torch.Tensor, output: torch.Tensor):
    """--calculate-per-token-loss: megatron's schedule sums these and finalize_model_grads divides
    the gradients by the global batch's count of trained positions (over micro-batches and DP)."""
    mask = loss_mask.float()
    total = (output.float() * mask).sum()
    count = mask.sum()
    return total, count.to(torch.int), {"loss_sum": total.detach().clone(), "count": count.detach()}


def make_forward_step(device, per_token: bool = False, timers=None):
    """`timers` (--timing-log-level 2): Megatron-LM's 'batch-generator' time, the fetch of each
    micro-batch (data loading and the host-to-device copy)."""
    reduce = _masked_sum if per_token else _masked_mean

    def forward_step(data_iterator, model):
        if timers is not None:
            timers("batch-generator", log_level=2).start()
        batch = _to_device(next(data_iterator), device)
        if timers is not None:
            timers("batch-generator").stop()
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, partial(reduce, batch["loss_mask"])

    return forward_step
