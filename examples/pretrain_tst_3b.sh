#!/usr/bin/env bash
# Dense "3B" of the TST paper (Peng et al. 2026, Table: 3B, 20k steps, s = 6, r = 0.3; the baseline
# needs 36k steps to match TST's 20k).
#
# Shape: SmolLM3-3B's (36 layers, hidden 2048, FFN 11008, 16 heads, 4 KV groups, head dim 128) in
# Llama-3 form, as the paper trained it: Llama-3 tokenizer (vocab 128256), untied input/output
# embeddings, RoPE in every layer (base 500000, Llama-3's; SmolLM3's NoPE layers are not used),
# SwiGLU, RMSNorm, GQA, no biases.
#   --print-model-size: total 3,337,766,912 (3.338B), active 3.338B (0.525B of it in the two
#   untied 128256 x 2048 embedding matrices).
#
# Layout (default): 8 nodes x 8 GPUs (NNODES=8), TP=1 PP=1, DP=64, distributed optimizer
#   (weights, grads and the sharded Adam state fit an 80 GB GPU; set TP=2 or 4 for smaller GPUs).
#   Works on one node too (DP=8; 64 micro-batches per step, 8x slower).
# Batch: seq 4096 x global batch 512 = 2,097,152 positions per step (the paper's 2M tokens/step);
#   micro-batch 1 -> 8 micro-batches per GPU per step on 64 GPUs. During the superposition phase
#   each step consumes s x 2M = 12.6M data tokens at the same FLOPs.
# Optimisation: AdamW (0.9, 0.95), weight decay 0.1, clip 1.0, LR 2e-4, WSD: 2000 warmup steps,
#   constant, linear decay to 0 over the last 10% of the steps; bf16.
# TST: s = 6, r = 0.3 (6k of 20k steps), uniform bag weighting. TST_BAG_SIZE=1 = baseline.
#
# Launch (each node):   NNODES=8 NODE_RANK=0 MASTER_ADDR=node0 bash examples/pretrain_tst_3b.sh
# Size only:            PRINT_MODEL_SIZE=1 bash examples/pretrain_tst_3b.sh
# Longer run (WSD decay follows):  TRAIN_ITERS=100000 bash examples/pretrain_tst_3b.sh
# Baseline (no TST):    TST_BAG_SIZE=1 bash examples/pretrain_tst_3b.sh
# Extra Megatron flags go last and win:  bash examples/pretrain_tst_3b.sh --eval-interval 500
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

RUN_NAME=${RUN_NAME:-tst-3b}
DATA_PATH=${DATA_PATH:-$DATA_ROOT/dclm/dclm_llama3_text_document}
TOKENIZER_TYPE=${TOKENIZER_TYPE:-HuggingFaceTokenizer}
TOKENIZER_MODEL=${TOKENIZER_MODEL:-$DATA_ROOT/tokenizers/llama3}  # dir with Llama-3's tokenizer.json
VOCAB_SIZE=${VOCAB_SIZE:-128256}
SAVE=${SAVE:-$REPO_ROOT/runs/$RUN_NAME}

SEQ_LENGTH=${SEQ_LENGTH:-4096}
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-512}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-1}
TP=${TP:-1}
PP=${PP:-1}
TRAIN_ITERS=${TRAIN_ITERS:-20000}
WARMUP_ITERS=${WARMUP_ITERS:-2000}
LR=${LR:-2e-4}
MIN_LR=${MIN_LR:-0}
TST_BAG_SIZE=${TST_BAG_SIZE:-6}
TST_RATIO=${TST_RATIO:-0.3}
TST_WEIGHTING=${TST_WEIGHTING:-uniform}

MODEL_ARGS=(
    --num-layers 36 --hidden-size 2048 --ffn-hidden-size 11008
    --num-attention-heads 16 --group-query-attention --num-query-groups 4
    --seq-length "$SEQ_LENGTH" --max-position-embeddings "$SEQ_LENGTH"
    --position-embedding-type rope --rotary-base 500000
    --normalization RMSNorm --norm-epsilon 1e-5 --swiglu --disable-bias-linear
    --untie-embeddings-and-output-weights --init-method-std 0.02
)
tst_paper_launch "${MODEL_ARGS[@]}" -- "$@"
