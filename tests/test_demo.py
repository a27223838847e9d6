"""The README's main-job command (`make demo` = `python -m tst_megatron.demo`), shrunk.

Every step runs for real, as `make demo` runs it: the stdlib corpus, the SentencePiece tokenizer,
preprocessing through megatron's IndexedDatasetBuilder, a TST run and its baseline through
pretrain_tst.py, and the plot; only the sizes are small (corpus, vocabulary, iterations).
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_demo_end_to_end_small(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "tst_megatron.demo", "--out", str(out), "--train-iters", "6",
                          "--corpus-bytes", "2000000", "--vocab-size", "512",
                          "--split", "90,10,0"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    text = res.stdout + res.stderr
    assert res.returncode == 0, text[-4000:]

    # the two final losses and where the outputs are, as the README promises
    tst = re.search(r"TST \(s=4, r=0.3\): ([\d.]+)", text)
    base = re.search(r"baseline:\s+([\d.]+)", text)
    assert tst and base, text[-3000:]
    png = out / "tst_vs_baseline.png"
    assert f"[demo] plot: {png}" in text
    # the echoed training lines keep what is worth watching (the loss, not cut off before it)
    echoed = [x for x in text.splitlines() if x.lstrip().startswith("iteration ")]
    assert echoed and all(" loss: " in x and "tokens/s: " in x and "ETA: " in x for x in echoed), echoed
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    # the printed numbers are the runs' last evaluations; the TST run had both phases, the
    # baseline only next-token steps, with the same iterations, batch and schedule
    runs = {name: _records(out / name / "metrics.jsonl") for name in ("tst", "baseline")}
    for name, value in (("tst", float(tst.group(1))), ("baseline", float(base.group(1)))):
        evals = [r for r in runs[name] if r["type"] == "eval"]
        assert evals and evals[-1]["iteration"] == 6 and math.isfinite(evals[-1]["val_lm_loss"])
        assert abs(evals[-1]["val_lm_loss"] - value) < 1e-4, (name, evals[-1], value)
    phases = {name: [r["phase"] for r in recs if r["type"] == "train"] for name, recs in runs.items()}
    assert "superposition" in phases["tst"] and phases["tst"][-1] == "recovery", phases
    assert set(phases["baseline"]) == {"recovery"}, phases
    assert os.path.isfile(out / "tst" / "latest_checkpointed_iteration.txt")


def test_readme_integration_snippet_names_real_arguments():
    """The README's pretrain_gpt.py snippet calls the package with keyword arguments its functions
    take (a renamed or dropped parameter would leave users a TypeError)."""
    import ast
    import inspect

    from megatron.core.models.gpt import GPTModel

    from tst_megatron.config import TSTConfig
    from tst_megatron.data import build_tst_datasets
    from tst_megatron.model import TSTGPTModel

    with open(os.path.join(REPO, "README.md")) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    assert blocks
    accepted = {"build_tst_datasets": set(inspect.signature(build_tst_datasets).parameters),
                "TSTConfig": set(inspect.signature(TSTConfig).parameters),
                "TSTGPTModel": set(inspect.signature(GPTModel.__init__).parameters) | {"bag_weights"}}
    assert "bag_weights" in inspect.signature(TSTGPTModel.__init__).parameters
    seen = set()
    for node in ast.walk(ast.parse("\n".join(blocks))):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in accepted:
            seen.add(node.func.id)
            unknown = {k.arg for k in node.keywords} - accepted[node.func.id]
            assert not unknown, f"README calls {node.func.id} with {sorted(unknown)}"
    assert seen == set(accepted)
