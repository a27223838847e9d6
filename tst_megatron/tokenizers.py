"""Tokenizers for pretraining data, in the shape megatron-core's datasets expect.

megatron-core 0.16.1 types `GPTDatasetConfig.tokenizer` as `MegatronTokenizerBase`; its datasets
read only `unique_identifiers` (part of the dataset cache key), `eod` (document separator when
building samples), `pad` (masked out of the loss; -1 means "no pad token", megatron's own
sentinel) and `vocab_size`. The `MegatronLegacyTokenizer` in `megatron.core.datasets` is deprecated
and logs a warning per instance, so these classes subclass the new base and add the legacy
properties themselves.

Five tokenizers, chosen with `build_tokenizer(--tokenizer-type, --tokenizer-model, --vocab-size)`:

- `ByteTokenizer`: UTF-8 bytes 0..255, EOD = 256, PAD = 257; needs no file, so demos and tests
  run anywhere.
- `SentencePieceTokenizer`: a `.model` file (train one with `tools/train_tokenizer.py`).
- `HuggingFaceTokenizer`: a local `tokenizer.json` (or a directory holding one), loaded with the
  `tokenizers` library; nothing is fetched from a hub.
- `GPT2BPETokenizer`: Megatron-LM's GPT-2 byte-level BPE from `--vocab-file` (vocab.json) and
  `--merge-file` (merges.txt), built with the `tokenizers` library; EOD = `<|endoftext|>`.
- `NullTokenizer`: pre-tokenized data (space-separated ids), megatron's semantics: ids
  0..V-1 are data, EOD = V, `vocab_size` = V + 1.

`tokenize` never adds BOS/EOS: pretraining data gets exactly one EOD per document, appended by
`tools/preprocess_data.py --append-eod`.
"""
from __future__ import annotations

import json
import os
import shutil
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import numpy as np
from megatron.core.tokenizers import MegatronTokenizerBase

TOKENIZER_TYPES = ("ByteTokenizer", "SentencePieceTokenizer", "Llama2Tokenizer", "HuggingFaceTokenizer",
                   "GPT2BPETokenizer", "NullTokenizer")
# Accepted spellings -> canonical type (megatron-core calls its byte tokenizer "ByteLevel";
# Megatron-LM's GPTSentencePieceTokenizer is a SentencePiece model whose EOD is its EOS, which is
# what SentencePieceTokenizer does for a model without an <eod> piece). Llama2Tokenizer is its own
# class: Megatron-LM's starts every document with BOS.
_TYPE_ALIASES = {"ByteLevelTokenizer": "ByteTokenizer", "GPTSentencePieceTokenizer": "SentencePieceTokenizer"}

NO_PAD = -1  # megatron-core's _PAD_TOKEN_ID: "this tokenizer has no pad token"

# End-of-document markers, most specific first. The first one present in a vocabulary is its EOD.
EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "<eod>", "</s>", "<eos>", "<|eos|>", "[EOS]",
                  "<|im_end|>")
PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<|padding|>")


class TSTTokenizer(MegatronTokenizerBase):
    """Common base: megatron's bookkeeping (`unique_identifiers`) and the legacy properties.

    `unique_identifiers` goes into the hash megatron uses to name cached sample indices, so it
    holds the class, the model path and every option that changes the ids.
    """

    def __init__(self, path: Optional[str] = None, **options) -> None:
        super().__init__(path or "", {})
        self.unique_identifiers = OrderedDict()
        self.unique_identifiers["class"] = type(self).__name__
        self.unique_identifiers["tokenizer_path"] = [os.path.abspath(path)] if path else []
        for key, value in options.items():
            self.unique_identifiers[key] = str(value)
        self.unique_description = json.dumps(self.unique_identifiers, indent=4)

    # --- abstract in MegatronTokenizerBase ------------------------------------------------
    def tokenize(self, text: str) -> List[int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def detokenize(self, ids: Sequence[int]) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def vocab(self) -> Dict[str, int]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} is a pretraining tokenizer; it has no "
                                  "chat template")

    # --- legacy properties megatron's datasets and text generation look up --------------------
    @property
    def inv_vocab(self) -> Dict[int, str]:
        return {i: t for t, i in self.vocab.items()}

    @property
    def eod(self) -> int:
        raise NotImplementedError

    @property
    def eos(self) -> int:
        return self.eod

    @property
    def pad(self) -> int:
        return NO_PAD

    @property
    def bos(self) -> int:
        return -1

    @property
    def eos_id(self) -> int:
        return self.eos

    @property
    def pad_id(self) -> int:
        return self.pad

    @property
    def bos_id(self) -> int:
        return self.bos

    def _check_ids(self, ids: Sequence[int]) -> np.ndarray:
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            bad = int(arr[(arr < 0) | (arr >= self.vocab_size)][0])
            raise ValueError(f"{type(self).__name__}: token id {bad} is outside the vocabulary "
                             f"[0, {self.vocab_size}); was the data made with another tokenizer?")
        return arr


