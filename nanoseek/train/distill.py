"""Distillation (R1, sec. 2.4): a dense Qwen2-compatible student is fine-tuned on the teacher's verified
samples (plain SFT, as DeepSeek did), optionally with logit distillation (KL to the teacher on the
same tokens) when the vocabularies match, which they do when the student reuses the teacher's tokenizer.

    distill(DistillConfig(teacher="runs/grpo/model", out_dir="runs/distill")) -> Path

Without `data`, the teacher's samples are drawn first by rejection sampling (nanoseek.train.rejection).

Under torchrun (`torchrun --nproc_per_node N -m nanoseek distill`) rank 0 alone draws the teacher's samples and
writes the student's starting folder while the other ranks wait at a barrier (the process group's timeout, 30 min
with gloo and 10 with NCCL by default, bounds that: for a large teacher run `nanoseek rejection-sample` first and
pass its file as `data`); then every rank reads the same files and the fine-tuning is sft's, sharded (FSDP2).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from . import common as C
from .trainer import LOOP_FIELD_CHECKS


@dataclass
class DistillConfig:
    teacher: str = "runs/nanoseek/grpo/model"  # default: the RL model `nanoseek run` writes
    out_dir: str = "runs/distill"
    data: list[str] = field(default_factory=list)  # SFT JSONL from the teacher; empty = sample it now
    # teacher sampling when data is empty
    tasks: list[str] = field(default_factory=lambda: ["arithmetic"])
    levels: list[int] = field(default_factory=lambda: [1])
    langs: list[str] = field(default_factory=lambda: ["en"])
    num_prompts: int = 400
    samples_per_prompt: int = 4
    max_tokens: int = 96
    # the student
    student_init: str | None = None  # an existing dense model folder; None = made by `student_from`
    # scratch: a fresh Qwen2-compatible student of student_preset; teacher: the teacher made dense (each MoE layer
    # merged into one SwiGLU: shared expert + the most weighted routed experts, nanoseek.prune.densify)
    student_from: str = "scratch"
    student_preset: str = "student-tiny"
    student_overrides: dict = field(default_factory=dict)
    logit_kd: bool = False  # add KL(teacher || student) on assistant tokens
    kd_weight: float = 0.5
    min_samples: int = 64  # fewer teacher samples than this: top up with embedded cold-start records (noted)
    # fine-tuning
    steps: int = 300
    batch_size: int = 16
    lr: float = 2e-3
    warmup: int = 20
    max_len: int = 256
    log_every: int = 10
    precision: str = "auto"  # sft's: fp32 | bf16 | amp (auto: fp32 on CPU, amp on GPU); under torchrun fp32 or bf16
    seed: int = 0
    device: str | None = None
    resume: bool = True
    stop_after: int | None = None  # checkpoint and stop at this step (a later call resumes)
    time_limit_s: float | None = None  # wall-clock budget: the step that spends it is the last (checkpointed, published)
    keep_checkpoints: int = 2
    tensorboard: bool = True

    def __post_init__(self):
        C.validate_fields(self, [
            ("steps", lambda v: isinstance(v, int) and v > 0, "must be a positive integer"),
            ("kd_weight", lambda v: 0 <= v <= 1, "must be in [0, 1]"),
            ("num_prompts", lambda v: isinstance(v, int) and v > 0, "must be a positive integer"),
            ("student_from", lambda v: v in ("scratch", "teacher"), "must be scratch or teacher"),
            *LOOP_FIELD_CHECKS,
        ])
        for p in self.data:
            if not Path(p).is_file():
                raise ValueError(f"DistillConfig.data: {p} is not a file")


def filler_records(cfg: DistillConfig, n: int) -> list[dict]:
    """n embedded cold-start records on the stage's own focus (the tasks, levels and languages of the teacher's
    prompts), not the whole embedded mix: what tops up a weak teacher's samples."""
    from ..data.corpus import embedded_sft_records

    return embedded_sft_records(n, seed=cfg.seed + 7, langs=cfg.langs, tasks=cfg.tasks, levels=cfg.levels)


