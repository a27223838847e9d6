"""Megatron-LM flags accepted for copied scripts (tst_megatron/megatron_compat.py) and the small
Megatron-LM features next to them (--lr-warmup-fraction, --eval-iters 0,
--distributed-timeout-minutes, --recompute-activations, tokenizer aliases).

An accepted flag must change nothing (the run config is the one without it) and its reason must
be true of what the trainer builds: the fusions it names are off in the TransformerConfig, the
gradients are reduced in fp32, no attention mask is built, torch_dist is the only format.
"""
from __future__ import annotations

import os

import pytest
import torch

from tst_megatron.arguments import build_parser, parse_args, validate
from tst_megatron.builders import build_scheduler, ddp_config, transformer_config
from tst_megatron.megatron_compat import SATISFIED

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

BASE = ["--data-path", "x", "--num-layers", "2", "--vocab-size", "256"]


def _error(argv, world_size=1) -> str:
    with pytest.raises(SystemExit) as exc:
        validate(parse_args(BASE + argv), world_size)
    return str(exc.value.code)


@pytest.mark.parametrize("flag", sorted(SATISFIED))
def test_accepted_flag_changes_nothing(flag):
    assert parse_args(BASE + [flag]).to_dict() == parse_args(BASE).to_dict()


def test_the_reasons_hold_for_what_the_trainer_builds():
    cfg = parse_args(BASE + ["--swiglu", "--bf16"])
    validate(cfg, 1)
    tc = transformer_config(cfg.model, cfg.parallel, cfg.optim, use_cpu_init=True)
    off = ("masked_softmax_fusion", "bias_activation_fusion", "bias_dropout_fusion", "apply_rope_fusion",
           "gradient_accumulation_fusion", "persist_layer_norm")
    assert {name: getattr(tc, name) for name in off} == dict.fromkeys(off, False)
    assert ddp_config(cfg.parallel).grad_reduce_in_fp32 is True
    ckpt_format = next(a for a in build_parser()._actions if "--ckpt-format" in a.option_strings)
    assert list(ckpt_format.choices) == ["torch_dist"]

    from tst_megatron.data import _gpt_config
    from tst_megatron.tokenizers import build_tokenizer
    data = _gpt_config(16, 1, build_tokenizer("NullTokenizer", None, 64), (["x"], None), None, "1,0,0", None,
                       False, False, False, 0.005, 1)
    assert data.create_attention_mask is False


