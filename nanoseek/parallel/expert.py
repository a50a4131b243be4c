"""Expert parallelism (DeepSeek-V3 sec. 3.2): routed experts split across the ranks of the "ep" mesh
dimension, tokens dispatched to their experts' ranks and combined back with all_to_all.

Applied from outside the model: `apply_expert_parallel(model, ep_mesh)` swaps every `MoE.experts` module
for an `ExpertParallelExperts` that holds the same two parameters, `gate_up_proj` (E, 2I, D) and
`down_proj` (E, D, I), as DTensors sharded on dim 0 over "ep" (state-dict names and global shapes are
unchanged, so distributed checkpoints and the HF export see the full expert tensors). The gate, the
shared experts and the one-process `Experts.forward` are untouched.

Shape legend: N = local tokens, K = experts per token, E = routed experts, El = E / ep local experts,
D = hidden, I = expert width, R = rows received from the ep group.
"""

from __future__ import annotations

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from ..model.moe import Experts, MoE, grouped_linear


class ExpertParallelExperts(nn.Module):
    """The routed experts of one MoE layer, El = E / ep of them on this rank.

    forward(x (N, D), ids (N, K), w (N, K)) -> (N, D), the same contract as `Experts.forward`:
      1. sort this rank's N*K token-slots by expert (so by destination rank: expert e lives on rank e // El);
      2. all_to_all the per-expert counts, then the rows (one host read of the counts: all_to_all needs
         its split sizes on the host, as in torchtitan and DeepSeek's DeepEP);
      3. regroup the received rows by local expert, run the local experts (grouped GEMM), undo the regroup;
      4. all_to_all the outputs back, weight them and sum each token's K slots (as `Experts.forward`).
    Every step has an autograd rule, so backward runs the reverse all_to_alls."""

    def __init__(self, experts: Experts, ep_mesh: DeviceMesh):
        super().__init__()
        E = experts.gate_up_proj.shape[0]
        self.ep = ep_mesh.size()
        if E % self.ep:
            raise ValueError(f"n_routed_experts={E} must be divisible by the ep size {self.ep}")
        self.num_experts, self.ep_mesh = E, ep_mesh
        self.fp8 = experts.fp8
        # Shard(0): rank r of the ep group keeps experts [r El, (r+1) El); no communication (every rank holds
        # the full tensors already), and on the meta device this only records shapes
        self.gate_up_proj = nn.Parameter(self._shard(experts.gate_up_proj.data, ep_mesh))
        self.down_proj = nn.Parameter(self._shard(experts.down_proj.data, ep_mesh))

    @staticmethod
    def _shard(full: torch.Tensor, ep_mesh: DeviceMesh) -> DTensor:
        local = full.chunk(ep_mesh.size(), dim=0)[ep_mesh.get_local_rank()].clone()
        return DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False, shape=full.shape, stride=full.stride())

    @staticmethod
    def _local(p: torch.Tensor) -> torch.Tensor:
        """This rank's experts as a plain tensor (FSDP has already gathered the efsdp shards)."""
        return p.to_local() if isinstance(p, DTensor) else p

    def forward(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        N, K = ids.shape
        E, ep = self.num_experts, self.ep
        El = E // ep
        group = self.ep_mesh.get_group()
        flat = ids.reshape(-1)  # (N*K,)
        order = flat.argsort(stable=True)  # token-slots sorted by expert, hence by destination rank
        token = order // K
        counts = torch.bincount(flat, minlength=E)  # (E,) rows this rank sends to each expert
        recv_counts = torch.empty_like(counts)  # (ep*El,): [src rank i, local expert e] rows received
        torch_dist.all_to_all_single(recv_counts, counts, group=group)
        host = torch.cat([counts, recv_counts]).tolist()  # the one host sync of the layer
        send_e, recv_e = host[:E], host[E:]
        in_splits = [sum(send_e[r * El:(r + 1) * El]) for r in range(ep)]
        out_splits = [sum(recv_e[i * El:(i + 1) * El]) for i in range(ep)]
        recv = all_to_all_single_autograd(x[token], out_splits, in_splits, group)  # (R, D), by (src, expert)
        # regroup by local expert: rows of expert e from every source, sources in rank order
        expert_of_row = torch.arange(El, device=x.device).repeat(ep).repeat_interleave(
            recv_counts, output_size=recv.shape[0])
        perm = expert_of_row.argsort(stable=True)
        local_counts = [sum(recv_e[i * El + e] for i in range(ep)) for e in range(El)]
        gate_up, down = self._local(self.gate_up_proj), self._local(self.down_proj)
        h = grouped_linear(recv[perm], gate_up, local_counts, self.fp8)  # (R, 2I)
        g, u = h.chunk(2, dim=-1)
        h = grouped_linear(F.silu(g) * u, down, local_counts, self.fp8)  # (R, D)
        if not sum(local_counts):
            # no row for any local expert (every token of the ep group chose other ranks' experts, as group-limited
            # routing can): keep recv and the weights in the graph, or this rank would skip both all_to_all
            # backwards and the expert gradients that its peers run, and the collectives would deadlock
            h = h + (recv.sum() + gate_up.sum() + down.sum()) * 0
        h = torch.empty_like(h).index_copy(0, perm, h)  # back to (src, expert) order
        h = all_to_all_single_autograd(h, in_splits, out_splits, group)  # (N*K, D) in `order`
        h = h * w.reshape(-1)[order].unsqueeze(-1).to(h.dtype)
        return torch.zeros_like(x, dtype=h.dtype).index_add_(0, token, h)


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> list[ExpertParallelExperts]:
    """Swap every MoE layer's experts for their expert-parallel form over `ep_mesh` (in place).

    Call before FSDP (parallelize does). Every rank must hold the same full expert weights going in (same
    seed or the same checkpoint): each keeps its own slice."""
    swapped = []
    for m in model.modules():
        if isinstance(m, MoE) and isinstance(m.experts, Experts):
            m.experts = ExpertParallelExperts(m.experts, ep_mesh)
            swapped.append(m.experts)
    return swapped