def make_student(cfg: DistillConfig, folder: Path) -> Path:
    """The student's starting folder, sharing the teacher's tokenizer: a fresh dense Qwen2-compatible model
    (student_from "scratch") or the teacher with its MoE layers merged into dense ones ("teacher")."""
    from ..config import ModelConfig
    from ..model.dense import DenseConfig, DenseModel
    from ..prune import prune

    if (folder / "config.json").exists() and (folder / "tokenizer.json").exists():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    if cfg.student_from == "teacher":
        prune(cfg.teacher, tmp, dense=True)  # writes the teacher's tokenizer files beside the weights
    else:
        scfg = DenseConfig.student_of(ModelConfig.load(cfg.teacher), preset=cfg.student_preset,
                                      **cfg.student_overrides)
        model = DenseModel(scfg)
        model.init_weights(seed=cfg.seed)
        model.save_pretrained(tmp)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(Path(cfg.teacher) / name, tmp / name)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


class _Labelled(C.Progress):
    """Passes everything on to `inner`, with the stage's own label: distillation runs sft() underneath."""

    def __init__(self, inner: C.Progress, desc: str):
        self.inner, self.desc = inner, desc

    def start(self, total: int, desc: str, initial: int = 0) -> None:
        self.inner.start(total, self.desc, initial)

    def update(self, n: int = 1, **metrics) -> None:
        self.inner.update(n, **metrics)

    def close(self) -> None:
        self.inner.close()


def distill(cfg: DistillConfig, progress: C.Progress | None = None) -> Path:
    from .rejection import RejectionConfig, rejection_sample
    from .sft import SFTConfig, sft
    from .trainer import init_dist

    for name in ("config.json", "tokenizer.json"):
        if not (Path(cfg.teacher) / name).exists():
            raise ValueError(f"DistillConfig.teacher: no {name} in {cfg.teacher}")
    dist = init_dist("distill", cfg)  # one process: nothing; torchrun: the process group sft trains in
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = list(cfg.data)
    init = Path(cfg.student_init) if cfg.student_init else out / "student_init"
    if dist.is_main:  # the files every rank reads: drawn and written once
        if not data and not (out / "teacher_samples.jsonl").exists():  # sampled once; a resumed run reuses them
            rejection_sample(RejectionConfig(model=cfg.teacher, out=str(out / "teacher_samples.jsonl"),
                                             tasks=cfg.tasks, levels=cfg.levels, langs=cfg.langs,
                                             num_prompts=cfg.num_prompts, k=cfg.samples_per_prompt,
                                             max_tokens=cfg.max_tokens, keep_per_prompt=cfg.samples_per_prompt,
                                             seed=cfg.seed + 99, device=cfg.device))
        if not cfg.student_init:
            make_student(cfg, init)
    if dist.world_size > 1:
        import torch.distributed as torch_dist

        torch_dist.barrier()  # the other ranks wait for rank 0's files
    if not data:
        data = [str(out / "teacher_samples.jsonl")]
    n = sum(1 for p in data for line in Path(p).read_text().splitlines() if line.strip())
    records = None
    if n < cfg.min_samples:  # a weak teacher solved too little: keep the stage meaningful, and say so
        records = filler_records(cfg, cfg.min_samples - n)
        data = [p for p in data if Path(p).read_text().strip()]
    if dist.is_main:
        C.atomic_write_text(out / "distill_data.json",
                            json.dumps({"teacher_samples": n, "filler_records": len(records or [])}))
        C.atomic_write_text(out / "distill_config.json", json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    return sft(SFTConfig(init_from=str(init), out_dir=str(out), data=data, records=records, steps=cfg.steps,
                         batch_size=cfg.batch_size,
                         lr=cfg.lr, warmup=cfg.warmup, max_len=cfg.max_len, seed=cfg.seed, device=cfg.device,
                         precision=cfg.precision, resume=cfg.resume, stop_after=cfg.stop_after,
                         time_limit_s=cfg.time_limit_s, keep_checkpoints=cfg.keep_checkpoints,
                         tensorboard=cfg.tensorboard, teacher=cfg.teacher if cfg.logit_kd else None,
                         kd_weight=cfg.kd_weight, eval_every=100, save_every=100, log_every=cfg.log_every,
                         mtp_weight=0.0),
               _Labelled(progress or C.Progress(), "distill"), dist=dist)
