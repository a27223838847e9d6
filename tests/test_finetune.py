"""--finetune (a new run from a checkpoint's weights) and --no-save-optim / --no-save-rng (weights-only
checkpoints), Megatron-LM's flags.

A plain baseline run A saves its final weights; run B fine-tunes from them with TST (s=4) and the
same schedule flags. B's validation before its first step is A's final validation (same weights,
same validation samples); B's iterations, LR schedule and data stream are those of a fresh run C
with B's flags, from iteration 1; only the losses differ (other starting weights). On the same A:
--skip-train evaluates A's weights and trains nothing; --pretrained-checkpoint started twice (a
requeued job) is B exactly.
"""
from __future__ import annotations

import math
import os
import shutil

import pytest

from trainer_utils import (BAG, GBS, SEQ, SUP_ITERS, TRAIN_ITERS, assert_ok, base_args, eval_records, make_data,
                           run_many, run_trainer, train_records)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


def test_finetune_starts_a_new_run_from_the_weights(tmp_path):
    from tst_megatron import checkpointing as ckpt

    prefix = make_data(str(tmp_path / "data"), num_docs=400)
    a_save, b_save = tmp_path / "a", tmp_path / "b"
    a = assert_ok(run_trainer(base_args(prefix, tst=False, save=a_save)), "A (baseline)")
    before = sorted(os.listdir(a_save))
    d_save = tmp_path / "d"
    job = base_args(prefix, load=d_save, save=d_save, pretrained_checkpoint=a_save)
    shutil.copy(a_save / "metrics.jsonl", tmp_path / "a_curve.jsonl")  # --skip-train evaluates into A's curve
    # the runs that only need A, side by side (each launch is mostly imports on one core)
    b, c, ev, first = (assert_ok(r) for r in run_many([
        base_args(prefix, load=a_save, save=b_save, finetune=True),
        base_args(prefix, metrics_path=tmp_path / "c.jsonl"),
        base_args(prefix, tst=False, load=a_save, skip_train=True, metrics_path=tmp_path / "a_curve.jsonl"),
        job + ["--exit-interval", "3"]]))
    assert f"> fine-tuning from the weights of {a_save}/iter_{TRAIN_ITERS:07d}" in b.stdout

    assert eval_records(b.records)[0]["val_lm_loss"] == eval_records(a.records)[TRAIN_ITERS]["val_lm_loss"]
    got, fresh = train_records(b.records), train_records(c.records)
    assert sorted(got) == sorted(fresh) == list(range(1, TRAIN_ITERS + 1))
    for it in fresh:
        for key in ("phase", "lr", "data_tokens", "consumed_samples"):
            assert got[it][key] == fresh[it][key], (it, key)
    assert got[1]["phase"] == "superposition" and got[1]["data_tokens"] == GBS * SEQ * BAG
    assert got[SUP_ITERS + 1]["phase"] == "recovery"
    # the trained weights predict the recovery data better than a fresh start
    assert got[SUP_ITERS + 1]["loss"] < fresh[SUP_ITERS + 1]["loss"] and math.isfinite(got[TRAIN_ITERS]["loss"])
    meta = ckpt.read_meta(str(b_save / f"iter_{TRAIN_ITERS:07d}"))
    assert meta["finetuned_from"] == f"{a_save}/iter_{TRAIN_ITERS:07d}" and meta["consumed_samples"] == TRAIN_ITERS * GBS
    # resumed later (without --finetune, as a requeued job would): the provenance stays
    more, second = (assert_ok(r) for r in run_many([
        base_args(prefix, load=b_save, save=b_save, train_iters=TRAIN_ITERS + 2, override_checkpoint_args=True),
        job]))
    assert f"resumed from {b_save}/iter_{TRAIN_ITERS:07d}" in more.stdout
    assert ckpt.read_meta(str(b_save / f"iter_{TRAIN_ITERS + 2:07d}"))["finetuned_from"] == meta["finetuned_from"]

    # --skip-train (Megatron-LM's evaluation-only run) on A's final checkpoint: A's final validation
    # loss again (same weights, same validation samples), no training step, nothing written to A;
    # evaluated into (a copy of) A's metrics file, A's curve is kept and its last evaluation
    # replaced, not logged twice (eval_records asserts that)
    assert eval_records(ev.records)[TRAIN_ITERS]["val_lm_loss"] == eval_records(a.records)[TRAIN_ITERS]["val_lm_loss"]
    assert sorted(eval_records(ev.records)) == sorted(eval_records(a.records))
    assert train_records(ev.records) == train_records(a.records) and sorted(os.listdir(a_save)) == before
    assert f"> --skip-train: evaluated the weights of iteration {TRAIN_ITERS} ({a_save}/iter_{TRAIN_ITERS:07d})" in ev.stdout

    # --pretrained-checkpoint, the requeue-safe form: the same job command twice (--load = --save);
    # the first start fine-tunes from A and is stopped at 3, the second resumes its own checkpoint.
    # Together they are run B exactly.
    assert f"> no checkpoint in --load {d_save}: fine-tuning from --pretrained-checkpoint {a_save}" in first.stdout
    assert f"> fine-tuning from the weights of {a_save}/iter_{TRAIN_ITERS:07d}" in first.stdout
    assert f"resumed from {d_save}/iter_0000003" in second.stdout and "fine-tuning" not in second.stdout
    legs = {**train_records(first.records), **train_records(second.records)}
    assert sorted(legs) == list(range(1, TRAIN_ITERS + 1))
    for it in got:
        assert (legs[it]["loss"], legs[it]["lr"]) == (got[it]["loss"], got[it]["lr"]), it
    assert ckpt.read_meta(str(d_save / f"iter_{TRAIN_ITERS:07d}"))["finetuned_from"] == meta["finetuned_from"]


