"""Process group and device mesh: one call at the top of a training run, a no-op in one process.

    dist = init_distributed(ep=2)          # reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK
    model = parallelize(model, dist.mesh, precision="fp32")
    tokens = shard_batch(global_tokens, dist)

The mesh follows torchtitan's layout for FSDP + expert parallelism: W ranks form a 2-D mesh
("efsdp", "ep") of shape (W / ep, ep), and its flattened 1-D view "dp" spans all W ranks.
  - every rank is data parallel: it runs its own slice of the global batch (`shard_batch`);
  - dense parameters (attention, norms, embeddings, shared experts, gates) are FSDP-sharded over "dp";
  - routed experts are split over "ep" (rank r of an ep group holds experts [r E/ep, (r+1) E/ep)) and
    FSDP-sharded over "efsdp" (the ranks that hold the same experts).
Single process: `Dist.mesh` is None and nothing is wrapped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: DeviceMesh | None = None  # None: one process, nothing sharded

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs and writes the consolidated HF folder."""
        return self.rank == 0

    @property
    def ep(self) -> int:
        return self.mesh["ep"].size() if self.mesh is not None and "ep" in self.mesh.mesh_dim_names else 1

    @property
    def dp_group(self):
        """Process group over every data-parallel rank (all of them); None in one process."""
        return None if self.mesh is None else dp_mesh(self.mesh).get_group()


def build_mesh(world_size: int, ep: int = 1, device_type: str = "cpu", pp: int = 1) -> DeviceMesh:
    """The ("efsdp", "ep") mesh with its flattened "dp" view (ep = 1: a plain 1-D "dp" mesh).

    pp > 1 (used by the plan simulation only; no pipeline schedule is implemented) prepends a "pp" dimension:
    each pipeline stage is its own ("efsdp", "ep") mesh of world_size / pp ranks."""
    if pp < 1 or world_size % pp:
        raise ValueError(f"pp must be >= 1 and divide the world size {world_size}, got {pp}")
    per_stage = world_size // pp
    if ep < 1 or per_stage % ep:
        raise ValueError(f"ep must be >= 1 and divide the {per_stage} ranks of a pipeline stage, got {ep}")
    shape, names = (per_stage // ep, ep), ("efsdp", "ep")
    if pp > 1:
        shape, names = (pp, *shape), ("pp", *names)
    if ep == 1 and pp == 1:
        return init_device_mesh(device_type, (world_size,), mesh_dim_names=("dp",))
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=names)
    dp_mesh(mesh)  # create the flattened view now, on every rank together
    return mesh


def dp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The 1-D "dp" mesh over every rank of a stage: the dense parameters' FSDP mesh (cached by torch)."""
    if mesh.mesh_dim_names == ("dp",):
        return mesh
    return mesh["efsdp", "ep"]._flatten("dp")


def init_distributed(ep: int = 1, backend: str | None = None) -> Dist:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK) and build the mesh.

    Without WORLD_SIZE (or with WORLD_SIZE=1) this returns a one-process Dist and touches nothing, so a
    plain `python -m nanoseek pretrain` is exactly what it was. backend: nccl on CUDA, gloo otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        if ep != 1:
            raise ValueError(f"expert parallelism needs several processes (torchrun); ep={ep} with one process")
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"))
    return Dist(rank, world, local_rank, device, build_mesh(world, ep, device.type))


def shard_batch(batch: torch.Tensor, dist: Dist) -> torch.Tensor:
    """This rank's rows of a global batch (B, ...): rows [r B/W, (r+1) B/W).

    Every rank builds the same global batch from the same seed and data position and keeps its slice, so
    the data order is deterministic, independent of the world size, and resumes from the one-process
    data state (PackedDataset.state_dict is identical on every rank)."""
    if dist.world_size == 1:
        return batch
    B = batch.shape[0]
    if B % dist.world_size:
        raise ValueError(f"global batch size {B} must be divisible by the world size {dist.world_size}")
    n = B // dist.world_size
    return batch[dist.rank * n:(dist.rank + 1) * n]


def all_reduce_mean(value: torch.Tensor | float, dist: Dist) -> float:
    """Mean of a scalar over every rank (for logging the global loss); the value itself in one process."""
    t = torch.as_tensor(value, dtype=torch.float64).detach().clone().cpu()
    if dist.world_size > 1:
        t = t.to(dist.device)
        torch_dist.all_reduce(t, group=dist.dp_group)
        t = t / dist.world_size
    return float(t)


def destroy() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
