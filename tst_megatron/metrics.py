"""Run logging: Megatron-style console lines, a JSONL metrics file, optional TensorBoard / W&B.

The JSONL file is the contract with tools (`tools/plot_runs.py`): one JSON object per line,
`"type": "run"` first (run summary), then `"type": "train"` records every --log-interval and
`"type": "eval"` records at every evaluation.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


class RunLogger:
    """Writes on rank 0 only (the caller passes `enabled`)."""

    def __init__(self, enabled: bool, metrics_path: Optional[str], tensorboard_dir: Optional[str] = None,
                 wandb_project: Optional[str] = None, wandb_name: Optional[str] = None,
                 resume: bool = False):
        self.enabled = enabled
        self.metrics_path = metrics_path
        self._file = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        if metrics_path:
            os.makedirs(os.path.dirname(os.path.abspath(metrics_path)), exist_ok=True)
            self._file = open(metrics_path, "a" if resume else "w", buffering=1)
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise SystemExit("error: --tensorboard-dir needs the `tensorboard` package "
                                 "(pip install 'tst-megatron[tensorboard]')") from exc
            self._tb = SummaryWriter(log_dir=tensorboard_dir)
        if wandb_project:
            try:
                import wandb
            except ImportError as exc:
                raise SystemExit("error: --wandb-project needs the `wandb` package "
                                 "(pip install 'tst-megatron[wandb]')") from exc
            self._wandb = wandb.init(project=wandb_project, name=wandb_name, resume="allow")

    def print(self, line: str) -> None:
        if self.enabled:
            print(line, flush=True)

    def record(self, record: dict) -> None:
        if not self.enabled:
            return
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        step = record.get("iteration", 0)
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "iteration"}
        if self._tb is not None:
            prefix = "eval/" if record.get("type") == "eval" else "train/"
            for k, v in scalars.items():
                self._tb.add_scalar(prefix + k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            prefix = "eval/" if record.get("type") == "eval" else "train/"
            self._wandb.log({prefix + k: v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


class Throughput:
    """Interval timer for tokens/s and TFLOP/s between two log lines."""

    def __init__(self):
        self.start = time.time()
        self.last = self.start

    def lap(self) -> float:
        now = time.time()
        dt, self.last = now - self.last, now
        return max(dt, 1e-9)

    def elapsed(self) -> float:
        return time.time() - self.start


def stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