class ByteTokenizer(TSTTokenizer):
    """UTF-8 bytes as tokens: ids 0..255, EOD = 256, PAD = 257 (vocab_size 258).

    Lossless on any text and needs no file; the natural tokenizer for the embedded demo corpus.
    `detokenize` drops EOD/PAD, so `detokenize(tokenize(t)) == t`; invalid UTF-8 (a sample cut in
    the middle of a character) decodes with U+FFFD instead of raising.
    """

    EOD_ID = 256
    PAD_ID = 257

    def __init__(self) -> None:
        super().__init__(None)

    def tokenize(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids: Sequence[int]) -> str:
        arr = self._check_ids(ids)
        return bytes(arr[arr < 256].astype(np.uint8).tolist()).decode("utf-8", errors="replace")

    @property
    def vocab(self) -> Dict[str, int]:
        table = {f"<0x{i:02X}>": i for i in range(256)}
        table["<eod>"] = self.EOD_ID
        table["<pad>"] = self.PAD_ID
        return table

    @property
    def vocab_size(self) -> int:
        return 258

    @property
    def eod(self) -> int:
        return self.EOD_ID

    @property
    def pad(self) -> int:
        return self.PAD_ID


def _require_file(path: Optional[str], what: str, hint: str) -> str:
    if not path:
        raise ValueError(f"{what} needs a model file: pass --tokenizer-model ({hint})")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what}: tokenizer model {path!r} does not exist (--tokenizer-model); "
                                f"{hint}")
    return path


