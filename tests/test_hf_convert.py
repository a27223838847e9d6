"""Megatron <-> Hugging Face conversion: exact logits / greedy parity with `transformers` models.

Tiny fp32 models (TP=1) built with megatron-core's local spec on CPU; the HF side is built by
`transformers.AutoModelForCausalLM.from_pretrained` on the directory we write (no hub access).
"""
import os

import pytest
import torch
import torch.distributed as dist

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from tst_megatron import hf_convert as hc  # noqa: E402

VOCAB, MAX_POS, ROPE_BASE = 128, 64, 10000.0
PROMPT_LEN, NEW_TOKENS = 8, 20


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # tiny models: intra-op threads only add spin-wait overhead (and thrash a busy machine)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def megatron_env():
    from tst_megatron.cpu import enable_cpu_support, model_parallel_manual_seed

    enable_cpu_support()
    if not dist.is_initialized():  # an in-memory store: no port, nothing exported to later tests
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel()
    model_parallel_manual_seed(0)
    yield


BASE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=24,
            ffn_hidden_size=96, normalization="RMSNorm", layernorm_epsilon=1e-6, gated_linear_unit=True,
            activation_func=torch.nn.functional.silu, add_bias_linear=False, use_cpu_initialization=True,
            hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.05)
MOE = dict(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
           moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.0,
           moe_token_dispatcher_type="alltoall")

# name -> (TransformerConfig fields, tied embeddings, expected architecture)
CASES = {
    "llama_gqa_untied": (dict(BASE), False, "LlamaForCausalLM"),
    "llama_gqa_tied": (dict(BASE), True, "LlamaForCausalLM"),
    "llama_bias_mha": (dict(BASE, add_bias_linear=True, num_query_groups=4), False, "LlamaForCausalLM"),
    "qwen3": (dict(BASE, qk_layernorm=True), False, "Qwen3ForCausalLM"),
    # --apply-layernorm-1p: megatron stores gamma - 1 in every norm (QK norms too), HF gamma
    "qwen3_zero_centered_norms": (dict(BASE, qk_layernorm=True, layernorm_zero_centered_gamma=True), False,
                                  "Qwen3ForCausalLM"),
    # norm_topk_prob=True routing (megatron default moe_router_pre_softmax=False), one dense layer
    "qwen3_moe_mixed": (dict({**BASE, **MOE}, num_layers=3, qk_layernorm=True, moe_layer_freq=[1, 0, 1]),
                        False, "Qwen3MoeForCausalLM"),
    # norm_topk_prob=False routing (moe_router_pre_softmax=True), all layers MoE, tied
    "qwen3_moe_presoftmax_tied": (dict({**BASE, **MOE}, qk_layernorm=True, moe_router_pre_softmax=True,
                                       moe_router_topk=1), True, "Qwen3MoeForCausalLM"),
}


def _build_megatron(tc_fields, tied, seed=1234):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from tst_megatron.model import TSTGPTModel
    from tst_megatron.specs import gpt_block_spec

    torch.manual_seed(seed)
    cfg = TransformerConfig(**tc_fields)
    model = TSTGPTModel(config=cfg, transformer_layer_spec=gpt_block_spec(cfg), vocab_size=VOCAB,
                        max_sequence_length=MAX_POS, position_embedding_type="rope",
                        rotary_base=int(ROPE_BASE), share_embeddings_and_output_weights=tied)
    return model.eval()