@pytest.mark.parametrize("argv, message", [
    (["--rotary-percent", "0.5"], "--rotary-percent 0.5: partial rotary embeddings are not implemented (1.0 only)"),
    (["--context-parallel-size", "2"], "--context-parallel-size 2: context parallelism is not implemented; use 1"),
    (["--no-position-embedding", "--position-embedding-type", "learned_absolute"],
     "--no-position-embedding with --position-embedding-type learned_absolute would train without any position "
     "information; use --position-embedding-type rope"),
    (["--recompute-activations", "--recompute-granularity", "full"],
     "--recompute-activations (selective recomputation) conflicts with --recompute-granularity full"),
    (["--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "5"],
     "give one of --lr-warmup-fraction and --lr-warmup-iters"),
    (["--lr-warmup-fraction", "1.5"], "--lr-warmup-fraction must be in [0, 1) (got 1.5)"),
    (["--lr-decay-style", "linear", "--lr-warmup-iters", "6", "--lr-decay-iters", "5"],
     "--lr-warmup-iters (6) must be < --lr-decay-iters (5): the decay counts from the start of the run"),
    (["--eval-iters", "-1"], "--eval-iters must be >= 0 (got -1; 0 = no validation)"),
    (["--distributed-timeout-minutes", "0"], "--distributed-timeout-minutes must be >= 1 (got 0)"),
    (["--attention-backend", "flash"], "--attention-backend flash: choosing the attention kernel is not implemented"),
    (["--dataloader-type", "cyclic"], "--dataloader-type cyclic: only single is implemented"),
])
def test_values_that_ask_for_something_else_are_refused(argv, message):
    assert _error(argv).startswith(f"error: {message}"), _error(argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU side of the backend / implementation checks")
def test_backend_and_implementation_must_match_the_machine():
    assert _error(["--distributed-backend", "nccl"]) == (
        "error: --distributed-backend nccl: this machine has no CUDA device; gloo is the backend on CPU; drop the "
        "flag (the backend follows the device)")
    assert _error(["--transformer-impl", "transformer_engine"]).startswith(
        "error: --transformer-impl transformer_engine: Transformer Engine needs a CUDA device; use "
        "--transformer-impl local")
    cfg = parse_args(BASE + ["--distributed-backend", "gloo", "--transformer-impl", "local"])
    assert cfg.model.transformer_impl == "local"


@pytest.mark.parametrize("argv", [["--attention-backend", "auto"], ["--dataloader-type", "single"],
                                  ["--rotary-percent", "1.0"], ["--context-parallel-size", "1"],
                                  ["--no-position-embedding"]])
def test_values_that_hold_change_nothing(argv):
    assert parse_args(BASE + argv).to_dict() == parse_args(BASE).to_dict()


def test_use_flash_attn():
    """Accepted on CPU (nothing to choose: SDPA) and changes nothing; on a GPU it needs Transformer Engine."""
    if not torch.cuda.is_available():
        assert parse_args(BASE + ["--use-flash-attn"]).to_dict() == parse_args(BASE).to_dict()
    else:  # pragma: no cover - GPU machines
        from tst_megatron.specs import transformer_engine_available

        if not transformer_engine_available():
            assert _error(["--use-flash-attn"]).startswith("error: --use-flash-attn: without Transformer Engine")


def test_recompute_activations_is_selective_recomputation():
    assert parse_args(BASE + ["--recompute-activations"]).model == \
        parse_args(BASE + ["--recompute-granularity", "selective"]).model


def _lrs(argv, steps=12):
    cfg = parse_args(BASE + ["--train-iters", "12", "--lr", "1e-3", "--lr-decay-style", "linear"] + argv)
    validate(cfg, 1)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    sched = build_scheduler(opt, cfg.optim)
    out = []
    for _ in range(steps):
        sched.step(1)
        out.append(opt.param_groups[0]["lr"])
    return out


def test_lr_warmup_fraction_is_a_fraction_of_the_decay_iterations():
    assert _lrs(["--lr-warmup-fraction", "0.25"]) == _lrs(["--lr-warmup-iters", "3"])  # 0.25 x 12
    # Megatron-LM keeps a fractional count: 0.2 x 12 = 2.4 warmup steps, lr x step / 2.4
    assert _lrs(["--lr-warmup-fraction", "0.2"])[:2] == pytest.approx([1e-3 / 2.4, 2e-3 / 2.4], rel=1e-12)


def test_llama2_tokenizer_is_sentencepiece_with_eos_as_eod(tmp_path):
    import sentencepiece as spm
    from test_tokenizers import train_sp

    from tst_megatron.tokenizers import SentencePieceTokenizer, build_tokenizer

    model = train_sp(str(tmp_path))
    sp = spm.SentencePieceProcessor(model_file=model)
    text = "def loss(x): return x"
    for name in ("Llama2Tokenizer", "GPTSentencePieceTokenizer"):
        tok = build_tokenizer(name, model)
        assert isinstance(tok, SentencePieceTokenizer)
        # Megatron-LM's: vocabulary = the model's pieces, EOD = its EOS; Llama2Tokenizer's
        # tokenize(s, bos=True, eos=False) starts each document with BOS, GPTSentencePieceTokenizer's has none
        assert (tok.vocab_size, tok.eod) == (sp.get_piece_size(), sp.eos_id())
        bos = [sp.bos_id()] if name == "Llama2Tokenizer" else []
        assert tok.tokenize(text) == bos + sp.encode(text) and sp.bos_id() >= 0
    # the two name different data: their cached sample indices must not be shared
    assert (build_tokenizer("Llama2Tokenizer", model).unique_description
            != build_tokenizer("SentencePieceTokenizer", model).unique_description)
    assert parse_args(BASE + ["--tokenizer-type", "Llama2Tokenizer"]).data.tokenizer_type == "Llama2Tokenizer"


def test_eval_iters_zero_runs_without_validation(tmp_path):
    from trainer_utils import assert_ok, base_args, make_data, run_trainer

    prefix = make_data(str(tmp_path / "data"), num_docs=200)
    res = assert_ok(run_trainer(base_args(prefix, eval_iters=0, train_iters=6, split="80,10,10",
                                          metrics_path=tmp_path / "m.jsonl")))
    assert "validation loss" not in res.stdout
    assert [r["type"] for r in res.records] == ["run"] + ["train"] * 6


def test_distributed_timeout_minutes_reaches_the_process_group(tmp_path, monkeypatch):
    import torch.distributed as dist
    from test_bad_inputs import isolated, write_corpus

    from tst_megatron.trainer import Trainer

    prefix = write_corpus(str(tmp_path / "c"), 20)
    monkeypatch.chdir(tmp_path)
    cfg = parse_args(["--data-path", prefix, "--tokenizer-type", "NullTokenizer", "--vocab-size", "256",
                      "--seq-length", "16", "--micro-batch-size", "2", "--train-iters", "2", "--split", "90,10,0",
                      "--distributed-timeout-minutes", "7"])
    with isolated():
        trainer = Trainer(cfg)
        try:
            trainer.setup()
            from megatron.core import parallel_state as ps

            for group in (dist.distributed_c10d._get_default_group(), ps.get_data_parallel_group(),
                          ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group()):
                backend = group._get_backend(torch.device("cpu"))
                assert backend.options._timeout.total_seconds() == 7 * 60
        finally:
            trainer.close()


def _datasets(tmp_path, *flags):
    """The trainer's datasets (set up in this process) over a corpus whose documents end in EOD."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from test_bad_inputs import isolated

    from tst_megatron.trainer import Trainer

    prefix = str(tmp_path / "eod")
    if not os.path.exists(prefix + ".idx"):
        rng = np.random.default_rng(0)
        builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
        for _ in range(60):
            doc = np.append(rng.integers(0, 256, int(rng.integers(5, 30))), 256)  # NullTokenizer's EOD
            builder.add_item(torch.from_numpy(doc.astype(np.int64)))
            builder.end_document()
        builder.finalize(prefix + ".idx")
    data = [] if "--data-args-path" in flags else ["--data-path", prefix]  # (the file names the prefix)
    cfg = parse_args([*data, "--tokenizer-type", "NullTokenizer", "--vocab-size", "256",
                      "--seq-length", "32", "--micro-batch-size", "2", "--train-iters", "4", "--split", "80,20,0",
                      "--tst-bag-size", "4", "--tst-superposition-iters", "2", "--eval-iters", "1", *flags])
    with isolated():
        trainer = Trainer(cfg)
        try:
            trainer.setup()
            return trainer.datasets
        finally:
            trainer.close()


def test_eod_mask_loss_and_reset_position_ids_reach_the_data(tmp_path, monkeypatch):
    """megatron's --eod-mask-loss masks the positions whose *input* is the EOD (the first token of
    the next document is not predicted from the last one); in superposition that target is an
    invalid bag slot. --reset-position-ids restarts positions after every EOD."""
    monkeypatch.chdir(tmp_path)
    plain = _datasets(tmp_path)
    flagged = _datasets(tmp_path, "--eod-mask-loss", "--reset-position-ids")
    eod = 256
    for index in range(4):
        a, b = plain.valid_lm[index], flagged.valid_lm[index]
        assert torch.equal(a["tokens"], b["tokens"]) and (a["tokens"] == eod).any()
        assert torch.equal(b["loss_mask"] == 0, b["tokens"] == eod)
        assert bool((a["loss_mask"] == 1).all())
        after_eod = torch.nonzero(b["tokens"][:-1] == eod).flatten() + 1
        assert bool((b["position_ids"][after_eod] == 0).all()) and len(after_eod) > 0
        assert torch.equal(a["position_ids"], torch.arange(len(a["tokens"])))
        # superposition samples [L, s]: the slot whose preceding raw token is an EOD becomes -100
        ta, tb = plain.train[index], flagged.train[index]
        s = ta["tokens"].shape[1]
        assert not (ta["labels"] == -100).any()
        text = torch.cat([ta["tokens"].flatten()[:s], ta["labels"].flatten()])  # raw window from token s
        previous = text[s - 1: s - 1 + ta["labels"].numel()].reshape(ta["labels"].shape)
        assert (previous == eod).any()
        assert torch.equal(tb["labels"] == -100, previous == eod)
        assert torch.equal(tb["tokens"], ta["tokens"])


def test_moe_router_z_loss_and_dtype(tmp_path):
    """--moe-z-loss-coeff adds megatron's router z-loss to the gradient only (the logged LM loss of
    the first step is the same, its gradient is not); --moe-router-dtype reaches the config and a
    bf16 run with an fp32 router trains."""
    from trainer_utils import assert_ok, base_args, make_data, run_many, train_records

    cfg = parse_args(BASE + ["--num-experts", "4", "--moe-z-loss-coeff", "0.5", "--moe-router-dtype", "fp32"])
    validate(cfg, 1)
    tc = transformer_config(cfg.model, cfg.parallel, cfg.optim, use_cpu_init=True)
    assert (tc.moe_z_loss_coeff, tc.moe_router_dtype) == (0.5, "fp32")
    assert _error(["--moe-z-loss-coeff", "0.1"]).startswith("error: --moe-z-loss-coeff without --num-experts: the "
                                                            "model would be dense")

    prefix = make_data(str(tmp_path / "data"), num_docs=200)
    moe = dict(num_experts=4, moe_router_topk=2, disable_bias_linear=True, train_iters=2, eval_iters=0,
               tst_superposition_iters=1)
    plain, z, bf16 = (train_records(assert_ok(r).records) for r in run_many([
        base_args(prefix, metrics_path=tmp_path / "plain.jsonl", **moe),
        base_args(prefix, metrics_path=tmp_path / "z.jsonl", moe_z_loss_coeff=1.0, **moe),
        base_args(prefix, metrics_path=tmp_path / "bf16.jsonl", moe_router_dtype="fp32", bf16=True, **moe)]))
    assert z[1]["loss"] == plain[1]["loss"]
    assert z[1]["grad_norm"] > 2 * plain[1]["grad_norm"]
    assert sorted(bf16) == [1, 2] and all(0 < r["loss"] < 20 for r in bf16.values())


def test_sample_based_schedule_is_the_iteration_schedule_in_samples():
    """--train-samples 96 at global batch 8 is --train-iters 12; warmup 16 / decay 80 samples are 2 / 10
    steps. 20 warmup samples are 2.5 steps: Megatron-LM's scheduler counts samples, so the LR after
    step 1 is lr x 8 / 20."""
    def lrs(argv):
        cfg = parse_args(BASE + ["--global-batch-size", "8", "--micro-batch-size", "4", "--lr", "1e-3",
                                 "--lr-decay-style", "cosine"] + argv)
        validate(cfg, 1)
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
        sched = build_scheduler(opt, cfg.optim)
        out = []
        for _ in range(cfg.optim.train_iters):
            sched.step(1)
            out.append(opt.param_groups[0]["lr"])
        return cfg.optim.train_iters, out

    by_iters = lrs(["--train-iters", "12", "--lr-warmup-iters", "2", "--lr-decay-iters", "10"])
    by_samples = lrs(["--train-samples", "96", "--lr-warmup-samples", "16", "--lr-decay-samples", "80"])
    assert by_samples[0] == 12 and by_samples[1] == pytest.approx(by_iters[1], rel=1e-12)
    assert lrs(["--train-samples", "100", "--lr-warmup-samples", "20"])[0] == 12  # 100 // 8, as Megatron-LM
    assert lrs(["--train-samples", "100", "--lr-warmup-samples", "20"])[1][0] == pytest.approx(1e-3 * 8 / 20)
    wsd = lrs(["--train-samples", "96", "--lr-decay-style", "WSD", "--lr-wsd-decay-samples", "32"])[1]
    assert wsd[7] == pytest.approx(1e-3) and wsd[8] < 1e-3  # stable until 96 - 32 samples = step 8


def test_validate_twice_is_the_same_config():
    """The trainer validates what a caller may have validated already: resolving samples and the WSD
    default must be idempotent."""
    from tst_megatron.builders import schedule_steps

    cfg = parse_args(BASE + ["--train-samples", "800", "--global-batch-size", "8", "--micro-batch-size", "4",
                             "--lr-decay-style", "WSD"])
    validate(cfg, 1)
    once = (cfg.to_dict(), schedule_steps(cfg.optim))
    validate(cfg, 1)
    assert (cfg.to_dict(), schedule_steps(cfg.optim)) == once
    assert once[1] == {"warmup": 0.0, "decay": 100.0, "wsd_decay": 10.0}  # the last tenth, in samples 80 / 8


@pytest.mark.parametrize("argv, message", [
    (["--train-samples", "96", "--train-iters", "12"], "give one of --train-iters and --train-samples"),
    (["--lr-decay-samples", "80"], "--lr-decay-samples need --train-samples"),
    (["--train-samples", "96", "--lr-warmup-iters", "2"],
     "--lr-warmup-iters with --train-samples: give the schedule in samples"),
    (["--train-samples", "4", "--global-batch-size", "8", "--micro-batch-size", "4"],
     "--train-samples (4) is less than one --global-batch-size (8)"),
    (["--train-samples", "96", "--lr-warmup-samples", "200"], "--lr-warmup-samples must be in [0, --train-samples]"),
    (["--train-samples", "96", "--lr-warmup-samples", "16", "--lr-warmup-fraction", "0.1"],
     "give one of --lr-warmup-fraction and --lr-warmup-iters / --lr-warmup-samples"),
])
def test_sample_based_flag_refusals(argv, message):
    with pytest.raises(SystemExit) as exc:
        validate(parse_args(BASE + argv), 1)
    assert str(exc.value.code).startswith(f"error: {message}"), exc.value.code


def test_gpt2_bpe_tokenizer_flags(tmp_path):
    """Megatron-LM's GPT-3 example flags: --tokenizer-type GPT2BPETokenizer --vocab-file --merge-file."""
    from test_tokenizers import make_hf_tokenizer
    from tokenizers import Tokenizer

    from tst_megatron.tokenizers import GPT2BPETokenizer

    vocab, merges = Tokenizer.from_file(make_hf_tokenizer(str(tmp_path), specials=("<|endoftext|>",))).model.save(
        str(tmp_path))
    gpt2 = ["--data-path", "x", "--tokenizer-type", "GPT2BPETokenizer"]
    cfg = parse_args(gpt2 + ["--vocab-file", vocab, "--merge-file", merges])
    validate(cfg, 1)
    tok = cfg.data.build_tokenizer(cfg.model.vocab_size)
    assert isinstance(tok, GPT2BPETokenizer) and tok.tokenize("hello") == tok._tok.encode("hello").ids
    for argv, message in (
            (gpt2 + ["--vocab-file", vocab], "--tokenizer-type GPT2BPETokenizer needs --merge-file"),
            (gpt2 + ["--vocab-file", vocab, "--merge-file", str(tmp_path / "nope.txt")],
             f"--merge-file {tmp_path / 'nope.txt'}: no such file"),
            (["--data-path", "x", "--vocab-size", "256", "--vocab-file", vocab],
             "--vocab-file / --merge-file are GPT2BPETokenizer's files; --tokenizer-type NullTokenizer does not "
             "read them")):
        with pytest.raises(SystemExit) as exc:
            validate(parse_args(argv), 1)
        assert str(exc.value.code).startswith(f"error: {message}"), exc.value.code


