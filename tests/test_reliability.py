"""Fault tests of pretrain_tst.py: kill -9, a crash inside a checkpoint save (after the shards; after
the rename, before the tracker update), SIGTERM, a damaged checkpoint or tracker, a data stream out
of step with the phase and non-finite steps (one, skipped, and more than --skip-nonfinite-steps
allows) -- each followed by a resume or a check that nothing was written.

Every run is a real `pretrain_tst.py` process (plain python for one rank, torch.distributed.run
with Gloo for two) on a tiny model and a tiny on-disk corpus. After each fault:

* the resumed run's per-iteration training losses, from the resumed iteration on, equal those of
  an uninterrupted run with the same flags EXACTLY (float equality, no tolerance);
* every `iter_*` directory on disk verifies (marker, metadata, every shard the torch_dist index
  names, at full length) and every tensor in it reads back; the tracker names one of them;
  leftover `iter_*.tmp` directories of an interrupted save are never taken for checkpoints.
"""
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tst_megatron import checkpointing as ckpt

REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / "pretrain_tst.py")
TRAIN_ITERS = 8
SAVE_INTERVAL = 2
RUN_TIMEOUT = 180

# superposition for iterations [0, 3), recovery after: faults land in both phases
BASE_ARGS = [
    "--tokenizer-type", "NullTokenizer", "--vocab-size", "256", "--num-layers", "2", "--hidden-size", "64",
    "--num-attention-heads", "4", "--seq-length", "32", "--micro-batch-size", "4", "--global-batch-size", "8",
    "--train-iters", str(TRAIN_ITERS), "--lr", "3e-3", "--log-interval", "1", "--eval-iters", "1",
    "--tst-bag-size", "4", "--tst-superposition-iters", "3", "--save-interval", str(SAVE_INTERVAL),
    "--split", "90,10,0",
]
TP2 = ["--tensor-model-parallel-size", "2"]


# ------------------------------------------------------------------------------------ helpers
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(extra=None):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith("TST_TEST_")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env


class Run:
    """One pretrain_tst.py launch (1 rank: python; 2 ranks: torch.distributed.run), output to a log."""

    def __init__(self, data, save, extra=(), nproc=1, env=None, load=True, script=SCRIPT):
        self.save = Path(save)
        self.log_path = self.save.parent / f"{self.save.name}.{time.time_ns()}.log"
        argv = ["--data-path", str(data), *BASE_ARGS, "--save", str(save), *extra]
        if load:
            argv += ["--load", str(save)]
        if nproc == 1:
            cmd = [sys.executable, script, *argv]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                   "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), script, *argv, *TP2]
        self._log = open(self.log_path, "w")
        # own session: whatever is left of a failed run can be ended without touching anything else
        self.proc = subprocess.Popen(cmd, cwd=str(self.save.parent), env=_env(env), stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout=RUN_TIMEOUT) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            pytest.fail(f"run timed out after {timeout}s\n{self.output()}")
        self._log.close()
        return rc

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        text = self.log_path.read_text()
        return text if len(text) < 6000 else "...\n" + text[-6000:]

    def wait_ok(self):
        rc = self.wait()
        assert rc == 0, f"run failed (rc={rc})\n{self.output()}"
        return self

    def wait_for_iteration(self, iteration, timeout=RUN_TIMEOUT):
        """Poll metrics.jsonl (line-buffered, rank 0) until `iteration` is logged."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"run ended (rc={self.proc.returncode}) before iteration {iteration}\n{self.output()}")
            if max(train_losses(self.save, strict=False), default=0) >= iteration:
                return
            time.sleep(0.02)
        pytest.fail(f"iteration {iteration} not reached in {timeout}s\n{self.output()}")

    def rank_pids(self):
        """{rank: pid} of the worker processes of a torch.distributed.run launch (our children)."""
        pids = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                if ppid != self.proc.pid:
                    continue
                environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            except (OSError, ValueError, IndexError):
                continue
            for item in environ:
                if item.startswith(b"RANK="):
                    pids[int(item[5:])] = int(entry)
        return pids


def train_losses(save, strict=True):
    """{iteration: loss} of the train records in <save>/metrics.jsonl; each iteration once."""
    path = Path(save) / "metrics.jsonl"
    out = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            if strict:
                raise
            continue
        if rec.get("type") == "train":
            if strict:
                assert rec["iteration"] not in out, f"iteration {rec['iteration']} logged twice in {path}"
            out[rec["iteration"]] = rec["loss"]
    return out


def tracker(save) -> int:
    return int((Path(save) / ckpt.TRACKER).read_text().strip())


def assert_checkpoints_sound(save, tmp_path):
    """Every final iter_* dir verifies and reads back fully; the tracker names one of them; a
    leftover .tmp dir is not listed as a checkpoint. Returns the sorted iterations."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    found = ckpt.list_checkpoints(str(save))
    assert found, f"no checkpoint under {save}"
    for iteration, path in found:
        meta = ckpt.verify_checkpoint_dir(path)
        assert meta["iteration"] == iteration and meta["complete"]
        out = tmp_path / f"readback_{Path(save).name}_{iteration}.pt"
        dcp_to_torch_save(path, str(out))  # reads every tensor / object of every shard
        tensors = torch.load(out, weights_only=False)
        assert tensors and all(torch.isfinite(t).all() for t in tensors.values() if torch.is_tensor(t))
        common = torch.load(os.path.join(path, "common.pt"), weights_only=False)
        assert common["tst_common"]["iteration"] == iteration
        out.unlink()
    names = {p.name for p in Path(save).iterdir()}
    listed = {Path(p).name for _, p in found}
    assert not any(n.endswith(".tmp") for n in listed)
    assert f"iter_{tracker(save):07d}" in listed, f"tracker {tracker(save)} names no complete checkpoint: {names}"
    return sorted(i for i, _ in found)


