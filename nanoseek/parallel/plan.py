"""The 671B plan by simulation: the real `parallelize` applied to the `deepseek-v3` preset built on the meta
device, over a mesh of hundreds or thousands of ranks that one process stands for (torch's fake process group:
collectives are no-ops, shapes and shardings are real). What a rank holds is then read off its DTensor shards.

    rep = simulate(ModelConfig.from_preset("deepseek-v3"), world=2048, ep=64, pp=16, micro_batch=1, seq_len=4096)
    print(format_table([rep]))

Per rank (rank 0, the largest share under FSDP's ceil-division; for pp > 1 the heaviest pipeline stage):
  params     the FSDP-sharded parameters, fp32 (the V3 report keeps fp32 master weights)
  grads      their fp32 gradients (V3: gradients kept in fp32 for accumulation)
  adam fp32  AdamW first and second moments in fp32 (torch's default)
  adam bf16  the same in bf16 (V3 report sec. 3.3.3: "BF16 ... to track the first and second moments")
  gathered   one all-gathered FSDP unit in bf16 (the largest block: dense weights whole, this rank's experts)
  acts       activations saved for backward, estimated: bf16, no recomputation, flash attention (no T x T
             scores), balanced routing; pp > 1: the first stage of 1F1B holds pp micro-batches in flight;
  recompute  the same under full activation checkpointing (each block's bf16 input kept, one block live)
  total      params + grads + bf16 moments + gathered + recompute
PP is simulated as a mesh dimension and a contiguous split of the layers (embedding on the first stage;
final norm, head and MTP modules on the last), not run: nanoseek has no pipeline schedule yet.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn
from torch.distributed.tensor import DTensor

from ..config import ModelConfig

GB = 1e9


@dataclass
class PlanReport:
    name: str
    world: int
    pp: int
    ep: int
    efsdp: int  # ranks holding the same experts (FSDP over them)
    stage: int  # the pipeline stage reported (the heaviest)
    layers: int  # decoder blocks on that stage (MTP modules included)
    micro_batch: int
    seq_len: int
    params: int  # parameters this rank holds (its shards)
    param_bytes: int  # fp32
    grad_bytes: int  # fp32
    adam_fp32_bytes: int
    adam_bf16_bytes: int
    gathered_bytes: int  # largest all-gathered unit, bf16
    activation_bytes: int  # no recomputation
    recompute_bytes: int  # full activation checkpointing: block inputs kept, one block's activations live
    stage_params: list[int] = field(default_factory=list)  # this rank's parameter count in each stage

    def total(self, bf16_moments: bool = True) -> int:
        """States + one gathered unit + activations under full recomputation."""
        adam = self.adam_bf16_bytes if bf16_moments else self.adam_fp32_bytes
        return self.param_bytes + self.grad_bytes + adam + self.gathered_bytes + self.recompute_bytes


def stage_modules(model: nn.Module, pp: int) -> list[list[nn.Module]]:
    """Contiguous pipeline split: main layers as evenly as possible, the embedding with stage 0, the final
    norm, head and MTP modules with the last stage (DeepSeek-V3 puts MTP on the last stage too)."""
    cfg = model.config
    main = list(model.model.layers[: cfg.num_hidden_layers])
    parts = [list(a) for a in np.array_split(np.arange(len(main)), pp)]
    stages = [[main[i] for i in idx] for idx in parts]
    stages[0].insert(0, model.model.embed_tokens)
    stages[-1] += list(model.model.layers[cfg.num_hidden_layers:]) + [model.model.norm, model.lm_head]
    return stages


def _local_numel(p: torch.Tensor) -> int:
    return (p.to_local() if isinstance(p, DTensor) else p).numel()


def _gathered_numel(module: nn.Module) -> int:
    """Elements of `module` once all-gathered over FSDP: DTensors over "ep" stay split over it."""
    n = 0
    for p in module.parameters():
        if isinstance(p, DTensor) and "ep" in (p.device_mesh.mesh_dim_names or ()):
            n += p.numel() // p.device_mesh["ep"].size()
        else:
            n += p.numel()
    return n


def activation_bytes_per_token(cfg: ModelConfig, layer_idx: int, bytes_per: int = 2) -> int:
    """Activations one token leaves for backward in one decoder block (estimate; see the module docstring)."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    qk, dv, dr = cfg.qk_head_dim, cfg.v_head_dim, cfg.qk_rope_head_dim
    q = (2 * cfg.q_lora_rank if cfg.q_lora_rank else 0) + H * qk  # q latent (pre/post norm), q heads
    kv = (cfg.kv_lora_rank + dr) + cfg.kv_lora_rank + H * qk + H * dv  # kv latent, normed latent, k, v
    attn = D + q + kv + 2 * H * dv  # normed input, ..., attention output, o_proj input
    if cfg.is_moe_layer(layer_idx):
        I, K = cfg.moe_intermediate_size, cfg.num_experts_per_tok
        mlp = D + 2 * cfg.n_routed_experts + K * (D + 3 * I + D)  # input, fp32 scores, per routed slot
        mlp += cfg.n_shared_experts * 3 * I
    else:
        mlp = D + 3 * cfg.intermediate_size
    return (attn + mlp + 2 * D) * bytes_per  # + the two residual stream inputs


