"""One training loop for every stage: pretrain, dsa, sft and grpo (distill runs sft).

A stage supplies what is its own: the model, the optimizer, a batch source, and
`train_step(step, optimizer) -> metrics`, one optimizer step (forward, backward, clip, step; GRPO: its
num_iterations steps over one rollout). `Trainer` owns what every stage shares (torchtitan's
`Trainer.train` / `train_step` split, with checkpointing as its own component, `Checkpointer`):

  - resume: the newest intact checkpoint in out_dir/checkpoints gives the step, optimizer, RNG and the
    stage's own state (its data position, ...); the metrics log is cut back to that step;
  - the learning-rate hook `lr_at(step, elapsed_s)` (GRPO's cosine follows the clock as well as the steps);
  - a record in metrics.jsonl (+ TensorBoard) at step 1, every log_every steps, at evaluations and at the
    last step, with tokens/s (and MFU on a known GPU) from the step's `num_tokens`; evaluation every
    eval_every steps and at the last; the progress bar;
  - a checkpoint every save_every steps, at the last and at stop_after, keeping keep_checkpoints of them;
  - stop_after: checkpoint and return that checkpoint (a later call resumes); time_limit_s: the step that
    spends the budget is the last one (evaluated, checkpointed, published), as if `steps` had been set to it;
    `stop_when(record)`: a stage's target (SFT's target_eval_loss): the evaluation that meets it makes its step
    the last, and the checkpoint says so, so a later call publishes that step instead of training on;
  - publishing the last checkpoint as out_dir/model.

    run = Trainer("sft", cfg, progress)           # device, seed, the checkpoint to resume from
    ...                                           # the stage builds its data, model and optimizer
    run.restore(opt, load_state=stream.load_state_dict)
    return run.fit(train_step, total_steps, model, tokenizer, lr_at=..., evaluate=..., state=...)

Distributed (`torchrun --nproc_per_node N -m nanoseek <stage>`): `dist` is the run's process context (rank,
world_size, is_main). Without torchrun's WORLD_SIZE it is one process and nothing below happens. Under torchrun the
Trainer joins the process group (`nanoseek.parallel.init_distributed(ep=cfg.ep)`), `prepare` parallelizes the model
(FSDP2, expert parallelism) before the optimizer is built, the checkpoints are `ShardedCheckpointer`'s (sharded
model + optimizer state through torch.distributed.checkpoint, and rank 0's consolidated HF folder beside it, so a
checkpoint resumes at any world size, one process included), the scalar metrics of a recorded step are averaged
over the ranks (a stage reports per rank what averages to the global value), and only rank 0 writes the log, the
progress bar and the folders. The stage shards each global batch (`nanoseek.parallel.shard_batch`).
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .. import precision as P
from . import common as C


@dataclass
class SingleProcess:
    """The distributed context of a one-process run (nanoseek.parallel.Dist has the same fields)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SCALES_OUT = ("pretrain", "dsa", "sft", "grpo", "distill")  # the stages that run under torchrun (several processes)


def init_dist(stage: str, cfg):
    """The run's process context: SingleProcess without torchrun (WORLD_SIZE unset or 1) and ep == 1; else join the
    process group torchrun describes and build the mesh (nanoseek.parallel.init_distributed)."""
    ep = getattr(cfg, "ep", 1)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and ep == 1:
        return SingleProcess()
    if stage not in SCALES_OUT:
        raise ValueError(f"{stage} runs in one process only (no torchrun); {', '.join(SCALES_OUT)} scale out")
    from ..parallel import init_distributed

    return init_distributed(ep=ep)


# the bookkeeping fields every stage config has, checked the same way (append to a config's validate_fields list)
LOOP_FIELD_CHECKS = [
    ("keep_checkpoints", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "must be an integer >= 1"),
    ("stop_after", lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v > 0),
     "must be None or a positive integer"),
    ("time_limit_s", lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0),
     "must be None or > 0"),
]


@dataclass
class Phases:
    """Optimizers by phase (DSA: an indexer-only warm-up, then sparse training of everything): phase_of(step) names
    the phase of the step about to run, build(phase) makes its optimizer when that phase begins. A checkpoint
    stores its phase (as "stage") and its optimizer state is restored only into the same phase."""

    phase_of: Callable[[int], str]
    build: Callable[[str], torch.optim.Optimizer]


