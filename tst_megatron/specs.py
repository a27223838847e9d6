"""Layer specs for dense and MoE GPTs: megatron-core's own, made to run on CPU too.

* Transformer Engine present and CUDA available -> megatron's TE spec, untouched.
* Otherwise -> megatron's local spec with two substitutions that stock megatron-core cannot do
  without CUDA: `SDPAttention` as core attention (on CPU only; stock `DotProductAttention` takes
  its scratch buffer from the CUDA memory pool) and `TorchNorm` where megatron would use its torch
  norm wrapper (which refuses sequence parallelism).

Both substitutes have no parameters of their own / the same parameters as what they replace, so
state-dict keys stay exactly those of stock megatron-core.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig


def transformer_engine_available() -> bool:
    """True when Transformer Engine imports and a CUDA device exists."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # TE is optional: ImportError, or a broken build
        return False
    return True


class ZeroCenteredRMSNorm(torch.nn.RMSNorm):
    """RMSNorm whose weight is stored as gamma - 1 (Megatron-LM's --apply-layernorm-1p, TE's
    zero_centered_gamma): initialised at 0, applied as (1 + weight)."""

    def reset_parameters(self) -> None:
        if self.weight is not None:
            torch.nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.rms_norm(x, self.normalized_shape, 1 + self.weight, self.eps)


class ZeroCenteredLayerNorm(torch.nn.LayerNorm):
    """LayerNorm with the weight stored as gamma - 1 (zero-centred gamma); the bias is unchanged."""

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.weight is not None:
            torch.nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.layer_norm(x, self.normalized_shape, 1 + self.weight, self.bias, self.eps)


class TorchNorm:
    """torch LayerNorm / RMSNorm built from a TransformerConfig, usable with sequence parallel.

    Under sequence parallelism each TP rank normalises its own slice of the sequence, so the
    norm's gradients are partial sums; marking the parameters `sequence_parallel` makes megatron's
    `finalize_model_grads` all-reduce them over the TP group (the same contract as TE's norms).
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        zero_centered = config.layernorm_zero_centered_gamma
        if config.normalization == "RMSNorm":
            kind = ZeroCenteredRMSNorm if zero_centered else torch.nn.RMSNorm
            norm = kind(hidden_size, eps=eps, dtype=config.params_dtype)
        elif config.normalization == "LayerNorm":
            kind = ZeroCenteredLayerNorm if zero_centered else torch.nn.LayerNorm
            norm = kind(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            raise ValueError(f"TorchNorm: unsupported normalization {config.normalization!r}")
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm


class SDPAttention(MegatronModule):
    """Core attention through `torch.nn.functional.scaled_dot_product_attention`.

    A drop-in for megatron's `DotProductAttention` (same constructor and forward signature, no
    parameters) that needs no CUDA scratch buffer. Causal self-attention with GQA; dropout draws
    from the RNG megatron's attention uses: the model-parallel tracker (TP ranks drop different
    heads), or under sequence parallel the default generator.
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type=None, pg_collection=None, **_unused):
        super().__init__(config=config)
        if config.context_parallel_size > 1:
            raise ValueError("SDPAttention does not implement context parallelism "
                             "(--context-parallel-size > 1 needs Transformer Engine)")
        # what megatron's DotProductAttention would do and SDPA does not: refused, not ignored
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(f"SDPAttention: softmax_type {config.softmax_type!r} is not implemented (vanilla only)")
        if getattr(config, "window_size", None) is not None:
            raise ValueError(f"SDPAttention: sliding-window attention (window_size {config.window_size}) is not "
                             "implemented")
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **_unused):
        if packed_seq_params is not None:
            raise ValueError("SDPAttention: packed sequences need Transformer Engine")
        mask_type = attn_mask_type or self.attn_mask_type
        if mask_type != AttnMaskType.causal:
            raise ValueError(f"SDPAttention supports causal self-attention only (got {mask_type})")
        sq, b, heads, dim = query.shape
        if key.shape[2] != heads:  # GQA: query head i reads key/value group i // (heads / groups)
            rep = heads // key.shape[2]
            key = key.repeat_interleave(rep, dim=2)
            value = value.repeat_interleave(rep, dim=2)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        dropout = self.dropout_p if self.training else 0.0
        if dropout > 0:
            # the RNG megatron's DotProductAttention drops attention probabilities with: the
            # tensor-parallel tracker's, except under sequence parallel (the default generator)
            rng = (tensor_parallel.get_cuda_rng_tracker().fork() if not self.config.sequence_parallel
                   else contextlib.nullcontext())
            with rng:
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True,
                                                     scale=self.softmax_scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * dim)


def _is_moe(mlp_spec) -> bool:
    from megatron.core.transformer.moe.moe_layer import MoELayer

    module = getattr(mlp_spec, "module", None)
    return isinstance(module, type) and issubclass(module, MoELayer)


def _swap(submodules, name, old, new):
    if getattr(submodules, name, None) is old:
        setattr(submodules, name, new)


def _make_cpu_capable(layer_spec, use_sdpa: bool):
    layer_spec = copy.deepcopy(layer_spec)
    sub = layer_spec.submodules
    if _is_moe(sub.mlp) and sub.sharded_state_dict_keys_map:
        # megatron's local spec files every layer's pre-MLP norm under TE's fused name
        # (mlp.linear_fc1.layer_norm_*), MoE layers too; TE's MoE layers keep a norm of their own
        # (pre_mlp_layernorm.*). Keep TE's name, so that a checkpoint of either loads in the other
        # (an MoE trained on GPUs with TE, exported or resumed on a machine without it, and back).
        sub.sharded_state_dict_keys_map = {k: v for k, v in sub.sharded_state_dict_keys_map.items()
                                           if k != "pre_mlp_layernorm."}
    for name in ("input_layernorm", "pre_mlp_layernorm"):
        _swap(sub, name, WrappedTorchNorm, TorchNorm)
    attn = sub.self_attention.submodules
    for name in ("q_layernorm", "k_layernorm"):
        _swap(attn, name, WrappedTorchNorm, TorchNorm)
    if use_sdpa:
        attn.core_attention = SDPAttention
    return layer_spec


def gpt_block_spec(config: TransformerConfig, use_transformer_engine: Optional[bool] = None,
                   vp_stage: Optional[int] = None) -> TransformerBlockSubmodules:
    """The decoder block spec for this pipeline stage (dense, MoE, or mixed via moe_layer_freq).

    megatron's `get_gpt_decoder_block_spec` decides the dense/MoE layer pattern and the layers this
    stage builds; on the local path we swap in CPU-capable attention and norms.
    """
    if use_transformer_engine is None:
        use_transformer_engine = transformer_engine_available()
    if config.num_moe_experts and not use_transformer_engine:
        from .cpu import define_missing_te_names

        define_missing_te_names()  # megatron's MoE router on a machine without TE (a GPU too)
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=use_transformer_engine,
                                       normalization=config.normalization, vp_stage=vp_stage)
    if use_transformer_engine:
        return block
    use_sdpa = not torch.cuda.is_available()
    layer_specs = [_make_cpu_capable(s, use_sdpa) for s in block.layer_specs]
    final_norm = block.layer_norm
    if final_norm is WrappedTorchNorm or config.normalization == "RMSNorm":
        # megatron-core 0.16.1 gives the final norm apex's FusedLayerNorm whenever apex imports,
        # and it asserts LayerNorm: an RMSNorm model on a GPU with apex but no TE could not be built
        final_norm = TorchNorm
    return TransformerBlockSubmodules(layer_specs=layer_specs, layer_norm=final_norm)
