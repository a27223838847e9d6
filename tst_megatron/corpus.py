"""Reading text corpora, and the embedded default corpus for the demo.

Shared by `tools/preprocess_data.py` and `tools/train_tokenizer.py` so that both accept the same
`--input` forms and report errors the same way:

- a JSONL file (`.jsonl`, `.json`, `.ndjson`): one JSON object per line, documents under
  `--json-keys`; blank lines are skipped;
- any other file: plain UTF-8 text, the whole file is one document;
- a directory: every non-hidden file below it, in sorted path order, each read by the two rules
  above (so a directory of JSONL shards works too).

Reading is split in two steps, `iter_records` (raw bytes plus file and line number, cheap, in the
main process) and `parse_record` (decode + JSON, in worker processes), so errors can always name
the file and line they come from.

`build_default_corpus` writes a deterministic JSONL corpus from the Python standard library's own
`.py` sources: text every machine with Python already has, so the demo needs no download.
"""
from __future__ import annotations

import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
INPUT_FORMATS = ("auto", "jsonl", "text")
_BOM = b"\xef\xbb\xbf"  # UTF-8 byte-order mark


class CorpusError(ValueError):
    """Bad input data; the message names the file (and line) and says what to do."""


@dataclass(frozen=True)
class Record:
    """One raw document-to-be: undecoded bytes and where they came from."""

    path: str
    line: Optional[int]  # 1-based line number for JSONL, None for a whole text file
    data: bytes
    is_json: bool

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}" if self.line is not None else self.path


def is_jsonl_file(path: str, input_format: str = "auto") -> bool:
    """Whether `path` is read as JSONL (by suffix under --input-format auto)."""
    if input_format == "auto":
        return path.lower().endswith(JSONL_SUFFIXES)
    return input_format == "jsonl"


def list_input_files(input_path: str) -> List[str]:
    """The files `--input` names: itself, or every non-hidden file below a directory, sorted."""
    if not os.path.exists(input_path):
        raise CorpusError(f"--input {input_path!r} does not exist")
    if os.path.isfile(input_path):
        return [input_path]
    files = []
    for root, dirs, names in os.walk(input_path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files.extend(os.path.join(root, n) for n in sorted(names) if not n.startswith("."))
    # os.walk visits a directory's files before its subdirectories; sort the full relative paths
    # so the order is plain lexicographic and independent of the walk.
    files.sort(key=lambda p: os.path.relpath(p, input_path).split(os.sep))
    return files


def iter_records(input_path: str, input_format: str = "auto",
                 files: Optional[Sequence[str]] = None) -> Iterator[Record]:
    """Yield raw records from `--input` in a fixed order (file order, then line order); `files`:
    the list `list_input_files` gave, taken once (a lazy listing would see files written since)."""
    if input_format not in INPUT_FORMATS:
        raise CorpusError(f"--input-format must be one of {', '.join(INPUT_FORMATS)} "
                          f"(got {input_format!r})")
    for path in list_input_files(input_path) if files is None else files:
        if is_jsonl_file(path, input_format):
            with open(path, "rb") as f:
                for line_no, line in enumerate(f, start=1):
                    # a byte-order mark alone on the first line is a blank line too
                    body = line[len(_BOM):] if line_no == 1 and line.startswith(_BOM) else line
                    if body.strip():
                        yield Record(path, line_no, line, True)
        else:
            with open(path, "rb") as f:
                yield Record(path, None, f.read(), False)


def parse_record(record: Record, json_keys: Sequence[str]) -> Dict[str, str]:
    """Decode one record into {key: text}. Plain text files fill every key with their content; a
    key holding a list of strings is one document, its parts joined."""
    return {key: "".join(parts) for key, parts in parse_record_parts(record, json_keys).items()}


def parse_record_parts(record: Record, json_keys: Sequence[str]) -> Dict[str, List[str]]:
    """Decode one record into {key: [text, ...]}: one part per key, or the strings of a JSON list
    (Megatron-LM's pre-split sentences, which its preprocessing tokenizes one by one and
    concatenates into one document)."""
    try:
        text = record.data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{record.where}: not valid UTF-8 ({exc.reason} at byte {exc.start}); "
                          "convert the file to UTF-8 or remove it from --input") from None
    if record.line in (None, 1) and text.startswith("\ufeff"):
        text = text[1:]  # a byte-order mark (Windows editors write one): not part of the text
    if not record.is_json:
        return {key: [text] for key in json_keys}
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CorpusError(f"{record.where}: malformed JSON ({exc.msg}, column {exc.colno}); "
                          "each line of a JSONL file must be one JSON object") from None
    if not isinstance(obj, dict):
        raise CorpusError(f"{record.where}: expected a JSON object per line, got "
                          f"{type(obj).__name__}")
    out = {}
    for key in json_keys:
        if key not in obj:
            keys = ", ".join(sorted(map(str, obj))) or "none"
            raise CorpusError(f"{record.where}: missing key {key!r} (keys present: {keys}); "
                              "pick the text field with --json-keys")
        value = obj[key]
        parts = value if isinstance(value, list) else [value]
        for i, part in enumerate(parts):
            if not isinstance(part, str):
                where = f"key {key!r}" + (f" item {i}" if isinstance(value, list) else "")
                raise CorpusError(f"{record.where}: {where} holds {type(part).__name__}, "
                                  "expected a string (or a list of strings)")
        out[key] = parts
    return out


