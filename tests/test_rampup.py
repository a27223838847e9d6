"""--rampup-batch-size (Megatron-LM's batch-size ramp, GPT-3's recipe) with the TST phases.

References: Megatron-LM's rule written out here with exact fractions (the batch after c consumed
samples is START + INCREMENT x floor(c x n / RAMP) while c <= RAMP, n = (GBS - START) / INCREMENT,
then GBS; the run length counts the ramp's steps, then whole batches), the LR formula of
megatron's cosine schedule in samples, and the uninterrupted run for a resume in the ramp.
"""
from __future__ import annotations

import math
from fractions import Fraction

import pytest

from tst_megatron.arguments import parse_args, validate
from tst_megatron.batch_schedule import BatchSchedule

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

BASE = ["--data-path", "x", "--num-layers", "2", "--vocab-size", "256"]


def ref_batch(c: int, gbs: int, start: int, inc: int, ramp: int) -> int:
    if c > ramp:
        return gbs
    n = (gbs - start) // inc
    return start + inc * math.floor(Fraction(c * n, ramp))


def ref_iterations(train_samples: int, gbs: int, start: int, inc: int, ramp: int) -> int:
    iterations = consumed = 0
    while consumed <= ramp and consumed <= train_samples:
        consumed += ref_batch(consumed, gbs, start, inc, ramp)
        iterations += 1
    if train_samples > consumed:
        iterations += (train_samples - consumed) // gbs
    return iterations


