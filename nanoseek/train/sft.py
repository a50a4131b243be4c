"""Supervised fine-tuning on chat data (R1 cold start, rejection-sampled SFT, distillation).

    sft(SFTConfig(out_dir="runs/sft", init_from="runs/base/model")) -> Path of the final HF model folder

Each record {"messages": [...]} is rendered with the V3.1 chat template (`thinking=True`: the final
assistant turn is `<｜Assistant｜><think>{reasoning}</think>{content}<｜end▁of▁sentence｜>`, an empty think
block when the record has no reasoning_content) by `Tokenizer.encode_chat_with_mask`, which also
gives the loss mask: 1 on what the model should generate (the final turn, or every assistant turn
with `all_assistant_turns`), 0 on the system/user text and on the tags that open a turn.

Loss: cross-entropy on assistant tokens only. Input position i predicts token i+1, which counts when
mask[i+1] == 1; the sum is divided by the number of such tokens in the whole optimizer step (all
grad_accum micro-batches), so every assistant token weighs the same however the step is split.
MTP modules keep training (depth k: position i predicts token i+k+1, counted when mask[i+k+1] == 1
and both tokens belong to the same sample), weighted by `mtp_weight`, so speculative decoding keeps
its acceptance rate after SFT. MoE models keep the pre-training balancing: the sequence-wise balance
loss (balance_alpha) and the aux-loss-free bias update (bias_update_speed), both over real tokens only.

Batching (documented simplifications):
- Right padding with the tokenizer's pad id to the longest row of the micro-batch. No attention
  mask is passed: attention is causal and the pads come after every real token, so no real token
  ever attends to a pad (tested: a sample's loss is the same alone and padded in a batch). This
  keeps the fused causal attention path. Pads are left out of the loss, the expert loads and the
  balance loss.
- `packing=True` concatenates whole samples (in the epoch's shuffled order, greedily) into rows of at
  most max_len tokens. Each sample keeps its own loss mask, but attention DOES cross samples inside
  a row (no block-diagonal mask; positions run on through the row) - the usual cheap packing; every
  sample still starts with BOS. Prefer packing=False when samples are long or few.
- A sample longer than max_len is cut to its first max_len tokens (counted, logged as
  `truncated_frac`); a sample left with no assistant token is dropped (counted as `dropped`).

Data order is a function of (seed, epoch) alone and the position (epoch, micro-batch) is saved in
every checkpoint with the optimizer and RNG state, so a stopped and resumed run reaches the same
weights and metrics as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .. import precision as P
from . import common as C
from ..model.moe import load_stats, update_expert_bias
from .trainer import LOOP_FIELD_CHECKS, Trainer


@dataclass
class SFTConfig:
    out_dir: str = "runs/sft"
    init_from: str = ""  # required: an HF model folder with tokenizer files (e.g. runs/base/model)
    # data: chat JSONL files and/or in-memory records; neither -> the embedded cold-start records
    data: list[str] = field(default_factory=list)
    records: list[dict] | None = None  # [{"messages": [...]}, ...] handed over by the pipeline (added to data)
    embedded_records: int = 2000
    embedded_tasks: list[str] = field(default_factory=list)  # embedded records: task names (empty = all)
    embedded_levels: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    embedded_langs: list[str] = field(default_factory=lambda: ["en", "zh"])
    thinking: bool = True  # V3.1 thinking template: <think>{reasoning}</think> before the answer
    # chat: the V3.1 template; raw (CLI --no-chat-template): the earlier turns' text as-is (Tokenizer.encode_prompt),
    # then the final assistant content and EOS, the loss on those: what GRPO's raw prompts continue
    prompt_format: str = "chat"
    all_assistant_turns: bool = False  # loss on every assistant turn, not only the last
    max_len: int = 1024  # tokens per row (a sample, or several packed); longer samples are truncated
    packing: bool = False
    eval_fraction: float = 0.02  # share of records held out for eval loss (0 = none)
    # optimisation; epochs unless steps is given
    epochs: int = 2  # R1 fine-tunes for two epochs
    steps: int | None = None  # a fixed number of optimizer steps (the data cycles), overrides epochs
    batch_size: int = 8  # rows per micro-batch
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup: int = 10
    schedule: str = "cosine"  # cosine | wsd | constant
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    mtp_weight: float = 0.1  # MTP loss weight (V3's late-pretraining lambda); 0 skips the MTP forward
    balance_alpha: float = 1e-4  # MoE sequence-wise balance loss weight
    bias_update_speed: float = 1e-3  # MoE aux-loss-free bias step gamma; 0 freezes the biases
    # logit distillation (dense students): KL(teacher || student) on assistant tokens, vocabularies must match
    teacher: str | None = None  # a model folder; None = plain SFT
    kd_weight: float = 0.5  # loss = (1 - kd_weight) * CE + kd_weight * KD
    kd_temperature: float = 1.0
    # bookkeeping
    eval_every: int = 100
    eval_batches: int | None = 8  # micro-batches of eval data per evaluation (None: all)
    # end the run at the first evaluation whose eval_loss is at or below this (that step's model is the output);
    # steps / epochs are then the most it trains, and the lr schedule spans them. None: train them all
    target_eval_loss: float | None = None
    save_every: int = 200
    log_every: int = 10
    keep_checkpoints: int = 2
    seed: int = 0
    device: str | None = None
    precision: str = "auto"  # fp32 | bf16 (bf16 weights, fp32 masters) | fp8 | amp; auto: fp32 on CPU, amp on GPU
    dtype: str = "auto"  # deprecated alias of precision (float32 -> fp32, bfloat16 -> bf16)
    tensorboard: bool = True
    resume: bool = True  # continue from out_dir/checkpoints/latest when present
    stop_after: int | None = None  # checkpoint and stop at this step (a later call resumes)
    time_limit_s: float | None = None  # wall-clock budget: the step that spends it is the last (checkpointed, published)
    ep: int = 1  # expert-parallel ranks under torchrun (divides the world size); batch_size is the global batch

    def __post_init__(self):
        C.validate_fields(self, [
            ("init_from", lambda v: isinstance(v, (str, Path)) and str(v) != "", "is required (an HF model folder)"),
            ("embedded_records", lambda v: isinstance(v, int) and v > 0, "must be a positive integer"),
            ("max_len", lambda v: isinstance(v, int) and v >= 8, "must be an integer >= 8"),
            ("eval_fraction", lambda v: 0 <= v < 0.5, "must be in [0, 0.5)"),
            ("epochs", lambda v: isinstance(v, int) and v > 0, "must be a positive integer"),
            ("steps", lambda v: v is None or (isinstance(v, int) and v > 0), "must be None or a positive integer"),
            ("batch_size", lambda v: isinstance(v, int) and v > 0, "must be a positive integer"),
            ("grad_accum", lambda v: isinstance(v, int) and v > 0, "must be a positive integer"),
            ("lr", lambda v: v > 0, "must be > 0"),
            ("warmup", lambda v: isinstance(v, int) and v >= 0, "must be an integer >= 0"),
            ("schedule", lambda v: v in ("cosine", "wsd", "constant"), "must be cosine, wsd or constant"),
            ("weight_decay", lambda v: v >= 0, "must be >= 0"),
            ("grad_clip", lambda v: v > 0, "must be > 0"),
            ("mtp_weight", lambda v: v >= 0, "must be >= 0"),
            ("balance_alpha", lambda v: v >= 0, "must be >= 0"),
            ("bias_update_speed", lambda v: v >= 0, "must be >= 0"),
            ("eval_every", lambda v: isinstance(v, int) and v > 0, "must be a positive integer"),
            ("eval_batches", lambda v: v is None or (isinstance(v, int) and v > 0), "must be None or > 0"),
            ("target_eval_loss", lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)
                                                         and v > 0), "must be None or > 0"),
            ("save_every", lambda v: isinstance(v, int) and v > 0, "must be a positive integer"),
            ("log_every", lambda v: isinstance(v, int) and v > 0, "must be a positive integer"),
            ("dtype", lambda v: v in ("auto", "float32", "bfloat16"), "must be auto, float32 or bfloat16"),
            ("precision", lambda v: v in P.PRECISIONS, "must be auto, fp32, bf16, fp8 or amp"),
            ("kd_weight", lambda v: 0 <= v <= 1, "must be in [0, 1]"),
            ("kd_temperature", lambda v: v > 0, "must be > 0"),
            ("ep", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "must be an integer >= 1"),
            *LOOP_FIELD_CHECKS,
        ])
        if self.target_eval_loss is not None and self.eval_fraction == 0:
            raise ValueError(f"SFTConfig.target_eval_loss={self.target_eval_loss} needs held-out records to measure "
                             "the eval loss on, but eval_fraction is 0")
        if isinstance(self.data, (str, Path)):
            self.data = [str(self.data)]
        for p in self.data:
            if not Path(p).is_file():
                raise ValueError(f"SFTConfig.data: {p} is not a file")
        # init_from's contents are checked when the stage starts (check_init_from), so a pipeline can
        # build this config before the stage that writes the folder has run


def check_init_from(folder) -> Path:
    """The model folder SFT starts from must hold config.json (and weights) and tokenizer.json."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"SFTConfig.init_from: {folder} is not a folder")
    for name in ("config.json", "tokenizer.json"):
        if not (folder / name).is_file():
            hint = " (save the tokenizer into the model folder)" if name == "tokenizer.json" else ""
            raise ValueError(f"SFTConfig.init_from: no {name} in {folder}{hint}")
    return folder


