"""Tests of the superposition data wrapper on a synthetic on-disk corpus with known tokens.

Every document holds consecutive integers and no value repeats across documents, so a token
value names its stream position: we can check continuations and overlaps exactly.
"""
import numpy as np
import pytest
import torch
import torch.distributed as dist
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import (
    GPTDataset,
    GPTDatasetConfig,
    _get_ltor_masks_and_position_ids,
)
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer
from torch.utils.data import default_collate

from tst_megatron.config import TSTConfig
from tst_megatron.data import (
    IGNORE_INDEX,
    PretrainingSampler,
    TSTDataset,
    base_sequence_length,
    build_data_iterator,
    build_tst_datasets,
    num_base_samples,
    recovery_chunks,
    resume_sample_plan,
)

V = 100_000
EOD = V  # NullTokenizer(V).eod
L, S, GBS, TRAIN_ITERS = 8, 4, 4, 10


# ------------------------------------------------------------------------------- corpus helpers
def make_docs(n_docs, first_value, with_eod=False):
    docs, v = [], first_value
    for k in range(n_docs):
        n = 10 + (7 * k) % 41
        docs.append(list(range(v, v + n)) + ([EOD] if with_eod else []))
        v += n
    return docs


def write_corpus(prefix, docs):
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for doc in docs:
        builder.add_item(torch.tensor(doc, dtype=torch.int64))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


class Stream:
    """Knows which values end a document, to tell whether a token sequence is a packed run."""

    def __init__(self, docs):
        self.last = {d[-1] for d in docs}
        self.first = {d[0] for d in docs}

    def follows(self, a, b):
        return b in self.first if a in self.last else b == a + 1

    def is_piece(self, values):
        values = [int(x) for x in values]
        return all(self.follows(a, b) for a, b in zip(values, values[1:]))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    plain = make_docs(200, 1)
    eod = make_docs(120, 1, with_eod=True)
    other = make_docs(200, 50_000)
    return {
        "plain": (write_corpus(str(root / "plain"), plain), Stream(plain)),
        "eod": (write_corpus(str(root / "eod"), eod), None),
        "other": (write_corpus(str(root / "other"), other), Stream(other)),
    }


