# shellcheck shell=bash
# Shared by the launch scripts in examples/ (sourced, never run). One function does the work:
#
#     tst_launch ARG...      # torchrun pretrain_tst.py ARG... (plus the env-driven args below)
#
# Environment (all optional):
#   topology     NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1; required when NNODES > 1), MASTER_PORT (29500),
#                NPROC_PER_NODE or GPUS_PER_NODE (default: the GPUs of CUDA_VISIBLE_DEVICES when
#                set, else those nvidia-smi (or torch.cuda) lists, else 1),
#                RDZV_BACKEND: static (default; NODE_RANK picks the rank) or c10d (rendezvous at
#                MASTER_ADDR:MASTER_PORT, node ranks assigned by torchrun; RDZV_ID names the job),
#                TORCHRUN_ARGS: extra torchrun flags (word-split).
#   paths        DATA_ROOT (<repo>/data), DATA_PATH, TOKENIZER_TYPE, TOKENIZER_MODEL (per script),
#                SAVE (<repo>/runs/<run name>; also used as --load, so a restart resumes),
#                DATA_CACHE_PATH (megatron's index cache; default beside the data).
#   python       PYTHON (<repo>/.venv/bin/python if it exists, else python3).
#   modes        PRINT_MODEL_SIZE=1: print total/active parameters (`--print-model-size`: no
#                torchrun, no data, no GPU, no model built) and exit.
#                DRY_RUN=1: print the torchrun command line this node would run, run nothing.
#   signals      SIGTERM to torchrun is passed on to the trainer, which finishes its iteration,
#                saves and exits 0. torchrun waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (set
#                here to 300 unless given; read by recent torchrun, e.g. 2.13, older ones wait 30)
#                before it SIGKILLs workers that are still saving;
#                torchrun itself then exits 1 ("SignalException: ... got signal: 15") -- expected.
# Arguments after the script name ("$@") are appended last, so they override the script's flags
# and the env-driven ones (argparse keeps the last value of a repeated flag). Change the run length
# with TRAIN_ITERS=N rather than --train-iters N: the WSD decay length is derived from it.

set -euo pipefail

EXAMPLES_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REPO_ROOT=$(cd "$EXAMPLES_DIR/.." && pwd)

if [[ -z ${PYTHON:-} ]]; then
    if [[ -x $REPO_ROOT/.venv/bin/python ]]; then PYTHON=$REPO_ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
DATA_ROOT=${DATA_ROOT:-$REPO_ROOT/data}

