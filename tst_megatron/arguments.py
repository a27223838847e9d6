"""Command line of pretrain_tst.py: Megatron-LM flag names in, explicit config objects out.

Megatron's flags are the user interface; inside the package nothing reads global arguments.
`parse_args(argv)` returns a `RunConfig` holding one small dataclass per concern. Flags that
Megatron-LM has but this trainer does not implement are not accepted (argparse rejects unknown
flags, with a hint), never silently ignored.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import json
import sys
from typing import List, Optional

from .config import MODES, WEIGHTINGS, TSTConfig
from .megatron_compat import add_compat_flags, check_compat_flags
from .run_config import (CheckpointArgs, DataArgs, LoggingArgs, ModelArgs, OptimArgs, ParallelArgs, RunConfig,
                         fail, same_dir)
from .validation import validate

# The config objects and the checks are importable from here too (`from .arguments import ...`).
__all__ = ["build_parser", "parse_args", "validate", "fail", "same_dir", "RunConfig", "ModelArgs", "ParallelArgs",
           "OptimArgs", "DataArgs", "CheckpointArgs", "LoggingArgs"]


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only when it has one (no "(default: None)" / "(default: False)"), and
    none for a --no-* switch (its "default: True" is the setting it turns off, and reads as if the
    switch were on)."""

    def _get_help_string(self, action):
        if (action.default is None or action.default is False or action.default == []
                or isinstance(action, argparse._StoreFalseAction) or "(the default" in (action.help or "")):
            return action.help
        return super()._get_help_string(action)


def moe_layer_freq(text: str):
    """--moe-layer-freq as Megatron-LM takes it: an int k (layers 0, k, 2k, ... are MoE) or a Python
    list expression of 0/1 per layer such as "[0,1,1,1]" or "([0]*1+[1]*3)*2" (1 = MoE). Megatron-LM
    eval()s the string; here only int literals, lists of them, + and * are evaluated, and no value
    on the way may exceed _MAX_PATTERN entries (a layer pattern, not a way to fill memory)."""
    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.List) and len(node.elts) <= _MAX_PATTERN and all(
                isinstance(e, ast.Constant) and type(e.value) is int for e in node.elts):
            return [e.value for e in node.elts]  # a list holds int literals only
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            a, b = value(node.left), value(node.right)
            if isinstance(node.op, ast.Add) and type(a) is type(b):
                if isinstance(a, list) and len(a) + len(b) > _MAX_PATTERN:
                    raise ValueError
                return a + b
            if isinstance(node.op, ast.Mult) and (isinstance(a, list) != isinstance(b, list)):
                items, times = (a, b) if isinstance(a, list) else (b, a)
                if times > _MAX_PATTERN or len(items) * max(times, 0) > _MAX_PATTERN:
                    raise ValueError  # ([] * 10**30 is empty, but Python cannot even count that far)
                return items * times
        raise ValueError
    try:
        out = value(ast.parse(text.strip(), mode="eval").body)
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError):
        out = None
    if isinstance(out, int) and out >= 1:
        return out
    if isinstance(out, list) and out and all(x in (0, 1) for x in out):
        return out
    raise argparse.ArgumentTypeError(
        f"{text if len(text) <= 80 else text[:80] + '...'!r} is not an int >= 1 (every k-th layer is MoE) or a "
        "list of 0/1 per layer (e.g. \"[0,1,1,1]\" or \"([0]*1+[1]*3)*2\"; 1 = MoE; at most "
        f"{_MAX_PATTERN:,} entries)")


