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
