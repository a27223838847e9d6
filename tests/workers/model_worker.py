"""Multi-rank checks on Gloo, launched by tests/dist_utils.py:

    python -m torch.distributed.run --nproc-per-node 2 tests/workers/model_worker.py SCENARIO OUTDIR

Each rank records named comparisons (got vs reference, tolerance) into
OUTDIR/result_SCENARIO_rank{r}.json; the pytest side asserts them. Any exception exits non-zero.

Scenarios (2 ranks each):
  loss_tp2    multi-hot CE with the vocabulary split over 2 ranks == TP = 1 == the paper's loop.
  embedding   bag embedding at TP = 2 and TP = 2 + sequence parallel == TP = 1 == mean of the s
              embeddings computed independently (forward output and word-embedding weight grad).
  router_losses_pp2  MoE router losses reduced over a pipeline whose first stage has no MoE layer.
  model_tp2, model_pp2, model_dp2, model_ep2
              TSTGPTModel (dense; and MoE with 4 experts, top-2, aux loss) in both phases: the
              single-rank run is computed first (TP = PP = EP = 1), its weights saved with megatron
              dist_checkpointing, the layout is re-initialised, the weights loaded, and the same
              steps (megatron schedule + DDP + megatron SGD) must give the same losses, gradient
              norms and post-step losses.

Heavy imports live inside functions: dist_checkpointing's writer starts a spawn-context process that
re-imports this module as __mp_main__, and that must stay cheap and side-effect free.
"""
import json
import os
import sys
import time
import traceback
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parents[1]
RECORDS = {}
INFO = {}
T0 = time.time()


def log(*a):
    import torch.distributed as dist

    r = dist.get_rank() if dist.is_initialized() else -1
    print(f"[rank{r} {time.time() - T0:6.1f}s]", *a, flush=True)


# ----------------------------------------------------------------------------- recording
def rec(name, got, ref, atol, rtol=0.0):
    import torch

    got = torch.as_tensor(got).detach().double()
    ref = torch.as_tensor(ref).detach().double()
    if got.shape != ref.shape:
        RECORDS[name] = {"ok": False, "detail": f"shape {tuple(got.shape)} != {tuple(ref.shape)}"}
        return
    err = (got - ref).abs()
    ok = bool(torch.isfinite(got).all()) and bool((err <= atol + rtol * ref.abs()).all())
    entry = {"ok": ok, "detail": f"max|diff|={err.max().item():.3g} atol={atol:g} rtol={rtol:g}"}
    if got.numel() <= 8:
        entry["detail"] += f" got={got.flatten().tolist()} ref={ref.flatten().tolist()}"
    RECORDS[name] = entry


def flag(name, ok, detail=""):
    RECORDS[name] = {"ok": bool(ok), "detail": detail}


def all_gather_cat(t, dim, group=None):
    import torch
    import torch.distributed as dist

    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t, group=group)
    return torch.cat(parts, dim=dim)


