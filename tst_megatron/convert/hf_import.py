"""Import: a Hugging Face model directory -> a trainer checkpoint `pretrain_tst.py --load` continues."""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import shlex
import uuid
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

from .common import (ConversionError, _say, _single_rank, _stages, megatron_session)


# ModelArgs fields that are training / data settings rather than the model's shape.
_NON_SHAPE_MODEL_FIELDS = ("seq_length", "hidden_dropout", "attention_dropout", "vocab_size",
                           "make_vocab_size_divisible_by")

# OptimArgs fields of the LR schedule (pretrain_tst.py compares them with the checkpoint's).
_SCHEDULE_FIELDS = ("train_iters", "lr", "min_lr", "lr_decay_style", "lr_warmup_iters", "lr_decay_iters",
                    "lr_wsd_decay_iters", "lr_wsd_decay_style", "weight_decay", "lr_warmup_init",
                    "start_weight_decay", "end_weight_decay", "weight_decay_incr_style")


# ----------------------------------------------------------------------------------------------
# Import
# ----------------------------------------------------------------------------------------------

def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _given_dests(parser: argparse.ArgumentParser, argv: Sequence[str]) -> Set[str]:
    """The argparse dests the user actually gave (defaults suppressed)."""
    parser = copy.deepcopy(parser)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    ns, _ = parser.parse_known_args(list(argv))
    return set(vars(ns))


def _parse_run_flags(argv: Sequence[str]):
    """pretrain_tst.py flags of the run that will continue -> (RunConfig, given dests)."""
    from ..arguments import build_parser, parse_args

    parser = build_parser()
    parser.prog = "convert_checkpoint.py import"
    _, unknown = parser.parse_known_args(list(argv))
    if unknown:
        raise ConversionError(f"unrecognized arguments: {' '.join(unknown)} (import takes --hf, --save, "
                              "--iteration, --consumed-samples, --no-progress and pretrain_tst.py's flags)")
    return parse_args(list(argv), model_from_flags=False), _given_dests(parser, argv)


def _moe_freq(pattern: Any, num_layers: int):
    """The simplest --moe-layer-freq for a layer pattern (an HF model's, or a --moe-layer-freq's: 3 on
    two layers is [1, 0], whose simplest form is 2): the smallest int k when the pattern is megatron's
    'every k-th layer from layer 0', else the 0/1 list itself."""
    from ..run_config import moe_layer_pattern

    pattern = moe_layer_pattern(pattern, num_layers)  # an int k of the user's may have a smaller twin
    for k in range(1, num_layers + 1):
        if moe_layer_pattern(k, num_layers) == pattern:
            return k
    return pattern


