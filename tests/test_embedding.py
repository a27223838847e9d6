"""Bag embedding (input superposition): the mean of the s token embeddings, no new parameters.

Single-process checks first; the TP = 2 / TP = 2 + sequence-parallel equality runs as 2 real Gloo
ranks (worker scenario `embedding`).
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
import model_worker  # noqa: E402

from tst_megatron.embedding import BagVocabParallelEmbedding, bag_mean, enable_bag_inputs  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def megatron_single_rank():
    dist_utils.init_single_process()


def _embedding(pos_type="rope", V=80, H=24, seed=0):
    from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
    from megatron.core.transformer.transformer_config import TransformerConfig

    from tst_megatron.cpu import model_parallel_manual_seed

    model_parallel_manual_seed(seed)
    cfg = TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=4, use_cpu_initialization=True,
                            hidden_dropout=0.0)
    return LanguageModelEmbedding(cfg, V, 32, position_embedding_type=pos_type)


# ----------------------------------------------------------------------------- bag_mean
def test_bag_mean_fp32_and_bf16_accumulation():
    x = torch.randn(3, 4, 6, 10)
    torch.testing.assert_close(bag_mean(x, torch.float32), x.double().mean(dim=-2).float(), atol=1e-6, rtol=1e-6)
    # bf16: accumulated in fp32 then rounded once -> the correctly rounded mean; a bf16 running sum
    # would lose the small terms (256 + 1 + 1 + 1 stays 256 in bf16)
    b = torch.tensor([[256.0, 1.0, 1.0, 1.0], [1.0, 2.0 ** -8, 2.0 ** -8, 3.0]]).to(torch.bfloat16)
    b = b.unsqueeze(-1).expand(2, 4, 3).contiguous()
    got = bag_mean(b, torch.bfloat16)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 3)
    want = b.double().mean(dim=-2).to(torch.bfloat16)
    assert torch.equal(got, want)
    naive = b[:, 0]
    for j in range(1, 4):
        naive = naive + b[:, j]
    assert not torch.equal((naive / 4).to(torch.bfloat16), want)  # the case does discriminate


# ----------------------------------------------------------------------------- module
@pytest.mark.parametrize("pos_type", ["rope", "learned_absolute"])
def test_bag_embedding_equals_independent_mean(pos_type):
    emb = _embedding(pos_type)
    enable_bag_inputs(emb)
    W = emb.word_embeddings.weight.detach().double()
    g = torch.Generator().manual_seed(1)
    b, L, s = 2, 7, 6
    ids = torch.randint(0, 80, (b, L, s), generator=g)
    ids[1, 3, :] = 5  # all the same token
    pos = torch.arange(L).expand(b, L)
    out = emb(ids, pos)  # [L, b, h]
    assert out.shape == (L, b, 24)
    ref = sum(F.embedding(ids[..., j], W) for j in range(s)) / s
    if pos_type == "learned_absolute":
        ref = ref + emb.position_embeddings.weight.detach().double()[pos]
    torch.testing.assert_close(out.double(), ref.transpose(0, 1), atol=1e-6, rtol=1e-6)

    gout = torch.randn(out.shape, generator=g)
    out.backward(gout)
    Wr = W.clone().requires_grad_(True)
    (sum(F.embedding(ids[..., j], Wr) for j in range(s)) / s).transpose(0, 1).mul(gout.double()).sum().backward()
    torch.testing.assert_close(emb.word_embeddings.weight.grad.double(), Wr.grad, atol=1e-6, rtol=1e-6)
    # token 5 received 6 * (1/6) of the upstream gradient of position (3, batch 1), plus any others
    assert emb.word_embeddings.weight.grad[5].abs().sum() > 0


def test_token_input_path_is_stock_megatron_and_init_is_unchanged():
    stock = _embedding(seed=3)
    bagged = _embedding(seed=3)
    param = bagged.word_embeddings.weight
    keys = list(bagged.state_dict().keys())
    enable_bag_inputs(bagged)
    enable_bag_inputs(bagged)  # idempotent
    assert type(bagged.word_embeddings) is BagVocabParallelEmbedding
    assert bagged.word_embeddings.weight is param  # same Parameter, no new ones
    assert list(bagged.state_dict().keys()) == keys
    assert sum(1 for _ in bagged.parameters()) == sum(1 for _ in stock.parameters())
    assert torch.equal(bagged.word_embeddings.weight, stock.word_embeddings.weight)
    ids = torch.randint(0, 80, (3, 9))
    pos = torch.arange(9).expand(3, 9)
    assert torch.equal(bagged(ids, pos), stock(ids, pos))
    # s = 1 bags equal token input
    torch.testing.assert_close(bagged(ids.unsqueeze(-1), pos), stock(ids, pos), atol=0, rtol=0)


def test_enable_bag_inputs_rejects_other_embeddings():
    class Fake(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.word_embeddings = torch.nn.Embedding(10, 4)

    with pytest.raises(TypeError, match="VocabParallelEmbedding"):
        enable_bag_inputs(Fake())


def test_model_bag_input_equals_stock_gpt_fed_the_mean_embedding():
    """TSTGPTModel([b, L, s]) == stock GPTModel with decoder_input = mean of the s embeddings."""
    from megatron.core.models.gpt.gpt_model import GPTModel

    from tst_megatron.specs import gpt_block_spec

    cfg = model_worker.model_config("dense")
    tst = model_worker.build_model(cfg, seed=11)
    stock = GPTModel(config=cfg, transformer_layer_spec=gpt_block_spec(cfg), vocab_size=model_worker.V_M,
                     max_sequence_length=64, position_embedding_type="rope",
                     share_embeddings_and_output_weights=False)
    stock.load_state_dict(tst.state_dict())
    tst.eval()
    stock.eval()
    g = torch.Generator().manual_seed(2)
    b, L, s = 2, 8, 4
    bags = torch.randint(0, model_worker.V_M, (b, L, s), generator=g)
    pos = torch.arange(L).expand(b, L)
    W = tst.embedding.word_embeddings.weight.detach()
    mean = (sum(F.embedding(bags[..., j], W.double()) for j in range(s)) / s).float().transpose(0, 1)
    with torch.no_grad():
        got = tst(bags, pos, None)  # [b, L, V] logits
        want = stock(None, pos, None, decoder_input=mean.contiguous())
        first_only = stock(bags[..., 0], pos, None)
    assert got.shape == (b, L, model_worker.V_M)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - first_only).abs().max() > 1e-3  # the bag really is averaged, not truncated


# ----------------------------------------------------------------------------- TP = 2
def test_tensor_and_sequence_parallel_2_equal_tp1(tmp_path):
    """2 Gloo ranks: TP = 2 and TP = 2 + SP give the TP = 1 output and word-embedding weight grad,
    and both equal the independent mean (RoPE: reduce-scatter path; learned positions: all-reduce
    then scatter). Also the token path at TP = 2 and bf16 weights."""
    results = dist_utils.launch("embedding", tmp_path, nproc=2)
    expected = [f"embedding/{p}/{lay}/{what}" for p in ("rope", "learned_absolute")
                for lay in ("tp2", "tp2_sp") for what in ("out_vs_tp1", "wgrad_vs_tp1", "out_vs_independent")]
    expected += ["embedding/rope/tp1/out_vs_independent", "embedding/rope/tp1/wgrad_vs_independent",
                 "embedding/tokens_2d/tp2/out_vs_lookup", "embedding/bf16/tp2_sp/out_vs_independent"]
    dist_utils.check_records(results, expected_prefixes=expected)