def test_mock_data(tmp_path):
    """--mock-data: megatron-core's MockGPTDataset (counting sequences, an EOD after each) through
    both TST phases; the run learns the pattern. Refused together with real data."""
    from trainer_utils import BAG, GBS, SEQ, SUP_ITERS, TRAIN_ITERS, assert_ok, base_args, run_trainer, train_records

    args = base_args("x", split=None, metrics_path=tmp_path / "m.jsonl")
    i = args.index("--data-path")
    res = assert_ok(run_trainer(args[:i] + args[i + 2:] + ["--mock-data"]))
    tr = train_records(res.records)
    assert sorted(tr) == list(range(1, TRAIN_ITERS + 1))
    assert tr[SUP_ITERS]["data_tokens"] == SUP_ITERS * GBS * SEQ * BAG and tr[SUP_ITERS + 1]["phase"] == "recovery"
    assert tr[TRAIN_ITERS]["loss"] < tr[SUP_ITERS + 1]["loss"] < tr[1]["loss"]
    assert "on test set" in res.stdout  # megatron's mock split 1,1,1 has a test part
    assert _error(["--mock-data"]) == ("error: --mock-data replaces --data-path / --train-data-path: give one or "
                                       "the other")
    with pytest.raises(SystemExit) as exc:
        validate(parse_args(["--mock-data", "--vocab-size", "256", "--split", "90,10,0"]), 1)
    assert str(exc.value.code) == ("error: --split 90,10,0 with --mock-data: megatron-core splits mock data 1,1,1 "
                                   "itself; drop --split")


