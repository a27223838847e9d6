"""Checks of the data and of a resume target, run before any model is built.

Each check reads files (the `.bin/.idx` pairs, a checkpoint's metadata) that `arguments.validate`
cannot see, and stops with a message naming the flag or file and what to do -- before any
compute, so that a bad input costs seconds, not a failed allocation or a silent wrong run.
Pure functions of the run config and what they read: the trainer calls them, tests can too.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

from .arguments import ModelArgs, RunConfig, fail

_MAX_SCANNED_TOKENS = 64 * 1024 * 1024  # large corpora are checked on a prefix (memory-mapped)

# What must match between a checkpoint and the run resuming it (flags of the model shape, TST
# and the LR schedule: megatron's scheduler refuses other values with a bare assertion, and the
# superposition length maps consumed samples to data positions).
_RESUME_KEYS = (
    [("model", k) for k in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                            "num_query_groups", "kv_channels", "normalization",
                            "swiglu", "qk_layernorm", "num_experts", "untie_embeddings_and_output_weights",
                            "disable_bias_linear", "position_embedding_type", "moe_ffn_hidden_size",
                            "moe_router_topk")]
    + [("model", "seq_length"), ("tst", "bag_size"), ("tst", "mode")]
    + [("optim", k) for k in ("train_iters", "lr", "min_lr", "lr_decay_style", "lr_warmup_iters", "lr_warmup_fraction",
                              "lr_decay_iters", "lr_wsd_decay_iters", "lr_wsd_decay_style", "weight_decay",
                              "lr_decay_samples", "lr_warmup_samples", "lr_wsd_decay_samples")])


def _split_bounds(split: str):
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)

    try:
        return convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    except (AssertionError, ValueError) as exc:
        fail(f"--split {split}: not a valid train,valid,test split ({exc})")


def _document_range(bounds, num_documents: int):
    return int(round(bounds[0] * num_documents)), int(round(bounds[1] * num_documents))


def data_sources(cfg: RunConfig):
    """(flag, its list, [train, valid, test] document bounds of each of its prefixes) for every data
    flag given: --data-path cut by --split, or each --<split>-data-path whole for its split."""
    d = cfg.data
    if d.data_path:
        return [("--data-path", d.data_path, _split_bounds(d.split))]
    out = []
    for k, (flag, paths) in enumerate((("--train-data-path", d.train_data_path),
                                       ("--valid-data-path", d.valid_data_path),
                                       ("--test-data-path", d.test_data_path))):
        if paths:
            out.append((flag, paths, [(0.0, 1.0) if i == k else None for i in range(3)]))
    return out


def check_data(cfg: RunConfig, tokenizer_vocab_size: int) -> None:
    """Every data prefix: parsable blend, both files present and matching, every split it feeds
    non-empty, one sample fits in each split, token ids below the vocabulary."""
    from megatron.core.datasets.utils import get_blend_from_list

    for flag, paths, split in data_sources(cfg):
        try:
            prefixes, _ = get_blend_from_list(paths)
        except Exception as exc:
            fail(f"{flag} {' '.join(paths)}: cannot parse ({exc}); use PREFIX ... or W1 PREFIX1 W2 PREFIX2 ...")
        if len(paths) % 2 == 1 and len(paths) > 1 and _is_number(paths[0]):
            fail(f"{flag} {' '.join(paths)}: a weighted blend is pairs WEIGHT PREFIX; this list has "
                 f"{len(paths)} items (a weight or a prefix is missing)")
        for prefix in prefixes:
            for ext in (".bin", ".idx"):
                if not os.path.isfile(prefix + ext):
                    fail(f"{flag}: {prefix + ext} not found{_prefix_hint(prefix, flag)}")
            _check_prefix(cfg, flag, prefix, split, tokenizer_vocab_size)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _prefix_hint(prefix: str, flag: str = "--data-path") -> str:
    """What the user most likely meant by a prefix whose .bin/.idx do not exist."""
    import glob

    for ext in (".bin", ".idx"):
        if prefix.endswith(ext) and os.path.isfile(prefix):
            return f"; {flag} takes the prefix without {ext}: {prefix[:-len(ext)]}"
    near = sorted(glob.glob(glob.escape(prefix) + "_*_document.bin"))
    if near:
        return f"; did you mean {' or '.join(n[:-4] for n in near[:3])}? (tools/preprocess_data.py adds _<key>_document)"
    return " (make it with tools/preprocess_data.py)"


def _check_prefix(cfg: RunConfig, flag: str, prefix: str, split, tokenizer_vocab_size: int) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    try:
        ds = IndexedDataset(prefix)
    except Exception as exc:
        fail(f"{flag} {prefix}: .bin/.idx do not match or are damaged ({type(exc).__name__}: {exc})")
    _check_split(cfg, flag, prefix, split, len(ds.document_indices) - 1)
    _check_samples_fit(cfg, flag, prefix, split, ds)
    expected = int(ds.sequence_lengths.sum()) * ds.index.dtype_size
    actual = os.path.getsize(prefix + ".bin")
    if actual != expected:
        fail(f"{flag} {prefix}: {prefix}.bin holds {actual} bytes but {prefix}.idx describes "
             f"{expected}; the pair does not match (re-run tools/preprocess_data.py)")
    if not hasattr(ds, "bin_reader"):
        return
    tokens = ds.bin_reader.read(ds.index.dtype, count=min(_MAX_SCANNED_TOKENS, expected // ds.index.dtype_size),
                                offset=0)
    max_id = int(tokens.max()) if len(tokens) else -1
    if max_id >= tokenizer_vocab_size:
        fail(f"{flag} {prefix}: token id {max_id} >= vocabulary size {tokenizer_vocab_size} "
             f"of --tokenizer-type {cfg.data.tokenizer_type}; use the tokenizer the data was made "
             "with, or a larger --vocab-size")


_SPLIT_NAMES = ("train", "validation", "test")


def _check_split(cfg: RunConfig, flag: str, prefix: str, split, num_documents: int) -> None:
    """megatron's GPTDataset loops forever on a split that holds no tokens: refuse it here."""
    for name, bounds in zip(_SPLIT_NAMES, split):
        if bounds is None:
            continue
        beg, end = _document_range(bounds, num_documents)
        if end > beg:
            continue
        if flag != "--data-path":
            fail(f"{flag} {prefix}: the data holds no documents")
        fail(f"--split {cfg.data.split}: the {name} split of {prefix} gets no documents "
             f"({num_documents} documents in all); give that split more weight, set it to 0 "
             "(e.g. --split 98,2,0), or use more data")