# ----------------------------------------------------------------------------- loss TP=2
def scenario_loss_tp2(outdir):
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(TESTS_DIR))
    import dist_utils
    from megatron.core import parallel_state as ps

    from tst_megatron.config import WEIGHTINGS, TSTConfig
    from tst_megatron.loss import multi_hot_cross_entropy as mce

    rank, world = dist.get_rank(), dist.get_world_size()
    V, lead = 256, (5, 3)
    shard = V // world
    lo, hi = rank * shard, (rank + 1) * shard
    assert not ps.model_parallel_is_initialized()

    def one(tag, s, weights, seed, dtype=torch.float32, group=dist.group.WORLD, atol=1e-5, gatol=1e-6,
            grtol=1e-5):
        logits, labels = dist_utils.make_bag_case(lead, V, s, seed, dtype=dtype)
        up = torch.randn(lead, generator=torch.Generator().manual_seed(seed + 1))
        full = logits.clone().requires_grad_(True)
        l1 = mce(full, labels, weights, tp_group=None)  # TP = 1: megatron not initialised here
        (l1 * up).sum().backward()
        part = logits[..., lo:hi].clone().requires_grad_(True)
        l2 = mce(part, labels, weights, tp_group=group)
        (l2 * up).sum().backward()
        assert part.grad.dtype == dtype
        grad2 = all_gather_cat(part.grad, dim=-1)
        rec(f"{tag}/loss_vs_tp1", l2, l1, atol)
        rec(f"{tag}/grad_vs_tp1", grad2.float(), full.grad.float(), gatol, grtol)
        # the model's form: gradient written into the (non-leaf) logits shard itself
        leaf = logits[..., lo:hi].clone().requires_grad_(True)
        shard_logits = leaf * 1.0
        l3 = mce(shard_logits, labels, weights, tp_group=group, inplace_backward=True)
        (l3 * up).sum().backward()
        rec(f"{tag}/inplace_grad_vs_out_of_place", leaf.grad.float(), part.grad.float(), 0.0, 0.0)
        ref = dist_utils.reference_mce(logits.float(), labels, weights)
        rec(f"{tag}/loss_vs_loop", l2, ref, atol)
        # the labels of this case do reach both shards
        valid = labels[labels >= 0]
        flag(f"{tag}/labels_span_both_shards", (valid < shard).any() and (valid >= shard).any())

    seed = 0
    # the Triton interpreter's run (test_loss_triton.py) is ~10x slower per case: fewer cases there
    few = os.environ.get("TST_MCE_KERNEL") == "triton"
    for s in ((1, 4, 16) if few else (1, 2, 4, 8, 16)):
        if few:
            names = ("power", "fitted") if s == 4 else ("uniform",)
        else:
            names = WEIGHTINGS if s == 4 else ("uniform", "power")
        for w in names:
            seed += 10
            one(f"loss_tp2/s{s}/{w}", s, TSTConfig(bag_size=s, bag_weighting=w).bag_weights(), seed)
    # -inf logits at each shard's local index 0 (the placeholder index for labels another shard owns)
    logits, labels = dist_utils.make_bag_case(lead, V, 4, 555)
    logits[..., 0] = logits[..., shard] = float("-inf")
    labels[(labels == 0) | (labels == shard)] = 1
    part = logits[..., lo:hi].clone().requires_grad_(True)
    l2 = mce(part, labels, [0.4, 0.3, 0.2, 0.1], tp_group=dist.group.WORLD)
    l2.sum().backward()
    flag("loss_tp2/minus_inf_logits/finite", bool(torch.isfinite(l2).all() and torch.isfinite(part.grad).all()),
         f"loss {l2.tolist()}")
    rec("loss_tp2/minus_inf_logits/loss_vs_loop", l2, dist_utils.reference_mce(logits, labels, [0.4, 0.3, 0.2, 0.1]),
        1e-5)
    one("loss_tp2/bf16/s4", 4, TSTConfig(bag_size=4, bag_weighting="power").bag_weights(), 999,
        dtype=torch.bfloat16, gatol=1e-5, grtol=1.6e-2)

    # tp_group=None picks megatron's tensor-parallel group once parallel_state is initialised
    ps.initialize_model_parallel(tensor_model_parallel_size=world)
    logits, labels = dist_utils.make_bag_case(lead, V, 6, 77)
    part = mce(logits[..., lo:hi], labels, [1.0] * 6)
    rec("loss_tp2/default_group/loss_vs_loop", part, dist_utils.reference_mce(logits, labels, [1.0] * 6), 1e-5)

    # label range is checked against the global vocabulary, before any collective
    lab = torch.full((*lead, 2), V - 1)
    lab[..., 1] = 0
    try:
        mce(logits[..., lo:hi], lab)
        flag("loss_tp2/label_in_other_shard_ok", True)
    except ValueError as e:
        flag("loss_tp2/label_in_other_shard_ok", False, str(e))
    lab[0, 0, 0] = V
    try:
        mce(logits[..., lo:hi], lab)
        flag("loss_tp2/out_of_vocab_raises", False, "no error for label == V")
    except ValueError as e:
        flag("loss_tp2/out_of_vocab_raises", "outside the vocabulary" in str(e), str(e))
    ps.destroy_model_parallel()


