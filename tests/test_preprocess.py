"""tools/preprocess_data.py and tst_megatron/corpus.py: exact ids through megatron-core's readers,
worker-count invariance, and clear errors."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig  # noqa: E402
from megatron.core.datasets.indexed_dataset import IndexedDataset  # noqa: E402
from megatron.core.datasets.utils import Split  # noqa: E402

from tools import preprocess_data, train_tokenizer  # noqa: E402
from tst_megatron.corpus import build_default_corpus, iter_documents  # noqa: E402
from tst_megatron.tokenizers import build_tokenizer  # noqa: E402

WORDS = ("alpha beta gamma delta def return import class self print value data token loss "
         "model train é ü 中文").split()


def make_docs(n=40, seed=0):
    """Varied documents: unicode, tabs, blank lines, one empty (skipped), lengths 0..~600 bytes."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 10)))
                 for _ in range(rng.randint(1, 8))]
        docs.append(f"doc {i}:\n" + "\n\t".join(lines) + ("\n\n" if i % 4 == 0 else ""))
    docs[5] = ""
    docs[7] = "emoji 😀 and nbsp\u00a0!"
    return docs


def write_jsonl(path, docs, key="text"):
    with open(path, "w", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({key: doc, "id": i}, ensure_ascii=i % 2 == 0) + "\n")
            if i == 3:
                f.write("\n")  # blank lines are skipped
    return str(path)


def write_dir(path, docs):
    os.makedirs(path, exist_ok=True)
    for i, doc in enumerate(docs):
        with open(os.path.join(path, f"doc_{i:03d}.txt"), "w", encoding="utf-8") as f:
            f.write(doc)
    with open(os.path.join(path, ".hidden"), "w") as f:  # hidden files are ignored
        f.write("ignored")
    return str(path)


# ---------------------------------------------------------------- tokenizer fixtures
@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sp")
    corpus = write_jsonl(tmp / "train.jsonl", make_docs(300, seed=1))
    train_tokenizer.main(["--input", corpus, "--output-prefix", str(tmp / "spm"),
                          "--vocab-size", "320"])
    return str(tmp / "spm.model")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tmp = tmp_path_factory.mktemp("hf")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=350, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(make_docs(300, seed=2), trainer=trainer)
    tok.save(str(tmp / "tokenizer.json"))
    return str(tmp)


@pytest.fixture(scope="module")
def gpt2_files(hf_dir, tmp_path_factory):
    """The hf_dir tokenizer's BPE as GPT-2-style vocab.json + merges.txt (Megatron's GPT2BPETokenizer)."""
    from tokenizers import Tokenizer

    tmp = tmp_path_factory.mktemp("gpt2")
    vocab, merges = Tokenizer.from_file(os.path.join(hf_dir, "tokenizer.json")).model.save(str(tmp))
    return vocab, merges


@pytest.fixture
def tokenizer_flags(sp_model, hf_dir, gpt2_files):
    return {"byte": ["--tokenizer-type", "ByteTokenizer"],
            "sp": ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model],
            "hf": ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf_dir],
            "gpt2": ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", gpt2_files[0],
                     "--merge-file", gpt2_files[1]]}


def tokenizer_of(flags):
    """The tokenizer preprocess_data builds from these flags, built here directly."""
    given = dict(zip(flags[0::2], flags[1::2]))
    return build_tokenizer(given["--tokenizer-type"], given.get("--tokenizer-model") or given.get("--vocab-file"),
                           merge_file=given.get("--merge-file"))


def run(input_path, prefix, flags, *extra):
    return preprocess_data.main(["--input", str(input_path), "--output-prefix", str(prefix),
                                 "--no-progress", *flags, *extra])


def expected_ids(tokenizer, docs, append_eod):
    out = []
    for doc in docs:
        ids = tokenizer.tokenize(doc)
        if ids:  # empty documents are skipped
            out.append(ids + [tokenizer.eod] if append_eod else ids)
    return out


