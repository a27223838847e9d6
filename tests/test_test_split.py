"""The test split: evaluated once at the end of training, as Megatron-LM does.

A TST run (s=4, switch at 4 of 12) with --split 80,10,10 is exported to Hugging Face
(LlamaForCausalLM), and its logged test loss is recomputed independently: megatron-core's own
GPTDataset test split (the samples a plain Megatron run tests on), fed through `transformers`,
cross-entropy per micro-batch averaged as Megatron averages evaluation losses. A resume at the
end evaluates again and leaves one test record, with the same value.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from trainer_utils import GBS, MBS, REPO, SEQ, TRAIN_ITERS, assert_ok, base_args, make_data, run_trainer  # noqa: E402

EVAL_ITERS = 2
LLAMA = {"swiglu": True, "disable_bias_linear": True, "normalization": "RMSNorm"}


def _test_records(records):
    return [r for r in records if r.get("type") == "test"]


def _reference_test_loss(prefix: str, hf_dir: str) -> float:
    """Megatron's test split (seed 1234, length SEQ, split 80,10,10, eval_iters x GBS samples),
    the exported model's next-token loss on it, one masked mean per micro-batch, then the mean."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from tst_megatron.tokenizers import build_tokenizer

    config = GPTDatasetConfig(random_seed=1234, sequence_length=SEQ, blend=([prefix], None), split="80,10,10",
                              tokenizer=build_tokenizer("NullTokenizer", None, 256), reset_position_ids=False,
                              reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
                              path_to_cache=os.path.join(os.path.dirname(prefix), "ref_cache"))
    n_test = EVAL_ITERS * GBS  # Megatron-LM's test sample count
    _, _, test = BlendedMegatronDatasetBuilder(GPTDataset, [1, 1, n_test], lambda: True, config).build()
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    losses = []
    with torch.no_grad():
        for start in range(0, n_test, MBS):
            items = [test[i] for i in range(start, start + MBS)]
            tokens = torch.stack([it["tokens"] for it in items]).long()
            labels = torch.stack([it["labels"] for it in items]).long()
            mask = torch.stack([it["loss_mask"] for it in items]).float()
            logits = model(input_ids=tokens).logits.float()
            ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                   reduction="none").reshape(labels.shape)
            losses.append(float((ce * mask).sum() / mask.sum()))
    return sum(losses) / len(losses)


def test_test_split_evaluated_at_the_end_against_transformers(tmp_path):
    prefix = make_data(str(tmp_path / "data"), num_docs=400)
    save = tmp_path / "ckpt"
    args = base_args(prefix, split="80,10,10", eval_iters=EVAL_ITERS, save=save, save_interval=TRAIN_ITERS,
                     **LLAMA)
    res = assert_ok(run_trainer(args))
    tests = _test_records(res.records)
    assert [r["iteration"] for r in tests] == [TRAIN_ITERS], tests
    loss = tests[0]["test_lm_loss"]
    line = f" validation loss at iteration {TRAIN_ITERS} on test set | lm loss value: {loss:.6E} |"
    assert line in res.stdout, res.stdout[-3000:]
    # the validation split is another set of documents: its loss is not the test loss
    final_val = [r for r in res.records if r.get("type") == "eval" and r["iteration"] == TRAIN_ITERS]
    assert len(final_val) == 1 and final_val[0]["val_lm_loss"] != loss

    hf = tmp_path / "hf"
    out = subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), "export", "--load",
                          str(save), "--output", str(hf)], cwd=str(REPO), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    reference = _reference_test_loss(prefix, str(hf))
    assert abs(loss - reference) < 1e-4, (loss, reference)

    # resumed at the end: both evaluations run again; the metrics keep one record of each
    again = assert_ok(run_trainer(args[:args.index("--save")] + ["--load", str(save)] + args[args.index("--save"):]))
    tests = _test_records(again.records)
    assert [r["iteration"] for r in tests] == [TRAIN_ITERS], tests
    assert tests[0]["test_lm_loss"] == pytest.approx(loss, abs=1e-6)


def test_no_test_documents_no_test_evaluation(tmp_path):
    """--split with a test weight of 0 (what the examples use): nothing to evaluate, no record."""
    prefix = make_data(str(tmp_path / "data"), num_docs=200)
    res = assert_ok(run_trainer(base_args(prefix, train_iters=4, tst_superposition_iters=2,
                                          metrics_path=tmp_path / "m.jsonl")))
    assert "on test set" not in res.stdout
    assert not _test_records(res.records)
