"""Fused, vocab-parallel multi-hot cross-entropy (MCE): TST's next-bag loss.

For one position with logits z (the full vocabulary is split over the tensor-parallel group) and
the s tokens y_1..y_s of the next bag, with weights w_j and validity v_j (ignore_index -> 0):

    MCE = sum_j w_j v_j (logsumexp(z) - z[y_j]) / sum_j w_j v_j        (0 when nothing is valid)

The paper computed this as a Python loop of s ordinary cross-entropies; here `logsumexp` is
computed once per position (max and sum-exp all-reduced over the TP group) and the s target logits
are gathered from the shard that owns them. Backward is the closed form

    dMCE/dz = softmax(z) * [W > 0] - sum_j (w_j v_j / W) onehot(y_j)

recomputed from the saved logits, so the extra memory does not grow with s: no [..., V] multi-hot
tensor, no s softmaxes. With s = 1 this is exactly megatron's `vocab_parallel_cross_entropy`.

How it is computed (same formula everywhere), in chunks of rows whose fp32 temporaries stay near
CHUNK_BYTES_* (the only full-size buffer is the gradient, in the logits' dtype):
  * no tensor parallelism: the loss is -sum_j coef_j log_softmax(z)[y_j] (coef = w v / W, which
    sums to 1) and the gradient starts from softmax(z) -- each one fused row-wise kernel, where
    max / subtract / exp / sum would be four passes over [..., V];
  * vocabulary split over a TP group: max and sum-exp per position, all-reduced over the group;
    the gradient is exp(z - lse).
On CUDA the whole loss runs as two Triton kernels instead (`tst_megatron.loss_triton`: the
forward reads the logits once and also does the label/weight bookkeeping and checks; the backward
reads them once and writes the gradient), chosen automatically;
`kernel="torch"` (or TST_MCE_KERNEL=torch) keeps the torch loops. bench/bench_mce.py measures time
and memory against one F.cross_entropy and the paper's loop.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist

from tst_megatron import loss_triton

# A label check (a host sync per call on CPU, a device-side assert on accelerators); it catches
# silent garbage from bad data early.
CHECK_LABEL_RANGE = True
# Size of the loss's fp32 row-chunk buffers. CPU: cache-sized. Measured (N=2048, s=4, 1 thread,
# time relative to one F.cross_entropy forward+backward): fp32 0.44-0.48x for 1-32 MiB chunks vs
# 0.70-0.74x in one piece; bf16 0.65-0.67x at 2 MiB, 0.90-1.04x at 32 MiB, 2.6x in one piece.
# CUDA uses the Triton kernels unless kernel="torch" is forced (then these loops ran at 1.3-4.2x one
# CE on an H200, docs/results.md); chunks are large there, since every chunk costs kernel launches.
CHUNK_BYTES_CPU = 2 << 20
CHUNK_BYTES_CUDA = 1 << 30
KERNELS = ("auto", "torch", "triton")


def _pick_kernel(kernel: str, device: torch.device) -> str:
    """`auto`: Triton on CUDA when it is installed, else the torch loops. `triton` off CUDA needs
    Triton's interpreter (TRITON_INTERPRET=1), which is what the CPU tests use."""
    kernel = kernel or os.environ.get("TST_MCE_KERNEL", "auto")
    if kernel not in KERNELS:
        raise ValueError(f"multi_hot_cross_entropy: kernel must be one of {KERNELS}, got {kernel!r} "
                         "(argument or TST_MCE_KERNEL)")
    if kernel == "auto":
        return "triton" if device.type == "cuda" and loss_triton.available() else "torch"
    if kernel == "triton":
        if not loss_triton.available():
            raise ValueError("multi_hot_cross_entropy: kernel='triton' but triton is not installed "
                             "(pip install triton, or use kernel='torch')")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("multi_hot_cross_entropy: kernel='triton' on a non-CUDA tensor needs "
                             "TRITON_INTERPRET=1 set before triton is imported (or kernel='torch')")
    return kernel


def _tp_group_and_rank(group):
    if group is None:
        try:
            from megatron.core import parallel_state

            if parallel_state.model_parallel_is_initialized():
                group = parallel_state.get_tensor_model_parallel_group()
        except (ImportError, AssertionError):
            group = None
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return None, 0, 1
    return group, dist.get_rank(group), dist.get_world_size(group)


