"""Atomic, Megatron-layout checkpoints through megatron-core's dist_checkpointing (torch_dist).

Layout (what Megatron-LM users know):
    <save>/iter_0000100/                 a torch_dist checkpoint (metadata.json, common.pt, *.distcp)
    <save>/iter_0000100/tst_meta.json    run summary for tools: iteration, phase, args (rank 0)
    <save>/latest_checkpointed_iteration.txt

Atomicity: every rank writes into `<save>/iter_XXXXXXX.tmp`; after a barrier rank 0 writes
`tst_meta.json` (the completeness marker), renames the directory into place and only then
rewrites `latest_checkpointed_iteration.txt` (write-to-temp + os.replace). A crash at any point
leaves the previous checkpoint and tracker untouched. Saving an iteration that already has a
directory (the trainer avoids it when the state on disk is the same, but a run saving into another
run's directory can) swaps `iter_N` -> `iter_N.old`, `iter_N.tmp` -> `iter_N`: a crash between the
two renames leaves the tracker naming a missing `iter_N`, and loading then takes the complete
`iter_N.tmp` (or `iter_N.old`) instead. On load, a directory without the marker or that megatron
cannot read is reported by name; `fallback=True` walks back to the newest complete one.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import uuid
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

TRACKER = "latest_checkpointed_iteration.txt"
MARKER = "tst_meta.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be used, with the reason and the path."""


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _on_rank0(action: Callable[[], None]) -> None:
    """Run `action` on rank 0 and let every rank learn whether it failed (collective). A rank-0-only
    file operation that fails (a full disk, a quota) then raises on every rank, instead of leaving
    the others waiting at the next barrier until the distributed timeout."""
    from .distributed import from_rank0

    def attempt() -> Optional[str]:
        try:
            action()
        except Exception as exc:  # noqa: BLE001 -- reported on every rank
            return f"{type(exc).__name__}: {exc}"
        return None

    error = from_rank0(attempt)
    if error is not None:
        raise OSError(f"rank 0 failed ({error})" if _rank() else error)


def _fsync_dir(path: str) -> None:
    _fsync_path(path)


