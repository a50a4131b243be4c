"""The main job (`nanoseek run`): the V3 -> R1 -> V3.2 recipe end to end on embedded data.

  1 tokenizer        byte-level BPE with DeepSeek's special tokens and the V3.1 chat template
  2 pretrain         MLA + DeepSeekMoE (aux-loss-free balancing) + MTP, optional FP8
  3 dsa              V3.2 DSA continued training: indexer warm-up, then sparse training
  4 sft              cold-start SFT on long-CoT records with the thinking template
  5 grpo             GRPO with R1 rewards (accuracy + format) and the V3.2 options
  6 rejection        rejection sampling of the RL model into new SFT data
  7 distill          a dense student (the teacher's MoE layers merged) distilled on the teacher's samples
  8 eval             every stage's model on held-out problems (pass@1, maj@k)
  9 report           report.md / report.html with the curves and tables

Each stage writes an HF model folder under the run folder and is skipped when its output exists; a
stage that was interrupted resumes from its own checkpoints, so a killed run started again continues
at the stage and step where it stopped.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and the stages load when a run starts, not when the CLI builds its parser
    from .train import common as C

STAGES = ["tokenizer", "pretrain", "dsa", "sft", "grpo", "rejection", "distill", "eval", "report"]

# Per preset: stage settings and the expected seconds per stage on the reference machine (2-core CPU),
# used for the time-left estimate. "cpu" is the default: 12.4-13.0 minutes on the 2-core AVX-512 EPYC VM of
# docs/results.md (eight seeds; about 2.5x longer on the AVX2 VM of the earlier runs).
_TASKS = dict(tasks=["arithmetic"], levels=[1, 2], langs=["en"])
_FOCUS = dict(embedded_tasks=["arithmetic"], embedded_levels=[1, 2], embedded_langs=["en"])
RUN_PRESETS: dict[str, dict] = {
    "cpu": dict(
        threads=2,  # both cores: 1.35-1.6x one thread on the tiny model's training step (docs/benchmarks.md)
        tokenizer=dict(vocab_size=1024, docs=3000, digit_group=1),  # one token per digit: column arithmetic
        # ~4.9M tokens in 2,400 steps of 8 x 256, English only (the judged problems are English). The tiny model
        # learns to copy operands from the prompt in a sudden drop of the loss that comes after a number of
        # optimizer steps more than of tokens: at 700 steps of 16 x 256 the drop came late or not at all in 2
        # runs of 4 (held-out loss 0.38-0.40, SFT 8%); at 8 x 256 it came by step ~800. Some seeds' models still
        # misread operand digits after the drop, and more steps fix them: 2 of 4 at 1,200 steps, 1 of 5 at 1,800
        # (seed 4: SFT 29.9%, GRPO +9), none of 5 at 2,400 (seed 4: SFT 73.2%, GRPO +23.2; docs/results.md)
        pretrain=dict(preset="tiny", embedded_docs=6000, seq_len=256, batch_size=8, steps=2400, warmup=40, lr=3e-3,
                      schedule="cosine", eval_every=200, save_every=200, **_FOCUS),
        # on pre-training's data focus (on the whole embedded mix the dense model's loss is 12.4, uniform 6.7) and
        # 128 keys a query: at 32 of up to 256 the sparse attention cost the worked solutions 18-28 points of SFT
        # (SFT 52.8% / 63.1% at top-32, 80.9% at top-128, 76.2% / 81.1% without DSA; docs/results.md)
        dsa=dict(index_topk=128, seq_len=256, batch_size=8, warmup_steps=40, sparse_steps=20, embedded_docs=1000,
                 eval_every=20, save_every=20, **_FOCUS),
        # the cold start, as R1's: it teaches the chat format and leaves the reasoning to GRPO. Pre-training on worked
        # problems already teaches the columns: 150 full steps gave 86-95% and 600 steps 93-98% on the judged
        # problems, leaving GRPO 2-6 points. A fixed 40 steps gave 26-77% over five seeds (the pre-trained models
        # differ in how fast they take the format); ending at a held-out loss of 0.016 instead (checked every 10 of
        # at most 150 steps of 16 worked solutions) gave 51-73% on five seeds after 30-60 steps (docs/results.md)
        sft=dict(embedded_records=9600, steps=150, target_eval_loss=0.016, eval_every=10, batch_size=16, lr=1e-3,
                 warmup=10, max_len=256, save_every=100, **_FOCUS),
        # rollouts on one core while the step trains on the other (async_rollouts, one step off-policy): 300 steps in
        # the time 150 synchronous ones took; from the 40-step cold start lr 1.5e-4 reached in 300 steps what 7e-5
        # reached in 400 (seed 2: 94.4% against 94.3%; seed 0: 80.1% against 76.4%; docs/results.md). 250 steps:
        # the step-250 checkpoints of eight 300-step runs judged within 0.5 points of their final models, and the
        # 50 steps cost ~55-70 s of the 15 minutes
        grpo=dict(tasks=["arithmetic"], levels=[2], langs=["en"], steps=250, prompts_per_step=16, num_generations=8,
                  max_tokens=128, temperature=0.6, lr=1.5e-4, warmup=5, lr_schedule="cosine", async_rollouts=True,
                  reward_weights={"accuracy": 1.0, "format": 0.2}, eval_every=100, eval_problems=128, save_every=50),
        # 512 prompts x 4 samples: ~480 distinct verified samples (128 prompts gave 85-118: a student distilled on
        # them reached 79% of the teacher, on 482 98%; docs/results.md, "The distilled student")
        rejection=dict(tasks=["arithmetic"], levels=[2], langs=["en"], num_prompts=512, k=4, max_tokens=128),
        # the student is the teacher made dense (each MoE layer merged into one SwiGLU; a fresh Qwen2 student
        # stays at 0-6%: it has not been pre-trained), fine-tuned on those samples with logit distillation
        distill=dict(steps=150, batch_size=16, lr=3e-4, warmup=10, max_len=192, student_from="teacher",
                     logit_kd=True, kd_weight=0.9),
        # the judged set, fixed before the runs: 1,024 level-2 test problems (the level GRPO trains on), greedy
        eval=dict(tasks=["arithmetic"], levels=[2], langs=["en"], num_problems=1024, k=1, temperature=0.0,
                  max_tokens=128, max_batch_size=256),
        estimates=dict(tokenizer=1, pretrain=425, dsa=16, sft=12, grpo=250, rejection=21, distill=26, eval=22,
                       report=2),
    ),
}
RUN_PRESETS["micro"] = copy.deepcopy(RUN_PRESETS["cpu"])
RUN_PRESETS["micro"].update(
    tokenizer=dict(vocab_size=400, docs=400, digit_group=1),
    pretrain=dict(preset="tiny", embedded_docs=400, seq_len=64, batch_size=4, steps=8, warmup=1, lr=3e-3,
                  eval_every=8, save_every=4, model_overrides=dict(hidden_size=64, intermediate_size=128,
                  moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=32, kv_lora_rank=32,
                  qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, index_n_heads=4, index_head_dim=16)),
    dsa=dict(index_topk=16, seq_len=64, batch_size=2, warmup_steps=3, sparse_steps=2, embedded_docs=200,
             eval_every=5, eval_batches=1, save_every=5),
    sft=dict(embedded_records=60, steps=6, batch_size=4, lr=1e-3, warmup=1, max_len=128, save_every=3),
    grpo=dict(**_TASKS, steps=3, prompts_per_step=2, num_generations=3, max_tokens=16, lr=1e-4, eval_every=3,
              eval_problems=4, save_every=3, async_rollouts=True),
    rejection=dict(**_TASKS, num_prompts=6, k=2, max_tokens=16),
    distill=dict(steps=4, batch_size=4, lr=3e-4, warmup=1, max_len=96, student_from="teacher", logit_kd=True,
                 kd_weight=0.9),
    eval=dict(**_TASKS, num_problems=4, k=2, max_tokens=16),
    estimates=dict(tokenizer=2, pretrain=5, dsa=3, sft=3, grpo=5, rejection=2, distill=3, eval=5, report=5),
)
RUN_PRESETS["gpu"] = copy.deepcopy(RUN_PRESETS["cpu"])
RUN_PRESETS["gpu"].update(
    threads=None,
    tokenizer=dict(vocab_size=8192, docs=20000),
    pretrain=dict(preset="small", model_overrides=dict(vocab_size=8192), embedded_docs=60000, seq_len=512,
                  batch_size=32, steps=3000, warmup=100, lr=1e-3, eval_every=250, save_every=250),
    dsa=dict(index_topk=128, seq_len=512, batch_size=16, warmup_steps=300, sparse_steps=300, embedded_docs=10000,
             eval_every=100, save_every=100),
    sft=dict(embedded_records=20000, steps=1500, batch_size=32, lr=3e-4, warmup=50, max_len=512, save_every=250),
    grpo=dict(tasks=["arithmetic", "countdown"], levels=[1, 2], langs=["en", "zh"], steps=200, prompts_per_step=32,
              num_generations=16, max_tokens=256, lr=2e-5, eval_every=20, eval_problems=256, save_every=20),
    rejection=dict(tasks=["arithmetic", "countdown"], levels=[1, 2], langs=["en", "zh"], num_prompts=2000, k=8,
                   max_tokens=256),
    distill=dict(steps=1500, batch_size=32, lr=1e-3, warmup=50, max_len=512, student_preset="student-small"),
    eval=dict(tasks=["arithmetic", "countdown"], levels=[1, 2], langs=["en", "zh"], num_problems=128, k=8,
              max_tokens=256),
    estimates=dict(tokenizer=60, pretrain=1800, dsa=300, sft=600, grpo=1800, rejection=120, distill=600, eval=300,
                   report=10),
)


# what a run folder was started with (run.json); a rerun must agree, or it would skip every finished stage
# and report settings it did not run with
RUN_SETTINGS = ("preset", "fp8", "seed")
_SETTING_DEFAULTS = dict(preset="cpu", fp8=False, seed=0)


@dataclass
class RunConfig:
    """preset / fp8 / seed: None = the run folder's (run.json), or for a new folder cpu / off / 0."""

    out: str = "runs/nanoseek"
    preset: str | None = None  # cpu (the default; ~12-30 min on a 2-core CPU), micro (seconds, for tests/CI), gpu
    fp8: bool | None = None  # FP8 pre-training, compared with a same-length run without FP8 in the report
    threads: int | None = None  # torch CPU threads; None = the preset's choice
    seed: int | None = None
    device: str | None = None

    def __post_init__(self):
        if self.preset is not None and self.preset not in RUN_PRESETS:
            raise ValueError(f"RunConfig.preset must be one of {sorted(RUN_PRESETS)}, got {self.preset!r}")