# ---------------------------------------------------------------------------------------------- data


class Sample(NamedTuple):
    ids: np.ndarray  # (L,) int64 token ids
    mask: np.ndarray  # (L,) int8, 1 = an assistant token to learn


class SFTBatch(NamedTuple):
    tokens: torch.Tensor  # (B, L) int64, right-padded with the pad id
    mask: torch.Tensor  # (B, L) bool, True on assistant tokens (targets)
    seg: torch.Tensor  # (B, L) int64, index of the sample within its row, -1 on padding


def load_records(cfg: SFTConfig) -> list[tuple[str, list[dict], list | None]]:
    """(where, messages, tools) for every training conversation: cfg.records, then each file of cfg.data, or
    the embedded cold-start records when records is None and data is empty. A record's optional "tools" (OpenAI
    function schemas) are rendered into its prompt by the chat template. Bad input raises ValueError naming
    records[i] or file:line."""
    from ..data import load_chat_records
    from ..tokenizer import validate_messages, validate_tools

    out = []
    if cfg.records is not None:  # an empty list is an error below, never a silent switch to embedded data
        for i, rec in enumerate(cfg.records):
            where = f"records[{i}]"
            if not isinstance(rec, dict) or "messages" not in rec:
                raise ValueError(f"{where}: expected a dict with a 'messages' list")
            validate_messages(rec["messages"], where=f"{where}.messages")
            validate_tools(rec.get("tools"), where=f"{where}.tools")
            out.append((where, rec["messages"], rec.get("tools")))
    for path in cfg.data:
        chats = load_chat_records(path)  # validates roles, fields and tools, naming file:line
        with open(path, encoding="utf-8") as f:  # load_chat_records skips blank lines only
            lines = [n for n, line in enumerate(f, start=1) if line.strip()]
        out.extend((f"{path}:{n}", chat["messages"], chat["tools"]) for n, chat in zip(lines, chats))
    if cfg.records is None and not cfg.data:
        from ..data.corpus import embedded_sft_records

        out = [(f"embedded[{i}]", r["messages"], None) for i, r in enumerate(embedded_sft_records(
            cfg.embedded_records, seed=cfg.seed, langs=tuple(cfg.embedded_langs), tasks=tuple(cfg.embedded_tasks) or None,
            levels=tuple(cfg.embedded_levels)))]
    for where, messages, _ in out:
        if messages[-1]["role"] != "assistant":
            raise ValueError(f"{where}: an SFT conversation must end with an assistant turn, "
                             f"got role {messages[-1]['role']!r}")
    if not out:
        raise ValueError(f"no SFT conversations in records ({len(cfg.records or [])}) or data {cfg.data}")
    return out


