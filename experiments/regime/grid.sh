#!/usr/bin/env bash
# The full regime grid behind docs/results.md, as sweeps of experiments/regime/run.py.
# Each sweep reuses finished runs (a run is skipped when its metrics hold the final evaluation),
# so this script can be interrupted and restarted. Every sweep's table is kept as summary_<tag>.md.
#
#   bash experiments/regime/grid.sh            # all sweeps (the stdlib ones ~3.3 h on 2 idle cores,
#                                              #   the site* ones ~8 h more: hidden 384 alone ~2-3 h)
#   SWEEPS="ratios width384" bash experiments/regime/grid.sh
#   SWEEPS=site3200 RUN_ARGS="--threads 1" bash experiments/regime/grid.sh   # extra run.py flags
#   # a sweep's baselines and TST runs side by side, one core each, then its summary (no retraining):
#   SWEEPS=site3200w384seed2 RUN_ARGS="--threads 1 --only base" bash experiments/regime/grid.sh &
#   SWEEPS=site3200w384seed2 RUN_ARGS="--threads 1 --only tst" bash experiments/regime/grid.sh; wait
#   SWEEPS=site3200w384seed2 bash experiments/regime/grid.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/regime}
SWEEPS=${SWEEPS:-"base128 seed2 width256 ratios width384 batch64 long1600 switchcost seed2long long1600lr site1600 site3200 site1600seed2 site3200seed2 site1600s4 site3200s4 site3200w256 site3200s4seed2 site3200w256seed2 site3200w256seed3 site3200seed3 site3200w384 site3200w384seed2"}

sweep() {  # tag, then run.py arguments
  local tag=$1; shift
  local out=$OUT; [[ $tag == seed2* ]] && out=${OUT}_seed2
  [[ $tag == long1600lr ]] && out=${OUT}_lr1600
  local data=()
  [[ -f $OUT/data/stdlib_text_document.bin ]] && data=(--data-path "$OUT/data/stdlib_text_document" --tokenizer-model "$OUT/data/spm.model")
  if [[ $tag == site* ]]; then  # the no-repeat corpus, same tokenizer (built by site_data)
    out=${OUT}_$tag; data=(--data-path "${OUT}_site_data/site_text_document" --tokenizer-model "$OUT/data/spm.model")
  fi
  echo "=== sweep $tag: $* ($(date -u +%H:%M:%S))"
  "$PY" experiments/regime/run.py --out "$out" "${data[@]}" "$@" ${RUN_ARGS:-}
  [[ ${RUN_ARGS:-} == *--only* ]] && return 0  # half a sweep: no summary yet
  cp "$out/summary.md" "$OUT/summary_${tag}.md"; cp "$out/summary.json" "$OUT/summary_${tag}.json"
  cp "$out/regime.png" "$OUT/regime_${tag}.png" 2>/dev/null || true
}

site_data() {  # 40 MB of .py sources from this venv's site-packages, tokenized with the grid's BPE
  # the grid's BPE is trained with the stdlib data (run.py's defaults) when no stdlib sweep made it yet
  "$PY" -c "import sys; sys.path.insert(0, 'experiments/regime'); import run; run.build_default_data('$OUT/data', 16_000_000, 2048)"
  PYTHON="$PY" bash experiments/build_site_corpus.sh "${OUT}_site_data/site" "$OUT/data/spm.model" 40000000 2
}