def stage_outputs(out: str | Path) -> dict[str, Path]:
    """What each stage of a run in folder `out` writes (the commands after `nanoseek run` default to these)."""
    out = Path(out)
    return {"tokenizer": out / "tokenizer", "pretrain": out / "pretrain" / "model", "dsa": out / "dsa" / "model",
            "sft": out / "sft" / "model", "grpo": out / "grpo" / "model",
            "rejection": out / "rejection" / "data.jsonl", "distill": out / "distill" / "model",
            "eval": out / "eval" / "summary.json", "report": out / "report.md"}


def _recorded_settings(out: Path) -> dict | None:
    """The settings the run in `out` was started with: run.json, or for a folder written before run.json
    existed, the preset whose pre-training settings match pretrain/pretrain_config.json. None: a new folder."""
    f = out / "run.json"
    if f.is_file():
        rec = json.loads(f.read_text(encoding="utf-8"))
        if not isinstance(rec, dict) or rec.get("preset") not in RUN_PRESETS:
            raise ValueError(f"{f}: not a nanoseek run record (expected a JSON object with a known \"preset\")")
        return {k: rec.get(k, _SETTING_DEFAULTS[k]) for k in RUN_SETTINGS}
    f = out / "pretrain" / "pretrain_config.json"
    if not f.is_file():
        return None
    try:
        rec = json.loads(f.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    for name, P in RUN_PRESETS.items():
        if isinstance(rec, dict) and all(json.dumps(rec.get(k), sort_keys=True) == json.dumps(v, sort_keys=True)
                                         for k, v in P["pretrain"].items()):
            return {"preset": name, "fp8": bool(rec.get("fp8", False)), "seed": rec.get("seed", 0)}
    return None


def _describe(settings: dict) -> str:
    return f"preset {settings['preset']!r}, fp8 {'on' if settings['fp8'] else 'off'}, seed {settings['seed']}"


def resolve(cfg: RunConfig) -> RunConfig:
    """cfg with preset / fp8 / seed filled in from the run folder (or the defaults for a new one); a setting
    given that differs from the folder's is an error naming the folder's settings."""
    out = Path(cfg.out)
    rec = _recorded_settings(out)
    if rec is not None:
        clash = [k for k in RUN_SETTINGS if getattr(cfg, k) is not None and getattr(cfg, k) != rec[k]]
        if clash:
            asked = ", ".join(f"{k} {getattr(cfg, k)!r}" for k in clash)
            raise ValueError(
                f"{out} holds a run started with {_describe(rec)}; this command asks for {asked}. To resume it, "
                f"run `nanoseek run --out {out}` (or with --preset {rec['preset']}); to start a new run, give "
                f"another --out")
        return dataclasses.replace(cfg, **rec)
    return dataclasses.replace(cfg, **{k: _SETTING_DEFAULTS[k] if getattr(cfg, k) is None else getattr(cfg, k)
                                       for k in RUN_SETTINGS})


class Reporter:
    """Hooks for the CLI: one line per stage, a progress bar per stage, the estimated time left."""

    def stage_start(self, index: int, total: int, name: str, eta_s: float | None) -> None:
        pass

    def stage_end(self, name: str, seconds: float, skipped: bool) -> None:
        pass

    def progress(self) -> C.Progress:
        from .train import common as C

        return C.Progress()


def _sft_note(metrics: list[dict], cfg) -> dict:
    """Where an SFT run with a target eval loss ended: at the target, or at its last step without reaching it."""
    if cfg.target_eval_loss is None:
        return {}
    evals = [r for r in metrics if "eval_loss" in r]
    if not evals:
        return {}
    last = evals[-1]
    if last.get("reached_target"):
        return {"notes": f"step {last['step']} of at most {cfg.steps}: held-out loss {last['eval_loss']:.4f} "
                         f"<= {cfg.target_eval_loss}"}
    return {"notes": f"all {last['step']} steps: held-out loss {last['eval_loss']:.4f} never reached "
                     f"{cfg.target_eval_loss}"}


def _done(path: Path) -> bool:
    return (path / "config.json").exists() or path.is_file()


def run(cfg: RunConfig, reporter: Reporter | None = None) -> Path:
    """Run (or resume) the whole recipe; returns the report.md path. A folder resumes with the settings it
    was started with (run.json); cfg's preset / fp8 / seed may be None (the folder's) but may not differ."""
    import torch

    from .train import common as C

    reporter = reporter or Reporter()
    cfg = resolve(cfg)
    P = RUN_PRESETS[cfg.preset]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "run.json").is_file():
        C.atomic_write_text(out / "run.json", json.dumps({k: getattr(cfg, k) for k in RUN_SETTINGS}, indent=2) + "\n")
    threads, before = cfg.threads or P.get("threads"), torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run_stages(cfg, P, out, reporter)
    finally:  # a caller in the same process (a notebook, the tests) keeps its own thread count
        torch.set_num_threads(before)