@pytest.fixture
def process_group(tmp_path):
    """A 1-rank gloo group: megatron's BlendedDataset cache path asks for the rank."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def build(tmp_path, tst, prefixes, seed=1, cache="cache", weights=None, train_iters=TRAIN_ITERS, **kw):
    return build_tst_datasets(
        tst, seq_length=L, train_iters=train_iters, global_batch_size=GBS, eval_iters=1,
        tokenizer=NullTokenizer(V), seed=seed, blend=(list(prefixes), weights),
        split="80,10,10", data_cache_path=str(tmp_path / cache), **kw)


def tst_cfg(mode="full", s=S):
    return TSTConfig(bag_size=s, superposition_ratio=0.3, mode=mode)


def input_values(sample):
    return [int(x) for x in sample["tokens"].flatten()]


# ------------------------------------------------------------------------------- geometry
def test_geometry_helpers():
    assert base_sequence_length(L, tst_cfg("full")) == S * (L + 1) - 1
    assert base_sequence_length(L, tst_cfg("input")) == S * (L + 1) - 1
    assert base_sequence_length(L, tst_cfg("output")) == L + S - 1
    assert base_sequence_length(L, TSTConfig()) == L
    assert recovery_chunks(tst_cfg("full")) == S and recovery_chunks(tst_cfg("output")) == 1
    assert num_base_samples(tst_cfg("full"), 12, 28) == 12 + 7
    assert num_base_samples(tst_cfg("output"), 12, 28) == 40
    assert num_base_samples(TSTConfig(), 0, 40) == 40


# ------------------------------------------------------------------------------- (1) full mode
def test_full_mode_input_bag_next_equals_label_bag_and_continues_stream(tmp_path, corpus):
    prefix, stream = corpus["plain"]
    ds = build(tmp_path, tst_cfg("full"), [prefix]).train
    n_sup = ds.num_superposition_samples
    assert n_sup == 3 * GBS  # floor(0.3 * 10) iterations
    for i in range(n_sup):
        x = ds[i]
        assert ds.phase_of(i) == "superposition"
        assert x["tokens"].shape == (L, S) and x["labels"].shape == (L, S)
        assert x["tokens"].dtype == torch.int64 and x["labels"].dtype == torch.int64
        assert torch.equal(x["tokens"][1:], x["labels"][:-1])  # input bag i+1 == label bag i
        flat = torch.cat([x["tokens"].flatten(), x["labels"][-1]])
        assert stream.is_piece(flat), f"sample {i} is not a packed run of the corpus"
        assert torch.equal(x["labels"].flatten(), flat[S:])
        assert (x["labels"] != IGNORE_INDEX).all()  # all s targets valid, last position included
        assert torch.equal(x["loss_mask"], torch.ones(L))
        assert torch.equal(x["position_ids"], torch.arange(L))


# ------------------------------------------------------------------------------- (2) recovery
def test_recovery_continues_base_stream_without_rereading(tmp_path, corpus):
    prefix, stream = corpus["plain"]
    ds = build(tmp_path, tst_cfg("full"), [prefix]).train
    n_sup, n_train = ds.num_superposition_samples, TRAIN_ITERS * GBS
    assert len(ds) == n_sup + S * (len(ds.base) - n_sup) >= n_train
    docs = [int(d) for d in ds.base.document_index]
    assert len(docs) == len(set(docs)), "test needs a single-epoch base dataset"

    seen = {}
    for i in range(n_train):
        for v in input_values(ds[i]):
            assert v not in seen, f"stream position {v} read by samples {seen[v]} and {i}"
            seen[v] = i

    # recovery sample (b, c) is chunk c of base window b, and its target is the next token
    for i in range(n_sup, n_train):
        x = ds[i]
        assert ds.phase_of(i) == "recovery"
        assert x["tokens"].shape == (L,) and x["labels"].shape == (L,)
        b, c = ds.base_index_of(i)
        assert b >= n_sup and 0 <= c < S
        item = ds.base[b]
        text = torch.cat([item["tokens"], item["labels"][-1:]])
        assert torch.equal(torch.cat([x["tokens"], x["labels"][-1:]]),
                           text[c * (L + 1):(c + 1) * (L + 1)])
        assert torch.equal(x["labels"][:-1], x["tokens"][1:])
        assert stream.is_piece(torch.cat([x["tokens"], x["labels"][-1:]]))
        assert torch.equal(x["loss_mask"], torch.ones(L))


def test_recovery_batches_are_not_s_pieces_of_the_same_text(tmp_path, corpus, monkeypatch):
    """Every (window, chunk) of the recovery windows is used exactly once, a block of windows at a
    time (the last block shorter), and the s pieces of one window are dealt apart, not side by
    side: consecutive samples almost never share a window (in order, s - 1 of every s would).
    The blocks end where the run's plan ends (megatron's stream runs on to a whole epoch): the
    run's recovery samples read every planned window and none past the plan."""
    import tst_megatron.data as data_mod

    monkeypatch.setattr(data_mod, "RECOVERY_SPREAD_WINDOWS", 7)
    prefix, _ = corpus["plain"]
    ds = build(tmp_path, tst_cfg("full"), [prefix], train_iters=45).train
    n_sup, windows = ds.num_superposition_samples, len(ds.base) - ds.num_superposition_samples
    planned = ds.planned_windows - n_sup
    assert 2 * 7 < planned < windows and planned % 7, "test needs several blocks, a partial last one, a stream past the plan"
    pairs = [ds.base_index_of(i) for i in range(n_sup, len(ds))]
    assert sorted(pairs) == [(n_sup + w, c) for w in range(windows) for c in range(S)]
    for j, (b, _) in enumerate(pairs):  # block j // (7 S) of a region draws only from its own 7 windows
        if j < planned * S:
            assert (b - n_sup) // 7 == j // (7 * S)
        else:
            assert n_sup + planned <= b and (b - n_sup - planned) // 7 == (j - planned * S) // (7 * S)
    need = 45 * GBS - n_sup
    assert {b for b, _ in pairs[:need]} == set(range(n_sup, n_sup + planned))
    same = sum(a[0] == b[0] for a, b in zip(pairs, pairs[1:]))
    assert same < 0.4 * len(pairs) * (S - 1) / S, same
    # a pure function of the index: a fresh dataset (a resumed run, another rank) agrees
    again = build(tmp_path, tst_cfg("full"), [prefix], train_iters=45).train
    assert [again.base_index_of(i) for i in range(len(ds) - 1, n_sup - 1, -1)] == pairs[::-1]


