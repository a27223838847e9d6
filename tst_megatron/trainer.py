"""The training loop: megatron-core's schedules, optimizer and checkpoints, with the TST phases.

One run, one model, one optimizer, one LR schedule. Iterations below the switch are
superposition steps, the rest recovery steps. Nothing is rebuilt at the switch: the data stream
(`TSTDataset`, indexed by consumed samples) changes sample layout by itself and the model handles
bag and token inputs alike, so the pipeline shapes stay [L, micro-batch, hidden] throughout.
"""
from __future__ import annotations

import gc
import math
import os
import signal
import time
import uuid
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from . import checkpointing as ckpt
from . import preflight
from .arguments import RunConfig, fail, same_dir, validate
from .batch_schedule import BatchSchedule
from .builders import (build_model_chunks, build_optimizer, build_scheduler, count_parameters, flops_per_position,
                       padded_vocab_size, scheduler_increment, transformer_config, tst_data_tokens_per_sample,
                       wrap_ddp)
from .cpu import default_device, enable_cpu_support, model_parallel_manual_seed
from .data import RECOVERY, SUPERPOSITION
from .distributed import from_rank0, init_distributed
from .evaluation import Evaluation
from .metrics import IntervalStats, RunLogger, Stopwatch, format_duration
from .moe_logging import reset_router_losses
from .profiling import StepProfiler
from .run_checkpoints import RunCheckpoints
from .step import make_forward_step
from .timing import StepTimes, build_timers
from .train_log import TrainLog

__all__ = ["Trainer", "NonFiniteError", "main", "print_model_size", "SUPERPOSITION", "RECOVERY"]


class NonFiniteError(RuntimeError):
    pass


