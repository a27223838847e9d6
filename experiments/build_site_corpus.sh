#!/usr/bin/env bash
# A corpus that a run will not repeat: the embedded default's recipe (tst_megatron.corpus) applied
# to the `.py` sources of this Python's site-packages -- a deterministic prefix of MAX_BYTES of text
# in sorted path order -- tokenized by tools/preprocess_data.py with a given SentencePiece model.
# Writes <OUT_PREFIX>_text_document.bin/.idx; does nothing when they exist.
#
#   bash experiments/build_site_corpus.sh OUT_PREFIX TOKENIZER_MODEL [MAX_BYTES] [WORKERS]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=$1; TOK=$2; MAX_BYTES=${3:-40000000}; WORKERS=${4:-2}
[ -f "${OUT}_text_document.bin" ] && exit 0
mkdir -p "$(dirname "$OUT")"
SITE_DIR=${SITE_DIR:-$($PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")}
$PY -c "from tst_megatron.corpus import build_default_corpus as b; print(b('$OUT.jsonl', max_bytes=$MAX_BYTES, source_dir='$SITE_DIR'))"
$PY tools/preprocess_data.py --input "$OUT.jsonl" --output-prefix "$OUT" --tokenizer-type SentencePieceTokenizer \
  --tokenizer-model "$TOK" --append-eod --workers "$WORKERS" --no-progress
rm -f "$OUT.jsonl"
