"""FSDP2 (`fully_shard`) over the data-parallel mesh, expert parallelism over "ep", sharded-norm clipping.

    model = parallelize(model, dist.mesh, precision="bf16")   # in place; returns the model
    opt = make_optimizer(model, lr)                           # over the sharded (DTensor) parameters
    gnorm = clip_grad_norm_(model.parameters(), 1.0)

What each rank holds between steps (torchtitan's layout; W ranks, mesh ("efsdp", "ep")):
  - each decoder block (MTP modules included) is one FSDP unit over "dp" (all W ranks), the embedding,
    final norm and head are the root unit: 1/W of every dense parameter per rank, gathered one block at a
    time in forward and backward (reshard_after_forward);
  - with ep > 1 the routed experts of a block are their own unit over "efsdp" (the W/ep ranks holding the
    same experts), on top of the Shard(0) split over "ep": 1/W of every expert tensor per rank as well;
  - gradients are reduce-scattered and divided by W for both, so they are the gradients of the mean of the
    ranks' losses, i.e. of the global batch's loss when every rank has the same number of tokens.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from ..model.moe import MoE
from .expert import apply_expert_parallel
from .mesh import dp_mesh

PRECISIONS = ("fp32", "bf16")


def mixed_precision(precision: str) -> MixedPrecisionPolicy:
    """fp32: no casts. bf16: blocks compute in bf16 (all-gathered as bf16), gradients reduced in fp32, and the
    sharded parameters the optimizer steps stay fp32 (the V3 recipe's fp32 master weights)."""
    if precision == "fp32":
        return MixedPrecisionPolicy()
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    raise ValueError(f"precision under FSDP must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def parallelize(model: nn.Module, mesh: DeviceMesh | None, precision: str = "fp32",
                reshard_after_forward: bool = True) -> nn.Module:
    """Shard a DeepSeekModel over `mesh` (from mesh.build_mesh / init_distributed) in place.

    mesh None (one process): the model is returned untouched. Call on the fp32 model before building the
    optimizer; every rank must hold the same weights (same seed, or the same checkpoint loaded)."""
    if mesh is None:
        return model
    names = mesh.mesh_dim_names or ()
    mp = mixed_precision(precision)
    gate_mp = MixedPrecisionPolicy()  # the router stays fp32 (V3 sec. 3.3.2; precision.py does the same)
    dp = dp_mesh(mesh)
    W = dp.size()
    ep = mesh["ep"].size() if "ep" in names else 1
    if ep > 1:
        apply_expert_parallel(model, mesh["ep"])
    for layer in model.model.layers:
        if isinstance(layer.mlp, MoE):
            if ep > 1:
                efsdp = mesh["efsdp"].size()
                # fewer local experts than efsdp ranks: shard each expert's rows instead (dim 1), or most
                # ranks would hold nothing and a few hold whole experts
                local_experts = layer.mlp.experts.num_experts // ep
                place = (lambda p: Shard(1)) if local_experts < efsdp else None
                fully_shard(layer.mlp.experts, mesh=mesh["efsdp"], mp_policy=mp, shard_placement_fn=place,
                            reshard_after_forward=reshard_after_forward)
                # the local expert gradients already sum the ep group's tokens (they came through all_to_all):
                # dividing the efsdp reduce-scatter by W instead of W/ep gives the mean over all W ranks
                layer.mlp.experts.set_gradient_divide_factor(float(W))
            if precision != "fp32":
                fully_shard(layer.mlp.gate, mesh=dp, mp_policy=gate_mp, reshard_after_forward=reshard_after_forward)
        fully_shard(layer, mesh=dp, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=dp, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    return model


def is_parallel(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip by the global 2-norm of every gradient, sharded or not; returns that norm (a plain tensor).

    DTensor gradients on different meshes (dense ones on "dp", experts on ("efsdp", "ep")) cannot be
    stacked together, so the norm is taken per mesh, made whole with full_tensor() (an all-reduce of the
    partial squares), and the per-mesh norms combined: sqrt(sum_m n_m^2). One process: the plain
    torch.nn.utils computation."""
    params = [p for p in parameters if p.grad is not None]
    by_mesh: dict = defaultdict(list)
    for p in params:
        by_mesh[p.grad.device_mesh if isinstance(p.grad, DTensor) else None].append(p)
    norms = []
    for group in by_mesh.values():
        n = torch.nn.utils.get_total_norm([p.grad for p in group], 2.0)
        norms.append(n.full_tensor() if isinstance(n, DTensor) else n)
    total = torch.stack(norms).square().sum().sqrt() if len(norms) > 1 else (norms[0] if norms else torch.zeros(()))
    for group in by_mesh.values():  # torch's foreach multiply cannot mix meshes either
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def local_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes this rank holds for `tensors` (a DTensor counts its local shard only)."""
    total = 0
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total