@pytest.mark.parametrize("over, message", [
    (dict(load=None), "--finetune needs --load DIR (the checkpoint whose weights the new run starts from)"),
    (dict(save="LOAD"), "--finetune starts a new run from the weights in --load LOAD: give it another --save directory"),
    (dict(pretrained_checkpoint="LOAD"), "give one of --finetune (fine-tune from --load, every start) and "
                                         "--pretrained-checkpoint"),
    (dict(finetune=False, pretrained_checkpoint="SAVE"),
     "--pretrained-checkpoint SAVE: give the fine-tuning run another --save directory"),
    (dict(finetune=False, pretrained_checkpoint="nowhere"), "--pretrained-checkpoint nowhere: directory does not exist"),
])
def test_finetune_refusals(tmp_path, over, message):
    from tst_megatron.arguments import parse_args, validate

    load, save = tmp_path / "load", tmp_path / "save"
    load.mkdir()
    save.mkdir()
    kw = dict(load=load, save=save, finetune=True)
    kw.update({k: {"LOAD": load, "SAVE": save}.get(v, v) for k, v in over.items()})
    with pytest.raises(SystemExit) as exc:
        validate(parse_args(base_args("x", **kw)), 1)
    want = message.replace("LOAD", str(load)).replace("SAVE", str(save))
    assert str(exc.value.code).startswith("error: " + want), exc.value.code


def test_no_save_optim_and_rng_checkpoints_resume_with_fresh_state(tmp_path):
    """--no-save-optim --no-save-rng: the checkpoint holds weights and progress only; resuming from it
    says so, starts Adam afresh and keeps the LR schedule: its first step's loss (computed before
    the update, from weights and data) is the uninterrupted run's. A step skipped before the save
    (non-finite, --skip-nonfinite-steps) did not advance the schedule, and the resume knows it."""
    from torch.distributed.checkpoint import FileSystemReader

    from tst_megatron import checkpointing as ckpt

    prefix = make_data(str(tmp_path / "data"), num_docs=400)
    full, part = tmp_path / "full", tmp_path / "part"
    skip = {"inject_nonfinite_at": 2, "skip_nonfinite_steps": 1}
    ref, first = (assert_ok(r) for r in run_many([
        base_args(prefix, metrics_path=tmp_path / "ref.jsonl", save=full, save_interval=6, **skip),
        base_args(prefix, save=part, exit_interval=6, no_save_optim=True, no_save_rng=True, **skip)]))
    keys = set(FileSystemReader(str(part / "iter_0000006")).read_metadata().state_dict_metadata)
    full_keys = set(FileSystemReader(str(full / "iter_0000006")).read_metadata().state_dict_metadata)
    assert not [k for k in keys if "optimizer" in k or "rng" in k]
    assert [k for k in full_keys if "optimizer" in k] and [k for k in full_keys if "rng" in k]
    meta = ckpt.read_meta(str(part / "iter_0000006"))
    assert (meta["optimizer_state"], meta["rng_state"]) == (False, False)

    resumed = assert_ok(run_trainer(base_args(prefix, load=part, save=part, skip_nonfinite_steps=1)))
    assert "carries no optimizer state (imported, or saved with --no-save-optim)" in resumed.stdout
    got, want = train_records(resumed.records), train_records(ref.records)
    assert got[7]["loss"] == want[7]["loss"] and got[7]["lr"] == want[7]["lr"]
    assert got[8]["loss"] != want[8]["loss"]  # Adam restarted