# ----------------------------------------------------------------------------- embedding
def scenario_embedding(outdir):
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from megatron.core import parallel_state as ps
    from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
    from megatron.core.transformer.transformer_config import TransformerConfig

    from tst_megatron.cpu import model_parallel_manual_seed
    from tst_megatron.embedding import BagVocabParallelEmbedding, enable_bag_inputs

    V, Hd, L, b, s, maxlen = 96, 32, 8, 3, 5, 16
    g = torch.Generator().manual_seed(0)
    W = torch.randn(V, Hd, generator=g)
    P = torch.randn(maxlen, Hd, generator=g)
    ids = torch.randint(0, V, (b, L, s), generator=g)
    ids[0, 0, :] = ids[0, 0, 0]  # a bag of one repeated token
    ids[1, 2, 1] = ids[1, 2, 3]  # a duplicate inside a bag
    gout = torch.randn(L, b, Hd, generator=g)
    pos = torch.arange(L).expand(b, L)

    def independent(pos_type):
        """Mean of the s embeddings, each looked up on its own, in float64; [L, b, h] like megatron."""
        Wr = W.double().requires_grad_(True)
        emb = sum(F.embedding(ids[..., j], Wr) for j in range(s)) / s
        if pos_type == "learned_absolute":
            emb = emb + P.double()[pos]
        out = emb.transpose(0, 1)
        (out * gout.double()).sum().backward()
        return out.detach(), Wr.grad

    def run(tp, sp, pos_type, dtype=torch.float32, bags=True):
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        ps.initialize_model_parallel(tensor_model_parallel_size=tp)
        model_parallel_manual_seed(0)
        cfg = TransformerConfig(num_layers=1, hidden_size=Hd, num_attention_heads=4, use_cpu_initialization=True,
                                tensor_model_parallel_size=tp, sequence_parallel=sp, hidden_dropout=0.0)
        emb = LanguageModelEmbedding(cfg, V, maxlen, position_embedding_type=pos_type)
        enable_bag_inputs(emb)
        assert isinstance(emb.word_embeddings, BagVocabParallelEmbedding)
        r, n = ps.get_tensor_model_parallel_rank(), V // tp
        with torch.no_grad():
            emb.word_embeddings.weight.copy_(W[r * n:(r + 1) * n])
            if pos_type == "learned_absolute":
                emb.position_embeddings.weight.copy_(P)
        emb.to(dtype)
        out = emb(ids if bags else ids[..., 0], pos)
        go = gout[r * (L // tp):(r + 1) * (L // tp)] if sp else gout
        assert out.shape == go.shape, (out.shape, go.shape)
        out.backward(go.to(dtype))
        group = ps.get_tensor_model_parallel_group()
        full_out = all_gather_cat(out.detach(), 0, group) if sp else out.detach()
        grad = emb.word_embeddings.weight.grad
        full_grad = all_gather_cat(grad, 0, group) if tp > 1 else grad
        return full_out.double(), full_grad.double()

    world = dist.get_world_size()
    for pos_type in ("rope", "learned_absolute"):
        ref_out, ref_grad = independent(pos_type)
        out1, grad1 = run(1, False, pos_type)
        rec(f"embedding/{pos_type}/tp1/out_vs_independent", out1, ref_out, 1e-6)
        rec(f"embedding/{pos_type}/tp1/wgrad_vs_independent", grad1, ref_grad, 1e-6)
        for sp in (False, True):
            out2, grad2 = run(world, sp, pos_type)
            tag = f"embedding/{pos_type}/tp{world}{'_sp' if sp else ''}"
            rec(f"{tag}/out_vs_tp1", out2, out1, 1e-6)
            rec(f"{tag}/wgrad_vs_tp1", grad2, grad1, 1e-6)
            rec(f"{tag}/out_vs_independent", out2, ref_out, 1e-6)
    # [b, L] token input keeps megatron's own path at TP = 2
    out_tok, _ = run(world, False, "rope", bags=False)
    rec("embedding/tokens_2d/tp2/out_vs_lookup", out_tok, W.double()[ids[..., 0]].transpose(0, 1), 1e-7)
    # bf16 weights: the mean is accumulated in fp32 and rounded to bf16 once -- at TP = 2 too, where
    # the per-rank parts are reduced in fp32, so TP = 2 (with and without SP) equals TP = 1 exactly
    ref_bf = sum(W.to(torch.bfloat16).double()[ids[..., j]] for j in range(s)) / s
    out_bf1, grad_bf1 = run(1, False, "rope", dtype=torch.bfloat16)
    rec("embedding/bf16/tp1/out_vs_independent", out_bf1, ref_bf.transpose(0, 1), 0, 2 ** -8)
    for sp in (False, True):
        out_bf2, grad_bf2 = run(world, sp, "rope", dtype=torch.bfloat16)
        tag = f"embedding/bf16/tp{world}{'_sp' if sp else ''}"
        rec(f"{tag}/out_vs_independent", out_bf2, ref_bf.transpose(0, 1), 0, 2 ** -8)
        rec(f"{tag}/out_vs_tp1", out_bf2, out_bf1, 0.0, 0.0)
        rec(f"{tag}/wgrad_vs_tp1", grad_bf2, grad_bf1, 0.0, 0.0)
    ps.destroy_model_parallel()


# ----------------------------------------------------------------------------- models
V_M, L_M, B_M, S_M, LR = 128, 8, 2, 4, 0.5


def model_config(kind, tp=1, pp=1, ep=1, sp=False):
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    kw = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
              normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
              qk_layernorm=True, use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
              params_dtype=torch.float32, pipeline_dtype=torch.float32, batch_p2p_sync=False,
              tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep,
              sequence_parallel=sp)
    if kind == "moe":
        kw.update(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=64, moe_aux_loss_coeff=1e-2,
                  moe_token_dispatcher_type="alltoall")
    return TransformerConfig(**kw)


def build_model(cfg, seed, tied=False):
    from megatron.core import parallel_state as ps

    from tst_megatron.config import TSTConfig
    from tst_megatron.cpu import model_parallel_manual_seed
    from tst_megatron.model import TSTGPTModel
    from tst_megatron.specs import gpt_block_spec

    model_parallel_manual_seed(seed)
    return TSTGPTModel(config=cfg, transformer_layer_spec=gpt_block_spec(cfg), vocab_size=V_M,
                       max_sequence_length=64, position_embedding_type="rope",
                       share_embeddings_and_output_weights=tied,
                       pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
                       bag_weights=TSTConfig(bag_size=S_M, bag_weighting="power").bag_weights())


def make_batches():
    """Two micro-batches per phase. Superposition: [b, L, s] bags of a token stream and the next bag
    as labels (the last position has only its first target); recovery: [b, L] next-token."""
    import torch

    g = torch.Generator().manual_seed(1234)
    out = {}
    for phase in ("superposition", "recovery"):
        mbs = []
        for _ in range(2):
            stream = torch.randint(0, V_M, (B_M, L_M * S_M + 1), generator=g)
            if phase == "superposition":
                tokens = stream[:, :L_M * S_M].reshape(B_M, L_M, S_M)
                lab = torch.full((B_M, L_M * S_M), -100, dtype=torch.long)
                lab[:, :L_M * S_M - S_M + 1] = stream[:, S_M:]
                labels = lab.reshape(B_M, L_M, S_M)
            else:
                tokens, labels = stream[:, :L_M], stream[:, 1:L_M + 1]
            mbs.append(dict(tokens=tokens, labels=labels, position_ids=torch.arange(L_M).expand(B_M, L_M)))
        out[phase] = mbs
    return out


def _loss_func(output_tensor):
    loss = output_tensor.float().mean()
    return loss, {"loss": loss.detach().clone()}


def _forward_step(data_iterator, model):
    b = next(data_iterator)
    return model(b["tokens"], b["position_ids"], None, labels=b["labels"]), _loss_func


def run_schedule(model, batches, forward_only):
    """Megatron's schedule for the current layout; returns the per-micro-batch losses (last stage)."""
    import contextlib

    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    ctx = torch.no_grad() if forward_only else contextlib.nullcontext()
    with ctx:
        res = get_forward_backward_func()(
            forward_step_func=_forward_step, data_iterator=iter(batches), model=model,
            num_microbatches=len(batches), seq_length=L_M, micro_batch_size=B_M, forward_only=forward_only)
    return [float(r["loss"]) for r in res]


def reference_run(kind, ckpt_dir, batches):
    """TP = PP = EP = 1 on every rank (no cross-rank traffic in the model): save the initial weights,
    then eval / SGD-step / eval through both phases. Plain p.grad and a hand-written SGD step."""
    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel()
    model = build_model(model_config(kind), seed=5, tied=kind == "dense_tied")
    if dist.get_rank() == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)
    dist.barrier()

    def sgd_step(phase):
        model.zero_grad(set_to_none=True)
        losses = run_schedule(model, batches[phase], forward_only=False)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        n_params = sum(1 for _ in model.parameters())
        assert len(grads) == n_params, f"{len(grads)} of {n_params} params got a gradient"
        norm = torch.sqrt(sum((gr.double() ** 2).sum() for gr in grads)).item()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(p.grad, alpha=-LR)
        return losses, norm

    ref = {"sup_pre": run_schedule(model, batches["superposition"], True),
           "rec_pre": run_schedule(model, batches["recovery"], True)}
    ref["sup_train"], ref["sup_gnorm"] = sgd_step("superposition")
    ref["rec_mid"] = run_schedule(model, batches["recovery"], True)
    ref["rec_train"], ref["rec_gnorm"] = sgd_step("recovery")
    ref["rec_post"] = run_schedule(model, batches["recovery"], True)
    ref["sup_post"] = run_schedule(model, batches["superposition"], True)
    ps.destroy_model_parallel()
    return ref