def assert_same_losses(got, ref, start):
    """Losses of iterations start+1..end equal the reference bit for bit."""
    want = {i: v for i, v in ref.items() if i > start}
    have = {i: v for i, v in got.items() if i > start}
    assert sorted(have) == sorted(want), f"iterations {sorted(have)} != {sorted(want)}"
    diffs = {i: (have[i], want[i]) for i in want if have[i] != want[i]}
    assert not diffs, f"resumed losses differ from the uninterrupted run: {diffs}"


def snapshot(save):
    """(relative path, size, mtime_ns) of every file under save except metrics.jsonl."""
    out = set()
    for root, _, files in os.walk(save):
        for f in files:
            p = Path(root) / f
            if p.name != "metrics.jsonl":
                st = p.stat()
                out.add((str(p.relative_to(save)), st.st_size, st.st_mtime_ns))
    return out


def keep_only(save, iteration):
    """Make a copied run directory look as if training had stopped after checkpoint `iteration`."""
    for it, path in ckpt.list_checkpoints(str(save)):
        if it > iteration:
            shutil.rmtree(path)
    (Path(save) / ckpt.TRACKER).write_text(str(iteration))


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path_factory.mktemp("corpus") / "tiny")
    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(200):
        builder.add_item(torch.from_numpy(rng.integers(0, 256, int(rng.integers(20, 80))).astype(np.int64)))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """Uninterrupted 1-rank run: its directory (checkpoints every 2 iterations) and losses."""
    save = tmp_path_factory.mktemp("ref") / "run"
    Run(corpus, save, load=False).wait_ok()
    losses = train_losses(save)
    assert sorted(losses) == list(range(1, TRAIN_ITERS + 1))
    assert all(math.isfinite(v) for v in losses.values())
    return save, losses


@pytest.fixture(scope="module")
def reference_tp2(corpus, tmp_path_factory):
    save = tmp_path_factory.mktemp("ref_tp2") / "run"
    Run(corpus, save, nproc=2, load=False).wait_ok()
    losses = train_losses(save)
    assert sorted(losses) == list(range(1, TRAIN_ITERS + 1))
    return save, losses


# ------------------------------------------------------------------------------------ tests
def _tp2_run_at_iteration_3(corpus, save):
    """A 2-rank (TP=2) run that has logged iteration 3, and its {rank: worker pid}."""
    run = Run(corpus, save, nproc=2)
    run.wait_for_iteration(3)
    pids = run.rank_pids()
    assert set(pids) == {0, 1}, f"worker pids {pids}"
    return run, pids


def test_kill9_one_rank_mid_run_then_resume(corpus, reference_tp2, tmp_path):
    _, ref = reference_tp2
    save = tmp_path / "run"
    run, pids = _tp2_run_at_iteration_3(corpus, save)
    os.kill(pids[1], signal.SIGKILL)
    rc = run.wait()
    assert rc != 0, f"a run that lost a rank must not report success\n{run.output()}"
    logged = max(train_losses(save, strict=False))
    assert logged < TRAIN_ITERS, "the kill came too late to interrupt the run"

    found = assert_checkpoints_sound(save, tmp_path)
    start = tracker(save)
    assert start == max(found) and start <= logged

    resumed = Run(corpus, save, nproc=2).wait_ok()
    assert f"resumed from {save}/iter_{start:07d} at iteration {start}" in resumed.output()
    assert_same_losses(train_losses(save), ref, start)
    assert assert_checkpoints_sound(save, tmp_path)[-1] == TRAIN_ITERS
    assert not list(save.glob("*.tmp")), "leftover temporary checkpoint directories"


def test_kill9_during_checkpoint_save_then_resume(corpus, reference, tmp_path):
    _, ref = reference
    save = tmp_path / "run"
    # the test hook SIGKILLs the process after every shard of iteration 4 is written, before
    # the completeness marker, the rename into place and the tracker update
    run = Run(corpus, save, env={ckpt.KILL_IN_SAVE_ENV: "4"})
    rc = run.wait()
    assert rc == -signal.SIGKILL, f"rc={rc}\n{run.output()}"
    partial = save / "iter_0000004.tmp"
    assert partial.is_dir() and list(partial.glob("*.distcp")), "the kill should land after the shards"
    assert not (partial / ckpt.MARKER).exists()
    assert not (save / "iter_0000004").exists()
    assert tracker(save) == 2
    assert assert_checkpoints_sound(save, tmp_path) == [2]
    assert ckpt.find_checkpoint(str(save), fallback=False)[0] == 2

    resumed = Run(corpus, save).wait_ok()
    assert "resumed from" in resumed.output() and "at iteration 2" in resumed.output()
    assert_same_losses(train_losses(save), ref, 2)
    assert assert_checkpoints_sound(save, tmp_path) == [2, 4, 6, 8]
    assert not partial.exists(), "the re-save of iteration 4 replaces the partial directory"


