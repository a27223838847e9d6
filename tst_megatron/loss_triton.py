"""Triton kernels for the fused multi-hot cross-entropy (used automatically on CUDA).

The math is `tst_megatron.loss`'s; these two kernels replace its chunked torch loops over the
[N, V] logits, which on a GPU cost several passes over HBM (convert, log-softmax into a buffer,
softmax again in the backward, cast back). Here:

  * `row_stats`: one pass over each row: the row's max m and sum(exp(z - m)) (online rescaling,
    so z is read once). Tensor parallelism combines these per-shard stats on the host side
    (max all-reduced, sums rescaled and all-reduced) -- the kernel knows nothing of the group.
  * `softmax_grad`: one pass: reads z, writes g * (exp(z - lse) - sum_j coef_j onehot(y_j)) in
    the output dtype (fp32 math, one rounding), optionally into z's own storage.

So a forward+backward reads the logits twice and writes the gradient once: less traffic than one
`F.cross_entropy`, whatever the bag size s (the s targets are s compares per element, in
registers). Off CUDA the kernels run only under Triton's interpreter (`TRITON_INTERPRET=1`),
which is how the test suite checks them against the torch implementation on CPU.
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
    def _row_stats_kernel(z_ptr, stride_row, max_ptr, sumexp_ptr, V: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = z_ptr + row * stride_row
        cols = tl.arange(0, BLOCK)
        m = tl.full([], float("-inf"), tl.float32)
        acc = tl.zeros([], tl.float32)
        for start in range(0, V, BLOCK):
            offs = start + cols
            z = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            # a row (so far) of only -inf: shift by 0 so exp gives 0, not exp(-inf + inf) = NaN
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            acc = acc * tl.exp(m - shift) + tl.sum(tl.exp(z - shift), axis=0)
            m = m_new
        tl.store(max_ptr + row, m)
        tl.store(sumexp_ptr + row, acc)

    @triton.jit
    def _softmax_grad_kernel(z_ptr, stride_z, out_ptr, stride_out, V, lse_ptr, scale_ptr, idx_ptr,
                             coef_ptr, S: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < V
        z = tl.load(z_ptr + row * stride_z + offs, mask=mask, other=0.0).to(tl.float32)
        lse = tl.load(lse_ptr + row)
        g = tl.load(scale_ptr + row)
        grad = tl.exp(z - lse) * g
        for j in tl.static_range(S):
            y = tl.load(idx_ptr + row * S + j)
            c = tl.load(coef_ptr + row * S + j)
            grad = tl.where(offs == y, grad - c * g, grad)
        tl.store(out_ptr + row * stride_out + offs, grad.to(out_ptr.dtype.element_ty), mask=mask)


def _block(V: int, cap: int) -> int:
    return min(cap, triton.next_power_of_2(max(V, 16)))


def row_stats(z: torch.Tensor, block: Optional[int] = None):
    """Per row of z [N, V] (last dim contiguous): (max, sum(exp(z - max))), both fp32 [N]."""
    assert z.dim() == 2 and z.stride(-1) == 1, "row_stats: z must be [N, V] with contiguous rows"
    n, v = z.shape
    zmax = torch.empty(n, dtype=torch.float32, device=z.device)
    sumexp = torch.empty(n, dtype=torch.float32, device=z.device)
    if n:
        _row_stats_kernel[(n,)](z, z.stride(0), zmax, sumexp, V=v, BLOCK=_block(v, block or STATS_BLOCK),
                                num_warps=8)
    return zmax, sumexp


def softmax_grad(z: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor,
                 idx: torch.Tensor, coef: torch.Tensor, block: Optional[int] = None) -> torch.Tensor:
    """out = scale * (exp(z - lse) - sum_j coef_j onehot(idx_j)) row-wise; `out` may be `z`.

    z, out: [N, V] (rows contiguous); lse, scale: fp32 [N]; idx: int64 [N, s] local column of
    each target (any in-range column where coef is 0); coef: fp32 [N, s].
    """
    n, v = z.shape
    s = idx.shape[-1]
    assert out.shape == z.shape and z.stride(-1) == 1 and out.stride(-1) == 1
    idx, coef = idx.contiguous(), coef.contiguous()
    b = _block(v, block or GRAD_BLOCK)
    if n:
        _softmax_grad_kernel[(n, triton.cdiv(v, b))](z, z.stride(0), out, out.stride(0), v, lse.contiguous(),
                                                     scale.contiguous(), idx, coef, S=s, BLOCK=b, num_warps=8)
    return out
