"""End-to-end runs of pretrain_tst.py in fresh processes (1 or 2 Gloo ranks, tiny model, CPU).

Every run trains 12 iterations with a TST switch at iteration 4 (s=4) unless said otherwise, logs
every iteration to the metrics JSONL, and is judged from that file and the console:
both phases present, finite losses, s times more data tokens per superposition step, and a final
next-token validation loss below the one of the untrained model. Runs shared with
test_trainer_flags.py live in trainer_utils (one launch per session).
"""
from __future__ import annotations

import math
import os

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

from trainer_utils import (BAG, DISTOPT_FLAGS, GBS, MOE_FLAGS, MOE_LOSS_FLAGS,
                           PLAIN_FLAGS, SEQ, SUP_ITERS, TRAIN_ITERS, assert_ok, base_args,
                           chain_args, chain_first_leg, checkpoint_model_tensors, copy_checkpoint, distopt_run,
                           eval_records, moe_run, plain_args, reference_runs, rel_diff, run_record, tail, tp2_run,
                           train_records, workspace)


@pytest.fixture(scope="session")
def ws(tmp_path_factory):
    return workspace(tmp_path_factory)


# ------------------------------------------------------------------------------ shared checks
def check_tst_run(res, layout: str = None, train_iters: int = TRAIN_ITERS, sup_iters: int = SUP_ITERS,
                  first: int = 1, console_first: int = None):
    """The behaviour every TST run must show; returns (train records, eval records).
    `first`: the first iteration in the metrics records (later for a resumed run with its own
    metrics file); `console_first`: the first iteration this process trained (default `first`)."""
    assert_ok(res)
    out = res.stdout
    if layout:
        assert layout in out, f"layout {layout!r} not in the run's banner:\n{tail(out)}"
    console_first = first if console_first is None else console_first
    crossed = console_first <= sup_iters  # this process trained superposition steps and the switch
    assert ("phase: superposition" in out and "mce loss:" in out) == crossed, tail(out)
    assert "phase: recovery" in out and "lm loss:" in out, tail(out)
    assert (f"[TST] phase switch at iteration {sup_iters}:" in out) == crossed, tail(out)
    tr, ev = train_records(res.records), eval_records(res.records)
    assert sorted(tr) == list(range(first, train_iters + 1)), f"train records for {sorted(tr)}"
    for it, r in tr.items():
        sup = it <= sup_iters  # the record of iteration `it` describes step `it` (0-based it-1)
        assert r["phase"] == ("superposition" if sup else "recovery"), (it, r["phase"])
        assert r["loss_kind"] == ("mce" if sup else "lm"), (it, r["loss_kind"])
        assert math.isfinite(r["loss"]) and 0.0 < r["loss"] < 20.0, (it, r["loss"])
        assert math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0.0, (it, r["grad_norm"])
        assert r["consumed_samples"] == it * GBS
        # data tokens: s*L per sample in superposition, L in recovery; positions: always L
        expected_tokens = GBS * SEQ * (BAG * min(it, sup_iters) + max(0, it - sup_iters))
        assert r["data_tokens"] == expected_tokens, (it, r["data_tokens"], expected_tokens)
        assert r["positions"] == it * GBS * SEQ
        # rates of the step the record closes (log interval 1): raw data tokens per second are
        # s x the model positions per second in superposition, equal in recovery
        for key in ("tokens_per_s", "positions_per_s", "tflops_per_device", "elapsed_s"):
            assert math.isfinite(r[key]) and r[key] > 0.0, (it, key, r[key])
        assert math.isfinite(r["lr"]) and r["lr"] >= 0.0, (it, r["lr"])  # cosine ends at --min-lr 0
        assert r["tokens_per_s"] / r["positions_per_s"] == pytest.approx(BAG if sup else 1.0), (it, r)
    elapsed = [tr[i]["elapsed_s"] for i in sorted(tr)]
    assert elapsed == sorted(elapsed), f"elapsed_s not monotone: {elapsed}"
    # the console line a Megatron user reads, once per trained iteration, with every field
    lines = [ln for ln in out.splitlines() if f"/{train_iters:8d} |" in ln and "phase:" in ln]
    assert len(lines) == train_iters - console_first + 1, tail(out)
    for field in ("learning rate:", "loss:", "grad norm:", "data tokens:", "positions:", "tokens/s:",
                  "positions/s:", "TFLOP/s/device:", "elapsed:", "ETA:"):
        assert all(field in ln for ln in lines), f"{field!r} missing from a log line:\n{lines[0]}"
    # per-step data consumption from the file: s times more in superposition than in recovery
    steps = [tr[i]["data_tokens"] - (tr[i - 1]["data_tokens"] if i > first else
                                     GBS * SEQ * (BAG * min(first - 1, sup_iters) + max(0, first - 1 - sup_iters)))
             for i in range(first, train_iters + 1)]
    sup_steps = [d for i, d in zip(range(first, train_iters + 1), steps) if i <= sup_iters]
    rec_steps = [d for i, d in zip(range(first, train_iters + 1), steps) if i > sup_iters]
    assert rec_steps and set(rec_steps) == {GBS * SEQ}
    if sup_steps:
        assert set(sup_steps) == {BAG * GBS * SEQ}
    for it, e in ev.items():
        assert math.isfinite(e["val_lm_loss"]), e
        # the multi-hot (next-bag) validation loss exists only while the model is a superposition
        # model: during the phase and at the switch itself (after the last superposition step)
        assert ("val_mce_loss" in e) == (it <= sup_iters), (it, e)
    return tr, ev


