"""Command line of pretrain_tst.py: Megatron-LM flag names in, explicit config objects out.

Megatron's flags are the user interface; inside the package nothing reads global arguments.
`parse_args(argv)` returns a `RunConfig` holding one small dataclass per concern. Flags that
Megatron-LM has but this trainer does not implement are not accepted (argparse rejects unknown
flags, with a hint), never silently ignored.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.util
import math
import os
import sys
from dataclasses import dataclass, field
from typing import List, Optional

from .config import MODES, WEIGHTINGS, TSTConfig
from .megatron_compat import add_compat_flags, check_compat_flags


@dataclass
class ModelArgs:
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: Optional[int] = None
    num_attention_heads: int = 4
    group_query_attention: bool = False
    num_query_groups: Optional[int] = None
    kv_channels: Optional[int] = None
    seq_length: int = 128
    max_position_embeddings: Optional[int] = None
    position_embedding_type: str = "rope"
    rotary_base: int = 10000
    normalization: str = "RMSNorm"
    norm_epsilon: float = 1e-5
    swiglu: bool = False
    qk_layernorm: bool = False
    untie_embeddings_and_output_weights: bool = False
    disable_bias_linear: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_method_std: float = 0.02
    vocab_size: Optional[int] = None
    make_vocab_size_divisible_by: int = 128
    # MoE
    num_experts: Optional[int] = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: Optional[int] = None
    moe_aux_loss_coeff: float = 0.0
    moe_router_load_balancing_type: str = "aux_loss"
    moe_token_dispatcher_type: str = "allgather"
    moe_shared_expert_intermediate_size: Optional[int] = None
    moe_layer_freq: int = 1
    moe_router_pre_softmax: bool = False
    moe_z_loss_coeff: Optional[float] = None
    moe_router_dtype: Optional[str] = None
    # activation recomputation (memory for compute; the function computed is the same)
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None
    transformer_impl: Optional[str] = None  # None: Transformer Engine when available, else local

    def resolved_ffn_hidden_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        if self.swiglu:  # Megatron-LM's default for SwiGLU: 2/3 of 4h, rounded down to 64
            return max(64, int((4 * self.hidden_size * 2 / 3) / 64) * 64)
        return 4 * self.hidden_size


@dataclass
class ParallelArgs:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    num_layers_per_virtual_pipeline_stage: Optional[int] = None
    expert_model_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    distributed_timeout_minutes: int = 30


@dataclass
class OptimArgs:
    micro_batch_size: int = 4
    global_batch_size: Optional[int] = None
    train_iters: int = 100
    lr: float = 1e-3
    min_lr: float = 0.0
    lr_decay_style: str = "cosine"
    lr_warmup_iters: int = 0
    lr_warmup_fraction: Optional[float] = None
    lr_decay_iters: Optional[int] = None
    lr_wsd_decay_iters: Optional[int] = None
    # Megatron-LM's sample-based form: --train-samples sets --train-iters (samples // global batch);
    # the LR schedule then counts samples (build_scheduler divides by the global batch)
    train_samples: Optional[int] = None
    lr_decay_samples: Optional[int] = None
    lr_warmup_samples: Optional[int] = None
    lr_wsd_decay_samples: Optional[int] = None
    lr_wsd_decay_style: str = "linear"
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    bf16: bool = False
    seed: int = 1234


@dataclass
class DataArgs:
    data_path: List[str] = field(default_factory=list)
    train_data_path: Optional[List[str]] = None
    valid_data_path: Optional[List[str]] = None
    test_data_path: Optional[List[str]] = None
    eod_mask_loss: bool = False
    reset_position_ids: bool = False
    vocab_file: Optional[str] = None
    merge_file: Optional[str] = None
    mock_data: bool = False

    def build_tokenizer(self, vocab_size: Optional[int]):
        """The tokenizer these flags name (--vocab-file is GPT2BPETokenizer's model file)."""
        from .tokenizers import build_tokenizer

        return build_tokenizer(self.tokenizer_type, self.tokenizer_model or self.vocab_file, vocab_size,
                               merge_file=self.merge_file)
    split: str = "969,30,1"
    tokenizer_type: str = "NullTokenizer"
    tokenizer_model: Optional[str] = None
    data_cache_path: Optional[str] = None
    num_workers: int = 0


@dataclass
class CheckpointArgs:
    save: Optional[str] = None
    load: Optional[str] = None
    save_interval: Optional[int] = None
    ckpt_format: str = "torch_dist"
    no_load_optim: bool = False
    no_load_rng: bool = False
    no_save_optim: bool = False
    no_save_rng: bool = False
    ckpt_fallback: bool = False
    override_checkpoint_args: bool = False
    exit_interval: Optional[int] = None
    exit_duration_in_mins: Optional[float] = None
    exit_signal_handler: bool = False
    exit_on_missing_checkpoint: bool = False
    finetune: bool = False


@dataclass
class LoggingArgs:
    log_interval: int = 10
    eval_interval: Optional[int] = None
    eval_iters: int = 10
    metrics_path: Optional[str] = None
    tensorboard_dir: Optional[str] = None
    wandb_project: Optional[str] = None
    wandb_exp_name: Optional[str] = None
    run_name: Optional[str] = None
    skip_nonfinite_steps: int = 0
    inject_nonfinite_at: Optional[List[int]] = None
    inject_nonfinite_kind: str = "loss"
    print_model_size: bool = False
    profile: bool = False
    use_pytorch_profiler: bool = False
    profile_step_start: int = 10
    profile_step_end: int = 12
    profile_ranks: List[int] = field(default_factory=lambda: [0])


@dataclass
class RunConfig:
    model: ModelArgs
    parallel: ParallelArgs
    optim: OptimArgs
    data: DataArgs
    ckpt: CheckpointArgs
    logging: LoggingArgs
    tst: TSTConfig

    def to_dict(self) -> dict:
        return {name: dataclasses.asdict(getattr(self, name)) for name in
                ("model", "parallel", "optim", "data", "ckpt", "logging", "tst")}



class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only when it has one (no "(default: None)" / "(default: False)")."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


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
    e.add_argument("--moe-layer-freq", type=int, default=1, help="every Nth layer is MoE (1 = all)")
    e.add_argument("--moe-z-loss-coeff", type=float, default=None,
                   help="weight of the router z-loss (squared log-sum-exp of the router logits)")
    e.add_argument("--moe-router-dtype", choices=["fp32", "fp64"], default=None,
                   help="compute the router logits and their softmax in this precision (default: the model's)")
    e.add_argument("--moe-router-pre-softmax", action="store_true",
                   help="softmax over all experts before the top-k selection")

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

    o = p.add_argument_group("batch and optimisation")
    o.add_argument("--micro-batch-size", type=int, default=4, help="samples per forward/backward on one rank")
    o.add_argument("--global-batch-size", type=int, default=None, help="default micro-batch x data-parallel size")
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
    o.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine", "WSD"], default="cosine",
                   help="one schedule over all iterations (no re-warmup at the TST switch)")
    o.add_argument("--lr-warmup-iters", type=int, default=0, help="linear warmup steps from 0")
    o.add_argument("--lr-warmup-fraction", type=float, default=None,
                   help="warmup as a fraction of --lr-decay-iters (instead of --lr-warmup-iters)")
    o.add_argument("--lr-decay-iters", type=int, default=None, help="default --train-iters")
    o.add_argument("--lr-wsd-decay-iters", type=int, default=None,
                   help="WSD: length of the final decay; default --train-iters // 10")
    o.add_argument("--lr-wsd-decay-style", choices=["linear", "cosine", "exponential", "minus_sqrt"], default="linear",
                   help="WSD: shape of the final decay")
    o.add_argument("--weight-decay", type=float, default=0.01,
                   help="AdamW decoupled weight decay (not on biases and norms)")
    o.add_argument("--adam-beta1", type=float, default=0.9, help="AdamW beta1")
    o.add_argument("--adam-beta2", type=float, default=0.95, help="AdamW beta2")
    o.add_argument("--adam-eps", type=float, default=1e-8, help="AdamW epsilon")
    o.add_argument("--clip-grad", type=float, default=1.0, help="clip the global gradient norm to this (0 = off)")
    o.add_argument("--bf16", action="store_true", help="bf16 parameters and compute with fp32 main weights")
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
    lg.add_argument("--skip-nonfinite-steps", type=int, default=0,
                    help="skip up to N steps with a NaN/Inf loss or grad norm instead of stopping")
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
    t.add_argument("--tst-superposition-ratio", type=float, default=0.0,
                   help="fraction r of --train-iters in the superposition phase (paper: 0.2-0.4)")
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
    "--use-checkpoint-args": "the checkpoint's values (a resume checks them against the flags)",
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
        close = difflib.get_close_matches(flag, known, n=2, cutoff=0.75)
        if close:
            hints.append(f"{flag}: did you mean {' or '.join(close)}?")
    return f" ({'; '.join(hints)})" if hints else ""


