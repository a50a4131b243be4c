"""Training precision, applied to a model from the outside (no precision flags inside the model code).

    opt, ctx = prepare(model, make_opt, "bf16", device)   # make_opt([(name, param), ...]) -> optimizer

Modes (`resolve` maps the config fields to one of them):

- ``fp32``: fp32 weights, fp32 compute, plain optimizer. The CPU default.
- ``bf16``: the model's weights are bf16 BETWEEN steps, so every GEMM runs in bf16 with no per-op casts
  (autocast re-casts every weight on every forward; on CPUs that cost ate the gain). The optimizer side
  holds fp32 master weights and fp32 AdamW state (`MasterWeights`): each bf16 gradient is added into its
  master's fp32 gradient as soon as backward produces it (so gradient accumulation sums in fp32), clipping
  and AdamW run on the masters, and the bf16 weights are then overwritten with the masters rounded to bf16.
  fp32 stays where the DeepSeek-V3 recipe keeps it: RMSNorm statistics (layers.RMSNorm upcasts), the router
  (Gate computes in fp32 and its weight stays an fp32 parameter here; the selection bias is an fp32
  buffer), rotary frequencies, and the loss (logits are upcast before cross-entropy by the trainers);
  `fp32_head=True` keeps the output head fp32 as well (fp32 logits).
  Checkpoints are written from the masters (`full_precision`), so the saved HF folder is fp32 and a
  resume is bit-exact.
- ``fp8``: the V3 FP8 GEMM path (nanoseek.fp8.convert_to_fp8_training) over fp32 master weights; bf16
  autocast around it on GPUs, as before.
- ``amp``: fp32 weights under bf16 autocast (the GPU default before this module; kept for GPUs).

bf16 pays only where the CPU multiplies bf16 natively (AMX / AVX512-BF16; `cpu_has_fast_bf16`); on an
AVX2-only CPU torch's bf16 GEMMs are several times SLOWER than fp32 (docs/benchmarks.md).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager, nullcontext
from typing import Callable, Iterable

import torch
from torch import nn

PRECISIONS = ("auto", "fp32", "bf16", "fp8", "amp")
_DTYPE_ALIAS = {"float32": "fp32", "bfloat16": "bf16"}  # the deprecated `dtype` field


def resolve(precision: str = "auto", dtype: str = "auto", fp8: bool = False,
            device: torch.device | str = "cpu") -> str:
    """One of fp32 | bf16 | fp8 | amp from the config fields. `precision` wins; `dtype` (auto | float32 |
    bfloat16) is its deprecated alias; `fp8=True` is the old switch for precision='fp8'.
    auto: fp32 on CPU (today's numbers), bf16 autocast (amp) elsewhere (today's GPU behaviour)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if fp8 or precision == "fp8":
        return "fp8"
    if precision != "auto":
        return precision
    if dtype in _DTYPE_ALIAS:
        return _DTYPE_ALIAS[dtype]
    return "fp32" if torch.device(device).type == "cpu" else "amp"


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has bf16 matrix instructions (AMX-BF16 or AVX512-BF16), where bf16 GEMMs beat fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


def fp32_parameter_ids(model: nn.Module, fp32_head: bool = False) -> set[int]:
    """Parameters that stay fp32 in a bf16 model: the MoE router weights (V3 keeps the gate in fp32; Gate
    computes in fp32 from x.float() and weight.float(), so a bf16 weight would only add a rounding), and
    with fp32_head the output head's weight."""
    from .model.moe import Gate

    keep = {id(m.weight) for m in model.modules() if isinstance(m, Gate)}
    head = getattr(model, "lm_head", None)
    if fp32_head and isinstance(head, nn.Linear):
        keep.add(id(head.weight))
    return keep


def _fp32_head_hooks(model: nn.Module, dtype: torch.dtype) -> list:
    """The output head in fp32: its input is upcast, so the logits come out fp32 (unrounded: bf16 logits of
    magnitude ~10 are only 1/16 apart). A tied embedding (same fp32 weight) hands its rows on in `dtype`."""
    head = model.lm_head
    hooks = [head.register_forward_pre_hook(lambda mod, args: (args[0].float(), *args[1:]))]
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for m in model.modules():
        if isinstance(m, nn.Embedding) and m.weight is head.weight:
            emb = m
    if emb is not None and emb.weight is head.weight:
        hooks.append(emb.register_forward_hook(lambda mod, args, out: out.to(dtype)))
    return hooks


