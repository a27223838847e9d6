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
from .config import (ARCHITECTURES, NON_TRANSFORMER_CONFIG_KEYS, arch_of, check_representable, choose_arch,
                     hf_config_from_megatron, megatron_config_from_hf)
from .files import load_hf_directory, save_hf_directory
from .weights import hf_to_megatron, megatron_to_hf

__all__ = [
    "ARCHITECTURES",
    "NON_TRANSFORMER_CONFIG_KEYS",
    "arch_of",
    "choose_arch",
    "check_representable",
    "hf_config_from_megatron",
    "megatron_config_from_hf",
    "megatron_to_hf",
    "hf_to_megatron",
    "save_hf_directory",
    "load_hf_directory",
]