@pytest.fixture(scope="session")
def ws(tmp_path_factory):
    from trainer_utils import workspace

    return workspace(tmp_path_factory)


def test_use_checkpoint_args(ws, tmp_path):
    """--use-checkpoint-args (Megatron-LM's): an evaluation-only run given nothing but data, --load and
    batch flags takes the architecture and tokenizer from the shared EP=2 MoE run's checkpoint
    (4 experts, no linear biases, L=32; loaded in one process) and reproduces that run's final
    validation loss. A typed flag equal to a derived default passes, a typed sequence length is
    kept, a fine-tuning job's first start reads its --pretrained-checkpoint; a typed flag that
    contradicts the checkpoint, a missing --load and an empty one are refused."""
    import trainer_utils as tu

    from tst_megatron.arguments import parse_args

    trained = assert_ok(tu.moe_run(ws, "allgather"), "EP=2 MoE run")
    ck = ws.path("moe_allgather")
    bare = ["--data-path", ws.data, "--split", "90,10,0", "--micro-batch-size", str(tu.MBS), "--global-batch-size",
            str(tu.GBS), "--eval-iters", "2", "--load", ck, "--use-checkpoint-args"]
    cfg = parse_args(bare)
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_experts, cfg.model.disable_bias_linear,
            cfg.model.seq_length, cfg.model.vocab_size, cfg.data.tokenizer_type) == \
        (2, 64, 4, True, tu.SEQ, 256, "NullTokenizer")
    ev = assert_ok(run_trainer(bare + ["--skip-train", "--metrics-path", str(tmp_path / "eval.jsonl")]), "eval")
    assert "> --use-checkpoint-args: the model's architecture and tokenizer flags from" in ev.stdout
    final = eval_records(trained.records)[TRAIN_ITERS]["val_lm_loss"]
    assert eval_records(ev.records)[TRAIN_ITERS]["val_lm_loss"] == pytest.approx(final, rel=1e-5)

    assert parse_args(bare + ["--ffn-hidden-size", "256"]).model.num_experts == 4  # 4 x hidden, the default
    assert parse_args(bare + ["--seq-length", "16"]).model.seq_length == 16  # a fine-tuning choice
    # the checkpoint's MoE layers (every layer), typed either way: the same pattern, accepted, and
    # spelt as the checkpoint did (1: megatron-core's stacked layout, which [1,1] would not load)
    assert parse_args(bare + ["--moe-layer-freq", "1"]).model.moe_layer_freq == 1
    assert parse_args(bare + ["--moe-layer-freq", "[1,1]"]).model.moe_layer_freq == 1
    job = bare[:-3] + ["--load", str(tmp_path / "job"), "--pretrained-checkpoint", ck, "--use-checkpoint-args"]
    assert parse_args(job).model.num_experts == 4
    for argv, message in ((bare + ["--hidden-size", "32"], "--hidden-size 32 contradicts the checkpoint's 64"),
                          (bare + ["--num-experts", "8"], "--num-experts 8 contradicts the checkpoint's 4"),
                          (bare + ["--moe-layer-freq", "2"], "--moe-layer-freq 2 contradicts the checkpoint's [1, 1]"),
                          (bare[:-3] + ["--use-checkpoint-args"], "--use-checkpoint-args reads the model's flags "
                                                                  "from the checkpoint it loads: give --load"),
                          (bare[:-3] + ["--load", str(tmp_path), "--use-checkpoint-args"],
                           f"--use-checkpoint-args: {tmp_path} hold(s) no checkpoint")):
        with pytest.raises(SystemExit) as exc:
            parse_args(argv)
        assert str(exc.value.code).startswith("error: " + message), exc.value.code
