"""Fault tests of pretrain_tst.py: kill -9, a crash inside a checkpoint save, SIGTERM, a damaged
checkpoint and non-finite steps -- each followed by a resume.

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

    def __init__(self, data, save, extra=(), nproc=1, env=None, load=True):
        self.save = Path(save)
        self.log_path = self.save.parent / f"{self.save.name}.{time.time_ns()}.log"
        argv = ["--data-path", str(data), *BASE_ARGS, "--save", str(save), *extra]
        if load:
            argv += ["--load", str(save)]
        if nproc == 1:
            cmd = [sys.executable, SCRIPT, *argv]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                   "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), SCRIPT, *argv, *TP2]
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


@pytest.mark.parametrize("sig, extra", [(signal.SIGTERM, []), (signal.SIGINT, ["--exit-signal-handler"])],
                         ids=["SIGTERM", "SIGINT_with_exit_signal_handler"])
def test_sigterm_saves_at_current_iteration_exits_zero_then_resume(corpus, reference, tmp_path, sig, extra):
    """SIGTERM (what SLURM sends), or SIGINT with --exit-signal-handler: finish the iteration, save
    there, exit 0; the resume continues bit-identically."""
    _, ref = reference
    save = tmp_path / "run"
    run = Run(corpus, save, extra=extra)
    run.wait_for_iteration(3)
    run.proc.send_signal(sig)
    _stopped_cleanly_then_resumes(run, corpus, save, ref, tmp_path, nproc=1)


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


@pytest.mark.parametrize("damage", ["delete_shard", "truncate_shard", "truncate_index", "truncate_metadata_json"])
def test_damaged_checkpoint_is_named_by_find_checkpoint(reference, tmp_path, damage):
    src, _ = reference
    save = tmp_path / "run"
    shutil.copytree(src, save)
    latest = save / "iter_0000008"
    if damage == "delete_shard":
        (latest / "__0_1.distcp").unlink()
        why = "shard __0_1.distcp is missing"
    elif damage == "truncate_shard":
        p = latest / "__0_0.distcp"
        os.truncate(p, p.stat().st_size // 2)
        why = "shard __0_0.distcp is truncated"
    elif damage == "truncate_index":
        os.truncate(latest / ".metadata", 100)
        why = "torch_dist index .metadata unreadable"
    else:
        os.truncate(latest / "metadata.json", 10)
        why = "metadata.json unreadable"
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.find_checkpoint(str(save), fallback=False)
    assert f"checkpoint {latest} is damaged: {why}" in str(err.value)
    assert "--ckpt-fallback" in str(err.value)
    it, path, _ = ckpt.find_checkpoint(str(save), fallback=True)
    assert (it, path) == (6, str(save / "iter_0000006"))


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