_MAX_PATTERN = 100_000


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain_tst.py",
        description="Megatron-style GPT pretraining with Token-Superposition Training (TST). "
                    "Flags use Megatron-LM's names; TST adds the --tst-* group.",
        formatter_class=_HelpFormatter,
        allow_abbrev=False,
    )
    m = p.add_argument_group("model shape")
    m.add_argument("--num-layers", type=int, default=2, help="transformer layers")
    m.add_argument("--hidden-size", type=int, default=64, help="model width h")
    m.add_argument("--ffn-hidden-size", type=int, default=None, help="default 4h, or Megatron's 2/3*4h for --swiglu")
    m.add_argument("--num-attention-heads", type=int, default=4, help="attention heads")
    m.add_argument("--group-query-attention", action="store_true",
                   help="share K/V heads among query heads (see --num-query-groups)")
    m.add_argument("--num-query-groups", type=int, default=None,
                   help="with --group-query-attention; default 1 (multi-query), as in Megatron-LM")
    m.add_argument("--kv-channels", type=int, default=None, help="head dim; default hidden/heads")
    m.add_argument("--seq-length", type=int, default=128,
                   help="model positions L (latent positions during superposition)")
    m.add_argument("--max-position-embeddings", type=int, default=None,
                   help="table size for learned_absolute positions; default --seq-length")
    m.add_argument("--position-embedding-type", choices=["rope", "learned_absolute"], default="rope",
                   help="rotary (RoPE) or a learned absolute table")
    m.add_argument("--rotary-base", type=int, default=10000, help="RoPE base frequency")
    m.add_argument("--normalization", choices=["RMSNorm", "LayerNorm"], default="RMSNorm",
                   help="norm layer before attention and MLP")
    m.add_argument("--norm-epsilon", type=float, default=1e-5, help="epsilon of the norm layers")
    m.add_argument("--swiglu", action="store_true", help="gated SiLU MLP (Llama-style)")
    m.add_argument("--apply-layernorm-1p", action="store_true",
                   help="norm weights as zero-centred gammas: norm(x) * (1 + w), w initialised at 0 (norm weights "
                        "get no weight decay here, as in Megatron-LM; with Transformer Engine the 1 is added in fp32)")
    m.add_argument("--squared-relu", action="store_true",
                   help="relu(x)^2 MLP activation (Primer) instead of GeLU; not with --swiglu")
    m.add_argument("--qk-layernorm", action="store_true", help="norm on queries and keys (Qwen3-style)")
    m.add_argument("--untie-embeddings-and-output-weights", action="store_true",
                   help="separate output layer instead of the input embedding's transpose")
    m.add_argument("--disable-bias-linear", action="store_true", help="no biases in the linear layers")
    m.add_argument("--hidden-dropout", type=float, default=0.0, help="dropout after attention and MLP")
    m.add_argument("--attention-dropout", type=float, default=0.0, help="dropout on the attention probabilities")
    m.add_argument("--init-method-std", type=float, default=0.02, help="std of the normal weight init")
    m.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer vocabulary (pre-tokenized data)")
    m.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="pad the embedding rows to a multiple of this x TP")

    e = p.add_argument_group("mixture of experts")
    e.add_argument("--num-experts", type=int, default=None, help="experts per MoE layer; unset = dense MLP")
    e.add_argument("--moe-router-topk", type=int, default=2,
                   help="experts each token is routed to (1 needs --moe-router-pre-softmax)")
    e.add_argument("--moe-ffn-hidden-size", type=int, default=None,
                   help="width of one expert's MLP; default --ffn-hidden-size")
    e.add_argument("--moe-aux-loss-coeff", type=float, default=0.0, help="weight of the load-balancing loss")
    e.add_argument("--moe-router-load-balancing-type", choices=["aux_loss", "seq_aux_loss", "none"], default="aux_loss",
                   help="load-balancing loss of the router")
    e.add_argument("--moe-token-dispatcher-type", choices=["allgather", "alltoall"], default="allgather",
                   help="how tokens reach the expert-parallel ranks")
    e.add_argument("--moe-shared-expert-intermediate-size", type=int, default=None,
                   help="width of an always-on shared expert (needs --disable-bias-linear)")
    e.add_argument("--moe-layer-freq", type=moe_layer_freq, default=1,
                   help="which layers are MoE: an int k (layers 0, k, 2k, ...; 1 = all) or a 0/1 list with one "
                        "entry per layer, e.g. \"([0]*1+[1]*3)\" (1 = MoE)")
    e.add_argument("--moe-z-loss-coeff", type=float, default=None,
                   help="weight of the router z-loss (squared log-sum-exp of the router logits)")
    e.add_argument("--moe-router-dtype", choices=["fp32", "fp64"], default=None,
                   help="compute the router logits and their softmax in this precision (default: the model's)")
    e.add_argument("--moe-router-pre-softmax", action="store_true",
                   help="softmax over all experts before the top-k selection")
    e.add_argument("--moe-router-score-function", choices=["softmax", "sigmoid"], default="softmax",
                   help="expert scores from the router logits (sigmoid: DeepSeek-V3's, the top-k weights normalised)")
    e.add_argument("--moe-router-enable-expert-bias", action="store_true",
                   help="aux-loss-free load balancing (DeepSeek-V3, needs sigmoid): a per-expert bias on the "
                        "routing scores (not on the weights), moved after every global batch by "
                        "--moe-router-bias-update-rate towards the experts that got fewer tokens")
    e.add_argument("--moe-router-bias-update-rate", type=float, default=None,
                   help="step of the expert bias per global batch (default 1e-3)")
    e.add_argument("--moe-router-topk-scaling-factor", type=float, default=None,
                   help="multiply the top-k routing weights by this factor")
    e.add_argument("--moe-router-num-groups", type=int, default=None,
                   help="group-limited routing: the experts form this many groups (e.g. the EP ranks)...")
    e.add_argument("--moe-router-group-topk", type=int, default=None,
                   help="...and each token's top-k experts come from its best this-many groups")
    e.add_argument("--moe-expert-capacity-factor", type=float, default=None,
                   help="token dropping: each expert takes at most factor x its even share of the tokens "
                        "(default: no capacity, nothing dropped)")
    e.add_argument("--moe-pad-expert-input-to-capacity", action="store_true",
                   help="with a capacity factor: pad every expert's input to its capacity (static shapes)")
    e.add_argument("--moe-token-drop-policy", choices=["probs", "position"], default=None,
                   help="with a capacity factor: drop the tokens of lowest routing probability (probs, the "
                        "default), or the last ones (position)")

    par = p.add_argument_group("parallelism")
    par.add_argument("--tensor-model-parallel-size", type=int, default=1,
                     help="TP: split each layer's matrices over this many ranks")
    par.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                     help="PP: split the layers into this many stages")
    par.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                     help="interleaved 1F1B: layers per virtual stage")
    par.add_argument("--expert-model-parallel-size", type=int, default=1,
                     help="EP: split the experts over this many ranks")
    par.add_argument("--sequence-parallel", action="store_true",
                     help="shard norms/dropout activations along the sequence over the TP ranks")
    par.add_argument("--use-distributed-optimizer", action="store_true",
                     help="shard optimizer state over the data-parallel ranks (ZeRO-1)")
    par.add_argument("--overlap-grad-reduce", action="store_true",
                     help="start each gradient bucket's data-parallel reduction during the backward pass")
    par.add_argument("--distributed-timeout-minutes", type=int, default=30,
                     help="timeout of the process-group collectives")
    par.add_argument("--ddp-bucket-size", type=int, default=None,
                     help="parameters per gradient-reduction bucket with --overlap-grad-reduce (default: "
                          "megatron-core's max(40M, 1M x data-parallel size))")
    par.add_argument("--overlap-param-gather", action="store_true",
                     help="distributed optimizer: all-gather each bucket's updated parameters during the next "
                          "forward pass (needs --use-distributed-optimizer and --overlap-grad-reduce)")
    par.add_argument("--recompute-granularity", choices=["full", "selective"], default=None,
                     help="recompute activations in the backward pass instead of keeping them: whole layers "
                          "(full) or the core attention only (selective)")
    par.add_argument("--recompute-method", choices=["uniform", "block"], default=None,
                     help="with full: checkpoint groups of --recompute-num-layers layers (uniform), or only the "
                          "first --recompute-num-layers layers of each pipeline stage (block)")
    par.add_argument("--recompute-num-layers", type=int, default=None,
                     help="layers per recomputed group (uniform) or recomputed layers per stage (block)")
    par.add_argument("--grad-reduce-in-bf16", action="store_true",
                     help="with --bf16: accumulate and reduce the gradients in bf16 (half the gradient buffer and "
                          "reduce traffic; the optimizer still keeps fp32 main gradients)")
    par.add_argument("--empty-unused-memory-level", type=int, choices=(0, 1, 2), default=0,
                     help="release PyTorch's cached CUDA memory after each forward-backward (1) and also after "
                          "each optimizer step (2), as Megatron-LM does; nothing to release on CPU")

    o = p.add_argument_group("batch and optimisation")
    o.add_argument("--micro-batch-size", type=int, default=4, help="samples per forward/backward on one rank")
    o.add_argument("--global-batch-size", type=int, default=None, help="default micro-batch x data-parallel size")
    o.add_argument("--rampup-batch-size", type=int, nargs=3, default=None,
                   metavar=("START", "INCREMENT", "RAMP_SAMPLES"),
                   help="Megatron-LM's batch-size ramp (with --train-samples): start at a global batch of START, "
                        "raise it by INCREMENT in equal slices of the first RAMP_SAMPLES samples up to "
                        "--global-batch-size; the LR schedule then counts samples")
    o.add_argument("--train-iters", type=int, default=None,
                   help="optimizer steps in total, both TST phases included (default 100, or from --train-samples)")
    o.add_argument("--train-samples", type=int, default=None,
                   help="Megatron-LM's sample-based form: --train-iters = samples // --global-batch-size, and the LR "
                        "schedule is given in samples (--lr-decay-samples, --lr-warmup-samples, --lr-wsd-decay-samples)")
    o.add_argument("--lr-decay-samples", type=int, default=None, help="with --train-samples; default --train-samples")
    o.add_argument("--lr-warmup-samples", type=int, default=None, help="with --train-samples")
    o.add_argument("--lr-wsd-decay-samples", type=int, default=None, help="with --train-samples and WSD")
    o.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    o.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the decay")
    o.add_argument("--decoupled-lr", type=float, default=None,
                   help="peak learning rate of the input embedding and output layer (same schedule)")
    o.add_argument("--decoupled-min-lr", type=float, default=None,
                   help="their learning rate at the end of the decay (default: --min-lr)")
    o.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine", "WSD"], default="cosine",
                   help="one schedule over all iterations (no re-warmup at the TST switch)")
    o.add_argument("--lr-warmup-iters", type=int, default=0, help="linear warmup steps from --lr-warmup-init")
    o.add_argument("--lr-warmup-init", type=float, default=0.0, help="the learning rate the warmup starts from")
    o.add_argument("--lr-warmup-fraction", type=float, default=None,
                   help="warmup as a fraction of --lr-decay-iters (instead of --lr-warmup-iters)")
    o.add_argument("--lr-decay-iters", type=int, default=None, help="default --train-iters")
    o.add_argument("--lr-wsd-decay-iters", type=int, default=None,
                   help="WSD: length of the final decay; default --train-iters // 10")
    o.add_argument("--lr-wsd-decay-style", choices=["linear", "cosine", "exponential", "minus_sqrt"], default="linear",
                   help="WSD: shape of the final decay")
    o.add_argument("--weight-decay", type=float, default=0.01,
                   help="AdamW decoupled weight decay (not on biases and norms)")
    o.add_argument("--start-weight-decay", type=float, default=None,
                   help="weight decay at the first step, with --weight-decay-incr-style linear/cosine")
    o.add_argument("--end-weight-decay", type=float, default=None,
                   help="weight decay from the last step on, with --weight-decay-incr-style linear/cosine")
    o.add_argument("--weight-decay-incr-style", choices=["constant", "linear", "cosine"], default="constant",
                   help="how the weight decay goes from --start- to --end-weight-decay over the training steps "
                        "(constant: --weight-decay throughout)")
    o.add_argument("--adam-beta1", type=float, default=0.9, help="AdamW beta1")
    o.add_argument("--adam-beta2", type=float, default=0.95, help="AdamW beta2")
    o.add_argument("--adam-eps", type=float, default=1e-8, help="AdamW epsilon")
    o.add_argument("--clip-grad", type=float, default=1.0, help="clip the global gradient norm to this (0 = off)")
    o.add_argument("--calculate-per-token-loss", action="store_true",
                   help="the step's loss is the mean over every trained position of the global batch "
                        "(default: the mean of the micro-batches' means; differs when --eod-mask-loss "
                        "leaves micro-batches with unequal counts)")
    o.add_argument("--bf16", action="store_true", help="bf16 parameters and compute with fp32 main weights")
    o.add_argument("--fp16", action="store_true",
                   help="fp16 parameters and compute with fp32 main weights and a loss scaler (a step whose "
                        "gradients overflow is skipped and the scale lowered, as in Megatron-LM)")
    o.add_argument("--loss-scale", type=float, default=None, help="--fp16: a fixed loss scale (default: dynamic)")
    o.add_argument("--initial-loss-scale", type=float, default=2.0 ** 32, help="--fp16: the dynamic scale's start")
    o.add_argument("--min-loss-scale", type=float, default=1.0, help="--fp16: the dynamic scale's floor")
    o.add_argument("--loss-scale-window", type=int, default=1000,
                   help="--fp16: steps without overflow before the dynamic scale doubles")
    o.add_argument("--hysteresis", type=int, default=2, help="--fp16: overflows tolerated before the scale halves")
    o.add_argument("--seed", type=int, default=1234, help="seed of the weights, dropout and data order")

    d = p.add_argument_group("data")
    d.add_argument("--data-path", nargs="*", default=[], help="prefixes, optionally weighted: 0.7 a 0.3 b")
    d.add_argument("--split", default="969,30,1", help="train,valid,test weights of each --data-path prefix")
    for name, what in (("train", "training"), ("valid", "validation"), ("test", "test (evaluated once, at the end)")):
        d.add_argument(f"--{name}-data-path", nargs="+", default=None,
                       help=f"instead of --data-path/--split: the {what} data itself (prefixes, optionally weighted)")
    d.add_argument("--tokenizer-type", default="NullTokenizer",
                   choices=["NullTokenizer", "SentencePieceTokenizer", "HuggingFaceTokenizer", "ByteTokenizer",
                            "Llama2Tokenizer", "GPTSentencePieceTokenizer", "GPT2BPETokenizer"],
                   help="NullTokenizer: pre-tokenized ids, needs --vocab-size; ByteTokenizer: UTF-8 bytes, no file")
    d.add_argument("--data-args-path", default=None,
                   help="a file holding the --data-path list (prefixes, optionally weighted, whitespace-separated), "
                        "for blends too long for a command line")
    d.add_argument("--per-split-data-args-path", default=None,
                   help='a JSON file {"train": [...], "valid": [...], "test": [...]} (lists or strings): the '
                        "--train-/--valid-/--test-data-path lists")
    d.add_argument("--no-mmap-bin-files", action="store_false", dest="mmap_bin_files",
                   help="read the .bin files with plain reads instead of memory-mapping them (some network "
                        "file systems)")
    d.add_argument("--num-dataset-builder-threads", type=int, default=1,
                   help="threads megatron-core builds the datasets of a blend with")
    d.add_argument("--mid-level-dataset-surplus", type=float, default=0.005,
                   help="megatron-core's extra fraction of samples built per blended dataset (it orders a blend)")
    d.add_argument("--mock-data", action="store_true",
                   help="megatron-core's mock data (counting sequences of random length) instead of --data-path: "
                        "for throughput and set-up checks, not for learning anything")
    d.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer: GPT-2's vocab.json")
    d.add_argument("--merge-file", default=None, help="GPT2BPETokenizer: GPT-2's merges.txt")
    d.add_argument("--eod-mask-loss", action="store_true",
                   help="no loss at positions whose input is the end-of-document token, i.e. on predicting the "
                        "next document's first token (megatron's GPTDataset loss mask)")
    d.add_argument("--reset-position-ids", action="store_true",
                   help="position ids restart after every end-of-document token (matters for learned positions)")
    d.add_argument("--tokenizer-model", default=None,
                   help="SentencePiece .model file, or tokenizer.json / directory for HuggingFaceTokenizer")
    d.add_argument("--tokenizer-hf-include-special-tokens", action="store_true",
                   help="HuggingFaceTokenizer: the data was encoded with the tokenizer's special tokens (its "
                        "post-processor's BOS, e.g. Llama-3's <|begin_of_text|>), as preprocess_data.py does with the "
                        "same flag; recorded in the checkpoint so that export matches")
    d.add_argument("--data-cache-path", default=None,
                   help="where GPTDataset writes its index caches; default <prefix>/cache/ (megatron-core)")
    d.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")

    c = p.add_argument_group("checkpointing")
    c.add_argument("--save", default=None,
                   help="checkpoint directory (iter_NNNNNNN/ + latest_checkpointed_iteration.txt)")
    c.add_argument("--load", default=None, help="resume from this checkpoint directory (may equal --save)")
    c.add_argument("--save-interval", type=int, default=None,
                   help="save every N iterations (and always at the end and on SIGTERM)")
    c.add_argument("--ckpt-format", choices=["torch_dist"], default="torch_dist",
                   help="megatron-core dist_checkpointing format")
    c.add_argument("--use-checkpoint-args", action="store_true",
                   help="take the model's architecture and tokenizer flags from the --load checkpoint (a typed flag "
                        "that contradicts it is refused)")
    c.add_argument("--ckpt-fully-parallel-save", action="store_true", default=True,
                   help="(the default, as in Megatron-LM) every data-parallel rank writes a share of the "
                        "replicated tensors")
    c.add_argument("--no-ckpt-fully-parallel-save", action="store_false", dest="ckpt_fully_parallel_save",
                   help="replicated tensors are written by their first replica only")
    c.add_argument("--ckpt-fully-parallel-load", action="store_true",
                   help="each replicated tensor is read by one data-parallel rank and exchanged, instead of "
                        "by every rank")
    c.add_argument("--no-load-optim", action="store_true",
                   help="load the weights but not the optimizer state (Adam restarts; the LR schedule "
                        "continues from the loaded iteration)")
    c.add_argument("--no-load-rng", action="store_true", help="do not restore the RNG states")
    c.add_argument("--no-save-optim", action="store_true",
                   help="checkpoints without optimizer state and LR-schedule state (a resume starts Adam afresh and "
                        "continues the schedule from the iteration)")
    c.add_argument("--no-save-rng", action="store_true", help="checkpoints without RNG states")
    c.add_argument("--finetune", action="store_true",
                   help="with --load: a new run that starts from the checkpoint's weights (iteration 0, fresh "
                        "optimizer, LR schedule and data stream, as in Megatron-LM); TST settings, schedule and "
                        "sequence length are free, the model shape must match")
    c.add_argument("--pretrained-checkpoint", default=None, metavar="DIR",
                   help="when --load holds no checkpoint (or is not given): start from this checkpoint's weights "
                        "as --finetune does; a requeued job (--load = --save) then resumes its own checkpoint")
    c.add_argument("--ckpt-fallback", action="store_true",
                   help="if the latest checkpoint is damaged, load the newest complete one")
    c.add_argument("--override-checkpoint-args", action="store_true",
                   help="allow resuming with a different TST bag size / superposition length / LR schedule than "
                        "the checkpoint (the model shape must still match)")
    c.add_argument("--exit-interval", type=int, default=None,
                   help="save and exit 0 at the first iteration divisible by N")
    c.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="save and exit 0 after this many minutes of training")
    c.add_argument("--exit-signal-handler", action="store_true",
                   help="also save and exit 0 on SIGINT (SIGTERM always does)")
    c.add_argument("--exit-on-missing-checkpoint", action="store_true",
                   help="with --load: stop if it holds no checkpoint, also when --load is --save (a requeued "
                        "job that lost its checkpoints must not silently start over)")

    lg = p.add_argument_group("logging and evaluation")
    lg.add_argument("--log-interval", type=int, default=10, help="iterations between log lines and metrics records")
    lg.add_argument("--eval-interval", type=int, default=None, help="default: at the start and at the end only")
    lg.add_argument("--eval-iters", type=int, default=10, help="validation batches per evaluation (0: none)")
    lg.add_argument("--metrics-path", default=None,
                    help="JSONL metrics; default <save>/metrics.jsonl (./metrics.jsonl without --save)")
    lg.add_argument("--tensorboard-dir", default=None, help="write TensorBoard scalars here (needs tensorboard)")
    lg.add_argument("--wandb-project", default=None, help="log to Weights & Biases (needs wandb)")
    lg.add_argument("--wandb-exp-name", default=None, help="W&B run name; default --run-name")
    lg.add_argument("--run-name", default=None, help="label of the run in logs and metrics")
    lg.add_argument("--skip-train", action="store_true",
                    help="no training: evaluate the --load checkpoint's weights on the validation and test splits, "
                         "then exit (nothing is saved)")
    lg.add_argument("--log-params-norm", action="store_true",
                    help="log the L2 norm of all parameters (over every model-parallel shard, shared ones once)")
    lg.add_argument("--log-num-zeros-in-grad", action="store_true", help="log the number of zero gradient entries")
    lg.add_argument("--log-memory-to-tensorboard", action="store_true",
                    help="memory in the metrics/TensorBoard: CUDA allocated and reserved bytes on GPU, the "
                         "process's peak resident memory on CPU")
    lg.add_argument("--timing-log-level", type=int, choices=(0, 1, 2), default=0,
                    help="megatron-core's step timers under each log line: 1 forward-backward, grad all-reduce and "
                         "optimizer times, 2 also each micro-batch's compute, data fetch and pipeline send/receive "
                         "(0: none)")
    lg.add_argument("--timing-log-option", choices=("max", "minmax", "all"), default="minmax",
                    help="the timers over ranks: the max, min and max, or every rank's")
    lg.add_argument("--no-barrier-with-level-1-timing", action="store_false", dest="barrier_with_L1_time",
                    help="level-1 timers start and stop without a barrier over ranks (faster, less exact)")
    lg.add_argument("--log-timers-to-tensorboard", action="store_true",
                    help="the timers as TensorBoard scalars <name>-time (seconds per iteration, max over ranks)")
    lg.add_argument("--manual-gc", action="store_true",
                    help="Python's garbage collector off, collections at fixed iterations instead (the same "
                         "ones on every rank, so no rank stalls the others at a random step)")
    lg.add_argument("--manual-gc-interval", type=int, default=0,
                    help="with --manual-gc: collect every N iterations (0: never between steps)")
    lg.add_argument("--no-manual-gc-eval", action="store_false", dest="manual_gc_eval",
                    help="with --manual-gc: no collection before and after each evaluation")
    lg.add_argument("--skip-nonfinite-steps", type=int, default=0,
                    help="skip up to N steps with a NaN/Inf loss or grad norm instead of stopping (N over the "
                         "whole run: the count is kept in the checkpoints)")
    # test hooks: make 0-based iteration(s) N [M ...] non-finite -- "loss": NaN loss and gradients (what bad
    # data gives), "grad": one gradient element Inf with a finite loss (what an overflow gives)
    lg.add_argument("--inject-nonfinite-at", type=int, nargs="+", default=None, help=argparse.SUPPRESS)
    lg.add_argument("--inject-nonfinite-kind", choices=("loss", "grad"), default="loss", help=argparse.SUPPRESS)
    lg.add_argument("--profile", action="store_true",
                    help="profile iterations [--profile-step-start, --profile-step-end) on --profile-ranks")
    lg.add_argument("--use-pytorch-profiler", action="store_true",
                    help="with --profile: torch.profiler, a trace per rank into --tensorboard-dir (else "
                         "cudaProfilerStart/Stop for nsys, CUDA only)")
    lg.add_argument("--profile-step-start", type=int, default=10, help="first profiled iteration (0-based)")
    lg.add_argument("--profile-step-end", type=int, default=12, help="profiling stops after this many iterations")
    lg.add_argument("--profile-ranks", type=int, nargs="+", default=[0], help="global ranks to profile")
    lg.add_argument("--print-model-size", action="store_true",
                    help="print total and active parameters for the config and exit")

    add_compat_flags(p)

    t = p.add_argument_group("token superposition (TST)")
    t.add_argument("--tst-bag-size", type=int, default=None,
                   help="s, tokens per bag (default 1 = plain next-token training)")
    t.add_argument("--tst-superposition-ratio", type=float, default=None,
                   help="fraction r of --train-iters in the superposition phase (paper: 0.2-0.4); needed with "
                        "--tst-bag-size s > 1 unless --tst-superposition-iters is given (0: the plain baseline)")
    t.add_argument("--tst-superposition-iters", type=int, default=None, help="explicit count; overrides the ratio")
    t.add_argument("--tst-bag-weighting", choices=list(WEIGHTINGS), default="uniform",
                   help="weights of the s targets of a bag in the multi-hot loss")
    t.add_argument("--tst-mode", choices=list(MODES), default="full",
                   help="full: bag in, next bag out; input: bag in, next token out; output: token in, next bag out")
    return p



