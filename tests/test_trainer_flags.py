"""pretrain_tst.py's flags, one test per group, judged by what the run does (checkpoint contents,
metrics records, console) against values computed here independently of the trainer.

Groups: model shape, MoE, parallel layout, LR schedule, checkpoint loading (--no-load-optim,
--no-load-rng); plus --help, --print-model-size and the refusal of unsupported flags.
"""
from __future__ import annotations

import math
import os
import re

import pytest

from trainer_utils import (DISTOPT_FLAGS, PLAIN_FLAGS, TRAIN_ITERS, assert_ok, base_args, chain_args, checkpoint_at_3,
                           checkpoint_model_tensors, distopt_run, eval_records, make_data, moe_run, numel, plain_args,
                           reference_runs, run_record, run_trainer, tail, tp2_run, train_records, workspace)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


@pytest.fixture(scope="session")
def ws(tmp_path_factory):
    return workspace(tmp_path_factory)


# ------------------------------------------------------------------------------ independent counts
def expected_tensors(h=64, layers=2, heads=4, vocab=256, tp=1, ffn=None, swiglu=False, groups=None, kv=None,
                     bias=True, norm="RMSNorm", qk_norm=False, untie=False, learned_pos=None,
                     experts=None, topk=2, moe_ffn=None, shared=None, pre_softmax=False, divisible=128):
    """Parameter tensors of a GPT with these settings: name -> (numel, active numel per token).

    Written from the architecture, not from the trainer: NullTokenizer's vocabulary is
    `--vocab-size` + 1 (EOD), padded to a multiple of --make-vocab-size-divisible-by (128) x TP;
    SwiGLU's default FFN width is Megatron-LM's int(4h*2/3 / 64) * 64; fc1 of a gated MLP holds
    the gate and the up projection.
    """
    padded = math.ceil((vocab + 1) / (divisible * tp)) * divisible * tp
    kv = kv or h // heads
    groups = groups or heads
    ffn = ffn or (int(4 * h * 2 / 3 / 64) * 64 if swiglu else 4 * h)
    nb = 2 if norm == "LayerNorm" else 1  # weight (+ bias)
    b = 1 if bias else 0
    gate = 2 if swiglu else 1

    def mlp(width):
        return gate * width * h + b * gate * width + width * h + b * h

    t = {"word_embeddings": (padded * h,) * 2}
    if learned_pos:
        t["position_embeddings"] = (learned_pos * h,) * 2
    for i in range(layers):
        t[f"{i}.input_norm"] = (nb * h,) * 2
        t[f"{i}.qkv"] = ((heads + 2 * groups) * kv * h + b * (heads + 2 * groups) * kv,) * 2
        t[f"{i}.proj"] = (heads * kv * h + b * h,) * 2
        if qk_norm:
            t[f"{i}.qk_norms"] = (2 * nb * kv,) * 2
        t[f"{i}.mlp_norm"] = (nb * h,) * 2
        if experts:
            t[f"{i}.router"] = (experts * h,) * 2
            one = mlp(moe_ffn or ffn)
            t[f"{i}.experts"] = (experts * one, topk * one)
            if shared:
                t[f"{i}.shared_expert"] = (mlp(shared),) * 2
        else:
            t[f"{i}.mlp"] = (mlp(ffn),) * 2
    t["final_norm"] = (nb * h,) * 2
    if untie:
        t["output_layer"] = (padded * h,) * 2
    return t


def expected_counts(**kw):
    t = expected_tensors(**kw)
    return sum(v[0] for v in t.values()), sum(v[1] for v in t.values())


