"""Trainer checkpoints <-> Hugging Face `transformers` directories (Llama, Qwen3, Qwen3-MoE).

    export:  <save>/iter_XXXXXXX  (torch_dist, saved at any TP / PP / EP)
               -> HF directory: config.json, model.safetensors (or shards + index), tokenizer files
    import:  HF directory
               -> <save>/iter_XXXXXXX that `pretrain_tst.py --load <save>` continues (any TP/PP/EP)

Both directions run in ONE process (a 1-rank process group, megatron's parallel state with every
size 1) and go through the trainer's own pieces: the RunConfig saved in `tst_meta.json`, the
builders (`transformer_config`, `build_model_chunks`, `wrap_ddp`, `build_optimizer`,
`build_scheduler`) and `checkpointing.load_checkpoint` / `save_checkpoint`. Resharding from the
saved layout to TP=PP=EP=1 is megatron's dist_checkpointing's job: the model is built at size 1
and asks for the full tensors. The weight mapping itself is `hf_convert` (pure functions on full
state dicts).

Refusals are `ConversionError`s with a message naming the flag / field (the CLI prints it and
exits 2): a superposition-phase checkpoint (its model was trained on bags of tokens and is no
next-token model yet) unless `allow_superposition=True`, and a config the target architecture
cannot represent (hf_convert's ValueError, which names the field).

Import writes into `tst_meta.json` a RunConfig built from the flags given to the import (the run
the user will continue) with the model fields taken from the HF config, so the trainer's
checkpoint-compatibility check passes when the printed flags are used. The optimizer is fresh
(no Adam moments): continue with `--no-load-optim`.

Library use: call from a script with an `if __name__ == "__main__":` guard (or from pytest):
torch_dist's checkpoint writer starts a helper process with the "spawn" method, which imports the
main module again.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import re
import shutil
import sys
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

__all__ = [
    "ConversionError",
    "parse_size",
    "resolve_checkpoint",
    "run_config_from_args",
    "megatron_session",
    "load_megatron_model",
    "export_checkpoint",
    "import_checkpoint",
    "main",
]

# Files of a Hugging Face tokenizer that travel with the model.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json")

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}

# ModelArgs fields that are training / data settings rather than the model's shape.
_NON_SHAPE_MODEL_FIELDS = ("seq_length", "hidden_dropout", "attention_dropout", "vocab_size",
                           "make_vocab_size_divisible_by")


# OptimArgs fields of the LR schedule (pretrain_tst.py compares them with the checkpoint's).
_SCHEDULE_FIELDS = ("train_iters", "lr", "min_lr", "lr_decay_style", "lr_warmup_iters", "lr_decay_iters",
                    "lr_wsd_decay_iters", "lr_wsd_decay_style", "weight_decay")


class ConversionError(Exception):
    """A conversion that cannot be done, with what to do about it."""


def _say(log: Optional[Callable[[str], None]], text: str) -> None:
    if log is not None:
        log(text)


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
               "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}


def parse_size(text: Any) -> int:
    """'5GB' -> 5 * 10**9, '500MiB' -> 500 * 2**20, '1024' -> 1024 (transformers' convention)."""
    if isinstance(text, int):
        value = text
    else:
        mo = _SIZE_RE.match(str(text))
        if mo is None:
            raise ConversionError(f"--max-shard-size {text!r}: use a size such as 5GB, 500MB, 2GiB "
                                  "or a number of bytes")
        value = int(float(mo.group(1)) * _SIZE_UNITS[(mo.group(2) or "B").upper()])
    if value <= 0:
        raise ConversionError(f"--max-shard-size {text!r}: must be positive")
    return value


def _human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if nbytes < 1000 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1000.0
    return f"{nbytes:.2f} TB"


class _Stages:
    """A tqdm bar over the steps of a conversion (on stderr; each step shows what it does)."""

    def __init__(self, desc: str, total: int, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="step", disable=not enabled, file=sys.stderr,
                        bar_format="{desc} {n_fmt}/{total_fmt} |{bar:20}| {elapsed}{postfix}",
                        dynamic_ncols=True)

    @contextlib.contextmanager
    def step(self, text: str) -> Iterator[None]:
        self.bar.set_postfix_str(text, refresh=True)
        yield
        self.bar.update(1)

    def close(self, status: str) -> None:
        self.bar.set_postfix_str(status, refresh=True)
        self.bar.close()


@contextlib.contextmanager
def _stages(desc: str, total: int, enabled: bool) -> Iterator[_Stages]:
    stages = _Stages(desc, total, enabled)
    try:
        yield stages
    except BaseException:
        stages.close("failed")
        raise
    stages.close("done")


# ----------------------------------------------------------------------------------------------
# Checkpoints and their saved run configuration
# ----------------------------------------------------------------------------------------------

def resolve_checkpoint(load: str, iteration: Optional[int] = None) -> Tuple[int, str, dict]:
    """(iteration, iteration directory, tst_meta) for `--load ROOT_OR_ITER_DIR [--iteration N]`.

    ROOT: the tracker's latest checkpoint, or iter_N with `iteration`. An iteration directory
    (holds tst_meta.json / is named iter_NNNNNNN) is used as is; `iteration`, if given, must agree.
    """
    from . import checkpointing as ckpt

    if not os.path.isdir(load):
        raise ConversionError(f"--load {load}: no such directory")
    base = os.path.basename(os.path.normpath(load))
    is_iter_dir = os.path.isfile(os.path.join(load, ckpt.MARKER)) or re.fullmatch(r"iter_\d{7}", base)
    try:
        if is_iter_dir:
            meta = ckpt.verify_checkpoint_dir(load)
            it = int(meta.get("iteration", int(base[5:]) if base.startswith("iter_") else -1))
            if iteration is not None and iteration != it:
                raise ConversionError(f"--iteration {iteration}: --load {load} is the checkpoint of "
                                      f"iteration {it}; give the checkpoint root to pick another")
            return it, load, meta
        if iteration is not None:
            path = ckpt.iteration_dir(load, iteration)
            if not os.path.isdir(path):
                have = [i for i, _ in ckpt.list_checkpoints(load)]
                raise ConversionError(f"--iteration {iteration}: {path} does not exist "
                                      f"(checkpoints under {load}: {sorted(have) or 'none'})")
            return iteration, path, ckpt.verify_checkpoint_dir(path)
        found = ckpt.find_checkpoint(load, fallback=False)
    except ckpt.CheckpointError as exc:
        raise ConversionError(str(exc)) from None
    if found is None:
        raise ConversionError(f"--load {load}: no checkpoint there (no {ckpt.TRACKER} and no "
                              "iter_* directories)")
    return found


def run_config_from_args(args: Mapping[str, Any]):
    """The RunConfig a checkpoint was trained with, from `tst_meta.json`'s `args`.

    Unknown keys (a newer trainer's) are ignored; missing ones take today's defaults.
    """
    from .arguments import (CheckpointArgs, DataArgs, LoggingArgs, ModelArgs, OptimArgs,
                            ParallelArgs, RunConfig)
    from .config import TSTConfig

    def make(cls, group: str):
        values = dict(args.get(group) or {})
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    if "model" not in args:
        raise ConversionError("tst_meta.json holds no model arguments (`args.model`): not a "
                              "checkpoint of pretrain_tst.py")
    try:
        return RunConfig(model=make(ModelArgs, "model"), parallel=make(ParallelArgs, "parallel"),
                         optim=make(OptimArgs, "optim"), data=make(DataArgs, "data"),
                         ckpt=make(CheckpointArgs, "ckpt"), logging=make(LoggingArgs, "logging"),
                         tst=make(TSTConfig, "tst"))
    except (TypeError, ValueError) as exc:
        raise ConversionError(f"tst_meta.json: the saved run arguments do not load ({exc})") from None


def _single_rank(cfg):
    """A copy of cfg with every parallel size 1 (the layout conversions build the model in)."""
    cfg = copy.deepcopy(cfg)
    cfg.parallel = dataclasses.replace(
        cfg.parallel, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        num_layers_per_virtual_pipeline_stage=None, expert_model_parallel_size=1,
        sequence_parallel=False, use_distributed_optimizer=False)
    return cfg


@contextlib.contextmanager
def megatron_session(seed: int = 1234) -> Iterator[None]:
    """A 1-rank process group and megatron parallel state with every size 1 (CPU support on).

    Reuses a 1-rank group / size-1 parallel state that already exists (e.g. in a test process) and
    tears down only what it created.
    """
    import torch
    import torch.distributed as dist

    from .cpu import distributed_backend, enable_cpu_support, model_parallel_manual_seed

    enable_cpu_support()
    created_pg = False
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise ConversionError("the converter runs in a single process; do not launch it with "
                                  "torchrun (it reshards any TP/PP/EP layout by itself)")
    else:
        if torch.cuda.is_available():
            torch.cuda.set_device(0)
        dist.init_process_group(distributed_backend(), store=dist.HashStore(), rank=0, world_size=1)
        created_pg = True
    from megatron.core import parallel_state as ps

    created_ps = False
    if ps.model_parallel_is_initialized():
        sizes = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
                 ps.get_expert_model_parallel_world_size())
        if sizes != (1, 1, 1):
            raise ConversionError(f"megatron parallel state is initialised with TP/PP/EP {sizes}; "
                                  "the converter needs all sizes 1")
    else:
        ps.initialize_model_parallel()
        created_ps = True
    model_parallel_manual_seed(seed)
    try:
        yield
    finally:
        if created_ps:
            ps.destroy_model_parallel()
        if created_pg:
            dist.destroy_process_group()


