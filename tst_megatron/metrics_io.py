"""The metrics JSONL format: one JSON object per line, written by the trainer, read by tools.

Records, told apart by "type":
- "run" (optional, first): `name`, `tst_bag_size`, `superposition_iters`, `superposition_samples`,
  any other settings;
- "train": `iteration`, `phase` ("superposition" | "recovery"), `loss`, `lr`, `grad_norm`,
  `data_tokens`, `tokens_per_s`, `elapsed_s`, `consumed_samples`, `global_batch_size` (the
  step's: it grows under --rampup-batch-size);
- "eval": `iteration`, `val_lm_loss`, `val_mce_loss` (evaluations up to and at the switch;
  `val_bag_input_lm_loss` instead under --tst-mode input, whose superposition targets are next
  tokens), `data_tokens`, `elapsed_s`;
- "test" (once, at the end of training, when the --split gives the test split documents):
  `iteration`, `test_lm_loss`, `test_lm_ppl`, `data_tokens`, `elapsed_s`.

`data_tokens` counts the input tokens consumed so far: L*s per superposition sample in the full and
input modes (a TST step consumes s times more than a baseline step), L per sample otherwise. (The
data stream advances a little further: a window's last bag, or in output mode its s-1 look-ahead
tokens, serve only as targets.) `elapsed_s` is training wall-clock seconds since the run started, carried across resumes
in the checkpoint (time lost between a checkpoint and a crash, and time waiting in a queue, do
not count). Records without "type" (older
files) are classified by their fields. Having the format in one module keeps writer and readers
(`tools/plot_runs.py`) from drifting apart.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


class MetricsWriter:
    """Append-only JSONL writer, flushed per record so a crashed run still leaves its curve.

    Call it on one rank only (e.g. the last pipeline stage's data-parallel rank 0).
    """

    def __init__(self, path: str, run: Optional[Dict[str, Any]] = None, append: bool = False):
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        self.path = path
        self._file = open(path, "a" if append else "w", encoding="utf-8")
        if run is not None:
            self.write({"type": "run", **run})

    def write(self, record: Dict[str, Any]) -> None:
        self._file.write(json.dumps(record, default=_jsonable) + "\n")
        self._file.flush()

    def train(self, **fields: Any) -> None:
        self.write({"type": "train", **fields})

    def eval(self, **fields: Any) -> None:
        self.write({"type": "eval", **fields})

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def metrics_run_id(path: str) -> Optional[str]:
    """The run_id of the first "run" record of a metrics file (None: none, or written before ids)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("type") == "run":
                return rec.get("run_id")
    return None


def truncate_metrics(path: str, iteration: int, keep_evals_at_end: bool = True,
                     drop_later: bool = True) -> None:
    """Drop the records logged after `iteration` (atomically): a run resumed from the checkpoint of
    that iteration logs them again, and a curve must not hold two versions of one step.
    keep_evals_at_end=False also drops the evaluation records *at* `iteration` (a run resumed at
    its last iteration evaluates it again). drop_later=False keeps the records after `iteration`
    (a --skip-train evaluation of an older checkpoint replaces that checkpoint's evaluation only)."""
    keep = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:  # a line cut by a crash mid-write
                continue
            it = rec.get("iteration", 0)
            if rec.get("type") in ("eval", "test") and it == iteration and not keep_evals_at_end:
                continue
            if rec.get("type") == "run" or it <= iteration or not drop_later:
                keep.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    """Tensors and numpy scalars -> Python numbers (json.dumps calls this for unknown types)."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"metrics value of type {type(value).__name__} is not JSON serializable")


@dataclass
class RunMetrics:
    """One run's records, split by type, in file order."""

    path: str
    meta: Dict[str, Any] = field(default_factory=dict)
    train: List[Dict[str, Any]] = field(default_factory=list)
    evals: List[Dict[str, Any]] = field(default_factory=list)
    tests: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The run record's name, else the file name, else (for the trainer's default
        `<save>/metrics.jsonl`) the run directory's name."""
        if self.meta.get("name"):
            return str(self.meta["name"])
        path = os.path.abspath(self.path)
        stem = os.path.splitext(os.path.basename(path))[0]
        return os.path.basename(os.path.dirname(path)) or stem if stem == "metrics" else stem

    @property
    def uses_superposition(self) -> bool:
        """True when the run spent any iterations in the superposition phase."""
        if any(r.get("phase") == "superposition" for r in self.train):
            return True
        bag = self.meta.get("tst_bag_size") or 1
        iters = self.meta.get("superposition_iters") or 0
        return bag > 1 and iters > 0

    def phase_switch(self) -> Optional[Dict[str, Any]]:
        """Where the run switched to recovery (None for a baseline): iteration, data tokens, time.

        The run record's superposition_iters is exact; data tokens follow from its superposition
        samples (else iterations x global batch; s*L tokens per superposition sample) and the time is interpolated between the neighbouring train records.
        Without a run record, the first recovery training record after superposition ones.
        """
        iters = self.meta.get("superposition_iters")
        if iters and self.train and max(r.get("iteration", 0) for r in self.train) < iters:
            return None  # a run stopped (or still running) before its switch
        if self.uses_superposition and iters:
            point: Dict[str, Any] = {"iteration": iters}
            gbs, seq, s = (self.meta.get(k) for k in ("global_batch_size", "seq_length", "tst_bag_size"))
            samples = self.meta.get("superposition_samples") or (iters * gbs if gbs else None)
            if samples and seq and s:
                per_sample = seq * s if self.meta.get("tst_mode", "full") in ("full", "input") else seq
                point["data_tokens"] = samples * per_sample
            before = [r for r in self.train if r.get("iteration", 0) <= iters and "elapsed_s" in r]
            after = [r for r in self.train if r.get("iteration", 0) > iters and "elapsed_s" in r]
            if before and after:
                a, b = before[-1], after[0]
                frac = (iters - a["iteration"]) / max(b["iteration"] - a["iteration"], 1)
                point["elapsed_s"] = a["elapsed_s"] + frac * (b["elapsed_s"] - a["elapsed_s"])
            return point
        seen_superposition = False
        for record in self.train:
            phase = record.get("phase")
            if phase == "superposition":
                seen_superposition = True
            elif phase == "recovery" and seen_superposition:
                return record
        return None

    def final_eval(self) -> Optional[Dict[str, Any]]:
        finite = [r for r in self.evals if _finite(r.get("val_lm_loss"))]
        return finite[-1] if finite else None


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _record_type(record: Dict[str, Any]) -> Optional[str]:
    kind = record.get("type")
    if kind in ("run", "train", "eval", "test"):
        return kind
    if kind is None:
        if "val_lm_loss" in record:
            return "eval"
        if "loss" in record and "iteration" in record:
            return "train"
    return None


def read_metrics(path: str) -> RunMetrics:
    """Parse a metrics file. A truncated last line (run still writing) is skipped with a warning;
    any other malformed line is an error naming the file and line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"metrics file {path!r} does not exist")
    run = RunMetrics(path=path)
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            if i == last:
                warnings.warn(f"{path}:{i + 1}: skipping an incomplete last line ({exc})")
                continue
            raise ValueError(f"{path}:{i + 1}: malformed metrics record: {exc}") from None
        kind = _record_type(record)
        if kind == "run":
            run.meta.update(record)
        elif kind == "train":
            run.train.append(record)
        elif kind == "eval":
            run.evals.append(record)
        elif kind == "test":
            run.tests.append(record)
    return run