def _fsync_path(path: str) -> None:
    """fsync a file or directory; best effort (some filesystems refuse it on directories)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


# ------------------------------------------------------------------------------------ RNG
def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object(state):
    """Per model-parallel rank RNG state, replicated over data parallelism (as Megatron does)."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    pp, tp = ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()
    return ShardedObject("rng_state", state, (pp, tp),
                         (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
                         replica_id=ps.get_data_parallel_rank(with_context_parallel=True))


# ---------------------------------------------------------------------------- state dicts
def _model_sharded_state_dict(chunks) -> dict:
    modules = [getattr(c, "module", c) for c in chunks]
    if len(modules) == 1:
        return {"model": modules[0].sharded_state_dict()}
    return {f"model{i}": m.sharded_state_dict() for i, m in enumerate(modules)}


def _optimizer_metadata(use_distributed_optimizer: bool) -> dict:
    return {"distrib_optim_sharding_type": "fully_reshardable"} if use_distributed_optimizer else {}


# ------------------------------------------------------------------------- TEST HOOK (tests)
# tests/test_reliability.py sets TST_TEST_KILL_IN_SAVE=<iteration>[:<stage>] to `kill -9` the
# process in the middle of that iteration's save, at one of two stages:
#   shards  (the default)  every rank, after all shards are written, before the completeness
#                          marker, the rename and the tracker update -- the worst moment for a crash;
#   renamed                rank 0, after the marker and the rename into `iter_N`, before the tracker
#                          update: a complete `iter_N` the tracker does not name yet.
# Never set it in real runs.
KILL_IN_SAVE_ENV = "TST_TEST_KILL_IN_SAVE"
KILL_STAGES = ("shards", "renamed")


def _test_kill_in_save_hook(iteration: int, stage: str) -> None:
    value = os.environ.get(KILL_IN_SAVE_ENV)
    if not value:
        return
    it, _, want = value.partition(":")
    want = want or "shards"
    if want not in KILL_STAGES:
        raise ValueError(f"{KILL_IN_SAVE_ENV}={value!r}: the stage must be one of {KILL_STAGES}")
    if int(it) == iteration and want == stage:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------- save
def save_checkpoint(root: str, iteration: int, chunks, optimizer, scheduler, common: dict,
                    use_distributed_optimizer: bool, save_optim: bool = True, save_rng: bool = True,
                    parallel_group=None) -> str:
    """Save atomically; returns the final directory. Collective: call on every rank.
    save_optim / save_rng False (--no-save-optim / --no-save-rng): weights and progress only; the
    marker says so, and a resume then starts a fresh optimizer / keeps its own RNG.
    parallel_group (--ckpt-fully-parallel-save, the data-parallel group): megatron-core's fully
    parallel strategy spreads the writing of replicated tensors over that group's ranks instead of
    leaving it to the first replica; the files hold the same tensors either way."""
    from megatron.core import dist_checkpointing

    # how many optimizers megatron chained (dense + expert parameters when EP > 1): a resume
    # whose optimizer is split differently cannot load this Adam state (see optimizer_parts)
    if not save_optim:
        optimizer = scheduler = None
        common = dict(common, optimizer_state=False)
    if not save_rng:
        common = dict(common, rng_state=False)
    else:  # the kind of generator states the model-parallel RNG tracker holds (a resume on the other
        # kind cannot restore them); here, so that every writer (the trainer, the HF import) says it
        from .cpu import default_device

        common = dict(common, rng_device=default_device().type)
    common = dict(common, optimizer_parts=optimizer_parts(optimizer) if optimizer is not None else None)
    final = iteration_dir(root, iteration)
    tmp = final + ".tmp"

    def prepare() -> None:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(tmp):  # leftover of a save that crashed
            shutil.rmtree(tmp)
        os.makedirs(tmp)

    _on_rank0(prepare)
    _check_shared(root, tmp)

    state = _model_sharded_state_dict(chunks)
    if optimizer is not None:
        if use_distributed_optimizer:
            _materialize_fresh_adam_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(
            state, metadata=_optimizer_metadata(use_distributed_optimizer))
    if save_rng:
        state["rng_state"] = _rng_sharded_object(_rng_state())
    state["opt_param_scheduler"] = scheduler.state_dict() if scheduler is not None else None
    state["tst_common"] = dict(common, iteration=iteration, format_version=FORMAT_VERSION)
    dist_checkpointing.save(state, tmp, sharded_strategy=_fully_parallel(parallel_group, "save"))
    _barrier()
    _test_kill_in_save_hook(iteration, "shards")

    def publish() -> None:
        _verify_shards(tmp)  # every shard the index names is there, whole: never publish less
        # megatron fsyncs the shards and their index, not the files rank 0 writes beside them: on
        # disk before the marker, or a power loss could publish an empty common.pt
        for name in ("common.pt", "metadata.json"):
            _fsync_path(os.path.join(tmp, name))
        meta = dict(common, iteration=iteration, format_version=FORMAT_VERSION, complete=True)
        _write_atomic(os.path.join(tmp, MARKER), json.dumps(meta, indent=1, default=str))
        if os.path.exists(final):  # re-saving the same iteration (e.g. after a resume)
            old = final + ".old"
            if os.path.exists(old):
                shutil.rmtree(old)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
        _test_kill_in_save_hook(iteration, "renamed")
        _write_atomic(os.path.join(root, TRACKER), str(iteration))

    _on_rank0(publish)
    return final


_SHARED_ROOTS = set()  # --save directories every rank was seen to share (checked once per process)


def _check_shared(root: str, tmp: str) -> None:
    """Every rank sees the directory rank 0 just made (collective). A --save on a node-local disk
    of a multi-node job would otherwise "succeed": each node writes its shards into its own copy,
    rank 0 publishes an index naming shards it does not have, and the loss shows only at resume.
    Once per --save directory: where it lies does not change during a run."""
    if not dist.is_initialized() or dist.get_world_size() == 1 or root in _SHARED_ROOTS:
        return
    from .distributed import from_rank0

    probe = os.path.join(tmp, ".shared_by_all_ranks")
    token = from_rank0(lambda: uuid.uuid4().hex)

    def write() -> None:
        with open(probe, "w") as f:
            f.write(token)

    _on_rank0(write)  # a failure there (a full disk) raises on every rank
    try:
        with open(probe) as f:
            seen = f.read() == token
    except OSError:
        seen = False
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (seen, socket.gethostname()))
    blind = [f"rank {r} ({host})" for r, (ok, host) in enumerate(everyone) if not ok]
    if blind:
        raise CheckpointError(f"--save {root}: {', '.join(blind[:4])}{' ...' if len(blind) > 4 else ''} cannot see "
                              f"the directory rank 0 created there ({tmp}); a checkpoint needs a filesystem "
                              "shared by every node. Point --save (and --load) at a shared path")
    _on_rank0(lambda: os.remove(probe))
    _SHARED_ROOTS.add(root)


