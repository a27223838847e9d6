"""Megatron-LM's step timers: --timing-log-level, --timing-log-option, --log-timers-to-tensorboard.

The timers are megatron-core's own (`megatron.core.timers.Timers`): handed to the schedules, the
gradient finalisation and the optimizer through their configs, they time what those already
bracket -- forward-backward and the grad all-reduce at level 1, each micro-batch's compute and the
pipeline sends/receives at level 2. The trainer adds the two Megatron-LM times itself ('optimizer'
around the step, 'batch-generator' around each micro-batch's fetch). On CPU they run as shipped
once `cpu.enable_cpu_support()` has made `torch.cuda.synchronize` a no-op; Gloo gathers their
times (`all_gather_into_tensor`).

Every --log-interval the times, summed over the interval and divided by its steps (ms per
iteration), are printed under the log line in Megatron-LM's form ("(min, max) time across ranks
(ms):" by default) and, with --log-timers-to-tensorboard, written as `<name>-time` scalars (the
max over ranks), as Megatron-LM writes them. Level 0 (the default) builds no timers at all.
"""
from __future__ import annotations

from typing import Optional

# Megatron-LM's list (training.py), in its order, with the two level-1 names megatron-core 0.16
# times in finalize_model_grads: what is logged when it was timed.
TIMERS_TO_LOG = [
    "forward-backward", "forward-compute", "backward-compute", "batch-generator",
    "forward-recv", "forward-send", "backward-recv", "backward-send",
    "forward-send-forward-recv", "forward-send-backward-recv", "backward-send-forward-recv",
    "backward-send-backward-recv", "forward-backward-send-forward-backward-recv",
    "layernorm-grads-all-reduce", "non-tensor-parallel-grads-all-reduce", "conditional-embedder-grads-all-reduce",
    "embedding-grads-all-reduce", "all-grads-sync", "params-all-gather",
    "optimizer-copy-to-main-grad", "optimizer-unscale-and-check-inf", "optimizer-clip-main-grad",
    "optimizer-count-zeros", "optimizer-inner-step", "optimizer-copy-main-to-model-params", "optimizer",
]


def build_timers(log_level: int, log_option: str):
    """megatron-core's Timers at that level, or None at level 0 (nothing timed, no barriers)."""
    if log_level == 0:
        return None
    from megatron.core.timers import Timers

    return Timers(log_level, log_option)


class StepTimes:
    """What the log line prints and writes of the timers; collective (every rank calls it at the
    same log line: the times are all-gathered)."""

    def __init__(self, timers, tensorboard: bool):
        self.timers = timers
        self.tensorboard = tensorboard

    def report(self, steps: int, iteration: int, writer) -> Optional[str]:
        """The interval's times (ms per iteration over `steps` steps), reset for the next one;
        `writer` (rank 0's SummaryWriter, else None) gets the TensorBoard scalars."""
        if self.timers is None or steps < 1:
            return None
        if self.tensorboard:
            self.timers.write(TIMERS_TO_LOG, writer, iteration, normalizer=steps, reset=False)
        return self.timers.get_all_timers_string(TIMERS_TO_LOG, normalizer=steps, reset=True)