def test_profile_with_the_pytorch_profiler(tmp_path):
    """--profile --use-pytorch-profiler: one torch.profiler trace of the iteration window in
    --tensorboard-dir, holding the model's matmuls."""
    import glob
    import json

    from trainer_utils import assert_ok, base_args, make_data, run_trainer

    prefix = make_data(str(tmp_path / "data"), num_docs=200)
    tb = tmp_path / "tb"
    assert_ok(run_trainer(base_args(prefix, train_iters=6, tst_superposition_iters=2, eval_iters=0,
                                    metrics_path=tmp_path / "m.jsonl", tensorboard_dir=tb, profile=True,
                                    use_pytorch_profiler=True, profile_step_start=1, profile_step_end=3)))
    traces = glob.glob(str(tb / "*.pt.trace.json"))
    assert len(traces) == 1, os.listdir(tb)
    names = {e.get("name") for e in json.load(open(traces[0]))["traceEvents"]}
    assert any(n in names for n in ("aten::mm", "aten::matmul", "aten::addmm")), sorted(n for n in names if n)[:40]

    for argv, message in (
            (["--profile", "--use-pytorch-profiler", "--tensorboard-dir", str(tb), "--profile-step-start", "5",
              "--profile-step-end", "5"], "--profile-step-start (5) / --profile-step-end (5) must satisfy"),
            (["--profile", "--use-pytorch-profiler", "--tensorboard-dir", str(tb), "--profile-ranks", "1"],
             "--profile-ranks 1: not ranks of this world of 1"),
            (["--profile", "--use-pytorch-profiler"], "--use-pytorch-profiler writes its traces into --tensorboard-dir"),
            (["--use-pytorch-profiler"], "--use-pytorch-profiler is a mode of --profile"),
    ):
        assert _error(argv + ["--train-iters", "20"]).startswith(f"error: {message}"), _error(argv)
    if not torch.cuda.is_available():
        assert _error(["--profile"]).startswith("error: --profile without --use-pytorch-profiler brackets")


