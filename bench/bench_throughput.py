#!/usr/bin/env python
"""Phase throughput benchmark: the trainer's own step in the superposition vs the recovery phase.

TST promises equal FLOPs per step: during superposition a step still runs L positions per sample
but consumes L*s raw data tokens, so its raw-token throughput should be s times the baseline's.
This measures that promise through `tst_megatron.trainer.Trainer.train_step()` -- megatron's
schedule, DDP, optimizer, our data wrapper, bag embedding and fused multi-hot CE -- for one tiny
GPT at a fixed micro-batch and sequence length.

How (one process per bag size s, so megatron's global state is fresh each time):
  * the parent writes a random-token .bin/.idx corpus with megatron's IndexedDatasetBuilder
    (NullTokenizer, --vocab-size) into a temp dir, then starts one worker per s;
  * the worker builds a RunConfig with `tst_megatron.arguments.parse_args([...])`, runs
    `Trainer(cfg).setup()` in-process (1 rank, Gloo), and makes two data iterators over the
    trainer's own training dataset: one at consumed-samples 0 (superposition samples) and one at
    the first recovery sample. Before each step it points `trainer.train_iters_data` at one of
    them (and the iteration counter into that phase, whose batch layout the trainer checks) and
    calls `trainer.train_step()`. The recovery step IS a baseline step: same model
    (plain token input, ordinary vocab-parallel cross-entropy), same optimizer.
  * phases alternate in blocks of --block steps, in ABBA order (sup, rec, rec, sup, ...), after
    --warmup steps of each phase; each block pair gives one ratio.

Reported per s: median step time per phase (wall and process CPU time; the CPU clock decides on
CPU, where the 2 shared cores make wall time noisy, with 1 intra-op thread by default; the
data-fetch part of the step is shown separately), raw data tokens/s per phase (superposition
gbs*L*s per step, recovery gbs*L), and
    R = (superposition tokens/s) / (s * recovery tokens/s) = t_recovery / t_superposition,
the median over block pairs. Target R >= 0.95; the exit status is 1 when R < 0.95 * (1 - noise)
for some s, noise = relative half inter-quartile range of the block-pair ratios.

  python bench/bench_throughput.py                    # s in {2, 4, 8, 16}, default tiny GPT
  python bench/bench_throughput.py --quick            # smoke size (CI)
  python bench/bench_throughput.py --json out.json --hidden-size 256 --num-layers 4
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import List

TARGET = 0.95
HERE = os.path.dirname(os.path.abspath(__file__))


# ------------------------------------------------------------------------------ data
def write_corpus(prefix: str, vocab_size: int, num_tokens: int, seed: int = 0) -> str:
    """Random documents (30..600 tokens, ids < vocab_size) written with megatron's builder."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    written = 0
    while written < num_tokens:
        n = int(rng.integers(30, 600))
        builder.add_item(torch.from_numpy(rng.integers(0, vocab_size, n, dtype=np.int64)))
        builder.end_document()
        written += n
    builder.finalize(prefix + ".idx")
    return prefix


# ------------------------------------------------------------------------------ statistics
def quantile(values: List[float], q: float) -> float:
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def rel_half_iqr(values: List[float]) -> float:
    med = statistics.median(values)
    return 0.5 * (quantile(values, 0.75) - quantile(values, 0.25)) / med if med > 0 else 0.0


# ------------------------------------------------------------------------------ pass / fail
def throughput_failures(R: float, noise: float) -> List[str]:
    """The target missed by one bag size (empty: it passes): R < TARGET * (1 - noise), where R is
    the median sup/(s*rec) ratio over block pairs and noise the relative half IQR of those ratios."""
    if R < TARGET * (1.0 - noise):
        return [f"R {R:.3f} < {TARGET} (noise {noise:.1%})"]
    return []


def exit_status(results: List[dict], no_fail: bool = False) -> int:
    """1 when some bag size missed the target (unless --no-fail), else 0."""
    return 1 if any(r["failures"] for r in results) and not no_fail else 0


