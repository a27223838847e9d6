"""Megatron GPT <-> Hugging Face `transformers` conversion (Llama, Qwen3, Qwen3-MoE).

Pure functions over FULL (unsharded: TP = PP = EP = 1 equivalent) state dicts. Reading and
writing the trainer's torch_dist checkpoints (any TP/PP/EP) is a separate layer that gathers a
full state dict first and hands it here.

Megatron side -- the plain `state_dict()` naming of a TP=1 GPTModel (a leading "module." of a DDP
wrapper is stripped):

    embedding.word_embeddings.weight                         [V, h]
    decoder.layers.{i}.input_layernorm.weight                [h]
    decoder.layers.{i}.self_attention.linear_qkv.weight      [ng*(np/ng+2)*d, h]  per query group:
                                                             (np/ng) query heads, 1 key, 1 value
    decoder.layers.{i}.self_attention.q_layernorm.weight     [d]   (Qwen3 / Qwen3-MoE)
    decoder.layers.{i}.self_attention.k_layernorm.weight     [d]
    decoder.layers.{i}.self_attention.linear_proj.weight     [h, np*d]
    decoder.layers.{i}.pre_mlp_layernorm.weight              [h]
    decoder.layers.{i}.mlp.linear_fc1.weight                 [2f, h] = [gate; up]   (dense layer)
    decoder.layers.{i}.mlp.linear_fc2.weight                 [h, f]
    decoder.layers.{i}.mlp.router.weight                     [E, h]                 (MoE layer)
    decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc1.weight   [2f_moe, h] = [gate; up]
    decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc2.weight   [h, f_moe]
    decoder.final_layernorm.weight                           [h]
    output_layer.weight                                      [V, h]  (absent when tied)
    *.bias                                                   Llama with add_bias_linear=True only
    *._extra_state                                           ignored on input

Transformer Engine spec names are accepted as input too: `self_attention.linear_qkv.layer_norm_weight`
(input norm fused into QKV), `mlp.linear_fc1.layer_norm_weight` (pre-MLP norm fused into FC1 in
dense layers) and TEGroupedMLP experts `mlp.experts.linear_fc1.weight{e}`. `hf_to_megatron` writes
either layout (`key_style="local"` or `"te"`, `grouped_experts=True` for TEGroupedMLP names).
The local layout includes the `_extra_state: None` entries megatron's local linears carry, so its
output equals a local-spec model's `state_dict()` exactly and loads with `strict=True`; the TE
layout carries no `_extra_state` entries (load TE models with strict=False or through dist-ckpt).

Hugging Face side: the checkpoint format of `LlamaForCausalLM`, `Qwen3ForCausalLM` and
`Qwen3MoeForCausalLM` (`model.layers.{i}.self_attn.q_proj.weight`, ...; Qwen3-MoE experts per
expert, `model.layers.{i}.mlp.experts.{e}.gate_proj.weight`, router `mlp.gate.weight`), which
every transformers version reads (v5 fuses the experts on load). transformers-v5 in-memory
fused experts (`mlp.experts.gate_up_proj [E, 2f, h]`, `mlp.experts.down_proj [E, h, f]`) are
accepted as input as well.

Config correspondence (megatron -> HF):
    num_layers -> num_hidden_layers; hidden_size; num_attention_heads;
    num_query_groups -> num_key_value_heads; kv_channels -> head_dim;
    ffn_hidden_size -> intermediate_size; layernorm_epsilon -> rms_norm_eps (also the QK-norm eps);
    init_method_std -> initializer_range; rotary_base -> rope_theta;
    share_embeddings_and_output_weights -> tie_word_embeddings;
    num_moe_experts -> num_experts; moe_router_topk -> num_experts_per_tok;
    moe_ffn_hidden_size -> moe_intermediate_size; moe_layer_freq -> mlp_only_layers
    (decoder_sparse_step = 1, dense layers listed explicitly: megatron's int frequency k makes
    layer i MoE when i % k == 0, HF's decoder_sparse_step when (i+1) % k == 0, so the list is
    always used).

Qwen3-MoE routing parity (HF: softmax over all E experts, top-k, then if norm_topk_prob divide by
the sum of the k kept probabilities):
    norm_topk_prob = True   <->  moe_router_pre_softmax = False   (megatron default)
        megatron takes top-k of the logits and a softmax over those k logits; softmax is monotone,
        so the same experts win, and softmax over the k kept logits equals the renormalised
        full-softmax probabilities exactly (the full partition function cancels).
    norm_topk_prob = False  <->  moe_router_pre_softmax = True
        softmax over all experts, then top-k, no renormalisation.
    Both also need: moe_router_score_function = "softmax", moe_router_topk_scaling_factor = None,
    moe_router_num_groups / moe_router_group_topk = None, moe_router_enable_expert_bias = False,
    moe_expert_capacity_factor = None (no token dropping), moe_shared_expert_intermediate_size =
    None, moe_apply_probs_on_input = False, moe_latent_size = None. (Qwen3-30B-A3B and
    Qwen3-235B-A22B ship norm_topk_prob = True, i.e. megatron's default.)
    moe_router_dtype = "fp32" is accepted (HF computes the router GEMM in the model dtype: a
    rounding-level difference in bf16), the load-balancing loss settings only matter in training.

Vocabulary: pass the megatron (padded) vocabulary size, i.e. the embedding's row count; HF models
accept an embedding larger than the tokenizer.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

__all__ = [
    "ARCHITECTURES",
    "NON_TRANSFORMER_CONFIG_KEYS",
    "choose_arch",
    "check_representable",
    "hf_config_from_megatron",
    "megatron_config_from_hf",
    "megatron_to_hf",
    "hf_to_megatron",
    "save_hf_directory",
    "load_hf_directory",
]

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
_ARCH_BY_MODEL_TYPE = {v: k for k, v in ARCHITECTURES.items()}

# Keys of `megatron_config_from_hf`'s result that are GPTModel / Megatron-LM arguments rather than
# TransformerConfig fields.
NON_TRANSFORMER_CONFIG_KEYS = (
    "vocab_size",
    "max_position_embeddings",
    "rotary_base",
    "untie_embeddings_and_output_weights",
    "position_embedding_type",
    "rotary_percent",
)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


# ----------------------------------------------------------------------------------------------
# Reading a TransformerConfig-like object
# ----------------------------------------------------------------------------------------------

_MISSING = object()


def _tc_defaults() -> Dict[str, Any]:
    from megatron.core.transformer.transformer_config import TransformerConfig

    out = {}
    for f in dataclasses.fields(TransformerConfig):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out


class _Fields:
    """Uniform read access to a TransformerConfig, a dict of its fields, or an args namespace.

    Missing fields take TransformerConfig's defaults; the values `__post_init__` derives
    (num_query_groups, kv_channels, ffn_hidden_size, moe_ffn_hidden_size) are derived here the
    same way. A few Megatron-LM argument names are understood: swiglu, norm_epsilon,
    apply_layernorm_1p, group_query_attention.
    """

    def __init__(self, tc: Any):
        if isinstance(tc, _Fields):
            tc = tc._src
        self._src = tc
        self._defaults: Optional[Dict[str, Any]] = None

    def raw(self, name: str, default: Any = _MISSING) -> Any:
        src = self._src
        if isinstance(src, Mapping):
            value = src.get(name, _MISSING)
        else:
            value = getattr(src, name, _MISSING)
        if value is _MISSING:
            if default is not _MISSING:
                return default
            if self._defaults is None:
                self._defaults = _tc_defaults()
            return self._defaults.get(name)
        return value

    def has(self, name: str) -> bool:
        src = self._src
        return (name in src) if isinstance(src, Mapping) else hasattr(src, name)

    def __getitem__(self, name: str) -> Any:
        heads = self.raw("num_attention_heads")
        hidden = self.raw("hidden_size")
        if name == "num_query_groups":
            if self.has("group_query_attention") and not self.raw("group_query_attention"):
                return heads
            return self.raw("num_query_groups") or heads
        if name == "kv_channels":
            return self.raw("kv_channels") or (hidden // heads if heads else None)
        if name == "ffn_hidden_size":
            return self.raw("ffn_hidden_size") or 4 * hidden
        if name == "moe_ffn_hidden_size":
            return self.raw("moe_ffn_hidden_size") or self["ffn_hidden_size"]
        if name == "gated_linear_unit":
            return bool(self.raw("gated_linear_unit") or self.raw("swiglu", False))
        if name == "activation_func":
            if self.raw("swiglu", False):
                return "silu"
            return self.raw("activation_func")
        if name == "layernorm_epsilon":
            if not self.has("layernorm_epsilon") and self.has("norm_epsilon"):
                return self.raw("norm_epsilon")
            return self.raw("layernorm_epsilon")
        if name == "layernorm_zero_centered_gamma":
            return bool(self.raw("layernorm_zero_centered_gamma") or self.raw("apply_layernorm_1p", False))
        return self.raw(name)


def _is_silu(fn: Any) -> bool:
    if isinstance(fn, str):
        return fn.lower() in ("silu", "swish", "swiglu")
    return fn is torch.nn.functional.silu or getattr(fn, "__name__", "") == "silu"


def _moe_layer_pattern(f: _Fields) -> List[bool]:
    """[is_moe] per layer, from num_moe_experts and moe_layer_freq (megatron's convention)."""
    n = int(f["num_layers"])
    if not f["num_moe_experts"]:
        return [False] * n
    freq = f["moe_layer_freq"]
    if freq is None:
        freq = 1
    if isinstance(freq, int):
        if freq < 1:
            raise ValueError(f"moe_layer_freq: must be >= 1, got {freq}")
        return [i % freq == 0 for i in range(n)]
    if isinstance(freq, (list, tuple)):
        if len(freq) != n:
            raise ValueError(f"moe_layer_freq: list of length {len(freq)} for num_layers={n}")
        return [bool(x) for x in freq]
    raise ValueError(f"moe_layer_freq: unsupported value {freq!r} (int or list expected)")


# ----------------------------------------------------------------------------------------------
# Architecture choice and representability
# ----------------------------------------------------------------------------------------------

def choose_arch(tc: Any) -> str:
    """The HF architecture for a megatron config: MoE -> Qwen3-MoE, QK-norm -> Qwen3, else Llama.

    Only picks; `check_representable` says whether the config fits.
    """
    f = _Fields(tc)
    if f["num_moe_experts"]:
        return "Qwen3MoeForCausalLM"
    if f["qk_layernorm"]:
        return "Qwen3ForCausalLM"
    return "LlamaForCausalLM"


def _fail(arch: str, field: str, why: str):
    raise ValueError(f"{arch} cannot represent {field}: {why}")


def check_representable(arch: str, tc: Any, *, position_embedding_type: str = "rope",
                        rotary_percent: float = 1.0, rope_scaling: bool = False) -> None:
    """Raise ValueError naming the offending field when `arch` cannot express the megatron config.

    `tc`: a TransformerConfig, a dict of its fields or an args namespace. The keyword arguments
    are the GPTModel arguments that matter (megatron defaults shown).
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch: unsupported {arch!r}; one of {sorted(ARCHITECTURES)}")
    f = _Fields(tc)
    is_moe_arch = arch == "Qwen3MoeForCausalLM"

    if position_embedding_type != "rope":
        _fail(arch, "position_embedding_type", f"{position_embedding_type!r}; only 'rope' is supported")
    if rotary_percent != 1.0:
        _fail(arch, "rotary_percent", f"{rotary_percent} (partial rotary); needs 1.0")
    if rope_scaling:
        _fail(arch, "rope_scaling", "megatron's Llama-3.1 RoPE scaling is not exported; needs False")
    if f["rotary_interleaved"]:
        _fail(arch, "rotary_interleaved", "HF applies rotate-half RoPE; needs False")
    if f["normalization"] != "RMSNorm":
        _fail(arch, "normalization", f"{f['normalization']!r}; needs 'RMSNorm'")
    if f["layernorm_zero_centered_gamma"]:
        _fail(arch, "layernorm_zero_centered_gamma", "needs False")
    if f["apply_residual_connection_post_layernorm"]:
        _fail(arch, "apply_residual_connection_post_layernorm", "needs False")
    if not f["gated_linear_unit"] or not _is_silu(f["activation_func"]):
        _fail(arch, "gated_linear_unit/activation_func", "the MLP must be SwiGLU "
              "(gated_linear_unit=True, activation_func=silu)")
    if f["glu_linear_offset"]:
        _fail(arch, "glu_linear_offset", "needs 0.0")
    if f["activation_func_clamp_value"] is not None:
        _fail(arch, "activation_func_clamp_value", "needs None")
    if f["add_qkv_bias"]:
        _fail(arch, "add_qkv_bias", "a QKV-only bias has no HF counterpart here")
    if f["add_bias_linear"] and arch != "LlamaForCausalLM":
        _fail(arch, "add_bias_linear", "needs False (only Llama has attention_bias + mlp_bias)")
    kv = f["kv_channels"]
    scale = f["softmax_scale"]
    if scale is not None and abs(scale - kv ** -0.5) > 1e-12 * kv ** -0.5:
        _fail(arch, "softmax_scale", f"{scale}; HF uses head_dim**-0.5")
    if f["apply_query_key_layer_scaling"]:
        _fail(arch, "apply_query_key_layer_scaling", "needs False")
    if f["softmax_type"] not in (None, "vanilla"):
        _fail(arch, "softmax_type", f"{f['softmax_type']!r}; needs 'vanilla'")
    for name in ("qk_l2_norm", "qk_clip", "attention_output_gate", "multi_latent_attention",
                 "heterogeneous_block_specs"):
        if f[name]:
            _fail(arch, name, "needs False")
    for name in ("window_size", "no_rope_freq", "experimental_attention_variant", "mtp_num_layers"):
        if f[name]:
            _fail(arch, name, "needs None")
    heads, groups = f["num_attention_heads"], f["num_query_groups"]
    if not heads or heads % groups:
        _fail(arch, "num_query_groups", f"{groups} must divide num_attention_heads={heads}")

    if arch == "LlamaForCausalLM":
        if f["qk_layernorm"]:
            _fail(arch, "qk_layernorm", "Llama has no QK-norm (use Qwen3ForCausalLM)")
    elif not f["qk_layernorm"]:
        _fail(arch, "qk_layernorm", "Qwen3 always normalises queries and keys; needs True")

    if not is_moe_arch:
        if f["num_moe_experts"]:
            _fail(arch, "num_moe_experts", "a dense architecture; use Qwen3MoeForCausalLM")
        return

    if not f["num_moe_experts"]:
        _fail(arch, "num_moe_experts", "Qwen3-MoE needs experts")
    _moe_layer_pattern(f)  # validates moe_layer_freq
    if f["moe_shared_expert_intermediate_size"]:
        _fail(arch, "moe_shared_expert_intermediate_size", "Qwen3-MoE has no shared expert")
    if f["moe_router_score_function"] != "softmax":
        _fail(arch, "moe_router_score_function", f"{f['moe_router_score_function']!r}; needs 'softmax'")
    if f["moe_router_topk_scaling_factor"] not in (None, 1.0):
        _fail(arch, "moe_router_topk_scaling_factor", "needs None")
    if f["moe_router_num_groups"] or f["moe_router_group_topk"]:
        _fail(arch, "moe_router_num_groups/moe_router_group_topk", "group-limited routing; needs None")
    if f["moe_router_enable_expert_bias"]:
        _fail(arch, "moe_router_enable_expert_bias", "needs False")
    if f["moe_expert_capacity_factor"] is not None:
        _fail(arch, "moe_expert_capacity_factor", "token dropping; needs None")
    if f["moe_apply_probs_on_input"]:
        _fail(arch, "moe_apply_probs_on_input", "needs False")
    if f["moe_latent_size"]:
        _fail(arch, "moe_latent_size", "needs None")
    if f["moe_router_force_load_balancing"]:
        _fail(arch, "moe_router_force_load_balancing", "needs False")
    topk, experts = f["moe_router_topk"], f["num_moe_experts"]
    if not 1 <= topk <= experts:
        _fail(arch, "moe_router_topk", f"{topk} with {experts} experts")


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------

def hf_config_from_megatron(arch: Optional[str], tc: Any, vocab_size: int,
                            max_position_embeddings: int, rotary_base: float,
                            tie_word_embeddings: bool, *, position_embedding_type: str = "rope",
                            rotary_percent: float = 1.0, rope_scaling: bool = False,
                            torch_dtype: Optional[str] = None, bos_token_id: Optional[int] = None,
                            eos_token_id: Optional[int] = None) -> Dict[str, Any]:
    """The HF `config.json` dict for a megatron model (arch None -> `choose_arch`).

    Raises ValueError (via `check_representable`) when the architecture cannot express it.
    `torch_dtype` is informational ("float32", "bfloat16", ...).
    """
    arch = arch or choose_arch(tc)
    check_representable(arch, tc, position_embedding_type=position_embedding_type,
                        rotary_percent=rotary_percent, rope_scaling=rope_scaling)
    f = _Fields(tc)
    theta = float(rotary_base)
    cfg: Dict[str, Any] = {
        "architectures": [arch],
        "model_type": ARCHITECTURES[arch],
        "vocab_size": int(vocab_size),
        "hidden_size": int(f["hidden_size"]),
        "intermediate_size": int(f["ffn_hidden_size"]),
        "num_hidden_layers": int(f["num_layers"]),
        "num_attention_heads": int(f["num_attention_heads"]),
        "num_key_value_heads": int(f["num_query_groups"]),
        "head_dim": int(f["kv_channels"]),
        "hidden_act": "silu",
        "max_position_embeddings": int(max_position_embeddings),
        "initializer_range": float(f["init_method_std"]),
        "rms_norm_eps": float(f["layernorm_epsilon"]),
        "use_cache": True,
        "tie_word_embeddings": bool(tie_word_embeddings),
        "rope_theta": theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "attention_bias": bool(f["add_bias_linear"]),
        "attention_dropout": 0.0,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
    }
    if torch_dtype is not None:
        cfg["torch_dtype"] = str(torch_dtype).replace("torch.", "")
    if arch == "LlamaForCausalLM":
        cfg["mlp_bias"] = bool(f["add_bias_linear"])
        cfg["pretraining_tp"] = 1
    else:
        cfg["use_sliding_window"] = False
        cfg["sliding_window"] = None
        cfg["max_window_layers"] = int(f["num_layers"])
    if arch == "Qwen3MoeForCausalLM":
        pattern = _moe_layer_pattern(f)
        cfg.update({
            "num_experts": int(f["num_moe_experts"]),
            "num_experts_per_tok": int(f["moe_router_topk"]),
            "moe_intermediate_size": int(f["moe_ffn_hidden_size"]),
            "norm_topk_prob": not bool(f["moe_router_pre_softmax"]),
            "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i, moe in enumerate(pattern) if not moe],
            "output_router_logits": False,
            "router_aux_loss_coef": _first(f["moe_aux_loss_coeff"]) or 0.0,
        })
    return cfg


def _first(x: Any) -> Any:
    return x[0] if isinstance(x, (list, tuple)) else x


def _arch_of(hf_config: Mapping[str, Any]) -> str:
    for a in hf_config.get("architectures") or ():
        if a in ARCHITECTURES:
            return a
    mt = hf_config.get("model_type")
    if mt in _ARCH_BY_MODEL_TYPE:
        return _ARCH_BY_MODEL_TYPE[mt]
    raise ValueError(f"architectures/model_type: unsupported {hf_config.get('architectures')!r} / "
                     f"{mt!r}; one of {sorted(ARCHITECTURES)}")


def _as_dict(cfg: Any) -> Dict[str, Any]:
    if isinstance(cfg, Mapping):
        return dict(cfg)
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    raise TypeError(f"expected a config dict, got {type(cfg).__name__}")


class _Shape:
    """The shape facts both conversions need, read from an HF config dict."""

    def __init__(self, hf_config: Any):
        c = _as_dict(hf_config)
        self.arch = _arch_of(c)
        self.layers = int(c["num_hidden_layers"])
        self.hidden = int(c["hidden_size"])
        self.heads = int(c["num_attention_heads"])
        self.groups = int(c.get("num_key_value_heads") or self.heads)
        self.head_dim = int(c.get("head_dim") or self.hidden // self.heads)
        self.ffn = int(c["intermediate_size"])
        self.vocab = int(c["vocab_size"])
        self.tied = bool(c.get("tie_word_embeddings", False))
        self.qk_norm = self.arch != "LlamaForCausalLM"
        if self.arch == "LlamaForCausalLM":
            attn_bias, mlp_bias = bool(c.get("attention_bias")), bool(c.get("mlp_bias"))
            if attn_bias != mlp_bias:
                raise ValueError("attention_bias/mlp_bias: megatron's add_bias_linear biases all "
                                 f"linear layers; got attention_bias={attn_bias}, mlp_bias={mlp_bias}")
            self.bias = attn_bias
        else:
            if c.get("attention_bias"):
                raise ValueError(f"attention_bias: {self.arch} with attention biases has no megatron "
                                 "counterpart (add_bias_linear also biases the MLP)")
            self.bias = False
        if self.heads % self.groups:
            raise ValueError(f"num_key_value_heads: {self.groups} must divide {self.heads}")
        self.moe = [False] * self.layers
        if self.arch == "Qwen3MoeForCausalLM":
            # transformers v5 writes the expert count as `num_local_experts` (its attribute_map
            # alias of num_experts); earlier versions and the hub's Qwen3-MoE configs `num_experts`
            self.experts = int(c["num_experts"] if "num_experts" in c else c["num_local_experts"])
            self.moe_ffn = int(c["moe_intermediate_size"])
            step = int(c.get("decoder_sparse_step") or 1)
            only = set(c.get("mlp_only_layers") or ())
            self.moe = [self.experts > 0 and i not in only and (i + 1) % step == 0
                        for i in range(self.layers)]


def megatron_config_from_hf(hf_config: Any) -> Dict[str, Any]:
    """TransformerConfig fields plus GPTModel / Megatron-LM settings rebuilding the HF model.

    Keys listed in NON_TRANSFORMER_CONFIG_KEYS (vocab_size, max_position_embeddings, rotary_base,
    untie_embeddings_and_output_weights, position_embedding_type, rotary_percent) are GPTModel /
    Megatron-LM argument names; everything else is a TransformerConfig field
    (`activation_func` is `torch.nn.functional.silu`). Dropouts are 0.0 as in the HF models.
    Raises ValueError naming the HF field the megatron model cannot reproduce.
    """
    c = _as_dict(hf_config)
    s = _Shape(c)
    act = c.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"hidden_act: {act!r}; megatron export supports SwiGLU (silu) only")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, Mapping) else "default"
    if rope_type != "default":
        raise ValueError(f"rope_parameters: rope_type {rope_type!r} is not supported (default only)")
    if isinstance(rope, Mapping) and rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("rope_parameters: partial_rotary_factor != 1.0 is not supported")
    theta = rope.get("rope_theta") if isinstance(rope, Mapping) else None
    theta = theta if theta is not None else c.get("rope_theta", 10000.0)
    if c.get("use_sliding_window"):
        raise ValueError("use_sliding_window: sliding-window attention is not supported")
    out: Dict[str, Any] = {
        "num_layers": s.layers,
        "hidden_size": s.hidden,
        "num_attention_heads": s.heads,
        "num_query_groups": s.groups,
        "kv_channels": s.head_dim,
        "ffn_hidden_size": s.ffn,
        "normalization": "RMSNorm",
        "layernorm_epsilon": float(c.get("rms_norm_eps", 1e-6)),
        "gated_linear_unit": True,
        "activation_func": torch.nn.functional.silu,
        "add_bias_linear": s.bias,
        "add_qkv_bias": False,
        "qk_layernorm": s.qk_norm,
        "init_method_std": float(c.get("initializer_range", 0.02)),
        "hidden_dropout": 0.0,
        "attention_dropout": float(c.get("attention_dropout") or 0.0),
        "vocab_size": s.vocab,
        "max_position_embeddings": int(c.get("max_position_embeddings", 2048)),
        "rotary_base": float(theta),
        "untie_embeddings_and_output_weights": not s.tied,
        "position_embedding_type": "rope",
        "rotary_percent": 1.0,
    }
    if s.arch == "Qwen3MoeForCausalLM":
        out.update({
            "num_moe_experts": s.experts,
            "moe_ffn_hidden_size": s.moe_ffn,
            "moe_router_topk": int(c["num_experts_per_tok"]),
            "moe_router_pre_softmax": not bool(c.get("norm_topk_prob", False)),
            "moe_router_score_function": "softmax",
            "moe_layer_freq": 1 if all(s.moe) else [int(m) for m in s.moe],
            "moe_shared_expert_intermediate_size": None,
            "moe_router_load_balancing_type": "aux_loss",
            "moe_aux_loss_coeff": float(c.get("router_aux_loss_coef") or 0.0),
        })
    return out


# ----------------------------------------------------------------------------------------------
# State dicts
# ----------------------------------------------------------------------------------------------

_TE_RENAMES = (
    (re.compile(r"^(decoder\.layers\.\d+\.)self_attention\.linear_qkv\.layer_norm_(weight|bias)$"),
     r"\1input_layernorm.\2"),
    (re.compile(r"^(decoder\.layers\.\d+\.)mlp\.linear_fc1\.layer_norm_(weight|bias)$"),
     r"\1pre_mlp_layernorm.\2"),
    (re.compile(r"^(decoder\.layers\.\d+\.mlp\.experts\.)(linear_fc[12])\.(weight|bias)(\d+)$"),
     r"\1local_experts.\4.\2.\3"),
)


def _normalise_megatron_keys(state_dict: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    out: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("module."):
            key = key[len("module."):]
        if key.endswith("_extra_state") or "._extra_state" in key or value is None:
            continue
        for pattern, repl in _TE_RENAMES:
            key = pattern.sub(repl, key)
        if key in out:
            raise ValueError(f"megatron state dict: {key!r} appears twice (local and TE names?)")
        out[key] = value
    return out


class _Taker:
    """Pops checked tensors from a dict; reports what is missing or left over."""

    def __init__(self, sd: Dict[str, torch.Tensor], what: str):
        self.sd, self.what = sd, what

    def take(self, key: str, shape: Tuple[int, ...]) -> torch.Tensor:
        if key not in self.sd:
            raise KeyError(f"{self.what}: missing {key!r}")
        t = self.sd.pop(key)
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{self.what}: {key!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        return t

    def finish(self):
        if self.sd:
            extra = sorted(self.sd)
            raise ValueError(f"{self.what}: unexpected keys {extra[:8]}{' ...' if len(extra) > 8 else ''}")


def _own(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor with storage of its own (safe to save, no aliasing of the input)."""
    return t.detach().clone(memory_format=torch.contiguous_format)


def megatron_to_hf(state_dict: Mapping[str, Any], cfg: Any) -> Dict[str, torch.Tensor]:
    """Full megatron GPT state dict -> HF state dict, for the HF config dict `cfg`.

    `cfg` is the HF config (`hf_config_from_megatron` / `load_hf_directory` / a PretrainedConfig).
    Local or TE key names, `_extra_state` entries ignored; dtypes kept; every input key must be
    used. With tie_word_embeddings, `lm_head.weight` is not written (and `output_layer.weight`,
    if present, must equal the embedding).
    """
    s = _Shape(cfg)
    t = _Taker(_normalise_megatron_keys(state_dict), "megatron state dict")
    h, d, nq, ng, per = s.hidden, s.head_dim, s.heads, s.groups, s.heads // s.groups
    out: Dict[str, torch.Tensor] = {}
    emb = t.take("embedding.word_embeddings.weight", (s.vocab, h))
    out["model.embed_tokens.weight"] = _own(emb)
    for i in range(s.layers):
        m, p = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = _own(t.take(m + "input_layernorm.weight", (h,)))
        qkv = t.take(m + "self_attention.linear_qkv.weight", (ng * (per + 2) * d, h)).view(ng, per + 2, d, h)
        out[p + "self_attn.q_proj.weight"] = _own(qkv[:, :per].reshape(nq * d, h))
        out[p + "self_attn.k_proj.weight"] = _own(qkv[:, per].reshape(ng * d, h))
        out[p + "self_attn.v_proj.weight"] = _own(qkv[:, per + 1].reshape(ng * d, h))
        if s.bias:
            b = t.take(m + "self_attention.linear_qkv.bias", (ng * (per + 2) * d,)).view(ng, per + 2, d)
            out[p + "self_attn.q_proj.bias"] = _own(b[:, :per].reshape(nq * d))
            out[p + "self_attn.k_proj.bias"] = _own(b[:, per].reshape(ng * d))
            out[p + "self_attn.v_proj.bias"] = _own(b[:, per + 1].reshape(ng * d))
        o = t.take(m + "self_attention.linear_proj.weight", (h, nq * d))
        out[p + "self_attn.o_proj.weight"] = _own(o)
        if s.bias:
            out[p + "self_attn.o_proj.bias"] = _own(t.take(m + "self_attention.linear_proj.bias", (h,)))
        if s.qk_norm:
            out[p + "self_attn.q_norm.weight"] = _own(t.take(m + "self_attention.q_layernorm.weight", (d,)))
            out[p + "self_attn.k_norm.weight"] = _own(t.take(m + "self_attention.k_layernorm.weight", (d,)))
        out[p + "post_attention_layernorm.weight"] = _own(t.take(m + "pre_mlp_layernorm.weight", (h,)))
        if s.moe[i]:
            out[p + "mlp.gate.weight"] = _own(t.take(m + "mlp.router.weight", (s.experts, h)))
            for e in range(s.experts):
                me, pe = f"{m}mlp.experts.local_experts.{e}.", f"{p}mlp.experts.{e}."
                fc1 = t.take(me + "linear_fc1.weight", (2 * s.moe_ffn, h))
                out[pe + "gate_proj.weight"] = _own(fc1[: s.moe_ffn])
                out[pe + "up_proj.weight"] = _own(fc1[s.moe_ffn:])
                out[pe + "down_proj.weight"] = _own(t.take(me + "linear_fc2.weight", (h, s.moe_ffn)))
        else:
            fc1 = t.take(m + "mlp.linear_fc1.weight", (2 * s.ffn, h))
            out[p + "mlp.gate_proj.weight"] = _own(fc1[: s.ffn])
            out[p + "mlp.up_proj.weight"] = _own(fc1[s.ffn:])
            if s.bias:
                b = t.take(m + "mlp.linear_fc1.bias", (2 * s.ffn,))
                out[p + "mlp.gate_proj.bias"] = _own(b[: s.ffn])
                out[p + "mlp.up_proj.bias"] = _own(b[s.ffn:])
            out[p + "mlp.down_proj.weight"] = _own(t.take(m + "mlp.linear_fc2.weight", (h, s.ffn)))
            if s.bias:
                out[p + "mlp.down_proj.bias"] = _own(t.take(m + "mlp.linear_fc2.bias", (h,)))
    out["model.norm.weight"] = _own(t.take("decoder.final_layernorm.weight", (h,)))
    if s.tied:
        if "output_layer.weight" in t.sd:
            head = t.take("output_layer.weight", (s.vocab, h))
            if not torch.equal(head, emb):
                raise ValueError("tie_word_embeddings: output_layer.weight differs from the embedding")
    else:
        out["lm_head.weight"] = _own(t.take("output_layer.weight", (s.vocab, h)))
    t.finish()
    return out


def _normalise_hf_keys(hf_state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Split transformers-v5 fused MoE experts into the per-expert checkpoint form."""
    out: Dict[str, torch.Tensor] = {}
    for key, value in hf_state_dict.items():
        mo = re.match(r"^(model\.layers\.\d+\.mlp\.experts\.)(gate_up_proj|down_proj)$", key)
        if mo is None:
            out[key] = value
            continue
        prefix, kind = mo.groups()
        for e in range(value.shape[0]):
            if kind == "gate_up_proj":  # [E, 2f, h] = [gate; up] per expert
                gate, up = value[e].chunk(2, dim=0)
                out[f"{prefix}{e}.gate_proj.weight"] = gate
                out[f"{prefix}{e}.up_proj.weight"] = up
            else:  # [E, h, f]
                out[f"{prefix}{e}.down_proj.weight"] = value[e]
    return out


def hf_to_megatron(hf_state_dict: Mapping[str, torch.Tensor], cfg: Any, *, key_style: str = "local",
                   grouped_experts: bool = False, extra_state: bool = True) -> Dict[str, torch.Tensor]:
    """HF state dict -> full megatron GPT state dict; the exact inverse of `megatron_to_hf`.

    key_style="local": megatron's local-spec names, in the order of `GPTModel.state_dict()`, with
    the `_extra_state: None` entries of its linear layers (extra_state=False drops them): equal to
    the state dict of the local-spec model. key_style="te": Transformer Engine spec names (input
    and dense pre-MLP norms fused into linear_qkv / linear_fc1 as `layer_norm_weight`), no extra
    state; grouped_experts=True names experts as TEGroupedMLP does (`experts.linear_fc1.weight{e}`).
    With tie_word_embeddings there is no `output_layer.weight` (megatron's tied output layer has no
    weight of its own at PP=1); an `lm_head.weight` in the input must then equal the embedding.
    """
    if key_style not in ("local", "te"):
        raise ValueError(f"key_style: {key_style!r}; 'local' or 'te'")
    if grouped_experts and key_style != "te":
        raise ValueError("grouped_experts: TEGroupedMLP names need key_style='te'")
    s = _Shape(cfg)
    t = _Taker(_normalise_hf_keys(hf_state_dict), "HF state dict")
    te = key_style == "te"
    xs = extra_state and not te
    h, d, nq, ng, per = s.hidden, s.head_dim, s.heads, s.groups, s.heads // s.groups
    out: Dict[str, Any] = {}

    def linear(name: str, weight: torch.Tensor, bias: Optional[torch.Tensor] = None):
        out[name + ".weight"] = weight
        if bias is not None:
            out[name + ".bias"] = bias
        if xs:
            out[name + "._extra_state"] = None

    emb = t.take("model.embed_tokens.weight", (s.vocab, h))
    out["embedding.word_embeddings.weight"] = _own(emb)
    for i in range(s.layers):
        m, p = f"decoder.layers.{i}.", f"model.layers.{i}."
        in_norm = _own(t.take(p + "input_layernorm.weight", (h,)))
        if not te:
            out[m + "input_layernorm.weight"] = in_norm
        q = t.take(p + "self_attn.q_proj.weight", (nq * d, h)).reshape(ng, per, d, h)
        k = t.take(p + "self_attn.k_proj.weight", (ng * d, h)).reshape(ng, 1, d, h)
        v = t.take(p + "self_attn.v_proj.weight", (ng * d, h)).reshape(ng, 1, d, h)
        qkv = torch.cat([q, k, v], dim=1).reshape(ng * (per + 2) * d, h)
        qkv_b = o_b = None
        if s.bias:
            qb = t.take(p + "self_attn.q_proj.bias", (nq * d,)).reshape(ng, per, d)
            kb = t.take(p + "self_attn.k_proj.bias", (ng * d,)).reshape(ng, 1, d)
            vb = t.take(p + "self_attn.v_proj.bias", (ng * d,)).reshape(ng, 1, d)
            qkv_b = torch.cat([qb, kb, vb], dim=1).reshape(-1)
            o_b = _own(t.take(p + "self_attn.o_proj.bias", (h,)))
        o = _own(t.take(p + "self_attn.o_proj.weight", (h, nq * d)))
        # megatron registers linear_proj before linear_qkv
        linear(m + "self_attention.linear_proj", o, o_b)
        if te:
            out[m + "self_attention.linear_qkv.layer_norm_weight"] = in_norm
        linear(m + "self_attention.linear_qkv", qkv, qkv_b)
        if s.qk_norm:
            out[m + "self_attention.q_layernorm.weight"] = _own(t.take(p + "self_attn.q_norm.weight", (d,)))
            out[m + "self_attention.k_layernorm.weight"] = _own(t.take(p + "self_attn.k_norm.weight", (d,)))
        mlp_norm = _own(t.take(p + "post_attention_layernorm.weight", (h,)))
        if s.moe[i]:
            out[m + "pre_mlp_layernorm.weight"] = mlp_norm
            out[m + "mlp.router.weight"] = _own(t.take(p + "mlp.gate.weight", (s.experts, h)))
            fc1s, fc2s = [], []
            for e in range(s.experts):
                pe = f"{p}mlp.experts.{e}."
                gate = t.take(pe + "gate_proj.weight", (s.moe_ffn, h))
                up = t.take(pe + "up_proj.weight", (s.moe_ffn, h))
                fc1s.append(torch.cat([gate, up], dim=0))
                fc2s.append(_own(t.take(pe + "down_proj.weight", (h, s.moe_ffn))))
            if grouped_experts:
                for e in range(s.experts):
                    out[f"{m}mlp.experts.linear_fc1.weight{e}"] = fc1s[e]
                for e in range(s.experts):
                    out[f"{m}mlp.experts.linear_fc2.weight{e}"] = fc2s[e]
            else:
                for e in range(s.experts):
                    me = f"{m}mlp.experts.local_experts.{e}."
                    linear(me + "linear_fc1", fc1s[e])
                    linear(me + "linear_fc2", fc2s[e])
        else:
            if te:
                out[m + "mlp.linear_fc1.layer_norm_weight"] = mlp_norm
            else:
                out[m + "pre_mlp_layernorm.weight"] = mlp_norm
            gate = t.take(p + "mlp.gate_proj.weight", (s.ffn, h))
            up = t.take(p + "mlp.up_proj.weight", (s.ffn, h))
            fc1_b = fc2_b = None
            if s.bias:
                fc1_b = torch.cat([t.take(p + "mlp.gate_proj.bias", (s.ffn,)),
                                   t.take(p + "mlp.up_proj.bias", (s.ffn,))])
                fc2_b = _own(t.take(p + "mlp.down_proj.bias", (h,)))
            linear(m + "mlp.linear_fc1", torch.cat([gate, up], dim=0), fc1_b)
            linear(m + "mlp.linear_fc2", _own(t.take(p + "mlp.down_proj.weight", (h, s.ffn))), fc2_b)
    out["decoder.final_layernorm.weight"] = _own(t.take("model.norm.weight", (h,)))
    if s.tied:
        if "lm_head.weight" in t.sd:
            head = t.take("lm_head.weight", (s.vocab, h))
            if not torch.equal(head, emb):
                raise ValueError("tie_word_embeddings: lm_head.weight differs from the embedding")
        if xs:
            out["output_layer._extra_state"] = None
    else:
        linear("output_layer", _own(t.take("lm_head.weight", (s.vocab, h))))
    t.finish()
    return out


# ----------------------------------------------------------------------------------------------
# HF directories
# ----------------------------------------------------------------------------------------------

def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _savable(tensors: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Contiguous tensors that share no storage (safetensors refuses aliasing)."""
    seen = set()
    out = {}
    for k, v in tensors.items():
        v = v.detach()
        ptr = v.untyped_storage().data_ptr() if v.numel() else None
        aliased = ptr is not None and (ptr in seen or _nbytes(v) != v.untyped_storage().nbytes())
        if not v.is_contiguous() or aliased:
            v = _own(v)
            ptr = v.untyped_storage().data_ptr() if v.numel() else None
        if ptr is not None:
            seen.add(ptr)
        out[k] = v.cpu()
    return out


def save_hf_directory(out_dir: str, hf_state_dict: Mapping[str, torch.Tensor], hf_config: Any, *,
                      max_shard_bytes: int = 5 * 1024 ** 3,
                      generation_config: Optional[Mapping[str, Any]] = None) -> List[str]:
    """Write `config.json` and the weights as `transformers.from_pretrained` reads them.

    One `model.safetensors` when the tensors total <= max_shard_bytes, else
    `model-0000k-of-0000n.safetensors` shards (filled in key order, a new shard when the next
    tensor would overflow; a tensor larger than the limit gets a shard of its own) plus
    `model.safetensors.index.json`. Earlier `model*.safetensors` / index files in out_dir are
    removed first so the directory never mixes two saves. `generation_config` (a dict), when
    given, is written to generation_config.json. Returns the file names written.
    """
    from safetensors.torch import save_file

    if max_shard_bytes <= 0:
        raise ValueError("max_shard_bytes: must be positive")
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):
        if name in (SAFE_WEIGHTS_NAME, SAFE_INDEX_NAME) or _SHARD_RE.match(name):
            os.remove(os.path.join(out_dir, name))
    tensors = _savable(hf_state_dict)
    written: List[str] = []
    config = _as_dict(hf_config)
    with open(os.path.join(out_dir, "config.json"), "w") as fh:
        json.dump(config, fh, indent=2, sort_keys=True)
        fh.write("\n")
    written.append("config.json")
    if generation_config is not None:
        with open(os.path.join(out_dir, "generation_config.json"), "w") as fh:
            json.dump(dict(generation_config), fh, indent=2, sort_keys=True)
            fh.write("\n")
        written.append("generation_config.json")

    total = sum(_nbytes(v) for v in tensors.values())
    meta = {"format": "pt"}
    if total <= max_shard_bytes:
        save_file(tensors, os.path.join(out_dir, SAFE_WEIGHTS_NAME), metadata=meta)
        written.append(SAFE_WEIGHTS_NAME)
        return written
    shards: List[Dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in tensors.items():
        if shards[-1] and size + _nbytes(v) > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += _nbytes(v)
    n = len(shards)
    weight_map = {}
    for idx, shard in enumerate(shards, start=1):
        name = f"model-{idx:05d}-of-{n:05d}.safetensors"
        save_file(shard, os.path.join(out_dir, name), metadata=meta)
        written.append(name)
        weight_map.update({k: name for k in shard})
    with open(os.path.join(out_dir, SAFE_INDEX_NAME), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
        fh.write("\n")
    written.append(SAFE_INDEX_NAME)
    return written


def load_hf_directory(path: str) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """Read (config dict, state dict) from an HF directory: single-file or sharded safetensors."""
    from safetensors.torch import load_file

    with open(os.path.join(path, "config.json")) as fh:
        config = json.load(fh)
    single = os.path.join(path, SAFE_WEIGHTS_NAME)
    index = os.path.join(path, SAFE_INDEX_NAME)
    state: Dict[str, torch.Tensor] = {}
    if os.path.exists(index):
        with open(index) as fh:
            weight_map = json.load(fh)["weight_map"]
        for name in sorted(set(weight_map.values())):
            part = load_file(os.path.join(path, name))
            for k, v in part.items():
                if weight_map.get(k) != name:
                    raise ValueError(f"{SAFE_INDEX_NAME}: {k!r} found in {name}, index says "
                                     f"{weight_map.get(k)!r}")
                state[k] = v
        missing = set(weight_map) - set(state)
        if missing:
            raise ValueError(f"{SAFE_INDEX_NAME}: tensors missing from the shards: {sorted(missing)[:8]}")
    elif os.path.exists(single):
        state = load_file(single)
    else:
        raise FileNotFoundError(f"{path}: neither {SAFE_WEIGHTS_NAME} nor {SAFE_INDEX_NAME}")
    return config, state