def check_gpt_dataset(prefix, tokenizer, expected, tmp_path, seq_len=16):
    """Every GPTDataset sample is a contiguous window over its documents' exact ids."""
    config = GPTDatasetConfig(random_seed=1234, sequence_length=seq_len, blend=([prefix], None),
                              split="100,0,0", tokenizer=tokenizer, reset_position_ids=False,
                              reset_attention_mask=False, eod_mask_loss=False,
                              path_to_cache=str(tmp_path / "cache"))
    indexed = IndexedDataset(prefix)
    dataset = GPTDataset(indexed, prefix, np.arange(len(indexed), dtype=np.int32), None,
                         Split.train, config)
    assert len(dataset) > 0
    for idx in range(len(dataset)):
        text, doc_ids = dataset._query_document_sample_shuffle_indices(idx)
        assert len(text) == seq_len + 1
        window = np.concatenate([expected[d] for d in doc_ids])
        first = len(expected[doc_ids[0]])
        assert any(np.array_equal(window[o:o + len(text)], text) for o in range(first)), idx
        sample = dataset[idx]
        assert sample["tokens"].tolist() == text[:-1].tolist()
        assert sample["labels"].tolist() == text[1:].tolist()


@pytest.mark.parametrize("kind", ["byte", "sp", "hf", "gpt2"])
@pytest.mark.parametrize("form", ["jsonl", "dir"])
def test_preprocess_exact_ids(kind, form, tokenizer_flags, tmp_path):
    docs = make_docs()
    source = write_jsonl(tmp_path / "in.jsonl", docs) if form == "jsonl" else \
        write_dir(tmp_path / "in_dir", docs)
    flags = tokenizer_flags[kind]
    summary = run(source, tmp_path / "out" / "data", flags, "--append-eod")

    tokenizer = tokenizer_of(flags)
    expected = expected_ids(tokenizer, docs, append_eod=True)
    prefix = str(tmp_path / "out" / "data_text_document")
    assert summary["prefixes"]["text"] == prefix
    assert summary["documents"]["text"] == len(expected) == len(docs) - 1
    assert summary["empty_skipped"]["text"] == 1
    assert summary["tokens"]["text"] == sum(map(len, expected))
    assert not [f for f in os.listdir(tmp_path / "out") if f.endswith(".partial")]

    indexed = IndexedDataset(prefix)
    assert len(indexed) == len(expected)
    assert indexed.index.dtype == np.uint16  # megatron's optimal dtype for these vocabularies
    for i, ids in enumerate(expected):
        assert indexed[i].tolist() == ids
        assert ids[-1] == tokenizer.eod
    text_docs = [d for d in docs if d]
    assert [tokenizer.detokenize(ids[:-1]) for ids in expected] == text_docs
    check_gpt_dataset(prefix, tokenizer, [np.array(e) for e in expected], tmp_path)


def test_preprocess_without_eod_and_multiple_keys(tmp_path):
    path = tmp_path / "two.jsonl"
    with open(path, "w") as f:
        for i in range(5):
            f.write(json.dumps({"text": f"body {i}", "title": f"t{i}"}) + "\n")
    summary = run(path, tmp_path / "o", ["--tokenizer-type", "ByteTokenizer"],
                  "--json-keys", "text", "title")
    for key, make in (("text", lambda i: f"body {i}"), ("title", lambda i: f"t{i}")):
        ds = IndexedDataset(summary["prefixes"][key])
        assert [ds[i].tolist() for i in range(5)] == [list(make(i).encode()) for i in range(5)]


