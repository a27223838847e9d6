"""Every bad input pretrain_tst.py is known to get: each is refused before any compute with a
message that names the flag or file, and nothing is written (no --save directory, no metrics, no
checkpoint touched).

The trainer runs in this process (`tst_megatron.trainer.main(argv)`), which raises SystemExit
with the message; a refused setup tears its process group down again (main's try/finally), so
cases run back to back. Divisibility checks that need a world size > 1 call
`validation.validate(cfg, world_size)` (also importable from arguments) -- the same function every rank runs first.
docs/reliability.md lists these messages; `pytest -rP tests/test_bad_inputs.py` prints them.
"""
import contextlib
import importlib.util
import json
import os
import shutil
import signal

import numpy as np
import pytest
import torch
import torch.distributed as dist

from tst_megatron import checkpointing as ckpt
from tst_megatron.arguments import parse_args, validate
from tst_megatron.trainer import main

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@contextlib.contextmanager
def isolated():
    """A clean slate for an in-process run: no process group or megatron state from other tests,
    and the environment and signal handlers main() changes are put back afterwards."""
    from megatron.core import parallel_state as ps
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator

    def teardown():
        ps.destroy_model_parallel()
        destroy_num_microbatches_calculator()
        if dist.is_initialized():
            dist.destroy_process_group()

    teardown()
    env = {k: os.environ.pop(k) for k in ENV_KEYS if k in os.environ}
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        teardown()
        for k in ENV_KEYS:
            os.environ.pop(k, None)
        os.environ.update(env)
        for s, h in handlers.items():
            signal.signal(s, h)


def write_corpus(prefix, n_docs, seed=0, high=256):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for k in range(n_docs):
        doc = rng.integers(0, high, int(rng.integers(20, 80)))
        if k == 0:
            doc[0] = high - 1  # the largest id is certainly present
        builder.add_item(torch.from_numpy(doc.astype(np.int64)))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """20 documents, ~1000 tokens, ids up to 255."""
    return write_corpus(str(tmp_path_factory.mktemp("corpus") / "tiny"), 20)


def base(corpus, save=None, **over):
    args = {"--data-path": corpus, "--tokenizer-type": "NullTokenizer", "--vocab-size": "256",
            "--num-layers": "2", "--hidden-size": "64", "--num-attention-heads": "4", "--seq-length": "16",
            "--micro-batch-size": "2", "--global-batch-size": "4", "--train-iters": "4", "--lr": "1e-3",
            "--log-interval": "1", "--eval-iters": "1", "--tst-bag-size": "4",
            "--tst-superposition-iters": "2", "--split": "90,10,0"}
    if save is not None:
        args["--save"] = str(save)
    for k, v in over.items():  # None drops a flag
        if v is None:
            args.pop(k, None)
        else:
            args[k] = str(v)
    argv = []
    for k, v in args.items():
        argv += [k] if v == "" else [k, v]
    return argv


def tree(*roots):
    """Every file and directory under roots, with size and mtime: to show nothing was written."""
    out = set()
    for root in roots:
        for dirpath, dirs, files in os.walk(root):
            for name in dirs + files:
                p = os.path.join(dirpath, name)
                st = os.stat(p)
                out.add((p, st.st_size if name in files else -1, st.st_mtime_ns))
    return out


@pytest.fixture
def workdir(tmp_path, monkeypatch, corpus):
    """cwd = an empty directory: a default ./metrics.jsonl would land there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def refuse(argv, capsys, watch=(), world_size=None):
    """Run main(argv) (or parse_args+validate for a given world size); it must exit non-zero
    before writing anything under `watch`. Returns the message the user sees."""
    before = tree(*watch)
    with isolated(), pytest.raises(SystemExit) as exc:
        if world_size is None:
            main(argv)
        else:
            validate(parse_args(argv), world_size)
    code = exc.value.code
    assert code not in (0, None)
    message = code if isinstance(code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert tree(*watch) == before, "a refused run wrote or changed files"
    print("MESSAGE:", message)
    return message


@pytest.fixture
def save(workdir):
    return workdir / "save"  # never created by a refused run


def assert_clean(workdir, save):
    assert not save.exists(), f"--save {save} was created"
    assert not list(workdir.rglob("metrics.jsonl")), "metrics were written"


# ------------------------------------------------------------------------------ TST flags
@pytest.mark.parametrize("flag,value,expected", [
    ("--tst-bag-size", "0", "error: --tst-bag-size must be an integer >= 1 (got 0); 1 disables token superposition"),
    ("--tst-bag-size", "-3", "error: --tst-bag-size must be an integer >= 1 (got -3)"),
    ("--tst-superposition-ratio", "1.0", "error: --tst-superposition-ratio must be in [0, 1) (got 1.0)"),
    ("--tst-superposition-ratio", "-0.1", "error: --tst-superposition-ratio must be in [0, 1) (got -0.1)"),
    ("--tst-superposition-ratio", "nan", "error: --tst-superposition-ratio must be in [0, 1) (got nan)"),
    ("--tst-superposition-iters", "-1", "error: --tst-superposition-iters must be an integer >= 0 (got -1)"),
])
def test_tst_flag_out_of_range(corpus, workdir, save, capsys, flag, value, expected):
    over = {flag: value}
    if flag == "--tst-superposition-ratio":
        over["--tst-superposition-iters"] = None  # the explicit count would override the ratio
    msg = refuse(base(corpus, save, **over), capsys, watch=[workdir, os.path.dirname(corpus)])
    assert msg.startswith(expected), msg
    assert_clean(workdir, save)


@pytest.mark.parametrize("flag", ["--tst-bag-weighting", "--tst-mode"])
def test_tst_choice_invalid(corpus, workdir, save, capsys, flag):
    msg = refuse(base(corpus, save, **{flag: "sideways"}), capsys, watch=[workdir])
    assert f"argument {flag}: invalid choice: 'sideways' (choose from" in msg, msg
    assert_clean(workdir, save)


@pytest.mark.parametrize("over,given", [
    ({"--tst-bag-size": None}, "--tst-superposition-iters 2"),
    ({"--tst-bag-size": None, "--tst-superposition-iters": None, "--tst-superposition-ratio": 0.3,
      "--tst-bag-weighting": "power"}, "--tst-superposition-ratio 0.3, --tst-bag-weighting power"),
])
def test_tst_flags_without_a_bag_size(corpus, workdir, save, capsys, over, given):
    """TST settings without --tst-bag-size (default 1) would silently train the plain baseline; an
    explicit --tst-bag-size 1 is that baseline on purpose (test_trainer_e2e::test_tst_off_is_a_plain_run)."""
    msg = refuse(base(corpus, save, **over), capsys, watch=[workdir])
    assert msg == (f"error: {given} given without --tst-bag-size: the default bag size 1 has no superposition "
                   "phase; give --tst-bag-size s > 1 for TST (an explicit --tst-bag-size 1 is the plain "
                   "baseline, e.g. in a sweep over s)"), msg
    assert_clean(workdir, save)


def test_bag_size_without_a_superposition_length(corpus, workdir, save, capsys):
    """The mirror image: --tst-bag-size s > 1 alone would train the baseline (the ratio defaults to
    0); an explicit --tst-superposition-ratio 0 is that baseline on purpose and is accepted."""
    msg = refuse(base(corpus, save, **{"--tst-superposition-iters": None}), capsys, watch=[workdir])
    assert msg == ("error: --tst-bag-size 4 without --tst-superposition-ratio r or --tst-superposition-iters N: "
                   "the superposition phase would be empty; give r (the paper uses 0.2-0.4) or N (an explicit "
                   "--tst-superposition-ratio 0 is the plain baseline)"), msg
    assert_clean(workdir, save)
    cfg = parse_args(base(corpus, None, **{"--tst-superposition-iters": None, "--tst-superposition-ratio": 0}))
    assert cfg.tst.bag_size == 4 and cfg.tst.num_superposition_iters(cfg.optim.train_iters) == 0


def test_bag_weighting_with_input_mode(corpus, workdir, save, capsys):
    """--tst-mode input's target is the next token: a bag weighting would be silently ignored."""
    msg = refuse(base(corpus, save, **{"--tst-mode": "input", "--tst-bag-weighting": "power"}), capsys, watch=[workdir])
    assert msg == ("error: --tst-bag-weighting power with --tst-mode input: that mode predicts the next token, not "
                   "a bag, so there are no bag targets to weight; drop the flag"), msg
    assert_clean(workdir, save)