# ------------------------------------------------------------------------------ worker (one s)
class TimedIterator:
    """Wraps a data iterator; adds the time spent in next() to `spent` (wall, cpu)."""

    def __init__(self, it):
        self.it = it
        self.wall = 0.0
        self.cpu = 0.0

    def __iter__(self):
        return self

    def __next__(self):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return next(self.it)
        finally:
            self.wall += time.perf_counter() - t0
            self.cpu += time.process_time() - c0


def trainer_argv(a, s: int, train_iters: int, sup_iters: int, workdir: str) -> List[str]:
    return ["--num-layers", str(a.num_layers), "--hidden-size", str(a.hidden_size),
            "--num-attention-heads", str(a.num_attention_heads), "--seq-length", str(a.seq_length),
            "--micro-batch-size", str(a.micro_batch_size), "--global-batch-size", str(a.global_batch_size),
            "--train-iters", str(train_iters), "--lr", "1e-4", "--lr-decay-style", "constant",
            "--tst-bag-size", str(s), "--tst-superposition-iters", str(sup_iters),
            "--tst-bag-weighting", a.weighting,
            "--tokenizer-type", "NullTokenizer", "--vocab-size", str(a.vocab_size),
            "--data-path", a.data_prefix, "--split", "99,1,0", "--data-cache-path", os.path.join(workdir, "cache"),
            "--eval-iters", "1", "--log-interval", "1000000",
            "--metrics-path", os.path.join(workdir, f"metrics_s{s}.jsonl"), "--seed", "1234"] \
        + (["--bf16"] if a.bf16 else [])


def run_worker(a) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    from tst_megatron.arguments import parse_args
    from tst_megatron.builders import tst_data_tokens_per_sample
    from tst_megatron.data import CountingIterator, build_data_iterator
    from tst_megatron.trainer import RECOVERY, SUPERPOSITION, Trainer

    s = a.bag_size
    steps_per_phase = a.warmup + a.blocks * a.block
    sup_iters = steps_per_phase + 2  # superposition samples the dataset must hold
    train_iters = 2 * sup_iters
    cfg = parse_args(trainer_argv(a, s, train_iters, sup_iters, a.workdir))
    trainer = Trainer(cfg)
    t0 = time.time()
    trainer.setup()
    setup_s = time.time() - t0
    gbs, mbs, L = cfg.optim.global_batch_size, cfg.optim.micro_batch_size, cfg.model.seq_length
    n_sup = trainer.datasets.num_superposition_samples
    assert n_sup == sup_iters * gbs, (n_sup, sup_iters, gbs)
    iters = {
        SUPERPOSITION: TimedIterator(build_data_iterator(trainer.datasets.train, 0, mbs, 0, 1, total_samples=n_sup)),
        RECOVERY: TimedIterator(build_data_iterator(trainer.datasets.train, n_sup, mbs, 0, 1,
                                                    total_samples=trainer.datasets.num_train_samples)),
    }
    tokens_per_step = {p: gbs * tst_data_tokens_per_sample(cfg.tst, L, p) for p in iters}

    def step(phase: str):
        it = iters[phase]
        # the trainer checks each step's batch layout against the phase of its iteration counter
        trainer.iteration = 0 if phase == SUPERPOSITION else trainer.num_sup_iters
        trainer.train_iters_data = [CountingIterator(it)]
        w0, c0 = it.wall, it.cpu
        t, c = time.perf_counter(), time.process_time()
        out = trainer.train_step()
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        if not math.isfinite(out["loss"]):
            raise RuntimeError(f"non-finite loss in the {phase} phase")
        return wall, cpu, it.wall - w0, it.cpu - c0, out["loss"]

    for _ in range(a.warmup):
        for phase in (SUPERPOSITION, RECOVERY):
            step(phase)
    rec = {p: {"wall": [], "cpu": [], "data_wall": [], "data_cpu": [], "loss": []} for p in iters}
    blocks = {p: {"wall": [], "cpu": []} for p in iters}
    for b in range(a.blocks):
        order = (SUPERPOSITION, RECOVERY) if b % 2 == 0 else (RECOVERY, SUPERPOSITION)
        for phase in order:
            wall, cpu = [], []
            for _ in range(a.block):
                w, c, dw, dc, loss = step(phase)
                for key, v in zip(("wall", "cpu", "data_wall", "data_cpu", "loss"), (w, c, dw, dc, loss)):
                    rec[phase][key].append(v)
                wall.append(w)
                cpu.append(c)
            blocks[phase]["wall"].append(sum(wall) / len(wall))
            blocks[phase]["cpu"].append(sum(cpu) / len(cpu))
    trainer.close()

    result = {"s": s, "gbs": gbs, "micro_batch_size": mbs, "seq_length": L, "setup_s": setup_s,
              "tokens_per_step": tokens_per_step, "steps": rec, "block_means": blocks,
              "threads": torch.get_num_threads()}
    for clock in ("wall", "cpu"):
        pair = [r / t for r, t in zip(blocks[RECOVERY][clock], blocks[SUPERPOSITION][clock])]
        med = {p: statistics.median(rec[p][clock]) for p in iters}
        result[clock] = {
            "median_step_s": med,
            "tokens_per_s": {p: tokens_per_step[p] / med[p] for p in iters},
            "median_data_s": {p: statistics.median(rec[p]["data_" + clock]) for p in iters},
            "R": statistics.median(pair),
            "R_pairs": pair,
            # the spread of the block-pair ratios R is the median of (session 18 on; before, the
            # spread of single recovery steps)
            "noise_rel": rel_half_iqr(pair),
        }
        # the same ratio without the data fetch (model + optimizer only)
        comp = {p: statistics.median([x - d for x, d in zip(rec[p][clock], rec[p]["data_" + clock])]) for p in iters}
        result[clock]["R_compute_only"] = comp[RECOVERY] / comp[SUPERPOSITION]
    return result


