#!/usr/bin/env bash
# Equal-FLOPs evidence on one GPU: a ~116M-parameter Llama-style baseline and a TST run
# (s = 4, r = 0.3) with identical model, batch, LR schedule and iteration count, in bf16, on the
# tokenized embedded corpus that travels with the repo (experiments/data/, built by
# experiments/build_carried_data.sh with our own tools). Writes both metrics files, the plot and
# a summary under $OUT_DIR.
#
#   bash experiments/gpu_equal_flops.sh                # on an H200-class GPU (~4 min per run)
#   TINY=1 bash experiments/gpu_equal_flops.sh         # the same pipeline at a toy size on CPU
#   CORPUS=site bash experiments/gpu_equal_flops.sh    # a larger corpus built on the machine
#   TST_RUNS="4:0.3 2:0.3" PARALLEL=1 ITERS=3000 ...   # several TST runs (s:r), all side by side
#   SEED=4321 ...                                      # another seed (default 1234)
#
# CORPUS=carried (default) uses the 2M-token corpus in experiments/data: a 116M model repeats it
# many times. CORPUS=site builds, with the same tools and the same carried tokenizer, a corpus from
# the `.py` sources of the machine's installed packages (the embedded default's recipe applied to
# site-packages; SITE_BYTES of text, a deterministic prefix of the sorted file list), so that
# neither run sees a token twice.
#
# Needs only PyTorch on the machine: if megatron-core (or the other small dependencies) are not
# importable, they are installed from $WHEELS_DIR (offline) or PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
# the repo's .venv when there is one (make test / make demo made it): never pip-install into another Python
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=${PYTHON:-python3}; fi
export PYTHON=$PY  # the data scripts below run with the same interpreter
OUT_DIR=${OUT_DIR:-outputs/gpu_equal_flops}
DATA=${DATA:-experiments/data/stdlib_spm2k_text_document}
TOKENIZER=${TOKENIZER:-experiments/data/stdlib_spm2k.model}
mkdir -p "$OUT_DIR"

if ! $PY -c "import megatron.core, sentencepiece, tst_megatron" 2>/dev/null; then
  if [ -n "${WHEELS_DIR:-}" ]; then
    $PY -m pip install -q --no-index --find-links "$WHEELS_DIR" megatron-core sentencepiece psutil tqdm pyyaml matplotlib
  else
    $PY -m pip install -q "megatron-core>=0.16.1,<0.17" sentencepiece psutil tqdm pyyaml matplotlib
  fi
  $PY -m pip install -q --no-deps --no-build-isolation -e .
fi
if [ "${CORPUS:-carried}" = "site" ]; then
  DATA="$OUT_DIR/site_spm2k_text_document"
  bash experiments/build_site_corpus.sh "$OUT_DIR/site_spm2k" "$TOKENIZER" "${SITE_BYTES:-120000000}" "${WORKERS:-$(nproc)}"
elif [ ! -f "$DATA.bin" ]; then bash experiments/build_carried_data.sh; fi

if [ "${TINY:-0}" = "1" ]; then
  MODEL=(--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64)
  BATCH=(--micro-batch-size 8 --global-batch-size 8)
  ITERS=${ITERS:-40}; PREC=(); EVAL=(--eval-interval 10 --eval-iters 2)
else
  # ~116M parameters (12 x 768, SwiGLU 3072, 2k vocab): Llama-style, untied embeddings.
  # 16 x 512 tokens per step: 1000 steps read 8.2M tokens (baseline) and 15.6M (TST s=4, r=0.3).
  MODEL=(--num-layers 12 --hidden-size 768 --num-attention-heads 12 --seq-length 512 --ffn-hidden-size 3072)
  BATCH=(--micro-batch-size ${MBS:-16} --global-batch-size ${MBS:-16})
  ITERS=${ITERS:-1000}; PREC=(--bf16); EVAL=(--eval-interval 100 --eval-iters 10)
fi
COMMON=(pretrain_tst.py --data-path "$DATA" --split 98,2,0 --tokenizer-type SentencePieceTokenizer
  --tokenizer-model "$TOKENIZER" --make-vocab-size-divisible-by 64 "${MODEL[@]}" "${BATCH[@]}" "${PREC[@]}"
  --position-embedding-type rope --swiglu --normalization RMSNorm --disable-bias-linear --untie-embeddings-and-output-weights
  --train-iters "$ITERS" --lr 1e-3 --min-lr 1e-4 --lr-decay-style WSD --lr-warmup-iters $((ITERS / 20))
  --lr-wsd-decay-iters $((ITERS / 10)) --weight-decay 0.1 --clip-grad 1.0 --seed "${SEED:-1234}"
  --log-interval $((ITERS / 20 > 0 ? ITERS / 20 : 1)) "${EVAL[@]}")

# One baseline and one TST run per "s:r" in TST_RUNS; PARALLEL=1 launches them side by side (a 116M
# model at 8k positions per step leaves the H200 ~90% idle, so three runs share it with little
# slow-down; losses do not depend on it, but then tokens/s and wall-clock are not a measurement).
NAMES=(baseline); PIDS=()
launch() {  # name, extra flags...
  local name=$1; shift
  if [ "${PARALLEL:-0}" = "1" ]; then
    # own index cache each: runs side by side must not write the same validation index files
    $PY "${COMMON[@]}" "$@" --metrics-path "$OUT_DIR/$name.jsonl" --run-name "$name" \
      --data-cache-path "$OUT_DIR/cache_$name" > "$OUT_DIR/$name.log" 2>&1 &
    PIDS+=($!)
  else
    $PY "${COMMON[@]}" "$@" --metrics-path "$OUT_DIR/$name.jsonl" --run-name "$name" 2>&1 | tee "$OUT_DIR/$name.log"
  fi
}
launch baseline
for sr in ${TST_RUNS:-4:0.3}; do
  name="tst_s${sr%%:*}_r${sr##*:}"; NAMES+=("$name")
  launch "$name" --tst-bag-size "${sr%%:*}" --tst-superposition-ratio "${sr##*:}"
done
for pid in "${PIDS[@]}"; do wait "$pid" || echo "[gpu_equal_flops] a run exited with $?"; done
FILES=(); LABELS=()
for name in "${NAMES[@]:1}" baseline; do FILES+=("$OUT_DIR/$name.jsonl"); LABELS+=("$name"); done
$PY tools/plot_runs.py "${FILES[@]}" --labels "${LABELS[@]}" --baseline $((${#NAMES[@]} - 1)) \
  --output "$OUT_DIR/gpu_equal_flops.png" | tee "$OUT_DIR/summary.txt"
$PY - "$OUT_DIR" "${NAMES[@]}" <<'PYEOF' | tee -a "$OUT_DIR/summary.txt"
import json, sys, torch
out = sys.argv[1]
for name in sys.argv[2:]:
    recs = [json.loads(l) for l in open(f"{out}/{name}.jsonl")]
    ev = [r for r in recs if r.get("type") == "eval"][-1]
    tr = [r for r in recs if r.get("type") == "train"]
    print(f"{name}: final val LM loss {ev['val_lm_loss']:.4f} at iteration {ev['iteration']}; "
          f"median tokens/s {sorted(r['tokens_per_s'] for r in tr)[len(tr) // 2]:.0f}; "
          f"median TFLOP/s/device {sorted(r['tflops_per_device'] for r in tr)[len(tr) // 2]:.2f}")
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
PYEOF
