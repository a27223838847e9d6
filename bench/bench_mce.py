#!/usr/bin/env python
"""MCE loss benchmark: fused multi-hot cross-entropy vs the paper's loop vs one cross-entropy.

Three forward+backward computations over the same logits [N, V] (a leaf that requires grad):

  fused : tst_megatron.multi_hot_cross_entropy(logits, labels [N, s], weights)
  loop  : the paper's form, sum_j w_j * F.cross_entropy(logits, labels[:, j], reduction='none')
          / sum_j w_j  (one softmax per bag slot)
  ce    : one ordinary F.cross_entropy(logits, labels[:, 0], reduction='none')  -- the floor
  fused_torch (CUDA only): the fused loss forced onto its torch loops (kernel="torch"), to show
          what the Triton kernels that `fused` uses on CUDA buy

Each is reduced with .mean() and back-propagated into logits.grad. Per configuration
(N, V, s, dtype) all variants run in ONE process, interleaved (fused, loop, ce, then
loop, ce, fused, ... -- the starting variant rotates every repetition), after one warm-up
each; the median over repetitions is reported, and ratios are taken against `ce` per
repetition (same round) and then the median.

Memory, measured (not estimated), in a separate un-timed pass per variant:
  saved  : bytes saved for backward, counted with torch.autograd.graph.saved_tensors_hooks
           over unique storages, excluding the logits' own storage (every variant keeps it).
  peak   : peak allocator bytes above the level before the forward, over forward+backward
           (the logits' .grad included, same for all). CUDA: torch.cuda.max_memory_allocated.
           CPU: torch.profiler(profile_memory=True) -- every allocation/free the c10 CPU
           allocator reports ([memory] events, with sizes) is summed in time order; the peak
           of that running sum is the value.

Targets (every s): fused time <= 1.25 x ce; fused saved and peak bytes <= 1.1 x ce. The
exit status is 1 when a fused ratio misses its target by more than the measured noise: for
time, the relative half inter-quartile range of the `ce` repetitions of that configuration
(a miss counts when ratio > 1.25 * (1 + noise)); memory is deterministic (noise 0).

Both wall time and process CPU time are recorded for every call; the time target is judged on
--clock (default: wall (CUDA events) on CUDA, process CPU time on CPU, where the cores are shared
and wall time mostly measures the neighbours). On CPU the default is 1 intra-op thread.

Defaults: CUDA -> N = 8192, dtypes fp32 and bf16; CPU -> N = 2048 (8192 x 151936 fp32 is
5 GB per [N, V] tensor and the loop at s = 16 keeps 16 of them), dtype fp32. The loop is
skipped (marked so) when its estimated peak exceeds --mem-budget-gb.

  python bench/bench_mce.py                       # full run on this machine's default device
  python bench/bench_mce.py --quick               # CI-sized: N=512, V in {4096, 32000}, s in {1, 4, 16}
  python bench/bench_mce.py --dtype bf16 --json out.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from tst_megatron.loss import multi_hot_cross_entropy

TIME_TARGET = 1.25
MEM_TARGET = 1.10
VARIANTS = ("fused", "loop", "ce", "fused_torch")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------ variants
def make_variants(labels: torch.Tensor, weights: List[float]) -> Dict[str, Callable]:
    w_sum = sum(weights)
    w_tensor = torch.tensor(weights, dtype=torch.float32, device=labels.device)
    columns = [labels[:, j].contiguous() for j in range(labels.shape[1])]
    first = columns[0]

    def fused(x):
        return multi_hot_cross_entropy(x, labels, w_tensor)

    def loop(x):
        total = None
        for j, y in enumerate(columns):
            term = weights[j] * F.cross_entropy(x, y, reduction="none")
            total = term if total is None else total + term
        return total / w_sum

    def ce(x):
        return F.cross_entropy(x, first, reduction="none")

    out = {"fused": fused, "loop": loop, "ce": ce}
    if labels.is_cuda:
        out["fused_torch"] = lambda x: multi_hot_cross_entropy(x, labels, w_tensor, kernel="torch")
    return out


# ------------------------------------------------------------------------------ measurement
class Timer:
    """(wall seconds, process CPU seconds) of one call. CUDA: wall time from CUDA events."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], None]):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            c0 = time.process_time()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000.0, time.process_time() - c0
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        return time.perf_counter() - t0, time.process_time() - c0


def fwd_bwd(x: torch.Tensor, variant: Callable) -> torch.Tensor:
    x.grad = None
    loss = variant(x)
    loss.float().mean().backward()
    return loss.detach()


