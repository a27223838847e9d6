"""Bag embedding: the input side of token superposition.

A bag of s contiguous tokens becomes one latent position: the mean of the s token embeddings,
summed in fp32, divided by s and cast back to the model dtype. No new parameters.

The mean is taken *before* the tensor-parallel reduction of the vocab-parallel embedding, so:
  * the reduction (all-reduce, or reduce-scatter under sequence parallelism) moves L positions, not
    L*s tokens (the fp32 bag sums, divided by s after the reduction, so that TP > 1 rounds the mean
    once as TP = 1 does: twice the bytes of a bf16 baseline step for this one of the step's
    2 * layers + 1 TP reductions);
  * the sequence-parallel scatter happens after averaging, so a bag is never split across ranks.
Everything after the word embedding (learned position embeddings, the [s, b, h] layout, fp32
residual, dropout under the TP RNG tracker) is megatron's `LanguageModelEmbedding`, unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import VocabParallelEmbedding
from megatron.core.tensor_parallel.mappings import (
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)


def bag_mean(token_embeddings: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[..., s, h] -> [..., h]: fp32 sum over the bag, divided by s, cast to `dtype`."""
    s = token_embeddings.shape[-2]
    # sum(dtype=fp32) accumulates in fp32 without an fp32 copy of the [..., s, h] tokens
    return (torch.sum(token_embeddings, dim=-2, dtype=torch.float32) / s).to(dtype)


class BagVocabParallelEmbedding(VocabParallelEmbedding):
    """`VocabParallelEmbedding` that also accepts bags `[b, L, s]` of token ids.

    `[b, L]` input takes megatron's own forward. `[b, L, s]` input looks up this rank's vocabulary
    shard, averages each bag locally (a token belongs to exactly one shard, the others contribute
    zeros, so the per-rank means add up to the true mean) and then reduces like megatron does.
    """

    def forward(self, input_):
        if input_.dim() != 3:
            return super().forward(input_)
        tp = self.tp_group.size()
        if tp > 1:
            outside = (input_ < self.vocab_start_index) | (input_ >= self.vocab_end_index)
            local_ids = (input_ - self.vocab_start_index).masked_fill(outside, 0)
        else:
            local_ids = input_
        # megatron's choice: indexing under deterministic_mode (F.embedding's CUDA backward is not)
        tokens = self.weight[local_ids] if self.deterministic_mode else F.embedding(local_ids, self.weight)
        if tp == 1:  # tokens: [b, L, s, h]
            output = bag_mean(tokens, self.weight.dtype)  # [b, L, h]
            return output.transpose(0, 1).contiguous() if self.reduce_scatter_embeddings else output
        # in place, as megatron zeroes its lookup: a second [b, L, s, h] tensor would be s times
        # megatron's embedding output (the lookup's backward needs only the ids)
        tokens.masked_fill_(outside.unsqueeze(-1), 0.0)
        # This rank's share of the bag *sum*, kept in fp32 through the reduction, divided by s and
        # rounded once afterwards, as TP = 1 does: not a sum of per-rank bf16-rounded parts, nor of
        # per-rank quotients (each divided before adding: another fp32 value, a bf16 ulp off in
        # about 0.3% of elements). Costs one fp32 instead of bf16 [L, b, h] reduction per step.
        output_parallel = torch.sum(tokens, dim=-2, dtype=torch.float32)  # [b, L, h] fp32
        if self.reduce_scatter_embeddings:
            output_parallel = output_parallel.transpose(0, 1).contiguous()  # [L, b, h]
            output = reduce_scatter_to_sequence_parallel_region(output_parallel, group=self.tp_group)
        else:
            output = reduce_from_tensor_model_parallel_region(output_parallel, group=self.tp_group)
        return (output / tokens.shape[-2]).to(self.weight.dtype)


def enable_bag_inputs(embedding) -> None:
    """Let a megatron `LanguageModelEmbedding` accept `[b, L, s]` bags.

    The word-embedding module keeps its identity (same parameter, same initial values, same
    state-dict key); only its class gains the bag path. Swapping the class, rather than building a
    new module, keeps initialisation bit-identical to a stock GPTModel with the same seed.
    """
    word = embedding.word_embeddings
    if not isinstance(word, VocabParallelEmbedding):
        raise TypeError(f"enable_bag_inputs: expected a VocabParallelEmbedding, got {type(word)}")
    if not isinstance(word, BagVocabParallelEmbedding):
        word.__class__ = BagVocabParallelEmbedding
