"""The launch scripts in examples/: paper configs, multi-node torchrun, SLURM.

* Every paper config script prints (PRINT_MODEL_SIZE=1) a size within +-15% of its nominal one and
  launches (DRY_RUN=1) with the paper's batch, LR, schedule and TST settings.
* The CPU example runs as two torchrun "nodes" on this machine (NNODES=2, NODE_RANK=0/1, one
  process each, Gloo; and with the c10d rendezvous the sbatch script uses): both finish and the
  checkpoint is written once.
* `slurm`-marked: the sbatch script on a real one-node SLURM (tests/slurm/setup_slurm.sh): a tiny
  CPU job gets the time-limit notice (SIGTERM to the batch shell), saves, requeues itself, resumes
  from its checkpoint and finishes. Runs only when selected (`pytest -m slurm`, or
  TST_SLURM_TEST=1), and then FAILS (does not skip) when the SLURM commands are missing.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
CPU_EXAMPLE = EXAMPLES / "cpu" / "pretrain_tiny_tst.sh"
SBATCH = EXAMPLES / "slurm" / "pretrain_tst.sbatch"

# script -> (nominal total, nominal active, what the paper used)
PAPER = {
    "pretrain_tst_270m.sh": dict(total=270e6, active=270e6, lr=2e-3, tokens=2 ** 21, s=6, ratio=0.3),
    "pretrain_tst_600m.sh": dict(total=600e6, active=600e6, lr=1e-3, tokens=2 ** 21, s=6, ratio=0.3),
    "pretrain_tst_3b.sh": dict(total=3e9, active=3e9, lr=2e-4, tokens=2 ** 21, s=6, ratio=0.3),
    "pretrain_tst_moe_10b_a1b.sh": dict(total=10e9, active=1e9, lr=3e-4, tokens=2 ** 23, s=16, ratio=None),
}
TOLERANCE = 0.15
SIZE_RE = re.compile(r"parameters: total ([\d,]+) .*active per token ([\d,]+)")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE", "GPUS_PER_NODE",
                        "RDZV_BACKEND", "DATA_PATH", "SAVE", "TRAIN_ITERS", "PRINT_MODEL_SIZE", "DRY_RUN",
                        "RANK", "WORLD_SIZE", "LOCAL_RANK", "RDZV_ID", "TORCHRUN_ARGS", "TP", "PP",
                        "EXPERT_PARALLEL", "LR", "MIN_LR", "TST_BAG_SIZE", "TST_RATIO", "TST_ITERS", "TST_WEIGHTING",
                        "SEQ_LENGTH", "MICRO_BATCH_SIZE", "GLOBAL_BATCH_SIZE", "WARMUP_ITERS", "SEED", "RUN_NAME",
                        "DATA_ROOT", "TST_MASTER_ADDR", "TST_MASTER_PORT", "LAUNCH_SCRIPT")}
    env["PYTHON"] = sys.executable
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flags(argv):
    """{flag: [values]} of a pretrain_tst.py command line (last occurrence wins, as in argparse)."""
    out, key = {}, None
    for a in argv:
        if a.startswith("--"):
            key = a
            out[key] = []
        elif key is not None:
            out[key].append(a)
    return out


# ----------------------------------------------------------------------------- paper configs
@pytest.fixture(scope="module")
def printed_sizes():
    """PRINT_MODEL_SIZE=1 output of every config script, run concurrently (each imports megatron)."""
    procs = {name: subprocess.Popen(["bash", str(EXAMPLES / name)], cwd=REPO, env=_env(PRINT_MODEL_SIZE=1),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in PAPER}
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=600)
        out[name] = (p.returncode, stdout, stderr)
    return out


@pytest.mark.parametrize("name", sorted(PAPER))
def test_config_model_size(name, printed_sizes):
    rc, stdout, stderr = printed_sizes[name]
    assert rc == 0, f"{name}: PRINT_MODEL_SIZE=1 failed\n{stdout}\n{stderr[-3000:]}"
    m = SIZE_RE.search(stdout)
    assert m, f"{name}: no size line in\n{stdout}"
    total, active = (int(x.replace(",", "")) for x in m.groups())
    nominal = PAPER[name]
    for what, got, want in (("total", total, nominal["total"]), ("active", active, nominal["active"])):
        assert abs(got - want) <= TOLERANCE * want, \
            f"{name}: {what} parameters {got:,} not within +-15% of the nominal {want:,.0f}"


@pytest.mark.parametrize("name", sorted(PAPER))
def test_config_launch_line(name):
    """DRY_RUN=1: the torchrun line a node would run carries the paper's recipe."""
    paper = PAPER[name]
    p = subprocess.run(["bash", str(EXAMPLES / name), "--eval-interval", "77"], cwd=REPO,
                       env=_env(DRY_RUN=1, NNODES=4, NODE_RANK=3, MASTER_ADDR="node0", MASTER_PORT=12345,
                                GPUS_PER_NODE=8, SAVE="/ckpt/x"),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    argv = shlex.split(p.stdout.strip().splitlines()[-1])
    i = argv.index("torch.distributed.run")
    torchrun = _flags(argv[i + 1:argv.index(str(REPO / "pretrain_tst.py"))])
    assert torchrun["--nnodes"] == ["4"] and torchrun["--node-rank"] == ["3"]
    assert torchrun["--nproc-per-node"] == ["8"]
    assert torchrun["--master-addr"] == ["node0"] and torchrun["--master-port"] == ["12345"]
    f = _flags(argv[argv.index(str(REPO / "pretrain_tst.py")) + 1:])
    one = lambda k: f[k][-1]  # noqa: E731
    assert int(one("--seq-length")) * int(one("--global-batch-size")) == paper["tokens"]
    assert float(one("--lr")) == paper["lr"]
    assert one("--lr-decay-style") == "WSD" and one("--lr-warmup-iters") == "2000"
    assert int(one("--lr-wsd-decay-iters")) == int(one("--train-iters")) // 10
    assert (one("--adam-beta1"), one("--adam-beta2")) == ("0.9", "0.95")
    assert "--bf16" in f and "--untie-embeddings-and-output-weights" in f and "--swiglu" in f
    assert one("--normalization") == "RMSNorm" and one("--position-embedding-type") == "rope"
    assert "--group-query-attention" in f
    assert int(one("--tst-bag-size")) == paper["s"]
    if paper["ratio"] is not None:
        assert float(one("--tst-superposition-ratio")) == paper["ratio"]
    else:  # the MoE: the paper's 12,483 superposition steps of 49,983
        assert (one("--tst-superposition-iters"), one("--train-iters")) == ("12483", "49983")
        assert "--qk-layernorm" in f and one("--moe-router-topk") == "8"
    assert f["--save"] == ["/ckpt/x"] and f["--load"] == ["/ckpt/x"]  # requeue-friendly: same dir
    assert one("--eval-interval") == "77"  # "$@" passes through, last


@pytest.mark.parametrize("tp,sp", [(2, True), (3, False)])
def test_tensor_parallel_adds_sequence_parallel_where_it_divides(tp, sp):
    """TP > 1 runs with sequence parallel, as Megatron-LM's recipes do, unless the sequence does not
    divide among the TP ranks (the 270M's TP = 3 with 4096 tokens): then without."""
    p = subprocess.run(["bash", str(EXAMPLES / "pretrain_tst_270m.sh")], cwd=REPO,
                       env=_env(DRY_RUN=1, TP=tp, NPROC_PER_NODE="gpu"), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    argv = shlex.split(p.stdout.strip().splitlines()[-1])
    assert ("--sequence-parallel" in argv) == sp and argv[argv.index("--nproc-per-node") + 1] == "gpu"


def test_baseline_switch():
    """TST_BAG_SIZE=1 gives the plain next-token run of the same config."""
    p = subprocess.run(["bash", str(EXAMPLES / "pretrain_tst_270m.sh")], cwd=REPO,
                       env=_env(DRY_RUN=1, TST_BAG_SIZE=1), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    f = _flags(shlex.split(p.stdout.strip().splitlines()[-1]))
    assert f["--tst-bag-size"] == ["1"] and "--tst-superposition-ratio" not in f


@pytest.mark.parametrize("dry_run", [0, 1])
@pytest.mark.parametrize("expect,env,extra", [
    ("needs NODE_RANK", dict(MASTER_ADDR="node0"), ()),
    ("needs MASTER_ADDR", dict(NODE_RANK=1), ()),  # 127.0.0.1 would leave node 1 waiting for itself
    ("needs MASTER_ADDR", dict(RDZV_BACKEND="c10d"), ()),
    ("GPUS_PER_NODE must be a whole number >= 1, or gpu / cpu / auto",
     dict(MASTER_ADDR="node0", NODE_RANK=0, GPUS_PER_NODE=0), ()),
    ("run length as TRAIN_ITERS=N", dict(MASTER_ADDR="node0", NODE_RANK=0), ("--train-iters", "100000")),
])
def test_multinode_launch_refuses_incomplete_settings(dry_run, expect, env, extra):
    """Refused for real and in a dry run alike (a dry run must not show a line the launch refuses);
    an extra --train-iters would keep the schedule of the script's own length."""
    p = subprocess.run(["bash", str(EXAMPLES / "pretrain_tst_270m.sh"), *extra], cwd=REPO,
                       env=_env(NNODES=2, DATA_PATH="/nonexistent", DRY_RUN=dry_run, **env), capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and expect in p.stderr, (p.returncode, p.stderr)


@pytest.mark.parametrize("flag", [("--train-iters", "50"), ("--train-iters=50",)])
def test_tiny_cpu_script_refuses_train_iters_before_building_data(tmp_path, flag):
    """The tiny CPU script sizes its warmup, WSD decay and switch from TRAIN_ITERS too: an extra
    --train-iters is refused, before the corpus is built."""
    p = subprocess.run(["bash", str(EXAMPLES / "cpu" / "pretrain_tiny_tst.sh"), *flag], cwd=REPO,
                       env=_env(DATA_ROOT=str(tmp_path / "data"), SAVE=str(tmp_path / "run")),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "run length as TRAIN_ITERS=N" in p.stderr, (p.returncode, p.stderr)
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()


def test_launcher_counts_the_visible_gpus_and_keeps_paths_whole(tmp_path):
    """Processes per node: the GPUs CUDA_VISIBLE_DEVICES leaves visible, not every GPU nvidia-smi lists
    (here a stand-in listing 8); DATA_PATH: one prefix even with a space in it, or a blend of pairs."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\nfor i in 0 1 2 3 4 5 6 7; do echo \"GPU $i: H200 (UUID: x$i)\"; done\n")
    (fake / "nvidia-smi").chmod(0o755)
    spaced = tmp_path / "my data"
    spaced.mkdir()
    (spaced / "c_text_document.bin").write_text("")

    def launch(**extra):
        env = _env(DRY_RUN=1, PATH=f"{fake}{os.pathsep}{os.environ['PATH']}", **extra)
        if "CUDA_VISIBLE_DEVICES" not in extra:
            env.pop("CUDA_VISIBLE_DEVICES", None)
        p = subprocess.run(["bash", str(EXAMPLES / "pretrain_tst_270m.sh")], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        argv = shlex.split(p.stdout.strip().splitlines()[-1])
        return _flags(argv[argv.index("torch.distributed.run") + 1:argv.index(str(REPO / "pretrain_tst.py"))]), \
            _flags(argv[argv.index(str(REPO / "pretrain_tst.py")) + 1:])

    assert launch()[0]["--nproc-per-node"] == ["8"]
    assert launch(CUDA_VISIBLE_DEVICES="0,1")[0]["--nproc-per-node"] == ["2"]
    assert launch(CUDA_VISIBLE_DEVICES="3,-1,5")[0]["--nproc-per-node"] == ["1"]
    prefix = str(spaced / "c_text_document")
    assert launch(DATA_PATH=prefix)[1]["--data-path"] == [prefix]
    assert launch(DATA_PATH="0.3 /a/x_text_document 0.7 /b/y*")[1]["--data-path"] == \
        ["0.3", "/a/x_text_document", "0.7", "/b/y*"]


# ----------------------------------------------------------------------------- two torchrun "nodes"
@pytest.mark.parametrize("rdzv", ["static", "c10d"])
def test_two_node_torchrun_cpu(tmp_path, rdzv):
    """Two torchrun processes as two nodes, one Gloo rank each: static rendezvous with
    NODE_RANK=0/1, or c10d (what the sbatch script uses) where torchrun assigns the node ranks."""
    save, data_root = tmp_path / "ckpt", tmp_path / "data"
    common = dict(NNODES=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=_free_port(), NPROC_PER_NODE=1,
                  SAVE=save, DATA_ROOT=data_root, TRAIN_ITERS=6, LOG_INTERVAL=2, OMP_NUM_THREADS=1)
    if rdzv == "c10d":
        common.update(RDZV_BACKEND="c10d", RDZV_ID=f"test-{os.getpid()}")
    procs, logs = [], []
    for rank in (0, 1):
        log = open(tmp_path / f"node{rank}.log", "w")
        logs.append(log)
        env = _env(**common) if rdzv == "c10d" else _env(NODE_RANK=rank, **common)
        # Both nodes start at once: the tiny corpus is built once under the script's lock.
        procs.append(subprocess.Popen(["bash", str(CPU_EXAMPLE)], cwd=REPO, env=env,
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    try:
        rcs = [p.wait(timeout=480) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        for log in logs:
            log.close()
    texts = [(tmp_path / f"node{r}.log").read_text() for r in (0, 1)]
    assert rcs == [0, 0], "\n\n".join(f"node {r} rc {rc}:\n{t[-4000:]}" for r, (rc, t) in enumerate(zip(rcs, texts)))
    both = "\n".join(texts)
    assert "world 2 " in both and "training done: 6 iterations" in both
    if rdzv == "static":
        assert "--node-rank 1" in texts[1] and "training done" in texts[0]
    else:
        assert both.count("--rdzv-backend c10d") == 2
    # The checkpoint is written once: one iteration directory, the tracker names it, no leftovers.
    entries = sorted(p.name for p in save.iterdir())
    assert entries == ["iter_0000006", "latest_checkpointed_iteration.txt", "metrics.jsonl"], entries
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    ckpt_files = sorted(p.name for p in (save / "iter_0000006").iterdir())
    assert "metadata.json" in ckpt_files and "common.pt" in ckpt_files, ckpt_files
    assert sum(f.endswith(".distcp") for f in ckpt_files) >= 2, ckpt_files  # both ranks wrote shards
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    runs = [r for r in records if r.get("type") == "run"]
    assert len(runs) == 1 and runs[0]["world_size"] == 2, runs
    # --log-interval 2; the switch (after superposition iteration 1) closes a record of its own
    assert [r["iteration"] for r in records if r.get("type") == "train"] == [1, 2, 4, 6]


# ----------------------------------------------------------------------------- SLURM
def _slurm_selected(config) -> bool:
    return "slurm" in (config.getoption("markexpr") or "") or os.environ.get("TST_SLURM_TEST") == "1"


SLURM_TOOLS = ("sbatch", "sinfo", "scontrol", "scancel")


def _slurm_gate(selected: bool, which=shutil.which):
    """(action, message) for the SLURM test: ("skip", why) when it was not selected; ("fail", why)
    when it WAS selected but the SLURM commands are missing -- an explicit `-m slurm` (as .ci/run
    does) must not pass by skipping; (None, "") when it can run."""
    missing = [tool for tool in SLURM_TOOLS if which(tool) is None]
    setup = "`bash tests/slurm/setup_slurm.sh` (Debian, root) starts a one-node SLURM"
    if not selected:
        why = "the SLURM test runs only when selected: pytest -m slurm (or TST_SLURM_TEST=1)"
        return "skip", (f"{', '.join(missing)} not found; {setup}; " if missing else "") + why
    if missing:
        return "fail", (f"the SLURM test was selected (-m slurm or TST_SLURM_TEST=1) but {', '.join(missing)} "
                        f"{'is' if len(missing) == 1 else 'are'} not on PATH; {setup} before running it")
    return None, ""


def test_sbatch_rendezvous_is_the_jobs_own(tmp_path):
    """The sbatch script under stand-ins for srun/scontrol (DRY_RUN: the torchrun line only): the
    rendezvous is the job's first node on a port derived from the job id, whatever MASTER_ADDR /
    MASTER_PORT the submitting shell exported; TST_MASTER_ADDR / TST_MASTER_PORT override."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho nodeA; echo nodeB\n")
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    job = dict(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID=4242, SLURM_JOB_NODELIST="node[A-B]",
               SLURM_JOB_NUM_NODES=2, SLURM_SUBMIT_DIR=REPO, DRY_RUN=1, NPROC_PER_NODE=1, SAVE=tmp_path / "save")

    def endpoint(**extra):
        out = subprocess.run(["bash", str(REPO / "examples" / "slurm" / "pretrain_tst.sbatch")],
                             env=_env(**job, **extra), cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        return re.search(r"--rdzv-endpoint (\S+)", out.stdout).group(1)

    assert endpoint(MASTER_ADDR="stale", MASTER_PORT=29500) == "nodeA:24242"
    assert endpoint(TST_MASTER_ADDR="nodeB", TST_MASTER_PORT=31000) == "nodeB:31000"


def test_slurm_gate_fails_when_selected_without_slurm():
    none = lambda tool: None  # noqa: E731
    only_sbatch = lambda tool: "/usr/bin/sbatch" if tool == "sbatch" else None  # noqa: E731
    everything = lambda tool: f"/usr/bin/{tool}"  # noqa: E731
    action, message = _slurm_gate(True, none)
    assert action == "fail" and "sbatch" in message and "setup_slurm.sh" in message
    action, message = _slurm_gate(True, only_sbatch)
    assert action == "fail" and "sinfo" in message and "sbatch," not in message
    assert _slurm_gate(True, everything) == (None, "")
    # not selected: skipped as before, whether SLURM is there or not
    assert _slurm_gate(False, none)[0] == "skip" and "sbatch" in _slurm_gate(False, none)[1]
    assert _slurm_gate(False, everything)[0] == "skip"


def _job_field(job: str, field: str):
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30).stdout
    m = re.search(rf"\b{field}=(\S+)", out)
    return m.group(1) if m else None


def _wait_for(predicate, timeout: float, what: str, log: Path, interval: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(interval)
    text = log.read_text() if log.exists() else "(no log)"
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}; job log tail:\n{text[-5000:]}\n"
                f"{_slurm_logs()}")


def _slurm_logs() -> str:
    parts = []
    for f in ("/var/log/slurm/slurmctld.log", "/var/log/slurm/slurmd.log"):
        try:
            parts.append(f"--- {f}\n" + "\n".join(Path(f).read_text().splitlines()[-15:]))
        except OSError:
            pass
    return "\n".join(parts)


def _submit(tmp_path: Path, env: dict, *options: str):
    """sbatch the script as shipped, on a CPU node: (job id, its log file)."""
    sub = subprocess.run(["sbatch", "--parsable", "--gpus-per-node=0", *options, f"--output={tmp_path}/slurm-%j.out",
                          str(SBATCH)], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]
    return job, tmp_path / f"slurm-{job}.out"


@pytest.mark.slurm
def test_slurm_requeue_resume(tmp_path, request):
    action, message = _slurm_gate(_slurm_selected(request.config))
    if action == "skip":
        pytest.skip(message)
    if action == "fail":
        pytest.fail(message, pytrace=False)
    info = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    assert info.returncode == 0 and info.stdout.strip(), \
        f"SLURM does not answer (sinfo: {info.stderr.strip()}); run tests/slurm/setup_slurm.sh\n{_slurm_logs()}"

    # The script as shipped, with only the GPU request dropped (a CPU-only node has no gres).
    test_only = subprocess.run(["sbatch", "--test-only", "--gpus-per-node=0", str(SBATCH)], cwd=REPO,
                               capture_output=True, text=True, timeout=60)
    assert test_only.returncode == 0 and "to start at" in test_only.stderr, test_only.stderr

    save, data_root = tmp_path / "ckpt", tmp_path / "data"
    train_iters = 200
    env = _env(LAUNCH_SCRIPT="examples/cpu/pretrain_tiny_tst.sh", NPROC_PER_NODE=2, SAVE=save, DATA_ROOT=data_root,
               TRAIN_ITERS=train_iters, LOG_INTERVAL=10, OMP_NUM_THREADS=1)
    job, log = _submit(tmp_path, env, "--time=20", "--job-name=tst-slurm-test")
    try:
        # 1. Training runs; then the time-limit notice: SIGUSR1 to the batch shell, exactly what
        #    `#SBATCH --signal=B:USR1@120` delivers 120 s before the limit.
        _wait_for(lambda: log.exists() and re.search(r"iteration +20/", log.read_text()), 420,
                  "iteration 20 in the job log", log, 0.5)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
        # 2. The trainer saves and exits, the script requeues the job, the job restarts, resumes, ends.
        _wait_for(lambda: _job_field(job, "JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                            "NODE_FAIL", "OUT_OF_MEMORY")
                  and _job_field(job, "Restarts") not in (None, "0"), 720, "the requeued job to end", log, 2.0)
    finally:
        if _job_field(job, "JobState") in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING"):
            subprocess.run(["scancel", job], timeout=30)
    text = log.read_text()
    state, restarts = _job_field(job, "JobState"), _job_field(job, "Restarts")
    assert state == "COMPLETED" and restarts == "1", f"job {job}: {state}, restarts {restarts}\n{text[-5000:]}"
    stopped = re.search(r"> exiting at iteration (\d+) \(signal\)", text)
    assert stopped, text[-5000:]
    stop_iter = int(stopped.group(1))
    assert 20 <= stop_iter < train_iters
    assert f"requeueing job {job}" in text
    assert "restart 1 on" in text
    assert f"resumed from {save}/iter_{stop_iter:07d} at iteration {stop_iter}" in text, text[-5000:]
    assert f"training done: {train_iters} iterations" in text
    assert re.search(r"\[sbatch\] finished .* with rc 0", text)
    # Checkpoints: the one written on SIGTERM and the final one; the tracker names the final one.
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == str(train_iters)
    iter_dirs = sorted(p.name for p in save.iterdir() if p.name.startswith("iter_"))
    assert iter_dirs == [f"iter_{stop_iter:07d}", f"iter_{train_iters:07d}"], iter_dirs
    # One metrics history across the restart: every logged iteration once, in order (the stop on
    # SIGTERM closes a record of its own when it does not fall on the log interval).
    iters = [json.loads(line)["iteration"] for line in (save / "metrics.jsonl").read_text().splitlines()
             if json.loads(line).get("type") == "train"]
    assert iters == sorted(set(range(10, train_iters + 1, 10)) | {stop_iter}), iters


@pytest.mark.slurm
def test_slurm_sigterm_stops_without_requeue(tmp_path, request):
    """SIGTERM to the batch shell (what a plain `scancel JOB` sends it, besides the step): the
    trainer is asked to save and stops, and the script does not requeue -- a cancelled job stays
    cancelled (the time-limit notice is SIGUSR1, above)."""
    action, message = _slurm_gate(_slurm_selected(request.config))
    if action == "skip":
        pytest.skip(message)
    if action == "fail":
        pytest.fail(message, pytrace=False)
    save = tmp_path / "ckpt"
    env = _env(LAUNCH_SCRIPT="examples/cpu/pretrain_tiny_tst.sh", NPROC_PER_NODE=1, SAVE=save,
               DATA_ROOT=tmp_path / "data", TRAIN_ITERS=2000, LOG_INTERVAL=5, OMP_NUM_THREADS=1)
    job, log = _submit(tmp_path, env, "--time=10", "--job-name=tst-slurm-cancel")
    ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
    try:
        _wait_for(lambda: log.exists() and re.search(r"iteration +10/", log.read_text()), 420,
                  "iteration 10 in the job log", log, 0.5)
        subprocess.run(["scancel", "--signal=TERM", "--batch", job], check=True, timeout=30)
        _wait_for(lambda: _job_field(job, "JobState") in ended, 300, "the job to end", log, 1.0)
        time.sleep(5)  # a requeue would show as a pending job with Restarts=1 by now
    finally:
        if _job_field(job, "JobState") in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING"):
            subprocess.run(["scancel", job], timeout=30)
    text = log.read_text()
    assert _job_field(job, "Restarts") == "0" and _job_field(job, "JobState") in ended, text[-3000:]
    assert "not requeueing" in text and "requeueing job" not in text, text[-3000:]
    stopped = re.search(r"> exiting at iteration (\d+) \(signal\)", text)
    assert stopped, text[-3000:]
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == stopped.group(1)


def test_plain_python_needs_no_port(tmp_path):
    """`python pretrain_tst.py` (one process, no torchrun) makes its group on an in-memory store: a
    MASTER_ADDR/MASTER_PORT left in the environment -- here a port another socket listens on, as in
    an allocation that exports them -- does not make it fail with EADDRINUSE."""
    sys.path.insert(0, str(REPO / "tests"))
    from trainer_utils import base_args, make_data

    data = make_data(str(tmp_path / "d"))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(busy.getsockname()[1]), PYTHONWARNINGS="ignore",
                   OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        argv = base_args(data, train_iters=2, tst_superposition_iters=1, eval_iters=0,
                         metrics_path=str(tmp_path / "m.jsonl"))
        proc = subprocess.run([sys.executable, str(REPO / "pretrain_tst.py")] + argv, env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    train = [json.loads(line) for line in open(tmp_path / "m.jsonl") if '"train"' in line]
    assert [r["iteration"] for r in train if r.get("type") == "train"] == [1, 2]


def test_one_process_group_can_be_made_again():
    """After a one-process run's group is destroyed (Trainer.close), the same process can make
    another (a notebook running a second job): nothing was left in the environment to send the
    second init down torchrun's env:// path."""
    code = ("import os, torch.distributed as d\n"
            "from tst_megatron.distributed import init_distributed\n"
            "init_distributed(); d.destroy_process_group(); init_distributed()\n"
            "print(d.get_world_size(), 'RANK' in os.environ)")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.split() == ["1", "False"], proc.stdout + proc.stderr[-3000:]