def parse_args(argv: Optional[List[str]] = None) -> RunConfig:
    parser = build_parser()
    ns, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{_suggestions(parser, unknown)} -- this "
                     "trainer does not know these flags (a Megatron-LM flag it does not implement, or a "
                     "typo); see `pretrain_tst.py --help` for the supported ones")
    check_compat_flags(ns)
    if ns.train_samples is not None and ns.train_iters is not None:
        raise SystemExit("error: give one of --train-iters and --train-samples (as in Megatron-LM)")
    if ns.train_samples is None:
        ns.train_iters = 100 if ns.train_iters is None else ns.train_iters
    bag_given = ns.tst_bag_size is not None
    if not bag_given:
        ns.tst_bag_size = 1
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
    return cfg


def same_dir(a: Optional[str], b: Optional[str]) -> bool:
    return a is not None and b is not None and os.path.abspath(a) == os.path.abspath(b)


def fail(message: str) -> None:
    """Stop before any compute with a message that names the flag or file and what to do."""
    raise SystemExit(f"error: {message}")


def _resolve_samples(o: OptimArgs) -> None:
    """Megatron-LM's sample-based flags: either all in samples (with --train-samples) or all in
    iterations. --train-iters becomes --train-samples // --global-batch-size, as Megatron-LM does."""
    by_samples = (("--lr-decay-samples", o.lr_decay_samples), ("--lr-warmup-samples", o.lr_warmup_samples),
                  ("--lr-wsd-decay-samples", o.lr_wsd_decay_samples))
    if o.train_samples is None:
        given = [flag for flag, value in by_samples if value is not None]
        if given:
            fail(f"{', '.join(given)} need --train-samples (with --train-iters the schedule is in iterations: "
                 "--lr-decay-iters, --lr-warmup-iters, --lr-wsd-decay-iters)")
        return
    given = [flag for flag, value in (("--lr-decay-iters", o.lr_decay_iters),
                                      ("--lr-warmup-iters", o.lr_warmup_iters or None),
                                      ("--lr-wsd-decay-iters", o.lr_wsd_decay_iters)) if value is not None]
    if given:
        fail(f"{', '.join(given)} with --train-samples: give the schedule in samples (--lr-decay-samples, "
             "--lr-warmup-samples, --lr-wsd-decay-samples)")
    if o.train_samples < o.global_batch_size:
        fail(f"--train-samples ({o.train_samples}) is less than one --global-batch-size ({o.global_batch_size})")
    for flag, value in by_samples:
        if value is not None and not 0 <= value <= o.train_samples:
            fail(f"{flag} must be in [0, --train-samples] (got {value})")
    o.train_iters = o.train_samples // o.global_batch_size