def model_size_flags(kw) -> list:
    """The command-line flags of an `expected_tensors` configuration."""
    f = ["--num-layers", str(kw.get("layers", 2)), "--hidden-size", str(kw.get("h", 64)),
         "--num-attention-heads", str(kw.get("heads", 4)), "--vocab-size", str(kw.get("vocab", 256)),
         "--tensor-model-parallel-size", str(kw.get("tp", 1))]
    opt = {"ffn": "--ffn-hidden-size", "kv": "--kv-channels", "norm": "--normalization",
           "learned_pos": "--max-position-embeddings", "experts": "--num-experts", "topk": "--moe-router-topk",
           "moe_ffn": "--moe-ffn-hidden-size", "shared": "--moe-shared-expert-intermediate-size",
           "divisible": "--make-vocab-size-divisible-by"}
    for k, flag in opt.items():
        if kw.get(k) is not None:
            f += [flag, str(kw[k])]
    if kw.get("groups"):
        f += ["--group-query-attention", "--num-query-groups", str(kw["groups"])]
    for k, flag in (("swiglu", "--swiglu"), ("qk_norm", "--qk-layernorm"),
                    ("untie", "--untie-embeddings-and-output-weights"), ("pre_softmax", "--moe-router-pre-softmax")):
        if kw.get(k):
            f.append(flag)
    if kw.get("bias") is False:
        f.append("--disable-bias-linear")
    if kw.get("learned_pos"):
        f += ["--position-embedding-type", "learned_absolute"]
    return f


def parse_model_size(text: str):
    m = re.search(r"total ([\d,]+) .*active per token ([\d,]+)", text)
    assert m, f"no parameter counts printed:\n{text}"
    return int(m.group(1).replace(",", "")), int(m.group(2).replace(",", ""))


SHAPES = {
    "default": {},
    "swiglu": dict(swiglu=True),
    "swiglu_ffn_gqa_nobias": dict(swiglu=True, ffn=96, groups=2, bias=False),
    "untied_layernorm_qknorm_kv_learnedpos": dict(untie=True, norm="LayerNorm", qk_norm=True, kv=32, learned_pos=64),
    "deeper_wider": dict(layers=3, h=128, heads=8),
    "tp2_vocab_padding": dict(tp=2),
    "vocab_divisible_48": dict(vocab=300, divisible=48),  # 301 ids -> 336 rows (not 384)
    "moe": dict(experts=4, topk=2, bias=False),
    # top-1 needs the pre-softmax router and shared experts need no bias (megatron-core's rules)
    "moe_ffn_shared_top1": dict(experts=8, topk=1, moe_ffn=48, shared=32, swiglu=True, bias=False, pre_softmax=True),
}


# ------------------------------------------------------------------------------ CLI basics
def test_help_lists_flag_groups():
    res = run_trainer(["--help"])
    assert res.returncode == 0, tail(res.stdout)
    for text in ("usage: pretrain_tst.py", "model shape", "mixture of experts", "parallelism", "checkpointing",
                 "--tst-bag-size", "--tst-superposition-ratio", "--tensor-model-parallel-size",
                 "--lr-decay-style", "--no-load-optim", "--print-model-size"):
        assert text in res.stdout, f"--help lacks {text!r}"


def test_help_explains_every_flag():
    """--help is readable: every flag a user can type has a line of help; defaults are shown."""
    import argparse

    from tst_megatron.arguments import build_parser

    parser = build_parser()
    bare = [a.option_strings[0] for a in parser._actions
            if a.option_strings and a.help != argparse.SUPPRESS and not (a.help or "").strip()]
    assert not bare, f"flags without help text: {bare}"
    text = " ".join(parser.format_help().split())  # undo the line wrapping
    assert "(default: 1234)" in text and "(default: cosine)" in text and "(default: None)" not in text


@pytest.mark.parametrize("flag", [["--fp8-format", "hybrid"], ["--foo", "1"]])
def test_unsupported_flags_rejected(ws, flag):
    res = run_trainer(base_args(ws.data, metrics_path=os.path.join(str(ws.root), "never.jsonl")) + flag)
    assert res.returncode != 0
    assert "unrecognized arguments" in res.stdout and flag[0] in res.stdout, tail(res.stdout)
    assert "does not implement" in res.stdout and "--help" in res.stdout
    assert "Traceback" not in res.stdout and "iteration" not in res.stdout
    assert not os.path.exists(os.path.join(str(ws.root), "never.jsonl"))


@pytest.mark.parametrize("argv, message", [
    (["--lr-decay-style", "bogus"], "invalid choice: 'bogus'"),
    (["--tst-bag-size", "0"], "--tst-bag-size must be an integer >= 1"),
    (["--tst-superposition-ratio", "1.0"], "--tst-superposition-ratio must be in [0, 1)"),
    (["--ckpt-format", "torch"], "invalid choice: 'torch'"),
])
def test_bad_values_rejected(argv, message, capsys):
    from tst_megatron.arguments import parse_args

    with pytest.raises(SystemExit) as exc:
        parse_args(["--vocab-size", "256"] + argv)
    text = str(exc.value.code) + capsys.readouterr().err
    assert exc.value.code != 0 and message in text, text


