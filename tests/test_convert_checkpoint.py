"""tools/convert_checkpoint.py end to end: trainer checkpoints <-> Hugging Face `transformers`.

Four tiny models are trained by the trainer (`tst_megatron.trainer.main`, i.e. pretrain_tst.py)
on 2 Gloo ranks through the TST switch (superposition iterations [0, 4) of 6, checkpoints at 3
(superposition) and 6 (recovery)):

    llama  GQA, no QK-norm, untied                                   TP=2  -> LlamaForCausalLM
    qwen3  QK-norm, MHA, tied, head_dim 24 != h/heads, ffn 96,
           rms eps 1e-6, rope base 1e6                               TP=2  -> Qwen3ForCausalLM
    moe    QK-norm, GQA, 4 experts top-2 (pre-softmax routing),
           MoE in layer 0 only (--moe-layer-freq 2)                   EP=2  -> Qwen3MoeForCausalLM
    llama_pp  the llama model saved with pipeline parallelism        PP=2  -> LlamaForCausalLM
              (one layer per stage: layer 1 lives on stage 1 as its local layer 0)

Export (single process, resharded to TP=PP=EP=1) is checked against transformers: logits of the
HF model equal the megatron model's (the same checkpoint loaded at TP=1 in-process) within 1e-4
and 20 greedy tokens agree. Import of the export, continued for one iteration by the trainer,
gives the loss that continuing the original checkpoint gives (both with --no-load-optim: the loss
of a step is computed before its update, so it depends on the weights and the data only).

Launches cost 5-15 s each on 2 CPU cores, so they are grouped: ONE torchrun trains the four
models and continues each original for one iteration (the runs go one after another in the same
two processes); ONE torchrun continues the four imports.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import trainer_utils  # noqa: E402
from tst_megatron import convert as cv  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "convert_checkpoint.py"
K, SUP, SAVE_EVERY = 6, 4, 3  # iterations trained, superposition iterations, save interval
PROMPT_LEN, NEW_TOKENS = 8, 20

# Batch / data / TST flags shared by every run (model flags per model below).
RUN = ["--seq-length", "32", "--micro-batch-size", "4", "--global-batch-size", "8", "--lr", "1e-2",
       "--log-interval", "1", "--eval-iters", "1", "--split", "90,10,0", "--seed", "1234",
       "--tokenizer-type", "NullTokenizer", "--vocab-size", "256",
       "--tst-bag-size", "4", "--tst-superposition-iters", str(SUP)]
SHAPE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--swiglu",
         "--normalization", "RMSNorm", "--disable-bias-linear"]

# name -> (model flags, layout trained in, layout the import continues in, HF architecture)
MODELS = {
    "llama": (["--untie-embeddings-and-output-weights", "--group-query-attention", "--num-query-groups", "2"],
              ["--tensor-model-parallel-size", "2"], ["--tensor-model-parallel-size", "2"],
              "LlamaForCausalLM"),
    "qwen3": (["--qk-layernorm", "--kv-channels", "24", "--ffn-hidden-size", "96", "--norm-epsilon", "1e-6",
               "--rotary-base", "1000000"],
              ["--tensor-model-parallel-size", "2"], ["--tensor-model-parallel-size", "1"],  # TP=1 DP=2
              "Qwen3ForCausalLM"),
    "moe": (["--untie-embeddings-and-output-weights", "--qk-layernorm", "--group-query-attention",
             "--num-query-groups", "2", "--num-experts", "4", "--moe-router-topk", "2",
             "--moe-ffn-hidden-size", "32", "--moe-layer-freq", "2", "--moe-router-pre-softmax"],
            ["--expert-model-parallel-size", "2"], ["--expert-model-parallel-size", "2"],
            "Qwen3MoeForCausalLM"),
    "llama_pp": (["--untie-embeddings-and-output-weights", "--group-query-attention", "--num-query-groups", "2"],
                 ["--pipeline-model-parallel-size", "2"], ["--pipeline-model-parallel-size", "2"],
                 "LlamaForCausalLM"),
}
# variants whose import continues in the layout the original was trained (and continues) in
SAME_LAYOUT = [name for name, (_, layout, cont, _) in MODELS.items() if layout == cont]

# Runs several trainer invocations one after another in the same torchrun processes. The first
# initialises the process group itself (env://, as pretrain_tst.py does); later ones get a fresh
# group on the launcher's store under their own key prefix (re-running env:// init in a process
# would reuse the first group's rendezvous keys).
LAUNCHER = '''
import json, os, sys
if __name__ == "__main__":  # guard: torch_dist's writer spawns a helper that imports __main__
    import torch.distributed as dist
    from tst_megatron.trainer import main
    runs = json.load(open(sys.argv[1]))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = None
    for i, argv in enumerate(runs):
        if i:
            if store is None:
                store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                                      is_master=False)
            dist.init_process_group("gloo", store=dist.PrefixStore(f"run{i}", store), rank=rank,
                                    world_size=world)
        rc = main(argv)
        if rc:
            sys.exit(rc)
'''


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def _env():
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def _run(cmd, timeout: float):
    """Run a command in its own session; on timeout end that session (only what we started)."""
    proc = subprocess.Popen(cmd, cwd=str(REPO), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(map(str, cmd[:6]))} ... timed out after {timeout:.0f}s\n{trainer_utils.tail(out)}")
    return proc.returncode, out


def _torchrun(runs, workdir: Path, timeout: float = 300.0) -> str:
    """All `runs` (pretrain_tst.py argv lists) on 2 Gloo ranks in one launch; returns the output."""
    script, spec = workdir / "launch_runs.py", workdir / f"runs_{time.time_ns()}.json"
    script.write_text(LAUNCHER)
    spec.write_text(json.dumps(runs))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(trainer_utils.free_port()), str(script), str(spec)]
    rc, out = _run(cmd, timeout)
    assert rc == 0, f"trainer runs failed (rc={rc})\n{trainer_utils.tail(out)}"
    return out


def _tool(*args, timeout: float = 240.0):
    return _run([sys.executable, str(TOOL), *map(str, args)], timeout)


def _train_loss(metrics_path: Path, iteration: int) -> float:
    for line in metrics_path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("type") == "train" and rec.get("iteration") == iteration:
            return rec["loss"]
    raise AssertionError(f"{metrics_path}: no train record for iteration {iteration}")


def _prompt():
    return torch.randint(0, 200, (2, PROMPT_LEN), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def _megatron_logits(model, ids):
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    return model(ids, pos, None)


@torch.no_grad()
def _megatron_greedy(model, ids, n):
    margins = []
    for _ in range(n):
        last = _megatron_logits(model, ids)[:, -1]
        top2 = last.topk(2, dim=-1).values
        margins.append(float((top2[:, 0] - top2[:, 1]).min()))
        ids = torch.cat([ids, last.argmax(-1, keepdim=True)], dim=1)
    return ids, min(margins)


def _load_hf(path, dtype=torch.float32):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    model.generation_config.eos_token_id = None  # compare the plain greedy chains
    return model.eval()


# ----------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Train the four models (TP=2 / EP=2 / PP=2) and continue each original for one iteration."""
    root = tmp_path_factory.mktemp("convert")
    data = trainer_utils.make_data(str(root / "data"), num_docs=300, doc_lengths=(40, 200))
    runs = []
    for name, (model_flags, layout, _, _) in MODELS.items():
        base = ["--data-path", data] + RUN + SHAPE + model_flags + layout
        # a K+1-iteration run stopped after K (the trainer refuses to resume another --train-iters)
        runs.append(base + ["--train-iters", str(K + 1), "--exit-interval", str(K), "--save", str(root / name),
                            "--save-interval", str(SAVE_EVERY), "--metrics-path", str(root / f"{name}.jsonl")])
        runs.append(base + ["--train-iters", str(K + 1), "--load", str(root / name), "--no-load-optim",
                            "--metrics-path", str(root / f"{name}_continued.jsonl")])
    out = _torchrun(runs, root)
    for name in MODELS:
        assert (root / name / "iter_0000003").is_dir() and (root / name / "iter_0000006").is_dir(), trainer_utils.tail(out)
    return {"root": root, "data": data}