@pytest.mark.parametrize("gbs, start, inc, ramp", [(16, 4, 4, 32), (12, 2, 2, 25), (64, 8, 8, 1000), (8, 4, 4, 1)])
def test_batch_schedule_is_megatron_lms_ramp(gbs, start, inc, ramp):
    plan = BatchSchedule(gbs, [start, inc, ramp])
    consumed = 0
    for _ in range(200):
        assert plan.batch_at(consumed) == ref_batch(consumed, gbs, start, inc, ramp), consumed
        consumed += ref_batch(consumed, gbs, start, inc, ramp)
    for c0 in (0, start, 3 * start, ramp, ramp + 1):
        for steps in (0, 1, 5, 40):
            total = 0
            for _ in range(steps):
                total += ref_batch(c0 + total, gbs, start, inc, ramp)
            assert plan.samples_in(c0, steps) == total, (c0, steps)
    for train_samples in (start, ramp // 2 + 1, ramp, ramp + 7, 10 * gbs + ramp):
        assert plan.iterations_for(train_samples) == ref_iterations(train_samples, gbs, start, inc, ramp)
    constant = BatchSchedule(gbs)
    assert constant.batch_at(12345) == gbs and constant.samples_in(7, 3) == 3 * gbs
    assert constant.iterations_for(10 * gbs + 3) == 10


def test_train_samples_with_a_ramp_and_the_lr_in_samples():
    """--train-samples becomes Megatron-LM's iteration count; the LR schedule counts samples, each
    step advancing it by its own batch (warmup 8 samples, cosine to --min-lr over 128)."""
    import torch

    from tst_megatron.builders import build_scheduler, scheduler_increment

    cfg = parse_args(BASE + ["--micro-batch-size", "2", "--global-batch-size", "16", "--rampup-batch-size", "4",
                             "4", "32", "--train-samples", "128", "--lr", "3e-3", "--min-lr", "3e-4",
                             "--lr-warmup-samples", "8", "--lr-decay-style", "cosine"])
    validate(cfg, 2)
    assert cfg.optim.train_iters == ref_iterations(128, 16, 4, 4, 32) == 11
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    sched = build_scheduler(opt, cfg.optim)
    consumed = 0
    for _ in range(cfg.optim.train_iters):
        batch = ref_batch(consumed, 16, 4, 4, 32)
        sched.step(scheduler_increment(cfg.optim, batch))
        consumed += batch
        assert opt.param_groups[0]["lr"] == pytest.approx(cosine_lr(consumed, 3e-3, 3e-4, 8, 128), rel=1e-12)


def cosine_lr(consumed: int, lr: float, min_lr: float, warmup: int, decay: int) -> float:
    if consumed <= warmup:
        return lr * consumed / warmup
    ratio = (consumed - warmup) / (decay - warmup)
    return min_lr + 0.5 * (math.cos(math.pi * ratio) + 1) * (lr - min_lr)


def _ramp(ramp: str, *more: str):
    return ["--rampup-batch-size", *ramp.split(), "--global-batch-size", "16", *more]


SAMPLES = ("--train-samples", "96")


@pytest.mark.parametrize("argv, world, message", [
    (_ramp("4 4 32", "--train-iters", "10"), 1, "--rampup-batch-size 4 4 32 needs --train-samples"),
    (_ramp("16 4 32", *SAMPLES), 1, "--rampup-batch-size 16 4 32: START must be below --global-batch-size (16)"),
    (_ramp("4 8 32", *SAMPLES), 1,
     "--rampup-batch-size 4 8 32: --global-batch-size (16) - START (4) must be a multiple of INCREMENT (8)"),
    (_ramp("2 2 32", "--micro-batch-size", "2", *SAMPLES), 2,
     "--rampup-batch-size 2 2 32: every batch of the ramp must be a multiple of --micro-batch-size (2) x "
     "data-parallel size (2) = 4"),
    (_ramp("0 4 32", *SAMPLES), 1, "--rampup-batch-size 0 4 32: START, INCREMENT and RAMP_SAMPLES must be >= 1"),
    (_ramp("4 4 0", *SAMPLES), 1, "--rampup-batch-size 4 4 0: START, INCREMENT and RAMP_SAMPLES must be >= 1"),
    (_ramp("8 8 32", "--micro-batch-size", "4", "--train-samples", "4"), 1,
     "--train-samples (4) is less than one global batch (--rampup-batch-size START) (8)"),
])
def test_rampup_refusals(argv, world, message):
    with pytest.raises(SystemExit) as exc:
        validate(parse_args(BASE + argv), world)
    assert str(exc.value.code).startswith(f"error: {message}"), exc.value.code


def test_resume_with_another_ramp_is_refused():
    from tst_megatron import preflight

    def cfg(*ramp, override=False):
        c = parse_args(BASE + ["--micro-batch-size", "4", "--global-batch-size", "16", "--train-samples", "800"]
                       + (["--rampup-batch-size", *ramp] if ramp else [])
                       + (["--override-checkpoint-args"] if override else []))
        validate(c, 1)
        return c

    saved = {"args": cfg("4", "4", "64").to_dict()}
    preflight.check_resume_compatible(cfg("4", "4", "64"), saved, "ck")
    with pytest.raises(SystemExit) as exc:
        preflight.check_resume_compatible(cfg("8", "4", "64"), saved, "ck")
    assert "--rampup-batch-size [8, 4, 64] (checkpoint: [4, 4, 64])" in str(exc.value.code)
    preflight.check_resume_compatible(cfg("8", "4", "64", override=True), saved, "ck")  # both count samples
    # the saved LR schedule counts samples under a ramp, steps without: no override switches that
    for now, was in ((cfg(override=True), saved), (cfg("4", "4", "64", override=True), {"args": cfg().to_dict()})):
        with pytest.raises(SystemExit) as exc:
            preflight.check_resume_compatible(now, was, "ck")
        assert "so a resume cannot switch" in str(exc.value.code)


@pytest.fixture(scope="session")
def ws(tmp_path_factory):
    from trainer_utils import workspace

    return workspace(tmp_path_factory)


def test_rampup_run_through_the_switch_resumes_exactly(ws, tmp_path):
    """2 ranks (DP=2), s=4 with the switch at iteration 4, batches 4, 4, 4, 8 | 8, 12, 16, ...: every
    step's batch, consumed samples, data tokens (s x L per superposition sample) and LR follow the
    ramp; a run stopped at iteration 3 (mid-ramp, before the switch) and resumed in a fresh process
    has the uninterrupted run's losses exactly. Resumed without its optimizer state (one rank), the
    LR schedule continues from the consumed samples."""
    from trainer_utils import (BAG, SEQ, SUP_ITERS, assert_ok, base_args, copy_checkpoint, eval_records, run_record,
                               run_trainer, tail, train_records)

    from tst_megatron.metrics_io import read_metrics

    def argv(**kw):
        return base_args(ws.data, train_iters=None, train_samples=128, micro_batch_size=2,
                         global_batch_size=16, rampup_batch_size=[4, 4, 32], lr_warmup_samples=8, min_lr=3e-4,
                         hidden_dropout=0.1, eval_iters=1, **kw)

    full = assert_ok(run_trainer(argv(save=tmp_path / "full"), nproc=2), "uninterrupted run")
    tr = train_records(full.records)
    assert sorted(tr) == list(range(1, 12)), tail(full.stdout)
    consumed = tokens = 0
    for it in range(1, 12):
        batch = ref_batch(consumed, 16, 4, 4, 32)
        consumed += batch
        tokens += batch * SEQ * (BAG if it <= SUP_ITERS else 1)
        r = tr[it]
        assert (r["global_batch_size"], r["consumed_samples"], r["data_tokens"]) == (batch, consumed, tokens), it
        assert r["phase"] == ("superposition" if it <= SUP_ITERS else "recovery")
        assert r["lr"] == pytest.approx(cosine_lr(consumed, 3e-3, 3e-4, 8, 128), rel=1e-9), it
        assert math.isfinite(r["loss"])
    assert "global batch size ramps up from 4 to 8 at iteration 3" in full.stdout
    assert run_record(full.records)["superposition_samples"] == 20
    assert read_metrics(str(tmp_path / "full" / "metrics.jsonl")).phase_switch()["data_tokens"] == \
        tr[SUP_ITERS]["data_tokens"]
    ev = eval_records(full.records)
    assert ev[max(ev)]["val_lm_loss"] < ev[0]["val_lm_loss"]

    chain = tmp_path / "chain"
    leg1 = assert_ok(run_trainer(argv(save=chain, exit_interval=3), nproc=2), "leg 1")
    assert "exiting at iteration 3 (--exit-interval)" in leg1.stdout, tail(leg1.stdout)
    leg2 = assert_ok(run_trainer(argv(save=chain, load=chain), nproc=2), "leg 2")
    assert "resumed from" in leg2.stdout and "at iteration 3" in leg2.stdout, tail(leg2.stdout)
    resumed = train_records(leg2.records)
    assert {it: r["loss"] for it, r in resumed.items()} == {it: r["loss"] for it, r in tr.items()}

    fresh = copy_checkpoint(str(chain), 3, str(tmp_path / "fresh_optim"))
    leg3 = assert_ok(run_trainer(argv(load=fresh, save=fresh, no_load_optim=True, exit_interval=5)), "leg 3")
    lrs = {it: r["lr"] for it, r in train_records(leg3.records).items()}
    assert sorted(lrs) == [4, 5] and all(lrs[it] == pytest.approx(tr[it]["lr"], rel=1e-9) for it in lrs)