def _use_te() -> bool:
    from .specs import transformer_engine_available

    return transformer_engine_available()


def load_megatron_model(ckpt_dir: str, meta: Optional[dict] = None):
    """The checkpoint's model at TP=PP=EP=1, weights loaded (resharded by dist_checkpointing).

    Call inside `megatron_session()`. Returns (model in eval mode, the saved RunConfig).
    """
    from . import checkpointing as ckpt
    from .builders import build_model_chunks, transformer_config
    from .cpu import default_device

    meta = meta if meta is not None else ckpt.read_meta(ckpt_dir)
    cfg = _single_rank(run_config_from_args(meta.get("args") or {}))
    vocab = int(meta["vocab_size"])
    tconfig = transformer_config(cfg.model, cfg.parallel, cfg.optim,
                                 use_cpu_init=default_device().type == "cpu")
    chunks = build_model_chunks(cfg, tconfig, vocab)
    try:
        ckpt.load_checkpoint(ckpt_dir, chunks, None, None, load_optim=False, load_rng=False,
                             use_distributed_optimizer=False)
    except ckpt.CheckpointError as exc:
        raise ConversionError(str(exc)) from None
    model = chunks[0]
    model.eval()
    return model, cfg


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------

def _build_tokenizer_for_export(cfg, tokenizer_model: Optional[str]):
    """(tokenizer or None, tokenizer.json path to copy or None, note) for the saved tokenizer."""
    from .tokenizers import build_tokenizer

    d = cfg.data
    kind = d.tokenizer_type
    path = tokenizer_model or d.tokenizer_model
    if kind == "HuggingFaceTokenizer":
        if not path or not os.path.exists(path):
            raise ConversionError(
                f"the checkpoint was trained with --tokenizer-type HuggingFaceTokenizer "
                f"--tokenizer-model {d.tokenizer_model}, which is not here"
                + (f" (nor {tokenizer_model})" if tokenizer_model else "")
                + "; pass --tokenizer-model PATH (its tokenizer.json or the directory holding it)")
        try:
            tok = build_tokenizer(kind, path, cfg.model.vocab_size)
        except (OSError, ValueError, ImportError) as exc:
            raise ConversionError(f"--tokenizer-model {path}: {exc}") from None
        return tok, tok.json_path, None
    try:
        tok = build_tokenizer(kind, path, cfg.model.vocab_size)
    except (OSError, ValueError, ImportError, TypeError) as exc:
        return None, None, (f"{kind} not loadable here ({exc}); config.json gets no eos_token_id "
                            "and no tokenizer is written")
    note = None
    if kind != "HuggingFaceTokenizer":
        note = (f"the run used --tokenizer-type {kind}, not a Hugging Face tokenizer: no tokenizer "
                "files are written (eos_token_id in config.json is its end-of-document id "
                f"{tok.eod})")
    return tok, None, note


