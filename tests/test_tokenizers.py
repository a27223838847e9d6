"""Tokenizers: round trips, special ids, megatron-core compatibility, clear errors."""
import json
import os
import random
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from megatron.core.tokenizers import MegatronTokenizerBase  # noqa: E402

from tools import train_tokenizer  # noqa: E402
from tst_megatron.tokenizers import (ByteTokenizer, HuggingFaceTokenizer, NullTokenizer,  # noqa: E402
                                     SentencePieceTokenizer, build_tokenizer)

TEXTS = [
    "hello world",
    "def f(x):\n\treturn  x + 1\n\n",
    "  leading spaces and trailing  ",
    "unicode: é ñ ü 中文 😀 \u00a0nbsp",
    "",
]
WORDS = ("the of and to in is for that with on as it by this be are from at or an import def "
         "return class self none true false print value data model token train loss").split()


def generated_text(n_lines=3000, seed=0):
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
        lines.append(f"    {words} = {i}" if i % 3 == 0 else words)
    return "\n".join(lines) + "\n"


def train_sp(tmp_dir, model_type="bpe", vocab_size=400):
    os.makedirs(tmp_dir, exist_ok=True)
    corpus = os.path.join(tmp_dir, "sp_train.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        f.write(generated_text())
    prefix = os.path.join(tmp_dir, f"spm_{model_type}")
    train_tokenizer.main(["--input", corpus, "--output-prefix", prefix, "--model-type", model_type,
                          "--vocab-size", str(vocab_size)])
    return prefix + ".model"


def make_hf_tokenizer(directory, specials=("<|endoftext|>", "<pad>"), vocab_size=400):
    """A tiny byte-level BPE tokenizer.json, trained in-process (no hub)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(generated_text().splitlines(), trainer=trainer)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "tokenizer.json")
    tok.save(path)
    return path


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return train_sp(str(tmp_path_factory.mktemp("sp")))


@pytest.fixture(scope="module")
def hf_json(tmp_path_factory):
    return make_hf_tokenizer(str(tmp_path_factory.mktemp("hf")))


def check_common(tok):
    assert isinstance(tok, MegatronTokenizerBase)
    json.dumps(tok.unique_identifiers)  # part of megatron's dataset cache key
    assert 0 <= tok.eod < tok.vocab_size
    assert tok.pad == -1 or (0 <= tok.pad < tok.vocab_size and tok.pad != tok.eod)


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    check_common(tok)
    assert (tok.vocab_size, tok.eod, tok.pad) == (258, 256, 257)
    for text in TEXTS:
        ids = tok.tokenize(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.detokenize(ids) == text
        assert tok.detokenize(ids + [tok.eod]) == text  # specials are dropped
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.detokenize([300])


def test_sentencepiece_round_trip_and_specials(sp_model):
    tok = SentencePieceTokenizer(sp_model)
    check_common(tok)
    assert tok.vocab_size == 400
    assert tok.inv_vocab[tok.eod] == "</s>" and tok.eod == 2
    assert tok.inv_vocab[tok.pad] == "<pad>" and tok.pad == 3
    for text in TEXTS:  # includes characters never seen in training: byte fallback
        ids = tok.tokenize(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.detokenize(ids) == text
    # learned merges actually compress the training distribution
    sample = generated_text(50, seed=1)
    assert len(tok.tokenize(sample)) < len(sample.encode("utf-8")) / 2


def test_train_tokenizer_is_deterministic(tmp_path):
    a = train_sp(str(tmp_path / "a"), model_type="unigram", vocab_size=350)
    b = train_sp(str(tmp_path / "b"), model_type="unigram", vocab_size=350)
    with open(a, "rb") as fa, open(b, "rb") as fb:
        assert fa.read() == fb.read()
    tok = SentencePieceTokenizer(a)
    assert tok.detokenize(tok.tokenize(TEXTS[3])) == TEXTS[3]


def test_train_tokenizer_errors(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("a b c\n")
    with pytest.raises(SystemExit, match="--vocab-size 100 is too small"):
        train_tokenizer.main(["--input", str(corpus), "--output-prefix", str(tmp_path / "m"),
                              "--vocab-size", "100"])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SystemExit, match="no text to train on"):
        train_tokenizer.main(["--input", str(empty), "--output-prefix", str(tmp_path / "m")])


def test_sentencepiece_errors(tmp_path):
    missing = str(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="nope.model.*--tokenizer-model"):
        SentencePieceTokenizer(missing)
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(ValueError, match="garbage.model.*not a SentencePiece model"):
        SentencePieceTokenizer(str(garbage))


def test_huggingface_round_trip(hf_json):
    for path in (hf_json, os.path.dirname(hf_json)):  # the file or its directory
        tok = HuggingFaceTokenizer(path)
        check_common(tok)
        assert tok.inv_vocab[tok.eod] == "<|endoftext|>"
        assert tok.inv_vocab[tok.pad] == "<pad>"
        for text in TEXTS:
            ids = tok.tokenize(text)
            assert tok.eod not in ids
            assert tok.detokenize(ids) == text


def test_huggingface_tokenizer_ignores_saved_truncation_and_padding(hf_json, tmp_path):
    """A tokenizer.json saved after a truncating / padding call carries those settings; the
    `tokenizers` library would apply them to every document (cut to max_length, or padded).
    Megatron-LM (through transformers) never does: the same ids as the file without them."""
    from tokenizers import Tokenizer

    plain = HuggingFaceTokenizer(hf_json)
    tok = Tokenizer.from_file(hf_json)
    tok.enable_truncation(max_length=4)
    tok.enable_padding(length=64, pad_id=plain.pad, pad_token="<pad>")
    saved = tmp_path / "tokenizer.json"
    tok.save(str(saved))
    assert len(Tokenizer.from_file(str(saved)).encode(TEXTS[0]).ids) == 64  # as saved: cut, then padded
    text = " ".join(TEXTS)
    ids = HuggingFaceTokenizer(str(saved)).tokenize(text)
    assert ids == plain.tokenize(text) and len(ids) > 4


def test_huggingface_eod_from_config_and_errors(tmp_path):
    path = make_hf_tokenizer(str(tmp_path / "cfg"), specials=("<|endoftext|>", "<my_eos>"))
    with open(tmp_path / "cfg" / "tokenizer_config.json", "w") as f:
        json.dump({"eos_token": {"content": "<my_eos>"}}, f)
    tok = HuggingFaceTokenizer(path)
    assert tok.inv_vocab[tok.eod] == "<my_eos>"
    assert tok.pad == -1  # no pad token: megatron's "no pad" sentinel

    no_eod = make_hf_tokenizer(str(tmp_path / "noeod"), specials=("<pad>",))
    with pytest.raises(ValueError, match="no end-of-document token"):
        HuggingFaceTokenizer(no_eod)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        HuggingFaceTokenizer(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="missing.json.*--tokenizer-model"):
        HuggingFaceTokenizer(str(tmp_path / "missing.json"))


def test_huggingface_include_special_tokens_matches_transformers(tmp_path):
    """--tokenizer-hf-include-special-tokens: the ids of transformers' `tokenizer(text)` (the
    post-processor's BOS included, Llama-3 style); without it those of add_special_tokens=False.
    Only HuggingFaceTokenizer takes it, and it joins the cache identity only when set."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, processors

    path = make_hf_tokenizer(str(tmp_path), specials=("<|endoftext|>", "<bos>"))
    tok = Tokenizer.from_file(path)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                       special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    tok.save(path)
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=path)
    text = generated_text()[:500]
    plain, with_bos = HuggingFaceTokenizer(path), build_tokenizer("HuggingFaceTokenizer", path,
                                                                   include_special_tokens=True)
    assert with_bos.tokenize(text) == ref(text)["input_ids"] != plain.tokenize(text)
    assert plain.tokenize(text) == ref(text, add_special_tokens=False)["input_ids"]
    assert with_bos.tokenize(text)[0] == tok.token_to_id("<bos>")
    assert plain.post_processor_ids() == with_bos.post_processor_ids() == [tok.token_to_id("<bos>")]
    assert "include_special_tokens" in with_bos.unique_identifiers
    assert "include_special_tokens" not in plain.unique_identifiers
    with pytest.raises(ValueError, match="--tokenizer-hf-include-special-tokens applies to --tokenizer-type "
                                         "HuggingFaceTokenizer only"):
        build_tokenizer("ByteTokenizer", include_special_tokens=True)