class SentencePieceTokenizer(TSTTokenizer):
    """A SentencePiece `.model`; EOD and PAD come from the model's own special pieces.

    EOD is the piece `<eod>` when the model has one (Megatron-style models), else the model's EOS
    (`</s>`), else another end-of-text piece; a model with none of them cannot separate documents,
    so loading it fails. PAD is the model's pad piece, or -1 (no pad) when it has none.
    """

    def __init__(self, model_path: str) -> None:
        import sentencepiece as spm

        hint = "train one with tools/train_tokenizer.py"
        _require_file(model_path, "SentencePieceTokenizer", hint)
        super().__init__(model_path)
        self.model_path = model_path
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(model_path)
        except Exception as exc:  # sentencepiece raises OSError/RuntimeError with a terse text
            raise ValueError(f"SentencePieceTokenizer: {model_path!r} is not a SentencePiece model "
                             f"(--tokenizer-model): {exc}") from exc
        self._eod = self._find_eod()
        self._pad = self._sp.pad_id() if self._sp.pad_id() >= 0 else NO_PAD

    def _piece_id(self, piece: str) -> Optional[int]:
        i = self._sp.piece_to_id(piece)
        return i if i != self._sp.unk_id() or piece == self._sp.id_to_piece(i) else None

    def _find_eod(self) -> int:
        eod = self._piece_id("<eod>")
        if eod is not None:
            return eod
        if self._sp.eos_id() >= 0:
            return self._sp.eos_id()
        for piece in EOD_CANDIDATES:
            eod = self._piece_id(piece)
            if eod is not None:
                return eod
        raise ValueError(f"SentencePieceTokenizer: {self.model_path!r} has no end-of-document piece "
                         f"(none of <eod>, eos_id, {', '.join(EOD_CANDIDATES)}); retrain it with "
                         "tools/train_tokenizer.py, which reserves </s> and <pad>")

    def tokenize(self, text: str) -> List[int]:
        return self._sp.encode(text, out_type=int)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._sp.decode(self._check_ids(ids).tolist())

    @property
    def vocab(self) -> Dict[str, int]:
        return {self._sp.id_to_piece(i): i for i in range(self._sp.get_piece_size())}

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        return self._pad

    @property
    def bos(self) -> int:
        return self._sp.bos_id()

    @property
    def unk(self) -> int:
        return self._sp.unk_id()

    # "</s>" written in a document is encoded as text: SentencePiece never emits a control piece
    # for text; only the EOD that preprocessing appends is the special id
    splits_special_text = True
    json_path = None  # no tokenizer.json to copy on export: save_tokenizer_json converts the model

    def save_tokenizer_json(self, path: str) -> int:
        """This model as a `tokenizer.json` with the same ids, its `.model` beside it as
        tokenizer.model; returns the sample texts whose equal-score segmentation differs.

        Raises ValueError (nothing written) when the conversion would encode text differently.
        """
        from .hf_convert.spm_tokenizer import write_tokenizer_json

        ties = write_tokenizer_json(self.model_path, path)
        shutil.copyfile(self.model_path, os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer.model"))
        return ties


class Llama2Tokenizer(SentencePieceTokenizer):
    """Megatron-LM's Llama2Tokenizer: a SentencePiece model (Llama-2's tokenizer.model) whose
    documents start with BOS -- `tokenize(text)` is [bos] + ids, as Megatron-LM's `tokenize(s,
    bos=True, eos=False)`; EOD is the EOS that preprocessing's --append-eod adds. Data made with
    Megatron-LM's tool and with ours is then the same, and so is what a Llama model expects."""

    def __init__(self, model_path: str) -> None:
        super().__init__(model_path)
        if self.bos < 0:
            raise ValueError(f"Llama2Tokenizer: {model_path!r} has no BOS piece to start documents with "
                             "(--tokenizer-model); use --tokenizer-type SentencePieceTokenizer (no BOS)")

    def tokenize(self, text: str) -> List[int]:
        return [self.bos] + super().tokenize(text)

    def save_tokenizer_json(self, path: str) -> int:
        from .hf_convert.spm_tokenizer import write_tokenizer_json

        ties = write_tokenizer_json(self.model_path, path, add_bos=True)
        shutil.copyfile(self.model_path, os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer.model"))
        return ties


def _special_token_from_config(config: dict, key: str) -> Optional[str]:
    value = config.get(key)
    if isinstance(value, dict):  # {"content": "<|endoftext|>", "lstrip": false, ...}
        value = value.get("content")
    return value if isinstance(value, str) and value else None


class HuggingFaceTokenizer(TSTTokenizer):
    """A local HuggingFace `tokenizer.json` (or a directory holding one); no hub access.

    EOD is, in order: the `eos_token` of a `tokenizer_config.json` beside the file, else the first
    of `EOD_CANDIDATES` in the vocabulary (`<|endoftext|>` for GPT-2/NeoX-style files, `</s>` for
    Llama-2-style ones). PAD likewise from `pad_token` or `PAD_CANDIDATES`, else -1. Encoding uses
    `add_special_tokens=False`: a post-processor's BOS/EOS would otherwise be inserted into every
    document on top of the EOD that preprocessing appends. Megatron-LM's
    `--tokenizer-hf-include-special-tokens` (`include_special_tokens=True`) keeps them: the data of
    a model pretrained with them (Llama-3's <|begin_of_text|>, ...) for continued pretraining.
    """

    include_special_tokens = False  # GPT2BPETokenizer (a subclass built without __init__) too

    def __init__(self, path: str, include_special_tokens: bool = False) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise ImportError("HuggingFaceTokenizer needs the `tokenizers` package: "
                              "pip install tokenizers") from exc

        hint = "give a tokenizer.json file or a directory that holds one"
        _require_file(path, "HuggingFaceTokenizer", hint)
        json_path = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(json_path):
            raise FileNotFoundError(f"HuggingFaceTokenizer: directory {path!r} has no tokenizer.json "
                                    f"(--tokenizer-model); {hint}")
        # the option joins the cache identity only when set: existing index caches keep their names
        super().__init__(json_path, **({"include_special_tokens": True} if include_special_tokens else {}))
        self.json_path = json_path
        self.include_special_tokens = include_special_tokens
        try:
            self._tok = Tokenizer.from_file(json_path)
        except Exception as exc:
            raise ValueError(f"HuggingFaceTokenizer: {json_path!r} is not a `tokenizers` "
                             f"tokenizer.json (--tokenizer-model): {exc}") from exc
        # a tokenizer.json may carry the truncation / padding of the call it was saved after
        # (max_length 512, ...): every document would be cut or padded. transformers turns them off
        # per call, as Megatron-LM's tokenizer does through it; here once
        self._tok.no_truncation()
        self._tok.no_padding()
        config = self._read_config(os.path.dirname(os.path.abspath(json_path)))
        self._eod = self._find_special(_special_token_from_config(config, "eos_token"), EOD_CANDIDATES)
        if self._eod is None:
            raise ValueError(f"HuggingFaceTokenizer: {json_path!r} has no end-of-document token "
                             f"(no eos_token in tokenizer_config.json and none of "
                             f"{', '.join(EOD_CANDIDATES)} in the vocabulary); add one, e.g. "
                             "<|endoftext|>, as a special token")
        pad = self._find_special(_special_token_from_config(config, "pad_token"), PAD_CANDIDATES)
        self._pad = NO_PAD if pad is None or pad == self._eod else pad

    @staticmethod
    def _read_config(directory: str) -> dict:
        path = os.path.join(directory, "tokenizer_config.json")
        if not os.path.isfile(path):
            return {}
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError) as exc:
            raise ValueError(f"HuggingFaceTokenizer: cannot read {path!r}: {exc}") from exc
        return config if isinstance(config, dict) else {}

    def _find_special(self, configured: Optional[str], candidates: Sequence[str]) -> Optional[int]:
        for token in ([configured] if configured else []) + list(candidates):
            i = self._tok.token_to_id(token)
            if i is not None:
                return i
        return None

    def tokenize(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=self.include_special_tokens).ids

    def post_processor_ids(self, text: str = "The quick brown fox.") -> List[int]:
        """The ids the file's post-processor adds to `text` when encoded with special tokens (e.g.
        Llama-3's <|begin_of_text|>): what transformers' `tokenizer(text)` gives beyond the plain
        encoding."""
        plain = self._tok.encode(text, add_special_tokens=False).ids
        return [i for i in self._tok.encode(text, add_special_tokens=True).ids if i not in plain]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode(self._check_ids(ids).tolist(), skip_special_tokens=False)

    @property
    def vocab(self) -> Dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos(self) -> int:
        """The token every document starts with: the post-processor's leading one under
        --tokenizer-hf-include-special-tokens, else none (-1)."""
        return self.prepended_token() if self.include_special_tokens else -1

    def prepended_token(self) -> int:
        """The id the post-processor puts before every text (a BOS, e.g. Llama-3's
        <|begin_of_text|>), else -1 (none, or only tokens after the text, e.g. an EOS)."""
        added = self._tok.encode("x", add_special_tokens=True).ids
        return added[0] if added and added[0] in self.post_processor_ids() else -1

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        return self._pad


class GPT2BPETokenizer(HuggingFaceTokenizer):
    """Megatron-LM's `GPT2BPETokenizer`: GPT-2's byte-level BPE from its vocab.json and merges.txt.

    Built as GPT-2's fast tokenizer is (a BPE model behind the byte-level pre-tokenizer with
    GPT-2's split pattern, no prefix space); EOD is `<|endoftext|>`, the vocabulary the encoder's
    size (50257 for GPT-2's own files), as in Megatron-LM. No pad (-1).
    """

    def __init__(self, vocab_file: Optional[str], merge_file: Optional[str]) -> None:
        try:
            from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        except ImportError as exc:
            raise ImportError("GPT2BPETokenizer needs the `tokenizers` package: pip install tokenizers") from exc
        for flag, path in (("--vocab-file", vocab_file), ("--merge-file", merge_file)):
            if not path:
                raise ValueError(f"GPT2BPETokenizer needs {flag} (GPT-2's vocab.json and merges.txt)")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"GPT2BPETokenizer: {flag} {path!r} does not exist")
        TSTTokenizer.__init__(self, vocab_file, merge_file=os.path.abspath(merge_file))
        self.json_path = None  # no tokenizer.json to copy on export
        try:
            self._tok = Tokenizer(models.BPE.from_file(vocab_file, merge_file))
        except Exception as exc:
            raise ValueError(f"GPT2BPETokenizer: --vocab-file {vocab_file!r} / --merge-file {merge_file!r} do not "
                             f"load as GPT-2 BPE files: {exc}") from exc
        self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self._tok.decoder = decoders.ByteLevel()
        self._eod = self._tok.token_to_id("<|endoftext|>")
        if self._eod is None:
            raise ValueError(f"GPT2BPETokenizer: --vocab-file {vocab_file!r} has no <|endoftext|> entry (GPT-2's EOD)")
        self._pad = NO_PAD

    # "<|endoftext|>" written in a document is encoded as text (Megatron-LM's GPT-2 tokenizer does
    # the same); only the EOD that preprocessing appends is the special id
    splits_special_text = True

    def save_tokenizer_json(self, path: str) -> None:
        """This tokenizer as a `tokenizer.json` (what a converted Hugging Face model ships)."""
        self._tok.save(path)