def _split_groups(ns: argparse.Namespace) -> RunConfig:
    d = vars(ns)

    def take(cls):
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})

    try:
        tst = TSTConfig(bag_size=ns.tst_bag_size, superposition_ratio=ns.tst_superposition_ratio,
                        superposition_iters=ns.tst_superposition_iters,
                        bag_weighting=ns.tst_bag_weighting, mode=ns.tst_mode)
    except ValueError as exc:
        raise SystemExit(f"error: {str(exc).replace('TSTConfig.', '--tst-').replace('_', '-')}")
    return RunConfig(model=take(ModelArgs), parallel=take(ParallelArgs), optim=take(OptimArgs),
                     data=take(DataArgs), ckpt=take(CheckpointArgs), logging=take(LoggingArgs), tst=tst)


# Megatron-LM flags whose job another flag does here.
_MEGATRON_EQUIVALENTS = {
    "--override-opt_param-scheduler": "--override-checkpoint-args",
    "--use-checkpoint-opt_param-scheduler": "--override-checkpoint-args (the checkpoint's schedule is kept "
                                            "by default)",
}

# Megatron-LM flags of its example scripts that this trainer does not implement: what to do instead.
_NOT_IMPLEMENTED = {
    "--moe-grouped-gemm": "not implemented; drop it: the experts run as megatron-core's SequentialMLP (the same "
                          "function, the experts' GEMMs one after another)",
    "--moe-permute-fusion": "not implemented; drop it: megatron-core's unfused token permutation runs",
    "--moe-router-fusion": "not implemented; drop it: megatron-core's unfused router runs",
    "--cross-entropy-loss-fusion": "not implemented; drop it: the next-token loss is megatron-core's vocab-parallel "
                                   "cross-entropy (the multi-hot loss has its own fused kernels)",
    "--async-save": "not implemented; drop it: checkpoints are written synchronously and atomically",
    "--tensorboard-log-interval": "not implemented; drop it: TensorBoard scalars are written every --log-interval",
    "--fp8-format": "FP8 training is not implemented (use --bf16)",
    "--mtp-num-layers": "multi-token prediction is not implemented",
    "--multi-latent-attention": "multi-latent attention is not implemented",
    "--no-check-for-nan-in-loss-and-grad": "the non-finite guard cannot be turned off: a NaN/Inf loss or gradient "
                                           "norm stops the run without saving; to skip such steps instead, give "
                                           "--skip-nonfinite-steps N",
}