def render_samples(chats, tokenizer, cfg: SFTConfig) -> tuple[list[Sample], dict]:
    """Encode each (where, messages, tools) chat with its loss mask, cut to max_len; drop samples left with
    nothing to learn."""
    samples, truncated, dropped = [], 0, 0
    if cfg.prompt_format not in ("chat", "raw"):
        raise ValueError(f"SFTConfig.prompt_format must be chat or raw, got {cfg.prompt_format!r}")
    for where, messages, tools in chats:
        if cfg.prompt_format == "raw":
            if tools:
                raise ValueError(f"{where}: tools need prompt_format='chat' (the raw format has no tool section)")
            prompt = tokenizer.encode_prompt("".join(m["content"] for m in messages[:-1]))
            answer = tokenizer.encode_text(messages[-1]["content"]) + ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
            ids, mask = prompt + answer, [0] * len(prompt) + [1] * len(answer)
        else:
            ids, mask = tokenizer.encode_chat_with_mask(messages, thinking=cfg.thinking,
                                                        all_assistant_turns=cfg.all_assistant_turns, tools=tools)
        if len(ids) > cfg.max_len:
            truncated += 1
            ids, mask = ids[: cfg.max_len], mask[: cfg.max_len]
        if sum(mask[1:]) == 0:  # position 0 is never a target
            dropped += 1
            continue
        samples.append(Sample(np.asarray(ids, np.int64), np.asarray(mask, np.int8)))
    n = len(chats)
    return samples, {"samples": n, "truncated": truncated, "truncated_frac": truncated / max(1, n), "dropped": dropped}


