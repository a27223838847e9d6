"""Export: a trainer checkpoint (any TP/PP/EP) -> a Hugging Face model directory."""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Dict, List, Optional, Sequence

from .common import (_DTYPES, ConversionError, _human, _say, _single_rank, _stages, load_megatron_model,
                     megatron_session, parse_size, resolve_checkpoint, run_config_from_args)


# Files of a Hugging Face tokenizer that travel with the model.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json")


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------

def _build_tokenizer_for_export(cfg, tokenizer_model: Optional[str]):
    """(tokenizer or None, tokenizer.json path to copy or None, note) for the saved tokenizer."""
    from ..tokenizers import build_tokenizer

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
        include = bool(getattr(d, "tokenizer_hf_include_special_tokens", False))
        try:
            tok = build_tokenizer(kind, path, cfg.model.vocab_size, include_special_tokens=include)
        except (OSError, ValueError, ImportError) as exc:
            raise ConversionError(f"--tokenizer-model {path}: {exc}") from None
        return tok, tok.json_path, _special_tokens_note(tok)
    try:
        tok = build_tokenizer(kind, path or getattr(d, "vocab_file", None), cfg.model.vocab_size,
                              merge_file=getattr(d, "merge_file", None))
    except (OSError, ValueError, ImportError, TypeError) as exc:
        return None, None, (f"{kind} not loadable here ({exc}); config.json gets no eos_token_id "
                            "and no tokenizer is written")
    if getattr(tok, "json_path", 0) is None and hasattr(tok, "save_tokenizer_json"):
        # GPT2BPETokenizer (vocab.json + merges.txt) and SentencePieceTokenizer (a .model file):
        # converted to the tokenizer.json that transformers loads (PreTrainedTokenizerFast)
        tmp = tempfile.mkdtemp(prefix="tst_export_tokenizer_")
        atexit.register(shutil.rmtree, tmp, True)
        json_path = os.path.join(tmp, "tokenizer.json")
        try:
            ties = tok.save_tokenizer_json(json_path)
        except (ValueError, ImportError) as exc:
            return tok, None, (f"--tokenizer-type {kind} could not be converted to a tokenizer.json "
                               f"({exc}); no tokenizer files are written (eos_token_id in "
                               f"config.json is its end-of-document id {tok.eod})")
        note = None
        if ties:
            note = (f"the tokenizer.json gives SentencePiece's ids on every sample text except {ties} "
                    "where the two break a tie between equally likely segmentations differently")
        return tok, json_path, note
    note = None
    if kind != "HuggingFaceTokenizer":
        note = (f"the run used --tokenizer-type {kind}, not a Hugging Face tokenizer: no tokenizer "
                "files are written (eos_token_id in config.json is its end-of-document id "
                f"{tok.eod})")
    return tok, None, note


def _special_tokens_note(tok) -> Optional[str]:
    """A tokenizer.json whose post-processor adds tokens (Llama-3's <|begin_of_text|>, ...): training
    encoded without them, so `tokenizer(text)` in transformers feeds the model ids it never saw."""
    added = tok.post_processor_ids()
    if not added or tok.include_special_tokens:  # the run's data had them too
        return None
    names = [tok.inv_vocab.get(i, str(i)) for i in added]
    return (f"the tokenizer's post-processor adds {', '.join(names)} to every text, which the run's "
            "documents never had (the run had no --tokenizer-hf-include-special-tokens): in transformers "
            "encode with add_special_tokens=False for the model's own view")


def _check_tokenizer_size(tok, meta: dict, vocab: int, path: str, tokenizer_model: Optional[str]) -> None:
    """Refuse a tokenizer that does not belong to the checkpoint (a --tokenizer-model override, or
    the saved path now holding another file): ids past the embedding rows would index out of range
    in transformers, and a different tokenizer of the same size would map text to the wrong rows."""
    if tok is None:
        return
    saved = meta.get("tokenizer_vocab_size")
    where = f"--tokenizer-model {tokenizer_model}" if tokenizer_model else "the run's tokenizer"
    if isinstance(saved, int) and tok.vocab_size != saved:
        raise ConversionError(f"{where} has {tok.vocab_size} tokens, but {path} was trained with a "
                              f"tokenizer of {saved}; pass --tokenizer-model with the run's own tokenizer")
    if tok.vocab_size > vocab:
        raise ConversionError(f"{where} has {tok.vocab_size} tokens, more than the model's {vocab} "
                              f"embedding rows ({path}); pass --tokenizer-model with the run's own tokenizer")


