"""DeepSeek-V3.1 tool calls in a completion -> OpenAI `tool_calls`, whole or while it streams.

The answer part of a completion (after the reasoning split) reads
`{content}<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>{name}<｜tool▁sep｜>{arguments}<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>`.
`parse_tool_calls` accepts it only whole and well formed: every call a known tool name and a JSON object as its
arguments, the block closed, nothing after it but whitespace. Anything else (a call cut off by max_tokens, broken
JSON, an unknown tool) is returned as plain content, the block's text included, and no tool call: a client never
receives arguments that do not parse. `ToolCallStreamer` gives the same result while the text streams: content
before the block goes out as it comes (less a tail that may still grow into `<｜tool▁calls▁begin｜>`, and trailing
whitespace), the block is held until the completion ends, then sent as one delta per call (or as content).

vLLM's DeepSeek-V3.1 parser (vllm/entrypoints/openai/tool_parsers/deepseekv31_tool_parser.py) finds calls with a
regex and passes the arguments through unchecked, keeping the calls it could match even in a truncated block, and
streams the arguments a token at a time; see docs/inference.md ("Tool calls") for the comparison.
"""

from __future__ import annotations

import json
import re
import uuid

from ..tokenizer import END_THINK, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_SEP, \
    TOOL_TOKENS
from .reasoning import _held_suffix

_CALL = re.compile(re.escape(TOOL_CALL_BEGIN) + "(.*?)" + re.escape(TOOL_SEP) + "(.*?)" + re.escape(TOOL_CALL_END),
                   re.S)


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def forced_prefix(choice, thinking: bool, tokenizer) -> tuple[str, list[int]]:
    """(text, ids) that a `tool_choice` of "required" or a function name puts at the start of the completion (the
    prompt ends with it, so the call is certain): the reasoning block closed empty (thinking), the tool-calls
    block opened, and for a named function its name and separator. ("", []) for "auto"."""
    if choice == "auto":
        return "", []
    head = (END_THINK if thinking else "") + TOOL_CALLS_BEGIN + TOOL_CALL_BEGIN
    if choice == "required":
        return head, tokenizer.encode(head)
    return head + choice + TOOL_SEP, tokenizer.encode(head) + tokenizer.encode_text(choice) + tokenizer.encode(TOOL_SEP)


def parse_tool_calls(text: str, names) -> tuple[str | None, list[dict] | None]:
    """(content, tool_calls) of an answer: tool_calls None (and content the whole text) unless the answer ends in
    a well-formed tool-calls block whose every call names one of `names` with a JSON object for arguments. content
    is the text before the block, stripped; None when empty and there are calls."""
    start = text.find(TOOL_CALLS_BEGIN)
    if start < 0:
        return text, None
    body, pos, calls = text[start + len(TOOL_CALLS_BEGIN):], 0, []
    while body.startswith(TOOL_CALL_BEGIN, pos):
        m = _CALL.match(body, pos)
        if m is None:
            return text, None
        name, args = m.group(1).strip(), m.group(2).strip()
        if name not in names or any(t in name or t in args for t in TOOL_TOKENS):
            return text, None
        try:
            if not isinstance(json.loads(args), dict):
                return text, None
        except ValueError:
            return text, None
        calls.append({"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": args}})
        pos = m.end()
    if not calls or body[pos:].strip() != TOOL_CALLS_END:
        return text, None
    return text[:start].strip() or None, calls


class ToolCallStreamer:
    """feed(answer_delta) -> content_delta; finish() -> (content_delta, tool_calls or None). The concatenated
    content deltas equal parse_tool_calls(whole answer)[0] (or "" for None)."""

    def __init__(self, names):
        self.names = set(names)
        self.text = ""
        self.sent = ""

    def feed(self, delta: str) -> str:
        self.text += delta
        start = self.text.find(TOOL_CALLS_BEGIN)
        if start >= 0:
            certain = self.text[:start]
        else:  # a tail that may grow into the begin token is held back
            certain = self.text[: len(self.text) - _held_suffix(self.text, TOOL_CALLS_BEGIN)]
        return self._advance(certain.rstrip())

    def finish(self) -> tuple[str, list[dict] | None]:
        content, calls = parse_tool_calls(self.text, self.names)
        return self._advance(content or ""), calls

    def _advance(self, content: str) -> str:
        assert content.startswith(self.sent), "emitted content was not final"
        delta, self.sent = content[len(self.sent):], content
        return delta