def fingerprint(samples: list[Sample]) -> str:
    """A hash of the rendered samples: a resumed run must see the same data."""
    h = hashlib.sha1()
    for s in samples:
        h.update(s.ids.tobytes())
        h.update(s.mask.tobytes())
    return h.hexdigest()


def collate(samples: list[Sample], rows: list[list[int]], pad_id: int) -> SFTBatch:
    """Rows of sample indices -> right-padded (B, L) tokens, loss mask and per-row sample index."""
    lengths = [sum(len(samples[i].ids) for i in row) for row in rows]
    B, L = len(rows), max(lengths)
    tokens = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.bool)
    seg = torch.full((B, L), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        pos = 0
        for j, i in enumerate(row):
            s = samples[i]
            n = len(s.ids)
            tokens[b, pos: pos + n] = torch.from_numpy(s.ids)
            mask[b, pos: pos + n] = torch.from_numpy(s.mask.astype(bool))
            seg[b, pos: pos + n] = j
            pos += n
    return SFTBatch(tokens, mask, seg)


class SFTStream:
    """Samples -> rows (one sample each, or several packed up to max_len) -> micro-batches of
    batch_size rows. Each epoch reshuffles from (seed, epoch) alone; (epoch, position) is the whole
    iterator state. An epoch's last micro-batch may be smaller (SFT data is too precious to drop)."""

    def __init__(self, samples: list[Sample], batch_size: int, max_len: int, packing: bool, seed: int, pad_id: int):
        if not samples:
            raise ValueError("no SFT samples to train on (all empty or dropped)")
        self.samples, self.batch_size, self.max_len = samples, batch_size, max_len
        self.packing, self.seed, self.pad_id = packing, seed, pad_id
        self.epoch, self.position = 0, 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.samples)).tolist()
        if not self.packing:
            rows = [[i] for i in order]
        else:  # greedy: start a new row when the next sample would overflow max_len
            rows, cur, cur_len = [], [], 0
            for i in order:
                n = len(self.samples[i].ids)
                if cur and cur_len + n > self.max_len:
                    rows.append(cur)
                    cur, cur_len = [], 0
                cur.append(i)
                cur_len += n
            rows.append(cur)
        self._cache = (epoch, rows)
        return rows

    def num_batches(self, epoch: int) -> int:
        return math.ceil(len(self.epoch_rows(epoch)) / self.batch_size)

    def next(self) -> SFTBatch:
        rows = self.epoch_rows(self.epoch)
        if self.position >= len(rows):
            self.epoch, self.position = self.epoch + 1, 0
            rows = self.epoch_rows(self.epoch)
        chunk = rows[self.position: self.position + self.batch_size]
        self.position += len(chunk)
        return collate(self.samples, chunk, self.pad_id)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


