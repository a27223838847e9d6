"""--profile: Megatron-LM's step-window profiling, on the ranks in --profile-ranks.

With --use-pytorch-profiler, torch.profiler records iterations [--profile-step-start,
--profile-step-end) and writes a trace per rank into --tensorboard-dir (TensorBoard's profile
plugin and chrome://tracing read it). Without it, the window is bracketed by cudaProfilerStart/Stop
for `nsys profile --capture-range=cudaProfilerApi`, as in Megatron-LM (CUDA only).
"""
from __future__ import annotations

from typing import Optional

import torch


class StepProfiler:
    def __init__(self, enabled: bool, use_pytorch_profiler: bool, start: int, end: int, trace_dir: Optional[str]):
        self.enabled, self.torch_profiler, self.start, self.end = enabled, use_pytorch_profiler, start, end
        self.trace_dir = trace_dir
        self._prof = None
        self._nvtx = None

    def before_step(self, iteration: int) -> None:
        """Called with the 0-based iteration about to run."""
        if not self.enabled or iteration != self.start:
            return
        if self.torch_profiler:
            self._prof = torch.profiler.profile(
                on_trace_ready=torch.profiler.tensorboard_trace_handler(self.trace_dir), record_shapes=True,
                with_stack=True)
            self._prof.start()
        else:
            torch.cuda.cudart().cudaProfilerStart()
            self._nvtx = torch.autograd.profiler.emit_nvtx(record_shapes=True)
            self._nvtx.__enter__()

    def after_step(self, iteration: int) -> None:
        """Called with the number of iterations done."""
        if not self.enabled or iteration != self.end:
            return
        self.stop()

    def stop(self) -> None:
        if self._prof is not None:
            self._prof.stop()  # writes the trace
            self._prof = None
        if self._nvtx is not None:
            self._nvtx.__exit__(None, None, None)
            torch.cuda.cudart().cudaProfilerStop()
            self._nvtx = None