def test_rerun_over_an_existing_prefix_removes_megatrons_index_cache(tmp_path, capsys):
    """GPTDataset caches sample indices under <prefix>/cache, named by path and settings, not by
    content: preprocessed again into the same prefix, the new data would meet the old indices
    (an IndexError, or silently the old order). The tool removes them when it replaces the data."""
    path = tmp_path / "c.jsonl"
    write_jsonl(path, make_docs(8))
    prefix = tmp_path / "data" / "c"
    summary = run(path, prefix, BYTE)
    cache = tmp_path / "data" / "c_text_document" / "cache" / "GPTDataset_indices"
    assert summary["prefixes"]["text"] == str(cache.parent.parent)
    cache.mkdir(parents=True)
    (cache / "x-GPTDataset-train-document_index.npy").write_bytes(b"old")
    write_jsonl(path, ["one", "two", "three"])
    run(path, prefix, BYTE)
    assert not cache.parent.exists()
    assert f"removed megatron's index cache {cache.parent}" in capsys.readouterr().err
    assert len(IndexedDataset(str(cache.parent.parent))) == 3
    # also when the old .bin/.idx were deleted by hand before the new run
    cache.mkdir(parents=True)
    for end in (".bin", ".idx"):
        os.remove(str(cache.parent.parent) + end)
    write_jsonl(path, ["four", "five"])
    run(path, prefix, BYTE)
    assert not cache.parent.exists() and len(IndexedDataset(str(cache.parent.parent))) == 2


def test_output_prefix_inside_the_input_directory(tmp_path, capsys):
    """The tool's own output (partial while it writes, complete on a rerun) and megatron's index
    cache beside it are not read as documents of an --input directory that holds them."""
    docs = [d for d in make_docs(8) if d]
    write_dir(tmp_path / "in", docs)
    for attempt in range(2):
        summary = run(tmp_path / "in", tmp_path / "in" / "out", BYTE)
        assert summary["documents"]["text"] == len(docs), (attempt, summary)
        if attempt == 0:
            (tmp_path / "in" / "out_text_document" / "cache").mkdir(parents=True)
            (tmp_path / "in" / "out_text_document" / "cache" / "idx.npy").write_bytes(b"x")
    assert "skipping 3 file(s) of this --output-prefix's own output" in capsys.readouterr().err
    ds = IndexedDataset(str(tmp_path / "in" / "out_text_document"))
    assert [ds[i].tolist() for i in range(len(docs))] == [list(d.encode()) for d in docs]


def test_byte_order_mark_is_not_text(tmp_path):
    """A UTF-8 byte-order mark at the start of a JSONL or text file (Windows editors write one) is
    dropped, not read as malformed JSON or as a token: same ids as the file without it."""
    flags = ["--tokenizer-type", "ByteTokenizer"]
    docs = ["first document", "second"]
    for name, body in (("a.jsonl", "".join(json.dumps({"text": d}) + "\n" for d in docs)), ("b.txt", docs[0])):
        plain, marked = tmp_path / "plain", tmp_path / "marked"
        for d in (plain, marked):
            d.mkdir(exist_ok=True)
        (plain / name).write_bytes(body.encode("utf-8"))
        (marked / name).write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
        got = [IndexedDataset(run(d / name, tmp_path / f"{d.name}_{name}", flags)["prefixes"]["text"])
               for d in (plain, marked)]
        assert len(got[0]) == len(got[1]) >= 1
        assert [x.tolist() for x in got[1]] == [x.tolist() for x in got[0]], name
    # a mark alone on the first line is a blank line, skipped like one
    (tmp_path / "c.jsonl").write_bytes(b"\xef\xbb\xbf\n" + json.dumps({"text": docs[1]}).encode() + b"\n")
    only = IndexedDataset(run(tmp_path / "c.jsonl", tmp_path / "c", flags)["prefixes"]["text"])
    assert [x.tolist() for x in only] == [list(docs[1].encode())]


