"""Shared helpers for the end-to-end trainer tests (tests/test_trainer_e2e.py, tests/test_trainer_flags.py).

* `make_data(prefix)` -- a tiny pre-tokenized corpus (.bin/.idx) written with megatron's own
  `IndexedDatasetBuilder`: documents of 50-400 uint16 tokens < 200 that follow
  x[t+1] = (7 x[t] + noise) % 200, so that a model can learn something in a few steps.
* `run_trainer(args, nproc)` -- `pretrain_tst.py` in a fresh process: `torchrun --nproc-per-node N
  --master-port <free>` for N > 1, plain `python` (the trainer's own 1-rank mode) for N == 1.
  Returns `RunResult(returncode, stdout, records)`: stdout holds stderr too, records are the
  metrics JSONL records of the run.
* `Workspace` -- one per pytest session (`workspace(tmp_path_factory)`): the data set plus a cache
  of named runs, so that a run needed by tests in both files is launched once.
* Small readers of the metrics records and of torch_dist checkpoint metadata.

The two test files must stay well under ~6 minutes together on 2 CPU cores: every launch costs
5-15 s, so runs are shared and single-process launches can go two at a time (`run_many`).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "pretrain_tst.py"

# The model and batch every e2e run starts from (flags appended later win in argparse).
SEQ, GBS, MBS = 32, 8, 4
TRAIN_ITERS, SUP_ITERS, BAG = 12, 4, 4


class RunResult(NamedTuple):
    returncode: int
    stdout: str
    records: List[dict]


# --------------------------------------------------------------------------- data
def make_data(prefix: str, num_docs: int = 400, seed: int = 0, doc_lengths=(50, 401),
              eod: Optional[int] = None) -> str:
    """Write `<prefix>.bin/.idx` with megatron's IndexedDatasetBuilder; returns the prefix.
    A learnable corpus: x[t+1] = (7 x[t] + noise) % 200; document lengths in [lo, hi); `eod`
    ends every document with that id (as preprocessing's --append-eod does)."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(num_docs):
        n = int(rng.integers(*doc_lengths))
        x = np.empty(n, dtype=np.int64)
        x[0] = rng.integers(0, 200)
        noise = rng.integers(0, 3, size=n)
        for t in range(n - 1):
            x[t + 1] = (7 * x[t] + noise[t]) % 200
        if eod is not None:
            x[-1] = eod
        builder.add_document(torch.from_numpy(x.astype(np.uint16)), [n])
    builder.finalize(prefix + ".idx")
    return prefix


def base_args(data_prefix: str, tst: bool = True, **overrides) -> List[str]:
    """The tiny e2e configuration: 2 layers, hidden 64, L=32, global batch 8, 12 iterations,
    validation every 4, a TST switch at iteration 4 with s=4. `overrides` replace or add flags
    (key `lr_decay_style="WSD"` -> `--lr-decay-style WSD`; value True -> bare flag; a list -> its values)."""
    flags = {
        "data-path": data_prefix, "tokenizer-type": "NullTokenizer", "vocab-size": 256,
        "num-layers": 2, "hidden-size": 64, "num-attention-heads": 4, "seq-length": SEQ,
        "micro-batch-size": MBS, "global-batch-size": GBS, "train-iters": TRAIN_ITERS, "lr": 3e-3,
        "log-interval": 1, "eval-interval": 4, "eval-iters": 2, "split": "90,10,0", "seed": 1234,
    }
    if tst:
        flags.update({"tst-bag-size": BAG, "tst-superposition-iters": SUP_ITERS})
    for key, value in overrides.items():
        flags[key.replace("_", "-")] = value
    args: List[str] = []
    for key, value in flags.items():
        if value is None or value is False:
            continue
        args.append("--" + key)
        if isinstance(value, (list, tuple)):  # a flag of several values (e.g. --rampup-batch-size)
            args += [str(v) for v in value]
        elif value is not True:
            args.append(str(value))
    return args


# --------------------------------------------------------------------------- launching
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics_path(args: Sequence[str]) -> Optional[str]:
    args = list(args)
    if "--metrics-path" in args:
        return args[args.index("--metrics-path") + 1]
    if "--save" in args:
        return os.path.join(args[args.index("--save") + 1], "metrics.jsonl")
    return None


def read_records(path: Optional[str]) -> List[dict]:
    if not path or not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _child_env() -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def run_trainer(args: Sequence[str], nproc: int = 1, timeout: float = 300.0, cwd: Optional[str] = None,
                script: Optional[Sequence[str]] = None) -> RunResult:
    """Run pretrain_tst.py with `args` on `nproc` processes; never raises on a failing run.

    The metrics records are read from --metrics-path, else <--save>/metrics.jsonl. `script`
    replaces the program (e.g. ["-c", "..."]) for argument-only checks.
    """
    args = [str(a) for a in args]
    program = list(script) if script is not None else [str(SCRIPT)]
    out = ""
    for attempt in range(2):  # a second try only if the rendezvous port was taken meanwhile
        if nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                   "--master-addr", "127.0.0.1", "--master-port", str(free_port())] + program + args
        else:
            cmd = [sys.executable] + program + args
        # Own session: a hung run is ended as a whole (only the processes started here).
        proc = subprocess.Popen(cmd, cwd=cwd or str(REPO), env=_child_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            out += f"\n[trainer_utils] timed out after {timeout:.0f}s"
            rc = 124
        if rc != 0 and nproc > 1 and "address already in use" in out.lower() and attempt == 0:
            continue
        break
    return RunResult(rc, out, read_records(_metrics_path(args)))


def run_many(jobs: Sequence[Sequence[str]], parallel: int = 2, timeout: float = 300.0) -> List[RunResult]:
    """Several single-process runs, `parallel` at a time (2 cores: imports dominate)."""
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        return list(pool.map(lambda a: run_trainer(a, 1, timeout), jobs))


def tail(text: str, n: int = 6000) -> str:
    lines = [ln for ln in text.splitlines() if "warn" not in ln.lower()]
    text = "\n".join(lines)
    return text if len(text) <= n else "...\n" + text[-n:]


def assert_ok(res: RunResult, what: str = "run") -> RunResult:
    assert res.returncode == 0, f"{what} failed (rc={res.returncode}):\n{tail(res.stdout)}"
    return res


# --------------------------------------------------------------------------- metrics readers
def train_records(records: Iterable[dict]) -> Dict[int, dict]:
    """iteration -> train record; a repeated iteration is an error (a resume must not log twice)."""
    out: Dict[int, dict] = {}
    for r in records:
        if r.get("type") == "train":
            assert r["iteration"] not in out, f"iteration {r['iteration']} logged twice"
            out[r["iteration"]] = r
    return out


def eval_records(records: Iterable[dict]) -> Dict[int, dict]:
    out: Dict[int, dict] = {}
    for r in records:
        if r.get("type") == "eval":
            assert r["iteration"] not in out, f"evaluation at {r['iteration']} logged twice"
            out[r["iteration"]] = r
    return out


def run_record(records: Iterable[dict]) -> dict:
    runs = [r for r in records if r.get("type") == "run"]
    assert len(runs) == 1, f"expected one run record, got {len(runs)}"
    return runs[0]


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


# --------------------------------------------------------------------------- checkpoints
def checkpoint_model_tensors(ckpt_dir: str) -> Dict[str, tuple]:
    """Global shapes of the model tensors in a torch_dist checkpoint (optimizer state excluded),
    read from the checkpoint's own metadata, independently of the trainer."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = FileSystemReader(ckpt_dir).read_metadata()
    return {k: tuple(v.size) for k, v in meta.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata) and "optimizer" not in k}


def numel(shape: Sequence[int]) -> int:
    return int(math.prod(shape))


def copy_checkpoint(src_root: str, iteration: int, dst_root: str) -> str:
    """A load directory holding only `iter_<iteration>` of src_root, its tracker naming it."""
    name = f"iter_{iteration:07d}"
    os.makedirs(dst_root, exist_ok=True)
    shutil.copytree(os.path.join(src_root, name), os.path.join(dst_root, name))
    with open(os.path.join(dst_root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(iteration))
    return dst_root


# --------------------------------------------------------------------------- session workspace
class Workspace:
    """The data set and a cache of named runs shared by both test files in one session."""

    def __init__(self, root: Path):
        self.root = Path(root)
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        self.data = make_data(str(self.root / "data" / "seq"))
        self._runs: Dict[str, RunResult] = {}
        self.timings: Dict[str, float] = {}

    def path(self, name: str) -> str:
        return str(self.root / name)

    def run(self, name: str, args: Sequence[str], nproc: int = 1, timeout: float = 300.0) -> RunResult:
        """Launch once per session under `name`; later calls return the cached result."""
        if name not in self._runs:
            t0 = time.time()
            self._runs[name] = run_trainer(args, nproc, timeout)
            self.timings[name] = time.time() - t0
        return self._runs[name]

    def run_pair(self, names: Sequence[str], jobs: Sequence[Sequence[str]]) -> List[RunResult]:
        """Single-process runs launched side by side (those not cached yet)."""
        todo = [(n, j) for n, j in zip(names, jobs) if n not in self._runs]
        if todo:
            t0 = time.time()
            for (n, _), res in zip(todo, run_many([j for _, j in todo])):
                self._runs[n] = res
                self.timings[n] = time.time() - t0
        return [self._runs[n] for n in names]


_WORKSPACE: Dict[str, Workspace] = {}


def workspace(tmp_path_factory) -> Workspace:
    if "ws" not in _WORKSPACE:
        _WORKSPACE["ws"] = Workspace(tmp_path_factory.mktemp("trainer_e2e"))
    return _WORKSPACE["ws"]


# --------------------------------------------------------------------------- shared scenarios
# Runs needed by tests in both files are defined once here, under fixed names, so that a session
# launches each of them once whatever the test selection.
def tp2_run(ws: Workspace) -> RunResult:
    """TP=2 over 2 ranks; saves every 3 iterations to `tp2/`."""
    return ws.run("tp2", base_args(ws.data, tensor_model_parallel_size=2, save=ws.path("tp2"), save_interval=3,
                                   **LOG_FLAGS), nproc=2)


def chain_args(ws: Workspace, **overrides) -> List[str]:
    """The determinism / resume configuration: TST switch at 4, cosine LR with warmup, and dropout
    (hidden and attention), so that the RNG state has to be saved and restored for exact resumes."""
    kw = dict(hidden_dropout=0.1, attention_dropout=0.1, lr_warmup_iters=2, min_lr=3e-4)
    kw.update(overrides)
    return base_args(ws.data, **kw)


def reference_runs(ws: Workspace) -> List[RunResult]:
    """The uninterrupted chain run, twice with the same seed (side by side)."""
    return ws.run_pair(["ref_a", "ref_b"], [chain_args(ws, metrics_path=ws.path("ref_a.jsonl")),
                                            chain_args(ws, metrics_path=ws.path("ref_b.jsonl"))])


def chain_first_leg(ws: Workspace) -> RunResult:
    """The chain run stopped by --exit-interval 3 (saves iter_0000003 to `chain/`)."""
    return ws.run("chain_1", chain_args(ws, save=ws.path("chain"), exit_interval=3))


def checkpoint_at_3(ws: Workspace) -> str:
    """A --load directory holding only the chain's iteration-3 checkpoint (superposition phase)."""
    dst = ws.path("chain_at3")
    if not os.path.isdir(dst):
        assert_ok(chain_first_leg(ws), "chain leg 1 (--exit-interval 3)")
        copy_checkpoint(ws.path("chain"), 3, dst)
    return dst


MOE_FLAGS = dict(num_experts=4, moe_router_topk=2, expert_model_parallel_size=2, disable_bias_linear=True)
# the router's losses of the shared MoE runs (logged as load_balancing_loss / z_loss)
MOE_LOSS_FLAGS = dict(moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001)
# logging-only flags carried by the shared multi-rank runs that save (test_trainer_flags and
# test_timing check them)
LOG_FLAGS = dict(log_params_norm=True, log_num_zeros_in_grad=True, timing_log_level=1)


def moe_run(ws: Workspace, dispatcher: str) -> RunResult:
    """Tiny MoE (4 experts, top-2, EP=2 over 2 ranks); the allgather run saves at 6 and 12."""
    extra = {"save": ws.path("moe_allgather"), "save_interval": 6} if dispatcher == "allgather" else \
        {"metrics_path": ws.path(f"moe_{dispatcher}.jsonl")}
    return ws.run(f"moe_{dispatcher}", base_args(ws.data, moe_token_dispatcher_type=dispatcher, **MOE_FLAGS, **extra,
                                                 **MOE_LOSS_FLAGS, **LOG_FLAGS), nproc=2)


DISTOPT_FLAGS = dict(use_distributed_optimizer=True, lr_decay_style="WSD", lr_warmup_iters=2, lr_wsd_decay_iters=4)


def distopt_run(ws: Workspace) -> RunResult:
    """DP=2 with the distributed optimizer and a WSD schedule; saves at 6 and 12 to `distopt/`."""
    return ws.run("distopt", base_args(ws.data, save=ws.path("distopt"), save_interval=6, **DISTOPT_FLAGS, **LOG_FLAGS),
                  nproc=2)


# A plain run (no TST flags) with a constant LR after warmup: the TST-off test compares it with
# --tst-bag-size 1, the LR test checks its schedule.
PLAIN_FLAGS = dict(train_iters=10, eval_interval=None, eval_iters=1, lr=3e-3, min_lr=3e-4, lr_warmup_iters=3,
                   lr_decay_style="constant")


def plain_args(ws: Workspace, name: str, **extra) -> List[str]:
    return base_args(ws.data, tst=False, metrics_path=ws.path(f"{name}.jsonl"), **PLAIN_FLAGS, **extra)
