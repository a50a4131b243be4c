"""LatentCache: the MLA decode cache. Per token and layer it holds kv_lora_rank + qk_rope_head_dim values
(the normalised latent c and the roped shared key), plus index_head_dim values for DSA's indexer keys.

Rows are independent slots: each write lands at that row's absolute positions, so rows of different
lengths, chunked prefill and slot reuse (continuous batching) need no special cases. A row's stale
entries past its current position are never read, because the attention mask only admits key
positions <= the query's position.
"""

from __future__ import annotations

import copy

import torch

from ..config import ModelConfig


class LatentCache:
    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", num_layers: int | None = None):
        L = num_layers if num_layers is not None else config.num_hidden_layers + config.num_nextn_predict_layers
        self.R, self.r = config.kv_lora_rank, config.qk_rope_head_dim
        self.max_len = max_len
        self.latent = torch.zeros(L, batch_size, max_len, self.R + self.r, dtype=dtype, device=device)
        self.index_keys = (
            torch.zeros(L, batch_size, max_len, config.index_head_dim, dtype=dtype, device=device)
            if config.use_dsa else None
        )
        self._kv_len = 0
        self.rows: torch.Tensor | None = None  # rows_view: the rows of the batch, in this cache's tensors

    @property
    def batch_size(self) -> int:
        return self.latent.shape[1]

    def bytes_per_token(self) -> int:
        """Cache bytes per token summed over layers."""
        n = self.latent.shape[-1] * self.latent.shape[0]
        if self.index_keys is not None:
            n += self.index_keys.shape[-1] * self.index_keys.shape[0]
        return n * self.latent.element_size()

    def kv_len(self, positions: torch.Tensor) -> int:
        """Keys to read for this step: up to the largest position written (one host sync per forward)."""
        n = int(positions.max()) + 1
        if n > self.max_len:
            raise ValueError(f"position {n - 1} is beyond the cache length {self.max_len}")
        self._kv_len = n
        return n

    def write(self, layer: int, positions: torch.Tensor, c: torch.Tensor, k_pe: torch.Tensor,
              index_keys: torch.Tensor | None = None):
        """Store this step's (B, T, .) values at `positions` (B, T); return the readable prefix (B, S, .)."""
        B = positions.shape[0]
        sel = self.rows if self.rows is not None else torch.arange(B, device=positions.device)
        rows = sel.unsqueeze(1).expand_as(positions)
        buf = self.latent[layer]
        buf[rows, positions] = torch.cat([c, k_pe], dim=-1).to(buf.dtype)
        S = self._kv_len
        view = buf[:B, :S] if self.rows is None else buf[sel, :S]
        keys = None
        if index_keys is not None and self.index_keys is not None:
            ib = self.index_keys[layer]
            ib[rows, positions] = index_keys.to(ib.dtype)
            keys = ib[:B, :S] if self.rows is None else ib[sel, :S]
        return view[..., : self.R], view[..., self.R:], keys

    def row_view(self, s: int) -> "LatentCache":
        """A batch-1 cache aliasing row s (writes land in this cache's tensors)."""
        view = copy.copy(self)
        view.latent = self.latent[:, s:s + 1]
        if self.index_keys is not None:
            view.index_keys = self.index_keys[:, s:s + 1]
        return view

    def rows_view(self, rows: list[int]) -> "LatentCache":
        """A batch-len(rows) cache over these rows of this one, in any order (a batched prefill of scattered
        slots): writes land in this cache's tensors, reads gather the rows."""
        view = copy.copy(self)
        view.rows = torch.tensor(rows, dtype=torch.long, device=self.latent.device)
        return view

    def copy_rows(self, src: list[int], dst: list[int], n: int) -> None:
        """Rows dst[i] take the first n positions of rows src[i] (prefix reuse, a prompt's other samples), in one
        indexed copy."""
        s, d = torch.tensor(src, device=self.latent.device), torch.tensor(dst, device=self.latent.device)
        self.latent[:, d, :n] = self.latent[:, s, :n]
        if self.index_keys is not None:
            self.index_keys[:, d, :n] = self.index_keys[:, s, :n]
