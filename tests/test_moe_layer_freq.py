"""--moe-layer-freq as Megatron-LM takes it: an int k (layers 0, k, 2k, ... are MoE) or a 0/1 list
per layer, written as a Python list expression ("[0,1,1,1]", "([0]*1+[1]*3)*2"; DeepSeek-style
"first layers dense" recipes need the list). Which layers become MoE is megatron-core's decision
(get_gpt_decoder_block_spec); what is ours is parsing the flag safely, refusing bad patterns before
compute, and comparing patterns, not spellings, on resume."""
from __future__ import annotations

import pytest

from megatron.core.transformer.moe.moe_layer import MoELayer
from tst_megatron.arguments import parse_args, validate
from tst_megatron.builders import count_parameters, transformer_config
from tst_megatron.preflight import check_resume_compatible
from tst_megatron.specs import gpt_block_spec
from dist_utils import init_single_process
from trainer_utils import assert_ok, base_args, checkpoint_model_tensors, make_data, numel, run_trainer

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

MOE4 = ["--data-path", "x", "--vocab-size", "256", "--num-layers", "4", "--hidden-size", "64",
        "--num-attention-heads", "4", "--num-experts", "4", "--disable-bias-linear"]


def _cfg(freq: str):
    cfg = parse_args(MOE4 + ["--moe-layer-freq", freq])
    validate(cfg, 1)
    return cfg


@pytest.mark.parametrize("freq, pattern", [
    ("1", [1, 1, 1, 1]), ("2", [1, 0, 1, 0]), ("3", [1, 0, 0, 1]),
    ("[0,1,1,1]", [0, 1, 1, 1]), ("([0]*1+[1]*3)", [0, 1, 1, 1]), ("[1, 0] * 2", [1, 0, 1, 0]),
    ("([0]+[1])*2", [0, 1, 0, 1])])
def test_megatron_core_builds_moe_exactly_where_the_flag_says(freq, pattern):
    init_single_process()  # megatron's block spec asks the pipeline group which layers it holds
    cfg = _cfg(freq)
    assert [int(x) for x in cfg.model.moe_layer_pattern()] == pattern
    tc = transformer_config(cfg.model, cfg.parallel, cfg.optim, use_cpu_init=True)
    block = gpt_block_spec(tc, use_transformer_engine=False)  # megatron's own layer-pattern logic
    built = [int(spec.submodules.mlp.module is MoELayer) for spec in block.layer_specs]
    assert built == pattern


@pytest.mark.parametrize("freq", ["0", "-1", "[2,0,1,1]", "[]", "[1.0,0,1,1]", "__import__('os').getcwd()",
                                  "[1]*'4'", "[1,0]+1", "lots", "[1]*10**9", "[1]*1000000000", "[[1]*100000,[1]*100000]",
                                  "+".join(["[1]*100000"] * 3), "[1]+[1]*100000", "[[1],[0]]",
                                  "[]*100000000000000000000000"])
def test_what_is_not_a_layer_pattern_is_refused_by_the_parser(freq, capsys):
    with pytest.raises(SystemExit):
        parse_args(MOE4 + ["--moe-layer-freq", freq])
    err = capsys.readouterr().err
    assert "--moe-layer-freq" in err and "list of 0/1 per layer" in err


@pytest.mark.parametrize("freq, message", [
    ("[1,0]", "--moe-layer-freq: a list of 2 entries for --num-layers 4"),
    ("[0,0,0,0]", "--moe-layer-freq makes no layer MoE")])
def test_patterns_that_do_not_fit_the_model_are_refused_before_compute(freq, message):
    with pytest.raises(SystemExit) as exc:
        validate(parse_args(MOE4 + ["--moe-layer-freq", freq]), 1)
    assert message in str(exc.value.code)


def test_resume_compares_the_layers_not_the_spelling():
    meta = {"args": _cfg("2").to_dict()}
    check_resume_compatible(_cfg("[1,0,1,0]"), meta, "ckpt")      # the same layers: accepted
    check_resume_compatible(_cfg("([1]+[0])*2"), meta, "ckpt")
    with pytest.raises(SystemExit) as exc:
        check_resume_compatible(_cfg("[0,1,1,1]"), meta, "ckpt")  # other layers: another model
    assert "--moe-layer-freq [0, 1, 1, 1] (checkpoint: [1, 0, 1, 0])" in str(exc.value.code)


def _sharded_keys(freq: str) -> set:
    """The keys megatron-core's dist checkpoint gives the model built with this --moe-layer-freq."""
    from megatron.core.models.gpt import GPTModel

    init_single_process()
    cfg = _cfg(freq)
    tc = transformer_config(cfg.model, cfg.parallel, cfg.optim, use_cpu_init=True)
    model = GPTModel(config=tc, transformer_layer_spec=gpt_block_spec(tc, use_transformer_engine=False),
                     vocab_size=256, max_sequence_length=64)
    return {v.key for v in model.sharded_state_dict().values() if hasattr(v, "key")}


