"""TSTGPTModel: megatron-core's GPTModel that also trains on bags.

Why a subclass and not hooks: the two TST changes sit exactly at two documented extension points
of GPTModel -- the embedding module and `compute_language_model_loss` -- and a subclass makes both
visible in one short file. It adds no parameters or buffers, so `state_dict()` and
`sharded_state_dict()` are identical to a stock GPTModel of the same config: a TST-trained
checkpoint is a plain megatron GPT checkpoint.

Inputs / labels by shape:
  * `input_ids [b, L]`, `labels [b, L]`         -> stock GPTModel (next-token CE), recovery phase;
  * `input_ids [b, L, s]`                       -> bag embedding (mean of s token embeddings);
  * `labels [b, L, s]`                          -> per-position multi-hot CE over the next bag.
`forward` returns the per-position loss `[b, L]` when labels are given, so megatron's pipeline
schedules and a usual `loss_func` (masked mean) work unchanged in both phases.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from megatron.core.models.gpt.gpt_model import GPTModel

from .embedding import enable_bag_inputs
from .loss import multi_hot_cross_entropy


class TSTGPTModel(GPTModel):
    """GPTModel accepting bag inputs `[b, L, s]` and bag labels `[b, L, s]`.

    Args (beyond GPTModel's): bag_weights -- the s normalised weights of the next-bag targets
    (`TSTConfig.bag_weights()`); None means uniform.
    """

    def __init__(self, *args, bag_weights: Optional[Sequence[float]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        if getattr(self.config, "mtp_num_layers", None) and bag_weights is not None:
            # megatron's MTP rolls labels along their last dim, which for [b, L, s] bags is the bag.
            raise ValueError("TSTGPTModel: multi-token prediction (mtp_num_layers) cannot be combined "
                             "with token superposition; disable one of them")
        self.bag_weights = None if bag_weights is None else [float(w) for w in bag_weights]
        if self.pre_process:
            enable_bag_inputs(self.embedding)

    def _weights_for(self, s: int):
        if self.bag_weights is not None and len(self.bag_weights) == s:
            return self.bag_weights
        if self.bag_weights is not None and s != 1:
            raise ValueError(f"TSTGPTModel: labels carry {s} targets per position but the model was "
                             f"built with {len(self.bag_weights)} bag weights (--tst-bag-size)")
        return None  # uniform; s == 1 is ordinary cross-entropy

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """[b, L] labels: megatron's vocab-parallel CE. [b, L, s] labels: multi-hot CE."""
        if labels.dim() == 2:
            return super().compute_language_model_loss(labels, logits)
        # logits [L, b, V/tp]; labels [b, L, s] -> [L, b, s]
        bag_labels = labels.transpose(0, 1).contiguous()
        loss = multi_hot_cross_entropy(logits, bag_labels, self._weights_for(labels.shape[-1]),
                                       tp_group=self.pg_collection.tp, inplace_backward=True)
        return loss.transpose(0, 1).contiguous()