def _checkpoint_tensors(path, out):
    """{key: tensor} of every tensor a torch_dist checkpoint holds (model, optimizer, RNG)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(path), str(out))
    flat = {}

    def walk(prefix, value):
        if torch.is_tensor(value):
            flat[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}/{i}", v)

    walk("", torch.load(out, weights_only=False))
    out.unlink()
    return flat


def test_kill9_after_the_rename_before_the_tracker_update_then_resume(corpus, reference_tp2, tmp_path):
    """The second kill point of a save, on 2 ranks (TP=2): rank 0 has written the marker and renamed
    `iter_0000004.tmp` into place, then dies before the tracker update; torchrun ends rank 1.
    `iter_0000004` is complete and holds exactly the uninterrupted run's iteration-4 state (not a
    loadable-but-wrong checkpoint), the tracker still names 2 and a resume takes 2, re-saves 4 over
    the directory and logs the uninterrupted run's losses bit for bit."""
    ref_save, ref = reference_tp2
    save = tmp_path / "run"
    run = Run(corpus, save, nproc=2, env={ckpt.KILL_IN_SAVE_ENV: "4:renamed"})
    rc = run.wait()
    assert rc != 0, f"a run that lost a rank must not report success\n{run.output()}"
    assert max(train_losses(save)) == 4, run.output()
    final = save / "iter_0000004"
    assert final.is_dir() and not (save / "iter_0000004.tmp").exists(), "the kill should land after the rename"
    assert tracker(save) == 2, "the kill should land before the tracker update"
    assert assert_checkpoints_sound(save, tmp_path) == [2, 4]
    got, want = (_checkpoint_tensors(final, tmp_path / "got.pt"),
                 _checkpoint_tensors(ref_save / "iter_0000004", tmp_path / "want.pt"))
    assert sorted(got) == sorted(want) and len(got) > 10
    assert not [k for k in want if not torch.equal(got[k], want[k])], \
        "the renamed iter_0000004 differs from the uninterrupted run's"
    assert ckpt.find_checkpoint(str(save), fallback=False)[:2] == (2, str(save / "iter_0000002"))

    resumed = Run(corpus, save, nproc=2).wait_ok()
    assert f"resumed from {save}/iter_0000002 at iteration 2" in resumed.output()
    assert_same_losses(train_losses(save), ref, 2)
    assert assert_checkpoints_sound(save, tmp_path) == [2, 4, 6, 8]
    assert not list(save.glob("*.tmp")) and not list(save.glob("*.old")), "leftover directories"


def test_kill9_in_the_first_save_before_its_tracker_then_requeue(corpus, reference, tmp_path):
    """The same kill point in a run's first save: `iter_0000002` complete, no tracker at all. The
    requeued job (same command, no --ckpt-fallback) resumes from it -- the one checkpoint there is,
    the one the tracker would name -- says so, and logs the uninterrupted run's losses."""
    _, ref = reference
    save = tmp_path / "run"
    run = Run(corpus, save, env={ckpt.KILL_IN_SAVE_ENV: "2:renamed"})
    rc = run.wait()
    assert rc == -signal.SIGKILL, f"rc={rc}\n{run.output()}"
    assert (save / "iter_0000002").is_dir() and not (save / ckpt.TRACKER).exists()
    assert ckpt.find_checkpoint(str(save), fallback=False)[:2] == (2, str(save / "iter_0000002"))

    resumed = Run(corpus, save).wait_ok()
    out = resumed.output()
    assert f"no {ckpt.TRACKER}, and iter_0000002 is its only checkpoint, complete" in out, out
    assert f"resumed from {save}/iter_0000002 at iteration 2" in out, out
    assert_same_losses(train_losses(save), ref, 2)
    assert assert_checkpoints_sound(save, tmp_path) == [2, 4, 6, 8] and tracker(save) == 8


@pytest.mark.parametrize("sig, extra", [(signal.SIGTERM, ["--num-workers", "2"]),
                                        (signal.SIGINT, ["--exit-signal-handler"])],
                         ids=["SIGTERM_to_every_process_with_2_data_workers", "SIGINT_with_exit_signal_handler"])
def test_sigterm_saves_at_current_iteration_exits_zero_then_resume(corpus, reference, tmp_path, sig, extra):
    """SIGTERM (what SLURM sends, to every process of the job: `scancel --signal=TERM` reaches the
    DataLoader workers too, which must not die of it), or SIGINT with --exit-signal-handler: finish
    the iteration, save there, exit 0; the resume continues bit-identically."""
    _, ref = reference
    save = tmp_path / "run"
    run = Run(corpus, save, extra=extra)
    run.wait_for_iteration(3)
    if sig == signal.SIGTERM:
        os.killpg(run.proc.pid, sig)  # the run's own session: the trainer and its workers
    else:
        run.proc.send_signal(sig)
    _stopped_cleanly_then_resumes(run, corpus, save, ref, tmp_path, nproc=1)


def test_repeated_sigterm_is_one_clean_stop(tmp_path):
    """Under torchrun a worker gets SIGTERM twice in a row (SLURM's signal to the step, then
    torchrun's forward of its own): the second must not kill it before it saves. The trainer's
    own handlers, in a process of their own."""
    script = tmp_path / "signals.py"
    script.write_text(
        "import os, signal, time\n"
        "from tst_megatron.arguments import parse_args\n"
        "from tst_megatron.trainer import Trainer\n"
        "t = Trainer(parse_args(['--data-path', 'unused']))\n"
        "t._install_signal_handlers()\n"
        "for _ in range(2):\n"
        "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.2)\n"
        "print('alive, stop requested:', t.stop_signal, flush=True)\n")
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=_env(None))
    assert res.returncode == 0, (res.returncode, res.stdout, res.stderr)
    assert res.stdout == "alive, stop requested: True\n", res.stdout