# ---------------------------------------------------------------------------------- load
def read_meta(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, MARKER)
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ckpt_dir} is incomplete: {MARKER} is missing "
                              "(the save was interrupted)") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {ckpt_dir} is damaged: {MARKER} unreadable ({exc})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {ckpt_dir} is damaged: {MARKER} is not a JSON object")
    if not meta.get("complete"):
        raise CheckpointError(f"checkpoint {ckpt_dir} is not marked complete")
    return meta


def verify_checkpoint_dir(ckpt_dir: str) -> dict:
    """Cheap structural check of one iteration directory; returns its meta or raises."""
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"checkpoint directory {ckpt_dir} does not exist")
    meta = read_meta(ckpt_dir)
    try:
        with open(os.path.join(ckpt_dir, "metadata.json")) as f:
            json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ckpt_dir} is damaged: torch_dist metadata.json is missing") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {ckpt_dir} is damaged: metadata.json unreadable ({exc})") from None
    common = os.path.join(ckpt_dir, "common.pt")
    if not os.path.isfile(common):
        raise CheckpointError(f"checkpoint {ckpt_dir} is damaged: common.pt is missing")
    _verify_zip(ckpt_dir, common)
    _verify_shards(ckpt_dir)
    return meta


def _verify_zip(ckpt_dir: str, path: str) -> None:
    """common.pt (torch.save's zip archive, small) whole: every member's CRC checked, nothing unpickled."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise CheckpointError(f"checkpoint {ckpt_dir} is damaged: {os.path.basename(path)} unreadable ({exc})") \
            from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {ckpt_dir} is damaged: {os.path.basename(path)} member {bad} is corrupt")


def _verify_shards(ckpt_dir: str) -> None:
    """Every shard file the torch_dist index (`.metadata`) refers to exists and is long enough.

    Reads only the index (no tensors), so a deleted or truncated `.distcp` file, or a damaged
    index, is found before anything is built -- and `--ckpt-fallback` can skip that checkpoint.
    """
    from torch.distributed.checkpoint import FileSystemReader

    try:
        index = FileSystemReader(ckpt_dir).read_metadata()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ckpt_dir} is damaged: torch_dist index .metadata is missing") from None
    except Exception as exc:  # truncated / corrupt pickle
        raise CheckpointError(f"checkpoint {ckpt_dir} is damaged: torch_dist index .metadata unreadable "
                              f"({type(exc).__name__}: {exc})") from None
    needed: Dict[str, int] = {}
    for info in (index.storage_data or {}).values():
        end = int(info.offset) + int(info.length)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, end in sorted(needed.items()):
        path = os.path.join(ckpt_dir, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint {ckpt_dir} is damaged: shard {name} is missing")
        size = os.path.getsize(path)
        if size < end:
            raise CheckpointError(f"checkpoint {ckpt_dir} is damaged: shard {name} is truncated "
                                  f"({size} bytes, the index needs {end})")


def list_checkpoints(root: str) -> List[Tuple[int, str]]:
    """(iteration, dir) of every final iteration directory under root, newest first."""
    out = []
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith("iter_") and name[5:].isdigit():
                out.append((int(name[5:]), os.path.join(root, name)))
    return sorted(out, reverse=True)


def find_checkpoint(root: str, fallback: bool) -> Optional[Tuple[int, str, dict]]:
    """The checkpoint `--load root` should resume from, or None if root holds none at all.

    The tracker file names the latest one; if it is missing, damaged or incomplete, raise a clear
    error, or (fallback) take the newest complete iteration directory. One exception: no tracker
    and a single iteration directory, complete -- a run's first save, stopped between publishing
    its directory and writing the tracker (`first_save_without_tracker`): that directory is what
    the tracker would name, and a requeued job resumes from it without asking for a fallback.
    """
    tracker = os.path.join(root, TRACKER)
    candidates = list_checkpoints(root)
    if not os.path.isfile(tracker) and not candidates:
        return None
    problems = []
    if os.path.isfile(tracker):
        with open(tracker, "rb") as f:
            raw = f.read()
        # ASCII digits only: a digit of another script passes isdigit() but not int()
        text = raw.decode("ascii", errors="replace").strip()
        if not (raw.isascii() and text.isdigit()):
            shown = repr(text) if raw.isascii() else f"bytes {raw[:40]!r}"
            problems.append(f"{tracker} does not hold an iteration number ({shown})")
        else:
            path = iteration_dir(root, int(text))
            try:
                return int(text), path, verify_checkpoint_dir(path)
            except CheckpointError as exc:
                problems.append(str(exc))
            if not os.path.exists(path):
                found = _interrupted_resave(path)
                if found is not None:
                    return (int(text),) + found
    else:
        if len(candidates) == 1:
            iteration, path = candidates[0]
            try:
                return iteration, path, verify_checkpoint_dir(path)
            except CheckpointError as exc:
                problems.append(str(exc))
        problems.append(f"{tracker} is missing")
    if not fallback:
        raise CheckpointError("; ".join(problems) + ". Pass --ckpt-fallback to resume from the newest "
                              "complete checkpoint instead, or point --load elsewhere")
    for iteration, path in candidates:
        try:
            return iteration, path, verify_checkpoint_dir(path)
        except CheckpointError as exc:
            problems.append(str(exc))
    raise CheckpointError("no complete checkpoint under " + root + ": " + "; ".join(problems))


def first_save_without_tracker(root: str, path: str) -> bool:
    """Whether `find_checkpoint` took `path` as the one checkpoint of a root without a tracker."""
    only = list_checkpoints(root)
    return (not os.path.isfile(os.path.join(root, TRACKER)) and len(only) == 1
            and os.path.abspath(only[0][1]) == os.path.abspath(path))


def _interrupted_resave(final: str) -> Optional[Tuple[str, dict]]:
    """The complete copy a crash between `save_checkpoint`'s two renames left of `final`, if any.

    The new save (`.tmp`, marked complete before the renames) is preferred to the one it was
    replacing (`.old`); both hold the same iteration."""
    for path in (final + ".tmp", final + ".old"):
        if os.path.isdir(path):
            try:
                return path, verify_checkpoint_dir(path)
            except CheckpointError:
                continue
    return None


def _fully_parallel(group, action: str, ckpt_dir: Optional[str] = None):
    """megatron-core's fully parallel save / load strategy over `group` (None: the default one)."""
    if group is None:
        return None
    from megatron.core.dist_checkpointing.serialization import (get_default_load_sharded_strategy,
                                                                get_default_save_sharded_strategy)
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (FullyParallelLoadStrategyWrapper,
                                                                            FullyParallelSaveStrategyWrapper)

    if action == "save":
        return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy("torch_dist"), group)
    return FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(ckpt_dir), group)


