#!/usr/bin/env python
"""Tokenize a text corpus into megatron-core's indexed dataset format (.bin/.idx).

Megatron-LM compatible flags and outputs: `{output_prefix}_{key}_document.bin/.idx` per
`--json-keys` key, written through megatron-core's `IndexedDatasetBuilder`, so `GPTDataset` reads
them directly (pass `{output_prefix}_text_document` as the data path).

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-type ByteTokenizer --append-eod --workers 2

`--input` is a JSONL file, a plain text file (one document) or a directory (each file one
document, `.jsonl` files read line by line); see `tst_megatron/corpus.py`. Documents that tokenize
to nothing are skipped (as in Megatron-LM, an empty text is not nothing for Llama2Tokenizer, which
starts every document with BOS). Output is byte-identical for any `--workers`: records are tokenized in a
process pool but written in input order. Nothing partial is left behind on error: the files are
written under a `.partial` suffix and renamed at the end.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import time
import warnings
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # run as a script from a checkout, like Megatron-LM's tools
    sys.path.insert(0, _REPO)

with warnings.catch_warnings():  # megatron-core warns at import about missing TE/Apex kernels
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
    from megatron.core.datasets.indexed_dataset import (DType, IndexedDatasetBuilder, get_bin_path,
                                                        get_idx_path)

from tst_megatron.corpus import (INPUT_FORMATS, CorpusError, Record, is_jsonl_file, iter_records,
                                 list_input_files, parse_record_parts)
from tst_megatron.tokenizers import _TYPE_ALIASES, TOKENIZER_TYPES, build_tokenizer

CHUNK_SIZE = 32  # records per worker task; imap keeps chunk order, so output order is fixed
PARTIAL = ".partial"


def get_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    group = parser.add_argument_group("input data")
    group.add_argument("--input", required=True,
                       help="JSONL file (one document per line), plain text file (one document per file), "
                            "or directory of text/JSONL files")
    group.add_argument("--json-keys", nargs="+", default=["text"],
                       help="JSON keys to extract; one output dataset per key")
    group.add_argument("--input-format", choices=INPUT_FORMATS, default="auto",
                       help="auto: .jsonl/.json/.ndjson files are JSONL, others plain text")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True,
                       help=f"one of {', '.join(TOKENIZER_TYPES)} (Megatron-LM's names are accepted "
                            f"too: {', '.join(_TYPE_ALIASES)})")
    group.add_argument("--tokenizer-model", default=None,
                       help="SentencePiece .model, or HuggingFace tokenizer.json / its directory")
    group.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer only")
    group.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer: GPT-2's vocab.json")
    group.add_argument("--merge-file", default=None, help="GPT2BPETokenizer: GPT-2's merges.txt")
    group.add_argument("--tokenizer-hf-include-special-tokens", action="store_true",
                       help="HuggingFaceTokenizer: encode with the tokenizer's special tokens (its post-processor's "
                            "BOS, e.g. Llama-3's <|begin_of_text|>), as the model being continued was pretrained")
    group.add_argument("--append-eod", action="store_true",
                       help="append the tokenizer's end-of-document token to every document")
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True,
                       help="writes {prefix}_{key}_document.bin/.idx")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    group.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    group.add_argument("--log-interval", type=int, default=None,
                       help="also print a 'Processed N documents' line every N documents (Megatron-LM's log)")
    group = parser.add_argument_group(
        "Megatron-LM compatibility", "accepted so that Megatron-LM's preprocessing commands run unchanged")
    group.add_argument("--partitions", type=int, default=1,
                       help="ignored: --workers sets the parallelism; the output is that of one partition")
    group.add_argument("--keep-sequential-samples", action="store_true",
                       help="ignored: the input order is always kept")
    group.add_argument("--split-sentences", action="store_true",
                       help="refused: sentence splitting (BERT-style data) is not implemented")
    group.add_argument("--keep-newlines", action="store_true",
                       help="ignored (only with --split-sentences): newlines are always kept")
    group.add_argument("--lang", default="english", help="ignored (only with --split-sentences)")
    return parser.parse_args(argv)


def _fail(message: str) -> "SystemExit":
    return SystemExit(f"preprocess_data.py: error: {message}")


# --------------------------------------------------------------------------- encoding (workers)
class Encoder:
    """Record -> {key: token ids}. One per process (pool workers build their own tokenizer)."""

    def __init__(self, tokenizer, json_keys: Sequence[str], append_eod: bool) -> None:
        self.tokenizer = tokenizer
        self.json_keys = list(json_keys)
        self.append_eod = append_eod
        self.dtype = DType.optimal_dtype(self.tokenizer.vocab_size)

    def encode(self, record: Record) -> Tuple[int, Dict[str, np.ndarray]]:
        """Return (input bytes, {key: ids in the output dtype}); empty arrays mark empty docs."""
        texts = parse_record_parts(record, self.json_keys)
        out = {}
        for key, parts in texts.items():
            try:  # a list of sentences: each tokenized on its own, then concatenated (as Megatron-LM)
                ids = np.concatenate([np.asarray(self.tokenizer.tokenize(part), dtype=np.int64).reshape(-1)
                                      for part in parts] or [np.zeros(0, dtype=np.int64)])
            except Exception as exc:
                raise CorpusError(f"{record.where}: {type(self.tokenizer).__name__} failed on key "
                                  f"{key!r}: {exc}") from None
            ids = np.asarray(ids, dtype=np.int64)
            if ids.size and self.append_eod:
                ids = np.append(ids, self.tokenizer.eod)
            if ids.size and (ids.min() < 0 or ids.max() >= self.tokenizer.vocab_size):
                bad = int(ids[(ids < 0) | (ids >= self.tokenizer.vocab_size)][0])
                raise CorpusError(f"{record.where}: token id {bad} (key {key!r}) is outside the "
                                  f"vocabulary [0, {self.tokenizer.vocab_size}) of "
                                  f"{type(self.tokenizer).__name__}")
            out[key] = ids.astype(self.dtype)
        return len(record.data), out


_WORKER_ENCODER: Optional[Encoder] = None


def _init_worker(tokenizer_args, json_keys, append_eod) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = Encoder(build_tokenizer(*tokenizer_args), json_keys, append_eod)


def _encode_in_worker(record: Record):
    return _WORKER_ENCODER.encode(record)


# --------------------------------------------------------------------------- output
def output_prefixes(output_prefix: str, json_keys: Sequence[str]) -> Dict[str, str]:
    """Megatron's naming: one dataset per key, `{prefix}_{key}_document`."""
    return {key: f"{output_prefix}_{key}_document" for key in json_keys}