def layout_run(kind, ckpt_dir, batches, tp=1, pp=1, ep=1, sp=False):
    """Same weights, the given layout, megatron DDP + megatron SGD optimizer + schedule."""
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel as DDP
    from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 expert_model_parallel_size=ep)
    cfg = model_config(kind, tp=tp, pp=pp, ep=ep, sp=sp)
    model = build_model(cfg, seed=99, tied=kind == "dense_tied")  # different init: the checkpoint overwrites it
    state = dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir)
    model.load_state_dict(state)
    ddp = DDP(config=cfg, ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True), module=model)
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="sgd", lr=LR, sgd_momentum=0.0, weight_decay=0.0, clip_grad=1e9,
                        bf16=False, fp16=False, params_dtype=torch.float32), [ddp])
    cfg.no_sync_func = ddp.no_sync
    cfg.finalize_model_grads_func = finalize_model_grads

    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    # With data parallelism each replica takes its own micro-batch; otherwise every rank walks both.
    mine = {ph: ([mbs[dp_rank]] if dp > 1 else mbs) for ph, mbs in batches.items()}

    def sgd_step(phase):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        losses = run_schedule(ddp, mine[phase], forward_only=False)
        ok, gnorm, _ = opt.step()
        assert ok
        return losses, float(gnorm)

    got = {"sup_pre": run_schedule(ddp, mine["superposition"], True),
           "rec_pre": run_schedule(ddp, mine["recovery"], True)}
    got["sup_train"], got["sup_gnorm"] = sgd_step("superposition")
    got["rec_mid"] = run_schedule(ddp, mine["recovery"], True)
    got["rec_train"], got["rec_gnorm"] = sgd_step("recovery")
    got["rec_post"] = run_schedule(ddp, mine["recovery"], True)
    got["sup_post"] = run_schedule(ddp, mine["superposition"], True)
    info = dict(dp=dp, dp_rank=dp_rank, last_stage=ps.is_pipeline_last_stage(),
                n_local_params=sum(p.numel() for p in model.parameters()))
    ps.destroy_model_parallel()
    return got, info