def load_checkpoint(ckpt_dir: str, chunks, optimizer, scheduler, load_optim: bool, load_rng: bool,
                    use_distributed_optimizer: bool, parallel_group=None) -> dict:
    """Load model (+ optimizer, scheduler, RNG) in place; returns the saved common state.
    parallel_group (--ckpt-fully-parallel-load): each replicated tensor is read by one rank of the
    group and exchanged, instead of every rank reading it."""
    from megatron.core import dist_checkpointing

    state = _model_sharded_state_dict(chunks)
    if optimizer is not None and load_optim:
        if use_distributed_optimizer:
            # megatron 0.16.1: a fresh distributed optimizer has no Adam state yet; create it
            # (zeros) so its sharded state dict has the tensors the checkpoint fills in.
            _init_distributed_optimizer_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(
            state, is_loading=True, metadata=_optimizer_metadata(use_distributed_optimizer))
    if load_rng:
        state["rng_state"] = _rng_sharded_object(_rng_state())
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    try:
        loaded = dist_checkpointing.load(state, ckpt_dir,
                                         sharded_strategy=_fully_parallel(parallel_group, "load", ckpt_dir))
    except (Exception, CheckpointException) as exc:  # surface the directory, not a deep torch traceback
        raise CheckpointError(f"checkpoint {ckpt_dir} could not be loaded: {type(exc).__name__}: "
                              f"{_short(exc)}") from exc
    modules = [getattr(c, "module", c) for c in chunks]
    if len(modules) == 1:
        modules[0].load_state_dict(loaded["model"])
    else:
        for i, m in enumerate(modules):
            m.load_state_dict(loaded[f"model{i}"])
    if optimizer is not None and load_optim:
        with torch.no_grad(), _distributed_optimizer_loads_without_step(optimizer):
            optimizer.load_state_dict(loaded["optimizer"])
        if use_distributed_optimizer:
            _unshare_adam_steps(optimizer)
    if scheduler is not None and load_optim and loaded.get("opt_param_scheduler"):
        try:
            scheduler.load_state_dict(loaded["opt_param_scheduler"])
        except AssertionError as exc:  # megatron's scheduler asserts on a schedule that differs
            raise CheckpointError(f"checkpoint {ckpt_dir}: its LR schedule differs from this run's ({exc}); resume "
                                  "with the checkpoint's schedule flags, or --override-checkpoint-args") from exc
    if load_rng and "rng_state" in loaded:
        _set_rng_state(loaded["rng_state"])
    return loaded["tst_common"]


