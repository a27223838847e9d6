"""The trainer's checkpoint side: what a checkpoint records of the run, saving, resuming, and
taking only the weights (--finetune).

A mixin of `Trainer` (tst_megatron/trainer.py), kept apart so that the loop reads on its own; it
uses the trainer's model, optimizer, scheduler, datasets and progress counters.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Optional

from torch.distributed.checkpoint.api import CheckpointException

from . import checkpointing as ckpt
from . import preflight
from .arguments import fail, same_dir
from .builders import schedule_position
from .distributed import from_rank0




def _checkpoint_manager_init(trainer_pid: int) -> None:
    """Runs first in the checkpoint results' manager process: SIGTERM ignored (the trainer decides
    when to stop), and the process ends once the trainer that started it is gone."""
    import signal
    import threading

    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def exit_with_the_trainer():
        while os.getppid() == trainer_pid:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=exit_with_the_trainer, name="trainer-watch", daemon=True).start()


def _checkpoint_results_queue() -> None:
    """megatron-core's saves report through a manager process it starts at the first save and keeps
    (spawned, so without the trainer's signal handler). A SIGTERM sent to every process of the job
    (`scancel --signal=TERM`, torchrun passing a signal on to the process group) would kill it --
    during a save, that save fails -- and every later save (first of all the one the trainer makes
    to stop cleanly) with a broken pipe. So the trainer starts it itself, the way megatron-core
    does but with SIGTERM ignored inside it (the trainer's own handling is untouched), and drops a
    dead one (killed otherwise) before each save. It ends with the trainer: multiprocessing shuts it
    down at exit, and a trainer killed outright (SIGKILL, OOM) is noticed by the manager itself
    (`_checkpoint_manager_init`), which would otherwise live on holding the trainer's stdout (a
    `| tee` never ending) and a few hundred MB, one more per torchrun restart."""
    import multiprocessing
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    queue = getattr(filesystem_async, "_results_queue", None)
    if queue is not None:
        try:
            queue.qsize()
            return
        except (OSError, EOFError):  # broken pipe, connection refused or reset
            filesystem_async._results_queue = None
    for attempt in (1, 2):
        manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
        try:
            manager.start(initializer=_checkpoint_manager_init, initargs=(os.getpid(),))
            break
        except (EOFError, OSError):  # a SIGTERM before the initializer ran (the child imports
            if attempt == 2:         # __main__ first, seconds): the trainer has it too; once more
                raise
    filesystem_async._results_queue = manager.Queue()  # the proxy keeps its manager alive


class RunCheckpoints:
    def _start_point(self):
        """(resume, finetune source): the checkpoint this run continues, as (iteration, path, meta),
        or the path of the one whose weights it starts from (--finetune; --pretrained-checkpoint
        when --load holds none). Both checked against this run's flags; may set self.vocab_size to
        the checkpoint's padded vocabulary."""
        cfg = check_cfg = self.cfg  # check_cfg: the flags the checks see
        c = cfg.ckpt
        found, flag = None, "--load"  # flag: the one that named the checkpoint, for the messages
        if c.load and (os.path.isdir(c.load) or c.pretrained_checkpoint is None):
            found = self._find(c.load, "--load")
            if found is None:
                if os.path.isfile(os.path.join(c.load, ckpt.MARKER)):
                    fail(f"--load {c.load}: this is one checkpoint's iteration directory; give the directory that "
                         f"holds it (--load {os.path.dirname(os.path.abspath(c.load))}), whose {ckpt.TRACKER} names "
                         "the iteration to resume")
                elif c.pretrained_checkpoint:
                    pass  # the first start of a fine-tuning job: from the pretrained weights (below)
                elif c.exit_on_missing_checkpoint:
                    fail(f"--load {c.load}: no checkpoint there (no {ckpt.TRACKER} and no iter_* directories) and "
                         "--exit-on-missing-checkpoint is set; stopping before any compute")
                elif not same_dir(c.load, c.save):  # else: the first start of a requeue-friendly job
                    fail(f"--load {c.load}: the directory holds no checkpoint (no {ckpt.TRACKER} and no iter_* "
                         "directories)")
        if found is None and c.pretrained_checkpoint:
            found, flag = self._find(c.pretrained_checkpoint, "--pretrained-checkpoint"), "--pretrained-checkpoint"
            if found is None:
                hint = (f"; this is one checkpoint's iteration directory: give the directory that holds it "
                        f"({os.path.dirname(os.path.abspath(c.pretrained_checkpoint))})"
                        if os.path.isfile(os.path.join(c.pretrained_checkpoint, ckpt.MARKER)) else "")
                fail(f"--pretrained-checkpoint {c.pretrained_checkpoint}: the directory holds no checkpoint (no "
                     f"{ckpt.TRACKER} and no iter_* directories){hint}")
            # as Megatron-LM does: its weights start a new run (the checks below relax as for --finetune)
            check_cfg = dataclasses.replace(cfg, ckpt=dataclasses.replace(c, finetune=True))
            if self.rank == 0:
                print(f"> no checkpoint in --load {c.load}: fine-tuning from --pretrained-checkpoint "
                      f"{c.pretrained_checkpoint}" if c.load else
                      f"> fine-tuning from --pretrained-checkpoint {c.pretrained_checkpoint}", flush=True)
        if found is None:
            return None, None
        finetune = check_cfg.ckpt.finetune
        if cfg.logging.skip_train and not finetune:
            # an evaluation of the weights: only what they are (shape, tokenizer) must match, as for
            # --finetune; the schedule and TST flags of a run that trains nothing do not matter
            check_cfg = dataclasses.replace(cfg, ckpt=dataclasses.replace(c, finetune=True))
        preflight.check_resume_compatible(check_cfg, found[2], found[1], flag)
        # a fine-tuning run starts its own data stream: only the tokenizer must be the same
        preflight.check_resume_data(check_cfg, found[2], found[1], self.rank == 0 and not check_cfg.ckpt.finetune,
                                    flag)
        self.vocab_size = preflight.resume_vocab_size(check_cfg, found[2], found[1], self.vocab_size,
                                                      self.tokenizer.vocab_size, self.rank == 0)
        return (None, found[1]) if finetune else (found, None)

    def _find(self, directory: str, flag: str):
        """Rank 0 picks the checkpoint and every rank takes its pick: ranks whose views of a shared
        filesystem differ (stale NFS caches; a shard seen at another size under --ckpt-fallback)
        must not resume from different iterations."""
        def pick():  # (found, error)
            try:
                return ckpt.find_checkpoint(directory, self.cfg.ckpt.ckpt_fallback), None
            except ckpt.CheckpointError as exc:
                return None, str(exc) if flag == "--load" else f"{flag}: {exc}"
            except Exception as exc:  # noqa: BLE001 -- e.g. an unreadable tracker: every rank must hear of it
                return None, f"{flag} {directory}: cannot read its checkpoints ({type(exc).__name__}: {exc})"

        found, error = from_rank0(pick)
        if error is not None:
            fail(error)
        if found is not None and self.rank == 0 and ckpt.first_save_without_tracker(directory, found[1]):
            print(f"> {flag} {directory}: no {ckpt.TRACKER}, and {os.path.basename(found[1])} is its only "
                  "checkpoint, complete (a first save stopped before its tracker was written): resuming from it",
                  flush=True)
        return found

    def _checkpoint_group(self, fully_parallel: bool):
        """The data-parallel group megatron-core's fully parallel save / load spreads the
        replicated tensors over (Megatron-LM's choice), or None: off, or nothing to spread."""
        if not fully_parallel or self.dp_size == 1:
            return None
        return self.ps.get_data_parallel_group(with_context_parallel=True)

    def _elapsed_agreed(self) -> float:
        """Training seconds so far, the same on every rank (the slowest rank's): the common state
        must be identical on all ranks, or dist_checkpointing warns at every save."""
        import torch
        import torch.distributed as dist

        value = torch.tensor([self.elapsed_before + self.timer.elapsed()], dtype=torch.float64, device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return float(value.item())

    def _common_state(self) -> dict:
        """Collective (every rank calls it at the same save)."""
        return {"consumed_samples": self.consumed_samples, "data_tokens": self.data_tokens,
                "positions": self.positions, "phase": self.phase(self.iteration),
                "superposition_samples": self.superposition_samples,
                "train_base_windows": len(self.datasets.train.base),
                "train_base_samples": self.datasets.num_base_train_samples,
                "elapsed_s": self._elapsed_agreed(),
                # at the switch itself the model has had no next-token step yet
                "superposition_checkpoint": 0 < self.num_sup_iters and self.iteration <= self.num_sup_iters,
                "superposition_iters": self.num_sup_iters, "vocab_size": self.vocab_size,
                "tokenizer_vocab_size": self.tokenizer.vocab_size, "args": self.cfg.recorded_dict(),
                "finetuned_from": self.finetuned_from, "run_id": self.run_id,
                "skipped_nonfinite": self.skipped_nonfinite,
                # where the LR schedule stands (skipped steps did not advance it), for a resume that
                # starts a fresh optimizer and scheduler (--no-load-optim, --no-save-optim)
                "scheduler_steps": int(self.scheduler.num_steps)}

    def save(self) -> None:
        c = self.cfg.ckpt
        if not c.save:
            return
        if self._on_disk == self.iteration:
            # Resumed from this very checkpoint and took no step since: what is on disk is this
            # state (with its optimizer moments even under --no-load-optim), so writing it again
            # could only lose something.
            self.log.print(f"  checkpoint of iteration {self.iteration} is already on disk ({self.last_checkpoint}); "
                           "not saved again")
            return
        t0 = time.time()
        try:
            _checkpoint_results_queue()
            with self._parameters_gathered():
                path = ckpt.save_checkpoint(c.save, self.iteration, self.model, self.optimizer, self.scheduler,
                                            self._common_state(), self.cfg.parallel.use_distributed_optimizer,
                                            save_optim=not c.no_save_optim, save_rng=not c.no_save_rng,
                                            parallel_group=self._checkpoint_group(c.ckpt_fully_parallel_save))
        except (Exception, CheckpointException) as exc:  # a full disk, a quota, a vanished mount: said
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]  # torch's: a traceback
            marker = os.path.join(ckpt.iteration_dir(c.save, self.iteration), ckpt.MARKER)
            if os.path.isfile(marker) and os.path.getmtime(marker) >= t0:  # the last step, the tracker, failed
                placed = (f"{os.path.dirname(marker)} is complete, but {ckpt.TRACKER} could not be updated to "
                          "name it")
            else:
                placed = "nothing of it was put in place"
            msg = (f"error: saving the checkpoint of iteration {self.iteration} to {c.save} failed "
                   f"({type(exc).__name__}: {lines[-1] if lines else ''}); {placed}. "
                   f"Last good checkpoint: {self.last_checkpoint or 'none'}. Free space or fix --save, then "
                   "resume with --load")
            print(msg if self.world == 1 else f"[rank {self.rank}] {msg}", flush=True)
            self.log.record({"type": "error", "iteration": self.iteration, "message": msg})
            self.log.close()
            raise SystemExit(1) from exc
        self.last_checkpoint = path
        self._on_disk = self.iteration
        note = (" (superposition phase: not a usable next-token model yet)"
                if 0 < self.num_sup_iters and self.iteration <= self.num_sup_iters else "")
        self.log.print(f"  saved checkpoint at iteration {self.iteration} to {path} in {time.time() - t0:.1f}s{note}")

    def _load(self, path: str) -> None:
        c = self.cfg.ckpt
        meta = ckpt.read_meta(path)
        saved_par = meta.get("args", {}).get("parallel", {})
        same_layout = (saved_par.get("tensor_model_parallel_size") == self.cfg.parallel.tensor_model_parallel_size
                       and saved_par.get("pipeline_model_parallel_size") == self.cfg.parallel.pipeline_model_parallel_size)
        # the model-parallel RNG tracker holds CPU generator states on a CPU and CUDA ones on a GPU:
        # a checkpoint moved between the two cannot restore them (older ones do not say: as before)
        same_device = meta.get("rng_device", self.device.type) == self.device.type
        load_rng = not c.no_load_rng and same_layout and same_device and meta.get("rng_state") is not False
        if c.override_checkpoint_args:  # the LR schedule of the new flags, from the saved step on
            self.scheduler.override_opt_param_scheduler = True
        load_optim = not c.no_load_optim and not self.cfg.logging.skip_train  # --skip-train: weights only
        if load_optim and meta.get("optimizer_state") is False:
            # e.g. a checkpoint imported from Hugging Face: weights only, fresh optimizer
            load_optim = False
            if self.rank == 0:
                print(f"> {path} carries no optimizer state (imported, or saved with --no-save-optim); starting a "
                      "fresh optimizer", flush=True)
        if load_optim:
            preflight.check_resume_optimizer(meta, path, self.cfg.parallel.use_distributed_optimizer,
                                             ckpt.optimizer_parts(self.optimizer))
        try:
            common = ckpt.load_checkpoint(path, self.model, self.optimizer, self.scheduler,
                                          load_optim=load_optim, load_rng=load_rng,
                                          use_distributed_optimizer=self.cfg.parallel.use_distributed_optimizer,
                                          parallel_group=self._checkpoint_group(c.ckpt_fully_parallel_load))
        except ckpt.CheckpointError as exc:
            fail(str(exc))
        self.iteration = int(common["iteration"])
        self.consumed_samples = int(common["consumed_samples"])
        self.data_tokens = int(common["data_tokens"])
        self.positions = int(common["positions"])
        self.elapsed_before = float(common.get("elapsed_s", 0.0))
        saved_sup = common.get("superposition_samples")
        self.superposition_samples = (int(saved_sup) if saved_sup is not None
                                      else self._saved_superposition_samples(meta))
        self.last_checkpoint = path
        self.finetuned_from = meta.get("finetuned_from")
        self.run_id = common.get("run_id")
        self.skipped_nonfinite = int(common.get("skipped_nonfinite", 0))
        if c.save and same_dir(os.path.dirname(os.path.normpath(path)), c.save):
            self._on_disk = self.iteration
        if not load_optim:
            # Mixed precision keeps fp32 master copies made from the *initial* weights: refresh
            # them from the loaded model, or the first step would write the init back.
            self.optimizer.reload_model_params()
            if self.iteration:  # fresh optimizer: continue the LR schedule where the run was
                steps = common.get("scheduler_steps")  # older checkpoints: as if no step was skipped
                self.scheduler.step(int(steps) if steps is not None else
                                    schedule_position(self.cfg.optim, self.iteration, self.consumed_samples))
        if self.rank == 0:
            print(f"> resumed from {path} at iteration {self.iteration} "
                  f"({common['phase']} phase, {self.consumed_samples} samples consumed)"
                  + ("" if load_rng or c.no_load_rng else "; RNG state not restored ("
                     + ("saved with --no-save-rng" if meta.get("rng_state") is False else
                        "parallel layout changed" if not same_layout else
                        f"saved on {meta.get('rng_device')}, resumed on {self.device.type}")
                     + ")"),
                  flush=True)

    def _load_weights(self, path: str) -> None:
        """--finetune: the checkpoint's weights into a run at iteration 0 (its optimizer, LR schedule,
        RNG and data position are not taken)."""
        try:
            ckpt.load_checkpoint(path, self.model, self.optimizer, self.scheduler, load_optim=False, load_rng=False,
                                 use_distributed_optimizer=self.cfg.parallel.use_distributed_optimizer,
                                 parallel_group=self._checkpoint_group(self.cfg.ckpt.ckpt_fully_parallel_load))
        except ckpt.CheckpointError as exc:
            fail(str(exc))
        self.optimizer.reload_model_params()  # fp32 main weights from the loaded model (see _load)
        if self.rank == 0:
            print(f"> fine-tuning from the weights of {path}: iteration, optimizer, LR schedule and data stream "
                  "start fresh", flush=True)

    def _saved_superposition_samples(self, meta: dict) -> int:
        """For checkpoints written before `superposition_samples` was saved: those runs kept one
        global batch size, so the superposition steps taken times that batch."""
        saved = meta.get("args", {}).get("optim", {})
        gbs = int(saved.get("global_batch_size") or self.cfg.optim.global_batch_size)
        return min(self.iteration, int(meta.get("superposition_iters", self.num_sup_iters))) * gbs

    @contextlib.contextmanager
    def _parameters_gathered(self):
        """Every parameter current on every rank, for an evaluation or a checkpoint.

        With --overlap-param-gather the distributed optimizer's step updates only each rank's
        shard; the other ranks' shards arrive during the next training forward, bucket by bucket,
        through DDP's forward pre-hooks. A checkpoint written before then would hold half-old
        weights. So, as Megatron-LM does around both: hooks off with a synchronous all-gather,
        and back on after."""
        if not self.cfg.parallel.overlap_param_gather:
            yield
            return
        for chunk in self.model:
            chunk.disable_forward_pre_hook(param_sync=True)
        try:
            yield
        finally:
            for chunk in self.model:
                chunk.enable_forward_pre_hook()

    def _checkpoint_stream_length(self, needed: int) -> Optional[int]:
        """The base-sample count the checkpoint's train stream was built with, when this run can
        deal from that very stream (same window length, enough windows for `needed`); else None.

        megatron orders the windows by how many it is asked for (the epochs it shuffles together,
        a blend's length), so a resume with another --global-batch-size / --train-iters rebuilds
        the old stream rather than one of the new length; preflight.check_resume_stream refuses
        the resumes that cannot."""
        if self.resume is None:
            return None
        meta, cfg = self.resume[2], self.cfg
        windows, requested = meta.get("train_base_windows"), meta.get("train_base_samples")
        saved_tst, saved_model = meta.get("args", {}).get("tst", {}), meta.get("args", {}).get("model", {})
        same_window = ((saved_tst.get("bag_size"), saved_tst.get("mode"), saved_model.get("seq_length"))
                       == (cfg.tst.bag_size, cfg.tst.mode, cfg.model.seq_length))
        if (same_window and preflight.same_train_data(cfg, meta) and requested is not None and windows is not None
                and windows >= needed):
            return int(requested)
        return None