@pytest.mark.parametrize("name", list(SHAPES))
def test_print_model_size_matches_independent_count(name, capsys):
    from tst_megatron.trainer import main

    assert main(model_size_flags(SHAPES[name]) + ["--print-model-size"]) == 0
    total, active = parse_model_size(capsys.readouterr().out)
    assert (total, active) == expected_counts(**SHAPES[name])
    if SHAPES[name].get("experts"):
        assert active < total
    else:
        assert active == total


def test_print_model_size_command_line():
    """As a command: total and active parameters printed, nothing trained, exit 0."""
    kw = SHAPES["moe_ffn_shared_top1"]
    res = run_trainer(model_size_flags(kw) + ["--print-model-size"])
    assert res.returncode == 0, tail(res.stdout)
    assert parse_model_size(res.stdout) == expected_counts(**kw)
    assert "iteration" not in res.stdout
    # the shape flags do change the printed count
    assert len({expected_counts(**k) for k in SHAPES.values()}) == len(SHAPES)


# ------------------------------------------------------------------------------ model shape
def test_model_shape_flags_reach_the_model(ws):
    """A run with shape flags saves a checkpoint whose tensors have exactly the expected shapes;
    the parameter count the run reports equals the checkpoint's."""
    kw = dict(swiglu=True, ffn=96, groups=2, bias=False, untie=True, norm="LayerNorm", qk_norm=True, kv=32,
              learned_pos=64)
    args = base_args(ws.data, tst=False, train_iters=2, eval_interval=None, eval_iters=1, save=ws.path("shape"))
    res = ws.run("shape", args + model_size_flags(kw)[2:])  # keep base layers/hidden/heads/vocab
    assert_ok(res)
    shapes = checkpoint_model_tensors(os.path.join(ws.path("shape"), "iter_0000002"))
    h, L, v = 64, 2, 384
    want = {
        "embedding.word_embeddings.weight": (v, h),
        "embedding.position_embeddings.weight": (64, h),
        "decoder.layers.self_attention.linear_qkv.weight": (L, (4 + 2 * 2) * 32, h),  # GQA, kv-channels
        "decoder.layers.self_attention.linear_proj.weight": (L, h, 4 * 32),
        "decoder.layers.self_attention.q_layernorm.weight": (L, 32),
        "decoder.layers.self_attention.k_layernorm.bias": (L, 32),
        "decoder.layers.mlp.linear_fc1.weight": (L, 2 * 96, h),  # SwiGLU: gate + up
        "decoder.layers.mlp.linear_fc2.weight": (L, h, 96),
        "decoder.final_layernorm.bias": (h,),  # LayerNorm
        "output_layer.weight": (v, h),  # untied
    }
    for key, shape in want.items():
        assert shapes.get(key) == shape, f"{key}: {shapes.get(key)} != {shape}\n{shapes}"
    assert not [k for k in shapes if k.endswith(("linear_qkv.bias", "linear_proj.bias", "fc1.bias", "fc2.bias"))]
    total, _ = expected_counts(**kw)
    assert sum(numel(s) for s in shapes.values()) == total
    assert run_record(res.records)["parameters"] == total


# ------------------------------------------------------------------------------ MoE
def test_moe_flags_reach_the_model(ws):
    res = moe_run(ws, "allgather")
    assert_ok(res)
    shapes = checkpoint_model_tensors(os.path.join(ws.path("moe_allgather"), "iter_0000012"))
    assert shapes["decoder.layers.mlp.router.weight"] == (2, 4, 64)
    assert shapes["decoder.layers.mlp.experts.experts.linear_fc1.weight"] == (2, 4, 256, 64)  # 4 experts, 4h
    assert shapes["decoder.layers.mlp.experts.experts.linear_fc2.weight"] == (2, 4, 64, 256)
    assert not [k for k in shapes if k.endswith("bias")]  # --disable-bias-linear
    total, active = expected_counts(experts=4, topk=2, bias=False)
    assert sum(numel(s) for s in shapes.values()) == total
    rr = run_record(res.records)
    assert (rr["parameters"], rr["active_parameters"]) == (total, active)
    assert "EP=2 DP=2" in res.stdout


