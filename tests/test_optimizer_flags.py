"""The optimizer flags (--weight-decay, --adam-beta1/2, --adam-eps, --clip-grad, --lr) reach
megatron-core's optimizer with the semantics a Megatron user expects, judged by what two optimizer
steps do to the weights against AdamW with global-norm clipping written out here; plus the MoE
router flags reaching the TransformerConfig.

In-process, one rank: the trainer's own builders (model chunks, DDP, get_megatron_optimizer,
OptimizerParamScheduler) on a tiny GPT.
"""
import math

import pytest
import torch

import dist_utils
from tst_megatron.arguments import parse_args
from tst_megatron.builders import (build_model_chunks, build_optimizer, build_scheduler, padded_vocab_size,
                                   transformer_config, wrap_ddp)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning",
                                        "ignore::FutureWarning")

LR, WD, B1, B2, EPS, CLIP = 0.01, 0.25, 0.7, 0.8, 1e-3, 0.5


def _build(extra=()):
    dist_utils.init_single_process()
    cfg = parse_args(["--tokenizer-type", "NullTokenizer", "--vocab-size", "64", "--num-layers", "1",
                      "--hidden-size", "16", "--num-attention-heads", "2", "--seq-length", "8",
                      "--lr", str(LR), "--lr-decay-style", "constant", "--weight-decay", str(WD),
                      "--adam-beta1", str(B1), "--adam-beta2", str(B2), "--adam-eps", str(EPS),
                      "--clip-grad", str(CLIP), *extra])
    tconfig = transformer_config(cfg.model, cfg.parallel, cfg.optim, use_cpu_init=True)
    vocab = padded_vocab_size(65, cfg.model.make_vocab_size_divisible_by, 1)
    model = wrap_ddp(build_model_chunks(cfg, tconfig, vocab), tconfig, cfg.parallel)
    optimizer = build_optimizer(model, cfg.optim, cfg.parallel)
    return cfg, tconfig, model, optimizer


def _reference_step(p, g, state, step, decay):
    """torch-style AdamW (decoupled decay) on an already clipped gradient."""
    m = state.get("m", torch.zeros_like(p)) * B1 + (1 - B1) * g
    v = state.get("v", torch.zeros_like(p)) * B2 + (1 - B2) * g * g
    state.update(m=m, v=v)
    m_hat, v_hat = m / (1 - B1 ** step), v / (1 - B2 ** step)
    return p * (1 - LR * (WD if decay else 0.0)) - LR * m_hat / (v_hat.sqrt() + EPS)


def test_adamw_flags_and_global_norm_clipping_follow_their_definitions():
    cfg, _, model, optimizer = _build()
    build_scheduler(optimizer, cfg.optim)  # sets the LR of step 0 (constant: --lr)
    params = [(n, p) for n, p in model[0].named_parameters()]
    ref = {n: p.detach().clone().double() for n, p in params}
    states = {n: {} for n, _ in params}
    g = torch.Generator().manual_seed(0)
    for step, scale in ((1, 3.0), (2, 1e-3)):  # one step clipped, one not
        grads = {n: torch.randn(p.shape, generator=g, dtype=torch.float64) * scale
                 * torch.exp(torch.randn(p.shape, generator=g, dtype=torch.float64)) for n, p in params}
        for chunk in model:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        for n, p in params:
            p.main_grad.copy_(grads[n].float())
        ok, grad_norm, _ = optimizer.step()
        assert ok
        norm = math.sqrt(sum(float((x.float().double() ** 2).sum()) for x in grads.values()))
        assert grad_norm == pytest.approx(norm, rel=1e-5)  # the norm before clipping, as Megatron logs it
        coef = min(1.0, CLIP / (norm + 1e-6))
        assert (coef < 1.0) == (step == 1)
        for n, p in params:
            # Megatron's rule: no weight decay on biases and 1-D parameters (norm weights)
            decay = not (n.endswith(".bias") or p.dim() == 1)
            ref[n] = _reference_step(ref[n], grads[n].float().double() * coef, states[n], step, decay)
            torch.testing.assert_close(p.detach().double(), ref[n], rtol=2e-5, atol=2e-6, msg=f"{n} step {step}")


def test_moe_router_flags_reach_the_transformer_config():
    _, tconfig, model, _ = _build(["--num-experts", "4", "--moe-router-topk", "3", "--moe-aux-loss-coeff", "0.03",
                                    "--moe-router-load-balancing-type", "seq_aux_loss", "--disable-bias-linear"])
    assert tconfig.num_moe_experts == 4 and tconfig.moe_router_topk == 3  # not the default (2)
    routers = [m for m in model[0].modules() if type(m).__name__ == "TopKRouter"]
    assert routers and all(r.topk == 3 for r in routers)
    assert tconfig.moe_aux_loss_coeff == 0.03
    assert tconfig.moe_router_load_balancing_type == "seq_aux_loss"


