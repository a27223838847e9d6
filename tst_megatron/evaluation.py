"""Validation and test evaluation: next-token (and, in superposition, MCE) losses on held-out
data, logged the way Megatron-LM logs them.

A mixin of `Trainer` (tst_megatron/trainer.py); it runs the trainer's own forward schedule in
forward-only mode.
"""
from __future__ import annotations

import gc
import math
from typing import Optional

import torch


class Evaluation:
    def evaluate(self, dataset, iters: int) -> Optional[float]:
        """Mean loss over the first `iters` global batches of `dataset` (the same batches at every
        evaluation, so one curve's points differ only by the weights); None without data."""
        if dataset is None:
            return None
        cfg = self.cfg
        gbs = cfg.optim.global_batch_size
        total = min(len(dataset), iters * gbs)
        steps = total // gbs
        if steps == 0:
            return None
        # the full global batch, also while --rampup-batch-size makes the training steps smaller
        micro = gbs // (cfg.optim.micro_batch_size * self.dp_size)
        for chunk in self.model:
            chunk.eval()
        values, weights = [], []
        with torch.no_grad():
            iterators = [self._build_iterator(dataset, 0, cfg.optim.micro_batch_size, self.dp_rank, self.dp_size,
                                              total_samples=steps * gbs) for _ in self.model]
            for _ in range(steps):
                loss, _, _, positions = self._reduce_loss(self._forward_backward(iterators, True, micro))
                self._empty_cuda_cache(1)
                values.append(loss)
                # per-token loss: every trained position of the evaluation weighs the same
                weights.append(positions if cfg.optim.calculate_per_token_loss else 1.0)
        for chunk in self.model:
            chunk.train()
        if not sum(weights):
            return float("nan")
        return sum(v * w for v, w in zip(values, weights) if w) / sum(weights)

    def evaluate_now(self, final: bool = False) -> None:
        """Validation (and at the end of training the test split), with every parameter current.
        Under --manual-gc, as in Megatron-LM (unless --no-manual-gc-eval): a full collection before,
        and one of the youngest generation after (the objects the evaluation made)."""
        lg = self.cfg.logging
        if lg.manual_gc and lg.manual_gc_eval:
            gc.collect()
        with self._parameters_gathered():
            self.run_evaluation()
            if final:
                self.run_test_evaluation()
        if lg.manual_gc and lg.manual_gc_eval:
            gc.collect(generation=0)

    def run_evaluation(self) -> None:
        cfg = self.cfg
        phase = self.phase(self.iteration)
        lm = self.evaluate(self.datasets.valid_lm, cfg.logging.eval_iters)
        # The bag loss while the model is a superposition model: during the phase and at the switch
        # itself (the evaluation after the last superposition step reports where that phase ended).
        at_or_before_switch = 0 < self.num_sup_iters and self.iteration <= self.num_sup_iters
        mce = self.evaluate(self.datasets.valid_mce, cfg.logging.eval_iters) if at_or_before_switch else None
        if lm is None:
            return
        record = {"type": "eval", "iteration": self.iteration, "phase": phase, "val_lm_loss": lm,
                  "val_lm_ppl": math.exp(min(lm, 50.0)), "data_tokens": self.data_tokens,
                  "elapsed_s": self.timer.elapsed() + self.elapsed_before}
        # Megatron-LM's wording, so that log parsers written for it read this line too
        text = (f" validation loss at iteration {self.iteration} | lm loss value: {lm:.6E} | "
                f"lm loss PPL: {record['val_lm_ppl']:.6E} |")
        if mce is not None and cfg.tst.mode == "input":
            # --tst-mode input: bag inputs, next-token targets -- a next-token loss, not a bag loss
            record["val_bag_input_lm_loss"] = mce
            text += f" bag-input lm loss value: {mce:.6E} |"
        elif mce is not None:
            record["val_mce_loss"] = mce
            text += f" mce loss value: {mce:.6E} |"
        self.log.record(record)
        self._print_boxed(text)

    def run_test_evaluation(self) -> None:
        """The test split, once at the end of training, as Megatron-LM does when the split gives it
        documents (the default --split 969,30,1 does). Next-token loss only: the final model is a
        plain GPT, and the test samples are the ones a baseline run of the same data tests on."""
        lm = self.evaluate(self.datasets.test_lm, self.cfg.logging.eval_iters)
        if lm is None:
            return
        ppl = math.exp(min(lm, 50.0))
        self.log.record({"type": "test", "iteration": self.iteration, "test_lm_loss": lm, "test_lm_ppl": ppl,
                         "data_tokens": self.data_tokens, "elapsed_s": self.timer.elapsed() + self.elapsed_before})
        self._print_boxed(f" validation loss at iteration {self.iteration} on test set | lm loss value: {lm:.6E} | "
                          f"lm loss PPL: {ppl:.6E} |")

    def _print_boxed(self, text: str) -> None:
        bar = "-" * (len(text) + 1)
        self.log.print(f"{bar}\n{text}\n{bar}")