# ---------------------------------------------------------------------------------------------- losses


def shifted_targets(batch: SFTBatch, k: int = 0) -> torch.Tensor:
    """Targets for depth k (0 = main head): input position i predicts token i+k+1, kept (else -100)
    when that token is an assistant token of the same sample. (B, L-1-k)."""
    L = batch.tokens.shape[1]
    tgt = batch.tokens[:, k + 1:]
    ok = batch.mask[:, k + 1:] & (batch.seg[:, k + 1:] == batch.seg[:, : L - 1 - k])
    return tgt.masked_fill(~ok, -100)


def masked_ce_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over the targets that are not -100 (the caller divides by their count)."""
    V = logits.shape[-1]
    return F.cross_entropy(logits.reshape(-1, V).float(), targets.reshape(-1), ignore_index=-100, reduction="sum")


def masked_router_stats(router, valid: torch.Tensor, num_rows: int | None = None):
    """Expert loads and the sequence-wise balance loss (V3 eq. 17-20) over real tokens only.

    router: RouterOutput with expert_ids (B, T, K) and scores (B, T, E); valid: (B, T) bool. num_rows: the rows
    with a real token in the global batch these rows are one rank's share of (the loss is then the share: the sum
    over these rows divided by num_rows; a row without a real token adds 0).
    The model's own RouterOutput.load / balance_loss count padding too; this is their masked twin
    (a candidate to move into nanoseek.model.moe as an optional `valid` argument)."""
    ids, scores = router.expert_ids, router.scores
    B, T, K = ids.shape
    E = scores.shape[-1]
    v = valid.to(scores.dtype)  # (B, T)
    counts = torch.zeros(B, E, device=ids.device, dtype=scores.dtype).scatter_add_(
        1, ids.reshape(B, T * K), v.unsqueeze(-1).expand(B, T, K).reshape(B, T * K))  # (B, E)
    load = counts.sum(0).detach()
    n = v.sum(1)  # (B,) real tokens per row
    f = counts * (E / K) / n.clamp_min(1).unsqueeze(-1)
    P = ((scores / scores.sum(-1, keepdim=True)) * v.unsqueeze(-1)).sum(1) / n.clamp_min(1).unsqueeze(-1)
    per_row = (f * P).sum(-1)
    if num_rows is not None:
        return load, per_row.sum() / max(1, num_rows)
    balance = per_row[n > 0].mean() if bool((n > 0).any()) else per_row.sum() * 0
    return load, balance


def real_rows(valid: torch.Tensor, depths: int) -> list[int]:
    """Rows with a real input token, per depth (0 = main; depth k reads from position k): masked_balance's
    num_rows for a global batch."""
    return [int((valid[:, k:].sum(1) > 0).sum()) for k in range(depths + 1)]


def masked_balance(out, valid: torch.Tensor, num_rows: list[int] | None = None
                   ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Expert loads per MoE layer (main layers, then MTP modules: the update_expert_bias order) and the balance loss
    summed over them (as ModelOutput.balance_loss), over the real input tokens `valid` (B, T) only; depth k's
    position i reads token i+k. num_rows (real_rows of the global batch): this is one rank's share of it."""
    rows = lambda k: None if num_rows is None else num_rows[k]
    stats = [masked_router_stats(r, valid, rows(0)) for r in out.router]
    stats += [masked_router_stats(r, valid[:, k:], rows(k)) for k, r in enumerate(out.mtp_router, start=1)]
    return [ld for ld, _ in stats], torch.stack([b for _, b in stats]).sum()


def _forward(model, batch: SFTBatch, device, ctx, mtp: bool):
    tokens = batch.tokens.to(device)
    with ctx:
        # no attention_mask: right padding + causal attention never lets a real token see a pad
        return model(tokens[:, :-1], mtp=mtp)