class NullTokenizer(TSTTokenizer):
    """Pre-tokenized data: text is space-separated ids. Megatron's semantics, exactly.

    `NullTokenizer(V)` (from `--vocab-size V`) is for data ids 0..V-1 and adds one id for EOD:
    `eod == V`, `vocab_size == V + 1`, i.e. EOD is the last id of the vocabulary. No pad (-1).
    The id V written in the text is accepted, as in Megatron: it is that EOD, a document break.
    """

    def __init__(self, vocab_size: int) -> None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"NullTokenizer needs --vocab-size >= 1 (got {vocab_size!r})")
        super().__init__(None, vocab_size=vocab_size)
        self._data_vocab_size = vocab_size

    def tokenize(self, text: str) -> List[int]:
        try:
            return [int(x) for x in text.split()]
        except ValueError as exc:
            raise ValueError("NullTokenizer expects pre-tokenized text: integers separated by "
                             f"whitespace ({exc})") from exc

    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join(str(i) for i in self._check_ids(ids).tolist())

    @property
    def vocab(self) -> Dict[str, int]:
        table = {str(i): i for i in range(self._data_vocab_size)}
        table["<eod>"] = self.eod
        return table

    @property
    def vocab_size(self) -> int:
        return self._data_vocab_size + 1

    @property
    def eod(self) -> int:
        return self._data_vocab_size