def simulate(cfg: ModelConfig, world: int, ep: int = 1, pp: int = 1, micro_batch: int = 1, seq_len: int = 4096,
             name: str = "") -> PlanReport:
    """Build `cfg` on the meta device, parallelize it over a fake `world`-rank mesh, report rank 0's share."""
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    from ..model import DeepSeekModel
    from .fsdp import parallelize
    from .mesh import build_mesh

    if torch_dist.is_initialized():
        raise RuntimeError("simulate() needs a process without a process group (it installs a fake one)")
    torch_dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        mesh = build_mesh(world, ep, "cpu", pp)
        with torch.device("meta"):
            model = DeepSeekModel(cfg)
        parallelize(model, mesh, precision="bf16")
        stages = stage_modules(model, pp)
        counts, gathered = [], []
        for mods in stages:
            params = {id(p): p for m in mods for p in m.parameters()}
            counts.append(sum(_local_numel(p) for p in params.values()))
            blocks = [m for m in mods if hasattr(m, "layer_idx")]  # one FSDP unit each
            rest = [m for m in mods if not hasattr(m, "layer_idx")]  # embedding, norm, head: the root unit
            gathered.append(max([_gathered_numel(m) for m in blocks] + [sum(_gathered_numel(m) for m in rest)]))
        s = int(np.argmax(counts))
        layer_ids = [m.layer_idx for m in stages[s] if hasattr(m, "layer_idx")]
        per_token = sum(activation_bytes_per_token(cfg, i) for i in layer_ids)
        in_flight = pp if pp > 1 else 1  # 1F1B: stage 0 holds pp micro-batches' activations at its peak
        n = counts[s]
        tokens = micro_batch * seq_len * in_flight
        recompute = len(layer_ids) * 2 * cfg.hidden_size * tokens + max(
            (activation_bytes_per_token(cfg, i) for i in layer_ids), default=0) * micro_batch * seq_len
        per_stage = world // pp
        return PlanReport(
            name=name or f"world {world}, pp {pp}, ep {ep}", world=world, pp=pp, ep=ep, efsdp=per_stage // ep,
            stage=s, layers=len(layer_ids), micro_batch=micro_batch, seq_len=seq_len, params=n,
            param_bytes=4 * n, grad_bytes=4 * n, adam_fp32_bytes=8 * n, adam_bf16_bytes=4 * n,
            gathered_bytes=2 * gathered[s], activation_bytes=per_token * tokens, recompute_bytes=recompute,
            stage_params=counts)
    finally:
        torch_dist.destroy_process_group()


def format_table(reports: list[PlanReport]) -> str:
    """A Markdown table of per-rank gigabytes (1 GB = 1e9 bytes)."""
    head = ("| plan | ranks | pp x dp (ep x efsdp) | params/rank | params fp32 | grads fp32 | Adam fp32 | Adam bf16 "
            "| gathered bf16 | acts (b x T) | acts, recompute | total |")
    rows = [head, "|" + "---|" * 12]
    for r in reports:
        rows.append(
            f"| {r.name} | {r.world} | {r.pp} x {r.world // r.pp} ({r.ep} x {r.efsdp}) | {r.params / 1e9:.2f} B "
            f"| {r.param_bytes / GB:.1f} | {r.grad_bytes / GB:.1f} | {r.adam_fp32_bytes / GB:.1f} "
            f"| {r.adam_bf16_bytes / GB:.1f} | {r.gathered_bytes / GB:.2f} "
            f"| {r.activation_bytes / GB:.1f} ({r.micro_batch} x {r.seq_len}) | {r.recompute_bytes / GB:.1f} "
            f"| {r.total() / GB:.1f} GB |")
    return "\n".join(rows)


# the plans `nanoseek plan` prints by default: DeepSeek's own (V3 report sec. 3.2: 2048 H800s, PP 16, EP 64 over
# 8 nodes, ZeRO-1 DP; FSDP stands in for ZeRO-1 here) and two H100 clusters (EP inside a node's 8 GPUs on NVLink)
STANDARD_PLANS = [
    dict(name="DeepSeek-V3: 2048 H800, PP 16, EP 64", world=2048, pp=16, ep=64),
    dict(name="64 H100 (8 nodes), EP 8", world=64, pp=1, ep=8),
    dict(name="256 H100 (32 nodes), EP 64", world=256, pp=1, ep=64),
]
