"""What the trainer tells its user: the log line per --log-interval (Megatron-LM's fields plus
the TST phase, data tokens and positions), the metrics records, and the non-finite stop message.

A mixin of `Trainer` (tst_megatron/trainer.py).
"""
from __future__ import annotations

import datetime
import os

from .builders import count_parameters, flops_per_position
from .cpu import distributed_backend
from .data import SUPERPOSITION
from .metrics import IntervalStats, RunLogger, format_duration
from .metrics_io import metrics_run_id, truncate_metrics
from .moe_logging import reduce_router_losses


# log-line labels of the optional record fields (Megatron-LM's wording)
_LABELS = {"params_norm": "params norm", "num_zeros_in_grad": "number of zeros in grad"}


def memory_stats(device) -> dict:
    """--log-memory-to-tensorboard: this rank's memory, in bytes. On CUDA what Megatron-LM logs
    (allocated, peak allocated, reserved); on CPU the process's peak resident set size."""
    import torch

    if device.type == "cuda":
        return {"mem_allocated_bytes": torch.cuda.memory_allocated(device),
                "mem_max_allocated_bytes": torch.cuda.max_memory_allocated(device),
                "mem_reserved_bytes": torch.cuda.memory_reserved(device)}
    import resource

    return {"max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # Linux: KiB


class TrainLog:
    def _setup_logger(self) -> None:
        cfg = self.cfg
        path = cfg.logging.metrics_path
        if path is None:
            path = os.path.join(cfg.ckpt.save, "metrics.jsonl") if cfg.ckpt.save else "metrics.jsonl"
        self.metrics_path = path
        resuming = self.iteration > 0
        # A resume continues its own run's file (cut back to the checkpoint); any other file -- another
        # run's, or one a resume into a new --save or --metrics-path meets -- is kept aside, never cut.
        # (A checkpoint and a file written before run ids both say None: such a pair continues.)
        continues = (self.rank == 0 and resuming and os.path.isfile(path)  # rank 0 alone reads and writes it
                     and metrics_run_id(path) == self.run_id)
        if continues:
            # resumed at the end, or evaluated (--skip-train): the evaluation of this iteration runs
            # again, so its old record goes; an evaluation-only run trains nothing, so keeps the rest
            skip, ended = cfg.logging.skip_train, self.iteration >= cfg.optim.train_iters
            truncate_metrics(path, self.iteration, keep_evals_at_end=not (skip or ended), drop_later=not skip)
        elif self.rank == 0 and os.path.isfile(path) and os.path.getsize(path) > 0:
            kept = next(f"{path}.{k}" for k in range(1, 10 ** 6) if not os.path.exists(f"{path}.{k}"))
            os.replace(path, kept)  # a fresh run never overwrites another run's curve
            print(f"> {path} held the metrics of {'another' if resuming else 'an earlier'} run: kept as {kept}",
                  flush=True)
        self.log = RunLogger(self.rank == 0, path, cfg.logging.tensorboard_dir, cfg.logging.wandb_project,
                             cfg.logging.wandb_exp_name or cfg.logging.run_name, resume=resuming,
                             tensorboard_purge_step=self.iteration + 1 if continues and not cfg.logging.skip_train
                             else None)
        total, active = count_parameters(cfg.model, self.vocab_size)
        self.flops_per_position = flops_per_position(cfg.model, self.vocab_size)
        if not continues:
            self.log.record({"type": "run", "name": cfg.logging.run_name, "run_id": self.run_id,
                             **({"resumed_from": self.last_checkpoint, "resumed_at_iteration": self.iteration}
                                if resuming else {}),
                             "tst_bag_size": cfg.tst.bag_size,
                             "tst_mode": cfg.tst.mode, "superposition_iters": self.num_sup_iters,
                             "train_iters": cfg.optim.train_iters, "global_batch_size": cfg.optim.global_batch_size,
                             "seq_length": cfg.model.seq_length, "parameters": total, "active_parameters": active,
                             "world_size": self.world,
                             # where the superposition samples of the data stream end (exact under
                             # a batch-size ramp, where iterations x batch is not)
                             "superposition_samples": self.datasets.num_superposition_samples,
                             **({"rampup_batch_size": list(cfg.optim.rampup_batch_size)}
                                if cfg.optim.rampup_batch_size else {})})
        par = cfg.parallel
        self.log.print(
            f"> tst-megatron: world {self.world} (TP={par.tensor_model_parallel_size} "
            f"PP={par.pipeline_model_parallel_size} EP={par.expert_model_parallel_size} DP={self.dp_size}"
            f"{', sequence parallel' if self.tconfig.sequence_parallel else ''}) "
            f"backend {distributed_backend()} device {self.device.type}; params {total / 1e6:.2f}M "
            f"(active {active / 1e6:.2f}M), vocab {self.vocab_size}; micro-batches/step {self.num_microbatches}")
        if cfg.tst.enabled:
            self.log.print(
                f"> TST: bag size s={cfg.tst.bag_size}, mode {cfg.tst.mode}, weighting {cfg.tst.bag_weighting}; "
                f"superposition iterations [0, {self.num_sup_iters}) of {cfg.optim.train_iters}")
        self.log.print(f"> metrics: {self.metrics_path}")

    def _stop_nonfinite(self, what: str, phase: str) -> None:
        resume = getattr(self, "resume", None)
        first_after_resume = resume is not None and self.iteration == resume[0]
        msg = (f"error: non-finite value ({what}) at iteration {self.iteration + 1} in the {phase} phase; "
               f"stopping without saving. Last good checkpoint: {self.last_checkpoint or 'none'}. "
               "Lower --lr, check the data, or allow skips with --skip-nonfinite-steps N"
               # the load checks compare shard sizes with the index, not contents: bytes damaged in
               # place load silently, and their first sign is this step
               + (f"; this is the first step after loading {resume[1]}: if the run was finite before, "
                  "suspect that checkpoint's files (damaged in place) and resume from an older one"
                  if first_after_resume else ""))
        if self.rank == 0:
            print(msg, flush=True)
        self.log.record({"type": "error", "iteration": self.iteration + 1, "phase": phase, "message": msg})
        self.log.close()

    def _log_train(self, phase: str, interval: IntervalStats, start_iteration: int) -> None:
        o = self.cfg.optim
        dt = max(interval.time, 1e-9)
        self._train_time += dt
        loss, grad_norm = interval.mean_loss(), interval.last_grad_norm()
        lr, decoupled_lr = self._learning_rates()
        lg = self.cfg.logging
        extra = {}  # the optional fields, in the log line and the record alike
        if lg.log_params_norm:
            extra["params_norm"] = self._params_norm()
        if o.log_num_zeros_in_grad and getattr(self, "num_zeros_in_grad", None) is not None:
            extra["num_zeros_in_grad"] = int(self.num_zeros_in_grad)  # the interval's last step, as Megatron-LM
        if lg.log_memory_to_tensorboard:
            extra.update(memory_stats(self.device))
        # MoE: the router's load-balancing / z losses (per layer and micro-batch, without their
        # coefficients), as Megatron-LM prints them; collective, like the parameter norm
        router = reduce_router_losses(self.cfg.model, interval.microbatches, self.device)
        tok_s = interval.tokens / dt
        pos_s = interval.positions / dt
        tflops = pos_s * self.flops_per_position / self.world / 1e12
        elapsed = self.elapsed_before + self.timer.elapsed()
        done = self.iteration - start_iteration
        eta = self._train_time / max(done, 1) * (o.train_iters - self.iteration)
        label = "mce loss" if phase == SUPERPOSITION and self.cfg.tst.mode != "input" else "lm loss"
        self.log.print(
            f" [{datetime.datetime.now():%Y-%m-%d %H:%M:%S}] iteration {self.iteration:8d}/{o.train_iters:8d} |"
            f" phase: {phase} | consumed samples: {self.consumed_samples:10d} |"
            f" elapsed time per iteration (ms): {1000 * dt / max(interval.steps, 1):.1f} |"
            f" learning rate: {lr:.6E} |"
            + (f" decoupled learning rate: {decoupled_lr:.6E} |" if decoupled_lr is not None else "")
            + f" global batch size: {self.current_batch:5d} |"
            f" {label}: {loss:.6E} |"
            + "".join(f" {name}: {value:.6E} |" for name, value in router.items())
            + (f" loss scale: {self._loss_scale():.1f} | number of skipped iterations: {interval.overflow_skips:3d} |"
               if o.fp16 else "")
            + f" grad norm: {grad_norm:.3f} |"
            + "".join(f" {_LABELS.get(k, k)}: {v:.3f} |" if isinstance(v, float) else f" {_LABELS.get(k, k)}: {v} |"
                      for k, v in extra.items())
            + f" data tokens: {self.data_tokens} | positions: {self.positions} |"
            f" tokens/s: {tok_s:.0f} (positions/s: {pos_s:.0f}) | TFLOP/s/device: {tflops:.4f} |"
            f" elapsed: {format_duration(elapsed)} | ETA: {format_duration(eta)}")
        times = self.step_times.report(interval.steps, self.iteration, self.log.tensorboard_writer)
        if times:
            self.log.print(times)
        self.log.record({"type": "train", "iteration": self.iteration, "phase": phase, "loss": loss,
                         "loss_kind": "mce" if label == "mce loss" else "lm", "lr": lr, "grad_norm": grad_norm,
                         "data_tokens": self.data_tokens, "positions": self.positions,
                         "tokens_per_s": tok_s, "positions_per_s": pos_s, "tflops_per_device": tflops,
                         "elapsed_s": elapsed, "consumed_samples": self.consumed_samples,
                         "global_batch_size": self.current_batch,
                         **({"decoupled_lr": decoupled_lr} if decoupled_lr is not None else {}),
                         **({"loss_scale": self._loss_scale(), "skipped_iterations": interval.overflow_skips}
                            if o.fp16 else {}), **router, **extra})

    def _params_norm(self) -> float:
        """L2 norm of all parameters, as Megatron-LM's --log-params-norm counts them: each tensor-
        parallel shard once (a TP-replicated parameter, e.g. a norm weight, from TP rank 0 only),
        the second copy of a tied embedding not again; dense parameters summed over the model-
        parallel group (TP x PP), expert parameters over theirs (expert TP x EP x PP). Collective:
        every rank calls it at the same iteration."""
        import torch
        import torch.distributed as dist
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
        from megatron.core.transformer.module import param_is_not_shared

        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # dense, expert
        with self._parameters_gathered():
            for chunk in self.model:
                for p in chunk.parameters():
                    if not param_is_not_tensor_parallel_duplicate(p):
                        continue
                    expert = not getattr(p, "allreduce", True)
                    if expert or param_is_not_shared(p):
                        sums[int(expert)] += torch.linalg.vector_norm(p.detach(), dtype=torch.float64) ** 2
        dist.all_reduce(sums[0:1], group=ps.get_model_parallel_group())
        dist.all_reduce(sums[1:2], group=ps.get_expert_tensor_model_pipeline_parallel_group())
        return float(sums.sum().sqrt())

    def _loss_scale(self) -> float:
        return float(self.optimizer.get_loss_scale())

    def _learning_rates(self):
        """(lr, decoupled lr or None): megatron's default-schedule param group, and the group its
        --decoupled-lr override made for the embedding and output layer."""
        lr = decoupled = None
        for group in self.optimizer.param_groups:  # the scheduler sets every group, empty or not
            if group.get("is_decoupled_lr"):
                decoupled = group["lr"] if decoupled is None else decoupled
            elif group.get("default_config", True):
                lr = group["lr"] if lr is None else lr
        return (self.optimizer.param_groups[0]["lr"] if lr is None else lr), decoupled
