"""What we change in megatron-core's behaviour on machines other than our CPU test bed: on a
machine *with* CUDA, tst_megatron.cpu defines only the missing Transformer Engine name that breaks
every MoE forward without TE (found on an H200, session 13); and the local layer spec's final norm
when apex is installed without TE."""
import importlib.util
import subprocess
import sys

import pytest

REPO = __file__.rsplit("/tests/", 1)[0]

# Runs in a fresh process that reports CUDA as available, as a GPU machine without TE would: the
# CPU fixes must stay off, the TE name must be defined, and megatron's own router gating GEMM
# (forward and backward) must then agree with a plain linear layer.
_CHILD = r"""
import torch
torch.cuda.is_available = lambda: True          # a GPU machine, as far as the fixes can tell
import torch.nn.functional as F
from megatron.core.transformer.moe import moe_utils
assert not moe_utils.HAVE_TE and not hasattr(moe_utils, "te_general_gemm")
from tst_megatron.cpu import enable_cpu_support, _STATE
assert enable_cpu_support() is False and not _STATE["enabled"]   # no CPU fix on a CUDA machine
assert moe_utils.te_general_gemm is None
torch.manual_seed(0)
x = torch.randn(2, 5, 16, requires_grad=True)
w = torch.randn(4, 16, requires_grad=True)
out = moe_utils.router_gating_linear(x, w, None, torch.float32)
ref = F.linear(x, w)
assert torch.allclose(out, ref, atol=1e-6), (out - ref).abs().max()
g = torch.randn_like(out)
gx, gw = torch.autograd.grad(out, (x, w), g)
rx, rw = torch.autograd.grad(ref, (x, w), g)
assert torch.allclose(gx, rx, atol=1e-5) and torch.allclose(gw, rw, atol=1e-5)
print("ok")
"""