def test_sigterm_to_the_process_group_spares_the_checkpoint_writers_manager(tmp_path):
    """megatron-core's saves report through a manager process; `scancel --signal=TERM` (or torchrun
    passing a signal on to the process group) reaches it too. The trainer starts it with SIGTERM
    ignored inside it, so it survives (a save running then still completes) while the trainer's
    own handler gets the signal, also from a thread that is not the main one. In a process of
    its own, in a session of its own (killpg)."""
    script = tmp_path / "manager.py"
    script.write_text(  # the main guard: the manager is spawned, and spawn imports the main module
        "import os, signal, time\n"
        "from megatron.core.dist_checkpointing.strategies import filesystem_async as fa\n"
        "from tst_megatron.arguments import parse_args\n"
        "from tst_megatron.run_checkpoints import _checkpoint_results_queue\n"
        "from tst_megatron.trainer import Trainer\n"
        "if __name__ == '__main__':\n"
        "    t = Trainer(parse_args(['--data-path', 'unused']))\n"
        "    t._install_signal_handlers()\n"
        "    import threading; threading.Thread(target=time.sleep, args=(5,), daemon=True).start()\n"
        "    _checkpoint_results_queue()\n"
        "    q = fa._results_queue\n"
        "    manager = q._manager._process\n"
        "    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, []), 'mask not restored'\n"
        "    os.killpg(os.getpgid(0), signal.SIGTERM); time.sleep(1.0)\n"
        "    q.put('written'); print(q.get(), manager.is_alive(), t.stop_signal, flush=True)\n"
        "    _checkpoint_results_queue(); print('kept', fa._results_queue is q, flush=True)\n"
        "    os.kill(manager.pid, signal.SIGKILL); manager.join(10)\n"
        "    _checkpoint_results_queue(); print('replaced', fa._results_queue is not q, flush=True)\n"
        "    print(fa._results_queue._manager._process.pid, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n")  # the trainer killed outright
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         env=_env(None), start_new_session=True)
    assert res.returncode == -signal.SIGKILL, (res.returncode, res.stdout, res.stderr)
    lines = res.stdout.splitlines()
    assert lines[:3] == ["written True True", "kept True", "replaced True"], (res.stdout, res.stderr)
    # the manager notices and ends (it would hold the trainer's stdout: subprocess.run returned, so
    # the pipe closed) rather than living on as an orphan that ignores SIGTERM
    manager = int(lines[3])
    deadline = time.time() + 10
    while _alive(manager) and time.time() < deadline:
        time.sleep(0.2)
    assert not _alive(manager), f"checkpoint manager {manager} outlived the trainer"


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper has ended)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return False


def test_a_run_in_process_puts_the_signal_handlers_back(corpus, tmp_path):
    """main() in a process that goes on (a notebook, a sweep driver): after a run, finished or
    refused, SIGTERM and SIGINT are what they were before it -- not a flag on a trainer that is gone."""
    script = tmp_path / "in_process.py"
    script.write_text(  # the main guard: the checkpoint manager is spawned, and spawn imports the main module
        "import signal, sys\n"
        "from tst_megatron.trainer import main\n"
        "if __name__ == '__main__':\n"
        "    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}\n"
        f"    args = ['--data-path', {str(corpus)!r}, *{BASE_ARGS!r}, '--exit-signal-handler']\n"
        "    try:\n"
        "        main(args + ['--exit-interval', '-1'])\n"
        "    except SystemExit as exc:\n"
        "        print('refused', 'exit-interval' in str(exc.code), flush=True)\n"
        "    print('restored', all(signal.getsignal(s) is h for s, h in before.items()), flush=True)\n"
        f"    print('trained', main(args + ['--train-iters', '4', '--save', {str(tmp_path / 'run')!r}]), flush=True)\n"
        "    print('restored', all(signal.getsignal(s) is h for s, h in before.items()), flush=True)\n")
    res = subprocess.run([sys.executable, str(script)], cwd=str(tmp_path), env=_env(None), capture_output=True,
                         text=True, timeout=RUN_TIMEOUT)
    assert res.returncode == 0, (res.stdout, res.stderr)
    got = [line for line in res.stdout.splitlines() if line.split(" ")[0] in ("refused", "restored", "trained")]
    assert got == ["refused True", "restored True", "trained 0", "restored True"], res.stdout


def test_sigterm_without_save_exits_non_zero(corpus, tmp_path):
    """SIGTERM to a run without --save: it stops after the iteration, says nothing was saved, and
    exits 143 (128 + SIGTERM) -- a job cut short with its work lost, not one a scheduler should
    record as done."""
    i = BASE_ARGS.index("--save-interval")
    args = BASE_ARGS[:i] + BASE_ARGS[i + 2:]
    metrics = tmp_path / "m" / "metrics.jsonl"
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen([sys.executable, SCRIPT, "--data-path", str(corpus), *args, "--train-iters", "100000",
                                 "--metrics-path", str(metrics)], cwd=str(tmp_path), env=_env(None), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + RUN_TIMEOUT
            while max(train_losses(metrics.parent, strict=False), default=0) < 2 and time.time() < deadline:
                assert proc.poll() is None, (tmp_path / "log").read_text()
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=RUN_TIMEOUT)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    out = (tmp_path / "log").read_text()
    assert rc == 128 + signal.SIGTERM, (rc, out)
    assert re.search(r"> exiting at iteration \d+ \(signal\); checkpoint: none saved \(no --save\); the steps "
                     r"since the start are lost", out), out


def test_sigterm_to_one_rank_of_two_stops_every_rank_at_the_same_iteration(corpus, reference_tp2, tmp_path):
    """A signal may reach only some ranks (SLURM signals the batch step; a node may be drained).
    Rank 1 alone gets SIGTERM: the ranks agree (an all-reduce of the stop flag) and all stop after
    the same iteration, save one complete checkpoint there, exit 0; the resume is bit-identical."""
    _, ref = reference_tp2
    save = tmp_path / "run"
    run, pids = _tp2_run_at_iteration_3(corpus, save)
    os.kill(pids[1], signal.SIGTERM)
    _stopped_cleanly_then_resumes(run, corpus, save, ref, tmp_path, nproc=2)