def _check_samples_fit(cfg: RunConfig, flag: str, prefix: str, split, ds) -> None:
    """One sample must fit in the tokens of the split it is read from, or megatron silently
    repeats the split inside a single sample (a validation loss on repeated text reads low: the
    model copies from its own context). Train and the validation MCE read superposition windows
    of s*(L+1) tokens (L+s in output mode), validation LM and the test split (evaluated once, at
    the end) plain L+1 windows."""
    from .data import base_sequence_length

    L, s = cfg.model.seq_length, cfg.tst.bag_size
    bag = base_sequence_length(L, cfg.tst) + 1
    evaluates = cfg.logging.eval_iters > 0
    needs = (("train", split[0], bag),
             ("validation", split[1], bag if cfg.tst.num_superposition_iters(cfg.optim.train_iters) and evaluates
              else (L + 1 if evaluates else 0)),
             ("test", split[2], L + 1 if evaluates else 0))
    for name, bounds, need in needs:
        if bounds is None or need == 0:
            continue
        beg, end = _document_range(bounds, len(ds.document_indices) - 1)
        first, last = int(ds.document_indices[beg]), int(ds.document_indices[end])
        have = int(ds.sequence_lengths[first:last].sum())
        if need <= have:
            continue
        what = (f"--tst-bag-size {s} with --seq-length {L}: one superposition sample reads {need} tokens"
                if need == bag and cfg.tst.enabled else f"--seq-length {L}: one sample reads {need} tokens")
        if flag != "--data-path":
            fail(f"{what}, but {flag} {prefix} holds only {have} tokens; use a smaller "
                 f"{'--tst-bag-size / ' if need == bag and cfg.tst.enabled else ''}--seq-length or more data")
        fix = ("use a smaller --tst-bag-size / --seq-length or more data" if name == "train" else
               f"give the test split more weight in --split (now {cfg.data.split}) or none (a last weight "
               "of 0: no test evaluation), use a smaller --seq-length, or more data" if name == "test" else
               f"give the {name} split more weight in --split (now {cfg.data.split}), use a smaller "
               "--tst-bag-size / --seq-length, or more data")
        fail(f"{what}, but the {name} split of --data-path {prefix} holds only {have} tokens; {fix}")


