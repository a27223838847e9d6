"""multi_hot_cross_entropy (MCE) against the paper's reference: a Python loop of s cross-entropies.

Single process. The TP = 2 check (vocabulary split over two real Gloo ranks) is the last test; it
launches `tests/workers/model_worker.py loss_tp2`.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dist_utils  # noqa: E402

from tst_megatron.config import WEIGHTINGS, TSTConfig  # noqa: E402
from tst_megatron.loss import multi_hot_cross_entropy  # noqa: E402

IGNORE = -100


reference_mce = dist_utils.reference_mce
make_case = dist_utils.make_bag_case


def run_both(logits, labels, weights, grad_seed=0, ignore_index=IGNORE):
    """(loss, grad) of the fused function and of the reference, for a random upstream grad."""
    g = torch.Generator().manual_seed(grad_seed)
    upstream = torch.randn(labels.shape[:-1], generator=g)

    x = logits.detach().clone().requires_grad_(True)
    loss = multi_hot_cross_entropy(x, labels, weights, ignore_index=ignore_index)
    (loss * upstream).sum().backward()

    xr = logits.detach().float().clone().requires_grad_(True)
    ref = reference_mce(xr, labels.long(), weights if weights is not None else [1.0] * labels.shape[-1],
                        ignore_index=ignore_index)
    (ref.float() * upstream).sum().backward()
    return loss, x.grad, ref.float(), xr.grad


# ----------------------------------------------------------------------------- values + grads
@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("s", [1, 2, 4, 8, 16])
def test_matches_paper_loop(s, weighting):
    weights = TSTConfig(bag_size=s, bag_weighting=weighting).bag_weights()
    logits, labels = make_case((6, 3), V=257, s=s, seed=100 * s + WEIGHTINGS.index(weighting))
    loss, grad, ref, ref_grad = run_both(logits, labels, weights, grad_seed=s)
    assert loss.dtype == torch.float32 and loss.shape == (6, 3)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5)
    # the fully ignored position contributes exactly nothing
    assert loss[-1, -1].item() == 0.0
    assert torch.count_nonzero(grad[-1, -1]).item() == 0
    # the fully valid position has a positive loss (a sanity check that the case is not trivial)
    assert loss[0, 0].item() > 0.0


@pytest.mark.parametrize("s", [2, 5])
def test_unnormalised_and_default_weights(s):
    logits, labels = make_case((4, 5), V=64, s=s, seed=11)
    raw = [1.0 / (i + 1) for i in range(s)]  # not summing to 1
    norm = [w / sum(raw) for w in raw]
    a = multi_hot_cross_entropy(logits, labels, raw)
    b = multi_hot_cross_entropy(logits, labels, norm)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a, reference_mce(logits, labels, raw).float(), atol=1e-5, rtol=1e-6)
    # weights=None is uniform
    torch.testing.assert_close(multi_hot_cross_entropy(logits, labels),
                               reference_mce(logits, labels, [1.0] * s).float(), atol=1e-5, rtol=1e-6)
    # a weight tensor works like a list
    torch.testing.assert_close(multi_hot_cross_entropy(logits, labels, torch.tensor(raw)), a)


def test_closed_form_duplicates_count_twice():
    torch.manual_seed(0)
    z = torch.randn(1, 10, dtype=torch.float64).float()
    labels = torch.tensor([[3, 3, 7, 1]])
    got = multi_hot_cross_entropy(z, labels).double()
    zd = z.double()[0]
    want = torch.logsumexp(zd, 0) - (2 * zd[3] + zd[7] + zd[1]) / 4
    assert abs(got.item() - want.item()) < 1e-6
    # not the same as the deduplicated bag {3, 7, 1}
    dedup = torch.logsumexp(zd, 0) - (zd[3] + zd[7] + zd[1]) / 3
    assert abs(got.item() - dedup.item()) > 1e-3


def test_first_weighting_with_first_target_ignored_is_zero():
    w = TSTConfig(bag_size=4, bag_weighting="first").bag_weights()
    z = torch.randn(2, 32, requires_grad=True)
    labels = torch.tensor([[IGNORE, 3, 4, 5], [2, IGNORE, IGNORE, IGNORE]])
    loss = multi_hot_cross_entropy(z, labels, w)
    assert loss[0].item() == 0.0
    want = (torch.logsumexp(z[1].detach(), 0) - z[1, 2].detach()).item()
    assert abs(loss[1].item() - want) < 1e-5
    loss.sum().backward()
    assert torch.count_nonzero(z.grad[0]).item() == 0


def test_extreme_logits_are_stable():
    logits, labels = make_case((5, 2), V=100, s=4, seed=3, scale=200.0)
    loss, grad, ref, ref_grad = run_both(logits, labels, [0.4, 0.3, 0.2, 0.1])
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    # |z| ~ 600: fp32 rounding of z - logsumexp is ~1e-5 in either implementation
    torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(grad, ref_grad, atol=2e-5, rtol=1e-5)


def test_masked_minus_inf_logits():
    """Vocabulary entries masked with -inf (e.g. padding of the vocabulary) are legal logits: the
    loss stays finite, including at ignored slots whose placeholder index hits a -inf column."""
    logits, labels = make_case((4, 3), V=40, s=4, seed=8)
    logits[..., 0] = float("-inf")
    logits[..., 17] = float("-inf")
    labels[(labels == 0) | (labels == 17)] = 5
    assert (labels == IGNORE).any()
    loss, grad, ref, ref_grad = run_both(logits, labels, [0.4, 0.3, 0.2, 0.1])
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5)
    assert (grad[..., 0] == 0).all()


def test_custom_ignore_index_int32_labels_and_non_contiguous_logits():
    logits, labels = make_case((3, 4), V=50, s=3, seed=5)
    labels = torch.where(labels == IGNORE, torch.full_like(labels, -1), labels)
    base = logits.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous
    assert not base.is_contiguous()
    loss, grad, ref, ref_grad = run_both(base, labels.int(), [0.5, 0.3, 0.2], ignore_index=-1)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("contiguous", [True, False])
def test_inplace_backward_writes_the_same_gradient_into_the_logits(dtype, contiguous, monkeypatch):
    """The model's form (inplace_backward=True): the gradient is bit-identical to the out-of-place
    one and, for contiguous logits, lives in the logits' own storage (no [N, V] allocation).
    Small chunks so that several row chunks are exercised."""
    import tst_megatron.loss as loss_mod

    monkeypatch.setattr(loss_mod, "CHUNK_BYTES_CPU", 4 * 300 * 5)  # 5 rows of V = 300 per chunk
    weights = TSTConfig(bag_size=4, bag_weighting="power").bag_weights()
    logits, labels = make_case((8, 3), V=300, s=4, seed=31, dtype=dtype)
    if not contiguous:
        logits = logits.transpose(0, 1).contiguous().transpose(0, 1)
    upstream = torch.randn(labels.shape[:-1], generator=torch.Generator().manual_seed(3))

    a = logits.clone().requires_grad_(True)
    (multi_hot_cross_entropy(a, labels, weights) * upstream).sum().backward()

    b = logits.clone().requires_grad_(True)
    seen = {}
    z = b * 1  # a non-leaf, like the output layer's logits
    z.register_hook(lambda g: seen.setdefault("grad", g))
    loss = multi_hot_cross_entropy(z, labels, weights, inplace_backward=True)
    assert torch.equal(loss, multi_hot_cross_entropy(logits, labels, weights))
    (loss * upstream).sum().backward()
    assert torch.equal(b.grad, a.grad)
    # the logits are dead after the loss: their storage now holds the gradient
    assert (seen["grad"].data_ptr() == z.data_ptr()) == contiguous
    if contiguous:
        assert torch.equal(z.detach(), a.grad)


@pytest.mark.parametrize("s", [1, 6])
def test_bf16_logits(s):
    weights = TSTConfig(bag_size=s, bag_weighting="power").bag_weights()
    logits, labels = make_case((8, 2), V=300, s=s, seed=21, dtype=torch.bfloat16)
    loss, grad, ref, ref_grad = run_both(logits, labels, weights)
    assert loss.dtype == torch.float32  # the loss is computed in fp32 from the bf16 values
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(grad.float(), ref_grad, atol=1e-5, rtol=1.6e-2)
    # and the paper's loop run entirely in bf16 is within bf16 tolerance of it
    bf16_ref = reference_mce(logits, labels, weights).float()
    torch.testing.assert_close(loss, bf16_ref, atol=0.05, rtol=2e-2)


def test_s1_equals_megatron_vocab_parallel_cross_entropy():
    dist_utils.init_single_process()
    from megatron.core import tensor_parallel

    g = torch.Generator().manual_seed(9)
    logits = 3 * torch.randn(7, 3, 211, generator=g)  # [L, b, V] as megatron lays it out
    target = torch.randint(0, 211, (7, 3), generator=g)
    upstream = torch.randn(7, 3, generator=g)

    a = logits.clone().requires_grad_(True)
    ours = multi_hot_cross_entropy(a, target.unsqueeze(-1))
    (ours * upstream).sum().backward()
    b = logits.clone().requires_grad_(True)
    theirs = tensor_parallel.vocab_parallel_cross_entropy(b, target)
    (theirs * upstream).sum().backward()
    torch.testing.assert_close(ours, theirs.float(), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- errors
def test_errors_are_clear():
    z = torch.randn(4, 3, 10)
    ok = torch.randint(0, 10, (4, 3, 2))
    bad = ok.clone()
    bad[1, 2, 1] = 10
    with pytest.raises(ValueError, match="outside the vocabulary"):
        multi_hot_cross_entropy(z, bad)
    neg = ok.clone()
    neg[0, 0, 0] = -1
    with pytest.raises(ValueError, match="outside the vocabulary"):
        multi_hot_cross_entropy(z, neg)
    with pytest.raises(ValueError, match="weights has 3 entries"):
        multi_hot_cross_entropy(z, ok, [0.2, 0.3, 0.5])
    with pytest.raises(ValueError, match="weights"):
        multi_hot_cross_entropy(z, ok, [0.5, -0.5])
    for zeros in ([0.0, 0.0], torch.zeros(2)):  # a loss of 0 and no gradient, silently
        with pytest.raises(ValueError, match="not all 0"):
            multi_hot_cross_entropy(z, ok, zeros)
    with pytest.raises(ValueError, match="must be .*matching logits"):
        multi_hot_cross_entropy(z, torch.randint(0, 10, (4, 2, 2)))  # leading dims differ
    with pytest.raises(ValueError, match="must be .*matching logits"):
        multi_hot_cross_entropy(z, torch.randint(0, 10, (4, 3)))  # no bag dimension
    with pytest.raises(ValueError, match="integer"):
        multi_hot_cross_entropy(z, ok.float())
    # the ignore index itself is not out of vocabulary
    multi_hot_cross_entropy(z, torch.full_like(ok, IGNORE))


# ----------------------------------------------------------------------------- memory
def _saved_bytes(fn):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def test_saved_memory_does_not_grow_with_bag_size():
    N, V = 64, 4096
    logits = torch.randn(N, V, requires_grad=True)
    nv_bytes = N * V * 4

    def fused(s):
        labels = torch.randint(0, V, (N, s))
        return _saved_bytes(lambda: multi_hot_cross_entropy(logits, labels))

    def loop(s):
        labels = torch.randint(0, V, (N, s))
        return _saved_bytes(lambda: reference_mce(logits, labels, [1.0] * s))

    f1, f16 = fused(1), fused(16)
    # the fused form keeps the logits (N*V) plus O(N*s) small tensors
    assert f1 >= nv_bytes
    assert f16 - f1 < 0.02 * nv_bytes, (f1, f16)
    assert f16 < 1.1 * nv_bytes
    # the measurement can tell: the paper's loop saves one [N, V] softmax per bag slot
    l1, l16 = loop(1), loop(16)
    assert l16 - l1 > 10 * nv_bytes, (l1, l16)


# ----------------------------------------------------------------------------- TP = 2
def test_tensor_parallel_2_equals_tp1(tmp_path):
    """The vocabulary split over 2 Gloo ranks: loss and the gradient of the full logits (gathered
    from the two shards) equal the TP = 1 result and the paper's loop (worker `loss_tp2`)."""
    results = dist_utils.launch("loss_tp2", tmp_path, nproc=2)
    names = dist_utils.check_records(results, expected_prefixes=[
        "loss_tp2/s16/", "loss_tp2/s4/fitted", "loss_tp2/bf16", "loss_tp2/default_group",
        "loss_tp2/label_in_other_shard_ok", "loss_tp2/out_of_vocab_raises",
        "loss_tp2/minus_inf_logits/finite", "loss_tp2/minus_inf_logits/loss_vs_loop"])
    assert len(names) >= 20, sorted(names)