def check_learned(ev):
    """Validation next-token loss at the end below that of the untrained model (iteration 0)."""
    assert 0 in ev and TRAIN_ITERS in ev, f"evaluations at {sorted(ev)}"
    start, end = ev[0]["val_lm_loss"], ev[TRAIN_ITERS]["val_lm_loss"]
    assert end < start - 0.05, f"validation lm loss {start:.4f} -> {end:.4f}: did not learn"


# ------------------------------------------------------------------------------ 2-rank layouts
def test_tp2_through_switch_then_resume_at_tp1(ws):
    """TP=2 on 2 ranks through the switch; its iteration-6 (recovery) and iteration-3
    (superposition) checkpoints resume at TP=1 with the same next-iteration loss (fp32 tolerance)
    and the same continuation, through the switch for the second."""
    tp2 = tp2_run(ws)
    tr, ev = check_tst_run(tp2, layout="TP=2 PP=1 EP=1 DP=1")
    check_learned(ev)
    # checkpoints: Megatron layout, atomic (no leftovers), tracker on the last one
    names = sorted(os.listdir(ws.path("tp2")))
    assert "iter_0000006" in names and "iter_0000012" in names, names
    assert not [n for n in names if n.endswith(".tmp") or n.endswith(".old")], names
    assert open(os.path.join(ws.path("tp2"), "latest_checkpointed_iteration.txt")).read().strip() == "12"
    for it in (6, 12):
        assert os.path.isfile(os.path.join(ws.path("tp2"), f"iter_{it:07d}", "tst_meta.json"))
    # the embedding is sharded over the 2 TP ranks as one global tensor
    shapes = checkpoint_model_tensors(os.path.join(ws.path("tp2"), "iter_0000006"))
    assert shapes["embedding.word_embeddings.weight"][1] == 64

    load = copy_checkpoint(ws.path("tp2"), 6, ws.path("tp2_at6"))
    tp1 = ws.run("tp1_resumed", base_args(ws.data, load=load, metrics_path=ws.path("tp1_resumed.jsonl")))
    assert_ok(tp1, "TP=1 resume of a TP=2 checkpoint")
    assert "resumed from" in tp1.stdout and "at iteration 6" in tp1.stdout, tail(tp1.stdout)
    assert "TP=1 PP=1 EP=1 DP=1" in tp1.stdout
    tr1, ev1 = check_tst_run(tp1, first=7)
    assert rel_diff(tr1[7]["loss"], tr[7]["loss"]) <= 1e-5, (tr1[7]["loss"], tr[7]["loss"])
    for it in range(7, TRAIN_ITERS + 1):
        assert rel_diff(tr1[it]["loss"], tr[it]["loss"]) <= 1e-4, (it, tr1[it]["loss"], tr[it]["loss"])
        assert tr1[it]["lr"] == tr[it]["lr"], (it, tr1[it]["lr"], tr[it]["lr"])
    assert rel_diff(ev1[TRAIN_ITERS]["val_lm_loss"], ev[TRAIN_ITERS]["val_lm_loss"]) <= 1e-4

    load = copy_checkpoint(ws.path("tp2"), 3, ws.path("tp2_at3"))
    tp1 = ws.run("tp1_resumed_at3", base_args(ws.data, load=load, metrics_path=ws.path("tp1_resumed_at3.jsonl")))
    assert "at iteration 3 (superposition phase" in tp1.stdout, tail(tp1.stdout)
    tr3, _ = check_tst_run(tp1, first=4)
    assert rel_diff(tr3[4]["loss"], tr[4]["loss"]) <= 1e-5, (tr3[4]["loss"], tr[4]["loss"])
    for it in range(4, TRAIN_ITERS + 1):
        assert rel_diff(tr3[it]["loss"], tr[it]["loss"]) <= 1e-4, (it, tr3[it]["loss"], tr[it]["loss"])
        assert tr3[it]["data_tokens"] == tr[it]["data_tokens"], it