def _check_output_dir(output_prefix: str) -> None:
    """Create the prefix's directory if needed and prove it is writable, before any work."""
    directory = os.path.dirname(os.path.abspath(output_prefix))
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".preprocess_probe_{os.getpid()}")
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as exc:
        raise _fail(f"cannot write to the directory of --output-prefix {output_prefix!r} "
                    f"({directory}): {exc.strerror or exc}; choose a writable location") from None


class _Writers:
    """One `IndexedDatasetBuilder` per key, writing `.partial` files until `commit()`."""

    def __init__(self, prefixes: Dict[str, str], dtype) -> None:
        self.prefixes = prefixes
        self.builders = {}
        self.documents = {key: 0 for key in prefixes}
        self.tokens = {key: 0 for key in prefixes}
        self.empty = {key: 0 for key in prefixes}
        try:
            for key, prefix in prefixes.items():
                self.builders[key] = IndexedDatasetBuilder(get_bin_path(prefix) + PARTIAL, dtype=dtype)
        except OSError as exc:
            self.abort()  # the keys opened before this one leave no .partial behind
            raise _fail(f"cannot write the output {exc.filename!r}: {exc.strerror or exc}; choose another "
                        "--output-prefix (or --json-keys)") from None

    def add(self, doc: Dict[str, np.ndarray]) -> int:
        added = 0
        for key, ids in doc.items():
            if ids.size == 0:
                self.empty[key] += 1
                continue
            self.builders[key].add_document(ids, [ids.size])
            self.documents[key] += 1
            self.tokens[key] += int(ids.size)
            added += int(ids.size)
        return added

    def commit(self) -> None:
        for key, prefix in self.prefixes.items():
            self.builders[key].finalize(get_idx_path(prefix) + PARTIAL)
        done = []
        try:
            for prefix in self.prefixes.values():
                # megatron's GPTDataset caches its sample indices under <prefix>/cache, named by a
                # hash of the path and settings, not of the data: replaced data must not meet them
                stale = os.path.join(prefix, "cache")
                if os.path.isdir(stale):  # also when the old .bin/.idx were deleted by hand first
                    shutil.rmtree(stale)
                    print(f"> {prefix}: replaced; removed megatron's index cache {stale} (a --data-cache-path "
                          "elsewhere needs clearing by hand)", file=sys.stderr, flush=True)
                for path in (get_bin_path(prefix), get_idx_path(prefix)):
                    os.replace(path + PARTIAL, path)
                    done.append(path)
        except OSError as exc:
            # never leave half an output (a .bin without its .idx) behind
            for path in done:
                try:
                    os.remove(path)
                except OSError:
                    pass
            raise _fail(f"cannot write the output {exc.filename2 or exc.filename!r}: "
                        f"{exc.strerror or exc}; choose another --output-prefix") from None

    def abort(self) -> None:
        for key, prefix in self.prefixes.items():
            try:
                self.builders[key].data_file.close()
            except Exception:  # (a key whose builder was never opened among them)
                pass
            for path in (get_bin_path(prefix), get_idx_path(prefix)):
                if os.path.isfile(path + PARTIAL):  # (a directory of that name was never ours)
                    os.remove(path + PARTIAL)