# ------------------------------------------------------------------------------ parallel layout
@pytest.mark.parametrize("world, argv, message", [
    (1, ["--tensor-model-parallel-size", "2"], "not divisible by --tensor-model-parallel-size (2)"),
    (2, ["--tensor-model-parallel-size", "2", "--num-attention-heads", "3", "--hidden-size", "63"],
     "--num-attention-heads (3) must be divisible by --tensor-model-parallel-size (2)"),
    (2, ["--pipeline-model-parallel-size", "2", "--num-layers", "3"],
     "--num-layers (3) must be divisible by --pipeline-model-parallel-size (2)"),
    (2, ["--pipeline-model-parallel-size", "2", "--num-layers", "4", "--num-layers-per-virtual-pipeline-stage", "3"],
     "--num-layers-per-virtual-pipeline-stage (3) must divide"),
    (1, ["--num-layers-per-virtual-pipeline-stage", "1"], "needs --pipeline-model-parallel-size > 1"),
    (2, ["--expert-model-parallel-size", "2"], "--expert-model-parallel-size > 1 needs --num-experts"),
    (2, ["--expert-model-parallel-size", "2", "--num-experts", "3"],
     "--num-experts (3) must be divisible by --expert-model-parallel-size (2)"),
    (1, ["--sequence-parallel"], "--sequence-parallel needs --tensor-model-parallel-size > 1"),
    (2, ["--fp16", "--num-experts", "4", "--expert-model-parallel-size", "2", "--global-batch-size", "8"],
     "--fp16 with --expert-model-parallel-size > 1 is not supported"),
    (2, ["--global-batch-size", "4"], "--global-batch-size (4) must be divisible by --micro-batch-size (4) x "
                                      "data-parallel size (2)"),
])
def test_parallel_layout_checked(world, argv, message):
    from tst_megatron.arguments import parse_args, validate

    cfg = parse_args(["--data-path", "x", "--vocab-size", "256", "--micro-batch-size", "4"] + argv)
    with pytest.raises(SystemExit) as exc:
        validate(cfg, world)
    assert message in str(exc.value.code), exc.value.code


@pytest.mark.parametrize("argv, message", [
    (["--num-experts", "4", "--moe-router-topk", "1", "--disable-bias-linear"],
     "--moe-router-topk 1 needs --moe-router-pre-softmax"),
    (["--num-experts", "4", "--moe-shared-expert-intermediate-size", "64"],
     "--moe-shared-expert-intermediate-size needs --disable-bias-linear"),
    (["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", "x.model"],
     "--vocab-size is for --tokenizer-type NullTokenizer only"),
    (["--decoupled-min-lr", "1e-4"], "--decoupled-min-lr needs --decoupled-lr"),
    (["--fp16", "--bf16"], "give one of --fp16 and --bf16"),
    (["--loss-scale", "1024"], "--loss-scale is for --fp16"),
    (["--fp16", "--min-loss-scale", "8", "--initial-loss-scale", "4"],
     "--min-loss-scale (8.0) must not exceed --initial-loss-scale (4.0)"),
    (["--fp16", "--hysteresis", "0"], "--hysteresis must be >= 1 (got 0)"),
    (["--decoupled-lr", "1e-4", "--min-lr", "1e-3"], "--min-lr (0.001) must not exceed --decoupled-lr (0.0001)"),
])
def test_combinations_megatron_core_would_refuse(argv, message):
    """Refused before anything is built (megatron-core would raise deep inside model construction,
    or, for --vocab-size with a tokenizer file, the flag would be silently ignored)."""
    from tst_megatron.arguments import parse_args, validate

    cfg = parse_args(["--data-path", "x", "--vocab-size", "256"] + argv)
    with pytest.raises(SystemExit) as exc:
        validate(cfg, 1)
    assert message in str(exc.value.code), exc.value.code


