"""The GPU evidence script, end to end at toy size on CPU (so it is ready before GPU time is spent)."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_equal_flops_script_tiny_on_cpu(tmp_path):
    env = dict(os.environ, TINY="1", ITERS="20", PYTHON=sys.executable, OUT_DIR=str(tmp_path),
               PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", "experiments/gpu_equal_flops.sh"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("baseline", "tst"):
        recs = [json.loads(line) for line in open(tmp_path / f"{name}.jsonl")]
        evals = [r for r in recs if r.get("type") == "eval"]
        assert evals and evals[-1]["iteration"] == 20
        phases = {r["phase"] for r in recs if r.get("type") == "train"}
        assert phases == ({"superposition", "recovery"} if name == "tst" else {"recovery"})
    assert (tmp_path / "gpu_equal_flops.png").stat().st_size > 10_000
    summary = (tmp_path / "summary.txt").read_text()
    assert "baseline: final val LM loss" in summary and "tst: final val LM loss" in summary
