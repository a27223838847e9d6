"""The MoE router's auxiliary losses in the log line, as Megatron-LM prints them.

megatron-core's router records each layer's load-balancing and z losses (divided by their
coefficients) in a process-wide tracker, summed over micro-batches; Megatron-LM reduces that
tracker at every log line and prints `load_balancing_loss: ...`. Its reducer
(`moe_utils.reduce_aux_losses_tracker_across_ranks`) averages with `ReduceOp.AVG`, which Gloo does
not have, and lets a pipeline stage without MoE layers skip the reductions its tracker has no
entry for. Here: the same reductions as sums divided by the group size, the stage-local ones
(the entry's tensor/data-parallel groups, present on every rank of a stage or on none) before the
pipeline-wide sum, so that every rank calls the same collectives and ends with every layer. One
difference: the z loss, which megatron records with no group (Megatron-LM prints the logging rank's
own value), is averaged over the data-parallel ranks like the load-balancing loss, and over the
tensor-parallel ranks (each routes its own slice of the sequence under sequence parallelism).
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.distributed as dist

from .run_config import ModelArgs, moe_layer_pattern

# --moe-router-load-balancing-type -> the name megatron's router records its loss under
_BALANCING_NAMES = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss"}


def tracked_losses(m: ModelArgs) -> List[str]:
    """The router losses megatron records for this model (the same list on every rank)."""
    if not m.num_experts:
        return []
    names = []
    if m.moe_router_load_balancing_type in _BALANCING_NAMES and m.moe_aux_loss_coeff > 0:
        names.append(_BALANCING_NAMES[m.moe_router_load_balancing_type])
    if m.moe_z_loss_coeff:  # megatron records z_loss / coeff: nothing meaningful at coefficient 0
        names.append("z_loss")
    return names


def reset_router_losses() -> None:
    """Forget what megatron's process-wide tracker holds: another run in this process (a test, a
    notebook) may have left entries of another layer count, values, or process groups since destroyed."""
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    get_moe_layer_wise_logging_tracker().clear()


def reduce_router_losses(m: ModelArgs, microbatches: int, device) -> Dict[str, float]:
    """Each tracked loss, averaged over the MoE layers and the `microbatches` recorded since the
    last call, over the whole model; clears the tracker. Collective: every rank calls it."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.moe_utils import (clear_aux_losses_tracker,
                                                         get_moe_layer_wise_logging_tracker)

    names = tracked_losses(m)
    if not names:
        return {}
    tracker = get_moe_layer_wise_logging_tracker()
    per = max(sum(moe_layer_pattern(m.moe_layer_freq, m.num_layers)), 1) * max(microbatches, 1)
    out = {}
    for name in names:
        entry = tracker.get(name)
        values = torch.zeros(m.num_layers, dtype=torch.float32, device=device)
        if entry is not None:
            values += entry["values"].to(device=device, dtype=torch.float32)
            group = entry.get("reduce_group")
            if group is not None:
                dist.all_reduce(values, group=group)
            if not entry.get("reduce_group_has_dp", False):
                # averaged over data-parallel ranks; also the z loss, which megatron records without
                # a group and Megatron-LM then prints as the logging rank's own micro-batches' value
                dp = ps.get_data_parallel_group(with_context_parallel=False, partial_data_parallel=False)
                dist.all_reduce(values, group=dp)
                values /= dist.get_world_size(dp)
            if group is None and ps.get_tensor_model_parallel_world_size() > 1:
                # ... and over the tensor-parallel ranks: under sequence parallelism each routes its
                # own slice of the sequence (without it they hold the same value, which this keeps)
                tp = ps.get_tensor_model_parallel_group()
                dist.all_reduce(values, group=tp)
                values /= dist.get_world_size(tp)
            if entry.get("avg_group") is not None:
                dist.all_reduce(values, group=entry["avg_group"])
                values /= dist.get_world_size(entry["avg_group"])
        dist.all_reduce(values, group=ps.get_pipeline_model_parallel_group())
        out[name] = float(values.sum()) / per  # per MoE layer and micro-batch
    clear_aux_losses_tracker()
    return out