def _run_stages(cfg: RunConfig, P: dict, out: Path, reporter: Reporter) -> Path:
    from .train import common as C

    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    est = P["estimates"]
    dirs = {s: out / s for s in STAGES}
    outputs = stage_outputs(out)
    common = dict(seed=cfg.seed, device=cfg.device)

    def eta(i: int) -> float:
        done = [s for s in STAGES[:i] if s in timings and timings[s].get("estimated")]
        # rescale the remaining estimates by how fast the finished stages ran, smoothed by a minute so a
        # short first stage does not swing the estimate
        speed = (sum(timings[s]["seconds"] for s in done) + 60) / (sum(est[s] for s in done) + 60)
        return speed * sum(est[s] for s in STAGES[i:])

    for i, stage in enumerate(STAGES):
        target = outputs[stage]
        if _done(target if stage != "tokenizer" else target / "tokenizer.json") and stage != "report":
            reporter.stage_end(stage, timings.get(stage, {}).get("seconds", 0.0), skipped=True)
            continue
        reporter.stage_start(i + 1, len(STAGES), stage, eta(i))
        t0 = time.perf_counter()
        notes = _run_stage(stage, P, cfg, dirs, outputs, common, reporter)
        seconds = time.perf_counter() - t0 + timings.get(stage, {}).get("partial", 0.0)
        timings[stage] = {"seconds": seconds, "estimated": True, **(notes or {})}
        C.atomic_write_text(timings_path, json.dumps(timings, indent=2))
        reporter.stage_end(stage, seconds, skipped=False)
    return outputs["report"]


