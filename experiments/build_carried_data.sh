#!/usr/bin/env bash
# Build the small tokenized corpus that travels with the repo (experiments/data/): the embedded
# default corpus (Python stdlib sources, 6 MB), a 2k SentencePiece BPE, .bin/.idx. Deterministic.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
D=experiments/data
mkdir -p "$D"
$PY -c "from tst_megatron.corpus import build_default_corpus; print(build_default_corpus('$D/stdlib.jsonl'))"
$PY tools/train_tokenizer.py --input "$D/stdlib.jsonl" --output-prefix "$D/stdlib_spm2k" --model-type bpe --vocab-size 2048
$PY tools/preprocess_data.py --input "$D/stdlib.jsonl" --output-prefix "$D/stdlib_spm2k" \
  --tokenizer-type SentencePieceTokenizer --tokenizer-model "$D/stdlib_spm2k.model" --append-eod --workers 2 --no-progress
rm -f "$D/stdlib.jsonl"
ls -la "$D"
