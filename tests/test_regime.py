"""The regime-study runner and its report, end to end at toy size on the carried corpus.

Checks the runner's derived numbers against an independent reading of the metrics files it wrote:
final losses, the equal-loss speedup (linear interpolation of the baseline's validation curve) and
what one superposition step was worth, (baseline steps to TST's final loss - recovery steps) / sup.
"""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "experiments", "data", "stdlib_spm2k")


def _evals(path):
    recs = [json.loads(line) for line in open(path)]
    return sorted((r["iteration"], r) for r in recs if r.get("type") == "eval")


def _baseline_steps_to(evals, target):
    """First crossing of `target` by the baseline's validation curve, linearly interpolated."""
    pts = [(it, r["val_lm_loss"]) for it, r in evals]
    if pts[0][1] <= target:
        return float(pts[0][0])
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if y1 <= target:
            return x0 + (y0 - target) / (y0 - y1) * (x1 - x0)
    return None


def test_regime_runner_and_report_tiny(tmp_path):
    iters, s, r = 16, 2, 0.25
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "experiments/regime/run.py", "--out", str(tmp_path), "--data-path", DATA + "_text_document",
           "--tokenizer-model", DATA + ".model", "--widths", "32", "--layers", "1", "--seq-length", "32",
           "--global-batch-sizes", "4", "--micro-batch-size", "4", "--iters", str(iters), "--bag-sizes", str(s),
           "--ratios", str(r), "--lrs", "3e-3", "--evals", "4", "--eval-iters", "2", "--threads", "1"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["references"]["unigram_entropy"] > summary["references"]["count_model_mce"]["2"] > 0
    (row,) = summary["rows"]
    assert (row["width"], row["s"], row["r"], row["iters"], row["tokens_per_step"]) == (32, s, r, iters, 4 * 32)
    base = _evals(tmp_path / row["base_metrics"])
    tst = _evals(tmp_path / row["tst_metrics"])
    assert [it for it, _ in base] == [it for it, _ in tst] == [0, 4, 8, 12, 16]
    assert row["val_lm_tst"] == tst[-1][1]["val_lm_loss"] and row["val_lm_base"] == base[-1][1]["val_lm_loss"]
    assert abs(row["delta"] - (row["val_lm_tst"] - row["val_lm_base"])) < 1e-12
    # the bag loss reported is the evaluation at the switch (iteration 4 = r * iters), the last MCE one
    sup = int(r * iters)
    mce = {it: e["val_mce_loss"] for it, e in tst if "val_mce_loss" in e}
    assert sorted(mce) == [0, sup] and row["bag_loss_at_switch"] == mce[sup]
    assert "val_mce_loss" not in dict(base)[sup]
    steps = _baseline_steps_to(base, row["val_lm_tst"])
    if steps is None:
        assert row["speedup"] is None and row["transfer"] is None
    else:
        assert abs(row["speedup"] - steps / iters) < 1e-9
        assert abs(row["transfer"] - (steps - (iters - sup)) / sup) < 1e-9

    rep = subprocess.run([sys.executable, "experiments/regime/report.py", "--out", str(tmp_path)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stdout[-3000:] + rep.stderr[-3000:]
    table = (tmp_path / "report.md").read_text()
    assert f"| 32 | 128 | {iters} | 0.003 | 1234 | {s} | {r:g} | {row['val_lm_tst']:.3f} |" in table
    assert (tmp_path / "report.png").stat().st_size > 10_000
    # last column: mean training loss over the iterations in the last 10% (15 and 16 of 16)
    def late(path):
        recs = [json.loads(line) for line in open(path)]
        vals = [x["loss"] for x in recs if x.get("type") == "train" and x["iteration"] > 0.9 * iters]
        assert vals, "no training records in the last 10% of iterations"
        return sum(vals) / len(vals)
    t, b = late(tmp_path / row["tst_metrics"]), late(tmp_path / row["base_metrics"])
    assert f"| {t - b:+.3f} ({t:.3f} vs {b:.3f}) |" in table


def test_quick_is_one_pair():
    """`run.py --quick` (the <15-minute check of the study) trains exactly one equal-FLOPs pair:
    hidden 128, s = 4, r = 0.3, 300 iterations, one LR, one seed."""
    proc = subprocess.run([sys.executable, "experiments/regime/run.py", "--quick", "--dry-run"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines == ["baseline  w128 gbs16 it300 lr0.003 seed1234",
                     "tst       w128 gbs16 it300 lr0.003 seed1234 s4 r0.3",
                     "2 runs of 4 layers, seq 128, 10 evaluations each"], proc.stdout


def test_only_halves_then_summary_without_retraining(tmp_path):
    """--only base and --only tst train the two halves of a sweep (two processes can share the
    cores); the same command without --only then trains nothing and writes the summary."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "experiments/regime/run.py", "--out", str(tmp_path), "--data-path", DATA + "_text_document",
           "--tokenizer-model", DATA + ".model", "--widths", "32", "--layers", "1", "--seq-length", "32",
           "--global-batch-sizes", "4", "--micro-batch-size", "4", "--iters", "8", "--bag-sizes", "2",
           "--ratios", "0.25", "--lrs", "3e-3", "--evals", "2", "--eval-iters", "1", "--threads", "1"]
    outs = {}
    for only in ("base", "tst", None):
        proc = subprocess.run(cmd + (["--only", only] if only else []), cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        outs[only] = proc.stdout
        trained = sorted(d for d in os.listdir(tmp_path) if d.startswith("w32_"))
        if only == "base":
            assert trained == ["w32_gbs4_it8_lr0.003_seed1234_base"] and not (tmp_path / "summary.json").exists()
        if only == "tst":
            assert len(trained) == 2 and not (tmp_path / "summary.json").exists()
    assert "final val LM loss" not in outs[None]  # nothing retrained
    (row,) = json.load(open(tmp_path / "summary.json"))["rows"]
    assert row["val_lm_tst"] == _evals(tmp_path / row["tst_metrics"])[-1][1]["val_lm_loss"]
    # the same --out with a setting the run names do not hold: refused, not reported under it
    layers = cmd.index("--layers") + 1
    proc = subprocess.run(cmd[:layers] + ["2"] + cmd[layers + 1:], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode != 0 and "was trained with other settings: --num-layers 2 (was 1)" in proc.stderr, \
        proc.stdout[-2000:] + proc.stderr[-2000:]
