"""Does every trainer feature still run on this machine's device? One tiny `pretrain_tst.py` run per
feature, each checked for a clean exit, finite losses and the iterations it should have logged.

The test suite runs all of this on CPU (Gloo); a GPU is where users run it (NCCL, CUDA streams in
megatron's MoE dispatchers, Triton loss kernels, bf16/fp16 on the device), and device time is rare,
so this is the one command that covers those paths when a GPU is lent (experiments/gpu_session.sh
runs it). It uses the e2e tests' tiny model and data (tests/trainer_utils.py): one process, so on
a single GPU; multi-GPU layouts (TP/PP/EP) need several devices and stay with the CPU tests.

    python experiments/gpu_smoke.py --out outputs/gpu_smoke        # prints a table, writes smoke.json

The resume check compares a run stopped and resumed at iteration 6 with an uninterrupted one:
bit-exact on CPU; on a GPU, cuBLAS/attention kernels may reorder sums, so the table reports the
largest difference rather than asserting equality.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import trainer_utils as tu  # noqa: E402  (the e2e tests' launcher and tiny configuration)

LLAMA = dict(position_embedding_type="rope", swiglu=True, normalization="RMSNorm", disable_bias_linear=True,
             untie_embeddings_and_output_weights=True)
MOE = dict(num_experts=4, moe_router_topk=2, moe_aux_loss_coeff=1e-2)


def moe(**kw) -> dict:
    """A Llama-style MoE case: LLAMA and MOE, then `kw` on top."""
    return {**LLAMA, **MOE, **kw}


def cases(out: Path):
    """(name, pretrain_tst.py overrides of tests/trainer_utils.base_args, expected train iterations)."""
    d = str(out)
    yield "dense TST fp32", dict(LLAMA), 12
    yield "bf16 + distributed optimizer + grad-reduce-in-bf16 + timers 2 + manual gc", dict(
        LLAMA, bf16=True, use_distributed_optimizer=True, grad_reduce_in_bf16=True, timing_log_level=2,
        manual_gc=True, manual_gc_interval=3), 12
    yield "fp16 (dynamic loss scale)", dict(LLAMA, fp16=True), 12
    yield "tst-mode input", dict(LLAMA, tst_mode="input"), 12  # next-token targets: no bag weighting
    yield "tst-mode output, bag weighting power, GQA + qk-layernorm + tied", dict(
        position_embedding_type="rope", swiglu=True, normalization="RMSNorm", tst_mode="output",
        tst_bag_weighting="power",
        group_query_attention=True, num_query_groups=2, qk_layernorm=True), 12
    yield "batch ramp-up 4 -> 8 (train-samples)", dict(
        LLAMA, train_iters=None, train_samples=96, rampup_batch_size=[4, 4, 16], tst_superposition_iters=None,
        tst_superposition_ratio=0.3), None
    yield "MoE alltoall + aux loss", moe(moe_token_dispatcher_type="alltoall", bf16=True), 12
    yield "MoE allgather + sigmoid router + expert bias", moe(
        moe_token_dispatcher_type="allgather", moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True, moe_router_load_balancing_type="none", moe_aux_loss_coeff=0), 12
    yield "MoE alltoall + capacity 1.0 padded + shared expert", moe(
        moe_token_dispatcher_type="alltoall", moe_expert_capacity_factor=1.0,
        moe_pad_expert_input_to_capacity=True, moe_shared_expert_intermediate_size=64), 12
    yield "MoE layer pattern [0,1] + layernorm-1p + squared relu + wd/lr ramps + nan check + ddp buckets", dict(
        MOE, position_embedding_type="rope", normalization="RMSNorm", disable_bias_linear=True,
        moe_layer_freq="[0,1]", apply_layernorm_1p=True, squared_relu=True, bf16=True,
        start_weight_decay=0.01, end_weight_decay=0.1, weight_decay_incr_style="linear", lr_warmup_iters=2,
        lr_warmup_init=1e-4, check_for_nan_in_loss_and_grad=True, overlap_grad_reduce=True,
        ddp_bucket_size=20000), 12
    yield "resume: 0-12 uninterrupted", dict(LLAMA, metrics_path=f"{d}/resume_ref.jsonl"), 12
    yield "resume: 0-6, saved", dict(LLAMA, save=f"{d}/ckpt", save_interval=6, exit_interval=6,
                                     metrics_path=f"{d}/resume_a.jsonl"), 6
    yield "resume: 6-12 from --load", dict(LLAMA, load=f"{d}/ckpt", save=f"{d}/ckpt", save_interval=6,
                                           metrics_path=f"{d}/resume_b.jsonl"), 6


def losses(records) -> dict:
    return {r["iteration"]: r["loss"] for r in records if r.get("type") == "train"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/gpu_smoke")
    p.add_argument("--timeout", type=float, default=240.0, help="seconds per run")
    p.add_argument("--only", default=None,
                   help="run only the cases whose name contains one of these comma-separated strings (e.g. MoE,resume)")
    a = p.parse_args()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in ("resume_ref.jsonl", "resume_a.jsonl", "resume_b.jsonl"):  # an earlier call's: not compared
        (out / name).unlink(missing_ok=True)
    data = tu.make_data(str(out / "tiny"))
    import torch
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    rows, failed = [], 0
    for i, (name, overrides, want) in enumerate(cases(out)):
        if a.only and not any(part and part in name for part in a.only.split(",")):
            continue
        overrides = dict(overrides)
        overrides.setdefault("metrics_path", str(out / f"case{i}.jsonl"))
        t0 = time.time()
        res = tu.run_trainer(tu.base_args(data, **overrides), 1, timeout=a.timeout)
        secs = time.time() - t0
        ls = losses(res.records)
        evals = [r for r in res.records if r.get("type") == "eval"]
        problems = []
        if res.returncode != 0:
            problems.append(f"rc={res.returncode}")
        if not ls or not all(math.isfinite(v) for v in ls.values()):
            problems.append("no or non-finite losses")
        if want is not None and len(ls) != want:
            problems.append(f"{len(ls)} iterations logged, expected {want}")
        row = dict(case=name, ok=not problems, problems=problems, seconds=round(secs, 1),
                   iterations=len(ls), last_loss=ls[max(ls)] if ls else None,
                   val_lm_loss=evals[-1].get("val_lm_loss") if evals else None)
        if problems:
            failed += 1
            (out / f"case{i}.log").write_text(tu.tail(res.stdout, 20000))
        rows.append(row)
        print(f"[gpu_smoke] {'ok  ' if row['ok'] else 'FAIL'} {name}: {row['iterations']} iterations, "
              f"last loss {row['last_loss']}, val {row['val_lm_loss']}, {secs:.1f}s {' '.join(problems)}",
              flush=True)
    ref = losses(tu.read_records(str(out / "resume_ref.jsonl")))
    resumed = {**losses(tu.read_records(str(out / "resume_a.jsonl"))),
               **losses(tu.read_records(str(out / "resume_b.jsonl")))}
    common = sorted(set(ref) & set(resumed))
    diff = max((abs(ref[k] - resumed[k]) for k in common), default=None)  # None: no resume cases ran
    if diff is not None:
        print(f"[gpu_smoke] resume vs uninterrupted: {len(common)} common iterations, largest |loss difference| "
              f"{diff:.3g} ({'bit-exact' if diff == 0 else 'not bit-exact'})")
    summary = dict(device=device, torch=torch.__version__, cases=rows, resume_iterations=len(common),
                   resume_max_abs_loss_diff=diff, failed=failed)
    (out / "smoke.json").write_text(json.dumps(summary, indent=1))
    print(f"[gpu_smoke] {device}: {len(rows) - failed}/{len(rows)} cases ran clean")
    resume_ran = any(r["case"].startswith("resume") for r in rows)
    return 1 if failed or (resume_ran and len(common) != 12) else 0


if __name__ == "__main__":
    sys.exit(main())