def _apply_hf_model(m, mc: Mapping[str, Any], given: Set[str]) -> None:
    """Set ModelArgs `m` to the HF model's shape. A flag the user gave must agree (else error);
    flags not given take the simplest form the trainer resolves to the HF value."""

    def need(dests: Tuple[str, ...], hf_name: str, target: Any, resolve: Callable[[], Any],
             apply: Callable[[], None]) -> None:
        if resolve() == target:
            return
        mine = [d for d in dests if d in given]
        if mine:
            shown = " ".join(f"{_flag(d)} {getattr(m, d)}" for d in mine)
            raise ConversionError(f"{shown} contradicts the Hugging Face config ({hf_name} -> "
                                  f"{target}); drop the flag or use the model's value")
        apply()
        assert resolve() == target, (dests, resolve(), target)

    def setter(name: str, value: Any) -> Callable[[], None]:
        return lambda: setattr(m, name, value)

    heads = mc["num_attention_heads"]
    for name, hf_name in (("num_layers", "num_hidden_layers"), ("hidden_size", "hidden_size"),
                          ("num_attention_heads", "num_attention_heads")):
        need((name,), hf_name, mc[name], lambda n=name: getattr(m, n), setter(name, mc[name]))
    need(("swiglu",), "hidden_act (SwiGLU MLP)", True, lambda: m.swiglu, setter("swiglu", True))
    need(("normalization",), "RMSNorm", "RMSNorm", lambda: m.normalization, setter("normalization", "RMSNorm"))
    need(("position_embedding_type",), "RoPE", "rope", lambda: m.position_embedding_type,
         setter("position_embedding_type", "rope"))

    groups = mc["num_query_groups"]

    def set_groups():
        m.group_query_attention, m.num_query_groups = (False, None) if groups == heads else (True, groups)

    need(("group_query_attention", "num_query_groups"), "num_key_value_heads", groups,
         lambda: m.num_query_groups if m.group_query_attention else m.num_attention_heads, set_groups)

    kv = mc["kv_channels"]

    def set_kv():
        default = m.hidden_size // m.num_attention_heads if m.hidden_size % m.num_attention_heads == 0 else None
        m.kv_channels = None if default == kv else kv

    need(("kv_channels",), "head_dim", kv, lambda: m.kv_channels or m.hidden_size // m.num_attention_heads, set_kv)

    ffn = mc["ffn_hidden_size"]

    def set_ffn():
        m.ffn_hidden_size = None
        if m.resolved_ffn_hidden_size() != ffn:
            m.ffn_hidden_size = ffn

    need(("ffn_hidden_size",), "intermediate_size", ffn, m.resolved_ffn_hidden_size, set_ffn)
    eps = float(mc["layernorm_epsilon"])
    need(("norm_epsilon",), "rms_norm_eps", eps, lambda: float(m.norm_epsilon), setter("norm_epsilon", eps))
    need(("qk_layernorm",), "q_norm/k_norm (Qwen3)", bool(mc["qk_layernorm"]), lambda: m.qk_layernorm,
         setter("qk_layernorm", bool(mc["qk_layernorm"])))
    untie = bool(mc["untie_embeddings_and_output_weights"])
    need(("untie_embeddings_and_output_weights",), "tie_word_embeddings", untie,
         lambda: m.untie_embeddings_and_output_weights, setter("untie_embeddings_and_output_weights", untie))
    no_bias = not mc["add_bias_linear"]
    need(("disable_bias_linear",), "attention_bias/mlp_bias", no_bias, lambda: m.disable_bias_linear,
         setter("disable_bias_linear", no_bias))
    theta = float(mc["rotary_base"])
    if theta != int(theta):
        raise ConversionError(f"rope_theta {theta}: pretrain_tst.py's --rotary-base takes an integer")
    need(("rotary_base",), "rope_theta", theta, lambda: float(m.rotary_base), setter("rotary_base", int(theta)))
    # Not shape: the HF values unless the user gave their own.
    if "init_method_std" not in given:
        m.init_method_std = float(mc["init_method_std"])
    if "max_position_embeddings" not in given:
        m.max_position_embeddings = int(mc["max_position_embeddings"])

    experts = mc.get("num_moe_experts")
    if not experts:
        need(("num_experts",), "a dense model (no num_experts)", None, lambda: m.num_experts,
             setter("num_experts", None))
        return
    need(("num_experts",), "num_experts", experts, lambda: m.num_experts, setter("num_experts", experts))
    topk = int(mc["moe_router_topk"])
    need(("moe_router_topk",), "num_experts_per_tok", topk, lambda: m.moe_router_topk,
         setter("moe_router_topk", topk))
    moe_ffn = int(mc["moe_ffn_hidden_size"])

    def set_moe_ffn():
        m.moe_ffn_hidden_size = None if m.resolved_ffn_hidden_size() == moe_ffn else moe_ffn

    need(("moe_ffn_hidden_size",), "moe_intermediate_size", moe_ffn,
         lambda: m.moe_ffn_hidden_size or m.resolved_ffn_hidden_size(), set_moe_ffn)
    pre = bool(mc["moe_router_pre_softmax"])
    if topk == 1 and not pre:
        raise ConversionError("num_experts_per_tok 1 with norm_topk_prob true: every token's one expert gets "
                              "weight 1, which megatron-core refuses (the router would get no gradient) and "
                              "its pre-softmax routing would change the model's output; nothing was written")
    need(("moe_router_pre_softmax",), "norm_topk_prob (inverted)", pre, lambda: m.moe_router_pre_softmax,
         setter("moe_router_pre_softmax", pre))
    freq = _moe_freq(mc.get("moe_layer_freq", 1), m.num_layers)
    need(("moe_layer_freq",), "mlp_only_layers / decoder_sparse_step", freq,
         lambda: _moe_freq(m.moe_layer_freq, m.num_layers), setter("moe_layer_freq", freq))
    need(("moe_shared_expert_intermediate_size",), "no shared expert", None,
         lambda: m.moe_shared_expert_intermediate_size, setter("moe_shared_expert_intermediate_size", None))
    # Qwen3-MoE's router: softmax top-k, no expert bias, no scaling, no group-limited routing
    for name, hf_name, value in (("moe_router_score_function", "softmax routing", "softmax"),
                                 ("moe_router_enable_expert_bias", "no expert bias", False),
                                 ("moe_router_topk_scaling_factor", "no top-k scaling", None),
                                 ("moe_router_num_groups", "no group-limited routing", None),
                                 ("moe_router_group_topk", "no group-limited routing", None),
                                 ("moe_expert_capacity_factor", "no token dropping", None)):
        need((name,), hf_name, value, lambda n=name: getattr(m, n), setter(name, value))
    if "moe_aux_loss_coeff" not in given:
        m.moe_aux_loss_coeff = float(mc.get("moe_aux_loss_coeff") or 0.0)


def _check_vocab(tokenizer_vocab: int, hf_vocab: int, tp: int) -> None:
    """The continued run must keep the model's embedding rows (padded rows take part in the
    softmax): the trainer keeps a checkpoint's padded vocabulary when it covers the tokenizer and
    divides among the tensor-parallel ranks."""
    if tokenizer_vocab > hf_vocab:
        raise ConversionError(f"the tokenizer has {tokenizer_vocab} tokens but the model's embedding "
                              f"only {hf_vocab} rows (vocab_size); use the model's tokenizer")
    if hf_vocab % tp:
        raise ConversionError(f"vocab_size {hf_vocab} does not divide among --tensor-model-parallel-size "
                              f"{tp} ranks: the trainer would re-pad the embedding (and change the "
                              "model); continue at a tensor-parallel size that divides it")


def _choose_tokenizer(cfg, given: Set[str], hf_dir: str):
    """The tokenizer the continued run will use (from the flags, else the HF dir's tokenizer.json)."""
    d = cfg.data
    if not ({"tokenizer_type", "tokenizer_model", "vocab_size"} & given):
        if os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
            d.tokenizer_type, d.tokenizer_model = "HuggingFaceTokenizer", os.path.abspath(hf_dir)
        else:
            raise ConversionError(
                f"{hf_dir} has no tokenizer.json: give the tokenizer flags the continued run will use "
                "(--tokenizer-type/--tokenizer-model, or --vocab-size for NullTokenizer) so that its "
                "padded vocabulary can be checked against the model's")
    try:
        tok = d.build_tokenizer(cfg.model.vocab_size)
    except (OSError, ValueError, ImportError, TypeError) as exc:
        raise ConversionError(f"--tokenizer-type {d.tokenizer_type}: {exc}") from None
    if d.tokenizer_model == os.path.abspath(hf_dir) and "tokenizer_hf_include_special_tokens" not in given:
        # the model was pretrained on documents that start with its tokenizer's BOS (Llama-3's
        # <|begin_of_text|>): the continued run's data should be encoded the same way (a tokenizer
        # that only appends an EOS is left alone: preprocessing's --append-eod gives that one)
        d.tokenizer_hf_include_special_tokens = tok.prepended_token() >= 0
    return tok


def _format_value(v: Any) -> str:
    if isinstance(v, list):  # --moe-layer-freq's 0/1 list, one argv word
        return "[" + ",".join(str(x) for x in v) + "]"
    return repr(v) if isinstance(v, float) else str(v)


def _flags_for(obj, defaults, names: Sequence[str], always: Sequence[str] = ()) -> List[str]:
    """Flags for the fields of obj that differ from defaults (and those in `always`, when set)."""
    out: List[str] = []
    for name in names:
        value, default = getattr(obj, name), getattr(defaults, name)
        if value is None or (value == default and name not in always):
            continue
        if isinstance(value, bool):
            if value:
                out.append(_flag(name))
            continue
        out += [_flag(name), _format_value(value)]
    return out


def trainer_flags(cfg) -> List[str]:
    """The pretrain_tst.py flags that reproduce cfg's model, tokenizer and TST settings."""
    from ..arguments import DataArgs, ModelArgs, OptimArgs
    from ..config import TSTConfig

    m = cfg.model
    model_names = [f.name for f in dataclasses.fields(ModelArgs)
                   if f.name not in _NON_SHAPE_MODEL_FIELDS]
    always = ["num_layers", "hidden_size", "num_attention_heads", "normalization", "norm_epsilon",
              "rotary_base", "swiglu"] + (["moe_router_topk"] if m.num_experts else [])
    flags = _flags_for(m, ModelArgs(), model_names, always)
    flags += ["--tokenizer-type", cfg.data.tokenizer_type]
    flags += _flags_for(cfg.data, DataArgs(), ["tokenizer_model", "vocab_file", "merge_file",
                                               "tokenizer_hf_include_special_tokens"])
    flags += _flags_for(m, ModelArgs(), ["vocab_size", "make_vocab_size_divisible_by"])
    # the LR schedule: the trainer refuses to resume with other values
    flags += _flags_for(cfg.optim, OptimArgs(), list(_SCHEDULE_FIELDS), always=("train_iters", "lr"))
    tst_map = {"bag_size": "tst_bag_size", "superposition_ratio": "tst_superposition_ratio",
               "superposition_iters": "tst_superposition_iters", "bag_weighting": "tst_bag_weighting",
               "mode": "tst_mode"}
    for name, dest in tst_map.items():
        value, default = getattr(cfg.tst, name), getattr(TSTConfig(), name)
        # a ratio goes with every bag size > 1 that has no explicit iteration count, 0 included: the
        # trainer refuses a bag size without one
        needed = name == "superposition_ratio" and cfg.tst.bag_size > 1 and cfg.tst.superposition_iters is None
        if (value != default or needed) and value is not None:
            flags += [_flag(dest), _format_value(value)]
    return flags


def import_checkpoint(hf_dir: str, save: str, run_argv: Sequence[str] = (), *, iteration: int = 0,
                      consumed_samples: Optional[int] = None, progress: bool = True,
                      log: Optional[Callable[[str], None]] = print) -> Dict[str, Any]:
    """Turn a Hugging Face directory into a trainer checkpoint `<save>/iter_<iteration>`.

    `run_argv`: pretrain_tst.py flags of the run that will continue from it (tokenizer, TST,
    optimizer/schedule, target --tensor-model-parallel-size ...); model-shape flags among them must
    agree with the HF config. Returns a summary with `flags`: the model / tokenizer / TST flags
    to pass to pretrain_tst.py (with --load SAVE --no-load-optim).
    """
    import torch

    from .. import checkpointing as ckpt
    from .. import hf_convert as hc
    from ..builders import build_model_chunks, transformer_config, tst_data_tokens_per_sample
    from ..cpu import default_device

    if iteration < 0:
        raise ConversionError(f"--iteration {iteration}: must be >= 0")
    if consumed_samples is not None and consumed_samples < 0:
        raise ConversionError(f"--consumed-samples {consumed_samples}: must be >= 0")
    if os.path.isdir(save) and (os.path.exists(os.path.join(save, ckpt.TRACKER)) or ckpt.list_checkpoints(save)):
        raise ConversionError(f"--save {save} already holds checkpoints; import into a new directory")
    with _stages("import", 5, progress) as stages:
        with stages.step("reading the Hugging Face directory"):
            try:
                hf_cfg, hf_sd = hc.load_hf_directory(hf_dir)
            except (OSError, ValueError) as exc:
                raise ConversionError(f"--hf {hf_dir}: {exc}") from None
            try:
                mc = hc.megatron_config_from_hf(hf_cfg)
            except ValueError as exc:
                raise ConversionError(f"--hf {hf_dir}: {exc}") from None
            except KeyError as exc:  # a field the architecture needs
                raise ConversionError(f"--hf {hf_dir}: config.json has no {exc} (needed for "
                                      f"{hc.arch_of(hf_cfg)}); nothing was written") from None
            arch = hc.arch_of(hf_cfg)

            cfg, given = _parse_run_flags(run_argv)
            if cfg.optim.train_samples is not None or cfg.optim.rampup_batch_size:
                raise ConversionError(
                    f"{'--train-samples' if cfg.optim.train_samples is not None else '--rampup-batch-size'}: the "
                    "import writes the run's schedule in iterations at one global batch; give --train-iters (= "
                    "samples // global batch) and the --lr-*-iters flags")
            _apply_hf_model(cfg.model, mc, given)
            tok = _choose_tokenizer(cfg, given, hf_dir)
            hf_vocab = int(mc["vocab_size"])
            _check_vocab(tok.vocab_size, hf_vocab, cfg.parallel.tensor_model_parallel_size)
            cfg = _single_rank(cfg)  # the layout this checkpoint is written in
            cfg.ckpt.save, cfg.ckpt.load = save, None
            if cfg.optim.lr_decay_style == "WSD" and cfg.optim.lr_wsd_decay_iters is None:
                # the default pretrain_tst.py's argument check fills in (and stores)
                cfg.optim.lr_wsd_decay_iters = max(1, cfg.optim.train_iters // 10)
            try:
                num_sup = cfg.tst.num_superposition_iters(cfg.optim.train_iters)
            except ValueError as exc:
                raise ConversionError(str(exc)) from None
            gbs = cfg.optim.global_batch_size
            if consumed_samples is None:
                if iteration and gbs is None:
                    raise ConversionError(f"--iteration {iteration}: give --consumed-samples (the samples "
                                          "the run had consumed) or --global-batch-size")
                consumed_samples = iteration * (gbs or 0)
            per_iter = consumed_samples // iteration if iteration else 0
            L = cfg.model.seq_length
            data_tokens = sum(per_iter * tst_data_tokens_per_sample(
                cfg.tst, L, "superposition" if i < num_sup else "recovery") for i in range(iteration))
            phase = "superposition" if iteration < num_sup else "recovery"

        with megatron_session(cfg.optim.seed):
            with stages.step("building the model (TP=PP=EP=1)"):
                tconfig = transformer_config(cfg.model, cfg.parallel, cfg.optim,
                                             use_cpu_init=default_device().type == "cpu")
                # the model alone: no DDP gradient buffer and no optimizer (an import writes no Adam
                # state; the continued run builds its own, as a fresh run would)
                chunks = build_model_chunks(cfg, tconfig, hf_vocab)
            with stages.step("loading the weights"):
                # the key names of the model just built (TE's fused layernorm-linear or local layers),
                # not of what is installed: --transformer-impl local on a TE machine builds local layers
                te = any(k.endswith("linear_qkv.layer_norm_weight") for k in chunks[0].state_dict())
                try:
                    msd = hc.hf_to_megatron(hf_sd, hf_cfg, key_style="te" if te else "local",
                                            zero_centered_gamma=cfg.model.apply_layernorm_1p)
                except (KeyError, ValueError) as exc:  # a tensor missing, left over or of another shape
                    raise ConversionError(f"--hf {hf_dir}: the weights do not match config.json ({exc}); "
                                          "nothing was written") from None
                del hf_sd
                with torch.no_grad():
                    result = chunks[0].load_state_dict(msd, strict=not te)
                missing = [k for k in getattr(result, "missing_keys", []) if not k.endswith("_extra_state")]
                if missing:
                    raise ConversionError(f"weights missing from the conversion: {missing[:8]}")
                del msd
            with stages.step("writing the torch_dist checkpoint"):
                tokenizer_vocab = tok.vocab_size
                sup_samples = consumed_samples if iteration <= num_sup else per_iter * num_sup
                common = {"run_id": uuid.uuid4().hex[:16],  # the run that continues from it (its metrics)
                          "consumed_samples": int(consumed_samples), "data_tokens": int(data_tokens),
                          "superposition_samples": int(sup_samples),
                          "positions": int(consumed_samples) * L, "phase": phase,
                          # the Hugging Face weights: a next-token model, whatever phase the run continues in
                          "superposition_checkpoint": False,
                          "superposition_iters": num_sup, "vocab_size": hf_vocab,
                          "tokenizer_vocab_size": tokenizer_vocab, "args": cfg.recorded_dict(),
                          "imported_from": os.path.abspath(hf_dir), "optimizer_state": False}
                # weights and progress only (the marker says there is no optimizer state): the
                # continued run starts its optimizer as a fresh one would, and its LR schedule at
                # the imported iteration
                path = ckpt.save_checkpoint(save, iteration, chunks, None, None, common, False,
                                            save_optim=False)

    flags = trainer_flags(cfg)
    tps = [t for t in (1, 2, 4, 8, 16) if hf_vocab % t == 0]
    _say(log, f"> imported {arch} from {hf_dir} -> {path} (iteration {iteration}, {consumed_samples} "
              f"samples consumed, {phase} phase; vocab {hf_vocab}, tokenizer {tokenizer_vocab} tokens)")
    if phase == "superposition":
        _say(log, "  warning: with these TST flags the run continues in the superposition phase")
    if iteration >= cfg.optim.train_iters:
        _say(log, f"  note: --train-iters {cfg.optim.train_iters} <= --iteration {iteration}: pass a "
                  "larger --train-iters to train on")
    added = tok.post_processor_ids() if hasattr(tok, "post_processor_ids") else []
    if added:
        names = ", ".join(tok.inv_vocab.get(i, str(i)) for i in added)
        if cfg.data.tokenizer_hf_include_special_tokens:
            _say(log, f"  note: the tokenizer adds {names} to every text, as the model saw in pretraining: "
                      "preprocess the data with tools/preprocess_data.py --tokenizer-hf-include-special-tokens")
        elif tok.prepended_token() >= 0:
            _say(log, f"  note: the tokenizer adds {names} to every text, which the data will not have "
                      "unless preprocessed (and trained) with --tokenizer-hf-include-special-tokens")
        else:
            _say(log, f"  note: the tokenizer appends {names} to every text (preprocessing's --append-eod adds "
                      "the end-of-document token; --tokenizer-hf-include-special-tokens would add a second one)")
    _say(log, "> continue with (plus your data / batch / optimizer flags"
              + ("; the LR schedule and TST flags are free: nothing was trained from this checkpoint yet):"
                 if not consumed_samples else
                 "; the LR schedule and TST flags as given to the import, which the continued run keeps):"))
    _say(log, "  pretrain_tst.py --load " + shlex.quote(save) + " --no-load-optim " + shlex.join(flags))
    _say(log, f"  (the optimizer is fresh: --no-load-optim; the {hf_vocab}-row vocabulary is kept at "
              f"--tensor-model-parallel-size {'/'.join(map(str, tps))})")
    return {"path": path, "architecture": arch, "flags": flags, "iteration": iteration,
            "consumed_samples": int(consumed_samples), "vocab_size": hf_vocab, "phase": phase,
            "tensor_parallel_sizes": tps, "run_config": cfg}