def test_gpt2_bpe_tokenizer_exported_for_transformers(tmp_path):
    """A GPT2BPETokenizer run's export writes tokenizer.json + tokenizer_config.json that
    transformers' AutoTokenizer loads and that encodes exactly as the trainer's tokenizer."""
    transformers = pytest.importorskip("transformers")
    from test_tokenizers import generated_text, make_hf_tokenizer
    from tokenizers import Tokenizer

    from tst_megatron.convert.export import _build_tokenizer_for_export, _copy_tokenizer

    vocab, merges = Tokenizer.from_file(make_hf_tokenizer(str(tmp_path), specials=("<|endoftext|>",))).model.save(
        str(tmp_path))
    cfg = parse_args(["--data-path", "x", "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab,
                      "--merge-file", merges])
    tok, json_path, note = _build_tokenizer_for_export(cfg, None)
    assert note is None and json_path
    out = tmp_path / "hf"
    out.mkdir()
    assert _copy_tokenizer(tok, json_path, str(out), 128) == ["tokenizer.json", "tokenizer_config.json"]
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    text = generated_text()[:1500] + " it's 3.14  émigré, a literal <|endoftext|> in the text"
    assert hf.encode(text, add_special_tokens=False) == tok.tokenize(text)
    assert hf.eos_token_id == tok.eod


