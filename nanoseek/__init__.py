"""nanoseek: DeepSeek-V3 -> R1 -> V3.2 in one compact PyTorch code base."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# The public names load on first use (PEP 562), so `import nanoseek` and the `nanoseek` command start
# without importing torch; `from nanoseek import DeepSeekModel` works as before.
_LAZY = {"PRESETS": ".config", "ModelConfig": ".config", "DENSE_PRESETS": ".model", "DeepSeekModel": ".model",
         "DenseConfig": ".model", "DenseKVCache": ".model", "DenseModel": ".model", "LatentCache": ".model",
         "ModelOutput": ".model", "load_dense": ".model.dense_checkpoint"}

if TYPE_CHECKING:
    from .config import PRESETS, ModelConfig
    from .model import DENSE_PRESETS, DeepSeekModel, DenseConfig, DenseKVCache, DenseModel, LatentCache, ModelOutput
    from .model.dense_checkpoint import load_dense


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def from_pretrained(path, dtype=None, device="cpu", strict=True, keep_fp8=False):
    """Load a Hugging Face-layout DeepSeek-V3/V3.2 checkpoint folder. See nanoseek.checkpoint.load_pretrained."""
    from .checkpoint import load_pretrained

    return load_pretrained(path, dtype=dtype, device=device, strict=strict, keep_fp8=keep_fp8)


__all__ = ["DENSE_PRESETS", "DeepSeekModel", "DenseConfig", "DenseKVCache", "DenseModel", "LatentCache", "ModelConfig",
           "ModelOutput", "PRESETS", "from_pretrained", "load_dense"]