for s in $SWEEPS; do
  case $s in
    # hidden 128, LR tuned over {1e-3, 3e-3} on the baseline, s in {2, 4}
    base128)  sweep base128 --widths 128 --iters 400 --bag-sizes 2 4 --ratios 0.3 --lrs 1e-3 3e-3 ;;
    # second seed at the LR the first seed chose
    seed2)    sweep seed2 --widths 128 --iters 400 --bag-sizes 2 4 --ratios 0.3 --lrs 1e-3 --seeds 4321 ;;
    # r in {0.2, 0.3}, s in {2, 4, 8} at hidden 128
    ratios)   sweep ratios --widths 128 --iters 400 --bag-sizes 2 4 8 --ratios 0.2 0.3 --lrs 1e-3 3e-3 ;;
    width256) sweep width256 --widths 256 --iters 400 --bag-sizes 2 4 --ratios 0.3 --lrs 1e-3 3e-3 ;;
    # wider: 1e-3 won at 128 and 256, so the tuning grid moves down
    width384) sweep width384 --widths 384 --iters 400 --bag-sizes 2 4 --ratios 0.3 --lrs 5e-4 1e-3 ;;
    # 4x tokens per step (8,192), same iterations
    # (s = 2 only: the best case for TST at every width above; CPU budget)
    batch64)  sweep batch64 --widths 128 --global-batch-sizes 64 --iters 400 --bag-sizes 2 --ratios 0.3 --lrs 1e-3 3e-3 ;;
    # 4x longer run: first at the LR tuned for 400 steps, then with the LR re-tuned on the
    # baseline at this length (2e-3 won), and a second seed of the 1e-3 pair
    long1600)   sweep long1600 --widths 128 --iters 1600 --bag-sizes 2 --ratios 0.3 --lrs 1e-3 ;;
    long1600lr) sweep long1600lr --widths 128 --iters 1600 --bag-sizes 2 --ratios 0.3 --lrs 5e-4 1e-3 2e-3 ;;
    seed2long)  sweep seed2long --widths 128 --iters 1600 --bag-sizes 2 --ratios 0.3 --lrs 1e-3 --seeds 4321 ;;
    # diagnostic: does the cost of the switch depend on how long the superposition phase was?
    switchcost) sweep switchcost --widths 128 --iters 400 --bag-sizes 2 4 --ratios 0.05 --lrs 1e-3 3e-3 ;;
    # session 3: does the run-length trend continue past parity? A corpus with no repeats at these
    # lengths (16M tokens of site-packages sources, same BPE; 3,200 TST steps read 8.5M), s = 2,
    # r = 0.3, hidden 128; LR re-tuned on the baseline at 3,200; a second seed at both lengths.
    site1600)      site_data; sweep site1600 --widths 128 --iters 1600 --bag-sizes 2 --ratios 0.3 --lrs 2e-3 ;;
    site3200)      site_data; sweep site3200 --widths 128 --iters 3200 --bag-sizes 2 --ratios 0.3 --lrs 1e-3 2e-3 ;;
    site1600seed2) site_data; sweep site1600seed2 --widths 128 --iters 1600 --bag-sizes 2 --ratios 0.3 --lrs 2e-3 --seeds 4321 ;;
    site3200seed2) site_data; sweep site3200seed2 --widths 128 --iters 3200 --bag-sizes 2 --ratios 0.3 --lrs 2e-3 --seeds 4321 ;;
    # s = 4 at both lengths, at the LRs chosen above (one seed)
    site1600s4)    site_data; sweep site1600s4 --widths 128 --iters 1600 --bag-sizes 4 --ratios 0.3 --lrs 2e-3 ;;
    site3200s4)    site_data; sweep site3200s4 --widths 128 --iters 3200 --bag-sizes 4 --ratios 0.3 --lrs 1e-3 ;;
    # session 4: does width change the 3,200-step win? hidden 256 (4.1M parameters), s = 2, LR tuned
    # on the baseline over {5e-4, 1e-3} (1e-3 won at 3,200 steps for hidden 128 and at 400 for 256)
    site3200w256)  site_data; sweep site3200w256 --widths 256 --iters 3200 --bag-sizes 2 --ratios 0.3 --lrs 5e-4 1e-3 ;;
    # and a second seed for s = 4 at 3,200 steps (its baseline at this LR is new for seed 4321)
    site3200s4seed2) site_data; sweep site3200s4seed2 --widths 128 --iters 3200 --bag-sizes 4 --ratios 0.3 --lrs 1e-3 --seeds 4321 ;;
    # session 5: a second seed for the hidden-256 pair (at the LR tuned on seed 1234)
    site3200w256seed2) site_data; sweep site3200w256seed2 --widths 256 --iters 3200 --bag-sizes 2 --ratios 0.3 --lrs 1e-3 --seeds 4321 ;;
    # and a third: the two baselines above differ by 0.14 nats of held-out loss, the TST runs by 0.002
    site3200w256seed3) site_data; sweep site3200w256seed3 --widths 256 --iters 3200 --bag-sizes 2 --ratios 0.3 --lrs 1e-3 --seeds 777 ;;
    # a third seed for the hidden-128 s = 2 pair, at the LR tuned on seed 1234
    site3200seed3) site_data; sweep site3200seed3 --widths 128 --iters 3200 --bag-sizes 2 --ratios 0.3 --lrs 1e-3 --seeds 777 ;;
    # session 6: the widest at 3,200 steps -- hidden 384 (8.7M parameters), s = 2; LR tuned on the
    # baseline over {5e-4, 1e-3} (5e-4 won at 400 steps for 384 by 0.02, 1e-3 at 3,200 for 256)
    site3200w384)  site_data; sweep site3200w384 --widths 384 --iters 3200 --bag-sizes 2 --ratios 0.3 --lrs 5e-4 1e-3 ;;
    # session 8: a second seed for the hidden-384 pair, at the LR tuned on seed 1234 (5e-4; ~2 h on 2 idle cores)
    site3200w384seed2) site_data; sweep site3200w384seed2 --widths 384 --iters 3200 --bag-sizes 2 --ratios 0.3 --lrs 5e-4 --seeds 4321 ;;
    *) echo "grid.sh: unknown sweep '$s'" >&2; exit 2 ;;
  esac
done