def test_null_tokenizer_matches_megatron_semantics():
    from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer as CoreNull

    tok, core = NullTokenizer(1000), CoreNull(1000)
    check_common(tok)
    assert (tok.vocab_size, tok.eod) == (core.vocab_size, core.eod) == (1001, 1000)
    assert tok.eod == tok.vocab_size - 1
    assert tok.tokenize("1 2  999\n3") == [1, 2, 999, 3]
    assert tok.detokenize([1, 2, 3]) == "1 2 3"
    with pytest.raises(ValueError, match="pre-tokenized"):
        tok.tokenize("1 two 3")


def test_build_tokenizer(sp_model, hf_json):
    assert isinstance(build_tokenizer("ByteTokenizer"), ByteTokenizer)
    assert isinstance(build_tokenizer("ByteLevelTokenizer"), ByteTokenizer)
    assert isinstance(build_tokenizer("SentencePieceTokenizer", sp_model), SentencePieceTokenizer)
    assert isinstance(build_tokenizer("HuggingFaceTokenizer", hf_json), HuggingFaceTokenizer)
    assert build_tokenizer("NullTokenizer", vocab_size=50).eod == 50
    with pytest.raises(ValueError, match=r"--tokenizer-type 'TikTokenizer'.*ByteTokenizer.*"
                                         r"SentencePieceTokenizer.*HuggingFaceTokenizer.*GPT2BPETokenizer.*NullTokenizer"):
        build_tokenizer("TikTokenizer")
    with pytest.raises(ValueError, match="--tokenizer-model"):
        build_tokenizer("SentencePieceTokenizer")
    with pytest.raises(ValueError, match="--vocab-size"):
        build_tokenizer("NullTokenizer")


