"""Megatron-LM's data-loading flags: --data-args-path / --per-split-data-args-path (the data lists
read from files), --no-mmap-bin-files, --num-dataset-builder-threads, --mid-level-dataset-surplus.

References: the lists typed on the command line, and the datasets the default flags build (plain
reads give the very samples memory-mapping gives).
"""
from __future__ import annotations

import json

import pytest
import torch

from tst_megatron.arguments import parse_args

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

BASE = ["--vocab-size", "256"]


def test_data_args_files_are_the_typed_lists(tmp_path):
    blend = tmp_path / "blend.txt"
    blend.write_text("0.3 /data/a_text_document\n0.7\t/data/b_text_document\n")
    typed = parse_args(BASE + ["--data-path", "0.3", "/data/a_text_document", "0.7", "/data/b_text_document"])
    assert parse_args(BASE + ["--data-args-path", str(blend)]).data.data_path == typed.data.data_path
    per_split = tmp_path / "splits.json"
    per_split.write_text(json.dumps({"train": ["0.5", "/d/a", "0.5", "/d/b"], "valid": "/d/v", "test": ["/d/t"]}))
    cfg = parse_args(BASE + ["--per-split-data-args-path", str(per_split)])
    typed = parse_args(BASE + ["--train-data-path", "0.5", "/d/a", "0.5", "/d/b", "--valid-data-path", "/d/v",
                               "--test-data-path", "/d/t"])
    assert [cfg.data.train_data_path, cfg.data.valid_data_path, cfg.data.test_data_path] == \
        [typed.data.train_data_path, typed.data.valid_data_path, typed.data.test_data_path]


@pytest.mark.parametrize("content, argv, message", [
    ("a b", ["--data-path", "x"], "give --data-path or --data-args-path (a file holding that list), not both"),
    ("  \n", [], "--data-args-path {f}: the file is empty; it should hold the --data-path list"),
    (None, [], "--data-args-path {f}: cannot read it (No such file or directory)"),
    ("a b", ["--train-data-path", "x"], "--data-args-path holds a --data-path list (cut by --split); it cannot go "
                                        "with --train-/--valid-/--test-data-path, --per-split-data-args-path or "
                                        "--mock-data: give one"),
])
def test_data_args_path_refusals(tmp_path, content, argv, message):
    f = tmp_path / "blend.txt"
    if content is not None:
        f.write_text(content)
    with pytest.raises(SystemExit) as exc:
        parse_args(BASE + argv + ["--data-args-path", str(f)])
    assert str(exc.value.code) == "error: " + message.format(f=f)


@pytest.mark.parametrize("content, argv, message", [
    ('{"train": ["/d/a"]}', ["--train-data-path", "/d/x"],
     "give --train-/--valid-/--test-data-path or --per-split-data-args-path (a file holding them), not both"),
    ('{"train": ["/d/a"', [], "--per-split-data-args-path {f}: not valid JSON"),
    ('{"training": ["/d/a"]}', [], '--per-split-data-args-path {f}: expected an object with the keys "train" (the '
                                   'data to train on), "valid", "test" (got [\'training\'])'),
    ('{"valid": ["/d/a"]}', [], '--per-split-data-args-path {f}: expected an object with the keys "train"'),
    ('["/d/a"]', [], '--per-split-data-args-path {f}: expected an object with the keys "train" (the data to train '
                     'on), "valid", "test" (got list)'),
    ('{"train": ["/d/a"]}', ["--data-path", "/d/x"], "--per-split-data-args-path holds the --train-/--valid-/"
                                                     "--test-data-path lists; it cannot go with --data-path"),
    ('{"train": []}', [], '--per-split-data-args-path {f}: "train" must be a non-empty list (or string) of prefixes'),
])
def test_per_split_data_args_path_refusals(tmp_path, content, argv, message):
    f = tmp_path / "splits.json"
    f.write_text(content)
    with pytest.raises(SystemExit) as exc:
        parse_args(BASE + argv + ["--per-split-data-args-path", str(f)])
    assert str(exc.value.code).startswith("error: " + message.format(f=f)), exc.value.code


def test_dataset_flags_reach_megatron_core(tmp_path, monkeypatch):
    """The flags land in megatron-core's GPTDatasetConfig; plain reads of the .bin file give the
    samples memory-mapping gives; a run given its data through --data-args-path builds the same."""
    from test_megatron_compat import _datasets

    monkeypatch.chdir(tmp_path)
    default = _datasets(tmp_path)
    flagged = _datasets(tmp_path, "--no-mmap-bin-files", "--num-dataset-builder-threads", "2",
                        "--mid-level-dataset-surplus", "0.01")
    base = flagged.train.base
    assert (base.config.mmap_bin_files, base.config.num_dataset_builder_threads,
            base.config.mid_level_dataset_surplus) == (False, 2, 0.01)
    assert base.dataset.mmap is False and default.train.base.dataset.mmap is True
    for split in ("train", "valid_lm", "valid_mce"):
        a, b = getattr(default, split), getattr(flagged, split)
        assert len(a) == len(b)
        for index in range(len(a)):
            assert all(torch.equal(a[index][k], b[index][k]) for k in a[index]), (split, index)
    (tmp_path / "blend.txt").write_text(str(tmp_path / "eod"))
    from_file = _datasets(tmp_path, "--data-args-path", str(tmp_path / "blend.txt"))
    assert torch.equal(from_file.train[0]["tokens"], default.train[0]["tokens"])


@pytest.mark.parametrize("argv, message", [
    (["--num-dataset-builder-threads", "0"], "--num-dataset-builder-threads must be >= 1 (got 0)"),
    (["--mid-level-dataset-surplus", "-0.1"], "--mid-level-dataset-surplus must be a finite number >= 0 (got -0.1)"),
])
def test_dataset_flag_refusals(argv, message):
    from tst_megatron.arguments import validate

    with pytest.raises(SystemExit) as exc:
        validate(parse_args(BASE + ["--data-path", "x"] + argv), 1)
    assert str(exc.value.code) == "error: " + message
