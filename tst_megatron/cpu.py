"""CPU support for megatron-core 0.16.1: the one place where we teach it to run without CUDA.

megatron-core assumes a CUDA device in four habits (see ../shared/megatron-core-on-cpu.md):

A. `torch.cuda.current_device()` used as the allocation device (~100 call sites);
B. hard-coded `device="cuda"`, `.cuda()` and CUDA type strings (`p.type() == "torch.cuda.FloatTensor"`)
   in the pipeline schedules, the optimizers and grad clipping;
C. unconditional `torch.cuda.synchronize()` (p2p communication, the torch_dist async writer);
D. the model-parallel RNG tracker stores CUDA RNG states, and activation recomputation saves and
   restores the CUDA generator's state around each recomputed forward.

Plus an MoE specific: the all-to-all token dispatcher copies split sizes to the host on a CUDA
side stream. And one for speed (F): megatron's torch.compile'd element-wise functions run eagerly
(`_megatron.run_fused_functions_eagerly`), since Inductor's C++ build of them costs ~3 s per process.

`enable_cpu_support()` installs the smallest fix for each, **only when CUDA is unavailable**. On a
CUDA machine it makes one fix only (below) and megatron-core otherwise runs exactly as shipped.
Everything is idempotent and explicit; nothing else in the package patches megatron-core.

The one fix on every machine: megatron-core 0.16.1's MoE router gating GEMM tests
`te_general_gemm is not None`, a name its module binds only when Transformer Engine imports, so any
MoE forward without TE -- on CPU *and* on a GPU without TE, which we support -- dies with a
NameError (found on an H200 in session 13). `define_missing_te_names()` binds it to None, which is
the value the code tests for, so the router takes its torch path; with TE installed it does nothing.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch.overrides import TorchFunctionMode

_STATE = {"enabled": False, "mode": None}

# CPU tensor type strings -> the CUDA ones megatron's optimizers compare against (habit B).
_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class CudaToCpuMode(TorchFunctionMode):
    """Redirect CUDA placements to the CPU (habit B).

    A TorchFunctionMode is the same mechanism as `with torch.device(...)`: it sees every factory
    call, so `torch.zeros(..., device="cuda")`, `t.cuda()` and `t.to("cuda")` inside megatron-core
    land on the CPU, and a no-argument `t.type()` reports the CUDA type name megatron compares
    against. Only active on machines without CUDA.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], torch.device("cpu")) + tuple(args[2:])
        device = kwargs.get("device")
        if device is not None and not isinstance(device, torch.device) and not isinstance(device, str):
            device = None
        if device is not None and _is_cuda_device(device):
            kwargs["device"] = torch.device("cpu")
        return func(*args, **kwargs)


class CpuRNGStatesTracker:
    """Model-parallel RNG tracker over CPU generator states (habit D).

    Same contract as megatron's `CudaRNGStatesTracker` (add / fork / get_states / set_states /
    reset), so TP-decorrelated dropout and initialisation under `fork()` work on CPU.
    """

    def __init__(self):
        self.reset()

    def is_initialized(self):
        return self._is_initialized

    def reset(self):
        self._is_initialized = False
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self):
        return {k: v.clone() for k, v in self.states_.items()}

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = {k: v.clone() for k, v in states.items()}

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name: Optional[str] = None):
        from megatron.core.tensor_parallel import random as tp_random

        name = name or tp_random._MODEL_PARALLEL_RNG_TRACKER_NAME
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


def _cpu_dtoh_and_synchronize(self, point, tokens_per_expert=None):
    """All-to-all dispatcher's host copy of split sizes, without CUDA streams (MoE on CPU).

    On CPU the tensors already live on the host; megatron expects the split sizes as numpy arrays
    after this point, exactly as its CUDA path produces them.
    """
    if self.drop_and_pad or point != self.cuda_dtoh_point:
        return tokens_per_expert
    for name in ("input_splits", "output_splits", "output_splits_tp"):
        value = getattr(self, name, None)
        if torch.is_tensor(value):
            setattr(self, name, value.numpy())
    return tokens_per_expert