def canonical_tokenizer_type(tokenizer_type: str) -> str:
    """The class name a --tokenizer-type value stands for (aliases resolved)."""
    return _TYPE_ALIASES.get(tokenizer_type, tokenizer_type)


def build_tokenizer(tokenizer_type: str, tokenizer_model: Optional[str] = None,
                    vocab_size: Optional[int] = None, merge_file: Optional[str] = None,
                    include_special_tokens: bool = False) -> TSTTokenizer:
    """Build a tokenizer from Megatron-style flags.

    --tokenizer-type picks the class; --tokenizer-model is the file for SentencePiece/HuggingFace;
    --vocab-size is used only by NullTokenizer (as in Megatron-LM; padding the embedding table to a
    multiple is the model's business, not the tokenizer's); --tokenizer-hf-include-special-tokens
    (`include_special_tokens`) only by HuggingFaceTokenizer.
    """
    canonical = canonical_tokenizer_type(tokenizer_type)
    if include_special_tokens and canonical != "HuggingFaceTokenizer":
        raise ValueError(f"--tokenizer-hf-include-special-tokens applies to --tokenizer-type HuggingFaceTokenizer "
                         f"only, not {tokenizer_type}; drop the flag")
    if canonical == "ByteTokenizer":
        return ByteTokenizer()
    if canonical == "SentencePieceTokenizer":
        return SentencePieceTokenizer(tokenizer_model)
    if canonical == "Llama2Tokenizer":
        return Llama2Tokenizer(tokenizer_model)
    if canonical == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(tokenizer_model, include_special_tokens)
    if canonical == "GPT2BPETokenizer":  # its --vocab-file arrives as the model file
        return GPT2BPETokenizer(tokenizer_model, merge_file)
    if canonical == "NullTokenizer":
        if vocab_size is None:
            given = (f"; --tokenizer-model {tokenizer_model} is given: name its kind with --tokenizer-type "
                     "(NullTokenizer is the default)" if tokenizer_model else "")
            raise ValueError("--tokenizer-type NullTokenizer needs --vocab-size (the number of data "
                             f"token ids; EOD gets id vocab_size){given}")
        return NullTokenizer(vocab_size)
    allowed = ", ".join(TOKENIZER_TYPES + tuple(_TYPE_ALIASES))
    raise ValueError(f"unknown --tokenizer-type {tokenizer_type!r}; allowed: {allowed}")
