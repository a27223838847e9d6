"""The embedded default main job (`make demo`): a tiny TST run and its baseline, on CPU, no download.

1. corpus     the Python standard library's own sources (text every machine with Python has);
2. tokenizer  a SentencePiece BPE trained on it (tools/train_tokenizer.py);
3. data       .bin/.idx through megatron's IndexedDatasetBuilder (tools/preprocess_data.py);
4. training   pretrain_tst.py twice with identical model, data, batch, LR schedule and iteration
              count: once with TST (s = 4, r = 0.3), once as the plain baseline;
5. report     both final validation next-token losses and a PNG (tools/plot_runs.py).

At this toy scale TST is expected to *lose* to the baseline at equal steps (see README /
docs/results.md): the demo shows the machinery end to end, not the paper's gain.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The fields of the trainer's log line the demo echoes (the whole line is in the run's train.log).
_ECHOED = ("phase", "learning rate", "mce loss", "lm loss", "grad norm", "tokens/s", "ETA")


def _compact(line: str) -> str:
    """A training log line cut to the fields worth watching, in the trainer's own words; other
    lines (evaluation, the phase switch, errors) whole."""
    parts = [p.strip() for p in line.split("|")]
    if not parts[0].split("]")[-1].strip().startswith("iteration"):
        return line
    return " | ".join([parts[0].split("]")[-1].strip()] + [p for p in parts[1:] if p.startswith(_ECHOED)])


def _run(cmd, log_path=None):
    print("$ " + " ".join(cmd), flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    if log_path is None:
        if subprocess.run(cmd, cwd=REPO, env=env).returncode != 0:
            raise SystemExit(f"demo: {' '.join(cmd[:2])} failed; its message is above")
        return
    print(f"  (the whole log: {log_path})", flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            log.write(line)
            if "iteration" in line and ("/" in line) or "validation" in line or "phase switch" in line \
                    or line.startswith("error") or "Traceback" in line:
                print("   " + _compact(line.rstrip()), flush=True)
        if proc.wait() != 0:
            raise SystemExit(f"demo: {' '.join(cmd[:3])} failed; see {log_path}")


def _final_val(metrics_path: str) -> float:
    value = None
    with open(metrics_path) as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("type") == "eval":
                value = rec["val_lm_loss"]
    return value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(REPO, "outputs", "demo"))
    p.add_argument("--train-iters", type=int, default=400)
    p.add_argument("--tst-bag-size", type=int, default=4)
    p.add_argument("--tst-superposition-ratio", type=float, default=0.3)
    p.add_argument("--corpus-bytes", type=int, default=6_000_000)
    p.add_argument("--split", default="98,2,0", help="train,validation,test weights (a small corpus needs a "
                   "larger validation share: one sample must fit in it)")
    p.add_argument("--vocab-size", type=int, default=2048)
    args = p.parse_args(argv)

    for tool in ("tools/train_tokenizer.py", "tools/preprocess_data.py", "tools/plot_runs.py", "pretrain_tst.py"):
        if not os.path.isfile(os.path.join(REPO, tool)):
            raise SystemExit(f"demo: {tool} not found next to the package; run `make demo` from a tst-megatron checkout")
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    py = sys.executable

    from .corpus import build_default_corpus

    corpus = os.path.join(out, "stdlib.jsonl")
    info = build_default_corpus(corpus, max_bytes=args.corpus_bytes)
    print(f"[demo] corpus: {info['documents']} documents, {info['bytes'] / 1e6:.1f} MB from {info['source_dir']}")

    spm = os.path.join(out, "spm")
    _run([py, "tools/train_tokenizer.py", "--input", corpus, "--output-prefix", spm, "--model-type", "bpe",
          "--vocab-size", str(args.vocab_size)])
    prefix = os.path.join(out, "stdlib")
    _run([py, "tools/preprocess_data.py", "--input", corpus, "--output-prefix", prefix, "--tokenizer-type",
          "SentencePieceTokenizer", "--tokenizer-model", spm + ".model", "--append-eod", "--workers", "2"])
    data = prefix + "_text_document"

    n = args.train_iters  # warmup, logging and evaluation scale down for a shorter --train-iters
    common = [py, "pretrain_tst.py", "--data-path", data, "--split", args.split,
              "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", spm + ".model",
              "--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4", "--seq-length", "128",
              "--swiglu", "--normalization", "RMSNorm", "--disable-bias-linear",
              "--untie-embeddings-and-output-weights", "--make-vocab-size-divisible-by", "64",
              "--micro-batch-size", "16", "--global-batch-size", "16", "--train-iters", str(args.train_iters),
              "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine",
              "--lr-warmup-iters", str(min(20, n // 20)),
              "--weight-decay", "0.1", "--clip-grad", "1.0", "--seed", "1234",
              "--log-interval", str(max(1, min(25, n // 16))), "--eval-interval", str(max(1, min(50, n // 8))),
              "--eval-iters", "4"]
    runs = {}
    for name, extra in (("tst", ["--tst-bag-size", str(args.tst_bag_size), "--tst-superposition-ratio",
                                 str(args.tst_superposition_ratio)]),
                        ("baseline", [])):
        run_dir = os.path.join(out, name)
        shutil.rmtree(run_dir, ignore_errors=True)  # a rerun replaces the demo's own earlier run
        os.makedirs(run_dir)
        metrics = os.path.join(run_dir, "metrics.jsonl")
        print(f"[demo] training {name} run ({args.train_iters} iterations) -> {run_dir}", flush=True)
        _run(common + extra + ["--save", run_dir, "--metrics-path", metrics, "--run-name", name],
             log_path=os.path.join(run_dir, "train.log"))
        runs[name] = metrics

    png = os.path.join(out, "tst_vs_baseline.png")
    _run([py, "tools/plot_runs.py", runs["tst"], runs["baseline"], "--labels",
          f"TST s={args.tst_bag_size} r={args.tst_superposition_ratio}", "baseline", "--baseline", "1",
          "--output", png, "--title", "tst-megatron demo (CPU, stdlib corpus)"])
    tst, base = _final_val(runs["tst"]), _final_val(runs["baseline"])
    print("\n[demo] final validation next-token loss after %d iterations (equal FLOPs):" % args.train_iters)
    print(f"         TST (s={args.tst_bag_size}, r={args.tst_superposition_ratio}): {tst:.4f}")
    print(f"         baseline:            {base:.4f}")
    print(f"[demo] plot: {png}")
    print(f"[demo] runs: {os.path.join(out, 'tst')} and {os.path.join(out, 'baseline')} "
          f"(metrics.jsonl, train.log, checkpoints); total time {time.time() - t0:.0f}s")
    print("[demo] note: at this toy scale TST is expected to trail the baseline; see docs/results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
