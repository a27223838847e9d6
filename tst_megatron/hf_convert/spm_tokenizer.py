"""A SentencePiece `.model` as the Hugging Face `tokenizer.json` that transformers loads.

Why our own converter: transformers turns a `.model` file into a fast tokenizer through
per-architecture classes (Llama's assumes a BPE model with a dummy prefix), so a unigram model,
or one trained without a dummy prefix as `tools/train_tokenizer.py` trains them, loads with other
ids -- a silently different tokenizer is worse than none. Here the `tokenizers` pipeline is built
from the model's own specification, and `check_against_sentencepiece` compares it with
SentencePiece itself on sample text before an export writes it.

The correspondence (SentencePiece -> tokenizers):
  unigram pieces and scores          -> Unigram model; control, unknown and byte pieces, which
                                        SentencePiece never matches from text, are hidden from the
                                        lattice by a pre-tokenizer cut no normal piece spans (byte
                                        pieces still serve byte fallback)
  bpe pieces                         -> BPE model whose merges are ranked by the merged piece's
                                        score (SentencePiece merges the best-scoring pair first)
  normalizer: precompiled charsmap   -> Precompiled; remove_extra_whitespaces -> strip + collapse
                                        runs of spaces; add_dummy_prefix -> Prepend(" ");
                                        escape_whitespaces -> " " becomes "\u2581"
  user-defined pieces                -> refused (SentencePiece matches them inside the normalized
                                        text, tokenizers' added tokens before normalization)
  unknown piece                      -> decodes to its unk_surface (" \u2047 ")
  control pieces (<s>, </s>, <pad>)  -> special tokens for decoding; text that spells them is
                                        encoded as text, as SentencePiece does (the export sets
                                        split_special_tokens)
No BOS/EOS is added on encode: Megatron's SentencePieceTokenizer adds none either; for
Megatron-LM's Llama2Tokenizer, which starts every document with BOS, `add_bos=True` writes the
post-processor that does the same (what Llama's own tokenizer does with add_special_tokens=True).
"""
from __future__ import annotations

import re
from typing import Iterable, List, Optional, Sequence, Tuple

SPACE = "\u2581"
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE = 1, 2


def _load_proto(model_path: str):
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as exc:  # the generated module needs protobuf
        raise ImportError(f"reading {model_path} as a SentencePiece model needs protobuf "
                          f"(pip install protobuf): {exc}") from None
    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_path, "rb") as fh:
        proto.ParseFromString(fh.read())
    return proto


def _bpe_merges(pieces) -> List[tuple]:
    """Pairs of normal pieces that make a normal piece, best merged score first (ties: lower id)."""
    normal = {p.piece: (p.score, i) for i, p in enumerate(pieces) if p.type == NORMAL}
    ranked = []
    for piece, (score, i) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, i, left, right))
    return [(left, right) for _, _, left, right in sorted(ranked)]


def _hiding_split(hidden: Sequence[str], normal: Sequence[str]):
    """A pre-tokenizer that cuts every spelling of a `hidden` piece in two, so it cannot match.

    The cut goes between two characters that no normal piece holds side by side, so no piece
    SentencePiece could use spans it, and not between two unknown characters (SentencePiece
    fuses a run of them into one <unk>); where every cut point is spanned by some piece the first
    one is used, and the sample-text check refuses the model if that changes any ids.
    """
    from tokenizers import Regex, pre_tokenizers

    pairs = {piece[i:i + 2] for piece in normal for i in range(len(piece) - 1)}
    known = {piece for piece in normal if len(piece) == 1}

    def safe(h: str, k: int) -> bool:  # no piece spans it; not inside a run of unknown characters
        return h[k - 1:k + 1] not in pairs and (h[k - 1] in known or h[k] in known)

    cuts = []
    for h in sorted(set(hidden), key=len, reverse=True):
        k = next((k for k in range(1, len(h)) if safe(h, k)), 1)
        cuts.append(f"{re.escape(h[:k])}(?={re.escape(h[k:])})")
    return pre_tokenizers.Split(Regex("|".join(cuts)), behavior="merged_with_previous")


