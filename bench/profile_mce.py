#!/usr/bin/env python
"""Where the fused MCE loss's time goes on CUDA: per-kernel GPU time from torch.profiler for one
forward+backward, next to one F.cross_entropy, for a few (V, s, dtype) cases.

    python bench/profile_mce.py                      # V 32000 151936, s 1 16, bf16 + fp32, N 8192
    python bench/profile_mce.py --V 32000 --s 16 --dtype bf16
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from tst_megatron.loss import multi_hot_cross_entropy

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def one(N, V, s, dtype, reps, rows):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(N, V, generator=g, device="cuda").mul_(2).to(dtype).requires_grad_(True)
    labels = torch.randint(0, V, (N, s), generator=g, device="cuda")
    w = torch.full((s,), 1.0 / s, device="cuda")
    cases = {"fused": lambda: multi_hot_cross_entropy(x, labels, w),
             "ce": lambda: F.cross_entropy(x, labels[:, 0], reduction="none")}
    for name, fn in cases.items():
        for _ in range(3):  # warm-up (Triton compiles here)
            x.grad = None
            fn().float().mean().backward()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                x.grad = None
                fn().float().mean().backward()
            torch.cuda.synchronize()
        events = prof.key_averages()
        gpu = sum(e.self_device_time_total for e in events) / reps / 1000.0
        print(f"\n=== {name} {str(dtype).replace('torch.', '')} N={N} V={V} s={s}: "
              f"GPU kernel time {gpu:.3f} ms per fwd+bwd", flush=True)
        print(events.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=60))


def sweep_blocks(N, V, s, dtype, reps=20):
    """fwd+bwd ms of the fused loss for several Triton block sizes (stats, grad)."""
    from tst_megatron import loss_triton

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(N, V, generator=g, device="cuda").mul_(2).to(dtype).requires_grad_(True)
    labels = torch.randint(0, V, (N, s), generator=g, device="cuda")
    w = torch.full((s,), 1.0 / s, device="cuda")
    default = (loss_triton.STATS_BLOCK, loss_triton.GRAD_BLOCK)
    for sb, gb in [default, (1024, 1024), (2048, 1024), (8192, 4096), (2048, 4096), (4096, 8192)]:
        loss_triton.STATS_BLOCK, loss_triton.GRAD_BLOCK = sb, gb
        times = []
        for i in range(reps + 3):
            x.grad = None
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            multi_hot_cross_entropy(x, labels, w).float().mean().backward()
            b.record()
            torch.cuda.synchronize()
            if i >= 3:
                times.append(a.elapsed_time(b))
        times.sort()
        print(f"  blocks stats={sb} grad={gb}: {times[len(times) // 2]:.3f} ms "
              f"({str(dtype).replace('torch.', '')} N={N} V={V} s={s})", flush=True)
    loss_triton.STATS_BLOCK, loss_triton.GRAD_BLOCK = default


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--N", type=int, default=8192)
    p.add_argument("--V", type=int, nargs="+", default=[32000, 151936])
    p.add_argument("--s", type=int, nargs="+", default=[1, 16])
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["bf16", "fp32"])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--rows", type=int, default=14)
    p.add_argument("--sweep", action="store_true", help="also time several Triton block sizes")
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_mce.py: needs a CUDA device")
    for dt in a.dtype:
        for V in a.V:
            for s in a.s:
                one(a.N, V, s, DTYPES[dt], a.reps, a.rows)
                if a.sweep:
                    sweep_blocks(a.N, V, s, DTYPES[dt])


if __name__ == "__main__":
    main()
