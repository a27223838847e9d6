"""HF config <-> megatron TransformerConfig: architecture choice, representability, both mappings.

The field correspondence and the MoE routing parity are documented in the package docstring
(`tst_megatron.hf_convert`); each function raises ValueError naming the field it cannot map.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional

import torch

from ..run_config import moe_layer_pattern

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
    if isinstance(freq, int) and freq < 1:
        raise ValueError(f"moe_layer_freq: must be >= 1, got {freq}")
    if isinstance(freq, (list, tuple)) and len(freq) != n:
        raise ValueError(f"moe_layer_freq: list of length {len(freq)} for num_layers={n}")
    if isinstance(freq, (int, list, tuple)):
        return [bool(x) for x in moe_layer_pattern(list(freq) if isinstance(freq, tuple) else freq, n)]
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
                        rotary_percent: float = 1.0, rope_scaling: bool = False,
                        zero_centered_gamma: bool = False) -> None:
    """Raise ValueError naming the offending field when `arch` cannot express the megatron config.

    `tc`: a TransformerConfig, a dict of its fields or an args namespace. The keyword arguments
    are the GPTModel arguments that matter (megatron defaults shown). zero_centered_gamma=True
    says the caller converts zero-centred norm weights (`megatron_to_hf(..., zero_centered_gamma=True)`);
    without it such a config is refused, since HF stores gamma and megatron gamma - 1.
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
    if f["layernorm_zero_centered_gamma"] and not zero_centered_gamma:
        _fail(arch, "layernorm_zero_centered_gamma", "HF stores gamma, megatron gamma - 1: convert the weights "
              "with megatron_to_hf(..., zero_centered_gamma=True) and say so here (zero_centered_gamma=True)")
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
    if f["moe_router_load_balancing_type"] == "sinkhorn":  # sinkhorn's routing is not softmax top-k
        _fail(arch, "moe_router_load_balancing_type", "'sinkhorn'; needs 'aux_loss', 'seq_aux_loss' or 'none'")
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
                            eos_token_id: Optional[int] = None, zero_centered_gamma: bool = False) -> Dict[str, Any]:
    """The HF `config.json` dict for a megatron model (arch None -> `choose_arch`).

    Raises ValueError (via `check_representable`) when the architecture cannot express it.
    `torch_dtype` is informational ("float32", "bfloat16", ...).
    """
    arch = arch or choose_arch(tc)
    check_representable(arch, tc, position_embedding_type=position_embedding_type,
                        rotary_percent=rotary_percent, rope_scaling=rope_scaling,
                        zero_centered_gamma=zero_centered_gamma)
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


def arch_of(hf_config: Mapping[str, Any]) -> str:
    """The supported `architectures` entry of an HF config dict (else its model_type's); ValueError if none."""
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
        self.arch = arch_of(c)
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


def rope_theta(hf_config: Any) -> float:
    """The RoPE base as transformers reads it: rope_scaling / rope_parameters first, then rope_theta."""
    c = _as_dict(hf_config)
    for key in ("rope_scaling", "rope_parameters"):
        rope = c.get(key)
        if isinstance(rope, Mapping) and rope.get("rope_theta") is not None:
            return rope["rope_theta"]
    return c.get("rope_theta", 10000.0)


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
    # transformers reads rope_scaling before rope_parameters (v5: `rope_scaling or rope_parameters`)
    # and a top-level partial_rotary_factor as well: every one of them must be plain RoPE
    ropes = [(key, c[key]) for key in ("rope_scaling", "rope_parameters") if isinstance(c.get(key), Mapping)]
    for key, rope in ropes:
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"{key}: rope_type {rope_type!r} is not supported (default only)")
    for key, factor in [(f"{k}.partial_rotary_factor", r.get("partial_rotary_factor")) for k, r in ropes] + \
            [("partial_rotary_factor", c.get("partial_rotary_factor"))]:
        if factor is not None and float(factor) != 1.0:
            raise ValueError(f"{key}: {factor}; partial RoPE is not supported (1.0 only)")
    theta = rope_theta(c)
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
