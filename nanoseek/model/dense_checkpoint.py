"""Qwen2-layout checkpoints for the dense student: config.json + safetensors (single or sharded with
model.safetensors.index.json), readable by transformers' `AutoModelForCausalLM` and written by it.

The parameter names already are the HF tensor names, so the key map is the identity, except that a tied
`lm_head.weight` is not stored (transformers ties it on load). Reading goes through nanoseek.checkpoint's
_Reader (index / single / loose shards, truncation checks); loading is strict by default, with one
CheckpointError naming every missing, unexpected and mis-shaped tensor. The model is built on the meta
device and each tensor is materialised once, directly from the file.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import CheckpointError, _load_config, _Reader, check_tensors, write_generation_config, write_shards
from .dense import DenseConfig, DenseModel

# tensors some published checkpoints carry that carry no information here
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def dense_hf_state_dict(model: DenseModel) -> dict[str, torch.Tensor]:
    """HF tensor name -> tensor: the state_dict, without lm_head.weight when it is tied to the embedding."""
    sd = model.state_dict()
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def save_dense(model: DenseModel, path, max_shard_bytes: int = 5 * 1024 ** 3, dtype: torch.dtype | None = None,
               tokenizer=None) -> Path:
    """Write config.json and safetensors shards (plus the index when sharded) atomically into `path`.
    dtype: cast floating tensors (and config torch_dtype) to it; default: as held in memory."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    tensors = dense_hf_state_dict(model)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        config = config.replace(torch_dtype=str(dtype).removeprefix("torch."))
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    write_shards(folder, tensors, max_shard_bytes)
    config.save(folder)
    write_generation_config(folder, config.bos_token_id, config.eos_token_id)
    if tokenizer is not None:
        tokenizer.save(folder)
    return folder


def load_dense(path, dtype: torch.dtype | None = None, device="cpu", strict: bool = True) -> DenseModel:
    """Build a DenseModel from a Qwen2-layout folder (config.json + safetensors).

    dtype: compute dtype (default: config torch_dtype). strict: raise one CheckpointError listing every missing /
    unexpected / mis-shaped tensor; with strict=False those problems are kept in `model.load_problems` and the
    tensors not loaded keep their fresh initialisation."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    config = _load_config(DenseConfig, folder)
    if dtype is None:
        dtype = getattr(torch, config.torch_dtype)
    reader = _Reader(folder)
    with torch.device("meta"):
        model = DenseModel(config)
    expected = {k: tuple(v.shape) for k, v in dense_hf_state_dict(model).items()}
    present = set(reader.keys())
    tied_head = config.tie_word_embeddings and "lm_head.weight" in present  # some tied checkpoints keep a copy
    ignore = {k for k in present - set(expected)
              if k.endswith(_IGNORED_SUFFIXES) or (tied_head and k == "lm_head.weight")}
    problems, _ = check_tensors(reader, expected, present, ignore)
    if problems and strict:
        raise CheckpointError(f"{folder}: checkpoint does not match config.json:\n  " + "\n  ".join(problems))

    model.to_empty(device=device)
    model.to(dtype)
    model.tie_weights()  # to_empty gives the embedding and a tied lm_head separate storage
    if problems:
        model.init_weights()  # whatever is not loaded below keeps a defined value
    model.reset_rope()
    with torch.no_grad():
        for name, target in dense_hf_state_dict(model).items():
            if name in present:
                target.copy_(reader.get(name).to(dtype))
        if not strict:
            model.load_problems = problems  # what strict mode would have raised
    return model.eval()