def test_gpt2_bpe_tokenizer_matches_transformers_gpt2(tmp_path):
    """Megatron-LM's GPT2BPETokenizer from vocab.json + merges.txt: the ids of transformers' own
    GPT2Tokenizer loaded from the same two files, EOD = <|endoftext|>, vocabulary = the encoder."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    from tst_megatron.tokenizers import GPT2BPETokenizer

    trained = Tokenizer.from_file(make_hf_tokenizer(str(tmp_path / "hf"), specials=("<|endoftext|>",)))
    vocab, merges = trained.model.save(str(tmp_path))
    tok = build_tokenizer("GPT2BPETokenizer", vocab, merge_file=merges)
    assert isinstance(tok, GPT2BPETokenizer)
    check_common(tok)
    ref = transformers.GPT2Tokenizer.from_pretrained(str(tmp_path))  # reads vocab.json and merges.txt
    text = generated_text()[:2000] + "  double  spaces,\ttabs\n\nnewlines, don't it's 3.14 émigré 東京 🙂"
    assert tok.tokenize(text) == ref.encode(text)
    assert tok.detokenize(tok.tokenize(text)) == text
    assert tok.eod == ref.convert_tokens_to_ids("<|endoftext|>") and tok.pad == -1
    assert tok.vocab_size == len(ref)
    with pytest.raises(ValueError, match="--merge-file"):
        build_tokenizer("GPT2BPETokenizer", vocab)
    with pytest.raises(ValueError, match="no <\\|endoftext\\|> entry"):
        plain = Tokenizer.from_file(make_hf_tokenizer(str(tmp_path / "plain"), specials=("<pad>",)))
        v2, m2 = plain.model.save(str(tmp_path / "plain"))
        build_tokenizer("GPT2BPETokenizer", v2, merge_file=m2)


def _sp_default_model(path, model_type, **extra):
    """A SentencePiece model with SentencePiece's own defaults (nmt_nfkc, dummy prefix, extra
    whitespace removed): the other normalizer settings the tokenizer.json must reproduce."""
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(generated_text().splitlines()), model_writer=buf,
                                   vocab_size=200, model_type=model_type, minloglevel=2, **extra)
    with open(path, "wb") as fh:
        fh.write(buf.getvalue())
    return path


def test_sentencepiece_to_tokenizer_json(tmp_path):
    """The export's tokenizer.json encodes like SentencePiece itself -- our trainer's models (no
    dummy prefix, identity normalization, byte fallback) and SentencePiece's defaults, BPE and
    unigram -- and decodes the same; what it cannot reproduce is refused, not written wrong."""
    pytest.importorskip("tokenizers")
    from tst_megatron.hf_convert import spm_tokenizer as st

    texts = TEXTS + [generated_text(200, seed=2), "x </s> <s> <pad> y", "<0x41> \u2581 ﬁ ①  a   b "]
    models = {"ours_bpe": train_sp(str(tmp_path), "bpe"), "ours_unigram": train_sp(str(tmp_path), "unigram", vocab_size=350)}
    for model_type in ("bpe", "unigram"):
        models[f"default_{model_type}"] = _sp_default_model(str(tmp_path / f"d_{model_type}.model"), model_type)
    for name, path in models.items():
        tok = st.sentencepiece_to_tokenizers(path)
        sp = SentencePieceTokenizer(path)
        different, tied = st.check_against_sentencepiece(tok, path, texts)
        assert different == [], name
        if name.endswith("bpe"):  # no equal-score ties in BPE: the same ids on every text
            assert tied == [] and all(tok.encode(t, add_special_tokens=False).ids == sp.tokenize(t)
                                      for t in texts), name
        out = tmp_path / name / "tokenizer.json"
        out.parent.mkdir()
        sp.save_tokenizer_json(str(out))
        assert (out.parent / "tokenizer.model").read_bytes() == open(path, "rb").read()
        # "</s>" typed in a document stays text, as SentencePiece encodes it
        assert tok.encode("a </s> b", add_special_tokens=False).ids == sp.tokenize("a </s> b")
        assert sp.eod not in sp.tokenize("a </s> b")

    # a converter that would encode differently is caught by the check...
    broken = st.sentencepiece_to_tokenizers(models["default_bpe"])
    from tokenizers import normalizers
    broken.normalizer = normalizers.Sequence([])  # drops the dummy prefix and NFKC
    different, _ = st.check_against_sentencepiece(broken, models["default_bpe"], texts)
    assert different
    # ...and user-defined pieces, which it cannot reproduce, are refused by name
    with_user = _sp_default_model(str(tmp_path / "user.model"), "bpe", user_defined_symbols=["<tool>"])
    with pytest.raises(ValueError, match="user-defined pieces \\(<tool>\\)"):
        SentencePieceTokenizer(with_user).save_tokenizer_json(str(tmp_path / "user.json"))
    assert not (tmp_path / "user.json").exists()
