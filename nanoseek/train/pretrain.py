"""Pre-training as the DeepSeek-V3 report describes it: next-token loss plus the MTP loss (lambda 0.3
then 0.1), auxiliary-loss-free load balancing (per-expert bias moved by gamma against its load error
after each step) with the tiny sequence-wise balance loss (alpha), optional FP8 GEMMs, AdamW with
warmup then cosine or WSD, gradient clipping and accumulation, eval loss, resumable checkpoints.

    pretrain(PretrainConfig(out_dir="runs/base")) -> Path of the final HF model folder
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from .. import precision as P
from ..model import DeepSeekModel
from ..model.moe import load_stats, update_expert_bias  # noqa: F401 (their home is model/moe.py)
from . import common as C
from .trainer import LOOP_FIELD_CHECKS, Trainer


@dataclass
class PretrainConfig:
    out_dir: str = "runs/pretrain"
    # model: a preset name, a config.json / model folder to start from, plus overrides
    preset: str = "tiny"
    init_from: str | None = None  # an HF model folder to continue from (weights), instead of random init
    model_overrides: dict = field(default_factory=dict)
    # data: user files (txt / jsonl / parquet) or, when empty, the embedded corpus
    data: list[str] = field(default_factory=list)
    embedded_docs: int = 4000
    embedded_tasks: list[str] = field(default_factory=list)  # embedded corpus: task names (empty = all)
    embedded_levels: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    embedded_langs: list[str] = field(default_factory=lambda: ["en", "zh"])
    tokenizer: str | None = None  # a folder with tokenizer.json; None trains one on the data
    vocab_size: int = 2048
    digit_group: int = 3  # tokenizer training: digits per number chunk (1 = one token per digit)
    seq_len: int = 256
    eval_fraction: float = 0.02
    # optimisation
    steps: int = 300
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 20
    schedule: str = "cosine"  # cosine | wsd | constant
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # DeepSeek-V3 specifics
    mtp_weight: float = 0.3
    mtp_weight_late: float = 0.1
    mtp_switch_frac: float = 0.7  # lambda goes 0.3 -> 0.1 after this share of the steps (V3: first 10T of 14.8T)
    bias_update_speed: float = 1e-3  # gamma; 0 disables aux-loss-free balancing
    balance_alpha: float = 1e-4  # sequence-wise balance loss weight
    precision: str = "auto"  # fp32 | bf16 (bf16 weights, fp32 masters) | fp8 | amp; auto: fp32 on CPU, amp on GPU
    fp8: bool = False  # deprecated: precision="fp8"
    # bookkeeping
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 100
    log_every: int = 10
    keep_checkpoints: int = 2
    seed: int = 0
    device: str | None = None
    dtype: str = "auto"  # deprecated alias of precision (float32 -> fp32, bfloat16 -> bf16)
    compile: bool = False
    ep: int = 1  # expert-parallel ranks under torchrun (divides the world size); batch_size is the global batch
    tensorboard: bool = True
    resume: bool = True  # continue from out_dir/checkpoints/latest when present
    stop_after: int | None = None  # checkpoint and stop at this step (a later call resumes); for time-boxed runs
    time_limit_s: float | None = None  # wall-clock budget: the step that spends it is the last (checkpointed, published)

    def __post_init__(self):
        C.validate_fields(self, [
            ("steps", lambda v: isinstance(v, int) and v > 0, "must be a positive integer"),
            ("batch_size", lambda v: isinstance(v, int) and v > 0, "must be a positive integer"),
            ("grad_accum", lambda v: isinstance(v, int) and v > 0, "must be a positive integer"),
            ("seq_len", lambda v: isinstance(v, int) and v >= 8, "must be an integer >= 8"),
            ("lr", lambda v: v > 0, "must be > 0"),
            ("warmup", lambda v: 0 <= v < self.steps, "must be in [0, steps)"),
            ("schedule", lambda v: v in ("cosine", "wsd", "constant"), "must be cosine, wsd or constant"),
            ("eval_fraction", lambda v: 0 < v < 0.5, "must be in (0, 0.5)"),
            ("mtp_weight", lambda v: v >= 0, "must be >= 0"),
            ("bias_update_speed", lambda v: v >= 0, "must be >= 0"),
            ("balance_alpha", lambda v: v >= 0, "must be >= 0"),
            ("dtype", lambda v: v in ("auto", "float32", "bfloat16"), "must be auto, float32 or bfloat16"),
            ("precision", lambda v: v in P.PRECISIONS, "must be auto, fp32, bf16, fp8 or amp"),
            ("save_every", lambda v: v > 0, "must be > 0"),
            ("eval_every", lambda v: v > 0, "must be > 0"),
            ("log_every", lambda v: isinstance(v, int) and v > 0, "must be a positive integer"),
            ("ep", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "must be an integer >= 1"),
            *LOOP_FIELD_CHECKS,
        ])
        for p in self.data:
            if not Path(p).exists():
                raise ValueError(f"PretrainConfig.data: {p} does not exist")
        if self.init_from is not None and not (Path(self.init_from) / "config.json").exists():
            raise ValueError(f"PretrainConfig.init_from: no config.json in {self.init_from}")


# ---------------------------------------------------------------------------------------------- losses


def lm_targets(tokens: torch.Tensor, doc_ids: torch.Tensor | None, k: int) -> torch.Tensor:
    """Depth k's targets (B, T-k) of a packed batch `tokens` (B, T+1): position i predicts token i+k+1, -100 where
    that token lies in another document than the input token, or is padding."""
    T = tokens.shape[1] - 1
    tgt = tokens[:, k + 1:]  # (B, T-k)
    if doc_ids is not None:
        valid = (doc_ids[:, : T - k] == doc_ids[:, k + 1:]) & (doc_ids[:, k + 1:] >= 0)
        tgt = tgt.masked_fill(~valid, -100)
    return tgt


def lm_losses(model, out, tokens: torch.Tensor, doc_ids: torch.Tensor | None, num_targets: list[int] | None = None):
    """Main and per-depth MTP cross-entropies for a packed batch `tokens` (B, T+1) (lm_targets: which count).

    num_targets (per depth, over the global batch): these rows are one rank's share of it, and each loss is the
    sum over them divided by the global count, so the ranks' values sum to the global batch's mean."""
    V = out.logits.shape[-1]

    def ce(logits, k):
        tgt = lm_targets(tokens, doc_ids, k)
        if num_targets is not None:
            return F.cross_entropy(logits.reshape(-1, V).float(), tgt.reshape(-1), ignore_index=-100,
                                   reduction="sum") / max(1, num_targets[k])
        return F.cross_entropy(logits.reshape(-1, V).float(), tgt.reshape(-1), ignore_index=-100)

    main = ce(out.logits, 0)
    mtp = [ce(lg, k) for k, lg in enumerate(out.mtp_logits, start=1)]
    return main, mtp


def mtp_loss(per_depth: list[torch.Tensor], lam: float) -> torch.Tensor:
    """V3 eq. 25: L_MTP = lambda / D * sum_k L^k_MTP, the term added to the main loss."""
    return lam * torch.stack(per_depth).mean()


# ---------------------------------------------------------------------------------------------- data


def build_data(cfg: PretrainConfig, tokenizer):
    from ..data import PackedDataset, load_texts, split_documents

    if cfg.data:
        texts = list(load_texts(cfg.data))
    else:
        texts = embedded_corpus_for(cfg)
    if not texts:
        raise ValueError(f"no documents found in {cfg.data}")
    train_docs, eval_docs = split_documents(texts, cfg.eval_fraction, seed=cfg.seed)
    enc = lambda docs: tokenizer.encode_batch(docs) if hasattr(tokenizer, "encode_batch") else [tokenizer.encode(d) for d in docs]
    mk = lambda docs, shuffle: PackedDataset(enc(docs), cfg.seq_len, eos_id=tokenizer.eos_id, bos_id=tokenizer.bos_id,
                                             seed=cfg.seed, shuffle=shuffle)
    train, held = mk(train_docs, True), mk(eval_docs, False)
    if len(train) < 1:
        raise ValueError(f"the training data packs into no full row of seq_len+1={cfg.seq_len + 1} tokens")
    return texts, train, held


def get_tokenizer(cfg: PretrainConfig, texts_fn):
    from ..tokenizer import Tokenizer, train_tokenizer

    if cfg.tokenizer:
        return Tokenizer.load(cfg.tokenizer)
    return train_tokenizer(texts_fn(), vocab_size=cfg.vocab_size, digit_group=cfg.digit_group)


def build_model(cfg: PretrainConfig, tokenizer, device) -> DeepSeekModel:
    if cfg.init_from:
        from ..checkpoint import load_pretrained

        return load_pretrained(cfg.init_from, dtype=torch.float32, device=device)
    mc = ModelConfig.from_preset(cfg.preset, **{"torch_dtype": "float32", **cfg.model_overrides})
    vocab = max(mc.vocab_size if "vocab_size" in cfg.model_overrides else 0, tokenizer.vocab_size)
    mc = mc.replace(vocab_size=int(math.ceil(vocab / 64) * 64), bos_token_id=tokenizer.bos_id,
                    eos_token_id=tokenizer.eos_id)
    torch.manual_seed(cfg.seed)
    model = DeepSeekModel(mc)
    model.init_weights(seed=cfg.seed)
    return model.to(device)


@torch.no_grad()
def evaluate(model, held, cfg: PretrainConfig, device, ctx) -> dict:
    model.eval()
    state = held.state_dict()
    losses, mtps = [], []
    for i, batch in enumerate(held.batches(cfg.batch_size, epochs=1, drop_last=False)):
        if i >= cfg.eval_batches:
            break
        tokens, doc = batch.tokens.to(device), batch.doc_ids.to(device)
        with ctx:
            out = model(tokens[:, :-1], mtp=True)
        main, mtp = lm_losses(model, out, tokens, doc)
        losses.append(main.item())
        if mtp:
            mtps.append(sum(m.item() for m in mtp) / len(mtp))
    held.load_state_dict(state)
    model.train()
    res = {"eval_loss": sum(losses) / max(1, len(losses))}
    if mtps:
        res["eval_mtp_loss"] = sum(mtps) / len(mtps)
    return res


# ---------------------------------------------------------------------------------------------- loop


def pretrain(cfg: PretrainConfig, progress: C.Progress | None = None) -> Path:
    run = Trainer("pretrain", cfg, progress)  # device, seed, the checkpoint to resume from
    device = run.device
    # tokenizer and data (deterministic, so a resumed run rebuilds the same ones)
    if run.resumed:
        from ..tokenizer import Tokenizer

        tokenizer = Tokenizer.load(run.resume_from)
    else:
        tokenizer = get_tokenizer(cfg, lambda: _texts_for_tokenizer(cfg))
    texts, train, held = build_data(cfg, tokenizer)
    if run.resumed:
        from ..checkpoint import load_pretrained

        model = load_pretrained(run.resume_from, dtype=torch.float32, device=device)
    else:
        model = build_model(cfg, tokenizer, device)
    model.train()
    # precision wraps the fp32 model from outside: bf16 weights + fp32 masters in the optimizer, FP8 GEMMs, ...;
    # under torchrun the model is parallelized first (FSDP2 + expert parallelism)
    model, opt, ctx = run.prepare(model, lambda named: C.make_optimizer(model, cfg.lr, cfg.weight_decay, params=named),
                                  P.resolve(cfg.precision, cfg.dtype, cfg.fp8, device))
    run.restore(opt, load_state=lambda st: train.load_state_dict(st["data"]), config_json=_json(cfg), model=model)
    step_fn = make_train_step(cfg, model, train.batches(cfg.batch_size), ctx, device, run.ckpt_root, run.dist)
    return run.fit(step_fn, cfg.steps, model, tokenizer,
                   lr_at=lambda step, _: C.lr_at(step, cfg.steps, cfg.lr, cfg.warmup, cfg.schedule, cfg.min_lr_ratio),
                   evaluate=lambda: evaluate(model, held, cfg, device, ctx), state=lambda: {"data": train.state_dict()},
                   progress_keys={"loss": "loss", "tokens_per_s": "tok/s"}, flops_per_token=C.flops_per_token(model))


def make_train_step(cfg: PretrainConfig, model, batches, ctx, device, ckpt_root: Path, dist=None):
    """One optimizer step of pre-training: grad_accum micro-batches of LM + MTP + balance loss, clip, step, then
    the aux-loss-free bias update from the step's expert loads.

    Distributed (dist.world_size W > 1): every rank draws the same global micro-batch and trains on its rows; its
    losses are its share of the global means (lm_losses' num_targets) times W, as FSDP averages the ranks'
    gradients; the balance loss is per sequence (the ranks' mean is the global one); the bias update sees the
    global loads, so every rank keeps the same biases. The losses logged per rank average to the global ones."""
    fwd = torch.compile(model) if cfg.compile else model
    mtp_on = model.config.num_nextn_predict_layers > 0
    W = 1 if dist is None else dist.world_size

    def train_step(step: int, opt) -> dict:
        lam = cfg.mtp_weight if step < cfg.mtp_switch_frac * cfg.steps else cfg.mtp_weight_late
        loads = None
        tot = {"loss": 0.0, "mtp_loss": 0.0, "balance_loss": 0.0}
        for _ in range(cfg.grad_accum):
            batch = next(batches)
            tokens, doc = batch.tokens.to(device), batch.doc_ids.to(device)
            counts = None
            if W > 1:  # the normalisers count the global batch; this rank keeps its rows
                from ..parallel import shard_batch

                depths = model.config.num_nextn_predict_layers if mtp_on else 0
                counts = [int((lm_targets(tokens, doc, k) != -100).sum()) for k in range(depths + 1)]
                tokens, doc = shard_batch(tokens, dist), shard_batch(doc, dist)
            with ctx:
                out_ = fwd(tokens[:, :-1], mtp=mtp_on)
            main, mtp = lm_losses(model, out_, tokens, doc, counts)
            loss = main
            if mtp:
                loss = loss + mtp_loss(mtp, lam)  # lambda / D * sum over depths (V3 eq. 25)
                tot["mtp_loss"] += torch.stack(mtp).mean().item() * W / cfg.grad_accum
            if W > 1:
                loss = loss * W  # FSDP averages over the ranks: W x each share sums to the global loss
            routers = out_.router + out_.mtp_router  # main MoE layers, then MTP modules (update_expert_bias order)
            if routers:
                bal = out_.balance_loss  # over the same layers, MTP modules included
                loss = loss + cfg.balance_alpha * bal
                tot["balance_loss"] += bal.item() / cfg.grad_accum
                step_loads = [r.load for r in routers]
                loads = step_loads if loads is None else [a + b for a, b in zip(loads, step_loads)]
            (loss / cfg.grad_accum).backward()
            tot["loss"] += main.item() * W / cfg.grad_accum
        gnorm = P.clip_grad_norm_(model, opt, cfg.grad_clip)  # on the fp32 masters under bf16
        C.check_finite("pretrain", step + 1, ckpt_root, loss=tot["loss"], grad_norm=gnorm)  # nothing non-finite is stepped
        opt.step()
        opt.zero_grad(set_to_none=True)
        if loads is not None and W > 1:
            from ..parallel import global_loads

            loads = global_loads(loads, dist)  # the global batch's loads, the same on every rank
        if loads is not None and cfg.bias_update_speed > 0:
            update_expert_bias(model, loads, cfg.bias_update_speed)
        metrics = {**tot, "grad_norm": float(gnorm), "mtp_lambda": lam,
                   "num_tokens": cfg.batch_size * cfg.grad_accum * cfg.seq_len}
        if loads is not None:  # computed only when the step is recorded
            metrics["load"] = lambda: {**load_stats(loads), "expert_load": [(l / l.sum()).tolist() for l in loads]}
        return metrics

    return train_step


def _texts_for_tokenizer(cfg: PretrainConfig) -> list[str]:
    from ..data import load_texts

    if cfg.data:
        return list(load_texts(cfg.data))
    return embedded_corpus_for(cfg)


def embedded_corpus_for(cfg) -> list[str]:
    from ..data.corpus import embedded_corpus

    return embedded_corpus(cfg.embedded_docs, seed=cfg.seed, langs=tuple(cfg.embedded_langs),
                           tasks=tuple(cfg.embedded_tasks) or None, levels=tuple(cfg.embedded_levels))


def _json(cfg) -> str:
    import json

    return json.dumps(dataclasses.asdict(cfg), indent=2) + "\n"
