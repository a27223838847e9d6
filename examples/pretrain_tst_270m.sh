#!/usr/bin/env bash
# Dense "270M" of the TST paper (Peng et al. 2026, Table: 270M, 20k steps, s = 6, r = 0.3).
#
# Shape: SmolLM2-135M's (30 layers, hidden 576, FFN 1536, 9 heads, 3 KV groups, head dim 64) in
# Llama-3 form, as the paper trained it: Llama-3 tokenizer (vocab 128256), untied input/output
# embeddings, RoPE (base 500000, Llama-3's), SwiGLU, RMSNorm, GQA, no biases.
#   --print-model-size: total 253,954,368 (0.254B), active 0.254B.  (The paper calls it 270M.)
#
# Layout (default): 1 node x 8 GPUs, TP=1 PP=1, DP=8 (DP grows with NNODES), distributed optimizer.
#   9 attention heads: TP must divide 9 and 3 (TP=3 or 1); at this size plain DP is the right call.
# Batch: seq 4096 x global batch 512 = 2,097,152 positions per step (the paper's 2M tokens/step);
#   micro-batch 8 -> 8 micro-batches per GPU per step on 8 GPUs. During the superposition phase
#   each step consumes s x 2M = 12.6M data tokens at the same FLOPs.
# Optimisation: AdamW (0.9, 0.95), weight decay 0.1, clip 1.0, LR 2e-3, WSD: 2000 warmup steps,
#   constant, linear decay to 0 over the last 10% of the steps; bf16.
# TST: s = 6, r = 0.3 (6k of 20k steps), uniform bag weighting. TST_BAG_SIZE=1 = baseline.
#
# Launch (each node):   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash examples/pretrain_tst_270m.sh
# Size only:            PRINT_MODEL_SIZE=1 bash examples/pretrain_tst_270m.sh
# Longer run (WSD decay follows):  TRAIN_ITERS=100000 bash examples/pretrain_tst_270m.sh
# Baseline (no TST):    TST_BAG_SIZE=1 bash examples/pretrain_tst_270m.sh
# Extra Megatron flags go last and win:  bash examples/pretrain_tst_270m.sh --eval-interval 500
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

RUN_NAME=${RUN_NAME:-tst-270m}
DATA_PATH=${DATA_PATH:-$DATA_ROOT/dclm/dclm_llama3_text_document}
TOKENIZER_TYPE=${TOKENIZER_TYPE:-HuggingFaceTokenizer}
TOKENIZER_MODEL=${TOKENIZER_MODEL:-$DATA_ROOT/tokenizers/llama3}  # dir with Llama-3's tokenizer.json
VOCAB_SIZE=${VOCAB_SIZE:-128256}
SAVE=${SAVE:-$REPO_ROOT/runs/$RUN_NAME}

SEQ_LENGTH=${SEQ_LENGTH:-4096}
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-512}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-8}
TP=${TP:-1}
PP=${PP:-1}
TRAIN_ITERS=${TRAIN_ITERS:-20000}
WARMUP_ITERS=${WARMUP_ITERS:-2000}
LR=${LR:-2e-3}
MIN_LR=${MIN_LR:-0}
TST_BAG_SIZE=${TST_BAG_SIZE:-6}
TST_RATIO=${TST_RATIO:-0.3}
TST_WEIGHTING=${TST_WEIGHTING:-uniform}

MODEL_ARGS=(
    --num-layers 30 --hidden-size 576 --ffn-hidden-size 1536
    --num-attention-heads 9 --group-query-attention --num-query-groups 3
    --seq-length "$SEQ_LENGTH" --max-position-embeddings "$SEQ_LENGTH"
    --position-embedding-type rope --rotary-base 500000
    --normalization RMSNorm --norm-epsilon 1e-5 --swiglu --disable-bias-linear
    --untie-embeddings-and-output-weights --init-method-std 0.02
)
tst_paper_launch "${MODEL_ARGS[@]}" -- "$@"