def _suggestions(parser: argparse.ArgumentParser, unknown: List[str]) -> str:
    """' (did you mean --x?)' hints for unknown flags: close spellings or Megatron-LM equivalents."""
    known = [o for o in parser._option_string_actions if o.startswith("--")]
    hints = []
    for arg in unknown:
        flag = arg.split("=", 1)[0]
        if not flag.startswith("--"):
            continue
        if flag in _MEGATRON_EQUIVALENTS:
            hints.append(f"{flag}: use {_MEGATRON_EQUIVALENTS[flag]}")
            continue
        if flag in _NOT_IMPLEMENTED:
            hints.append(f"{flag}: {_NOT_IMPLEMENTED[flag]}")
            continue
        close = difflib.get_close_matches(flag, known, n=2, cutoff=0.75)
        if close:
            hints.append(f"{flag}: did you mean {' or '.join(close)}?")
    return f" ({'; '.join(hints)})" if hints else ""


def read_data_args_files(ns: argparse.Namespace) -> None:
    """Megatron-LM's --data-args-path / --per-split-data-args-path: the data lists from files,
    read into --data-path / --train-/--valid-/--test-data-path (what the rest of the run, and a
    resume's comparison, see)."""
    def fail(message: str) -> None:
        raise SystemExit(f"error: {message}")

    def read(flag: str, path: str) -> str:
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except OSError as exc:
            fail(f"{flag} {path}: cannot read it ({exc.strerror or exc})")

    per_split_flags = any(x is not None for x in (ns.train_data_path, ns.valid_data_path, ns.test_data_path))
    if ns.data_args_path is not None:
        if ns.data_path:
            fail("give --data-path or --data-args-path (a file holding that list), not both")
        if per_split_flags or ns.per_split_data_args_path is not None or ns.mock_data:
            fail("--data-args-path holds a --data-path list (cut by --split); it cannot go with "
                 "--train-/--valid-/--test-data-path, --per-split-data-args-path or --mock-data: give one")
        ns.data_path = read("--data-args-path", ns.data_args_path).split()
        if not ns.data_path:
            fail(f"--data-args-path {ns.data_args_path}: the file is empty; it should hold the --data-path list")
    if ns.per_split_data_args_path is not None:
        path = ns.per_split_data_args_path
        if per_split_flags:
            fail("give --train-/--valid-/--test-data-path or --per-split-data-args-path (a file holding them), "
                 "not both")
        if ns.data_path or ns.mock_data:
            fail("--per-split-data-args-path holds the --train-/--valid-/--test-data-path lists; it cannot go with "
                 f"{'--data-path' if ns.data_path else '--mock-data'}: give one")
        try:
            splits = json.loads(read("--per-split-data-args-path", path))
        except ValueError as exc:
            fail(f"--per-split-data-args-path {path}: not valid JSON ({exc})")
        if not isinstance(splits, dict) or not set(splits) <= {"train", "valid", "test"} or "train" not in splits:
            fail(f'--per-split-data-args-path {path}: expected an object with the keys "train" (the data to '
                 f'train on), "valid", "test" (got {sorted(splits) if isinstance(splits, dict) else type(splits).__name__})')
        for split, value in splits.items():
            if isinstance(value, str):
                value = value.split()
            if not (isinstance(value, list) and value and all(isinstance(v, (str, int, float)) for v in value)):
                fail(f'--per-split-data-args-path {path}: "{split}" must be a non-empty list (or string) of '
                     "prefixes, optionally weighted")
            setattr(ns, f"{split}_data_path", [str(v) for v in value])