@pytest.fixture(scope="module")
def exports(trained):
    """name -> export summary; llama through the command line (with its progress bar)."""
    root, done = trained["root"], {}

    def get(name):
        if name not in done:
            out_dir = root / f"hf_{name}"
            if name == "llama":
                rc, out = _tool("export", "--load", root / name, "--output", out_dir)
                assert rc == 0, out
                assert "export 3/3" in out and "LlamaForCausalLM" in out, out  # tqdm stages + summary
                done[name] = {"output": str(out_dir), "architecture": "LlamaForCausalLM"}
            else:
                done[name] = cv.export_checkpoint(str(root / name), str(out_dir), progress=False, log=None)
        return done[name]

    return get


# ----------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------

def test_superposition_checkpoint_refused(trained, tmp_path):
    root = trained["root"]
    out_dir = tmp_path / "hf"
    rc, out = _tool("export", "--load", root / "llama", "--iteration", 3, "--output", out_dir)
    assert rc == 2, out
    assert "superposition phase" in out and "--allow-superposition-checkpoint" in out, out
    assert not out_dir.exists()
    # the iteration directory itself is refused the same way; the flag lets it through
    with pytest.raises(cv.ConversionError, match="superposition phase"):
        cv.export_checkpoint(str(root / "llama" / "iter_0000003"), str(out_dir), progress=False, log=None)
    res = cv.export_checkpoint(str(root / "llama" / "iter_0000003"), str(out_dir),
                               allow_superposition=True, progress=False, log=None)
    assert res["iteration"] == 3 and res["phase"] == "superposition"
    assert (out_dir / "config.json").is_file() and (out_dir / "model.safetensors").is_file()