def test_parallel_layout_defaults():
    """Global batch defaults to micro-batch x DP; a valid layout passes."""
    from tst_megatron.arguments import parse_args, validate

    cfg = parse_args(["--data-path", "x", "--vocab-size", "256", "--micro-batch-size", "3",
                      "--tensor-model-parallel-size", "2"])
    validate(cfg, 4)  # TP=2 x DP=2
    assert cfg.optim.global_batch_size == 3 * 2


# ------------------------------------------------------------------------------ LR schedules
def expected_lr(n, style, lr, min_lr, warmup, decay_iters, wsd_iters=None):
    """LR after n optimizer steps (what a record of iteration n holds, as Megatron-LM logs it):
    linear warmup from 0 over `warmup` steps, then the decay over [warmup, decay_iters]."""
    if warmup and n <= warmup:
        return lr * n / warmup
    if style == "constant":
        return lr
    if n > decay_iters:
        return min_lr
    if style == "WSD":  # stable at lr, then linear to min_lr over the last wsd_iters steps
        start = decay_iters - wsd_iters
        return lr if n <= start else min_lr + (lr - min_lr) * (1 - (n - start) / wsd_iters)
    frac = (n - warmup) / (decay_iters - warmup)
    if style == "linear":
        return min_lr + (lr - min_lr) * (1 - frac)
    assert style == "cosine"
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * frac))


LR_CASES = {  # the schedule flags of each run checked
    # own run: linear decay ending before the run does (--lr-decay-iters 8 of 10), TST switch at 3,
    # and a --decoupled-lr schedule for the embedding/output layer beside it
    "linear_decay_iters_8": dict(train_iters=10, tst_superposition_iters=3, eval_interval=None, eval_iters=1,
                                 lr=3e-3, min_lr=3e-4, lr_warmup_iters=3, lr_decay_style="linear", lr_decay_iters=8,
                                 decoupled_lr=1e-2, decoupled_min_lr=1e-4),
    # shared runs: the plain (TST-off) run, the reference chain run (cosine, warmup 2, min-lr 3e-4,
    # 12 iterations, switch at 4) and the distributed-optimizer run (WSD: decay over the last 4 of 12)
    "constant": dict(PLAIN_FLAGS),
    "cosine": dict(train_iters=TRAIN_ITERS, lr=3e-3, min_lr=3e-4, lr_warmup_iters=2, lr_decay_style="cosine"),
    "WSD_last_4": dict(train_iters=TRAIN_ITERS, lr=3e-3, min_lr=0.0, **DISTOPT_FLAGS),
}


def test_lr_schedules_follow_the_formulas(ws):
    """One schedule over both TST phases (no re-warmup at the switch): the lr of every record
    equals the schedule computed here, for each --lr-decay-style with warmup."""
    linear, plain = ws.run_pair(["lr_linear", "plain"], [
        base_args(ws.data, metrics_path=ws.path("lr_linear.jsonl"), **LR_CASES["linear_decay_iters_8"]),
        plain_args(ws, "plain")])
    results = {"linear_decay_iters_8": linear, "constant": plain}
    results["cosine"] = reference_runs(ws)[0]
    results["WSD_last_4"] = distopt_run(ws)
    seen = {}
    for name, kw in LR_CASES.items():
        res = results[name]
        assert_ok(res, name)
        iters = kw["train_iters"]
        tr = train_records(res.records)
        assert sorted(tr) == list(range(1, iters + 1))
        got = [tr[n]["lr"] for n in range(1, iters + 1)]
        want = [expected_lr(n, kw["lr_decay_style"], kw["lr"], kw["min_lr"], kw["lr_warmup_iters"],
                            kw.get("lr_decay_iters", iters), kw.get("lr_wsd_decay_iters"))
                for n in range(1, iters + 1)]
        for n, (g, w) in enumerate(zip(got, want), start=1):
            assert abs(g - w) <= 1e-9 * kw["lr"], f"{name}: lr at iteration {n}: {g!r}, expected {w!r}"
        if "decoupled_lr" in kw:  # logged beside the lr, same schedule between its own peak and floor
            for n in range(1, iters + 1):
                w = expected_lr(n, kw["lr_decay_style"], kw["decoupled_lr"], kw["decoupled_min_lr"],
                                kw["lr_warmup_iters"], kw.get("lr_decay_iters", iters), None)
                assert abs(tr[n]["decoupled_lr"] - w) <= 1e-9 * kw["decoupled_lr"], (n, tr[n]["decoupled_lr"], w)
            assert "decoupled learning rate:" in res.stdout
        else:
            assert all("decoupled_lr" not in r for r in tr.values())
        assert all(math.isfinite(tr[n]["loss"]) for n in tr)
        seen[name] = tuple(got)
    assert len(set(seen.values())) == len(LR_CASES)  # the styles really differ