# ------------------------------------------------------------------------------- (3) seeds
def test_same_seed_same_samples_other_seed_differs(tmp_path, corpus):
    prefix, _ = corpus["plain"]
    a = build(tmp_path, tst_cfg("full"), [prefix], seed=7, cache="a").train
    b = build(tmp_path, tst_cfg("full"), [prefix], seed=7, cache="b").train
    c = build(tmp_path, tst_cfg("full"), [prefix], seed=8, cache="c").train
    n = TRAIN_ITERS * GBS
    for i in range(n):
        for k in ("tokens", "labels", "loss_mask", "position_ids"):
            assert torch.equal(a[i][k], b[i][k])
    assert any(not torch.equal(a[i]["tokens"], c[i]["tokens"]) for i in range(n))


# ------------------------------------------------------------------------------- (4) s == 1
def _plain_gpt_splits(tmp_path, prefix, seed, eod_mask_loss, reset_position_ids):
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=L, blend=([prefix], None), split="80,10,10",
        tokenizer=NullTokenizer(V), path_to_cache=str(tmp_path / "plain_cache"),
        reset_position_ids=reset_position_ids, reset_attention_mask=False,
        eod_mask_loss=eod_mask_loss, create_attention_mask=False)
    sizes = [TRAIN_ITERS * GBS, GBS, GBS]  # validation: the eval-iters batches every evaluation reads
    return BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()


def _assert_same_samples(ours, theirs):
    assert len(ours) == len(theirs)
    for i in range(len(theirs)):
        x, y = ours[i], theirs[i]
        for k in ("tokens", "labels", "loss_mask", "position_ids"):
            assert torch.equal(x[k], y[k]), f"index {i} key {k}"


@pytest.mark.parametrize("tst", [TSTConfig(), TSTConfig(bag_size=S, superposition_iters=0)], ids=["s1", "no_sup"])
def test_bag_size_one_is_the_plain_gpt_dataset(tmp_path, corpus, tst):
    """s = 1, and s > 1 with no superposition iteration (what the warning calls a plain run)."""
    prefix, _ = corpus["eod"]
    kw = dict(eod_mask_loss=True, reset_position_ids=True)
    ours = build(tmp_path, tst, [prefix], seed=3, **kw)
    train, valid, _ = _plain_gpt_splits(tmp_path, prefix, 3, **kw)
    assert ours.num_superposition_samples == 0 and ours.valid_mce is None
    assert all(ours.train.phase_of(i) == "recovery" for i in range(len(ours.train)))
    _assert_same_samples(ours.train, train)
    _assert_same_samples(ours.valid_lm, valid)


def test_tst_lm_validation_is_the_baseline_validation(tmp_path, corpus):
    prefix, _ = corpus["plain"]
    tst = build(tmp_path, tst_cfg("full"), [prefix], seed=3)
    baseline = build(tmp_path, TSTConfig(), [prefix], seed=3, cache="baseline")
    _assert_same_samples(tst.valid_lm, baseline.valid_lm)
    _assert_same_samples(tst.test_lm, baseline.test_lm)
    mce = tst.valid_mce
    assert len(mce) == len(mce.base) and all(mce.phase_of(i) == "superposition" for i in range(len(mce)))
    assert mce[0]["tokens"].shape == (L, S)


