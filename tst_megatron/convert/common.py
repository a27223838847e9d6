"""What export and import share: the error type, sizes and progress, resolving a checkpoint and
loading it into a 1-rank megatron model (dist_checkpointing reshards from the saved layout)."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import re
import sys
from typing import Any, Callable, Iterator, Mapping, Optional, Tuple

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}
class ConversionError(Exception):
    """A conversion that cannot be done, with what to do about it."""


def _say(log: Optional[Callable[[str], None]], text: str) -> None:
    if log is not None:
        log(text)


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
               "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}


def parse_size(text: Any) -> int:
    """'5GB' -> 5 * 10**9, '500MiB' -> 500 * 2**20, '1024' -> 1024 (transformers' convention)."""
    if isinstance(text, int):
        value = text
    else:
        mo = _SIZE_RE.match(str(text))
        if mo is None:
            raise ConversionError(f"--max-shard-size {text!r}: use a size such as 5GB, 500MB, 2GiB "
                                  "or a number of bytes")
        value = int(float(mo.group(1)) * _SIZE_UNITS[(mo.group(2) or "B").upper()])
    if value <= 0:
        raise ConversionError(f"--max-shard-size {text!r}: must be positive")
    return value


def _human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if nbytes < 1000 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1000.0
    return f"{nbytes:.2f} TB"


class _Stages:
    """A tqdm bar over the steps of a conversion (on stderr; each step shows what it does)."""

    def __init__(self, desc: str, total: int, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="step", disable=not enabled, file=sys.stderr,
                        bar_format="{desc} {n_fmt}/{total_fmt} |{bar:20}| {elapsed}{postfix}",
                        dynamic_ncols=True)

    @contextlib.contextmanager
    def step(self, text: str) -> Iterator[None]:
        self.bar.set_postfix_str(text, refresh=True)
        yield
        self.bar.update(1)

    def close(self, status: str) -> None:
        self.bar.set_postfix_str(status, refresh=True)
        self.bar.close()


@contextlib.contextmanager
def _stages(desc: str, total: int, enabled: bool) -> Iterator[_Stages]:
    stages = _Stages(desc, total, enabled)
    try:
        yield stages
    except BaseException:
        stages.close("failed")
        raise
    stages.close("done")


# ----------------------------------------------------------------------------------------------
# Checkpoints and their saved run configuration
# ----------------------------------------------------------------------------------------------

def resolve_checkpoint(load: str, iteration: Optional[int] = None) -> Tuple[int, str, dict]:
    """(iteration, iteration directory, tst_meta) for `--load ROOT_OR_ITER_DIR [--iteration N]`.

    ROOT: the tracker's latest checkpoint, or iter_N with `iteration`. An iteration directory
    (holds tst_meta.json / is named iter_NNNNNNN) is used as is; `iteration`, if given, must agree.
    """
    from .. import checkpointing as ckpt

    if not os.path.isdir(load):
        raise ConversionError(f"--load {load}: no such directory")
    base = os.path.basename(os.path.normpath(load))
    is_iter_dir = os.path.isfile(os.path.join(load, ckpt.MARKER)) or re.fullmatch(r"iter_\d{7}", base)
    try:
        if is_iter_dir:
            meta = ckpt.verify_checkpoint_dir(load)
            it = int(meta.get("iteration", int(base[5:]) if base.startswith("iter_") else -1))
            if iteration is not None and iteration != it:
                raise ConversionError(f"--iteration {iteration}: --load {load} is the checkpoint of "
                                      f"iteration {it}; give the checkpoint root to pick another")
            return it, load, meta
        if iteration is not None:
            path = ckpt.iteration_dir(load, iteration)
            if not os.path.isdir(path):
                have = [i for i, _ in ckpt.list_checkpoints(load)]
                raise ConversionError(f"--iteration {iteration}: {path} does not exist "
                                      f"(checkpoints under {load}: {sorted(have) or 'none'})")
            return iteration, path, ckpt.verify_checkpoint_dir(path)
        found = ckpt.find_checkpoint(load, fallback=False)
    except ckpt.CheckpointError as exc:
        raise ConversionError(str(exc)) from None
    if found is None:
        raise ConversionError(f"--load {load}: no checkpoint there (no {ckpt.TRACKER} and no "
                              "iter_* directories)")
    return found


def run_config_from_args(args: Mapping[str, Any]):
    """The RunConfig a checkpoint was trained with, from `tst_meta.json`'s `args`.

    Unknown keys (a newer trainer's) are ignored; missing ones take today's defaults.
    """
    from ..arguments import (CheckpointArgs, DataArgs, LoggingArgs, ModelArgs, OptimArgs,
                            ParallelArgs, RunConfig)
    from ..config import TSTConfig

    def make(cls, group: str):
        values = dict(args.get(group) or {})
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    if "model" not in args:
        raise ConversionError("tst_meta.json holds no model arguments (`args.model`): not a "
                              "checkpoint of pretrain_tst.py")
    try:
        return RunConfig(model=make(ModelArgs, "model"), parallel=make(ParallelArgs, "parallel"),
                         optim=make(OptimArgs, "optim"), data=make(DataArgs, "data"),
                         ckpt=make(CheckpointArgs, "ckpt"), logging=make(LoggingArgs, "logging"),
                         tst=make(TSTConfig, "tst"))
    except (TypeError, ValueError) as exc:
        raise ConversionError(f"tst_meta.json: the saved run arguments do not load ({exc})") from None


def _single_rank(cfg):
    """A copy of cfg with every parallel size 1 (the layout conversions build the model in)."""
    cfg = copy.deepcopy(cfg)
    cfg.parallel = dataclasses.replace(
        cfg.parallel, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        num_layers_per_virtual_pipeline_stage=None, expert_model_parallel_size=1,
        sequence_parallel=False, use_distributed_optimizer=False)
    if cfg.model.transformer_impl == "transformer_engine" and not _use_te():
        # a run trained with Transformer Engine, converted on a machine without it: the local layers
        # map their sharded keys onto TE's (megatron-core's sharded_state_dict_keys_map; for MoE
        # layers tst_megatron.specs keeps TE's own pre-MLP norm name), so they load it
        cfg.model = dataclasses.replace(cfg.model, transformer_impl=None)
    return cfg


@contextlib.contextmanager
def megatron_session(seed: int = 1234) -> Iterator[None]:
    """A 1-rank process group and megatron parallel state with every size 1 (CPU support on).

    Reuses a 1-rank group / size-1 parallel state that already exists (e.g. in a test process) and
    tears down only what it created.
    """
    import torch
    import torch.distributed as dist

    from ..cpu import distributed_backend, enable_cpu_support, model_parallel_manual_seed

    enable_cpu_support()
    created_pg = False
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise ConversionError("the converter runs in a single process; do not launch it with "
                                  "torchrun (it reshards any TP/PP/EP layout by itself)")
    else:
        if torch.cuda.is_available():
            torch.cuda.set_device(0)
        dist.init_process_group(distributed_backend(), store=dist.HashStore(), rank=0, world_size=1)
        created_pg = True
    from megatron.core import parallel_state as ps

    created_ps = False
    if ps.model_parallel_is_initialized():
        sizes = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
                 ps.get_expert_model_parallel_world_size())
        if sizes != (1, 1, 1):
            raise ConversionError(f"megatron parallel state is initialised with TP/PP/EP {sizes}; "
                                  "the converter needs all sizes 1")
    else:
        ps.initialize_model_parallel()
        created_ps = True
    model_parallel_manual_seed(seed)
    try:
        yield
    finally:
        if created_ps:
            ps.destroy_model_parallel()
        if created_pg:
            dist.destroy_process_group()


def _use_te() -> bool:
    from ..specs import transformer_engine_available

    return transformer_engine_available()


def load_megatron_model(ckpt_dir: str, meta: Optional[dict] = None):
    """The checkpoint's model at TP=PP=EP=1, weights loaded (resharded by dist_checkpointing).

    Call inside `megatron_session()`. Returns (model in eval mode, the saved RunConfig).
    """
    from .. import checkpointing as ckpt
    from ..builders import build_model_chunks, transformer_config
    from ..cpu import default_device

    meta = meta if meta is not None else ckpt.read_meta(ckpt_dir)
    cfg = _single_rank(run_config_from_args(meta.get("args") or {}))
    vocab = int(meta["vocab_size"])
    tconfig = transformer_config(cfg.model, cfg.parallel, cfg.optim,
                                 use_cpu_init=default_device().type == "cpu")
    chunks = build_model_chunks(cfg, tconfig, vocab)
    try:
        ckpt.load_checkpoint(ckpt_dir, chunks, None, None, load_optim=False, load_rng=False,
                             use_distributed_optimizer=False)
    except ckpt.CheckpointError as exc:
        raise ConversionError(str(exc)) from None
    model = chunks[0]
    model.eval()
    return model, cfg
