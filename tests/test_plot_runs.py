"""tools/plot_runs.py: the equal-loss speedup measure, and the plot from synthetic metrics."""
import json
import math
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from tools import plot_runs  # noqa: E402
from tools.plot_runs import equal_loss_speedup  # noqa: E402
from tst_megatron.metrics_io import MetricsWriter, read_metrics, truncate_metrics  # noqa: E402


# ---------------------------------------------------------------- equal_loss_speedup
def test_speedup_exact_interpolation():
    iters = [0, 100, 200, 300, 400]
    losses = [8.0, 5.0, 4.0, 3.5, 3.0]
    # 3.75 lies halfway between (200, 4.0) and (300, 3.5): reached at 250
    assert equal_loss_speedup(iters, losses, 3.75, 125) == pytest.approx(2.0)
    # exactly on an eval point
    assert equal_loss_speedup(iters, losses, 3.5, 300) == pytest.approx(1.0)
    assert equal_loss_speedup(iters, losses, 3.0, 200) == pytest.approx(2.0)


def test_speedup_not_reached_and_edges():
    iters, losses = [100, 200, 300], [5.0, 4.0, 3.5]
    assert equal_loss_speedup(iters, losses, 3.4, 300) is None
    # already below at the first point: no earlier information, that point's iteration counts
    assert equal_loss_speedup(iters, losses, 6.0, 50) == pytest.approx(2.0)
    # first crossing wins over a later dip on a noisy curve; order of points does not matter
    noisy_iters, noisy = [300, 100, 200, 400], [3.6, 5.0, 3.8, 3.2]
    assert equal_loss_speedup(noisy_iters, noisy, 3.9, 100) == pytest.approx(
        (100 + (5.0 - 3.9) / (5.0 - 3.8) * 100) / 100)
    # non-finite eval losses are ignored
    assert equal_loss_speedup([1, 2, 3], [float("nan"), 4.0, 2.0], 3.0, 1) == pytest.approx(2.5)
    assert equal_loss_speedup([], [], 3.0, 10) is None
    with pytest.raises(ValueError, match="target_iters"):
        equal_loss_speedup(iters, losses, 4.0, 0)
    with pytest.raises(ValueError, match="3 iterations but 2 losses"):
        equal_loss_speedup(iters, losses[:2], 4.0, 10)


# ---------------------------------------------------------------- synthetic runs
def write_run(path, name, iters, final_loss, bag_size=1, switch=None, tokens_per_iter=1000,
              seconds_per_iter=0.1, with_run_record=True):
    """A power-law loss curve reaching `final_loss` at `iters`; superposition before `switch`."""
    with MetricsWriter(str(path), run={"name": name, "tst_bag_size": bag_size,
                                       "superposition_iters": switch or 0}
                       if with_run_record else None) as w:
        data = 0
        for it in range(1, iters + 1):
            phase = "superposition" if switch and it <= switch else "recovery"
            data += tokens_per_iter * (bag_size if phase == "superposition" else 1)
            loss = final_loss + 4.0 * (it ** -0.5 - iters ** -0.5)
            if it % 10 == 0:
                w.train(iteration=it, phase=phase, loss=loss + (0.5 if phase == "superposition" else 0),
                        lr=1e-3, grad_norm=1.0, data_tokens=data, tokens_per_s=1e4,
                        elapsed_s=it * seconds_per_iter)
            if it % 50 == 0:
                w.eval(iteration=it, val_lm_loss=loss, data_tokens=data,
                       elapsed_s=it * seconds_per_iter)
    return str(path)


def test_plot_runs_writes_png_and_prints_speedup(tmp_path, capsys):
    tst = write_run(tmp_path / "tst.jsonl", "tst", 500, 3.0, bag_size=4, switch=150)
    base = write_run(tmp_path / "base.jsonl", "base", 1000, 2.8)
    never = write_run(tmp_path / "never.jsonl", "never", 500, 2.0, with_run_record=False)
    out = tmp_path / "plots" / "cmp.png"
    result = plot_runs.main([tst, base, never, "--labels", "TST s=4", "baseline", "great",
                             "--output", str(out)])
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(out) > 10_000
    assert result["baseline"] == 1  # the first run without superposition
    printed = capsys.readouterr().out

    # baseline: loss(it) = 2.8 + 4 (it^-0.5 - 1000^-0.5); its eval points are every 50 iterations
    base_run = read_metrics(base)
    bx = [r["iteration"] for r in base_run.evals]
    by = [r["val_lm_loss"] for r in base_run.evals]
    target = read_metrics(tst).final_eval()["val_lm_loss"]
    expected = equal_loss_speedup(bx, by, target, 500)
    assert result["speedups"]["TST s=4"] == pytest.approx(expected)
    assert expected is not None and 0 < expected < 1  # this synthetic TST run is worse
    assert f"equal-loss speedup {expected:.2f}x" in printed
    assert result["speedups"]["great"] is None and "not reached" in printed
    assert "switch at iteration 150" in printed  # exact, from the run record