@pytest.mark.parametrize("weighting", ["power", "exp", "first"])
def test_tst_bag_weighting_flag_reaches_the_loss(weighting):
    """--tst-bag-weighting sets the weights the model's multi-hot loss uses: the paper's 1/i,
    exp(-i) or first-only, normalised, written out here independently of TSTConfig."""
    _, _, model, _ = _build(["--tst-bag-size", "4", "--tst-superposition-ratio", "0.3",
                             "--tst-bag-weighting", weighting])
    raw = {"power": [1 / i for i in range(1, 5)], "exp": [math.exp(-i) for i in range(1, 5)],
           "first": [1.0, 0.0, 0.0, 0.0]}[weighting]
    want = [w / sum(raw) for w in raw]
    got = model[0].module.bag_weights
    assert got == pytest.approx(want, rel=1e-12, abs=0.0), (got, want)


@pytest.mark.parametrize("style", ["linear", "cosine", "exponential", "minus_sqrt"])
def test_lr_wsd_decay_style_follows_its_formula(style):
    """--lr-decay-style WSD --lr-wsd-decay-style X: constant peak, then over the last
    --lr-wsd-decay-iters steps lr = min + (peak - min) * f(t), t the fraction of the decay done,
    f = 1 - t (linear), (1 + cos(pi t)) / 2 (cosine), 2 * 0.5^t - 1 (exponential), 1 - sqrt(t)."""
    iters, decay, peak, low = 20, 8, 1e-3, 1e-4
    cfg, _, _, optimizer = _build(["--lr-decay-style", "WSD", "--lr-wsd-decay-style", style, "--train-iters",
                                   str(iters), "--lr-wsd-decay-iters", str(decay), "--lr", str(peak),
                                   "--min-lr", str(low)])
    scheduler = build_scheduler(optimizer, cfg.optim)
    f = {"linear": lambda t: 1 - t, "cosine": lambda t: (1 + math.cos(math.pi * t)) / 2,
         "exponential": lambda t: 2 * 0.5 ** t - 1, "minus_sqrt": lambda t: 1 - math.sqrt(t)}[style]
    for n in range(1, iters + 1):
        scheduler.step(1)
        t = max(0, n - (iters - decay)) / decay
        want = low + (peak - low) * f(t)
        got = optimizer.param_groups[0]["lr"]
        assert got == pytest.approx(want, rel=1e-9, abs=1e-15), (style, n, got, want)


def test_decoupled_lr_drives_the_embedding_and_output_layer():
    """--decoupled-lr / --decoupled-min-lr: the input embedding and output layer follow the same
    cosine schedule between their own peak and floor, every other weight between --lr and --min-lr
    (Megatron-LM's semantics), and the first Adam step moves each weight by its own lr."""
    iters, peak, low, dpeak, dlow = 10, 0.01, 0.001, 0.05, 0.004
    cfg, _, model, optimizer = _build(["--train-iters", str(iters), "--lr-decay-style", "cosine",
                                       "--lr", str(peak), "--min-lr", str(low), "--decoupled-lr", str(dpeak),
                                       "--decoupled-min-lr", str(dlow), "--untie-embeddings-and-output-weights",
                                       "--weight-decay", "0", "--clip-grad", "0"])
    scheduler = build_scheduler(optimizer, cfg.optim)
    named = list(model[0].named_parameters())
    decoupled = {"module.embedding.word_embeddings.weight", "module.output_layer.weight"}
    assert decoupled <= {n for n, _ in named}

    def group_lr(name):
        param = dict(named)[name]
        (group,) = [g for g in optimizer.param_groups if any(q is param for q in g["params"])]
        return group["lr"]

    def cosine(hi, lo, step):
        return lo + (hi - lo) * 0.5 * (1 + math.cos(math.pi * step / iters))

    for step in range(iters + 1):
        for name, _ in named:
            hi, lo = (dpeak, dlow) if name in decoupled else (peak, low)
            assert group_lr(name) == pytest.approx(cosine(hi, lo, step), rel=1e-9), (name, step)
        if step == 0:  # one Adam step at step 0's lr: -lr * g / (|g| + eps) (m_hat = g, v_hat = g^2)
            before = {n: p.detach().clone() for n, p in named}
            grads = {n: torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) for n, p in named}
            for chunk in model:
                chunk.zero_grad_buffer()
            for n, p in named:
                p.main_grad.copy_(grads[n])
            assert optimizer.step()[0]
            for n, p in named:
                lr = dpeak if n in decoupled else peak
                want = before[n] - lr * grads[n] / (grads[n].abs() + EPS)
                torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-7, msg=n)
        scheduler.step(1)