def iter_documents(input_path: str, json_keys: Sequence[str] = ("text",),
                   input_format: str = "auto") -> Iterator[Dict[str, str]]:
    """Yield {key: text} per document, in order (single process; see `parse_record`)."""
    for record in iter_records(input_path, input_format):
        yield parse_record(record, json_keys)


# --------------------------------------------------------------------------- default corpus
DEFAULT_CORPUS_BYTES = 6_000_000
# Tests, vendored packages and machine-generated tables (codec maps, pydoc topic dumps) are not
# the kind of code we want a small LM to learn from.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
              "encodings", "pydoc_data", "lib2to3"}


def stdlib_dir() -> str:
    """The directory of the running Python's standard library sources."""
    path = sysconfig.get_paths().get("stdlib") or os.path.dirname(os.__file__)
    return path if os.path.isdir(path) else os.path.dirname(os.__file__)


def _stdlib_sources(root: str) -> List[str]:
    """`.py` files below `root`, minus `_SKIP_DIRS`, sorted by relative path components."""
    files = []
    for dirpath, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.startswith(".")]
        files.extend(os.path.join(dirpath, n) for n in names if n.endswith(".py"))
    files.sort(key=lambda p: os.path.relpath(p, root).split(os.sep))
    return files


def build_default_corpus(out_jsonl: str, max_bytes: int = DEFAULT_CORPUS_BYTES,
                         source_dir: Optional[str] = None) -> Dict[str, object]:
    """Write the Python standard library's `.py` sources as a JSONL corpus.

    Files are taken in sorted relative-path order and added while the total UTF-8 text stays
    within `max_bytes`; the first file that would overflow ends the corpus, so the result is a
    prefix of one fixed list (deterministic for a given Python installation). Files that are not
    valid UTF-8 or are empty are skipped. Each line is {"text": source, "source": relative path}.
    The file is written to a temporary name and renamed, so a reader never sees half a corpus.
    Returns a summary: path, documents, bytes, source_dir, python version.
    """
    if max_bytes <= 0:
        raise ValueError(f"build_default_corpus: max_bytes must be > 0 (got {max_bytes})")
    root = source_dir or stdlib_dir()
    if not os.path.isdir(root):
        raise CorpusError(f"standard library directory {root!r} not found; pass --input instead")
    out_dir = os.path.dirname(os.path.abspath(out_jsonl))
    os.makedirs(out_dir, exist_ok=True)
    tmp = out_jsonl + ".partial"
    documents = total = 0
    with open(tmp, "w", encoding="utf-8") as out:
        for path in _stdlib_sources(root):
            try:
                with open(path, "rb") as f:
                    text = f.read().decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            size = len(text.encode("utf-8"))
            if size == 0 or not text.strip():
                continue
            if total + size > max_bytes:
                break
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            out.write(json.dumps({"text": text, "source": rel}, ensure_ascii=False) + "\n")
            documents += 1
            total += size
    if documents == 0:
        os.remove(tmp)
        raise CorpusError(f"no Python sources of at most {max_bytes} bytes found under {root!r}")
    os.replace(tmp, out_jsonl)
    return {"path": out_jsonl, "documents": documents, "bytes": total, "source_dir": root,
            "python": sys.version.split()[0]}