class Checkpointer:
    """Stage checkpoints under `root`: HF folder + trainer_state.pt, written atomically, `keep` of them kept;
    the published model folder. The seam for sharded checkpoints: a distributed run swaps in its own."""

    def __init__(self, root: Path, keep: int = 2, dist=None):
        self.root, self.keep, self.dist = Path(root), keep, dist or SingleProcess()

    def latest(self) -> Path | None:
        return C.latest_checkpoint(self.root)

    def load(self, ckpt: Path) -> dict:
        return C.load_trainer_state(ckpt)

    def resume(self, ckpt: Path, state: dict, model, optimizer) -> None:
        """Load the optimizer state (optimizer None: a new phase, nothing to load) and the RNG. The model's weights
        came from the checkpoint's HF folder already. A checkpoint a distributed run wrote keeps its optimizer state
        sharded in dcp/: it is read back at one process too (torch.distributed.checkpoint reshards on load)."""
        if optimizer is not None:
            if "optimizer" in state:
                optimizer.load_state_dict(state["optimizer"])
            else:
                if not isinstance(optimizer, torch.optim.Optimizer) or model is None:
                    raise ValueError(f"{ckpt} was written by a distributed run: resuming it in one process needs "
                                     "precision fp32 (a plain optimizer)")
                from ..parallel import load_sharded

                load_sharded(ckpt / "dcp", model, optimizer)
        C.set_rng_state(state["rng"])

    def save(self, step: int, model, tokenizer, state: dict, optimizer=None, extras: dict | None = None) -> None:
        if not self.dist.is_main:
            return
        with P.full_precision(optimizer):  # the HF folder is written from the fp32 masters (bf16 precision)
            C.save_stage_checkpoint(self.root, step, model, tokenizer, state, keep=self.keep, extras=extras)

    def publish(self, dst: Path) -> Path:
        """Copy the last checkpoint's HF folder (no trainer state) to `dst`, the stage's output."""
        final = self.latest()
        return C.copy_model_folder(final, dst) if self.dist.is_main else dst


class ShardedCheckpointer(Checkpointer):
    """The checkpoints of a distributed run, in the same step_N folders: rank 0's consolidated HF folder (the bytes
    a one-process run writes for the same weights) + tokenizer + trainer_state.pt (step, data position, ...; no
    optimizer), and dcp/: every rank's shards of the model and optimizer state (torch.distributed.checkpoint) with
    each rank's RNG state. Collective: every rank calls save / resume / publish."""

    def resume(self, ckpt: Path, state: dict, model, optimizer) -> None:
        from ..parallel import load_full_optimizer_state, load_sharded

        rng = state["rng"]
        if (ckpt / "dcp").exists():  # any world size wrote it: DCP reshards
            extra = load_sharded(ckpt / "dcp", model, optimizer)
            rng = extra["rng"] if extra else rng
        elif optimizer is not None:  # a one-process checkpoint: its full, positional optimizer state
            load_full_optimizer_state(model, optimizer, state["optimizer"])
        C.set_rng_state(rng)

    def save(self, step: int, model, tokenizer, state: dict, optimizer=None, extras: dict | None = None) -> None:
        import torch.distributed as torch_dist

        from ..parallel import consolidated_model, save_sharded

        sharded = self.root / f".dcp_step_{step:07d}"
        save_sharded(sharded, model, optimizer, extra={"rng": C.rng_state()})
        plain = consolidated_model(model)  # rank 0: the full model, None elsewhere
        if self.dist.is_main:
            state = {k: v for k, v in state.items() if k != "optimizer"}
            C.save_stage_checkpoint(self.root, step, plain, tokenizer, state, keep=self.keep, extras=extras,
                                    before_commit=lambda tmp: os.replace(sharded, tmp / "dcp"))
        torch_dist.barrier()

    def publish(self, dst: Path) -> Path:
        import torch.distributed as torch_dist

        out = super().publish(dst)
        torch_dist.barrier()
        return out