def _as_weights(weights, s: int, device, check_on_device: bool = True) -> torch.Tensor:
    """fp32 [s] slot weights on `device`, validated (finite, >= 0, one per bag slot).

    A Python sequence (what TSTGPTModel passes) is checked on the host and its device copy cached:
    on CUDA a copy from a Python list is a blocking host-to-device transfer, i.e. a stream sync
    every step. A tensor on an accelerator is checked by a device-side assert, or not here at all
    when the caller's kernel checks it (check_on_device=False: the Triton path)."""
    if weights is None or not torch.is_tensor(weights):
        values = (1.0 / s,) * s if weights is None else tuple(
            float(x) for x in (weights.reshape(-1).tolist() if hasattr(weights, "reshape") else weights))
        _check_weight_count(len(values), s)
        if not all(math.isfinite(x) and x >= 0 for x in values) or not sum(values) > 0:
            raise ValueError("multi_hot_cross_entropy: weights must be finite and >= 0, not all 0")
        return _device_weights(values, torch.device(device))
    # contiguous: the Triton kernels read weight j at base + j (a strided view would be misread)
    w = weights.to(dtype=torch.float32, device=device).reshape(-1).contiguous()
    _check_weight_count(w.numel(), s)
    if w.device.type != "cpu":  # no host sync per step on an accelerator
        if check_on_device:
            torch._assert_async(torch.isfinite(w).all() & (w >= 0).all() & (w.sum() > 0),
                                "multi_hot_cross_entropy: weights must be finite and >= 0, not all 0")
        else:  # the kernel checks each weight, not their sum
            torch._assert_async(w.sum() > 0, "multi_hot_cross_entropy: weights must not be all 0")
    elif not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not bool(w.sum() > 0):
        raise ValueError("multi_hot_cross_entropy: weights must be finite and >= 0, not all 0")
    return w


def _check_weight_count(count: int, s: int) -> None:
    if count != s:
        raise ValueError(f"multi_hot_cross_entropy: weights has {count} entries but labels carry "
                         f"s = {s} targets per position (labels [..., s]); pass one weight per bag slot "
                         "(TSTConfig.bag_weights())")


@functools.lru_cache(maxsize=64)
def _device_weights(values: tuple, device: torch.device) -> torch.Tensor:
    """One device copy per distinct weight vector (never written to: the loss only reads it)."""
    return torch.tensor(values, dtype=torch.float32, device=device)


