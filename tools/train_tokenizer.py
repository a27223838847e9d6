#!/usr/bin/env python
"""Train a SentencePiece tokenizer (BPE or unigram) for `--tokenizer-type SentencePieceTokenizer`.

    python tools/train_tokenizer.py --input corpus.jsonl --output-prefix data/spm \\
        --model-type bpe --vocab-size 4096

writes `data/spm.model` (pass it as `--tokenizer-model`) and `data/spm.vocab` (piece<TAB>score).

Choices, and why:
- special ids unk=0 `<unk>`, bos=1 `<s>`, eos=2 `</s>` (the EOD that `--append-eod` uses),
  pad=3 `<pad>` (distinct from EOD, as megatron's datasets require);
- `byte_fallback`: characters outside the vocabulary become UTF-8 byte pieces, so every input
  is encodable and `decode(encode(t)) == t`;
- identity normalization, no extra-whitespace removal, no dummy prefix, whitespace-only pieces
  allowed: source code keeps its indentation and round-trips exactly;
- deterministic: documents in `--input` order, every line used unless `--input-sentence-size`
  caps it (then the *first* N lines, not a random sample), a fixed `--seed`, and the model is
  serialized in memory so the output does not depend on the output path. Identical arguments
  (including `--num-threads`) give byte-identical files.

Training sentences are the non-blank lines of each document (SentencePiece learns from lines;
a newline itself is encoded through byte fallback as one token).
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from tst_megatron.corpus import INPUT_FORMATS, CorpusError, iter_documents  # noqa: E402

SPECIAL_PIECES = {"unk": (0, "<unk>"), "bos": (1, "<s>"), "eos": (2, "</s>"), "pad": (3, "<pad>")}
BYTE_PIECES = 256


def get_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--input", required=True,
                        help="JSONL file, plain text file, or directory (as tools/preprocess_data.py)")
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="JSON keys holding text")
    parser.add_argument("--input-format", choices=INPUT_FORMATS, default="auto",
                        help="auto: .jsonl/.json/.ndjson files are JSONL (one document per line), others plain text")
    parser.add_argument("--output-prefix", required=True, help="writes {prefix}.model, {prefix}.vocab")
    parser.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe", help="SentencePiece model kind")
    parser.add_argument("--vocab-size", type=int, default=4096,
                        help=f"total pieces, including {len(SPECIAL_PIECES)} special and "
                             f"{BYTE_PIECES} byte-fallback pieces")
    parser.add_argument("--character-coverage", type=float, default=1.0,
                        help="fraction of characters covered by character pieces (rest: bytes)")
    parser.add_argument("--input-sentence-size", type=int, default=0,
                        help="use at most the first N lines (0: all)")
    parser.add_argument("--max-sentence-length", type=int, default=16384,
                        help="longer lines (in bytes) are left out of training")
    parser.add_argument("--num-threads", type=int, default=1,
                        help="trainer threads (part of the model file: keep it fixed to reproduce)")
    parser.add_argument("--seed", type=int, default=1234, help="SentencePiece random seed")
    parser.add_argument("--verbose", action="store_true", help="show SentencePiece's training log")
    return parser.parse_args(argv)


def _fail(message: str) -> SystemExit:
    return SystemExit(f"train_tokenizer.py: error: {message}")


def collect_sentences(input_path: str, json_keys: Sequence[str], input_format: str = "auto",
                      limit: int = 0) -> List[str]:
    """Non-blank lines of every document, in input order; the first `limit` when limit > 0.

    Collected up front (not streamed into the trainer) so input errors surface as clean messages
    rather than from inside SentencePiece's C++ callback.
    """
    sentences: List[str] = []
    for doc in iter_documents(input_path, json_keys, input_format):
        for key in json_keys:
            for line in doc[key].splitlines():
                if line.strip():
                    sentences.append(line)
                    if 0 < limit <= len(sentences):
                        return sentences
    return sentences


def train_sentencepiece(sentences: Sequence[str], model_type: str, vocab_size: int,
                        character_coverage: float = 1.0, max_sentence_length: int = 16384,
                        num_threads: int = 1, seed: int = 1234, verbose: bool = False) -> bytes:
    """Train and return the serialized model (see the module docstring for the settings)."""
    import sentencepiece as spm

    spm.set_random_generator_seed(seed)
    ids = {f"{name}_id": i for name, (i, _) in SPECIAL_PIECES.items()}
    pieces = {f"{name}_piece": p for name, (_, p) in SPECIAL_PIECES.items()}
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=writer, model_type=model_type,
        vocab_size=vocab_size, character_coverage=character_coverage, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
        input_sentence_size=0, shuffle_input_sentence=False,
        max_sentence_length=max_sentence_length, num_threads=num_threads,
        minloglevel=0 if verbose else 2, **ids, **pieces)
    return writer.getvalue()


def _write_outputs(model: bytes, output_prefix: str) -> Dict[str, object]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=model)
    model_path, vocab_path = output_prefix + ".model", output_prefix + ".vocab"
    with open(model_path, "wb") as f:
        f.write(model)
    with open(vocab_path, "w", encoding="utf-8") as f:
        for i in range(sp.get_piece_size()):
            f.write(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n")
    return {"model": model_path, "vocab": vocab_path, "vocab_size": sp.get_piece_size(), "sp": sp}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Train, write `{prefix}.model/.vocab`, print a summary; returns it as a dict."""
    args = get_args(argv)
    minimum = len(SPECIAL_PIECES) + BYTE_PIECES + 1
    if args.vocab_size < minimum:
        raise _fail(f"--vocab-size {args.vocab_size} is too small: {len(SPECIAL_PIECES)} special "
                    f"and {BYTE_PIECES} byte pieces need it >= {minimum}")
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise _fail(f"cannot create the directory of --output-prefix {args.output_prefix!r}: "
                    f"{exc.strerror or exc}") from None
    if not os.access(out_dir, os.W_OK):
        raise _fail(f"directory {out_dir!r} of --output-prefix is not writable")

    start = time.time()
    try:
        sentences = collect_sentences(args.input, args.json_keys, args.input_format,
                                      args.input_sentence_size)
    except CorpusError as exc:
        raise _fail(str(exc)) from None
    if not sentences:
        raise _fail(f"--input {args.input!r} holds no text to train on")
    try:
        model = train_sentencepiece(sentences, args.model_type, args.vocab_size,
                                    args.character_coverage, args.max_sentence_length,
                                    args.num_threads, args.seed, args.verbose)
    except RuntimeError as exc:
        raise _fail(f"SentencePiece training failed: {exc}. For a small --input, lower "
                    "--vocab-size (unigram needs more text per piece than bpe)") from None
    out = _write_outputs(model, args.output_prefix)
    sp = out.pop("sp")

    sample = "\n".join(sentences[:2000])
    n_bytes = len(sample.encode("utf-8"))
    n_tokens = max(len(sp.encode(sample)), 1)
    out.update(sentences=len(sentences), bytes_per_token=n_bytes / n_tokens,
               seconds=time.time() - start,
               special_ids={name: i for name, (i, _) in SPECIAL_PIECES.items()})
    print(f"trained {args.model_type} SentencePiece, vocab {out['vocab_size']}, on "
          f"{len(sentences)} lines in {out['seconds']:.1f} s: {out['model']} "
          f"(+ .vocab); {out['bytes_per_token']:.2f} bytes/token on the first lines; "
          f"eod </s> = 2, pad <pad> = 3")
    return out


if __name__ == "__main__":
    main()