def test_resume_of_a_sample_based_run():
    """The resume check compares the schedule in steps, however given: the same samples as an explicit
    default resume; another global batch under --train-samples is refused (the schedule counts samples
    in Megatron-LM, steps here); the same step schedule given in iterations resumes."""
    from tst_megatron import preflight

    def cfg(*argv):
        c = parse_args(BASE + ["--micro-batch-size", "4"] + list(argv))
        validate(c, 1)
        return c

    saved = {"args": cfg("--global-batch-size", "8", "--train-samples", "800").to_dict()}
    preflight.check_resume_compatible(cfg("--global-batch-size", "8", "--train-samples", "800",
                                          "--lr-decay-samples", "800"), saved, "ck")
    with pytest.raises(SystemExit) as exc:
        preflight.check_resume_compatible(cfg("--global-batch-size", "16", "--train-samples", "1600"), saved, "ck")
    assert "--global-batch-size 16 (checkpoint: 8) with --train-samples" in str(exc.value.code)
    # the same samples at another batch: named by the batch, not by the iteration count derived from it
    with pytest.raises(SystemExit) as exc:
        preflight.check_resume_compatible(cfg("--global-batch-size", "16", "--train-samples", "800"), saved, "ck")
    assert "--global-batch-size 16 (checkpoint: 8) with --train-samples" in str(exc.value.code)
    assert "--train-iters" not in str(exc.value.code)
    with pytest.raises(SystemExit) as exc:
        preflight.check_resume_compatible(cfg("--global-batch-size", "8", "--train-samples", "1600"), saved, "ck")
    assert "--train-samples 1600 (checkpoint: 800)" in str(exc.value.code)
    preflight.check_resume_compatible(cfg("--global-batch-size", "8", "--train-iters", "100"), saved, "ck")


def test_resume_refuses_another_rope_base_or_norm_epsilon_finetune_allows_them(tmp_path):
    """Not the weights' shape but their function: a resume from a checkpoint trained (or imported
    from Hugging Face) with rope_theta 1e6 and eps 1e-6 that leaves the flags at their defaults
    would train another model -- refused, naming both; --finetune may change them (a new RoPE base
    is how a context gets extended); a learned-position run has no RoPE base to compare."""
    from tst_megatron import preflight

    def cfg(*argv):
        c = parse_args(BASE + ["--train-iters", "100"] + list(argv))
        validate(c, 1)
        return c

    saved = {"args": cfg("--rotary-base", "1000000", "--norm-epsilon", "1e-6").to_dict()}
    with pytest.raises(SystemExit) as exc:
        preflight.check_resume_compatible(cfg(), saved, "ck")
    assert "--rotary-base 10000 (checkpoint: 1000000); --norm-epsilon 1e-05 (checkpoint: 1e-06)" in str(exc.value.code)
    assert "or pass --override-checkpoint-args" in str(exc.value.code)  # not a weight shape
    preflight.check_resume_compatible(cfg("--rotary-base", "1000000", "--norm-epsilon", "1e-6"), saved, "ck")
    preflight.check_resume_compatible(cfg("--finetune", "--load", str(tmp_path), "--save", str(tmp_path / "new")),
                                      saved, "ck")
    learned = {"args": cfg("--position-embedding-type", "learned_absolute", "--rotary-base", "5").to_dict()}
    preflight.check_resume_compatible(cfg("--position-embedding-type", "learned_absolute"), learned, "ck")