LAYOUTS = {
    # name: [(kind, layout kwargs), ...]
    # dense_tied: input embedding shared with the output layer (megatron's default); at PP = 2 its
    # gradient is the sum of the first and the last stage's, all-reduced over the embedding group
    "model_tp2": [("dense", dict(tp=2)), ("dense", dict(tp=2, sp=True)), ("moe", dict(tp=2, sp=True)),
                  ("dense_tied", dict(tp=2, sp=True))],
    "model_pp2": [("dense", dict(pp=2)), ("moe", dict(pp=2)), ("dense_tied", dict(pp=2))],
    "model_dp2": [("dense", dict()), ("moe", dict())],
    "model_ep2": [("moe", dict(ep=2))],
}


def scenario_model(name, outdir):
    import torch.distributed as dist

    batches = make_batches()
    refs = {}
    for kind, lay in LAYOUTS[name]:
        if kind not in refs:
            ckpt = os.path.join(outdir, f"ckpt_{name}_{kind}")
            refs[kind] = (reference_run(kind, ckpt, batches), ckpt)
            log(f"reference {kind} done")
        ref, ckpt = refs[kind]
        got, info = layout_run(kind, ckpt, batches, **lay)
        tag = f"{name}/{kind}/" + ("_".join(f"{k}{v}" for k, v in lay.items()) or "dp2")
        INFO[tag] = dict(info, got=got, ref=ref)
        log(f"{tag} done: {got}")
        if not info["last_stage"]:
            flag(f"{tag}/non_last_stage_has_no_losses", all(len(v) == 0 for k, v in got.items()
                                                              if not k.endswith("gnorm")))
        else:
            for key in ("sup_pre", "rec_pre", "sup_train", "rec_mid", "rec_train", "rec_post", "sup_post"):
                want = [ref[key][info["dp_rank"]]] if info["dp"] > 1 else ref[key]
                rec(f"{tag}/{key}", got[key], want, 1e-5)
        for key in ("sup_gnorm", "rec_gnorm"):
            rec(f"{tag}/{key}", got[key], ref[key], 1e-6, 1e-5)
        # the SGD steps must move the loss by much more than the tolerance, or they prove nothing
        flag(f"{tag}/steps_change_loss",
             abs(ref["sup_post"][0] - ref["sup_pre"][0]) > 1e-2 and abs(ref["rec_post"][0] - ref["rec_mid"][0]) > 1e-2,
             f"ref {ref}")
        dist.barrier()
    if name == "model_tp2":
        stock_gpt_loads_tst_checkpoint(refs["dense"][1], batches, refs["dense"][0]["rec_pre"][0])