def _run_stage(stage, P, cfg, dirs, outputs, common, reporter) -> dict | None:
    from .train import common as C
    from .train.common import read_metrics

    prog = reporter.progress()
    if stage == "tokenizer":
        from .data.corpus import embedded_corpus
        from .tokenizer import train_tokenizer

        t = P["tokenizer"]
        tok = train_tokenizer(embedded_corpus(t["docs"], seed=cfg.seed), vocab_size=t["vocab_size"],
                              digit_group=t.get("digit_group", 3))
        tok.save(dirs["tokenizer"])
        return {"notes": f"vocab {tok.vocab_size}"}
    if stage == "pretrain":
        from .train.pretrain import PretrainConfig, pretrain

        kw = dict(P["pretrain"], out_dir=str(dirs["pretrain"]), tokenizer=str(dirs["tokenizer"]), fp8=cfg.fp8, **common)
        pretrain(PretrainConfig(**kw), prog)
        notes = _tps(read_metrics(dirs["pretrain"]))
        if cfg.fp8:  # the same run without FP8, for the loss-gap measurement
            ref_dir = dirs["pretrain"].parent / "pretrain_no_fp8"
            pretrain(PretrainConfig(**{**kw, "out_dir": str(ref_dir), "fp8": False}), reporter.progress())
        return notes
    if stage == "dsa":
        from .train.dsa import DSAConfig, dsa

        dsa(DSAConfig(**P["dsa"], init_from=str(outputs["pretrain"]), out_dir=str(dirs["dsa"]), **common), prog)
        return _tps(read_metrics(dirs["dsa"]))
    if stage == "sft":
        from .train.sft import SFTConfig, sft

        sft_cfg = SFTConfig(**P["sft"], init_from=str(outputs["dsa"]), out_dir=str(dirs["sft"]), **common)
        sft(sft_cfg, prog)
        metrics = read_metrics(dirs["sft"])
        return {**_tps(metrics), **_sft_note(metrics, sft_cfg)}
    if stage == "grpo":
        from .train.grpo import GRPOConfig, grpo

        grpo(GRPOConfig(**P["grpo"], init_from=str(outputs["sft"]), out_dir=str(dirs["grpo"]), **common), prog)
        return _tps(read_metrics(dirs["grpo"]))
    if stage == "rejection":
        from .train.rejection import RejectionConfig, rejection_sample

        _, stats = rejection_sample(RejectionConfig(**P["rejection"], model=str(outputs["grpo"]),
                                                    out=str(outputs["rejection"]), device=cfg.device))
        return {"notes": f"kept {stats['kept']} of {stats['samples']}"}
    if stage == "distill":
        from .train.distill import DistillConfig, distill

        distill(DistillConfig(**P["distill"], teacher=str(outputs["grpo"]), out_dir=str(dirs["distill"]),
                              data=[str(outputs["rejection"])], **common), prog)
        d = json.loads((dirs["distill"] / "distill_data.json").read_text())
        note = f"{d['teacher_samples']} teacher samples" + (
            f" + {d['filler_records']} cold-start records (teacher solved too few)" if d["filler_records"] else "")
        return {**_tps(read_metrics(dirs["distill"])), "notes": note}
    if stage == "eval":
        from .train.evaluate import EvalConfig, evaluate

        dirs["eval"].mkdir(exist_ok=True)
        # every row on the same held-out problems (drawn from the test split by a seed fixed before training);
        # the base and DSA models are judged by their own stage metrics (held-out loss, indexer recall)
        models = {"SFT": outputs["sft"], "GRPO": outputs["grpo"], "distilled student": outputs["distill"]}
        results = {}
        prog.start(len(models), "eval")
        for name, path in models.items():
            f = dirs["eval"] / (name.split()[0].lower() + ".json")
            if not f.exists():
                evaluate(EvalConfig(**P["eval"], model=str(path), out=str(f), seed=cfg.seed + 1234, device=cfg.device))
            results[name] = json.loads(f.read_text())
            prog.update(1)
        prog.close()
        C.atomic_write_text(outputs["eval"], json.dumps({k: {m: v[m] for m in v if m != "config"}
                                                         for k, v in results.items()}, indent=2, ensure_ascii=False))
        return None
    if stage == "report":
        from .report import build_report

        build_report(dirs["eval"].parent, _summary(P, cfg, dirs, outputs))
        return None
    raise ValueError(f"unknown stage {stage!r}")


