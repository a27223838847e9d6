"""Superposition data: megatron's GPTDataset, re-cut into bags, then back into plain samples.

Why a wrapper and not a new dataset class: megatron's GPTDataset already does everything that
is hard (document shuffling, packing, splits, blends, the on-disk index cache). TST only needs
*longer* windows of the same packed stream, so we ask megatron for a base dataset whose samples
hold exactly the tokens one TST sample needs, and re-cut each window:

  L = model sequence length, s = bag size.
  mode full / input : a base sample holds s*(L+1) tokens (megatron's sequence_length
                      s*(L+1) - 1 plus its extra label token). As a superposition sample it is
                      L+1 bags of s tokens: bags 0..L-1 are the input, bags 1..L the labels,
                      so every latent position (the last included) has all s targets. As
                      recovery data it tiles into s plain samples of L+1 tokens.
  mode output       : a base sample holds L+s tokens: L input tokens plus s-1 extra tokens so
                      that the last position also sees its whole next bag. Recovery uses the
                      first L+1 tokens.
  s == 1            : the base dataset IS the plain baseline dataset and items pass through.

`TSTDataset` is indexed by the *global* consumed-sample index: indices below
`num_superposition_samples` are superposition samples (base item i), the rest are recovery
samples that continue through the base stream after the last superposition item (the s samples
of one window spread over the stream, not side by side in one batch: `base_index_of`). A run is thus
a pure function of (seed, consumed samples), resumes exactly, and never trains twice on a token
window within an epoch of the base dataset. (A run that needs two or more epochs of its split --
TST eats s times more text -- gets megatron's multi-epoch order: when the last epoch is mostly
used, megatron shuffles all epochs together, so text of the superposition phase can come back in
recovery before the first epoch is done, exactly as it would for a plain GPTDataset. Every window
the run plans to read is read; only the one block of recovery windows that holds an epoch boundary
mixes its two epochs' windows.)

Samples are dicts of tensors only (default collate works):
  superposition, full  : tokens [L, s], labels [L, s]   (invalid target -> -100)
  superposition, input : tokens [L, s], labels [L, 1]   (first token of the next bag)
  superposition, output: tokens [L],    labels [L, s]
  recovery / s == 1    : tokens [L],    labels [L]      (megatron style: ids kept, loss_mask 0)
  plus loss_mask [L] float (superposition: 1 where any target of the position is valid) and
  position_ids [L] int64.
"""
from __future__ import annotations

import atexit
import math
import signal
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .config import TSTConfig

IGNORE_INDEX = -100
# Recovery samples are dealt from blocks of this many base windows (see TSTDataset.base_index_of).
RECOVERY_SPREAD_WINDOWS = 4096
RECOVERY_SPREAD_SEED = 0x7357
SUPERPOSITION = "superposition"
RECOVERY = "recovery"
SAMPLE_KEYS = ("tokens", "labels", "loss_mask", "position_ids")

Blend = Tuple[List[str], Optional[List[float]]]


# ---------------------------------------------------------------------------------- geometry
def recovery_chunks(tst: TSTConfig) -> int:
    """Plain next-token samples cut from one base sample during recovery.

    full/input windows hold s*(L+1) tokens = s whole samples of L+1 tokens; an output window
    (L+s tokens) holds only one.
    """
    if not tst.enabled or tst.mode == "output":
        return 1
    return tst.bag_size


def base_sequence_length(seq_length: int, tst: TSTConfig) -> int:
    """megatron `sequence_length` of the base dataset (megatron adds one extra label token)."""
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1 (got {seq_length})")
    s = tst.bag_size
    if not tst.enabled:
        return seq_length
    if tst.mode == "output":
        return seq_length + s - 1
    return s * (seq_length + 1) - 1


def data_tst_config(tst: TSTConfig, num_superposition_samples: int) -> TSTConfig:
    """The TST configuration the train data is built with: a run without a superposition sample
    (--tst-bag-size s with 0 superposition iterations) reads the baseline's own data (windows of
    L+1), not recovery chunks of s(L+1) windows in another order."""
    return tst if num_superposition_samples else TSTConfig()