@pytest.mark.parametrize("flag,hint", [
    ("--tst-bag-sizes", "--tst-bag-sizes: did you mean --tst-bag-size?"),
    ("--override-opt_param-scheduler", "--override-opt_param-scheduler: use --override-checkpoint-args"),
    ("--moe-grouped-gemm", "--moe-grouped-gemm: not implemented; drop it: the experts run as megatron-core's "
                           "SequentialMLP (the same function, the experts' GEMMs one after another)"),
    ("--async-save", "--async-save: not implemented; drop it: checkpoints are written synchronously and atomically"),
    ("--no-check-for-nan-in-loss-and-grad", "--no-check-for-nan-in-loss-and-grad: the non-finite guard cannot be "
     "turned off: a NaN/Inf loss or gradient norm stops the run without saving; to skip such steps instead, give "
     "--skip-nonfinite-steps N"),
])
def test_unknown_flag_gets_a_suggestion(corpus, workdir, save, capsys, flag, hint):
    with isolated(), pytest.raises(SystemExit) as exc:
        main(base(corpus, save) + [flag, "4"] if flag == "--tst-bag-sizes" else base(corpus, save) + [flag])
    assert exc.value.code == 2
    msg = capsys.readouterr().err.strip().splitlines()[-1]
    assert "unrecognized arguments" in msg and f"({hint})" in msg, msg
    assert_clean(workdir, save)


@pytest.mark.parametrize("flag", ["--save", "--load", "--metrics-path", "--tensorboard-dir"])
def test_path_of_the_wrong_kind(corpus, workdir, save, capsys, flag):
    """A directory flag given a file (or the metrics file a directory) fails with the flag's name,
    not with a FileExistsError after the model is built."""
    target = workdir / ("adir" if flag == "--metrics-path" else "afile")
    target.mkdir() if flag == "--metrics-path" else target.write_text("x")
    over = {flag: target}
    if flag == "--save":
        save = target
    msg = refuse(base(corpus, save, **over), capsys, watch=[workdir])
    expected = (f"error: --metrics-path {target}: is a directory; give a file path (e.g. {target}/metrics.jsonl)"
                if flag == "--metrics-path" else f"error: {flag} {target}: is a file, not a directory; give a directory")
    assert msg == expected, msg


@pytest.mark.parametrize("over,expected", [
    ({"--tst-superposition-iters": 4}, "error: TST superposition iterations (4) must be < train iterations (4)"),
    ({"--tst-superposition-iters": 9}, "error: TST superposition iterations (9) must be < train iterations (4)"),
])
def test_superposition_iters_not_below_train_iters(corpus, workdir, save, capsys, over, expected):
    msg = refuse(base(corpus, save, **over), capsys, watch=[workdir])
    assert msg.startswith(expected) and "--tst-superposition-iters" in msg, msg
    assert_clean(workdir, save)


@pytest.mark.parametrize("over,expected", [
    # megatron's own split parser would read "90,-10,20" as 90,10,20 and "1e2" as two weights
    ({"--split": "90,-10,20"}, "error: --split 90,-10,20: give up to three non-negative numbers train,valid,test"),
    ({"--split": "1e2,10,0"}, "error: --split 1e2,10,0: give up to three non-negative numbers train,valid,test"),
    ({"--split": "0,0,0"}, "error: --split 0,0,0: the weights sum to 0; give the train split a weight > 0"),
    # 20 documents: 1% of them is none (megatron rounds document counts); the hint spells the split without it
    ({"--split": "99,1,0"}, "error: --split 99,1,0: the validation split of {c} gets no documents (20 documents in "
                            "all; megatron splits by documents); use more documents or give that split more weight, "
                            "or none at all (--split 99,0,0)"),
    ({"--data-path": "-1 {c} 2 {c}"}, "error: --data-path -1 {c} 2 {c}: blend weight -1 is not a number > 0"),
    ({"--data-path": "nan {c} 1 {c}"}, "error: --data-path nan {c} 1 {c}: blend weight nan is not a number > 0"),
    ({"--exit-interval": "-1"}, "error: --exit-interval must be >= 1 (got -1)"),
    ({"--exit-duration-in-mins": "nan"}, "error: --exit-duration-in-mins must be a finite number >= 0 (got nan)"),
    ({"--save": "{w}/afile/ckpt"}, "error: --save {w}/afile/ckpt: {w}/afile is a file, not a directory; give a "
                                   "path under a directory"),
])
def test_split_blend_exit_and_save_values(corpus, workdir, save, capsys, over, expected):
    """Values megatron would misread or only trip over after the model is built (a negative split
    weight silently made positive, a blend weight <= 0 as a bare AssertionError, a --save below a
    file at the first checkpoint) are refused first, naming the flag."""
    (workdir / "afile").write_text("x")
    fill = dict(c=corpus, w=workdir)
    (flag, value), = over.items()
    argv = base(corpus, save, **{flag: None}) + [flag] + value.format(**fill).split()
    msg = refuse(argv, capsys, watch=[workdir])
    assert msg.startswith(expected.format(**fill)), msg
    assert_clean(workdir, save)


