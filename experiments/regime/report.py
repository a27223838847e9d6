#!/usr/bin/env python
"""One table and one figure for the whole regime study (every sweep of grid.sh).

Reads every `summary*.json` that `run.py` wrote under --out (and --extra dirs, e.g. the second
seed's), merges their rows (a pair run by two sweeps is listed once), recomputes the derived
columns from the metrics files, and writes

  * report.md  -- the table for docs/results.md, grouped by what each sweep varies;
  * report.png -- (1) final validation loss gap TST - baseline against model width, (2) what one
    superposition step was worth in baseline steps (see run._transfer) against width, tokens per
    step and run length, (3) validation next-token loss curves of the hidden-128 pairs around the
    switch, with the baseline curve shifted right by the superposition length (a "late-started
    baseline") -- where a TST curve lies above that shifted curve, the superposition phase left the
    model worse than a fresh initialisation.

    python experiments/regime/report.py --out outputs/regime --extra outputs/regime_seed2
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
from typing import Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "tools"))

import run as regime  # noqa: E402


def _key(row: dict, data_path) -> Tuple:
    """A pair: its settings and its corpus (two sweeps of one shape on two corpora are two rows)."""
    return (row["width"], row["gbs"], row["iters"], row["lr"], row["seed"], row["s"], row["r"], str(data_path))


def load_rows(dirs: List[str]) -> Tuple[List[dict], dict]:
    """Unique rows of every summary*.json in `dirs`, metrics paths made absolute."""
    rows: Dict[Tuple, dict] = {}
    refs: dict = {}
    for d in dirs:
        for path in sorted(glob.glob(os.path.join(d, "summary*.json"))):
            with open(path) as f:
                summary = json.load(f)
            if len(summary["references"]["count_model_mce"]) > len(refs.get("count_model_mce", {})):
                refs = summary["references"]
            # metrics paths are relative to the run.py --out that wrote them (the summary records it);
            # grid.sh keeps copies of some summaries elsewhere, so look there and beside the copy --
            # never in another sweep's directory, whose runs of the same name may be of another corpus
            out = summary.get("args", {}).get("out")
            roots = [os.path.dirname(path)] + ([out, os.path.join(REPO, out)] if out else [])
            data_path = summary.get("data", {}).get("data_path")
            for row in summary["rows"]:
                row = dict(row)
                for k in ("tst_metrics", "base_metrics"):
                    row[k] = next((os.path.join(d, row[k]) for d in roots if os.path.isfile(os.path.join(d, row[k]))),
                                  os.path.join(roots[0], row[k]))
                if os.path.isfile(row["tst_metrics"]) and os.path.isfile(row["base_metrics"]):
                    rows[_key(row, data_path)] = row
    out = sorted(rows.values(), key=lambda r: (r["iters"], r["gbs"], r["width"], r["seed"], r["s"], r["r"]))
    for row in out:  # derived columns from the metrics themselves (older summaries lack some)
        sup = int(math.floor(row["r"] * row["iters"] + 1e-9))
        row["transfer"] = regime._transfer(row["speedup"], row["iters"], sup)
        row["bag_loss_at_switch"] = regime._bag_loss_at_switch(row["tst_metrics"], sup)
    return out, refs


def late_train_loss(metrics_path: str, fraction: float = 0.1):
    """Mean training LM loss over the last `fraction` of iterations. While no token has been seen
    twice (first epoch) every training batch is unseen data, so this is a held-out loss on the
    training distribution -- a check on a validation split that differs from it (the validation
    split is the last 2% of documents, often one package of a code corpus)."""
    recs = [json.loads(line) for line in open(metrics_path)]
    train = [r for r in recs if r.get("type") == "train" and r.get("loss_kind", "lm") == "lm"]
    if not train:
        return None
    last = train[-1]["iteration"]
    vals = [r["loss"] for r in train if r["iteration"] > last * (1 - fraction)]
    return sum(vals) / len(vals) if vals else None


def markdown(rows: List[dict], refs: dict) -> str:
    lines = [f"Unigram entropy {refs['unigram_entropy']:.3f} nats; count-model next-bag MCE "
             + ", ".join(f"s={s}: {v:.3f}" for s, v in sorted(refs["count_model_mce"].items(), key=lambda x: int(x[0])))
             + ".", "",
             "| width | tokens/step | iters | LR | seed | s | r | val LM TST | val LM base | TST − base | "
             "equal-loss speedup | superposition step worth | bag loss at switch | LM after switch (base same iter) | "
             "train LM last 10% TST − base |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speed = "not reached (TST better)" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        worth = "> 1" if r["transfer"] is None else f"{r['transfer']:+.2f}"
        f = regime._fmt
        lines.append(f"| {r['width']} | {r['tokens_per_step']} | {r['iters']} | {r['lr']:g} | {r['seed']} | {r['s']} | "
                     f"{r['r']:g} | {f(r['val_lm_tst'])} | {f(r['val_lm_base'])} | **{r['delta']:+.3f}** | {speed} | "
                     f"{worth} | {f(r['bag_loss_at_switch'])} | {f(r['val_lm_after_switch'])} "
                     f"({f(r['base_at_same_iter'])}) | {_late_delta(r)} |")
    return "\n".join(lines) + "\n"


def _late_delta(r: dict) -> str:
    t, b = late_train_loss(r["tst_metrics"]), late_train_loss(r["base_metrics"])
    return "-" if t is None or b is None else f"{t - b:+.3f} ({t:.3f} vs {b:.3f})"


def plot_gap_vs_width(ax, rows: List[dict], xlabel: str) -> None:
    """Final validation loss gap TST - baseline against width, one line per (s, r)."""
    for s in sorted({r["s"] for r in rows}):
        for ratio in sorted({r["r"] for r in rows}):
            pts = sorted((r["width"], r["delta"]) for r in rows if r["s"] == s and r["r"] == ratio)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"s={s}, r={ratio:g}")
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("final val LM loss: TST − baseline (nats)")
    ax.set_title("Equal-FLOPs gap (below 0 = TST wins)")
    ax.legend(fontsize=7)


def figure(rows: List[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    std = [r for r in rows if r["gbs"] == 16 and r["iters"] == 400 and r["seed"] == 1234]
    plot_gap_vs_width(axes[0], std, "hidden size (4 layers, 2,048 tokens/step, 400 steps)")

    ax = axes[1]
    labels = []
    for i, r in enumerate(rows):
        if r["transfer"] is None:
            continue
        tag = f"w{r['width']} {r['tokens_per_step'] // 1024}k/st {r['iters']}it s{r['s']} r{r['r']:g}" + (
            f" seed{r['seed']}" if r["seed"] != 1234 else "")
        color = {2: "tab:blue", 4: "tab:orange", 8: "tab:green"}.get(r["s"], "tab:gray")
        ax.barh(len(labels), r["transfer"], color=color)
        labels.append(tag)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=6)
    ax.axvline(1.0, color="k", ls="--", lw=0.8)
    ax.axvline(0.0, color="k", lw=0.8)
    ax.set_xlabel("one superposition step worth, in baseline steps (1 = break-even)")
    ax.set_title("What the superposition phase bought")

    ax = axes[2]
    seen = set()
    for r in [r for r in std if r["width"] == 128 and r["r"] in (0.05, 0.3) and r["s"] in (2, 4)]:
        bx, by = regime._curve(r["base_metrics"])
        if r["base_metrics"] not in seen:
            ax.plot(bx, by, color="k", lw=1.5, label="baseline")
            seen.add(r["base_metrics"])
        tx, ty = regime._curve(r["tst_metrics"])
        ax.plot(tx, ty, marker=".", label=f"TST s={r['s']} r={r['r']:g}")
        sup = int(math.floor(r["r"] * r["iters"] + 1e-9))
        if (r["base_metrics"], sup) not in seen:  # the baseline as if it had started at the switch
            seen.add((r["base_metrics"], sup))
            keep = [i for i, x in enumerate(bx) if x + sup <= r["iters"]]
            ax.plot([bx[i] + sup for i in keep], [by[i] for i in keep], ls=":", color="gray", lw=1.2,
                    label=f"baseline started at {sup}")
    ax.set_ylim(3.6, 6.5)
    ax.set_xlabel("iteration")
    ax.set_ylabel("validation next-token loss")
    ax.set_title("Hidden 128: recovery after the switch")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(REPO, "outputs", "regime"))
    p.add_argument("--extra", nargs="*", default=[], help="more run.py output dirs (e.g. a second seed's)")
    a = p.parse_args(argv)
    rows, refs = load_rows([a.out, *a.extra])
    if not rows:
        raise SystemExit(f"report: no summary*.json with existing runs under {a.out}; run grid.sh / run.py first")
    table = markdown(rows, refs)
    with open(os.path.join(a.out, "report.md"), "w") as f:
        f.write(table)
    with open(os.path.join(a.out, "report.json"), "w") as f:
        json.dump({"references": refs, "rows": rows}, f, indent=1)
    print(table)
    try:
        figure(rows, os.path.join(a.out, "report.png"))
        print(f"[report] figure: {os.path.join(a.out, 'report.png')}")
    except ImportError:
        print("[report] matplotlib not installed: no figure (pip install -e '.[plot]')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
