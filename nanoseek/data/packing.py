"""Packing tokenized documents into fixed-length training rows, with document boundaries kept.

Layout: each document becomes [BOS?] + tokens + [EOS]; these are concatenated and cut into
disjoint rows of seq_len + 1 tokens (inputs = row[:-1], labels = row[1:]), so every token lands
in exactly one row, in order, and a long document simply continues in the next row. Next to each
row comes `doc_ids` (same shape): the index of the source document of every token (-1 on padding).
From it a trainer builds what keeps documents apart inside a row:
  - label_mask(doc_ids): no loss on a label from another document than its input (B, T);
  - document_attention_mask(doc_ids): block-diagonal causal attention (B, T, T);
  - document_position_ids(doc_ids): positions restarting at 0 at every document start (B, T).
One prediction per row (row[-1] of row i -> row[0] of row i+1) is never trained: the price of
disjoint rows, which keep every token exactly once. Empty documents are skipped.
Without bos_id the first token of a document is never a label (it follows another document's
EOS); pass bos_id (or encode with add_bos=True) when the model should learn document starts.

PackedDataset reshuffles every epoch from (seed, epoch) alone: the document order (so different
documents share rows each epoch) and then the row order. Its position (epoch, row) is the whole
iterator state, so state_dict()/load_state_dict() resume with exactly the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch


class Batch(NamedTuple):
    tokens: torch.Tensor  # (B, seq_len + 1) int64: inputs tokens[:, :-1], labels tokens[:, 1:]
    doc_ids: torch.Tensor  # (B, seq_len + 1) int64: source document of each token, -1 on padding


def _document_arrays(token_lists, eos_id: int, bos_id: int | None) -> tuple[list[np.ndarray], list[int]]:
    """Each non-empty document as an int32 array with its separators, and its index in token_lists."""
    arrays, kept = [], []
    for i, doc in enumerate(token_lists):
        if len(doc) == 0:
            continue
        parts = ([[bos_id]] if bos_id is not None else []) + [np.asarray(doc, dtype=np.int64), [eos_id]]
        arr = np.concatenate(parts)
        if arr.min() < 0 or arr.max() > np.iinfo(np.int32).max:
            raise ValueError(f"document {i}: token ids must be in [0, 2**31), got range [{arr.min()}, {arr.max()}]")
        arrays.append(arr.astype(np.int32))  # int32 halves the memory of an epoch's rows
        kept.append(i)
    return arrays, kept


def _pack(arrays: list[np.ndarray], doc_index: list[int], order, seq_len: int, pad_id: int | None):
    """Concatenate arrays in `order` and cut rows of seq_len + 1: (tokens, doc_ids), each (N, seq_len + 1)."""
    row = seq_len + 1
    if len(order) == 0:
        return np.zeros((0, row), np.int32), np.zeros((0, row), np.int64)
    stream = np.concatenate([arrays[i] for i in order])  # (total,)
    docs = np.repeat(np.asarray(doc_index, np.int64)[order], [len(arrays[i]) for i in order])  # (total,)
    n_full, rest = divmod(len(stream), row)
    if rest and pad_id is not None:  # keep the tail: pad it to a full row, doc id -1
        pad = row - rest
        stream = np.concatenate([stream, np.full(pad, pad_id, np.int32)])
        docs = np.concatenate([docs, np.full(pad, -1, np.int64)])
        n_full += 1
    n = n_full * row
    return stream[:n].reshape(n_full, row), docs[:n].reshape(n_full, row)


def pack_documents(token_lists: Sequence[Sequence[int]], seq_len: int, eos_id: int,
                   bos_id: int | None = None, pad_id: int | None = None) -> Batch:
    """Pack documents (lists of token ids) in order into rows of seq_len + 1 tokens.

    Returns Batch(tokens, doc_ids), both (N, seq_len + 1) int64; doc_ids hold indices into
    token_lists. The last partial row is dropped, or padded with pad_id (doc id -1) if pad_id is given.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    arrays, kept = _document_arrays(token_lists, eos_id, bos_id)
    tokens, doc_ids = _pack(arrays, kept, np.arange(len(arrays)), seq_len, pad_id)
    return Batch(torch.from_numpy(tokens.astype(np.int64)), torch.from_numpy(doc_ids))


def label_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T + 1) row doc ids -> (B, T) bool: True where label t + 1 is in the same document as input t
    (so no loss across a boundary, and none on padding)."""
    return (doc_ids[:, 1:] == doc_ids[:, :-1]) & (doc_ids[:, 1:] >= 0)


def document_attention_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) input doc ids -> (B, T, T) bool, True where query i may attend key j: j <= i, same document.
    Padding (-1) attends to padding, so no row of the mask is empty."""
    T = doc_ids.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return (doc_ids[:, :, None] == doc_ids[:, None, :]) & causal  # (B, T, T)


