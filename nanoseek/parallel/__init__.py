"""torch.distributed from outside the model: mesh, FSDP2, expert parallelism, distributed checkpoints, and
the 671B plan by simulation. A trainer loop uses it as

    dist = init_distributed(ep=cfg.ep)                  # one process: Dist(mesh=None), nothing changes
    model = parallelize(model, dist.mesh, precision="fp32")
    opt = make_optimizer(model, lr)
    tokens = shard_batch(global_tokens, dist)           # this rank's rows of the global batch
    ...; loss.backward(); clip_grad_norm_(model.parameters(), 1.0); opt.step()
    update_expert_bias(model, global_loads(loads, dist), gamma)   # identical biases on every rank
    save_sharded(folder, model, opt, extra=...) / load_sharded(folder, model, opt)
    save_consolidated(model, hf_folder)                 # rank 0 writes the HF folder
"""

from .checkpoint import (consolidated_model, copy_full_weights, full_state_dict, load_full_optimizer_state, load_sharded,
                         save_consolidated, save_sharded)
from .expert import ExpertParallelExperts, apply_expert_parallel
from .fsdp import clip_grad_norm_, is_parallel, local_bytes, mixed_precision, parallelize
from .loads import global_loads
from .mesh import Dist, all_reduce_mean, build_mesh, destroy, init_distributed, shard_batch

__all__ = [
    "Dist", "init_distributed", "build_mesh", "destroy", "shard_batch", "all_reduce_mean",
    "parallelize", "mixed_precision", "clip_grad_norm_", "is_parallel", "local_bytes",
    "ExpertParallelExperts", "apply_expert_parallel", "global_loads",
    "save_sharded", "load_sharded", "save_consolidated", "consolidated_model", "full_state_dict",
    "load_full_optimizer_state", "copy_full_weights",
]
