"""Build the pieces of a run from explicit config objects, with megatron-core's own machinery.

Each function takes the parsed `RunConfig` parts it needs and returns a megatron-core object:
TransformerConfig, model chunks (TSTGPTModel inside megatron DDP), the megatron optimizer and
`OptimizerParamScheduler`. Nothing here re-implements what megatron-core provides.
"""
from __future__ import annotations

import math
from typing import List, Tuple

import torch
import torch.nn.functional as F

from .arguments import ModelArgs, OptimArgs, ParallelArgs, RunConfig
from .config import TSTConfig


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron's rule: pad the vocabulary to a multiple of divisible_by x TP."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


def transformer_config(m: ModelArgs, par: ParallelArgs, o: OptimArgs, use_cpu_init: bool):
    """megatron-core TransformerConfig from the model / parallel / precision flags."""
    from megatron.core.activations import squared_relu
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = o.params_dtype
    vpp = None
    if par.num_layers_per_virtual_pipeline_stage:
        vpp = (m.num_layers // par.pipeline_model_parallel_size) // par.num_layers_per_virtual_pipeline_stage
        vpp = vpp if vpp > 1 else None
    moe = {}
    if m.num_experts:
        moe = dict(
            num_moe_experts=m.num_experts,
            moe_router_topk=m.moe_router_topk,
            moe_ffn_hidden_size=m.moe_ffn_hidden_size or m.resolved_ffn_hidden_size(),
            moe_aux_loss_coeff=m.moe_aux_loss_coeff,
            moe_router_load_balancing_type=m.moe_router_load_balancing_type,
            moe_token_dispatcher_type=m.moe_token_dispatcher_type,
            moe_shared_expert_intermediate_size=m.moe_shared_expert_intermediate_size,
            moe_layer_freq=m.moe_layer_freq,
            moe_router_pre_softmax=m.moe_router_pre_softmax,
            moe_z_loss_coeff=m.moe_z_loss_coeff,
            moe_router_dtype=m.moe_router_dtype,
            moe_router_score_function=m.moe_router_score_function,
            moe_router_enable_expert_bias=m.moe_router_enable_expert_bias,
            moe_router_bias_update_rate=1e-3 if m.moe_router_bias_update_rate is None else m.moe_router_bias_update_rate,
            moe_router_topk_scaling_factor=m.moe_router_topk_scaling_factor,
            moe_router_num_groups=m.moe_router_num_groups,
            moe_router_group_topk=m.moe_router_group_topk,
            moe_expert_capacity_factor=m.moe_expert_capacity_factor,
            moe_pad_expert_input_to_capacity=m.moe_pad_expert_input_to_capacity,
            moe_token_drop_policy=m.moe_token_drop_policy or "probs",
            moe_grouped_gemm=False,
        )
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.resolved_ffn_hidden_size(),
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups if m.group_query_attention else None,
        kv_channels=m.kv_channels,
        normalization=m.normalization,
        layernorm_epsilon=m.norm_epsilon,
        layernorm_zero_centered_gamma=m.apply_layernorm_1p,
        gated_linear_unit=m.swiglu,
        activation_func=F.silu if m.swiglu else squared_relu if m.squared_relu else F.gelu,
        bias_activation_fusion=False,
        qk_layernorm=m.qk_layernorm,
        add_bias_linear=not m.disable_bias_linear,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=vpp,
        expert_model_parallel_size=par.expert_model_parallel_size,
        sequence_parallel=par.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=o.bf16,
        fp16=o.fp16,
        calculate_per_token_loss=o.calculate_per_token_loss,  # the schedule, DDP and MoE aux losses read it
        use_cpu_initialization=use_cpu_init,
        # as Megatron-LM: a pipeline stage's output is freed once sent (its activation memory)
        deallocate_pipeline_outputs=True,
        # megatron-core 0.16.1's default "full" warns at every config that it is deprecated; an
        # empty list is the same whole-layer scope (only read when CUDA graphs are on)
        cuda_graph_scope=[],
        # The interleaved schedule at PP=2 sends an activation and a gradient of the same shape to the
        # one other stage in one batched p2p call, which matches them in posting order and swaps them
        # (Megatron-LM refuses this layout without --overlap-p2p-comm); megatron-core's unbatched path
        # orders both directions consistently, so use it there.
        batch_p2p_comm=not (vpp is not None and par.pipeline_model_parallel_size == 2),
        recompute_granularity=m.recompute_granularity,
        recompute_method=m.recompute_method,
        recompute_num_layers=m.recompute_num_layers,
        **moe,
    )


