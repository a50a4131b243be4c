"""DSA continued training (DeepSeek-V3.2 report, sec. 2.1): turn a dense V3 checkpoint into a V3.2
model with the lightning indexer, in two stages.

  1. Dense warm-up: attention stays dense, everything but the indexers is frozen, and each indexer (the
     MTP block's included: it selects that block's keys in stage 2 and at inference) learns to match its
     layer's main attention: loss = sum_t KL(p_t || softmax(I_t)), p_t the head-summed attention,
     L1-normalised (lr 1e-3 in the report).
  2. Sparse training: top-k selection on, all parameters train on the LM (+MTP) loss; the indexer keeps
     learning from the KL restricted to the selected keys, with its input detached, so it learns only
     from its KL and the model only from the LM loss.

Reported: the indexer's recall of the dense attention's top-k, and the LM loss of the sparse model
against the dense model it started from (computed once: that model is frozen).

Under torchrun (`torchrun --nproc_per_node N -m nanoseek dsa [--ep E]`) the model is sharded as in pre-training
(FSDP2 over every rank, experts over ep) and each rank trains on its rows of the global batch. Freezing works
through FSDP2 as it is: the phase's requires_grad flags are set on the sharded parameters, which FSDP copies to
the gathered ones at every all-gather, and only parameters with a gradient are reduce-scattered. In the warm-up
no block's input needs a gradient, so FSDP would free a block only at the end of backward; the warm-up's backward
therefore runs one block's KL at a time (make_train_step; docs/training.md, "Scaling out", has the measurement).

    dsa(DSAConfig(init_from="runs/base/model", out_dir="runs/dsa")) -> Path
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import precision as P
from ..checkpoint import load_pretrained
from ..model import DeepSeekModel
from . import common as C
from ..model.moe import update_expert_bias
from .pretrain import PretrainConfig, build_data, lm_losses, lm_targets, mtp_loss
from .trainer import LOOP_FIELD_CHECKS, Phases, Trainer


@dataclass
class DSAConfig:
    init_from: str = "runs/pretrain/model"  # a dense (V3) model folder with tokenizer files
    out_dir: str = "runs/dsa"
    index_topk: int = 32  # keys each query keeps (V3.2: 2048); must be below seq_len for sparsity to matter
    index_n_heads: int | None = None  # None: the config's index_n_heads
    index_head_dim: int | None = None
    data: list[str] = dataclasses.field(default_factory=list)
    embedded_docs: int = 2000
    # the embedded corpus's focus, as in PretrainConfig: give pre-training's (a model pre-trained on English
    # arithmetic and continued here on all tasks and languages loses what it learned)
    embedded_tasks: list[str] = dataclasses.field(default_factory=list)  # empty = all
    embedded_levels: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 3, 4, 5])
    embedded_langs: list[str] = dataclasses.field(default_factory=lambda: ["en", "zh"])
    seq_len: int = 256
    batch_size: int = 8
    warmup_steps: int = 60  # stage 1: indexer only, dense attention
    warmup_lr: float = 1e-3
    sparse_steps: int = 60  # stage 2: everything, top-k on
    sparse_lr: float = 3e-4
    indexer_loss_weight: float = 1.0
    mtp_weight: float = 0.1
    bias_update_speed: float = 1e-3
    balance_alpha: float = 1e-4  # sequence-wise balance loss weight in the sparse stage (as in pre-training)
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_batches: int = 4
    eval_every: int = 30
    save_every: int = 30
    log_every: int = 5
    keep_checkpoints: int = 2
    seed: int = 0
    device: str | None = None
    # fp32 | bf16 (bf16 weights between steps, fp32 masters and AdamW state, per phase) | amp; auto: fp32 on CPU,
    # amp on GPU (nanoseek.precision)
    precision: str = "auto"
    dtype: str = "auto"  # deprecated alias of precision (float32 -> fp32, bfloat16 -> bf16)
    resume: bool = True
    stop_after: int | None = None  # checkpoint and stop at this step (a later call resumes)
    time_limit_s: float | None = None  # wall-clock budget: the step that spends it is the last (checkpointed, published)
    tensorboard: bool = True
    ep: int = 1  # expert-parallel ranks under torchrun (divides the world size); batch_size is the global batch

    def __post_init__(self):
        C.validate_fields(self, [
            ("ep", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "must be an integer >= 1"),
            ("precision", lambda v: v in ("auto", "fp32", "bf16", "amp"),
             "must be auto, fp32, bf16 or amp (DSA has no FP8 training path)"),
            ("index_topk", lambda v: isinstance(v, int) and v > 0, "must be a positive integer"),
            ("seq_len", lambda v: isinstance(v, int) and v > self.index_topk,
             f"must exceed index_topk={self.index_topk} (otherwise DSA equals dense attention)"),
            ("warmup_steps", lambda v: isinstance(v, int) and v >= 0, "must be >= 0"),
            ("sparse_steps", lambda v: isinstance(v, int) and v >= 0, "must be >= 0"),
            ("batch_size", lambda v: isinstance(v, int) and v > 0, "must be a positive integer"),
            ("warmup_lr", lambda v: v > 0, "must be > 0"),
            ("sparse_lr", lambda v: v > 0, "must be > 0"),
            ("balance_alpha", lambda v: v >= 0, "must be >= 0"),
            ("eval_every", lambda v: isinstance(v, int) and v > 0, "must be a positive integer"),
            ("save_every", lambda v: isinstance(v, int) and v > 0, "must be a positive integer"),
            ("log_every", lambda v: isinstance(v, int) and v > 0, "must be a positive integer"),
            *LOOP_FIELD_CHECKS,
        ])
        if self.warmup_steps + self.sparse_steps == 0:
            raise ValueError("DSAConfig: warmup_steps + sparse_steps must be > 0")
        if not (Path(self.init_from) / "config.json").exists():
            raise ValueError(f"DSAConfig.init_from: no config.json in {self.init_from}")
        if not (Path(self.init_from) / "tokenizer.json").exists():
            raise ValueError(f"DSAConfig.init_from: no tokenizer.json in {self.init_from}")


def add_indexer(dense: DeepSeekModel, index_topk: int, n_heads: int | None = None, head_dim: int | None = None,
                seed: int = 0) -> DeepSeekModel:
    """A V3.2 model holding `dense`'s weights plus freshly initialised indexers."""
    over = {"index_topk": index_topk}
    if n_heads:
        over["index_n_heads"] = n_heads
    if head_dim:
        over["index_head_dim"] = head_dim
    cfg = dense.config.replace(**over)
    model = DeepSeekModel(cfg)
    model.init_weights(seed=seed)
    missing, unexpected = model.load_state_dict(dense.state_dict(), strict=False)
    bad = [k for k in missing if ".indexer." not in k]
    if bad or unexpected:
        raise ValueError(f"cannot add an indexer: missing {bad}, unexpected {list(unexpected)}")
    return model.to(next(dense.parameters()).device)