def model_parallel_manual_seed(seed: int) -> None:
    """Seed torch and megatron's model-parallel RNG tracker on any device.

    On CUDA this is megatron's own `model_parallel_cuda_manual_seed`; on CPU the tracker holds CPU
    generator states (`CpuRNGStatesTracker`).
    """
    from megatron.core.tensor_parallel import random as tp_random

    torch.manual_seed(seed)
    if torch.cuda.is_available():
        tp_random.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
        return
    # Install the CPU tracker; megatron then seeds it (reset + add) exactly as it would on CUDA.
    tp_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    tp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    tp_random.model_parallel_cuda_manual_seed(seed)


def _experts_from_the_expert_rng() -> None:
    """megatron-core's CPU initialisation (`use_cpu_initialization`, which CPU runs use) draws every
    expert's weights from the default generator, which is seeded alike on every expert-parallel
    rank: at EP = 2 the second rank's experts would start as copies of the first rank's. Its GPU
    initialisation draws them under the expert-parallel RNG state (seeded per EP rank). Here the
    local experts are built under that state too; every other parameter still draws from the
    default generator, so replicated (dense) parameters stay identical across ranks."""
    from megatron.core.tensor_parallel import random as tp_random
    from megatron.core.transformer.moe.experts import SequentialMLP

    if getattr(SequentialMLP.__init__, "_tst_expert_rng", False):
        return
    original = SequentialMLP.__init__

    def __init__(self, *args, **kwargs):
        tracker, name = tp_random.get_cuda_rng_tracker(), tp_random.get_expert_parallel_rng_tracker_name()
        if not (tracker.is_initialized() and name in tracker.get_states()):
            return original(self, *args, **kwargs)
        with tracker.fork(name):
            return original(self, *args, **kwargs)

    __init__._tst_expert_rng = True
    SequentialMLP.__init__ = __init__


def define_missing_te_names() -> None:
    """Bind megatron-core's `moe_utils.te_general_gemm` to None when Transformer Engine did not
    import (the router then uses torch.mm, as its code intends); no-op with TE."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def enable_cpu_support() -> bool:
    """Make megatron-core run on CPU/Gloo. Returns True when CPU support is active.

    When CUDA is available only the missing-TE name is defined (needed on GPUs without TE too) and
    it returns False. Call once per process, before building models.
    """
    define_missing_te_names()
    if torch.cuda.is_available():
        return False
    if _STATE["enabled"]:
        return True

    # F: megatron's torch.compile'd element-wise functions (expert bias, squared ReLU, ...) run
    # eagerly: Inductor's C++ build of them costs ~3 s per process (see _megatron.py).
    from ._megatron import run_fused_functions_eagerly

    run_fused_functions_eagerly()

    # A: allocation device.
    torch.cuda.current_device = lambda: torch.device("cpu")
    # C: nothing to wait for on the host.
    torch.cuda.synchronize = lambda device=None: None

    # D: no CUDA generator to save or restore around a recomputed forward (the CPU generator and
    # the CPU tracker's states are saved by megatron's checkpoint function itself).
    from megatron.core.tensor_parallel import random as tp_random

    tp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)
    tp_random._set_cuda_rng_state = lambda *args, **kwargs: None

    # MoE: all-to-all host copies without streams.
    from megatron.core.transformer.moe import token_dispatcher

    class _NoStream:
        def wait_stream(self, other):
            pass

        def record_event(self):
            return None

    token_dispatcher.MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = _NoStream()
    token_dispatcher.MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize = _cpu_dtoh_and_synchronize

    # E: experts drawn from the expert-parallel RNG, as on a GPU.
    _experts_from_the_expert_rng()

    # B: CUDA placements inside megatron-core -> CPU, for the whole process.
    mode = CudaToCpuMode()
    mode.__enter__()
    _STATE.update(enabled=True, mode=mode)
    return True


def default_device() -> torch.device:
    """The device the trainer computes on: the local CUDA device, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def distributed_backend() -> str:
    """NCCL on CUDA machines, Gloo on CPU: chosen automatically."""
    return "nccl" if torch.cuda.is_available() else "gloo"


__all__ = [
    "define_missing_te_names",
    "enable_cpu_support",
    "model_parallel_manual_seed",
    "default_device",
    "distributed_backend",
    "CudaToCpuMode",
    "CpuRNGStatesTracker",
]

