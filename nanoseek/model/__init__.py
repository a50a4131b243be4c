"""The network, bottom-up: layers (norm, rope, MLP) -> mla (attention + DSA indexer) -> moe -> transformer."""

from .cache import LatentCache
from .moe import RouterOutput
from .transformer import DeepSeekModel, ModelOutput

__all__ = ["DeepSeekModel", "LatentCache", "ModelOutput", "RouterOutput"]