def _tps(records: list[dict]) -> dict:
    vals = [r["tokens_per_s"] for r in records if isinstance(r.get("tokens_per_s"), (int, float))]
    return {"tokens_per_s": sum(vals) / len(vals)} if vals else {}


def _student_params(folder: Path) -> tuple[str, int]:
    """(what the student is, its parameters): a Qwen2 model, or the teacher's architecture made dense."""
    from .config import ModelConfig
    from .model.dense import DenseConfig

    d = json.loads((folder / "config.json").read_text())
    if str(d.get("model_type", "")).startswith("deepseek"):
        return "dense student (the teacher's MLA, experts merged)", ModelConfig.from_hf_dict(d).num_parameters()
    return "dense student (Qwen2)", DenseConfig.from_hf_dict(d).num_parameters()


def _summary(P, cfg, dirs, outputs) -> dict:
    import torch

    from .config import ModelConfig
    from .train.common import read_metrics

    timings = json.loads((dirs["eval"].parent / "timings.json").read_text())
    evals = json.loads(outputs["eval"].read_text())
    teacher = ModelConfig.load(outputs["grpo"])
    student, n_student = _student_params(outputs["distill"])
    params = {"DeepSeek (V3.2 with MTP module)": {"total": teacher.num_parameters(include_mtp=True),
                                                 "active": teacher.num_parameters(active=True, include_mtp=True)},
              "DeepSeek (main model, as the V3 report counts)": {"total": teacher.num_parameters(),
                                                                 "active": teacher.num_parameters(active=True)},
              student: {"total": n_student, "active": n_student}}
    fp8 = None
    if cfg.fp8:
        ref_dir = dirs["pretrain"].parent / "pretrain_no_fp8"
        a = [r["loss"] for r in read_metrics(dirs["pretrain"]) if "loss" in r][-5:]
        b = [r["loss"] for r in read_metrics(ref_dir) if "loss" in r][-5:]
        fa, fb = sum(a) / len(a), sum(b) / len(b)
        fp8 = {"fp8_loss": fa, "ref_loss": fb, "rel_gap": (fa - fb) / fb, "reference_dir": str(ref_dir)}
    rs_stats = dirs["rejection"] / "data.stats.json"
    return {
        "preset": cfg.preset, "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
                                         f"{'cuda' if torch.cuda.is_available() else 'cpu'}",
        "total_seconds": sum(t["seconds"] for t in timings.values()),
        "params": params, "evals": evals, "eval_temperature": P["eval"].get("temperature", 0.6),
        "stages": timings, "fp8": fp8,
        "rejection": json.loads(rs_stats.read_text()) if rs_stats.exists() else None,
        "transcripts": {k: v.get("transcripts", []) for k, v in evals.items() if k in ("SFT", "GRPO")},
    }