def test_calculate_per_token_loss_weighs_every_position_of_the_global_batch(tmp_path):
    """--calculate-per-token-loss: a step's loss (and its gradient) is the mean over every trained
    position of the global batch. Reference: the default loss of ONE micro-batch holding the whole
    global batch, which is that mean by definition. The per-token run splits the same batch into
    2 micro-batches on each of 2 data-parallel ranks and must train identically, through both TST
    phases; the default loss at that split (a mean of micro-batch means) must not, because
    --eod-mask-loss on short documents leaves the micro-batches unequal counts."""
    data = make_data(str(tmp_path / "short_docs"), num_docs=300, doc_lengths=(2, 12), eod=256)  # NullTokenizer's EOD
    # one validation batch: over several, per-token weighs every position of the evaluation alike,
    # the reference every batch alike
    common = dict(metrics_path=None, train_iters=4, tst_superposition_iters=2, eval_interval=2, eval_iters=1,
                  eod_mask_loss=True, global_batch_size=8)
    runs = {}
    for name, nproc, extra in (("whole_batch", 1, dict(micro_batch_size=8)),
                               ("per_token", 2, dict(micro_batch_size=2, calculate_per_token_loss=True)),
                               ("mean_of_means", 2, dict(micro_batch_size=2))):
        args = base_args(data, **{**common, **extra, "metrics_path": str(tmp_path / f"{name}.jsonl")})
        runs[name] = assert_ok(run_trainer(args, nproc=nproc), name)
    tr = {n: train_records(r.records) for n, r in runs.items()}
    ev = {n: eval_records(r.records) for n, r in runs.items()}
    def rel_gap(name, key="loss", records=tr):
        ref = records["whole_batch"]
        return [abs(records[name][it][key] / ref[it][key] - 1) for it in sorted(ref)]

    assert sorted(tr["per_token"]) == [1, 2, 3, 4] and sorted(ev["per_token"]) == sorted(ev["whole_batch"])
    assert max(rel_gap("per_token")) < 1e-6, rel_gap("per_token")  # float reduction order only
    assert max(rel_gap("per_token", "grad_norm")) < 1e-4, rel_gap("per_token", "grad_norm")
    assert max(rel_gap("per_token", "val_lm_loss", ev)) < 1e-6, rel_gap("per_token", "val_lm_loss", ev)
    # the comparison can fail: the default normalisation at that split trains (and logs) another
    # loss once the recovery phase's next-token positions meet the masked EODs
    assert max(rel_gap("mean_of_means")) > 1e-5, rel_gap("mean_of_means")


def test_decoupled_lr_resumes_exactly(ws, tmp_path):
    """A --decoupled-lr run with the distributed optimizer, stopped at 5 and resumed, continues the
    uninterrupted run exactly: the embedding/output group's LR and state load into that group, not
    into the default one (megatron-core 0.16.1 would give both the same param-group key)."""
    kw = dict(LR_CASES["linear_decay_iters_8"], use_distributed_optimizer=True)
    straight = assert_ok(run_trainer(base_args(ws.data, **kw, metrics_path=str(tmp_path / "straight.jsonl"))))
    save = str(tmp_path / "ckpt")
    assert_ok(run_trainer(base_args(ws.data, **kw, save=save, exit_interval=5,
                                    metrics_path=str(tmp_path / "leg.jsonl"))))
    resumed = assert_ok(run_trainer(base_args(ws.data, **kw, save=save, load=save,
                                              metrics_path=str(tmp_path / "leg.jsonl"))))
    assert "resumed from" in resumed.stdout and "iter_0000005" in resumed.stdout
    a, b = train_records(straight.records), train_records(resumed.records)  # b: both legs' records
    assert sorted(b) == sorted(a) == list(range(1, kw["train_iters"] + 1))
    for it in b:
        assert [b[it][k] for k in ("loss", "lr", "decoupled_lr")] == [a[it][k] for k in ("loss", "lr", "decoupled_lr")], it