@pytest.mark.parametrize("flag,value,expected", [
    ("--global-batch-size", "0", "--global-batch-size must be >= 1 (got 0)"),
    ("--make-vocab-size-divisible-by", "0", "--make-vocab-size-divisible-by must be >= 1 (got 0)"),
    ("--lr-decay-iters", "0", "--lr-decay-iters must be >= 1 (got 0)"),
    ("--adam-beta1", "1.5", "--adam-beta1 must be in [0, 1) (got 1.5)"),
    ("--adam-beta2", "1", "--adam-beta2 must be in [0, 1) (got 1.0)"),
    ("--adam-eps", "-1", "--adam-eps must be a finite number > 0 (got -1.0)"),
    ("--norm-epsilon", "0", "--norm-epsilon must be a finite number > 0 (got 0.0)"),
    ("--rotary-base", "0", "--rotary-base must be a finite number > 0 (got 0)"),
    ("--ffn-hidden-size", "0", "--ffn-hidden-size must be >= 1 (got 0)"),
    ("--num-workers", "-2", "--num-workers must be >= 0 (got -2; 0 loads in the training process)"),
])
def test_numeric_ranges_refused_before_any_compute(corpus, workdir, save, capsys, flag, value, expected):
    """Values torch or megatron-core would only trip over mid-build (a ZeroDivisionError, an
    optimizer ValueError that names no flag) or never (a NaN at the first step) name their flag."""
    msg = refuse(base(corpus, save, **{flag: value}), capsys, world_size=1)
    assert msg == f"error: {expected}", msg


def test_bag_too_large_for_the_data(corpus, workdir, save, capsys):
    # 20 documents, the 18 of the train split hold ~900 tokens; s=64, L=16: 64*17 = 1088 per sample
    msg = refuse(base(corpus, save, **{"--tst-bag-size": 64}), capsys, watch=[workdir, os.path.dirname(corpus)])
    assert msg.startswith("error: --tst-bag-size 64 with --seq-length 16: one superposition sample reads "
                          f"1088 tokens, but the train split of --data-path {corpus} holds only "), msg
    assert "use a smaller --tst-bag-size / --seq-length or more data" in msg
    assert_clean(workdir, save)


def test_sequence_too_long_for_the_data_without_tst(corpus, workdir, save, capsys):
    msg = refuse(base(corpus, save, **{"--tst-bag-size": 1, "--tst-superposition-iters": None,
                                       "--seq-length": 4096}), capsys, watch=[workdir])
    assert msg.startswith("error: --seq-length 4096: one sample reads 4097 tokens, but the train split of "
                          f"--data-path {corpus} holds only "), msg
    assert_clean(workdir, save)


@pytest.mark.parametrize("over,what", [
    # 2 validation documents hold at most 160 tokens, the 18 train ones at least 360
    ({"--tst-bag-size": 12}, "--tst-bag-size 12 with --seq-length 16: one superposition sample reads 204 tokens"),
    ({"--tst-bag-size": 1, "--tst-superposition-iters": None, "--seq-length": 200},
     "--seq-length 200: one sample reads 201 tokens"),
])
def test_sample_longer_than_the_validation_split(corpus, workdir, save, capsys, over, what):
    """megatron would repeat the split inside one validation sample; the loss read on it is low."""
    msg = refuse(base(corpus, save, **over), capsys, watch=[workdir, os.path.dirname(corpus)])
    assert msg.startswith(f"error: {what}, but the validation split of --data-path {corpus} holds only "), msg
    assert "give the validation split more weight in --split (now 90,10,0)" in msg, msg
    assert_clean(workdir, save)