class Trainer:
    """The loop every stage runs; see the module docstring. Built first: it picks the device, seeds every RNG
    and finds the checkpoint to resume from (`resume_from`), so the stage can load its model from there."""

    def __init__(self, stage: str, cfg, progress: C.Progress | None = None, dist=None,
                 checkpointer: Checkpointer | None = None):
        self.stage, self.cfg = stage, cfg
        self.dist = dist if dist is not None else init_dist(stage, cfg)
        self.progress = (progress or C.Progress()) if self.dist.is_main else C.Progress()
        self.out = Path(cfg.out_dir)
        self.device = self.dist.device if self.distributed else C.pick_device(cfg.device)
        C.seed_everything(cfg.seed)
        ckpt_cls = ShardedCheckpointer if self.distributed else Checkpointer
        self.checkpoints = checkpointer or ckpt_cls(self.out / "checkpoints", getattr(cfg, "keep_checkpoints", 2),
                                                    self.dist)
        self.ckpt_root = self.checkpoints.root
        self.resume_from = self.checkpoints.latest() if cfg.resume else None
        self.step, self.logger = 0, None
        self.ended = False  # an evaluation met the stage's target (stop_when): the run ends at self.step
        self.optimizer, self.phase, self._phases = None, None, None

    @property
    def resumed(self) -> bool:
        return self.resume_from is not None

    @property
    def distributed(self) -> bool:
        return self.dist.world_size > 1

    def prepare(self, model, make_optimizer: Callable, precision: str):
        """(model, optimizer, ctx) for a freshly loaded fp32 model. One process: precision.prepare (bf16 masters,
        FP8, autocast). Distributed: the model parallelized (FSDP2 over every rank, experts over ep; precision fp32
        or bf16 as FSDP's mixed-precision policy), then the optimizer over its sharded parameters."""
        if not self.distributed:
            opt, ctx = P.prepare(model, make_optimizer, precision, self.device)
            return model, opt, ctx
        model = self.parallelize(model, precision)
        return model, make_optimizer([(n, p) for n, p in model.named_parameters() if p.requires_grad]), nullcontext()

    def parallelize(self, model, precision: str = "fp32"):
        """Distributed: the fp32 model sharded in place (FSDP2 over every rank, experts over ep; precision fp32 or
        bf16, FSDP's mixed-precision policy). One process: the model as it is. For a stage that builds its own
        optimizers afterwards (DSA's phases); `prepare` does both."""
        if not self.distributed:
            return model
        from ..parallel import parallelize

        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision {precision!r} does not run distributed yet: use fp32 or bf16 under torchrun")
        return parallelize(model, self.dist.mesh, precision=precision)

    def restore(self, optimizer: torch.optim.Optimizer | Phases, load_state: Callable[[dict], None] | None = None,
                config_json: str | None = None, model=None) -> int:
        """Resume from `resume_from`: load_state(state) first (the stage's own state: data position, checks), then
        the optimizer, RNG and step. Then open the metrics log (cut back to the step when resuming) and, on a fresh
        run, write `config_json` to out_dir/<stage>_config.json. Returns the step to start from. model: the
        (parallelized) model, which a sharded checkpoint's optimizer state is loaded through."""
        if isinstance(optimizer, Phases):
            self._phases = optimizer
        else:
            self.optimizer = optimizer
        state = self.checkpoints.load(self.resume_from) if self.resumed else None
        if state is not None:
            if load_state is not None:
                load_state(state)
            self.step, self.ended = state["step"], bool(state.get("ended", False))
        self._enter(self.step)
        if state is not None:
            # a phase's optimizer state never seeds another phase's
            self.checkpoints.resume(self.resume_from, state, model,
                                    self.optimizer if state.get("stage") == self.phase else None)
            if self.dist.is_main:
                print(f"resuming {self.stage} from step {self.step} in {self.out}", file=sys.stderr, flush=True)
        if self.dist.is_main:
            self.logger = C.MetricsLogger(self.out, tensorboard=self.cfg.tensorboard,
                                          resume_step=self.step if self.resumed else None)
            if not self.resumed and config_json is not None:
                C.atomic_write_text(self.out / f"{self.stage}_config.json", config_json)
        return self.step

    def _save(self, step: int, model, tokenizer, own_state: dict, extras: dict | None) -> None:
        st = {"step": step, "optimizer": self.optimizer.state_dict(), "rng": C.rng_state(), **own_state}
        if self.ended:
            st["ended"] = True
        if self.phase is not None:
            st["stage"] = self.phase  # the phase whose optimizer state this is
        self.checkpoints.save(step, model, tokenizer, st, self.optimizer, extras)

    def log(self, step: int, **metrics) -> None:
        if self.logger is not None:
            self.logger.log(step, **metrics)

    def _enter(self, step: int) -> None:
        if self._phases is None:
            return
        phase = self._phases.phase_of(step)
        if phase != self.phase:
            self.optimizer, self.phase = self._phases.build(phase), phase

    def fit(self, train_step: Callable[[int, torch.optim.Optimizer], dict], steps: int, model, tokenizer, *,
            lr_at: Callable[[int, float], float] | None = None, evaluate: Callable[[], dict] | None = None,
            eval_also_at: tuple[int, ...] = (), state: Callable[[], dict] | None = None,
            extras: Callable[[int], dict | None] | None = None, progress_keys: dict[str, str] | None = None,
            flops_per_token: float | None = None, record_first_step: bool = True,
            stop_when: Callable[[dict], bool] | None = None) -> Path:
        """Run steps [self.step, steps). train_step(step, optimizer) -> metrics; a metric may be a zero-argument
        callable, evaluated only when the step is recorded (a dict result is merged in), and `num_tokens` feeds
        tokens_per_s. state() -> the stage's own trainer state; extras(step) -> {subfolder: model} saved with a
        checkpoint; progress_keys: {metric: label} shown on the progress bar; record_first_step: also record step 1
        (the starting loss; GRPO's starting point is its step-0 evaluation instead); stop_when(record) -> True: the
        evaluated step whose record (its metrics and the evaluation's) meets the stage's target is the last one.
        Returns out_dir/model, or the latest checkpoint when stop_after ended the call first."""
        cfg = self.cfg
        eval_every, time_limit = getattr(cfg, "eval_every", 0), getattr(cfg, "time_limit_s", None)
        step = self.step
        if self.ended:  # resumed from the checkpoint of a step that met the target: nothing left to train
            steps = step
        self.progress.start(steps, self.stage, initial=step)
        t_start = time.perf_counter()
        throughput = Throughput(flops_per_token, self.device)
        # every rank must agree on the clock (the lr may follow it; the step that spends the budget is the last)
        clock = lambda: self._rank0(time.perf_counter() - t_start) if time_limit is not None else \
            time.perf_counter() - t_start
        while step < steps:
            self._enter(step)
            lr = None if lr_at is None else lr_at(step, clock())
            if lr is not None:
                C.set_lr(self.optimizer, lr)
            metrics = train_step(step, self.optimizer)
            step += 1
            throughput.add(metrics.pop("num_tokens", 0))
            if time_limit is not None and clock() >= time_limit and step < steps:
                steps = step  # the budget is spent: this is the last step, as if `steps` had been set to it
                metrics["stopped_by_time_limit"] = 1
            last = step == steps
            stopping = cfg.stop_after is not None and step >= cfg.stop_after and not last
            logging = step % cfg.log_every == 0 or (step == 1 and record_first_step) or last
            evaluating = evaluate is not None and eval_every > 0 and (step % eval_every == 0 or last
                                                                      or step in eval_also_at)
            if logging or evaluating:
                metrics = {**({} if lr is None else {"lr": lr}), **self._mean_over_ranks(resolve(metrics)),
                           **(throughput.read() if logging else {}), **(evaluate() if evaluating else {})}
                if evaluating and stop_when is not None and self._rank0(float(stop_when(metrics))):
                    metrics["reached_target"] = 1  # rank 0's verdict on every rank: they end at the same step
                    steps, last, stopping, self.ended = step, True, False, True
                self.log(step, **metrics)
            self.progress.update(1, **{label: metrics[k] for k, label in (progress_keys or {}).items() if k in metrics})
            if step % cfg.save_every == 0 or last or stopping:
                self._save(step, model, tokenizer, state() if state is not None else {},
                           extras(step) if extras is not None else None)
            if stopping:
                break
        self.step = step
        self.progress.close()
        if self.logger is not None:
            self.logger.close()
        if step < steps:
            return self.checkpoints.latest()  # stopped early: no final model yet
        return self.checkpoints.publish(self.out / "model")


    def _rank0(self, value: float) -> float:
        """Rank 0's value on every rank (the value itself in one process)."""
        if not self.distributed:
            return value
        import torch.distributed as torch_dist

        t = torch.tensor([value], dtype=torch.float64, device=self.dist.device)
        torch_dist.broadcast(t, src=0)
        return float(t)

    def _mean_over_ranks(self, metrics: dict) -> dict:
        """A recorded step's scalar metrics averaged over the ranks, in one all_reduce (one process: unchanged).
        A stage reports per rank what averages to the global value (its share of a loss times world_size); a
        value every rank computes alike (lr, grad_norm, eval) stays what it is."""
        if not self.distributed:
            return metrics
        import torch.distributed as torch_dist

        keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=self.dist.device)
        torch_dist.all_reduce(t, group=self.dist.dp_group)
        return {**metrics, **dict(zip(keys, (t / self.dist.world_size).tolist()))}


def resolve(metrics: dict) -> dict:
    """A step's metrics for the record: a callable value is evaluated now, and a dict it returns is merged in."""
    out = {}
    for k, v in metrics.items():
        v = v() if callable(v) else v
        out.update(v if isinstance(v, dict) else {k: v})
    return out


class Throughput:
    """tokens/s over the steps since the last read, and MFU when the peak FLOP/s of the device is known."""

    def __init__(self, flops_per_token: float | None, device: torch.device):
        self.flops_per_token = flops_per_token
        self.peak = C.peak_flops(device) if flops_per_token else None
        self.tokens, self.since = 0, time.perf_counter()

    def add(self, n: int) -> None:
        self.tokens += n

    def read(self) -> dict:
        if not self.tokens:
            return {}
        now = time.perf_counter()
        tps = self.tokens / max(now - self.since, 1e-9)
        self.tokens, self.since = 0, now
        return {"tokens_per_s": tps, **({"mfu": tps * self.flops_per_token / self.peak} if self.peak else {})}
