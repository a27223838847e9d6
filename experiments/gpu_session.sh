#!/usr/bin/env bash
# Everything issue 6 asks of one GPU, as one prepared command (device time is scarce: run once):
#   1. the MCE Triton kernels, compiled, against the torch implementation on CPU (pytest);
#   2. bench/bench_mce.py at its CUDA defaults (N=8192, V 32000/151936, s 1/4/8/16, fp32 + bf16);
#   3. bench/profile_mce.py at bf16 V=32000 (where the loss was launch-bound): per-kernel GPU time;
#   4. experiments/gpu_equal_flops.sh: ~116M Llama-style baseline vs TST s=4 r=0.3, bf16, equal
#      FLOPs (CORPUS=site by default here: a corpus built on the machine, so no token repeats).
# The stage limits (90 + 120 + 60 + 330 s) keep the whole under a 10-minute call (session 3 took
# 26 + 6 + 248 s for stages 1, 2 and 4).
# Each stage has its own time limit and failure does not stop the next. Results go to
# $RESULTS_DIR (default outputs/gpu_session); with COPY_TO set, the files worth keeping are
# copied there (at most 9, flat).
#
#   bash experiments/gpu_session.sh
#   WHEELS_DIR=.whl COPY_TO=$OUT bash experiments/gpu_session.sh   # megatron-core from local wheels
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
R=${RESULTS_DIR:-outputs/gpu_session}
mkdir -p "$R"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
T0=$SECONDS
stamp() { echo "[gpu_session +$((SECONDS - T0))s] $*" | tee -a "$R/session.log"; }

if ! $PY -c "import megatron.core" 2>/dev/null && [ -n "${WHEELS_DIR:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/tst_site "$WHEELS_DIR"/*.whl
  export PYTHONPATH=/tmp/tst_site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  $PY -c "import torch, triton, megatron.core as m; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'megatron-core', m.__version__, torch.cuda.get_device_name(0))"
} 2>&1 | tee -a "$R/session.log"

stamp "1/4 kernel check (tests/test_loss_triton.py)"
timeout "${TEST_TIMEOUT:-90}" $PY -m pytest -q -p no:cacheprovider tests/test_loss_triton.py 2>&1 \
  | tail -n 25 | tee -a "$R/session.log"
stamp "kernel check rc=${PIPESTATUS[0]}"

stamp "2/4 MCE benchmark (bench/bench_mce.py)"
timeout "${BENCH_TIMEOUT:-120}" $PY bench/bench_mce.py ${BENCH_ARGS:-} --json "$R/bench_mce.json" > "$R/bench_mce.txt" 2>&1
stamp "bench rc=$?"
tail -n 45 "$R/bench_mce.txt" >> "$R/session.log"

stamp "3/4 loss profile (bench/profile_mce.py)"
timeout "${PROFILE_TIMEOUT:-60}" $PY bench/profile_mce.py --V 32000 --s 1 16 --dtype bf16 > "$R/profile_mce.txt" 2>&1
stamp "profile rc=$?"

stamp "4/4 equal-FLOPs pair (experiments/gpu_equal_flops.sh)"
CORPUS=${CORPUS:-site} OUT_DIR="$R/equal_flops" timeout "${PAIR_TIMEOUT:-330}" \
  bash experiments/gpu_equal_flops.sh > "$R/equal_flops.log" 2>&1
stamp "equal-FLOPs rc=$?"
tail -n 8 "$R/equal_flops.log" | tee -a "$R/session.log"

if [ -n "${COPY_TO:-}" ]; then
  E="$R/equal_flops"
  cat "$E/baseline.log" "$E/tst.log" > "$R/runs.log" 2>/dev/null
  for f in "$R/session.log" "$R/bench_mce.txt" "$R/bench_mce.json" "$R/profile_mce.txt" "$R/runs.log" \
           "$E/summary.txt" "$E/baseline.jsonl" "$E/tst.jsonl" "$E/gpu_equal_flops.png"; do
    [ -f "$f" ] && cp "$f" "$COPY_TO/"
  done
fi
stamp "done"
