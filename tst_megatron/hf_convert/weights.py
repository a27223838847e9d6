"""Full megatron GPT state dict <-> HF state dict (Llama, Qwen3, Qwen3-MoE).

Pure functions over unsharded tensors; the key layouts on both sides are listed in the package
docstring (`tst_megatron.hf_convert`). Every input key must be used and every shape is checked,
so a mapping error fails loudly instead of producing a model that loads and talks nonsense.
"""
from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from .config import _Shape, rope_theta

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


def _norm(weight: torch.Tensor, shift: float, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A norm weight moved between megatron's zero-centred form (gamma - 1, --apply-layernorm-1p)
    and HF's gamma, in fp32, and rounded once: + 1 on export, to `dtype` (the dtype the file will
    hold; default the weight's); - 1 on import, kept in fp32 (loading rounds it to the parameter's
    dtype). Rounding in between would lose bits: 1 + w in bf16 keeps w only to ~0.008."""
    if not shift:
        return _own(weight)
    moved = weight.float() + shift
    return moved.to(dtype or weight.dtype) if shift > 0 else moved


def megatron_to_hf(state_dict: Mapping[str, Any], cfg: Any, *, zero_centered_gamma: bool = False,
                   norm_dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """Full megatron GPT state dict -> HF state dict, for the HF config dict `cfg`.

    `cfg` is the HF config (`hf_config_from_megatron` / `load_hf_directory` / a PretrainedConfig).
    Local or TE key names, `_extra_state` entries ignored; dtypes kept; every input key must be
    used. With tie_word_embeddings, `lm_head.weight` is not written (and `output_layer.weight`,
    if present, must equal the embedding). zero_centered_gamma: megatron's norm weights are
    gamma - 1 (--apply-layernorm-1p); HF's are gamma, computed in fp32 and rounded once, to
    norm_dtype when given (the dtype the caller will write, e.g. fp32 from a bf16 model).
    """
    s = _Shape(cfg)
    one = 1.0 if zero_centered_gamma else 0.0
    t = _Taker(_normalise_megatron_keys(state_dict), "megatron state dict")
    h, d, nq, ng, per = s.hidden, s.head_dim, s.heads, s.groups, s.heads // s.groups
    out: Dict[str, torch.Tensor] = {}
    emb = t.take("embedding.word_embeddings.weight", (s.vocab, h))
    out["model.embed_tokens.weight"] = _own(emb)
    for i in range(s.layers):
        m, p = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = _norm(t.take(m + "input_layernorm.weight", (h,)), one, norm_dtype)
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
            for qk in "qk":
                out[p + f"self_attn.{qk}_norm.weight"] = _norm(
                    t.take(m + f"self_attention.{qk}_layernorm.weight", (d,)), one, norm_dtype)
        out[p + "post_attention_layernorm.weight"] = _norm(
            t.take(m + "pre_mlp_layernorm.weight", (h,)), one, norm_dtype)
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
    out["model.norm.weight"] = _norm(t.take("decoder.final_layernorm.weight", (h,)), one, norm_dtype)
    if s.tied:
        if "output_layer.weight" in t.sd:
            head = t.take("output_layer.weight", (s.vocab, h))
            if not torch.equal(head, emb):
                raise ValueError("tie_word_embeddings: output_layer.weight differs from the embedding")
    else:
        out["lm_head.weight"] = _own(t.take("output_layer.weight", (s.vocab, h)))
    t.finish()
    return out


def _drop_rope_buffers(t: "_Taker", s: _Shape, theta: float) -> None:
    """Older Llama files carry each layer's RoPE frequencies (`rotary_emb.inv_freq`), a buffer that
    transformers recomputes from rope_theta: dropped when it is that, refused when it is not (a file
    whose frequencies disagree with its config was not trained with the RoPE this import builds)."""
    d = s.head_dim
    want = 1.0 / (float(theta) ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    for i in range(s.layers):
        key = f"model.layers.{i}.self_attn.rotary_emb.inv_freq"
        if key in t.sd:
            got = t.take(key, (d // 2,)).double()
            if not torch.allclose(got, want, rtol=1e-3, atol=0.0):
                raise ValueError(f"{key}: the RoPE frequencies are not those of rope_theta {theta} and "
                                 f"head_dim {d}")


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
                   grouped_experts: bool = False, extra_state: bool = True,
                   zero_centered_gamma: bool = False) -> Dict[str, torch.Tensor]:
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
    one = -1.0 if zero_centered_gamma else 0.0  # HF gamma -> megatron's gamma - 1 (--apply-layernorm-1p)
    t = _Taker(_normalise_hf_keys(hf_state_dict), "HF state dict")
    _drop_rope_buffers(t, s, rope_theta(cfg))
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
        in_norm = _norm(t.take(p + "input_layernorm.weight", (h,)), one)
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
            out[m + "self_attention.q_layernorm.weight"] = _norm(t.take(p + "self_attn.q_norm.weight", (d,)), one)
            out[m + "self_attention.k_layernorm.weight"] = _norm(t.take(p + "self_attn.k_norm.weight", (d,)), one)
        mlp_norm = _norm(t.take(p + "post_attention_layernorm.weight", (h,)), one)
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
    out["decoder.final_layernorm.weight"] = _norm(t.take("model.norm.weight", (h,)), one)
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