def saved_bytes(x: torch.Tensor, variant: Callable) -> int:
    """Bytes saved for backward over unique storages, the logits' storage excluded."""
    seen: Dict[int, int] = {}
    own = x.untyped_storage().data_ptr()

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() != own:
            seen[st.data_ptr()] = st.nbytes()
        return t

    x.grad = None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = variant(x)
    loss.float().mean().backward()
    x.grad = None
    return sum(seen.values())


def _cpu_peak_from_profiler(prof) -> int:
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
              and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())  # stable: ties keep record order
    level = peak = 0
    for e in events:
        level += e.nbytes()
        peak = max(peak, level)
    return peak


def peak_bytes(x: torch.Tensor, variant: Callable, device: torch.device) -> int:
    """Peak allocated bytes above the pre-forward level during forward + backward."""
    x.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd(x, variant)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fwd_bwd(x, variant)
        peak = _cpu_peak_from_profiler(prof)
    x.grad = None
    return peak


def quantile(values: List[float], q: float) -> float:
    v = sorted(values)
    if len(v) == 1:
        return v[0]
    pos = q * (len(v) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def rel_half_iqr(values: List[float]) -> float:
    med = statistics.median(values)
    return 0.5 * (quantile(values, 0.75) - quantile(values, 0.25)) / med if med > 0 else 0.0


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


# ------------------------------------------------------------------------------ pass / fail
def fused_failures(time_ratio: float, time_noise: float, saved_ratio: float, peak_ratio: float,
                   clock: str = "cpu") -> List[str]:
    """The targets missed by one configuration (empty: it passes).

    time_ratio: median fused/ce time ratio; time_noise: relative half IQR of the per-round ratios.
    The time target is missed only beyond the noise (ratio > TIME_TARGET * (1 + noise)); the
    memory ratios are deterministic, so they have no noise allowance (ratio > MEM_TARGET fails).
    """
    failures = []  # "not <=": a ratio that could not be measured (NaN) fails too
    if not time_ratio <= TIME_TARGET * (1.0 + time_noise):
        failures.append(f"{clock} time {time_ratio:.3f} > {TIME_TARGET} (noise {time_noise:.1%})")
    if not saved_ratio <= MEM_TARGET:
        failures.append(f"saved bytes {saved_ratio:.3f} > {MEM_TARGET}")
    if not peak_ratio <= MEM_TARGET:
        failures.append(f"peak bytes {peak_ratio:.3f} > {MEM_TARGET}")
    return failures


def exit_status(results: List[dict], no_fail: bool = False) -> int:
    """1 when some configuration missed a target (unless --no-fail), else 0."""
    return 1 if any(r["failures"] for r in results) and not no_fail else 0


# ------------------------------------------------------------------------------ one configuration
def _ratio_stats(times: Dict[str, List[float]], names: List[str]) -> dict:
    fused_ratios = [a / b for a, b in zip(times["fused"], times["ce"])]
    return {"median_s": {n: statistics.median(times[n]) for n in names},
            # per-repetition ratio against ce of the same round, then the median
            "ratio": {n: statistics.median([a / b for a, b in zip(times[n], times["ce"])]) for n in names},
            "ce_noise_rel": rel_half_iqr(times["ce"]),
            # the spread of the very ratio the target is checked on (session 18 on; before, the spread
            # of the ce timings alone, which one slow ce call could widen to 70% at 3 repetitions)
            "ratio_noise_rel": rel_half_iqr(fused_ratios)}


def run_config(N: int, V: int, s: int, dtype: torch.dtype, device: torch.device, reps: int,
               mem_budget: float, clock: str, seed: int = 0) -> dict:
    g = torch.Generator(device=device).manual_seed(seed + 1000 * s + V)
    logits = torch.randn(N, V, generator=g, device=device).mul_(2.0).to(dtype).requires_grad_(True)
    labels = torch.randint(0, V, (N, s), generator=g, device=device)
    weights = [1.0 / s] * s
    variants = make_variants(labels, weights)

    nv = N * V * (torch.finfo(dtype).bits // 8)
    # The loop keeps s log-softmax outputs plus ~3 [N, V] temporaries (and fp32 upcasts in bf16).
    loop_estimate = (s + 3) * nv * (1 if dtype == torch.float32 else 2) + nv
    names = [v for v in VARIANTS if v in variants and (v != "loop" or loop_estimate <= mem_budget)]
    skipped = [v for v in VARIANTS if v in variants and v not in names]

    timer = Timer(device)
    values = {n: fwd_bwd(logits, variants[n]).float() for n in names}  # warm-up + value check
    logits.grad = None
    check = float((values["fused"] - values["loop"]).abs().max()) if "loop" in values else None
    if "fused_torch" in values:  # the Triton path against the torch loops, same logits
        check_torch = float((values["fused"] - values["fused_torch"]).abs().max())
    else:
        check_torch = None
    del values

    wall: Dict[str, List[float]] = {n: [] for n in names}
    cpu: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names):] + names[: r % len(names)]  # interleaved, rotating start
        for name in order:
            w, c = timer(lambda: fwd_bwd(logits, variants[name]))
            logits.grad = None
            wall[name].append(w)
            cpu[name].append(c)

    saved = {n: saved_bytes(logits, variants[n]) for n in names}
    peak = {n: peak_bytes(logits, variants[n], device) for n in names}
    clocks = {"wall": _ratio_stats(wall, names), "cpu": _ratio_stats(cpu, names)}
    ratio_saved = {n: (saved[n] / saved["ce"]) if saved["ce"] else float("nan") for n in names}
    ratio_peak = {n: (peak[n] / peak["ce"]) if peak["ce"] else float("nan") for n in names}

    decide = clocks[clock]
    failures = fused_failures(decide["ratio"]["fused"], decide["ratio_noise_rel"], ratio_saved["fused"],
                              ratio_peak["fused"], clock)
    return {"N": N, "V": V, "s": s, "dtype": str(dtype).replace("torch.", ""), "reps": reps,
            "clock": clock, "wall_s": wall, "cpu_s": cpu, "wall": clocks["wall"], "cpu": clocks["cpu"],
            "saved_bytes": saved, "saved_ratio": ratio_saved, "peak_bytes": peak, "peak_ratio": ratio_peak,
            "skipped": skipped, "loop_estimate_bytes": loop_estimate, "max_abs_diff_fused_vs_loop": check,
            "max_abs_diff_fused_vs_torch_loops": check_torch, "failures": failures}


