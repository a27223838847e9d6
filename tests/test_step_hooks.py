"""What Megatron-LM does around each step, observed in an in-process run (the references are its
schedules counted out by hand, and the run without the flag):

* --manual-gc / --manual-gc-interval / --no-manual-gc-eval: Python's collector is off during
  training and collections happen exactly where Megatron-LM puts them -- a full one when training
  starts, every N iterations and before each evaluation, one of the youngest generation after each
  evaluation (`gc.callbacks`);
* --empty-unused-memory-level 1|2: torch.cuda.empty_cache() after every forward-backward (training
  and evaluation), and at 2 also after every optimizer step;
* --grad-reduce-in-bf16: megatron DDP's gradient buffers are bf16 (fp32 without it), the run
  trains, and its losses stay within bf16 rounding of the fp32-reduce run's.
"""
from __future__ import annotations

import gc

import pytest

from tst_megatron.arguments import parse_args, validate

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


def _train(tmp_path, *flags, around_train=None):
    """Trainer.train() of a 6-iteration run in this process (validation at 0, 3 and 6), with
    `around_train(trainer)` (a context manager factory) wrapped around it; returns the trainer."""
    import contextlib

    from test_bad_inputs import isolated
    from trainer_utils import make_data

    from tst_megatron.trainer import Trainer

    prefix = str(tmp_path / "data")
    if not (tmp_path / "data.idx").exists():
        make_data(prefix, num_docs=60)
    cfg = parse_args(["--data-path", prefix, "--tokenizer-type", "NullTokenizer", "--vocab-size", "256",
                      "--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "16",
                      "--micro-batch-size", "2", "--train-iters", "6", "--eval-interval", "3", "--eval-iters", "1",
                      "--split", "90,10,0", "--log-interval", "1", "--metrics-path", str(tmp_path / "m.jsonl"),
                      *flags])
    with isolated():
        trainer = Trainer(cfg)
        try:
            trainer.setup()
            with (around_train or (lambda t: contextlib.nullcontext()))(trainer):
                assert trainer.train() == 0
        finally:
            trainer.close()
    return trainer


def _collections(tmp_path, *flags):
    """(generation, collector enabled) of every collection during Trainer.train(), and whether the
    collector was enabled at each training step."""
    import contextlib

    seen, steps = [], []

    def callback(phase, info):
        if phase == "start":
            seen.append((info["generation"], gc.isenabled()))

    @contextlib.contextmanager
    def observe(trainer):
        step = trainer.train_step

        def observed_step():
            steps.append(gc.isenabled())
            return step()

        trainer.train_step = observed_step
        gc.callbacks.append(callback)
        try:
            yield
        finally:
            gc.callbacks.remove(callback)

    _train(tmp_path, *flags, around_train=observe)
    assert gc.isenabled()  # close() turns it back on
    assert len(steps) == 6
    return seen, steps


def test_manual_gc_collects_on_megatron_lms_schedule(tmp_path):
    # training starts: full; each evaluation (at 0, 3 and the final one): full before, youngest
    # generation after; iterations 2, 4 and 6: full
    full, young = (2, False), (0, False)
    assert _collections(tmp_path, "--manual-gc", "--manual-gc-interval", "2") == (
        [full, full, young, full, full, young, full, full, full, young], [False] * 6)
    assert _collections(tmp_path, "--manual-gc", "--manual-gc-interval", "2", "--no-manual-gc-eval") == \
        ([(2, False)] * 4, [False] * 6)
    automatic, steps = _collections(tmp_path)
    assert steps == [True] * 6 and (2, False) not in automatic  # the default: Python's own collector


@pytest.mark.parametrize("argv, message", [
    (["--grad-reduce-in-bf16"], "--grad-reduce-in-bf16 needs --bf16 (with fp32 or fp16 weights the gradients are "
                                "reduced in fp32)"),
    (["--bf16", "--grad-reduce-in-bf16", "--accumulate-allreduce-grads-in-fp32"],
     "--accumulate-allreduce-grads-in-fp32 contradicts --grad-reduce-in-bf16; give one of them"),
    (["--manual-gc-interval", "10"], "--manual-gc-interval is a setting of --manual-gc: give --manual-gc too"),
    (["--no-manual-gc-eval"], "--no-manual-gc-eval is a setting of --manual-gc: give --manual-gc too"),
    (["--manual-gc", "--manual-gc-interval", "-1"], "--manual-gc-interval must be >= 0 (got -1; 0 = no collection "
                                                    "between steps)"),
])
def test_refusals(argv, message):
    with pytest.raises(SystemExit) as exc:
        validate(parse_args(["--data-path", "x", "--vocab-size", "256"] + argv), 1)
    assert str(exc.value.code) == "error: " + message


@pytest.mark.parametrize("level, calls", [(0, 0), (1, 6 + 3), (2, 2 * 6 + 3)])
def test_empty_unused_memory_level(tmp_path, monkeypatch, level, calls):
    """6 training steps and 3 one-batch validations: level 1 empties after each of the 9
    forward(-backward) passes, level 2 also after each of the 6 optimizer steps."""
    import torch

    count = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: count.append(1))
    _train(tmp_path, "--empty-unused-memory-level", str(level))
    assert len(count) == calls


def test_grad_reduce_in_bf16(tmp_path):
    import math

    import torch
    from trainer_utils import read_records, train_records

    def run(name, *flags):
        path = tmp_path / f"{name}.jsonl"
        # 4 micro-batches a step: their gradients accumulate in the buffer (in bf16, or in fp32)
        trainer = _train(tmp_path, "--bf16", "--lr", "1e-2", "--global-batch-size", "8", "--metrics-path", str(path),
                         *flags)
        dtypes = {buf.grad_dtype for chunk in trainer.model for buf in chunk.buffers}
        return dtypes, train_records(read_records(str(path)))

    dtypes, bf16 = run("bf16_reduce", "--grad-reduce-in-bf16")
    ref_dtypes, ref = run("fp32_reduce")
    assert dtypes == {torch.bfloat16} and ref_dtypes == {torch.float32}
    assert bf16[1]["loss"] == ref[1]["loss"]  # the same first forward
    assert all(math.isfinite(r["loss"]) for r in bf16.values()) and bf16[6]["loss"] < bf16[1]["loss"]
    assert [bf16[i]["loss"] for i in range(2, 7)] == pytest.approx([ref[i]["loss"] for i in range(2, 7)], rel=2e-3)
    assert any(bf16[i]["grad_norm"] != ref[i]["grad_norm"] for i in range(1, 7))  # bf16 sums differ