def _progress(total: Optional[int], disable: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="doc", file=sys.stderr, disable=disable, mininterval=0.5,
                dynamic_ncols=True, desc="tokenizing")


def _encoded_stream(args, tokenizer, records):
    """Yield encoded records in input order, from this process or from a pool of workers."""
    if args.workers == 1:
        encoder = Encoder(tokenizer, args.json_keys, args.append_eod)
        for record in records:
            yield encoder.encode(record)
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # HF tokenizers vs fork
    tokenizer_args = (args.tokenizer_type, args.tokenizer_model or args.vocab_file, args.vocab_size, args.merge_file,
                      args.tokenizer_hf_include_special_tokens)
    with multiprocessing.Pool(args.workers, initializer=_init_worker,
                              initargs=(tokenizer_args, args.json_keys, args.append_eod)) as pool:
        yield from pool.imap(_encode_in_worker, records, chunksize=CHUNK_SIZE)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Run preprocessing; returns a summary (per-key documents/tokens/prefix) for callers/tests."""
    args = get_args(argv)
    if args.workers < 1:
        raise _fail(f"--workers must be >= 1 (got {args.workers})")
    if args.partitions < 1:
        raise _fail(f"--partitions must be >= 1 (got {args.partitions}); it is ignored, --workers sets the parallelism")
    if args.log_interval is not None and args.log_interval < 1:
        raise _fail(f"--log-interval must be >= 1 (got {args.log_interval})")
    if args.split_sentences:
        raise _fail("--split-sentences: sentence splitting (NLTK punkt, for BERT-style data) is not implemented; "
                    "GPT pretraining uses whole documents, so drop the flag")
    if len(set(args.json_keys)) != len(args.json_keys):
        raise _fail(f"--json-keys has duplicates: {args.json_keys}")
    try:
        tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model or args.vocab_file, args.vocab_size,
                                    merge_file=args.merge_file,
                                    include_special_tokens=args.tokenizer_hf_include_special_tokens)
    except (ValueError, OSError, ImportError) as exc:
        raise _fail(str(exc)) from None
    try:
        files = list_input_files(args.input)
    except CorpusError as exc:
        raise _fail(str(exc)) from None
    _check_output_dir(args.output_prefix)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    prefixes = output_prefixes(args.output_prefix, args.json_keys)
    # an --output-prefix inside an --input directory: its own (earlier or partial) output and
    # megatron's index cache beside it are not input
    own = {os.path.realpath(get_bin_path(p) + end) for p in prefixes.values() for end in ("", PARTIAL)}
    own |= {os.path.realpath(get_idx_path(p) + end) for p in prefixes.values() for end in ("", PARTIAL)}
    caches = [os.path.realpath(os.path.join(p, "cache")) + os.sep for p in prefixes.values()]
    skipped = [f for f in files if os.path.realpath(f) in own or os.path.realpath(f).startswith(tuple(caches))]
    if skipped:
        files = [f for f in files if f not in skipped]
        print(f"> --input: skipping {len(skipped)} file(s) of this --output-prefix's own output "
              f"({', '.join(map(os.path.basename, skipped[:4]))}{' ...' if len(skipped) > 4 else ''})",
              file=sys.stderr, flush=True)
    if not files:
        raise _fail(f"--input {args.input!r} is an empty directory: no documents to process")
    for prefix in prefixes.values():
        for path in (get_bin_path(prefix), get_idx_path(prefix)):
            if os.path.isdir(path):
                raise _fail(f"cannot write the output {path!r}: it is a directory; "
                            "choose another --output-prefix")
    # Whole-file documents are countable up front; JSONL line counts are not worth a pass.
    total = None if any(is_jsonl_file(f, args.input_format) for f in files) else len(files)
    writers = _Writers(prefixes, dtype)
    stream = _encoded_stream(args, tokenizer, iter_records(args.input, args.input_format, files))
    start = time.time()
    n_records = n_bytes = n_tokens = 0
    try:
        with _progress(total, args.no_progress) as bar:
            last = start
            for size, doc in stream:
                n_records += 1
                n_bytes += size
                n_tokens += writers.add(doc)
                bar.update(1)
                now = time.time()
                if args.log_interval and n_records % args.log_interval == 0:
                    secs = max(now - start, 1e-9)
                    bar.write(f"Processed {n_records} documents ({n_records / secs:,.1f} docs/s, "
                              f"{n_bytes / secs / 1e6:.2f} MB/s).", file=sys.stderr)
                if now - last >= 0.5:
                    bar.set_postfix_str(f"{n_tokens / max(now - start, 1e-9):,.0f} tok/s")
                    last = now
            bar.set_postfix_str(f"{n_tokens / max(time.time() - start, 1e-9):,.0f} tok/s")
        if n_records == 0 or not any(writers.documents.values()):
            what = "no records" if n_records == 0 else "only empty documents"
            raise _fail(f"--input {args.input!r} has {what}: nothing to write")
        empty = [key for key, n in writers.documents.items() if n == 0]
        if empty:  # its dataset would be an empty .bin that GPTDataset cannot even open
            raise _fail(f"--json-keys {empty[0]}: every {empty[0]!r} of --input {args.input!r} is empty; "
                        "drop the key or fix the data")
        writers.commit()
    except CorpusError as exc:
        writers.abort()
        raise _fail(str(exc)) from None
    except BaseException:
        writers.abort()
        raise
    finally:
        stream.close()  # stops the worker pool now, not at garbage collection
    elapsed = max(time.time() - start, 1e-9)

    summary = {"documents": dict(writers.documents), "tokens": dict(writers.tokens),
               "empty_skipped": dict(writers.empty), "prefixes": prefixes,
               "records": n_records, "input_bytes": n_bytes, "dtype": np.dtype(dtype).name,
               "vocab_size": tokenizer.vocab_size, "seconds": elapsed}
    print(f"processed {n_records} records ({n_bytes / 1e6:.2f} MB) in {elapsed:.1f} s: "
          f"{n_records / elapsed:,.0f} docs/s, {n_tokens / elapsed:,.0f} tokens/s; "
          f"{args.tokenizer_type} vocab {tokenizer.vocab_size}, dtype {summary['dtype']}")
    for key, prefix in prefixes.items():
        skipped = f" ({writers.empty[key]} empty skipped)" if writers.empty[key] else ""
        print(f"  {key}: {writers.documents[key]} documents{skipped}, {writers.tokens[key]} tokens "
              f"-> {prefix}.bin/.idx")
    return summary


if __name__ == "__main__":
    main()