@pytest.mark.parametrize("name", list(MODELS))
def test_export_matches_transformers(trained, exports, name):
    root = trained["root"]
    res = exports(name)
    cfg = json.loads(Path(res["output"], "config.json").read_text())
    assert cfg["architectures"] == [MODELS[name][3]]
    meta = json.loads((root / name / "iter_0000006" / "tst_meta.json").read_text())
    assert cfg["vocab_size"] == meta["vocab_size"] and cfg["eos_token_id"] == 256  # NullTokenizer EOD
    assert oct(os.stat(Path(res["output"], "model.safetensors")).st_mode & 0o777) != "0o600"

    ids = _prompt()
    with cv.megatron_session():
        it, path, meta = cv.resolve_checkpoint(str(root / name))
        assert it == K
        model, _ = cv.load_megatron_model(path, meta)
        ref = _megatron_logits(model, ids)
        want, margin = _megatron_greedy(model, ids, NEW_TOKENS)
    hf = _load_hf(res["output"])
    with torch.no_grad():
        got = hf(ids).logits
        gen = hf.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    assert got.shape == ref.shape
    torch.testing.assert_close(got[:, -1], ref[:, -1], rtol=0, atol=1e-4)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
    assert torch.equal(gen, want), (gen, want, f"smallest greedy top-2 margin {margin:.2e}")


def test_sharded_bfloat16_export(trained, exports, tmp_path):
    ref = exports("moe")
    res = cv.export_checkpoint(str(trained["root"] / "moe"), str(tmp_path), max_shard_size="60KB",
                               dtype="bfloat16", progress=False, log=None)
    shards = [f for f in res["files"] if f.startswith("model-")]
    assert len(shards) > 2 and "model.safetensors.index.json" in res["files"]
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    hf = _load_hf(tmp_path, dtype=torch.bfloat16)
    full = _load_hf(ref["output"])
    a, b = hf.state_dict(), full.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k].to(torch.bfloat16)), k