def test_resume_from_an_import_checks_the_tokenizer_it_was_imported_for():
    """An imported checkpoint records the tokenizer the import checked the vocabulary against: a
    run that continues it with another --tokenizer-type is refused as for a trained checkpoint."""
    from tst_megatron import preflight

    imported = {"imported_from": "/hf/model", "args": parse_args(BASE + ["--tokenizer-type", "NullTokenizer"]).to_dict()}
    with pytest.raises(SystemExit) as exc:
        preflight.check_resume_data(parse_args(BASE + ["--tokenizer-type", "ByteTokenizer"]), imported, "ck", True)
    assert "the checkpoint was imported for --tokenizer-type NullTokenizer, this run gives --tokenizer-type " \
           "ByteTokenizer" in str(exc.value.code)
    preflight.check_resume_data(parse_args(BASE + ["--tokenizer-type", "NullTokenizer"]), imported, "ck", True)


def test_a_fresh_import_takes_any_schedule_but_keeps_its_model():
    """A Hugging Face import at iteration 0 recorded the trainer's default schedule and TST flags
    (unless given to the import); the run that starts from it may choose its own -- nothing was
    trained under them -- but not another RoPE base, norm epsilon or shape. An import that continues
    a schedule (consumed samples > 0) is a resume like any other."""
    from tst_megatron import preflight

    def cfg(*argv):
        c = parse_args(BASE + list(argv))
        validate(c, 1)
        return c

    args = cfg("--train-iters", "100", "--rotary-base", "1000000").to_dict()
    fresh = {"imported_from": "/hf/model", "consumed_samples": 0, "args": args}
    mine = ("--train-iters", "20", "--lr", "3e-3", "--lr-decay-style", "WSD", "--tst-bag-size", "4",
            "--tst-superposition-ratio", "0.3", "--rotary-base", "1000000")
    preflight.check_resume_compatible(cfg(*mine), fresh, "ck")
    with pytest.raises(SystemExit, match=r"--rotary-base 10000 \(checkpoint: 1000000\)"):
        preflight.check_resume_compatible(cfg(*mine[:-2]), fresh, "ck")
    with pytest.raises(SystemExit, match=r"--num-layers 3 \(checkpoint: 2\)"):
        preflight.check_resume_compatible(cfg(*mine, "--num-layers", "3"), fresh, "ck")
    continuing = dict(fresh, consumed_samples=800)
    with pytest.raises(SystemExit, match=r"--train-iters 20 \(checkpoint: 100\)"):
        preflight.check_resume_compatible(cfg(*mine), continuing, "ck")


def test_checkpoints_record_data_and_tokenizer_paths_absolute(tmp_path, monkeypatch, capsys):
    """A run started with relative paths records them absolute (an export or resume from another
    directory finds the same files), and a resume that types the same files relative (or absolute)
    is the same data: no "data may have moved" warning, the same train stream."""
    from tst_megatron import preflight

    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    for name in ("d/c_text_document.bin", "d/c_text_document.idx", "spm.model"):
        (tmp_path / name).write_text("")
    argv = ["--num-layers", "2", "--train-iters", "10", "--tokenizer-type", "SentencePieceTokenizer"]
    rel = parse_args(argv + ["--data-path", "0.5", "d/c_text_document", "0.5", "d/c_text_document",
                             "--tokenizer-model", "spm.model"])
    recorded = rel.recorded_dict()
    assert recorded["data"]["data_path"] == ["0.5", str(tmp_path / "d/c_text_document")] * 2
    assert recorded["data"]["tokenizer_model"] == str(tmp_path / "spm.model")
    assert rel.to_dict()["data"]["tokenizer_model"] == "spm.model"  # the run itself keeps what was typed
    meta = {"args": recorded, "consumed_samples": 80}
    for again in (rel, parse_args(argv + ["--data-path", "0.5", str(tmp_path / "d/c_text_document"), "0.5",
                                          "d/c_text_document", "--tokenizer-model", str(tmp_path / "spm.model")])):
        assert preflight.same_train_data(again, meta)
        preflight.check_resume_data(again, meta, "ck", True)
        assert "warning" not in capsys.readouterr().out