def test_sequence_parallel_matches_tp2_and_bf16_trains(ws):
    """--sequence-parallel (TP=2, 2 ranks) gives the TP=2 run's losses through the switch (fp32:
    only the reduction order differs); --bf16 trains through the switch with bf16 weights in its
    checkpoint and losses close to, but not equal to, the fp32 run's."""
    tp2 = tp2_run(ws)
    sp = ws.run("tp2_sp", base_args(ws.data, tensor_model_parallel_size=2, sequence_parallel=True,
                                    metrics_path=ws.path("tp2_sp.jsonl")), nproc=2)
    tr, _ = check_tst_run(tp2)
    tr_sp, ev_sp = check_tst_run(sp, layout="TP=2 PP=1 EP=1 DP=1, sequence parallel)")
    assert "sequence parallel" not in tp2.stdout  # the banner reports megatron's TransformerConfig
    check_learned(ev_sp)
    for it in range(1, TRAIN_ITERS + 1):
        assert rel_diff(tr_sp[it]["loss"], tr[it]["loss"]) <= 1e-4, (it, tr_sp[it]["loss"], tr[it]["loss"])

    fp32, bf16 = ws.run_pair(["fp32_1rank", "bf16_1rank"], [
        base_args(ws.data, metrics_path=ws.path("fp32_1rank.jsonl")),
        base_args(ws.data, bf16=True, save=ws.path("bf16"), metrics_path=ws.path("bf16_1rank.jsonl"))])
    tr32, _ = check_tst_run(fp32)
    tr16, ev16 = check_tst_run(bf16)
    check_learned(ev16)
    first = [rel_diff(tr16[it]["loss"], tr32[it]["loss"]) for it in (1, 2)]
    assert all(0 < d < 2e-2 for d in first), first  # bf16 rounding, not another model
    dtypes = _checkpoint_dtypes(os.path.join(ws.path("bf16"), f"iter_{TRAIN_ITERS:07d}"))
    assert dtypes["embedding.word_embeddings.weight"] == torch.bfloat16, dtypes
    assert dtypes["decoder.layers.self_attention.linear_proj.weight"] == torch.bfloat16, dtypes


def test_bf16_with_learned_positions(ws):
    """megatron-core builds the learned position table in fp32 whatever the params dtype; in a bf16
    run it is bf16 like every other weight (as Megatron-LM's Float16Module makes it), and the run trains."""
    run = ws.run("bf16_learned", base_args(ws.data, bf16=True, position_embedding_type="learned_absolute",
                                           save=ws.path("bf16_learned")))
    _, ev = check_tst_run(run)
    check_learned(ev)
    dtypes = _checkpoint_dtypes(os.path.join(ws.path("bf16_learned"), f"iter_{TRAIN_ITERS:07d}"))
    assert dtypes["embedding.position_embeddings.weight"] == torch.bfloat16, dtypes


