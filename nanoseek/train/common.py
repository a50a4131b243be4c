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
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

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


def autocast_ctx(device: torch.device, dtype: str = "auto"):
    """bf16 autocast on GPU, plain fp32 on CPU (bf16 matmuls are slow on most CPUs)."""
    if dtype == "float32" or (dtype == "auto" and device.type == "cpu"):
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


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
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps)


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
                          keep: int = 2, extras: dict | None = None) -> Path:
    """Write checkpoints/step_NNNNNNN atomically (temp folder + rename) and point `latest` at it.
    extras: {subfolder: model} saved alongside (e.g. GRPO's reference model)."""
    ckpt_root = Path(ckpt_root)
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
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(ckpt_root / "latest", final.name + "\n")
    olds = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir() and p != final)
    for p in olds[: max(0, len(olds) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    ckpt_root = Path(ckpt_root)
    pointer = ckpt_root / "latest"
    if pointer.exists():
        p = ckpt_root / pointer.read_text().strip()
        if (p / "trainer_state.pt").exists():
            return p
    found = sorted(p for p in ckpt_root.glob("step_*") if (p / "trainer_state.pt").exists())
    return found[-1] if found else None


def load_trainer_state(ckpt: Path) -> dict:
    # weights_only: the restricted unpickler (tensors, dicts, numbers, strings), never arbitrary objects
    return torch.load(Path(ckpt) / "trainer_state.pt", map_location="cpu", weights_only=True)


def copy_model_folder(src: Path, dst: Path) -> Path:
    """Publish a checkpoint's HF folder (without trainer state) as a stage output, atomically."""
    dst = Path(dst)
    tmp = dst.with_name("." + dst.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("trainer_state.pt", "ref"))
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
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", -1) <= resume_step]
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
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
    def __init__(self, position: int | None = None, leave: bool = True):
        self.bar, self.position, self.leave = None, position, leave

    def start(self, total: int, desc: str, initial: int = 0) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, initial=initial, position=self.position, leave=self.leave,
                        dynamic_ncols=True)

    def update(self, n: int = 1, **metrics: Any) -> None:
        if self.bar is None:
            return
        if metrics:
            self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in metrics.items()},
                                 refresh=False)
        self.bar.update(n)

    def close(self) -> None:
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