def _resolved(args: dict) -> dict:
    """Flags whose unset value means a derived default, replaced by that default, so that giving
    the default explicitly (e.g. --ffn-hidden-size 256 for hidden 64) is not a "different" run."""
    out = {group: dict(values) for group, values in args.items() if isinstance(values, dict)}
    m = out.get("model")
    if m is not None and m.get("hidden_size") and m.get("num_attention_heads"):
        fields = {f.name for f in dataclasses.fields(ModelArgs)}
        ffn = ModelArgs(**{k: v for k, v in m.items() if k in fields}).resolved_ffn_hidden_size()
        m["ffn_hidden_size"] = ffn
        if m.get("kv_channels") is None:
            m["kv_channels"] = m["hidden_size"] // m["num_attention_heads"]
        if not m.get("group_query_attention") or m.get("num_query_groups") is None:
            m["num_query_groups"] = m["num_attention_heads"] if not m.get("group_query_attention") else 1
        if m.get("num_experts") and m.get("moe_ffn_hidden_size") is None:
            m["moe_ffn_hidden_size"] = ffn
    o = out.get("optim")
    if o is not None and o.get("lr_decay_iters") is None:
        o["lr_decay_iters"] = o.get("train_iters")
    return out


def check_resume_compatible(cfg: RunConfig, meta: dict, path: str) -> None:
    """Refuse to resume with another model shape, bag size or LR schedule, unless overridden;
    with --finetune (a new run from the weights) only another weight shape is refused."""
    raw_saved, raw_now = meta.get("args", {}), cfg.to_dict()
    saved, now = _resolved(raw_saved), _resolved(raw_now)
    diffs, shape = [], False
    for group, key in _RESUME_KEYS:
        if key == "seq_length" and meta.get("imported_from"):
            continue  # weights from Hugging Face: no data stream cut at that length to continue
        if cfg.ckpt.finetune and (group != "model" or key in ("seq_length", "moe_router_topk")):
            continue
        a, b = saved.get(group, {}).get(key), now[group].get(key)
        # a difference the user typed (a derived default that moved with another flag is reported
        # through that flag; an explicit value equal to the default is no difference)
        typed = raw_saved.get(group, {}).get(key) != raw_now[group].get(key)
        if group in saved and a != b and typed:
            flag = "--tst-" + key.replace("_", "-") if group == "tst" else "--" + key.replace("_", "-")
            diffs.append(f"{flag} {b} (checkpoint: {a})")
            shape |= group == "model" and key not in ("seq_length", "moe_router_topk")
    sm, nm = saved.get("model", {}), now["model"]
    if sm.get("position_embedding_type") == nm.get("position_embedding_type") == "learned_absolute":
        rows = [m.get("max_position_embeddings") or m.get("seq_length") for m in (sm, nm)]
        if rows[0] != rows[1]:  # the learned position table has that many rows
            diffs.append(f"a learned position table of {rows[1]} rows (--max-position-embeddings, else "
                         f"--seq-length; checkpoint: {rows[0]})")
            shape = True
    sup_saved = None if cfg.ckpt.finetune else meta.get("superposition_iters")
    sup_now = cfg.tst.num_superposition_iters(cfg.optim.train_iters)
    if sup_saved is not None and sup_saved != sup_now:
        diffs.append(f"{sup_now} superposition iterations from --tst-superposition-iters/-ratio "
                     f"(checkpoint: {sup_saved})")
    if diffs and not cfg.ckpt.override_checkpoint_args:
        fix = ("The weights have the checkpoint's shape: use its values, or --load / --save another directory "
               "for a new run" if shape else "Use the checkpoint's values, or pass --override-checkpoint-args")
        fail(f"--load {path}: the checkpoint was trained with a different configuration: "
             + "; ".join(diffs) + ". " + fix)


