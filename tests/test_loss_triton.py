"""The MCE loss's Triton kernels (its CUDA path) against the paper's loop and the torch path.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
so the same kernel code is checked on every machine, and it is compiled to cubin for sm_80, sm_90
and sm_100 without a GPU (`test_kernels_compile_for_a100_h100_b200`); with CUDA the compiled
kernels' results are compared with the torch implementation on CPU (`test_cuda_kernel_matches_cpu`).
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
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
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
    else:  # one rounding of the fp32 gradient to bf16/fp16 in both paths: at most one ulp apart
        torch.testing.assert_close(grad_t.float(), xr.grad, atol=1e-2, rtol=8e-3)
        torch.testing.assert_close(grad_t.float(), grad_c.float(), atol=1e-2, rtol=8e-3)
    assert torch.count_nonzero(grad_t[-1, -1]).item() == 0  # the fully ignored position
    assert (grad_t[..., 100] == 0).all()


@pytest.mark.skipif(CUDA, reason="interpreter test")
def test_strided_weight_tensor_reads_as_its_values(small_blocks):
    """A weight tensor that is a strided view (every other entry of a longer one): the kernels
    index weights as base + j, so they must get a contiguous copy, not the view."""
    logits, labels = dist_utils.make_bag_case((2, 3), V=130, s=4, seed=11, dtype=torch.float32)
    longer = torch.tensor([0.4, 9.0, 0.3, 9.0, 0.2, 9.0, 0.1, 9.0])
    up = torch.ones(labels.shape[:-1])
    loss_t, grad_t = fwd_bwd(logits, labels, longer[::2], "triton", up)
    loss_c, grad_c = fwd_bwd(logits, labels, longer[::2].clone(), "torch", up)
    torch.testing.assert_close(loss_t, loss_c, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(grad_t, grad_c, atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(CUDA, reason="interpreter test")
def test_forward_kernel_row_stats_are_an_online_logsumexp(small_blocks):
    """The per-shard outputs TP combines: row max, sum-exp (rescaled as the max moves), the
    weighted target term t = sum_j w_j v_j z[y_j] / W of the slots in this shard, and W."""
    g = torch.Generator().manual_seed(3)
    z = 30 * torch.randn(6, 300, generator=g)
    z[1, :64] = float("-inf")  # the whole first block of a row is masked
    z[2, 250:] += 500  # the max arrives late: earlier partial sums must be rescaled
    start = 300  # this shard holds columns 300..599 of a 900-token vocabulary
    labels = torch.tensor([[310, 599, IGNORE], [350, 10, 899], [IGNORE, IGNORE, IGNORE],
                           [300, 300, 301], [0, 1, 2], [555, IGNORE, 899]])
    w = torch.tensor([0.5, 0.3, 0.2])
    (zmax, sumexp, t, total), ok = loss_triton.mce_forward(z, labels, w, IGNORE, start=start, vocab_total=900,
                                                           finish=False)
    torch.testing.assert_close(zmax, z.max(-1).values)
    torch.testing.assert_close(torch.log(sumexp) + zmax, torch.logsumexp(z, -1), atol=1e-5, rtol=1e-6)
    valid = labels != IGNORE
    mine = valid & (labels >= start) & (labels < start + 300)
    wv = w * valid
    zt = torch.gather(z, 1, torch.where(mine, labels - start, 0))
    want_t = torch.where(mine, wv * zt, torch.zeros(())).sum(-1) / wv.sum(-1).clamp_min(1e-30)
    torch.testing.assert_close(total, wv.sum(-1))
    torch.testing.assert_close(t, want_t, atol=1e-5, rtol=1e-6)
    assert ok.tolist() == [1, 1]


@pytest.mark.skipif(CUDA, reason="interpreter test")
def test_forward_kernel_flags_bad_labels_and_weights():
    """What the CUDA path turns into device-side asserts (no host sync): a valid label outside
    [0, vocab) clears ok[0]; a negative or non-finite weight clears ok[1]; ignored slots never do."""
    z = torch.randn(4, 50)
    good = torch.tensor([[1, IGNORE], [49, 0], [IGNORE, IGNORE], [7, 7]])
    w = torch.tensor([0.6, 0.4])
    assert loss_triton.mce_forward(z, good, w, IGNORE)[1].tolist() == [1, 1]
    for bad_id in (50, -1, 10**6):
        labels = good.clone()
        labels[2, 1] = bad_id
        assert loss_triton.mce_forward(z, labels, w, IGNORE)[1].tolist() == [0, 1], bad_id
    for bad_w in (-0.1, float("nan"), float("inf")):
        assert loss_triton.mce_forward(z, good, torch.tensor([0.6, bad_w]), IGNORE)[1].tolist() == [1, 0], bad_w


@pytest.mark.skipif(CUDA, reason="interpreter test")
def test_triton_path_dispatches_few_host_ops(monkeypatch):
    """The point of the fused kernels on a GPU: the host launches two kernels and a handful of tiny
    ops per loss call, not the ~30 small ops around the torch path's [N, V] passes (on an H200 those,
    not the GPU, bounded the loss at V = 32000). Counted here as aten dispatches outside the kernels."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops, self.on = [], True

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if self.on:
                self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    counter = Count()
    for name in ("mce_forward", "mce_backward"):  # the launches themselves are not host overhead
        real = getattr(loss_triton, name)

        def outside(*a, _real=real, **k):
            counter.on = False
            try:
                return _real(*a, **k)
            finally:
                counter.on = True
        monkeypatch.setattr(loss_triton, name, outside)
    # CPU: the host-side label check the CUDA path leaves to the kernel is off for this count.
    monkeypatch.setattr("tst_megatron.loss.CHECK_LABEL_RANGE", False)
    logits, labels = dist_utils.make_bag_case((4, 8), V=97, s=4, seed=1)
    x = logits.requires_grad_(True)
    weights = TSTConfig(bag_size=4, bag_weighting="power").bag_weights()
    upstream = torch.randn(4, 8)
    counts = {}
    for kernel in ("triton", "torch"):
        multi_hot_cross_entropy(x, labels, weights, kernel=kernel)  # warm the weights cache
        counter.ops.clear()
        with counter:
            loss = multi_hot_cross_entropy(x, labels, weights, kernel=kernel)
            torch.autograd.backward(loss, upstream)
        launches = [op for op in counter.ops if not any(
            k in op for k in ("view", "select", "unbind", "detach", "empty", "lift_fresh", "unsqueeze",
                              "slice", "expand"))]
        counts[kernel] = launches
        x.grad = None
    assert len(counts["triton"]) <= 3, counts["triton"]  # the weights-flag assert (+ autograd glue)
    assert len(counts["torch"]) >= 25, counts["torch"]


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
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
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


def test_kernels_compile_for_a100_h100_b200(tmp_path):
    """The interpreter runs the kernels' Python; this compiles them to cubin for sm_80, sm_90 and
    sm_100 (Triton's own compiler and ptxas, no GPU needed), so a kernel the GPU compiler would reject
    fails here, on every machine, not on a user's cluster."""
    import os
    import subprocess

    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "cache"))
    worker = Path(__file__).resolve().parent / "workers" / "compile_triton.py"
    proc = subprocess.run([sys.executable, str(worker), "80", "90", "100"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("ok sm_") == 3 * 2 * 2 * 3, proc.stdout