def validate(cfg: RunConfig, world_size: int) -> None:
    """Argument checks that need no data or model: run on every rank before anything is built."""
    m, par, o, c = cfg.model, cfg.parallel, cfg.optim, cfg.ckpt
    for name, value in (("--num-layers", m.num_layers), ("--hidden-size", m.hidden_size),
                        ("--num-attention-heads", m.num_attention_heads), ("--seq-length", m.seq_length),
                        ("--micro-batch-size", o.micro_batch_size),
                        ("--train-iters", o.train_iters) if o.train_samples is None
                        else ("--train-samples", o.train_samples),
                        ("--log-interval", cfg.logging.log_interval),
                        ("--distributed-timeout-minutes", par.distributed_timeout_minutes),
                        ("--tensor-model-parallel-size", par.tensor_model_parallel_size),
                        ("--pipeline-model-parallel-size", par.pipeline_model_parallel_size),
                        ("--expert-model-parallel-size", par.expert_model_parallel_size)):
        if value is None or value < 1:
            fail(f"{name} must be >= 1 (got {value})")
    tp, pp, ep = par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.expert_model_parallel_size
    if world_size % (tp * pp) != 0:
        fail(f"world size {world_size} is not divisible by --tensor-model-parallel-size ({tp}) x "
             f"--pipeline-model-parallel-size ({pp}); launch a multiple of {tp * pp} processes")
    dp = world_size // (tp * pp)
    if m.num_attention_heads % tp:
        fail(f"--num-attention-heads ({m.num_attention_heads}) must be divisible by "
             f"--tensor-model-parallel-size ({tp})")
    if m.hidden_size % m.num_attention_heads and m.kv_channels is None:
        fail(f"--hidden-size ({m.hidden_size}) must be divisible by --num-attention-heads "
             f"({m.num_attention_heads}), or give --kv-channels")
    groups = m.num_query_groups if m.group_query_attention else None
    if m.num_query_groups is not None and not m.group_query_attention:
        fail("--num-query-groups needs --group-query-attention")
    if groups is not None:
        if groups < 1 or m.num_attention_heads % groups:
            fail(f"--num-query-groups ({groups}) must divide --num-attention-heads ({m.num_attention_heads})")
        if groups % tp:
            fail(f"--num-query-groups ({groups}) must be divisible by --tensor-model-parallel-size ({tp})")
    for flag, size in (("--ffn-hidden-size", m.resolved_ffn_hidden_size()),
                       ("--moe-ffn-hidden-size", m.moe_ffn_hidden_size),
                       ("--moe-shared-expert-intermediate-size", m.moe_shared_expert_intermediate_size)):
        if size is not None and size % tp:
            fail(f"{flag} ({size}) must be divisible by --tensor-model-parallel-size ({tp}): the MLP is split "
                 "column-wise over the tensor-parallel ranks")
    if m.num_layers % pp:
        fail(f"--num-layers ({m.num_layers}) must be divisible by --pipeline-model-parallel-size ({pp})")
    if par.num_layers_per_virtual_pipeline_stage is not None:
        v = par.num_layers_per_virtual_pipeline_stage
        if pp < 2 or v < 1 or (m.num_layers // pp) % v:
            fail(f"--num-layers-per-virtual-pipeline-stage ({v}) must divide the layers per pipeline "
                 f"stage ({m.num_layers // pp}) and needs --pipeline-model-parallel-size > 1")
    if par.sequence_parallel and tp == 1:
        fail("--sequence-parallel needs --tensor-model-parallel-size > 1")
    if par.sequence_parallel and m.seq_length % tp:
        fail(f"--seq-length ({m.seq_length}) must be divisible by --tensor-model-parallel-size ({tp}) "
             "with --sequence-parallel")
    if m.num_experts is not None:
        if m.num_experts < 1:
            fail(f"--num-experts must be >= 1 (got {m.num_experts})")
        if m.num_experts % ep:
            fail(f"--num-experts ({m.num_experts}) must be divisible by --expert-model-parallel-size ({ep})")
        if dp % ep:  # megatron-core: world % (expert TP (= TP) x EP x PP) == 0
            fail(f"--expert-model-parallel-size ({ep}) must divide the data-parallel size ({dp}): megatron-core "
                 "lays the experts over data-parallel ranks, with --tensor-model-parallel-size as the experts' "
                 "tensor parallelism")
        if not (1 <= m.moe_router_topk <= m.num_experts):
            fail(f"--moe-router-topk ({m.moe_router_topk}) must be in [1, --num-experts]")
        if m.moe_z_loss_coeff is not None and not (math.isfinite(m.moe_z_loss_coeff) and m.moe_z_loss_coeff >= 0):
            fail(f"--moe-z-loss-coeff must be a finite number >= 0 (got {m.moe_z_loss_coeff})")
        # megatron-core's own refusals, moved before any compute (it would raise deep in model build)
        if m.moe_router_topk == 1 and not m.moe_router_pre_softmax and m.num_experts > 1:
            fail("--moe-router-topk 1 needs --moe-router-pre-softmax (megatron-core: a softmax over one "
                 "selected expert is always 1, so the router would get no gradient)")
        if tp > 1 and not par.sequence_parallel:
            fail("an MoE with --tensor-model-parallel-size > 1 needs --sequence-parallel (megatron-core's MoE "
                 "layer refuses tensor parallelism without it, at the first training step)")
        if tp > 1 and not m.disable_bias_linear:
            fail("an MoE with --tensor-model-parallel-size > 1 needs --disable-bias-linear (megatron-core has "
                 "expert biases only without expert tensor parallelism)")
        if m.moe_shared_expert_intermediate_size is not None and not m.disable_bias_linear:
            fail("--moe-shared-expert-intermediate-size needs --disable-bias-linear (megatron-core's shared "
                 "experts have no bias)")
    elif ep > 1:
        fail("--expert-model-parallel-size > 1 needs --num-experts")
    else:
        given = [flag for flag, value in (("--moe-z-loss-coeff", m.moe_z_loss_coeff),
                                          ("--moe-router-dtype", m.moe_router_dtype)) if value is not None]
        if given:
            fail(f"{' and '.join(given)} configure the MoE router: they need --num-experts")
    gbs = o.global_batch_size if o.global_batch_size is not None else o.micro_batch_size * dp
    if gbs % (o.micro_batch_size * dp):
        fail(f"--global-batch-size ({gbs}) must be divisible by --micro-batch-size ({o.micro_batch_size}) x "
             f"data-parallel size ({dp})")
    o.global_batch_size = gbs
    _resolve_samples(o)
    v = par.num_layers_per_virtual_pipeline_stage
    micro = gbs // (o.micro_batch_size * dp)
    if v and (m.num_layers // pp) // v > 1 and micro % pp:  # megatron-core's interleaved 1F1B groups
        fail(f"interleaved pipelining (--num-layers-per-virtual-pipeline-stage) needs the micro-batches per "
             f"step (--global-batch-size / (--micro-batch-size x data-parallel size) = {micro}) to be a "
             f"multiple of --pipeline-model-parallel-size ({pp})")
    if par.overlap_param_gather and not (par.use_distributed_optimizer and par.overlap_grad_reduce):
        fail("--overlap-param-gather needs --use-distributed-optimizer and --overlap-grad-reduce (as in "
             "Megatron-LM: it overlaps the distributed optimizer's parameter all-gather)")
    if m.recompute_granularity == "full" and (m.recompute_method is None or not m.recompute_num_layers
                                              or m.recompute_num_layers < 1):
        fail("--recompute-granularity full needs --recompute-method uniform|block and --recompute-num-layers N >= 1")
    if m.recompute_granularity != "full" and (m.recompute_method or m.recompute_num_layers):
        fail("--recompute-method / --recompute-num-layers are for --recompute-granularity full "
             f"(got --recompute-granularity {m.recompute_granularity})")
    if m.recompute_method == "uniform" and m.recompute_num_layers and \
            (m.num_layers // pp) % m.recompute_num_layers:
        fail(f"--recompute-method uniform needs --recompute-num-layers ({m.recompute_num_layers}) to divide the "
             f"layers per pipeline stage ({m.num_layers // pp})")
    if m.recompute_method == "block" and m.recompute_num_layers and m.recompute_num_layers > m.num_layers // pp:
        fail(f"--recompute-num-layers ({m.recompute_num_layers}) exceeds the layers per pipeline stage "
             f"({m.num_layers // pp})")
    for name, value in (("--lr", o.lr), ("--min-lr", o.min_lr), ("--weight-decay", o.weight_decay),
                        ("--clip-grad", o.clip_grad)):
        if not math.isfinite(value) or value < 0:
            fail(f"{name} must be a finite number >= 0 (got {value})")
    if o.min_lr > o.lr:
        fail(f"--min-lr ({o.min_lr}) must not exceed --lr ({o.lr})")
    if o.lr_warmup_iters < 0 or o.lr_warmup_iters > o.train_iters:
        fail(f"--lr-warmup-iters ({o.lr_warmup_iters}) must be in [0, --train-iters]")
    if o.lr_warmup_fraction is not None:
        if o.lr_warmup_iters:
            fail("give one of --lr-warmup-fraction and --lr-warmup-iters (as in Megatron-LM)")
        if not 0.0 <= o.lr_warmup_fraction < 1.0:
            fail(f"--lr-warmup-fraction must be in [0, 1) (got {o.lr_warmup_fraction})")
    if cfg.logging.eval_iters < 0:
        fail(f"--eval-iters must be >= 0 (got {cfg.logging.eval_iters}; 0 = no validation)")
    if o.lr_decay_style == "WSD" and o.lr_wsd_decay_iters is None:
        o.lr_wsd_decay_iters = max(1, o.train_iters // 10)
    for name, value in (("--hidden-dropout", m.hidden_dropout), ("--attention-dropout", m.attention_dropout)):
        if not (0.0 <= value < 1.0):
            fail(f"{name} must be in [0, 1) (got {value})")
    if m.max_position_embeddings is not None and m.position_embedding_type == "learned_absolute" \
            and m.max_position_embeddings < m.seq_length:
        fail(f"--max-position-embeddings ({m.max_position_embeddings}) < --seq-length ({m.seq_length})")
    try:
        cfg.tst.num_superposition_iters(o.train_iters)
    except ValueError as exc:
        fail(str(exc))
    if cfg.tst.enabled and cfg.tst.num_superposition_iters(o.train_iters) == 0:
        print(f"warning: --tst-bag-size {cfg.tst.bag_size} with 0 superposition iterations (--tst-superposition-"
              f"ratio {cfg.tst.superposition_ratio} of --train-iters {o.train_iters}, rounded down, or "
              "--tst-superposition-iters 0): this is a plain run", file=sys.stderr)
    d = cfg.data
    per_split = any(x is not None for x in (d.train_data_path, d.valid_data_path, d.test_data_path))
    if d.mock_data and (d.data_path or per_split):
        fail("--mock-data replaces --data-path / --train-data-path: give one or the other")
    if d.mock_data and d.split != DataArgs.split:
        fail(f"--split {d.split} with --mock-data: megatron-core splits mock data 1,1,1 itself; drop --split")
    if d.data_path and per_split:
        fail("give --data-path (cut by --split) or --train-data-path / --valid-data-path / --test-data-path, "
             "not both")
    if per_split and not d.train_data_path:
        fail("--valid-data-path / --test-data-path need --train-data-path (the data to train on)")
    if per_split and d.split != DataArgs.split:
        fail(f"--split {d.split} cuts --data-path; with --train-data-path / --valid-data-path / --test-data-path "
             "each split is its own data: drop --split")
    if not d.data_path and not per_split and not d.mock_data:
        fail("give --data-path PREFIX [PREFIX ...] (from tools/preprocess_data.py), or --train-data-path "
             "(with --valid-data-path / --test-data-path)")
    if cfg.data.tokenizer_type == "NullTokenizer" and m.vocab_size is None:
        fail("--tokenizer-type NullTokenizer needs --vocab-size (the pre-tokenized data's vocabulary)")
    if cfg.data.tokenizer_type != "NullTokenizer" and m.vocab_size is not None:
        fail(f"--vocab-size is for --tokenizer-type NullTokenizer only; with {cfg.data.tokenizer_type} the "
             "vocabulary comes from the tokenizer: drop --vocab-size")
    from .tokenizers import canonical_tokenizer_type

    kind = canonical_tokenizer_type(cfg.data.tokenizer_type)
    if kind in ("SentencePieceTokenizer", "HuggingFaceTokenizer"):
        if not cfg.data.tokenizer_model:
            fail(f"--tokenizer-type {cfg.data.tokenizer_type} needs --tokenizer-model PATH")
        if not os.path.exists(cfg.data.tokenizer_model):
            fail(f"--tokenizer-model {cfg.data.tokenizer_model}: no such file or directory")
    if kind == "GPT2BPETokenizer":
        for flag, path in (("--vocab-file", cfg.data.vocab_file), ("--merge-file", cfg.data.merge_file)):
            if not path:
                fail(f"--tokenizer-type GPT2BPETokenizer needs {flag} (GPT-2's vocab.json and merges.txt)")
            if not os.path.isfile(path):
                fail(f"{flag} {path}: no such file")
    elif cfg.data.vocab_file or cfg.data.merge_file:
        fail(f"--vocab-file / --merge-file are GPT2BPETokenizer's files; --tokenizer-type {cfg.data.tokenizer_type} "
             "does not read them")
    if kind in ("HuggingFaceTokenizer", "GPT2BPETokenizer") and importlib.util.find_spec("tokenizers") is None:
        fail(f"--tokenizer-type {cfg.data.tokenizer_type} needs the `tokenizers` package: pip install 'tst-megatron[hf]'")
    for flag, path in (("--save", c.save), ("--load", c.load), ("--metrics-path", cfg.logging.metrics_path),
                       ("--tensorboard-dir", cfg.logging.tensorboard_dir)):
        if path and flag != "--metrics-path" and os.path.exists(path) and not os.path.isdir(path):
            fail(f"{flag} {path}: is a file, not a directory; give a directory")
        if path and flag == "--metrics-path" and os.path.isdir(path):
            fail(f"--metrics-path {path}: is a directory; give a file path (e.g. {os.path.join(path, 'metrics.jsonl')})")
    if c.save_interval is not None and c.save_interval < 1:
        fail(f"--save-interval must be >= 1 (got {c.save_interval})")
    if c.save_interval is not None and not c.save:
        fail("--save-interval needs --save DIR")
    if c.finetune and not c.load:
        fail("--finetune needs --load DIR (the checkpoint whose weights the new run starts from)")
    if c.finetune and same_dir(c.load, c.save):
        fail(f"--finetune starts a new run from the weights in --load {c.load}: give it another --save directory "
             "(to continue that fine-tuning run later, --load its --save without --finetune)")
    # --load == --save with no directory yet is the first start of a requeued job: start fresh
    if c.load is not None and not os.path.isdir(c.load) and not same_dir(c.load, c.save):
        fail(f"--load {c.load}: directory does not exist")
    if cfg.logging.eval_interval is not None and cfg.logging.eval_interval < 1:
        fail(f"--eval-interval must be >= 1 (got {cfg.logging.eval_interval})")
    if cfg.logging.skip_nonfinite_steps < 0:
        fail("--skip-nonfinite-steps must be >= 0")
    lgc = cfg.logging
    if lgc.profile:
        if not 0 <= lgc.profile_step_start < lgc.profile_step_end <= o.train_iters:
            fail(f"--profile-step-start ({lgc.profile_step_start}) / --profile-step-end ({lgc.profile_step_end}) must "
                 f"satisfy 0 <= start < end <= --train-iters ({o.train_iters})")
        bad = [r for r in lgc.profile_ranks if not 0 <= r < world_size]
        if bad:
            fail(f"--profile-ranks {' '.join(map(str, bad))}: not ranks of this world of {world_size}")
        if lgc.use_pytorch_profiler and not lgc.tensorboard_dir:
            fail("--use-pytorch-profiler writes its traces into --tensorboard-dir: give one")
        if not lgc.use_pytorch_profiler:
            import torch

            if not torch.cuda.is_available():
                fail("--profile without --use-pytorch-profiler brackets the window for nsys (cudaProfilerStart/"
                     "Stop), which needs CUDA; add --use-pytorch-profiler")
    elif lgc.use_pytorch_profiler:
        fail("--use-pytorch-profiler is a mode of --profile: give --profile too")
    # optional logging back-ends: refused here, before a metrics file or checkpoint directory exists
    for flag, value, module, extra in (("--wandb-project", cfg.logging.wandb_project, "wandb", "wandb"),
                                       ("--tensorboard-dir", cfg.logging.tensorboard_dir, "tensorboard",
                                        "tensorboard")):
        if value and importlib.util.find_spec(module) is None:
            fail(f"{flag} needs the `{module}` package: pip install 'tst-megatron[{extra}]' (or drop {flag})")
