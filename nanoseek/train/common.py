"""What every training stage shares: device choice, optimiser and schedule, atomic resumable
checkpoints, metric logging (JSONL + TensorBoard), and a progress hook.

A stage checkpoint is a Hugging Face model folder (config.json, safetensors, tokenizer files) plus
`trainer_state.pt` (optimizer, step, RNG and data position). It is written to a temporary folder
and renamed into place, so a killed run never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.autograd.graph import increment_version

# ---------------------------------------------------------------------------------------------- device


def pick_device(device: str | None = None) -> torch.device:
    """cuda, then mps, then cpu, unless the caller names one."""
    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    # tensors and plain numbers only, so trainer_state.pt loads with torch.load(weights_only=True)
    s = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
         "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    name, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# ---------------------------------------------------------------------------------------------- optimiser


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95),
                   eps: float = 1e-8, params=None) -> torch.optim.AdamW:
    """AdamW; matrices decay, vectors (norms, biases) do not."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad] if params is None else params
    decay = [p for n, p in named if p.dim() >= 2]
    no_decay = [p for n, p in named if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = _fusable([p for _, p in named])
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps, fused=fused)
    if fused:
        # torch's fused kernel writes the parameters without bumping their version counters: bump them, or
        # version-keyed caches of the weights (the engine's packed FastDecoder copy) go stale and GRPO would
        # sample from the initial policy forever
        opt.register_step_post_hook(lambda o, args, kwargs: increment_version(
            [p for g in o.param_groups for p in g["params"]]))
    return opt


def _fusable(params: list[torch.Tensor]) -> bool:
    """torch's fused AdamW (one kernel over all tensors: 3.3x faster a step than the per-tensor loop on the GRPO
    bench model, within 1e-7 of it after 50 steps) takes plain float tensors on one device; sharded DTensor
    parameters (FSDP2) keep the default implementation."""
    dtensor = sys.modules.get("torch.distributed.tensor")  # not imported: nothing is sharded
    return bool(params) and len({(p.device.type, p.dtype) for p in params}) == 1 and \
        params[0].dtype in (torch.float32, torch.bfloat16, torch.float16) and \
        params[0].device.type in ("cpu", "cuda") and \
        not (dtensor is not None and any(isinstance(p, dtensor.DTensor) for p in params))


