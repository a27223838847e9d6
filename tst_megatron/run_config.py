"""The run's configuration: one small dataclass per concern, built by `arguments.parse_args` from
Megatron-LM flag names and checked by `validation.validate`. Nothing in the package reads global
arguments; every piece gets the part it needs.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import List, Optional, Union

from .config import TSTConfig


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
    squared_relu: bool = False  # relu(x)^2 MLP (Primer; Megatron-LM's --squared-relu), instead of GeLU
    apply_layernorm_1p: bool = False  # norm weights as zero-centred gammas: norm(x) * (1 + w), w from 0
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
    moe_layer_freq: Union[int, List[int]] = 1  # every k-th layer from 0, or a 0/1 per layer (1 = MoE)
    moe_router_pre_softmax: bool = False
    moe_z_loss_coeff: Optional[float] = None
    moe_router_dtype: Optional[str] = None
    moe_router_score_function: str = "softmax"
    moe_router_enable_expert_bias: bool = False  # aux-loss-free balancing: a router buffer in the checkpoint
    moe_router_bias_update_rate: Optional[float] = None  # megatron-core's 1e-3 unless given
    moe_router_topk_scaling_factor: Optional[float] = None
    moe_router_num_groups: Optional[int] = None
    moe_router_group_topk: Optional[int] = None
    moe_expert_capacity_factor: Optional[float] = None
    moe_pad_expert_input_to_capacity: bool = False
    moe_token_drop_policy: Optional[str] = None  # megatron-core's "probs" unless given
    # activation recomputation (memory for compute; the function computed is the same)
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None
    transformer_impl: Optional[str] = None  # None: Transformer Engine when available, else local

    def moe_layer_pattern(self) -> List[bool]:
        """[is this layer MoE] for every layer (all False without --num-experts)."""
        if not self.num_experts:
            return [False] * self.num_layers
        return [bool(x) for x in moe_layer_pattern(self.moe_layer_freq, self.num_layers)]

    def resolved_ffn_hidden_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        if self.swiglu:  # Megatron-LM's default for SwiGLU: 2/3 of 4h, rounded down to 64
            return max(64, int((4 * self.hidden_size * 2 / 3) / 64) * 64)
        return 4 * self.hidden_size


def moe_layer_pattern(freq: Union[int, List[int]], num_layers: int) -> List[int]:
    """megatron's convention for --moe-layer-freq as one 0/1 per layer (1 = MoE): an int k means
    layers 0, k, 2k, ...; a list is the pattern itself. 2 and [1, 0, 1, 0] are the same layers."""
    if isinstance(freq, int):
        return [int(i % freq == 0) for i in range(num_layers)]
    return [int(x) for x in freq]


def stacks_layers(freq: Union[int, List[int]]) -> bool:
    """Whether megatron-core's checkpoint stores the decoder layers stacked, one entry per weight
    over all layers ("decoder.layers.<name>": --moe-layer-freq 1), or one entry per layer
    ("decoder.layers.<i>.<name>": any list, any int > 1). The spelling decides, not the layers:
    1 and [1, 1, 1, 1] are the same model whose checkpoints cannot load into each other."""
    return not isinstance(freq, list) and freq == 1


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
    grad_reduce_in_bf16: bool = False  # DDP's gradient buffers in bf16 (default: fp32)
    empty_unused_memory_level: int = 0  # Megatron-LM's torch.cuda.empty_cache() points
    ddp_bucket_size: Optional[int] = None  # parameters per gradient bucket (megatron-core's default if None)


@dataclass
class OptimArgs:
    micro_batch_size: int = 4
    global_batch_size: Optional[int] = None
    rampup_batch_size: Optional[List[int]] = None  # Megatron-LM's [start, increment, ramp samples]
    train_iters: int = 100
    lr: float = 1e-3
    min_lr: float = 0.0
    # Megatron-LM's separate peak/final LR for the input embedding and output layer (one schedule)
    decoupled_lr: Optional[float] = None
    decoupled_min_lr: Optional[float] = None
    lr_decay_style: str = "cosine"
    lr_warmup_iters: int = 0
    lr_warmup_fraction: Optional[float] = None
    lr_decay_iters: Optional[int] = None
    lr_wsd_decay_iters: Optional[int] = None
    # Megatron-LM's sample-based form: --train-samples sets --train-iters (samples // global batch,
    # or batch_schedule's count under --rampup-batch-size); the LR schedule then counts samples
    # (build_scheduler divides by the global batch, except under a ramp)
    train_samples: Optional[int] = None
    lr_decay_samples: Optional[int] = None
    lr_warmup_samples: Optional[int] = None
    lr_wsd_decay_samples: Optional[int] = None
    lr_wsd_decay_style: str = "linear"
    weight_decay: float = 0.01
    # Megatron-LM's weight-decay increment: from start to end over the run (constant: --weight-decay)
    start_weight_decay: Optional[float] = None
    end_weight_decay: Optional[float] = None
    weight_decay_incr_style: str = "constant"
    lr_warmup_init: float = 0.0  # the LR the linear warmup starts from
    # Megatron-LM's per-token normalisation: the loss of a step is the mean over every trained
    # position of the global batch (not the mean of per-micro-batch means)
    calculate_per_token_loss: bool = False
    log_num_zeros_in_grad: bool = False  # megatron's optimizer counts them (a logging flag in Megatron-LM)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    bf16: bool = False
    # fp16 with megatron-core's loss scaler (Megatron-LM's flags and defaults): dynamic unless
    # --loss-scale fixes it; an overflowing step is skipped and the scale lowered
    fp16: bool = False
    loss_scale: Optional[float] = None
    initial_loss_scale: float = 2.0 ** 32
    min_loss_scale: float = 1.0
    loss_scale_window: int = 1000
    hysteresis: int = 2
    seed: int = 1234

    @property
    def params_dtype(self):
        """The model's torch dtype (the optimizer keeps fp32 main weights for bf16 and fp16)."""
        import torch

        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else torch.float32


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
    data_args_path: Optional[str] = None  # read into data_path by parse_args
    per_split_data_args_path: Optional[str] = None  # read into train/valid/test_data_path
    mmap_bin_files: bool = True
    num_dataset_builder_threads: int = 1
    mid_level_dataset_surplus: float = 0.005  # orders a blend: part of the train stream's identity

    def build_tokenizer(self, vocab_size: Optional[int]):
        """The tokenizer these flags name (--vocab-file is GPT2BPETokenizer's model file)."""
        from .tokenizers import build_tokenizer

        return build_tokenizer(self.tokenizer_type, self.tokenizer_model or self.vocab_file, vocab_size,
                               merge_file=self.merge_file,
                               include_special_tokens=self.tokenizer_hf_include_special_tokens)
    split: str = "969,30,1"
    tokenizer_type: str = "NullTokenizer"
    tokenizer_model: Optional[str] = None
    tokenizer_hf_include_special_tokens: bool = False
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
    use_checkpoint_args: bool = False  # applied by parse_args (checkpoint_args.py)
    ckpt_fully_parallel_save: bool = True  # Megatron-LM's default: replicated tensors written by all DP ranks
    ckpt_fully_parallel_load: bool = False
    exit_on_missing_checkpoint: bool = False
    finetune: bool = False
    # Megatron-LM's requeue-safe fine-tuning: when --load holds no checkpoint, start from this
    # one's weights as --finetune does; once --load holds one, resume it
    pretrained_checkpoint: Optional[str] = None


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
    log_params_norm: bool = False
    skip_train: bool = False  # Megatron-LM's evaluation-only run
    log_memory_to_tensorboard: bool = False
    timing_log_level: int = 0  # megatron-core's Timers (0: none), tst_megatron/timing.py
    timing_log_option: str = "minmax"
    barrier_with_L1_time: bool = True
    log_timers_to_tensorboard: bool = False
    manual_gc: bool = False  # Megatron-LM's: gc disabled, gc.collect() at fixed iterations
    manual_gc_interval: int = 0
    manual_gc_eval: bool = True
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

    def recorded_dict(self) -> dict:
        """`to_dict()` as a checkpoint records it: data and tokenizer paths made absolute, so that
        a conversion or resume started from another directory finds the same files."""
        return absolute_paths(self.to_dict())


