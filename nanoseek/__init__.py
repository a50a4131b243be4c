"""nanoseek: DeepSeek-V3 -> R1 -> V3.2 in one compact PyTorch code base."""

from .config import PRESETS, ModelConfig
from .model import DENSE_PRESETS, DeepSeekModel, DenseConfig, DenseKVCache, DenseModel, LatentCache, ModelOutput
from .model.dense_checkpoint import load_dense

__version__ = "0.1.0"


def from_pretrained(path, dtype=None, device="cpu", strict=True, keep_fp8=False):
    """Load a Hugging Face-layout DeepSeek-V3/V3.2 checkpoint folder. See nanoseek.checkpoint.load_pretrained."""
    from .checkpoint import load_pretrained

    return load_pretrained(path, dtype=dtype, device=device, strict=strict, keep_fp8=keep_fp8)


__all__ = ["DENSE_PRESETS", "DeepSeekModel", "DenseConfig", "DenseKVCache", "DenseModel", "LatentCache", "ModelConfig",
           "ModelOutput", "PRESETS", "from_pretrained", "load_dense"]