def _copy_tokenizer(tok, json_path: str, output: str, model_max_length: int) -> List[str]:
    """Copy tokenizer.json and the files beside it; write a tokenizer_config.json if there is none."""
    src_dir = os.path.dirname(os.path.abspath(json_path))
    written = []
    shutil.copyfile(json_path, os.path.join(output, "tokenizer.json"))
    written.append("tokenizer.json")
    for name in TOKENIZER_FILES[1:]:
        src = os.path.join(src_dir, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(output, name))
            written.append(name)
    if "tokenizer_config.json" not in written:
        inv = tok.inv_vocab
        config: Dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                                  "model_max_length": int(model_max_length),
                                  "clean_up_tokenization_spaces": False,
                                  "eos_token": inv.get(tok.eod)}
        if tok.pad >= 0:
            config["pad_token"] = inv.get(tok.pad)
        if tok.bos >= 0:
            config["bos_token"] = inv.get(tok.bos)
        with open(os.path.join(output, "tokenizer_config.json"), "w") as fh:
            json.dump(config, fh, indent=2, sort_keys=True)
            fh.write("\n")
        written.append("tokenizer_config.json")
    return written


def _readable(output: str, files: Sequence[str]) -> None:
    """safetensors writes its files 0600; give them the permissions of any new file (umask)."""
    umask = os.umask(0)
    os.umask(umask)
    for name in files:
        with contextlib.suppress(OSError):
            os.chmod(os.path.join(output, name), 0o666 & ~umask)