def _stopped_cleanly_then_resumes(run, corpus, save, ref, tmp_path, nproc):
    """A signalled run: exit 0 after iteration >= 3, one sound checkpoint where it stopped, and a
    resume in a fresh process that logs the uninterrupted run's losses bit for bit."""
    rc = run.wait()
    out = run.output()
    assert rc == 0, f"a signal must end the whole run cleanly (rc={rc})\n{out}"
    stopped = max(train_losses(save))
    assert 3 <= stopped < TRAIN_ITERS, f"stopped at {stopped}\n{out}"
    assert f"> exiting at iteration {stopped} (signal); checkpoint: {save}/iter_{stopped:07d}" in out
    assert tracker(save) == stopped and assert_checkpoints_sound(save, tmp_path)[-1] == stopped

    resumed = Run(corpus, save, nproc=nproc).wait_ok()
    assert f"at iteration {stopped}" in resumed.output()
    assert_same_losses(train_losses(save), ref, stopped)
    assert assert_checkpoints_sound(save, tmp_path)[-1] == TRAIN_ITERS


def test_a_failed_save_is_explained_and_puts_nothing_in_place(corpus, tmp_path):
    """A save that fails for real -- here a file-size quota (RLIMIT_FSIZE: the checkpoint's shard is
    the first file past it) -- stops the run with exit 1 and a message naming the iteration, the
    directory, the cause and the last good checkpoint, and an error record; nothing is put in
    place (no iteration directory, no tracker), so a later --load sees no half-written state."""
    import resource

    save = tmp_path / "run"

    def quota():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), not kills
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))

    res = subprocess.run([sys.executable, SCRIPT, "--data-path", str(corpus), *BASE_ARGS, "--save", str(save)],
                         cwd=str(tmp_path), env=_env(None), preexec_fn=quota, capture_output=True, text=True,
                         timeout=RUN_TIMEOUT)
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    msg = next((line for line in res.stdout.splitlines() if line.startswith("error: saving")), None)
    assert msg is not None, out
    assert msg.startswith(f"error: saving the checkpoint of iteration {SAVE_INTERVAL} to {save} failed ("), msg
    assert msg.endswith(
        "nothing of it was put in place. Last good checkpoint: none. Free space or fix --save, then resume "
        "with --load"), msg
    assert not [p for p in save.iterdir() if p.name.startswith("iter_") and not p.name.endswith(".tmp")]
    assert not (save / ckpt.TRACKER).exists()
    errors = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()
              if '"error"' in line]
    assert [e["iteration"] for e in errors] == [SAVE_INTERVAL] and errors[0]["message"] == msg


def test_a_failed_tracker_update_names_the_complete_checkpoint(corpus, tmp_path):
    """Only the last step of a save fails -- the tracker update (here: a directory stands where the
    tracker goes): the message says the iteration directory is complete and the tracker was not
    updated, not that nothing was put in place."""
    save = tmp_path / "run"
    (save / ckpt.TRACKER).mkdir(parents=True)
    res = subprocess.run([sys.executable, SCRIPT, "--data-path", str(corpus), *BASE_ARGS, "--save", str(save),
                          "--train-iters", "4"], cwd=str(tmp_path), env=_env(None), capture_output=True, text=True,
                         timeout=RUN_TIMEOUT)
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    msg = next((line for line in res.stdout.splitlines() if line.startswith("error: saving")), None)
    assert msg is not None and "Traceback" not in out, out
    assert (f"{save}/iter_{SAVE_INTERVAL:07d} is complete, but {ckpt.TRACKER} could not be updated to name it. "
            "Last good checkpoint: none.") in msg, msg
    ckpt.verify_checkpoint_dir(str(save / f"iter_{SAVE_INTERVAL:07d}"))


def test_exit_duration_in_mins_saves_and_exits_zero_then_resume(corpus, reference, tmp_path):
    """--exit-duration-in-mins: the time budget (here 0: spent after the first iteration) ends the
    run like a SIGTERM would -- checkpoint at the current iteration, exit 0 -- and the resume
    (without the flag) continues with bit-identical losses."""
    _, ref = reference
    save = tmp_path / "run"
    run = Run(corpus, save, extra=["--exit-duration-in-mins", "0"])
    rc = run.wait()
    out = run.output()
    assert rc == 0, out
    assert f"> exiting at iteration 1 (--exit-duration-in-mins); checkpoint: {save}/iter_0000001" in out, out
    assert tracker(save) == 1 and assert_checkpoints_sound(save, tmp_path) == [1]
    Run(corpus, save).wait_ok()
    assert_same_losses(train_losses(save), ref, 1)


def test_rank0_file_step_failure_reaches_every_rank(tmp_path):
    """The rank-0-only steps of a save (the marker, the renames, the tracker) failing on rank 0: every
    rank raises (the trainer then reports it and exits) instead of waiting at a barrier; a --save
    that is not one filesystem for all ranks (node-local disks) is refused on every rank before
    anything is written (worker `rank0_agreement`, 2 Gloo ranks)."""
    import dist_utils

    results = dist_utils.launch("rank0_agreement", tmp_path, nproc=2, timeout=120)
    names = dist_utils.check_records(results, expected_prefixes=["rank0_agreement/success_seen",
                                                                "rank0_agreement/failure_raises_everywhere",
                                                                "rank0_agreement/shared_save_directory_accepted",
                                                                "rank0_agreement/node_local_save_refused_everywhere"])
    assert len(names) == 4, names


DAMAGE_KINDS = ["delete_shard", "truncate_shard", "truncate_index", "delete_index", "truncate_metadata_json",
                "delete_metadata_json", "delete_common_pt", "empty_common_pt", "corrupt_common_pt",
                "delete_marker", "garble_marker", "marker_not_an_object",
                "marker_not_complete", "delete_tracker", "garble_tracker", "binary_tracker", "unicode_digit_tracker",
                "tracker_names_missing_dir"]