def sentencepiece_to_tokenizers(model_path: str):
    """Build a `tokenizers.Tokenizer` that encodes like `SentencePieceProcessor.encode`."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers

    proto = _load_proto(model_path)
    trainer, spec = proto.trainer_spec, proto.normalizer_spec
    if spec.name not in ("identity", "") and not spec.precompiled_charsmap:
        raise ValueError(f"{model_path}: normalization rule {spec.name!r} has no precompiled "
                         "charsmap to reproduce")
    if trainer.treat_whitespace_as_suffix:
        raise ValueError(f"{model_path}: treat_whitespace_as_suffix is not supported")
    pieces = list(proto.pieces)
    user_defined = [p.piece for p in pieces if p.type == USER_DEFINED]
    if user_defined:
        # SentencePiece matches them inside the normalized text; `tokenizers` added tokens split
        # the raw text first, so the dummy prefix and decoding would differ around them
        raise ValueError(f"{model_path}: user-defined pieces ({', '.join(user_defined[:5])}) are "
                         "not supported")
    if trainer.model_type == UNIGRAM:
        vocab = [(p.piece, p.score) for p in pieces]
        tok = Tokenizer(models.Unigram(vocab, unk_id=trainer.unk_id, byte_fallback=trainer.byte_fallback))
        # A Unigram lattice holds every piece, so text spelling "</s>" or "<0x41>" would match the
        # control/byte piece, which SentencePiece never matches from text: such spellings are cut
        hidden = [p.piece for p in pieces if p.type in (CONTROL, BYTE, UNKNOWN) and len(p.piece) > 1]
        if hidden:
            tok.pre_tokenizer = _hiding_split(hidden, [p.piece for p in pieces if p.type == NORMAL])
    elif trainer.model_type == BPE:
        tok = Tokenizer(models.BPE({p.piece: i for i, p in enumerate(pieces)}, _bpe_merges(pieces),
                                   unk_token=trainer.unk_piece, fuse_unk=True,
                                   byte_fallback=trainer.byte_fallback))
    else:
        raise ValueError(f"{model_path}: SentencePiece model type {trainer.model_type} (char/word) "
                         "is not supported; only unigram and bpe")

    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(r"^ +| +$"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(" "))
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", SPACE))
    if steps:
        tok.normalizer = normalizers.Sequence(steps)

    tok.add_special_tokens([AddedToken(p.piece, normalized=False, special=True)
                            for p in pieces if p.type == CONTROL])
    tok.encode_special_tokens = True  # "</s>" typed in a document is text, as in SentencePiece

    dec = [decoders.Replace(trainer.unk_piece, trainer.unk_surface), decoders.Replace(SPACE, " ")]
    if trainer.byte_fallback:
        dec.append(decoders.ByteFallback())
    dec.append(decoders.Fuse())
    if spec.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(dec)
    return tok


def sample_texts(max_bytes: int = 200_000) -> List[str]:
    """Text to compare tokenizers on: standard-library sources plus whitespace/Unicode corners."""
    from ..corpus import _stdlib_sources, stdlib_dir

    texts = ["", " ", "  two  spaces  ", "\ttab\nnew line\n\n", " leading", "trailing ",
             "x </s> <s> <pad> <unk> y", "<0x41> literal byte name", "\u00e9migr\u00e9 caf\u00e9",
             "\u6771\u4eac \U0001f642 \u0391\u03b8\u03ae\u03bd\u03b1", "\u2581already escaped"]
    total = 0
    for path in _stdlib_sources(stdlib_dir()):
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except (OSError, UnicodeDecodeError):
            continue
        texts.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    return texts


def check_against_sentencepiece(tok, model_path: str, texts: Iterable[str]) -> Tuple[List[str], List[str]]:
    """(different, tied): texts (shortened) on which `tok` disagrees with SentencePiece.

    `tied` are unigram segmentations of exactly the same total score that the two libraries'
    Viterbi searches break differently (runs of a repeated character, e.g. "#####"): both are
    the model's most likely segmentation and decode to the same text. `different` is anything
    else -- other ids of another score, or a decode that differs.
    """
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model_path)
    different, tied = [], []
    for text in texts:
        ids = sp.encode(text, out_type=int)
        got = tok.encode(text, add_special_tokens=False).ids
        if got == ids and tok.decode(ids) == sp.decode(ids):
            continue
        score = sum(sp.get_score(i) for i in ids)
        same_score = (len(got) and max(got) < sp.get_piece_size()
                      and abs(sum(sp.get_score(i) for i in got) - score) <= 1e-3 * max(1.0, abs(score)))
        if same_score and sp.decode(got) == sp.decode(ids) == tok.decode(got):
            tied.append(text[:60])
        else:
            different.append(text[:60])
    return different, tied


def write_tokenizer_json(model_path: str, path: str, texts: Optional[Sequence[str]] = None,
                         add_bos: bool = False) -> int:
    """Write `model_path` as tokenizer.json at `path`; returns the number of tied sample texts.
    `add_bos`: encoding with special tokens starts with the model's BOS piece.

    Raises ValueError, writing nothing, when it encodes any sample text differently.
    """
    tok = sentencepiece_to_tokenizers(model_path)
    if add_bos:
        from tokenizers import processors

        proto = _load_proto(model_path)
        bos_id = proto.trainer_spec.bos_id
        if bos_id < 0:
            raise ValueError(f"{model_path}: the model has no BOS piece (bos_id -1) to start documents with")
        bos = proto.pieces[bos_id].piece
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, bos_id)])
    texts = sample_texts() if texts is None else texts
    different, tied = check_against_sentencepiece(tok, model_path, texts)
    if different:
        raise ValueError(f"{model_path}: the converted tokenizer encodes {len(different)} of "
                         f"{len(texts)} sample texts differently from SentencePiece "
                         f"(first: {different[0]!r})")
    tok.save(path)
    return len(tied)
