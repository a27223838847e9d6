"""--fp16: half-precision weights and compute with megatron-core's loss scaler, on CPU.

Judged against rules written out here: the dynamic scale follows Megatron-LM's rule (halve after
--hysteresis overflows in a row, double after --loss-scale-window good steps) given which steps
overflowed; an overflowing step updates nothing and does not advance the LR schedule (the
iteration and the data still move on, as in Megatron-LM); the fp16 model computes the fp32
model's loss; a resumed run (scaler state in the checkpoint) continues exactly; a fixed scale
that overflows stops the run with a message instead of skipping forever.
"""
import importlib.util
import math
import os

import pytest

from trainer_utils import assert_ok, base_args, make_data, run_trainer, tail, train_records

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

# a start so high that the first steps overflow, a short window so the scale also grows again
SCALER = dict(fp16=True, initial_loss_scale=2.0 ** 24, hysteresis=2, loss_scale_window=3, min_loss_scale=1.0)
ITERS = 14


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(str(tmp_path_factory.mktemp("fp16") / "data"))


def _args(data, tmp, name, **kw):
    flags = dict(train_iters=ITERS, tst_superposition_iters=4, eval_interval=None, eval_iters=1, lr=3e-3,
                 lr_decay_style="cosine", metrics_path=os.path.join(tmp, f"{name}.jsonl"))
    flags.update(kw)
    return base_args(data, **flags)


def _megatron_scales(overflows, initial, hysteresis, window, minimum):
    """The loss scale after each step, by Megatron-LM's DynamicGradScaler rule."""
    scale, growth, hyst, out = initial, 0, hysteresis, []
    for overflow in overflows:
        if overflow:
            growth, hyst = 0, hyst - 1
            if hyst <= 0:
                scale = max(scale / 2, minimum)
        else:
            growth += 1
            if growth == window:
                growth, hyst, scale = 0, hysteresis, scale * 2
        out.append(scale)
    return out


def _cosine(step, total, peak, low=0.0):
    return low + (peak - low) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


def test_fp16_loss_scaler_skips_and_recovers(data, tmp_path):
    tb = str(tmp_path / "tb")
    runs = {"fp16": _args(data, str(tmp_path), "fp16", tensorboard_dir=tb, **SCALER),
            "fp32": _args(data, str(tmp_path), "fp32")}
    res = {name: assert_ok(run_trainer(args), name) for name, args in runs.items()}
    tr = train_records(res["fp16"].records)
    assert sorted(tr) == list(range(1, ITERS + 1))
    overflows = [tr[n]["skipped_iterations"] == 1 for n in range(1, ITERS + 1)]
    assert overflows[0] and not all(overflows), overflows  # it skips first, then trains
    assert [tr[n]["loss_scale"] for n in range(1, ITERS + 1)] == _megatron_scales(
        overflows, SCALER["initial_loss_scale"], SCALER["hysteresis"], SCALER["loss_scale_window"], 1.0)
    successes = 0
    for n in range(1, ITERS + 1):
        successes += not overflows[n - 1]
        # only a step that updated advances the schedule; every step consumes its batch
        assert tr[n]["lr"] == pytest.approx(_cosine(successes, ITERS, 3e-3), rel=1e-9, abs=1e-15), n
        assert tr[n]["consumed_samples"] == 8 * n
        assert math.isfinite(tr[n]["loss"]) and (math.isnan(tr[n]["grad_norm"]) == overflows[n - 1])
    # the same function as the fp32 model: the first loss is computed before any update
    ref = train_records(res["fp32"].records)
    assert tr[1]["loss"] == pytest.approx(ref[1]["loss"], rel=2e-3)
    assert tr[ITERS]["loss"] < tr[1]["loss"] - 0.1  # and it learns
    assert "loss scale:" in res["fp16"].stdout and "number of skipped iterations:" in res["fp16"].stdout
    assert "loss scale" not in res["fp32"].stdout
    if importlib.util.find_spec("tensorboard"):  # what the accepted --log-loss-scale-to-tensorboard asks for
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(tb)
        acc.Reload()
        assert {e.step: e.value for e in acc.Scalars("train/loss_scale")} == {n: tr[n]["loss_scale"] for n in tr}


def test_fp16_resume_with_distributed_optimizer_is_exact(data, tmp_path):
    """DP=2 with the distributed optimizer: stopped at 6 and resumed, the losses and loss scales of
    iterations 7..14 are the uninterrupted run's (the scaler's state travels in the checkpoint)."""
    common = dict(SCALER, use_distributed_optimizer=True)
    tmp = str(tmp_path)
    straight = assert_ok(run_trainer(_args(data, tmp, "straight", **common), nproc=2), "straight")
    save = os.path.join(tmp, "ckpt")
    assert_ok(run_trainer(_args(data, tmp, "first", save=save, save_interval=6, exit_interval=6, **common),
                          nproc=2), "first leg")
    second = assert_ok(run_trainer(_args(data, tmp, "second", save=save, load=save, save_interval=6, **common),
                                   nproc=2), "resumed")
    a, b = train_records(straight.records), train_records(second.records)
    assert sorted(b) == list(range(7, ITERS + 1)), sorted(b)
    # the checkpoint at 6 was written before the first update (every step so far overflowed: the
    # distributed optimizer then has no Adam state yet), and the scale still moves after it
    assert all(a[n]["skipped_iterations"] for n in range(1, 7)) and a[6]["loss_scale"] != a[ITERS]["loss_scale"]
    for n in range(7, ITERS + 1):
        assert (b[n]["loss"], b[n]["loss_scale"], b[n]["lr"]) == (a[n]["loss"], a[n]["loss_scale"], a[n]["lr"]), n


def test_fp16_fixed_scale_that_overflows_stops_the_run(data, tmp_path):
    res = run_trainer(_args(data, str(tmp_path), "fixed", fp16=True, loss_scale=2.0 ** 32))
    assert res.returncode != 0
    assert "gradients overflow at the fixed --loss-scale 4.29497e+09 (lower it" in res.stdout, tail(res.stdout)
    assert "at iteration 1 in the superposition phase" in res.stdout and "Traceback" not in res.stdout
