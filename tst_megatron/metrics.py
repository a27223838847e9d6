"""Run logging: Megatron-style console lines, a JSONL metrics file, optional TensorBoard / W&B.

The JSONL file is the contract with tools (`tools/plot_runs.py`): one JSON object per line,
`"type": "run"` first (run summary), then `"type": "train"` records every --log-interval and
`"type": "eval"` records at every evaluation, one `"type": "test"` record at the end of training
(when the test split has documents). The format is spelled out in `metrics_io`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

from .metrics_io import MetricsWriter


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


class RunLogger:
    """Writes on rank 0 only (the caller passes `enabled`)."""

    def __init__(self, enabled: bool, metrics_path: Optional[str], tensorboard_dir: Optional[str] = None,
                 wandb_project: Optional[str] = None, wandb_name: Optional[str] = None,
                 resume: bool = False, tensorboard_purge_step: Optional[int] = None):
        """tensorboard_purge_step: a resume's first step; TensorBoard drops the events a run wrote
        from there on before it was interrupted (they are logged again), as the metrics file does."""
        self.enabled = enabled
        self.metrics_path = metrics_path
        self._file: Optional[MetricsWriter] = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        if metrics_path:
            self._file = MetricsWriter(metrics_path, append=resume)
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise SystemExit("error: --tensorboard-dir needs the `tensorboard` package "
                                 "(pip install 'tst-megatron[tensorboard]')") from exc
            self._tb = SummaryWriter(log_dir=tensorboard_dir, purge_step=tensorboard_purge_step)
        if wandb_project:
            try:
                import wandb
            except ImportError as exc:
                raise SystemExit("error: --wandb-project needs the `wandb` package "
                                 "(pip install 'tst-megatron[wandb]')") from exc
            self._wandb = wandb.init(project=wandb_project, name=wandb_name, resume="allow")

    @property
    def tensorboard_writer(self):
        """The SummaryWriter (rank 0 with --tensorboard-dir), else None."""
        return self._tb

    def print(self, line: str) -> None:
        if self.enabled:
            print(line, flush=True)

    def record(self, record: dict) -> None:
        if not self.enabled:
            return
        if self._file is not None:
            self._file.write(record)
        step = record.get("iteration", 0)
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "iteration"}
        if self._tb is not None:
            prefix = f"{record['type']}/" if record.get("type") in ("eval", "test") else "train/"
            for k, v in scalars.items():
                self._tb.add_scalar(prefix + k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            prefix = f"{record['type']}/" if record.get("type") in ("eval", "test") else "train/"
            self._wandb.log({prefix + k: v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


class Stopwatch:
    """Wall-clock seconds since training started in this process (elapsed and ETA in the logs)."""

    def __init__(self):
        self.start = time.time()

    def elapsed(self) -> float:
        return time.time() - self.start


@dataclass
class IntervalStats:
    """What happened between two log lines: sums the log line turns into means and rates.

    `time` counts training steps only (no evaluation or checkpoint time), so tokens/s and
    TFLOP/s describe the step itself.
    """

    loss: float = 0.0
    # the grad norm of the interval's last step that has one (as Megatron-LM logs it: an average
    # would hide the spike a user watches for); an fp16 overflow or non-finite step has none
    grad_norm: float = float("nan")
    finite_steps: int = 0  # steps whose loss entered the sums (a skipped non-finite step does not)
    steps: int = 0
    tokens: int = 0  # raw data tokens consumed
    positions: int = 0  # model positions processed
    time: float = 0.0
    overflow_skips: int = 0  # --fp16 steps the loss scaler skipped (overflowing gradients)
    microbatches: int = 0  # this rank's micro-batches (what the MoE router's loss tracker summed over)

    def add(self, loss: float, grad_norm: float, finite: bool, tokens: int, positions: int, seconds: float) -> None:
        if finite:
            self.loss += loss
            self.finite_steps += 1
            if math.isfinite(grad_norm):
                self.grad_norm = grad_norm
        self.steps += 1
        self.tokens += tokens
        self.positions += positions
        self.time += seconds

    def mean_loss(self) -> float:
        return self.loss / self.finite_steps if self.finite_steps else float("nan")

    def last_grad_norm(self) -> float:
        return self.grad_norm