def _checkpoint_dtypes(ckpt_dir):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = FileSystemReader(ckpt_dir).read_metadata()
    return {k: v.properties.dtype for k, v in meta.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata) and "optimizer" not in k}


# micro-batch 2: four micro-batches per step, more than the pipeline stages, so the schedules reach
# their steady state (where the interleaved schedule at PP=2 once swapped activations and gradients)
LAYOUTS = {
    "pp2": (dict(pipeline_model_parallel_size=2, micro_batch_size=2), "TP=1 PP=2 EP=1 DP=1"),
    "pp2_interleaved": (dict(pipeline_model_parallel_size=2, num_layers=4, num_layers_per_virtual_pipeline_stage=1,
                             micro_batch_size=2), "TP=1 PP=2 EP=1 DP=1"),
}


def _pp_run(ws, name):
    flags, _ = LAYOUTS[name]
    return ws.run(name, base_args(ws.data, metrics_path=ws.path(f"{name}.jsonl"), save=ws.path(name),
                                  save_interval=6, **flags), nproc=2)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_pipeline_parallel_through_switch(ws, name):
    _, layout = LAYOUTS[name]
    _, ev = check_tst_run(_pp_run(ws, name), layout=layout)
    check_learned(ev)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_pipeline_checkpoint_resumes_without_pipeline(ws, name):
    """A PP=2 checkpoint (interleaved: two model chunks per stage) taken after the switch resumes
    on one rank with PP=1 and continues with the same losses (fp32 tolerance)."""
    flags, _ = LAYOUTS[name]
    tr, _ = check_tst_run(_pp_run(ws, name))
    load = copy_checkpoint(ws.path(name), 6, ws.path(f"{name}_at6"))
    one = ws.run(f"{name}_resumed_pp1", base_args(ws.data, load=load, metrics_path=ws.path(f"{name}_pp1.jsonl"),
                                                  num_layers=flags.get("num_layers", 2)))
    assert "TP=1 PP=1 EP=1 DP=1" in one.stdout and "at iteration 6" in one.stdout, tail(one.stdout)
    tr1, _ = check_tst_run(one, first=7)
    for it in range(7, TRAIN_ITERS + 1):
        assert rel_diff(tr1[it]["loss"], tr[it]["loss"]) <= 1e-4, (it, tr1[it]["loss"], tr[it]["loss"])


@pytest.mark.parametrize("dispatcher", ["allgather", "alltoall"])
def test_moe_expert_parallel_through_switch(ws, dispatcher):
    res = moe_run(ws, dispatcher)
    tr, ev = check_tst_run(res, layout="TP=1 PP=1 EP=2 DP=2")
    check_learned(ev)
    if dispatcher == "alltoall":
        # the two token dispatchers route the same tokens to the same experts: same losses
        other, _ = check_tst_run(moe_run(ws, "allgather"))
        for it in tr:
            assert rel_diff(tr[it]["loss"], other[it]["loss"]) <= 1e-5, (it, tr[it]["loss"], other[it]["loss"])