# What orders the train stream: megatron shuffles with --seed over the documents of the train split.
_TRAIN_STREAM_KEYS = (("optim", "seed"), ("data", "data_path"), ("data", "split"), ("data", "train_data_path"))


def same_train_data(cfg: RunConfig, meta: dict) -> bool:
    """Whether this run's train stream is cut from the same data in the same order as the checkpoint's
    (a flag the checkpoint did not record counts as unchanged)."""
    saved, now = meta.get("args", {}), cfg.to_dict()
    return all(saved.get(group, {}).get(key, now[group].get(key)) == now[group].get(key)
               for group, key in _TRAIN_STREAM_KEYS)


def check_resume_data(cfg: RunConfig, meta: dict, path: str, verbose: bool) -> None:
    """The data side of a resume. Another --tokenizer-type gives the embedding rows other tokens
    (a vocabulary of the same padded size loads without complaint and trains garbage): refused
    unless --override-checkpoint-args. Another --seed, --data-path or --split is a legitimate
    choice (a new data mix for the rest of a run) but no longer the continuation of the stream the
    checkpoint consumed from, which a resume otherwise guarantees: said once, as a warning."""
    from .tokenizers import canonical_tokenizer_type

    if meta.get("imported_from"):
        return  # weights from Hugging Face: the import's flags named no data
    saved, now = meta.get("args", {}), cfg.to_dict()
    was = saved.get("data", {}).get("tokenizer_type")
    if (was is not None and canonical_tokenizer_type(was) != canonical_tokenizer_type(cfg.data.tokenizer_type)
            and not cfg.ckpt.override_checkpoint_args):
        fail(f"--load {path}: the checkpoint was trained with --tokenizer-type {was}, this run gives "
             f"--tokenizer-type {cfg.data.tokenizer_type}; its embedding rows stand for that tokenizer's "
             "tokens. Use the checkpoint's tokenizer, or pass --override-checkpoint-args to train the "
             "weights on another one")
    if not verbose or not meta.get("consumed_samples"):
        return
    changed = [f"--{key.replace('_', '-')} {_flag_value(now[group].get(key))} "
               f"(checkpoint: {_flag_value(saved[group].get(key))})"
               for group, key in (("optim", "seed"), ("data", "data_path"), ("data", "split"),
                                  ("data", "train_data_path"), ("data", "valid_data_path"),
                                  ("data", "test_data_path"), ("data", "tokenizer_model"))
               if group in saved and key in saved[group] and saved[group][key] != now[group].get(key)]
    if changed:
        print(f"> warning: resuming {path} with {'; '.join(changed)}: unless that is the same data (or "
              "tokenizer file) moved, this run does not see the samples an uninterrupted run would (megatron "
              "orders them by --seed over the --data-path documents of each --split)", flush=True)