def test_the_spelling_decides_megatron_cores_checkpoint_layout_and_resume_says_so():
    """1 and [1, 1, 1, 1] are the same layers, but megatron-core stores the first stacked
    ("decoder.layers.mlp...") and any list or int > 1 one entry per layer: a resume across the two
    cannot load, so it is refused before compute with the spelling to give; 2 and [1, 0, 1, 0]
    share a layout and resume."""
    keys = {f: _sharded_keys(f) for f in ("1", "[1,1,1,1]", "2", "[1,0,1,0]")}
    assert keys["1"] != keys["[1,1,1,1]"] and keys["2"] == keys["[1,0,1,0]"]
    for a, b in (("1", "[1,1,1,1]"), ("[1,1,1,1]", "1")):
        with pytest.raises(SystemExit) as exc:
            check_resume_compatible(_cfg(b), {"args": _cfg(a).to_dict()}, "ckpt")
        spelled = a if a == "1" else '"[1,1,1,1]"'
        assert "megatron-core's layout follows the spelling" in str(exc.value.code)
        assert str(exc.value.code).endswith(f"Give --moe-layer-freq {spelled} as the checkpoint did")
    check_resume_compatible(_cfg("[1,0,1,0]"), {"args": _cfg("2").to_dict()}, "ckpt")


def test_a_dense_first_layer_trains_and_is_saved_without_experts(tmp_path):
    """pretrain_tst.py with "[0,1,1]": the checkpoint (read through its own metadata) holds experts
    for layers 1 and 2 only, and the parameter count the trainer uses for its TFLOP/s is the
    checkpoint's."""
    data = make_data(str(tmp_path / "d"))
    argv = base_args(data, num_layers=3, num_experts=4, disable_bias_linear=True, moe_layer_freq="[0,1,1]",
                     train_iters=2, eval_iters=0, tst_superposition_iters=1, save=tmp_path / "ckpt", save_interval=2)
    res = assert_ok(run_trainer(argv, 1))
    tensors = checkpoint_model_tensors(str(tmp_path / "ckpt" / "iter_0000002"))
    moe_layers = sorted({int(k.split("layers.")[1].split(".")[0]) for k in tensors if ".mlp.experts." in k})
    assert moe_layers == [1, 2]
    vocab = int(res.stdout.split(" vocab ")[1].split(";")[0])  # the padded vocabulary the run built
    total, _ = count_parameters(parse_args(argv).model, vocab)
    assert total == sum(numel(s) for s in tensors.values())



def test_moe_layers_keep_transformer_engines_checkpoint_names():
    """The names megatron-core's TE spec gives (get_gpt_layer_with_transformer_engine_spec): the
    input norm and a dense layer's pre-MLP norm fused into the next linear (`...layer_norm_weight`),
    an MoE layer's pre-MLP norm a module of its own (`pre_mlp_layernorm.weight`). The local spec
    this CPU build uses files the MoE norm under the dense name too; ours keeps TE's, so an MoE
    checkpoint moves between machines with and without Transformer Engine."""
    norms = sorted(k for k in _sharded_keys("[0,1,1,1]") if "norm" in k)
    assert norms == ["decoder.final_layernorm.weight", "decoder.layers.0.mlp.linear_fc1.layer_norm_weight"] + [
        f"decoder.layers.{i}.{name}" for i in range(4) for name in
        ((["pre_mlp_layernorm.weight"] if i else []) + ["self_attention.linear_qkv.layer_norm_weight"])]
    assert "decoder.layers.pre_mlp_layernorm.weight" in _sharded_keys("1")


def test_parameter_count_is_the_built_models_with_biases():
    """count_parameters (--print-model-size, TFLOP/s) against the model megatron-core builds, biases
    on: the router's bias per expert included."""
    from tst_megatron.builders import build_model_chunks

    init_single_process()
    cfg = parse_args(["--data-path", "x", "--vocab-size", "256", "--num-layers", "2", "--hidden-size", "64",
                      "--num-attention-heads", "4", "--num-experts", "4", "--moe-layer-freq", "[0,1]"])
    validate(cfg, 1)
    tc = transformer_config(cfg.model, cfg.parallel, cfg.optim, use_cpu_init=True)
    (model,) = build_model_chunks(cfg, tc, 256)
    assert any(name.endswith("router.bias") for name, _ in model.named_parameters())
    assert count_parameters(cfg.model, 256)[0] == sum(p.numel() for p in model.parameters())