def test_moe_ep2_checkpoint_resumes_at_ep1(ws):
    """The EP=2 MoE checkpoint (each rank holding 2 of the 4 experts) in one process with all 4
    experts (EP=1). megatron-core keeps Adam state of an EP > 1 MoE in two chained optimizers and
    cannot re-shard it into one: the resume is refused before loading, naming --no-load-optim.
    With --no-load-optim the experts are re-sharded: the first step's loss (the forward on the
    loaded weights) equals the EP=2 run's at that iteration, at the same data position and LR."""
    res = moe_run(ws, "allgather")
    tr, _ = check_tst_run(res, layout="TP=1 PP=1 EP=2 DP=2")
    load = copy_checkpoint(ws.path("moe_allgather"), 6, ws.path("moe_at6_ep1"))
    flags = dict(MOE_FLAGS, **MOE_LOSS_FLAGS, expert_model_parallel_size=1)
    refused = ws.run("moe_ep1_refused", base_args(ws.data, load=load, metrics_path=ws.path("moe_ep1_refused.jsonl"),
                                                  **flags), nproc=1)
    assert refused.returncode != 0, tail(refused.stdout)
    assert "optimizer state is split into 2 part(s) and this run's into 1" in refused.stdout, tail(refused.stdout)
    assert "--no-load-optim" in refused.stdout and "Traceback" not in refused.stdout

    one = ws.run("moe_ep1_resumed", base_args(ws.data, load=load, metrics_path=ws.path("moe_ep1_resumed.jsonl"),
                                              no_load_optim=True, **flags), nproc=1)
    assert_ok(one, "EP=2 -> EP=1 resume with --no-load-optim")
    assert "at iteration 6 (recovery phase" in one.stdout and "EP=1 DP=1" in one.stdout, tail(one.stdout)
    tr1, _ = check_tst_run(one, first=7)
    assert tr1[7]["data_tokens"] == tr[7]["data_tokens"] and tr1[7]["lr"] == tr[7]["lr"]
    assert rel_diff(tr1[7]["loss"], tr[7]["loss"]) <= 1e-5, (tr1[7]["loss"], tr[7]["loss"])
    # the router's losses (Megatron-LM's log line): per layer and micro-batch, averaged over the two
    # data-parallel ranks' micro-batches at EP=2 as over the same micro-batches in one process
    for name in ("load_balancing_loss", "z_loss"):
        assert rel_diff(tr1[7][name], tr[7][name]) <= 1e-5, (name, tr1[7][name], tr[7][name])
        assert f" {name}: " in one.stdout and f" {name}: " in res.stdout
    # the normalised switch loss is 1 for perfectly even routing and more otherwise (E = 4 at most)
    assert all(1.0 <= r["load_balancing_loss"] < 4.0 and r["z_loss"] > 0 for r in tr.values())


# ------------------------------------------------------------------------------ determinism and resume
def _same_trajectory(got: dict, ref: dict, iterations, keys=("loss", "grad_norm", "lr", "data_tokens", "phase")):
    for it in iterations:
        for k in keys:
            assert got[it][k] == ref[it][k], f"iteration {it} {k}: {got[it][k]!r} != {ref[it][k]!r}"


def test_same_seed_same_losses(ws):
    a, b = reference_runs(ws)
    tra, eva = check_tst_run(a)
    trb, evb = check_tst_run(b)
    check_learned(eva)
    _same_trajectory(trb, tra, range(1, TRAIN_ITERS + 1))
    assert {k: v["val_lm_loss"] for k, v in evb.items()} == {k: v["val_lm_loss"] for k, v in eva.items()}


def test_resume_before_and_after_switch_matches_uninterrupted(ws):
    """Stop at 3 (superposition) and at 9 (recovery) with --exit-interval, resume each time in a
    fresh process with --load: every logged iteration equals the uninterrupted run."""
    ref, _ = reference_runs(ws)
    ref_tr, ref_ev = check_tst_run(ref)
    chain = ws.path("chain")

    leg1 = assert_ok(chain_first_leg(ws), "leg 1")
    assert "exiting at iteration 3 (--exit-interval)" in leg1.stdout, tail(leg1.stdout)
    assert sorted(train_records(leg1.records)) == [1, 2, 3]

    leg2 = assert_ok(ws.run("chain_2", chain_args(ws, save=chain, load=chain, exit_interval=9)), "leg 2")
    assert "iter_0000003 at iteration 3 (superposition phase" in leg2.stdout, tail(leg2.stdout)
    assert "exiting at iteration 9 (--exit-interval)" in leg2.stdout, tail(leg2.stdout)
    assert f"[TST] phase switch at iteration {SUP_ITERS}:" in leg2.stdout

    leg3 = assert_ok(ws.run("chain_3", chain_args(ws, save=chain, load=chain)), "leg 3")
    assert "iter_0000009 at iteration 9 (recovery phase" in leg3.stdout, tail(leg3.stdout)
    assert "training done: 12 iterations" in leg3.stdout

    # the default metrics file <save>/metrics.jsonl now holds the whole run, each iteration once
    tr, ev = check_tst_run(leg3, console_first=10)
    run_record(leg3.records)
    _same_trajectory(tr, ref_tr, range(1, TRAIN_ITERS + 1))
    assert sorted(ev) == sorted(ref_ev)
    for it in ev:
        assert ev[it]["val_lm_loss"] == ref_ev[it]["val_lm_loss"], it
    with open(os.path.join(chain, "latest_checkpointed_iteration.txt")) as f:
        assert f.read().strip() == "12"