def build_model_chunks(cfg: RunConfig, tconfig, vocab_size: int) -> List[torch.nn.Module]:
    """TSTGPTModel chunk(s) for this pipeline rank (several with virtual pipelining)."""
    from megatron.core import parallel_state as ps
    from megatron.core.fusions.fused_layer_norm import FusedLayerNorm

    from .model import TSTGPTModel
    from .specs import gpt_block_spec

    m = cfg.model
    vpp = tconfig.virtual_pipeline_model_parallel_size or 1
    bag_weights = cfg.tst.bag_weights() if cfg.tst.enabled else None
    chunks = []
    for v in range(vpp):
        vp_stage = v if vpp > 1 else None
        pre = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        post = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        model = TSTGPTModel(
            config=tconfig,
            transformer_layer_spec=gpt_block_spec(
                tconfig, use_transformer_engine=None if m.transformer_impl is None
                else m.transformer_impl == "transformer_engine", vp_stage=vp_stage),
            vocab_size=vocab_size,
            max_sequence_length=m.max_position_embeddings or m.seq_length,
            pre_process=pre,
            post_process=post,
            share_embeddings_and_output_weights=not m.untie_embeddings_and_output_weights,
            position_embedding_type=m.position_embedding_type,
            rotary_base=m.rotary_base,
            vp_stage=vp_stage,
            bag_weights=bag_weights,
        )
        table = getattr(getattr(model, "embedding", None), "position_embeddings", None)
        if table is not None:
            # megatron-core builds the learned position table as a plain torch Embedding (fp32 whatever
            # params_dtype); Megatron-LM casts it with its Float16Module. Its sum with bf16/fp16 word
            # embeddings would otherwise reach the half-precision layers as fp32.
            table.to(tconfig.params_dtype)
        for module in model.modules():
            if isinstance(module, FusedLayerNorm):
                # apex's LayerNorm (megatron's local spec on a machine with apex) makes fp32 weights
                # whatever params_dtype, and apex's kernel wants the input's dtype: cast, as
                # Megatron-LM's Float16Module does
                module.to(tconfig.params_dtype)
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    return chunks


def ddp_config(par: ParallelArgs):
    """megatron-core's DDP settings: gradients accumulated and reduced in fp32 (in bf16 under
    --grad-reduce-in-bf16, which needs --bf16)."""
    from megatron.core.distributed import DistributedDataParallelConfig

    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=not par.grad_reduce_in_bf16,
        overlap_grad_reduce=par.overlap_grad_reduce,
        overlap_param_gather=par.overlap_param_gather,
        use_distributed_optimizer=par.use_distributed_optimizer,
        bucket_size=par.ddp_bucket_size,
    )


def wrap_ddp(chunks, tconfig, par: ParallelArgs):
    """megatron DDP around each chunk (grad buffers, bucketed reduce, distributed optimizer)."""
    from megatron.core.distributed import DistributedDataParallel

    config = ddp_config(par)
    wrapped = []
    for i, chunk in enumerate(chunks):
        wrapped.append(DistributedDataParallel(
            config=tconfig, ddp_config=config, module=chunk,
            # Only the first chunk keeps its buckets' grads in step with megatron's own default.
            disable_bucketing=i > 0,
        ))
    return wrapped


