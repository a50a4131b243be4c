"""Local text corpora and chat data: .txt, .jsonl and .parquet in, plain Python strings/dicts out.

Documents in a .txt file: by default the whole file is one document (a folder of .txt files is a
folder of documents). `txt_split="blank_line"` makes each block separated by one or more blank
lines a document (a single file of many short texts); `txt_split="line"` makes every non-empty line
a document. .jsonl holds one JSON object per line with the text in `text_field`; .parquet holds the
text in column `text_field` (needs pyarrow, imported only when a parquet file is read).
Every user-facing error names the file (and line, for JSONL) so the bad record can be found.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator

from ..tokenizer import validate_messages, validate_tools

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
TXT_SPLITS = ("file", "blank_line", "line")
_BLANK_LINES = re.compile(r"\n(?:[ \t]*\n)+")  # one or more blank (or whitespace-only) lines


def _expand(paths: str | os.PathLike | Iterable[str | os.PathLike], suffixes: tuple[str, ...]) -> list[str]:
    """Files named by paths; a folder stands for its files with a known suffix, recursively, sorted."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = []
    for p in map(os.fspath, paths):
        if os.path.isdir(p):
            found = [os.path.join(root, name) for root, _, names in os.walk(p) for name in names
                     if name.endswith(suffixes)]
            files.extend(sorted(found))  # sorted: the same corpus order on every machine
        elif os.path.isfile(p):
            if not p.endswith(suffixes):
                raise ValueError(f"{p}: unsupported file type; expected one of {', '.join(suffixes)}")
            files.append(p)
        else:
            raise FileNotFoundError(f"data file not found: {p}")
    return files


def _decode(raw: bytes, path: str, lineno: int | None = None) -> str:
    """UTF-8 text, or a ValueError naming the file and line (and the byte) that is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if lineno is None:  # a whole file: find the line
            lineno = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start:e.start + 1]!r}: {e.reason}); "
                         f"re-encode the file as UTF-8") from None


def _read_txt(path: str, txt_split: str) -> Iterator[str]:
    with open(path, "rb") as f:
        text = _decode(f.read(), path).replace("\r\n", "\n").replace("\r", "\n")  # as text mode reads it
    if txt_split == "file":
        docs = [text]
    elif txt_split == "blank_line":
        docs = _BLANK_LINES.split(text.replace("\r\n", "\n"))
    else:  # "line"
        docs = text.splitlines()
    for doc in docs:
        if doc.strip():  # empty documents would only add separators
            yield doc.strip("\n") if txt_split != "file" else doc


def _jsonl_records(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a line that is not a JSON object raises ValueError."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = _decode(raw, path, lineno)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record


def _read_jsonl(path: str, text_field: str) -> Iterator[str]:
    for lineno, record in _jsonl_records(path):
        if text_field not in record:
            raise ValueError(f"{path}:{lineno}: field {text_field!r} missing (keys: {sorted(record)})")
        text = record[text_field]
        if not isinstance(text, str):
            raise ValueError(f"{path}:{lineno}: field {text_field!r} must be a string, got {type(text).__name__}")
        yield text


def _read_parquet(path: str, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if text_field not in names:
        raise ValueError(f"{path}: column {text_field!r} not found (columns: {names})")
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):  # streams: bounded memory
        for text in batch.column(0).to_pylist():
            if text is None:
                continue  # a null row is no document
            if not isinstance(text, str):
                raise ValueError(f"{path}: column {text_field!r} must hold strings, got {type(text).__name__}")
            yield text


def load_texts(paths, text_field: str = "text", txt_split: str = "file") -> Iterator[str]:
    """Documents from .txt / .jsonl / .parquet files (or folders of them), in order, lazily.

    paths: one path or many; a folder means every supported file under it, sorted.
    text_field: the JSONL field / parquet column holding the text.
    txt_split: "file" (one document per .txt file), "blank_line" or "line"; see the module docstring.
    """
    if txt_split not in TXT_SPLITS:
        raise ValueError(f"txt_split must be one of {TXT_SPLITS}, got {txt_split!r}")
    for path in _expand(paths, TEXT_SUFFIXES):
        if path.endswith(".txt"):
            yield from _read_txt(path, txt_split)
        elif path.endswith(".jsonl"):
            yield from _read_jsonl(path, text_field)
        else:
            yield from _read_parquet(path, text_field)


CHAT_FIELDS = ("role", "content", "reasoning_content", "tool_calls", "tool_call_id", "name")  # kept per message


def load_chat_records(path, messages_field: str = "messages") -> list[dict]:
    """{"messages", "tools"} per line of a JSONL file of {"messages": [...], "tools": [...]?}.

    Messages: roles system/user/assistant/tool, content a string (None on an assistant turn with tool_calls),
    reasoning_content on assistant turns, tool_calls (OpenAI form) on assistant turns, tool messages after
    them; `tools` (optional) is the OpenAI function list the V3.1 template renders into the system prompt.
    Anything else raises ValueError naming file:line and the bad entry. Only CHAT_FIELDS are kept.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"chat data file not found: {path}")
    out = []
    for lineno, record in _jsonl_records(path):
        if messages_field not in record:
            raise ValueError(f"{path}:{lineno}: field {messages_field!r} missing (keys: {sorted(record)})")
        messages = record[messages_field]
        validate_messages(messages, where=f"{path}:{lineno}: {messages_field}")
        tools = record.get("tools")
        validate_tools(tools, where=f"{path}:{lineno}: tools")
        out.append({"messages": [{k: m[k] for k in CHAT_FIELDS if m.get(k) is not None} for m in messages],
                    "tools": tools})
    return out


def load_chat_jsonl(path, messages_field: str = "messages") -> list[list[dict]]:
    """The conversations of `load_chat_records` (messages only)."""
    return [r["messages"] for r in load_chat_records(path, messages_field)]