def _resolve_dtype(dtype: Optional[str], cfg) -> str:
    if dtype in (None, "auto"):
        return "bfloat16" if cfg.optim.bf16 else "float32"
    if dtype not in _DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: one of auto, {', '.join(sorted(set(_DTYPES.values())))}")
    return _DTYPES[dtype]


def export_checkpoint(load: str, output: str, *, iteration: Optional[int] = None,
                      allow_superposition: bool = False, tokenizer_model: Optional[str] = None,
                      max_shard_size: Any = "5GB", dtype: Optional[str] = "auto",
                      progress: bool = True, log: Optional[Callable[[str], None]] = print) -> Dict[str, Any]:
    """Export a trainer checkpoint as a Hugging Face model directory; returns a summary dict.

    Raises ConversionError (superposition checkpoint, unrepresentable config, missing tokenizer,
    unreadable checkpoint) before anything is written.
    """
    import torch

    from . import hf_convert as hc
    from .builders import transformer_config

    it, path, meta = resolve_checkpoint(load, iteration)
    if meta.get("superposition_checkpoint") and not allow_superposition:
        raise ConversionError(
            f"{path} was saved in the superposition phase (iteration {it}, superposition runs for "
            f"{meta.get('superposition_iters', '?')} iterations): its model was trained to read and "
            "predict bags of tokens and is not a next-token model yet. Export a checkpoint from the "
            "recovery phase, or pass --allow-superposition-checkpoint to export it anyway")
    if "vocab_size" not in meta:
        raise ConversionError(f"{path}: tst_meta.json has no vocab_size (padded embedding rows)")
    saved = run_config_from_args(meta.get("args") or {})
    cfg = _single_rank(saved)
    m = cfg.model
    vocab = int(meta["vocab_size"])
    out_dtype = _resolve_dtype(dtype, cfg)
    max_bytes = parse_size(max_shard_size)
    tok, tok_json, tok_note = _build_tokenizer_for_export(saved, tokenizer_model)

    max_pos = m.max_position_embeddings or m.seq_length
    tconfig = transformer_config(m, cfg.parallel, cfg.optim, use_cpu_init=True)
    bos = tok.bos if tok is not None and tok.bos >= 0 else None
    eos = tok.eod if tok is not None else None
    try:
        hf_cfg = hc.hf_config_from_megatron(
            None, tconfig, vocab, max_pos, m.rotary_base, not m.untie_embeddings_and_output_weights,
            position_embedding_type=m.position_embedding_type, torch_dtype=out_dtype,
            bos_token_id=bos, eos_token_id=eos)
    except ValueError as exc:
        raise ConversionError(f"{path}: {exc}") from None
    arch = hf_cfg["architectures"][0]
    par = saved.parallel
    _say(log, f"> exporting {path} (iteration {it}, {meta.get('phase', '?')} phase; saved at "
              f"TP={par.tensor_model_parallel_size} PP={par.pipeline_model_parallel_size} "
              f"EP={par.expert_model_parallel_size}) as {arch} -> {output}")

    with _stages("export", 4 if tok_json else 3, progress) as stages:
        with contextlib.ExitStack() as session:
            with stages.step("reading the torch_dist checkpoint into a TP=PP=EP=1 model"):
                session.enter_context(megatron_session(cfg.optim.seed))
                model, _ = load_megatron_model(path, meta)
            with stages.step("converting the weights"):
                with torch.no_grad():
                    hf_sd = hc.megatron_to_hf(model.state_dict(), hf_cfg)
                del model
        target = getattr(torch, out_dtype)
        hf_sd = {k: (v if v.dtype == target else v.to(target)) for k, v in hf_sd.items()}
        total = sum(v.numel() * v.element_size() for v in hf_sd.values())
        with stages.step(f"writing {_human(total)} of safetensors"):
            files = hc.save_hf_directory(output, hf_sd, hf_cfg, max_shard_bytes=max_bytes)
        if tok_json:
            with stages.step("copying the tokenizer"):
                files += _copy_tokenizer(tok, tok_json, output, max_pos)
        _readable(output, files)
    if tok_note:
        _say(log, f"  note: {tok_note}")
    n_params = sum(v.numel() for v in hf_sd.values())
    _say(log, f"> wrote {arch} ({n_params / 1e6:.2f}M parameters, {out_dtype}, vocab {vocab}) to "
              f"{output}: {', '.join(files)}")
    return {"output": output, "architecture": arch, "files": files, "iteration": it,
            "checkpoint": path, "hf_config": hf_cfg, "dtype": out_dtype, "parameters": n_params,
            "phase": meta.get("phase")}


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
    from .arguments import build_parser, parse_args

    parser = build_parser()
    parser.prog = "convert_checkpoint.py import"
    _, unknown = parser.parse_known_args(list(argv))
    if unknown:
        raise ConversionError(f"unrecognized arguments: {' '.join(unknown)} (import takes --hf, --save, "
                              "--iteration, --consumed-samples, --no-progress and pretrain_tst.py's flags)")
    return parse_args(list(argv)), _given_dests(parser, argv)


