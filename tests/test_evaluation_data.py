"""What the trainer evaluates on, checked against `transformers` on megatron-core's own samples.

* The test split is evaluated once at the end of training, as Megatron-LM does: a TST run (s=4,
  switch at 4 of 12) with --split 80,10,10 is exported to Hugging Face (LlamaForCausalLM), and its
  logged test loss is recomputed independently: megatron-core's GPTDataset test split (the
  samples a plain Megatron run tests on) fed through `transformers`, one masked mean per
  micro-batch, then the mean. A resume at the end evaluates again and leaves one test record.
* --train-data-path / --valid-data-path / --test-data-path: the train stream is the one of
  --data-path with all of that data in the train split, and the validation and test losses are
  those of the exported model on megatron's validation / test datasets of the other two corpora.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from trainer_utils import (GBS, MBS, REPO, SEQ, TRAIN_ITERS, assert_ok, base_args, eval_records,  # noqa: E402
                           make_data, run_trainer, train_records)

EVAL_ITERS = 2
LLAMA = {"swiglu": True, "disable_bias_linear": True, "normalization": "RMSNorm"}


def _export(save, hf) -> str:
    out = subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), "export", "--load",
                          str(save), "--output", str(hf)], cwd=str(REPO), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return str(hf)


def _test_records(records):
    return [r for r in records if r.get("type") == "test"]


def _reference_loss(hf_dir: str, which: int, sizes, cache: str, **data) -> float:
    """megatron's GPTDataset split `which` (0 train, 1 validation, 2 test; seed 1234, length SEQ,
    `sizes` samples requested as the trainer requests them), the exported model's next-token loss on
    its first EVAL_ITERS x GBS samples: one masked mean per micro-batch, then the mean."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from tst_megatron.tokenizers import build_tokenizer

    config = GPTDatasetConfig(random_seed=1234, sequence_length=SEQ, tokenizer=build_tokenizer("NullTokenizer", None, 256),
                              reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
                              create_attention_mask=False, path_to_cache=cache, **data)
    dataset = BlendedMegatronDatasetBuilder(GPTDataset, list(sizes), lambda: True, config).build()[which]
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    losses = []
    with torch.no_grad():
        for start in range(0, EVAL_ITERS * GBS, MBS):
            items = [dataset[i] for i in range(start, start + MBS)]
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

    hf = _export(save, tmp_path / "hf")
    reference = _reference_loss(hf, 2, [1, 1, EVAL_ITERS * GBS], str(tmp_path / "ref_cache"),  # Megatron's test count
                                blend=([prefix], None), split="80,10,10")
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


def test_per_split_data_paths(tmp_path):
    train = make_data(str(tmp_path / "train"), num_docs=300, seed=0)
    valid = make_data(str(tmp_path / "valid"), num_docs=60, seed=5)
    test = make_data(str(tmp_path / "test"), num_docs=60, seed=9)

    def per_split(**kw):
        args = base_args(train, split=None, eval_iters=EVAL_ITERS, **LLAMA, **kw)
        args[args.index("--data-path")] = "--train-data-path"
        return args

    whole = assert_ok(run_trainer(base_args(train, split="100,0,0", eval_iters=0, **LLAMA,
                                            metrics_path=tmp_path / "whole.jsonl")))
    save = tmp_path / "ckpt"
    res = assert_ok(run_trainer(per_split(save=save, save_interval=TRAIN_ITERS)
                                + ["--valid-data-path", valid, "--test-data-path", test]))
    # the train stream: --data-path with every document in the train split
    got, want = train_records(res.records), train_records(whole.records)
    assert sorted(got) == list(range(1, TRAIN_ITERS + 1))
    assert [got[i]["loss"] for i in sorted(got)] == [want[i]["loss"] for i in sorted(want)]

    hf = _export(save, tmp_path / "hf")
    cache = str(tmp_path / "ref_cache")
    n_valid = (TRAIN_ITERS // 4 + 1) * EVAL_ITERS * GBS  # Megatron-LM's count: --eval-interval 4 and the end
    val = eval_records(res.records)[TRAIN_ITERS]["val_lm_loss"]
    assert val == pytest.approx(_reference_loss(hf, 1, [1, n_valid, 1], cache, blend_per_split=[None, ([valid], None), None]),
                                abs=1e-4)
    tst = _test_records(res.records)[0]["test_lm_loss"]
    assert tst == pytest.approx(_reference_loss(hf, 2, [1, 1, EVAL_ITERS * GBS], cache,
                                                blend_per_split=[None, None, ([test], None)]), abs=1e-4)
    assert abs(val - tst) > 1e-3  # two corpora, two losses


@pytest.mark.parametrize("extra, message", [
    (["--data-path", "x"], "give --data-path (cut by --split) or --train-data-path / --valid-data-path / "
                           "--test-data-path, not both"),
    (["--split", "90,10,0"], "--split 90,10,0 cuts --data-path; with --train-data-path / --valid-data-path / "
                             "--test-data-path each split is its own data: drop --split"),
])
def test_per_split_data_paths_refusals(extra, message):
    from tst_megatron.arguments import parse_args, validate

    with pytest.raises(SystemExit) as exc:
        validate(parse_args(["--train-data-path", "a", "--vocab-size", "256"] + extra), 1)
    assert str(exc.value.code) == f"error: {message}"
    with pytest.raises(SystemExit) as exc:
        validate(parse_args(["--valid-data-path", "a", "--vocab-size", "256"]), 1)
    assert str(exc.value.code) == "error: --valid-data-path / --test-data-path need --train-data-path (the data to train on)"