def build_optimizer(chunks, o: OptimArgs, par: ParallelArgs, timers=None, barrier_with_L1_time: bool = True):
    """megatron-core's optimizer (Adam, fp32 main weights, optionally distributed); `timers`
    (--timing-log-level) times its steps."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer, get_standard_config_overrides

    config = OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        decoupled_lr=o.decoupled_lr,  # megatron's own param group for is_embedding_or_output_parameter
        decoupled_min_lr=o.decoupled_min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        log_num_zeros_in_grad=o.log_num_zeros_in_grad,
        bf16=o.bf16,
        fp16=o.fp16,
        loss_scale=o.loss_scale,
        initial_loss_scale=o.initial_loss_scale,
        min_loss_scale=o.min_loss_scale,
        loss_scale_window=o.loss_scale_window,
        hysteresis=o.hysteresis,
        params_dtype=o.params_dtype,
        use_distributed_optimizer=par.use_distributed_optimizer,
        overlap_param_gather=par.overlap_param_gather,  # megatron reads the DDP value through both
        timers=timers,
        barrier_with_L1_time=barrier_with_L1_time,
    )
    overrides = get_standard_config_overrides(config)  # what megatron uses by default...
    for override in overrides.values():
        if "max_lr" in override:
            # ...except that 0.16.1 leaves the --decoupled-lr group's is_decoupled_lr False, so the
            # embedding/output group and the default one share megatron's param-group key and a
            # checkpoint's groups load into the wrong ones: mark it, as the key expects
            override["is_decoupled_lr"] = True
    return get_megatron_optimizer(config, chunks, config_overrides=overrides)


def schedule_steps(o: OptimArgs) -> dict:
    """The LR schedule in optimizer steps, from the iteration or the sample flags (resolved by
    `validate`): what OptimizerParamScheduler gets, and what a resume must keep."""
    decay = _decay_steps(o)
    warmup = o.lr_warmup_iters
    wsd_decay = o.lr_wsd_decay_iters
    if o.train_samples is not None:
        # Megatron-LM counts this schedule in samples, a global batch per step: in steps that is
        # samples / batch, a fractional count where the batch does not divide it (as in Megatron).
        # Under a batch-size ramp the steps differ in size: the schedule stays in samples and
        # every step advances it by its own batch (`scheduler_increment`).
        per_step = samples_per_schedule_step(o)
        warmup = (o.lr_warmup_samples or 0) / per_step
        if o.lr_wsd_decay_samples is not None:
            wsd_decay = o.lr_wsd_decay_samples / per_step
    if o.lr_warmup_fraction is not None:  # Megatron-LM's: a fraction of the decay steps (may be fractional)
        warmup = o.lr_warmup_fraction * decay
    return {"warmup": warmup, "decay": max(decay, math.floor(warmup) + 1),
            "wsd_decay": wsd_decay if o.lr_decay_style == "WSD" else None}


def samples_per_schedule_step(o: OptimArgs) -> int:
    """What one unit of the LR schedule is, in samples, for a sample-based run: a global batch
    (the schedule counts optimizer steps), or 1 under --rampup-batch-size (it counts samples)."""
    return 1 if o.rampup_batch_size else o.global_batch_size


def scheduler_increment(o: OptimArgs, batch: int) -> int:
    """How far one optimizer step of `batch` samples advances the LR schedule."""
    return batch if o.rampup_batch_size else 1


def schedule_position(o: OptimArgs, iteration: int, consumed_samples: int) -> int:
    """Where the LR schedule stands after `iteration` steps that consumed `consumed_samples`."""
    return consumed_samples if o.rampup_batch_size else iteration


def _decay_steps(o: OptimArgs) -> float:
    """The decay length as given (before the warmup floor schedule_steps applies)."""
    if o.train_samples is not None:
        return (o.lr_decay_samples or o.train_samples) / samples_per_schedule_step(o)
    return o.lr_decay_iters or o.train_iters


def _train_steps(o: OptimArgs) -> float:
    """The whole run in LR-schedule units (steps; samples under a ramp)."""
    if o.train_samples is not None:
        return o.train_samples / samples_per_schedule_step(o)
    return o.train_iters


def build_scheduler(optimizer, o: OptimArgs):
    """One LR schedule over all iterations, both TST phases (the paper: no re-warmup)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    steps = schedule_steps(o)
    constant_wd = o.weight_decay_incr_style == "constant"
    return OptimizerParamScheduler(
        optimizer,
        init_lr=o.lr_warmup_init,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=steps["warmup"],
        lr_decay_steps=steps["decay"],
        lr_decay_style=o.lr_decay_style,
        start_wd=o.weight_decay if constant_wd else o.start_weight_decay,
        end_wd=o.weight_decay if constant_wd else o.end_weight_decay,
        # constant: any length (megatron checks it on load: the decay steps, as checkpoints have it);
        # an increment runs over the whole training, as in Megatron-LM
        wd_incr_steps=max(math.ceil(_decay_steps(o)), 1) if constant_wd else _train_steps(o),
        wd_incr_style=o.weight_decay_incr_style,
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=False,
        wsd_decay_steps=steps["wsd_decay"],  # read (and required) only by the WSD style
        lr_wsd_decay_style=o.lr_wsd_decay_style,
    )


