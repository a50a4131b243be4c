"""Distributed checkpoints (torch.distributed.checkpoint): each rank writes and reads only its shards, and a
checkpoint saved at W ranks loads at any other world size, one process included (DCP reshards on load).

    save_sharded(folder, model, optimizer, extra={"step": 10, "data": ds.state_dict()})
    extra = load_sharded(folder, model, optimizer)          # in place; returns `extra`
    save_consolidated(model, hf_folder)                     # rank 0 writes the full HF folder

The model and optimizer states go through get_state_dict / set_state_dict, so the keys are the model's own
parameter names (FSDP and the expert-parallel swap keep them), and optimizer states are keyed by those names
rather than by position. `extra` (step, data position, RNG, anything torch.save takes) is written by each
rank as extra/rank{r}.pt; a reader at another world size falls back to rank 0's.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict, set_state_dict)


def _rank() -> int:
    return torch_dist.get_rank() if torch_dist.is_initialized() else 0


def _barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier()


def save_sharded(folder, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 extra: dict | None = None) -> Path:
    """Write model (+ optimizer) shards and `extra` into `folder`, atomically: everything goes to folder.tmp
    first, and rank 0 renames it once every rank has finished. Collective: every rank calls it."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if _rank() == 0 and tmp.exists():
        shutil.rmtree(tmp)  # a crashed earlier attempt
    _barrier()
    if optimizer is not None:
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optimizer": osd}
    else:
        state = {"model": get_model_state_dict(model)}
    dcp.save(state, checkpoint_id=str(tmp))
    if extra is not None:
        (tmp / "extra").mkdir(parents=True, exist_ok=True)
        torch.save(extra, tmp / "extra" / f"rank{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    _barrier()
    return folder


def load_sharded(folder, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict | None:
    """Load a save_sharded folder into an already parallelized (or plain, one-process) model and its
    optimizer, in place, whatever world size wrote it. Returns this rank's `extra` (rank 0's if this rank
    did not exist when it was written), or None. Collective: every rank calls it."""
    folder = Path(folder)
    if not (folder / ".metadata").exists():
        raise FileNotFoundError(f"no distributed checkpoint (.metadata) in {folder}")
    if optimizer is not None:
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optimizer": osd}
    else:
        state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=str(folder))
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    else:
        set_model_state_dict(model, state["model"])
    extra_dir = folder / "extra"
    for name in (f"rank{_rank()}.pt", "rank0.pt"):
        if (extra_dir / name).exists():
            return torch.load(extra_dir / name, weights_only=False)
    return None


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state on CPU, on rank 0 (an empty dict elsewhere). Collective."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts)


def consolidated_model(model: nn.Module) -> nn.Module | None:
    """A plain (unsharded, CPU) copy of a parallelized model with the full weights, on rank 0; None elsewhere.
    Collective (every rank gathers). Its class is the model's own (FSDP2 subclasses it on the fly)."""
    from torch.distributed.fsdp import FSDPModule

    state = full_state_dict(model)
    if _rank() != 0:
        return None
    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    with torch.device("meta"):
        plain = cls(model.config)
    plain.to_empty(device="cpu")
    if hasattr(plain, "tie_weights"):
        plain.tie_weights()  # to_empty unties a tied lm_head (the dense student's)
    plain.load_state_dict(state)
    if hasattr(plain, "reset_rope"):
        plain.reset_rope()  # non-persistent buffers: not in the state dict, rebuilt
    return plain


def save_consolidated(model: nn.Module, folder, **save_kw) -> Path | None:
    """Rank 0 writes the Hugging Face folder of the full model, byte-identical to what a one-process
    `model.save_pretrained(folder)` writes for the same weights. Collective (every rank gathers)."""
    plain = consolidated_model(model)
    path = plain.save_pretrained(folder, **save_kw) if plain is not None else None
    _barrier()
    return path


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a one-process optimizer state_dict (keyed by position, full tensors) into the optimizer of the same
    model parallelized: positions are mapped to parameter names (make_optimizer's order is the same at every
    world size; FSDP2 and the expert-parallel swap keep names and order) and each rank keeps its shards.
    Collective. For resuming a one-process checkpoint at several ranks."""
    names = {id(p): n for n, p in model.named_parameters()}
    flat = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    full = {"state": {flat[int(i)]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [flat[int(i)] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, full, options=StateDictOptions(full_state_dict=True))


def copy_full_weights(model: nn.Module, dst: nn.Module) -> None:
    """Every rank's plain (unsharded) `dst` gets the full weights of the parallelized `model` (an all-gather):
    GRPO's sampler, which each rank decodes its own rollouts with, without collectives. Collective."""
    dst.load_state_dict(get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)))
