#!/usr/bin/env bash
# Tiny TST run on CPUs (Gloo): a laptop, a CI box, or a CPU-only SLURM node.
#
#     bash examples/cpu/pretrain_tiny_tst.sh                       # 2 processes on this machine
#     NPROC_PER_NODE=1 bash examples/cpu/pretrain_tiny_tst.sh      # 1 process
#     NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 NPROC_PER_NODE=1 \
#         bash examples/cpu/pretrain_tiny_tst.sh                   # node 0 of two (NODE_RANK=1 on the other)
#     PRINT_MODEL_SIZE=1 bash examples/cpu/pretrain_tiny_tst.sh    # sizes only
#
# Model: Llama-style (RoPE, SwiGLU, RMSNorm, GQA, untied embeddings) with 2 layers, hidden 64,
# 4 heads / 2 KV groups, seq 64, byte tokenizer (vocab 258 -> 320 padded): ~0.1M parameters.
# Batch: global 8 x 64 positions, micro-batch 2 (2 micro-batches per process with 2 processes).
# TST: s = 4, r = 0.3 of TRAIN_ITERS (20); WSD with 2 warmup steps, LR 3e-3, fp32.
#
# Data: DATA_PATH if given (an indexed-dataset prefix); otherwise the script tokenizes a small
# corpus once (Python's own `email` package sources, ~0.4 MB, bytes as tokens) into
# $DATA_ROOT/tiny/email_text_document with tools/preprocess_data.py -- a few seconds, under a lock
# so concurrent nodes sharing the directory build it once. The GPU is never used (CUDA hidden), so
# the run is the same on any machine. Checkpoints: $SAVE (default <repo>/runs/tiny-tst), resumed
# from automatically; SIGTERM saves and exits.
source "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"
tst_refuse_train_iters "$@" || exit 2

export CUDA_VISIBLE_DEVICES=""
if [[ -z ${NPROC_PER_NODE:-} && -z ${GPUS_PER_NODE:-} ]]; then NPROC_PER_NODE=2; fi

RUN_NAME=${RUN_NAME:-tiny-tst}
TOKENIZER_TYPE=${TOKENIZER_TYPE:-ByteTokenizer}
TOKENIZER_MODEL=${TOKENIZER_MODEL:-}
SAVE=${SAVE:-$REPO_ROOT/runs/$RUN_NAME}
TRAIN_ITERS=${TRAIN_ITERS:-20}
WARMUP_ITERS=${WARMUP_ITERS:-2}

build_tiny_corpus() {
    local prefix=$1 dir
    dir=$(dirname "$prefix")
    mkdir -p "$dir"
    (
        # one builder at a time (two "nodes" of one machine); flock is Linux's (util-linux): without it
        # (macOS) the build is unlocked, fine for one process per machine
        if command -v flock >/dev/null 2>&1; then
            flock -w 600 9 || { echo "error: could not lock $dir/.build.lock" >&2; exit 1; }
        fi
        if [[ -f $prefix.bin && -f $prefix.idx ]]; then exit 0; fi
        echo "[pretrain_tiny_tst] building the tiny corpus $prefix (once)" >&2
        local jsonl=$dir/email.$$.jsonl
        "$PYTHON" - "$jsonl" <<'EOF'
import email, json, pathlib, sys
root = pathlib.Path(email.__file__).parent
with open(sys.argv[1], "w", encoding="utf-8") as f:
    for path in sorted(root.glob("*.py")):
        f.write(json.dumps({"text": path.read_text(encoding="utf-8")}) + "\n")
EOF
        "$PYTHON" "$REPO_ROOT/tools/preprocess_data.py" --input "$jsonl" --output-prefix "$dir/email" \
            --input-format jsonl --tokenizer-type ByteTokenizer --append-eod --workers 1 --no-progress >&2
        rm -f "$jsonl"
    ) 9>"$dir/.build.lock"
}

if [[ -z ${DATA_PATH:-} ]]; then
    DATA_PATH=$DATA_ROOT/tiny/email_text_document
    # a dry run prints the command it would run (with this path) and builds nothing
    if [[ ${PRINT_MODEL_SIZE:-0} != 1 && ${DRY_RUN:-0} != 1 ]]; then
        build_tiny_corpus "$DATA_PATH"
    fi
fi

MODEL_ARGS=(
    --num-layers 2 --hidden-size 64 --ffn-hidden-size 176
    --num-attention-heads 4 --group-query-attention --num-query-groups 2
    --seq-length 64 --max-position-embeddings 64 --position-embedding-type rope
    --normalization RMSNorm --swiglu --disable-bias-linear --untie-embeddings-and-output-weights
    --make-vocab-size-divisible-by 64
)
TRAIN_ARGS=(
    --micro-batch-size "${MICRO_BATCH_SIZE:-2}" --global-batch-size "${GLOBAL_BATCH_SIZE:-8}"
    --lr "${LR:-3e-3}" --min-lr "${MIN_LR:-3e-4}" $(tst_wsd_args "$TRAIN_ITERS" "$WARMUP_ITERS")
    --adam-beta1 0.9 --adam-beta2 0.95 --weight-decay 0.1 --clip-grad 1.0 --seed "${SEED:-1234}"
)
TST_ARGS=($(tst_tst_args "${TST_BAG_SIZE:-4}" "${TST_RATIO:-0.3}" "${TST_WEIGHTING:-uniform}"))
LOG_ARGS=(
    --log-interval "${LOG_INTERVAL:-2}" --eval-iters "${EVAL_ITERS:-2}" --split "${SPLIT:-95,5,0}"
    --run-name "$RUN_NAME"
)
if [[ -n ${SAVE_INTERVAL:-} ]]; then LOG_ARGS+=(--save-interval "$SAVE_INTERVAL"); fi

tst_launch "${MODEL_ARGS[@]}" "${TRAIN_ARGS[@]}" "${TST_ARGS[@]}" "${LOG_ARGS[@]}" "$@"
