#!/usr/bin/env python
"""Compare training runs: validation loss vs iterations, data tokens and wall-clock, and the
equal-loss speedup of each TST run over a baseline.

    python tools/plot_runs.py runs/baseline/metrics.jsonl runs/tst/metrics.jsonl \\
        --labels baseline "TST s=6" --output runs/compare.png

Each input is a metrics JSONL file (format: `tst_megatron/metrics_io.py`). One PNG with three
panels; solid lines with markers are validation LM loss, lighter lines training loss (during the
superposition phase that is the multi-hot CE over the next bag, so it is not comparable with the
LM loss); a dashed vertical line marks where each TST run switches to recovery.

Equal-loss speedup (the paper's "baseline needs 36k steps for 2.677" measure): the iterations the
baseline needs to reach a run's final validation LM loss, interpolated linearly between its
evaluation points, divided by that run's iterations. The same ratio in wall-clock seconds and in
data tokens is printed beside it.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Dict, List, Optional, Sequence

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from tst_megatron.metrics_io import RunMetrics, read_metrics  # noqa: E402

X_AXES = (("iteration", "iterations"), ("data_tokens", "data tokens"),
          ("elapsed_s", "wall-clock (s)"))


def equal_loss_speedup(baseline_iters: Sequence[float], baseline_losses: Sequence[float],
                       target_loss: float, target_iters: float) -> Optional[float]:
    """Baseline iterations to first reach `target_loss`, divided by `target_iters`.

    The baseline curve is its evaluation points sorted by iteration, joined by straight lines;
    the crossing is the first segment that goes from above the target to at or below it. If the
    first point is already at or below the target there is nothing to interpolate from and that
    point's iteration is used. Returns None when the baseline never gets that low ("not reached").
    Works for any monotone x (iterations, seconds, tokens). Non-finite losses are ignored.
    """
    if len(baseline_iters) != len(baseline_losses):
        raise ValueError(f"equal_loss_speedup: {len(baseline_iters)} iterations but "
                         f"{len(baseline_losses)} losses")
    if not (target_iters > 0):
        raise ValueError(f"equal_loss_speedup: target_iters must be > 0 (got {target_iters})")
    points = sorted((float(x), float(y)) for x, y in zip(baseline_iters, baseline_losses)
                    if math.isfinite(float(y)))
    if not points:
        return None
    x_prev, y_prev = points[0]
    if y_prev <= target_loss:
        return x_prev / target_iters
    for x, y in points[1:]:
        if y <= target_loss:
            crossing = x_prev + (y_prev - target_loss) / (y_prev - y) * (x - x_prev)
            return crossing / target_iters
        x_prev, y_prev = x, y
    return None


def get_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("metrics", nargs="+", help="metrics JSONL files, one per run")
    parser.add_argument("--labels", nargs="+", default=None,
                        help="one label per file (default: the run record's name, else file name)")
    parser.add_argument("--output", default="runs_comparison.png", help="PNG to write (default: %(default)s)")
    parser.add_argument("--baseline", type=int, default=None,
                        help="index of the baseline run (default: the first run without "
                             "superposition, else the first)")
    parser.add_argument("--title", default=None, help="figure title")
    return parser.parse_args(argv)


def _fail(message: str) -> SystemExit:
    return SystemExit(f"plot_runs.py: error: {message}")


def pick_baseline(runs: Sequence[RunMetrics], index: Optional[int]) -> int:
    if index is not None:
        if not 0 <= index < len(runs):
            raise _fail(f"--baseline {index} is out of range: there are {len(runs)} runs "
                        f"(indices 0..{len(runs) - 1})")
        return index
    return next((i for i, run in enumerate(runs) if not run.uses_superposition), 0)


def _series(records: Sequence[dict], x_key: str, y_key: str):
    xs, ys = [], []
    for r in records:
        x, y = r.get(x_key), r.get(y_key)
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and math.isfinite(y):
            xs.append(x)
            ys.append(y)
    return xs, ys


def _eval_with_fallback(run: RunMetrics) -> List[dict]:
    """Eval records, with data_tokens/elapsed_s filled from the train record of the same
    iteration when the trainer left them out."""
    by_iter = {r.get("iteration"): r for r in run.train}
    out = []
    for r in run.evals:
        r = dict(r)
        for key in ("data_tokens", "elapsed_s"):
            if key not in r and key in by_iter.get(r.get("iteration"), {}):
                r[key] = by_iter[r["iteration"]][key]
        out.append(r)
    return out


def plot(runs: Sequence[RunMetrics], labels: Sequence[str], output: str,
         title: Optional[str] = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    eval_losses: List[float] = []
    for i, (run, label) in enumerate(zip(runs, labels)):
        color = colors[i % len(colors)]
        evals = _eval_with_fallback(run)
        switch = run.phase_switch()
        for ax, (x_key, _) in zip(axes, X_AXES):
            tx, ty = _series(run.train, x_key, "loss")
            if tx:
                ax.plot(tx, ty, color=color, alpha=0.3, linewidth=0.8)
            ex, ey = _series(evals, x_key, "val_lm_loss")
            if ex:
                ax.plot(ex, ey, color=color, marker="o", markersize=3, linewidth=1.6, label=label)
                eval_losses.extend(ey)
            if switch is not None and isinstance(switch.get(x_key), (int, float)):
                ax.axvline(switch[x_key], color=color, linestyle="--", linewidth=1.0, alpha=0.8)
    for ax, (_, xlabel) in zip(axes, X_AXES):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        if eval_losses:  # early training loss would squash the curves that matter
            lo, hi = min(eval_losses), max(eval_losses)
            pad = 0.05 * max(hi - lo, 1e-3)
            ax.set_ylim(lo - 4 * pad, hi + pad)
    axes[0].set_title("validation LM loss vs iterations")
    axes[1].set_title("vs data tokens")
    axes[2].set_title("vs wall-clock time")
    axes[0].legend(loc="upper right", fontsize=8)
    fig.suptitle(title or "validation LM loss (solid), training loss (light), "
                          "phase switch (dashed)", fontsize=10)
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(output))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)


def _ratio_text(baseline: List[dict], key: str, target_loss: float, target_x) -> str:
    xs, ys = _series(baseline, key, "val_lm_loss")
    if not xs or not isinstance(target_x, (int, float)) or target_x <= 0:
        return "n/a"
    r = equal_loss_speedup(xs, ys, target_loss, target_x)
    return "not reached" if r is None else f"{r:.2f}x"


def speedups(runs: Sequence[RunMetrics], labels: Sequence[str], base: int) -> Dict[str, Optional[float]]:
    """Print and return the equal-loss iteration speedup of each run over runs[base]."""
    base_evals = _eval_with_fallback(runs[base])
    bx, by = _series(base_evals, "iteration", "val_lm_loss")
    out: Dict[str, Optional[float]] = {}
    print(f"baseline: {labels[base]}")
    for i, (run, label) in enumerate(zip(runs, labels)):
        if i == base:
            continue
        final = run.final_eval()
        if final is None or not bx or not final.get("iteration"):
            print(f"  {label}: no validation loss to compare")
            out[label] = None
            continue
        final = dict(final)
        target = final["val_lm_loss"]
        s = equal_loss_speedup(bx, by, target, final["iteration"])
        out[label] = s
        fallback = {r.get("iteration"): r for r in run.train}.get(final["iteration"], {})
        wall = _ratio_text(base_evals, "elapsed_s", target,
                           final.get("elapsed_s", fallback.get("elapsed_s")))
        data = _ratio_text(base_evals, "data_tokens", target,
                           final.get("data_tokens", fallback.get("data_tokens")))
        if s is None:
            print(f"  {label}: final val_lm_loss {target:.4f} at iteration {final['iteration']}: "
                  f"not reached by the baseline (best {min(by):.4f})")
        else:
            print(f"  {label}: final val_lm_loss {target:.4f} at iteration {final['iteration']}; "
                  f"baseline reaches it at iteration {s * final['iteration']:.0f} -> "
                  f"equal-loss speedup {s:.2f}x in iterations (wall-clock {wall}, "
                  f"data tokens {data})")
    return out


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    args = get_args(argv)
    runs = []
    for path in args.metrics:
        try:
            runs.append(read_metrics(path))
        except (OSError, ValueError) as exc:
            raise _fail(str(exc)) from None
    for run in runs:
        if not run.evals and not run.train:
            raise _fail(f"{run.path} holds no train or eval records")
    if args.labels is not None and len(args.labels) != len(runs):
        raise _fail(f"--labels has {len(args.labels)} entries for {len(runs)} metrics files")
    labels = list(args.labels) if args.labels else [run.name for run in runs]
    labels = [f"{label} #{i}" if labels.count(label) > 1 else label for i, label in enumerate(labels)]
    base = pick_baseline(runs, args.baseline)

    try:
        plot(runs, labels, args.output, args.title)
    except OSError as exc:
        raise _fail(f"--output {args.output}: cannot write it ({exc.strerror or exc}); give a writable path") from None
    print(f"wrote {args.output}")
    for run, label in zip(runs, labels):
        final = run.final_eval()
        switch = run.phase_switch()
        tst = "no superposition"
        if run.uses_superposition:
            tst = f"TST s={run.meta.get('tst_bag_size', '?')}, " + (
                f"switch at iteration {switch['iteration']}" if switch else "no phase switch yet")
        loss = f"final val_lm_loss {final['val_lm_loss']:.4f} at iteration {final.get('iteration')}" \
            if final else "no eval records"
        print(f"  {label}: {tst}; {loss}")
    result = {"output": args.output, "baseline": base, "speedups": {}}
    if len(runs) > 1:
        result["speedups"] = speedups(runs, labels, base)
    return result


if __name__ == "__main__":
    main()