def test_sample_longer_than_the_test_split(corpus, workdir, save, capsys):
    """The test split is evaluated at the end of training: a sample that does not fit it would be
    repeated text too, found only after the whole run. Split 85,10,5 of the 20 documents: 2
    validation documents, 1 test document; L is chosen so that a sample fits the former only."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    index = IndexedDataset(corpus)
    lengths = index.sequence_lengths.copy()  # a view into the index's mmap, closed with the object
    del index
    valid_tokens, test_tokens = int(lengths[17:19].sum()), int(lengths[19])
    L = test_tokens  # one sample reads L + 1 tokens
    assert valid_tokens >= L + 1, (valid_tokens, test_tokens)  # the validation split fits
    msg = refuse(base(corpus, save, **{"--tst-bag-size": 1, "--tst-superposition-iters": None, "--seq-length": L,
                                       "--split": "85,10,5"}), capsys, watch=[workdir, os.path.dirname(corpus)])
    assert msg.startswith(f"error: --seq-length {L}: one sample reads {L + 1} tokens, but the test split of "
                          f"--data-path {corpus} holds only {test_tokens} tokens; give the test split more weight "
                          "in --split (now 85,10,5) or none"), msg
    assert_clean(workdir, save)


def test_unweighted_blend_shorter_than_the_run(corpus, workdir, save, capsys):
    """megatron-core reads an unweighted list of several prefixes once (no epochs): a run that needs
    more samples is refused, naming the flag, instead of a traceback from the dataset builder."""
    other = write_corpus(str(workdir / "other"), 20, seed=1)
    argv = base(corpus, save, **{"--train-iters": 40, "--tst-superposition-iters": 20})
    i = argv.index("--data-path")
    argv[i + 1:i + 2] = [corpus, other]
    msg = refuse(argv, capsys)  # megatron's dataset index cache under the data is written, as by any run
    assert msg.startswith(f"error: --data-path {corpus} {other}: the train stream built from "), msg
    assert msg.endswith("megatron-core reads an unweighted list of several prefixes once, without epochs: give "
                        "weights (e.g. 0.5 A 0.5 B) or train on fewer samples"), msg
    assert_clean(workdir, save)


# ------------------------------------------------------------------------------ parallel layout
def test_world_size_not_divisible_by_model_parallel_size(corpus, workdir, save, capsys):
    msg = refuse(base(corpus, save, **{"--tensor-model-parallel-size": 2}), capsys, watch=[workdir])
    assert msg == ("error: world size 1 is not divisible by --tensor-model-parallel-size (2) x "
                   "--pipeline-model-parallel-size (1); launch a multiple of 2 processes"), msg
    assert_clean(workdir, save)


@pytest.mark.parametrize("over,world,expected", [
    ({"--pipeline-model-parallel-size": 2, "--tensor-model-parallel-size": 2}, 6,
     "error: world size 6 is not divisible by --tensor-model-parallel-size (2) x --pipeline-model-parallel-size (2)"),
    ({"--num-attention-heads": 3, "--hidden-size": 48, "--tensor-model-parallel-size": 2}, 2,
     "error: --num-attention-heads (3) must be divisible by --tensor-model-parallel-size (2)"),
    ({"--group-query-attention": "", "--num-query-groups": 3}, 1,
     "error: --num-query-groups (3) must divide --num-attention-heads (4)"),
    ({"--group-query-attention": "", "--num-query-groups": 1, "--tensor-model-parallel-size": 2}, 2,
     "error: --num-query-groups (1) must be divisible by --tensor-model-parallel-size (2)"),
    ({"--ffn-hidden-size": 129, "--tensor-model-parallel-size": 2}, 2,
     "error: --ffn-hidden-size (129) must be divisible by --tensor-model-parallel-size (2)"),
    ({"--num-experts": 2, "--moe-ffn-hidden-size": 33, "--tensor-model-parallel-size": 2}, 2,
     "error: --moe-ffn-hidden-size (33) must be divisible by --tensor-model-parallel-size (2)"),
    ({"--num-layers": 3, "--pipeline-model-parallel-size": 2}, 2,
     "error: --num-layers (3) must be divisible by --pipeline-model-parallel-size (2)"),
    ({"--num-experts": 3, "--expert-model-parallel-size": 2}, 2,
     "error: --num-experts (3) must be divisible by --expert-model-parallel-size (2)"),
    ({"--num-experts": 4, "--expert-model-parallel-size": 4}, 2,
     "error: --expert-model-parallel-size (4) must divide the data-parallel size (2)"),
    # TP=2 x EP=2 needs 4 ranks: the experts' tensor parallelism is TP (megatron-core's default)
    ({"--num-experts": 2, "--expert-model-parallel-size": 2, "--tensor-model-parallel-size": 2,
      "--sequence-parallel": "", "--disable-bias-linear": ""}, 2,
     "error: --expert-model-parallel-size (2) must divide the data-parallel size (1)"),
    ({"--num-experts": 2, "--tensor-model-parallel-size": 2, "--disable-bias-linear": ""}, 2,
     "error: an MoE with --tensor-model-parallel-size > 1 needs --sequence-parallel"),
    ({"--num-experts": 2, "--tensor-model-parallel-size": 2, "--sequence-parallel": ""}, 2,
     "error: an MoE with --tensor-model-parallel-size > 1 needs --disable-bias-linear"),
    ({"--pipeline-model-parallel-size": 2, "--num-layers": 4, "--num-layers-per-virtual-pipeline-stage": 1,
      "--micro-batch-size": 1, "--global-batch-size": 3}, 2,
     "error: interleaved pipelining (--num-layers-per-virtual-pipeline-stage) needs the micro-batches per step"),
    ({"--expert-model-parallel-size": 2}, 2, "error: --expert-model-parallel-size > 1 needs --num-experts"),
    ({"--global-batch-size": 6, "--micro-batch-size": 2}, 2,
     "error: --global-batch-size (6) must be divisible by --micro-batch-size (2) x data-parallel size (2)"),
])
def test_parallel_sizes_that_do_not_divide(corpus, workdir, save, capsys, over, world, expected):
    msg = refuse(base(corpus, save, **over), capsys, watch=[workdir], world_size=world)
    assert msg.startswith(expected), msg
    assert_clean(workdir, save)


def test_global_batch_not_divisible_by_micro_batch(corpus, workdir, save, capsys):
    msg = refuse(base(corpus, save, **{"--global-batch-size": 6, "--micro-batch-size": 4}), capsys, watch=[workdir])
    assert msg == ("error: --global-batch-size (6) must be divisible by --micro-batch-size (4) x "
                   "data-parallel size (1)"), msg
    assert_clean(workdir, save)


# ------------------------------------------------------------------------------ data and vocabulary
def test_vocabulary_smaller_than_token_ids(corpus, workdir, save, capsys):
    msg = refuse(base(corpus, save, **{"--vocab-size": 100}), capsys, watch=[workdir, os.path.dirname(corpus)])
    assert msg.startswith(f"error: --data-path {corpus}: token id 255 >= vocabulary size 101 of "
                          "--tokenizer-type NullTokenizer"), msg
    assert_clean(workdir, save)


@pytest.mark.parametrize("missing", [".bin", ".idx"])
def test_missing_bin_or_idx(corpus, workdir, save, capsys, missing):
    prefix = str(workdir / "data" / "half")
    os.makedirs(os.path.dirname(prefix))
    for ext in (".bin", ".idx"):
        if ext != missing:
            shutil.copy(corpus + ext, prefix + ext)
    msg = refuse(base(corpus, save, **{"--data-path": prefix}), capsys, watch=[workdir])
    assert msg == (f"error: --data-path: {prefix}{missing} not found (make it with tools/preprocess_data.py)"), msg
    assert_clean(workdir, save)


@pytest.mark.parametrize("given, hint", [
    ("{d}/email_text_document.bin", "; --data-path takes the prefix without .bin: {d}/email_text_document"),
    ("{d}/email", "; did you mean {d}/email_text_document? (tools/preprocess_data.py adds _<key>_document)"),
])
def test_data_path_near_miss_names_the_prefix(corpus, workdir, save, capsys, given, hint):
    d = workdir / "data"
    d.mkdir()
    for ext in (".bin", ".idx"):
        shutil.copy(corpus + ext, str(d / "email_text_document") + ext)
    path = given.format(d=d)
    msg = refuse(base(corpus, save, **{"--data-path": path}), capsys, watch=[workdir])
    assert msg == f"error: --data-path: {path}.bin not found" + hint.format(d=d), msg
    assert_clean(workdir, save)


def test_weighted_blend_with_an_odd_number_of_items(corpus, workdir, save, capsys):
    argv = base(corpus, save) + ["--data-path", "0.5", corpus, corpus]  # the last --data-path wins
    msg = refuse(argv, capsys, watch=[workdir])
    assert msg == (f"error: --data-path 0.5 {corpus} {corpus}: a weighted blend is pairs WEIGHT PREFIX; this list "
                   "has 3 items (a weight or a prefix is missing)"), msg
    assert_clean(workdir, save)


@pytest.mark.parametrize("damage", ["truncated_bin", "other_corpus_bin"])
def test_bin_and_idx_do_not_match(corpus, workdir, save, capsys, damage):
    prefix = str(workdir / "data" / "pair")
    os.makedirs(os.path.dirname(prefix))
    shutil.copy(corpus + ".idx", prefix + ".idx")
    if damage == "truncated_bin":
        shutil.copy(corpus + ".bin", prefix + ".bin")
        os.truncate(prefix + ".bin", os.path.getsize(prefix + ".bin") - 10)
    else:
        other = write_corpus(str(workdir / "data" / "other"), 30, seed=1)
        shutil.copy(other + ".bin", prefix + ".bin")
    expected = os.path.getsize(corpus + ".bin")
    actual = os.path.getsize(prefix + ".bin")
    msg = refuse(base(corpus, save, **{"--data-path": prefix}), capsys, watch=[workdir])
    assert msg.startswith(f"error: --data-path {prefix}: {prefix}.bin holds {actual} bytes but {prefix}.idx "
                          f"describes {expected}; the pair does not match"), msg
    assert_clean(workdir, save)


def test_garbage_sentencepiece_model(corpus, workdir, save, capsys):
    model = workdir / "spm.model"
    model.write_bytes(np.random.default_rng(0).bytes(400))
    msg = refuse(base(corpus, save, **{"--tokenizer-type": "SentencePieceTokenizer", "--vocab-size": None,
                                       "--tokenizer-model": model}), capsys, watch=[workdir])
    assert msg.startswith(f"error: --tokenizer-model {model}: tokenizer does not load"), msg
    assert "not a SentencePiece model" in msg
    assert_clean(workdir, save)


def test_missing_tokenizer_model(corpus, workdir, save, capsys):
    msg = refuse(base(corpus, save, **{"--tokenizer-type": "SentencePieceTokenizer", "--vocab-size": None,
                                       "--tokenizer-model": workdir / "nope.model"}), capsys, watch=[workdir])
    assert msg == f"error: --tokenizer-model {workdir / 'nope.model'}: no such file or directory", msg
    assert_clean(workdir, save)


def test_hf_include_special_tokens_with_another_tokenizer(corpus, workdir, save, capsys):
    msg = refuse(base(corpus, save, **{"--tokenizer-hf-include-special-tokens": ""}), capsys, watch=[workdir])
    assert msg == ("error: --tokenizer-hf-include-special-tokens applies to --tokenizer-type HuggingFaceTokenizer "
                   "only, not NullTokenizer; drop the flag"), msg
    assert_clean(workdir, save)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_wandb_project_without_wandb(corpus, workdir, save, capsys):
    msg = refuse(base(corpus, save, **{"--wandb-project": "tst"}), capsys, watch=[workdir])
    assert msg == ("error: --wandb-project needs the `wandb` package: pip install 'tst-megatron[wandb]' "
                   "(or drop --wandb-project)"), msg
    assert_clean(workdir, save)


# ------------------------------------------------------------------------------ --load
def test_load_dir_without_checkpoint(corpus, workdir, save, capsys):
    empty = workdir / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a checkpoint")
    msg = refuse(base(corpus, save, **{"--load": empty}), capsys, watch=[workdir])
    assert msg == (f"error: --load {empty}: the directory holds no checkpoint (no "
                   "latest_checkpointed_iteration.txt and no iter_* directories)"), msg
    assert_clean(workdir, save)


def test_load_of_an_iteration_directory_names_its_parent(corpus, trained, workdir, save, capsys):
    it = trained / "iter_0000002"
    msg = refuse(base(corpus, save, **{"--load": it}), capsys, watch=[workdir, trained])
    assert msg == (f"error: --load {it}: this is one checkpoint's iteration directory; give the directory that "
                   f"holds it (--load {trained}), whose latest_checkpointed_iteration.txt names the iteration "
                   "to resume"), msg
    assert_clean(workdir, save)


def test_fresh_run_into_a_save_directory_with_checkpoints(corpus, trained, workdir, capsys):
    """Without --load the run would start over and mix its checkpoints and tracker with another run's."""
    msg = refuse(base(corpus, trained), capsys, watch=[workdir, trained])
    assert msg == (f"error: --save {trained}: the directory already holds checkpoints of a run; resume it with "
                   f"--load {trained}, or choose a new --save directory (this run would mix its checkpoints "
                   "with those and replace their tracker)"), msg