# ------------------------------------------------------------------------------ parent
def machine_description(threads) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU {cpu}, {os.cpu_count()} logical cores"
    return f"{dev}, torch {torch.__version__}, {threads} intra-op threads"


def format_table(results: List[dict], clock: str) -> str:
    other = "cpu" if clock == "wall" else "wall"
    head = ["s", f"step ms sup / rec ({clock})", "data-fetch ms sup / rec", "raw tokens/s sup / rec",
            f"R = sup/(s*rec) ({clock})", "noise", "R compute-only", f"R ({other})", "pass"]
    rows = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in results:
        d, o = r[clock], r[other]
        st, dt, tk = d["median_step_s"], d["median_data_s"], d["tokens_per_s"]
        rows.append("| " + " | ".join([
            str(r["s"]), f"{1000 * st['superposition']:.1f} / {1000 * st['recovery']:.1f}",
            f"{1000 * dt['superposition']:.1f} / {1000 * dt['recovery']:.1f}",
            f"{tk['superposition']:.0f} / {tk['recovery']:.0f}", f"{d['R']:.3f}", f"{d['noise_rel']:.1%}",
            f"{d['R_compute_only']:.3f}", f"{o['R']:.3f}", "yes" if not r["failures"] else "**NO**"]) + " |")
    return "\n".join(rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--s", type=int, nargs="+", default=None, help="bag sizes (default 2 4 8 16)")
    p.add_argument("--num-layers", type=int, default=None)
    p.add_argument("--hidden-size", type=int, default=None)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=None)
    p.add_argument("--micro-batch-size", type=int, default=None)
    p.add_argument("--global-batch-size", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--weighting", default="uniform")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--warmup", type=int, default=None, help="steps of each phase before timing (default 3)")
    p.add_argument("--blocks", type=int, default=None, help="timed blocks per phase (default 8)")
    p.add_argument("--block", type=int, default=None, help="steps per block (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: 1 on CPU)")
    p.add_argument("--clock", choices=["wall", "cpu"], default=None,
                   help="clock the target is judged on (default: wall on CUDA, cpu on CPU)")
    p.add_argument("--quick", action="store_true", help="smoke size: s 2 4, 1 layer, hidden 32, L 32, few steps")
    p.add_argument("--json", default=None)
    p.add_argument("--no-fail", action="store_true", help="always exit 0 (report only)")
    p.add_argument("--keep", default=None, help="work directory to use and keep (default: a temp dir)")
    # internal: one worker per s
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--bag-size", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--data-prefix", default=None, help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    q = a.quick
    defaults = dict(num_layers=1 if q else 2, hidden_size=32 if q else 128, seq_length=32 if q else 128,
                    micro_batch_size=2 if q else 4, global_batch_size=4 if q else 8,
                    vocab_size=512 if q else 8192, warmup=1 if q else 3, blocks=2 if q else 8,
                    block=1 if q else 2, s=[2, 4] if q else [2, 4, 8, 16])
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker:
        result = run_worker(a)
        with open(a.result, "w") as f:
            json.dump(result, f)
        return 0

    import torch

    clock = a.clock or ("wall" if torch.cuda.is_available() else "cpu")
    # CPU default 1 thread: on shared cores OpenMP siblings spin while one is descheduled, which
    # inflates wall and CPU time alike; with one thread the process CPU time measures the work.
    threads = a.threads or (torch.get_num_threads() if torch.cuda.is_available() else 1)
    a.threads = threads
    tmp = None
    if a.keep:
        os.makedirs(a.keep, exist_ok=True)
        workdir = a.keep
    else:
        tmp = tempfile.TemporaryDirectory(prefix="tst_bench_")
        workdir = tmp.name
    try:
        prefix = os.path.join(workdir, "corpus")
        if not os.path.exists(prefix + ".idx"):
            # about one epoch of the largest superposition phase (s = 16's last samples may wrap into a
            # second one: the timing does not depend on which tokens a sample holds)
            steps = a.warmup + a.blocks * a.block + 2
            need = 2 * steps * a.global_batch_size * (a.seq_length + 1) * max(a.s)
            write_corpus(prefix, a.vocab_size, min(max(need // 2, 20000), 4_000_000))
        print(f"# phase throughput on {machine_description(threads)}; clock {clock}", flush=True)
        print(f"# GPT: {a.num_layers} layers, hidden {a.hidden_size}, {a.num_attention_heads} heads, L={a.seq_length}, "
              f"micro-batch {a.micro_batch_size}, global batch {a.global_batch_size}, vocab {a.vocab_size}, "
              f"{'bf16' if a.bf16 else 'fp32'}; {a.warmup} warm-up steps per phase, {a.blocks} blocks x "
              f"{a.block} steps per phase (ABBA)", flush=True)
        results = []
        t_start = time.time()
        for s in a.s:
            out = os.path.join(workdir, f"result_s{s}.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--bag-size", str(s),
                   "--data-prefix", prefix, "--workdir", workdir, "--result", out]
            for k in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size",
                      "global_batch_size", "vocab_size", "weighting", "warmup", "blocks", "block", "threads"):
                v = getattr(a, k)
                if v is not None:
                    cmd += ["--" + k.replace("_", "-"), str(v)]
            if a.bf16:
                cmd.append("--bf16")
            env = dict(os.environ, PYTHONWARNINGS="ignore")
            for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
                env.pop(key, None)  # the worker is its own 1-rank job
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
                print(f"error: worker for s={s} failed (exit {proc.returncode})", file=sys.stderr)
                return 2
            with open(out) as f:
                r = json.load(f)
            d = r[clock]
            r["failures"] = throughput_failures(d["R"], d["noise_rel"])
            results.append(r)
            print(f"  s={s}: step {1000 * d['median_step_s']['superposition']:.1f} ms sup / "
                  f"{1000 * d['median_step_s']['recovery']:.1f} ms rec ({clock}); R = {d['R']:.3f} "
                  f"(noise {d['noise_rel']:.1%}; wall R {r['wall']['R']:.3f}; setup {r['setup_s']:.0f} s)"
                  + (f"  FAIL: {'; '.join(r['failures'])}" if r["failures"] else ""), flush=True)
        print()
        print(format_table(results, clock))
        failed = [r for r in results if r["failures"]]
        print(f"\n{len(results) - len(failed)}/{len(results)} bag sizes meet R >= {TARGET} beyond the noise "
              f"({clock} clock); {time.time() - t_start:.0f} s")
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"machine": machine_description(threads), "clock": clock, "argv": sys.argv[1:],
                           "config": {k: getattr(a, k) for k in ("num_layers", "hidden_size", "num_attention_heads",
                                                                 "seq_length", "micro_batch_size",
                                                                 "global_batch_size", "vocab_size", "bf16",
                                                                 "warmup", "blocks", "block")},
                           "target": TARGET, "results": results}, f, indent=1)
        return exit_status(results, a.no_fail)
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