# ------------------------------------------------------------------------------ checkpoint loading flags
def test_no_load_optim_and_no_load_rng(ws):
    """From the iteration-3 checkpoint (dropout on): --no-load-optim keeps weights, RNG and the LR
    schedule but starts Adam afresh (same loss at 4, other losses after); --no-load-rng keeps
    weights and optimizer but draws other dropout masks (another loss already at 4)."""
    ref = train_records(reference_runs(ws)[0].records)
    load = checkpoint_at_3(ws)
    no_optim, no_rng = ws.run_pair(["no_load_optim", "no_load_rng"], [
        chain_args(ws, load=load, no_load_optim=True, metrics_path=ws.path("no_load_optim.jsonl")),
        chain_args(ws, load=load, no_load_rng=True, metrics_path=ws.path("no_load_rng.jsonl"))])
    for res in (no_optim, no_rng):
        assert_ok(res)
        assert "at iteration 3 (superposition phase" in res.stdout, tail(res.stdout)
        tr = train_records(res.records)
        assert sorted(tr) == list(range(4, TRAIN_ITERS + 1))
        for it in tr:  # progress counters and the LR schedule continue where the checkpoint was
            assert tr[it]["lr"] == ref[it]["lr"], (it, tr[it]["lr"], ref[it]["lr"])
            assert tr[it]["data_tokens"] == ref[it]["data_tokens"] and tr[it]["phase"] == ref[it]["phase"]
            assert math.isfinite(tr[it]["loss"])
    a = train_records(no_optim.records)
    assert a[4]["loss"] == ref[4]["loss"]  # weights + RNG restored: the same first loss
    assert a[5]["loss"] != ref[5]["loss"]  # ... but the update used fresh Adam moments
    b = train_records(no_rng.records)
    assert b[4]["loss"] != ref[4]["loss"]  # other dropout masks
    assert abs(b[4]["loss"] - ref[4]["loss"]) < 0.05  # on the same restored weights
    assert math.isfinite(eval_records(no_rng.records)[TRAIN_ITERS]["val_lm_loss"])