class MasterWeights:
    """An optimizer over fp32 master copies of a model whose weights are kept in `dtype` (bf16).

    make_optimizer([(name, fp32 param), ...]) builds the inner optimizer (AdamW: its state is fp32).
    Parameters in `fp32_parameter_ids(model, fp32_head)` stay fp32 in the model and are optimised directly.
    fp32_head: the output head too (fp32 logits). Measured in docs/benchmarks.md, it did not narrow the bf16
    loss gap beyond seed noise; on bf16-capable CPUs it turns the largest GEMM of a small model's step back
    to fp32, so it is off by default.
    Behaves like the inner optimizer for the trainers: param_groups (set_lr), step, zero_grad,
    state_dict / load_state_dict (the masters are saved with the state: a resume restores them exactly)."""

    def __init__(self, model: nn.Module, make_optimizer: Callable, dtype: torch.dtype = torch.bfloat16,
                 fp32_head: bool = False):
        self.model, self.dtype = model, dtype
        keep = fp32_parameter_ids(model, fp32_head)
        self.hooks = _fp32_head_hooks(model, dtype) if fp32_head and isinstance(getattr(model, "lm_head", None),
                                                                               nn.Linear) else []
        self.pairs: list[tuple[nn.Parameter, nn.Parameter]] = []  # (low-precision model param, fp32 master)
        named, seen = [], set()
        for name, p in model.named_parameters():
            if id(p) in seen or not p.is_floating_point():
                continue
            seen.add(id(p))
            if id(p) in keep:
                p.data = p.data.float()
                if p.requires_grad:
                    named.append((name, p))
                continue
            master = nn.Parameter(p.detach().float().clone(), requires_grad=p.requires_grad)
            p.data = p.data.to(dtype)
            self.pairs.append((p, master))
            if p.requires_grad:
                named.append((name, master))
                self.hooks.append(p.register_post_accumulate_grad_hook(self._accumulate_into(master)))
        self.optimizer = make_optimizer(named)

    @staticmethod
    def _accumulate_into(master: nn.Parameter):
        def hook(p: torch.Tensor) -> None:  # runs when backward has accumulated p.grad (bf16)
            if master.grad is None:
                master.grad = p.grad.float()
            else:
                master.grad.add_(p.grad)
            p.grad = None  # the bf16 gradient is consumed: accumulation continues in fp32

        return hook

    # -------------------------------------------------------------- the optimizer interface
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def params(self) -> list[torch.Tensor]:
        """The parameters the optimizer steps (fp32 masters and fp32-kept model params): clip these."""
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        out = self.optimizer.step(closure)
        self.sync_model()
        return out

    @torch.no_grad()
    def sync_model(self) -> None:
        """Overwrite the low-precision model weights with the masters (round to nearest even)."""
        for p, m in self.pairs:
            p.copy_(m)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
        for p, _ in self.pairs:
            p.grad = None

    def state_dict(self) -> dict:
        """The inner optimizer's state dict plus `master_weights` (a plain optimizer ignores that key, so
        a bf16 checkpoint's state also loads into an fp32 run)."""
        sd = self.optimizer.state_dict()
        sd["master_weights"] = [m.detach() for _, m in self.pairs]
        return sd

    @torch.no_grad()
    def load_state_dict(self, sd: dict) -> None:
        sd = dict(sd)
        masters = sd.pop("master_weights", None)
        if masters is not None:  # else (an fp32 run's state): the masters are the fp32 weights loaded
            if len(masters) != len(self.pairs):
                raise ValueError(f"optimizer state holds {len(masters)} master weights, the model {len(self.pairs)}")
            for (_, m), saved in zip(self.pairs, masters):
                m.copy_(saved)
        self.optimizer.load_state_dict(sd)
        self.sync_model()

    @torch.no_grad()
    def release(self) -> None:
        """Give the model its fp32 weights back (the masters' values) and stop accumulating into the masters: before
        a new optimizer over the same model (DSA's next phase builds its own MasterWeights from them)."""
        for h in self.hooks:
            h.remove()
        self.hooks = []
        for p, m in self.pairs:
            p.data = m.data
        self.pairs = []

    @contextmanager
    def full_precision(self):
        """The model holds the fp32 masters inside the block (for saving checkpoints), its bf16 weights after."""
        low = [p.data for p, _ in self.pairs]
        try:
            for p, m in self.pairs:
                p.data = m.data
            yield
        finally:
            for (p, _), d in zip(self.pairs, low):
                p.data = d


# ---------------------------------------------------------------------------------------------- the seam


def prepare(model: nn.Module, make_optimizer: Callable, precision: str, device: torch.device | str = "cpu",
            fp32_head: bool = False):
    """Apply `precision` (resolved: fp32 | bf16 | fp8 | amp) to a freshly loaded fp32 model.

    make_optimizer([(name, param), ...]) -> an optimizer (e.g. common.make_optimizer with params=...).
    Returns (optimizer, ctx): ctx is the context each forward runs under (autocast for amp, and for fp8
    on GPUs; a no-op otherwise)."""
    device = torch.device(device)
    if precision not in ("fp32", "bf16", "fp8", "amp"):
        raise ValueError(f"prepare() needs a resolved precision (fp32, bf16, fp8, amp), got {precision!r}")
    if precision == "fp8":
        from .fp8 import convert_to_fp8_training

        convert_to_fp8_training(model)
    if precision == "bf16":
        opt = MasterWeights(model, make_optimizer, torch.bfloat16, fp32_head=fp32_head)
    else:
        opt = make_optimizer([(n, p) for n, p in model.named_parameters() if p.requires_grad])
    autocast = precision == "amp" or (precision == "fp8" and device.type != "cpu")
    ctx = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if autocast else nullcontext()
    return opt, ctx


def clip_grad_norm_(model: nn.Module, optimizer, max_norm: float) -> torch.Tensor:
    """Gradient clipping over what the optimizer steps: the fp32 master gradients under MasterWeights, the sharded
    gradients of a parallelized model (the global norm over every rank's shards, nanoseek.parallel)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # never imported: nothing is sharded
    if fsdp is not None and isinstance(model, fsdp.FSDPModule):
        from .parallel import clip_grad_norm_ as sharded_clip

        return sharded_clip([p for p in model.parameters() if p.requires_grad], max_norm)
    params: Iterable = optimizer.params() if isinstance(optimizer, MasterWeights) else model.parameters()
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def full_precision(optimizer):
    """Context in which the model holds fp32 weights (the masters under MasterWeights): save checkpoints here."""
    return optimizer.full_precision() if isinstance(optimizer, MasterWeights) else nullcontext()