def eval_batches(held, cfg: DSAConfig, device):
    """The held-out batches every evaluation reads (the same ones each time: the position is put back)."""
    state = held.state_dict()
    for i, batch in enumerate(held.batches(cfg.batch_size, epochs=1, drop_last=False)):
        if i >= cfg.eval_batches:
            break
        yield batch.tokens.to(device), batch.doc_ids.to(device)
    held.load_state_dict(state)


def check_data_fits(dense_loss: float, vocab_size: int, cfg: DSAConfig) -> None:
    """Warn when the dense model predicts the DSA data worse than a uniform guess (loss > ln V): the data is not
    what it was trained on, and the sparse stage would retrain the whole model on it."""
    if dense_loss > math.log(vocab_size):
        warnings.warn(f"DSA: the dense model's loss on this stage's data is {dense_loss:.2f}, above a uniform guess "
                      f"(ln {vocab_size} = {math.log(vocab_size):.2f}): the data differs from the model's "
                      f"pre-training data (data={cfg.data}, embedded_tasks={cfg.embedded_tasks}, embedded_langs="
                      f"{cfg.embedded_langs}, embedded_levels={cfg.embedded_levels}); give pre-training's",
                      stacklevel=3)


@torch.no_grad()
def dense_eval_loss(reference, held, cfg: DSAConfig, device, ctx) -> float:
    """The dense model's LM loss on the held-out batches: a constant of the run (that model is frozen), so it is
    computed once and the model dropped (no rank keeps a full copy of it beside its shards)."""
    losses = []
    for tokens, doc in eval_batches(held, cfg, device):
        with ctx:
            d = reference(tokens[:, :-1], mtp=False)
        losses.append(lm_losses(reference, d, tokens, doc)[0].item())
    return sum(losses) / max(1, len(losses))