# ------------------------------------------------------------------------------ the ablation modes
def test_input_and_output_modes_through_switch(ws):
    """--tst-mode input (bag input, next-token target) and output (token input, next-bag target):
    each trains through the switch with the batch layout its phase needs (the trainer checks it
    every step), its loss labelled by its target, and learns."""
    names = ["mode_input", "mode_output"]
    runs = ws.run_pair(names, [base_args(ws.data, tst_mode=m, metrics_path=ws.path(f"mode_{m}.jsonl"))
                               for m in ("input", "output")])
    for name, res in zip(names, runs):
        assert_ok(res, name)
        assert f"[TST] phase switch at iteration {SUP_ITERS}:" in res.stdout, tail(res.stdout)
        tr, ev = train_records(res.records), eval_records(res.records)
        assert sorted(tr) == list(range(1, TRAIN_ITERS + 1))
        previous = 0
        for it, r in sorted(tr.items()):
            sup = it <= SUP_ITERS
            assert r["phase"] == ("superposition" if sup else "recovery")
            # the multi-hot loss only where the target is a bag (output mode's superposition phase)
            assert r["loss_kind"] == ("mce" if sup and name == "mode_output" else "lm"), (name, it)
            # bags of s data tokens per position only where the input is a bag (input mode)
            per_sample = SEQ * (BAG if sup and name == "mode_input" else 1)
            assert r["data_tokens"] - previous == GBS * per_sample, (name, it)
            previous = r["data_tokens"]
            assert math.isfinite(r["loss"]) and r["loss"] > 0
        # the superposition-layout validation loss up to the switch, named by its target
        key = "val_bag_input_lm_loss" if name == "mode_input" else "val_mce_loss"
        for it, e in ev.items():
            assert (key in e) == (it <= SUP_ITERS) and ("val_mce_loss" in e) == (key in e and name == "mode_output")
        check_learned(ev)


# ------------------------------------------------------------------------------ TST off
def test_tst_off_is_a_plain_run(ws):
    """No TST flags and --tst-bag-size 1 (even with superposition iterations asked for) are the
    same plain next-token run: one phase, L data tokens per sample, no multi-hot loss."""
    iters = PLAIN_FLAGS["train_iters"]
    plain, bag1 = ws.run_pair(["plain", "bag1"], [
        plain_args(ws, "plain"), plain_args(ws, "bag1", tst_bag_size=1, tst_superposition_iters=3)])
    trs = []
    for res in (plain, bag1):
        assert_ok(res)
        assert "phase switch" not in res.stdout and "> TST:" not in res.stdout
        assert "phase: superposition" not in res.stdout and "mce loss" not in res.stdout
        tr, ev = train_records(res.records), eval_records(res.records)
        assert sorted(tr) == list(range(1, iters + 1))
        for it, r in tr.items():
            assert r["phase"] == "recovery" and r["loss_kind"] == "lm"
            assert r["data_tokens"] == r["positions"] == it * GBS * SEQ
            assert math.isfinite(r["loss"])
        assert sorted(ev) == [0, iters] and all("val_mce_loss" not in e for e in ev.values())
        assert ev[iters]["val_lm_loss"] < ev[0]["val_lm_loss"]
        rr = run_record(res.records)
        assert rr["superposition_iters"] == 0 and rr["tst_bag_size"] == 1
        trs.append(tr)
    _same_trajectory(trs[1], trs[0], range(1, iters + 1), keys=("loss", "grad_norm", "lr", "data_tokens"))


