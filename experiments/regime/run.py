#!/usr/bin/env python
"""Regime study: where does TST pay off at equal FLOPs? (issue: performance and evidence)

Every comparison is an equal-FLOPs pair: baseline and TST runs with the identical model, batch,
sequence length, LR schedule, seed and iteration count; only --tst-* flags differ. The LR is tuned
per width on the *baseline* (best final validation loss over --lrs) and then used for both, so no
comparison is tilted towards TST.

For each TST run it records: final validation next-token loss vs the baseline's, the equal-loss
speedup (baseline iterations to reach the TST run's final loss / TST iterations; "not reached"
when TST ends below the baseline's final loss), the superposition-phase bag loss (validation MCE
at the last evaluation before the switch), and two references for that bag loss computed from the
data itself: the unigram entropy and a count model that predicts the next bag from the last token
of the current bag (experiments/regime/reference_losses.py).

    python experiments/regime/run.py --quick                    # one pair, < 15 min on 2 cores
    python experiments/regime/run.py --quick --dry-run          # list the runs a sweep would train
    python experiments/regime/run.py --widths 128 256 384 --bag-sizes 2 4 8 --ratios 0.3 0.2
    python experiments/regime/run.py --data-path PREFIX --tokenizer-type ... --tokenizer-model ...

Outputs under --out (default outputs/regime): one directory per run (metrics.jsonl, train.log),
summary.json, summary.md (the table for docs/results.md) and regime.png.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))
sys.path.insert(0, HERE)


def build_default_data(out: str, corpus_bytes: int, vocab: int) -> Dict[str, str]:
    """The embedded default corpus, tokenized with our own tools (cached in `out`)."""
    prefix = os.path.join(out, "stdlib")
    spm = os.path.join(out, "spm")
    data = prefix + "_text_document"
    if os.path.isfile(data + ".bin") and os.path.isfile(spm + ".model"):
        return {"data_path": data, "tokenizer_type": "SentencePieceTokenizer", "tokenizer_model": spm + ".model"}
    os.makedirs(out, exist_ok=True)
    from tst_megatron.corpus import build_default_corpus

    corpus = os.path.join(out, "stdlib.jsonl")
    build_default_corpus(corpus, max_bytes=corpus_bytes)
    py = sys.executable
    subprocess.run([py, "tools/train_tokenizer.py", "--input", corpus, "--output-prefix", spm, "--model-type", "bpe",
                    "--vocab-size", str(vocab)], check=True, cwd=REPO)
    subprocess.run([py, "tools/preprocess_data.py", "--input", corpus, "--output-prefix", prefix, "--tokenizer-type",
                    "SentencePieceTokenizer", "--tokenizer-model", spm + ".model", "--append-eod", "--workers", "2",
                    "--no-progress"], check=True, cwd=REPO)
    return {"data_path": data, "tokenizer_type": "SentencePieceTokenizer", "tokenizer_model": spm + ".model"}


def _flag_values(argv) -> Dict[str, List[str]]:
    """{--flag: [its values]} of a command line."""
    out: Dict[str, List[str]] = {}
    key = ""
    for token in argv:
        if token.startswith("--"):
            key = token
            out[key] = []
        else:
            out.setdefault(key, []).append(token)
    return out


def run_one(name: str, out: str, data: dict, a, width: int, lr: float, seed: int, s: int, r: float,
            iters: int, gbs: int) -> str:
    """Train one run (skipped when its metrics already hold the final evaluation)."""
    run_dir = os.path.join(out, name)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    heads = max(2, width // 64)
    cmd = [sys.executable, "pretrain_tst.py", "--data-path", data["data_path"], "--split", "98,2,0",
           "--tokenizer-type", data["tokenizer_type"], "--num-layers", str(a.layers), "--hidden-size", str(width),
           "--num-attention-heads", str(heads), "--seq-length", str(a.seq_length), "--swiglu",
           "--normalization", "RMSNorm", "--disable-bias-linear", "--untie-embeddings-and-output-weights",
           "--make-vocab-size-divisible-by", "64", "--micro-batch-size", str(min(gbs, a.micro_batch_size)),
           "--global-batch-size", str(gbs), "--train-iters", str(iters), "--lr", str(lr), "--min-lr", str(lr / 10),
           "--lr-decay-style", "WSD", "--lr-warmup-iters", str(max(1, iters // 20)),
           "--lr-wsd-decay-iters", str(max(1, iters // 10)), "--weight-decay", "0.1", "--clip-grad", "1.0",
           "--seed", str(seed), "--log-interval", str(max(1, iters // 20)),
           "--eval-interval", str(max(1, iters // a.evals)), "--eval-iters", str(a.eval_iters),
           "--metrics-path", metrics, "--run-name", name,
           # megatron's sample-index cache per run: runs of one grid side by side (grid.sh's --only base /
           # --only tst halves) would otherwise write the same index files next to the data at once
           "--data-cache-path", os.path.join(run_dir, "cache")]
    if data.get("tokenizer_model"):
        cmd += ["--tokenizer-model", data["tokenizer_model"]]
    if data.get("vocab_size"):
        cmd += ["--vocab-size", str(data["vocab_size"])]
    if s > 1:
        cmd += ["--tst-bag-size", str(s), "--tst-superposition-ratio", str(r),
                "--tst-bag-weighting", "power" if s >= 8 else "uniform"]
    # the name holds width/batch/iterations/LR/seed/s/r only: a finished run is reused only when it
    # was trained with this very command (other --layers, --seq-length, data, ... in the same --out
    # would otherwise be reported under the new settings)
    recorded = os.path.join(run_dir, "command.json")
    if _final_eval(metrics) is not None:
        if os.path.isfile(recorded):
            with open(recorded) as f:
                before = json.load(f)
            then, now = _flag_values(before), _flag_values(cmd[1:])
            changed = [f"{k} {' '.join(now.get(k, ['(unset)']))} (was {' '.join(then.get(k, ['(unset)']))})"
                       for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k)]
            if changed:
                raise SystemExit(f"regime: {run_dir} was trained with other settings: {'; '.join(changed)}. Give "
                                 "another --out for this grid, or remove that run to retrain it")
        return metrics
    os.makedirs(run_dir, exist_ok=True)
    with open(recorded, "w") as f:
        json.dump(cmd[1:], f)
    t0 = time.time()
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(a.threads))
    with open(os.path.join(run_dir, "train.log"), "w") as log:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"regime: run {name} failed (exit {rc}); see {run_dir}/train.log")
    print(f"[regime] {name}: final val LM loss {_final_eval(metrics):.4f} ({time.time() - t0:.0f}s)", flush=True)
    return metrics


def _records(path: str) -> List[dict]:
    if not os.path.isfile(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def _final_eval(path: str) -> Optional[float]:
    recs = _records(path)
    run = next((r for r in recs if r.get("type") == "run"), None)
    evals = [r for r in recs if r.get("type") == "eval"]
    if not run or not evals or evals[-1]["iteration"] != run["train_iters"]:
        return None
    return evals[-1]["val_lm_loss"]


def _curve(path: str):
    evals = [r for r in _records(path) if r.get("type") == "eval"]
    return [r["iteration"] for r in evals], [r["val_lm_loss"] for r in evals]


def _bag_loss_at_switch(path: str, sup_iters: int) -> Optional[float]:
    """Validation multi-hot loss of the evaluation right after the last superposition step
    (None when no evaluation fell on the switch, e.g. r * iters not a multiple of the interval)."""
    for r in _records(path):
        if r.get("type") == "eval" and r["iteration"] == sup_iters and "val_mce_loss" in r:
            return r["val_mce_loss"]
    return None


def _post_switch(path: str, sup_iters: int) -> Optional[float]:
    """Validation LM loss at the first evaluation after the switch (how fast it recovers)."""
    for r in _records(path):
        if r.get("type") == "eval" and r["iteration"] > sup_iters:
            return r["val_lm_loss"]
    return None


def plan(a) -> List[str]:
    """The runs a sweep trains, in order (what the loop in main() does; finished runs are skipped
    there). The LR of the pairs is picked on the first seed's baselines, so with several --lrs the
    pairs are listed as "at the picked LR"."""
    lines = []
    for iters in a.iters:
        for gbs in a.global_batch_sizes:
            for width in a.widths:
                for lr in a.lrs:
                    lines.append(f"baseline  w{width} gbs{gbs} it{iters} lr{lr:g} seed{a.seeds[0]}")
                lr = f"{a.lrs[0]:g}" if len(a.lrs) == 1 else "<picked>"
                for seed in a.seeds:
                    if seed != a.seeds[0]:
                        lines.append(f"baseline  w{width} gbs{gbs} it{iters} lr{lr} seed{seed}")
                    for s in a.bag_sizes:
                        for r in a.ratios:
                            lines.append(f"tst       w{width} gbs{gbs} it{iters} lr{lr} seed{seed} s{s} r{r:g}")
    if getattr(a, "only", None):
        lines = [line for line in lines if line.startswith(a.only)]
    lines.append(f"{len(lines)} runs of {a.layers} layers, seq {a.seq_length}, {a.evals} evaluations each")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(REPO, "outputs", "regime"))
    p.add_argument("--quick", action="store_true", help="one pair (hidden 128, s=4, r=0.3, 300 iterations)")
    p.add_argument("--data-path", default=None, help="a preprocessed prefix (default: the embedded corpus)")
    p.add_argument("--tokenizer-type", default="SentencePieceTokenizer")
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--vocab-size", type=int, default=None, help="for NullTokenizer data")
    p.add_argument("--corpus-bytes", type=int, default=16_000_000)
    p.add_argument("--corpus-vocab", type=int, default=2048)
    p.add_argument("--widths", type=int, nargs="+", default=[128, 256, 384])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--global-batch-sizes", type=int, nargs="+", default=[16])
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--iters", type=int, nargs="+", default=[600])
    p.add_argument("--bag-sizes", type=int, nargs="+", default=[2, 4])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.3])
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    p.add_argument("--seeds", type=int, nargs="+", default=[1234])
    p.add_argument("--evals", type=int, default=10, help="evaluations per run")
    p.add_argument("--eval-iters", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dry-run", action="store_true", help="print the runs this sweep would train, and exit")
    p.add_argument("--only", choices=["base", "tst"], default=None,
                   help="train only the baselines or only the TST runs (two processes, one per half, use both "
                        "cores at --threads 1); no summary: run again without --only for it (nothing retrains)")
    a = p.parse_args(argv)
    if a.only == "tst" and len(a.lrs) > 1:
        p.error("--only tst needs one --lrs value (with several, the LR is picked on the finished baselines)")
    if a.quick:
        a.widths, a.bag_sizes, a.ratios, a.lrs, a.seeds, a.iters = [128], [4], [0.3], [3e-3], [1234], [300]
        a.global_batch_sizes = [16]
    if a.dry_run:
        for line in plan(a):
            print(line)
        return 0
    os.makedirs(a.out, exist_ok=True)

    if a.data_path:
        data = {"data_path": a.data_path, "tokenizer_type": a.tokenizer_type, "tokenizer_model": a.tokenizer_model,
                "vocab_size": a.vocab_size}
    else:
        data = build_default_data(os.path.join(a.out, "data"), a.corpus_bytes, a.corpus_vocab)

    from reference_losses import reference_losses

    refs = reference_losses(data["data_path"], max(a.bag_sizes), split="98,2,0")
    print(f"[regime] data {data['data_path']}: unigram entropy {refs['unigram_entropy']:.3f} nats; "
          + ", ".join(f"count-model MCE s={s}: {v:.3f}" for s, v in refs["count_model_mce"].items()), flush=True)

    def train(kind, *args):  # run_one, unless --only names the other half
        return None if a.only and a.only != kind else run_one(*args)

    rows = []
    for iters in a.iters:
        for gbs in a.global_batch_sizes:
            for width in a.widths:
                # LR tuned on the baseline only (first seed), then shared by every run of this width.
                base_runs = {}
                for lr in a.lrs:
                    name = f"w{width}_gbs{gbs}_it{iters}_lr{lr:g}_seed{a.seeds[0]}_base"
                    base_runs[lr] = train("base", name, a.out, data, a, width, lr, a.seeds[0], 1, 0.0, iters, gbs)
                lr = a.lrs[0] if a.only == "tst" else min(a.lrs, key=lambda x: _final_eval(base_runs[x]))
                for seed in a.seeds:
                    base = train("base", f"w{width}_gbs{gbs}_it{iters}_lr{lr:g}_seed{seed}_base", a.out, data, a,
                                 width, lr, seed, 1, 0.0, iters, gbs)
                    bx, by = _curve(base) if base else ([], [])
                    for s in a.bag_sizes:
                        for r in a.ratios:
                            name = f"w{width}_gbs{gbs}_it{iters}_lr{lr:g}_seed{seed}_s{s}_r{r:g}"
                            tst = train("tst", name, a.out, data, a, width, lr, seed, s, r, iters, gbs)
                            if a.only:
                                continue
                            from plot_runs import equal_loss_speedup

                            final_tst, final_base = _final_eval(tst), _final_eval(base)
                            speed = equal_loss_speedup(bx, by, final_tst, iters)
                            sup = int(math.floor(r * iters + 1e-9))
                            rows.append({
                                "width": width, "layers": a.layers, "gbs": gbs, "tokens_per_step": gbs * a.seq_length,
                                "iters": iters, "lr": lr, "seed": seed, "s": s, "r": r,
                                "val_lm_tst": final_tst, "val_lm_base": final_base, "delta": final_tst - final_base,
                                "speedup": speed, "transfer": _transfer(speed, iters, sup),
                                "bag_loss_at_switch": _bag_loss_at_switch(tst, sup),
                                "val_lm_after_switch": _post_switch(tst, sup),
                                "base_at_same_iter": _at(bx, by, _first_eval_after(tst, sup)),
                                "unigram_entropy": refs["unigram_entropy"],
                                "count_model_mce": refs["count_model_mce"].get(s),
                                "tst_metrics": os.path.relpath(tst, a.out), "base_metrics": os.path.relpath(base, a.out)})
    if a.only:
        print(f"[regime] --only {a.only}: done; run the same command without --only for the summary", flush=True)
        return 0
    summary = {"data": data, "references": refs, "rows": rows, "args": vars(a)}
    with open(os.path.join(a.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    table = _markdown(rows, refs)
    with open(os.path.join(a.out, "summary.md"), "w") as f:
        f.write(table)
    print(table)
    _plot(rows, a.out)
    return 0


def _transfer(speed: Optional[float], iters: int, sup: int) -> Optional[float]:
    """What one superposition step was worth, in baseline steps.

    The baseline needs `speed * iters` steps to reach the TST run's final loss; the TST run spent
    `iters - sup` of its steps as ordinary next-token steps. The rest of that distance is what the
    `sup` superposition steps bought: (speed * iters - (iters - sup)) / sup. 1 means break-even
    (TST = baseline), above 1 TST wins, 0 means the superposition phase was worthless (the run is
    a baseline that started late), below 0 it left the model worse than a fresh initialisation.
    Generous to TST: the TST run's final loss includes the LR decay, the baseline's curve before
    its own decay does not. None when TST ended below the baseline (transfer > 1)."""
    if speed is None or sup <= 0:
        return None
    return (speed * iters - (iters - sup)) / sup


def _first_eval_after(path: str, sup: int) -> Optional[int]:
    for r in _records(path):
        if r.get("type") == "eval" and r["iteration"] > sup:
            return r["iteration"]
    return None


def _at(xs, ys, x) -> Optional[float]:
    if x is None:
        return None
    for xi, yi in zip(xs, ys):
        if xi == x:
            return yi
    return None


def _fmt(v, nd=3):
    return "—" if v is None else f"{v:.{nd}f}"


def _markdown(rows: List[dict], refs: dict) -> str:
    lines = [f"Unigram entropy of the data: {refs['unigram_entropy']:.3f} nats. Count-model next-bag MCE "
             "(predict the next bag from the last token): "
             + ", ".join(f"s={s}: {v:.3f}" for s, v in refs["count_model_mce"].items()) + ".", "",
             "| width | tokens/step | iters | LR | seed | s | r | val LM TST | val LM base | TST − base | "
             "equal-loss speedup | superposition step worth (baseline steps) | bag loss at switch | "
             "LM after switch (base same iter) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speed = "not reached (TST better)" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        worth = "> 1" if r.get("transfer") is None else f"{r['transfer']:+.2f}"
        lines.append(f"| {r['width']} | {r['tokens_per_step']} | {r['iters']} | {r['lr']:g} | {r['seed']} | {r['s']} | "
                     f"{r['r']:g} | {_fmt(r['val_lm_tst'])} | {_fmt(r['val_lm_base'])} | {r['delta']:+.3f} | {speed} | {worth} | "
                     f"{_fmt(r['bag_loss_at_switch'])} | {_fmt(r['val_lm_after_switch'])} ({_fmt(r['base_at_same_iter'])}) |")
    return "\n".join(lines) + "\n"


def _plot(rows: List[dict], out: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    from report import plot_gap_vs_width

    fig, ax = plt.subplots(1, 1, figsize=(6, 4))
    plot_gap_vs_width(ax, rows, "hidden size")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "regime.png"), dpi=120)


if __name__ == "__main__":
    sys.exit(main())