def test_import_then_continue_matches_original(trained, exports):
    """export -> import -> one more iteration == one more iteration of the original checkpoint."""
    root, data = trained["root"], trained["data"]
    runs, results = [], {}
    for name, (_, _, layout, arch) in MODELS.items():
        meta = json.loads((root / name / "iter_0000006" / "tst_meta.json").read_text())
        save = root / f"imported_{name}"
        run_flags = RUN + layout + ["--train-iters", str(K + 1)]
        if name == "llama":  # through the command line
            rc, out = _tool("import", "--hf", exports(name)["output"], "--save", save, "--iteration", K,
                            "--consumed-samples", meta["consumed_samples"], "--no-progress", *run_flags)
            assert rc == 0, out
            line = next(x for x in out.splitlines() if "pretrain_tst.py --load" in x)
            flags = line.split("--no-load-optim", 1)[1].split()
        else:
            res = cv.import_checkpoint(exports(name)["output"], str(save), run_flags, iteration=K,
                                       consumed_samples=meta["consumed_samples"], progress=False, log=None)
            flags = res["flags"]
            assert res["architecture"] == arch
        imported = json.loads((save / "iter_0000006" / "tst_meta.json").read_text())
        assert imported["iteration"] == K and imported["consumed_samples"] == meta["consumed_samples"]
        assert imported["vocab_size"] == meta["vocab_size"] and imported["phase"] == "recovery"
        assert not imported["superposition_checkpoint"] and imported["superposition_iters"] == SUP
        results[name] = imported
        # only the printed model / tokenizer / TST flags: no model flag of the original command
        runs.append(["--data-path", data] + RUN + layout + flags +
                    ["--train-iters", str(K + 1), "--load", str(save), "--no-load-optim",
                     "--metrics-path", str(root / f"{name}_imported.jsonl")])

    # shape args are stored in the form the trainer compares (defaults stay None)
    assert results["qwen3"]["args"]["model"]["kv_channels"] == 24
    assert results["llama"]["args"]["model"]["ffn_hidden_size"] is None
    assert results["moe"]["args"]["model"]["moe_layer_freq"] == 2

    out = _torchrun(runs, root)
    for name in MODELS:
        want = _train_loss(root / f"{name}_continued.jsonl", K + 1)
        got = _train_loss(root / f"{name}_imported.jsonl", K + 1)
        if name in SAME_LAYOUT:
            # llama (TP=2), moe (EP=2), llama_pp (PP=2) continue in the layout they were trained in:
            # export/import only permutes and concatenates fp32 tensors, and the same layout runs
            # the same kernels in the same reduction order, so the loss is bitwise the same.
            assert got == want, (name, got, want, trainer_utils.tail(out, 2000))
        else:
            # qwen3 continues at TP=1 DP=2 instead of TP=2: the row-parallel all-reduce and the
            # vocab-parallel cross-entropy sum in another order, so only fp32 rounding may differ.
            assert got == pytest.approx(want, rel=1e-5, abs=1e-6), (name, got, want, trainer_utils.tail(out, 2000))


def test_import_without_batch_flags_then_continue(trained, exports, tmp_path):
    """An import given no --global-batch-size stores none; its printed command plus data and
    batch flags must still continue (the resume once read the missing batch size and crashed)."""
    save = tmp_path / "imported"
    res = cv.import_checkpoint(exports("llama")["output"], str(save),
                               ["--tokenizer-type", "NullTokenizer", "--vocab-size", "256", "--train-iters", str(K + 1)],
                               iteration=K, consumed_samples=16, progress=False, log=None)
    meta = json.loads((save / f"iter_{K:07d}" / "tst_meta.json").read_text())
    assert meta["args"]["optim"]["global_batch_size"] is None and meta["consumed_samples"] == 16
    metrics = tmp_path / "continued.jsonl"
    rc, out = _run([sys.executable, str(REPO / "pretrain_tst.py"), "--load", str(save), "--no-load-optim",
                    *res["flags"], "--data-path", str(trained["data"]), "--seq-length", "32",
                    "--micro-batch-size", "4", "--global-batch-size", "8", "--log-interval", "1", "--eval-iters", "1",
                    "--split", "90,10,0", "--metrics-path", str(metrics)], 240)
    assert rc == 0, out
    assert f"at iteration {K}" in out and _train_loss(metrics, K + 1) < 10

def _copy_ckpt(src: Path, dst: Path, edit, tokenizer_vocab: Optional[int] = None) -> Path:
    """A copy of one iteration directory with its tst_meta.json args edited (no tensors change);
    `tokenizer_vocab`: the size of the tokenizer the edited args name (as a run with it records)."""
    shutil.copytree(src, dst)
    meta_path = dst / "tst_meta.json"
    meta = json.loads(meta_path.read_text())
    edit(meta["args"])
    if tokenizer_vocab is not None:
        meta["tokenizer_vocab_size"] = tokenizer_vocab
    meta_path.write_text(json.dumps(meta))
    return dst


@pytest.mark.parametrize("edit, field", [
    (lambda a: a["model"].update(normalization="LayerNorm"), "normalization"),
    (lambda a: a["model"].update(swiglu=False), "gated_linear_unit"),
    (lambda a: a["model"].update(position_embedding_type="learned_absolute"), "position_embedding_type"),
    (lambda a: a["model"].update(disable_bias_linear=False, qk_layernorm=True), "add_bias_linear"),
])
def test_unrepresentable_config_refused(trained, tmp_path, edit, field):
    src = trained["root"] / "llama" / "iter_0000006"
    ckpt = _copy_ckpt(src, tmp_path / "iter_0000006", edit)
    with pytest.raises(cv.ConversionError, match=f"cannot represent {field}"):
        cv.export_checkpoint(str(ckpt), str(tmp_path / "hf"), progress=False, log=None)
    assert not (tmp_path / "hf").exists()


