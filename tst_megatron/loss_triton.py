"""Triton kernels for the fused multi-hot cross-entropy (used automatically on CUDA).

The math is `tst_megatron.loss`'s; two kernels do the whole loss, so that one call costs two
launches and a few tiny host ops rather than the ~35 small torch ops (label masks, weights,
gathers, sums) the torch path needs around its [N, V] passes. On an H200 those small ops, not the
GPU, bounded the loss at V = 32000 (session 3: 1.3-1.7x one cross-entropy in wall clock while the
kernels took 0.4x its GPU time; docs/results.md).

  * forward (`mce_forward`), one program per row: one pass over the row for its max m and
    sum(exp(z - m)) (online rescaling, so z is read once), then the s targets: weights w_j,
    validity (label != ignore_index), the target logits of the slots this vocabulary shard owns,
    W = sum_j w_j v_j and t = sum_j w_j v_j z[y_j] / W. Without tensor parallelism it finishes
    the row: lse = log(sum) + m and loss = lse - t (0 where W = 0). With it, it returns the
    per-shard (m, sum, t, W) and `tst_megatron.loss` combines them over the group (max
    all-reduced, sums rescaled and all-reduced, t all-reduced). It also checks every label
    against the global vocabulary and every weight for being finite and >= 0, clearing a flag
    the caller turns into a device-side assert (no host sync).
  * backward (`mce_backward`), one program per (row, block of columns): reads z, writes
    g * (exp(z - lse) - sum_j (w_j v_j / W) [y_j = column]) in the output's dtype (fp32 math, one
    rounding), optionally into z's own storage; W and the slots are recomputed from the labels
    (s loads per program), so nothing of size [N, s] is saved besides the labels themselves; a
    target's per-element compare runs only in the block that holds it.

So a forward+backward reads the logits twice and writes the gradient once: less traffic than one
`F.cross_entropy`, whatever the bag size s. Off CUDA the kernels run only under Triton's
interpreter (`TRITON_INTERPRET=1`), which is how the test suite checks them against the torch
implementation on CPU; it also compiles them for sm_80/90/100 without a GPU.
"""
from __future__ import annotations

from typing import Optional

import torch

try:  # optional: Triton ships with CUDA builds of PyTorch, not with the CPU wheel
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None

