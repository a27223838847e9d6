"""Import megatron-core about 1.2 s faster in every process.

megatron-core wraps about 40 fused functions in `torch.compile` while its modules are imported
(`megatron.core.jit.jit_fuser`, and the decorators that use it). Making those wrappers loads
TorchDynamo and Inductor -- about 1.2 s of every process start, on every rank -- although a
wrapped function compiles only when it is first called, and most runs never call most of them.

While megatron-core is imported here, `torch.compile` defers making the wrapper to that first
call: the same `torch.compile`, with the same arguments, at the moment the compilation happens
anyway, so a GPU run compiles exactly what it compiled before. `torch.compile` itself is put back
right after the import; only the `jit_fuser` megatron-core keeps stays deferring.

On CPU, `tst_megatron.cpu.enable_cpu_support` asks for the deferred functions to run eagerly
instead (`run_fused_functions_eagerly`): Inductor's C++ compile costs ~3 s per process there for
element-wise kernels that take microseconds at CPU sizes. A machine with CUDA never takes that path.

Imported first by `tst_megatron/__init__.py`. A process that imported megatron-core before
tst_megatron keeps megatron's eager wrappers (nothing changes but the start-up time).
"""
from __future__ import annotations

import contextlib
import functools
import sys
import warnings
from typing import Callable, Iterator

import torch


_STATE = {"eager": False}


def run_fused_functions_eagerly() -> None:
    """From now on, a deferred function not yet called runs as the plain Python function (CPU only)."""
    _STATE["eager"] = True


def deferred_compile(real: Callable) -> Callable:
    """A `torch.compile` that wraps a function on its first call instead of at once."""

    def compile_later(model=None, **kwargs):
        if model is None:  # used as @torch.compile(**options)
            return lambda fn: compile_later(fn, **kwargs)
        if isinstance(model, torch.nn.Module) or not callable(model):
            return real(model, **kwargs)  # modules: torch's own wrapper (an OptimizedModule)
        compiled = None

        @functools.wraps(model)
        def call(*args, **kw):
            nonlocal compiled
            if torch.compiler.is_compiling():
                # reached while another compiled function is traced (weighted_swiglu -> swiglu): inlined
                # into that graph, as an eager wrapper's would be; its own compile waits for a direct call
                return model(*args, **kw)
            if compiled is None:
                compiled = model if _STATE["eager"] else real(model, **kwargs)
            return compiled(*args, **kw)

        return call

    return compile_later


@contextlib.contextmanager
def _compile_deferred() -> Iterator[None]:
    real = torch.compile
    torch.compile = deferred_compile(real)
    try:
        yield
    finally:
        torch.compile = real


def import_megatron_core() -> None:
    """Import megatron-core (its modules that wrap functions at import) with compiles deferred."""
    if "megatron.core" in sys.modules:
        return
    with _compile_deferred():
        # megatron.core.jit binds jit_fuser = torch.compile here, and megatron's __init__ imports the
        # modules that decorate with it; modules imported later take the same (deferring) jit_fuser
        import megatron.core.jit  # noqa: F401


def quiet_missing_kernel_warnings() -> None:
    """Without CUDA, megatron-core's warnings that Transformer Engine and Apex are missing (at import,
    four per process and rank, and at each layer spec) describe the only path there is: silence exactly those. On a CUDA
    machine they stay -- there they point at kernels the user may want to install."""
    if not torch.cuda.is_available():
        for text in ("Transformer Engine and Apex are not installed", "Apex is not installed. Falling back to Torch"):
            warnings.filterwarnings("ignore", message=".*" + text, category=UserWarning)


quiet_missing_kernel_warnings()
import_megatron_core()