def _moe_freq_as_int(pattern: Any, num_layers: int) -> int:
    if isinstance(pattern, int):
        return pattern
    for k in range(1, num_layers + 1):
        if [int(i % k == 0) for i in range(num_layers)] == [int(x) for x in pattern]:
            return k
    raise ConversionError(
        f"mlp_only_layers: the MoE layer pattern {list(pattern)} (1 = MoE) is not megatron's "
        "'every k-th layer from layer 0'; pretrain_tst.py's --moe-layer-freq takes an int k only")


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
    need(("moe_router_pre_softmax",), "norm_topk_prob (inverted)", pre, lambda: m.moe_router_pre_softmax,
         setter("moe_router_pre_softmax", pre))
    freq = _moe_freq_as_int(mc.get("moe_layer_freq", 1), m.num_layers)
    need(("moe_layer_freq",), "mlp_only_layers / decoder_sparse_step", freq, lambda: m.moe_layer_freq,
         setter("moe_layer_freq", freq))
    need(("moe_shared_expert_intermediate_size",), "no shared expert", None,
         lambda: m.moe_shared_expert_intermediate_size, setter("moe_shared_expert_intermediate_size", None))
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
    from .tokenizers import build_tokenizer

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
        return build_tokenizer(d.tokenizer_type, d.tokenizer_model, cfg.model.vocab_size)
    except (OSError, ValueError, ImportError, TypeError) as exc:
        raise ConversionError(f"--tokenizer-type {d.tokenizer_type}: {exc}") from None