@torch.no_grad()
def evaluate(model, samples: list[Sample], cfg: SFTConfig, pad_id: int, device, ctx, use_mtp: bool) -> dict:
    """Token-weighted mean assistant-token loss over the held-out samples (fixed order, no packing)."""
    model.eval()
    tot, n, mtp_tot, mtp_n = 0.0, 0, 0.0, 0
    for b, start in enumerate(range(0, len(samples), cfg.batch_size)):
        if cfg.eval_batches is not None and b >= cfg.eval_batches:
            break
        rows = [[i] for i in range(start, min(start + cfg.batch_size, len(samples)))]
        batch = collate(samples, rows, pad_id)
        out = _forward(model, batch, device, ctx, use_mtp)
        tgt = shifted_targets(batch).to(device)
        tot += masked_ce_sum(out.logits, tgt).item()
        n += int((tgt != -100).sum())
        for k, lg in enumerate(out.mtp_logits, start=1):
            t = shifted_targets(batch, k).to(device)
            mtp_tot += masked_ce_sum(lg, t).item()
            mtp_n += int((t != -100).sum())
    model.train()
    res = {"eval_loss": tot / max(1, n)}
    if mtp_n:
        res["eval_mtp_loss"] = mtp_tot / mtp_n
    return res


# ---------------------------------------------------------------------------------------------- loop


def sft(cfg: SFTConfig, progress: C.Progress | None = None, dist=None) -> Path:
    """Fine-tune cfg.init_from on chat data; returns out_dir/model (weights + tokenizer), or the
    latest checkpoint when stopped early by stop_after. dist: the process context of a caller that joined the
    process group already (distill); None: the Trainer's own."""
    from ..tokenizer import Tokenizer
    from .evaluate import load_any_model

    run = Trainer("sft", cfg, progress, dist=dist)  # device, seed, the checkpoint to resume from
    source = run.resume_from if run.resumed else check_init_from(cfg.init_from)
    tokenizer = Tokenizer.load(str(source))
    data = build_data(cfg, tokenizer)
    model = load_any_model(source, run.device)  # a DeepSeek model or a dense student
    model.train()
    teacher = load_teacher(cfg, model, run.device)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"{source}: tokenizer has {tokenizer.vocab_size} tokens but the model only "
                         f"{model.config.vocab_size} embeddings")
    # precision wraps the fp32 model from outside: bf16 weights + fp32 masters in the optimizer, FP8 GEMMs, ...;
    # under torchrun the model is parallelized first (FSDP2 + expert parallelism)
    model, opt, ctx = run.prepare(model, lambda named: C.make_optimizer(model, cfg.lr, cfg.weight_decay, params=named),
                                  P.resolve(cfg.precision, cfg.dtype, False, run.device))

    def load_state(state: dict) -> None:
        if state.get("data_fingerprint") != data.fingerprint:
            raise ValueError(f"cannot resume from {run.resume_from}: the SFT data (or its rendering: thinking, "
                             f"max_len, ...) differs from the run that wrote it; use resume=False or a new out_dir")
        data.stream.load_state_dict(state["data"])

    run.restore(opt, load_state=load_state, config_json=_json(cfg), model=model)
    if not run.resumed:
        run.log(0, **{**data.stats, "train_samples": data.train_samples, "eval_samples": len(data.eval_samples),
                      "total_steps": data.total_steps})
    use_mtp = model.config.num_nextn_predict_layers > 0 and cfg.mtp_weight > 0
    evaluate_ = lambda: evaluate(model, data.eval_samples, cfg, tokenizer.pad_id, run.device, ctx, use_mtp)
    if cfg.target_eval_loss is not None and not data.eval_samples:
        raise ValueError(f"SFTConfig.target_eval_loss={cfg.target_eval_loss}: no records were held out to measure "
                         f"the eval loss on ({data.train_samples} training samples, eval_fraction "
                         f"{cfg.eval_fraction}); add records or drop the target")
    target = None if cfg.target_eval_loss is None else lambda rec: rec["eval_loss"] <= cfg.target_eval_loss
    return run.fit(make_train_step(cfg, model, teacher, data, ctx, run.device, use_mtp, run.ckpt_root, run.dist),
                   data.total_steps, model, tokenizer,
                   lr_at=lambda step, _: C.lr_at(step, data.total_steps, cfg.lr, cfg.warmup, cfg.schedule,
                                                 cfg.min_lr_ratio),
                   evaluate=evaluate_ if data.eval_samples else None,
                   state=lambda: {"data": data.stream.state_dict(), "data_fingerprint": data.fingerprint},
                   progress_keys={"loss": "loss"}, stop_when=target)


