"""Megatron-LM's step timers (--timing-log-level, --timing-log-option, --log-timers-to-tensorboard):
megatron-core's own Timers, on CPU and Gloo.

The times are real measurements, so the checks are the relations that must hold between them on
every rank: a micro-batch's data fetch lies inside its forward compute, forward and backward
compute and the grad all-reduce inside forward-backward, the optimizer's inner step inside the
optimizer step, and forward-backward plus optimizer inside the iteration time the log line
reports.
"""
from __future__ import annotations

import importlib.util
import re
from typing import Dict, List

import pytest

from tst_megatron.arguments import parse_args, validate

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

LEVEL_1 = {"forward-backward", "all-grads-sync", "optimizer", "optimizer-inner-step"}
LEVEL_2 = {"forward-compute", "backward-compute", "batch-generator"}
PIPELINE = {"forward-send", "forward-recv", "backward-send", "backward-recv"}


@pytest.fixture(scope="session")
def ws(tmp_path_factory):
    from trainer_utils import workspace

    return workspace(tmp_path_factory)


def per_rank_blocks(stdout: str) -> List[Dict[str, Dict[int, float]]]:
    """--timing-log-option all: each 'times across ranks (ms):' block as {timer: {rank: ms}}."""
    blocks = []
    for block in stdout.split("times across ranks (ms):")[1:]:
        out: Dict[str, Dict[int, float]] = {}
        name = None
        for line in block.splitlines()[1:]:
            m = re.match(r"^  (\S+):$", line)
            r = re.match(r"^     rank +(\d+): ([\d.]+)$", line)
            if m:
                name = m.group(1)
                out[name] = {}
            elif r and name:
                out[name][int(r.group(1))] = float(r.group(2))
            else:
                break
        blocks.append(out)
    return blocks


def minmax_names(stdout: str) -> List[set]:
    return [set(re.findall(r"^    (\S+) \.+: \(", block, re.M))
            for block in stdout.split("(min, max) time across ranks (ms):")[1:]]


def test_level_2_timers_nest_on_every_rank(ws, tmp_path):
    """PP=2 over 2 ranks, level 2, every rank's times: the pipeline's sends and receives are timed,
    and the nesting holds on each rank for each log interval."""
    from trainer_utils import assert_ok, base_args, run_trainer, tail

    tb = tmp_path / "tb"
    res = assert_ok(run_trainer(base_args(ws.data, pipeline_model_parallel_size=2, log_interval=4,
                                          timing_log_level=2, timing_log_option="all", log_timers_to_tensorboard=True,
                                          tensorboard_dir=tb, save=tmp_path / "ck", save_interval=6), nproc=2))
    blocks = per_rank_blocks(res.stdout)
    iteration_ms = [float(x) for x in re.findall(r"elapsed time per iteration \(ms\): ([\d.]+)", res.stdout)]
    assert len(blocks) == len(iteration_ms) == 3, tail(res.stdout)  # 12 iterations, a log line every 4
    slack = 1.0  # ms: timer bookkeeping between the nested intervals
    for times, step_ms in zip(blocks, iteration_ms):
        assert LEVEL_1 | LEVEL_2 | PIPELINE <= set(times), sorted(times)
        for rank in (0, 1):
            t = {name: by_rank.get(rank, 0.0) for name, by_rank in times.items()}
            assert t["forward-backward"] > 0 and t["optimizer"] > 0
            assert t["batch-generator"] <= t["forward-compute"] + slack
            assert t["forward-compute"] + t["backward-compute"] + t["all-grads-sync"] <= t["forward-backward"] + slack
            assert t["optimizer-inner-step"] <= t["optimizer"] + slack
        t0 = {name: by_rank.get(0, 0.0) for name, by_rank in times.items()}
        assert t0["forward-backward"] + t0["optimizer"] <= step_ms + slack, (t0, step_ms)
    # every rank saves the same common state (no dist_checkpointing warning at each save)
    assert "common state dict differs" not in res.stdout
    if importlib.util.find_spec("tensorboard"):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(tb))
        acc.Reload()
        steps = {e.step: e.value for e in acc.Scalars("forward-backward-time")}  # Megatron-LM's tag, seconds
        assert sorted(steps) == [4, 8, 12]
        assert all(0 < steps[s] * 1000 <= ms + slack for s, ms in zip((4, 8, 12), iteration_ms))


def test_level_1_in_the_shared_runs(ws):
    """The shared DP=2 distributed-optimizer run logs at level 1 (LOG_FLAGS): Megatron-LM's default
    min/max form, the level-1 timers and none of level 2."""
    from trainer_utils import assert_ok, distopt_run, tail

    res = assert_ok(distopt_run(ws))
    blocks = minmax_names(res.stdout)
    assert blocks and all(LEVEL_1 <= names and not names & (LEVEL_2 | PIPELINE) for names in blocks), tail(res.stdout)
    assert "common state dict differs" not in res.stdout


@pytest.mark.parametrize("argv, message", [
    (["--log-timers-to-tensorboard", "--timing-log-level", "1"],
     "--log-timers-to-tensorboard writes the step timers of --timing-log-level 1 or 2 into --tensorboard-dir: give "
     "both"),
    (["--log-timers-to-tensorboard", "--tensorboard-dir", "tb"],
     "--log-timers-to-tensorboard writes the step timers of --timing-log-level 1 or 2 into --tensorboard-dir: give "
     "both (now --timing-log-level 0)"),
])
def test_timer_flag_refusals(argv, message):
    with pytest.raises(SystemExit) as exc:
        validate(parse_args(["--data-path", "x", "--vocab-size", "256"] + argv), 1)
    assert str(exc.value.code).startswith(f"error: {message}"), exc.value.code