def _format_value(v: Any) -> str:
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
    from .arguments import DataArgs, ModelArgs, OptimArgs
    from .config import TSTConfig

    m = cfg.model
    model_names = [f.name for f in dataclasses.fields(ModelArgs)
                   if f.name not in _NON_SHAPE_MODEL_FIELDS]
    always = ["num_layers", "hidden_size", "num_attention_heads", "normalization", "norm_epsilon",
              "rotary_base", "swiglu"] + (["moe_router_topk"] if m.num_experts else [])
    flags = _flags_for(m, ModelArgs(), model_names, always)
    flags += ["--tokenizer-type", cfg.data.tokenizer_type]
    flags += _flags_for(cfg.data, DataArgs(), ["tokenizer_model"])
    flags += _flags_for(m, ModelArgs(), ["vocab_size", "make_vocab_size_divisible_by"])
    # the LR schedule: the trainer refuses to resume with other values
    flags += _flags_for(cfg.optim, OptimArgs(), list(_SCHEDULE_FIELDS), always=("train_iters", "lr"))
    tst_map = {"bag_size": "tst_bag_size", "superposition_ratio": "tst_superposition_ratio",
               "superposition_iters": "tst_superposition_iters", "bag_weighting": "tst_bag_weighting",
               "mode": "tst_mode"}
    for name, dest in tst_map.items():
        value, default = getattr(cfg.tst, name), getattr(TSTConfig(), name)
        if value != default and value is not None:
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

    from . import checkpointing as ckpt
    from . import hf_convert as hc
    from .builders import (build_model_chunks, build_optimizer, build_scheduler, transformer_config,
                           tst_data_tokens_per_sample, wrap_ddp)
    from .cpu import default_device

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
            arch = hc._arch_of(hf_cfg)

            cfg, given = _parse_run_flags(run_argv)
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
                chunks = build_model_chunks(cfg, tconfig, hf_vocab)
                model = wrap_ddp(chunks, tconfig, cfg.parallel)
            with stages.step("loading the weights"):
                te = _use_te()
                msd = hc.hf_to_megatron(hf_sd, hf_cfg, key_style="te" if te else "local")
                del hf_sd
                with torch.no_grad():
                    result = chunks[0].load_state_dict(msd, strict=not te)
                missing = [k for k in getattr(result, "missing_keys", []) if not k.endswith("_extra_state")]
                if missing:
                    raise ConversionError(f"weights missing from the conversion: {missing[:8]}")
                del msd
            with stages.step("building a fresh optimizer and LR schedule"):
                # after the weights: a bf16 run's fp32 main params are copied from the model here
                optimizer = build_optimizer(model, cfg.optim, cfg.parallel)
                scheduler = build_scheduler(optimizer, cfg.optim)
                if iteration:
                    scheduler.step(iteration)
            with stages.step("writing the torch_dist checkpoint"):
                tokenizer_vocab = tok.vocab_size
                common = {"consumed_samples": int(consumed_samples), "data_tokens": int(data_tokens),
                          "positions": int(consumed_samples) * L, "phase": phase,
                          "superposition_checkpoint": iteration < num_sup,
                          "superposition_iters": num_sup, "vocab_size": hf_vocab,
                          "tokenizer_vocab_size": tokenizer_vocab, "args": cfg.to_dict(),
                          "imported_from": os.path.abspath(hf_dir), "optimizer_state": False}
                path = ckpt.save_checkpoint(save, iteration, model, optimizer, scheduler, common, False)

    flags = trainer_flags(cfg)
    tps = [t for t in (1, 2, 4, 8, 16) if hf_vocab % t == 0]
    _say(log, f"> imported {arch} from {hf_dir} -> {path} (iteration {iteration}, {consumed_samples} "
              f"samples consumed, {phase} phase; vocab {hf_vocab}, tokenizer {tokenizer_vocab} tokens)")
    if phase == "superposition":
        _say(log, "  warning: with these TST flags the run continues in the superposition phase")
    if iteration >= cfg.optim.train_iters:
        _say(log, f"  note: --train-iters {cfg.optim.train_iters} <= --iteration {iteration}: pass a "
                  "larger --train-iters to train on")
    _say(log, "> continue with (plus your data / batch / optimizer flags):")
    _say(log, "  pretrain_tst.py --load " + save + " --no-load-optim " + " ".join(flags))
    _say(log, f"  (the optimizer is fresh: --no-load-optim; the {hf_vocab}-row vocabulary is kept at "
              f"--tensor-model-parallel-size {'/'.join(map(str, tps))})")
    return {"path": path, "architecture": arch, "flags": flags, "iteration": iteration,
            "consumed_samples": int(consumed_samples), "vocab_size": hf_vocab, "phase": phase,
            "tensor_parallel_sizes": tps, "run_config": cfg}


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