def _randomise(model, seed=0):
    """Non-trivial norms and biases, peaky logits (clear argmax margins for greedy decoding)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif "word_embeddings" in name or "output_layer" in name or "embed_tokens" in name \
                    or "lm_head" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)


def _prompt():
    return torch.randint(0, VOCAB, (2, PROMPT_LEN), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def _megatron_logits(model, ids):
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    return model(ids, pos, None)


@torch.no_grad()
def _megatron_greedy(model, ids, n):
    for _ in range(n):
        nxt = _megatron_logits(model, ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


def _load_hf(path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def _assert_sd_equal(a, b):
    assert list(a) == list(b)
    for k in a:
        if a[k] is None or b[k] is None:
            assert a[k] is None and b[k] is None, k
        else:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("case", list(CASES))
def test_megatron_to_hf_parity(megatron_env, tmp_path, case):
    fields, tied, arch = CASES[case]
    model = _build_megatron(fields, tied)
    _randomise(model)
    sd = model.state_dict()
    assert hc.choose_arch(fields) == arch == hc.choose_arch(model.config)
    zc = bool(fields.get("layernorm_zero_centered_gamma"))
    cfg = hc.hf_config_from_megatron(None, model.config, VOCAB, MAX_POS, ROPE_BASE, tied,
                                     torch_dtype="float32", zero_centered_gamma=zc)
    assert cfg["architectures"] == [arch]
    hf_sd = hc.megatron_to_hf(sd, cfg, zero_centered_gamma=zc)
    assert ("lm_head.weight" in hf_sd) == (not tied)

    # exact inverse, including the local linears' `_extra_state: None` entries and key order
    back = hc.hf_to_megatron(hf_sd, cfg, zero_centered_gamma=zc)
    if zc:  # gamma - 1 -> gamma -> gamma - 1 in fp32 rounds the norm weights to the ulp of ~2 (2.4e-7)
        for k in [k for k in sd if "norm" in k]:
            torch.testing.assert_close(back[k], sd[k], rtol=0, atol=2.5e-7)
            back[k] = sd[k]
    _assert_sd_equal(back, sd)
    if zc:  # bf16 weights exported to fp32: 1 + w rounded once (to fp32), not first to bf16's ~0.008 steps
        sd16 = {k: (v.to(torch.bfloat16) if torch.is_tensor(v) else v) for k, v in sd.items()}
        out = hc.megatron_to_hf(sd16, cfg, zero_centered_gamma=True, norm_dtype=torch.float32)
        w = sd16["decoder.final_layernorm.weight"].float()
        assert out["model.norm.weight"].dtype == torch.float32 and torch.equal(out["model.norm.weight"], 1 + w)
        assert not torch.equal((1 + w).to(torch.bfloat16).float(), 1 + w)  # the test can tell the two apart
        assert out["lm_head.weight" if not tied else "model.embed_tokens.weight"].dtype == torch.bfloat16

    files = hc.save_hf_directory(str(tmp_path), hf_sd, cfg,
                                 generation_config={"do_sample": False, "pad_token_id": 0})
    assert "model.safetensors" in files
    hf = _load_hf(str(tmp_path))

    ids = _prompt()
    ref = _megatron_logits(model, ids)
    with torch.no_grad():
        got = hf(ids).logits
    assert got.shape == ref.shape
    torch.testing.assert_close(got[:, -1], ref[:, -1], rtol=0, atol=1e-4)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)

    want = _megatron_greedy(model, ids, NEW_TOKENS)
    with torch.no_grad():
        gen = hf.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                          pad_token_id=0)
    assert torch.equal(gen, want), (gen, want)


@pytest.mark.parametrize("case", ["llama_gqa_tied", "qwen3_moe_mixed"])
def test_hf_to_megatron_from_transformers_model(megatron_env, case):
    """transformers' own model (v5 keeps MoE experts fused in memory) -> megatron, same logits."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields, tied, _ = CASES[case]
    ref_cfg = hc.hf_config_from_megatron(None, fields, VOCAB, MAX_POS, ROPE_BASE, tied)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**ref_cfg), attn_implementation="eager",
        dtype=torch.float32).eval()
    _randomise(hf, seed=3)
    if tied:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()

    mcfg = hc.megatron_config_from_hf(ref_cfg)
    model_args = {k: mcfg.pop(k) for k in hc.NON_TRANSFORMER_CONFIG_KEYS}
    assert model_args == dict(vocab_size=VOCAB, max_position_embeddings=MAX_POS, rotary_base=ROPE_BASE,
                              untie_embeddings_and_output_weights=not tied,
                              position_embedding_type="rope", rotary_percent=1.0)
    for k, v in mcfg.items():  # rebuilt config agrees with the one we started from
        if k in fields:
            assert v == fields[k] or k in ("hidden_dropout", "attention_dropout"), (k, v, fields[k])
    model = _build_megatron(dict(mcfg, use_cpu_initialization=True,
                                 moe_token_dispatcher_type="alltoall"), tied)
    assert isinstance(model.config, TransformerConfig)
    msd = hc.hf_to_megatron(hf.state_dict(), ref_cfg)
    model.load_state_dict(msd, strict=True)

    ids = _prompt()
    with torch.no_grad():
        want = hf(ids).logits
    torch.testing.assert_close(_megatron_logits(model, ids), want, rtol=0, atol=1e-4)

    # older Llama files also hold each layer's RoPE frequencies: transformers' own are dropped (the
    # same weights come out); frequencies of another base are refused by name
    inv = hf.model.rotary_emb.inv_freq
    with_buffers = dict(hf.state_dict(), **{f"model.layers.{i}.self_attn.rotary_emb.inv_freq": inv.clone()
                                            for i in range(ref_cfg["num_hidden_layers"])})
    again = hc.hf_to_megatron(with_buffers, ref_cfg)
    assert list(again) == list(msd) and all(torch.equal(again[k], msd[k]) for k in msd if msd[k] is not None)
    with_buffers["model.layers.0.self_attn.rotary_emb.inv_freq"] = inv * 2
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.rotary_emb.inv_freq: the RoPE frequencies "
                                         rf"are not those of rope_theta {ROPE_BASE}"):
        hc.hf_to_megatron(with_buffers, ref_cfg)