# Processes per node: explicit NPROC_PER_NODE, else GPUS_PER_NODE, else the GPUs this job may use
# (CUDA_VISIBLE_DEVICES when set: a shared node or `srun --gpus=2` without device cgroups lists
# every GPU in nvidia-smi), else 1.
tst_nproc_per_node() {
    local given=${NPROC_PER_NODE:-${GPUS_PER_NODE:-}}
    if [[ -n $given ]]; then
        if ! [[ $given =~ ^([1-9][0-9]*|gpu|cpu|auto)$ ]]; then  # torchrun's --nproc-per-node values
            echo "error: NPROC_PER_NODE / GPUS_PER_NODE must be a whole number >= 1, or gpu / cpu / auto" \
                 "(got '$given')" >&2
            return 2
        fi
        echo "$given"; return
    fi
    local n=0 ids id
    if [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
        IFS=, read -r -a ids <<< "$CUDA_VISIBLE_DEVICES"
        for id in "${ids[@]}"; do  # CUDA stops at the first invalid entry ("-1" hides every GPU)
            [[ -z $id || $id == -1 ]] && break
            n=$((n + 1))
        done
    elif command -v nvidia-smi >/dev/null 2>&1; then
        n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    else  # no nvidia-smi on PATH (some containers): ask PyTorch
        n=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
    fi
    if [[ ${n:-0} -gt 0 ]]; then echo "$n"; else echo 1; fi
}

# Warmup-Stable-Decay as in the paper: linear warmup of $2 iterations, constant LR, linear decay
# to --min-lr over the last 10% of all iterations. Usage: tst_wsd_args TRAIN_ITERS WARMUP
tst_wsd_args() {
    local iters=$1 warmup=$2
    local decay=$(( iters / 10 > 0 ? iters / 10 : 1 ))
    if (( warmup >= iters )); then warmup=$(( iters / 10 )); fi
    # warmup ends before the decay starts (else the LR would climb into the decay window and drop)
    if (( warmup > iters - decay )); then warmup=$(( iters - decay )); fi
    echo --lr-decay-style WSD --lr-warmup-iters "$warmup" --lr-wsd-decay-iters "$decay" \
         --lr-wsd-decay-style linear --train-iters "$iters"
}

# TST flags: TST_BAG_SIZE=1 (or 0) gives the plain next-token baseline of the same config.
# Usage: tst_tst_args BAG_SIZE RATIO WEIGHTING [SUPERPOSITION_ITERS]
tst_tst_args() {
    local s=$1 r=$2 w=$3 iters=${4:-}
    if [[ $s -le 1 ]]; then
        echo --tst-bag-size 1
    elif [[ -n $iters ]]; then
        echo --tst-bag-size "$s" --tst-superposition-iters "$iters" --tst-bag-weighting "$w"
    else
        echo --tst-bag-size "$s" --tst-superposition-ratio "$r" --tst-bag-weighting "$w"
    fi
}

# Print a command line, shell-quoted, on one line.
tst_print_cmd() {
    local out="" a
    for a in "$@"; do out+="$(printf '%q' "$a") "; done
    echo "${out% }"
}

tst_launch() {
    local train_args=("$@")
    local nproc nnodes
    nproc=$(tst_nproc_per_node) || return
    nnodes=${NNODES:-1}
    tst_torchrun_args || return

    # The data/tokenizer/checkpoint flags come from the environment (set by the calling script).
    local io_args=()
    if [[ -n ${DATA_PATH:-} ]]; then
        # DATA_PATH is one prefix (spaces allowed: the default lies under the checkout) or a blend
        # "0.5 /a/fineweb_text_document 0.5 /b/dclm_text_document" (split on whitespace, no globbing).
        if [[ -e $DATA_PATH.bin || -e $DATA_PATH.idx ]]; then
            io_args+=(--data-path "$DATA_PATH")
        else
            local data
            read -r -a data <<< "$DATA_PATH"
            io_args+=(--data-path "${data[@]}")
        fi
    fi
    if [[ $nnodes -gt 1 && ${RDZV_BACKEND:-static} == static && -z ${NODE_RANK:-} ]]; then
        echo "error: NNODES=$nnodes needs NODE_RANK (0..$((nnodes - 1))) on each node, or RDZV_BACKEND=c10d" >&2
        return 2
    fi
    io_args+=(--tokenizer-type "${TOKENIZER_TYPE:-HuggingFaceTokenizer}")
    if [[ -n ${TOKENIZER_MODEL:-} ]]; then io_args+=(--tokenizer-model "$TOKENIZER_MODEL"); fi
    if [[ -n ${VOCAB_SIZE:-} && ${TOKENIZER_TYPE:-} == NullTokenizer ]]; then io_args+=(--vocab-size "$VOCAB_SIZE"); fi
    if [[ -n ${DATA_CACHE_PATH:-} ]]; then io_args+=(--data-cache-path "$DATA_CACHE_PATH"); fi
    if [[ -n ${SAVE:-} ]]; then
        # One directory for --save and --load: the first start finds it empty and starts fresh,
        # every later start (requeue, preemption, a crash) resumes from its latest checkpoint.
        io_args+=(--save "$SAVE" --load "$SAVE")
    fi

    if [[ ${DRY_RUN:-0} == 1 ]]; then
        echo "# DRY_RUN=1: on each of $nnodes node(s) (this is NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}), $nproc process(es) per node:"
        tst_print_cmd "$PYTHON" -m torch.distributed.run "${TSTRUN_TORCHRUN_ARGS[@]}" \
            "$REPO_ROOT/pretrain_tst.py" "${io_args[@]}" "${train_args[@]}"
        return 0
    fi

    if [[ ${PRINT_MODEL_SIZE:-0} == 1 ]]; then
        local size_args=(--print-model-size) filtered=() skip=0 a drop="--save --load"
        # Sizes need the vocabulary, not the tokenizer: without the tokenizer file, print them for
        # a VOCAB_SIZE-id vocabulary (NullTokenizer with VOCAB_SIZE-1 data ids + EOD = VOCAB_SIZE).
        if [[ ${TOKENIZER_TYPE:-HuggingFaceTokenizer} != NullTokenizer && -n ${VOCAB_SIZE:-} && \
              ( -z ${TOKENIZER_MODEL:-} || ! -e ${TOKENIZER_MODEL:-/nonexistent} ) && \
              ${TOKENIZER_TYPE:-HuggingFaceTokenizer} != ByteTokenizer ]]; then
            echo "[tst_launch] no tokenizer at '${TOKENIZER_MODEL:-}': sizes for a $VOCAB_SIZE-token vocabulary" >&2
            size_args+=(--tokenizer-type NullTokenizer --vocab-size $(( VOCAB_SIZE - 1 )))
            drop+=" --tokenizer-type --tokenizer-model"
        fi
        # Size printing needs neither --save nor --load (and --load must name an existing dir).
        for a in "${io_args[@]}"; do
            if (( skip )); then skip=0; continue; fi
            if [[ " $drop " == *" $a "* ]]; then skip=1; continue; fi
            filtered+=("$a")
        done
        "$PYTHON" "$REPO_ROOT/pretrain_tst.py" "${filtered[@]}" "${size_args[@]}" "${train_args[@]}"
        return $?
    fi

    if [[ -n ${SAVE:-} ]]; then mkdir -p "$SAVE"; fi
    export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}
    # Threads per process on CPU: torchrun would set 1; keep the user's choice if given.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    local cmd=("$PYTHON" -m torch.distributed.run "${TSTRUN_TORCHRUN_ARGS[@]}"
               "$REPO_ROOT/pretrain_tst.py" "${io_args[@]}" "${train_args[@]}")
    echo "[tst_launch] node ${NODE_RANK:-${SLURM_NODEID:-0}}/$nnodes, $nproc process(es) per node: $(tst_print_cmd "${cmd[@]}")" >&2
    # exec: SIGTERM/SIGINT sent to this script reach torchrun, which passes them to the trainer.
    exec "${cmd[@]}"
}