def _row_chunks(rows: int, vocab: int, device) -> list:
    """Row ranges whose fp32 [rows, V] temporaries stay near CHUNK_BYTES (one range if small)."""
    budget = CHUNK_BYTES_CUDA if device.type == "cuda" else CHUNK_BYTES_CPU
    step = max(1, budget // max(1, 4 * vocab))
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


class _Scratch:
    """Reusable fp32 chunk buffers: one allocation per call instead of one per chunk (on CPU a
    fresh allocation of a few MiB usually comes back as fresh pages, and page faults then cost
    more than the math)."""

    def __init__(self, z: torch.Tensor, chunks: list):
        self.z = z
        self.rows = max((b - a for a, b in chunks), default=0)
        self.bufs = {}

    def buffer(self, name: str, n: int) -> torch.Tensor:
        if name not in self.bufs:
            self.bufs[name] = torch.empty((self.rows, self.z.shape[-1]), dtype=torch.float32, device=self.z.device)
        return self.bufs[name][:n]

    def fp32_rows(self, a: int, b: int) -> torch.Tensor:
        """z[a:b] in fp32: the rows themselves for fp32 logits, else converted into a buffer."""
        if self.z.dtype == torch.float32:
            return self.z[a:b]
        return self.buffer("convert", b - a).copy_(self.z[a:b])


class _MultiHotCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, weights, ignore_index, group, rank, world, inplace_backward, kernel):
        ctx.inplace_backward = inplace_backward
        ctx.kernel = kernel
        ctx.ignore_index = ignore_index
        vocab_local = logits.shape[-1]
        ctx.start = start = rank * vocab_local
        z = logits.reshape(-1, vocab_local)  # a view for contiguous logits
        y = labels.reshape(-1, labels.shape[-1])
        if kernel == "triton":
            y = y.contiguous()
            loss, lse = _triton_forward(z, y, weights, ignore_index, group, start, vocab_local * world)
            ctx.save_for_backward(logits, y, weights, lse)  # the input itself: no copy
            return loss.reshape(labels.shape[:-1])

        # Target slots owned by this shard (all of them without TP).
        valid = y != ignore_index
        local = y - start
        in_shard = valid & (local >= 0) & (local < vocab_local)
        idx = torch.where(in_shard, local, torch.zeros_like(local))

        wv = weights * valid  # [rows, s]
        total = wv.sum(dim=-1)  # W per position
        coef = wv / total.clamp_min(1e-30).unsqueeze(-1)  # w_j v_j / W
        zero = torch.zeros((), dtype=torch.float32, device=z.device)
        chunks = _row_chunks(*z.shape, z.device)
        scratch = _Scratch(z, chunks)

        if group is None:
            # lse - sum_j coef_j z[y_j] = -sum_j coef_j log_softmax(z)[y_j]   (sum_j coef_j = 1):
            # one fused row-wise kernel per chunk of rows; the fp32 temporaries stay chunk-sized.
            target = torch.empty(idx.shape, dtype=torch.float32, device=z.device)
            for a, b in chunks:
                log_probs = torch.log_softmax(scratch.fp32_rows(a, b), dim=-1, out=scratch.buffer("out", b - a))
                # where, not `* in_shard`: a -inf logit at the placeholder index would give -inf * 0 = NaN
                target[a:b] = torch.where(in_shard[a:b], torch.gather(log_probs, -1, idx[a:b]), zero)
            loss = -(coef * target).sum(dim=-1)
            lse = None
        else:
            # logsumexp over the whole (sharded) vocabulary, computed once per position: max and
            # sum-exp all-reduced over the group; the fp32 exp temporaries are made in row chunks.
            zmax = z.max(dim=-1).values.float()  # exact in any dtype
            dist.all_reduce(zmax, op=dist.ReduceOp.MAX, group=group)
            sumexp = torch.empty_like(zmax)
            for a, b in chunks:
                shifted = torch.sub(scratch.fp32_rows(a, b), zmax[a:b].unsqueeze(-1), out=scratch.buffer("out", b - a))
                torch.sum(shifted.exp_(), dim=-1, out=sumexp[a:b])
            dist.all_reduce(sumexp, group=group)
            lse = torch.log(sumexp) + zmax

            # Target logits from the owning shard; the others contribute 0 to the all-reduce.
            # where, not `* in_shard`: a -inf logit at the placeholder index would give -inf * 0 = NaN
            target = torch.where(in_shard, torch.gather(z, -1, idx).float(), zero)
            dist.all_reduce(target, group=group)
            loss = lse - (coef * target).sum(dim=-1)
        loss = torch.where(total > 0, loss, torch.zeros_like(loss))

        saved = (logits, idx, coef * in_shard, total > 0)  # the input itself: no copy is kept
        ctx.save_for_backward(*(saved if lse is None else saved + (lse,)))
        return loss.reshape(labels.shape[:-1])

    @staticmethod
    def backward(ctx, grad_loss):
        nones = (None,) * 8
        if ctx.kernel == "triton":
            logits, y, weights, lse = ctx.saved_tensors
            z = logits.reshape(-1, logits.shape[-1])
            if z.stride(-1) != 1:  # rows must be contiguous for the kernel
                z = z.contiguous()
            grad = z if ctx.inplace_backward else torch.empty_like(z)
            g = grad_loss.reshape(-1).float().contiguous()
            loss_triton.mce_backward(z, grad, lse, g, y, weights, ctx.ignore_index, ctx.start)
            return (grad.view(logits.shape),) + nones

        logits, idx, coef_local, any_valid, *rest = ctx.saved_tensors
        z = logits.reshape(-1, logits.shape[-1])
        g = (grad_loss.reshape(-1).float() * any_valid).unsqueeze(-1)
        chunks = _row_chunks(*z.shape, z.device)
        scratch = _Scratch(z, chunks)
        # In place: the gradient overwrites the logits chunk by chunk (each chunk is read into the
        # fp32 scratch first), so the backward allocates nothing of size [N, V].
        inplace = ctx.inplace_backward
        grad = z if inplace else torch.empty(z.shape, dtype=z.dtype, device=z.device)
        fp32 = z.dtype == torch.float32 and not inplace
        for a, b in chunks:
            # fp32 logits: computed in the gradient rows; else in a buffer, then copied / cast.
            part = grad[a:b] if fp32 else scratch.buffer("out", b - a)
            if rest:  # softmax from the saved global logsumexp
                torch.sub(scratch.fp32_rows(a, b), rest[0][a:b].unsqueeze(-1), out=part).exp_()
            else:
                torch.softmax(scratch.fp32_rows(a, b), dim=-1, out=part)
            ga = g[a:b]
            part.mul_(ga)
            part.scatter_add_(-1, idx[a:b], -(coef_local[a:b] * ga))
            if not fp32:
                grad[a:b].copy_(part)
        return (grad.view(logits.shape),) + nones


