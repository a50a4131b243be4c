"""Global expert loads: what the aux-loss-free bias update must see so every rank keeps identical biases.

Each rank routes only its own tokens, so its `RouterOutput.load` counts a 1/W share of the batch. The bias
update b_i += gamma * sign(mean load - load_i) (V3 sec. 2.1.2) is a function of the load, so ranks that updated
from their local loads would drift apart. `global_loads` sums the per-layer loads over every data-parallel rank
(one all_reduce of the stacked (layers, E) tensor): the loads the one-process run would count on the same
global batch, identical on every rank, hence identical biases after every update.

The sequence-wise balance loss (V3 eq. 17-20) needs no reduction: its f_i and P_i are per sequence, and a
sequence lives on one rank; its mean over the global batch is what the gradient averaging already computes.
"""

from __future__ import annotations

import torch
import torch.distributed as torch_dist


def global_loads(loads: list[torch.Tensor], group=None) -> list[torch.Tensor]:
    """Sum each layer's (E,) load over the data-parallel ranks. group: a Dist (its dp group), a ProcessGroup,
    or None for the default (world) group; one process (or a one-process Dist): returned as they are."""
    if not loads or not torch_dist.is_initialized():
        return loads
    if hasattr(group, "dp_group"):  # a mesh.Dist
        if group.world_size == 1:
            return loads
        group = group.dp_group
    stacked = torch.stack([l.detach().float() for l in loads])  # (layers, E)
    torch_dist.all_reduce(stacked, group=group)
    return list(stacked.unbind(0))