@pytest.mark.parametrize("damage", DAMAGE_KINDS)
def test_damaged_checkpoint_is_named_by_find_checkpoint(reference, tmp_path, damage):
    """Each damage the load checks detect (docs/reliability.md, "Atomic checkpoints"): the error
    names the checkpoint (or the tracker) and what is wrong and points to --ckpt-fallback; with
    --ckpt-fallback the newest complete checkpoint is taken (iteration 6 when iteration 8 is
    damaged; 8 itself when only the tracker is); nothing on disk is changed either way."""
    src, _ = reference
    save = tmp_path / "run"
    shutil.copytree(src, save)
    latest = save / "iter_0000008"
    track = save / ckpt.TRACKER
    fallback_to = 6
    if damage == "delete_shard":
        (latest / "__0_1.distcp").unlink()
        why = f"checkpoint {latest} is damaged: shard __0_1.distcp is missing"
    elif damage == "truncate_shard":
        p = latest / "__0_0.distcp"
        size = p.stat().st_size
        os.truncate(p, size // 2)
        why = f"checkpoint {latest} is damaged: shard __0_0.distcp is truncated ({size // 2} bytes, the index needs"
    elif damage == "truncate_index":
        os.truncate(latest / ".metadata", 100)
        why = f"checkpoint {latest} is damaged: torch_dist index .metadata unreadable ("
    elif damage == "delete_index":
        (latest / ".metadata").unlink()
        why = f"checkpoint {latest} is damaged: torch_dist index .metadata is missing"
    elif damage == "truncate_metadata_json":
        os.truncate(latest / "metadata.json", 10)
        why = f"checkpoint {latest} is damaged: metadata.json unreadable ("
    elif damage == "delete_metadata_json":
        (latest / "metadata.json").unlink()
        why = f"checkpoint {latest} is damaged: torch_dist metadata.json is missing"
    elif damage == "delete_common_pt":
        (latest / "common.pt").unlink()
        why = f"checkpoint {latest} is damaged: common.pt is missing"
    elif damage == "empty_common_pt":
        os.truncate(latest / "common.pt", 0)
        why = f"checkpoint {latest} is damaged: common.pt unreadable ("
    elif damage == "corrupt_common_pt":  # one flipped byte inside a stored member: its CRC no longer matches
        import struct
        import zipfile
        with zipfile.ZipFile(latest / "common.pt") as archive:
            info = max(archive.infolist(), key=lambda i: i.file_size)
        data = bytearray((latest / "common.pt").read_bytes())
        name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
        start = info.header_offset + 30 + name_len + extra_len  # the local header's own lengths
        data[start + info.file_size // 2] ^= 0xFF
        (latest / "common.pt").write_bytes(bytes(data))
        why = f"checkpoint {latest} is damaged: common.pt member {info.filename} is corrupt"
    elif damage == "delete_marker":
        (latest / ckpt.MARKER).unlink()
        why = f"checkpoint {latest} is incomplete: {ckpt.MARKER} is missing (the save was interrupted)"
    elif damage == "garble_marker":
        os.truncate(latest / ckpt.MARKER, 5)
        why = f"checkpoint {latest} is damaged: {ckpt.MARKER} unreadable ("
    elif damage == "marker_not_an_object":  # valid JSON, but not the marker's object
        (latest / ckpt.MARKER).write_text("[1]")
        why = f"checkpoint {latest} is damaged: {ckpt.MARKER} is not a JSON object"
    elif damage == "marker_not_complete":
        meta = json.loads((latest / ckpt.MARKER).read_text())
        (latest / ckpt.MARKER).write_text(json.dumps(dict(meta, complete=False)))
        why = f"checkpoint {latest} is not marked complete"
    elif damage == "delete_tracker":
        track.unlink()
        why, fallback_to = f"{track} is missing", 8
    elif damage == "garble_tracker":
        track.write_text("iter_8\n")
        why, fallback_to = f"{track} does not hold an iteration number ('iter_8')", 8
    elif damage == "binary_tracker":  # not even text
        track.write_bytes(b"\xff\xfe8")
        why, fallback_to = f"{track} does not hold an iteration number (bytes b'\\xff\\xfe8')", 8
    elif damage == "unicode_digit_tracker":  # str.isdigit() says yes, int() says no
        track.write_text("\u00b2")
        why, fallback_to = f"{track} does not hold an iteration number (bytes b'\\xc2\\xb2')", 8
    else:  # the tracker names an iteration whose directory is gone
        track.write_text("10")
        why, fallback_to = f"checkpoint directory {save / 'iter_0000010'} does not exist", 8
    before = snapshot(save)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.find_checkpoint(str(save), fallback=False)
    assert why in str(err.value), str(err.value)
    assert str(err.value).endswith(". Pass --ckpt-fallback to resume from the newest complete checkpoint "
                                   "instead, or point --load elsewhere"), str(err.value)
    it, path, meta = ckpt.find_checkpoint(str(save), fallback=True)
    assert (it, path) == (fallback_to, str(save / f"iter_{fallback_to:07d}")) and meta["iteration"] == fallback_to
    assert snapshot(save) == before, "detecting the damage must not change anything on disk"


def test_damaged_latest_checkpoint_refused_then_fallback_resumes(corpus, reference, tmp_path):
    src, ref = reference
    save = tmp_path / "run"
    shutil.copytree(src, save)
    latest = save / "iter_0000008"
    (latest / "__0_1.distcp").unlink()
    before, metrics_before = snapshot(save), (save / "metrics.jsonl").read_text()

    refused = Run(corpus, save)
    rc = refused.wait()
    out = refused.output()
    assert rc != 0
    assert f"error: checkpoint {latest} is damaged: shard __0_1.distcp is missing" in out, out
    assert "Pass --ckpt-fallback" in out
    assert snapshot(save) == before and (save / "metrics.jsonl").read_text() == metrics_before, \
        "a refused resume must not touch the run directory"

    resumed = Run(corpus, save, extra=["--ckpt-fallback"]).wait_ok()
    assert f"resumed from {save}/iter_0000006 at iteration 6" in resumed.output()
    assert_same_losses(train_losses(save), ref, 6)
    assert assert_checkpoints_sound(save, tmp_path) == [2, 4, 6, 8]  # the damaged one was replaced


def test_data_stream_out_of_step_with_the_phase_stops_before_the_update(corpus, reference, tmp_path):
    """A checkpoint whose data position disagrees with its iteration (a bug, or a resume the
    preflight checks missed; provoked here by editing the saved `superposition_samples` of the
    iteration-4 checkpoint from 24 to 40): the next step, a recovery step, is fed superposition
    bags (samples 32-39 of the stream now lie in the superposition block). The layout check after
    the forward-backward pass stops the run before the optimizer update, with the message, and
    nothing is saved."""
    save = _resume_dir_at(reference, tmp_path, 4)
    it4 = save / "iter_0000004"
    common = torch.load(it4 / "common.pt", weights_only=False)
    assert (common["tst_common"]["consumed_samples"], common["tst_common"]["superposition_samples"]) == (32, 24)
    common["tst_common"]["superposition_samples"] = 40
    torch.save(common, it4 / "common.pt")
    meta = json.loads((it4 / ckpt.MARKER).read_text())
    (it4 / ckpt.MARKER).write_text(json.dumps(dict(meta, superposition_samples=40)))
    before = snapshot(save)

    run = Run(corpus, save)
    rc = run.wait()
    out = run.output()
    assert rc == 1, f"rc={rc}\n{out}"
    # 8 samples x 32 positions: s = 4 tokens (and 4 labels) per position fed, 1 expected
    assert ("error: iteration 5 (recovery phase): the data stream fed 1024 input and 1024 label elements, the "
            "phase expects 256 and 256; the data position (32 consumed samples) is out of step with the phase "
            "-- please report this with the command line (and the --load checkpoint's tst_meta.json)") in out, out
    assert snapshot(save) == before, "no checkpoint may be written or touched after the refused step"
    assert tracker(save) == 4 and not list(save.glob("iter_0000005*")) and not list(save.glob("*.tmp"))
    assert sorted(train_losses(save)) == [1, 2, 3, 4], "the refused step must not be logged"


def test_finished_run_resumed_keeps_its_checkpoint_untouched(corpus, reference, tmp_path):
    """Resuming a finished run evaluates again but does not write its last checkpoint again (here
    with --no-load-optim and a save interval that does not land on the last iteration, so the
    final save would run): the state on disk is the one loaded, Adam moments included, which a
    re-save from a fresh optimizer would have lost."""
    src, _ = reference
    save = tmp_path / "run"
    shutil.copytree(src, save)
    before = snapshot(save)
    run = Run(corpus, save, extra=["--no-load-optim", "--save-interval", "3"]).wait_ok()
    assert f"resumed from {save}/iter_0000008 at iteration 8" in run.output()
    assert "checkpoint of iteration 8 is already on disk" in run.output(), run.output()
    assert snapshot(save) == before
    records = [json.loads(x) for x in (save / "metrics.jsonl").read_text().splitlines()]
    evals = [r["iteration"] for r in records if r.get("type") == "eval"]
    assert evals.count(8) == 1, f"the final evaluation is recorded once, not once per relaunch: {evals}"
    assert sorted(train_losses(save)) == list(range(1, TRAIN_ITERS + 1))


def test_crash_between_the_renames_of_a_resave_leaves_a_loadable_checkpoint(corpus, reference, tmp_path):
    """Re-saving iteration N swaps iter_N -> iter_N.old, iter_N.tmp -> iter_N. A crash between
    the two renames leaves the tracker naming a missing iter_N: loading takes the complete new
    copy (.tmp), or the old one when only it is left, and the resumed run matches the reference."""
    _, ref = reference
    save = _resume_dir_at(reference, tmp_path, 6)
    final = save / "iter_0000006"
    shutil.copytree(final, f"{final}.tmp")  # the new save: complete (marker written) before the renames
    os.rename(final, f"{final}.old")
    assert tracker(save) == 6 and not final.exists()
    assert ckpt.find_checkpoint(str(save), fallback=False)[:2] == (6, f"{final}.tmp")
    shutil.rmtree(f"{final}.tmp")  # a crash during the first rename's cleanup: only .old is left
    assert ckpt.find_checkpoint(str(save), fallback=False)[:2] == (6, f"{final}.old")

    resumed = Run(corpus, save).wait_ok()
    assert f"resumed from {final}.old at iteration 6" in resumed.output()
    assert_same_losses(train_losses(save), ref, 6)
    assert assert_checkpoints_sound(save, tmp_path) == [2, 4, 8]


def _resume_dir_at(reference, tmp_path, iteration):
    src, _ = reference
    save = tmp_path / "run"
    shutil.copytree(src, save)
    keep_only(save, iteration)
    return save


def test_nonfinite_step_stops_without_saving(corpus, reference, tmp_path):
    save = _resume_dir_at(reference, tmp_path, 2)
    before = snapshot(save)
    # 0-based iteration 2 is the third step: still in the superposition phase
    run = Run(corpus, save, extra=["--inject-nonfinite-at", "2"])
    rc = run.wait()
    out = run.output()
    assert rc != 0, out
    assert (f"error: non-finite value (loss nan) at iteration 3 in the superposition phase; stopping "
            f"without saving. Last good checkpoint: {save}/iter_0000002.") in out, out
    # the first step after the load: a checkpoint damaged in place (same sizes) would show here first
    assert (f"; this is the first step after loading {save}/iter_0000002: if the run was finite before, suspect "
            "that checkpoint's files") in out, out
    assert snapshot(save) == before, "no checkpoint may be written or touched after a non-finite step"
    assert tracker(save) == 2 and assert_checkpoints_sound(save, tmp_path) == [2]
    errors = [json.loads(x) for x in (save / "metrics.jsonl").read_text().splitlines()
              if json.loads(x).get("type") == "error"]
    assert errors and errors[-1]["iteration"] == 3 and errors[-1]["phase"] == "superposition"


def test_nonfinite_gradient_with_finite_loss_stops_without_saving(corpus, reference, tmp_path):
    """An overflowed gradient (one Inf) behind a finite loss: caught by the gradient check before
    the optimizer step, named as a gradient problem, nothing written."""
    save = _resume_dir_at(reference, tmp_path, 2)
    before = snapshot(save)
    run = Run(corpus, save, extra=["--inject-nonfinite-at", "2", "--inject-nonfinite-kind", "grad"])
    rc = run.wait()
    out = run.output()
    assert rc != 0, out
    assert re.search(r"error: non-finite value \(NaN/Inf gradient, loss \d+\.\d{4}\) at iteration 3 in the "
                     r"superposition phase; stopping without saving\. Last good checkpoint: "
                     + re.escape(f"{save}/iter_0000002."), out), out
    assert snapshot(save) == before
    assert tracker(save) == 2 and assert_checkpoints_sound(save, tmp_path) == [2]


def test_nonfinite_step_skipped_with_skip_nonfinite_steps(corpus, reference, tmp_path):
    _, ref = reference
    save = _resume_dir_at(reference, tmp_path, 4)
    run = Run(corpus, save, extra=["--inject-nonfinite-at", "5", "--skip-nonfinite-steps", "1"]).wait_ok()
    assert "WARNING: skipped iteration 6 (recovery): non-finite loss or gradient (1/1 allowed)" in run.output()
    losses = train_losses(save)
    assert sorted(losses) == list(range(1, TRAIN_ITERS + 1))
    assert losses[5] == ref[5]  # before the bad step: the same run
    assert math.isnan(losses[6])  # the skipped step
    assert all(math.isfinite(losses[i]) for i in (7, 8))  # training went on from the pre-step state
    assert assert_checkpoints_sound(save, tmp_path) == [2, 4, 6, 8]


def test_skipped_gradient_overflow_leaves_the_logged_means_finite(corpus, reference, tmp_path):
    """A finite loss with an Inf gradient, skipped (--skip-nonfinite-steps 1), inside a 2-step log
    interval: the record covering it averages only the step that trained -- finite loss and grad
    norm, valid JSON (no NaN) -- and training goes on."""
    save = _resume_dir_at(reference, tmp_path, 4)
    run = Run(corpus, save, extra=["--inject-nonfinite-at", "4", "--inject-nonfinite-kind", "grad",
                                   "--skip-nonfinite-steps", "1", "--log-interval", "2"]).wait_ok()
    assert "WARNING: skipped iteration 5 (recovery)" in run.output()
    text = (Path(save) / "metrics.jsonl").read_text()
    recs = [json.loads(x, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))
            for x in text.splitlines()]
    after = [r for r in recs if r.get("type") == "train" and r["iteration"] > 4]
    assert [r["iteration"] for r in after] == [6, 8]
    for r in after:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0, r


def test_running_out_of_skip_nonfinite_steps_stops_without_saving(corpus, reference, tmp_path):
    """Two poisoned steps with --skip-nonfinite-steps 1 (resumed from 2): step 3 (superposition) is
    skipped, step 4 trains and is saved, step 5 (recovery) exhausts the allowance: the run stops
    with code 1 and the message naming iteration 5, the recovery phase and iter_0000004 as the last
    good checkpoint; nothing is written after the poison."""
    save = _resume_dir_at(reference, tmp_path, 2)
    before = snapshot(save)
    run = Run(corpus, save, extra=["--inject-nonfinite-at", "2", "4", "--skip-nonfinite-steps", "1"])
    rc = run.wait()
    out = run.output()
    assert rc == 1, f"rc={rc}\n{out}"
    assert "WARNING: skipped iteration 3 (superposition): non-finite loss or gradient (1/1 allowed)" in out, out
    assert (f"error: non-finite value (loss nan) at iteration 5 in the recovery phase; stopping without saving. "
            f"Last good checkpoint: {save}/iter_0000004. Lower --lr, check the data, or allow skips with "
            "--skip-nonfinite-steps N") in out, out
    assert "first step after loading" not in out, out
    losses = train_losses(save)
    assert sorted(losses) == [1, 2, 3, 4] and math.isnan(losses[3]) and math.isfinite(losses[4])
    # the files of iteration 2 untouched; the only new ones: iteration 4's checkpoint and the tracker
    after = snapshot(save)
    assert before - after == {x for x in before if x[0] == ckpt.TRACKER}
    assert {Path(x[0]).parts[0] for x in after - before} == {"iter_0000004", ckpt.TRACKER}
    assert tracker(save) == 4 and assert_checkpoints_sound(save, tmp_path) == [2, 4]
    assert not list(save.glob("*.tmp"))
    errors = [json.loads(x) for x in (save / "metrics.jsonl").read_text().splitlines()
              if json.loads(x).get("type") == "error"]
    assert [(e["iteration"], e["phase"]) for e in errors] == [(5, "recovery")]
    # the allowance is the run's, not each process's: resumed from 4 (one step skipped before it),
    # the next poisoned step stops the run again
    run = Run(corpus, save, extra=["--inject-nonfinite-at", "4", "--skip-nonfinite-steps", "1"])
    assert run.wait() == 1 and "error: non-finite value (loss nan) at iteration 5" in run.output(), run.output()
