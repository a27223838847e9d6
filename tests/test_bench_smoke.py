"""Smoke test of the two benchmarks (bench/): each runs end to end at a tiny size.

Timings at this size are noise, so only the machinery and the deterministic parts are checked:
the memory accounting (the paper's loop saves s [N, V] log-softmax outputs for backward, the fused
loss saves none), the token accounting of the phases (a superposition step consumes s times the
data of a recovery step) and that both phases train with finite losses.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_mce  # noqa: E402
import bench_throughput  # noqa: E402


# ------------------------------------------------------------------------------ pass / fail decision
# Made-up ratios and noise: the benchmarks' exit status must be non-zero when a target is missed by
# more than the measured noise (the smoke runs below pass --no-fail, so this is where it is checked).
def test_bench_mce_decision():
    T, M = bench_mce.TIME_TARGET, bench_mce.MEM_TARGET
    ok = dict(saved_ratio=0.01, peak_ratio=1.0)
    assert bench_mce.fused_failures(1.0, 0.0, **ok) == []
    # time: a miss within the noise passes, beyond it fails
    assert bench_mce.fused_failures(T * 1.04, 0.05, **ok) == []
    assert bench_mce.fused_failures(T * (1 + 0.05) * 1.001, 0.05, **ok) != []
    assert bench_mce.fused_failures(T * 1.001, 0.0, **ok) != []
    # memory has no noise allowance, whatever the time noise
    assert bench_mce.fused_failures(1.0, 0.5, saved_ratio=M * 1.001, peak_ratio=1.0) != []
    assert bench_mce.fused_failures(1.0, 0.5, saved_ratio=0.0, peak_ratio=M * 1.001) != []
    assert bench_mce.fused_failures(1.0, 0.5, saved_ratio=M, peak_ratio=M) == []
    assert len(bench_mce.fused_failures(2 * T, 0.0, saved_ratio=2.0, peak_ratio=2.0)) == 3
    nan = float("nan")  # a ratio that could not be measured (a 0-byte baseline) is no pass
    assert len(bench_mce.fused_failures(nan, 0.0, saved_ratio=nan, peak_ratio=nan)) == 3
    # the exit status follows the failures (and --no-fail)
    assert bench_mce.exit_status([{"failures": []}, {"failures": []}]) == 0
    assert bench_mce.exit_status([{"failures": []}, {"failures": ["x"]}]) == 1
    assert bench_mce.exit_status([{"failures": ["x"]}], no_fail=True) == 0


def test_bench_throughput_decision():
    T = bench_throughput.TARGET
    assert bench_throughput.throughput_failures(1.0, 0.0) == []
    assert bench_throughput.throughput_failures(T, 0.0) == []
    assert bench_throughput.throughput_failures(T * 0.999, 0.0) != []
    # below the target but within the noise passes; beyond it fails
    assert bench_throughput.throughput_failures(T * 0.97, 0.05) == []
    assert bench_throughput.throughput_failures(T * (1 - 0.05) * 0.999, 0.05) != []
    assert bench_throughput.exit_status([{"failures": []}]) == 0
    assert bench_throughput.exit_status([{"failures": []}, {"failures": ["x"]}]) == 1
    assert bench_throughput.exit_status([{"failures": ["x"]}], no_fail=True) == 0


def test_bench_mce_tiny(tmp_path):
    out = tmp_path / "mce.json"
    rc = bench_mce.main(["--device", "cpu", "--N", "64", "--V", "1000", "--s", "1", "4", "--reps", "2",
                         "--json", str(out), "--no-fail"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert [r["s"] for r in data["results"]] == [1, 4]
    for r in data["results"]:
        s = r["s"]
        assert not r["skipped"]
        for clock in ("wall", "cpu"):
            for name in ("fused", "loop", "ce"):
                assert math.isfinite(r[clock]["ratio"][name]) and r[clock]["ratio"][name] > 0
        # the fused loss equals the paper's loop
        assert r["max_abs_diff_fused_vs_loop"] < 1e-4
        # one log-softmax output [N, V] fp32 per cross-entropy is saved for backward
        assert r["saved_bytes"]["ce"] >= 64 * 1000 * 4
        assert r["saved_ratio"]["loop"] == pytest.approx(s, rel=0.02)
        assert r["saved_ratio"]["fused"] < 0.1
        # and the fused loss never peaks above one cross-entropy
        assert r["peak_bytes"]["ce"] > 0 and r["peak_ratio"]["fused"] <= bench_mce.MEM_TARGET


def test_bench_throughput_tiny(tmp_path):
    out = tmp_path / "tp.json"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_throughput.py"), "--quick", "--s", "2",
                           "--json", str(out), "--no-fail"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    (r,) = data["results"]
    L, gbs = data["config"]["seq_length"], data["config"]["global_batch_size"]
    assert r["s"] == 2
    assert r["tokens_per_step"] == {"superposition": gbs * L * 2, "recovery": gbs * L}
    for phase in ("superposition", "recovery"):
        assert len(r["steps"][phase]["cpu"]) == data["config"]["blocks"] * data["config"]["block"]
        assert all(math.isfinite(x) for x in r["steps"][phase]["loss"])
    for clock in ("wall", "cpu"):
        assert math.isfinite(r[clock]["R"]) and r[clock]["R"] > 0
    assert "R = sup/(s*rec)" in proc.stdout