def test_moe_router_gemm_without_transformer_engine_on_a_cuda_machine():
    pytest.importorskip("megatron.core")
    if importlib.util.find_spec("transformer_engine") is not None:
        pytest.skip("Transformer Engine is installed: megatron defines te_general_gemm itself")
    proc = subprocess.run([sys.executable, "-c", _CHILD], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("normalization", ["RMSNorm", "LayerNorm"])
def test_final_norm_with_apex_but_no_transformer_engine(normalization, monkeypatch):
    """On a GPU with apex and no TE, megatron-core's local block spec gives the final norm apex's
    FusedLayerNorm, which asserts LayerNorm: our spec builds an RMSNorm model's final norm with
    torch instead, and leaves a LayerNorm model's on apex's kernel. (apex's presence is what is
    simulated here: megatron's module-level choice, as its import would have made it.)"""
    from megatron.core.fusions.fused_layer_norm import FusedLayerNorm
    from megatron.core.models.gpt import gpt_layer_specs

    from tst_megatron.specs import TorchNorm

    from dist_utils import init_single_process
    from tst_megatron.arguments import parse_args, validate
    from tst_megatron.builders import transformer_config
    from tst_megatron.specs import gpt_block_spec

    init_single_process()
    monkeypatch.setattr(gpt_layer_specs, "LNImpl", FusedLayerNorm)
    cfg = parse_args(["--data-path", "x", "--vocab-size", "256", "--num-layers", "2", "--hidden-size", "64",
                      "--num-attention-heads", "4", "--normalization", normalization])
    validate(cfg, 1)
    tc = transformer_config(cfg.model, cfg.parallel, cfg.optim, use_cpu_init=True)
    block = gpt_block_spec(tc, use_transformer_engine=False)
    assert block.layer_norm is (TorchNorm if normalization == "RMSNorm" else FusedLayerNorm)


def test_apex_layer_norms_take_the_half_precision_dtype(monkeypatch):
    """apex's FusedLayerNorm (megatron's local spec on a machine with apex, LayerNorm models) makes
    fp32 weights whatever params_dtype, and apex's kernel reads them in the input's dtype: under
    --bf16 the built model's apex norms are bf16, as Megatron-LM's Float16Module makes them.
    (apex's presence is simulated: megatron's choice of the class and its import-time check.)"""
    import torch
    from megatron.core.fusions import fused_layer_norm
    from megatron.core.models.gpt import gpt_layer_specs

    from dist_utils import init_single_process
    from tst_megatron.arguments import parse_args, validate
    from tst_megatron.builders import build_model_chunks, transformer_config

    init_single_process()
    monkeypatch.setattr(gpt_layer_specs, "LNImpl", fused_layer_norm.FusedLayerNorm)
    monkeypatch.setattr(fused_layer_norm, "HAVE_FUSED_LAYER_NORM", True)
    cfg = parse_args(["--data-path", "x", "--vocab-size", "256", "--num-layers", "2", "--hidden-size", "64",
                      "--num-attention-heads", "4", "--normalization", "LayerNorm", "--bf16"])
    validate(cfg, 1)
    tc = transformer_config(cfg.model, cfg.parallel, cfg.optim, use_cpu_init=True)
    model = build_model_chunks(cfg, tc, 256)[0]
    apex = [m for m in model.modules() if isinstance(m, fused_layer_norm.FusedLayerNorm)]
    assert len(apex) >= 1  # at least the final norm
    assert {p.dtype for m in apex for p in m.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


# ----------------------------------------------------------------------------- deferred torch.compile
def test_deferred_compile_wraps_on_the_first_call_with_the_same_arguments(monkeypatch):
    """tst_megatron/_megatron.py: megatron-core's import-time torch.compile wrappers are made at
    their first call, by the real torch.compile with the decorator's own arguments."""
    import torch

    from tst_megatron import _megatron
    from tst_megatron._megatron import deferred_compile

    monkeypatch.setitem(_megatron._STATE, "eager", False)  # as on a GPU machine
    made = []

    def real(model=None, **kwargs):
        made.append((model, kwargs))
        return lambda *a, **k: ("compiled", model(*a, **k))

    compile_later = deferred_compile(real)

    def square(x):
        """docstring kept"""
        return x * x

    plain = compile_later(square)
    options = compile_later(mode="max-autotune")(square)
    assert made == [] and plain.__name__ == "square" and plain.__doc__ == "docstring kept"
    assert plain(3) == ("compiled", 9) and plain(4) == ("compiled", 16)
    assert options(2) == ("compiled", 4)
    assert made == [(square, {}), (square, {"mode": "max-autotune"})]  # once each, at the first call
    module = torch.nn.Linear(2, 2)
    compile_later(module)  # a module goes to torch's own wrapper at once
    assert made[-1] == (module, {})
    # called while torch.compile traces another function: inlined there, compiled at its first direct call
    nested = compile_later(square)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert nested(6) == 36 and len(made) == 3
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    assert nested(6) == ("compiled", 36) and made[-1] == (square, {})
    # on CPU (enable_cpu_support): a function not called yet runs as itself, never compiled
    later = compile_later(square)
    _megatron.run_fused_functions_eagerly()
    assert later(5) == 25 and len(made) == 4


def test_importing_tst_megatron_defers_megatrons_compiles_and_restores_torch_compile():
    """In a fresh process: `import tst_megatron` imports megatron-core without loading Inductor
    (what made every process start ~1.2 s slower), megatron's jit_fuser defers, and torch.compile
    is torch's own again."""
    code = (
        "import sys, torch\n"
        "real = torch.compile\n"
        "import tst_megatron\n"
        "import megatron.core.jit as jit\n"
        "from megatron.core.fusions import fused_bias_swiglu\n"
        "assert torch.compile is real, torch.compile\n"
        "assert 'torch._inductor' not in sys.modules\n"
        "assert jit.jit_fuser.__qualname__ == 'deferred_compile.<locals>.compile_later', jit.jit_fuser\n"
        "assert fused_bias_swiglu.swiglu.__wrapped__.__name__ == 'swiglu'\n"
        "from tst_megatron.cpu import enable_cpu_support\n"
        "if enable_cpu_support():  # CPU: megatron's fused functions run eagerly, no C++ build\n"
        "    x = torch.randn(3, 8)\n"
        "    a, b = x.chunk(2, -1)\n"
        "    assert torch.equal(fused_bias_swiglu.swiglu(x), torch.nn.functional.silu(a) * b)\n"
        "    assert 'torch._inductor' not in sys.modules\n"
        "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env=dict(__import__("os").environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


@pytest.mark.parametrize("field, value", [("softmax_type", "off-by-one"), ("window_size", (2, 0))])
def test_sdpa_attention_refuses_what_it_does_not_implement(field, value):
    """megatron's DotProductAttention honours an off-by-one softmax and a sliding window; SDPA (the
    CPU core attention) implements neither, so a config asking for one is refused, not ignored."""
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from tst_megatron.specs import SDPAttention

    cfg = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2)
    SDPAttention(cfg, 1, AttnMaskType.causal, "self")
    setattr(cfg, field, value)
    with pytest.raises(ValueError, match=f"SDPAttention: .*{'softmax_type' if field == 'softmax_type' else 'window'}"):
        SDPAttention(cfg, 1, AttnMaskType.causal, "self")