# ------------------------------------------------------------------------------ the trainer
class Trainer(RunCheckpoints, Evaluation, TrainLog):
    """One pretraining run: `setup()` builds everything and validates the inputs before any compute,
    `train()` runs the two phases, `close()` tears the process groups down (also after a refusal).

    Its checkpoint side (save, resume, --finetune) is in run_checkpoints.py, evaluation in
    evaluation.py, the log line and metrics records in train_log.py, the per-micro-batch forward
    step in step.py."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.stop_signal = False
        self.start_time = time.time()  # --exit-duration-in-mins counts from here, as in Megatron-LM

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        self._install_signal_handlers()  # a preemption during setup stops at the first iteration
        enable_cpu_support()
        reset_router_losses()  # nothing from an earlier run in this process (one that stopped mid-interval)
        init_distributed(cfg.parallel.distributed_timeout_minutes)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        validate(cfg, self.world)
        self.log = RunLogger(False, None)  # replaced below once paths are known

        from megatron.core import parallel_state as ps
        from megatron.core.num_microbatches_calculator import (get_num_microbatches,
                                                               init_num_microbatches_calculator)

        par = cfg.parallel
        vpp = None
        if par.num_layers_per_virtual_pipeline_stage:
            vpp = (cfg.model.num_layers // par.pipeline_model_parallel_size) // par.num_layers_per_virtual_pipeline_stage
            vpp = vpp if vpp > 1 else None
        ps.initialize_model_parallel(
            tensor_model_parallel_size=par.tensor_model_parallel_size,
            pipeline_model_parallel_size=par.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=vpp,
            expert_model_parallel_size=par.expert_model_parallel_size,
            distributed_timeout_minutes=par.distributed_timeout_minutes,  # its groups carry most traffic
        )
        self.ps = ps
        self.dp_rank = ps.get_data_parallel_rank()
        self.dp_size = ps.get_data_parallel_world_size()
        model_parallel_manual_seed(cfg.optim.seed + 100 * ps.get_pipeline_model_parallel_rank())
        o = cfg.optim
        init_num_microbatches_calculator(self.rank, o.rampup_batch_size, o.global_batch_size,
                                         o.micro_batch_size, self.dp_size)
        self.num_microbatches = get_num_microbatches()
        self.batches = BatchSchedule(o.global_batch_size, o.rampup_batch_size, o.micro_batch_size, self.dp_size)
        self.device = default_device()

        # Tokenizer and vocabulary (checked against the data before any model is built).
        d = cfg.data
        try:
            self.tokenizer = d.build_tokenizer(cfg.model.vocab_size)
        except (OSError, ValueError, RuntimeError) as exc:
            where = (f"--tokenizer-model {d.tokenizer_model}" if d.tokenizer_model
                     else f"--tokenizer-type {d.tokenizer_type}")
            fail(f"{where}: tokenizer does not load ({exc})")
        self.vocab_size = padded_vocab_size(self.tokenizer.vocab_size, cfg.model.make_vocab_size_divisible_by,
                                            par.tensor_model_parallel_size)
        preflight.check_data(cfg, self.tokenizer.vocab_size)

        # Resume target (or fine-tuning source), validated before building anything heavy.
        self.resume, self.finetuned_from = self._start_point()
        save = cfg.ckpt.save
        if save and not (cfg.ckpt.load and same_dir(cfg.ckpt.load, save)) and (
                os.path.isfile(os.path.join(save, ckpt.TRACKER)) or ckpt.list_checkpoints(save)):
            how = (" (without --finetune)" if cfg.ckpt.finetune else
                   " (--pretrained-checkpoint is used only while --load holds no checkpoint)"
                   if cfg.ckpt.pretrained_checkpoint else "")
            fail(f"--save {save}: the directory already holds checkpoints of a run; resume it with --load "
                 f"{save}{how}, or choose a new --save directory "
                 "(this run would mix its checkpoints with those and replace their tracker)")

        # Model, DDP, optimizer, LR schedule: all megatron-core.
        try:
            self.tconfig = transformer_config(cfg.model, par, cfg.optim, use_cpu_init=self.device.type == "cpu")
        except (ValueError, AssertionError) as exc:  # a combination the checks above do not know yet
            fail(f"megatron-core refuses this model configuration: {exc} (see `pretrain_tst.py --help` for the "
                 "model, MoE and parallelism flags)")
        chunks = build_model_chunks(cfg, self.tconfig, self.vocab_size)
        self.model = wrap_ddp(chunks, self.tconfig, par)
        lg = cfg.logging
        self.timers = build_timers(lg.timing_log_level, lg.timing_log_option)
        self.step_times = StepTimes(self.timers, lg.log_timers_to_tensorboard)
        self.optimizer = build_optimizer(self.model, cfg.optim, par, self.timers, lg.barrier_with_L1_time)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim)
        from megatron.core.distributed import finalize_model_grads

        self.tconfig.no_sync_func = [m.no_sync for m in self.model]
        if len(self.model) == 1:
            self.tconfig.no_sync_func = self.tconfig.no_sync_func[0]
        self.tconfig.finalize_model_grads_func = finalize_model_grads
        self.tconfig.grad_scale_func = self.optimizer.scale_loss
        self.tconfig.timers = self.timers  # the schedules' and finalize_model_grads' timers
        self.tconfig.barrier_with_L1_time = lg.barrier_with_L1_time

        # Progress counters (restored from a checkpoint below).
        self.iteration = 0
        self.consumed_samples = 0
        self.superposition_samples = 0  # of consumed_samples, those consumed by superposition steps
        self.data_tokens = 0
        self.positions = 0
        self.elapsed_before = 0.0  # training wall-clock of the runs this one resumes
        self.skipped_nonfinite = 0  # steps skipped under --skip-nonfinite-steps so far
        self.timer = Stopwatch()  # restarted when training starts
        self.last_checkpoint: Optional[str] = None
        self._on_disk: Optional[int] = None  # iteration whose state is already saved under --save
        self.num_sup_iters = cfg.tst.num_superposition_iters(cfg.optim.train_iters)
        self.run_id: Optional[str] = None  # names the run in its checkpoints and metrics (None: saved before ids)
        if self.resume is not None:
            self._load(self.resume[1])
        elif self.finetuned_from is not None:
            self._load_weights(self.finetuned_from)
        if self.run_id is None and self.iteration == 0:  # a fresh run: rank 0's id on every rank (the
            self.run_id = from_rank0(lambda: uuid.uuid4().hex[:16])  # checkpoints' common state is identical)
        from megatron.core.num_microbatches_calculator import get_current_global_batch_size, update_num_microbatches

        update_num_microbatches(self.consumed_samples, consistency_check=True)  # a resume mid-ramp
        self.num_microbatches = get_num_microbatches()
        self.current_batch = get_current_global_batch_size()
        # Creating a DataLoader iterator draws its base seed from the global torch RNG. Keep that
        # draw out of the training stream (dropout), so that a resumed run continues from exactly
        # the RNG state its checkpoint restored.
        rng_state = torch.get_rng_state()
        self._build_data()
        torch.set_rng_state(rng_state)
        self._setup_logger()

    def _build_data(self) -> None:
        from megatron.core.datasets.utils import get_blend_from_list

        from .data import (CountingIterator, build_data_iterator, build_tst_datasets, data_tst_config,
                           num_base_samples, resume_sample_plan)

        cfg = self.cfg
        d = cfg.data
        # (--skip-train trains nothing: the plan of a fresh run, whatever the checkpoint consumed)
        at = (0, 0, 0) if cfg.logging.skip_train else (self.iteration, self.consumed_samples,
                                                       self.superposition_samples)
        try:
            plan = resume_sample_plan(iteration=at[0], consumed_samples=at[1], superposition_samples=at[2],
                                      superposition_iters=self.num_sup_iters, train_iters=cfg.optim.train_iters,
                                      global_batch_size=cfg.optim.global_batch_size,
                                      samples_in=self.batches.samples_in)
        except ValueError as exc:
            fail(f"--load {cfg.ckpt.load}: {exc}; keep the checkpoint's --tst-superposition-iters/-ratio")
        try:
            self.datasets = build_tst_datasets(
                cfg.tst, seq_length=cfg.model.seq_length, train_iters=cfg.optim.train_iters,
                global_batch_size=cfg.optim.global_batch_size, eval_iters=cfg.logging.eval_iters,
                tokenizer=self.tokenizer, seed=cfg.optim.seed,
                blend=get_blend_from_list(d.data_path) if d.data_path else None,
                blend_per_split=None if d.data_path or d.mock_data else [  # neither blend: mock data
                    get_blend_from_list(paths) if paths else None
                    for paths in (d.train_data_path, d.valid_data_path, d.test_data_path)],
                split=cfg.data.split, eod_mask_loss=d.eod_mask_loss, reset_position_ids=d.reset_position_ids,
                data_cache_path=cfg.data.data_cache_path, sample_plan=plan, mmap_bin_files=d.mmap_bin_files,
                num_dataset_builder_threads=d.num_dataset_builder_threads,
                mid_level_dataset_surplus=d.mid_level_dataset_surplus,
                base_train_samples=self._checkpoint_stream_length(
                    num_base_samples(data_tst_config(cfg.tst, plan[0]), plan[0], plan[1] - plan[0])))
        except ValueError as exc:  # the train stream megatron built is shorter than the run
            if d.mock_data:
                fail(f"--mock-data: {exc}")
            flag, paths = ("--data-path", d.data_path) if d.data_path else ("--train-data-path", d.train_data_path)
            prefixes, weights = get_blend_from_list(paths)
            why = ("; megatron-core reads an unweighted list of several prefixes once, without epochs: give "
                   "weights (e.g. 0.5 A 0.5 B) or train on fewer samples" if weights is None and len(prefixes) > 1
                   else "")
            fail(f"{flag} {' '.join(paths)}: {exc}{why}")
        if self.datasets.train is None:
            fail(f"--split {cfg.data.split}: the training split is empty")
        if self.resume is not None and not cfg.logging.skip_train:  # (an evaluation reads no train stream)
            saved = self.resume[2].get("args", {}).get("optim", {})
            preflight.check_resume_stream(
                self.resume[2], self.resume[1], consumed_samples=self.consumed_samples,
                base_windows=len(self.datasets.train.base),
                same_batch_and_length=(saved.get("global_batch_size") == cfg.optim.global_batch_size
                                       and saved.get("rampup_batch_size") == cfg.optim.rampup_batch_size
                                       and saved.get("train_iters") == cfg.optim.train_iters),
                override=cfg.ckpt.override_checkpoint_args, verbose=self.rank == 0,
                same_data=preflight.same_train_data(cfg, self.resume[2]))
        self._build_iterator = build_data_iterator
        vpp = len(self.model)
        self.train_iters_data = [
            CountingIterator(build_data_iterator(self.datasets.train, at[1],
                                                 cfg.optim.micro_batch_size, self.dp_rank, self.dp_size,
                                                 num_workers=cfg.data.num_workers,
                                                 total_samples=self.datasets.num_train_samples))
            for _ in range(vpp)]

    # ---------------------------------------------------------------- steps
    def phase(self, iteration: int) -> str:
        return SUPERPOSITION if iteration < self.num_sup_iters else RECOVERY

    def _forward_backward(self, data_iterators, forward_only: bool, num_microbatches: int) -> List[dict]:
        """megatron's schedule over the model chunks; the last pipeline stage's micro-batch losses.
        Evaluation is not timed (as in Megatron-LM, the timers see training steps only)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        fb = get_forward_backward_func()
        cfg = self.cfg
        timers = None if forward_only else self.timers
        self.tconfig.timers = timers
        try:
            return fb(forward_step_func=make_forward_step(self.device, cfg.optim.calculate_per_token_loss, timers),
                      data_iterator=data_iterators if len(self.model) > 1 else data_iterators[0],
                      model=self.model if len(self.model) > 1 else self.model[0],
                      num_microbatches=num_microbatches, seq_length=cfg.model.seq_length,
                      micro_batch_size=cfg.optim.micro_batch_size, forward_only=forward_only)
        finally:
            self.tconfig.timers = self.timers

    def _reduce_loss(self, losses: List[dict], counts=(0, 0)) -> List[float]:
        """[loss, input elements, label elements, trained positions] of the step, made known to
        every rank (rank 0 logs them): the mean micro-batch loss of the last pipeline stage averaged
        over data parallelism (with --calculate-per-token-loss: the mean over every trained position
        of the global batch), and what the first stage's data stream fed, summed over data
        parallelism. One all-reduce and one host sync per step (the .tolist() below)."""
        ps = self.ps
        value = torch.zeros(4, dtype=torch.float64, device=self.device)
        tp0 = ps.get_tensor_model_parallel_rank() == 0
        if tp0 and ps.is_pipeline_last_stage(ignore_virtual=True) and losses:
            if "loss_sum" in losses[0]:
                value[0] = torch.stack([x["loss_sum"].double() for x in losses]).sum()
                value[3] = torch.stack([x["count"].double() for x in losses]).sum()
            else:
                value[0] = torch.stack([x["loss"].detach().double() for x in losses]).mean() / self.dp_size
        if tp0 and ps.is_pipeline_first_stage(ignore_virtual=True):
            value[1], value[2] = counts
        dist.all_reduce(value)
        out = value.tolist()
        if self.cfg.optim.calculate_per_token_loss:
            out[0] = out[0] / out[3] if out[3] > 0 else 0.0  # nothing trained: 0, as the masked mean gives
        return out

    def _check_fed(self, tokens: int, labels: int, batch: int) -> None:
        """What the data stream fed this step must have the layout of the step's phase: a run whose
        data is out of step with its iterations (a bug, or a resume the checks above missed) would
        otherwise train one objective while logging the other."""
        cfg = self.cfg
        phase = self.phase(self.iteration)
        n = batch * cfg.model.seq_length
        s = cfg.tst.bag_size if phase == SUPERPOSITION else 1
        want = (n * (s if cfg.tst.mode in ("full", "input") else 1), n * (s if cfg.tst.mode in ("full", "output") else 1))
        if (tokens, labels) != want:
            fail(f"iteration {self.iteration + 1} ({phase} phase): the data stream fed {tokens} input and {labels} "
                 f"label elements, the phase expects {want[0]} and {want[1]}; the data position "
                 f"({self.consumed_samples} consumed samples) is out of step with the phase -- please report this "
                 "with the command line (and the --load checkpoint's tst_meta.json)")

    def _empty_cuda_cache(self, level: int) -> None:
        """--empty-unused-memory-level: hand PyTorch's cached CUDA blocks back at Megatron-LM's points
        (level 1 after each forward-backward, training and evaluation; level 2 also after each
        optimizer step). A no-op without CUDA, where there is no cache."""
        if self.cfg.parallel.empty_unused_memory_level >= level:
            torch.cuda.empty_cache()

    def _grads_finite(self) -> bool:
        """False if any gradient is NaN or Inf (on any rank). Checked through one fp32 sum per grad
        buffer -- NaN and Inf propagate through a sum -- so there is no parameter-sized temporary
        (`isfinite(grads).all()` allocates a byte per parameter, 3 GB for a 3B model) and one host
        sync per step. A finite sum above 3e38 would also read as non-finite; such grads are."""
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for chunk in self.model:
            for buf in list(chunk.buffers) + list(chunk.expert_parallel_buffers):
                total += torch.sum(buf.grad_data, dtype=torch.float32)
        ok = torch.isfinite(total).float().reshape(1)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item() > 0)

    def _update_batch(self) -> int:
        """The global batch of the next step (it changes only under --rampup-batch-size):
        megatron-core's calculator, updated with the consumed samples as Megatron-LM does."""
        from megatron.core.num_microbatches_calculator import (get_current_global_batch_size, get_num_microbatches,
                                                               update_num_microbatches)

        before = get_current_global_batch_size()
        update_num_microbatches(self.consumed_samples, consistency_check=True)
        batch = self.current_batch = get_current_global_batch_size()
        self.num_microbatches = get_num_microbatches()
        if batch != before:
            self.log.print(f"> global batch size ramps up from {before} to {batch} at iteration {self.iteration} "
                           f"({self.consumed_samples} consumed samples; --rampup-batch-size)")
        return batch

    def train_step(self) -> Dict[str, float]:
        """One optimizer step of the current global batch (`_update_batch` sets it)."""
        batch = self.current_batch
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = self._forward_backward(self.train_iters_data, False, self.num_microbatches)
        self._empty_cuda_cache(1)
        loss, fed_tokens, fed_labels, _ = self._reduce_loss(losses, self.train_iters_data[0].take_counts())
        self._check_fed(int(fed_tokens), int(fed_labels), batch)
        lg = self.cfg.logging
        if self.iteration in (lg.inject_nonfinite_at or ()):  # test hook (0-based iterations)
            if lg.inject_nonfinite_kind == "loss":  # as if the data produced a NaN
                loss = float("nan")
                for chunk in self.model:
                    for buf in chunk.buffers:
                        buf.grad_data.fill_(float("nan"))
            else:  # as if one gradient overflowed
                self.model[0].buffers[0].grad_data.view(-1)[0] = float("inf")
        # What was non-finite, for the message (None: nothing). No optimizer step on a bad step.
        # Under --fp16 an overflowing gradient is the loss scaler's business (below), not an error.
        nonfinite = (f"loss {loss}" if not math.isfinite(loss)
                     else None if self.cfg.optim.fp16 or self._grads_finite()
                     else f"NaN/Inf gradient, loss {loss:.4f}")
        if nonfinite:
            return {"loss": loss, "grad_norm": float("nan"), "skipped": True, "nonfinite": nonfinite}
        scale = self._loss_scale() if self.cfg.optim.fp16 else None
        if self.timers is not None:
            self.timers("optimizer", log_level=1).start(barrier=self.cfg.logging.barrier_with_L1_time)
        ok, grad_norm, num_zeros = self.optimizer.step()
        if self.timers is not None:
            self.timers("optimizer").stop()
        self._empty_cuda_cache(2)
        self.num_zeros_in_grad = num_zeros  # None unless --log-num-zeros-in-grad (megatron counts them)
        if not ok:  # fp16: the scaled gradients overflowed; no update, the scaler lowers its scale...
            o = self.cfg.optim
            stuck = o.loss_scale is not None or scale <= o.min_loss_scale
            # ...unless it cannot: at a fixed scale or at the floor the gradients are not finite
            return {"loss": loss, "grad_norm": float("nan"), "skipped": True,
                    "nonfinite": None if not stuck else
                    f"gradients overflow at the fixed --loss-scale {scale:g} (lower it, or drop it for the dynamic "
                    f"scaler), loss {loss:.4f}" if o.loss_scale is not None else
                    f"gradients overflow at the minimum loss scale {scale:g} (--min-loss-scale), loss {loss:.4f}"}
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        if not math.isfinite(grad_norm):
            raise NonFiniteError(f"grad norm {grad_norm}")
        # as in Megatron-LM, a skipped step does not advance the LR
        self.scheduler.step(increment=scheduler_increment(self.cfg.optim, batch))
        return {"loss": loss, "grad_norm": grad_norm, "skipped": False, "nonfinite": None}

    # ---------------------------------------------------------------- the loop
    def _install_signal_handlers(self) -> None:
        # Every signal only asks for the clean stop: under torchrun a worker gets SIGTERM twice in
        # a row (SLURM's signal to the step, then torchrun's forward of its own), and must still
        # finish its iteration and save.
        def handler(signum, frame):
            self.stop_signal = True

        # the handlers they replace, put back by close(): the process (a test, a notebook, a sweep
        # driver) may go on after this run, and a SIGTERM must then end it again
        self._previous_handlers = {signal.SIGTERM: signal.signal(signal.SIGTERM, handler)}
        if self.cfg.ckpt.exit_signal_handler:
            self._previous_handlers[signal.SIGINT] = signal.signal(signal.SIGINT, handler)

    def _should_exit(self) -> Optional[str]:
        c = self.cfg.ckpt
        # Agreed over all ranks (a signal may reach only some): 2 = time is up, 1 = signal, 0 = go on.
        out_of_time = (c.exit_duration_in_mins is not None
                       and (time.time() - self.start_time) / 60 > c.exit_duration_in_mins)
        flag = torch.full((1,), 2.0 if out_of_time else 1.0 if self.stop_signal else 0.0, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        code = int(flag.item())
        if code == 1:
            return "signal"
        if code == 2:
            return "--exit-duration-in-mins"
        if c.exit_interval and self.iteration % c.exit_interval == 0:
            return "--exit-interval"
        return None

    def train(self) -> int:
        lg = self.cfg.logging
        self.timer = Stopwatch()
        self._train_time = 0.0
        if lg.skip_train:  # Megatron-LM's evaluation-only run: no step, no checkpoint
            self.evaluate_now(final=True)
            self.log.print(f"> --skip-train: evaluated the weights of iteration {self.iteration}"
                           f"{' (' + self.last_checkpoint + ')' if self.last_checkpoint else ' (no --load: initial weights)'}"
                           "; nothing trained or saved")
            self.log.close()
            return 0
        if lg.manual_gc:  # Megatron-LM's: no automatic collection from here on, one now
            gc.disable()
            gc.collect()
        if self.iteration == 0:
            self.evaluate_now()
        profiler = StepProfiler(lg.profile and self.rank in lg.profile_ranks, lg.use_pytorch_profiler,
                                lg.profile_step_start, lg.profile_step_end, lg.tensorboard_dir)
        try:
            return self._train_loop(profiler)
        finally:
            profiler.stop()  # an early exit inside the window still writes its trace

    def _train_loop(self, profiler: StepProfiler) -> int:
        cfg = self.cfg
        o, lg = cfg.optim, cfg.logging
        L = cfg.model.seq_length
        eval_interval = lg.eval_interval
        interval = IntervalStats()
        start_iteration = self.iteration
        while self.iteration < o.train_iters:
            phase = self.phase(self.iteration)
            if phase == RECOVERY and self.iteration == self.num_sup_iters and self.num_sup_iters > 0:
                self.log.print(f"[TST] phase switch at iteration {self.iteration}: superposition -> recovery "
                               f"(next-token training of the same model, optimizer state and LR schedule; "
                               f"{self.data_tokens} data tokens consumed so far)")
            gbs = self._update_batch()
            step_start = time.time()
            profiler.before_step(self.iteration)
            try:
                out = self.train_step()
            except NonFiniteError as exc:
                self._stop_nonfinite(str(exc), phase)
                return 1
            if out["nonfinite"]:
                self.skipped_nonfinite += 1  # over the whole run: the count travels in the checkpoints
                if self.skipped_nonfinite > lg.skip_nonfinite_steps:
                    self._stop_nonfinite(out["nonfinite"], phase)
                    return 1
                self.log.print(f" WARNING: skipped iteration {self.iteration + 1} ({phase}): non-finite loss "
                               f"or gradient ({self.skipped_nonfinite}/{lg.skip_nonfinite_steps} allowed)")
            tokens = gbs * tst_data_tokens_per_sample(cfg.tst, L, phase)
            # a skipped non-finite step (NaN loss, or a finite loss with a NaN/Inf gradient) enters
            # neither mean; an fp16 overflow step's loss is a real loss, its gradient norm unknown
            interval.add(out["loss"], out["grad_norm"], out["nonfinite"] is None, tokens, gbs * L,
                         time.time() - step_start)
            interval.overflow_skips += bool(out["skipped"] and out["nonfinite"] is None)
            interval.microbatches += gbs // (o.micro_batch_size * self.dp_size)
            self.iteration += 1
            self.consumed_samples += gbs
            self.superposition_samples += gbs if phase == SUPERPOSITION else 0
            self.data_tokens += tokens
            self.positions += gbs * L
            profiler.after_step(self.iteration)
            if lg.manual_gc and lg.manual_gc_interval and self.iteration % lg.manual_gc_interval == 0:
                gc.collect()

            # also at the switch: one record never averages the bag loss with the next-token loss
            if (self.iteration % lg.log_interval == 0 or self.iteration == o.train_iters
                    or self.iteration == self.num_sup_iters):
                self._log_train(phase, interval, start_iteration)
                interval = IntervalStats()
            if eval_interval and self.iteration % eval_interval == 0 and self.iteration < o.train_iters:
                self.evaluate_now()
            if cfg.ckpt.save_interval and self.iteration % cfg.ckpt.save_interval == 0:
                self.save()
            reason = self._should_exit()
            if reason and self.iteration < o.train_iters:
                # the checkpoint first: a failure in what follows (logging) must not lose the steps
                if not (cfg.ckpt.save_interval and self.iteration % cfg.ckpt.save_interval == 0):
                    self.save()
                if interval.steps:  # the steps since the last log line, before the run stops
                    self._log_train(phase, interval, start_iteration)
                saved = (self.last_checkpoint or "none") if cfg.ckpt.save else (
                    "none saved (no --save); the steps since " + (self.last_checkpoint or "the start") + " are lost")
                self.log.print(f"> exiting at iteration {self.iteration} ({reason}); checkpoint: {saved}")
                self.log.close()
                # a signal with nothing saved is a run cut short (128 + SIGTERM, what dying of it reports):
                # exit 0 would tell the scheduler the job is done; an exit flag the user set (warned
                # about without --save) is a stop they asked for
                return 0 if cfg.ckpt.save or reason != "signal" else 128 + signal.SIGTERM
        # saved before the final evaluation, as Megatron-LM does: a preemption, a time limit or a
        # crash during the evaluation must not lose the steps since the last periodic checkpoint
        if cfg.ckpt.save and not (cfg.ckpt.save_interval and self.iteration % cfg.ckpt.save_interval == 0):
            self.save()
        self.evaluate_now(final=True)
        # the run's training time, as the log lines count it (earlier sessions of a resumed run too)
        session = (f" ({format_duration(self.timer.elapsed())} in this process)" if self.elapsed_before else "")
        self.log.print(f"> training done: {self.iteration} iterations, {self.data_tokens} data tokens, "
                       f"elapsed {format_duration(self.elapsed_before + self.timer.elapsed())}{session}")
        self.log.close()
        return 0

    def close(self) -> None:
        try:
            if self.cfg.logging.manual_gc:
                gc.enable()  # the process (a test, a notebook) may go on
            for iterator in getattr(self, "train_iters_data", ()):  # workers ignore SIGTERM: stopped here
                iterator.close()
            from megatron.core import parallel_state as ps
            from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator

            ps.destroy_model_parallel()
            destroy_num_microbatches_calculator()
            reset_router_losses()  # its entries hold this run's layer count and process groups
            if dist.is_initialized():
                dist.destroy_process_group()
        finally:
            # last: a signal during the teardown above (torchrun forwards a SIGTERM a worker may
            # also get from SLURM) still only asks for the stop the run has already made
            for signum, previous in getattr(self, "_previous_handlers", {}).items():
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
            self._previous_handlers = {}


def print_model_size(cfg: RunConfig) -> None:
    # The tokenizer's vocabulary, exactly as the trainer builds it (NullTokenizer adds EOD).
    try:
        vocab = cfg.data.build_tokenizer(cfg.model.vocab_size).vocab_size
    except (OSError, ValueError, RuntimeError, TypeError) as exc:
        fail(f"--print-model-size needs the vocabulary of --tokenizer-type {cfg.data.tokenizer_type} ({exc})")
    vocab = padded_vocab_size(vocab, cfg.model.make_vocab_size_divisible_by, cfg.parallel.tensor_model_parallel_size)
    total, active = count_parameters(cfg.model, vocab)
    def short(n: int) -> str:
        return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"  # 0.254B as the paper scripts say

    print(f"parameters: total {total:,} ({short(total)}), active per token {active:,} ({short(active)}); "
          f"vocab {vocab}; training FLOPs per position {flops_per_position(cfg.model, vocab):.4e}")


def main(argv=None) -> int:
    from .arguments import parse_args

    cfg = parse_args(argv)
    if cfg.logging.print_model_size:
        print_model_size(cfg)
        return 0
    trainer = Trainer(cfg)
    try:
        trainer.setup()  # inside the try: a refused input still tears down the process group
        return trainer.train()
    finally:
        trainer.close()