def lr_at(step: int, total: int, base_lr: float, warmup: int, schedule: str = "cosine", min_lr_ratio: float = 0.1,
          decay_frac: float = 0.2) -> float:
    """Linear warmup, then cosine to min_lr_ratio*base_lr, or WSD (warmup-stable-decay: flat, then a
    linear decay over the last decay_frac of training, as in MiniCPM / DeepSeek-V3's staged LR)."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    min_lr = base_lr * min_lr_ratio
    if schedule == "constant":
        return base_lr
    if schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_start = int(total * (1 - decay_frac))
        if step < decay_start:
            return base_lr
        progress = min(1.0, (step - decay_start) / max(1, total - decay_start))
        return base_lr + (min_lr - base_lr) * progress
    raise ValueError(f"schedule must be 'cosine', 'wsd' or 'constant', got {schedule!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


# ---------------------------------------------------------------------------------------------- checkpoints


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_stage_checkpoint(ckpt_root: Path, step: int, model, tokenizer=None, state: dict | None = None,
                          keep: int = 2, extras: dict | None = None,
                          before_commit: Callable[[Path], None] | None = None) -> Path:
    """Write checkpoints/step_NNNNNNN atomically (temp folder + rename) and point `latest` at it.
    extras: {subfolder: model} saved alongside (e.g. GRPO's reference model); before_commit(tmp) adds anything
    else to the temp folder before the rename (a distributed run's sharded state)."""
    ckpt_root = Path(ckpt_root)
    bad = non_finite_tensors(model.state_dict().items())
    if bad:  # never let a NaN model become `latest` or push a good checkpoint out of the rotation
        stage = ckpt_root.parent.name
        raise NonFiniteError(f"{stage}: non-finite weights at step {step} ({', '.join(bad[:5])}"
                             f"{' ...' if len(bad) > 5 else ''}); checkpoint not written", stage, step,
                             [f"weight {b}" for b in bad])
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:07d}"
    tmp = ckpt_root / f".tmp_step_{step:07d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save(tmp)
    for name, m in (extras or {}).items():
        m.save_pretrained(tmp / name)
    if state is not None:
        torch.save(state, tmp / "trainer_state.pt")
    if before_commit is not None:
        before_commit(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(ckpt_root / "latest", final.name + "\n")
    # rotation: only checkpoints older than this one; a newer one (left by a run resumed from an earlier
    # checkpoint) is overwritten when its step comes, so the last good one is never the one deleted
    olds = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir() and _step_of(p) < step)
    for p in olds[: max(0, len(olds) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def _step_of(p: Path) -> int:
    try:
        return int(p.name.removeprefix("step_"))
    except ValueError:
        return -1


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why a stage checkpoint cannot be resumed from (None when it can): trainer_state.pt must load, every
    config.json must parse, and every safetensors file must hold all the bytes its header promises."""
    from ..checkpoint import CheckpointError, _check_header, _read_index

    ckpt = Path(ckpt)
    state_file = ckpt / "trainer_state.pt"
    if not state_file.is_file():
        return f"{state_file} is missing"
    try:  # mmap: the zip directory and tensor records are checked without reading the optimizer state into memory
        state = torch.load(state_file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises RuntimeError / EOFError / UnpicklingError for a torn file
        return f"{state_file} cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if not isinstance(state, dict) or "step" not in state:
        return f"{state_file} holds no 'step'"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (ckpt / name).exists():
            try:
                json.loads((ckpt / name).read_text(encoding="utf-8"))
            except ValueError as e:
                return f"{ckpt / name} is not valid JSON ({e})"
    folders = [ckpt] + [p.parent for p in ckpt.glob("*/config.json")]  # extras such as GRPO's ref/
    for folder in folders:
        try:
            try:
                cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
                return f"{folder / 'config.json'} is not valid JSON ({e})"
            if not isinstance(cfg, dict):
                return f"{folder / 'config.json'} is not a JSON object"
            if (folder / "model.safetensors.index.json").exists():
                files = sorted(set(_read_index(folder / "model.safetensors.index.json").values()))
            else:
                files = sorted(folder.glob("*.safetensors"))
            if not files:
                return f"{folder} holds no safetensors weights"
            for f in files:
                _check_header(f)
        except CheckpointError as e:
            return str(e)
        except (OSError, ValueError) as e:
            return f"{folder}: {e}"
    return None


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest checkpoint that loads: the one `latest` names, else the newest step_* folder. A damaged one
    (a torn trainer_state.pt or weights file) is passed over with a warning for the previous intact one."""
    import warnings

    ckpt_root = Path(ckpt_root)
    candidates = sorted((p for p in ckpt_root.glob("step_*") if p.is_dir()), key=_step_of, reverse=True)
    pointer = ckpt_root / "latest"
    if pointer.exists():
        try:
            named = ckpt_root / pointer.read_text().strip()
        except (OSError, UnicodeDecodeError):
            named = None
        if named is not None and named.name.startswith("step_") and named in candidates:
            candidates.remove(named)
            candidates.insert(0, named)
    damaged = []
    for p in candidates:
        if not (p / "trainer_state.pt").exists():
            continue
        why = checkpoint_problem(p)
        if why is None:
            if damaged:
                warnings.warn(f"{ckpt_root}: passing over damaged checkpoint(s) ({'; '.join(damaged)}); "
                              f"using the previous intact one, {p.name}", stacklevel=2)
            return p
        damaged.append(why)
    if damaged:
        warnings.warn(f"{ckpt_root}: no intact checkpoint ({'; '.join(damaged)}); starting from scratch",
                      stacklevel=2)
    return None


def load_trainer_state(ckpt: Path) -> dict:
    # weights_only: the restricted unpickler (tensors, dicts, numbers, strings), never arbitrary objects
    return torch.load(Path(ckpt) / "trainer_state.pt", map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------- faults


class NonFiniteError(ValueError):
    """A training stage met a non-finite loss, gradient norm or weight: it stops before stepping or saving it."""

    def __init__(self, message: str, stage: str, step: int | None, what: list[str]):
        super().__init__(message)
        self.stage, self.step, self.what = stage, step, what


def _as_float(v) -> float:
    if isinstance(v, torch.Tensor):
        return float(v.detach().float().reshape(-1)[0]) if v.numel() == 1 else float(v.detach().float().sum())
    return float(v)


def check_finite(stage: str, step: int | None, ckpt_root: Path | None = None, **values) -> None:
    """Call after the gradient norm is computed, before the optimizer step: raise NonFiniteError naming the
    stage, the step (the one about to be taken) and every value (loss=..., grad_norm=...) that is NaN or
    infinite, so nothing non-finite is stepped or checkpointed. None values are skipped."""
    bad = []
    for name, v in values.items():
        if v is None:
            continue
        x = _as_float(v)
        if not math.isfinite(x):
            bad.append(f"{name}={x}")
    if not bad:
        return
    at = f"step {step}" if step is not None else "an optimizer step"
    msg = f"{stage}: non-finite {', '.join(bad)} at {at}; stopped before the optimizer step, nothing was saved"
    last = latest_checkpoint(ckpt_root) if ckpt_root is not None else None
    msg += f"; the last checkpoint, {last}, is kept" if last is not None else ""
    msg += " (try a lower learning rate or more warmup)"
    raise NonFiniteError(msg, stage, step, bad)


def non_finite_tensors(tensors) -> list[str]:
    """Names of the floating-point tensors in (name, tensor) pairs that hold a NaN or an infinity."""
    names, flags = [], []
    for name, t in tensors:
        if not t.is_floating_point() or t.numel() == 0:
            continue
        if t.element_size() == 1:  # float8: isfinite is not defined for it everywhere
            t = t.float()
        names.append(name)
        flags.append(torch.isfinite(t).all())
    if not flags or bool(torch.stack([f.to(flags[0].device) for f in flags]).all()):  # one device sync
        return []
    return [n for n, ok in zip(names, flags) if not bool(ok)]


def _folder_non_finite(folder: Path) -> list[str]:
    from safetensors import safe_open

    bad = []
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt", device="cpu") as h:
            bad += non_finite_tensors((k, h.get_tensor(k)) for k in h.keys())
    return bad


def copy_model_folder(src: Path, dst: Path) -> Path:
    """Publish a checkpoint's HF folder (without trainer state) as a stage output, atomically; a folder
    holding a NaN or infinite weight is never published (NonFiniteError)."""
    bad = _folder_non_finite(src)
    if bad:
        stage = Path(dst).parent.name
        raise NonFiniteError(f"{stage}: {src} holds non-finite weights ({', '.join(bad[:5])}"
                             f"{' ...' if len(bad) > 5 else ''}); not published to {dst}", stage, _step_of(Path(src)),
                             [f"weight {b}" for b in bad])
    dst = Path(dst)
    tmp = dst.with_name("." + dst.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    # ref, sampler: GRPO's reference model and async rollouts' sampler copy; dcp: sharded state
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("trainer_state.pt", "ref", "sampler", "dcp"))
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)
    return dst


# ---------------------------------------------------------------------------------------------- logging


class MetricsLogger:
    """Appends one JSON object per log call to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, out_dir: Path, tensorboard: bool = True, resume_step: int | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            # drop records past the checkpoint we resume from, so the log matches an uninterrupted run
            keep = [json.dumps(rec) for rec in read_metrics(self.path) if rec.get("step", -1) <= resume_step]
            atomic_write_text(self.path, "".join(k + "\n" for k in keep))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.tb = None
        if tensorboard:
            from .tbwriter import TBWriter

            self.tb = TBWriter(self.out_dir / "tb")

    def log(self, step: int, **metrics: Any) -> None:
        rec = {"step": step, "time": round(time.time(), 3)}
        for k, v in metrics.items():
            if isinstance(v, torch.Tensor):
                v = v.item() if v.numel() == 1 else v.tolist()
            rec[k] = v
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in rec.items():
                if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, float(v), step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.exists():
        return []
    return read_jsonl_records(path)


def read_jsonl_records(path: Path) -> list[dict]:
    """One JSON object per line. A torn LAST line (a run killed mid-write) is skipped with a warning; a bad
    line anywhere else, or bytes that are not UTF-8, raise ValueError naming file:line."""
    import warnings

    path = Path(path)
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line.decode("utf-8"))
            if not isinstance(rec, dict):
                raise ValueError(f"a JSON {type(rec).__name__}, not an object")
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            if i == last:
                warnings.warn(f"{path}:{i + 1}: skipping a torn last line ({e})", stacklevel=2)
                continue
            raise ValueError(f"{path}:{i + 1}: not a JSON object ({e})") from None
        out.append(rec)
    return out


# ---------------------------------------------------------------------------------------------- progress


class Progress:
    """Progress hook: stages call start/update/close; the CLI passes a tqdm-backed one. Default: silent."""

    def start(self, total: int, desc: str, initial: int = 0) -> None:
        pass

    def update(self, n: int = 1, **metrics: Any) -> None:
        pass

    def close(self) -> None:
        pass


class TqdmProgress(Progress):
    """A tqdm bar on a terminal. When stderr is not a terminal (a log file, a pipe), a plain line every
    NANOSEEK_PROGRESS_INTERVAL seconds (default 30) and at the end instead: a bar's carriage returns would
    make one unreadable line. Either way a resumed stage says so: "resuming stage S at step N"."""

    def __init__(self, position: int | None = None, leave: bool = True):
        self.bar, self.position, self.leave = None, position, leave
        self.plain = None  # plain-line state when stderr is not a terminal

    def start(self, total: int, desc: str, initial: int = 0) -> None:
        import sys

        tty = getattr(sys.stderr, "isatty", lambda: False)()
        if initial > 0:
            print(f"resuming stage {desc} at step {initial}", file=sys.stderr, flush=True)
        if not tty:
            try:
                every = float(os.environ.get("NANOSEEK_PROGRESS_INTERVAL", "30"))
            except ValueError:
                every = 30.0
            now = time.perf_counter()
            self.plain = dict(total=total, desc=desc, n=initial, initial=initial, t0=now, last=now, every=every,
                              metrics={}, printed=None)
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, initial=initial, position=self.position, leave=self.leave,
                        dynamic_ncols=True)

    def _line(self) -> None:
        import sys

        p = self.plain
        elapsed = time.perf_counter() - p["t0"]
        done = p["n"] - p["initial"]
        rate = done / elapsed if elapsed > 0 else 0.0
        pct = f" ({100 * p['n'] / p['total']:.0f}%)" if p["total"] else ""
        left = f", {(p['total'] - p['n']) / rate:.0f} s left" if rate > 0 and p["total"] else ""
        metrics = "".join(f" {k}={v}" for k, v in p["metrics"].items())
        print(f"{p['desc']}: {p['n']}/{p['total']}{pct}, {elapsed:.0f} s elapsed{left}{metrics}", file=sys.stderr,
              flush=True)
        p["printed"] = p["n"]

    def update(self, n: int = 1, **metrics: Any) -> None:
        fmt = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in metrics.items()}
        if self.plain is not None:
            p = self.plain
            p["n"] += n
            p["metrics"].update(fmt)
            now = time.perf_counter()
            if now - p["last"] >= p["every"]:
                p["last"] = now
                self._line()
            return
        if self.bar is None:
            return
        if fmt:
            self.bar.set_postfix(fmt, refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        if self.plain is not None:
            if self.plain["printed"] != self.plain["n"]:
                self._line()  # the final count
            self.plain = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def flops_per_token(model) -> float:
    """Training FLOPs per token, 6 x active parameters (forward 2N + backward 4N), attention excluded."""
    cfg = model.config
    return 6.0 * cfg.num_parameters(active=True, include_embeddings=False)


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of the GPU, for MFU; None when unknown (CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40", 181e12), ("4090", 165e12)):
        if key in name:
            return flops
    return None


def validate_fields(obj, checks: list[tuple[str, Callable[[Any], bool], str]]) -> None:
    """checks: (field, predicate, requirement). Raises ValueError naming the first field that fails."""
    for name, ok, why in checks:
        v = getattr(obj, name)
        if not ok(v):
            raise ValueError(f"{type(obj).__name__}.{name} {why}, got {v!r}")
