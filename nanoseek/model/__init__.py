"""The network, bottom-up: layers (norm, rope, MLP) -> mla (attention + DSA indexer) -> moe -> transformer."""

from .cache import LatentCache
from .dense import DENSE_PRESETS, DenseConfig, DenseKVCache, DenseModel
from .moe import RouterOutput
from .transformer import DeepSeekModel, ModelOutput

DEEPSEEK_MODEL_TYPES = ("deepseek_v3", "deepseek_v32", "deepseek_v2", "kimi_k2")  # nanoseek.checkpoint.load_pretrained
DENSE_MODEL_TYPES = ("qwen2",)  # nanoseek.model.dense_checkpoint.load_dense (also transformers' Qwen2 folders)


def load_model(path, dtype=None, device="cpu", strict: bool = True):
    """Any model folder the stages take, by config.json's model_type: a DeepSeek-V3/V3.2 folder (DeepSeekModel)
    or a Qwen2-layout dense folder (DenseModel: nanoseek's distillation student, or a folder written by
    transformers' Qwen2ForCausalLM.save_pretrained). dtype None = float32. One error names the supported types."""
    import json
    from pathlib import Path

    import torch

    folder = Path(path)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no config.json in model folder {folder}")
    try:
        model_type = json.loads(cfg_path.read_text()).get("model_type", "deepseek_v3")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{cfg_path}: not a JSON object ({e})") from None
    dtype = torch.float32 if dtype is None else dtype
    if model_type in DENSE_MODEL_TYPES:
        from .dense_checkpoint import load_dense

        return load_dense(folder, dtype=dtype, device=device, strict=strict)
    if model_type in DEEPSEEK_MODEL_TYPES:
        from ..checkpoint import load_pretrained

        return load_pretrained(folder, dtype=dtype, device=device, strict=strict)
    raise ValueError(f"{cfg_path}: model_type {model_type!r} is not supported; nanoseek loads "
                     f"{', '.join(DEEPSEEK_MODEL_TYPES + DENSE_MODEL_TYPES)}")


__all__ = ["DENSE_PRESETS", "DeepSeekModel", "DenseConfig", "DenseKVCache", "DenseModel", "LatentCache", "ModelOutput",
           "RouterOutput", "load_model"]