def _triton_forward(z, y, weights, ignore_index, group, start, vocab_total):
    """(loss, lse), fp32 [N], from the Triton forward kernel; with TP the per-shard row stats are
    combined here: max all-reduced, sums rescaled to it and all-reduced, target terms all-reduced.
    Bad labels / weights found by the kernel become device-side asserts (no host sync)."""
    if z.stride(-1) != 1:
        z = z.contiguous()
    if group is None:
        (loss, lse), ok = loss_triton.mce_forward(z, y, weights, ignore_index)
    else:
        (zmax, sumexp, t, total), ok = loss_triton.mce_forward(z, y, weights, ignore_index, start, vocab_total,
                                                               finish=False)
        gmax = zmax.clone()
        dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=group)
        sumexp = sumexp * torch.exp(torch.where(gmax == float("-inf"), gmax, zmax - gmax))
        dist.all_reduce(sumexp, group=group)
        dist.all_reduce(t, group=group)
        lse = torch.log(sumexp) + gmax
        loss = torch.where(total > 0, lse - t, torch.zeros_like(t))
    if CHECK_LABEL_RANGE:
        torch._assert_async(ok[0], f"multi_hot_cross_entropy: a label id is outside the vocabulary "
                            f"[0, {vocab_total}); check --vocab-size / the tokenizer against the data")
    torch._assert_async(ok[1], "multi_hot_cross_entropy: weights must be finite and >= 0")
    return loss, lse


def multi_hot_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: Optional[Union[torch.Tensor, Sequence[float]]] = None,
    ignore_index: int = -100,
    tp_group=None,
    inplace_backward: bool = False,
    kernel: Optional[str] = None,
) -> torch.Tensor:
    """Per-position fp32 multi-hot cross-entropy.

    Args:
        logits: [..., V/tp] this rank's vocabulary shard (the full vocabulary at TP = 1); fp32/bf16.
        labels: [..., s] global token ids of the next bag (`ignore_index` marks missing targets).
        weights: [s] non-negative slot weights (default uniform); normalisation is per position
            over the valid slots, so they need not sum to 1.
        tp_group: the tensor-parallel group the vocabulary is split over (default: megatron's).
        inplace_backward: write the gradient into the logits' own storage (the logits are dead after
            the loss, as in megatron's vocab-parallel CE, which overwrites them in its forward).
            Saves one [N, V] allocation per backward -- on CPU that is fresh pages, i.e. page
            faults, every step. Only for logits nothing else reads after the backward.
        kernel: None (default) reads TST_MCE_KERNEL, else "auto": Triton kernels on CUDA, torch
            loops elsewhere; "torch" or "triton" force one (same formula, fp32 accumulation).
    Returns:
        [...] fp32 loss, 0 where no target is valid.
    """
    if labels.dim() != logits.dim() or labels.shape[:-1] != logits.shape[:-1]:
        raise ValueError(f"multi_hot_cross_entropy: labels must be [..., s] matching logits [..., V]; "
                         f"got logits {tuple(logits.shape)} and labels {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"multi_hot_cross_entropy: labels must be integer token ids, got {labels.dtype}")
    group, rank, world = _tp_group_and_rank(tp_group)
    labels = labels.long()
    s = labels.shape[-1]
    kernel = _pick_kernel(kernel, logits.device)
    # The Triton forward checks labels and weights itself (device-side asserts from its own flags);
    # elsewhere on an accelerator they are checked here by device-side asserts, on CPU on the host.
    kernel_checks = kernel == "triton" and logits.device.type != "cpu"
    w = _as_weights(weights, s, logits.device, check_on_device=not kernel_checks)
    if CHECK_LABEL_RANGE and not kernel_checks:
        vocab = logits.shape[-1] * world
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
        if logits.device.type != "cpu":
            # A host sync here stalls the GPU queue every call (on an H200, dropping it and the
            # weights' check took bf16 V = 32000 from 1.74x to 1.29x one CE); assert on the device.
            # The trainer already checked the data's largest token id against the vocabulary.
            torch._assert_async(~bad.any(), f"multi_hot_cross_entropy: a label id is outside the "
                                f"vocabulary [0, {vocab}); check --vocab-size / the tokenizer against the data")
        elif bool(bad.any()):
            example = int(labels[bad].flatten()[0])
            raise ValueError(f"multi_hot_cross_entropy: label id {example} is outside the vocabulary "
                             f"[0, {vocab}); check --vocab-size / the tokenizer against the data")
    return _MultiHotCrossEntropy.apply(logits, labels, w, ignore_index, group, rank, world, inplace_backward,
                                       kernel)