# ------------------------------------------------------------------------------ report
def _mb(b: Optional[float]) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def _r(x: Optional[float], fmt: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _ms(x: Optional[float]) -> str:
    return "-" if x is None else f"{1000 * x:.1f}"


def _table(head: List[str], rows: List[List[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def format_tables(results: List[dict]) -> str:
    clock = results[0]["clock"] if results else "wall"
    other = "cpu" if clock == "wall" else "wall"
    ratios, absolute = [], []
    for r in results:
        d, o = r[clock], r[other]
        loop = "loop" not in r["skipped"]
        ratios.append([r["dtype"], str(r["N"]), str(r["V"]), str(r["s"]),
                       _r(d["ratio"]["fused"]), _r(d["ratio"].get("fused_torch")),
                       _r(d["ratio"].get("loop")) if loop else "skipped",
                       f"{d['ratio_noise_rel']:.1%}", _r(o["ratio"]["fused"]), _r(o["ratio"].get("loop")),
                       _r(r["saved_ratio"]["fused"], ".3f"), _r(r["saved_ratio"].get("loop")),
                       _r(r["peak_ratio"]["fused"]), _r(r["peak_ratio"].get("loop")),
                       "yes" if not r["failures"] else "**NO**"])
        absolute.append([r["dtype"], str(r["N"]), str(r["V"]), str(r["s"]),
                         " / ".join(_ms(d["median_s"].get(n)) for n in VARIANTS),
                         " / ".join(_ms(o["median_s"].get(n)) for n in VARIANTS),
                         " / ".join(_mb(r["saved_bytes"].get(n)) for n in VARIANTS),
                         " / ".join(_mb(r["peak_bytes"].get(n)) for n in VARIANTS),
                         _r(r["max_abs_diff_fused_vs_loop"], ".1e")
                         + (f" (vs torch loops {r['max_abs_diff_fused_vs_torch_loops']:.1e})"
                            if r.get("max_abs_diff_fused_vs_torch_loops") is not None else "")])
    t1 = _table(["dtype", "N", "V", "s", f"fused/ce {clock}", f"fused_torch/ce {clock}", f"loop/ce {clock}", f"ratio noise {clock}",
                 f"fused/ce {other}", f"loop/ce {other}", "saved fused/ce", "saved loop/ce",
                 "peak fused/ce", "peak loop/ce", "pass"], ratios)
    t2 = _table(["dtype", "N", "V", "s", f"median ms {clock} fused / loop / ce / fused_torch",
                 f"median ms {other} fused / loop / ce / fused_torch", "saved MiB fused / loop / ce / fused_torch",
                 "peak MiB fused / loop / ce / fused_torch", "max abs fused-loop"], absolute)
    return f"Ratios against one F.cross_entropy (medians over repetitions):\n\n{t1}\n\n" \
           f"Absolute values:\n\n{t2}"


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"CPU {cpu}, {os.cpu_count()} logical cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} intra-op threads)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=None,
                   help="default: fp32 on CPU, fp32 bf16 on CUDA")
    p.add_argument("--N", type=int, default=None, help="positions (default 8192 on CUDA, 2048 on CPU)")
    p.add_argument("--V", type=int, nargs="+", default=None, help="vocabulary sizes (default 32000 151936)")
    p.add_argument("--s", type=int, nargs="+", default=None, help="bag sizes (default 1 4 8 16)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per variant (default 7; quick 5)")
    p.add_argument("--quick", action="store_true", help="CI size: N=512, V 4096 32000, s 1 4 16")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: 1 on CPU)")
    p.add_argument("--clock", choices=["wall", "cpu"], default=None,
                   help="clock the time target is judged on (default: wall on CUDA, cpu on CPU); "
                        "both are always reported")
    p.add_argument("--mem-budget-gb", type=float, default=None,
                   help="skip the loop when its estimated peak exceeds this (default 60%% of free memory)")
    p.add_argument("--json", default=None, help="write all measurements here")
    p.add_argument("--no-fail", action="store_true", help="always exit 0 (report only)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    threads_before = torch.get_num_threads()
    try:
        return _main(parse_args(argv))
    finally:
        torch.set_num_threads(threads_before)


def _main(a) -> int:
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if cuda:
        if device.index is None:  # "cuda" -> the current device, with its index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    # CPU default: 1 intra-op thread. On shared cores a descheduled OpenMP thread stalls its
    # siblings at every barrier (they spin, inflating both wall and CPU time); one thread keeps the
    # process CPU time a measure of the work done.
    torch.set_num_threads(a.threads or (torch.get_num_threads() if cuda else 1))
    N = a.N or (512 if a.quick else (8192 if cuda else 2048))
    Vs = a.V or ([4096, 32000] if a.quick else [32000, 151936])
    ss = a.s or ([1, 4, 16] if a.quick else [1, 4, 8, 16])
    reps = a.reps or (5 if a.quick else 7)
    dtypes = a.dtype or (["fp32", "bf16"] if cuda else ["fp32"])
    clock = a.clock or ("wall" if cuda else "cpu")
    budget = (a.mem_budget_gb * 2**30) if a.mem_budget_gb else 0.6 * available_memory_bytes(device)
    print(f"# MCE benchmark on {machine_description(device)}", flush=True)
    print(f"# N={N} V={Vs} s={ss} dtypes={dtypes} reps={reps} clock={clock} "
          f"loop memory budget {budget / 2**30:.1f} GiB", flush=True)

    results = []
    t_start = time.time()
    for dt in dtypes:
        for V in Vs:
            for s in ss:
                r = run_config(N, V, s, DTYPES[dt], device, reps, budget, clock)
                results.append(r)
                d = r[clock]
                print(f"  {dt} V={V} s={s}: fused/ce {clock} time {d['ratio']['fused']:.2f} "
                      f"(ratio noise {d['ratio_noise_rel']:.1%}; wall {r['wall']['ratio']['fused']:.2f}), "
                      f"loop/ce {_r(d['ratio'].get('loop'))}, saved fused/ce {r['saved_ratio']['fused']:.3f}, "
                      f"peak fused/ce {r['peak_ratio']['fused']:.2f}, "
                      f"max|fused-loop| {_r(r['max_abs_diff_fused_vs_loop'], '.1e')}"
                      + (f"  FAIL: {'; '.join(r['failures'])}" if r["failures"] else ""), flush=True)
                if cuda:
                    torch.cuda.empty_cache()
    print()
    print(format_tables(results))
    failed = [r for r in results if r["failures"]]
    print(f"\n{len(results) - len(failed)}/{len(results)} configurations meet the fused targets "
          f"(time <= {TIME_TARGET} x ce beyond the ratio noise on the {clock} clock, saved/peak bytes "
          f"<= {MEM_TARGET} x ce); {time.time() - t_start:.0f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": machine_description(device), "device": str(device), "argv": sys.argv[1:],
                       "N": N, "threads": torch.get_num_threads(), "clock": clock,
                       "targets": {"time": TIME_TARGET, "memory": MEM_TARGET}, "results": results}, f, indent=1)
    return exit_status(results, a.no_fail)


if __name__ == "__main__":
    sys.exit(main())