def test_validation_does_not_depend_on_the_run_length(tmp_path, corpus):
    """A TST run and a baseline twice as long (the paper's comparison) are scored on the same
    validation text: the split is asked only for the batches an evaluation reads. (Asked for
    Megatron-LM's count, which grows with --train-iters / --eval-interval, a split smaller than the
    request is shuffled over several epochs and its first batches change with the run length.)"""
    prefix, _ = corpus["plain"]
    short = build(tmp_path, tst_cfg("full"), [prefix], seed=3, cache="short")
    long = build(tmp_path, tst_cfg("full"), [prefix], seed=3, cache="long", train_iters=100 * TRAIN_ITERS)
    assert 100 * TRAIN_ITERS // 5 * GBS > len(short.valid_lm)  # Megatron-LM's count would need epochs
    _assert_same_samples(short.valid_lm, long.valid_lm)
    _assert_same_samples(short.valid_mce, long.valid_mce)


# ------------------------------------------------------------------------------- (5) modes
def test_input_mode_layout(tmp_path, corpus):
    prefix, stream = corpus["plain"]
    ds = build(tmp_path, tst_cfg("input"), [prefix]).train
    for i in range(ds.num_superposition_samples):
        x = ds[i]
        assert x["tokens"].shape == (L, S) and x["labels"].shape == (L, 1)
        assert stream.is_piece(x["tokens"].flatten())
        assert torch.equal(x["labels"][:-1, 0], x["tokens"][1:, 0])  # next bag's first token
        assert stream.follows(int(x["tokens"][-1, -1]), int(x["labels"][-1, 0]))
        assert torch.equal(x["loss_mask"], torch.ones(L))
    assert len(ds) == ds.num_superposition_samples + S * (len(ds.base) - ds.num_superposition_samples)


def test_output_mode_layout(tmp_path, corpus):
    prefix, stream = corpus["plain"]
    ds = build(tmp_path, tst_cfg("output"), [prefix]).train
    n_sup = ds.num_superposition_samples
    for i in range(n_sup):
        x = ds[i]
        assert x["tokens"].shape == (L,) and x["labels"].shape == (L, S)
        text = torch.cat([x["tokens"], x["labels"][-1]])  # L + S tokens
        assert stream.is_piece(text)
        for j in range(S):
            assert torch.equal(x["labels"][:, j], text[1 + j: 1 + j + L])
        assert torch.equal(x["loss_mask"], torch.ones(L))
    assert len(ds) == len(ds.base)  # one recovery sample per base window
    r = ds[n_sup]
    assert r["tokens"].shape == (L,) and torch.equal(r["labels"][:-1], r["tokens"][1:])


# ------------------------------------------------------------------------------- masking
def test_eod_masking_matches_megatron(tmp_path, corpus):
    prefix, _ = corpus["eod"]
    ds = build(tmp_path, tst_cfg("full"), [prefix], eod_mask_loss=True,
               reset_position_ids=True).train
    n_sup = ds.num_superposition_samples
    masked_any = False
    for i in range(n_sup):
        x = ds[i]
        flat = torch.cat([x["tokens"].flatten(), x["labels"][-1]])
        invalid = torch.zeros(flat.numel(), dtype=torch.bool)
        invalid[1:] = flat[:-1] == EOD  # megatron: no loss on the token after an EOD
        expect = torch.where(invalid[S:], torch.full_like(flat[S:], IGNORE_INDEX), flat[S:])
        assert torch.equal(x["labels"].flatten(), expect)
        assert torch.equal(x["loss_mask"], (~invalid[S:].view(L, S)).any(-1).float())
        assert torch.equal(x["position_ids"], torch.arange(L))
        masked_any |= bool(invalid.any())
    assert masked_any, "corpus should put EODs inside superposition samples"
    for i in range(n_sup, n_sup + 3 * S):  # chunks 0..S-1: megatron's own masks on that window
        x = ds[i]
        _, loss_mask, position_ids = _get_ltor_masks_and_position_ids(
            x["tokens"], EOD, True, False, True, False)
        assert torch.equal(x["loss_mask"], loss_mask)
        assert torch.equal(x["position_ids"], position_ids)