# ------------------------------------------------------------------------------ logging and data flags
def test_tensorboard_and_data_cache_flags(ws):
    """--tensorboard-dir gets the same scalars as the metrics file (read back with TensorBoard's
    own reader); --data-cache-path holds megatron's dataset index caches and nothing lands in the
    data directory."""
    pytest.importorskip("tensorboard", reason="the [test] extra installs tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb, cache = ws.path("tb_logs"), ws.path("tb_cache")
    data_dir = os.path.dirname(ws.data)
    before = set(os.listdir(data_dir))
    res = assert_ok(ws.run("tb_cache", base_args(ws.data, tensorboard_dir=tb, data_cache_path=cache,
                                                 metrics_path=ws.path("tb_cache.jsonl"), log_memory_to_tensorboard=True)))
    tr, ev = train_records(res.records), eval_records(res.records)
    acc = EventAccumulator(tb)
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/loss" in tags and "eval/val_lm_loss" in tags and "eval/val_mce_loss" in tags, tags
    # what the accepted --log-validation-ppl-/--log-world-size-to-tensorboard ask for, and the memory
    # --log-memory-to-tensorboard adds (CPU: the peak resident set, in bytes)
    assert "eval/val_lm_ppl" in tags and "train/world_size" in tags, tags
    rss = {e.step: e.value for e in acc.Scalars("train/max_rss_bytes")}
    assert sorted(rss) == sorted(tr) and all(v > 50e6 for v in rss.values()), rss
    loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert sorted(loss) == sorted(tr)
    assert all(loss[i] == pytest.approx(tr[i]["loss"], rel=1e-6) for i in tr)
    val = {e.step: e.value for e in acc.Scalars("eval/val_lm_loss")}
    assert sorted(val) == sorted(ev) and all(val[i] == pytest.approx(ev[i]["val_lm_loss"], rel=1e-6) for i in ev)

    cached = [f for _, _, files in os.walk(cache) for f in files]
    assert any(f.endswith("document_index.npy") for f in cached), cached
    assert any(f.endswith("shuffle_index.npy") for f in cached), cached
    assert set(os.listdir(data_dir)) == before, "index caches written next to the data"


@pytest.mark.parametrize("layout", ["tp2", "distopt_dp2", "moe_ep2"])
def test_log_params_norm_is_the_norm_of_the_saved_weights(ws, tmp_path, layout):
    """--log-params-norm at the last iteration equals the L2 norm of the model tensors in that
    iteration's checkpoint, read with torch's own DCP converter (every tensor once: TP shards joined,
    a tied embedding stored once, all experts), whatever the layout the run was sharded in;
    --log-num-zeros-in-grad logs megatron's count."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    res, save = {"tp2": (tp2_run, "tp2"), "distopt_dp2": (distopt_run, "distopt"),
                 "moe_ep2": (lambda w: moe_run(w, "allgather"), "moe_allgather")}[layout]
    res = assert_ok(res(ws), layout)
    last = train_records(res.records)[TRAIN_ITERS]
    dcp_to_torch_save(os.path.join(ws.path(save), f"iter_{TRAIN_ITERS:07d}"), str(tmp_path / "full.pt"))
    sd = torch.load(str(tmp_path / "full.pt"), weights_only=False)
    tensors = [v for k, v in sd.items() if torch.is_tensor(v) and v.is_floating_point() and "optimizer" not in k]
    assert tensors
    norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))
    assert last["params_norm"] == pytest.approx(norm, rel=1e-9), (last["params_norm"], norm)
    assert isinstance(last["num_zeros_in_grad"], int) and last["num_zeros_in_grad"] >= 0
    assert "params norm:" in res.stdout and "number of zeros in grad:" in res.stdout


def test_log_interval_records_never_mix_the_phases(ws):
    """--log-interval 3 with the switch at 4 and --exit-interval 10: a record closes at the switch
    (the bag loss is never averaged with the next-token loss) and at the exit (the steps since the
    last record are not lost); each record's loss is the mean of the per-step losses it covers, its
    grad norm the last step's (as Megatron-LM logs it)."""
    ref = train_records(reference_runs(ws)[0].records)  # --log-interval 1, same seed and data
    res = assert_ok(ws.run("log3", chain_args(ws, log_interval=3, exit_interval=10,
                                               metrics_path=ws.path("log3.jsonl"))))
    tr = train_records(res.records)
    spans = {3: (1, 3), 4: (4, 4), 6: (5, 6), 9: (7, 9), 10: (10, 10)}
    assert sorted(tr) == sorted(spans), sorted(tr)
    for it, (a, b) in spans.items():
        want = [ref[i]["loss"] for i in range(a, b + 1)]
        assert tr[it]["loss"] == pytest.approx(sum(want) / len(want), rel=1e-9), it
        assert tr[it]["grad_norm"] == pytest.approx(ref[b]["grad_norm"], rel=1e-9), it
        assert {ref[i]["phase"] for i in range(a, b + 1)} == {tr[it]["phase"]}, it
    assert [tr[i]["phase"] for i in sorted(tr)] == ["superposition"] * 2 + ["recovery"] * 3


def test_superposition_ratio_sets_the_switch(ws):
    """--tst-superposition-ratio (not an explicit count): r = 0.34 of 6 iterations is
    floor(2.04) = 2 superposition steps, then recovery; announced, recorded and followed."""
    args = base_args(ws.data, tst=False, train_iters=6, eval_interval=None, eval_iters=1,
                     metrics_path=ws.path("ratio.jsonl"), tst_bag_size=4, tst_superposition_ratio=0.34)
    res = assert_ok(ws.run("ratio", args))
    assert run_record(res.records)["superposition_iters"] == 2
    assert "[TST] phase switch at iteration 2:" in res.stdout, tail(res.stdout)
    tr = train_records(res.records)
    assert [tr[i]["phase"] for i in sorted(tr)] == ["superposition"] * 2 + ["recovery"] * 4
    steps = [tr[i]["data_tokens"] - (tr[i - 1]["data_tokens"] if i > 1 else 0) for i in sorted(tr)]
    assert steps[:2] == [4 * steps[-1]] * 2 and set(steps[2:]) == {steps[-1]}
