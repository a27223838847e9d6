"""Compile the MCE loss's Triton kernels ahead of time for real NVIDIA targets, without a GPU.

Run as a separate process with TRITON_INTERPRET=0 (the test suite's interpreter mode replaces
@triton.jit functions by interpreted ones, which cannot be compiled). Catches what the interpreter
cannot: code that the compiler rejects (types, control flow) for the GPUs users run on. Prints one
line per compiled variant; exits non-zero on the first failure.

    TRITON_INTERPRET=0 python tests/workers/compile_triton.py 80 90
"""
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tst_megatron import loss_triton as lt

ARG_TYPES = {"stride_row": "i64", "stride_z": "i64", "stride_out": "i64", "V": "i32", "start": "i32",
             "vocab_total": "i32", "ignore_index": "i32", "labels_ptr": "*i64", "w_ptr": "*fp32",
             "lse_ptr": "*fp32", "grad_loss_ptr": "*fp32", "ok_ptr": "*i32", "out0_ptr": "*fp32",
             "out1_ptr": "*fp32", "out2_ptr": "*fp32", "out3_ptr": "*fp32"}


def compile_one(fn, capability, dtype, constexprs):
    logits_ptr = {"z_ptr": f"*{dtype}", "out_ptr": f"*{dtype}"}
    signature = {name: "constexpr" if name in constexprs else logits_ptr.get(name) or ARG_TYPES[name]
                 for name in fn.arg_names}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                            target=GPUTarget("cuda", capability, 32), options={"num_warps": 8})
    assert kernel.asm.get("cubin"), f"{fn.__name__}: no cubin for sm_{capability}"
    print(f"ok sm_{capability} {fn.__name__} {dtype} {constexprs}", flush=True)


def main(capabilities):
    assert isinstance(lt._mce_forward_kernel, triton.runtime.jit.JITFunction), "run with TRITON_INTERPRET=0"
    for cap in capabilities:
        for dtype in ("bf16", "fp32"):
            for s in (1, 16):
                compile_one(lt._mce_backward_kernel, cap, dtype, {"S": s, "BLOCK": lt.GRAD_BLOCK})
                for finish in (True, False):
                    compile_one(lt._mce_forward_kernel, cap, dtype,
                                {"V": 151936, "S": s, "BLOCK": lt.STATS_BLOCK, "FINISH": finish})


if __name__ == "__main__":
    main([int(c) for c in sys.argv[1:]] or [80, 90])
