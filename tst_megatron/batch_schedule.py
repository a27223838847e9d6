"""The global batch of every step: constant, or Megatron-LM's --rampup-batch-size ramp.

`--rampup-batch-size START INCREMENT RAMP_SAMPLES` starts the run at a global batch of START and
raises it by INCREMENT, in equal slices of the first RAMP_SAMPLES consumed samples, up to
--global-batch-size (GPT-3's recipe). The trainer steps megatron-core's own calculator (the
global one behind `get_num_microbatches()`), updated with the consumed samples before every
step, as Megatron-LM does.

This plan asks a private instance of the same megatron-core class, so that what the trainer
decides before the first step -- how many iterations --train-samples makes, where the TST
superposition samples of the data stream end -- agrees with what the steps will consume.
"""
from __future__ import annotations

from typing import Optional, Sequence


class BatchSchedule:
    def __init__(self, global_batch_size: int, rampup: Optional[Sequence[int]] = None,
                 micro_batch_size: int = 1, data_parallel_size: int = 1):
        self.global_batch_size = global_batch_size
        self.rampup = tuple(int(v) for v in rampup) if rampup else None
        self._calc = None
        if self.rampup is not None:
            from megatron.core.num_microbatches_calculator import RampupBatchsizeNumMicroBatchesCalculator

            start, increment, ramp_samples = self.rampup
            self._calc = RampupBatchsizeNumMicroBatchesCalculator(
                global_batch_size, micro_batch_size, data_parallel_size, decrease_batch_size_if_needed=False,
                rank=-1, start_global_batch_size=start, batch_size_increment=increment, ramup_samples=ramp_samples)

    @property
    def ramp_samples(self) -> int:
        return self.rampup[2] if self.rampup else -1

    def batch_at(self, consumed_samples: int) -> int:
        """The global batch of the step that starts after `consumed_samples`."""
        if self._calc is None:
            return self.global_batch_size
        self._calc.update(consumed_samples, consistency_check=False)
        return self._calc.get_current_global_batch_size()

    def samples_in(self, consumed_samples: int, steps: int) -> int:
        """Samples that `steps` steps consume, starting after `consumed_samples`."""
        total = 0
        while steps > 0 and consumed_samples + total <= self.ramp_samples:  # the ramp: step by step
            total += self.batch_at(consumed_samples + total)
            steps -= 1
        return total + max(steps, 0) * self.global_batch_size

    def iterations_for(self, train_samples: int) -> int:
        """--train-samples in iterations, as Megatron-LM counts them: the ramp's steps (the last one
        may pass train_samples), then whole global batches of what is left (a partial last batch
        is dropped)."""
        iterations = consumed = 0
        while consumed <= self.ramp_samples and consumed <= train_samples:
            consumed += self.batch_at(consumed)
            iterations += 1
        return iterations + max(train_samples - consumed, 0) // self.global_batch_size