def test_output_mode_resets_positions_at_documents_in_both_phases(tmp_path, corpus):
    """--tst-mode output feeds plain tokens in the superposition phase too: with
    --reset-position-ids their positions restart at every document (megatron's own function),
    as the recovery phase's and the baseline's do; bags (full/input modes) count positions by bag."""
    prefix, _ = corpus["eod"]
    ds = build(tmp_path, tst_cfg("output"), [prefix], eod_mask_loss=True, reset_position_ids=True).train
    reset_any = False
    for i in range(ds.num_superposition_samples):
        x = ds[i]
        _, _, position_ids = _get_ltor_masks_and_position_ids(x["tokens"], EOD, True, False, True, False)
        assert torch.equal(x["position_ids"], position_ids)
        reset_any |= not torch.equal(position_ids, torch.arange(L))
    assert reset_any, "corpus should put EODs inside superposition samples"


def test_loss_mask_counts_only_positions_with_a_valid_weighted_target(tmp_path, corpus):
    """With `first` weighting (weights [1, 0, ..]) a position whose first target follows an EOD
    has nothing to learn: it must not count in the loss mean (the MCE gives it 0, so counting it
    would dilute the loss). With all weights > 0 any valid target counts."""
    prefix, _ = corpus["eod"]
    first = TSTConfig(bag_size=S, superposition_ratio=0.3, bag_weighting="first")
    ds = build(tmp_path, first, [prefix], eod_mask_loss=True).train
    differs = False
    for i in range(ds.num_superposition_samples):
        x = ds[i]
        valid = x["labels"] != IGNORE_INDEX
        assert torch.equal(x["loss_mask"], valid[:, 0].float())
        differs |= bool((valid.any(-1) & ~valid[:, 0]).any())
    assert differs, "corpus should put an EOD right before some bag's first target"
    power = TSTConfig(bag_size=S, superposition_ratio=0.3, bag_weighting="power")
    x = build(tmp_path, power, [prefix], eod_mask_loss=True, cache="cache2").train[0]
    assert torch.equal(x["loss_mask"], (x["labels"] != IGNORE_INDEX).any(-1).float())


# ------------------------------------------------------------------------------- (6) sampler
def _indices(total, consumed, mbs, rank, dp):
    return list(PretrainingSampler(total, consumed, mbs, rank, dp))