def _short(exc: BaseException) -> str:
    """The last line of a (possibly multi-rank, traceback-laden) checkpoint exception."""
    lines = [x.strip() for x in str(exc).strip().splitlines() if x.strip()]
    return lines[-1] if lines else repr(exc)


def _inner_optimizers(optimizer):
    return getattr(optimizer, "chained_optimizers", [optimizer])


def optimizer_parts(optimizer) -> int:
    """Number of optimizers megatron-core chained for this model and layout: 2 for an MoE with
    --expert-model-parallel-size > 1 (dense and expert parameters reduce over different groups),
    1 otherwise. megatron-core 0.16.1 keys Adam state by part (`chained_<i>.optimizer...`), so state
    saved with one split does not load into the other."""
    return len(_inner_optimizers(optimizer))


def _materialize_fresh_adam_state(optimizer) -> None:
    """Give an Adam that has not stepped yet the state its first step would create.

    megatron 0.16.1's distributed optimizer reads the one `step` shared by all Adam states when it
    saves (torch Adam, no Apex/TE); before the first update -- an fp16 run whose every step so far
    overflowed -- there is none and it asserts. Zero moments (megatron's own `init_state_fn`, for
    any Adam) and, for torch Adam, `step` 0 are exactly what the first step initialises, so this
    changes nothing but makes the save possible."""
    for opt in _inner_optimizers(optimizer):
        inner, init = getattr(opt, "optimizer", None), getattr(opt, "init_state_fn", None)
        if inner is None or init is None or any(len(st) for st in inner.state.values()):
            continue
        init(inner, opt.config)
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):  # torch Adam keeps `step` per parameter
            for st in inner.state.values():
                st.setdefault("step", torch.tensor(0.0))


def _init_distributed_optimizer_state(optimizer) -> None:
    for opt in _inner_optimizers(optimizer):
        init = getattr(opt, "_init_optimizer_states_with_dummy_values", None)
        if init is not None:
            init()


@contextlib.contextmanager
def _distributed_optimizer_loads_without_step(optimizer):
    """megatron 0.16.1 + torch Adam: loading a `fully_reshardable` distributed-optimizer state
    copies every key of the live Adam state from the checkpoint tensors, `step` included, but the
    checkpoint holds no per-param `step` (it is restored from the param groups by
    `load_state_dict`) -> KeyError 'step'. For the duration of the load, each distributed
    optimizer copies only the checkpoint's tensors (param, exp_avg, exp_avg_sq) and leaves `step`
    as `load_state_dict` set it. Instance-level, undone on exit; other optimizers untouched."""
    patched = []
    for opt in _inner_optimizers(optimizer):
        if not hasattr(opt, "_set_main_param_and_optimizer_states") or not hasattr(opt, "model_param_group_index_map"):
            continue
        if getattr(opt.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False):
            continue  # that path writes through set_scaled_state key by key: no `step` issue

        def set_states(model_param, tensors, opt=opt):
            group_index, group_order = opt.model_param_group_index_map[model_param]
            main_param = opt.optimizer.param_groups[group_index]["params"][group_order]
            dst = {"param": main_param, **opt.optimizer.state[main_param]}
            missing = sorted(k for k in dst if k != "step" and k not in tensors)
            if missing:
                raise KeyError(f"distributed optimizer checkpoint lacks {missing} for a parameter")
            for key, value in tensors.items():
                if key in dst:
                    dst[key].copy_(value)

        opt._set_main_param_and_optimizer_states = set_states
        patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states


def _unshare_adam_steps(optimizer) -> None:
    """megatron 0.16.1's distributed optimizer restores one shared `step` tensor for all params;
    torch Adam increments it in place once per param, so give every param its own copy."""
    for opt in _inner_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for st in inner.state.values():
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].clone()


def read_common_only(ckpt_dir: str) -> Dict:
    """The run summary (args, iteration, phase) of a checkpoint without loading tensors."""
    return read_meta(ckpt_dir)