def test_fresh_run_keeps_an_earlier_metrics_file(corpus, workdir, monkeypatch, capsys):
    """Two runs without --save in one directory: the second keeps the first one's metrics.jsonl."""
    monkeypatch.chdir(workdir)
    argv = base(corpus, None, **{"--train-iters": 2, "--tst-superposition-iters": 1})
    with isolated():
        assert main(argv) == 0
    first = (workdir / "metrics.jsonl").read_text()
    with isolated():
        assert main(argv) == 0
    assert (workdir / "metrics.jsonl.1").read_text() == first
    assert (workdir / "metrics.jsonl").read_text().count('"type": "train"') == 2
    assert "> metrics.jsonl held the metrics of an earlier run: kept as metrics.jsonl.1" in capsys.readouterr().out


def test_load_dir_that_does_not_exist(corpus, workdir, save, capsys):
    msg = refuse(base(corpus, save, **{"--load": workdir / "nowhere"}), capsys, watch=[workdir])
    assert msg == f"error: --load {workdir / 'nowhere'}: directory does not exist", msg
    assert_clean(workdir, save)


def test_exit_on_missing_checkpoint(corpus, workdir, save, capsys):
    """--load == --save starts fresh when nothing is there yet (a requeue-friendly first start);
    with --exit-on-missing-checkpoint that is an error: a job that lost its checkpoints stops."""
    save.mkdir()
    msg = refuse(base(corpus, save, **{"--load": save, "--exit-on-missing-checkpoint": ""}), capsys,
                 watch=[workdir])
    assert msg == (f"error: --load {save}: no checkpoint there (no latest_checkpointed_iteration.txt and no iter_* "
                   "directories) and --exit-on-missing-checkpoint is set; stopping before any compute"), msg
    assert not list(save.iterdir())
    assert not list(workdir.rglob("metrics.jsonl"))


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """A run of --train-iters 4 (s=4) stopped by --exit-interval 2 with its checkpoint at 2."""
    root = tmp_path_factory.mktemp("trained")
    save = root / "run"
    cwd = os.getcwd()
    os.chdir(root)
    try:
        with isolated():
            assert main(base(corpus, save, **{"--exit-interval": 2})) == 0
    finally:
        os.chdir(cwd)
    assert ckpt.find_checkpoint(str(save), fallback=False)[0] == 2
    return save