USAGE = """\
convert_checkpoint.py export --load CKPT_ROOT_OR_ITER_DIR --output HF_DIR [--iteration N]
                             [--allow-superposition-checkpoint] [--tokenizer-model PATH]
                             [--max-shard-size 5GB] [--dtype auto|float32|bfloat16|float16]
convert_checkpoint.py import --hf HF_DIR --save CKPT_ROOT [--iteration N] [--consumed-samples M]
                             [pretrain_tst.py flags of the run that will continue ...]"""


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convert_checkpoint.py export", allow_abbrev=False,
        description="Export a pretrain_tst.py checkpoint (torch_dist, any TP/PP/EP) as a Hugging "
                    "Face model directory (Llama / Qwen3 / Qwen3-MoE, chosen from the config).")
    p.add_argument("--load", required=True, help="checkpoint root (its latest checkpoint) or an iter_* directory")
    p.add_argument("--output", required=True, help="Hugging Face directory to write")
    p.add_argument("--iteration", type=int, default=None, help="export iter_N of the root instead of the latest")
    p.add_argument("--allow-superposition-checkpoint", action="store_true",
                   help="export a superposition-phase checkpoint anyway (not a next-token model)")
    p.add_argument("--tokenizer-model", default=None,
                   help="the run's Hugging Face tokenizer.json (or its directory), if it moved")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file; above it, shards")
    p.add_argument("--dtype", default="auto", help="auto (the training dtype), float32, bfloat16, float16")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _import_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convert_checkpoint.py import", allow_abbrev=False, add_help=True,
        description="Turn a Hugging Face Llama / Qwen3 / Qwen3-MoE directory into a pretrain_tst.py "
                    "checkpoint. Any further arguments are pretrain_tst.py flags of the run that will "
                    "continue from it (tokenizer, --tst-*, optimizer, target "
                    "--tensor-model-parallel-size); model-shape flags must match the HF config.")
    p.add_argument("--hf", required=True, help="Hugging Face model directory (config.json + safetensors)")
    p.add_argument("--save", required=True, help="checkpoint root to create")
    p.add_argument("--iteration", type=int, default=0, help="iteration number of the checkpoint")
    p.add_argument("--consumed-samples", type=int, default=None,
                   help="samples consumed up to --iteration (default iteration x --global-batch-size)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage:\n" + USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command == "export":
            a = _export_parser().parse_args(rest)
            export_checkpoint(a.load, a.output, iteration=a.iteration,
                              allow_superposition=a.allow_superposition_checkpoint,
                              tokenizer_model=a.tokenizer_model, max_shard_size=a.max_shard_size,
                              dtype=a.dtype, progress=not a.no_progress)
        elif command == "import":
            a, run_argv = _import_parser().parse_known_args(rest)
            import_checkpoint(a.hf, a.save, run_argv, iteration=a.iteration,
                              consumed_samples=a.consumed_samples, progress=not a.no_progress)
        else:
            print(f"error: unknown command {command!r}\nusage:\n{USAGE}", file=sys.stderr)
            return 2
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
