"""Activation recomputation, overlapped gradient reduction and parameter gather: memory / speed
flags that must not change what is computed.

Each run is the determinism configuration of the resume tests (dropout on, so the recomputed
forward has to replay the very random masks of the first one). The recomputation is seen for
real: a process-wide forward hook counts the calls of megatron's TransformerLayer and of our core
attention; a recomputed run makes exactly one extra call per layer (full) or per attention
(selective) for every training micro-batch, and logs bit-identical losses.
"""
from __future__ import annotations

import json
import os
import re

import pytest

from trainer_utils import (DISTOPT_FLAGS, GBS, MBS, TRAIN_ITERS, assert_ok, base_args, chain_args, distopt_run,
                           eval_records, reference_runs, run_trainer, tail, train_records, workspace)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

# pretrain_tst.py's main with a forward hook on every module; prints the call counts per class.
COUNTING_MAIN = """
import collections, json, sys
from torch.nn.modules.module import register_module_forward_hook
counts = collections.Counter()
register_module_forward_hook(lambda module, args, out: counts.update([type(module).__name__]))
from tst_megatron.trainer import main
rc = main(sys.argv[1:])
print("FORWARD_CALLS " + json.dumps(counts))
sys.exit(rc)
"""
LAYERS = 2  # base_args


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return workspace(tmp_path_factory)


def counted_run(ws, name, **flags):
    res = assert_ok(run_trainer(chain_args(ws, metrics_path=ws.path(f"{name}.jsonl"), **flags),
                                script=["-c", COUNTING_MAIN]), name)
    counts = json.loads(re.search(r"FORWARD_CALLS (.*)", res.stdout).group(1))
    return res, counts


@pytest.fixture(scope="module")
def plain(ws):
    return counted_run(ws, "mem_plain")


@pytest.mark.parametrize("flags, module", [
    (dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1), "TransformerLayer"),
    (dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1), "TransformerLayer"),
    (dict(recompute_granularity="selective"), "SDPAttention"),
], ids=["full-uniform", "full-block-1-of-2", "selective"])
def test_recomputation_replays_the_forward_and_changes_nothing(ws, plain, flags, module):
    ref, ref_counts = plain
    res, counts = counted_run(ws, "mem_" + "_".join(str(v) for v in flags.values()), **flags)
    micro_batches = TRAIN_ITERS * GBS // MBS
    recomputed_layers = 1 if flags.get("recompute_method") == "block" else LAYERS
    assert counts[module] - ref_counts[module] == micro_batches * recomputed_layers, (counts, ref_counts)
    got, want = train_records(res.records), train_records(ref.records)
    assert sorted(got) == list(range(1, TRAIN_ITERS + 1))
    for it in want:  # both phases, bit for bit
        assert (got[it]["loss"], got[it]["grad_norm"]) == (want[it]["loss"], want[it]["grad_norm"]), it


def test_plain_counted_run_is_the_reference_run(ws, plain):
    """The hook itself changes nothing: the counted plain run logs the reference run's losses."""
    ref = train_records(reference_runs(ws)[0].records)
    got = train_records(plain[0].records)
    assert [got[i]["loss"] for i in sorted(got)] == [ref[i]["loss"] for i in sorted(ref)]


def test_overlapped_gradient_reduction_gives_the_same_training(ws):
    """DP=2: the buckets' all-reduces started during the backward pass (--overlap-grad-reduce)
    sum the same gradients as the reduction after it."""
    args = dict(hidden_dropout=0.0, attention_dropout=0.0, train_iters=6)
    runs = {name: assert_ok(run_trainer(base_args(ws.data, metrics_path=ws.path(f"overlap_{name}.jsonl"),
                                                  **args, **extra), nproc=2), name)
            for name, extra in (("off", {}), ("on", {"overlap_grad_reduce": True}))}
    off, on = (train_records(runs[k].records) for k in ("off", "on"))
    assert sorted(on) == list(range(1, 7))
    for it in off:
        assert on[it]["loss"] == pytest.approx(off[it]["loss"], rel=1e-6, abs=1e-7), (it, tail(runs["on"].stdout))
        assert on[it]["grad_norm"] == pytest.approx(off[it]["grad_norm"], rel=1e-5), it