def test_sharded_save_load_roundtrip(megatron_env, tmp_path):
    fields, tied, _ = CASES["qwen3_moe_mixed"]
    model = _build_megatron(fields, tied)
    _randomise(model)
    cfg = hc.hf_config_from_megatron("Qwen3MoeForCausalLM", fields, VOCAB, MAX_POS, ROPE_BASE, tied)
    hf_sd = hc.megatron_to_hf(model.state_dict(), cfg)
    total = sum(t.numel() * t.element_size() for t in hf_sd.values())

    sharded, single = tmp_path / "sharded", tmp_path / "single"
    files = hc.save_hf_directory(str(sharded), hf_sd, cfg, max_shard_bytes=total // 5)
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) >= 5 and "model.safetensors.index.json" in files
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (sharded / "model.safetensors").exists()
    cfg2, sd2 = hc.load_hf_directory(str(sharded))
    assert cfg2 == cfg
    _assert_sd_equal(dict(sorted(sd2.items())), dict(sorted(hf_sd.items())))

    # re-saving the same directory unsharded replaces the shards
    hc.save_hf_directory(str(sharded), hf_sd, cfg)
    assert sorted(os.listdir(sharded)) == ["config.json", "model.safetensors"]

    hc.save_hf_directory(str(single), hf_sd, cfg)
    _, sd3 = hc.load_hf_directory(str(single))
    _assert_sd_equal(dict(sorted(sd3.items())), dict(sorted(hf_sd.items())))

    # transformers reads the sharded form too
    hc.save_hf_directory(str(sharded), hf_sd, cfg, max_shard_bytes=total // 5)
    hf = _load_hf(str(sharded))
    ids = _prompt()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, _megatron_logits(model, ids), rtol=0, atol=1e-4)
    # and the megatron state dict survives the trip through the files
    _assert_sd_equal(hc.hf_to_megatron(hc.load_hf_directory(str(sharded))[1], cfg), model.state_dict())


def test_transformer_engine_key_style(megatron_env):
    fields, tied, _ = CASES["qwen3_moe_mixed"]
    model = _build_megatron(fields, tied)
    cfg = hc.hf_config_from_megatron(None, fields, VOCAB, MAX_POS, ROPE_BASE, tied)
    hf_sd = hc.megatron_to_hf(model.state_dict(), cfg)
    te = hc.hf_to_megatron(hf_sd, cfg, key_style="te", grouped_experts=True)
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in te
    assert "decoder.layers.0.input_layernorm.weight" not in te
    assert "decoder.layers.0.pre_mlp_layernorm.weight" in te  # MoE layer: separate norm
    assert "decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in te  # dense layer: fused norm
    assert "decoder.layers.0.mlp.experts.linear_fc1.weight3" in te
    assert not any(k.endswith("_extra_state") for k in te)
    _assert_sd_equal(hc.megatron_to_hf(te, cfg), hf_sd)
    seq = hc.hf_to_megatron(hf_sd, cfg, key_style="te")
    assert "decoder.layers.2.mlp.experts.local_experts.3.linear_fc2.weight" in seq
    _assert_sd_equal(hc.megatron_to_hf({"module." + k: v for k, v in seq.items()}, cfg), hf_sd)