@torch.no_grad()
def evaluate_dsa(model, held, cfg: DSAConfig, device, ctx, dense_loss: float | None = None) -> dict:
    """Indexer recall (dense attention's top-k), sparse LM loss, and the reference (dense) model's LM loss."""
    model.eval()
    rec, sparse = [], []
    for tokens, doc in eval_batches(held, cfg, device):
        with ctx:
            r = model(tokens[:, :-1], dsa_dense=True, indexer_loss=True,  # recall of every indexer, MTP's too
                      mtp=model.config.num_nextn_predict_layers > 0)
            s = model(tokens[:, :-1], mtp=False)
        rec.append(float(r.indexer_recall))
        sparse.append(lm_losses(model, s, tokens, doc)[0].item())
    model.train()
    out = {"indexer_recall": sum(rec) / max(1, len(rec)), "eval_loss_sparse": sum(sparse) / max(1, len(sparse))}
    if dense_loss is not None:
        out["eval_loss_dense"] = dense_loss
    return out


def dsa(cfg: DSAConfig, progress: C.Progress | None = None) -> Path:
    from ..tokenizer import Tokenizer

    run = Trainer("dsa", cfg, progress)  # device, seed, the checkpoint to resume from
    device = run.device
    precision = P.resolve(cfg.precision, cfg.dtype, device=device)
    ctx = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if precision == "amp" else nullcontext()
    tokenizer = Tokenizer.load(cfg.init_from)
    data_cfg = PretrainConfig(out_dir=cfg.out_dir, data=cfg.data, embedded_docs=cfg.embedded_docs, seq_len=cfg.seq_len,
                              embedded_tasks=cfg.embedded_tasks, embedded_levels=cfg.embedded_levels,
                              embedded_langs=cfg.embedded_langs, seed=cfg.seed + 1, steps=1, warmup=0)
    _, train, held = build_data(data_cfg, tokenizer)
    reference = load_pretrained(cfg.init_from, dtype=torch.float32, device=device)
    if reference.config.use_dsa:
        raise ValueError(f"DSAConfig.init_from: {cfg.init_from} already has an indexer (index_topk="
                         f"{reference.config.index_topk}); start from a dense checkpoint")
    if run.resumed:
        model = load_pretrained(run.resume_from, dtype=torch.float32, device=device)
    else:
        model = add_indexer(reference, cfg.index_topk, cfg.index_n_heads, cfg.index_head_dim, cfg.seed)
    dense_loss = dense_eval_loss(reference.eval(), held, cfg, device, ctx)
    check_data_fits(dense_loss, reference.config.vocab_size, cfg)
    del reference
    if run.distributed:  # FSDP2 (+ EP): fp32, or bf16 compute with fp32 masters where the run would autocast
        model = run.parallelize(model, "fp32" if precision == "fp32" else "bf16")
        ctx = nullcontext()
    evaluate = lambda: evaluate_dsa(model, held, cfg, device, ctx, dense_loss)
    if not run.resumed:
        init = evaluate()  # before training: the fresh indexers' recall, the sparse and dense losses

    masters: list = []  # bf16: the phase's MasterWeights (the next phase starts from its fp32 masters)

    def make_opt(stage: str):  # warm-up: the indexers only; sparse: everything (sharded parameters too)
        for n, p in model.named_parameters():
            p.requires_grad_(stage == "sparse" or ".indexer." in n)
        lr = cfg.warmup_lr if stage == "warmup" else cfg.sparse_lr
        if precision != "bf16" or run.distributed:
            return C.make_optimizer(model, lr, cfg.weight_decay)
        if masters:
            masters.pop().release()
        masters.append(P.MasterWeights(model, lambda named: C.make_optimizer(model, lr, cfg.weight_decay,
                                                                             params=named)))
        return masters[-1]

    run.restore(Phases(lambda step: stage_of(cfg, step), make_opt),
                load_state=lambda st: train.load_state_dict(st["data"]),
                config_json=json.dumps(dataclasses.asdict(cfg), indent=2) + "\n", model=model)
    if not run.resumed:
        run.log(0, stage="init", **init)
    model.train()
    return run.fit(make_train_step(cfg, model, train.batches(cfg.batch_size), ctx, device, run.ckpt_root, run.dist),
                   cfg.warmup_steps + cfg.sparse_steps, model, tokenizer, lr_at=lambda step, _: dsa_lr(cfg, step),
                   evaluate=evaluate, eval_also_at=(cfg.warmup_steps,), state=lambda: {"data": train.state_dict()},
                   progress_keys={"stage": "stage", "indexer_kl": "kl"})


def stage_of(cfg: DSAConfig, step: int) -> str:
    return "warmup" if step < cfg.warmup_steps else "sparse"