STATS_BLOCK = 4096  # elements of one row streamed per loop iteration (forward)
GRAD_BLOCK = 2048  # elements of one row per program (backward)


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _mce_forward_kernel(z_ptr, stride_row, labels_ptr, w_ptr, start, vocab_total, ignore_index,
                            out0_ptr, out1_ptr, out2_ptr, out3_ptr, ok_ptr,
                            V: tl.constexpr, S: tl.constexpr, BLOCK: tl.constexpr, FINISH: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = z_ptr + row * stride_row
        cols = tl.arange(0, BLOCK)
        m = tl.full([], float("-inf"), tl.float32)
        acc = tl.zeros([], tl.float32)
        for first in range(0, V, BLOCK):
            offs = first + cols
            z = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            # a row (so far) of only -inf: shift by 0 so exp gives 0, not exp(-inf + inf) = NaN
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            acc = acc * tl.exp(m - shift) + tl.sum(tl.exp(z - shift), axis=0)
            m = m_new

        total = tl.zeros([], tl.float32)  # W = sum_j w_j v_j
        weighted = tl.zeros([], tl.float32)  # sum_j w_j v_j z[y_j] over the slots this shard owns
        bad_label = tl.zeros([], tl.int32)
        bad_weight = tl.zeros([], tl.int32)
        for j in tl.static_range(S):
            y = tl.load(labels_ptr + row * S + j)
            w = tl.load(w_ptr + j)
            valid = y != ignore_index
            bad_label += (valid & ((y < 0) | (y >= vocab_total))).to(tl.int32)
            bad_weight += ((w < 0) | (w != w) | (w == float("inf"))).to(tl.int32)
            local = y - start
            mine = valid & (local >= 0) & (local < V)
            zt = tl.load(base + local, mask=mine, other=0.0).to(tl.float32)
            wv = tl.where(valid, w, 0.0)
            total += wv
            # where, not a product with `mine`: a -inf logit at an unowned slot would give NaN
            weighted += tl.where(mine, wv * zt, 0.0)
        t = weighted / tl.maximum(total, 1e-30)
        # Benign race: every program that finds a problem writes the same 0.
        tl.store(ok_ptr, 0, mask=bad_label > 0)
        tl.store(ok_ptr + 1, 0, mask=bad_weight > 0)
        if FINISH:
            lse = tl.log(acc) + m
            tl.store(out0_ptr + row, tl.where(total > 0, lse - t, 0.0))
            tl.store(out1_ptr + row, lse)
        else:
            tl.store(out0_ptr + row, m)
            tl.store(out1_ptr + row, acc)
            tl.store(out2_ptr + row, t)
            tl.store(out3_ptr + row, total)

    @triton.jit
    def _mce_backward_kernel(z_ptr, stride_z, out_ptr, stride_out, V, lse_ptr, grad_loss_ptr, labels_ptr,
                             w_ptr, start, ignore_index, S: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        first = tl.program_id(1) * BLOCK
        offs = first + tl.arange(0, BLOCK)
        mask = offs < V
        total = tl.zeros([], tl.float32)
        for j in tl.static_range(S):
            y = tl.load(labels_ptr + row * S + j)
            total += tl.where(y != ignore_index, tl.load(w_ptr + j), 0.0)
        g = tl.where(total > 0, tl.load(grad_loss_ptr + row), 0.0)
        scale = g / tl.maximum(total, 1e-30)
        z = tl.load(z_ptr + row * stride_z + offs, mask=mask, other=0.0).to(tl.float32)
        grad = tl.exp(z - tl.load(lse_ptr + row)) * g
        for j in tl.static_range(S):
            # A uniform branch per program: only the blocks that hold target j pay the per-element
            # compare (s per element everywhere cost 0.27 -> 0.73 ms at V = 32000, s = 16 on an H200).
            local = tl.load(labels_ptr + row * S + j) - start
            if (local != ignore_index - start) & (local >= first) & (local < first + BLOCK):
                grad = tl.where(offs == local.to(tl.int32), grad - tl.load(w_ptr + j) * scale, grad)
        tl.store(out_ptr + row * stride_out + offs, grad.to(out_ptr.dtype.element_ty), mask=mask)


def _block(V: int, cap: int) -> int:
    return min(cap, triton.next_power_of_2(max(V, 16)))


def mce_forward(z: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, ignore_index: int,
                start: int = 0, vocab_total: Optional[int] = None, finish: bool = True,
                block: Optional[int] = None):
    """The forward pass over z [N, V] (rows contiguous; this shard's columns start..start+V).

    labels: int64 [N, s] global ids (contiguous); weights: fp32 [s] on z's device.
    Returns (outs, ok): with finish=True (z holds the whole vocabulary) outs = (loss, lse); else
    the per-shard outs = (max, sum(exp(z - max)), t, W) for the caller to combine. All fp32 [N].
    ok: int32 [2], ok[0] = 0 if a valid label lies outside [0, vocab_total), ok[1] = 0 if a
    weight is negative or not finite.
    """
    assert z.dim() == 2 and z.stride(-1) == 1, "mce_forward: z must be [N, V] with contiguous rows"
    n, v = z.shape
    s = labels.shape[-1]
    assert labels.shape == (n, s) and labels.is_contiguous() and labels.dtype == torch.int64
    outs = torch.empty((2 if finish else 4, n), dtype=torch.float32, device=z.device)
    ok = torch.ones(2, dtype=torch.int32, device=z.device)
    if n:
        o = list(outs) + [outs[0]] * (4 - outs.shape[0])  # unused pointers when finish=True
        _mce_forward_kernel[(n,)](z, z.stride(0), labels, weights, start, vocab_total or v, ignore_index,
                                  *o, ok, V=v, S=s, BLOCK=_block(v, block or STATS_BLOCK),
                                  FINISH=finish, num_warps=8)
    return tuple(outs), ok


def mce_backward(z: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, grad_loss: torch.Tensor,
                 labels: torch.Tensor, weights: torch.Tensor, ignore_index: int, start: int = 0,
                 block: Optional[int] = None) -> torch.Tensor:
    """out = g * (exp(z - lse) - sum_j (w_j v_j / W) onehot(y_j - start)) row-wise, with
    g = grad_loss where W > 0 else 0; `out` may be `z` (in place).

    z, out: [N, V] (rows contiguous); lse, grad_loss: fp32 [N] contiguous; labels, weights as in
    `mce_forward`.
    """
    n, v = z.shape
    s = labels.shape[-1]
    assert out.shape == z.shape and z.stride(-1) == 1 and out.stride(-1) == 1
    assert lse.is_contiguous() and grad_loss.is_contiguous() and labels.is_contiguous()
    b = _block(v, block or GRAD_BLOCK)
    if n:
        _mce_backward_kernel[(n, triton.cdiv(v, b))](z, z.stride(0), out, out.stride(0), v, lse, grad_loss,
                                                     labels, weights, start, ignore_index, S=s, BLOCK=b,
                                                     num_warps=8)
    return out