def test_resume_into_another_runs_metrics_file_keeps_it(corpus, trained, workdir, capsys):
    """A resume whose metrics file is not its own run's (here: --save in a directory where another
    run logged) keeps that file aside whole instead of cutting it back to the checkpoint's iteration,
    and starts its file with a run record that names the checkpoint it continues."""
    run_id = json.loads((trained / "iter_0000002" / "tst_meta.json").read_text())["run_id"]
    own = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert run_id and own[0]["type"] == "run" and own[0]["run_id"] == run_id
    other = workdir / "other"
    other.mkdir()
    foreign = "".join(json.dumps(r) + "\n" for r in [{"type": "run", "run_id": "someone-else"}]
                      + [{"type": "train", "iteration": i, "loss": 1.0} for i in range(1, 6)])
    (other / "metrics.jsonl").write_text(foreign)
    with isolated():
        assert main(base(corpus, other, **{"--load": trained, "--exit-interval": 3})) == 0
    assert (other / "metrics.jsonl.1").read_text() == foreign
    records = [json.loads(line) for line in (other / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["type"] == "run" and records[0]["run_id"] == run_id
    assert (records[0]["resumed_at_iteration"], records[0]["resumed_from"]) == (2, str(trained / "iter_0000002"))
    assert [r["iteration"] for r in records if r["type"] == "train"] == [3]
    assert f"held the metrics of another run: kept as {other / 'metrics.jsonl.1'}" in capsys.readouterr().out


@pytest.mark.parametrize("over,diff", [
    ({"--tst-bag-size": 2}, "--tst-bag-size 2 (checkpoint: 4)"),
    ({"--tst-mode": "output"}, "--tst-mode output (checkpoint: full)"),
    ({"--hidden-size": 32}, "--hidden-size 32 (checkpoint: 64)"),
    ({"--num-layers": 4}, "--num-layers 4 (checkpoint: 2)"),
    ({"--seq-length": 8}, "--seq-length 8 (checkpoint: 16)"),
    ({"--train-iters": 6}, "--train-iters 6 (checkpoint: 4)"),
    ({"--lr": 0.01}, "--lr 0.01 (checkpoint: 0.001)"),
    ({"--tst-superposition-iters": 3}, "3 superposition iterations from --tst-superposition-iters/-ratio "
                                       "(checkpoint: 2)"),
    # 18 samples at global batch 4: still 4 iterations, but a schedule of 4.5 steps (Megatron counts samples)
    ({"--train-iters": None, "--train-samples": 18},
     "an LR schedule of warmup 0, decay 4.5 steps from --train-iters/--train-samples and the "
     "--lr-*-iters/-samples/--lr-warmup-fraction flags (checkpoint: warmup 0, decay 4)"),
])
def test_resume_with_other_configuration_refused(corpus, trained, workdir, capsys, over, diff):
    over = dict({"--load": trained}, **over)
    msg = refuse(base(corpus, trained, **over), capsys, watch=[trained, workdir])
    # another weight shape cannot be overridden (the tensors would not load)
    fix = ("The weights have the checkpoint's shape: use its values, or --load / --save another directory for "
           "a new run" if diff.startswith(("--hidden-size", "--num-layers"))
           else "Use the checkpoint's values, or pass --override-checkpoint-args")
    assert msg == (f"error: --load {trained}/iter_0000002: the checkpoint was trained with a different "
                   f"configuration: {diff}. {fix}"), msg
    assert not list(workdir.rglob("metrics.jsonl"))


def test_resume_with_another_tokenizer_refused(corpus, trained, workdir, capsys):
    """ByteTokenizer and the checkpoint's NullTokenizer (256 ids) pad to the same vocabulary: the
    weights would load and train on ids that mean other tokens."""
    msg = refuse(base(corpus, trained, **{"--load": trained, "--tokenizer-type": "ByteTokenizer",
                                          "--vocab-size": None}), capsys, watch=[trained, workdir])
    assert msg == (f"error: --load {trained}/iter_0000002: the checkpoint was trained with --tokenizer-type "
                   "NullTokenizer, this run gives --tokenizer-type ByteTokenizer; its embedding rows stand for "
                   "that tokenizer's tokens. Use the checkpoint's tokenizer, or pass --override-checkpoint-args "
                   "to train the weights on another one"), msg


@pytest.mark.parametrize("over, changed", [
    ({"--seed": 99, "--split": "80,20,0"}, "--seed 99 (checkpoint: 1234); --split 80,20,0 (checkpoint: 90,10,0)"),
    ({"--data-path": "OTHER"}, "--data-path OTHER (checkpoint: CORPUS)"),
])
def test_resume_with_another_seed_split_or_data_warns(corpus, trained, tmp_path, monkeypatch, capsys, over, changed):
    """A new data order for the rest of a run is allowed (e.g. another mix), and said; the stream
    checks that keep a resume on the checkpoint's own stream do not apply to other data (these
    splits and corpus give another number of train windows than the checkpoint's 11)."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    other = write_corpus(str(tmp_path / "other"), 40, seed=3)
    over = {k: (other if v == "OTHER" else v) for k, v in over.items()}
    changed = changed.replace("OTHER", other).replace("CORPUS", corpus)
    monkeypatch.chdir(tmp_path)
    with isolated():
        assert main(base(corpus, run, **{"--load": run, **over})) == 0
    out = capsys.readouterr().out
    assert (f"> warning: resuming {run}/iter_0000002 with {changed}: unless that is the same data (or "
            "tokenizer file) moved, this run does not see the samples an uninterrupted run would") in out, out
    assert ckpt.find_checkpoint(str(run), fallback=False)[0] == 4


def test_resume_in_superposition_with_another_bag_weighting_warns(corpus, tmp_path, monkeypatch, capsys):
    """Another --tst-bag-weighting is a loss choice, allowed on resume, but inside the superposition
    phase it changes the objective mid-phase: said; after the switch it changes nothing."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    with isolated():
        assert main(base(corpus, run, **{"--exit-interval": 1})) == 0
    capsys.readouterr()
    with isolated():
        assert main(base(corpus, run, **{"--load": run, "--tst-bag-weighting": "power", "--exit-interval": 2})) == 0
    assert (f"> warning: resuming {run}/iter_0000001 in the superposition phase with --tst-bag-weighting power "
            "(checkpoint: uniform): the rest of the phase trains on another multi-hot loss") in capsys.readouterr().out
    with isolated():  # from iteration 2, the first recovery step: no warning
        assert main(base(corpus, run, **{"--load": run, "--tst-bag-weighting": "exp"})) == 0
    assert "--tst-bag-weighting" not in capsys.readouterr().out
    assert ckpt.find_checkpoint(str(run), fallback=False)[0] == 4


def test_resume_on_another_kind_of_device_keeps_its_own_rng(corpus, tmp_path, monkeypatch, capsys):
    """The RNG tracker holds CPU generator states on a CPU and CUDA ones on a GPU: a checkpoint
    saved on the other kind (marked so here) resumes without restoring them, and says so."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    with isolated():
        assert main(base(corpus, run, **{"--exit-interval": 2})) == 0
    marker = run / "iter_0000002" / ckpt.MARKER
    meta = json.loads(marker.read_text())
    assert meta["rng_device"] == "cpu"
    marker.write_text(json.dumps(dict(meta, rng_device="cuda")))
    capsys.readouterr()
    with isolated():
        assert main(base(corpus, run, **{"--load": run})) == 0
    assert (f"> resumed from {run}/iter_0000002 at iteration 2 (recovery phase, 8 samples consumed); RNG state "
            "not restored (saved on cuda, resumed on cpu)") in capsys.readouterr().out
    assert ckpt.find_checkpoint(str(run), fallback=False)[0] == 4


def test_moe_runs_one_after_another_in_one_process(corpus, tmp_path, monkeypatch, capsys):
    """megatron-core's MoE loss tracker is process-wide: a second in-process run (a notebook, a
    test) with another layer count logs its own router losses, not the first run's leftovers."""
    monkeypatch.chdir(tmp_path)
    moe = {"--num-experts": 4, "--moe-router-topk": 2, "--moe-aux-loss-coeff": 0.01, "--disable-bias-linear": "",
           "--train-iters": 2, "--tst-superposition-iters": 1}
    for layers in (4, 2):
        with isolated():
            assert main(base(corpus, tmp_path / f"run{layers}", **moe, **{"--num-layers": layers})) == 0
        lines = [x for x in capsys.readouterr().out.splitlines() if " load_balancing_loss: " in x]
        assert len(lines) == 2, lines
        assert all(1.0 <= float(x.split(" load_balancing_loss: ")[1].split()[0]) < 4.0 for x in lines), lines


def test_finetune_checks_only_the_weight_shape(corpus, trained, tmp_path, monkeypatch, capsys):
    """--finetune from the checkpoint: another bag size, schedule and sequence length are a new run's
    own choice; another --hidden-size cannot take the weights."""
    monkeypatch.chdir(tmp_path)
    msg = refuse(base(corpus, tmp_path / "ft", **{"--load": trained, "--finetune": "", "--hidden-size": 32}), capsys,
                 watch=[trained, tmp_path])
    assert msg.startswith(f"error: --load {trained}/iter_0000002: the checkpoint was trained with a different "
                          "configuration: --hidden-size 32 (checkpoint: 64). The weights have the checkpoint's shape"), msg
    # the same from --pretrained-checkpoint: the message names that flag (and no --load to change)
    msg = refuse(base(corpus, tmp_path / "pt", **{"--pretrained-checkpoint": trained, "--hidden-size": 32}), capsys,
                 watch=[trained, tmp_path])
    assert msg == (f"error: --pretrained-checkpoint {trained}/iter_0000002: the checkpoint was trained with a "
                   "different configuration: --hidden-size 32 (checkpoint: 64). The weights have the checkpoint's "
                   "shape: use its values"), msg
    with isolated():
        assert main(base(corpus, tmp_path / "ft", **{"--load": trained, "--finetune": "", "--tst-bag-size": 2,
                                                     "--seq-length": 8, "--lr": 0.01, "--train-iters": 3})) == 0
    assert f"> fine-tuning from the weights of {trained}/iter_0000002" in capsys.readouterr().out
    assert ckpt.find_checkpoint(str(tmp_path / "ft"), fallback=False)[0] == 3


def test_finetune_keeps_a_learned_position_table(corpus, tmp_path, monkeypatch, capsys):
    """With learned positions the table has --max-position-embeddings (else --seq-length) rows: a
    fine-tune with a longer sequence cannot take the weights; one within the table can."""
    monkeypatch.chdir(tmp_path)
    learned = {"--position-embedding-type": "learned_absolute", "--max-position-embeddings": 16}
    with isolated():
        assert main(base(corpus, tmp_path / "src", **learned)) == 0
    msg = refuse(base(corpus, tmp_path / "ft", **{**learned, "--load": tmp_path / "src", "--finetune": "",
                                                   "--seq-length": 24, "--max-position-embeddings": None}),
                 capsys, watch=[tmp_path / "src"])
    assert msg.startswith(f"error: --load {tmp_path / 'src'}/iter_0000004: the checkpoint was trained with a different "
                          "configuration: a learned position table of 24 rows (--max-position-embeddings, else "
                          "--seq-length; checkpoint: 16). The weights have the checkpoint's shape"), msg
    with isolated():
        assert main(base(corpus, tmp_path / "ft", **{**learned, "--load": tmp_path / "src", "--finetune": "",
                                                     "--seq-length": 8})) == 0


def test_resume_with_defaults_given_explicitly_is_the_same_run(corpus, trained, tmp_path, monkeypatch, capsys):
    """Flags given explicitly at their derived defaults (--ffn-hidden-size 4h, --kv-channels h/heads,
    --lr-decay-iters = --train-iters) describe the same run as leaving them unset: resumed."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    monkeypatch.chdir(tmp_path)
    argv = base(corpus, run, **{"--load": run, "--ffn-hidden-size": 256, "--kv-channels": 16,
                                "--lr-decay-iters": 4})
    with isolated():
        assert main(argv) == 0
    assert f"resumed from {run}/iter_0000002 at iteration 2" in capsys.readouterr().out
    assert ckpt.find_checkpoint(str(run), fallback=False)[0] == 4


def test_resume_toggling_distributed_optimizer_refused(corpus, trained, tmp_path, monkeypatch, capsys):
    """The checkpoint was saved without --use-distributed-optimizer: loading its Adam state into a
    distributed optimizer is refused before loading (megatron-core would fail on missing keys deep in
    dist_checkpointing); with --no-load-optim the same resume runs."""
    workdir = tmp_path / "w"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    msg = refuse(base(corpus, trained, **{"--load": trained, "--use-distributed-optimizer": ""}), capsys,
                 watch=[trained, workdir])
    assert msg == (f"error: --load {trained}/iter_0000002: the checkpoint was saved without "
                   "--use-distributed-optimizer and this run is with it; the two keep the optimizer state in "
                   "different forms. Resume with the checkpoint's setting, or with --no-load-optim (weights, data "
                   "position and LR schedule are kept, the Adam moments restart)"), msg
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    with isolated():
        assert main(base(corpus, run, **{"--load": run, "--use-distributed-optimizer": "", "--no-load-optim": ""})) == 0
    assert f"resumed from {run}/iter_0000002 at iteration 2" in capsys.readouterr().out
    assert ckpt.find_checkpoint(str(run), fallback=False)[0] == 4


def test_resume_with_other_bag_size_and_schedule_allowed_with_override(corpus, trained, tmp_path, monkeypatch,
                                                                      capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    monkeypatch.chdir(tmp_path)
    argv = base(corpus, run, **{"--train-iters": 5, "--tst-bag-size": 2, "--load": run,
                                "--override-checkpoint-args": ""})
    with isolated():
        assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"resumed from {run}/iter_0000002 at iteration 2" in out
    assert "warning: --override-checkpoint-args: the data stream differs from the checkpoint's" in out
    assert ckpt.find_checkpoint(str(run), fallback=False)[0] == 5
    assert ckpt.read_meta(str(run / "iter_0000005"))["args"]["tst"]["bag_size"] == 2
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("type") == "train"]
    assert [r["iteration"] for r in train] == [1, 2, 3, 4, 5]
    assert train[-1]["lr"] == 0.0  # the new cosine schedule over 5 iterations, from the saved step


def test_override_cannot_load_a_different_model_shape(corpus, trained, workdir, capsys):
    """--override-checkpoint-args lets the shape check pass, but tensors of another shape cannot
    be loaded: a clear error naming the checkpoint, still before any step or write."""
    over = {"--hidden-size": 32, "--load": trained, "--override-checkpoint-args": ""}
    msg = refuse(base(corpus, trained, **over), capsys, watch=[trained, workdir])
    assert msg.startswith(f"error: checkpoint {trained}/iter_0000002 could not be loaded: "), msg
    assert not list(workdir.rglob("metrics.jsonl"))


def test_group_query_attention_without_a_group_count_is_multi_query(corpus, capsys):
    """As in Megatron-LM, --group-query-attention alone means one query group (multi-query
    attention); it is never silently built as ordinary multi-head attention."""
    cfg = parse_args(base(corpus, **{"--group-query-attention": "", "--num-attention-heads": 8}))
    assert cfg.model.num_query_groups == 1
    sizes = []
    for over in ({"--group-query-attention": ""}, {"--group-query-attention": "", "--num-query-groups": 1}, {}):
        with isolated():
            assert main(base(corpus, **dict({"--num-attention-heads": 8, "--print-model-size": ""}, **over))) == 0
        sizes.append(capsys.readouterr().out)
    assert sizes[0] == sizes[1] != sizes[2], sizes  # MQA has fewer key/value parameters than MHA


def test_resume_at_the_switch_with_another_global_batch(corpus, trained, tmp_path, monkeypatch, capsys):
    """Megatron users change --global-batch-size on resume; the TST stream keeps its position:
    the checkpoint (iteration 2, the switch) continues in recovery with 2 samples per step, each
    of L tokens, from sample 8 on -- the trainer checks every step's batch layout against its phase.
    A batch of 8 would need more windows than this tiny corpus's one epoch holds (a second epoch
    reshuffles the stream): refused before anything is written."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    monkeypatch.chdir(tmp_path)
    msg = refuse(base(corpus, run, **{"--load": run, "--global-batch-size": 8}), capsys, watch=[run])
    assert msg.startswith(f"error: --load {run}/iter_0000002: this run's --global-batch-size / --train-iters "
                          "need a longer data stream than the checkpoint's"), msg
    with isolated():
        assert main(base(corpus, run, **{"--load": run, "--global-batch-size": 2})) == 0
    out = capsys.readouterr().out
    assert f"resumed from {run}/iter_0000002 at iteration 2" in out
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = {r["iteration"]: r for r in records if r.get("type") == "train"}
    assert sorted(train) == [1, 2, 3, 4]
    assert [train[i]["phase"] for i in (1, 2, 3, 4)] == ["superposition"] * 2 + ["recovery"] * 2
    assert [train[i]["consumed_samples"] for i in (1, 2, 3, 4)] == [4, 8, 10, 12]
    seq = 16
    assert train[3]["data_tokens"] - train[2]["data_tokens"] == 2 * seq  # recovery: L tokens per sample
    assert train[2]["data_tokens"] == 2 * 4 * seq * 4  # superposition: s*L per sample
    # wall-clock continues across the resume (the checkpoint carries the time trained so far)
    assert train[3]["elapsed_s"] >= train[2]["elapsed_s"] > 0