def _checkpoint_tensors(ckpt_dir: str, tmp_path) -> dict:
    """Every tensor of a torch_dist checkpoint, read by torch.distributed.checkpoint itself."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp_path / (os.path.basename(ckpt_dir) + ".pt")
    dcp_to_torch_save(ckpt_dir, str(out))
    return {k: v for k, v in torch.load(out, weights_only=False).items() if isinstance(v, torch.Tensor)}


def test_overlapped_parameter_gather_gives_the_same_training_and_checkpoints(ws, tmp_path):
    """DP=2, distributed optimizer: with --overlap-param-gather each rank's step updates its shard
    and the rest arrives bucket by bucket in the next forward. Losses, grad norms and validation
    equal the run without overlap, and the checkpoints hold the same tensors -- a save right after
    a step must gather first, or half of every weight would be one step old."""
    import torch

    ref = assert_ok(distopt_run(ws), "distopt reference")
    on = assert_ok(run_trainer(base_args(ws.data, save=ws.path("distopt_overlap"), save_interval=6,
                                         overlap_grad_reduce=True, overlap_param_gather=True, **DISTOPT_FLAGS),
                               nproc=2), "overlap")
    got, want = train_records(on.records), train_records(ref.records)
    assert sorted(got) == sorted(want) == list(range(1, TRAIN_ITERS + 1))
    for it in want:
        assert got[it]["loss"] == pytest.approx(want[it]["loss"], rel=1e-6, abs=1e-7), (it, tail(on.stdout))
        assert got[it]["grad_norm"] == pytest.approx(want[it]["grad_norm"], rel=1e-5), it
    got_ev, want_ev = eval_records(on.records), eval_records(ref.records)
    assert sorted(got_ev) == sorted(want_ev)
    for it in want_ev:
        assert got_ev[it]["val_lm_loss"] == pytest.approx(want_ev[it]["val_lm_loss"], rel=1e-6), it
    for it in (6, TRAIN_ITERS):
        a = _checkpoint_tensors(os.path.join(ws.path("distopt"), f"iter_{it:07d}"), tmp_path)
        b = _checkpoint_tensors(os.path.join(ws.path("distopt_overlap"), f"iter_{it:07d}"), tmp_path)
        weights = [k for k in a if "optimizer" not in k]
        assert weights and sorted(a) == sorted(b)
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-7), (it, k, (a[k] - b[k]).abs().max())


@pytest.mark.parametrize("argv, message", [
    (["--recompute-granularity", "full"],
     "--recompute-granularity full needs --recompute-method uniform|block and --recompute-num-layers N >= 1"),
    (["--recompute-granularity", "selective", "--recompute-num-layers", "1"],
     "--recompute-method / --recompute-num-layers are for --recompute-granularity full"),
    (["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "3",
      "--num-layers", "4"],
     "--recompute-method uniform needs --recompute-num-layers (3) to divide the layers per pipeline stage (4)"),
    (["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "3"],
     "--recompute-num-layers (3) exceeds the layers per pipeline stage (2)"),
    (["--overlap-param-gather", "--overlap-grad-reduce"],
     "--overlap-param-gather needs --use-distributed-optimizer and --overlap-grad-reduce"),
    (["--overlap-param-gather", "--use-distributed-optimizer"],
     "--overlap-param-gather needs --use-distributed-optimizer and --overlap-grad-reduce"),
])
def test_memory_flags_checked(argv, message):
    from tst_megatron.arguments import parse_args, validate

    cfg = parse_args(["--data-path", "x", "--num-layers", "2"] + argv)
    with pytest.raises(SystemExit) as exc:
        validate(cfg, 1)
    assert str(exc.value.code).startswith(f"error: {message}"), exc.value.code