def test_config_roundtrip():
    for name, (fields, tied, arch) in CASES.items():
        cfg = hc.hf_config_from_megatron(None, fields, VOCAB, MAX_POS, ROPE_BASE, tied,
                                         zero_centered_gamma=bool(fields.get("layernorm_zero_centered_gamma")))
        mcfg = hc.megatron_config_from_hf(cfg)
        again = hc.hf_config_from_megatron(
            arch, mcfg, mcfg["vocab_size"], mcfg["max_position_embeddings"], mcfg["rotary_base"],
            not mcfg["untie_embeddings_and_output_weights"])
        cfg.pop("router_aux_loss_coef", None), again.pop("router_aux_loss_coef", None)
        cfg.pop("initializer_range"), again.pop("initializer_range")
        assert again == cfg, name
    moe = hc.hf_config_from_megatron(None, CASES["qwen3_moe_mixed"][0], VOCAB, MAX_POS, ROPE_BASE, False)
    assert moe["mlp_only_layers"] == [1] and moe["decoder_sparse_step"] == 1
    assert moe["norm_topk_prob"] is True
    assert hc.megatron_config_from_hf(moe)["moe_router_pre_softmax"] is False
    assert hc.megatron_config_from_hf(dict(moe, norm_topk_prob=False))["moe_router_pre_softmax"] is True
    # HF's decoder_sparse_step counts from 1: step 2 -> layers 1, 3 are MoE
    sparse = hc.megatron_config_from_hf(dict(moe, num_hidden_layers=4, decoder_sparse_step=2,
                                             mlp_only_layers=[]))
    assert sparse["moe_layer_freq"] == [0, 1, 0, 1]


QWEN_MOE = dict({**BASE, **MOE}, qk_layernorm=True)