_PATH_FIELDS = ("data_path", "train_data_path", "valid_data_path", "test_data_path", "tokenizer_model",
                "vocab_file", "merge_file", "data_cache_path")


def absolute_paths(args: dict) -> dict:
    """A copy of a `to_dict()` dict whose data and tokenizer paths that exist here are absolute
    (blend weights, and names that are not paths here, stay as given)."""
    def fix(value):
        if isinstance(value, (list, tuple)):
            return [fix(v) for v in value]
        if isinstance(value, str) and not is_number(value) and not os.path.isabs(value) and (
                os.path.exists(value) or os.path.exists(value + ".bin") or os.path.exists(value + ".idx")):
            return os.path.abspath(value)
        return value

    out = dict(args)
    if isinstance(args.get("data"), dict):
        out["data"] = {k: fix(v) if k in _PATH_FIELDS else v for k, v in args["data"].items()}
    return out


def is_number(text: str) -> bool:
    """A blend weight rather than a path (a --data-path entry float() reads)."""
    try:
        float(text)
        return True
    except ValueError:
        return False


def same_dir(a: Optional[str], b: Optional[str]) -> bool:
    """Whether two directory flags name one directory (through symlinks too: a requeued job's
    --load and --save are often spelt differently)."""
    return a is not None and b is not None and os.path.realpath(a) == os.path.realpath(b)


def fail(message: str) -> None:
    """Stop before any compute with a message that names the flag or file and what to do."""
    raise SystemExit(f"error: {message}")