def test_huggingface_tokenizer_travels(trained, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {str(i): i for i in range(256)}
    vocab["<|endoftext|>"] = 256
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|endoftext|>"])
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    tok.save(str(tok_dir / "tokenizer.json"))

    def use_hf_tokenizer(args):
        args["data"].update(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(tok_dir / "tokenizer.json"))

    ckpt = _copy_ckpt(trained["root"] / "llama" / "iter_0000006", tmp_path / "iter_0000006", use_hf_tokenizer,
                      tokenizer_vocab=257)
    out = tmp_path / "hf"
    res = cv.export_checkpoint(str(ckpt), str(out), progress=False, log=None)
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(res["files"])
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 256
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.eos_token_id == 256
    assert hf_tok("3 5 7", add_special_tokens=False)["input_ids"] == [3, 5, 7]

    # import without tokenizer flags takes the directory's tokenizer.json and says so
    res = cv.import_checkpoint(str(out), str(tmp_path / "imported"), ["--train-iters", "10"],
                               progress=False, log=None)
    i = res["flags"].index("--tokenizer-type")
    assert res["flags"][i:i + 4] == ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(out)]
    meta = json.loads((tmp_path / "imported" / "iter_0000000" / "tst_meta.json").read_text())
    assert meta["tokenizer_vocab_size"] == 257 and meta["vocab_size"] == 512
    assert "--tokenizer-hf-include-special-tokens" not in res["flags"]
    # ...and exported again into that directory, where its tokenizer now lives: kept, not lost
    before = (out / "tokenizer.json").read_bytes()
    res = cv.export_checkpoint(str(tmp_path / "imported" / "iter_0000000"), str(out), progress=False, log=None)
    assert "tokenizer.json" in res["files"] and (out / "tokenizer.json").read_bytes() == before
    again = transformers.AutoTokenizer.from_pretrained(str(out))
    assert again("3 5 7", add_special_tokens=False)["input_ids"] == [3, 5, 7]

    # a tokenizer that adds BOS (Llama-3 style): the model was pretrained on it, so the continued run
    # is told to encode its data the same way, and the flag travels to the checkpoint and its export
    bos_dir = tmp_path / "hf_bos"
    shutil.copytree(out, bos_dir)
    tok.add_special_tokens(["<bos>"])
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 257)])
    tok.save(str(bos_dir / "tokenizer.json"))
    lines = []
    res = cv.import_checkpoint(str(bos_dir), str(tmp_path / "imported_bos"), ["--train-iters", "10"],
                               progress=False, log=lines.append)
    assert "--tokenizer-hf-include-special-tokens" in res["flags"]
    assert any("adds <bos> to every text" in line and "preprocess_data.py --tokenizer-hf-include-special-tokens"
               in line for line in lines), lines
    meta = json.loads((tmp_path / "imported_bos" / "iter_0000000" / "tst_meta.json").read_text())
    assert meta["args"]["data"]["tokenizer_hf_include_special_tokens"] is True
    lines = []
    cv.export_checkpoint(str(tmp_path / "imported_bos" / "iter_0000000"), str(tmp_path / "hf_bos_again"),
                         progress=False, log=lines.append)
    assert not any("post-processor" in line for line in lines), lines
    config = json.loads((tmp_path / "hf_bos_again" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (257, 256)
    assert json.loads((out / "config.json").read_text())["bos_token_id"] is None  # no BOS in that run's data

    # a tokenizer that only appends an EOS: no flag (--append-eod gives the documents that one)
    eos_dir = tmp_path / "hf_eos"
    shutil.copytree(out, eos_dir)
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="$A <|endoftext|>",
                                                                  special_tokens=[("<|endoftext|>", 256)])
    tok.save(str(eos_dir / "tokenizer.json"))
    lines = []
    res = cv.import_checkpoint(str(eos_dir), str(tmp_path / "imported_eos"), ["--train-iters", "10"],
                               progress=False, log=lines.append)
    assert "--tokenizer-hf-include-special-tokens" not in res["flags"]
    assert any("appends <|endoftext|> to every text" in line for line in lines), lines

    # a NullTokenizer run exported over this directory: the earlier run's tokenizer files go too
    res = cv.export_checkpoint(str(trained["root"] / "llama" / "iter_0000006"), str(out), progress=False, log=None)
    assert "tokenizer.json" not in res["files"]
    assert sorted(os.listdir(out)) == sorted(res["files"])

    # the tokenizer moved: a clear refusal, and --tokenizer-model finds it again
    moved = tmp_path / "moved"
    shutil.move(str(tok_dir), str(moved))
    with pytest.raises(cv.ConversionError, match="--tokenizer-model"):
        cv.export_checkpoint(str(ckpt), str(tmp_path / "hf2"), progress=False, log=None)
    res = cv.export_checkpoint(str(ckpt), str(tmp_path / "hf2"), tokenizer_model=str(moved),
                               progress=False, log=None)
    assert "tokenizer.json" in res["files"]

    # another tokenizer passed for this run's: refused before anything is written
    vocab["<|pad|>"] = 257
    other = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="0"))
    other.save(str(tmp_path / "other.json"))
    with pytest.raises(cv.ConversionError, match="has 258 tokens, but .* tokenizer of 257"):
        cv.export_checkpoint(str(ckpt), str(tmp_path / "hf3"), tokenizer_model=str(tmp_path / "other.json"),
                             progress=False, log=None)
    assert not (tmp_path / "hf3").exists()


