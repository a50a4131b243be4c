"""Data: local corpora and chat files in (loading), fixed-length packed token batches out (packing)."""

from .loading import load_chat_jsonl, load_chat_records, load_texts
from .packing import (
    Batch,
    PackedDataset,
    document_attention_mask,
    document_position_ids,
    label_mask,
    pack_documents,
    split_documents,
)

__all__ = [
    "Batch",
    "PackedDataset",
    "document_attention_mask",
    "document_position_ids",
    "label_mask",
    "load_chat_jsonl",
    "load_chat_records",
    "load_texts",
    "pack_documents",
    "split_documents",
]