@pytest.mark.parametrize("arch,fields,kwargs,field", [
    ("LlamaForCausalLM", dict(BASE, qk_layernorm=True), {}, "qk_layernorm"),
    ("LlamaForCausalLM", dict(BASE, normalization="LayerNorm"), {}, "normalization"),
    ("LlamaForCausalLM", dict(BASE, gated_linear_unit=False), {}, "gated_linear_unit"),
    ("LlamaForCausalLM", dict(BASE, activation_func=torch.nn.functional.gelu), {}, "activation_func"),
    ("LlamaForCausalLM", dict(BASE, add_qkv_bias=True), {}, "add_qkv_bias"),
    ("LlamaForCausalLM", BASE, {"position_embedding_type": "learned_absolute"}, "position_embedding_type"),
    ("LlamaForCausalLM", BASE, {"rotary_percent": 0.5}, "rotary_percent"),
    ("LlamaForCausalLM", BASE, {"rope_scaling": True}, "rope_scaling"),
    ("LlamaForCausalLM", dict(BASE, rotary_interleaved=True), {}, "rotary_interleaved"),
    # zero-centred norms only when the caller says it converts them (megatron_to_hf's keyword)
    ("LlamaForCausalLM", dict(BASE, layernorm_zero_centered_gamma=True), {}, "layernorm_zero_centered_gamma"),
    ("LlamaForCausalLM", QWEN_MOE, {}, "qk_layernorm"),
    ("LlamaForCausalLM", dict(BASE, window_size=(16, 0)), {}, "window_size"),
    ("LlamaForCausalLM", dict(BASE, softmax_scale=0.5), {}, "softmax_scale"),
    ("LlamaForCausalLM", dict(BASE, mtp_num_layers=1), {}, "mtp_num_layers"),
    ("Qwen3ForCausalLM", BASE, {}, "qk_layernorm"),
    ("Qwen3ForCausalLM", dict(BASE, qk_layernorm=True, add_bias_linear=True), {}, "add_bias_linear"),
    ("Qwen3ForCausalLM", QWEN_MOE, {}, "num_moe_experts"),
    ("Qwen3MoeForCausalLM", dict(BASE, qk_layernorm=True), {}, "num_moe_experts"),
    ("Qwen3MoeForCausalLM", dict(QWEN_MOE, moe_shared_expert_intermediate_size=64), {},
     "moe_shared_expert_intermediate_size"),
    ("Qwen3MoeForCausalLM", dict(QWEN_MOE, moe_router_score_function="sigmoid"), {},
     "moe_router_score_function"),
    ("Qwen3MoeForCausalLM", dict(QWEN_MOE, moe_router_topk_scaling_factor=2.5), {},
     "moe_router_topk_scaling_factor"),
    ("Qwen3MoeForCausalLM", dict(QWEN_MOE, moe_router_num_groups=2, moe_router_group_topk=1), {},
     "moe_router_num_groups"),
    ("Qwen3MoeForCausalLM", dict(QWEN_MOE, moe_router_enable_expert_bias=True), {},
     "moe_router_enable_expert_bias"),
    ("Qwen3MoeForCausalLM", dict(QWEN_MOE, moe_expert_capacity_factor=1.0), {}, "moe_expert_capacity_factor"),
    ("Qwen3MoeForCausalLM", dict(QWEN_MOE, moe_layer_freq=[1, 0, 1]), {}, "moe_layer_freq"),
    ("Qwen3MoeForCausalLM", dict(QWEN_MOE, moe_router_load_balancing_type="sinkhorn"), {},
     "moe_router_load_balancing_type"),
    ("Qwen3MoeForCausalLM", dict(QWEN_MOE, add_bias_linear=True), {}, "add_bias_linear"),
])
def test_check_representable_names_the_field(arch, fields, kwargs, field):
    with pytest.raises(ValueError, match=field):
        hc.check_representable(arch, fields, **kwargs)
    with pytest.raises(ValueError, match=field):
        hc.hf_config_from_megatron(arch, fields, VOCAB, MAX_POS, ROPE_BASE, False, **kwargs)


def test_representable_and_hf_side_refusals():
    for fields, _, arch in CASES.values():
        hc.check_representable(arch, fields, zero_centered_gamma=bool(fields.get("layernorm_zero_centered_gamma")))
    # moe_layer_freq as an int (megatron: layer i is MoE when i % k == 0) becomes mlp_only_layers
    cfg = hc.hf_config_from_megatron(None, dict(QWEN_MOE, num_layers=5, moe_layer_freq=2),
                                     VOCAB, MAX_POS, ROPE_BASE, False)
    assert cfg["mlp_only_layers"] == [1, 3]
    good = hc.hf_config_from_megatron(None, BASE, VOCAB, MAX_POS, ROPE_BASE, False)
    for patch, field in [({"hidden_act": "gelu"}, "hidden_act"),
                         ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}}, "rope_parameters"),
                         # transformers reads rope_scaling first, and a top-level partial_rotary_factor
                         ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4},
                           "rope_scaling": {"rope_type": "linear", "factor": 4.0}}, "rope_scaling"),
                         ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
                         ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.25}},
                          "rope_parameters.partial_rotary_factor"),
                         ({"attention_bias": True}, "attention_bias"),
                         ({"use_sliding_window": True}, "use_sliding_window"),
                         ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "architectures")]:
        with pytest.raises(ValueError, match=field):
            hc.megatron_config_from_hf(dict(good, **patch))
    with pytest.raises(KeyError, match="output_layer.weight"):
        sd = {"embedding.word_embeddings.weight": torch.zeros(VOCAB, 64)}
        hc.megatron_to_hf(dict(sd, **{"decoder.final_layernorm.weight": torch.ones(64)}),
                          dict(good, num_hidden_layers=0))
