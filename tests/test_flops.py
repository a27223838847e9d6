"""The TFLOP/s the trainer logs: its FLOPs per position (builders.flops_per_position) against
torch's own FlopCounterMode on megatron-core's GPTModel, forward + backward. The counter sees the
matmuls (on CPU not the SDPA attention kernel, which the formula adds as 12 x layers x L x heads x
head_dim / 2); the formula also counts norm weights and biases as 6 FLOPs each, the usual 6N."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megatron.core.models.gpt import GPTModel
from tst_megatron import cpu
from tst_megatron.arguments import parse_args, validate
from tst_megatron.builders import flops_per_position, transformer_config
from tst_megatron.specs import gpt_block_spec
from dist_utils import init_single_process

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

V, L = 256, 32
BASE = ["--data-path", "x", "--vocab-size", str(V), "--make-vocab-size-divisible-by", "128", "--num-layers", "2",
        "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", str(L)]


def _counted_and_formula(extra):
    init_single_process()
    cpu.model_parallel_manual_seed(1)
    cfg = parse_args(BASE + extra)
    validate(cfg, 1)
    m = cfg.model
    tc = transformer_config(m, cfg.parallel, cfg.optim, use_cpu_init=True)
    model = GPTModel(config=tc, transformer_layer_spec=gpt_block_spec(tc, use_transformer_engine=False),
                     vocab_size=V, max_sequence_length=L, position_embedding_type=m.position_embedding_type,
                     share_embeddings_and_output_weights=not m.untie_embeddings_and_output_weights)
    ids = torch.randint(0, V, (2, L), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        model(ids, torch.arange(L).expand(2, L), None).float().sum().backward()
    attention = 12 * m.num_layers * L * m.num_attention_heads * (m.hidden_size // m.num_attention_heads) / 2
    return counter.get_total_flops() / ids.numel(), flops_per_position(m, V) - attention


@pytest.mark.parametrize("extra", [
    [], ["--position-embedding-type", "learned_absolute"],
    ["--swiglu", "--untie-embeddings-and-output-weights", "--group-query-attention", "--num-query-groups", "2",
     "--disable-bias-linear", "--normalization", "RMSNorm"]],
    ids=["gpt_tied", "learned_positions", "llama_untied_gqa"])
def test_flops_per_position_matches_torchs_flop_counter(extra):
    counted, formula = _counted_and_formula(extra)
    assert counted > 0 and abs(formula - counted) / counted < 0.02, (counted, formula)
