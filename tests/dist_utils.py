"""Helpers for tests that need torch.distributed / megatron-core parallel state.

* `init_single_process()` -- a 1-rank Gloo process group (in-memory store, no port) and megatron's
  parallel state with every parallel size 1, for single-process tests in the pytest process.
* `launch(scenario, outdir, nproc)` -- run `tests/workers/model_worker.py <scenario> <outdir>` as
  `nproc` real processes through `python -m torch.distributed.run`; fails the calling test with
  the workers' output when they exit non-zero or time out; returns each rank's result dict.
* `check_records(results, expected)` -- asserts the comparisons the workers recorded.
* `reference_mce`, `make_bag_case` -- the paper's loop reference for the multi-hot CE and random
  test cases; shared by tests/test_loss.py and the worker (so this module imports no pytest at
  import time).
"""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "workers" / "model_worker.py"


IGNORE = -100


def _fail(msg: str):
    import pytest

    pytest.fail(msg)


# --------------------------------------------------------------------------- MCE reference
def reference_mce(logits, labels, weights, ignore_index=IGNORE):
    """The paper's computation: s separate cross-entropies over the same logits, weighted by
    w_j * valid_j and divided by sum_j w_j * valid_j (0 where no target is valid)."""
    import torch
    import torch.nn.functional as F

    V, s = logits.shape[-1], labels.shape[-1]
    z = logits.reshape(-1, V)
    y = labels.reshape(-1, s)
    w = torch.as_tensor(weights, dtype=torch.float64)
    num = torch.zeros(z.shape[0], dtype=torch.float64)
    den = torch.zeros(z.shape[0], dtype=torch.float64)
    for j in range(s):
        ce = F.cross_entropy(z, y[:, j], reduction="none", ignore_index=ignore_index)
        valid = (y[:, j] != ignore_index).double()
        num = num + w[j] * valid * ce.double()
        den = den + w[j] * valid
    safe = torch.where(den > 0, den, torch.ones_like(den))
    out = torch.where(den > 0, num / safe, torch.zeros_like(num))
    return out.reshape(labels.shape[:-1])


def make_bag_case(lead, V, s, seed, scale=4.0, dtype=None, p_ignore=0.25):
    """Random logits [*lead, V]; labels [*lead, s] with ignored slots, duplicate tokens inside
    bags, one position whose whole bag is ignored (the last) and one fully valid (the first)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(*lead, V, generator=g)).to(dtype or torch.float32)
    labels = torch.randint(0, V, (*lead, s), generator=g)
    flat = labels.view(-1, s)
    if s > 1:
        flat[::3, -1] = flat[::3, 0]  # duplicates: every third bag repeats slot 0 in its last slot
        flat[1, :] = flat[1, 0]  # and one bag made of a single repeated token
    ignore = torch.rand(flat.shape, generator=g) < p_ignore
    flat[ignore] = IGNORE
    flat[-1, :] = IGNORE
    flat[0, :] = torch.randint(0, V, (s,), generator=g)
    return logits, labels


# --------------------------------------------------------------------------- single process
def init_single_process() -> None:
    """1-rank Gloo group + megatron parallel state (all sizes 1). Idempotent within a process."""
    import torch.distributed as dist

    from tst_megatron.cpu import enable_cpu_support

    enable_cpu_support()
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        if ps.model_parallel_is_initialized():  # groups of a process group destroyed meanwhile
            ps.destroy_model_parallel()
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if ps.model_parallel_is_initialized() and ps.get_tensor_model_parallel_world_size() != 1:
        ps.destroy_model_parallel()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel()


# --------------------------------------------------------------------------- multi process
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(text: str, n: int = 8000) -> str:
    return text if len(text) <= n else "...\n" + text[-n:]


def launch(scenario: str, outdir, nproc: int = 2, timeout: float = 240.0, extra_env=None):
    """Run the worker scenario on `nproc` Gloo ranks; return [rank0 results, rank1 results, ...]."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1",
               TORCH_NCCL_ASYNC_ERROR_HANDLING="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(extra_env or {})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           str(WORKER), scenario, str(outdir)]
    t0 = time.time()
    # Own process group so that a hung run can be ended as a whole (only what we started).
    proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        _fail(f"worker scenario {scenario!r} timed out after {timeout:.0f}s\n"
                    f"--- stdout ---\n{_tail(out)}\n--- stderr ---\n{_tail(err)}")
    if proc.returncode != 0:
        _fail(f"worker scenario {scenario!r} failed (rc={proc.returncode}) after "
                    f"{time.time() - t0:.1f}s\n--- stdout ---\n{_tail(out)}\n--- stderr ---\n{_tail(err)}")
    results = []
    for r in range(nproc):
        path = outdir / f"result_{scenario}_rank{r}.json"
        if not path.exists():
            _fail(f"worker scenario {scenario!r}: rank {r} wrote no results ({path})\n"
                        f"--- stderr ---\n{_tail(err)}")
        results.append(json.loads(path.read_text()))
    return results


def check_records(results, expected_prefixes=()):
    """Assert every comparison recorded by the workers; require the expected checks to exist.

    A record is {"diff": max|got - ref|, "tol": allowed, ...} or {"ok": bool, "detail": str}.
    """
    failures, names = [], set()
    for rank, res in enumerate(results):
        for name, rec in res.get("records", {}).items():
            names.add(name)
            if "ok" in rec:
                if not rec["ok"]:
                    failures.append(f"rank{rank} {name}: {rec.get('detail', '')}")
            else:
                d, tol = rec["diff"], rec["tol"]
                if not (isinstance(d, (int, float)) and math.isfinite(d) and d <= tol):
                    extra = {k: v for k, v in rec.items() if k not in ("diff", "tol")}
                    failures.append(f"rank{rank} {name}: max|diff| {d:.3g} > tol {tol:.3g} {extra}")
    missing = [p for p in expected_prefixes if not any(n.startswith(p) for n in names)]
    assert not missing, f"checks that never ran: {missing}; recorded: {sorted(names)}"
    assert not failures, "\n".join(failures)
    return names