def test_sampler_resume_and_data_parallel_partition():
    total, mbs, dp = 50, 2, 3
    full = {r: _indices(total, 0, mbs, r, dp) for r in range(dp)}
    for k in (0, 6, 12, 18, 42):
        for r in range(dp):
            resumed = _indices(total, k, mbs, r, dp)
            assert resumed == full[r][k // (mbs * dp):]
    for step in range(len(full[0])):  # each group of mbs*dp consecutive indices is partitioned
        got = sorted(i for r in range(dp) for i in full[r][step])
        assert got == list(range(step * mbs * dp, (step + 1) * mbs * dp))
    assert sum(len(b) for r in range(dp) for b in full[r]) == (total // (mbs * dp)) * mbs * dp
    with pytest.raises(ValueError):
        PretrainingSampler(total, total + 1, mbs, 0, dp)


def test_data_iterator_collates_phase_pure_batches(tmp_path, corpus):
    prefix, _ = corpus["plain"]
    ds = build(tmp_path, tst_cfg("full"), [prefix]).train
    mbs, dp, consumed = 2, 2, GBS  # resume after one iteration
    it = build_data_iterator(ds, consumed, mbs, 1, dp, total_samples=TRAIN_ITERS * GBS)
    batches = list(it)
    assert len(batches) == (TRAIN_ITERS * GBS - consumed) // (mbs * dp)
    for k, batch in enumerate(batches):
        idx = [consumed + k * mbs * dp + mbs + j for j in range(mbs)]  # rank 1's slice
        assert len({ds.phase_of(i) for i in idx}) == 1
        want = default_collate([ds[i] for i in idx])
        for key in want:
            assert torch.equal(batch[key], want[key])
    assert batches[0]["tokens"].shape == (mbs, L, S)
    assert batches[-1]["tokens"].shape == (mbs, L)


# ------------------------------------------------------------------------------- (7) blend
def test_blend_of_two_corpora(tmp_path, corpus, process_group):
    (pa, sa), (pb, sb) = corpus["plain"], corpus["other"]
    ds = build(tmp_path, tst_cfg("full"), [pa, pb], weights=[0.3, 0.7]).train
    assert len(ds) >= TRAIN_ITERS * GBS
    sources = []
    for i in range(TRAIN_ITERS * GBS):
        x = ds[i]
        flat = torch.cat([x["tokens"].flatten(), x["labels"].flatten()[-S:]])
        from_a = bool((flat < 50_000).all())
        assert from_a or bool((flat >= 50_000).all()), "a sample mixes two corpora"
        assert (sa if from_a else sb).is_piece(x["tokens"].flatten())
        if i < ds.num_superposition_samples:
            assert torch.equal(x["tokens"][1:], x["labels"][:-1])
        sources.append(from_a)
    assert 0 < sum(sources) < len(sources), "both corpora should contribute"


# ------------------------------------------------------------------------------- resume, other batch
def _stream_values(ds, indices):
    return [v for i in indices for v in input_values(ds[i])]


@pytest.mark.parametrize("where", ["superposition", "recovery"])
def test_resume_with_another_global_batch_keeps_the_data_position(tmp_path, corpus, where):
    """A run of GBS=4 stopped at iteration 2 (superposition) or 5 (recovery) and resumed with
    GBS=8: the samples it had consumed are those of the original stream, the superposition phase
    ends where the new batch puts the switch, and no stream position is read twice."""
    prefix, stream = corpus["plain"]
    tst = tst_cfg("full")
    sup_iters = tst.num_superposition_iters(TRAIN_ITERS)  # 3
    original = build(tmp_path, tst, [prefix], cache="orig").train
    iteration = 2 if where == "superposition" else 5
    consumed = iteration * GBS
    sup_consumed = min(iteration, sup_iters) * GBS
    new_gbs = 2 * GBS
    plan = resume_sample_plan(iteration=iteration, consumed_samples=consumed, superposition_samples=sup_consumed,
                              superposition_iters=sup_iters, train_iters=TRAIN_ITERS, global_batch_size=new_gbs)
    n_sup, n_train = plan
    assert n_sup == sup_consumed + max(0, sup_iters - iteration) * new_gbs
    assert n_train == consumed + (TRAIN_ITERS - iteration) * new_gbs
    # as the trainer does: the stream (and its recovery blocks) the checkpoint was built with
    resumed = build(tmp_path, tst, [prefix], cache="resumed", sample_plan=plan,
                    base_train_samples=original.planned_windows).train
    assert len(resumed.base) == len(original.base), "test needs the same single-epoch base stream"
    for i in range(consumed):  # what was consumed before the stop is what the original served
        assert torch.equal(resumed[i]["tokens"], original[i]["tokens"]), i
        assert resumed.phase_of(i) == original.phase_of(i)
    # the phase of every later sample follows the iteration it is consumed at, under the new batch
    for i in range(consumed, n_train):
        step = iteration + (i - consumed) // new_gbs
        assert resumed.phase_of(i) == ("superposition" if step < sup_iters else "recovery"), i
        assert resumed[i]["tokens"].dim() == (2 if step < sup_iters else 1)
    values = _stream_values(resumed, range(n_train))
    assert len(values) == len(set(values)), "a stream position was read twice across the resume"
    # the old computation (iterations x new batch) would have moved the switch
    assert n_sup != sup_iters * new_gbs


def test_resume_rebuilds_the_checkpoints_stream_or_refuses_one_it_cannot(tmp_path, corpus, process_group):
    """megatron's train order depends on the requested length (a blend's size, the epochs shuffled
    together). A resume with another --global-batch-size rebuilds the checkpoint's own stream
    (`base_train_samples`) when it is long enough -- the consumed samples stay where they were --
    and the preflight refuses a resume that needs a longer stream, whose order would differ."""
    from tst_megatron.preflight import check_resume_stream

    (pa, _), (pb, _) = corpus["plain"], corpus["other"]
    tst = tst_cfg("full")
    sup_iters = tst.num_superposition_iters(TRAIN_ITERS)
    original = build(tmp_path, tst, [pa, pb], weights=[0.5, 0.5], cache="orig")
    meta = {"train_base_windows": len(original.train.base), "train_base_samples": original.num_base_train_samples}
    iteration = 2
    consumed = iteration * GBS

    def plan_for(gbs):
        return resume_sample_plan(iteration=iteration, consumed_samples=consumed, superposition_samples=consumed,
                                  superposition_iters=sup_iters, train_iters=TRAIN_ITERS, global_batch_size=gbs)

    # fits: the rebuilt stream is the checkpoint's, sample for sample, although a fresh build of
    # that plan (another blend size) would differ
    plan = plan_for(GBS // 2)  # a smaller batch: fewer samples ahead
    assert num_base_samples(tst, plan[0], plan[1] - plan[0]) <= meta["train_base_windows"]
    fresh = build(tmp_path, tst, [pa, pb], weights=[0.5, 0.5], cache="fresh", sample_plan=plan)
    assert len(fresh.train.base) != meta["train_base_windows"]
    rebuilt = build(tmp_path, tst, [pa, pb], weights=[0.5, 0.5], cache="rebuilt", sample_plan=plan,
                    base_train_samples=meta["train_base_samples"])
    assert len(rebuilt.train.base) == meta["train_base_windows"]
    for i in range(consumed):
        assert torch.equal(rebuilt.train[i]["tokens"], original.train[i]["tokens"]), i
    check_resume_stream(meta, "ck", consumed_samples=consumed, base_windows=len(rebuilt.train.base),
                        same_batch_and_length=False)
    with pytest.raises(SystemExit, match=r"--load ck: this run's --global-batch-size / --train-iters need a "
                                         r"longer data stream than the checkpoint's \(\d+ -> \d+ windows\)"):
        check_resume_stream(meta, "ck", consumed_samples=consumed, base_windows=len(fresh.train.base),
                            same_batch_and_length=False)

    # does not fit (one corpus, a batch of 64 needs a second epoch): megatron shuffles two epochs
    # together, so the longer stream deals the consumed positions differently
    single = build(tmp_path, tst, [pa], cache="single")
    meta = {"train_base_windows": len(single.train.base), "train_base_samples": single.num_base_train_samples}
    plan = plan_for(64)
    assert num_base_samples(tst, plan[0], plan[1] - plan[0]) > meta["train_base_windows"]
    with pytest.raises(ValueError, match="holds .* windows; this run needs"):
        build(tmp_path, tst, [pa], cache="short", sample_plan=plan, base_train_samples=meta["train_base_samples"])
    longer = build(tmp_path, tst, [pa], cache="long", sample_plan=plan)
    assert any(not torch.equal(longer.train[i]["tokens"], single.train[i]["tokens"]) for i in range(consumed)), \
        "the longer stream should deal the consumed positions differently (else this test shows nothing)"
    with pytest.raises(SystemExit, match="need a longer data stream"):
        check_resume_stream(meta, "ck", consumed_samples=consumed, base_windows=len(longer.train.base),
                            same_batch_and_length=False)
    check_resume_stream(meta, "ck", consumed_samples=0, base_windows=len(longer.train.base),
                        same_batch_and_length=False)  # nothing consumed yet: any stream is fine

def test_resume_cannot_return_to_superposition():
    with pytest.raises(ValueError, match="cannot go back to the superposition phase"):
        resume_sample_plan(iteration=5, consumed_samples=20, superposition_samples=12, superposition_iters=6,
                           train_iters=10, global_batch_size=4)
    # at the switch itself nothing of recovery was consumed: a longer superposition phase is fine
    assert resume_sample_plan(iteration=3, consumed_samples=12, superposition_samples=12, superposition_iters=6,
                              train_iters=10, global_batch_size=4) == (24, 40)
    # a fresh run is iterations x batch
    assert resume_sample_plan(iteration=0, consumed_samples=0, superposition_samples=0, superposition_iters=3,
                              train_iters=10, global_batch_size=4) == (12, 40)


def test_token_ids_beyond_the_vocabulary_are_named_per_sample(tmp_path, corpus):
    """The preflight scan reads a prefix of each file; every sample is checked as it is served."""
    prefix, _ = corpus["plain"]
    train = build(tmp_path, tst_cfg("full"), [prefix]).train
    assert train.vocab_size == NullTokenizer(V).vocab_size  # the tokenizer's (V + EOD), from the builder
    for i in (0, train.num_superposition_samples):  # one sample of each phase
        top = max(int(train[i]["tokens"].max()), int(train[i]["labels"].max()))
        small = TSTDataset(train.base, tst_cfg("full"), L, train.num_superposition_samples, vocab_size=top,
                           planned_windows=train.planned_windows)
        with pytest.raises(ValueError, match=rf"token id {top} in sample {i} of the data is >= the tokenizer's "
                                             rf"vocabulary \({top}\)"):
            small[i]
        ok = TSTDataset(train.base, tst_cfg("full"), L, train.num_superposition_samples, vocab_size=top + 1,
                           planned_windows=train.planned_windows)
        assert torch.equal(ok[i]["tokens"], train[i]["tokens"])


def test_loader_workers_survive_a_stop_signal_and_end_with_the_process(tmp_path):
    """--num-workers: a SIGTERM sent to every process of the job reaches the DataLoader workers;
    they must not die of it (the trainer still needs batches until it has saved), and since they
    ignore it they are shut down by the process itself at exit (Python's exit-time terminate() is
    a SIGTERM: without that the process would hang in join)."""
    import subprocess
    import sys

    script = tmp_path / "workers.py"
    script.write_text(
        "import os, signal, time, torch\n"
        "from torch.utils.data import Dataset\n"
        "from tst_megatron.data import build_data_iterator\n"
        "class D(Dataset):\n"
        "    def __len__(self): return 64\n"
        "    def __getitem__(self, i): return {'x': torch.tensor([i])}\n"
        "if __name__ == '__main__':\n"
        "    it = build_data_iterator(D(), 0, 2, 0, 1, num_workers=2)\n"
        # both workers have run their init once each has produced a batch (a signal before that
        # meets this script's default disposition, which the trainer's own handler replaces)
        "    first = next(it)['x'].flatten().tolist(); next(it)\n"
        "    kids = open(f'/proc/{os.getpid()}/task/{os.getpid()}/children').read().split()\n"
        "    for pid in kids:\n"
        "        os.kill(int(pid), signal.SIGTERM)\n"
        "    time.sleep(0.5)\n"
        "    rest = [next(it)['x'].flatten().tolist() for _ in range(5)]\n"
        "    print(len(kids) >= 2, first, rest[-1], flush=True)\n")
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "True [0, 1] [12, 13]", res.stdout


def test_reset_attention_mask_is_refused(tmp_path):
    """megatron's per-document attention needs masks this wrapper does not build: refused, not ignored."""
    with pytest.raises(ValueError, match="reset_attention_mask: per-document attention masks are not implemented"):
        build(tmp_path, tst_cfg(), ["unused"], reset_attention_mask=True)