def count_parameters(m: ModelArgs, vocab_size: int) -> Tuple[int, int]:
    """(total, active-per-token) parameters of a config, computed without building it."""
    h = m.hidden_size
    heads = m.num_attention_heads
    kv = m.kv_channels or h // heads
    groups = m.num_query_groups if m.group_query_attention else heads
    bias = 0 if m.disable_bias_linear else 1
    attn = h * kv * (heads + 2 * groups) + bias * kv * (heads + 2 * groups) + heads * kv * h + bias * h
    norms = 2 * h * (2 if m.normalization == "LayerNorm" else 1)
    if m.qk_layernorm:  # q and k norms over the head dim (LayerNorm: weight and bias)
        norms += 2 * kv * (2 if m.normalization == "LayerNorm" else 1)

    def mlp(ffn: int) -> int:
        up = h * ffn * (2 if m.swiglu else 1)
        return up + ffn * h + bias * (ffn * (2 if m.swiglu else 1) + h)

    dense_mlp = mlp(m.resolved_ffn_hidden_size())
    total = active = 0
    for is_moe in m.moe_layer_pattern():
        total += attn + norms
        active += attn + norms
        if is_moe:
            expert = mlp(m.moe_ffn_hidden_size or m.resolved_ffn_hidden_size())
            shared = mlp(m.moe_shared_expert_intermediate_size) if m.moe_shared_expert_intermediate_size else 0
            router = (h + (0 if m.disable_bias_linear else 1)) * m.num_experts  # megatron's router has a bias too
            total += m.num_experts * expert + shared + router
            active += m.moe_router_topk * expert + shared + router
        else:
            total += dense_mlp
            active += dense_mlp
    emb = vocab_size * h
    out = 0 if not m.untie_embeddings_and_output_weights else vocab_size * h
    pos = (m.max_position_embeddings or m.seq_length) * h if m.position_embedding_type == "learned_absolute" else 0
    final_norm = h * (2 if m.normalization == "LayerNorm" else 1)
    total += emb + out + pos + final_norm
    active += emb + out + pos + final_norm
    return total, active


def flops_per_position(m: ModelArgs, vocab_size: int) -> float:
    """Training FLOPs per model position (forward + backward = 3x forward).

    6 x active parameters less the lookup tables (token and learned position embeddings are
    gathers; the LM head counts: it is a matmul; norm weights and biases count too, as in the
    usual 6N, ~1% at small widths) plus the
    attention score/value matmuls, 6 x 2 x layers x L x (heads x head_dim) / 2 (causal: half
    the score matrix is masked). The bag embedding's
    mean and the s-target loss are negligible, so a TST step counts the same FLOPs as a baseline
    step -- which is the point of the method.
    """
    _, active = count_parameters(m, vocab_size)
    lookup = vocab_size * m.hidden_size  # the input embedding is a gather, not a matmul
    if m.position_embedding_type == "learned_absolute":  # so is the position table
        lookup += (m.max_position_embeddings or m.seq_length) * m.hidden_size
    head = vocab_size * m.hidden_size
    matmul_params = active - lookup + (head if not m.untie_embeddings_and_output_weights else 0)
    kv = m.kv_channels or m.hidden_size // m.num_attention_heads
    attention = 12 * m.num_layers * m.seq_length * m.num_attention_heads * kv / 2  # causal half
    return 6.0 * matmul_params + attention


def tst_data_tokens_per_sample(tst: TSTConfig, seq_length: int, phase: str) -> int:
    """Raw data tokens one sample consumes: L*s in superposition (full/input modes), else L."""
    if phase == "superposition" and tst.enabled and tst.mode in ("full", "input"):
        return seq_length * tst.bag_size
    return seq_length
