"""The GPU evidence script, end to end at toy size on CPU (so it is ready before GPU time is spent)."""
import json
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_equal_flops_script_tiny_on_cpu(tmp_path):
    # Two TST runs and the baseline side by side, as the GPU session launches them.
    env = dict(os.environ, TINY="1", ITERS="20", PYTHON=sys.executable, OUT_DIR=str(tmp_path),
               PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", TST_RUNS="4:0.3 2:0.2", PARALLEL="1")
    proc = subprocess.run(["bash", "experiments/gpu_equal_flops.sh"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = ("baseline", "tst_s4_r0.3", "tst_s2_r0.2")
    for name in runs:
        recs = [json.loads(line) for line in open(tmp_path / f"{name}.jsonl")]
        evals = [r for r in recs if r.get("type") == "eval"]
        assert evals and evals[-1]["iteration"] == 20
        phases = {r["phase"] for r in recs if r.get("type") == "train"}
        assert phases == ({"superposition", "recovery"} if name.startswith("tst") else {"recovery"})
        assert (tmp_path / f"cache_{name}").is_dir()  # side by side: an index cache of its own
    assert (tmp_path / "gpu_equal_flops.png").stat().st_size > 10_000
    summary = (tmp_path / "summary.txt").read_text()
    for name in runs:
        assert f"{name}: final val LM loss" in summary
    for name in runs[1:]:  # each TST run compared with the baseline
        assert re.search(rf"  {name}: final val_lm_loss .* at iteration 20: (not reached|baseline reaches)", summary)


def test_gpu_smoke_script_runs_a_case_on_cpu(tmp_path):
    """experiments/gpu_smoke.py (what a lent GPU runs first) works end to end here: one case, its
    table line and smoke.json (so no device time is spent finding a broken script)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "experiments/gpu_smoke.py", "--out", str(tmp_path), "--only", "tst-mode input"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[gpu_smoke] ok   tst-mode input: 12 iterations" in proc.stdout
    summary = json.loads((tmp_path / "smoke.json").read_text())
    assert summary["failed"] == 0 and [c["case"] for c in summary["cases"]] == ["tst-mode input"]
    assert summary["cases"][0]["iterations"] == 12 and summary["resume_max_abs_loss_diff"] is None