def test_resume_needing_a_longer_stream_is_refused():
    """megatron's order of the train windows depends on how many it was asked for; a resume whose
    --global-batch-size / --train-iters need more than the checkpoint's stream holds would deal
    the consumed positions differently, in either phase (tests/test_data.py builds both streams)."""
    from tst_megatron.preflight import check_resume_stream

    meta = {"train_base_windows": 120}
    kw = dict(consumed_samples=16, same_batch_and_length=False)
    with pytest.raises(SystemExit, match=r"--load ck: this run's --global-batch-size / --train-iters need a longer "
                                         r"data stream than the checkpoint's \(120 -> 130 windows\).*Resume with "
                                         r"the checkpoint's --global-batch-size"):
        check_resume_stream(meta, "ck", base_windows=130, **kw)
    check_resume_stream(meta, "ck", base_windows=120, **kw)  # the checkpoint's stream: fine
    check_resume_stream(meta, "ck", base_windows=130, **dict(kw, consumed_samples=0))  # nothing consumed
    check_resume_stream({}, "ck", base_windows=130, **dict(kw, same_batch_and_length=True))  # older checkpoint
    with pytest.raises(SystemExit, match=r"\(unknown -> 130 windows\)"):
        check_resume_stream({}, "ck", base_windows=130, **kw)
    check_resume_stream(meta, "ck", base_windows=130, **dict(kw, override=True))  # the user's call: a warning
