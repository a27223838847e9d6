"""The MoE router flags of modern MoE recipes (DeepSeek-V3 style): --moe-router-score-function
sigmoid, aux-loss-free balancing (--moe-router-enable-expert-bias, --moe-router-bias-update-rate),
--moe-router-topk-scaling-factor, group-limited routing (--moe-router-num-groups/-group-topk),
token dropping (--moe-expert-capacity-factor, --moe-pad-expert-input-to-capacity,
--moe-token-drop-policy). The routing itself is megatron-core's; what is ours is that each flag
reaches it, that bad combinations stop before compute, and that the expert bias -- router state
that is not a parameter -- moves once per global batch and travels in the checkpoint.
"""
from __future__ import annotations

import math

import pytest

from tst_megatron.arguments import parse_args, validate
from tst_megatron.builders import transformer_config

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

MOE = ["--data-path", "x", "--vocab-size", "256", "--num-layers", "2", "--num-experts", "4", "--disable-bias-linear"]
ROUTER = dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True, moe_router_bias_update_rate=0.002,
              moe_router_topk_scaling_factor=2.5, moe_router_num_groups=2, moe_router_group_topk=1,
              moe_expert_capacity_factor=1.5, moe_token_drop_policy="position", moe_token_dispatcher_type="alltoall")


def _argv(flags: dict):
    out = []
    for key, value in flags.items():
        out.append("--" + key.replace("_", "-"))
        if value is not True:
            out.append(str(value))
    return out


def test_router_flags_reach_megatron_cores_config():
    cfg = parse_args(MOE + _argv(ROUTER))
    validate(cfg, 1)
    tc = transformer_config(cfg.model, cfg.parallel, cfg.optim, use_cpu_init=True)
    for key, value in ROUTER.items():
        assert getattr(tc, key) == value, key
    padded = parse_args(MOE + ["--moe-expert-capacity-factor", "1.0", "--moe-pad-expert-input-to-capacity"])
    validate(padded, 1)
    assert transformer_config(padded.model, padded.parallel, padded.optim, True).moe_pad_expert_input_to_capacity
    # sigmoid scores need no pre-softmax for top-1 (megatron-core refuses it only for softmax)
    validate(parse_args(MOE + ["--moe-router-topk", "1", "--moe-router-score-function", "sigmoid"]), 1)


@pytest.mark.parametrize("argv, message", [
    (["--moe-router-enable-expert-bias"], "--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid"),
    (["--moe-router-num-groups", "2"], "group-limited routing needs both --moe-router-num-groups and "
                                       "--moe-router-group-topk (got --moe-router-num-groups alone)"),
    (["--moe-router-num-groups", "3", "--moe-router-group-topk", "1"],
     "--moe-router-num-groups (3) must divide --num-experts (4)"),
    (["--moe-router-num-groups", "2", "--moe-router-group-topk", "3"],
     "--moe-router-group-topk (3) must be in [1, --moe-router-num-groups (2)]"),
    (["--moe-router-num-groups", "4", "--moe-router-group-topk", "1"],
     "--moe-router-topk (2) is more than the 1 experts that --moe-router-group-topk 1 group(s) of 1 hold"),
    (["--moe-expert-capacity-factor", "0"], "--moe-expert-capacity-factor must be a finite number > 0 (got 0.0)"),
    (["--moe-router-topk-scaling-factor", "-1"], "--moe-router-topk-scaling-factor must be a finite number > 0"),
    (["--moe-pad-expert-input-to-capacity"], "--moe-pad-expert-input-to-capacity pads to the capacity of "
                                             "--moe-expert-capacity-factor: give one"),
    (["--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias", "--moe-expert-capacity-factor", "1",
      "--moe-pad-expert-input-to-capacity"], "--moe-router-enable-expert-bias with --moe-pad-expert-input-to-capacity"),
    (["--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate",
      "nan"], "--moe-router-bias-update-rate must be a finite number >= 0"),
    (["--moe-router-bias-update-rate", "0.01"],
     "--moe-router-bias-update-rate sets the step of --moe-router-enable-expert-bias: give that too"),
    (["--moe-token-drop-policy", "position"],
     "--moe-token-drop-policy chooses what --moe-expert-capacity-factor drops: give a capacity factor"),
    (["--moe-router-num-groups", "2", "--moe-router-group-topk", "2", "--moe-router-topk", "1"],
     "--moe-router-topk (1) must be at least --moe-router-group-topk (2)"),
    (["--moe-aux-loss-coeff", "-0.01"], "--moe-aux-loss-coeff must be a finite number >= 0 (got -0.01)"),
    (["--moe-router-pre-softmax", "--moe-router-score-function", "sigmoid"],
     "--moe-router-pre-softmax with --moe-router-score-function sigmoid"),
])
def test_router_refusals(argv, message):
    with pytest.raises(SystemExit) as exc:
        validate(parse_args(MOE + argv), 1)
    assert str(exc.value.code).startswith(f"error: {message}"), exc.value.code


@pytest.mark.parametrize("flags", [["--moe-router-score-function", "sigmoid", "--moe-expert-capacity-factor", "1.5"],
                                   ["--moe-router-topk", "1"], ["--moe-aux-loss-coeff", "0.01"],
                                   ["--moe-ffn-hidden-size", "32"], ["--moe-layer-freq", "2"],
                                   ["--moe-token-dispatcher-type=alltoall"], ["--moe-router-pre-softmax"]])