def test_a_list_of_sentences_is_one_document(sp_model, tmp_path):
    """Megatron-LM's JSONL form of pre-split text: a key holding a list of strings is one document,
    each sentence tokenized on its own and the ids concatenated (then EOD)."""
    flags = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model]
    tok = tokenizer_of(flags)
    sentences = ["The first sentence. ", "And the second one.", ""]
    path = tmp_path / "list.jsonl"
    path.write_text(json.dumps({"text": sentences}) + "\n" + json.dumps({"text": "a plain one"}) + "\n")
    got = IndexedDataset(run(path, tmp_path / "out", flags, "--append-eod")["prefixes"]["text"])
    first = [i for sentence in sentences for i in tok.tokenize(sentence)] + [tok.eod]
    assert [x.tolist() for x in got] == [first, tok.tokenize("a plain one") + [tok.eod]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": ["fine", 3]}) + "\n")
    with pytest.raises(SystemExit, match=r"bad.jsonl:1: key 'text' item 1 holds int, expected a string"):
        run(bad, tmp_path / "bad_out", BYTE)


@pytest.mark.parametrize("kind", ["byte", "sp", "hf"])
def test_preprocess_single_text_file(kind, tokenizer_flags, tmp_path):
    """A plain-text file as --input is one document: its exact ids, through megatron's readers."""
    docs = make_docs(12, seed=4)
    text = "\n".join(docs)
    path = tmp_path / "book.txt"
    path.write_text(text, encoding="utf-8")
    flags = tokenizer_flags[kind]
    summary = run(path, tmp_path / "out" / "data", flags, "--append-eod")

    tokenizer = tokenizer_of(flags)
    expected = tokenizer.tokenize(text) + [tokenizer.eod]
    prefix = summary["prefixes"]["text"]
    assert summary["records"] == 1 and summary["documents"]["text"] == 1
    assert summary["tokens"]["text"] == len(expected)
    indexed = IndexedDataset(prefix)
    assert len(indexed) == 1 and indexed[0].tolist() == expected
    check_gpt_dataset(prefix, tokenizer, [np.array(expected)], tmp_path, seq_len=32)


@pytest.mark.parametrize("form", ["jsonl", "dir"])
@pytest.mark.parametrize("kind", ["byte", "sp", "hf"])
def test_workers_byte_identical(kind, form, tokenizer_flags, tmp_path):
    docs = make_docs(150, seed=3)  # > several chunks
    source = write_jsonl(tmp_path / "in.jsonl", docs) if form == "jsonl" else \
        write_dir(tmp_path / "in_dir", docs)
    outputs = []
    for workers in (1, 2):
        run(source, tmp_path / f"w{workers}" / "d", tokenizer_flags[kind], "--append-eod",
            "--workers", str(workers))
        outputs.append([open(tmp_path / f"w{workers}" / f"d_text_document.{ext}", "rb").read()
                        for ext in ("bin", "idx")])
    assert outputs[0] == outputs[1]


def test_hf_include_special_tokens(hf_dir, tmp_path):
    """--tokenizer-hf-include-special-tokens (Megatron-LM's flag): every document starts with the
    post-processor's BOS, as transformers' `tokenizer(text)` gives it, in one process and in a pool."""
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_file(os.path.join(hf_dir, "tokenizer.json"))
    tok.add_special_tokens(["<bos>"])
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    path = str(tmp_path / "bos" / "tokenizer.json")
    os.makedirs(os.path.dirname(path))
    tok.save(path)
    docs = [d for d in make_docs(60, seed=5) if d]
    source = write_jsonl(tmp_path / "in.jsonl", docs)
    flags = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", path]
    eod = build_tokenizer("HuggingFaceTokenizer", path).eod
    for workers, extra in (("1", []), ("2", []), ("1", ["--tokenizer-hf-include-special-tokens"]),
                           ("2", ["--tokenizer-hf-include-special-tokens"])):
        prefix = tmp_path / f"w{workers}{len(extra)}" / "d"
        run(source, prefix, flags, "--append-eod", "--workers", workers, *extra)
        indexed = IndexedDataset(f"{prefix}_text_document")
        for i, doc in enumerate(docs):
            expected = tok.encode(doc, add_special_tokens=bool(extra)).ids + [eod]
            assert indexed[i].tolist() == expected
            assert (expected[0] == bos) == bool(extra)
    with pytest.raises(SystemExit, match="--tokenizer-hf-include-special-tokens applies to --tokenizer-type "
                                         "HuggingFaceTokenizer only"):
        run(source, tmp_path / "x" / "d", BYTE, "--tokenizer-hf-include-special-tokens")


# ---------------------------------------------------------------- errors
BYTE = ["--tokenizer-type", "ByteTokenizer"]


def assert_no_output(directory):
    leftovers = [f for f in os.listdir(directory) if f.startswith("out")] \
        if os.path.isdir(directory) else []
    assert leftovers == []


@pytest.mark.parametrize("workers", ["1", "2"])
def test_error_malformed_json(workers, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": "broken\n{"text": "ok"}\n')
    with pytest.raises(SystemExit) as exc:
        run(path, tmp_path / "out", BYTE, "--workers", workers)
    message = str(exc.value.code)
    assert f"{path}:3" in message and "malformed JSON" in message
    assert_no_output(tmp_path)


def test_error_missing_key(tmp_path):
    path = tmp_path / "nokey.jsonl"
    path.write_text('{"text": "ok"}\n{"content": "no text key"}\n')
    with pytest.raises(SystemExit) as exc:
        run(path, tmp_path / "out", BYTE)
    message = str(exc.value.code)
    assert f"{path}:2" in message and "missing key 'text'" in message and "content" in message
    assert_no_output(tmp_path)


def test_error_non_string_and_non_utf8(tmp_path):
    path = tmp_path / "num.jsonl"
    path.write_text('{"text": 5}\n')
    with pytest.raises(SystemExit, match=r"num.jsonl:1: key 'text' holds int"):
        run(path, tmp_path / "out", BYTE)
    d = tmp_path / "bin_dir"
    d.mkdir()
    (d / "a.txt").write_text("fine")
    (d / "b.bin").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(SystemExit, match=r"b.bin: not valid UTF-8"):
        run(d, tmp_path / "out", BYTE)
    assert_no_output(tmp_path)


def test_error_empty_inputs(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(SystemExit, match=r"empty.jsonl' has no records"):
        run(empty, tmp_path / "out", BYTE)
    only_empty_docs = tmp_path / "blank.jsonl"
    only_empty_docs.write_text('{"text": ""}\n')
    with pytest.raises(SystemExit, match="only empty documents"):
        run(only_empty_docs, tmp_path / "out", BYTE)
    one_key_empty = tmp_path / "two_keys.jsonl"
    one_key_empty.write_text('{"text": "body", "title": ""}\n')
    with pytest.raises(SystemExit, match="--json-keys title: every 'title' of --input .* is empty"):
        run(one_key_empty, tmp_path / "out", BYTE, "--json-keys", "text", "title")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(SystemExit, match="empty directory"):
        run(tmp_path / "emptydir", tmp_path / "out", BYTE)
    with pytest.raises(SystemExit, match="does not exist"):
        run(tmp_path / "missing.jsonl", tmp_path / "out", BYTE)
    assert_no_output(tmp_path)


def test_error_unwritable_output(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", ["hello"])
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(SystemExit) as exc:
        run(source, blocker / "sub" / "out", BYTE)
    assert "--output-prefix" in str(exc.value.code) and "a_file" in str(exc.value.code)
    # nothing left behind: no output, no .partial files, no write probe; the blocker untouched
    assert sorted(os.listdir(tmp_path)) == ["a_file", "in.jsonl"]
    assert blocker.read_text() == "not a directory"
    assert_no_output(tmp_path)


def test_error_output_path_taken_leaves_nothing(tmp_path, monkeypatch):
    """An output file that cannot be replaced: a clear error, and no half dataset (.bin without
    .idx) or .partial file left behind -- whether found up front or only at the final rename."""
    source = write_jsonl(tmp_path / "in.jsonl", ["hello", "world"])
    out = tmp_path / "o"
    (out / "out_text_document.idx" / "x").mkdir(parents=True)  # a directory where the .idx goes
    with pytest.raises(SystemExit, match=r"out_text_document.idx.*is a directory"):
        run(source, out / "out", BYTE)
    assert os.listdir(out) == ["out_text_document.idx"]

    os.rmdir(out / "out_text_document.idx" / "x")
    os.rmdir(out / "out_text_document.idx")
    real_replace = os.replace

    def failing_replace(src, dst):  # the .bin is renamed, then the .idx rename fails
        if str(dst).endswith(".idx"):
            raise PermissionError(13, "Permission denied", str(src), None, str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(preprocess_data.os, "replace", failing_replace)
    with pytest.raises(SystemExit, match=r"cannot write the output .*out_text_document.idx"):
        run(source, out / "out", BYTE)
    assert os.listdir(out) == []


def test_error_token_out_of_range_and_bad_tokenizer(tmp_path):
    path = tmp_path / "ids.jsonl"
    path.write_text('{"text": "1 2 3"}\n{"text": "4 500 6"}\n')
    with pytest.raises(SystemExit, match=r"ids.jsonl:2: token id 500 .*outside the vocabulary"):
        run(path, tmp_path / "out", ["--tokenizer-type", "NullTokenizer", "--vocab-size", "100"])
    with pytest.raises(SystemExit, match="unknown --tokenizer-type 'Nope'"):
        run(path, tmp_path / "out", ["--tokenizer-type", "Nope"])
    with pytest.raises(SystemExit, match="missing.model.*--tokenizer-model"):
        run(path, tmp_path / "out", ["--tokenizer-type", "SentencePieceTokenizer",
                                     "--tokenizer-model", str(tmp_path / "missing.model")])
    assert_no_output(tmp_path)


def test_cli_exit_code_and_message(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\nnot json\n')
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"),
                           "--input", str(path), "--output-prefix", str(tmp_path / "out"),
                           "--tokenizer-type", "ByteTokenizer", "--no-progress"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert f"{path}:2: malformed JSON" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_megatron_lm_flags_run_unchanged(tmp_path, capsys):
    """Megatron-LM's preprocessing command (--partitions, --log-interval, --keep-sequential-samples)
    runs and writes exactly what the plain command writes; --split-sentences is refused by name."""
    path = write_jsonl(tmp_path / "in.jsonl", make_docs(12))
    plain = run(path, tmp_path / "plain", BYTE, "--append-eod")
    capsys.readouterr()
    megatron = run(path, tmp_path / "mlm", BYTE, "--append-eod", "--partitions", "2", "--log-interval", "5",
                   "--keep-sequential-samples", "--workers", "2")
    assert capsys.readouterr().err.count("Processed ") == 12 // 5
    for suffix in (".bin", ".idx"):
        assert Path(megatron["prefixes"]["text"] + suffix).read_bytes() == \
            Path(plain["prefixes"]["text"] + suffix).read_bytes()
    with pytest.raises(SystemExit, match="--split-sentences: .*not implemented"):
        run(path, tmp_path / "s", BYTE, "--split-sentences")
    with pytest.raises(SystemExit, match="--log-interval must be >= 1"):
        run(path, tmp_path / "s", BYTE, "--log-interval", "0")
    assert not (tmp_path / "s_text_document.bin").exists()


# ---------------------------------------------------------------- default corpus
def test_default_corpus_deterministic_and_preprocessable(tmp_path):
    a = build_default_corpus(str(tmp_path / "a.jsonl"), max_bytes=300_000)
    b = build_default_corpus(str(tmp_path / "b.jsonl"), max_bytes=300_000)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert 0 < a["bytes"] <= 300_000 and a["documents"] == b["documents"] > 1
    docs = [d["text"] for d in iter_documents(str(tmp_path / "a.jsonl"))]
    assert len(docs) == a["documents"] and sum(len(d.encode()) for d in docs) == a["bytes"]
    sources = [json.loads(line)["source"] for line in open(tmp_path / "a.jsonl")]
    assert sources == sorted(sources, key=lambda s: s.split("/"))
    assert all(s.endswith(".py") for s in sources)

    summary = run(tmp_path / "a.jsonl", tmp_path / "corpus", BYTE, "--append-eod")
    assert summary["documents"]["text"] == a["documents"]
    assert summary["tokens"]["text"] == a["bytes"] + a["documents"]