def test_resume_ignores_wsd_flags_outside_wsd():
    """--lr-wsd-decay-iters/-style do nothing under another decay style, so dropping or changing
    them there does not block a resume; under WSD they are the schedule and must match."""
    from tst_megatron import preflight

    def cfg(*argv):
        c = parse_args(BASE + ["--train-iters", "100"] + list(argv))
        validate(c, 1)
        return c

    saved = {"args": cfg("--lr-decay-style", "cosine", "--lr-wsd-decay-iters", "30").to_dict()}
    preflight.check_resume_compatible(cfg("--lr-decay-style", "cosine"), saved, "ck")
    saved = {"args": cfg("--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "30").to_dict()}
    with pytest.raises(SystemExit, match=r"--lr-wsd-decay-iters 10 \(checkpoint: 30\)"):
        preflight.check_resume_compatible(cfg("--lr-decay-style", "WSD"), saved, "ck")


def test_squared_relu_is_the_mlp_activation():
    """--squared-relu: megatron's MLP of a built model computes fc2(relu(fc1 x)^2) (written out
    here); refused with --swiglu; the Hugging Face export names the field it cannot hold."""
    import dist_utils
    from tst_megatron.builders import build_model_chunks, padded_vocab_size
    from tst_megatron.hf_convert import config as hc

    dist_utils.init_single_process()
    cfg = parse_args(BASE + ["--hidden-size", "16", "--num-attention-heads", "2", "--squared-relu",
                             "--disable-bias-linear"])
    validate(cfg, 1)
    tc = transformer_config(cfg.model, cfg.parallel, cfg.optim, use_cpu_init=True)
    model = build_model_chunks(cfg, tc, padded_vocab_size(257, cfg.model.make_vocab_size_divisible_by, 1))[0]
    mlp = model.decoder.layers[0].mlp
    x = torch.randn(3, 2, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, _ = mlp(x)
        h = x @ mlp.linear_fc1.weight.t()
        if hasattr(mlp.linear_fc1, "layer_norm_weight"):  # a fused norm in fc1 (TE-style spec)
            pytest.skip("norm fused into fc1")
        want = torch.relu(h).pow(2) @ mlp.linear_fc2.weight.t()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    assert _error(["--squared-relu", "--swiglu"]) == "error: give one of --squared-relu and --swiglu (the MLP has one activation)"
    with pytest.raises(ValueError, match="activation_func"):
        hc.check_representable("LlamaForCausalLM", tc)


def test_apply_layernorm_1p_stores_gamma_minus_one():
    """--apply-layernorm-1p (zero-centred gamma): every norm of a built model starts at weight 0 and
    normalises as norm(x) * (1 + w) -- at init exactly the plain norm; with a trained w, the plain
    norm with weight 1 + w. (The HF export adds the 1: tests/test_hf_convert.py parity case.)"""
    import dist_utils
    from tst_megatron.builders import build_model_chunks, padded_vocab_size

    dist_utils.init_single_process()
    for normalization in ("RMSNorm", "LayerNorm"):
        cfg = parse_args(BASE + ["--hidden-size", "16", "--num-attention-heads", "2", "--apply-layernorm-1p",
                                 "--qk-layernorm", "--normalization", normalization])
        validate(cfg, 1)
        tc = transformer_config(cfg.model, cfg.parallel, cfg.optim, use_cpu_init=True)
        assert tc.layernorm_zero_centered_gamma is True
        model = build_model_chunks(cfg, tc, padded_vocab_size(257, cfg.model.make_vocab_size_divisible_by, 1))[0]
        norms = [m for m in model.modules() if isinstance(m, (torch.nn.RMSNorm, torch.nn.LayerNorm))]
        assert len(norms) == 2 * 4 + 1  # per layer: input, pre-MLP, q, k; final
        x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
        for norm in norms:
            n = norm.normalized_shape[0]
            assert torch.equal(norm.weight, torch.zeros(n))
            plain = (torch.nn.RMSNorm(n, eps=norm.eps) if normalization == "RMSNorm"
                     else torch.nn.LayerNorm(n, eps=norm.eps))
            with torch.no_grad():
                torch.testing.assert_close(norm(x[:, :n]), plain(x[:, :n]))
                norm.weight.uniform_(-0.5, 0.5)
                plain.weight.copy_(1 + norm.weight)
                torch.testing.assert_close(norm(x[:, :n]), plain(x[:, :n]))
