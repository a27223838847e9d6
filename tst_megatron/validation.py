"""Checks of a `RunConfig` that need no data or model: every rank runs `validate` first, before
anything is built, so a bad flag stops the run with a message that names it (data files and
checkpoints are checked next, in `preflight`)."""
from __future__ import annotations

import importlib.util
import math
import os
import sys

from .run_config import DataArgs, OptimArgs, RunConfig, fail, same_dir



def _check_writable(flag: str, path: str, directory: str) -> None:
    """The directory a run will write (or the nearest one that exists on the way to it) must be a
    writable directory: a run that cannot save finds out now, not at its first checkpoint."""
    probe = os.path.abspath(directory)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        fail(f"{flag} {path}: {probe} is a file, not a directory; give a path under a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        fail(f"{flag} {path}: {probe} is not writable by this job; give a directory it can write")

def _check_router(m) -> None:
    """The MoE router flags megatron-core would refuse while building the model (or whose
    combination would fail at the first routing), named here before anything is built."""
    if m.moe_router_enable_expert_bias and m.moe_router_score_function != "sigmoid":
        fail("--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid (megatron-core's "
             "aux-loss-free balancing biases sigmoid scores)")
    rate = m.moe_router_bias_update_rate
    if rate is not None and not m.moe_router_enable_expert_bias:
        fail("--moe-router-bias-update-rate sets the step of --moe-router-enable-expert-bias: give that too")
    if rate is not None and not (math.isfinite(rate) and rate >= 0):
        fail(f"--moe-router-bias-update-rate must be a finite number >= 0 (got {rate})")
    if m.moe_token_drop_policy is not None and m.moe_expert_capacity_factor is None:
        fail("--moe-token-drop-policy chooses what --moe-expert-capacity-factor drops: give a capacity factor")
    for flag, value in (("--moe-router-topk-scaling-factor", m.moe_router_topk_scaling_factor),
                        ("--moe-expert-capacity-factor", m.moe_expert_capacity_factor)):
        if value is not None and not (math.isfinite(value) and value > 0):
            fail(f"{flag} must be a finite number > 0 (got {value})")
    groups, group_topk = m.moe_router_num_groups, m.moe_router_group_topk
    if (groups is None) != (group_topk is None):
        fail("group-limited routing needs both --moe-router-num-groups and --moe-router-group-topk "
             f"(got {'--moe-router-num-groups' if groups is not None else '--moe-router-group-topk'} alone)")
    if groups is not None:
        if groups < 1 or m.num_experts % groups:
            fail(f"--moe-router-num-groups ({groups}) must divide --num-experts ({m.num_experts})")
        if not 1 <= group_topk <= groups:
            fail(f"--moe-router-group-topk ({group_topk}) must be in [1, --moe-router-num-groups ({groups})]")
        if m.moe_router_topk < group_topk:  # megatron-core ranks groups by their best topk // group_topk scores
            fail(f"--moe-router-topk ({m.moe_router_topk}) must be at least --moe-router-group-topk ({group_topk})")
        reachable = group_topk * (m.num_experts // groups)
        if m.moe_router_topk > reachable:
            fail(f"--moe-router-topk ({m.moe_router_topk}) is more than the {reachable} experts that "
                 f"--moe-router-group-topk {group_topk} group(s) of {m.num_experts // groups} hold")
    if m.moe_pad_expert_input_to_capacity and m.moe_expert_capacity_factor is None:
        fail("--moe-pad-expert-input-to-capacity pads to the capacity of --moe-expert-capacity-factor: give one")
    if m.moe_pad_expert_input_to_capacity and m.moe_router_enable_expert_bias:
        fail("--moe-router-enable-expert-bias with --moe-pad-expert-input-to-capacity: megatron-core counts each "
             "expert's tokens on the padded routing map, where every expert holds exactly its capacity, so the "
             "bias would never move; drop one of the two")


def _check_weight_decay_increment(o: OptimArgs) -> None:
    """Megatron-LM's rule: constant uses --weight-decay; linear/cosine need both ends."""
    given = [f for f, v in (("--start-weight-decay", o.start_weight_decay), ("--end-weight-decay", o.end_weight_decay))
             if v is not None]
    if o.weight_decay_incr_style == "constant":
        if given:
            fail(f"{' and '.join(given)} {'need' if len(given) > 1 else 'needs'} --weight-decay-incr-style linear "
                 "or cosine (constant keeps --weight-decay throughout)")
        return
    if len(given) < 2:
        fail(f"--weight-decay-incr-style {o.weight_decay_incr_style} needs --start-weight-decay and "
             "--end-weight-decay (the decay at the first step and from the last step on)")
    for flag, value in (("--start-weight-decay", o.start_weight_decay), ("--end-weight-decay", o.end_weight_decay)):
        if not math.isfinite(value) or value < 0:
            fail(f"{flag} must be a finite number >= 0 (got {value})")
    if o.end_weight_decay < o.start_weight_decay:
        fail(f"--end-weight-decay ({o.end_weight_decay}) must be >= --start-weight-decay ({o.start_weight_decay}): "
             "megatron's schedule only increases the weight decay")


def _check_rampup(o: OptimArgs, dp: int, pp_interleaved: int) -> None:
    """--rampup-batch-size START INCREMENT RAMP_SAMPLES: every batch of the ramp must split into
    whole micro-batches on every data-parallel rank (megatron-core asserts it at the step that
    reaches such a batch; here it is refused before anything is built)."""
    if o.rampup_batch_size is None:
        return
    start, increment, ramp = o.rampup_batch_size
    flag = f"--rampup-batch-size {start} {increment} {ramp}"
    if o.train_samples is None:
        fail(f"{flag} needs --train-samples (as in Megatron-LM: the ramp and the LR schedule count samples); "
             "give the run length with --train-samples and the schedule with --lr-*-samples")
    if start < 1 or increment < 1 or ramp < 1:  # (megatron-core divides by RAMP_SAMPLES)
        fail(f"{flag}: START, INCREMENT and RAMP_SAMPLES must be >= 1")
    if start >= o.global_batch_size:
        fail(f"{flag}: START must be below --global-batch-size ({o.global_batch_size}), the batch it ramps up "
             "to; without a ramp drop the flag")
    if (o.global_batch_size - start) % increment:
        fail(f"{flag}: --global-batch-size ({o.global_batch_size}) - START ({start}) must be a multiple of "
             f"INCREMENT ({increment})")
    group = o.micro_batch_size * dp
    if start % group or increment % group:
        fail(f"{flag}: every batch of the ramp must be a multiple of --micro-batch-size ({o.micro_batch_size}) x "
             f"data-parallel size ({dp}) = {group}; START and INCREMENT are not")
    if pp_interleaved > 1 and ((start // group) % pp_interleaved or (increment // group) % pp_interleaved):
        fail(f"{flag}: interleaved pipelining needs the micro-batches of every step of the ramp "
             f"(batch / {group}) to be a multiple of --pipeline-model-parallel-size ({pp_interleaved})")


def _resolve_samples(o: OptimArgs, dp: int = 1) -> None:
    """Megatron-LM's sample-based flags: either all in samples (with --train-samples) or all in
    iterations. --train-iters becomes --train-samples // --global-batch-size, as Megatron-LM does
    (with --rampup-batch-size: the ramp's steps, then whole batches)."""
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
    first = o.rampup_batch_size[0] if o.rampup_batch_size else o.global_batch_size
    if o.train_samples < first:
        fail(f"--train-samples ({o.train_samples}) is less than one "
             f"{'global batch (--rampup-batch-size START)' if o.rampup_batch_size else '--global-batch-size'} ({first})")
    for flag, value in by_samples:
        if value is not None and not 0 <= value <= o.train_samples:
            fail(f"{flag} must be in [0, --train-samples] (got {value})")
    from .batch_schedule import BatchSchedule

    o.train_iters = BatchSchedule(o.global_batch_size, o.rampup_batch_size, o.micro_batch_size,
                                  dp).iterations_for(o.train_samples)


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
    if o.global_batch_size is not None and o.global_batch_size < 1:
        fail(f"--global-batch-size must be >= 1 (got {o.global_batch_size})")
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
    if m.squared_relu and m.swiglu:
        fail("give one of --squared-relu and --swiglu (the MLP has one activation)")
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
        if isinstance(m.moe_layer_freq, list) and len(m.moe_layer_freq) != m.num_layers:
            fail(f"--moe-layer-freq: a list of {len(m.moe_layer_freq)} entries for --num-layers {m.num_layers} "
                 "(give one 0/1 per layer, 1 = MoE, or an int k for every k-th layer)")
        if not any(m.moe_layer_pattern()):
            fail("--moe-layer-freq makes no layer MoE: with --num-experts at least one entry must be 1")
        if not (1 <= m.moe_router_topk <= m.num_experts):
            fail(f"--moe-router-topk ({m.moe_router_topk}) must be in [1, --num-experts]")
        if m.moe_z_loss_coeff is not None and not (math.isfinite(m.moe_z_loss_coeff) and m.moe_z_loss_coeff >= 0):
            fail(f"--moe-z-loss-coeff must be a finite number >= 0 (got {m.moe_z_loss_coeff})")
        if not (math.isfinite(m.moe_aux_loss_coeff) and m.moe_aux_loss_coeff >= 0):
            # megatron-core turns the loss off for a coefficient <= 0 without a word
            fail(f"--moe-aux-loss-coeff must be a finite number >= 0 (got {m.moe_aux_loss_coeff})")
        if m.moe_router_pre_softmax and m.moe_router_score_function == "sigmoid":
            fail("--moe-router-pre-softmax with --moe-router-score-function sigmoid: megatron-core's sigmoid "
                 "routing has no pre-softmax form and would ignore it; drop one of them")
        _check_router(m)
        # megatron-core's own refusals, moved before any compute (it would raise deep in model build)
        if (m.moe_router_topk == 1 and not m.moe_router_pre_softmax and m.num_experts > 1
                and m.moe_router_score_function == "softmax"):
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
                                          ("--moe-router-dtype", m.moe_router_dtype),
                                          ("--moe-router-score-function", None if m.moe_router_score_function
                                           == "softmax" else m.moe_router_score_function),
                                          ("--moe-router-enable-expert-bias", m.moe_router_enable_expert_bias or None),
                                          ("--moe-router-topk-scaling-factor", m.moe_router_topk_scaling_factor),
                                          ("--moe-router-num-groups", m.moe_router_num_groups),
                                          ("--moe-router-group-topk", m.moe_router_group_topk),
                                          ("--moe-expert-capacity-factor", m.moe_expert_capacity_factor),
                                          ("--moe-pad-expert-input-to-capacity",
                                           m.moe_pad_expert_input_to_capacity or None),
                                          ("--moe-router-bias-update-rate", m.moe_router_bias_update_rate),
                                          ("--moe-token-drop-policy", m.moe_token_drop_policy)) if value is not None]
        if given:
            fail(f"{' and '.join(given)} configure the MoE router: they need --num-experts")
    gbs = o.global_batch_size if o.global_batch_size is not None else o.micro_batch_size * dp
    if gbs % (o.micro_batch_size * dp):
        fail(f"--global-batch-size ({gbs}) must be divisible by --micro-batch-size ({o.micro_batch_size}) x "
             f"data-parallel size ({dp})")
    o.global_batch_size = gbs
    v = par.num_layers_per_virtual_pipeline_stage
    _check_rampup(o, dp, pp if v and (m.num_layers // pp) // v > 1 else 1)
    _resolve_samples(o, dp)
    micro = gbs // (o.micro_batch_size * dp)
    if v and (m.num_layers // pp) // v > 1 and micro % pp:  # megatron-core's interleaved 1F1B groups
        fail(f"interleaved pipelining (--num-layers-per-virtual-pipeline-stage) needs the micro-batches per "
             f"step (--global-batch-size / (--micro-batch-size x data-parallel size) = {micro}) to be a "
             f"multiple of --pipeline-model-parallel-size ({pp})")
    if par.grad_reduce_in_bf16 and not o.bf16:
        fail("--grad-reduce-in-bf16 needs --bf16 (with fp32 or fp16 weights the gradients are reduced in fp32)")
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
    # ranges torch and megatron-core would otherwise meet mid-build (a traceback that names no flag)
    # or not at all (a NaN at the first step)
    for name, value in (("--adam-beta1", o.adam_beta1), ("--adam-beta2", o.adam_beta2)):
        if not 0.0 <= value < 1.0:
            fail(f"{name} must be in [0, 1) (got {value})")
    for name, value in (("--adam-eps", o.adam_eps), ("--norm-epsilon", m.norm_epsilon),
                        ("--rotary-base", m.rotary_base)):
        if not math.isfinite(value) or value <= 0:
            fail(f"{name} must be a finite number > 0 (got {value})")
    for name, value in (("--lr-decay-iters", o.lr_decay_iters),
                        ("--make-vocab-size-divisible-by", m.make_vocab_size_divisible_by),
                        ("--ffn-hidden-size", m.ffn_hidden_size), ("--kv-channels", m.kv_channels),
                        ("--moe-ffn-hidden-size", m.moe_ffn_hidden_size)):
        if value is not None and value < 1:
            fail(f"{name} must be >= 1 (got {value})")
    if cfg.data.num_workers < 0:
        fail(f"--num-workers must be >= 0 (got {cfg.data.num_workers}; 0 loads in the training process)")
    if o.min_lr > o.lr:
        fail(f"--min-lr ({o.min_lr}) must not exceed --lr ({o.lr})")
    if not math.isfinite(o.lr_warmup_init) or not 0 <= o.lr_warmup_init <= o.lr:
        fail(f"--lr-warmup-init must be in [0, --lr] (got {o.lr_warmup_init})")
    _check_weight_decay_increment(o)
    if cfg.parallel.ddp_bucket_size is not None:
        if cfg.parallel.ddp_bucket_size < 1:
            fail(f"--ddp-bucket-size must be >= 1 parameter (got {cfg.parallel.ddp_bucket_size})")
        if not cfg.parallel.overlap_grad_reduce:
            fail("--ddp-bucket-size needs --overlap-grad-reduce (without it megatron reduces all gradients in one "
                 "bucket after the backward pass, and the size would be ignored)")
    if o.fp16 and o.bf16:
        fail("give one of --fp16 and --bf16")
    if o.loss_scale is not None and not o.fp16:
        fail("--loss-scale is for --fp16 (bf16 and fp32 need no loss scaling)")
    if o.fp16:
        for name, value in (("--loss-scale", o.loss_scale), ("--initial-loss-scale", o.initial_loss_scale),
                            ("--min-loss-scale", o.min_loss_scale)):
            if value is not None and (not math.isfinite(value) or value <= 0):
                fail(f"{name} must be a finite number > 0 (got {value})")
        if o.min_loss_scale > o.initial_loss_scale:
            fail(f"--min-loss-scale ({o.min_loss_scale}) must not exceed --initial-loss-scale ({o.initial_loss_scale})")
        for name, value in (("--loss-scale-window", o.loss_scale_window), ("--hysteresis", o.hysteresis)):
            if value < 1:
                fail(f"{name} must be >= 1 (got {value})")
        if cfg.parallel.expert_model_parallel_size > 1:
            # megatron-core 0.16.1 chains a dense and an expert optimizer here, each with its own loss
            # scaler: an overflow in one part alone desynchronises them, and the loss is scaled by the
            # first while the experts' gradients are unscaled by the second
            fail("--fp16 with --expert-model-parallel-size > 1 is not supported (two loss scalers that drift "
                 "apart); use --bf16, or --expert-model-parallel-size 1")
    if o.decoupled_min_lr is not None and o.decoupled_lr is None:
        fail("--decoupled-min-lr needs --decoupled-lr (the embedding/output layer's peak LR)")
    if o.decoupled_lr is not None:
        for name, value in (("--decoupled-lr", o.decoupled_lr), ("--decoupled-min-lr", o.decoupled_min_lr)):
            if value is not None and (not math.isfinite(value) or value < 0):
                fail(f"{name} must be a finite number >= 0 (got {value})")
        low = o.min_lr if o.decoupled_min_lr is None else o.decoupled_min_lr
        if low > o.decoupled_lr:
            fail(f"{'--decoupled-min-lr' if o.decoupled_min_lr is not None else '--min-lr'} ({low}) must not "
                 f"exceed --decoupled-lr ({o.decoupled_lr}); give --decoupled-min-lr")
    if o.lr_warmup_iters < 0 or o.lr_warmup_iters > o.train_iters:
        fail(f"--lr-warmup-iters ({o.lr_warmup_iters}) must be in [0, --train-iters]")
    if o.lr_warmup_fraction is not None:
        if o.lr_warmup_iters or o.lr_warmup_samples:
            fail("give one of --lr-warmup-fraction and --lr-warmup-iters / --lr-warmup-samples (as in Megatron-LM)")
        if not 0.0 <= o.lr_warmup_fraction < 1.0:
            fail(f"--lr-warmup-fraction must be in [0, 1) (got {o.lr_warmup_fraction})")
    if o.lr_decay_style != "constant" and (o.lr_decay_iters or o.lr_decay_samples):
        # megatron's scheduler asserts it; a decay that ended inside the warmup would drop the LR
        # from its peak to --min-lr in one step
        from .builders import _decay_steps, schedule_steps

        if schedule_steps(o)["warmup"] >= _decay_steps(o):
            unit = "samples" if o.lr_decay_samples else "iters"
            warm = o.lr_warmup_samples if unit == "samples" else o.lr_warmup_iters
            decay = o.lr_decay_samples if unit == "samples" else o.lr_decay_iters
            fail(f"--lr-warmup-{unit} ({warm}) must be < --lr-decay-{unit} ({decay}): the decay counts from the "
                 "start of the run, warmup included (as in Megatron-LM)")
    if cfg.logging.eval_iters < 0:
        fail(f"--eval-iters must be >= 0 (got {cfg.logging.eval_iters}; 0 = no validation)")
    if o.lr_decay_style == "WSD":  # default: the last tenth of the run (in the unit the run is given in)
        if o.train_samples is not None and o.lr_wsd_decay_samples is None:
            o.lr_wsd_decay_samples = (max(1, o.train_samples // 10) if o.rampup_batch_size
                                      else max(1, o.train_iters // 10) * o.global_batch_size)
        elif o.train_samples is None and o.lr_wsd_decay_iters is None:
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
              "--tst-superposition-iters 0): this is a plain run (the baseline's data and model)",
              file=sys.stderr)
    d = cfg.data
    per_split = any(x is not None for x in (d.train_data_path, d.valid_data_path, d.test_data_path))
    if d.num_dataset_builder_threads < 1:
        fail(f"--num-dataset-builder-threads must be >= 1 (got {d.num_dataset_builder_threads})")
    if not (math.isfinite(d.mid_level_dataset_surplus) and d.mid_level_dataset_surplus >= 0):
        fail(f"--mid-level-dataset-surplus must be a finite number >= 0 (got {d.mid_level_dataset_surplus})")
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
    if kind in ("SentencePieceTokenizer", "Llama2Tokenizer", "HuggingFaceTokenizer"):
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
    if cfg.data.tokenizer_hf_include_special_tokens and kind != "HuggingFaceTokenizer":
        fail(f"--tokenizer-hf-include-special-tokens applies to --tokenizer-type HuggingFaceTokenizer only, not "
             f"{cfg.data.tokenizer_type}; drop the flag")
    if kind in ("HuggingFaceTokenizer", "GPT2BPETokenizer") and importlib.util.find_spec("tokenizers") is None:
        fail(f"--tokenizer-type {cfg.data.tokenizer_type} needs the `tokenizers` package: pip install 'tst-megatron[hf]'")
    for flag, path in (("--save", c.save), ("--load", c.load), ("--metrics-path", cfg.logging.metrics_path),
                       ("--tensorboard-dir", cfg.logging.tensorboard_dir)):
        if path and flag != "--metrics-path" and os.path.exists(path) and not os.path.isdir(path):
            fail(f"{flag} {path}: is a file, not a directory; give a directory")
        if path and flag == "--metrics-path" and os.path.isdir(path):
            fail(f"--metrics-path {path}: is a directory; give a file path (e.g. {os.path.join(path, 'metrics.jsonl')})")
        if path and flag != "--load":  # the metrics file's directory, the others themselves
            _check_writable(flag, path, os.path.dirname(os.path.abspath(path)) if flag == "--metrics-path"
                            else path)
    if c.save_interval is not None and c.save_interval < 1:
        fail(f"--save-interval must be >= 1 (got {c.save_interval})")
    if c.exit_interval is not None and c.exit_interval < 1:
        fail(f"--exit-interval must be >= 1 (got {c.exit_interval})")
    exits = [flag for flag, on in (("--exit-interval", c.exit_interval), ("--exit-duration-in-mins",
                                   c.exit_duration_in_mins), ("--exit-signal-handler", c.exit_signal_handler)) if on]
    if exits and not c.save:
        print(f"warning: {', '.join(exits)} without --save: the run stops there without a checkpoint to resume "
              "from", file=sys.stderr)
    if c.exit_duration_in_mins is not None and not (math.isfinite(c.exit_duration_in_mins)
                                                    and c.exit_duration_in_mins >= 0):
        fail(f"--exit-duration-in-mins must be a finite number >= 0 (got {c.exit_duration_in_mins})")
    if c.save_interval is not None and not c.save:
        fail("--save-interval needs --save DIR")
    if c.finetune and not c.load:
        fail("--finetune needs --load DIR (the checkpoint whose weights the new run starts from)")
    if c.finetune and same_dir(c.load, c.save):
        fail(f"--finetune starts a new run from the weights in --load {c.load}: give it another --save directory "
             "(to continue that fine-tuning run later, --load its --save without --finetune)")
    if c.pretrained_checkpoint is not None:
        if c.finetune:
            fail("give one of --finetune (fine-tune from --load, every start) and --pretrained-checkpoint (fine-tune "
                 "from it on the first start, resume --load after)")
        if not os.path.isdir(c.pretrained_checkpoint):
            fail(f"--pretrained-checkpoint {c.pretrained_checkpoint}: directory does not exist")
        if same_dir(c.pretrained_checkpoint, c.save):
            fail(f"--pretrained-checkpoint {c.pretrained_checkpoint}: give the fine-tuning run another --save "
                 "directory (it would write into the pretrained run's)")
    # --load == --save with no directory yet is the first start of a requeued job: start fresh
    # (or from --pretrained-checkpoint)
    if c.load is not None and not os.path.isdir(c.load) and not same_dir(c.load, c.save) \
            and c.pretrained_checkpoint is None:
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
    if lgc.manual_gc_interval < 0:
        fail(f"--manual-gc-interval must be >= 0 (got {lgc.manual_gc_interval}; 0 = no collection between steps)")
    if not lgc.manual_gc and (lgc.manual_gc_interval or not lgc.manual_gc_eval):
        fail(f"{'--manual-gc-interval' if lgc.manual_gc_interval else '--no-manual-gc-eval'} is a setting of "
             "--manual-gc: give --manual-gc too")
    if lgc.log_timers_to_tensorboard and not (lgc.tensorboard_dir and lgc.timing_log_level > 0):
        fail("--log-timers-to-tensorboard writes the step timers of --timing-log-level 1 or 2 into "
             "--tensorboard-dir: give both" + (f" (now --timing-log-level {lgc.timing_log_level})"
                                               if lgc.tensorboard_dir else ""))
    # optional logging back-ends: refused here, before a metrics file or checkpoint directory exists
    for flag, value, module, extra in (("--wandb-project", cfg.logging.wandb_project, "wandb", "wandb"),
                                       ("--tensorboard-dir", cfg.logging.tensorboard_dir, "tensorboard",
                                        "tensorboard")):
        if value and importlib.util.find_spec(module) is None:
            fail(f"{flag} needs the `{module}` package: pip install 'tst-megatron[{extra}]' (or drop {flag})")