# torchrun's own flags, from the topology variables, into TSTRUN_TORCHRUN_ARGS.
tst_torchrun_args() {
    local nproc nnodes
    nproc=$(tst_nproc_per_node) || return
    nnodes=${NNODES:-1}
    if [[ $nnodes -gt 1 && -z ${MASTER_ADDR:-} ]]; then  # 127.0.0.1 would leave every other node waiting alone
        echo "error: NNODES=$nnodes needs MASTER_ADDR (the first node's address, the same on every node)" >&2
        return 2
    fi
    TSTRUN_TORCHRUN_ARGS=(--nproc-per-node "$nproc" --nnodes "$nnodes")
    case ${RDZV_BACKEND:-static} in
        static)
            # one node: its own loopback (a MASTER_ADDR left in the shell may name another machine)
            local addr=${MASTER_ADDR:-127.0.0.1}
            if [[ $nnodes -eq 1 ]]; then addr=127.0.0.1; fi
            TSTRUN_TORCHRUN_ARGS+=(--node-rank "${NODE_RANK:-0}" --master-addr "$addr"
                                   --master-port "${MASTER_PORT:-29500}")
            ;;
        c10d)
            TSTRUN_TORCHRUN_ARGS+=(--rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}"
                                   --rdzv-id "${RDZV_ID:-tst}")
            ;;
        *)
            echo "error: RDZV_BACKEND must be static or c10d (got ${RDZV_BACKEND})" >&2
            return 2
            ;;
    esac
    if [[ -n ${TORCHRUN_ARGS:-} ]]; then
        # shellcheck disable=SC2206
        TSTRUN_TORCHRUN_ARGS+=($TORCHRUN_ARGS)
    fi
}
TSTRUN_TORCHRUN_ARGS=()

