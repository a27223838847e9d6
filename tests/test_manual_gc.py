"""--manual-gc / --manual-gc-interval / --no-manual-gc-eval (Megatron-LM's): Python's collector
is off during training and full collections happen exactly where Megatron-LM puts them -- one when
training starts, one every N iterations, one before and one after each evaluation. Observed with
`gc.callbacks` around an in-process run; the reference is that schedule counted out by hand.
"""
from __future__ import annotations

import gc

import pytest

from tst_megatron.arguments import parse_args, validate

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


def _collections(tmp_path, *flags):
    """(generation, collector enabled) of every collection during Trainer.train(), and whether the
    collector was enabled at each training step."""
    from test_bad_inputs import isolated
    from trainer_utils import make_data

    from tst_megatron.trainer import Trainer

    prefix = str(tmp_path / "data")
    make_data(prefix, num_docs=60)
    cfg = parse_args(["--data-path", prefix, "--tokenizer-type", "NullTokenizer", "--vocab-size", "256",
                      "--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "16",
                      "--micro-batch-size", "2", "--train-iters", "6", "--eval-interval", "3", "--eval-iters", "1",
                      "--split", "90,10,0", "--log-interval", "3", "--metrics-path", str(tmp_path / "m.jsonl"),
                      *flags])
    seen, steps = [], []

    def callback(phase, info):
        if phase == "start":
            seen.append((info["generation"], gc.isenabled()))

    with isolated():
        trainer = Trainer(cfg)
        try:
            trainer.setup()
            step = trainer.train_step

            def observed_step():
                steps.append(gc.isenabled())
                return step()

            trainer.train_step = observed_step
            gc.callbacks.append(callback)
            try:
                assert trainer.train() == 0
            finally:
                gc.callbacks.remove(callback)
        finally:
            trainer.close()
    assert gc.isenabled()  # close() turns it back on
    assert len(steps) == 6
    return seen, steps


def test_manual_gc_collects_on_megatron_lms_schedule(tmp_path):
    # start 1, evaluation at 0: 2, iterations 2 and 4 and 6: 3, evaluation at 3: 2, final evaluation: 2
    assert _collections(tmp_path, "--manual-gc", "--manual-gc-interval", "2") == ([(2, False)] * 10, [False] * 6)
    assert _collections(tmp_path, "--manual-gc", "--manual-gc-interval", "2", "--no-manual-gc-eval") == \
        ([(2, False)] * 4, [False] * 6)
    automatic, steps = _collections(tmp_path)
    assert steps == [True] * 6 and (2, False) not in automatic  # the default: Python's own collector


@pytest.mark.parametrize("argv, message", [
    (["--manual-gc-interval", "10"], "--manual-gc-interval is a setting of --manual-gc: give --manual-gc too"),
    (["--no-manual-gc-eval"], "--no-manual-gc-eval is a setting of --manual-gc: give --manual-gc too"),
    (["--manual-gc", "--manual-gc-interval", "-1"], "--manual-gc-interval must be >= 0 (got -1; 0 = no collection "
                                                    "between steps)"),
])
def test_manual_gc_refusals(argv, message):
    with pytest.raises(SystemExit) as exc:
        validate(parse_args(["--data-path", "x", "--vocab-size", "256"] + argv), 1)
    assert str(exc.value.code) == "error: " + message