def test_plot_runs_baseline_flag_and_errors(tmp_path, capsys):
    a = write_run(tmp_path / "a.jsonl", "a", 200, 3.0)
    b = write_run(tmp_path / "b.jsonl", "b", 200, 3.2)
    result = plot_runs.main([a, b, "--baseline", "1", "--output", str(tmp_path / "o.png")])
    # run a reaches 3.0 at 200; run b (the baseline) never gets below 3.2
    assert result["baseline"] == 1 and result["speedups"]["a"] is None
    with pytest.raises(SystemExit, match="--baseline 5 is out of range"):
        plot_runs.main([a, b, "--baseline", "5", "--output", str(tmp_path / "o.png")])
    with pytest.raises(SystemExit, match="--labels has 1 entries for 2"):
        plot_runs.main([a, b, "--labels", "x", "--output", str(tmp_path / "o.png")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"type": "eval", "iteration": 1, "val_lm_loss": 3}\n{oops\n'
                   '{"type": "eval", "iteration": 2, "val_lm_loss": 2}\n')
    with pytest.raises(SystemExit, match="bad.jsonl:2: malformed metrics record"):
        plot_runs.main([a, str(bad), "--output", str(tmp_path / "o.png")])
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match=r"plot_runs.py: error: --output .*a_file/o.png: cannot write it"):
        plot_runs.main([a, b, "--output", str(blocker / "o.png")])


def test_read_metrics_tolerates_truncated_last_line(tmp_path):
    path = tmp_path / "live.jsonl"
    lines = [json.dumps({"type": "train", "iteration": 1, "phase": "recovery", "loss": 5.0}),
             json.dumps({"iteration": 1, "val_lm_loss": 4.5}),  # untyped: classified by fields
             '{"type": "train", "iter']
    path.write_text("\n".join(lines))
    with pytest.warns(UserWarning, match="incomplete last line"):
        run = read_metrics(str(path))
    assert len(run.train) == 1 and run.final_eval()["val_lm_loss"] == 4.5
    assert run.name == "live" and not run.uses_superposition and run.phase_switch() is None
    assert math.isclose(run.evals[0]["val_lm_loss"], 4.5)


def test_phase_switch_of_a_run_stopped_before_it(tmp_path):
    """A TST run logged up to iteration 3 of a switch at 5: no switch to report or draw yet; at 6, there is."""
    path = tmp_path / "tst.jsonl"
    records = [{"type": "run", "tst_bag_size": 4, "superposition_iters": 5, "global_batch_size": 8, "seq_length": 16}]
    records += [{"type": "train", "iteration": i, "phase": "superposition", "loss": 6.0, "elapsed_s": i}
                for i in (1, 2, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert read_metrics(str(path)).uses_superposition and read_metrics(str(path)).phase_switch() is None
    records.append({"type": "train", "iteration": 6, "phase": "recovery", "loss": 5.0, "elapsed_s": 6})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert read_metrics(str(path)).phase_switch()["iteration"] == 5


@pytest.mark.parametrize("kw, kept", [
    ({}, ["run", "t1", "t2", "t3", "t4", "e4"]),                       # a resume from 4 logs 5.. again
    ({"keep_evals_at_end": False}, ["run", "t1", "t2", "t3", "t4"]),    # ... and evaluates 4 again
    ({"keep_evals_at_end": False, "drop_later": False},                # --skip-train of checkpoint 4
     ["run", "t1", "t2", "t3", "t4", "t5", "t6", "e6"])])
def test_truncate_metrics(tmp_path, kw, kept):
    path = tmp_path / "m.jsonl"
    recs = [{"type": "run"}] + [{"type": "train", "iteration": i} for i in range(1, 7)]
    recs.insert(5, {"type": "eval", "iteration": 4})
    recs.append({"type": "eval", "iteration": 6})
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    truncate_metrics(str(path), 4, **kw)
    got = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["type"][0] + str(r["iteration"]) if "iteration" in r else r["type"] for r in got] == kept


def test_resumed_logger_purges_the_tensorboard_steps_it_logs_again(tmp_path):
    """A run logged steps 1-4, was interrupted, and resumes from its checkpoint at 2: TensorBoard shows
    steps 1-2 of the first process and 3-4 of the resumed one, not two values at 3 and 4 (as the
    metrics file is cut back to the checkpoint)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tst_megatron.metrics import RunLogger

    tb = tmp_path / "tb"
    first = RunLogger(True, None, str(tb))
    for it in range(1, 5):
        first.record({"type": "train", "iteration": it, "loss": float(it)})
    first.close()
    resumed = RunLogger(True, None, str(tb), resume=True, tensorboard_purge_step=3)
    for it in (3, 4):
        resumed.record({"type": "train", "iteration": it, "loss": 10.0 + it})
    resumed.close()
    events = EventAccumulator(str(tb))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0)]
