#!/usr/bin/env bash
# A corpus that a run will not repeat: the embedded default's recipe (tst_megatron.corpus) applied
# to the `.py` sources of this Python's site-packages -- a deterministic prefix of MAX_BYTES of text
# in sorted path order -- tokenized by tools/preprocess_data.py with a given SentencePiece model.
# Writes <OUT_PREFIX>_text_document.bin/.idx (kept when they exist) and prints their counts and sha256.
#
#   bash experiments/build_site_corpus.sh OUT_PREFIX TOKENIZER_MODEL [MAX_BYTES] [WORKERS]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=$1; TOK=$2; MAX_BYTES=${3:-40000000}; WORKERS=${4:-2}
if [ ! -f "${OUT}_text_document.bin" ]; then
  mkdir -p "$(dirname "$OUT")"
  SITE_DIR=${SITE_DIR:-$($PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")}
  $PY -c "from tst_megatron.corpus import build_default_corpus as b; print(b('$OUT.jsonl', max_bytes=$MAX_BYTES, source_dir='$SITE_DIR'))"
  $PY tools/preprocess_data.py --input "$OUT.jsonl" --output-prefix "$OUT" --tokenizer-type SentencePieceTokenizer \
    --tokenizer-model "$TOK" --append-eod --workers "$WORKERS" --no-progress
  rm -f "$OUT.jsonl"
fi
# The corpus depends on what is installed in site-packages: print what a result was measured on
# (docs/results.md records the values of the corpus behind its tables).
PYTHONWARNINGS=ignore $PY - "${OUT}_text_document" <<'PYEOF'
import hashlib, sys
from megatron.core.datasets.indexed_dataset import IndexedDataset
prefix = sys.argv[1]
h = hashlib.sha256()
with open(prefix + ".bin", "rb") as f:
    for block in iter(lambda: f.read(1 << 24), b""):
        h.update(block)
d = IndexedDataset(prefix)
print(f"[site corpus] {prefix}: {len(d)} documents, {int(d.sequence_lengths.sum())} tokens, "
      f".bin sha256 {h.hexdigest()}")
PYEOF