# ------------------------------------------------------------------------------ distributed optimizer
def test_distributed_optimizer_dp2_save_and_resume(ws, tmp_path):
    """--use-distributed-optimizer over DP=2: trains through the switch, saves (iteration 6, in
    the recovery phase) and a fresh 2-rank process resumes with identical losses. The run saves
    fully parallel (the default: both ranks write shards of the replicated tensors), the resume
    loads fully parallel (--ckpt-fully-parallel-load) and saves without (only rank 0 writes them):
    the two iteration-12 checkpoints hold the same tensors."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    full = distopt_run(ws)
    tr, ev = check_tst_run(full, layout="TP=1 PP=1 EP=1 DP=2")
    check_learned(ev)
    shapes = checkpoint_model_tensors(os.path.join(ws.path("distopt"), "iter_0000006"))
    assert "decoder.final_layernorm.weight" in shapes

    load = copy_checkpoint(ws.path("distopt"), 6, ws.path("distopt_at6"))
    resumed = ws.run("distopt_resumed", base_args(ws.data, load=load, save=ws.path("distopt_resumed"),
                                                  save_interval=6, metrics_path=ws.path("distopt_resumed.jsonl"),
                                                  ckpt_fully_parallel_load=True, no_ckpt_fully_parallel_save=True,
                                                  **DISTOPT_FLAGS), nproc=2)
    assert_ok(resumed, "distributed-optimizer resume")
    assert "at iteration 6 (recovery phase" in resumed.stdout, tail(resumed.stdout)
    tr2, ev2 = check_tst_run(resumed, first=7)
    _same_trajectory(tr2, tr, range(7, TRAIN_ITERS + 1))
    assert ev2[TRAIN_ITERS]["val_lm_loss"] == ev[TRAIN_ITERS]["val_lm_loss"]
    # the resumed optimizer saves again (its Adam step counts agree across parameters)
    assert os.path.isfile(os.path.join(ws.path("distopt_resumed"), "iter_0000012", "tst_meta.json"))
    dirs = [os.path.join(ws.path(name), "iter_0000012") for name in ("distopt", "distopt_resumed")]
    writers = [{f.split("_")[2] for f in os.listdir(d) if f.endswith(".distcp")} for d in dirs]
    assert writers == [{"0", "1"}, {"0"}], writers  # files __<rank>_<n>.distcp
    saved = []
    for i, d in enumerate(dirs):
        dcp_to_torch_save(d, str(tmp_path / f"{i}.pt"))
        saved.append({k: v for k, v in torch.load(tmp_path / f"{i}.pt", weights_only=False).items()
                      if torch.is_tensor(v)})
    assert sorted(saved[0]) == sorted(saved[1]) and all(torch.equal(saved[0][k], saved[1][k]) for k in saved[0])


def test_distributed_optimizer_checkpoint_resumes_at_dp1(ws):
    """The DP=2 distributed-optimizer checkpoint (its Adam state sharded over 2 ranks) resumes in
    ONE process (DP=1, the optimizer state re-sharded on load): same data, same LR, and per-iteration
    losses equal the DP=2 run's to fp32 reduction-order tolerance (DP=2 averages two ranks'
    gradients; DP=1 accumulates two micro-batches)."""
    full = distopt_run(ws)
    assert_ok(full)
    tr = train_records(full.records)
    load = copy_checkpoint(ws.path("distopt"), 6, ws.path("distopt_at6_dp1"))
    res = ws.run("distopt_dp1", base_args(ws.data, load=load, metrics_path=ws.path("distopt_dp1.jsonl"),
                                          **DISTOPT_FLAGS), nproc=1)
    assert_ok(res, "DP=2 -> DP=1 resume")
    assert "at iteration 6 (recovery phase" in res.stdout and "DP=1" in res.stdout, tail(res.stdout)
    tr1, _ = check_tst_run(res, first=7)
    for it in range(7, TRAIN_ITERS + 1):
        assert tr1[it]["data_tokens"] == tr[it]["data_tokens"] and tr1[it]["lr"] == tr[it]["lr"], it
        assert rel_diff(tr1[it]["loss"], tr[it]["loss"]) < 1e-5, (it, tr1[it]["loss"], tr[it]["loss"])
        assert rel_diff(tr1[it]["grad_norm"], tr[it]["grad_norm"]) < 1e-4, it