def _flag_value(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def check_resume_optimizer(meta: dict, path: str, use_distributed_optimizer: bool, parts: int) -> None:
    """The checkpoint's Adam state must have the form this run's optimizer loads: megatron-core
    0.16.1 cannot convert between a distributed and a plain optimizer's state, nor between one
    optimizer and the two it chains for an MoE with EP > 1 (it would fail on missing keys deep in
    dist_checkpointing). Refused with what to do; --no-load-optim always works."""
    keep = "(weights, data position and LR schedule are kept, the Adam moments restart)"
    saved = meta.get("args", {}).get("parallel", {}).get("use_distributed_optimizer")
    if saved is not None and saved != use_distributed_optimizer:
        fail(f"--load {path}: the checkpoint was saved {'with' if saved else 'without'} "
             f"--use-distributed-optimizer and this run is {'without' if saved else 'with'} it; the two "
             f"keep the optimizer state in different forms. Resume with the checkpoint's setting, or with "
             f"--no-load-optim {keep}")
    saved_parts = meta.get("optimizer_parts")
    if saved_parts is not None and saved_parts != parts:
        fail(f"--load {path}: the checkpoint's optimizer state is split into {saved_parts} part(s) and this "
             f"run's into {parts} (an MoE's dense and expert parameters get separate optimizers when "
             "--expert-model-parallel-size > 1); megatron-core cannot re-shard Adam state across that "
             f"change. Resume with --no-load-optim {keep}, or keep --expert-model-parallel-size on the "
             "same side of 1")


def check_resume_stream(meta: dict, path: str, *, consumed_samples: int, base_windows: int,
                        same_batch_and_length: bool, override: bool = False, verbose: bool = True,
                        same_data: bool = True) -> None:
    """A resumed run must deal from the very stream the run it continues consumed from.

    megatron's order of the train windows depends on how many it was asked for (the epochs it
    shuffles together; a blend's size), and the recovery blocks of TSTDataset on how many there
    are. The trainer rebuilds the checkpoint's stream (`train_base_samples`) whenever that stream
    is long enough for the resumed run; a run that needs more -- a larger --global-batch-size or
    --train-iters that reaches past it -- would get another order: samples already consumed
    would be read again and others skipped, in either phase. Refused, with what to do; with
    --override-checkpoint-args (another bag size gives another stream anyway) only a warning."""
    if consumed_samples == 0 or meta.get("imported_from") or not same_data:
        return  # nothing consumed yet / weights from elsewhere / other data (warned): no stream to keep
    saved = meta.get("train_base_windows")
    if saved is None:  # a checkpoint from before this was recorded: safe only if nothing changed
        if same_batch_and_length:
            return
        saved = "unknown"
    elif saved == base_windows:
        return
    if override:
        if verbose:
            print(f"> warning: --override-checkpoint-args: the data stream differs from the checkpoint's ({saved} "
                  f"-> {base_windows} windows of its length); some samples will be read again and others "
                  "skipped", flush=True)
        return
    fail(f"--load {path}: this run's --global-batch-size / --train-iters need a longer data stream than "
         f"the checkpoint's ({saved} -> {base_windows} windows); megatron would build it in another order, "
         "so samples the checkpoint already consumed would be read again and others skipped. Resume with "
         "the checkpoint's --global-batch-size and --train-iters, or values that need no more samples")


def resume_vocab_size(cfg: RunConfig, meta: dict, path: str, vocab_size: int, tokenizer_vocab_size: int,
                      verbose: bool) -> int:
    """The padded vocabulary to build: the checkpoint's when the new tensor-parallel size divides it.

    The padding rule (multiple of --make-vocab-size-divisible-by x TP) gives another padded size
    at another TP (e.g. 512 at TP=2, 384 at TP=1). The padded rows' logits take part in the
    softmax, so re-padding would change the loss of the very same weights; keeping the saved
    size resumes the same function."""
    saved: Optional[int] = meta.get("vocab_size")
    tp = cfg.parallel.tensor_model_parallel_size
    if not isinstance(saved, int) or saved == vocab_size or saved < tokenizer_vocab_size:
        return vocab_size
    if saved % tp == 0:
        return saved
    if verbose:
        print(f"> note: {path} was saved with a padded vocabulary of {saved}, which does not divide "
              f"among {tp} tensor-parallel ranks; using {vocab_size} (the padding rows change the "
              "softmax normaliser, so losses differ slightly from the saved run)", flush=True)
    return vocab_size
