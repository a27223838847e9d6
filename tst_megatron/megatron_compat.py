"""Megatron-LM flags that this trainer accepts because what they ask for is already so here.

Megatron-LM's own example scripts (GPT-3, Llama, Mixtral, Qwen) carry kernel-fusion switches and
legacy toggles. Refusing them would make every copied script fail on its first line; ignoring
any flag whose request we do not meet would be a silent wrong run. So each flag below is accepted
only because its request holds on this stack -- `tests/test_megatron_compat.py` checks the claim
against the objects the trainer builds -- and each value flag is checked: a value that asks
for something else (a partial rotary embedding, context parallelism, NCCL without a GPU) is
refused with what to do. Flags not listed here stay unknown and are refused.
"""
from __future__ import annotations

import argparse

# flag -> why it holds here (shown by --help)
SATISFIED = {
    "--use-mcore-models": "the models are megatron-core's GPTModel (there is no legacy model)",
    "--no-masked-softmax-fusion": "the masked-softmax fusion is off (megatron-core's default)",
    "--no-bias-gelu-fusion": "the bias-activation fusion is off",
    "--no-bias-swiglu-fusion": "the bias-activation fusion is off",
    "--no-bias-dropout-fusion": "the bias-dropout fusion is off (megatron-core's default)",
    "--no-rope-fusion": "the fused RoPE kernel is off (megatron-core's default)",
    "--no-gradient-accumulation-fusion": "gradient-accumulation fusion is off (megatron-core's default)",
    "--no-persist-layer-norm": "the persistent layer-norm kernel is off (megatron-core's default)",
    "--accumulate-allreduce-grads-in-fp32": "gradients are accumulated and reduced in fp32 (unless "
                                            "--grad-reduce-in-bf16, which it then contradicts)",
    "--no-async-tensor-model-parallel-allreduce": "deprecated, and ignored by Megatron-LM itself",
    "--log-throughput": "tokens/s and TFLOP/s per device are always logged",
    "--no-create-attention-mask-in-dataloader": "no attention mask is built (the kernels are causal)",
    "--use-dist-ckpt": "torch_dist (dist_checkpointing) is the checkpoint format",
    "--log-validation-ppl-to-tensorboard": "validation perplexity (eval/val_lm_ppl) is always a TensorBoard scalar",
    "--log-world-size-to-tensorboard": "the world size (train/world_size) is always a TensorBoard scalar",
    "--check-for-nan-in-loss-and-grad": "the non-finite guard is always on: a NaN/Inf loss or gradient norm stops "
                                        "the run without saving (or skips the step, --skip-nonfinite-steps)",
    "--log-loss-scale-to-tensorboard": "the loss scale (train/loss_scale) is a TensorBoard scalar whenever there "
                                       "is one (--fp16)",
}


def add_compat_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "Megatron-LM compatibility", "accepted so that Megatron-LM scripts run unchanged; each holds here as said")
    for flag, why in SATISFIED.items():
        g.add_argument(flag, action="store_true", help=f"accepted: {why}")
    g.add_argument("--use-flash-attn", action="store_true",
                   help="accepted where it holds: on GPU with Transformer Engine (its attention picks flash "
                        "kernels), and on CPU (SDPA, no flash kernel exists); refused on GPU without it")
    g.add_argument("--recompute-activations", action="store_true",
                   help="Megatron-LM's short form of --recompute-granularity selective")
    g.add_argument("--no-position-embedding", action="store_true",
                   help="accepted with --position-embedding-type rope (no position table); refused otherwise")
    g.add_argument("--rotary-percent", type=float, default=1.0,
                   help="only 1.0 (RoPE on the whole head dimension) is implemented")
    g.add_argument("--context-parallel-size", type=int, default=1, help="only 1 (no context parallelism)")
    g.add_argument("--distributed-backend", choices=["nccl", "gloo"], default=None,
                   help="default: nccl with CUDA, gloo on CPU; a value that does not match the machine is refused")
    g.add_argument("--attention-backend", choices=["auto", "flash", "fused", "unfused", "local"], default="auto",
                   help="only auto: SDPA / Transformer Engine pick the attention kernel")
    g.add_argument("--dataloader-type", choices=["single", "cyclic", "external"], default="single",
                   help="only single: megatron's pretraining sampler order, resumable by consumed samples")
    g.add_argument("--transformer-impl", choices=["local", "transformer_engine"], default=None,
                   help="layer implementation; default: transformer_engine when it is installed and CUDA is "
                        "present, else local")


def check_compat_flags(ns: argparse.Namespace) -> None:
    """Refuse the values that ask for something this trainer does not do (SystemExit, named flag),
    and fold --recompute-activations into --recompute-granularity."""
    def fail(message: str) -> None:
        raise SystemExit(f"error: {message}")

    if ns.accumulate_allreduce_grads_in_fp32 and ns.grad_reduce_in_bf16:
        fail("--accumulate-allreduce-grads-in-fp32 contradicts --grad-reduce-in-bf16; give one of them")
    if ns.recompute_activations:
        if ns.recompute_granularity == "full":
            fail("--recompute-activations (selective recomputation) conflicts with --recompute-granularity full; "
                 "give one of them")
        ns.recompute_granularity = "selective"
    if ns.no_position_embedding and ns.position_embedding_type != "rope":
        fail(f"--no-position-embedding with --position-embedding-type {ns.position_embedding_type} would train "
             "without any position information; use --position-embedding-type rope (then the flag holds)")
    if ns.rotary_percent != 1.0:
        fail(f"--rotary-percent {ns.rotary_percent}: partial rotary embeddings are not implemented (1.0 only)")
    if ns.context_parallel_size != 1:
        fail(f"--context-parallel-size {ns.context_parallel_size}: context parallelism is not implemented; "
             "use 1 (split long sequences with --tensor-model-parallel-size and --sequence-parallel)")
    if ns.attention_backend != "auto":
        fail(f"--attention-backend {ns.attention_backend}: choosing the attention kernel is not implemented; use auto "
             "(the default: SDPA on CPU, Transformer Engine's choice on GPU)")
    if ns.dataloader_type != "single":
        fail(f"--dataloader-type {ns.dataloader_type}: only single is implemented (megatron's pretraining order, "
             "which the TST phases and exact resumes rely on)")
    if ns.distributed_backend is None and ns.transformer_impl != "transformer_engine" and not ns.use_flash_attn:
        return
    import torch

    from .specs import transformer_engine_available

    cuda_available = torch.cuda.is_available()
    want = "nccl" if cuda_available else "gloo"
    if ns.distributed_backend is not None and ns.distributed_backend != want:
        fail(f"--distributed-backend {ns.distributed_backend}: this machine "
             f"{'has CUDA, which uses nccl' if cuda_available else 'has no CUDA device; gloo is the backend on CPU'}"
             "; drop the flag (the backend follows the device)")
    if ns.use_flash_attn and cuda_available and (ns.transformer_impl == "local" or not transformer_engine_available()):
        fail("--use-flash-attn: without Transformer Engine the GPU attention is megatron-core's unfused "
             "DotProductAttention; install it (pip install 'tst-megatron[gpu]') and drop --transformer-impl local, "
             "or drop --use-flash-attn")
    if ns.transformer_impl == "transformer_engine" and not transformer_engine_available():
        fail("--transformer-impl transformer_engine: Transformer Engine "
             + ("is not installed (pip install 'tst-megatron[gpu]')" if cuda_available else "needs a CUDA device")
             + "; use --transformer-impl local, or leave the flag out (local is chosen without Transformer Engine)")