class SFTData(NamedTuple):
    stream: SFTStream
    eval_samples: list[Sample]
    stats: dict  # render statistics (samples, truncated, dropped)
    fingerprint: str
    train_samples: int
    total_steps: int
    total_micro: int | None  # micro-batches of the whole run (epochs), None with fixed steps


def build_data(cfg: SFTConfig, tokenizer) -> SFTData:
    """Records -> train/eval split -> rendered samples -> the training stream, and the length of the run: fixed
    steps, or every micro-batch of `epochs` epochs."""
    from ..data import split_documents

    chats = load_records(cfg)
    if cfg.eval_fraction > 0 and len(chats) >= 2:
        train_chats, eval_chats = split_documents(chats, cfg.eval_fraction, seed=cfg.seed)
    else:
        train_chats, eval_chats = chats, []
    train_samples, stats = render_samples(train_chats, tokenizer, cfg)
    eval_samples, _ = render_samples(eval_chats, tokenizer, cfg)
    stream = SFTStream(train_samples, cfg.batch_size, cfg.max_len, cfg.packing, cfg.seed, tokenizer.pad_id)
    total_micro = None if cfg.steps else sum(stream.num_batches(e) for e in range(cfg.epochs))
    total_steps = cfg.steps or math.ceil(total_micro / cfg.grad_accum)
    if cfg.warmup >= total_steps:
        raise ValueError(f"SFTConfig.warmup must be below the run's {total_steps} steps, got {cfg.warmup}")
    return SFTData(stream, eval_samples, stats, fingerprint(train_samples), len(train_samples), total_steps,
                   total_micro)


def load_teacher(cfg: SFTConfig, model, device):
    """The frozen logit-distillation teacher (None for plain SFT); it must share the student's vocabulary."""
    from .evaluate import load_any_model

    if not cfg.teacher:
        return None
    teacher = load_any_model(check_init_from(cfg.teacher), device).eval().requires_grad_(False)
    if teacher.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"SFTConfig.teacher: vocab_size {teacher.config.vocab_size} differs from the student's "
                         f"{model.config.vocab_size}; logit distillation needs one vocabulary")
    return teacher


def shard_rows(batch: SFTBatch, dist, pad_id: int) -> SFTBatch:
    """This rank's rows of a global micro-batch, after padding it with empty rows (pads, no loss, no load) to a
    multiple of the world size (an epoch's last micro-batch may be short)."""
    from ..parallel import shard_batch

    extra = -batch.tokens.shape[0] % dist.world_size
    if extra:
        L = batch.tokens.shape[1]
        batch = SFTBatch(torch.cat([batch.tokens, torch.full((extra, L), pad_id, dtype=torch.long)]),
                         torch.cat([batch.mask, torch.zeros(extra, L, dtype=torch.bool)]),
                         torch.cat([batch.seg, torch.full((extra, L), -1, dtype=torch.long)]))
    return SFTBatch(*(shard_batch(t, dist) for t in batch))


