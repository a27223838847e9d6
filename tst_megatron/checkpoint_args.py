"""Megatron-LM's --use-checkpoint-args: the model's architecture and tokenizer flags from the
checkpoint it loads, so that evaluating or continuing a checkpoint (`--load DIR --skip-train`)
needs no copy of the flags it was trained with.

Taken: what defines the model's function -- shapes, norms, positions, vocabulary, experts and
the router's function -- and the tokenizer. Not taken: training choices (dropout, init, aux-loss
weights, token dropping, recomputation, the implementation and the parallel layout), which the
command line sets as usual. A typed architecture flag that contradicts the checkpoint is refused
rather than silently replaced (Megatron-LM overwrites it); a typed value of what a fine-tuning
run may change (the sequence length, the router's top-k and score function) or of a tokenizer
file's path (moved since) is kept.
"""
from __future__ import annotations

import argparse
import os
from typing import List

ARCHITECTURE = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "group_query_attention",
    "num_query_groups", "kv_channels", "seq_length", "max_position_embeddings", "position_embedding_type",
    "rotary_base", "normalization", "norm_epsilon", "swiglu", "squared_relu", "apply_layernorm_1p", "qk_layernorm",
    "untie_embeddings_and_output_weights",
    "disable_bias_linear", "vocab_size", "make_vocab_size_divisible_by", "num_experts", "moe_router_topk",
    "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size", "moe_layer_freq", "moe_router_pre_softmax",
    "moe_router_score_function", "moe_router_enable_expert_bias", "moe_router_topk_scaling_factor",
    "moe_router_num_groups", "moe_router_group_topk")
TOKENIZER = ("tokenizer_type", "tokenizer_model", "vocab_file", "merge_file", "tokenizer_hf_include_special_tokens")
TYPED_WINS = ("seq_length", "moe_router_topk", "moe_router_score_function", "tokenizer_model", "vocab_file",
              "merge_file", "tokenizer_hf_include_special_tokens")  # the last: how the (new) data was encoded


def typed_dests(parser: argparse.ArgumentParser, argv: List[str]) -> set:
    """The destinations of the flags present in argv (typed, not defaulted)."""
    return {action.dest for action in parser._actions for option in action.option_strings
            if any(arg == option or arg.startswith(option + "=") for arg in argv)}


def apply_checkpoint_args(ns: argparse.Namespace, parser: argparse.ArgumentParser, argv: List[str]) -> None:
    def fail(message: str) -> None:
        raise SystemExit(f"error: {message}")

    if not (ns.load or ns.pretrained_checkpoint):
        fail("--use-checkpoint-args reads the model's flags from the checkpoint it loads: give --load (or "
             "--pretrained-checkpoint)")
    from .checkpointing import CheckpointError, find_checkpoint
    from .preflight import _resolved
    from .run_config import moe_layer_pattern
    from .tokenizers import canonical_tokenizer_type

    found = None
    # the checkpoint the run will start from: --load's, else (a fine-tuning job's first start) the
    # --pretrained-checkpoint, as the trainer chooses
    for directory in (d for d in (ns.load, ns.pretrained_checkpoint) if d):
        try:
            found = find_checkpoint(directory, ns.ckpt_fallback)
        except CheckpointError as exc:
            fail(f"--use-checkpoint-args: {exc}")
        if found is not None:
            break
    if found is None:
        fail(f"--use-checkpoint-args: {' and '.join(d for d in (ns.load, ns.pretrained_checkpoint) if d)} hold(s) "
             "no checkpoint to read the model's flags from")
    _, path, meta = found
    saved = meta.get("args", {})
    resolved = _resolved(saved)  # derived defaults (ffn, kv channels, query groups) as values
    typed = typed_dests(parser, argv)
    for group, names in (("model", ARCHITECTURE), ("data", TOKENIZER)):
        values, derived = saved.get(group, {}), resolved.get(group, {})
        for name in names:
            if name not in values:
                continue  # a flag the checkpoint's trainer did not have: its default then, and now
            if name in typed:
                mine, theirs = getattr(ns, name), derived.get(name, values[name])
                if name == "tokenizer_type":
                    mine, theirs = canonical_tokenizer_type(mine), canonical_tokenizer_type(theirs)
                if name == "moe_layer_freq" and resolved["model"].get("num_experts"):
                    # _resolved spells the checkpoint's as a 0/1 pattern; 2 and [1, 0, 1, 0] are the same
                    # layers, and then the checkpoint's spelling is taken below: it decides how
                    # megatron-core stores them (run_config.stacks_layers)
                    mine = moe_layer_pattern(mine, resolved["model"]["num_layers"])
                    if mine == theirs:
                        setattr(ns, name, values[name])
                        continue
                if name in TYPED_WINS or mine == theirs:
                    continue
                fail(f"--{name.replace('_', '-')} {getattr(ns, name)} contradicts the checkpoint's {theirs} ({path}) "
                     "under --use-checkpoint-args; drop the flag")
            setattr(ns, name, values[name])
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"> --use-checkpoint-args: the model's architecture and tokenizer flags from {path}", flush=True)