def test_moe_flags_without_experts_are_refused(flags):
    """A copied MoE command without --num-experts would train a dense model with every MoE flag
    dropped: any flag of the group typed without it is refused, named (a default is not typed)."""
    dense = ["--data-path", "x", "--vocab-size", "256"]
    with pytest.raises(SystemExit) as exc:
        parse_args(dense + flags)
    named = [f.split("=")[0] for f in flags if f.startswith("--")]
    assert str(exc.value.code).startswith(f"error: {', '.join(named)} without --num-experts: the model would be "
                                          "dense"), exc.value.code
    validate(parse_args(dense), 1)  # the defaults of the same flags are no reason to refuse
    # a config built without the parser (e.g. from a checkpoint's record) is still checked by validate
    cfg = parse_args(dense)
    cfg.model.moe_router_score_function = "sigmoid"
    with pytest.raises(SystemExit, match="--moe-router-score-function configure the MoE router: they need"):
        validate(cfg, 1)


@pytest.fixture(scope="session")
def ws(tmp_path_factory):
    from trainer_utils import workspace

    return workspace(tmp_path_factory)


def test_expert_bias_moves_per_batch_and_resumes_exactly(ws, tmp_path):
    """EP=2 over 2 ranks through the TST switch with the router flags above (group-limited routing
    aside: with 2 experts a group it picks both experts of a group, and the bias of the pair moves
    together). The expert bias is a multiple of the update rate that moved at most one rate per
    step (megatron-core updates it once per global batch, in finalize_model_grads), has moved, and
    differs between the checkpoints of iterations 5 and 12; a run resumed from iteration 5 in a
    fresh process -- routing depends on the bias it restores -- has the uninterrupted run's losses
    exactly."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from trainer_utils import (MOE_FLAGS, TRAIN_ITERS, assert_ok, base_args, copy_checkpoint, run_trainer,
                               train_records)

    flags = dict(MOE_FLAGS, **{k: v for k, v in ROUTER.items() if "group" not in k})
    full = assert_ok(run_trainer(base_args(ws.data, save=tmp_path / "full", save_interval=5, **flags), nproc=2))
    tr = train_records(full.records)
    assert sorted(tr) == list(range(1, TRAIN_ITERS + 1)) and all(math.isfinite(r["loss"]) for r in tr.values())

    def bias(it):
        out = tmp_path / f"{it}.pt"
        dcp_to_torch_save(str(tmp_path / "full" / f"iter_{it:07d}"), str(out))
        (key,) = [k for k in torch.load(out, weights_only=False) if k.endswith("router.expert_bias")]
        return torch.load(out, weights_only=False)[key].double()

    rate = ROUTER["moe_router_bias_update_rate"]
    for it in (5, TRAIN_ITERS):
        steps = bias(it) / rate
        assert steps.shape == (2, 4)  # layers x experts
        assert torch.allclose(steps, steps.round(), atol=1e-3)  # (an fp32 buffer)
        assert 1 <= steps.round().abs().max() <= it  # it moved, at most a rate per step
    assert not torch.equal(bias(5), bias(TRAIN_ITERS))

    load = copy_checkpoint(str(tmp_path / "full"), 5, str(tmp_path / "resume"))
    res = assert_ok(run_trainer(base_args(ws.data, load=load, save=load, **flags), nproc=2), "resume")
    resumed = train_records(res.records)
    assert sorted(resumed) == list(range(6, TRAIN_ITERS + 1))
    assert [resumed[i]["loss"] for i in resumed] == [tr[i]["loss"] for i in resumed]


def test_router_losses_reduced_over_a_pipeline_with_a_dense_first_stage(tmp_path):
    """The MoE router losses of the log line at PP = 2, the only MoE layer on the second stage
    (worker `router_losses_pp2`, 2 Gloo ranks): no rank waits in a collective the other skips, and
    both end with the mean of the recorded values (their own loss e2e: test_trainer_e2e's EP=2 vs
    EP=1 comparison). Then, at EP = 2, the CPU initialisation gives each rank experts of its own
    and the same replicated dense weights (tst_megatron.cpu's expert-RNG piece)."""
    import dist_utils

    results = dist_utils.launch("router_losses_pp2", tmp_path, nproc=2, timeout=120)
    prefix = "router_losses_pp2/"
    names = dist_utils.check_records(results, expected_prefixes=[
        prefix + "values", prefix + "tracker_cleared", prefix + "ep2_experts_differ_across_ranks",
        prefix + "ep2_dense_weights_equal_across_ranks"])
    assert len(names) == 4, names


def test_router_losses_at_tp2_with_sequence_parallel_equal_tp1(ws, tmp_path):
    """An MoE checkpoint of a 1-rank run, resumed at TP = 2 with sequence parallelism (its weights
    re-sharded, the optimizer fresh): the first step's forward runs the same weights on the same
    batch, so its loss and both router losses equal the 1-rank run's at that iteration. The z loss
    megatron records per rank is averaged over the TP ranks too (each routes half the sequence)."""
    from trainer_utils import MOE_LOSS_FLAGS, assert_ok, base_args, copy_checkpoint, run_trainer, train_records

    flags = dict(num_experts=4, moe_router_topk=2, disable_bias_linear=True, train_iters=4, eval_iters=0,
                 eval_interval=None, tst_superposition_iters=2, **MOE_LOSS_FLAGS)
    one = assert_ok(run_trainer(base_args(ws.data, save=tmp_path / "tp1", save_interval=3, **flags), nproc=1))
    load = copy_checkpoint(str(tmp_path / "tp1"), 3, str(tmp_path / "tp2"))
    two = assert_ok(run_trainer(base_args(ws.data, load=load, save=load, no_load_optim=True, sequence_parallel=True,
                                          tensor_model_parallel_size=2, **flags), nproc=2), "TP=2 resume")
    a, b = train_records(one.records)[4], train_records(two.records)[4]
    for key in ("loss", "load_balancing_loss", "z_loss"):
        assert b[key] == pytest.approx(a[key], rel=1e-5), (key, a[key], b[key])