def parse_args(argv: Optional[List[str]] = None, *, model_from_flags: bool = True) -> RunConfig:
    """`model_from_flags=False`: the model's shape comes from elsewhere (a Hugging Face config in
    `convert_checkpoint.py import`), so MoE flags without --num-experts are not a dense model's."""
    parser = build_parser()
    ns, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{_suggestions(parser, unknown)} -- this "
                     "trainer does not know these flags (a Megatron-LM flag it does not implement, or a "
                     "typo); see `pretrain_tst.py --help` for the supported ones")
    read_data_args_files(ns)
    if ns.use_checkpoint_args:  # before the compatibility checks: they see the checkpoint's architecture
        from .checkpoint_args import apply_checkpoint_args

        apply_checkpoint_args(ns, parser, list(sys.argv[1:] if argv is None else argv))
    check_compat_flags(ns)
    if ns.num_experts is None and model_from_flags:  # MoE flags on a dense model would be dropped without a word
        from .checkpoint_args import typed_dests

        typed = typed_dests(parser, list(sys.argv[1:] if argv is None else argv))
        moe = [a.option_strings[0] for g in parser._action_groups if g.title == "mixture of experts"
               for a in g._group_actions if a.dest in typed and a.dest != "num_experts"]
        if moe:
            raise SystemExit(f"error: {', '.join(moe)} without --num-experts: the model would be dense and "
                             f"{'these flags' if len(moe) > 1 else 'the flag'} ignored; give --num-experts E for "
                             "an MoE, or drop them")
    if ns.train_samples is not None and ns.train_iters is not None:
        raise SystemExit("error: give one of --train-iters and --train-samples (as in Megatron-LM)")
    if ns.train_samples is None:
        ns.train_iters = 100 if ns.train_iters is None else ns.train_iters
    bag_given = ns.tst_bag_size is not None
    if not bag_given:
        ns.tst_bag_size = 1
    ratio_given = ns.tst_superposition_ratio is not None
    if not ratio_given:
        ns.tst_superposition_ratio = 0.0
    if ns.group_query_attention and ns.num_query_groups is None:
        ns.num_query_groups = 1  # Megatron-LM's default: GQA without a group count is multi-query
    cfg = _split_groups(ns)  # values out of range are refused first
    if not bag_given:  # TST settings without a bag size would silently train the baseline
        t = cfg.tst
        given = [f"{flag} {value}" for flag, value, default in (
            ("--tst-superposition-ratio", t.superposition_ratio, 0.0),
            ("--tst-superposition-iters", t.superposition_iters, None),
            ("--tst-bag-weighting", t.bag_weighting, "uniform"),
            ("--tst-mode", t.mode, "full")) if value not in (default, 0)]
        if given:
            raise SystemExit(f"error: {', '.join(given)} given without --tst-bag-size: the default bag size 1 "
                             "has no superposition phase; give --tst-bag-size s > 1 for TST (an explicit "
                             "--tst-bag-size 1 is the plain baseline, e.g. in a sweep over s)")
    if cfg.tst.bag_size > 1 and not ratio_given and cfg.tst.superposition_iters is None:
        # the mirror image: a bag size alone would train the baseline (r defaults to 0)
        raise SystemExit(f"error: --tst-bag-size {cfg.tst.bag_size} without --tst-superposition-ratio r or "
                         "--tst-superposition-iters N: the superposition phase would be empty; give r (the paper "
                         "uses 0.2-0.4) or N (an explicit --tst-superposition-ratio 0 is the plain baseline)")
    if cfg.tst.mode == "input" and cfg.tst.bag_weighting != "uniform":
        raise SystemExit(f"error: --tst-bag-weighting {cfg.tst.bag_weighting} with --tst-mode input: that mode "
                         "predicts the next token, not a bag, so there are no bag targets to weight; drop the flag")
    return cfg