def _set_aside(json_path: str, output: str) -> str:
    """The tokenizer files to copy, out of `output` first when they are there (they would be
    removed as an earlier export's before being copied back)."""
    src_dir = os.path.dirname(os.path.abspath(json_path))
    if not (os.path.isdir(output) and os.path.samefile(src_dir, output)):
        return json_path
    tmp = tempfile.mkdtemp(prefix="tst_export_tokenizer_")
    atexit.register(shutil.rmtree, tmp, True)
    for name in {os.path.basename(json_path), *TOKENIZER_FILES[1:]}:
        if os.path.isfile(os.path.join(src_dir, name)):
            shutil.copyfile(os.path.join(src_dir, name), os.path.join(tmp, name))
    return os.path.join(tmp, os.path.basename(json_path))


def _remove_stale_files(output: str) -> None:
    """An export into a directory that holds an earlier one: its tokenizer and generation config go
    (the weights are replaced by save_hf_directory), so that AutoTokenizer never loads another
    run's tokenizer beside these weights."""
    for name in TOKENIZER_FILES + ("generation_config.json",):
        path = os.path.join(output, name)
        if os.path.isfile(path):
            os.remove(path)


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
        if getattr(tok, "unk", -1) >= 0:
            config["unk_token"] = inv.get(tok.unk)
        if getattr(tok, "splits_special_text", False):
            # as Megatron-LM encodes GPT-2 BPE and SentencePiece: "<|endoftext|>"/"</s>" typed in a
            # document is text
            config["split_special_tokens"] = True
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
        return "bfloat16" if cfg.optim.bf16 else "float16" if cfg.optim.fp16 else "float32"
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

    from .. import hf_convert as hc
    from ..builders import transformer_config

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
    _check_tokenizer_size(tok, meta, vocab, path, tokenizer_model)

    max_pos = m.max_position_embeddings or m.seq_length
    tconfig = transformer_config(m, cfg.parallel, cfg.optim, use_cpu_init=True)
    # a BOS id only where the run's documents started with it (Llama2Tokenizer, or a tokenizer.json's
    # post-processor under --tokenizer-hf-include-special-tokens): generation then starts as training did
    bos = tok.bos if tok is not None and tok.bos >= 0 and tok.tokenize("x")[:1] == [tok.bos] else None
    eos = tok.eod if tok is not None else None
    try:
        hf_cfg = hc.hf_config_from_megatron(
            None, tconfig, vocab, max_pos, m.rotary_base, not m.untie_embeddings_and_output_weights,
            position_embedding_type=m.position_embedding_type, torch_dtype=out_dtype,
            bos_token_id=bos, eos_token_id=eos, zero_centered_gamma=m.apply_layernorm_1p)
    except ValueError as exc:
        raise ConversionError(f"{path}: {exc}") from None
    arch = hf_cfg["architectures"][0]
    par = saved.parallel
    _say(log, f"> exporting {path} (iteration {it}, {meta.get('phase', '?')} phase; saved at "
              f"TP={par.tensor_model_parallel_size} PP={par.pipeline_model_parallel_size} "
              f"EP={par.expert_model_parallel_size}) as {arch} -> {output}")

    target = getattr(torch, out_dtype)
    with _stages("export", 4 if tok_json else 3, progress) as stages:
        with contextlib.ExitStack() as session:
            with stages.step("reading the torch_dist checkpoint into a TP=PP=EP=1 model"):
                session.enter_context(megatron_session(cfg.optim.seed))
                model, _ = load_megatron_model(path, meta)
            with stages.step("converting the weights"):
                with torch.no_grad():
                    hf_sd = hc.megatron_to_hf(model.state_dict(), hf_cfg, norm_dtype=target,
                                              zero_centered_gamma=cfg.model.apply_layernorm_1p)
                del model
        hf_sd = {k: (v if v.dtype == target else v.to(target)) for k, v in hf_sd.items()}
        total = sum(v.numel() * v.element_size() for v in hf_sd.values())
        with stages.step(f"writing {_human(total)} of safetensors"):
            if tok_json:  # the run's tokenizer may live in `output` (an export, imported, trained, exported)
                tok_json = _set_aside(tok_json, output)
            _remove_stale_files(output)
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