def make_train_step(cfg: SFTConfig, model, teacher, data: SFTData, ctx, device, use_mtp: bool, ckpt_root: Path,
                    dist=None):
    """One optimizer step of SFT over grad_accum micro-batches (fewer at the end of an epochs-long run).

    Distributed (world size W > 1): every rank draws the same global micro-batches (the normalisers above count
    them whole) and trains on its rows (shard_rows); each loss is then this rank's share of the global one and is
    multiplied by W, as FSDP averages the ranks' gradients; the bias update sees the global expert loads."""
    stream = data.stream
    W = 1 if dist is None else dist.world_size

    def train_step(step: int, opt) -> dict:
        n_micro = cfg.grad_accum if data.total_micro is None else min(cfg.grad_accum,
                                                                      data.total_micro - step * cfg.grad_accum)
        micro = [stream.next() for _ in range(n_micro)]
        # normalisers over the whole step: every assistant token of the step weighs the same
        n_main = sum(int((shifted_targets(b) != -100).sum()) for b in micro)
        depths = model.config.num_nextn_predict_layers if use_mtp else 0
        n_mtp = [sum(int((shifted_targets(b, k) != -100).sum()) for b in micro) for k in range(1, depths + 1)]
        loads, tot, num_tokens = None, {"loss": 0.0, "mtp_loss": 0.0, "balance_loss": 0.0}, 0
        for batch in micro:
            num_tokens += int((batch.seg[:, :-1] >= 0).sum())
            rows = None
            if W > 1:  # the balance loss averages over the global batch's rows
                rows = real_rows(batch.seg[:, :-1] >= 0, depths)
                batch = shard_rows(batch, dist, stream.pad_id)
            out_ = _forward(model, batch, device, ctx, use_mtp)
            tgt = shifted_targets(batch).to(device)
            main = masked_ce_sum(out_.logits, tgt) / max(1, n_main)
            loss = main
            tot["loss"] += main.item() * W
            if teacher is not None:
                from .distill_loss import logit_distillation_loss

                with torch.no_grad(), ctx:
                    t_logits = teacher(batch.tokens[:, :-1].to(device), mtp=False).logits
                valid = tgt != -100
                kd = logit_distillation_loss(out_.logits, t_logits, valid, cfg.kd_temperature)
                kd = kd * valid.sum() / max(1, n_main)  # token-weighted like the CE
                loss = (1 - cfg.kd_weight) * main + cfg.kd_weight * kd
                tot["kd_loss"] = tot.get("kd_loss", 0.0) + kd.item() * W
            if out_.mtp_logits:
                mtp = [masked_ce_sum(lg, shifted_targets(batch, k).to(device)) / max(1, n_mtp[k - 1])
                       for k, lg in enumerate(out_.mtp_logits, start=1)]
                mtp_mean = torch.stack(mtp).mean()  # averaged over depths (V3 eq. 25)
                loss = loss + cfg.mtp_weight * mtp_mean
                tot["mtp_loss"] += mtp_mean.item() * W
            if out_.router or out_.mtp_router:
                step_loads, bal = masked_balance(out_, (batch.seg[:, :-1] >= 0).to(device), rows)
                loss = loss + cfg.balance_alpha * bal / n_micro
                tot["balance_loss"] += bal.item() * W / n_micro
                loads = step_loads if loads is None else [a + b for a, b in zip(loads, step_loads)]
            if W > 1:
                loss = loss * W  # FSDP averages over the ranks: W x each share sums to the global loss
            loss.backward()
        gnorm = P.clip_grad_norm_(model, opt, cfg.grad_clip)  # on the fp32 masters under bf16
        C.check_finite("sft", step + 1, ckpt_root, loss=tot["loss"], grad_norm=gnorm)  # nothing non-finite is stepped
        opt.step()
        opt.zero_grad(set_to_none=True)
        if loads is not None and W > 1:
            from ..parallel import global_loads

            loads = global_loads(loads, dist)  # the global batch's loads, the same on every rank
        if loads is not None and cfg.bias_update_speed > 0:
            update_expert_bias(model, loads, cfg.bias_update_speed)
        if not out_.mtp_logits:
            tot.pop("mtp_loss")
        if loads is None:
            tot.pop("balance_loss")
        epoch = stream.epoch + stream.position / len(stream.epoch_rows(stream.epoch))
        return {**tot, "grad_norm": float(gnorm), "assistant_tokens": n_main, "epoch": epoch,
                "truncated_frac": data.stats["truncated_frac"], "num_tokens": num_tokens,
                **({"load": lambda: load_stats(loads)} if loads is not None else {})}

    return train_step


def _json(cfg: SFTConfig) -> str:
    d = dataclasses.asdict(cfg)
    if d["records"] is not None:
        d["records"] = f"<{len(d['records'])} records in memory>"
    return json.dumps(d, indent=2, default=str) + "\n"
