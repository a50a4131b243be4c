"""Pre-training as the DeepSeek-V3 report describes it: next-token loss plus the MTP loss (lambda 0.3
then 0.1), auxiliary-loss-free load balancing (per-expert bias moved by gamma against its load error
after each step) with the tiny sequence-wise balance loss (alpha), optional FP8 GEMMs, AdamW with
warmup then cosine or WSD, gradient clipping and accumulation, eval loss, resumable checkpoints.

    pretrain(PretrainConfig(out_dir="runs/base")) -> Path of the final HF model folder
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from .. import precision as P
from ..model import DeepSeekModel
from . import common as C


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
    tensorboard: bool = True
    resume: bool = True  # continue from out_dir/checkpoints/latest when present
    stop_after: int | None = None  # checkpoint and stop at this step (a later call resumes); for time-boxed runs

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
        ])
        for p in self.data:
            if not Path(p).exists():
                raise ValueError(f"PretrainConfig.data: {p} does not exist")
        if self.init_from is not None and not (Path(self.init_from) / "config.json").exists():
            raise ValueError(f"PretrainConfig.init_from: no config.json in {self.init_from}")


# ---------------------------------------------------------------------------------------------- losses


def lm_losses(model, out, tokens: torch.Tensor, doc_ids: torch.Tensor | None):
    """Main and per-depth MTP cross-entropies for a packed batch `tokens` (B, T+1).

    Position i of depth k (0 = main model) predicts token i+k+1; a target is used only when it lies in
    the same document as the input token (and is not padding)."""
    B, T1 = tokens.shape
    T = T1 - 1
    V = out.logits.shape[-1]

    def ce(logits, k):
        tgt = tokens[:, k + 1:]  # (B, T-k)
        if doc_ids is not None:
            valid = (doc_ids[:, : T - k] == doc_ids[:, k + 1:]) & (doc_ids[:, k + 1:] >= 0)
            tgt = tgt.masked_fill(~valid, -100)
        return F.cross_entropy(logits.reshape(-1, V).float(), tgt.reshape(-1), ignore_index=-100)

    main = ce(out.logits, 0)
    mtp = [ce(lg, k) for k, lg in enumerate(out.mtp_logits, start=1)]
    return main, mtp


def mtp_loss(per_depth: list[torch.Tensor], lam: float) -> torch.Tensor:
    """V3 eq. 25: L_MTP = lambda / D * sum_k L^k_MTP, the term added to the main loss."""
    return lam * torch.stack(per_depth).mean()


@torch.no_grad()
def update_expert_bias(model, loads: list[torch.Tensor], gamma: float) -> None:
    """Aux-loss-free balancing (V3 sec. 2.1.2): b_i += gamma * sign(mean load - load_i), per MoE layer.
    `model`: a DeepSeekModel or a list of Gate modules. For a model, `loads` follow its MoE layers in order:
    the main model's (`out.router`), then the MTP modules' (`out.mtp_router`); a shorter list (no MTP in the
    forward) updates only the layers it covers."""
    if isinstance(model, (list, tuple)):
        gates = model
    else:
        gates = [layer.mlp.gate for layer in model.model.layers if layer.is_moe]  # main layers, then MTP modules
    for gate, load in zip(gates, loads):
        if gate.e_score_correction_bias is not None:
            err = load.mean() - load
            gate.e_score_correction_bias.add_(gamma * torch.sign(err).to(gate.e_score_correction_bias))


def load_stats(loads: list[torch.Tensor]) -> dict:
    """max/min load ratio (worst layer) and MaxVio = max_i load_i / mean load - 1 (mean over layers)."""
    if not loads:
        return {}
    ratios = [float(l.max() / l.min().clamp_min(1.0)) for l in loads]
    maxvio = [float(l.max() / l.mean().clamp_min(1e-9) - 1) for l in loads]
    return {"load_max_min_ratio": max(ratios), "maxvio": sum(maxvio) / len(maxvio)}


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
    progress = progress or C.Progress()
    out = Path(cfg.out_dir)
    ckpt_root = out / "checkpoints"
    device = C.pick_device(cfg.device)
    C.seed_everything(cfg.seed)
    resume_from = C.latest_checkpoint(ckpt_root) if cfg.resume else None

    # tokenizer and data (deterministic, so a resumed run rebuilds the same ones)
    if resume_from is not None:
        from ..tokenizer import Tokenizer

        tokenizer = Tokenizer.load(resume_from)
    else:
        tokenizer = get_tokenizer(cfg, lambda: _texts_for_tokenizer(cfg))
    texts, train, held = build_data(cfg, tokenizer)

    if resume_from is not None:
        from ..checkpoint import load_pretrained

        model = load_pretrained(resume_from, dtype=torch.float32, device=device)
    else:
        model = build_model(cfg, tokenizer, device)
    model.train()
    # precision wraps the fp32 model from outside: bf16 weights + fp32 masters in the optimizer, FP8 GEMMs, ...
    opt, ctx = P.prepare(model, lambda named: C.make_optimizer(model, cfg.lr, cfg.weight_decay, params=named),
                         P.resolve(cfg.precision, cfg.dtype, cfg.fp8, device), device)
    step = 0
    if resume_from is not None:
        state = C.load_trainer_state(resume_from)
        opt.load_state_dict(state["optimizer"])
        train.load_state_dict(state["data"])
        C.set_rng_state(state["rng"])
        step = state["step"]
    fwd = torch.compile(model) if cfg.compile else model
    logger = C.MetricsLogger(out, tensorboard=cfg.tensorboard, resume_step=step if resume_from else None)
    if resume_from is None:
        C.atomic_write_text(out / "pretrain_config.json", _json(cfg))

    fpt, peak = C.flops_per_token(model), C.peak_flops(device)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    progress.start(cfg.steps, "pretrain", initial=step)
    batches = train.batches(cfg.batch_size)
    t_last, tokens_since = time.perf_counter(), 0
    while step < cfg.steps:
        lr = C.lr_at(step, cfg.steps, cfg.lr, cfg.warmup, cfg.schedule, cfg.min_lr_ratio)
        C.set_lr(opt, lr)
        lam = cfg.mtp_weight if step < cfg.mtp_switch_frac * cfg.steps else cfg.mtp_weight_late
        loads = None
        tot = {"loss": 0.0, "mtp_loss": 0.0, "balance_loss": 0.0}
        for _ in range(cfg.grad_accum):
            batch = next(batches)
            tokens, doc = batch.tokens.to(device), batch.doc_ids.to(device)
            with ctx:
                out_ = fwd(tokens[:, :-1], mtp=model.config.num_nextn_predict_layers > 0)
            main, mtp = lm_losses(model, out_, tokens, doc)
            loss = main
            if mtp:
                loss = loss + mtp_loss(mtp, lam)  # lambda / D * sum over depths (V3 eq. 25)
                tot["mtp_loss"] += torch.stack(mtp).mean().item() / cfg.grad_accum
            routers = out_.router + out_.mtp_router  # main MoE layers, then MTP modules (update_expert_bias order)
            if routers:
                bal = out_.balance_loss  # over the same layers, MTP modules included
                loss = loss + cfg.balance_alpha * bal
                tot["balance_loss"] += bal.item() / cfg.grad_accum
                step_loads = [r.load for r in routers]
                loads = step_loads if loads is None else [a + b for a, b in zip(loads, step_loads)]
            (loss / cfg.grad_accum).backward()
            tot["loss"] += main.item() / cfg.grad_accum
        gnorm = P.clip_grad_norm_(model, opt, cfg.grad_clip)  # on the fp32 masters under bf16
        C.check_finite("pretrain", step + 1, ckpt_root, loss=tot["loss"], grad_norm=gnorm)  # nothing non-finite is stepped
        opt.step()
        opt.zero_grad(set_to_none=True)
        if loads is not None and cfg.bias_update_speed > 0:
            update_expert_bias(model, loads, cfg.bias_update_speed)
        step += 1
        tokens_since += tokens_per_step
        metrics = {}
        if step % cfg.log_every == 0 or step == cfg.steps or step == 1:
            dt = time.perf_counter() - t_last
            tps = tokens_since / max(dt, 1e-9)
            t_last, tokens_since = time.perf_counter(), 0
            metrics = {**tot, "lr": lr, "grad_norm": float(gnorm), "tokens_per_s": tps, "mtp_lambda": lam}
            if peak:
                metrics["mfu"] = tps * fpt / peak
            if loads is not None:
                metrics.update(load_stats(loads))
                metrics["expert_load"] = [(l / l.sum()).tolist() for l in loads]
        if step % cfg.eval_every == 0 or step == cfg.steps:
            metrics.update(evaluate(model, held, cfg, device, ctx))
        if metrics:
            logger.log(step, **metrics)
        progress.update(1, loss=tot["loss"], **({"tok/s": metrics["tokens_per_s"]} if "tokens_per_s" in metrics else {}))
        stopping = cfg.stop_after is not None and step >= cfg.stop_after and step < cfg.steps
        if step % cfg.save_every == 0 or step == cfg.steps or stopping:
            state = {"step": step, "optimizer": opt.state_dict(), "data": train.state_dict(), "rng": C.rng_state()}
            with P.full_precision(opt):  # the HF folder is written from the fp32 masters
                C.save_stage_checkpoint(ckpt_root, step, model, tokenizer, state, keep=cfg.keep_checkpoints)
        if stopping:
            break
    progress.close()
    logger.close()
    final = C.latest_checkpoint(ckpt_root)
    if step < cfg.steps:
        return final  # stopped early: no final model yet
    return C.copy_model_folder(final, out / "model")


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
