"""The MCE loss's Triton kernels (its CUDA path) against the paper's loop and the torch path.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
so the same kernel code is checked on every machine; with CUDA the kernels are compiled and the
result is compared with the torch implementation on CPU (`test_cuda_kernel_matches_cpu`).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dist_utils  # noqa: E402

pytest.importorskip("triton")

from tst_megatron import loss_triton  # noqa: E402
from tst_megatron.config import TSTConfig  # noqa: E402
from tst_megatron.loss import _pick_kernel, multi_hot_cross_entropy  # noqa: E402

IGNORE = -100
CUDA = torch.cuda.is_available()


def fwd_bwd(logits, labels, weights, kernel, upstream, inplace=False):
    x = logits.detach().clone().requires_grad_(True)
    y = x * 1.0 if inplace else x  # in place needs a non-leaf (dead) logits tensor
    loss = multi_hot_cross_entropy(y, labels, weights, kernel=kernel, inplace_backward=inplace)
    (loss * upstream).sum().backward()
    return loss.detach(), x.grad


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks much smaller than V, so rows span several blocks and the last one is partial."""
    monkeypatch.setattr(loss_triton, "STATS_BLOCK", 64)
    monkeypatch.setattr(loss_triton, "GRAD_BLOCK", 32)


@pytest.mark.skipif(CUDA, reason="interpreter test; CUDA machines run test_cuda_kernel_matches_cpu")
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("s,weighting", [(1, "uniform"), (4, "power"), (16, "fitted")])
def test_interpreted_kernel_matches_loop_and_torch(s, weighting, dtype, inplace, small_blocks):
    weights = TSTConfig(bag_size=s, bag_weighting=weighting).bag_weights()
    logits, labels = dist_utils.make_bag_case((4, 3), V=257, s=s, seed=7 * s, dtype=dtype)
    logits[..., 100] = float("-inf")  # a masked vocabulary column, never a target
    labels[labels == 100] = 5
    up = torch.randn(labels.shape[:-1], generator=torch.Generator().manual_seed(s))
    loss_t, grad_t = fwd_bwd(logits, labels, weights, "triton", up, inplace)
    loss_c, grad_c = fwd_bwd(logits, labels, weights, "torch", up, inplace)
    xr = logits.detach().float().clone().requires_grad_(True)
    ref = dist_utils.reference_mce(xr, labels, weights)
    (ref.float() * up).sum().backward()
    assert torch.isfinite(loss_t).all() and torch.isfinite(grad_t.float()).all()
    torch.testing.assert_close(loss_t, ref.float(), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(loss_t, loss_c, atol=1e-5, rtol=1e-6)
    if dtype == torch.float32:
        torch.testing.assert_close(grad_t, xr.grad, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(grad_t, grad_c, atol=1e-6, rtol=1e-5)
    else:  # one rounding of the fp32 gradient to bf16 in both paths: at most one bf16 ulp apart
        torch.testing.assert_close(grad_t.float(), xr.grad, atol=1e-2, rtol=8e-3)
        torch.testing.assert_close(grad_t.float(), grad_c.float(), atol=1e-2, rtol=8e-3)
    assert torch.count_nonzero(grad_t[-1, -1]).item() == 0  # the fully ignored position
    assert (grad_t[..., 100] == 0).all()


@pytest.mark.skipif(CUDA, reason="interpreter test")
def test_row_stats_kernel_is_an_online_logsumexp(small_blocks):
    g = torch.Generator().manual_seed(3)
    z = 30 * torch.randn(6, 300, generator=g)
    z[1, :64] = float("-inf")  # the whole first block of a row is masked
    z[2, 250:] += 500  # the max arrives late: earlier partial sums must be rescaled
    zmax, sumexp = loss_triton.row_stats(z)
    torch.testing.assert_close(zmax, z.max(-1).values)
    torch.testing.assert_close(torch.log(sumexp) + zmax, torch.logsumexp(z, -1), atol=1e-5, rtol=1e-6)


def test_kernel_choice(monkeypatch):
    monkeypatch.delenv("TST_MCE_KERNEL", raising=False)
    assert _pick_kernel(None, torch.device("cpu")) == "torch"  # auto off CUDA
    if CUDA:
        assert _pick_kernel(None, torch.device("cuda")) == "triton"  # auto on CUDA
    with pytest.raises(ValueError, match="TST_MCE_KERNEL"):
        _pick_kernel("cuda", torch.device("cpu"))
    monkeypatch.setenv("TST_MCE_KERNEL", "triton")
    if not CUDA:
        assert _pick_kernel(None, torch.device("cpu")) == "triton"  # the interpreter is on here
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        _pick_kernel("triton", torch.device("cpu"))


@pytest.mark.skipif(CUDA, reason="interpreter test")
def test_tensor_parallel_2_with_triton_kernel(tmp_path):
    """The TP = 2 scenario of test_loss.py with the Triton kernels: per-shard stats combined over
    the group (max all-reduced, sums rescaled) equal TP = 1 and the paper's loop."""
    results = dist_utils.launch("loss_tp2", tmp_path, nproc=2, extra_env={"TST_MCE_KERNEL": "triton"})
    names = dist_utils.check_records(results, expected_prefixes=[
        "loss_tp2/s16/", "loss_tp2/bf16", "loss_tp2/minus_inf_logits/loss_vs_loop"])
    assert len(names) >= 20, sorted(names)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (run on the GPU machine)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("s", [1, 16])
def test_cuda_kernel_matches_cpu(s, dtype):
    """Compiled kernels on the GPU (chosen automatically) vs the torch implementation on CPU, at
    the paper's largest vocabulary."""
    weights = TSTConfig(bag_size=s, bag_weighting="power").bag_weights()
    logits, labels = dist_utils.make_bag_case((256,), V=151936, s=s, seed=s, dtype=dtype)
    up = torch.randn(256, generator=torch.Generator().manual_seed(1))
    loss_g, grad_g = fwd_bwd(logits.cuda(), labels.cuda(), weights, None, up.cuda())
    loss_c, grad_c = fwd_bwd(logits, labels, weights, "torch", up)
    torch.testing.assert_close(loss_g.cpu(), loss_c, atol=2e-5, rtol=1e-5)
    if dtype == torch.float32:
        torch.testing.assert_close(grad_g.cpu(), grad_c, atol=1e-6, rtol=1e-4)
    else:
        torch.testing.assert_close(grad_g.cpu().float(), grad_c.float(), atol=1e-2, rtol=8e-3)