# The paper's recipe around a model shape, shared by the pretrain_tst_<size>.sh scripts:
#     tst_paper_launch MODEL_ARG... -- "$@"
# The scripts derive the warmup, WSD decay and superposition lengths from TRAIN_ITERS: an extra
# --train-iters among the user's flags would leave them sized for another run. Returns 2 on one.
tst_refuse_train_iters() {
    local a
    for a in "$@"; do
        if [[ $a == --train-iters || $a == --train-iters=* ]]; then
            echo "error: give the run length as TRAIN_ITERS=N (the warmup, WSD decay and superposition lengths" \
                 "follow it), not $a" >&2
            return 2
        fi
    done
}

# Reads (set by the calling script, each overridable from the environment): RUN_NAME, SEQ_LENGTH,
# MICRO_BATCH_SIZE, GLOBAL_BATCH_SIZE, TP, PP, EXPERT_PARALLEL (MoE scripts only), TRAIN_ITERS,
# WARMUP_ITERS, LR, MIN_LR, TST_BAG_SIZE, TST_RATIO, TST_WEIGHTING, TST_ITERS (optional), SEED,
# LOG_INTERVAL, EVAL_INTERVAL, EVAL_ITERS, SAVE_INTERVAL, SPLIT.
# Optimiser as in the paper: AdamW (0.9, 0.95, eps 1e-8), weight decay 0.1, clip 1.0, bf16, WSD.
tst_paper_launch() {
    local model_args=()
    while [[ $# -gt 0 && $1 != -- ]]; do model_args+=("$1"); shift; done
    if [[ ${1:-} == -- ]]; then shift; fi
    tst_refuse_train_iters "$@" || return 2
    local parallel_args=(--tensor-model-parallel-size "${TP:-1}" --pipeline-model-parallel-size "${PP:-1}")
    # tensor parallel with sequence parallel, as Megatron-LM's recipes run it (an MoE needs it),
    # where the sequence divides among the TP ranks (the dense scripts' odd TP sizes keep it off)
    if [[ ${TP:-1} -gt 1 && $(( ${SEQ_LENGTH:-0} % ${TP:-1} )) -eq 0 ]]; then
        parallel_args+=(--sequence-parallel)
    fi
    if [[ -n ${EXPERT_PARALLEL:-} ]]; then parallel_args+=(--expert-model-parallel-size "$EXPERT_PARALLEL"); fi
    parallel_args+=(--use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather)
    # shellcheck disable=SC2207
    local train_args=(
        --micro-batch-size "$MICRO_BATCH_SIZE" --global-batch-size "$GLOBAL_BATCH_SIZE"
        --lr "$LR" --min-lr "${MIN_LR:-0}" $(tst_wsd_args "$TRAIN_ITERS" "${WARMUP_ITERS:-2000}")
        --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8 --weight-decay 0.1 --clip-grad 1.0
        --bf16 --seed "${SEED:-1234}"
    )
    # shellcheck disable=SC2207
    local tst_args=($(tst_tst_args "$TST_BAG_SIZE" "$TST_RATIO" "$TST_WEIGHTING" "${TST_ITERS:-}"))
    local log_args=(
        --log-interval "${LOG_INTERVAL:-10}" --eval-interval "${EVAL_INTERVAL:-1000}" --eval-iters "${EVAL_ITERS:-10}"
        --save-interval "${SAVE_INTERVAL:-1000}" --split "${SPLIT:-998,2,0}" --run-name "$RUN_NAME"
    )
    tst_launch "${model_args[@]}" "${parallel_args[@]}" "${train_args[@]}" "${tst_args[@]}" "${log_args[@]}" "$@"
}
