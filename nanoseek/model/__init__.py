"""The network, bottom-up: layers (norm, rope, MLP) -> mla (attention + DSA indexer) -> moe -> transformer."""

from .cache import LatentCache
from .dense import DENSE_PRESETS, DenseConfig, DenseKVCache, DenseModel
from .moe import RouterOutput
from .transformer import DeepSeekModel, ModelOutput

__all__ = ["DENSE_PRESETS", "DeepSeekModel", "DenseConfig", "DenseKVCache", "DenseModel", "LatentCache", "ModelOutput",
           "RouterOutput"]