def document_position_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) input doc ids -> (B, T) int64 positions counted from each document's first token in the row."""
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    start = torch.ones_like(doc_ids, dtype=torch.bool)
    start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=1).values  # (B, T) start of current doc
    return idx - first


def split_documents(docs: Sequence, eval_fraction: float, seed: int = 0) -> tuple[list, list]:
    """Split documents into (train, eval) lists, disjoint by document, each in the input order.

    The eval set is round(eval_fraction * n) documents (at least 1 when eval_fraction > 0, and at
    least one left for training) chosen by a permutation seeded with `seed`: the same input and
    seed give the same split.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n = len(docs)
    if eval_fraction > 0 and n < 2:
        raise ValueError(f"split_documents: need at least 2 documents for an eval split, got {n}")
    n_eval = 0 if eval_fraction == 0 else min(max(1, round(eval_fraction * n)), n - 1)
    eval_idx = set(np.random.default_rng(seed).permutation(n)[:n_eval].tolist())
    train = [d for i, d in enumerate(docs) if i not in eval_idx]
    held = [d for i, d in enumerate(docs) if i in eval_idx]
    return train, held


class PackedDataset:
    """Documents packed into rows of seq_len + 1, reshuffled per epoch, with a resumable position.

    One iterator at a time: batches() advances this object's (epoch, position) as it yields, so
    state_dict() taken after receiving a batch resumes with the batch after it.
    """

    def __init__(self, token_lists: Sequence[Sequence[int]], seq_len: int, eos_id: int, *,
                 bos_id: int | None = None, pad_id: int | None = None, seed: int = 0, shuffle: bool = True):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.seq_len, self.seed, self.shuffle, self.pad_id = seq_len, seed, shuffle, pad_id
        self._arrays, self._doc_index = _document_arrays(token_lists, eos_id, bos_id)
        self.num_docs = len(token_lists)
        self.num_tokens = sum(len(a) for a in self._arrays)  # with separators
        self.epoch, self.position = 0, 0  # position: rows of this epoch already yielded
        self._cache: tuple[int, np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        """Rows per epoch (the same every epoch: only the order changes)."""
        n_full, rest = divmod(self.num_tokens, self.seq_len + 1)
        return n_full + int(rest > 0 and self.pad_id is not None)

    def epoch_rows(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, doc_ids) int arrays (N, seq_len + 1) in the order epoch `epoch` yields them."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1], self._cache[2]
        n = len(self._arrays)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch])  # a function of (seed, epoch) only
            tokens, doc_ids = _pack(self._arrays, self._doc_index, rng.permutation(n), self.seq_len, self.pad_id)
            perm = rng.permutation(len(tokens))
            tokens, doc_ids = tokens[perm], doc_ids[perm]
        else:
            tokens, doc_ids = _pack(self._arrays, self._doc_index, np.arange(n), self.seq_len, self.pad_id)
        self._cache = (epoch, tokens, doc_ids)
        return tokens, doc_ids

    def batches(self, batch_size: int, epochs: int | None = None, drop_last: bool = True) -> Iterator[Batch]:
        """Yield Batch(tokens, doc_ids), each (B, seq_len + 1) int64, from the current position on,
        until `epochs` epochs are done (forever if None). drop_last skips an epoch's last partial batch."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(self) == 0:
            raise ValueError(f"no full row of seq_len + 1 = {self.seq_len + 1} tokens in {self.num_tokens} tokens")
        if drop_last and batch_size > len(self):
            raise ValueError(f"batch_size {batch_size} exceeds the {len(self)} rows of one epoch "
                             f"({self.num_tokens} tokens, seq_len {self.seq_len}); lower it or add data")
        while epochs is None or self.epoch < epochs:
            tokens, doc_ids = self.epoch_rows(self.epoch)
            start = self.position
            end = min(start + batch_size, len(tokens))
            if start >= len(tokens) or (drop_last and end - start < batch_size):
                self.epoch, self.position = self.epoch + 1, 0
                continue
            self.position = end  # advance before yielding: a state_dict taken now resumes after this batch
            yield Batch(torch.from_numpy(tokens[start:end].astype(np.int64)), torch.from_numpy(doc_ids[start:end]))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "seq_len": self.seq_len, "num_docs": self.num_docs, "num_tokens": self.num_tokens}

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved position; the data and seq_len must be the ones it was saved with."""
        for key in ("seq_len", "num_docs", "num_tokens"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"PackedDataset state: {key} is {state.get(key)} in the state but "
                                 f"{getattr(self, key)} here; resume on the same data and seq_len")
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])
        self._cache = None