@pytest.mark.parametrize("style", ["linear", "cosine"])
def test_weight_decay_increment_and_warmup_init_follow_megatron_lm(style):
    """--start/--end-weight-decay over the whole run (Megatron-LM: wd_incr_steps = the training
    steps), written into the decayed parameter group only; --lr-warmup-init is where the linear
    warmup starts. Judged against the formulas, step by step, on the optimizer's own groups."""
    # the LR decays over 6 steps, the weight decay rises over all 10
    cfg, _, _, optimizer = _build(["--train-iters", "10", "--lr-decay-iters", "6", "--lr-warmup-iters", "4",
                                   "--lr-warmup-init", "0.002",
                                   "--start-weight-decay", "0.05", "--end-weight-decay", "0.25",
                                   "--weight-decay-incr-style", style])
    scheduler = build_scheduler(optimizer, cfg.optim)
    for step in range(0, 13):
        if step:
            scheduler.step(1)
        ratio = min(step, 10) / 10
        coeff = ratio if style == "linear" else 0.5 * (math.cos(math.pi * (1 - ratio)) + 1)
        want_wd = 0.05 + coeff * (0.25 - 0.05)
        want_lr = 0.002 + (LR - 0.002) * step / 4 if step <= 4 else None
        decays = sorted({g["weight_decay"] for g in optimizer.param_groups})
        assert decays == pytest.approx([0.0, want_wd]), (step, decays)  # biases / norms stay at 0
        if want_lr is not None:
            assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([want_lr] * len(optimizer.param_groups)), step


def test_ddp_bucket_size_splits_the_gradient_buffer():
    """--ddp-bucket-size reaches megatron's DDP: with --overlap-grad-reduce the gradient buffer is
    cut into buckets of about that many parameters (one bucket by default at this size)."""
    _, _, default, _ = _build(["--overlap-grad-reduce"])
    _, _, small, _ = _build(["--overlap-grad-reduce", "--ddp-bucket-size", "500"])
    n_default = sum(len(b.buckets) for b in default[0].buffers)
    n_small = sum(len(b.buckets) for b in small[0].buffers)
    assert n_default == 1 and n_small > 1 and small[0].ddp_config.bucket_size == 500


WD_BASE = ["--data-path", "x", "--vocab-size", "64", "--num-layers", "1", "--train-iters", "10"]


@pytest.mark.parametrize("argv, message", [
    (["--start-weight-decay", "0.1"], "--start-weight-decay needs --weight-decay-incr-style linear or cosine"),
    (["--start-weight-decay", "0.1", "--end-weight-decay", "0.1"],
     "--start-weight-decay and --end-weight-decay need --weight-decay-incr-style linear or cosine"),
    (["--weight-decay-incr-style", "linear", "--start-weight-decay", "0.2", "--end-weight-decay", "0.1"],
     "--end-weight-decay (0.1) must be >= --start-weight-decay (0.2): megatron's schedule only increases"),
    (["--ddp-bucket-size", "1000"], "--ddp-bucket-size needs --overlap-grad-reduce"),
    (["--weight-decay-incr-style", "linear", "--end-weight-decay", "0.1"],
     "--weight-decay-incr-style linear needs --start-weight-decay and --end-weight-decay"),
    (["--weight-decay-incr-style", "cosine", "--start-weight-decay", "-1", "--end-weight-decay", "0.1"],
     "--start-weight-decay must be a finite number >= 0 (got -1.0)"),
    (["--lr-warmup-init", "0.5", "--lr", "0.1"], "--lr-warmup-init must be in [0, --lr] (got 0.5)"),
    (["--ddp-bucket-size", "0", "--overlap-grad-reduce"], "--ddp-bucket-size must be >= 1 parameter (got 0)"),
])
def test_weight_decay_warmup_and_bucket_refusals(argv, message):
    from tst_megatron.arguments import validate
    with pytest.raises(SystemExit) as exc:
        validate(parse_args(WD_BASE + argv), 1)
    assert message in str(exc.value.code)


def test_resume_keeps_the_weight_decay_schedule():
    """A resume with another weight-decay schedule or warmup start is refused by name (megatron's
    scheduler would stop on a bare assertion); a checkpoint from before these flags resumes."""
    from tst_megatron.preflight import check_resume_compatible
    incr = ["--weight-decay-incr-style", "linear", "--start-weight-decay", "0.0", "--end-weight-decay", "0.1"]
    saved = parse_args(WD_BASE + incr).to_dict()
    check_resume_compatible(parse_args(WD_BASE + incr), {"args": saved}, "ckpt")
    with pytest.raises(SystemExit) as exc:
        check_resume_compatible(parse_args(WD_BASE + incr[:-1] + ["0.2"]), {"args": saved}, "ckpt")
    assert "--end-weight-decay 0.2 (checkpoint: 0.1)" in str(exc.value.code)
    old = parse_args(WD_BASE).to_dict()
    for key in ("lr_warmup_init", "start_weight_decay", "end_weight_decay", "weight_decay_incr_style"):
        del old["optim"][key]
    check_resume_compatible(parse_args(WD_BASE), {"args": old}, "ckpt")
    with pytest.raises(SystemExit) as exc:
        check_resume_compatible(parse_args(WD_BASE + ["--lr-warmup-init", "1e-4"]), {"args": old}, "ckpt")
    assert "--lr-warmup-init 0.0001 (checkpoint: 0.0)" in str(exc.value.code)