def stock_gpt_loads_tst_checkpoint(ckpt_dir, batches, ref_rec_pre0):
    """A TSTGPTModel dist-checkpoint is a plain megatron GPT checkpoint: a stock GPTModel at TP = 2
    loads it and produces the same next-token logits as TSTGPTModel loaded from it."""
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_model import GPTModel

    from tst_megatron.specs import gpt_block_spec

    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    cfg = model_config("dense", tp=2)
    tst = build_model(cfg, seed=7)
    stock = GPTModel(config=cfg, transformer_layer_spec=gpt_block_spec(cfg), vocab_size=V_M, max_sequence_length=64,
                     position_embedding_type="rope", share_embeddings_and_output_weights=False)
    for m in (tst, stock):
        m.load_state_dict(dist_checkpointing.load(m.sharded_state_dict(), ckpt_dir))
        m.eval()
    b = batches["recovery"][0]
    with torch.no_grad():
        a = tst(b["tokens"], b["position_ids"], None)
        c = stock(b["tokens"], b["position_ids"], None)
        loss_stock = stock(b["tokens"], b["position_ids"], None, labels=b["labels"]).mean()
    flag("model_tp2/stock_gpt_loads_tst_checkpoint/logits_equal", torch.equal(a, c),
         f"max|diff| {(a - c).abs().max().item():.3g}")
    rec("model_tp2/stock_gpt_loads_tst_checkpoint/loss_vs_ref", loss_stock, ref_rec_pre0, 1e-5)
    ps.destroy_model_parallel()


# ----------------------------------------------------------------------------- checkpoint file steps
def scenario_rank0_agreement(outdir):
    """checkpointing._on_rank0: a file step that fails on rank 0 only (a full disk at the tracker
    write) raises on every rank -- no rank is left waiting at a barrier -- and one that succeeds
    returns everywhere, the other ranks after it has run."""
    import torch.distributed as dist

    from tst_megatron import checkpointing as ckpt

    rank = dist.get_rank()
    marker = Path(outdir) / "written_by_rank0"

    def write():
        marker.write_text("done")

    ckpt._on_rank0(write)
    flag("rank0_agreement/success_seen_after_the_step", marker.read_text() == "done")

    def full_disk():
        raise OSError(28, "No space left on device")

    try:
        ckpt._on_rank0(full_disk)
        flag("rank0_agreement/failure_raises_everywhere", False, f"rank {rank}: no error")
    except OSError as exc:
        want = "No space left on device"
        flag("rank0_agreement/failure_raises_everywhere",
             want in str(exc) and (rank == 0) == (not str(exc).startswith("rank 0 failed")), str(exc))

    # --save on one filesystem for all: rank 0's new directory is seen everywhere (its probe removed)
    shared = Path(outdir) / "shared" / "iter_0000001.tmp"
    if rank == 0:
        shared.mkdir(parents=True)
    dist.barrier()
    ckpt._check_shared(str(shared.parent), str(shared))
    dist.barrier()
    flag("rank0_agreement/shared_save_directory_accepted", shared.is_dir() and not any(shared.iterdir()))
    # ...on node-local disks (simulated: a directory per rank, each made by its own rank, as torch's
    # writer does): refused on every rank, naming the rank that cannot see rank 0's directory
    local = Path(outdir) / f"node{rank}" / "iter_0000001.tmp"
    local.mkdir(parents=True)
    try:
        ckpt._check_shared(str(local.parent), str(local))
        flag("rank0_agreement/node_local_save_refused_everywhere", False, f"rank {rank}: no error")
    except ckpt.CheckpointError as exc:
        flag("rank0_agreement/node_local_save_refused_everywhere",
             "rank 1 (" in str(exc) and "rank 0 (" not in str(exc) and "filesystem shared by every node" in str(exc),
             str(exc))