def num_base_samples(tst: TSTConfig, num_superposition_samples: int,
                     num_recovery_samples: int) -> int:
    """Base items needed for a run: one per superposition sample, 1/chunks per recovery one."""
    if num_superposition_samples < 0 or num_recovery_samples < 0:
        raise ValueError("sample counts must be >= 0 (got "
                         f"{num_superposition_samples}, {num_recovery_samples})")
    if not tst.enabled and num_superposition_samples:
        raise ValueError("superposition samples requested with TST disabled (bag_size == 1)")
    return num_superposition_samples + math.ceil(num_recovery_samples / recovery_chunks(tst))


# ---------------------------------------------------------------------------------- window ops
def _text_and_validity(item: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Raw token window of a base item and whether each token is a valid *target*.

    megatron stores tokens = text[:-1], labels = text[1:]; its loss_mask[q] says whether the
    label at q (text position q+1) may be trained on (0 on pad, and after EOD with
    eod_mask_loss). valid[0] is False: the first token is never a target inside this window.
    """
    text = torch.cat([item["tokens"], item["labels"][-1:]]).long()
    valid = torch.zeros(text.numel(), dtype=torch.bool)
    valid[1:] = item["loss_mask"] > 0
    return text, valid


def _masked(ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Target ids with invalid targets replaced by IGNORE_INDEX (what the multi-hot CE expects)."""
    return torch.where(valid, ids, torch.full_like(ids, IGNORE_INDEX))


def _document_position_ids(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """Positions that restart after every EOD, as megatron's reset_position_ids computes them."""
    length = tokens.numel()
    pos = torch.arange(length, dtype=torch.long)
    doc_start = torch.zeros(length, dtype=torch.long)
    doc_start[1:] = torch.where(tokens[:-1] == eod, pos[1:], torch.zeros_like(pos[1:]))
    return pos - torch.cummax(doc_start, dim=0).values


def _superposition_sample(text: torch.Tensor, valid: torch.Tensor, seq_length: int, tst: TSTConfig,
                          eod: Optional[int] = None, reset_position_ids: bool = False) -> Dict[str, torch.Tensor]:
    """Bag layout of one base window (see module docstring). Positions count bags (a bag may
    straddle documents), except in output mode, whose inputs are plain tokens: there
    --reset-position-ids restarts them at every document, as in the recovery phase."""
    L, s = seq_length, tst.bag_size
    position_ids = torch.arange(L, dtype=torch.long)
    if tst.mode == "output":
        # labels[t, j] = text[t + 1 + j]: the s tokens following input token t
        idx = torch.arange(L).unsqueeze(1) + 1 + torch.arange(s).unsqueeze(0)
        tokens = text[:L].clone()
        label_valid = valid[idx]
        labels = _masked(text[idx], label_valid)
        if reset_position_ids:
            if eod is None:
                raise ValueError("reset_position_ids needs the EOD token id (TSTDataset eod_token=)")
            position_ids = _document_position_ids(tokens, eod)
    else:
        tokens = text[: L * s].reshape(L, s).clone()
        label_ids = text[s: (L + 1) * s].reshape(L, s)
        label_valid = valid[s: (L + 1) * s].reshape(L, s)
        if tst.mode == "input":  # next-token target of the bag = first token of the next bag
            label_ids, label_valid = label_ids[:, :1], label_valid[:, :1]
        labels = _masked(label_ids, label_valid)
    # A position counts in the loss mean when a target it is trained on is valid: with a weighting
    # that gives some slots weight 0 (`first`), invalid weighted slots leave nothing to learn there.
    weighted = label_valid
    if label_valid.shape[-1] > 1:
        weighted = label_valid & (torch.tensor(tst.bag_weights()) > 0)
    return {
        "tokens": tokens,
        "labels": labels.contiguous(),
        "loss_mask": weighted.any(dim=-1).float(),
        "position_ids": position_ids,
    }


def _next_token_sample(text: torch.Tensor, valid: torch.Tensor, start: int, seq_length: int,
                       eod: Optional[int], reset_position_ids: bool) -> Dict[str, torch.Tensor]:
    """Plain megatron-style sample from text[start : start+L+1] (ids kept, masked by loss_mask)."""
    window = text[start: start + seq_length + 1]
    tokens = window[:-1].clone()
    if reset_position_ids:
        if eod is None:
            raise ValueError("reset_position_ids needs the EOD token id (TSTDataset eod_token=)")
        position_ids = _document_position_ids(tokens, eod)
    else:
        position_ids = torch.arange(seq_length, dtype=torch.long)
    return {
        "tokens": tokens,
        "labels": window[1:].clone(),
        "loss_mask": valid[start + 1: start + seq_length + 1].float(),
        "position_ids": position_ids,
    }


# ---------------------------------------------------------------------------------- dataset
class TSTDataset(Dataset):
    """Global-index view of a base GPTDataset/BlendedDataset: superposition, then recovery.

    Args:
        base: megatron GPTDataset or BlendedDataset built with
            `sequence_length = base_sequence_length(seq_length, tst)`.
        tst: the TST settings (bag size, mode).
        seq_length: L, the model sequence length (latent positions per sample).
        num_superposition_samples: global samples [0, n) are superposition samples; for
            training, the samples the superposition steps consume (`resume_sample_plan`:
            `tst.num_superposition_iters(train_iters) * global_batch_size` at a constant batch).
        reset_position_ids / eod_token: recovery samples cut from the middle of a base window
            recompute megatron's per-document positions themselves, so they need both.
            Superposition positions are always arange(L) (bags straddle documents).
        vocab_size: when given, every sample's token ids are checked against it. The preflight
            check reads only the first 64M tokens of each data file; this catches a bad id further
            in with a message naming it, instead of an index error (CPU) or a device assert (GPU).
    """

    def __init__(self, base: Dataset, tst: TSTConfig, seq_length: int,
                 num_superposition_samples: int, reset_position_ids: bool = False,
                 eod_token: Optional[int] = None, vocab_size: Optional[int] = None,
                 planned_windows: Optional[int] = None):
        if num_superposition_samples < 0:
            raise ValueError(f"num_superposition_samples must be >= 0 (got {num_superposition_samples})")
        if not tst.enabled and num_superposition_samples:
            raise ValueError("TSTDataset: superposition samples need bag_size > 1")
        if num_superposition_samples > len(base):
            raise ValueError(f"TSTDataset: {num_superposition_samples} superposition samples need as "
                             f"many base samples, the base dataset has {len(base)}")
        self.base = base
        self.tst = tst
        self.seq_length = seq_length
        self.num_superposition_samples = num_superposition_samples
        self.chunks = recovery_chunks(tst)
        self.window = base_sequence_length(seq_length, tst) + 1
        self.reset_position_ids = reset_position_ids
        self.eod_token = eod_token
        self.vocab_size = vocab_size
        # the base windows the run plans to read (megatron rounds its stream up to whole epochs)
        planned = len(base) if planned_windows is None else planned_windows
        self.planned_windows = min(max(planned, num_superposition_samples), len(base))
        self._order_cache = None

    def __len__(self) -> int:
        n_sup = self.num_superposition_samples
        return n_sup + self.chunks * (len(self.base) - n_sup)

    def phase_of(self, index: int) -> str:
        """'superposition' or 'recovery' for a global sample index (the sample's layout)."""
        self._check_index(index)
        return SUPERPOSITION if index < self.num_superposition_samples else RECOVERY

    def base_index_of(self, index: int) -> Tuple[int, int]:
        """(base item, chunk) a global sample is cut from; chunk is 0 for superposition.

        Recovery: a base window holds `chunks` (= s) consecutive plain samples. Handing them out
        in order would put s neighbouring pieces of the same text into one global batch -- a
        batch of B samples from only B/s places, i.e. s times less diverse than the baseline's
        batches for the whole recovery phase. So the (window, chunk) pairs of each block of
        RECOVERY_SPREAD_WINDOWS windows are dealt in a fixed pseudo-random order (a pure
        function of the index: resumes and data-parallel ranks agree); every pair is still used
        exactly once and no recovery sample reaches back into the superposition windows.

        The blocks end at `planned_windows`, the windows the run plans to read, and start again
        after it: megatron's stream runs on to a whole number of epochs, and a block dealt across
        the plan's end would leave windows of the plan unread while training on windows past it
        (in a run of a little more than one epoch: repeated text instead of unread first-epoch text).
        """
        self._check_index(index)
        n_sup = self.num_superposition_samples
        if index < n_sup:
            return index, 0
        if self.chunks == 1:
            return index, 0
        m = index - n_sup
        region, start, windows = 0, n_sup, self.planned_windows - n_sup
        if m >= self.chunks * windows:  # past the plan (a run extended beyond it)
            m -= self.chunks * windows
            region, start, windows = 1, self.planned_windows, len(self.base) - self.planned_windows
        k = RECOVERY_SPREAD_WINDOWS
        block, offset = divmod(m, self.chunks * k)
        size = min(k, windows - block * k)  # the last block of a region may be shorter
        q = int(self._recovery_order(region, block, size)[offset])
        return start + block * k + q // self.chunks, q % self.chunks

    def _recovery_order(self, region: int, block: int, windows: int):
        key = (region, block, windows)
        if self._order_cache is None or self._order_cache[0] != key:
            rng = np.random.Generator(np.random.PCG64([RECOVERY_SPREAD_SEED, region, block]))
            self._order_cache = (key, rng.permutation(windows * self.chunks))
        return self._order_cache[1]

    def _check_index(self, index: int) -> None:
        if not 0 <= index < len(self):
            raise IndexError(f"TSTDataset index {index} out of range [0, {len(self)})")

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        index = int(index)
        base_index, chunk = self.base_index_of(index)
        item = self.base[base_index]
        if not self.tst.enabled:
            # the base dataset is the plain baseline dataset: hand its sample through unchanged
            return self._checked({k: item[k] for k in SAMPLE_KEYS}, index)
        text, valid = _text_and_validity(item)
        if text.numel() != self.window:
            raise ValueError(f"TSTDataset: base samples hold {text.numel()} tokens but L = "
                             f"{self.seq_length}, s = {self.tst.bag_size}, mode {self.tst.mode} need "
                             f"{self.window}; build the base with base_sequence_length()")
        if index < self.num_superposition_samples:
            return self._checked(_superposition_sample(text, valid, self.seq_length, self.tst, self.eod_token,
                                                       self.reset_position_ids), index)
        return self._checked(_next_token_sample(text, valid, chunk * (self.seq_length + 1), self.seq_length,
                                                self.eod_token, self.reset_position_ids), index)

    def _checked(self, sample: Dict[str, torch.Tensor], index: int) -> Dict[str, torch.Tensor]:
        if self.vocab_size is not None:
            top = max(int(sample["tokens"].max()), int(sample["labels"].max()))
            if top >= self.vocab_size:
                raise ValueError(
                    f"token id {top} in sample {index} of the data is >= the tokenizer's vocabulary "
                    f"({self.vocab_size}): --data-path holds ids this tokenizer does not have (the check "
                    "before training reads only the first 64M tokens of each file); rebuild the data "
                    "with tools/preprocess_data.py and this --tokenizer-model, or fix --vocab-size")
        return sample


# ---------------------------------------------------------------------------------- builder
def train_valid_test_num_samples(train_iters: int, global_batch_size: int,
                                 eval_iters: int) -> Tuple[int, int, int]:
    """Samples per split: the train stream, and the eval_iters global batches every evaluation reads.

    Megatron-LM asks for (train_iters // eval_interval + 1) x eval_iters batches of validation,
    because its evaluations walk on through the split. Ours read the same first batches every time
    (one curve's points differ only by the weights), so asking for more would only matter where it
    should not: when the split is smaller than the request, megatron shuffles several epochs
    together and the first batches then depend on --train-iters and --eval-interval, so runs of
    different lengths (TST and a longer baseline) would be scored on different text."""
    return (train_iters * global_batch_size,
            eval_iters * global_batch_size,
            eval_iters * global_batch_size)


def resume_sample_plan(*, iteration: int, consumed_samples: int, superposition_samples: int,
                       superposition_iters: int, train_iters: int, global_batch_size: int,
                       samples_in: Optional[Callable[[int, int], int]] = None) -> Tuple[int, int]:
    """(superposition samples, train samples) of a run resumed at `iteration`.

    The train stream is indexed by consumed samples: superposition samples first, recovery after.
    Where that boundary lies depends on the global batch of every superposition step, so a run
    resumed with another --global-batch-size must not recompute it as iterations x batch: the
    samples already consumed in superposition (`superposition_samples`, from the checkpoint) stay
    where they were, and only the steps still ahead use the new batch. A fresh run (iteration 0)
    gets superposition_iters x batch, as before.

    samples_in(consumed, steps): the samples `steps` steps consume from `consumed` on, when the
    batch is not constant (--rampup-batch-size, `BatchSchedule.samples_in`).
    """
    if samples_in is None:
        def samples_in(consumed: int, steps: int) -> int:
            return steps * global_batch_size
    if superposition_samples < consumed_samples and iteration < superposition_iters:
        raise ValueError(
            f"the checkpoint at iteration {iteration} has already switched to recovery (after "
            f"{superposition_samples} superposition samples), but the run asks for {superposition_iters} "
            "superposition iterations: a run cannot go back to the superposition phase")
    n_train = consumed_samples + samples_in(consumed_samples, max(0, train_iters - iteration))
    if superposition_iters == 0:  # TST off (e.g. a TST checkpoint continued as a plain run)
        return 0, n_train
    if iteration >= superposition_iters:
        return superposition_samples, n_train
    return superposition_samples + samples_in(consumed_samples, superposition_iters - iteration), n_train


@dataclass
class TSTDatasets:
    """What the trainer consumes.

    train: TSTDataset indexed by global consumed samples (superposition first, then recovery).
    valid_lm / test_lm: plain next-token samples of length L -- the very datasets a baseline
        run (bag_size 1, same seed and data) validates on, so LM losses compare exactly.
    valid_mce: superposition samples of the validation split (None when TST is disabled), to
        monitor the bag loss during the superposition phase.
    """

    train: Optional[TSTDataset]
    valid_lm: Optional[TSTDataset]
    valid_mce: Optional[TSTDataset]
    test_lm: Optional[TSTDataset]
    num_superposition_samples: int
    num_train_samples: int
    num_base_train_samples: int  # requested from megatron for the train split (a checkpoint keeps it)


def _gpt_config(seq_length: int, seed: int, tokenizer, blend: Optional[Blend],
                blend_per_split: Optional[Sequence[Optional[Blend]]], split: Optional[str],
                data_cache_path: Optional[str], reset_position_ids: bool,
                reset_attention_mask: bool, eod_mask_loss: bool,
                mid_level_dataset_surplus: float, num_dataset_builder_threads: int, mmap_bin_files: bool = True):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        blend_per_split=None if blend_per_split is None else list(blend_per_split),
        split=split,
        tokenizer=tokenizer,
        path_to_cache=data_cache_path,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=False,  # causal masks come from the attention kernel
        mid_level_dataset_surplus=mid_level_dataset_surplus,
        num_dataset_builder_threads=num_dataset_builder_threads,
        mmap_bin_files=mmap_bin_files,
    )


def _build_splits(config, sizes: Sequence[int]) -> List[Optional[Dataset]]:
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset

    # every rank builds (rank 0 first, through megatron's own barrier): no pipeline/TP filter;
    # no blend at all is megatron's mock data (--mock-data)
    cls = MockGPTDataset if config.mock else GPTDataset
    return BlendedMegatronDatasetBuilder(cls, list(sizes), lambda: True, config).build()


def build_tst_datasets(
    tst: TSTConfig,
    *,
    seq_length: int,
    train_iters: int,
    global_batch_size: int,
    eval_iters: int,
    tokenizer,
    seed: int,
    blend: Optional[Blend] = None,
    blend_per_split: Optional[Sequence[Optional[Blend]]] = None,
    split: Optional[str] = "969,30,1",
    data_cache_path: Optional[str] = None,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
    mid_level_dataset_surplus: float = 0.005,
    num_dataset_builder_threads: int = 1,
    mmap_bin_files: bool = True,
    sample_plan: Optional[Tuple[int, int]] = None,
    base_train_samples: Optional[int] = None,
) -> TSTDatasets:
    """Build train/valid/test through megatron's BlendedMegatronDatasetBuilder and wrap them.

    blend: megatron's (prefixes, weights or None); parse a `--data-path 0.3 A 0.7 B` list with
    `megatron.core.datasets.utils.get_blend_from_list`. blend_per_split replaces blend+split.
    tokenizer: a megatron tokenizer object (needs unique_identifiers, vocab_size, eod).
    sample_plan: (superposition samples, train samples) of the whole run, when they are not
        simply iterations x global batch -- a run resumed with another --global-batch-size
        (`resume_sample_plan`). Default: a fresh run's plan.
    base_train_samples: how many base samples to ask megatron for in the train split (default:
        what the plan needs). megatron's stream order depends on that count (the number of epochs
        it shuffles together; a blend's size), so a resumed run passes the count its checkpoint
        was built with, to deal from the very stream it consumed from; ValueError when that
        stream is too short for the plan.
    Must be called on every rank (it joins megatron's rank-0-first barrier when
    torch.distributed is initialised; a BlendedDataset with a cache path needs a process group).
    """
    if reset_attention_mask:
        raise ValueError("reset_attention_mask: per-document attention masks are not implemented (the model "
                         "attends causally across documents, as megatron does without the flag)")
    if blend_per_split is not None:
        split = None
    n_train, n_valid, n_test = train_valid_test_num_samples(train_iters, global_batch_size, eval_iters)
    n_sup = tst.num_superposition_iters(train_iters) * global_batch_size
    if sample_plan is not None:
        n_sup, n_train = sample_plan
        if not 0 <= n_sup <= n_train:
            raise ValueError(f"sample_plan: need 0 <= superposition samples <= train samples, got {sample_plan}")
    tst = data_tst_config(tst, n_sup)
    n_base_train = num_base_samples(tst, n_sup, n_train - n_sup)

    def config_for(length: int):
        return _gpt_config(length, seed, tokenizer, blend, blend_per_split, split,
                           data_cache_path, reset_position_ids, reset_attention_mask,
                           eod_mask_loss, mid_level_dataset_surplus, num_dataset_builder_threads, mmap_bin_files)

    def wrap(ds, cfg: TSTConfig, n_superposition: int, planned: Optional[int] = None) -> Optional[TSTDataset]:
        if ds is None:
            return None
        return TSTDataset(ds, cfg, seq_length, n_superposition,
                          reset_position_ids=reset_position_ids, eod_token=tokenizer.eod,
                          vocab_size=tokenizer.vocab_size, planned_windows=planned)

    n_request = n_base_train if base_train_samples is None else base_train_samples
    train, valid, test = _build_splits(config_for(base_sequence_length(seq_length, tst)),
                                       [n_request, n_valid, n_test])
    if train is not None and len(train) < n_base_train:
        raise ValueError(f"the train stream built from {n_request} requested samples holds {len(train)} "
                         f"windows; this run needs {n_base_train}")
    plain = TSTConfig()  # bag_size 1: pass-through of plain next-token samples
    if tst.enabled:
        valid_mce = wrap(valid, tst, 0 if valid is None else len(valid))
        # The LM view is the baseline's own validation data (same seed, length L, sizes), not
        # recovery chunks of the TST windows, so TST and baseline LM losses use the same tokens.
        # The train split built here only to reach valid/test costs one epoch of indices.
        _, valid_plain, test_plain = _build_splits(config_for(seq_length), [1, n_valid, n_test])
    else:
        valid_mce, valid_plain, test_plain = None, valid, test
    return TSTDatasets(
        # the requested count, not this plan's need: a resumed run with another plan deals the
        # recovery blocks of the stream its checkpoint was built with
        train=wrap(train, tst, n_sup, planned=n_request),
        valid_lm=wrap(valid_plain, plain, 0),
        valid_mce=valid_mce,
        test_lm=wrap(test_plain, plain, 0),
        num_superposition_samples=n_sup,
        num_train_samples=n_train,
        num_base_train_samples=n_request,
    )


# ---------------------------------------------------------------------------------- sampling
class PretrainingSampler:
    """Micro-batches of global sample indices, in megatron's MegatronPretrainingSampler order.

    Consecutive indices form groups of micro_batch_size * data_parallel_size; rank r takes the
    r-th micro-batch slice of each group. A global batch is therefore a run of consecutive
    indices, and resuming at `consumed_samples` continues the same sequence exactly. Partial
    trailing groups are dropped.
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int):
        if micro_batch_size < 1 or data_parallel_size < 1:
            raise ValueError(f"micro_batch_size ({micro_batch_size}) and data_parallel_size "
                             f"({data_parallel_size}) must be >= 1")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank {data_parallel_rank} not in [0, {data_parallel_size})")
        if not 0 <= consumed_samples <= total_samples:
            raise ValueError(f"consumed_samples {consumed_samples} not in [0, total_samples "
                             f"{total_samples}]: no data left to train on")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.group = micro_batch_size * data_parallel_size

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // self.group

    def __iter__(self) -> Iterator[List[int]]:
        first = self.consumed_samples + self.data_parallel_rank * self.micro_batch_size
        for k in range(len(self)):
            start = first + k * self.group
            yield list(range(start, start + self.micro_batch_size))


def build_data_iterator(dataset: Dataset, consumed_samples: int, micro_batch_size: int,
                        data_parallel_rank: int, data_parallel_size: int, num_workers: int = 0,
                        total_samples: Optional[int] = None,
                        pin_memory: Optional[bool] = None) -> Iterator[Dict[str, torch.Tensor]]:
    """Iterator of collated micro-batches for this DP rank, starting at consumed_samples.

    pin_memory (default: when CUDA is available, as megatron's loader does): batches in page-locked
    memory, so the trainer's `.to(device, non_blocking=True)` is a real asynchronous copy; from
    pageable memory the driver stages the copy and may synchronize with the stream."""
    sampler = PretrainingSampler(len(dataset) if total_samples is None else total_samples,
                                 consumed_samples, micro_batch_size, data_parallel_rank,
                                 data_parallel_size)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                        persistent_workers=num_workers > 0,
                        worker_init_fn=_ignore_stop_signals if num_workers > 0 else None)
    iterator = iter(loader)
    if num_workers > 0:  # before multiprocessing's exit-time terminate() (atexit runs the latest first)
        atexit.register(_close_at_exit, weakref.ref(iterator))
    return iterator


def _close_at_exit(ref) -> None:
    iterator = ref()
    if iterator is not None:
        close_data_iterator(iterator)


def _ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM and SIGINT: SLURM's preemption signal (scancel --signal,
    Ctrl-C in a terminal) reaches every process of the job, workers included, and a worker that
    dies of it takes the run down before the trainer's handler can save. The trainer stops them
    itself when it closes (`close_data_iterator`; Python's exit-time terminate() is a SIGTERM), and
    a worker ends by itself when its parent is gone."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def close_data_iterator(iterator) -> None:
    """Stop a DataLoader iterator's worker processes now: a sentinel each, then a join (torch's own
    shutdown, which its iterator otherwise runs only when garbage-collected)."""
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


class CountingIterator:
    """Passes micro-batches through and counts the input and label elements it handed out.

    The trainer checks those counts against the layout its phase expects (bags of s tokens in
    superposition, single tokens in recovery), so a data stream that is out of step with the
    iteration's phase stops the run instead of training the wrong objective under the right label.
    """

    def __init__(self, iterator: Iterator[Dict[str, torch.Tensor]]):
        self._it = iterator
        self.tokens = 0
        self.labels = 0

    def __iter__(self) -> "CountingIterator":
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        batch = next(self._it)
        self.tokens += batch["tokens"].numel()
        self.labels += batch["labels"].numel()
        return batch

    def take_counts(self) -> Tuple[int, int]:
        """(input elements, label elements) since the last call."""
        counts, self.tokens, self.labels = (self.tokens, self.labels), 0, 0
        return counts

    def close(self) -> None:
        close_data_iterator(self._it)
