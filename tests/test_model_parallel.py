"""TSTGPTModel: loss semantics, state-dict identity with a stock GPTModel, and parallel layouts.

Single-process tests first. The parallel layouts run as 2 real Gloo ranks, one launch per layout
(tests/workers/model_worker.py): in each launch the single-rank run (TP = PP = EP = 1) of a tiny
dense GPT (RoPE, SwiGLU, RMSNorm, GQA, QK-norm, untied) and of a tiny MoE GPT (4 experts, top-2,
aux loss 1e-2) is computed first and its weights saved with megatron dist_checkpointing; then the
layout is initialised, the same weights loaded, and both phases run through megatron's schedule,
DDP and optimizer: superposition ([b, L, s] inputs and labels) then recovery ([b, L]). Every
pre-step loss, training loss, gradient norm and post-step loss must equal the single-rank run
(1e-5 absolute on losses).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "workers"))
import dist_utils  # noqa: E402
import model_worker as mw  # noqa: E402

from tst_megatron.config import TSTConfig  # noqa: E402

V, L, S = mw.V_M, mw.L_M, mw.S_M


@pytest.fixture(scope="module")
def single_rank():
    dist_utils.init_single_process()


def _stock(cfg, seed):
    from megatron.core.models.gpt.gpt_model import GPTModel

    from tst_megatron.cpu import model_parallel_manual_seed
    from tst_megatron.specs import gpt_block_spec

    model_parallel_manual_seed(seed)
    return GPTModel(config=cfg, transformer_layer_spec=gpt_block_spec(cfg), vocab_size=V, max_sequence_length=64,
                    position_embedding_type="rope", share_embeddings_and_output_weights=False)


def _bags(seed, b=2):
    """Token stream -> ([b, L, s] bags, [b, L, s] next-bag labels, [b, L] tokens, [b, L] labels)."""
    g = torch.Generator().manual_seed(seed)
    stream = torch.randint(0, V, (b, L * S + 1), generator=g)
    bags = stream[:, :L * S].reshape(b, L, S)
    lab = torch.full((b, L * S), -100, dtype=torch.long)
    lab[:, :L * S - S + 1] = stream[:, S:]
    return bags, lab.reshape(b, L, S), stream[:, :L], stream[:, 1:L + 1]


# ----------------------------------------------------------------------------- loss semantics
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_model_loss_in_every_mode_matches_reference(single_rank, kind):
    model = mw.build_model(mw.model_config(kind), seed=3)
    model.eval()
    weights = TSTConfig(bag_size=S, bag_weighting="power").bag_weights()
    bags, bag_labels, tokens, labels = _bags(0)
    pos = torch.arange(L).expand(2, L)
    with torch.no_grad():
        logits_bag = model(bags, pos, None)  # [b, L, V]
        logits_tok = model(tokens, pos, None)
        full = model(bags, pos, None, labels=bag_labels)  # superposition (full)
        inp_only = model(bags, pos, None, labels=labels)  # input-only superposition
        out_only = model(tokens, pos, None, labels=bag_labels)  # output-only superposition
        recovery = model(tokens, pos, None, labels=labels)
    for loss in (full, inp_only, out_only, recovery):
        assert loss.shape == (2, L) and loss.dtype == torch.float32
    torch.testing.assert_close(full, dist_utils.reference_mce(logits_bag, bag_labels, weights).float(),
                               atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(out_only, dist_utils.reference_mce(logits_tok, bag_labels, weights).float(),
                               atol=1e-5, rtol=1e-6)
    ce = lambda lg, lb: F.cross_entropy(lg.reshape(-1, V), lb.reshape(-1), reduction="none").view(2, L)  # noqa: E731
    torch.testing.assert_close(inp_only, ce(logits_bag, labels), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(recovery, ce(logits_tok, labels), atol=1e-5, rtol=1e-6)
    # the last position has one target (the rest of its next bag is past the sample)
    assert (bag_labels[:, -1, 1:] == -100).all() and (bag_labels[:, -1, 0] >= 0).all()


def test_bag_weights_length_mismatch_is_a_clear_error(single_rank):
    model = mw.build_model(mw.model_config("dense"), seed=3)
    bags, bag_labels, _, _ = _bags(0)
    pos = torch.arange(L).expand(2, L)
    with pytest.raises(ValueError, match="bag weights"):
        model(bags[..., :2], pos, None, labels=bag_labels[..., :2])


# ----------------------------------------------------------------------------- state dict
def _sharded_summary(sd, prefix=""):
    """{name: (type, key, global_shape, local_shape, global_offset)} over a nested sharded state dict."""
    out = {}
    for k, v in sd.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_sharded_summary(v, name + "."))
        else:
            out[name] = (type(v).__name__, getattr(v, "key", None), getattr(v, "global_shape", None),
                         getattr(v, "local_shape", None), getattr(v, "global_offset", None))
    return out


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_state_dict_identical_to_stock_gpt(single_rank, kind):
    cfg = mw.model_config(kind)
    tst = mw.build_model(cfg, seed=21)
    stock = _stock(cfg, seed=21)
    a, b = tst.state_dict(), stock.state_dict()
    assert list(a.keys()) == list(b.keys())
    for k in a:
        assert type(a[k]) is type(b[k]), k
        if torch.is_tensor(a[k]):
            assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
            # the same seed gives bit-identical initial weights (no extra RNG draws in the subclass)
            assert torch.equal(a[k], b[k]), k
    sa, sb = _sharded_summary(tst.sharded_state_dict()), _sharded_summary(stock.sharded_state_dict())
    assert sa == sb
    assert any(v[0] == "ShardedTensor" for v in sa.values())
    assert sum(p.numel() for p in tst.parameters()) == sum(p.numel() for p in stock.parameters())


def test_trained_tst_model_loads_into_stock_gpt(single_rank):
    cfg = mw.model_config("dense")
    tst = mw.build_model(cfg, seed=4)
    before = {k: v.clone() for k, v in tst.state_dict().items() if torch.is_tensor(v)}
    opt = torch.optim.Adam(tst.parameters(), lr=1e-2)
    pos = torch.arange(L).expand(2, L)
    losses = []
    for step in range(3):  # superposition steps
        bags, bag_labels, _, _ = _bags(100 + step)
        opt.zero_grad()
        loss = tst(bags, pos, None, labels=bag_labels).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    changed = [k for k, v in tst.state_dict().items() if torch.is_tensor(v) and not torch.equal(v, before[k])]
    assert "embedding.word_embeddings.weight" in changed and "output_layer.weight" in changed

    stock = _stock(cfg, seed=77)
    _, _, tokens, labels = _bags(999)
    tst.eval()
    stock.eval()
    with torch.no_grad():
        untrained = stock(tokens, pos, None)
        stock.load_state_dict(tst.state_dict(), strict=True)
        got = stock(tokens, pos, None)
        want = tst(tokens, pos, None)
        loss_stock = stock(tokens, pos, None, labels=labels)
        loss_tst = tst(tokens, pos, None, labels=labels)
    assert torch.equal(got, want)
    assert torch.equal(loss_stock, loss_tst)
    assert (untrained - want).abs().max() > 1e-3  # loading mattered


# ----------------------------------------------------------------------------- parallel layouts
def _expected(name, tags):
    keys = ("sup_pre", "rec_pre", "sup_train", "rec_mid", "rec_train", "rec_post", "sup_post",
            "sup_gnorm", "rec_gnorm", "steps_change_loss")
    return [f"{name}/{t}/{k}" for t in tags for k in keys]


LAYOUT_TAGS = {
    "model_tp2": ["dense/tp2", "dense/tp2_spTrue", "moe/tp2_spTrue", "dense_tied/tp2_spTrue"],
    "model_pp2": ["dense/pp2", "moe/pp2", "dense_tied/pp2"],
    "model_dp2": ["dense/dp2", "moe/dp2"],
    "model_ep2": ["moe/ep2"],
}


@pytest.mark.parametrize("scenario", list(LAYOUT_TAGS))
def test_parallel_layout_equals_single_rank(scenario, tmp_path):
    results = dist_utils.launch(scenario, tmp_path, nproc=2, timeout=300)
    expected = _expected(scenario, LAYOUT_TAGS[scenario])
    if scenario == "model_pp2":  # losses live on the last stage only; rank 0 checks the grad norms
        expected = [e for e in expected if e.endswith(("gnorm", "steps_change_loss"))]
        expected += [f"model_pp2/{t}/non_last_stage_has_no_losses" for t in LAYOUT_TAGS[scenario]]
        for t in LAYOUT_TAGS[scenario]:
            assert f"model_pp2/{t}/sup_post" in results[1]["records"], "last stage recorded no losses"
    if scenario == "model_tp2":
        expected += ["model_tp2/stock_gpt_loads_tst_checkpoint/logits_equal",
                     "model_tp2/stock_gpt_loads_tst_checkpoint/loss_vs_ref"]
    dist_utils.check_records(results, expected_prefixes=expected)