def scenario_router_losses_pp2(outdir):
    """tst_megatron.moe_logging at PP = 2 with the only MoE layer on the second stage: the first
    stage's tracker is empty (no router), yet both ranks make the same collectives and end with
    the second stage's losses, averaged over layers and micro-batches; the tracker is cleared."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.moe_utils import (get_moe_layer_wise_logging_tracker,
                                                         save_to_aux_losses_tracker)

    from tst_megatron.moe_logging import reduce_router_losses
    from tst_megatron.run_config import ModelArgs

    ps.initialize_model_parallel(pipeline_model_parallel_size=2)
    m = ModelArgs(num_layers=2, num_experts=4, moe_layer_freq=[0, 1], moe_aux_loss_coeff=0.01, moe_z_loss_coeff=1e-3)
    if ps.get_pipeline_model_parallel_rank() == 1:  # two micro-batches through layer 2's router
        for lb, z in ((1.25, 0.5), (1.75, 0.75)):
            save_to_aux_losses_tracker("load_balancing_loss", torch.tensor(lb), 2, 2,
                                       reduce_group=ps.get_tensor_model_parallel_group())
            save_to_aux_losses_tracker("z_loss", torch.tensor(z), 2, 2)
    got = reduce_router_losses(m, microbatches=2, device=torch.device("cpu"))
    rec("router_losses_pp2/values", [got["load_balancing_loss"], got["z_loss"]], [1.5, 0.625], atol=1e-6)
    tracker = get_moe_layer_wise_logging_tracker()
    flag("router_losses_pp2/tracker_cleared", all(float(e["values"].abs().sum()) == 0 for e in tracker.values()))
    ps.destroy_model_parallel()

    # CPU initialisation at EP = 2: each rank's experts are its own (drawn under the expert RNG, as
    # on a GPU), not copies of the other rank's; the replicated dense weights are the same on both
    import torch.distributed as dist

    ps.initialize_model_parallel(expert_model_parallel_size=2)
    model = build_model(model_config("moe", ep=2), seed=5)
    params = dict(model.named_parameters())

    def both(name):
        mine = params[name].detach().reshape(-1).contiguous()
        out = [torch.empty_like(mine) for _ in range(2)]
        dist.all_gather(out, mine)
        return out

    experts = [n for n in params if ".experts." in n]
    dense = [n for n in params if ".experts." not in n]
    assert experts and dense, list(params)
    flag("router_losses_pp2/ep2_experts_differ_across_ranks",
         all(not torch.equal(*both(n)) for n in experts), experts)
    flag("router_losses_pp2/ep2_dense_weights_equal_across_ranks", all(torch.equal(*both(n)) for n in dense))
    ps.destroy_model_parallel()


# ----------------------------------------------------------------------------- main
def main():
    scenario, outdir = sys.argv[1], sys.argv[2]
    import torch
    import torch.distributed as dist

    from tst_megatron.cpu import enable_cpu_support

    torch.set_num_threads(1)
    enable_cpu_support()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        if scenario == "loss_tp2":
            scenario_loss_tp2(outdir)
        elif scenario == "embedding":
            scenario_embedding(outdir)
        elif scenario == "rank0_agreement":
            scenario_rank0_agreement(outdir)
        elif scenario == "router_losses_pp2":
            scenario_router_losses_pp2(outdir)
        elif scenario in LAYOUTS:
            scenario_model(scenario, outdir)
        else:
            raise SystemExit(f"unknown scenario {scenario!r}")
    except Exception:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # do not wait in a collective for a peer that may be stuck
    path = Path(outdir) / f"result_{scenario}_rank{rank}.json"
    path.write_text(json.dumps({"records": RECORDS, "info": INFO, "seconds": time.time() - T0}, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