def dsa_lr(cfg: DSAConfig, step: int) -> float:
    """Each stage has its own schedule: 10% linear warm-up, then a cosine to 0.1 x its lr."""
    if stage_of(cfg, step) == "warmup":
        n, i, lr = cfg.warmup_steps, step, cfg.warmup_lr
    else:
        n, i, lr = cfg.sparse_steps, step - cfg.warmup_steps, cfg.sparse_lr
    return C.lr_at(i, n, lr, max(1, n // 10), "cosine", 0.1)


def make_train_step(cfg: DSAConfig, model, batches, ctx, device, ckpt_root: Path, dist=None):
    """One optimizer step: the indexers' KL in the warm-up; LM (+MTP, balance) + KL in the sparse stage.

    Distributed (world size W > 1), as pre-training: every rank draws the same global batch and trains on its rows;
    the LM losses are its shares of the global means (lm_losses' num_targets) times W, as FSDP averages the ranks'
    gradients; the indexer KL (a mean over every query of equal-sized rows) and the balance loss (per sequence)
    are per-rank means whose average is the global one; the bias update sees the global expert loads."""
    mtp_on = model.config.num_nextn_predict_layers > 0
    W = 1 if dist is None else dist.world_size
    kls: list[torch.Tensor] = []  # distributed: each block's indexer KL, in forward order (MTP blocks last)
    if W > 1:
        def keep_kl(module, args, out):
            if out[2] is not None:
                kls.append(out[2]["kl"])

        for layer in model.model.layers:
            layer.register_forward_hook(keep_kl)

    def train_step(step: int, opt) -> dict:
        stage = stage_of(cfg, step)
        kls.clear()
        batch = next(batches)
        tokens, doc = batch.tokens.to(device), batch.doc_ids.to(device)
        num_tokens = tokens.shape[0] * (tokens.shape[1] - 1)  # the global batch's
        counts = None
        if W > 1:  # the normalisers count the global batch; this rank keeps its rows
            from ..parallel import shard_batch

            depths = model.config.num_nextn_predict_layers if mtp_on else 0
            counts = [int((lm_targets(tokens, doc, k) != -100).sum()) for k in range(depths + 1)]
            tokens, doc = shard_batch(tokens, dist), shard_batch(doc, dist)
        metrics = {"stage": stage}
        with ctx:
            if stage == "warmup":  # every indexer learns, the MTP block's too (its weights stay frozen)
                o = model(tokens[:, :-1], dsa_dense=True, indexer_loss=True, mtp=mtp_on)
                loss = o.indexer_loss
            else:
                o = model(tokens[:, :-1], indexer_loss=True, mtp=mtp_on)
                main, mtp = lm_losses(model, o, tokens, doc, counts)  # W x: the LM terms are this rank's share
                loss = main * W + cfg.indexer_loss_weight * o.indexer_loss
                if mtp:
                    loss = loss + mtp_loss(mtp, cfg.mtp_weight) * W
                if o.balance_loss is not None and cfg.balance_alpha > 0:  # V3's balancing goes on (MTP gate too)
                    loss = loss + cfg.balance_alpha * o.balance_loss
                metrics["lm_loss"] = main.item() * W
        if stage == "warmup" and W > 1:
            # FSDP gathers a block again for backward when its output's gradient arrives (the KL's here) and frees it
            # when its input's gradient is done; in the warm-up no block input needs one, so a single backward would
            # keep every block gathered until its end: the whole model on each rank. One backward per block's KL
            # (the same gradients: d mean / d kl = 1/n) gathers and reduce-scatters one block at a time.
            for kl in reversed(kls):
                kl.backward(torch.full_like(kl, 1.0 / len(kls)))
        else:
            loss.backward()
        kls.clear()
        gnorm = P.clip_grad_norm_(model, opt, cfg.grad_clip)  # the frozen parameters have no gradient
        C.check_finite("dsa", step + 1, ckpt_root, loss=loss, grad_norm=gnorm)  # nothing non-finite is stepped
        opt.step()
        opt.zero_grad(set_to_none=True)
        if stage == "sparse" and o.router and cfg.bias_update_speed > 0:  # main MoE layers, then the MTP modules
            loads = [r.load for r in o.router + o.mtp_router]
            if W > 1:
                from ..parallel import global_loads

                loads = global_loads(loads, dist)  # the global batch's loads, the same on every rank
            update_expert_bias(model, loads, cfg.bias_update_speed)
        metrics["indexer_kl"] = o.indexer_loss.item()
        metrics["grad_norm"] = float(gnorm)
        metrics["num_tokens"] = num_tokens
        return metrics

    return train_step