def test_export_notes_a_post_processor_that_adds_tokens(tmp_path):
    """A tokenizer.json that adds BOS on encode (Llama-3 style): the run never saw it (training
    encodes without special tokens), and the export says so; a plain one gets no note."""
    tokenizers = pytest.importorskip("tokenizers")
    from tst_megatron.convert.export import _special_tokens_note
    from tst_megatron.tokenizers import HuggingFaceTokenizer

    vocab = {w: i for i, w in enumerate(["<unk>", "<bos>", "<|endoftext|>", "The", "quick", "brown", "fox."])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<bos>", "<|endoftext|>"])
    tok.save(str(tmp_path / "plain.json"))
    assert _special_tokens_note(HuggingFaceTokenizer(str(tmp_path / "plain.json"))) is None
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tok.save(str(tmp_path / "bos.json"))
    note = _special_tokens_note(HuggingFaceTokenizer(str(tmp_path / "bos.json")))
    assert note.startswith("the tokenizer's post-processor adds <bos> to every text"), note
    # a run whose data was encoded with them (--tokenizer-hf-include-special-tokens): no note
    assert _special_tokens_note(HuggingFaceTokenizer(str(tmp_path / "bos.json"), include_special_tokens=True)) is None


@pytest.mark.parametrize("model_type, kind", [("bpe", "SentencePieceTokenizer"), ("unigram", "SentencePieceTokenizer"),
                                              ("bpe", "Llama2Tokenizer")])
def test_sentencepiece_tokenizer_travels(trained, tmp_path, model_type, kind):
    """A run trained with --tokenizer-type SentencePieceTokenizer (or Llama2Tokenizer) exports a
    tokenizer.json (and its tokenizer.model) that transformers loads and that gives the run's own
    ids (Llama2Tokenizer's documents start with BOS, as add_special_tokens=True does there)."""
    pytest.importorskip("sentencepiece")
    from test_tokenizers import generated_text, train_sp

    from tst_megatron.tokenizers import build_tokenizer

    model = train_sp(str(tmp_path / "sp"), model_type, vocab_size=350)

    def use_sp(args):
        args["data"].update(tokenizer_type=kind, tokenizer_model=model)

    ckpt = _copy_ckpt(trained["root"] / "llama" / "iter_0000006", tmp_path / "iter_0000006", use_sp,
                      tokenizer_vocab=350)
    out = tmp_path / "hf"
    res = cv.export_checkpoint(str(ckpt), str(out), progress=False, log=None)
    assert {"tokenizer.json", "tokenizer.model", "tokenizer_config.json"} <= set(res["files"])
    ours = build_tokenizer(kind, model)
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == ours.eod == 2 and ours.bos == 1
    # a BOS id only where the documents started with it
    assert config["bos_token_id"] == (1 if kind == "Llama2Tokenizer" else None)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert (hf_tok.eos_token, hf_tok.pad_token, hf_tok.unk_token) == ("</s>", "<pad>", "<unk>")
    text = generated_text(80, seed=3) + "  two  spaces\ttab \u00e9 \u6771\u4eac \U0001f642 and a typed </s> <s>"
    ids = hf_tok(text, add_special_tokens=True)["input_ids"]
    assert ids == ours.tokenize(text)
    assert (ids[0] == ours.bos) == (kind == "Llama2Tokenizer")  # SentencePieceTokenizer's documents have none
    assert ours.eod not in ids  # "</s>" typed in the text stays text, as in training
    assert hf_tok.decode(ids, skip_special_tokens=kind == "Llama2Tokenizer") == text
    assert hf_tok.decode(ids + [ours.eod], skip_special_tokens=True) == text


def test_import_refusals(exports, tmp_path):
    hf = exports("llama")["output"]
    base = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "256"]
    cases = [
        (base + ["--hidden-size", "128"], r"--hidden-size 128 contradicts .*hidden_size"),
        (base + ["--qk-layernorm"], r"--qk-layernorm True contradicts"),
        (["--vocab-size", "1000"], r"1001 tokens but the model's embedding only 512"),
        (base + ["--tensor-model-parallel-size", "3"], r"vocab_size 512 does not divide among"),
        ([], r"no tokenizer.json"),
        (base + ["--tst-bag-size", "4", "--tst-superposition-iters", "200"], r"must be < train iterations"),
        (base + ["--rampup-batch-size", "4", "4", "32"], r"--rampup-batch-size: the import writes the run's "
                                                         r"schedule in iterations at one global batch"),
    ]
    moe = exports("moe")["output"]  # Qwen3-MoE's router: softmax, no bias, no scaling, no groups
    cases += [(moe, base + flags, r"%s .*contradicts the Hugging Face config \(%s" % (flags[0], what))
              for flags, what in ((["--moe-router-score-function", "sigmoid"], "softmax routing"),
                                  (["--moe-router-topk-scaling-factor", "2"], "no top-k scaling"),
                                  (["--moe-router-num-groups", "2", "--moe-router-group-topk", "1"],
                                   "no group-limited routing"),
                                  (["--moe-expert-capacity-factor", "1.0"], "no token dropping"))]
    # a config.json without a field the architecture needs; weights that do not match the config
    (tmp_path / "nofield").mkdir()
    (tmp_path / "leftover").mkdir()
    for name in os.listdir(hf):
        for d in ("nofield", "leftover"):
            shutil.copy(os.path.join(hf, name), tmp_path / d / name)
    conf = json.loads((tmp_path / "nofield" / "config.json").read_text())
    del conf["intermediate_size"]
    conf["architectures"] = None  # the architecture from model_type then (as transformers reads it)
    (tmp_path / "nofield" / "config.json").write_text(json.dumps(conf))
    from safetensors.torch import load_file, save_file
    (shard,) = [n for n in os.listdir(tmp_path / "leftover") if n.endswith(".safetensors")]
    tensors = load_file(str(tmp_path / "leftover" / shard))
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # old Llama files hold it
    save_file(tensors, str(tmp_path / "leftover" / shard), metadata={"format": "pt"})
    cases += [(str(tmp_path / "nofield"), base,
               r"config.json has no 'intermediate_size' \(needed for LlamaForCausalLM\); nothing was written"),
              (str(tmp_path / "leftover"), base, r"the weights do not match config.json .*nothing was written")]
    for i, case in enumerate(cases):
        src, argv, message = case if len(case) == 3 else (hf, *case)
        with pytest.raises(cv.ConversionError, match=message):
            cv.import_checkpoint(src, str(tmp_path / f"c{i}"), argv, progress=False, log=None)
    # the imported weights are the HF next-token model even where the run continues in superposition
    tst = base + ["--tst-bag-size", "4", "--tst-superposition-iters", "50", "--train-iters", "100"]
    res = cv.import_checkpoint(hf, str(tmp_path / "tst"), tst, progress=False, log=None)
    meta = json.loads(Path(res["path"], "tst_meta.json").read_text())
    assert meta["superposition_checkpoint"] is False
    assert meta["rng_device"] == "cpu"  # its RNG states: a resume on a GPU does not restore them
    # an existing checkpoint directory is never written into
    res = cv.import_checkpoint(hf, str(tmp_path / "ok"), base, progress=False, log=None)
    assert res["iteration"] == 0 and res["tensor_parallel_sizes"] == [1, 2, 4, 8, 16]
    with pytest.raises(cv.ConversionError, match="already holds checkpoints"):
        cv.import_checkpoint(hf, str(tmp_path / "ok"), base, progress=False, log=None)
    with pytest.raises(cv.ConversionError, match="--consumed-samples"):
        cv.import_checkpoint(hf, str(tmp_path / "c9"), base, iteration=5, progress=False, log=None)


@pytest.mark.parametrize("mlp_only_layers, freq, flags", [([1], "2", []), ([0], "[0,1]", ["--apply-layernorm-1p"])])
def test_transformers_saved_model_round_trip(tmp_path, mlp_only_layers, freq, flags):
    """A directory written by transformers' own save_pretrained (v5 names the expert count
    `num_local_experts`) -> import -> export: the same function. A dense first layer is not
    megatron's every-k-th pattern: it travels as the 0/1 list form of --moe-layer-freq. With
    --apply-layernorm-1p the checkpoint holds every norm as gamma - 1 and the export adds the 1."""
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=False, max_position_embeddings=128, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=False, mlp_only_layers=mlp_only_layers)
    torch.manual_seed(0)
    src = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in src.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    src.save_pretrained(str(tmp_path / "src"))
    res = cv.import_checkpoint(str(tmp_path / "src"), str(tmp_path / "ckpt"), ["--vocab-size", "290"] + flags,
                               progress=False, log=None)
    if flags:  # the checkpoint itself holds gamma - 1 (read with torch's own loader, one process)
        import torch.distributed.checkpoint as dcp
        saved = {"decoder.final_layernorm.weight": torch.empty(64)}
        dcp.load(saved, storage_reader=dcp.FileSystemReader(str(tmp_path / "ckpt" / "iter_0000000")), no_dist=True)
        torch.testing.assert_close(saved["decoder.final_layernorm.weight"] + 1,
                                   src.state_dict()["model.norm.weight"], rtol=0, atol=1e-6)
    assert {"--moe-layer-freq", "--moe-router-pre-softmax", "--kv-channels"} - set(res["flags"]) == {"--kv-channels"}
    assert res["flags"][res["flags"].index("--moe-layer-freq") + 1] == freq
    if freq == "2":  # another spelling of the same layers takes the checkpoint's (its storage layout)
        from tst_megatron.arguments import parse_args
        for mine in ("3", "[1,0]"):
            ns = parse_args(["--data-path", "x", "--load", str(tmp_path / "ckpt"), "--use-checkpoint-args",
                             "--moe-layer-freq", mine])
            assert ns.model.moe_layer_freq == 2
    cv.export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "back"), progress=False, log=None)
    back = _load_hf(tmp_path / "back")
    ids = torch.randint(0, 290, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, src(ids).logits, rtol=0, atol=1e-5)
    if freq == "2":  # one expert per token, renormalised to weight 1: not a model megatron-core builds
        shutil.copytree(tmp_path / "src", tmp_path / "top1")
        config = json.loads((tmp_path / "top1" / "config.json").read_text())
        config.update(num_experts_per_tok=1, norm_topk_prob=True)
        (tmp_path / "top1" / "config.json").write_text(json.dumps(config))
        with pytest.raises(cv.ConversionError, match="num_experts_per_tok 1 with norm_topk_prob true"):
            cv.import_checkpoint(str(tmp_path / "top1"), str(tmp_path / "ckpt1"), ["--vocab-size", "290"],
                                 progress=False, log=None)
        assert not (tmp_path / "ckpt1").exists()


def test_helpers():
    assert cv.parse_size("5GB") == 5 * 10 ** 9 and cv.parse_size("2GiB") == 2 * 2 ** 30
    assert cv.parse_size("100KB") == 100_000 and cv.parse_size(123) == 123
    with pytest.raises(cv.ConversionError, match="--max-shard-size"):
        cv.parse_size("lots")
    # an HF MoE layer pattern -> the simplest --moe-layer-freq: every k-th layer as k, else the list
    assert cv.hf_import._moe_freq([1, 0, 1, 0], 4) == 2 and cv.hf_import._moe_freq(1, 3) == 1
    assert cv.hf_import._moe_freq([0, 1], 2) == [0, 1]
    assert cv.hf_import._moe_freq(3, 2) == 2  # a user's --moe-layer-freq 3 on two layers is HF's [1, 0]
